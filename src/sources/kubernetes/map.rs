//! The pure mapping from a Kubernetes `Service` and its `EndpointSlice`s to
//! a [`ServiceSpec`], as the Kubernetes DNS specification and CoreDNS's
//! `kubernetes` plugin read them. No API server needed.
//!
//! - `type: ExternalName` → an alias: every name answers a CNAME.
//! - a ClusterIP → the vip (the proxy listens on it only with
//!   `beacon.io/listen-vip: "true"`); `clusterIP: None` → headless.
//! - ports by name, protocol TCP or UDP (SCTP is skipped); the endpoints'
//!   port comes from the slices' port of the same name, else `targetPort`
//!   when it is a number, else the service port.
//! - each slice endpoint's first address (IPv4 and IPv6 slices, not FQDN),
//!   its `hostname`, `ready` (unset: ready), and `serving` + `terminating`
//!   (a terminating endpoint that still serves: the proxy's fallback).
//!   `publishNotReadyAddresses` makes every endpoint ready.
//! - annotations `beacon.io/listen` (`ADDR:PORT` for the first TCP port, or
//!   `name=ADDR:PORT,...`), `beacon.io/listen-vip`, `beacon.io/balance`.
//!
//! Kubernetes readiness already is the health check: these services have
//! no probe of beacon's own (`kind = "none"`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::config::ServiceDefaults;
use crate::model::{Balance, Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec};

pub use super::record::{ANNOTATION_BALANCE, ANNOTATION_LISTEN, ANNOTATION_LISTEN_VIP};
use super::record::{ClusterRecord, ServicePortRecord, ServiceRecord, SliceRecord};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The key of a Service.
pub fn service_key(svc: &Service) -> Option<ServiceKey> {
    let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
    Some(ServiceKey::new(ns, svc.metadata.name.as_deref()?))
}

/// The key of the Service an EndpointSlice belongs to (its label).
pub fn slice_service(slice: &EndpointSlice) -> Option<ServiceKey> {
    let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(ns, name))
}

/// The spec of `svc` with the endpoints of `slices` (every slice of it),
/// from the k8s-openapi objects.
pub fn service_spec<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    defaults: &ServiceDefaults,
) -> Option<ServiceSpec> {
    let key = service_key(svc)?;
    let slices: Vec<SliceRecord> = slices.into_iter().map(SliceRecord::new).collect();
    spec_of(key, &ServiceRecord::new(svc), &slices, defaults)
}

/// The spec of the service `key` with the endpoints of `slices` (every
/// slice of it), from the records the source keeps.
pub fn spec_of<'a>(
    key: ServiceKey,
    svc: &ServiceRecord,
    slices: impl IntoIterator<Item = &'a SliceRecord>,
    defaults: &ServiceDefaults,
) -> Option<ServiceSpec> {
    let mut spec = ServiceSpec::new(key);
    spec.health = defaults.health.clone();
    spec.health.probe = ProbeKind::None;
    spec.proxy = defaults.proxy.clone();
    let k8s = match svc {
        ServiceRecord::Bare => return Some(spec),
        ServiceRecord::Alias(target) => {
            spec.external_name = Some(target.clone()?);
            return Some(spec);
        }
        ServiceRecord::Cluster(c) => c,
    };
    (spec.vip, spec.second_vip) = (k8s.vip, k8s.second_vip);
    spec.listen_vip = k8s.listen_vip;
    if let Some(b) = k8s.balance.as_deref() {
        match Balance::ALL.iter().find(|(n, _)| *n == b.trim()) {
            Some((_, policy)) => spec.balance = *policy,
            None => {
                tracing::warn!(service = %spec.key, balance = b, "unknown beacon.io/balance ignored")
            }
        }
    }
    let slices: Vec<&SliceRecord> = slices.into_iter().collect();
    spec.ports = k8s.ports.iter().map(|p| port(p, &slices)).collect();
    if let Some(listen) = k8s.listen.as_deref() {
        apply_listen(&mut spec, listen);
    }
    spec.endpoints = endpoints(&spec, k8s, &slices);
    Some(spec)
}

fn port(p: &ServicePortRecord, slices: &[&SliceRecord]) -> Port {
    let from_slice = slices
        .iter()
        .flat_map(|s| s.ports.iter())
        .find(|sp| sp.name == p.name && sp.protocol == Some(p.protocol))
        .and_then(|sp| sp.port)
        .and_then(|n| u16::try_from(n).ok());
    Port {
        name: p.name.to_ascii_lowercase().into(),
        port: p.port,
        target_port: from_slice.or(p.target_port).unwrap_or(p.port),
        protocol: p.protocol,
        listen: None,
    }
}

/// `beacon.io/listen`: `ADDR:PORT` (the first TCP port) or `name=ADDR:PORT,...`.
fn apply_listen(spec: &mut ServiceSpec, value: &str) {
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, addr) = match item.split_once('=') {
            Some((n, a)) => (Some(n.trim()), a.trim()),
            None => (None, item),
        };
        let port = spec.ports.iter_mut().find(|p| match name {
            Some(n) => p.name.eq_ignore_ascii_case(n),
            None => p.protocol == Protocol::Tcp,
        });
        match (addr.parse::<SocketAddr>(), port) {
            (Ok(addr), Some(port)) => port.listen = Some(addr),
            _ => tracing::warn!(service = %spec.key, listen = item,
                "beacon.io/listen ignored: want ADDR:PORT or NAME=ADDR:PORT of a service port"),
        }
    }
}

/// How much an endpoint serves: ready beats terminating-but-serving beats
/// neither, when two slices list one address.
fn rank(e: &Endpoint) -> u8 {
    match (e.ready, e.terminating) {
        (true, _) => 2,
        (false, true) => 1,
        (false, false) => 0,
    }
}

fn endpoints(spec: &ServiceSpec, k8s: &ClusterRecord, slices: &[&SliceRecord]) -> Vec<Endpoint> {
    let mut by_ip: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        // A slice whose port number differs from the spec's (a targetPort
        // change rolling out) overrides it for its endpoints.
        let override_port = single_port_override(spec, slice);
        for e in &slice.endpoints {
            let mut ep = Endpoint::new(e.ip);
            ep.hostname = e.hostname.clone();
            ep.ready = e.ready || k8s.publish_not_ready;
            ep.terminating = !ep.ready && e.serving && e.terminating;
            ep.port = override_port;
            match by_ip.get(&ep.ip) {
                Some(old) if rank(old) >= rank(&ep) => {}
                _ => {
                    by_ip.insert(ep.ip, ep);
                }
            }
        }
    }
    by_ip.into_values().collect()
}

fn single_port_override(spec: &ServiceSpec, slice: &SliceRecord) -> Option<u16> {
    let [only] = spec.ports.as_slice() else {
        return None;
    };
    let [sp] = &*slice.ports else {
        return None;
    };
    let n = u16::try_from(sp.port?).ok()?;
    (n != only.target_port).then_some(n)
}

#[cfg(test)]
mod tests;
