//! Resource kinds: one file per kind, all behind the one small [`Resource`] trait.
//!
//! After mgmt's resource API: `check_apply` compares the world with the spec and (unless in
//! noop mode) fixes it; `watch` blocks on real events (inotify, child processes, store watches,
//! a timer's ticker) and pokes the scheduler when the world may have drifted. Nothing polls.
//! Adding a kind means one file here (`accounts.rs` is what `user` and `group` share), one variant in [`ResourceSpec`] and one arm in [`build`].

pub mod accounts;
pub mod exec;
pub mod file;
pub mod file_tree;
pub mod group;
pub mod hostname;
pub mod kv;
pub mod meta;
pub mod noop;
pub mod pkg;
pub mod svc;
pub mod timer;
pub mod user;

use crate::engine::fs_events::FsEvents;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use accounts::AccountState;
pub use exec::ExecSpec;
pub use file::{FileSpec, FileState};
pub use group::GroupSpec;
pub use hostname::HostnameSpec;
pub use kv::{KvSpec, KvStore, SkipCmpStyle};
pub use meta::Meta;
pub use noop::NoopSpec;
pub use pkg::{PkgSpec, PkgState};
pub use svc::{SvcSpec, SvcStartup, SvcState};
pub use timer::TimerSpec;
pub use user::UserSpec;

/// The kinds of resource a graph may declare, as spelled in YAML.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    File,
    Exec,
    Noop,
    Timer,
    Kv,
    User,
    Group,
    Hostname,
    Pkg,
    Svc,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::File,
        Kind::Exec,
        Kind::Noop,
        Kind::Timer,
        Kind::Kv,
        Kind::User,
        Kind::Group,
        Kind::Hostname,
        Kind::Pkg,
        Kind::Svc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Exec => "exec",
            Kind::Noop => "noop",
            Kind::Timer => "timer",
            Kind::Kv => "kv",
            Kind::User => "user",
            Kind::Group => "group",
            Kind::Hostname => "hostname",
            Kind::Pkg => "pkg",
            Kind::Svc => "svc",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource's identity within one host's running graph: names are unique per kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceId {
    pub kind: Kind,
    pub name: String,
}

impl ResourceId {
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        ResourceId {
            kind,
            name: name.into(),
        }
    }
}

/// Printed as mgmt does: `file[file1a]`.
impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.kind, self.name)
    }
}

/// The desired state of one resource, as declared in a graph or received from the store.
///
/// Specs compare by value: hot reload keeps a running resource whose spec is unchanged, and
/// an exported spec is what travels through the store (see `exchange`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ResourceSpec {
    File(FileSpec),
    /// Boxed: an exec spec is several times the size of the others.
    Exec(Box<ExecSpec>),
    Noop(NoopSpec),
    Timer(TimerSpec),
    Kv(KvSpec),
    User(UserSpec),
    Group(GroupSpec),
    Hostname(HostnameSpec),
    Pkg(PkgSpec),
    Svc(SvcSpec),
}

impl ResourceSpec {
    pub fn kind(&self) -> Kind {
        match self {
            ResourceSpec::File(_) => Kind::File,
            ResourceSpec::Exec(_) => Kind::Exec,
            ResourceSpec::Noop(_) => Kind::Noop,
            ResourceSpec::Timer(_) => Kind::Timer,
            ResourceSpec::Kv(_) => Kind::Kv,
            ResourceSpec::User(_) => Kind::User,
            ResourceSpec::Group(_) => Kind::Group,
            ResourceSpec::Hostname(_) => Kind::Hostname,
            ResourceSpec::Pkg(_) => Kind::Pkg,
            ResourceSpec::Svc(_) => Kind::Svc,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            ResourceSpec::File(s) => &s.name,
            ResourceSpec::Exec(s) => &s.name,
            ResourceSpec::Noop(s) => &s.name,
            ResourceSpec::Timer(s) => &s.name,
            ResourceSpec::Kv(s) => &s.name,
            ResourceSpec::User(s) => &s.name,
            ResourceSpec::Group(s) => &s.name,
            ResourceSpec::Hostname(s) => &s.name,
            ResourceSpec::Pkg(s) => &s.name,
            ResourceSpec::Svc(s) => &s.name,
        }
    }

    pub fn set_name(&mut self, name: String) {
        match self {
            ResourceSpec::File(s) => s.name = name,
            ResourceSpec::Exec(s) => s.name = name,
            ResourceSpec::Noop(s) => s.name = name,
            ResourceSpec::Timer(s) => s.name = name,
            ResourceSpec::Kv(s) => s.name = name,
            ResourceSpec::User(s) => s.name = name,
            ResourceSpec::Group(s) => s.name = name,
            ResourceSpec::Hostname(s) => s.name = name,
            ResourceSpec::Pkg(s) => s.name = name,
            ResourceSpec::Svc(s) => s.name = name,
        }
    }

    pub fn id(&self) -> ResourceId {
        ResourceId::new(self.kind(), self.name())
    }

    pub fn meta(&self) -> &Meta {
        match self {
            ResourceSpec::File(s) => &s.meta,
            ResourceSpec::Exec(s) => &s.meta,
            ResourceSpec::Noop(s) => &s.meta,
            ResourceSpec::Timer(s) => &s.meta,
            ResourceSpec::Kv(s) => &s.meta,
            ResourceSpec::User(s) => &s.meta,
            ResourceSpec::Group(s) => &s.meta,
            ResourceSpec::Hostname(s) => &s.meta,
            ResourceSpec::Pkg(s) => &s.meta,
            ResourceSpec::Svc(s) => &s.meta,
        }
    }
}

/// What one `check_apply` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Already in the desired state; nothing was done.
    Unchanged,
    /// It was not, and now is; the text says what was done (for the log).
    Changed(String),
    /// Noop mode: it is not in the desired state, and the text says what would be done.
    WouldChange(String),
}

impl Outcome {
    /// Whether dependents should hear about it (and notify edges refresh them).
    pub fn changed(&self) -> bool {
        !matches!(self, Outcome::Unchanged)
    }
}

/// How one `check_apply` is to run.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApplyContext {
    /// Report what would change, change nothing.
    pub noop: bool,
    /// A notify edge fired since the last run: an exec re-runs its command.
    pub refresh: bool,
}

/// Tells the scheduler that a resource should be checked again. Cheap to clone; pokes that
/// arrive while a check is queued or running are coalesced into one more check.
#[derive(Clone)]
pub struct Poke(Arc<dyn Fn() + Send + Sync>);

impl Poke {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Poke(Arc::new(f))
    }

    pub fn poke(&self) {
        (self.0)()
    }
}

/// One resource kind's behaviour (after mgmt's CheckApply and Watch).
pub trait Resource: Send + Sync + 'static {
    fn id(&self) -> &ResourceId;

    /// Compares the world with the spec and, unless `ctx.noop`, makes it so. Must be
    /// idempotent: a second call right after a successful one returns `Unchanged` and touches
    /// nothing. Errors name the cause; the scheduler adds the resource id.
    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>>;

    /// Blocks on the events that may mean drift and calls `poke` for each, until `cancel`.
    /// Returns at once for kinds that have nothing to watch.
    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>>;

    /// A `meta.poll` tick, just before the check it causes. Kinds whose check looks at the
    /// world need nothing; an exec treats the tick as an event that makes it run again.
    fn polled(&self) {}
}

/// For tests: runs `res.watch` in a task whose pokes arrive on the returned channel, until
/// `cancel` fires.
#[cfg(test)]
pub(crate) fn spawn_watch<R: Resource>(
    res: Arc<R>,
    cancel: CancellationToken,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let poke = Poke::new(move || {
        let _ = tx.send(());
    });
    (
        tokio::spawn(async move { res.watch(poke, cancel).await }),
        rx,
    )
}

/// What resources may share with each other on one host.
#[derive(Clone)]
pub struct Services {
    /// One inotify instance for the whole engine: the per-user limit on instances is small.
    pub fs: FsEvents,
    /// The blobs of this host's `source:` files, by the source as written.
    pub artifacts: crate::engine::artifacts::ArtifactIndex,
    /// The trees of this host's `source:` directories, by the source as written.
    pub trees: crate::engine::artifacts::TreeIndex,
    /// `--diff`: where a resource reports what it changes, or would change.
    pub diffs: Option<crate::engine::diff::DiffSink>,
    /// The store, for `kv` resources: the engine's exchange, as this host.
    pub kv: KvStore,
}

/// Builds the running resource for a spec.
pub fn build(spec: &ResourceSpec, services: &Services) -> Arc<dyn Resource> {
    match spec {
        ResourceSpec::File(s) => {
            let artifact = s
                .source
                .as_ref()
                .and_then(|a| services.artifacts.get(a))
                .cloned();
            let tree = s
                .source
                .as_ref()
                .filter(|_| s.is_dir())
                .and_then(|a| services.trees.get(a))
                .cloned();
            Arc::new(
                file::FileResource::new(s.clone(), services.fs.clone())
                    .with_artifact(artifact)
                    .with_tree(tree)
                    .with_diffs(services.diffs.clone()),
            )
        }
        ResourceSpec::Exec(s) => Arc::new(exec::ExecResource::with_fs(
            (**s).clone(),
            services.fs.clone(),
        )),
        ResourceSpec::Noop(s) => Arc::new(noop::NoopResource::new(s.clone())),
        ResourceSpec::Timer(s) => Arc::new(timer::TimerResource::new(s.clone())),
        ResourceSpec::Kv(s) => Arc::new(kv::KvResource::new(s.clone(), services.kv.clone())),
        ResourceSpec::User(s) => Arc::new(user::UserResource::new(s.clone(), services.fs.clone())),
        ResourceSpec::Group(s) => {
            Arc::new(group::GroupResource::new(s.clone(), services.fs.clone()))
        }
        ResourceSpec::Hostname(s) => Arc::new(hostname::HostnameResource::new(
            s.clone(),
            services.fs.clone(),
        )),
        ResourceSpec::Pkg(s) => {
            let artifact = s
                .source
                .as_ref()
                .and_then(|a| services.artifacts.get(a))
                .cloned();
            Arc::new(pkg::PkgResource::new(
                s.clone(),
                services.fs.clone(),
                artifact,
            ))
        }
        ResourceSpec::Svc(s) => Arc::new(svc::SvcResource::new(s.clone())),
    }
}
