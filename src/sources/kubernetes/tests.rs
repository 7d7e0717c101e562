use super::*;
use serde_json::json;

fn svc(name: &str, ns: &str, ip: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap()
}

fn slice(name: &str, ns: &str, service: &str, ips: &[&str]) -> EndpointSlice {
    let endpoints: Vec<_> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints
    }))
    .unwrap()
}

fn list_services(store: &mut Store, scope: usize, items: Vec<Service>) -> Vec<Update> {
    let mut out = store.apply(Tagged::service(scope, Ok(Event::Init)));
    for s in items {
        out.extend(store.apply(Tagged::service(scope, Ok(Event::InitApply(s)))));
    }
    out.extend(store.apply(Tagged::service(scope, Ok(Event::InitDone))));
    out
}

fn list_slices(store: &mut Store, scope: usize, items: Vec<EndpointSlice>) -> Vec<Update> {
    let mut out = store.apply(Tagged::slice(scope, Ok(Event::Init)));
    for s in items {
        out.extend(store.apply(Tagged::slice(scope, Ok(Event::InitApply(s)))));
    }
    out.extend(store.apply(Tagged::slice(scope, Ok(Event::InitDone))));
    out
}

pub(super) fn describe(updates: &[Update]) -> Vec<String> {
    updates
        .iter()
        .map(|u| match u {
            Update::Reset(all) => {
                let mut names: Vec<String> = all
                    .iter()
                    .map(|s| format!("{}:{}", s.key, s.endpoints.len()))
                    .collect();
                names.sort();
                format!("reset[{}]", names.join(","))
            }
            Update::Upsert(s) => format!("upsert {}:{}", s.key, s.endpoints.len()),
            Update::Remove(k) => format!("remove {k}"),
            Update::Connected(up) => format!("connected {up}"),
            Update::Conflicts(c) => format!("conflicts {}", c.len()),
        })
        .collect()
}

fn synced_store() -> Store {
    let mut store = Store::new(&[], ServiceDefaults::default());
    assert!(list_services(&mut store, 0, vec![svc("web", "shop", "10.96.0.1")]).is_empty());
    let out = list_slices(
        &mut store,
        0,
        vec![slice("web-a", "shop", "web", &["10.0.0.1", "10.0.0.2"])],
    );
    assert_eq!(describe(&out), ["reset[web.shop:2]"]);
    store
}

#[test]
fn the_first_list_of_every_watch_is_one_reset() {
    let mut store = Store::new(&[], ServiceDefaults::default());
    // Events before every watch listed once send nothing.
    assert!(
        list_slices(
            &mut store,
            0,
            vec![slice("web-a", "shop", "web", &["10.0.0.1"])]
        )
        .is_empty()
    );
    let late = slice("web-b", "shop", "web", &["10.0.0.3"]);
    assert!(
        store
            .apply(Tagged::slice(0, Ok(Event::Apply(late))))
            .is_empty()
    );
    let out = list_services(&mut store, 0, vec![svc("web", "shop", "10.96.0.1")]);
    assert_eq!(describe(&out), ["reset[web.shop:2]"]);
}

#[test]
fn later_events_upsert_or_remove_only_the_service_they_touch() {
    let mut store = synced_store();
    let out = store.apply(Tagged::service(
        0,
        Ok(Event::Apply(svc("api", "shop", "10.96.0.2"))),
    ));
    assert_eq!(describe(&out), ["upsert api.shop:0"]);
    let out = store.apply(Tagged::slice(
        0,
        Ok(Event::Apply(slice("web-b", "shop", "web", &["10.0.0.3"]))),
    ));
    assert_eq!(describe(&out), ["upsert web.shop:3"]);
    // The same object again changes nothing: nothing sent.
    let out = store.apply(Tagged::slice(
        0,
        Ok(Event::Apply(slice("web-b", "shop", "web", &["10.0.0.3"]))),
    ));
    assert!(out.is_empty());
    let out = store.apply(Tagged::slice(
        0,
        Ok(Event::Delete(slice("web-a", "shop", "web", &[]))),
    ));
    assert_eq!(describe(&out), ["upsert web.shop:1"]);
    let out = store.apply(Tagged::service(
        0,
        Ok(Event::Delete(svc("web", "shop", "10.96.0.1"))),
    ));
    assert_eq!(describe(&out), ["remove web.shop"]);
}

#[test]
fn a_relist_after_410_sends_only_the_difference() {
    let mut store = synced_store();
    // A 410 Gone makes the watcher list again: Init .. InitDone.
    let out = list_slices(
        &mut store,
        0,
        vec![slice("web-a", "shop", "web", &["10.0.0.1", "10.0.0.2"])],
    );
    assert!(out.is_empty(), "unchanged list: {:?}", describe(&out));
    let out = list_slices(
        &mut store,
        0,
        vec![slice("web-c", "shop", "web", &["10.0.0.7"])],
    );
    assert_eq!(describe(&out), ["upsert web.shop:1"]);
    let out = list_services(&mut store, 0, vec![]);
    assert_eq!(describe(&out), ["remove web.shop"]);
}

#[test]
fn errors_change_nothing_and_the_last_state_stays() {
    let mut store = synced_store();
    let err = || watcher::Error::NoResourceVersion;
    // The first error of an outage says the source lost its upstream;
    // later ones say nothing.
    let out = store.apply(Tagged::service(0, Err(err())));
    assert_eq!(describe(&out), ["connected false"]);
    assert!(store.apply(Tagged::slice(0, Err(err()))).is_empty());
    // A 410 Gone is no outage.
    let mut fresh = synced_store();
    let gone = kube::core::Status::failure("too old", "Expired").with_code(410);
    let out = fresh.apply(Tagged::slice(
        0,
        Err(watcher::Error::WatchError(Box::new(gone))),
    ));
    assert!(out.is_empty() && fresh.connected());
    assert_eq!(store.sent().len(), 1);
    assert_eq!(store.sent().values().next().unwrap().endpoints.len(), 2);
    // The next event (or a probe) says it is back.
    let out = store.apply(Tagged::slice(
        0,
        Ok(Event::Apply(slice("web-b", "shop", "web", &[]))),
    ));
    assert_eq!(describe(&out), ["connected true"]);
    assert!(store.reached().is_none());
}

#[test]
fn a_relabeled_slice_moves_between_services() {
    let mut store = synced_store();
    store.apply(Tagged::service(
        0,
        Ok(Event::Apply(svc("api", "shop", "10.96.0.2"))),
    ));
    let moved = slice("web-a", "shop", "api", &["10.0.0.1", "10.0.0.2"]);
    let mut out = describe(&store.apply(Tagged::slice(0, Ok(Event::Apply(moved)))));
    out.sort();
    assert_eq!(out, ["upsert api.shop:2", "upsert web.shop:0"]);
}

#[test]
fn namespaces_are_separate_scopes() {
    let mut store = Store::new(&["a".into(), "b".into()], ServiceDefaults::default());
    list_services(&mut store, 0, vec![svc("web", "a", "10.96.0.1")]);
    list_slices(&mut store, 0, vec![]);
    list_services(&mut store, 1, vec![svc("web", "b", "10.96.0.2")]);
    let out = list_slices(&mut store, 1, vec![]);
    assert_eq!(describe(&out), ["reset[web.a:0,web.b:0]"]);
    // A re-list of namespace b does not drop namespace a.
    let out = list_services(&mut store, 1, vec![]);
    assert_eq!(describe(&out), ["remove web.b"]);
    assert!(store.sent().contains_key(&ServiceKey::new("a", "web")));
}

#[test]
fn a_service_is_kept_as_the_fields_beacon_reads() {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}",
                            "beacon.io/balance": "p2c", "beacon.io/listen-vip": " true"},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1", "fd00::1"],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                           {"name": "sctp", "port": 90, "protocol": "SCTP"},
                           {"name": "named", "port": 91, "protocol": "UDP", "targetPort": "dns"}]}
    }))
    .unwrap();
    let ServiceRecord::Cluster(kept) = ServiceRecord::new(&svc) else {
        panic!("a ClusterIP service is a cluster record");
    };
    let port = |name: &str, protocol, port, target_port| record::ServicePortRecord {
        name: name.into(),
        protocol,
        port,
        target_port,
    };
    let want = record::ClusterRecord {
        vip: Some("10.96.0.1".parse().unwrap()),
        second_vip: Some("fd00::1".parse().unwrap()),
        ports: [
            port("http", crate::model::Protocol::Tcp, 80, Some(8080)),
            port("named", crate::model::Protocol::Udp, 91, None),
        ]
        .into(),
        publish_not_ready: false,
        listen: None,
        listen_vip: true,
        balance: Some("p2c".into()),
    };
    assert_eq!(*kept, want);
    let alias: Service = serde_json::from_value(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"type": "ExternalName", "externalName": "DB.Example.COM."}
    }))
    .unwrap();
    assert_eq!(
        ServiceRecord::new(&alias),
        ServiceRecord::Alias(Some("db.example.com".into()))
    );
}

#[test]
fn a_slice_is_kept_as_its_ports_and_addressed_endpoints() {
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-a", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "hostname": "web-0", "nodeName": "n1",
             "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["not-an-ip"]},
            {"addresses": ["10.0.0.3"], "hostname": "Not_A_Label"}
        ]
    }))
    .unwrap();
    let kept = SliceRecord::new(&s);
    assert_eq!(kept.ports.len(), 1);
    assert_eq!(kept.ports[0].port, Some(8080));
    assert_eq!(kept.ports[0].protocol, Some(crate::model::Protocol::Tcp));
    let eps: Vec<_> = kept
        .endpoints
        .iter()
        .map(|e| {
            let host = e.hostname.as_deref().unwrap_or("-");
            format!(
                "{} {host} {} {} {}",
                e.ip, e.ready, e.serving, e.terminating
            )
        })
        .collect();
    assert_eq!(
        eps,
        [
            "10.0.0.1 web-0 false true true",
            "10.0.0.3 - true true false"
        ]
    );
    let mut fqdn = s.clone();
    fqdn.address_type = "FQDN".into();
    let kept = SliceRecord::new(&fqdn);
    assert!(kept.endpoints.is_empty(), "an FQDN slice maps no endpoint");
    assert_eq!(kept.ports.len(), 1, "but its ports still match by name");
}
