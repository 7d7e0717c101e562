//! Health checking: active probes with rise/fall hysteresis and passive
//! ejection from the proxy's connect outcomes, reported to the registry so
//! DNS and the proxy read one verdict from one snapshot.
//!
//! ```text
//!  registry::Reader ──snapshot──┐
//!  proxy ──ConnectOutcome──────►├─► Supervisor (pure) ──Report──► registry::Handle
//!  probe tasks ──result────────►┘        │
//!                  ▲                     │ Launch
//!                  └─────────────────────┘
//! ```
//!
//! - [`supervisor`]: the pure core; diffs the snapshot's endpoints against
//!   the probe targets, keeps one timer heap for all of them, turns results
//!   into verdicts ([`hysteresis`]) and outcomes into ejections
//!   ([`ejection`]).
//! - [`probe`]: one TCP connect or HTTP/1.1 `GET`, bounded by a timeout. A
//!   probe that cannot start for want of local resources (EMFILE, ENOBUFS,
//!   EADDRNOTAVAIL, ...) is "could not probe": it never counts toward
//!   `fall`, and the proxy never reports such connects for ejection.
//! - this file: the thin async shell that runs the core, with at most
//!   [`Options::max_in_flight`] probes running at once.
//!
//! The loop reports only changes; the registry recomputes the verdict.

pub mod ejection;
pub mod hysteresis;
pub mod probe;
pub mod supervisor;

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{ConnectOutcome, ServiceKey};
use crate::registry::{Handle, Reader};

use probe::ProbeError;
pub use supervisor::Stats;
use supervisor::{Effects, Launch, Supervisor};

/// Outcomes handled per wake-up before the loop looks at timers again.
const OUTCOME_BATCH: usize = 1024;

/// Why the health loop ended before shutdown.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("the registry stopped")]
    RegistryGone,
}

/// Knobs of the health loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Probes running at once, at most. The others wait for a slot, and
    /// their timeout starts when they run: waiting is never a failure.
    pub max_in_flight: usize,
}

impl Options {
    /// The cap derived from this process's descriptor limit (read now:
    /// call after the app raised it), see [`probe_slots`].
    pub fn for_this_process() -> Self {
        let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
        Self {
            max_in_flight: probe_slots(soft),
        }
    }
}

/// Probes in flight for a descriptor limit of `nofile` (each holds one
/// descriptor): an eighth of the limit, at least 4, at most 8192.
pub fn probe_slots(nofile: u64) -> usize {
    (nofile / 8).clamp(4, 8192) as usize
}

/// The health loop: runs until `shutdown` (then `Ok`) or until the
/// registry stops (`Err`); every probe it started ends with it. Probes in
/// flight are capped by [`Options::for_this_process`].
pub async fn run(
    reader: Reader,
    registry: Handle,
    outcomes: mpsc::Receiver<ConnectOutcome>,
    shutdown: CancellationToken,
) -> Result<(), HealthError> {
    run_with(
        reader,
        registry,
        outcomes,
        shutdown,
        Options::for_this_process(),
    )
    .await
}

/// [`run`] with [`Options`].
pub async fn run_with(
    reader: Reader,
    registry: Handle,
    outcomes: mpsc::Receiver<ConnectOutcome>,
    shutdown: CancellationToken,
    opts: Options,
) -> Result<(), HealthError> {
    run_loop(reader, registry, outcomes, shutdown, None, opts).await
}

/// [`run`] spawned on the runtime.
pub fn spawn(
    reader: Reader,
    registry: Handle,
    outcomes: mpsc::Receiver<ConnectOutcome>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), HealthError>> {
    tokio::spawn(run(reader, registry, outcomes, shutdown))
}

/// Like [`spawn`], and publishes the loop's [`Stats`] (probe targets,
/// probes in flight, ejections) after every step, for tests and debugging.
pub fn spawn_with_stats(
    reader: Reader,
    registry: Handle,
    outcomes: mpsc::Receiver<ConnectOutcome>,
    shutdown: CancellationToken,
) -> (
    tokio::task::JoinHandle<Result<(), HealthError>>,
    watch::Receiver<Stats>,
) {
    spawn_with_stats_and(
        reader,
        registry,
        outcomes,
        shutdown,
        Options::for_this_process(),
    )
}

/// [`spawn_with_stats`] with [`Options`].
pub fn spawn_with_stats_and(
    reader: Reader,
    registry: Handle,
    outcomes: mpsc::Receiver<ConnectOutcome>,
    shutdown: CancellationToken,
    opts: Options,
) -> (
    tokio::task::JoinHandle<Result<(), HealthError>>,
    watch::Receiver<Stats>,
) {
    let (tx, rx) = watch::channel(Stats::default());
    let task = tokio::spawn(run_loop(
        reader,
        registry,
        outcomes,
        shutdown,
        Some(tx),
        opts,
    ));
    (task, rx)
}

/// What a probe task hands back.
struct Done {
    service: ServiceKey,
    ip: IpAddr,
    id: u64,
    result: Result<(), ProbeError>,
}

/// Probes in flight, by launch id, so a removed endpoint's probe is
/// aborted at once; at most `slots` of them run at once.
struct Probes {
    set: JoinSet<Done>,
    running: HashMap<u64, AbortHandle>,
    slots: Arc<Semaphore>,
}

impl Probes {
    fn new(max_in_flight: usize) -> Self {
        Self {
            set: JoinSet::new(),
            running: HashMap::new(),
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
        }
    }

    fn launch(&mut self, l: Launch) {
        let id = l.id;
        let slots = self.slots.clone();
        let handle = self.set.spawn(async move {
            // The semaphore is never closed; the timeout starts once the
            // probe runs.
            let _slot = slots.acquire_owned().await;
            let result = probe::run(&l.check, l.addr, l.timeout).await;
            Done {
                service: l.service,
                ip: l.ip,
                id: l.id,
                result,
            }
        });
        self.running.insert(id, handle);
    }

    fn abort(&mut self, id: u64) {
        if let Some(handle) = self.running.remove(&id) {
            handle.abort();
        }
    }

    /// Takes a finished probe's result; `None` for an aborted one.
    fn finished(&mut self, joined: Result<Done, tokio::task::JoinError>) -> Option<Done> {
        match joined {
            Ok(done) => {
                self.running.remove(&done.id);
                Some(done)
            }
            Err(e) if e.is_panic() => {
                tracing::error!(error = %e, "a probe task panicked");
                None
            }
            Err(_) => None,
        }
    }
}

async fn run_loop(
    mut reader: Reader,
    registry: Handle,
    mut outcomes: mpsc::Receiver<ConnectOutcome>,
    shutdown: CancellationToken,
    stats: Option<watch::Sender<Stats>>,
    opts: Options,
) -> Result<(), HealthError> {
    let mut core = Supervisor::default();
    let mut probes = Probes::new(opts.max_in_flight);
    let mut fx = Effects::default();
    let mut launches = Vec::new();
    let mut outcomes_open = true;
    let far = || Instant::now() + Duration::from_secs(3600);
    let mut sleep = pin!(tokio::time::sleep_until(far()));
    let mut armed: Option<std::time::Instant> = None;
    core.reconcile(&reader.latest(), now(), &mut fx);
    let result = loop {
        core.due(now(), &mut launches, &mut fx);
        if !act(&mut probes, &mut launches, &mut fx, &registry).await {
            probes.set.shutdown().await;
            return if shutdown.is_cancelled() {
                Ok(())
            } else {
                Err(HealthError::RegistryGone)
            };
        }
        if let Some(tx) = &stats {
            let mut s = core.stats();
            s.in_flight = probes.running.len();
            tx.send_if_modified(|old| std::mem::replace(old, s) != s);
        }
        let deadline = core.next_deadline();
        if deadline != armed {
            armed = deadline;
            let at = deadline.map_or_else(far, Instant::from_std);
            sleep.as_mut().reset(at);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            snap = reader.changed() => match snap {
                Some(snap) => core.reconcile(&snap, now(), &mut fx),
                None if shutdown.is_cancelled() => break Ok(()),
                None => break Err(HealthError::RegistryGone),
            },
            Some(joined) = probes.set.join_next(), if !probes.set.is_empty() => {
                let now = now();
                let mut next = Some(joined);
                while let Some(joined) = next {
                    if let Some(d) = probes.finished(joined) {
                        core.on_result(&d.service, d.ip, d.id, d.result, now, &mut fx);
                    }
                    next = probes.set.try_join_next();
                }
            }
            outcome = outcomes.recv(), if outcomes_open => match outcome {
                Some(o) => {
                    let now = now();
                    core.on_outcome(&o, now, &mut fx);
                    for _ in 1..OUTCOME_BATCH {
                        let Ok(o) = outcomes.try_recv() else { break };
                        core.on_outcome(&o, now, &mut fx);
                    }
                }
                None => outcomes_open = false,
            },
            () = &mut sleep, if armed.is_some() => {
                // Re-arm on the next pass even if the deadline is the same.
                armed = None;
            }
        }
    };
    probes.set.shutdown().await;
    result
}

/// Carries out what the core decided: launches and aborts probes, reports
/// verdicts. False when the registry has stopped.
async fn act(
    probes: &mut Probes,
    launches: &mut Vec<Launch>,
    fx: &mut Effects,
    registry: &Handle,
) -> bool {
    for l in launches.drain(..) {
        probes.launch(l);
    }
    for id in fx.aborts.drain(..) {
        probes.abort(id);
    }
    for r in fx.reports.drain(..) {
        if !registry.health(r.service, r.ip, r.change).await {
            return false;
        }
    }
    true
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

#[cfg(test)]
mod tests;
