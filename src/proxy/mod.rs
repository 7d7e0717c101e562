//! The L4 TCP proxy: listeners that follow the snapshot, balancing
//! policies, connect with retry, and a zero-copy byte path.
//!
//! ```text
//!  reader.changed() ─► reconcile ─► listener (vip:port / port.listen)
//!                          │            │ accept → conn::admit (ready? limits?)
//!                          │            ▼
//!                          └─► Route ─► balancer.pick → connect/retry ─► copy (splice)
//!                               (per service port, rebuilt when the service changes)
//! ```
//!
//! - `reconcile` (one task: the loop [`spawn`] returns) diffs the
//!   wanted listeners against the open ones, binds and closes, and swaps
//!   in a new route when a service changes. It owns its state outright;
//!   the live per-endpoint counts it hands to routes are `Arc`s of atomics.
//! - `listener` accepts (backing off on EMFILE and friends) and hands each
//!   connection to `conn`: admission, then pick, connect (timeout, retry
//!   on the next pick), optional PROXY protocol header, then
//!   [`copy::bidirectional`] until both sides close, the idle timeout, the
//!   endpoint's removal (`close_on_removal`), or the drain deadline. A
//!   reset on one side is passed on as a reset, and forced closes reset
//!   both sides: a cut stream never ends with a FIN.
//!
//! Imports point one way: `reconcile → listener → conn → route → balancer`,
//! with `shared`, `error` and `copy` as leaves. This file is the facade:
//! no child imports from it.

mod access_log;
pub mod balancer;
mod conn;
pub mod copy;
mod error;
mod listener;
mod reconcile;
mod route;
mod shared;
mod udp;
mod vips;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{AccessLogTarget, ProxyConfig, SpliceMode};
use crate::model::{ConnectOutcome, ProxyLive};
use crate::registry::Reader;
use access_log::AccessLog;
use reconcile::Reconciler;
use shared::Shared;

pub use error::ProxyError;

/// After the drain deadline, how long closed connections may take to end.
const KILL_WAIT: Duration = Duration::from_secs(5);

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
    stop: CancellationToken,
    /// Cancelled once the reconcile loop is gone and its listeners closed.
    done: CancellationToken,
}

/// Builds the proxy: its handle and its reconcile loop, which opens and
/// closes listeners as the snapshot changes. The caller runs the loop
/// (`tokio::spawn`, a `JoinSet`): it returns Ok once `shutdown` is
/// cancelled or [`Proxy::drain`] called, and [`ProxyError::RegistryClosed`]
/// if the registry ends first; a panic in it is the task's panic. Connect
/// attempts are reported on `outcomes` (never blocking: dropped when the
/// channel is full). Call after the metrics recorder is installed: metric
/// handles are resolved here and when a service gets its first route.
pub fn spawn(
    cfg: &ProxyConfig,
    reader: Reader,
    outcomes: mpsc::Sender<ConnectOutcome>,
    shutdown: CancellationToken,
) -> (
    Proxy,
    impl Future<Output = Result<(), ProxyError>> + Send + 'static,
) {
    let copy_mode = match cfg.splice {
        SpliceMode::Auto => copy::Mode::Auto,
        SpliceMode::Always => copy::Mode::Splice,
        SpliceMode::Never => copy::Mode::Userspace,
    };
    spawn_with(cfg, reader, outcomes, shutdown, Options { copy_mode })
}

/// [`spawn`] with [`Options`].
pub fn spawn_with(
    cfg: &ProxyConfig,
    reader: Reader,
    outcomes: mpsc::Sender<ConnectOutcome>,
    shutdown: CancellationToken,
    opts: Options,
) -> (
    Proxy,
    impl Future<Output = Result<(), ProxyError>> + Send + 'static,
) {
    let mut shared = Shared::new(cfg.max_connections, outcomes, opts.copy_mode);
    let mut start_error = None;
    if let Some(target) = cfg.access_log.as_ref().filter(|_| cfg.enabled) {
        match AccessLog::start(target, crate::telemetry::log_format()) {
            Ok(log) => shared.access_log = Some(log),
            Err(source) => {
                start_error = Some(ProxyError::AccessLog {
                    target: match target {
                        AccessLogTarget::Stderr => "stderr".into(),
                        AccessLogTarget::File(path) => path.display().to_string(),
                    },
                    source,
                })
            }
        }
    }
    shared.vip_interface = cfg.vip_interface.clone();
    shared.udp_max_flows = cfg.udp_max_flows;
    let shared = Arc::new(shared);
    let stop = shutdown.child_token();
    let done = CancellationToken::new();
    let reconciler = cfg
        .enabled
        .then(|| Reconciler::new(shared.clone(), stop.clone(), done.clone()));
    if reconciler.is_none() {
        tracing::debug!("proxy disabled");
        done.cancel();
    }
    let task = {
        let stop = stop.clone();
        async move {
            if let Some(e) = start_error {
                return Err(e);
            }
            match reconciler {
                Some(r) => r.run(reader).await,
                None => {
                    stop.cancelled().await;
                    Ok(())
                }
            }
        }
    };
    (Proxy { shared, stop, done }, task)
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

    /// The slow-start shares of ramping endpoints (for the admin API).
    pub fn live(&self) -> Arc<ProxyLive> {
        self.shared.live.clone()
    }

    /// Connections being connected or proxied right now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Closes the listeners (at once, also if shutdown is not cancelled
    /// yet), gives live connections `grace` to finish, then closes them.
    /// Works wherever the reconcile loop runs; it waits for that loop to
    /// end, so the loop must be running (or dropped).
    pub async fn drain(&self, grace: Duration) {
        self.stop.cancel();
        self.done.cancelled().await;
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
