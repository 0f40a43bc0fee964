//! arbor as a library: the binary in `main.rs` is a thin shell over these modules, and the
//! end-to-end tests in `integration/` drive them directly against the lab.

pub mod cli;
pub mod engine;
pub mod exit;
pub mod node;
pub mod ssh;
pub mod store;
pub mod topology;
pub mod ui;
pub mod wire;
