//! The coordination store: an etcd v3 API server embedded in arbor, and the client every part
//! of arbor uses to talk to it or to a real etcd.
//!
//! Map of the server, from the wire inwards:
//! - [`server`]: listening (loopback or Unix socket only, unless told otherwise) and shutdown;
//! - `http`: HTTP on the same port: `/health`, `/version`, `/metrics` (`metrics`) and the
//!   JSON gateway under `/v3/` (`json`), over the same services as gRPC;
//! - `auth`: when a run's store checks credentials: users, tokens, key-prefix permissions and
//!   lease ownership (the front checks the token; each service checks what it is asked);
//! - `kv`, `watch`, `lease`, `maintenance`: the gRPC services, thin over the backend;
//! - `backend`: durability and visibility: nothing is shown or acknowledged before it is
//!   durable;
//! - `state`: the state machine (requests to effects), over `mvcc` (versions and revisions)
//!   and `lessor` (leases);
//! - `wal`: the write-ahead log with group commit, and snapshots (also the format of the
//!   snapshot files `etcdctl snapshot save` writes and `restore` reads).
//!
//! The client side: [`client`] (every request arbor makes), over [`members`] for a cluster
//! (which member a new connection goes to, and failing over between them).
//!
//! [`relay_front`]: what a relay serves its subtree: every call passed through to the store
//! above, watches on the run's exports shared (one upstream watch per relay).
//!
//! [`fuzzing`] is what the fuzz targets in `integration/fuzz` reach the services and restore
//! through.
//!
//! docs/store.md has the policies (limits, compaction, durability) and why they are so.

pub mod auth;
mod authority;
mod backend;
pub mod client;
mod errors;
mod front_cache;
mod front_leases;
pub mod fuzzing;
mod http;
mod json;
mod kv;
mod lease;
mod lessor;
mod maintenance;
pub mod members;
mod metrics;
mod mvcc;
pub mod relay_front;
mod restore;
mod server;
mod state;
mod wal;
mod watch;

pub use backend::{DEFAULT_QUOTA_BYTES, Options};
pub use kv::MAX_REQUEST_BYTES;
pub use restore::{Restored, restore};
pub use server::{ListenAddr, Store, StoreCommand, StoreConfig, run};
/// Log decoding as recovery does it (for fuzzing and tools), and its mid-log corruption error.
pub use wal::{Corruption, WalRecord, decode_segment};
