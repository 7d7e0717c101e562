//! Admin HTTP: `/healthz`, `/readyz`, `/metrics`, `/v1/services`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::model::{Balance, EndpointState, Port, ServiceState, Snapshot};
use crate::registry::Reader;

#[derive(Clone)]
struct AdminState {
    reader: Reader,
    metrics: PrometheusHandle,
}

/// Binds `addr`. Returns the bound address and the server loop, which
/// serves until `shutdown` (then `Ok`).
pub async fn bind(
    addr: SocketAddr,
    reader: Reader,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>> + Send + 'static,
)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = router(reader, metrics);
    let serve = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    };
    Ok((local, serve))
}

pub fn router(reader: Reader, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/v1/services", get(services))
        .with_state(AdminState { reader, metrics })
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if s.reader.current().ready {
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

#[derive(Serialize)]
struct ServicesView<'a> {
    version: u64,
    ready: bool,
    services: Vec<ServiceView<'a>>,
}

#[derive(Serialize)]
struct ServiceView<'a> {
    name: &'a str,
    namespace: &'a str,
    source: &'a str,
    vip: Option<std::net::IpAddr>,
    balance: Balance,
    ports: &'a [Port],
    health: &'a crate::model::HealthSpec,
    fail_open: bool,
    /// No endpoint is healthy and fail_open serves them all.
    panic: bool,
    endpoints: &'a [EndpointState],
}

impl<'a> ServiceView<'a> {
    fn new(s: &'a ServiceState) -> Self {
        Self {
            name: &s.spec.key.name,
            namespace: &s.spec.key.namespace,
            source: &s.source,
            vip: s.spec.vip,
            balance: s.spec.balance,
            ports: &s.spec.ports,
            health: &s.spec.health,
            fail_open: s.spec.fail_open,
            panic: s.panic,
            endpoints: &s.endpoints,
        }
    }
}

fn services_json(snap: &Snapshot) -> serde_json::Value {
    let view = ServicesView {
        version: snap.version,
        ready: snap.ready,
        services: snap
            .services
            .values()
            .map(|s| ServiceView::new(s))
            .collect(),
    };
    serde_json::to_value(view).unwrap_or_default()
}

async fn services(State(s): State<AdminState>) -> Json<serde_json::Value> {
    let snap: Arc<Snapshot> = s.reader.current();
    Json(services_json(&snap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, EndpointState, Health, ServiceKey, ServiceSpec};

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
        let v = services_json(&snap);
        assert_eq!(v["version"], 7);
        let svc = &v["services"][0];
        assert_eq!(svc["name"], "web");
        assert_eq!(svc["source"], "file:x");
        let ep = &svc["endpoints"][0];
        assert_eq!(ep["ip"], "10.0.0.1");
        assert_eq!(ep["healthy"], true);
        assert_eq!(ep["reason"], "awaiting first probe");
    }
}
