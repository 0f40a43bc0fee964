//! Maintenance.Status and Cluster.MemberList, enough for `etcdctl endpoint status` and
//! `etcdctl member list`: the store is a single member that is always the leader. Every other
//! RPC of both services answers Unimplemented.

use super::backend::Backend;
use super::errors;
use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbClusterService, PbDefragmentRequest, PbDefragmentResponse,
    PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest,
    PbHashResponse, PbMaintenanceService, PbMember, PbMemberAddRequest, PbMemberAddResponse,
    PbMemberListRequest, PbMemberListResponse, PbMemberPromoteRequest, PbMemberPromoteResponse,
    PbMemberRemoveRequest, PbMemberRemoveResponse, PbMemberUpdateRequest, PbMemberUpdateResponse,
    PbMoveLeaderRequest, PbMoveLeaderResponse, PbSnapshotRequest, PbSnapshotResponse,
    PbStatusRequest, PbStatusResponse,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The etcd API level the store speaks; tools print it as the server version.
pub const API_VERSION: &str = "3.4.0";
/// The member name in `etcdctl member list`.
pub const MEMBER_NAME: &str = "arbor";

pub struct MaintenanceService {
    pub backend: Arc<Backend>,
}

#[tonic::async_trait]
impl PbMaintenanceService for MaintenanceService {
    async fn alarm(
        &self,
        _request: Request<PbAlarmRequest>,
    ) -> Result<Response<PbAlarmResponse>, Status> {
        Err(errors::unimplemented("Maintenance.Alarm"))
    }

    async fn status(
        &self,
        _request: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        let info = self.backend.status_info();
        let ids = self.backend.ids();
        Ok(Response::new(PbStatusResponse {
            header: Some(self.backend.header(self.backend.visible())),
            version: API_VERSION.to_string(),
            db_size: info.db_size,
            leader: ids.member_id,
            raft_index: info.index,
            raft_term: super::state::RAFT_TERM,
            raft_applied_index: info.index,
            errors: vec![],
            db_size_in_use: info.db_size,
            is_learner: false,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        _request: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        Err(errors::unimplemented("Maintenance.Defragment"))
    }

    async fn hash(
        &self,
        _request: Request<PbHashRequest>,
    ) -> Result<Response<PbHashResponse>, Status> {
        Err(errors::unimplemented("Maintenance.Hash"))
    }

    async fn hash_kv(
        &self,
        _request: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        Err(errors::unimplemented("Maintenance.HashKV"))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<PbSnapshotResponse, Status>> + Send + 'static>>;

    async fn snapshot(
        &self,
        _request: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(errors::unimplemented("Maintenance.Snapshot"))
    }

    async fn move_leader(
        &self,
        _request: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        Err(errors::unimplemented("Maintenance.MoveLeader"))
    }

    async fn downgrade(
        &self,
        _request: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        Err(errors::unimplemented("Maintenance.Downgrade"))
    }
}

pub struct ClusterService {
    pub backend: Arc<Backend>,
    /// The URLs clients reach this store at, as `member list` shows them.
    pub client_urls: Vec<String>,
}

#[tonic::async_trait]
impl PbClusterService for ClusterService {
    async fn member_add(
        &self,
        _request: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        Err(errors::unimplemented("Cluster.MemberAdd"))
    }

    async fn member_remove(
        &self,
        _request: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        Err(errors::unimplemented("Cluster.MemberRemove"))
    }

    async fn member_update(
        &self,
        _request: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        Err(errors::unimplemented("Cluster.MemberUpdate"))
    }

    async fn member_list(
        &self,
        _request: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        let member = PbMember {
            id: self.backend.ids().member_id,
            name: MEMBER_NAME.to_string(),
            peer_ur_ls: vec![],
            client_ur_ls: self.client_urls.clone(),
            is_learner: false,
        };
        Ok(Response::new(PbMemberListResponse {
            header: Some(self.backend.header(self.backend.visible())),
            members: vec![member],
        }))
    }

    async fn member_promote(
        &self,
        _request: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        Err(errors::unimplemented("Cluster.MemberPromote"))
    }
}
