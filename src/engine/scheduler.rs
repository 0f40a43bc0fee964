//! The scheduler: which resource to check next, and what its outcome means for the others.
//!
//! Every resource is a vertex with a watch task (its events arrive as pokes) and at most one
//! check running at a time. A vertex runs once every resource it depends on has been applied;
//! vertices whose dependencies are met run concurrently, so independent branches do not wait
//! for each other. A failure blocks only the vertices that depend on it, until it recovers.
//! A change in a vertex makes its dependents check again, and a notify edge also refreshes
//! them (an exec re-runs).

use crate::engine::converge::Load;
use crate::engine::exchange::ExportedResource;
use crate::engine::graph::Edge;
use crate::engine::reload::Diff;
use crate::engine::resources::{
    self, ApplyContext, Kind, Outcome, Poke, Resource, ResourceId, ResourceSpec, Services,
};
use futures::FutureExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::sync::mpsc;
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
}

pub struct Scheduler {
    vertices: BTreeMap<ResourceId, Vertex>,
    /// to → from, for each edge.
    deps: HashMap<ResourceId, Vec<ResourceId>>,
    /// from → (to, notify), for each edge.
    dependents: HashMap<ResourceId, Vec<(ResourceId, bool)>>,
    /// Vertices that want a check.
    pending: BTreeSet<ResourceId>,
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
}

impl Scheduler {
    pub fn new(services: Services, noop: bool, events: mpsc::UnboundedSender<Event>) -> Self {
        Scheduler {
            vertices: BTreeMap::new(),
            deps: HashMap::new(),
            dependents: HashMap::new(),
            pending: BTreeSet::new(),
            in_flight: HashSet::new(),
            checks: JoinSet::new(),
            events,
            services,
            noop,
            next_generation: 0,
            watches: CancellationToken::new(),
        }
    }

    /// The running specs, for diffing against a new desired set.
    pub fn specs(&self) -> impl Iterator<Item = (&ResourceId, &ResourceSpec)> {
        self.vertices.iter().map(|(id, v)| (id, &v.spec))
    }

    pub fn ids(&self) -> Vec<ResourceId> {
        self.vertices.keys().cloned().collect()
    }

    /// Applies a diff and replaces the edge set. Unchanged vertices keep their state, their
    /// watch and any check in flight.
    pub fn apply(&mut self, diff: Diff, edges: &[Edge]) {
        for id in diff.removed {
            if let Some(v) = self.vertices.remove(&id) {
                v.watch.cancel();
                tracing::info!("{id}: no longer managed");
            }
            self.pending.remove(&id);
        }
        for spec in diff.changed.into_iter().chain(diff.added) {
            let id = spec.id();
            if let Some(old) = self.vertices.remove(&id) {
                old.watch.cancel();
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let resource = resources::build(&spec, &self.services);
            let watch = self.start_watch(id.clone(), generation, resource.clone());
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
                },
            );
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
    }

    fn start_watch(
        &self,
        id: ResourceId,
        generation: u64,
        resource: Arc<dyn Resource>,
    ) -> CancellationToken {
        let token = self.watches.child_token();
        let events = self.events.clone();
        let poke = {
            let (events, id) = (events.clone(), id.clone());
            Poke::new(move || {
                let _ = events.send(Event::Poke {
                    id: id.clone(),
                    generation,
                });
            })
        };
        let cancel = token.clone();
        tokio::spawn(async move {
            let result = resource.watch(poke, cancel.clone()).await;
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
        if self.current(id, generation).is_some() {
            self.pending.insert(id.clone());
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
        let Some(v) = self.current(id, generation) else {
            return false;
        };
        match result {
            Ok(()) => false,
            Err(e) => {
                let msg = format!("watch: {e:#}");
                tracing::error!("{id}: {msg}");
                v.watch_error = Some(msg);
                true
            }
        }
    }

    fn current(&mut self, id: &ResourceId, generation: u64) -> Option<&mut Vertex> {
        self.vertices
            .get_mut(id)
            .filter(|v| v.generation == generation)
    }

    /// Starts a check for every pending vertex whose dependencies are applied.
    pub fn launch_ready(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for id in pending {
            if self.checks.len() >= MAX_CONCURRENT_CHECKS || self.in_flight.contains(&id) {
                // Stays pending: launched when a slot frees, or checked again once the
                // running check ends.
                self.pending.insert(id);
                continue;
            }
            let blocker = self.blocker(&id);
            let Some(v) = self.vertices.get_mut(&id) else {
                continue;
            };
            match blocker {
                Readiness::Ready => {}
                Readiness::Waiting => {
                    self.pending.insert(id);
                    continue;
                }
                Readiness::Blocked(dep) => {
                    if v.state != State::Blocked(dep.clone()) {
                        tracing::warn!("{id}: blocked: it depends on {dep}, which failed");
                        v.state = State::Blocked(dep);
                    }
                    self.pending.insert(id);
                    continue;
                }
            }
            self.in_flight.insert(id.clone());
            let ctx = ApplyContext {
                noop: self.noop,
                refresh: std::mem::take(&mut v.refresh),
            };
            let (resource, generation) = (v.resource.clone(), v.generation);
            self.checks.spawn(async move {
                let result = AssertUnwindSafe(resource.check_apply(ctx))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("check panicked")));
                CheckDone {
                    id,
                    generation,
                    result,
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
        } = done;
        self.in_flight.remove(&id);
        let Some(v) = self.current(&id, generation) else {
            return false;
        };
        match result {
            Ok(Outcome::Unchanged) => {
                // Recovering from a failure is news; a first check that finds all well is not.
                let recovered = matches!(v.state, State::Failed(_) | State::Blocked(_));
                v.state = State::Applied;
                recovered
            }
            Ok(outcome) => {
                match &outcome {
                    Outcome::Changed(what) => tracing::info!("{id}: {what}"),
                    Outcome::WouldChange(what) => tracing::info!("{id}: noop: {what}"),
                    Outcome::Unchanged => {}
                }
                v.state = State::Applied;
                for (to, notify) in self.dependents.get(&id).into_iter().flatten() {
                    if let Some(dependent) = self.vertices.get_mut(to) {
                        dependent.refresh |= notify;
                        self.pending.insert(to.clone());
                    }
                }
                true
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::error!("{id}: {msg}");
                v.state = State::Failed(msg);
                true
            }
        }
    }

    pub fn load(&self) -> Load {
        Load {
            busy: self.busy(),
            healthy: self.vertices.values().all(|v| {
                v.watch_error.is_none() && matches!(v.state, State::Applied | State::Unchecked)
            }),
        }
    }

    /// Resources that failed or are blocked, with why.
    pub fn failures(&self) -> BTreeMap<ResourceId, String> {
        self.vertices
            .iter()
            .filter_map(|(id, v)| {
                let why = match (&v.state, &v.watch_error) {
                    (State::Failed(msg), _) => msg.clone(),
                    (State::Blocked(dep), _) => format!("blocked by {dep}"),
                    (_, Some(msg)) => msg.clone(),
                    _ => return None,
                };
                Some((id.clone(), why))
            })
            .collect()
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

enum Readiness {
    Ready,
    Waiting,
    Blocked(ResourceId),
}
