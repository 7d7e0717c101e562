//! Handler and in-process server tests: fast path against slow path,
//! protocol rules, UDP/TCP serving, malformed input, forwarding, freshness,
//! and real `dig`/`dnsmasq`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::answer::tests::{demo, ep, service};
use super::fast::{self, FastCache};
use super::*;
use crate::config::DnsConfig;
use crate::model::Snapshot;
use crate::registry::Reader;

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn cfg() -> DnsConfig {
    DnsConfig {
        enabled: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        zone: "cluster.local".into(),
        ttl: 5,
        forward: Vec::new(),
        forward_allow: vec!["127.0.0.0/8".parse().unwrap()],
        cache_size: 100,
        udp_sockets: 2,
        forward_timeout: Duration::from_millis(600),
        tcp_idle_timeout: Duration::from_secs(5),
        tcp_max_connections: 64,
    }
}

/// demo() plus `big`: a headless service with 60 healthy endpoints.
fn big_snapshot() -> Snapshot {
    let mut snap = demo();
    let eps = (0..60)
        .map(|i| {
            ep(Box::leak(
                format!("10.9.{}.{}", i / 200, i % 200 + 1).into_boxed_str(),
            ))
        })
        .collect();
    let big = service("default", "big", None, eps);
    snap.services.insert(big.key().clone(), Arc::new(big));
    snap
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        msg.edns = Some(e);
    }
    msg
}

fn handle(
    h: &Handler,
    snap: &Snapshot,
    bytes: &[u8],
    client: IpAddr,
    proto: Proto,
) -> (Reply, Vec<u8>) {
    let mut out = Vec::new();
    let mut cache = FastCache::new(16);
    let reply = h.handle(&mut cache, snap, bytes, client, proto, 0, &mut out);
    (reply, out)
}

fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).expect("reply parses")
}

/// Flips the case of letters by a bit pattern.
fn recase(name: &str, pattern: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if pattern >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

#[test]
fn fast_path_is_byte_identical_to_slow_path() {
    let h = handler(&cfg()).unwrap();
    let snap = big_snapshot();
    let names = [
        "web.default.svc.cluster.local.",
        "db.prod.svc.cluster.local.",
        "big.default.svc.cluster.local.",
        "db-0.db.prod.svc.cluster.local.",
        "10-1-0-4.db.prod.svc.cluster.local.",
        "v6.prod.svc.cluster.local.",
        "_http._tcp.db.prod.svc.cluster.local.",
        "_dns._udp.web.default.svc.cluster.local.",
        "nope.default.svc.cluster.local.",
        "empty.prod.svc.cluster.local.",
        "prod.svc.cluster.local.",
        "cluster.local.",
        "dns-version.cluster.local.",
        "ns.dns.cluster.local.",
        "1.0.1.10.in-addr.arpa.",
        "10.0.96.10.in-addr.arpa.",
        "example.com.",
    ];
    let qtypes = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::PTR,
        RecordType::TXT,
        RecordType::SOA,
        RecordType::NS,
        RecordType::ANY,
        RecordType::MX,
    ];
    let mut cache = FastCache::new(10_000);
    let (mut compared, mut fast_hits) = (0, 0);
    for (i, name) in names.iter().enumerate() {
        for qtype in qtypes {
            for edns in [None, Some(512), Some(1232), Some(4096)] {
                for proto in [Proto::Udp, Proto::Tcp] {
                    for variant in 0..6u64 {
                        let pattern = variant.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64;
                        let mut msg = query(&recase(name, pattern), qtype, edns);
                        msg.metadata.id = (variant * 7919 + i as u64) as u16;
                        msg.metadata.recursion_desired = variant % 2 == 0;
                        msg.metadata.checking_disabled = variant % 3 == 0;
                        let bytes = msg.to_vec().unwrap();
                        let rotate = (variant as usize) * 13 + i;
                        let mut slow = Vec::new();
                        let slow_reply = h.slow(&snap, &bytes, LOCAL, proto, rotate, &mut slow);
                        // Twice: once filling the cache, once from it.
                        for _ in 0..2 {
                            let mut out = Vec::new();
                            let reply =
                                h.handle(&mut cache, &snap, &bytes, LOCAL, proto, rotate, &mut out);
                            match (&slow_reply, &reply) {
                                (Reply::Forward(_), Reply::Forward(_))
                                | (Reply::Drop, Reply::Drop) => {}
                                (Reply::Send { rcode: a, .. }, Reply::Send { rcode: b, .. }) => {
                                    assert_eq!(a, b);
                                    assert_eq!(
                                        out, slow,
                                        "{name} {qtype} edns={edns:?} {proto:?} variant={variant}"
                                    );
                                    compared += 1;
                                }
                                (a, b) => panic!("{name} {qtype}: slow {a:?} vs fast {b:?}"),
                            }
                        }
                        if fast::parse(&bytes, proto).is_some_and(|q| cache.get(q.key()).is_some())
                        {
                            fast_hits += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(compared > 5000, "compared {compared}");
    assert!(fast_hits > 3000, "the fast path served {fast_hits}");
}

#[test]
fn fast_path_rotates_answers_and_echoes_case() {
    let h = handler(&cfg()).unwrap();
    let snap = demo();
    let mut cache = FastCache::new(100);
    let bytes = query("DB.prod.SVC.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut firsts = std::collections::HashSet::new();
    for rotate in 0..3 {
        let mut out = Vec::new();
        h.handle(
            &mut cache,
            &snap,
            &bytes,
            LOCAL,
            Proto::Udp,
            rotate,
            &mut out,
        );
        let msg = parse(&out);
        assert_eq!(msg.metadata.id, 0x1234);
        assert!(msg.metadata.authoritative);
        assert!(msg.metadata.recursion_desired);
        assert_eq!(msg.queries[0].name.to_ascii(), "DB.prod.SVC.cluster.local.");
        assert_eq!(msg.answers.len(), 3);
        for a in &msg.answers {
            assert_eq!(a.name.to_ascii(), "DB.prod.SVC.cluster.local.");
        }
        firsts.insert(format!("{:?}", msg.answers[0].data));
    }
    assert_eq!(firsts.len(), 3, "each rotation starts with another address");
    assert_eq!(cache.len(), 1);
}

#[test]
fn truncation_without_edns_and_full_answer_with_edns_or_tcp() {
    let h = handler(&cfg()).unwrap();
    let snap = big_snapshot();
    let name = "big.default.svc.cluster.local.";
    let (_, out) = handle(
        &h,
        &snap,
        &query(name, RecordType::A, None).to_vec().unwrap(),
        LOCAL,
        Proto::Udp,
    );
    let msg = parse(&out);
    assert!(out.len() <= 512);
    assert!(msg.metadata.truncation, "TC over 512 bytes without EDNS");
    assert!(msg.answers.is_empty());
    assert_eq!(msg.queries.len(), 1);
    let (_, out) = handle(
        &h,
        &snap,
        &query(name, RecordType::A, Some(4096)).to_vec().unwrap(),
        LOCAL,
        Proto::Udp,
    );
    let msg = parse(&out);
    assert!(out.len() <= 1232);
    assert!(!msg.metadata.truncation);
    assert_eq!(msg.answers.len(), 60);
    assert_eq!(
        msg.edns.as_ref().unwrap().max_payload(),
        1232,
        "our payload is capped"
    );
    let (_, out) = handle(
        &h,
        &snap,
        &query(name, RecordType::A, None).to_vec().unwrap(),
        LOCAL,
        Proto::Tcp,
    );
    let msg = parse(&out);
    assert!(!msg.metadata.truncation);
    assert_eq!(msg.answers.len(), 60);
    assert!(msg.edns.is_none(), "no OPT in reply to a query without one");
}

fn rcode_of(h: &Handler, bytes: &[u8], client: IpAddr) -> (ResponseCode, Message) {
    match handle(h, &demo(), bytes, client, Proto::Udp) {
        (Reply::Send { rcode, .. }, out) => {
            let msg = parse(&out);
            // BADVERS and BADSIG share code 16; hickory decodes it as BADSIG.
            assert_eq!(u16::from(msg.metadata.response_code), u16::from(rcode));
            assert_eq!(&out[..2], &bytes[..2], "same ID");
            assert_eq!(msg.metadata.message_type, MessageType::Response);
            (rcode, msg)
        }
        (other, _) => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn protocol_errors() {
    let h = handler(&cfg()).unwrap();
    // Unknown EDNS version.
    let mut msg = query("web.default.svc.cluster.local.", RecordType::A, Some(1232));
    msg.edns.as_mut().unwrap().set_version(1);
    let (rcode, reply) = rcode_of(&h, &msg.to_vec().unwrap(), LOCAL);
    assert_eq!(rcode, ResponseCode::BADVERS);
    assert_eq!(reply.edns.as_ref().unwrap().version(), 0);
    // Unknown opcodes.
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut msg = query("web.default.svc.cluster.local.", RecordType::A, None);
        msg.metadata.op_code = op;
        assert_eq!(
            rcode_of(&h, &msg.to_vec().unwrap(), LOCAL).0,
            ResponseCode::NotImp
        );
    }
    // Two questions, and none.
    let mut msg = query("web.default.svc.cluster.local.", RecordType::A, None);
    msg.queries
        .push(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
    assert_eq!(
        rcode_of(&h, &msg.to_vec().unwrap(), LOCAL).0,
        ResponseCode::FormErr
    );
    let mut msg = query("web.default.svc.cluster.local.", RecordType::A, None);
    msg.queries.clear();
    assert_eq!(
        rcode_of(&h, &msg.to_vec().unwrap(), LOCAL).0,
        ResponseCode::FormErr
    );
    // A header and garbage.
    let mut bytes = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    bytes.extend_from_slice(&[0xC0, 0xFF, 0, 1]);
    let (rcode, _) = rcode_of(&h, &bytes, LOCAL);
    assert_eq!(rcode, ResponseCode::FormErr);
    // No header, or a response: silence.
    assert!(matches!(
        handle(&h, &demo(), &[1, 2, 3], LOCAL, Proto::Udp).0,
        Reply::Drop
    ));
    let mut msg = query("web.default.svc.cluster.local.", RecordType::A, None);
    msg.metadata.message_type = MessageType::Response;
    assert!(matches!(
        handle(&h, &demo(), &msg.to_vec().unwrap(), LOCAL, Proto::Udp).0,
        Reply::Drop
    ));
    // Zone transfers are refused.
    let msg = query("cluster.local.", RecordType::AXFR, None);
    assert_eq!(
        rcode_of(&h, &msg.to_vec().unwrap(), LOCAL).0,
        ResponseCode::Refused
    );
}

#[test]
fn forwarding_only_for_allowed_clients_and_with_upstreams() {
    let bytes = query("example.com.", RecordType::A, None).to_vec().unwrap();
    // No upstream: REFUSED even for loopback.
    let h = handler(&cfg()).unwrap();
    assert_eq!(rcode_of(&h, &bytes, LOCAL).0, ResponseCode::Refused);
    let mut c = cfg();
    c.forward = vec!["127.0.0.1:9".parse().unwrap()];
    let h = handler(&c).unwrap();
    let outsider: IpAddr = "192.0.2.1".parse().unwrap();
    let (rcode, msg) = rcode_of(&h, &bytes, outsider);
    assert_eq!(rcode, ResponseCode::Refused);
    assert!(!msg.metadata.authoritative);
    assert!(matches!(
        handle(&h, &demo(), &bytes, LOCAL, Proto::Udp).0,
        Reply::Forward(_)
    ));
    let mapped: IpAddr = "::ffff:127.0.0.5".parse().unwrap();
    assert!(matches!(
        handle(&h, &demo(), &bytes, mapped, Proto::Udp).0,
        Reply::Forward(_)
    ));
    // Names in the zone never go upstream, whoever asks.
    let zone_q = query("nope.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    assert_eq!(rcode_of(&h, &zone_q, outsider).0, ResponseCode::NXDomain);
}

// === in-process server ===

struct Running {
    server: Option<DnsServer>,
    shutdown: CancellationToken,
    addr: SocketAddr,
}

impl Running {
    async fn stop(mut self) {
        self.shutdown.cancel();
        let server = self.server.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.join())
            .await
            .expect("dns server stops within 5 s of shutdown");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(cfg: DnsConfig, reader: Reader) -> Running {
    let shutdown = CancellationToken::new();
    let server = spawn(&cfg, reader, shutdown.clone())
        .await
        .expect("dns binds");
    let addr = server.local_addr;
    assert_ne!(addr.port(), 0);
    Running {
        server: Some(server),
        shutdown,
        addr,
    }
}

async fn udp_ask(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf[..n].to_vec())
}

async fn tcp_ask(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    s.write_all(&framed).await.unwrap();
    read_frame(&mut s).await.expect("a tcp reply")
}

async fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let fut = async {
        let len = s.read_u16().await.ok()?;
        let mut body = vec![0u8; usize::from(len)];
        s.read_exact(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .ok()?
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_udp_and_tcp_on_the_same_port() {
    let run = start(cfg(), Reader::fixed(demo())).await;
    let q = query("Web.Default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    for _ in 0..20 {
        // Several SO_REUSEPORT sockets share the port; every one answers.
        let msg = parse(&udp_ask(run.addr, &q).await.expect("udp reply"));
        assert_eq!(
            a_records(&msg),
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(
            msg.answers[0].name.to_ascii(),
            "Web.Default.svc.cluster.local."
        );
    }
    let msg = parse(&tcp_ask(run.addr, &q).await);
    assert_eq!(a_records(&msg).len(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_error_is_reported_at_startup() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut c = cfg();
    c.listen = taken.local_addr().unwrap();
    let err = spawn(&c, Reader::fixed(demo()), CancellationToken::new())
        .await
        .err();
    assert!(matches!(err, Some(DnsError::Bind { .. })), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pipelining_idle_timeout_and_connection_cap() {
    let mut c = cfg();
    c.tcp_idle_timeout = Duration::from_millis(300);
    c.tcp_max_connections = 2;
    let run = start(c, Reader::fixed(demo())).await;
    // Three queries in one write; three answers, each with its ID.
    let mut s = TcpStream::connect(run.addr).await.unwrap();
    let mut wire = Vec::new();
    for (id, name) in [(1u16, "web"), (2, "db"), (3, "nope")] {
        let mut q = query(
            &format!("{name}.default.svc.cluster.local."),
            RecordType::A,
            None,
        );
        q.metadata.id = id;
        let b = q.to_vec().unwrap();
        wire.extend_from_slice(&(b.len() as u16).to_be_bytes());
        wire.extend_from_slice(&b);
    }
    s.write_all(&wire).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            parse(&read_frame(&mut s).await.expect("pipelined reply"))
                .metadata
                .id,
        );
    }
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    // A second connection works; a third is over the cap and closed.
    let mut s2 = TcpStream::connect(run.addr).await.unwrap();
    let q = query("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s2.write_all(&framed).await.unwrap();
    assert!(read_frame(&mut s2).await.is_some());
    let mut s3 = TcpStream::connect(run.addr).await.unwrap();
    let _ = s3.write_all(&framed).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s3.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "over the cap: closed without a reply"
    );
    // Idle connections are closed after the timeout.
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("idle close");
    assert!(matches!(n, Ok(0) | Err(_)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "closed too early: {waited:?}"
    );
    drop((s2, s3));
    run.stop().await;
}

fn corpus_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/dns-corpus/packet");
    assert!(
        dir.is_dir(),
        "the DNS packet corpus is missing at {}: it ships in shared/dns-corpus",
        dir.display()
    );
    dir
}

fn corpus() -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
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

#[test]
fn corpus_through_the_handler_never_panics_and_keeps_ids() {
    let mut c = cfg();
    c.forward = vec!["127.0.0.1:9".parse().unwrap()];
    let h = handler(&c).unwrap();
    let snap = big_snapshot();
    let mut cache = FastCache::new(1000);
    for p in corpus() {
        for proto in [Proto::Udp, Proto::Tcp] {
            let mut out = Vec::new();
            let reply = h.handle(&mut cache, &snap, &p, LOCAL, proto, p.len(), &mut out);
            match reply {
                Reply::Send { .. } => {
                    assert!(expects_reply(&p));
                    assert_eq!(&out[..2], &p[..2]);
                    assert!(out[2] & 0x80 != 0, "QR set");
                    if proto == Proto::Udp {
                        assert!(out.len() <= 1232);
                    }
                }
                Reply::Forward(_) => assert!(expects_reply(&p)),
                Reply::Drop => assert!(!expects_reply(&p)),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_replay_over_udp_and_tcp_leaves_the_server_answering() {
    let run = start(cfg(), Reader::fixed(big_snapshot())).await;
    let packets = corpus();
    let deadline = Instant::now() + Duration::from_secs(120);
    // UDP, one at a time so each reply is matched to its packet.
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 65536];
    let mut udp_replies = 0;
    for p in &packets {
        assert!(Instant::now() < deadline, "UDP replay took too long");
        if p.len() > 65507 {
            continue; // cannot be sent as one IPv4 datagram
        }
        sock.send_to(p, run.addr).await.unwrap();
        if !expects_reply(p) {
            continue;
        }
        let _n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no UDP reply to a packet with a header: {:02x?}", &p[..12]))
            .unwrap();
        assert_eq!(&buf[..2], &p[..2], "reply carries the query's ID");
        udp_replies += 1;
    }
    // TCP: every packet pipelined on one connection; replies come in order.
    let stream = TcpStream::connect(run.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let to_send = packets.clone();
    let writer = tokio::spawn(async move {
        for p in &to_send {
            let mut framed = (p.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(p);
            wr.write_all(&framed).await.unwrap();
        }
        wr
    });
    let mut tcp_replies = 0;
    for p in packets.iter().filter(|p| expects_reply(p)) {
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            let len = rd.read_u16().await?;
            let mut body = vec![0u8; usize::from(len)];
            rd.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        })
        .await
        .expect("TCP reply in time")
        .expect("TCP reply");
        assert_eq!(&got[..2], &p[..2], "TCP reply in order with the query's ID");
        tcp_replies += 1;
    }
    drop(writer.await.unwrap());
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
    let q = query("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let msg = parse(
        &udp_ask(run.addr, &q)
            .await
            .expect("still answering over UDP"),
    );
    assert_eq!(a_records(&msg).len(), 1);
    let msg = parse(&tcp_ask(run.addr, &q).await);
    assert_eq!(a_records(&msg).len(), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_or_removed_endpoint_leaves_answers_within_100ms() {
    use crate::model::{Endpoint, ProbeState, ServiceKey, ServiceSpec};
    use crate::registry::{HealthChange, Update};
    let shutdown = CancellationToken::new();
    let source: crate::model::SourceId = "test".into();
    let (handle, mut reader, _task) = crate::registry::spawn(
        vec![source.clone()],
        Duration::from_secs(5),
        shutdown.clone(),
    );
    let key = ServiceKey::new("default", "web");
    let mut spec = ServiceSpec::new(key.clone());
    spec.endpoints = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .map(|ip| Endpoint::new(ip.parse().unwrap()))
        .collect();
    assert!(
        handle
            .source(&source, Update::Reset(vec![spec.clone()]))
            .await
    );
    reader.ready().await.unwrap();
    let run = start(cfg(), reader).await;
    let q = query("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let answer = || async { a_records(&parse(&udp_ask(run.addr, &q).await.expect("reply"))) };
    assert_eq!(answer().await.len(), 3);
    let gone: IpAddr = "127.0.0.12".parse().unwrap();
    // Unhealthy.
    let started = Instant::now();
    let down = HealthChange::Probe(ProbeState::Down("probe failed".into()));
    assert!(handle.health(key.clone(), gone, down).await);
    loop {
        let ips = answer().await;
        if !ips.contains(&gone) {
            assert_eq!(ips.len(), 2);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "still answered after 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Removed.
    let removed: IpAddr = "127.0.0.13".parse().unwrap();
    spec.endpoints.retain(|e| e.ip != removed);
    let started = Instant::now();
    assert!(handle.source(&source, Update::Upsert(Box::new(spec))).await);
    loop {
        let ips = answer().await;
        if !ips.contains(&removed) {
            assert_eq!(ips, vec!["127.0.0.11".parse::<IpAddr>().unwrap()]);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "still answered after 100 ms"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    run.stop().await;
    shutdown.cancel();
}

// === forwarding ===

/// A fake upstream: answers A queries with 192.0.2.7 and `ttl`, counts
/// queries, and goes silent when `silent` is set.
struct FakeUpstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    silent: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

async fn fake_upstream(ttl: u32) -> FakeUpstream {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (q2, s2) = (queries.clone(), silent.clone());
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            q2.fetch_add(1, Ordering::SeqCst);
            if s2.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            resp.metadata.recursion_available = true;
            resp.queries = req.queries.clone();
            let name = req.queries[0].name.clone();
            resp.answers.push(Record::from_rdata(
                name,
                ttl,
                RData::A(A("192.0.2.7".parse().unwrap())),
            ));
            let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
        }
    });
    FakeUpstream {
        addr,
        queries,
        silent,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_caches_and_serves_stale_when_upstreams_fail() {
    let up = fake_upstream(1).await;
    let mut c = cfg();
    c.forward = vec![up.addr];
    let run = start(c, Reader::fixed(demo())).await;
    let mut q = query("Example.COM.", RecordType::A, Some(1232));
    q.metadata.id = 77;
    let bytes = q.to_vec().unwrap();
    let msg = parse(&udp_ask(run.addr, &bytes).await.expect("forwarded reply"));
    assert_eq!(msg.metadata.id, 77);
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert!(msg.metadata.recursion_available);
    assert!(!msg.metadata.authoritative);
    assert_eq!(msg.queries[0].name.to_ascii(), "Example.COM.");
    assert_eq!(
        a_records(&msg),
        vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
    );
    // Cached: the upstream is not asked again within the TTL (also over TCP).
    let _ = parse(&tcp_ask(run.addr, &bytes).await);
    assert_eq!(up.queries.load(Ordering::SeqCst), 1);
    // Upstream goes silent and the entry expires: served stale, TTL 30.
    up.silent.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    let msg = parse(&udp_ask(run.addr, &bytes).await.expect("stale reply"));
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        a_records(&msg),
        vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(msg.answers[0].ttl, 30);
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert!(
        up.queries.load(Ordering::SeqCst) >= 2,
        "upstream was tried first"
    );
    // A name never seen: SERVFAIL within the forward timeout, not a hang.
    let started = Instant::now();
    let other = query("other.example.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let msg = parse(&udp_ask(run.addr, &other).await.expect("servfail reply"));
    assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    up.task.abort();
    run.stop().await;
}

// === real clients: dig and dnsmasq ===

fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["+tries=1", "+time=3"])
        .args(args)
        .output()
        .expect("dig must be installed (apt-get install bind9-dnsutils)");
    // One space between fields, lines kept: dig aligns with tabs and spaces.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn dig_async(addr: SocketAddr, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        dig(addr, &args)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_sees_the_zone() {
    let run = start(cfg(), Reader::fixed(big_snapshot())).await;
    let a = run.addr;
    let out = dig_async(a, &["nope.default.svc.cluster.local", "A"]).await;
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("flags: qr aa rd"), "{out}");
    assert!(
        out.contains("cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local."),
        "{out}"
    );
    let out = dig_async(a, &["web.default.svc.cluster.local", "AAAA"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(
        out.contains("ANSWER: 0, AUTHORITY: 1"),
        "NODATA with SOA: {out}"
    );
    assert!(out.contains("IN SOA"), "{out}");
    // 60 endpoints: truncated over UDP without EDNS, dig retries over TCP.
    let out = dig_async(a, &["+noedns", "big.default.svc.cluster.local", "A"]).await;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 60"), "{out}");
    assert_eq!(out.matches(" IN A 10.9.").count(), 60, "{out}");
    let out = dig_async(a, &["_http._tcp.db.prod.svc.cluster.local", "SRV"]).await;
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
    let out = dig_async(a, &["-x", "10.1.0.1"]).await;
    assert!(
        out.contains("IN PTR db-0.db.prod.svc.cluster.local."),
        "{out}"
    );
    let out = dig_async(a, &["DB-0.Db.PROD.svc.cluster.LOCAL", "A"]).await;
    assert!(
        out.contains("DB-0.Db.PROD.svc.cluster.LOCAL. 5 IN A 10.1.0.1"),
        "case echoed: {out}"
    );
    let out = dig_async(a, &["+tcp", "dns-version.cluster.local", "TXT"]).await;
    assert!(out.contains("\"1.1.0\""), "{out}");
    let out = dig_async(a, &["example.com", "A"]).await;
    assert!(
        out.contains("status: REFUSED"),
        "no upstream configured: {out}"
    );
    run.stop().await;
}

/// A loopback port free for both UDP and TCP right now.
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// dnsmasq answering `*.test.example` with 127.0.0.99 on a free port; a few
/// tries, since another process may take the port between check and bind.
async fn start_dnsmasq() -> (std::process::Child, SocketAddr) {
    let probe = query("up.test.example.", RecordType::A, None)
        .to_vec()
        .unwrap();
    for _ in 0..5 {
        let port = free_port();
        let mut child = std::process::Command::new("dnsmasq")
            .args([
                "--no-daemon",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--address=/test.example/127.0.0.99",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq must be installed (apt-get install dnsmasq)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 4096];
        for _ in 0..30 {
            if child.try_wait().unwrap().is_some() {
                break; // exited: the port was taken; try another
            }
            sock.send_to(&probe, addr).await.unwrap();
            let got = tokio::time::timeout(Duration::from_millis(100), sock.recv(&mut buf)).await;
            if matches!(got, Ok(Ok(_))) {
                return (child, addr);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("dnsmasq did not start in 5 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_forwarding_through_dnsmasq_and_refused_for_outsiders() {
    let (mut dnsmasq, upstream) = start_dnsmasq().await;
    let mut c = cfg();
    c.forward = vec![upstream];
    let run = start(c.clone(), Reader::fixed(demo())).await;
    let out = dig_async(run.addr, &["www.test.example", "A"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(out.contains(" IN A 127.0.0.99"), "{out}");
    assert!(out.contains("flags: qr rd ra;"), "{out}");
    let out = dig_async(run.addr, &["+tcp", "www.test.example", "A"]).await;
    assert!(out.contains(" IN A 127.0.0.99"), "{out}");
    // Zone names still come from the snapshot.
    let out = dig_async(run.addr, &["web.default.svc.cluster.local", "A"]).await;
    assert!(out.contains("10.96.0.10"), "{out}");
    run.stop().await;
    // A server whose allow-list excludes loopback refuses to forward.
    c.forward_allow = vec!["10.0.0.0/8".parse::<IpNet>().unwrap()];
    let run = start(c, Reader::fixed(demo())).await;
    let out = dig_async(run.addr, &["www.test.example", "A"]).await;
    assert!(out.contains("status: REFUSED"), "{out}");
    run.stop().await;
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
}

// === hickory client ===

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hickory_resolver_gets_the_zone_over_udp_and_tcp() {
    let run = start(cfg(), Reader::fixed(big_snapshot())).await;
    for tcp in [false, true] {
        let r = resolver(run.addr, tcp);
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
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_client_that_never_reads_loses_its_slot() {
    let mut c = cfg();
    c.tcp_idle_timeout = Duration::from_millis(300);
    c.tcp_max_connections = 1;
    let run = start(c, Reader::fixed(big_snapshot())).await;
    let q = query("big.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let flood: Vec<u8> = framed
        .iter()
        .copied()
        .cycle()
        .take(framed.len() * 20_000)
        .collect();
    let mut stalled = TcpStream::connect(run.addr).await.unwrap();
    // Writes ~1 MB of queries whose ~1 KB answers are never read.
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), stalled.write_all(&flood)).await;
        stalled
    });
    let started = Instant::now();
    let mut served = false;
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(mut s) = TcpStream::connect(run.addr).await else {
            continue;
        };
        if s.write_all(&framed).await.is_ok() && read_frame(&mut s).await.is_some() {
            served = true;
            break;
        }
    }
    assert!(served, "the stalled connection still holds the only slot");
    run.stop().await;
    drop(writer.await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_responses_and_durations() {
    // The process-wide recorder: UDP threads are not runtime threads. Other
    // tests count too, so compare MX counts (no other test sends MX to a
    // server) before and after.
    let handle = crate::telemetry::metrics();
    let value = |series: &str| -> f64 {
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let udp_mx = r#"beacon_dns_requests_total{proto="udp",qtype="MX"}"#;
    let tcp_mx = r#"beacon_dns_requests_total{proto="tcp",qtype="MX"}"#;
    let noerror = r#"beacon_dns_responses_total{rcode="NOERROR"}"#;
    let nx = r#"beacon_dns_responses_total{rcode="NXDOMAIN"}"#;
    let before = [value(udp_mx), value(tcp_mx), value(noerror), value(nx)];
    let run = start(cfg(), Reader::fixed(demo())).await;
    let mx = query("web.default.svc.cluster.local.", RecordType::MX, None)
        .to_vec()
        .unwrap();
    let mx_nx = query("nope.default.svc.cluster.local.", RecordType::MX, None)
        .to_vec()
        .unwrap();
    for _ in 0..3 {
        assert!(udp_ask(run.addr, &mx).await.is_some());
    }
    assert!(udp_ask(run.addr, &mx_nx).await.is_some());
    let _ = tcp_ask(run.addr, &mx).await;
    // UDP threads add their tallies within UDP_POLL of going idle.
    tokio::time::sleep(server::UDP_POLL * 3).await;
    run.stop().await;
    let after = [value(udp_mx), value(tcp_mx), value(noerror), value(nx)];
    assert!(
        after[0] - before[0] >= 4.0,
        "udp MX: {before:?} -> {after:?}"
    );
    assert!(
        after[1] - before[1] >= 1.0,
        "tcp MX: {before:?} -> {after:?}"
    );
    assert!(
        after[2] - before[2] >= 4.0,
        "NOERROR: {before:?} -> {after:?}"
    );
    assert!(
        after[3] - before[3] >= 1.0,
        "NXDOMAIN: {before:?} -> {after:?}"
    );
    assert!(
        handle
            .render()
            .contains("beacon_dns_request_duration_seconds")
    );
}
