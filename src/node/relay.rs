//! A node at depth > 0: staged by its parent, which talks to it over stdin/stdout. It runs its
//! own graph (if it has one) against the store reached through its tunnel, stages its own
//! children with the same code and the same settings (`Start::config`) the initiator uses,
//! relays their events up, fetches the builds they need from its parent, and routes control
//! frames down. It exits when its parent says so, when its parent is gone (stdin closed), or
//! on SIGTERM/SIGHUP/SIGINT: a node never outlives its link, and leaves no working dir.

use super::builds::{Build, Builds, FetchFromParent};
use super::config::RunOptions;
use super::fleet::{self, Fleet, FleetContext};
use super::parent_link::{self, EventLog, Upstream};
use crate::engine::exchange::Exchange;
use crate::engine::graph;
use crate::engine::runner::{Engine, EngineConfig, Status};
use crate::engine::store_exchange::StoreExchange;
use crate::ssh;
use crate::store::client::StoreClient;
use crate::wire::{Down, EventKind, HostState, Start};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// After a shutdown or a lost parent, the node is gone within this long, whatever hangs.
const EXIT_DEADLINE: Duration = Duration::from_secs(4);

/// At the end of `arbor exec`, how long a node waits for its parent to take the output still
/// queued for it (at most `UP_BUDGET` bytes): a slow terminal at the initiator slows every hop.
const EXEC_FLUSH: Duration = Duration::from_secs(60);

/// Sets the log level once the parent has said which (`NodeConfig::verbosity`, `quiet`).
pub type SetVerbosity = Box<dyn Fn(u8, bool) + Send + Sync>;

/// Runs the node; returns the process exit code.
pub async fn run(options: RunOptions, log: EventLog, set_verbosity: SetVerbosity) -> u8 {
    let (start, up, mut down, writer) = match parent_link::open(options.workdir.clone()).await {
        Ok(parts) => parts,
        Err(e) => {
            say(format_args!("arbor: control link: {e}"));
            if let Some(dir) = &options.workdir {
                remove_own_workdir(dir);
            }
            return crate::exit::FAILED;
        }
    };
    set_verbosity(start.config.verbosity, start.config.quiet);
    log.attach(up.clone());
    let name = start.hostname.clone();
    tracing::debug!("{name}: node at depth {} starting", start.path.depth());

    let result = if start.exec.is_some() {
        serve_exec(&options, &start, &up, &mut down).await
    } else {
        serve(&options, &start, &up, &mut down).await
    };
    if let Some(peak) = peak_rss_kib() {
        let peak = peak as f64 / 1024.0;
        // `arbor exec` prints its hosts' logs on the operator's stderr: keep it quiet there.
        if start.exec.is_some() {
            tracing::debug!("{name}: exiting; peak memory {peak:.1} MB");
        } else {
            tracing::info!("{name}: exiting; peak memory {peak:.1} MB");
        }
    }
    let code = match result {
        // The parent reports our clean exit once the link has closed.
        Ok(()) => crate::exit::OK,
        Err(cause) => {
            up.own(EventKind::State(HostState::Failed {
                cause: cause.clone(),
            }))
            .await;
            crate::exit::FAILED
        }
    };
    up.bye(code).await;
    drop(up);
    log.detach();
    // `arbor exec`'s output must all reach the parent, which reads until the link closes (a
    // parent that is gone fails the write at once); a run's last frames are a few events.
    let flush = if start.exec.is_some() {
        EXEC_FLUSH
    } else {
        Duration::from_secs(3)
    };
    if tokio::time::timeout(flush, writer).await.is_err() {
        say(format_args!(
            "arbor: the parent did not take this node's last frames within {flush:?}"
        ));
    }
    if let Some(dir) = &options.workdir {
        remove_own_workdir(dir);
    }
    code
}

/// Where the answer to one fetch goes: the build's path here, or why not.
type FetchWaiter = oneshot::Sender<Result<String, String>>;

/// Builds asked of the parent, waiting for its `Fetched` answer.
#[derive(Clone, Default)]
struct Fetches {
    waiting: Arc<Mutex<HashMap<String, Vec<FetchWaiter>>>>,
}

impl Fetches {
    fn fetcher(&self, up: Upstream) -> FetchFromParent {
        let waiting = self.waiting.clone();
        Arc::new(move |sha256: String| {
            let (tx, rx) = oneshot::channel();
            waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(sha256.clone())
                .or_default()
                .push(tx);
            let up = up.clone();
            Box::pin(async move {
                up.fetch(sha256).await;
                rx.await
                    .map_err(|_| "the link to the parent closed".to_string())?
                    .map(PathBuf::from)
            })
        })
    }

    fn answer(&self, sha256: &str, result: Result<String, String>) {
        let waiters = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(sha256)
            .unwrap_or_default();
        for tx in waiters {
            let _ = tx.send(result.clone());
        }
    }
}

async fn serve(
    options: &RunOptions,
    start: &Start,
    up: &Upstream,
    down: &mut parent_link::Downstream,
) -> Result<(), String> {
    let name = &start.hostname;
    let endpoints = super::seed_endpoints(&options.seeds).map_err(|e| format!("{name}: {e}"))?;
    let user = store_user(start);
    let client = StoreClient::connect_as(&endpoints, user)
        .await
        .map_err(|e| format!("{name}: store: {e:#}"))?;
    let keys = crate::engine::exchange::Keys::for_run(&start.config.run);
    let tunnel_client = client.clone();
    // Stops the store front (if we serve one) however this node ends.
    let front_stop = CancellationToken::new();
    // Children whose leases our front keeps while their link is down.
    let front_holds = Arc::new(crate::store::relay_front::Holds::default());
    let mut holding = super::lease_holds::Holding::default();
    let _front_stopped = front_stop.clone().drop_guard();
    let exports_prefix = keys.exports().as_bytes().to_vec();
    let exchange: Arc<dyn Exchange> = Arc::new(StoreExchange::new(client, keys));
    let mut signals = super::StopSignals::new().map_err(|e| format!("{name}: signals: {e}"))?;

    // Our own graph; its artifacts (and our subtree's) are where our parent put them.
    let artifacts_dir =
        super::artifacts::node_dir(start.config.no_caching, options.workdir.as_deref());
    // Our host's cache, bounded: what this run needs here is leased (for as long as we run)
    // and the least recently used of the rest evicted past the cap (node::cache).
    let _lease = (!start.config.no_caching && options.workdir.is_some())
        .then(|| bound_cache(start))
        .flatten();
    // Our own graph's artifacts still to come from our parent: the engine waits for them.
    let arrivals = super::artifacts::Arrivals::new(start);
    let mut engine = None;
    let mut status: Option<watch::Receiver<Status>> = None;
    let mut diffs = None;
    if let Some(graph_name) = &start.graph {
        let text = start
            .graphs
            .get(graph_name)
            .ok_or_else(|| format!("{name}: graph {graph_name} was not sent"))?;
        let path = options
            .file
            .clone()
            .unwrap_or_else(|| Path::new(graph_name).to_path_buf());
        let graph = graph::parse(text, &path, name).map_err(|e| e.to_string())?;
        let mut engine_config = EngineConfig::new(name.clone());
        engine_config.noop = start.config.noop;
        engine_config.artifacts =
            super::artifacts::node_index(&artifacts_dir, &start.artifacts, &arrivals);
        engine_config.trees = super::artifacts::node_trees(&artifacts_dir, &start.trees, &arrivals);
        engine_config.diff = start.config.diff;
        #[cfg(debug_assertions)]
        let engine_exchange = kv_as_another_host(exchange.clone());
        #[cfg(not(debug_assertions))]
        let engine_exchange = exchange.clone();
        let mut e = Engine::start(graph, engine_config, engine_exchange)
            .map_err(|e| format!("{name}: engine: {e:#}"))?;
        status = Some(e.status());
        diffs = e.take_diffs();
        engine = Some(e);
    }
    up.own(EventKind::State(HostState::Running)).await;
    #[cfg(debug_assertions)]
    misbehave(up, exchange.as_ref(), &endpoints, start).await;

    // Our children, staged exactly as our parent staged us.
    let fetches = Fetches::default();
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    // What this node serves its children, told of the artifacts still arriving.
    let mut served: Option<Arc<super::artifacts::Served>> = None;
    let fleet = if start.children.is_empty() {
        None
    } else {
        let store = match &options.workdir {
            // Our children's tunnels end at our store front (crate::store::relay_front).
            Some(workdir) => {
                let socket = workdir.join("front.sock");
                let config = crate::store::relay_front::FrontConfig {
                    shared_prefixes: vec![exports_prefix.clone()],
                    credential: store_user(start).map(|(u, p)| (u.to_string(), p.to_string())),
                    users: subtree_users(start),
                    holds: front_holds.clone(),
                };
                crate::store::relay_front::serve(
                    socket.clone(),
                    tunnel_client.channel(),
                    config,
                    front_stop.clone(),
                )
                .await
                .map_err(|e| format!("{name}: store front: {e}"))?;
                crate::ssh::forward::to_unix(socket)
            }
            None => super::store_connector(&tunnel_client, &endpoints)
                .map_err(|e| format!("{name}: {e}"))?,
        };
        let fetcher = fetches.fetcher(up.clone());
        #[cfg(debug_assertions)]
        corrupt_own_artifacts(&artifacts_dir, start, None);
        let mut ctx = fleet_context(start, Some(store), events_tx.clone(), fetcher.clone())?;
        ctx.artifacts = Arc::new(super::artifacts::Served::from_cache(
            name,
            &artifacts_dir,
            &start.children,
            &start.arriving,
            fetcher,
        ));
        served = Some(ctx.artifacts.clone());
        report_learned_keys(&mut ctx, start, &events_tx);
        Some(Fleet::start(Arc::new(ctx), start.children.clone()))
    };
    drop(events_tx);

    let mut reported: Option<HostState> = None;
    let result = loop {
        tokio::select! {
            frame = down.recv() => match frame {
                Some(Down::Graph { name: graph_name, text }) => {
                    if start.graph.as_deref() == Some(graph_name.as_str())
                        && let Some(engine) = &engine
                    {
                        match graph::parse(&text, Path::new(&graph_name), name) {
                            Ok(g) => {
                                tracing::info!("copied over new graph definition");
                                engine.load_graph(g);
                            }
                            Err(e) => tracing::error!("new graph rejected: {e}"),
                        }
                    }
                    if let Some(fleet) = &fleet {
                        fleet.update_graph(&graph_name, &text);
                    }
                }
                Some(Down::Fetched { sha256, result }) => fetches.answer(&sha256, result),
                Some(Down::Arrived { sha256, error }) => {
                    let own = arrivals.arrived(&sha256, error.clone());
                    if let (Some(e), false) = (&error, own) {
                        tracing::warn!("{name}: artifact {sha256} for the hosts below did not arrive: {e}");
                    }
                    #[cfg(debug_assertions)]
                    if error.is_none() {
                        corrupt_own_artifacts(&artifacts_dir, start, Some(&sha256));
                    }
                    if !served.as_ref().is_some_and(|s| s.arrived(&sha256, error)) && !own {
                        tracing::debug!("{name}: an arrival of {sha256} it did not wait for");
                    }
                }
                Some(Down::Shutdown { reason }) => {
                    tracing::debug!("{name}: shutting down: {reason}");
                    break Ok(());
                }
                Some(Down::Hello(_) | Down::Start(_) | Down::Heartbeat | Down::Ack { .. } | Down::Reattach { .. } | Down::NoQuic) => {}
                None => {
                    tracing::warn!("{name}: parent link closed; shutting down");
                    break Ok(());
                }
            },
            event = events_rx.recv(), if fleet.is_some() => {
                if let Some(event) = event {
                    // A child whose link is down keeps its leases at our front.
                    if let EventKind::State(state) = &event.kind
                        && let Some(users) = subtree_user_names(&start.children, event.host.name())
                    {
                        holding.state(event.host.name(), state, &users, front_holds.as_ref(), "store front");
                    }
                    up.forward(event).await;
                }
            }
            diff = super::next_diff(&mut diffs) => {
                if let Some(diff) = diff {
                    up.own(super::diff_event(diff)).await;
                }
            }
            changed = super::next_status(&mut status) => {
                let Some(now) = changed else { continue };
                let state = settled_state(&now, reported.as_ref());
                if state.is_some() && state != reported {
                    up.own(EventKind::State(state.clone().unwrap_or(HostState::Running))).await;
                    reported = state;
                }
            }
            signal = signals.next() => {
                tracing::warn!("{name}: {}; shutting down", super::signal_name(signal));
                break Ok(());
            }
        }
    };

    // Bottom-up: children first, then our own engine; a hard deadline covers any hang, and
    // still removes our working dir.
    let workdir = options.workdir.clone();
    std::thread::spawn(move || {
        std::thread::sleep(EXIT_DEADLINE);
        say(format_args!(
            "arbor: shutdown took longer than {EXIT_DEADLINE:?}; exiting"
        ));
        if let Some(dir) = &workdir {
            remove_own_workdir(dir);
        }
        std::process::exit(crate::exit::FAILED.into());
    });
    fetches.answer_all_closed();
    // A check still waiting for an artifact ends now, not with the engine's stop.
    drop(arrivals);
    if let Some(fleet) = fleet {
        let forward = async {
            while let Some(event) = events_rx.recv().await {
                up.forward(event).await;
            }
        };
        let (_, ()) = tokio::join!(fleet.shutdown(), forward);
    }
    if let Some(engine) = engine {
        engine.stop().await;
    }
    result
}

impl Fetches {
    /// Ends every wait: the node is stopping.
    fn answer_all_closed(&self) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Test builds only (never compiled into release builds): with `ARBOR_TEST_MISBEHAVE=forge`
/// in its environment, a node sends up what a compromised one could, so the end-to-end tests
/// can check its parent and the initiator refuse it: state events about hosts outside its
/// subtree, host-key reports for hosts it does not connect to and for names that would inject
/// known_hosts lines, terminal escapes in a log line, store requests beyond its own keys (each
/// logged as `misbehaving: … refused` or `… ALLOWED`), and exports of its own that try to
/// escape a collector's pattern, set setuid bits and delete collected files.
#[cfg(debug_assertions)]
async fn misbehave(
    up: &Upstream,
    exchange: &dyn Exchange,
    endpoints: &crate::store::client::Endpoints,
    start: &Start,
) {
    if std::env::var("ARBOR_TEST_MISBEHAVE").as_deref() != Ok("forge") {
        return;
    }
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    for name in ["10.199.2.11", "*", "x\n@cert-authority * ssh-ed25519 AAAA"] {
        up.own(EventKind::KnownHost {
            name: name.to_string(),
            key: key.to_string(),
        })
        .await;
    }
    for victim in ["l2-1", "r2"] {
        up.event(
            crate::wire::HostPath::parse(victim),
            EventKind::State(HostState::Failed {
                cause: "forged".into(),
            }),
        )
        .await;
    }
    up.own(EventKind::Log {
        line: "forged \x1b]0;owned\x07\x1b[2J\x1b[31mescapes".into(),
        stderr: false,
    })
    .await;
    use crate::engine::resources::{FileSpec, FileState, ResourceSpec};
    let file = |name: &str, path: &str, mode, state| {
        ResourceSpec::File(FileSpec {
            name: name.into(),
            path: path.into(),
            content: Some("forged\n".into()),
            state,
            mode,
            ..FileSpec::default()
        })
    };
    let exports = vec![
        file(
            "escape",
            "/tmp/../../root/escaped",
            Some(0o4755),
            FileState::Exists,
        ),
        file("wipe", "/tmp/from-l1-2", None, FileState::Absent),
    ];
    let name = start.hostname.clone();
    let outcome = |what: &str, result: anyhow::Result<()>| match result {
        Ok(()) => tracing::warn!("misbehaving: {what}: ALLOWED"),
        Err(e) => tracing::warn!("misbehaving: {what}: refused ({e:#})"),
    };
    if let Err(e) = exchange.publish(&name, exports).await {
        tracing::warn!("misbehaving: publishing its own hostile exports: {e:#}");
    }
    outcome(
        "publishing as another host",
        exchange
            .publish(
                "evil",
                vec![file("evil", "/tmp/evil", None, FileState::Exists)],
            )
            .await,
    );
    // Without a credential, as any local process on a TCP-fallback host would try.
    let anonymous = async {
        let client = crate::store::client::StoreClient::connect(endpoints).await?;
        client.get_prefix("/").await.map(|_| ())
    };
    outcome("reading the store without a credential", anonymous.await);
    let user = store_user(start);
    let Ok(client) = crate::store::client::StoreClient::connect_as(endpoints, user).await else {
        return;
    };
    let keys = crate::engine::exchange::Keys::for_run(&start.config.run);
    let mut raw = client.raw();
    let export = keys.export("l2-1", crate::engine::resources::Kind::File, "x");
    outcome(
        "writing another host's export",
        raw.put(export, "forged", None)
            .await
            .map(|_| ())
            .map_err(Into::into),
    );
    outcome(
        "writing another host's converged flag",
        raw.put(keys.converged("l2-1"), "true", None)
            .await
            .map(|_| ())
            .map_err(Into::into),
    );
    outcome(
        "deleting every key",
        client.delete_prefix("/").await.map(|_| ()),
    );
    outcome(
        "compacting",
        raw.compact(1, None).await.map(|_| ()).map_err(Into::into),
    );
}

/// Test builds only: with `ARBOR_TEST_MISBEHAVE=kv-as:VICTIM`, this node's engine reads,
/// writes and watches VICTIM's `kv` keys instead of its own, still with this node's own store
/// credential: what a compromised host's kv resources could try. The end-to-end tests check
/// the store lets it read them and refuses it writing them.
#[cfg(debug_assertions)]
fn kv_as_another_host(exchange: Arc<dyn Exchange>) -> Arc<dyn Exchange> {
    let Some(victim) = std::env::var("ARBOR_TEST_MISBEHAVE")
        .ok()
        .and_then(|v| v.strip_prefix("kv-as:").map(str::to_string))
    else {
        return exchange;
    };
    tracing::warn!("misbehaving: kv resources act on {victim}'s keys");
    Arc::new(KvAs {
        inner: exchange,
        victim,
    })
}

#[cfg(debug_assertions)]
struct KvAs {
    inner: Arc<dyn Exchange>,
    victim: String,
}

#[cfg(debug_assertions)]
impl Exchange for KvAs {
    fn publish(
        &self,
        host: &str,
        exports: Vec<crate::engine::resources::ResourceSpec>,
    ) -> futures::future::BoxFuture<'_, anyhow::Result<()>> {
        self.inner.publish(host, exports)
    }

    fn watch_exports(
        &self,
        kind: crate::engine::resources::Kind,
    ) -> futures::stream::BoxStream<
        'static,
        anyhow::Result<Vec<crate::engine::exchange::ExportedResource>>,
    > {
        self.inner.watch_exports(kind)
    }

    fn set_converged(
        &self,
        host: &str,
        converged: bool,
    ) -> futures::future::BoxFuture<'_, anyhow::Result<()>> {
        self.inner.set_converged(host, converged)
    }

    fn withdraw(&self, host: &str) -> futures::future::BoxFuture<'_, anyhow::Result<()>> {
        self.inner.withdraw(host)
    }

    fn kv_store_key(&self, _host: &str, key: &str) -> String {
        self.inner.kv_store_key(&self.victim, key)
    }

    fn kv_get(
        &self,
        _host: &str,
        key: &str,
    ) -> futures::future::BoxFuture<'_, anyhow::Result<Option<String>>> {
        self.inner.kv_get(&self.victim, key)
    }

    fn kv_set(
        &self,
        _host: &str,
        key: &str,
        value: Option<String>,
    ) -> futures::future::BoxFuture<'_, anyhow::Result<()>> {
        self.inner.kv_set(&self.victim, key, value)
    }

    fn kv_watch(
        &self,
        _host: &str,
        key: &str,
    ) -> futures::stream::BoxStream<'static, anyhow::Result<()>> {
        self.inner.kv_watch(&self.victim, key)
    }
}

/// Test builds only: with `ARBOR_TEST_MISBEHAVE=corrupt-artifacts`, a relay overwrites the
/// artifacts its parent put in its cache with other bytes of the same size before it serves
/// its children (at its start; one still arriving, `only`, once it has arrived), so the
/// end-to-end tests can check a corrupt entry found while serving is reported, fetched again
/// from the parent, and never passed on.
#[cfg(debug_assertions)]
fn corrupt_own_artifacts(dir: &Path, start: &Start, only: Option<&str>) {
    if std::env::var("ARBOR_TEST_MISBEHAVE").as_deref() != Ok("corrupt-artifacts") {
        return;
    }
    let all: std::collections::BTreeSet<_> = start
        .children
        .iter()
        .flat_map(super::artifacts::subtree_artifacts)
        .filter(|a| match only {
            Some(sha) => a.sha256 == sha,
            None => !start.arriving.contains(&a.sha256),
        })
        .collect();
    for a in all {
        let path = dir.join(&a.sha256);
        let zeros = vec![0u8; usize::try_from(a.size).unwrap_or(0)];
        match std::fs::write(&path, zeros) {
            Ok(()) => tracing::warn!("misbehaving: corrupted artifact {}", a.sha256),
            Err(e) => tracing::warn!("misbehaving: {}: {e}", path.display()),
        }
    }
}

/// The store user names of host `host` and every host below it, if it is below us.
fn subtree_user_names(specs: &[crate::wire::ChildSpec], host: &str) -> Option<Vec<String>> {
    fn all(spec: &crate::wire::ChildSpec, out: &mut Vec<String>) {
        out.push(spec.store_user.clone().unwrap_or_else(|| spec.name.clone()));
        for c in &spec.children {
            all(c, out);
        }
    }
    for spec in specs {
        if spec.name == host {
            let mut out = Vec::new();
            all(spec, &mut out);
            return Some(out);
        }
        if let Some(found) = subtree_user_names(&spec.children, host) {
            return Some(found);
        }
    }
    None
}

/// What each store user below this relay may do (by user name), as the initiator gave them
/// ([`host_access`](super::initiator::host_access)): the front checks a child's writes on the
/// relay's shared leases against it. Empty when the store checks no credentials.
fn subtree_users(start: &Start) -> std::collections::HashMap<String, crate::store::auth::Access> {
    fn walk(
        specs: &[crate::wire::ChildSpec],
        keys: &crate::engine::exchange::Keys,
        out: &mut std::collections::HashMap<String, crate::store::auth::Access>,
    ) {
        for c in specs {
            let user = c.store_user.clone().unwrap_or_else(|| c.name.clone());
            out.insert(
                user,
                super::initiator::host_access(keys, &c.name, &c.children),
            );
            walk(&c.children, keys, out);
        }
    }
    let mut out = std::collections::HashMap::new();
    if start.credential.is_some() {
        let keys = crate::engine::exchange::Keys::for_run(&start.config.run);
        walk(&start.children, &keys, &mut out);
    }
    out
}

/// The store user this node authenticates as, with its password, when it was given one: the
/// user `Start::store_user` names, or else the user named after the host.
fn store_user(start: &Start) -> Option<(&str, &str)> {
    let name = start.store_user.as_deref().unwrap_or(&start.hostname);
    start.credential.as_deref().map(|password| (name, password))
}

/// The state to report for an engine status: converged, settled with failures, or changed
/// (only after one of those); `None` while working toward the first.
pub fn settled_state(status: &Status, reported: Option<&HostState>) -> Option<HostState> {
    if status.converged {
        Some(HostState::Converged)
    } else if status.settled && !status.healthy() {
        let mut failures: Vec<String> = status
            .failures
            .iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        failures.extend(status.collect_errors.values().cloned());
        failures.extend(status.export_error.clone());
        Some(HostState::Unhealthy { failures })
    } else if reported.is_some() {
        Some(HostState::Changed)
    } else {
        None
    }
}

/// Under accept-new, keys learned here go up to the initiator's known_hosts, not into ours.
fn report_learned_keys(
    ctx: &mut FleetContext,
    start: &Start,
    events: &mpsc::Sender<crate::wire::Event>,
) {
    if !super::initiator::any_accept_new(&start.children, start.config.accept_new) {
        return;
    }
    let (learned_tx, mut learned) = mpsc::unbounded_channel::<(String, String)>();
    ctx.connect.host_keys.learn_into = None;
    ctx.connect.host_keys.report_learned = Some(learned_tx);
    let events = events.clone();
    tokio::spawn(async move {
        while let Some((name, key)) = learned.recv().await {
            let _ = events
                .send(crate::wire::Event {
                    host: crate::wire::HostPath::root(),
                    kind: EventKind::KnownHost { name, key },
                })
                .await;
        }
    });
}

/// `arbor exec` at depth > 0: no store and no graph. The children (pruned by the initiator to
/// the paths that lead to targets) are run by the same fleet code: targeted ones run the
/// command over a connection of their own, those with children below are staged as relays.
/// Their output goes up as events. The node exits once every child is done, or at once
/// (stopping every command below) when its parent says so, is gone, or a signal comes.
async fn serve_exec(
    options: &RunOptions,
    start: &Start,
    up: &Upstream,
    down: &mut parent_link::Downstream,
) -> Result<(), String> {
    let name = &start.hostname;
    let mut signals = super::StopSignals::new().map_err(|e| format!("{name}: signals: {e}"))?;
    let fetches = Fetches::default();
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let mut ctx = fleet_context(start, None, events_tx.clone(), fetches.fetcher(up.clone()))?;
    ctx.exec = start.exec.clone().map(Arc::new);
    report_learned_keys(&mut ctx, start, &events_tx);
    drop(events_tx);
    let mut fleet = Fleet::start(Arc::new(ctx), start.children.clone());
    let mut done = fleet.is_empty();
    let stopped = loop {
        if done {
            break false;
        }
        tokio::select! {
            frame = down.recv() => match frame {
                Some(Down::Fetched { sha256, result }) => fetches.answer(&sha256, result),
                Some(Down::Shutdown { reason }) => {
                    tracing::debug!("{name}: stopping the command: {reason}");
                    break true;
                }
                Some(_) => {}
                None => {
                    tracing::warn!("{name}: parent link closed; stopping the command below");
                    break true;
                }
            },
            event = events_rx.recv() => {
                if let Some(event) = event {
                    up.forward(event).await;
                }
            }
            report = fleet.next_finished() => {
                if report.is_none() {
                    done = true;
                }
            }
            signal = signals.next() => {
                tracing::warn!("{name}: {}; stopping the command below", super::signal_name(signal));
                break true;
            }
        }
    };
    if stopped {
        let workdir = options.workdir.clone();
        std::thread::spawn(move || {
            std::thread::sleep(EXIT_DEADLINE);
            say(format_args!(
                "arbor: stopping took longer than {EXIT_DEADLINE:?}; exiting"
            ));
            if let Some(dir) = &workdir {
                remove_own_workdir(dir);
            }
            std::process::exit(crate::exit::FAILED.into());
        });
    }
    fetches.answer_all_closed();
    // Every child's last events (its command's end) go up before this node exits.
    let forward = async {
        while let Some(event) = events_rx.recv().await {
            up.forward(event).await;
        }
    };
    tokio::join!(fleet.shutdown(), forward);
    Ok(())
}

/// Leases what this node's run needs in its host's cache and evicts past the run's cap:
/// its own build and the run's others, its own and its subtree's artifacts.
fn bound_cache(start: &Start) -> Option<super::cache::Lease> {
    use super::cache;
    let max = match cache::MaxSize::parse(&start.config.cache_max_size) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("--cache-max-size {e}; using {}", cache::DEFAULT_MAX_SIZE);
            cache::MaxSize::parse(cache::DEFAULT_MAX_SIZE).ok()?
        }
    };
    let mut needed: std::collections::BTreeSet<String> = start
        .config
        .builds
        .iter()
        .map(|b| b.sha256.clone())
        .collect();
    // Our own build: `bin/<sha256>/arbor`.
    if let Some(own) = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.file_name()?.to_string_lossy().into_owned()))
    {
        needed.insert(own);
    }
    needed.extend(start.artifacts.values().map(|a| a.sha256.clone()));
    for c in &start.children {
        needed.extend(
            super::artifacts::subtree_artifacts(c)
                .into_iter()
                .map(|a| a.sha256),
        );
    }
    cache::on_start(&cache::root(), &needed, max)
}

/// What this relay's children share: the run's settings from `start`, this relay's own build
/// (and the run's others, fetched from the parent on demand), and the known_hosts lines the
/// parent sent down.
fn fleet_context(
    start: &Start,
    store: Option<Arc<dyn ssh::Connector>>,
    events: mpsc::Sender<crate::wire::Event>,
    fetcher: FetchFromParent,
) -> Result<FleetContext, String> {
    let name = &start.hostname;
    let config = &start.config;
    let mut own = Build::current().map_err(|e| format!("{name}: reading own binary: {e}"))?;
    // Armed only: a gzip stream is made (or the one kept beside this binary checked) the
    // first time a child's copy goes gzipped (`stage`).
    let gzip = config.compress != crate::wire::Compress::Never;
    if gzip {
        own = own.with_kept_gzip();
    }
    let builds = Builds::new([own]).with_parent(&config.builds, fetcher, gzip);
    let mut connect = fleet::connect_options(config);
    connect.host_keys.extra_entries = start.known_hosts.clone();
    // Our own forwarded agent: the initiator's front behind it decides what it signs. Its
    // socket is looked up at each use: a parent that re-attached over a new SSH connection
    // brought a new one (crate::node::reattach).
    let agent = ssh::agent_socket().map(|_| {
        let connector: Arc<dyn ssh::Connector> =
            Arc::new(|stream: ssh::forward::ForwardedStream| {
                if let Some(socket) = ssh::agent_socket() {
                    ssh::forward::to_unix(socket).connect(stream);
                }
            });
        let agent_for: fleet::AgentFor =
            Arc::new(move |_: &crate::wire::ChildSpec| connector.clone());
        agent_for
    });
    Ok(FleetContext {
        path: start.path.clone(),
        config: config.clone(),
        connect,
        builds,
        artifacts: Default::default(),
        siblings: Default::default(),
        store,
        agent,
        graphs: Mutex::new(start.graphs.clone()),
        known_hosts: start.known_hosts.clone(),
        events,
        exec: None,
        quic: Default::default(),
    })
}

/// This process's peak resident set size (VmHWM), in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A line on stderr, if it is still there: a node whose parent's connection went has a
/// broken stderr, and `eprintln!` would panic on it before the node removed its working dir.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// A node removes its own working dir on the way out, so a lost parent leaves nothing behind.
fn remove_own_workdir(dir: &Path) {
    let is_ours = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("arbor."));
    if is_ours {
        let _ = std::fs::remove_dir_all(dir);
    }
}
