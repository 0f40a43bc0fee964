//! The gRPC errors the store answers with.
//!
//! Codes and messages are etcd's own (etcdserver/api/v3rpc/rpctypes), because clients match on
//! them: etcdctl prints them, and etcd-client users test for "required revision has been
//! compacted". Errors of our own say `arbor store:` so they are told apart from etcd's.

use super::mvcc::RevisionError;
use tonic::Status;

pub fn empty_key() -> Status {
    Status::invalid_argument("etcdserver: key is not provided")
}

pub fn key_not_found() -> Status {
    Status::invalid_argument("etcdserver: key not found")
}

pub fn value_provided() -> Status {
    Status::invalid_argument("etcdserver: value is provided")
}

pub fn lease_provided() -> Status {
    Status::invalid_argument("etcdserver: lease is provided")
}

pub fn too_many_ops() -> Status {
    Status::invalid_argument("etcdserver: too many operations in txn request")
}

pub fn duplicate_key() -> Status {
    Status::invalid_argument("etcdserver: duplicate key given in txn request")
}

pub fn request_too_large() -> Status {
    Status::invalid_argument("etcdserver: request is too large")
}

pub fn compacted() -> Status {
    Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
}

pub fn future_revision() -> Status {
    Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
}

pub fn lease_not_found() -> Status {
    Status::not_found("etcdserver: requested lease not found")
}

pub fn lease_exists() -> Status {
    Status::failed_precondition("etcdserver: lease already exists")
}

pub fn lease_ttl_too_large() -> Status {
    Status::out_of_range("etcdserver: too large lease TTL")
}

/// etcd's ErrGRPCNoSpace: the space quota is reached, or the NOSPACE alarm is raised.
pub fn no_space() -> Status {
    Status::resource_exhausted("etcdserver: mvcc: database space exceeded")
}

pub fn revision(e: RevisionError) -> Status {
    match e {
        RevisionError::Compacted(_) => compacted(),
        RevisionError::Future => future_revision(),
    }
}

/// The write-ahead log failed: the store keeps serving reads of what is durable but accepts no
/// more writes, since it can no longer promise they survive.
pub fn storage_failed(cause: &str) -> Status {
    Status::unavailable(format!(
        "arbor store: the write-ahead log failed, writes are refused: {cause}"
    ))
}

/// etcd's auth API (users, roles, tokens) is not served: arbor gives each host its own
/// credential instead.
pub fn auth_unsupported(what: &str) -> Status {
    Status::unimplemented(format!(
        "arbor store: {what} is not supported: the store has no etcd users or roles; arbor uses \
         per-host credentials (docs/store.md)"
    ))
}

pub fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("arbor store: {what} is not implemented"))
}
