//! The node loop: every arbor process in a run, at every depth, is a node. Its parent link is
//! the operator's terminal (the initiator) or the stdin/stdout of the SSH exec channel its
//! parent opened (a relay or leaf). It stages its children with one code path (`fleet`,
//! `stage`, `child_link`), configured by one [`wire::NodeConfig`](crate::wire::NodeConfig)
//! that the initiator builds and every `Start` frame carries down.
//!
//! | module | owns |
//! |---|---|
//! | config | `RunOptions` (what `arbor run` was asked) and the `NodeConfig` built from it |
//! | initiator | depth 0: inputs, the store, the operator's view, signals, teardown |
//! | relay | depth > 0: the parent link, its own graph, its own children |
//! | run_book | the run's bookkeeping: who is converged, failed, running; when it is done |
//! | seeds | an etcd given with --seeds: the operator's credential, per-host users and roles |
//! | fleet | a node's children: staging under `cconns`, events up, control down, teardown |
//! | stage | putting arbor and a graph on one host |
//! | builds | the builds of arbor a node can copy, and fetching them from the parent |
//! | artifacts | `source:` files as content-addressed blobs: hashed once, cached per node, checked |
//! | sibling | sibling seeding: a child that holds an artifact serves its siblings, brokered by the parent |
//! | child_link | the parent's end of the link to one child (tunnel, exec, frames) |
//! | last_failed | the hosts that failed in the last run, for `--limit @failed` |
//! | exec | `arbor exec`: an ad-hoc command on targeted hosts, through relays; output and exit codes |
//! | parent_link | a child's end of the link to its parent (stdin/stdout frames, log) |

pub mod arriving;
pub mod artifacts;
pub mod builds;
pub mod cache;
pub mod child_link;
pub mod config;
pub mod escalate;
pub mod exec;
pub mod fleet;
pub mod initiator;
pub mod last_failed;
pub mod lease_holds;
pub mod parent_link;
pub mod quic_child;
pub mod reattach;
pub mod relay;
pub mod run_book;
pub mod seeds;
pub mod sibling;
pub mod stage;
pub mod transfer;

use std::path::PathBuf;

/// The user's home: `$HOME`, or `/root` where it is unset (as under some init systems).
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Where arbor keeps its state on this machine: `$XDG_STATE_HOME/arbor`, or
/// `~/.local/state/arbor` (the embedded store, the failed-hosts lists).
pub fn state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home_dir().join(".local/state"))
        .join("arbor")
}

/// Sleeps until `deadline`, or forever without one (for an optional arm of `select!`).
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The engine's next status, if there is an engine (forever pending otherwise); `None` once
/// the engine is gone.
pub(crate) async fn next_status(
    status: &mut Option<tokio::sync::watch::Receiver<crate::engine::Status>>,
) -> Option<crate::engine::Status> {
    match status {
        Some(rx) => {
            if rx.changed().await.is_err() {
                *status = None;
                return None;
            }
            Some(rx.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

/// The engine's next diff (`--diff`), if it makes diffs (forever pending otherwise); `None`
/// once the engine is gone.
pub(crate) async fn next_diff(
    diffs: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::engine::ResourceDiff>>,
) -> Option<crate::engine::ResourceDiff> {
    match diffs {
        Some(rx) => {
            let diff = rx.recv().await;
            if diff.is_none() {
                *diffs = None;
            }
            diff
        }
        None => std::future::pending().await,
    }
}

/// A diff as the event that carries it up; the resource's name is cut like a diff line, so
/// the event always fits a frame.
pub(crate) fn diff_event(diff: crate::engine::ResourceDiff) -> crate::wire::EventKind {
    crate::wire::EventKind::Diff {
        resource: crate::engine::diff::cut(&diff.resource.to_string()),
        lines: diff.lines,
    }
}

/// The store named by --seeds: `unix:PATH`, or URLs where a bare `host:port` means
/// `http://host:port` (how the tunnel end of a TCP forward is written).
/// Every host of a tree, each with its path (`r1/l1-2`), parents before their children.
pub(crate) fn tree_paths(
    specs: &[crate::wire::ChildSpec],
) -> Vec<(crate::wire::HostPath, &crate::wire::ChildSpec)> {
    let mut out = Vec::new();
    let mut stack: Vec<_> = specs
        .iter()
        .rev()
        .map(|c| (crate::wire::HostPath::root().child(&c.name), c))
        .collect();
    while let Some((path, c)) = stack.pop() {
        stack.extend(c.children.iter().rev().map(|g| (path.child(&g.name), g)));
        out.push((path, c));
    }
    out
}

pub(crate) fn seed_endpoints(seeds: &[String]) -> Result<crate::store::client::Endpoints, String> {
    let first = seeds.first().ok_or("no store endpoint (--seeds)")?;
    if first.starts_with("unix:") {
        return crate::store::client::Endpoints::parse(first).map_err(|e| format!("{e:#}"));
    }
    let urls: Vec<String> = seeds
        .iter()
        .map(|s| {
            if s.starts_with("http://") {
                s.clone()
            } else {
                format!("http://{s}")
            }
        })
        .collect();
    crate::store::client::Endpoints::parse(&urls.join(",")).map_err(|e| format!("{e:#}"))
}

/// Connects each child's store tunnel to the store: the Unix socket at `endpoints`, or, for a
/// cluster (or a tunnel end on a TCP port), the member `client` connects to at the time, so
/// tunnels and the node's own client fail over together ([`crate::store::members`]).
pub(crate) fn store_connector(
    client: &crate::store::client::StoreClient,
    endpoints: &crate::store::client::Endpoints,
) -> Result<std::sync::Arc<dyn crate::ssh::Connector>, String> {
    use crate::store::client::Endpoints;
    match (endpoints, client.members()) {
        (Endpoints::Unix(path), _) => Ok(crate::ssh::forward::to_unix(path.clone())),
        (Endpoints::Http(_), Some(members)) => Ok(std::sync::Arc::new(
            move |mut stream: crate::ssh::forward::ForwardedStream| {
                let members = members.clone();
                tokio::spawn(async move {
                    // A connection no member takes is dropped: the host's client sees it close
                    // and tries again (the failure is said once, by `members`).
                    if let Ok(mut member) = members.connect().await {
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut member).await;
                    }
                });
            },
        )),
        (Endpoints::Http(urls), None) => Err(format!(
            "store endpoints {}: the client has no members",
            urls.join(",")
        )),
    }
}

/// The signals that stop a run, as a stream of signal numbers: SIGINT (^C), SIGTERM, SIGHUP.
pub struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next stop signal's number.
    pub async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// The name of a stop signal, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT (^C)",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
