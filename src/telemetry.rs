//! Logs (tracing) and metrics (Prometheus recorder).
//!
//! Every metric beacon exports is named here, once, with its help text
//! ([`METRICS`]); code elsewhere refers to the constants, never to a string
//! literal. The recorder is installed by [`metrics`], which `app::start`
//! calls before it starts any loop, so a loop may resolve its metric handles
//! once when it starts.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

static LOG_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The `--log-format` logging was started with (the access log follows it).
pub fn log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or_default()
}

/// Starts logging to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let _ = LOG_FORMAT.set(format);
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

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder once and returns its handle.
pub fn metrics() -> PrometheusHandle {
    RECORDER
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

/// What kind of series a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric: its name, kind and `# HELP` text.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

macro_rules! catalogue {
    ($( $(#[$doc:meta])* $konst:ident = ($name:literal, $kind:ident, $help:literal); )*) => {
        $( $(#[$doc])* pub const $konst: &str = $name; )*
        /// Every metric beacon exports, in one list.
        pub const METRICS: &[Metric] = &[
            $( Metric { name: $name, kind: Kind::$kind, help: $help }, )*
        ];
    };
}

catalogue! {
    // DNS (the contract's names; `proto` = udp | tcp | dot | doh)
    DNS_REQUESTS = ("beacon_dns_requests_total", Counter, "DNS requests by transport and query type");
    DNS_RESPONSES = ("beacon_dns_responses_total", Counter, "DNS responses by rcode");
    DNS_REQUEST_DURATION = ("beacon_dns_request_duration_seconds", Histogram, "DNS request handling time");
    DNS_FORWARD_CACHE = ("beacon_dns_forward_cache_total", Counter, "Forward cache lookups by result (hit, miss)");
    DNS_UPSTREAM_REQUESTS = ("beacon_dns_upstream_requests_total", Counter, "Queries sent to each upstream, by upstream and result (the reply's rcode, timeout or error)");
    DNS_UPSTREAM_DURATION = ("beacon_dns_upstream_duration_seconds", Histogram, "Time each upstream took to reply, by upstream");
    DNS_UPSTREAM_HEALTHY = ("beacon_dns_upstream_healthy", Gauge, "1 while a forwarding upstream is healthy, 0 while it is marked down (max_fails failures in a row, until a health check gets a reply), by upstream");
    // Proxy
    PROXY_CONNECTIONS = ("beacon_proxy_connections_total", Counter, "Proxied connections by service and result");
    PROXY_ACTIVE_CONNECTIONS = ("beacon_proxy_active_connections", Gauge, "Open proxied connections by service");
    PROXY_BYTES = ("beacon_proxy_bytes_total", Counter, "Proxied bytes by service and direction");
    PROXY_CONNECT_DURATION = ("beacon_proxy_connect_duration_seconds", Histogram, "Time to connect to an endpoint");
    PROXY_CONNECTION_ENDS = ("beacon_proxy_connection_ends_total", Counter, "Proxied connections by service and how they ended (fin, client_reset, upstream_reset, idle_timeout, removed, drain_deadline, client_fin_timeout, server_fin_timeout)");
    PROXY_SPLICE = ("beacon_proxy_splice_total", Counter, "Proxied TCP directions by how their bytes moved: splice (bulk), copy (small reads only), fallback (userspace, no splice)");
    PROXY_LISTENERS = ("beacon_proxy_listeners", Gauge, "Open proxy listeners");
    PROXY_LISTENER_ERRORS = ("beacon_proxy_listener_errors_total", Counter, "Proxy listeners that could not be opened, by service");
    PROXY_ACCESS_LOG_DROPPED = ("beacon_proxy_access_log_dropped_total", Counter, "Access log lines dropped because the writer fell behind");
    PROXY_UDP_FLOWS = ("beacon_proxy_udp_flows", Gauge, "Open UDP flows (client address to endpoint) by service");
    PROXY_UDP_FLOWS_DROPPED = ("beacon_proxy_udp_flows_dropped_total", Counter, "Datagrams of new UDP clients dropped because the flow table was full, by service");
    PROXY_ACCEPT_ERRORS = ("beacon_proxy_accept_errors_total", Counter, "Failed accepts on proxy listeners, by kind");
    // Health
    ENDPOINTS = ("beacon_endpoints", Gauge, "Endpoints per service and state");
    HEALTH_CHECKS = ("beacon_health_checks_total", Counter, "Health probes by result");
    ENDPOINT_EJECTIONS = ("beacon_endpoint_ejections_total", Counter, "Passive ejections by service");
    PANIC_MODE = ("beacon_panic_mode", Gauge, "1 while fail_open serves every endpoint of a service because none is healthy");
    PANIC_MODE_ENTRIES = ("beacon_panic_mode_total", Counter, "Entries into panic mode by service");
    // Sources and registry
    SOURCE_UPDATES = ("beacon_source_updates_total", Counter, "Updates sent by each source");
    SOURCE_ERRORS = ("beacon_source_errors_total", Counter, "Errors of each source");
    SOURCE_CONNECTED = ("beacon_source_connected", Gauge, "1 while a source is connected to what it watches (synced), 0 while it is lost or has not synced yet");
    REGISTRY_VERSION = ("beacon_registry_version", Gauge, "Version of the published snapshot");
    CLAIM_CONFLICTS = ("beacon_claim_conflicts", Gauge, "Claims (listen addresses, vips, endpoint hostnames) refused to a service because another holds them, by kind");
    CONFIG_RELOADS = ("beacon_config_reloads_total", Counter, "Services file reloads by result");
}

fn describe() {
    for m in METRICS {
        match m.kind {
            Kind::Counter => ::metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => ::metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => ::metrics::describe_histogram!(m.name, m.help),
        }
    }
    // Counters people alert on exist from the start, at zero.
    ::metrics::counter!(CONFIG_RELOADS, "result" => "ok").increment(0);
    ::metrics::counter!(CONFIG_RELOADS, "result" => "error").increment(0);
    ::metrics::gauge!(REGISTRY_VERSION).set(0.0);
    for kind in ["listen", "vip", "hostname"] {
        ::metrics::gauge!(CLAIM_CONFLICTS, "kind" => kind).set(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_once_with_help() {
        let mut names: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a metric is listed twice");
        for m in METRICS {
            assert!(m.name.starts_with("beacon_"), "{}", m.name);
            assert!(!m.help.is_empty(), "{} has no help", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
        }
    }
}
