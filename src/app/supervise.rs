//! Supervision: every loop of a running beacon sits in one [`JoinSet`]
//! under its name. A loop that ends, fails or panics before shutdown was
//! requested is fatal: the app logs it at `error` with the loop's name and
//! exits 1, because a frozen registry or health loop would otherwise leave
//! DNS and the proxy serving a stale snapshot in silence.
//!
//! A test-only fault hook makes one named loop fail on purpose:
//! `BEACON_TEST_FAULT=<loop>:<panic|exit>[@<ms>]` (default after 300 ms;
//! `source/file` names every file source, `source/file:PATH` one of them).
//! The loop's own future runs until then, so the supervisor sees a real
//! running loop die.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};

/// After a loop dies, how long to wait for others that die with it before
/// stopping everything: they are named in the log beside it.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The env var of the fault hook.
pub const FAULT_ENV: &str = "BEACON_TEST_FAULT";

/// How a supervised loop ended.
#[derive(Debug)]
pub struct Ended {
    pub name: String,
    pub how: End,
}

#[derive(Debug)]
pub enum End {
    Returned,
    Failed(anyhow::Error),
    Panicked(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.how {
            End::Returned => write!(f, "loop `{}` ended", self.name),
            End::Failed(e) => write!(f, "loop `{}` failed: {e:#}", self.name),
            End::Panicked(p) => write!(f, "loop `{}` panicked: {p}", self.name),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Fault {
    target: String,
    panic: bool,
    after: Duration,
}

impl Fault {
    /// `source/file` hits `source/file:/etc/beacon/services.toml`.
    fn hits(&self, name: &str) -> bool {
        name == self.target
            || name
                .strip_prefix(self.target.as_str())
                .is_some_and(|rest| rest.starts_with(':'))
    }

    fn from_env() -> Option<Fault> {
        parse_fault(&std::env::var(FAULT_ENV).ok()?)
    }
}

fn parse_fault(spec: &str) -> Option<Fault> {
    let (spec, after) = match spec.split_once('@') {
        Some((s, ms)) => (s, Duration::from_millis(ms.parse().ok()?)),
        None => (spec, Duration::from_millis(300)),
    };
    let (target, kind) = spec.rsplit_once(':')?;
    let panic = match kind {
        "panic" => true,
        "exit" => false,
        _ => return None,
    };
    Some(Fault {
        target: target.to_string(),
        panic,
        after,
    })
}

/// The loops of one running beacon.
pub struct Loops {
    set: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, String>,
    fault: Option<Fault>,
}

impl Default for Loops {
    fn default() -> Self {
        Self::new()
    }
}

impl Loops {
    pub fn new() -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
            fault: Fault::from_env(),
        }
    }

    /// Runs `task` as the loop `name`, in a span of that name.
    pub fn spawn<F, E>(&mut self, name: impl Into<String>, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error>,
    {
        let name = name.into();
        let span = tracing::info_span!("loop", name = %name);
        let fault = self.fault.clone().filter(|f| f.hits(&name));
        let task = async move {
            let Some(fault) = fault else {
                return task.await.map_err(Into::into);
            };
            tokio::select! {
                r = task => r.map_err(Into::into),
                _ = tokio::time::sleep(fault.after) => {
                    if fault.panic {
                        panic!("fault injected ({FAULT_ENV})");
                    }
                    Ok(())
                }
            }
        };
        let handle = self.set.spawn(tracing::Instrument::instrument(task, span));
        self.names.insert(handle.id(), name);
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Waits for the next loop to end, however it ends. Pending forever
    /// when there is none.
    pub async fn next_end(&mut self) -> Ended {
        let Some(joined) = self.set.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let (id, how) = match joined {
            Ok((id, Ok(()))) => (id, End::Returned),
            Ok((id, Err(e))) => (id, End::Failed(e)),
            Err(e) => {
                let id = e.id();
                let how = if e.is_panic() {
                    End::Panicked(panic_message(e.try_into_panic().ok()))
                } else {
                    End::Panicked("cancelled".into())
                };
                (id, how)
            }
        };
        let name = self.names.remove(&id).unwrap_or_else(|| "?".into());
        Ended { name, how }
    }

    /// After shutdown: waits for every loop, logging the ones that failed.
    pub async fn drain(&mut self) {
        while !self.set.is_empty() {
            let ended = self.next_end().await;
            match ended.how {
                End::Returned => tracing::debug!(name = %ended.name, "loop stopped"),
                _ => tracing::warn!("during shutdown: {ended}"),
            }
        }
    }

    /// The names of the loops still running.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.names.values().cloned().collect();
        names.sort();
        names
    }

    /// Stops whatever is left at once.
    pub fn abort_all(&mut self) {
        self.set.abort_all();
    }
}

fn panic_message(payload: Option<Box<dyn std::any::Any + Send>>) -> String {
    let Some(payload) = payload else {
        return "(no message)".into();
    };
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        assert_eq!(
            parse_fault("health:panic"),
            Some(Fault {
                target: "health".into(),
                panic: true,
                after: Duration::from_millis(300)
            })
        );
        let f = parse_fault("source/file:services.toml:exit@50").unwrap();
        assert_eq!(f.target, "source/file:services.toml");
        assert!(!f.panic);
        assert_eq!(f.after, Duration::from_millis(50));
        assert!(f.hits("source/file:services.toml"));
        let f = parse_fault("source/file:panic").unwrap();
        assert!(f.hits("source/file:/etc/services.toml"));
        assert!(!f.hits("source/files"));
        assert!(!f.hits("source/docker"));
        assert_eq!(parse_fault("health"), None);
        assert_eq!(parse_fault("health:boom"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_ends_panics_or_fails_is_reported_by_name() {
        let mut loops = Loops {
            fault: None,
            ..Loops::new()
        };
        loops.spawn("quiet", async {
            std::future::pending::<()>().await;
            Ok::<(), std::io::Error>(())
        });
        loops.spawn("panics", async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        });
        loops.spawn("fails", async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Err(std::io::Error::other("disk on fire"))
        });
        loops.spawn("returns", async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<(), std::io::Error>(())
        });
        let e = loops.next_end().await;
        assert_eq!(e.name, "panics");
        assert!(matches!(&e.how, End::Panicked(m) if m == "boom"), "{e}");
        let e = loops.next_end().await;
        assert_eq!(e.to_string(), "loop `fails` failed: disk on fire");
        let e = loops.next_end().await;
        assert_eq!(e.to_string(), "loop `returns` ended");
        assert_eq!(loops.len(), 1);
        loops.abort_all();
        let e = loops.next_end().await;
        assert_eq!(e.name, "quiet");
    }

    #[tokio::test(start_paused = true)]
    async fn the_fault_hook_kills_only_its_target_after_the_delay() {
        let mut loops = Loops {
            fault: parse_fault("victim:panic@500"),
            ..Loops::new()
        };
        let started = tokio::time::Instant::now();
        for name in ["bystander", "victim"] {
            loops.spawn(name, async {
                std::future::pending::<()>().await;
                Ok::<(), std::io::Error>(())
            });
        }
        let e = loops.next_end().await;
        assert_eq!(e.name, "victim");
        assert!(matches!(e.how, End::Panicked(_)));
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert_eq!(loops.len(), 1);
    }
}
