//! Artifacts on this host: the content of `file` resources that say `source:` instead of
//! `content:`. The initiator hashes each source file once (sha256); every node keeps the blob
//! in its cache as `~/.cache/arbor/artifacts/<sha256>` (or in its working dir with
//! --no-caching), put there by its parent before the node starts. The graph text stays what
//! the operator wrote; the host finds a source's blob through the map its `Start` carries
//! (source as written → sha256 and size), turned here into an [`ArtifactIndex`].
//!
//! Nothing is used unchecked: a blob is read whole and its size and sha256 compared with what
//! the initiator computed before a byte of it is written anywhere.
//!
//! A node starts before its parent has copied its artifacts (`Start::arriving`): a blob that
//! is not here yet carries an [`Arrival`], and reading it waits for the copy, following it as
//! it arrives (crate::node::arriving), until the bytes are whole and right or the parent says
//! the copy failed.

use sha2::Digest;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One artifact as this host holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactFile {
    /// The blob on this host: a cache entry, or at the initiator the source file itself.
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// The parent still copies it here (`None`: it was here before the node started).
    pub arrival: Option<Arrival>,
}

/// The parent's word on a blob it copies here while this node runs (`Down::Arrived`): not
/// yet, done, or failed and why. Shared by every reader of the blob.
#[derive(Clone, Default)]
pub struct Arrival(Arc<(Mutex<Word>, Condvar)>);

/// The parent's word: none yet, or the copy's result.
type Word = Option<Result<(), String>>;

impl Arrival {
    /// The copy is done (or failed): readers stop waiting. The first word stands.
    pub fn done(&self, result: Result<(), String>) {
        let (state, cond) = &*self.0;
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        if state.is_none() {
            *state = Some(result);
            cond.notify_all();
        }
    }

    fn state(&self) -> Word {
        self.0.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits up to `timeout` for the word.
    fn wait(&self, timeout: Duration) {
        let (state, cond) = &*self.0;
        let state = state.lock().unwrap_or_else(|e| e.into_inner());
        if state.is_none() {
            let _ = cond.wait_timeout(state, timeout);
        }
    }
}

impl std::fmt::Debug for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arrival({:?})", self.state())
    }
}

impl PartialEq for Arrival {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Arrival {}

/// How often a reader waiting for an arriving blob looks for its copy.
const ARRIVAL_POLL: Duration = Duration::from_millis(20);

/// The artifacts of one host's graph, by the source as written (after `{{hostname}}`).
pub type ArtifactIndex = Arc<BTreeMap<String, ArtifactFile>>;

impl ArtifactFile {
    /// Whether `bytes` are this artifact.
    pub fn is(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.size && sha256_hex(bytes) == self.sha256
    }

    /// The blob's bytes, only if they are the artifact (size and sha256); a corrupt or
    /// missing blob is an error naming its path and sha256, and is never used. A blob still
    /// arriving is waited for (read as it arrives) until it is right, or the parent says its
    /// copy failed.
    pub fn read_verified(&self) -> anyhow::Result<Vec<u8>> {
        let mut bytes = Vec::with_capacity(usize::try_from(self.size).unwrap_or(0));
        self.write_verified(&mut bytes)?;
        Ok(bytes)
    }

    /// Writes the blob's bytes to `out` as it reads them (an arriving blob as it arrives);
    /// `Ok` only once all of them were written and they are the artifact. On an error `out`
    /// holds something else: the caller throws it away.
    pub fn write_verified(&self, out: &mut dyn Sink) -> anyhow::Result<()> {
        let Some(arrival) = &self.arrival else {
            let unread = |e: std::io::Error| {
                anyhow::anyhow!(
                    "artifact {} ({}): {e}",
                    short(&self.sha256),
                    self.path.display()
                )
            };
            let mut file = std::fs::File::open(&self.path).map_err(unread)?;
            let (size, sha256) = copy_hashed(&mut file, out).map_err(unread)?;
            if (size, sha256.as_str()) != (self.size, self.sha256.as_str()) {
                anyhow::bail!(
                    "artifact {} at {} is corrupt (size {size}, sha256 {sha256}; want size \
                     {}); not used",
                    self.sha256,
                    self.path.display(),
                    self.size
                );
            }
            return Ok(());
        };
        // What was last found at the path, not right: read again only once it changed.
        let mut seen: Option<(u64, std::time::SystemTime, u64)> = None;
        let right = |from: &mut dyn Read, out: &mut dyn Sink| {
            copy_hashed(from, out).is_ok_and(|(size, sha)| size == self.size && sha == self.sha256)
        };
        loop {
            match arrival.state() {
                Some(Ok(())) => {
                    let whole = ArtifactFile {
                        arrival: None,
                        ..self.clone()
                    };
                    return whole.write_verified(out);
                }
                Some(Err(e)) => anyhow::bail!("artifact {} did not arrive: {e}", self.sha256),
                None => {}
            }
            // Here whole already (kept in the cache, or put into place before the word).
            if let Ok(meta) = std::fs::metadata(&self.path) {
                use std::os::unix::fs::MetadataExt;
                let now = (
                    meta.len(),
                    meta.modified().unwrap_or(std::time::UNIX_EPOCH),
                    meta.ino(),
                );
                if seen != Some(now) {
                    seen = Some(now);
                    if let Ok(mut file) = std::fs::File::open(&self.path)
                        && right(&mut file, out)
                    {
                        return Ok(());
                    }
                }
            }
            // Being written: read as it arrives. A copy whose writer gave up, or that is not
            // the artifact, is not used; the parent's word (or its next copy) follows.
            if let Some(file) = crate::node::arriving::open_growing(&self.path) {
                let mut tail = crate::node::arriving::Tail::new(file, self.size, true);
                if right(&mut tail, out) {
                    return Ok(());
                }
            }
            arrival.wait(ARRIVAL_POLL);
        }
    }
}

/// Where [`ArtifactFile::write_verified`] writes: it starts over from empty on each try.
pub trait Sink: std::io::Write {
    fn restart(&mut self) -> std::io::Result<()>;
}

impl Sink for Vec<u8> {
    fn restart(&mut self) -> std::io::Result<()> {
        self.clear();
        Ok(())
    }
}

impl Sink for std::io::Sink {
    fn restart(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink for std::fs::File {
    fn restart(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        self.set_len(0)?;
        self.seek(std::io::SeekFrom::Start(0)).map(|_| ())
    }
}

/// Copies `from` into `out` (emptied first), hashing it: its size and sha256.
fn copy_hashed(from: &mut dyn Read, out: &mut dyn Sink) -> std::io::Result<(u64, String)> {
    out.restart()?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok((size, data_encoding::HEXLOWER.encode(&hasher.finalize())))
}

/// What a file resource must hold: any content, given text, or an artifact.
pub enum Desired<'a> {
    Anything,
    Text(&'a str),
    Artifact(&'a ArtifactFile),
}

impl<'a> Desired<'a> {
    /// From a spec's `content` and `source` (the graph allows at most one) and the artifact
    /// found for the source on this host.
    pub fn of(
        content: Option<&'a str>,
        source: Option<&str>,
        artifact: Option<&'a ArtifactFile>,
    ) -> anyhow::Result<Desired<'a>> {
        Ok(match (content, source, artifact) {
            (_, Some(_), Some(a)) => Desired::Artifact(a),
            (_, Some(source), None) => anyhow::bail!(
                "source `{source}`: this host was given no artifact for it (sources are \
                 copied when the run starts: a source added by a live edit needs a restart)"
            ),
            (Some(text), None, _) => Desired::Text(text),
            (None, None, _) => Desired::Anything,
        })
    }

    /// Whether a file holding `have` is right.
    pub fn is_met_by(&self, have: &[u8]) -> bool {
        match self {
            Desired::Anything => true,
            Desired::Text(text) => have == text.as_bytes(),
            Desired::Artifact(a) => a.is(have),
        }
    }

    /// The bytes to write (an artifact's only once verified).
    pub fn bytes(&self) -> anyhow::Result<Cow<'a, [u8]>> {
        Ok(match self {
            Desired::Anything => Cow::Borrowed(&[]),
            Desired::Text(text) => Cow::Borrowed(text.as_bytes()),
            Desired::Artifact(a) => Cow::Owned(a.read_verified()?),
        })
    }
}

/// One entry of a source directory's manifest: what the initiator found under it, carried
/// with the host's artifacts (`ChildSpec::trees`). Parents come before their children.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TreeEntry {
    /// Relative to the tree's root, `/`-separated, without a trailing `/`.
    pub path: String,
    /// Permission bits, as in the source.
    pub mode: u32,
    /// The file's content as an artifact; `None`: a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<crate::wire::ArtifactRef>,
}

/// A source directory's manifest, parents first.
pub type Manifest = Vec<TreeEntry>;

/// One entry of a tree as this host holds it: its file's blob found (`None`: a directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeItem {
    pub path: String,
    pub mode: u32,
    pub file: Option<ArtifactFile>,
}

/// The source directories of one host's graph, by the source as written.
pub type TreeIndex = Arc<BTreeMap<String, Vec<TreeItem>>>;

/// A tree's items with each file's blob in `blob(sha256)`.
pub fn tree_items(manifest: &Manifest, blob: impl Fn(&str) -> Option<PathBuf>) -> Vec<TreeItem> {
    manifest
        .iter()
        .map(|e| TreeItem {
            path: e.path.clone(),
            mode: e.mode,
            file: e.file.as_ref().and_then(|a| {
                Some(ArtifactFile {
                    path: blob(&a.sha256)?,
                    sha256: a.sha256.clone(),
                    size: a.size,
                    arrival: None,
                })
            }),
        })
        .collect()
}

/// Why a source tree cannot be copied: its first entry that is neither a regular file nor a
/// directory (symlinks included: they are not followed, nor copied).
#[derive(Debug)]
pub enum TreeError {
    Io(PathBuf, std::io::Error),
    Unsupported(PathBuf, &'static str),
}

impl std::fmt::Display for TreeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            TreeError::Unsupported(p, what) => write!(
                f,
                "{} is {what}: not supported in a source directory (regular files and \
                 directories only)",
                p.display()
            ),
        }
    }
}

/// Walks the directory `root` (never following a symlink) into its manifest, hashing each
/// file with `hash` (which may reuse an earlier hash of the same file): entries sorted by
/// path, parents first. With each entry, the file it was read from.
pub fn build_manifest(
    root: &Path,
    hash: &mut dyn FnMut(&Path) -> std::io::Result<crate::wire::ArtifactRef>,
) -> Result<Vec<(TreeEntry, PathBuf)>, TreeError> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| TreeError::Io(dir.clone(), e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| TreeError::Io(dir.clone(), e))?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let path = dir.join(&name);
            let Some(name) = name.to_str() else {
                return Err(TreeError::Unsupported(path, "a name that is not UTF-8"));
            };
            let rel = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            let meta =
                std::fs::symlink_metadata(&path).map_err(|e| TreeError::Io(path.clone(), e))?;
            let mode = meta.permissions().mode() & 0o7777;
            let ft = meta.file_type();
            if ft.is_symlink() {
                return Err(TreeError::Unsupported(path, "a symlink"));
            } else if ft.is_dir() {
                out.push((
                    TreeEntry {
                        path: rel.clone(),
                        mode,
                        file: None,
                    },
                    path.clone(),
                ));
                subdirs.push((path, rel));
            } else if ft.is_file() {
                let a = hash(&path).map_err(|e| TreeError::Io(path.clone(), e))?;
                out.push((
                    TreeEntry {
                        path: rel,
                        mode,
                        file: Some(a),
                    },
                    path,
                ));
            } else {
                return Err(TreeError::Unsupported(
                    path,
                    "not a regular file or directory",
                ));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    // Sorted by path components, so a directory comes before what it holds.
    out.sort_by(|a, b| a.0.path.split('/').cmp(b.0.path.split('/')));
    Ok(out)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(bytes))
}

/// The sha256 and size of a file, read in pieces (sources may be large).
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let (size, sha256) = copy_hashed(&mut file, &mut std::io::sink())?;
    Ok((sha256, size))
}

/// The first 12 hex digits of a sha256, for messages.
pub fn short(sha256: &str) -> &str {
    &sha256[..sha256.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_blob_is_never_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        std::fs::write(&path, b"the right bytes").expect("write");
        let (sha256, size) = sha256_file(&path).expect("hash");
        assert_eq!(sha256, sha256_hex(b"the right bytes"));
        let a = ArtifactFile {
            path: path.clone(),
            sha256,
            size,
            arrival: None,
        };
        assert_eq!(a.read_verified().expect("intact"), b"the right bytes");
        // Same size, other bytes: only the sha256 tells.
        std::fs::write(&path, b"the wrong bytes").expect("write");
        let err = a.read_verified().expect_err("corrupt").to_string();
        assert!(err.contains("corrupt") && err.contains(&a.sha256), "{err}");
        std::fs::remove_file(&path).expect("rm");
        assert!(a.read_verified().is_err());
    }

    #[test]
    fn an_arriving_artifact_is_read_as_it_arrives_and_the_parents_word_ends_a_wait() {
        use crate::node::arriving::Incoming;
        use std::io::Write;
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("blob");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let a = ArtifactFile {
            path: dest.clone(),
            sha256: sha256_hex(&data),
            size: data.len() as u64,
            arrival: Some(Arrival::default()),
        };
        let settle = || std::thread::sleep(Duration::from_millis(100));
        let reader = {
            let a = a.clone();
            std::thread::spawn(move || a.read_verified())
        };
        // Nothing there yet: it waits.
        settle();
        assert!(!reader.is_finished(), "read an artifact that is not there");
        // A copy whose writer gives up halfway is not used.
        let mut first = Incoming::create(&dest, &dir.path().join(".t1")).expect("create");
        first.file.write_all(&data[..1000]).expect("write");
        settle();
        drop(first);
        settle();
        assert!(!reader.is_finished(), "used a copy its writer gave up");
        // The next copy is read as it arrives: the reader has it once the last byte is
        // written, before the rename and before the parent's word.
        let mut second = Incoming::create(&dest, &dir.path().join(".t2")).expect("create");
        second.file.write_all(&data[..150_000]).expect("write");
        settle();
        assert!(!reader.is_finished(), "done with half the bytes");
        second.file.write_all(&data[150_000..]).expect("write");
        let got = reader.join().expect("join").expect("read");
        assert!(got == data, "not the artifact's bytes");
        second.finish(0o600, &dest).expect("finish");

        // Wrong bytes under the artifact's name are waited past, never used; the parent's
        // word that its copy failed ends the wait with its cause.
        let b = ArtifactFile {
            path: dir.path().join("other"),
            arrival: Some(Arrival::default()),
            ..a.clone()
        };
        std::fs::write(&b.path, vec![0u8; data.len()]).expect("write");
        let reader = {
            let b = b.clone();
            std::thread::spawn(move || b.read_verified())
        };
        settle();
        assert!(!reader.is_finished(), "used wrong bytes");
        if let Some(arrival) = &b.arrival {
            arrival.done(Err("No space left on device".into()));
        }
        let err = reader
            .join()
            .expect("join")
            .expect_err("failed copy")
            .to_string();
        assert!(
            err.contains("did not arrive") && err.contains("No space left"),
            "{err}"
        );
    }

    #[test]
    fn a_source_without_an_artifact_asks_for_a_restart() {
        let err = Desired::of(None, Some("big.bin"), None)
            .err()
            .expect("no artifact")
            .to_string();
        assert!(err.contains("big.bin") && err.contains("restart"), "{err}");
    }
}
