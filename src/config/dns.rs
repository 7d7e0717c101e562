//! `[dns]` → [`DnsConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::raw::RawDns;
use super::report::Reporter;
use super::resolv;
use super::values::{cidr, int_in, normalize_zone, positive, socket_addr};

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
    /// Datagrams per `recvmmsg`/`sendmmsg` on each UDP socket (1: one
    /// `recvfrom`-like call per query); default 64, the best size at
    /// saturation in the tuning runs (BENCHMARKS.md).
    pub udp_batch: usize,
    pub forward_timeout: Duration,
    /// Failures in a row (timeout, socket error, unreadable reply) that
    /// mark an upstream down; 0: never (CoreDNS's `max_fails`).
    pub max_fails: u32,
    /// How often a down upstream is sent `. IN NS` (CoreDNS's
    /// `health_check`); any reply marks it up.
    pub health_check: Duration,
    /// A forwarded answer asked for this many times during its life is
    /// refreshed in the background when asked in the last 10 % of its
    /// TTL; 0: no prefetch.
    pub prefetch: u32,
    pub tcp_idle_timeout: Duration,
    pub tcp_max_connections: usize,
    /// After SIGTERM: how long DNS keeps answering (with `/readyz` at 503)
    /// before it stops, as CoreDNS's `health lameduck`. Zero: stop at once.
    pub lameduck: Duration,
    /// Walk a known client's search path for it (CoreDNS's `autopath`).
    pub autopath: bool,
    /// DNS over TLS (RFC 7858) on this address; needs `cert` and `key`.
    pub tls_listen: Option<SocketAddr>,
    /// DNS over HTTPS (RFC 8484, `/dns-query`) on this address.
    pub https_listen: Option<SocketAddr>,
    /// PEM certificate chain and private key of DoT and DoH (relative to
    /// the config file); re-read when they change.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: true,
            listen: "127.0.0.1:1053".parse().unwrap(),
            zone: "cluster.local".into(),
            ttl: 5,
            forward: Vec::new(),
            forward_allow: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            cache_size: 10_000,
            udp_sockets: std::thread::available_parallelism().map_or(1, |n| n.get()),
            udp_batch: 64,
            forward_timeout: Duration::from_secs(2),
            max_fails: 2,
            health_check: Duration::from_millis(500),
            prefetch: 2,
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_connections: 1024,
            lameduck: Duration::from_secs(5),
            autopath: false,
            tls_listen: None,
            https_listen: None,
            cert: None,
            key: None,
        }
    }
}

pub(super) fn validate(r: &mut Reporter<'_>, raw: &RawDns, base: &Path) -> DnsConfig {
    let mut d = DnsConfig::default();
    d.enabled = raw.enabled.unwrap_or(d.enabled);
    if let Some(v) = &raw.listen {
        d.listen = socket_addr(r, v, None).unwrap_or(d.listen);
    }
    if let Some(z) = &raw.zone {
        match normalize_zone(z.get_ref()) {
            Ok(zone) => d.zone = zone,
            Err(msg) => r.error(z.span(), msg),
        }
    }
    if let Some(v) = &raw.ttl {
        d.ttl = int_in(r, v, 0, 86_400, "ttl (seconds)").unwrap_or(d.ttl as i64) as u32;
    }
    if let Some(list) = &raw.forward {
        for v in list {
            if v.get_ref().contains('/') {
                for a in resolv_conf(r, v, base, d.listen) {
                    if !d.forward.contains(&a) {
                        d.forward.push(a);
                    }
                }
            } else if let Some(a) = socket_addr(r, v, Some(53)) {
                d.forward.push(a);
            }
        }
    }
    if let Some(list) = &raw.forward_allow {
        d.forward_allow = list.iter().filter_map(|v| cidr(r, v)).collect();
        open_resolver(r, list, &d);
    }
    if let Some(v) = &raw.cache_size {
        d.cache_size = int_in(r, v, 0, 10_000_000, "cache_size").unwrap_or(0) as usize;
    }
    if let Some(v) = &raw.udp_sockets {
        d.udp_sockets = int_in(r, v, 1, 64, "udp_sockets").unwrap_or(1) as usize;
    }
    if let Some(v) = &raw.udp_batch {
        d.udp_batch = int_in(r, v, 1, 256, "udp_batch").unwrap_or(1) as usize;
    }
    if let Some(v) = &raw.forward_timeout {
        d.forward_timeout = positive(r, v, "forward_timeout").unwrap_or(d.forward_timeout);
    }
    if let Some(v) = &raw.max_fails {
        d.max_fails = int_in(r, v, 0, 1000, "max_fails").unwrap_or(d.max_fails as i64) as u32;
    }
    if let Some(v) = &raw.health_check {
        d.health_check = positive(r, v, "health_check").unwrap_or(d.health_check);
    }
    if let Some(v) = &raw.prefetch {
        d.prefetch = int_in(r, v, 0, 1_000_000, "prefetch").unwrap_or(d.prefetch as i64) as u32;
    }
    if let Some(v) = &raw.tcp_idle_timeout {
        d.tcp_idle_timeout = positive(r, v, "tcp_idle_timeout").unwrap_or(d.tcp_idle_timeout);
    }
    if let Some(v) = &raw.tcp_max_connections {
        d.tcp_max_connections =
            int_in(r, v, 1, 1_000_000, "tcp_max_connections").unwrap_or(1) as usize;
    }
    d.autopath = raw.autopath.unwrap_or(d.autopath);
    if let Some(v) = &raw.lameduck {
        d.lameduck = **v.get_ref();
    }
    encrypted(r, raw, base, &mut d);
    d
}

/// A `forward` entry that is a path: the `nameserver`s of that resolv.conf
/// (read at load and at each reload), beacon's own address skipped.
fn resolv_conf(
    r: &mut Reporter<'_>,
    v: &toml::Spanned<String>,
    base: &Path,
    listen: SocketAddr,
) -> Vec<SocketAddr> {
    let path = base.join(v.get_ref());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            r.error(
                v.span(),
                format!(
                    "cannot read resolv.conf {}: {e} (a `forward` entry with a `/` is a \
                     resolv.conf path; an upstream is ADDR or ADDR:PORT)",
                    path.display()
                ),
            );
            return Vec::new();
        }
    };
    let found = resolv::nameservers(&text, listen);
    for (line, word) in &found.bad {
        r.warn(
            v.span(),
            format!(
                "{}:{line}: nameserver {word:?} is not an IP address beacon can send to; skipped",
                path.display()
            ),
        );
    }
    for own in &found.own {
        r.warn(
            v.span(),
            format!(
                "{}: nameserver {own} is beacon itself ([dns] listen {listen}); skipped",
                path.display()
            ),
        );
    }
    if found.upstreams.is_empty() {
        let why = match found.own.as_slice() {
            [] => "it has no usable `nameserver` line".to_string(),
            own => format!(
                "{} is beacon itself ([dns] listen {listen})",
                own.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        r.error(
            v.span(),
            format!(
                "{} names no upstream beacon can forward to: {why}; list upstreams in \
                 `forward`, or a resolv.conf that does not point at beacon",
                path.display()
            ),
        );
    }
    found.upstreams
}

/// `tls_listen`, `https_listen`, `cert`, `key`: a listener needs both files.
fn encrypted(r: &mut Reporter<'_>, raw: &RawDns, base: &Path, d: &mut DnsConfig) {
    d.tls_listen = raw
        .tls_listen
        .as_ref()
        .and_then(|v| socket_addr(r, v, None));
    d.https_listen = raw
        .https_listen
        .as_ref()
        .and_then(|v| socket_addr(r, v, None));
    d.cert = raw.cert.as_ref().map(|v| base.join(v.get_ref()));
    d.key = raw.key.as_ref().map(|v| base.join(v.get_ref()));
    for v in [&raw.tls_listen, &raw.https_listen].into_iter().flatten() {
        if d.cert.is_none() || d.key.is_none() {
            r.error(
                v.span(),
                "DNS over TLS/HTTPS needs `cert` and `key` (PEM files) in [dns]",
            );
        }
    }
}

/// Forwarding for every client on an address others can reach makes an
/// open resolver (an amplifier for anyone on the internet): warned loudly
/// at the entry that allows everyone.
fn open_resolver(r: &mut Reporter<'_>, list: &[toml::Spanned<String>], d: &DnsConfig) {
    if d.listen.ip().is_loopback() || d.forward.is_empty() {
        return;
    }
    let everyone = list
        .iter()
        .zip(&d.forward_allow)
        .find(|(_, net)| net.prefix_len() == 0);
    if let Some((v, net)) = everyone {
        r.warn(
            v.span(),
            format!(
                "OPEN RESOLVER: forward_allow {net} lets anyone forward through beacon on {}; \
                 list only your clients' networks (e.g. `10.0.0.0/8`) or listen on loopback",
                d.listen
            ),
        );
    }
}
