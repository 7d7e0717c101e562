//! The wire helpers: limits, the header-only reply, truncation, framing,
//! and the two exchanges against fake servers on loopback.

use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UdpSocket};

use super::*;

fn question(name: &str) -> Query {
    Query::query(Name::from_ascii(name).unwrap(), RecordType::A)
}

/// A reply with one A record for `name` and `id` (which may not match the
/// query: that is what some tests check).
fn reply_to(id: u16, name: &str) -> Vec<u8> {
    let mut r = Message::new(id, MessageType::Response, OpCode::Query);
    r.queries.push(question(name));
    r.answers.push(Record::from_rdata(
        Name::from_ascii(name).unwrap(),
        5,
        RData::A("10.9.8.7".parse().unwrap()),
    ));
    r.to_vec().unwrap()
}

#[test]
fn limits_follow_transport_and_edns() {
    assert_eq!(limit(Proto::Tcp, None), TCP_LIMIT);
    assert_eq!(limit(Proto::Tcp, Some(512)), TCP_LIMIT);
    assert_eq!(limit(Proto::Udp, None), PLAIN_UDP_LIMIT);
    assert_eq!(limit(Proto::Udp, Some(100)), 512, "never below 512");
    assert_eq!(limit(Proto::Udp, Some(1000)), 1000);
    assert_eq!(limit(Proto::Udp, Some(4096)), usize::from(EDNS_PAYLOAD));
}

#[test]
fn header_only_keeps_id_opcode_and_rd() {
    // ID 0xABCD, opcode 0 (query), RD, and AA/TC set in the request.
    let req = [0xAB, 0xCD, 0x07, 0xFF, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0];
    let h = header_only(&req, ResponseCode::FormErr);
    assert_eq!(h[2], 0x80 | 0x01, "QR, opcode and RD only");
    // Opcode 2 (status): RD is defined for QUERY only, so it is not echoed.
    let req = [0xAB, 0xCD, 0x17, 0xFF, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0];
    let h = header_only(&req, ResponseCode::FormErr);
    assert_eq!(h.len(), HEADER_LEN);
    assert_eq!(&h[..2], &[0xAB, 0xCD]);
    assert_eq!(h[2], 0x80 | 0x10, "QR and opcode only");
    assert_eq!(h[3], 1, "FORMERR, other bits clear");
    assert!(h[4..].iter().all(|&b| b == 0), "no sections");
    let h = header_for_id(0x0102, ResponseCode::ServFail);
    assert_eq!(h, vec![1, 2, 0x80, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn encode_within_truncates_past_the_limit() {
    let mut msg = Message::new(7, MessageType::Response, OpCode::Query);
    msg.queries.push(question("big.example."));
    for i in 0..60u8 {
        msg.answers.push(Record::from_rdata(
            Name::from_ascii("big.example.").unwrap(),
            5,
            RData::A(std::net::Ipv4Addr::new(10, 0, 0, i).into()),
        ));
    }
    let full = encode_within(&msg, TCP_LIMIT).unwrap();
    assert_eq!(Message::from_vec(&full).unwrap().answers.len(), 60);
    let cut = encode_within(&msg, PLAIN_UDP_LIMIT).unwrap();
    assert!(cut.len() <= PLAIN_UDP_LIMIT);
    let cut = Message::from_vec(&cut).unwrap();
    assert!(cut.metadata.truncation);
    assert!(cut.answers.is_empty());
    assert_eq!(cut.queries.len(), 1);
}

#[test]
fn response_copies_the_request_flags() {
    let mut req = query(question("x.example."), true);
    req.metadata.checking_disabled = true;
    let r = response(&req, ResponseCode::Refused, false);
    assert_eq!(r.metadata.id, req.metadata.id);
    assert_eq!(r.metadata.message_type, MessageType::Response);
    assert!(r.metadata.recursion_desired && r.metadata.checking_disabled);
    assert!(!r.metadata.recursion_available);
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    assert_eq!(r.edns.as_ref().unwrap().max_payload(), EDNS_PAYLOAD);
    assert!(r.queries.is_empty());
    let plain = query(question("x.example."), false);
    assert!(response(&plain, ResponseCode::NoError, true).edns.is_none());
}

#[tokio::test]
async fn framing_round_trips_and_tells_a_clean_close() {
    let mut wire_bytes = frame(b"hello");
    assert_eq!(&wire_bytes[..2], &[0, 5]);
    wire_bytes.extend_from_slice(&frame(b""));
    let mut rd = &wire_bytes[..];
    assert_eq!(read_frame(&mut rd).await.unwrap().unwrap(), b"hello");
    assert_eq!(read_frame(&mut rd).await.unwrap().unwrap(), b"");
    assert!(read_frame(&mut rd).await.unwrap().is_none(), "clean close");
    let mut cut = &[0u8, 9, 1, 2][..];
    assert!(
        read_frame(&mut cut).await.is_err(),
        "close inside a message"
    );
}

#[tokio::test]
async fn udp_exchange_skips_datagrams_that_do_not_answer() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let mut buf = vec![0u8; 512];
        let (n, peer) = server.recv_from(&mut buf).await.unwrap();
        let q = Message::from_vec(&buf[..n]).unwrap();
        let id = q.metadata.id;
        // Another ID, another question, garbage: all ignored.
        for bytes in [
            reply_to(id.wrapping_add(1), "web.example."),
            reply_to(id, "other.example."),
            vec![1, 2, 3],
            reply_to(id, "WEB.example."),
        ] {
            server.send_to(&bytes, peer).await.unwrap();
        }
    });
    let msg = query(question("web.example."), false);
    let reply = tokio::time::timeout(Duration::from_secs(2), udp_exchange(addr, &msg))
        .await
        .expect("a reply within 2 s")
        .unwrap();
    assert_eq!(reply.metadata.id, msg.metadata.id);
    assert_eq!(reply.queries[0].name.to_ascii(), "WEB.example.");
    assert_eq!(reply.answers.len(), 1);
    fake.await.unwrap();
}

#[tokio::test]
async fn tcp_exchange_reads_one_framed_reply_and_checks_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        for shift in [0u16, 1] {
            let (mut s, _) = listener.accept().await.unwrap();
            let body = read_frame(&mut s).await.unwrap().unwrap();
            let q = Message::from_vec(&body).unwrap();
            let reply = reply_to(q.metadata.id.wrapping_add(shift), "web.example.");
            s.write_all(&frame(&reply)).await.unwrap();
        }
    });
    let msg = query(question("web.example."), true);
    let t = Duration::from_secs(2);
    let reply = tokio::time::timeout(t, tcp_exchange(addr, &msg))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.metadata.id, msg.metadata.id);
    let wrong = tokio::time::timeout(t, tcp_exchange(addr, &msg))
        .await
        .unwrap();
    assert!(matches!(wrong, Err(WireError::Malformed)), "{wrong:?}");
    fake.await.unwrap();
}
