//! Slow start, the fin timeouts and the pause between connect retries
//! through the whole proxy.

use super::*;

/// Connections opened back to back for `window`: the share `name` got.
async fn share_of(addr: SocketAddr, name: &str, window: Duration) -> (f64, usize) {
    let until = Instant::now() + window;
    let (mut hit, mut total) = (0, 0);
    while Instant::now() < until {
        let (_s, got) = greet(addr).await;
        total += 1;
        if got.as_deref() == Some(name) {
            hit += 1;
        }
    }
    (f64::from(hit) / total as f64, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_endpoint_ramps_up_over_the_window_and_again_after_a_restart() {
    let h = harness();
    let a = banner_backend("127.0.3.21", "a").await;
    let b = banner_backend("127.0.3.22", "b").await;
    let listen = "127.0.3.20:0";
    let spec = |eps: &[SocketAddr]| {
        let mut s = service("ramp", listen, eps, Balance::RoundRobin);
        s.proxy.slow_start = Some(Duration::from_millis(2400));
        s
    };
    h.set(vec![spec(&[a.addr])]).await;
    let addr = h.addr(listen).await;
    let key = ServiceKey::new("default", "ramp");
    for round in 0..2 {
        // b appears (the second time: comes back after it was gone).
        h.set(vec![spec(&[a.addr, b.addr])]).await;
        let live = h.proxy().live();
        let early = live.share(&key, b.addr.ip());
        assert!(early < 0.2, "round {round}: b starts at {early}");
        let mut shares = Vec::new();
        for _ in 0..4 {
            shares.push(share_of(addr, "b", Duration::from_millis(600)).await);
        }
        let (after, n) = share_of(addr, "b", Duration::from_millis(600)).await;
        // Expected about 0.11, 0.27, 0.38, 0.47, then 0.5.
        let only: Vec<f64> = shares.iter().map(|s| s.0).collect();
        let counts: Vec<usize> = shares.iter().map(|s| s.1).collect();
        assert!(only[0] < 0.22, "round {round}: {only:?} {counts:?}");
        assert!(
            only.windows(2).all(|w| w[0] < w[1] + 0.03) && only[3] > only[0] + 0.15,
            "round {round}: shares grow: {only:?} {counts:?}"
        );
        assert!(
            (0.4..=0.6).contains(&after),
            "round {round}: full weight {after} of {n}"
        );
        assert_eq!(live.share(&key, b.addr.ip()), 1.0);
        // b leaves.
        h.set(vec![spec(&[a.addr])]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_slow_start_a_new_endpoint_gets_its_share_at_once() {
    let h = harness();
    let a = banner_backend("127.0.3.31", "a").await;
    let b = banner_backend("127.0.3.32", "b").await;
    let listen = "127.0.3.30:0";
    h.set(vec![service(
        "flat",
        listen,
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr(listen).await;
    h.set(vec![service(
        "flat",
        listen,
        &[a.addr, b.addr],
        Balance::RoundRobin,
    )])
    .await;
    let (share, n) = share_of(addr, "b", Duration::from_millis(300)).await;
    assert!((0.4..=0.6).contains(&share), "{share} of {n}");
}

/// A proxied pair to a scripted backend under `spec`'s proxy keys:
/// (client, the backend's side).
async fn pair(
    h: &Harness,
    name: &str,
    listen: &str,
    edit: impl Fn(&mut ServiceSpec),
) -> (TcpStream, TcpStream) {
    let (backend, mut accepted) = scripted_backend("127.0.3.41").await;
    let mut s = service(name, listen, &[backend], Balance::RoundRobin);
    edit(&mut s);
    h.set(vec![s]).await;
    let client = TcpStream::connect(h.addr(listen).await).await.unwrap();
    let server = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    (client, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_fin_timeout_resets_a_quiet_half_closed_pair() {
    let h = harness();
    let fin = Duration::from_millis(300);
    let (mut client, mut server) = pair(&h, "cfin", "127.0.3.40:0", |s| {
        s.proxy.client_fin_timeout = Some(fin);
    })
    .await;
    client.write_all(b"x").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"x", "the byte and then the FIN");
    let started = Instant::now();
    // The endpoint still sends, which keeps the pair alive...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        server.write_all(b"y").await.unwrap();
    }
    let mut buf = [0u8; 3];
    client.read_exact(&mut buf).await.unwrap();
    assert!(
        started.elapsed() > fin,
        "alive past the fin timeout while bytes move"
    );
    // ...then quiet: both sides reset after the fin timeout.
    let quiet = Instant::now();
    assert!(reset_within(&mut client, Duration::from_secs(5)).await);
    assert!(
        quiet.elapsed() >= fin - Duration::from_millis(50),
        "{:?}",
        quiet.elapsed()
    );
    // The endpoint (which has read its EOF already) finds a reset when it writes.
    let mut write_failed = false;
    for _ in 0..50 {
        if server.write_all(b"z").await.is_err() {
            write_failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(write_failed, "the endpoint's side was reset too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_fin_timeout_resets_and_half_close_waits_without_one() {
    let h = harness();
    let fin = Duration::from_millis(300);
    let (mut client, mut server) = pair(&h, "sfin", "127.0.3.42:0", |s| {
        s.proxy.server_fin_timeout = Some(fin);
        // Only the other side's timeout: it must not apply here.
        s.proxy.client_fin_timeout = Some(Duration::from_millis(10));
    })
    .await;
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    let started = Instant::now();
    assert!(reset_within(&mut server, Duration::from_secs(5)).await);
    let took = started.elapsed();
    assert!(
        took >= fin - Duration::from_millis(50) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // No fin timeout: a half-closed pair stays open (up to the idle timeout).
    let (mut client, mut server) = pair(&h, "nofin", "127.0.3.43:0", |_| {}).await;
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert!(!reset_within(&mut server, Duration::from_millis(800)).await);
    client.write_all(b"late").await.unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"late");
}

#[test]
fn retry_backoff_doubles_from_5ms_to_at_most_100ms() {
    use crate::proxy::conn::retry_backoff;
    let ms = |a| retry_backoff(a).as_millis();
    assert_eq!(
        (ms(1), ms(2), ms(3), ms(5), ms(6), ms(60)),
        (5, 10, 20, 80, 100, 100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_retries_pause_between_attempts() {
    let h = harness();
    let dead: Vec<SocketAddr> = ["127.0.3.61", "127.0.3.62", "127.0.3.63"]
        .iter()
        .map(|ip| refusing_addr(ip))
        .collect();
    h.set(vec![service(
        "pause",
        "127.0.3.60:0",
        &dead,
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("127.0.3.60:0").await;
    let started = Instant::now();
    let (_s, name) = greet(addr).await;
    assert_eq!(name, None, "every endpoint refuses");
    // Three attempts: two pauses of 5 and 10 ms between them.
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(15), "{took:?}");
}
