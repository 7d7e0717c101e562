//! `[health]` (the defaults) and `[service.health]` (one service's
//! overrides): one table, one function from it to a [`HealthSpec`].

use std::sync::Arc;
use std::time::Duration;

use crate::model::{HealthSpec, ProbeKind};

use super::raw::RawHealth;
use super::report::Reporter;
use super::values::int_in;

/// `base` with what `raw` sets: the main config's `[health]` over
/// [`HealthSpec::default`], a service's `[service.health]` over `[health]`.
pub(super) fn inherit(r: &mut Reporter<'_>, raw: &RawHealth, base: &HealthSpec) -> HealthSpec {
    let mut h = base.clone();
    h.probe = probe(r, raw, &base.probe);
    h.interval = raw.interval.unwrap_or(h.interval);
    h.timeout = raw.timeout.unwrap_or(h.timeout);
    h.fast_interval = raw.fast_interval.unwrap_or(h.fast_interval);
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
