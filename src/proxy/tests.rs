//! In-process tests of the whole proxy: a real registry, real sockets on
//! 127.0.0.0/8, backends that say who they are.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

use super::*;
use crate::model::{Balance, Endpoint, Port, ProxyProtocol, ServiceSpec};
use crate::registry::{self, Handle, Update};

const T: Duration = Duration::from_secs(10);

// --- backends -------------------------------------------------------------

/// A backend that greets with `name\n`, then echoes until EOF.
struct Banner {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn banner_backend(ip: &str, name: &str) -> Banner {
    let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let greeting = format!("{name}\n").into_bytes();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                // EMFILE in the descriptor test: wait, do not die.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if s.write_all(&greeting).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Banner { addr, accepted }
}

/// A backend that hands each accepted stream to the test.
async fn scripted_backend(ip: &str) -> (SocketAddr, mpsc::Receiver<TcpStream>) {
    let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// An address where nothing listens (connection refused).
fn refusing_addr(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).unwrap();
    l.local_addr().unwrap()
}

// --- the proxy under test ---------------------------------------------------

fn service(name: &str, listen: &str, endpoints: &[SocketAddr], balance: Balance) -> ServiceSpec {
    let mut s = ServiceSpec::new(ServiceKey::new("default", name));
    s.balance = balance;
    s.ports = vec![Port {
        name: "tcp".into(),
        port: 80,
        target_port: 80,
        protocol: Protocol::Tcp,
        listen: Some(listen.parse().unwrap()),
    }];
    s.endpoints = endpoints
        .iter()
        .map(|a| Endpoint {
            port: Some(a.port()),
            ..Endpoint::new(a.ip())
        })
        .collect();
    s
}

fn weighted(mut s: ServiceSpec, weights: &[u32]) -> ServiceSpec {
    for (e, w) in s.endpoints.iter_mut().zip(weights) {
        e.weight = *w;
    }
    s
}

struct Harness {
    handle: Handle,
    reader: Reader,
    proxy: Option<Proxy>,
    shutdown: CancellationToken,
    outcomes: mpsc::Receiver<ConnectOutcome>,
}

fn proxy_config(max_connections: usize) -> ProxyConfig {
    ProxyConfig {
        enabled: true,
        max_connections,
        defaults: Default::default(),
        drain_timeout: None,
    }
}

/// A registry (ready once every one of `sources` has synced; none: at
/// once) and a proxy reading it.
fn harness_with(max_connections: usize, mode: copy::Mode, sources: &[&str]) -> Harness {
    let shutdown = CancellationToken::new();
    let (handle, reader, _task) = registry::spawn(
        sources.iter().map(|s| (*s).into()).collect(),
        Duration::from_secs(600),
        shutdown.clone(),
    );
    let (tx, outcomes) = mpsc::channel(1024);
    let proxy = spawn_with(
        &proxy_config(max_connections),
        reader.clone(),
        tx,
        shutdown.clone(),
        Options { copy_mode: mode },
    );
    Harness {
        handle,
        reader,
        proxy: Some(proxy),
        shutdown,
        outcomes,
    }
}

fn harness() -> Harness {
    harness_with(10_000, copy::Mode::Auto, &[])
}

impl Harness {
    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().unwrap()
    }

    /// Publishes `specs` as source `source`'s whole truth and waits until
    /// the proxy has applied the resulting snapshot.
    async fn reset_from(&self, source: &str, specs: Vec<ServiceSpec>) {
        let before = self.reader.current().version;
        assert!(
            self.handle
                .source(&source.into(), Update::Reset(specs))
                .await
        );
        let deadline = Instant::now() + T;
        loop {
            let v = self.reader.current().version;
            if v > before && self.proxy().applied_version() >= v {
                return;
            }
            assert!(Instant::now() < deadline, "proxy never applied the update");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn set(&self, specs: Vec<ServiceSpec>) {
        self.reset_from("test", specs).await;
    }

    /// The bound address of a configured listener, once it is open.
    async fn addr(&self, configured: &str) -> SocketAddr {
        let configured: SocketAddr = configured.parse().unwrap();
        let deadline = Instant::now() + T;
        loop {
            if let Some(a) = self.proxy().bound_addr(configured) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "listener {configured} never opened"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

// --- clients ----------------------------------------------------------------

/// Reads one `\n`-terminated line; None on EOF or reset before it.
async fn read_line(s: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(T, s.read(&mut byte))
            .await
            .expect("read timed out")
        {
            Ok(0) | Err(_) => return None,
            Ok(_) if byte[0] == b'\n' => return Some(String::from_utf8(line).unwrap()),
            Ok(_) => line.push(byte[0]),
        }
    }
}

/// Connects and reads the backend's name (None: the proxy closed it).
async fn greet(addr: SocketAddr) -> (TcpStream, Option<String>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let name = read_line(&mut s).await;
    (s, name)
}

async fn greet_from(client_ip: &str, addr: SocketAddr) -> Option<String> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((client_ip.parse::<IpAddr>().unwrap(), 0).into())
        .unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    read_line(&mut s).await
}

fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n.to_string()).or_default() += 1;
    }
    m
}

/// True when the peer closed (EOF or reset) within the timeout.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

async fn three_backends() -> (Banner, Banner, Banner) {
    (
        banner_backend("127.0.0.11", "a").await,
        banner_backend("127.0.0.12", "b").await,
        banner_backend("127.0.0.13", "c").await,
    )
}

// --- tests ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_exactly() {
    let h = harness();
    let (a, b, c) = three_backends().await;
    let spec = service(
        "rr",
        "127.0.1.1:0",
        &[a.addr, b.addr, c.addr],
        Balance::RoundRobin,
    );
    h.set(vec![weighted(spec, &[2, 1, 1])]).await;
    let addr = h.addr("127.0.1.1:0").await;
    let mut names = Vec::new();
    for _ in 0..400 {
        names.push(greet(addr).await.1.expect("proxied"));
    }
    let t = tally(names.iter().map(String::as_str));
    assert_eq!((t["a"], t["b"], t["c"]), (200, 100, 100), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_and_p2c_spread_open_connections() {
    for (policy, slack) in [(Balance::LeastConn, 0), (Balance::P2c, 30)] {
        let h = harness();
        let (a, b, c) = three_backends().await;
        h.set(vec![service(
            "lc",
            "127.0.1.2:0",
            &[a.addr, b.addr, c.addr],
            policy,
        )])
        .await;
        let addr = h.addr("127.0.1.2:0").await;
        let mut open = Vec::new();
        let mut names = Vec::new();
        for _ in 0..300 {
            let (s, name) = greet(addr).await;
            names.push(name.expect("proxied"));
            open.push(s); // stays open: the backend keeps counting as loaded
        }
        let t = tally(names.iter().map(String::as_str));
        for k in ["a", "b", "c"] {
            assert!(t[k].abs_diff(100) <= slack, "{policy:?}: {t:?}");
        }
        // Close every connection to `a`: new ones go (mostly) to it now.
        let mut kept = Vec::new();
        for (s, name) in open.into_iter().zip(&names) {
            if name != "a" {
                kept.push(s);
            }
        }
        let deadline = Instant::now() + T;
        while h.proxy().active_connections() > kept.len() {
            assert!(
                Instant::now() < deadline,
                "closed connections still counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut to_a = 0;
        for _ in 0..50 {
            let (s, name) = greet(addr).await;
            to_a += usize::from(name.as_deref() == Some("a"));
            kept.push(s);
        }
        let want = if policy == Balance::LeastConn { 50 } else { 25 };
        assert!(
            to_a >= want,
            "{policy:?}: only {to_a} of 50 went to the idle endpoint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_and_maglev_sticks_to_client_ip() {
    let h = harness();
    let (a, b, c) = three_backends().await;
    let eps = [a.addr, b.addr, c.addr];
    h.set(vec![
        service("rnd", "127.0.1.3:0", &eps, Balance::Random),
        service("mg", "127.0.1.4:0", &eps, Balance::Maglev),
    ])
    .await;
    let rnd = h.addr("127.0.1.3:0").await;
    let mut names = Vec::new();
    for _ in 0..300 {
        names.push(greet(rnd).await.1.expect("proxied"));
    }
    let t = tally(names.iter().map(String::as_str));
    for k in ["a", "b", "c"] {
        assert!((60..=140).contains(&t[k]), "random: {t:?}");
    }

    let mg = h.addr("127.0.1.4:0").await;
    let mut first: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for i in 1..=100 {
            let ip = format!("127.2.0.{i}");
            let name = greet_from(&ip, mg).await.expect("proxied");
            if round == 0 {
                first.insert(ip, name);
            } else {
                assert_eq!(first[&ip], name, "maglev moved client {ip}");
            }
        }
    }
    let t = tally(first.values().map(String::as_str));
    for k in ["a", "b", "c"] {
        assert!(t.get(k).copied().unwrap_or(0) >= 15, "maglev spread: {t:?}");
    }
}

/// 64 MiB each way through the proxy (an echo backend), byte-identical.
async fn bulk_through_proxy(mode: copy::Mode, listen: &str) {
    let h = harness_with(10_000, mode, &[]);
    let backend = banner_backend("127.0.0.21", "echo").await;
    h.set(vec![service(
        "bulk",
        listen,
        &[backend.addr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr(listen).await;
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
        // Both directions of this connection went through splice.
        assert!(copy::spliced_bytes() - before >= 2 * (64 << 20));
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
    h.set(vec![service(
        "hc",
        "127.0.1.7:0",
        &[baddr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("127.0.1.7:0").await;

    // Client closes first; the server still answers afterwards.
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut server = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    client.write_all(b"question").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"question");
    server.write_all(b"late answer").await.unwrap();
    server.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(T, client.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"late answer");

    // Server closes first; the client still sends afterwards.
    let mut client = TcpStream::connect(addr).await.unwrap();
    let mut server = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    server.write_all(b"banner").await.unwrap();
    server.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, client.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"banner");
    client.write_all(b"upload after FIN").await.unwrap();
    client.shutdown().await.unwrap();
    let mut up = Vec::new();
    tokio::time::timeout(T, server.read_to_end(&mut up))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(up, b"upload after FIN");
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
    let mut h = harness();
    let (baddr, mut accepted) = scripted_backend("127.0.0.43").await;
    let spec = service("flap", "127.0.1.26:0", &[baddr], Balance::RoundRobin);
    h.set(vec![spec]).await;
    let addr = h.addr("127.0.1.26:0").await;
    // Connects succeed (the backend accepts): nothing to report.
    let _c = TcpStream::connect(addr).await.unwrap();
    let _s = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(h.outcomes.try_recv().is_err());
    // Mark a failure streak on the endpoint, then connect again.
    let key = (ServiceKey::new("default", "flap"), baddr);
    h.proxy()
        .shared
        .endpoints
        .get(&key)
        .unwrap()
        .load
        .failures
        .store(3, Ordering::Relaxed);
    let _c2 = TcpStream::connect(addr).await.unwrap();
    let o = tokio::time::timeout(T, h.outcomes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((o.ip, o.success), (baddr.ip(), true));
    assert_eq!(
        h.proxy()
            .shared
            .endpoints
            .get(&key)
            .unwrap()
            .load
            .failures
            .load(Ordering::Relaxed),
        0
    );
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
    assert!(closed_within(&mut first, Duration::from_secs(2)).await);
    // The endpoint that stayed keeps its connection.
    second.write_all(b"ping\n").await.unwrap();
    assert_eq!(read_line(&mut second).await.as_deref(), Some("ping"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_at_once_and_recover() {
    // Global cap.
    let h = harness_with(2, copy::Mode::Auto, &[]);
    let a = banner_backend("127.0.0.51", "a").await;
    h.set(vec![service(
        "cap",
        "127.0.1.11:0",
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("127.0.1.11:0").await;
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
    assert!(closed_within(&mut quiet, Duration::from_secs(2)).await);
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert!(closed_within(&mut busy, Duration::from_secs(2)).await);
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
async fn listeners_follow_the_snapshot_and_bind_failures_stay_local() {
    let h = harness();
    let a = banner_backend("127.0.0.81", "a").await;
    let taken = std::net::TcpListener::bind("127.0.1.16:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    h.set(vec![
        service("blocked", &taken_addr, &[a.addr], Balance::RoundRobin),
        service("open", "127.0.1.17:0", &[a.addr], Balance::RoundRobin),
    ])
    .await;
    let open = h.addr("127.0.1.17:0").await;
    assert_eq!(greet(open).await.1.as_deref(), Some("a"));
    assert!(h.proxy().bound_addr(taken_addr.parse().unwrap()).is_none());
    // Once the address frees up, the retry binds it.
    drop(taken);
    let blocked = tokio::time::timeout(BIND_RETRY * 3, h.addr(&taken_addr))
        .await
        .expect("bind retried");
    assert_eq!(greet(blocked).await.1.as_deref(), Some("a"));
    // A service that goes away takes its listener with it.
    h.set(vec![service(
        "blocked",
        &taken_addr,
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    assert!(
        h.proxy()
            .bound_addr("127.0.1.17:0".parse().unwrap())
            .is_none()
    );
    let deadline = Instant::now() + T;
    while TcpStream::connect(open).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_listener_serves_the_service_port() {
    let h = harness();
    let a = banner_backend("127.0.0.82", "a").await;
    let port = refusing_addr("127.0.1.18").port();
    let mut spec = service("vip", "127.0.1.19:0", &[a.addr], Balance::RoundRobin);
    spec.vip = Some("127.0.1.18".parse().unwrap());
    spec.ports[0].port = port;
    spec.ports[0].listen = None;
    h.set(vec![spec]).await;
    let vip = format!("127.0.1.18:{port}");
    assert_eq!(h.addr(&vip).await.to_string(), vip);
    assert_eq!(greet(vip.parse().unwrap()).await.1.as_deref(), Some("a"));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_listeners_then_live_connections_after_grace() {
    let mut h = harness();
    let a = banner_backend("127.0.0.95", "a").await;
    h.set(vec![service(
        "drain",
        "127.0.1.21:0",
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("127.0.1.21:0").await;
    let (mut live, _) = greet(addr).await;
    h.shutdown.cancel();
    let proxy = h.proxy.take().unwrap();
    let grace = Duration::from_millis(500);
    let started = Instant::now();
    let drain = tokio::spawn(proxy.drain(grace));
    // New connections are refused soon; the live one still streams.
    let deadline = Instant::now() + T;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    live.write_all(b"during grace\n").await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("during grace"));
    assert!(closed_within(&mut live, Duration::from_secs(3)).await);
    tokio::time::timeout(T, drain).await.unwrap().unwrap();
    let took = started.elapsed();
    assert!(
        took >= grace && took < grace + Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_returns_early_when_connections_finish() {
    let mut h = harness();
    let a = banner_backend("127.0.0.96", "a").await;
    h.set(vec![service(
        "drain2",
        "127.0.1.22:0",
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("127.0.1.22:0").await;
    let (live, _) = greet(addr).await;
    let proxy = h.proxy.take().unwrap();
    let started = Instant::now();
    let drain = tokio::spawn(proxy.drain(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(live);
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("drain ends when the last connection does")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

// --- accept backoff -----------------------------------------------------------

#[test]
fn accept_backoff_doubles_caps_and_skips_per_connection_errors() {
    let mut b = listener::AcceptBackoff::default();
    let emfile = io::Error::from_raw_os_error(libc::EMFILE);
    let waits: Vec<Duration> = (0..10).map(|_| b.on_error(&emfile).unwrap()).collect();
    assert_eq!(waits[0], listener::BACKOFF_MIN);
    assert_eq!(waits[1], listener::BACKOFF_MIN * 2);
    assert_eq!(waits[9], listener::BACKOFF_MAX);
    assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(
        b.on_error(&io::Error::from(io::ErrorKind::ConnectionAborted)),
        None
    );
    assert!(b.on_success());
    assert!(!b.on_success());
    assert_eq!(b.on_error(&emfile), Some(listener::BACKOFF_MIN));
}

/// Fails the first `fail` accepts with EMFILE, then accepts for real.
struct Exhausted {
    inner: TcpListener,
    fail: AtomicU32,
    calls: Arc<AtomicU32>,
}

impl listener::Acceptor for Exhausted {
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        self.inner.accept().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_loop_backs_off_on_emfile_and_recovers() {
    let h = harness();
    let a = banner_backend("127.0.0.97", "a").await;
    h.set(vec![service(
        "emfile",
        "127.0.1.23:0",
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    // A route as the reconcile loop builds it, on a listener we control.
    let snap = h.reader.current();
    let state = snap.services.values().next().unwrap().clone();
    let shared = h.proxy().shared.clone();
    let rec = Reconciler {
        shared: shared.clone(),
        listeners: HashMap::new(),
        served: BTreeMap::new(),
        failing: HashSet::new(),
        stop: CancellationToken::new(),
    };
    let route = Arc::new(rec.route(&state, 0));
    let inner = TcpListener::bind("127.0.1.24:0").await.unwrap();
    let addr = inner.local_addr().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let acceptor = Exhausted {
        inner,
        fail: AtomicU32::new(7),
        calls: calls.clone(),
    };
    let (_tx, rx) = watch::channel(route);
    let stop = CancellationToken::new();
    let task = tokio::spawn(listener::accept_loop(acceptor, rx, shared, stop.clone()));
    // A client is waiting in the backlog all along; it is served once
    // accept works again, after 5+10+20+40+80+160+320 ms of pauses.
    let started = Instant::now();
    let (_s, name) = greet(addr).await;
    assert_eq!(name.as_deref(), Some("a"));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(600), "no backoff: {took:?}");
    // 7 failures + 1 success (+ the pending next accept): no spinning.
    assert!(calls.load(Ordering::SeqCst) <= 9, "{calls:?}");
    stop.cancel();
    tokio::time::timeout(T, task).await.unwrap().unwrap();
}

/// The child half of `emfile_recovers_in_a_child_process`: a proxy in a
/// process with a low descriptor limit. Prints its address, uses up every
/// free descriptor, frees them when the parent says so, ends when stdin
/// closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by emfile_recovers_in_a_child_process under `ulimit -n 64`"]
async fn emfile_child() {
    let h = harness();
    // The parent runs the backend; standalone, bring one.
    let backend = match std::env::var("BEACON_TEST_BACKEND") {
        Ok(addr) => addr.parse().unwrap(),
        Err(_) => banner_backend("127.0.0.98", "a").await.addr,
    };
    h.set(vec![service(
        "fd",
        "127.0.1.25:0",
        &[backend],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("127.0.1.25:0").await;
    println!("LISTEN {addr}");
    tokio::task::spawn_blocking(|| {
        let mut hog = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hog.push(f);
            assert!(hog.len() < 100_000, "no descriptor limit in force");
        }
        println!("FULL {}", hog.len());
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line); // "release"
        drop(hog);
        let _ = std::io::stdin().read_line(&mut line); // EOF: done
    })
    .await
    .unwrap();
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Reads a banner line with a timeout; None if closed or silent.
fn std_banner(s: &mut std::net::TcpStream, wait: Duration) -> Option<String> {
    use std::io::Read;
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        _ => None,
    }
}

/// A backend in this process: greets, then holds each connection until
/// the proxy forwards the client's FIN. Runs until `stop` (at most 2 min).
fn std_backend(
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let backend = std::net::TcpListener::bind("127.0.0.99:0").unwrap();
    let addr = backend.local_addr().unwrap();
    backend.set_nonblocking(true).unwrap();
    let thread = std::thread::spawn(move || {
        let mut held: Vec<std::net::TcpStream> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            match backend.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(b"a\n");
                    s.set_nonblocking(true).unwrap();
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
            held.retain_mut(|s| {
                let mut buf = [0u8; 64];
                matches!(s.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            });
        }
    });
    (addr, thread)
}

/// Real descriptor exhaustion: a proxy process at `ulimit -n 64` with
/// every descriptor in use gets EMFILE from accept(2) while clients wait.
/// It must not spin, and must serve the waiting clients once descriptors
/// are free again.
#[cfg(target_os = "linux")]
#[test]
fn emfile_recovers_in_a_child_process() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (backend_addr, backend_thread) = std_backend(stop.clone());
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
        .arg(exe)
        .args([
            "--exact",
            "proxy::tests::emfile_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BEACON_TEST_BACKEND", backend_addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The harness may print "test … ... " before a line on the same line.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find("LISTEN ") {
                let _ = tx.send(line[at + 7..].trim().to_string());
            } else if line.contains("FULL ") {
                let _ = tx.send(String::new());
            }
        }
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let wait = Duration::from_secs(60);
        let addr: SocketAddr = rx
            .recv_timeout(wait)
            .expect("child listening")
            .parse()
            .unwrap();
        assert_eq!(rx.recv_timeout(wait).expect("child out of descriptors"), "");
        // Clients wait in the backlog while accept(2) says EMFILE.
        let mut waiting: Vec<std::net::TcpStream> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(1));
        let spent = cpu_ticks(pid) - before;
        assert!(
            spent < 30,
            "proxy spins while out of descriptors: {spent} ticks in 1 s"
        );
        assert_eq!(std_banner(&mut waiting[0], Duration::from_millis(50)), None);
        // Free the descriptors: every waiting client is served.
        stdin.write_all(b"release\n").unwrap();
        stdin.flush().unwrap();
        for s in &mut waiting {
            assert_eq!(std_banner(s, Duration::from_secs(10)).as_deref(), Some("a"));
        }
    }));
    drop(stdin); // the child test returns
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::SeqCst);
    backend_thread.join().unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(status.expect("child exits").success());
}
