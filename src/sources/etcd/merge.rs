//! What every node published, and the spec this node serves for a
//! service: pure, no I/O.
//!
//! - The spec (vip, ports, policy, probe) of the node with the lowest name
//!   that publishes the service wins, this node's local spec included: every
//!   node picks the same one. The others are listed as conflicts.
//! - `listen` addresses are host-local: taken from this node's own spec.
//! - Endpoints are the union of this node's local ones (first, fresh: a
//!   local change does not wait for etcd) and every other node's, one per ip.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::ServiceDefaults;
use crate::model::{Conflict, ServiceKey, ServiceSpec};

use super::keys::{EndpointValue, Key, SpecValue};

/// This node's published local services, by key.
pub type Local = BTreeMap<ServiceKey, Arc<ServiceSpec>>;

/// Every other node's keys, by service.
#[derive(Debug, Default)]
pub struct Cluster {
    services: BTreeMap<ServiceKey, Published>,
}

#[derive(Debug, Default)]
struct Published {
    specs: BTreeMap<Arc<str>, SpecValue>,
    endpoints: BTreeMap<(Arc<str>, IpAddr), EndpointValue>,
}

/// Why a value was not taken.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {error}")]
pub struct BadValue {
    pub key: String,
    pub error: serde_json::Error,
}

impl Cluster {
    /// Records a put; the service it touched. A value that does not parse
    /// removes what the key said before (and is reported).
    pub fn put(&mut self, key: Key, value: &[u8]) -> (ServiceKey, Result<(), serde_json::Error>) {
        let published = self.services.entry(key.service().clone()).or_default();
        let result = match &key {
            Key::Service { node, .. } => serde_json::from_slice(value).map(|v| {
                published.specs.insert(node.clone(), v);
            }),
            Key::Endpoint { node, ip, .. } => serde_json::from_slice(value).map(|v| {
                published.endpoints.insert((node.clone(), *ip), v);
            }),
        };
        if result.is_err() {
            return (self.delete(key), result);
        }
        (key.service().clone(), Ok(()))
    }

    /// Records a delete; the service it touched.
    pub fn delete(&mut self, key: Key) -> ServiceKey {
        let service = key.service().clone();
        if let Some(p) = self.services.get_mut(&service) {
            match key {
                Key::Service { node, .. } => {
                    p.specs.remove(&node);
                }
                Key::Endpoint { node, ip, .. } => {
                    p.endpoints.remove(&(node, ip));
                }
            }
            if p.specs.is_empty() && p.endpoints.is_empty() {
                self.services.remove(&service);
            }
        }
        service
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// Endpoints in the cluster (for logs).
    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|p| p.endpoints.len()).sum()
    }
}

/// The service as this node serves it, and the nodes whose spec lost;
/// `None` when no node (this one included) has a usable spec for it.
pub fn merged(
    key: &ServiceKey,
    cluster: &Cluster,
    local: &Local,
    me: &str,
    defaults: &ServiceDefaults,
) -> Option<(ServiceSpec, Vec<Arc<str>>)> {
    let remote = cluster.services.get(key);
    let own = local.get(key);
    let mine = own.map(|s| SpecValue::of(s));
    // Candidates in node-name order; this node's own spec is its local one.
    let mut candidates: Vec<(&str, &SpecValue)> = remote
        .iter()
        .flat_map(|p| p.specs.iter())
        .filter(|(n, _)| &***n != me)
        .map(|(n, v)| (&**n, v))
        .collect();
    if let Some(m) = &mine {
        candidates.push((me, m));
    }
    candidates.sort_by(|a, b| a.0.cmp(b.0));
    let (winner, mut spec) = candidates.iter().find_map(|(node, v)| {
        if *node == me {
            own.map(|s| (*v, (**s).clone()))
        } else {
            v.to_spec(key.clone(), defaults).map(|s| (*v, s))
        }
    })?;
    let losers = candidates
        .iter()
        .filter(|(_, v)| *v != winner)
        .map(|(n, _)| Arc::from(*n))
        .collect();
    if let Some(own) = own {
        keep_own_listen(&mut spec, own);
    }
    spec.endpoints = own.map(|s| s.endpoints.clone()).unwrap_or_default();
    let mut seen: HashSet<IpAddr> = spec.endpoints.iter().map(|e| e.ip).collect();
    for ((node, ip), v) in remote.iter().flat_map(|p| p.endpoints.iter()) {
        if &**node != me && seen.insert(*ip) {
            spec.endpoints.push(v.to_endpoint(*ip, node));
        }
    }
    Some((spec, losers))
}

/// The node whose spec [`merged`] serves for `key`.
pub fn winner(key: &ServiceKey, cluster: &Cluster, local: &Local, me: &str) -> Option<Arc<str>> {
    let remote = cluster
        .services
        .get(key)
        .into_iter()
        .flat_map(|p| p.specs.keys());
    let mine = local.contains_key(key).then(|| Arc::from(me));
    remote.filter(|n| &***n != me).cloned().chain(mine).min()
}

/// The conflicts to list: one per losing node of each service, the claim
/// being that node's spec.
pub fn conflicts(
    losers: &BTreeMap<ServiceKey, Vec<Arc<str>>>,
    winners: BTreeMap<ServiceKey, Arc<str>>,
) -> Vec<Conflict> {
    let mut out = Vec::new();
    for (key, nodes) in losers {
        let winner: Arc<str> = winners
            .get(key)
            .map_or("?".into(), |w| format!("spec of node {w}").into());
        for n in nodes {
            out.push(Conflict {
                kind: "spec",
                service: key.clone(),
                claim: format!("spec of node {n}").into(),
                winner: winner.clone(),
            });
        }
    }
    out
}

/// `listen` addresses come from this node's own spec (by port name, else
/// by position), never from another node's.
fn keep_own_listen(spec: &mut ServiceSpec, own: &ServiceSpec) {
    for (i, port) in spec.ports.iter_mut().enumerate() {
        let mine = own
            .ports
            .iter()
            .find(|p| !p.name.is_empty() && p.name == port.name)
            .or_else(|| own.ports.get(i));
        port.listen = mine.and_then(|p| p.listen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Port, Protocol};

    fn defaults() -> ServiceDefaults {
        ServiceDefaults {
            health: Default::default(),
            proxy: Default::default(),
        }
    }

    fn spec(port: u16, ips: &[&str], listen: Option<&str>) -> ServiceSpec {
        let mut s = ServiceSpec::new(ServiceKey::new("default", "web"));
        s.ports.push(Port {
            name: "http".into(),
            port,
            target_port: port,
            protocol: Protocol::Tcp,
            listen: listen.map(|l| l.parse().unwrap()),
        });
        s.endpoints = ips
            .iter()
            .map(|i| Endpoint::new(i.parse().unwrap()))
            .collect();
        s
    }

    fn publish(c: &mut Cluster, node: &str, s: &ServiceSpec) {
        let svc = Key::Service {
            node: node.into(),
            service: s.key.clone(),
        };
        let v = serde_json::to_vec(&SpecValue::of(s)).unwrap();
        c.put(svc, &v).1.unwrap();
        for e in &s.endpoints {
            let k = Key::Endpoint {
                node: node.into(),
                service: s.key.clone(),
                ip: e.ip,
            };
            let v = serde_json::to_vec(&EndpointValue::of(e, s, true)).unwrap();
            c.put(k, &v).1.unwrap();
        }
    }

    #[test]
    fn union_of_nodes_local_first_and_lowest_node_spec_wins() {
        let key = ServiceKey::new("default", "web");
        let mut c = Cluster::default();
        publish(&mut c, "a", &spec(80, &["127.0.0.11"], None));
        publish(&mut c, "c", &spec(81, &["127.0.0.31", "127.0.0.11"], None));
        let mut local = Local::new();
        local.insert(
            key.clone(),
            Arc::new(spec(82, &["127.0.0.21"], Some("127.0.0.1:8080"))),
        );
        let (s, losers) = merged(&key, &c, &local, "b", &defaults()).unwrap();
        let ips: Vec<String> = s.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["127.0.0.21", "127.0.0.11", "127.0.0.31"]);
        assert_eq!(s.endpoints[0].via, None);
        assert_eq!(s.endpoints[1].via.as_deref(), Some("a"));
        assert_eq!(s.ports[0].port, 80, "node a's spec wins");
        assert_eq!(s.ports[0].listen, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(losers, vec![Arc::<str>::from("b"), Arc::from("c")]);
        // On node a the same spec wins.
        let mut local_a = Local::new();
        local_a.insert(key.clone(), Arc::new(spec(80, &["127.0.0.11"], None)));
        let (sa, _) = merged(&key, &c, &local_a, "a", &defaults()).unwrap();
        assert_eq!(sa.ports[0].port, 80);
    }

    #[test]
    fn a_node_that_leaves_takes_its_endpoints_and_spec() {
        let key = ServiceKey::new("default", "web");
        let mut c = Cluster::default();
        let a = spec(80, &["127.0.0.11"], None);
        publish(&mut c, "a", &a);
        assert!(merged(&key, &c, &Local::new(), "b", &defaults()).is_some());
        c.delete(Key::Endpoint {
            node: "a".into(),
            service: key.clone(),
            ip: "127.0.0.11".parse().unwrap(),
        });
        let (s, _) = merged(&key, &c, &Local::new(), "b", &defaults()).unwrap();
        assert!(s.endpoints.is_empty());
        c.delete(Key::Service {
            node: "a".into(),
            service: key.clone(),
        });
        assert!(merged(&key, &c, &Local::new(), "b", &defaults()).is_none());
        assert_eq!(c.services().count(), 0);
    }

    #[test]
    fn a_bad_value_removes_what_the_key_said() {
        let key = ServiceKey::new("default", "web");
        let mut c = Cluster::default();
        publish(&mut c, "a", &spec(80, &["127.0.0.11"], None));
        let k = Key::Endpoint {
            node: "a".into(),
            service: key.clone(),
            ip: "127.0.0.11".parse().unwrap(),
        };
        let (touched, r) = c.put(k, b"{not json");
        assert!(r.is_err());
        assert_eq!(touched, key);
        assert_eq!(c.endpoint_count(), 0);
    }

    #[test]
    fn conflicts_name_each_losing_node_and_the_winner() {
        let key = ServiceKey::new("default", "web");
        let mut c = Cluster::default();
        publish(&mut c, "b", &spec(81, &[], None));
        let mut local = Local::new();
        local.insert(key.clone(), Arc::new(spec(80, &[], None)));
        assert_eq!(winner(&key, &c, &local, "a").as_deref(), Some("a"));
        assert_eq!(winner(&key, &c, &Local::new(), "a").as_deref(), Some("b"));
        let (_, losers) = merged(&key, &c, &local, "a", &defaults()).unwrap();
        let list = conflicts(
            &[(key.clone(), losers)].into(),
            [(key.clone(), Arc::from("a"))].into(),
        );
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].kind, &*list[0].claim), ("spec", "spec of node b"));
        assert_eq!(&*list[0].winner, "spec of node a");
    }
}
