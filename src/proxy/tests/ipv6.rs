//! IPv6 end to end: listeners and endpoints on `::1`, mixed pairs (a v6
//! client to a v4 endpoint and back), PROXY protocol v1 and v2 for both.

use super::*;
use crate::model::ProxyProtocol;

/// Sends `hello` through `listen` (a client of `client_ip`) to a scripted
/// endpoint on `endpoint_ip`; returns what the endpoint read before
/// `hello` (the PROXY header), the client address and the listener's.
async fn through(
    listen: &str,
    endpoint_ip: &str,
    version: Option<ProxyProtocol>,
) -> (Vec<u8>, SocketAddr, SocketAddr) {
    let h = harness();
    let (baddr, mut accepted) = scripted_backend(endpoint_ip).await;
    let mut spec = service("v6", listen, &[baddr], Balance::RoundRobin);
    spec.proxy.proxy_protocol = version;
    h.set(vec![spec]).await;
    let addr = h.addr(listen).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    client.write_all(b"hello").await.unwrap();
    client.shutdown().await.unwrap();
    let mut server = tokio::time::timeout(T, accepted.recv())
        .await
        .unwrap()
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(got.ends_with(b"hello"), "{got:?}");
    // And back: the endpoint's bytes reach the v6 (or v4) client.
    got.truncate(got.len() - 5);
    (got, client_addr, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_listener_to_v6_endpoint_with_proxy_protocol_v1_and_v2() {
    let (h1, client, local) = through("[::1]:0", "::1", Some(ProxyProtocol::V1)).await;
    assert!(client.is_ipv6() && local.is_ipv6());
    assert_eq!(
        std::str::from_utf8(&h1).unwrap(),
        format!("PROXY TCP6 ::1 ::1 {} {}\r\n", client.port(), local.port())
    );
    let (h2, client, local) = through("[::1]:0", "::1", Some(ProxyProtocol::V2)).await;
    let parsed = ppp::v2::Header::try_from(&h2[..]).expect("valid v2 header");
    match parsed.addresses {
        ppp::v2::Addresses::IPv6(a) => {
            assert_eq!(
                SocketAddr::new(a.source_address.into(), a.source_port),
                client
            );
            assert_eq!(
                SocketAddr::new(a.destination_address.into(), a.destination_port),
                local
            );
        }
        other => panic!("unexpected addresses {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_pairs_carry_the_clients_family_in_the_header() {
    // A v6 client through a v6 listener to a v4 endpoint: the header says TCP6.
    let (h, client, local) = through("[::1]:0", "127.0.3.51", Some(ProxyProtocol::V2)).await;
    let parsed = ppp::v2::Header::try_from(&h[..]).expect("valid v2 header");
    assert!(
        matches!(parsed.addresses, ppp::v2::Addresses::IPv6(a)
            if a.source_port == client.port() && a.destination_port == local.port()),
        "{:?}",
        parsed.addresses
    );
    // A v4 client through a v4 listener to a v6 endpoint: TCP4.
    let (h, client, local) = through("127.0.3.52:0", "::1", Some(ProxyProtocol::V1)).await;
    assert_eq!(
        std::str::from_utf8(&h).unwrap(),
        format!(
            "PROXY TCP4 {} {} {} {}\r\n",
            client.ip(),
            local.ip(),
            client.port(),
            local.port()
        )
    );
    // No header: nothing before the bytes.
    let (h, _, _) = through("[::1]:0", "127.0.3.53", None).await;
    assert!(h.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_service_balances_across_v6_and_v4_endpoints() {
    let h = harness();
    let a = banner_backend("::1", "six").await;
    let b = banner_backend("127.0.3.54", "four").await;
    h.set(vec![service(
        "dual",
        "[::1]:0",
        &[a.addr, b.addr],
        Balance::RoundRobin,
    )])
    .await;
    let addr = h.addr("[::1]:0").await;
    let mut names = Vec::new();
    for _ in 0..6 {
        names.push(greet(addr).await.1.unwrap());
    }
    let t = tally(names.iter().map(String::as_str));
    assert_eq!((t["six"], t["four"]), (3, 3), "{t:?}");
}
