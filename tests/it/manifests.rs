//! Every manifest in deploy/kubernetes parses into its k8s-openapi type, and
//! survives the round trip unchanged: k8s-openapi drops fields it does not
//! know, so a misspelled field shows as a difference. The beacon configs in
//! the ConfigMaps pass `beacon check`.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use serde::Deserialize;
use serde_json::Value;

use super::harness::{repo_path, run_cmd};

/// The object as its type reads it, back to JSON.
fn round_trip(doc: &Value) -> Value {
    fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Value {
        let t: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc}"));
        serde_json::to_value(t).unwrap()
    }
    match doc["kind"].as_str().unwrap_or_default() {
        "ServiceAccount" => typed::<ServiceAccount>(doc),
        "ClusterRole" => typed::<ClusterRole>(doc),
        "ClusterRoleBinding" => typed::<ClusterRoleBinding>(doc),
        "RoleBinding" => typed::<RoleBinding>(doc),
        "ConfigMap" => typed::<ConfigMap>(doc),
        "DaemonSet" => typed::<DaemonSet>(doc),
        "Deployment" => typed::<Deployment>(doc),
        "Service" => typed::<Service>(doc),
        other => panic!("no k8s-openapi type listed for kind {other:?}"),
    }
}

fn documents(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_path(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v = serde_yaml::Value::deserialize(d).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn check_config(doc: &Value) {
    let text = doc["data"]["beacon.toml"]
        .as_str()
        .expect("beacon.toml in the ConfigMap");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("beacon.toml");
    std::fs::write(&path, text).unwrap();
    let (status, out, err) = run_cmd(&["check", "--config", path.to_str().unwrap()]);
    assert!(status.success(), "beacon check: {out}{err}");
}

fn kinds(docs: &[Value]) -> Vec<&str> {
    docs.iter().map(|d| d["kind"].as_str().unwrap()).collect()
}

#[test]
fn kubernetes_manifests_parse_into_their_types_unchanged() {
    let files = ["rbac.yaml", "node-local.yaml", "sidecar.yaml"];
    let mut seen = Vec::new();
    for f in files {
        let docs = documents(&format!("deploy/kubernetes/{f}"));
        assert!(!docs.is_empty(), "{f} has no document");
        for doc in &docs {
            assert_eq!(
                &round_trip(doc),
                doc,
                "{f}: a field k8s-openapi does not know"
            );
            if doc["kind"] == "ConfigMap" {
                check_config(doc);
            }
        }
        seen.push((f, docs));
    }
    let all: Vec<&str> = seen.iter().flat_map(|(_, d)| kinds(d)).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Deployment",
    ] {
        assert!(all.contains(&kind), "{kind} missing: {all:?}");
    }
    // The ClusterRole reads services and endpointslices, and nothing else.
    let role = seen[0]
        .1
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .unwrap();
    let role: ClusterRole = serde_json::from_value(role.clone()).unwrap();
    let mut granted = Vec::new();
    for rule in role.rules.unwrap() {
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        granted.extend(rule.resources.unwrap());
    }
    assert_eq!(granted, ["services", "endpointslices"]);
    // The DaemonSet: host network, DNS on the link-local address, probes.
    let ds = seen[1].1.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let ds: DaemonSet = serde_json::from_value(ds.clone()).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let beacon = pod.containers.iter().find(|c| c.name == "beacon").unwrap();
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&beacon.readiness_probe).as_deref(), Some("/readyz"));
    assert_eq!(path(&beacon.liveness_probe).as_deref(), Some("/healthz"));
    assert!(
        beacon
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .is_some()
    );
    let config = seen[1].1.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert!(
        config["data"]["beacon.toml"]
            .as_str()
            .unwrap()
            .contains("listen = \"169.254.20.10:53\"")
    );
}
