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
//! - [`labels`]: the label-to-service mapping ([`member`], [`service_spec`]),
//!   pure, no engine needed;
//! - [`events`]: engine events and inspect results read into [`Container`];
//! - this file: the source loop (list, Reset, follow events, reconnect).

mod events;
mod labels;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, ListContainersOptions};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::{DockerTrust, ServiceDefaults};
use crate::model::{ServiceKey, ServiceSpec, SourceId};
use crate::registry::{self, Update};

use super::{Backoff, Source, SourceError, SourceFuture, count_error};

pub use events::*;
pub use labels::*;

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
    /// What labels may do (namespaces, listen and vip addresses).
    trust: DockerTrust,
    /// Containers already warned about an ignored label.
    warned: Mutex<HashSet<String>>,
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
            trust: DockerTrust::default(),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// What labels may do; the default allows the `default` namespace and
    /// no listen or vip address.
    pub fn with_trust(mut self, trust: DockerTrust) -> Self {
        self.trust = trust;
        self
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
        match member(c, self.network.as_deref(), &self.trust) {
            Ok(Some(mut m)) => {
                if !m.ignored.is_empty()
                    && self.warned.lock().is_ok_and(|mut w| w.insert(c.id.clone()))
                {
                    for why in &m.ignored {
                        tracing::warn!(container = %c.name, "{why}; labels are untrusted");
                    }
                }
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
        if let Ok(mut w) = self.warned.lock() {
            w.retain(|id| members.contains_key(id));
        }
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
        if let Ok(mut w) = self.warned.lock() {
            w.retain(|id| members.contains_key(id));
        }
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
            if !registry.source_lost(&self.id, &e.to_string()).await {
                return Err(SourceError::RegistryGone);
            }
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
