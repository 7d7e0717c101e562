//! Parsing services files: the shipped `config/services.toml`, one
//! service with 10 endpoints as the file source re-reads it on a change
//! (one file per service), and 10,000 services in one file (parsing must
//! stay linear in the file's size: positions come from a line index).
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

/// `n` services with a vip, one port and two endpoints each.
fn many_services_file(n: u32) -> String {
    let mut s = String::new();
    for i in 0..n {
        let (a, b) = (i / 250, i % 250 + 1);
        s.push_str(&format!(
            "[[service]]\nname = \"svc-{i}\"\nvip = \"127.1.{a}.{b}\"\n\n  [[service.port]]\n  name = \"http\"\n  port = 80\n  target_port = 8080\n\n  [[service.endpoint]]\n  ip = \"10.0.{a}.{b}\"\n  hostname = \"ep-0\"\n\n  [[service.endpoint]]\n  ip = \"10.1.{a}.{b}\"\n  hostname = \"ep-1\"\n\n"
        ));
    }
    s
}

fn parse(c: &mut Criterion) {
    let defaults = ServiceDefaults::default();
    let ten = one_service_file(10);
    let many = many_services_file(10_000);
    let mut group = c.benchmark_group("parse_services");
    // The large file takes fewer samples: each one parses 2.5 MB.
    for (name, text, samples) in [
        ("shipped_services_toml", SHIPPED, 100),
        ("one_service_10_endpoints", &ten, 100),
        ("ten_thousand_services", &many, 10),
    ] {
        group.sample_size(samples);
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
