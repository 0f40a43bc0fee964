//! arbor: bootstrap and manage fleets of machines over SSH, through relays at any depth.
//!
//! `main` turns the command line into plain config (see `cli`) and hands it to the part of
//! arbor that owns that job. Nothing past this file sees clap.

use arbor::cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    let invocation = match cli::parse() {
        Ok(invocation) => invocation,
        Err(code) => return code,
    };
    init_tracing(invocation.verbosity);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arbor: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(invocation.command))
}

async fn run(command: cli::Command) -> ExitCode {
    match command {
        cli::Command::Version => {
            println!("arbor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        cli::Command::Store(config) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            match arbor::store::run(config, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("arbor store: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        cli::Command::Run(config) => ExitCode::from(arbor::engine::local::run(&config).await),
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
async fn cancel_on_signal(token: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    token.cancel();
}

fn init_tracing(verbosity: u8) {
    let default = match verbosity {
        0 => "arbor=info",
        1 => "arbor=debug",
        _ => "arbor=trace,russh=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARBOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
