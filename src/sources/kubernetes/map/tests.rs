use super::*;
use serde_json::json;

fn service(v: serde_json::Value) -> Service {
    serde_json::from_value(v).unwrap()
}

fn slice(v: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(v).unwrap()
}

fn cluster_ip() -> Service {
    service(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "10"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
                           {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}
    }))
}

fn web_slice(name: &str, endpoints: serde_json::Value) -> EndpointSlice {
    slice(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
}

fn defaults() -> ServiceDefaults {
    ServiceDefaults::default()
}

#[test]
fn cluster_ip_service_maps_vip_ports_and_slice_ports() {
    let s = web_slice("web-a", json!([{"addresses": ["10.0.0.1"]}]));
    let spec = service_spec(&cluster_ip(), [&s], &defaults()).unwrap();
    assert_eq!(spec.key, ServiceKey::new("shop", "web"));
    assert_eq!(spec.vip, Some("10.96.0.10".parse().unwrap()));
    assert!(!spec.listen_vip, "no vip listener unless the service asks");
    assert_eq!(spec.health.probe, ProbeKind::None);
    assert_eq!(spec.ports.len(), 2);
    let http = &spec.ports[0];
    assert_eq!(
        (&*http.name, http.port, http.target_port),
        ("http", 80, 8080)
    );
    let dns = &spec.ports[1];
    assert_eq!(
        (dns.protocol, dns.port, dns.target_port),
        (Protocol::Udp, 53, 5353)
    );
    assert_eq!(spec.endpoints.len(), 1);
    assert!(spec.endpoints[0].ready, "unset ready means ready");
}

#[test]
fn conditions_map_to_ready_and_terminating() {
    let s = web_slice(
        "web-a",
        json!([
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": false}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}}
        ]),
    );
    let spec = service_spec(&cluster_ip(), [&s], &defaults()).unwrap();
    let flags: Vec<(bool, bool)> = spec
        .endpoints
        .iter()
        .map(|e| (e.ready, e.terminating))
        .collect();
    assert_eq!(
        flags,
        vec![(true, false), (false, false), (false, true), (false, false)]
    );
}

#[test]
fn publish_not_ready_addresses_makes_every_endpoint_ready() {
    let mut svc = cluster_ip();
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    let s = web_slice(
        "web-a",
        json!([{"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]),
    );
    let spec = service_spec(&svc, [&s], &defaults()).unwrap();
    assert!(spec.endpoints[0].ready);
}

#[test]
fn two_slices_merge_and_a_duplicate_address_keeps_the_ready_one() {
    let a = web_slice(
        "web-a",
        json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": false}}]),
    );
    let b = web_slice(
        "web-b",
        json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.9"]}]),
    );
    let spec = service_spec(&cluster_ip(), [&a, &b], &defaults()).unwrap();
    let ips: Vec<String> = spec.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.0.1", "10.0.0.9"]);
    assert!(spec.endpoints.iter().all(|e| e.ready));
}

#[test]
fn headless_with_hostnames_and_ipv6() {
    let svc = service(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}
    }));
    let v4 = slice(json!({
        "metadata": {"name": "db-v4", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.1.1"], "hostname": "db-0"}]
    }));
    let v6 = slice(json!({
        "metadata": {"name": "db-v6", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv6",
        "endpoints": [{"addresses": ["fd00::1"], "hostname": "db-0"}]
    }));
    let fqdn = slice(json!({
        "metadata": {"name": "db-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "FQDN",
        "endpoints": [{"addresses": ["db.example.com"]}]
    }));
    let spec = service_spec(&svc, [&v4, &v6, &fqdn], &defaults()).unwrap();
    assert!(spec.is_headless());
    assert_eq!(spec.ports[0].target_port, 5432);
    assert_eq!(spec.endpoints.len(), 2);
    assert!(
        spec.endpoints
            .iter()
            .all(|e| e.hostname.as_deref() == Some("db-0"))
    );
    assert_eq!(slice_service(&v4), Some(ServiceKey::new("shop", "db")));
}

#[test]
fn external_name_is_an_alias_without_endpoints() {
    let svc = service(json!({
        "metadata": {"name": "mail", "namespace": "shop"},
        "spec": {"type": "ExternalName", "externalName": "Mail.Example.COM."}
    }));
    let spec = service_spec(&svc, [], &defaults()).unwrap();
    assert_eq!(spec.external_name.as_deref(), Some("mail.example.com"));
    assert!(spec.vip.is_none() && spec.ports.is_empty());
}

#[test]
fn annotations_ask_for_listeners_and_a_policy() {
    let mut svc = cluster_ip();
    svc.metadata.annotations = Some(
        [
            (
                ANNOTATION_LISTEN.to_string(),
                "127.0.0.1:8081, dns=127.0.0.1:5300,bogus".to_string(),
            ),
            (ANNOTATION_LISTEN_VIP.to_string(), "true".to_string()),
            (ANNOTATION_BALANCE.to_string(), "least_conn".to_string()),
        ]
        .into(),
    );
    let spec = service_spec(&svc, [], &defaults()).unwrap();
    assert!(spec.listen_vip);
    assert_eq!(spec.balance, Balance::LeastConn);
    assert_eq!(
        spec.ports[0].listen,
        Some("127.0.0.1:8081".parse().unwrap())
    );
    assert_eq!(
        spec.ports[1].listen,
        Some("127.0.0.1:5300".parse().unwrap())
    );
}

#[test]
fn a_slice_with_another_port_overrides_it_for_its_endpoints() {
    let svc = service(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}
    }));
    let old = slice(json!({
        "metadata": {"name": "web-a", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 8080}],
        "endpoints": [{"addresses": ["10.0.0.1"]}]
    }));
    let new = slice(json!({
        "metadata": {"name": "web-b", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 9090}],
        "endpoints": [{"addresses": ["10.0.0.2"]}]
    }));
    let spec = service_spec(&svc, [&old, &new], &defaults()).unwrap();
    assert_eq!(spec.ports[0].target_port, 8080);
    assert_eq!(spec.endpoints[0].port, None);
    assert_eq!(spec.endpoints[1].port, Some(9090));
}

#[test]
fn dual_stack_cluster_ips_give_a_second_vip_and_v6_slices_merge() {
    let dual = service(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"],
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                 "ports": [{"name": "http", "port": 80}]}
    }));
    let spec = service_spec(&dual, [], &ServiceDefaults::default()).unwrap();
    assert_eq!(spec.vip, Some("10.96.0.10".parse().unwrap()));
    assert_eq!(spec.second_vip, Some("fd00::10".parse().unwrap()));
    // IPv6 first: the v4 one is the second.
    let v6_first = service(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.10"]}
    }));
    let spec = service_spec(&v6_first, [], &ServiceDefaults::default()).unwrap();
    assert_eq!(spec.second_vip, Some("10.96.0.10".parse().unwrap()));
    // Single stack: none.
    let spec = service_spec(&cluster_ip(), [], &ServiceDefaults::default()).unwrap();
    assert_eq!(spec.second_vip, None);

    // Headless dual-stack: the IPv4 and the IPv6 slice of one service merge.
    let headless = service(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"name": "pg", "port": 5432}]}
    }));
    let family = |name: &str, family: &str, ip: &str| {
        slice(json!({
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": family,
            "endpoints": [{"addresses": [ip], "hostname": "db-0"}]
        }))
    };
    let v4 = family("db-v4", "IPv4", "10.0.1.10");
    let v6 = family("db-v6", "IPv6", "fd00::1:10");
    let spec = service_spec(&headless, [&v4, &v6], &ServiceDefaults::default()).unwrap();
    assert_eq!(spec.vip, None);
    assert_eq!(spec.second_vip, None);
    let ips: Vec<String> = spec.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.1.10", "fd00::1:10"]);
}
