//! `file`: a regular file with given content and mode, or no file at all.
//!
//! Writes are atomic (temp file in the same directory, fsync, rename, fsync of the directory)
//! so a reader never sees half a file, and a crash leaves the old or the new content. A file
//! that is already right is not written at all: its mtime is how tests, and users, see that
//! nothing happened.

use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use crate::engine::artifacts::{ArtifactFile, Desired, TreeItem};
use crate::engine::diff::{self, Capped, DiffSink};
use crate::engine::fs_events::FsEvents;
use anyhow::Context as _;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// Mode of files created without an explicit `mode` (before the umask, as `touch` does).
const DEFAULT_MODE: u32 = 0o644;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    #[default]
    Exists,
    Absent,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    pub name: String,
    /// Absolute (checked when the graph is parsed).
    pub path: PathBuf,
    /// `None`: the file must exist, whatever it holds (created empty if missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// `source:` (instead of `content`): a file on the initiator, as written in the graph; its
    /// bytes come from the artifact this host was given for it (engine::artifacts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default)]
    pub state: FileState,
    /// Permission bits; `None` leaves an existing file's mode alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Owner and group, names or numbers (`None`: left alone on an existing file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A directory (the path ends in `/`): `state: absent` removes it with what it holds.
    /// Required (as in mgmt) with a source directory and with `purge`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recurse: bool,
    /// A directory: remove what its source does not have (all, without a source).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub purge: bool,
    /// With `purge`: the paths of the graph's other file resources under this directory,
    /// never purged (mgmt's excludes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

impl FileSpec {
    /// The path names a directory: it ends in `/`, as in mgmt.
    pub fn is_dir(&self) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.path.as_os_str().as_bytes().ends_with(b"/")
    }
}

pub struct FileResource {
    id: ResourceId,
    spec: FileSpec,
    fs: FsEvents,
    /// The blob of `spec.source` on this host, if it was given one.
    artifact: Option<ArtifactFile>,
    /// A source directory's tree on this host, if it was given one.
    tree: Option<Vec<TreeItem>>,
    diffs: Option<DiffSink>,
}

impl FileResource {
    pub fn new(spec: FileSpec, fs: FsEvents) -> Self {
        FileResource {
            id: ResourceId::new(Kind::File, spec.name.clone()),
            spec,
            fs,
            artifact: None,
            tree: None,
            diffs: None,
        }
    }

    /// The content comes from this artifact (`source:`).
    pub fn with_artifact(mut self, artifact: Option<ArtifactFile>) -> Self {
        self.artifact = artifact;
        self
    }

    /// A directory's content comes from this tree (`source:` a directory).
    pub fn with_tree(mut self, tree: Option<Vec<TreeItem>>) -> Self {
        self.tree = tree;
        self
    }

    /// Reports what each check changes (or would change) there (`--diff`).
    pub fn with_diffs(mut self, diffs: Option<DiffSink>) -> Self {
        self.diffs = diffs;
        self
    }
}

impl Resource for FileResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        let (spec, artifact) = (self.spec.clone(), self.artifact.clone());
        let tree = self.tree.clone();
        let want_diff = self.diffs.is_some();
        Box::pin(async move {
            let (outcome, diff) = tokio::task::spawn_blocking(move || {
                if spec.is_dir() {
                    if spec.source.is_some() && tree.is_none() {
                        anyhow::bail!(
                            "source `{}`: this host was given no tree for it (sources are \
                             copied when the run starts: a source added by a live edit needs \
                             a restart)",
                            spec.source.as_deref().unwrap_or_default()
                        );
                    }
                    return super::file_tree::check_apply_dir(
                        &spec,
                        tree.as_deref(),
                        ctx.noop,
                        want_diff,
                    );
                }
                check_apply_diff(&spec, artifact.as_ref(), ctx.noop, want_diff)
            })
            .await
            .context("file check task died")??;
            if let (Some(sink), Some(lines)) = (&self.diffs, diff) {
                sink.send(&self.id, lines);
            }
            Ok(outcome)
        })
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            if self.spec.is_dir() {
                return super::file_tree::watch_dir(&self.fs, &self.spec, &cancel, || poke.poke())
                    .await;
            }
            watch_path(&self.fs, &self.spec.path, &cancel, || poke.poke()).await
        })
    }
}

/// Calls `on_event` for every change to `path` (through its parent directory, so edits,
/// deletes and renames over it are seen), following the nearest existing ancestor while the
/// directory does not exist, until `cancel`.
pub(super) async fn watch_path(
    fs: &FsEvents,
    path: &Path,
    cancel: &CancellationToken,
    on_event: impl Fn(),
) -> anyhow::Result<()> {
    loop {
        match fs.subscribe(path) {
            Ok(sub) => loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = sub.changed() => on_event(),
                }
                // The directory itself went away: its watch went with it.
                if !path.parent().is_some_and(Path::is_dir) {
                    break;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // No directory yet (an exec may create it): wait for the first missing
                // ancestor to appear, then try again.
                let Some(missing) = first_missing_ancestor(path) else {
                    // The directory appeared between the two looks (another resource made
                    // it): subscribe again, after a breath in case it keeps coming and going.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let sub = fs.subscribe(&missing)?;
                if missing.exists() {
                    continue;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = sub.changed() => on_event(),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("watch {}", path.display())),
        }
    }
}

/// For `/a/b/c/f` where only `/a` exists: `/a/b`; `None` when every ancestor exists.
fn first_missing_ancestor(path: &Path) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    ancestors
        .into_iter()
        .find(|a| !a.exists())
        .map(Path::to_path_buf)
}

#[cfg(test)]
fn check_apply(spec: &FileSpec, noop: bool) -> anyhow::Result<Outcome> {
    check_apply_with(spec, None, noop)
}

#[cfg(test)]
fn check_apply_with(
    spec: &FileSpec,
    artifact: Option<&ArtifactFile>,
    noop: bool,
) -> anyhow::Result<Outcome> {
    check_apply_diff(spec, artifact, noop, false).map(|(outcome, _)| outcome)
}

/// Checks and (unless `noop`) applies `spec`, its content from `artifact` when it has a
/// `source`; with `want_diff`, also the lines `--diff` shows for what changed or would change
/// (`None` when nothing does).
fn check_apply_diff(
    spec: &FileSpec,
    artifact: Option<&ArtifactFile>,
    noop: bool,
    want_diff: bool,
) -> anyhow::Result<(Outcome, Option<Vec<String>>)> {
    let path = &spec.path;
    let shown = path.display();
    match spec.state {
        FileState::Absent => match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((Outcome::Unchanged, None)),
            Err(e) => Err(e).with_context(|| format!("stat {shown}")),
            Ok(meta) if meta.is_dir() => anyhow::bail!("{shown} is a directory"),
            Ok(meta) => {
                let diff = want_diff.then(|| {
                    vec![format!(
                        "{shown}: removed (state: absent; it held {} bytes)",
                        meta.len()
                    )]
                });
                if noop {
                    return Ok((Outcome::WouldChange(format!("would remove {shown}")), diff));
                }
                fs::remove_file(path).with_context(|| format!("remove {shown}"))?;
                Ok((Outcome::Changed(format!("removed {shown}")), diff))
            }
        },
        FileState::Exists => {
            let (uid, gid) = owner_ids(spec)?;
            let current = match fs::read(path) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e).with_context(|| format!("read {shown}")),
            };
            let desired = Desired::of(spec.content.as_deref(), spec.source.as_deref(), artifact)?;
            let content_right = match &current {
                None => false,
                Some(have) => desired.is_met_by(have),
            };
            if !content_right {
                let (what, done) = if current.is_some() {
                    ("rewrite", "rewrote")
                } else {
                    ("create", "created")
                };
                if let (Desired::Artifact(a), false, false) = (&desired, want_diff, noop) {
                    // Streamed into place as it is read (as it arrives, for one still being
                    // copied here), checked before the rename.
                    write_atomic_with(path, spec.mode, (uid, gid), |f| {
                        a.write_verified(&mut Flushed::new(f))
                            .map_err(|e| io::Error::other(format!("{e:#}")))
                    })
                    .with_context(|| format!("write {shown}"))?;
                    return Ok((Outcome::Changed(format!("{done} {shown}")), None));
                }
                let content = desired.bytes()?;
                let diff = want_diff
                    .then(|| content_diff(spec, current.as_deref(), &content, (uid, gid)))
                    .transpose()?;
                if noop {
                    return Ok((Outcome::WouldChange(format!("would {what} {shown}")), diff));
                }
                write_atomic(path, &content, spec.mode, (uid, gid))
                    .with_context(|| format!("write {shown}"))?;
                return Ok((Outcome::Changed(format!("{done} {shown}")), diff));
            }
            let meta = fs::metadata(path).with_context(|| format!("stat {shown}"))?;
            let (mut done, mut would) = (Vec::new(), Vec::new());
            let mut lines = Capped::default();
            // Owner first: a chown clears setuid/setgid bits, which the mode then puts back.
            let uid = uid.filter(|u| *u != meta.uid());
            let gid = gid.filter(|g| *g != meta.gid());
            if uid.is_some() || gid.is_some() {
                let to = format!(
                    "{}:{}",
                    uid.map_or(String::new(), |u| u.to_string()),
                    gid.map_or(String::new(), |g| g.to_string())
                );
                owner_lines(&mut lines, spec, &meta, (uid, gid));
                if noop {
                    would.push(format!("would chown {shown} to {to}"));
                } else {
                    std::os::unix::fs::chown(path, uid, gid)
                        .with_context(|| format!("chown {shown}"))?;
                    done.push(format!("chown {shown} to {to}"));
                }
            }
            if let Some(mode) = spec.mode {
                let have = fs::metadata(path)
                    .with_context(|| format!("stat {shown}"))?
                    .permissions()
                    .mode()
                    & 0o7777;
                if have != mode {
                    lines.push(&format!("{shown}: mode {have:04o} -> {mode:04o}"));
                    if noop {
                        would.push(format!("would chmod {shown} from {have:04o} to {mode:04o}"));
                    } else {
                        fs::set_permissions(path, fs::Permissions::from_mode(mode))
                            .with_context(|| format!("chmod {shown}"))?;
                        done.push(format!("chmod {shown} to {mode:04o}"));
                    }
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
    }
}

/// `--diff` for a file whose content is to be written: a line each for its mode, owner and
/// group where they change (or, for a new file, what they will be), then the content diff.
fn content_diff(
    spec: &FileSpec,
    current: Option<&[u8]>,
    content: &[u8],
    (uid, gid): (Option<u32>, Option<u32>),
) -> anyhow::Result<Vec<String>> {
    let shown = spec.path.display().to_string();
    let mut lines = Capped::default();
    match current {
        None => {
            let mut line = format!(
                "{shown}: new file, mode {:04o}",
                spec.mode.unwrap_or(DEFAULT_MODE)
            );
            if let Some(uid) = uid {
                line.push_str(&format!(", owner {uid}"));
            }
            if let Some(gid) = gid {
                line.push_str(&format!(", group {gid}"));
            }
            lines.push(&line);
        }
        Some(_) => {
            let meta = fs::metadata(&spec.path).with_context(|| format!("stat {shown}"))?;
            let uid = uid.filter(|u| *u != meta.uid());
            let gid = gid.filter(|g| *g != meta.gid());
            owner_lines(&mut lines, spec, &meta, (uid, gid));
            let have = meta.permissions().mode() & 0o7777;
            if let Some(mode) = spec.mode.filter(|m| *m != have) {
                lines.push(&format!("{shown}: mode {have:04o} -> {mode:04o}"));
            }
        }
    }
    diff::content(&mut lines, &shown, current, content);
    Ok(lines.finish())
}

/// One line for a changing owner, one for a changing group (numbers, as `ls -n`).
fn owner_lines(
    lines: &mut Capped,
    spec: &FileSpec,
    meta: &fs::Metadata,
    (uid, gid): (Option<u32>, Option<u32>),
) {
    let shown = spec.path.display();
    if let Some(uid) = uid {
        lines.push(&format!("{shown}: owner {} -> {uid}", meta.uid()));
    }
    if let Some(gid) = gid {
        lines.push(&format!("{shown}: group {} -> {gid}", meta.gid()));
    }
}

/// A file being filled with an artifact: every [`Flushed::EVERY`] bytes, the kernel is asked
/// to start writing them out (`sync_file_range`, without waiting), so the fsync before the
/// rename has little left to do. That matters when the artifact arrives over a slow link
/// for seconds, and a dozen hosts on one machine would otherwise flush it all at the end.
struct Flushed<'a> {
    file: &'a mut fs::File,
    /// Bytes written, and those already handed to the kernel to write out.
    written: u64,
    kicked: u64,
}

impl<'a> Flushed<'a> {
    const EVERY: u64 = 4 << 20;

    fn new(file: &'a mut fs::File) -> Self {
        Flushed {
            file,
            written: 0,
            kicked: 0,
        }
    }
}

impl Write for Flushed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.kicked >= Self::EVERY {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on our own open file; its failure only means the
            // fsync does the work.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.kicked as libc::off64_t,
                    (self.written - self.kicked) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.kicked = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl crate::engine::artifacts::Sink for Flushed<'_> {
    fn restart(&mut self) -> io::Result<()> {
        (self.written, self.kicked) = (0, 0);
        crate::engine::artifacts::Sink::restart(self.file)
    }
}

/// Temp file beside the target (so the rename stays in one filesystem), fsync, mode, rename,
/// fsync of the directory so the rename itself survives a crash.
pub(super) fn write_atomic(
    path: &Path,
    content: &[u8],
    mode: Option<u32>,
    owner: (Option<u32>, Option<u32>),
) -> io::Result<()> {
    write_atomic_with(path, mode, owner, |f| f.write_all(content))
}

/// Writes `path` as [`write_atomic`] does, its content from `fill` (which may fail: the
/// temp file is then removed and `path` left as it was).
pub(super) fn write_atomic_with(
    path: &Path,
    mode: Option<u32>,
    (uid, gid): (Option<u32>, Option<u32>),
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) => (d, n),
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")),
    };
    // Keep an existing file's mode when none is asked for, as an editor would.
    let mode = match mode {
        Some(m) => m,
        None => fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(DEFAULT_MODE),
    };
    let tmp = dir.join(format!(
        ".{}.arbor-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        fill(&mut f)?;
        // The umask applied at open; the spec's mode is what was asked for.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&f, uid, gid)?;
            // chown clears setuid/setgid bits: set the mode again.
            f.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The uid and gid a file's `owner` and `group` name (names or numbers), each if given.
pub fn owner_ids(spec: &FileSpec) -> anyhow::Result<(Option<u32>, Option<u32>)> {
    let uid = spec
        .owner
        .as_deref()
        .map(super::exec::lookup_uid)
        .transpose()?;
    let gid = spec
        .group
        .as_deref()
        .map(super::exec::lookup_gid)
        .transpose()?;
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fs_events::FsEvents;
    use std::time::{Duration, SystemTime};

    fn spec(path: &Path, content: &str) -> FileSpec {
        FileSpec {
            name: "f".into(),
            path: path.to_path_buf(),
            content: Some(content.into()),
            state: FileState::Exists,
            mode: None,
            ..FileSpec::default()
        }
    }

    fn mtime(path: &Path) -> SystemTime {
        fs::metadata(path)
            .and_then(|m| m.modified())
            .expect("mtime")
    }

    #[test]
    fn a_source_file_gets_the_artifacts_bytes_only_when_they_are_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = dir.path().join("blob");
        fs::write(&blob, b"artifact bytes").expect("write");
        let artifact = ArtifactFile {
            path: blob.clone(),
            sha256: crate::engine::artifacts::sha256_hex(b"artifact bytes"),
            size: 14,
            arrival: None,
        };
        let path = dir.path().join("f");
        let s = FileSpec {
            name: "f".into(),
            path: path.clone(),
            source: Some("a.bin".into()),
            mode: Some(0o640),
            ..FileSpec::default()
        };
        let first = check_apply_with(&s, Some(&artifact), false).expect("create");
        assert!(matches!(first, Outcome::Changed(_)), "{first:?}");
        assert_eq!(fs::read(&path).expect("read"), b"artifact bytes");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert_eq!(
            check_apply_with(&s, Some(&artifact), false).expect("again"),
            Outcome::Unchanged
        );
        // A drifted file with a corrupt blob: an error, and the blob's bytes are not written.
        fs::write(&path, b"drifted").expect("write");
        fs::write(&blob, b"corrupt bytes!").expect("write");
        let err = check_apply_with(&s, Some(&artifact), false).expect_err("corrupt");
        assert!(format!("{err:#}").contains("corrupt"), "{err:#}");
        assert_eq!(fs::read(&path).expect("read"), b"drifted");
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["blob", "f"], "a temp file was left behind");
        // No artifact for the source: an error asking for a restart.
        let err = check_apply_with(&s, None, false).expect_err("none");
        assert!(format!("{err:#}").contains("restart"), "{err:#}");
    }

    #[test]
    fn creates_the_file_with_content_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut s = spec(&path, "hello\n");
        s.mode = Some(0o600);
        let outcome = check_apply(&s, false).expect("apply");
        assert!(matches!(outcome, Outcome::Changed(_)));
        assert_eq!(fs::read_to_string(&path).expect("read"), "hello\n");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("readdir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }

    #[test]
    fn a_right_file_is_not_rewritten_and_keeps_its_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let s = spec(&path, "same\n");
        check_apply(&s, false).expect("first apply");
        let before = mtime(&path);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(check_apply(&s, false).expect("second"), Outcome::Unchanged);
        assert_eq!(mtime(&path), before);
    }

    #[test]
    fn wrong_content_is_replaced_by_a_new_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, "old").expect("seed");
        let old_ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).expect("stat"));
        check_apply(&spec(&path, "new"), false).expect("apply");
        assert_eq!(fs::read_to_string(&path).expect("read"), "new");
        let new_ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).expect("stat"));
        assert_ne!(
            old_ino, new_ino,
            "content was written in place, not renamed over"
        );
    }

    #[test]
    fn only_the_mode_is_fixed_when_only_the_mode_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, "x").expect("seed");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut s = spec(&path, "x");
        s.mode = Some(0o640);
        let outcome = check_apply(&s, false).expect("apply");
        assert!(matches!(outcome, Outcome::Changed(ref m) if m.contains("chmod")));
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn absent_removes_the_file_and_then_is_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        fs::write(&path, "x").expect("seed");
        let mut s = spec(&path, "");
        s.state = FileState::Absent;
        assert!(matches!(
            check_apply(&s, false).expect("apply"),
            Outcome::Changed(_)
        ));
        assert!(!path.exists());
        assert_eq!(check_apply(&s, false).expect("again"), Outcome::Unchanged);
    }

    #[test]
    fn noop_reports_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let outcome = check_apply(&spec(&path, "x"), true).expect("noop check");
        assert!(matches!(outcome, Outcome::WouldChange(_)));
        assert!(!path.exists());
        fs::write(&path, "x").expect("seed");
        let mut absent = spec(&path, "x");
        absent.state = FileState::Absent;
        assert!(matches!(
            check_apply(&absent, true).expect("noop"),
            Outcome::WouldChange(_)
        ));
        assert!(path.exists());
    }

    #[test]
    fn diff_shows_content_mode_and_removal_and_nothing_for_a_right_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let shown = path.display().to_string();
        fs::write(&path, "a\nb\n").expect("seed");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let mut s = spec(&path, "a\nc\n");
        s.mode = Some(0o640);
        let (outcome, diff) = check_apply_diff(&s, None, true, true).expect("noop diff");
        assert!(matches!(outcome, Outcome::WouldChange(_)), "{outcome:?}");
        assert_eq!(
            diff.expect("a diff"),
            [
                format!("{shown}: mode 0600 -> 0640"),
                format!("--- {shown}"),
                format!("+++ {shown}"),
                "@@ -1,2 +1,2 @@".into(),
                " a".into(),
                "-b".into(),
                "+c".into(),
            ]
        );
        assert_eq!(fs::read_to_string(&path).expect("read"), "a\nb\n");
        // Applied: the same diff, and then nothing to show.
        let (_, diff) = check_apply_diff(&s, None, false, true).expect("apply");
        assert_eq!(diff.map(|d| d.len()), Some(7));
        assert_eq!(
            check_apply_diff(&s, None, false, true).expect("again"),
            (Outcome::Unchanged, None)
        );
        // Only the mode: one line.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let (_, diff) = check_apply_diff(&s, None, false, true).expect("mode");
        assert_eq!(diff, Some(vec![format!("{shown}: mode 0644 -> 0640")]));
        s.state = FileState::Absent;
        let (_, diff) = check_apply_diff(&s, None, true, true).expect("absent");
        assert_eq!(
            diff,
            Some(vec![format!(
                "{shown}: removed (state: absent; it held 4 bytes)"
            )])
        );
    }

    #[test]
    fn a_missing_parent_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope/f");
        let err = check_apply(&spec(&path, "x"), false).expect_err("must fail");
        assert!(format!("{err:#}").contains("nope/f"), "{err:#}");
    }

    /// Drives watch + check_apply the way the scheduler does, and measures the repair.
    async fn repaired_within(path: &Path, damage: impl FnOnce(), want: &str) -> Duration {
        let fs_watch = FsEvents::new().expect("inotify");
        let res = std::sync::Arc::new(FileResource::new(spec(path, want), fs_watch));
        res.check_apply(ApplyContext::default())
            .await
            .expect("first apply");
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        // Let the watch register before damaging.
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        let start = std::time::Instant::now();
        damage();
        loop {
            tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("a poke within 2s");
            res.check_apply(ApplyContext::default())
                .await
                .expect("repair");
            if fs::read_to_string(path).ok().as_deref() == Some(want) {
                break;
            }
        }
        let took = start.elapsed();
        cancel.cancel();
        watcher.await.expect("join").expect("watch ended cleanly");
        took
    }

    async fn expect_poke(rx: &mut tokio::sync::mpsc::UnboundedReceiver<()>) {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a poke within 2s");
    }

    #[tokio::test]
    async fn a_directory_created_or_recreated_later_is_watched() {
        let root = tempfile::tempdir().expect("tempdir");
        let path = root.path().join("sub/deeper/f");
        let fs_watch = FsEvents::new().expect("inotify");
        let res = std::sync::Arc::new(FileResource::new(spec(&path, "x"), fs_watch));
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        tokio::time::sleep(Duration::from_millis(50)).await;
        fs::create_dir_all(root.path().join("sub/deeper")).expect("mkdir");
        expect_poke(&mut rx).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        fs::write(&path, "edit").expect("write");
        expect_poke(&mut rx).await;

        fs::remove_dir_all(root.path().join("sub")).expect("rm -r");
        expect_poke(&mut rx).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        fs::create_dir_all(root.path().join("sub/deeper")).expect("mkdir again");
        expect_poke(&mut rx).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        fs::write(&path, "edit again").expect("write");
        expect_poke(&mut rx).await;
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    /// The race the CI once lost: the watch finds no directory, and before it looks for the
    /// missing ancestor another resource has made the whole chain. Many tries, directories
    /// made by a thread while watches start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_made_while_the_watch_starts_is_no_error() {
        let root = tempfile::tempdir().expect("tempdir");
        let fs_watch = FsEvents::new().expect("inotify");
        for i in 0..400 {
            let dir = root.path().join(format!("{i}/a/b"));
            let path = dir.join("f");
            let maker = std::thread::spawn(move || fs::create_dir_all(dir).expect("mkdir"));
            let cancel = CancellationToken::new();
            let watched = {
                let (fs_watch, cancel) = (fs_watch.clone(), cancel.clone());
                tokio::spawn(async move { watch_path(&fs_watch, &path, &cancel, || {}).await })
            };
            maker.join().expect("maker");
            tokio::time::sleep(Duration::from_millis(1)).await;
            cancel.cancel();
            watched.await.expect("join").expect("a watch, not an error");
        }
    }

    #[tokio::test]
    async fn an_edited_file_is_restored_within_100ms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let p = path.clone();
        let took = repaired_within(
            &path,
            move || fs::write(&p, "vandal").expect("edit"),
            "ok\n",
        )
        .await;
        assert!(took < Duration::from_millis(100), "took {took:?}");
    }

    #[tokio::test]
    async fn a_deleted_file_is_restored_within_100ms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let p = path.clone();
        let took = repaired_within(&path, move || fs::remove_file(&p).expect("rm"), "ok\n").await;
        assert!(took < Duration::from_millis(100), "took {took:?}");
    }

    #[test]
    fn owner_and_group_are_applied_and_then_left_alone() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: changing owners needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("owned");
        let mut s = spec(&path, "x\n");
        s.owner = Some("65534".into());
        s.group = Some("65534".into());
        s.mode = Some(0o4750);
        let (_, diff) = check_apply_diff(&s, None, true, true).expect("noop diff");
        assert_eq!(
            diff.as_ref().and_then(|d| d.first()),
            Some(&format!(
                "{}: new file, mode 4750, owner 65534, group 65534",
                path.display()
            ))
        );
        let first = check_apply(&s, false).expect("create");
        assert!(matches!(first, Outcome::Changed(_)), "{first:?}");
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(meta.permissions().mode() & 0o7777, 0o4750);
        assert_eq!(check_apply(&s, false).expect("again"), Outcome::Unchanged);
        // Drifted: repaired without rewriting the content.
        std::os::unix::fs::chown(&path, Some(0), Some(0)).expect("chown");
        let (_, diff) = check_apply_diff(&s, None, true, true).expect("noop diff");
        let shown = path.display();
        assert_eq!(
            diff,
            Some(vec![
                format!("{shown}: owner 0 -> 65534"),
                format!("{shown}: group 0 -> 65534"),
                // The chown cleared setuid.
                format!("{shown}: mode 0750 -> 4750"),
            ])
        );
        let noop = check_apply(&s, true).expect("noop");
        assert!(
            matches!(noop, Outcome::WouldChange(ref m) if m.contains("chown")),
            "{noop:?}"
        );
        let fixed = check_apply(&s, false).expect("fix");
        assert!(
            matches!(fixed, Outcome::Changed(ref m) if m.contains("chown")),
            "{fixed:?}"
        );
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!(meta.uid(), 65534);
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o4750,
            "the chown kept setuid"
        );
        assert_eq!(check_apply(&s, false).expect("again"), Outcome::Unchanged);
        s.owner = Some("no-such-user-arbor".into());
        let err = check_apply(&s, false).expect_err("unknown user");
        assert!(format!("{err:#}").contains("no user"), "{err:#}");
    }
}
