//! `pick` cost per policy and endpoint-set size (3 to 1,000), and maglev's table build
//! (paid once per snapshot change of a maglev service).
//!
//! Run: `cargo bench --bench balancer`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use beacon::model::Balance;
use beacon::proxy::balancer::{self, Backend, ConnInfo, Maglev};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn backends(n: u32) -> Vec<Backend> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0a00_0001 + i);
            Backend::new(SocketAddr::new(ip.into(), 8080), 1 + i % 3)
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [3u32, 10, 100, 1_000] {
        let set = backends(n);
        for (name, policy) in Balance::ALL {
            let b = balancer::build(policy, &set);
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

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    group.sample_size(20);
    for n in [3u32, 100] {
        let set = backends(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |bench, set| {
            bench.iter(|| black_box(Maglev::new(black_box(set))))
        });
    }
    group.finish();
}

criterion_group!(benches, pick, maglev_build);
criterion_main!(benches);
