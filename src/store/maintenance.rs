//! The Maintenance service (Status, Alarm, Defragment, Snapshot) and Cluster.MemberList: the
//! store is a single member that is always the leader. Hash, HashKV, MoveLeader, Downgrade and
//! the rest of Cluster answer Unimplemented.

use super::auth::admin_only;
use super::backend::Backend;
use super::errors;
use super::state::ALARM_NOSPACE;
use super::wal;
use etcd_client::proto::{
    PbAlarmMember, PbAlarmRequest, PbAlarmResponse, PbClusterService, PbDefragmentRequest,
    PbDefragmentResponse, PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest,
    PbHashKvResponse, PbHashRequest, PbHashResponse, PbMaintenanceService, PbMember,
    PbMemberAddRequest, PbMemberAddResponse, PbMemberListRequest, PbMemberListResponse,
    PbMemberPromoteRequest, PbMemberPromoteResponse, PbMemberRemoveRequest, PbMemberRemoveResponse,
    PbMemberUpdateRequest, PbMemberUpdateResponse, PbMoveLeaderRequest, PbMoveLeaderResponse,
    PbSnapshotRequest, PbSnapshotResponse, PbStatusRequest, PbStatusResponse,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The etcd API level the store speaks; tools print it as the server version.
pub const API_VERSION: &str = "3.4.0";
/// The member name in `etcdctl member list`.
pub const MEMBER_NAME: &str = "arbor";

/// A snapshot is sent in messages of about this size, small enough that sending overlaps
/// encoding (1 MiB messages made a 100k-key snapshot a third slower).
const SNAPSHOT_CHUNK: usize = 128 << 10;

// AlarmRequest.AlarmAction values.
const ALARM_GET: i32 = 0;
const ALARM_ACTIVATE: i32 = 1;
const ALARM_DEACTIVATE: i32 = 2;

pub struct MaintenanceService {
    pub backend: Arc<Backend>,
}

#[tonic::async_trait]
impl PbMaintenanceService for MaintenanceService {
    /// GET lists the alarms; ACTIVATE raises NOSPACE (the only alarm the store has);
    /// DEACTIVATE disarms one. As in etcd, the response has no header and lists the alarms
    /// listed, raised or disarmed (`etcdctl alarm list`, `etcdctl alarm disarm`).
    async fn alarm(
        &self,
        request: Request<PbAlarmRequest>,
    ) -> Result<Response<PbAlarmResponse>, Status> {
        admin_only(&request)?;
        let req = request.get_ref();
        let member_id = self.backend.ids().member_id;
        let alarms = match req.action {
            ALARM_GET => self.backend.alarms(),
            ALARM_ACTIVATE => {
                if req.alarm != ALARM_NOSPACE {
                    return Err(Status::invalid_argument(
                        "arbor store: only the NOSPACE alarm can be raised",
                    ));
                }
                self.backend
                    .raise_alarm(req.alarm)
                    .await?
                    .into_iter()
                    .collect()
            }
            ALARM_DEACTIVATE if req.member_id == member_id => self
                .backend
                .clear_alarm(req.alarm)
                .await?
                .into_iter()
                .collect(),
            ALARM_DEACTIVATE => vec![],
            _ => {
                return Err(Status::invalid_argument(
                    "arbor store: unknown alarm action",
                ));
            }
        };
        Ok(Response::new(PbAlarmResponse {
            header: None,
            alarms: alarms
                .into_iter()
                .map(|alarm| PbAlarmMember { member_id, alarm })
                .collect(),
        }))
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
            errors: info.errors,
            db_size_in_use: info.db_size_in_use,
            is_learner: false,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        request: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        admin_only(&request)?;
        self.backend.defragment().await?;
        // etcd answers with no header.
        Ok(Response::new(PbDefragmentResponse { header: None }))
    }

    async fn hash(
        &self,
        request: Request<PbHashRequest>,
    ) -> Result<Response<PbHashResponse>, Status> {
        admin_only(&request)?;
        Err(errors::unimplemented("Maintenance.Hash"))
    }

    async fn hash_kv(
        &self,
        request: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        admin_only(&request)?;
        Err(errors::unimplemented("Maintenance.HashKV"))
    }

    type SnapshotStream =
        Pin<Box<dyn Stream<Item = Result<PbSnapshotResponse, Status>> + Send + 'static>>;

    /// The whole state as a backup (arbor's format, docs/store.md; `wal::backup_header`), in
    /// chunks sent as they are encoded: `etcdctl snapshot save` writes them to its file as they
    /// come.
    async fn snapshot(
        &self,
        request: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        admin_only(&request)?;
        let started = std::time::Instant::now();
        let parts = self.backend.snapshot().await?;
        let metrics = self.backend.metrics().clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            use sha2::Digest;
            let lens = parts.revision_lens();
            let len = parts.encoded_len(&lens) as u64;
            let padding = wal::backup_padding(len);
            let total = 16 + len + (padding + wal::SHA256_BYTES) as u64;
            let mut sha = sha2::Sha256::new();
            let mut sent = 0u64;
            let mut send = |blob: Vec<u8>, sha: &mut sha2::Sha256| {
                sha.update(&blob);
                sent += blob.len() as u64;
                // etcd 3.4 sends no header with a snapshot.
                let resp = PbSnapshotResponse {
                    header: None,
                    remaining_bytes: total.saturating_sub(sent),
                    blob,
                    version: String::new(),
                };
                tx.blocking_send(Ok(resp)).is_ok()
            };
            let whole = parts.encode_chunks(&lens, wal::backup_header(len), SNAPSHOT_CHUNK, |c| {
                send(c, &mut sha)
            });
            if !whole {
                return; // the client went away
            }
            let mut trailer = vec![0u8; padding];
            sha.update(&trailer);
            trailer.extend_from_slice(&sha.finalize());
            sent += trailer.len() as u64;
            if sent != total {
                // The encoded length is computed apart from the encoding: were they ever to
                // disagree, the file would be refused by restore; say so here too.
                tracing::error!("store: a snapshot came out at {sent} bytes, not {total}");
            }
            let last = PbSnapshotResponse {
                header: None,
                remaining_bytes: 0,
                blob: trailer,
                version: String::new(),
            };
            if tx.blocking_send(Ok(last)).is_ok() {
                let took = started.elapsed();
                metrics.snapshot_send.observe(took);
                tracing::debug!("store: a snapshot of {total} bytes sent in {took:?}");
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        request: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        admin_only(&request)?;
        Err(errors::unimplemented("Maintenance.MoveLeader"))
    }

    async fn downgrade(
        &self,
        request: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        admin_only(&request)?;
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
