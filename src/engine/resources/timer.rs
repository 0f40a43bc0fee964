//! `timer`: every `interval` seconds, an event that reaches the timer's dependents.
//!
//! After mgmt's timer: its watch is a ticker, nothing is polled. A tick makes the timer check
//! again, and that check reports the tick as a change, so its dependents are checked and a
//! `notify` edge refreshes them (an exec re-runs). A refresh of the timer itself (a notify
//! edge into it) starts its interval over, as in mgmt, and passes on as a change too. Between
//! ticks the timer is in its desired state.

use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerSpec {
    pub name: String,
    /// Seconds between ticks; at least 1 (the graph parser refuses 0).
    pub interval: u32,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

pub struct TimerResource {
    id: ResourceId,
    interval: Duration,
    /// Set by a tick, taken by the check that follows it.
    ticked: AtomicBool,
    /// Told by a refreshed check: the watch starts the interval over.
    restart: Notify,
}

impl TimerResource {
    pub fn new(spec: TimerSpec) -> Self {
        TimerResource {
            id: ResourceId::new(Kind::Timer, spec.name),
            // A zero period would tick without end; the parser refuses it, this guards the rest.
            interval: Duration::from_secs(spec.interval.max(1).into()),
            ticked: AtomicBool::new(false),
            restart: Notify::new(),
        }
    }

    fn tick(&self) {
        self.ticked.store(true, Ordering::SeqCst);
    }

    fn check(&self, ctx: ApplyContext) -> Outcome {
        let ticked = self.ticked.swap(false, Ordering::SeqCst);
        let secs = self.interval.as_secs();
        if ctx.refresh {
            let what = format!("refreshed: its {secs}s interval starts over");
            if ctx.noop {
                return Outcome::WouldChange(what);
            }
            self.restart.notify_one();
            return Outcome::Changed(what);
        }
        match (ticked, ctx.noop) {
            (false, _) => Outcome::Unchanged,
            (true, false) => Outcome::Changed(format!("tick ({secs}s)")),
            (true, true) => Outcome::WouldChange(format!("tick ({secs}s)")),
        }
    }

    async fn watch_inner(&self, poke: Poke, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval_at(Instant::now() + self.interval, self.interval);
        // As Go's ticker: a tick missed while the host was busy is dropped, not made up for.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = ticker.tick() => {
                    tracing::debug!("{}: tick", self.id);
                    self.tick();
                    poke.poke();
                }
                _ = self.restart.notified() => ticker.reset(),
            }
        }
    }
}

impl Resource for TimerResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(async move { Ok(self.check(ctx)) })
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.watch_inner(poke, cancel))
    }

    /// Under `meta.poll` the ticker does not run: each poll tick is a tick.
    fn polled(&self) {
        self.tick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timer(interval: u32) -> TimerResource {
        TimerResource::new(TimerSpec {
            name: "t".into(),
            interval,
            ..TimerSpec::default()
        })
    }

    const RUN: ApplyContext = ApplyContext {
        noop: false,
        refresh: false,
    };

    #[tokio::test]
    async fn each_interval_pokes_once_and_the_next_check_reports_the_tick() {
        let res = std::sync::Arc::new(timer(1));
        assert_eq!(res.id().to_string(), "timer[t]");
        // Before any tick: in its desired state.
        assert_eq!(res.check(RUN), Outcome::Unchanged);
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        let start = Instant::now();
        for n in 1..=3u32 {
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a poke per tick");
            let at = start.elapsed();
            let want = Duration::from_secs(n.into());
            assert!(
                at >= want && at < want + Duration::from_millis(500),
                "tick {n} came at {at:?}"
            );
            assert!(matches!(res.check(RUN), Outcome::Changed(ref m) if m.contains("tick")));
            // The tick is taken: the next check finds nothing to do.
            assert_eq!(res.check(RUN), Outcome::Unchanged);
            assert!(rx.try_recv().is_err(), "more than one poke for tick {n}");
        }
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    #[tokio::test]
    async fn a_refresh_starts_the_interval_over_and_passes_on() {
        let res = std::sync::Arc::new(timer(2));
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let refresh = ApplyContext {
            noop: false,
            refresh: true,
        };
        assert!(matches!(res.check(refresh), Outcome::Changed(ref m) if m.contains("starts over")));
        let at = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the next tick");
        assert!(
            at.elapsed() >= Duration::from_millis(1900),
            "the tick came {:?} after the refresh, not a whole interval",
            at.elapsed()
        );
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    #[test]
    fn noop_reports_a_tick_or_refresh_and_restarts_nothing() {
        let res = timer(5);
        res.tick();
        let noop = ApplyContext {
            noop: true,
            refresh: false,
        };
        assert!(matches!(res.check(noop), Outcome::WouldChange(_)));
        assert_eq!(res.check(noop), Outcome::Unchanged);
        let noop_refresh = ApplyContext {
            noop: true,
            refresh: true,
        };
        assert!(matches!(res.check(noop_refresh), Outcome::WouldChange(_)));
        // No restart was asked for: a notified() would complete at once if it had been.
        let restarted = res.restart.notified();
        futures::pin_mut!(restarted);
        assert!(
            futures::FutureExt::now_or_never(restarted.as_mut()).is_none(),
            "noop restarted the interval"
        );
    }

    #[test]
    fn a_poll_tick_is_a_tick() {
        let res = timer(5);
        res.polled();
        assert!(matches!(res.check(RUN), Outcome::Changed(_)));
    }
}
