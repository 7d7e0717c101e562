//! Configuration: the main config file and the services files of the `file`
//! source, from TOML text to validated, typed values.
//!
//! Parsing goes through serde with `deny_unknown_fields` into raw structs
//! that keep each value's position ([`toml::Spanned`]), then `validate`
//! turns them into typed values. Every error carries `PATH:LINE:COL` and
//! says what is wrong and what is allowed; validation collects every error
//! rather than stopping at the first.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::model::{
    Balance, Endpoint, HealthSpec, Port, ProbeKind, Protocol, ProxyProtocol, ProxySpec, ServiceKey,
    ServiceSpec,
};

/// The text of `config/beacon.toml`, used when `run` gets no `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../config/beacon.toml");

/// One problem in one file, at one position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every problem found in a file (or a set of files).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Turns byte spans into `PATH:LINE:COL` errors for one file's text.
struct Reporter<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> Reporter<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        Self {
            path,
            text,
            errors: Vec::new(),
        }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, col) = self.position(span.start);
        self.errors.push(ConfigError {
            path: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
        });
    }

    fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    /// Parses TOML into `T`, turning a serde/TOML error into a positioned one.
    fn parse<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        match toml::from_str::<T>(self.text) {
            Ok(v) => Some(v),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = explain_toml_error(e.message());
                self.error(span, message);
                None
            }
        }
    }
}

/// Makes serde's messages say what to do.
fn explain_toml_error(message: &str) -> String {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // "unknown field `x`, expected one of `a`, `b`"
        return match rest.split_once(", expected ") {
            Some((field, allowed)) => {
                format!("unknown key {field}; valid keys here: {allowed}")
            }
            None => format!("unknown key {rest}"),
        };
    }
    message.to_string()
}

// ===== main config =====

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default, rename = "source")]
    sources: Vec<RawSource>,
    #[serde(default, with = "humantime_serde")]
    startup_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    enabled: Option<bool>,
    listen: Option<Spanned<String>>,
    zone: Option<Spanned<String>>,
    ttl: Option<Spanned<i64>>,
    forward: Option<Vec<Spanned<String>>>,
    forward_allow: Option<Vec<Spanned<String>>>,
    cache_size: Option<Spanned<i64>>,
    udp_sockets: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    forward_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    tcp_idle_timeout: Option<Duration>,
    tcp_max_connections: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    enabled: Option<bool>,
    listen: Option<Spanned<String>>,
}

/// `[health]` in the main config and `[service.health]` in a services file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    host: Option<String>,
    #[serde(default, with = "humantime_serde")]
    interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    fast_interval: Option<Duration>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    initial_state: Option<Spanned<String>>,
    eject_after: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    eject_time: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    eject_max_time: Option<Duration>,
    eject_max_percent: Option<Spanned<i64>>,
}

/// `[proxy]` in the main config; the same keys (but `enabled` and
/// `max_connections_total`) may stand in a `[[service]]`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    enabled: Option<bool>,
    max_connections: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    connect_attempts: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    drain_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    path: Option<Spanned<String>>,
    socket: Option<Spanned<String>>,
    network: Option<String>,
}

/// The validated main config.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where it was read from (None: the embedded default).
    pub path: Option<PathBuf>,
    pub dns: DnsConfig,
    pub admin: AdminConfig,
    /// Defaults for every service's health check.
    pub health: HealthSpec,
    pub proxy: ProxyConfig,
    pub sources: Vec<SourceConfig>,
    /// Serve what is known if a source has not synced by then.
    pub startup_timeout: Duration,
    /// How long SIGTERM waits for loops and connections to finish.
    pub shutdown_grace: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DnsConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Lower-case, without a trailing dot.
    pub zone: String,
    pub ttl: u32,
    pub forward: Vec<SocketAddr>,
    pub forward_allow: Vec<IpNet>,
    pub cache_size: usize,
    /// UDP sockets bound with SO_REUSEPORT (default: one per core).
    pub udp_sockets: usize,
    pub forward_timeout: Duration,
    pub tcp_idle_timeout: Duration,
    pub tcp_max_connections: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    pub enabled: bool,
    /// Cap on concurrent proxied connections across all services.
    pub max_connections: usize,
    /// Defaults for every service.
    pub defaults: ProxySpec,
    /// On shutdown, how long live connections may finish (default: the grace).
    pub drain_timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SourceConfig {
    /// A services file, or a directory of `*.toml` services files.
    File { path: PathBuf },
    /// The Docker engine on its unix socket.
    Docker {
        socket: PathBuf,
        network: Option<String>,
    },
}

impl SourceConfig {
    /// The name the registry knows this source by.
    pub fn id(&self) -> crate::model::SourceId {
        match self {
            SourceConfig::File { path } => format!("file:{}", path.display()).into(),
            SourceConfig::Docker { .. } => "docker".into(),
        }
    }
}

/// Defaults every services file inherits from the main config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceDefaults {
    pub health: HealthSpec,
    pub proxy: ProxySpec,
}

impl Config {
    pub fn service_defaults(&self) -> ServiceDefaults {
        ServiceDefaults {
            health: self.health.clone(),
            proxy: self.proxy.defaults.clone(),
        }
    }

    /// Reads and validates a main config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = read_file(path)?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, path, &base).map(|mut c| {
            c.path = Some(path.to_path_buf());
            c
        })
    }

    /// The embedded default; relative paths resolve against the current directory.
    pub fn embedded_default() -> Config {
        Self::parse(DEFAULT_CONFIG, Path::new("<embedded>"), Path::new(""))
            .expect("the embedded default config is valid (a test checks it)")
    }

    /// Parses config text; `base` is where relative paths point from.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Config, ConfigErrors> {
        let mut r = Reporter::new(path, text);
        let Some(raw) = r.parse::<RawConfig>() else {
            return r.finish(Config::default_values());
        };
        let config = validate_config(&mut r, raw, base);
        r.finish(config)
    }

    fn default_values() -> Config {
        Config {
            path: None,
            dns: DnsConfig {
                enabled: true,
                listen: "127.0.0.1:1053".parse().unwrap(),
                zone: "cluster.local".into(),
                ttl: 5,
                forward: Vec::new(),
                forward_allow: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
                cache_size: 10_000,
                udp_sockets: std::thread::available_parallelism().map_or(1, |n| n.get()),
                forward_timeout: Duration::from_secs(2),
                tcp_idle_timeout: Duration::from_secs(10),
                tcp_max_connections: 1024,
            },
            admin: AdminConfig {
                listen: Some("127.0.0.1:9153".parse().unwrap()),
            },
            health: HealthSpec::default(),
            proxy: ProxyConfig {
                enabled: true,
                max_connections: 100_000,
                defaults: ProxySpec::default(),
                drain_timeout: None,
            },
            sources: Vec::new(),
            startup_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("cannot read file: {e}"),
        }])
    })
}

fn validate_config(r: &mut Reporter<'_>, raw: RawConfig, base: &Path) -> Config {
    let mut c = Config::default_values();
    let d = &mut c.dns;
    if let Some(v) = raw.dns.enabled {
        d.enabled = v;
    }
    if let Some(v) = &raw.dns.listen {
        d.listen = socket_addr(r, v, None).unwrap_or(d.listen);
    }
    if let Some(z) = &raw.dns.zone {
        match normalize_zone(z.get_ref()) {
            Ok(zone) => d.zone = zone,
            Err(msg) => r.error(z.span(), msg),
        }
    }
    if let Some(v) = &raw.dns.ttl {
        d.ttl = int_in(r, v, 0, 86_400, "ttl (seconds)").unwrap_or(d.ttl as i64) as u32;
    }
    if let Some(list) = &raw.dns.forward {
        d.forward = list
            .iter()
            .filter_map(|v| socket_addr(r, v, Some(53)))
            .collect();
    }
    if let Some(list) = &raw.dns.forward_allow {
        d.forward_allow = list.iter().filter_map(|v| cidr(r, v)).collect();
    }
    if let Some(v) = &raw.dns.cache_size {
        d.cache_size = int_in(r, v, 0, 10_000_000, "cache_size").unwrap_or(0) as usize;
    }
    if let Some(v) = &raw.dns.udp_sockets {
        d.udp_sockets = int_in(r, v, 1, 64, "udp_sockets").unwrap_or(1) as usize;
    }
    if let Some(v) = raw.dns.forward_timeout {
        d.forward_timeout = v;
    }
    if let Some(v) = raw.dns.tcp_idle_timeout {
        d.tcp_idle_timeout = v;
    }
    if let Some(v) = &raw.dns.tcp_max_connections {
        d.tcp_max_connections =
            int_in(r, v, 1, 1_000_000, "tcp_max_connections").unwrap_or(1) as usize;
    }
    if raw.admin.enabled == Some(false) {
        c.admin.listen = None;
    } else if let Some(v) = &raw.admin.listen {
        c.admin.listen = socket_addr(r, v, None).or(c.admin.listen);
    }
    c.health = health_spec(r, &raw.health, &HealthSpec::default());
    let p = &mut c.proxy;
    if let Some(v) = raw.proxy.enabled {
        p.enabled = v;
    }
    if let Some(v) = &raw.proxy.max_connections {
        p.max_connections = int_in(r, v, 1, 10_000_000, "max_connections").unwrap_or(1) as usize;
    }
    p.defaults = proxy_spec(
        r,
        &RawServiceProxy {
            connect_timeout: raw.proxy.connect_timeout,
            connect_attempts: raw.proxy.connect_attempts.clone(),
            idle_timeout: raw.proxy.idle_timeout,
            ..RawServiceProxy::default()
        },
        &ProxySpec::default(),
    );
    p.drain_timeout = raw.proxy.drain_timeout;
    if let Some(v) = raw.startup_timeout {
        c.startup_timeout = v;
    }
    if let Some(v) = raw.shutdown_grace {
        c.shutdown_grace = v;
    }
    for s in &raw.sources {
        match s.kind.get_ref().as_str() {
            "file" => {
                if let Some(sock) = &s.socket {
                    r.error(
                        sock.span(),
                        "`socket` belongs to a docker source, not a file source",
                    );
                }
                match &s.path {
                    Some(p) => c.sources.push(SourceConfig::File {
                        path: base.join(p.get_ref()),
                    }),
                    None => r.error(
                        s.kind.span(),
                        "a file source needs `path` (a services file or a directory of *.toml files)",
                    ),
                }
            }
            "docker" => {
                if let Some(p) = &s.path {
                    r.error(p.span(), "`path` belongs to a file source; a docker source takes `socket` and `network`");
                }
                let socket = s.socket.as_ref().map_or_else(
                    || PathBuf::from("/var/run/docker.sock"),
                    |v| PathBuf::from(v.get_ref()),
                );
                c.sources.push(SourceConfig::Docker {
                    socket,
                    network: s.network.clone(),
                });
            }
            other => r.error(
                s.kind.span(),
                format!("unknown source type `{other}`; valid types: `file`, `docker`"),
            ),
        }
    }
    let mut seen = HashMap::new();
    for (i, s) in c.sources.iter().enumerate() {
        if let Some(first) = seen.insert(s.id(), i) {
            let span = raw.sources[i].kind.span();
            r.error(
                span,
                format!(
                    "source `{}` is configured twice (also as source #{}); remove one",
                    s.id(),
                    first + 1
                ),
            );
        }
    }
    c
}

fn normalize_zone(zone: &str) -> Result<String, String> {
    let z = zone.trim_end_matches('.').to_ascii_lowercase();
    if z.is_empty() || !z.split('.').all(is_dns_label) {
        return Err(format!(
            "zone `{zone}` is not a valid domain name (labels of a-z, 0-9 and '-', e.g. `cluster.local`)"
        ));
    }
    Ok(z)
}

/// An RFC 1123 label: 1-63 of a-z, 0-9, '-', not starting or ending with '-'.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn socket_addr(
    r: &mut Reporter<'_>,
    v: &Spanned<String>,
    default_port: Option<u16>,
) -> Option<SocketAddr> {
    let s = v.get_ref();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    if let (Some(port), Ok(ip)) = (default_port, s.parse::<IpAddr>()) {
        return Some(SocketAddr::new(ip, port));
    }
    r.error(
        v.span(),
        format!(
            "`{s}` is not a socket address; write IP:PORT, e.g. `127.0.0.1:1053` or `[::1]:1053`"
        ),
    );
    None
}

fn ip_addr(r: &mut Reporter<'_>, v: &Spanned<String>, what: &str) -> Option<IpAddr> {
    match v.get_ref().parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) => {
            r.error(
                v.span(),
                format!(
                    "{what} `{}` is not an IP address; write an IPv4 or IPv6 address, e.g. `10.0.0.5` or `fd00::5`",
                    v.get_ref()
                ),
            );
            None
        }
    }
}

fn cidr(r: &mut Reporter<'_>, v: &Spanned<String>) -> Option<IpNet> {
    let s = v.get_ref();
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(IpNet::from(ip));
    }
    r.error(
        v.span(),
        format!("`{s}` is not a CIDR; write ADDRESS/PREFIX, e.g. `127.0.0.0/8` or `fd00::/8`"),
    );
    None
}

fn int_in(r: &mut Reporter<'_>, v: &Spanned<i64>, min: i64, max: i64, what: &str) -> Option<i64> {
    let n = *v.get_ref();
    if (min..=max).contains(&n) {
        Some(n)
    } else {
        r.error(
            v.span(),
            format!("{what} = {n} is out of range; allowed: {min} to {max}"),
        );
        None
    }
}

fn port(r: &mut Reporter<'_>, v: &Spanned<i64>, what: &str) -> Option<u16> {
    int_in(r, v, 1, 65535, what).map(|n| n as u16)
}

fn health_spec(r: &mut Reporter<'_>, raw: &RawHealth, base: &HealthSpec) -> HealthSpec {
    let mut h = base.clone();
    let path = raw.path.as_ref().map(|p| p.get_ref().clone());
    if let Some(p) = &raw.path
        && !p.get_ref().starts_with('/')
    {
        r.error(
            p.span(),
            format!("health path `{}` must start with `/`", p.get_ref()),
        );
    }
    let host: Option<Arc<str>> = raw.host.as_deref().map(Into::into);
    match raw.kind.as_ref().map(|k| (k.get_ref().as_str(), k.span())) {
        Some(("tcp", _)) => h.probe = ProbeKind::Tcp,
        Some(("none", _)) => h.probe = ProbeKind::None,
        Some(("http", _)) => {
            h.probe = ProbeKind::Http {
                path: path.as_deref().unwrap_or("/").into(),
                host: host.clone(),
            }
        }
        Some((other, span)) => r.error(
            span,
            format!("unknown health kind `{other}`; valid kinds: `tcp`, `http`, `none`"),
        ),
        None => {
            // Keep the inherited kind; a path or host alone adjusts an inherited http probe.
            if let ProbeKind::Http { path: p, host: hh } = &mut h.probe {
                if let Some(new) = &path {
                    *p = new.as_str().into();
                }
                if host.is_some() {
                    *hh = host.clone();
                }
            }
        }
    }
    if let Some(v) = raw.interval {
        h.interval = v;
    }
    if let Some(v) = raw.timeout {
        h.timeout = v;
    }
    if let Some(v) = raw.fast_interval {
        h.fast_interval = v;
    }
    if let Some(v) = &raw.rise {
        h.rise = int_in(r, v, 1, 100, "rise").unwrap_or(1) as u32;
    }
    if let Some(v) = &raw.fall {
        h.fall = int_in(r, v, 1, 100, "fall").unwrap_or(1) as u32;
    }
    if let Some(v) = &raw.initial_state {
        match v.get_ref().as_str() {
            "healthy" => h.start_healthy = true,
            "unhealthy" => h.start_healthy = false,
            other => r.error(
                v.span(),
                format!("unknown initial_state `{other}`; valid: `healthy`, `unhealthy`"),
            ),
        }
    }
    if let Some(v) = &raw.eject_after {
        h.eject_after =
            int_in(r, v, 0, 1000, "eject_after (0 disables ejection)").unwrap_or(0) as u32;
    }
    if let Some(v) = raw.eject_time {
        h.eject_base = v;
    }
    if let Some(v) = raw.eject_max_time {
        h.eject_max = v;
    }
    if let Some(v) = &raw.eject_max_percent {
        h.eject_max_percent = int_in(r, v, 0, 100, "eject_max_percent").unwrap_or(0) as u8;
    }
    let zero = Duration::ZERO;
    if h.interval == zero || h.timeout == zero || h.fast_interval == zero {
        let span = raw.kind.as_ref().map_or(0..0, |k| k.span());
        r.error(
            span,
            "health interval, timeout and fast_interval must be above 0",
        );
    }
    h
}

#[derive(Debug, Default, Clone)]
struct RawServiceProxy {
    connect_timeout: Option<Duration>,
    connect_attempts: Option<Spanned<i64>>,
    idle_timeout: Option<Duration>,
    max_connections: Option<Spanned<i64>>,
    proxy_protocol: Option<Spanned<String>>,
    close_on_removal: Option<bool>,
}

fn proxy_spec(r: &mut Reporter<'_>, raw: &RawServiceProxy, base: &ProxySpec) -> ProxySpec {
    let mut p = base.clone();
    if let Some(v) = raw.connect_timeout {
        p.connect_timeout = v;
    }
    if let Some(v) = &raw.connect_attempts {
        p.connect_attempts = int_in(r, v, 1, 100, "connect_attempts").unwrap_or(1) as u32;
    }
    if let Some(v) = raw.idle_timeout {
        p.idle_timeout = v;
    }
    if let Some(v) = &raw.max_connections {
        p.max_connections = int_in(r, v, 1, 10_000_000, "max_connections").map(|n| n as u32);
    }
    if let Some(v) = &raw.proxy_protocol {
        p.proxy_protocol = match v.get_ref().as_str() {
            "v1" => Some(ProxyProtocol::V1),
            "v2" => Some(ProxyProtocol::V2),
            "none" | "" => None,
            other => {
                r.error(
                    v.span(),
                    format!("unknown proxy_protocol `{other}`; valid: `v1`, `v2`, `none`"),
                );
                None
            }
        };
    }
    if let Some(v) = raw.close_on_removal {
        p.close_on_removal = v;
    }
    p
}

// ===== services files =====

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServicesFile {
    #[serde(default)]
    service: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    namespace: Option<Spanned<String>>,
    vip: Option<Spanned<String>>,
    balance: Option<Spanned<String>>,
    #[serde(default)]
    port: Vec<RawPort>,
    #[serde(default)]
    endpoint: Vec<RawEndpoint>,
    health: Option<RawHealth>,
    fail_open: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    connect_attempts: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    max_connections: Option<Spanned<i64>>,
    proxy_protocol: Option<Spanned<String>>,
    close_on_removal: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Option<Spanned<String>>,
    port: Spanned<i64>,
    target_port: Option<Spanned<i64>>,
    protocol: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    ip: Spanned<String>,
    hostname: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    ready: Option<bool>,
    port: Option<Spanned<i64>>,
}

/// Where a service or listener was defined, for "first defined at" messages.
#[derive(Clone, Debug)]
struct Origin {
    path: PathBuf,
    line: usize,
    col: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.col)
    }
}

/// Cross-file checks: duplicate services and listen addresses claimed twice.
#[derive(Debug, Default)]
pub struct ServicesIndex {
    services: HashMap<ServiceKey, Origin>,
    listeners: HashMap<SocketAddr, (ServiceKey, Origin)>,
}

impl ServicesIndex {
    /// Removes and returns what `path` claimed, so the file can be re-read.
    pub fn take_file(&mut self, path: &Path) -> ServicesIndex {
        let mut taken = ServicesIndex::default();
        self.services.retain(|k, o| {
            if o.path == path {
                taken.services.insert(k.clone(), o.clone());
                false
            } else {
                true
            }
        });
        self.listeners.retain(|a, (k, o)| {
            if o.path == path {
                taken.listeners.insert(*a, (k.clone(), o.clone()));
                false
            } else {
                true
            }
        });
        taken
    }

    /// Puts back what [`take_file`](Self::take_file) removed.
    pub fn merge(&mut self, other: ServicesIndex) {
        self.services.extend(other.services);
        self.listeners.extend(other.listeners);
    }
}

/// Parses one services file; `index` spots duplicates across files.
pub fn parse_services(
    text: &str,
    path: &Path,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Result<Vec<ServiceSpec>, ConfigErrors> {
    let mut r = Reporter::new(path, text);
    let Some(raw) = r.parse::<RawServicesFile>() else {
        return r.finish(Vec::new());
    };
    let specs: Vec<ServiceSpec> = raw
        .service
        .iter()
        .filter_map(|s| validate_service(&mut r, s, defaults, index))
        .collect();
    r.finish(specs)
}

/// Reads and parses one services file.
pub fn load_services(
    path: &Path,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Result<Vec<ServiceSpec>, ConfigErrors> {
    let text = read_file(path)?;
    parse_services(&text, path, defaults, index)
}

/// The `*.toml` files a file source reads: the file itself, or the
/// directory's `*.toml` files in name order.
pub fn services_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
            .collect();
        files.sort();
        Ok(files)
    } else {
        std::fs::metadata(path)?;
        Ok(vec![path.to_path_buf()])
    }
}

fn label(r: &mut Reporter<'_>, v: &Spanned<String>, what: &str) -> Option<Arc<str>> {
    let s = v.get_ref().to_ascii_lowercase();
    if is_dns_label(&s) {
        Some(s.into())
    } else {
        r.error(
            v.span(),
            format!(
                "{what} `{}` is not a valid DNS label; use 1-63 letters, digits and '-', not starting or ending with '-'",
                v.get_ref()
            ),
        );
        None
    }
}

fn validate_service(
    r: &mut Reporter<'_>,
    raw: &RawService,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Option<ServiceSpec> {
    let errors_before = r.errors.len();
    let name = label(r, &raw.name, "service name");
    let namespace = match &raw.namespace {
        Some(ns) => label(r, ns, "namespace"),
        None => Some("default".into()),
    };
    let (Some(name), Some(namespace)) = (name, namespace) else {
        return None;
    };
    let key = ServiceKey { namespace, name };
    let (line, col) = r.position(raw.name.span().start);
    let origin = Origin {
        path: r.path.to_path_buf(),
        line,
        col,
    };
    if let Some(first) = index.services.get(&key) {
        r.error(
            raw.name.span(),
            format!("duplicate service `{key}` (first defined at {first}); rename one or set another namespace"),
        );
        return None;
    }
    index.services.insert(key.clone(), origin.clone());
    let mut spec = ServiceSpec::new(key.clone());
    spec.vip = raw.vip.as_ref().and_then(|v| ip_addr(r, v, "vip"));
    if let Some(b) = &raw.balance {
        match Balance::ALL.iter().find(|(n, _)| *n == b.get_ref()) {
            Some((_, policy)) => spec.balance = *policy,
            None => r.error(
                b.span(),
                format!(
                    "unknown balance `{}`; valid: {}",
                    b.get_ref(),
                    Balance::ALL.map(|(n, _)| format!("`{n}`")).join(", ")
                ),
            ),
        }
    }
    let mut port_names = HashMap::new();
    for p in &raw.port {
        let Some(number) = port(r, &p.port, "port") else {
            continue;
        };
        let target_port = match &p.target_port {
            Some(t) => port(r, t, "target_port").unwrap_or(number),
            None => number,
        };
        let protocol = match &p.protocol {
            None => Protocol::Tcp,
            Some(v) => match v.get_ref().to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    r.error(
                        v.span(),
                        format!("unknown protocol `{other}`; valid: `tcp`, `udp`"),
                    );
                    Protocol::Tcp
                }
            },
        };
        let name: Arc<str> = match &p.name {
            Some(n) => label(r, n, "port name").unwrap_or_else(|| "".into()),
            None => "".into(),
        };
        if !name.is_empty()
            && let Some(n) = &p.name
            && port_names.insert(name.clone(), ()).is_some()
        {
            r.error(
                n.span(),
                format!("port name `{name}` is used twice in service `{key}`"),
            );
        }
        let listen = p.listen.as_ref().and_then(|v| socket_addr(r, v, None));
        spec.ports.push(Port {
            name,
            port: number,
            target_port,
            protocol,
            listen,
        });
        // Listener claims: an explicit listen, and vip:port for TCP ports.
        let mut claims = Vec::new();
        if let Some(l) = listen {
            claims.push((l, p.listen.as_ref().unwrap().span()));
        }
        if let (Some(vip), Protocol::Tcp) = (spec.vip, protocol) {
            claims.push((SocketAddr::new(vip, number), p.port.span()));
        }
        for (addr, span) in claims {
            let (line, col) = r.position(span.start);
            let here = Origin {
                path: r.path.to_path_buf(),
                line,
                col,
            };
            match index.listeners.get(&addr) {
                Some((other, first)) if *other != key => r.error(
                    span,
                    format!(
                        "listen address {addr} is already claimed by service `{other}` (at {first}); give each service its own address"
                    ),
                ),
                Some(_) => {}
                None => {
                    index.listeners.insert(addr, (key.clone(), here));
                }
            }
        }
    }
    let mut ips = HashMap::new();
    let mut hostnames = HashMap::new();
    for e in &raw.endpoint {
        let Some(ip) = ip_addr(r, &e.ip, "endpoint ip") else {
            continue;
        };
        if ips.insert(ip, ()).is_some() {
            r.error(
                e.ip.span(),
                format!(
                    "endpoint {ip} is listed twice in service `{key}`; list each endpoint once"
                ),
            );
            continue;
        }
        let mut ep = Endpoint::new(ip);
        if let Some(h) = &e.hostname {
            ep.hostname = label(r, h, "endpoint hostname");
            if let Some(name) = &ep.hostname
                && hostnames.insert(name.clone(), ()).is_some()
            {
                r.error(
                    h.span(),
                    format!("hostname `{name}` is used twice in service `{key}`"),
                );
            }
        }
        if let Some(w) = &e.weight {
            ep.weight = int_in(r, w, 1, 65535, "weight").unwrap_or(1) as u32;
        }
        if let Some(ready) = e.ready {
            ep.ready = ready;
        }
        if let Some(p) = &e.port {
            ep.port = port(r, p, "endpoint port");
        }
        spec.endpoints.push(ep);
    }
    spec.health = match &raw.health {
        Some(h) => health_spec(r, h, &defaults.health),
        None => defaults.health.clone(),
    };
    spec.proxy = proxy_spec(
        r,
        &RawServiceProxy {
            connect_timeout: raw.connect_timeout,
            connect_attempts: raw.connect_attempts.clone(),
            idle_timeout: raw.idle_timeout,
            max_connections: raw.max_connections.clone(),
            proxy_protocol: raw.proxy_protocol.clone(),
            close_on_removal: raw.close_on_removal,
        },
        &defaults.proxy,
    );
    spec.fail_open = raw.fail_open.unwrap_or(false);
    (r.errors.len() == errors_before).then_some(spec)
}

/// Reads every services file of a `file` source (`path` is one file or a
/// directory of `*.toml` files), spotting duplicates through `index`.
/// Returns each file's services, or every error found.
pub fn load_services_path(
    path: &Path,
    defaults: &ServiceDefaults,
    index: &mut ServicesIndex,
) -> Result<std::collections::BTreeMap<PathBuf, Vec<ServiceSpec>>, ConfigErrors> {
    let files = services_files(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("cannot read services path: {e}"),
        }])
    })?;
    let mut loaded = std::collections::BTreeMap::new();
    let mut errors = Vec::new();
    for file in files {
        match load_services(&file, defaults, index) {
            Ok(specs) => {
                loaded.insert(file, specs);
            }
            Err(e) => errors.extend(e.0),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Validates a main config and every services file it names, as `beacon
/// check` does. Returns every error found.
pub fn check(path: &Path) -> Result<(Config, usize), ConfigErrors> {
    let config = Config::load(path)?;
    let defaults = config.service_defaults();
    let mut index = ServicesIndex::default();
    let mut errors = Vec::new();
    let mut services = 0;
    for source in &config.sources {
        let SourceConfig::File { path } = source else {
            continue;
        };
        match load_services_path(path, &defaults, &mut index) {
            Ok(files) => services += files.values().map(Vec::len).sum::<usize>(),
            Err(e) => errors.extend(e.0),
        }
    }
    if errors.is_empty() {
        Ok((config, services))
    } else {
        Err(ConfigErrors(errors))
    }
}

#[cfg(test)]
mod tests;
