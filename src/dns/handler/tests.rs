//! The handler: fast path against slow path, truncation, protocol rules,
//! who may forward, and the packet corpus through both paths.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use super::*;
use crate::dns::fast::{self, FastCache};
use crate::dns::handler;
use crate::dns::testkit::{LOCAL, big_snapshot, cfg, demo, parse, query};

fn handle(
    h: &Handler,
    snap: &Snapshot,
    bytes: &[u8],
    client: IpAddr,
    proto: Proto,
) -> (Reply, Vec<u8>) {
    let mut out = Vec::new();
    let mut cache = FastCache::new(16 * 1024, 16);
    let reply = h.handle(&mut cache, snap, bytes, client, proto, 0, &mut out);
    (reply, out)
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
    let mut cache = FastCache::new(10_000 * 1024, 10_000);
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
    let mut cache = FastCache::new(100 * 1024, 100);
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

/// The header of every rcode path, byte by byte: QR set, ID and opcode
/// echoed, AA on authoritative zone answers only, TC only when truncated,
/// RD and CD echoed for QUERY and clear for any other opcode (defect 15:
/// NOTIMP echoed RD and CD), RA as configured, Z clear, the rcode.
#[test]
fn the_header_of_every_rcode_path() {
    struct Row {
        what: &'static str,
        bytes: Vec<u8>,
        snap: Snapshot,
        rcode: u8,
        aa: bool,
        tc: bool,
        echo_rd_cd: bool,
    }
    let q = |name: &str, t: RecordType, edns: Option<u16>| {
        let mut m = query(name, t, edns);
        m.metadata.checking_disabled = true; // RD is set by query()
        m
    };
    let bytes = |m: &Message| m.to_vec().unwrap();
    let mut not_ready = demo();
    not_ready.ready = false;
    let mut rows = vec![
        Row {
            what: "NOERROR",
            bytes: bytes(&q("web.default.svc.cluster.local.", RecordType::A, None)),
            snap: demo(),
            rcode: 0,
            aa: true,
            tc: false,
            echo_rd_cd: true,
        },
        Row {
            what: "NXDOMAIN",
            bytes: bytes(&q("nope.default.svc.cluster.local.", RecordType::A, None)),
            snap: demo(),
            rcode: 3,
            aa: true,
            tc: false,
            echo_rd_cd: true,
        },
        Row {
            what: "NODATA",
            bytes: bytes(&q("web.default.svc.cluster.local.", RecordType::TXT, None)),
            snap: demo(),
            rcode: 0,
            aa: true,
            tc: false,
            echo_rd_cd: true,
        },
        Row {
            what: "REFUSED",
            bytes: bytes(&q("example.com.", RecordType::A, None)),
            snap: demo(),
            rcode: 5,
            aa: false,
            tc: false,
            echo_rd_cd: true,
        },
        Row {
            what: "SERVFAIL",
            bytes: bytes(&q("web.default.svc.cluster.local.", RecordType::A, None)),
            snap: not_ready,
            rcode: 2,
            aa: true,
            tc: false,
            echo_rd_cd: true,
        },
        Row {
            what: "TC",
            bytes: bytes(&q("big.default.svc.cluster.local.", RecordType::A, None)),
            snap: big_snapshot(),
            rcode: 0,
            aa: true,
            tc: true,
            echo_rd_cd: true,
        },
    ];
    let mut two = q("web.default.svc.cluster.local.", RecordType::A, None);
    two.queries
        .push(Query::query(Name::from_ascii("x.").unwrap(), RecordType::A));
    rows.push(Row {
        what: "FORMERR",
        bytes: bytes(&two),
        snap: demo(),
        rcode: 1,
        aa: false,
        tc: false,
        echo_rd_cd: true,
    });
    let mut garbage = vec![0xAB, 0xCD, 0x01, 0x10, 0, 1, 0, 0, 0, 0, 0, 0];
    garbage.extend_from_slice(&[0xC0, 0xFF, 0, 1]);
    rows.push(Row {
        what: "FORMERR (header only)",
        bytes: garbage,
        snap: demo(),
        rcode: 1,
        aa: false,
        tc: false,
        echo_rd_cd: true,
    });
    let mut badvers = q("web.default.svc.cluster.local.", RecordType::A, Some(1232));
    badvers.edns.as_mut().unwrap().set_version(1);
    // BADVERS is 16: 0 in the header, the upper bits in the OPT record.
    rows.push(Row {
        what: "BADVERS",
        bytes: bytes(&badvers),
        snap: demo(),
        rcode: 0,
        aa: false,
        tc: false,
        echo_rd_cd: true,
    });
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut m = q("web.default.svc.cluster.local.", RecordType::A, None);
        m.metadata.op_code = op;
        rows.push(Row {
            what: "NOTIMP",
            bytes: bytes(&m),
            snap: demo(),
            rcode: 4,
            aa: false,
            tc: false,
            echo_rd_cd: false,
        });
    }
    let h = handler(&cfg()).unwrap();
    for r in rows {
        let (reply, out) = handle(&h, &r.snap, &r.bytes, LOCAL, Proto::Udp);
        assert!(matches!(reply, Reply::Send { .. }), "{}: {reply:?}", r.what);
        let (b2, b3) = (out[2], out[3]);
        assert_eq!(&out[..2], &r.bytes[..2], "{}: id", r.what);
        assert_eq!(b2 & 0x80, 0x80, "{}: QR", r.what);
        assert_eq!(b2 & 0x78, r.bytes[2] & 0x78, "{}: opcode", r.what);
        assert_eq!(b2 & 0x04 != 0, r.aa, "{}: AA", r.what);
        assert_eq!(b2 & 0x02 != 0, r.tc, "{}: TC", r.what);
        let rd = r.bytes[2] & 0x01 != 0;
        let cd = r.bytes[3] & 0x10 != 0;
        assert!(rd, "{}: the request sets RD", r.what);
        assert_eq!(b2 & 0x01 != 0, r.echo_rd_cd && rd, "{}: RD", r.what);
        if r.what != "FORMERR (header only)" {
            assert!(cd, "{}: the request sets CD", r.what);
            assert_eq!(b3 & 0x10 != 0, r.echo_rd_cd && cd, "{}: CD", r.what);
        }
        assert_eq!(b3 & 0x80, 0, "{}: RA (no forwarder)", r.what);
        assert_eq!(b3 & 0x40, 0, "{}: Z", r.what);
        assert_eq!(b3 & 0x0F, r.rcode, "{}: rcode", r.what);
    }
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
    let mut cache = FastCache::new(1000 * 1024, 1000);
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

/// Defect 7: a flood of distinct negative names stays in the small negative
/// LRU and never pushes out cached answers; answers stay within the bytes.
#[test]
fn the_fast_cache_is_bounded_and_a_negative_flood_keeps_the_answers() {
    let h = handler(&cfg()).unwrap();
    let snap = big_snapshot();
    let mut cache = FastCache::new(64 * 1024, 128);
    let mut out = Vec::new();
    let mut ask = |cache: &mut FastCache, name: &str| {
        let bytes = query(name, RecordType::A, None).to_vec().unwrap();
        h.handle(cache, &snap, &bytes, LOCAL, Proto::Udp, 0, &mut out);
        bytes
    };
    let web = ask(&mut cache, "web.default.svc.cluster.local.");
    for i in 0..20_000 {
        ask(&mut cache, &format!("flood-{i}.default.svc.cluster.local."));
    }
    assert!(cache.len() <= 1 + 128, "{} entries", cache.len());
    let q = fast::parse(&web, Proto::Udp).unwrap();
    assert!(
        cache.get(q.key()).is_some(),
        "the answer survived the flood"
    );
    // Distinct answers past the budget start over instead of growing.
    for i in 0..2_000 {
        let name = format!("10-1-0-{}.db.prod.svc.cluster.local.", i % 4 + 1);
        ask(&mut cache, &name);
        assert!(cache.bytes() <= 64 * 1024);
    }
}
