//! The builds of arbor a node can copy to its children, by platform, and where each comes
//! from: a file on this node (its own binary, or `--binary` at the initiator), or its parent,
//! which copies it into this node's cache on request (`Up::Fetch`) the first time a child of
//! that platform needs it. So a relay receives the builds its subtree needs, once each, through
//! the same content-addressed cache as its own binary, and verifies each by sha256 before use.

use crate::wire::BuildRef;
use futures::future::BoxFuture;
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
pub const KEPT_GZ: &str = "arbor.gz";

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

/// This machine's builds cache: `$XDG_CACHE_HOME/arbor/bin`, else `~/.cache/arbor/bin`.
pub fn local_bin_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| super::home_dir().join(".cache"))
        .join("arbor/bin")
}

/// Keeps a copy of `build` in this machine's builds cache (`<sha256>/arbor`), unless one is
/// there: the initiator's, so that the next build it runs can send hosts a patch against
/// this one (a delta upgrade). Best effort.
pub fn keep_locally(build: &Build) {
    let dir = local_bin_cache().join(&build.sha256);
    let target = dir.join("arbor");
    if target.is_file() {
        return;
    }
    let temp = dir.join(format!(".keep.{}", std::process::id()));
    let kept = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::copy(&build.path, &temp))
        .and_then(|_| std::fs::rename(&temp, &target));
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&temp);
        tracing::debug!("keeping a copy of this build in {}: {e}", dir.display());
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

/// Asks this node's parent to copy the build with a sha256 into this node's cache; yields
/// its path here.
pub type FetchFromParent =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<PathBuf, String>> + Send + Sync>;

/// A build this node does not hold yet, and its one fetch (shared by every child that needs it).
struct Remote {
    wanted: BuildRef,
    fetched: tokio::sync::OnceCell<Result<Arc<Build>, String>>,
}

/// The builds a node can copy, by platform: its own files, and builds its parent holds.
#[derive(Clone, Default)]
pub struct Builds {
    local: BTreeMap<String, Arc<Build>>,
    remote: BTreeMap<String, Arc<Remote>>,
    fetch: Option<FetchFromParent>,
    /// Gzip fetched builds' copies too (--compress).
    gzip: bool,
}

impl std::fmt::Debug for Builds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builds")
            .field("local", &self.local.keys())
            .field("remote", &self.remote.keys())
            .finish()
    }
}

impl Builds {
    pub fn new(builds: impl IntoIterator<Item = Build>) -> Self {
        Builds {
            local: builds
                .into_iter()
                .map(|b| (normalize_platform(&b.platform), Arc::new(b)))
                .collect(),
            ..Builds::default()
        }
    }

    /// Adds the run's other builds (`NodeConfig::builds`), fetched from the parent with
    /// `fetch` when a child first needs one. Builds this node holds already are left alone.
    pub fn with_parent(mut self, all: &[BuildRef], fetch: FetchFromParent, gzip: bool) -> Self {
        for wanted in all {
            let platform = normalize_platform(&wanted.platform);
            if !self.local.contains_key(&platform) {
                self.remote.insert(
                    platform,
                    Arc::new(Remote {
                        wanted: wanted.clone(),
                        fetched: tokio::sync::OnceCell::new(),
                    }),
                );
            }
        }
        self.fetch = Some(fetch);
        self.gzip = gzip;
        self
    }

    /// What the run's nodes are told about these builds.
    pub fn refs(&self) -> Vec<BuildRef> {
        self.local
            .values()
            .map(|b| BuildRef {
                platform: b.platform.clone(),
                sha256: b.sha256.clone(),
                size: b.size,
            })
            .chain(self.remote.values().map(|r| r.wanted.clone()))
            .collect()
    }

    /// The build for `platform`, fetched from the parent first if need be; `Ok(None)` when
    /// the run has no build for it.
    pub async fn for_platform(&self, platform: &str) -> Result<Option<Arc<Build>>, String> {
        let platform = normalize_platform(platform);
        if let Some(b) = self.local.get(&platform) {
            return Ok(Some(b.clone()));
        }
        match self.remote.get(&platform) {
            Some(remote) => self.fetched(remote).await.map(Some),
            None => Ok(None),
        }
    }

    /// The build with this sha256, for a child that asks for it (only builds of this run).
    pub async fn by_sha256(&self, sha256: &str) -> Result<Arc<Build>, String> {
        if let Some(b) = self.local.values().find(|b| b.sha256 == sha256) {
            return Ok(b.clone());
        }
        match self.remote.values().find(|r| r.wanted.sha256 == sha256) {
            Some(remote) => self.fetched(remote).await,
            None => Err(format!("{sha256} is not a build of this run")),
        }
    }

    async fn fetched(&self, remote: &Remote) -> Result<Arc<Build>, String> {
        remote
            .fetched
            .get_or_init(|| async {
                let fetch = self
                    .fetch
                    .as_ref()
                    .ok_or("no parent to fetch builds from")?;
                let wanted = &remote.wanted;
                let path = fetch(wanted.sha256.clone()).await?;
                let (path2, platform) = (path.clone(), wanted.platform.clone());
                let build =
                    tokio::task::spawn_blocking(move || Build::from_file(&path2, &platform))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| format!("build for {}: {e}", wanted.platform))?;
                if build.sha256 != wanted.sha256 || build.size != wanted.size {
                    let _ = std::fs::remove_file(&path);
                    return Err(format!(
                        "the build for {} fetched into {} has sha256 {}, want {}; removed it",
                        wanted.platform,
                        path.display(),
                        build.sha256,
                        wanted.sha256
                    ));
                }
                tracing::debug!("fetched the build for {} from the parent", wanted.platform);
                Ok(Arc::new(if self.gzip {
                    build.with_gzip(false)
                } else {
                    build
                }))
            })
            .await
            .clone()
    }

    /// The build this node copies by default: its own platform's, or any.
    pub fn preferred(&self) -> Option<Arc<Build>> {
        self.local
            .get(&normalize_platform(&local_platform()))
            .or_else(|| self.local.values().next())
            .cloned()
    }

    /// Every platform the run has a build for.
    pub fn platforms(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .local
            .values()
            .map(|b| b.platform.clone())
            .chain(self.remote.values().map(|r| r.wanted.platform.clone()))
            .collect();
        all.sort();
        all.dedup();
        all
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
        assert!(set.local.contains_key(&normalize_platform("x86_64")));
        assert_eq!(set.platforms(), vec!["Linux x86_64".to_string()]);
    }

    #[tokio::test]
    async fn a_build_from_the_parent_is_fetched_once_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let own = dir.path().join("own");
        std::fs::write(&own, b"own build").expect("write");
        let other = dir.path().join("other");
        std::fs::write(&other, b"other build").expect("write");
        let theirs = Build::from_file(&other, "Linux aarch64").expect("build");
        let wanted = BuildRef {
            platform: "Linux aarch64".into(),
            sha256: theirs.sha256.clone(),
            size: theirs.size,
        };
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = calls.clone();
        let fetch: FetchFromParent = Arc::new(move |_sha| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = other.clone();
            Box::pin(async move { Ok(path) })
        });
        let builds = Builds::new([Build::from_file(&own, &local_platform()).expect("build")])
            .with_parent(std::slice::from_ref(&wanted), fetch, false);
        let (a, b) = tokio::join!(
            builds.for_platform("aarch64"),
            builds.by_sha256(&wanted.sha256)
        );
        assert_eq!(a.expect("fetch").expect("some").sha256, wanted.sha256);
        assert_eq!(b.expect("fetch").sha256, wanted.sha256);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            builds
                .for_platform("riscv64")
                .await
                .expect("none")
                .is_none()
        );
        assert!(builds.by_sha256("00").await.is_err());

        // A fetched file that is not the build asked for is refused and removed.
        let liar = dir.path().join("liar");
        std::fs::write(&liar, b"something else").expect("write");
        let path = liar.clone();
        let fetch: FetchFromParent = Arc::new(move |_| {
            let path = path.clone();
            Box::pin(async move { Ok(path) })
        });
        let builds = Builds::default().with_parent(&[wanted], fetch, false);
        let err = builds.for_platform("aarch64").await.expect_err("mismatch");
        assert!(err.contains("want"), "{err}");
        assert!(!liar.exists());
    }
}
