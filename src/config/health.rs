//! `[health]` (the defaults) and `[service.health]` (one service's
//! overrides): one table, one function from it to a [`HealthSpec`].

use std::sync::Arc;
use std::time::Duration;

use crate::model::{HealthSpec, ProbeKind};

use super::raw::{HumanDuration, RawHealth};
use super::report::Reporter;
use super::values::{int_in, positive};

/// `base` with what `raw` sets: the main config's `[health]` over
/// [`HealthSpec::default`], a service's `[service.health]` over `[health]`.
pub(super) fn inherit(r: &mut Reporter<'_>, raw: &RawHealth, base: &HealthSpec) -> HealthSpec {
    let mut h = base.clone();
    h.probe = probe(r, raw, &base.probe);
    let mut set = |v: &Option<toml::Spanned<HumanDuration>>, what: &str, d: &mut Duration| {
        if let Some(v) = v {
            *d = positive(r, v, what).unwrap_or(*d);
        }
    };
    set(&raw.interval, "health interval", &mut h.interval);
    set(&raw.timeout, "health timeout", &mut h.timeout);
    set(
        &raw.fast_interval,
        "health fast_interval",
        &mut h.fast_interval,
    );
    timeout_within_interval(r, raw, &h);
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
    h.eject_base = raw.eject_time.unwrap_or(h.eject_base);
    h.eject_max = raw.eject_max_time.unwrap_or(h.eject_max);
    if let Some(v) = &raw.eject_max_percent {
        h.eject_max_percent = int_in(r, v, 0, 100, "eject_max_percent").unwrap_or(0) as u8;
    }
    h
}

/// A probe that may run longer than its interval overlaps the next one:
/// the timeout must not exceed the interval. Reported where this table
/// sets one of them.
fn timeout_within_interval(r: &mut Reporter<'_>, raw: &RawHealth, h: &HealthSpec) {
    if h.timeout <= h.interval {
        return;
    }
    let at = [&raw.timeout, &raw.interval].into_iter().flatten().next();
    let Some(at) = at else {
        return;
    };
    r.error(
        at.span(),
        format!(
            "health timeout ({}) is above the interval ({}); probes would overlap. \
             Make timeout at most the interval",
            humantime::format_duration(h.timeout),
            humantime::format_duration(h.interval),
        ),
    );
}

/// The probe `raw` asks for; without a `kind`, the inherited one (a `path`
/// or `host` alone adjusts an inherited http probe).
fn probe(r: &mut Reporter<'_>, raw: &RawHealth, base: &ProbeKind) -> ProbeKind {
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
        Some(("tcp", _)) => ProbeKind::Tcp,
        Some(("none", _)) => ProbeKind::None,
        Some(("http", _)) => ProbeKind::Http {
            path: path.as_deref().unwrap_or("/").into(),
            host,
        },
        Some((other, span)) => {
            r.error(
                span,
                format!("unknown health kind `{other}`; valid kinds: `tcp`, `http`, `none`"),
            );
            base.clone()
        }
        None => {
            let mut probe = base.clone();
            if let ProbeKind::Http { path: p, host: h } = &mut probe {
                if let Some(new) = &path {
                    *p = new.as_str().into();
                }
                if host.is_some() {
                    *h = host;
                }
            }
            probe
        }
    }
}
