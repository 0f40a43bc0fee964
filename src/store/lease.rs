//! The Lease service: Grant, Revoke, the KeepAlive stream, TimeToLive and Leases.

use super::auth::{Caller, admin_only, caller_of, denied};
use super::backend::Backend;
use etcd_client::proto::{
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesRequest, PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse,
    PbLeaseService, PbLeaseStatus, PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub struct LeaseService {
    pub backend: Arc<Backend>,
}

#[tonic::async_trait]
impl PbLeaseService for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let req = request.get_ref();
        let (id, ttl, rev) = self.backend.lease_grant(req.id, req.ttl).await?;
        if let (Some(caller), Some(users)) = (caller_of(&request), self.backend.users()) {
            users.lease_granted(&caller, id);
        }
        Ok(Response::new(PbLeaseGrantResponse {
            header: Some(self.backend.header(rev)),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        if !may_use(&self.backend, &request, request.get_ref().id) {
            return Err(denied());
        }
        let rev = self.backend.lease_revoke(request.get_ref().id).await?;
        Ok(Response::new(PbLeaseRevokeResponse {
            header: Some(self.backend.header(rev)),
        }))
    }

    type LeaseKeepAliveStream =
        Pin<Box<dyn Stream<Item = Result<PbLeaseKeepAliveResponse, Status>> + Send + 'static>>;

    /// One answer per request, in order: the TTL restarted, or 0 for a lease that is gone.
    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let caller = caller_of(&request);
        let rx = keep_alive(self.backend.clone(), request.into_inner(), caller);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// A lease that does not exist has TTL -1, as etcd answers.
    async fn lease_time_to_live(
        &self,
        request: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let req = request.get_ref();
        if !may_use(&self.backend, &request, req.id) {
            return Err(denied());
        }
        let header = Some(self.backend.header(self.backend.visible()));
        let resp = match self.backend.lease_time_to_live(req.id, req.keys) {
            Some((ttl, granted_ttl, keys)) => PbLeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl,
                granted_ttl,
                keys,
            },
            None => PbLeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                granted_ttl: 0,
                keys: vec![],
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        request: Request<PbLeaseLeasesRequest>,
    ) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        admin_only(&request)?;
        let leases = self
            .backend
            .lease_ids()
            .into_iter()
            .map(|id| PbLeaseStatus { id })
            .collect();
        Ok(Response::new(PbLeaseLeasesResponse {
            header: Some(self.backend.header(self.backend.visible())),
            leases,
        }))
    }
}

/// One keep-alive stream: an answer per request in `inbound` (from gRPC or the JSON gateway),
/// until `inbound` ends, as etcd's does.
/// With a `caller` (the store checks credentials), a lease it does not own is answered as
/// gone (TTL 0), and kept alive not at all.
pub fn keep_alive<S>(
    backend: Arc<Backend>,
    mut inbound: S,
    caller: Option<Arc<Caller>>,
) -> mpsc::Receiver<Result<PbLeaseKeepAliveResponse, Status>>
where
    S: Stream<Item = Result<PbLeaseKeepAliveRequest, Status>> + Unpin + Send + 'static,
{
    let closing = backend.closing();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let req = tokio::select! {
                req = inbound.next() => req,
                () = closing.cancelled() => None,
            };
            let Some(Ok(req)) = req else {
                return;
            };
            let allowed = match (&caller, backend.users()) {
                (Some(caller), Some(users)) => users.may_use_lease(caller, req.id),
                _ => true,
            };
            let answer = PbLeaseKeepAliveResponse {
                header: Some(backend.header(backend.visible())),
                id: req.id,
                ttl: if allowed {
                    backend.lease_keep_alive(req.id)
                } else {
                    0
                },
            };
            if tx.send(Ok(answer)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Whether the request's caller (if the store checks credentials) may use lease `id`.
fn may_use<T>(backend: &Backend, request: &Request<T>, id: i64) -> bool {
    match (caller_of(request), backend.users()) {
        (Some(caller), Some(users)) => users.may_use_lease(&caller, id),
        _ => true,
    }
}
