//! A host's cache, bounded: `~/.cache/arbor/{bin,artifacts}` (XDG_CACHE_HOME respected) hold
//! at most `--cache-max-size` bytes of entries no run is using, the least recently used
//! evicted first (docs/remote.md, "Artifacts", "The cache's size").
//!
//! - **Entries.** `artifacts/<sha256>` (a file) and `bin/<sha256>/` (a dir: `arbor`, and the
//!   `arbor.gz` a relay keeps). Anything else is not an entry: upload temp files
//!   (`.<name>.arbor-<random>`) are partial writes, left alone while young, and removed as
//!   debris after [`DEBRIS_AGE`]; a `bin/<sha256>/` without its `arbor` is one being written.
//! - **Use time.** An entry's mtime. The parent's probe touches an entry it finds intact
//!   (`touch -c`), an upload makes a fresh one, and a node touches every entry it needs when it
//!   starts ([`Lease::take`]).
//! - **Never evicted:** what this node's run needs (its own build, the run's builds, its own
//!   and its subtree's artifacts); what any other live run on the host needs (each node holds
//!   a lease: `leases/<pid>-<random>`, listing its entries, `flock`ed for the node's life, so a
//!   crashed node's lease is recognised as stale and removed); and anything used in the last
//!   [`GRACE`] (a parent has just checked or copied it for a node not yet started).
//! - **When.** Each staged node (not the initiator) evicts once, when it starts, after its
//!   parent has put there everything its subtree needs: so the cache holds at most the cap
//!   plus what the runs going on need. One evictor at a time per cache (`.evict.lock`; a
//!   second skips, the first does the work). A cache dir not owned by this process's user
//!   (a node started as root with `become`, in the login user's cache) is not touched.
//! - With `--no-caching` nothing is kept, so there is nothing to evict.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Entries used this recently are kept whatever the cap: a parent has just checked or copied
/// them for a node that has not taken its lease yet.
pub const GRACE: Duration = Duration::from_secs(15 * 60);

/// Partial writes (upload temp files, a build dir without its binary) older than this are
/// debris of an upload that died with its process: removed.
pub const DEBRIS_AGE: Duration = Duration::from_secs(24 * 3600);

/// The default of `--cache-max-size`.
pub const DEFAULT_MAX_SIZE: &str = "1G";

/// The cap, as given: bytes, or a percentage of the filesystem holding the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxSize {
    Bytes(u64),
    Percent(u8),
}

impl MaxSize {
    /// `512M`, `2G`, `1.5G`, `800K`, `1T`, plain bytes, or `N%` (of the cache's filesystem);
    /// suffixes are powers of 1024 (an optional `B`/`iB` after them is accepted).
    pub fn parse(s: &str) -> Result<MaxSize, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(n) if n <= 100 => Ok(MaxSize::Percent(n)),
                _ => Err(format!("{s:?}: a percentage is 0% to 100%")),
            };
        }
        let upper = t.to_ascii_uppercase();
        let num = upper
            .trim_end_matches("IB")
            .trim_end_matches('B')
            .trim_end();
        let (digits, shift) = match num.chars().last() {
            Some('K') => (&num[..num.len() - 1], 10),
            Some('M') => (&num[..num.len() - 1], 20),
            Some('G') => (&num[..num.len() - 1], 30),
            Some('T') => (&num[..num.len() - 1], 40),
            _ => (num, 0),
        };
        let bad = || format!("{s:?}: expected a size such as 512M, 2G or 10%");
        let value: f64 = digits.trim().parse().map_err(|_| bad())?;
        if !value.is_finite() || value < 0.0 {
            return Err(bad());
        }
        Ok(MaxSize::Bytes((value * (1u64 << shift) as f64) as u64))
    }

    /// The cap in bytes for the cache under `root` (a percentage of its filesystem's size).
    pub fn bytes(&self, root: &Path) -> u64 {
        match *self {
            MaxSize::Bytes(b) => b,
            MaxSize::Percent(p) => filesystem_size(root).unwrap_or(0) / 100 * u64::from(p),
        }
    }
}

/// The size of the filesystem holding `path` (or its nearest existing ancestor).
fn filesystem_size(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_blocks as u64 * st.f_frsize as u64)
}

/// The cache's root on this host: `$XDG_CACHE_HOME/arbor`, else `~/.cache/arbor`.
pub fn root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| super::home_dir().join(".cache"))
        .join("arbor")
}

/// Whether `name` is an entry's name: a sha256 in lowercase hex.
fn is_sha256(name: &str) -> bool {
    name.len() == 64
        && name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// One entry found in the cache.
#[derive(Debug)]
struct Entry {
    name: String,
    path: PathBuf,
    dir: bool,
    size: u64,
    used: SystemTime,
}

fn mtime(meta: &std::fs::Metadata) -> SystemTime {
    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

fn old(t: SystemTime, now: SystemTime, age: Duration) -> bool {
    now.duration_since(t).is_ok_and(|d| d > age)
}

/// The entries under `root` (see the module docs); removes debris on the way.
fn scan(root: &Path, now: SystemTime) -> Vec<Entry> {
    let mut out = Vec::new();
    for (sub, dir) in [("artifacts", false), ("bin", true)] {
        let Ok(read) = std::fs::read_dir(root.join(sub)) else {
            continue;
        };
        for item in read.flatten() {
            let path = item.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let name = item.file_name().to_string_lossy().into_owned();
            if !is_sha256(&name) {
                // A partial write (an upload's temp file), or something not ours.
                if name.starts_with('.')
                    && name.contains(".arbor-")
                    && meta.is_file()
                    && old(mtime(&meta), now, DEBRIS_AGE)
                {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            if dir && meta.is_dir() {
                let mut size = 0;
                let mut used = mtime(&meta);
                let mut complete = false;
                for f in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    let Ok(m) = std::fs::symlink_metadata(f.path()) else {
                        continue;
                    };
                    size += m.len();
                    if f.file_name() == "arbor" && m.is_file() {
                        complete = true;
                        used = used.max(mtime(&m));
                    }
                }
                if !complete {
                    // Being written (the probe makes the dir before the upload), or debris.
                    if old(used, now, DEBRIS_AGE) {
                        let _ = std::fs::remove_dir_all(&path);
                    }
                    continue;
                }
                out.push(Entry {
                    name,
                    path,
                    dir,
                    size,
                    used,
                });
            } else if !dir && meta.is_file() {
                out.push(Entry {
                    name,
                    path,
                    dir,
                    size: meta.len(),
                    used: mtime(&meta),
                });
            }
        }
    }
    out
}

/// The entries named in every live lease under `root`; stale leases (their node is gone, so
/// nobody holds their lock) are removed.
fn leased(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Ok(read) = std::fs::read_dir(root.join("leases")) else {
        return out;
    };
    for item in read.flatten() {
        let name = item.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // being made
        }
        let path = item.path();
        let Ok(file) = File::open(&path) else {
            continue;
        };
        match file.try_lock() {
            Ok(()) => {
                // Nobody holds it: its node is gone.
                let _ = std::fs::remove_file(&path);
            }
            Err(_) => {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.extend(text.lines().filter(|l| is_sha256(l)).map(String::from));
            }
        }
    }
    out
}

/// What one eviction did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    /// The entries removed, least recently used first.
    pub removed: Vec<String>,
    pub removed_bytes: u64,
    /// The entries' total size after eviction.
    pub total: u64,
    /// The cap it was held to.
    pub max: u64,
}

/// Evicts the least recently used entries under `root` until they total at most `max` bytes,
/// never one in `keep`, in a live lease, or used within [`GRACE`] of `now`. `None` when
/// another eviction of this cache is under way (it does the work).
pub fn evict(root: &Path, keep: &BTreeSet<String>, max: u64, now: SystemTime) -> Option<Evicted> {
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(".evict.lock"))
        .ok()?;
    lock.try_lock().ok()?;
    let entries = scan(root, now);
    let leased = leased(root);
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut candidates: Vec<&Entry> = entries
        .iter()
        .filter(|e| !keep.contains(&e.name) && !leased.contains(&e.name) && old(e.used, now, GRACE))
        .collect();
    candidates.sort_by_key(|e| e.used);
    let mut done = Evicted {
        max,
        ..Evicted::default()
    };
    for e in candidates {
        if total <= max {
            break;
        }
        // Used since it was scanned (a parent's probe touched it): keep it.
        let used_now = std::fs::symlink_metadata(&e.path).map(|m| mtime(&m));
        if !used_now.is_ok_and(|t| old(t, now, GRACE)) {
            continue;
        }
        let removed = if e.dir {
            std::fs::remove_dir_all(&e.path)
        } else {
            std::fs::remove_file(&e.path)
        };
        match removed {
            Ok(()) => {
                total -= e.size;
                done.removed.push(e.name.clone());
                done.removed_bytes += e.size;
            }
            Err(err) => tracing::debug!("cache: removing {}: {err}", e.path.display()),
        }
    }
    done.total = total;
    Some(done)
}

/// A node's hold on the entries it needs, for its life: they are touched (used now), and
/// listed in a lease file whose `flock` this holds; dropping it removes the file.
pub struct Lease {
    _file: File,
    path: PathBuf,
}

impl Lease {
    /// Touches the entries of `needed` that are under `root` and takes a lease on them.
    pub fn take(root: &Path, needed: &BTreeSet<String>) -> std::io::Result<Lease> {
        let now = SystemTime::now();
        for name in needed {
            for path in [
                root.join("artifacts").join(name),
                root.join("bin").join(name).join("arbor"),
                root.join("bin").join(name),
            ] {
                if let Ok(f) = File::options().read(true).open(&path) {
                    let _ = f.set_modified(now);
                }
            }
        }
        let dir = root.join("leases");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode_700()
            .create(&dir)?;
        let name = format!("{}-{:016x}", std::process::id(), rand::random::<u64>());
        // Written and locked under a temp name, then renamed: an evictor never sees it unlocked.
        let temp = dir.join(format!(".{name}"));
        let mut file = File::options()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&temp)?;
        file.lock()?;
        for n in needed {
            writeln!(file, "{n}")?;
        }
        file.flush()?;
        let path = dir.join(name);
        std::fs::rename(&temp, &path)?;
        Ok(Lease { _file: file, path })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

trait Mode700 {
    fn mode_700(&mut self) -> &mut Self;
}

impl Mode700 for std::fs::DirBuilder {
    fn mode_700(&mut self) -> &mut Self {
        std::os::unix::fs::DirBuilderExt::mode(self, 0o700)
    }
}

/// Whether this process's user owns `root` (else the cache is someone else's: leave it).
pub fn owned(root: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::metadata(root).is_ok_and(|m| m.uid() == me)
}

/// What a staged node does with its host's cache when it starts: takes a lease on `needed`
/// and evicts down to `max`. Returns the lease, to be held while the node runs.
pub fn on_start(root: &Path, needed: &BTreeSet<String>, max: MaxSize) -> Option<Lease> {
    if !owned(root) {
        tracing::debug!("cache: {} is not this user's; not evicting", root.display());
        return None;
    }
    let lease = lease(root, needed);
    evict_logged(root, needed, max);
    lease
}

/// A lease on `needed` in `root`, if `root` is this user's cache; a failure is logged.
pub fn lease(root: &Path, needed: &BTreeSet<String>) -> Option<Lease> {
    if !owned(root) {
        return None;
    }
    Lease::take(root, needed)
        .map_err(|e| tracing::warn!("cache: taking a lease in {}: {e}", root.display()))
        .ok()
}

/// Evicts `root` down to `max`, keeping `needed`, and logs what went.
pub fn evict_logged(root: &Path, needed: &BTreeSet<String>, max: MaxSize) {
    let cap = max.bytes(root);
    match evict(root, needed, cap, SystemTime::now()) {
        Some(done) if !done.removed.is_empty() => tracing::info!(
            "cache: evicted {} least recently used entries ({} bytes); {} bytes kept, cap {}",
            done.removed.len(),
            done.removed_bytes,
            done.total,
            cap
        ),
        Some(done) if done.total > cap => tracing::debug!(
            "cache: {} bytes, over the cap of {cap}: every entry is in use",
            done.total
        ),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// An artifact of `size` bytes last used `ago` before `now`.
    fn artifact(root: &Path, n: u8, size: usize, now: SystemTime, ago: u64) {
        let dir = root.join("artifacts");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join(sha(n));
        std::fs::write(&p, vec![0u8; size]).expect("write");
        set_used(&p, now, ago);
    }

    fn set_used(p: &Path, now: SystemTime, ago: u64) {
        File::options()
            .read(true)
            .open(p)
            .expect("open")
            .set_modified(now - Duration::from_secs(ago))
            .expect("set mtime");
    }

    fn build(root: &Path, n: u8, size: usize, now: SystemTime, ago: u64) {
        let dir = root.join("bin").join(sha(n));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("arbor"), vec![0u8; size]).expect("write");
        set_used(&dir.join("arbor"), now, ago);
        set_used(&dir, now, ago);
    }

    fn left(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["artifacts", "bin"] {
            for e in std::fs::read_dir(root.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
            }
        }
        out.sort();
        out
    }

    const HOUR: u64 = 3600;

    #[test]
    fn the_least_recently_used_go_first_until_the_cap_is_met() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let now = SystemTime::now();
        artifact(root, 1, 100, now, 5 * HOUR);
        artifact(root, 2, 100, now, 3 * HOUR);
        build(root, 3, 100, now, 4 * HOUR);
        artifact(root, 4, 100, now, 2 * HOUR);
        let done = evict(root, &BTreeSet::new(), 250, now).expect("evicted");
        assert_eq!(done.removed, vec![sha(1), sha(3)]);
        assert_eq!(done.removed_bytes, 200);
        assert_eq!(done.total, 200);
        assert_eq!(
            left(root),
            vec![
                format!("artifacts/{}", sha(2)),
                format!("artifacts/{}", sha(4))
            ]
        );
        // Under the cap: nothing more goes.
        let again = evict(root, &BTreeSet::new(), 250, now).expect("evicted");
        assert!(again.removed.is_empty());
        // A cap of 0 keeps nothing unused.
        let all = evict(root, &BTreeSet::new(), 0, now).expect("evicted");
        assert_eq!(all.removed, vec![sha(2), sha(4)]);
        assert_eq!(all.total, 0);
    }

    #[test]
    fn entries_in_use_are_kept_over_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let now = SystemTime::now();
        artifact(root, 1, 100, now, 9 * HOUR); // this run needs it
        build(root, 2, 100, now, 8 * HOUR); // another live run's lease names it
        artifact(root, 3, 100, now, 60); // used a minute ago: within the grace
        artifact(root, 4, 100, now, 7 * HOUR); // nobody's
        artifact(root, 5, 100, now, 6 * HOUR); // a dead run's lease named it
        let other = Lease::take(root, &[sha(2)].into()).expect("lease");
        // The lease touched it; make it old again to show the lease alone keeps it.
        set_used(&root.join("bin").join(sha(2)).join("arbor"), now, 8 * HOUR);
        set_used(&root.join("bin").join(sha(2)), now, 8 * HOUR);
        // A stale lease: a file nobody holds a lock on.
        std::fs::write(root.join("leases/999-dead"), format!("{}\n", sha(5))).expect("write");
        let done = evict(root, &[sha(1)].into(), 0, now).expect("evicted");
        assert_eq!(done.removed, vec![sha(4), sha(5)]);
        assert_eq!(done.total, 300, "kept over the cap: {done:?}");
        assert!(!root.join("leases/999-dead").exists(), "stale lease kept");
        assert!(root.join("bin").join(sha(2)).join("arbor").exists());
        // Once that run ends, its entry can go.
        drop(other);
        assert_eq!(
            std::fs::read_dir(root.join("leases")).expect("ls").count(),
            0
        );
        let done = evict(root, &[sha(1)].into(), 0, now).expect("evicted");
        assert_eq!(done.removed, vec![sha(2)]);
    }

    #[test]
    fn taking_a_lease_marks_the_entries_used_now() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let now = SystemTime::now();
        artifact(root, 1, 10, now, 9 * HOUR);
        build(root, 2, 10, now, 8 * HOUR);
        artifact(root, 3, 10, now, 7 * HOUR);
        let _lease = Lease::take(root, &[sha(1), sha(2)].into()).expect("lease");
        let later = now + GRACE + Duration::from_secs(60);
        // Past the grace, only the lease keeps 1 and 2; 3 goes. The lease touched them too.
        let done = evict(root, &BTreeSet::new(), 20, later).expect("evicted");
        assert_eq!(done.removed, vec![sha(3)]);
        let used = std::fs::metadata(root.join("artifacts").join(sha(1)))
            .and_then(|m| m.modified())
            .expect("mtime");
        assert!(used >= now - Duration::from_secs(1), "not touched");
    }

    #[test]
    fn partial_writes_are_ignored_until_they_are_debris() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let now = SystemTime::now();
        artifact(root, 1, 100, now, 5 * HOUR);
        // An upload in progress, old by its mtime but young enough to be live.
        let temp = root
            .join("artifacts")
            .join(format!(".{}.arbor-0123", sha(2)));
        std::fs::write(&temp, vec![0u8; 1000]).expect("write");
        set_used(&temp, now, 5 * HOUR);
        // A build dir made by a probe, its binary not yet renamed into place.
        let writing = root.join("bin").join(sha(3));
        std::fs::create_dir_all(&writing).expect("mkdir");
        let part = writing.join(".arbor.arbor-77");
        std::fs::write(&part, vec![0u8; 1000]).expect("write");
        set_used(&part, now, 5 * HOUR);
        set_used(&writing, now, 5 * HOUR);
        // Neither counts, and neither is touched: only the complete entry goes over a 50 cap.
        let done = evict(root, &BTreeSet::new(), 50, now).expect("evicted");
        assert_eq!(done.removed, vec![sha(1)]);
        assert_eq!(done.total, 0);
        assert!(temp.exists() && part.exists());
        // A day on, they are debris of a dead upload: removed.
        let later = now + DEBRIS_AGE;
        evict(root, &BTreeSet::new(), 50, later).expect("evicted");
        assert!(!temp.exists() && !writing.exists());
    }

    #[test]
    fn a_second_evictor_at_once_leaves_the_work_to_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let held = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(".evict.lock"))
            .expect("open");
        held.lock().expect("lock");
        assert!(evict(root, &BTreeSet::new(), 0, SystemTime::now()).is_none());
        drop(held);
        assert!(evict(root, &BTreeSet::new(), 0, SystemTime::now()).is_some());
    }

    #[test]
    fn sizes_parse_as_the_flag_takes_them() {
        assert_eq!(MaxSize::parse("1G"), Ok(MaxSize::Bytes(1 << 30)));
        assert_eq!(MaxSize::parse("512M"), Ok(MaxSize::Bytes(512 << 20)));
        assert_eq!(MaxSize::parse("1.5GiB"), Ok(MaxSize::Bytes(3 << 29)));
        assert_eq!(MaxSize::parse("800k"), Ok(MaxSize::Bytes(800 << 10)));
        assert_eq!(MaxSize::parse("4096"), Ok(MaxSize::Bytes(4096)));
        assert_eq!(MaxSize::parse("0"), Ok(MaxSize::Bytes(0)));
        assert_eq!(MaxSize::parse("10%"), Ok(MaxSize::Percent(10)));
        for bad in ["", "G", "-1M", "lots", "101%", "1X"] {
            assert!(MaxSize::parse(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(MaxSize::Percent(10).bytes(&dir.path().join("not/yet")) > 0);
    }
}
