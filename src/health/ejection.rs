//! Passive ejection (Envoy's outlier detection, in its simplest form): the
//! proxy's connect outcomes eject an endpoint after `eject_after`
//! consecutive failures. Pure: the caller passes the clock.
//!
//! - An ejection lasts `eject_base`, doubling with each repeat, capped at
//!   `eject_max`. The doubling is forgotten once an endpoint stayed admitted
//!   for `eject_max`.
//! - At most `eject_max_percent` of a service's endpoints (rounded down) are
//!   ejected at once, so a service-wide fault cannot eject everything.
//! - An ejection ends when its time is up or on a successful probe.
//! - A successful proxied connect resets the failure count.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::HealthSpec;

#[derive(Clone, Debug, Default)]
struct Entry {
    /// Consecutive connect failures since the last success or ejection.
    failures: u32,
    /// Ejections so far, for the doubling.
    ejections: u32,
    /// In force: until when, and why.
    ejected: Option<(Instant, Arc<str>)>,
    /// When the last ejection ended.
    ended: Option<Instant>,
}

/// What an event did to one endpoint's ejection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Ejected until the instant, with the reason to publish.
    Ejected { until: Instant, reason: Arc<str> },
    /// Admitted again.
    Readmitted,
}

/// The ejection state of one service's endpoints.
#[derive(Clone, Debug, Default)]
pub struct Ejections {
    entries: HashMap<IpAddr, Entry>,
    /// Entries with an ejection in force.
    ejected: usize,
}

impl Ejections {
    /// Feeds one proxy connect outcome for an endpoint of a service with
    /// `endpoints` endpoints.
    pub fn outcome(
        &mut self,
        ip: IpAddr,
        success: bool,
        spec: &HealthSpec,
        endpoints: usize,
        now: Instant,
    ) -> Option<Change> {
        if success {
            if let Some(e) = self.entries.get_mut(&ip) {
                e.failures = 0;
            }
            self.forget_idle(ip, spec, now);
            return None;
        }
        if spec.eject_after == 0 {
            return None;
        }
        let ejected_now = self.ejected_count();
        let entry = self.entries.entry(ip).or_default();
        entry.failures = entry.failures.saturating_add(1);
        if entry.ejected.is_some() || entry.failures < spec.eject_after {
            return None;
        }
        let allowed = endpoints * usize::from(spec.eject_max_percent.min(100)) / 100;
        if ejected_now >= allowed {
            tracing::debug!(
                %ip, ejected = ejected_now, allowed,
                "not ejecting: the service's ejection cap is reached"
            );
            return None;
        }
        if entry
            .ended
            .is_some_and(|end| now.saturating_duration_since(end) >= spec.eject_max)
        {
            entry.ejections = 0;
        }
        let until = now + backoff(spec, entry.ejections);
        let reason: Arc<str> = format!("ejected: {} connect failures", entry.failures).into();
        entry.ejections = entry.ejections.saturating_add(1);
        entry.failures = 0;
        entry.ejected = Some((until, reason.clone()));
        self.ejected += 1;
        Some(Change::Ejected { until, reason })
    }

    /// A successful probe re-admits an ejected endpoint.
    pub fn probe_success(&mut self, ip: IpAddr, now: Instant) -> Option<Change> {
        let e = self.entries.get_mut(&ip)?;
        e.failures = 0;
        e.ejected.take()?;
        e.ended = Some(now);
        self.ejected -= 1;
        Some(Change::Readmitted)
    }

    /// Ends the ejection of `ip` if its time is up.
    pub fn expire(&mut self, ip: IpAddr, now: Instant) -> Option<Change> {
        let e = self.entries.get_mut(&ip)?;
        let (until, _) = e.ejected.as_ref()?;
        if *until > now {
            return None;
        }
        e.ejected = None;
        e.ended = Some(now);
        self.ejected -= 1;
        Some(Change::Readmitted)
    }

    /// The reason of the ejection in force for `ip`.
    pub fn reason(&self, ip: IpAddr) -> Option<&Arc<str>> {
        self.entries.get(&ip)?.ejected.as_ref().map(|(_, r)| r)
    }

    pub fn ejected_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.ejected.is_some())
            .count()
    }

    /// Forgets endpoints that are gone.
    pub fn retain(&mut self, mut keep: impl FnMut(IpAddr) -> bool) {
        self.entries.retain(|ip, _| keep(*ip));
        self.ejected = self
            .entries
            .values()
            .filter(|e| e.ejected.is_some())
            .count();
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops an entry that holds nothing worth remembering.
    fn forget_idle(&mut self, ip: IpAddr, spec: &HealthSpec, now: Instant) {
        let idle = self.entries.get(&ip).is_some_and(|e| {
            e.failures == 0
                && e.ejected.is_none()
                && e.ended
                    .is_none_or(|end| now.saturating_duration_since(end) >= spec.eject_max)
        });
        if idle {
            self.entries.remove(&ip);
        }
    }
}

/// `eject_base × 2^n`, capped at `eject_max`.
fn backoff(spec: &HealthSpec, previous: u32) -> Duration {
    let factor = 1u32 << previous.min(20);
    spec.eject_base.saturating_mul(factor).min(spec.eject_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HealthSpec {
        HealthSpec {
            eject_after: 3,
            eject_base: Duration::from_secs(10),
            eject_max: Duration::from_secs(35),
            eject_max_percent: 50,
            ..HealthSpec::default()
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn fail(e: &mut Ejections, n: u8, times: u32, now: Instant) -> Option<Change> {
        (0..times)
            .map(|_| e.outcome(ip(n), false, &spec(), 4, now))
            .last()
            .flatten()
    }

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let now = Instant::now();
        let mut e = Ejections::default();
        assert_eq!(fail(&mut e, 1, 2, now), None);
        assert_eq!(e.outcome(ip(1), true, &spec(), 4, now), None);
        assert_eq!(fail(&mut e, 1, 2, now), None);
        assert_eq!(
            e.outcome(ip(1), false, &spec(), 4, now),
            Some(Change::Ejected {
                until: now + Duration::from_secs(10),
                reason: "ejected: 3 connect failures".into()
            })
        );
        assert_eq!(&**e.reason(ip(1)).unwrap(), "ejected: 3 connect failures");
        assert_eq!(e.ejected_count(), 1);
    }

    #[test]
    fn ejection_expires_and_doubles_up_to_the_cap() {
        let mut now = Instant::now();
        let mut e = Ejections::default();
        let mut lengths = Vec::new();
        for _ in 0..4 {
            let Some(Change::Ejected { until, .. }) = fail(&mut e, 1, 3, now) else {
                panic!("expected an ejection");
            };
            lengths.push(until - now);
            assert_eq!(e.expire(ip(1), until - Duration::from_millis(1)), None);
            assert_eq!(e.expire(ip(1), until), Some(Change::Readmitted));
            assert!(e.reason(ip(1)).is_none());
            now = until + Duration::from_secs(1);
        }
        let secs: Vec<u64> = lengths.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [10, 20, 35, 35]);
        // Staying admitted for eject_max forgets the doubling.
        now += Duration::from_secs(35);
        let Some(Change::Ejected { until, .. }) = fail(&mut e, 1, 3, now) else {
            panic!("expected an ejection");
        };
        assert_eq!(until - now, Duration::from_secs(10));
    }

    #[test]
    fn at_most_max_percent_ejected_at_once() {
        let now = Instant::now();
        let mut e = Ejections::default();
        // 4 endpoints at 50%: two may be ejected.
        assert!(fail(&mut e, 1, 3, now).is_some());
        assert!(fail(&mut e, 2, 3, now).is_some());
        assert_eq!(fail(&mut e, 3, 3, now), None);
        assert_eq!(e.ejected_count(), 2);
        // When a slot frees up, the next failure ejects.
        assert_eq!(e.probe_success(ip(1), now), Some(Change::Readmitted));
        assert!(matches!(
            e.outcome(ip(3), false, &spec(), 4, now),
            Some(Change::Ejected { .. })
        ));
    }

    #[test]
    fn a_single_endpoint_is_never_ejected_at_fifty_percent() {
        let now = Instant::now();
        let mut e = Ejections::default();
        for _ in 0..10 {
            assert_eq!(e.outcome(ip(1), false, &spec(), 1, now), None);
        }
    }

    #[test]
    fn eject_after_zero_disables() {
        let now = Instant::now();
        let mut e = Ejections::default();
        let off = HealthSpec {
            eject_after: 0,
            ..spec()
        };
        for _ in 0..10 {
            assert_eq!(e.outcome(ip(1), false, &off, 4, now), None);
        }
        assert!(e.is_empty());
    }

    #[test]
    fn probe_success_readmits_and_idle_entries_are_forgotten() {
        let now = Instant::now();
        let mut e = Ejections::default();
        assert!(fail(&mut e, 1, 3, now).is_some());
        assert_eq!(e.probe_success(ip(1), now), Some(Change::Readmitted));
        assert_eq!(e.probe_success(ip(1), now), None);
        assert!(!e.is_empty());
        let later = now + Duration::from_secs(40);
        assert_eq!(e.outcome(ip(1), true, &spec(), 4, later), None);
        assert!(e.is_empty());
    }
}
