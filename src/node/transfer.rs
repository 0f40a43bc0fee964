//! Compressed copies between arbor processes, and deltas.
//!
//! - **The link's rate.** When a child is staged (unless `--compress never`), the probe's
//!   stdin carries [`PROBE_BYTES`] that the probe reads to their end between two lines of
//!   its output; the kernel's delivery rate over them, or else the time between those lines,
//!   gives the rate of that link (`Staged::rate`).
//! - **The level.** [`level_for`] turns the rate into a zstd level, or none (docs/remote.md,
//!   "Compression", has the table and the reasons).
//! - **The stream.** Once arbor is on a host, a copy to it is an exec of that arbor's hidden
//!   `receive` subcommand with the zstd stream on its stdin ([`send`]): compression on a
//!   blocking thread overlaps the sending. The receiver ([`receive`]) decompresses into a
//!   temp file beside the target, checks the size and sha256, fsyncs, and renames it into
//!   place only then.
//! - **Deltas.** When the host holds an older version (of an artifact, by source name; of
//!   arbor, in its builds cache) and the sender holds the same older version, the stream is a
//!   zstd patch: compressed with the old file as its reference prefix (`--patch-from`), with
//!   long-distance matching and a window covering both. The receiver patches against its own
//!   copy and checks the sha256 of the result: a base that differed on the two sides gives a
//!   mismatch, and the caller sends the full file instead.

use crate::ssh::{CommandLine, Session};
use crate::wire::Compress;
use sha2::Digest;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// Bytes the staging probe reads from its stdin to measure the link's rate: 0.2 s at 20
/// Mbit/s, a few milliseconds on a LAN. (128 KiB measured busy LAN hosts at 4 MB/s: a few
/// milliseconds of scheduling delay weigh as much as the transfer.)
pub const PROBE_BYTES: usize = 512 << 10;

/// The line the probe prints once it has read all it was sent ([`PROBE_BYTES`] or nothing).
pub const RATE_MARK: &str = "arbor-rate-mark";

/// At or above this rate (bytes/s, about 100 Mbit/s) a link counts as a LAN: `auto` copies
/// plain. gzip -6 (the binary's first copy) runs at about 23 MB/s and is not overlapped with
/// the sending, so it pays only below about 13 MB/s; and a relay compresses once per child,
/// so on a fast link compressing for many children at once costs more CPU than it saves.
pub const LAN_RATE: f64 = 12e6;

/// The zstd level for a link of `rate` bytes/s (`None`: not measured), or `None` for a plain
/// copy. The level is the highest whose compression speed stays several times above the
/// link's rate (`zstd -b` on a loaded 2-core lab machine, for arbor's release binary: level 1
/// 166 MB/s, 3 98 MB/s, 6 26 MB/s, 9 18 MB/s, 12 7.7 MB/s), so compressing, which overlaps
/// the sending, never becomes the bottleneck (docs/remote.md, "Compression").
pub fn level_for(mode: Compress, rate: Option<f64>) -> Option<i32> {
    let rate = match (mode, rate) {
        (Compress::Never, _) => return None,
        // Not measured: a middle level, cheap everywhere.
        (_, None) => return Some(3),
        (_, Some(r)) => r,
    };
    let level = if rate >= LAN_RATE {
        0
    } else if rate >= 4e6 {
        3
    } else if rate >= 1.5e6 {
        6
    } else if rate >= 0.5e6 {
        9
    } else {
        12
    };
    match (mode, level) {
        (Compress::Always, 0) => Some(1),
        (_, 0) => None,
        (_, l) => Some(l),
    }
}

/// The window (log2 bytes) a stream of `size` bytes with a reference of `base` bytes needs.
fn window_log(size: u64, base: u64) -> u32 {
    let total = (size + base).max(1);
    (64 - (total - 1).leading_zeros()).clamp(20, 30)
}

/// A link's rate from a copy timed at `timed` bytes/s and, where arbor holds the connection's
/// socket, the kernel's reading over the same copy. The kernel's delivery rate comes from
/// acknowledgements, which the far end's kernel sends as data arrives, so it is the link's
/// whatever the far end's processes are doing; the timing waits for them. On the 2-core lab,
/// a relay probing its 12 leaves at once timed LAN links at 3.9 to 5243 MB/s where the kernel
/// read 3.2 to 11.2 GB/s, and two probes sharing a 20 Mbit/s link timed 2.7 and 3.9 MB/s
/// where the kernel read 2.2 and 2.4. A sample the kernel marks app-limited (the sender had
/// too little to fill the link) is only a lower bound, so the timing may stand above it.
pub fn link_rate(timed: f64, kernel: Option<&crate::ssh::LinkInfo>) -> f64 {
    match kernel {
        Some(k) if k.bytes_acked == 0 || k.delivery_rate <= 0.0 => timed,
        Some(k) if k.app_limited => timed.max(k.delivery_rate),
        Some(k) => k.delivery_rate,
        None => timed,
    }
}

/// The rate of a copy of `bytes` that took `took`, bytes/s.
pub fn rate_of(bytes: u64, took: std::time::Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-4)
}

/// The smallest copy whose time measures its link well enough for [`level_for`]: the probe's
/// size.
pub const MEASURED_BY: u64 = PROBE_BYTES as u64;

/// What to send: a local file, what it must be, where it goes, and how.
pub struct Send<'a> {
    pub what: &'a str,
    pub local: &'a Path,
    pub size: u64,
    pub sha256: &'a str,
    pub mode: u32,
    pub level: i32,
    /// A patch: the older version here, and the same one on the host.
    pub base: Option<(PathBuf, String)>,
    /// The arbor on the host that receives.
    pub receiver: &'a str,
    pub remote: &'a str,
}

/// Why a compressed copy failed.
#[derive(Debug)]
pub enum SendError {
    /// The run was stopped.
    Stopped,
    /// The local file is not the artifact (it changed since it was hashed).
    Changed(String),
    /// The copy failed: the caller may send it again otherwise.
    Failed(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Stopped => f.write_str("stopped"),
            SendError::Changed(why) | SendError::Failed(why) => f.write_str(why),
        }
    }
}

/// Streams `send.local` zstd-compressed (or as a patch) to the arbor on the host, which
/// writes it to `send.remote` if it has the right sha256; returns the bytes sent.
pub async fn send(
    session: &Session,
    send: &Send<'_>,
    cancel: &CancellationToken,
    progress: &mut (dyn FnMut(u64, u64) + std::marker::Send),
) -> Result<u64, SendError> {
    let mut line = CommandLine::new(send.receiver).args([
        "receive",
        "--dest",
        send.remote,
        "--sha256",
        send.sha256,
        "--size",
        &send.size.to_string(),
        "--mode",
        &format!("{:o}", send.mode),
    ]);
    if let Some((_, remote_base)) = &send.base {
        line = line.args(["--patch-from", remote_base]);
    }
    let label = session.label();
    let command = session
        .exec(line.as_str(), &Default::default())
        .await
        .map_err(|e| SendError::Failed(e.to_string()))?;
    let mut stdin = command.stdin_writer();
    let receive_failed = |out: &crate::ssh::Collected| {
        SendError::Failed(format!(
            "{label}: arbor receive {} failed with {}: {}",
            send.what,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    let ((sent, written), out) = {
        let streaming = stream(
            label,
            send,
            Some(send.level),
            &mut stdin,
            cancel,
            &mut *progress,
        );
        let collecting = command.collect();
        tokio::pin!(streaming, collecting);
        // The receiver may end before it has read everything (a full disk): its failure is
        // the answer, not a write that waits for room the channel will never give.
        let first = tokio::select! {
            streamed = &mut streaming => Ok(streamed?),
            out = &mut collecting => Err(out),
        };
        match first {
            Ok(streamed) => tokio::select! {
                out = &mut collecting => (streamed, out),
                _ = cancel.cancelled() => return Err(SendError::Stopped),
            },
            Err(Ok(out)) if !out.status.success() => return Err(receive_failed(&out)),
            // It ended well while this end still wrote (its last bytes were in flight): the
            // writing ends too, or the copy counts as failed.
            Err(out) => match tokio::time::timeout(RECEIVER_GONE, &mut streaming).await {
                Ok(streamed) => (streamed?, out),
                Err(_) => {
                    return Err(SendError::Failed(format!(
                        "{label}: sending {}: the receiver ended before the last bytes were \
                         written",
                        send.what
                    )));
                }
            },
        }
    };
    let out = out.map_err(|e| SendError::Failed(e.to_string()))?;
    if !out.status.success() {
        return Err(receive_failed(&out));
    }
    if let Err(e) = written {
        return Err(SendError::Failed(format!(
            "{label}: sending {}: {e}",
            send.what
        )));
    }
    progress(send.size, send.size);
    Ok(sent)
}

/// How long the writing may go on once `arbor receive` has ended well (its last bytes and the
/// end of the stream were in flight).
const RECEIVER_GONE: std::time::Duration = std::time::Duration::from_secs(5);

/// What precedes a copy on a stream of a QUIC link (crate::node::quic_child): one JSON line.
/// The child answers one line when the file is in place (`ok`) or not (the reason).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StreamHeader {
    pub dest: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    /// The bytes as they are, not a zstd stream (`--compress never`).
    pub plain: bool,
    /// A zstd patch against this older version on the child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_from: Option<PathBuf>,
}

/// The longest header or answer line on a copy's stream.
pub const STREAM_LINE_MAX: u64 = 4096;

/// Streams `send.local` to the child at the other end of `connection`, on a stream of its
/// own: zstd at `send.level` (a patch against `send.base`, if given), or as it is when
/// `plain`; returns the bytes sent.
pub async fn send_quic(
    connection: &quinn::Connection,
    label: &str,
    send: &Send<'_>,
    plain: bool,
    cancel: &CancellationToken,
    progress: &mut (dyn FnMut(u64, u64) + std::marker::Send),
) -> Result<u64, SendError> {
    use tokio::io::AsyncReadExt;
    let failed = |e: String| SendError::Failed(format!("{label}: {} over QUIC: {e}", send.what));
    let (mut tx, rx) = connection
        .open_bi()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let header = StreamHeader {
        dest: send.remote.into(),
        sha256: send.sha256.to_string(),
        size: send.size,
        mode: send.mode,
        plain: plain && send.base.is_none(),
        patch_from: send.base.as_ref().map(|(_, remote)| remote.into()),
    };
    let mut line = serde_json::to_vec(&header).map_err(|e| failed(e.to_string()))?;
    line.push(b'\n');
    tx.write_all(&line)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let level = (!header.plain).then_some(send.level);
    let streamed = stream(label, send, level, &mut tx, cancel, progress).await;
    let mut answer = Vec::new();
    let mut rx = rx.take(STREAM_LINE_MAX);
    // A child that stopped reading says why: that beats the broken pipe seen here.
    let wait = match &streamed {
        Err(SendError::Failed(_)) => std::time::Duration::from_secs(2),
        _ => std::time::Duration::MAX,
    };
    let read = tokio::select! {
        r = tokio::time::timeout(wait, rx.read_to_end(&mut answer)) => r,
        _ = cancel.cancelled() => return Err(SendError::Stopped),
    };
    // The child's words: shown, never trusted beyond `ok`.
    let said = String::from_utf8_lossy(&answer);
    let said = crate::ui::printable(said.trim());
    if !said.is_empty() && said != "ok" {
        return Err(failed(format!("the child refused it: {said}")));
    }
    let (sent, written) = streamed?;
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(failed(format!("no answer: {e}"))),
        Err(_) => return Err(failed("no answer".into())),
    }
    if said != "ok" {
        return Err(failed(
            "the child closed the stream without an answer".into(),
        ));
    }
    written.map_err(|e| failed(e.to_string()))?;
    progress(send.size, send.size);
    Ok(sent + line.len() as u64)
}

/// A patch made once and sent to every child that holds the same older version: what it
/// read had `sha256`.
struct Patch {
    bytes: Vec<u8>,
    sha256: String,
}

/// The patches this process made, by (artifact, older version's file, level). A relay whose
/// twelve leaves all hold last week's version of an artifact makes its patch once, not twelve
/// times (each is a zstd pass over both versions: seconds of CPU for tens of MB); the
/// initiator likewise for its relays.
type PatchMemo =
    std::collections::HashMap<(String, PathBuf, i32), std::sync::Arc<tokio::sync::OnceCell<Memo>>>;

#[derive(Clone)]
enum Memo {
    Kept(std::sync::Arc<Patch>),
    /// Over [`PATCH_KEPT_MAX`]: each copy streams its own.
    TooLarge,
    /// Making it failed (an arriving copy whose writer gave up, a read error): forgotten, so
    /// the next copy tries again.
    Failed,
}

static PATCHES: std::sync::LazyLock<std::sync::Mutex<PatchMemo>> =
    std::sync::LazyLock::new(Default::default);

/// A patch larger than this is not kept in memory: it is made again for each copy, as it
/// streams (a patch that large saves little over the whole file anyway).
const PATCH_KEPT_MAX: usize = 32 << 20;

/// At most this many bytes of patches are kept by a process: past it, each further patch
/// is made for each copy, as before.
const PATCHES_KEPT_TOTAL: usize = 128 << 20;

/// The bytes of the patches kept now.
static PATCHES_KEPT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The patch of `send` against its base at `level`: made by the first caller (the others
/// wait for it), `None` when it is not kept.
async fn memo_patch(send: &Send<'_>, base: &Path, level: i32) -> Option<std::sync::Arc<Patch>> {
    let key = (send.sha256.to_string(), base.to_path_buf(), level);
    let cell = PATCHES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default()
        .clone();
    // The patch made here when it could not be kept: used for this copy only.
    let mut mine = None;
    let made = cell
        .get_or_init(|| async {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
            let (local, size, base) = (send.local.to_path_buf(), send.size, base.to_path_buf());
            let encoder = tokio::task::spawn_blocking(move || {
                encode(&local, size, Some(level), Some(base), tx)
            });
            let mut bytes = Vec::new();
            while let Some(chunk) = rx.recv().await {
                if bytes.len() + chunk.len() > PATCH_KEPT_MAX {
                    // Dropping the receiver ends the encoder at its next chunk.
                    return Memo::TooLarge;
                }
                bytes.extend_from_slice(&chunk);
            }
            let Ok(Ok(sha256)) = encoder.await else {
                return Memo::Failed;
            };
            let patch = std::sync::Arc::new(Patch { bytes, sha256 });
            use std::sync::atomic::Ordering;
            let size = patch.bytes.len();
            let kept = PATCHES_KEPT.fetch_add(size, Ordering::Relaxed) + size;
            if kept > PATCHES_KEPT_TOTAL {
                PATCHES_KEPT.fetch_sub(size, Ordering::Relaxed);
                mine = Some(patch);
                return Memo::TooLarge;
            }
            Memo::Kept(patch)
        })
        .await
        .clone();
    match made {
        Memo::Kept(patch) => Some(patch),
        Memo::TooLarge => mine,
        Memo::Failed => {
            forget_patch(send, base, level);
            None
        }
    }
}

/// Forgets the patch of `send` against `base`: what it read was not the artifact.
fn forget_patch(send: &Send<'_>, base: &Path, level: i32) {
    let key = (send.sha256.to_string(), base.to_path_buf(), level);
    let forgotten = PATCHES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    if let Some(Memo::Kept(patch)) = forgotten.as_ref().and_then(|cell| cell.get()) {
        PATCHES_KEPT.fetch_sub(patch.bytes.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a copy was not sent: the bytes read (`what`: sent, patched) had sha256 `got`.
fn changed(send: &Send<'_>, what: &str, got: &str) -> SendError {
    SendError::Changed(format!(
        "{} changed under {} while it was copied ({what} bytes with sha256 {got}, want {})",
        send.what,
        send.local.display(),
        send.sha256
    ))
}

/// Compresses (at `level`; as it is when `None`) `send.local` on a blocking thread into
/// `writer`, and shuts `writer` down; returns the bytes written and how the writing went
/// (checked after the receiver's verdict, which says more), once the bytes read are known to
/// be the artifact. A patch is made once per artifact, base and level, and kept for the
/// next child ([`memo_patch`]).
async fn stream<W: tokio::io::AsyncWrite + Unpin>(
    label: &str,
    send: &Send<'_>,
    level: Option<i32>,
    writer: &mut W,
    cancel: &CancellationToken,
    progress: &mut (dyn FnMut(u64, u64) + std::marker::Send),
) -> Result<(u64, std::io::Result<()>), SendError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let memo = match (&send.base, level) {
        (Some((base, _)), Some(level)) => tokio::select! {
            made = memo_patch(send, base, level) => made.map(|patch| (patch, base, level)),
            _ = cancel.cancelled() => return Err(SendError::Stopped),
        },
        _ => None,
    };
    let encoder = match memo {
        // A patch made already: checked before it goes, then sent from memory.
        Some((patch, base, level)) => {
            if patch.sha256 != send.sha256 {
                forget_patch(send, base, level);
                return Err(changed(send, "patched", &patch.sha256));
            }
            tokio::spawn(async move {
                for chunk in patch.bytes.chunks(CHUNK) {
                    if tx.send(chunk.to_vec()).await.is_err() {
                        break;
                    }
                }
            });
            None
        }
        None => {
            let (local, size) = (send.local.to_path_buf(), send.size);
            let base = send.base.as_ref().map(|(b, _)| b.clone());
            Some(tokio::task::spawn_blocking(move || {
                encode(&local, size, level, base, tx)
            }))
        }
    };
    let size = send.size;
    let mut sent = 0u64;
    let writing = async {
        while let Some(chunk) = rx.recv().await {
            writer.write_all(&chunk).await?;
            sent += chunk.len() as u64;
            // What went on the wire (compressed, or plain bytes past a failed pass-through's
            // retry) is shown against the file's size, short of it: only the end of the
            // copy, once the receiver checked it, says "done" (a finished transfer is
            // counted once in the summary).
            progress(sent.min(size.saturating_sub(1)), size);
        }
        writer.shutdown().await
    };
    let written = tokio::select! {
        w = writing => w,
        _ = cancel.cancelled() => return Err(SendError::Stopped),
    };
    // A failed write leaves chunks unread: the encoder's next send then fails, and it ends.
    drop(rx);
    let Some(encoder) = encoder else {
        return Ok((sent, written));
    };
    let failed = |e: String| SendError::Failed(format!("{label}: {e}"));
    let encoded = encoder
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(failed)?;
    if encoded != send.sha256 {
        return Err(changed(send, "sent", &encoded));
    }
    Ok((sent, written))
}

/// Compresses `local` (`size` bytes) at `level`, as a patch against `base` if given, into
/// chunks on `tx`; returns the sha256 of what it read.
fn encode(
    local: &Path,
    size: u64,
    level: Option<i32>,
    base: Option<PathBuf>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
) -> Result<String, String> {
    let base = match base {
        Some(b) => std::fs::read(&b).map_err(|e| format!("{}: {e}", b.display()))?,
        None => Vec::new(),
    };
    // A copy still arriving here is read as it arrives (crate::node::arriving).
    let (file, follow) =
        crate::node::arriving::open(local).map_err(|e| format!("{}: {e}", local.display()))?;
    let mut file = crate::node::arriving::Tail::new(file, size, follow);
    let mut sink = ChunkSink {
        tx,
        buf: Vec::with_capacity(CHUNK),
    };
    let z = |e: std::io::Error| format!("zstd: {e}");
    let Some(level) = level else {
        let sha = copy_hashed(&mut file, local, &mut sink)?;
        sink.flush().map_err(z)?;
        return Ok(sha);
    };
    let mut encoder = if base.is_empty() {
        zstd::stream::write::Encoder::new(sink, level).map_err(z)?
    } else {
        let mut e = zstd::stream::write::Encoder::with_ref_prefix(sink, level, &base).map_err(z)?;
        e.long_distance_matching(true).map_err(z)?;
        e
    };
    encoder
        .window_log(window_log(size, base.len() as u64))
        .map_err(z)?;
    encoder.set_pledged_src_size(Some(size)).map_err(z)?;
    let sha = copy_hashed(&mut file, local, &mut encoder)?;
    let mut sink = encoder.finish().map_err(z)?;
    sink.flush().map_err(z)?;
    Ok(sha)
}

/// Copies `file` (at `local`) into `out`; returns the sha256 of what it read.
fn copy_hashed(file: &mut dyn Read, local: &Path, out: &mut dyn Write) -> Result<String, String> {
    let mut hasher = sha2::Sha256::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", local.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| format!("zstd: {e}"))?;
    }
    Ok(data_encoding::HEXLOWER.encode(&hasher.finalize()))
}

const CHUNK: usize = 256 << 10;

/// Collects compressed bytes into chunks for the async side.
struct ChunkSink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "receiver gone"))
    }
}

/// `arbor receive`: what to write, and what it must be.
#[derive(Debug, Clone)]
pub struct Receive {
    pub dest: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub mode: u32,
    pub patch_from: Option<PathBuf>,
    /// The input is the bytes as they are, not a zstd stream.
    pub plain: bool,
}

/// Reads a zstd stream (a patch against `patch_from` if given) from `input` and writes it to
/// `dest` atomically, only if it has `size` bytes and the sha256 `sha256`. While it arrives,
/// readers can follow it (crate::node::arriving).
pub fn receive(args: &Receive, input: impl Read) -> Result<(), String> {
    let dir = args
        .dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Unique within this process too: a child receives its parent's copies over QUIC in
    // its own process, several at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(".arbor.receive.{}.{n}", std::process::id()));
    // Removed unless it is put into place.
    let incoming = crate::node::arriving::Incoming::create(&args.dest, &temp)?;
    write_checked(args, input, incoming)
}

fn write_checked(
    args: &Receive,
    input: impl Read,
    mut incoming: crate::node::arriving::Incoming,
) -> Result<(), String> {
    let base = match &args.patch_from {
        Some(b) => std::fs::read(b).map_err(|e| format!("{}: {e}", b.display()))?,
        None => Vec::new(),
    };
    let z = |e: std::io::Error| format!("zstd: {e}");
    let input = std::io::BufReader::new(input);
    let (mut plain, mut zstd);
    let decoder: &mut dyn Read = if args.plain {
        plain = input;
        &mut plain
    } else {
        zstd = if base.is_empty() {
            zstd::stream::read::Decoder::with_buffer(input).map_err(z)?
        } else {
            zstd::stream::read::Decoder::with_ref_prefix(input, &base).map_err(z)?
        };
        zstd.window_log_max(31).map_err(z)?;
        &mut zstd
    };
    let mut hasher = sha2::Sha256::default();
    let mut buf = vec![0u8; CHUNK];
    let mut n_total = 0u64;
    loop {
        let n = decoder.read(&mut buf).map_err(z)?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        if n_total > args.size {
            return Err(format!("more than the {} bytes expected", args.size));
        }
        hasher.update(&buf[..n]);
        incoming
            .file
            .write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", incoming.path.display()))?;
    }
    let sha = data_encoding::HEXLOWER.encode(&hasher.finalize());
    if n_total != args.size || sha != args.sha256 {
        return Err(format!(
            "received {n_total} bytes with sha256 {sha}, want {} bytes with sha256 {}{}",
            args.size,
            args.sha256,
            if args.patch_from.is_some() {
                " (patched against a base that differs from the sender's)"
            } else {
                ""
            }
        ));
    }
    incoming
        .finish(args.mode, &args.dest)
        .map_err(|e| format!("{}: {e}", args.dest.display()))?;
    Ok(())
}

/// The hidden `arbor receive` subcommand: exit 0 once the file is in place, 1 (with the
/// reason on stderr) otherwise, leaving nothing behind.
pub fn receive_main(args: &Receive) -> std::process::ExitCode {
    match receive(args, std::io::stdin().lock()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arbor receive: {}: {e}", args.dest.display());
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        crate::engine::artifacts::sha256_hex(b)
    }

    /// What `send` streams, made here without a session.
    fn stream(local: &Path, size: u64, level: i32, base: Option<PathBuf>) -> (Vec<u8>, String) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let (local, b) = (local.to_path_buf(), base.clone());
        let t = std::thread::spawn(move || encode(&local, size, Some(level), b, tx));
        let mut out = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            out.extend(c);
        }
        (out, t.join().expect("thread").expect("encode"))
    }

    #[test]
    fn the_kernels_delivery_rate_measures_a_link_past_a_busy_far_end() {
        let k = |rate: f64, app_limited: bool| crate::ssh::LinkInfo {
            bytes_acked: 525_880,
            delivery_rate: rate,
            app_limited,
        };
        // A LAN the far end's CPU made look thin (both read in the lab): the kernel's.
        assert_eq!(link_rate(3.9e6, Some(&k(4.8e9, false))), 4.8e9);
        // A thin link timed high (two probes sharing it): the kernel's, here too.
        assert_eq!(link_rate(3.9e6, Some(&k(2.4e6, false))), 2.4e6);
        // An app-limited sample is a lower bound.
        assert_eq!(link_rate(50e6, Some(&k(20e6, true))), 50e6);
        assert_eq!(link_rate(5e6, Some(&k(20e6, true))), 20e6);
        // Nothing from the kernel (a jump host's connection, nothing acknowledged): the timing.
        assert_eq!(link_rate(5e6, None), 5e6);
        assert_eq!(
            link_rate(
                5e6,
                Some(&crate::ssh::LinkInfo {
                    bytes_acked: 0,
                    ..k(9e9, false)
                })
            ),
            5e6
        );
        assert_eq!(
            level_for(
                Compress::Auto,
                Some(link_rate(3.9e6, Some(&k(4.8e9, false))))
            ),
            None
        );
    }

    #[test]
    fn the_level_follows_the_links_rate() {
        use Compress::*;
        assert_eq!(level_for(Never, Some(1e3)), None);
        assert_eq!(level_for(Auto, Some(1e9)), None);
        assert_eq!(level_for(Always, Some(1e9)), Some(1));
        assert_eq!(level_for(Auto, Some(20e6)), None);
        assert_eq!(level_for(Always, Some(20e6)), Some(1));
        assert_eq!(level_for(Auto, Some(8e6)), Some(3));
        assert_eq!(level_for(Auto, Some(2.5e6)), Some(6));
        assert_eq!(level_for(Auto, Some(1e5)), Some(12));
        assert_eq!(level_for(Auto, None), Some(3));
        assert_eq!(window_log(1, 0), 20);
        assert_eq!(window_log(40 << 20, 40 << 20), 27);
    }

    /// `len` pseudo-random bytes (xorshift from `seed`): incompressible, so that only a
    /// patch's base can supply matches.
    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// What [`stream`](super::stream) writes for `send`, at its level.
    async fn copy_out(send: &Send<'_>) -> Result<Vec<u8>, SendError> {
        let mut out = Vec::new();
        let (sent, written) = super::stream(
            "h",
            send,
            Some(send.level),
            &mut out,
            &CancellationToken::new(),
            &mut |_, _| {},
        )
        .await?;
        written.expect("written");
        assert_eq!(sent, out.len() as u64);
        Ok(out)
    }

    #[tokio::test]
    async fn a_patch_is_made_once_for_every_child_and_forgotten_when_it_is_not_the_artifact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = random_bytes(0x2545f4914f6cdd1d, 2_000_000);
        let mut new = old.clone();
        new[1000] ^= 1;
        let (old_path, new_path) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&old_path, &old).expect("write");
        std::fs::write(&new_path, &new).expect("write");
        let want = sha(&new);
        let send = Send {
            what: "artifact",
            local: &new_path,
            size: new.len() as u64,
            sha256: &want,
            mode: 0o600,
            level: 6,
            base: Some((old_path.clone(), "/remote/old".into())),
            receiver: "arbor",
            remote: "/remote/new",
        };
        let first = copy_out(&send).await.expect("first child");
        let dest = dir.path().join("out");
        let args = Receive {
            dest: dest.clone(),
            sha256: want.clone(),
            size: new.len() as u64,
            mode: 0o600,
            patch_from: Some(old_path.clone()),
            plain: false,
        };
        receive(&args, &first[..]).expect("patch");
        assert_eq!(std::fs::read(&dest).expect("read"), new);
        // The second child gets the same patch without the file being read again: with the
        // file changed under it, it is still the patch made from the artifact.
        std::fs::write(&new_path, &old).expect("write");
        let second = copy_out(&send).await.expect("second child");
        assert_eq!(second, first);
        // A patch made from bytes that are not the artifact is refused and forgotten.
        let other = "0".repeat(64);
        let changed = Send {
            sha256: &other,
            base: send.base.clone(),
            ..send
        };
        match copy_out(&changed).await {
            Err(SendError::Changed(why)) => assert!(why.contains("changed under"), "{why}"),
            got => panic!("{:?}", got.map(|o| o.len())),
        }
        let key = (other.clone(), old_path.clone(), 6);
        assert!(!PATCHES.lock().expect("memo").contains_key(&key));
    }

    #[test]
    fn a_stream_and_a_patch_are_received_only_when_the_result_is_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Pseudo-random, so that nothing but the base can supply matches.
        let old = random_bytes(0x9e3779b97f4a7c15, 3_000_000);
        let mut new = old.clone();
        for i in (0..new.len()).step_by(100_000) {
            new[i] ^= 0x5a;
        }
        new.extend_from_slice(b"version 2");
        let (old_path, new_path) = (dir.path().join("old"), dir.path().join("new"));
        std::fs::write(&old_path, &old).expect("write");
        std::fs::write(&new_path, &new).expect("write");
        let dest = dir.path().join("out");
        let args = Receive {
            dest: dest.clone(),
            sha256: sha(&new),
            size: new.len() as u64,
            mode: 0o640,
            patch_from: None,
            plain: false,
        };
        // Whole.
        let (whole, read) = stream(&new_path, new.len() as u64, 3, None);
        assert_eq!(read, sha(&new));
        receive(&args, &whole[..]).expect("receive");
        assert_eq!(std::fs::read(&dest).expect("read"), new);
        // A patch is a small fraction of the file.
        std::fs::remove_file(&dest).expect("rm");
        let (patch, _) = stream(&new_path, new.len() as u64, 6, Some(old_path.clone()));
        assert!(
            patch.len() < new.len() / 50,
            "patch of {} bytes",
            patch.len()
        );
        let patched = Receive {
            patch_from: Some(old_path.clone()),
            plain: false,
            ..args.clone()
        };
        receive(&patched, &patch[..]).expect("patch");
        assert_eq!(std::fs::read(&dest).expect("read"), new);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        // Against another base: refused, nothing written, nothing left.
        std::fs::remove_file(&dest).expect("rm");
        let other = dir.path().join("other");
        let mut o = old.clone();
        o[500] ^= 1;
        std::fs::write(&other, &o).expect("write");
        let wrong = Receive {
            patch_from: Some(other),
            plain: false,
            ..args.clone()
        };
        let err = receive(&wrong, &patch[..]).expect_err("wrong base");
        assert!(err.contains("want"), "{err}");
        assert!(!dest.exists());
        // A cut stream: refused.
        let err = receive(&args, &whole[..whole.len() / 2]);
        assert!(err.is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with(".arbor."))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
