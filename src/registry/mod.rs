//! The registry: the one writer of beacon's state.
//!
//! Sources send [`Update`]s, the health loop sends health changes; the
//! registry task applies each [`Event`] with the pure [`apply`] and, when
//! something changed, publishes a new immutable [`Snapshot`] on a `watch`
//! channel. Readers ([`Reader`]) never lock and never wait on the writer.
//!
//! ## Which source owns a service
//! Every source keeps its own desired set. When two sources name the same
//! service, the source listed first in the config wins; the other one's
//! definition is kept aside (and logged as a conflict) and takes over as
//! soon as the winner stops naming the service. The rule is level-triggered:
//! the outcome depends only on what each source says now, never on order
//! of arrival.
//!
//! ## Which service holds a vip, a listen address, a hostname
//! Claims are decided across every source here (see `claims`): the service
//! of the higher-priority source gets it, then the first to ask keeps it
//! while it asks. The loser is served without it, logged once, and listed
//! in [`Snapshot::conflicts`] (`/v1/services`, `beacon_claim_conflicts`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::model::{
    EndpointState, Health, ProbeState, ServiceKey, ServiceSpec, ServiceState, Snapshot, SourceId,
    SourceStatus,
};

mod claims;
pub mod events;
mod gauges;
mod settle;

use gauges::{publish_conflict_gauges, publish_endpoint_gauges, publish_source_gauges};

/// What a source says. `Reset` is the whole truth of that source: whatever
/// it does not list is gone. A source sends one after every (re)connect or
/// full re-read, then `Upsert`/`Remove`.
#[derive(Clone, Debug)]
pub enum Update {
    Reset(Vec<ServiceSpec>),
    Upsert(Box<ServiceSpec>),
    Remove(ServiceKey),
    /// The source reached (`true`) or lost (`false`) its upstream; while
    /// lost it keeps what it last said (stale but served). Not a sync.
    Connected(bool),
    /// Conflicts the source itself decided (etcd: nodes that publish
    /// different specs for one service), all of them; listed with the
    /// claim conflicts in `Snapshot::conflicts`. Not a sync.
    Conflicts(Vec<crate::model::Conflict>),
}

/// A change of one endpoint's health, from the health loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthChange {
    /// The probe verdict after rise/fall hysteresis.
    Probe(ProbeState),
    /// Passive ejection begins (`Some(reason)`) or ends (`None`).
    Ejected(Option<Arc<str>>),
}

#[derive(Clone, Debug)]
pub enum Event {
    Source {
        source: SourceId,
        update: Update,
    },
    Health {
        service: ServiceKey,
        ip: IpAddr,
        change: HealthChange,
    },
    /// A source lost what it watches (engine, API server, etcd); it keeps
    /// its last endpoints served and is connected again at its next Reset.
    SourceLost {
        source: SourceId,
        reason: Arc<str>,
    },
    /// The startup timeout passed: serve what is known.
    StartupTimeout,
}

/// The registry's mutable state. Only the registry task touches it.
#[derive(Debug, Default)]
pub struct State {
    /// Sources in priority order (config order, then order of appearance).
    sources: Vec<SourceId>,
    synced: HashSet<SourceId>,
    desired: HashMap<SourceId, BTreeMap<ServiceKey, Arc<ServiceSpec>>>,
    health: HashMap<ServiceKey, HashMap<IpAddr, Health>>,
    /// Who holds each vip, listen address and hostname.
    ledger: claims::Ledger,
    /// Conflicts sources decided themselves (`Update::Conflicts`).
    reported: BTreeMap<SourceId, Vec<crate::model::Conflict>>,
    snapshot: Snapshot,
}

/// What one [`apply`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub services: Vec<ServiceKey>,
    pub ready: bool,
    /// The list of conflicts moved.
    pub conflicts: bool,
    /// A source connected or was lost.
    pub sources: bool,
}

impl Changed {
    pub fn any(&self) -> bool {
        self.ready || self.conflicts || self.sources || !self.services.is_empty()
    }
}

impl State {
    /// A state that becomes ready once every one of `sources` has sent its
    /// first `Reset`. With no sources it is ready at once.
    pub fn new(sources: Vec<SourceId>) -> Self {
        let ready = sources.is_empty();
        let waiting = SourceStatus {
            connected: false,
            reason: "awaiting first sync".into(),
        };
        Self {
            snapshot: Snapshot {
                ready,
                sources: sources
                    .iter()
                    .map(|s| (s.clone(), waiting.clone()))
                    .collect(),
                ..Snapshot::default()
            },
            sources,
            ..Self::default()
        }
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Publishes the current state as a new version.
    fn next_snapshot(&mut self) -> Arc<Snapshot> {
        self.snapshot.version += 1;
        Arc::new(self.snapshot.clone())
    }

    fn owner(&self, key: &ServiceKey) -> Option<(&SourceId, &Arc<ServiceSpec>)> {
        claims::owner(&self.sources, &self.desired, key).map(|(_, s, spec)| (s, spec))
    }

    /// Recomputes one service from the desired sets and health; true if the
    /// served state changed.
    fn rebuild(&mut self, key: &ServiceKey) -> bool {
        let Some((source, spec)) = self.owner(key) else {
            self.health.remove(key);
            return self.snapshot.services.remove(key).is_some();
        };
        let (source, spec) = (source.clone(), spec.clone());
        let (spec, listeners) = self.effective(key, &spec);
        let health = self.health.entry(key.clone()).or_default();
        health.retain(|ip, _| spec.endpoints.iter().any(|e| e.ip == *ip));
        let endpoints = spec
            .endpoints
            .iter()
            .map(|e| {
                let h = health.get(&e.ip).cloned().unwrap_or_default();
                EndpointState::new(e.clone(), h, &spec.health)
            })
            .collect();
        let mut state = ServiceState::new(spec, source, endpoints);
        state.listeners = listeners;
        if self
            .snapshot
            .services
            .get(key)
            .is_some_and(|s| **s == state)
        {
            return false;
        }
        self.snapshot.services.insert(key.clone(), Arc::new(state));
        true
    }

    fn source_update(&mut self, source: SourceId, update: Update) -> Changed {
        if !self.sources.contains(&source) {
            self.sources.push(source.clone());
        }
        let mut changed = Changed::default();
        if matches!(update, Update::Reset(_)) {
            changed.sources = self.set_connected(&source, true, "synced".into());
        }
        let desired = self.desired.entry(source.clone()).or_default();
        let mut touched: Vec<ServiceKey> = Vec::new();
        let put = |desired: &mut BTreeMap<ServiceKey, Arc<ServiceSpec>>, spec: ServiceSpec| {
            if desired.get(&spec.key).is_some_and(|old| **old == spec) {
                return None;
            }
            let key = spec.key.clone();
            desired.insert(key.clone(), Arc::new(spec));
            Some(key)
        };
        match update {
            Update::Reset(specs) => {
                let listed: HashSet<ServiceKey> = specs.iter().map(|s| s.key.clone()).collect();
                let gone: Vec<ServiceKey> = desired
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    desired.remove(&key);
                    touched.push(key);
                }
                for spec in specs {
                    touched.extend(put(desired, spec));
                }
            }
            Update::Upsert(spec) => touched.extend(put(desired, *spec)),
            Update::Remove(key) => {
                if desired.remove(&key).is_some() {
                    touched.push(key);
                }
            }
            Update::Connected(up) => {
                let reason: Arc<str> = if up { "connected" } else { "upstream lost" }.into();
                let sources = self.set_connected(&source, up, reason);
                let mut reached = self.set_reachable(source, up);
                reached.sources = sources;
                return reached;
            }
            Update::Conflicts(list) => {
                self.reported.insert(source, list);
                return Changed {
                    conflicts: self.refresh_conflicts(),
                    ..Changed::default()
                };
            }
        }
        let moved = self.settle_claims(&touched);
        for key in touched.into_iter().chain(moved) {
            if let Some((owner, _)) = self.owner(&key)
                && *owner != source
                && !crate::model::merges_local(owner)
                && self.desired[&source].contains_key(&key)
            {
                tracing::warn!(
                    service = %key, source = %source, owner = %owner,
                    "service named by two sources; the one listed first in the config wins"
                );
            }
            if self.rebuild(&key) {
                changed.services.push(key);
            }
        }
        changed.conflicts = self.refresh_conflicts();
        if self.synced.insert(source) {
            changed.ready = self.check_ready();
        }
        changed
    }

    /// Records a source's connection; true when it moved.
    fn set_connected(&mut self, source: &SourceId, connected: bool, reason: Arc<str>) -> bool {
        let now = SourceStatus { connected, reason };
        if self.snapshot.sources.get(source) == Some(&now) {
            return false;
        }
        self.snapshot.sources.insert(source.clone(), now);
        true
    }

    /// Records whether `source` reaches its upstream (`Snapshot::disconnected`).
    fn set_reachable(&mut self, source: SourceId, up: bool) -> Changed {
        let listed = self.snapshot.disconnected.contains(&source);
        if up != listed {
            return Changed::default();
        }
        let mut list = self.snapshot.disconnected.to_vec();
        if up {
            list.retain(|s| *s != source);
        } else {
            list.push(source);
            list.sort();
        }
        self.snapshot.disconnected = list.into();
        Changed {
            conflicts: true,
            ..Changed::default()
        }
    }

    fn check_ready(&mut self) -> bool {
        if self.snapshot.ready || !self.sources.iter().all(|s| self.synced.contains(s)) {
            return false;
        }
        self.snapshot.ready = true;
        true
    }

    fn health_update(&mut self, service: ServiceKey, ip: IpAddr, change: HealthChange) -> Changed {
        let mut changed = Changed::default();
        if self.set_health(&service, ip, change) && self.rebuild(&service) {
            changed.services.push(service);
        }
        changed
    }

    /// Records a health change without rebuilding the service; false when
    /// the endpoint is unknown.
    fn set_health(&mut self, service: &ServiceKey, ip: IpAddr, change: HealthChange) -> bool {
        let known = self
            .snapshot
            .services
            .get(service)
            .is_some_and(|s| s.endpoint(ip).is_some());
        if !known {
            return false;
        }
        let health = self
            .health
            .entry(service.clone())
            .or_default()
            .entry(ip)
            .or_default();
        match change {
            HealthChange::Probe(p) => health.probe = p,
            HealthChange::Ejected(e) => health.ejected = e,
        }
        true
    }
}

/// Applies one event to the state. Pure: no I/O, no clock.
pub fn apply(state: &mut State, event: Event) -> Changed {
    match event {
        Event::Source { source, update } => state.source_update(source, update),
        Event::Health {
            service,
            ip,
            change,
        } => state.health_update(service, ip, change),
        Event::SourceLost { source, reason } => Changed {
            sources: state.set_connected(&source, false, reason),
            ..Changed::default()
        },
        Event::StartupTimeout => {
            if state.snapshot.ready {
                return Changed::default();
            }
            let missing: Vec<&SourceId> = state
                .sources
                .iter()
                .filter(|s| !state.synced.contains(*s))
                .collect();
            tracing::warn!(
                ?missing,
                "startup timeout passed before every source synced; serving what is known"
            );
            state.snapshot.ready = true;
            Changed {
                ready: true,
                ..Changed::default()
            }
        }
    }
}

/// Applies a burst of events with the same result as applying them one by
/// one, but rebuilds a service once for all of its health changes (a mass
/// flip of 10,000 endpoints of one service costs one rebuild, not 10,000).
pub fn apply_batch(state: &mut State, events: impl IntoIterator<Item = Event>) -> Changed {
    let mut changed = Changed::default();
    let mut dirty: Vec<ServiceKey> = Vec::new();
    let mut seen: HashSet<ServiceKey> = HashSet::new();
    for event in events {
        match event {
            Event::Health {
                service,
                ip,
                change,
            } => {
                if state.set_health(&service, ip, change) && seen.insert(service.clone()) {
                    dirty.push(service);
                }
            }
            other => {
                let more = apply(state, other);
                changed.ready |= more.ready;
                changed.conflicts |= more.conflicts;
                changed.sources |= more.sources;
                changed.services.extend(more.services);
            }
        }
    }
    for key in dirty {
        if state.rebuild(&key) {
            changed.services.push(key);
        }
    }
    changed.services.sort();
    changed.services.dedup();
    changed
}

/// A cheap, cloneable handle to the latest snapshot.
#[derive(Clone, Debug)]
pub struct Reader {
    rx: watch::Receiver<Arc<Snapshot>>,
}

impl Reader {
    /// The latest snapshot. Never blocks.
    pub fn current(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// Waits until a snapshot newer than the last one seen by this reader
    /// is published, and returns it. `None` when the registry has stopped.
    pub async fn changed(&mut self) -> Option<Arc<Snapshot>> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }

    /// True when a snapshot newer than the last one seen by this reader was
    /// published. One atomic load: cheap enough for a per-packet check.
    /// Also true once the registry has stopped (the DNS lameduck): the
    /// channel cannot say then whether the last snapshot was seen, and a
    /// reader that had not seen it must not serve an older one.
    pub fn has_changed(&self) -> bool {
        self.rx.has_changed().unwrap_or(true)
    }

    /// Marks the current snapshot as seen and returns it.
    pub fn latest(&mut self) -> Arc<Snapshot> {
        self.rx.borrow_and_update().clone()
    }

    /// Waits until the registry is ready.
    pub async fn ready(&mut self) -> Option<Arc<Snapshot>> {
        let snap = self.rx.wait_for(|s| s.ready).await.ok()?;
        Some(snap.clone())
    }

    /// A reader over a fixed snapshot, for tests and benches.
    pub fn fixed(snapshot: Snapshot) -> Self {
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        std::mem::forget(tx);
        Self { rx }
    }
}

/// The sending side, one clone per source and one for health.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Event>,
    /// Gets a copy of every source update sent through this handle: the
    /// etcd publisher's view of the local sources it publishes.
    tap: Option<mpsc::UnboundedSender<(SourceId, Update)>>,
}

impl Handle {
    /// Sends an event; false when the registry has stopped.
    pub async fn send(&self, event: Event) -> bool {
        self.tx.send(event).await.is_ok()
    }

    /// This handle, also copying each source update to `tap`.
    pub fn tapped(&self, tap: mpsc::UnboundedSender<(SourceId, Update)>) -> Self {
        Self {
            tx: self.tx.clone(),
            tap: Some(tap),
        }
    }

    pub async fn source(&self, source: &SourceId, update: Update) -> bool {
        if let Some(tap) = &self.tap {
            // The tap's reader gone (etcd stopped) is its own loop's error.
            let _ = tap.send((source.clone(), update.clone()));
        }
        self.send(Event::Source {
            source: source.clone(),
            update,
        })
        .await
    }

    /// Says that `source` lost what it watches (see [`Event::SourceLost`]).
    pub async fn source_lost(&self, source: &SourceId, reason: &str) -> bool {
        self.send(Event::SourceLost {
            source: source.clone(),
            reason: reason.into(),
        })
        .await
    }

    pub async fn health(&self, service: ServiceKey, ip: IpAddr, change: HealthChange) -> bool {
        self.send(Event::Health {
            service,
            ip,
            change,
        })
        .await
    }
}

/// Events applied together at most, so a flood still publishes regularly.
const BURST: usize = 4096;

/// Why the registry loop ended before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("every sender of events is gone (sources and health stopped)")]
    NoSenders,
}

/// Builds the registry: the handle sources and health send to, the reader
/// everyone else reads, and the loop to run (`app` supervises it). The
/// loop returns `Ok(())` once `shutdown` is cancelled. `sources` lists the
/// configured sources in priority order; readiness waits for each of them
/// (or `startup_timeout`).
pub fn new(
    sources: Vec<SourceId>,
    startup_timeout: Duration,
    shutdown: CancellationToken,
) -> (
    Handle,
    Reader,
    impl Future<Output = Result<(), RegistryError>> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel::<Event>(4096);
    let state = State::new(sources);
    let (snap_tx, snap_rx) = watch::channel(Arc::new(state.snapshot.clone()));
    let run = run(state, rx, tx.clone(), snap_tx, startup_timeout, shutdown);
    (Handle { tx, tap: None }, Reader { rx: snap_rx }, run)
}

/// Like [`new`], with the loop spawned on the runtime (tests, benches).
pub fn spawn(
    sources: Vec<SourceId>,
    startup_timeout: Duration,
    shutdown: CancellationToken,
) -> (
    Handle,
    Reader,
    tokio::task::JoinHandle<Result<(), RegistryError>>,
) {
    let (handle, reader, run) = new(sources, startup_timeout, shutdown);
    (handle, reader, tokio::spawn(run))
}

async fn run(
    mut state: State,
    mut rx: mpsc::Receiver<Event>,
    timeout_tx: mpsc::Sender<Event>,
    snap_tx: watch::Sender<Arc<Snapshot>>,
    startup_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), RegistryError> {
    let timer = tokio::spawn(async move {
        tokio::time::sleep(startup_timeout).await;
        let _ = timeout_tx.send(Event::StartupTimeout).await;
    });
    publish_source_gauges(&state.snapshot);
    let result = loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            event = rx.recv() => match event {
                Some(e) => e,
                None => break Err(RegistryError::NoSenders),
            },
        };
        // Coalesce a burst into one published version.
        let mut burst = vec![event];
        while burst.len() < BURST
            && let Ok(event) = rx.try_recv()
        {
            burst.push(event);
        }
        let changed = apply_batch(&mut state, burst);
        if changed.any() {
            let version = state.snapshot.version + 1;
            let now = std::time::SystemTime::now();
            let happened = events::diff(
                &snap_tx.borrow(),
                &state.snapshot,
                &changed.services,
                version,
                now,
            );
            events::record(&mut state.snapshot, happened);
            let snap = state.next_snapshot();
            if changed.sources {
                publish_source_gauges(&snap);
            }
            metrics::gauge!(crate::telemetry::REGISTRY_VERSION).set(snap.version as f64);
            let previous = snap_tx.send_replace(snap.clone());
            publish_endpoint_gauges(&previous, &snap, &changed.services);
            if changed.conflicts {
                publish_conflict_gauges(&snap);
            }
            if changed.ready {
                tracing::info!(
                    services = snap.services.len(),
                    endpoints = snap.endpoint_count(),
                    version = snap.version,
                    "ready"
                );
            }
        }
    };
    timer.abort();
    result
}

#[cfg(test)]
mod tests;
