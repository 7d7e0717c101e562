//! Health end to end: real backends, real DNS queries (dig), real proxied
//! connections. DNS and the proxy must agree with the probes.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::*;

const NAME: &str = "web.default.svc.cluster.local";

struct Setup {
    beacon: Beacon,
    backends: Vec<BackendProcess>,
    proxy: SocketAddr,
    _lock: std::sync::MutexGuard<'static, ()>,
}

fn services(port: u16, proxy: SocketAddr, health: &str) -> String {
    let mut s = format!(
        "[[service]]\nname = \"web\"\n[[service.port]]\nname = \"http\"\nport = 80\ntarget_port = {port}\nlisten = \"{proxy}\"\n"
    );
    for i in 1..=3 {
        s += &format!("[[service.endpoint]]\nip = \"127.0.0.5{i}\"\nhostname = \"web-{i}\"\n");
    }
    s + health
}

fn setup(health: &str) -> Setup {
    let lock = timing_lock();
    let port = free_port();
    let proxy = free_addr();
    let backends = (1..=3)
        .map(|i| {
            BackendProcess::start(
                &format!("web-{i}"),
                format!("127.0.0.5{i}:{port}").parse().unwrap(),
            )
        })
        .collect();
    let beacon = Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services(port, proxy, health)),
        ..Options::default()
    });
    beacon.wait_ready();
    let ips: BTreeSet<String> = dig(beacon.dns, NAME, "A", false).into_iter().collect();
    assert_eq!(ips, all3(), "dig sees the three endpoints");
    Setup {
        beacon,
        backends,
        proxy,
        _lock: lock,
    }
}

/// The A answers, by a direct UDP query (polled every 20 ms; a dig process
/// per poll would blur the timing). `dig` itself is checked once per test.
fn dns_ips(s: &Setup) -> BTreeSet<String> {
    query_a(s.beacon.dns, NAME)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn all3() -> BTreeSet<String> {
    (1..=3).map(|i| format!("127.0.0.5{i}")).collect()
}

/// Names reached by `n` proxied requests; panics on any failed request.
fn reached(s: &Setup, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| fetch_name(s.proxy).unwrap_or_else(|e| panic!("a proxied request failed: {e}")))
        .collect()
}

const TCP_HEALTH: &str = "[service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\n";

#[test]
fn a_stopped_backend_leaves_dns_and_the_proxy_and_comes_back() {
    let mut s = setup(TCP_HEALTH);
    eventually(Duration::from_secs(3), "all three in DNS", || {
        (dns_ips(&s) == all3()).then_some(())
    });
    assert_eq!(reached(&s, 30).len(), 3);

    s.backends[1].stop();
    let stopped = Instant::now();
    // The bound: fall × interval + 100 ms, plus 100 ms for polling
    // with a real dig process.
    let bound = Duration::from_millis(2 * 200 + 100 + 100);
    eventually(bound, "stopped backend gone from DNS", || {
        (!dns_ips(&s).contains("127.0.0.52")).then_some(())
    });
    let gone_after = stopped.elapsed();
    let names = reached(&s, 30);
    assert!(
        !names.contains("web-2"),
        "no new connection to the stopped backend: {names:?}"
    );
    eprintln!("gone from DNS after {gone_after:?}");

    s.backends[1] = BackendProcess::start("web-2", s.backends[1].addr);
    let started = Instant::now();
    // rise × interval + 100 ms, plus polling.
    let bound = Duration::from_millis(2 * 200 + 100 + 100);
    eventually(bound, "restarted backend back in DNS", || {
        (dns_ips(&s) == all3()).then_some(())
    });
    eprintln!("back in DNS after {:?}", started.elapsed());
    assert!(reached(&s, 30).contains("web-2"));
}

#[test]
fn an_http_probe_failing_with_500_removes_the_endpoint() {
    let s = setup(
        "[service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\n",
    );
    eventually(Duration::from_secs(3), "all three in DNS", || {
        (dns_ips(&s) == all3()).then_some(())
    });
    assert_eq!(http_get(s.backends[2].addr, "/fail").unwrap().0, 200);
    eventually(
        Duration::from_millis(2 * 200 + 100 + 200),
        "500-answering backend gone",
        || (!dns_ips(&s).contains("127.0.0.53")).then_some(()),
    );
    assert!(!reached(&s, 30).contains("web-3"));
    let json = s.beacon.services_json();
    let ep = &json["services"][0]["endpoints"][2];
    assert_eq!(ep["healthy"], false);
    assert!(
        ep["reason"].as_str().unwrap().starts_with("probe failed"),
        "{ep}"
    );
    assert_eq!(http_get(s.backends[2].addr, "/recover").unwrap().0, 200);
    eventually(
        Duration::from_millis(2 * 200 + 100 + 200),
        "recovered backend back",
        || (dns_ips(&s) == all3()).then_some(()),
    );
}

/// Reads a request head, answers, closes (reading the whole head first:
/// closing with unread bytes would send a reset).
fn answer_http(mut c: TcpStream) {
    use std::io::{Read, Write};
    c.set_nonblocking(false).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nflappy");
}

/// A backend whose listener goes up and down every 300 ms; connections it
/// accepted are answered even while it is "down".
fn flapping_backend(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let listener = TcpListener::bind(addr).unwrap();
            listener.set_nonblocking(true).unwrap();
            let up_until = Instant::now() + Duration::from_millis(300);
            while Instant::now() < up_until {
                match listener.accept() {
                    Ok((c, _)) => {
                        std::thread::spawn(move || answer_http(c));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            // Going down: serve what the kernel already accepted (the proxy
            // saw those connects succeed), then close the listener.
            while let Ok((c, _)) = listener.accept() {
                std::thread::spawn(move || answer_http(c));
            }
            drop(listener);
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

#[test]
fn a_flapping_backend_never_fails_a_new_client_connection() {
    let mut s = setup(TCP_HEALTH);
    // Replace web-1 by a flapping listener on the same address.
    let addr = s.backends[0].addr;
    s.backends[0].stop();
    let stop = Arc::new(AtomicBool::new(false));
    let flapper = flapping_backend(addr, stop.clone());
    let started = Instant::now();
    let mut ok = 0;
    let mut failures = Vec::new();
    while started.elapsed() < Duration::from_secs(4) && ok < 2000 {
        match fetch_name(s.proxy) {
            Ok(_) => ok += 1,
            Err(e) => failures.push(e),
        }
    }
    stop.store(true, Ordering::Relaxed);
    flapper.join().unwrap();
    assert!(ok > 100, "only {ok} requests in 4 s");
    assert!(
        failures.is_empty(),
        "{} of {} client connections failed: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    // And the proxy agrees: no client connection gave up at connect.
    let series =
        "beacon_proxy_connections_total{service=\"web.default\",result=\"connect_failed\"}";
    assert_eq!(s.beacon.metric(series).unwrap_or(0.0), 0.0);
}

#[test]
fn passive_ejection_works_with_probes_disabled() {
    // No probes: only the proxy's connect failures can take web-2 out.
    let mut s = setup("[service.health]\nkind = \"none\"\neject_after = 2\neject_time = \"30s\"\n");
    assert_eq!(dns_ips(&s), all3());
    s.backends[1].stop();
    // Requests keep succeeding (retried on another endpoint) while web-2 is ejected.
    for _ in 0..30 {
        fetch_name(s.proxy).expect("connect failures are retried elsewhere");
    }
    eventually(Duration::from_secs(2), "web-2 ejected", || {
        (!dns_ips(&s).contains("127.0.0.52")).then_some(())
    });
    let json = s.beacon.services_json();
    let ep = &json["services"][0]["endpoints"][1];
    assert!(
        ep["reason"].as_str().unwrap().starts_with("ejected"),
        "{ep}"
    );
    let _ =
        TcpStream::connect_timeout(&s.proxy, Duration::from_secs(1)).expect("proxy still accepts");
}
