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
use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::config::ServiceDefaults;
use crate::model::{Balance, Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const ANNOTATION_LISTEN: &str = "beacon.io/listen";
pub const ANNOTATION_LISTEN_VIP: &str = "beacon.io/listen-vip";
pub const ANNOTATION_BALANCE: &str = "beacon.io/balance";

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

/// The spec of `svc` with the endpoints of `slices` (every slice of it).
pub fn service_spec<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    defaults: &ServiceDefaults,
) -> Option<ServiceSpec> {
    let key = service_key(svc)?;
    let mut spec = ServiceSpec::new(key);
    spec.health = defaults.health.clone();
    spec.health.probe = ProbeKind::None;
    spec.proxy = defaults.proxy.clone();
    let Some(k8s) = svc.spec.as_ref() else {
        return Some(spec);
    };
    if k8s.type_.as_deref() == Some("ExternalName") {
        let target = k8s
            .external_name
            .as_deref()
            .unwrap_or("")
            .trim_end_matches('.');
        if target.is_empty() {
            return None;
        }
        spec.external_name = Some(target.to_ascii_lowercase().into());
        return Some(spec);
    }
    (spec.vip, spec.second_vip) =
        cluster_ips(k8s.cluster_ips.as_deref(), k8s.cluster_ip.as_deref());
    let annotations = svc.metadata.annotations.as_ref();
    let annotation = |name: &str| annotations.and_then(|a| a.get(name)).map(String::as_str);
    spec.listen_vip = annotation(ANNOTATION_LISTEN_VIP).is_some_and(|v| v.trim() == "true");
    if let Some(b) = annotation(ANNOTATION_BALANCE) {
        match Balance::ALL.iter().find(|(n, _)| *n == b.trim()) {
            Some((_, policy)) => spec.balance = *policy,
            None => {
                tracing::warn!(service = %spec.key, balance = b, "unknown beacon.io/balance ignored")
            }
        }
    }
    let slices: Vec<&EndpointSlice> = slices.into_iter().collect();
    for p in k8s.ports.iter().flatten() {
        if let Some(port) = port(p, &slices) {
            spec.ports.push(port);
        }
    }
    if let Some(listen) = annotation(ANNOTATION_LISTEN) {
        apply_listen(&mut spec, listen);
    }
    let publish_all = k8s.publish_not_ready_addresses == Some(true);
    spec.endpoints = endpoints(&spec, &slices, publish_all);
    Some(spec)
}

/// The primary ClusterIP (`None`: headless, for `None` or no address),
/// and a dual-stack service's ClusterIP of the other family.
fn cluster_ips(ips: Option<&[String]>, ip: Option<&str>) -> (Option<IpAddr>, Option<IpAddr>) {
    let first = ips.and_then(|l| l.first()).map(String::as_str).or(ip);
    let Some(vip) = first.and_then(|s| s.parse::<IpAddr>().ok()) else {
        return (None, None);
    };
    let second = ips
        .into_iter()
        .flatten()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .find(|other| other.is_ipv4() != vip.is_ipv4());
    (Some(vip), second)
}

fn protocol_of(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

fn port(p: &k8s_openapi::api::core::v1::ServicePort, slices: &[&EndpointSlice]) -> Option<Port> {
    let protocol = protocol_of(p.protocol.as_deref())?;
    let number = u16::try_from(p.port).ok()?;
    let name = p.name.clone().unwrap_or_default();
    let from_slice = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|sp| {
            sp.name.as_deref().unwrap_or("") == name
                && protocol_of(sp.protocol.as_deref()) == Some(protocol)
        })
        .and_then(|sp| sp.port)
        .and_then(|n| u16::try_from(n).ok());
    let target = from_slice.or(match &p.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        _ => None,
    });
    Some(Port {
        name: name.to_ascii_lowercase().into(),
        port: number,
        target_port: target.unwrap_or(number),
        protocol,
        listen: None,
    })
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

fn endpoints(spec: &ServiceSpec, slices: &[&EndpointSlice], publish_all: bool) -> Vec<Endpoint> {
    let mut by_ip: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        // A slice whose port number differs from the spec's (a targetPort
        // change rolling out) overrides it for its endpoints.
        let override_port = single_port_override(spec, slice);
        for e in &slice.endpoints {
            let Some(mut ep) = endpoint(e, publish_all) else {
                continue;
            };
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

fn single_port_override(spec: &ServiceSpec, slice: &EndpointSlice) -> Option<u16> {
    let [only] = spec.ports.as_slice() else {
        return None;
    };
    let [sp] = slice.ports.as_deref()? else {
        return None;
    };
    let n = u16::try_from(sp.port?).ok()?;
    (n != only.target_port).then_some(n)
}

fn endpoint(e: &SliceEndpoint, publish_all: bool) -> Option<Endpoint> {
    let ip: IpAddr = e.addresses.first()?.parse().ok()?;
    let c = e.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    let mut ep = Endpoint::new(ip);
    ep.hostname = e
        .hostname
        .as_deref()
        .filter(|h| crate::config::is_dns_label(h))
        .map(Into::into);
    ep.ready = ready || publish_all;
    ep.terminating = !ep.ready && serving && terminating;
    Some(ep)
}

#[cfg(test)]
mod tests;
