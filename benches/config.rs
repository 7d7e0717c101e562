//! Parsing services files: the shipped `config/services.toml`, and one
//! service with 10 endpoints as the file source re-reads it on a change
//! (one file per service).
//!
//! Run: `cargo bench --bench config`.

use std::hint::black_box;
use std::path::Path;

use beacon::config::{ServiceDefaults, ServicesIndex, parse_services};
use criterion::{Criterion, criterion_group, criterion_main};

const SHIPPED: &str = include_str!("../config/services.toml");

fn one_service_file(endpoints: u32) -> String {
    let mut s = String::from(
        "[[service]]\nname = \"svc-1\"\nnamespace = \"default\"\nbalance = \"p2c\"\n\n  [[service.port]]\n  name = \"http\"\n  port = 80\n  target_port = 8080\n",
    );
    for j in 0..endpoints {
        s.push_str(&format!(
            "\n  [[service.endpoint]]\n  ip = \"10.0.{}.{}\"\n  hostname = \"ep-{j}\"\n",
            j / 250,
            j % 250 + 1
        ));
    }
    s.push_str("\n  [service.health]\n  kind = \"http\"\n  path = \"/healthz\"\n");
    s
}

fn parse(c: &mut Criterion) {
    let defaults = ServiceDefaults::default();
    let ten = one_service_file(10);
    let mut group = c.benchmark_group("parse_services");
    for (name, text) in [
        ("shipped_services_toml", SHIPPED),
        ("one_service_10_endpoints", &ten),
    ] {
        // Every input must parse, or the bench measures the error path.
        let specs = parse_services(
            text,
            Path::new("bench.toml"),
            &defaults,
            &mut ServicesIndex::default(),
        )
        .expect("bench input parses");
        assert!(!specs.is_empty());
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut index = ServicesIndex::default();
                black_box(parse_services(
                    black_box(text),
                    Path::new("bench.toml"),
                    &defaults,
                    &mut index,
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
