//! The TOML tables as serde reads them: every key optional, unknown keys
//! rejected, each value's position kept ([`Spanned`]) where validation
//! may need to point at it. Validation (the sibling modules) turns these
//! into typed values.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::flat::{Flat, shared_keys};

/// A duration written as text: `"500ms"`, `"2s"`, `"1h"`.
pub type HumanDuration = humantime_serde::Serde<Duration>;

// ===== main config =====

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub dns: RawDns,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default, rename = "source")]
    pub sources: Vec<RawSource>,
    #[serde(default, with = "humantime_serde")]
    pub startup_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub enabled: Option<bool>,
    pub listen: Option<Spanned<String>>,
    pub zone: Option<Spanned<String>>,
    pub ttl: Option<Spanned<i64>>,
    pub forward: Option<Vec<Spanned<String>>>,
    pub forward_allow: Option<Vec<Spanned<String>>>,
    pub cache_size: Option<Spanned<i64>>,
    pub udp_sockets: Option<Spanned<i64>>,
    pub udp_batch: Option<Spanned<i64>>,
    pub forward_timeout: Option<Spanned<HumanDuration>>,
    pub max_fails: Option<Spanned<i64>>,
    pub health_check: Option<Spanned<HumanDuration>>,
    pub prefetch: Option<Spanned<i64>>,
    pub tcp_idle_timeout: Option<Spanned<HumanDuration>>,
    pub tcp_max_connections: Option<Spanned<i64>>,
    pub lameduck: Option<Spanned<HumanDuration>>,
    pub autopath: Option<bool>,
    pub tls_listen: Option<Spanned<String>>,
    pub https_listen: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub enabled: Option<bool>,
    pub listen: Option<Spanned<String>>,
}

/// `[health]` in the main config (the defaults) and `[service.health]` in
/// a services file (what one service overrides): the same keys.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub kind: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<String>,
    pub interval: Option<Spanned<HumanDuration>>,
    pub timeout: Option<Spanned<HumanDuration>>,
    pub fast_interval: Option<Spanned<HumanDuration>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub initial_state: Option<Spanned<String>>,
    pub eject_after: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    pub eject_time: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub eject_max_time: Option<Duration>,
    pub eject_max_percent: Option<Spanned<i64>>,
}

shared_keys! {
    /// The proxy keys a service may override: `[proxy]` sets the defaults,
    /// a `[[service]]` its own values (they stand directly in its table).
    pub struct RawProxyKeys {
        connect_timeout: Spanned<HumanDuration>,
        connect_attempts: Spanned<i64>,
        idle_timeout: Spanned<HumanDuration>,
        proxy_protocol: Spanned<String>,
        close_on_removal: bool,
        slow_start: Spanned<HumanDuration>,
        client_fin_timeout: Spanned<HumanDuration>,
        server_fin_timeout: Spanned<HumanDuration>,
        udp_idle_timeout: Spanned<HumanDuration>,
    }
}

/// `[proxy]`: the keys only the main config has, and the service defaults.
pub type RawProxy = Flat<RawGlobalProxy, RawProxyKeys>;

/// The keys of `[proxy]` that are not service defaults.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawGlobalProxy {
    pub enabled: Option<bool>,
    /// Across all services (a service's own `max_connections` is its cap).
    pub max_connections: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
    /// `"stderr"` or a file path; absent: no access log.
    pub access_log: Option<Spanned<String>>,
    /// UDP flows across all services.
    pub udp_max_flows: Option<Spanned<i64>>,
    /// The interface beacon keeps the vips on.
    pub vip_interface: Option<Spanned<String>>,
    /// `"auto"`, `"always"` or `"never"`.
    pub splice: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    pub path: Option<Spanned<String>>,
    pub socket: Option<Spanned<String>>,
    pub network: Option<String>,
    pub namespaces: Option<Vec<Spanned<String>>>,
    pub allow_listen: Option<Vec<Spanned<String>>>,
    pub allow_vip: Option<Vec<Spanned<String>>>,
    // etcd
    pub endpoints: Option<Vec<Spanned<String>>>,
    pub prefix: Option<Spanned<String>>,
    pub node: Option<Spanned<String>>,
    pub publish: Option<Vec<Spanned<String>>>,
    pub lease_ttl: Option<Spanned<HumanDuration>>,
    pub ca: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub kubeconfig: Option<Spanned<String>>,
    pub label_selector: Option<Spanned<String>>,
}

// ===== services files =====

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServicesFile {
    /// Required: an empty or cut file (a torn write) has none, and must not
    /// read as "no services"; a file that means that says `service = []`.
    pub service: Option<Vec<RawService>>,
}

/// `[[service]]`: the service's own keys and the proxy keys, in one table.
pub type RawService = Flat<RawServiceKeys, RawProxyKeys>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServiceKeys {
    pub name: Spanned<String>,
    pub namespace: Option<Spanned<String>>,
    pub vip: Option<Spanned<String>>,
    pub balance: Option<Spanned<String>>,
    #[serde(default)]
    pub port: Vec<RawPort>,
    #[serde(default)]
    pub endpoint: Vec<RawEndpoint>,
    pub health: Option<RawHealth>,
    pub fail_open: Option<bool>,
    /// This service's cap on concurrent connections (not inherited: the
    /// `[proxy]` key of that name caps all services together).
    pub max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPort {
    pub name: Option<Spanned<String>>,
    pub port: Spanned<i64>,
    pub target_port: Option<Spanned<i64>>,
    pub protocol: Option<Spanned<String>>,
    pub listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub ip: Spanned<String>,
    pub hostname: Option<Spanned<String>>,
    pub weight: Option<Spanned<i64>>,
    pub ready: Option<bool>,
    pub port: Option<Spanned<i64>>,
}
