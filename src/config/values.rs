//! Single values every table uses (addresses, CIDRs, bounded integers, DNS
//! labels): each parser reports a bad value at its position and says what
//! is allowed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use toml::Spanned;

use super::report::Reporter;

/// An RFC 1123 label: 1-63 of a-z, 0-9, '-', not starting or ending with '-'.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS label, lower-cased.
pub(super) fn label(r: &mut Reporter<'_>, v: &Spanned<String>, what: &str) -> Option<Arc<str>> {
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

/// A zone name, lower-case and without the trailing dot.
pub(super) fn normalize_zone(zone: &str) -> Result<String, String> {
    let z = zone.trim_end_matches('.').to_ascii_lowercase();
    if z.is_empty() || !z.split('.').all(is_dns_label) {
        return Err(format!(
            "zone `{zone}` is not a valid domain name (labels of a-z, 0-9 and '-', e.g. `cluster.local`)"
        ));
    }
    Ok(z)
}

/// `IP:PORT`, or a bare IP when there is a `default_port`.
pub(super) fn socket_addr(
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

pub(super) fn ip_addr(r: &mut Reporter<'_>, v: &Spanned<String>, what: &str) -> Option<IpAddr> {
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

/// A vip: an address one service answers and listens on, so not the
/// unspecified address (every address), multicast or broadcast.
pub(super) fn vip(r: &mut Reporter<'_>, v: &Spanned<String>) -> Option<IpAddr> {
    let ip = ip_addr(r, v, "vip")?;
    let why = match ip {
        _ if ip.is_unspecified() => Some("the unspecified address (it means every address)"),
        _ if ip.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        _ => None,
    };
    if let Some(why) = why {
        r.error(
            v.span(),
            format!(
                "vip `{ip}` is {why}; give the service an address of its own, e.g. `10.96.0.10`"
            ),
        );
        return None;
    }
    Some(ip)
}

/// A duration that must be above zero (a zero timeout or interval would
/// fail every connect or spin a timer).
pub(super) fn positive(
    r: &mut Reporter<'_>,
    v: &Spanned<super::raw::HumanDuration>,
    what: &str,
) -> Option<std::time::Duration> {
    let d = **v.get_ref();
    if d.is_zero() {
        r.error(
            v.span(),
            format!("{what} must be above 0; write a duration such as `500ms` or `2s`"),
        );
        return None;
    }
    Some(d)
}

/// `ADDRESS/PREFIX`, or a bare address (a /32 or /128).
pub(super) fn cidr(r: &mut Reporter<'_>, v: &Spanned<String>) -> Option<IpNet> {
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

pub(super) fn int_in(
    r: &mut Reporter<'_>,
    v: &Spanned<i64>,
    min: i64,
    max: i64,
    what: &str,
) -> Option<i64> {
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

pub(super) fn port(r: &mut Reporter<'_>, v: &Spanned<i64>, what: &str) -> Option<u16> {
    int_in(r, v, 1, 65535, what).map(|n| n as u16)
}
