//! The `docker` source: containers that opt in with labels, from the Docker
//! engine on its unix socket.
//!
//! ```text
//! beacon.service   = "web"                    required: the service name
//! beacon.namespace = "default"                optional
//! beacon.port      = "8080" | "http:8080,admin:9090"   container port(s)
//! beacon.listen    = "0.0.0.0:80" | "http=0.0.0.0:80,admin=127.0.0.1:9090"
//!                                             optional proxy listener(s)
//! beacon.weight    = "1"                      optional, 1-65535
//! beacon.hostname  = "web-0"                  optional: web-0.web.<ns>.svc.<zone>
//! beacon.balance   = "round_robin"            optional balance policy
//! beacon.vip       = "172.28.0.53"            optional ClusterIP-like address:
//!                                             A/AAAA answer it and the proxy
//!                                             listens on vip:port (an address
//!                                             of beacon's, e.g. its container IP)
//! ```
//!
//! Several running containers with the same `beacon.service` (and
//! namespace) form one service; each is an endpoint at its IP on the
//! configured network (or its only network). A paused or stopped container
//! is gone; one whose HEALTHCHECK says `starting` or `unhealthy` is listed
//! but not ready, and so is one that was sent a stop signal (`docker stop`
//! sends SIGTERM, then waits): new connections leave it before it exits. A malformed label skips that container with a warning.
//!
//! Level-triggered: on start it lists the labeled containers and sends a
//! `Reset`; then every relevant event makes it re-inspect that one
//! container and recompute the services it belongs to, sending
//! `Upsert`/`Remove` only when a service really changed. A full re-list
//! runs every [`RESYNC_EVERY`] as a safety net. When the engine goes away
//! the last endpoints stay in force; it reconnects with backoff and sends a
//! `Reset` from a fresh list.
//!
//! The label-to-service mapping ([`member`], [`service_spec`]) is pure and
//! needs no engine.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, EventMessage, EventMessageTypeEnum,
    HealthStatusEnum,
};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{ServiceDefaults, is_dns_label};
use crate::model::{
    Balance, Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec, SourceId,
};
use crate::registry::{self, Update};

use super::{Backoff, Source, SourceError, SourceFuture, count_error};

/// The opt-in label.
pub const LABEL_SERVICE: &str = "beacon.service";
pub const LABEL_NAMESPACE: &str = "beacon.namespace";
pub const LABEL_PORT: &str = "beacon.port";
pub const LABEL_LISTEN: &str = "beacon.listen";
pub const LABEL_WEIGHT: &str = "beacon.weight";
pub const LABEL_HOSTNAME: &str = "beacon.hostname";
pub const LABEL_BALANCE: &str = "beacon.balance";
pub const LABEL_VIP: &str = "beacon.vip";

/// A full re-list this often, in case an event was lost.
pub const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// Timeout of each engine request (not of the event stream's body).
const REQUEST_TIMEOUT_SECS: u64 = 10;
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why a session with the engine ended.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("docker engine at {socket}: {source}")]
    Engine {
        socket: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("the docker event stream ended")]
    EventsEnded,
    #[error("the registry stopped")]
    RegistryGone,
}

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
}

/// What a container contributes: `Ok(None)` when it is not labeled, not
/// running (paused, stopped) or not attached to the configured `network`
/// (which scopes a source to one network); `Err` when a label is malformed
/// or it has no usable IP.
pub fn member(c: &Container, network: Option<&str>) -> Result<Option<Member>, LabelError> {
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
    let key = ServiceKey {
        namespace,
        name: name.clone(),
    };
    let mut ports = match c.labels.get(LABEL_PORT) {
        Some(v) => parse_ports(v)?,
        None => Vec::new(),
    };
    if let Some(v) = c.labels.get(LABEL_LISTEN) {
        apply_listen(&mut ports, v)?;
    }
    let weight = match c.labels.get(LABEL_WEIGHT) {
        Some(v) => match v.trim().parse::<u32>() {
            Ok(w @ 1..=65535) => w,
            _ => return Err(bad(LABEL_WEIGHT, v, "expected a whole number 1-65535")),
        },
        None => 1,
    };
    let hostname = match c.labels.get(LABEL_HOSTNAME) {
        Some(v) => Some(dns_label(LABEL_HOSTNAME, v)?),
        None => None,
    };
    let balance = match c.labels.get(LABEL_BALANCE) {
        Some(v) => match Balance::ALL.iter().find(|(n, _)| *n == v.trim()) {
            Some((_, b)) => Some(*b),
            None => {
                let valid: Vec<&str> = Balance::ALL.iter().map(|(n, _)| *n).collect();
                return Err(bad(
                    LABEL_BALANCE,
                    v,
                    format!("valid: {}", valid.join(", ")),
                ));
            }
        },
        None => None,
    };
    let vip = match c.labels.get(LABEL_VIP) {
        Some(v) => match v.trim().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => return Err(bad(LABEL_VIP, v, "not an IP address")),
        },
        None => None,
    };
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
        },
    }))
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

/// What an event asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventAction {
    /// Re-inspect this container.
    Inspect(String),
    Ignore,
}

/// Which events matter: container lifecycle and health, network
/// (dis)connects. `exec_*` (every HEALTHCHECK run makes some) do not.
pub fn classify(ev: &EventMessage) -> EventAction {
    let action = ev.action.as_deref().unwrap_or("");
    let actor = ev.actor.as_ref();
    match ev.typ {
        Some(EventMessageTypeEnum::CONTAINER) => {
            let base = action.split(':').next().unwrap_or("").trim();
            let relevant = matches!(
                base,
                "start"
                    | "die"
                    | "stop"
                    | "kill"
                    | "pause"
                    | "unpause"
                    | "health_status"
                    | "rename"
                    | "destroy"
                    | "restart"
                    | "oom"
            );
            match actor.and_then(|a| a.id.clone()) {
                Some(id) if relevant => EventAction::Inspect(id),
                _ => EventAction::Ignore,
            }
        }
        Some(EventMessageTypeEnum::NETWORK) if matches!(action, "connect" | "disconnect") => {
            match actor
                .and_then(|a| a.attributes.as_ref())
                .and_then(|a| a.get("container"))
            {
                Some(id) => EventAction::Inspect(id.clone()),
                None => EventAction::Ignore,
            }
        }
        _ => EventAction::Ignore,
    }
}

/// A `kill` event with a signal that asks the container to stop (what
/// `docker stop` sends first), as opposed to e.g. SIGHUP for a reload.
pub fn stop_signal(ev: &EventMessage) -> bool {
    let signal = ev
        .actor
        .as_ref()
        .and_then(|a| a.attributes.as_ref())
        .and_then(|a| a.get("signal"))
        .map(|s| s.trim().trim_start_matches("SIG").to_ascii_uppercase());
    matches!(
        signal.as_deref(),
        Some("15" | "TERM" | "9" | "KILL" | "2" | "INT" | "3" | "QUIT")
    )
}

/// The engine's view of a container, reduced to [`Container`].
pub fn from_inspect(r: &ContainerInspectResponse) -> Container {
    let state = r.state.as_ref();
    let run = match state.and_then(|s| s.status) {
        Some(ContainerStateStatusEnum::RUNNING) if state.and_then(|s| s.paused) != Some(true) => {
            RunState::Running
        }
        Some(ContainerStateStatusEnum::PAUSED) | Some(ContainerStateStatusEnum::RUNNING) => {
            RunState::Paused
        }
        _ => RunState::Stopped,
    };
    let health = match state.and_then(|s| s.health.as_ref()).and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => HealthStatus::Starting,
        Some(HealthStatusEnum::HEALTHY) => HealthStatus::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => HealthStatus::Unhealthy,
        _ => HealthStatus::None,
    };
    let labels = r
        .config
        .as_ref()
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let networks = r
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .map(|nets| {
            nets.iter()
                .map(|(name, ep)| {
                    let ip = ep
                        .ip_address
                        .as_deref()
                        .filter(|s| !s.is_empty())
                        .or(ep.global_ipv6_address.as_deref().filter(|s| !s.is_empty()))
                        .and_then(|s| s.parse().ok());
                    (name.clone(), ip)
                })
                .collect()
        })
        .unwrap_or_default();
    Container {
        id: r.id.clone().unwrap_or_default(),
        name: r
            .name
            .as_deref()
            .unwrap_or("")
            .trim_start_matches('/')
            .to_string(),
        labels,
        state: run,
        health,
        networks,
    }
}

// === the source ===

/// Follows the Docker engine. Build with [`DockerSource::new`].
pub struct DockerSource {
    id: SourceId,
    socket: PathBuf,
    network: Option<String>,
    defaults: ServiceDefaults,
    /// Running labeled containers, by id.
    members: BTreeMap<String, Member>,
    /// Containers known to carry no `beacon.service` label (labels never change).
    unlabeled: HashSet<String>,
    /// Containers sent a stop signal that are still running: listed but not
    /// ready, so no new connection goes to a backend that is shutting down.
    terminating: HashSet<String>,
    /// What the registry was last told.
    sent: BTreeMap<ServiceKey, ServiceSpec>,
}

impl DockerSource {
    /// A source for the engine at `socket`; endpoint IPs come from
    /// `network` (or each container's only network). Connects when run.
    pub fn new(socket: PathBuf, network: Option<String>, defaults: ServiceDefaults) -> Self {
        Self {
            id: "docker".into(),
            socket,
            network,
            defaults,
            members: BTreeMap::new(),
            unlabeled: HashSet::new(),
            terminating: HashSet::new(),
            sent: BTreeMap::new(),
        }
    }

    fn engine_error(&self, source: bollard::errors::Error) -> DockerError {
        DockerError::Engine {
            socket: self.socket.display().to_string(),
            source,
        }
    }

    async fn connect(&self) -> Result<Docker, DockerError> {
        let path = self.socket.to_string_lossy();
        let docker =
            Docker::connect_with_socket(&path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|e| self.engine_error(e))?;
        // Older engines (API < 1.49) refuse the default version.
        docker
            .negotiate_version()
            .await
            .map_err(|e| self.engine_error(e))
    }

    /// Inspects one container: None when it no longer exists.
    async fn inspect(&self, docker: &Docker, id: &str) -> Result<Option<Container>, DockerError> {
        match docker
            .inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(r) => Ok(Some(from_inspect(&r))),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(self.engine_error(e)),
        }
    }

    /// Reduces a container to its membership, logging a malformed one.
    fn membership(&self, c: &Container) -> Option<Member> {
        match member(c, self.network.as_deref()) {
            Ok(Some(mut m)) => {
                if self.terminating.contains(&c.id) {
                    m.endpoint.ready = false;
                }
                Some(m)
            }
            Ok(None) => None,
            Err(e) => {
                count_error(&self.id);
                tracing::warn!(container = %c.name, error = %e, "container skipped");
                None
            }
        }
    }

    /// Every running labeled container's membership.
    async fn list(&mut self, docker: &Docker) -> Result<BTreeMap<String, Member>, DockerError> {
        let options = ListContainersOptions {
            all: false,
            filters: Some(HashMap::from([(
                "label".to_string(),
                vec![LABEL_SERVICE.to_string()],
            )])),
            ..Default::default()
        };
        let listed = docker
            .list_containers(Some(options))
            .await
            .map_err(|e| self.engine_error(e))?;
        let mut members = BTreeMap::new();
        for summary in listed {
            let Some(id) = summary.id else { continue };
            if let Some(c) = self.inspect(docker, &id).await?
                && let Some(m) = self.membership(&c)
            {
                members.insert(id, m);
            }
        }
        Ok(members)
    }

    async fn send(&self, registry: &registry::Handle, update: Update) -> Result<(), DockerError> {
        super::send(registry, &self.id, update)
            .await
            .map_err(|_| DockerError::RegistryGone)
    }

    /// Replaces every member and sends a `Reset`.
    async fn reset(
        &mut self,
        registry: &registry::Handle,
        members: BTreeMap<String, Member>,
    ) -> Result<(), DockerError> {
        self.members = members;
        self.sent = all_services(self.members.values(), &self.defaults);
        tracing::info!(
            services = self.sent.len(),
            containers = self.members.len(),
            "docker: synced"
        );
        let all = self.sent.values().cloned().collect();
        self.send(registry, Update::Reset(all)).await
    }

    /// Recomputes `keys` and sends what changed.
    async fn publish(
        &mut self,
        registry: &registry::Handle,
        keys: BTreeSet<ServiceKey>,
    ) -> Result<(), DockerError> {
        for key in keys {
            let now = service_spec(&key, self.members.values(), &self.defaults);
            if now.as_ref() == self.sent.get(&key) {
                continue;
            }
            match now {
                Some(spec) => {
                    tracing::debug!(service = %key, endpoints = spec.endpoints.len(), "docker: service changed");
                    self.sent.insert(key, spec.clone());
                    self.send(registry, Update::Upsert(Box::new(spec))).await?;
                }
                None => {
                    tracing::debug!(service = %key, "docker: service gone");
                    self.sent.remove(&key);
                    self.send(registry, Update::Remove(key)).await?;
                }
            }
        }
        Ok(())
    }

    /// A re-list while connected: only what changed is sent.
    async fn resync(
        &mut self,
        registry: &registry::Handle,
        docker: &Docker,
    ) -> Result<(), DockerError> {
        let members = self.list(docker).await?;
        let mut keys: BTreeSet<ServiceKey> = self.sent.keys().cloned().collect();
        keys.extend(members.values().map(|m| m.key.clone()));
        self.members = members;
        self.publish(registry, keys).await
    }

    async fn on_event(
        &mut self,
        registry: &registry::Handle,
        docker: &Docker,
        ev: &EventMessage,
    ) -> Result<(), DockerError> {
        let EventAction::Inspect(id) = classify(ev) else {
            return Ok(());
        };
        match (ev.typ, ev.action.as_deref()) {
            (Some(EventMessageTypeEnum::CONTAINER), Some("kill")) if stop_signal(ev) => {
                self.terminating.insert(id.clone());
            }
            (Some(EventMessageTypeEnum::CONTAINER), Some("start" | "die" | "destroy")) => {
                self.terminating.remove(&id);
            }
            _ => {}
        }
        let is_container = ev.typ == Some(EventMessageTypeEnum::CONTAINER);
        let destroyed = is_container && ev.action.as_deref() == Some("destroy");
        if !self.members.contains_key(&id) {
            if self.unlabeled.contains(&id) {
                if destroyed {
                    self.unlabeled.remove(&id);
                }
                return Ok(());
            }
            // Container events carry the labels: skip unlabeled ones cheaply.
            let labeled = ev
                .actor
                .as_ref()
                .and_then(|a| a.attributes.as_ref())
                .map(|a| a.contains_key(LABEL_SERVICE));
            if is_container && labeled == Some(false) {
                if !destroyed {
                    self.unlabeled.insert(id);
                }
                return Ok(());
            }
        }
        let container = if destroyed {
            None
        } else {
            self.inspect(docker, &id).await?
        };
        if let Some(c) = &container
            && !c.labels.contains_key(LABEL_SERVICE)
        {
            self.unlabeled.insert(id.clone());
        }
        let now = container.as_ref().and_then(|c| self.membership(c));
        let mut keys = BTreeSet::new();
        if let Some(old) = self.members.remove(&id) {
            keys.insert(old.key);
        }
        if let Some(m) = now {
            keys.insert(m.key.clone());
            self.members.insert(id, m);
        }
        self.publish(registry, keys).await
    }

    /// One connection to the engine: list, Reset, follow events. Returns
    /// Ok on shutdown, Err when the engine is lost.
    async fn session(
        &mut self,
        registry: &registry::Handle,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<(), DockerError> {
        let docker = self.connect().await?;
        // Events since just before the list: whatever happens while listing
        // is replayed (harmless: every event re-reads the container).
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(1))
            .unwrap_or(0);
        let options = EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(HashMap::from([(
                "type".to_string(),
                vec!["container".to_string(), "network".to_string()],
            )])),
        };
        let mut events = docker.events(Some(options));
        let members = self.list(&docker).await?;
        self.reset(registry, members).await?;
        backoff.reset();
        let mut resync =
            tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_EVERY, RESYNC_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = resync.tick() => self.resync(registry, &docker).await?,
                ev = events.next() => match ev {
                    None => return Err(DockerError::EventsEnded),
                    Some(Err(e)) => return Err(self.engine_error(e)),
                    Some(Ok(ev)) => self.on_event(registry, &docker, &ev).await?,
                },
            }
        }
    }

    async fn run_loop(
        mut self,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.session(&registry, &shutdown, &mut backoff) => r,
            };
            let e = match result {
                Ok(()) => return Ok(()),
                Err(DockerError::RegistryGone) => return Err(SourceError::RegistryGone),
                Err(e) => e,
            };
            count_error(&self.id);
            let delay = backoff.next_delay();
            tracing::warn!(error = %e, retry_in = ?delay,
                "docker engine unavailable; serving the last known endpoints until it is back");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

impl Source for DockerSource {
    fn id(&self) -> SourceId {
        self.id.clone()
    }

    fn run(
        self: Box<Self>,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> SourceFuture {
        Box::pin(self.run_loop(registry, shutdown))
    }
}

#[cfg(test)]
mod tests;
