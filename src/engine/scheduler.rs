//! The scheduler: which resource to check next, and what its outcome means for the others.
//!
//! Every resource is a vertex with a watch task (its events arrive as pokes) and at most one
//! check running at a time. A vertex runs once every resource it depends on has been applied;
//! vertices whose dependencies are met run concurrently, so independent branches do not wait
//! for each other. A failure blocks only the vertices that depend on it, until it recovers.
//! A change in a vertex makes its dependents check again, and a notify edge also refreshes
//! them (an exec re-runs).

use crate::engine::collect::is_collected;
use crate::engine::converge::Load;
use crate::engine::exchange::ExportedResource;
use crate::engine::graph::Edge;
use crate::engine::reload::Diff;
use crate::engine::resources::meta::sema_count;
use crate::engine::resources::{
    self, ApplyContext, Kind, Meta, Outcome, Poke, Resource, ResourceId, ResourceSpec, Services,
};
use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// At most this many checks at once: a graph of a thousand files should not start a thousand
/// blocking threads. The rest wait their turn in `pending`.
pub const MAX_CONCURRENT_CHECKS: usize = 64;

/// Everything that wakes the engine besides finished checks, on one channel.
pub enum Event {
    /// A watch saw something: check the resource again. `generation` tells a replaced
    /// resource's late pokes from the current one's.
    Poke { id: ResourceId, generation: u64 },
    /// A watch returned (an error means the resource is no longer watched).
    WatchEnded {
        id: ResourceId,
        generation: u64,
        result: anyhow::Result<()>,
    },
    /// The full current set of a collected kind, from the store.
    Collected {
        kind: Kind,
        exports: anyhow::Result<Vec<ExportedResource>>,
    },
}

/// A finished check.
pub struct CheckDone {
    id: ResourceId,
    generation: u64,
    result: anyhow::Result<Outcome>,
    /// Retries (`meta.retry`) this check spent.
    retries: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Not checked yet since it was added or changed.
    Unchecked,
    /// Its last check succeeded: in the desired state (or, in noop mode, reported).
    Applied,
    Failed(String),
    /// Waiting for a dependency that failed (or is itself blocked).
    Blocked(ResourceId),
}

struct Vertex {
    spec: ResourceSpec,
    resource: Arc<dyn Resource>,
    generation: u64,
    state: State,
    refresh: bool,
    watch: CancellationToken,
    watch_error: Option<String>,
    /// Retries spent so far (`meta.retry`), given back by `meta.retryreset` on success.
    retries_used: u32,
}

pub struct Scheduler {
    vertices: BTreeMap<ResourceId, Vertex>,
    /// to → from, for each edge.
    deps: HashMap<ResourceId, Vec<ResourceId>>,
    /// from → (to, notify), for each edge.
    dependents: HashMap<ResourceId, Vec<(ResourceId, bool)>>,
    /// Vertices that want a check.
    pending: BTreeSet<ResourceId>,
    /// Vertices worth looking at in [`Scheduler::launch_ready`]: poked, added, or one of their
    /// dependencies just finished. Looking only at these keeps each event's work small in a
    /// graph of thousands (a waiting vertex is not rescanned until a dependency moves).
    candidates: VecDeque<ResourceId>,
    /// Failed or blocked vertices, and those whose watch broke, with why; kept up to date on
    /// every state change so health is known without a scan.
    failures: BTreeMap<ResourceId, String>,
    /// Bumped whenever `failures` changes, so observers copy it only then.
    failures_version: u64,
    /// Ids with a check running, whatever its generation: a replaced resource's new version
    /// waits for the old one's check to end, so two never run at once (an exec twice).
    in_flight: HashSet<ResourceId>,
    checks: JoinSet<CheckDone>,
    events: mpsc::UnboundedSender<Event>,
    services: Services,
    noop: bool,
    next_generation: u64,
    /// Parent of every vertex's watch token.
    watches: CancellationToken,
    /// `meta.sema`: one semaphore per id, shared by every resource naming it.
    semas: HashMap<String, Arc<Semaphore>>,
    /// Changes made by collected resources' checks, logged at debug only, until
    /// [`Scheduler::take_collected_changes`] (the host summarizes them: collect.rs).
    collected_changes: Vec<CollectedChange>,
    /// A removed vertex's check ended: [`Scheduler::ids`] shrank outside of `apply`.
    departed_check_ended: bool,
}

/// A collected resource's check changed something, or would have under noop.
pub struct CollectedChange {
    pub id: ResourceId,
    pub what: String,
    pub would: bool,
}

impl Scheduler {
    pub fn new(services: Services, noop: bool, events: mpsc::UnboundedSender<Event>) -> Self {
        Scheduler {
            vertices: BTreeMap::new(),
            deps: HashMap::new(),
            dependents: HashMap::new(),
            pending: BTreeSet::new(),
            candidates: VecDeque::new(),
            failures: BTreeMap::new(),
            failures_version: 0,
            in_flight: HashSet::new(),
            checks: JoinSet::new(),
            events,
            services,
            noop,
            next_generation: 0,
            watches: CancellationToken::new(),
            semas: HashMap::new(),
            collected_changes: Vec::new(),
            departed_check_ended: false,
        }
    }

    /// What collected resources changed since the last call.
    pub fn take_collected_changes(&mut self) -> Vec<CollectedChange> {
        std::mem::take(&mut self.collected_changes)
    }

    /// The running specs, for diffing against a new desired set.
    pub fn specs(&self) -> impl Iterator<Item = (&ResourceId, &ResourceSpec)> {
        self.vertices.iter().map(|(id, v)| (id, &v.spec))
    }

    /// What this host manages: the vertices, and removed ones whose check is still running
    /// (that check may still write; the resource is left alone only once it ends).
    pub fn ids(&self) -> Vec<ResourceId> {
        let mut ids: Vec<ResourceId> = self.vertices.keys().cloned().collect();
        let departed = self
            .in_flight
            .iter()
            .filter(|id| !self.vertices.contains_key(*id));
        ids.extend(departed.cloned());
        ids.sort();
        ids
    }

    /// Whether a removed vertex's check ended since the last call, so [`Scheduler::ids`]
    /// changed without a diff.
    pub fn take_departed_check_ended(&mut self) -> bool {
        std::mem::take(&mut self.departed_check_ended)
    }

    /// Applies a diff and replaces the edge set. Unchanged vertices keep their state, their
    /// watch and any check in flight.
    pub fn apply(&mut self, diff: Diff, edges: &[Edge]) {
        let replaced: HashSet<ResourceId> = diff
            .changed
            .iter()
            .chain(&diff.added)
            .map(ResourceSpec::id)
            .collect();
        for id in diff.removed {
            if let Some(v) = self.vertices.remove(&id) {
                v.watch.cancel();
                // Collected ones come and go with their exporters: summarized (collect.rs).
                if is_collected(&id) {
                    tracing::debug!("{id}: no longer managed");
                } else {
                    tracing::info!("{id}: no longer managed");
                }
            }
            self.pending.remove(&id);
            if self.failures.remove(&id).is_some() {
                self.failures_version += 1;
            }
        }
        for spec in diff.changed.into_iter().chain(diff.added) {
            let id = spec.id();
            let mut retries_used = 0;
            if let Some(old) = self.vertices.remove(&id) {
                old.watch.cancel();
                // As mgmt: retries spent survive a change of the resource unless `meta.reset`.
                if !spec.meta().reset {
                    retries_used = old.retries_used;
                }
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let resource = resources::build(&spec, &self.services);
            let watch = self.start_watch(id.clone(), generation, resource.clone(), spec.meta());
            self.vertices.insert(
                id.clone(),
                Vertex {
                    spec,
                    resource,
                    generation,
                    state: State::Unchecked,
                    refresh: false,
                    watch,
                    watch_error: None,
                    retries_used,
                },
            );
            if self.failures.remove(&id).is_some() {
                self.failures_version += 1;
            }
            self.pending.insert(id);
        }
        // `meta.rewatch`: a kept resource whose watch broke gets a new one.
        let rewatch: Vec<ResourceId> = self
            .vertices
            .iter()
            .filter(|(id, v)| {
                !replaced.contains(*id) && v.watch_error.is_some() && v.spec.meta().rewatch
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in rewatch {
            let Some(v) = self.vertices.get(&id) else {
                continue;
            };
            let (resource, generation, meta) =
                (v.resource.clone(), v.generation, v.spec.meta().clone());
            tracing::info!("{id}: watching again (meta.rewatch)");
            let watch = self.start_watch(id.clone(), generation, resource, &meta);
            if let Some(v) = self.vertices.get_mut(&id) {
                v.watch.cancel();
                v.watch = watch;
                v.watch_error = None;
                record(&mut self.failures, &mut self.failures_version, &id, v);
            }
            self.pending.insert(id);
        }
        self.deps.clear();
        self.dependents.clear();
        for e in edges {
            self.deps
                .entry(e.to.clone())
                .or_default()
                .push(e.from.clone());
            self.dependents
                .entry(e.from.clone())
                .or_default()
                .push((e.to.clone(), e.notify));
        }
        // Readiness may have moved with the edges and the removals.
        self.candidates.extend(self.pending.iter().cloned());
    }

    /// Starts what pokes a resource: its own watch, or with `meta.poll` a timer (or nothing
    /// for -1); with `meta.limit`, pokes pass through a rate limiter.
    fn start_watch(
        &self,
        id: ResourceId,
        generation: u64,
        resource: Arc<dyn Resource>,
        meta: &Meta,
    ) -> CancellationToken {
        let token = self.watches.child_token();
        let events = self.events.clone();
        let send = {
            let (events, id) = (events.clone(), id.clone());
            move || {
                let _ = events.send(Event::Poke {
                    id: id.clone(),
                    generation,
                });
            }
        };
        let poke = match meta.limit {
            None => Poke::new(send),
            Some(rate) => {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(rate_limit(rx, rate.0, meta.burst, token.clone(), send));
                Poke::new(move || {
                    let _ = tx.send(());
                })
            }
        };
        let cancel = token.clone();
        let poll = meta.poll;
        let (retries, delay) = (meta.retries_left(0), meta.delay());
        tokio::spawn(async move {
            let result = match poll {
                0 => watch_with_retries(&*resource, poke, &cancel, retries, delay).await,
                // Checked on load and when a dependency changes, never on its own.
                p if p < 0 => Ok(()),
                secs => {
                    let period = Duration::from_secs(secs.unsigned_abs().into());
                    let mut timer =
                        tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => break Ok(()),
                            _ = timer.tick() => {
                                resource.polled();
                                poke.poke();
                            }
                        }
                    }
                }
            };
            if !cancel.is_cancelled() {
                let _ = events.send(Event::WatchEnded {
                    id,
                    generation,
                    result,
                });
            }
        });
        token
    }

    /// A watch event: check again (coalesced with any check already wanted).
    pub fn poke(&mut self, id: &ResourceId, generation: u64) {
        if current(&mut self.vertices, id, generation).is_some() {
            self.pending.insert(id.clone());
            self.candidates.push_back(id.clone());
        }
    }

    /// A watch returned; an error is a failure of the resource. Returns whether anything
    /// changed (for convergence).
    pub fn watch_ended(
        &mut self,
        id: &ResourceId,
        generation: u64,
        result: anyhow::Result<()>,
    ) -> bool {
        let Some(v) = current(&mut self.vertices, id, generation) else {
            return false;
        };
        match result {
            Ok(()) => false,
            Err(e) => {
                let msg = format!("watch: {e:#}");
                tracing::error!("{id}: {msg}");
                v.watch_error = Some(msg);
                record(&mut self.failures, &mut self.failures_version, id, v);
                true
            }
        }
    }

    /// Starts a check for every candidate vertex that is pending and whose dependencies are
    /// applied, up to [`MAX_CONCURRENT_CHECKS`].
    pub fn launch_ready(&mut self) {
        while self.checks.len() < MAX_CONCURRENT_CHECKS {
            let Some(id) = self.candidates.pop_front() else {
                return;
            };
            // Already launched through an earlier copy in the queue, or running: its finish
            // makes it a candidate again.
            if !self.pending.contains(&id) || self.in_flight.contains(&id) {
                continue;
            }
            let blocker = self.blocker(&id);
            let Some(v) = self.vertices.get_mut(&id) else {
                self.pending.remove(&id);
                continue;
            };
            match blocker {
                Readiness::Ready => {}
                // A candidate again when a dependency finishes.
                Readiness::Waiting => continue,
                Readiness::Blocked(dep) => {
                    if v.state != State::Blocked(dep.clone()) {
                        tracing::warn!("{id}: blocked: it depends on {dep}, which failed");
                        v.state = State::Blocked(dep);
                        record(&mut self.failures, &mut self.failures_version, &id, v);
                    }
                    continue;
                }
            }
            self.pending.remove(&id);
            self.in_flight.insert(id.clone());
            let meta = v.spec.meta().clone();
            let ctx = ApplyContext {
                noop: self.noop || meta.noop,
                refresh: std::mem::take(&mut v.refresh),
            };
            let (resource, generation) = (v.resource.clone(), v.generation);
            let retries_left = meta.retries_left(v.retries_used);
            let mut semas: Vec<(&String, u32)> =
                meta.sema.iter().map(|s| (s, sema_count(s))).collect();
            // One order for every resource, so two never wait on each other's semaphores.
            semas.sort();
            semas.dedup();
            let semas: Vec<Arc<Semaphore>> = semas
                .into_iter()
                .map(|(name, count)| {
                    self.semas
                        .entry(name.clone())
                        .or_insert_with(|| Arc::new(Semaphore::new(count as usize)))
                        .clone()
                })
                .collect();
            self.checks.spawn(async move {
                let (result, retries) =
                    check_with_meta(&id, resource, ctx, &meta, retries_left, &semas).await;
                CheckDone {
                    id,
                    generation,
                    result,
                    retries,
                }
            });
        }
    }

    fn blocker(&self, id: &ResourceId) -> Readiness {
        let mut ready = Readiness::Ready;
        for dep in self.deps.get(id).into_iter().flatten() {
            match self.vertices.get(dep).map(|v| &v.state) {
                // Removed by a reload in progress: no longer a constraint.
                None | Some(State::Applied) => {}
                Some(State::Failed(_)) | Some(State::Blocked(_)) => {
                    return Readiness::Blocked(dep.clone());
                }
                Some(State::Unchecked) => ready = Readiness::Waiting,
            }
        }
        ready
    }

    /// Whether a check is running; [`Scheduler::next_done`] returns `None` otherwise.
    pub fn busy(&self) -> bool {
        !self.checks.is_empty()
    }

    pub async fn next_done(&mut self) -> Option<CheckDone> {
        loop {
            match self.checks.join_next().await? {
                Ok(done) => return Some(done),
                // Only aborts (at shutdown) get here: panics are caught in the task.
                Err(_) => continue,
            }
        }
    }

    /// Records a finished check. Returns whether it changed anything (for convergence).
    pub fn finish(&mut self, done: CheckDone) -> bool {
        let CheckDone {
            id,
            generation,
            result,
            retries,
        } = done;
        self.in_flight.remove(&id);
        if !self.vertices.contains_key(&id) {
            self.departed_check_ended = true;
        }
        // Poked while running (or replaced by a new version): look at it again.
        if self.pending.contains(&id) {
            self.candidates.push_back(id.clone());
        }
        let Some(v) = current(&mut self.vertices, &id, generation) else {
            return false;
        };
        v.retries_used = v.retries_used.saturating_add(retries);
        if result.is_ok() && v.spec.meta().retry_reset {
            v.retries_used = 0;
        }
        let changed = match result {
            Ok(Outcome::Unchanged) => {
                // Recovering from a failure is news; a first check that finds all well is not.
                let recovered = matches!(v.state, State::Failed(_) | State::Blocked(_));
                v.state = State::Applied;
                recovered
            }
            Ok(outcome) => {
                // A collected resource's change is logged at debug and summarized per host
                // (collect.rs): in an all-to-all exchange a line each would be N² lines.
                let collected = is_collected(&id);
                match &outcome {
                    Outcome::Changed(what) if collected => tracing::debug!("{id}: {what}"),
                    Outcome::WouldChange(what) if collected => {
                        tracing::debug!("{id}: noop: {what}")
                    }
                    Outcome::Changed(what) => tracing::info!("{id}: {what}"),
                    Outcome::WouldChange(what) => tracing::info!("{id}: noop: {what}"),
                    Outcome::Unchanged => {}
                }
                if let (true, Outcome::Changed(what) | Outcome::WouldChange(what)) =
                    (collected, &outcome)
                {
                    self.collected_changes.push(CollectedChange {
                        id: id.clone(),
                        what: what.clone(),
                        would: matches!(outcome, Outcome::WouldChange(_)),
                    });
                }
                v.state = State::Applied;
                true
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!("{id}: {msg}");
                // The same failure again is not news: a resource that keeps failing on every
                // event must not keep the host from settling.
                let again = v.state == State::Failed(msg.clone());
                v.state = State::Failed(msg);
                !again
            }
        };
        record(&mut self.failures, &mut self.failures_version, &id, v);
        let applied_change = changed && v.state == State::Applied;
        // Dependents may now be ready (or blocked); a change also makes them check again,
        // and refreshes them along notify edges.
        for (to, notify) in self.dependents.get(&id).into_iter().flatten() {
            if let Some(dependent) = self.vertices.get_mut(to) {
                if applied_change {
                    dependent.refresh |= notify;
                    self.pending.insert(to.clone());
                }
                self.candidates.push_back(to.clone());
            }
        }
        changed
    }

    pub fn load(&self) -> Load {
        Load {
            busy: self.busy(),
            healthy: self.failures.is_empty(),
        }
    }

    /// Resources that failed or are blocked, with why.
    pub fn failures(&self) -> &BTreeMap<ResourceId, String> {
        &self.failures
    }

    /// Changes whenever [`Scheduler::failures`] does.
    pub fn failures_version(&self) -> u64 {
        self.failures_version
    }

    /// Stops every watch and check (exec children die with their tasks).
    pub fn shutdown(&mut self) {
        self.watches.cancel();
        self.checks.abort_all();
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One check under its metaparams: `sema` held while applying, `timeout` on each attempt, and
/// up to `retries_left` retries (`None`: without end) `delay` apart. Returns the result and
/// the retries spent.
async fn check_with_meta(
    id: &ResourceId,
    resource: Arc<dyn Resource>,
    ctx: ApplyContext,
    meta: &Meta,
    mut retries_left: Option<u32>,
    semas: &[Arc<Semaphore>],
) -> (anyhow::Result<Outcome>, u32) {
    let mut spent = 0;
    loop {
        let mut permits = Vec::with_capacity(semas.len());
        for sema in semas {
            match sema.clone().acquire_owned().await {
                Ok(p) => permits.push(p),
                Err(_) => return (Err(anyhow::anyhow!("semaphore closed")), spent),
            }
        }
        let attempt = AssertUnwindSafe(resource.check_apply(ctx)).catch_unwind();
        let result = match meta.timeout() {
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(r) => r,
                Err(_) => Ok(Err(anyhow::anyhow!(
                    "apply timed out after {} ms (meta.timeout)",
                    limit.as_millis()
                ))),
            },
            None => attempt.await,
        }
        .unwrap_or_else(|_| Err(anyhow::anyhow!("check panicked")));
        drop(permits);
        match (result, retries_left) {
            (Ok(outcome), _) => return (Ok(outcome), spent),
            (Err(e), Some(0)) => return (Err(e), spent),
            (Err(e), left) => {
                spent += 1;
                retries_left = left.map(|n| n - 1);
                let left = left.map_or("forever".to_string(), |n| format!("{} left", n - 1));
                tracing::warn!(
                    "{id}: {e:#}; retrying in {} ms (meta.retry, {left})",
                    meta.delay
                );
                tokio::time::sleep(meta.delay()).await;
            }
        }
    }
}

/// A resource's watch, started again (`delay` apart) after each error while `meta.retry`
/// allows (`None`: without end), as mgmt does; the watch keeps its own count.
async fn watch_with_retries(
    resource: &dyn Resource,
    poke: Poke,
    cancel: &CancellationToken,
    mut retries_left: Option<u32>,
    delay: Duration,
) -> anyhow::Result<()> {
    loop {
        let result = resource.watch(poke.clone(), cancel.clone()).await;
        match (result, retries_left) {
            (Err(e), left) if left != Some(0) && !cancel.is_cancelled() => {
                retries_left = left.map(|n| n - 1);
                tracing::warn!(
                    "{}: watch: {e:#}; watching again in {} ms (meta.retry)",
                    resource.id(),
                    delay.as_millis()
                );
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                // Whatever happened while nothing watched: look again.
                poke.poke();
            }
            (result, _) => return result,
        }
    }
}

/// `meta.limit` / `meta.burst`: a token bucket between a resource's pokes and the engine.
/// Pokes beyond the rate wait for a token; pokes that arrive while waiting are merged into
/// the one that passes next (a check covers them all).
async fn rate_limit(
    mut pokes: mpsc::UnboundedReceiver<()>,
    rate: f64,
    burst: u32,
    cancel: CancellationToken,
    send: impl Fn(),
) {
    let capacity = f64::from(burst.max(1));
    let mut tokens = capacity;
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            poke = pokes.recv() => if poke.is_none() { return },
        }
        let now = tokio::time::Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(capacity);
        last = now;
        if tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - tokens) / rate);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let now = tokio::time::Instant::now();
            tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(capacity);
            last = now;
            while pokes.try_recv().is_ok() {}
        }
        tokens -= 1.0;
        send();
    }
}

/// The vertex `id` if it is still the version `generation` (not replaced or removed since).
fn current<'a>(
    vertices: &'a mut BTreeMap<ResourceId, Vertex>,
    id: &ResourceId,
    generation: u64,
) -> Option<&'a mut Vertex> {
    vertices.get_mut(id).filter(|v| v.generation == generation)
}

/// Brings `failures` up to date with one vertex's state.
fn record(
    failures: &mut BTreeMap<ResourceId, String>,
    version: &mut u64,
    id: &ResourceId,
    v: &Vertex,
) {
    let why = match (&v.state, &v.watch_error) {
        (State::Failed(msg), _) => Some(msg.clone()),
        (State::Blocked(dep), _) => Some(format!("blocked by {dep}")),
        (_, Some(msg)) => Some(msg.clone()),
        _ => None,
    };
    let moved = match why {
        Some(why) if failures.get(id) == Some(&why) => false,
        Some(why) => {
            failures.insert(id.clone(), why);
            true
        }
        None => failures.remove(id).is_some(),
    };
    if moved {
        *version += 1;
    }
}

enum Readiness {
    Ready,
    Waiting,
    Blocked(ResourceId),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn the_rate_limit_lets_a_burst_through_and_merges_the_rest() {
        let (tx, rx) = mpsc::unbounded_channel();
        let sent = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let counter = sent.clone();
        tokio::spawn(rate_limit(rx, 2.0, 2, cancel.clone(), move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        for _ in 0..10 {
            tx.send(()).expect("send");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sent.load(Ordering::SeqCst), 2, "the burst passes at once");
        // The third waits for a token (half a second at 2/s) and stands for the other eight.
        tokio::time::sleep(Duration::from_millis(1400)).await;
        assert_eq!(sent.load(Ordering::SeqCst), 3);
        cancel.cancel();
    }
}
