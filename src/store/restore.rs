//! `arbor store restore FILE --data-dir DIR`: a new data dir from a snapshot file that
//! `etcdctl snapshot save` (Maintenance.Snapshot) wrote.
//!
//! The file is checked whole before anything is written: its magic, its length, its checksum,
//! and that the state inside holds together. The restored store keeps every key with its
//! versions and revisions, the history since the last compaction, the leases (with their full
//! TTL again, as after any restart) and the alarms. It gets a new cluster id and member id:
//! clients that knew the old store must not take its revisions for the ones they saw, since
//! the old store may have gone on past the snapshot (arbor's client reports
//! `WatchLost::StoreReplaced`).

use super::state::{Ids, State};
use super::wal::{self, SnapshotError, SnapshotRecord};
use anyhow::Context;
use std::path::Path;
use std::time::Instant;

/// What a restore produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub revision: i64,
    pub compacted: i64,
    pub keys: usize,
    pub leases: usize,
    pub cluster_id: u64,
    pub member_id: u64,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "revision {} (compacted at {}), {} keys, {} leases; new cluster id {:x}, member id {:x}",
            self.revision, self.compacted, self.keys, self.leases, self.cluster_id, self.member_id
        )
    }
}

/// Restores `file` into `data_dir`, which must not exist or be empty.
pub fn restore(file: &Path, data_dir: &Path) -> anyhow::Result<Restored> {
    let bytes =
        std::fs::read(file).with_context(|| format!("reading snapshot {}", file.display()))?;
    let (mut snap, state) =
        restored_state(&bytes).with_context(|| format!("{} cannot be restored", file.display()))?;
    let ids = Ids::random();
    snap.cluster_id = ids.cluster_id;
    snap.member_id = ids.member_id;
    wal::create_from_snapshot(data_dir, &snap)?;
    Ok(Restored {
        revision: state.mvcc.current(),
        compacted: state.mvcc.compacted(),
        keys: state.mvcc.live_keys(),
        leases: state.lessor.len(),
        cluster_id: ids.cluster_id,
        member_id: ids.member_id,
    })
}

/// Checks and decodes a snapshot file's bytes, and builds the state a store restored from it
/// starts with (under the ids the file names).
pub(super) fn restored_state(bytes: &[u8]) -> Result<(SnapshotRecord, State), SnapshotError> {
    let snap = wal::decode_snapshot(bytes)?;
    let state = State::restore(snap.clone(), Instant::now());
    Ok((snap, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `payload` (a state's encoding) as a data dir's `snapshot.pb`.
    fn file(payload: &[u8]) -> Vec<u8> {
        let mut file = wal::snapshot_header(payload).expect("header");
        file.extend_from_slice(payload);
        file
    }

    #[test]
    fn history_from_before_the_compaction_is_refused() {
        // Found by the `snapshot` fuzz target: revision 7, compacted at 4, and a history that
        // holds a version of `/a` at revision 2. Restored, that version landed both in the
        // history and, as older than the compaction, in the base of the next snapshot, so each
        // snapshot after held it once more.
        let payload = [
            32, 7, 40, 4, 58, 15, 10, 13, 10, 2, 47, 97, 24, 2, 16, 4, 32, 2, 42, 1, 60,
        ];
        let err = restored_state(&file(&payload)).expect_err("restored");
        assert!(
            matches!(&err, SnapshotError::Inconsistent(m) if m.contains("revision 2, from before the compaction at 4")),
            "{err}"
        );
    }

    #[test]
    fn a_lease_ttl_past_the_ceiling_restores_without_overflowing() {
        // Revision 1 and lease 1 with a TTL of i64::MAX seconds: the lease's expiry overflowed
        // `Instant` and the restore panicked.
        let payload = [
            32, 1, 66, 12, 8, 1, 16, 255, 255, 255, 255, 255, 255, 255, 255, 127,
        ];
        let (_, state) = restored_state(&file(&payload)).expect("restored");
        assert_eq!(state.lessor.len(), 1);
    }
}
