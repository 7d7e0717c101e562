//! The main config file → [`Config`]: each table validated by its module
//! (`dns`, `health`, `proxy`, `sources`; `[admin]` and the top-level keys
//! here).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::HealthSpec;

use super::dns::{self, DnsConfig};
use super::health;
use super::proxy::{self, ProxyConfig};
use super::raw::{RawAdmin, RawConfig};
use super::report::{ConfigError, ConfigErrors, Reporter, read_file};
use super::service::ServiceDefaults;
use super::sources::{self, SourceConfig};
use super::values::socket_addr;

/// The text of `config/beacon.toml`, used when `run` gets no `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/beacon.toml");

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
    /// Valid but dangerous settings (an open resolver), positioned:
    /// `check` prints them, `run` logs them.
    pub warnings: Vec<ConfigError>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
}

impl Config {
    /// beacon's own addresses a proxy listener must not take.
    pub fn reserved_addrs(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut out = Vec::new();
        if self.dns.enabled {
            out.push(("DNS", self.dns.listen));
        }
        out.extend(self.admin.listen.map(|a| ("admin", a)));
        out
    }

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
        let config = validate(&mut r, raw, base);
        r.finish(config)
    }

    fn default_values() -> Config {
        Config {
            path: None,
            dns: DnsConfig::default(),
            admin: AdminConfig {
                listen: Some("127.0.0.1:9153".parse().unwrap()),
            },
            health: HealthSpec::default(),
            proxy: ProxyConfig::default(),
            sources: Vec::new(),
            startup_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            warnings: Vec::new(),
        }
    }
}

/// Every table in file order; errors are collected, not stopped at.
fn validate(r: &mut Reporter<'_>, raw: RawConfig, base: &Path) -> Config {
    let mut c = Config::default_values();
    c.dns = dns::validate(r, &raw.dns, base);
    c.admin = admin(r, &raw.admin, c.admin);
    c.health = health::inherit(r, &raw.health, &HealthSpec::default());
    c.proxy = proxy::validate(r, &raw.proxy, base);
    c.startup_timeout = raw.startup_timeout.unwrap_or(c.startup_timeout);
    c.shutdown_grace = raw.shutdown_grace.unwrap_or(c.shutdown_grace);
    c.sources = sources::validate(r, &raw.sources, base);
    c.warnings = r.take_warnings();
    c
}

fn admin(r: &mut Reporter<'_>, raw: &RawAdmin, default: AdminConfig) -> AdminConfig {
    if raw.enabled == Some(false) {
        AdminConfig { listen: None }
    } else if let Some(v) = &raw.listen {
        AdminConfig {
            listen: socket_addr(r, v, None).or(default.listen),
        }
    } else {
        default
    }
}
