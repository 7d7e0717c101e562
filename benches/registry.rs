//! The registry's cost of one endpoint change at 100k endpoints (10k
//! services x 10 endpoints): the pure `apply`, and the snapshot copy the
//! registry task publishes after it.
//!
//! Run: `cargo bench --bench registry`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use beacon::model::{Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec, SourceId};
use beacon::registry::{self, Event, State, Update};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const SERVICES: u32 = 10_000;
const ENDPOINTS: u32 = 10;

fn spec(i: u32, first_ready: bool) -> ServiceSpec {
    let mut s = ServiceSpec::new(ServiceKey::new("default", &format!("svc-{i}")));
    s.health.probe = ProbeKind::None;
    s.ports.push(Port {
        name: "http".into(),
        port: 80,
        target_port: 8080,
        protocol: Protocol::Tcp,
        listen: None,
    });
    for j in 0..ENDPOINTS {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * ENDPOINTS + j + 1));
        let mut ep = Endpoint::new(ip);
        ep.ready = j != 0 || first_ready;
        s.endpoints.push(ep);
    }
    s
}

/// A state holding 10k services x 10 endpoints from one source.
fn full_state(source: &SourceId) -> State {
    let mut state = State::new(vec![source.clone()]);
    let specs = (0..SERVICES).map(|i| spec(i, true)).collect();
    registry::apply(
        &mut state,
        Event::Source {
            source: source.clone(),
            update: Update::Reset(specs),
        },
    );
    assert_eq!(
        state.snapshot().endpoint_count(),
        (SERVICES * ENDPOINTS) as usize
    );
    state
}

fn one_endpoint_change(c: &mut Criterion) {
    let source: SourceId = "bench".into();
    let mut state = full_state(&source);
    // Flip the readiness of one endpoint of one service, back and forth.
    let variants = [spec(SERVICES / 2, true), spec(SERVICES / 2, false)];
    let mut n = 0usize;
    let mut group = c.benchmark_group("registry_100k_endpoints");
    group.bench_function("apply_upsert_one_endpoint", |b| {
        b.iter_batched(
            || {
                n += 1;
                Event::Source {
                    source: source.clone(),
                    update: Update::Upsert(Box::new(variants[n % 2].clone())),
                }
            },
            |event| {
                let changed = registry::apply(&mut state, event);
                assert_eq!(changed.services.len(), 1);
                changed
            },
            BatchSize::SmallInput,
        )
    });
    // What the registry task does after a change: publish a new version,
    // a copy of the service map (each service is an Arc).
    group.bench_function("publish_snapshot_copy", |b| {
        b.iter(|| black_box(Arc::new(black_box(state.snapshot()).clone())))
    });
    group.finish();
}

fn full_reset(c: &mut Criterion) {
    let source: SourceId = "bench".into();
    let mut group = c.benchmark_group("registry_100k_endpoints");
    group.sample_size(10);
    group.bench_function("first_full_reset", |b| {
        b.iter_batched(
            || {
                (
                    State::new(vec![source.clone()]),
                    (0..SERVICES).map(|i| spec(i, true)).collect::<Vec<_>>(),
                )
            },
            |(mut state, specs)| {
                registry::apply(
                    &mut state,
                    Event::Source {
                        source: source.clone(),
                        update: Update::Reset(specs),
                    },
                );
                state
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, one_endpoint_change, full_reset);
criterion_main!(benches);
