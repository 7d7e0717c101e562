//! The vocabulary every part of beacon shares: services, ports, endpoints,
//! health, and the immutable [`Snapshot`] the registry publishes.
//!
//! No I/O lives here. Sources build [`ServiceSpec`]s (what exists), the
//! registry combines them with [`Health`] (what is alive) into a
//! [`Snapshot`], and DNS, proxy and health read that snapshot.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;

/// Identifies a service: `<name>.<namespace>`. Names are stored lower-case
/// (DNS matching is case-insensitive and the config validator lower-cases).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_ascii_lowercase().into(),
            name: name.to_ascii_lowercase().into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// Which source said a service exists, e.g. `file:services.toml` or `docker`.
pub type SourceId = Arc<str>;

/// The etcd source: its specs already merge this node's published local
/// services with every other node's (so it outranks the local sources, and
/// the local source naming the same service is no conflict).
pub fn merges_local(source: &SourceId) -> bool {
    &**source == "etcd"
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Port {
    /// Port name, used for SRV (`_<name>._<proto>`). May be empty.
    pub name: Arc<str>,
    /// The service port: SRV answers and the vip listener.
    pub port: u16,
    /// The endpoints' port unless an endpoint overrides it.
    pub target_port: u16,
    pub protocol: Protocol,
    /// Explicit proxy listener for this port.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    P2c,
    Maglev,
    Random,
}

impl Balance {
    pub const ALL: [(&'static str, Balance); 5] = [
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
        ("p2c", Balance::P2c),
        ("maglev", Balance::Maglev),
        ("random", Balance::Random),
    ];
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ProbeKind {
    /// A TCP connect to the endpoint's port.
    Tcp,
    /// `GET path` with a Host header; healthy on 2xx/3xx.
    Http {
        path: Arc<str>,
        host: Option<Arc<str>>,
    },
    /// Trust the source.
    None,
}

/// The health check of a service, with defaults from `[health]` applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthSpec {
    pub probe: ProbeKind,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive successes to turn healthy.
    pub rise: u32,
    /// Consecutive failures to turn unhealthy.
    pub fall: u32,
    /// Interval while an endpoint is between states (HAProxy's `fastinter`).
    #[serde(with = "humantime_serde")]
    pub fast_interval: Duration,
    /// Consecutive proxy connect failures that eject an endpoint (0: never).
    pub eject_after: u32,
    /// First ejection lasts this long; each further one doubles, capped.
    #[serde(with = "humantime_serde")]
    pub eject_base: Duration,
    #[serde(with = "humantime_serde")]
    pub eject_max: Duration,
    /// At most this share (percent) of a service's endpoints ejected at once.
    pub eject_max_percent: u8,
    /// Whether a new endpoint starts healthy (before its first probe result).
    pub start_healthy: bool,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            probe: ProbeKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
            fast_interval: Duration::from_millis(250),
            eject_after: 5,
            eject_base: Duration::from_secs(30),
            eject_max: Duration::from_secs(300),
            eject_max_percent: 50,
            start_healthy: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    V1,
    V2,
}

/// Proxy behaviour of a service, with global defaults from `[proxy]` applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxySpec {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Connect attempts per client connection (each on another endpoint when possible).
    pub connect_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Per-service cap on concurrent connections (None: only the global cap).
    pub max_connections: Option<u32>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Close open connections to an endpoint when it leaves the serving set.
    pub close_on_removal: bool,
    /// An endpoint that appears or turns healthy ramps from a small share
    /// of its weight to all of it over this window (None: at once).
    #[serde(with = "humantime_serde")]
    pub slow_start: Option<Duration>,
    /// Once the client has closed its sending half, how long the other
    /// direction may stay quiet before both sides are reset (None: the idle
    /// timeout).
    #[serde(with = "humantime_serde")]
    pub client_fin_timeout: Option<Duration>,
    /// The same once the endpoint has closed its sending half first.
    #[serde(with = "humantime_serde")]
    pub server_fin_timeout: Option<Duration>,
    /// A UDP flow (client address → endpoint) ends after this long
    /// without a datagram either way.
    #[serde(with = "humantime_serde")]
    pub udp_idle_timeout: Duration,
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            connect_attempts: 3,
            idle_timeout: Duration::from_secs(3600),
            max_connections: None,
            proxy_protocol: None,
            close_on_removal: false,
            slow_start: None,
            client_fin_timeout: None,
            server_fin_timeout: None,
            udp_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Live counts of one endpoint (per service and endpoint address), kept
/// across snapshots by the proxy and read by its balancers and the admin API.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    /// Connections being established or proxied to this endpoint.
    pub active: std::sync::atomic::AtomicU32,
    /// Consecutive connect failures (reset by a success).
    pub failures: std::sync::atomic::AtomicU32,
}

/// What the proxy knows live about endpoints, for the admin API. Written
/// by the proxy's reconcile loop as it rebuilds its balancers (never on a
/// connection's path), read by `/v1/services`:
/// - endpoints ramping up under slow start: (service, endpoint IP) → the
///   share of its weight it gets now (below 1); one not listed gets its
///   whole weight;
/// - the live load of every endpoint address a route was built over, so
///   the page shows each endpoint's open connections.
#[derive(Debug, Default)]
pub struct ProxyLive {
    shares: std::sync::RwLock<HashMap<(ServiceKey, IpAddr), f64>>,
    loads:
        std::sync::RwLock<std::collections::BTreeMap<(ServiceKey, IpAddr, u16), Arc<EndpointLoad>>>,
}

impl ProxyLive {
    pub fn set_share(&self, key: &ServiceKey, ip: IpAddr, share: Option<f64>) {
        let mut m = self.shares.write().unwrap_or_else(|e| e.into_inner());
        match share {
            Some(s) if s < 1.0 => {
                m.insert((key.clone(), ip), s);
            }
            _ => {
                m.remove(&(key.clone(), ip));
            }
        }
    }

    /// The share of its weight the endpoint gets now (1: all of it).
    pub fn share(&self, key: &ServiceKey, ip: IpAddr) -> f64 {
        let m = self.shares.read().unwrap_or_else(|e| e.into_inner());
        m.get(&(key.clone(), ip)).copied().unwrap_or(1.0)
    }

    /// The proxy routes to `addr` of `key` with this load.
    pub fn track(&self, key: &ServiceKey, addr: SocketAddr, load: Arc<EndpointLoad>) {
        let mut m = self.loads.write().unwrap_or_else(|e| e.into_inner());
        m.insert((key.clone(), addr.ip(), addr.port()), load);
    }

    /// The proxy forgot `addr` of `key` (gone, no connection left).
    pub fn forget(&self, key: &ServiceKey, addr: SocketAddr) {
        let mut m = self.loads.write().unwrap_or_else(|e| e.into_inner());
        m.remove(&(key.clone(), addr.ip(), addr.port()));
    }

    /// Connections open (or connecting) to `ip` for `key`, over every port.
    pub fn connections(&self, key: &ServiceKey, ip: IpAddr) -> u32 {
        let m = self.loads.read().unwrap_or_else(|e| e.into_inner());
        m.range((key.clone(), ip, 0)..=(key.clone(), ip, u16::MAX))
            .map(|(_, l)| l.active.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

/// One backend of a service as its source describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// `<hostname>.<svc>.<ns>.svc.<zone>` resolves to this endpoint.
    pub hostname: Option<Arc<str>>,
    pub weight: u32,
    /// What the source says (Kubernetes readiness, Docker HEALTHCHECK).
    pub ready: bool,
    /// Overrides every port's `target_port` for this endpoint.
    pub port: Option<u16>,
    /// The beacon node that published it through etcd; `None`: a local
    /// source of this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Arc<str>>,
    /// Not ready but still serving while it shuts down (Kubernetes
    /// `serving` + `terminating`): never in DNS; the proxy falls back to
    /// such endpoints only when a service has no serving one left.
    pub terminating: bool,
}

impl Endpoint {
    pub fn new(ip: IpAddr) -> Self {
        Self {
            ip,
            hostname: None,
            weight: 1,
            ready: true,
            port: None,
            via: None,
            terminating: false,
        }
    }

    /// The address to connect to for a service port.
    pub fn addr(&self, port: &Port) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(port.target_port))
    }
}

/// What a source says about one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    pub key: ServiceKey,
    /// ClusterIP-like address: A/AAAA answer it and the proxy listens on it.
    pub vip: Option<IpAddr>,
    /// A dual-stack service's ClusterIP of the other family (Kubernetes
    /// `clusterIPs[1]`): A/AAAA answer it too; the proxy listens on `vip`
    /// only. Set only with `vip`.
    pub second_vip: Option<IpAddr>,
    pub balance: Balance,
    pub ports: Vec<Port>,
    /// Unique by `ip` within a service.
    pub endpoints: Vec<Endpoint>,
    pub health: HealthSpec,
    pub proxy: ProxySpec,
    /// Serve every endpoint when none is healthy (panic mode).
    pub fail_open: bool,
    /// Whether the proxy listens on `vip:port` (Kubernetes: only when the
    /// service asks, as ClusterIPs are not this host's addresses).
    pub listen_vip: bool,
    /// An alias (Kubernetes `ExternalName`): every name of the service
    /// answers a CNAME to this name (lower-case, no trailing dot).
    pub external_name: Option<Arc<str>>,
}

impl ServiceSpec {
    pub fn new(key: ServiceKey) -> Self {
        Self {
            key,
            vip: None,
            second_vip: None,
            balance: Balance::default(),
            ports: Vec::new(),
            endpoints: Vec::new(),
            health: HealthSpec::default(),
            proxy: ProxySpec::default(),
            fail_open: false,
            listen_vip: true,
            external_name: None,
        }
    }

    pub fn is_headless(&self) -> bool {
        self.vip.is_none()
    }

    /// The vip, then the second vip: what A/AAAA answer for a service
    /// that is not headless.
    pub fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vip.into_iter().chain(self.vip.and(self.second_vip))
    }
}

/// The probe's verdict on an endpoint, after rise/fall hysteresis.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum ProbeState {
    /// No verdict yet; counts as healthy when the spec says `start_healthy`.
    #[default]
    Unknown,
    Up,
    Down(Arc<str>),
}

/// Live health of one endpoint, as the health loop reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Health {
    pub probe: ProbeState,
    /// Passive ejection in force, with its reason (`ejected: 5 connect failures`).
    pub ejected: Option<Arc<str>>,
}

/// One endpoint with its health and the combined verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointState {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    pub health: Health,
    /// ready in source AND probe healthy AND not ejected.
    pub healthy: bool,
    /// Why it is (not) healthy, for people.
    pub reason: Arc<str>,
}

impl EndpointState {
    pub fn new(endpoint: Endpoint, health: Health, spec: &HealthSpec) -> Self {
        let (healthy, reason) = verdict(&endpoint, &health, spec);
        Self {
            endpoint,
            health,
            healthy,
            reason,
        }
    }
}

/// The combined verdict: served only if the source says ready, the probe
/// does not say down, and no passive ejection is in force.
pub fn verdict(endpoint: &Endpoint, health: &Health, spec: &HealthSpec) -> (bool, Arc<str>) {
    if !endpoint.ready && endpoint.terminating {
        return (false, "terminating (serving: proxy fallback only)".into());
    }
    if !endpoint.ready {
        return (false, "not ready in source".into());
    }
    if let Some(why) = &health.ejected {
        return (false, why.clone());
    }
    match (&health.probe, &spec.probe) {
        (_, ProbeKind::None) => (true, "ready in source (no probe)".into()),
        (ProbeState::Down(why), _) => (false, why.clone()),
        (ProbeState::Up, _) => (true, "probe passing".into()),
        (ProbeState::Unknown, _) if spec.start_healthy => (true, "awaiting first probe".into()),
        (ProbeState::Unknown, _) => (false, "awaiting first probe".into()),
    }
}

/// A service as it is served right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceState {
    pub spec: Arc<ServiceSpec>,
    pub source: SourceId,
    /// Same order as `spec.endpoints`.
    pub endpoints: Vec<EndpointState>,
    /// True when no endpoint is healthy and `fail_open` serves them all.
    pub panic: bool,
    /// The proxy listen addresses this service holds, with the port index:
    /// `vip:port` of each TCP port and each explicit `listen`, less what
    /// the registry gave to another service (see [`Conflict`]).
    pub listeners: Vec<(SocketAddr, usize)>,
}

impl ServiceState {
    pub fn new(spec: Arc<ServiceSpec>, source: SourceId, endpoints: Vec<EndpointState>) -> Self {
        let panic = spec.fail_open && !endpoints.is_empty() && !endpoints.iter().any(|e| e.healthy);
        let listeners = wanted_listeners(&spec);
        Self {
            spec,
            source,
            endpoints,
            panic,
            listeners,
        }
    }

    pub fn key(&self) -> &ServiceKey {
        &self.spec.key
    }

    /// The endpoints DNS answers and the proxy connects to: the healthy
    /// ones, or all of them in panic mode.
    pub fn serving(&self) -> impl Iterator<Item = &EndpointState> + '_ {
        let panic = self.panic;
        self.endpoints.iter().filter(move |e| panic || e.healthy)
    }

    /// The endpoints the proxy connects to: the serving ones or, when none
    /// is left, the terminating ones still serving that no probe or
    /// ejection rules out (kube-proxy's terminating fallback, KEP-1669).
    pub fn proxied(&self) -> impl Iterator<Item = &EndpointState> + '_ {
        let fallback = self.serving().next().is_none();
        let panic = self.panic;
        self.endpoints.iter().filter(move |e| {
            if fallback {
                e.endpoint.terminating
                    && e.health.ejected.is_none()
                    && !matches!(e.health.probe, ProbeState::Down(_))
            } else {
                panic || e.healthy
            }
        })
    }

    /// Whether DNS knows the service: it has a vip, is an alias, or has a
    /// serving endpoint.
    pub fn in_dns(&self) -> bool {
        !self.spec.is_headless()
            || self.spec.external_name.is_some()
            || self.serving().next().is_some()
    }

    pub fn endpoint(&self, ip: IpAddr) -> Option<&EndpointState> {
        self.endpoints.iter().find(|e| e.endpoint.ip == ip)
    }
}

/// The listen addresses a spec asks for, with the port index: `vip:port`
/// for each TCP port of a service with a vip, and each explicit `listen`.
pub fn wanted_listeners(spec: &ServiceSpec) -> Vec<(SocketAddr, usize)> {
    listeners_with_vip(spec, spec.vip)
}

/// [`wanted_listeners`] as if the spec's vip were `vip`.
pub fn listeners_with_vip(spec: &ServiceSpec, vip: Option<IpAddr>) -> Vec<(SocketAddr, usize)> {
    let vip = vip.filter(|_| spec.listen_vip);
    let mut out = Vec::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let vip = vip.map(|ip| SocketAddr::new(ip, port.port));
        for addr in vip.into_iter().chain(port.listen) {
            if !out.iter().any(|(a, _)| *a == addr) {
                out.push((addr, i));
            }
        }
    }
    out
}

/// A claim one service lost to another: a listen address, a vip, or an
/// endpoint hostname (within one service, lost to another endpoint).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Conflict {
    /// `listen`, `vip`, `hostname`, or `spec` (nodes that publish different
    /// specs for one service through etcd; the lowest node name wins).
    pub kind: &'static str,
    /// The service that asked and did not get it.
    pub service: ServiceKey,
    /// What it asked for: an address, or `hostname (ip)`.
    pub claim: Arc<str>,
    /// Who holds it: a service, or the endpoint ip that keeps the hostname.
    pub winner: Arc<str>,
}

/// Services by key. A persistent map: cloning it (once per published
/// snapshot) is O(1) and a change copies O(log n) nodes, so publishing a
/// one-endpoint change at 10k services does not copy 10k entries.
pub type ServiceMap = imbl::OrdMap<ServiceKey, Arc<ServiceState>>;

/// One consistent, immutable view of everything beacon serves. Published by
/// the registry; readers hold an `Arc<Snapshot>` and never lock.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    /// Grows by one with every published change.
    pub version: u64,
    /// Every source has synced once (or the startup timeout passed).
    pub ready: bool,
    pub services: ServiceMap,
    /// Claims given to one service and refused to another, in order.
    pub conflicts: Arc<[Conflict]>,
    /// Sources that lost their upstream (etcd, the engine): what they last
    /// said is still served, stale.
    pub disconnected: Arc<[SourceId]>,
    /// Lookups derived from `services`, built on first use (see [`Index`]).
    #[serde(skip)]
    pub index: LazyIndex,
    /// Each source's connection, by source id (configured ones from the start).
    pub sources: imbl::OrdMap<SourceId, SourceStatus>,
    /// The latest changes, oldest first, bounded (`/v1/events`). A
    /// persistent vector: publishing shares it with the last snapshot.
    #[serde(skip)]
    pub events: imbl::Vector<Arc<ChangeEvent>>,
}

/// Whether a source is connected to what it watches, and why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    pub connected: bool,
    pub reason: Arc<str>,
}

/// One change of what beacon serves, for people: an endpoint added,
/// removed, turned unhealthy or healthy, ejected or re-admitted; a service
/// added or removed, entering or leaving panic mode; a source connected or
/// lost. `version` is the snapshot that first shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangeEvent {
    pub version: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: Arc<str>,
    /// `added`, `removed`, `unhealthy`, `healthy`, `ejected`, `readmitted`,
    /// `service_added`, `service_removed`, `panic_on`, `panic_off`,
    /// `source_connected`, `source_lost`.
    pub kind: &'static str,
    /// `name.namespace`, when the change is about a service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceId>,
    pub reason: Arc<str>,
}

impl Snapshot {
    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<ServiceState>> {
        self.services.get(key)
    }

    /// The reverse lookups of this snapshot, built once on first use: a
    /// PTR or namespace question must not scan every service per query.
    pub fn index(&self) -> &Index {
        self.index.0.get_or_init(|| Index::build(&self.services))
    }

    pub fn endpoint_count(&self) -> usize {
        self.services.values().map(|s| s.endpoints.len()).sum()
    }
}

/// The outcome of one proxy connect attempt: the passive health signal the
/// proxy reports and the health loop turns into ejections. A connect that
/// failed for a [`local_failure`] is no outcome: it is not reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectOutcome {
    pub service: ServiceKey,
    pub ip: IpAddr,
    pub success: bool,
}

/// A connect or probe error that is about this host, not the endpoint: out
/// of descriptors (EMFILE, ENFILE), buffers or memory (ENOBUFS, ENOMEM), or
/// local ports (EADDRNOTAVAIL). The endpoint could not be tried, so the
/// error says nothing about its health.
pub fn local_failure(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return matches!(
            code,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL
        );
    }
    let _ = e;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ready: bool) -> Endpoint {
        Endpoint {
            ready,
            ..Endpoint::new("127.0.0.1".parse().unwrap())
        }
    }

    #[test]
    fn verdict_needs_ready_probe_and_no_ejection() {
        let spec = HealthSpec::default();
        let up = Health {
            probe: ProbeState::Up,
            ejected: None,
        };
        assert!(verdict(&ep(true), &up, &spec).0);
        assert_eq!(&*verdict(&ep(false), &up, &spec).1, "not ready in source");
        let down = Health {
            probe: ProbeState::Down("probe failed: connection refused 3/3".into()),
            ejected: None,
        };
        assert_eq!(
            verdict(&ep(true), &down, &spec),
            (false, "probe failed: connection refused 3/3".into())
        );
        let ejected = Health {
            probe: ProbeState::Up,
            ejected: Some("ejected: 5 connect failures".into()),
        };
        assert!(!verdict(&ep(true), &ejected, &spec).0);
    }

    #[test]
    fn unknown_probe_follows_start_healthy() {
        let mut spec = HealthSpec::default();
        assert!(verdict(&ep(true), &Health::default(), &spec).0);
        spec.start_healthy = false;
        assert!(!verdict(&ep(true), &Health::default(), &spec).0);
    }

    #[test]
    fn proxied_falls_back_to_terminating_only_when_nothing_serves() {
        let spec = Arc::new(ServiceSpec::new(ServiceKey::new("default", "web")));
        let terminating = Endpoint {
            terminating: true,
            ..ep(false)
        };
        let state = |eps: Vec<(Endpoint, Health)>| {
            let eps = eps
                .into_iter()
                .map(|(e, h)| EndpointState::new(e, h, &spec.health))
                .collect();
            ServiceState::new(spec.clone(), "test".into(), eps)
        };
        let ready = Endpoint::new("127.0.0.2".parse().unwrap());
        let both = state(vec![
            (terminating.clone(), Health::default()),
            (ready, Health::default()),
        ]);
        let ips: Vec<_> = both.proxied().map(|e| e.endpoint.ip.to_string()).collect();
        assert_eq!(ips, ["127.0.0.2"], "a ready endpoint wins");
        let alone = state(vec![(terminating.clone(), Health::default())]);
        assert_eq!(alone.serving().count(), 0);
        assert_eq!(alone.proxied().count(), 1);
        assert!(alone.endpoints[0].reason.contains("terminating"));
        let ejected = Health {
            probe: ProbeState::Up,
            ejected: Some("ejected".into()),
        };
        assert_eq!(state(vec![(terminating, ejected)]).proxied().count(), 0);
        assert_eq!(
            state(vec![(ep(false), Health::default())])
                .proxied()
                .count(),
            0
        );
    }

    #[test]
    fn fail_open_serves_all_when_none_healthy() {
        let mut spec = ServiceSpec::new(ServiceKey::new("default", "web"));
        spec.fail_open = true;
        let spec = Arc::new(spec);
        let eps = vec![EndpointState::new(
            ep(false),
            Health::default(),
            &spec.health,
        )];
        let state = ServiceState::new(spec.clone(), "test".into(), eps);
        assert!(state.panic);
        assert_eq!(state.serving().count(), 1);
    }
}

/// What owns an address: a service's vip (`host: None`) or one of its
/// serving endpoints (`host`: its hostname, lower-cased, when it has one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpOwner {
    pub service: ServiceKey,
    pub host: Option<Arc<str>>,
}

/// Lookups the DNS side needs besides "service by key", derived from one
/// snapshot's services: owners by address (PTR), and the namespaces that
/// hold a service DNS answers for (`<ns>.svc.<zone>`). Built in one pass.
#[derive(Debug, Default)]
pub struct Index {
    pub by_ip: HashMap<IpAddr, Vec<IpOwner>>,
    pub namespaces: HashSet<Arc<str>>,
}

impl Index {
    pub fn build(services: &ServiceMap) -> Self {
        let mut index = Index::default();
        for svc in services.values() {
            if svc.in_dns() {
                index.namespaces.insert(svc.key().namespace.clone());
            }
            for vip in svc.spec.vips() {
                index.by_ip.entry(vip).or_default().push(IpOwner {
                    service: svc.key().clone(),
                    host: None,
                });
            }
            for ep in svc.serving() {
                let host = ep
                    .endpoint
                    .hostname
                    .as_deref()
                    .map(|h| h.to_ascii_lowercase().into());
                index
                    .by_ip
                    .entry(ep.endpoint.ip)
                    .or_default()
                    .push(IpOwner {
                        service: svc.key().clone(),
                        host,
                    });
            }
        }
        index
    }
}

/// The lazily built [`Index`] of a snapshot. A clone starts empty: a
/// snapshot the registry changes after cloning never carries an index of
/// other services.
#[derive(Default)]
pub struct LazyIndex(OnceLock<Index>);

impl Clone for LazyIndex {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl fmt::Debug for LazyIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "LazyIndex(built)"
        } else {
            "LazyIndex(empty)"
        })
    }
}

impl LazyIndex {
    /// Whether the index was built (tests check it is built once).
    pub fn is_built(&self) -> bool {
        self.0.get().is_some()
    }
}
