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
    make_cert_with(dir, name, &[]);
}

/// [`make_cert`] with more `openssl req` arguments.
fn make_cert_with(dir: &Path, name: &str, more: &[&str]) {
    let san = ["-addext", "subjectAltName=DNS:beacon.test,IP:127.0.0.1"];
    let args: Vec<&str> = san.iter().chain(more).copied().collect();
    self_signed(dir, name, "/CN=beacon.test", &args);
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

/// An RFC 8484 query for `name` A (ID 0, RD), wire format.
fn doh_query(name: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut msg = Message::new(0, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let name = Name::from_ascii(format!("{name}.")).unwrap();
    msg.queries.push(Query::query(name, RecordType::A));
    msg.to_vec().unwrap()
}

/// The A addresses and the rcode of a DNS reply in an HTTP body.
fn a_records(body: &[u8]) -> (Vec<String>, String) {
    let reply = hickory_proto::op::Message::from_vec(body).expect("a DNS message in the body");
    (
        a_addresses(&reply),
        format!("{:?}", reply.metadata.response_code),
    )
}

/// `curl -sS` against the DoH port, trusting the test CA: (HTTP status, body).
fn curl(t: &Tls, args: &[&str]) -> (u16, Vec<u8>) {
    let body = t.certs.path().join(format!("body-{}", fastrand::u64(..)));
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .arg("--cacert")
        .arg(t.certs.path().join("a.pem"))
        .args(args)
        .output()
        .expect("curl must be installed: ./scripts/test installs it");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        // 000: no HTTP answer at all, which no case expects.
        .filter(|&c: &u16| c != 0)
        .unwrap_or_else(|| panic!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr)));
    (code, std::fs::read(&body).unwrap_or_default())
}

fn doh_url(t: &Tls, rest: &str) -> String {
    format!("https://127.0.0.1:{}{rest}", t.doh.port())
}

fn get_param(name: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(doh_query(name))
}

/// RFC 8484's two forms: POST of an `application/dns-message` body and GET
/// with `?dns=` (base64url, no padding), over HTTP/2 and over HTTP/1.1; the
/// same answers, NXDOMAIN included. (hickory-server 0.26, which served DoH
/// before, refused every GET.)
#[test]
fn doh_get_and_post_over_http2_and_http1() {
    let t = start();
    let body = t.certs.path().join("q.bin");
    std::fs::write(&body, doh_query("adm.default.svc.cluster.local")).unwrap();
    let post = format!("@{}", body.display());
    for http in ["--http2", "--http1.1"] {
        let (code, reply) = curl(
            &t,
            &[
                http,
                "-H",
                "content-type: application/dns-message",
                "--data-binary",
                &post,
                &doh_url(&t, "/dns-query"),
            ],
        );
        assert_eq!(code, 200, "POST {http}");
        assert_eq!(
            a_records(&reply),
            (vec!["127.0.0.1".into()], "NoError".into()),
            "POST {http}"
        );
        for (name, want) in [
            (
                "adm.default.svc.cluster.local",
                (vec!["127.0.0.1".to_string()], "NoError"),
            ),
            (
                "web.default.svc.cluster.local",
                (vec!["127.0.0.20".to_string()], "NoError"),
            ),
            ("nope.default.svc.cluster.local", (vec![], "NXDomain")),
        ] {
            let url = doh_url(&t, &format!("/dns-query?dns={}", get_param(name)));
            let (code, reply) = curl(&t, &[http, &url]);
            assert_eq!(code, 200, "GET {http} {name}");
            assert_eq!(
                a_records(&reply),
                (want.0, want.1.to_string()),
                "GET {http} {name}"
            );
        }
    }
    let ca = t.certs.path().join("a.pem");
    let got = kdig_short(
        "+https-get",
        t.doh,
        &ca,
        "web.default.svc.cluster.local",
        "A",
    );
    assert_eq!(got.trim(), "127.0.0.20", "kdig +https-get");
}

/// `curl --doh-url`: curl resolves `adm.default.svc.cluster.local` through
/// beacon's DoH and fetches the admin page it names.
#[test]
fn curl_resolves_through_doh_url() {
    let t = start();
    let url = format!(
        "http://adm.default.svc.cluster.local:{}/healthz",
        t.beacon.admin.port()
    );
    let (code, _) = curl(&t, &["--doh-url", &doh_url(&t, "/dns-query"), &url]);
    assert_eq!(code, 200, "curl --doh-url {url}");
}

/// Requests that are not DoH get HTTP errors, not DNS answers and not a
/// closed connection: a wrong path, a GET without `dns`, bad base64url, a
/// POST of another media type, another method, and a DNS *response* sent
/// to us.
#[test]
fn doh_refuses_what_is_not_a_dns_query() {
    let t = start();
    let q = get_param("web.default.svc.cluster.local");
    let mut response = doh_query("web.default.svc.cluster.local");
    response[2] |= 0x80; // QR: a response
    let body = t.certs.path().join("resp.bin");
    std::fs::write(&body, &response).unwrap();
    let resp = format!("@{}", body.display());
    let cases: Vec<(Vec<String>, u16)> = vec![
        (vec![doh_url(&t, &format!("/other?dns={q}"))], 404),
        (vec![doh_url(&t, "/dns-query")], 400),
        (vec![doh_url(&t, "/dns-query?dns=q+/q")], 400),
        (
            vec![
                "-H".into(),
                "content-type: text/plain".into(),
                "--data-binary".into(),
                "x".into(),
                doh_url(&t, "/dns-query"),
            ],
            415,
        ),
        (
            vec![
                "-X".into(),
                "PUT".into(),
                doh_url(&t, &format!("/dns-query?dns={q}")),
            ],
            405,
        ),
        (
            vec![
                "-H".into(),
                "content-type: application/dns-message".into(),
                "--data-binary".into(),
                resp,
                doh_url(&t, "/dns-query"),
            ],
            400,
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(curl(&t, &args).0, want, "curl {args:?}");
    }
    // Still serving.
    let (code, reply) = curl(&t, &[&doh_url(&t, &format!("/dns-query?dns={q}"))]);
    assert_eq!(
        (code, a_records(&reply).0),
        (200, vec!["127.0.0.20".to_string()])
    );
}

/// 200 GETs multiplexed over HTTP/2 (curl --parallel, up to 100 streams at
/// once): every one is answered, each with its own name's address.
#[test]
fn doh_answers_many_streams_at_once() {
    let t = start();
    let dir = t.certs.path();
    let mut cfg = String::new();
    for i in 0..200 {
        let name = if i % 2 == 0 { "web" } else { "adm" };
        let q = get_param(&format!("{name}.default.svc.cluster.local"));
        cfg.push_str(&format!(
            "url = \"{}\"\noutput = \"{}\"\n",
            doh_url(&t, &format!("/dns-query?dns={q}")),
            dir.join(format!("r{i}-{name}.bin")).display()
        ));
    }
    std::fs::write(dir.join("urls.cfg"), cfg).unwrap();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--parallel",
            "--parallel-max",
            "100",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(dir.join("a.pem"))
        .arg("-K")
        .arg(dir.join("urls.cfg"))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl --parallel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..200 {
        let (name, want) = if i % 2 == 0 {
            ("web", "127.0.0.20")
        } else {
            ("adm", "127.0.0.1")
        };
        let body = std::fs::read(dir.join(format!("r{i}-{name}.bin"))).unwrap_or_default();
        assert_eq!(a_records(&body).0, [want], "stream {i} ({name})");
    }
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

/// One DoT connection, queries pipelined (RFC 7766 §6.2.1.1): a question
/// forwarded to an upstream that never answers, then a zone question. The
/// zone answer must come back at once, ahead of the forwarded one (which
/// ends in SERVFAIL at the forward timeout). On hickory-server's TLS loop,
/// which DoT ran on before, it waited behind the forwarded query: that loop
/// reads a connection's next query only once the last one is answered.
#[test]
fn dot_answers_a_zone_query_pipelined_behind_a_stuck_forward() {
    use std::io::{Read, Write};
    let certs = tempfile::tempdir().unwrap();
    // Not a CA: webpki (rustls' client) refuses a CA certificate as the
    // server's own.
    make_cert_with(
        certs.path(),
        "a",
        &["-addext", "basicConstraints=critical,CA:FALSE"],
    );
    // An upstream that takes queries and never answers.
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dot = free_addr();
    let dns_extra = format!(
        "forward = [\"{}\"]\nforward_timeout = \"3s\"\ntls_listen = \"{dot}\"\n\
         cert = \"{}\"\nkey = \"{}\"\n",
        hole.local_addr().unwrap(),
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

    let pem = std::fs::read(certs.path().join("a.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("beacon.test").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(dot).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);

    let framed = |id: u16, name: &str| {
        let mut q = doh_query(name);
        q[..2].copy_from_slice(&id.to_be_bytes());
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(&q);
        f
    };
    let mut both = framed(1, "stuck.example.org");
    both.extend(framed(2, "web.default.svc.cluster.local"));
    let sent = std::time::Instant::now();
    tls.write_all(&both).unwrap();
    let mut read_reply = || {
        let mut len = [0u8; 2];
        tls.read_exact(&mut len).unwrap();
        let mut body = vec![0; u16::from_be_bytes(len) as usize];
        tls.read_exact(&mut body).unwrap();
        (u16::from_be_bytes([body[0], body[1]]), body)
    };
    let (id, body) = read_reply();
    let first_after = sent.elapsed();
    assert_eq!(id, 2, "the zone answer comes first");
    assert!(
        first_after < Duration::from_secs(1),
        "the zone answer took {first_after:?}"
    );
    assert_eq!(a_records(&body).0, vec!["127.0.0.20".to_string()]);
    // The forwarded one still gets its answer on the same connection.
    let (id, body) = read_reply();
    assert_eq!(id, 1);
    assert_eq!(a_records(&body).1, "ServFail");
    let mut buf = [0u8; 64];
    assert!(hole.recv_from(&mut buf).is_ok(), "the upstream was asked");
}
