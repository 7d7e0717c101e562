//! The pooled upstream sockets: few source ports for many queries, a new
//! port after a socket's share, spoofed replies ignored, a dead port fails
//! at once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

use super::{Pool, QUERIES_PER_SOCKET, SOCKETS};
use crate::dns::wire;

fn reply_to(req: &Message, ip: [u8; 4]) -> Vec<u8> {
    let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
    resp.queries = req.queries.clone();
    resp.answers.push(Record::from_rdata(
        req.queries[0].name.clone(),
        60,
        RData::A(A(ip.into())),
    ));
    resp.to_vec().unwrap()
}

/// An upstream that answers after `delay` and records the source ports;
/// first it sends a reply with another ID and one for another question
/// (both 6.6.6.6), then the real one (192.0.2.1).
async fn upstream(delay: Duration) -> (SocketAddr, Arc<Mutex<HashSet<u16>>>) {
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = sock.local_addr().unwrap();
    let ports = Arc::new(Mutex::new(HashSet::new()));
    let seen = ports.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            seen.lock().unwrap().insert(peer.port());
            let req = Message::from_vec(&buf[..n]).unwrap();
            let sock = sock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut wrong_id = req.clone();
                wrong_id.metadata.id = req.metadata.id.wrapping_add(1);
                let _ = sock.send_to(&reply_to(&wrong_id, [6, 6, 6, 6]), peer).await;
                let mut other = req.clone();
                other.queries[0].name = Name::from_ascii("other.example.").unwrap();
                let _ = sock.send_to(&reply_to(&other, [6, 6, 6, 6]), peer).await;
                let _ = sock.send_to(&reply_to(&req, [192, 0, 2, 1]), peer).await;
            });
        }
    });
    (addr, ports)
}

fn question(i: usize) -> Message {
    let name = Name::from_ascii(format!("q{i}.example.")).unwrap();
    wire::query(Query::query(name, RecordType::A), true)
}

fn answer_ip(reply: &Message) -> String {
    match &reply.answers[0].data {
        RData::A(a) => a.0.to_string(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_queries_in_flight_share_the_pools_sockets_and_spoofs_are_ignored() {
    let (addr, ports) = upstream(Duration::from_millis(100)).await;
    let pool = Arc::new(Pool::new(addr, Duration::from_secs(1)));
    let asks: Vec<_> = (0..300)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let q = question(i);
                let reply = tokio::time::timeout(Duration::from_secs(3), pool.exchange(&q))
                    .await
                    .expect("answered in time")
                    .expect("answered");
                (q, reply)
            })
        })
        .collect();
    for a in asks {
        let (q, reply) = a.await.unwrap();
        assert_eq!(reply.queries[0].name, q.queries[0].name);
        assert_eq!(answer_ip(&reply), "192.0.2.1", "a spoofed reply was taken");
    }
    let used = ports.lock().unwrap().len();
    assert!(used <= SOCKETS, "300 queries in flight used {used} ports");
    // Nothing is left waiting.
    for slot in &pool.slots {
        let conn = slot.lock().unwrap().clone().expect("opened");
        assert!(conn.waiting().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_replaced_by_a_new_port_after_its_share() {
    let (addr, ports) = upstream(Duration::ZERO).await;
    let pool = Pool::new(addr, Duration::from_millis(200));
    for i in 0..SOCKETS * QUERIES_PER_SOCKET + 1 {
        let reply = tokio::time::timeout(Duration::from_secs(2), pool.exchange(&question(i)))
            .await
            .expect("answered in time")
            .expect("answered");
        assert_eq!(answer_ip(&reply), "192.0.2.1");
    }
    assert_eq!(
        ports.lock().unwrap().len(),
        SOCKETS + 1,
        "a new port for the query past the first socket's share"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_port_fails_at_once_and_the_next_query_too() {
    let addr = UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let pool = Pool::new(addr, Duration::from_secs(1));
    for i in 0..2 * SOCKETS {
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(2), pool.exchange(&question(i)))
            .await
            .expect("failed in time, not hung");
        assert!(got.is_err(), "{got:?}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}

/// An ID freed by a reply and taken again by a new query: the first
/// query's end must not remove the new query's wait.
#[tokio::test]
async fn a_reused_id_keeps_the_new_wait() {
    let pool = Pool::new("127.0.0.1:9".parse().unwrap(), Duration::from_secs(1));
    let conn = pool.conn().unwrap();
    let (tx, _rx) = tokio::sync::oneshot::channel();
    conn.waiting().insert(7, (2, question(0), tx));
    drop(super::Waiting {
        conn: &conn,
        id: 7,
        wait: 1,
    });
    assert!(conn.waiting().contains_key(&7), "another wait's entry kept");
    drop(super::Waiting {
        conn: &conn,
        id: 7,
        wait: 2,
    });
    assert!(!conn.waiting().contains_key(&7), "its own entry removed");
}
