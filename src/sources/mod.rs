//! Sources say what exists. Each one sends `Update::Reset(all)` after every
//! (re)connect or full re-read and `Upsert`/`Remove` after that; whatever a
//! Reset does not list is gone. A source never touches DNS or the proxy.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::model::{ServiceSpec, SourceId};
use crate::registry::{self, Update};

pub mod docker;
pub mod etcd;
pub mod file;
mod file_watch;
pub mod kubernetes;

/// Why a source loop ended before shutdown. A source rides out a lost
/// upstream (engine, API server, etcd) by itself, with backoff; it ends only
/// when it cannot go on, and the app then exits (see `app`).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the registry stopped")]
    RegistryGone,
    #[error("{0}")]
    Failed(String),
}

/// What a source loop returns: `Ok(())` once shutdown was requested.
pub type SourceFuture = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// A watcher of endpoints. `run` loops until `shutdown`, reporting through
/// `registry`; it must send a `Reset` as its first sync.
pub trait Source: Send + 'static {
    fn id(&self) -> SourceId;
    fn run(
        self: Box<Self>,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> SourceFuture;
}

/// Sends one update of `source`, counted in `beacon_source_updates_total`.
pub async fn send(
    registry: &registry::Handle,
    source: &SourceId,
    update: Update,
) -> Result<(), SourceError> {
    count_update(source);
    if registry.source(source, update).await {
        Ok(())
    } else {
        Err(SourceError::RegistryGone)
    }
}

/// A fixed set of services (the `dev` demo, tests): one Reset, then it holds
/// them until shutdown.
pub struct StaticSource {
    pub id: SourceId,
    pub services: Vec<ServiceSpec>,
}

impl Source for StaticSource {
    fn id(&self) -> SourceId {
        self.id.clone()
    }

    fn run(
        self: Box<Self>,
        registry: registry::Handle,
        shutdown: CancellationToken,
    ) -> SourceFuture {
        Box::pin(async move {
            send(&registry, &self.id, Update::Reset(self.services)).await?;
            shutdown.cancelled().await;
            Ok(())
        })
    }
}

/// Reconnect delays: exponential from `base` to `max`, with ±20% jitter so
/// many beacons do not reconnect in lockstep. `reset` after a good sync.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = 0.8 + fastrand::f64() * 0.4;
        exp.mul_f64(jitter).min(self.max)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Creates a source's update and error series at zero, so that rates and
/// alerts see the source before its first error.
pub fn register_metrics(source: &SourceId) {
    metrics::counter!(crate::telemetry::SOURCE_UPDATES, "source" => source.to_string())
        .increment(0);
    metrics::counter!(crate::telemetry::SOURCE_ERRORS, "source" => source.to_string()).increment(0);
}

/// Counts one update or error of a source in the contract's metrics.
pub fn count_update(source: &SourceId) {
    metrics::counter!(crate::telemetry::SOURCE_UPDATES, "source" => source.to_string())
        .increment(1);
}

pub fn count_error(source: &SourceId) {
    metrics::counter!(crate::telemetry::SOURCE_ERRORS, "source" => source.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(last <= Duration::from_secs(5) && last >= Duration::from_secs(4));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
