//! The probe supervisor's pure core: which endpoints are probed, when the
//! next probe of each is due, and what each result or connect outcome means
//! for the health the registry publishes. No I/O and no clock: the async
//! shell in `mod.rs` passes `now`, launches the probes this core asks for,
//! and sends the reports.
//!
//! One timer heap for all probes (instead of a task with a timer per
//! endpoint): 10,000 endpoints cost 10,000 heap entries and a probe task
//! only while a probe is in flight.
//!
//! The core reports to the registry only changes. Whenever a service's spec
//! changes (or the loop starts) it checks the snapshot's health of that
//! service against what it believes and re-sends where they differ: the
//! registry forgets the health of an endpoint that left the spec, and a
//! restarted loop may find stale verdicts. Re-sending is harmless (the
//! registry ignores no-op changes). It does not re-check on snapshots where
//! only health changed: the registry's channel is reliable and ordered, so
//! what was sent will show, and re-checking then would re-send every report
//! still queued (a storm at 10,000 endpoints).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{ConnectOutcome, HealthSpec, ProbeState, ServiceKey, ServiceState, Snapshot};
use crate::registry::HealthChange;

use super::ejection::{Change, Ejections};
use super::hysteresis::{Hysteresis, Thresholds};
use super::probe::{Check, ProbeError};

/// First probes of a batch of new endpoints are spread so that at most
/// about one starts per this much time (10,000 new endpoints: over 1 s).
const FIRST_PROBE_SPACING: Duration = Duration::from_micros(100);

/// At most one warning per this long about probes that could not run.
const LOCAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// A probe the shell should start now.
#[derive(Debug)]
pub struct Launch {
    pub service: ServiceKey,
    pub ip: IpAddr,
    pub id: u64,
    pub addr: SocketAddr,
    pub check: Arc<Check>,
    pub timeout: Duration,
}

/// A change for the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub service: ServiceKey,
    pub ip: IpAddr,
    pub change: HealthChange,
}

/// What the shell must do after feeding the core.
#[derive(Debug, Default)]
pub struct Effects {
    pub reports: Vec<Report>,
    /// In-flight probes (by launch id) whose endpoint went away or changed.
    pub aborts: Vec<u64>,
}

impl Effects {
    fn report(&mut self, service: &ServiceKey, ip: IpAddr, change: HealthChange) {
        self.reports.push(Report {
            service: service.clone(),
            ip,
            change,
        });
    }
}

/// Counts for tests and debugging.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Endpoints with an active probe.
    pub targets: usize,
    /// Probes running right now.
    pub in_flight: usize,
    /// Endpoints passively ejected right now.
    pub ejected: usize,
}

#[derive(Debug)]
struct Target {
    /// Fresh for every (re)start, so stale timers and results are ignored.
    id: u64,
    addr: SocketAddr,
    check: Arc<Check>,
    health: HealthSpec,
    hyst: Hysteresis,
    /// When the next probe is due; `None` while one is in flight.
    due: Option<Instant>,
    /// When the last probe was launched: the next one is due an interval
    /// later, so the probe rate does not sag with probe latency; but never
    /// sooner than half an interval after the last one ended, so slow
    /// probes (an overloaded host, timeouts) are not repeated back to back.
    launched: Instant,
}

impl Target {
    fn thresholds(&self) -> Thresholds {
        thresholds(&self.health)
    }
}

fn thresholds(h: &HealthSpec) -> Thresholds {
    Thresholds {
        rise: h.rise,
        fall: h.fall,
        start_healthy: h.start_healthy,
    }
}

/// Everything tracked for one service of the snapshot.
#[derive(Debug)]
struct Tracked {
    /// The state last reconciled against.
    state: Arc<ServiceState>,
    ips: HashSet<IpAddr>,
    targets: HashMap<IpAddr, Target>,
    eject: Ejections,
}

type Timer = Reverse<(Instant, u64, ServiceKey, IpAddr)>;
type Expiry = Reverse<(Instant, ServiceKey, IpAddr)>;

#[derive(Debug)]
pub struct Supervisor {
    services: HashMap<ServiceKey, Tracked>,
    /// Next probe per target (by launch id); entries of removed or restarted
    /// targets stay until due and are skipped then.
    timers: BinaryHeap<Timer>,
    /// Ejection ends.
    expiries: BinaryHeap<Expiry>,
    next_id: u64,
    /// Running totals, kept as things change so `stats` costs nothing.
    totals: Stats,
    local: LocalErrors,
    rng: fastrand::Rng,
}

/// Probes that could not run for want of local resources (descriptors,
/// ports, memory): counted, and logged once per burst (and at most once
/// per [`LOCAL_WARN_EVERY`] when bursts come and go).
#[derive(Debug, Default)]
struct LocalErrors {
    /// Since the first of the current burst; 0: no burst.
    count: u64,
    /// The current burst was logged.
    warned: bool,
    last_warn: Option<Instant>,
}

impl LocalErrors {
    fn on_local(&mut self, service: &ServiceKey, ip: IpAddr, error: &ProbeError, now: Instant) {
        metrics::counter!(crate::telemetry::HEALTH_CHECKS, "result" => "local_error").increment(1);
        self.count += 1;
        if self.count > 1 {
            return;
        }
        let quiet = self
            .last_warn
            .is_none_or(|at| now.saturating_duration_since(at) >= LOCAL_WARN_EVERY);
        if quiet {
            tracing::warn!(service = %service, %ip, %error,
                "out of local resources: probes are skipped, not failed (no endpoint goes down for this)");
            self.warned = true;
            self.last_warn = Some(now);
        }
    }

    /// A probe ran (whatever its result): the burst is over.
    fn on_probe(&mut self) {
        if self.count == 0 {
            return;
        }
        if std::mem::take(&mut self.warned) {
            tracing::info!(skipped = self.count, "probes run again");
        }
        self.count = 0;
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::with_rng(fastrand::Rng::new())
    }
}

// === impl Supervisor ===

impl Supervisor {
    pub fn with_rng(rng: fastrand::Rng) -> Self {
        Self {
            services: HashMap::new(),
            timers: BinaryHeap::new(),
            expiries: BinaryHeap::new(),
            next_id: 0,
            totals: Stats::default(),
            local: LocalErrors::default(),
            rng,
        }
    }

    /// Targets and ejections; `in_flight` counts targets whose probe was
    /// launched and has not reported back.
    pub fn stats(&self) -> Stats {
        self.totals
    }

    /// Recounts everything (what `stats` keeps up to date), for tests.
    #[cfg(test)]
    fn recount(&self) -> Stats {
        let mut stats = Stats::default();
        for t in self.services.values() {
            stats.targets += t.targets.len();
            stats.in_flight += t.targets.values().filter(|t| t.due.is_none()).count();
            stats.ejected += t.eject.ejected_count();
        }
        stats
    }

    /// The earliest instant something may be due (possibly a stale timer:
    /// waking for it early is harmless).
    pub fn next_deadline(&self) -> Option<Instant> {
        let probe = self.timers.peek().map(|Reverse(t)| t.0);
        let expiry = self.expiries.peek().map(|Reverse(e)| e.0);
        match (probe, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Diffs the snapshot against the running probes: starts probes for new
    /// endpoints, stops those of endpoints that are gone, restarts those
    /// whose address or health spec changed, and re-sends any belief the
    /// snapshot does not show.
    pub fn reconcile(&mut self, snap: &Snapshot, now: Instant, fx: &mut Effects) {
        let totals = &mut self.totals;
        self.services.retain(|key, tracked| {
            let keep = snap.services.contains_key(key);
            if !keep {
                let before = fx.aborts.len();
                fx.aborts.extend(in_flight(&tracked.targets));
                totals.in_flight -= fx.aborts.len() - before;
                totals.targets -= tracked.targets.len();
                totals.ejected -= tracked.eject.ejected_count();
            }
            keep
        });
        let mut started: Vec<(ServiceKey, IpAddr, Duration)> = Vec::new();
        for (key, svc) in &snap.services {
            let resync = match self.services.get(key) {
                Some(t) if Arc::ptr_eq(&t.state, svc) => continue,
                // Same spec: only health changed, so the targets stand.
                Some(t) => !Arc::ptr_eq(&t.state.spec, &svc.spec),
                None => true,
            };
            let tracked = self.services.entry(key.clone()).or_insert_with(|| Tracked {
                state: svc.clone(),
                ips: HashSet::new(),
                targets: HashMap::new(),
                eject: Ejections::default(),
            });
            tracked.state = svc.clone();
            if !resync {
                // Only health changed: the registry holds what we sent.
                continue;
            }
            let before = (tracked.targets.len(), tracked.eject.ejected_count());
            let aborts = fx.aborts.len();
            sync_targets(key, tracked, now, &mut self.next_id, fx, &mut started);
            self.totals.targets = self.totals.targets - before.0 + tracked.targets.len();
            self.totals.ejected = self.totals.ejected - before.1 + tracked.eject.ejected_count();
            self.totals.in_flight -= fx.aborts.len() - aborts;
            check_beliefs(key, tracked, fx);
        }
        let batch = started.len() as u32;
        for (key, ip, interval) in started {
            let spread = (FIRST_PROBE_SPACING * batch).clamp(interval / 10, interval);
            let due = now + spread.mul_f64(self.rng.f64());
            self.schedule(&key, ip, due);
        }
    }

    /// Pops what is due: probes to launch and ejections that end.
    pub fn due(&mut self, now: Instant, launches: &mut Vec<Launch>, fx: &mut Effects) {
        while let Some(Reverse((at, ..))) = self.timers.peek()
            && *at <= now
        {
            let Some(Reverse((at, id, service, ip))) = self.timers.pop() else {
                break;
            };
            let target = self.services.get_mut(&service);
            let Some(t) = target.and_then(|s| s.targets.get_mut(&ip)) else {
                continue;
            };
            if t.id != id || t.due != Some(at) {
                continue;
            }
            t.due = None;
            t.launched = now;
            self.totals.in_flight += 1;
            launches.push(Launch {
                id,
                addr: t.addr,
                check: t.check.clone(),
                timeout: t.health.timeout,
                service,
                ip,
            });
        }
        while let Some(Reverse((at, ..))) = self.expiries.peek()
            && *at <= now
        {
            let Some(Reverse((_, service, ip))) = self.expiries.pop() else {
                break;
            };
            let Some(tracked) = self.services.get_mut(&service) else {
                continue;
            };
            if let Some(Change::Readmitted) = tracked.eject.expire(ip, now) {
                self.totals.ejected -= 1;
                tracing::debug!(service = %service, %ip, "ejection ended");
                fx.report(&service, ip, HealthChange::Ejected(None));
            }
        }
    }

    /// Feeds the result of the probe launched as `id`.
    pub fn on_result(
        &mut self,
        service: &ServiceKey,
        ip: IpAddr,
        id: u64,
        result: Result<(), ProbeError>,
        now: Instant,
        fx: &mut Effects,
    ) {
        let Some(tracked) = self.services.get_mut(service) else {
            return;
        };
        let Some(t) = tracked.targets.get_mut(&ip) else {
            return;
        };
        if t.id != id || t.due.is_some() {
            return;
        }
        self.totals.in_flight -= 1;
        if let Err(e) = &result
            && e.is_local()
        {
            // Not a result: no verdict, no ejection change; try again at
            // the normal interval.
            let gap = t.health.interval;
            let launched = t.launched;
            self.local.on_local(service, ip, e, now);
            let gap = self.jitter(gap);
            self.schedule(service, ip, (launched + gap).max(now + gap / 2));
            return;
        }
        self.local.on_probe();
        // Looked up per probe, not cached: a handle taken before the
        // recorder is installed would count into nothing.
        let outcome = if result.is_ok() { "success" } else { "failure" };
        metrics::counter!(crate::telemetry::HEALTH_CHECKS, "result" => outcome).increment(1);
        let th = t.thresholds();
        if let Some(state) = t.hyst.observe(result, th) {
            tracing::debug!(service = %service, %ip, state = ?state, "probe verdict changed");
            fx.report(service, ip, HealthChange::Probe(state));
        }
        let launched = t.launched;
        let interval = if t.hyst.changing(th) {
            t.health.fast_interval.min(t.health.interval)
        } else {
            t.health.interval
        };
        if result.is_ok() && tracked.eject.probe_success(ip, now).is_some() {
            self.totals.ejected -= 1;
            tracing::debug!(service = %service, %ip, "probe passed: ejection ended");
            fx.report(service, ip, HealthChange::Ejected(None));
        }
        let gap = self.jitter(interval);
        let due = (launched + gap).max(now + gap / 2);
        self.schedule(service, ip, due);
    }

    /// Feeds one proxy connect outcome (passive health).
    pub fn on_outcome(&mut self, o: &ConnectOutcome, now: Instant, fx: &mut Effects) {
        let Some(tracked) = self.services.get_mut(&o.service) else {
            return;
        };
        if !o.success && !tracked.ips.contains(&o.ip) {
            return;
        }
        let spec = &tracked.state.spec.health;
        let change = tracked
            .eject
            .outcome(o.ip, o.success, spec, tracked.ips.len(), now);
        if let Some(Change::Ejected { until, reason }) = change {
            self.totals.ejected += 1;
            tracing::info!(service = %o.service, ip = %o.ip, %reason, ?until, "endpoint ejected");
            metrics::counter!(crate::telemetry::ENDPOINT_EJECTIONS, "service" => o.service.to_string())
                .increment(1);
            self.expiries
                .push(Reverse((until, o.service.clone(), o.ip)));
            fx.report(&o.service, o.ip, HealthChange::Ejected(Some(reason)));
        }
    }

    fn target_mut(&mut self, service: &ServiceKey, ip: IpAddr) -> Option<&mut Target> {
        self.services.get_mut(service)?.targets.get_mut(&ip)
    }

    fn schedule(&mut self, service: &ServiceKey, ip: IpAddr, due: Instant) {
        let Some(t) = self.target_mut(service, ip) else {
            return;
        };
        t.due = Some(due);
        let id = t.id;
        self.timers.push(Reverse((due, id, service.clone(), ip)));
    }

    /// 80-100% of the interval, so endpoints drift apart instead of probing
    /// in lockstep, while the interval stays an upper bound: a failure is
    /// seen within `fall × interval` (what users are promised).
    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.8 + 0.2 * self.rng.f64())
    }
}

fn in_flight(targets: &HashMap<IpAddr, Target>) -> impl Iterator<Item = u64> + '_ {
    targets.values().filter(|t| t.due.is_none()).map(|t| t.id)
}

/// Brings one service's probe targets in line with its spec. New and
/// restarted targets are pushed to `started` for their first probe.
fn sync_targets(
    key: &ServiceKey,
    tracked: &mut Tracked,
    now: Instant,
    next_id: &mut u64,
    fx: &mut Effects,
    started: &mut Vec<(ServiceKey, IpAddr, Duration)>,
) {
    let svc = tracked.state.clone();
    let spec = &svc.spec;
    tracked.ips = svc.endpoints.iter().map(|e| e.endpoint.ip).collect();
    let ips = &tracked.ips;
    tracked.eject.retain(|ip| ips.contains(&ip));
    let mut keep: HashSet<IpAddr> = HashSet::with_capacity(svc.endpoints.len());
    for ep in &svc.endpoints {
        let ip = ep.endpoint.ip;
        let addr = match (spec.ports.first(), ep.endpoint.port) {
            (Some(port), _) => ep.endpoint.addr(port),
            (None, Some(port)) => SocketAddr::new(ip, port),
            (None, None) => {
                tracing::debug!(service = %key, %ip, "no port to probe");
                continue;
            }
        };
        if let Some(t) = tracked.targets.get(&ip)
            && t.addr == addr
            && t.health == spec.health
        {
            keep.insert(ip);
            continue;
        }
        let check = match Check::new(&spec.health.probe, addr) {
            Ok(Some(check)) => check,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(service = %key, %ip, error = %e, "cannot probe this endpoint");
                continue;
            }
        };
        // A restarted probe keeps its counters and verdict; a new one
        // starts from what the snapshot says (Unknown for a new endpoint).
        let hyst = match tracked.targets.remove(&ip) {
            Some(old) => {
                fx.aborts.extend(old.due.is_none().then_some(old.id));
                old.hyst
            }
            None => Hysteresis::new(ep.health.probe.clone()),
        };
        let id = *next_id;
        *next_id += 1;
        tracked.targets.insert(
            ip,
            Target {
                id,
                addr,
                check: Arc::new(check),
                health: spec.health.clone(),
                hyst,
                due: None,
                launched: now,
            },
        );
        keep.insert(ip);
        started.push((key.clone(), ip, spec.health.interval));
    }
    tracked.targets.retain(|ip, t| {
        let kept = keep.contains(ip);
        if !kept && t.due.is_none() {
            fx.aborts.push(t.id);
        }
        kept
    });
}

/// Re-sends whatever the service's snapshot state does not show of our
/// belief: probe verdicts (Unknown where nothing probes) and ejections.
/// Called on spec changes only (see the module doc).
fn check_beliefs(key: &ServiceKey, tracked: &Tracked, fx: &mut Effects) {
    for ep in &tracked.state.endpoints {
        let ip = ep.endpoint.ip;
        let probe = tracked
            .targets
            .get(&ip)
            .map_or(&ProbeState::Unknown, |t| t.hyst.reported());
        if ep.health.probe != *probe {
            fx.report(key, ip, HealthChange::Probe(probe.clone()));
        }
        let ejected = tracked.eject.reason(ip);
        if ep.health.ejected.as_ref() != ejected {
            fx.report(key, ip, HealthChange::Ejected(ejected.cloned()));
        }
    }
}

#[cfg(test)]
mod tests;
