use super::*;
use crate::model::{Endpoint, ProbeState};

fn spec(name: &str, ips: &[&str]) -> ServiceSpec {
    let mut s = ServiceSpec::new(ServiceKey::new("default", name));
    s.endpoints = ips
        .iter()
        .map(|ip| Endpoint::new(ip.parse().unwrap()))
        .collect();
    s
}

fn src(name: &str) -> SourceId {
    name.into()
}

fn reset(state: &mut State, source: &str, specs: Vec<ServiceSpec>) -> Changed {
    apply(
        state,
        Event::Source {
            source: src(source),
            update: Update::Reset(specs),
        },
    )
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

#[test]
fn reset_drops_what_it_does_not_list() {
    let mut st = State::new(vec![src("a")]);
    reset(
        &mut st,
        "a",
        vec![spec("web", &["10.0.0.1"]), spec("db", &["10.0.0.2"])],
    );
    assert_eq!(st.snapshot().services.len(), 2);
    let changed = reset(&mut st, "a", vec![spec("web", &["10.0.0.1"])]);
    assert_eq!(changed.services, vec![key("db")]);
    assert!(st.snapshot().service(&key("db")).is_none());
    assert!(st.snapshot().service(&key("web")).is_some());
}

#[test]
fn no_change_means_no_new_version() {
    let mut st = State::new(vec![src("a")]);
    assert!(reset(&mut st, "a", vec![spec("web", &["10.0.0.1"])]).any());
    let again = reset(&mut st, "a", vec![spec("web", &["10.0.0.1"])]);
    assert!(!again.any(), "identical reset must not change anything");
    let upsert_same = apply(
        &mut st,
        Event::Source {
            source: src("a"),
            update: Update::Upsert(Box::new(spec("web", &["10.0.0.1"]))),
        },
    );
    assert!(!upsert_same.any());
    let remove_absent = apply(
        &mut st,
        Event::Source {
            source: src("a"),
            update: Update::Remove(key("nope")),
        },
    );
    assert!(!remove_absent.any());
}

#[test]
fn ready_after_every_source_synced() {
    let mut st = State::new(vec![src("a"), src("b")]);
    assert!(!st.snapshot().ready);
    let c = reset(&mut st, "a", vec![]);
    assert!(!c.ready && !st.snapshot().ready);
    let c = reset(&mut st, "b", vec![]);
    assert!(c.ready && st.snapshot().ready);
}

#[test]
fn startup_timeout_makes_ready() {
    let mut st = State::new(vec![src("a")]);
    assert!(apply(&mut st, Event::StartupTimeout).ready);
    assert!(st.snapshot().ready);
    assert!(!apply(&mut st, Event::StartupTimeout).any());
}

#[test]
fn first_listed_source_wins_and_the_other_takes_over() {
    let mut st = State::new(vec![src("file"), src("docker")]);
    reset(&mut st, "docker", vec![spec("web", &["10.0.0.9"])]);
    assert_eq!(
        &*st.snapshot().service(&key("web")).unwrap().source,
        "docker"
    );
    reset(&mut st, "file", vec![spec("web", &["10.0.0.1"])]);
    let web = st.snapshot().service(&key("web")).unwrap().clone();
    assert_eq!(&*web.source, "file");
    assert_eq!(web.endpoints[0].endpoint.ip.to_string(), "10.0.0.1");
    // docker says the same again: file still wins, nothing changes.
    assert!(!reset(&mut st, "docker", vec![spec("web", &["10.0.0.9"])]).any());
    // file stops naming it: docker's definition takes over.
    reset(&mut st, "file", vec![]);
    let web = st.snapshot().service(&key("web")).unwrap();
    assert_eq!(&*web.source, "docker");
}

#[test]
fn health_changes_verdict_and_is_kept_across_updates() {
    let mut st = State::new(vec![src("a")]);
    reset(&mut st, "a", vec![spec("web", &["10.0.0.1", "10.0.0.2"])]);
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let c = apply(
        &mut st,
        Event::Health {
            service: key("web"),
            ip,
            change: HealthChange::Probe(ProbeState::Down("probe failed".into())),
        },
    );
    assert_eq!(c.services, vec![key("web")]);
    let web = st.snapshot().service(&key("web")).unwrap().clone();
    assert!(!web.endpoint(ip).unwrap().healthy);
    assert_eq!(web.serving().count(), 1);
    // The same verdict again changes nothing.
    let again = apply(
        &mut st,
        Event::Health {
            service: key("web"),
            ip,
            change: HealthChange::Probe(ProbeState::Down("probe failed".into())),
        },
    );
    assert!(!again.any());
    // A source update that keeps the endpoint keeps its health.
    reset(&mut st, "a", vec![spec("web", &["10.0.0.1", "10.0.0.3"])]);
    let web = st.snapshot().service(&key("web")).unwrap();
    assert!(!web.endpoint(ip).unwrap().healthy);
    // An endpoint that leaves and comes back starts fresh.
    reset(&mut st, "a", vec![spec("web", &["10.0.0.3"])]);
    reset(&mut st, "a", vec![spec("web", &["10.0.0.1", "10.0.0.3"])]);
    assert!(
        st.snapshot()
            .service(&key("web"))
            .unwrap()
            .endpoint(ip)
            .unwrap()
            .healthy
    );
}

#[test]
fn health_for_unknown_endpoint_is_ignored() {
    let mut st = State::new(vec![src("a")]);
    reset(&mut st, "a", vec![spec("web", &["10.0.0.1"])]);
    let c = apply(
        &mut st,
        Event::Health {
            service: key("web"),
            ip: "10.9.9.9".parse().unwrap(),
            change: HealthChange::Ejected(Some("ejected".into())),
        },
    );
    assert!(!c.any());
}

#[tokio::test]
async fn task_publishes_versions_and_coalesces() {
    let shutdown = CancellationToken::new();
    let (handle, mut reader, task) =
        spawn(vec![src("a")], Duration::from_secs(60), shutdown.clone());
    assert!(!reader.current().ready);
    handle
        .source(&src("a"), Update::Reset(vec![spec("web", &["10.0.0.1"])]))
        .await;
    let snap = reader.ready().await.unwrap();
    assert!(snap.version >= 1);
    assert!(snap.service(&key("web")).is_some());
    let v = reader.latest().version;
    handle
        .source(
            &src("a"),
            Update::Upsert(Box::new(spec("web", &["10.0.0.2"]))),
        )
        .await;
    let snap = reader.changed().await.unwrap();
    assert_eq!(snap.version, v + 1);
    shutdown.cancel();
    task.await
        .unwrap()
        .expect("the registry loop ends Ok on shutdown");
}

/// After the registry stopped (shutdown, the DNS lameduck), a reader that
/// had not looked since the last publish still gets that snapshot.
#[tokio::test]
async fn a_reader_that_missed_the_last_snapshot_gets_it_after_the_registry_stopped() {
    let shutdown = CancellationToken::new();
    let (handle, mut reader, task) =
        spawn(vec![src("a")], Duration::from_secs(60), shutdown.clone());
    let mut behind = reader.clone();
    let _ = behind.latest();
    handle
        .source(&src("a"), Update::Reset(vec![spec("web", &["10.0.0.1"])]))
        .await;
    let published = reader.ready().await.unwrap().version;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert!(behind.has_changed(), "closed: the reader must look again");
    assert_eq!(behind.latest().version, published);
}

#[test]
fn panic_mode_is_counted_on_entry() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let mut st = State::new(vec![]);
    let mut web = spec("web", &["10.0.0.1"]);
    web.fail_open = true;
    reset(&mut st, "a", vec![web]);
    let calm = st.snapshot().clone();
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    apply(
        &mut st,
        Event::Health {
            service: key("web"),
            ip,
            change: HealthChange::Probe(ProbeState::Down("probe failed: x 3/3".into())),
        },
    );
    let panicking = st.snapshot().clone();
    assert!(panicking.service(&key("web")).unwrap().panic);
    metrics::with_local_recorder(&recorder, || {
        publish_endpoint_gauges(&calm, &panicking, &[key("web")]);
        // Staying in panic mode does not count again.
        publish_endpoint_gauges(&panicking, &panicking, &[key("web")]);
    });
    let text = handle.render();
    assert!(
        text.contains("beacon_panic_mode_total{service=\"web.default\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("beacon_panic_mode{service=\"web.default\"} 1"),
        "{text}"
    );
    metrics::with_local_recorder(&recorder, || {
        publish_endpoint_gauges(&panicking, &calm, &[key("web")]);
    });
    let text = handle.render();
    assert!(
        text.contains("beacon_panic_mode{service=\"web.default\"} 0"),
        "{text}"
    );
    assert!(text.contains("beacon_panic_mode_total{service=\"web.default\"} 1"));
}

#[test]
fn a_batch_ends_where_events_one_by_one_end() {
    let ips = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
    let probe = |ip: &str, up: bool| Event::Health {
        service: key("web"),
        ip: ip.parse().unwrap(),
        change: HealthChange::Probe(if up {
            ProbeState::Up
        } else {
            ProbeState::Down("probe failed: x 3/3".into())
        }),
    };
    let events = || {
        vec![
            probe(ips[0], false),
            probe(ips[1], true),
            // Drops 10.0.0.3: its later health change is ignored.
            Event::Source {
                source: src("a"),
                update: Update::Upsert(Box::new(spec("web", &ips[..2]))),
            },
            probe(ips[2], false),
            probe(ips[0], true),
            Event::Health {
                service: key("web"),
                ip: ips[1].parse().unwrap(),
                change: HealthChange::Ejected(Some("ejected: 5 connect failures".into())),
            },
        ]
    };
    let mut one_by_one = State::new(vec![src("a")]);
    let mut batched = State::new(vec![src("a")]);
    for st in [&mut one_by_one, &mut batched] {
        reset(st, "a", vec![spec("web", &ips)]);
    }
    let mut expected = Vec::new();
    for e in events() {
        expected.extend(apply(&mut one_by_one, e).services);
    }
    let changed = apply_batch(&mut batched, events());
    assert_eq!(changed.services, vec![key("web")]);
    assert!(!expected.is_empty());
    assert_eq!(batched.snapshot().services, one_by_one.snapshot().services);
    let web = batched.snapshot().service(&key("web")).unwrap().clone();
    assert_eq!(web.endpoints.len(), 2);
    assert!(web.endpoints[0].healthy);
    assert_eq!(&*web.endpoints[1].reason, "ejected: 5 connect failures");
}

mod batch_equivalence {
    //! `apply_batch` over any event sequence ends in the same state as
    //! `apply` one by one, and reports every service whose served state
    //! differs from where the batch started.
    use super::*;
    use proptest::prelude::*;

    const NAMES: [&str; 3] = ["web", "db", "api"];
    const SOURCES: [&str; 2] = ["a", "b"];

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, 1 + i])
    }

    fn arb_spec() -> impl Strategy<Value = ServiceSpec> {
        (
            0..NAMES.len(),
            proptest::collection::btree_set(0u8..4, 0..4),
            any::<bool>(),
        )
            .prop_map(|(n, ips, fail_open)| {
                let mut s = ServiceSpec::new(key(NAMES[n]));
                s.fail_open = fail_open;
                s.endpoints = ips.into_iter().map(|i| Endpoint::new(ip(i))).collect();
                s
            })
    }

    fn arb_change() -> impl Strategy<Value = HealthChange> {
        prop_oneof![
            Just(HealthChange::Probe(ProbeState::Up)),
            Just(HealthChange::Probe(ProbeState::Unknown)),
            Just(HealthChange::Probe(ProbeState::Down(
                "probe failed: x 3/3".into()
            ))),
            Just(HealthChange::Ejected(Some(
                "ejected: 5 connect failures".into()
            ))),
            Just(HealthChange::Ejected(None)),
        ]
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        let source = (0..SOURCES.len()).prop_map(|i| src(SOURCES[i]));
        prop_oneof![
            1 => (source.clone(), proptest::collection::vec(arb_spec(), 0..3)).prop_map(
                |(source, specs)| {
                    // A Reset lists each service once.
                    let mut seen = HashSet::new();
                    let specs = specs.into_iter().filter(|s| seen.insert(s.key.clone())).collect();
                    Event::Source {
                        source,
                        update: Update::Reset(specs),
                    }
                }
            ),
            2 => (source.clone(), arb_spec()).prop_map(|(source, spec)| Event::Source {
                source,
                update: Update::Upsert(Box::new(spec)),
            }),
            1 => (source, 0..NAMES.len()).prop_map(|(source, n)| Event::Source {
                source,
                update: Update::Remove(key(NAMES[n])),
            }),
            4 => (0..NAMES.len(), 0u8..4, arb_change()).prop_map(|(n, i, change)| {
                Event::Health {
                    service: key(NAMES[n]),
                    ip: ip(i),
                    change,
                }
            }),
            1 => Just(Event::StartupTimeout),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn batch_equals_one_by_one(
            before in proptest::collection::vec(arb_event(), 0..12),
            burst in proptest::collection::vec(arb_event(), 0..24),
        ) {
            let mut one_by_one = State::new(SOURCES.iter().map(|s| src(s)).collect());
            for e in before {
                apply(&mut one_by_one, e);
            }
            let start = one_by_one.snapshot().clone();
            // The same history, then the burst both ways.
            let mut batched = State {
                sources: one_by_one.sources.clone(),
                synced: one_by_one.synced.clone(),
                desired: one_by_one.desired.clone(),
                health: one_by_one.health.clone(),
                ledger: one_by_one.ledger.clone(),
                reported: one_by_one.reported.clone(),
                snapshot: one_by_one.snapshot.clone(),
            };
            let mut reported = HashSet::new();
            let mut ready = false;
            for e in burst.clone() {
                let c = apply(&mut one_by_one, e);
                reported.extend(c.services);
                ready |= c.ready;
            }
            let changed = apply_batch(&mut batched, burst);

            prop_assert_eq!(&batched.snapshot().services, &one_by_one.snapshot().services);
            prop_assert_eq!(batched.snapshot().ready, one_by_one.snapshot().ready);
            prop_assert_eq!(changed.ready, ready);
            prop_assert_eq!(&batched.health, &one_by_one.health);
            // Reported: no more than one by one would, and every service
            // whose served state moved.
            for k in &changed.services {
                prop_assert!(reported.contains(k), "{} reported by the batch only", k);
            }
            for k in NAMES.iter().map(|n| key(n)) {
                if start.services.get(&k) != batched.snapshot().services.get(&k) {
                    prop_assert!(changed.services.contains(&k), "{} changed unreported", k);
                }
            }
        }
    }
}

mod claims {
    use super::*;
    use crate::model::{Port, Protocol};
    use std::net::SocketAddr;

    fn listening(ns: &str, name: &str, listen: &str) -> ServiceSpec {
        let mut s = ServiceSpec::new(ServiceKey::new(ns, name));
        s.ports.push(Port {
            name: "".into(),
            port: 80,
            target_port: 9000,
            protocol: Protocol::Tcp,
            listen: Some(listen.parse().unwrap()),
        });
        s.endpoints.push(Endpoint::new("10.0.0.1".parse().unwrap()));
        s
    }

    fn listeners(st: &State, ns: &str, name: &str) -> Vec<SocketAddr> {
        let svc = st.snapshot().service(&ServiceKey::new(ns, name)).unwrap();
        svc.listeners.iter().map(|(a, _)| *a).collect()
    }

    fn conflicts(st: &State) -> Vec<(String, String, String, String)> {
        st.snapshot()
            .conflicts
            .iter()
            .map(|c| {
                let w = (c.kind.to_string(), c.service.to_string());
                (w.0, w.1, c.claim.to_string(), c.winner.to_string())
            })
            .collect()
    }

    const WEB: &str = "127.0.0.1:8080";

    /// The defect: `a/evil` sorts before `default/web`, so key order gave
    /// it web's listener. Whatever order the sources sync in, the first
    /// listed source keeps the address.
    #[test]
    fn the_higher_priority_source_keeps_a_listener_in_either_order() {
        for evil_first in [false, true] {
            let mut st = State::new(vec![src("one"), src("two")]);
            let web = || vec![listening("default", "web", WEB)];
            let evil = || vec![listening("a", "evil", WEB)];
            if evil_first {
                reset(&mut st, "two", evil());
                reset(&mut st, "one", web());
            } else {
                reset(&mut st, "one", web());
                reset(&mut st, "two", evil());
            }
            assert_eq!(listeners(&st, "default", "web"), vec![WEB.parse().unwrap()]);
            assert!(
                listeners(&st, "a", "evil").is_empty(),
                "evil_first={evil_first}"
            );
            let want = (
                "listen".into(),
                "evil.a".into(),
                WEB.into(),
                "web.default".into(),
            );
            assert_eq!(conflicts(&st), vec![want]);
        }
    }

    #[test]
    fn a_live_listener_is_not_handed_to_a_newcomer_of_the_same_source() {
        let mut st = State::new(vec![src("one")]);
        reset(&mut st, "one", vec![listening("default", "web", WEB)]);
        // Same source, later: `a/evil` sorts first but came second.
        let both = vec![
            listening("default", "web", WEB),
            listening("a", "evil", WEB),
        ];
        let c = reset(&mut st, "one", both.clone());
        assert!(c.conflicts);
        assert_eq!(listeners(&st, "default", "web").len(), 1);
        assert!(listeners(&st, "a", "evil").is_empty());
        // web changes its endpoints: it still asks, so it still holds.
        let mut web = listening("default", "web", WEB);
        web.endpoints
            .push(Endpoint::new("10.0.0.2".parse().unwrap()));
        reset(&mut st, "one", vec![web, listening("a", "evil", WEB)]);
        assert_eq!(listeners(&st, "default", "web").len(), 1);
        // web stops asking: the address passes on, the conflict ends.
        let c = reset(&mut st, "one", vec![listening("a", "evil", WEB)]);
        assert!(c.services.contains(&ServiceKey::new("a", "evil")));
        assert_eq!(listeners(&st, "a", "evil").len(), 1);
        assert!(conflicts(&st).is_empty());
    }

    #[test]
    fn a_vip_goes_to_one_service_and_its_listeners_with_it() {
        let mut st = State::new(vec![src("one"), src("two")]);
        let with_vip = |ns: &str, name: &str| {
            let mut s = listening(ns, name, "127.0.0.1:9999");
            s.ports[0].listen = None;
            s.vip = Some("10.96.0.10".parse().unwrap());
            s
        };
        reset(&mut st, "two", vec![with_vip("a", "evil")]);
        reset(&mut st, "one", vec![with_vip("default", "web")]);
        let web = st.snapshot().service(&key("web")).unwrap().clone();
        assert_eq!(web.spec.vip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(
            listeners(&st, "default", "web"),
            vec!["10.96.0.10:80".parse().unwrap()]
        );
        let evil = st
            .snapshot()
            .service(&ServiceKey::new("a", "evil"))
            .unwrap();
        assert_eq!(evil.spec.vip, None, "the loser is served without the vip");
        assert_eq!(evil.spec.endpoints.len(), 1, "and with its endpoints");
        assert_eq!(evil.endpoints.len(), 1);
        assert!(evil.listeners.is_empty());
        let kinds: Vec<String> = conflicts(&st).into_iter().map(|c| c.0).collect();
        assert_eq!(kinds, vec!["vip".to_string()]);
        // The winner leaves: the other gets the vip and its listener.
        reset(&mut st, "one", vec![]);
        let evil = st
            .snapshot()
            .service(&ServiceKey::new("a", "evil"))
            .unwrap();
        assert_eq!(evil.spec.vip, Some("10.96.0.10".parse().unwrap()));
        assert_eq!(evil.listeners.len(), 1);
        assert!(conflicts(&st).is_empty());
    }

    #[test]
    fn a_hostname_stays_with_the_endpoint_that_had_it() {
        let mut st = State::new(vec![src("one")]);
        let ep = |ip: &str, h: &str| Endpoint {
            hostname: Some(h.into()),
            ..Endpoint::new(ip.parse().unwrap())
        };
        let mut s = spec("web", &[]);
        s.endpoints = vec![ep("10.0.0.2", "web-0")];
        reset(&mut st, "one", vec![s.clone()]);
        // A newcomer listed first asks for the same hostname.
        s.endpoints = vec![ep("10.0.0.1", "web-0"), ep("10.0.0.2", "web-0")];
        reset(&mut st, "one", vec![s]);
        let web = st.snapshot().service(&key("web")).unwrap();
        let names: Vec<Option<&str>> = web
            .endpoints
            .iter()
            .map(|e| e.endpoint.hostname.as_deref())
            .collect();
        assert_eq!(names, vec![None, Some("web-0")]);
        let want = (
            "hostname".into(),
            "web.default".into(),
            "web-0 (10.0.0.1)".into(),
            "10.0.0.2".into(),
        );
        assert_eq!(conflicts(&st), vec![want]);
    }

    #[test]
    fn a_conflict_is_published_once_not_per_update() {
        let mut st = State::new(vec![src("one"), src("two")]);
        reset(&mut st, "one", vec![listening("default", "web", WEB)]);
        assert!(reset(&mut st, "two", vec![listening("a", "evil", WEB)]).conflicts);
        // Another change elsewhere: the conflict list does not move.
        let c = reset(
            &mut st,
            "one",
            vec![listening("default", "web", WEB), spec("db", &["10.0.0.9"])],
        );
        assert!(!c.conflicts);
        assert_eq!(conflicts(&st).len(), 1);
    }
}

#[test]
fn a_source_is_connected_by_its_reset_and_lost_by_its_word() {
    let mut st = State::new(vec![src("docker")]);
    let status = |st: &State| st.snapshot().sources[&src("docker")].clone();
    assert!(
        !status(&st).connected,
        "not connected before its first sync"
    );
    let changed = reset(&mut st, "docker", vec![spec("web", &["10.0.0.1"])]);
    assert!(changed.sources && status(&st).connected);
    let lost = Event::SourceLost {
        source: src("docker"),
        reason: "engine gone".into(),
    };
    let changed = apply(&mut st, lost.clone());
    assert!(changed.sources && changed.any());
    assert_eq!(
        (status(&st).connected, &*status(&st).reason),
        (false, "engine gone")
    );
    // Lost twice is one change; its endpoints stay served meanwhile.
    assert!(!apply(&mut st, lost).any());
    assert_eq!(st.snapshot().services.len(), 1);
    assert!(reset(&mut st, "docker", vec![spec("web", &["10.0.0.1"])]).sources);
    assert!(status(&st).connected);
}

#[test]
fn connected_and_reported_conflicts_are_listed_and_are_no_sync() {
    let mut st = State::new(vec![src("etcd")]);
    let ev = |update| Event::Source {
        source: src("etcd"),
        update,
    };
    let c = apply(&mut st, ev(Update::Connected(false)));
    assert!(c.any() && !c.ready, "listed, but not a first sync");
    assert!(!st.snapshot().ready);
    assert_eq!(&*st.snapshot().disconnected, &[src("etcd")]);
    assert!(
        !apply(&mut st, ev(Update::Connected(false))).any(),
        "no change"
    );
    let conflict = crate::model::Conflict {
        kind: "spec",
        service: ServiceKey::new("default", "web"),
        claim: "spec of node b".into(),
        winner: "spec of node a".into(),
    };
    assert!(apply(&mut st, ev(Update::Conflicts(vec![conflict.clone()]))).conflicts);
    assert_eq!(&*st.snapshot().conflicts, &[conflict]);
    apply(&mut st, ev(Update::Reset(vec![])));
    assert!(st.snapshot().ready);
    apply(&mut st, ev(Update::Connected(true)));
    apply(&mut st, ev(Update::Conflicts(vec![])));
    assert!(st.snapshot().disconnected.is_empty() && st.snapshot().conflicts.is_empty());
}
