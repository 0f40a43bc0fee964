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
    // A staged node's stdout carries frames: its log goes up the link as events instead.
    let event_log = match &invocation.command {
        cli::Command::Run(config) if config.depth > 0 => {
            let file = config.workdir.as_ref().and_then(|dir| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("arbor.log"))
                    .ok()
            });
            Some(arbor::node::parent::EventLog::new(file))
        }
        _ => None,
    };
    init_tracing(invocation.verbosity, event_log.clone());
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
    let code = runtime.block_on(run(invocation.command, event_log));
    // Don't wait for blocked reads of stdin (tokio reads it on a blocking thread).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn run(command: cli::Command, event_log: Option<arbor::node::parent::EventLog>) -> ExitCode {
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
        cli::Command::TopologyCheck(path) => ExitCode::from(arbor::topology::check::run(&path)),
        cli::Command::Run(config) => match event_log {
            Some(log) => ExitCode::from(arbor::node::relay::run(*config, log).await),
            None => ExitCode::from(arbor::node::initiator::run(*config).await),
        },
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

fn init_tracing(verbosity: u8, event_log: Option<arbor::node::parent::EventLog>) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    // Plain target=level lists (no regex engine in the binary that goes to every host).
    let default = match verbosity {
        0 => Targets::new().with_target("arbor", LevelFilter::INFO),
        1 => Targets::new().with_target("arbor", LevelFilter::DEBUG),
        _ => Targets::new()
            .with_target("arbor", LevelFilter::TRACE)
            .with_target("russh", LevelFilter::DEBUG),
    };
    let filter = match std::env::var("ARBOR_LOG") {
        Ok(spec) => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("arbor: ignoring ARBOR_LOG={spec:?}: {e}");
            default.clone()
        }),
        Err(_) => default,
    };
    let layer = tracing_subscriber::fmt::layer().with_target(false);
    match event_log {
        Some(log) => tracing_subscriber::registry()
            .with(
                layer
                    .with_writer(log)
                    .with_ansi(false)
                    .without_time()
                    .with_filter(filter),
            )
            .init(),
        None => tracing_subscriber::registry()
            .with(layer.with_writer(std::io::stderr).with_filter(filter))
            .init(),
    }
}
