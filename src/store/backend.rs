//! The store behind the gRPC services: the state machine under one lock, the log, and the rule
//! that ties them together: **nothing is shown before it is durable**.
//!
//! A write is applied to the state at once (so the next write builds on it), logged, and
//! answered only when the log thread reports it fsynced. Readers and watchers see revisions up
//! to the newest *durable* one only, so a crash can never take back something a client saw.
//! A transaction that only reads still evaluates against everything applied, so it waits for
//! what it saw to become durable before it answers.
//!
//! Without a data dir, "durable" is "applied" and nothing waits.

use super::errors;
use super::metrics::{Gauges, Metrics};
use super::mvcc::{Change, KeyRange, RevisionError};
use super::state::{ALARM_NOSPACE, Ids, LEASE_COST, State, txn_cost};
use super::wal::{self, Wal, WalRecord};
use etcd_client::proto::{
    PbRangeRequest, PbRangeResponse, PbResponseHeader, PbTxnRequest, PbTxnResponse,
};
use prost::Message;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How the store keeps history and data. See docs/store.md for the policy.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the log and snapshots live; `None` keeps the store in memory.
    pub data_dir: Option<PathBuf>,
    /// Auto-compaction keeps at least this many revisions of history for watch replay.
    pub retain_revisions: i64,
    /// A snapshot is taken, and the log restarted, once the log grows past this.
    pub snapshot_after_bytes: u64,
    /// How often a watch with `progress_notify` hears the current revision when idle. Shorter
    /// than etcd's 10 minutes: it is what keeps an idle client watch's resume point recent, so
    /// a reconnect after a busy spell elsewhere does not land behind compaction.
    pub progress_notify_interval: Duration,
    /// The space quota (`--quota-backend-bytes`): once the store's size would pass it, writes
    /// that add data are refused and the NOSPACE alarm is raised. `None`: no quota.
    pub quota_bytes: Option<u64>,
    /// The users requests must authenticate as (`auth`); `None`: no credentials asked.
    pub users: Option<Arc<super::auth::Users>>,
}

/// The space quota unless told otherwise: etcd's default, 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;

impl Default for Options {
    fn default() -> Self {
        Options {
            data_dir: None,
            retain_revisions: 10_000,
            snapshot_after_bytes: 64 << 20,
            progress_notify_interval: Duration::from_secs(60),
            quota_bytes: Some(DEFAULT_QUOTA_BYTES),
            users: None,
        }
    }
}

/// Where durability stands; watchers and waiting writers follow it.
#[derive(Debug, Clone, Default)]
pub struct Durable {
    /// Every log record up to this index is durable.
    pub index: u64,
    /// The newest revision readers may see.
    pub revision: i64,
    /// Set once the log has failed; no later write will become durable.
    pub failed: Option<Arc<str>>,
}

pub struct Backend {
    state: Mutex<State>,
    durable: watch::Sender<Durable>,
    wal: Option<Wal>,
    ids: Ids,
    options: Options,
    /// Fired when the server shuts down, so open streams end and shutdown can finish.
    closing: CancellationToken,
    metrics: Arc<Metrics>,
}

/// What `Status` reports besides headers.
pub struct StatusInfo {
    pub index: u64,
    /// The state's size plus the log written since the last snapshot: what defragmentation
    /// (which writes a snapshot and starts the log over) brings down to `db_size_in_use`.
    pub db_size: i64,
    /// The state's size, as the quota counts it.
    pub db_size_in_use: i64,
    /// Why the store is unwell (an alarm, a failed log), if it is.
    pub errors: Vec<String>,
}

impl Backend {
    /// Opens the store: replays the data dir if there is one, and starts the lease clock.
    pub fn open(options: Options) -> anyhow::Result<Arc<Backend>> {
        let now = Instant::now();
        let (state, opened) = match &options.data_dir {
            None => (State::new(Ids::random()), None),
            Some(dir) => {
                let (recovered, mut opened) = wal::open(dir)?;
                if recovered.dropped_bytes > 0 {
                    tracing::warn!(
                        "store: dropped a torn record ({} bytes) at the end of the log in {}; \
                         it was never acknowledged",
                        recovered.dropped_bytes,
                        dir.display()
                    );
                }
                let mut state = match recovered.snapshot {
                    Some(snap) => State::restore(snap, now),
                    None => {
                        let state = State::new(Ids::random());
                        opened.write_snapshot(&state.snapshot_parts())?;
                        state
                    }
                };
                for record in recovered.records {
                    state.replay(record, now);
                }
                (state, Some(opened))
            }
        };
        let durable = watch::Sender::new(Durable {
            index: state.index,
            revision: state.mvcc.current(),
            failed: None,
        });
        let ids = state.ids;
        let metrics = Arc::new(Metrics::default());
        let wal = match opened {
            None => None,
            Some(opened) => {
                let tx = durable.clone();
                Some(opened.start(
                    Box::new(move |result| {
                        tx.send_modify(|d| match result {
                            Ok((index, revision)) => {
                                d.index = d.index.max(index);
                                d.revision = d.revision.max(revision);
                            }
                            Err(e) => d.failed = Some(e.into()),
                        })
                    }),
                    metrics.clone(),
                )?)
            }
        };
        let backend = Arc::new(Backend {
            state: Mutex::new(state),
            durable,
            wal,
            ids,
            options,
            closing: CancellationToken::new(),
            metrics,
        });
        tokio::spawn(expire_leases(Arc::downgrade(&backend)));
        Ok(backend)
    }

    pub fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// Ends the store: open streams end, the log is flushed and closed, and the data dir is
    /// free for the next store as soon as this returns.
    pub async fn close(self: &Arc<Self>) {
        self.closing.cancel();
        if self.wal.is_some() {
            let backend = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(wal) = &backend.wal {
                    wal.stop();
                }
            })
            .await;
        }
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The users requests must authenticate as, when the store checks credentials.
    pub fn users(&self) -> Option<&Arc<super::auth::Users>> {
        self.options.users.as_ref()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A release build aborts on panic, so a poisoned lock is only seen in debug builds and
        // tests, where carrying on shows more than failing every later request would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn header(&self, revision: i64) -> PbResponseHeader {
        PbResponseHeader {
            cluster_id: self.ids.cluster_id,
            member_id: self.ids.member_id,
            revision,
            raft_term: super::state::RAFT_TERM,
        }
    }

    pub fn ids(&self) -> Ids {
        self.ids
    }

    /// The newest revision readers may see.
    pub fn visible(&self) -> i64 {
        self.durable.borrow().revision
    }

    pub fn subscribe(&self) -> watch::Receiver<Durable> {
        self.durable.subscribe()
    }

    pub fn range(&self, req: &PbRangeRequest) -> Result<PbRangeResponse, Status> {
        let visible = self.visible();
        self.lock().range(req, visible, visible)
    }

    pub async fn txn(&self, req: &PbTxnRequest) -> Result<PbTxnResponse, Status> {
        let wait = {
            let mut st = self.lock();
            self.check_writable()?;
            match self.check_space(&mut st, txn_cost(req)) {
                Err(raised) => Err(raised),
                Ok(()) => {
                    let (resp, record) = st.txn(req)?;
                    Ok((resp, self.commit(&mut st, record)))
                }
            }
        };
        let (resp, index) = match wait {
            Ok(wait) => wait,
            Err(raised) => return self.no_space(raised).await,
        };
        self.wait_durable(index).await?;
        Ok(resp)
    }

    pub async fn compact(&self, revision: i64) -> Result<PbResponseHeader, Status> {
        let visible = self.visible();
        let (rev, index) = {
            let mut st = self.lock();
            self.check_writable()?;
            let record = st.compact(revision, visible)?;
            (st.mvcc.current(), self.commit(&mut st, record))
        };
        self.wait_durable(index).await?;
        Ok(self.header(rev))
    }

    /// Returns the lease id and the TTL granted.
    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<(i64, i64, i64), Status> {
        let granted = {
            let mut st = self.lock();
            self.check_writable()?;
            match self.check_space(&mut st, LEASE_COST) {
                Err(raised) => Err(raised),
                Ok(()) => {
                    let (id, ttl, record) = st.lease_grant(id, ttl, Instant::now())?;
                    Ok((id, ttl, st.mvcc.current(), self.commit(&mut st, record)))
                }
            }
        };
        let (id, ttl, rev, index) = match granted {
            Ok(granted) => granted,
            Err(raised) => return self.no_space(raised).await,
        };
        self.wait_durable(index).await?;
        self.metrics.leases_granted.fetch_add(1, Relaxed);
        Ok((id, ttl, rev))
    }

    /// Revokes a lease, deleting its keys; returns the revision after.
    pub async fn lease_revoke(&self, id: i64) -> Result<i64, Status> {
        let (rev, index) = {
            let mut st = self.lock();
            self.check_writable()?;
            let record = st.lease_revoke(id)?;
            (st.mvcc.current(), self.commit(&mut st, record))
        };
        self.wait_durable(index).await?;
        self.metrics.leases_revoked.fetch_add(1, Relaxed);
        Ok(rev)
    }

    /// Restarts a lease's TTL; returns the TTL, 0 if the lease does not exist (as etcd does).
    pub fn lease_keep_alive(&self, id: i64) -> i64 {
        let ttl = self.lock().lessor.renew(id, Instant::now()).unwrap_or(0);
        if ttl > 0 {
            self.metrics.leases_renewed.fetch_add(1, Relaxed);
        }
        ttl
    }

    /// `(remaining seconds, granted TTL, keys)` of a lease, or `None` if it does not exist.
    pub fn lease_time_to_live(&self, id: i64, keys: bool) -> Option<(i64, i64, Vec<Vec<u8>>)> {
        let st = self.lock();
        let lease = st.lessor.get(id)?;
        let remaining = lease
            .expiry
            .saturating_duration_since(Instant::now())
            .as_secs() as i64;
        let keys = if keys {
            lease.keys.iter().cloned().collect()
        } else {
            Vec::new()
        };
        Some((remaining, lease.ttl, keys))
    }

    pub fn lease_ids(&self) -> Vec<i64> {
        self.lock().lessor.ids()
    }

    pub fn status_info(&self) -> StatusInfo {
        let (index, in_use, alarms) = {
            let st = self.lock();
            (st.index, st.size(), !st.alarms.is_empty())
        };
        let log = self
            .wal
            .as_ref()
            .map_or(0, |w| w.segment_bytes.load(Relaxed));
        StatusInfo {
            index,
            db_size: (in_use + log) as i64,
            db_size_in_use: in_use as i64,
            errors: self.health_problems(alarms),
        }
    }

    /// Why the store is not healthy, if it is not: an alarm, or a failed log.
    fn health_problems(&self, alarms: bool) -> Vec<String> {
        let mut problems = Vec::new();
        if alarms {
            for alarm in self.alarms() {
                // As etcd writes an alarm (the protobuf text form, space included).
                problems.push(format!(
                    "memberID:{} alarm:{} ",
                    self.ids.member_id,
                    super::state::alarm_name(alarm)
                ));
            }
        }
        if let Some(cause) = &self.durable.borrow().failed {
            problems.push(format!("the write-ahead log failed: {cause}"));
        }
        problems
    }

    /// `Ok` when the store serves reads and writes: no alarm is raised and the log works.
    /// Otherwise the reasons, for `/health`.
    pub fn health(&self) -> Result<(), Vec<String>> {
        let alarms = !self.lock().alarms.is_empty();
        let problems = self.health_problems(alarms);
        if problems.is_empty() {
            self.metrics.health_successes.fetch_add(1, Relaxed);
            Ok(())
        } else {
            self.metrics.health_failures.fetch_add(1, Relaxed);
            Err(problems)
        }
    }

    /// The figures `/metrics` shows about the state.
    pub fn gauges(&self) -> Gauges {
        let (keys, leases, revision, compacted, index, in_use, nospace) = {
            let st = self.lock();
            (
                st.mvcc.live_keys(),
                st.lessor.len(),
                st.mvcc.current(),
                st.mvcc.compacted(),
                st.index,
                st.size(),
                st.alarms.contains(&ALARM_NOSPACE),
            )
        };
        let log = self
            .wal
            .as_ref()
            .map_or(0, |w| w.segment_bytes.load(Relaxed));
        Gauges {
            member_id: self.ids.member_id,
            version: super::maintenance::API_VERSION,
            quota_bytes: self
                .options
                .quota_bytes
                .map_or(-1, |q| i64::try_from(q).unwrap_or(i64::MAX)),
            db_size: (in_use + log) as i64,
            db_size_in_use: in_use as i64,
            keys,
            leases,
            revision,
            compacted,
            index,
            durable_index: self.durable.borrow().index,
            nospace,
        }
    }

    /// The alarms raised, as etcd's AlarmType values.
    pub fn alarms(&self) -> Vec<i32> {
        self.lock().alarms.iter().copied().collect()
    }

    /// Raises an alarm (Maintenance.Alarm ACTIVATE); returns it if it was not raised before.
    pub async fn raise_alarm(&self, alarm: i32) -> Result<Option<i32>, Status> {
        let index = {
            let mut st = self.lock();
            self.check_writable()?;
            st.raise_alarm(alarm)
                .map(|record| self.commit(&mut st, record))
        };
        match index {
            Some(index) => {
                self.wait_durable(index).await?;
                Ok(Some(alarm))
            }
            None => Ok(None),
        }
    }

    /// Disarms an alarm (Maintenance.Alarm DEACTIVATE); returns it if it was raised. Writes are
    /// accepted again, until the next one that does not fit the quota.
    pub async fn clear_alarm(&self, alarm: i32) -> Result<Option<i32>, Status> {
        let index = {
            let mut st = self.lock();
            self.check_writable()?;
            st.clear_alarm(alarm)
                .map(|record| self.commit(&mut st, record))
        };
        match index {
            Some(index) => {
                self.wait_durable(index).await?;
                tracing::info!("store: alarm {} disarmed", super::state::alarm_name(alarm));
                Ok(Some(alarm))
            }
            None => Ok(None),
        }
    }

    /// Defragmentation, in arbor's terms: writes a snapshot of the state now and starts the
    /// log over, so the data dir holds the state and nothing more. In memory, nothing to do.
    pub async fn defragment(&self) -> Result<(), Status> {
        let started = Instant::now();
        let Some(wal) = &self.wal else {
            return Ok(());
        };
        let placed = {
            let st = self.lock();
            self.check_writable()?;
            wal.snapshot_pending.store(true, Relaxed);
            let (done, placed) = tokio::sync::oneshot::channel();
            wal.snapshot(st.index, st.mvcc.current(), st.snapshot_parts(), Some(done))
                .map_err(|e| errors::storage_failed(&e))?;
            placed
        };
        match placed.await {
            Ok(Ok(())) => {
                self.metrics.defrag.observe(started.elapsed());
                Ok(())
            }
            Ok(Err(e)) => Err(errors::storage_failed(&e)),
            Err(_) => Err(errors::storage_failed("the log thread has stopped")),
        }
    }

    /// A consistent snapshot of the whole state, its versions shared, not copied (encode it
    /// with `SnapshotParts::encode_chunks`). Holds the state lock only to take them, and
    /// answers once everything in it is durable, as any read does.
    pub async fn snapshot(&self) -> Result<wal::SnapshotParts, Status> {
        let (parts, index) = {
            let st = self.lock();
            (st.snapshot_parts(), st.index)
        };
        self.wait_durable(index).await?;
        Ok(parts)
    }

    /// The changes a watcher on `range` has not seen yet: from `from` up to the newest visible
    /// revision, at most about `budget` bytes of them. Returns them, the revision to continue
    /// from, and the visible revision they were read at.
    pub fn changes_since(
        &self,
        range: &KeyRange,
        from: i64,
        budget: usize,
    ) -> Result<(Vec<Change>, i64, i64), RevisionError> {
        let visible = self.visible();
        let st = self.lock();
        let (changes, next) = st.mvcc.changes_since(range, from, visible, budget)?;
        Ok((changes, next, visible))
    }

    /// The space quota, for a request that adds `cost` bytes: refused while the NOSPACE alarm
    /// is raised, and refused (raising it) when it would take the store to the quota. Requests
    /// that add nothing (reads, deletes, compaction, revokes) always pass, as in etcd. A
    /// refusal carries the log index of the alarm it raised, if it raised one.
    fn check_space(&self, st: &mut State, cost: u64) -> Result<(), Option<u64>> {
        if cost == 0 {
            return Ok(());
        }
        if st.alarms.contains(&ALARM_NOSPACE) {
            return Err(None);
        }
        let Some(quota) = self.options.quota_bytes else {
            return Ok(());
        };
        if st.size() + cost < quota {
            return Ok(());
        }
        let record = st.raise_alarm(ALARM_NOSPACE);
        Err(record.map(|record| {
            tracing::warn!(
                "store: the space quota ({quota} bytes) is reached ({} bytes in use): NOSPACE \
                 alarm raised; writes are refused until space is freed (delete, compact) and \
                 the alarm disarmed (etcdctl alarm disarm)",
                st.size()
            );
            self.commit(st, record)
        }))
    }

    /// The answer to a write refused by the quota: NOSPACE, once the alarm it raised (if any)
    /// is durable, so a client that saw the refusal finds the alarm still raised after a crash.
    async fn no_space<T>(&self, raised: Option<u64>) -> Result<T, Status> {
        if let Some(index) = raised {
            self.wait_durable(index).await?;
        }
        Err(errors::no_space())
    }

    fn check_writable(&self) -> Result<(), Status> {
        match &self.durable.borrow().failed {
            Some(cause) => Err(errors::storage_failed(cause)),
            None => Ok(()),
        }
    }

    /// Hands a request's effects to the log (called with the state locked, so records reach
    /// the log in the order they were applied). Returns the log index the caller must see
    /// durable before answering: for a request that changed nothing, whatever it may have read.
    fn commit(&self, st: &mut State, mut record: WalRecord) -> u64 {
        if record.is_empty() {
            return st.index;
        }
        st.index += 1;
        record.index = st.index;
        let (index, revision) = (st.index, st.mvcc.current());
        match &self.wal {
            None => self.durable.send_modify(|d| {
                d.index = index;
                d.revision = revision;
            }),
            Some(wal) => {
                if let Err(e) = wal.append(index, revision, record.encode_to_vec()) {
                    self.durable.send_modify(|d| d.failed = Some(e.into()));
                }
                self.maybe_snapshot(st, wal);
            }
        }
        self.auto_compact(st);
        index
    }

    /// Auto-compaction: once history exceeds `retain_revisions` by a tenth, drop what is older
    /// than the newest `retain_revisions` revisions (never past what readers can see).
    fn auto_compact(&self, st: &mut State) {
        let retain = self.options.retain_revisions.max(1);
        let current = st.mvcc.current();
        if current - st.mvcc.compacted() <= retain + retain / 10 {
            return;
        }
        let target = (current - retain).min(self.visible());
        if target > st.mvcc.compacted() {
            st.mvcc.compact(target);
        }
    }

    fn maybe_snapshot(&self, st: &State, wal: &Wal) {
        use std::sync::atomic::Ordering;
        if wal.segment_bytes.load(Ordering::Relaxed) < self.options.snapshot_after_bytes
            || wal.snapshot_pending.swap(true, Ordering::Relaxed)
        {
            return;
        }
        if let Err(e) = wal.snapshot(st.index, st.mvcc.current(), st.snapshot_parts(), None) {
            self.durable.send_modify(|d| d.failed = Some(e.into()));
        }
    }

    async fn wait_durable(&self, index: u64) -> Result<(), Status> {
        let mut rx = self.durable.subscribe();
        let durable = rx
            .wait_for(|d| d.index >= index || d.failed.is_some())
            .await
            .map_err(|_| errors::storage_failed("the store is shutting down"))?;
        if durable.index >= index {
            return Ok(());
        }
        match &durable.failed {
            Some(cause) => Err(errors::storage_failed(cause)),
            None => Ok(()),
        }
    }

    /// Revokes every lease whose time is up (one revision each, like etcd).
    fn expire_due(&self) {
        let mut st = self.lock();
        if self.durable.borrow().failed.is_some() {
            return;
        }
        let now = Instant::now();
        for id in st.lessor.expired(now) {
            // A host cut off for a while (its link reconnecting) keeps its lease: its
            // keepalives wait on the link.
            if self.users().is_some_and(|u| u.lease_held(id, now)) {
                st.lessor.renew(id, now);
                continue;
            }
            if let Ok(record) = st.lease_revoke(id) {
                tracing::debug!("store: lease {id:x} expired");
                self.metrics.leases_expired.fetch_add(1, Relaxed);
                self.commit(&mut st, record);
            }
        }
    }
}

/// The lease clock: checks for expired leases a few times a second while the store lives.
async fn expire_leases(backend: Weak<Backend>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(backend) = backend.upgrade() else {
            return;
        };
        backend.expire_due();
    }
}
