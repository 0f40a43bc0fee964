//! A relay front's shared leases: the subtree's leases live at the front, and the store above
//! holds one lease per relay (per TTL asked), so the leases at the initiator's store are
//! O(relays), not O(hosts), and so are the keepalives on the uplink: one stream, one beat per
//! TTL/3 for the whole subtree.
//!
//! - **Grant** makes a lease here (the ID the child sees), backed by the relay's lease upstream
//!   for that TTL (granted on first use, as the relay, with the TTL the store above settles
//!   on: etcd's minimum included).
//! - **Put and Txn with such a lease** are checked here against the caller's own rights (its
//!   access, as the store above would check it, and that the lease is its own), then written
//!   upstream on the relay's lease, as the relay: the relay may write its subtree's exports
//!   and flags (docs/security.md), as it already holds their credentials. Everything else
//!   (writes without a lease, reads, deletes) passes through with the caller's own token.
//! - **KeepAlive** renews the lease here; **expiry or Revoke** deletes the lease's keys upstream
//!   in one transaction (each key only while it is still on the relay's lease), as the store
//!   deletes an expired lease's keys in one revision.
//! - **The relay's lease expiring upstream** (the uplink was down longer than its TTL) expires
//!   every lease here it backed: a lease expires downstream when it expires upstream. Children
//!   then grant new ones and write their keys again, as after any expiry.
//! - **What children read** names their own leases: a key on the relay's lease is shown with
//!   the lease it was written with here (by the key's revision), in Range, Txn and Put
//!   answers and in watch events.

use super::auth::{Access, Caller};
use super::errors;
use etcd_client::proto::{
    PbAuthenticateRequest, PbAuthenticateResponse, PbCompare, PbDeleteRequest, PbEvent, PbKeyValue,
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesRequest, PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseStatus, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
    PbResponseHeader, PbTargetUnion, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp,
    PbTxnResponse,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::relay_front::{spawn_until, unary, with_token};

/// Compare.target LEASE, and Compare.result EQUAL.
const TARGET_LEASE: i32 = 4;
const RESULT_EQUAL: i32 = 0;
/// How often leases here are checked for expiry.
const EXPIRY_TICK: Duration = Duration::from_millis(200);
/// Revisions remembered per key, to name the lease a key was written with.
const HISTORY: usize = 4;
/// Leases here remembered as gone.
const GONE: usize = 4096;

const GRANT: &str = "/etcdserverpb.Lease/LeaseGrant";
const KEEPALIVE: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
const TIME_TO_LIVE: &str = "/etcdserverpb.Lease/LeaseTimeToLive";
const LEASES: &str = "/etcdserverpb.Lease/LeaseLeases";
const REVOKE: &str = "/etcdserverpb.Lease/LeaseRevoke";
pub(crate) const AUTHENTICATE: &str = "/etcdserverpb.Auth/Authenticate";
pub(crate) const PUT: &str = "/etcdserverpb.KV/Put";
pub(crate) const TXN: &str = "/etcdserverpb.KV/Txn";
pub(crate) const DELETE: &str = "/etcdserverpb.KV/DeleteRange";

/// A lease here, as a child sees it.
struct Local {
    /// The user that granted it (`None`: the store checks no credentials).
    owner: Option<String>,
    /// The relay's lease upstream that holds its keys.
    up: i64,
    ttl: i64,
    deadline: Instant,
    keys: BTreeSet<Vec<u8>>,
}

/// The relay's lease upstream for one TTL a child asked for.
#[derive(Clone, Copy)]
struct Up {
    id: i64,
    /// The TTL the store above granted.
    ttl: i64,
}

#[derive(Default)]
struct State {
    /// Tokens the store above gave children through this front, and to whom.
    tokens: HashMap<String, String>,
    local: HashMap<i64, Local>,
    /// By the TTL asked for.
    up: BTreeMap<i64, Up>,
    /// Which lease here each key is on now.
    attached: BTreeMap<Vec<u8>, i64>,
    /// For each key written on a lease here: (revision, lease here), newest last.
    history: HashMap<Vec<u8>, VecDeque<(i64, i64)>>,
    /// Leases here that expired or were revoked (the newest [`GONE`]): answered as gone, as
    /// the store answers of its own (the store above does not know them).
    gone: VecDeque<i64>,
    header: PbResponseHeader,
}

impl State {
    fn is_up(&self, id: i64) -> bool {
        id != 0 && self.up.values().any(|u| u.id == id)
    }

    fn attach(&mut self, key: &[u8], local: i64, rev: i64) -> bool {
        self.detach(key);
        let Some(l) = self.local.get_mut(&local) else {
            return false;
        };
        l.keys.insert(key.to_vec());
        self.attached.insert(key.to_vec(), local);
        let h = self.history.entry(key.to_vec()).or_default();
        h.push_back((rev, local));
        while h.len() > HISTORY {
            h.pop_front();
        }
        true
    }

    fn detach(&mut self, key: &[u8]) {
        if let Some(old) = self.attached.remove(key)
            && let Some(l) = self.local.get_mut(&old)
        {
            l.keys.remove(key);
        }
    }

    fn detach_range(&mut self, key: &[u8], range_end: &[u8]) {
        let range = super::mvcc::KeyRange::new(key, range_end);
        let keys: Vec<Vec<u8>> = self
            .attached
            .keys()
            .filter(|k| range.contains(k))
            .cloned()
            .collect();
        for k in keys {
            self.detach(&k);
        }
    }

    /// Shows `kv` with the lease here it was written with, when it is on a relay's lease.
    fn localize(&self, kv: &mut PbKeyValue) {
        if !self.is_up(kv.lease) {
            return;
        }
        let found = self.history.get(&kv.key).and_then(|h| {
            h.iter()
                .rev()
                .find(|(rev, _)| *rev <= kv.mod_revision)
                .map(|(_, l)| *l)
        });
        if let Some(local) = found {
            kv.lease = local;
        }
    }

    fn gone(&mut self, id: i64) {
        self.gone.push_back(id);
        while self.gone.len() > GONE {
            self.gone.pop_front();
        }
    }

    fn seen(&mut self, header: Option<&PbResponseHeader>) {
        if let Some(h) = header
            && h.revision >= self.header.revision
        {
            self.header = *h;
        }
    }
}

/// The front's leases.
pub(crate) struct Leases {
    upstream: Channel,
    /// The relay's own credential: `None` when the store checks none.
    credential: Option<(String, String)>,
    relay_token: tokio::sync::Mutex<Option<String>>,
    /// What each user of the subtree may do (checked here before writing on the relay's lease).
    users: HashMap<String, Access>,
    state: Mutex<State>,
    /// Serializes grants of the relay's leases upstream.
    granting: tokio::sync::Mutex<()>,
    keepalive_started: std::sync::Once,
    holds: Arc<Holds>,
    shutdown: CancellationToken,
}

/// Users whose leases at the front do not expire for a while: children whose link to the
/// relay is down (reconnecting), whose keepalives cannot arrive until it is back. The relay
/// holds and releases them; the front renews their leases instead of expiring them.
#[derive(Default)]
pub struct Holds(Mutex<HashMap<String, std::time::Instant>>);

impl Holds {
    /// Keeps the leases of `names` from expiring until `until` (or [`Holds::release`]).
    pub fn hold(&self, names: &[String], until: std::time::Instant) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            held.insert(name.clone(), until);
        }
    }

    pub fn release(&self, names: &[String]) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            held.remove(name);
        }
    }

    fn held(&self, name: &str, now: std::time::Instant) -> bool {
        let held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.get(name).is_some_and(|until| now < *until)
    }
}

impl Leases {
    pub(crate) fn new(
        upstream: Channel,
        credential: Option<(String, String)>,
        users: HashMap<String, Access>,
        holds: Arc<Holds>,
        shutdown: CancellationToken,
    ) -> Arc<Leases> {
        let leases = Arc::new(Leases {
            upstream,
            credential,
            relay_token: tokio::sync::Mutex::new(None),
            users,
            state: Mutex::new(State::default()),
            granting: tokio::sync::Mutex::new(()),
            keepalive_started: std::sync::Once::new(),
            holds,
            shutdown: shutdown.clone(),
        });
        spawn_until(shutdown, leases.clone().expire_loop());
        leases
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // -----------------------------------------------------------------------------------------
    // Identity.

    /// Authenticate, passed up: the token it returns is remembered as the user's.
    pub(crate) async fn authenticate(
        &self,
        req: PbAuthenticateRequest,
    ) -> Result<PbAuthenticateResponse, Status> {
        let name = req.name.clone();
        let resp: PbAuthenticateResponse =
            unary(&self.upstream, AUTHENTICATE, Request::new(req)).await?;
        self.lock().tokens.insert(resp.token.clone(), name);
        Ok(resp)
    }

    /// The caller of a request with `token`; `Ok(None)` when no credentials are checked.
    fn caller(&self, token: Option<&str>) -> Result<Option<Caller>, Status> {
        if self.credential.is_none() {
            return Ok(None);
        }
        let name = token
            .and_then(|t| self.lock().tokens.get(t).cloned())
            .ok_or_else(|| Status::unauthenticated("etcdserver: invalid auth token"))?;
        let access = self
            .users
            .get(&name)
            .cloned()
            .ok_or_else(super::auth::denied)?;
        // Who is calling, as far as this front knows (`None`: no credentials are checked).
        Ok(Some(Caller { name, access }))
    }

    /// The relay's token upstream (`fresh`: authenticate again, the old one was refused).
    async fn relay_token(&self, fresh: bool) -> Result<Option<String>, Status> {
        let Some((name, password)) = &self.credential else {
            return Ok(None);
        };
        let mut token = self.relay_token.lock().await;
        if fresh || token.is_none() {
            let req = PbAuthenticateRequest {
                name: name.clone(),
                password: password.clone(),
            };
            let resp: PbAuthenticateResponse =
                unary(&self.upstream, AUTHENTICATE, Request::new(req)).await?;
            *token = Some(resp.token);
        }
        Ok(token.clone())
    }

    /// A unary call upstream as the relay (authenticating again once if its token is refused:
    /// a store member that failed over knows none of the old ones).
    async fn as_relay<Q, R>(&self, path: &'static str, msg: Q) -> Result<R, Status>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let token = self.relay_token(false).await?;
        match unary(
            &self.upstream,
            path,
            with_token(msg.clone(), token.as_deref()),
        )
        .await
        {
            Err(s) if s.code() == tonic::Code::Unauthenticated && self.credential.is_some() => {
                let token = self.relay_token(true).await?;
                unary(&self.upstream, path, with_token(msg, token.as_deref())).await
            }
            other => other,
        }
    }

    // -----------------------------------------------------------------------------------------
    // The Lease service.

    pub(crate) async fn grant(
        self: &Arc<Self>,
        token: Option<&str>,
        req: PbLeaseGrantRequest,
    ) -> Result<PbLeaseGrantResponse, Status> {
        let caller = self.caller(token)?;
        if req.id != 0 {
            let st = self.lock();
            if st.local.contains_key(&req.id) || st.is_up(req.id) {
                return Err(errors::lease_exists());
            }
        }
        let up = self.up_lease(req.ttl).await?;
        // A header as of now (and the relay's lease checked to be alive).
        let ttl: PbLeaseTimeToLiveResponse = self
            .as_relay(
                TIME_TO_LIVE,
                PbLeaseTimeToLiveRequest {
                    id: up.id,
                    keys: false,
                },
            )
            .await?;
        if ttl.ttl < 0 {
            self.up_gone(up.id);
            return Err(Status::unavailable(
                "store front: the relay's lease expired upstream; try again",
            ));
        }
        let mut st = self.lock();
        st.seen(ttl.header.as_ref());
        let id = if req.id != 0 {
            if st.local.contains_key(&req.id) {
                return Err(errors::lease_exists());
            }
            req.id
        } else {
            loop {
                let id = (rand::random::<u64>() >> 1) as i64;
                if id != 0 && !st.local.contains_key(&id) && !st.is_up(id) {
                    break id;
                }
            }
        };
        st.local.insert(
            id,
            Local {
                owner: caller.map(|c| c.name),
                up: up.id,
                ttl: up.ttl,
                deadline: Instant::now() + secs(up.ttl),
                keys: BTreeSet::new(),
            },
        );
        drop(st);
        self.keepalive_started.call_once(|| {
            spawn_until(self.shutdown.clone(), self.clone().keep_up_alive());
        });
        Ok(PbLeaseGrantResponse {
            header: ttl.header,
            id,
            ttl: up.ttl,
            error: String::new(),
        })
    }

    /// The relay's lease for TTL `ttl`, granted upstream on first use.
    async fn up_lease(&self, ttl: i64) -> Result<Up, Status> {
        let _one = self.granting.lock().await;
        if let Some(up) = self.lock().up.get(&ttl) {
            return Ok(*up);
        }
        let resp: PbLeaseGrantResponse = self
            .as_relay(GRANT, PbLeaseGrantRequest { ttl, id: 0 })
            .await?;
        let up = Up {
            id: resp.id,
            ttl: resp.ttl,
        };
        let mut st = self.lock();
        st.seen(resp.header.as_ref());
        st.up.insert(ttl, up);
        tracing::debug!(
            "store front: lease {:x} upstream for the subtree's {ttl}s leases",
            up.id
        );
        Ok(up)
    }

    /// The relay's lease `id` is gone upstream, and with it the keys of every lease here it
    /// held: those leases are gone too.
    fn up_gone(&self, id: i64) {
        let mut st = self.lock();
        st.up.retain(|_, u| u.id != id);
        let gone: Vec<i64> = st
            .local
            .iter()
            .filter(|(_, l)| l.up == id)
            .map(|(k, _)| *k)
            .collect();
        for local in &gone {
            st.gone(*local);
            if let Some(l) = st.local.remove(local) {
                for k in l.keys {
                    st.attached.remove(&k);
                }
            }
        }
        if !gone.is_empty() {
            tracing::info!(
                "store front: the relay's lease expired upstream; {} leases of the subtree \
                 expire with it",
                gone.len()
            );
        }
    }

    /// Keeps the relay's leases alive upstream: one stream, a beat per lease every third of
    /// its TTL.
    async fn keep_up_alive(self: Arc<Self>) {
        let mut fresh = false;
        loop {
            if let Err(e) = self.keep_up_alive_once(fresh).await {
                tracing::debug!("store front: keeping the relay's leases alive: {e}");
                fresh = e.code() == tonic::Code::Unauthenticated;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn keep_up_alive_once(&self, fresh: bool) -> Result<(), Status> {
        let token = self.relay_token(fresh).await?;
        let (tx, rx) = mpsc::channel::<PbLeaseKeepAliveRequest>(16);
        let mut grpc = tonic::client::Grpc::new(self.upstream.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("store front: the store above: {e}")))?;
        // The first beat is queued before the call: the answer headers come with the first
        // answer.
        self.beat(&tx).await;
        let codec =
            tonic_prost::ProstCodec::<PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse>::default();
        let req = with_token(ReceiverStream::new(rx), token.as_deref());
        let mut answers: Streaming<PbLeaseKeepAliveResponse> = grpc
            .streaming(req, http::uri::PathAndQuery::from_static(KEEPALIVE), codec)
            .await?
            .into_inner();
        let mut last_beat = Instant::now();
        loop {
            let every = self.beat_every();
            tokio::select! {
                answer = answers.message() => {
                    let Some(answer) = answer? else {
                        return Err(Status::unavailable("keepalive stream ended"));
                    };
                    self.lock().seen(answer.header.as_ref());
                    if answer.ttl <= 0 {
                        self.up_gone(answer.id);
                    }
                }
                () = tokio::time::sleep_until(last_beat + every) => {
                    self.beat(&tx).await;
                    last_beat = Instant::now();
                }
            }
        }
    }

    async fn beat(&self, tx: &mpsc::Sender<PbLeaseKeepAliveRequest>) {
        let ids: Vec<i64> = self.lock().up.values().map(|u| u.id).collect();
        for id in ids {
            let _ = tx.send(PbLeaseKeepAliveRequest { id }).await;
        }
    }

    fn beat_every(&self) -> Duration {
        let shortest = self.lock().up.values().map(|u| u.ttl).min().unwrap_or(3);
        (secs(shortest) / 3).max(Duration::from_millis(500))
    }

    /// A child's keepalive stream: each beat renews its lease here (TTL 0: gone, or not its
    /// own, as the store answers).
    pub(crate) fn keep_alive(
        self: &Arc<Self>,
        token: Option<String>,
        mut inbound: Streaming<PbLeaseKeepAliveRequest>,
    ) -> mpsc::Receiver<Result<PbLeaseKeepAliveResponse, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(Ok(req)) = inbound.next().await {
                let caller = me.caller(token.as_deref()).ok().flatten();
                let answer = {
                    let mut st = me.lock();
                    let ttl = match st.local.get_mut(&req.id) {
                        Some(l) if owns(l, caller.as_ref()) => {
                            l.deadline = Instant::now() + secs(l.ttl);
                            l.ttl
                        }
                        _ => 0,
                    };
                    PbLeaseKeepAliveResponse {
                        header: Some(st.header),
                        id: req.id,
                        ttl,
                    }
                };
                if tx.send(Ok(answer)).await.is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// TimeToLive of a lease here; `None`: not one of ours (passed up).
    pub(crate) fn time_to_live(
        &self,
        token: Option<&str>,
        req: &PbLeaseTimeToLiveRequest,
    ) -> Result<Option<PbLeaseTimeToLiveResponse>, Status> {
        let caller = self.caller(token)?;
        let st = self.lock();
        let Some(l) = st.local.get(&req.id) else {
            if st.gone.contains(&req.id) {
                return Ok(Some(PbLeaseTimeToLiveResponse {
                    header: Some(st.header),
                    id: req.id,
                    ttl: -1,
                    granted_ttl: 0,
                    keys: Vec::new(),
                }));
            }
            return Ok(None);
        };
        if !owns(l, caller.as_ref()) {
            return Err(super::auth::denied());
        }
        Ok(Some(PbLeaseTimeToLiveResponse {
            header: Some(st.header),
            id: req.id,
            ttl: l
                .deadline
                .saturating_duration_since(Instant::now())
                .as_secs() as i64,
            granted_ttl: l.ttl,
            keys: if req.keys {
                l.keys.iter().cloned().collect()
            } else {
                Vec::new()
            },
        }))
    }

    /// Revoke of a lease here (its keys deleted in one revision); `None`: not one of ours.
    pub(crate) async fn revoke(
        &self,
        token: Option<&str>,
        req: &PbLeaseRevokeRequest,
    ) -> Result<Option<PbLeaseRevokeResponse>, Status> {
        let caller = self.caller(token)?;
        let taken = {
            let mut st = self.lock();
            match st.local.get(&req.id) {
                None if st.gone.contains(&req.id) => return Err(errors::lease_not_found()),
                None => return Ok(None),
                Some(l) if !owns(l, caller.as_ref()) => return Err(super::auth::denied()),
                Some(_) => {}
            }
            take(&mut st, req.id)
        };
        let header = self.delete_keys(taken).await?;
        Ok(Some(PbLeaseRevokeResponse {
            header: Some(header),
        }))
    }

    /// The store above's list, with the relay's leases shown as the leases here they hold.
    pub(crate) fn leases_here(&self, mut resp: PbLeaseLeasesResponse) -> PbLeaseLeasesResponse {
        let st = self.lock();
        resp.leases.retain(|l| !st.is_up(l.id));
        resp.leases
            .extend(st.local.keys().map(|&id| PbLeaseStatus { id }));
        resp
    }

    pub(crate) async fn leases(
        &self,
        req: Request<PbLeaseLeasesRequest>,
    ) -> Result<PbLeaseLeasesResponse, Status> {
        let token = super::relay_front::token_of(&req);
        let resp = unary(
            &self.upstream,
            LEASES,
            with_token(req.into_inner(), token.as_deref()),
        )
        .await?;
        Ok(self.leases_here(resp))
    }

    /// Deletes the keys a lease here held, each only while it is still on the relay's lease;
    /// the header of the revision that did it (or the latest known, when nothing was left).
    async fn delete_keys(
        &self,
        (up, keys): (i64, Vec<Vec<u8>>),
    ) -> Result<PbResponseHeader, Status> {
        if keys.is_empty() {
            return Ok(self.lock().header);
        }
        let all = delete_if_on(up, &keys);
        let resp: PbTxnResponse = self.as_relay(TXN, all).await?;
        let mut header = resp.header.unwrap_or_default();
        if !resp.succeeded {
            // Some key moved on meanwhile: each of the others alone.
            for k in &keys {
                let one: PbTxnResponse = self
                    .as_relay(TXN, delete_if_on(up, std::slice::from_ref(k)))
                    .await?;
                if one.succeeded {
                    header = one.header.unwrap_or(header);
                }
            }
        }
        self.lock().seen(Some(&header));
        Ok(header)
    }

    async fn expire_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(EXPIRY_TICK).await;
            let now = Instant::now();
            let expired: Vec<(i64, i64, Vec<Vec<u8>>)> = {
                let mut st = self.lock();
                // A held owner's leases are renewed instead (its link is down).
                for l in st.local.values_mut() {
                    if l.deadline <= now
                        && let Some(owner) = &l.owner
                        && self.holds.held(owner, now.into_std())
                    {
                        l.deadline = now + secs(l.ttl);
                    }
                }
                let ids: Vec<i64> = st
                    .local
                    .iter()
                    .filter(|(_, l)| l.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                ids.into_iter()
                    .map(|id| {
                        let (up, keys) = take(&mut st, id);
                        (id, up, keys)
                    })
                    .collect()
            };
            for (id, up, keys) in expired {
                tracing::debug!(
                    "store front: lease {id:x} expired; deleting its {} keys",
                    keys.len()
                );
                if let Err(e) = self.delete_keys((up, keys)).await {
                    tracing::warn!("store front: deleting the keys of expired lease {id:x}: {e}");
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Writes.

    /// Whether `id` is a lease here, and the relay's lease upstream that holds its keys.
    fn up_of(&self, id: i64) -> Option<i64> {
        if id == 0 {
            return None;
        }
        self.lock().local.get(&id).map(|l| l.up)
    }

    /// A Txn as a child sent it: with a lease here on any put, checked here and sent as the
    /// relay with the relay's lease (`Some`); otherwise `None` (pass it through as it is,
    /// after [`Leases::rewrite_compares`]).
    pub(crate) async fn txn(
        &self,
        token: Option<&str>,
        txn: &PbTxnRequest,
    ) -> Result<Option<PbTxnResponse>, Status> {
        if !self.puts_on_leases_here(txn) {
            return Ok(None);
        }
        let caller = self.caller(token)?;
        let mut up = txn.clone();
        self.rewrite(&mut up, caller.as_ref())?;
        let mut resp: PbTxnResponse = self.as_relay(TXN, up).await?;
        self.record_txn(txn, &resp);
        self.localize_txn(&mut resp);
        Ok(Some(resp))
    }

    fn puts_on_leases_here(&self, txn: &PbTxnRequest) -> bool {
        let st = self.lock();
        fn any(st: &State, ops: &[PbTxnRequestOp]) -> bool {
            ops.iter().any(|op| match &op.request {
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    !p.ignore_lease && st.local.contains_key(&p.lease)
                }
                Some(PbTxnOpRequest::RequestTxn(t)) => any(st, &t.success) || any(st, &t.failure),
                _ => false,
            })
        }
        any(&st, &txn.success) || any(&st, &txn.failure)
    }

    /// Rewrites leases here to the relay's, checking every op against `caller`'s rights as
    /// the store above would.
    fn rewrite(&self, txn: &mut PbTxnRequest, caller: Option<&Caller>) -> Result<(), Status> {
        rewrite_txn(&self.lock(), txn, caller)
    }

    /// Compares on a lease here compare with the relay's lease (a Txn passed through).
    pub(crate) fn rewrite_compares(&self, txn: &mut PbTxnRequest) {
        let st = self.lock();
        rewrite_all_compares(&st, txn);
    }

    /// After a Txn ran: the keys its puts attached to leases here, or took off them.
    fn record_txn(&self, txn: &PbTxnRequest, resp: &PbTxnResponse) {
        let mut st = self.lock();
        st.seen(resp.header.as_ref());
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        record_ops(&mut st, txn, resp, rev);
    }

    /// After a Txn passed through ran.
    pub(crate) fn record_passed_txn(&self, txn: &PbTxnRequest, resp: &mut PbTxnResponse) {
        self.record_txn(txn, resp);
        self.localize_txn(resp);
    }

    /// A Put with a lease here, checked and sent as the relay; `None`: pass it through.
    pub(crate) async fn put(
        &self,
        token: Option<&str>,
        put: &etcd_client::proto::PbPutRequest,
    ) -> Result<Option<etcd_client::proto::PbPutResponse>, Status> {
        if put.ignore_lease || self.up_of(put.lease).is_none() {
            return Ok(None);
        }
        let txn = PbTxnRequest {
            compare: vec![],
            success: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestPut(put.clone())),
            }],
            failure: vec![],
        };
        let Some(resp) = self.txn(token, &txn).await? else {
            return Ok(None);
        };
        let prev_kv = resp
            .responses
            .into_iter()
            .next()
            .and_then(|r| match r.response {
                Some(PbTxnOpResponse::ResponsePut(p)) => p.prev_kv,
                _ => None,
            });
        Ok(Some(etcd_client::proto::PbPutResponse {
            header: resp.header,
            prev_kv,
        }))
    }

    /// After a Put passed through ran (without a lease here: the key leaves any it was on).
    pub(crate) fn record_passed_put(
        &self,
        put: &etcd_client::proto::PbPutRequest,
        resp: &mut etcd_client::proto::PbPutResponse,
    ) {
        let mut st = self.lock();
        st.seen(resp.header.as_ref());
        if !put.ignore_lease {
            st.detach(&put.key);
        }
        if let Some(kv) = &mut resp.prev_kv {
            st.localize(kv);
        }
    }

    /// After a DeleteRange passed through ran.
    pub(crate) fn record_passed_delete(
        &self,
        req: &PbDeleteRequest,
        resp: &mut etcd_client::proto::PbDeleteResponse,
    ) {
        let mut st = self.lock();
        st.seen(resp.header.as_ref());
        st.detach_range(&req.key, &req.range_end);
        for kv in &mut resp.prev_kvs {
            st.localize(kv);
        }
    }

    // -----------------------------------------------------------------------------------------
    // What children read.

    pub(crate) fn localize_kvs<'a>(&self, kvs: impl IntoIterator<Item = &'a mut PbKeyValue>) {
        let st = self.lock();
        if st.up.is_empty() {
            return;
        }
        for kv in kvs {
            st.localize(kv);
        }
    }

    pub(crate) fn localize_events(&self, events: &mut [PbEvent]) {
        let st = self.lock();
        if st.up.is_empty() && st.history.is_empty() {
            return;
        }
        for e in events {
            if let Some(kv) = &mut e.kv {
                st.localize(kv);
            }
            if let Some(kv) = &mut e.prev_kv {
                st.localize(kv);
            }
        }
    }

    pub(crate) fn localize_txn(&self, resp: &mut PbTxnResponse) {
        let st = self.lock();
        localize_txn_in(&st, resp);
    }
}

fn localize_txn_in(st: &State, resp: &mut PbTxnResponse) {
    for r in &mut resp.responses {
        match &mut r.response {
            Some(PbTxnOpResponse::ResponseRange(rr)) => {
                for kv in &mut rr.kvs {
                    st.localize(kv);
                }
            }
            Some(PbTxnOpResponse::ResponsePut(p)) => {
                if let Some(kv) = &mut p.prev_kv {
                    st.localize(kv);
                }
            }
            Some(PbTxnOpResponse::ResponseDeleteRange(d)) => {
                for kv in &mut d.prev_kvs {
                    st.localize(kv);
                }
            }
            Some(PbTxnOpResponse::ResponseTxn(t)) => localize_txn_in(st, t),
            None => {}
        }
    }
}

fn rewrite_compares(st: &State, compares: &mut [PbCompare]) {
    for c in compares {
        if c.target == TARGET_LEASE
            && let Some(PbTargetUnion::Lease(id)) = &mut c.target_union
            && let Some(l) = st.local.get(id)
        {
            *id = l.up;
        }
    }
}

fn rewrite_all_compares(st: &State, txn: &mut PbTxnRequest) {
    rewrite_compares(st, &mut txn.compare);
    for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
        if let Some(PbTxnOpRequest::RequestTxn(t)) = &mut op.request {
            rewrite_all_compares(st, t);
        }
    }
}

/// [`Leases::rewrite`], nested Txns included.
fn rewrite_txn(st: &State, txn: &mut PbTxnRequest, caller: Option<&Caller>) -> Result<(), Status> {
    rewrite_compares(st, &mut txn.compare);
    if let Some(c) = caller
        && !txn
            .compare
            .iter()
            .all(|cmp| c.may_read(&cmp.key, &cmp.range_end))
    {
        return Err(super::auth::denied());
    }
    for op in txn.success.iter_mut().chain(txn.failure.iter_mut()) {
        match &mut op.request {
            Some(PbTxnOpRequest::RequestPut(p)) => {
                if let Some(c) = caller
                    && (!c.may_write(&p.key, &[]) || (p.prev_kv && !c.may_read(&p.key, &[])))
                {
                    return Err(super::auth::denied());
                }
                if !p.ignore_lease
                    && let Some(l) = st.local.get(&p.lease)
                {
                    if !owns(l, caller) {
                        return Err(super::auth::denied());
                    }
                    p.lease = l.up;
                } else if p.lease != 0 && caller.is_some() {
                    // Not a lease here: as the relay, no other lease may be used.
                    return Err(super::auth::denied());
                }
            }
            Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                if let Some(c) = caller
                    && (!c.may_write(&d.key, &d.range_end)
                        || (d.prev_kv && !c.may_read(&d.key, &d.range_end)))
                {
                    return Err(super::auth::denied());
                }
            }
            Some(PbTxnOpRequest::RequestRange(r)) => {
                if let Some(c) = caller
                    && !c.may_read(&r.key, &r.range_end)
                {
                    return Err(super::auth::denied());
                }
            }
            Some(PbTxnOpRequest::RequestTxn(t)) => rewrite_txn(st, t, caller)?,
            None => {}
        }
    }
    Ok(())
}

/// Follows the branch a Txn took: puts on leases here attach their keys; other puts (but
/// ignore_lease ones) and deletes take keys off.
fn record_ops(st: &mut State, txn: &PbTxnRequest, resp: &PbTxnResponse, rev: i64) {
    let ops = if resp.succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    for (op, r) in ops.iter().zip(&resp.responses) {
        match (&op.request, &r.response) {
            (Some(PbTxnOpRequest::RequestPut(p)), _) => {
                if p.ignore_lease {
                    continue;
                }
                if st.local.contains_key(&p.lease) {
                    st.attach(&p.key, p.lease, rev);
                } else {
                    st.detach(&p.key);
                }
            }
            (Some(PbTxnOpRequest::RequestDeleteRange(d)), _) => {
                st.detach_range(&d.key, &d.range_end);
            }
            (Some(PbTxnOpRequest::RequestTxn(t)), Some(PbTxnOpResponse::ResponseTxn(tr))) => {
                record_ops(st, t, tr, rev);
            }
            _ => {}
        }
    }
}

/// Takes lease `id` out: the relay's lease its keys are on, and its keys.
fn take(st: &mut State, id: i64) -> (i64, Vec<Vec<u8>>) {
    let Some(l) = st.local.remove(&id) else {
        return (0, Vec::new());
    };
    st.gone(id);
    for k in &l.keys {
        st.attached.remove(k);
    }
    (l.up, l.keys.into_iter().collect())
}

fn owns(l: &Local, caller: Option<&Caller>) -> bool {
    match (caller, &l.owner) {
        (None, _) => true,
        (Some(c), Some(owner)) => *owner == c.name,
        (Some(_), None) => false,
    }
}

/// A Txn that deletes `keys` if every one is still on lease `up`.
fn delete_if_on(up: i64, keys: &[Vec<u8>]) -> PbTxnRequest {
    PbTxnRequest {
        compare: keys
            .iter()
            .map(|k| PbCompare {
                result: RESULT_EQUAL,
                target: TARGET_LEASE,
                key: k.clone(),
                range_end: vec![],
                target_union: Some(PbTargetUnion::Lease(up)),
            })
            .collect(),
        success: keys
            .iter()
            .map(|k| PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestDeleteRange(PbDeleteRequest {
                    key: k.clone(),
                    ..Default::default()
                })),
            })
            .collect(),
        failure: vec![],
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(1) as u64)
}

// ---------------------------------------------------------------------------------------------
// The services.

/// The Lease service children call.
pub(crate) struct FrontLease {
    pub leases: Arc<Leases>,
    pub upstream: Channel,
}

type KeepAliveStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<PbLeaseKeepAliveResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl PbLeaseService for FrontLease {
    async fn lease_grant(
        &self,
        req: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let token = super::relay_front::token_of(&req);
        let resp = self
            .leases
            .grant(token.as_deref(), req.into_inner())
            .await?;
        Ok(Response::new(resp))
    }

    async fn lease_revoke(
        &self,
        req: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        let token = super::relay_front::token_of(&req);
        if let Some(resp) = self.leases.revoke(token.as_deref(), req.get_ref()).await? {
            return Ok(Response::new(resp));
        }
        let resp = unary(
            &self.upstream,
            REVOKE,
            with_token(req.into_inner(), token.as_deref()),
        );
        resp.await.map(Response::new)
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let token = super::relay_front::token_of(&req);
        let rx = self.leases.keep_alive(token, req.into_inner());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let token = super::relay_front::token_of(&req);
        if let Some(resp) = self.leases.time_to_live(token.as_deref(), req.get_ref())? {
            return Ok(Response::new(resp));
        }
        let resp = unary(
            &self.upstream,
            TIME_TO_LIVE,
            with_token(req.into_inner(), token.as_deref()),
        );
        resp.await.map(Response::new)
    }

    async fn lease_leases(
        &self,
        req: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        self.leases.leases(req).await.map(Response::new)
    }
}

/// Auth.Authenticate, passed up, its token remembered ([`Leases::authenticate`]).
pub(crate) struct Authenticate(pub Arc<Leases>);

impl tonic::server::UnaryService<PbAuthenticateRequest> for Authenticate {
    type Response = PbAuthenticateResponse;
    type Future = futures::future::BoxFuture<'static, Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<PbAuthenticateRequest>) -> Self::Future {
        let leases = self.0.clone();
        Box::pin(async move {
            leases
                .authenticate(request.into_inner())
                .await
                .map(Response::new)
        })
    }
}
