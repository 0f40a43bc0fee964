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
use super::mvcc::{Change, KeyRange, RevisionError};
use super::state::{Ids, State};
use super::wal::{self, Wal, WalRecord};
use etcd_client::proto::{
    PbRangeRequest, PbRangeResponse, PbResponseHeader, PbTxnRequest, PbTxnResponse,
};
use prost::Message;
use std::path::PathBuf;
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            data_dir: None,
            retain_revisions: 10_000,
            snapshot_after_bytes: 64 << 20,
            progress_notify_interval: Duration::from_secs(60),
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
}

/// What `Status` reports besides headers.
pub struct StatusInfo {
    pub index: u64,
    pub db_size: i64,
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
                        opened.write_snapshot(&state.snapshot())?;
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
        let wal = match opened {
            None => None,
            Some(opened) => {
                let tx = durable.clone();
                Some(opened.start(Box::new(move |result| {
                    tx.send_modify(|d| match result {
                        Ok((index, revision)) => {
                            d.index = d.index.max(index);
                            d.revision = d.revision.max(revision);
                        }
                        Err(e) => d.failed = Some(e.into()),
                    })
                }))?)
            }
        };
        let backend = Arc::new(Backend {
            state: Mutex::new(state),
            durable,
            wal,
            ids,
            options,
            closing: CancellationToken::new(),
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
            let (resp, record) = st.txn(req)?;
            (resp, self.commit(&mut st, record))
        };
        self.wait_durable(wait.1).await?;
        Ok(wait.0)
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
        let (id, ttl, rev, index) = {
            let mut st = self.lock();
            self.check_writable()?;
            let (id, ttl, record) = st.lease_grant(id, ttl, Instant::now())?;
            (id, ttl, st.mvcc.current(), self.commit(&mut st, record))
        };
        self.wait_durable(index).await?;
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
        Ok(rev)
    }

    /// Restarts a lease's TTL; returns the TTL, 0 if the lease does not exist (as etcd does).
    pub fn lease_keep_alive(&self, id: i64) -> i64 {
        self.lock().lessor.renew(id, Instant::now()).unwrap_or(0)
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
        let st = self.lock();
        let db_size = self.wal.as_ref().map_or(0, |w| {
            w.segment_bytes.load(std::sync::atomic::Ordering::Relaxed)
        }) as i64;
        StatusInfo {
            index: st.index,
            db_size,
        }
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
        let bytes = st.snapshot().encode_to_vec();
        if let Err(e) = wal.snapshot(st.index, st.mvcc.current(), bytes) {
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
        for id in st.lessor.expired(Instant::now()) {
            if let Ok(record) = st.lease_revoke(id) {
                tracing::debug!("store: lease {id:x} expired");
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
