//! `pick` per balancing policy at 10 and 1,000 endpoints, and the maglev
//! table build (paid once per snapshot change of a maglev service).
//!
//! Run: `cargo bench --bench balancer`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use beacon::model::Balance;
use beacon::proxy::balancer::{self, Backend, ConnInfo};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn backends(n: u32) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            Backend::new(
                SocketAddr::new(Ipv4Addr::from(0x0a00_0001 + i).into(), 8080),
                1 + i % 3,
            )
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("balancer_pick");
    for n in [10u32, 1_000] {
        let set = backends(n);
        for (name, policy) in Balance::ALL {
            let b = balancer::build(policy, &set);
            assert!(
                !b.pick(&ConnInfo {
                    client: "127.0.0.1:40000".parse().unwrap()
                })
                .is_empty()
            );
            let mut client = 0u32;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    client = client.wrapping_add(1);
                    let ip = Ipv4Addr::from(0x7f00_0000 | (client & 0xffff));
                    let conn = ConnInfo {
                        client: SocketAddr::new(ip.into(), 40000),
                    };
                    black_box(b.pick(black_box(&conn)))
                })
            });
        }
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("balancer_build");
    group.sample_size(20);
    for n in [10u32, 1_000] {
        let set = backends(n);
        for (name, policy) in [
            ("maglev", Balance::Maglev),
            ("round_robin", Balance::RoundRobin),
        ] {
            group.bench_with_input(BenchmarkId::new(name, n), &set, |bench, set| {
                bench.iter(|| black_box(balancer::build(policy, black_box(set))))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick, build);
criterion_main!(benches);
