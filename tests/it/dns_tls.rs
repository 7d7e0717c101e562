//! DNS over TLS and over HTTPS end to end: the real binary, a certificate
//! made here with `openssl`, real clients (`kdig +tls`, `kdig +https`,
//! `curl --doh-url`) compared with `dig` over UDP, and certificate reload.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::dns::dnsmasq;
use crate::harness::*;

const FILE_SOURCE: &str = "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n";

/// web (vip), adm (headless on 127.0.0.1: curl reaches the admin port by it).
const SERVICES: &str = r#"
[[service]]
name = "web"
vip = "127.0.0.20"
  [[service.endpoint]]
  ip = "127.0.0.11"
  [service.health]
  kind = "none"

[[service]]
name = "adm"
  [[service.endpoint]]
  ip = "127.0.0.1"
  [service.health]
  kind = "none"
"#;

/// A self-signed certificate for `beacon.test` and 127.0.0.1.
fn make_cert(dir: &Path, name: &str) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=beacon.test",
            "-addext",
            "subjectAltName=DNS:beacon.test,IP:127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &pem,
        ],
    );
}

/// `kdig` with `args`, its stdout.
fn kdig(args: &[String]) -> String {
    let out = Command::new("kdig")
        .args(["+time=3", "+retry=0"])
        .args(args)
        .output()
        .expect("kdig (knot-dnsutils) must be installed: ./scripts/test installs it");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kdig +short` over TLS (`mode` = `+tls`) or HTTPS (`+https`) against `addr`,
/// trusting `ca`.
fn kdig_short(mode: &str, addr: SocketAddr, ca: &Path, name: &str, qtype: &str) -> String {
    kdig(&[
        format!("@{}", addr.ip()),
        "-p".into(),
        addr.port().to_string(),
        mode.into(),
        format!("+tls-ca={}", ca.display()),
        "+tls-hostname=beacon.test".into(),
        "+short".into(),
        name.into(),
        qtype.into(),
    ])
}

/// The status line of a full `kdig` answer (`status: NXDOMAIN` ...).
fn kdig_status(mode: &str, addr: SocketAddr, ca: &Path, name: &str) -> String {
    let out = kdig(&[
        format!("@{}", addr.ip()),
        "-p".into(),
        addr.port().to_string(),
        mode.into(),
        format!("+tls-ca={}", ca.display()),
        "+tls-hostname=beacon.test".into(),
        name.into(),
        "A".into(),
    ]);
    status_of(&out)
}

fn status_of(out: &str) -> String {
    out.split_whitespace()
        .skip_while(|w| *w != "status:")
        .nth(1)
        .unwrap_or("(none)")
        .trim_end_matches([',', ';'])
        .to_string()
}

struct Tls {
    beacon: Beacon,
    dot: SocketAddr,
    doh: SocketAddr,
    certs: tempfile::TempDir,
    _upstream: crate::dns::Dnsmasq,
}

fn start() -> Tls {
    let certs = tempfile::tempdir().unwrap();
    make_cert(certs.path(), "a");
    let (upstream, up) = dnsmasq();
    let (dot, doh) = (free_addr(), free_addr());
    let dns_extra = format!(
        "forward = [\"{up}\"]\ntls_listen = \"{dot}\"\nhttps_listen = \"{doh}\"\n\
         cert = \"{}\"\nkey = \"{}\"\n",
        certs.path().join("a.pem").display(),
        certs.path().join("a.key").display()
    );
    let beacon = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        dns_extra,
        services: Some(SERVICES.into()),
        ..Options::default()
    });
    beacon.wait_ready();
    Tls {
        beacon,
        dot,
        doh,
        certs,
        _upstream: upstream,
    }
}

/// Zone names, a forwarded name and NXDOMAIN: kdig over TLS and over HTTPS
/// get what dig gets over UDP; the metrics count `dot` and `doh`.
#[test]
fn dot_and_doh_answer_as_udp_does() {
    let t = start();
    let ca = t.certs.path().join("a.pem");
    for (name, qtype) in [
        ("web.default.svc.cluster.local", "A"),
        ("adm.default.svc.cluster.local", "A"),
        ("dns-version.cluster.local", "TXT"),
        ("up.test.example", "A"),
    ] {
        let udp = dig_norm_short(t.beacon.dns, name, qtype);
        assert!(!udp.is_empty(), "dig {name} {qtype} got nothing");
        for (mode, addr) in [("+tls", t.dot), ("+https", t.doh)] {
            let got = kdig_short(mode, addr, &ca, name, qtype);
            assert_eq!(got.trim(), udp, "kdig {mode} {name} {qtype}");
        }
    }
    let missing = "nope.default.svc.cluster.local";
    for (mode, addr) in [("+tls", t.dot), ("+https", t.doh)] {
        assert_eq!(kdig_status(mode, addr, &ca, missing), "NXDOMAIN", "{mode}");
    }
    let metrics = t.beacon.metrics();
    for proto in ["dot", "doh"] {
        let series = format!("beacon_dns_requests_total{{proto=\"{proto}\",qtype=\"A\"}}");
        let n = t.beacon.metric(&series).unwrap_or(0.0);
        assert!(n >= 4.0, "{series} = {n}; metrics:\n{metrics}");
    }
}

fn dig_norm_short(dns: SocketAddr, name: &str, qtype: &str) -> String {
    dig_full(dns, &["+short", name, qtype]).trim().to_string()
}

/// curl POSTs an RFC 8484 query to `/dns-query` and reads the answer.
/// (`curl --doh-url` itself is refused by hickory-server 0.26, which wants
/// `Accept: application/dns-message` where curl sends `*/*`.)
#[test]
fn curl_posts_a_doh_query() {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let t = start();
    let mut msg = Message::new(0, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let name = Name::from_ascii("adm.default.svc.cluster.local.").unwrap();
    msg.queries.push(Query::query(name, RecordType::A));
    let body = t.certs.path().join("q.bin");
    std::fs::write(&body, msg.to_vec().unwrap()).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "5"])
        .arg("--cacert")
        .arg(t.certs.path().join("a.pem"))
        .args(["-H", "content-type: application/dns-message"])
        .args(["-H", "accept: application/dns-message"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("https://127.0.0.1:{}/dns-query", t.doh.port()))
        .output()
        .expect("curl must be installed: ./scripts/test installs it");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = Message::from_vec(&out.stdout).expect("a DNS message in the body");
    let ips: Vec<String> = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(ips, ["127.0.0.1"], "{reply:?}");
}

/// A broken certificate file keeps the last good pair (logged); a new good
/// pair is served once written.
#[test]
fn a_bad_certificate_keeps_the_last_good_one_and_a_new_one_is_taken() {
    let t = start();
    let dir = t.certs.path();
    let name = "web.default.svc.cluster.local";
    std::fs::write(dir.join("a.pem"), "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    eventually(Duration::from_secs(5), "the bad file logged", || {
        t.beacon
            .log_text()
            .contains("the last good one stays in force")
            .then_some(())
    });
    // The old certificate (still its CA: a copy) is served on.
    make_cert(dir, "b");
    let old_ca = dir.join("old-ca.pem");
    // The served certificate is the old one: trusting it alone works.
    let served = served_cert(t.dot);
    std::fs::write(&old_ca, &served).unwrap();
    assert_eq!(
        kdig_short("+tls", t.dot, &old_ca, name, "A").trim(),
        "127.0.0.20"
    );
    // A new good pair: key first, then the chain (each atomically).
    std::fs::rename(dir.join("b.key"), dir.join("a.key")).unwrap();
    std::fs::rename(dir.join("b.pem"), dir.join("a.pem")).unwrap();
    let new_ca = dir.join("a.pem");
    eventually(Duration::from_secs(6), "the new certificate served", || {
        (kdig_short("+tls", t.dot, &new_ca, name, "A").trim() == "127.0.0.20").then_some(())
    });
    assert_ne!(served_cert(t.dot), served, "a new certificate");
}

/// The leaf certificate DoT serves, as PEM (openssl s_client).
fn served_cert(addr: SocketAddr) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -alpn dot </dev/null 2>/dev/null | openssl x509"
        ))
        .output()
        .expect("openssl");
    let pem = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        pem.contains("BEGIN CERTIFICATE"),
        "no certificate served: {pem}"
    );
    pem
}
