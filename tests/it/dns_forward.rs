//! The forwarder's upstream health and prefetch, end to end: the real
//! binary forwarding to dnsmasqs started here.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::dns::{dnsmasq_at, dnsmasq_with as dnsmasq};
use crate::harness::*;

const FILE_SOURCE: &str = "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n";
const SERVICES: &str = "[[service]]\nname = \"web\"\nvip = \"127.0.0.20\"\n  [[service.port]]\n  port = 80\n  [[service.endpoint]]\n  ip = \"127.0.0.11\"\n  [service.health]\n  kind = \"none\"\n";

fn start(dns_extra: &str) -> Beacon {
    let b = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        dns_extra: dns_extra.into(),
        services: Some(SERVICES.into()),
        ..Options::default()
    });
    b.wait_ready();
    b
}

fn healthy(b: &Beacon, up: SocketAddr) -> Option<f64> {
    b.metric(&format!("beacon_dns_upstream_healthy{{upstream=\"{up}\"}}"))
}

/// Queries sent to `up`, whatever their result.
fn sent_to(b: &Beacon, up: SocketAddr) -> f64 {
    let needle = format!("upstream=\"{up}\"");
    b.metrics()
        .lines()
        .filter(|l| l.starts_with("beacon_dns_upstream_requests_total{") && l.contains(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two upstreams; the first one's dnsmasq is killed: every query is still
/// answered (no SERVFAIL), it is marked down after `max_fails`, then no
/// longer asked, and the gauge says 0; started again on its port, the
/// background check brings it back (gauge 1) and it is asked again.
#[test]
fn a_killed_upstream_is_marked_down_skipped_and_back_when_it_returns() {
    let (first, a) = dnsmasq(&[]);
    let (_second, b_up) = dnsmasq(&[]);
    let b = start(&format!(
        "forward = [\"{a}\", \"{b_up}\"]\nmax_fails = 2\nhealth_check = \"200ms\"\n"
    ));
    // dnsmasq's answers have TTL 0: every query goes upstream.
    assert_eq!(
        dig(b.dns, "one.test.example", "A", false),
        vec!["127.0.0.99"]
    );
    assert_eq!(healthy(&b, a), Some(1.0));
    assert_eq!(healthy(&b, b_up), Some(1.0));
    assert!(sent_to(&b, a) >= 1.0, "the first upstream is asked first");
    assert_eq!(sent_to(&b, b_up), 0.0);
    drop(first);
    for i in 0..6 {
        let out = dig_full(b.dns, &[&format!("q{i}.test.example"), "A"]);
        assert!(out.contains("status: NOERROR"), "query {i}: {out}");
        assert!(out.contains("127.0.0.99"), "query {i}: {out}");
    }
    assert_eq!(healthy(&b, a), Some(0.0), "marked down");
    assert_eq!(healthy(&b, b_up), Some(1.0));
    let asked = sent_to(&b, a);
    for i in 0..10 {
        assert_eq!(
            dig(b.dns, &format!("r{i}.test.example"), "A", false),
            vec!["127.0.0.99"]
        );
    }
    assert_eq!(sent_to(&b, a), asked, "a down upstream is not asked");
    assert!(sent_to(&b, b_up) >= 16.0);
    let log = b.log_text();
    assert!(log.contains("DNS upstream marked down"), "{log}");
    // Back on the same port: up within a few checks, then asked again.
    let _first = (0..20)
        .find_map(|_| {
            dnsmasq_at(a, &[]).or_else(|| {
                std::thread::sleep(Duration::from_millis(100));
                None
            })
        })
        .expect("dnsmasq back on its port");
    eventually(Duration::from_secs(3), "gauge 1 again", || {
        (healthy(&b, a) == Some(1.0)).then_some(())
    });
    assert_eq!(
        dig(b.dns, "again.test.example", "A", false),
        vec!["127.0.0.99"]
    );
    assert!(sent_to(&b, a) > asked, "asked again once up");
}

/// Queries dnsmasq logged for `name`.
fn logged(log: &Path, name: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let needle = format!("] {name} from");
    text.lines()
        .filter(|l| l.contains("query[A]") && l.contains(&needle))
        .count()
}

/// Prefetch through dnsmasq (TTL 3 s): a name asked every 100 ms for 7 s
/// never misses the cache after the first question and goes upstream
/// about once a TTL; a name asked once is asked upstream once.
#[test]
fn a_popular_name_is_prefetched_and_never_misses() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("dnsmasq.log");
    let (_up, up) = dnsmasq(&[
        "--local-ttl=3".into(),
        "--log-queries".into(),
        format!("--log-facility={}", log.display()),
    ]);
    let b = start(&format!("forward = [\"{up}\"]\nprefetch = 2\n"));
    let miss = r#"beacon_dns_forward_cache_total{result="miss"}"#;
    assert_eq!(
        dig(b.dns, "once.test.example", "A", false),
        vec!["127.0.0.99"]
    );
    let started = Instant::now();
    assert_eq!(
        query_a(b.dns, "pop.test.example."),
        Some(vec!["127.0.0.99".into()])
    );
    let misses = b.metric(miss).unwrap_or(0.0);
    let mut asked = 0;
    while started.elapsed() < Duration::from_secs(7) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            query_a(b.dns, "pop.test.example."),
            Some(vec!["127.0.0.99".into()]),
            "after {:?}",
            started.elapsed()
        );
        asked += 1;
    }
    assert!(asked >= 40, "asked {asked} times");
    assert_eq!(
        b.metric(miss).unwrap_or(0.0),
        misses,
        "no cache miss after warm-up"
    );
    let pop = logged(&log, "pop.test.example");
    assert!(
        (3..=4).contains(&pop),
        "1 + a refresh about every 2.7 s in 7 s: {pop} upstream queries"
    );
    assert_eq!(logged(&log, "once.test.example"), 1, "not prefetched");
}

/// Sockets the process holds open now.
fn sockets_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("socket:"))
        .count()
}

/// 200 distinct questions in flight to an upstream that never answers use
/// the upstream's few pooled sockets (4), not one each, and reach it from
/// at most 4 source ports.
#[test]
fn forwarded_queries_in_flight_share_a_few_upstream_sockets() {
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up = silent.local_addr().unwrap();
    silent
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let b = start(&format!(
        "forward = [\"{up}\"]\nforward_timeout = \"3s\"\nmax_fails = 0\n"
    ));
    let pid = b.child.id();
    let before = sockets_of(pid);
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u16 {
        let mut q = vec![(i >> 8) as u8, i as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in [format!("n{i}"), "example".into()] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        client.send_to(&q, b.dns).unwrap();
    }
    let mut ports = std::collections::HashSet::new();
    let mut heard = 0;
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(2);
    while heard < 200 && Instant::now() < deadline {
        if let Ok((_, peer)) = silent.recv_from(&mut buf) {
            heard += 1;
            ports.insert(peer.port());
        }
    }
    assert_eq!(heard, 200, "every question went upstream");
    let during = sockets_of(pid);
    assert!(
        during <= before + 4,
        "200 questions in flight: {before} sockets before, {during} during"
    );
    assert!(ports.len() <= 4, "source ports: {ports:?}");
}
