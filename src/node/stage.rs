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
    /// Unmeasured, the link is taken for a LAN (see `Measure::if_cached`).
    lan: bool,
    /// The sha256 of the newest other build in the host's cache: a delta upgrade's base.
    old: Option<String>,
}

/// How the probe measures the link: the probe reads [`transfer::PROBE_BYTES`] from its stdin
/// to its end (after its first line, or with `if_cached` after the fourth, which says whether
/// the build is cached) and then prints [`transfer::RATE_MARK`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Measure {
    /// Sent only to a host that holds the build, which gets no copy to measure the link by;
    /// for the others the parent closes the probe's stdin, and the binary's copy, plain,
    /// measures the link (a relay whose own binary came plain: its children's links are
    /// taken for its datacenter's LAN until measured).
    if_cached: bool,
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
    // Right after the first line, unless the parent waits for the line saying whether the
    // build is cached before it sends the bytes.
    let read = |late| match measure {
        Some(m) if m.if_cached == late => format!("cat >/dev/null; echo {};", transfer::RATE_MARK),
        _ => String::new(),
    };
    format!(
        "set -e; umask 077; uname -sm; {early} \
         c=\"${{XDG_CACHE_HOME:-$HOME/.cache}}/arbor/bin\"; {undo} \
         w=$(mktemp -d {tmp}/arbor.XXXXXXXXXX); echo \"$w\"; echo \"$c\"; \
         f=\"$c\"/{sha}/arbor; \
         if [ -f \"$f\" ] && [ \"$(wc -c < \"$f\")\" -eq {size} ] && \
            sha256sum \"$f\" | grep -q '^{sha} '; then \
           touch -c -- \"$c\"/{sha} \"$f\" || true; echo cached; \
         else {mkdir} echo missing; fi; {late} \
         if command -v gzip >/dev/null 2>&1; then echo gzip; else echo no-gzip; fi; \
         if command -v xz >/dev/null 2>&1; then echo xz; else echo no-xz; fi; \
         o=-; for d in $(ls -t \"$c\" 2>/dev/null); do case $d in {sha}) ;; *) \
           if [ ${{#d}} -eq 64 ] && [ -x \"$c/$d/arbor\" ]; then o=$d; break; fi;; esac; done; \
         echo \"old $o\"",
        tmp = shell_quote(remote_tmp.trim_end_matches('/')),
        sha = build.sha256,
        size = build.size,
        early = read(false),
        late = read(true),
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

/// Runs the probe; with `measure`, writes its bytes to its stdin at once, timed from the
/// first line of output to `transfer::RATE_MARK`, or (`if_cached`) once the probe said the
/// build is cached, timed from that line. Returns the output and the rate, bytes/s.
async fn run_probe(
    session: &Session,
    command: &str,
    measure: Option<Measure>,
) -> Result<(Vec<u8>, Option<f64>), SshError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = session.exec(command, &Default::default()).await?;
    let mut before = session.link_info();
    let mut stdin = cmd.stdin_writer();
    let (go, send) = tokio::sync::oneshot::channel::<bool>();
    let mut go = Some(go);
    let feed = tokio::spawn(async move {
        let bytes = match measure {
            Some(m) if !m.if_cached || send.await == Ok(true) => transfer::PROBE_BYTES,
            _ => 0,
        };
        let _ = stdin.write_all(&vec![0u8; bytes]).await;
        let _ = stdin.shutdown().await;
    });
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut first, mut mark, mut sent) = (None, None, measure.is_some_and(|m| !m.if_cached));
    let status = loop {
        match cmd.next().await {
            Some(crate::ssh::Output::Stdout(d)) => {
                let now = std::time::Instant::now();
                stdout.extend_from_slice(&d);
                let text = String::from_utf8_lossy(&stdout);
                // Sent at once: timed from the first line.
                if measure.is_some_and(|m| !m.if_cached) {
                    first.get_or_insert(now);
                }
                // The fourth line, whole: cached or missing.
                if measure.is_some_and(|m| m.if_cached)
                    && go.is_some()
                    && let Some(line) = text
                        .split('\n')
                        .nth(3)
                        .filter(|_| text.split('\n').count() > 4)
                {
                    let cached = line == "cached";
                    if cached {
                        (first, before, sent) = (Some(now), session.link_info(), true);
                    }
                    if let Some(go) = go.take() {
                        let _ = go.send(cached);
                    }
                }
                if mark.is_none()
                    && measure.is_some()
                    && text.lines().any(|l| l == transfer::RATE_MARK)
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
    let rate = match (first, mark) {
        (Some(first), Some(mark)) if sent => Some(measured(
            session,
            "the probe",
            transfer::rate_from(first, mark),
            before,
        )),
        _ => None,
    };
    Ok((stdout, rate))
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
        let (out, rate) = run_probe(session, &command, measure).await?;
        parse_probe(&out, rate).ok_or_else(|| {
            other(format!(
                "unexpected probe output: {:?}",
                String::from_utf8_lossy(&out)
            ))
        })
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
    // (docs/remote.md, "Compression"):
    // - the initiator: a full probe, or none where the stream is made ahead: a host without
    //   the binary gets it packed whatever its link, and that copy measures the link;
    // - a relay holding a kept gzip stream (its own link was thin): a full probe;
    // - a relay holding none (its own binary came plain or as xz): a host without the binary
    //   gets it plain, as on a LAN, and that copy measures the link; a full probe only to a
    //   host that holds the build.
    let compress = options.compress != crate::wire::Compress::Never;
    let ahead = compress && expected.gz.as_ref().is_some_and(|cell| cell.prewarm());
    let measure = match (options.probe_always, ahead) {
        _ if !compress => None,
        (false, true) => None,
        (false, false) | (true, true) => Some(false),
        (true, false) => Some(true),
    }
    .map(|if_cached| Measure { if_cached });
    let mut probed = probe(&expected, "", measure).await?;
    probed.lan = measure.is_some_and(|m| m.if_cached);
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
        // The kept xz stream where the host has xz (smaller; see builds::Xz). A copy that
        // fails there goes gzipped instead.
        let before = session.link_info();
        let mut xz_copy = None;
        if let (Some(cell), true) = (&build.gz, packed && probed.has_xz)
            && let Some(xz) = cell.xz()
        {
            match copy_packed(
                session,
                build,
                &xz,
                Packer::Xz,
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
                    cell.forget_xz();
                }
            }
        }
        let gz = match (&build.gz, packed && probed.has_gzip && xz_copy.is_none()) {
            (Some(cell), true) => Some(cell.get().await.map_err(&other)?),
            _ => None,
        };
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
    let unpack = format!(
        "cd {dir} && t=.arbor.unpack.$$ && k=.{name}.$$ && \
         if {source}{tool} -dc > \"$t\" && [ \"$(wc -c < \"$t\")\" -eq {size} ] && {check}\
            {kept}chmod 755 \"$t\" && mv -f \"$t\" arbor; then :; \
         else rm -f \"$t\" \"$k\"; echo '{tool} -d failed or gave the wrong bytes' >&2; exit 1; fi",
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
    let command = session.exec(&unpack, &Default::default()).await?;
    let mut stdin = command.stdin_writer();
    let began = std::time::Instant::now();
    let total = packed.len() as u64;
    let streaming = async {
        let mut sent = 0u64;
        for chunk in packed.chunks(256 << 10) {
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
