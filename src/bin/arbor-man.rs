//! Writes arbor's man pages: `cargo run --bin arbor-man [DIR]` (default `target/man`).
//!
//! One page per command (`arbor.1`, `arbor-run.1`, `arbor-store.1`, …), from the same clap
//! definitions as `--help`. It is a binary of its own so that the man page generator is never
//! linked into `arbor`, the binary copied to every host.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("target/man"), PathBuf::from);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("arbor-man: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    match clap_mangen::generate_to(arbor::cli::command(), &dir) {
        Ok(()) => {
            println!("man pages written to {}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("arbor-man: writing to {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
