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

/// Where a build's gzip stream comes from, and the stream once made. Made lazily, or ahead
/// of need with [`GzCell::prewarm`]: a run whose hosts all have the binary cached compresses
/// nothing but what a prewarm started.
#[derive(Debug)]
pub struct GzCell {
    source: PathBuf,
    /// Where a gzip stream of this build may have been kept: beside a relay's binary (what
    /// its parent copied), or beside the build the initiator keeps in its own cache.
    kept: Option<PathBuf>,
    /// Write the stream made here to `kept`, for the next run of this build (the initiator).
    save: bool,
    made: tokio::sync::OnceCell<Result<Gzipped, String>>,
    /// The build for x86_64 (xz's x86 branch filter packs it 5% smaller).
    x86: bool,
    /// The build as an xz stream, kept beside `kept` (the initiator only): see [`Xz`].
    xz: std::sync::Mutex<Xz>,
}

/// The binary's xz stream, for a first copy to a host that has `xz`: 4.3 MB for a 12.8 MB
/// release build where gzip makes 5.6 (0.56 s less at 20 Mbit/s per copy across a thin
/// link). Making it takes 2.2 s of one core on the lab's machine, so it is never made while
/// a copy waits: the initiator makes it once per build, in the background, keeps it in its
/// cache beside the build, and uses it from the moment it is there (the next run of the same
/// build, or later hosts of the same run). docs/remote.md, "The binary's first copy".
#[derive(Debug, Default)]
enum Xz {
    /// Not looked for yet.
    #[default]
    Unknown,
    /// Being made.
    Making,
    Ready(Arc<Vec<u8>>),
    /// None kept, and none to be made (no `xz` here, a build too large, a failed making).
    Absent,
}

/// The largest build the initiator makes an xz stream of: release builds are 13 MB; a debug
/// build (100 MB and more) would take a core for over a minute.
const XZ_MAX: u64 = 64 << 20;

/// Beside the initiator's cached copy of a build: its xz stream.
pub const KEPT_XZ: &str = "arbor.xz";

impl PartialEq for GzCell {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
            && self.kept == other.kept
            && self.save == other.save
            && self.x86 == other.x86
    }
}

impl Eq for GzCell {}

impl GzCell {
    /// The gzip stream; the first caller makes it (on a blocking thread), the rest wait.
    pub async fn get(&self) -> Result<Gzipped, String> {
        self.made
            .get_or_init(|| async {
                let (source, kept, save) = (self.source.clone(), self.kept.clone(), self.save);
                tokio::task::spawn_blocking(move || gzip_file(&source, kept.as_deref(), save))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|made| made)
            })
            .await
            .clone()
    }

    /// Starts making the stream now, in the background: a stage calls it before its probe,
    /// so that the compression overlaps the probe's round trip and 512 KiB instead of
    /// following them. Only where a thin link is likely, since on a LAN nothing is gzipped
    /// and the CPU would be spent for nothing (on a relay staging a dozen leaves, CPU it
    /// needs): at the initiator, whose links to its hosts are the long ones, and on a relay
    /// whose own binary came gzipped (its parent's link to it was thin), which only checks
    /// the stream kept beside it.
    /// Returns whether the stream is made (or being made) ahead.
    pub fn prewarm(self: &Arc<Self>) -> bool {
        let likely = self.save || self.kept.as_deref().is_some_and(Path::is_file);
        if !likely {
            return false;
        }
        if self.save {
            self.look_for_xz(false);
        }
        if !self.made.initialized() {
            let cell = self.clone();
            tokio::spawn(async move {
                let _ = cell.get().await;
            });
        }
        true
    }
}

impl GzCell {
    /// The xz stream, where one is kept and read (see [`Xz`]), for a copy across a thin
    /// link; never waits. The initiator starts making it the first time it is asked, so a
    /// run on fast links never spends a core on it. A relay reads the `arbor.xz` its parent
    /// left beside its binary the first time it is asked (it never makes one): its children
    /// check the sha256 of what they unpack.
    pub fn xz(self: &Arc<Self>) -> Option<Arc<Vec<u8>>> {
        self.xz_if(true)
    }

    /// The first `len` bytes of a packed stream ready now for a host whose tools `xz` and
    /// `gzip` say what it can unpack (the head a probe sends, see `stage`); `true` for xz.
    /// Never makes or waits for a stream: the kept xz stream, else the gzip stream if made,
    /// else the head of the kept gzip stream, which is checked before use and may not be
    /// the stream the copy sends (the caller compares).
    pub fn ready_head(
        self: &Arc<Self>,
        xz: bool,
        gzip: bool,
        len: usize,
    ) -> Option<(bool, Vec<u8>)> {
        let head = |s: &[u8]| s[..len.min(s.len())].to_vec();
        if let Some(stream) = self.xz_if(false).filter(|_| xz) {
            return Some((true, head(&stream)));
        }
        if !gzip {
            return None;
        }
        match self.made.get() {
            Some(Ok(gz)) => Some((false, head(&gz.0))),
            Some(Err(_)) => None,
            None => {
                let mut bytes = Vec::with_capacity(len);
                let file = std::fs::File::open(self.kept.as_deref()?).ok()?;
                std::io::Read::read_to_end(&mut std::io::Read::take(file, len as u64), &mut bytes)
                    .ok()?;
                Some((false, bytes))
            }
        }
    }

    /// The xz stream if there is one; with `make`, the initiator starts making it if not.
    fn xz_if(self: &Arc<Self>, make: bool) -> Option<Arc<Vec<u8>>> {
        if self.save {
            self.look_for_xz(make);
        }
        let mut state = self.xz.lock().unwrap_or_else(|e| e.into_inner());
        if !self.save
            && matches!(*state, Xz::Unknown)
            && let Some(path) = self.xz_path()
        {
            *state = std::fs::read(path).map_or(Xz::Absent, |xz| Xz::Ready(Arc::new(xz)));
        }
        match &*state {
            Xz::Ready(xz) => Some(xz.clone()),
            _ => None,
        }
    }

    /// A copy with the kept xz stream failed on its host (it did not unpack to this build):
    /// it is removed, and this run copies gzip from now on.
    pub fn forget_xz(&self) {
        *self.xz.lock().unwrap_or_else(|e| e.into_inner()) = Xz::Absent;
        if let Some(path) = self.xz_path() {
            let _ = std::fs::remove_file(path);
        }
    }

    fn xz_path(&self) -> Option<PathBuf> {
        Some(self.kept.as_deref()?.with_file_name(KEPT_XZ))
    }

    /// Reads the kept xz stream, or starts making it on a thread of its own: xz runs as a
    /// child that the kernel kills should this process end first (`PR_SET_PDEATHSIG`), and
    /// writes a temp file renamed into place only once xz has succeeded.
    /// With `make` false, only reads a kept one (at a stage's start, before its probe has
    /// said whether any link is thin).
    fn look_for_xz(self: &Arc<Self>, make: bool) {
        let mut state = self.xz.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(*state, Xz::Unknown) {
            return;
        }
        let Some(path) = self.xz_path() else {
            *state = Xz::Absent;
            return;
        };
        if let Ok(kept) = std::fs::read(&path) {
            *state = Xz::Ready(Arc::new(kept));
            return;
        }
        if !make {
            // What a run that ended mid-making left: a run whose links are all fast never
            // makes one again, so the temp files would stay.
            remove_stale_temps(&path);
            return;
        }
        let small = std::fs::metadata(&self.source).is_ok_and(|m| m.len() <= XZ_MAX);
        let tool = crate::engine::resources::accounts::find_tool("xz");
        let Some(tool) = tool.filter(|_| small) else {
            *state = Xz::Absent;
            return;
        };
        *state = Xz::Making;
        drop(state);
        let cell = self.clone();
        let made = std::thread::Builder::new()
            .name("xz".into())
            .spawn(move || {
                let made = make_xz(&tool, &cell.source, &path, cell.x86)
                    .and_then(|()| std::fs::read(&path).ok())
                    .map_or(Xz::Absent, |xz| Xz::Ready(Arc::new(xz)));
                let mut state = cell.xz.lock().unwrap_or_else(|e| e.into_inner());
                if matches!(*state, Xz::Making) {
                    *state = made;
                }
            });
        if made.is_err() {
            *self.xz.lock().unwrap_or_else(|e| e.into_inner()) = Xz::Absent;
        }
    }
}

/// Makes `kept`, the xz stream of the binary at `source` (`tool`: xz): preset 1 with a 16 MiB dictionary
/// (the whole binary), and the x86 branch filter for an x86_64 build; any xz since 5.0
/// unpacks it. Preset 6 packs 10% smaller but takes 8.6 s, longer than many runs last, and
/// a making that the run's end kills is wasted. Best effort: a failure leaves no file, and
/// gzip is used as before.
fn make_xz(tool: &Path, source: &Path, kept: &Path, x86: bool) -> Option<()> {
    use std::os::unix::process::CommandExt;
    remove_stale_temps(kept);
    let temp = kept.with_extension(format!("xz.{}", std::process::id()));
    let made = (|| {
        let out = std::fs::File::create(&temp)?;
        let mut xz = std::process::Command::new(tool);
        if x86 {
            xz.arg("--x86");
        }
        xz.arg("--lzma2=preset=1,dict=16MiB");
        xz.args(["-T1", "-c", "--"])
            .arg(source)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(std::process::Stdio::null());
        // SAFETY: prctl and nice are async-signal-safe and touch only this child: its
        // parent-death signal (this thread waits for the child, so the signal comes only when
        // the process ends), and its priority, below the rollout it runs beside.
        unsafe {
            xz.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::nice(10);
                Ok(())
            });
        }
        let began = std::time::Instant::now();
        let status = xz.status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!("xz: {status}")));
        }
        std::fs::File::open(&temp)?.sync_all()?;
        std::fs::rename(&temp, kept)?;
        tracing::debug!(
            "made {} in {:.1} s, for the next copies of this build",
            kept.display(),
            began.elapsed().as_secs_f64()
        );
        Ok::<_, std::io::Error>(())
    })();
    if let Err(e) = &made {
        let _ = std::fs::remove_file(&temp);
        tracing::debug!("making {}: {e}", kept.display());
    }
    made.ok()
}

/// Removes what makings of `kept` left behind: temp files `<kept>.<pid>` of processes that
/// are gone (a run that ended while xz still worked: its xz was killed with it).
fn remove_stale_temps(kept: &Path) {
    let (Some(dir), Some(name)) = (kept.parent(), kept.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let pid = file
            .to_str()
            .and_then(|f| f.strip_prefix(name)?.strip_prefix('.'))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
            .filter(|p| *p > 0);
        // SAFETY: kill with signal 0 sends nothing; it only asks whether the process exists.
        let gone = pid.is_some_and(|p| {
            let rc = unsafe { libc::kill(p, 0) };
            rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        });
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The gzip stream of the binary at `path`: the one at `kept` if it unpacks to exactly that
/// binary (a few tens of milliseconds, so a damaged copy is never passed on), else made here
/// ([`gzip_members`]) and, with `save`, written to `kept` for the next run.
fn gzip_file(path: &Path, kept: Option<&Path>, save: bool) -> Result<Gzipped, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(kept) = kept
        && let Ok(gz) = std::fs::read(kept)
    {
        let mut unpacked = Vec::with_capacity(raw.len());
        let intact = std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(&gz[..]),
            &mut unpacked,
        )
        .is_ok()
            && unpacked == raw;
        if intact {
            return Ok(Gzipped(Arc::new(gz)));
        }
        tracing::warn!(
            "{}: does not unpack to this binary; compressing afresh",
            kept.display()
        );
    }
    let made = gzip_members(&raw).map_err(|e| format!("compressing {}: {e}", path.display()))?;
    if let (Some(kept), true) = (kept, save) {
        let temp = kept.with_extension(format!("gz.{}", std::process::id()));
        if let Err(e) = std::fs::write(&temp, &made).and_then(|()| std::fs::rename(&temp, kept)) {
            let _ = std::fs::remove_file(&temp);
            tracing::debug!("keeping {}: {e}", kept.display());
        }
    }
    Ok(Gzipped(Arc::new(made)))
}

/// How much of the binary each gzip member holds.
const GZ_MEMBER: usize = 1 << 20;

/// gzip level 6, as gzip(1) by default, in members of [`GZ_MEMBER`] bytes compressed on
/// every core (a 12.7 MB binary: 1.3 s on one core of the lab's machine). gzip -d unpacks
/// the members one after the other into the whole; each starts with an empty dictionary,
/// which costs a few hundred bytes of 5.6 MB (deflate looks back only 32 KiB anyway).
fn gzip_members(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let gzip = |chunk: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(chunk.len() / 2),
            flate2::Compression::new(6),
        );
        encoder.write_all(chunk).and_then(|()| encoder.finish())
    };
    if raw.is_empty() {
        return gzip(raw);
    }
    let chunks: Vec<&[u8]> = raw.chunks(GZ_MEMBER).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let members: Vec<std::sync::Mutex<Option<std::io::Result<Vec<u8>>>>> =
        chunks.iter().map(|_| Default::default()).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(chunk) = chunks.get(i) else { break };
                    let made = gzip(chunk);
                    *members[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(made);
                }
            });
        }
    });
    let mut out = Vec::with_capacity(raw.len() / 2);
    for member in members {
        let made = member.into_inner().unwrap_or_else(|e| e.into_inner());
        out.extend_from_slice(&made.unwrap_or_else(|| Err(std::io::Error::other("not made")))?);
    }
    Ok(out)
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

    /// Copies of this build go gzipped (--compress); see [`GzCell`]. `kept`: where a gzip
    /// stream of it may be kept; `save`: write the one made here there.
    pub fn with_gzip(mut self, kept: Option<PathBuf>, save: bool) -> Build {
        self.gz = Some(Arc::new(GzCell {
            source: self.path.clone(),
            kept,
            save,
            made: tokio::sync::OnceCell::new(),
            x86: self.platform.ends_with("x86_64"),
            xz: Default::default(),
        }));
        self
    }

    /// Copies of this build go gzipped, reusing the `arbor.gz` kept beside it (a relay's own
    /// binary, staged gzipped by its parent).
    pub fn with_kept_gzip(self) -> Build {
        let kept = self.path.with_file_name(KEPT_GZ);
        self.with_gzip(Some(kept), false)
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
                    build.with_gzip(None, false)
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
    async fn the_initiator_makes_an_xz_stream_once_in_the_background_and_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("arbor");
        let body: Vec<u8> = (0..300_000u32)
            .flat_map(|i| ((i % 251) ^ (i / 7)).to_le_bytes())
            .collect();
        std::fs::write(&bin, &body).unwrap();
        let kept = dir.path().join(KEPT_GZ);
        let build = Build::from_file(&bin, "Linux x86_64")
            .unwrap()
            .with_gzip(Some(kept.clone()), true);
        let cell = build.gz.clone().unwrap();
        // What a run killed mid-making left behind (a pid no process has).
        let stale = dir.path().join(format!("{KEPT_XZ}.{}", i32::MAX));
        std::fs::write(&stale, b"half an xz stream").unwrap();
        // A stage's start reads a kept stream but makes none: no link is known to be thin.
        // It removes what an earlier making left.
        assert!(cell.prewarm());
        assert!(!stale.exists(), "a stale temp file was left");
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !dir.path().join(KEPT_XZ).exists(),
            "made before any link asked"
        );
        assert_eq!(cell.xz(), None, "nothing kept, the making only starts now");
        assert!(cell.prewarm());
        // Never waited for: made on a thread of its own, then there for later copies.
        let mut xz = None;
        for _ in 0..200 {
            xz = cell.xz();
            if xz.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let xz = xz.expect("an xz stream, made within 10 s");
        assert!(xz.len() < body.len() / 2, "{} bytes", xz.len());
        let unpacked = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("xz -dc {}", dir.path().join(KEPT_XZ).display()))
            .output()
            .unwrap();
        assert!(unpacked.status.success());
        assert!(
            unpacked.stdout == body,
            "the kept stream unpacks to the build"
        );
        let temps: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("arbor.xz."))
            .collect();
        assert!(temps.is_empty(), "temp files left: {temps:?}");

        // The next run reads the kept one at once.
        let again = Build::from_file(&bin, "Linux x86_64")
            .unwrap()
            .with_gzip(Some(kept.clone()), true)
            .gz
            .unwrap();
        again.prewarm();
        assert_eq!(again.xz(), Some(xz));
        // One that failed on a host is removed, and not used again.
        again.forget_xz();
        assert_eq!(again.xz(), None);
        assert!(!dir.path().join(KEPT_XZ).exists());
        // A relay's cell (not the initiator's) never makes one.
        let relay = Build::from_file(&bin, "Linux x86_64")
            .unwrap()
            .with_kept_gzip()
            .gz
            .unwrap();
        relay.prewarm();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(relay.xz(), None);
        assert!(!dir.path().join(KEPT_XZ).exists());
    }

    #[tokio::test]
    async fn a_kept_gzip_is_reused_only_if_it_unpacks_to_the_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("arbor");
        // Several members' worth (GZ_MEMBER each).
        let body: Vec<u8> = (0..900_000u32)
            .flat_map(|i| ((i % 251) ^ (i / 7)).to_le_bytes())
            .collect();
        assert!(body.len() > 3 * GZ_MEMBER);
        std::fs::write(&bin, &body).expect("write");
        // What a host does with it: gzip(1) unpacks every member, in order.
        let unpack = |gz: &Gzipped| {
            let packed = dir.path().join("unpack.gz");
            std::fs::write(&packed, &gz.0[..]).expect("write");
            let out = std::process::Command::new("gzip")
                .arg("-dc")
                .arg(&packed)
                .output()
                .expect("gzip");
            assert!(out.status.success(), "{out:?}");
            out.stdout
        };
        let kept = dir.path().join(KEPT_GZ);
        // Nothing kept: compressed here, and not saved unless asked.
        let made = gzip_file(&bin, Some(&kept), false).expect("gzip");
        assert_eq!(unpack(&made), body);
        assert!(made.0.len() < body.len() / 2, "{} bytes", made.0.len());
        assert!(!kept.exists());
        // An intact kept copy is reused as it is.
        let mut marked = made.0.to_vec();
        marked[4] = 0x42; // gzip's MTIME field: ignored on unpacking, tells the copies apart
        std::fs::write(&kept, &marked).expect("write");
        assert_eq!(
            gzip_file(&bin, Some(&kept), false)
                .expect("gzip")
                .0
                .to_vec(),
            marked
        );
        // A damaged one is not passed on; with `save` the fresh one replaces it.
        let cut = &marked[..marked.len() / 2];
        std::fs::write(&kept, cut).expect("write");
        let fresh = gzip_file(&bin, Some(&kept), true).expect("gzip");
        assert_eq!(unpack(&fresh), body);
        assert_eq!(std::fs::read(&kept).expect("saved"), fresh.0.to_vec());
        // Without a place to look, a kept copy is never used.
        std::fs::write(&kept, &marked).expect("write");
        assert_ne!(
            gzip_file(&bin, None, false).expect("gzip").0.to_vec(),
            marked
        );
        // A relay's own binary reuses what its parent left beside it.
        let cell = Build::from_file(&bin, "Linux x86_64")
            .expect("build")
            .with_kept_gzip();
        let got = cell.gz.expect("armed").get().await.expect("gzip");
        assert_eq!(got.0.to_vec(), marked);
        // An empty file still makes a stream gzip unpacks.
        std::fs::write(&bin, b"").expect("write");
        assert_eq!(unpack(&gzip_file(&bin, None, false).expect("gzip")), b"");
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
