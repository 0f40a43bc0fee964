//! A node's children: staging each one (at most `cconns` being set up at once), relaying their
//! events upward, routing control frames down, and tearing them down. The initiator and every
//! relay use this same code; only where events go (the UI, or the parent link) differs.

use super::child::{self, FromChild};
use super::stage::{self, Builds, StageOptions};
use crate::ssh::Session;
use crate::ssh::{self, ConnectOptions, Connector, ExitStatus, Target};
use crate::wire::{ChildMode, ChildSpec, Down, Event, EventKind, HostPath, HostState, Start};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

/// How long a child gets to exit after a shutdown before its link is closed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// What every child of this node shares.
pub struct FleetContext {
    /// This node's path from the initiator (root for the initiator).
    pub path: HostPath,
    pub connect: ConnectOptions,
    pub builds: Builds,
    pub stage: StageOptions,
    /// Connects each child's store tunnel to this node's own store endpoint.
    pub store: Arc<dyn Connector>,
    /// Serves agent channels from children whose own children need signatures.
    pub agent: Option<Arc<dyn Connector>>,
    /// Graph texts by name.
    pub graphs: BTreeMap<String, String>,
    /// known_hosts lines to hand down to relays.
    pub known_hosts: String,
    pub accept_new: bool,
    /// Limit on children being set up at once (0: none).
    pub cconns: usize,
    pub converged_timeout: Option<u64>,
    pub noop: bool,
    /// Where events go: tagged relative to this node.
    pub events: mpsc::Sender<Event>,
}

/// How one child's run ended, for the summary.
#[derive(Debug, Clone)]
pub struct ChildReport {
    pub name: String,
    pub ok: bool,
    /// Why it failed, naming the step.
    pub cause: Option<String>,
    pub elapsed: Duration,
    pub bytes: u64,
    pub cached: Option<bool>,
}

/// The running children of one node.
pub struct Fleet {
    controls: HashMap<String, mpsc::UnboundedSender<Down>>,
    /// Which graphs each child's subtree uses.
    uses: HashMap<String, Vec<String>>,
    tasks: JoinSet<Vec<ChildReport>>,
    /// Reports finished but not yet handed out.
    ready: Vec<ChildReport>,
}

impl Fleet {
    /// Starts staging every child in `children`; events flow to `ctx.events` at once.
    pub fn start(ctx: Arc<FleetContext>, children: Vec<ChildSpec>) -> Fleet {
        let limit = Arc::new(Semaphore::new(if ctx.cconns == 0 {
            Semaphore::MAX_PERMITS
        } else {
            ctx.cconns
        }));
        let mut fleet = Fleet {
            controls: HashMap::new(),
            uses: HashMap::new(),
            tasks: JoinSet::new(),
            ready: Vec::new(),
        };
        for spec in children {
            match spec.mode {
                ChildMode::Relay => {
                    let rx = fleet.register(&spec);
                    let (ctx, limit) = (ctx.clone(), limit.clone());
                    fleet.tasks.spawn(async move {
                        vec![run_child(ctx, limit, spec, rx, HostPath::root(), None).await]
                    });
                }
                ChildMode::Jump => {
                    // Nothing runs on a jump host: its children are this node's, reached
                    // through it.
                    let controls: Vec<_> =
                        spec.children.iter().map(|c| fleet.register(c)).collect();
                    fleet
                        .tasks
                        .spawn(run_jump(ctx.clone(), limit.clone(), spec, controls));
                }
            }
        }
        fleet
    }

    fn register(&mut self, spec: &ChildSpec) -> mpsc::UnboundedReceiver<Down> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.controls.insert(spec.name.clone(), tx);
        self.uses.insert(spec.name.clone(), graphs_used(spec));
        rx
    }

    pub fn is_empty(&self) -> bool {
        self.controls.is_empty()
    }

    /// Sends a new text of graph `name` to every child whose subtree uses it.
    pub fn update_graph(&self, name: &str, text: &str) {
        for (child, uses) in &self.uses {
            if uses.iter().any(|g| g == name)
                && let Some(tx) = self.controls.get(child)
            {
                let _ = tx.send(Down::Graph {
                    name: name.to_string(),
                    text: text.to_string(),
                });
            }
        }
    }

    /// The next child to finish, or `None` when none is left.
    pub async fn next_finished(&mut self) -> Option<ChildReport> {
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

    /// Shuts every child down and waits for all of them; returns their reports.
    pub async fn shutdown(mut self, reason: &str) -> Vec<ChildReport> {
        for tx in self.controls.values() {
            let _ = tx.send(Down::Shutdown {
                reason: reason.to_string(),
            });
        }
        let mut reports = Vec::new();
        while let Some(r) = self.next_finished().await {
            reports.push(r);
        }
        reports
    }
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

/// The subset of `graphs` a subtree needs.
fn graphs_for(spec: &ChildSpec, graphs: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    graphs_used(spec)
        .into_iter()
        .filter_map(|name| graphs.get(&name).map(|t| (name, t.clone())))
        .collect()
}

async fn emit(ctx: &FleetContext, host: &HostPath, kind: EventKind) {
    let _ = ctx
        .events
        .send(Event {
            host: host.clone(),
            kind,
        })
        .await;
}

/// Connect options for one child: this node's, with the child's pinned key, identity and
/// URL password.
fn child_options(ctx: &FleetContext, spec: &ChildSpec) -> Result<ConnectOptions, String> {
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
            Some(rest) => std::env::var_os("HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| "/root".into())
                .join(rest),
            None => identity.into(),
        };
        options.auth.identities.push(path);
    }
    options.auth.password = spec.password.clone();
    Ok(options)
}

/// Connects to a jump host and stages its children through it (direct-tcpip channels, as
/// ProxyJump). If the jump host cannot be reached, every child fails with that cause.
async fn run_jump(
    ctx: Arc<FleetContext>,
    limit: Arc<Semaphore>,
    spec: ChildSpec,
    controls: Vec<mpsc::UnboundedReceiver<Down>>,
) -> Vec<ChildReport> {
    let started = Instant::now();
    let me = HostPath::root().child(&spec.name);
    emit(
        &ctx,
        &me,
        EventKind::State(HostState::Staging {
            step: "connect (jump host)".into(),
        }),
    )
    .await;
    let connected = async {
        let options = child_options(&ctx, &spec)?;
        let _permit = limit.acquire().await.map_err(|e| e.to_string())?;
        let target = Target::new(spec.user.clone(), spec.host.clone(), spec.port);
        ssh::connect(&target, &options)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    let session = match connected {
        Ok(session) => Arc::new(session),
        Err(cause) => {
            emit(
                &ctx,
                &me,
                EventKind::State(HostState::Failed {
                    cause: cause.clone(),
                }),
            )
            .await;
            let mut reports = Vec::new();
            for child in &spec.children {
                let why = format!("{}: unreachable: jump host {cause}", child.name);
                emit(
                    &ctx,
                    &me.child(&child.name),
                    EventKind::State(HostState::Failed { cause: why.clone() }),
                )
                .await;
                reports.push(ChildReport {
                    name: child.name.clone(),
                    ok: false,
                    cause: Some(why),
                    elapsed: started.elapsed(),
                    bytes: 0,
                    cached: None,
                });
            }
            return reports;
        }
    };
    emit(&ctx, &me, EventKind::State(HostState::Running)).await;
    let mut children = JoinSet::new();
    for (child, control) in spec.children.iter().cloned().zip(controls) {
        children.spawn(run_child(
            ctx.clone(),
            limit.clone(),
            child,
            control,
            me.clone(),
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
    emit(&ctx, &me, EventKind::State(HostState::Exited)).await;
    reports
}

async fn run_child(
    ctx: Arc<FleetContext>,
    limit: Arc<Semaphore>,
    spec: ChildSpec,
    mut control: mpsc::UnboundedReceiver<Down>,
    prefix: HostPath,
    via: Option<Arc<Session>>,
) -> ChildReport {
    let started = Instant::now();
    let me = prefix.child(&spec.name);
    let mut report = ChildReport {
        name: spec.name.clone(),
        ok: false,
        cause: None,
        elapsed: Duration::ZERO,
        bytes: 0,
        cached: None,
    };
    let fail = |report: &mut ChildReport, cause: String| {
        report.cause = Some(cause);
        report.elapsed = started.elapsed();
    };

    // Setup, under the cconns limit. A shutdown that arrives meanwhile ends it early.
    let permit = tokio::select! {
        p = limit.acquire_owned() => p.ok(),
        _ = wait_shutdown(&mut control) => None,
    };
    let Some(permit) = permit else {
        fail(&mut report, "not started: the run was stopped".into());
        emit(
            &ctx,
            &me,
            EventKind::State(HostState::Failed {
                cause: "not started".into(),
            }),
        )
        .await;
        return report;
    };
    emit(
        &ctx,
        &me,
        EventKind::State(HostState::Staging {
            step: "connect".into(),
        }),
    )
    .await;
    let target = Target::new(spec.user.clone(), spec.host.clone(), spec.port);
    let options = match child_options(&ctx, &spec) {
        Ok(o) => o,
        Err(cause) => {
            fail(&mut report, cause.clone());
            emit(&ctx, &me, EventKind::State(HostState::Failed { cause })).await;
            return report;
        }
    };
    let setup = async {
        let session = match &via {
            Some(jump) => ssh::connect_via(jump, &target, &options).await,
            None => ssh::connect(&target, &options).await,
        }
        .map_err(|e| e.to_string())?;
        emit(
            &ctx,
            &me,
            EventKind::State(HostState::Staging {
                step: "copy".into(),
            }),
        )
        .await;
        let graph = spec
            .graph
            .as_ref()
            .and_then(|g| ctx.graphs.get(g).map(|t| (g.clone(), t.clone())));
        let mut last_sent = Instant::now();
        let events = ctx.events.clone();
        let progress_host = me.clone();
        let staged = stage::stage(
            &session,
            &ctx.builds,
            &ctx.stage,
            graph
                .as_ref()
                .map(|(_, text)| ("graph.yaml", text.as_bytes())),
            !spec.children.is_empty(),
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
        )
        .await
        .map_err(|e| e.to_string())?;
        if staged.cached {
            emit(
                &ctx,
                &me,
                EventKind::Transfer {
                    what: "arbor".into(),
                    sent: 0,
                    total: 0,
                    cached: true,
                },
            )
            .await;
        }
        emit(
            &ctx,
            &me,
            EventKind::State(HostState::Staging {
                step: "start".into(),
            }),
        )
        .await;
        let start = Start {
            hostname: spec.name.clone(),
            path: me.under(&ctx.path),
            graph: spec.graph.clone(),
            graphs: graphs_for(&spec, &ctx.graphs),
            children: spec.children.clone(),
            known_hosts: if spec.children.is_empty() {
                String::new()
            } else {
                ctx.known_hosts.clone()
            },
            accept_new: ctx.accept_new,
            cconns: spec.cconns.unwrap_or(ctx.cconns),
            converged_timeout: ctx.converged_timeout,
            noop: ctx.noop,
            no_caching: ctx.stage.no_caching,
            compress: ctx.stage.compress,
        };
        let forward_agent = !spec.children.is_empty() && ctx.agent.is_some();
        if let (true, Some(agent)) = (forward_agent, &ctx.agent) {
            session.set_agent_connector(agent.clone());
        }
        let launched = child::launch(
            &session,
            me.clone(),
            &staged,
            ctx.store.clone(),
            start,
            forward_agent,
        )
        .await;
        match launched {
            Ok((link, events)) => Ok::<_, String>((session, staged, link, events)),
            Err(e) => {
                // Staged but not started: leave nothing behind on the host.
                let _ = stage::remove_workdir(&session, &staged.workdir).await;
                session.disconnect().await;
                Err(e)
            }
        }
    };
    let setup = tokio::select! {
        r = setup => Some(r),
        _ = wait_shutdown(&mut control) => None,
    };
    drop(permit);
    let (session, staged, mut link, mut events) = match setup {
        Some(Ok(parts)) => parts,
        Some(Err(cause)) => {
            fail(&mut report, cause.clone());
            emit(&ctx, &me, EventKind::State(HostState::Failed { cause })).await;
            return report;
        }
        None => {
            fail(&mut report, "not started: the run was stopped".into());
            emit(
                &ctx,
                &me,
                EventKind::State(HostState::Failed {
                    cause: "stopped during setup".into(),
                }),
            )
            .await;
            return report;
        }
    };
    report.bytes = staged.bytes_copied;
    report.cached = Some(staged.cached);

    // Running: relay events up, control frames down, until the child's arbor ends.
    let mut stopping = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    let (status, stderr) = loop {
        tokio::select! {
            item = events.recv() => match item {
                Some(FromChild::Event(event)) => {
                    let _ = ctx.events.send(event).await;
                }
                Some(FromChild::Exited { status, error }) => break (status, error),
                None => break (ExitStatus::Unknown, None),
            },
            frame = control.recv(), if !stopping => match frame {
                Some(frame) => {
                    if matches!(frame, Down::Shutdown { .. }) {
                        stopping = true;
                        deadline = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                    }
                    if let Err(e) = link.send(&frame).await {
                        tracing::debug!("{}: control link: {e}", spec.name);
                    }
                }
                None => {
                    stopping = true;
                    deadline = Some(tokio::time::Instant::now() + SHUTDOWN_GRACE);
                    let _ = link.send(&Down::Shutdown { reason: "parent stopped".into() }).await;
                }
            },
            _ = super::sleep_until(deadline) => {
                // Past the grace period: closing stdin is the child's last word to exit.
                tracing::warn!("{}: did not exit within {SHUTDOWN_GRACE:?} of shutdown; closing its link", spec.name);
                link.close().await;
                deadline = None;
            }
        }
    };
    let ok = stopping && status.success();
    let why = if ok {
        String::new()
    } else {
        child::why_ended(&session, &staged.workdir, &status, stderr.as_deref()).await
    };
    let _ = stage::remove_workdir(&session, &staged.workdir).await;
    session.disconnect().await;
    report.elapsed = started.elapsed();
    if ok {
        report.ok = true;
        emit(&ctx, &me, EventKind::State(HostState::Exited)).await;
    } else {
        let cause = if stopping {
            format!("{}: arbor ended during shutdown ({why})", spec.name)
        } else {
            format!("{}: arbor ended unexpectedly ({why})", spec.name)
        };
        report.cause = Some(cause.clone());
        emit(&ctx, &me, EventKind::State(HostState::Failed { cause })).await;
    }
    report
}

async fn wait_shutdown(control: &mut mpsc::UnboundedReceiver<Down>) {
    loop {
        match control.recv().await {
            Some(Down::Shutdown { .. }) | None => return,
            Some(_) => {}
        }
    }
}
