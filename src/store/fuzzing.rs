//! Entry points for the fuzz targets in `integration/fuzz` (`store_requests`, `snapshot`):
//! the store's request handling and snapshot restore, reached without a network or a data dir.
//! arbor itself does not use this module.

use super::auth::{Access, Caller, Users};
use super::backend::{Backend, Options};
use super::http::Front;
use super::kv::KvService;
use super::lease::LeaseService;
use super::maintenance::MaintenanceService;
use super::wal::snapshot_header;
use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKvService,
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse, PbMaintenanceService,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbSnapshotRequest, PbTxnRequest,
    PbTxnResponse,
};
use http_body_util::BodyExt;
use std::sync::Arc;
use tonic::{Request, Status};

/// A unary request as the gRPC services receive it, decoded.
#[derive(Debug, Clone)]
pub enum GrpcRequest {
    Range(PbRangeRequest),
    Put(PbPutRequest),
    DeleteRange(PbDeleteRequest),
    Txn(PbTxnRequest),
    Compaction(PbCompactionRequest),
    LeaseGrant(PbLeaseGrantRequest),
    LeaseRevoke(PbLeaseRevokeRequest),
    LeaseTimeToLive(PbLeaseTimeToLiveRequest),
}

/// What the service answered to a [`GrpcRequest`].
#[derive(Debug, Clone)]
pub enum GrpcResponse {
    Range(PbRangeResponse),
    Put(PbPutResponse),
    DeleteRange(PbDeleteResponse),
    Txn(PbTxnResponse),
    Compaction(PbCompactionResponse),
    LeaseGrant(PbLeaseGrantResponse),
    LeaseRevoke(PbLeaseRevokeResponse),
    LeaseTimeToLive(PbLeaseTimeToLiveResponse),
}

/// An in-memory store that checks credentials, with two users: `root` (admin) and `user`
/// (the access given to [`Harness::new`]). Requests go through the same services, and so the
/// same permission checks, as gRPC and the JSON gateway's requests do.
pub struct Harness {
    backend: Arc<Backend>,
    front: Arc<Front>,
    kv: KvService,
    lease: LeaseService,
    maintenance: MaintenanceService,
    user: Arc<Caller>,
    root: Arc<Caller>,
    token: String,
}

impl Harness {
    /// Opens the store. Must be called inside a Tokio runtime with time enabled (the lease
    /// clock is a task).
    pub fn new(access: Access) -> anyhow::Result<Harness> {
        let mut users = Users::new();
        users.add("root", "root", Access::Admin);
        users.add("user", "user", access);
        let root_token = users
            .authenticate("root", "root")
            .ok_or_else(|| anyhow::anyhow!("root cannot authenticate"))?;
        let token = users
            .authenticate("user", "user")
            .ok_or_else(|| anyhow::anyhow!("user cannot authenticate"))?;
        let (root, user) = match (users.caller(&root_token), users.caller(&token)) {
            (Some(root), Some(user)) => (root, user),
            _ => anyhow::bail!("a token names no caller"),
        };
        let backend = Backend::open(Options {
            users: Some(Arc::new(users)),
            ..Options::default()
        })?;
        Ok(Harness {
            front: Front::new(backend.clone(), Vec::new()),
            kv: KvService {
                backend: backend.clone(),
            },
            lease: LeaseService {
                backend: backend.clone(),
            },
            maintenance: MaintenanceService {
                backend: backend.clone(),
            },
            backend,
            user,
            root,
            token,
        })
    }

    /// Makes `request` as `user`, as the gRPC front hands it to the service.
    pub async fn grpc(&self, request: GrpcRequest) -> Result<GrpcResponse, Status> {
        self.call(request, &self.user).await
    }

    /// Makes `request` as `root`.
    pub async fn grpc_as_root(&self, request: GrpcRequest) -> Result<GrpcResponse, Status> {
        self.call(request, &self.root).await
    }

    async fn call(
        &self,
        request: GrpcRequest,
        caller: &Arc<Caller>,
    ) -> Result<GrpcResponse, Status> {
        fn req<T>(message: T, caller: &Arc<Caller>) -> Request<T> {
            let mut r = Request::new(message);
            r.extensions_mut().insert(caller.clone());
            r
        }
        Ok(match request {
            GrpcRequest::Range(m) => {
                GrpcResponse::Range(self.kv.range(req(m, caller)).await?.into_inner())
            }
            GrpcRequest::Put(m) => {
                GrpcResponse::Put(self.kv.put(req(m, caller)).await?.into_inner())
            }
            GrpcRequest::DeleteRange(m) => {
                GrpcResponse::DeleteRange(self.kv.delete_range(req(m, caller)).await?.into_inner())
            }
            GrpcRequest::Txn(m) => {
                GrpcResponse::Txn(self.kv.txn(req(m, caller)).await?.into_inner())
            }
            GrpcRequest::Compaction(m) => {
                GrpcResponse::Compaction(self.kv.compact(req(m, caller)).await?.into_inner())
            }
            GrpcRequest::LeaseGrant(m) => {
                GrpcResponse::LeaseGrant(self.lease.lease_grant(req(m, caller)).await?.into_inner())
            }
            GrpcRequest::LeaseRevoke(m) => GrpcResponse::LeaseRevoke(
                self.lease.lease_revoke(req(m, caller)).await?.into_inner(),
            ),
            GrpcRequest::LeaseTimeToLive(m) => GrpcResponse::LeaseTimeToLive(
                self.lease
                    .lease_time_to_live(req(m, caller))
                    .await?
                    .into_inner(),
            ),
        })
    }

    /// POSTs `body` to the JSON gateway at `path` (`/v3/kv/put`, ...) with `user`'s token, as
    /// curl would over HTTP; returns the HTTP status and the response body.
    pub async fn gateway(&self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Vec<u8>)> {
        let req = http::Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::HOST, "127.0.0.1:2379")
            .header(http::header::AUTHORIZATION, self.token.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                bytes::Bytes::from(body),
            )))?;
        let resp = self.front.clone().serve_http(req).await;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the response: {e}"))?
            .to_bytes()
            .to_vec();
        Ok((status, body))
    }

    /// The store's whole state, as its snapshot file would hold it: two calls answer the same
    /// bytes exactly when nothing changed in between (keys, history, leases, alarms).
    pub async fn state(&self) -> Result<Vec<u8>, Status> {
        Ok(self.backend.snapshot().await?.encode())
    }

    /// The state as a data dir's `snapshot.pb` holds it (header and payload).
    pub async fn snapshot_file(&self) -> anyhow::Result<Vec<u8>> {
        snapshot_with_payload(&self.state().await?)
    }

    /// A backup, as `etcdctl snapshot save` receives it from Maintenance.Snapshot (as `root`).
    pub async fn backup(&self) -> Result<Vec<u8>, Status> {
        use tokio_stream::StreamExt;
        let mut request = Request::new(PbSnapshotRequest {});
        request.extensions_mut().insert(self.root.clone());
        let mut stream = self.maintenance.snapshot(request).await?.into_inner();
        let mut file = Vec::new();
        while let Some(chunk) = stream.next().await {
            file.extend_from_slice(&chunk?.blob);
        }
        Ok(file)
    }

    /// The store's revision.
    pub fn revision(&self) -> i64 {
        self.backend.visible()
    }

    /// Ends the store.
    pub async fn close(&self) {
        self.backend.close().await;
    }
}

/// `arbor store restore`'s reading of a snapshot file, without the data dir it writes: checks
/// and decodes `bytes` and builds the state a store restored from it starts with. Returns the
/// snapshot file that state writes of itself (a data dir's `snapshot.pb`, header included),
/// which a store must be able to start from again.
pub fn restore_bytes(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (_, state) = super::restore::restored_state(bytes)?;
    snapshot_with_payload(&state.snapshot_parts().encode())
}

/// A data dir's `snapshot.pb` holding `payload` (the encoding of the state), its header and
/// checksum made as the store makes them: what lets a fuzzer reach the decoding and the state
/// building behind the checksum.
pub fn snapshot_with_payload(payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut file = snapshot_header(payload)?;
    file.extend_from_slice(payload);
    Ok(file)
}
