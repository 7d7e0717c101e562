//! What a listener routes to, and the live per-service and per-endpoint
//! entries that routes and connections share.
//!
//! The reconcile loop owns the maps that hold these entries and rebuilds a
//! [`Route`] when its service changes; the entries are `Arc`s handed to
//! every route of their service, so live counts (and the removal signal)
//! survive rebuilds while connections read them lock-free.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::balancer::{self, Backend, Balancer, EndpointLoad};
use crate::model::{ProxyLive, ServiceKey, ServiceState};

/// Live counts of one endpoint and the signal that closes its connections
/// when it leaves a `close_on_removal` service, or at the drain deadline:
/// its token is a child of the proxy's kill token, so a connection waits
/// on one token for both (one waiter less in every idle connection).
#[derive(Debug)]
pub(super) struct EndpointEntry {
    pub(super) load: Arc<EndpointLoad>,
    removal: Mutex<CancellationToken>,
    /// The proxy's kill token, the parent of every removal token.
    kill: CancellationToken,
    /// When its slow start began (it appeared or turned healthy).
    ramp_since: Mutex<Option<Instant>>,
}

impl EndpointEntry {
    pub(super) fn new(kill: &CancellationToken) -> Self {
        Self {
            load: Arc::default(),
            removal: Mutex::new(kill.child_token()),
            kill: kill.clone(),
            ramp_since: Mutex::new(None),
        }
    }

    pub(super) fn start_ramp(&self, now: Instant) {
        *self.ramp_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }

    /// The share of its weight it gets at `now` under a slow start of
    /// `window` (1: all of it).
    pub(super) fn ramp_share(&self, window: Option<Duration>, now: Instant) -> f64 {
        let since = *self.ramp_since.lock().unwrap_or_else(|e| e.into_inner());
        match (window, since) {
            (Some(w), Some(t)) => balancer::ramp_share(now.saturating_duration_since(t), w),
            _ => 1.0,
        }
    }

    pub(super) fn removal(&self) -> CancellationToken {
        self.removal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes the connections opened so far; later ones get a fresh token.
    pub(super) fn close_connections(&self) {
        let mut t = self.removal.lock().unwrap_or_else(|e| e.into_inner());
        t.cancel();
        *t = self.kill.child_token();
    }
}

/// Live state of one service, shared by all its routes: the connections
/// open on it (for its cap) and its metric handles, resolved once when
/// the service gets its first route (no label allocation per connection).
pub(super) struct ServiceEntry {
    pub(super) active: AtomicUsize,
    pub(super) metrics: ServiceMetrics,
}

impl ServiceEntry {
    pub(super) fn new(key: &ServiceKey) -> Self {
        Self {
            active: AtomicUsize::new(0),
            metrics: ServiceMetrics::new(key),
        }
    }
}

/// How a proxied connection ended (the `end` label of
/// `beacon_proxy_connection_ends_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnEnd {
    /// Both sides closed their sending half (FIN both ways).
    Fin,
    /// The client's socket failed (reset, or another error): the upstream
    /// was reset.
    ClientReset,
    /// The upstream's socket failed: the client was reset.
    UpstreamReset,
    /// Forced closes, each a reset on both sides.
    IdleTimeout,
    Removed,
    DrainDeadline,
    /// Half-closed (the client's FIN, or the endpoint's, came first) and
    /// quiet for longer than the service's fin timeout.
    ClientFinTimeout,
    ServerFinTimeout,
}

impl ConnEnd {
    const ALL: [ConnEnd; 8] = [
        ConnEnd::Fin,
        ConnEnd::ClientReset,
        ConnEnd::UpstreamReset,
        ConnEnd::IdleTimeout,
        ConnEnd::Removed,
        ConnEnd::DrainDeadline,
        ConnEnd::ClientFinTimeout,
        ConnEnd::ServerFinTimeout,
    ];

    pub(super) fn as_str(self) -> &'static str {
        match self {
            ConnEnd::Fin => "fin",
            ConnEnd::ClientReset => "client_reset",
            ConnEnd::UpstreamReset => "upstream_reset",
            ConnEnd::IdleTimeout => "idle_timeout",
            ConnEnd::Removed => "removed",
            ConnEnd::DrainDeadline => "drain_deadline",
            ConnEnd::ClientFinTimeout => "client_fin_timeout",
            ConnEnd::ServerFinTimeout => "server_fin_timeout",
        }
    }

    /// The proxy closed it, not a peer: both sides get a reset.
    pub(super) fn forced(self) -> bool {
        matches!(
            self,
            ConnEnd::IdleTimeout
                | ConnEnd::Removed
                | ConnEnd::DrainDeadline
                | ConnEnd::ClientFinTimeout
                | ConnEnd::ServerFinTimeout
        )
    }
}

pub(super) struct ServiceMetrics {
    pub(super) ok: Counter,
    pub(super) not_ready: Counter,
    pub(super) no_endpoints: Counter,
    pub(super) connect_failed: Counter,
    /// Every connect attempt failed for want of local resources.
    pub(super) local_error: Counter,
    pub(super) over_limit: Counter,
    pub(super) active: Gauge,
    pub(super) to_upstream: Counter,
    pub(super) to_client: Counter,
    /// By [`ConnEnd`], in the order of `ConnEnd::ALL`.
    ends: [Counter; 8],
}

impl ServiceMetrics {
    fn new(key: &ServiceKey) -> Self {
        use crate::telemetry::{
            PROXY_ACTIVE_CONNECTIONS, PROXY_BYTES, PROXY_CONNECTION_ENDS, PROXY_CONNECTIONS,
        };
        let service = key.to_string();
        let result = |r: &'static str| metrics::counter!(PROXY_CONNECTIONS, "service" => service.clone(), "result" => r);
        let bytes = |d: &'static str| metrics::counter!(PROXY_BYTES, "service" => service.clone(), "direction" => d);
        let end = |e: ConnEnd| metrics::counter!(PROXY_CONNECTION_ENDS, "service" => service.clone(), "end" => e.as_str());
        Self {
            ends: ConnEnd::ALL.map(end),
            ok: result("ok"),
            not_ready: result("not_ready"),
            no_endpoints: result("no_endpoints"),
            connect_failed: result("connect_failed"),
            local_error: result("local_error"),
            over_limit: result("over_limit"),
            active: metrics::gauge!(PROXY_ACTIVE_CONNECTIONS, "service" => service.clone()),
            to_upstream: bytes("to_upstream"),
            to_client: bytes("to_client"),
        }
    }

    pub(super) fn ended(&self, end: ConnEnd) -> &Counter {
        &self.ends[end as usize]
    }
}

/// What a listener routes to: one service port's proxied endpoints (see
/// [`ServiceState::proxied`]) and their balancer, as of one snapshot.
pub(super) struct Route {
    pub(super) service: ServiceKey,
    pub(super) state: Arc<ServiceState>,
    pub(super) port: usize,
    pub(super) backends: Vec<Backend>,
    /// Same order as `backends`.
    pub(super) entries: Vec<Arc<EndpointEntry>>,
    pub(super) balancer: Box<dyn Balancer>,
    pub(super) live: Arc<ServiceEntry>,
    /// An endpoint is in slow start: rebuild as its share grows.
    pub(super) ramping: bool,
}

impl Route {
    /// The route of port `port` of `state`; `entry` gives the live entry
    /// of each serving endpoint address. Weights are the slow-start ones
    /// as of now (also published in `proxy_live`).
    pub(super) fn build(
        state: &Arc<ServiceState>,
        port: usize,
        live: Arc<ServiceEntry>,
        proxy_live: &ProxyLive,
        mut entry: impl FnMut(SocketAddr) -> Arc<EndpointEntry>,
    ) -> Self {
        let key = state.key();
        let p = &state.spec.ports[port];
        let window = state.spec.proxy.slow_start;
        let now = Instant::now();
        let mut backends = Vec::new();
        let mut entries = Vec::new();
        let mut shares = Vec::new();
        for ep in state.proxied() {
            let addr = ep.endpoint.addr(p);
            let e = entry(addr);
            let share = e.ramp_share(window, now);
            proxy_live.set_share(key, ep.endpoint.ip, Some(share));
            shares.push(share);
            backends.push(Backend {
                addr,
                weight: ep.endpoint.weight,
                load: e.load.clone(),
            });
            entries.push(e);
        }
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        for (b, w) in backends
            .iter_mut()
            .zip(balancer::ramped_weights(&weights, &shares))
        {
            b.weight = w;
        }
        let ramping = shares.iter().any(|&s| s < 1.0);
        let balancer = balancer::build(state.spec.balance, &backends);
        tracing::debug!(service = %key, port = %p.port, endpoints = backends.len(),
            policy = ?state.spec.balance, "proxy route built");
        Self {
            service: key.clone(),
            state: state.clone(),
            port,
            backends,
            entries,
            balancer,
            live,
            ramping,
        }
    }

    pub(super) fn metrics(&self) -> &ServiceMetrics {
        &self.live.metrics
    }
}
