//! The multi-version key space: one global revision, and per key every version since the last
//! compaction, as etcd defines them.
//!
//! Two views of the same versions are kept, both pointing at shared [`Kv`]s:
//! - per key, its history in revision order (what a read at an old revision needs);
//! - per revision, the changes made at it in order (what a watch replay needs), each with the
//!   version it replaced so watchers can ask for `prev_kv`.
//!
//! A deletion is stored as a *tombstone*: a key value with `create_revision == 0`, which is also
//! exactly what etcd puts in a DELETE event's `kv`. Nothing here knows about durability: the
//! caller says at which revision it reads, so versions written but not yet durable stay invisible.

use etcd_client::proto::PbKeyValue as KeyValue;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

/// One version of one key, shared between the key's history and the revision log.
pub type Kv = Arc<KeyValue>;

/// What one retained version is counted as in the store's size, besides its key and value:
/// roughly the memory it holds (the shared version, its slots in the key's history and in the
/// revision log, the prev_kv reference). The size is what the space quota limits.
pub const VERSION_OVERHEAD: u64 = 256;

/// The bytes one version counts for in the store's size.
pub fn version_size(kv: &KeyValue) -> u64 {
    (kv.key.len() + kv.value.len()) as u64 + VERSION_OVERHEAD
}

/// A deletion marker (see the module docs).
pub fn is_tombstone(kv: &KeyValue) -> bool {
    kv.create_revision == 0
}

/// The keys a request covers, decoded from etcd's `key` / `range_end` pair: an empty
/// `range_end` means the key alone, `"\0"` means every key from `key` on, anything else is the
/// half-open interval `[key, range_end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    start: Vec<u8>,
    end: RangeEnd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RangeEnd {
    Single,
    Unbounded,
    Before(Vec<u8>),
}

impl KeyRange {
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        let end = match range_end {
            [] => RangeEnd::Single,
            [0] => RangeEnd::Unbounded,
            end => RangeEnd::Before(end.to_vec()),
        };
        KeyRange {
            start: key.to_vec(),
            end,
        }
    }

    pub fn single(key: &[u8]) -> Self {
        Self::new(key, &[])
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            RangeEnd::Single => key == self.start.as_slice(),
            RangeEnd::Unbounded => key >= self.start.as_slice(),
            RangeEnd::Before(end) => key >= self.start.as_slice() && key < end.as_slice(),
        }
    }

    /// Whether two ranges share a key (for txn duplicate-key checks).
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        match (&self.end, &other.end) {
            (RangeEnd::Single, _) => other.contains(&self.start),
            (_, RangeEnd::Single) => self.contains(&other.start),
            _ => {
                let before_end = |start: &[u8], end: &RangeEnd| match end {
                    RangeEnd::Before(e) => start < e.as_slice(),
                    _ => true,
                };
                before_end(&self.start, &other.end) && before_end(&other.start, &self.end)
            }
        }
    }

    /// Bounds for a `BTreeMap` scan, or `None` when the range is empty (a `range_end` at or
    /// before `key`), which `BTreeMap::range` would reject with a panic.
    fn bounds(&self) -> Option<ScanBounds<'_>> {
        let start = Bound::Included(self.start.as_slice());
        match &self.end {
            RangeEnd::Single => Some((start, Bound::Included(self.start.as_slice()))),
            RangeEnd::Unbounded => Some((start, Bound::Unbounded)),
            RangeEnd::Before(end) if end.as_slice() > self.start.as_slice() => {
                Some((start, Bound::Excluded(end.as_slice())))
            }
            RangeEnd::Before(_) => None,
        }
    }
}

/// A `BTreeMap` range over keys.
type ScanBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// One change at one revision: the new version (or tombstone) and the live version it replaced.
#[derive(Clone, Debug)]
pub struct Change {
    pub kv: Kv,
    pub prev: Option<Kv>,
}

/// Every change made at one revision, in the order the request made them.
#[derive(Clone, Debug)]
pub struct RevisionChanges {
    pub revision: i64,
    pub changes: Vec<Change>,
}

/// Why a read or a watch cannot be served at the revision asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevisionError {
    /// History before this revision is gone.
    Compacted(i64),
    /// The revision has not happened yet.
    Future,
}

/// The key space. See the module docs.
#[derive(Debug)]
pub struct Mvcc {
    keys: BTreeMap<Vec<u8>, Vec<Kv>>,
    log: VecDeque<RevisionChanges>,
    current: i64,
    compacted: i64,
    /// [`version_size`] summed over every retained version (tombstones included).
    bytes: u64,
    /// Keys whose newest version is live.
    live: usize,
}

impl Default for Mvcc {
    fn default() -> Self {
        Self::new()
    }
}

impl Mvcc {
    /// An empty store is at revision 1, like etcd; the first write makes revision 2.
    pub fn new() -> Self {
        Mvcc {
            keys: BTreeMap::new(),
            log: VecDeque::new(),
            current: 1,
            compacted: 0,
            bytes: 0,
            live: 0,
        }
    }

    /// Rebuilds a store from a snapshot: `base` holds the versions older than `compacted` (at
    /// most one live version per key), `revisions` every change since, in order.
    pub fn restore(
        current: i64,
        compacted: i64,
        base: Vec<KeyValue>,
        revisions: impl IntoIterator<Item = Vec<KeyValue>>,
    ) -> Self {
        let mut mvcc = Mvcc::new();
        mvcc.compacted = compacted;
        for kv in base {
            mvcc.bytes += version_size(&kv);
            let history = mvcc.keys.entry(kv.key.clone()).or_default();
            let was_live = history.last().is_some_and(|p| !is_tombstone(p));
            let live = !is_tombstone(&kv);
            history.push(Arc::new(kv));
            mvcc.count_live(was_live, live);
        }
        for changes in revisions {
            for kv in changes {
                mvcc.apply(Arc::new(kv));
            }
        }
        mvcc.current = mvcc.current.max(current);
        mvcc
    }

    fn count_live(&mut self, was_live: bool, live: bool) {
        match (was_live, live) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
    }

    /// The store's size: [`version_size`] summed over every version kept.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many keys exist now (counting versions not yet durable).
    pub fn live_keys(&self) -> usize {
        self.live
    }

    /// The newest revision applied (durable or not).
    pub fn current(&self) -> i64 {
        self.current
    }

    /// The revision of the last compaction (0 if never compacted).
    pub fn compacted(&self) -> i64 {
        self.compacted
    }

    /// Checks that `rev` can be read when `visible` is the newest readable revision.
    pub fn check_readable(&self, rev: i64, visible: i64) -> Result<(), RevisionError> {
        if rev > visible {
            Err(RevisionError::Future)
        } else if rev < self.compacted {
            Err(RevisionError::Compacted(self.compacted))
        } else {
            Ok(())
        }
    }

    /// The live version of `key` at revision `at`.
    pub fn get(&self, key: &[u8], at: i64) -> Option<&Kv> {
        self.keys
            .get(key)
            .and_then(|history| version_at(history, at))
    }

    /// The live versions at revision `at` of every key in `range`, in key order.
    pub fn range<'a>(&'a self, range: &KeyRange, at: i64) -> impl Iterator<Item = &'a Kv> + 'a {
        let scan = range
            .bounds()
            .map(|bounds| self.keys.range::<[u8], _>(bounds));
        scan.into_iter()
            .flatten()
            .filter_map(move |(_, history)| version_at(history, at))
    }

    /// Appends a version (or tombstone) at `kv.mod_revision`, which must be the current
    /// revision (another change in the same request) or newer. Returns the live version it
    /// replaced.
    pub fn apply(&mut self, kv: Kv) -> Option<Kv> {
        let rev = kv.mod_revision;
        let history = self.keys.entry(kv.key.clone()).or_default();
        let prev = history.last().filter(|p| !is_tombstone(p)).cloned();
        history.push(kv.clone());
        self.bytes += version_size(&kv);
        self.count_live(prev.is_some(), !is_tombstone(&kv));
        match self.log.back_mut() {
            Some(last) if last.revision == rev => last.changes.push(Change {
                kv,
                prev: prev.clone(),
            }),
            _ => self.log.push_back(RevisionChanges {
                revision: rev,
                changes: vec![Change {
                    kv,
                    prev: prev.clone(),
                }],
            }),
        }
        self.current = self.current.max(rev);
        prev
    }

    /// Writes `value` under `key` at revision `rev`; `value` and `lease` are final (the caller
    /// has resolved `ignore_value` / `ignore_lease`). Returns the new and the replaced version.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64, rev: i64) -> (Kv, Option<Kv>) {
        let latest = self.latest(key);
        let kv = Arc::new(KeyValue {
            key: key.to_vec(),
            create_revision: latest.map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: latest.map_or(1, |p| p.version + 1),
            value,
            lease,
        });
        let prev = self.apply(kv.clone());
        (kv, prev)
    }

    /// Deletes every live key in `range` at revision `rev`; returns the deleted versions.
    pub fn delete_range(&mut self, range: &KeyRange, rev: i64) -> Vec<Kv> {
        let doomed: Vec<Kv> = self.range(range, rev).cloned().collect();
        for kv in &doomed {
            self.apply(Arc::new(KeyValue {
                key: kv.key.clone(),
                mod_revision: rev,
                ..Default::default()
            }));
        }
        doomed
    }

    /// The newest version of `key`, counting versions not yet durable: what the next write
    /// builds on.
    pub fn latest(&self, key: &[u8]) -> Option<&Kv> {
        self.get(key, i64::MAX)
    }

    /// Forgets history older than `rev`: each key keeps the version a read at `rev` sees, and
    /// the revision log keeps `rev` itself so a watch may start there. The caller checks that
    /// `rev` is neither compacted nor in the future.
    pub fn compact(&mut self, rev: i64) {
        if rev <= self.compacted {
            return;
        }
        let mut freed = 0;
        self.keys.retain(|_, history| {
            let keep_from = history.partition_point(|kv| kv.mod_revision <= rev);
            // history[keep_from - 1] is what a read at `rev` sees: keep it unless it is a
            // tombstone older than `rev` (a read finds nothing either way).
            let mut first = keep_from.saturating_sub(1);
            if let Some(kv) = history.get(first)
                && kv.mod_revision < rev
                && is_tombstone(kv)
            {
                first += 1;
            }
            freed += history
                .drain(..first)
                .map(|kv| version_size(&kv))
                .sum::<u64>();
            !history.is_empty()
        });
        while self.log.front().is_some_and(|r| r.revision < rev) {
            self.log.pop_front();
        }
        self.bytes -= freed;
        self.compacted = rev;
    }

    /// The changes in `range` from revision `from` through `to`, whole revisions at a time,
    /// stopping after the revision that brings the total size past `budget` bytes. Returns them
    /// with the revision to continue from.
    pub fn changes_since(
        &self,
        range: &KeyRange,
        from: i64,
        to: i64,
        budget: usize,
    ) -> Result<(Vec<Change>, i64), RevisionError> {
        if from < self.compacted {
            return Err(RevisionError::Compacted(self.compacted));
        }
        let start = self.log.partition_point(|r| r.revision < from);
        let mut out = Vec::new();
        let mut size = 0usize;
        let mut next = from;
        for rev in self.log.range(start..) {
            if rev.revision > to {
                break;
            }
            for change in &rev.changes {
                if range.contains(&change.kv.key) {
                    size += change.kv.key.len() + change.kv.value.len() + 48;
                    out.push(change.clone());
                }
            }
            next = rev.revision + 1;
            if size > budget {
                return Ok((out, next));
            }
        }
        Ok((out, next.max(to + 1)))
    }

    /// What a snapshot needs: the versions older than the compaction point, and each retained
    /// revision's changes in order.
    /// Shares the versions instead of copying them, so taking the parts under the state lock is
    /// cheap; encoding them happens after the lock is let go.
    pub fn snapshot_parts(&self) -> (Vec<Kv>, Vec<Vec<Kv>>) {
        let base = self
            .keys
            .values()
            .flat_map(|h| h.iter().take_while(|kv| kv.mod_revision < self.compacted))
            .cloned()
            .collect();
        let revisions = self
            .log
            .iter()
            .map(|r| r.changes.iter().map(|c| c.kv.clone()).collect())
            .collect();
        (base, revisions)
    }

    /// Every live key at `at` with a lease, for rebuilding the lease table after a restart.
    pub fn leased_keys(&self, at: i64) -> impl Iterator<Item = &Kv> {
        self.keys
            .values()
            .filter_map(move |h| version_at(h, at))
            .filter(|kv| kv.lease != 0)
    }
}

/// The version of a key a read at `at` sees, if it is live.
fn version_at(history: &[Kv], at: i64) -> Option<&Kv> {
    let idx = history.partition_point(|kv| kv.mod_revision <= at);
    history
        .get(idx.checked_sub(1)?)
        .filter(|kv| !is_tombstone(kv))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(mvcc: &Mvcc, range: &KeyRange, at: i64) -> Vec<String> {
        mvcc.range(range, at)
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect()
    }

    #[test]
    fn versions_and_revisions_follow_etcd() {
        let mut m = Mvcc::new();
        let (a1, prev) = m.put(b"a", b"1".to_vec(), 0, 2);
        assert!(prev.is_none());
        assert_eq!((a1.create_revision, a1.mod_revision, a1.version), (2, 2, 1));
        let (a2, prev) = m.put(b"a", b"2".to_vec(), 0, 3);
        assert_eq!(prev.map(|p| p.value.clone()), Some(b"1".to_vec()));
        assert_eq!((a2.create_revision, a2.mod_revision, a2.version), (2, 3, 2));
        let deleted = m.delete_range(&KeyRange::single(b"a"), 4);
        assert_eq!(deleted.len(), 1);
        assert!(m.get(b"a", 4).is_none());
        let (a3, _) = m.put(b"a", b"3".to_vec(), 0, 5);
        assert_eq!(
            (a3.create_revision, a3.version),
            (5, 1),
            "a new generation starts"
        );
        assert_eq!(
            m.get(b"a", 2).map(|kv| kv.value.clone()),
            Some(b"1".to_vec())
        );
        assert_eq!(
            m.get(b"a", 3).map(|kv| kv.value.clone()),
            Some(b"2".to_vec())
        );
        assert_eq!(m.current(), 5);
    }

    #[test]
    fn ranges_decode_prefix_from_key_and_empty_forms() {
        let mut m = Mvcc::new();
        for (i, k) in ["a", "b", "b/1", "b/2", "c"].iter().enumerate() {
            m.put(k.as_bytes(), vec![], 0, 2 + i as i64);
        }
        let at = m.current();
        assert_eq!(keys(&m, &KeyRange::new(b"b/", b"b0"), at), ["b/1", "b/2"]);
        assert_eq!(
            keys(&m, &KeyRange::new(b"b", b"\0"), at),
            ["b", "b/1", "b/2", "c"]
        );
        assert_eq!(keys(&m, &KeyRange::new(b"\0", b"\0"), at).len(), 5);
        assert!(
            keys(&m, &KeyRange::new(b"c", b"a"), at).is_empty(),
            "end before start"
        );
        assert_eq!(keys(&m, &KeyRange::new(b"a", b"b/2"), 3), ["a", "b"]);
    }

    #[test]
    fn compaction_keeps_what_a_read_at_the_compaction_revision_sees() {
        let mut m = Mvcc::new();
        m.put(b"a", b"1".to_vec(), 0, 2);
        m.put(b"a", b"2".to_vec(), 0, 3);
        m.put(b"b", b"1".to_vec(), 0, 4);
        m.delete_range(&KeyRange::single(b"b"), 5);
        m.put(b"c", b"1".to_vec(), 0, 6);
        m.compact(5);
        assert_eq!(m.check_readable(4, 6), Err(RevisionError::Compacted(5)));
        assert_eq!(m.check_readable(5, 6), Ok(()));
        assert_eq!(m.check_readable(7, 6), Err(RevisionError::Future));
        assert_eq!(
            m.get(b"a", 5).map(|kv| kv.value.clone()),
            Some(b"2".to_vec())
        );
        assert!(m.get(b"b", 5).is_none());
        // A watch may start at the compaction revision and sees the delete made there.
        let (changes, next) = m
            .changes_since(&KeyRange::new(b"\0", b"\0"), 5, 6, 1 << 20)
            .unwrap();
        assert_eq!(changes.len(), 2);
        assert!(is_tombstone(&changes[0].kv));
        assert_eq!(next, 7);
        assert!(matches!(
            m.changes_since(&KeyRange::new(b"\0", b"\0"), 4, 6, 1 << 20),
            Err(RevisionError::Compacted(5))
        ));
    }

    #[test]
    fn snapshot_parts_restore_the_same_store() {
        let mut m = Mvcc::new();
        m.put(b"a", b"1".to_vec(), 0, 2);
        m.put(b"b", b"1".to_vec(), 7, 3);
        m.put(b"a", b"2".to_vec(), 0, 4);
        m.compact(3);
        m.delete_range(&KeyRange::single(b"b"), 5);
        let (base, revisions) = m.snapshot_parts();
        let owned = |kvs: Vec<Kv>| kvs.iter().map(|kv| KeyValue::clone(kv)).collect::<Vec<_>>();
        let r = Mvcc::restore(
            m.current(),
            m.compacted(),
            owned(base),
            revisions.into_iter().map(owned),
        );
        assert_eq!((r.bytes(), r.live_keys()), (m.bytes(), m.live_keys()));
        assert_eq!(r.live_keys(), 1, "a is live, b deleted");
        assert_eq!(r.current(), 5);
        assert_eq!(r.compacted(), 3);
        for at in 3..=5 {
            let all = KeyRange::new(b"\0", b"\0");
            assert_eq!(keys(&r, &all, at), keys(&m, &all, at), "at {at}");
        }
        let (changes, _) = r
            .changes_since(&KeyRange::new(b"\0", b"\0"), 3, 5, 1 << 20)
            .unwrap();
        let revs: Vec<i64> = changes.iter().map(|c| c.kv.mod_revision).collect();
        assert_eq!(revs, [3, 4, 5]);
        assert_eq!(changes[2].prev.as_ref().map(|p| p.lease), Some(7));
    }

    #[test]
    fn the_size_counts_every_version_kept_and_compaction_gives_it_back() {
        let mut m = Mvcc::new();
        let one = (1 + 10) as u64 + VERSION_OVERHEAD;
        m.put(b"a", vec![b'x'; 10], 0, 2);
        m.put(b"a", vec![b'y'; 10], 0, 3);
        m.put(b"b", vec![b'z'; 10], 0, 4);
        assert_eq!((m.bytes(), m.live_keys()), (3 * one, 2));
        m.delete_range(&KeyRange::single(b"b"), 5);
        let tombstone = 1 + VERSION_OVERHEAD;
        assert_eq!((m.bytes(), m.live_keys()), (3 * one + tombstone, 1));
        // At 5: a's first version and b's live one go; a's second stays, and so does b's
        // tombstone, made at 5 itself (a watch from 5 sees the delete).
        m.compact(5);
        assert_eq!((m.bytes(), m.live_keys()), (one + tombstone, 1));
        m.put(b"c", vec![], 0, 6);
        m.compact(6);
        assert_eq!(
            m.bytes(),
            one + (1 + VERSION_OVERHEAD),
            "b's tombstone is gone"
        );
        m.put(b"b", vec![], 0, 7);
        assert_eq!(m.live_keys(), 3, "a, c and a new generation of b");
    }

    #[test]
    fn overlap_of_single_keys_and_intervals() {
        let a = KeyRange::single(b"a");
        assert!(a.overlaps(&KeyRange::single(b"a")));
        assert!(!a.overlaps(&KeyRange::single(b"b")));
        assert!(a.overlaps(&KeyRange::new(b"a", b"b")));
        assert!(!a.overlaps(&KeyRange::new(b"b", b"c")));
        assert!(KeyRange::new(b"a", b"c").overlaps(&KeyRange::single(b"b")));
        assert!(KeyRange::new(b"a", b"\0").overlaps(&KeyRange::single(b"z")));
    }
}
