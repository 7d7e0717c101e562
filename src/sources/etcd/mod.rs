//! The `etcd` source: beacon nodes share their endpoints through etcd.
//!
//! Two loops in one source:
//! - the **watcher** (here): list the prefix → `Reset` at revision R, then
//!   watch from R+1 (prefix, progress notify, leader required) →
//!   `Upsert`/`Remove`. A lost connection resumes from the last revision
//!   seen; a watch cancelled by compaction re-lists and `Reset`s. While etcd
//!   is lost, the last known state stays served (`Update::Connected(false)`,
//!   `beacon_source_connected` 0).
//! - the **publisher** ([`publish`]): this node's local services under one
//!   lease.
//!
//! Both read the local sources named in `publish` through a tap on their
//! registry handle ([`crate::registry::Handle::tapped`]); the watcher serves
//! every service merged ([`merge`]), so a local change is served at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchResponse, WatchStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{EtcdConfig, ServiceDefaults};
use crate::model::{ServiceKey, SourceId};
use crate::registry::{self, Reader, Update};

use super::{Backoff, Source, SourceError, SourceFuture, count_error, send};

mod client;
pub mod keys;
pub mod merge;
mod publish;

use client::{Members, call, describe};
use merge::{Cluster, Local};

/// The etcd source; see the module doc.
pub struct EtcdSource {
    config: EtcdConfig,
    defaults: ServiceDefaults,
    /// Copies of the updates of the local sources it publishes.
    tap: mpsc::UnboundedReceiver<(SourceId, Update)>,
    reader: Reader,
}

impl EtcdSource {
    pub fn new(
        config: EtcdConfig,
        defaults: ServiceDefaults,
        tap: mpsc::UnboundedReceiver<(SourceId, Update)>,
        reader: Reader,
    ) -> Self {
        Self {
            config,
            defaults,
            tap,
            reader,
        }
    }
}

impl Source for EtcdSource {
    fn id(&self) -> SourceId {
        "etcd".into()
    }

    fn run(
        self: Box<Self>,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> SourceFuture {
        Box::pin(async move {
            let (local_tx, local_rx) = watch::channel(std::sync::Arc::new(Local::new()));
            let publisher = publish::Publisher::new(
                self.config.clone(),
                local_rx,
                self.reader.clone(),
                shutdown.clone(),
            );
            let watcher = Watcher {
                id: self.id(),
                config: self.config,
                defaults: self.defaults,
                registry,
                cluster: Cluster::default(),
                sources: BTreeMap::new(),
                local_tx,
                served: BTreeSet::new(),
                listed: false,
                conflicts: BTreeMap::new(),
                conflicts_moved: false,
                members: Members::new("watcher"),
            };
            let (w, p) = tokio::join!(watcher.run(self.tap, shutdown.clone()), publisher.run());
            w.and(p)
        })
    }
}

/// Sets `beacon_source_connected{source}`.
fn connected_gauge(id: &SourceId, up: bool) {
    metrics::gauge!(crate::telemetry::SOURCE_CONNECTED, "source" => id.to_string()).set(if up {
        1.0
    } else {
        0.0
    });
}

struct Watcher {
    id: SourceId,
    config: EtcdConfig,
    defaults: ServiceDefaults,
    registry: registry::Handle,
    cluster: Cluster,
    /// What each tapped local source says.
    sources: BTreeMap<SourceId, Local>,
    local_tx: watch::Sender<std::sync::Arc<Local>>,
    /// Services this source names in the registry now.
    served: BTreeSet<ServiceKey>,
    /// A full list was sent (the first Reset); local changes go out after.
    listed: bool,
    /// Services whose nodes publish different specs: the losing nodes.
    conflicts: BTreeMap<ServiceKey, Vec<std::sync::Arc<str>>>,
    conflicts_moved: bool,
    members: Members,
}

/// Where the watch stands.
enum Conn {
    /// Next attempt at this instant.
    Down { at: tokio::time::Instant },
    /// The client is kept with its stream (its channel lives with it).
    Up {
        _client: Box<Client>,
        stream: Box<WatchStream>,
        since: tokio::time::Instant,
    },
}

/// A watch that lived this long before it broke is resumed at once (on the
/// next member): a lost member is no outage. One that broke sooner backs
/// off.
const STABLE: Duration = Duration::from_secs(1);

enum Step {
    Retry,
    Message(Result<Option<WatchResponse>, etcd_client::Error>),
}

impl Watcher {
    async fn run(
        mut self,
        mut tap: mpsc::UnboundedReceiver<(SourceId, Update)>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        connected_gauge(&self.id, false);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut conn = Conn::Down {
            at: tokio::time::Instant::now(),
        };
        // The revision seen last; `None`: list first.
        let mut revision: Option<i64> = None;
        let mut was_up = false;
        // Closed when no local source is published (watch only).
        let mut tapping = true;
        loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                t = tap.recv(), if tapping => {
                    match t {
                        Some((source, update)) => self.local(source, update).await?,
                        None => tapping = false,
                    }
                    continue;
                }
                s = next(&mut conn) => s,
            };
            match step {
                Step::Retry => match self.resume(&mut revision).await {
                    Ok((client, stream)) => {
                        backoff.reset();
                        if !was_up {
                            self.set_connected(true).await?;
                            was_up = true;
                        }
                        conn = Conn::Up {
                            _client: Box::new(client),
                            stream: Box::new(stream),
                            since: tokio::time::Instant::now(),
                        };
                    }
                    Err(e) => {
                        tracing::warn!(error = %describe(&e), "etcd: cannot watch; serving what is known");
                        count_error(&self.id);
                        if was_up {
                            self.set_connected(false).await?;
                            was_up = false;
                        }
                        conn = down(&mut backoff);
                    }
                },
                Step::Message(Ok(Some(resp))) => {
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            tracing::warn!(
                                compacted = resp.compact_revision(),
                                "etcd: the watched revision was compacted; listing again"
                            );
                            revision = None;
                        } else {
                            tracing::warn!(reason = resp.cancel_reason(), "etcd: watch cancelled");
                        }
                        conn = again(&conn, &mut backoff);
                        continue;
                    }
                    self.events(&resp, &mut revision).await?;
                }
                Step::Message(r) => {
                    // Still "connected": the state stays served while the
                    // watch resumes on another member; only a failed
                    // resume says etcd is lost.
                    let error = r.err().map_or("the stream ended".into(), |e| describe(&e));
                    tracing::warn!(%error, "etcd: watch lost; resuming");
                    count_error(&self.id);
                    conn = again(&conn, &mut backoff);
                }
            }
        }
    }

    async fn set_connected(&mut self, up: bool) -> Result<(), SourceError> {
        connected_gauge(&self.id, up);
        send(&self.registry, &self.id, Update::Connected(up)).await
    }

    /// Connects, lists when `revision` is unknown, and watches from the
    /// revision after it.
    async fn resume(
        &mut self,
        revision: &mut Option<i64>,
    ) -> Result<(Client, WatchStream), etcd_client::Error> {
        let mut client = self.members.connect(&self.config).await?;
        let prefix = keys::nodes_prefix(&self.config.prefix);
        let from = match *revision {
            Some(r) => r,
            None => {
                let (kvs, r) = list(&mut client, &prefix).await?;
                self.reset(&kvs)
                    .await
                    .map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?;
                *revision = Some(r);
                r
            }
        };
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from + 1)
            .with_progress_notify();
        let stream = call(client.watch(prefix.as_str(), Some(options))).await?;
        Ok((client, stream))
    }

    /// A full list: the cluster anew, and one `Reset` of every service.
    async fn reset(&mut self, kvs: &[etcd_client::KeyValue]) -> Result<(), SourceError> {
        self.cluster = Cluster::default();
        for kv in kvs {
            self.put(kv.key(), kv.value());
        }
        let keys: BTreeSet<ServiceKey> = self.keys();
        let specs = keys
            .iter()
            .filter_map(|k| self.merged(k))
            .collect::<Vec<_>>();
        self.served = specs.iter().map(|s| s.key.clone()).collect();
        tracing::info!(
            services = specs.len(),
            endpoints = self.cluster.endpoint_count(),
            "etcd: listed"
        );
        self.listed = true;
        send(&self.registry, &self.id, Update::Reset(specs)).await
    }

    /// Every service known locally or in the cluster.
    fn keys(&self) -> BTreeSet<ServiceKey> {
        let local = self.local_tx.borrow().keys().cloned().collect::<Vec<_>>();
        self.cluster.services().cloned().chain(local).collect()
    }

    /// The service as served, recording the nodes whose spec lost.
    fn merged(&mut self, key: &ServiceKey) -> Option<crate::model::ServiceSpec> {
        let local = self.local_tx.borrow();
        let merged = merge::merged(
            key,
            &self.cluster,
            &local,
            &self.config.node,
            &self.defaults,
        );
        drop(local);
        let (spec, losers) = match merged {
            Some((spec, losers)) => (Some(spec), losers),
            None => (None, Vec::new()),
        };
        let before = self.conflicts.get(key).cloned().unwrap_or_default();
        if before != losers {
            if !losers.is_empty() {
                tracing::warn!(service = %key, ?losers, "nodes publish different specs for one service; the lowest node name wins");
                self.conflicts.insert(key.clone(), losers);
            } else {
                self.conflicts.remove(key);
            }
            self.conflicts_moved = true;
        }
        spec
    }

    /// Sends the spec conflicts when they moved.
    async fn send_conflicts(&mut self) -> Result<(), SourceError> {
        if !std::mem::take(&mut self.conflicts_moved) {
            return Ok(());
        }
        let local = self.local_tx.borrow().clone();
        let winners = self
            .conflicts
            .keys()
            .filter_map(|k| {
                merge::winner(k, &self.cluster, &local, &self.config.node).map(|w| (k.clone(), w))
            })
            .collect();
        let list = merge::conflicts(&self.conflicts, winners);
        send(&self.registry, &self.id, Update::Conflicts(list)).await
    }

    /// Records one key; the service it touched, if it is another node's.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Option<ServiceKey> {
        let k = keys::parse(&self.config.prefix, key)?;
        if **k.node() == *self.config.node {
            return None;
        }
        let (service, result) = self.cluster.put(k, value);
        if let Err(e) = result {
            tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "etcd: ignored a value that does not parse");
        }
        Some(service)
    }

    async fn events(
        &mut self,
        resp: &WatchResponse,
        revision: &mut Option<i64>,
    ) -> Result<(), SourceError> {
        let mut touched = BTreeSet::new();
        let mut last = revision.unwrap_or(0);
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(kv.mod_revision());
            let service = match event.event_type() {
                EventType::Put => self.put(kv.key(), kv.value()),
                EventType::Delete => keys::parse(&self.config.prefix, kv.key())
                    .filter(|k| **k.node() != *self.config.node)
                    .map(|k| self.cluster.delete(k)),
            };
            touched.extend(service);
        }
        if resp.events().is_empty() && !resp.created() {
            // A progress notification: every event up to here was sent.
            last = last.max(resp.header().map_or(0, |h| h.revision()));
        }
        *revision = Some(last);
        self.send_touched(touched).await
    }

    /// Upserts or removes each of `touched` as merged now.
    async fn send_touched(&mut self, touched: BTreeSet<ServiceKey>) -> Result<(), SourceError> {
        if !self.listed {
            return Ok(());
        }
        for key in touched {
            match self.merged(&key) {
                Some(spec) => {
                    self.served.insert(key);
                    send(&self.registry, &self.id, Update::Upsert(Box::new(spec))).await?;
                }
                None => {
                    if self.served.remove(&key) {
                        send(&self.registry, &self.id, Update::Remove(key)).await?;
                    }
                }
            }
        }
        self.send_conflicts().await
    }

    /// A tapped update of a local source: the local view, the publisher's
    /// input, and the merged services it touched.
    async fn local(&mut self, source: SourceId, update: Update) -> Result<(), SourceError> {
        let specs = self.sources.entry(source).or_default();
        let mut touched: BTreeSet<ServiceKey> = BTreeSet::new();
        match update {
            Update::Reset(all) => {
                touched.extend(specs.keys().cloned());
                specs.clear();
                for s in all {
                    touched.insert(s.key.clone());
                    specs.insert(s.key.clone(), s.into());
                }
            }
            Update::Upsert(s) => {
                touched.insert(s.key.clone());
                specs.insert(s.key.clone(), std::sync::Arc::new(*s));
            }
            Update::Remove(k) => {
                specs.remove(&k);
                touched.insert(k);
            }
            Update::Connected(_) | Update::Conflicts(_) => return Ok(()),
        }
        // Two published sources naming one service: the first by id gives it.
        let mut local = Local::new();
        for specs in self.sources.values() {
            for (k, s) in specs {
                local.entry(k.clone()).or_insert_with(|| s.clone());
            }
        }
        self.local_tx.send_replace(std::sync::Arc::new(local));
        self.send_touched(touched).await
    }
}

/// After a watch that broke: at once if it was [`STABLE`], else backed off.
fn again(conn: &Conn, backoff: &mut Backoff) -> Conn {
    match conn {
        Conn::Up { since, .. } if since.elapsed() >= STABLE => Conn::Down {
            at: tokio::time::Instant::now(),
        },
        _ => down(backoff),
    }
}

fn down(backoff: &mut Backoff) -> Conn {
    Conn::Down {
        at: tokio::time::Instant::now() + backoff.next_delay(),
    }
}

async fn next(conn: &mut Conn) -> Step {
    match conn {
        Conn::Down { at } => {
            tokio::time::sleep_until(*at).await;
            Step::Retry
        }
        Conn::Up { stream, .. } => Step::Message(stream.message().await),
    }
}

/// Keys in the first page of a list; later pages are sized by what the
/// keys weigh ([`next_page`]).
const LIST_PAGE: i64 = 2_000;
/// Bounds of a page's key count.
const PAGE_MIN: i64 = 100;
const PAGE_MAX: i64 = 50_000;
/// The bytes a page aims at: below gRPC's 4 MiB message limit on the
/// client (10 nodes x 10k endpoints made 14 MB in one answer).
const PAGE_BYTES: usize = 2 << 20;

/// The key count of the next page: [`PAGE_BYTES`] over the largest
/// key-value of the last page (a page that turns out too large is asked
/// again at half the count). Fewer pages matter: etcd 3.4 counts every key
/// from a page's start to the end of the range for each page, so paging
/// costs O(keys² / page); 110k keys in pages of 2,000 took 2 s on a
/// loaded 3-member cluster.
fn next_page(largest: usize) -> i64 {
    let n = PAGE_BYTES / largest.max(1);
    (n as i64).clamp(PAGE_MIN, PAGE_MAX)
}

/// The answer was over the client's message limit.
fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.message().contains("message length too large"))
}

/// Every key under `prefix`, read in pages at one revision (the first
/// page's): the same consistent view as a single read, in answers of a
/// bounded size. The first page is a linearizable read; the rest are
/// serializable reads at its revision on the same member (one client is
/// one member, which has applied that revision since it answered the
/// first). A page over the message limit is asked again at half the
/// size. Returns the keys and that revision.
async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<(Vec<etcd_client::KeyValue>, i64), etcd_client::Error> {
    let end = keys::prefix_end(prefix.as_bytes());
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut limit = LIST_PAGE;
    let mut kvs = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
        if revision > 0 {
            options = options.with_revision(revision).with_serializable();
        }
        let mut resp = match call(client.get(start.clone(), Some(options))).await {
            Ok(r) => r,
            Err(e) if too_large(&e) && limit > 1 => {
                limit = (limit / 2).max(1);
                tracing::debug!(
                    limit,
                    "etcd: a list page was too large; asking for fewer keys"
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let page = resp.take_kvs();
        let largest = page
            .iter()
            .map(|kv| kv.key().len() + kv.value().len() + 32)
            .max();
        limit = next_page(largest.unwrap_or(0));
        match page.last() {
            Some(last) if more => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => {
                kvs.extend(page);
                return Ok((kvs, revision));
            }
        }
        kvs.extend(page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_sized_by_what_the_keys_weigh() {
        // ~150-byte endpoints: pages of ~14k keys, 8 for 110k keys.
        assert_eq!(next_page(150), 13_981);
        assert_eq!(next_page(0), PAGE_MAX);
        assert_eq!(next_page(1 << 20), PAGE_MIN);
        assert!(next_page(150) * 150 <= PAGE_BYTES as i64);
    }
}
