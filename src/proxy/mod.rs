//! The L4 TCP proxy: listeners that follow the snapshot, balancing
//! policies, connect with retry, and a zero-copy byte path.
//!
//! ```text
//!  reader.changed() ─► reconcile ─► listeners (vip:port / port.listen)
//!                          │            │ accept → admit (ready? limits?)
//!                          │            ▼
//!                          └─► Route ─► balancer.pick → connect/retry ─► copy (splice)
//!                               (per service port, rebuilt when the service changes)
//! ```
//!
//! - One reconcile loop diffs the wanted listeners (each TCP port of each
//!   service with a vip, and each explicit `listen`) against the open ones,
//!   binds and closes, and swaps in a new [`Route`] (endpoint set +
//!   balancer) when a service changes. A bind failure is logged, counted
//!   and retried; other listeners keep serving.
//! - Live per-endpoint counts sit in a map beside the snapshot, keyed by
//!   (service, endpoint address), so they survive snapshot changes.
//! - Each connection runs in its own task: pick, connect (timeout, retry on
//!   the next pick), optional PROXY protocol header, then
//!   [`copy::bidirectional`] until both sides close, the idle timeout, the
//!   endpoint's removal (`close_on_removal`), or the drain deadline.

pub mod balancer;
mod conn;
pub mod copy;
mod listener;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ProxyConfig;
use crate::model::{ConnectOutcome, Protocol, ServiceKey, ServiceState, Snapshot};
use crate::registry::Reader;
use balancer::{Backend, Balancer, EndpointLoad};

/// How long a failed bind waits before it is tried again.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// After the drain deadline, how long closed connections may take to end.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("PROXY protocol header: {0}")]
    ProxyHeader(#[source] io::Error),
}

/// Knobs beyond the config (tests and measurements turn them; the binary
/// uses the defaults).
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub copy_mode: copy::Mode,
}

/// The running proxy. Dropping it leaves the tasks running until the
/// shutdown token is cancelled; [`Proxy::drain`] ends them in order.
pub struct Proxy {
    shared: Arc<Shared>,
    control: Option<JoinHandle<()>>,
    stop: CancellationToken,
}

/// Live counts of one endpoint and the signal that closes its connections
/// when it leaves a `close_on_removal` service.
#[derive(Debug, Default)]
struct EndpointEntry {
    load: Arc<EndpointLoad>,
    removal: Mutex<CancellationToken>,
}

impl EndpointEntry {
    fn removal(&self) -> CancellationToken {
        self.removal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes the connections opened so far; later ones get a fresh token.
    fn close_connections(&self) {
        let mut t = self.removal.lock().unwrap_or_else(|e| e.into_inner());
        t.cancel();
        *t = CancellationToken::new();
    }
}

/// State shared by the reconcile loop, listeners and connections.
struct Shared {
    ready: AtomicBool,
    /// Version of the last snapshot the reconcile loop applied.
    applied: AtomicU64,
    active: AtomicUsize,
    max_connections: usize,
    endpoints: DashMap<(ServiceKey, SocketAddr), Arc<EndpointEntry>>,
    service_active: DashMap<ServiceKey, Arc<AtomicUsize>>,
    /// Configured listen address → the address actually bound.
    bound: DashMap<SocketAddr, SocketAddr>,
    outcomes: mpsc::Sender<ConnectOutcome>,
    /// Cancelled when the drain grace has passed: live connections close.
    kill: CancellationToken,
    tracker: TaskTracker,
    copy_mode: copy::Mode,
    /// Metric handles are resolved at first use, not at spawn: the app
    /// may install the recorder after starting the proxy, and a handle
    /// taken before that would be a no-op forever.
    connect_duration: OnceLock<Histogram>,
}

impl Shared {
    fn connect_duration(&self) -> &Histogram {
        self.connect_duration
            .get_or_init(|| metrics::histogram!(crate::telemetry::PROXY_CONNECT_DURATION))
    }
}

/// Pre-resolved metric handles of one service (no label allocation per
/// connection).
struct ServiceMetrics {
    ok: Counter,
    not_ready: Counter,
    no_endpoints: Counter,
    connect_failed: Counter,
    over_limit: Counter,
    active: Gauge,
    to_upstream: Counter,
    to_client: Counter,
}

impl ServiceMetrics {
    fn new(key: &ServiceKey) -> Self {
        let service = key.to_string();
        let result = |r: &'static str| metrics::counter!(crate::telemetry::PROXY_CONNECTIONS, "service" => service.clone(), "result" => r);
        let bytes = |d: &'static str| metrics::counter!(crate::telemetry::PROXY_BYTES, "service" => service.clone(), "direction" => d);
        Self {
            ok: result("ok"),
            not_ready: result("not_ready"),
            no_endpoints: result("no_endpoints"),
            connect_failed: result("connect_failed"),
            over_limit: result("over_limit"),
            active: metrics::gauge!(crate::telemetry::PROXY_ACTIVE_CONNECTIONS, "service" => service.clone()),
            to_upstream: bytes("to_upstream"),
            to_client: bytes("to_client"),
        }
    }
}

/// What a listener routes to: one service port's serving endpoints and
/// their balancer, as of one snapshot.
struct Route {
    service: ServiceKey,
    state: Arc<ServiceState>,
    port: usize,
    backends: Vec<Backend>,
    entries: Vec<Arc<EndpointEntry>>,
    balancer: Box<dyn Balancer>,
    service_active: Arc<AtomicUsize>,
    /// Resolved at the first connection (see `Shared::connect_duration`).
    metrics: OnceLock<ServiceMetrics>,
}

impl Route {
    fn metrics(&self) -> &ServiceMetrics {
        self.metrics
            .get_or_init(|| ServiceMetrics::new(&self.service))
    }
}

/// An open listener.
struct Listener {
    routes: watch::Sender<Arc<Route>>,
    stop: CancellationToken,
}

/// Starts the proxy: a reconcile loop that opens and closes listeners as
/// the snapshot changes. Connect attempts are reported on `outcomes`
/// (never blocking: dropped when the channel is full). Must be called
/// inside a tokio runtime.
pub fn spawn(
    cfg: &ProxyConfig,
    reader: Reader,
    outcomes: mpsc::Sender<ConnectOutcome>,
    shutdown: CancellationToken,
) -> Proxy {
    spawn_with(cfg, reader, outcomes, shutdown, Options::default())
}

pub fn spawn_with(
    cfg: &ProxyConfig,
    reader: Reader,
    outcomes: mpsc::Sender<ConnectOutcome>,
    shutdown: CancellationToken,
    opts: Options,
) -> Proxy {
    let shared = Arc::new(Shared {
        ready: AtomicBool::new(false),
        applied: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        max_connections: cfg.max_connections,
        endpoints: DashMap::new(),
        service_active: DashMap::new(),
        bound: DashMap::new(),
        outcomes,
        kill: CancellationToken::new(),
        tracker: TaskTracker::new(),
        copy_mode: opts.copy_mode,
        connect_duration: OnceLock::new(),
    });
    let stop = shutdown.child_token();
    let control = cfg.enabled.then(|| {
        let rec = Reconciler::new(shared.clone(), stop.clone());
        tokio::spawn(rec.run(reader))
    });
    if !cfg.enabled {
        tracing::debug!("proxy disabled");
    }
    Proxy {
        shared,
        control,
        stop,
    }
}

// === impl Proxy ===

impl Proxy {
    /// The address a configured listen address is bound to (differs when
    /// the configured port is 0). None while it is not listening.
    pub fn bound_addr(&self, configured: SocketAddr) -> Option<SocketAddr> {
        self.shared.bound.get(&configured).map(|a| *a)
    }

    /// Version of the last snapshot whose listeners and routes are in force.
    pub fn applied_version(&self) -> u64 {
        self.shared.applied.load(Ordering::Acquire)
    }

    /// Connections being connected or proxied right now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Closes the listeners (at once, also if shutdown is not cancelled
    /// yet), gives live connections `grace` to finish, then closes them.
    pub async fn drain(mut self, grace: Duration) {
        self.stop.cancel();
        if let Some(control) = self.control.take() {
            let _ = control.await;
        }
        let tracker = &self.shared.tracker;
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
            tracing::debug!("proxy drained");
            return;
        }
        tracing::info!(
            connections = self.active_connections(),
            "drain grace passed; closing live connections"
        );
        self.shared.kill.cancel();
        if tokio::time::timeout(KILL_WAIT, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = tracker.len(),
                "proxy tasks still running after close"
            );
        }
    }
}

// === impl Reconciler ===

/// The listener control loop: level-triggered on the latest snapshot.
///
/// Each pass costs one pointer comparison per service plus work for the
/// services that changed: at 10k services a one-endpoint change rebuilds one
/// route, not every listener claim and endpoint entry.
struct Reconciler {
    shared: Arc<Shared>,
    listeners: HashMap<SocketAddr, Listener>,
    /// The snapshot last applied, to see what changed and endpoints leave.
    served: Arc<Snapshot>,
    /// Which service (and port index) owns each wanted listen address.
    wanted: BTreeMap<SocketAddr, (ServiceKey, usize)>,
    /// The listen addresses each service owns (the inverse of `wanted`).
    owned: HashMap<ServiceKey, Vec<SocketAddr>>,
    /// Endpoint entries kept only because connections were open on them;
    /// forgotten once those close.
    lingering: HashSet<(ServiceKey, SocketAddr)>,
    /// Listen addresses whose bind failed (warned once, then retried quietly).
    failing: HashSet<SocketAddr>,
    stop: CancellationToken,
}

/// Where to listen: every TCP port of a service with a vip (vip:port) and
/// every explicit `listen`. The first service (in key order) to claim an
/// address keeps it.
fn wanted_listeners(snap: &Snapshot) -> BTreeMap<SocketAddr, (ServiceKey, usize)> {
    let mut wanted = BTreeMap::new();
    for (key, svc) in &snap.services {
        for (addr, i) in claims(svc) {
            if let Some((owner, _)) = wanted.get(&addr) {
                if owner != key {
                    tracing::warn!(%addr, service = %key, owner = %owner,
                        "two services want the same proxy listener; the first keeps it");
                }
                continue;
            }
            wanted.insert(addr, (key.clone(), i));
        }
    }
    wanted
}

/// The listen addresses one service asks for, with the port index.
fn claims(svc: &ServiceState) -> Vec<(SocketAddr, usize)> {
    let mut out = Vec::new();
    for (i, port) in svc.spec.ports.iter().enumerate() {
        if port.protocol != Protocol::Tcp {
            continue;
        }
        let vip = svc.spec.vip.map(|ip| SocketAddr::new(ip, port.port));
        out.extend(vip.into_iter().chain(port.listen).map(|a| (a, i)));
    }
    out
}

/// Services added, removed or replaced between two snapshots. The map
/// skips the subtrees both snapshots share, so a one-service change costs
/// O(log n), not a walk of every service.
fn changed_services(before: &Snapshot, now: &Snapshot) -> Vec<ServiceKey> {
    use imbl::ordmap::DiffItem;
    before
        .services
        .diff(&now.services)
        .map(|d| match d {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => {
                k.clone()
            }
        })
        .collect()
}

impl Reconciler {
    fn new(shared: Arc<Shared>, stop: CancellationToken) -> Self {
        Self {
            shared,
            listeners: HashMap::new(),
            served: Arc::new(Snapshot::default()),
            wanted: BTreeMap::new(),
            owned: HashMap::new(),
            lingering: HashSet::new(),
            failing: HashSet::new(),
            stop,
        }
    }

    async fn run(mut self, mut reader: Reader) {
        let mut snap = reader.latest();
        let mut registry_open = true;
        loop {
            let retry = self.apply(&snap);
            let retry_later = async {
                if retry {
                    tokio::time::sleep(BIND_RETRY).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = self.stop.cancelled() => break,
                next = reader.changed(), if registry_open => match next {
                    Some(s) => snap = s,
                    None => registry_open = false,
                },
                _ = retry_later => {}
            }
        }
        for (addr, l) in self.listeners.drain() {
            l.stop.cancel();
            self.shared.bound.remove(&addr);
        }
        tracing::debug!("proxy listeners closed");
    }

    /// Brings listeners and routes in line with `snap`. True when a bind
    /// failed and should be retried.
    fn apply(&mut self, snap: &Arc<Snapshot>) -> bool {
        self.shared.ready.store(snap.ready, Ordering::Release);
        let changed = changed_services(&self.served, snap);
        let claims_moved = changed.iter().any(|k| {
            self.served.services.get(k).map(|s| claims(s))
                != snap.services.get(k).map(|s| claims(s))
        });
        let failed = if claims_moved || !self.failing.is_empty() {
            self.relisten(snap)
        } else {
            // Same listeners: only the changed services' routes move.
            for key in &changed {
                let Some(state) = snap.services.get(key) else {
                    continue;
                };
                for addr in self.owned.get(key).into_iter().flatten() {
                    let (Some(l), Some((_, port))) =
                        (self.listeners.get(addr), self.wanted.get(addr))
                    else {
                        continue;
                    };
                    l.routes.send_replace(Arc::new(self.route(state, *port)));
                }
            }
            false
        };
        self.close_removed(snap, &changed);
        self.prune(snap, &changed);
        self.served = snap.clone();
        self.shared.applied.store(snap.version, Ordering::Release);
        failed
    }

    /// Recomputes every listener claim, closes unwanted listeners, binds
    /// missing ones and refreshes routes that changed.
    fn relisten(&mut self, snap: &Snapshot) -> bool {
        let wanted = wanted_listeners(snap);
        let shared = &self.shared;
        self.failing.retain(|addr| wanted.contains_key(addr));
        self.listeners.retain(|addr, l| {
            let keep = wanted.contains_key(addr);
            if !keep {
                tracing::info!(%addr, "proxy listener closed");
                l.stop.cancel();
                shared.bound.remove(addr);
            }
            keep
        });
        let mut failed = false;
        for (addr, (key, port)) in &wanted {
            let state = &snap.services[key];
            if let Some(l) = self.listeners.get(addr) {
                let current = l.routes.borrow().clone();
                if !Arc::ptr_eq(&current.state, state) || current.port != *port {
                    l.routes.send_replace(Arc::new(self.route(state, *port)));
                }
                continue;
            }
            let route = Arc::new(self.route(state, *port));
            match listener::bind(*addr) {
                Ok(tcp) => {
                    let local = tcp.local_addr().unwrap_or(*addr);
                    self.failing.remove(addr);
                    tracing::info!(%addr, %local, service = %key, "proxy listening");
                    let (tx, rx) = watch::channel(route);
                    let stop = self.stop.child_token();
                    self.shared.bound.insert(*addr, local);
                    self.shared.tracker.spawn(listener::accept_loop(
                        tcp,
                        rx,
                        self.shared.clone(),
                        stop.clone(),
                    ));
                    self.listeners.insert(*addr, Listener { routes: tx, stop });
                }
                Err(source) => {
                    let e = ProxyError::Bind {
                        addr: *addr,
                        source,
                    };
                    if self.failing.insert(*addr) {
                        tracing::warn!(service = %key, error = %e, "proxy listener not opened; retrying every {}s", BIND_RETRY.as_secs());
                    } else {
                        tracing::debug!(service = %key, error = %e, "proxy listener still not opened");
                    }
                    metrics::counter!(crate::telemetry::PROXY_LISTENER_ERRORS, "service" => key.to_string())
                        .increment(1);
                    failed = true;
                }
            }
        }
        metrics::gauge!(crate::telemetry::PROXY_LISTENERS).set(self.listeners.len() as f64);
        self.owned.clear();
        for (addr, (key, _)) in &wanted {
            self.owned.entry(key.clone()).or_default().push(*addr);
        }
        self.wanted = wanted;
        failed
    }

    fn entry(&self, key: &ServiceKey, addr: SocketAddr) -> Arc<EndpointEntry> {
        self.shared
            .endpoints
            .entry((key.clone(), addr))
            .or_default()
            .clone()
    }

    fn route(&self, state: &Arc<ServiceState>, port: usize) -> Route {
        let key = state.key();
        let p = &state.spec.ports[port];
        let mut backends = Vec::new();
        let mut entries = Vec::new();
        for ep in state.serving() {
            let addr = ep.endpoint.addr(p);
            let entry = self.entry(key, addr);
            backends.push(Backend {
                addr,
                weight: ep.endpoint.weight,
                load: entry.load.clone(),
            });
            entries.push(entry);
        }
        let balancer = balancer::build(state.spec.balance, &backends);
        tracing::debug!(service = %key, port = %p.port, endpoints = backends.len(),
            policy = ?state.spec.balance, "proxy route built");
        Route {
            service: key.clone(),
            state: state.clone(),
            port,
            backends,
            entries,
            balancer,
            service_active: self
                .shared
                .service_active
                .entry(key.clone())
                .or_default()
                .clone(),
            metrics: OnceLock::new(),
        }
    }

    /// `close_on_removal`: endpoints that left the serving set lose their
    /// open connections.
    fn close_removed(&self, snap: &Snapshot, changed: &[ServiceKey]) {
        for key in changed {
            let Some(before) = self.served.services.get(key) else {
                continue;
            };
            let now = snap.services.get(key);
            let close = now.map_or(before.spec.proxy.close_on_removal, |n| {
                n.spec.proxy.close_on_removal
            });
            if !close {
                continue;
            }
            let still: HashSet<SocketAddr> = now.map_or_else(HashSet::new, |n| serving_addrs(n));
            for addr in serving_addrs(before) {
                if !still.contains(&addr)
                    && let Some(e) = self.shared.endpoints.get(&(key.clone(), addr))
                {
                    tracing::debug!(service = %key, endpoint = %addr, "endpoint removed; closing its connections");
                    e.close_connections();
                }
            }
        }
    }

    /// Forgets counts of endpoints that are gone and have no connection
    /// (looking only at the services that changed, and at entries kept
    /// earlier for their open connections).
    fn prune(&mut self, snap: &Snapshot, changed: &[ServiceKey]) {
        let mut candidates: Vec<(ServiceKey, SocketAddr)> = self.lingering.drain().collect();
        for key in changed {
            let Some(before) = self.served.services.get(key) else {
                continue;
            };
            let now: HashSet<SocketAddr> = snap
                .services
                .get(key)
                .map_or_else(HashSet::new, |n| all_addrs(n));
            candidates.extend(
                all_addrs(before)
                    .into_iter()
                    .filter(|a| !now.contains(a))
                    .map(|a| (key.clone(), a)),
            );
        }
        for (key, addr) in candidates {
            let present = snap
                .services
                .get(&key)
                .is_some_and(|n| all_addrs(n).contains(&addr));
            if present {
                continue;
            }
            let busy = self
                .shared
                .endpoints
                .get(&(key.clone(), addr))
                .is_some_and(|e| e.load.active.load(Ordering::Relaxed) > 0);
            if busy {
                self.lingering.insert((key, addr));
            } else {
                self.shared.endpoints.remove(&(key, addr));
            }
        }
        for key in changed {
            if !snap.services.contains_key(key) {
                self.shared
                    .service_active
                    .remove_if(key, |_, n| n.load(Ordering::Relaxed) == 0);
            }
        }
    }
}

/// Every endpoint address of every port of a service.
fn all_addrs(svc: &ServiceState) -> HashSet<SocketAddr> {
    let mut out = HashSet::new();
    for port in &svc.spec.ports {
        for ep in &svc.endpoints {
            out.insert(ep.endpoint.addr(port));
        }
    }
    out
}

fn serving_addrs(svc: &ServiceState) -> HashSet<SocketAddr> {
    let mut out = HashSet::new();
    for port in &svc.spec.ports {
        for ep in svc.serving() {
            out.insert(ep.endpoint.addr(port));
        }
    }
    out
}
