//! Durability: an append-only write-ahead log with group commit, and snapshots that let the log
//! start over. See docs/store.md for why this and not an embedded database.
//!
//! On disk, in the data dir:
//! - `snapshot.pb`: the whole state as of log index N ([`SnapshotRecord`]), written to a temp
//!   file, fsynced and renamed, so it is either the old one or the new one, never torn;
//! - `wal-<first index>.log`: records with index > N, each framed as
//!   `len: u32 LE | crc32(payload): u32 LE | payload`;
//! - `lock`: held with flock(2) while a store uses the dir.
//!
//! One thread owns the log file. Writers hand it encoded records through a channel, in the order
//! they were applied; it takes everything queued, writes it in one `write`, calls `fdatasync`
//! once, and only then publishes the new durable index, which is what writers wait for before
//! they answer. Concurrent writes therefore share one fsync.
//!
//! A crash can tear only the batch being written, whose writers have not been answered, so only
//! a torn tail is truncated on recovery (as etcd's WAL does): in the last segment, a frame that
//! is incomplete (its header or payload runs past the end of the file), or one that fails its
//! checksum and either ends exactly at the end of the file or holds a zero-filled sector (a
//! write that never reached the disk, etcd's torn-write test). Any other bad frame is corruption
//! in the middle of the log: truncating there would silently drop acknowledged writes, so the
//! store refuses to start and names the file and byte offset (see [`Corruption`]).

use anyhow::{Context, bail};
use etcd_client::proto::PbKeyValue as KeyValue;
use prost::Message;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use super::metrics::Metrics;

/// The effects of one request, as logged.
#[derive(Clone, PartialEq, Message)]
pub struct WalRecord {
    #[prost(uint64, tag = "1")]
    pub index: u64,
    /// Versions written, in order; a tombstone (create_revision 0) is a delete.
    #[prost(message, repeated, tag = "2")]
    pub changes: Vec<KeyValue>,
    #[prost(message, repeated, tag = "3")]
    pub lease_grants: Vec<LeaseRecord>,
    #[prost(int64, repeated, tag = "4")]
    pub lease_revokes: Vec<i64>,
    /// A Compact request's revision, or 0.
    #[prost(int64, tag = "5")]
    pub compact: i64,
    /// Alarms raised (etcd's AlarmType values: 1 is NOSPACE).
    #[prost(int32, repeated, tag = "6")]
    pub alarms_raised: Vec<i32>,
    /// Alarms disarmed.
    #[prost(int32, repeated, tag = "7")]
    pub alarms_cleared: Vec<i32>,
}

impl WalRecord {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.lease_grants.is_empty()
            && self.lease_revokes.is_empty()
            && self.compact == 0
            && self.alarms_raised.is_empty()
            && self.alarms_cleared.is_empty()
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct LeaseRecord {
    #[prost(int64, tag = "1")]
    pub id: i64,
    #[prost(int64, tag = "2")]
    pub ttl: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct RevisionRecord {
    #[prost(message, repeated, tag = "1")]
    pub changes: Vec<KeyValue>,
}

/// The whole state at log index `index`.
#[derive(Clone, PartialEq, Message)]
pub struct SnapshotRecord {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(uint64, tag = "3")]
    pub index: u64,
    #[prost(int64, tag = "4")]
    pub current: i64,
    #[prost(int64, tag = "5")]
    pub compacted: i64,
    /// Versions older than `compacted` (what reads at `compacted` need).
    #[prost(message, repeated, tag = "6")]
    pub base: Vec<KeyValue>,
    /// Each retained revision's changes, oldest first.
    #[prost(message, repeated, tag = "7")]
    pub revisions: Vec<RevisionRecord>,
    #[prost(message, repeated, tag = "8")]
    pub leases: Vec<LeaseRecord>,
    /// Alarms raised and not disarmed.
    #[prost(int32, repeated, tag = "9")]
    pub alarms: Vec<i32>,
}

/// A [`SnapshotRecord`] whose versions are shared with the live state rather than copied:
/// taken under the state lock in the time it takes to bump reference counts, and encoded after
/// the lock is let go (by the log thread, or by the task streaming a backup).
pub struct SnapshotParts {
    pub cluster_id: u64,
    pub member_id: u64,
    pub index: u64,
    pub current: i64,
    pub compacted: i64,
    pub base: Vec<Arc<KeyValue>>,
    pub revisions: Vec<Vec<Arc<KeyValue>>>,
    pub leases: Vec<LeaseRecord>,
    pub alarms: Vec<i32>,
}

impl SnapshotParts {
    /// The length of each revision's encoded changes (a [`RevisionRecord`]'s body).
    pub fn revision_lens(&self) -> Vec<usize> {
        use prost::encoding::message;
        self.revisions
            .iter()
            .map(|changes| {
                changes
                    .iter()
                    .map(|kv| message::encoded_len(1, kv.as_ref()))
                    .sum()
            })
            .collect()
    }

    /// The length of [`Self::encode`]'s output, without encoding (`lens` from
    /// [`Self::revision_lens`]).
    pub fn encoded_len(&self, lens: &[usize]) -> usize {
        use prost::encoding::{self, message};
        let scalars = [
            (self.cluster_id != 0).then(|| encoding::uint64::encoded_len(1, &self.cluster_id)),
            (self.member_id != 0).then(|| encoding::uint64::encoded_len(2, &self.member_id)),
            (self.index != 0).then(|| encoding::uint64::encoded_len(3, &self.index)),
            (self.current != 0).then(|| encoding::int64::encoded_len(4, &self.current)),
            (self.compacted != 0).then(|| encoding::int64::encoded_len(5, &self.compacted)),
            (!self.alarms.is_empty()).then(|| encoding::int32::encoded_len_packed(9, &self.alarms)),
        ];
        scalars.into_iter().flatten().sum::<usize>()
            + self
                .base
                .iter()
                .map(|kv| message::encoded_len(6, kv.as_ref()))
                .sum::<usize>()
            + lens
                .iter()
                .map(|len| encoding::key_len(7) + encoding::encoded_len_varint(*len as u64) + len)
                .sum::<usize>()
            + self
                .leases
                .iter()
                .map(|l| message::encoded_len(8, l))
                .sum::<usize>()
    }

    /// The protobuf encoding of the [`SnapshotRecord`] these parts describe.
    pub fn encode(&self) -> Vec<u8> {
        let lens = self.revision_lens();
        let mut whole = Vec::with_capacity(self.encoded_len(&lens));
        self.encode_chunks(&lens, std::mem::take(&mut whole), usize::MAX, |chunk| {
            whole = chunk;
            true
        });
        whole
    }

    /// [`Self::encode`], handed out in pieces of about `chunk` bytes as they are made (the
    /// first starting with `prefix`), so a snapshot can be sent while it is encoded. Stops when
    /// `emit` returns false; returns whether every piece was taken.
    pub fn encode_chunks(
        &self,
        lens: &[usize],
        prefix: Vec<u8>,
        chunk: usize,
        mut emit: impl FnMut(Vec<u8>) -> bool,
    ) -> bool {
        use prost::encoding::{self, WireType, message};
        let mut buf = prefix;
        let fresh = || Vec::with_capacity(chunk.saturating_add(4096).min(8 << 20));
        macro_rules! full {
            () => {
                if buf.len() >= chunk && !emit(std::mem::replace(&mut buf, fresh())) {
                    return false;
                }
            };
        }
        if self.cluster_id != 0 {
            encoding::uint64::encode(1, &self.cluster_id, &mut buf);
        }
        if self.member_id != 0 {
            encoding::uint64::encode(2, &self.member_id, &mut buf);
        }
        if self.index != 0 {
            encoding::uint64::encode(3, &self.index, &mut buf);
        }
        if self.current != 0 {
            encoding::int64::encode(4, &self.current, &mut buf);
        }
        if self.compacted != 0 {
            encoding::int64::encode(5, &self.compacted, &mut buf);
        }
        for kv in &self.base {
            message::encode(6, kv.as_ref(), &mut buf);
            full!();
        }
        for (changes, len) in self.revisions.iter().zip(lens) {
            encoding::encode_key(7, WireType::LengthDelimited, &mut buf);
            encoding::encode_varint(*len as u64, &mut buf);
            for kv in changes {
                message::encode(1, kv.as_ref(), &mut buf);
                full!();
            }
        }
        for lease in &self.leases {
            message::encode(8, lease, &mut buf);
        }
        if !self.alarms.is_empty() {
            encoding::int32::encode_packed(9, &self.alarms, &mut buf);
        }
        emit(buf)
    }
}

const SNAPSHOT_FILE: &str = "snapshot.pb";
/// The first bytes of a data dir's snapshot (`snapshot.pb`).
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"ARBSNAP1";
/// The first bytes of a backup: the snapshot `etcdctl snapshot save` receives.
pub const BACKUP_MAGIC: &[u8; 8] = b"ARBSNAP2";

/// What the log thread reports after each fsync: everything up to `index` is durable, and the
/// newest durable revision is `revision`. `Err` means the log failed and stopped.
pub type Publish = Box<dyn Fn(Result<(u64, i64), String>) + Send>;

enum Item {
    /// Write what is queued before this, then let go of the log and the dir lock.
    Stop,
    Record {
        index: u64,
        revision: i64,
        bytes: Vec<u8>,
    },
    Snapshot {
        index: u64,
        revision: i64,
        parts: Box<SnapshotParts>,
        /// Told when the snapshot is in place (defragmentation waits for it).
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    },
}

/// The writers' side of the log.
pub struct Wal {
    tx: mpsc::Sender<Item>,
    /// Bytes in the current segment: when it grows past the threshold, the backend sends a
    /// snapshot, after which the log starts a new segment.
    pub segment_bytes: Arc<AtomicU64>,
    pub snapshot_pending: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What a data dir held at startup.
pub struct Recovered {
    pub snapshot: Option<SnapshotRecord>,
    pub records: Vec<WalRecord>,
    /// Torn bytes dropped from the end of the log.
    pub dropped_bytes: u64,
}

/// Log writer state, before its thread starts.
pub struct Opened {
    dir: PathBuf,
    lock: File,
    segment: File,
    segment_path: PathBuf,
    segment_bytes: u64,
}

/// Reads a data dir (creating it if needed): the snapshot, then every intact record after it.
pub fn open(dir: &Path) -> anyhow::Result<(Recovered, Opened)> {
    // The store has no authentication; its files are its owner's only.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))?;
    let lock = lock_dir(dir)?;
    let _ = fs::remove_file(dir.join(format!("{SNAPSHOT_FILE}.tmp")));
    let snapshot = read_snapshot(dir)?;
    let after = snapshot.as_ref().map_or(0, |s| s.index);

    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = name
            .strip_prefix("wal-")
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            segments.push((first, entry.path()));
        }
    }
    segments.sort();

    let mut records = Vec::new();
    let mut dropped_bytes = 0;
    let last = segments.len().saturating_sub(1);
    for (i, (_, path)) in segments.iter().enumerate() {
        let bytes = read_file(path)?;
        let (decoded, keep) = decode_segment(path, &bytes, i == last)?;
        if keep < bytes.len() {
            dropped_bytes = (bytes.len() - keep) as u64;
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening {} to drop its torn tail", path.display()))?;
            f.set_len(keep as u64)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("truncating the torn tail of {}", path.display()))?;
        }
        records.extend(decoded.into_iter().filter(|r| r.index > after));
    }

    let (segment_path, segment_bytes) = match segments.last() {
        Some((_, path)) => (
            path.clone(),
            fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        ),
        None => (segment_name(dir, after + 1), 0),
    };
    let segment = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&segment_path)
        .with_context(|| format!("opening log segment {}", segment_path.display()))?;
    sync_dir(dir)?;
    Ok((
        Recovered {
            snapshot,
            records,
            dropped_bytes,
        },
        Opened {
            dir: dir.to_path_buf(),
            lock,
            segment,
            segment_path,
            segment_bytes,
        },
    ))
}

impl Opened {
    /// Writes a snapshot synchronously (used once, for a fresh dir, so the store's ids are
    /// durable before it serves).
    pub fn write_snapshot(&mut self, snap: &SnapshotParts) -> anyhow::Result<()> {
        write_snapshot(&self.dir, &snap.encode())
    }

    /// Starts the log thread.
    pub fn start(self, publish: Publish, metrics: Arc<Metrics>) -> anyhow::Result<Wal> {
        let (tx, rx) = mpsc::channel();
        let segment_bytes = Arc::new(AtomicU64::new(self.segment_bytes));
        let snapshot_pending = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            _lock: self.lock,
            dir: self.dir,
            segment: self.segment,
            segment_path: self.segment_path,
            segment_bytes: segment_bytes.clone(),
            snapshot_pending: snapshot_pending.clone(),
            publish,
            metrics,
        };
        let thread = std::thread::Builder::new()
            .name("arbor-store-wal".into())
            .spawn(move || writer.run(rx))
            .context("starting the log thread")?;
        Ok(Wal {
            tx,
            segment_bytes,
            snapshot_pending,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }
}

impl Wal {
    /// Queues a record; its writer then waits for the published durable index to reach it.
    /// Fails only if the log thread has stopped.
    pub fn append(&self, index: u64, revision: i64, bytes: Vec<u8>) -> Result<(), String> {
        self.tx
            .send(Item::Record {
                index,
                revision,
                bytes,
            })
            .map_err(|_| "the log thread has stopped".to_string())
    }

    /// Writes everything queued, closes the log and releases the data dir, so another store can
    /// open it at once. Later appends fail.
    pub fn stop(&self) {
        let _ = self.tx.send(Item::Stop);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }

    /// Queues a snapshot covering every record up to `index` (the caller holds the state lock,
    /// so no later record is queued before it). `done` hears when it is in place.
    pub fn snapshot(
        &self,
        index: u64,
        revision: i64,
        parts: SnapshotParts,
        done: Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ) -> Result<(), String> {
        self.tx
            .send(Item::Snapshot {
                index,
                revision,
                parts: Box::new(parts),
                done,
            })
            .map_err(|_| "the log thread has stopped".to_string())
    }
}

struct Writer {
    /// The data dir lock lives as long as the thread that writes the log.
    _lock: File,
    dir: PathBuf,
    segment: File,
    segment_path: PathBuf,
    segment_bytes: Arc<AtomicU64>,
    snapshot_pending: Arc<AtomicBool>,
    publish: Publish,
    metrics: Arc<Metrics>,
}

/// Records taken per batch at most, so one fsync never waits on an unbounded write.
const MAX_BATCH: usize = 4096;

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Item>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            let stop = batch.iter().position(|i| matches!(i, Item::Stop));
            if let Some(at) = stop {
                batch.truncate(at);
            }
            let mut waiting = Vec::new();
            for item in &mut batch {
                if let Item::Snapshot { done, .. } = item {
                    waiting.extend(done.take());
                }
            }
            let result = self.write_batch(batch);
            for done in waiting {
                let _ = done.send(result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")));
            }
            if let Err(e) = result {
                tracing::error!("store: write-ahead log failed: {e:#}");
                (self.publish)(Err(format!("{e:#}")));
                return;
            }
            if stop.is_some() {
                (self.publish)(Err("the store has shut down".to_string()));
                return;
            }
        }
    }

    fn write_batch(&mut self, batch: Vec<Item>) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        let mut durable: Option<(u64, i64)> = None;
        for item in batch {
            match item {
                Item::Record {
                    index,
                    revision,
                    bytes,
                } => {
                    frame(&mut buf, &bytes)?;
                    durable = Some(max_durable(durable, index, revision));
                }
                Item::Stop => {}
                Item::Snapshot {
                    index,
                    revision,
                    parts,
                    ..
                } => {
                    self.flush(&mut buf)?;
                    let started = std::time::Instant::now();
                    self.rotate(index, &parts.encode())?;
                    self.metrics.snapshot_write.observe(started.elapsed());
                    durable = Some(max_durable(durable, index, revision));
                }
            }
        }
        self.flush(&mut buf)?;
        if let Some(d) = durable {
            (self.publish)(Ok(d));
        }
        Ok(())
    }

    fn flush(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.segment
            .write_all(buf)
            .and_then(|()| {
                let started = std::time::Instant::now();
                let synced = self.segment.sync_data();
                self.metrics.wal_fsync.observe(started.elapsed());
                synced
            })
            .with_context(|| format!("appending to {}", self.segment_path.display()))?;
        self.segment_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.metrics
            .wal_write_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.clear();
        Ok(())
    }

    /// Makes `snapshot` the base of the log and starts a new, empty segment after it.
    fn rotate(&mut self, index: u64, snapshot: &[u8]) -> anyhow::Result<()> {
        write_snapshot(&self.dir, snapshot)?;
        let path = segment_name(&self.dir, index + 1);
        let segment = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating log segment {}", path.display()))?;
        sync_dir(&self.dir)?;
        let old = std::mem::replace(&mut self.segment_path, path);
        self.segment = segment;
        if old != self.segment_path {
            fs::remove_file(&old)
                .with_context(|| format!("removing old log segment {}", old.display()))?;
        }
        self.segment_bytes.store(0, Ordering::Relaxed);
        self.snapshot_pending.store(false, Ordering::Relaxed);
        Ok(())
    }
}

fn max_durable(d: Option<(u64, i64)>, index: u64, revision: i64) -> (u64, i64) {
    match d {
        Some((i, r)) => (i.max(index), r.max(revision)),
        None => (index, revision),
    }
}

fn segment_name(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("wal-{first_index:020}.log"))
}

/// Appends `len | crc32 | payload`. A length that does not fit the u32 header is an error, not
/// a silently truncated frame.
fn frame(buf: &mut Vec<u8>, payload: &[u8]) -> anyhow::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| anyhow::anyhow!("a record of {} bytes is too large to log", payload.len()))?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

/// Decodes the bytes of the log segment `path` as recovery does: its records, and how many of
/// its bytes to keep. Only the last segment (`last`) may lose a torn tail (then fewer bytes are
/// kept than given); any other damage is a [`Corruption`], and an intact frame that is not a
/// record is an error too. Pure: the caller truncates the file.
pub fn decode_segment(
    path: &Path,
    bytes: &[u8],
    last: bool,
) -> anyhow::Result<(Vec<WalRecord>, usize)> {
    let (frames, good) = parse_frames(bytes);
    if good < bytes.len() {
        if !last {
            bail!(Corruption {
                file: path.to_path_buf(),
                offset: good as u64,
                what: format!(
                    "{} (in a log segment that is not the last)",
                    frame_fault(bytes, good)
                ),
            });
        }
        if !is_torn_tail(bytes, good) {
            bail!(Corruption {
                file: path.to_path_buf(),
                offset: good as u64,
                what: format!(
                    "{}, and {} bytes of log follow it",
                    frame_fault(bytes, good),
                    bytes.len() - frame_end(bytes, good)
                ),
            });
        }
    }
    let mut records = Vec::with_capacity(frames.len());
    let mut offset = 0;
    for frame in frames {
        let record = WalRecord::decode(frame).with_context(|| {
            format!(
                "{}: undecodable record at byte offset {offset}",
                path.display()
            )
        })?;
        offset += 8 + frame.len();
        records.push(record);
    }
    Ok((records, good))
}

/// A damaged record in the middle of the log: the store refuses to start rather than drop the
/// acknowledged writes after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub file: PathBuf,
    /// Where the damaged record's frame starts.
    pub offset: u64,
    pub what: String,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write-ahead log {} is corrupt at byte offset {}: {}; refusing to start, since \
             truncating the log there would silently drop acknowledged writes (restore the data \
             dir from a backup, or move it away to start empty)",
            self.file.display(),
            self.offset,
            self.what
        )
    }
}

impl std::error::Error for Corruption {}

/// The size of the sectors a torn write leaves zero-filled (etcd's `minSectorSize`).
const SECTOR: usize = 512;

/// Where the frame at `pos` ends: past its payload, or at the end of the file when it claims
/// more than the file holds.
fn frame_end(bytes: &[u8], pos: usize) -> usize {
    match bytes.get(pos..pos + 8) {
        Some(header) => {
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            pos.saturating_add(8).saturating_add(len).min(bytes.len())
        }
        None => bytes.len(),
    }
}

/// What is wrong with the frame at `pos` (the first one that is not intact).
fn frame_fault(bytes: &[u8], pos: usize) -> String {
    match bytes.get(pos..pos + 8) {
        None => format!("an incomplete record header ({} bytes)", bytes.len() - pos),
        Some(header) => {
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if pos + 8 + len > bytes.len() {
                format!(
                    "a record of {len} bytes of which only {} are in the file",
                    bytes.len() - pos - 8
                )
            } else {
                format!("a record of {len} bytes fails its checksum (CRC-32 mismatch)")
            }
        }
    }
}

/// Whether the damaged frame at `pos` (in the last segment) is a torn tail: the unfinished write
/// of a batch that was never acknowledged. It is when the frame is incomplete (a header or a
/// payload cut short by the end of the file) and no intact record follows its header (one
/// would mean a damaged length in the middle of the log, not a short write), when it fails its
/// checksum and ends exactly at the end of the file, or, as etcd judges a torn write, when a
/// sector's worth of its payload (split at the file's 512-byte sector boundaries) is all zeros.
fn is_torn_tail(bytes: &[u8], pos: usize) -> bool {
    let Some(header) = bytes.get(pos..pos + 8) else {
        return true;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let start = pos + 8;
    let Some(end) = start.checked_add(len).filter(|end| *end <= bytes.len()) else {
        return !intact_frame_within(&bytes[start..]);
    };
    if end == bytes.len() {
        return true;
    }
    let mut at = start;
    while at < end {
        let chunk_end = ((at / SECTOR + 1) * SECTOR).min(end);
        if bytes[at..chunk_end].iter().all(|b| *b == 0) {
            return true;
        }
        at = chunk_end;
    }
    false
}

/// Whether `bytes` holds, at any offset, a whole non-empty frame whose checksum matches: after an
/// incomplete frame, the sign that its length field is damaged and the log goes on. Hashes at
/// most 64 MiB in all, then answers no.
fn intact_frame_within(bytes: &[u8]) -> bool {
    let mut budget: usize = 64 << 20;
    for at in 0..bytes.len().saturating_sub(8) {
        let h = &bytes[at..at + 8];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        if len == 0 || len > bytes.len() - at - 8 {
            continue;
        }
        if len > budget {
            return false;
        }
        budget -= len;
        if crc32fast::hash(&bytes[at + 8..at + 8 + len]) == crc {
            return true;
        }
    }
    false
}

/// Splits a log into its intact frames; returns them and the length of the intact prefix.
fn parse_frames(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0;
    while let Some(header) = bytes.get(pos..pos + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(payload) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        frames.push(payload);
        pos += 8 + len;
    }
    (frames, pos)
}

fn read_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

fn read_snapshot(dir: &Path) -> anyhow::Result<Option<SnapshotRecord>> {
    let path = dir.join(SNAPSHOT_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_file(&path)?;
    let snap = decode_snapshot(&bytes).with_context(|| format!("{}", path.display()))?;
    Ok(Some(snap))
}

/// The 16 bytes a data dir's `snapshot.pb` starts with: [`SNAPSHOT_MAGIC`], then the
/// payload's length and crc32, each u32 little-endian. The payload (a [`SnapshotRecord`])
/// follows, and nothing else.
pub fn snapshot_header(payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        anyhow::anyhow!(
            "a snapshot of {} bytes is larger than the format's 4 GiB",
            payload.len()
        )
    })?;
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(SNAPSHOT_MAGIC);
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    Ok(header)
}

/// Bytes of the sha256 that ends a backup.
pub const SHA256_BYTES: usize = 32;
/// A backup's length is a multiple of this plus the sha256: etcdctl 3.4's `snapshot save`
/// refuses a file that is not so (it expects etcd's page-sized database and its sha256).
const BACKUP_ALIGN: usize = 512;

/// A backup is [`BACKUP_MAGIC`], the payload's length (u64 little-endian), the payload (a
/// [`SnapshotRecord`]), zeros up to a multiple of 512 bytes, and the sha256 of everything
/// before it. The length is known before the payload is encoded, so a backup streams while it
/// is made; the sha256 comes last for the same reason.
pub fn backup_header(payload_len: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(16);
    header.extend_from_slice(BACKUP_MAGIC);
    header.extend_from_slice(&payload_len.to_le_bytes());
    header
}

/// The zeros between a backup's payload and its sha256.
pub fn backup_padding(payload_len: u64) -> usize {
    let body = (16 + payload_len) % BACKUP_ALIGN as u64;
    (BACKUP_ALIGN - body as usize) % BACKUP_ALIGN
}

/// Why bytes are not a usable snapshot. The messages are what an operator restoring a file
/// reads, so each says what is wrong with the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error(
        "this is an etcd snapshot (a bbolt database), not an arbor store snapshot; arbor cannot \
         read etcd's format (restore it into an etcd with `etcdctl snapshot restore`, or copy \
         the keys over with etcdctl)"
    )]
    Etcd,
    #[error("not an arbor store snapshot: it starts with neither \"ARBSNAP2\" nor \"ARBSNAP1\"")]
    NotASnapshot,
    #[error("truncated: {0} bytes, shorter than the 16-byte snapshot header")]
    NoHeader(usize),
    #[error("truncated: the header announces {announced} bytes of state, the file holds {held}")]
    Truncated { announced: u64, held: u64 },
    #[error(
        "truncated: the file ends inside its checksum trailer ({held} of {expected} bytes after \
         the state)"
    )]
    TruncatedTrailer { expected: u64, held: u64 },
    #[error("{0} unexpected bytes after the end of the snapshot")]
    Trailing(u64),
    #[error("corrupt: its {what} does not match (computed {computed}, the file says {recorded})")]
    Checksum {
        what: &'static str,
        computed: String,
        recorded: String,
    },
    #[error("corrupt: the state passes its checksum but does not decode ({0})")]
    Undecodable(String),
    #[error("corrupt: {0}")]
    Inconsistent(String),
}

/// Checks and decodes a snapshot: a backup ([`backup_header`]) or a data dir's `snapshot.pb`
/// ([`snapshot_header`]).
pub fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotRecord, SnapshotError> {
    use sha2::Digest;
    const BBOLT_MAGIC: u32 = 0xED0C_DAED;
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let payload = if bytes.starts_with(BACKUP_MAGIC) {
        let Some(len) = bytes
            .get(8..16)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        else {
            return Err(SnapshotError::NoHeader(bytes.len()));
        };
        let held = (bytes.len() - 16) as u64;
        if held < len {
            return Err(SnapshotError::Truncated {
                announced: len,
                held,
            });
        }
        let expected = (backup_padding(len) + SHA256_BYTES) as u64;
        let after = held - len;
        if after < expected {
            return Err(SnapshotError::TruncatedTrailer {
                expected,
                held: after,
            });
        }
        if after > expected {
            return Err(SnapshotError::Trailing(after - expected));
        }
        let (content, recorded) = bytes.split_at(bytes.len() - SHA256_BYTES);
        let computed = sha2::Sha256::digest(content);
        if computed.as_slice() != recorded {
            return Err(SnapshotError::Checksum {
                what: "sha256",
                computed: data_encoding::HEXLOWER.encode(&computed),
                recorded: data_encoding::HEXLOWER.encode(recorded),
            });
        }
        &bytes[16..16 + len as usize]
    } else if bytes.starts_with(SNAPSHOT_MAGIC) {
        let (Some(len), Some(crc)) = (u32_at(8), u32_at(12)) else {
            return Err(SnapshotError::NoHeader(bytes.len()));
        };
        let held = (bytes.len() - 16) as u64;
        let len = u64::from(len);
        if held < len {
            return Err(SnapshotError::Truncated {
                announced: len,
                held,
            });
        }
        if held > len {
            return Err(SnapshotError::Trailing(held - len));
        }
        let payload = &bytes[16..];
        let computed = crc32fast::hash(payload);
        if computed != crc {
            return Err(SnapshotError::Checksum {
                what: "crc32",
                computed: format!("{computed:08x}"),
                recorded: format!("{crc:08x}"),
            });
        }
        payload
    } else if u32_at(16) == Some(BBOLT_MAGIC) {
        return Err(SnapshotError::Etcd);
    } else if bytes.len() < 8
        && (BACKUP_MAGIC.starts_with(bytes) || SNAPSHOT_MAGIC.starts_with(bytes))
    {
        return Err(SnapshotError::NoHeader(bytes.len()));
    } else {
        return Err(SnapshotError::NotASnapshot);
    };
    let snap =
        SnapshotRecord::decode(payload).map_err(|e| SnapshotError::Undecodable(e.to_string()))?;
    check_snapshot(&snap).map_err(SnapshotError::Inconsistent)?;
    Ok(snap)
}

/// A whole backup of `parts`, in one piece (for tests; the server streams it).
#[cfg(test)]
pub fn backup(parts: &SnapshotParts) -> Vec<u8> {
    use sha2::Digest;
    let payload = parts.encode();
    let mut file = backup_header(payload.len() as u64);
    file.extend_from_slice(&payload);
    file.resize(file.len() + backup_padding(payload.len() as u64), 0);
    let sha = sha2::Sha256::digest(&file);
    file.extend_from_slice(&sha);
    file
}

/// What a snapshot must hold for a store to start from it.
fn check_snapshot(snap: &SnapshotRecord) -> Result<(), String> {
    if snap.current < 1 || snap.compacted < 0 || snap.compacted > snap.current {
        return Err(format!(
            "revision {} with compaction at {} is impossible",
            snap.current, snap.compacted
        ));
    }
    if let Some(kv) = snap
        .base
        .iter()
        .find(|kv| kv.mod_revision >= snap.compacted)
    {
        return Err(format!(
            "a compacted version at revision {} is past the compaction at {}",
            kv.mod_revision, snap.compacted
        ));
    }
    let mut last = 0;
    for kv in snap.revisions.iter().flat_map(|r| &r.changes) {
        // The history starts at the compaction: what is older is `base`'s (restored, a version
        // in both would be written to `base` by every snapshot after, once more each time).
        if kv.mod_revision < snap.compacted {
            return Err(format!(
                "the history holds revision {}, from before the compaction at {}",
                kv.mod_revision, snap.compacted
            ));
        }
        if kv.key.is_empty() || kv.mod_revision < last || kv.mod_revision > snap.current {
            return Err(format!(
                "the history is out of order at revision {} (store revision {})",
                kv.mod_revision, snap.current
            ));
        }
        last = kv.mod_revision;
    }
    Ok(())
}

/// Makes `dir` a data dir holding only `snap` (for `arbor store restore`): the dir must not
/// exist or be empty. A store started on it replays nothing and starts a new log after it.
pub fn create_from_snapshot(dir: &Path, snap: &SnapshotRecord) -> anyhow::Result<()> {
    if let Ok(mut entries) = fs::read_dir(dir)
        && entries.next().is_some()
    {
        bail!(
            "{} is not empty; restore into a new or empty directory (a store's data dir is never \
             overwritten)",
            dir.display()
        );
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))?;
    let _lock = lock_dir(dir)?;
    write_snapshot(dir, &snap.encode_to_vec())
}

/// Writes `snapshot.pb` atomically.
fn write_snapshot(dir: &Path, payload: &[u8]) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let header = snapshot_header(payload)?;
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&header)
                .and_then(|()| f.write_all(payload))
                .and_then(|()| f.sync_all())
        })
        .with_context(|| format!("writing snapshot {}", tmp.display()))?;
    fs::rename(&tmp, dir.join(SNAPSHOT_FILE))
        .with_context(|| format!("installing snapshot in {}", dir.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Takes an exclusive lock on the data dir, so two stores never write one log.
fn lock_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "data dir {} is in use by another store (its lock file is held)",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            bail!("locking data dir {}: {e}", dir.display())
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: u64, key: &str) -> WalRecord {
        WalRecord {
            index,
            changes: vec![KeyValue {
                key: key.into(),
                create_revision: 2,
                mod_revision: index as i64 + 1,
                version: 1,
                value: b"v".to_vec(),
                lease: 0,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn torn_and_corrupt_tails_end_the_log_without_panicking() {
        let mut buf = Vec::new();
        for i in 1..=3 {
            frame(&mut buf, &record(i, "k").encode_to_vec()).unwrap();
        }
        let whole = buf.len();
        for cut in 0..whole {
            let (frames, good) = parse_frames(&buf[..cut]);
            assert!(good <= cut);
            assert!(frames.len() < 3, "cut at {cut}");
        }
        let mut flipped = buf.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        assert_eq!(parse_frames(&flipped).0.len(), 2);
        let mut huge_len = buf.clone();
        huge_len.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_frames(&huge_len), (parse_frames(&buf).0, whole));
    }

    #[test]
    fn acknowledged_records_survive_reopen_and_a_torn_tail_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let (rec, opened) = open(dir.path()).unwrap();
        assert!(rec.snapshot.is_none() && rec.records.is_empty());
        let (done_tx, done_rx) = mpsc::channel();
        let wal = opened
            .start(
                Box::new(move |d| {
                    let _ = done_tx.send(d);
                }),
                Arc::new(Metrics::default()),
            )
            .unwrap();
        for i in 1..=3 {
            wal.append(i, i as i64 + 1, record(i, "k").encode_to_vec())
                .unwrap();
        }
        let mut durable = 0;
        while durable < 3 {
            durable = done_rx.recv().unwrap().unwrap().0;
        }
        drop(wal);
        // A crash in the middle of the next batch: half a frame at the end.
        let seg = segment_name(dir.path(), 1);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        // The lock is released with the log thread; wait for it.
        let (rec, _opened) = loop {
            match open(dir.path()) {
                Ok(r) => break r,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        assert_eq!(rec.dropped_bytes, 6);
        let indexes: Vec<u64> = rec.records.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [1, 2, 3]);
    }

    /// A log segment of `n` framed records (indexes 1..=n) in a fresh dir, and the offsets
    /// where each frame starts (plus the end).
    fn segment_of(n: u64, value_len: usize) -> (tempfile::TempDir, PathBuf, Vec<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for i in 1..=n {
            starts.push(buf.len());
            let mut r = record(i, "k");
            r.changes[0].value = vec![b'v'; value_len];
            frame(&mut buf, &r.encode_to_vec()).unwrap();
        }
        starts.push(buf.len());
        let seg = segment_name(dir.path(), 1);
        std::fs::write(&seg, &buf).unwrap();
        (dir, seg, starts)
    }

    fn corruption(dir: &Path) -> Corruption {
        let err = match open(dir) {
            Ok(_) => panic!("opened a log corrupt in the middle"),
            Err(e) => e,
        };
        err.downcast_ref::<Corruption>()
            .unwrap_or_else(|| panic!("not a Corruption: {err:#}"))
            .clone()
    }

    fn indexes(rec: &Recovered) -> Vec<u64> {
        rec.records.iter().map(|r| r.index).collect()
    }

    #[test]
    fn a_corrupt_record_in_the_middle_refuses_to_start_naming_file_and_offset() {
        let (dir, seg, starts) = segment_of(3, 10);
        let before = std::fs::read(&seg).unwrap();
        let mut bytes = before.clone();
        bytes[starts[1] + 12] ^= 0x01; // a payload byte of record 2
        std::fs::write(&seg, &bytes).unwrap();
        let c = corruption(dir.path());
        assert_eq!(c.file, seg);
        assert_eq!(c.offset, starts[1] as u64);
        let msg = c.to_string();
        assert!(
            msg.contains(&format!(
                "{} is corrupt at byte offset {}",
                seg.display(),
                starts[1]
            )),
            "{msg}"
        );
        assert!(msg.contains("checksum"), "{msg}");
        assert!(
            msg.contains(&format!("{} bytes of log follow it", starts[3] - starts[2])),
            "{msg}"
        );
        // Nothing was truncated: the evidence stays for whoever repairs it.
        assert_eq!(std::fs::read(&seg).unwrap(), bytes);

        // A damaged length that makes record 2 look longer than the file is caught too.
        let mut bytes = before.clone();
        bytes[starts[1] + 2] = 0x7f;
        std::fs::write(&seg, &bytes).unwrap();
        let c = corruption(dir.path());
        assert_eq!(c.offset, starts[1] as u64);
        assert!(c.to_string().contains("only"), "{c}");

        // A bad record 1 with two after it, too.
        let mut bytes = before;
        bytes[starts[0] + 4] ^= 0xff; // its stored CRC
        std::fs::write(&seg, &bytes).unwrap();
        assert_eq!(corruption(dir.path()).offset, 0);
    }

    #[test]
    fn a_corrupt_segment_that_is_not_the_last_refuses_to_start() {
        let (dir, seg, starts) = segment_of(2, 10);
        let mut bytes = std::fs::read(&seg).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01; // a bad last record, but a later segment exists
        std::fs::write(&seg, &bytes).unwrap();
        let mut next = Vec::new();
        frame(&mut next, &record(3, "k").encode_to_vec()).unwrap();
        std::fs::write(segment_name(dir.path(), 3), &next).unwrap();
        let c = corruption(dir.path());
        assert_eq!((c.file, c.offset), (seg, starts[1] as u64));
        assert!(c.what.contains("not the last"), "{}", c.what);
    }

    fn reopen_torn(bytes: &[u8], dir: &Path, seg: &Path) -> Recovered {
        std::fs::write(seg, bytes).unwrap();
        let (rec, _opened) = open(dir).unwrap_or_else(|e| panic!("{e:#}"));
        rec
    }

    #[test]
    fn only_a_torn_tail_is_truncated() {
        let (dir, seg, starts) = segment_of(3, 10);
        let whole = std::fs::read(&seg).unwrap();
        // The last record cut short, anywhere in its header or payload.
        for cut in starts[2] + 1..starts[3] {
            let rec = reopen_torn(&whole[..cut], dir.path(), &seg);
            assert_eq!(indexes(&rec), [1, 2], "cut at {cut}");
            assert_eq!(rec.dropped_bytes, (cut - starts[2]) as u64);
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), starts[2] as u64);
        }
        // A bad last record that ends exactly at the end of the file.
        let mut bytes = whole.clone();
        bytes[starts[3] - 1] ^= 0x01;
        let rec = reopen_torn(&bytes, dir.path(), &seg);
        assert_eq!(indexes(&rec), [1, 2]);
        assert_eq!(rec.dropped_bytes, (starts[3] - starts[2]) as u64);
        // Intact: nothing dropped.
        let rec = reopen_torn(&whole, dir.path(), &seg);
        assert_eq!((indexes(&rec), rec.dropped_bytes), (vec![1, 2, 3], 0));
    }

    #[test]
    fn a_torn_batch_with_a_zeroed_sector_is_a_torn_tail() {
        // Records of ~2 KiB: record 2 spans whole sectors. A crash left one of its sectors
        // unwritten (zeros) while the file already had record 3 after it, all in one
        // unacknowledged batch.
        let (dir, seg, starts) = segment_of(3, 2000);
        let mut bytes = std::fs::read(&seg).unwrap();
        let sector = (starts[1] / SECTOR + 2) * SECTOR;
        assert!(sector + SECTOR <= starts[2]);
        bytes[sector..sector + SECTOR].fill(0);
        let rec = reopen_torn(&bytes, dir.path(), &seg);
        assert_eq!(indexes(&rec), [1]);
        assert_eq!(rec.dropped_bytes, (starts[3] - starts[1]) as u64);
    }

    #[test]
    fn writes_queued_during_an_fsync_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let (_, opened) = open(dir.path()).unwrap();
        let (published_tx, published_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let wal = opened
            .start(
                Box::new(move |d| {
                    let index = d.unwrap().0;
                    let _ = published_tx.send(index);
                    if index == 1 {
                        // Hold the log thread, as a slow fsync would, while writers queue up.
                        let _ = release_rx.lock().unwrap().recv();
                    }
                }),
                Arc::new(Metrics::default()),
            )
            .unwrap();
        wal.append(1, 2, record(1, "a").encode_to_vec()).unwrap();
        assert_eq!(published_rx.recv().unwrap(), 1);
        for i in 2..=50 {
            wal.append(i, i as i64 + 1, record(i, "a").encode_to_vec())
                .unwrap();
        }
        release_tx.send(()).unwrap();
        assert_eq!(
            published_rx.recv().unwrap(),
            50,
            "49 writes, one batch, one fsync"
        );
    }

    #[test]
    fn a_snapshot_replaces_the_log_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_, opened) = open(dir.path()).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let wal = opened
            .start(
                Box::new(move |d| {
                    let _ = done_tx.send(d);
                }),
                Arc::new(Metrics::default()),
            )
            .unwrap();
        wal.append(1, 2, record(1, "a").encode_to_vec()).unwrap();
        let parts = SnapshotParts {
            cluster_id: 0,
            member_id: 0,
            index: 1,
            current: 2,
            compacted: 0,
            base: vec![],
            revisions: vec![vec![Arc::new(record(1, "a").changes[0].clone())]],
            leases: vec![],
            alarms: vec![],
        };
        let (done, placed) = tokio::sync::oneshot::channel();
        wal.snapshot(1, 2, parts, Some(done)).unwrap();
        assert_eq!(placed.blocking_recv().unwrap(), Ok(()));
        wal.append(2, 3, record(2, "b").encode_to_vec()).unwrap();
        let mut durable = 0;
        while durable < 2 {
            durable = done_rx.recv().unwrap().unwrap().0;
        }
        drop(wal);
        let (rec, _opened) = loop {
            match open(dir.path()) {
                Ok(r) => break r,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        assert_eq!(rec.snapshot.map(|s| s.index), Some(1));
        let indexes: Vec<u64> = rec.records.iter().map(|r| r.index).collect();
        assert_eq!(indexes, [2]);
        assert!(!segment_name(dir.path(), 1).exists(), "old segment removed");
        use std::os::unix::fs::PermissionsExt;
        for entry in fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is its owner's only", path.display());
        }
    }

    #[test]
    fn snapshot_parts_encode_as_the_record_they_describe() {
        let kv = |key: &str, rev: i64| {
            Arc::new(KeyValue {
                key: key.into(),
                create_revision: 2,
                mod_revision: rev,
                version: 1,
                value: b"v".to_vec(),
                lease: 0,
            })
        };
        let parts = SnapshotParts {
            cluster_id: 7,
            member_id: 8,
            index: 9,
            current: 5,
            compacted: 3,
            base: vec![kv("a", 2)],
            revisions: vec![vec![kv("b", 3), kv("c", 3)], vec![], vec![kv("d", 5)]],
            leases: vec![LeaseRecord { id: 4, ttl: 60 }],
            alarms: vec![1],
        };
        let record = SnapshotRecord::decode(parts.encode().as_slice()).unwrap();
        let owned = |kvs: &[Arc<KeyValue>]| kvs.iter().map(|kv| KeyValue::clone(kv)).collect();
        assert_eq!(
            record,
            SnapshotRecord {
                cluster_id: 7,
                member_id: 8,
                index: 9,
                current: 5,
                compacted: 3,
                base: owned(&parts.base),
                revisions: parts
                    .revisions
                    .iter()
                    .map(|r| RevisionRecord { changes: owned(r) })
                    .collect(),
                leases: parts.leases.clone(),
                alarms: vec![1],
            }
        );
    }

    #[test]
    fn a_damaged_snapshot_file_is_refused_with_what_is_wrong() {
        let kv = record(2, "k").changes[0].clone();
        let parts = SnapshotParts {
            cluster_id: 1,
            member_id: 2,
            index: 3,
            current: 4,
            compacted: 2,
            base: vec![],
            revisions: vec![vec![Arc::new(kv.clone())]],
            leases: vec![],
            alarms: vec![],
        };
        let record = SnapshotRecord {
            cluster_id: 1,
            member_id: 2,
            index: 3,
            current: 4,
            compacted: 2,
            revisions: vec![RevisionRecord { changes: vec![kv] }],
            ..Default::default()
        };
        let payload = record.encode_to_vec();
        let file = backup(&parts);
        assert_eq!(file.len() % 512, 32, "etcdctl 3.4 checks this");
        assert!(file.starts_with(BACKUP_MAGIC));
        assert_eq!(decode_snapshot(&file), Ok(record.clone()));
        let mut bare = snapshot_header(&payload).unwrap();
        bare.extend_from_slice(&payload);
        assert_eq!(
            decode_snapshot(&bare),
            Ok(record),
            "a data dir's snapshot.pb"
        );
        assert_eq!(
            decode_snapshot(&file[..16 + payload.len() - 1]),
            Err(SnapshotError::Truncated {
                announced: payload.len() as u64,
                held: payload.len() as u64 - 1
            })
        );
        assert_eq!(
            decode_snapshot(&bare[..bare.len() - 1]),
            Err(SnapshotError::Truncated {
                announced: payload.len() as u64,
                held: payload.len() as u64 - 1
            })
        );
        assert!(matches!(
            decode_snapshot(&file[..file.len() - 1]),
            Err(SnapshotError::TruncatedTrailer { .. })
        ));
        assert_eq!(
            decode_snapshot(&file[..10]),
            Err(SnapshotError::NoHeader(10))
        );
        assert_eq!(decode_snapshot(&file[..3]), Err(SnapshotError::NoHeader(3)));
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(decode_snapshot(&longer), Err(SnapshotError::Trailing(1)));
        for at in [20, 16 + payload.len() - 1, file.len() - 40, file.len() - 1] {
            let mut flipped = file.clone();
            flipped[at] ^= 0x40;
            assert!(
                matches!(
                    decode_snapshot(&flipped),
                    Err(SnapshotError::Checksum { what: "sha256", .. })
                ),
                "a flipped bit at {at}"
            );
        }
        let mut flipped = bare.clone();
        flipped[20] ^= 0x40;
        assert!(matches!(
            decode_snapshot(&flipped),
            Err(SnapshotError::Checksum { what: "crc32", .. })
        ));
        assert_eq!(decode_snapshot(b"hello"), Err(SnapshotError::NotASnapshot));
        let mut bolt = vec![0u8; 4096];
        bolt[16..20].copy_from_slice(&0xED0C_DAEDu32.to_le_bytes());
        assert_eq!(decode_snapshot(&bolt), Err(SnapshotError::Etcd));
        let err = SnapshotError::Truncated {
            announced: 10,
            held: 4,
        };
        assert_eq!(
            err.to_string(),
            "truncated: the header announces 10 bytes of state, the file holds 4"
        );
    }

    #[test]
    fn snapshot_parts_encode_in_pieces_as_announced() {
        let kvs: Vec<Arc<KeyValue>> = (0..500)
            .map(|i| Arc::new(record(i + 1, &format!("key/{i}")).changes[0].clone()))
            .collect();
        let parts = SnapshotParts {
            cluster_id: 1,
            member_id: 2,
            index: 500,
            current: 502,
            compacted: 100,
            base: kvs[..50].to_vec(),
            revisions: kvs[50..].chunks(7).map(<[_]>::to_vec).collect(),
            leases: vec![LeaseRecord { id: 9, ttl: 10 }],
            alarms: vec![1],
        };
        let whole = parts.encode();
        let lens = parts.revision_lens();
        assert_eq!(parts.encoded_len(&lens), whole.len());
        let mut pieces = Vec::new();
        assert!(parts.encode_chunks(&lens, b"head".to_vec(), 1000, |p| {
            pieces.push(p);
            true
        }));
        assert!(pieces.len() > 10);
        assert!(pieces[..pieces.len() - 1].iter().all(|p| p.len() >= 1000));
        assert_eq!(pieces.concat(), [b"head".as_slice(), &whole].concat());
        let mut taken = 0;
        assert!(!parts.encode_chunks(&lens, vec![], 1000, |_| {
            taken += 1;
            taken < 3
        }));
        assert_eq!(taken, 3, "encoding stops when the pieces are refused");
    }
}
