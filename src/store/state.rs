//! The store's state machine: the key space and the lease table, and the requests that change
//! them. Every write is a transaction (a Put is a Txn with one op), applied at one new revision,
//! and yields a [`WalRecord`] of its *effects* (the versions it wrote), so replaying the log
//! never re-evaluates a compare or a lease expiry.
//!
//! Nothing here waits or does I/O; [`super::backend`] decides when a result may be shown.

use super::errors;
use super::lessor::{Lessor, MAX_TTL, MIN_TTL};
use super::mvcc::{KeyRange, Kv, Mvcc, is_tombstone};
use super::wal::{LeaseRecord, SnapshotParts, SnapshotRecord, WalRecord};
use etcd_client::proto::{
    PbCompare, PbCompareTarget, PbDeleteRequest, PbDeleteResponse, PbKeyValue as KeyValue,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbResponseHeader, PbResponseOp,
    PbTargetUnion, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp, PbTxnResponse,
};
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;
use tonic::Status;

/// etcd's limit on the ops in each part (compares, success, failure) of a txn.
pub const MAX_TXN_OPS: usize = 128;

/// Reported as raft_term everywhere: a single member that never held an election.
pub const RAFT_TERM: u64 = 1;

/// etcd's AlarmType values.
pub const ALARM_NOSPACE: i32 = 1;
pub const ALARM_CORRUPT: i32 = 2;

/// What a put counts for against the space quota besides its key and value, and what a lease
/// counts for: etcd's figures (kvOverhead, leaseOverhead in its quota.go).
pub const PUT_COST_OVERHEAD: u64 = 256;
pub const LEASE_COST: u64 = 64;

/// The identity the store reports in every header; fixed for the life of a data dir.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub cluster_id: u64,
    pub member_id: u64,
}

impl Ids {
    pub fn random() -> Self {
        // Zero is "no id" in etcd's API; keep both ids non-zero and positive as i64.
        let id = || (rand::random::<u64>() >> 1).max(1);
        Ids {
            cluster_id: id(),
            member_id: id(),
        }
    }
}

#[derive(Debug)]
pub struct State {
    pub mvcc: Mvcc,
    pub lessor: Lessor,
    pub ids: Ids,
    /// Index of the last record handed to the log (0 before the first).
    pub index: u64,
    /// Alarms raised and not disarmed (etcd's AlarmType values).
    pub alarms: BTreeSet<i32>,
}

// sort_order and sort_target values from rpc.proto.
pub(crate) const SORT_NONE: i32 = 0;
pub(crate) const SORT_ASCEND: i32 = 1;
pub(crate) const SORT_DESCEND: i32 = 2;
pub(crate) const TARGET_KEY: i32 = 0;
const TARGET_VERSION: i32 = 1;
const TARGET_CREATE: i32 = 2;
pub(crate) const TARGET_MOD: i32 = 3;
const TARGET_VALUE: i32 = 4;

// Compare.result values from rpc.proto.
const CMP_EQUAL: i32 = 0;
const CMP_GREATER: i32 = 1;
const CMP_LESS: i32 = 2;
const CMP_NOT_EQUAL: i32 = 3;

impl State {
    pub fn new(ids: Ids) -> Self {
        State {
            mvcc: Mvcc::new(),
            lessor: Lessor::default(),
            ids,
            index: 0,
            alarms: BTreeSet::new(),
        }
    }

    /// The store's size, as the space quota and `dbSizeInUse` count it: every version kept
    /// (see [`super::mvcc::version_size`]) and every lease.
    pub fn size(&self) -> u64 {
        self.mvcc.bytes() + self.lessor.len() as u64 * LEASE_COST
    }

    /// Raises an alarm; returns what to log, or `None` if it was already raised.
    pub fn raise_alarm(&mut self, alarm: i32) -> Option<WalRecord> {
        self.alarms.insert(alarm).then(|| WalRecord {
            alarms_raised: vec![alarm],
            ..Default::default()
        })
    }

    /// Disarms an alarm; returns what to log, or `None` if it was not raised.
    pub fn clear_alarm(&mut self, alarm: i32) -> Option<WalRecord> {
        self.alarms.remove(&alarm).then(|| WalRecord {
            alarms_cleared: vec![alarm],
            ..Default::default()
        })
    }

    pub fn header(&self, revision: i64) -> PbResponseHeader {
        PbResponseHeader {
            cluster_id: self.ids.cluster_id,
            member_id: self.ids.member_id,
            revision,
            raft_term: RAFT_TERM,
        }
    }

    /// A Range. `at` is the revision read when the request names none; `newest` the newest
    /// revision the request may name.
    pub fn range(
        &self,
        req: &PbRangeRequest,
        at: i64,
        newest: i64,
    ) -> Result<PbRangeResponse, Status> {
        if req.key.is_empty() {
            return Err(errors::empty_key());
        }
        let at = if req.revision > 0 {
            self.mvcc
                .check_readable(req.revision, newest)
                .map_err(errors::revision)?;
            req.revision
        } else {
            at
        };
        let mut kvs: Vec<&Kv> = self
            .mvcc
            .range(&KeyRange::new(&req.key, &req.range_end), at)
            .collect();
        let count = kvs.len() as i64;
        let bound = |v: i64, min: i64, max: i64| (min == 0 || v >= min) && (max == 0 || v <= max);
        kvs.retain(|kv| {
            bound(kv.mod_revision, req.min_mod_revision, req.max_mod_revision)
                && bound(
                    kv.create_revision,
                    req.min_create_revision,
                    req.max_create_revision,
                )
        });
        sort(&mut kvs, req.sort_order, req.sort_target);
        let mut more = false;
        if req.limit > 0 && kvs.len() as i64 > req.limit {
            kvs.truncate(req.limit as usize);
            more = true;
        }
        if req.count_only {
            kvs.clear();
            more = false;
        }
        let kvs = kvs
            .into_iter()
            .map(|kv| {
                let mut kv = KeyValue::clone(kv);
                if req.keys_only {
                    kv.value.clear();
                }
                kv
            })
            .collect();
        Ok(PbRangeResponse {
            // etcd names the store's revision here, not the one read.
            header: Some(self.header(newest)),
            kvs,
            more,
            count,
        })
    }

    /// A Txn (and so every Put and DeleteRange). On success returns the response and what to
    /// log, if anything changed. On error nothing has changed.
    pub fn txn(&mut self, req: &PbTxnRequest) -> Result<(PbTxnResponse, WalRecord), Status> {
        validate_txn(req)?;
        check_intervals(&req.success)?;
        check_intervals(&req.failure)?;
        let before = self.mvcc.current();
        let mut path = Vec::new();
        self.txn_path(req, before, &mut path);
        let mut steps = path.iter().copied();
        self.check_txn(req, before, &mut steps)?;
        let mut record = WalRecord::default();
        let mut steps = path.iter().copied();
        let mut resp = self.exec_txn(req, before + 1, &mut steps, &mut record);
        // Only the outer header names the cluster and member; the responses inside a txn carry
        // just their revision, as etcd's do.
        resp.header = Some(self.header(self.mvcc.current()));
        Ok((resp, record))
    }

    /// Evaluates the compares of `req` and, in the branch taken, of every nested txn, all
    /// against the state before the txn (as etcd does), depth first.
    fn txn_path(&self, req: &PbTxnRequest, at: i64, path: &mut Vec<bool>) {
        let succeeded = req.compare.iter().all(|c| self.compare(c, at));
        path.push(succeeded);
        let branch = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        for op in branch {
            if let Some(PbTxnOpRequest::RequestTxn(nested)) = &op.request {
                self.txn_path(nested, at, path);
            }
        }
    }

    fn compare(&self, c: &PbCompare, at: i64) -> bool {
        let kvs: Vec<&Kv> = self
            .mvcc
            .range(&KeyRange::new(&c.key, &c.range_end), at)
            .collect();
        if kvs.is_empty() {
            // A missing key has no value to compare (etcd: "nil == empty string in grpc").
            if c.target == PbCompareTarget::Value as i32 {
                return false;
            }
            return compare_kv(c, &KeyValue::default());
        }
        kvs.iter().all(|kv| compare_kv(c, kv))
    }

    /// The checks etcd makes on the branch a txn will take, before it changes anything.
    fn check_txn(
        &self,
        req: &PbTxnRequest,
        at: i64,
        steps: &mut impl Iterator<Item = bool>,
    ) -> Result<(), Status> {
        let branch = if steps.next().unwrap_or(false) {
            &req.success
        } else {
            &req.failure
        };
        for op in branch {
            match &op.request {
                Some(PbTxnOpRequest::RequestRange(r)) if r.revision > 0 => {
                    self.mvcc
                        .check_readable(r.revision, at)
                        .map_err(errors::revision)?;
                }
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    if p.lease != 0 && !self.lessor.contains(p.lease) {
                        return Err(errors::lease_not_found());
                    }
                    if (p.ignore_value || p.ignore_lease) && self.mvcc.get(&p.key, at).is_none() {
                        return Err(errors::key_not_found());
                    }
                }
                Some(PbTxnOpRequest::RequestTxn(nested)) => self.check_txn(nested, at, steps)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn exec_txn(
        &mut self,
        req: &PbTxnRequest,
        rev: i64,
        steps: &mut impl Iterator<Item = bool>,
        record: &mut WalRecord,
    ) -> PbTxnResponse {
        let succeeded = steps.next().unwrap_or(false);
        let branch = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            let response = match &op.request {
                Some(PbTxnOpRequest::RequestRange(r)) => {
                    let now = self.mvcc.current();
                    // Checked above; a failure here would be a bug, answered as an empty range.
                    let mut resp = self.range(r, now, now).unwrap_or_default();
                    resp.header = Some(revision_header(now));
                    Some(PbTxnOpResponse::ResponseRange(resp))
                }
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    Some(PbTxnOpResponse::ResponsePut(self.exec_put(p, rev, record)))
                }
                Some(PbTxnOpRequest::RequestDeleteRange(d)) => Some(
                    PbTxnOpResponse::ResponseDeleteRange(self.exec_delete(d, rev, record)),
                ),
                Some(PbTxnOpRequest::RequestTxn(nested)) => Some(PbTxnOpResponse::ResponseTxn(
                    self.exec_txn(nested, rev, steps, record),
                )),
                None => None,
            };
            responses.push(PbResponseOp { response });
        }
        PbTxnResponse {
            header: Some(revision_header(self.mvcc.current())),
            succeeded,
            responses,
        }
    }

    fn exec_put(&mut self, req: &PbPutRequest, rev: i64, record: &mut WalRecord) -> PbPutResponse {
        let latest = self.mvcc.latest(&req.key).cloned();
        let value = match (&latest, req.ignore_value) {
            (Some(kv), true) => kv.value.clone(),
            _ => req.value.clone(),
        };
        let lease = match (&latest, req.ignore_lease) {
            (Some(kv), true) => kv.lease,
            _ => req.lease,
        };
        let (kv, prev) = self.mvcc.put(&req.key, value, lease, rev);
        self.track_lease(&kv, prev.as_ref());
        record.changes.push(KeyValue::clone(&kv));
        PbPutResponse {
            header: Some(revision_header(rev)),
            prev_kv: prev.filter(|_| req.prev_kv).map(|p| KeyValue::clone(&p)),
        }
    }

    fn exec_delete(
        &mut self,
        req: &PbDeleteRequest,
        rev: i64,
        record: &mut WalRecord,
    ) -> PbDeleteResponse {
        let deleted = self.delete(&KeyRange::new(&req.key, &req.range_end), rev, record);
        PbDeleteResponse {
            header: Some(revision_header(self.mvcc.current())),
            deleted: deleted.len() as i64,
            prev_kvs: if req.prev_kv {
                deleted.iter().map(|kv| KeyValue::clone(kv)).collect()
            } else {
                Vec::new()
            },
        }
    }

    fn delete(&mut self, range: &KeyRange, rev: i64, record: &mut WalRecord) -> Vec<Kv> {
        let deleted = self.mvcc.delete_range(range, rev);
        for kv in &deleted {
            if kv.lease != 0 {
                self.lessor.detach(kv.lease, &kv.key);
            }
            record.changes.push(KeyValue {
                key: kv.key.clone(),
                mod_revision: rev,
                ..Default::default()
            });
        }
        deleted
    }

    /// Keeps each lease's key set in step with the versions written.
    fn track_lease(&mut self, kv: &KeyValue, prev: Option<&Kv>) {
        if let Some(p) = prev
            && p.lease != 0
        {
            self.lessor.detach(p.lease, &p.key);
        }
        if !is_tombstone(kv) && kv.lease != 0 {
            self.lessor.attach(kv.lease, &kv.key);
        }
    }

    /// Compact. `newest` is the newest revision readers can see.
    pub fn compact(&mut self, rev: i64, newest: i64) -> Result<WalRecord, Status> {
        if rev > newest {
            return Err(errors::future_revision());
        }
        if rev <= self.mvcc.compacted() {
            return Err(errors::compacted());
        }
        self.mvcc.compact(rev);
        Ok(WalRecord {
            compact: rev,
            ..Default::default()
        })
    }

    pub fn lease_grant(
        &mut self,
        id: i64,
        ttl: i64,
        now: Instant,
    ) -> Result<(i64, i64, WalRecord), Status> {
        if ttl > MAX_TTL {
            return Err(errors::lease_ttl_too_large());
        }
        let ttl = ttl.max(MIN_TTL);
        let id = match id {
            0 => loop {
                let candidate = (rand::random::<u64>() >> 1) as i64;
                if candidate != 0 && !self.lessor.contains(candidate) {
                    break candidate;
                }
            },
            id if self.lessor.contains(id) => return Err(errors::lease_exists()),
            id => id,
        };
        self.lessor.grant(id, ttl, now);
        let record = WalRecord {
            lease_grants: vec![LeaseRecord { id, ttl }],
            ..Default::default()
        };
        Ok((id, ttl, record))
    }

    /// Revokes a lease and deletes its keys, all at one new revision.
    pub fn lease_revoke(&mut self, id: i64) -> Result<WalRecord, Status> {
        let lease = self.lessor.revoke(id).ok_or_else(errors::lease_not_found)?;
        let rev = self.mvcc.current() + 1;
        let mut record = WalRecord {
            lease_revokes: vec![id],
            ..Default::default()
        };
        for key in &lease.keys {
            self.delete(&KeyRange::single(key), rev, &mut record);
        }
        Ok(record)
    }

    /// Applies a record read back from the log.
    pub fn replay(&mut self, record: WalRecord, now: Instant) {
        for grant in record.lease_grants {
            self.lessor.grant(grant.id, grant.ttl, now);
        }
        for kv in record.changes {
            let kv = Arc::new(kv);
            let prev = self.mvcc.apply(kv.clone());
            self.track_lease(&kv, prev.as_ref());
        }
        for id in record.lease_revokes {
            self.lessor.revoke(id);
        }
        if record.compact > self.mvcc.compacted() && record.compact <= self.mvcc.current() {
            self.mvcc.compact(record.compact);
        }
        for alarm in record.alarms_raised {
            self.alarms.insert(alarm);
        }
        for alarm in record.alarms_cleared {
            self.alarms.remove(&alarm);
        }
        self.index = self.index.max(record.index);
    }

    /// The whole state, sharing its versions (see [`SnapshotParts`]).
    pub fn snapshot_parts(&self) -> SnapshotParts {
        let (base, revisions) = self.mvcc.snapshot_parts();
        SnapshotParts {
            cluster_id: self.ids.cluster_id,
            member_id: self.ids.member_id,
            index: self.index,
            current: self.mvcc.current(),
            compacted: self.mvcc.compacted(),
            base,
            revisions,
            leases: self
                .lessor
                .records()
                .into_iter()
                .map(|(id, ttl)| LeaseRecord { id, ttl })
                .collect(),
            alarms: self.alarms.iter().copied().collect(),
        }
    }

    pub fn restore(snap: SnapshotRecord, now: Instant) -> Self {
        let mvcc = Mvcc::restore(
            snap.current,
            snap.compacted,
            snap.base,
            snap.revisions.into_iter().map(|r| r.changes),
        );
        let mut lessor = Lessor::default();
        for l in &snap.leases {
            lessor.grant(l.id, l.ttl, now);
        }
        for kv in mvcc.leased_keys(i64::MAX) {
            lessor.attach(kv.lease, &kv.key);
        }
        State {
            mvcc,
            lessor,
            ids: Ids {
                cluster_id: snap.cluster_id,
                member_id: snap.member_id,
            },
            index: snap.index,
            alarms: snap.alarms.into_iter().collect(),
        }
    }
}

/// etcd's name for an alarm type.
pub fn alarm_name(alarm: i32) -> &'static str {
    match alarm {
        ALARM_NOSPACE => "NOSPACE",
        ALARM_CORRUPT => "CORRUPT",
        _ => "NONE",
    }
}

fn revision_header(revision: i64) -> PbResponseHeader {
    PbResponseHeader {
        revision,
        ..Default::default()
    }
}

/// What a txn counts for against the space quota, as etcd counts it: its larger branch's puts,
/// each its key, value and [`PUT_COST_OVERHEAD`] (nested txns included, which etcd forgets).
/// Zero for a txn that writes no value: those are never refused for space.
pub fn txn_cost(req: &PbTxnRequest) -> u64 {
    let branch = |ops: &[PbTxnRequestOp]| -> u64 {
        ops.iter()
            .map(|op| match &op.request {
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    (p.key.len() + p.value.len()) as u64 + PUT_COST_OVERHEAD
                }
                Some(PbTxnOpRequest::RequestTxn(nested)) => txn_cost(nested),
                _ => 0,
            })
            .sum()
    };
    branch(&req.success).max(branch(&req.failure))
}

fn sort(kvs: &mut [&Kv], order: i32, target: i32) {
    let order = match (order, target) {
        // etcd sorts ascending when a target is named without an order.
        (SORT_NONE, TARGET_KEY) => return,
        (SORT_NONE, _) => SORT_ASCEND,
        (order, _) => order,
    };
    if order == SORT_ASCEND && target == TARGET_KEY {
        return; // already in key order
    }
    match target {
        TARGET_VERSION => kvs.sort_by_key(|kv| kv.version),
        TARGET_CREATE => kvs.sort_by_key(|kv| kv.create_revision),
        TARGET_MOD => kvs.sort_by_key(|kv| kv.mod_revision),
        TARGET_VALUE => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        _ => {}
    }
    if order == SORT_DESCEND {
        kvs.reverse();
    }
}

fn compare_kv(c: &PbCompare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    // A union of another kind than the target reads as zero / empty, as protobuf getters do.
    let union = c.target_union.as_ref();
    let int = |pick: fn(&PbTargetUnion) -> Option<i64>| union.and_then(pick).unwrap_or(0);
    let ord = match PbCompareTarget::try_from(c.target) {
        Ok(PbCompareTarget::Value) => {
            let want: &[u8] = match union {
                Some(PbTargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        Ok(PbCompareTarget::Version) => kv.version.cmp(&int(|u| match u {
            PbTargetUnion::Version(v) => Some(*v),
            _ => None,
        })),
        Ok(PbCompareTarget::Create) => kv.create_revision.cmp(&int(|u| match u {
            PbTargetUnion::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        Ok(PbCompareTarget::Mod) => kv.mod_revision.cmp(&int(|u| match u {
            PbTargetUnion::ModRevision(v) => Some(*v),
            _ => None,
        })),
        Ok(PbCompareTarget::Lease) => kv.lease.cmp(&int(|u| match u {
            PbTargetUnion::Lease(v) => Some(*v),
            _ => None,
        })),
        Err(_) => return false,
    };
    match c.result {
        CMP_EQUAL => ord == Ordering::Equal,
        CMP_GREATER => ord == Ordering::Greater,
        CMP_LESS => ord == Ordering::Less,
        CMP_NOT_EQUAL => ord != Ordering::Equal,
        _ => false,
    }
}

/// The request checks etcd makes before anything else: op counts and empty keys, recursively.
fn validate_txn(req: &PbTxnRequest) -> Result<(), Status> {
    if req.compare.len() > MAX_TXN_OPS
        || req.success.len() > MAX_TXN_OPS
        || req.failure.len() > MAX_TXN_OPS
    {
        return Err(errors::too_many_ops());
    }
    for op in req.success.iter().chain(&req.failure) {
        match &op.request {
            Some(PbTxnOpRequest::RequestRange(r)) if r.key.is_empty() => {
                return Err(errors::empty_key());
            }
            Some(PbTxnOpRequest::RequestPut(p)) => {
                if p.key.is_empty() {
                    return Err(errors::empty_key());
                }
                if p.ignore_value && !p.value.is_empty() {
                    return Err(errors::value_provided());
                }
                if p.ignore_lease && p.lease != 0 {
                    return Err(errors::lease_provided());
                }
            }
            Some(PbTxnOpRequest::RequestDeleteRange(d)) if d.key.is_empty() => {
                return Err(errors::empty_key());
            }
            Some(PbTxnOpRequest::RequestTxn(nested)) => validate_txn(nested)?,
            _ => {}
        }
    }
    Ok(())
}

/// etcd's rule that one branch of a txn writes each key at most once: no two puts of a key and
/// no put inside a deleted range, counting nested txns (whose own two branches may overlap,
/// since only one runs). Returns the branch's puts and deletes.
fn check_intervals(ops: &[PbTxnRequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<KeyRange>), Status> {
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                Some(KeyRange::new(&d.key, &d.range_end))
            }
            _ => None,
        })
        .collect();
    let deleted = |dels: &[KeyRange], key: &[u8]| {
        let point = KeyRange::single(key);
        dels.iter().any(|d| d.overlaps(&point))
    };
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in ops {
        let Some(PbTxnOpRequest::RequestTxn(nested)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&nested.success)?;
        let (puts_else, dels_else) = check_intervals(&nested.failure)?;
        for key in &puts_then {
            if puts.contains(key) || deleted(&dels, key) {
                return Err(errors::duplicate_key());
            }
            puts.insert(key.clone());
        }
        for key in &puts_else {
            if (puts.contains(key) && !puts_then.contains(key)) || deleted(&dels, key) {
                return Err(errors::duplicate_key());
            }
            puts.insert(key.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(PbTxnOpRequest::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || deleted(&dels, &p.key) {
            return Err(errors::duplicate_key());
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })),
        }
    }

    fn txn(compare: Vec<PbCompare>, success: Vec<PbTxnRequestOp>) -> PbTxnRequest {
        PbTxnRequest {
            compare,
            success,
            failure: vec![],
        }
    }

    #[test]
    fn a_txn_writes_all_its_puts_at_one_revision() {
        let mut st = State::new(Ids::random());
        let (resp, record) = st
            .txn(&txn(vec![], vec![put("a", "1"), put("b", "2")]))
            .unwrap();
        assert!(resp.succeeded);
        assert_eq!(resp.header.map(|h| h.revision), Some(2));
        let revs: Vec<i64> = record.changes.iter().map(|kv| kv.mod_revision).collect();
        assert_eq!(revs, [2, 2]);
    }

    #[test]
    fn duplicate_puts_in_one_branch_are_refused_and_change_nothing() {
        let mut st = State::new(Ids::random());
        let err = st
            .txn(&txn(vec![], vec![put("a", "1"), put("a", "2")]))
            .unwrap_err();
        assert_eq!(
            err.message(),
            "etcdserver: duplicate key given in txn request"
        );
        assert_eq!(st.mvcc.current(), 1);
    }

    #[test]
    fn missing_key_fails_a_value_compare_but_equals_version_zero() {
        let mut st = State::new(Ids::random());
        let cmp = |target: PbCompareTarget, union: PbTargetUnion| PbCompare {
            result: CMP_EQUAL,
            target: target as i32,
            key: b"nope".to_vec(),
            range_end: vec![],
            target_union: Some(union),
        };
        let (resp, _) = st
            .txn(&txn(
                vec![cmp(PbCompareTarget::Value, PbTargetUnion::Value(vec![]))],
                vec![],
            ))
            .unwrap();
        assert!(!resp.succeeded);
        let (resp, _) = st
            .txn(&txn(
                vec![cmp(PbCompareTarget::Version, PbTargetUnion::Version(0))],
                vec![],
            ))
            .unwrap();
        assert!(resp.succeeded);
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_at_one_revision() {
        let mut st = State::new(Ids::random());
        let (id, ttl, _) = st.lease_grant(0, 1, Instant::now()).unwrap();
        assert_eq!(ttl, MIN_TTL);
        for key in ["a", "b"] {
            let mut op = put(key, "v");
            if let Some(PbTxnOpRequest::RequestPut(p)) = &mut op.request {
                p.lease = id;
            }
            st.txn(&txn(vec![], vec![op])).unwrap();
        }
        let record = st.lease_revoke(id).unwrap();
        let revs: Vec<i64> = record.changes.iter().map(|kv| kv.mod_revision).collect();
        assert_eq!(revs, [4, 4]);
        assert!(st.mvcc.latest(b"a").is_none());
    }
}
