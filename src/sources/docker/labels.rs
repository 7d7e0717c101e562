//! Labels → services: the pure core of the Docker source. A container's
//! labels and state ([`Container`]) become its contribution to a service
//! ([`member`]); the members of one service become its spec
//! ([`service_spec`]). No engine needed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::{DockerTrust, ServiceDefaults, is_dns_label};
use crate::model::{Balance, Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec};

/// The opt-in label.
pub const LABEL_SERVICE: &str = "beacon.service";
pub const LABEL_NAMESPACE: &str = "beacon.namespace";
pub const LABEL_PORT: &str = "beacon.port";
pub const LABEL_LISTEN: &str = "beacon.listen";
pub const LABEL_WEIGHT: &str = "beacon.weight";
pub const LABEL_HOSTNAME: &str = "beacon.hostname";
pub const LABEL_BALANCE: &str = "beacon.balance";
pub const LABEL_VIP: &str = "beacon.vip";

/// Why a labeled container is skipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label {label}=`{value}`: {why}")]
    Label {
        label: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Network(String),
}

fn bad(label: &'static str, value: &str, why: impl Into<String>) -> LabelError {
    LabelError::Label {
        label,
        value: value.to_string(),
        why: why.into(),
    }
}
// === the pure core ===

/// A container's run state, as far as beacon cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// Created, restarting, exited, dead, removing.
    Stopped,
}

/// The Docker HEALTHCHECK status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthStatus {
    /// No HEALTHCHECK.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// What beacon needs to know about one container, engine-independent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Without Docker's leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub state: RunState,
    pub health: HealthStatus,
    /// Network name → the container's IP on it (None: no address yet).
    pub networks: BTreeMap<String, Option<IpAddr>>,
}

/// One container's contribution to a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub container: String,
    pub key: ServiceKey,
    pub ports: Vec<Port>,
    pub balance: Option<Balance>,
    pub vip: Option<IpAddr>,
    pub endpoint: Endpoint,
    /// Labels the source's trust settings did not allow, and why (warned
    /// once per container).
    pub ignored: Vec<String>,
}

/// What a container contributes: `Ok(None)` when it is not labeled, not
/// running (paused, stopped) or not attached to the configured `network`
/// (which scopes a source to one network); `Err` when a label is malformed,
/// names a namespace `trust` does not allow, or it has no usable IP. A
/// `beacon.listen` or `beacon.vip` outside `trust`'s CIDRs is ignored (and
/// listed in [`Member::ignored`]).
pub fn member(
    c: &Container,
    network: Option<&str>,
    trust: &DockerTrust,
) -> Result<Option<Member>, LabelError> {
    let Some(service) = c.labels.get(LABEL_SERVICE) else {
        return Ok(None);
    };
    if c.state != RunState::Running {
        return Ok(None);
    }
    if let Some(n) = network
        && !c.networks.contains_key(n)
    {
        tracing::debug!(container = %c.name, network = n, "labeled container not on the source's network; skipped");
        return Ok(None);
    }
    let name = dns_label(LABEL_SERVICE, service)?;
    let namespace = match c.labels.get(LABEL_NAMESPACE) {
        Some(ns) => dns_label(LABEL_NAMESPACE, ns)?,
        None => "default".into(),
    };
    if !trust.namespaces.contains(&namespace) {
        return Err(bad(
            LABEL_NAMESPACE,
            &namespace,
            "namespace not allowed for containers; list it in the docker source's `namespaces`",
        ));
    }
    let key = ServiceKey {
        namespace,
        name: name.clone(),
    };
    let mut ignored = Vec::new();
    let mut ports = match c.labels.get(LABEL_PORT) {
        Some(v) => parse_ports(v)?,
        None => Vec::new(),
    };
    if let Some(v) = c.labels.get(LABEL_LISTEN) {
        apply_listen(&mut ports, v)?;
        for p in &mut ports {
            if let Some(a) = p.listen.filter(|a| !allowed(&trust.allow_listen, a.ip())) {
                p.listen = None;
                ignored.push(format!(
                    "{LABEL_LISTEN} {a} ignored: not in the docker source's `allow_listen`"
                ));
            }
        }
    }
    let weight = weight_label(c)?;
    let hostname = match c.labels.get(LABEL_HOSTNAME) {
        Some(v) => Some(dns_label(LABEL_HOSTNAME, v)?),
        None => None,
    };
    let balance = balance_label(c)?;
    let vip = vip_label(c, trust, &mut ignored)?;
    let ip = container_ip(c, network)?;
    let ready = !matches!(c.health, HealthStatus::Starting | HealthStatus::Unhealthy);
    Ok(Some(Member {
        container: c.name.clone(),
        key,
        ports,
        balance,
        vip,
        endpoint: Endpoint {
            ip,
            hostname,
            weight,
            ready,
            port: None,
            via: None,
            terminating: false,
        },
        ignored,
    }))
}

/// `beacon.weight`: 1 when absent.
fn weight_label(c: &Container) -> Result<u32, LabelError> {
    match c.labels.get(LABEL_WEIGHT) {
        Some(v) => match v.trim().parse::<u32>() {
            Ok(w @ 1..=65535) => Ok(w),
            _ => Err(bad(LABEL_WEIGHT, v, "expected a whole number 1-65535")),
        },
        None => Ok(1),
    }
}

/// `beacon.balance`: one of the policy names, or the source's default.
fn balance_label(c: &Container) -> Result<Option<Balance>, LabelError> {
    let Some(v) = c.labels.get(LABEL_BALANCE) else {
        return Ok(None);
    };
    match Balance::ALL.iter().find(|(n, _)| *n == v.trim()) {
        Some((_, b)) => Ok(Some(*b)),
        None => {
            let valid: Vec<&str> = Balance::ALL.iter().map(|(n, _)| *n).collect();
            Err(bad(
                LABEL_BALANCE,
                v,
                format!("valid: {}", valid.join(", ")),
            ))
        }
    }
}

/// `beacon.vip`, when `trust` allows it; an address outside `allow_vip`
/// is ignored and noted in `ignored`.
fn vip_label(
    c: &Container,
    trust: &DockerTrust,
    ignored: &mut Vec<String>,
) -> Result<Option<IpAddr>, LabelError> {
    let Some(v) = c.labels.get(LABEL_VIP) else {
        return Ok(None);
    };
    match v.trim().parse::<IpAddr>() {
        Ok(ip) if allowed(&trust.allow_vip, ip) => Ok(Some(ip)),
        Ok(ip) => {
            ignored.push(format!(
                "{LABEL_VIP} {ip} ignored: not in the docker source's `allow_vip`"
            ));
            Ok(None)
        }
        Err(_) => Err(bad(LABEL_VIP, v, "not an IP address")),
    }
}

/// Whether `ip` is in one of `nets` (an empty list allows nothing).
fn allowed(nets: &[ipnet::IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

fn dns_label(label: &'static str, value: &str) -> Result<Arc<str>, LabelError> {
    let v = value.trim().to_ascii_lowercase();
    if is_dns_label(&v) {
        Ok(v.into())
    } else {
        Err(bad(
            label,
            value,
            "not a DNS label: use 1-63 letters, digits and '-', not starting or ending with '-'",
        ))
    }
}

/// `8080` or `name:port` pairs separated by commas.
fn parse_ports(value: &str) -> Result<Vec<Port>, LabelError> {
    let mut ports: Vec<Port> = Vec::new();
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    for item in &items {
        let (name, number) = match item.split_once(':') {
            Some((n, p)) => (dns_label(LABEL_PORT, n)?, p),
            None if items.len() == 1 => (Arc::from(""), *item),
            None => {
                return Err(bad(
                    LABEL_PORT,
                    value,
                    "with several ports, name each: `http:8080,admin:9090`",
                ));
            }
        };
        let number = match number.trim().parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(bad(
                    LABEL_PORT,
                    value,
                    format!("`{number}` is not a port 1-65535"),
                ));
            }
        };
        if !name.is_empty() && ports.iter().any(|p| p.name == name) {
            return Err(bad(
                LABEL_PORT,
                value,
                format!("port name `{name}` used twice"),
            ));
        }
        ports.push(Port {
            name,
            port: number,
            target_port: number,
            protocol: Protocol::Tcp,
            listen: None,
        });
    }
    Ok(ports)
}

/// `ADDR` for a single port, or `name=ADDR` pairs separated by commas.
fn apply_listen(ports: &mut [Port], value: &str) -> Result<(), LabelError> {
    if ports.is_empty() {
        return Err(bad(LABEL_LISTEN, value, format!("needs {LABEL_PORT}")));
    }
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    for item in items {
        let (port, addr) = match item.split_once('=') {
            Some((name, addr)) => {
                let name = name.trim().to_ascii_lowercase();
                match ports.iter_mut().find(|p| *p.name == *name) {
                    Some(p) => (p, addr),
                    None => {
                        return Err(bad(
                            LABEL_LISTEN,
                            value,
                            format!("no port named `{name}` in {LABEL_PORT}"),
                        ));
                    }
                }
            }
            None if ports.len() == 1 => (&mut ports[0], item),
            None => {
                return Err(bad(
                    LABEL_LISTEN,
                    value,
                    "with several ports, name each: `http=0.0.0.0:80`",
                ));
            }
        };
        match addr.trim().parse::<SocketAddr>() {
            Ok(a) => port.listen = Some(a),
            Err(_) => return Err(bad(LABEL_LISTEN, value, format!("`{addr}` is not IP:PORT"))),
        }
    }
    Ok(())
}

/// The IP on `network`, or on the container's only network.
fn container_ip(c: &Container, network: Option<&str>) -> Result<IpAddr, LabelError> {
    let (net, ip) = match network {
        Some(n) => match c.networks.get(n) {
            Some(ip) => (n, *ip),
            // `member` skips these before asking.
            None => {
                return Err(LabelError::Network(format!(
                    "not attached to network `{n}`"
                )));
            }
        },
        None => match c.networks.len() {
            1 => {
                let (n, ip) = c.networks.iter().next().expect("one network");
                (n.as_str(), *ip)
            }
            0 => return Err(LabelError::Network("attached to no network".into())),
            _ => {
                return Err(LabelError::Network(format!(
                    "attached to several networks ({}); set `network` in the docker source",
                    names(&c.networks)
                )));
            }
        },
    };
    ip.ok_or_else(|| LabelError::Network(format!("no IP address on network `{net}`")))
}

fn names(networks: &BTreeMap<String, Option<IpAddr>>) -> String {
    networks.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// One service from its members (any order). Ports, listeners, vip and
/// balance come from the member whose container name sorts first, so the result
/// does not depend on event order. None when there are no members.
pub fn service_spec<'a>(
    key: &ServiceKey,
    members: impl IntoIterator<Item = &'a Member>,
    defaults: &ServiceDefaults,
) -> Option<ServiceSpec> {
    let mut members: Vec<&Member> = members.into_iter().filter(|m| m.key == *key).collect();
    if members.is_empty() {
        return None;
    }
    members.sort_by(|a, b| a.container.cmp(&b.container));
    let first = members[0];
    let mut spec = ServiceSpec::new(key.clone());
    spec.health = defaults.health.clone();
    spec.proxy = defaults.proxy.clone();
    spec.ports = first.ports.clone();
    if spec.ports.is_empty() {
        // Nothing to probe: trust Docker (and its HEALTHCHECK).
        spec.health.probe = ProbeKind::None;
    }
    spec.balance = first.balance.unwrap_or_default();
    spec.vip = first.vip;
    let mut seen = HashSet::new();
    for m in &members {
        if m.ports != first.ports {
            tracing::debug!(service = %key, container = %m.container, first = %first.container,
                "container's ports differ from the first container's; using the first's");
        }
        if seen.insert(m.endpoint.ip) {
            spec.endpoints.push(m.endpoint.clone());
        }
    }
    spec.endpoints.sort_by_key(|e| e.ip);
    Some(spec)
}

/// Every service of `members`.
pub fn all_services<'a>(
    members: impl IntoIterator<Item = &'a Member> + Clone,
    defaults: &ServiceDefaults,
) -> BTreeMap<ServiceKey, ServiceSpec> {
    let keys: BTreeSet<ServiceKey> = members.clone().into_iter().map(|m| m.key.clone()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let spec = service_spec(&k, members.clone(), defaults)?;
            Some((k, spec))
        })
        .collect()
}
