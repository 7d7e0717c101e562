//! What the reconcile loop, the accept loops, the connection tasks and the
//! [`Proxy`](super::Proxy) handle share: flags, global counts and the
//! drain signals. A leaf: it uses nothing of the proxy but `copy::Mode`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};

use dashmap::DashMap;
use metrics::Histogram;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::copy;
use crate::model::ConnectOutcome;

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
        }
    }
}
