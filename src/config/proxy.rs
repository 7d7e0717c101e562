//! `[proxy]` → [`ProxyConfig`], and the proxy keys a service inherits from
//! it → [`ProxySpec`] (one function for both places).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::{ProxyProtocol, ProxySpec};

use super::raw::{RawProxy, RawProxyKeys};
use super::report::Reporter;
use super::values::{int_in, positive};

#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    pub enabled: bool,
    /// Cap on concurrent proxied connections across all services.
    pub max_connections: usize,
    /// Defaults for every service.
    pub defaults: ProxySpec,
    /// On shutdown, how long live connections may finish (default: the grace).
    pub drain_timeout: Option<Duration>,
    /// One line per finished connection (None: off, the default).
    pub access_log: Option<AccessLogTarget>,
    /// An interface beacon owns and keeps every served vip on (None: vips
    /// are the operator's business).
    pub vip_interface: Option<String>,
    /// Cap on UDP flows (per UDP listener).
    pub udp_max_flows: usize,
    /// When TCP bytes move by splice(2).
    pub splice: SpliceMode,
}

/// `[proxy] splice`: when a TCP direction moves its bytes with splice(2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpliceMode {
    /// Small reads are copied through a per-thread buffer; a direction
    /// whose read fills it (bulk) is spliced from then on (the default; as
    /// HAProxy's `option splice-auto`).
    #[default]
    Auto,
    /// Splice from the first byte.
    Always,
    /// Never splice: copy in userspace.
    Never,
}

/// Where the access log goes (`[proxy] access_log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// `"stderr"`: beside the process log.
    Stderr,
    /// Any other text: a file, appended to (created when missing);
    /// relative to the config file.
    File(PathBuf),
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: true,
            max_connections: 100_000,
            defaults: ProxySpec::default(),
            drain_timeout: None,
            access_log: None,
            vip_interface: None,
            udp_max_flows: 65_536,
            splice: SpliceMode::Auto,
        }
    }
}

pub(super) fn validate(r: &mut Reporter<'_>, raw: &RawProxy, base: &Path) -> ProxyConfig {
    let mut p = ProxyConfig::default();
    p.enabled = raw.own.enabled.unwrap_or(p.enabled);
    if let Some(v) = &raw.own.max_connections {
        p.max_connections = int_in(r, v, 1, 10_000_000, "max_connections").unwrap_or(1) as usize;
    }
    if let Some(v) = &raw.own.udp_max_flows {
        p.udp_max_flows = int_in(r, v, 1, 10_000_000, "udp_max_flows").unwrap_or(1) as usize;
    }
    p.defaults = inherit(r, &raw.shared, &p.defaults);
    p.drain_timeout = raw.own.drain_timeout;
    p.access_log = raw
        .own
        .access_log
        .as_ref()
        .and_then(|v| match v.get_ref().as_str() {
            "stderr" => Some(AccessLogTarget::Stderr),
            "" => {
                r.error(
                v.span(),
                "access_log is `stderr` or a file path; leave it out to turn the access log off",
            );
                None
            }
            path => Some(AccessLogTarget::File(base.join(path))),
        });
    if let Some(v) = &raw.own.splice {
        p.splice = match v.get_ref().as_str() {
            "auto" => SpliceMode::Auto,
            "always" => SpliceMode::Always,
            "never" => SpliceMode::Never,
            other => {
                r.error(
                    v.span(),
                    format!(
                        "unknown splice `{other}`; valid: `auto` (the default), `always`, `never`"
                    ),
                );
                SpliceMode::Auto
            }
        };
    }
    p.vip_interface = raw.own.vip_interface.as_ref().and_then(|v| {
        let name = v.get_ref();
        let valid = (1..=15).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid {
            r.error(
                v.span(),
                format!("vip_interface `{name}` is no interface name: 1 to 15 letters, digits, `-`, `_` or `.`"),
            );
        }
        valid.then(|| name.clone())
    });
    p
}

/// `base` with what `raw` sets: `[proxy]` over [`ProxySpec::default`], a
/// service's keys over `[proxy]`.
pub(super) fn inherit(r: &mut Reporter<'_>, raw: &RawProxyKeys, base: &ProxySpec) -> ProxySpec {
    let mut p = base.clone();
    if let Some(v) = &raw.connect_timeout {
        p.connect_timeout = positive(r, v, "connect_timeout").unwrap_or(p.connect_timeout);
    }
    if let Some(v) = &raw.connect_attempts {
        p.connect_attempts = int_in(r, v, 1, 100, "connect_attempts").unwrap_or(1) as u32;
    }
    if let Some(v) = &raw.idle_timeout {
        p.idle_timeout = positive(r, v, "idle_timeout").unwrap_or(p.idle_timeout);
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
    p.close_on_removal = raw.close_on_removal.unwrap_or(p.close_on_removal);
    // `"0s"` turns an inherited value off.
    let off_at_zero = |v: &toml::Spanned<super::raw::HumanDuration>| {
        let d = **v.get_ref();
        (!d.is_zero()).then_some(d)
    };
    if let Some(v) = &raw.slow_start {
        p.slow_start = off_at_zero(v);
    }
    if let Some(v) = &raw.client_fin_timeout {
        p.client_fin_timeout = off_at_zero(v);
    }
    if let Some(v) = &raw.server_fin_timeout {
        p.server_fin_timeout = off_at_zero(v);
    }
    if let Some(v) = &raw.udp_idle_timeout {
        p.udp_idle_timeout = positive(r, v, "udp_idle_timeout").unwrap_or(p.udp_idle_timeout);
    }
    p
}

/// A service's own cap on concurrent connections over the inherited one.
pub(super) fn service_cap(
    r: &mut Reporter<'_>,
    raw: Option<&toml::Spanned<i64>>,
    base: Option<u32>,
) -> Option<u32> {
    match raw {
        Some(v) => int_in(r, v, 1, 10_000_000, "max_connections").map(|n| n as u32),
        None => base,
    }
}
