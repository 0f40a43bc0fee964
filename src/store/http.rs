//! HTTP on the store's own port, beside gRPC, as etcd serves it: `/health`, `/version`,
//! `/metrics`, and the gRPC gateway's JSON API under `/v3/`.
//!
//! [`FrontLayer`] wraps tonic's routes. A request whose content type is `application/grpc`
//! goes to gRPC (counted and timed for `/metrics` on the way); anything else, HTTP/1.1 or
//! HTTP/2, is answered here. The JSON API calls the same services gRPC does, so both behave
//! alike by construction; docs/store.md lists where the JSON differs from etcd's.
//!
//! `/health`, `/version` and `/metrics` never need a credential. `/v3/` requests carry theirs
//! in `Authorization`, passed on to the services as gRPC metadata, as etcd's gateway does.

use super::auth::Caller;
use super::backend::Backend;
use super::json;
use super::kv::{GRPC_OVERHEAD_BYTES, KvService, MAX_REQUEST_BYTES};
use super::lease::{self, LeaseService};
use super::maintenance::{API_VERSION, ClusterService, MaintenanceService};
use super::metrics::{self, Metrics};
use super::{errors, watch};
use bytes::Bytes;
use etcd_client::proto::{
    PbClusterService, PbDefragmentRequest, PbKvService, PbLeaseLeasesRequest, PbLeaseService,
    PbMaintenanceService, PbMemberListRequest, PbSnapshotRequest, PbStatusRequest,
};
use futures::future::BoxFuture;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::Value;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::{Code, Request, Status};

type HttpRequest = http::Request<Body>;

/// The gRPC services the store serves (Auth is answered here, with why it is not).
const SERVED: &[&str] = &[
    "etcdserverpb.KV",
    "etcdserverpb.Watch",
    "etcdserverpb.Lease",
    "etcdserverpb.Maintenance",
    "etcdserverpb.Cluster",
];
type HttpResponse = http::Response<Body>;

/// What serves HTTP: the backend and the services the JSON API calls.
pub struct Front {
    backend: Arc<Backend>,
    kv: KvService,
    lease: LeaseService,
    maintenance: MaintenanceService,
    cluster: ClusterService,
}

impl Front {
    pub fn new(backend: Arc<Backend>, client_urls: Vec<String>) -> Arc<Front> {
        Arc::new(Front {
            kv: KvService {
                backend: backend.clone(),
            },
            lease: LeaseService {
                backend: backend.clone(),
            },
            maintenance: MaintenanceService {
                backend: backend.clone(),
            },
            cluster: ClusterService {
                backend: backend.clone(),
                client_urls,
            },
            backend,
        })
    }

    fn metrics(&self) -> &Arc<Metrics> {
        self.backend.metrics()
    }
}

/// The tower layer tonic's server wraps its routes in.
#[derive(Clone)]
pub struct FrontLayer(pub Arc<Front>);

impl tower::Layer<Routes> for FrontLayer {
    type Service = FrontService;

    fn layer(&self, inner: Routes) -> FrontService {
        FrontService {
            inner,
            front: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FrontService {
    inner: Routes,
    front: Arc<Front>,
}

impl tower::Service<HttpRequest> for FrontService {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<HttpRequest>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let grpc = req
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            let front = self.front.clone();
            return Box::pin(async move { Ok(front.serve_http(req).await) });
        }
        let path = req.uri().path();
        let method = metrics::method_index(path);
        let started = Instant::now();
        let metrics = self.front.metrics().clone();
        if let Some(m) = method {
            metrics.started(m);
        }
        let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
        if !SERVED.contains(&service) && service != "etcdserverpb.Auth" {
            let status = Status::unimplemented(format!(
                "arbor store: {service} is not served (docs/store.md lists what is)"
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let users = self.front.backend.users().cloned();
        let authenticate = users.is_some() && path == "/etcdserverpb.Auth/Authenticate";
        if let Some(name) = path.strip_prefix("/etcdserverpb.Auth/")
            && !authenticate
        {
            let status = errors::auth_unsupported(&format!("Auth.{name}"));
            if let Some(m) = method {
                metrics.handled(m, status.code() as i32, started.elapsed());
            }
            return Box::pin(async move { Ok(status.into_http()) });
        }
        if let (Some(users), true) = (&users, authenticate) {
            let svc = Authenticate {
                users: users.clone(),
                backend: self.front.backend.clone(),
            };
            return Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                let resp = grpc.unary(svc, req).await;
                if let Some(m) = method {
                    metrics.handled(m, 0, started.elapsed());
                }
                Ok(resp)
            });
        }
        let mut req = req;
        if let (Some(users), false) = (&users, authenticate) {
            // Every request but Authenticate names its caller by the token it was given.
            let token = req.headers().get("token").and_then(|v| v.to_str().ok());
            let caller = match token {
                Some(token) => users
                    .caller(token)
                    .ok_or_else(|| Status::unauthenticated("etcdserver: invalid auth token")),
                None => Err(Status::invalid_argument("etcdserver: user name is empty")),
            };
            match caller {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                }
                Err(status) => {
                    if let Some(m) = method {
                        metrics.handled(m, status.code() as i32, started.elapsed());
                    }
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            Ok(match method {
                Some(method) => meter(resp, method, started, metrics),
                None => resp,
            })
        })
    }
}

/// `Auth.Authenticate`, the one call of etcd's auth API the store answers (when it checks
/// credentials): a name and password for a token, which every later request carries.
struct Authenticate {
    users: Arc<super::auth::Users>,
    backend: Arc<Backend>,
}

impl tonic::server::UnaryService<etcd_client::proto::PbAuthenticateRequest> for Authenticate {
    type Response = etcd_client::proto::PbAuthenticateResponse;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::Response>, Status>>;

    fn call(
        &mut self,
        request: Request<etcd_client::proto::PbAuthenticateRequest>,
    ) -> Self::Future {
        let (users, backend) = (self.users.clone(), self.backend.clone());
        Box::pin(async move {
            let req = request.get_ref();
            match users.authenticate(&req.name, &req.password) {
                Some(token) => Ok(tonic::Response::new(
                    etcd_client::proto::PbAuthenticateResponse {
                        header: Some(backend.header(backend.visible())),
                        token,
                    },
                )),
                None => Err(Status::invalid_argument(
                    "etcdserver: authentication failed, invalid user ID or password",
                )),
            }
        })
    }
}

/// Counts a gRPC call as handled, with its status code and duration, when its response ends.
fn meter(
    resp: HttpResponse,
    method: usize,
    started: Instant,
    metrics: Arc<Metrics>,
) -> HttpResponse {
    // An error is answered "trailers-only": the status is in the headers.
    let code = grpc_status(resp.headers());
    resp.map(|inner| {
        Body::new(Metered {
            inner,
            method,
            started,
            metrics,
            code,
            done: false,
        })
    })
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

struct Metered {
    inner: Body,
    method: usize,
    started: Instant,
    metrics: Arc<Metrics>,
    code: Option<i32>,
    done: bool,
}

impl Metered {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            // A response dropped before its trailers: the client went away.
            let code = self.code.unwrap_or(Code::Cancelled as i32);
            self.metrics
                .handled(self.method, code, self.started.elapsed());
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.code = Some(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                this.code = Some(status.code() as i32);
                this.finish();
            }
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// ---- plain HTTP ----

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> HttpResponse {
    let mut resp = http::Response::new(Body::new(http_body_util::Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

fn method_not_allowed(allow_get: bool) -> HttpResponse {
    let mut resp = respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "Method Not Allowed\n");
    if allow_get {
        resp.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
    }
    resp
}

impl Front {
    pub(super) async fn serve_http(self: Arc<Self>, req: HttpRequest) -> HttpResponse {
        let path = req.uri().path();
        match path {
            "/health" | "/version" | "/metrics" if req.method() != Method::GET => {
                method_not_allowed(true)
            }
            "/health" => self.health(),
            "/version" => respond(
                StatusCode::OK,
                JSON,
                format!("{{\"etcdserver\":\"{API_VERSION}\",\"etcdcluster\":\"{API_VERSION}\"}}"),
            ),
            "/metrics" => {
                let text = self.metrics().render(&self.backend.gauges());
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text,
                )
            }
            p if p.starts_with("/v3/") => self.gateway(req).await,
            _ => respond(StatusCode::NOT_FOUND, TEXT, "404 page not found\n"),
        }
    }

    /// etcd's `/health`: `{"health":"true"}`, or `"false"` with 503 while an alarm is raised
    /// or the log has failed.
    fn health(&self) -> HttpResponse {
        match self.backend.health() {
            Ok(()) => respond(StatusCode::OK, TEXT, "{\"health\":\"true\"}"),
            Err(problems) => {
                tracing::warn!("store: /health: {}", problems.join("; "));
                let mut resp = respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "{\"health\":\"false\"}\n",
                );
                resp.headers_mut().insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                resp
            }
        }
    }
}

// ---- the JSON gateway ----

/// grpc-gateway's mapping from gRPC codes to HTTP statuses.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error as the gateway answers it: `{"error": message, "message": message, "code": n}`.
fn error_response(status: &Status) -> HttpResponse {
    let message = serde_json::to_string(status.message()).unwrap_or_default();
    respond(
        http_status(status.code()),
        JSON,
        format!(
            "{{\"error\":{message},\"message\":{message},\"code\":{}}}",
            status.code() as i32
        ),
    )
}

/// An error in the middle of a stream, as grpc-gateway writes it there.
fn stream_error_line(status: &Status) -> Bytes {
    let http = http_status(status.code());
    let value = serde_json::json!({"error": {
        "grpc_code": status.code() as i32,
        "http_code": http.as_u16(),
        "message": status.message(),
        "http_status": http.canonical_reason().unwrap_or(""),
    }});
    Bytes::from(format!("{value}\n"))
}

fn json_ok(body: String) -> HttpResponse {
    let mut resp = respond(StatusCode::OK, JSON, body);
    resp.headers_mut().insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// A gRPC request carrying the HTTP request's credential, as grpc-gateway passes it on, and
/// its caller when the store checks credentials.
fn grpc_request<T>(message: T, headers: &HeaderMap, caller: &Option<Arc<Caller>>) -> Request<T> {
    let mut req = Request::new(message);
    if let Some(caller) = caller {
        req.extensions_mut().insert(caller.clone());
    }
    if let Some(auth) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        req.metadata_mut().insert("authorization", auth);
    }
    req
}

/// Requests a web page could make are refused: a browser names the page's origin, and a page
/// that reached loopback through DNS rebinding names its own host. curl, scripts and etcd
/// clients send neither.
fn from_a_browser(headers: &HeaderMap) -> Option<Status> {
    if headers.contains_key(http::header::ORIGIN) {
        return Some(Status::permission_denied(
            "arbor store: requests from web pages (with an Origin header) are refused",
        ));
    }
    let host = headers.get(http::header::HOST)?.to_str().ok()?;
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if name == "localhost" || name.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    Some(Status::permission_denied(format!(
        "arbor store: Host {host:?} is refused; use an IP address or localhost"
    )))
}

impl Front {
    async fn gateway(self: Arc<Self>, req: HttpRequest) -> HttpResponse {
        let path = req.uri().path().to_string();
        let route = route(&path);
        let Some((method, _)) = route else {
            return respond(StatusCode::NOT_FOUND, TEXT, "Not Found\n");
        };
        if req.method() != Method::POST {
            return method_not_allowed(false);
        }
        if let Some(refused) = from_a_browser(req.headers()) {
            return error_response(&refused);
        }
        let index = metrics::method_named(method);
        let started = Instant::now();
        if let Some(i) = index {
            self.metrics().started(i);
        }
        let (parts, body) = req.into_parts();
        // When the store checks credentials, the gateway's caller is named by the token in
        // `Authorization`, as etcd's gateway takes it.
        let caller = match self.backend.users() {
            None => Ok(None),
            Some(users) => parts
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|token| users.caller(token))
                .map(Some)
                .ok_or_else(|| Status::unauthenticated("etcdserver: invalid auth token")),
        };
        let resp = match (caller, route) {
            (Err(status), _) => Err(status),
            (Ok(caller), Some((_, Shape::Stream))) => {
                self.stream(method, parts.headers, body, caller).await
            }
            (Ok(caller), _) => match read_body(body).await {
                Ok(value) => self.unary(method, &parts.headers, &value, caller).await,
                Err(status) => Err(status),
            },
        };
        let (resp, code) = match resp {
            Ok(resp) => (resp, Code::Ok),
            Err(status) => (error_response(&status), status.code()),
        };
        // A stream's end is not waited for here: it counts as handled when it starts.
        if let Some(i) = index {
            self.metrics().handled(i, code as i32, started.elapsed());
        }
        resp
    }

    async fn unary(
        &self,
        method: &str,
        headers: &HeaderMap,
        v: &Value,
        caller: Option<Arc<Caller>>,
    ) -> Result<HttpResponse, Status> {
        let parse = |e: String| Status::invalid_argument(e);
        let json = match method {
            "Range" => {
                let req = json::range_request(v).map_err(parse)?;
                json::range_response(
                    self.kv
                        .range(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "Put" => {
                let req = json::put_request(v).map_err(parse)?;
                json::put_response(
                    self.kv
                        .put(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "DeleteRange" => {
                let req = json::delete_request(v).map_err(parse)?;
                json::delete_response(
                    self.kv
                        .delete_range(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "Txn" => {
                let req = json::txn_request(v).map_err(parse)?;
                json::txn_response(
                    self.kv
                        .txn(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "Compact" => {
                let req = json::compaction_request(v).map_err(parse)?;
                json::compaction_response(
                    self.kv
                        .compact(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "LeaseGrant" => {
                let req = json::lease_grant_request(v).map_err(parse)?;
                json::lease_grant_response(
                    self.lease
                        .lease_grant(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "LeaseRevoke" => {
                let req = json::lease_revoke_request(v).map_err(parse)?;
                json::lease_revoke_response(
                    self.lease
                        .lease_revoke(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "LeaseTimeToLive" => {
                let req = json::lease_time_to_live_request(v).map_err(parse)?;
                json::lease_time_to_live_response(
                    self.lease
                        .lease_time_to_live(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "LeaseLeases" => {
                json::empty_request(v).map_err(parse)?;
                let resp = self
                    .lease
                    .lease_leases(grpc_request(PbLeaseLeasesRequest {}, headers, &caller))
                    .await?;
                json::lease_leases_response(resp.get_ref())
            }
            "Status" => {
                json::empty_request(v).map_err(parse)?;
                let resp = self
                    .maintenance
                    .status(grpc_request(PbStatusRequest {}, headers, &caller))
                    .await?;
                json::status_response(resp.get_ref())
            }
            "Alarm" => {
                let req = json::alarm_request(v).map_err(parse)?;
                json::alarm_response(
                    self.maintenance
                        .alarm(grpc_request(req, headers, &caller))
                        .await?
                        .get_ref(),
                )
            }
            "Defragment" => {
                json::empty_request(v).map_err(parse)?;
                let resp = self
                    .maintenance
                    .defragment(grpc_request(PbDefragmentRequest {}, headers, &caller))
                    .await?;
                json::defragment_response(resp.get_ref())
            }
            "MemberList" => {
                json::empty_request(v).map_err(parse)?;
                let resp = self
                    .cluster
                    .member_list(grpc_request(
                        PbMemberListRequest::default(),
                        headers,
                        &caller,
                    ))
                    .await?;
                json::member_list_response(resp.get_ref())
            }
            auth => return Err(errors::auth_unsupported(&format!("Auth.{auth}"))),
        };
        Ok(json_ok(json))
    }

    /// The streaming calls: the request body is a sequence of JSON messages, the response one
    /// `{"result": ...}` line per message, for as long as the call lasts.
    async fn stream(
        &self,
        method: &str,
        headers: HeaderMap,
        body: Body,
        caller: Option<Arc<Caller>>,
    ) -> Result<HttpResponse, Status> {
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
        let stop = CancellationToken::new();
        match method {
            "Watch" => {
                let inbound =
                    read_messages(body, json::watch_request, out_tx.clone(), stop.clone());
                let rx = watch::open(self.backend.clone(), inbound, caller);
                forward(ReceiverStream::new(rx), json::watch_response, out_tx, stop);
            }
            "LeaseKeepAlive" => {
                let inbound = read_messages(
                    body,
                    json::lease_keep_alive_request,
                    out_tx.clone(),
                    stop.clone(),
                );
                let rx = lease::keep_alive(self.backend.clone(), inbound, caller);
                forward(
                    ReceiverStream::new(rx),
                    json::lease_keep_alive_response,
                    out_tx,
                    stop,
                );
            }
            _ => {
                // Snapshot: one request, then the file in chunks.
                json::empty_request(&read_body(body).await?).map_err(Status::invalid_argument)?;
                let resp = self
                    .maintenance
                    .snapshot(grpc_request(PbSnapshotRequest {}, &headers, &caller))
                    .await?;
                forward(resp.into_inner(), json::snapshot_response, out_tx, stop);
            }
        }
        let frames = ReceiverStream::new(out_rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
        let mut resp = http::Response::new(Body::new(http_body_util::StreamBody::new(frames)));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
        resp.headers_mut().insert(
            "grpc-metadata-content-type",
            HeaderValue::from_static("application/grpc"),
        );
        Ok(resp)
    }
}

#[derive(Clone, Copy)]
enum Shape {
    Unary,
    Stream,
}

/// The gateway's paths (etcd 3.4's, `/v3/kv/lease/...` aliases included), by method name.
fn route(path: &str) -> Option<(&'static str, Shape)> {
    use Shape::*;
    let route = match path.strip_prefix("/v3/")? {
        "kv/range" => ("Range", Unary),
        "kv/put" => ("Put", Unary),
        "kv/deleterange" => ("DeleteRange", Unary),
        "kv/txn" => ("Txn", Unary),
        "kv/compaction" => ("Compact", Unary),
        "watch" => ("Watch", Stream),
        "lease/grant" => ("LeaseGrant", Unary),
        "lease/revoke" | "kv/lease/revoke" => ("LeaseRevoke", Unary),
        "lease/keepalive" => ("LeaseKeepAlive", Stream),
        "lease/timetolive" | "kv/lease/timetolive" => ("LeaseTimeToLive", Unary),
        "lease/leases" | "kv/lease/leases" => ("LeaseLeases", Unary),
        "maintenance/status" => ("Status", Unary),
        "maintenance/alarm" => ("Alarm", Unary),
        "maintenance/defragment" => ("Defragment", Unary),
        "maintenance/snapshot" => ("Snapshot", Stream),
        "cluster/member/list" => ("MemberList", Unary),
        "auth/enable" => ("AuthEnable", Unary),
        "auth/disable" => ("AuthDisable", Unary),
        "auth/status" => ("AuthStatus", Unary),
        "auth/authenticate" => ("Authenticate", Unary),
        "auth/user/add" => ("UserAdd", Unary),
        "auth/user/get" => ("UserGet", Unary),
        "auth/user/list" => ("UserList", Unary),
        "auth/user/delete" => ("UserDelete", Unary),
        "auth/user/changepw" => ("UserChangePassword", Unary),
        "auth/user/grant" => ("UserGrantRole", Unary),
        "auth/user/revoke" => ("UserRevokeRole", Unary),
        "auth/role/add" => ("RoleAdd", Unary),
        "auth/role/get" => ("RoleGet", Unary),
        "auth/role/list" => ("RoleList", Unary),
        "auth/role/delete" => ("RoleDelete", Unary),
        "auth/role/grant" => ("RoleGrantPermission", Unary),
        "auth/role/revoke" => ("RoleRevokePermission", Unary),
        _ => return None,
    };
    Some(route)
}

/// The most a unary request body may hold: what gRPC itself accepts.
const MAX_BODY: usize = MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES;

async fn read_body(body: Body) -> Result<Value, Status> {
    let collected = http_body_util::Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                errors::request_too_large()
            } else {
                Status::invalid_argument(format!("arbor store: reading the request: {e}"))
            }
        })?;
    json::parse(&collected.to_bytes()).map_err(Status::invalid_argument)
}

/// The requests of a streaming call, parsed from the body as they arrive. A message that does
/// not parse ends the call with an error line.
fn read_messages<T: Send + 'static>(
    mut body: Body,
    parse: fn(&Value) -> Result<T, String>,
    out: mpsc::Sender<Bytes>,
    stop: CancellationToken,
) -> ReceiverStream<Result<T, Status>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                () = stop.cancelled() => return,
                () = out.closed() => return,
            };
            let ended = match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    false
                }
                Some(Err(_)) => return,
                None => true,
            };
            let mut values = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            let mut failed = None;
            let mut parsed = Vec::new();
            for value in values.by_ref() {
                match value {
                    Ok(v) => parsed.push(v),
                    Err(e) if e.is_eof() && !ended => break,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let consumed = values.byte_offset();
            for v in parsed {
                let msg = parse(&v).map_err(Status::invalid_argument);
                if let Err(status) = &msg {
                    let _ = out.send(stream_error_line(status)).await;
                    stop.cancel();
                    return;
                }
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            if let Some(e) = failed {
                let _ = out
                    .send(stream_error_line(&Status::invalid_argument(e)))
                    .await;
                stop.cancel();
                return;
            }
            buf.drain(..consumed);
            if ended {
                // The requests are over; the call goes on (a watch) or ends (keep-alive) as
                // its service decides.
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Writes a call's responses as `{"result": ...}` lines until it ends, fails, or the client
/// goes away (which drops the call's stream, ending it).
fn forward<S, T>(
    mut responses: S,
    write: fn(&T) -> String,
    out: mpsc::Sender<Bytes>,
    stop: CancellationToken,
) where
    S: Stream<Item = Result<T, Status>> + Unpin + Send + 'static,
    T: Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                n = responses.next() => n,
                () = stop.cancelled() => return,
                () = out.closed() => return,
            };
            let line = match next {
                None => return,
                Some(Ok(resp)) => Bytes::from(format!("{{\"result\":{}}}\n", write(&resp))),
                Some(Err(status)) => {
                    let _ = out.send(stream_error_line(&status)).await;
                    return;
                }
            };
            if out.send(line).await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_are_told_apart_from_scripts() {
        let mut h = HeaderMap::new();
        assert!(from_a_browser(&h).is_none());
        h.insert(
            http::header::HOST,
            HeaderValue::from_static("127.0.0.1:2379"),
        );
        assert!(from_a_browser(&h).is_none());
        h.insert(http::header::HOST, HeaderValue::from_static("[::1]:2379"));
        assert!(from_a_browser(&h).is_none());
        h.insert(http::header::HOST, HeaderValue::from_static("localhost"));
        assert!(from_a_browser(&h).is_none());
        h.insert(
            http::header::HOST,
            HeaderValue::from_static("evil.example:2379"),
        );
        assert!(from_a_browser(&h).is_some());
        h.insert(
            http::header::HOST,
            HeaderValue::from_static("127.0.0.1:2379"),
        );
        h.insert(
            http::header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert_eq!(
            from_a_browser(&h).map(|s| s.code()),
            Some(Code::PermissionDenied)
        );
    }

    #[test]
    fn every_gateway_method_is_counted_by_name() {
        for path in [
            "/v3/kv/range",
            "/v3/watch",
            "/v3/kv/lease/leases",
            "/v3/maintenance/snapshot",
            "/v3/auth/role/revoke",
        ] {
            let (method, _) = route(path).expect(path);
            assert!(metrics::method_named(method).is_some(), "{method}");
        }
        assert!(route("/v3/kv/nothing").is_none());
    }
}
