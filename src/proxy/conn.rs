//! One client connection: admission (readiness, the global and
//! per-service caps), then pick, connect with retry, PROXY protocol
//! header, and copy until both sides close (or the idle timeout, the
//! endpoint's removal, the drain deadline). A connection that broke on
//! one side, and every forced close, ends with a reset (never a FIN that
//! would make a cut stream look complete); each end is counted by kind.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::access_log::{End, Record};
use super::balancer::{ConnInfo, EndpointLoad};
use super::copy::{self, Activity, Meter};
use super::error::ProxyError;
use super::route::{ConnEnd, Route};
use super::shared::Shared;
use crate::model::{ConnectOutcome, ProxyProtocol, ProxySpec, local_failure};

/// Admission: refuse (close at once) before readiness and beyond the
/// global or per-service cap; otherwise start the connection task.
pub(super) fn admit(shared: &Arc<Shared>, route: Arc<Route>, stream: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    if !shared.ready.load(Ordering::Acquire) {
        route.metrics().not_ready.increment(1);
        tracing::debug!(client.addr = %peer, service = %route.service, "not ready; connection refused");
        log_refused(shared, &route, peer, started, "not_ready");
        return;
    }
    let Some(guard) = ActiveGuard::acquire(shared, route.clone()) else {
        route.metrics().over_limit.increment(1);
        tracing::debug!(client.addr = %peer, service = %route.service, "connection limit reached; refused");
        log_refused(shared, &route, peer, started, "over_limit");
        return;
    };
    // TCP_NODELAY and SO_KEEPALIVE are inherited from the listener.
    shared
        .tracker
        .spawn(serve(shared.clone(), route, stream, peer, guard, started));
}

/// How one connection ended, for the access log.
struct Outcome {
    endpoint: Option<SocketAddr>,
    to_upstream: u64,
    to_client: u64,
    end: End,
    detail: &'static str,
}

impl Outcome {
    fn refused(endpoint: Option<SocketAddr>, detail: &'static str) -> Self {
        Self::before_bytes(endpoint, End::Refused, detail)
    }

    /// Closed before any byte moved.
    fn before_bytes(endpoint: Option<SocketAddr>, end: End, detail: &'static str) -> Self {
        Self {
            endpoint,
            to_upstream: 0,
            to_client: 0,
            end,
            detail,
        }
    }
}

/// The access log's coarse kind of a proxied connection's end.
fn access_end(end: ConnEnd) -> End {
    match end {
        ConnEnd::Fin => End::Fin,
        ConnEnd::ClientReset | ConnEnd::UpstreamReset | ConnEnd::Removed => End::Reset,
        ConnEnd::IdleTimeout | ConnEnd::ClientFinTimeout | ConnEnd::ServerFinTimeout => {
            End::Timeout
        }
        ConnEnd::DrainDeadline => End::Drained,
    }
}

/// Writes one access log line (when the log is on).
fn log_end(shared: &Shared, route: &Route, peer: SocketAddr, started: Instant, o: Outcome) {
    let Some(log) = &shared.access_log else {
        return;
    };
    log.log(Record {
        at: SystemTime::now(),
        client: peer,
        service: route.service.clone(),
        endpoint: o.endpoint,
        to_upstream: o.to_upstream,
        to_client: o.to_client,
        duration: started.elapsed(),
        end: o.end,
        detail: o.detail,
    });
}

fn log_refused(
    shared: &Shared,
    route: &Route,
    peer: SocketAddr,
    started: Instant,
    why: &'static str,
) {
    if shared.access_log.is_some() {
        log_end(shared, route, peer, started, Outcome::refused(None, why));
    }
}

/// One admitted connection in the global and per-service counts.
struct ActiveGuard {
    shared: Arc<Shared>,
    route: Arc<Route>,
}

impl ActiveGuard {
    fn acquire(shared: &Arc<Shared>, route: Arc<Route>) -> Option<Self> {
        if shared.active.fetch_add(1, Ordering::AcqRel) >= shared.max_connections {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let cap = route.state.spec.proxy.max_connections;
        let n = route.live.active.fetch_add(1, Ordering::AcqRel);
        if cap.is_some_and(|cap| n >= cap as usize) {
            route.live.active.fetch_sub(1, Ordering::AcqRel);
            shared.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        route.metrics().active.increment(1.0);
        Some(Self {
            shared: shared.clone(),
            route,
        })
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.route.metrics().active.decrement(1.0);
        self.route.live.active.fetch_sub(1, Ordering::AcqRel);
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's task. A plain fn returning the instrumented future:
/// an `async fn` would hold its arguments once more beside the inner
/// future's copy, in every connection's task for its whole life.
fn serve(
    shared: Arc<Shared>,
    route: Arc<Route>,
    client: TcpStream,
    peer: SocketAddr,
    guard: ActiveGuard,
    started: Instant,
) -> impl Future<Output = ()> + Send + 'static {
    let span = tracing::debug_span!("conn", service = %route.service, client.addr = %peer);
    async move {
        let _guard = guard;
        let outcome = match connect(&shared, &route, peer).await {
            Ok((upstream, idx, _load)) => {
                route.metrics().ok.increment(1);
                proxy(&shared, &route, client, upstream, idx, peer).await
            }
            Err(refused) => refused,
        };
        log_end(&shared, &route, peer, started, outcome);
    }
    .instrument(span)
}

/// Counts a connect attempt (and then the connection) against an
/// endpoint's active count while it lives.
struct LoadGuard(Arc<EndpointLoad>);

impl LoadGuard {
    fn new(load: &Arc<EndpointLoad>) -> Self {
        load.active.fetch_add(1, Ordering::Relaxed);
        Self(load.clone())
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The pause before connect attempt `attempt` (1-based retries): 5 ms,
/// doubling, at most 100 ms.
pub(super) fn retry_backoff(attempt: usize) -> std::time::Duration {
    let first = std::time::Duration::from_millis(5);
    first
        .saturating_mul(1 << (attempt.saturating_sub(1)).min(8))
        .min(std::time::Duration::from_millis(100))
}

/// Tries the picks in order, up to the service's connect attempts. Err:
/// why the connection was closed before any byte moved.
async fn connect(
    shared: &Shared,
    route: &Route,
    peer: SocketAddr,
) -> Result<(TcpStream, usize, LoadGuard), Outcome> {
    let picks = route.balancer.pick(&ConnInfo { client: peer });
    if picks.is_empty() {
        route.metrics().no_endpoints.increment(1);
        tracing::debug!("no serving endpoint; connection closed");
        return Err(Outcome::refused(None, "no_endpoints"));
    }
    let mut last = None;
    let spec = &route.state.spec.proxy;
    // Every attempt failed here, not at an endpoint (out of descriptors...).
    let mut only_local = true;
    for attempt in 0..spec.connect_attempts.max(1) as usize {
        let Some(idx) = picks.attempt(attempt) else {
            break;
        };
        if attempt > 0 {
            // A short pause before a retry: endpoints that all refuse at
            // once (a rollout) are not run through in microseconds.
            tokio::select! {
                _ = shared.kill.cancelled() => {
                    let detail = ConnEnd::DrainDeadline.as_str();
                    return Err(Outcome::before_bytes(last, End::Drained, detail));
                }
                _ = tokio::time::sleep(retry_backoff(attempt)) => {}
            }
        }
        let backend = &route.backends[idx];
        last = Some(backend.addr);
        let load = LoadGuard::new(&backend.load);
        let started = Instant::now();
        let result = tokio::select! {
            _ = shared.kill.cancelled() => {
                let detail = ConnEnd::DrainDeadline.as_str();
                return Err(Outcome::before_bytes(last, End::Drained, detail));
            }
            r = tokio::time::timeout(spec.connect_timeout, TcpStream::connect(backend.addr)) => r,
        };
        match result {
            Ok(Err(e)) if local_failure(&e) => {
                // Not the endpoint's fault: no outcome, no duration.
                shared.local_errors.failed(&e);
                tracing::debug!(endpoint = %backend.addr, attempt, error = %e,
                    "connect could not start here (local resources)");
                continue;
            }
            Ok(Ok(stream)) => {
                shared.local_errors.ended();
                record(shared, route, idx, started, true);
                return Ok((stream, idx, load));
            }
            Ok(Err(e)) => {
                record(shared, route, idx, started, false);
                tracing::debug!(endpoint = %backend.addr, attempt, error = %e, "connect failed")
            }
            Err(_) => {
                record(shared, route, idx, started, false);
                tracing::debug!(endpoint = %backend.addr, attempt, "connect timed out")
            }
        }
        only_local = false;
    }
    let why = if only_local {
        route.metrics().local_error.increment(1);
        "local_error"
    } else {
        route.metrics().connect_failed.increment(1);
        "connect_failed"
    };
    tracing::debug!("every connect attempt failed; connection closed");
    Err(Outcome::refused(last, why))
}

/// Records a connect attempt that reached (or timed out on) an endpoint.
fn record(shared: &Shared, route: &Route, idx: usize, started: Instant, success: bool) {
    shared
        .connect_duration
        .record(started.elapsed().as_secs_f64());
    report(shared, route, idx, success);
}

/// Passive health signal, never blocking the data path (dropped when the
/// channel is full). Every failure is sent; a success only when it ends a
/// failure streak, which is all a consecutive-failure count needs, so the
/// happy path sends nothing.
fn report(shared: &Shared, route: &Route, idx: usize, success: bool) {
    let backend = &route.backends[idx];
    let streak = if success {
        backend.load.failures.swap(0, Ordering::Relaxed)
    } else {
        backend.load.failures.fetch_add(1, Ordering::Relaxed) + 1
    };
    if success && streak == 0 {
        return;
    }
    let _ = shared.outcomes.try_send(ConnectOutcome {
        service: route.service.clone(),
        ip: backend.addr.ip(),
        success,
    });
}

/// The PROXY protocol header announcing `client` → `local` (the address
/// the client connected to).
pub(super) fn proxy_header(
    version: ProxyProtocol,
    client: SocketAddr,
    local: SocketAddr,
) -> Result<Vec<u8>, ProxyError> {
    match version {
        ProxyProtocol::V1 => Ok(ppp::v1::Addresses::from((client, local))
            .to_string()
            .into_bytes()),
        ProxyProtocol::V2 => {
            use ppp::v2::{Builder, Command, Protocol, Version};
            Builder::with_addresses(
                Version::Two | Command::Proxy,
                Protocol::Stream,
                (client, local),
            )
            .build()
            .map_err(ProxyError::ProxyHeader)
        }
    }
}

async fn send_proxy_header(
    version: ProxyProtocol,
    client: &TcpStream,
    upstream: &mut TcpStream,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let local = client.local_addr().unwrap_or(peer);
    let header = proxy_header(version, peer, local)?;
    upstream
        .write_all(&header)
        .await
        .map_err(ProxyError::ProxyHeader)
}

async fn proxy(
    shared: &Shared,
    route: &Route,
    client: TcpStream,
    mut upstream: TcpStream,
    idx: usize,
    peer: SocketAddr,
) -> Outcome {
    let _ = upstream.set_nodelay(true);
    let endpoint = route.backends[idx].addr;
    let spec = &route.state.spec.proxy;
    // Taken before any byte moves, so a removal (or the drain deadline)
    // from now on closes it.
    let removal = route.entries[idx].removal();
    if let Some(version) = spec.proxy_protocol
        && let Err(e) = send_proxy_header(version, &client, &mut upstream, peer).await
    {
        tracing::debug!(error = %e, "PROXY header not sent; connection reset");
        copy::reset_on_close(&client);
        route.metrics().ended(ConnEnd::UpstreamReset).increment(1);
        return Outcome::before_bytes(Some(endpoint), End::Reset, "proxy_header");
    }
    let activity = Activity::default();
    activity.touch();
    let moved = [AtomicU64::new(0), AtomicU64::new(0)];
    let copy = copy::bidirectional(
        &client,
        &upstream,
        shared.copy_mode,
        Meter {
            bytes: &route.metrics().to_upstream,
            activity: &activity,
            moved: &moved[0],
        },
        Meter {
            bytes: &route.metrics().to_client,
            activity: &activity,
            moved: &moved[1],
        },
        // Both sockets are dropped as soon as this returns.
        true,
    );
    let end = tokio::select! {
        r = copy => copy_end(r, endpoint),
        end = quiet_expired(&activity, spec) => end,
        // A child of the kill token: cancelled by a removal or the drain.
        _ = removal.cancelled() => if shared.kill.is_cancelled() {
            ConnEnd::DrainDeadline
        } else {
            ConnEnd::Removed
        },
    };
    if end.forced() {
        // A forced close must not look like a complete stream: reset both.
        tracing::debug!(%endpoint, end = end.as_str(), "connection closed by the proxy; both sides reset");
        copy::reset_on_close(&client);
        copy::reset_on_close(&upstream);
    }
    route.metrics().ended(end).increment(1);
    Outcome {
        endpoint: Some(endpoint),
        to_upstream: moved[0].load(Ordering::Relaxed),
        to_client: moved[1].load(Ordering::Relaxed),
        end: access_end(end),
        detail: end.as_str(),
    }
}

/// How a copy that ended by itself ended: both FINs, or a reset on a side.
fn copy_end(r: Result<copy::Totals, copy::Broken>, endpoint: SocketAddr) -> ConnEnd {
    match r {
        Ok(t) => {
            tracing::debug!(%endpoint, to_upstream = t.a_to_b.bytes, to_client = t.b_to_a.bytes,
                path = t.a_to_b.path.as_str(), "connection closed");
            ConnEnd::Fin
        }
        Err(b) => {
            let end = match b.side {
                copy::Side::A => ConnEnd::ClientReset,
                copy::Side::B => ConnEnd::UpstreamReset,
            };
            tracing::debug!(%endpoint, error = %b.error, end = end.as_str(),
                "connection broke; the other side is reset");
            end
        }
    }
}

/// Resolves once nothing moved for `idle`.
#[cfg(test)]
pub(super) async fn idle_expired(activity: &Activity, idle: std::time::Duration) {
    let spec = ProxySpec {
        idle_timeout: idle,
        ..ProxySpec::default()
    };
    quiet_expired(activity, &spec).await;
}

/// Resolves once nothing moved for the limit in force, with that limit:
/// the idle timeout, or a fin timeout (when shorter) once the client
/// (side A) or the endpoint (side B) has closed its sending half.
pub(super) async fn quiet_expired(activity: &Activity, spec: &ProxySpec) -> ConnEnd {
    loop {
        let changed = activity.half_closed_changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (client_done, server_done) = activity.half_closed();
        let mut limit = (spec.idle_timeout, ConnEnd::IdleTimeout);
        for (done, fin, end) in [
            (
                client_done,
                spec.client_fin_timeout,
                ConnEnd::ClientFinTimeout,
            ),
            (
                server_done,
                spec.server_fin_timeout,
                ConnEnd::ServerFinTimeout,
            ),
        ] {
            if let Some(t) = fin.filter(|t| done && *t < limit.0) {
                limit = (t, end);
            }
        }
        let quiet = activity.idle_for();
        if quiet >= limit.0 {
            return limit.1;
        }
        tokio::select! {
            _ = tokio::time::sleep(limit.0 - quiet) => {}
            _ = changed => {}
        }
    }
}

#[cfg(test)]
mod size {
    use std::mem::size_of;

    /// The size of the future `f` returns, without calling it.
    fn returned<A, B, C, D, E, G, F>(_: fn(A, B, C, D, E, G) -> F) -> usize {
        size_of::<F>()
    }

    /// Every live connection is one such future: its size is most of the
    /// proxy's memory per idle connection beside the two sockets (the l4
    /// bench's idle memory row). It was 3,000 bytes before the readiness
    /// waits lost their waiter nodes and the flush stopped overlapping
    /// the copy; the bound catches a change that grows it back.
    #[test]
    fn the_connection_future_stays_small() {
        let n = returned(super::serve);
        eprintln!("connection future: {n} bytes");
        assert!(n <= 2_400, "the connection future grew to {n} bytes");
    }
}
