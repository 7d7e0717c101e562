//! Many hosts in Docker (issue 12): three etcd members and three beacon
//! nodes as containers on a network the test creates. Each beacon container
//! stands in for a host: its file source has one local endpoint, published
//! through etcd under its lease. One host is cut off the network
//! (`docker network disconnect`) and comes back (`docker network connect`).
//!
//! The etcd image is built `FROM scratch` by `docker/etcd-image.sh` out of
//! the host's /usr/bin/etcd (Debian's etcd-server) and the libraries `ldd`
//! lists; beacon's is the scratch image of `docker/build.sh`. Nothing is
//! pulled. Without an engine the test fails; `BEACON_SKIP_DOCKER=1` skips it.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use super::docker::{Cleanup, docker, engine_available, ip_of, repo_root, run, unique};
use super::harness::http_get;

const NAME: &str = "web.default.svc.cluster.local.";
const LEASE: Duration = Duration::from_secs(3);
const DNS_PORT: u16 = 1053;
const ADMIN_PORT: u16 = 9153;

/// One beacon container: a host with one local endpoint of `web`.
struct Host {
    node: String,
    container: String,
    endpoint: IpAddr,
}

/// The endpoint host `i` publishes (TEST-NET-2: never routed, and with
/// health kind "none" nothing probes it).
fn endpoint_of(i: usize) -> IpAddr {
    format!("198.51.100.{}", i + 1).parse().unwrap()
}

/// The etcd image, under a tag of the guard's.
fn etcd_image(guard: &Cleanup) -> String {
    let tag = format!("beacon-etcd:{}", unique("img"));
    guard.adopt_image(&tag);
    run(Command::new(repo_root().join("docker/etcd-image.sh")).arg(&tag));
    // FROM scratch: one layer, nothing but etcd and its libraries.
    let config = docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Entrypoint}} {{len .RootFS.Layers}}",
        &tag,
    ]);
    assert_eq!(config, r#"["/usr/bin/etcd"] 1"#);
    tag
}

/// A static 3-member cluster; returns every member's client URL (by IP:
/// beacon's static binary is not asked to resolve container names).
fn etcd_cluster(guard: &Cleanup, image: &str, net: &str) -> Vec<String> {
    let names: Vec<String> = (0..3).map(|i| unique(&format!("etcd{i}"))).collect();
    let initial = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("m{i}=http://{n}:2380"))
        .collect::<Vec<_>>()
        .join(",");
    for (i, n) in names.iter().enumerate() {
        let (member, client, peer) = (
            format!("m{i}"),
            format!("http://{n}:2379"),
            format!("http://{n}:2380"),
        );
        guard.named_container(
            n,
            &[
                "--network",
                net,
                image,
                "--name",
                &member,
                "--data-dir",
                "/var/lib/etcd",
                "--listen-client-urls",
                "http://0.0.0.0:2379",
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                "http://0.0.0.0:2380",
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "beacon-docker-test",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
            ],
        );
    }
    let urls: Vec<String> = names
        .iter()
        .map(|n| format!("http://{}:2379", ip_of(n, net)))
        .collect();
    // The cluster has a leader once every member commits a proposal.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", urls.join(",")))
            .args(["--command-timeout=2s", "endpoint", "health"])
            .output()
            .expect("etcdctl (Debian's etcd-client) on the host");
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the etcd containers never became healthy: {}\nlogs of {}:\n{}",
            String::from_utf8_lossy(&out.stderr),
            names[0],
            logs(&names[0])
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    urls
}

/// `docker logs` (stdout and stderr), for failure messages.
fn logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", "--tail", "40", container])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
        });
    out.unwrap_or_else(|e| format!("docker logs {container}: {e}"))
}

fn beacon_config(node: &str, etcd: &[String]) -> String {
    let endpoints: Vec<String> = etcd.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "startup_timeout = \"5s\"\n\
         [dns]\nlisten = \"0.0.0.0:{DNS_PORT}\"\nttl = 1\n\
         [admin]\nlisten = \"0.0.0.0:{ADMIN_PORT}\"\n\
         [[source]]\ntype = \"file\"\npath = \"/etc/beacon/services.toml\"\n\
         [[source]]\ntype = \"etcd\"\nendpoints = [{}]\nnode = \"{node}\"\n\
         publish = [\"file\"]\nlease_ttl = \"{}s\"\n",
        endpoints.join(", "),
        LEASE.as_secs()
    )
}

fn services(endpoint: IpAddr) -> String {
    format!(
        "[[service]]\nname = \"web\"\n  [[service.port]]\n  name = \"http\"\n  port = 80\n\
         \x20 [[service.endpoint]]\n  ip = \"{endpoint}\"\n  port = 8080\n\
         \x20 [service.health]\n  kind = \"none\"\n"
    )
}

/// Starts beacon host `i`: its config and services file in a directory of
/// `dir`, mounted read-only at /etc/beacon.
fn start_host(
    guard: &Cleanup,
    image: &str,
    net: &str,
    dir: &std::path::Path,
    i: usize,
    etcd: &[String],
) -> Host {
    use std::os::unix::fs::PermissionsExt;
    let node = format!("host-{}", ["a", "b", "c"][i]);
    let endpoint = endpoint_of(i);
    let conf = dir.join(&node);
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("beacon.toml"), beacon_config(&node, etcd)).unwrap();
    std::fs::write(conf.join("services.toml"), services(endpoint)).unwrap();
    // beacon runs as 65534 in its image: the directory must be readable.
    for p in [dir, conf.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mount = format!("{}:/etc/beacon:ro", conf.display());
    let container = guard.container(
        &node,
        &[
            "--network",
            net,
            "-v",
            &mount,
            image,
            "run",
            "--config",
            "/etc/beacon/beacon.toml",
        ],
    );
    Host {
        node,
        container,
        endpoint,
    }
}

/// The A records of `web` from one beacon container's DNS, from the host;
/// empty when it does not answer.
fn dns_a(rt: &tokio::runtime::Runtime, ip: IpAddr) -> BTreeSet<IpAddr> {
    let answer = rt.block_on(beacon::client::query(
        SocketAddr::new(ip, DNS_PORT),
        NAME,
        hickory_proto::rr::RecordType::A,
        Duration::from_millis(300),
    ));
    match answer {
        Ok(m) => m.answers.iter().filter_map(|r| r.data.ip_addr()).collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Polls the DNS of every container in `ips` (in turn) until each answers
/// exactly `want`; returns when the last one did. Panics after `within`.
fn wait_dns(
    rt: &tokio::runtime::Runtime,
    ips: &[(&Host, IpAddr)],
    want: &BTreeSet<IpAddr>,
    since: Instant,
    within: Duration,
    what: &str,
) -> Duration {
    let mut pending: Vec<&(&Host, IpAddr)> = ips.iter().collect();
    let mut last = Vec::new();
    while !pending.is_empty() {
        last.clear();
        pending.retain(|(h, ip)| {
            let got = dns_a(rt, *ip);
            let done = got == *want;
            if !done {
                last.push(format!("{}: {got:?}", h.node));
            }
            !done
        });
        if pending.is_empty() {
            break;
        }
        assert!(
            since.elapsed() <= within,
            "{what}: not within {within:?}; want {want:?}, last answers {last:?}; logs of {}:\n{}",
            pending[0].0.container,
            logs(&pending[0].0.container)
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    since.elapsed()
}

/// The A records of `web` inside a container, through its loopback (it
/// works while the container is off every network).
fn dns_a_inside(container: &str) -> BTreeSet<IpAddr> {
    let name = NAME.trim_end_matches('.');
    let server = format!("127.0.0.1:{DNS_PORT}");
    let out = docker(&[
        "exec", container, "/beacon", "query", name, "--server", &server,
    ]);
    // One record a line: `name ttl type data`.
    out.lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [_, _, "A", ip] => ip.parse().ok(),
            _ => None,
        })
        .collect()
}

/// From the host, through the admin API: `web`'s endpoints and the node
/// each came from (`via`; none for the node's own).
fn endpoints_via(ip: IpAddr) -> BTreeSet<(String, Option<String>)> {
    let (status, body) =
        http_get(SocketAddr::new(ip, ADMIN_PORT), "/v1/services").expect("GET /v1/services");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let web = v["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .unwrap_or_else(|| panic!("no web in {v}"));
    web["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["ip"].as_str().unwrap().to_string(),
                e["via"].as_str().map(String::from),
            )
        })
        .collect()
}

#[test]
fn docker_etcd_multi_host_cut_off_host_leaves_within_the_lease_and_comes_back() {
    if !engine_available() {
        return;
    }
    let guard = Cleanup::default();
    // The slow part first (a release build of the static binary).
    let beacon_image = guard.image();
    let etcd = etcd_image(&guard);
    let net = guard.network();
    let urls = etcd_cluster(&guard, &etcd, &net);
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<Host> = (0..3)
        .map(|i| start_host(&guard, &beacon_image, &net, dir.path(), i, &urls))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let all: BTreeSet<IpAddr> = hosts.iter().map(|h| h.endpoint).collect();
    let at: Vec<(&Host, IpAddr)> = hosts
        .iter()
        .map(|h| (h, ip_of(&h.container, &net)))
        .collect();

    // Every host serves every host's endpoint: its own locally, the two
    // others through etcd (`via` names the node that published it).
    let t = Instant::now();
    wait_dns(&rt, &at, &all, t, Duration::from_secs(30), "converged");
    eprintln!("3 hosts converged in {:?}", t.elapsed());
    for (h, ip) in &at {
        assert_eq!(
            endpoints_via(*ip),
            want_via(&hosts, h),
            "{}'s /v1/services",
            h.node
        );
    }

    // host-c is cut off: its endpoint leaves a and b within lease_ttl + 1 s.
    let (a_b, cut) = (&at[..2], &hosts[2]);
    let mut rest = all.clone();
    rest.remove(&cut.endpoint);
    let t = Instant::now();
    docker(&["network", "disconnect", &net, &cut.container]);
    let gone = wait_dns(
        &rt,
        a_b,
        &rest,
        t,
        LEASE + Duration::from_secs(1),
        "cut-off host leaves",
    );
    eprintln!(
        "docker network disconnect → host-c's endpoint gone from a and b in {gone:?} (lease_ttl {LEASE:?})"
    );
    assert!(gone <= LEASE + Duration::from_secs(1), "took {gone:?}");
    // It stays gone: nothing re-publishes it while host-c is away.
    std::thread::sleep(Duration::from_secs(1));
    for (h, ip) in a_b {
        assert_eq!(dns_a(&rt, *ip), rest, "{} after the lease", h.node);
    }
    // The cut-off host keeps serving what it knew (stale but available).
    assert_eq!(
        dns_a_inside(&cut.container),
        all,
        "host-c, off the network, serves its last known state"
    );

    // Back on the network: its endpoint returns on a and b (a new lease),
    // and it serves everyone's again.
    let t = Instant::now();
    docker(&["network", "connect", &net, &cut.container]);
    let back = wait_dns(
        &rt,
        a_b,
        &all,
        t,
        Duration::from_secs(30),
        "reconnected host back",
    );
    eprintln!("docker network connect → host-c's endpoint back on a and b in {back:?}");
    let c_ip = ip_of(&cut.container, &net);
    wait_dns(
        &rt,
        &[(cut, c_ip)],
        &all,
        t,
        Duration::from_secs(30),
        "host-c serves every endpoint again",
    );
    for (h, ip) in a_b.iter().chain([&(cut, c_ip)]) {
        assert_eq!(
            endpoints_via(*ip),
            want_via(&hosts, h),
            "{}'s /v1/services after the reconnect",
            h.node
        );
    }
}

/// What `host`'s /v1/services lists for `web`: every host's endpoint, with
/// `via` the publishing node for all but its own.
fn want_via(hosts: &[Host], host: &Host) -> BTreeSet<(String, Option<String>)> {
    hosts
        .iter()
        .map(|o| {
            let via = (o.node != host.node).then(|| o.node.clone());
            (o.endpoint.to_string(), via)
        })
        .collect()
}
