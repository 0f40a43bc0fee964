//! The resource engine: graphs of resources, checked and applied in dependency order, kept in
//! their desired state by events (inotify, child processes, store watches), exchanged between
//! hosts through the store. See docs/engine.md.
//!
//! | module | owns |
//! |---|---|
//! | graph | the YAML model and its validation (file:line:col errors) |
//! | template | `{{hostname}}` |
//! | resources | the `Resource` trait and one file per kind |
//! | artifacts | `source:` content on this host: blobs by sha256, checked before use |
//! | fs_events | the shared inotify instance: changes to paths, however they are saved |
//! | scheduler | order, concurrency, failures, notify |
//! | exchange | what the engine needs from the store, and the key layout |
//! | collect | exported resources as collected on this host |
//! | reload | hot reload: following a graph file's saved versions, and the diff |
//! | converge | the converged flag and its quiet period |
//! | diff | `--diff`: capped unified diffs of what resources change, and where they go |
//! | runner | `Engine`: one host's engine loop |
//! | store_exchange | the `Exchange` over the store client, and the converged flags |

pub mod artifacts;
pub mod collect;
pub mod converge;
pub mod diff;
pub mod exchange;
pub mod fs_events;
pub mod graph;
pub mod reload;
pub mod resources;
pub mod runner;
pub mod scheduler;
pub mod store_exchange;
pub mod template;

pub use diff::{DiffSink, ResourceDiff};
pub use exchange::{Exchange, ExportedResource, MemoryExchange};
pub use graph::{Graph, GraphError};
pub use runner::{Engine, EngineConfig, Status};

#[cfg(test)]
mod tests;
