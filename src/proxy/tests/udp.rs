//! UDP services: per-client flows over echo backends, stickiness and
//! order, replies from the service address, idle expiry, the flow cap,
//! and an endpoint removal that moves new flows only.

use tokio::net::UdpSocket;

use super::*;
use crate::model::Protocol;

/// A UDP backend answering each datagram with `name:payload`.
async fn udp_echo(ip: &str, name: &str) -> SocketAddr {
    let sock = UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let reply = format!("{name}:{}", String::from_utf8_lossy(&buf[..n]));
            let _ = sock.send_to(reply.as_bytes(), from).await;
        }
    });
    addr
}

fn udp_service(name: &str, listen: &str, endpoints: &[SocketAddr]) -> ServiceSpec {
    let mut s = service(name, listen, endpoints, Balance::RoundRobin);
    s.ports[0].protocol = Protocol::Udp;
    s
}

async fn client(ip: &str) -> UdpSocket {
    UdpSocket::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap()
}

/// Sends `msg` to `to`; the reply and where it came from (None: none in 300 ms).
async fn ask(c: &UdpSocket, to: SocketAddr, msg: &str) -> Option<(String, SocketAddr)> {
    c.send_to(msg.as_bytes(), to).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_millis(300), c.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

fn backend_of(reply: &str) -> &str {
    reply.split(':').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_stick_keep_order_and_reply_from_the_service_address() {
    let h = harness();
    let a = udp_echo("127.0.3.71", "a").await;
    let b = udp_echo("127.0.3.72", "b").await;
    h.set(vec![udp_service("dns", "127.0.3.70:0", &[a, b])])
        .await;
    let addr = h.addr("127.0.3.70:0").await;
    let one = client("127.0.3.75").await;
    // A burst, then the replies: one endpoint, in order.
    for i in 0..20 {
        one.send_to(format!("{i}").as_bytes(), addr).await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..20 {
        let (n, from) = tokio::time::timeout(T, one.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from, addr, "replies come from the service address");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let first = backend_of(&got[0]).to_string();
    let want: Vec<String> = (0..20).map(|i| format!("{first}:{i}")).collect();
    assert_eq!(got, want);
    // A second client: the next endpoint (round robin over flows).
    let two = client("127.0.3.76").await;
    let (r, _) = ask(&two, addr, "x").await.unwrap();
    assert_ne!(backend_of(&r), first);
    let (r, _) = ask(&one, addr, "y").await.unwrap();
    assert_eq!(backend_of(&r), first, "still the same flow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flow_expires_and_the_next_datagram_opens_a_new_one() {
    let h = harness();
    let a = udp_echo("127.0.3.81", "a").await;
    let b = udp_echo("127.0.3.82", "b").await;
    let mut s = udp_service("idle", "127.0.3.80:0", &[a, b]);
    s.proxy.udp_idle_timeout = Duration::from_millis(300);
    h.set(vec![s]).await;
    let addr = h.addr("127.0.3.80:0").await;
    let c = client("127.0.3.85").await;
    let (r1, _) = ask(&c, addr, "1").await.unwrap();
    // Activity keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (r, _) = ask(&c, addr, "k").await.unwrap();
        assert_eq!(backend_of(&r), backend_of(&r1));
    }
    // ...quiet past it ends it: a new flow, the next endpoint.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (r2, _) = ask(&c, addr, "2").await.unwrap();
    assert_ne!(backend_of(&r2), backend_of(&r1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_table_is_capped() {
    let cfg = ProxyConfig {
        udp_max_flows: 2,
        ..proxy_config(10_000)
    };
    let h = harness_config(&cfg, copy::Mode::Auto, &[]);
    let a = udp_echo("127.0.3.91", "a").await;
    h.set(vec![udp_service("cap", "127.0.3.90:0", &[a])]).await;
    let addr = h.addr("127.0.3.90:0").await;
    let c1 = client("127.0.3.95").await;
    let c2 = client("127.0.3.96").await;
    let c3 = client("127.0.3.97").await;
    assert!(ask(&c1, addr, "1").await.is_some());
    assert!(ask(&c2, addr, "2").await.is_some());
    assert!(
        ask(&c3, addr, "3").await.is_none(),
        "a third flow is refused"
    );
    assert!(ask(&c1, addr, "again").await.is_some(), "open flows go on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_removal_moves_new_flows_only() {
    let h = harness();
    let a = udp_echo("127.0.3.101", "a").await;
    let b = udp_echo("127.0.3.102", "b").await;
    h.set(vec![udp_service("move", "127.0.3.100:0", &[a])])
        .await;
    let addr = h.addr("127.0.3.100:0").await;
    let old = client("127.0.3.105").await;
    assert_eq!(backend_of(&ask(&old, addr, "1").await.unwrap().0), "a");
    h.set(vec![udp_service("move", "127.0.3.100:0", &[b])])
        .await;
    assert_eq!(
        backend_of(&ask(&old, addr, "2").await.unwrap().0),
        "a",
        "an open flow keeps its endpoint"
    );
    let new = client("127.0.3.106").await;
    assert_eq!(backend_of(&ask(&new, addr, "3").await.unwrap().0), "b");
}
