//! Convergence: every resource in its desired state, and nothing changed for a quiet period.
//!
//! Only *changes* (a resource applied, a failure, a new graph, a collected resource that came
//! or went) restart the quiet period. A check that finds everything right does not, so the
//! engine's own writes echoing back through inotify do not make the flag flap in the store.

use std::time::Duration;
use tokio::time::Instant;

/// Default quiet period before a host calls itself converged.
pub const DEFAULT_QUIET: Duration = Duration::from_millis(500);

pub struct Convergence {
    quiet: Duration,
    last_change: Instant,
    converged: bool,
}

/// What the scheduler says right now.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// A check is running.
    pub busy: bool,
    /// No resource failed or is blocked by a failure.
    pub healthy: bool,
}

impl Convergence {
    pub fn new(quiet: Duration, now: Instant) -> Self {
        Convergence {
            quiet,
            last_change: now,
            converged: false,
        }
    }

    pub fn converged(&self) -> bool {
        self.converged
    }

    /// Something changed: the quiet period starts again.
    pub fn changed(&mut self, now: Instant) {
        self.last_change = now;
        self.converged = false;
    }

    /// Idle and quiet for the whole period (healthy or not): nothing more will happen by
    /// itself. The local runner ends a `--converged-timeout` run on this.
    pub fn settled(&self, load: Load, now: Instant) -> bool {
        !load.busy && now.duration_since(self.last_change) >= self.quiet
    }

    /// Re-evaluates the flag; returns the new value if it flipped.
    pub fn update(&mut self, load: Load, now: Instant) -> Option<bool> {
        let want = load.healthy && self.settled(load, now);
        // While busy, keep the last value: a check that finds nothing to do is not a change.
        let next = if load.busy && load.healthy {
            self.converged
        } else {
            want
        };
        (next != self.converged).then(|| {
            self.converged = next;
            next
        })
    }

    /// When to call [`Convergence::update`] again if nothing else happens: the end of the
    /// quiet period, if the scheduler is idle and it has not ended yet.
    pub fn deadline(&self, load: Load, now: Instant) -> Option<Instant> {
        (!load.busy && !self.settled(load, now)).then_some(self.last_change + self.quiet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Load = Load {
        busy: false,
        healthy: true,
    };
    const BUSY: Load = Load {
        busy: true,
        healthy: true,
    };

    #[test]
    fn converges_after_the_quiet_period_and_not_before() {
        let t0 = Instant::now();
        let q = Duration::from_millis(100);
        let mut c = Convergence::new(q, t0);
        assert_eq!(c.update(IDLE, t0 + q / 2), None);
        assert_eq!(c.deadline(IDLE, t0 + q / 2), Some(t0 + q));
        assert_eq!(c.update(IDLE, t0 + q), Some(true));
        assert!(c.converged());
    }

    #[test]
    fn a_change_unconverges_and_restarts_the_period() {
        let t0 = Instant::now();
        let q = Duration::from_millis(100);
        let mut c = Convergence::new(q, t0);
        c.update(IDLE, t0 + q);
        c.changed(t0 + q * 2);
        assert!(!c.converged());
        assert_eq!(c.update(IDLE, t0 + q * 2 + q / 2), None);
        assert_eq!(c.update(IDLE, t0 + q * 3), Some(true));
    }

    #[test]
    fn a_check_that_changes_nothing_does_not_flap_the_flag() {
        let t0 = Instant::now();
        let q = Duration::from_millis(100);
        let mut c = Convergence::new(q, t0);
        c.update(IDLE, t0 + q);
        assert_eq!(c.update(BUSY, t0 + q * 2), None);
        assert_eq!(c.update(IDLE, t0 + q * 3), None);
        assert!(c.converged());
    }

    #[test]
    fn failures_settle_but_never_converge() {
        let t0 = Instant::now();
        let q = Duration::from_millis(100);
        let mut c = Convergence::new(q, t0);
        let failed = Load {
            busy: false,
            healthy: false,
        };
        assert_eq!(c.update(failed, t0 + q * 5), None);
        assert!(c.settled(failed, t0 + q * 5));
        assert!(!c.converged());
    }
}
