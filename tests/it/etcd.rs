//! Many hosts: beacon nodes share their endpoints through a real etcd
//! cluster (started by `etcd_harness`). Every beacon node is a real process
//! with its own file source of local backends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::etcd_harness::EtcdCluster;
use super::harness::{BackendProcess, Beacon, Options, eventually, fetch_name, free_addr, query_a};

const NAME: &str = "web.default.svc.cluster.local";
const TTL: &str = "2s";

/// One beacon node: its backend on its own loopback ip, a proxy listener
/// for `web`, and the etcd source publishing its file.
pub(super) struct Node {
    pub(super) beacon: Beacon,
    listen: SocketAddr,
    pub(super) ip: String,
    backend: BackendProcess,
}

fn services(ip: &str, port: u16, listen: SocketAddr, extra_ips: &[&str]) -> String {
    let mut s = format!(
        "[[service]]\nname = \"web\"\n[[service.port]]\nname = \"http\"\nport = 80\nlisten = \"{listen}\"\n[[service.endpoint]]\nip = \"{ip}\"\nport = {port}\n"
    );
    for extra in extra_ips {
        s.push_str(&format!(
            "[[service.endpoint]]\nip = \"{extra}\"\nport = {port}\n"
        ));
    }
    s
}

fn node_config(name: &str, endpoints: &str) -> String {
    format!(
        "[health]\ninterval = \"200ms\"\ntimeout = \"200ms\"\n[[source]]\ntype = \"file\"\npath = \"services.toml\"\n[[source]]\ntype = \"etcd\"\nendpoints = {endpoints}\nnode = \"{name}\"\npublish = [\"file\"]\nlease_ttl = \"{TTL}\"\n"
    )
}

impl Node {
    fn start(name: &str, n: u8, endpoints: &str) -> Node {
        Self::start_with(name, n, endpoints, "")
    }

    /// With `etcd_keys` (TOML lines) added to its etcd source.
    pub(super) fn start_with(name: &str, n: u8, endpoints: &str, etcd_keys: &str) -> Node {
        let ip = format!("127.0.0.{}", 10 + n);
        let port = free_addr().port();
        let backend = BackendProcess::start(name, format!("{ip}:{port}").parse().unwrap());
        let listen = free_addr();
        let beacon = Beacon::start(Options {
            extra: node_config(name, endpoints) + etcd_keys,
            services: Some(services(&ip, port, listen, &[])),
            ..Options::default()
        });
        Node {
            beacon,
            listen,
            ip,
            backend,
        }
    }

    /// Whether its `/v1/services` lists an endpoint at `ip`.
    fn lists(&self, ip: &str) -> bool {
        let v = self.beacon.services_json();
        v["services"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["ip"] == ip))
    }

    pub(super) fn a(&self) -> Vec<String> {
        query_a(self.beacon.dns, NAME).unwrap_or_default()
    }

    /// The backends the proxy reaches in `n` connections.
    fn spread(&self, n: usize) -> std::collections::BTreeSet<String> {
        (0..n)
            .filter_map(|_| fetch_name(self.listen).ok())
            .collect()
    }

    /// Rewrites the services file (atomically) with `extra` endpoints too.
    fn set_extra(&self, extra: &[&str]) {
        let text = services(&self.ip, self.backend.addr.port(), self.listen, extra);
        let tmp = self.beacon.path("services.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, self.beacon.path("services.toml")).unwrap();
    }
}

fn ips(nodes: &[&Node]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|n| n.ip.clone()).collect();
    v.sort();
    v
}

fn three(etcd: &EtcdCluster) -> Vec<Node> {
    let e = etcd.endpoints_toml();
    let nodes = vec![
        Node::start("node-a", 1, &e),
        Node::start("node-b", 2, &e),
        Node::start("node-c", 3, &e),
    ];
    let all = ips(&nodes.iter().collect::<Vec<_>>());
    for n in &nodes {
        n.beacon.wait_ready();
        eventually(
            Duration::from_secs(10),
            "every node answers every backend",
            || (n.a() == all).then_some(()),
        );
    }
    nodes
}

#[test]
fn etcd_three_nodes_dns_and_proxy_cover_every_nodes_backends() {
    let etcd = EtcdCluster::start(3);
    let nodes = three(&etcd);
    let names: std::collections::BTreeSet<String> =
        ["node-a", "node-b", "node-c"].map(String::from).into();
    for n in &nodes {
        eventually(
            Duration::from_secs(5),
            "the proxy spreads over every backend",
            || (n.spread(12) == names).then_some(()),
        );
        let v = n.beacon.services_json();
        let eps = v["services"][0]["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 3, "{v}");
        let remote = eps.iter().filter(|e| e["via"].is_string()).count();
        assert_eq!(remote, 2, "two endpoints come from other nodes: {v}");
        assert_eq!(
            n.beacon.metric("beacon_source_connected{source=\"etcd\"}"),
            Some(1.0)
        );
    }
    // One key per endpoint and one spec per node, under the documented layout.
    let keys = etcd.keys("/beacon/v1/nodes/");
    assert!(
        keys.contains(&"/beacon/v1/nodes/node-b/endpoints/default/web/127.0.0.12".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"/beacon/v1/nodes/node-c/services/default/web".to_string()),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 6, "{keys:?}");
}

#[test]
fn etcd_an_external_registration_is_served_by_every_node() {
    let etcd = EtcdCluster::start(1);
    let e = etcd.endpoints_toml();
    let a = Node::start("node-a", 1, &e);
    a.beacon.wait_ready();
    let ext = BackendProcess::start("ext", free_ext());
    // Its spec differs (balance): "ext" < "node-a", so its spec wins on
    // every node, node-a's own listen address stays, and the conflict shows.
    etcd.ctl(&[
        "put",
        "/beacon/v1/nodes/ext/services/default/web",
        r#"{"balance":"random","ports":[{"name":"http","port":80}]}"#,
    ]);
    let value = format!(r#"{{"port":{}}}"#, ext.addr.port());
    etcd.ctl(&[
        "put",
        "/beacon/v1/nodes/ext/endpoints/default/web/127.0.0.40",
        &value,
    ]);
    eventually(
        Duration::from_secs(5),
        "the external endpoint in DNS",
        || (a.a() == ["127.0.0.11", "127.0.0.40"]).then_some(()),
    );
    eventually(Duration::from_secs(5), "and in the proxy", || {
        a.spread(12).contains("ext").then_some(())
    });
    let v = a.beacon.services_json();
    assert_eq!(v["services"][0]["balance"], "random", "{v}");
    let conflicts = v["conflicts"].as_array().unwrap();
    assert!(
        conflicts.iter().any(|c| c["kind"] == "spec"
            && c["claim"] == "spec of node node-a"
            && c["winner"] == "spec of node ext"),
        "{v}"
    );
    etcd.ctl(&["del", "--prefix", "/beacon/v1/nodes/ext/"]);
    eventually(Duration::from_secs(5), "gone when deleted", || {
        (a.a() == ["127.0.0.11"]).then_some(())
    });
    let v = a.beacon.services_json();
    assert_eq!(v["services"][0]["balance"], "round_robin", "{v}");
    assert_eq!(v["conflicts"], serde_json::json!([]), "{v}");
}

fn free_ext() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.40:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn etcd_kill_9_leaves_within_the_lease_and_sigterm_within_a_second_without_failures() {
    let etcd = EtcdCluster::start(3);
    let mut nodes = three(&etcd);
    // kill -9 of node c: its endpoint leaves a and b within lease_ttl + 1 s.
    let t = Instant::now();
    let _ = nodes[2].beacon.child.kill();
    let _ = nodes[2].beacon.child.wait();
    let ab = ips(&[&nodes[0], &nodes[1]]);
    for n in &nodes[..2] {
        eventually(
            Duration::from_secs(3),
            "c's endpoint leaves after kill -9",
            || (n.a() == ab).then_some(()),
        );
    }
    let gone = t.elapsed();
    assert!(gone <= Duration::from_secs(3), "took {gone:?}");
    eprintln!("kill -9: endpoints left in {gone:?}");
    // SIGTERM of node b while clients use node a's proxy: b's endpoint
    // leaves within 1 s and no client connection fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listen = nodes[0].listen;
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let start = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(20)
            {
                match fetch_name(listen) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    nodes[1].beacon.signal(15);
    let a_only = ips(&[&nodes[0]]);
    eventually(
        Duration::from_secs(1),
        "b's endpoint leaves within 1 s of SIGTERM",
        || (nodes[0].a() == a_only).then_some(()),
    );
    eprintln!("SIGTERM: endpoints left in {:?}", t.elapsed());
    let status = nodes[1].beacon.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    assert!(ok > 20, "{ok} connections");
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert!(nodes[0].spread(4) == ["node-a".to_string()].into());
}

#[test]
fn etcd_member_loss_keeps_updates_flowing_quorum_loss_keeps_serving_and_restart_converges() {
    let mut etcd = EtcdCluster::start(3);
    let nodes = three(&etcd);
    let all = ips(&nodes.iter().collect::<Vec<_>>());
    let resets = |n: &Node| n.beacon.log_text().matches("etcd: listed").count();
    let before: Vec<usize> = nodes.iter().map(resets).collect();
    // One member down: an update on a reaches c.
    let t = Instant::now();
    etcd.kill(0);
    nodes[0].set_extra(&["127.0.0.21"]);
    eventually(
        Duration::from_secs(10),
        "an update flows with one member down",
        || nodes[2].lists("127.0.0.21").then_some(()),
    );
    eprintln!(
        "one member killed: a's update reached c in {:?}",
        t.elapsed()
    );
    for n in &nodes {
        failover_lines(n);
    }
    let after: Vec<usize> = nodes.iter().map(resets).collect();
    assert_eq!(
        before, after,
        "no re-list (Reset storm) for one lost member"
    );
    // Two down: no quorum. Every node keeps serving what it knew, well past
    // the lease (leases do not expire without a leader).
    etcd.kill(1);
    std::thread::sleep(Duration::from_secs(3));
    for n in &nodes {
        let answer = n.a();
        // the .21 endpoint has no backend: its probe fails on every node,
        // so DNS answers the three healthy ones.
        assert_eq!(answer, all, "serving what it knew");
    }
    eventually(Duration::from_secs(5), "the loss is visible", || {
        (nodes[2]
            .beacon
            .metric("beacon_source_connected{source=\"etcd\"}")
            == Some(0.0))
        .then_some(())
    });
    let v = nodes[2].beacon.services_json();
    assert_eq!(v["disconnected"], serde_json::json!(["etcd"]), "{v}");
    // A change while etcd is lost is served locally at once...
    nodes[0].set_extra(&[]);
    // ...and everywhere once the members are back.
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_healthy();
    for n in &nodes {
        eventually(Duration::from_secs(15), "converged after restart", || {
            let v = n.beacon.services_json();
            let eps = v["services"][0]["endpoints"]
                .as_array()
                .map_or(0, |e| e.len());
            (eps == 3 && n.a() == all).then_some(())
        });
        eventually(Duration::from_secs(5), "connected again", || {
            (n.beacon.metric("beacon_source_connected{source=\"etcd\"}") == Some(1.0)).then_some(())
        });
    }
}

/// A member that hangs (SIGSTOP: its connections stay open, nothing
/// answers) is left by HTTP/2 keepalive and the request timeouts: an update
/// on a still reaches c.
#[test]
fn etcd_a_hung_member_is_left_and_updates_keep_flowing() {
    let etcd = EtcdCluster::start(3);
    let nodes = three(&etcd);
    // Every node starts on member 0 (the first listed).
    let t = Instant::now();
    etcd.freeze(0, true);
    nodes[0].set_extra(&["127.0.0.21"]);
    eventually(
        Duration::from_secs(15),
        "an update flows with one member hung",
        || nodes[2].lists("127.0.0.21").then_some(()),
    );
    eprintln!("one member hung: a's update reached c in {:?}", t.elapsed());
    for n in &nodes {
        failover_lines(n);
    }
    etcd.freeze(0, false);
}

/// The node's failover lines (member used, stream lost), for timing.
fn failover_lines(n: &Node) {
    for line in n.beacon.log_text().lines().filter(|l| {
        l.contains("etcd: using member")
            || l.contains("etcd: watch lost")
            || l.contains("publishing interrupted")
            || l.contains("cannot watch")
    }) {
        eprintln!("{line}");
    }
}

#[test]
fn etcd_compaction_while_a_watcher_is_away_relists_and_leaves_nothing_stale() {
    let mut etcd = EtcdCluster::start(3);
    // Node c reaches etcd only through member 2.
    let all = etcd.endpoints_toml();
    let only2 = format!("[\"{}\"]", etcd.endpoints()[2]);
    let a = Node::start("node-a", 1, &all);
    let c = Node::start("node-c", 3, &only2);
    for n in [&a, &c] {
        n.beacon.wait_ready();
    }
    a.set_extra(&["127.0.0.21", "127.0.0.22"]);
    eventually(Duration::from_secs(10), "c sees a's endpoints", || {
        let v = c.beacon.services_json();
        let n = v["services"][0]["endpoints"]
            .as_array()
            .map_or(0, |e| e.len());
        (n == 4).then_some(())
    });
    etcd.kill(2);
    eventually(Duration::from_secs(10), "c notices", || {
        (c.beacon.metric("beacon_source_connected{source=\"etcd\"}") == Some(0.0)).then_some(())
    });
    // While c is away: a drops two endpoints, many revisions pass, compact.
    a.set_extra(&[]);
    // a's publisher may have been on the killed member: it moves to the
    // next one (about 200 ms, see the member-loss test).
    eventually(Duration::from_secs(5), "a published the change", || {
        let keys = etcd.keys("/beacon/v1/nodes/node-a/endpoints/");
        (keys.len() == 1).then_some(())
    });
    for i in 0..20 {
        etcd.ctl(&["put", "/other/churn", &i.to_string()]);
    }
    etcd.compact();
    etcd.restart(2);
    eventually(
        Duration::from_secs(20),
        "c re-listed: nothing stale",
        || {
            let v = c.beacon.services_json();
            let eps = v["services"][0]["endpoints"]
                .as_array()
                .map_or(0, |e| e.len());
            (eps == 2).then_some(())
        },
    );
    assert!(
        c.beacon.log_text().contains("compacted; listing again"),
        "the watcher re-listed"
    );
    eventually(
        Duration::from_secs(10),
        "c's DNS: a's one endpoint and its own",
        || (c.a() == ["127.0.0.11", "127.0.0.13"]).then_some(()),
    );
    // c's lease may have expired while it was away: granted anew, its
    // endpoint put again, a serves it.
    eventually(
        Duration::from_secs(10),
        "a serves c's endpoint again",
        || (a.a() == ["127.0.0.11", "127.0.0.13"]).then_some(()),
    );
}

/// A first list over gRPC's 4 MiB message limit, read in pages (one
/// answer of the whole prefix failed with "decoded message length too
/// large" and the node never synced): 50,000 external endpoints (about
/// 7 MB listed), all served, from one list. Five 1 MB values come first
/// in key order, so the first page of 2,000 keys is over the limit and is
/// asked again with fewer keys.
#[test]
fn etcd_a_first_list_of_many_pages_is_served_whole() {
    const N: usize = 50_000;
    let etcd = EtcdCluster::start(1);
    let endpoints = etcd.endpoints();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = etcd_client::Client::connect(&endpoints, None)
                .await
                .unwrap();
            let spec = r#"{"ports":[{"name":"http","port":80}]}"#;
            let huge = "x".repeat(1 << 20);
            for i in 0..5 {
                let k = format!("/beacon/v1/nodes/aaa/endpoints/default/huge/10.8.0.{i}");
                c.put(k, huge.as_str(), None).await.unwrap();
            }
            c.put("/beacon/v1/nodes/ext/services/default/big", spec, None)
                .await
                .unwrap();
            let keys: Vec<String> = (0..N)
                .map(|i| {
                    format!(
                        "/beacon/v1/nodes/ext/endpoints/default/big/10.9.{}.{}",
                        i / 250,
                        i % 250 + 1
                    )
                })
                .collect();
            let keys: Vec<(usize, String)> = keys.into_iter().enumerate().collect();
            for chunk in keys.chunks(128) {
                let ops: Vec<etcd_client::TxnOp> = chunk
                    .iter()
                    .map(|(i, k)| {
                        // A long hostname each: about 7 MB listed in all.
                        let v = format!(
                            r#"{{"port":80,"hostname":"ep-{i}-0123456789abcdef0123456789abcdef"}}"#
                        );
                        etcd_client::TxnOp::put(k.as_str(), v, None)
                    })
                    .collect();
                c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
            }
        });
    let a = Node::start("node-a", 1, &etcd.endpoints_toml());
    a.beacon.wait_ready();
    eventually(
        Duration::from_secs(10),
        "every listed endpoint served",
        || {
            let (status, body) =
                super::harness::http_get(a.beacon.admin, "/v1/services?namespace=default&name=big")
                    .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let n = v["services"][0]["endpoints"]
                .as_array()
                .map_or(0, |e| e.len());
            (status == 200 && n == N).then_some(())
        },
    );
    assert_eq!(
        a.beacon.log_text().matches("etcd: listed").count(),
        1,
        "one list"
    );
    // The huge values were read too (and refused as values).
    assert_eq!(
        a.beacon
            .log_text()
            .matches("etcd: ignored a value that does not parse")
            .count(),
        5
    );
}

/// An idle node keeps its watch and its publishing session: no reconnect
/// (etcd closes connections that ping it too often: at a 1 s keepalive every
/// watch was cut every 4 s, idle or not), no warning, little CPU.
#[test]
fn etcd_an_idle_node_keeps_its_watch_and_its_session() {
    let etcd = EtcdCluster::start(1);
    let a = Node::start("node-a", 1, &etcd.endpoints_toml());
    a.beacon.wait_ready();
    let pid = a.beacon.child.id();
    let cpu0 = super::harness::cpu_seconds(pid);
    let seen = a.beacon.log_text().len();
    // Over three cycles of the old cut (4 s) and two keepalive intervals.
    std::thread::sleep(Duration::from_secs(13));
    let cpu = super::harness::cpu_seconds(pid) - cpu0;
    let log = a.beacon.log_text()[seen..].to_string();
    for bad in ["watch lost", "publishing interrupted", "WARN"] {
        assert!(!log.contains(bad), "`{bad}` while idle:\n{log}");
    }
    assert_eq!(a.a(), ["127.0.0.11"]);
    // Its probes run every 200 ms; the rest is quiet.
    assert!(cpu < 0.5, "{cpu:.2} s of CPU over 13 s idle");
}

/// Propagation of an endpoint change on node a to node c's DNS answer, p50
/// and p99 (`BEACON_PROPAGATION_CHANGES`, default 60; BENCHMARKS.md has a
/// 200-change run). A change is a services-file rewrite on a (its file
/// watcher's 50 ms debounce included); the etcd hop is c's time minus a's.
#[test]
fn etcd_propagation_from_node_a_to_node_c() {
    let _timing = super::harness::timing_lock();
    let changes: usize = std::env::var("BEACON_PROPAGATION_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let etcd = EtcdCluster::start(3);
    let e = etcd.endpoints_toml();
    let a = Node::start("node-a", 1, &e);
    let c = Node::start("node-c", 3, &e);
    let _extra = BackendProcess::start(
        "extra",
        format!("127.0.0.21:{}", a.backend.addr.port())
            .parse()
            .unwrap(),
    );
    let base = ips(&[&a, &c]);
    eventually(Duration::from_secs(10), "converged", || {
        (c.a() == base).then_some(())
    });
    let mut with = base.clone();
    with.push("127.0.0.21".into());
    with.sort();
    let (mut at_c, mut hop) = (Vec::new(), Vec::new());
    for i in 0..changes {
        let want = if i % 2 == 0 { &with } else { &base };
        let t = Instant::now();
        a.set_extra(if i % 2 == 0 { &["127.0.0.21"] } else { &[] });
        let (mut seen_a, mut seen_c) = (None, None);
        while seen_c.is_none() || seen_a.is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "change {i} not propagated"
            );
            if seen_a.is_none() && a.a() == *want {
                seen_a = Some(t.elapsed());
            }
            if seen_c.is_none() && c.a() == *want {
                seen_c = Some(t.elapsed());
            }
        }
        let (sa, sc) = (seen_a.unwrap(), seen_c.unwrap());
        at_c.push(sc);
        hop.push(sc.saturating_sub(sa));
        std::thread::sleep(Duration::from_millis(20));
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    let (c50, c99) = (pct(&mut at_c, 0.5), pct(&mut at_c, 0.99));
    let (h50, h99) = (pct(&mut hop, 0.5), pct(&mut hop, 0.99));
    eprintln!(
        "propagation over {changes} changes: file on a -> DNS on c p50 {c50:?} p99 {c99:?}; etcd hop (c - a) p50 {h50:?} p99 {h99:?}"
    );
    assert!(h99 < Duration::from_millis(500), "etcd hop p99 {h99:?}");
}
