//! DNS on the wire, against the real binary: `dig` and hickory-resolver
//! read the zone, forwarding goes through a dnsmasq started here, and the
//! packet corpus (shared/dns-corpus) is replayed over UDP and TCP.
//!
//! The zone is the unit tests' fixture (`dns::testkit::big_snapshot`) as a
//! services file: endpoints the unit fixture marks unhealthy are
//! `ready = false` here, which the responder treats the same way.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::dns::{dig_norm, dnsmasq};
use crate::harness::*;

const FILE_SOURCE: &str =
    "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n[proxy]\nenabled = false\n";

/// The three ports of every fixture service: http 80 → 8080, dns 53/udp,
/// and an unnamed 9000.
const PORTS: &str = r#"
  [[service.port]]
  name = "http"
  port = 80
  target_port = 8080
  [[service.port]]
  name = "dns"
  port = 53
  protocol = "udp"
  [[service.port]]
  port = 9000
  [service.health]
  kind = "none"
"#;

/// One `[[service]]` with the fixture's ports; `endpoints` are TOML lines.
fn service(ns: &str, name: &str, vip: Option<&str>, endpoints: &[&str]) -> String {
    let mut s = format!("[[service]]\nname = \"{name}\"\nnamespace = \"{ns}\"\n");
    if let Some(vip) = vip {
        s.push_str(&format!("vip = \"{vip}\"\n"));
    }
    s.push_str(PORTS);
    for e in endpoints {
        s.push_str(&format!("  [[service.endpoint]]\n  {e}\n"));
    }
    s
}

/// web (vip 10.96.0.10, one of three endpoints not ready), db (headless,
/// hostnames, a weight and a port override), empty (nothing ready), v6,
/// and big (60 endpoints).
fn services() -> String {
    let big: Vec<String> = (0..60)
        .map(|i| format!("ip = \"10.9.{}.{}\"", i / 200, i % 200 + 1))
        .collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    [
        service(
            "default",
            "web",
            Some("10.96.0.10"),
            &[
                "ip = \"10.0.0.1\"",
                "ip = \"10.0.0.2\"",
                "ip = \"10.0.0.3\"\n  ready = false",
            ],
        ),
        service(
            "prod",
            "db",
            None,
            &[
                "ip = \"10.1.0.1\"\n  hostname = \"db-0\"\n  weight = 5",
                "ip = \"10.1.0.2\"\n  hostname = \"db-1\"\n  port = 9999",
                "ip = \"10.1.0.3\"\n  hostname = \"db-2\"\n  ready = false",
                "ip = \"10.1.0.4\"",
            ],
        ),
        service(
            "prod",
            "empty",
            None,
            &["ip = \"10.2.0.1\"\n  ready = false"],
        ),
        service("prod", "v6", None, &["ip = \"fd00::1\""]),
        service("default", "big", None, &big),
    ]
    .join("\n")
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

fn query(name: &str, qtype: RecordType) -> Message {
    let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg
}

fn a_records(msg: &Message) -> Vec<IpAddr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

fn udp_ask(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    sock.send_to(bytes, addr).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut f = (bytes.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(bytes);
    f
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn tcp_ask(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(&framed(bytes)).unwrap();
    read_frame(&mut s).expect("a tcp reply")
}

#[test]
fn dig_sees_the_zone() {
    let b = start("");
    let a = b.dns;
    let out = dig_norm(a, &["nope.default.svc.cluster.local", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("flags: qr aa rd"), "{out}");
    assert!(
        out.contains("cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local."),
        "{out}"
    );
    let out = dig_norm(a, &["web.default.svc.cluster.local", "AAAA"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(
        out.contains("ANSWER: 0, AUTHORITY: 1"),
        "NODATA with SOA: {out}"
    );
    assert!(out.contains("IN SOA"), "{out}");
    // 60 endpoints: truncated over UDP without EDNS, dig retries over TCP.
    let out = dig_norm(a, &["+noedns", "big.default.svc.cluster.local", "A"]);
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 60"), "{out}");
    assert_eq!(out.matches(" IN A 10.9.").count(), 60, "{out}");
    let out = dig_norm(a, &["_http._tcp.db.prod.svc.cluster.local", "SRV"]);
    assert!(
        out.contains("ANSWER: 3, AUTHORITY: 0, ADDITIONAL: 4"),
        "SRV + 3 A + OPT: {out}"
    );
    assert!(
        out.contains("IN SRV 0 5 8080 db-0.db.prod.svc.cluster.local."),
        "{out}"
    );
    assert!(
        out.contains("db-0.db.prod.svc.cluster.local. 5 IN A 10.1.0.1"),
        "{out}"
    );
    let out = dig_norm(a, &["-x", "10.1.0.1"]);
    assert!(
        out.contains("IN PTR db-0.db.prod.svc.cluster.local."),
        "{out}"
    );
    let out = dig_norm(a, &["DB-0.Db.PROD.svc.cluster.LOCAL", "A"]);
    assert!(
        out.contains("DB-0.Db.PROD.svc.cluster.LOCAL. 5 IN A 10.1.0.1"),
        "case echoed: {out}"
    );
    let out = dig_norm(a, &["+tcp", "dns-version.cluster.local", "TXT"]);
    assert!(out.contains("\"1.1.0\""), "{out}");
    let out = dig_norm(a, &["example.com", "A"]);
    assert!(
        out.contains("status: REFUSED"),
        "no upstream configured: {out}"
    );
}

#[test]
fn dig_forwarding_through_dnsmasq_and_refused_for_outsiders() {
    let (_dnsmasq, upstream) = dnsmasq();
    let b = start(&format!(
        "forward = [\"{upstream}\"]\nforward_allow = [\"127.0.0.0/8\"]"
    ));
    let out = dig_norm(b.dns, &["www.test.example", "A"]);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains(" IN A 127.0.0.99"), "{out}");
    assert!(out.contains("flags: qr rd ra;"), "{out}");
    let out = dig_norm(b.dns, &["+tcp", "www.test.example", "A"]);
    assert!(out.contains(" IN A 127.0.0.99"), "{out}");
    // Zone names still come from the snapshot.
    let out = dig_norm(b.dns, &["web.default.svc.cluster.local", "A"]);
    assert!(out.contains("10.96.0.10"), "{out}");
    drop(b);
    // A server whose allow-list excludes loopback refuses to forward.
    let b = start(&format!(
        "forward = [\"{upstream}\"]\nforward_allow = [\"10.0.0.0/8\"]"
    ));
    let out = dig_norm(b.dns, &["www.test.example", "A"]);
    assert!(out.contains("status: REFUSED"), "{out}");
}

fn resolver(addr: SocketAddr, tcp: bool) -> hickory_resolver::TokioResolver {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    let mut ns = if tcp {
        NameServerConfig::tcp(addr.ip())
    } else {
        NameServerConfig::udp(addr.ip())
    };
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let mut builder = hickory_resolver::Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    builder.options_mut().cache_size = 0;
    builder.options_mut().attempts = 1;
    builder.options_mut().timeout = Duration::from_secs(2);
    builder.build().unwrap()
}

#[test]
fn hickory_resolver_gets_the_zone_over_udp_and_tcp() {
    let b = start("");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for tcp in [false, true] {
            let r = resolver(b.dns, tcp);
            let ips: Vec<IpAddr> = r
                .lookup_ip("db.prod.svc.cluster.local.")
                .await
                .unwrap()
                .iter()
                .collect();
            assert_eq!(ips.len(), 3, "tcp={tcp}");
            let big = r
                .ipv4_lookup("big.default.svc.cluster.local.")
                .await
                .unwrap();
            assert_eq!(big.answers().len(), 60, "tcp={tcp}");
            let srv = r
                .srv_lookup("_http._tcp.db.prod.svc.cluster.local.")
                .await
                .unwrap();
            assert_eq!(srv.answers().len(), 3);
            let ptr = r.reverse_lookup("1.0.1.10.in-addr.arpa.").await.unwrap();
            assert!(
                matches!(&ptr.answers()[0].data, RData::PTR(p) if p.0.to_ascii() == "db-0.db.prod.svc.cluster.local.")
            );
            let txt = r.txt_lookup("dns-version.cluster.local.").await.unwrap();
            assert_eq!(txt.answers().len(), 1);
            let err = r
                .ipv4_lookup("nope.default.svc.cluster.local.")
                .await
                .unwrap_err();
            assert!(err.is_nx_domain(), "tcp={tcp}: {err}");
            let err = r
                .ipv6_lookup("web.default.svc.cluster.local.")
                .await
                .unwrap_err();
            assert!(
                err.is_no_records_found() && !err.is_nx_domain(),
                "NODATA, tcp={tcp}: {err}"
            );
        }
    });
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = repo_path("../shared/dns-corpus/packet");
    assert!(
        dir.is_dir(),
        "the DNS packet corpus is missing at {}: it ships in shared/dns-corpus",
        dir.display()
    );
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pkt"))
        .collect();
    files.sort();
    let packets: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(packets.len() > 9000, "corpus has {} packets", packets.len());
    packets
}

/// Messages the server must answer: a header that is not a response.
fn expects_reply(p: &[u8]) -> bool {
    p.len() >= 12 && p[2] & 0x80 == 0
}

/// UDP, one packet at a time so each reply is matched to its packet;
/// returns how many were answered.
fn replay_udp(addr: SocketAddr, packets: &[Vec<u8>], deadline: Instant) -> usize {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut replies = 0;
    for p in packets {
        assert!(Instant::now() < deadline, "UDP replay took too long");
        if p.len() > 65507 {
            continue; // cannot be sent as one IPv4 datagram
        }
        sock.send_to(p, addr).unwrap();
        if !expects_reply(p) {
            continue;
        }
        sock.recv(&mut buf).unwrap_or_else(|_| {
            panic!("no UDP reply to a packet with a header: {:02x?}", &p[..12])
        });
        assert_eq!(&buf[..2], &p[..2], "reply carries the query's ID");
        replies += 1;
    }
    replies
}

/// TCP: every packet pipelined on one connection; replies come in order.
/// Returns how many were answered.
fn replay_tcp(addr: SocketAddr, packets: &[Vec<u8>]) -> usize {
    let mut rd = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    rd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut wr = rd.try_clone().unwrap();
    let to_send = packets.to_vec();
    let writer = std::thread::spawn(move || {
        for p in &to_send {
            wr.write_all(&framed(p)).unwrap();
        }
        wr
    });
    let mut replies = 0;
    for p in packets.iter().filter(|p| expects_reply(p)) {
        let got = read_frame(&mut rd).expect("TCP reply in time");
        assert_eq!(&got[..2], &p[..2], "TCP reply in order with the query's ID");
        replies += 1;
    }
    drop(writer.join().unwrap());
    replies
}

#[test]
fn corpus_replay_over_udp_and_tcp_leaves_the_server_answering() {
    let b = start("udp_sockets = 2\ntcp_idle_timeout = \"5s\"");
    let packets = corpus();
    let deadline = Instant::now() + Duration::from_secs(120);
    let udp_replies = replay_udp(b.dns, &packets, deadline);
    let tcp_replies = replay_tcp(b.dns, &packets);
    // Most of the corpus are responses (silence); the rest must be answered.
    let expected = packets.iter().filter(|p| expects_reply(p)).count();
    assert!(expected > 4000, "{expected} packets with a query header");
    assert_eq!(tcp_replies, expected);
    let too_big_for_udp = packets
        .iter()
        .filter(|p| expects_reply(p) && p.len() > 65507)
        .count();
    assert_eq!(udp_replies, expected - too_big_for_udp);
    // Still answering normally.
    let q = query("web.default.svc.cluster.local.", RecordType::A)
        .to_vec()
        .unwrap();
    let reply = udp_ask(b.dns, &q).expect("still answering over UDP");
    let msg = Message::from_vec(&reply).expect("reply parses");
    assert_eq!(a_records(&msg).len(), 1);
    let msg = Message::from_vec(&tcp_ask(b.dns, &q)).expect("reply parses");
    assert_eq!(a_records(&msg).len(), 1);
}
