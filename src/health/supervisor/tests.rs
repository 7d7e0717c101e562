use std::io::ErrorKind;

use super::*;
use crate::model::{Endpoint, Port, ProbeKind, Protocol, ServiceSpec};
use crate::registry::{Event, State, Update, apply};

const REFUSED: ProbeError = ProbeError::Io(ErrorKind::ConnectionRefused);

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

fn ip(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

fn spec(name: &str, ips: &[u8]) -> ServiceSpec {
    let mut s = ServiceSpec::new(key(name));
    s.ports = vec![Port {
        name: "http".into(),
        port: 80,
        target_port: 9000,
        protocol: Protocol::Tcp,
        listen: None,
    }];
    s.endpoints = ips.iter().map(|n| Endpoint::new(ip(*n))).collect();
    s.health.interval = Duration::from_secs(1);
    s.health.fast_interval = Duration::from_millis(200);
    s
}

/// The registry's pure state, to build real snapshots and apply reports.
struct World {
    state: State,
}

impl World {
    fn new() -> Self {
        Self {
            state: State::new(vec![]),
        }
    }

    fn set(&mut self, specs: Vec<ServiceSpec>) -> Snapshot {
        apply(
            &mut self.state,
            Event::Source {
                source: "test".into(),
                update: Update::Reset(specs),
            },
        );
        self.state.snapshot().clone()
    }

    fn report(&mut self, reports: &[Report]) -> Snapshot {
        for r in reports {
            apply(
                &mut self.state,
                Event::Health {
                    service: r.service.clone(),
                    ip: r.ip,
                    change: r.change.clone(),
                },
            );
        }
        self.state.snapshot().clone()
    }
}

fn launched(sup: &mut Supervisor, now: Instant) -> Vec<Launch> {
    let mut launches = Vec::new();
    let mut fx = Effects::default();
    sup.due(now, &mut launches, &mut fx);
    assert!(fx.reports.is_empty());
    assert_eq!(sup.stats(), sup.recount());
    launches
}

#[test]
fn probes_every_endpoint_with_a_probe_and_a_port() {
    let mut world = World::new();
    let mut none = spec("none", &[1]);
    none.health.probe = ProbeKind::None;
    let mut portless = spec("portless", &[1, 2]);
    portless.ports.clear();
    portless.endpoints[0].port = Some(7000);
    let snap = world.set(vec![spec("web", &[1, 2, 3]), none, portless]);

    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(1));
    let now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    assert!(fx.reports.is_empty() && fx.aborts.is_empty());
    assert_eq!(sup.stats().targets, 4);

    // A small batch is probed right away: within a tenth of the interval.
    let mut l = launched(&mut sup, now + Duration::from_millis(100));
    l.sort_by_key(|l| (l.service.clone(), l.ip));
    let addrs: Vec<String> = l
        .iter()
        .map(|l| format!("{} {}", l.service, l.addr))
        .collect();
    assert_eq!(
        addrs,
        [
            "portless.default 127.0.0.1:7000",
            "web.default 127.0.0.1:9000",
            "web.default 127.0.0.2:9000",
            "web.default 127.0.0.3:9000",
        ]
    );
    assert_eq!(sup.stats().in_flight, 4);
    assert!(launched(&mut sup, now + Duration::from_secs(5)).is_empty());
}

#[test]
fn results_drive_hysteresis_and_the_fast_interval() {
    let mut world = World::new();
    let snap = world.set(vec![spec("web", &[1])]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(2));
    let mut now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    let probe = |sup: &mut Supervisor, now: &mut Instant, result| {
        let deadline = sup.next_deadline().expect("a probe is scheduled");
        let gap = deadline.saturating_duration_since(*now);
        *now = deadline;
        let l = launched(sup, *now);
        assert_eq!(l.len(), 1);
        let mut fx = Effects::default();
        sup.on_result(&key("web"), ip(1), l[0].id, result, *now, &mut fx);
        (gap, fx.reports)
    };
    let (_, r) = probe(&mut sup, &mut now, Ok(()));
    assert_eq!(r[0].change, HealthChange::Probe(ProbeState::Up));
    let (gap, r) = probe(&mut sup, &mut now, Err(REFUSED));
    assert!(r.is_empty());
    assert!(gap >= Duration::from_millis(800) && gap <= Duration::from_millis(1000));
    // Between states: the fast interval, 80-100% of it.
    let (gap, r) = probe(&mut sup, &mut now, Err(REFUSED));
    assert!(r.is_empty());
    assert!(
        gap >= Duration::from_millis(160) && gap <= Duration::from_millis(200),
        "{gap:?}"
    );
    let (gap, r) = probe(&mut sup, &mut now, Err(REFUSED));
    assert!(gap <= Duration::from_millis(200));
    assert_eq!(
        r[0].change,
        HealthChange::Probe(ProbeState::Down(
            "probe failed: connection refused 3/3".into()
        ))
    );
    let (gap, _) = probe(&mut sup, &mut now, Ok(()));
    assert!(
        gap >= Duration::from_millis(800),
        "steady down: normal interval"
    );
}

/// A probe that could not start for want of local resources (EMFILE and
/// friends) is no result: it neither counts toward `fall` nor breaks a
/// streak, never changes the verdict, and the next probe comes at the
/// normal interval.
#[test]
fn local_errors_are_not_results() {
    const EMFILE: ProbeError = ProbeError::Local(libc::EMFILE);
    let mut world = World::new();
    let snap = world.set(vec![spec("web", &[1])]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(9));
    let mut now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    let probe = |sup: &mut Supervisor, now: &mut Instant, result| {
        let deadline = sup.next_deadline().expect("a probe is scheduled");
        let gap = deadline.saturating_duration_since(*now);
        *now = deadline;
        let l = launched(sup, *now);
        assert_eq!(l.len(), 1);
        let mut fx = Effects::default();
        sup.on_result(&key("web"), ip(1), l[0].id, result, *now, &mut fx);
        assert_eq!(sup.stats(), sup.recount());
        (gap, fx.reports)
    };
    let (_, r) = probe(&mut sup, &mut now, Ok(()));
    assert_eq!(r[0].change, HealthChange::Probe(ProbeState::Up));
    // Twenty local errors in a row: fall is 3, nothing changes, and the
    // probes keep the normal interval (not the fast one).
    for _ in 0..20 {
        let (gap, r) = probe(&mut sup, &mut now, Err(EMFILE));
        assert!(r.is_empty(), "a local error changed the verdict: {r:?}");
        assert!(gap >= Duration::from_millis(400), "{gap:?}");
    }
    // They do not break a failure streak either: two real failures, a
    // local error, a third failure: down after exactly three failures.
    assert!(probe(&mut sup, &mut now, Err(REFUSED)).1.is_empty());
    assert!(probe(&mut sup, &mut now, Err(REFUSED)).1.is_empty());
    assert!(probe(&mut sup, &mut now, Err(EMFILE)).1.is_empty());
    let (_, r) = probe(&mut sup, &mut now, Err(REFUSED));
    assert_eq!(
        r[0].change,
        HealthChange::Probe(ProbeState::Down(
            "probe failed: connection refused 3/3".into()
        ))
    );
    // Nor a success streak: down stays down until `rise` real successes.
    assert!(probe(&mut sup, &mut now, Ok(())).1.is_empty());
    assert!(probe(&mut sup, &mut now, Err(EMFILE)).1.is_empty());
    let (_, r) = probe(&mut sup, &mut now, Ok(()));
    assert_eq!(r[0].change, HealthChange::Probe(ProbeState::Up));
}

#[test]
fn removed_endpoints_and_services_lose_their_probes() {
    let mut world = World::new();
    let snap = world.set(vec![spec("web", &[1, 2]), spec("db", &[1])]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(3));
    let now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    let l = launched(&mut sup, now + Duration::from_secs(1));
    let id_of = |svc: &str, n: u8| {
        l.iter()
            .find(|l| l.service == key(svc) && l.ip == ip(n))
            .unwrap()
            .id
    };
    let snap = world.set(vec![spec("web", &[1])]);
    sup.reconcile(&snap, now, &mut fx);
    let mut aborted = fx.aborts.clone();
    aborted.sort();
    let mut expected = vec![id_of("web", 2), id_of("db", 1)];
    expected.sort();
    assert_eq!(aborted, expected);
    assert_eq!(sup.stats().targets, 1);
    assert_eq!(sup.stats(), sup.recount());

    // A late result of a stopped probe changes nothing.
    let mut fx = Effects::default();
    sup.on_result(&key("db"), ip(1), id_of("db", 1), Ok(()), now, &mut fx);
    assert!(fx.reports.is_empty());

    let snap = world.set(vec![]);
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    assert_eq!(fx.aborts, vec![id_of("web", 1)]);
    assert_eq!(sup.stats(), Stats::default());
    assert_eq!(sup.recount(), Stats::default());
}

#[test]
fn a_changed_health_spec_restarts_the_probe_and_keeps_the_verdict() {
    let mut world = World::new();
    let snap = world.set(vec![spec("web", &[1])]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(4));
    let now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    let l = launched(&mut sup, now + Duration::from_secs(1));
    sup.on_result(&key("web"), ip(1), l[0].id, Ok(()), now, &mut fx);
    let snap = world.report(&std::mem::take(&mut fx.reports));
    sup.reconcile(&snap, now, &mut fx);
    assert!(fx.reports.is_empty(), "the snapshot shows our belief");

    let mut changed = spec("web", &[1]);
    changed.health.probe = ProbeKind::Http {
        path: "/healthz".into(),
        host: None,
    };
    let snap = world.set(vec![changed]);
    sup.reconcile(&snap, now, &mut fx);
    assert!(fx.reports.is_empty(), "the verdict survives a restart");
    let l2 = launched(&mut sup, now + Duration::from_secs(1));
    assert_eq!(l2.len(), 1);
    assert_ne!(l2[0].id, l[0].id);
    assert!(matches!(*l2[0].check, Check::Http { .. }));

    // Changing the spec while a probe is in flight aborts that probe.
    let mut again = spec("web", &[1]);
    again.health.timeout = Duration::from_millis(100);
    let snap = world.set(vec![again]);
    sup.reconcile(&snap, now, &mut fx);
    assert_eq!(fx.aborts, vec![l2[0].id]);

    // Switching the probe off clears the verdict in the registry.
    let mut off = spec("web", &[1]);
    off.health.probe = ProbeKind::None;
    let snap = world.set(vec![off]);
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    assert_eq!(sup.stats().targets, 0);
    assert_eq!(
        fx.reports[0].change,
        HealthChange::Probe(ProbeState::Unknown)
    );
}

#[test]
fn beliefs_are_checked_on_start_and_spec_changes_only() {
    let mut world = World::new();
    world.set(vec![spec("web", &[1, 2])]);
    // Stale health from an earlier run of the loop.
    let snap = world.report(&[
        Report {
            service: key("web"),
            ip: ip(1),
            change: HealthChange::Probe(ProbeState::Down("probe failed: x 3/3".into())),
        },
        Report {
            service: key("web"),
            ip: ip(2),
            change: HealthChange::Ejected(Some("ejected: 5 connect failures".into())),
        },
    ]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(5));
    let now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    // A probe started on a Down endpoint keeps Down; the ejection this
    // loop does not know of is lifted.
    assert_eq!(
        fx.reports,
        vec![Report {
            service: key("web"),
            ip: ip(2),
            change: HealthChange::Ejected(None),
        }]
    );
    world.report(&std::mem::take(&mut fx.reports));

    let l = launched(&mut sup, now + Duration::from_secs(1));
    for l in &l {
        sup.on_result(&l.service, l.ip, l.id, Ok(()), now, &mut fx);
    }
    // ip 2 was Unknown (start healthy): one success reports Up; ip 1 needs
    // two (rise).
    assert_eq!(fx.reports.len(), 1);
    let lost = fx.reports.pop().unwrap();
    assert_eq!(lost.ip, ip(2));
    // A snapshot where only health changed, without that report applied:
    // nothing is re-sent (it may still be queued).
    let unrelated = world.report(&[Report {
        service: key("web"),
        ip: ip(1),
        change: HealthChange::Probe(ProbeState::Down("probe failed: y 3/3".into())),
    }]);
    sup.reconcile(&unrelated, now, &mut fx);
    assert!(fx.reports.is_empty());
    // A spec change re-checks: the missing report and ip 1's verdict are
    // sent again.
    let mut changed = spec("web", &[1, 2]);
    changed.health.timeout = Duration::from_millis(50);
    let snap = world.set(vec![changed]);
    sup.reconcile(&snap, now, &mut fx);
    assert!(fx.reports.contains(&lost), "{:?}", fx.reports);
    assert!(fx.reports.iter().any(|r| r.ip == ip(1)), "{:?}", fx.reports);
}

#[test]
fn connect_failures_eject_until_expiry_or_a_passing_probe() {
    let mut world = World::new();
    let mut s = spec("web", &[1, 2, 3, 4]);
    s.health.probe = ProbeKind::None;
    s.health.eject_after = 2;
    s.health.eject_base = Duration::from_secs(10);
    let snap = world.set(vec![s]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(6));
    let now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    assert_eq!(sup.next_deadline(), None, "no probes, no timers");
    let fail = |n: u8| ConnectOutcome {
        service: key("web"),
        ip: ip(n),
        success: false,
    };
    sup.on_outcome(&fail(1), now, &mut fx);
    assert!(fx.reports.is_empty());
    sup.on_outcome(&fail(1), now, &mut fx);
    assert_eq!(
        fx.reports[0].change,
        HealthChange::Ejected(Some("ejected: 2 connect failures".into()))
    );
    // Unknown endpoints and services are ignored.
    let mut ignored = Effects::default();
    for _ in 0..5 {
        sup.on_outcome(&fail(9), now, &mut ignored);
    }
    assert!(ignored.reports.is_empty());

    let snap = world.report(&std::mem::take(&mut fx.reports));
    assert!(
        !snap
            .service(&key("web"))
            .unwrap()
            .endpoint(ip(1))
            .unwrap()
            .healthy
    );
    assert_eq!(sup.stats().ejected, 1);
    assert_eq!(sup.next_deadline(), Some(now + Duration::from_secs(10)));
    let mut launches = Vec::new();
    sup.due(now + Duration::from_secs(9), &mut launches, &mut fx);
    assert!(fx.reports.is_empty());
    sup.due(now + Duration::from_secs(10), &mut launches, &mut fx);
    assert_eq!(fx.reports[0].change, HealthChange::Ejected(None));
    assert!(launches.is_empty());
    assert_eq!(sup.stats().ejected, 0);
    assert_eq!(sup.stats(), sup.recount());
}

#[test]
fn a_passing_probe_readmits() {
    let mut world = World::new();
    let mut s = spec("web", &[1, 2]);
    s.health.eject_after = 1;
    let snap = world.set(vec![s]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(7));
    let now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    let outcome = ConnectOutcome {
        service: key("web"),
        ip: ip(1),
        success: false,
    };
    sup.on_outcome(&outcome, now, &mut fx);
    assert_eq!(sup.stats().ejected, 1);
    let l = launched(&mut sup, now + Duration::from_secs(1));
    let l = l.iter().find(|l| l.ip == ip(1)).unwrap();
    let mut fx = Effects::default();
    sup.on_result(&l.service, l.ip, l.id, Ok(()), now, &mut fx);
    assert!(fx.reports.contains(&Report {
        service: key("web"),
        ip: ip(1),
        change: HealthChange::Ejected(None)
    }));
    assert_eq!(sup.stats().ejected, 0);
}

#[test]
fn first_probes_of_a_big_batch_are_spread_over_the_interval() {
    let mut world = World::new();
    let specs: Vec<ServiceSpec> = (0..50)
        .map(|i| spec(&format!("s{i}"), &(1..=200).collect::<Vec<u8>>()))
        .collect();
    let snap = world.set(specs);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(8));
    let now = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, now, &mut fx);
    assert_eq!(sup.stats().targets, 10_000);
    let mut per_tenth = Vec::new();
    for tenth in 1..=10 {
        per_tenth.push(launched(&mut sup, now + Duration::from_millis(100 * tenth)).len());
    }
    assert_eq!(per_tenth.iter().sum::<usize>(), 10_000);
    assert!(
        per_tenth.iter().all(|n| (800..=1200).contains(n)),
        "{per_tenth:?}"
    );
}

#[test]
fn checks_and_ejections_are_counted() {
    use metrics_exporter_prometheus::PrometheusBuilder;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let mut world = World::new();
    let mut s = spec("web", &[1, 2]);
    s.health.eject_after = 1;
    let snap = world.set(vec![s]);
    // The supervisor exists before the recorder is installed (as in app.rs).
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(9));
    metrics::with_local_recorder(&recorder, || {
        let now = Instant::now();
        let mut fx = Effects::default();
        sup.reconcile(&snap, now, &mut fx);
        let l = launched(&mut sup, now + Duration::from_secs(1));
        sup.on_result(&l[0].service, l[0].ip, l[0].id, Ok(()), now, &mut fx);
        sup.on_result(&l[1].service, l[1].ip, l[1].id, Err(REFUSED), now, &mut fx);
        let outcome = ConnectOutcome {
            service: key("web"),
            ip: ip(1),
            success: false,
        };
        sup.on_outcome(&outcome, now, &mut fx);
    });
    let text = handle.render();
    for line in [
        "beacon_health_checks_total{result=\"success\"} 1",
        "beacon_health_checks_total{result=\"failure\"} 1",
        "beacon_endpoint_ejections_total{service=\"web.default\"} 1",
    ] {
        assert!(text.contains(line), "missing {line} in {text}");
    }
}

#[test]
fn the_interval_runs_from_launch_so_slow_probes_keep_the_rate() {
    let mut world = World::new();
    let snap = world.set(vec![spec("web", &[1])]);
    let mut sup = Supervisor::with_rng(fastrand::Rng::with_seed(10));
    let start = Instant::now();
    let mut fx = Effects::default();
    sup.reconcile(&snap, start, &mut fx);
    let at = sup.next_deadline().unwrap();
    let l = launched(&mut sup, at);
    // The probe takes 400 ms: the next one is still about 1 s after launch.
    sup.on_result(
        &l[0].service,
        l[0].ip,
        l[0].id,
        Ok(()),
        at + Duration::from_millis(400),
        &mut fx,
    );
    let next = sup.next_deadline().unwrap() - at;
    assert!(
        next >= Duration::from_millis(800) && next <= Duration::from_millis(1000),
        "{next:?}"
    );
    // A probe slower than the interval: the next one half an interval
    // after it ended, not back to back.
    let at = sup.next_deadline().unwrap();
    let l = launched(&mut sup, at);
    let late = at + Duration::from_millis(1500);
    sup.on_result(&l[0].service, l[0].ip, l[0].id, Ok(()), late, &mut fx);
    let gap = sup.next_deadline().unwrap() - late;
    assert!(
        gap >= Duration::from_millis(400) && gap <= Duration::from_millis(500),
        "{gap:?}"
    );
}
