//! The resource engine: graphs of resources, checked and applied in dependency order, kept in
//! their desired state by events (inotify, child processes, store watches), exchanged between
//! hosts through the store. See docs/engine.md.

pub mod converge;
pub mod exchange;
pub mod graph;
pub mod resources;
pub mod template;
pub mod watch;
