//! `[dns] autopath` end to end: a stub resolver with a pod's search path
//! (`shop.svc.cluster.local svc.cluster.local cluster.local`, ndots:5) on
//! the address of an endpoint of a `shop` service, against the real binary
//! forwarding to a dnsmasq. With autopath its first expansion is answered
//! (one query); a client that is not an endpoint walks the whole path.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hickory_proto::rr::RData;

use crate::harness::*;

/// `api.shop` has one endpoint: 127.0.0.71, the "pod" that asks.
const SERVICES: &str = r#"
[[service]]
name = "api"
namespace = "shop"
  [[service.port]]
  port = 80
  [[service.endpoint]]
  ip = "127.0.0.71"
  [service.health]
  kind = "none"

[[service]]
name = "web"
vip = "127.0.0.20"
  [[service.port]]
  port = 80
  [[service.endpoint]]
  ip = "127.0.0.11"
  [service.health]
  kind = "none"
"#;

fn start(autopath: bool, upstream: SocketAddr) -> Beacon {
    let b = Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        dns_extra: format!(
            "forward = [\"{upstream}\"]\nforward_allow = [\"127.0.0.0/8\"]\nautopath = {autopath}\n"
        ),
        services: Some(SERVICES.into()),
        ..Options::default()
    });
    b.wait_ready();
    b
}

/// A stub resolver as a pod in `shop` has it, asking `dns`.
fn pod_resolver(dns: SocketAddr) -> hickory_resolver::TokioResolver {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::rr::Name;
    let mut ns = NameServerConfig::udp(dns.ip());
    for c in &mut ns.connections {
        c.port = dns.port();
    }
    let search = [
        "shop.svc.cluster.local.",
        "svc.cluster.local.",
        "cluster.local.",
    ]
    .map(|d| Name::from_ascii(d).unwrap())
    .to_vec();
    let mut builder = hickory_resolver::Resolver::builder_with_config(
        ResolverConfig::from_parts(None, search, vec![ns]),
        TokioRuntimeProvider::default(),
    );
    let o = builder.options_mut();
    o.ndots = 5;
    o.cache_size = 0;
    o.attempts = 1;
    o.timeout = Duration::from_secs(2);
    builder.build().unwrap()
}

/// A counting relay: each datagram to it goes to beacon from a socket
/// bound to `from` (so beacon sees the pod's address), and the reply back.
/// Returns the relay's address and the count, once `stop` is set.
fn relay(
    beacon: SocketAddr,
    from: IpAddr,
    stop: Arc<AtomicBool>,
) -> (SocketAddr, std::thread::JoinHandle<usize>) {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    front
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = front.local_addr().unwrap();
    let back = UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
    back.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = std::thread::spawn(move || {
        let mut count = 0;
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::SeqCst) {
            let Ok((n, client)) = front.recv_from(&mut buf) else {
                continue;
            };
            count += 1;
            back.send_to(&buf[..n], beacon).unwrap();
            if let Ok(m) = back.recv(&mut buf) {
                front.send_to(&buf[..m], client).unwrap();
            }
        }
        count
    });
    (addr, t)
}

/// Looks `name` up as the pod at `from` would; the addresses and how many
/// queries it sent beacon for them.
fn lookup(b: &Beacon, from: &str, name: &str) -> (Vec<IpAddr>, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let (front, counter) = relay(b.dns, from.parse().unwrap(), stop.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ips = rt.block_on(async {
        match pod_resolver(front).ipv4_lookup(name).await {
            Ok(l) => l
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    });
    stop.store(true, Ordering::SeqCst);
    (ips, counter.join().unwrap())
}

#[test]
fn a_pod_with_a_search_path_gets_outside_names_in_one_query_with_autopath() {
    let (_upstream, up) = crate::dns::dnsmasq();
    let b = start(true, up);
    let outside: IpAddr = "127.0.0.99".parse().unwrap();
    // The pod: one query, answered through the CNAME.
    let (ips, asked) = lookup(&b, "127.0.0.71", "www.test.example");
    assert_eq!(ips, [outside]);
    assert_eq!(asked, 1, "autopath answers the first expansion");
    let out = std::process::Command::new("dig")
        .args([
            "-b",
            "127.0.0.71",
            "-p",
            &b.dns.port().to_string(),
            "@127.0.0.1",
            "+noall",
            "+answer",
            "www.test.example.shop.svc.cluster.local",
            "A",
        ])
        .output()
        .expect("dig");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("www.test.example.shop.svc.cluster.local. 5 IN CNAME www.test.example.")
            && out.contains("www.test.example.\t"),
        "{out}"
    );
    // A zone name written short (`web.default`) is found down the path.
    let (ips, asked) = lookup(&b, "127.0.0.71", "web.default");
    assert_eq!(ips, ["127.0.0.20".parse::<IpAddr>().unwrap()]);
    assert_eq!(asked, 1);
    // Not an endpoint: the search path is unknown, the client walks it.
    let (ips, asked) = lookup(&b, "127.0.0.72", "www.test.example");
    assert_eq!(ips, [outside]);
    assert_eq!(asked, 4, "three NXDOMAINs and the name itself");
}

#[test]
fn without_autopath_the_pod_walks_its_search_path() {
    let (_upstream, up) = crate::dns::dnsmasq();
    let b = start(false, up);
    let (ips, asked) = lookup(&b, "127.0.0.71", "www.test.example");
    assert_eq!(ips, ["127.0.0.99".parse::<IpAddr>().unwrap()]);
    assert_eq!(asked, 4, "three NXDOMAINs and the name itself");
}
