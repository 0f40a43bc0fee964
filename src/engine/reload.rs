//! Hot reload: the graph file is followed, and each valid new version is diffed against what
//! runs, so that unchanged resources are not touched (an exec does not re-run, a file is not
//! rewritten), changed ones are re-applied and removed ones stop being managed (their files
//! stay on disk).

use crate::engine::fs_events::{FsEvents, Subscription};
use crate::engine::graph::{self, Graph};
use crate::engine::resources::{ResourceId, ResourceSpec};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Editors save in steps (truncate, write; or write a temp file, rename): wait this long after
/// an event for the burst to end before reading.
const SETTLE: Duration = Duration::from_millis(10);

/// What to do to the running resources to reach a new desired set.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<ResourceSpec>,
    pub changed: Vec<ResourceSpec>,
    pub removed: Vec<ResourceId>,
    pub unchanged: usize,
}

impl Diff {
    /// Nothing to add, change or remove.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Compares the running specs with the desired ones, by id and then by value.
pub fn diff<'a>(
    running: impl IntoIterator<Item = (&'a ResourceId, &'a ResourceSpec)>,
    desired: &[ResourceSpec],
) -> Diff {
    let running: HashMap<&ResourceId, &ResourceSpec> = running.into_iter().collect();
    let mut d = Diff::default();
    let mut wanted = HashSet::with_capacity(desired.len());
    for spec in desired {
        let id = spec.id();
        match running.get(&id).copied() {
            None => d.added.push(spec.clone()),
            Some(have) if have == spec => d.unchanged += 1,
            Some(_) => d.changed.push(spec.clone()),
        }
        wanted.insert(id);
    }
    d.removed = running
        .keys()
        .filter(|id| !wanted.contains(**id))
        .map(|id| (*id).clone())
        .collect();
    // Deterministic order for logs and tests.
    d.removed.sort();
    d
}

/// A graph file followed for edits: each saved version whose text differs from the last one
/// seen. Saves in place and by rename (as editors do) are both seen, since [`FsEvents`]
/// watches the file through its directory. The one way arbor follows graph files: the local
/// engine's (`--file`) and the initiator's for graphs it sends to hosts.
pub struct GraphFile {
    path: PathBuf,
    subscription: Subscription,
    last: String,
}

impl GraphFile {
    /// Starts following `path`, whose current text is `text`.
    pub fn follow(fs: &FsEvents, path: &Path, text: String) -> std::io::Result<GraphFile> {
        Ok(GraphFile {
            path: path.to_path_buf(),
            subscription: fs.subscribe(path)?,
            last: text,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next saved text that differs from the last one returned (or the starting one).
    /// A file that is missing or unreadable for a moment (mid-save) is skipped.
    pub async fn next_version(&mut self) -> String {
        loop {
            self.subscription.changed().await;
            tokio::time::sleep(SETTLE).await;
            let Ok(text) = std::fs::read_to_string(&self.path) else {
                continue;
            };
            if text != self.last {
                self.last = text.clone();
                return text;
            }
        }
    }
}

/// Follows the local engine's graph file and sends every valid version that differs from the
/// running graph. An invalid version is logged (file:line:col) and the running graph stays.
pub async fn follow_graph_file(
    mut file: GraphFile,
    hostname: String,
    mut last: Graph,
    graphs: mpsc::UnboundedSender<Graph>,
    cancel: CancellationToken,
) {
    loop {
        let text = tokio::select! {
            _ = cancel.cancelled() => return,
            text = file.next_version() => text,
        };
        match graph::parse(&text, file.path(), &hostname) {
            Ok(g) if g == last => {}
            Ok(g) => {
                tracing::info!(
                    "{}: graph changed, applying the difference",
                    file.path().display()
                );
                last = g.clone();
                if graphs.send(g).is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!("{e} (keeping the running graph)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::resources::{Kind, NoopSpec};
    use std::collections::BTreeMap;

    fn noop(name: &str) -> ResourceSpec {
        ResourceSpec::Noop(NoopSpec {
            name: name.into(),
            ..NoopSpec::default()
        })
    }

    fn exec(name: &str, cmd: &str) -> ResourceSpec {
        ResourceSpec::Exec(Box::new(crate::engine::resources::ExecSpec {
            name: name.into(),
            cmd: cmd.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn the_diff_separates_added_changed_removed_and_unchanged() {
        let running: BTreeMap<_, _> = [noop("keep"), noop("gone"), exec("e", "true")]
            .into_iter()
            .map(|s| (s.id(), s))
            .collect();
        let d = diff(&running, &[noop("keep"), exec("e", "false"), noop("new")]);
        assert_eq!(d.added, vec![noop("new")]);
        assert_eq!(d.changed, vec![exec("e", "false")]);
        assert_eq!(d.removed, vec![ResourceId::new(Kind::Noop, "gone")]);
        assert_eq!(d.unchanged, 1);
        let same: Vec<ResourceSpec> = running.values().cloned().collect();
        assert!(diff(&running, &same).is_empty());
    }
}
