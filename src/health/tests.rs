//! The health loop in-process: a real registry task, real backends on
//! loopback listeners, real probes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::{Endpoint, ProbeKind, ServiceSpec, Snapshot};
use crate::registry::{self, Update};

const INTERVAL: Duration = Duration::from_millis(100);
/// Room for scheduling on a loaded machine (2 cores shared with builds): the
/// probe counts (`3/3`) say the hysteresis held, not the clock.
const SLACK: Duration = Duration::from_millis(400);

fn key() -> ServiceKey {
    ServiceKey::new("default", "web")
}

/// A service whose endpoints are the given backends (port per endpoint).
fn service(backends: &[SocketAddr], probe: ProbeKind) -> ServiceSpec {
    let mut s = ServiceSpec::new(key());
    s.endpoints = backends
        .iter()
        .map(|a| Endpoint {
            port: Some(a.port()),
            ..Endpoint::new(a.ip())
        })
        .collect();
    s.health.probe = probe;
    s.health.interval = INTERVAL;
    s.health.fast_interval = INTERVAL;
    s.health.timeout = Duration::from_millis(200);
    s.health.rise = 2;
    s.health.fall = 3;
    s
}

struct Rig {
    handle: registry::Handle,
    reader: registry::Reader,
    outcomes: mpsc::Sender<ConnectOutcome>,
    stats: watch::Receiver<Stats>,
    shutdown: CancellationToken,
    health: JoinHandle<Result<(), super::HealthError>>,
}

impl Rig {
    async fn start(spec: ServiceSpec) -> Self {
        let shutdown = CancellationToken::new();
        let (handle, reader, _task) =
            registry::spawn(vec![], Duration::from_secs(60), shutdown.clone());
        let (outcomes, rx) = mpsc::channel(64);
        let (health, stats) =
            spawn_with_stats(reader.clone(), handle.clone(), rx, shutdown.clone());
        let rig = Self {
            handle,
            reader,
            outcomes,
            stats,
            shutdown,
            health,
        };
        rig.set(vec![spec]).await;
        rig
    }

    async fn set(&self, specs: Vec<ServiceSpec>) {
        assert!(
            self.handle
                .source(&"test".into(), Update::Reset(specs))
                .await
        );
    }

    /// Waits (at most `limit`) until the snapshot satisfies `pred`; returns
    /// how long that took.
    async fn wait_for(&mut self, limit: Duration, pred: impl Fn(&Snapshot) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if pred(&self.reader.latest()) {
                return start.elapsed();
            }
            let left = limit.saturating_sub(start.elapsed());
            if tokio::time::timeout(left, self.reader.changed())
                .await
                .is_err()
            {
                panic!(
                    "condition not met within {limit:?}; snapshot: {:#?}",
                    self.reader.current().service(&key())
                );
            }
        }
    }

    async fn wait_stats(&mut self, limit: Duration, want: Stats) {
        let waited = tokio::time::timeout(limit, self.stats.wait_for(|s| *s == want))
            .await
            .is_ok();
        assert!(
            waited,
            "stats never became {want:?}; last {:?}",
            *self.stats.borrow()
        );
    }
}

fn healthy(snap: &Snapshot, ip: IpAddr) -> Option<bool> {
    Some(snap.service(&key())?.endpoint(ip)?.healthy)
}

fn reason(snap: &Snapshot, ip: IpAddr) -> String {
    snap.service(&key())
        .and_then(|s| s.endpoint(ip))
        .map_or(String::new(), |e| e.reason.to_string())
}

fn all_up(snap: &Snapshot) -> bool {
    snap.service(&key()).is_some_and(|s| {
        s.endpoints
            .iter()
            .all(|e| e.health.probe == crate::model::ProbeState::Up)
    })
}

/// A TCP backend that accepts and drops connections until aborted.
async fn tcp_backend(addr: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    (addr, task)
}

/// An HTTP backend answering every request with the status in `status`.
async fn http_backend(ip: &str, status: Arc<AtomicU16>) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let status = status.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn tcp_probe_follows_a_backend_down_and_up() {
    let mut backends = Vec::new();
    for ip in ["127.0.0.11", "127.0.0.12", "127.0.0.13"] {
        backends.push(tcp_backend(SocketAddr::new(ip.parse().unwrap(), 0)).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.0).collect();
    let mut rig = Rig::start(service(&addrs, ProbeKind::Tcp)).await;
    rig.wait_for(Duration::from_secs(2), all_up).await;

    let victim = addrs[1];
    backends[1].1.abort();
    // Wait for the listener to be closed for sure before timing.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fall = rig
        .wait_for(3 * INTERVAL + SLACK, |s| {
            healthy(s, victim.ip()) == Some(false)
        })
        .await;
    let snap = rig.reader.current();
    assert_eq!(
        reason(&snap, victim.ip()),
        "probe failed: connection refused 3/3"
    );
    assert_eq!(healthy(&snap, addrs[0].ip()), Some(true));
    assert_eq!(healthy(&snap, addrs[2].ip()), Some(true));

    let _back = tcp_backend(victim).await;
    let rise = rig
        .wait_for(2 * INTERVAL + SLACK, |s| {
            healthy(s, victim.ip()) == Some(true)
        })
        .await;
    eprintln!("tcp: down after {fall:?}, up after {rise:?}");
    rig.shutdown.cancel();
    rig.health
        .await
        .unwrap()
        .expect("the health loop ends Ok on shutdown");
}

#[tokio::test]
async fn http_probe_follows_the_status() {
    let statuses: Vec<Arc<AtomicU16>> = (0..3).map(|_| Arc::new(AtomicU16::new(200))).collect();
    let mut addrs = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        addrs.push(http_backend(&format!("127.0.0.{}", 21 + i), status.clone()).await);
    }
    let probe = ProbeKind::Http {
        path: "/healthz".into(),
        host: Some("web.test".into()),
    };
    let mut rig = Rig::start(service(&addrs, probe)).await;
    rig.wait_for(Duration::from_secs(2), all_up).await;

    let victim = addrs[2].ip();
    statuses[2].store(500, Ordering::Relaxed);
    let fall = rig
        .wait_for(3 * INTERVAL + SLACK, |s| healthy(s, victim) == Some(false))
        .await;
    assert_eq!(
        reason(&rig.reader.current(), victim),
        "probe failed: http status 500 3/3"
    );
    statuses[2].store(301, Ordering::Relaxed);
    let rise = rig
        .wait_for(2 * INTERVAL + SLACK, |s| healthy(s, victim) == Some(true))
        .await;
    eprintln!("http: down after {fall:?}, up after {rise:?}");
    assert_eq!(healthy(&rig.reader.current(), addrs[0].ip()), Some(true));
    rig.shutdown.cancel();
}

/// No probe, so no I/O: the loop runs on paused time and the ejection's
/// expiry is checked to the millisecond.
#[tokio::test(start_paused = true)]
async fn passive_ejection_without_probes_and_its_cap() {
    let addrs: Vec<SocketAddr> = (31..35)
        .map(|n| SocketAddr::from(([127, 0, 0, n], 9)))
        .collect();
    let mut spec = service(&addrs, ProbeKind::None);
    spec.health.eject_after = 3;
    spec.health.eject_base = Duration::from_millis(400);
    spec.health.eject_max_percent = 50;
    let mut rig = Rig::start(spec).await;
    rig.wait_for(Duration::from_secs(1), |s| {
        healthy(s, addrs[0].ip()) == Some(true)
    })
    .await;
    let fail = |ip: IpAddr, success: bool| ConnectOutcome {
        service: key(),
        ip,
        success,
    };

    // Two failures, a success (resets the count), two failures: still in.
    let ip0 = addrs[0].ip();
    for ok in [false, false, true, false, false] {
        rig.outcomes.send(fail(ip0, ok)).await.unwrap();
    }
    rig.wait_stats(Duration::from_secs(1), Stats::default())
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(healthy(&rig.reader.current(), ip0), Some(true));

    let ejected_at = Instant::now();
    rig.outcomes.send(fail(ip0, false)).await.unwrap();
    rig.wait_for(Duration::from_secs(1), |s| healthy(s, ip0) == Some(false))
        .await;
    assert_eq!(
        reason(&rig.reader.current(), ip0),
        "ejected: 3 connect failures"
    );

    // 4 endpoints at 50%: a second one is ejected, a third is not.
    for ip in [addrs[1].ip(), addrs[2].ip()] {
        for _ in 0..3 {
            rig.outcomes.send(fail(ip, false)).await.unwrap();
        }
    }
    let (ip1, ip2) = (addrs[1].ip(), addrs[2].ip());
    rig.wait_for(Duration::from_secs(1), |s| healthy(s, ip1) == Some(false))
        .await;
    rig.wait_stats(
        Duration::from_secs(1),
        Stats {
            ejected: 2,
            ..Stats::default()
        },
    )
    .await;
    assert_eq!(healthy(&rig.reader.current(), ip2), Some(true));

    // Ejection ends on its own after eject_base.
    let readmitted = rig
        .wait_for(Duration::from_secs(2), |s| healthy(s, ip0) == Some(true))
        .await;
    let after = ejected_at.elapsed();
    assert!(
        after >= Duration::from_millis(400) && after <= Duration::from_millis(410),
        "re-admitted at {after:?}, not after eject_base = 400 ms ({readmitted:?})"
    );
    rig.shutdown.cancel();
}

#[tokio::test]
async fn probes_come_and_go_with_endpoints() {
    // A backend that accepts and never answers: every HTTP probe stays in
    // flight until its timeout, so the test sees the probe tasks.
    let listener = TcpListener::bind("127.0.0.41:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut others = Vec::new();
    for n in 42..44 {
        others.push(TcpListener::bind(format!("127.0.0.{n}:{port}")).await);
    }
    let listeners: Vec<TcpListener> = std::iter::once(Ok(listener))
        .chain(others)
        .collect::<Result<_, _>>()
        .expect("bind the same port on 127.0.0.42 and .43");
    for l in listeners {
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
    }
    let addrs: Vec<SocketAddr> = (41..44)
        .map(|n| SocketAddr::from(([127, 0, 0, n], port)))
        .collect();
    let probe = ProbeKind::Http {
        path: "/".into(),
        host: None,
    };
    let mut spec = service(&addrs, probe.clone());
    spec.health.timeout = Duration::from_secs(30);
    let mut rig = Rig::start(spec.clone()).await;
    let all = Stats {
        targets: 3,
        in_flight: 3,
        ejected: 0,
    };
    rig.wait_stats(Duration::from_secs(2), all).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_with_three = metrics.num_alive_tasks();

    let mut one = spec.clone();
    one.endpoints.truncate(1);
    rig.set(vec![one]).await;
    let one_left = Stats {
        targets: 1,
        in_flight: 1,
        ejected: 0,
    };
    rig.wait_stats(Duration::from_secs(1), one_left).await;
    let deadline = Instant::now() + Duration::from_secs(1);
    while metrics.num_alive_tasks() != tasks_with_three - 2 {
        assert!(
            Instant::now() < deadline,
            "probe tasks of removed endpoints still alive: {} of {tasks_with_three}",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Back to three, then the whole service goes.
    rig.set(vec![spec]).await;
    rig.wait_stats(Duration::from_secs(2), all).await;
    rig.set(vec![]).await;
    rig.wait_stats(Duration::from_secs(1), Stats::default())
        .await;

    // Shutdown ends the loop and every probe.
    rig.set(vec![service(&addrs, probe)]).await;
    rig.wait_stats(Duration::from_secs(2), all).await;
    let before = metrics.num_alive_tasks();
    rig.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(1), rig.health)
        .await
        .expect("health loop ends on shutdown")
        .unwrap()
        .expect("the health loop ends Ok on shutdown");
    let deadline = Instant::now() + Duration::from_secs(1);
    // The loop and its three probes are gone (the registry ends too).
    while metrics.num_alive_tasks() > before - 4 {
        assert!(Instant::now() < deadline, "tasks left after shutdown");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Probes in flight are capped: with two slots and five endpoints that
/// never answer, two probes run and the others wait (waiting is no
/// failure: the timeout starts when a probe runs).
#[tokio::test]
async fn probes_in_flight_are_capped() {
    // Five endpoints on one port, each on its own loopback IP, accepting
    // and never answering.
    let first = TcpListener::bind("127.0.0.45:0").await.unwrap();
    let port = first.local_addr().unwrap().port();
    let mut listeners = vec![first];
    for n in 46..50 {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, n);
        listeners.push(TcpListener::bind((ip, port)).await.unwrap());
    }
    let accepted = Arc::new(AtomicU16::new(0));
    let mut addrs = Vec::new();
    for l in listeners {
        addrs.push(l.local_addr().unwrap());
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
    }
    let probe = ProbeKind::Http {
        path: "/".into(),
        host: None,
    };
    let mut spec = service(&addrs, probe);
    spec.health.timeout = Duration::from_secs(30);
    let shutdown = CancellationToken::new();
    let (handle, reader, _task) =
        registry::spawn(vec![], Duration::from_secs(60), shutdown.clone());
    let (_outcomes, rx) = mpsc::channel(64);
    let (_health, mut stats) = spawn_with_stats_and(
        reader,
        handle.clone(),
        rx,
        shutdown.clone(),
        Options { max_in_flight: 2 },
    );
    assert!(
        handle
            .source(&"test".into(), Update::Reset(vec![spec]))
            .await
    );
    // All five launched (in flight for the core), two connected.
    tokio::time::timeout(Duration::from_secs(2), stats.wait_for(|s| s.in_flight == 5))
        .await
        .expect("five probes launched")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "only two probes may run at once"
    );
    shutdown.cancel();
}

#[test]
fn probe_slots_follow_the_descriptor_limit() {
    assert_eq!(probe_slots(64), 8);
    assert_eq!(probe_slots(16), 4);
    assert_eq!(probe_slots(1 << 20), 8192);
}
