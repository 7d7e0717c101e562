//! Forwarding through the running server: the upstream's answer, the
//! cache, serve-stale when the upstream goes silent, SERVFAIL in time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

use super::{Forwarder, Tuning};

mod fast;
use crate::dns::testkit::{a_records, cfg, demo, parse, query, start, tcp_ask, udp_ask};
use crate::registry::Reader;

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

/// A hostile upstream on UDP and TCP (one port): it stuffs records outside
/// the question into its replies, answers NXDOMAIN with a long SOA TTL, and
/// over TCP answers another question than the one asked.
async fn hostile_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use hickory_proto::rr::rdata::SOA;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    let a = |owner: &str, ip: &str| {
        Record::from_rdata(
            hickory_proto::rr::Name::from_ascii(owner).unwrap(),
            300,
            RData::A(A(ip.parse().unwrap())),
        )
    };
    let reply_to = move |req: &Message, over_tcp: bool| -> Message {
        let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
        resp.queries = req.queries.clone();
        let qname = req.queries[0].name.to_ascii().to_ascii_lowercase();
        match qname.as_str() {
            "poison.example." => {
                resp.answers.push(a("poison.example.", "192.0.2.7"));
                resp.answers.push(a("evil.example.net.", "6.6.6.6"));
                resp.answers
                    .push(a("web.default.svc.cluster.local.", "6.6.6.6"));
                resp.additionals
                    .push(a("web.default.svc.cluster.local.", "6.6.6.6"));
            }
            "nx.example." => {
                resp.metadata.response_code = ResponseCode::NXDomain;
                let n = |s: &str| hickory_proto::rr::Name::from_ascii(s).unwrap();
                let soa = SOA::new(n("ns.example."), n("h.example."), 1, 1, 1, 1, 60);
                resp.authorities
                    .push(Record::from_rdata(n("example."), 3600, RData::SOA(soa)));
            }
            _ if !over_tcp => resp.metadata.truncation = true,
            _ => {
                resp.queries[0].name =
                    hickory_proto::rr::Name::from_ascii("other.example.").unwrap();
                resp.answers.push(a("other.example.", "6.6.6.6"));
            }
        }
        resp
    };
    let task = tokio::spawn(async move {
        let tcp_task = tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                if let Some(body) = crate::dns::testkit::read_frame(&mut s).await
                    && let Ok(req) = Message::from_vec(&body)
                {
                    let bytes = reply_to(&req, true).to_vec().unwrap();
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(&crate::dns::testkit::framed(&bytes)).await;
                }
            }
        });
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            if let Ok(req) = Message::from_vec(&buf[..n]) {
                let _ = sock
                    .send_to(&reply_to(&req, false).to_vec().unwrap(), peer)
                    .await;
            }
        }
        tcp_task.abort();
    });
    (addr, task)
}

/// Defect 11: only records on the question's name and its chain are passed
/// on (never one inside beacon's zone), the TCP fallback checks the reply's
/// question, and a negative answer's SOA TTL is capped (RFC 2308).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_upstream_cannot_poison_or_stretch_what_is_served() {
    let (up, task) = hostile_upstream().await;
    let mut c = cfg();
    c.forward = vec![up];
    let run = start(c, Reader::fixed(demo())).await;
    let ask = |name: &str| query(name, RecordType::A, Some(1232)).to_vec().unwrap();
    for _ in 0..2 {
        // The second round is served from the cache: it must be as clean.
        let msg = parse(&udp_ask(run.addr, &ask("poison.example.")).await.unwrap());
        assert_eq!(
            a_records(&msg),
            vec!["192.0.2.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(msg.answers.len(), 1, "{:?}", msg.answers);
        assert!(msg.additionals.is_empty(), "{:?}", msg.additionals);
        let msg = parse(&udp_ask(run.addr, &ask("nx.example.")).await.unwrap());
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(msg.authorities.len(), 1);
        assert!(
            msg.authorities[0].ttl <= 60,
            "SOA TTL {}",
            msg.authorities[0].ttl
        );
    }
    // The zone still answers from the snapshot, not from the upstream.
    let msg = parse(
        &udp_ask(run.addr, &ask("web.default.svc.cluster.local."))
            .await
            .unwrap(),
    );
    assert!(!a_records(&msg).contains(&"6.6.6.6".parse::<IpAddr>().unwrap()));
    // Truncated over UDP, another question over TCP: never served.
    let msg = parse(&udp_ask(run.addr, &ask("tc.example.")).await.unwrap());
    assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);
    assert!(msg.answers.is_empty());
    task.abort();
    run.stop().await;
}

/// An upstream for the slot tests: `slow-*` names are never answered,
/// `wait.example.` after 300 ms, anything else at once (TTL 300); it counts
/// the queries of each kind.
struct SlotUpstream {
    addr: SocketAddr,
    slow: Arc<AtomicUsize>,
    wait: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn slot_upstream() -> SlotUpstream {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    let (slow, wait) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s2, w2) = (slow.clone(), wait.clone());
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let qname = req.queries[0].name.to_ascii();
            if qname.starts_with("slow-") {
                s2.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let delay = if qname == "wait.example." {
                w2.fetch_add(1, Ordering::SeqCst);
                Duration::from_millis(300)
            } else {
                Duration::ZERO
            };
            let sock = sock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
                resp.queries = req.queries.clone();
                let name = req.queries[0].name.clone();
                resp.answers.push(Record::from_rdata(
                    name,
                    300,
                    RData::A(A("192.0.2.9".parse().unwrap())),
                ));
                let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
            });
        }
    });
    SlotUpstream {
        addr,
        slow,
        wait,
        task,
    }
}

/// Sends `count` distinct never-answered names from `ip`, in small bursts
/// (the server's receive buffer must not drop them); returns the socket.
async fn flood_slow(server: SocketAddr, ip: &str, tag: &str, count: usize) -> UdpSocket {
    let sock = UdpSocket::bind(format!("{ip}:0")).await.unwrap();
    for j in 0..count {
        let q = query(&format!("slow-{tag}-{j}.example."), RecordType::A, None);
        sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
        if j % 32 == 31 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    sock
}

/// Defect 12: identical in-flight questions go upstream once; one client
/// cannot take more than its share of the forward slots; and with every
/// slot taken a cached name is still answered (it was SERVFAIL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_slots_are_shared_fairly_and_never_block_cache_hits() {
    let up = slot_upstream().await;
    let mut c = cfg();
    c.forward = vec![up.addr];
    c.forward_allow = vec!["127.0.0.0/8".parse().unwrap()];
    c.forward_timeout = Duration::from_secs(4);
    let run = start(c, Reader::fixed(demo())).await;
    let server = run.addr;
    // Coalescing: 50 clients ask one slow name at once.
    let asks: Vec<_> = (0..50)
        .map(|_| {
            let bytes = query("wait.example.", RecordType::A, None)
                .to_vec()
                .unwrap();
            tokio::spawn(async move { udp_ask(server, &bytes).await })
        })
        .collect();
    for a in asks {
        let msg = parse(&a.await.unwrap().expect("coalesced reply"));
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    }
    assert_eq!(
        up.wait.load(Ordering::SeqCst),
        1,
        "one upstream query for 50 identical questions"
    );
    // Per-client share (4096 / 16 = 256): the 257th in-flight question of
    // one client is SERVFAIL at once, another client still gets a slot.
    let greedy = flood_slow(server, "127.0.0.2", "g", 257).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), greedy.recv(&mut buf))
        .await
        .expect("the question over the share is answered at once")
        .unwrap();
    assert_eq!(
        parse(&buf[..n]).metadata.response_code,
        ResponseCode::ServFail
    );
    let bytes = query("fresh.example.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let msg = parse(
        &udp_ask(server, &bytes)
            .await
            .expect("another client is served"),
    );
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    // Fill the rest of the pool from 15 more clients: 16 x 256 = 4096.
    let mut held = vec![greedy];
    for i in 0..15 {
        held.push(flood_slow(server, &format!("127.0.0.{}", 3 + i), &i.to_string(), 256).await);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while up.slow.load(Ordering::SeqCst) < 4096 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.slow.load(Ordering::SeqCst), 4096, "every slot is taken");
    // The pool is full: a cached name is answered, a new one is not.
    let msg = parse(
        &udp_ask(server, &bytes)
            .await
            .expect("cache hit with a full pool"),
    );
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        a_records(&msg),
        vec!["192.0.2.9".parse::<IpAddr>().unwrap()]
    );
    let other = query("other.example.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let msg = parse(&udp_ask(server, &other).await.unwrap());
    assert_eq!(msg.metadata.response_code, ResponseCode::ServFail);
    drop(held);
    up.task.abort();
    run.stop().await;
}

/// An upstream answering every A question with 192.0.2.8 and `ttl`,
/// counting the questions per name.
async fn counting_upstream(
    ttl: u32,
) -> (
    SocketAddr,
    Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    tokio::task::JoinHandle<()>,
) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let seen2 = seen.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let name = req.queries[0].name.clone();
            *seen2.lock().unwrap().entry(name.to_ascii()).or_insert(0) += 1;
            let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            resp.queries = req.queries.clone();
            resp.answers.push(Record::from_rdata(
                name,
                ttl,
                RData::A(A("192.0.2.8".parse().unwrap())),
            ));
            let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
        }
    });
    (addr, seen, task)
}

fn forwarder(upstreams: Vec<SocketAddr>, tuning: Tuning) -> Arc<Forwarder> {
    Forwarder::new(
        upstreams,
        hickory_proto::rr::Name::from_ascii("cluster.local.").unwrap(),
        Duration::from_secs(1),
        100,
        tuning,
    )
}

/// Asks `name` as the handler does (cache first, then forwarded); true
/// when the cache answered.
async fn ask_name(f: &Forwarder, name: &str) -> bool {
    let req = query(name, RecordType::A, Some(1232));
    if let Some((bytes, _)) = f.cached(&req, 1232) {
        assert_eq!(
            a_records(&parse(&bytes)),
            vec![IpAddr::from([192, 0, 2, 8])]
        );
        return true;
    }
    let (bytes, rcode) = f.reply(&req, 1232).await;
    assert_eq!(rcode, ResponseCode::NoError);
    assert_eq!(
        a_records(&parse(&bytes)),
        vec![IpAddr::from([192, 0, 2, 8])]
    );
    false
}

/// Asks `name` every 50 ms for `long`; returns the cache misses after the
/// first question.
async fn ask_steadily(f: &Forwarder, name: &str, long: Duration) -> usize {
    let started = Instant::now();
    let _ = ask_name(f, name).await;
    let mut misses = 0;
    while started.elapsed() < long {
        tokio::time::sleep(Duration::from_millis(50)).await;
        misses += usize::from(!ask_name(f, name).await);
    }
    misses
}

/// Prefetch: a name asked steadily never misses the cache after the first
/// question (its entry is refreshed in the last 10 % of its 2 s TTL, about
/// once a TTL); a name asked once is not refreshed; without prefetch the
/// same steady asking misses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_popular_entry_is_refreshed_before_it_expires_and_a_lone_one_is_not() {
    let (up, seen, task) = counting_upstream(2).await;
    let f = forwarder(vec![up], Tuning::default());
    assert!(!ask_name(&f, "once.example.").await);
    let misses = ask_steadily(&f, "pop.example.", Duration::from_millis(5000)).await;
    assert_eq!(misses, 0, "the popular name never missed after warm-up");
    let count = |name: &str| seen.lock().unwrap().get(name).copied().unwrap_or(0);
    let pop = count("pop.example.");
    assert!(
        (2..=4).contains(&pop),
        "refreshed about once a TTL (1 + 5 s / 1.8 s): {pop} upstream queries"
    );
    assert_eq!(
        count("once.example."),
        1,
        "a name asked once is not prefetched"
    );
    // The same without prefetch: the entry expires under the asker.
    let f = forwarder(
        vec![up],
        Tuning {
            prefetch: 0,
            ..Tuning::default()
        },
    );
    let misses = ask_steadily(&f, "nopre.example.", Duration::from_millis(2600)).await;
    assert!(misses >= 1, "without prefetch the entry expired");
    // Below the threshold (asked twice with prefetch = 3, the second time
    // in its last 10 %): not refreshed.
    let f = forwarder(
        vec![up],
        Tuning {
            prefetch: 3,
            ..Tuning::default()
        },
    );
    assert!(!ask_name(&f, "twice.example.").await);
    tokio::time::sleep(Duration::from_millis(1850)).await;
    assert!(ask_name(&f, "twice.example.").await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        count("twice.example."),
        1,
        "asked twice, below prefetch = 3"
    );
    task.abort();
}

/// Health through the forwarder: the first upstream never answers; every
/// question is still answered (by the second), the silent one is marked
/// down after `max_fails` timeouts and then no longer asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_is_marked_down_and_skipped() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead = silent.local_addr().unwrap();
    let heard = Arc::new(AtomicUsize::new(0));
    let heard2 = heard.clone();
    let silent_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 512];
        while silent.recv_from(&mut buf).await.is_ok() {
            heard2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (up, seen, task) = counting_upstream(0).await;
    let f = forwarder(
        vec![dead, up],
        Tuning {
            max_fails: 2,
            health_check: Duration::from_secs(60),
            prefetch: 0,
        },
    );
    for i in 0..2 {
        assert!(f.upstream_up(0), "up before {i} failures");
        assert!(!ask_name(&f, &format!("n{i}.example.")).await);
    }
    assert!(!f.upstream_up(0), "down after max_fails");
    assert!(f.upstream_up(1));
    let started = Instant::now();
    for i in 2..12 {
        assert!(!ask_name(&f, &format!("n{i}.example.")).await);
    }
    let total: usize = seen.lock().unwrap().values().sum();
    assert_eq!(total, 12, "every question answered by the live upstream");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "no time lost on the silent one (500 ms a try): {:?}",
        started.elapsed()
    );
    assert_eq!(heard.load(Ordering::SeqCst), 2, "asked only until down");
    task.abort();
    silent_task.abort();
}
