//! Rise/fall hysteresis: the pure state machine that turns single probe
//! results into the probe verdict the registry publishes.
//!
//! An endpoint turns unhealthy after `fall` consecutive failures and healthy
//! after `rise` consecutive successes. A new endpoint starts `Unknown`, which
//! counts as healthy or unhealthy depending on `start_healthy`:
//!
//! - assumed healthy: the first success confirms it (`Up` at once), `fall`
//!   consecutive failures turn it `Down`;
//! - assumed unhealthy: the first failure reports `Down` at once (so people
//!   see why), `rise` consecutive successes turn it `Up`.
//!
//! While `Down`, the reason keeps the latest error and the count of
//! consecutive failures (capped at `fall`), so a steady outage publishes no
//! new snapshot per probe.

use std::sync::Arc;

use crate::model::ProbeState;

use super::probe::ProbeError;

/// The rise/fall counters of one endpoint and the verdict last reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    reported: ProbeState,
    /// Consecutive successes (reset by a failure).
    oks: u32,
    /// Consecutive failures (reset by a success), saturating.
    fails: u32,
    /// What the `Down` reason currently says: the error and the count of
    /// failures. The count never goes back while down.
    shown_error: Option<ProbeError>,
    shown_count: u32,
}

/// The thresholds the machine needs, taken from a `HealthSpec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
    pub start_healthy: bool,
}

impl Hysteresis {
    /// Starts from a verdict already published (a restarted probe keeps what
    /// the snapshot says) or from `Unknown` for a new endpoint.
    pub fn new(start: ProbeState) -> Self {
        // A published `Down` already stood for `fall` failures.
        let shown_count = if matches!(start, ProbeState::Down(_)) {
            u32::MAX
        } else {
            0
        };
        Self {
            reported: start,
            oks: 0,
            fails: 0,
            shown_error: None,
            shown_count,
        }
    }

    /// The verdict last reported (what the registry should hold).
    pub fn reported(&self) -> &ProbeState {
        &self.reported
    }

    /// True while counting towards a change of state: probes then run at
    /// the fast interval.
    pub fn changing(&self, t: Thresholds) -> bool {
        if self.counts_as_healthy(t) {
            self.fails > 0
        } else {
            self.oks > 0
        }
    }

    fn counts_as_healthy(&self, t: Thresholds) -> bool {
        match self.reported {
            ProbeState::Up => true,
            ProbeState::Down(_) => false,
            ProbeState::Unknown => t.start_healthy,
        }
    }

    /// Feeds one probe result; returns the new verdict when it changed.
    pub fn observe(&mut self, result: Result<(), ProbeError>, t: Thresholds) -> Option<ProbeState> {
        let rise = t.rise.max(1);
        let fall = t.fall.max(1);
        let healthy = self.counts_as_healthy(t);
        match result {
            Ok(()) => {
                self.fails = 0;
                self.oks = self.oks.saturating_add(1);
                let up = if healthy {
                    // Unknown-but-assumed-healthy is confirmed by one success.
                    self.reported == ProbeState::Unknown
                } else {
                    self.oks >= rise
                };
                up.then(|| self.set(ProbeState::Up))
            }
            Err(error) => {
                self.oks = 0;
                self.fails = self.fails.saturating_add(1);
                if healthy && self.fails < fall {
                    return None;
                }
                let shown = self.shown_count.min(fall);
                let count = self.fails.min(fall).max(shown);
                if self.shown_error == Some(error) && shown == count {
                    return None;
                }
                self.shown_error = Some(error);
                self.shown_count = count;
                let reason: Arc<str> = format!("probe failed: {error} {count}/{fall}").into();
                Some(self.set(ProbeState::Down(reason)))
            }
        }
    }

    fn set(&mut self, state: ProbeState) -> ProbeState {
        if state == ProbeState::Up {
            self.shown_error = None;
            self.shown_count = 0;
        }
        self.oks = 0;
        if !matches!(state, ProbeState::Down(_)) {
            self.fails = 0;
        }
        self.reported = state.clone();
        state
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 3,
        start_healthy: true,
    };
    const REFUSED: ProbeError = ProbeError::Io(ErrorKind::ConnectionRefused);

    fn down(reason: &str) -> Option<ProbeState> {
        Some(ProbeState::Down(reason.into()))
    }

    #[test]
    fn falls_after_fall_consecutive_failures() {
        let mut h = Hysteresis::new(ProbeState::Up);
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert!(h.changing(T));
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert_eq!(
            h.observe(Err(REFUSED), T),
            down("probe failed: connection refused 3/3")
        );
        assert_eq!(
            h.reported(),
            &ProbeState::Down("probe failed: connection refused 3/3".into())
        );
        assert!(!h.changing(T));
        // A steady outage reports nothing more.
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert_eq!(h.observe(Err(REFUSED), T), None);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut h = Hysteresis::new(ProbeState::Up);
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert_eq!(h.observe(Ok(()), T), None);
        assert!(!h.changing(T));
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert!(h.observe(Err(REFUSED), T).is_some());
    }

    #[test]
    fn rises_after_rise_consecutive_successes() {
        let mut h = Hysteresis::new(ProbeState::Down("x".into()));
        assert_eq!(h.observe(Ok(()), T), None);
        assert!(h.changing(T));
        // A failure in between starts the count again.
        assert_eq!(
            h.observe(Err(REFUSED), T),
            down("probe failed: connection refused 3/3")
        );
        assert_eq!(h.observe(Ok(()), T), None);
        assert_eq!(h.observe(Ok(()), T), Some(ProbeState::Up));
        assert!(!h.changing(T));
        assert_eq!(h.observe(Ok(()), T), None);
    }

    #[test]
    fn the_reason_follows_the_error_kind() {
        let mut h = Hysteresis::new(ProbeState::Up);
        for _ in 0..3 {
            h.observe(Err(REFUSED), T);
        }
        assert_eq!(
            h.observe(Err(ProbeError::Timeout), T),
            down("probe failed: timed out 3/3")
        );
        assert_eq!(
            h.observe(Err(ProbeError::Status(500)), T),
            down("probe failed: http status 500 3/3")
        );
        assert_eq!(h.observe(Err(ProbeError::Status(500)), T), None);
    }

    #[test]
    fn unknown_assumed_healthy_is_confirmed_by_one_success() {
        let mut h = Hysteresis::new(ProbeState::Unknown);
        assert_eq!(h.observe(Ok(()), T), Some(ProbeState::Up));
    }

    #[test]
    fn unknown_assumed_healthy_still_needs_fall_failures() {
        let mut h = Hysteresis::new(ProbeState::Unknown);
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert!(h.changing(T));
        assert_eq!(h.observe(Err(REFUSED), T), None);
        assert!(h.observe(Err(REFUSED), T).is_some());
    }

    #[test]
    fn unknown_assumed_unhealthy_needs_rise_and_shows_failures_at_once() {
        let t = Thresholds {
            start_healthy: false,
            ..T
        };
        let mut h = Hysteresis::new(ProbeState::Unknown);
        assert_eq!(h.observe(Ok(()), t), None);
        assert!(h.changing(t));
        assert_eq!(h.observe(Ok(()), t), Some(ProbeState::Up));

        let mut h = Hysteresis::new(ProbeState::Unknown);
        assert_eq!(
            h.observe(Err(REFUSED), t),
            down("probe failed: connection refused 1/3")
        );
        assert_eq!(
            h.observe(Err(REFUSED), t),
            down("probe failed: connection refused 2/3")
        );
        assert_eq!(
            h.observe(Err(REFUSED), t),
            down("probe failed: connection refused 3/3")
        );
        assert_eq!(h.observe(Err(REFUSED), t), None);
    }

    #[test]
    fn rise_and_fall_of_one_flip_at_once() {
        let t = Thresholds {
            rise: 1,
            fall: 1,
            start_healthy: true,
        };
        let mut h = Hysteresis::new(ProbeState::Up);
        assert!(h.observe(Err(ProbeError::Timeout), t).is_some());
        assert_eq!(h.observe(Ok(()), t), Some(ProbeState::Up));
        assert!(!h.changing(t));
    }
}
