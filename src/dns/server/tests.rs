//! The running server: UDP and TCP on one port, bind errors at start-up,
//! fresh answers after a snapshot change, and supervision (a loop that
//! dies is reported by `join`, naming it).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use tokio_util::sync::CancellationToken;

use crate::dns::server::Faults;
use crate::dns::testkit::{a_records, cfg, demo, parse, query, start, tcp_ask, udp_ask};
use crate::dns::{DnsError, spawn};
use crate::registry::Reader;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_udp_and_tcp_on_the_same_port() {
    let run = start(cfg(), Reader::fixed(demo())).await;
    let q = query("Web.Default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    for _ in 0..20 {
        // Several SO_REUSEPORT sockets share the port; every one answers.
        let msg = parse(&udp_ask(run.addr, &q).await.expect("udp reply"));
        assert_eq!(
            a_records(&msg),
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            msg.answers[0].name.to_ascii(),
            "Web.Default.svc.cluster.local."
        );
    }
    let msg = parse(&tcp_ask(run.addr, &q).await);
    assert_eq!(a_records(&msg).len(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_error_is_reported_at_startup() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = cfg();
    c.listen = taken.local_addr().unwrap();
    let err = spawn(&c, Reader::fixed(demo()), CancellationToken::new())
        .await
        .err();
    assert!(matches!(err, Some(DnsError::Bind { .. })), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_or_removed_endpoint_leaves_answers_within_100ms() {
    use crate::model::{Endpoint, ProbeState, ServiceKey, ServiceSpec};
    use crate::registry::{HealthChange, Update};
    let shutdown = CancellationToken::new();
    let source: crate::model::SourceId = "test".into();
    let (handle, mut reader, _task) = crate::registry::spawn(
        vec![source.clone()],
        Duration::from_secs(5),
        shutdown.clone(),
    );
    let key = ServiceKey::new("default", "web");
    let mut spec = ServiceSpec::new(key.clone());
    spec.endpoints = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .map(|ip| Endpoint::new(ip.parse().unwrap()))
        .collect();
    assert!(
        handle
            .source(&source, Update::Reset(vec![spec.clone()]))
            .await
    );
    reader.ready().await.unwrap();
    let run = start(cfg(), reader).await;
    let q = query("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let answer = || async { a_records(&parse(&udp_ask(run.addr, &q).await.expect("reply"))) };
    assert_eq!(answer().await.len(), 3);
    let gone: IpAddr = "127.0.0.12".parse().unwrap();
    // Unhealthy.
    let started = Instant::now();
    let down = HealthChange::Probe(ProbeState::Down("probe failed".into()));
    assert!(handle.health(key.clone(), gone, down).await);
    loop {
        let ips = answer().await;
        if !ips.contains(&gone) {
            assert_eq!(ips.len(), 2);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "still answered after 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Removed.
    let removed: IpAddr = "127.0.0.13".parse().unwrap();
    spec.endpoints.retain(|e| e.ip != removed);
    let started = Instant::now();
    assert!(handle.source(&source, Update::Upsert(Box::new(spec))).await);
    loop {
        let ips = answer().await;
        if !ips.contains(&removed) {
            assert_eq!(ips, vec!["127.0.0.11".parse::<IpAddr>().unwrap()]);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "still answered after 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    run.stop().await;
    shutdown.cancel();
}

/// Starts a server, sets one fault, optionally pokes the server, and
/// waits (bounded) for `join` to report the dead loop: returns
/// `(task, end)` of the error.
async fn kill_one_loop(fault: fn(&Faults) -> &AtomicBool, poke_tcp: bool) -> (String, String) {
    let mut run = start(cfg(), Reader::fixed(demo())).await;
    let server = run.server.take().unwrap();
    fault(&server.shared.faults).store(true, Ordering::SeqCst);
    // The accept loop looks at its fault after its next accept.
    let _conn = if poke_tcp {
        Some(tokio::net::TcpStream::connect(run.addr).await.unwrap())
    } else {
        None
    };
    let result = tokio::time::timeout(Duration::from_secs(5), server.join())
        .await
        .expect("join reports within 5 s");
    assert!(!run.shutdown.is_cancelled(), "nobody asked for shutdown");
    match result {
        Err(DnsError::Died { task, end }) => (task, end),
        other => panic!("a dead loop is an error naming it, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_udp_thread_is_reported_by_name() {
    let (task, end) = kill_one_loop(|f| &f.udp_panic, false).await;
    assert!(task.starts_with("UDP loop beacon-dns-udp-"), "{task}");
    assert_eq!(end, "panicked: test fault: udp loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udp_thread_that_ends_before_shutdown_is_reported() {
    let (task, end) = kill_one_loop(|f| &f.udp_end, false).await;
    assert!(task.starts_with("UDP loop beacon-dns-udp-"), "{task}");
    assert_eq!(end, "ended before shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_tcp_accept_loop_is_reported_by_name() {
    let (task, end) = kill_one_loop(|f| &f.tcp_panic, true).await;
    assert_eq!(task, "TCP accept loop");
    assert_eq!(end, "panicked: test fault: tcp accept loop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_is_ok_only_after_shutdown() {
    let mut run = start(cfg(), Reader::fixed(demo())).await;
    let server = run.server.take().unwrap();
    let mut join = tokio::spawn(server.join());
    // Still serving: join has not returned.
    let q = query("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    assert!(udp_ask(run.addr, &q).await.is_some());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut join)
            .await
            .is_err(),
        "join returned while serving"
    );
    run.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), join)
        .await
        .expect("join returns after shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
}

/// The batched receive never waits to fill a batch: a query that comes
/// alone is answered at once, not after the socket's read timeout
/// (`UDP_POLL`, 100 ms), which is where a receive waiting for a full batch
/// would return. A burst of queries in one go is answered in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_query_is_answered_at_once_and_a_burst_in_full() {
    let run = start(cfg(), Reader::fixed(demo())).await;
    let q = query("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut took = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        udp_ask(run.addr, &q).await.expect("udp reply");
        took.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    took.sort();
    assert!(
        took[took.len() / 2] < crate::dns::udp::UDP_POLL / 2,
        "median {:?}: the receive waited for more datagrams",
        took[took.len() / 2]
    );
    // 40 queries sent back to back from one socket: 40 replies (more than
    // one batch of the receive, and of the send).
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut ids = std::collections::BTreeSet::new();
    for id in 0..40u16 {
        let mut m = query("web.default.svc.cluster.local.", RecordType::A, None);
        m.metadata.id = id;
        sock.send_to(&m.to_vec().unwrap(), run.addr).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    while ids.len() < 40 {
        let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .expect("every reply of the burst")
            .unwrap();
        ids.insert(parse(&buf[..n]).metadata.id);
    }
    run.stop().await;
}
