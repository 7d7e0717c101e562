//! `[[service]]` with its `[[service.port]]` and `[[service.endpoint]]`
//! tables → [`ServiceSpec`], over the defaults of the main config.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use toml::Spanned;

use crate::model::{
    Balance, Endpoint, HealthSpec, Port, Protocol, ProxySpec, ServiceKey, ServiceSpec,
};

use super::health;
use super::index::ServicesIndex;
use super::proxy;
use super::raw::{RawEndpoint, RawPort, RawService};
use super::report::Reporter;
use super::values::{int_in, ip_addr, label, port, socket_addr, vip};

/// Defaults every services file inherits from the main config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceDefaults {
    pub health: HealthSpec,
    pub proxy: ProxySpec,
}

/// One service, or `None` when it has an error (reported through `r`).
/// Its name and listen addresses are claimed in `index`.
pub(super) fn validate(
    r: &mut Reporter<'_>,
    raw: &RawService,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Option<ServiceSpec> {
    let errors_before = r.error_count();
    let own = &raw.own;
    let key = claim_key(r, &own.name, own.namespace.as_ref(), index)?;
    let mut spec = ServiceSpec::new(key);
    spec.vip = own.vip.as_ref().and_then(|v| vip(r, v));
    if let Some(b) = &own.balance {
        spec.balance = balance(r, b).unwrap_or(spec.balance);
    }
    let mut port_names = HashSet::new();
    for p in &own.port {
        if let Some(port) = validate_port(r, p, &spec.key, &mut port_names) {
            claim_listeners(r, p, &port, spec.vip, &spec.key, index);
            spec.ports.push(port);
        }
    }
    let mut ips = HashSet::new();
    let mut hostnames = HashSet::new();
    for e in &own.endpoint {
        if let Some(ep) = validate_endpoint(r, e, &spec.key, &mut ips, &mut hostnames) {
            spec.endpoints.push(ep);
        }
    }
    spec.health = match &own.health {
        Some(h) => health::inherit(r, h, &defaults.health),
        None => defaults.health.clone(),
    };
    spec.proxy = proxy::inherit(r, &raw.shared, &defaults.proxy);
    spec.proxy.max_connections =
        proxy::service_cap(r, own.max_connections.as_ref(), spec.proxy.max_connections);
    spec.fail_open = own.fail_open.unwrap_or(false);
    (r.error_count() == errors_before).then_some(spec)
}

/// The service's key, claimed in `index` (a duplicate is an error).
fn claim_key(
    r: &mut Reporter<'_>,
    name: &Spanned<String>,
    namespace: Option<&Spanned<String>>,
    index: &mut ServicesIndex,
) -> Option<ServiceKey> {
    let name_label = label(r, name, "service name");
    let namespace = match namespace {
        Some(ns) => label(r, ns, "namespace"),
        None => Some("default".into()),
    };
    let key = ServiceKey {
        namespace: namespace?,
        name: name_label?,
    };
    if let Err(first) = index.claim_service(&key, r.origin(name.span().start)) {
        let message = format!(
            "duplicate service `{key}` (first defined at {first}); rename one or set another namespace"
        );
        r.error(name.span(), message);
        return None;
    }
    Some(key)
}

fn balance(r: &mut Reporter<'_>, b: &Spanned<String>) -> Option<Balance> {
    let found = Balance::ALL.iter().find(|(n, _)| *n == b.get_ref());
    if found.is_none() {
        r.error(
            b.span(),
            format!(
                "unknown balance `{}`; valid: {}",
                b.get_ref(),
                Balance::ALL.map(|(n, _)| format!("`{n}`")).join(", ")
            ),
        );
    }
    found.map(|(_, policy)| *policy)
}

/// One `[[service.port]]`; `None` when its port number is invalid (other
/// errors are reported and the port kept, as the service is dropped anyway).
fn validate_port(
    r: &mut Reporter<'_>,
    p: &RawPort,
    key: &ServiceKey,
    names: &mut HashSet<Arc<str>>,
) -> Option<Port> {
    let number = port(r, &p.port, "port")?;
    let target_port = match &p.target_port {
        Some(t) => port(r, t, "target_port").unwrap_or(number),
        None => number,
    };
    let protocol = match &p.protocol {
        None => Protocol::Tcp,
        Some(v) => match v.get_ref().to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                r.error(
                    v.span(),
                    format!("unknown protocol `{other}`; valid: `tcp`, `udp`"),
                );
                Protocol::Tcp
            }
        },
    };
    let name: Arc<str> = match &p.name {
        Some(n) => label(r, n, "port name").unwrap_or_else(|| "".into()),
        None => "".into(),
    };
    if let Some(n) = &p.name
        && !name.is_empty()
        && !names.insert(name.clone())
    {
        r.error(
            n.span(),
            format!("port name `{name}` is used twice in service `{key}`"),
        );
    }
    let listen = p.listen.as_ref().and_then(|v| socket_addr(r, v, None));
    Some(Port {
        name,
        port: number,
        target_port,
        protocol,
        listen,
    })
}

/// Claims the port's listen addresses: an explicit `listen`, and
/// `vip:port` for a TCP port of a service with a vip.
fn claim_listeners(
    r: &mut Reporter<'_>,
    raw: &RawPort,
    port: &Port,
    vip: Option<std::net::IpAddr>,
    key: &ServiceKey,
    index: &mut ServicesIndex,
) {
    let mut claims: Vec<(SocketAddr, Range<usize>)> = Vec::new();
    if let (Some(addr), Some(listen)) = (port.listen, &raw.listen) {
        claims.push((addr, listen.span()));
    }
    if let (Some(vip), Protocol::Tcp) = (vip, port.protocol) {
        claims.push((SocketAddr::new(vip, port.port), raw.port.span()));
    }
    for (addr, span) in claims {
        if let Err((other, first)) = index.claim_listener(addr, key, r.origin(span.start)) {
            let message = format!(
                "listen address {addr} is already claimed by service `{other}` (at {first}); give each service its own address"
            );
            r.error(span, message);
        }
    }
}

/// One `[[service.endpoint]]`; `None` when its ip is invalid or listed twice.
fn validate_endpoint(
    r: &mut Reporter<'_>,
    e: &RawEndpoint,
    key: &ServiceKey,
    ips: &mut HashSet<std::net::IpAddr>,
    hostnames: &mut HashSet<Arc<str>>,
) -> Option<Endpoint> {
    let ip = ip_addr(r, &e.ip, "endpoint ip")?;
    if !ips.insert(ip) {
        r.error(
            e.ip.span(),
            format!("endpoint {ip} is listed twice in service `{key}`; list each endpoint once"),
        );
        return None;
    }
    let mut ep = Endpoint::new(ip);
    if let Some(h) = &e.hostname {
        ep.hostname = label(r, h, "endpoint hostname");
        if let Some(name) = &ep.hostname
            && !hostnames.insert(name.clone())
        {
            r.error(
                h.span(),
                format!("hostname `{name}` is used twice in service `{key}`"),
            );
        }
    }
    if let Some(w) = &e.weight {
        ep.weight = int_in(r, w, 1, 65535, "weight").unwrap_or(1) as u32;
    }
    if let Some(ready) = e.ready {
        ep.ready = ready;
    }
    if let Some(p) = &e.port {
        ep.port = port(r, p, "endpoint port");
    }
    Some(ep)
}
