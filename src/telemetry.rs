//! Logs (tracing) and metrics (Prometheus recorder).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Starts logging to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder once and returns its handle.
pub fn metrics() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let buckets = [
                0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), &buckets)
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Histograms buffer samples until drained: drain them even when
            // nobody scrapes /metrics, so memory stays flat under load.
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            // Another recorder may be installed already (tests): then ours
            // only renders what it sees, which is still well-formed.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "beacon_config_reloads_total",
        "Services file reloads by result"
    );
    describe_counter!("beacon_source_updates_total", "Updates sent by each source");
    describe_counter!("beacon_source_errors_total", "Errors of each source");
    describe_gauge!(
        "beacon_registry_version",
        "Version of the published snapshot"
    );
    describe_gauge!("beacon_endpoints", "Endpoints per service and state");
    describe_counter!(
        "beacon_dns_requests_total",
        "DNS requests by transport and type"
    );
    describe_counter!("beacon_dns_responses_total", "DNS responses by rcode");
    describe_histogram!(
        "beacon_dns_request_duration_seconds",
        "DNS request handling time"
    );
    describe_counter!(
        "beacon_proxy_connections_total",
        "Proxied connections by result"
    );
    describe_gauge!(
        "beacon_proxy_active_connections",
        "Open proxied connections"
    );
    describe_counter!("beacon_proxy_bytes_total", "Proxied bytes by direction");
    describe_histogram!(
        "beacon_proxy_connect_duration_seconds",
        "Upstream connect time"
    );
    describe_counter!("beacon_health_checks_total", "Health probes by result");
    // Counters people alert on exist from the start, at zero.
    metrics::counter!("beacon_config_reloads_total", "result" => "ok").increment(0);
    metrics::counter!("beacon_config_reloads_total", "result" => "error").increment(0);
}
