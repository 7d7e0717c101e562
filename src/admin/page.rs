//! What operators read: `/v1/services` with filtering and paging,
//! `/v1/events`, and the status page at `/` (one embedded file, no
//! external assets). A leaf: uses nothing else of `admin`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{
    Balance, ChangeEvent, Conflict, EndpointState, HealthSpec, Port, ProxyLive, ServiceState,
    Snapshot, SourceId, SourceStatus,
};
use crate::registry::events;

/// The status page: HTML, CSS and JS in one file, refreshing itself from
/// the JSON API.
pub const STATUS_PAGE: &str = include_str!("status.html");

/// Events one `/v1/events` answer carries at most (the newest ones).
pub const EVENTS_LIMIT: usize = 1000;

/// The query of `/v1/services`: every key optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServicesQuery {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only the service of this name.
    pub name: Option<String>,
    /// Only services whose `name.namespace` contains this (any case).
    pub search: Option<String>,
    /// Only services with an endpoint that is not healthy, or none serving.
    pub unhealthy: bool,
    /// Skip this many matching services (in key order: namespace, name).
    pub offset: usize,
    /// At most this many services (default: all).
    pub limit: Option<usize>,
}

impl ServicesQuery {
    fn matches(&self, s: &ServiceState) -> bool {
        let key = s.key();
        let lower = |v: &Option<String>| v.as_deref().map(str::to_ascii_lowercase);
        if lower(&self.namespace).is_some_and(|ns| *key.namespace != *ns)
            || lower(&self.name).is_some_and(|n| *key.name != *n)
        {
            return false;
        }
        if let Some(q) = lower(&self.search).filter(|q| !q.is_empty())
            && !key.to_string().contains(&q)
        {
            return false;
        }
        !self.unhealthy || unhealthy(s)
    }
}

/// An endpoint is not healthy, or nothing serves.
pub fn unhealthy(s: &ServiceState) -> bool {
    s.endpoints.iter().any(|e| !e.healthy) || s.serving().next().is_none()
}

#[derive(Serialize)]
struct ServicesView<'a> {
    version: u64,
    ready: bool,
    /// Services matching the query (before paging).
    total: usize,
    offset: usize,
    services: Vec<ServiceView<'a>>,
    /// Claims refused: which service asked, for what, and who holds it.
    conflicts: &'a [Conflict],
    /// Sources that lost their upstream: what they said last is served, stale.
    disconnected: &'a [crate::model::SourceId],
    sources: Vec<SourceView<'a>>,
}

#[derive(Serialize)]
struct SourceView<'a> {
    id: &'a SourceId,
    #[serde(flatten)]
    status: &'a SourceStatus,
}

#[derive(Serialize)]
struct ServiceView<'a> {
    name: &'a str,
    namespace: &'a str,
    source: &'a str,
    vip: Option<IpAddr>,
    /// An alias (Kubernetes ExternalName): DNS answers a CNAME to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    external_name: Option<&'a str>,
    balance: Balance,
    ports: &'a [Port],
    health: &'a HealthSpec,
    fail_open: bool,
    /// No endpoint is healthy and fail_open serves them all.
    panic: bool,
    /// The proxy listen addresses this service holds.
    listeners: Vec<SocketAddr>,
    /// Endpoints DNS answers and the proxy uses right now.
    serving: usize,
    endpoints: Vec<EndpointView<'a>>,
}

#[derive(Serialize)]
struct EndpointView<'a> {
    #[serde(flatten)]
    state: &'a EndpointState,
    /// The weight the proxy balances with now: 0 while not serving, below
    /// `weight` while it ramps up under slow start.
    effective_weight: f64,
    /// Connections the proxy has open (or is opening) to it, over every
    /// port of the service.
    connections: u32,
}

impl<'a> EndpointView<'a> {
    fn new(s: &ServiceState, e: &'a EndpointState, live: &ProxyLive) -> Self {
        let share = if s.panic || e.healthy {
            live.share(&s.spec.key, e.endpoint.ip)
        } else {
            0.0
        };
        let weight = f64::from(e.endpoint.weight) * share;
        EndpointView {
            state: e,
            effective_weight: (weight * 100.0).round() / 100.0,
            connections: live.connections(&s.spec.key, e.endpoint.ip),
        }
    }
}

impl<'a> ServiceView<'a> {
    fn new(s: &'a ServiceState, live: &ProxyLive) -> Self {
        Self {
            name: &s.spec.key.name,
            namespace: &s.spec.key.namespace,
            source: &s.source,
            vip: s.spec.vip,
            external_name: s.spec.external_name.as_deref(),
            balance: s.spec.balance,
            ports: &s.spec.ports,
            health: &s.spec.health,
            fail_open: s.spec.fail_open,
            panic: s.panic,
            listeners: s.listeners.iter().map(|(a, _)| *a).collect(),
            serving: s.serving().count(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointView::new(s, e, live))
                .collect(),
        }
    }
}

/// `/v1/services` for `query`: the matching services in key order, paged,
/// serialized straight from the snapshot. Not through a
/// `serde_json::Value`: at 100k endpoints that tree took hundreds of MB
/// per request, which the allocator kept (a node polled on it during a
/// first sync went from 100 to 462 MiB).
pub fn services_body(snap: &Snapshot, query: &ServicesQuery, live: &ProxyLive) -> Vec<u8> {
    let mut total = 0;
    let limit = query.limit.unwrap_or(usize::MAX);
    let mut services = Vec::new();
    for s in snap.services.values().filter(|s| query.matches(s)) {
        if total >= query.offset && services.len() < limit {
            services.push(ServiceView::new(s, live));
        }
        total += 1;
    }
    let view = ServicesView {
        version: snap.version,
        ready: snap.ready,
        total,
        offset: query.offset,
        services,
        conflicts: &snap.conflicts,
        disconnected: &snap.disconnected,
        sources: snap
            .sources
            .iter()
            .map(|(id, status)| SourceView { id, status })
            .collect(),
    };
    // Serializing borrowed views of plain data cannot fail.
    serde_json::to_vec(&view).unwrap_or_default()
}

/// [`services_body`] parsed, for tests.
#[cfg(test)]
pub fn services_json(
    snap: &Snapshot,
    query: &ServicesQuery,
    live: &ProxyLive,
) -> serde_json::Value {
    serde_json::from_slice(&services_body(snap, query, live)).expect("services JSON")
}

/// The query of `/v1/events`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EventsQuery {
    /// Only events of snapshot versions after this one.
    pub since: u64,
    /// Only events of this service (`name.namespace`).
    pub service: Option<String>,
    /// At most this many (the newest), capped at [`EVENTS_LIMIT`].
    pub limit: Option<usize>,
}

#[derive(Serialize)]
struct EventsView {
    /// The snapshot version this answer is current to: pass it as `since`
    /// next time.
    version: u64,
    events: Vec<Arc<ChangeEvent>>,
}

/// `/v1/events` for `query`, oldest first.
pub fn events_json(snap: &Snapshot, query: &EventsQuery) -> serde_json::Value {
    let limit = query.limit.unwrap_or(EVENTS_LIMIT).min(EVENTS_LIMIT);
    let mut list = events::since(snap, query.since, usize::MAX);
    if let Some(svc) = &query.service {
        let svc = svc.to_ascii_lowercase();
        list.retain(|e| e.service.as_deref() == Some(svc.as_str()));
    }
    let skip = list.len().saturating_sub(limit);
    let view = EventsView {
        version: snap.version,
        events: list.split_off(skip),
    };
    serde_json::to_value(view).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Health, ProbeState, ServiceKey, ServiceSpec};

    fn snapshot(n: usize) -> Snapshot {
        let mut snap = Snapshot::default();
        for i in 0..n {
            let ns = if i % 2 == 0 { "default" } else { "shop" };
            let mut spec = ServiceSpec::new(ServiceKey::new(ns, &format!("svc-{i:02}")));
            spec.endpoints
                .push(Endpoint::new("10.0.0.1".parse().unwrap()));
            let spec = Arc::new(spec);
            let probe = if i % 5 == 0 {
                ProbeState::Down("refused".into())
            } else {
                ProbeState::Up
            };
            let health = Health {
                probe,
                ejected: None,
            };
            let eps = vec![EndpointState::new(
                spec.endpoints[0].clone(),
                health,
                &spec.health,
            )];
            let s = ServiceState::new(spec, "file:x".into(), eps);
            snap.services.insert(s.key().clone(), Arc::new(s));
        }
        snap
    }

    fn names(v: &serde_json::Value) -> Vec<String> {
        v["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                format!(
                    "{}.{}",
                    s["name"].as_str().unwrap(),
                    s["namespace"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn services_filter_and_page() {
        let snap = snapshot(20);
        let all = services_json(&snap, &ServicesQuery::default(), &ProxyLive::default());
        assert_eq!(all["total"], 20);
        assert_eq!(all["services"].as_array().unwrap().len(), 20);
        let q = ServicesQuery {
            namespace: Some("shop".into()),
            ..ServicesQuery::default()
        };
        let v = services_json(&snap, &q, &ProxyLive::default());
        assert_eq!(v["total"], 10);
        assert!(names(&v).iter().all(|n| n.ends_with(".shop")));
        let q = ServicesQuery {
            name: Some("SVC-03".into()),
            ..ServicesQuery::default()
        };
        assert_eq!(
            names(&services_json(&snap, &q, &ProxyLive::default())),
            vec!["svc-03.shop"]
        );
        let q = ServicesQuery {
            unhealthy: true,
            ..ServicesQuery::default()
        };
        let v = services_json(&snap, &q, &ProxyLive::default());
        assert_eq!(
            names(&v),
            vec![
                "svc-00.default",
                "svc-10.default",
                "svc-05.shop",
                "svc-15.shop"
            ]
        );
        assert_eq!(v["services"][0]["serving"], 0);
        let q = ServicesQuery {
            search: Some("svc-1".into()),
            offset: 2,
            limit: Some(3),
            ..ServicesQuery::default()
        };
        let v = services_json(&snap, &q, &ProxyLive::default());
        assert_eq!(v["total"], 10);
        assert_eq!(v["offset"], 2);
        assert_eq!(
            names(&v),
            vec!["svc-14.default", "svc-16.default", "svc-18.default"]
        );
    }

    #[test]
    fn events_since_a_version_for_one_service() {
        let mut snap = Snapshot::default();
        let event = |v: u64, svc: &str| ChangeEvent {
            version: v,
            time: "t".into(),
            kind: "unhealthy",
            service: Some(svc.into()),
            endpoint: None,
            source: None,
            reason: "r".into(),
        };
        let list = (1..=6)
            .map(|v| {
                event(
                    v,
                    if v % 2 == 0 {
                        "web.default"
                    } else {
                        "db.default"
                    },
                )
            })
            .collect();
        events::record(&mut snap, list);
        snap.version = 6;
        let q = EventsQuery {
            since: 2,
            service: Some("web.default".into()),
            limit: None,
        };
        let v = events_json(&snap, &q);
        assert_eq!(v["version"], 6);
        let versions: Vec<u64> = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, vec![4, 6]);
        let q = EventsQuery {
            limit: Some(2),
            ..EventsQuery::default()
        };
        assert_eq!(events_json(&snap, &q)["events"][1]["version"], 6);
        assert_eq!(
            events_json(&snap, &q)["events"].as_array().unwrap().len(),
            2
        );
    }
}
