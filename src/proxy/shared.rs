//! What the reconcile loop, the accept loops, the connection tasks and the
//! [`Proxy`](super::Proxy) handle share: flags, global counts and the
//! drain signals, and the burst state of local connect errors. A leaf: it
//! uses nothing of the proxy but `copy::Mode` and the access log.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use metrics::Histogram;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access_log::AccessLog;
use super::copy;
use crate::model::{ConnectOutcome, ProxyLive};

pub(super) struct Shared {
    /// The snapshot in force is ready (admission refuses until then).
    pub(super) ready: AtomicBool,
    /// Version of the last snapshot the reconcile loop applied.
    pub(super) applied: AtomicU64,
    /// Admitted connections across every service.
    pub(super) active: AtomicUsize,
    pub(super) max_connections: usize,
    /// Configured listen address → the address actually bound. Written by
    /// the reconcile loop, read through `Proxy::bound_addr` by other tasks.
    pub(super) bound: DashMap<SocketAddr, SocketAddr>,
    pub(super) outcomes: mpsc::Sender<ConnectOutcome>,
    /// Cancelled when the drain grace has passed: live connections close.
    pub(super) kill: CancellationToken,
    /// Every accept loop and connection task.
    pub(super) tracker: TaskTracker,
    pub(super) copy_mode: copy::Mode,
    pub(super) connect_duration: Histogram,
    pub(super) local_errors: LocalErrors,
    /// One line per finished connection, when `[proxy] access_log` is set.
    pub(super) access_log: Option<AccessLog>,
    /// Slow-start shares and per-endpoint loads, for the admin API.
    pub(super) live: Arc<ProxyLive>,
    /// `[proxy] vip_interface`.
    pub(super) vip_interface: Option<String>,
    /// `[proxy] udp_max_flows` (per UDP listener).
    pub(super) udp_max_flows: usize,
}

/// At most one warning per this long about connects that could not start.
const LOCAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// Connects that could not start for want of local resources (descriptors,
/// ports, memory): not the endpoints' fault, so never reported to health;
/// logged once per burst (and at most once per [`LOCAL_WARN_EVERY`]).
pub(super) struct LocalErrors {
    epoch: Instant,
    /// A burst is going on.
    active: AtomicBool,
    /// The current burst was logged.
    warned: AtomicBool,
    /// When the last warning was logged, in ms since `epoch` (+1; 0: never).
    last_warn: AtomicU64,
}

impl Default for LocalErrors {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            active: AtomicBool::new(false),
            warned: AtomicBool::new(false),
            last_warn: AtomicU64::new(0),
        }
    }
}

impl LocalErrors {
    pub(super) fn failed(&self, error: &io::Error) {
        if self.active.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_warn.load(Ordering::Relaxed);
        if last == 0 || now - last >= LOCAL_WARN_EVERY.as_millis() as u64 {
            self.last_warn.store(now, Ordering::Relaxed);
            self.warned.store(true, Ordering::Relaxed);
            tracing::warn!(%error,
                "out of local resources: proxy connects cannot start (not held against the endpoints)");
        }
    }

    /// A connect started: the burst, if any, is over.
    pub(super) fn ended(&self) {
        if self.active.load(Ordering::Relaxed)
            && self.active.swap(false, Ordering::AcqRel)
            && self.warned.swap(false, Ordering::Relaxed)
        {
            tracing::info!("proxy connects start again");
        }
    }
}

impl Shared {
    /// Resolves the metric handles: call after the recorder is installed.
    pub(super) fn new(
        max_connections: usize,
        outcomes: mpsc::Sender<ConnectOutcome>,
        copy_mode: copy::Mode,
    ) -> Self {
        Self {
            ready: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            max_connections,
            bound: DashMap::new(),
            outcomes,
            kill: CancellationToken::new(),
            tracker: TaskTracker::new(),
            copy_mode,
            connect_duration: metrics::histogram!(crate::telemetry::PROXY_CONNECT_DURATION),
            local_errors: LocalErrors::default(),
            access_log: None,
            live: Arc::default(),
            vip_interface: None,
            udp_max_flows: 65_536,
        }
    }
}
