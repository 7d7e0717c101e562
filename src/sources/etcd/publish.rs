//! The publisher: this node's local services in etcd, under one lease.
//!
//! Desired: what the local sources named in `publish` say, each endpoint's
//! `ready` being this node's own verdict (source ready, probe, ejection).
//! Current: the keys this node put. Reconciled by diff in transactions;
//! keepalives at a third of the TTL. A lost lease (etcd gone longer than the
//! TTL) is granted anew and everything is put again. On shutdown the
//! endpoints are marked not ready, then the lease is revoked: they leave
//! every node at once, not after the TTL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions, Txn, TxnOp};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::EtcdConfig;
use crate::model::Snapshot;
use crate::registry::Reader;

use super::client::{Members, call, describe};
use super::keys::{self, EndpointValue, SpecValue};
use super::merge::Local;
use crate::sources::{Backoff, SourceError, count_error};

/// etcd's default cap on operations in one transaction.
const TXN_OPS: usize = 128;
/// Between "not ready" and the revoke on shutdown: the other nodes stop
/// sending new connections here before the keys vanish.
const DRAIN: Duration = Duration::from_millis(200);
/// The whole graceful leave at most.
const LEAVE_MAX: Duration = Duration::from_secs(2);

pub(super) struct Publisher {
    config: EtcdConfig,
    local: watch::Receiver<Arc<Local>>,
    reader: Reader,
    shutdown: CancellationToken,
    members: Members,
    /// The lease of the last session: kept by the next one while it lives
    /// (a member or a stream failed, not the lease).
    lease: Option<i64>,
}

/// Keys → values this node wants in etcd.
type Kv = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    #[error("the lease expired (etcd unreachable longer than lease_ttl)")]
    LeaseLost,
}

impl Publisher {
    pub(super) fn new(
        config: EtcdConfig,
        local: watch::Receiver<Arc<Local>>,
        reader: Reader,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            config,
            local,
            reader,
            shutdown,
            members: Members::new("publisher"),
            lease: None,
        }
    }

    pub(super) async fn run(mut self) -> Result<(), SourceError> {
        if self.config.publish.is_empty() {
            // Watch only.
            self.shutdown.cancelled().await;
            return Ok(());
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let started = tokio::time::Instant::now();
            match self.session(&mut backoff).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if matches!(e, SessionError::LeaseLost) {
                        self.lease = None;
                    }
                    let error = match &e {
                        SessionError::Etcd(e) => describe(e),
                        SessionError::LeaseLost => e.to_string(),
                    };
                    tracing::warn!(%error, node = %self.config.node, "etcd: publishing interrupted; connecting again");
                    count_error(&"etcd".into());
                }
            }
            // A session that had run a while (its member or stream failed)
            // goes on at once on the next member; a failing one backs off.
            let delay = if started.elapsed() >= Duration::from_secs(1) {
                backoff.reset();
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One lease (the last one while it lives, else a new one), on one
    /// member: put what differs, follow changes; `Ok` at shutdown.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), SessionError> {
        let mut client = self.members.connect(&self.config).await?;
        let lease = self.lease(&mut client).await?;
        let (keeper, acks) = call(client.lease_keep_alive(lease)).await?;
        // In a task of its own: a long reconcile (10k keys are 80 commits)
        // must not starve the lease (it had outlasted a 10 s TTL under load,
        // and every expiry took this node's endpoints from every node).
        // Aborted when the session ends, however it ends.
        let mut keepalive = AbortOnDropHandle::new(tokio::spawn(keep_alive(
            keeper,
            acks,
            self.config.lease_ttl / 3,
        )));
        // What etcd holds of this node: under this lease it is current;
        // any other (an earlier run's lease) is stale, deleted unless
        // wanted again.
        let prefix = keys::node_prefix(&self.config.prefix, &self.config.node);
        let old = call(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let mut current = Kv::new();
        let mut stale = HashSet::new();
        for kv in old.kvs() {
            let (Ok(k), Ok(v)) = (kv.key_str(), kv.value_str()) else {
                continue;
            };
            if kv.lease() == lease {
                current.insert(k.to_string(), v.to_string());
            } else {
                stale.insert(k.to_string());
            }
        }
        loop {
            let desired = self.desired(&self.reader.current());
            tokio::select! {
                r = reconcile(&mut client, lease, &mut current, &mut stale, desired) => r?,
                e = &mut keepalive => return Err(ended(e)),
            }
            backoff.reset();
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    // Bounded: an unreachable etcd must not eat the
                    // shutdown grace (the keys then leave after the TTL).
                    let leave = self.leave(&mut client, lease, &current);
                    if tokio::time::timeout(LEAVE_MAX, leave).await.is_err() {
                        tracing::warn!("etcd: could not leave in time; the keys leave after lease_ttl");
                    }
                    return Ok(());
                }
                r = self.local.changed() => {
                    if r.is_err() {
                        self.shutdown.cancelled().await;
                    }
                }
                r = self.reader.changed() => {
                    if r.is_none() {
                        self.shutdown.cancelled().await;
                    }
                }
                e = &mut keepalive => return Err(ended(e)),
            }
        }
    }

    /// The last session's lease while etcd still holds it, else a new one.
    async fn lease(&mut self, client: &mut Client) -> Result<i64, SessionError> {
        if let Some(id) = self.lease {
            let ttl = call(client.lease_time_to_live(id, None)).await?.ttl();
            if ttl > 0 {
                return Ok(id);
            }
            tracing::warn!(node = %self.config.node, "etcd: the lease expired; granting a new one");
        }
        let ttl = self.config.lease_ttl.as_secs().max(2) as i64;
        let id = call(client.lease_grant(ttl, None)).await?.id();
        self.lease = Some(id);
        Ok(id)
    }

    /// Every key this node wants, from the local specs and the verdicts in
    /// `snap`.
    fn desired(&self, snap: &Snapshot) -> Kv {
        let (prefix, node) = (&self.config.prefix, &*self.config.node);
        let local = self.local.borrow();
        let mut out = Kv::new();
        for (key, spec) in local.iter() {
            let value = serde_json::to_string(&SpecValue::of(spec)).unwrap_or_default();
            out.insert(keys::service_key(prefix, node, key), value);
            let served: HashMap<IpAddr, bool> = snap
                .service(key)
                .map(|s| {
                    s.endpoints
                        .iter()
                        .filter(|e| e.endpoint.via.is_none())
                        .map(|e| (e.endpoint.ip, e.healthy))
                        .collect()
                })
                .unwrap_or_default();
            for e in &spec.endpoints {
                let serving = served.get(&e.ip).copied().unwrap_or(true);
                let value = EndpointValue::of(e, spec, serving);
                out.insert(
                    keys::endpoint_key(prefix, node, key, e.ip),
                    serde_json::to_string(&value).unwrap_or_default(),
                );
            }
        }
        out
    }

    /// Graceful leave: not ready everywhere, a short drain, then the lease
    /// revoked (every key gone in one revision). Errors only logged.
    async fn leave(&self, client: &mut Client, lease: i64, current: &Kv) {
        let mut not_ready = current.clone();
        for (k, v) in not_ready.iter_mut() {
            if let Ok(mut e) = serde_json::from_str::<EndpointValue>(v)
                && k.contains("/endpoints/")
            {
                e.ready = false;
                *v = serde_json::to_string(&e).unwrap_or_default();
            }
        }
        let mut now = current.clone();
        let mut none = HashSet::new();
        if reconcile(client, lease, &mut now, &mut none, not_ready)
            .await
            .is_ok()
        {
            tokio::time::sleep(DRAIN).await;
        }
        match call(client.lease_revoke(lease)).await {
            Ok(_) => {
                tracing::info!(node = %self.config.node, "etcd: left the cluster (lease revoked)")
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd: could not revoke the lease; the keys leave after lease_ttl")
            }
        }
    }
}

/// Why the keepalive task ended (it never ends well).
fn ended(r: Result<SessionError, tokio::task::JoinError>) -> SessionError {
    r.unwrap_or_else(|e| {
        SessionError::Etcd(etcd_client::Error::EndpointError(format!(
            "lease keepalive task: {e}"
        )))
    })
}

/// Keeps `lease` alive every `every` until the stream fails (the member:
/// the lease lives on, the next session keeps it) or etcd says the lease
/// is gone.
async fn keep_alive(
    mut keeper: etcd_client::LeaseKeeper,
    mut acks: etcd_client::LeaseKeepAliveStream,
    every: Duration,
) -> SessionError {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = call(keeper.keep_alive()).await {
                    return e.into();
                }
            }
            ack = acks.message() => match ack {
                Ok(Some(a)) if a.ttl() > 0 => {}
                Ok(_) => return SessionError::LeaseLost,
                Err(e) => return e.into(),
            },
        }
    }
}

/// Transactions in flight at once when many keys change: etcd commits
/// concurrent proposals together (one fsync for several).
const TXN_PARALLEL: usize = 8;

/// Puts what changed and deletes what is no longer wanted (and the stale
/// keys of an earlier run), in transactions of at most [`TXN_OPS`].
async fn reconcile(
    client: &mut Client,
    lease: i64,
    current: &mut Kv,
    stale: &mut HashSet<String>,
    desired: Kv,
) -> Result<(), etcd_client::Error> {
    let mut ops = Vec::new();
    for (k, v) in &desired {
        if current.get(k) != Some(v) {
            ops.push(TxnOp::put(
                k.as_str(),
                v.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
    }
    let gone = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .chain(stale.iter().filter(|k| !desired.contains_key(*k)));
    let gone: HashSet<&String> = gone.collect();
    for k in gone {
        ops.push(TxnOp::delete(k.as_str(), None));
    }
    // Collected first: futures that own what they use (a lazy map over
    // the chunks would not be `Send` for every lifetime).
    let txns: Vec<_> = ops
        .chunks(TXN_OPS)
        .map(|chunk| {
            let mut client = client.clone();
            let txn = Txn::new().and_then(chunk.to_vec());
            async move { call(client.txn(txn)).await.map(drop) }
        })
        .collect();
    let mut txns = futures_util::stream::iter(txns).buffer_unordered(TXN_PARALLEL);
    while let Some(r) = txns.next().await {
        r?;
    }
    *current = desired;
    stale.clear();
    Ok(())
}
