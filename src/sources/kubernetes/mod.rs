//! The `kubernetes` source: Services (v1) and EndpointSlices
//! (discovery.k8s.io/v1) from an API server, watched like CoreDNS and
//! kube-proxy watch them.
//!
//! One kube-runtime watcher per resource and namespace (or one for all
//! namespaces). The watcher lists, then watches from the list's
//! resourceVersion with bookmarks; on a 410 Gone it lists again (`Init`
//! … `InitDone` once more); on errors it retries with backoff. Nothing
//! is dropped on an error: a lost API server keeps the last state served.
//!
//! [`Store`] is the pure part: watcher events in, registry updates out. The
//! first complete list of every watch becomes one `Reset`; after that each
//! event (and each re-list) sends `Upsert`/`Remove` of the services it
//! changed, and only when the mapped spec really changed. Slices of one
//! service (label `kubernetes.io/service-name`) merge; see [`map`]. Objects
//! are kept as compact [`record`]s, never whole.

pub mod map;
pub mod record;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::config::{KubernetesConfig, ServiceDefaults};
use crate::model::{ServiceKey, ServiceSpec, SourceId};
use crate::registry::{self, Update};

use record::{ServiceRecord, SliceRecord};

use super::{Backoff, Source, SourceError, SourceFuture, count_error};

const BACKOFF_BASE: std::time::Duration = std::time::Duration::from_millis(200);
const BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a lost API server is asked whether it is back.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One watcher event, tagged with the scope (index into the namespaces,
/// or 0 for all) of the watch it came from.
pub enum Tagged {
    Service(usize, Box<Result<Event<Service>, watcher::Error>>),
    Slice(usize, Box<Result<Event<EndpointSlice>, watcher::Error>>),
}

impl Tagged {
    pub fn service(scope: usize, r: Result<Event<Service>, watcher::Error>) -> Self {
        Tagged::Service(scope, Box::new(r))
    }

    pub fn slice(scope: usize, r: Result<Event<EndpointSlice>, watcher::Error>) -> Self {
        Tagged::Slice(scope, Box::new(r))
    }

    pub fn error(&self) -> Option<&watcher::Error> {
        match self {
            Tagged::Service(_, r) => (**r).as_ref().err(),
            Tagged::Slice(_, r) => (**r).as_ref().err(),
        }
    }
}

/// A slice's (namespace, name).
type SliceId = (Box<str>, Box<str>);

/// A slice as buffered during a list: its id, its service (`None`: no
/// service label), what beacon reads of it.
type ListedSlice = (SliceId, Option<ServiceKey>, SliceRecord);

/// What the source knows, and what it told the registry.
pub struct Store {
    defaults: ServiceDefaults,
    /// `None`: every namespace.
    scopes: Vec<Option<Arc<str>>>,
    services: BTreeMap<ServiceKey, ServiceRecord>,
    /// Slices by their service, each sorted by slice name (mostly one).
    slices: HashMap<ServiceKey, Vec<(Box<str>, SliceRecord)>>,
    /// (namespace, slice name) → the service it was filed under.
    slice_owner: HashMap<SliceId, ServiceKey>,
    pending_services: HashMap<usize, Vec<(ServiceKey, ServiceRecord)>>,
    pending_slices: HashMap<usize, Vec<ListedSlice>>,
    /// Per scope: services listed once, slices listed once.
    synced: Vec<[bool; 2]>,
    reset_sent: bool,
    /// Whether the API server answers, as last told the registry (after
    /// the first sync: the `Reset` says connected).
    connected: bool,
    sent: BTreeMap<ServiceKey, ServiceSpec>,
}

impl Store {
    pub fn new(namespaces: &[Arc<str>], defaults: ServiceDefaults) -> Self {
        let scopes: Vec<Option<Arc<str>>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().cloned().map(Some).collect()
        };
        Self {
            defaults,
            synced: vec![[false; 2]; scopes.len()],
            scopes,
            services: BTreeMap::new(),
            slices: HashMap::new(),
            slice_owner: HashMap::new(),
            pending_services: HashMap::new(),
            pending_slices: HashMap::new(),
            reset_sent: false,
            connected: false,
            sent: BTreeMap::new(),
        }
    }

    pub fn scopes(&self) -> &[Option<Arc<str>>] {
        &self.scopes
    }

    /// Services last sent to the registry.
    pub fn sent(&self) -> &BTreeMap<ServiceKey, ServiceSpec> {
        &self.sent
    }

    fn in_scope(&self, scope: usize, ns: &str) -> bool {
        self.scopes[scope].as_deref().is_none_or(|s| s == ns)
    }

    /// Whether the API server answered last (false before the first sync).
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The API server answered (a watcher event or a probe): after the
    /// first sync, `Connected(true)` once when it had been lost.
    pub fn reached(&mut self) -> Option<Update> {
        if !self.reset_sent || self.connected {
            return None;
        }
        self.connected = true;
        Some(Update::Connected(true))
    }

    /// The updates one watcher event calls for. An error changes no
    /// service (the last state stays served); after the first sync the
    /// first error of an outage says `Connected(false)`.
    pub fn apply(&mut self, ev: Tagged) -> Vec<Update> {
        if let Some(e) = ev.error() {
            // A 410 Gone comes from a server that answers: the watcher
            // lists again, nothing is lost.
            let gone = matches!(e, watcher::Error::WatchError(s) if s.code == 410);
            if gone || !self.reset_sent || !self.connected {
                return Vec::new();
            }
            self.connected = false;
            return vec![Update::Connected(false)];
        }
        let mut out: Vec<Update> = self.reached().into_iter().collect();
        let touched = match ev {
            Tagged::Service(scope, r) => (*r).ok().and_then(|ev| self.on_service(scope, ev)),
            Tagged::Slice(scope, r) => (*r).ok().and_then(|ev| self.on_slice(scope, ev)),
        };
        if let Some(keys) = touched {
            out.extend(self.settle(keys));
        }
        out
    }

    /// The services an event touched; `None` while a list is buffered.
    fn on_service(&mut self, scope: usize, ev: Event<Service>) -> Option<BTreeSet<ServiceKey>> {
        match ev {
            Event::Init => {
                self.pending_services.insert(scope, Vec::new());
                None
            }
            Event::InitApply(s) => {
                if let Some(key) = map::service_key(&s) {
                    let listed = (key, ServiceRecord::new(&s));
                    self.pending_services.entry(scope).or_default().push(listed);
                }
                None
            }
            Event::InitDone => {
                let listed = self.pending_services.remove(&scope).unwrap_or_default();
                let mut touched: BTreeSet<ServiceKey> = self
                    .services
                    .keys()
                    .filter(|k| self.in_scope(scope, &k.namespace))
                    .cloned()
                    .collect();
                self.services.retain(|k, _| !touched.contains(k));
                for (key, s) in listed {
                    touched.insert(key.clone());
                    self.services.insert(key, s);
                }
                self.synced[scope][0] = true;
                Some(touched)
            }
            Event::Apply(s) => {
                let key = map::service_key(&s)?;
                self.services.insert(key.clone(), ServiceRecord::new(&s));
                Some(BTreeSet::from([key]))
            }
            Event::Delete(s) => {
                let key = map::service_key(&s)?;
                self.services.remove(&key);
                Some(BTreeSet::from([key]))
            }
        }
    }

    fn on_slice(&mut self, scope: usize, ev: Event<EndpointSlice>) -> Option<BTreeSet<ServiceKey>> {
        match ev {
            Event::Init => {
                self.pending_slices.insert(scope, Vec::new());
                None
            }
            Event::InitApply(s) => {
                if let Some(id) = slice_id(&s) {
                    let listed = (id, map::slice_service(&s), SliceRecord::new(&s));
                    self.pending_slices.entry(scope).or_default().push(listed);
                }
                None
            }
            Event::InitDone => {
                let listed = self.pending_slices.remove(&scope).unwrap_or_default();
                let gone: Vec<SliceId> = self
                    .slice_owner
                    .keys()
                    .filter(|(ns, _)| self.in_scope(scope, ns))
                    .cloned()
                    .collect();
                let mut touched = BTreeSet::new();
                for id in gone {
                    touched.extend(self.remove_slice(&id));
                }
                for (id, owner, s) in listed {
                    touched.extend(self.put_slice(id, owner, s));
                }
                self.synced[scope][1] = true;
                Some(touched)
            }
            Event::Apply(s) => {
                let id = slice_id(&s)?;
                Some(self.put_slice(id, map::slice_service(&s), SliceRecord::new(&s)))
            }
            Event::Delete(s) => {
                let id = slice_id(&s)?;
                Some(self.remove_slice(&id).into_iter().collect())
            }
        }
    }

    /// Files a slice under its service (`owner`: `None` without a service
    /// label); the services touched (its old one too, when its label
    /// changed).
    fn put_slice(
        &mut self,
        id: SliceId,
        owner: Option<ServiceKey>,
        slice: SliceRecord,
    ) -> BTreeSet<ServiceKey> {
        let mut touched: BTreeSet<ServiceKey> = self.remove_slice(&id).into_iter().collect();
        if let Some(key) = owner {
            let by_name = self.slices.entry(key.clone()).or_default();
            let at = by_name.partition_point(|(name, _)| *name < id.1);
            by_name.insert(at, (id.1.clone(), slice));
            self.slice_owner.insert(id, key.clone());
            touched.insert(key);
        }
        touched
    }

    fn remove_slice(&mut self, id: &SliceId) -> Option<ServiceKey> {
        let key = self.slice_owner.remove(id)?;
        if let Some(by_name) = self.slices.get_mut(&key) {
            by_name.retain(|(name, _)| *name != id.1);
            if by_name.is_empty() {
                self.slices.remove(&key);
            }
        }
        Some(key)
    }

    fn spec(&self, key: &ServiceKey) -> Option<ServiceSpec> {
        let svc = self.services.get(key)?;
        let slices = self.slices.get(key).into_iter().flatten().map(|(_, s)| s);
        map::spec_of(key.clone(), svc, slices, &self.defaults)
    }

    /// Before the first complete sync: nothing, then one `Reset`. After:
    /// what changed among `touched`.
    fn settle(&mut self, touched: BTreeSet<ServiceKey>) -> Vec<Update> {
        if !self.reset_sent {
            if !self.synced.iter().all(|s| s[0] && s[1]) {
                return Vec::new();
            }
            self.reset_sent = true;
            self.connected = true;
            let keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
            self.sent = keys
                .iter()
                .filter_map(|k| self.spec(k).map(|s| (k.clone(), s)))
                .collect();
            return vec![Update::Reset(self.sent.values().cloned().collect())];
        }
        let mut out = Vec::new();
        for key in touched {
            let now = self.spec(&key);
            if now.as_ref() == self.sent.get(&key) {
                continue;
            }
            match now {
                Some(spec) => {
                    self.sent.insert(key, spec.clone());
                    out.push(Update::Upsert(Box::new(spec)));
                }
                None => {
                    self.sent.remove(&key);
                    out.push(Update::Remove(key));
                }
            }
        }
        out
    }
}

/// Whether the API server answers a one-item list of services (which the
/// ClusterRole allows) within a second.
async fn answers(client: &Client, scope: &Option<Arc<str>>) -> bool {
    let api: Api<Service> = match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let params = kube::api::ListParams::default().limit(1);
    let list = api.list(&params);
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(1), list).await,
        Ok(Ok(_))
    )
}

fn slice_id(s: &EndpointSlice) -> Option<SliceId> {
    let ns = s.metadata.namespace.as_deref().unwrap_or("default");
    Some((ns.into(), s.metadata.name.as_deref()?.into()))
}

// === the source ===

/// Follows a Kubernetes API server.
pub struct KubernetesSource {
    id: SourceId,
    config: KubernetesConfig,
    defaults: ServiceDefaults,
}

impl KubernetesSource {
    pub fn new(config: KubernetesConfig, defaults: ServiceDefaults) -> Self {
        Self {
            id: "kubernetes".into(),
            config,
            defaults,
        }
    }

    /// The client: the configured kubeconfig, else in-cluster, else
    /// `$KUBECONFIG` or `~/.kube/config`.
    async fn client(&self) -> Result<Client, String> {
        use kube::config::{Config, KubeConfigOptions, Kubeconfig};
        let options = KubeConfigOptions::default();
        let config = match &self.config.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
                Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
            }
            None => match Config::incluster() {
                Ok(c) => c,
                Err(_) => Config::from_kubeconfig(&options)
                    .await
                    .map_err(|e| format!("no in-cluster config and no kubeconfig: {e}"))?,
            },
        };
        Client::try_from(config).map_err(|e| format!("kubernetes client: {e}"))
    }

    /// Every watch, merged.
    fn watches(&self, client: &Client, store: &Store) -> BoxStream<'static, Tagged> {
        let mut streams: Vec<BoxStream<'static, Tagged>> = Vec::new();
        for (i, scope) in store.scopes().iter().enumerate() {
            let (services, slices): (Api<Service>, Api<EndpointSlice>) = match scope {
                Some(ns) => (
                    Api::namespaced(client.clone(), ns),
                    Api::namespaced(client.clone(), ns),
                ),
                None => (Api::all(client.clone()), Api::all(client.clone())),
            };
            let mut on_services = watcher::Config::default();
            if let Some(sel) = &self.config.label_selector {
                on_services = on_services.labels(sel);
            }
            streams.push(
                watcher(services, on_services)
                    .default_backoff()
                    .map(move |r| Tagged::service(i, r))
                    .boxed(),
            );
            streams.push(
                watcher(slices, watcher::Config::default())
                    .default_backoff()
                    .map(move |r| Tagged::slice(i, r))
                    .boxed(),
            );
        }
        futures_util::stream::select_all(streams).boxed()
    }

    async fn connect(&self, shutdown: &CancellationToken) -> Option<Client> {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        loop {
            match self.client().await {
                Ok(c) => return Some(c),
                Err(e) => {
                    count_error(&self.id);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "kubernetes: no client");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn run_loop(
        self,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        let Some(client) = self.connect(&shutdown).await else {
            return Ok(());
        };
        let mut store = Store::new(&self.config.namespaces, self.defaults.clone());
        let mut events = self.watches(&client, &store);
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let lost = store.reset_sent && !store.connected();
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                ev = events.next() => ev,
                // A watch resumed after an outage says nothing until
                // something changes: ask the API server whether it is back.
                _ = probe.tick(), if lost => {
                    if answers(&client, &store.scopes()[0]).await
                        && let Some(up) = store.reached()
                    {
                        tracing::info!("kubernetes API server: reached again");
                        super::send(&registry, &self.id, up).await?;
                    }
                    continue;
                }
            };
            let Some(ev) = ev else {
                return Err(SourceError::Failed("kubernetes watches ended".into()));
            };
            if let Some(e) = ev.error() {
                count_error(&self.id);
                tracing::warn!(error = %e,
                    "kubernetes API server: watch failed; serving the last known endpoints, retrying with backoff");
            }
            let was_synced = store.reset_sent;
            for update in store.apply(ev) {
                super::send(&registry, &self.id, update).await?;
            }
            if !was_synced && store.reset_sent {
                tracing::info!(services = store.sent().len(), "kubernetes: synced");
            }
        }
    }
}

impl Source for KubernetesSource {
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
mod mock_tests;
#[cfg(test)]
mod tests;
