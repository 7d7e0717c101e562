//! One connection's life (`conn.rs`, and `copy.rs` through the proxy):
//! bytes and half-close, connect retry and passive health reports,
//! endpoint removal, caps and readiness, the idle timeout, PROXY protocol.

use sha2::{Digest, Sha256};

use super::*;
use crate::model::ProxyProtocol;
use crate::proxy::conn::idle_expired;
use crate::proxy::copy::Activity;

/// 64 MiB each way through the proxy (an echo backend), byte-identical.
async fn bulk_through_proxy(mode: copy::Mode, listen: &str) {
    let h = harness_with(10_000, mode, &[]);
    let backend = banner_backend("127.0.0.21", "echo").await;
    let addr = h.serve_one("bulk", listen, backend.addr).await;
    let (s, name) = greet(addr).await;
    assert_eq!(name.as_deref(), Some("echo"));
    let len = 64 << 20;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let want = Sha256::digest(&data);
    let (mut r, mut w) = s.into_split();
    let send = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(len);
    tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut got))
        .await
        .expect("echo finished")
        .unwrap();
    send.await.unwrap();
    assert_eq!(got.len(), len);
    assert_eq!(Sha256::digest(&got), want, "bytes changed on the way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_through_splice() {
    let before = copy::spliced_bytes();
    bulk_through_proxy(copy::Mode::Auto, "127.0.1.5:0").await;
    if cfg!(target_os = "linux") {
        // Both directions of this connection went through splice (all but
        // their first small reads).
        assert!(copy::spliced_bytes() - before >= 2 * (64 << 20) - (1 << 20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_through_fallback() {
    let before = copy::copied_bytes();
    bulk_through_proxy(copy::Mode::Userspace, "127.0.1.6:0").await;
    assert!(copy::copied_bytes() - before >= 2 * (64 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_ways_through_proxy() {
    let h = harness();
    let (baddr, mut accepted) = scripted_backend("127.0.0.31").await;
    let addr = h.serve_one("hc", "127.0.1.7:0", baddr).await;

    // Client closes first; the server still answers afterwards.
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut server = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    send_then_fin(&mut client, &mut server, b"question").await;
    send_then_fin(&mut server, &mut client, b"late answer").await;

    // Server closes first; the client still sends afterwards.
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut server = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    send_then_fin(&mut server, &mut client, b"banner").await;
    send_then_fin(&mut client, &mut server, b"upload after FIN").await;
}

/// `from` sends `msg` and its FIN; `to` reads exactly `msg`, then EOF.
async fn send_then_fin(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8]) {
    from.write_all(msg).await.unwrap();
    from.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, to.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_backend_costs_the_client_nothing() {
    let mut h = harness();
    let dead = refusing_addr("127.0.0.41");
    let live = banner_backend("127.0.0.42", "live").await;
    h.set(vec![service(
        "retry",
        "127.0.1.8:0",
        &[dead, live.addr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("127.0.1.8:0").await;
    for _ in 0..20 {
        assert_eq!(greet(addr).await.1.as_deref(), Some("live"));
    }
    // Half the picks hit the refusing endpoint first: each failure is
    // reported; successes only when they end a failure streak (never here).
    let mut failures = 0;
    while let Ok(o) = h.outcomes.try_recv() {
        assert!(!o.success, "a success with no failure before it: {o:?}");
        assert_eq!(o.ip, dead.ip());
        failures += 1;
    }
    assert_eq!(failures, 10);
    assert_eq!(live.accepted.load(Ordering::SeqCst), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_after_failures_is_reported() {
    let h = harness();
    let (baddr, mut accepted) = scripted_backend("127.0.0.43").await;
    let spec = service("flap", "127.0.1.26:0", &[baddr], Balance::RoundRobin);
    h.set(vec![spec]).await;
    // The endpoint entries are the reconciler's own: drive one by hand.
    let (mut rec, shared, mut outcomes) = driven();
    assert!(!rec.apply(&h.reader.current()), "listener bound");
    let addr = *shared.bound.get(&"127.0.1.26:0".parse().unwrap()).unwrap();
    // Connects succeed (the backend accepts): nothing to report.
    let _c = TcpStream::connect(addr).await.unwrap();
    let _s = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(outcomes.try_recv().is_err());
    // Mark a failure streak on the endpoint, then connect again.
    let key = ServiceKey::new("default", "flap");
    let load = rec.endpoint(&key, baddr).unwrap().load.clone();
    load.failures.store(3, Ordering::Relaxed);
    let _c2 = TcpStream::connect(addr).await.unwrap();
    let o = tokio::time::timeout(T, outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((o.ip, o.success), (baddr.ip(), true));
    let load = rec.endpoint(&key, baddr).unwrap().load.clone();
    assert_eq!(load.failures.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_endpoint_gets_no_new_connections_but_open_one_streams() {
    let h = harness();
    let (a, b, _) = three_backends().await;
    let spec = service("rm", "127.0.1.9:0", &[a.addr, b.addr], Balance::RoundRobin);
    h.set(vec![spec.clone()]).await;
    let addr = h.addr("127.0.1.9:0").await;
    let mut on_a = None;
    for _ in 0..4 {
        let (s, name) = greet(addr).await;
        if name.as_deref() == Some("a") {
            on_a = Some(s);
        }
    }
    let mut on_a = on_a.expect("round robin reached a");
    let before = a.accepted.load(Ordering::SeqCst);
    h.set(vec![service(
        "rm",
        "127.0.1.9:0",
        &[b.addr],
        Balance::RoundRobin,
    )])
    .await;
    for _ in 0..20 {
        assert_eq!(greet(addr).await.1.as_deref(), Some("b"));
    }
    assert_eq!(a.accepted.load(Ordering::SeqCst), before);
    // The open connection to a keeps streaming (echo).
    for i in 0..10 {
        let msg = format!("still here {i}\n");
        on_a.write_all(msg.as_bytes()).await.unwrap();
        assert_eq!(read_line(&mut on_a).await.unwrap(), msg.trim_end());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_on_removal_closes_open_connections() {
    let h = harness();
    let (a, b, _) = three_backends().await;
    let mut spec = service(
        "cor",
        "127.0.1.10:0",
        &[a.addr, b.addr],
        Balance::RoundRobin,
    );
    spec.proxy.close_on_removal = true;
    h.set(vec![spec.clone()]).await;
    let addr = h.addr("127.0.1.10:0").await;
    let (c1, n1) = greet(addr).await;
    let (c2, n2) = greet(addr).await;
    // Round robin starts anywhere in its cycle; one went to each.
    let (mut first, mut second) = match (n1.as_deref(), n2.as_deref()) {
        (Some("a"), Some("b")) => (c1, c2),
        (Some("b"), Some("a")) => (c2, c1),
        other => panic!("round robin sent {other:?}"),
    };
    spec.endpoints.remove(0);
    h.set(vec![spec]).await;
    // Closed, and with a reset: a forced close never looks complete.
    assert!(reset_within(&mut first, Duration::from_secs(2)).await);
    // The endpoint that stayed keeps its connection.
    second.write_all(b"ping\n").await.unwrap();
    assert_eq!(read_line(&mut second).await.as_deref(), Some("ping"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_at_once_and_recover() {
    // Global cap.
    let h = harness_with(2, copy::Mode::Auto, &[]);
    let a = banner_backend("127.0.0.51", "a").await;
    let addr = h.serve_one("cap", "127.0.1.11:0", a.addr).await;
    let (c1, n1) = greet(addr).await;
    let (_c2, n2) = greet(addr).await;
    assert!(n1.is_some() && n2.is_some());
    let started = Instant::now();
    assert_eq!(
        greet(addr).await.1,
        None,
        "third connection must be refused"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    drop(c1);
    let deadline = Instant::now() + T;
    while h.proxy().active_connections() > 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(greet(addr).await.1.as_deref(), Some("a"));

    // Per-service cap, with a second service unaffected.
    let h = harness();
    let mut capped = service("one", "127.0.1.12:0", &[a.addr], Balance::RoundRobin);
    capped.proxy.max_connections = Some(1);
    let free = service("other", "127.0.1.13:0", &[a.addr], Balance::RoundRobin);
    h.set(vec![capped, free]).await;
    let one = h.addr("127.0.1.12:0").await;
    let other = h.addr("127.0.1.13:0").await;
    let (_held, n) = greet(one).await;
    assert!(n.is_some());
    assert_eq!(
        greet(one).await.1,
        None,
        "second connection to `one` refused"
    );
    assert!(greet(other).await.1.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_quiet_connections_only() {
    let h = harness();
    let a = banner_backend("127.0.0.61", "a").await;
    let mut spec = service("idle", "127.0.1.14:0", &[a.addr], Balance::RoundRobin);
    spec.proxy.idle_timeout = Duration::from_millis(400);
    h.set(vec![spec]).await;
    let addr = h.addr("127.0.1.14:0").await;
    let (mut quiet, _) = greet(addr).await;
    let (mut busy, _) = greet(addr).await;
    let started = Instant::now();
    // The busy one talks every 100 ms for 1 s and stays open.
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let msg = format!("tick {i}\n");
        busy.write_all(msg.as_bytes()).await.unwrap();
        assert_eq!(read_line(&mut busy).await.unwrap(), msg.trim_end());
    }
    // Closed with a reset: an idle timeout is a forced close.
    assert!(reset_within(&mut quiet, Duration::from_secs(2)).await);
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert!(reset_within(&mut busy, Duration::from_secs(2)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_until_ready() {
    let h = harness_with(10_000, copy::Mode::Auto, &["x", "y"]);
    let a = banner_backend("127.0.0.71", "a").await;
    let spec = service("rdy", "127.0.1.15:0", &[a.addr], Balance::RoundRobin);
    h.reset_from("x", vec![spec]).await;
    assert!(!h.reader.current().ready);
    let addr = h.addr("127.0.1.15:0").await;
    assert_eq!(greet(addr).await.1, None);
    assert_eq!(a.accepted.load(Ordering::SeqCst), 0);
    h.reset_from("y", vec![]).await;
    assert_eq!(greet(addr).await.1.as_deref(), Some("a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_tell_the_client_address() {
    for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
        let h = harness();
        let (baddr, mut accepted) = scripted_backend("127.0.0.91").await;
        let mut spec = service("pp", "127.0.1.20:0", &[baddr], Balance::RoundRobin);
        spec.proxy.proxy_protocol = Some(version);
        h.set(vec![spec]).await;
        let addr = h.addr("127.0.1.20:0").await;
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.3.3:0".parse().unwrap()).unwrap();
        let mut client = sock.connect(addr).await.unwrap();
        let client_addr = client.local_addr().unwrap();
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut server = tokio::time::timeout(T, accepted.recv())
            .await
            .unwrap()
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(T, server.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got.ends_with(b"hello"));
        let header = &got[..got.len() - 5];
        match version {
            ProxyProtocol::V1 => {
                let want = format!(
                    "PROXY TCP4 {} {} {} {}\r\n",
                    client_addr.ip(),
                    addr.ip(),
                    client_addr.port(),
                    addr.port()
                );
                assert_eq!(std::str::from_utf8(header).unwrap(), want);
            }
            ProxyProtocol::V2 => {
                let parsed = ppp::v2::Header::try_from(header).expect("valid v2 header");
                assert_eq!(parsed.command, ppp::v2::Command::Proxy);
                match parsed.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        assert_eq!(
                            (a.source_address, a.source_port),
                            ("127.0.3.3".parse().unwrap(), client_addr.port())
                        );
                        assert_eq!(
                            SocketAddr::new(a.destination_address.into(), a.destination_port),
                            addr
                        );
                    }
                    other => panic!("unexpected addresses {other:?}"),
                }
            }
        }
    }
}

/// The idle deadline itself, on paused time: it moves with activity and
/// fires once nothing moved for the whole timeout.
#[tokio::test(start_paused = true)]
async fn idle_deadline_moves_with_activity() {
    let activity = Activity::default();
    activity.touch();
    let idle = Duration::from_millis(400);
    let started = tokio::time::Instant::now();
    let expired = idle_expired(&activity, idle);
    tokio::pin!(expired);
    tokio::select! {
        _ = &mut expired => panic!("expired while active"),
        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    activity.touch();
    tokio::select! {
        _ = &mut expired => panic!("expired 400 ms after the start, not after the activity"),
        _ = tokio::time::sleep(Duration::from_millis(350)) => {}
    }
    expired.await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_millis(705),
        "{took:?}"
    );
}
