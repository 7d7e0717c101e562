//! DNS end to end: the real binary, a services file, `dig`, metrics, and
//! forwarding through a dnsmasq started here.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;

const FILE_SOURCE: &str = "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n";

/// web (vip), db (headless, hostnames, a named port), big (60 endpoints).
fn services() -> String {
    let mut s = String::from(
        r#"
[[service]]
name = "web"
vip = "127.0.0.20"
  [[service.port]]
  name = "http"
  port = 80
  [[service.endpoint]]
  ip = "127.0.0.11"
  [service.health]
  kind = "none"

[[service]]
name = "db"
namespace = "data"
  [[service.port]]
  name = "pg"
  port = 5432
  [[service.endpoint]]
  ip = "127.0.1.1"
  hostname = "db-0"
  [[service.endpoint]]
  ip = "127.0.1.2"
  hostname = "db-1"
  [service.health]
  kind = "none"

[[service]]
name = "big"
"#,
    );
    for i in 1..=60 {
        s.push_str(&format!("  [[service.endpoint]]\n  ip = \"127.0.2.{i}\"\n"));
    }
    s.push_str("  [service.health]\n  kind = \"none\"\n");
    s
}

fn start(dns_extra: &str) -> Beacon {
    let b = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        dns_extra: dns_extra.into(),
        services: Some(services()),
        ..Options::default()
    });
    b.wait_ready();
    b
}

/// dig output with runs of whitespace folded to one space.
pub(crate) fn dig_norm(dns: SocketAddr, args: &[&str]) -> String {
    dig_full(dns, args)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_binary_answers_the_zone_and_counts_it() {
    let b = start("");
    let dns = b.dns;
    assert_eq!(
        dig(dns, "web.default.svc.cluster.local", "A", false),
        vec!["127.0.0.20"]
    );
    assert_eq!(
        dig(dns, "web.default.svc.cluster.local", "A", true),
        vec!["127.0.0.20"]
    );
    assert_eq!(
        dig(dns, "db.data.svc.cluster.local", "A", false),
        vec!["127.0.1.1", "127.0.1.2"]
    );
    let out = dig_norm(dns, &["nope.default.svc.cluster.local", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(
        out.contains("cluster.local. 5 IN SOA ns.dns.cluster.local."),
        "{out}"
    );
    let out = dig_norm(dns, &["web.default.svc.cluster.local", "AAAA"]);
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0, AUTHORITY: 1"),
        "{out}"
    );
    let out = dig_norm(dns, &["_pg._tcp.db.data.svc.cluster.local", "SRV"]);
    assert!(
        out.contains("IN SRV 0 1 5432 db-0.db.data.svc.cluster.local."),
        "{out}"
    );
    assert!(
        out.contains("db-1.db.data.svc.cluster.local. 5 IN A 127.0.1.2"),
        "{out}"
    );
    let out = dig_norm(dns, &["-x", "127.0.1.2"]);
    assert!(
        out.contains("IN PTR db-1.db.data.svc.cluster.local."),
        "{out}"
    );
    let out = dig_norm(dns, &["WEB.Default.svc.CLUSTER.local", "A"]);
    assert!(
        out.contains("WEB.Default.svc.CLUSTER.local. 5 IN A 127.0.0.20"),
        "{out}"
    );
    let out = dig_norm(dns, &["+noedns", "big.default.svc.cluster.local", "A"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(out.matches(" IN A 127.0.2.").count(), 60, "{out}");
    let out = dig_norm(dns, &["example.com", "A"]);
    assert!(out.contains("status: REFUSED"), "no upstream: {out}");
    // UDP threads add their tallies within 100 ms of going idle.
    let requests = eventually(Duration::from_secs(2), "UDP A requests counted", || {
        b.metric(r#"beacon_dns_requests_total{proto="udp",qtype="A"}"#)
            .filter(|n| *n >= 6.0)
    });
    assert!(
        b.metric(r#"beacon_dns_requests_total{proto="tcp",qtype="A"}"#)
            .unwrap_or(0.0)
            >= 2.0
    );
    assert!(
        b.metric(r#"beacon_dns_responses_total{rcode="NXDOMAIN"}"#)
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        b.metric(r#"beacon_dns_responses_total{rcode="REFUSED"}"#)
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        b.metric("beacon_dns_request_duration_seconds_count")
            .unwrap_or(0.0)
            >= requests
    );
}

pub(crate) struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on `addr` answering `*.test.example` with 127.0.0.99, with
/// `extra` arguments; None when it does not come up (the port is taken).
pub(crate) fn dnsmasq_at(addr: SocketAddr, extra: &[String]) -> Option<Dnsmasq> {
    let child = Command::new("dnsmasq")
        .args([
            "--no-daemon",
            &format!("--port={}", addr.port()),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--address=/test.example/127.0.0.99",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq must be installed: ./scripts/test installs it");
    let mut d = Dnsmasq(child);
    for _ in 0..20 {
        if d.0.try_wait().unwrap().is_some() {
            return None;
        }
        if query_a(addr, "up.test.example.").is_some_and(|ips| !ips.is_empty()) {
            return Some(d);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

/// [`dnsmasq_at`] on a free port (free for UDP and TCP, as dnsmasq needs);
/// a few tries, since another process may take the port between check
/// and bind.
pub(crate) fn dnsmasq_with(extra: &[String]) -> (Dnsmasq, SocketAddr) {
    for _ in 0..5 {
        let addr = free_addr();
        if let Some(d) = dnsmasq_at(addr, extra) {
            return (d, addr);
        }
    }
    panic!("dnsmasq did not start in 5 tries");
}

/// [`dnsmasq_with`] with no extra arguments.
pub(crate) fn dnsmasq() -> (Dnsmasq, SocketAddr) {
    dnsmasq_with(&[])
}

#[test]
fn the_binary_forwards_through_dnsmasq_for_allowed_clients_only() {
    let (_upstream, up) = dnsmasq();
    let b = start(&format!(
        "forward = [\"{up}\"]\nforward_allow = [\"127.0.0.0/8\"]"
    ));
    assert_eq!(
        dig(b.dns, "www.test.example", "A", false),
        vec!["127.0.0.99"]
    );
    assert_eq!(
        dig(b.dns, "www.test.example", "A", true),
        vec!["127.0.0.99"]
    );
    let out = dig_norm(b.dns, &["www.test.example", "A"]);
    assert!(out.contains("flags: qr rd ra;"), "{out}");
    // The zone is still ours.
    assert_eq!(
        dig(b.dns, "web.default.svc.cluster.local", "A", false),
        vec!["127.0.0.20"]
    );
    // Per-upstream metrics and the forward-cache lookups.
    let metrics = b.metrics();
    let line = |prefix: &str, needle: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains(needle))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} with {needle}:\n{metrics}"))
    };
    let upstream = format!("upstream=\"{up}\"");
    assert!(line("beacon_dns_upstream_requests_total", &upstream) >= 1.0);
    assert!(line("beacon_dns_upstream_requests_total", "result=\"NOERROR\"") >= 1.0);
    assert!(line("beacon_dns_upstream_duration_seconds_count", &upstream) >= 1.0);
    // dnsmasq's own answers have TTL 0: never cached, each one a miss.
    let hits = line("beacon_dns_forward_cache_total", "result=\"hit\"");
    let misses = line("beacon_dns_forward_cache_total", "result=\"miss\"");
    assert!(
        hits + misses >= 3.0 && misses >= 1.0,
        "hits {hits}, misses {misses}"
    );
    drop(b);
    let b = start(&format!(
        "forward = [\"{up}\"]\nforward_allow = [\"10.0.0.0/8\"]"
    ));
    let out = dig_norm(b.dns, &["www.test.example", "A"]);
    assert!(
        out.contains("status: REFUSED"),
        "loopback is not allowed here: {out}"
    );
}

/// A standard A query for `name` with ID `id`, no EDNS.
fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = vec![(id >> 8) as u8, id as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Issue 11 defect 7: 100k distinct NXDOMAIN names over UDP and then over
/// one TCP connection must not grow beacon's memory without bound (the
/// fast-path caches held every name: +85 MB per UDP thread, ~840 KiB per
/// TCP connection). Bounded caches keep the growth to a few MB.
#[test]
fn distinct_nxdomain_floods_leave_memory_bounded() {
    use std::io::{Read, Write};
    let b = start("");
    let pid = b.child.id();
    let names = 100_000u32;
    let name = |i: u32| format!("flood-{i}.default.svc.cluster.local");
    // Warm up the paths once, then take the baseline.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.connect(b.dns).unwrap();
    let mut buf = [0u8; 1500];
    let mut udp_round = |from: u32, to: u32| {
        let mut answered = 0u32;
        for chunk in (from..to).collect::<Vec<_>>().chunks(64) {
            for &i in chunk {
                sock.send(&a_query(i as u16, &name(i))).unwrap();
            }
            for _ in chunk {
                match sock.recv(&mut buf) {
                    Ok(n) if n >= 4 && buf[3] & 0x0F == 3 => answered += 1,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        answered
    };
    udp_round(0, 2_000);
    let before = rss_bytes(pid);
    let answered = udp_round(2_000, 2_000 + names);
    assert!(
        answered > names * 9 / 10,
        "only {answered} NXDOMAIN replies"
    );
    let after_udp = rss_bytes(pid);
    // TCP: one connection, pipelined in windows of 64.
    let mut tcp = std::net::TcpStream::connect(b.dns).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let base = 200_000u32;
    for window in (base..base + names).collect::<Vec<_>>().chunks(64) {
        let mut out = Vec::new();
        for &i in window {
            let q = a_query(i as u16, &name(i));
            out.extend_from_slice(&(q.len() as u16).to_be_bytes());
            out.extend_from_slice(&q);
        }
        tcp.write_all(&out).unwrap();
        for _ in window {
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).unwrap();
            let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
            tcp.read_exact(&mut body).unwrap();
        }
    }
    let after_tcp = rss_bytes(pid);
    let mb = |x: u64| x as f64 / 1048576.0;
    eprintln!(
        "rss: before {:.1} MB, after 100k udp {:.1} MB, after 100k tcp {:.1} MB",
        mb(before),
        mb(after_udp),
        mb(after_tcp)
    );
    let bound = 12 * 1024 * 1024;
    assert!(
        after_udp.saturating_sub(before) < bound,
        "udp flood grew rss by {:.1} MB",
        mb(after_udp - before)
    );
    assert!(
        after_tcp.saturating_sub(after_udp) < bound,
        "tcp flood grew rss by {:.1} MB",
        mb(after_tcp - after_udp)
    );
    // Still answering, from the zone.
    assert_eq!(
        dig(b.dns, "web.default.svc.cluster.local", "A", false),
        vec!["127.0.0.20"]
    );
}

/// SIGTERM starts the lameduck: `/readyz` says 503 at once, while a client
/// asking continuously over UDP and TCP gets every answer until the
/// lameduck is over; then the process exits.
#[test]
fn the_lameduck_answers_every_query_through_the_drain() {
    let lameduck = Duration::from_millis(2000);
    // Several UDP threads: the ones that saw no query before SIGTERM must
    // still serve the latest snapshot once the registry has stopped.
    let mut b = start("lameduck = \"2s\"\nudp_sockets = 4\n");
    let name = "web.default.svc.cluster.local";
    assert_eq!(query_a(b.dns, name), Some(vec!["127.0.0.20".to_string()]));
    let term = std::time::Instant::now();
    b.signal(15);
    eventually(Duration::from_millis(500), "/readyz 503 at once", || {
        let (status, _) = http_get(b.admin, "/readyz").expect("admin serves in the lameduck");
        (status == 503).then_some(())
    });
    // Ask until shortly before the lameduck ends: every query answered.
    let (mut udp, mut tcp) = (0, 0);
    while term.elapsed() < lameduck - Duration::from_millis(300) {
        let got = query_a(b.dns, name);
        if got != Some(vec!["127.0.0.20".to_string()]) {
            panic!(
                "UDP query {udp} at {:?} after SIGTERM: {got:?}; dig now:\n{}\nlog:\n{}",
                term.elapsed(),
                dig_full(b.dns, &[name]),
                b.log_text()
            );
        }
        udp += 1;
        if udp % 10 == 0 {
            let out = dig_norm(b.dns, &["+tcp", "+short", name]);
            assert_eq!(out, "127.0.0.20", "TCP query at {:?}", term.elapsed());
            tcp += 1;
        }
    }
    // The loop ran to the end of the window (its condition); the counts
    // only show it asked all along (dig is slow on a loaded machine).
    assert!(
        udp >= 20 && tcp >= 2,
        "asked {udp} over UDP, {tcp} over TCP"
    );
    assert!(
        b.child.try_wait().unwrap().is_none(),
        "still in the lameduck"
    );
    let status = b.wait_exit(Duration::from_secs(4));
    let took = term.elapsed();
    assert!(status.success(), "{status}; log:\n{}", b.log_text());
    assert!(
        took >= lameduck && took < lameduck + Duration::from_secs(3),
        "exited {took:?} after SIGTERM"
    );
}
