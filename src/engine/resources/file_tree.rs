//! `file` on a directory (a path ending in `/`, as in mgmt): created with its parents, or
//! removed (`recurse: true` for one that is not empty), and with a `source:` directory a copy
//! of the initiator's tree, built from the host's artifacts (engine::artifacts::TreeItem).
//! `purge: true` removes what the source does not have, except the paths of the graph's other
//! file resources under it (as mgmt excludes them).
//!
//! Nothing here follows a symlink: every entry is looked at with `lstat`, parents before their
//! children, and a symlink (or a file where a directory is wanted, or the reverse) is an error
//! naming its path, as mgmt's is without `force`; purging removes a symlink itself, never what
//! it points to.

use super::Outcome;
use super::file::{FileSpec, FileState};
use crate::engine::artifacts::TreeItem;
use crate::engine::diff::Capped;
use crate::engine::fs_events::FsEvents;
use anyhow::Context as _;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Mode of a directory created without an explicit `mode` (mgmt's, after the usual umask).
const DEFAULT_DIR_MODE: u32 = 0o755;

/// The directory a spec names, without its trailing `/` (so `lstat` sees a symlink there
/// rather than following it).
pub fn root_of(spec: &FileSpec) -> PathBuf {
    let s = spec.path.to_string_lossy();
    PathBuf::from(match s.trim_end_matches('/') {
        "" => "/",
        t => t,
    })
}

/// One change to the tree under the root, by path relative to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Mkdir {
        rel: String,
        mode: u32,
    },
    /// `index` into the tree; `new`: no file there yet.
    Write {
        rel: String,
        index: usize,
        new: bool,
    },
    Chmod {
        rel: String,
        from: u32,
        to: u32,
    },
    /// Purged: not in the source (a directory goes with everything in it).
    Remove {
        rel: String,
        dir: bool,
    },
}

impl Step {
    fn line(&self, root: &Path) -> String {
        match self {
            Step::Mkdir { rel, mode } => {
                format!(
                    "{}/: new directory, mode {mode:04o}",
                    root.join(rel).display()
                )
            }
            Step::Write { rel, index: _, new } => format!(
                "{}: {}",
                root.join(rel).display(),
                if *new { "new file" } else { "content differs" }
            ),
            Step::Chmod { rel, from, to } => {
                format!("{}: mode {from:04o} -> {to:04o}", root.join(rel).display())
            }
            Step::Remove { rel, dir } => format!(
                "{}{}: removed (purge: not in the source)",
                root.join(rel).display(),
                if *dir { "/" } else { "" }
            ),
        }
    }
}

/// What makes `root` (an existing directory, or none yet) hold `tree`; with `purge`, also what
/// removes the entries the tree does not have, except those that are or hold a path in `keep`.
/// An entry of the wrong type (a symlink, a file for a directory, ...) is an error naming it.
pub fn plan(
    root: &Path,
    tree: &[TreeItem],
    purge: bool,
    keep: &[PathBuf],
) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    // Directories that will be made: what they hold is missing, not looked at.
    let mut made: BTreeSet<&str> = BTreeSet::new();
    let root_exists = fs::symlink_metadata(root).is_ok();
    for (index, item) in tree.iter().enumerate() {
        let path = root.join(&item.path);
        let shown = path.display();
        let parent_made = !root_exists
            || item
                .path
                .rsplit_once('/')
                .is_some_and(|(p, _)| made.contains(p));
        let meta = if parent_made {
            None
        } else {
            match fs::symlink_metadata(&path) {
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("stat {shown}")),
            }
        };
        let rel = item.path.clone();
        match (meta, &item.file) {
            (None, None) => {
                made.insert(&item.path);
                steps.push(Step::Mkdir {
                    rel,
                    mode: item.mode,
                });
            }
            (None, Some(_)) => steps.push(Step::Write {
                rel,
                index,
                new: true,
            }),
            (Some(m), _) if m.file_type().is_symlink() => anyhow::bail!(
                "{shown} is a symlink: not followed nor replaced (`force` is not supported)"
            ),
            (Some(m), None) if !m.is_dir() => anyhow::bail!(
                "{shown} is not a directory: the source has a directory there (`force` is not \
                 supported)"
            ),
            (Some(m), Some(_)) if !m.is_file() => anyhow::bail!(
                "{shown} is not a regular file: the source has a file there (`force` is not \
                 supported)"
            ),
            (Some(m), file) => {
                let have = m.permissions().mode() & 0o7777;
                if let Some(a) = file {
                    let right = m.len() == a.size
                        && crate::engine::artifacts::sha256_file(&path)
                            .with_context(|| format!("read {shown}"))?
                            .0
                            == a.sha256;
                    if !right {
                        steps.push(Step::Write {
                            rel,
                            index,
                            new: false,
                        });
                        continue;
                    }
                }
                if have != item.mode {
                    steps.push(Step::Chmod {
                        rel,
                        from: have,
                        to: item.mode,
                    });
                }
            }
        }
    }
    if purge && root_exists {
        let wanted: BTreeSet<&str> = tree.iter().map(|i| i.path.as_str()).collect();
        // Another resource's path, a directory holding one, or its write in progress (the
        // temp file beside it that file::write_atomic renames over it).
        let kept = |p: &Path| {
            keep.iter().any(|k| {
                k.starts_with(p)
                    || (k.parent() == p.parent()
                        && k.file_name().zip(p.file_name()).is_some_and(|(k, p)| {
                            p.to_string_lossy()
                                .starts_with(&format!(".{}.arbor-", k.to_string_lossy()))
                        }))
            })
        };
        let mut stack = vec![(root.to_path_buf(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let meta =
                fs::symlink_metadata(&dir).with_context(|| format!("stat {}", dir.display()))?;
            if !meta.is_dir() {
                continue;
            }
            let mut names: Vec<_> = fs::read_dir(&dir)
                .with_context(|| format!("read {}", dir.display()))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .with_context(|| format!("read {}", dir.display()))?;
            names.sort();
            for name in names {
                let path = dir.join(&name);
                let name = name.to_string_lossy();
                let rel = if rel.is_empty() {
                    name.into_owned()
                } else {
                    format!("{rel}/{name}")
                };
                if wanted.contains(rel.as_str()) {
                    stack.push((path, rel));
                } else if !kept(&path) {
                    let dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
                    steps.push(Step::Remove { rel, dir });
                } else if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    // Holds another resource's path: purge inside it, keep it.
                    stack.push((path, rel));
                }
            }
        }
    }
    Ok(steps)
}

/// Applies `steps` (from [`plan`]) under `root`, the files' bytes from `tree`'s artifacts
/// (each checked by its sha256 before it is written).
fn apply(root: &Path, tree: &[TreeItem], steps: &[Step]) -> anyhow::Result<()> {
    for step in steps {
        match step {
            Step::Mkdir { rel, mode } => {
                let path = root.join(rel);
                fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .with_context(|| format!("chmod {}", path.display()))?;
            }
            Step::Write { rel, index, .. } => {
                let path = root.join(rel);
                let item = &tree[*index];
                let artifact = item.file.as_ref().with_context(|| {
                    format!(
                        "{}: this host was given no artifact for it (a restart copies it)",
                        path.display()
                    )
                })?;
                let bytes = artifact.read_verified()?;
                super::file::write_atomic(&path, &bytes, Some(item.mode), (None, None))
                    .with_context(|| format!("write {}", path.display()))?;
            }
            Step::Chmod { rel, to, .. } => {
                let path = root.join(rel);
                fs::set_permissions(&path, fs::Permissions::from_mode(*to))
                    .with_context(|| format!("chmod {}", path.display()))?;
            }
            Step::Remove { rel, dir } => {
                let path = root.join(rel);
                if *dir {
                    // Never follows a symlink: a link inside goes, not what it points to.
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                }
                .with_context(|| format!("remove {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Checks and (unless `noop`) applies a directory spec; with `want_diff`, a line for each
/// change.
pub fn check_apply_dir(
    spec: &FileSpec,
    tree: Option<&[TreeItem]>,
    noop: bool,
    want_diff: bool,
) -> anyhow::Result<(Outcome, Option<Vec<String>>)> {
    let root = root_of(spec);
    let shown = format!("{}/", root.display());
    let meta = match fs::symlink_metadata(&root) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("stat {shown}")),
    };
    if let Some(m) = &meta {
        if m.file_type().is_symlink() {
            anyhow::bail!("{shown} is a symlink: not followed nor replaced");
        }
        if !m.is_dir() {
            anyhow::bail!("{shown} is not a directory (`force` is not supported)");
        }
    }
    if spec.state == FileState::Absent {
        let Some(_) = meta else {
            return Ok((Outcome::Unchanged, None));
        };
        let diff = want_diff.then(|| vec![format!("{shown}: removed (state: absent)")]);
        if noop {
            return Ok((Outcome::WouldChange(format!("would remove {shown}")), diff));
        }
        if spec.recurse {
            fs::remove_dir_all(&root).with_context(|| format!("remove {shown}"))?;
        } else {
            fs::remove_dir(&root).with_context(|| {
                format!("remove {shown} (only an empty directory without `recurse: true`)")
            })?;
        }
        return Ok((Outcome::Changed(format!("removed {shown}")), diff));
    }
    let (uid, gid) = super::file::owner_ids(spec)?;
    let mut lines = Capped::default();
    let (mut done, mut would) = (Vec::new(), Vec::new());
    let mut act = |noop: bool, what: String, f: &mut dyn FnMut() -> anyhow::Result<()>| {
        if noop {
            would.push(format!("would {what}"));
            Ok(())
        } else {
            f().map(|()| done.push(what))
        }
    };
    if meta.is_none() {
        let mode = spec.mode.unwrap_or(DEFAULT_DIR_MODE);
        lines.push(&format!("{shown}: new directory, mode {mode:04o}"));
        act(noop, format!("mkdir -p {shown}"), &mut || {
            fs::create_dir_all(&root).with_context(|| format!("mkdir -p {shown}"))?;
            fs::set_permissions(&root, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {shown}"))
        })?;
    }
    // Owner first: a chown clears setuid/setgid bits, which the mode then puts back.
    let (have_uid, have_gid, have_mode) = match &meta {
        Some(m) => (
            Some(m.uid()),
            Some(m.gid()),
            Some(m.permissions().mode() & 0o7777),
        ),
        None => (None, None, spec.mode.or(Some(DEFAULT_DIR_MODE))),
    };
    let uid = uid.filter(|u| Some(*u) != have_uid);
    let gid = gid.filter(|g| Some(*g) != have_gid);
    if uid.is_some() || gid.is_some() {
        let to = format!(
            "{}:{}",
            uid.map_or(String::new(), |u| u.to_string()),
            gid.map_or(String::new(), |g| g.to_string())
        );
        lines.push(&format!("{shown}: owner:group -> {to}"));
        act(noop, format!("chown {shown} to {to}"), &mut || {
            std::os::unix::fs::chown(&root, uid, gid).with_context(|| format!("chown {shown}"))
        })?;
    }
    if let Some(mode) = spec.mode {
        let have = if noop {
            have_mode
        } else {
            Some(
                fs::metadata(&root)
                    .with_context(|| format!("stat {shown}"))?
                    .permissions()
                    .mode()
                    & 0o7777,
            )
        };
        if have != Some(mode) && (meta.is_some() || uid.is_some() || gid.is_some()) {
            lines.push(&format!(
                "{shown}: mode {} -> {mode:04o}",
                have.map_or("?".into(), |h| format!("{h:04o}"))
            ));
            act(noop, format!("chmod {shown} to {mode:04o}"), &mut || {
                fs::set_permissions(&root, fs::Permissions::from_mode(mode))
                    .with_context(|| format!("chmod {shown}"))
            })?;
        }
    }
    // The tree: a source's, or with `purge` and no source, an empty one.
    if tree.is_some() || spec.purge {
        let tree = tree.unwrap_or(&[]);
        let steps = plan(&root, tree, spec.purge, &spec.keep)?;
        if !steps.is_empty() {
            for s in &steps {
                lines.push(&s.line(&root));
            }
            let count = |f: fn(&Step) -> bool| steps.iter().filter(|s| f(s)).count();
            let summary = [
                (
                    count(|s| matches!(s, Step::Mkdir { .. })),
                    "directories made",
                ),
                (count(|s| matches!(s, Step::Write { .. })), "files written"),
                (count(|s| matches!(s, Step::Chmod { .. })), "modes fixed"),
                (
                    count(|s| matches!(s, Step::Remove { .. })),
                    "entries purged",
                ),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect::<Vec<_>>()
            .join(", ");
            act(noop, format!("sync {shown}: {summary}"), &mut || {
                apply(&root, tree, &steps)
            })?;
        }
    }
    let outcome = if !would.is_empty() {
        Outcome::WouldChange(would.join(", "))
    } else if !done.is_empty() {
        Outcome::Changed(done.join(", "))
    } else {
        Outcome::Unchanged
    };
    let diff = (want_diff && outcome.changed()).then(|| lines.finish());
    Ok((outcome, diff))
}

/// Calls `on_event` for every change to the directory of `spec` or anything in it (every
/// directory under it is watched, without following symlinks), until `cancel`.
pub async fn watch_dir(
    fs_events: &FsEvents,
    spec: &FileSpec,
    cancel: &CancellationToken,
    on_event: impl Fn(),
) -> anyhow::Result<()> {
    let root = root_of(spec);
    if !spec.purge && spec.source.is_none() {
        // Only the directory itself matters.
        return super::file::watch_path(fs_events, &root, cancel, on_event).await;
    }
    loop {
        if !root.is_dir() {
            // Until it exists: watched as a path (through its nearest existing ancestor).
            let seen = tokio::sync::Notify::new();
            let stop = CancellationToken::new();
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = super::file::watch_path(fs_events, &root, &stop, || seen.notify_one()) => r?,
                _ = seen.notified() => on_event(),
            }
            continue;
        }
        let mut subs = vec![
            fs_events
                .subscribe(&root)
                .with_context(|| format!("watch {}", root.display()))?,
        ];
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            match fs_events.subscribe_all(&dir) {
                Ok(s) => subs.push(s),
                // Gone since it was listed: the next event says so.
                Err(_) => continue,
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        let any = futures::future::select_all(subs.iter().map(|s| Box::pin(s.changed())));
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = any => on_event(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::artifacts::{ArtifactFile, build_manifest, sha256_file, tree_items};
    use std::collections::HashMap;

    /// A source tree: `a/b/deep.txt`, `top.txt` (0600), two identical `same*.txt`, `empty/`.
    fn source_tree(dir: &Path) {
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::create_dir_all(dir.join("empty")).unwrap();
        fs::write(dir.join("a/b/deep.txt"), "deep\n").unwrap();
        fs::write(dir.join("top.txt"), "top\n").unwrap();
        fs::set_permissions(dir.join("top.txt"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(dir.join("same1.txt"), "same\n").unwrap();
        fs::write(dir.join("same2.txt"), "same\n").unwrap();
        fs::set_permissions(dir.join("a"), fs::Permissions::from_mode(0o750)).unwrap();
    }

    /// The source's tree as a host would hold it (blobs where they were read from).
    fn items(src: &Path) -> Vec<TreeItem> {
        let mut blobs = HashMap::new();
        let manifest = build_manifest(src, &mut |p| {
            let (sha256, size) = sha256_file(p)?;
            Ok(crate::wire::ArtifactRef { sha256, size })
        })
        .expect("manifest");
        for (e, p) in &manifest {
            if let Some(a) = &e.file {
                blobs.insert(a.sha256.clone(), p.clone());
            }
        }
        let manifest: Vec<_> = manifest.into_iter().map(|(e, _)| e).collect();
        tree_items(&manifest, |sha| blobs.get(sha).cloned())
    }

    fn dir_spec(path: &Path, source: bool, purge: bool) -> FileSpec {
        FileSpec {
            name: "d".into(),
            path: PathBuf::from(format!("{}/", path.display())),
            source: source.then(|| "src/".into()),
            recurse: source || purge,
            purge,
            ..FileSpec::default()
        }
    }

    #[test]
    fn the_manifest_lists_parents_first_with_modes_and_one_hash_per_file() {
        let src = tempfile::tempdir().unwrap();
        source_tree(src.path());
        let mut hashed = 0;
        let m = build_manifest(src.path(), &mut |p| {
            hashed += 1;
            let (sha256, size) = sha256_file(p)?;
            Ok(crate::wire::ArtifactRef { sha256, size })
        })
        .expect("manifest");
        let paths: Vec<_> = m.iter().map(|(e, _)| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "a",
                "a/b",
                "a/b/deep.txt",
                "empty",
                "same1.txt",
                "same2.txt",
                "top.txt"
            ]
        );
        assert_eq!(hashed, 4);
        let by: HashMap<_, _> = m.iter().map(|(e, _)| (e.path.as_str(), e)).collect();
        assert_eq!(by["a"].mode, 0o750);
        assert!(by["a"].file.is_none());
        assert_eq!(by["top.txt"].mode, 0o600);
        assert_eq!(by["same1.txt"].file, by["same2.txt"].file);
        assert_eq!(by["top.txt"].file.as_ref().map(|a| a.size), Some(4));
    }

    #[test]
    fn a_symlink_in_a_source_is_refused_with_its_path() {
        let src = tempfile::tempdir().unwrap();
        source_tree(src.path());
        std::os::unix::fs::symlink("/etc", src.path().join("a/link")).unwrap();
        let err = build_manifest(src.path(), &mut |p| {
            let (sha256, size) = sha256_file(p)?;
            Ok(crate::wire::ArtifactRef { sha256, size })
        })
        .err()
        .map(|e| e.to_string());
        let err = err.expect("refused");
        assert!(err.contains("a/link") && err.contains("symlink"), "{err}");
    }

    #[test]
    fn a_tree_is_built_then_unchanged_then_drift_is_repaired_and_purge_removes_extras() {
        let src = tempfile::tempdir().unwrap();
        source_tree(src.path());
        let tree = items(src.path());
        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("x/y");
        let spec = dir_spec(&target, true, false);
        let (outcome, _) = check_apply_dir(&spec, Some(&tree), true, false).expect("noop");
        assert!(matches!(outcome, Outcome::WouldChange(_)), "{outcome:?}");
        assert!(!target.exists());
        let (outcome, _) = check_apply_dir(&spec, Some(&tree), false, false).expect("apply");
        assert!(matches!(outcome, Outcome::Changed(_)), "{outcome:?}");
        assert_eq!(
            fs::read_to_string(target.join("a/b/deep.txt")).unwrap(),
            "deep\n"
        );
        assert_eq!(
            fs::read_to_string(target.join("same2.txt")).unwrap(),
            "same\n"
        );
        assert!(target.join("empty").is_dir());
        let mode = |p: &str| fs::metadata(target.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("top.txt"), 0o600);
        assert_eq!(mode("a"), 0o750);
        assert_eq!(
            check_apply_dir(&spec, Some(&tree), false, false).expect("again"),
            (Outcome::Unchanged, None)
        );
        // Drift: a deleted file, an edited file, a changed mode; an extra file stays.
        fs::remove_file(target.join("a/b/deep.txt")).unwrap();
        fs::write(target.join("same1.txt"), "vandal").unwrap();
        fs::set_permissions(target.join("top.txt"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(target.join("a/extra"), "x").unwrap();
        let steps = plan(&target, &tree, false, &[]).expect("plan");
        assert_eq!(steps.len(), 3, "{steps:?}");
        let (_, diff) = check_apply_dir(&spec, Some(&tree), false, true).expect("repair");
        let diff = diff.expect("a diff").join("\n");
        assert!(diff.contains("deep.txt: new file"), "{diff}");
        assert!(diff.contains("same1.txt: content differs"), "{diff}");
        assert!(diff.contains("top.txt: mode 0644 -> 0600"), "{diff}");
        assert_eq!(
            fs::read_to_string(target.join("a/b/deep.txt")).unwrap(),
            "deep\n"
        );
        assert_eq!(
            fs::read_to_string(target.join("same1.txt")).unwrap(),
            "same\n"
        );
        assert_eq!(mode("top.txt"), 0o600);
        assert!(
            target.join("a/extra").exists(),
            "without purge an extra file stays"
        );
        // With purge: extras go (a file, a directory with content, a symlink, not its target),
        // except another resource's path.
        fs::create_dir_all(target.join("extra-dir/in")).unwrap();
        fs::write(target.join("extra-dir/in/f"), "x").unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep-me"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), target.join("a/b/link")).unwrap();
        fs::write(target.join("managed"), "x").unwrap();
        // Its write in progress too.
        fs::write(target.join(".managed.arbor-1-2"), "x").unwrap();
        let mut purge = dir_spec(&target, true, true);
        purge.keep = vec![target.join("managed")];
        let steps = plan(&target, &tree, true, &purge.keep).expect("plan");
        assert_eq!(
            steps,
            [
                Step::Remove {
                    rel: "extra-dir".into(),
                    dir: true
                },
                Step::Remove {
                    rel: "a/extra".into(),
                    dir: false
                },
                Step::Remove {
                    rel: "a/b/link".into(),
                    dir: false
                },
            ]
        );
        check_apply_dir(&purge, Some(&tree), false, false).expect("purge");
        assert!(!target.join("a/extra").exists());
        assert!(!target.join("extra-dir").exists());
        assert!(fs::symlink_metadata(target.join("a/b/link")).is_err());
        assert!(
            outside.path().join("keep-me").exists(),
            "the link's target stays"
        );
        assert!(
            target.join("managed").exists(),
            "another resource's path stays"
        );
        assert_eq!(
            check_apply_dir(&purge, Some(&tree), false, false).expect("again"),
            (Outcome::Unchanged, None)
        );
    }

    #[tokio::test]
    async fn a_change_anywhere_in_the_tree_pokes_and_is_repaired() {
        use crate::engine::resources::{ApplyContext, Resource};
        let src = tempfile::tempdir().unwrap();
        source_tree(src.path());
        let tree = items(src.path());
        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("t");
        let res = std::sync::Arc::new(
            super::super::file::FileResource::new(
                dir_spec(&target, true, true),
                FsEvents::new().expect("inotify"),
            )
            .with_tree(Some(tree)),
        );
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        let settle = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>| {
            while rx.try_recv().is_ok() {}
        };
        let poked = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>| {
            tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
                .await
                .expect("a poke within 2 s");
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        res.check_apply(ApplyContext::default())
            .await
            .expect("build");
        // The watch follows the tree as it is made.
        let damages: [&dyn Fn(&Path); 4] = [
            &|t| fs::remove_file(t.join("a/b/deep.txt")).unwrap(),
            &|t| fs::write(t.join("a/b/stray"), "x").unwrap(),
            &|t| fs::write(t.join("top.txt"), "vandal").unwrap(),
            &|t| fs::remove_dir(t.join("empty")).unwrap(),
        ];
        for damage in damages {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                settle(&mut rx);
                if res
                    .check_apply(ApplyContext::default())
                    .await
                    .expect("check")
                    == Outcome::Unchanged
                {
                    break;
                }
            }
            damage(&target);
            poked(&mut rx).await;
            let repaired = res
                .check_apply(ApplyContext::default())
                .await
                .expect("repair");
            assert!(matches!(repaired, Outcome::Changed(_)), "{repaired:?}");
        }
        assert_eq!(
            fs::read_to_string(target.join("a/b/deep.txt")).unwrap(),
            "deep\n"
        );
        assert!(!target.join("a/b/stray").exists());
        assert!(target.join("empty").is_dir());
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    #[test]
    fn a_symlink_where_a_directory_is_wanted_is_not_followed() {
        let src = tempfile::tempdir().unwrap();
        source_tree(src.path());
        let tree = items(src.path());
        let dst = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = dst.path().join("t");
        fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(outside.path(), target.join("a")).unwrap();
        let err = check_apply_dir(&dir_spec(&target, true, false), Some(&tree), false, false)
            .expect_err("a symlink");
        assert!(format!("{err:#}").contains("a is a symlink"), "{err:#}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // The root itself a symlink: refused too.
        let link = dst.path().join("root-link");
        std::os::unix::fs::symlink(outside.path(), &link).unwrap();
        let err = check_apply_dir(&dir_spec(&link, true, false), Some(&tree), false, false)
            .expect_err("a symlink");
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_directory_is_made_with_parents_and_removed_only_empty_without_recurse() {
        let dst = tempfile::tempdir().unwrap();
        let target = dst.path().join("p/q/r");
        let mut spec = dir_spec(&target, false, false);
        spec.mode = Some(0o700);
        check_apply_dir(&spec, None, false, false).expect("mkdir -p");
        assert!(target.is_dir());
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        assert_eq!(
            check_apply_dir(&spec, None, false, false).expect("again"),
            (Outcome::Unchanged, None)
        );
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let (o, _) = check_apply_dir(&spec, None, false, false).expect("chmod");
        assert!(
            matches!(o, Outcome::Changed(ref m) if m.contains("chmod")),
            "{o:?}"
        );
        fs::write(target.join("f"), "x").unwrap();
        spec.state = FileState::Absent;
        let err = check_apply_dir(&spec, None, false, false).expect_err("not empty");
        assert!(format!("{err:#}").contains("recurse"), "{err:#}");
        spec.recurse = true;
        check_apply_dir(&spec, None, false, false).expect("rm -r");
        assert!(!target.exists());
        assert_eq!(
            check_apply_dir(&spec, None, false, false).expect("gone"),
            (Outcome::Unchanged, None)
        );
    }

    #[test]
    fn an_artifact_that_is_corrupt_is_not_written() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("f"), "good").unwrap();
        let mut tree = items(src.path());
        let blob = tempfile::NamedTempFile::new().unwrap();
        fs::write(blob.path(), "evil").unwrap();
        if let Some(ArtifactFile { path, .. }) = tree[0].file.as_mut() {
            *path = blob.path().to_path_buf();
        }
        let dst = tempfile::tempdir().unwrap();
        let err = check_apply_dir(
            &dir_spec(dst.path(), true, false),
            Some(&tree),
            false,
            false,
        )
        .expect_err("corrupt");
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
        assert!(!dst.path().join("f").exists());
    }
}
