//! Who may do what, when the store checks credentials (a run's embedded store does; a plain
//! `arbor store` does not).
//!
//! Each user has a password and an [`Access`]: admin, or read and write key prefixes. A client
//! authenticates with etcd's own `Auth.Authenticate` (so etcd-client's `with_user` works
//! unchanged) and gets a token; every other request must carry it in the `token` metadata,
//! and each request is checked against the caller's access:
//!
//! - reads (Range, Watch, Txn compares) only within a read or write prefix;
//! - writes (Put, DeleteRange, Txn ops) only within a write prefix;
//! - a lease only by the user that granted it (Put with it, KeepAlive, Revoke, TimeToLive);
//! - Compact, the lease list and maintenance other than Status: admin only.
//!
//! The rules are etcd's key-prefix permissions, so the same model maps onto a real etcd's
//! users and roles.

use etcd_client::proto::{PbCompare, PbTxnOpRequest, PbTxnRequest, PbTxnRequestOp};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tonic::{Request, Status};

/// What one user may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Everything.
    Admin,
    /// Keys under the `read` and `write` prefixes, and the `own` keys themselves.
    Keys {
        read: Vec<Vec<u8>>,
        write: Vec<Vec<u8>>,
        /// Single keys the user may read and write (not prefixes).
        own: Vec<Vec<u8>>,
    },
}

/// A user, as the services see the caller of a request.
#[derive(Debug)]
pub struct Caller {
    pub name: String,
    pub access: Access,
}

struct User {
    password: String,
    access: Access,
}

/// The store's users, the tokens they were given, and which user owns which lease.
#[derive(Default)]
pub struct Users {
    users: HashMap<String, User>,
    tokens: Mutex<HashMap<String, Arc<Caller>>>,
    leases: Mutex<HashMap<i64, String>>,
    /// Users whose leases do not expire until the given time: hosts whose link is down
    /// (reconnecting), whose keepalives cannot reach the store until it comes back.
    held: Mutex<HashMap<String, std::time::Instant>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// etcd's answer to a request its caller may not make.
pub fn denied() -> Status {
    Status::permission_denied("etcdserver: permission denied")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Users {
    pub fn new() -> Users {
        Users::default()
    }

    pub fn add(&mut self, name: &str, password: &str, access: Access) {
        self.users.insert(
            name.to_string(),
            User {
                password: password.to_string(),
                access,
            },
        );
    }

    /// `Auth.Authenticate`: a fresh token for the user, or `None` for a wrong name or password.
    pub fn authenticate(&self, name: &str, password: &str) -> Option<String> {
        let user = self.users.get(name)?;
        if !constant_time_eq(user.password.as_bytes(), password.as_bytes()) {
            return None;
        }
        let token = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        lock(&self.tokens).insert(
            token.clone(),
            Arc::new(Caller {
                name: name.to_string(),
                access: user.access.clone(),
            }),
        );
        Some(token)
    }

    /// The caller a token was given to.
    pub fn caller(&self, token: &str) -> Option<Arc<Caller>> {
        lock(&self.tokens).get(token).cloned()
    }

    /// Records that `caller` granted lease `id`.
    pub fn lease_granted(&self, caller: &Caller, id: i64) {
        lock(&self.leases).insert(id, caller.name.clone());
    }

    /// Keeps the leases of `names` from expiring until `until` (or [`Users::release`]):
    /// their hosts are cut off for a while, and their keepalives wait on the link.
    pub fn hold(&self, names: &[String], until: std::time::Instant) {
        let mut held = lock(&self.held);
        for name in names {
            held.insert(name.clone(), until);
        }
    }

    /// Ends [`Users::hold`] for `names`.
    pub fn release(&self, names: &[String]) {
        let mut held = lock(&self.held);
        for name in names {
            held.remove(name);
        }
    }

    /// Whether lease `id`'s owner is held at `now`: the lease is renewed instead of expiring.
    pub fn lease_held(&self, id: i64, now: std::time::Instant) -> bool {
        let Some(owner) = lock(&self.leases).get(&id).cloned() else {
            return false;
        };
        lock(&self.held)
            .get(&owner)
            .is_some_and(|until| now < *until)
    }

    /// Whether `caller` may use lease `id` (0 is no lease).
    pub fn may_use_lease(&self, caller: &Caller, id: i64) -> bool {
        id == 0
            || caller.access == Access::Admin
            || lock(&self.leases).get(&id) == Some(&caller.name)
    }

    /// Checks every compare and op of a transaction, nested ones included.
    pub fn check_txn(&self, caller: &Caller, txn: &PbTxnRequest) -> Result<(), Status> {
        for c in &txn.compare {
            let PbCompare { key, range_end, .. } = c;
            if !caller.may_read(key, range_end) {
                return Err(denied());
            }
        }
        for PbTxnRequestOp { request } in txn.success.iter().chain(&txn.failure) {
            let allowed = match request {
                Some(PbTxnOpRequest::RequestRange(r)) => caller.may_read(&r.key, &r.range_end),
                Some(PbTxnOpRequest::RequestPut(p)) => {
                    caller.may_write(&p.key, &[]) && self.may_use_lease(caller, p.lease)
                }
                Some(PbTxnOpRequest::RequestDeleteRange(d)) => {
                    caller.may_write(&d.key, &d.range_end)
                }
                Some(PbTxnOpRequest::RequestTxn(inner)) => {
                    self.check_txn(caller, inner)?;
                    true
                }
                None => true,
            };
            if !allowed {
                return Err(denied());
            }
        }
        Ok(())
    }
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.access == Access::Admin
    }

    /// May read the keys in `[key, range_end)` (or just `key` when `range_end` is empty).
    pub fn may_read(&self, key: &[u8], range_end: &[u8]) -> bool {
        match &self.access {
            Access::Admin => true,
            Access::Keys { read, write, own } => {
                read.iter().chain(write).any(|p| covers(p, key, range_end))
                    || (range_end.is_empty() && own.iter().any(|k| k == key))
            }
        }
    }

    /// May write the keys in `[key, range_end)`.
    pub fn may_write(&self, key: &[u8], range_end: &[u8]) -> bool {
        match &self.access {
            Access::Admin => true,
            Access::Keys { write, own, .. } => {
                write.iter().any(|p| covers(p, key, range_end))
                    || (range_end.is_empty() && own.iter().any(|k| k == key))
            }
        }
    }
}

/// Whether every key of `[key, range_end)` starts with `prefix` (etcd's range conventions: an
/// empty `range_end` is the key alone, `\0` is every key from `key` on).
fn covers(prefix: &[u8], key: &[u8], range_end: &[u8]) -> bool {
    if !key.starts_with(prefix) {
        return false;
    }
    if range_end.is_empty() {
        return true;
    }
    if range_end == [0] {
        return prefix.is_empty();
    }
    match prefix_end(prefix) {
        Some(end) => range_end <= end.as_slice() && range_end > key,
        None => true,
    }
}

/// The smallest key greater than every key starting with `prefix`; `None` when there is none
/// (the prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller of a request, when the store checks credentials (the front put it there).
pub fn caller_of<T>(request: &Request<T>) -> Option<Arc<Caller>> {
    request.extensions().get::<Arc<Caller>>().cloned()
}

/// Admin-only requests: refused for any other caller.
pub fn admin_only<T>(request: &Request<T>) -> Result<(), Status> {
    match caller_of(request) {
        Some(c) if !c.is_admin() => Err(denied()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::{PbPutRequest, PbRangeRequest};

    fn host() -> Caller {
        Caller {
            name: "h1".into(),
            access: Access::Keys {
                read: vec![b"/r/exports/".to_vec()],
                write: vec![b"/r/exports/h1/".to_vec()],
                own: vec![b"/r/converged/h1".to_vec()],
            },
        }
    }

    #[test]
    fn a_host_reads_every_export_and_writes_only_its_own_keys() {
        let h = host();
        assert!(h.may_read(b"/r/exports/h2/file/x", b""));
        assert!(h.may_read(b"/r/exports/", b"/r/exports0"));
        assert!(!h.may_read(b"/", b"\0"));
        assert!(!h.may_read(b"/r/converged/h2", b""));
        assert!(h.may_write(b"/r/exports/h1/file/x", b""));
        assert!(h.may_write(b"/r/exports/h1/", b"/r/exports/h10"));
        assert!(h.may_write(b"/r/converged/h1", b""));
        assert!(!h.may_write(b"/r/exports/h2/file/x", b""));
        assert!(!h.may_write(b"/r/exports/h1/", b"/s"));
        assert!(!h.may_write(b"/r/exports/h1/", b"\0"));
        // A prefix of another host's name is not its own: h1 cannot write h10's keys.
        assert!(!h.may_write(b"/r/exports/h10/file/x", b""));
        assert!(!h.may_write(b"/r/converged/h10", b""));
        assert!(!h.may_write(b"/r/converged/h1", b"/r/converged/h2"));
    }

    #[test]
    fn a_held_users_leases_are_held_until_released_or_the_hold_ends() {
        let mut users = Users::new();
        users.add("h1", "pw", host().access);
        users.add("h2", "pw", host().access);
        let h1 = users
            .caller(&users.authenticate("h1", "pw").expect("token"))
            .expect("caller");
        let h2 = users
            .caller(&users.authenticate("h2", "pw").expect("token"))
            .expect("caller");
        users.lease_granted(&h1, 7);
        users.lease_granted(&h2, 8);
        let now = std::time::Instant::now();
        let later = now + std::time::Duration::from_secs(30);
        assert!(!users.lease_held(7, now));
        users.hold(&["h1".to_string()], later);
        assert!(users.lease_held(7, now), "h1's lease is held");
        assert!(!users.lease_held(8, now), "h2's is not");
        assert!(!users.lease_held(9, now), "nobody's lease is not");
        assert!(!users.lease_held(7, later), "the hold ends");
        users.release(&["h1".to_string()]);
        assert!(!users.lease_held(7, now), "released");
    }

    #[test]
    fn leases_belong_to_whoever_granted_them_and_txns_are_checked_op_by_op() {
        let mut users = Users::new();
        users.add("h1", "pw", host().access);
        assert!(users.authenticate("h1", "wrong").is_none());
        let token = users.authenticate("h1", "pw").expect("token");
        let h = users.caller(&token).expect("caller");
        assert!(users.caller("forged").is_none());
        users.lease_granted(&h, 7);
        assert!(users.may_use_lease(&h, 7));
        assert!(!users.may_use_lease(&h, 8));
        let put = |key: &[u8], lease| PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
                key: key.to_vec(),
                lease,
                ..Default::default()
            })),
        };
        let ok = PbTxnRequest {
            success: vec![put(b"/r/exports/h1/file/a", 7)],
            ..Default::default()
        };
        assert!(users.check_txn(&h, &ok).is_ok());
        let theirs = PbTxnRequest {
            success: vec![put(b"/r/exports/h2/file/a", 7)],
            ..Default::default()
        };
        assert!(users.check_txn(&h, &theirs).is_err());
        let other_lease = PbTxnRequest {
            failure: vec![put(b"/r/exports/h1/file/a", 8)],
            ..Default::default()
        };
        assert!(users.check_txn(&h, &other_lease).is_err());
        let nested = PbTxnRequest {
            success: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(PbTxnRequest {
                    success: vec![PbTxnRequestOp {
                        request: Some(PbTxnOpRequest::RequestRange(PbRangeRequest {
                            key: b"/".to_vec(),
                            range_end: vec![0],
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert!(users.check_txn(&h, &nested).is_err());
    }
}
