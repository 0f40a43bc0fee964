//! Staging a child: the one code path every node, at every depth, uses to put arbor on a host.
//!
//! 1. One probe (a single exec, so a single round trip): the host's OS and architecture
//!    (`uname -sm`), a private working dir (mktemp: mode 0700, unpredictable name), and whether
//!    the content-addressed cache `~/.cache/arbor/bin/<sha256>/arbor` (XDG_CACHE_HOME
//!    respected) holds an intact copy (size and sha256) of the build for that platform. A host
//!    whose platform has no build is refused before anything is copied, its working dir removed.
//!    The same exec measures the link by the bytes it reads from its stdin ([`Measure`]):
//!    mostly the first 512 KiB of the binary's packed copy, which the host keeps for the copy.
//! 2. Copy the binary into the cache unless it is there; with --no-caching, into the working
//!    dir instead. Uploads are atomic (temp name, rename), so an interrupted copy never leaves a
//!    bad cache entry; the size is checked after the copy, and the sha256 by every later probe.
//!    On a thin link (and gzip on the host), the copy is `arbor.gz`, unpacked there by gzip,
//!    whose CRC and a size check guard the result; a host that will stage children of its own
//!    keeps `arbor.gz` beside the binary, so it passes the compressed copy on without
//!    recompressing. A host without gzip gets the plain binary. Under sibling seeding
//!    (`sibling::BuildSeeding`), a host whose sibling holds the build (or is receiving it)
//!    fetches it from there instead, and is copied to only if that fails.
//! 3. Copy the graph into the working dir, and close the sftp session: wait until the server
//!    has closed its channel, so the exec that follows cannot be lost (see `ssh::sftp`).
//!
//! 4. On any error after the probe, or when the run is stopped (`cancel`), the working dir
//!    is removed and an upload in flight drops its temp file: a failed or stopped staging
//!    leaves nothing on the host.
//!
//! Tunnel and exec come after, in `child_link.rs`. A child's request for a build of another
//! platform is served by [`copy_build`], into the same cache.

use super::builds::{Build, Builds, KEPT_GZ};
use super::sibling::{BuildSeeding, Claim, Publish, SeedError};
use super::transfer;
use crate::ssh::{CommandLine, Session, SshError, shell_quote};
use crate::wire::NodeConfig;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How to stage: the run's settings that concern one host.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// Parent of the working dir on the host (--remote-tmp).
    pub remote_tmp: String,
    /// Copy the binary into the working dir, and remove it at the end (--no-caching).
    pub no_caching: bool,
    /// `--compress`: measure the link, and gzip the binary's first copy on a thin one.
    pub compress: crate::wire::Compress,
    /// Staging for a relay, whose children's links are usually its datacenter's LAN, where
    /// bytes are cheap and a plain copy costs a host far less CPU than unpacking one: probes
    /// are full (`transfer::PROBE_BYTES`; a short one misreads a loaded LAN), and without a
    /// packed stream of its own (its binary came plain) a host without the binary gets it
    /// plain, that copy measuring the link (see `stage`).
    pub probe_always: bool,
}

impl Default for StageOptions {
    fn default() -> Self {
        StageOptions::from(&NodeConfig::default())
    }
}

impl From<&NodeConfig> for StageOptions {
    fn from(config: &NodeConfig) -> Self {
        StageOptions {
            remote_tmp: config.remote_tmp.clone(),
            no_caching: config.no_caching,
            compress: config.compress,
            probe_always: false,
        }
    }
}

/// A staged host: where things are, and what it cost.
#[derive(Debug, Clone)]
pub struct Staged {
    pub workdir: String,
    /// The host's binary cache (`~/.cache/arbor/bin`).
    pub cache: String,
    pub binary: String,
    pub graph: Option<String>,
    pub platform: String,
    /// The binary was already in the host's cache.
    pub cached: bool,
    /// Bytes of files copied (binary and graph).
    pub bytes_copied: u64,
    /// The sha256 of the build at `binary`.
    pub sha256: String,
    /// arbor starts there through sudo (`become`): see `escalate`.
    pub escalate: Option<crate::wire::Become>,
    /// The link's rate, bytes/s, as the probe measured it (`transfer`); `None` with
    /// `--compress never`, or if the probe could not tell.
    pub rate: Option<f64>,
}

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(
        "{host}: stage: host runs {platform}, and the run has no build of arbor for it \
         (builds: {available}); pass --binary ARCH=PATH to arbor run"
    )]
    Platform {
        host: String,
        platform: String,
        available: String,
    },
    #[error("{host}: stage: {what}")]
    Other { host: String, what: String },
    #[error("{host}: stage: stopped (the run was stopped); nothing was left on the host")]
    Stopped { host: String },
}

/// Makes `StageError::Other` for `host`.
fn other_error(host: &str) -> impl Fn(String) -> StageError + '_ {
    move |what| StageError::Other {
        host: host.to_string(),
        what,
    }
}

/// Progress of one transfer: what, bytes sent, total.
pub type Progress<'a> = &'a mut (dyn FnMut(&str, u64, u64) + Send);

/// What the probe found on the host.
struct Probed {
    /// `uname -sm`.
    platform: String,
    workdir: String,
    cache: String,
    /// The build probed for is in the cache, intact.
    cached: bool,
    has_gzip: bool,
    has_xz: bool,
    /// The link's rate, bytes/s (the bytes sent between two lines of its output).
    rate: Option<f64>,
    /// Unmeasured, the link is taken for a LAN (see [`Late`]).
    lan: bool,
    /// The sha256 of the newest other build in the host's cache: a delta upgrade's base.
    old: Option<String>,
    /// The head of a packed stream the probe's bytes were, kept on the host in
    /// `<workdir>/`[`HEAD_FILE`].
    head: Option<Head>,
}

/// Where a probe keeps the head of a packed stream that its bytes were, in the working dir.
const HEAD_FILE: &str = "arbor.head";

/// The first bytes of a packed stream of the binary, which a probe sent and the host keeps:
/// the packed copy that follows, if it is that stream, sends only the rest.
#[derive(Clone)]
struct Head {
    packer: Packer,
    bytes: Arc<Vec<u8>>,
}

/// How the probe measures the link: it reads its stdin to its end, after its first line
/// (`Early`: [`transfer::PROBE_BYTES`], sent at once) or after its last (`Late`: what the
/// parent chose once it knew what the host has, see [`Late::feed`]), and then prints
/// [`transfer::RATE_MARK`].
#[derive(Clone, Copy)]
enum Measure<'a> {
    Early,
    Late(Late<'a>),
}

/// A late probe: what it is sent depends on what the host has (docs/remote.md, "Compression").
#[derive(Clone, Copy)]
struct Late<'a> {
    /// Staging for a relay (`StageOptions::probe_always`).
    relay: bool,
    /// The build's packed streams, made ahead (`GzCell::prewarm`).
    packed: Option<&'a Arc<super::builds::GzCell>>,
    /// Under sibling seeding the host may fetch the binary from a sibling: no head is sent.
    seeding: bool,
}

/// What a late probe is sent after a line naming it (the probe reads that line first).
enum Feed {
    /// Nothing (its stdin closed): the binary's copy measures the link.
    Nothing,
    /// [`transfer::PROBE_BYTES`] the host throws away: a host that gets no copy, or no packed
    /// stream is ready.
    Junk,
    /// The head of the packed stream its copy will be, if the link proves thin.
    Head(Head),
}

impl Late<'_> {
    /// - A host that holds the build, or an older one to patch: [`Feed::Junk`] from a relay
    ///   (a patch's level, and the artifacts', need the rate), nothing from the initiator,
    ///   where a thin link is likely (the link is then taken for thin).
    /// - Otherwise, where a packed stream is ready for the host's tools, its head: on a thin
    ///   link the copy sends the rest, so the probe costs nothing; on a LAN the copy is plain
    ///   and the head (512 KiB) is thrown away.
    /// - Otherwise junk from a relay that holds a packed stream (its own link was thin), and
    ///   nothing from one that does not (its children's links are taken for its datacenter's
    ///   LAN, and the binary's plain copy measures them) or from the initiator.
    fn feed(&self, probed: &Probed) -> Feed {
        if probed.cached || probed.old.is_some() {
            return if self.relay {
                Feed::Junk
            } else {
                Feed::Nothing
            };
        }
        let ready = self.packed.filter(|_| !self.seeding).and_then(|cell| {
            cell.ready_head(probed.has_xz, probed.has_gzip, transfer::PROBE_BYTES)
        });
        match ready {
            Some((xz, bytes)) => Feed::Head(Head {
                packer: if xz { Packer::Xz } else { Packer::Gzip },
                bytes: Arc::new(bytes),
            }),
            None if self.relay && self.packed.is_some() => Feed::Junk,
            None => Feed::Nothing,
        }
    }
}

/// The one-round-trip probe: platform, a fresh private working dir, the cache entry of
/// `build` (made ready for a copy when `make_dir`), and gzip. `undo` runs first, with `$c`
/// the cache: what an earlier probe made for another build.
fn probe_command(
    build: &Build,
    remote_tmp: &str,
    make_dir: bool,
    undo: &str,
    measure: Option<Measure>,
) -> String {
    // Right after the first line, or after the last, where a line first names what follows.
    let (early, late) = match measure {
        Some(Measure::Early) => (
            format!("cat >/dev/null; echo {};", transfer::RATE_MARK),
            String::new(),
        ),
        Some(Measure::Late(_)) => (
            String::new(),
            format!(
                "; read -r k || k=; if [ \"$k\" = head ]; then cat > \"$w\"/{HEAD_FILE}; \
                 else cat >/dev/null; fi; echo {}",
                transfer::RATE_MARK
            ),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "set -e; umask 077; uname -sm; {early} \
         c=\"${{XDG_CACHE_HOME:-$HOME/.cache}}/arbor/bin\"; {undo} \
         w=$(mktemp -d {tmp}/arbor.XXXXXXXXXX); echo \"$w\"; echo \"$c\"; \
         f=\"$c\"/{sha}/arbor; \
         if [ -f \"$f\" ] && [ \"$(wc -c < \"$f\")\" -eq {size} ] && \
            sha256sum \"$f\" | grep -q '^{sha} '; then \
           touch -c -- \"$c\"/{sha} \"$f\" || true; echo cached; \
         else {mkdir} echo missing; fi; \
         if command -v gzip >/dev/null 2>&1; then echo gzip; else echo no-gzip; fi; \
         if command -v xz >/dev/null 2>&1; then echo xz; else echo no-xz; fi; \
         o=-; for d in $(ls -t \"$c\" 2>/dev/null); do case $d in {sha}) ;; *) \
           if [ ${{#d}} -eq 64 ] && [ -x \"$c/$d/arbor\" ]; then o=$d; break; fi;; esac; done; \
         echo \"old $o\"{late}",
        tmp = shell_quote(remote_tmp.trim_end_matches('/')),
        sha = build.sha256,
        size = build.size,
        mkdir = if make_dir {
            format!("mkdir -p -m 700 \"$c\"/{};", build.sha256)
        } else {
            String::new()
        },
    )
}

/// Shell that removes what a probe made that is not needed after all: its working dir, and
/// the cache entry dir it made ready for `build` if nothing was put in it (`$c`: the cache).
fn undo_probe(probed: &Probed, build: &Build) -> String {
    format!(
        "rm -rf -- {w}; rmdir \"$c\"/{sha} 2>/dev/null || true;",
        w = shell_quote(&probed.workdir),
        sha = build.sha256
    )
}

/// Runs the probe; with `measure`, writes its bytes to its stdin: at once (`Early`), timed
/// from the first line of output to `transfer::RATE_MARK`, or (`Late`) what [`Late::feed`]
/// chose once the probe's last line said what the host has, timed from that line. Returns
/// the output, the rate (bytes/s), and the head of a packed stream a late probe was sent.
async fn run_probe(
    session: &Session,
    command: &str,
    measure: Option<Measure<'_>>,
) -> Result<(Vec<u8>, Option<f64>, Option<Head>), SshError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = session.exec(command, &Default::default()).await?;
    let mut before = session.link_info();
    let mut stdin = cmd.stdin_writer();
    let (go, send) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let mut go = Some(go);
    let early = matches!(measure, Some(Measure::Early));
    let feed = tokio::spawn(async move {
        let bytes = match early {
            true => vec![0u8; transfer::PROBE_BYTES],
            false => send.await.unwrap_or_default(),
        };
        let _ = stdin.write_all(&bytes).await;
        let _ = stdin.shutdown().await;
    });
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut first, mut mark, mut sent, mut head) =
        (None, None, early.then_some(transfer::PROBE_BYTES), None);
    let status = loop {
        match cmd.next().await {
            Some(crate::ssh::Output::Stdout(d)) => {
                let now = std::time::Instant::now();
                stdout.extend_from_slice(&d);
                match measure {
                    // Sent at once: timed from the first line.
                    Some(Measure::Early) => {
                        first.get_or_insert(now);
                    }
                    // Once the last line is whole, what the host has chooses the bytes.
                    Some(Measure::Late(late)) if go.is_some() => {
                        let whole = stdout.iter().rposition(|b| *b == b'\n');
                        if let Some(found) = whole.and_then(|n| parse_probe(&stdout[..=n], None)) {
                            let bytes = match late.feed(&found) {
                                Feed::Nothing => Vec::new(),
                                Feed::Junk => {
                                    [&b"junk\n"[..], &[0u8; transfer::PROBE_BYTES]].concat()
                                }
                                Feed::Head(h) => {
                                    let bytes = [&b"head\n"[..], &h.bytes].concat();
                                    head = Some(h);
                                    bytes
                                }
                            };
                            if !bytes.is_empty() {
                                (first, before, sent) =
                                    (Some(now), session.link_info(), Some(bytes.len()));
                            }
                            if let Some(go) = go.take() {
                                let _ = go.send(bytes);
                            }
                        }
                    }
                    _ => {}
                }
                if mark.is_none()
                    && measure.is_some()
                    && String::from_utf8_lossy(&stdout)
                        .lines()
                        .any(|l| l == transfer::RATE_MARK)
                {
                    mark = Some(now);
                }
            }
            Some(crate::ssh::Output::Stderr(d)) => stderr.extend_from_slice(&d),
            Some(crate::ssh::Output::Exit(status)) => break status,
            None => break crate::ssh::ExitStatus::Unknown,
        }
    };
    feed.abort();
    if !status.success() {
        return Err(session.error(
            crate::ssh::Step::Exec,
            crate::ssh::Cause::Other(format!(
                "`{command}` failed with {status}: {}",
                String::from_utf8_lossy(&stderr).trim()
            )),
        ));
    }
    let rate = match (first, mark, sent) {
        (Some(first), Some(mark), Some(sent)) => Some(measured(
            session,
            "the probe",
            transfer::rate_of(sent as u64, mark.duration_since(first)),
            before,
        )),
        _ => None,
    };
    Ok((stdout, rate, head))
}

/// A link's rate from a copy over `session` timed at `timed` bytes/s, and the kernel's
/// reading of the connection since `before` (docs/remote.md, "Compression"): the kernel's
/// delivery rate where it has one, since the timing includes the far end's scheduling, which
/// on a busy host makes a LAN read as a thin link.
fn measured(session: &Session, by: &str, timed: f64, before: Option<crate::ssh::LinkInfo>) -> f64 {
    let kernel = before
        .zip(session.link_info())
        .map(|(before, after)| after.since(&before));
    let rate = transfer::link_rate(timed, kernel.as_ref());
    tracing::debug!(
        "{}: link measured at {:.1} MB/s by {by} (timed {:.1} MB/s{})",
        session.label(),
        rate / 1e6,
        timed / 1e6,
        kernel.map_or(String::new(), |k| format!(
            ", kernel {:.1} MB/s{}",
            k.delivery_rate / 1e6,
            if k.app_limited { " app-limited" } else { "" }
        ))
    );
    rate
}

/// A delta upgrade: when this node holds the older build `old` the host's cache has, the
/// host's own copy of it receives a zstd patch against itself and writes `binary`, checked
/// by sha256 (`transfer`). Returns the bytes sent, or `None` when no patch could be used (the
/// caller copies the build whole).
async fn upgrade(
    session: &Session,
    build: &Build,
    probed: &Probed,
    old: &str,
    binary: &str,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<Option<u64>, StageError> {
    let local = super::builds::local_bin_cache().join(old).join("arbor");
    // The old build runs the receive: it must be an arbor for this host's machine, not a
    // build for another platform that this node also keeps (it could not run here, or, not
    // being arbor at all, might never end).
    if !local.is_file() || !same_machine(&local, &build.path) {
        return Ok(None);
    }
    let remote_old = format!("{}/{old}/arbor", probed.cache);
    let send = transfer::Send {
        what: "arbor",
        local: &build.path,
        size: build.size,
        sha256: &build.sha256,
        mode: 0o755,
        level: transfer::level_for(crate::wire::Compress::Always, probed.rate).unwrap_or(1),
        base: Some((local, remote_old.clone())),
        receiver: &remote_old,
        remote: binary,
    };
    let sent = transfer::send(session, &send, cancel, &mut |sent, total| {
        progress("arbor patch", sent, total)
    })
    .await;
    match sent {
        Ok(bytes) => {
            tracing::info!(
                "{}: arbor upgraded by a patch against the build {} in its cache ({bytes} \
                 bytes for {})",
                session.label(),
                crate::engine::artifacts::short(old),
                build.size
            );
            Ok(Some(bytes))
        }
        Err(transfer::SendError::Stopped) => Err(StageError::Stopped {
            host: session.label().to_string(),
        }),
        Err(e) => {
            tracing::warn!(
                "{}: a patch against the build {old} in its cache failed ({e:?}); copying \
                 arbor whole",
                session.label()
            );
            Ok(None)
        }
    }
}

/// Whether `a` and `b` are ELF executables for the same machine (class, byte order and
/// `e_machine` alike).
fn same_machine(a: &std::path::Path, b: &std::path::Path) -> bool {
    fn head(p: &std::path::Path) -> Option<[u8; 20]> {
        let mut h = [0u8; 20];
        std::io::Read::read_exact(&mut std::fs::File::open(p).ok()?, &mut h).ok()?;
        h.starts_with(b"\x7fELF").then_some(h)
    }
    match (head(a), head(b)) {
        (Some(x), Some(y)) => x[4..6] == y[4..6] && x[18..20] == y[18..20],
        _ => false,
    }
}

/// Runs `undo_probe`'s shell on its own.
async fn undo(session: &Session, undo: &str) {
    let _ = session
        .run_checked(&format!(
            "c=\"${{XDG_CACHE_HOME:-$HOME/.cache}}/arbor/bin\"; {undo}"
        ))
        .await;
}

fn parse_probe(out: &[u8], rate: Option<f64>) -> Option<Probed> {
    let out = String::from_utf8_lossy(out);
    let mut lines = out.lines().filter(|l| *l != transfer::RATE_MARK);
    Some(Probed {
        rate,
        lan: false,
        platform: lines.next()?.trim().to_string(),
        workdir: lines.next()?.to_string(),
        cache: lines.next()?.to_string(),
        cached: lines.next()? == "cached",
        has_gzip: lines.next()? == "gzip",
        has_xz: lines.next()? == "xz",
        head: None,
        old: lines
            .next()?
            .strip_prefix("old ")
            .filter(|o| o.len() == 64 && o.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_string),
    })
}

/// Stages `session`'s host: see the module docs. `relay`: the host will stage children of
/// its own (it keeps a compressed copy to pass on). `seeding`: the host's siblings seed each
/// other, the binary's first copy included (docs/remote.md, "Sibling seeding"). Stops early,
/// leaving nothing behind, when `cancel` fires.
#[allow(clippy::too_many_arguments)]
pub async fn stage(
    session: &Session,
    builds: &Builds,
    options: &StageOptions,
    graph: Option<(&str, &[u8])>,
    relay: bool,
    seeding: Option<&BuildSeeding>,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<Staged, StageError> {
    let host = session.label().to_string();
    let other = other_error(&host);
    let probe = async |build: &Build, undo: &str, measure| -> Result<Probed, StageError> {
        let command = probe_command(
            build,
            &options.remote_tmp,
            !options.no_caching,
            undo,
            measure,
        );
        let (out, rate, head) = run_probe(session, &command, measure).await?;
        let mut probed = parse_probe(&out, rate).ok_or_else(|| {
            other(format!(
                "unexpected probe output: {:?}",
                String::from_utf8_lossy(&out)
            ))
        })?;
        // Unmeasured, a relay without a packed stream takes its children's links for LANs.
        if let Some(Measure::Late(late)) = measure {
            probed.lan = late.relay && late.packed.is_none();
        }
        probed.head = head;
        Ok(probed)
    };

    // One round trip for the common case: the platform, a private working dir, and whether
    // the cache holds the build we expect to copy (this node's own). A host of another
    // platform costs a second probe, or is refused with its working dir removed. The probe
    // runs to its end even when the run is stopped, so the working dir it makes is known.
    let expected = builds
        .preferred()
        .ok_or_else(|| other("no build of arbor to copy".into()))?;
    // The binary's gzip stream, should the probe find the host without it, is made meanwhile
    // rather than after (kept streams are reused; docs/remote.md). How the link is measured
    // (docs/remote.md, "Compression"): by a probe sent 512 KiB at once where the initiator's
    // stream is being made (its first run of a build), else by a late probe (`Late::feed`),
    // whose bytes are the head of the packed copy where one is ready.
    let compress = options.compress != crate::wire::Compress::Never;
    let packed = expected
        .gz
        .as_ref()
        .filter(|cell| compress && cell.prewarm());
    let measure = match (options.probe_always, packed) {
        _ if !compress => None,
        (false, None) => Some(Measure::Early),
        (relay, packed) => Some(Measure::Late(Late {
            relay,
            packed,
            seeding: seeding.is_some() && !options.no_caching,
        })),
    };
    let mut probed = probe(&expected, "", measure).await?;
    let made = undo_probe(&probed, &expected);
    let found = match builds.for_platform(&probed.platform).await {
        Ok(found) => found,
        Err(e) => {
            undo(session, &made).await;
            return Err(other(format!("build for {}: {e}", probed.platform)));
        }
    };
    let build = match found {
        Some(b) if b.sha256 == expected.sha256 => b,
        Some(b) => {
            // Another platform: the second probe first undoes what the first made.
            let (rate, lan) = (probed.rate, probed.lan);
            probed = probe(&b, &made, None).await?;
            (probed.rate, probed.lan) = (rate, lan);
            b
        }
        None => {
            undo(session, &made).await;
            return Err(StageError::Platform {
                host: host.clone(),
                platform: probed.platform,
                available: builds.platforms().join(", "),
            });
        }
    };
    let copied = copy_in(
        session, &build, options, &probed, graph, relay, seeding, progress, cancel,
    )
    .await;
    match copied {
        Ok(staged) if !cancel.is_cancelled() => Ok(staged),
        result => {
            let _ = remove_workdir(session, &probed.workdir).await;
            match result {
                Err(e) if !cancel.is_cancelled() => Err(e),
                _ => Err(StageError::Stopped { host: host.clone() }),
            }
        }
    }
}

/// Steps 2 and 3: the binary (unless cached) and the graph.
#[allow(clippy::too_many_arguments)]
async fn copy_in(
    session: &Session,
    build: &Build,
    options: &StageOptions,
    probed: &Probed,
    graph: Option<(&str, &[u8])>,
    relay: bool,
    seeding: Option<&BuildSeeding>,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<Staged, StageError> {
    let host = session.label().to_string();
    let other = other_error(&host);
    let (workdir, cache) = (&probed.workdir, &probed.cache);
    let cached = probed.cached && !options.no_caching;
    // Named `arbor` inside a directory named by its hash, so `ps` and `pgrep arbor` show it.
    let binary = if options.no_caching {
        format!("{workdir}/arbor")
    } else {
        format!("{cache}/{}/arbor", build.sha256)
    };
    // A delta upgrade: an older arbor in the host's cache that this node holds too patches
    // itself into this build (before the sftp session: nothing may start during one).
    let patched = match (&probed.old, cached, options.compress) {
        (Some(old), false, c) if c != crate::wire::Compress::Never => {
            upgrade(session, build, probed, old, &binary, progress, cancel).await?
        }
        _ => None,
    };
    let (publish, seeded) = match seeding.filter(|_| !options.no_caching) {
        Some(seed) if cached => {
            seed.offer(&build.sha256, &binary);
            (None, false)
        }
        Some(seed) if patched.is_none() => {
            seed_build(session, seed, build, &binary, cancel).await?
        }
        _ => (None, false),
    };
    let sftp = session.sftp().await?;
    let copied = async {
        let mut bytes_copied = patched.unwrap_or(0);
        let thin = match options.compress {
            crate::wire::Compress::Never => false,
            crate::wire::Compress::Always => true,
            crate::wire::Compress::Auto => {
                probed.rate.map_or(!probed.lan, |r| r < transfer::LAN_RATE)
            }
        };
        let packed = thin && !cached && !seeded && patched.is_none();
        // Where the probe's bytes were the head of a packed stream, the host holds them: a
        // packed copy of that stream sends only the rest (and removes the head file, whether
        // it works or not); otherwise the head file is removed below.
        let head = probed.head.as_ref().filter(|_| packed);
        let head_file = format!("{workdir}/{HEAD_FILE}");
        let mut head_used = false;
        let fits = |stream: &[u8], packer| {
            head.filter(|h| h.packer == packer && stream.starts_with(&h.bytes))
                .map(|h| (head_file.as_str(), h.bytes.len()))
        };
        // The kept xz stream where the host has xz (smaller; see builds::Xz), unless the host
        // holds the head of the gzip stream. A copy that fails there goes gzipped instead.
        let before = session.link_info();
        let mut xz_copy = None;
        let xz = match (&build.gz, packed && probed.has_xz) {
            // Asked for at the initiator, it is made for later copies if it is not there.
            (Some(cell), true) => cell.xz(),
            _ => None,
        };
        if let Some(xz) = xz.filter(|_| head.is_none_or(|h| h.packer == Packer::Xz)) {
            let head = fits(&xz, Packer::Xz);
            head_used |= head.is_some();
            match copy_packed(
                session,
                build,
                &xz,
                Packer::Xz,
                head,
                &binary,
                relay,
                progress,
                cancel,
            )
            .await
            {
                Ok(done) => xz_copy = Some(done),
                Err(_) if cancel.is_cancelled() => {
                    return Err(StageError::Stopped { host: host.clone() });
                }
                Err(e) => {
                    tracing::warn!("{host}: the binary's xz copy failed, copying it gzipped: {e}");
                    if let Some(cell) = &build.gz {
                        cell.forget_xz();
                    }
                }
            }
        }
        let gz = match (&build.gz, packed && probed.has_gzip && xz_copy.is_none()) {
            (Some(cell), true) => Some(cell.get().await.map_err(&other)?),
            _ => None,
        };
        let gz_head = gz.as_ref().and_then(|gz| fits(&gz.0, Packer::Gzip));
        head_used |= gz_head.is_some();
        if probed.head.is_some() && !head_used {
            // Not used: a LAN's plain copy, or a stream other than the one it came from.
            let _ = sftp.remove(&head_file).await;
        }
        // The binary's copy, timed: the link's rate when the probe did not measure it.
        let mut copy = None;
        if cached || patched.is_some() || seeded {
            // Nothing copied: the parent reports the cache hit itself (it used to report a
            // finished copy first, which the summary counted as bytes sent).
        } else if let Some((bytes, took)) = xz_copy {
            bytes_copied += bytes;
            copy = Some((bytes, took));
        } else if let Some(gz) = &gz {
            let (bytes, took) = copy_packed(
                session,
                build,
                &gz.0,
                Packer::Gzip,
                gz_head,
                &binary,
                relay,
                progress,
                cancel,
            )
            .await?;
            bytes_copied += bytes;
            copy = Some((bytes, took));
        } else {
            let began = std::time::Instant::now();
            let bytes = upload_build(&sftp, build, &binary, cancel, &mut |sent, total| {
                progress("arbor", sent, total)
            })
            .await
            .map_err(|e| match e {
                UploadError::Ssh(e) => StageError::Ssh(e),
                UploadError::Other(what) => other(what),
            })?;
            bytes_copied += bytes;
            copy = Some((bytes, began.elapsed()));
        }
        let rate = probed.rate.or_else(|| {
            let (bytes, took) = copy.filter(|(bytes, _)| *bytes >= transfer::MEASURED_BY)?;
            Some(measured(
                session,
                "the binary's copy",
                transfer::rate_of(bytes, took),
                before,
            ))
        });
        let graph = match graph {
            Some((name, text)) => {
                let path = format!("{workdir}/{name}");
                let uploaded = sftp
                    .upload_until(
                        cancel,
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
        Ok::<_, StageError>((graph, bytes_copied, rate))
    }
    .await;
    // Nothing may start on this connection until the server has closed the sftp channel,
    // whether the copy worked or not (a failed or stopped one is followed by removing the
    // working dir): dropbear before 2024.86 drops a command started meanwhile (ssh::sftp).
    if let Err(e) = sftp.close().await {
        tracing::warn!("{e}");
    }
    let (graph, bytes_copied, rate) = copied?;
    if let (Some(publish), Some(seed)) = (publish, seeding) {
        publish.held(seed.peer(&binary));
    }
    Ok(Staged {
        workdir: workdir.clone(),
        cache: cache.clone(),
        binary,
        graph,
        platform: probed.platform.clone(),
        cached,
        bytes_copied,
        sha256: build.sha256.clone(),
        escalate: None,
        rate,
    })
}

/// The binary's first copy under seeding: claims the build on the siblings' board. Returns
/// the claim to publish once this host holds the build (it is the first to need it: the
/// caller copies it), or whether it was fetched from a sibling that holds it (after waiting
/// for that sibling's copy, if one was in flight). A failed fetch is reported and leaves the
/// copy to the caller.
async fn seed_build(
    session: &Session,
    seed: &BuildSeeding,
    build: &Build,
    binary: &str,
    cancel: &CancellationToken,
) -> Result<(Option<Publish>, bool), StageError> {
    let host = session.label();
    let stopped = || StageError::Stopped {
        host: host.to_string(),
    };
    match seed
        .claim(&build.sha256, cancel)
        .await
        .ok_or_else(stopped)?
    {
        Claim::Mine(publish) => Ok((Some(publish), false)),
        Claim::From(peer) => {
            let started = std::time::Instant::now();
            match seed
                .fetch(&peer, &build.sha256, build.size, binary, cancel)
                .await
            {
                Ok(()) => {
                    tracing::info!(
                        "{host}: arbor fetched from its sibling {} (seeded) in {:.1} s, none of \
                         its bytes over this node's link",
                        peer.name,
                        started.elapsed().as_secs_f64()
                    );
                    Ok((None, true))
                }
                Err(SeedError::Stopped) => Err(stopped()),
                Err(e) => {
                    tracing::warn!(
                        "{host}: seeding arbor from a sibling failed (from {}: {e}, after \
                         {:.1} s); copying it from this node instead",
                        peer.name,
                        started.elapsed().as_secs_f64()
                    );
                    Ok((None, false))
                }
            }
        }
        Claim::Alone | Claim::Later => Ok((None, false)),
    }
}

pub(super) enum UploadError {
    Ssh(SshError),
    Other(String),
}

impl std::fmt::Display for UploadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UploadError::Ssh(e) => e.fmt(f),
            UploadError::Other(why) => f.write_str(why),
        }
    }
}

impl From<SshError> for UploadError {
    fn from(e: SshError) -> Self {
        UploadError::Ssh(e)
    }
}

/// Uploads a build to `binary` and checks its size there; returns the bytes copied.
async fn upload_build(
    sftp: &crate::ssh::Sftp,
    build: &Build,
    binary: &str,
    cancel: &CancellationToken,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<u64, UploadError> {
    let blob = Blob {
        what: "arbor",
        local: &build.path,
        size: build.size,
        mode: 0o755,
        sha256: None,
    };
    upload_blob(sftp, &blob, binary, cancel, progress).await
}

/// A local file to put into a content-addressed cache on a child: a build or an artifact.
pub(super) struct Blob<'a> {
    /// For messages: "arbor", "artifact 1a2b…".
    pub what: &'a str,
    pub local: &'a std::path::Path,
    pub size: u64,
    pub mode: u32,
    /// Hash the bytes as they are sent and keep the copy only if they have this sha256: the
    /// local file may have changed since it was checked (an artifact in a relay's cache).
    pub sha256: Option<&'a str>,
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &polled {
            sha2::Digest::update(&mut this.hasher, &buf.filled()[before..]);
        }
        polled
    }
}

/// Uploads `blob` to `remote` atomically (temp name, rename when complete) and checks its
/// size there; returns the bytes copied.
pub(super) async fn upload_blob(
    sftp: &crate::ssh::Sftp,
    blob: &Blob<'_>,
    remote: &str,
    cancel: &CancellationToken,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<u64, UploadError> {
    // A copy still arriving here is read as it arrives (crate::node::arriving).
    let opening =
        |e: std::io::Error| UploadError::Other(format!("opening {}: {e}", blob.local.display()));
    let (file, follow) = crate::node::arriving::open(blob.local).map_err(opening)?;
    let mut reader = HashingReader {
        inner: crate::node::arriving::AsyncTail::new(file, blob.size, follow).map_err(opening)?,
        hasher: sha2::Sha256::default(),
    };
    let uploaded = sftp
        .upload_until(cancel, &mut reader, blob.size, remote, blob.mode, progress)
        .await?;
    if let Some(want) = blob.sha256 {
        let sent = data_encoding::HEXLOWER.encode(&sha2::Digest::finalize(reader.hasher));
        if sent != want {
            let _ = sftp.remove(remote).await;
            return Err(UploadError::Other(format!(
                "{} changed under {} while it was copied (sent bytes with sha256 {sent}, \
                 want {want}); removed the copy",
                blob.what,
                blob.local.display()
            )));
        }
    }
    // The bytes crossed an authenticated channel and were renamed into place only when
    // complete; the size is checked here, and the sha256 by every later probe (and by a node
    // that fetched a build, or uses an artifact) before the entry is trusted again.
    match sftp.stat(remote).await? {
        Some((size, _)) if size == blob.size => Ok(uploaded.bytes),
        found => {
            let _ = sftp.remove(remote).await;
            Err(UploadError::Other(format!(
                "copy of {} to {remote} has the wrong size ({found:?}, want {}); removed it",
                blob.what, blob.size
            )))
        }
    }
}

/// Where a build with `sha256` goes on the child: its cache, or with --no-caching its
/// working dir.
pub fn build_path(staged: &Staged, sha256: &str, no_caching: bool) -> String {
    if no_caching {
        format!("{}/builds/{sha256}/arbor", staged.workdir)
    } else {
        format!("{}/{sha256}/arbor", staged.cache)
    }
}

/// Serves a child's `Fetch`: puts `build` into the child's cache (or, with --no-caching, its
/// working dir) unless an intact copy is there; returns its path on the child and the bytes
/// copied.
pub async fn copy_build(
    session: &Session,
    staged: &Staged,
    build: &Build,
    no_caching: bool,
    compress: crate::wire::Compress,
) -> Result<(String, u64), String> {
    let binary = build_path(staged, &build.sha256, no_caching);
    let dir = binary.strip_suffix("/arbor").unwrap_or(&binary);
    let check = format!(
        "umask 077; mkdir -p -m 700 {dir} && f={f} && \
         if [ -f \"$f\" ] && sha256sum \"$f\" | grep -q '^{sha} '; then \
           touch -c -- {dir} \"$f\" || true; echo cached; \
         else echo missing; fi",
        dir = shell_quote(dir),
        f = shell_quote(&binary),
        sha = build.sha256,
    );
    let out = session
        .run_checked(&check)
        .await
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&out).trim() == "cached" {
        return Ok((binary, 0));
    }
    // The child runs arbor: it takes the build zstd-compressed at its link's level.
    if let Some(level) = transfer::level_for(compress, staged.rate) {
        let send = transfer::Send {
            what: "arbor",
            local: &build.path,
            size: build.size,
            sha256: &build.sha256,
            mode: 0o755,
            level,
            base: None,
            receiver: &staged.binary,
            remote: &binary,
        };
        let never = CancellationToken::new();
        match transfer::send(session, &send, &never, &mut |_, _| {}).await {
            Ok(bytes) => return Ok((binary, bytes)),
            Err(e) => tracing::warn!("{e:?}; copying the build uncompressed instead"),
        }
    }
    let sftp = session.sftp().await.map_err(|e| e.to_string())?;
    let never = CancellationToken::new();
    let bytes = upload_build(&sftp, build, &binary, &never, &mut |_, _| {})
        .await
        .map_err(|e| match e {
            UploadError::Ssh(e) => e.to_string(),
            UploadError::Other(what) => format!("{}: {what}", session.label()),
        })?;
    // As after staging: the sftp channel is gone before anything else starts here.
    if let Err(e) = sftp.close().await {
        tracing::warn!("{e}");
    }
    Ok((binary, bytes))
}

/// How the binary's first copy is packed: what the host unpacks it with.
#[derive(Clone, Copy, PartialEq)]
enum Packer {
    Gzip,
    /// xz: smaller, made by the initiator only (builds::Xz); the host checks the sha256 of
    /// what it unpacks, since no node unpacks a kept xz stream to check it before sending.
    Xz,
}

/// The binary's first copy, packed: streamed into the host's `gzip -dc` (or `xz -dc`) on the
/// stdin of one exec, so unpacking overlaps the copy instead of following it (xz takes 0.4 s
/// of CPU for a release build, gzip 0.14 s). The result is renamed into place only when the
/// unpacker succeeded (its CRC), the size is right, and for xz the sha256 too (the initiator
/// does not unpack its kept xz stream to check it); a cut stream makes the unpacker fail, and
/// nothing is left. A relay keeps what it received, `arbor.gz` or `arbor.xz` (written beside
/// by `tee`, renamed once whole), to pass on to children on thin links without compressing
/// anything itself. Returns the bytes copied and how long until the last was written.
#[allow(clippy::too_many_arguments)]
async fn copy_packed(
    session: &Session,
    build: &Build,
    packed: &[u8],
    packer: Packer,
    head: Option<(&str, usize)>,
    binary: &str,
    relay: bool,
    progress: Progress<'_>,
    cancel: &CancellationToken,
) -> Result<(u64, std::time::Duration), StageError> {
    use tokio::io::AsyncWriteExt;
    let host = session.label().to_string();
    let dir = binary.rsplit_once('/').map_or(".", |(dir, _)| dir);
    let (name, tool) = match packer {
        Packer::Gzip => (KEPT_GZ, "gzip"),
        Packer::Xz => (super::builds::KEPT_XZ, "xz"),
    };
    let check = match packer {
        Packer::Gzip => String::new(),
        Packer::Xz => format!("sha256sum \"$t\" | grep -q '^{} ' && ", build.sha256),
    };
    let keep = relay;
    // The head a probe sent (`Feed::Head`) goes first, and is removed whatever happens.
    let skip = head.map_or(0, |(_, len)| len);
    let (first, drop) = match head {
        Some((path, _)) => (
            format!("cat {} - | ", shell_quote(path)),
            format!("rm -f -- {};", shell_quote(path)),
        ),
        None => (String::new(), String::new()),
    };
    let unpack = format!(
        "cd {dir} && t=.arbor.unpack.$$ && k=.{name}.$$ && \
         if {first}{source}{tool} -dc > \"$t\" && [ \"$(wc -c < \"$t\")\" -eq {size} ] && {check}\
            {kept}chmod 755 \"$t\" && mv -f \"$t\" arbor; then {drop} :; \
         else rm -f \"$t\" \"$k\"; {drop} echo '{tool} -d failed or gave the wrong bytes' >&2; exit 1; fi",
        dir = shell_quote(dir),
        size = build.size,
        source = if keep { "tee \"$k\" | " } else { "" },
        kept = if keep {
            format!(
                "[ \"$(wc -c < \"$k\")\" -eq {} ] && mv -f \"$k\" {name} && ",
                packed.len()
            )
        } else {
            String::new()
        },
    );
    if skip > 0 {
        tracing::debug!(
            "{host}: {name}: its first {skip} bytes came with the probe, the copy sends the \
             other {}",
            packed.len().saturating_sub(skip)
        );
    }
    let command = session.exec(&unpack, &Default::default()).await?;
    let mut stdin = command.stdin_writer();
    let began = std::time::Instant::now();
    let total = packed.len() as u64;
    let streaming = async {
        let mut sent = skip as u64;
        for chunk in packed[skip.min(packed.len())..].chunks(256 << 10) {
            stdin.write_all(chunk).await?;
            sent += chunk.len() as u64;
            progress(name, sent, total);
        }
        stdin.shutdown().await?;
        Ok::<_, std::io::Error>(began.elapsed())
    };
    let collecting = command.collect();
    tokio::pin!(streaming, collecting);
    let failed = |out: &crate::ssh::Collected| {
        session.error(
            crate::ssh::Step::Exec,
            crate::ssh::Cause::Other(format!(
                "unpacking {name} in {dir} failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        )
    };
    // The unpacker may fail before it has read everything (a full disk): its failure is the
    // answer, not a write that waits for channel room that never comes.
    let (took, out) = tokio::select! {
        streamed = &mut streaming => match streamed {
            Ok(took) => tokio::select! {
                out = &mut collecting => (took, out?),
                _ = cancel.cancelled() => return Err(StageError::Stopped { host }),
            },
            Err(e) => {
                // A write that failed: the unpacker's exit says why, if it says soon.
                match tokio::time::timeout(std::time::Duration::from_secs(2), &mut collecting).await {
                    Ok(Ok(out)) if !out.status.success() => return Err(failed(&out).into()),
                    _ => return Err(other_error(&host)(format!("copying {name}: {e}"))),
                }
            }
        },
        out = &mut collecting => {
            let out = out?;
            if out.status.success() {
                return Err(other_error(&host)(format!("copying {name}: the unpacker ended before the last bytes were written")));
            }
            return Err(failed(&out).into());
        }
        _ = cancel.cancelled() => return Err(StageError::Stopped { host }),
    };
    if !out.status.success() {
        return Err(failed(&out).into());
    }
    Ok((total, took))
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

/// Stops whatever arbor was started with `staged`'s working dir (a child that never said
/// hello), then removes the working dir.
pub async fn stop_and_remove(session: &Session, staged: &Staged) {
    let workdir = super::escalate::node_workdir(staged);
    let pattern = format!("--workdir {workdir}( |$)");
    let kill = CommandLine::new("pkill").args(["-KILL", "-f", "--", &pattern]);
    match &staged.escalate {
        Some(_) => super::escalate::remove_root_dir(session, staged, Some(kill.as_str())).await,
        None => {
            let _ = session.output(kill.as_str()).await;
        }
    }
    let _ = remove_workdir(session, &staged.workdir).await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_an_elf_build_for_the_same_machine_may_receive_a_patch() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
        let mut other = std::fs::read(&me).unwrap();
        other[18] ^= 0xff;
        let other_path = dir.path().join("other");
        std::fs::write(&other_path, other).unwrap();
        assert!(same_machine(&me, &me));
        assert!(!same_machine(&script, &me), "a script");
        assert!(!same_machine(&other_path, &me), "another machine");
    }

    use super::*;
    use tokio::io::AsyncReadExt;

    /// Runs a late probe's shell here (`sh`, HOME in a temp dir) with `stdin`: its output,
    /// parsed, and what its working dir holds afterwards.
    fn late_probe_here(
        build: &Build,
        home: &std::path::Path,
        stdin: &[u8],
    ) -> (Probed, Vec<String>) {
        use std::io::Write;
        let late = Late {
            relay: false,
            packed: None,
            seeding: false,
        };
        let command = probe_command(
            build,
            &home.display().to_string(),
            true,
            "",
            Some(Measure::Late(late)),
        );
        let mut child = std::process::Command::new("sh")
            .args(["-c", &command])
            .env("HOME", home)
            .env_remove("XDG_CACHE_HOME")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        child.stdin.take().unwrap().write_all(stdin).expect("stdin");
        let out = child.wait_with_output().expect("probe");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().last(), Some(transfer::RATE_MARK), "{text}");
        let probed = parse_probe(&out.stdout, None).expect("parse");
        let mut held: Vec<String> = std::fs::read_dir(&probed.workdir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        held.sort();
        (probed, held)
    }

    #[test]
    fn a_late_probe_keeps_a_head_it_is_sent_and_throws_junk_away() {
        let home = tempfile::tempdir().unwrap();
        let bin = home.path().join("bin");
        std::fs::write(&bin, b"not really arbor").unwrap();
        let build = Build::from_file(&bin, "Linux x86_64").unwrap();
        let head: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();

        let (probed, held) =
            late_probe_here(&build, home.path(), &[&b"head\n"[..], &head].concat());
        assert!(!probed.cached && probed.old.is_none());
        assert_eq!(held, [HEAD_FILE]);
        assert_eq!(
            std::fs::read(format!("{}/{HEAD_FILE}", probed.workdir)).unwrap(),
            head
        );

        let (_, held) = late_probe_here(&build, home.path(), &[&b"junk\n"[..], &head].concat());
        assert!(held.is_empty(), "junk was kept: {held:?}");
        let (_, held) = late_probe_here(&build, home.path(), b"");
        assert!(held.is_empty(), "nothing sent, yet {held:?}");
    }

    #[tokio::test]
    async fn a_late_probe_sends_a_missing_host_the_head_of_a_ready_stream_and_a_cached_one_none() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("arbor");
        let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 13) as u8).collect();
        std::fs::write(&bin, &body).unwrap();
        let build = Build::from_file(&bin, "Linux x86_64")
            .unwrap()
            .with_gzip(Some(dir.path().join(KEPT_GZ)), false);
        let cell = build.gz.clone().unwrap();
        let host = |cached: bool, gzip: bool| Probed {
            platform: "Linux x86_64".into(),
            workdir: "/tmp/arbor.x".into(),
            cache: "/root/.cache/arbor/bin".into(),
            cached,
            has_gzip: gzip,
            has_xz: false,
            rate: None,
            lan: false,
            old: None,
            head: None,
        };
        let kind = |feed: Feed| match feed {
            Feed::Nothing => "nothing".to_string(),
            Feed::Junk => "junk".to_string(),
            Feed::Head(h) => format!("head {:?} {}", h.packer == Packer::Gzip, h.bytes.len()),
        };
        let late = |relay, packed, seeding| Late {
            relay,
            packed,
            seeding,
        };
        // The stream not made yet: no head; a relay holding one measures with junk.
        assert_eq!(
            kind(late(false, Some(&cell), false).feed(&host(false, true))),
            "nothing"
        );
        assert_eq!(
            kind(late(true, Some(&cell), false).feed(&host(false, true))),
            "junk"
        );
        // A kept stream not yet checked (`GzCell::get`): its head, which the copy compares
        // with the stream it sends.
        let kept: Vec<u8> = (0..800_000u32).map(|i| (i % 7) as u8).collect();
        std::fs::write(dir.path().join(KEPT_GZ), &kept).unwrap();
        match late(false, Some(&cell), false).feed(&host(false, true)) {
            Feed::Head(h) => {
                assert!(h.packer == Packer::Gzip);
                assert_eq!(h.bytes[..], kept[..transfer::PROBE_BYTES]);
            }
            _ => panic!("no head of the kept stream"),
        }
        // Checked, it does not unpack to the binary: made afresh, and the head is the new one.
        let gz = cell.get().await.unwrap();
        match late(false, Some(&cell), false).feed(&host(false, true)) {
            Feed::Head(h) => assert!(gz.0.starts_with(&h.bytes) && !kept.starts_with(&h.bytes)),
            _ => panic!("no head of the made stream"),
        }
        let head = format!("head true {}", gz.0.len().min(transfer::PROBE_BYTES));
        // (relay, holds a packed stream, seeding; host cached, host has gzip): what it is sent.
        for (relay, packed, seeding, cached, gzip, want) in [
            (false, true, false, false, true, head.as_str()),
            (true, true, false, false, true, &head),
            // A host without gzip, a seeded one, a cached one: no head.
            (false, true, false, false, false, "nothing"),
            (false, true, true, false, true, "nothing"),
            (false, true, false, true, true, "nothing"),
            (true, true, false, true, true, "junk"),
            // A relay without a packed stream: nothing to a host without the build, junk to
            // one with it.
            (true, false, false, false, true, "nothing"),
            (true, false, false, true, true, "junk"),
        ] {
            let got = kind(late(relay, packed.then_some(&cell), seeding).feed(&host(cached, gzip)));
            assert_eq!(
                got, want,
                "relay {relay}, packed {packed}, seeding {seeding}, cached {cached}, gzip {gzip}"
            );
        }
    }

    #[tokio::test]
    async fn what_is_read_through_a_hashing_reader_is_hashed() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        let mut reader = HashingReader {
            inner: &body[..],
            hasher: sha2::Sha256::default(),
        };
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = reader.read(&mut buf).await.expect("read");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, body);
        assert_eq!(
            data_encoding::HEXLOWER.encode(&sha2::Digest::finalize(reader.hasher)),
            crate::engine::artifacts::sha256_hex(&body)
        );
    }
}
