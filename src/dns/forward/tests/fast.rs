//! Forwarded answers on the fast path: the fast reply is byte-identical to
//! the forward cache's own `render` for the same query and age, TTLs age,
//! the ACL still applies, and past the prefetch point the slow path (which
//! counts the question and starts the prefetch) answers again.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::super::{CacheEntry, Forwarder, Tuning, key_of};
use crate::dns::fast::{self, FastCache};
use crate::dns::testkit::{LOCAL, demo, parse, query};
use crate::dns::wire::{self, Proto};
use crate::dns::{Handler, Reply, Zone};

fn forwarder(prefetch: u32) -> Arc<Forwarder> {
    let tuning = Tuning {
        prefetch,
        ..Tuning::default()
    };
    let zone = Name::from_ascii("cluster.local.").unwrap();
    Forwarder::new(Vec::new(), zone, Duration::from_secs(1), 100, tuning)
}

fn rec(name: &str, ttl: u32, data: RData) -> Record {
    Record::from_rdata(Name::from_ascii(name).unwrap(), ttl, data)
}

/// Stores `answers`/`authorities` for `name`/`qtype` as if the upstream
/// had answered `age` seconds ago and the entry had been asked `asked` times.
fn store(
    f: &Forwarder,
    name: &str,
    qtype: RecordType,
    rcode: ResponseCode,
    (answers, authorities): (Vec<Record>, Vec<Record>),
    (ttl, age, asked): (u32, Duration, u32),
) {
    let q = query(name, qtype, None).queries[0].clone();
    let entry = CacheEntry {
        rcode,
        answers,
        authorities,
        additionals: Vec::new(),
        stored: Instant::now().checked_sub(age).unwrap(),
        ttl,
        asked,
        refreshing: false,
    };
    f.store(key_of(&wire::lowercase(&q)), entry);
}

fn entry_of(f: &Forwarder, name: &str, qtype: RecordType) -> CacheEntry {
    let q = query(name, qtype, None).queries[0].clone();
    f.cache()[&key_of(&wire::lowercase(&q))].clone()
}

fn soa() -> Record {
    let soa = SOA::new(
        Name::from_ascii("ns.example.org.").unwrap(),
        Name::from_ascii("hostmaster.example.org.").unwrap(),
        1,
        3600,
        600,
        86400,
        60,
    );
    rec("example.org.", 60, RData::SOA(soa))
}

/// The cases: (question as asked, type, rcode, answers, authorities).
type Case = (
    &'static str,
    RecordType,
    ResponseCode,
    Vec<Record>,
    Vec<Record>,
);

fn cases() -> Vec<Case> {
    let a = |ip: &str| RData::A(A(ip.parse().unwrap()));
    vec![
        (
            "www.example.org.",
            RecordType::A,
            ResponseCode::NoError,
            vec![
                rec("www.example.org.", 300, a("192.0.2.1")),
                rec("www.example.org.", 250, a("192.0.2.2")),
            ],
            Vec::new(),
        ),
        (
            "WwW.ExAmple.ORG.",
            RecordType::AAAA,
            ResponseCode::NoError,
            vec![rec(
                "www.example.org.",
                300,
                RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
            )],
            Vec::new(),
        ),
        (
            "Mail.Example.org.",
            RecordType::MX,
            ResponseCode::NoError,
            vec![rec(
                "mail.example.org.",
                900,
                RData::MX(MX::new(10, Name::from_ascii("mx1.example.org.").unwrap())),
            )],
            Vec::new(),
        ),
        (
            "txt.example.org.",
            RecordType::TXT,
            ResponseCode::NoError,
            vec![rec(
                "txt.example.org.",
                120,
                RData::TXT(TXT::new(vec!["v=spf1 -all".into(), "hello".into()])),
            )],
            Vec::new(),
        ),
        (
            "Alias.Example.ORG.",
            RecordType::A,
            ResponseCode::NoError,
            vec![
                rec(
                    "alias.example.org.",
                    600,
                    RData::CNAME(CNAME(Name::from_ascii("edge.example.net.").unwrap())),
                ),
                rec(
                    "edge.example.net.",
                    500,
                    RData::CNAME(CNAME(Name::from_ascii("cdn.Example.NET.").unwrap())),
                ),
                rec("cdn.example.net.", 400, a("198.51.100.9")),
            ],
            Vec::new(),
        ),
        (
            "NoSuch.example.org.",
            RecordType::A,
            ResponseCode::NXDomain,
            Vec::new(),
            vec![soa()],
        ),
        (
            "nodata.example.org.",
            RecordType::AAAA,
            ResponseCode::NoError,
            Vec::new(),
            vec![soa()],
        ),
    ]
}

/// For every case, with and without EDNS, over UDP and TCP, at several
/// ages: the fast reply equals the slow `render` byte for byte, and its
/// TTLs are the stored ones less the age.
#[test]
fn fast_forwarded_replies_equal_the_slow_render_at_every_age() {
    let f = forwarder(2);
    for (name, qtype, rcode, answers, authorities) in cases() {
        let stored = (answers.clone(), authorities.clone());
        store(&f, name, qtype, rcode, stored, (3600, Duration::ZERO, 1));
        for (edns, proto) in [
            (None, Proto::Udp),
            (Some(1232), Proto::Udp),
            (Some(4096), Proto::Tcp),
        ] {
            let mut req = query(name, qtype, edns);
            req.metadata.id = 0xBEEF;
            req.metadata.checking_disabled = edns.is_some();
            let bytes = req.to_vec().unwrap();
            let q = fast::parse(&bytes, proto).expect("a fast-path query");
            let req = Message::from_vec(&bytes).unwrap();
            let (reply, got, template) = f.cached_fast(&req, q.limit()).expect("a cache hit");
            assert_eq!(got, rcode, "{name}");
            let t = template.expect("a template for an entry asked often enough");
            let entry = fast::Entry::forwarded(t.bytes, &q, t.rcode, t.stored, t.until)
                .expect("the template patches exactly");
            let cached = entry_of(&f, name, qtype);
            let age_now = entry
                .age(Instant::now())
                .expect("before the prefetch point");
            let mut out = Vec::new();
            entry.render_aged(&bytes, &q, age_now, &mut out);
            assert_eq!(out, reply, "{name} {edns:?}: fast reply = the hit's reply");
            for age in [0, 1, 59, 119, 301, 100_000] {
                entry.render_aged(&bytes, &q, age, &mut out);
                let (slow, _) = f.render(&req, rcode, Some(&cached), age, q.limit());
                assert_eq!(out, slow, "{name} {edns:?} {proto:?} age {age}");
                let msg = parse(&out);
                assert_eq!(msg.metadata.id, 0xBEEF);
                assert_eq!(msg.metadata.response_code, rcode);
                assert_eq!(msg.queries[0].name.to_ascii(), name, "question as asked");
                let served = msg.answers.iter().chain(&msg.authorities);
                let stored = answers.iter().chain(&authorities);
                for (s, r) in served.zip(stored) {
                    assert_eq!(s.ttl, r.ttl.saturating_sub(age), "{name} age {age}");
                }
                assert_eq!(msg.answers.len(), answers.len());
                assert_eq!(msg.edns.is_some(), edns.is_some());
            }
        }
    }
}

fn handler(f: &Arc<Forwarder>, autopath: bool) -> Handler {
    let zone = Zone::new("cluster.local", 5).unwrap();
    let allow = vec!["127.0.0.0/8".parse().unwrap()];
    Handler::new(zone, allow, Some(f.clone())).with_autopath(autopath)
}

fn ask(h: &Handler, cache: &mut FastCache, bytes: &[u8], client: IpAddr) -> Message {
    let mut out = Vec::new();
    match h.handle(cache, &demo(), bytes, client, Proto::Udp, 0, &mut out) {
        Reply::Send { .. } => parse(&out),
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn a_query(name: &str) -> Vec<u8> {
    query(name, RecordType::A, Some(1232)).to_vec().unwrap()
}

fn a_entry(f: &Forwarder, name: &str, ttl: u32, age: Duration, asked: u32) {
    let answers = vec![rec(name, ttl, RData::A(A("192.0.2.7".parse().unwrap())))];
    let entry = (answers, Vec::new());
    store(
        f,
        name,
        RecordType::A,
        ResponseCode::NoError,
        entry,
        (ttl, age, asked),
    );
}

/// A slow hit leaves the template; later hits come from it (the forward
/// cache is not asked: `asked` stays) with aged TTLs; a client outside
/// forward_allow gets REFUSED even though the answer is in the fast cache.
#[test]
fn fast_forwarded_hits_skip_the_forward_cache_but_not_the_acl() {
    let f = forwarder(2);
    let h = handler(&f, false);
    let mut cache = FastCache::new(64 * 1024, 16);
    let name = "www.example.org.";
    a_entry(&f, name, 300, Duration::from_secs(5), 1);
    let bytes = a_query("WWW.example.org.");
    let first = ask(&h, &mut cache, &bytes, LOCAL);
    assert_eq!(first.answers[0].ttl, 295);
    assert_eq!(entry_of(&f, name, RecordType::A).asked, 2);
    assert_eq!(cache.len(), 1, "the slow hit left its template");
    for _ in 0..3 {
        let again = ask(&h, &mut cache, &bytes, LOCAL);
        assert_eq!(again.answers.len(), 1);
        assert!(again.answers[0].ttl <= 295 && again.answers[0].ttl >= 290);
        assert_eq!(again.queries[0].name.to_ascii(), "WWW.example.org.");
    }
    assert_eq!(entry_of(&f, name, RecordType::A).asked, 2, "fast hits");
    let outsider: IpAddr = "10.1.2.3".parse().unwrap();
    let refused = ask(&h, &mut cache, &bytes, outsider);
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
    assert!(
        refused.answers.is_empty(),
        "no forwarded answer for an outsider"
    );
    // Mapped IPv6 of an allowed client is still allowed.
    let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
    assert_eq!(ask(&h, &mut cache, &bytes, mapped).answers.len(), 1);
}

/// An entry asked fewer times than `prefetch` is served the slow way (each
/// question counts); past the prefetch point too, so the prefetch starts.
#[test]
fn past_the_prefetch_point_the_slow_path_answers_and_counts() {
    let f = forwarder(3);
    let h = handler(&f, false);
    let mut cache = FastCache::new(64 * 1024, 16);
    let name = "soon.example.org.";
    // TTL 20, stored 16 s ago: prefetch point (18 s) 2 s away.
    a_entry(&f, name, 20, Duration::from_secs(16), 1);
    let bytes = a_query(name);
    ask(&h, &mut cache, &bytes, LOCAL);
    assert!(
        cache.is_empty(),
        "asked twice, below prefetch = 3: no template"
    );
    ask(&h, &mut cache, &bytes, LOCAL);
    assert_eq!(cache.len(), 1, "asked 3 times: the template is kept");
    ask(&h, &mut cache, &bytes, LOCAL);
    let e = entry_of(&f, name, RecordType::A);
    assert_eq!(e.asked, 3, "the fast hit did not ask the cache");
    std::thread::sleep(Duration::from_millis(2100));
    let late = ask(&h, &mut cache, &bytes, LOCAL);
    assert_eq!(late.answers[0].ttl, 2);
    let e = entry_of(&f, name, RecordType::A);
    assert_eq!(e.asked, 4, "past the prefetch point the cache is asked");
    assert!(e.refreshing, "and the prefetch is due");
    // Past the prefetch point from the start: never a template.
    let mut cache = FastCache::new(64 * 1024, 16);
    a_entry(&f, "late.example.org.", 20, Duration::from_secs(19), 5);
    ask(&h, &mut cache, &a_query("late.example.org."), LOCAL);
    assert!(cache.is_empty());
}

/// With autopath on, a forwarded NXDOMAIN is never kept on the fast path
/// (as zone NXDOMAINs are not); a positive answer still is.
#[test]
fn autopath_keeps_forwarded_nxdomain_off_the_fast_path() {
    let f = forwarder(2);
    let h = handler(&f, true);
    let mut cache = FastCache::new(64 * 1024, 16);
    let nx = (Vec::new(), vec![soa()]);
    let name = "gone.example.org.";
    store(
        &f,
        name,
        RecordType::A,
        ResponseCode::NXDomain,
        nx,
        (60, Duration::ZERO, 5),
    );
    let reply = ask(&h, &mut cache, &a_query(name), LOCAL);
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(cache.is_empty());
    a_entry(&f, "here.example.org.", 60, Duration::ZERO, 5);
    ask(&h, &mut cache, &a_query("here.example.org."), LOCAL);
    assert_eq!(cache.len(), 1);
}
