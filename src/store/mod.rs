//! The coordination store: an etcd v3 API server embedded in arbor, and the client every part
//! of arbor uses to talk to it or to a real etcd.
//!
//! Map of the server, from the wire inwards:
//! - [`server`]: listening (loopback or Unix socket only, unless told otherwise) and shutdown;
//! - `kv`, `watch`, `lease`, `maintenance`: the gRPC services, thin over the backend;
//! - `backend`: durability and visibility: nothing is shown or acknowledged before it is
//!   durable;
//! - `state`: the state machine (requests to effects), over `mvcc` (versions and revisions)
//!   and `lessor` (leases);
//! - `wal`: the write-ahead log with group commit, and snapshots.
//!
//! docs/store.md has the policies (limits, compaction, durability) and why they are so.

mod backend;
pub mod client;
mod errors;
mod kv;
mod lease;
mod lessor;
mod maintenance;
mod mvcc;
mod server;
mod state;
mod wal;
mod watch;

pub use backend::Options;
pub use kv::MAX_REQUEST_BYTES;
pub use server::{ListenAddr, Store, StoreConfig, run};
/// Log decoding as recovery does it (for fuzzing and tools), and its mid-log corruption error.
pub use wal::{Corruption, WalRecord, decode_segment};
