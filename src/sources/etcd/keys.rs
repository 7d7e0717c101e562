//! The cluster format in etcd: keys and JSON values, pure (no I/O).
//!
//! Every key lives under `<prefix>/nodes/<node>/` (the format version is in
//! the prefix, `/beacon/v1`), attached to that node's lease:
//! - `services/<ns>/<name>`: the service spec as that node has it
//!   ([`SpecValue`]), once per node per service;
//! - `endpoints/<ns>/<name>/<ip>`: one endpoint ([`EndpointValue`]), with
//!   the publishing node's verdict in `ready`.
//!
//! Values are lenient on input (every field but `ports[].port` has a
//! default), so `etcdctl put` can register an endpoint by hand.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::ServiceDefaults;
use crate::model::{Balance, Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec};

/// What one key says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Service {
        node: Arc<str>,
        service: ServiceKey,
    },
    Endpoint {
        node: Arc<str>,
        service: ServiceKey,
        ip: IpAddr,
    },
}

impl Key {
    pub fn node(&self) -> &Arc<str> {
        match self {
            Key::Service { node, .. } | Key::Endpoint { node, .. } => node,
        }
    }

    pub fn service(&self) -> &ServiceKey {
        match self {
            Key::Service { service, .. } | Key::Endpoint { service, .. } => service,
        }
    }
}

/// `<prefix>/nodes/`: everything beacon keeps in etcd.
pub fn nodes_prefix(prefix: &str) -> String {
    format!("{prefix}/nodes/")
}

/// The end of the range of every key starting with `prefix` (etcd's
/// `range_end` for a prefix read): the prefix with its last byte below
/// 0xff incremented and what follows dropped; `[0]` (to the end of the
/// keyspace) when there is none.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `<prefix>/nodes/<node>/`: one node's keys.
pub fn node_prefix(prefix: &str, node: &str) -> String {
    format!("{prefix}/nodes/{node}/")
}

pub fn service_key(prefix: &str, node: &str, s: &ServiceKey) -> String {
    format!("{prefix}/nodes/{node}/services/{}/{}", s.namespace, s.name)
}

pub fn endpoint_key(prefix: &str, node: &str, s: &ServiceKey, ip: IpAddr) -> String {
    format!(
        "{prefix}/nodes/{node}/endpoints/{}/{}/{ip}",
        s.namespace, s.name
    )
}

/// Reads a key under `prefix`; `None` for anything else (ignored: a newer
/// format or a typo must not break the watcher).
pub fn parse(prefix: &str, key: &[u8]) -> Option<Key> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?.strip_prefix("/nodes/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let label = |s: &str| !s.is_empty() && crate::config::is_dns_label(&s.to_ascii_lowercase());
    match parts.as_slice() {
        [node, "services", ns, name] if !node.is_empty() && label(ns) && label(name) => {
            Some(Key::Service {
                node: (*node).into(),
                service: ServiceKey::new(ns, name),
            })
        }
        [node, "endpoints", ns, name, ip] if !node.is_empty() && label(ns) && label(name) => {
            Some(Key::Endpoint {
                node: (*node).into(),
                service: ServiceKey::new(ns, name),
                ip: ip.parse().ok()?,
            })
        }
        _ => None,
    }
}

/// A service spec as published. `listen` addresses are host-local and
/// never published; health and proxy timings come from each reader's own
/// `[health]`/`[proxy]` defaults, only the probe kind travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<IpAddr>,
    #[serde(default = "round_robin")]
    pub balance: String,
    #[serde(default)]
    pub ports: Vec<PortValue>,
    #[serde(default)]
    pub probe: ProbeValue,
    #[serde(default)]
    pub fail_open: bool,
}

fn round_robin() -> String {
    "round_robin".into()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortValue {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "tcp".into()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum ProbeValue {
    #[default]
    Tcp,
    Http {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
    },
    None,
}

/// One endpoint as published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointValue {
    /// The port to connect to (every service port); default: the spec's
    /// `target_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Ready in its source and healthy by its node's own checks.
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

// === impl SpecValue ===

impl SpecValue {
    pub fn of(spec: &ServiceSpec) -> Self {
        let balance = Balance::ALL
            .iter()
            .find(|(_, b)| *b == spec.balance)
            .map_or("round_robin", |(n, _)| n);
        Self {
            vip: spec.vip,
            balance: balance.into(),
            ports: spec
                .ports
                .iter()
                .map(|p| PortValue {
                    name: p.name.to_string(),
                    port: p.port,
                    target_port: (p.target_port != p.port).then_some(p.target_port),
                    protocol: p.protocol.as_str().into(),
                })
                .collect(),
            probe: match &spec.health.probe {
                ProbeKind::Tcp => ProbeValue::Tcp,
                ProbeKind::Http { path, host } => ProbeValue::Http {
                    path: path.to_string(),
                    host: host.as_ref().map(|h| h.to_string()),
                },
                ProbeKind::None => ProbeValue::None,
            },
            fail_open: spec.fail_open,
        }
    }

    /// The spec this value describes, without endpoints; `None` when a
    /// field names something this version does not know.
    pub fn to_spec(&self, key: ServiceKey, defaults: &ServiceDefaults) -> Option<ServiceSpec> {
        let mut spec = ServiceSpec::new(key);
        spec.vip = self.vip;
        spec.balance = Balance::ALL
            .iter()
            .find(|(n, _)| *n == self.balance)
            .map(|(_, b)| *b)?;
        for p in &self.ports {
            spec.ports.push(Port {
                name: p.name.as_str().into(),
                port: p.port,
                target_port: p.target_port.unwrap_or(p.port),
                protocol: match p.protocol.as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    _ => return None,
                },
                listen: None,
            });
        }
        spec.health = defaults.health.clone();
        spec.health.probe = match &self.probe {
            ProbeValue::Tcp => ProbeKind::Tcp,
            ProbeValue::Http { path, host } => ProbeKind::Http {
                path: path.as_str().into(),
                host: host.as_deref().map(Into::into),
            },
            ProbeValue::None => ProbeKind::None,
        };
        spec.proxy = defaults.proxy.clone();
        spec.fail_open = self.fail_open;
        Some(spec)
    }
}

// === impl EndpointValue ===

impl EndpointValue {
    /// `e` of `spec` as this node publishes it: `serving` is this node's
    /// verdict. The port is made explicit when the spec has one port, so
    /// that a node whose spec loses still gets its own target port.
    pub fn of(e: &Endpoint, spec: &ServiceSpec, serving: bool) -> Self {
        let port = match spec.ports.as_slice() {
            [only] => Some(e.port.unwrap_or(only.target_port)),
            _ => e.port,
        };
        Self {
            port,
            ready: e.ready && serving,
            weight: e.weight,
            hostname: e.hostname.as_ref().map(|h| h.to_string()),
        }
    }

    pub fn to_endpoint(&self, ip: IpAddr, node: &Arc<str>) -> Endpoint {
        Endpoint {
            ip,
            hostname: self
                .hostname
                .as_deref()
                .filter(|h| crate::config::is_dns_label(h))
                .map(Into::into),
            weight: self.weight,
            ready: self.ready,
            port: self.port,
            via: Some(node.clone()),
            terminating: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/beacon/v1";

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(
            prefix_end(b"/beacon/v1/nodes/"),
            b"/beacon/v1/nodes0".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn keys_round_trip_and_foreign_keys_are_ignored() {
        let svc = ServiceKey::new("default", "web");
        let ip: IpAddr = "127.0.0.11".parse().unwrap();
        let k = service_key(P, "host-a", &svc);
        assert_eq!(k, "/beacon/v1/nodes/host-a/services/default/web");
        assert_eq!(
            parse(P, k.as_bytes()),
            Some(Key::Service {
                node: "host-a".into(),
                service: svc.clone()
            })
        );
        let k = endpoint_key(P, "host-a", &svc, ip);
        assert_eq!(
            k,
            "/beacon/v1/nodes/host-a/endpoints/default/web/127.0.0.11"
        );
        let parsed = parse(P, k.as_bytes()).unwrap();
        assert_eq!(parsed.node().as_ref(), "host-a");
        assert_eq!(parsed.service(), &svc);
        for bad in [
            "/beacon/v2/nodes/a/services/default/web",
            "/beacon/v1/nodes/a/services/default",
            "/beacon/v1/nodes/a/endpoints/default/web/not-an-ip",
            "/beacon/v1/nodes//services/default/web",
            "/beacon/v1/nodes/a/services/Bad_Ns/web",
            "/beacon/v1/nodes/a/other/default/web",
        ] {
            assert_eq!(parse(P, bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(parse(P, &[0xff, 0xfe]), None);
    }

    #[test]
    fn spec_round_trips_without_listen_and_with_reader_defaults() {
        let mut spec = ServiceSpec::new(ServiceKey::new("default", "web"));
        spec.vip = Some("127.0.0.20".parse().unwrap());
        spec.balance = Balance::LeastConn;
        spec.ports.push(Port {
            name: "http".into(),
            port: 80,
            target_port: 9001,
            protocol: Protocol::Tcp,
            listen: Some("127.0.0.1:8080".parse().unwrap()),
        });
        spec.health.probe = ProbeKind::None;
        let v = SpecValue::of(&spec);
        let json = serde_json::to_string(&v).unwrap();
        let back: SpecValue = serde_json::from_str(&json).unwrap();
        let defaults = ServiceDefaults {
            health: Default::default(),
            proxy: Default::default(),
        };
        let got = back.to_spec(spec.key.clone(), &defaults).unwrap();
        assert_eq!(got.ports[0].listen, None, "listen is host-local");
        spec.ports[0].listen = None;
        assert_eq!(got, spec);
    }

    #[test]
    fn a_hand_written_value_gets_defaults_and_unknown_names_are_refused() {
        let v: SpecValue =
            serde_json::from_str(r#"{"ports":[{"name":"http","port":80}]}"#).unwrap();
        let defaults = ServiceDefaults {
            health: Default::default(),
            proxy: Default::default(),
        };
        let spec = v
            .to_spec(ServiceKey::new("default", "web"), &defaults)
            .unwrap();
        assert_eq!(spec.ports[0].target_port, 80);
        assert_eq!(spec.balance, Balance::RoundRobin);
        let e: EndpointValue = serde_json::from_str(r#"{"port":9001}"#).unwrap();
        let ep = e.to_endpoint("127.0.0.40".parse().unwrap(), &"ext".into());
        assert!(ep.ready && ep.weight == 1 && ep.port == Some(9001));
        assert_eq!(ep.via.as_deref(), Some("ext"));
        let mut odd = v.clone();
        odd.balance = "fastest".into();
        assert!(
            odd.to_spec(ServiceKey::new("default", "web"), &defaults)
                .is_none()
        );
        assert!(serde_json::from_str::<EndpointValue>(r#"{"prot":1}"#).is_err());
    }

    #[test]
    fn endpoint_value_carries_the_nodes_verdict_and_its_own_port() {
        let mut spec = ServiceSpec::new(ServiceKey::new("default", "web"));
        spec.ports.push(Port {
            name: "http".into(),
            port: 80,
            target_port: 9001,
            protocol: Protocol::Tcp,
            listen: None,
        });
        let e = Endpoint::new("127.0.0.11".parse().unwrap());
        let v = EndpointValue::of(&e, &spec, false);
        assert!(!v.ready, "unhealthy here is not ready elsewhere");
        assert_eq!(v.port, Some(9001));
        assert!(EndpointValue::of(&e, &spec, true).ready);
    }
}
