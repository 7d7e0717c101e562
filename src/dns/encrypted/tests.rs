use hickory_proto::op::MessageType;
use hickory_proto::rr::RecordType;

use super::*;
use crate::dns::testkit::{LOCAL, big_snapshot, cfg, query};

fn encrypted() -> Encrypted {
    let handler = crate::dns::handler(&cfg()).unwrap();
    let shared = Arc::new(Shared::new(handler));
    Encrypted::new(shared, Reader::fixed(big_snapshot()), Proto::Doh)
}

/// DoH replies are the bytes TCP sends for the same query (positive,
/// mixed case, SRV with additionals, NXDOMAIN and NODATA with the SOA,
/// with and without EDNS): one handler, no second encoder in between.
#[tokio::test]
async fn doh_replies_are_the_bytes_tcp_sends() {
    let enc = encrypted();
    let peer = SocketAddr::new(LOCAL, 5353);
    let asks = [
        ("web.default.svc.cluster.local.", RecordType::A, None),
        ("WeB.DeFault.svc.Cluster.LOCAL.", RecordType::A, Some(1232)),
        (
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
            None,
        ),
        (
            "nothing.default.svc.cluster.local.",
            RecordType::A,
            Some(1232),
        ),
        ("web.default.svc.cluster.local.", RecordType::MX, None),
        ("cluster.local.", RecordType::SOA, None),
    ];
    for (name, qtype, edns) in asks {
        let raw = query(name, qtype, edns).to_vec().unwrap();
        let ours = enc.reply(&raw, peer).await.expect("a reply");
        let mut tcp = Vec::new();
        let snapshot = enc.reader.current();
        let mut cache = enc.shared.tcp_cache.lock().unwrap();
        let reply = enc.shared.handler.handle(
            &mut cache,
            &snapshot,
            &raw,
            peer.ip(),
            Proto::Tcp,
            0,
            &mut tcp,
        );
        assert!(matches!(reply, Reply::Send { .. }), "{name} {qtype}");
        assert_eq!(ours, tcp, "{name} {qtype}");
    }
}

/// Nothing is sent for a message that is a response (no header to answer).
#[tokio::test]
async fn a_response_sent_to_us_gets_nothing() {
    let enc = encrypted();
    let mut msg = query("web.default.svc.cluster.local.", RecordType::A, None);
    msg.metadata.message_type = MessageType::Response;
    let raw = msg.to_vec().unwrap();
    assert!(enc.reply(&raw, SocketAddr::new(LOCAL, 1)).await.is_none());
}
