//! A node's children: staging each one (at most `cconns` being set up at once), relaying their
//! events upward, routing control frames down, serving their requests for builds, and tearing
//! them down. The initiator and every relay use this same code, configured by the same
//! [`NodeConfig`]; only where events go (the operator's view, or the parent link) differs.

use super::artifacts::{self, Served};
use super::builds::Builds;
use super::child_link::{self, ChildLink, FromChild};
use super::stage::{self, StageOptions, Staged};
use crate::ssh::{self, ConnectOptions, Connector, ExitStatus, HostKeyPolicy, Session, Target};
use crate::ui::HostReport;
use crate::wire::{
    ArtifactRef, ChildMode, ChildSpec, Down, Event, EventKind, ExecJob, HostPath, HostState,
    NodeConfig, Start,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long a child gets to exit after a shutdown before its link is closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// What every child of this node shares.
pub struct FleetContext {
    /// This node's path from the initiator (root for the initiator).
    pub path: HostPath,
    /// The run's settings: this node's children get the same.
    pub config: NodeConfig,
    /// How this node connects: built from `config` by [`connect_options`], plus what only
    /// this node has (the initiator's key files and known_hosts; a relay's received lines).
    pub connect: ConnectOptions,
    pub builds: Builds,
    /// The artifacts this node copies to its children (`source:` files), by sha256.
    pub artifacts: Arc<Served>,
    /// Which child holds which artifact, for the children marked `seed_siblings`.
    pub siblings: Arc<super::sibling::Board>,
    /// Connects each child's store tunnel to this node's own store endpoint (`None` for
    /// `arbor exec`, which has no store).
    pub store: Option<Arc<dyn Connector>>,
    /// Serves agent channels from children whose own children need signatures: for each such
    /// child, a connector (at the initiator, a front that signs only for that child's
    /// subtree; at a relay, its own forwarded agent, which that front stands behind).
    pub agent: Option<AgentFor>,
    /// Graph texts by name, as last edited.
    pub graphs: Mutex<BTreeMap<String, String>>,
    /// known_hosts lines to hand down to relays.
    pub known_hosts: String,
    /// Where events go: tagged relative to this node.
    pub events: mpsc::Sender<Event>,
    /// `arbor exec`: the command and its targets in this node's subtree. Targeted children
    /// run it over a connection of their own; children with children of their own (the
    /// subtree is pruned to the paths that lead to targets) are staged as relays for it.
    pub exec: Option<Arc<ExecJob>>,
    /// This node's QUIC certificate, made the first time a child's link may move to QUIC.
    pub quic: QuicSide,
}

/// A node's certificate for the QUIC links to its children (crate::wire::quic): one per
/// process, made when first needed.
#[derive(Default)]
pub struct QuicSide(std::sync::OnceLock<Option<Arc<crate::wire::quic::Identity>>>);

impl QuicSide {
    fn identity(&self) -> Option<Arc<crate::wire::quic::Identity>> {
        self.0
            .get_or_init(|| match crate::wire::quic::Identity::generate() {
                Ok(id) => Some(Arc::new(id)),
                Err(e) => {
                    tracing::warn!("QUIC: no certificate ({e}); links stay on SSH");
                    None
                }
            })
            .clone()
    }
}

impl FleetContext {
    fn graph(&self, name: &str) -> Option<String> {
        lock(&self.graphs).get(name).cloned()
    }

    /// The subset of the graphs a subtree needs.
    fn graphs_for(&self, spec: &ChildSpec) -> BTreeMap<String, String> {
        let graphs = lock(&self.graphs);
        graphs_used(spec)
            .into_iter()
            .filter_map(|name| graphs.get(&name).map(|t| (name, t.clone())))
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent connector for one child's channels.
pub type AgentFor = Arc<dyn Fn(&ChildSpec) -> Arc<dyn Connector> + Send + Sync>;

/// The connect options every node derives from the run's settings.
pub fn connect_options(config: &NodeConfig) -> ConnectOptions {
    let mut o = ConnectOptions::for_home(&super::home_dir());
    o.connect_timeout = Duration::from_secs(config.connect_timeout);
    // SSH's own keepalives (every 15 s, or every link timeout when that is shorter) must not
    // give a connection up before the link timeout and the reconnect grace have: an outage
    // within them is ridden out on the same connection.
    let every = config.link_timeout.clamp(1, 15);
    o.keepalive_interval = Duration::from_secs(every);
    let ride_out = config.link_timeout.saturating_add(config.reconnect_grace);
    o.keepalive_max = usize::try_from(ride_out / every + 2)
        .unwrap_or(usize::MAX)
        .max(3);
    o.host_keys.policy = if config.accept_new {
        HostKeyPolicy::AcceptNew
    } else {
        HostKeyPolicy::Strict
    };
    o
}

/// The parent's side of one child's control: frames to send, and the stop signal.
struct ChildControl {
    frames: mpsc::UnboundedSender<Down>,
    stop: CancellationToken,
}

/// What a child's task listens to.
struct Inbox {
    frames: mpsc::UnboundedReceiver<Down>,
    stop: CancellationToken,
}

/// The running children of one node.
pub struct Fleet {
    ctx: Arc<FleetContext>,
    controls: HashMap<String, ChildControl>,
    /// Which graphs each child's subtree uses.
    uses: HashMap<String, Vec<String>>,
    tasks: JoinSet<Vec<HostReport>>,
    /// Reports finished but not yet handed out.
    ready: Vec<HostReport>,
}

impl Fleet {
    /// Starts staging every child in `children`; events flow to `ctx.events` at once.
    pub fn start(ctx: Arc<FleetContext>, children: Vec<ChildSpec>) -> Fleet {
        let limit = Arc::new(Semaphore::new(if ctx.config.cconns == 0 {
            Semaphore::MAX_PERMITS
        } else {
            ctx.config.cconns
        }));
        let mut fleet = Fleet {
            ctx: ctx.clone(),
            controls: HashMap::new(),
            uses: HashMap::new(),
            tasks: JoinSet::new(),
            ready: Vec::new(),
        };
        for spec in children {
            match spec.mode {
                ChildMode::Relay => {
                    let inbox = fleet.register(&spec);
                    let (ctx, limit) = (ctx.clone(), limit.clone());
                    fleet.tasks.spawn(async move {
                        vec![run_child(ctx, limit, spec, inbox, HostPath::root(), None).await]
                    });
                }
                ChildMode::Jump => {
                    // Nothing runs on a jump host: its children are this node's, reached
                    // through it.
                    let inboxes: Vec<_> = spec.children.iter().map(|c| fleet.register(c)).collect();
                    fleet
                        .tasks
                        .spawn(run_jump(ctx.clone(), limit.clone(), spec, inboxes));
                }
            }
        }
        fleet
    }

    fn register(&mut self, spec: &ChildSpec) -> Inbox {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        self.controls.insert(
            spec.name.clone(),
            ChildControl {
                frames: tx,
                stop: stop.clone(),
            },
        );
        self.uses.insert(spec.name.clone(), graphs_used(spec));
        Inbox { frames: rx, stop }
    }

    pub fn is_empty(&self) -> bool {
        self.controls.is_empty()
    }

    /// A new text of graph `name`: children not started yet get it in their `Start`, running
    /// ones whose subtree uses it get it now. Returns how many children it was sent to.
    pub fn update_graph(&self, name: &str, text: &str) -> usize {
        lock(&self.ctx.graphs).insert(name.to_string(), text.to_string());
        let mut sent = 0;
        for (child, uses) in &self.uses {
            if uses.iter().any(|g| g == name)
                && let Some(control) = self.controls.get(child)
            {
                sent += 1;
                let _ = control.frames.send(Down::Graph {
                    name: name.to_string(),
                    text: text.to_string(),
                });
            }
        }
        sent
    }

    /// The next child to finish, or `None` when none is left.
    pub async fn next_finished(&mut self) -> Option<HostReport> {
        loop {
            if let Some(report) = self.ready.pop() {
                return Some(report);
            }
            match self.tasks.join_next().await? {
                Ok(reports) => self.ready.extend(reports),
                Err(e) => tracing::error!("a child's task failed: {e}"),
            }
        }
    }

    /// Stops every child (those still being set up clean up and stop; running ones are told
    /// to shut down) and waits for all of them; returns their reports.
    pub async fn shutdown(mut self) -> Vec<HostReport> {
        for control in self.controls.values() {
            control.stop.cancel();
        }
        let mut reports = Vec::new();
        while let Some(r) = self.next_finished().await {
            reports.push(r);
        }
        reports
    }
}

/// The known_hosts names of every host in a subtree, ProxyJump hops included.
pub fn subtree_names(children: &[ChildSpec]) -> Vec<String> {
    subtree_specs(children)
        .flat_map(|c| {
            c.with_jumps()
                .map(|h| ssh::known_hosts::host_key_name(&h.host, h.port))
        })
        .collect()
}

/// Every host of a subtree, depth first.
pub fn subtree_specs(children: &[ChildSpec]) -> impl Iterator<Item = &ChildSpec> {
    let mut stack: Vec<&ChildSpec> = children.iter().collect();
    std::iter::from_fn(move || {
        let c = stack.pop()?;
        stack.extend(&c.children);
        Some(c)
    })
}

fn graphs_used(spec: &ChildSpec) -> Vec<String> {
    let mut out: Vec<String> = spec.graph.iter().cloned().collect();
    for c in &spec.children {
        out.extend(graphs_used(c));
    }
    out.sort();
    out.dedup();
    out
}

/// One child's part in the run, as its events and its report tell it.
struct ChildRun {
    events: mpsc::Sender<Event>,
    name: String,
    me: HostPath,
    started: Instant,
    bytes: u64,
    cached: Option<bool>,
    store_over_tcp: bool,
    transport: Option<(String, Option<String>)>,
}

impl ChildRun {
    fn new(ctx: &FleetContext, name: &str, prefix: &HostPath) -> ChildRun {
        ChildRun {
            events: ctx.events.clone(),
            name: name.to_string(),
            me: prefix.child(name),
            started: Instant::now(),
            bytes: 0,
            cached: None,
            store_over_tcp: false,
            transport: None,
        }
    }

    async fn emit(&self, kind: EventKind) {
        let _ = self
            .events
            .send(Event {
                host: self.me.clone(),
                kind,
            })
            .await;
    }

    async fn step(&self, step: &str) {
        self.emit(EventKind::State(HostState::Staging { step: step.into() }))
            .await;
    }

    fn report(&self, cause: Option<String>) -> HostReport {
        HostReport {
            name: self.name.clone(),
            ok: cause.is_none(),
            cause,
            elapsed: self.started.elapsed(),
            bytes: self.bytes,
            cached: self.cached,
            store_over_tcp: self.store_over_tcp,
            transport: self.transport.clone(),
        }
    }

    /// The one way a child fails: its event up, and its report.
    async fn failed(&self, cause: String) -> HostReport {
        self.emit(EventKind::State(HostState::Failed {
            cause: cause.clone(),
        }))
        .await;
        self.report(Some(cause))
    }

    async fn exited(&self) -> HostReport {
        self.emit(EventKind::State(HostState::Exited)).await;
        self.report(None)
    }
}

/// Connect options for one child (or ProxyJump hop): this node's, with what the initiator
/// resolved for it: pinned key, named keys (this node's `--identity` first, then the topology's
/// `identity:`, then ssh_config's IdentityFiles, which are files only at the initiator and
/// agent keys at relays), IdentitiesOnly, connect timeout, host-key policy, URL password.
pub(super) fn child_options(
    ctx: &FleetContext,
    spec: &ChildSpec,
) -> Result<ConnectOptions, String> {
    let mut options = ctx.connect.clone();
    options.label = Some(spec.name.clone());
    if let Some(key) = &spec.host_key {
        let key = russh::keys::PublicKey::from_openssh(key)
            .map_err(|e| format!("{}: host key: bad pinned key: {e}", spec.name))?;
        options.host_keys.pinned = Some(key);
    }
    if let Some(identity) = &spec.identity {
        // A key path on the node that connects: `~/` is that node's home.
        let path = match identity.strip_prefix("~/") {
            Some(rest) => super::home_dir().join(rest),
            None => identity.into(),
        };
        options.auth.identities.push(path);
    }
    if ctx.path.is_root() {
        // The operator's own files: only the initiator has them.
        options
            .auth
            .identities
            .extend(spec.identity_files.iter().map(std::path::PathBuf::from));
        if spec.user_known_hosts.is_some() || spec.global_known_hosts.is_some() {
            let keys = &mut options.host_keys;
            let default_user = keys.learn_into.clone();
            let global: Vec<std::path::PathBuf> = ssh::known_hosts::GLOBAL_FILES
                .iter()
                .map(std::path::PathBuf::from)
                .collect();
            // --known-hosts files stay.
            let extra: Vec<std::path::PathBuf> = keys
                .known_hosts
                .iter()
                .filter(|p| Some(*p) != default_user.as_ref() && !global.contains(p))
                .cloned()
                .collect();
            let user = spec
                .user_known_hosts
                .clone()
                .unwrap_or_else(|| default_user.iter().cloned().collect());
            keys.learn_into = user.first().cloned();
            keys.known_hosts = user;
            keys.known_hosts
                .extend(spec.global_known_hosts.clone().unwrap_or(global));
            keys.known_hosts.extend(extra);
        }
    }
    options.auth.named_keys = spec
        .identity_keys
        .iter()
        .filter_map(|k| russh::keys::PublicKey::from_openssh(k).ok())
        .collect();
    options.auth.identities_only = spec.identities_only;
    if let Some(seconds) = spec.connect_timeout {
        options.connect_timeout = Duration::from_secs(seconds.max(1));
    }
    if let Some(accept_new) = spec.accept_new {
        options.host_keys.policy = if accept_new {
            HostKeyPolicy::AcceptNew
        } else {
            HostKeyPolicy::Strict
        };
    }
    options.auth.password = spec.password.clone();
    options.auth.password_asked = spec.password_asked;
    Ok(options)
}

/// Connects to `spec`: through `via` (a `mode: jump` host) when given, and through its
/// ProxyJump hops in order, each opened for this host alone and closed with its session.
pub(super) async fn connect_child(
    ctx: &FleetContext,
    spec: &ChildSpec,
    via: Option<&Session>,
) -> Result<Session, String> {
    let mut hop: Option<Arc<Session>> = None;
    for jump in &spec.jumps {
        let options = child_options(ctx, jump)?;
        let target = Target::new(jump.user.clone(), jump.host.clone(), jump.port);
        let connected = match (&hop, via) {
            (Some(prev), _) => ssh::connect_through(prev.clone(), &target, &options).await,
            (None, Some(v)) => ssh::connect_via(v, &target, &options).await,
            (None, None) => ssh::connect(&target, &options).await,
        };
        match connected {
            Ok(session) => hop = Some(Arc::new(session)),
            Err(e) => {
                if let Some(prev) = &hop {
                    prev.disconnect().await;
                }
                return Err(format!("{}: ProxyJump {e}", spec.name));
            }
        }
    }
    let options = child_options(ctx, spec)?;
    let target = Target::new(spec.user.clone(), spec.host.clone(), spec.port);
    let connected = match (&hop, via) {
        (Some(prev), _) => ssh::connect_through(prev.clone(), &target, &options).await,
        (None, Some(v)) => ssh::connect_via(v, &target, &options).await,
        (None, None) => ssh::connect(&target, &options).await,
    };
    match connected {
        Ok(session) => Ok(session),
        Err(e) => {
            if let Some(prev) = &hop {
                prev.disconnect().await;
            }
            Err(e.to_string())
        }
    }
}

pub(super) fn stopped(name: &str) -> String {
    format!("{name}: not started: the run was stopped")
}

/// Connects to a jump host and stages its children through it (direct-tcpip channels, as
/// ProxyJump). If the jump host cannot be reached, every child fails with that cause.
async fn run_jump(
    ctx: Arc<FleetContext>,
    limit: Arc<Semaphore>,
    spec: ChildSpec,
    inboxes: Vec<Inbox>,
) -> Vec<HostReport> {
    let jump = ChildRun::new(&ctx, &spec.name, &HostPath::root());
    jump.step("connect (jump host)").await;
    let connected = async {
        let _permit = limit.acquire().await.map_err(|e| e.to_string())?;
        connect_child(&ctx, &spec, None).await
    }
    .await;
    let session = match connected {
        Ok(session) => Arc::new(session),
        Err(cause) => {
            jump.failed(cause.clone()).await;
            let mut reports = Vec::new();
            for child in &spec.children {
                let run = ChildRun::new(&ctx, &child.name, &jump.me);
                reports.push(
                    run.failed(format!("{}: unreachable: jump host {cause}", child.name))
                        .await,
                );
            }
            return reports;
        }
    };
    jump.emit(EventKind::State(HostState::Running)).await;
    let mut children = JoinSet::new();
    for (child, inbox) in spec.children.iter().cloned().zip(inboxes) {
        children.spawn(run_child(
            ctx.clone(),
            limit.clone(),
            child,
            inbox,
            jump.me.clone(),
            Some(session.clone()),
        ));
    }
    let mut reports = Vec::new();
    while let Some(r) = children.join_next().await {
        match r {
            Ok(report) => reports.push(report),
            Err(e) => tracing::error!("a child's task failed: {e}"),
        }
    }
    session.disconnect().await;
    jump.emit(EventKind::State(HostState::Exited)).await;
    reports
}

/// A child staged and started: what its supervision needs.
struct Launched {
    session: Arc<Session>,
    /// The jump host's session this child was reached through (`mode: jump`), if any: a
    /// re-attach goes the same way.
    via: Option<Arc<Session>>,
    staged: Staged,
    link: ChildLink,
    events: mpsc::Receiver<FromChild>,
    /// The artifacts still to copy into the running child (`Start::arriving`).
    arriving: BTreeSet<ArtifactRef>,
}

async fn run_child(
    ctx: Arc<FleetContext>,
    limit: Arc<Semaphore>,
    spec: ChildSpec,
    inbox: Inbox,
    prefix: HostPath,
    via: Option<Arc<Session>>,
) -> HostReport {
    let mut run = ChildRun::new(&ctx, &spec.name, &prefix);
    let Some(job) = ctx.exec.clone() else {
        return match stage_child(&ctx, &limit, &spec, &mut run, via, &inbox.stop).await {
            Ok(launched) => supervise(&ctx, &spec, &mut run, launched, inbox).await,
            Err(cause) => run.failed(cause).await,
        };
    };
    // `arbor exec`: the command over a connection of its own (so a relay's staging never
    // shares a connection with it), and arbor as a relay for the targets below.
    let command = job.targets.contains(&spec.name).then(|| {
        super::exec::run_on_host(
            ctx.clone(),
            limit.clone(),
            spec.clone(),
            run.me.clone(),
            via.clone(),
            job.command.clone(),
            inbox.stop.clone(),
        )
    });
    let relay = async {
        if spec.children.is_empty() {
            return None;
        }
        Some(
            match stage_child(&ctx, &limit, &spec, &mut run, via.clone(), &inbox.stop).await {
                Ok(launched) => supervise(&ctx, &spec, &mut run, launched, inbox).await,
                Err(cause) => run.failed(cause).await,
            },
        )
    };
    match command {
        Some(command) => {
            let (ran, relayed) = tokio::join!(command, relay);
            match relayed {
                Some(r) if !r.ok => r,
                _ => ran,
            }
        }
        None => match relay.await {
            Some(r) => r,
            None => run.report(None),
        },
    }
}

/// Connect, stage, start: under the `cconns` limit, and stopped (leaving nothing on the host)
/// when `stop` fires.
async fn stage_child(
    ctx: &FleetContext,
    limit: &Semaphore,
    spec: &ChildSpec,
    run: &mut ChildRun,
    via: Option<Arc<Session>>,
    stop: &CancellationToken,
) -> Result<Launched, String> {
    let _permit = tokio::select! {
        p = limit.acquire() => p.map_err(|e| e.to_string())?,
        _ = stop.cancelled() => return Err(stopped(&spec.name)),
    };
    run.step("connect").await;
    let connect = connect_child(ctx, spec, via.as_deref());
    let jump = via.clone();
    let session = tokio::select! {
        s = connect => Arc::new(s?),
        _ = stop.cancelled() => return Err(stopped(&spec.name)),
    };

    run.step("copy").await;
    let graph = spec
        .graph
        .as_ref()
        .filter(|_| ctx.exec.is_none())
        .and_then(|g| ctx.graph(g).map(|t| (g.clone(), t)));
    let mut last_sent = Instant::now();
    let (events, progress_host) = (ctx.events.clone(), run.me.clone());
    // Seeding: the binary's first copy too, from a sibling that holds it.
    let seeding = spec.seed_siblings.then(|| super::sibling::BuildSeeding {
        board: ctx.siblings.clone(),
        name: spec.name.clone(),
        session: session.clone(),
    });
    let staged = stage::stage(
        &session,
        &ctx.builds,
        &StageOptions {
            probe_always: !ctx.path.is_root(),
            ..StageOptions::from(&ctx.config)
        },
        graph
            .as_ref()
            .map(|(_, text)| ("graph.yaml", text.as_bytes())),
        !spec.children.is_empty(),
        seeding.as_ref(),
        &mut |what, sent, total| {
            // At most ten updates a second, and always the last.
            if sent == total || last_sent.elapsed() >= Duration::from_millis(100) {
                last_sent = Instant::now();
                let _ = events.try_send(Event {
                    host: progress_host.clone(),
                    kind: EventKind::Transfer {
                        what: what.to_string(),
                        sent,
                        total,
                        cached: false,
                    },
                });
            }
        },
        stop,
    )
    .await;
    let mut staged = match staged {
        Ok(staged) => staged,
        Err(e) => {
            session.disconnect().await;
            return Err(match e {
                stage::StageError::Stopped { .. } => stopped(&spec.name),
                e => e.to_string(),
            });
        }
    };
    staged.escalate = spec.escalate.clone().filter(|_| ctx.exec.is_none());
    run.bytes = staged.bytes_copied;
    run.cached = Some(staged.cached);
    // Every artifact of the child's subtree is copied once it runs (`Start::arriving`): it
    // starts, and a relay stages its own children, while the slow link carries them; its
    // engine reads its own as they arrive.
    let later = match ctx.exec {
        None => artifacts::subtree_artifacts(spec),
        Some(_) => Default::default(),
    };
    if staged.cached {
        run.emit(EventKind::Transfer {
            what: "arbor".into(),
            sent: 0,
            total: 0,
            cached: true,
        })
        .await;
    }

    run.step("start").await;
    // A child run through sudo has a working dir only root enters, and `arbor exec`'s relays
    // are short-lived: neither is offered a re-attach.
    let offer_reattach =
        staged.escalate.is_none() && ctx.exec.is_none() && ctx.config.reconnect_grace > 0;
    // QUIC is a re-attach over a UDP connection to the host itself: not through jump hosts.
    let quic = match ctx.config.transport {
        crate::wire::Transport::Ssh => None,
        _ if !offer_reattach || !spec.jumps.is_empty() || via.is_some() => None,
        _ => ctx.quic.identity().map(|id| crate::wire::QuicStart {
            parent: id.fingerprint().to_string(),
            ports: spec.quic_ports.or(ctx.config.quic_ports),
        }),
    };
    let mut config = ctx.config.clone();
    config.cconns = spec.cconns.unwrap_or(config.cconns);
    let start = Start {
        hostname: spec.name.clone(),
        path: run.me.under(&ctx.path),
        graph: spec.graph.clone(),
        graphs: ctx.graphs_for(spec),
        artifacts: spec.artifacts.clone(),
        trees: spec.trees.clone(),
        children: spec.children.clone(),
        // Only the lines its subtree needs: a relay learns nothing about other hosts.
        known_hosts: if spec.children.is_empty() {
            String::new()
        } else {
            let mut known = ssh::known_hosts::KnownHosts::default();
            known.add_text(std::path::Path::new("(known_hosts)"), &ctx.known_hosts);
            known.lines_for(subtree_names(&spec.children).iter().map(String::as_str))
        },
        config,
        credential: spec.credential.clone(),
        store_user: spec.store_user.clone(),
        // Only the targets of its own subtree: a relay learns nothing about other hosts.
        exec: ctx.exec.as_ref().map(|job| {
            let below: std::collections::HashSet<String> = subtree_specs(&spec.children)
                .map(|c| c.name.clone())
                .collect();
            ExecJob {
                command: job.command.clone(),
                targets: job
                    .targets
                    .iter()
                    .filter(|t| below.contains(*t))
                    .cloned()
                    .collect(),
            }
        }),
        quic,
        arriving: later.iter().map(|a| a.sha256.clone()).collect(),
    };
    let forward_agent = !spec.children.is_empty() && ctx.agent.is_some();
    if let (true, Some(agent_for)) = (forward_agent, &ctx.agent) {
        session.set_agent_connector(agent_for(spec));
    }
    let hello_timeout = Duration::from_secs(ctx.config.hello_timeout);
    let launched = child_link::launch(
        &session,
        run.me.clone(),
        &staged,
        ctx.store.clone(),
        start,
        forward_agent,
        hello_timeout,
        offer_reattach,
    )
    .await;
    match launched {
        // A stop that came meanwhile is seen at once by `supervise`, which shuts it down.
        Ok((link, events)) => Ok(Launched {
            session,
            via: jump,
            staged,
            link,
            events,
            arriving: later,
        }),
        Err(e) => {
            // Staged but not started (or silent): leave nothing behind on the host. A
            // password sudo refused is not tried again.
            let mut staged = staged;
            if e.nothing_as_root {
                staged.escalate = None;
            }
            stage::stop_and_remove(&session, &staged).await;
            session.disconnect().await;
            Err(e.message)
        }
    }
}

/// Puts `wanted` (artifacts `spec`'s subtree needs) into the child's cache (see
/// `artifacts`), over the child's QUIC link if given; returns the bytes copied. Leaves what a
/// failure left to the caller.
#[allow(clippy::too_many_arguments)]
async fn copy_artifacts(
    ctx: &FleetContext,
    spec: &ChildSpec,
    me: &HostPath,
    session: &Arc<Session>,
    staged: &Staged,
    wanted: &BTreeSet<ArtifactRef>,
    quic: Option<&quinn::Connection>,
    stop: &CancellationToken,
) -> Result<u64, String> {
    if wanted.is_empty() {
        return Ok(0);
    }
    let seeding = match spec.seed_siblings {
        true => Some(super::sibling::Seeding {
            board: ctx.siblings.clone(),
            me: Arc::new(super::sibling::Peer {
                name: spec.name.clone(),
                session: session.clone(),
                binary: staged.binary.clone(),
                dir: artifacts::child_dir(staged, ctx.config.no_caching)?,
            }),
        }),
        false => None,
    };
    let mut last_sent = Instant::now();
    let (events, host) = (ctx.events.clone(), me.clone());
    let copied = artifacts::copy_to_child(
        session,
        staged,
        wanted,
        &artifacts::subtree_sources(spec),
        &ctx.artifacts,
        artifacts::CopyOptions {
            no_caching: ctx.config.no_caching,
            compress: ctx.config.compress,
        },
        seeding.as_ref(),
        quic,
        stop,
        &mut |what, sent, total| {
            if sent == total || last_sent.elapsed() >= Duration::from_millis(100) {
                last_sent = Instant::now();
                let _ = events.try_send(Event {
                    host: host.clone(),
                    kind: EventKind::Transfer {
                        what: what.to_string(),
                        sent,
                        total,
                        cached: false,
                    },
                });
            }
        },
    )
    .await;
    match copied {
        Ok(copied) => {
            for (sha, why) in &copied.seed_failed {
                tracing::warn!(
                    "{}: seeding artifact {} from a sibling failed ({why}); copied it from \
                     this node instead",
                    spec.name,
                    crate::engine::artifacts::short(sha)
                );
            }
            if copied.seeded > 0 {
                tracing::info!(
                    "{}: {} artifact(s) fetched from a sibling (seeded), none of their bytes \
                     over this node's link",
                    spec.name,
                    copied.seeded
                );
            }
            for sha in &copied.replaced {
                tracing::warn!(
                    "{}: artifact {sha} in its cache was corrupt (sha256 mismatch); \
                     removed it and copied it again",
                    spec.name
                );
            }
            tracing::debug!(
                "{}: {} artifact(s), {} already in its cache, {} bytes copied",
                spec.name,
                wanted.len(),
                copied.cached,
                copied.bytes
            );
            if copied.patched > 0 {
                tracing::info!(
                    "{}: {} artifact(s) sent as patches against the older versions in its \
                     cache ({} bytes in all)",
                    spec.name,
                    copied.patched,
                    copied.bytes
                );
            }
            Ok(copied.bytes)
        }
        Err(e) => Err(if stop.is_cancelled() {
            stopped(&spec.name)
        } else {
            e
        }),
    }
}

/// Serves a running child's `Fetch` of an artifact: its cache entry again.
async fn copy_artifact_again(
    session: &Session,
    staged: &Staged,
    artifact: crate::wire::ArtifactRef,
    served: &Served,
    options: artifacts::CopyOptions,
) -> FetchResult {
    let sha = artifact.sha256.clone();
    let dir = artifacts::child_dir(staged, options.no_caching)?;
    let never = CancellationToken::new();
    let copied = artifacts::copy_to_child(
        session,
        staged,
        &[artifact].into(),
        &BTreeMap::new(),
        served,
        options,
        None,
        None,
        &never,
        &mut |_, _, _| {},
    )
    .await?;
    Ok((format!("{dir}/{sha}"), copied.bytes))
}

/// Serves a running child's `Fetch` of a build over the QUIC link (as
/// `artifacts::send_over_quic` does an artifact): into its cache, at the link's level.
async fn send_build_over_quic(
    connection: &quinn::Connection,
    label: &str,
    staged: &Staged,
    build: &super::builds::Build,
    options: artifacts::CopyOptions,
) -> FetchResult {
    let remote = stage::build_path(staged, &build.sha256, options.no_caching);
    let level = super::transfer::level_for(options.compress, staged.rate);
    let send = super::transfer::Send {
        what: "arbor",
        local: &build.path,
        size: build.size,
        sha256: &build.sha256,
        mode: 0o755,
        level: level.unwrap_or(1),
        base: None,
        receiver: &staged.binary,
        remote: &remote,
    };
    let never = CancellationToken::new();
    let plain = level.is_none();
    super::transfer::send_quic(connection, label, &send, plain, &never, &mut |_, _| {})
        .await
        .map(|bytes| (remote.clone(), bytes))
        .map_err(|e| e.to_string())
}

/// A build copied for a child: its path there and the bytes sent, or why not.
type FetchResult = Result<(String, u64), String>;

/// When a parent gives up on a child whose link is down since `reconnecting`: at the end of
/// the grace period, or at once when it is stopping; never while the link is up.
fn give_up_at(
    reconnecting: Option<tokio::time::Instant>,
    grace: Duration,
    stopping: bool,
) -> Option<tokio::time::Instant> {
    reconnecting.map(|since| if stopping { since } else { since + grace })
}

/// A frame from a child whose link was down: it is back. Says so, and shows the child's
/// last state again.
async fn link_back(
    run: &ChildRun,
    reconnecting: &mut Option<tokio::time::Instant>,
    last_state: &Option<HostState>,
    link_timeout: Duration,
    report: Option<String>,
) -> bool {
    let Some(since) = reconnecting.take() else {
        return false;
    };
    tracing::warn!(
        "{}: its link is back after {}s down; {}",
        run.name,
        (since.elapsed() + link_timeout).as_secs(),
        report.unwrap_or_default()
    );
    run.emit(EventKind::State(
        last_state.clone().unwrap_or(HostState::Running),
    ))
    .await;
    true
}

/// Removes the child's working dirs when the host can be reached (`reach`; a child removes
/// its own as it exits, this covers one that could not) and ends the SSH connection, bounded
/// in time: after a link ran on QUIC, the SSH connection may be dead with nobody knowing yet
/// (the parent's address changed).
async fn clean_up(session: &Session, staged: &Staged, reach: bool) {
    if reach {
        let remove = async {
            super::escalate::remove_root_dir(session, staged, None).await;
            let _ = stage::remove_workdir(session, &staged.workdir).await;
        };
        if tokio::time::timeout(CLEANUP, remove).await.is_err() {
            tracing::debug!(
                "{}: no answer to the cleanup within {CLEANUP:?}",
                session.label()
            );
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
}

/// How long the cleanup of a child's working dirs may take.
const CLEANUP: Duration = Duration::from_secs(5);

/// How long a child's exit status (on its SSH exec channel) and the end of its QUIC stream
/// (its last frames) wait for each other.
const EXIT_SETTLE: Duration = Duration::from_secs(3);

/// Moves `link` onto QUIC, where the child listens (`Up::Quic`), and says which transport the
/// link runs on (an event, and the summary). Errors only when it must be QUIC
/// (`--transport quic`): why it is not.
#[allow(clippy::too_many_arguments)]
async fn to_quic(
    ctx: &FleetContext,
    spec: &ChildSpec,
    run: &mut ChildRun,
    session: &Session,
    link: &mut ChildLink,
    port: u16,
    fingerprint: &str,
    error: Option<String>,
) -> Result<(), String> {
    let moved = match (error, ctx.quic.identity()) {
        (Some(e), _) => Err(format!("the host could not listen on UDP: {e}")),
        (None, None) => Err("no certificate of this node's".to_string()),
        (None, Some(me)) => {
            let tuning = super::quic_child::tuning(&ctx.config);
            let addr = std::net::SocketAddr::new(session.peer().ip(), port);
            let timeout = Duration::from_secs(ctx.config.hello_timeout.max(1));
            // A relay's logins sign through this node's agent over the link itself, as they
            // did through the SSH connection's forwarding, under the same constraints.
            let agent = ctx
                .agent
                .as_ref()
                .filter(|_| !spec.children.is_empty())
                .map(|agent_for| agent_for(spec));
            link.move_to_quic(
                &spec.name,
                addr,
                fingerprint,
                &me,
                &tuning,
                ctx.store.clone(),
                agent,
                timeout,
            )
            .await
        }
    };
    let note = match moved {
        Ok(()) => {
            tracing::debug!(
                "{}: the link moved onto QUIC (congestion control: {})",
                spec.name,
                ctx.config.congestion.name()
            );
            None
        }
        Err(e) => {
            tracing::info!("{}: the link stays on SSH: {e}", spec.name);
            if let Err(e) = link.send(&Down::NoQuic).await {
                tracing::debug!("{}: control link: {e}", spec.name);
            }
            Some(e)
        }
    };
    let transport = if note.is_none() { "quic" } else { "ssh" };
    run.transport = Some((transport.to_string(), note.clone()));
    run.emit(EventKind::Link {
        transport: transport.to_string(),
        note: note.clone(),
    })
    .await;
    match note {
        Some(e) if ctx.config.transport == crate::wire::Transport::Quic => {
            Err(format!("no QUIC link (--transport quic): {e}"))
        }
        _ => Ok(()),
    }
}

/// The first wait between two re-attach tries; it doubles up to [`REATTACH_MAX_WAIT`].
const REATTACH_FIRST_WAIT: Duration = Duration::from_secs(1);
const REATTACH_MAX_WAIT: Duration = Duration::from_secs(5);

/// Running: relay events up, control frames down and builds to the child, until its arbor
/// ends; then remove its working dir.
async fn supervise(
    ctx: &FleetContext,
    spec: &ChildSpec,
    run: &mut ChildRun,
    launched: Launched,
    mut inbox: Inbox,
) -> HostReport {
    let Launched {
        mut session,
        via,
        staged,
        mut link,
        mut events,
        arriving,
    } = launched;
    // A relay's children's artifacts, copied while it runs (`Start::arriving`), over its
    // QUIC link once the link is there (or settled on SSH); each announced with
    // `Down::Arrived` once the copy is done.
    let arriving_shas: Vec<String> = arriving.iter().map(|a| a.sha256.clone()).collect();
    // Its own graph needs some of them: without them it fails, as it would have before it
    // started.
    let needs_own = !artifacts::own_artifacts(spec).is_disjoint(&arriving);
    let mut arriving = Some(arriving).filter(|a| !a.is_empty());
    let mut arriving_copy: Option<futures::future::BoxFuture<'_, Result<u64, String>>> = None;
    // Re-attaching over a fresh SSH connection (crate::node::reattach): the connect in
    // flight, when the next one may start, and the wait between tries.
    let mut connecting: Option<futures::future::BoxFuture<'_, Result<Session, String>>> = None;
    let mut next_try: Option<tokio::time::Instant> = None;
    let mut backoff = REATTACH_FIRST_WAIT;
    run.store_over_tcp = matches!(link.tunnel, Some(ssh::ForwardEnd::Tcp(_)));
    let mut fetches: JoinSet<(String, FetchResult)> = JoinSet::new();
    let mut stopping = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    // Heartbeats down; anything from the child (heartbeats included) shows the link is up.
    let link_timeout = Duration::from_secs(ctx.config.link_timeout.max(1));
    let mut heard = tokio::time::Instant::now();
    let mut beat = tokio::time::interval(crate::wire::heartbeat_every(ctx.config.link_timeout));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link_down = false;
    // Once the link counts as down: until when the child may come back before it fails.
    let grace = Duration::from_secs(ctx.config.reconnect_grace);
    let mut reconnecting: Option<tokio::time::Instant> = None;
    // The child's own last state, shown again when its link comes back.
    let mut last_state: Option<HostState> = None;
    // While the link runs on QUIC, the child's exit status still comes on its SSH exec
    // channel (attachment 0), and its last frames on the QUIC stream: whichever ends first
    // waits up to EXIT_SETTLE for the other. What the channel said; whether the stream
    // ended; whether the SSH connection is gone (the link ran on without it).
    let mut exit_said: Option<(ExitStatus, Option<String>)> = None;
    let mut quic_ended = false;
    let mut ssh_gone = false;
    let mut settle: Option<tokio::time::Instant> = None;
    // Why the host fails though its arbor ran: `--transport quic` and QUIC could not be set
    // up, or its own artifacts could not be copied to it.
    let mut failed: Option<String> = None;
    let mut quic_tried = false;
    if !link.on_quic() {
        run.transport = Some(("ssh".into(), None));
    }
    let (status, stderr) = loop {
        if arriving.is_some() && (link.on_quic() || !link.quic_offered() || quic_tried) {
            let wanted = arriving.take().unwrap_or_default();
            let (session, staged, quic) = (session.clone(), staged.clone(), link.quic_connection());
            let (me, stop) = (run.me.clone(), inbox.stop.clone());
            arriving_copy = Some(Box::pin(async move {
                copy_artifacts(
                    ctx,
                    spec,
                    &me,
                    &session,
                    &staged,
                    &wanted,
                    quic.as_ref(),
                    &stop,
                )
                .await
            }));
        }
        tokio::select! {
            item = events.recv() => match item {
                // A child may say where it listens once, and only when QUIC was offered: it
                // cannot make this node connect again and again.
                Some(FromChild::Quic { .. }) if !link.quic_offered() || quic_tried => {
                    heard = tokio::time::Instant::now();
                    tracing::warn!("{}: said again (or unasked) where it listens for QUIC; ignored", spec.name);
                }
                Some(FromChild::Quic { port, fingerprint, error }) => {
                    heard = tokio::time::Instant::now();
                    quic_tried = true;
                    if let Err(cause) = to_quic(ctx, spec, run, &session, &mut link, port, &fingerprint, error).await
                        && !stopping
                    {
                        failed = Some(format!("{}: {cause}", spec.name));
                        stopping = true;
                        deadline = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                        let shutdown = Down::Shutdown { reason: "no QUIC link (--transport quic)".into() };
                        if let Err(e) = link.send(&shutdown).await {
                            tracing::debug!("{}: control link: {e}", spec.name);
                        }
                    }
                }
                Some(FromChild::Exited { attachment: 0, status, error })
                    if link.on_quic() || quic_ended =>
                {
                    if status == ExitStatus::Unknown {
                        if !ssh_gone {
                            tracing::info!(
                                "{}: its SSH connection closed; the link goes on over QUIC",
                                spec.name
                            );
                        }
                        ssh_gone = true;
                    } else if quic_ended {
                        break (status, error);
                    } else {
                        exit_said = Some((status, error));
                        settle = Some(tokio::time::Instant::now() + EXIT_SETTLE);
                    }
                }
                Some(FromChild::Exited { attachment, status: ExitStatus::Unknown, .. })
                    if link.on_quic() && attachment == link.attachment() =>
                {
                    link.close_quic();
                    quic_ended = true;
                    if let Some((status, error)) = exit_said.take() {
                        break (status, error);
                    }
                    settle = Some(tokio::time::Instant::now() + if ssh_gone { Duration::ZERO } else { EXIT_SETTLE });
                }
                Some(FromChild::Alive) => {
                    heard = tokio::time::Instant::now();
                    let report = reconnecting.map(|_| link.sequence_report());
                    if link_back(run, &mut reconnecting, &last_state, link_timeout, report).await {
                        (connecting, next_try, backoff) = (None, None, REATTACH_FIRST_WAIT);
                    }
                }
                Some(FromChild::Event(event)) => {
                    heard = tokio::time::Instant::now();
                    let report = reconnecting.map(|_| link.sequence_report());
                    if link_back(run, &mut reconnecting, &last_state, link_timeout, report).await {
                        (connecting, next_try, backoff) = (None, None, REATTACH_FIRST_WAIT);
                    }
                    if event.host == run.me
                        && let EventKind::State(state) = &event.kind
                    {
                        last_state = Some(state.clone());
                    }
                    let _ = ctx.events.send(event).await;
                }
                Some(FromChild::Fetch { sha256 }) => {
                    let (session, staged) = (session.clone(), staged.clone());
                    let builds = ctx.builds.clone();
                    let no_caching = ctx.config.no_caching;
                    let compress = ctx.config.compress;
                    let options = artifacts::CopyOptions {
                        no_caching,
                        compress: ctx.config.compress,
                    };
                    // An artifact of its subtree, asked again (its cache entry was corrupt).
                    let artifact = artifacts::subtree_artifacts(spec)
                        .into_iter()
                        .find(|a| a.sha256 == sha256)
                        .filter(|a| ctx.artifacts.holds(&a.sha256));
                    let served = ctx.artifacts.clone();
                    let quic = link.quic_connection();
                    let label = spec.name.clone();
                    fetches.spawn(async move {
                        // On the QUIC link's own stream when the link runs there (its SSH
                        // connection may be gone); over SSH otherwise, or when that fails.
                        if let Some(connection) = &quic {
                            let sent = match &artifact {
                                Some(a) => artifacts::send_over_quic(connection, &label, &staged, a, &served, options).await,
                                None => match builds.by_sha256(&sha256).await {
                                    Ok(build) => send_build_over_quic(connection, &label, &staged, &build, options).await,
                                    Err(e) => Err(e),
                                },
                            };
                            match sent {
                                Ok((path, bytes)) => {
                                    tracing::info!("{label}: {} sent again over its QUIC link ({bytes} bytes)", crate::engine::artifacts::short(&sha256));
                                    return (sha256, Ok((path, bytes)));
                                }
                                Err(e) => tracing::warn!("{e}; trying its SSH connection"),
                            }
                        }
                        let copied = match artifact {
                            Some(a) => {
                                copy_artifact_again(&session, &staged, a, &served, options)
                                    .await
                            }
                            None => match builds.by_sha256(&sha256).await {
                                Ok(build) => {
                                    stage::copy_build(&session, &staged, &build, no_caching, compress)
                                        .await
                                }
                                Err(e) => Err(e),
                            },
                        };
                        (sha256, copied)
                    });
                }
                Some(FromChild::Exited { attachment, .. }) if attachment != link.attachment() => {
                    // The channel of a connection the link moved away from.
                    tracing::debug!("{}: its old connection ({attachment}) ended", spec.name);
                }
                Some(FromChild::Exited { status: ExitStatus::Unknown, .. })
                    if link.can_reattach() && !stopping =>
                {
                    // The SSH connection is gone, not the child (it would have said how it
                    // ended): re-attach over a new one within the grace period.
                    if reconnecting.is_none() {
                        tracing::warn!(
                            "{}: its SSH connection closed; re-attaching over a new one for up \
                             to {}s",
                            spec.name,
                            grace.as_secs()
                        );
                        reconnecting = Some(tokio::time::Instant::now());
                        run.emit(EventKind::State(HostState::Reconnecting { grace: grace.as_secs() })).await;
                    }
                    if connecting.is_none() {
                        next_try = Some(tokio::time::Instant::now());
                    }
                }
                Some(FromChild::Exited { status, error, .. }) => {
                    if let Some(since) = reconnecting {
                        // The SSH connection itself gave up (its keepalives) while the link
                        // was down: nothing can come back on it.
                        link_down = true;
                        let _ = (status, error);
                        break (
                            ExitStatus::Unknown,
                            Some(format!(
                                "link: down for {}s, then its SSH connection closed",
                                (since.elapsed() + link_timeout).as_secs()
                            )),
                        );
                    }
                    break (status, error);
                }
                None => break (ExitStatus::Unknown, None),
            },
            Some(done) = fetches.join_next() => {
                let Ok((sha256, copied)) = done else { continue };
                let result = match copied {
                    Ok((path, bytes)) => {
                        run.bytes += bytes;
                        Ok(path)
                    }
                    Err(e) => {
                        tracing::warn!("{}: fetching build {sha256}: {e}", spec.name);
                        Err(e)
                    }
                };
                if let Err(e) = link.send(&Down::Fetched { sha256, result }).await {
                    tracing::debug!("{}: control link: {e}", spec.name);
                }
            }
            frame = inbox.frames.recv(), if !stopping => {
                if let Some(frame) = frame
                    && let Err(e) = link.send(&frame).await
                {
                    tracing::debug!("{}: control link: {e}", spec.name);
                }
            }
            _ = inbox.stop.cancelled(), if !stopping => {
                stopping = true;
                deadline = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                let shutdown = Down::Shutdown { reason: "parent is shutting down".into() };
                if let Err(e) = link.send(&shutdown).await {
                    tracing::debug!("{}: control link: {e}", spec.name);
                }
            }
            _ = beat.tick() => {
                if let Err(e) = link.beat().await {
                    tracing::debug!("{}: control link: {e}", spec.name);
                }
            }
            _ = tokio::time::sleep_until(heard + link_timeout), if reconnecting.is_none() => {
                // A link that died without a FIN: nothing reaches the child either. Both
                // ends wait for the grace period: the link may come back (the same SSH
                // connection, once the network is back), and the child's subtree runs on.
                // A parent that is stopping waits for no one: the child gives up on its own
                // at the end of its grace period.
                if grace.is_zero() || stopping {
                    link_down = true;
                    break (
                        ExitStatus::Unknown,
                        Some(format!("link: down, nothing from it for {}s", link_timeout.as_secs())),
                    );
                }
                tracing::warn!(
                    "{}: nothing from it for {}s: its link is down; waiting up to {}s for it \
                     to come back",
                    spec.name,
                    link_timeout.as_secs(),
                    grace.as_secs()
                );
                reconnecting = Some(tokio::time::Instant::now());
                run.emit(EventKind::State(HostState::Reconnecting { grace: grace.as_secs() })).await;
                // The connection may be gone for good (an address that changed, an sshd
                // that restarted): try a fresh one too, whichever comes back first.
                if link.can_reattach() {
                    next_try = Some(tokio::time::Instant::now());
                }
            }
            _ = super::sleep_until(next_try), if connecting.is_none() && reconnecting.is_some() && !stopping => {
                next_try = None;
                let connect_timeout = Duration::from_secs(ctx.config.connect_timeout.max(1));
                let via = via.clone();
                connecting = Some(Box::pin(async move {
                    match tokio::time::timeout(connect_timeout, connect_child(ctx, spec, via.as_deref())).await {
                        Ok(connected) => connected,
                        Err(_) => Err(format!("connect: no answer within {}s", connect_timeout.as_secs())),
                    }
                }));
            }
            copied = async { Some(arriving_copy.as_mut()?.await) }, if arriving_copy.is_some() => {
                arriving_copy = None;
                let error = match copied {
                    Some(Ok(bytes)) => {
                        run.bytes += bytes;
                        None
                    }
                    Some(Err(e)) => {
                        if !needs_own {
                            tracing::warn!("{}: the artifacts for the hosts below: {e}", spec.name);
                        }
                        Some(e)
                    }
                    None => Some("gone".to_string()),
                };
                for sha256 in &arriving_shas {
                    let arrived = Down::Arrived { sha256: sha256.clone(), error: error.clone() };
                    if let Err(e) = link.send(&arrived).await {
                        tracing::debug!("{}: control link: {e}", spec.name);
                    }
                }
                if let (Some(e), true, false) = (error, needs_own, stopping || inbox.stop.is_cancelled()) {
                    failed = Some(e);
                    stopping = true;
                    deadline = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                    let shutdown = Down::Shutdown { reason: "its artifacts could not be copied".into() };
                    if let Err(e) = link.send(&shutdown).await {
                        tracing::debug!("{}: control link: {e}", spec.name);
                    }
                }
            }
            connected = async { Some(connecting.as_mut()?.await) }, if connecting.is_some() => {
                connecting = None;
                let attached = match connected {
                    Some(Ok(fresh)) => {
                        let fresh = Arc::new(fresh);
                        let forward_agent = !spec.children.is_empty() && ctx.agent.is_some();
                        if let (true, Some(agent_for)) = (forward_agent, &ctx.agent) {
                            fresh.set_agent_connector(agent_for(spec));
                        }
                        let timeout = Duration::from_secs(ctx.config.hello_timeout.max(1));
                        match link.reattach(&fresh, &staged, ctx.store.clone(), forward_agent, timeout).await {
                            Ok(()) => Ok(fresh),
                            Err(e) => {
                                let _ = tokio::time::timeout(Duration::from_secs(2), fresh.disconnect()).await;
                                Err(e)
                            }
                        }
                    }
                    Some(Err(e)) => Err(e),
                    None => Err("connect: gone".to_string()),
                };
                match attached {
                    Ok(fresh) => {
                        if run.transport.as_ref().is_some_and(|(t, _)| t == "quic") {
                            run.transport = Some(("ssh".into(), Some("QUIC lost, re-attached over SSH".into())));
                        }
                        let old = std::mem::replace(&mut session, fresh);
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(Duration::from_secs(2), old.disconnect()).await;
                        });
                        heard = tokio::time::Instant::now();
                        let report = format!(
                            "re-attached over a new SSH connection; {}",
                            link.sequence_report()
                        );
                        link_back(run, &mut reconnecting, &last_state, link_timeout, Some(report)).await;
                        (next_try, backoff) = (None, REATTACH_FIRST_WAIT);
                    }
                    Err(e) => {
                        tracing::info!(
                            "{}: re-attach failed ({e}); trying again in {}s",
                            spec.name,
                            backoff.as_secs()
                        );
                        next_try = Some(tokio::time::Instant::now() + backoff);
                        backoff = (backoff * 2).min(REATTACH_MAX_WAIT);
                    }
                }
            }
            _ = super::sleep_until(give_up_at(reconnecting, grace, stopping)) => {
                // The grace period is over (or this node is stopping and waits for no one):
                // the child gives up on its own at the end of its grace period (tearing its
                // subtree down and removing its working dir).
                link_down = true;
                let why = if stopping {
                    format!(
                        "link: down (nothing from it for {}s) during the shutdown",
                        link_timeout.as_secs()
                    )
                } else {
                    format!(
                        "link: down, nothing from it for {}s (the link timeout, then the {}s \
                         reconnect grace)",
                        (link_timeout + grace).as_secs(),
                        grace.as_secs()
                    )
                };
                break (ExitStatus::Unknown, Some(why));
            }
            _ = super::sleep_until(settle) => {
                settle = None;
                if let Some((status, error)) = exit_said.take() {
                    // The child ended, and its QUIC stream did not: what it sent last is lost.
                    break (status, error);
                }
                if quic_ended {
                    // The QUIC link ended, and no exit: the child runs on without a link.
                    quic_ended = false;
                    if stopping || !link.can_reattach() {
                        link_down = true;
                        break (ExitStatus::Unknown, Some("link: its QUIC connection closed".into()));
                    }
                    tracing::warn!(
                        "{}: its QUIC connection closed; re-attaching over SSH for up to {}s",
                        spec.name,
                        grace.as_secs()
                    );
                    if reconnecting.is_none() {
                        reconnecting = Some(tokio::time::Instant::now());
                        run.emit(EventKind::State(HostState::Reconnecting { grace: grace.as_secs() })).await;
                    }
                    if connecting.is_none() {
                        next_try = Some(tokio::time::Instant::now());
                    }
                }
            }
            _ = super::sleep_until(deadline) => {
                // Past the grace period: closing stdin is the child's last word to exit.
                tracing::warn!("{}: did not exit within {SHUTDOWN_GRACE:?} of shutdown; closing its link", spec.name);
                link.close().await;
                deadline = None;
            }
        }
    };
    fetches.abort_all();
    link.close_quic();
    if let Some(cause) = failed {
        clean_up(&session, &staged, !link_down).await;
        return run.failed(cause).await;
    }
    // A relay for `arbor exec` ends on its own once its subtree is done.
    let ok = (stopping || ctx.exec.is_some()) && status.success();
    let why = if link_down {
        // The host cannot be asked anything: say so, and leave its cleanup to it.
        stderr.unwrap_or_default()
    } else if ok {
        String::new()
    } else {
        child_link::why_ended(&session, &staged, &status, stderr.as_deref()).await
    };
    clean_up(&session, &staged, !link_down).await;
    if link_down {
        run.failed(format!(
            "{}: {why}; cut off, it tears its own subtree down",
            spec.name
        ))
        .await
    } else if ok {
        run.exited().await
    } else if stopping {
        run.failed(format!(
            "{}: arbor ended during shutdown ({why})",
            spec.name
        ))
        .await
    } else {
        run.failed(format!("{}: arbor ended unexpectedly ({why})", spec.name))
            .await
    }
}
