//! A relay's store front: the etcd v3 API served to the relay's subtree, so that what a
//! hundred leaves watch crosses the relay's uplink once, not a hundred times.
//!
//! Children's store tunnels end at the front (a Unix socket in the relay's working dir) instead
//! of being spliced through to the relay's own tunnel. The front:
//!
//! - **passes every call through** to the store above (over one HTTP/2 connection), with its
//!   metadata untouched: the caller's own token goes upstream, so the store above checks every
//!   read, write and lease against the caller's own rights, and revisions stay the initiator's.
//!   Authenticate passes through too: the front holds no passwords of its children.
//! - **coalesces watches** within the shared range (the run's exports): one upstream watch,
//!   started with the front and resumed after a break, feeds every child watch inside it. The
//!   front keeps the events it saw in a bounded buffer, so a child watch that starts at a past
//!   revision the buffer covers is replayed from it; one that starts earlier, that asks for
//!   fragments or previous values (the shared watch carries none), that lies outside the shared range, or that falls behind the buffer is served
//!   by a watch of its own upstream, with the caller's token, which keeps etcd's answers
//!   (compaction errors included) exactly. Before a child's watch is served from the shared
//!   one, the front asks the store above, with the child's token, whether that child may read
//!   the range (a count-only Range): the store above stays the one authority.
//! - per child watch it keeps the API's promises: a `created` response whose header is the
//!   revision it is synced to, events in revision order with nothing missed or repeated,
//!   filters as asked, progress notifications when asked, cancellation.
//!
//! Unlike etcd's grpc-proxy, whose coalesced watchers could be served from a cache that had
//! gone stale (etcd issue 14665), a child here is only ever served events the front saw on an
//! upstream watch that was unbroken since the child's start revision; any gap sends it to an
//! upstream watch of its own.

use super::auth::Access;
use super::auth::prefix_end;
use super::front_cache::{self, Cache};
pub use super::front_leases::Holds;
use super::front_leases::{self, Authenticate, FrontLease, Leases};
use super::mvcc::KeyRange;
use etcd_client::proto::{
    PbAuthenticateRequest, PbAuthenticateResponse, PbClusterServer, PbClusterService,
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbEvent,
    PbKvServer, PbKvService, PbLeaseServer, PbMember, PbMemberAddRequest, PbMemberAddResponse,
    PbMemberListRequest, PbMemberListResponse, PbMemberPromoteRequest, PbMemberPromoteResponse,
    PbMemberRemoveRequest, PbMemberRemoveResponse, PbMemberUpdateRequest, PbMemberUpdateResponse,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbResponseHeader, PbTxnRequest, PbTxnResponse, PbWatchRequest, PbWatchRequestUnion,
    PbWatchResponse, PbWatchServer, PbWatchService,
};
use futures::future::BoxFuture;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

// WatchCreateRequest.FilterType values.
const FILTER_NOPUT: i32 = 0;
const FILTER_NODELETE: i32 = 1;
const EVENT_DELETE: i32 = 1;

/// Events the front keeps for replay (a child watch that starts in the past).
const BUFFER_EVENTS: usize = 20_000;
/// The largest answer taken from the store above (as the store client's).
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// Responses a child watch may be behind the shared watch before it is moved to a watch of
/// its own upstream.
const LAG: usize = 4096;

/// What the front needs to know.
pub struct FrontConfig {
    /// The key prefixes whose watches are shared, one upstream watch each (a relay's: the
    /// run's exports). A child's watch or read inside one of them is served from it.
    pub shared_prefixes: Vec<Vec<u8>>,
    /// The relay's own store credential (name, password): the shared watch runs as the relay,
    /// and so do writes on the relay's shared leases (front_leases.rs).
    pub credential: Option<(String, String)>,
    /// What each store user of the subtree may do, by user name: checked here before a write
    /// goes upstream on the relay's lease (with a credential; empty without).
    pub users: HashMap<String, Access>,
    /// Children whose leases the front renews instead of expiring (their link is down).
    pub holds: Arc<Holds>,
}

/// The calls the front answers itself: Watch, and the Cluster service (passed through, but
/// with the front's own address as every member's client URL, as etcd's grpc-proxy does: the
/// store's own addresses mean nothing below a relay).
fn answered_here(path: &str) -> bool {
    [
        WATCH_PATH,
        RANGE_PATH,
        front_leases::PUT,
        front_leases::TXN,
        front_leases::DELETE,
    ]
    .contains(&path)
        || path.starts_with("/etcdserverpb.Cluster/")
        || path.starts_with("/etcdserverpb.Lease/")
}

/// Where the front listens: a relay's Unix socket, or (in tests) a loopback TCP listener.
pub enum FrontListener {
    Unix(PathBuf),
    Tcp(tokio::net::TcpListener),
}

/// Serves the front on the Unix socket `socket` until `shutdown`; calls go to `upstream`.
pub async fn serve(
    socket: PathBuf,
    upstream: Channel,
    config: FrontConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    serve_on(FrontListener::Unix(socket), upstream, config, shutdown).await
}

/// [`serve`] on any [`FrontListener`].
pub async fn serve_on(
    listener: FrontListener,
    upstream: Channel,
    config: FrontConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (listener, advertise) = match listener {
        FrontListener::Unix(socket) => {
            let _ = std::fs::remove_file(&socket);
            let bound = tokio::net::UnixListener::bind(&socket)?;
            let url = format!("unix:{}", socket.display());
            (Bound::Unix(bound, socket), url)
        }
        FrontListener::Tcp(l) => {
            let url = format!("http://{}", l.local_addr()?);
            (Bound::Tcp(l), url)
        }
    };
    let hubs: Vec<Arc<Hub>> = config
        .shared_prefixes
        .iter()
        .map(|prefix| {
            let credential = config.credential.clone();
            Hub::start(upstream.clone(), prefix, credential, shutdown.clone())
        })
        .collect();
    let hubs = Arc::new(Hubs(hubs));
    let leases = Leases::new(
        upstream.clone(),
        config.credential.clone(),
        config.users,
        config.holds,
        shutdown.clone(),
    );
    let kv = PbKvServer::new(FrontKv {
        hubs: hubs.clone(),
        upstream: upstream.clone(),
        leases: leases.clone(),
    });
    let watch = PbWatchServer::new(FrontWatch {
        hubs,
        upstream: upstream.clone(),
        leases: leases.clone(),
    });
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .layer(PassLayer(upstream.clone(), leases.clone()))
        .add_service(watch)
        .add_service(kv)
        .add_service(PbLeaseServer::new(FrontLease {
            leases,
            upstream: upstream.clone(),
        }))
        .add_service(PbClusterServer::new(FrontCluster {
            upstream,
            advertise,
        }));
    Ok(tokio::spawn(async move {
        let signal = async move { shutdown.cancelled().await };
        let served = match listener {
            Bound::Unix(l, socket) => {
                let r = router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(l), signal)
                    .await;
                let _ = std::fs::remove_file(&socket);
                r
            }
            Bound::Tcp(l) => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
                router.serve_with_incoming_shutdown(incoming, signal).await
            }
        };
        if let Err(e) = served {
            tracing::warn!("store front: {e}");
        }
    }))
}

enum Bound {
    Unix(tokio::net::UnixListener, PathBuf),
    Tcp(tokio::net::TcpListener),
}

// ---------------------------------------------------------------------------------------------
// Everything but Watch: passed through.

#[derive(Clone)]
struct PassLayer(Channel, Arc<Leases>);

impl tower::Layer<Routes> for PassLayer {
    type Service = PassService;

    fn layer(&self, inner: Routes) -> PassService {
        PassService {
            inner,
            upstream: self.0.clone(),
            leases: self.1.clone(),
        }
    }
}

#[derive(Clone)]
struct PassService {
    inner: Routes,
    upstream: Channel,
    leases: Arc<Leases>,
}

const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";
const RANGE_PATH: &str = "/etcdserverpb.KV/Range";

impl tower::Service<http::Request<Body>> for PassService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<http::Request<Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if answered_here(req.uri().path()) {
            let call = self.inner.call(req);
            return Box::pin(call);
        }
        if req.uri().path() == front_leases::AUTHENTICATE {
            // Passed up, with the token it returns remembered as the user's (front_leases.rs).
            let svc = Authenticate(self.leases.clone());
            return Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(svc, req).await)
            });
        }
        let mut upstream = self.upstream.clone();
        Box::pin(async move {
            let ready = tower::ServiceExt::ready(&mut upstream).await;
            let answer = match ready {
                Ok(svc) => tower::Service::call(svc, req).await,
                Err(e) => Err(e),
            };
            Ok(answer.unwrap_or_else(|e| {
                Status::unavailable(format!("store front: the store above: {e}")).into_http()
            }))
        })
    }
}

/// Runs `task` until it ends or `shutdown` is cancelled.
pub(crate) fn spawn_until<F>(shutdown: CancellationToken, task: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            () = task => {}
            () = shutdown.cancelled() => {}
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Calls the front makes itself.

pub(crate) fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(token) = token
        && let Ok(value) = token.parse()
    {
        req.metadata_mut().insert("token", value);
    }
    req
}

pub(crate) async fn unary<Q, R>(
    upstream: &Channel,
    path: &'static str,
    req: Request<Q>,
) -> Result<R, Status>
where
    Q: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    // As large as the store client takes (a read of every export can be big).
    let mut grpc =
        tonic::client::Grpc::new(upstream.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("store front: the store above: {e}")))?;
    let codec = tonic_prost::ProstCodec::<Q, R>::default();
    grpc.unary(req, http::uri::PathAndQuery::from_static(path), codec)
        .await
        .map(Response::into_inner)
}

/// An upstream watch stream that starts with `first`: later requests go in through the
/// sender, responses come out. (`first` is queued before the call: etcd sends the response
/// headers only with its first answer, so waiting for them before sending would hang.)
async fn open_watch(
    upstream: &Channel,
    token: Option<&str>,
    first: PbWatchRequest,
) -> Result<(mpsc::Sender<PbWatchRequest>, Streaming<PbWatchResponse>), Status> {
    let (tx, rx) = mpsc::channel(16);
    tx.send(first)
        .await
        .map_err(|_| Status::internal("store front: watch request queue closed"))?;
    let mut grpc = tonic::client::Grpc::new(upstream.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("store front: the store above: {e}")))?;
    let codec = tonic_prost::ProstCodec::<PbWatchRequest, PbWatchResponse>::default();
    let req = with_token(ReceiverStream::new(rx), token);
    let resp = grpc
        .streaming(req, http::uri::PathAndQuery::from_static(WATCH_PATH), codec)
        .await?;
    Ok((tx, resp.into_inner()))
}

fn create_request(
    key: &[u8],
    range_end: &[u8],
    start_revision: i64,
    prev_kv: bool,
    progress_notify: bool,
) -> PbWatchRequest {
    let mut req = PbWatchRequest {
        request_union: Some(PbWatchRequestUnion::CreateRequest(Default::default())),
    };
    if let Some(PbWatchRequestUnion::CreateRequest(c)) = &mut req.request_union {
        c.key = key.to_vec();
        c.range_end = range_end.to_vec();
        c.start_revision = start_revision;
        c.prev_kv = prev_kv;
        c.progress_notify = progress_notify;
    }
    req
}

// ---------------------------------------------------------------------------------------------
// The KV service: serializable reads inside the shared range from the cache, the rest passed
// through. (Only Range is routed here; the others pass through as bytes, but are written out
// as passing through should they ever be routed here.)

struct FrontKv {
    hubs: Arc<Hubs>,
    upstream: Channel,
    leases: Arc<Leases>,
}

/// Passes a unary call upstream with the caller's token.
async fn pass<Q, R>(
    upstream: &Channel,
    path: &'static str,
    req: Request<Q>,
) -> Result<Response<R>, Status>
where
    Q: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    let token = token_of(&req);
    let resp = unary(
        upstream,
        path,
        with_token(req.into_inner(), token.as_deref()),
    );
    resp.await.map(Response::new)
}

#[tonic::async_trait]
impl PbKvService for FrontKv {
    async fn range(
        &self,
        req: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let r = req.get_ref();
        let hub = self.hubs.covering(&r.key, &r.range_end);
        if let Some(hub) = hub.filter(|_| front_cache::answerable(r)) {
            let token = token_of(&req);
            if let Some(mut resp) = hub.range(&self.upstream, token.as_deref(), r).await? {
                self.leases.localize_kvs(&mut resp.kvs);
                return Ok(Response::new(resp));
            }
        }
        let mut resp: Response<PbRangeResponse> = pass(&self.upstream, RANGE_PATH, req).await?;
        self.leases.localize_kvs(&mut resp.get_mut().kvs);
        Ok(resp)
    }

    type RangeStreamStream =
        Pin<Box<dyn Stream<Item = Result<PbRangeStreamResponse, Status>> + Send + 'static>>;

    /// Not routed here (it passes through as bytes, to the store's own answer).
    async fn range_stream(
        &self,
        _req: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(Status::unimplemented(
            "store front: KV.RangeStream is passed through",
        ))
    }

    /// A put on a lease here goes up on the relay's lease (front_leases.rs); others pass.
    async fn put(&self, req: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        let token = token_of(&req);
        let put = req.into_inner();
        if let Some(resp) = self.leases.put(token.as_deref(), &put).await? {
            return Ok(Response::new(resp));
        }
        let mut resp: PbPutResponse = unary(
            &self.upstream,
            front_leases::PUT,
            with_token(put.clone(), token.as_deref()),
        )
        .await?;
        self.leases.record_passed_put(&put, &mut resp);
        Ok(Response::new(resp))
    }

    async fn delete_range(
        &self,
        req: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let token = token_of(&req);
        let del = req.into_inner();
        let mut resp: PbDeleteResponse = unary(
            &self.upstream,
            front_leases::DELETE,
            with_token(del.clone(), token.as_deref()),
        )
        .await?;
        self.leases.record_passed_delete(&del, &mut resp);
        Ok(Response::new(resp))
    }

    /// A txn putting on a lease here goes up as the relay (front_leases.rs); others pass,
    /// with compares on leases here made on the relay's.
    async fn txn(&self, req: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        let token = token_of(&req);
        let txn = req.into_inner();
        if let Some(resp) = self.leases.txn(token.as_deref(), &txn).await? {
            return Ok(Response::new(resp));
        }
        let mut up = txn.clone();
        self.leases.rewrite_compares(&mut up);
        let mut resp: PbTxnResponse = unary(
            &self.upstream,
            front_leases::TXN,
            with_token(up, token.as_deref()),
        )
        .await?;
        self.leases.record_passed_txn(&txn, &mut resp);
        Ok(Response::new(resp))
    }

    async fn compact(
        &self,
        req: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        pass(&self.upstream, "/etcdserverpb.KV/Compact", req).await
    }
}

// ---------------------------------------------------------------------------------------------
// The Cluster service: passed through, the front's address advertised.

struct FrontCluster {
    upstream: Channel,
    advertise: String,
}

pub(crate) fn token_of<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl FrontCluster {
    async fn pass<Q, R>(&self, path: &'static str, req: Request<Q>) -> Result<Response<R>, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        pass(&self.upstream, path, req).await
    }

    fn advertised(&self, members: &mut [PbMember]) {
        for m in members {
            if !m.client_ur_ls.is_empty() {
                m.client_ur_ls = vec![self.advertise.clone()];
            }
        }
    }
}

#[tonic::async_trait]
impl PbClusterService for FrontCluster {
    async fn member_add(
        &self,
        req: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        self.pass("/etcdserverpb.Cluster/MemberAdd", req).await
    }

    async fn member_remove(
        &self,
        req: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        self.pass("/etcdserverpb.Cluster/MemberRemove", req).await
    }

    async fn member_update(
        &self,
        req: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        self.pass("/etcdserverpb.Cluster/MemberUpdate", req).await
    }

    async fn member_list(
        &self,
        req: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        let mut resp: Response<PbMemberListResponse> =
            self.pass("/etcdserverpb.Cluster/MemberList", req).await?;
        self.advertised(&mut resp.get_mut().members);
        Ok(resp)
    }

    async fn member_promote(
        &self,
        req: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        self.pass("/etcdserverpb.Cluster/MemberPromote", req).await
    }
}

// ---------------------------------------------------------------------------------------------
// The shared watch.

/// One upstream response, as every child watch inside the shared range may see it.
#[derive(Debug)]
enum Item {
    /// Events (in revision order) and the header they came with.
    Events {
        header: PbResponseHeader,
        events: Vec<PbEvent>,
    },
    /// A progress notification: nothing in the shared range up to `header.revision`.
    Progress { header: PbResponseHeader },
    /// The shared watch broke and could not resume without a gap: every child watch served
    /// from it moves to a watch of its own.
    Gap,
}

struct HubState {
    /// Every event in the shared range with a revision at or after `first` is in `buffer`,
    /// and every one up to `current` was seen. 0: not yet started.
    first: i64,
    current: i64,
    header: PbResponseHeader,
    buffer: VecDeque<Arc<Item>>,
    buffered: usize,
    /// The shared range's keys, for serializable reads (front_cache.rs); `None` until read,
    /// and after a gap until read again.
    cache: Option<Cache>,
}

pub(crate) struct Hub {
    prefix: Vec<u8>,
    prefix_end: Option<Vec<u8>>,
    state: Mutex<HubState>,
    tx: broadcast::Sender<Arc<Item>>,
    started: tokio::sync::watch::Sender<bool>,
    /// Bumped whenever the cache moves, for reads waiting for it to catch up.
    cache_moved: tokio::sync::watch::Sender<u64>,
}

impl Hub {
    fn start(
        upstream: Channel,
        prefix: &[u8],
        credential: Option<(String, String)>,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        let prefix = prefix.to_vec();
        let end = prefix_end(&prefix);
        let hub = Arc::new(Hub {
            prefix_end: end,
            prefix,
            state: Mutex::new(HubState {
                first: 0,
                current: 0,
                header: PbResponseHeader::default(),
                buffer: VecDeque::new(),
                buffered: 0,
                cache: None,
            }),
            tx: broadcast::channel(LAG).0,
            started: tokio::sync::watch::channel(false).0,
            cache_moved: tokio::sync::watch::channel(0).0,
        });
        spawn_until(shutdown, hub.clone().run(upstream, credential));
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a watch on `[key, range_end)` lies within the shared range.
    fn covers(&self, key: &[u8], range_end: &[u8]) -> bool {
        if !key.starts_with(&self.prefix) {
            return false;
        }
        match (range_end, &self.prefix_end) {
            ([], _) => true,
            (_, None) => true,
            ([0], Some(_)) => false,
            (end, Some(limit)) => end <= limit.as_slice(),
        }
    }

    /// Keeps the shared watch going: started at the newest revision, resumed after a break
    /// from the revision after the last one seen.
    async fn run(self: Arc<Self>, upstream: Channel, credential: Option<(String, String)>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.watch_once(&upstream, credential.as_ref()).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::debug!("store front: shared watch: {e}");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }

    async fn watch_once(
        &self,
        upstream: &Channel,
        credential: Option<&(String, String)>,
    ) -> Result<(), Status> {
        let token = match credential {
            Some((name, password)) => {
                let req = PbAuthenticateRequest {
                    name: name.clone(),
                    password: password.clone(),
                };
                let resp: PbAuthenticateResponse = unary(
                    upstream,
                    "/etcdserverpb.Auth/Authenticate",
                    Request::new(req),
                )
                .await?;
                Some(resp.token)
            }
            None => None,
        };
        if self.lock().cache.is_none() {
            self.load_cache(upstream, token.as_deref()).await?;
        }
        let resume = {
            let state = self.lock();
            if state.current > 0 {
                state.current + 1
            } else {
                0
            }
        };
        let end = self.prefix_end.clone().unwrap_or_else(|| vec![0]);
        // Without previous values: arbor's own watches never ask for them, and they would
        // double what an update costs on the uplink. A child that asks has its own watch.
        let create = create_request(&self.prefix, &end, resume, false, true);
        let (_tx, mut responses) = open_watch(upstream, token.as_deref(), create).await?;
        while let Some(resp) = responses.message().await? {
            let header = resp.header.unwrap_or_default();
            if resp.canceled {
                if resp.compact_revision > 0 {
                    // Compacted past where the front was: what is between is lost to it.
                    self.gap();
                }
                return Err(Status::aborted(format!(
                    "shared watch canceled: {}",
                    resp.cancel_reason
                )));
            }
            if resp.created {
                let mut state = self.lock();
                if state.current == 0 {
                    state.current = header.revision;
                    state.first = header.revision + 1;
                }
                state.header = header;
                drop(state);
                self.started.send_replace(true);
                continue;
            }
            let item = if resp.events.is_empty() {
                Item::Progress { header }
            } else {
                Item::Events {
                    header,
                    events: resp.events,
                }
            };
            self.publish(item);
        }
        Err(Status::unavailable("shared watch ended"))
    }

    /// Adds `item` to the buffer and sends it to every child watch (under the lock, so a
    /// watch that subscribes meanwhile sees it exactly once: in its replay or live).
    fn publish(&self, item: Item) {
        let mut state = self.lock();
        let item = Arc::new(item);
        match &*item {
            Item::Events { header, events } => {
                let last = events
                    .last()
                    .and_then(|e| e.kv.as_ref())
                    .map(|kv| kv.mod_revision);
                state.current = state.current.max(last.unwrap_or(0)).max(header.revision);
                state.header = *header;
                let current = state.current;
                if let Some(cache) = &mut state.cache {
                    cache.apply(events);
                    cache.advance(current);
                }
                state.buffered += events.len();
                state.buffer.push_back(item.clone());
                while state.buffered > BUFFER_EVENTS {
                    let Some(old) = state.buffer.pop_front() else {
                        break;
                    };
                    if let Item::Events { events, .. } = &*old {
                        state.buffered -= events.len();
                        let last = events.last().and_then(|e| e.kv.as_ref());
                        state.first = last.map_or(state.first, |kv| kv.mod_revision + 1);
                    }
                }
            }
            Item::Progress { header } => {
                state.current = state.current.max(header.revision);
                state.header = *header;
                let current = state.current;
                if let Some(cache) = &mut state.cache {
                    cache.advance(current);
                }
            }
            Item::Gap => {}
        }
        let _ = self.tx.send(item);
        drop(state);
        self.cache_moved.send_modify(|n| *n += 1);
    }

    /// The shared watch lost events: nothing buffered can be trusted to be complete. Until
    /// the shared watch is back (the range read again, the watch started after that read),
    /// no child watch is served from it: the revision it will resume from is not known yet
    /// (the store above's cancellation may carry no header), and a child subscribed
    /// meanwhile would miss what lies between (seen: a child's watch from revision 3 served
    /// from a shared watch that came back at 5, never told of 3 and 4).
    fn gap(&self) {
        let mut state = self.lock();
        state.buffer.clear();
        state.buffered = 0;
        state.current = 0;
        state.first = i64::MAX;
        state.cache = None;
        drop(state);
        self.started.send_replace(false);
        let _ = self.tx.send(Arc::new(Item::Gap));
    }

    /// Reads the shared range (as the relay) into the cache; the first time, the shared watch
    /// then starts from the revision after the read, so the cache misses nothing.
    async fn load_cache(&self, upstream: &Channel, token: Option<&str>) -> Result<(), Status> {
        // Every key, when the whole keyspace is shared, is etcd's "\0" to "\0" (a Range
        // with no key is refused).
        let key = if self.prefix.is_empty() {
            vec![0]
        } else {
            self.prefix.clone()
        };
        let req = PbRangeRequest {
            key,
            range_end: self.prefix_end.clone().unwrap_or_else(|| vec![0]),
            serializable: true,
            ..Default::default()
        };
        let resp: PbRangeResponse = unary(upstream, RANGE_PATH, with_token(req, token)).await?;
        let header = resp.header.unwrap_or_default();
        let mut state = self.lock();
        if state.current == 0 {
            state.current = header.revision;
            state.first = header.revision + 1;
            state.header = header;
        }
        tracing::debug!(
            "store front: {} keys of the shared range cached at revision {}",
            resp.kvs.len(),
            header.revision
        );
        state.cache = Some(Cache::load(resp.kvs, header.revision));
        Ok(())
    }

    /// Answers a serializable Range inside the shared range from the cache, once the store
    /// above, asked as the child, says the child may read it and the cache is current for it
    /// (front_cache.rs). `None`: the cache cannot answer it in time; pass it through.
    async fn range(
        &self,
        upstream: &Channel,
        token: Option<&str>,
        req: &PbRangeRequest,
    ) -> Result<Option<PbRangeResponse>, Status> {
        if self.lock().cache.is_none() {
            return Ok(None);
        }
        let mut moved = self.cache_moved.subscribe();
        let probe: PbRangeResponse = unary(
            upstream,
            RANGE_PATH,
            with_token(front_cache::probe(req), token),
        )
        .await?;
        let upstream_rev = probe.header.as_ref().map_or(0, |h| h.revision);
        let deadline = tokio::time::Instant::now() + front_cache::CATCH_UP;
        loop {
            {
                let state = self.lock();
                let Some(cache) = &state.cache else {
                    return Ok(None);
                };
                if cache.current_for(req, &probe) {
                    let mut resp = cache.answer(req);
                    let mut header = state.header;
                    header.revision = cache.rev().max(upstream_rev);
                    resp.header = Some(header);
                    return Ok(Some(resp));
                }
            }
            match tokio::time::timeout_at(deadline, moved.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(None),
            }
        }
    }

    /// Subscribes a child watch that wants events from `start` (0: from now): the buffered
    /// items it must see first, a receiver for the rest, and the revision it is synced to.
    /// `None` when the buffer does not reach back to `start`.
    async fn subscribe(
        &self,
        start: i64,
    ) -> Option<(
        Vec<Arc<Item>>,
        broadcast::Receiver<Arc<Item>>,
        i64,
        PbResponseHeader,
    )> {
        let mut started = self.started.subscribe();
        // A front that cannot reach the store above yet serves watches upstream directly.
        let waited = tokio::time::timeout(Duration::from_secs(5), started.wait_for(|s| *s)).await;
        if !matches!(waited, Ok(Ok(_))) {
            return None;
        }
        let state = self.lock();
        if start > 0 && start < state.first {
            return None;
        }
        let rx = self.tx.subscribe();
        let replay = state.buffer.iter().cloned().collect();
        Some((replay, rx, state.current, state.header))
    }
}

/// The front's shared watches, one per shared prefix.
struct Hubs(Vec<Arc<Hub>>);

impl Hubs {
    /// The shared watch whose range holds `[key, range_end)`, if one does.
    fn covering(&self, key: &[u8], range_end: &[u8]) -> Option<Arc<Hub>> {
        self.0.iter().find(|h| h.covers(key, range_end)).cloned()
    }

    /// The header for answers about no single watch (progress replies, cancellations): that
    /// of the shared watch least far along, as every one of them is synced at least to it.
    fn header(&self) -> PbResponseHeader {
        let headers = self.0.iter().map(|h| h.lock().header);
        headers.min_by_key(|h| h.revision).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// The Watch service children call.

struct FrontWatch {
    hubs: Arc<Hubs>,
    upstream: Channel,
    leases: Arc<Leases>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<PbWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PbWatchService for FrontWatch {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let token = token_of(&request);
        let (tx, rx) = mpsc::channel(64);
        let session = Session {
            hubs: self.hubs.clone(),
            upstream: self.upstream.clone(),
            leases: self.leases.clone(),
            token,
            tx,
            watches: BTreeMap::new(),
            next_id: 0,
        };
        tokio::spawn(session.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// What one child watch wants.
#[derive(Clone)]
struct Want {
    id: i64,
    key: Vec<u8>,
    range_end: Vec<u8>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
}

struct Session {
    hubs: Arc<Hubs>,
    upstream: Channel,
    leases: Arc<Leases>,
    token: Option<String>,
    tx: mpsc::Sender<Result<PbWatchResponse, Status>>,
    /// The running child watches, each a task of its own.
    watches: BTreeMap<i64, tokio::task::JoinHandle<()>>,
    next_id: i64,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<PbWatchRequest>) {
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                () = self.tx.closed() => break,
            };
            let Ok(Some(req)) = msg else { break };
            match req.request_union {
                Some(PbWatchRequestUnion::CreateRequest(c)) => {
                    let id = if c.watch_id != 0 {
                        c.watch_id
                    } else {
                        while self.watches.contains_key(&self.next_id) {
                            self.next_id += 1;
                        }
                        self.next_id
                    };
                    self.watches.retain(|_, task| !task.is_finished());
                    if self.watches.contains_key(&id) || id < 0 {
                        let resp = PbWatchResponse {
                            header: Some(self.hubs.header()),
                            watch_id: -1,
                            created: true,
                            canceled: true,
                            cancel_reason: "etcdserver: mvcc: watcher id already in use or invalid"
                                .into(),
                            ..Default::default()
                        };
                        if self.tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    let want = Want {
                        id,
                        key: c.key,
                        range_end: c.range_end,
                        prev_kv: c.prev_kv,
                        no_put: c.filters.contains(&FILTER_NOPUT),
                        no_delete: c.filters.contains(&FILTER_NODELETE),
                        progress_notify: c.progress_notify,
                        fragment: c.fragment,
                    };
                    let child = ChildWatch {
                        hubs: self.hubs.clone(),
                        upstream: self.upstream.clone(),
                        leases: self.leases.clone(),
                        token: self.token.clone(),
                        tx: self.tx.clone(),
                        want,
                    };
                    // Created responses go out in the order of the create requests, as etcd's.
                    let (created_tx, created_rx) = tokio::sync::oneshot::channel();
                    let task = tokio::spawn(child.run(c.start_revision, created_tx));
                    let _ = created_rx.await;
                    self.watches.insert(id, task);
                }
                Some(PbWatchRequestUnion::CancelRequest(cancel)) => {
                    if let Some(task) = self.watches.remove(&cancel.watch_id) {
                        task.abort();
                        let resp = PbWatchResponse {
                            header: Some(self.hubs.header()),
                            watch_id: cancel.watch_id,
                            canceled: true,
                            ..Default::default()
                        };
                        if self.tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                    }
                }
                Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                    // The revision every shared watch here is synced to: what the front has
                    // seen of the shared range. (A watch of its own answers for itself.)
                    let resp = PbWatchResponse {
                        header: Some(self.hubs.header()),
                        watch_id: -1,
                        ..Default::default()
                    };
                    if self.tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
                None => {}
            }
        }
        for task in self.watches.values() {
            task.abort();
        }
    }
}

struct ChildWatch {
    hubs: Arc<Hubs>,
    upstream: Channel,
    leases: Arc<Leases>,
    token: Option<String>,
    tx: mpsc::Sender<Result<PbWatchResponse, Status>>,
    want: Want,
}

/// How a child watch ended its shared phase.
enum Shared {
    /// The child went away.
    Gone,
    /// Continue with a watch of its own from this revision.
    Direct(i64),
}

impl ChildWatch {
    async fn run(self, start: i64, created: tokio::sync::oneshot::Sender<()>) {
        let w = &self.want;
        let hub = self.hubs.covering(&w.key, &w.range_end);
        let hub = hub.filter(|_| !w.fragment && !w.prev_kv);
        let mut created = Some(created);
        let mut shareable = hub.is_some();
        if let Some(hub) = &hub {
            // Checked at the start revision only when it is one the front has seen: a start
            // just past the newest revision (a client's "get, then watch from the next") is
            // the common case, and the store above would call it a future revision.
            let seen = hub.lock().current;
            let at = if start > 0 && start <= seen { start } else { 0 };
            match self.may_read(at).await {
                Ok(()) => {}
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    tracing::debug!(
                        "store front: watch from {start}: {}; a watch of its own upstream",
                        status.message()
                    );
                    shareable = false;
                }
                Err(status) => {
                    let _ = created.take().map(|c| c.send(()));
                    self.refuse(status).await;
                    return;
                }
            }
        }
        let subscribed = match &hub {
            Some(hub) if shareable => hub.subscribe(start).await,
            _ => None,
        };
        if let Some((replay, rx, current, header)) = subscribed {
            tracing::debug!(
                "store front: watch {} from {start} shared (synced to {current})",
                w.id
            );
            let resp = PbWatchResponse {
                header: Some(header),
                watch_id: w.id,
                created: true,
                ..Default::default()
            };
            let sent = self.tx.send(Ok(resp)).await;
            let _ = created.take().map(|c| c.send(()));
            if sent.is_err() {
                return;
            }
            let next = if start > 0 { start } else { current + 1 };
            match self.shared(next, replay, rx).await {
                Shared::Gone => return,
                Shared::Direct(next) => {
                    self.direct(next, false, None).await;
                    return;
                }
            }
        }
        tracing::debug!(
            "store front: watch {} on {:?} from {start}: a watch of its own upstream",
            w.id,
            String::from_utf8_lossy(&w.key)
        );
        self.direct(start, true, created).await;
    }

    /// Asks the store above, as the child, whether it may read the watched range, at the
    /// start revision when there is one (which the store above refuses when it is compacted
    /// or in the future: then the child's watch goes upstream, to get etcd's own answer).
    async fn may_read(&self, start: i64) -> Result<(), Status> {
        let req = PbRangeRequest {
            key: self.want.key.clone(),
            range_end: self.want.range_end.clone(),
            limit: 1,
            count_only: true,
            serializable: true,
            revision: start.max(0),
            ..Default::default()
        };
        let _: PbRangeResponse = unary(
            &self.upstream,
            RANGE_PATH,
            with_token(req, self.token.as_deref()),
        )
        .await?;
        Ok(())
    }

    /// Answers a create the store above refused, as etcd would have.
    async fn refuse(&self, status: Status) {
        if status.code() == tonic::Code::PermissionDenied {
            let resp = PbWatchResponse {
                header: Some(self.hubs.header()),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: status.message().to_string(),
                ..Default::default()
            };
            let _ = self.tx.send(Ok(resp)).await;
        } else {
            let _ = self.tx.send(Err(status)).await;
        }
    }

    /// Serves the child from the shared watch, from revision `next` on.
    async fn shared(
        &self,
        mut next: i64,
        replay: Vec<Arc<Item>>,
        mut rx: broadcast::Receiver<Arc<Item>>,
    ) -> Shared {
        for item in replay {
            match self.deliver(&item, &mut next).await {
                Ok(true) => {}
                Ok(false) => return Shared::Direct(next),
                Err(()) => return Shared::Gone,
            }
        }
        loop {
            let item = tokio::select! {
                item = rx.recv() => item,
                () = self.tx.closed() => return Shared::Gone,
            };
            match item {
                Ok(item) => match self.deliver(&item, &mut next).await {
                    Ok(true) => {}
                    Ok(false) => return Shared::Direct(next),
                    Err(()) => return Shared::Gone,
                },
                // Fell behind the shared watch, or it closed: a watch of its own.
                Err(_) => return Shared::Direct(next),
            }
        }
    }

    /// Sends what of `item` the child wants; `Ok(false)` at a gap.
    async fn deliver(&self, item: &Item, next: &mut i64) -> Result<bool, ()> {
        let w = &self.want;
        match item {
            Item::Gap => Ok(false),
            Item::Progress { header } => {
                if w.progress_notify && header.revision >= *next - 1 {
                    *next = header.revision + 1;
                    let resp = PbWatchResponse {
                        header: Some(*header),
                        watch_id: w.id,
                        ..Default::default()
                    };
                    self.tx.send(Ok(resp)).await.map_err(|_| ())?;
                }
                Ok(true)
            }
            Item::Events { header, events } => {
                let range = KeyRange::new(&w.key, &w.range_end);
                let mut out = Vec::new();
                let mut last = *next - 1;
                for e in events {
                    let Some(kv) = &e.kv else { continue };
                    if kv.mod_revision < *next {
                        continue;
                    }
                    last = last.max(kv.mod_revision);
                    let delete = e.r#type == EVENT_DELETE;
                    if !range.contains(&kv.key) || (delete && w.no_delete) || (!delete && w.no_put)
                    {
                        continue;
                    }
                    out.push(e.clone());
                }
                *next = last + 1;
                self.leases.localize_events(&mut out);
                if !out.is_empty() {
                    let resp = PbWatchResponse {
                        header: Some(*header),
                        watch_id: w.id,
                        events: out,
                        ..Default::default()
                    };
                    self.tx.send(Ok(resp)).await.map_err(|_| ())?;
                }
                Ok(true)
            }
        }
    }

    /// Serves the child from a watch of its own upstream, made with its token, from `start`;
    /// `first`: the upstream `created` response is the child's (else it was already sent).
    async fn direct(
        &self,
        start: i64,
        first: bool,
        mut created: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        let w = &self.want;
        let mut req = create_request(&w.key, &w.range_end, start, w.prev_kv, w.progress_notify);
        if let Some(PbWatchRequestUnion::CreateRequest(c)) = &mut req.request_union {
            c.fragment = w.fragment;
            if w.no_put {
                c.filters.push(FILTER_NOPUT);
            }
            if w.no_delete {
                c.filters.push(FILTER_NODELETE);
            }
        }
        let opened = open_watch(&self.upstream, self.token.as_deref(), req).await;
        // Kept open: the end of the requests would end the upstream watch.
        let (_upstream_tx, mut responses) = match opened {
            Ok(pair) => pair,
            Err(status) => {
                let _ = created.take().map(|c| c.send(()));
                let _ = self.tx.send(Err(status)).await;
                return;
            }
        };
        loop {
            let resp = tokio::select! {
                r = responses.message() => r,
                () = self.tx.closed() => return,
            };
            let mut resp = match resp {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    let _ = created.take().map(|c| c.send(()));
                    let _ = self
                        .tx
                        .send(Err(Status::unavailable(
                            "store front: the store above ended the watch",
                        )))
                        .await;
                    return;
                }
                Err(status) => {
                    let _ = created.take().map(|c| c.send(()));
                    let _ = self.tx.send(Err(status)).await;
                    return;
                }
            };
            if resp.created && !first {
                continue;
            }
            self.leases.localize_events(&mut resp.events);
            let created_now = resp.created;
            // A refused create keeps etcd's -1; everything else is about the child's watch.
            if !(resp.created && resp.canceled) {
                resp.watch_id = w.id;
            }
            let canceled = resp.canceled;
            if self.tx.send(Ok(resp)).await.is_err() {
                return;
            }
            if created_now {
                let _ = created.take().map(|c| c.send(()));
            }
            if canceled {
                let _ = created.take().map(|c| c.send(()));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(prefix: &[u8]) -> Hub {
        let end = prefix_end(prefix);
        Hub {
            prefix: prefix.to_vec(),
            prefix_end: end,
            state: Mutex::new(HubState {
                first: 0,
                current: 0,
                header: PbResponseHeader::default(),
                buffer: VecDeque::new(),
                buffered: 0,
                cache: None,
            }),
            tx: broadcast::channel(4).0,
            started: tokio::sync::watch::channel(false).0,
            cache_moved: tokio::sync::watch::channel(0).0,
        }
    }

    #[test]
    fn only_ranges_inside_the_shared_prefix_are_shared() {
        let h = hub(b"/arbor/run/exports/");
        assert!(h.covers(b"/arbor/run/exports/", b"/arbor/run/exports0"));
        assert!(h.covers(b"/arbor/run/exports/a", b""));
        assert!(h.covers(b"/arbor/run/exports/a/", b"/arbor/run/exports/a0"));
        assert!(!h.covers(b"/arbor/run/exports/", b"\0"));
        assert!(!h.covers(b"/arbor/run/", b"/arbor/run0"));
        assert!(!h.covers(b"/arbor/run/exports/", b"/arbor/run/exports1"));
        assert!(!h.covers(b"/other", b""));
        let all = hub(b"");
        assert!(all.covers(b"", b"\0"));
        assert!(all.covers(b"a", b"b"));
    }
}
