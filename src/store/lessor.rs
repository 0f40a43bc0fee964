//! The lease table: which leases exist, when each expires, and which keys each one holds.
//!
//! Expiry times are not persisted (etcd does not persist them either): after a restart every
//! lease gets its full TTL again, so a restart can delay an expiry but never cause one.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// etcd's floor for a TTL with its default election timeout: 1.5 election timeouts, rounded up.
/// A shorter TTL is raised to this, as etcd does, so clients see the same granted TTL.
pub const MIN_TTL: i64 = 2;
/// etcd's ceiling for a TTL, in seconds.
pub const MAX_TTL: i64 = 9_000_000_000;

#[derive(Debug, Clone)]
pub struct Lease {
    pub ttl: i64,
    pub expiry: Instant,
    pub keys: BTreeSet<Vec<u8>>,
}

#[derive(Debug, Default)]
pub struct Lessor {
    leases: HashMap<i64, Lease>,
}

impl Lessor {
    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Adds a lease; the caller has checked that `id` is free and `ttl` in range.
    pub fn grant(&mut self, id: i64, ttl: i64, now: Instant) {
        self.leases.insert(
            id,
            Lease {
                ttl,
                expiry: now + secs(ttl),
                keys: BTreeSet::new(),
            },
        );
    }

    pub fn revoke(&mut self, id: i64) -> Option<Lease> {
        self.leases.remove(&id)
    }

    /// Restarts the lease's TTL; returns it, or `None` if the lease is gone.
    pub fn renew(&mut self, id: i64, now: Instant) -> Option<i64> {
        let lease = self.leases.get_mut(&id)?;
        lease.expiry = now + secs(lease.ttl);
        Some(lease.ttl)
    }

    pub fn attach(&mut self, id: i64, key: &[u8]) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.keys.insert(key.to_vec());
        }
    }

    pub fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(lease) = self.leases.get_mut(&id) {
            lease.keys.remove(key);
        }
    }

    /// Leases whose time is up, oldest expiry first.
    pub fn expired(&self, now: Instant) -> Vec<i64> {
        let mut due: Vec<(Instant, i64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expiry <= now)
            .map(|(id, l)| (l.expiry, *id))
            .collect();
        due.sort();
        due.into_iter().map(|(_, id)| id).collect()
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.leases.keys().copied().collect();
        ids.sort();
        ids
    }

    /// `(id, ttl)` of every lease, for snapshots.
    pub fn records(&self) -> Vec<(i64, i64)> {
        self.ids()
            .into_iter()
            .filter_map(|id| self.leases.get(&id).map(|l| (id, l.ttl)))
            .collect()
    }
}

/// A TTL as a duration, within `0..=MAX_TTL`: a lease read back from a damaged snapshot or log
/// may hold any value, and an expiry past what `Instant` holds would panic.
fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl.clamp(0, MAX_TTL)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_pushes_expiry_and_keys_follow_attachment() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        l.grant(7, 5, t0);
        l.attach(7, b"a");
        l.attach(7, b"b");
        l.detach(7, b"a");
        assert_eq!(l.expired(t0 + Duration::from_secs(5)), [7]);
        assert_eq!(l.renew(7, t0 + Duration::from_secs(3)), Some(5));
        assert!(l.expired(t0 + Duration::from_secs(5)).is_empty());
        let lease = l.revoke(7).expect("granted");
        assert_eq!(lease.keys.into_iter().collect::<Vec<_>>(), [b"b".to_vec()]);
        assert_eq!(l.renew(7, t0), None);
    }

    #[test]
    fn a_ttl_past_the_ceiling_expires_at_the_ceiling() {
        let t0 = Instant::now();
        let mut l = Lessor::default();
        l.grant(1, i64::MAX, t0);
        l.grant(2, -1, t0);
        assert_eq!(l.renew(1, t0), Some(i64::MAX));
        assert_eq!(l.expired(t0 + secs(MAX_TTL)), [2, 1]);
        assert_eq!(l.expired(t0), [2]);
    }
}
