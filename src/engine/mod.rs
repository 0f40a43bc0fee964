//! The resource engine: graphs of resources, checked and applied in dependency order, kept in
//! their desired state by events (inotify, child processes, store watches), exchanged between
//! hosts through the store. See docs/engine.md.
//!
//! | module | owns |
//! |---|---|
//! | graph | the YAML model and its validation (file:line:col errors) |
//! | template | `{{hostname}}` |
//! | resources | the `Resource` trait and one file per kind |
//! | watch | the shared inotify instance |
//! | scheduler | order, concurrency, failures, notify |
//! | exchange | what the engine needs from the store, and the key layout |
//! | collect | exported resources as collected on this host |
//! | reload | hot reload: graph file watch and diff |
//! | converge | the converged flag and its quiet period |
//! | host | one host's engine loop |

pub mod collect;
pub mod converge;
pub mod exchange;
pub mod graph;
pub mod host;
pub mod local;
pub mod reload;
pub mod resources;
pub mod scheduler;
pub mod store_exchange;
pub mod template;
pub mod watch;

pub use exchange::{Exchange, ExportedResource, MemoryExchange};
pub use graph::{Graph, GraphError};
pub use host::{Engine, EngineConfig, Status};

#[cfg(test)]
mod tests;
