//! The `kubernetes` source end to end: the real binary against a replayed
//! API server (`kube_api`), checked with `dig` on the names the Kubernetes
//! DNS specification gives each case, through the proxy, and in
//! `/v1/services`. No kube-apiserver runs on these machines.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::harness::{BackendProcess, Beacon, Options, dig, eventually, fetch_name, free_port};
use super::kube_api::{ApiServer, Kind};

const WAIT: Duration = Duration::from_secs(10);

fn start_beacon(api: &ApiServer) -> Beacon {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let b = Beacon::start(Options {
        extra: format!(
            "[[source]]\ntype = \"kubernetes\"\nkubeconfig = \"{}\"\n",
            kubeconfig.display()
        ),
        ..Default::default()
    });
    // The kubeconfig's directory lives as long as the test.
    std::mem::forget(dir);
    b
}

fn service(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": ns,
        "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": spec})
}

fn slice(ns: &str, name: &str, svc: &str, port: Option<(&str, u16)>, endpoints: Value) -> Value {
    let ports = port.map_or(
        json!([]),
        |(n, p)| json!([{"name": n, "port": p, "protocol": "TCP"}]),
    );
    json!({
        "metadata": {"name": name, "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints
    })
}

fn ep(ip: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({"addresses": [ip], "nodeName": "node-a",
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn a(b: &Beacon, name: &str) -> Vec<String> {
    dig(b.dns, name, "A", false)
}

fn until(b: &Beacon, what: &str, name: &str, qtype: &str, want: &[&str]) {
    eventually(WAIT, what, || {
        (dig(b.dns, name, qtype, false) == want).then_some(())
    });
}

fn service_json(b: &Beacon, ns: &str, name: &str) -> Value {
    let all = b.services_json();
    let list = all["services"]
        .as_array()
        .or(all.as_array())
        .cloned()
        .unwrap_or_default();
    list.into_iter()
        .find(|s| {
            let k = if s["key"].is_object() { &s["key"] } else { s };
            k["name"] == name && k["namespace"] == ns
        })
        .unwrap_or_else(|| panic!("{name}.{ns} not in /v1/services: {all}"))
}

#[test]
fn kubernetes_services_slices_headless_and_external_name_in_dns() {
    let api = ApiServer::start();
    api.apply(
        Kind::Service,
        service(
            "shop",
            "web",
            json!({"type": "ClusterIP",
        "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}),
        ),
    );
    // One service over two slices.
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "web-abc",
            "web",
            Some(("http", 8080)),
            json!([ep("10.0.0.11", true, true, false)]),
        ),
    );
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "web-def",
            "web",
            Some(("http", 8080)),
            json!([ep("10.0.0.12", true, true, false)]),
        ),
    );
    // A headless StatefulSet-style service with hostnames.
    api.apply(
        Kind::Service,
        service(
            "shop",
            "db",
            json!({"clusterIP": "None",
        "clusterIPs": ["None"], "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}),
        ),
    );
    let mut db0 = ep("10.0.1.10", true, true, false);
    db0["hostname"] = json!("db-0");
    let mut db1 = ep("10.0.1.11", true, true, false);
    db1["hostname"] = json!("db-1");
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "db-xyz",
            "db",
            Some(("pg", 5432)),
            json!([db0, db1]),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "shop",
            "mail",
            json!({"type": "ExternalName",
        "externalName": "mail.example.com"}),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "shop",
            "front",
            json!({"type": "ExternalName",
        "externalName": "web.shop.svc.cluster.local"}),
        ),
    );
    let b = start_beacon(&api);
    b.wait_ready();

    assert_eq!(a(&b, "web.shop.svc.cluster.local"), ["10.96.0.10"]);
    assert_eq!(
        dig(b.dns, "_http._tcp.web.shop.svc.cluster.local", "SRV", false),
        ["0 100 80 web.shop.svc.cluster.local."]
    );
    let web = service_json(&b, "shop", "web");
    assert_eq!(
        web["endpoints"].as_array().unwrap().len(),
        2,
        "two slices merge: {web}"
    );
    assert_eq!(
        a(&b, "db.shop.svc.cluster.local"),
        ["10.0.1.10", "10.0.1.11"]
    );
    assert_eq!(a(&b, "db-1.db.shop.svc.cluster.local"), ["10.0.1.11"]);
    assert_eq!(
        dig(b.dns, "_pg._tcp.db.shop.svc.cluster.local", "SRV", false),
        [
            "0 1 5432 db-0.db.shop.svc.cluster.local.",
            "0 1 5432 db-1.db.shop.svc.cluster.local."
        ]
    );
    assert_eq!(
        dig(b.dns, "mail.shop.svc.cluster.local", "CNAME", false),
        ["mail.example.com."]
    );
    // An alias into the zone: the CNAME and the target's address.
    assert_eq!(
        a(&b, "front.shop.svc.cluster.local"),
        ["10.96.0.10", "web.shop.svc.cluster.local."]
    );

    // An endpoint turns not ready: it leaves DNS, and /v1/services says why.
    let mut db1 = ep("10.0.1.11", false, false, false);
    db1["hostname"] = json!("db-1");
    let mut db0 = ep("10.0.1.10", true, true, false);
    db0["hostname"] = json!("db-0");
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "db-xyz",
            "db",
            Some(("pg", 5432)),
            json!([db0, db1]),
        ),
    );
    until(
        &b,
        "db-1 leaves DNS",
        "db.shop.svc.cluster.local",
        "A",
        &["10.0.1.10"],
    );
    assert!(a(&b, "db-1.db.shop.svc.cluster.local").is_empty());
    let db = service_json(&b, "shop", "db");
    let db1 = db["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == "10.0.1.11")
        .cloned();
    let db1 = db1.unwrap_or_else(|| panic!("db-1 listed: {db}"));
    assert_eq!(db1["healthy"], false, "{db1}");
    assert_eq!(db1["reason"], "not ready in source", "{db1}");

    // A slice deleted: its endpoint leaves the merged service.
    api.delete(Kind::Slice, "shop", "web-def");
    eventually(WAIT, "web-def's endpoint gone", || {
        let web = service_json(&b, "shop", "web");
        (web["endpoints"].as_array().unwrap().len() == 1).then_some(())
    });
    // A service deleted: NXDOMAIN.
    api.delete(Kind::Service, "shop", "mail");
    until(&b, "mail gone", "mail.shop.svc.cluster.local", "CNAME", &[]);
}

/// A rolling update: the last ready endpoint terminates (still serving)
/// while its replacement is not ready yet. DNS lists neither; the proxy
/// keeps serving through the terminating one; then the new one takes over.
#[test]
fn kubernetes_rolling_update_serves_through_the_terminating_endpoint() {
    let old_addr: SocketAddr = format!("127.0.0.61:{}", free_port()).parse().unwrap();
    let new_addr: SocketAddr = format!("127.0.0.62:{}", old_addr.port()).parse().unwrap();
    let _old = BackendProcess::start("old", old_addr);
    let _new = BackendProcess::start("new", new_addr);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let api = ApiServer::start();
    let mut app = service(
        "shop",
        "app",
        json!({"clusterIP": "None",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}),
    );
    app["metadata"]["annotations"] = json!({"beacon.io/listen": listen.to_string()});
    api.apply(Kind::Service, app);
    let port = Some(("http", old_addr.port()));
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "app-1",
            "app",
            port,
            json!([ep("127.0.0.61", true, true, false)]),
        ),
    );
    let b = start_beacon(&api);
    b.wait_ready();
    assert_eq!(a(&b, "app.shop.svc.cluster.local"), ["127.0.0.61"]);
    assert_eq!(fetch_name(listen).as_deref(), Ok("old"));

    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "app-1",
            "app",
            port,
            json!([
                ep("127.0.0.61", false, true, true),
                ep("127.0.0.62", false, false, false)
            ]),
        ),
    );
    until(
        &b,
        "no ready endpoint in DNS",
        "app.shop.svc.cluster.local",
        "A",
        &[],
    );
    for i in 0..20 {
        assert_eq!(fetch_name(listen).as_deref(), Ok("old"), "connection {i}");
    }
    let app = service_json(&b, "shop", "app");
    let old = app["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == "127.0.0.61")
        .cloned();
    let old = old.unwrap_or_else(|| panic!("old endpoint listed: {app}"));
    assert_eq!(old["terminating"], true, "{old}");
    assert!(
        old["reason"].as_str().unwrap().contains("terminating"),
        "{old}"
    );

    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "app-1",
            "app",
            port,
            json!([
                ep("127.0.0.61", false, true, true),
                ep("127.0.0.62", true, true, false)
            ]),
        ),
    );
    until(
        &b,
        "the new endpoint in DNS",
        "app.shop.svc.cluster.local",
        "A",
        &["127.0.0.62"],
    );
    eventually(WAIT, "the proxy moves to the new endpoint", || {
        (fetch_name(listen).as_deref() == Ok("new")).then_some(())
    });
    for i in 0..10 {
        assert_eq!(fetch_name(listen).as_deref(), Ok("new"), "connection {i}");
    }
}

/// The API server goes away (the last state stays served) and comes back
/// (the watch resumes); then it comes back with its history compacted: the
/// watch gets 410 Gone and the source lists again.
#[test]
fn kubernetes_lost_api_server_and_410_relist() {
    let mut api = ApiServer::start();
    api.apply(
        Kind::Service,
        service(
            "shop",
            "web",
            json!({"clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80}]}),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "shop",
            "db",
            json!({"clusterIP": "None",
        "ports": [{"name": "pg", "port": 5432}]}),
        ),
    );
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "db-1",
            "db",
            Some(("pg", 5432)),
            json!([ep("10.0.1.10", true, true, false)]),
        ),
    );
    let b = start_beacon(&api);
    b.wait_ready();
    assert_eq!(a(&b, "db.shop.svc.cluster.local"), ["10.0.1.10"]);
    let lists_before = api.stats.lists.load(std::sync::atomic::Ordering::SeqCst);

    let gauge = "beacon_source_connected{source=\"kubernetes\"}";
    assert_eq!(b.metric(gauge), Some(1.0), "connected once synced");
    api.stop();
    eventually(WAIT, "the loss is visible", || {
        (b.metric(gauge) == Some(0.0)).then_some(())
    });
    let v = b.services_json();
    assert_eq!(v["disconnected"], json!(["kubernetes"]), "{v}");
    assert_eq!(
        a(&b, "db.shop.svc.cluster.local"),
        ["10.0.1.10"],
        "last state kept"
    );
    assert_eq!(a(&b, "web.shop.svc.cluster.local"), ["10.96.0.10"]);
    api.resume();
    eventually(
        WAIT,
        "back (nothing changed, so the probe tells): connected again",
        || (b.metric(gauge) == Some(1.0)).then_some(()),
    );
    let v = b.services_json();
    assert_eq!(v["disconnected"], json!([]), "{v}");
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "db-1",
            "db",
            Some(("pg", 5432)),
            json!([
                ep("10.0.1.10", true, true, false),
                ep("10.0.1.11", true, true, false)
            ]),
        ),
    );
    until(
        &b,
        "the resumed watch brings the change",
        "db.shop.svc.cluster.local",
        "A",
        &["10.0.1.10", "10.0.1.11"],
    );
    let errors = b.metric("beacon_source_errors_total{source=\"kubernetes\"}");
    assert!(errors.unwrap_or(0.0) >= 1.0, "errors counted: {errors:?}");

    api.stop();
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "db-1",
            "db",
            Some(("pg", 5432)),
            json!([ep("10.0.1.12", true, true, false)]),
        ),
    );
    api.delete(Kind::Service, "shop", "web");
    api.compact();
    api.resume();
    until(
        &b,
        "the re-list brings the new endpoint",
        "db.shop.svc.cluster.local",
        "A",
        &["10.0.1.12"],
    );
    until(
        &b,
        "the re-list drops the deleted service",
        "web.shop.svc.cluster.local",
        "A",
        &[],
    );
    assert!(
        api.stats.gone.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "a 410 was served"
    );
    let lists_after = api.stats.lists.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        lists_after > lists_before,
        "listed again: {lists_before} -> {lists_after}"
    );
}

/// Dual stack: a ClusterIP service with two clusterIPs answers A and AAAA;
/// a headless service's IPv4 and IPv6 slices merge.
#[test]
fn kubernetes_dual_stack_answers_a_and_aaaa() {
    let api = ApiServer::start();
    api.apply(
        Kind::Service,
        service(
            "shop",
            "web",
            json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "ports": [{"name": "http", "port": 80}]}),
        ),
    );
    api.apply(
        Kind::Service,
        service(
            "shop",
            "db",
            json!({"clusterIP": "None", "clusterIPs": ["None"],
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                "ports": [{"name": "pg", "port": 5432}]}),
        ),
    );
    api.apply(
        Kind::Slice,
        slice(
            "shop",
            "db-v4",
            "db",
            Some(("pg", 5432)),
            json!([ep("10.0.1.10", true, true, false)]),
        ),
    );
    let mut v6 = slice(
        "shop",
        "db-v6",
        "db",
        Some(("pg", 5432)),
        json!([ep("fd00::1:10", true, true, false)]),
    );
    v6["addressType"] = json!("IPv6");
    api.apply(Kind::Slice, v6);
    let b = start_beacon(&api);
    b.wait_ready();
    let web = "web.shop.svc.cluster.local";
    assert_eq!(dig(b.dns, web, "A", false), ["10.96.0.10"]);
    assert_eq!(dig(b.dns, web, "AAAA", false), ["fd00::10"]);
    let db = "db.shop.svc.cluster.local";
    assert_eq!(dig(b.dns, db, "A", false), ["10.0.1.10"]);
    assert_eq!(dig(b.dns, db, "AAAA", false), ["fd00::1:10"]);
    // The second vip goes when the service turns single-stack.
    api.apply(
        Kind::Service,
        service(
            "shop",
            "web",
            json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80}]}),
        ),
    );
    until(&b, "single stack again", web, "AAAA", &[]);
    assert_eq!(dig(b.dns, web, "A", false), ["10.96.0.10"]);
}
