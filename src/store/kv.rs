//! The KV service: Range, Put, DeleteRange, Txn and Compact, over the [`Backend`].
//!
//! Put and DeleteRange run as one-op transactions, so every write takes the same path.

use super::auth::{admin_only, caller_of, denied};
use super::backend::Backend;
use super::errors;
use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKvService,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp, PbTxnResponse,
};
use prost::Message;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// etcd's default `--max-request-bytes` (1.5 MiB): a write request larger than this is refused
/// with "etcdserver: request is too large". gRPC itself refuses messages larger than this plus
/// [`GRPC_OVERHEAD_BYTES`], as etcd does.
pub const MAX_REQUEST_BYTES: usize = 3 << 19;
pub const GRPC_OVERHEAD_BYTES: usize = 512 << 10;

pub struct KvService {
    pub backend: Arc<Backend>,
}

fn check_size(req: &impl Message) -> Result<(), Status> {
    if req.encoded_len() > MAX_REQUEST_BYTES {
        return Err(errors::request_too_large());
    }
    Ok(())
}

impl KvService {
    /// Checks one write as the one-op transaction it runs as.
    fn check_op<T>(&self, request: &Request<T>, op: PbTxnOpRequest) -> Result<(), Status> {
        if let (Some(caller), Some(users)) = (caller_of(request), self.backend.users()) {
            let txn = PbTxnRequest {
                compare: vec![],
                success: vec![PbTxnRequestOp { request: Some(op) }],
                failure: vec![],
            };
            users.check_txn(&caller, &txn)?;
        }
        Ok(())
    }

    async fn single_op(&self, op: PbTxnOpRequest) -> Result<PbTxnOpResponse, Status> {
        let txn = PbTxnRequest {
            compare: vec![],
            success: vec![PbTxnRequestOp { request: Some(op) }],
            failure: vec![],
        };
        let mut resp = self.backend.txn(&txn).await?;
        let mut op = resp
            .responses
            .pop()
            .and_then(|r| r.response)
            .ok_or_else(|| Status::internal("arbor store: a one-op txn answered no op"))?;
        // The op's own header holds only its revision (as inside any txn); a Put or DeleteRange
        // answers with the whole header.
        match &mut op {
            PbTxnOpResponse::ResponsePut(r) => r.header = resp.header,
            PbTxnOpResponse::ResponseDeleteRange(r) => r.header = resp.header,
            _ => {}
        }
        Ok(op)
    }
}

#[tonic::async_trait]
impl PbKvService for KvService {
    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        if let Some(caller) = caller_of(&request) {
            let r = request.get_ref();
            if !caller.may_read(&r.key, &r.range_end) {
                return Err(denied());
            }
        }
        self.backend.range(request.get_ref()).map(Response::new)
    }

    type RangeStreamStream =
        Pin<Box<dyn Stream<Item = Result<PbRangeStreamResponse, Status>> + Send + 'static>>;

    async fn range_stream(
        &self,
        _request: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(errors::unimplemented("KV.RangeStream"))
    }

    async fn put(&self, request: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        check_size(request.get_ref())?;
        self.check_op(
            &request,
            PbTxnOpRequest::RequestPut(request.get_ref().clone()),
        )?;
        match self
            .single_op(PbTxnOpRequest::RequestPut(request.into_inner()))
            .await?
        {
            PbTxnOpResponse::ResponsePut(resp) => Ok(Response::new(resp)),
            _ => Err(Status::internal(
                "arbor store: a put answered as another op",
            )),
        }
    }

    async fn delete_range(
        &self,
        request: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        check_size(request.get_ref())?;
        self.check_op(
            &request,
            PbTxnOpRequest::RequestDeleteRange(request.get_ref().clone()),
        )?;
        match self
            .single_op(PbTxnOpRequest::RequestDeleteRange(request.into_inner()))
            .await?
        {
            PbTxnOpResponse::ResponseDeleteRange(resp) => Ok(Response::new(resp)),
            _ => Err(Status::internal(
                "arbor store: a delete answered as another op",
            )),
        }
    }

    async fn txn(&self, request: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        check_size(request.get_ref())?;
        if let (Some(caller), Some(users)) = (caller_of(&request), self.backend.users()) {
            users.check_txn(&caller, request.get_ref())?;
        }
        self.backend.txn(request.get_ref()).await.map(Response::new)
    }

    async fn compact(
        &self,
        request: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        admin_only(&request)?;
        let header = self.backend.compact(request.get_ref().revision).await?;
        Ok(Response::new(PbCompactionResponse {
            header: Some(header),
        }))
    }
}
