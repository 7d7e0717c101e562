//! The event history: what changed between two consecutive snapshots, as
//! [`ChangeEvent`]s for people, kept in a bounded ring in the snapshot
//! (`/v1/events`, the status page, `beacon status SERVICE`).
//!
//! Pure: the registry loop calls [`diff`] with the services that changed
//! and the clock's reading, then [`record`] to append and log them. A leaf:
//! uses nothing else of `registry/`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{ChangeEvent, EndpointState, ServiceKey, ServiceState, Snapshot};

/// Events kept; older ones fall off the front.
pub const CAPACITY: usize = 4096;

/// The events of going from `prev` to `next`: per service in `changed`,
/// and per source whose connection moved. `version` is `next`'s.
pub fn diff(
    prev: &Snapshot,
    next: &Snapshot,
    changed: &[ServiceKey],
    version: u64,
    now: SystemTime,
) -> Vec<ChangeEvent> {
    let time: Arc<str> = humantime::format_rfc3339_millis(now).to_string().into();
    let mut out = Vec::new();
    let mut push = |kind: &'static str,
                    service: Option<&ServiceKey>,
                    endpoint: Option<IpAddr>,
                    source: Option<&Arc<str>>,
                    reason: Arc<str>| {
        out.push(ChangeEvent {
            version,
            time: time.clone(),
            kind,
            service: service.map(|k| k.to_string().into()),
            endpoint,
            source: source.cloned(),
            reason,
        });
    };
    for (id, status) in &next.sources {
        let was = prev.sources.get(id).map(|s| s.connected);
        if was != Some(status.connected) {
            let kind = if status.connected {
                "source_connected"
            } else {
                "source_lost"
            };
            if status.connected || was.is_some() {
                push(kind, None, None, Some(id), status.reason.clone());
            }
        }
    }
    for key in changed {
        let before = prev.services.get(key);
        let after = next.services.get(key);
        match (before, after) {
            (None, Some(s)) => {
                let reason = format!(
                    "{} endpoint(s), {} serving",
                    s.endpoints.len(),
                    s.serving().count()
                );
                push(
                    "service_added",
                    Some(key),
                    None,
                    Some(&s.source),
                    reason.into(),
                );
            }
            (Some(s), None) => push(
                "service_removed",
                Some(key),
                None,
                Some(&s.source),
                "no source names it".into(),
            ),
            (Some(a), Some(b)) => {
                for e in service_changes(a, b) {
                    push(e.0, Some(key), e.1, Some(&b.source), e.2);
                }
            }
            (None, None) => {}
        }
    }
    out
}

/// The changes within one service that stayed: endpoints added, removed,
/// their verdict and ejection, panic mode.
fn service_changes(
    a: &ServiceState,
    b: &ServiceState,
) -> Vec<(&'static str, Option<IpAddr>, Arc<str>)> {
    let mut out = Vec::new();
    for e in &b.endpoints {
        let ip = e.endpoint.ip;
        match a.endpoint(ip) {
            None => out.push(("added", Some(ip), e.reason.clone())),
            Some(old) => out.extend(endpoint_change(old, e).map(|(k, r)| (k, Some(ip), r))),
        }
    }
    for e in &a.endpoints {
        if b.endpoint(e.endpoint.ip).is_none() {
            out.push((
                "removed",
                Some(e.endpoint.ip),
                "no longer listed by the source".into(),
            ));
        }
    }
    if a.panic != b.panic {
        let (kind, reason) = if b.panic {
            (
                "panic_on",
                "no endpoint is healthy: fail_open serves them all",
            )
        } else {
            ("panic_off", "an endpoint is healthy again")
        };
        out.push((kind, None, reason.into()));
    }
    out
}

/// An ejection that starts or ends says so (it is why the verdict moved);
/// otherwise a verdict that moved, with its reason.
fn endpoint_change(old: &EndpointState, new: &EndpointState) -> Option<(&'static str, Arc<str>)> {
    match (&old.health.ejected, &new.health.ejected) {
        (None, Some(why)) => return Some(("ejected", why.clone())),
        (Some(_), None) => return Some(("readmitted", new.reason.clone())),
        _ => {}
    }
    match (old.healthy, new.healthy) {
        (true, false) => Some(("unhealthy", new.reason.clone())),
        (false, true) => Some(("healthy", new.reason.clone())),
        _ => None,
    }
}

/// Events of one version logged one by one; beyond that one line says how
/// many more (a first sync of 10,000 services is not 10,000 log lines).
pub const LOGGED_PER_VERSION: usize = 100;

/// Appends `events` to the ring of `snapshot` (dropping the oldest beyond
/// [`CAPACITY`]) and logs each once at `info` (at most
/// [`LOGGED_PER_VERSION`] of them, then a count).
pub fn record(snapshot: &mut Snapshot, events: Vec<ChangeEvent>) {
    let more = events.len().saturating_sub(LOGGED_PER_VERSION);
    if more > 0 {
        tracing::info!(
            version = events[0].version,
            more,
            "state changes beyond these are not logged one by one (see /v1/events)"
        );
    }
    for (i, e) in events.into_iter().enumerate() {
        if i < LOGGED_PER_VERSION {
            log(&e);
        }
        snapshot.events.push_back(Arc::new(e));
        while snapshot.events.len() > CAPACITY {
            snapshot.events.pop_front();
        }
    }
}

fn log(e: &ChangeEvent) {
    tracing::info!(
        version = e.version,
        kind = e.kind,
        service = e.service.as_deref().unwrap_or(""),
        endpoint = e.endpoint.map(|ip| ip.to_string()).unwrap_or_default(),
        source = e.source.as_deref().unwrap_or(""),
        reason = %e.reason,
        "state change"
    );
}

/// The events of `snapshot` newer than version `since`, oldest first, at
/// most `limit` (the newest ones when there are more).
pub fn since(snapshot: &Snapshot, since: u64, limit: usize) -> Vec<Arc<ChangeEvent>> {
    let newer: Vec<Arc<ChangeEvent>> = snapshot
        .events
        .iter()
        .rev()
        .take_while(|e| e.version > since)
        .take(limit)
        .cloned()
        .collect();
    newer.into_iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Health, ProbeState, ServiceSpec, SourceStatus};

    fn service(eps: &[(&str, Health)], fail_open: bool) -> Arc<ServiceState> {
        let mut spec = ServiceSpec::new(ServiceKey::new("default", "web"));
        spec.fail_open = fail_open;
        for (ip, _) in eps {
            spec.endpoints.push(Endpoint::new(ip.parse().unwrap()));
        }
        let spec = Arc::new(spec);
        let states = spec
            .endpoints
            .iter()
            .zip(eps)
            .map(|(e, (_, h))| EndpointState::new(e.clone(), h.clone(), &spec.health))
            .collect();
        Arc::new(ServiceState::new(spec, "file:x".into(), states))
    }

    fn snap(s: Option<Arc<ServiceState>>) -> Snapshot {
        let mut snap = Snapshot::default();
        if let Some(s) = s {
            snap.services.insert(s.key().clone(), s);
        }
        snap
    }

    fn down(why: &str) -> Health {
        Health {
            probe: ProbeState::Down(why.into()),
            ejected: None,
        }
    }

    fn kinds(events: &[ChangeEvent]) -> Vec<(&'static str, Option<String>)> {
        events
            .iter()
            .map(|e| (e.kind, e.endpoint.map(|i| i.to_string())))
            .collect()
    }

    #[test]
    fn endpoint_changes_become_events_with_reasons() {
        let key = ServiceKey::new("default", "web");
        let up = Health {
            probe: ProbeState::Up,
            ejected: None,
        };
        let a = snap(Some(service(
            &[("10.0.0.1", up.clone()), ("10.0.0.2", up.clone())],
            true,
        )));
        let b = snap(Some(service(
            &[
                ("10.0.0.1", down("connection refused")),
                ("10.0.0.3", up.clone()),
            ],
            true,
        )));
        let now = SystemTime::UNIX_EPOCH;
        let ev = diff(&a, &b, std::slice::from_ref(&key), 9, now);
        assert_eq!(
            kinds(&ev),
            vec![
                ("unhealthy", Some("10.0.0.1".into())),
                ("added", Some("10.0.0.3".into())),
                ("removed", Some("10.0.0.2".into())),
            ]
        );
        assert_eq!(&*ev[0].reason, "connection refused");
        assert_eq!(ev[0].version, 9);
        assert_eq!(&*ev[0].time, "1970-01-01T00:00:00.000Z");
        assert_eq!(ev[0].service.as_deref(), Some("web.default"));
        // Every endpoint down with fail_open: panic mode on, then off.
        let c = snap(Some(service(
            &[("10.0.0.1", down("x")), ("10.0.0.3", down("y"))],
            true,
        )));
        let ev = diff(&b, &c, std::slice::from_ref(&key), 10, now);
        assert_eq!(
            kinds(&ev),
            vec![("unhealthy", Some("10.0.0.3".into())), ("panic_on", None)]
        );
        let ev = diff(&c, &b, std::slice::from_ref(&key), 11, now);
        assert_eq!(
            kinds(&ev),
            vec![("healthy", Some("10.0.0.3".into())), ("panic_off", None)]
        );
        // Ejection says so instead of a bare verdict change.
        let ejected = Health {
            probe: ProbeState::Up,
            ejected: Some("ejected: 5 connect failures".into()),
        };
        let d = snap(Some(service(
            &[("10.0.0.1", down("z")), ("10.0.0.3", ejected)],
            true,
        )));
        let ev = diff(&b, &d, std::slice::from_ref(&key), 12, now);
        assert_eq!(ev[0].kind, "ejected");
        assert_eq!(&*ev[0].reason, "ejected: 5 connect failures");
        let ev = diff(&d, &b, std::slice::from_ref(&key), 13, now);
        assert_eq!(ev[0].kind, "readmitted");
        // Services come and go as one event each.
        let ev = diff(&snap(None), &a, std::slice::from_ref(&key), 1, now);
        assert_eq!(kinds(&ev), vec![("service_added", None)]);
        assert_eq!(&*ev[0].reason, "2 endpoint(s), 2 serving");
        let ev = diff(&a, &snap(None), std::slice::from_ref(&key), 2, now);
        assert_eq!(kinds(&ev), vec![("service_removed", None)]);
    }

    #[test]
    fn sources_connect_and_get_lost() {
        let status = |connected, reason: &str| SourceStatus {
            connected,
            reason: reason.into(),
        };
        let mut a = Snapshot::default();
        a.sources
            .insert("docker".into(), status(false, "awaiting first sync"));
        let mut b = a.clone();
        b.sources.insert("docker".into(), status(true, "synced"));
        let now = SystemTime::UNIX_EPOCH;
        let ev = diff(&a, &b, &[], 2, now);
        assert_eq!(
            (ev[0].kind, ev[0].source.as_deref()),
            ("source_connected", Some("docker"))
        );
        let mut c = b.clone();
        c.sources
            .insert("docker".into(), status(false, "engine gone"));
        let ev = diff(&b, &c, &[], 3, now);
        assert_eq!((ev[0].kind, &*ev[0].reason), ("source_lost", "engine gone"));
        // A source seen first as not connected is no loss.
        assert!(diff(&Snapshot::default(), &a, &[], 1, now).is_empty());
    }

    #[test]
    fn the_ring_is_bounded_and_served_since_a_version() {
        let mut s = Snapshot::default();
        let event = |v| ChangeEvent {
            version: v,
            time: "t".into(),
            kind: "added",
            service: None,
            endpoint: None,
            source: None,
            reason: "r".into(),
        };
        record(&mut s, (1..=CAPACITY as u64 + 10).map(event).collect());
        assert_eq!(s.events.len(), CAPACITY);
        assert_eq!(s.events[0].version, 11);
        let tail = since(&s, CAPACITY as u64 + 7, 100);
        let versions: Vec<u64> = tail.iter().map(|e| e.version).collect();
        let top = CAPACITY as u64;
        assert_eq!(versions, vec![top + 8, top + 9, top + 10]);
        let newest = since(&s, 0, 2);
        assert_eq!(newest[1].version, top + 10);
        assert_eq!(newest.len(), 2);
    }
}
