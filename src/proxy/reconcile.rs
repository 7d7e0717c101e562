//! The listener control loop: level-triggered on the latest snapshot.
//!
//! One task diffs the wanted listeners (each TCP port of each service with
//! a vip, and each explicit `listen`) against the open ones, binds and
//! closes, and swaps in a new [`Route`] when a service changes. A bind
//! failure is logged, counted and retried every [`BIND_RETRY`]; other
//! listeners keep serving.
//!
//! Everything here is owned by that one task: the open listeners, the
//! listener claims, and the maps of live per-service and per-endpoint
//! entries (keyed by service and endpoint address, so counts survive
//! snapshot changes). Routes and connections hold the entries themselves
//! (`Arc`s with atomic counts), never the maps.
//!
//! Each pass costs one pointer comparison per service plus work for the
//! services that changed: at 10k services a one-endpoint change rebuilds
//! one route, not every listener claim and endpoint entry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::error::ProxyError;
use super::listener;
use super::route::{EndpointEntry, Route, ServiceEntry};
use super::shared::Shared;
use super::udp;
use super::vips::VipInterface;
use crate::model::{EndpointState, Protocol, ProxyLive, ServiceKey, ServiceState, Snapshot};
use crate::registry::Reader;

/// How long a failed bind waits before it is tried again.
pub(super) const BIND_RETRY: Duration = Duration::from_secs(5);

/// Slow start moves the weights this many times per window...
const RAMP_STEPS: u32 = 20;
/// ...but not more often than this.
const RAMP_STEP_MIN: Duration = Duration::from_millis(50);

/// One endpoint of one service.
type EndpointKey = (ServiceKey, SocketAddr);

/// An open listener.
struct Listener {
    routes: watch::Sender<Arc<Route>>,
    stop: CancellationToken,
}

pub(super) struct Reconciler {
    shared: Arc<Shared>,
    listeners: HashMap<SocketAddr, Listener>,
    /// The snapshot last applied, to see what changed and endpoints leave.
    served: Arc<Snapshot>,
    /// Which service (and port index) owns each wanted listen address.
    wanted: BTreeMap<SocketAddr, (ServiceKey, usize)>,
    /// The listen addresses each service owns (the inverse of `wanted`).
    owned: HashMap<ServiceKey, Vec<SocketAddr>>,
    /// The live entry of every endpoint a route was built over.
    endpoints: HashMap<EndpointKey, Arc<EndpointEntry>>,
    /// The live entry of every service a route was built for.
    services: HashMap<ServiceKey, Arc<ServiceEntry>>,
    /// Endpoint entries kept only because connections were open on them;
    /// forgotten once those close.
    lingering: HashSet<EndpointKey>,
    /// Listen addresses whose bind failed (warned once, then retried quietly).
    failing: HashSet<SocketAddr>,
    /// Services with an endpoint in slow start, and when their routes are
    /// rebuilt next (with the grown shares).
    ramping: HashSet<ServiceKey>,
    next_ramp: Option<Instant>,
    /// `[proxy] vip_interface`: told the vips served after each relisten.
    vips: Option<VipInterface>,
    stop: CancellationToken,
    /// Tells `Proxy::drain` the loop is gone. The last field: it drops
    /// after `Drop` has closed the listeners.
    _done: DropGuard,
}

/// Where to listen: every TCP port of a service with a vip (vip:port) and
/// every explicit `listen`, as the registry gave them out (each to one
/// service). Should two services still name one address, the first in key
/// order keeps it.
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

/// The listen addresses one service holds, with the port index (the
/// registry decided which service holds a contested address).
fn claims(svc: &ServiceState) -> Vec<(SocketAddr, usize)> {
    svc.listeners.clone()
}

/// Services added, removed or replaced between two snapshots. The map
/// skips the subtrees both snapshots share, so a one-service change costs
/// O(log n), not a walk of every service.
pub(super) fn changed_services(before: &Snapshot, now: &Snapshot) -> Vec<ServiceKey> {
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

/// The addresses of `endpoints` on every port of `svc`.
fn addrs<'a>(
    svc: &'a ServiceState,
    endpoints: impl Iterator<Item = &'a EndpointState>,
) -> HashSet<SocketAddr> {
    endpoints
        .flat_map(|ep| svc.spec.ports.iter().map(|port| ep.endpoint.addr(port)))
        .collect()
}

/// Every endpoint address of every port of a service.
/// The live entry of `addr` of `key`, made (and shown to the admin API)
/// on first use.
fn entry_of(
    endpoints: &mut HashMap<EndpointKey, Arc<EndpointEntry>>,
    proxy_live: &ProxyLive,
    kill: &CancellationToken,
    key: &ServiceKey,
    addr: SocketAddr,
) -> Arc<EndpointEntry> {
    endpoints
        .entry((key.clone(), addr))
        .or_insert_with(|| {
            let e = Arc::new(EndpointEntry::new(kill));
            proxy_live.track(key, addr, e.load.clone());
            e
        })
        .clone()
}

fn all_addrs(svc: &ServiceState) -> HashSet<SocketAddr> {
    addrs(svc, svc.endpoints.iter())
}

/// The addresses the service serves (connections may go to them).
fn serving_addrs(svc: &ServiceState) -> HashSet<SocketAddr> {
    addrs(svc, svc.proxied())
}

// === impl Reconciler ===

impl Reconciler {
    /// `done` is cancelled once the reconciler is gone (ended, panicked
    /// or dropped) and its listeners are closed.
    pub(super) fn new(
        shared: Arc<Shared>,
        stop: CancellationToken,
        done: CancellationToken,
    ) -> Self {
        Self {
            vips: shared.vip_interface.as_deref().map(VipInterface::start),
            shared,
            listeners: HashMap::new(),
            served: Arc::new(Snapshot::default()),
            wanted: BTreeMap::new(),
            owned: HashMap::new(),
            endpoints: HashMap::new(),
            services: HashMap::new(),
            lingering: HashSet::new(),
            failing: HashSet::new(),
            ramping: HashSet::new(),
            next_ramp: None,
            stop,
            _done: done.drop_guard(),
        }
    }

    /// Follows the registry until `stop`: Ok then. Err when the registry
    /// ends first (the snapshot would freeze).
    pub(super) async fn run(mut self, mut reader: Reader) -> Result<(), ProxyError> {
        let mut snap = reader.latest();
        loop {
            let retry = self.apply(&snap);
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok(()),
                next = reader.changed() => match next {
                    Some(s) => snap = s,
                    // The registry also ends on shutdown, which has
                    // cancelled `stop` (its child) by then.
                    None if self.stop.is_cancelled() => return Ok(()),
                    None => return Err(ProxyError::RegistryClosed),
                },
                _ = tokio::time::sleep(BIND_RETRY), if retry => {}
                _ = tokio::time::sleep_until(self.next_ramp.unwrap_or_else(Instant::now)),
                    if self.next_ramp.is_some() => {}
            }
        }
    }

    /// Brings listeners and routes in line with `snap`. True when a bind
    /// failed and should be retried.
    pub(super) fn apply(&mut self, snap: &Arc<Snapshot>) -> bool {
        self.shared.ready.store(snap.ready, Ordering::Release);
        let changed = changed_services(&self.served, snap);
        self.start_ramps(snap, &changed);
        let claims_moved = changed.iter().any(|k| {
            self.served.services.get(k).map(|s| claims(s))
                != snap.services.get(k).map(|s| claims(s))
        });
        let failed = if claims_moved || !self.failing.is_empty() {
            self.relisten(snap)
        } else {
            self.reroute(snap, &changed);
            false
        };
        self.close_removed(snap, &changed);
        self.prune(snap, &changed);
        self.step_ramps(snap);
        self.served = snap.clone();
        self.shared.applied.store(snap.version, Ordering::Release);
        failed
    }

    /// Slow start: endpoints that joined the serving set of a service that
    /// was served before (not at start-up, not a new service: then every
    /// endpoint is new) start ramping now.
    fn start_ramps(&mut self, snap: &Snapshot, changed: &[ServiceKey]) {
        let now = Instant::now();
        for key in changed {
            let (Some(before), Some(state)) =
                (self.served.services.get(key), snap.services.get(key))
            else {
                continue;
            };
            if state.spec.proxy.slow_start.is_none() {
                continue;
            }
            let was = serving_addrs(before);
            for addr in serving_addrs(state).difference(&was) {
                entry_of(
                    &mut self.endpoints,
                    &self.shared.live,
                    &self.shared.kill,
                    key,
                    *addr,
                )
                .start_ramp(now);
                tracing::debug!(service = %key, endpoint = %addr, "slow start");
                self.ramping.insert(key.clone());
            }
        }
    }

    /// Rebuilds the routes of ramping services when a step is due, and
    /// forgets the services whose endpoints all reached their full weight.
    fn step_ramps(&mut self, snap: &Snapshot) {
        if self.ramping.is_empty() {
            self.next_ramp = None;
            return;
        }
        let now = Instant::now();
        if self.next_ramp.is_some_and(|t| now < t) {
            return;
        }
        let keys: Vec<ServiceKey> = self.ramping.iter().cloned().collect();
        self.reroute(snap, &keys);
        let mut step: Option<Duration> = None;
        for key in keys {
            let window = snap
                .services
                .get(&key)
                .and_then(|s| s.spec.proxy.slow_start);
            let still = window.is_some()
                && self.owned.get(&key).into_iter().flatten().any(|addr| {
                    self.listeners
                        .get(addr)
                        .is_some_and(|l| l.routes.borrow().ramping)
                });
            match window {
                Some(w) if still => {
                    let s = (w / RAMP_STEPS).max(RAMP_STEP_MIN);
                    step = Some(step.map_or(s, |x| x.min(s)));
                }
                _ => {
                    self.ramping.remove(&key);
                }
            }
        }
        self.next_ramp = step.map(|s| now + s);
    }

    /// Same listeners: only the changed services' routes move.
    fn reroute(&mut self, snap: &Snapshot, changed: &[ServiceKey]) {
        for key in changed {
            let Some(state) = snap.services.get(key) else {
                continue;
            };
            let ports: Vec<(SocketAddr, usize)> = self
                .owned
                .get(key)
                .into_iter()
                .flatten()
                .filter(|addr| self.listeners.contains_key(addr))
                .filter_map(|addr| self.wanted.get(addr).map(|(_, port)| (*addr, *port)))
                .collect();
            for (addr, port) in ports {
                let route = Arc::new(self.route(state, port));
                self.listeners[&addr].routes.send_replace(route);
            }
        }
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
                    let route = Arc::new(self.route(state, *port));
                    self.listeners[addr].routes.send_replace(route);
                }
                continue;
            }
            let route = Arc::new(self.route(state, *port));
            failed |= !self.open(*addr, key, route);
        }
        metrics::gauge!(crate::telemetry::PROXY_LISTENERS).set(self.listeners.len() as f64);
        if let Some(vips) = &mut self.vips {
            // The vips whose listeners this proxy holds.
            let served = wanted
                .iter()
                .filter(|(addr, (key, _))| snap.services[key].spec.vip == Some(addr.ip()))
                .map(|(addr, _)| addr.ip())
                .collect();
            vips.want(served);
        }
        self.owned.clear();
        for (addr, (key, _)) in &wanted {
            self.owned.entry(key.clone()).or_default().push(*addr);
        }
        self.wanted = wanted;
        failed
    }

    /// Binds `addr` and starts its accept loop over `route`. False (logged
    /// and counted) when the bind failed.
    fn open(&mut self, addr: SocketAddr, key: &ServiceKey, route: Arc<Route>) -> bool {
        if route.state.spec.ports[route.port].protocol == Protocol::Udp {
            return self.open_udp(addr, key, route);
        }
        match listener::bind(addr) {
            Ok(tcp) => {
                let local = tcp.local_addr().unwrap_or(addr);
                self.failing.remove(&addr);
                tracing::info!(%addr, %local, service = %key, "proxy listening");
                let (tx, rx) = watch::channel(route);
                let stop = self.stop.child_token();
                self.shared.bound.insert(addr, local);
                self.shared.tracker.spawn(listener::accept_loop(
                    tcp,
                    rx,
                    self.shared.clone(),
                    stop.clone(),
                ));
                self.listeners.insert(addr, Listener { routes: tx, stop });
                true
            }
            Err(source) => {
                let e = ProxyError::Bind { addr, source };
                if self.failing.insert(addr) {
                    tracing::warn!(service = %key, error = %e, "proxy listener not opened; retrying every {}s", BIND_RETRY.as_secs());
                } else {
                    tracing::debug!(service = %key, error = %e, "proxy listener still not opened");
                }
                metrics::counter!(crate::telemetry::PROXY_LISTENER_ERRORS, "service" => key.to_string())
                    .increment(1);
                false
            }
        }
    }

    /// [`Reconciler::open`] for a UDP port.
    fn open_udp(&mut self, addr: SocketAddr, key: &ServiceKey, route: Arc<Route>) -> bool {
        match udp::bind(addr) {
            Ok(sock) => {
                let local = sock.local_addr().unwrap_or(addr);
                self.failing.remove(&addr);
                tracing::info!(%addr, %local, service = %key, "proxy listening (udp)");
                let (tx, rx) = watch::channel(route);
                let stop = self.stop.child_token();
                self.shared.bound.insert(addr, local);
                self.shared
                    .tracker
                    .spawn(udp::serve(sock, rx, self.shared.clone(), stop.clone()));
                self.listeners.insert(addr, Listener { routes: tx, stop });
                true
            }
            Err(source) => {
                let e = ProxyError::Bind { addr, source };
                if self.failing.insert(addr) {
                    tracing::warn!(service = %key, error = %e, "proxy udp listener not opened; retrying every {}s", BIND_RETRY.as_secs());
                }
                false
            }
        }
    }

    /// The route of one service port, over the live entries of the service
    /// and its serving endpoints (made on first use).
    pub(super) fn route(&mut self, state: &Arc<ServiceState>, port: usize) -> Route {
        let key = state.key();
        let live = self
            .services
            .entry(key.clone())
            .or_insert_with(|| Arc::new(ServiceEntry::new(key)))
            .clone();
        let endpoints = &mut self.endpoints;
        let proxy_live = &self.shared.live;
        let kill = &self.shared.kill;
        Route::build(state, port, live, proxy_live, |addr| {
            entry_of(endpoints, proxy_live, kill, key, addr)
        })
    }

    /// The live entry of one endpoint, if a route was built over it.
    pub(super) fn endpoint(
        &self,
        key: &ServiceKey,
        addr: SocketAddr,
    ) -> Option<&Arc<EndpointEntry>> {
        self.endpoints.get(&(key.clone(), addr))
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
                    && let Some(e) = self.endpoint(key, addr)
                {
                    tracing::debug!(service = %key, endpoint = %addr, "endpoint removed; closing its connections");
                    e.close_connections();
                }
            }
        }
    }

    /// Forgets the entries of endpoints and services that are gone and
    /// have no connection (looking only at the services that changed, and
    /// at endpoint entries kept earlier for their open connections).
    fn prune(&mut self, snap: &Snapshot, changed: &[ServiceKey]) {
        let mut candidates: Vec<EndpointKey> = self.lingering.drain().collect();
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
                .endpoint(&key, addr)
                .is_some_and(|e| e.load.active.load(Ordering::Relaxed) > 0);
            if busy {
                self.lingering.insert((key, addr));
            } else {
                self.shared.live.set_share(&key, addr.ip(), None);
                self.shared.live.forget(&key, addr);
                self.endpoints.remove(&(key, addr));
            }
        }
        for key in changed {
            let idle = |s: &Arc<ServiceEntry>| s.active.load(Ordering::Relaxed) == 0;
            if !snap.services.contains_key(key) && self.services.get(key).is_some_and(idle) {
                self.services.remove(key);
            }
        }
    }
}

impl Drop for Reconciler {
    /// However the loop ends (stop, registry gone, panic, abort), its
    /// listeners close with it.
    fn drop(&mut self) {
        for (addr, l) in self.listeners.drain() {
            l.stop.cancel();
            self.shared.bound.remove(&addr);
        }
        tracing::debug!("proxy listeners closed");
    }
}
