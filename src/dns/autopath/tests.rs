//! Autopath through the handler: zone candidates, a forwarded candidate,
//! and every case where it must not fire.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;

use crate::dns::answer::Zone;
use crate::dns::fast::FastCache;
use crate::dns::forward::Forwarder;
use crate::dns::handler::{Handler, Reply};
use crate::dns::testkit::{a_records, demo, parse, query};
use crate::dns::wire::Proto;

/// 10.1.0.1 is an endpoint of `db.prod`: its search path starts with
/// `prod.svc.cluster.local`.
const POD: &str = "10.1.0.1";

/// Answers A with 192.0.2.8, and NXDOMAIN for names starting with `nx`.
async fn upstream() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            resp.metadata.recursion_available = true;
            resp.queries = req.queries.clone();
            let name = req.queries[0].name.clone();
            if name.to_ascii().starts_with("nx") {
                resp.metadata.response_code = ResponseCode::NXDomain;
            } else {
                resp.answers.push(Record::from_rdata(
                    name,
                    60,
                    RData::A(A("192.0.2.8".parse().unwrap())),
                ));
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

fn forwarder(upstream: SocketAddr) -> Arc<Forwarder> {
    let zone = Zone::new("cluster.local", 5).unwrap();
    Forwarder::new(
        vec![upstream],
        zone.apex().clone(),
        Duration::from_secs(1),
        100,
        Default::default(),
    )
}

fn handler(on: bool, upstream: Option<SocketAddr>) -> Handler {
    let zone = Zone::new("cluster.local", 5).unwrap();
    Handler::new(
        zone,
        vec!["10.0.0.0/8".parse().unwrap()],
        upstream.map(forwarder),
    )
    .with_autopath(on)
}

/// The reply to `name` A from `client`, forwarding when the handler asks.
async fn ask(h: &Handler, cache: &mut FastCache, name: &str, client: &str) -> Message {
    let bytes = query(name, RecordType::A, None).to_vec().unwrap();
    let client: IpAddr = client.parse().unwrap();
    let mut out = Vec::new();
    match h.handle(cache, &demo(), &bytes, client, Proto::Udp, 0, &mut out) {
        Reply::Send { .. } => parse(&out),
        Reply::Forward(job) => parse(&job.run().await.0),
        Reply::Drop => panic!("dropped"),
    }
}

fn cname_target(m: &Message) -> Option<(Name, Name)> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::CNAME(c) => Some((r.name.clone(), c.0.clone())),
        _ => None,
    })
}

#[tokio::test]
async fn a_zone_name_further_down_the_search_path_is_answered_with_a_cname() {
    let h = handler(true, None);
    let mut cache = FastCache::new(1 << 20, 100);
    // `web.default` asked by a prod pod: its first expansion does not
    // exist, `web.default.svc.cluster.local` does.
    let m = ask(&h, &mut cache, "Web.Default.prod.svc.cluster.local.", POD).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let (owner, target) = cname_target(&m).expect("a CNAME");
    assert_eq!(owner.to_ascii(), "Web.Default.prod.svc.cluster.local.");
    assert_eq!(target.to_ascii(), "web.default.svc.cluster.local.");
    // web.default has a vip: that is its A record.
    assert_eq!(a_records(&m), ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert!(
        m.answers
            .iter()
            .any(|r| r.name.to_ascii() == "web.default.svc.cluster.local."),
        "the records are the target's: {m:?}"
    );
    // A name that exists as asked is answered as before, no CNAME.
    let m = ask(&h, &mut cache, "db.prod.svc.cluster.local.", POD).await;
    assert!(
        cname_target(&m).is_none() && !a_records(&m).is_empty(),
        "{m:?}"
    );
}

#[tokio::test]
async fn an_outside_name_is_forwarded_once_and_answered_with_a_cname() {
    let up = upstream().await;
    let h = handler(true, Some(up));
    let mut cache = FastCache::new(1 << 20, 100);
    let m = ask(
        &h,
        &mut cache,
        "www.example.com.prod.svc.cluster.local.",
        POD,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{m:?}");
    assert_eq!(
        m.queries[0].name.to_ascii(),
        "www.example.com.prod.svc.cluster.local."
    );
    let (_, target) = cname_target(&m).expect("a CNAME");
    assert_eq!(target.to_ascii(), "www.example.com.");
    assert_eq!(a_records(&m), ["192.0.2.8".parse::<IpAddr>().unwrap()]);
    assert!(
        m.answers
            .iter()
            .any(|r| r.name.to_ascii() == "www.example.com.")
    );
    // Nothing upstream either: the NXDOMAIN the client would have had.
    let m = ask(
        &h,
        &mut cache,
        "nx.example.com.prod.svc.cluster.local.",
        POD,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        m.answers.is_empty() && !m.authorities.is_empty(),
        "the zone's SOA: {m:?}"
    );
}

#[tokio::test]
async fn it_never_fires_for_unknown_clients_other_namespaces_or_when_off() {
    let up = upstream().await;
    let name = "www.example.com.prod.svc.cluster.local.";
    for (on, client, why) in [
        (false, POD, "autopath off"),
        (true, "10.9.9.9", "a client that is not an endpoint"),
        (
            true,
            "10.0.0.3",
            "an unhealthy endpoint (not in DNS, search path unknown)",
        ),
    ] {
        let h = handler(on, Some(up));
        let mut cache = FastCache::new(1 << 20, 100);
        let m = ask(&h, &mut cache, name, client).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{why}");
        assert!(cname_target(&m).is_none(), "{why}");
    }
    let h = handler(true, Some(up));
    let mut cache = FastCache::new(1 << 20, 100);
    // Not the client's first search domain (a default pod's name).
    let m = ask(
        &h,
        &mut cache,
        "www.example.com.default.svc.cluster.local.",
        POD,
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    // The fast path must not keep the NXDOMAIN an unknown client got and
    // serve it to a known one.
    let m = ask(&h, &mut cache, name, "10.9.9.9").await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let m = ask(&h, &mut cache, name, POD).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    // A client outside forward_allow gets no forwarded candidate.
    let h = Handler::new(
        Zone::new("cluster.local", 5).unwrap(),
        vec!["192.168.0.0/16".parse().unwrap()],
        Some(forwarder(up)),
    )
    .with_autopath(true);
    let m = ask(&h, &mut cache, name, POD).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}
