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
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::EtcdConfig;
use crate::model::Snapshot;
use crate::registry::Reader;

use super::client::{call, connect};
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
            match self.session(&mut backoff).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, node = %self.config.node, "etcd: publishing interrupted; granting a new lease");
                    count_error(&"etcd".into());
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One lease: grant, put everything, follow changes; `Ok` at shutdown.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), SessionError> {
        let mut client = connect(&self.config).await?;
        let ttl = self.config.lease_ttl.as_secs().max(2) as i64;
        let lease = call(client.lease_grant(ttl, None)).await?.id();
        let (mut keeper, mut acks) = call(client.lease_keep_alive(lease)).await?;
        // Keys of an earlier run of this node (another lease): deleted
        // unless wanted again.
        let prefix = keys::node_prefix(&self.config.prefix, &self.config.node);
        let old = call(client.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ))
        .await?;
        let mut stale: HashSet<String> = old
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok().map(String::from))
            .collect();
        let mut current = Kv::new();
        let mut tick = tokio::time::interval(self.config.lease_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let desired = self.desired(&self.reader.current());
            reconcile(&mut client, lease, &mut current, &mut stale, desired).await?;
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
                _ = tick.tick() => call(keeper.keep_alive()).await?,
                ack = acks.message() => {
                    match ack? {
                        Some(a) if a.ttl() > 0 => {}
                        _ => return Err(SessionError::LeaseLost),
                    }
                }
            }
        }
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
    for chunk in ops.chunks(TXN_OPS) {
        call(client.txn(Txn::new().and_then(chunk.to_vec()))).await?;
    }
    *current = desired;
    stale.clear();
    Ok(())
}
