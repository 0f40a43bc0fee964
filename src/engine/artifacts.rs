//! Artifacts on this host: the content of `file` resources that say `source:` instead of
//! `content:`. The initiator hashes each source file once (sha256); every node keeps the blob
//! in its cache as `~/.cache/arbor/artifacts/<sha256>` (or in its working dir with
//! --no-caching), put there by its parent before the node starts. The graph text stays what
//! the operator wrote; the host finds a source's blob through the map its `Start` carries
//! (source as written → sha256 and size), turned here into an [`ArtifactIndex`].
//!
//! Nothing is used unchecked: a blob is read whole and its size and sha256 compared with what
//! the initiator computed before a byte of it is written anywhere.

use sha2::Digest;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One artifact as this host holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactFile {
    /// The blob on this host: a cache entry, or at the initiator the source file itself.
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// The artifacts of one host's graph, by the source as written (after `{{hostname}}`).
pub type ArtifactIndex = Arc<BTreeMap<String, ArtifactFile>>;

impl ArtifactFile {
    /// Whether `bytes` are this artifact.
    pub fn is(&self, bytes: &[u8]) -> bool {
        bytes.len() as u64 == self.size && sha256_hex(bytes) == self.sha256
    }

    /// The blob's bytes, only if they are the artifact (size and sha256); a corrupt or
    /// missing blob is an error naming its path and sha256, and is never used.
    pub fn read_verified(&self) -> anyhow::Result<Vec<u8>> {
        let bytes = std::fs::read(&self.path).map_err(|e| {
            anyhow::anyhow!(
                "artifact {} ({}): {e}",
                short(&self.sha256),
                self.path.display()
            )
        })?;
        if !self.is(&bytes) {
            anyhow::bail!(
                "artifact {} at {} is corrupt (size {}, sha256 {}; want size {}); not used",
                self.sha256,
                self.path.display(),
                bytes.len(),
                sha256_hex(&bytes),
                self.size
            );
        }
        Ok(bytes)
    }
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
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((data_encoding::HEXLOWER.encode(&hasher.finalize()), size))
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
    fn a_source_without_an_artifact_asks_for_a_restart() {
        let err = Desired::of(None, Some("big.bin"), None)
            .err()
            .expect("no artifact")
            .to_string();
        assert!(err.contains("big.bin") && err.contains("restart"), "{err}");
    }
}
