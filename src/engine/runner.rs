//! One host's engine: the loop that ties the graph, the scheduler, the exchange and the
//! convergence flag together.
//!
//! Everything that can happen arrives on one `select!`: a finished check, a watch event, a
//! new set of collected exports from the store, a new graph (hot reload), the end of a quiet
//! period, or shutdown. The loop owns all state, so nothing here needs a lock.

use crate::engine::collect::{self, CollectSummary};
use crate::engine::converge::{Convergence, DEFAULT_QUIET, Load};
use crate::engine::diff::{DiffSink, ResourceDiff};
use crate::engine::exchange::{Exchange, ExportedResource};
use crate::engine::fs_events::FsEvents;
use crate::engine::graph::Graph;
use crate::engine::reload::diff;
use crate::engine::resources::{Kind, KvStore, ResourceId, ResourceSpec, Services};
use crate::engine::scheduler::{Event, Scheduler};
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pause before re-opening a broken store watch, so a store that is down is not hammered.
const REWATCH_DELAY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The name this host publishes under, and `{{hostname}}` in its graph.
    pub hostname: String,
    /// Check and report; change nothing, publish no exports.
    pub noop: bool,
    /// `--diff`: resources report what they change (or would change) as diffs, read from
    /// [`Engine::take_diffs`].
    pub diff: bool,
    /// How long nothing must change before the host is converged.
    pub quiet: Duration,
    /// The blobs of the graph's `source:` files on this host (engine::artifacts).
    pub artifacts: crate::engine::artifacts::ArtifactIndex,
    /// The trees of the graph's `source:` directories on this host.
    pub trees: crate::engine::artifacts::TreeIndex,
}

impl EngineConfig {
    pub fn new(hostname: impl Into<String>) -> Self {
        EngineConfig {
            hostname: hostname.into(),
            noop: false,
            diff: false,
            quiet: DEFAULT_QUIET,
            artifacts: Default::default(),
            trees: Default::default(),
        }
    }
}

/// What the engine reports about itself, for the runner, the UI and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Every resource applied and nothing changed for the quiet period.
    pub converged: bool,
    /// Idle and nothing changed for the quiet period, failures or not.
    pub settled: bool,
    /// Failed or blocked resources, with why.
    pub failures: BTreeMap<ResourceId, String>,
    /// The resources managed right now (the graph's and the collected ones).
    pub managed: Arc<Vec<ResourceId>>,
    /// Resources changed (or, in noop mode, found to need a change) since start.
    pub changes: u64,
    /// Collected kinds whose store watch is broken, with why. While one is, the host is not
    /// converged: it cannot know what it should collect.
    pub collect_errors: BTreeMap<Kind, String>,
    /// Why the host's exports could not be published: an exported file's source could not be
    /// read here. While it cannot, the host is not converged.
    pub export_error: Option<String>,
}

impl Status {
    /// Nothing failed, blocked or broken.
    pub fn healthy(&self) -> bool {
        self.failures.is_empty() && self.collect_errors.is_empty() && self.export_error.is_none()
    }
}

/// A running engine. Dropping it without [`Engine::stop`] stops the loop too, but without
/// waiting for it to withdraw the host's exports.
pub struct Engine {
    graphs: mpsc::UnboundedSender<Graph>,
    status: watch::Receiver<Status>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    fs: FsEvents,
    diffs: Option<mpsc::UnboundedReceiver<ResourceDiff>>,
}

impl Engine {
    /// Starts the engine on `graph`; needs a tokio runtime.
    pub fn start(
        graph: Graph,
        config: EngineConfig,
        exchange: Arc<dyn Exchange>,
    ) -> anyhow::Result<Engine> {
        let fs = FsEvents::new().map_err(|e| anyhow::anyhow!("inotify: {e}"))?;
        let (graphs_tx, graphs) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status::default());
        let cancel = CancellationToken::new();
        let (diff_sink, diffs) = if config.diff {
            let (sink, rx) = DiffSink::channel();
            (Some(sink), Some(rx))
        } else {
            (None, None)
        };
        let services = Services {
            fs: fs.clone(),
            diffs: diff_sink,
            artifacts: config.artifacts.clone(),
            trees: config.trees.clone(),
            kv: KvStore::new(exchange.clone(), config.hostname.clone()),
        };
        let host = HostLoop {
            scheduler: Scheduler::new(services, config.noop, events_tx.clone()),
            convergence: Convergence::new(config.quiet, Instant::now()),
            config,
            exchange,
            graph: Graph::default(),
            published: None,
            exports: ExportSources::new(),
            collected: HashMap::new(),
            collectors: HashMap::new(),
            events_tx,
            events,
            graphs,
            status: status_tx,
            changes: 0,
            managed: Arc::default(),
            reported_failures: 0,
            summary: CollectSummary::default(),
        };
        let task = tokio::spawn(host.run(graph, cancel.clone()));
        Ok(Engine {
            graphs: graphs_tx,
            status,
            cancel,
            task: Some(task),
            fs,
            diffs,
        })
    }

    /// With [`EngineConfig::diff`], the resources' diffs, in the order they were made (once:
    /// later calls return `None`).
    pub fn take_diffs(&mut self) -> Option<mpsc::UnboundedReceiver<ResourceDiff>> {
        self.diffs.take()
    }

    /// Hot reload: the engine diffs `graph` against what runs and applies the difference.
    pub fn load_graph(&self, graph: Graph) {
        let _ = self.graphs.send(graph);
    }

    /// A sender for new graphs, for a file watcher (see `reload::follow_graph_file`).
    pub fn graph_sender(&self) -> mpsc::UnboundedSender<Graph> {
        self.graphs.clone()
    }

    /// The engine's inotify instance, to share with a graph file watcher.
    pub fn fs_events(&self) -> FsEvents {
        self.fs.clone()
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits until `pred` holds for the status, or `timeout`; returns the last status seen
    /// and whether it held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl FnMut(&Status) -> bool,
    ) -> (Status, bool) {
        let mut rx = self.status.clone();
        let held = match tokio::time::timeout(timeout, rx.wait_for(pred)).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        match held {
            Some(s) => (s, true),
            None => (self.status.borrow().clone(), false),
        }
    }

    /// Stops every watch and check, withdraws this host from the exchange, and waits.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Collector {
    stop: CancellationToken,
    state: CollectState,
}

/// The reading of exported files' sources (see [`HostLoop::publish`]).
struct ExportSources {
    /// Bumped by every publish: a read for an older one is dropped.
    generation: u64,
    /// A read is under way for the current generation.
    reading: bool,
    /// Why the current generation's sources could not be read.
    failed: Option<String>,
    tx: mpsc::UnboundedSender<(u64, anyhow::Result<Vec<ResourceSpec>>)>,
    read: mpsc::UnboundedReceiver<(u64, anyhow::Result<Vec<ResourceSpec>>)>,
}

impl ExportSources {
    fn new() -> Self {
        let (tx, read) = mpsc::unbounded_channel();
        ExportSources {
            generation: 0,
            reading: false,
            failed: None,
            tx,
            read,
        }
    }
}

/// The exports as collectors get them: an exported file's `source` goes as its content, the
/// bytes of this host's artifact for it (verified, and waited for while it arrives). The
/// initiator checked that it is text that fits an export (node::artifacts::EXPORTED_SOURCES_MAX).
fn with_sources(
    exports: Vec<ResourceSpec>,
    artifacts: &crate::engine::artifacts::ArtifactIndex,
) -> anyhow::Result<Vec<ResourceSpec>> {
    exports
        .into_iter()
        .map(|spec| {
            let ResourceSpec::File(mut f) = spec else {
                return Ok(spec);
            };
            let Some(source) = f.source.take() else {
                return Ok(ResourceSpec::File(f));
            };
            let what = format!("exported file {}: source `{source}`", f.name);
            let artifact = artifacts
                .get(&source)
                .ok_or_else(|| anyhow::anyhow!("{what}: this host was given no artifact for it"))?;
            let bytes = artifact
                .read_verified()
                .map_err(|e| anyhow::anyhow!("{what}: {e:#}"))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("{what}: not UTF-8 text, which an export carries"))?;
            f.content = Some(text);
            Ok(ResourceSpec::File(f))
        })
        .collect()
}

enum CollectState {
    /// Started; the first set has not arrived. Counts as busy: convergence waits for it.
    Waiting,
    Live,
    Broken(String),
}

struct HostLoop {
    config: EngineConfig,
    exchange: Arc<dyn Exchange>,
    graph: Graph,
    /// The exports last published successfully; `None` before the first time.
    published: Option<Vec<ResourceSpec>>,
    /// Exported files' sources being read, off the loop (an artifact may still be arriving),
    /// and what came of it: see [`HostLoop::publish`].
    exports: ExportSources,
    scheduler: Scheduler,
    convergence: Convergence,
    collected: HashMap<Kind, Vec<ExportedResource>>,
    /// One store watch per collected kind.
    collectors: HashMap<Kind, Collector>,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    graphs: mpsc::UnboundedReceiver<Graph>,
    status: watch::Sender<Status>,
    changes: u64,
    managed: Arc<Vec<ResourceId>>,
    /// The scheduler's failures version last copied into the status.
    reported_failures: u64,
    /// What collected resources did since the last summary line (collect.rs).
    summary: CollectSummary,
}

impl HostLoop {
    async fn run(mut self, graph: Graph, cancel: CancellationToken) {
        self.load(graph).await;
        loop {
            self.scheduler.launch_ready();
            let load = self.load_now();
            let now = Instant::now();
            // The summary first: it tells what the host did before the flag says it is done.
            self.summarize(load, now);
            self.report(load, now).await;
            let deadline = match (self.convergence.deadline(load, now), self.summary.due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let busy = self.scheduler.busy();
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(done) = self.scheduler.next_done(), if busy => {
                    if self.scheduler.finish(done) {
                        self.changed();
                    }
                    if self.scheduler.take_departed_check_ended() {
                        self.managed = Arc::new(self.scheduler.ids());
                    }
                    let now = Instant::now();
                    for c in self.scheduler.take_collected_changes() {
                        self.summary.record_change(&c.id, &c.what, c.would, now);
                    }
                }
                Some(event) = self.events.recv() => self.handle(event),
                Some((generation, read)) = self.exports.read.recv() => {
                    self.sources_read(generation, read).await;
                }
                Some(graph) = self.graphs.recv() => self.load(graph).await,
                _ = sleep_until(deadline), if deadline.is_some() => {}
            }
        }
        self.scheduler.shutdown();
        // What happened since the last summary is not lost with the run (but other hosts
        // leaving as the run ends are no news).
        self.summary.forget_departures();
        self.log_summary();
        self.collectors.values().for_each(|c| c.stop.cancel());
        if let Err(e) = self.exchange.withdraw(&self.config.hostname).await {
            tracing::warn!("withdrawing {}'s exports: {e:#}", self.config.hostname);
        }
    }

    fn changed(&mut self) {
        self.changes += 1;
        self.convergence.changed(Instant::now());
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Poke { id, generation } => self.scheduler.poke(&id, generation),
            Event::WatchEnded {
                id,
                generation,
                result,
            } => {
                if self.scheduler.watch_ended(&id, generation, result) {
                    self.convergence.changed(Instant::now());
                }
            }
            Event::Collected { kind, exports } => {
                let Some(collector) = self.collectors.get_mut(&kind) else {
                    return;
                };
                match exports {
                    Ok(exports) => {
                        collector.state = CollectState::Live;
                        self.collected.insert(kind, exports);
                        self.sync_resources();
                    }
                    Err(e) => {
                        let msg = format!("store watch of exported {kind} resources: {e:#}");
                        tracing::error!("{msg}");
                        collector.state = CollectState::Broken(msg);
                        self.convergence.changed(Instant::now());
                    }
                }
            }
        }
    }

    /// Takes on a graph: the first one, or a new version (hot reload).
    async fn load(&mut self, graph: Graph) {
        if graph == self.graph {
            return;
        }
        if self.published.as_ref() != Some(&graph.exports) {
            self.publish(&graph).await;
        }
        let kinds: Vec<Kind> = graph.collect.iter().map(|c| c.kind).collect();
        self.collectors.retain(|kind, collector| {
            let keep = kinds.contains(kind);
            if !keep {
                collector.stop.cancel();
            }
            keep
        });
        self.collected.retain(|kind, _| kinds.contains(kind));
        for kind in kinds {
            if !self.collectors.contains_key(&kind) {
                let stop = self.start_collector(kind);
                self.collectors.insert(
                    kind,
                    Collector {
                        stop,
                        state: CollectState::Waiting,
                    },
                );
            }
        }
        self.graph = graph;
        self.sync_resources();
        self.convergence.changed(Instant::now());
    }

    /// Publishes the graph's exports. An exported file with a `source` goes with the
    /// source's bytes as its content: those are read from this host's artifact off the loop,
    /// and published when read ([`HostLoop::sources_read`]); until then the host is busy, and
    /// unhealthy if they cannot be read.
    async fn publish(&mut self, graph: &Graph) {
        let host = &self.config.hostname;
        if self.config.noop {
            for spec in &graph.exports {
                tracing::info!("noop: would export {} as {host}", spec.id());
            }
            self.published = Some(graph.exports.clone());
            return;
        }
        self.exports.generation += 1;
        self.exports.failed = None;
        let sourced = graph
            .exports
            .iter()
            .any(|s| matches!(s, ResourceSpec::File(f) if f.source.is_some()));
        self.exports.reading = sourced;
        if sourced {
            let (generation, tx) = (self.exports.generation, self.exports.tx.clone());
            let (exports, artifacts) = (graph.exports.clone(), self.config.artifacts.clone());
            tokio::task::spawn_blocking(move || {
                let _ = tx.send((generation, with_sources(exports, &artifacts)));
            });
            return;
        }
        self.write_exports(graph.exports.clone(), graph.exports.clone())
            .await;
    }

    /// An exported file's source was read for the exports of `generation`: publish them,
    /// unless a newer graph's exports replaced them meanwhile.
    async fn sources_read(&mut self, generation: u64, read: anyhow::Result<Vec<ResourceSpec>>) {
        if generation != self.exports.generation {
            return;
        }
        self.exports.reading = false;
        self.convergence.changed(Instant::now());
        match read {
            Ok(exports) => {
                let as_written = self.graph.exports.clone();
                self.write_exports(exports, as_written).await;
            }
            Err(e) => {
                let msg = format!("publishing {}'s exports: {e:#}", self.config.hostname);
                tracing::error!("{msg}");
                self.exports.failed = Some(msg);
            }
        }
    }

    /// Writes `exports` (as collectors get them) to the exchange; `as_written` is what the
    /// graph says, remembered so that an unchanged graph does not publish again.
    async fn write_exports(&mut self, exports: Vec<ResourceSpec>, as_written: Vec<ResourceSpec>) {
        let host = &self.config.hostname;
        match self.exchange.publish(host, exports).await {
            Ok(()) => self.published = Some(as_written),
            // Tried again with the next graph.
            Err(e) => tracing::error!("publishing {host}'s exports: {e:#}"),
        }
    }

    /// A store watch of one kind's exports, feeding the loop. A watch that breaks is reported
    /// and started again after [`REWATCH_DELAY`]; the new one begins with the full set.
    fn start_collector(&self, kind: Kind) -> CancellationToken {
        let token = CancellationToken::new();
        let exchange = self.exchange.clone();
        let (events, cancel) = (self.events_tx.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let mut stream = exchange.watch_exports(kind);
                loop {
                    let item = tokio::select! {
                        _ = cancel.cancelled() => return,
                        item = stream.next() => item,
                    };
                    let Some(exports) = item else { break };
                    let broken = exports.is_err();
                    if events.send(Event::Collected { kind, exports }).is_err() {
                        return;
                    }
                    if broken {
                        break;
                    }
                }
                tracing::warn!("store watch of exported {kind} resources ended; watching again");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(REWATCH_DELAY) => {}
                }
            }
        });
        token
    }

    /// The scheduler's load, with the store watches: a watch still waiting for its first
    /// set keeps the host busy, a broken one makes it unhealthy.
    fn load_now(&self) -> Load {
        let mut load = self.scheduler.load();
        load.busy |= self.exports.reading;
        load.healthy &= self.exports.failed.is_none();
        for c in self.collectors.values() {
            match c.state {
                CollectState::Waiting => load.busy = true,
                CollectState::Live => {}
                CollectState::Broken(_) => load.healthy = false,
            }
        }
        load
    }

    fn collect_errors(&self) -> BTreeMap<Kind, String> {
        self.collectors
            .iter()
            .filter_map(|(kind, c)| match &c.state {
                CollectState::Broken(msg) => Some((*kind, msg.clone())),
                _ => None,
            })
            .collect()
    }

    /// Brings the scheduler to the graph's resources plus the collected ones.
    fn sync_resources(&mut self) {
        let desired = collect::desired(&self.graph, &self.collected);
        let d = diff(self.scheduler.specs(), &desired);
        let empty = d.is_empty();
        if !empty {
            tracing::debug!(
                "graph diff: {} added, {} changed, {} removed, {} unchanged",
                d.added.len(),
                d.changed.len(),
                d.removed.len(),
                d.unchanged
            );
        }
        self.summary.record_diff(&d, Instant::now());
        self.scheduler.apply(d, &self.graph.edges);
        if !empty {
            self.managed = Arc::new(self.scheduler.ids());
            self.convergence.changed(Instant::now());
        }
    }

    /// Logs the summary of collected resources when the host has settled after news, or
    /// when the oldest news is [`collect::SUMMARY_EVERY`] old.
    fn summarize(&mut self, load: Load, now: Instant) {
        let Some(due) = self.summary.due() else {
            return;
        };
        if self.convergence.settled(load, now) || now >= due {
            self.log_summary();
        }
    }

    fn log_summary(&mut self) {
        for line in self
            .summary
            .take(&self.managed, self.scheduler.failures().keys())
        {
            tracing::info!("{line}");
        }
    }

    /// Publishes the converged flag when it flips, and the status when anything in it moved.
    async fn report(&mut self, load: Load, now: Instant) {
        if let Some(converged) = self.convergence.update(load, now) {
            let host = &self.config.hostname;
            // The run's output shows each host's state already ("host: converged").
            if converged {
                tracing::debug!("{host}: converged");
            } else {
                tracing::debug!("{host}: no longer converged");
            }
            if let Err(e) = self.exchange.set_converged(host, converged).await {
                tracing::error!("publishing {host}'s converged flag: {e:#}");
            }
        }
        // Field by field, cheapest first, so that the thousands of checks of a big graph do
        // not each copy its lists.
        let (converged, settled) = (
            self.convergence.converged(),
            self.convergence.settled(load, now),
        );
        let failures_version = self.scheduler.failures_version();
        let collect_errors = self.collect_errors();
        let (changes, managed) = (self.changes, &self.managed);
        let reported_failures = &mut self.reported_failures;
        self.status.send_if_modified(|s| {
            let mut moved = false;
            if s.converged != converged || s.settled != settled || s.changes != changes {
                (s.converged, s.settled, s.changes) = (converged, settled, changes);
                moved = true;
            }
            if !Arc::ptr_eq(&s.managed, managed) {
                s.managed = managed.clone();
                moved = true;
            }
            if *reported_failures != failures_version {
                *reported_failures = failures_version;
                s.failures = self.scheduler.failures().clone();
                moved = true;
            }
            if s.collect_errors != collect_errors {
                s.collect_errors = collect_errors;
                moved = true;
            }
            if s.export_error != self.exports.failed {
                s.export_error = self.exports.failed.clone();
                moved = true;
            }
            moved
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::exchange::MemoryExchange;
    use crate::engine::graph;
    use crate::engine::resources::ResourceSpec;
    use futures::future::BoxFuture;
    use futures::stream::BoxStream;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store whose first export watch breaks at once.
    struct BrokenOnce {
        inner: MemoryExchange,
        watches: AtomicUsize,
    }

    impl Exchange for BrokenOnce {
        fn publish(
            &self,
            host: &str,
            exports: Vec<ResourceSpec>,
        ) -> BoxFuture<'_, anyhow::Result<()>> {
            self.inner.publish(host, exports)
        }

        fn watch_exports(
            &self,
            kind: Kind,
        ) -> BoxStream<'static, anyhow::Result<Vec<ExportedResource>>> {
            if self.watches.fetch_add(1, Ordering::SeqCst) == 0 {
                Box::pin(futures::stream::once(async {
                    Err(anyhow::anyhow!("connection reset"))
                }))
            } else {
                self.inner.watch_exports(kind)
            }
        }

        fn set_converged(&self, host: &str, converged: bool) -> BoxFuture<'_, anyhow::Result<()>> {
            self.inner.set_converged(host, converged)
        }

        fn withdraw(&self, host: &str) -> BoxFuture<'_, anyhow::Result<()>> {
            self.inner.withdraw(host)
        }

        fn kv_get(&self, host: &str, key: &str) -> BoxFuture<'_, anyhow::Result<Option<String>>> {
            self.inner.kv_get(host, key)
        }

        fn kv_set(
            &self,
            host: &str,
            key: &str,
            value: Option<String>,
        ) -> BoxFuture<'_, anyhow::Result<()>> {
            self.inner.kv_set(host, key, value)
        }

        fn kv_watch(&self, host: &str, key: &str) -> BoxStream<'static, anyhow::Result<()>> {
            self.inner.kv_watch(host, key)
        }
    }

    #[tokio::test]
    async fn a_broken_store_watch_is_opened_again_and_collects() {
        let dir = tempfile::tempdir().expect("dir");
        let src = format!(
            "graph: g\nresources:\n  file:\n  - name: \"@@x\"\n    path: /x/x\n    content: \"x\\n\"\ncollect:\n- kind: file\n  pattern: {}/\n",
            dir.path().display()
        );
        let g = graph::parse(&src, Path::new("g.yaml"), "h").expect("valid");
        let ex = Arc::new(BrokenOnce {
            inner: MemoryExchange::new(),
            watches: AtomicUsize::new(0),
        });
        let mut config = EngineConfig::new("h");
        config.quiet = Duration::from_millis(50);
        let engine = Engine::start(g, config, ex.clone()).expect("start");
        let (status, held) = engine
            .wait_for(Duration::from_secs(10), |s| s.converged)
            .await;
        assert!(held, "{status:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("x")).expect("collected"),
            "x\n"
        );
        assert!(ex.watches.load(Ordering::SeqCst) >= 2);
        engine.stop().await;
    }
}
