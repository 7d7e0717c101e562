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

/// dnsmasq answering `*.test.example` with 127.0.0.99 on a free port; a few
/// tries, since another process may take the port between check and bind.
pub(crate) fn dnsmasq() -> (Dnsmasq, SocketAddr) {
    for _ in 0..5 {
        let addr = free_addr(); // free for UDP and TCP, as dnsmasq needs
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq must be installed: ./scripts/test installs it");
        let mut d = Dnsmasq(child);
        for _ in 0..10 {
            if d.0.try_wait().unwrap().is_some() {
                break; // exited: the port was taken
            }
            if query_a(addr, "up.test.example.").is_some_and(|ips| !ips.is_empty()) {
                return (d, addr);
            }
        }
    }
    panic!("dnsmasq did not start in 5 tries");
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
