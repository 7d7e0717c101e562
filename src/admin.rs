//! Admin HTTP: `/healthz`, `/readyz`, `/metrics`, `/v1/services`,
//! `/v1/events` and the status page at `/` (those three in `page`).
//!
//! The server is hyper's HTTP/1.1 connection driver in an accept loop of
//! our own, so that no client can hold descriptors or shutdown hostage:
//! at most [`MAX_CONNECTIONS`] clients at once (more are closed at once),
//! request headers (and the next request on a kept-alive connection) must
//! arrive within [`HEADER_TIMEOUT`], a connection on which nothing moves
//! for [`IDLE_TIMEOUT`] is closed, and on shutdown a connection with no
//! request in progress (idle, or still sending its headers) is closed at
//! once while requests in progress get [`SHUTDOWN_WAIT`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{ProxyLive, Snapshot};
use crate::registry::Reader;

mod page;

/// Admin clients served at once; beyond it a new connection is closed at
/// once (admin clients are scrapers and operators: a handful).
pub const MAX_CONNECTIONS: usize = 128;
/// A request's headers, and on a kept-alive connection the next request,
/// must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection on which no byte moved for this long is closed (a client
/// that stopped reading its response).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, how long requests in progress may take to finish.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct AdminState {
    reader: Reader,
    metrics: PrometheusHandle,
    /// The proxy's slow-start shares (empty without a proxy).
    live: Arc<ProxyLive>,
    /// Cancelled at shutdown: `/readyz` says 503 from then on.
    draining: CancellationToken,
}

/// The server's bounds (the constants above by default; tests shrink them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_wait: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            shutdown_wait: SHUTDOWN_WAIT,
        }
    }
}

/// Binds `addr`. Returns the bound address and the server loop, which
/// serves until `shutdown` (then `Ok`); `/readyz` says 503 once `draining`
/// is cancelled.
pub async fn bind(
    addr: SocketAddr,
    reader: Reader,
    metrics: PrometheusHandle,
    live: Arc<ProxyLive>,
    draining: CancellationToken,
    shutdown: CancellationToken,
) -> io::Result<(
    SocketAddr,
    impl Future<Output = io::Result<()>> + Send + 'static,
)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router_with(reader, metrics, live, draining);
    Ok((local, serve(listener, app, Limits::default(), shutdown)))
}

/// Serves `app` on `listener` within `limits` until `shutdown`: then stops
/// accepting, closes idle connections, gives requests in progress
/// `limits.shutdown_wait`, and drops what is left.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let closing = CancellationToken::new();
    let mut conns = JoinSet::new();
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::ZERO;
                stream
            }
            Err(e) => {
                // Out of descriptors and the like: pause instead of spinning.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tracing::debug!(error = %e, ?backoff, "admin accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                max = limits.max_connections,
                "admin connection cap reached; connection closed"
            );
            continue;
        };
        conns.spawn(connection(
            stream,
            app.clone(),
            limits,
            closing.clone(),
            slot,
        ));
    }
    drop(listener);
    closing.cancel();
    let drained = tokio::time::timeout(limits.shutdown_wait, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            left = conns.len(),
            "admin requests still in progress at shutdown; closed"
        );
    }
    conns.shutdown().await;
    Ok(())
}

/// One admin connection, bounded by the header and idle timeouts.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: Limits,
    closing: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let busy = Arc::new(AtomicUsize::new(0));
    let app = {
        let busy = busy.clone();
        app.layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let guard = Busy::enter(&busy);
                async move {
                    let response = next.run(req).await;
                    response.map(|body| {
                        Body::new(BusyBody {
                            body,
                            _guard: guard,
                        })
                    })
                }
            },
        ))
    };
    let progress = Arc::new(Progress::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        progress: progress.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let mut conn = pin!(builder.serve_connection(io, TowerToHyperService::new(app)));
    let mut idle = pin!(progress.idle_for(limits.idle_timeout));
    let mut graceful = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
                return;
            }
            _ = closing.cancelled(), if !graceful => {
                if busy.load(Ordering::Acquire) == 0 {
                    // Idle, or a request not even sent whole: nothing to
                    // finish (hyper would wait for the headers).
                    return;
                }
                // Finish the response in progress, then close.
                graceful = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle => {
                tracing::debug!("admin connection idle; closed");
                return;
            }
        }
    }
}

/// Counts a request as in progress from its handler's start until hyper
/// has sent (or dropped) its response body.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in progress.
struct BusyBody {
    body: Body,
    _guard: Busy,
}

impl http_body::Body for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// When a byte last moved on a connection (ms since `epoch`), on tokio's
/// clock.
struct Progress {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = self.epoch.elapsed().saturating_sub(last);
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// A socket that records its progress: every read or write that moved a
/// byte.
struct Watched {
    inner: TcpStream,
    progress: Arc<Progress>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progress.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pub fn router(reader: Reader, metrics: PrometheusHandle) -> Router {
    router_with(reader, metrics, Arc::default(), CancellationToken::new())
}

/// [`router`] showing the proxy's slow-start shares in `/v1/services`, whose
/// `/readyz` says 503 once `draining` is cancelled (the lameduck after
/// SIGTERM).
pub fn router_with(
    reader: Reader,
    metrics: PrometheusHandle,
    live: Arc<ProxyLive>,
    draining: CancellationToken,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/v1/services", get(services))
        .route("/v1/events", get(events))
        .route("/", get(status_page))
        .with_state(AdminState {
            reader,
            metrics,
            live,
            draining,
        })
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.draining.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
            .into_response()
    } else if s.reader.current().ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first sync of every source\n",
        )
            .into_response()
    }
}

async fn render_metrics(State(s): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn services(
    State(s): State<AdminState>,
    Query(query): Query<page::ServicesQuery>,
) -> Response {
    let snap: Arc<Snapshot> = s.reader.current();
    // Tens of MB at 100k endpoints: off the async workers.
    let body = tokio::task::spawn_blocking(move || page::services_body(&snap, &query, &s.live))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn events(
    State(s): State<AdminState>,
    Query(query): Query<page::EventsQuery>,
) -> Json<serde_json::Value> {
    Json(page::events_json(&s.reader.current(), &query))
}

async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        page::STATUS_PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointState, Health, ServiceKey, ServiceSpec, ServiceState};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SMALL: Limits = Limits {
        max_connections: 4,
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(600),
        shutdown_wait: Duration::from_millis(300),
    };

    /// A server with `limits` over an empty registry; its address and task.
    async fn server(
        limits: Limits,
        shutdown: CancellationToken,
    ) -> (SocketAddr, tokio::task::JoinHandle<io::Result<()>>) {
        let (_handle, reader, _task) =
            crate::registry::spawn(Vec::new(), Duration::from_secs(60), shutdown.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(reader, crate::telemetry::metrics());
        (addr, tokio::spawn(serve(listener, app, limits, shutdown)))
    }

    async fn partial(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        s
    }

    /// How long until the server closes `s` (EOF or reset), at most `limit`.
    async fn closed_after(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(limit, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => continue,
                Err(_) => return None,
            }
        }
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    }

    #[tokio::test]
    async fn partial_requests_are_capped_and_timed_out() {
        let shutdown = CancellationToken::new();
        let (addr, _task) = server(SMALL, shutdown.clone()).await;
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(partial(addr).await);
        }
        // Beyond the cap of 4: closed at once; the others at the header
        // timeout, while their clients still wait.
        let mut times = Vec::new();
        for s in &mut held {
            times.push(
                closed_after(s, Duration::from_secs(3))
                    .await
                    .expect("closed"),
            );
        }
        let quick = times
            .iter()
            .filter(|t| **t < Duration::from_millis(150))
            .count();
        assert!(quick >= 2, "over the cap must close at once: {times:?}");
        assert!(
            times.iter().all(|t| *t < Duration::from_secs(1)),
            "{times:?}"
        );
        // Slots are free again: a complete request is served.
        assert!(get(addr).await.starts_with("HTTP/1.1 200"));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_at_the_header_timeout() {
        let shutdown = CancellationToken::new();
        let (addr, _task) = server(SMALL, shutdown.clone()).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Kept alive, then quiet: closed at the header timeout.
        let after = closed_after(&mut s, Duration::from_secs(3))
            .await
            .expect("closed");
        assert!(
            after >= Duration::from_millis(250) && after < Duration::from_secs(1),
            "{after:?}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_idle_clients() {
        let limits = Limits {
            header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            shutdown_wait: Duration::from_secs(5),
            ..SMALL
        };
        let shutdown = CancellationToken::new();
        let (addr, task) = server(limits, shutdown.clone()).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(partial(addr).await);
        }
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await;
        let started = Instant::now();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the server ended")
            .unwrap()
            .unwrap();
        // Idle and half-sent clients are no request in progress: no wait
        // for them, not even the shutdown wait.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
        for s in held.iter_mut().chain([&mut idle]) {
            assert!(closed_after(s, Duration::from_secs(2)).await.is_some());
        }
    }

    #[test]
    fn services_json_shows_health_reason_and_source() {
        let mut spec = ServiceSpec::new(ServiceKey::new("default", "web"));
        spec.endpoints
            .push(Endpoint::new("10.0.0.1".parse().unwrap()));
        let spec = Arc::new(spec);
        let eps = vec![EndpointState::new(
            spec.endpoints[0].clone(),
            Health::default(),
            &spec.health,
        )];
        let mut snap = Snapshot {
            version: 7,
            ready: true,
            ..Snapshot::default()
        };
        snap.services.insert(
            spec.key.clone(),
            Arc::new(ServiceState::new(spec.clone(), "file:x".into(), eps)),
        );
        let live = ProxyLive::default();
        let v = page::services_json(&snap, &Default::default(), &live);
        assert_eq!(v["version"], 7);
        let svc = &v["services"][0];
        assert_eq!(svc["name"], "web");
        assert_eq!(svc["source"], "file:x");
        let ep = &svc["endpoints"][0];
        assert_eq!(ep["ip"], "10.0.0.1");
        assert_eq!(ep["healthy"], true);
        assert_eq!(ep["reason"], "awaiting first probe");
        assert_eq!(ep["effective_weight"], 1.0);
        // Slow start: the share the proxy published.
        live.set_share(&spec.key, "10.0.0.1".parse().unwrap(), Some(0.25));
        let v = page::services_json(&snap, &Default::default(), &live);
        assert_eq!(v["services"][0]["endpoints"][0]["effective_weight"], 0.25);
        assert_eq!(v["conflicts"], serde_json::json!([]));
        snap.conflicts = vec![crate::model::Conflict {
            kind: "listen",
            service: ServiceKey::new("a", "evil"),
            claim: "127.0.0.1:8080".into(),
            winner: "web.default".into(),
        }]
        .into();
        let v = page::services_json(&snap, &Default::default(), &live);
        let c = &v["conflicts"][0];
        assert_eq!(
            (&c["kind"], &c["claim"], &c["winner"]),
            (
                &"listen".into(),
                &"127.0.0.1:8080".into(),
                &"web.default".into()
            )
        );
        assert_eq!(c["service"]["name"], "evil");
    }
}
