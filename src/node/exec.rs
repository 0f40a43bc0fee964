//! `arbor exec -w NODESET -- COMMAND`: an ad-hoc command on many hosts, as ClusterShell's clush
//! runs one, through arbor's relays where a topology says so.
//!
//! - **Targets.** Without a topology, the nodeset names SSH hosts directly. With one, it names
//!   topology hosts, and the tree is pruned to the paths that lead to them ([`prune`]): a host
//!   that is neither a target nor above one is never contacted.
//! - **One host** ([`run_on_host`], at any depth): its own SSH connection and one exec of
//!   [`WRAPPER`], which runs the command in a process group of its own and kills that group
//!   when the channel's stdin ends. A stop sends that end; a lost connection is one too. So
//!   ^C leaves nothing running, with or without a pty, on OpenSSH and dropbear alike.
//! - **Relays.** A host with targets below it is staged as `arbor run` stages it, and gets
//!   the command and its subtree's targets in its `Start` frame (`wire::ExecJob`); it runs the
//!   same fleet code for its own children and sends their output up as events. A targeted
//!   relay also runs the command, over a connection of its own.
//! - **Output** comes up as `Output` lines (cut to frame-safe pieces), then one `Ended` with
//!   the exit code, or a `Failed` state. The initiator prints every line prefixed by the
//!   host's path, stdout to stdout and stderr to stderr, through [`crate::ui::printable`];
//!   with `-b`, identical stdouts are gathered under one folded nodeset at the end.
//! - **Exit code**: the largest exit code of the command, 255 for a host not reached (or
//!   whose connection, staging or relay failed), 2 for bad input before anything is
//!   contacted, 128 + N when signal N stopped `arbor exec`.

use super::builds::Builds;
use super::config::ExecOptions;
use super::fleet::{self, Fleet, FleetContext};
use super::last_failed::{LastFailed, expand_limit};
use super::{StopSignals, signal_name};
use crate::exit;
use crate::ssh::{self, CommandLine, ExitStatus, Output, Session};
use crate::topology::nodeset;
use crate::topology::resolve::{Given, Overrides, Resolver};
use crate::ui::{HostReport, printable};
use crate::wire::{ChildMode, ChildSpec, Event, EventKind, ExecJob, HostPath, HostState, MAX_LINE};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// The remote side of one host's command, run as `sh -c WRAPPER arbor-exec COMMAND`.
///
/// The command runs under the user's login shell (`$SHELL -c`, as ssh would run it), with
/// stdin from /dev/null, in a session and process group of its own (`setsid`, where the host
/// has it). A watcher reads the channel's stdin, which arbor keeps open and never writes:
/// when it ends (arbor stops the command, or the connection is gone), the watcher sends the
/// group SIGTERM, then SIGKILL if anything of it is left after 2 s. The wrapper exits with
/// the command's status (128 + N for signal N), and kills the watcher when the command ends
/// on its own.
pub const WRAPPER: &str = r#"exec 3<&0
if command -v setsid >/dev/null 2>&1; then
  setsid "${SHELL:-/bin/sh}" -c "$1" </dev/null 3<&- &
else
  "${SHELL:-/bin/sh}" -c "$1" </dev/null 3<&- &
fi
p=$!
{
  while read -r _; do :; done
  kill -TERM -"$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null
  n=0
  while kill -0 -"$p" 2>/dev/null || kill -0 "$p" 2>/dev/null; do
    n=$((n+1))
    if [ "$n" -gt 20 ]; then kill -KILL -"$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; break; fi
    sleep 0.1 2>/dev/null || sleep 1
  done
} <&3 >/dev/null 2>&1 &
w=$!
exec 3<&-
wait "$p"; rc=$?
kill "$w" 2>/dev/null
exit "$rc"
"#;

/// After a stop, how long a host's command has to end (the wrapper's own escalation to
/// SIGKILL takes 2 s) before arbor closes the connection on it.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// With `-b`, the most stdout kept per host (beyond it, the rest is dropped and the gathered
/// output says so): a thousand hosts cannot make the initiator hold more than a GiB.
pub const GATHER_LIMIT: usize = 1024 * 1024;

/// The exit code of a command that ended with `status`, and the signal's name if a signal
/// ended it; `Err` when there is no status to give (the channel was lost or refused).
pub fn exit_code(status: &ExitStatus) -> Result<(u32, Option<String>), String> {
    match status {
        ExitStatus::Code(c) => Ok((*c, None)),
        ExitStatus::Signal { signal, .. } => {
            let number = match signal.as_str() {
                "HUP" => libc::SIGHUP,
                "INT" => libc::SIGINT,
                "QUIT" => libc::SIGQUIT,
                "ILL" => libc::SIGILL,
                "ABRT" => libc::SIGABRT,
                "FPE" => libc::SIGFPE,
                "KILL" => libc::SIGKILL,
                "USR1" => libc::SIGUSR1,
                "SEGV" => libc::SIGSEGV,
                "USR2" => libc::SIGUSR2,
                "PIPE" => libc::SIGPIPE,
                "ALRM" => libc::SIGALRM,
                "TERM" => libc::SIGTERM,
                _ => 127,
            };
            Ok((128 + number as u32, Some(signal.clone())))
        }
        other => Err(other.to_string()),
    }
}

/// Splits a stream into lines (without their newline); a line longer than [`MAX_LINE`] bytes
/// comes out in pieces, so nothing is buffered past it.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn push(&mut self, data: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|b| *b == b'\n') {
            out.push(String::from_utf8_lossy(&self.buf[start..start + pos]).into_owned());
            start += pos + 1;
        }
        self.buf.drain(..start);
        while self.buf.len() >= MAX_LINE {
            let piece: Vec<u8> = self.buf.drain(..MAX_LINE).collect();
            out.push(String::from_utf8_lossy(&piece).into_owned());
        }
        out
    }

    /// The last line, if the stream did not end with a newline.
    fn finish(&mut self) -> Option<String> {
        (!self.buf.is_empty())
            .then(|| String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned())
    }
}

/// Sends one host's output lines up, as many to an event as fit a frame.
async fn send_lines(events: &mpsc::Sender<Event>, host: &HostPath, lines: &[String], stderr: bool) {
    for text in crate::wire::pack_lines(lines) {
        let _ = events
            .send(Event {
                host: host.clone(),
                kind: EventKind::Output {
                    lines: text,
                    stderr,
                },
            })
            .await;
    }
}

/// Runs `command` on one host (`spec`, reached through `via` when it sits behind a jump
/// host): connect under the `cconns` limit, exec [`WRAPPER`], send the output up as events
/// tagged `me`, then `Ended` (or a `Failed` state). `stop` ends the command (the wrapper kills
/// its process group) and waits [`STOP_GRACE`] for it.
pub(super) async fn run_on_host(
    ctx: Arc<FleetContext>,
    limit: Arc<Semaphore>,
    spec: ChildSpec,
    me: HostPath,
    via: Option<Arc<Session>>,
    command: String,
    stop: CancellationToken,
) -> HostReport {
    let started = Instant::now();
    let events = ctx.events.clone();
    let emit = |kind: EventKind| {
        let events = events.clone();
        let host = me.clone();
        async move {
            let _ = events.send(Event { host, kind }).await;
        }
    };
    let report = |cause: Option<String>| HostReport {
        name: spec.name.clone(),
        ok: cause.is_none(),
        cause,
        elapsed: started.elapsed(),
        bytes: 0,
        cached: None,
        store_over_tcp: false,
        transport: None,
    };
    let outcome = run_command(&ctx, &limit, &spec, &me, via, &command, &stop).await;
    match outcome {
        Ok((code, signal)) => {
            emit(EventKind::Ended { code, signal }).await;
            report(None)
        }
        Err(cause) => {
            emit(EventKind::State(HostState::Failed {
                cause: cause.clone(),
            }))
            .await;
            report(Some(cause))
        }
    }
}

async fn run_command(
    ctx: &FleetContext,
    limit: &Semaphore,
    spec: &ChildSpec,
    me: &HostPath,
    via: Option<Arc<Session>>,
    command: &str,
    stop: &CancellationToken,
) -> Result<(u32, Option<String>), String> {
    let name = &spec.name;
    let permit = tokio::select! {
        p = limit.acquire() => p.map_err(|e| e.to_string())?,
        _ = stop.cancelled() => return Err(fleet::stopped(name)),
    };
    // Through `via` (a `mode: jump` host) and the host's ProxyJump hops, as for staging.
    let connect = fleet::connect_child(ctx, spec, via.as_deref());
    let session = tokio::select! {
        s = connect => s?,
        _ = stop.cancelled() => return Err(fleet::stopped(name)),
    };
    let line = CommandLine::new("sh").args(["-c", WRAPPER, "arbor-exec", command]);
    // With become, as root: sudo's password prompt (ours) is answered once, on stdin.
    let line = match &spec.escalate {
        Some(become_) => format!("{} {}", super::escalate::sudo(become_), line.as_str()),
        None => line.as_str().to_string(),
    };
    let mut prompts = super::escalate::Prompts::new(spec.escalate.as_ref());
    let mut remote = match session.exec(&line, &ssh::ExecOptions::default()).await {
        Ok(remote) => remote,
        Err(e) => {
            session.disconnect().await;
            return Err(e.to_string());
        }
    };
    // cconns bounds setup, as for `arbor run`: the command's slot goes to the next host.
    drop(permit);
    let (mut out, mut err) = (Lines::default(), Lines::default());
    let mut deadline: Option<tokio::time::Instant> = None;
    let status = loop {
        tokio::select! {
            item = remote.next() => match item {
                Some(Output::Stdout(data)) => {
                    send_lines(&ctx.events, me, &out.push(&data), false).await;
                }
                Some(Output::Stderr(data)) => {
                    let data = match prompts.answer(&data, &remote, name).await {
                        Ok(data) => data,
                        Err(refused) => {
                            drop(remote);
                            session.disconnect().await;
                            return Err(refused.message);
                        }
                    };
                    send_lines(&ctx.events, me, &err.push(&data), true).await;
                }
                Some(Output::Exit(status)) => break Some(status),
                None => break Some(ExitStatus::Unknown),
            },
            _ = stop.cancelled(), if deadline.is_none() => {
                // The watcher on the host takes the end of stdin as the order to stop.
                if let Err(e) = remote.close_stdin().await {
                    tracing::debug!("{name}: {e}");
                }
                deadline = Some(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = super::sleep_until(deadline) => break None,
        }
    };
    if let Some(line) = out.finish() {
        send_lines(&ctx.events, me, &[line], false).await;
    }
    if let Some(line) = err.finish() {
        send_lines(&ctx.events, me, &[line], true).await;
    }
    drop(remote);
    session.disconnect().await;
    match status {
        Some(status) => exit_code(&status).map_err(|why| format!("{name}: exec: {why}")),
        None => Err(format!(
            "{name}: the command did not end within {}s of the stop; closed the connection \
             (the host's sshd ends the command's stdin, which stops it)",
            STOP_GRACE.as_secs()
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The initiator.

/// Everything `arbor exec` needs, read and checked before anything is contacted.
struct ExecPlan {
    last_failed: LastFailed,
    /// The topology's own `cconns`, overriding --cconns.
    cconns: Option<usize>,
    /// The initiator's children, pruned to the paths that lead to targets.
    children: Vec<ChildSpec>,
    /// The targets' names, in the order given.
    targets: Vec<String>,
    /// Every host of the pruned tree: its path, and the names above it.
    paths: BTreeMap<String, HostPath>,
    command: String,
}

/// Bad input, for exit 2.
fn bad(message: impl Into<String>) -> String {
    message.into()
}

/// The hosts `-w` and `-x` name.
#[derive(Debug, Default)]
pub struct Selected {
    /// The targets: those of `-w` (the failed list's first), without those of `-x`, each
    /// once, in order.
    pub names: Vec<String>,
    /// Named in a `-w` nodeset itself (not through `@failed`).
    pub named: HashSet<String>,
    /// `@failed` was used and gave no host while no nodeset named one: nothing to do.
    pub nothing_failed: bool,
}

/// Expands the `-w` values (nodesets, whose items may include `@failed`, read from
/// `last_failed` if used) and the `-x` nodesets.
pub fn select_names(
    include: &[String],
    exclude: &[String],
    last_failed: &LastFailed,
) -> Result<Selected, String> {
    let mut excluded = HashSet::new();
    for set in exclude {
        excluded.extend(nodeset::expand(set).map_err(|e| {
            bad(format!(
                "-x {set:?}: bad nodeset at character {}: {e}",
                e.at + 1
            ))
        })?);
    }
    let mut selected = Selected::default();
    let mut all = Vec::new();
    let mut used_failed = false;
    for set in include {
        let limit = expand_limit(set, || last_failed.read()).map_err(|e| bad(format!("-w {e}")))?;
        used_failed |= limit.failed.is_some();
        selected.named.extend(limit.named.iter().cloned());
        all.extend(limit.all());
    }
    selected.nothing_failed = used_failed && all.is_empty();
    let mut seen = HashSet::new();
    selected.names = all
        .into_iter()
        .filter(|n| !excluded.contains(n) && seen.insert(n.clone()))
        .collect();
    Ok(selected)
}

/// The subtree that leads to `targets`: hosts that are targets or have one below them, with
/// no graphs (exec runs none) and no store credentials.
pub fn prune(specs: &[ChildSpec], targets: &HashSet<String>) -> Vec<ChildSpec> {
    specs
        .iter()
        .filter_map(|s| {
            let children = prune(&s.children, targets);
            (targets.contains(&s.name) || !children.is_empty()).then(|| ChildSpec {
                children,
                graph: None,
                credential: None,
                ..s.clone()
            })
        })
        .collect()
}

/// Every host of a tree by name: its path and its mode.
fn index(specs: &[ChildSpec]) -> BTreeMap<String, (HostPath, ChildMode)> {
    super::tree_paths(specs)
        .into_iter()
        .map(|(path, c)| (c.name.clone(), (path, c.mode)))
        .collect()
}

impl ExecPlan {
    /// `Ok(None)`: `-w @failed` and nothing failed last time, so nothing to do.
    fn read(options: &ExecOptions) -> Result<Option<ExecPlan>, String> {
        let command = options.command.join(" ");
        if command.trim().is_empty() {
            return Err(bad(
                "no command to run: give it after `--` (arbor exec -w HOSTS -- COMMAND)",
            ));
        }
        let last_failed = LastFailed::for_inputs(
            &super::state_dir(),
            "exec",
            options.topology.as_deref(),
            &[],
            None,
        );
        let selected = select_names(&options.nodesets, &options.exclude, &last_failed)?;
        if selected.nothing_failed {
            return Ok(None);
        }
        let mut names = selected.names;
        let mut cconns = None;
        // Hosts are resolved through ssh_config as `arbor run` resolves them.
        let run = &options.run;
        let mut resolver = Resolver::for_operator(
            run.ssh_config.as_deref(),
            &super::home_dir(),
            Overrides {
                host_key_policy: run.host_key_policy_given,
                connect_timeout: run.connect_timeout_given,
            },
        )?;
        let children = match &options.topology {
            None => {
                if options.user.as_deref() == Some("") {
                    return Err(bad("--user: empty user name"));
                }
                let given = Given {
                    user: options.user.clone(),
                    port: options.port,
                };
                let mut specs = Vec::new();
                for name in &names {
                    // The host as written is its name; ssh_config says where and how to reach it.
                    let mut spec = ChildSpec {
                        name: name.clone(),
                        host: name.clone(),
                        mode: ChildMode::Relay,
                        ..Default::default()
                    };
                    resolver
                        .apply(&mut spec, &given)
                        .map_err(|e| bad(format!("{name}: {e}")))?;
                    specs.push(spec);
                }
                specs
            }
            Some(path) => {
                let topology =
                    crate::topology::load(path, &mut resolver).map_err(|e| e.to_string())?;
                cconns = topology.cconns;
                let known = index(&topology.hosts);
                for set in &options.exclude {
                    for name in nodeset::expand(set).unwrap_or_default() {
                        if !known.contains_key(&name) {
                            return Err(bad(format!(
                                "-x {set:?}: no host named {name:?} in {}",
                                path.display()
                            )));
                        }
                    }
                }
                let mut kept = Vec::new();
                for name in names {
                    let named = selected.named.contains(&name);
                    match known.get(&name) {
                        Some((_, ChildMode::Relay)) => kept.push(name),
                        None if named => {
                            return Err(bad(format!(
                                "-w: no host named {name:?} in {}",
                                path.display()
                            )));
                        }
                        Some((_, ChildMode::Jump)) if named => {
                            return Err(bad(format!(
                                "-w: {name} is a jump host (`mode: jump`): it only forwards \
                                 TCP and runs nothing"
                            )));
                        }
                        _ => tracing::warn!(
                            "-w @failed: {name} failed last time but is no longer a host of {}",
                            path.display()
                        ),
                    }
                }
                names = kept;
                let targets: HashSet<String> = names.iter().cloned().collect();
                prune(&topology.hosts, &targets)
            }
        };
        if names.is_empty() {
            return Err(bad(
                "no host left to run on (every host of -w is excluded by -x)",
            ));
        }
        let mut children = children;
        super::escalate::apply_operator_choices(&mut children, &options.run)?;
        let paths = index(&children)
            .into_iter()
            .map(|(name, (path, _))| (name, path))
            .collect();
        Ok(Some(ExecPlan {
            last_failed,
            cconns,
            children,
            targets: names,
            paths,
            command,
        }))
    }
}

/// Every target's outcome at the initiator: its exit code, or why it has none.
#[derive(Debug, Default)]
pub struct ExecBook {
    /// Targets by name, with their paths.
    targets: BTreeMap<String, HostPath>,
    /// Every host of the pruned tree by path (relays and jump hosts too), for causes.
    names: HashMap<HostPath, String>,
    ended: HashMap<String, u32>,
    /// The first failure heard of each host (targets, relays, jump hosts).
    failed: HashMap<String, String>,
}

impl ExecBook {
    pub fn new(targets: &[String], paths: &BTreeMap<String, HostPath>) -> ExecBook {
        ExecBook {
            targets: targets
                .iter()
                .filter_map(|t| paths.get(t).map(|p| (t.clone(), p.clone())))
                .collect(),
            names: paths.iter().map(|(n, p)| (p.clone(), n.clone())).collect(),
            ..ExecBook::default()
        }
    }

    /// Takes in an event (already checked to come from the subtree it names).
    pub fn event(&mut self, event: &Event) {
        let Some(name) = self.names.get(&event.host) else {
            return;
        };
        match &event.kind {
            EventKind::Ended { code, .. } if self.targets.contains_key(name) => {
                self.ended.entry(name.clone()).or_insert(*code);
            }
            EventKind::State(HostState::Failed { cause }) => {
                self.failed
                    .entry(name.clone())
                    .or_insert_with(|| cause.clone());
            }
            _ => {}
        }
    }

    /// Each target's exit code (255 when it has none), by name.
    pub fn codes(&self) -> BTreeMap<String, u32> {
        self.targets
            .keys()
            .map(|t| {
                let code = self.ended.get(t).map_or(exit::UNREACHABLE as u32, |c| *c);
                (t.clone(), code)
            })
            .collect()
    }

    /// The exit code of the whole command: the largest of the targets', at most 255.
    pub fn exit_code(&self) -> u8 {
        let max = self.codes().into_values().max().unwrap_or(0);
        u8::try_from(max).unwrap_or(exit::UNREACHABLE)
    }

    /// The targets that gave no exit code, with why: their own failure, else the first
    /// failure above them, else that they were not reached.
    pub fn unreached(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (name, path) in &self.targets {
            if self.ended.contains_key(name) {
                continue;
            }
            let mut why = self.failed.get(name).cloned();
            if why.is_none() {
                let mut above = path.clone();
                let mut hops = Vec::new();
                while above.depth() > 1 {
                    above = above.parent();
                    hops.push(above.clone());
                }
                why = hops.iter().rev().find_map(|p| {
                    let n = self.names.get(p)?;
                    self.failed.get(n).map(|c| format!("not reached: {c}"))
                });
            }
            out.push((
                name.clone(),
                why.unwrap_or_else(|| "not reached: no answer".into()),
            ));
        }
        out
    }
}

/// What `arbor exec` prints as events arrive, and gathers for `-b`.
struct View {
    book: ExecBook,
    gather: Option<BTreeMap<String, Gathered>>,
    learn_into: Option<PathBuf>,
    /// The ssh_config files whose HashKnownHosts says how to record learned keys.
    ssh_config: Vec<PathBuf>,
    learnable: HashMap<HostPath, HashSet<String>>,
}

#[derive(Default)]
struct Gathered {
    lines: Vec<String>,
    bytes: usize,
    cut: bool,
}

impl View {
    fn event(&mut self, event: &Event) {
        if !super::initiator::learned_key(
            event,
            self.learn_into.as_deref(),
            &self.ssh_config,
            &self.learnable,
        ) {
            return;
        }
        self.book.event(event);
        let event = crate::ui::sanitized(event);
        let host = printable(&event.host.to_string()).into_owned();
        match &event.kind {
            EventKind::Output {
                lines,
                stderr: false,
            } => {
                if let Some(gather) = &mut self.gather {
                    let g = gather.entry(event.host.name().to_string()).or_default();
                    for line in lines.split('\n') {
                        if g.bytes + line.len() > GATHER_LIMIT {
                            g.cut = true;
                            break;
                        }
                        g.bytes += line.len() + 1;
                        g.lines.push(line.to_string());
                    }
                } else {
                    let mut out = std::io::stdout().lock();
                    for line in lines.split('\n') {
                        let _ = writeln!(out, "{host} | {line}");
                    }
                    let _ = out.flush();
                }
            }
            EventKind::Output {
                lines,
                stderr: true,
            } => {
                let mut err = std::io::stderr().lock();
                for line in lines.split('\n') {
                    let _ = writeln!(err, "{host} ! {line}");
                }
            }
            EventKind::State(HostState::Failed { cause }) => {
                eprintln!("arbor: {host}: FAILED: {cause}");
            }
            EventKind::Log { line, .. } => eprintln!("arbor: {host}: {line}"),
            EventKind::KnownHost { name, .. } => {
                eprintln!("arbor: {host}: learned the host key of {name}");
            }
            _ => tracing::debug!("{host}: {:?}", event.kind),
        }
    }

    /// With `-b`: identical outputs under one folded nodeset, as clush -b prints them.
    fn print_gathered(&self) {
        let Some(gather) = &self.gather else { return };
        let mut groups: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        for (name, g) in gather {
            let mut lines = g.lines.clone();
            if g.cut {
                lines.push(format!("(output cut at {} bytes)", GATHER_LIMIT));
            }
            groups.entry(lines).or_default().push(name.clone());
        }
        let mut groups: Vec<(String, usize, Vec<String>)> = groups
            .into_iter()
            .map(|(lines, names)| (nodeset::fold(&names), names.len(), lines))
            .collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = std::io::stdout().lock();
        for (set, count, lines) in groups {
            let _ = writeln!(out, "---------------");
            let _ = writeln!(out, "{} ({count})", printable(&set));
            let _ = writeln!(out, "---------------");
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
    }

    /// The end on stderr: hosts whose command failed, by exit code, and hosts not reached.
    fn print_outcome(&self) {
        let mut by_code: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        let unreached: HashSet<String> =
            self.book.unreached().into_iter().map(|(n, _)| n).collect();
        for (name, code) in self.book.codes() {
            if code != 0 && !unreached.contains(&name) {
                by_code.entry(code).or_default().push(name);
            }
        }
        for (code, names) in by_code {
            eprintln!(
                "arbor: {}: exited with exit code {code}",
                printable(&nodeset::fold(&names))
            );
        }
        for (name, why) in self.book.unreached() {
            eprintln!(
                "arbor: {}: no exit code (255): {}",
                printable(&name),
                printable(&why)
            );
        }
    }
}

/// Runs `arbor exec`; returns the exit code.
pub async fn run(options: ExecOptions) -> u8 {
    let plan = match ExecPlan::read(&options) {
        Ok(Some(plan)) => plan,
        Ok(None) => {
            eprintln!(
                "arbor exec: no host failed in the last `arbor exec` of these hosts; nothing to do"
            );
            return exit::OK;
        }
        Err(e) => {
            eprintln!("arbor exec: {e}");
            return exit::BAD_INPUT;
        }
    };
    let mut signals = match StopSignals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("arbor: cannot handle signals: {e}");
            return exit::FAILED;
        }
    };
    let relays = plan
        .children
        .iter()
        .any(super::initiator::has_grandchildren);
    let builds = if relays {
        match super::initiator::builds(&options.run) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("arbor exec: {e}");
                return exit::BAD_INPUT;
            }
        }
    } else {
        Builds::new([])
    };
    let cconns = plan.cconns.unwrap_or(options.run.cconns);
    let config = options.run.node_config(
        cconns,
        builds.refs(),
        &crate::engine::exchange::new_run_id(),
    );
    let (connect, known_hosts) =
        super::initiator::initiator_connect(&options.run, &config, &plan.children);
    let accept_new = options.run.accept_new;
    let learn_into = super::initiator::any_accept_new(&plan.children, accept_new)
        .then(|| connect.host_keys.learn_into.clone())
        .flatten();
    let ssh_config = connect.host_keys.ssh_config.clone();
    let (events_tx, mut events) = mpsc::channel(super::child_link::CHILD_QUEUE * 4);
    let mut ctx = FleetContext {
        path: HostPath::root(),
        config,
        connect,
        builds,
        artifacts: Default::default(),
        siblings: Default::default(),
        store: None,
        agent: None,
        graphs: Mutex::new(BTreeMap::new()),
        known_hosts,
        events: events_tx,
        exec: Some(Arc::new(ExecJob {
            command: plan.command.clone(),
            targets: plan.targets.clone(),
        })),
        quic: Default::default(),
    };
    ctx.agent = super::initiator::choose_agent(&ctx, &plan.children).await;
    let mut view = View {
        book: ExecBook::new(&plan.targets, &plan.paths),
        gather: options.gather.then(BTreeMap::new),
        learn_into,
        ssh_config,
        learnable: super::initiator::learnable_names(&plan.children, accept_new),
    };
    let mut fleet = Fleet::start(Arc::new(ctx), plan.children.clone());
    let mut done = fleet.is_empty();
    let stopped = loop {
        if done {
            break None;
        }
        tokio::select! {
            signal = signals.next() => break Some(signal),
            event = events.recv() => {
                if let Some(event) = event {
                    view.event(&event);
                }
            }
            report = fleet.next_finished() => {
                if report.is_none() {
                    done = true;
                }
            }
        }
    };
    if let Some(signal) = stopped {
        eprintln!(
            "arbor: {}; stopping the command on every host",
            signal_name(signal)
        );
        let drain = async {
            while let Some(event) = events.recv().await {
                view.event(&event);
            }
        };
        let teardown = async { tokio::join!(fleet.shutdown(), drain) };
        tokio::select! {
            _ = teardown => {}
            second = signals.next() => {
                eprintln!(
                    "arbor: {} while stopping; exiting now (each host stops its command once \
                     its connection closes)",
                    signal_name(second)
                );
                std::process::exit(exit::for_signal(signal).into());
            }
        }
    } else {
        // Every task sent its events before it finished.
        while let Ok(event) = events.try_recv() {
            view.event(&event);
        }
    }
    view.print_gathered();
    view.print_outcome();
    // For `-w @failed`: the targets whose command did not exit 0.
    let ran: BTreeSet<String> = plan.targets.iter().cloned().collect();
    let failed: BTreeSet<String> = view
        .book
        .codes()
        .into_iter()
        .filter(|(_, code)| *code != 0)
        .map(|(name, _)| name)
        .collect();
    if let Err(e) = plan.last_failed.update(&ran, &failed) {
        eprintln!("arbor: keeping the list of failed hosts: {e}");
    }
    match stopped {
        Some(signal) => exit::for_signal(signal),
        None => view.book.exit_code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, children: Vec<ChildSpec>) -> ChildSpec {
        ChildSpec {
            name: name.into(),
            host: name.into(),
            port: 22,
            user: "root".into(),
            graph: Some("g".into()),
            mode: ChildMode::Relay,
            children,
            credential: Some("secret".into()),
            ..Default::default()
        }
    }

    fn tree() -> Vec<ChildSpec> {
        vec![
            spec("r1", vec![spec("l1-1", vec![]), spec("l1-2", vec![])]),
            spec("r2", vec![spec("l2-1", vec![])]),
        ]
    }

    fn names(specs: &[ChildSpec]) -> Vec<String> {
        let mut out: Vec<String> = fleet::subtree_specs(specs)
            .map(|c| c.name.clone())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn pruning_keeps_only_targets_and_the_relays_above_them() {
        let targets: HashSet<String> = ["l1-2".to_string()].into();
        let pruned = prune(&tree(), &targets);
        assert_eq!(names(&pruned), ["l1-2", "r1"]);
        assert!(pruned[0].graph.is_none() && pruned[0].credential.is_none());
        let targets: HashSet<String> = ["r2".to_string(), "l1-1".to_string()].into();
        assert_eq!(names(&prune(&tree(), &targets)), ["l1-1", "r1", "r2"]);
        assert!(prune(&tree(), &HashSet::new()).is_empty());
    }

    #[test]
    fn exclusion_repeats_and_the_failed_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let last = LastFailed::for_inputs(dir.path(), "exec", None, &[], None);
        let got =
            select_names(&["n[1-4]".into(), "n2,m1".into()], &["n3".into()], &last).expect("ok");
        assert_eq!(got.names, ["n1", "n2", "n4", "m1"]);
        let e = select_names(&["n[1-".into()], &[], &last).expect_err("bad");
        assert!(e.contains("-w \"n[1-\": bad nodeset at character 2"), "{e}");
        assert!(select_names(&["@failed".into()], &[], &last).is_err());
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        last.update(&set(&["n1", "n2"]), &set(&["n2"]))
            .expect("write");
        let got = select_names(&["@failed,m1".into()], &[], &last).expect("ok");
        assert_eq!(got.names, ["n2", "m1"]);
        assert_eq!(got.named, ["m1".to_string()].into());
        last.update(&set(&["n2"]), &set(&[])).expect("write");
        assert!(
            select_names(&["@failed".into()], &[], &last)
                .expect("ok")
                .nothing_failed
        );
    }

    #[test]
    fn the_exit_code_is_the_largest_and_unreached_targets_are_255_with_why() {
        let pruned = prune(
            &tree(),
            &["l1-1", "l1-2", "l2-1", "r2"].map(String::from).into(),
        );
        let paths: BTreeMap<String, HostPath> = index(&pruned)
            .into_iter()
            .map(|(n, (p, _))| (n, p))
            .collect();
        let mut book = ExecBook::new(
            &["l1-1".into(), "l1-2".into(), "l2-1".into(), "r2".into()],
            &paths,
        );
        let ev = |path: &str, kind: EventKind| Event {
            host: HostPath::parse(path),
            kind,
        };
        book.event(&ev(
            "r1/l1-1",
            EventKind::Ended {
                code: 0,
                signal: None,
            },
        ));
        book.event(&ev(
            "r1/l1-2",
            EventKind::Ended {
                code: 3,
                signal: None,
            },
        ));
        book.event(&ev(
            "r2",
            EventKind::Ended {
                code: 1,
                signal: None,
            },
        ));
        assert_eq!(book.exit_code(), exit::UNREACHABLE);
        book.event(&ev(
            "r2",
            EventKind::State(HostState::Failed {
                cause: "r2: stage: boom".into(),
            }),
        ));
        assert_eq!(
            book.unreached(),
            [(
                "l2-1".to_string(),
                "not reached: r2: stage: boom".to_string()
            )]
        );
        book.event(&ev(
            "r2/l2-1",
            EventKind::Ended {
                code: 2,
                signal: None,
            },
        ));
        assert_eq!(book.exit_code(), 3);
        assert!(book.unreached().is_empty());
        // A code for a host that is no target, or a second code, changes nothing.
        book.event(&ev(
            "r1",
            EventKind::Ended {
                code: 200,
                signal: None,
            },
        ));
        book.event(&ev(
            "r1/l1-2",
            EventKind::Ended {
                code: 9,
                signal: None,
            },
        ));
        assert_eq!(book.exit_code(), 3);
    }

    #[test]
    fn lines_come_whole_or_in_bounded_pieces() {
        let mut lines = Lines::default();
        assert_eq!(lines.push(b"a\nb"), ["a"]);
        assert_eq!(lines.push(b"c\n\n"), ["bc", ""]);
        assert_eq!(lines.finish(), None);
        let long = vec![b'x'; MAX_LINE + 10];
        let got = lines.push(&long);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), MAX_LINE);
        assert_eq!(lines.finish().map(|s| s.len()), Some(10));
    }

    #[test]
    fn signals_map_to_128_plus_their_number() {
        let killed = ExitStatus::Signal {
            signal: "KILL".into(),
            core_dumped: false,
        };
        assert_eq!(exit_code(&killed), Ok((137, Some("KILL".into()))));
        assert_eq!(exit_code(&ExitStatus::Code(3)), Ok((3, None)));
        assert!(exit_code(&ExitStatus::Unknown).is_err());
    }

    /// The wrapper under a real shell, its stdin a pipe held open as the SSH channel's is.
    fn wrapped(command: &str) -> (std::process::Child, Option<std::process::ChildStdin>) {
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .args(["-c", WRAPPER, "arbor-exec", command])
            .env("SHELL", "/bin/sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        let stdin = child.stdin.take();
        (child, stdin)
    }

    #[test]
    fn the_wrapper_runs_the_command_and_passes_its_status() {
        let (child, stdin) = wrapped("echo out; echo err >&2; exit 3");
        let out = child.wait_with_output().expect("wait");
        drop(stdin);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn the_end_of_its_stdin_kills_the_commands_whole_process_group() {
        let marker = format!("arbor-exec-test-{}", std::process::id());
        let (child, stdin) = wrapped(&format!("sleep 30 & sleep 31; echo {marker}"));
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        drop(stdin);
        let out = child.wait_with_output().expect("wait");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(out.status.code(), Some(143));
        assert!(
            out.stdout.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
