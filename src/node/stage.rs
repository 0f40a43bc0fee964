//! Staging a child: the one code path every node, at every depth, uses to put arbor on a host.
//!
//! 1. One probe (a single exec, so a single round trip): the host's OS and architecture
//!    (`uname -sm`), a private working dir (mktemp: mode 0700, unpredictable name), and whether
//!    the content-addressed cache `~/.cache/arbor/bin/<sha256>/arbor` (XDG_CACHE_HOME
//!    respected) holds an intact copy (size and sha256) of the build for that platform. A host
//!    whose platform has no build is refused before anything is copied, its working dir removed.
//! 2. Copy the binary into the cache unless it is there; with --no-caching, into the working
//!    dir instead. Uploads are atomic (temp name, rename), so an interrupted copy never leaves a
//!    bad cache entry; the size is checked after the copy, and the sha256 by every later probe.
//!    With --compress (and gzip on the host), the copy is `arbor.gz`, unpacked there by gzip,
//!    whose CRC and a size check guard the result; a host that will stage children of its own
//!    keeps `arbor.gz` beside the binary, so it passes the compressed copy on without
//!    recompressing. A host without gzip gets the plain binary.
//! 3. Copy the graph into the working dir, and close the sftp session: wait until the server
//!    has closed its channel, so the exec that follows cannot be lost (see `ssh::sftp`).
//!
//! Tunnel and exec come after, in `child.rs`.

use crate::ssh::{CommandLine, Session, SshError, shell_quote};
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A build of arbor that can be copied to hosts of one OS and architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// `uname -sm` of the hosts it runs on, e.g. "Linux x86_64".
    pub platform: String,
    /// The build gzipped, made the first time a copy needs it (--compress).
    pub gz: Option<Arc<GzCell>>,
}

/// A gzip stream of a build, held in memory (about 43% of the binary).
#[derive(Clone, PartialEq, Eq)]
pub struct Gzipped(pub Arc<Vec<u8>>);

impl std::fmt::Debug for Gzipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gzipped({} bytes)", self.0.len())
    }
}

/// Where a build's gzip stream comes from, and the stream once made. Made lazily: a run whose
/// hosts all have the binary cached never compresses, and the first copy's compression
/// overlaps the other hosts' connects.
#[derive(Debug)]
pub struct GzCell {
    source: PathBuf,
    reuse_kept: bool,
    made: tokio::sync::OnceCell<Result<Gzipped, String>>,
}

impl PartialEq for GzCell {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.reuse_kept == other.reuse_kept
    }
}

impl Eq for GzCell {}

impl GzCell {
    /// The gzip stream; the first caller makes it (on a blocking thread), the rest wait.
    pub async fn get(&self) -> Result<Gzipped, String> {
        self.made
            .get_or_init(|| async {
                let (source, reuse_kept) = (self.source.clone(), self.reuse_kept);
                tokio::task::spawn_blocking(move || gzip_file(&source, reuse_kept))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|made| made)
            })
            .await
            .clone()
    }
}

/// A node staged with --compress reuses the `arbor.gz` its parent left beside its binary
/// (`reuse_kept`) if it unpacks to exactly that binary (a few tens of milliseconds, so a
/// damaged copy is never passed on); otherwise the binary is compressed here (gzip level 6:
/// 6.6 MB to 2.85 MB in about 0.4 s).
fn gzip_file(path: &Path, reuse_kept: bool) -> Result<Gzipped, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if reuse_kept && let Ok(kept) = std::fs::read(path.with_file_name(KEPT_GZ)) {
        let mut unpacked = Vec::with_capacity(raw.len());
        let intact =
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&kept[..]), &mut unpacked)
                .is_ok()
                && unpacked == raw;
        if intact {
            return Ok(Gzipped(Arc::new(kept)));
        }
        tracing::warn!(
            "{}: does not unpack to this binary; compressing afresh",
            path.with_file_name(KEPT_GZ).display()
        );
    }
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 2),
        flate2::Compression::new(6),
    );
    encoder
        .write_all(&raw)
        .and_then(|()| encoder.finish())
        .map(|bytes| Gzipped(Arc::new(bytes)))
        .map_err(|e| format!("compressing {}: {e}", path.display()))
}

/// What a host that stages children keeps beside its binary: the compressed copy it received.
const KEPT_GZ: &str = "arbor.gz";

impl Build {
    /// Hashes the file at `path`, a build for `platform`.
    pub fn from_file(path: &Path, platform: &str) -> std::io::Result<Build> {
        let bytes = std::fs::read(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Build {
            path: path.to_path_buf(),
            sha256: data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(&bytes)),
            size: bytes.len() as u64,
            platform: platform.to_string(),
            gz: None,
        })
    }

    /// Copies of this build go gzipped (--compress); see [`GzCell`].
    pub fn with_gzip(mut self, reuse_kept: bool) -> Build {
        self.gz = Some(Arc::new(GzCell {
            source: self.path.clone(),
            reuse_kept,
            made: tokio::sync::OnceCell::new(),
        }));
        self
    }

    /// The running executable: what a node copies to its children by default.
    pub fn current() -> std::io::Result<Build> {
        Build::from_file(&std::env::current_exe()?, &local_platform())
    }
}

/// `uname -sm` of this machine, as arbor was built for it.
pub fn local_platform() -> String {
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "freebsd" => "FreeBSD",
        other => other,
    };
    format!("{os} {}", std::env::consts::ARCH)
}

/// The builds a node can copy, by platform.
#[derive(Debug, Clone, Default)]
pub struct Builds {
    by_platform: BTreeMap<String, Arc<Build>>,
}

impl Builds {
    pub fn new(builds: impl IntoIterator<Item = Build>) -> Self {
        Builds {
            by_platform: builds
                .into_iter()
                .map(|b| (normalize_platform(&b.platform), Arc::new(b)))
                .collect(),
        }
    }

    pub fn for_platform(&self, platform: &str) -> Option<Arc<Build>> {
        self.by_platform.get(&normalize_platform(platform)).cloned()
    }

    /// Any build, for when none matches this machine's own platform.
    pub fn first(&self) -> Option<Arc<Build>> {
        self.by_platform.values().next().cloned()
    }

    pub fn platforms(&self) -> Vec<String> {
        self.by_platform.keys().cloned().collect()
    }
}

/// "Linux x86_64", "linux-x86_64", "x86_64" (Linux implied) all name one platform.
pub fn normalize_platform(text: &str) -> String {
    let parts: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '-' || c == '/')
        .filter(|s| !s.is_empty())
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let (os, arch) = match parts.as_slice() {
        [arch] => ("linux".to_string(), arch.clone()),
        [os, arch, ..] => (os.clone(), arch.clone()),
        [] => (String::new(), String::new()),
    };
    let arch = match arch.as_str() {
        "amd64" => "x86_64".to_string(),
        "arm64" => "aarch64".to_string(),
        _ => arch,
    };
    format!("{os} {arch}")
}

/// How to stage.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// Parent of the working dir on the host (--remote-tmp).
    pub remote_tmp: String,
    /// Copy the binary into the working dir, and remove it at the end (--no-caching).
    pub no_caching: bool,
    /// Copy the binary gzipped to hosts that have gzip (--compress).
    pub compress: bool,
}

impl Default for StageOptions {
    fn default() -> Self {
        StageOptions {
            remote_tmp: "/tmp".into(),
            no_caching: false,
            compress: false,
        }
    }
}

/// A staged host: where things are, and what it cost.
#[derive(Debug, Clone)]
pub struct Staged {
    pub workdir: String,
    pub binary: String,
    pub graph: Option<String>,
    pub platform: String,
    /// The binary was already in the host's cache.
    pub cached: bool,
    /// Bytes of files copied (binary and graph).
    pub bytes_copied: u64,
}

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(
        "{host}: stage: host runs {platform}, and no build for it was given \
         (this arbor is for {available}); pass --binary ARCH=PATH"
    )]
    Platform {
        host: String,
        platform: String,
        available: String,
    },
    #[error("{host}: stage: {what}")]
    Other { host: String, what: String },
}

/// Progress of one transfer: what, bytes sent, total.
pub type Progress<'a> = &'a mut (dyn FnMut(&str, u64, u64) + Send);

/// Stages `session`'s host: see the module docs. `relay`: the host will stage children of
/// its own (it keeps a compressed copy to pass on).
pub async fn stage(
    session: &Session,
    builds: &Builds,
    options: &StageOptions,
    graph: Option<(&str, &[u8])>,
    relay: bool,
    progress: Progress<'_>,
) -> Result<Staged, StageError> {
    let host = session.label().to_string();
    let other = |what: String| StageError::Other {
        host: host.clone(),
        what,
    };

    // One round trip for the common case: the platform, a private working dir, and whether
    // the cache holds the build we expect to copy (this node's own). A host of another
    // platform costs a second probe, or is refused with its working dir removed.
    let expected = builds
        .for_platform(&local_platform())
        .or_else(|| builds.first())
        .ok_or_else(|| other("no build of arbor to copy".into()))?;
    let probe = |build: &Build, make_dir: bool| {
        format!(
            "set -e; umask 077; uname -sm; \
             w=$(mktemp -d {tmp}/arbor.XXXXXXXXXX); echo \"$w\"; \
             c=\"${{XDG_CACHE_HOME:-$HOME/.cache}}/arbor/bin\"; echo \"$c\"; \
             f=\"$c\"/{sha}/arbor; \
             if [ -f \"$f\" ] && [ \"$(wc -c < \"$f\")\" -eq {size} ] && \
                sha256sum \"$f\" | grep -q '^{sha} '; then echo cached; \
             else {mkdir} echo missing; fi; \
             if command -v gzip >/dev/null 2>&1; then echo gzip; else echo no-gzip; fi",
            tmp = shell_quote(options.remote_tmp.trim_end_matches('/')),
            sha = build.sha256,
            size = build.size,
            mkdir = if make_dir {
                format!("mkdir -p -m 700 \"$c\"/{};", build.sha256)
            } else {
                String::new()
            },
        )
    };
    type Probed = (String, String, String, bool, bool);
    let parse = |out: &[u8]| -> Result<Probed, StageError> {
        let out = String::from_utf8_lossy(out);
        let mut lines = out.lines();
        match (
            lines.next(),
            lines.next(),
            lines.next(),
            lines.next(),
            lines.next(),
        ) {
            (Some(p), Some(w), Some(c), Some(state), Some(gzip)) => Ok((
                p.trim().to_string(),
                w.to_string(),
                c.to_string(),
                state == "cached",
                gzip == "gzip",
            )),
            _ => Err(other(format!("unexpected probe output: {out:?}"))),
        }
    };
    let make_dir = !options.no_caching;
    let (platform, mut workdir, mut cache, mut in_cache, mut has_gzip) =
        parse(&session.run_checked(&probe(&expected, make_dir)).await?)?;
    let build = match builds.for_platform(&platform) {
        Some(b) if b.sha256 == expected.sha256 => b,
        other_build => {
            let _ = remove_workdir(session, &workdir).await;
            let Some(b) = other_build else {
                return Err(StageError::Platform {
                    host: host.clone(),
                    platform,
                    available: builds.platforms().join(", "),
                });
            };
            (_, workdir, cache, in_cache, has_gzip) =
                parse(&session.run_checked(&probe(&b, make_dir)).await?)?;
            b
        }
    };
    let cached = in_cache && !options.no_caching;

    let sftp = session.sftp().await?;
    let mut bytes_copied = 0;
    // Named `arbor` inside a directory named by its hash, so `ps` and `pgrep arbor` show it.
    let binary = if options.no_caching {
        format!("{workdir}/arbor")
    } else {
        format!("{cache}/{}/arbor", build.sha256)
    };
    let gz = match (&build.gz, options.compress && has_gzip && !cached) {
        (Some(cell), true) => Some(cell.get().await.map_err(&other)?),
        _ => None,
    };
    if cached {
        progress("arbor", build.size, build.size);
    } else if let Some(gz) = &gz {
        bytes_copied += copy_gzipped(session, &sftp, &build, gz, &binary, relay, progress).await?;
    } else {
        let mut file = tokio::fs::File::open(&build.path)
            .await
            .map_err(|e| other(format!("opening {}: {e}", build.path.display())))?;
        let uploaded = sftp
            .upload(&mut file, build.size, &binary, 0o755, &mut |sent, total| {
                progress("arbor", sent, total)
            })
            .await?;
        bytes_copied += uploaded.bytes;
        // The bytes crossed an authenticated channel and were renamed into place only when
        // complete; the size is checked here, and the sha256 by every later probe before the
        // entry is trusted again.
        match sftp.stat(&binary).await? {
            Some((size, _)) if size == build.size => {}
            found => {
                let _ = sftp.remove(&binary).await;
                return Err(other(format!(
                    "copy of arbor to {binary} has the wrong size ({found:?}, want {}); removed it",
                    build.size
                )));
            }
        }
    }

    let graph = match graph {
        Some((name, text)) => {
            let path = format!("{workdir}/{name}");
            let uploaded = sftp
                .upload(
                    &mut &text[..],
                    text.len() as u64,
                    &path,
                    0o600,
                    &mut |_, _| {},
                )
                .await?;
            bytes_copied += uploaded.bytes;
            Some(path)
        }
        None => None,
    };
    // Nothing may start on this connection until the server has closed the sftp channel:
    // dropbear before 2024.86 drops a command started meanwhile (see ssh::sftp). On the error
    // paths above nothing else runs here.
    if let Err(e) = sftp.close().await {
        tracing::warn!("{e}");
    }
    Ok(Staged {
        workdir,
        binary,
        graph,
        platform,
        cached,
        bytes_copied,
    })
}

/// Copies `arbor.gz` beside `binary` and unpacks it there with the host's gzip: gzip checks
/// its CRC, the shell checks the size, and the result is renamed into place only when both
/// pass. A relay keeps `arbor.gz` to pass on; other hosts remove it. Returns bytes copied.
async fn copy_gzipped(
    session: &Session,
    sftp: &crate::ssh::Sftp,
    build: &Build,
    gz: &Gzipped,
    binary: &str,
    relay: bool,
    progress: Progress<'_>,
) -> Result<u64, StageError> {
    let dir = binary.rsplit_once('/').map_or(".", |(dir, _)| dir);
    let packed = format!("{dir}/{KEPT_GZ}");
    let uploaded = sftp
        .upload(
            &mut &gz.0[..],
            gz.0.len() as u64,
            &packed,
            0o600,
            &mut |sent, total| progress("arbor.gz", sent, total),
        )
        .await?;
    let unpack = format!(
        "cd {dir} && t=.arbor.unpack.$$ && \
         if gzip -dc {KEPT_GZ} > \"$t\" && [ \"$(wc -c < \"$t\")\" -eq {size} ] && \
            chmod 755 \"$t\" && mv -f \"$t\" arbor; then {keep} \
         else rm -f \"$t\" {KEPT_GZ}; echo 'gzip -d failed or gave the wrong size' >&2; exit 1; fi",
        dir = shell_quote(dir),
        size = build.size,
        keep = if relay {
            ":;".to_string()
        } else {
            format!("rm -f {KEPT_GZ};")
        },
    );
    // A failure reads "host: exec: `cd … gzip -dc arbor.gz …` failed with exit 1: gzip: …".
    session.run_checked(&unpack).await?;
    Ok(uploaded.bytes)
}

/// Removes a working dir (and with it a --no-caching binary). Best effort: the host may be gone.
pub async fn remove_workdir(session: &Session, workdir: &str) -> Result<(), SshError> {
    // Guard against ever removing something that is not one of our working dirs.
    if !workdir.contains("/arbor.") {
        return Ok(());
    }
    session
        .run_checked(CommandLine::new("rm").args(["-rf", "--", workdir]).as_str())
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_normalize() {
        assert_eq!(normalize_platform("Linux x86_64"), "linux x86_64");
        assert_eq!(normalize_platform("x86_64"), "linux x86_64");
        assert_eq!(normalize_platform("linux-arm64"), "linux aarch64");
        assert_eq!(normalize_platform("Linux aarch64"), "linux aarch64");
    }

    #[test]
    fn local_platform_matches_uname() {
        let uname = std::process::Command::new("uname")
            .arg("-sm")
            .output()
            .expect("uname");
        let uname = String::from_utf8_lossy(&uname.stdout);
        assert_eq!(
            normalize_platform(uname.trim()),
            normalize_platform(&local_platform())
        );
    }

    #[tokio::test]
    async fn a_kept_gzip_is_reused_only_if_it_unpacks_to_the_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("arbor");
        let body: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        std::fs::write(&bin, &body).expect("write");
        let unpack = |gz: &Gzipped| {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz.0[..]), &mut out)
                .expect("gunzip");
            out
        };
        // Nothing kept: compressed here.
        let made = gzip_file(&bin, true).expect("gzip");
        assert_eq!(unpack(&made), body);
        // An intact kept copy is reused as it is.
        let mut marked = made.0.to_vec();
        marked[4] = 0x42; // gzip's MTIME field: ignored on unpacking, tells the copies apart
        std::fs::write(dir.path().join(KEPT_GZ), &marked).expect("write");
        assert_eq!(gzip_file(&bin, true).expect("gzip").0.to_vec(), marked);
        // A damaged one is not passed on.
        let cut = &marked[..marked.len() / 2];
        std::fs::write(dir.path().join(KEPT_GZ), cut).expect("write");
        let fresh = gzip_file(&bin, true).expect("gzip");
        assert_eq!(unpack(&fresh), body);
        // And the initiator never looks at a kept copy.
        std::fs::write(dir.path().join(KEPT_GZ), &marked).expect("write");
        assert_ne!(gzip_file(&bin, false).expect("gzip").0.to_vec(), marked);
        let cell = Build::from_file(&bin, "Linux x86_64")
            .expect("build")
            .with_gzip(true);
        let got = cell.gz.expect("armed").get().await.expect("gzip");
        assert_eq!(got.0.to_vec(), marked);
    }

    #[test]
    fn build_hash_is_sha256_of_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("b");
        std::fs::write(&p, b"abc").expect("write");
        let b = Build::from_file(&p, "Linux x86_64").expect("build");
        assert_eq!(
            b.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(b.size, 3);
        let set = Builds::new([b]);
        assert!(set.for_platform("x86_64").is_some());
        assert!(set.for_platform("Linux aarch64").is_none());
    }
}
