//! arbor: bootstrap and manage fleets of machines over SSH, through relays at any depth.
//!
//! `main` turns the command line into plain config (see `cli`) and hands it to the part of
//! arbor that owns that job. Nothing past this file sees clap.

use arbor::cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Before any thread starts: arbor keeps the agent socket for itself, and the commands its
    // graphs run never see one.
    arbor::ssh::take_agent_socket();
    let invocation = match cli::parse() {
        Ok(invocation) => invocation,
        Err(code) => return code,
    };
    // A copy from a parent: no runtime, no log, nothing on stdout.
    match &invocation.command {
        cli::Command::Receive(args) => return arbor::node::transfer::receive_main(args),
        cli::Command::SeedServe(args) => return arbor::node::sibling::serve_main(args),
        cli::Command::SeedFetch(args) => return arbor::node::sibling::fetch_main(args),
        _ => {}
    }
    // A staged node's stdout carries frames: its log goes up the link as events instead.
    let event_log = match &invocation.command {
        cli::Command::Run(options) if options.depth > 0 => {
            let file = options.workdir.as_ref().and_then(|dir| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("arbor.log"))
                    .ok()
            });
            Some(arbor::node::parent_link::EventLog::new(file))
        }
        _ => None,
    };
    let set_verbosity = match init_tracing(&invocation, event_log.clone()) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("arbor: {e}");
            return ExitCode::from(arbor::exit::BAD_INPUT);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("arbor: cannot start the async runtime: {e}");
            return ExitCode::from(arbor::exit::FAILED);
        }
    };
    let code = runtime.block_on(run(invocation.command, event_log, set_verbosity));
    // Don't wait for blocked reads of stdin (tokio reads it on a blocking thread).
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

async fn run(
    command: cli::Command,
    event_log: Option<arbor::node::parent_link::EventLog>,
    set_verbosity: arbor::node::relay::SetVerbosity,
) -> ExitCode {
    match command {
        cli::Command::Version => {
            println!("arbor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        cli::Command::Completions(shell) => {
            cli::print_completions(shell);
            ExitCode::SUCCESS
        }
        cli::Command::Store(config) => {
            let shutdown = tokio_util::sync::CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            match arbor::store::run(config, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("arbor store: {e:#}");
                    ExitCode::from(arbor::exit::FAILED)
                }
            }
        }
        cli::Command::TopologyCheck { file, ssh_config } => ExitCode::from(
            arbor::topology::check::run(&file, ssh_config.as_deref(), &arbor::node::home_dir()),
        ),
        cli::Command::Receive(args) => arbor::node::transfer::receive_main(&args),
        cli::Command::SeedServe(args) => arbor::node::sibling::serve_main(&args),
        cli::Command::SeedFetch(args) => arbor::node::sibling::fetch_main(&args),
        cli::Command::Reattach { dir } => {
            ExitCode::from(arbor::node::reattach::splice_main(&dir).await)
        }
        cli::Command::Exec(options) => ExitCode::from(arbor::node::exec::run(*options).await),
        cli::Command::Run(options) => match event_log {
            Some(log) => {
                ExitCode::from(arbor::node::relay::run(*options, log, set_verbosity).await)
            }
            None => ExitCode::from(arbor::node::initiator::run(*options).await),
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

/// The log filter for a verbosity: 0 info, 1 debug, 2 and more trace (and russh's debug);
/// `quiet`: warnings and errors.
fn targets(verbosity: u8, quiet: bool) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    // Plain target=level lists (no regex engine in the binary that goes to every host).
    match verbosity {
        _ if quiet => Targets::new().with_target("arbor", LevelFilter::WARN),
        0 => Targets::new().with_target("arbor", LevelFilter::INFO),
        1 => Targets::new().with_target("arbor", LevelFilter::DEBUG),
        _ => Targets::new()
            .with_target("arbor", LevelFilter::TRACE)
            .with_target("russh", LevelFilter::DEBUG),
    }
}

/// Starts logging; returns how to change the level later (a staged node learns its level
/// from its parent's `Start` frame). ARBOR_LOG, when set, wins over both. The initiator logs
/// to stderr (coloured if `color`) and, with `log_file`, to that file as well, with
/// timestamps, at the -v level whatever -q says.
fn init_tracing(
    invocation: &cli::Invocation,
    event_log: Option<arbor::node::parent_link::EventLog>,
) -> Result<arbor::node::relay::SetVerbosity, String> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let (verbosity, quiet) = (invocation.verbosity, invocation.quiet);
    let from_env = std::env::var("ARBOR_LOG").ok().and_then(|spec| {
        spec.parse::<Targets>()
            .map_err(|e| eprintln!("arbor: ignoring ARBOR_LOG={spec:?}: {e}"))
            .ok()
    });
    let fixed = from_env.is_some();
    let (filter, handle) = tracing_subscriber::reload::Layer::new(
        from_env
            .clone()
            .unwrap_or_else(|| targets(verbosity, quiet)),
    );
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
        None => {
            let file = match &invocation.log_file {
                Some(path) => Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| format!("--log-file {}: {e}", path.display()))?,
                ),
                None => None,
            };
            let file_layer = file.map(|f| {
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_ansi(false)
                    .with_writer(std::sync::Mutex::new(f))
                    .with_filter(from_env.unwrap_or_else(|| targets(verbosity, false)))
            });
            tracing_subscriber::registry()
                .with(
                    layer
                        .with_writer(|| arbor::ui::live::Stderr)
                        .with_ansi(invocation.color)
                        .with_filter(filter),
                )
                .with(file_layer)
                .init()
        }
    }
    Ok(Box::new(move |verbosity, quiet| {
        if !fixed {
            let _ = handle.reload(targets(verbosity, quiet));
        }
    }))
}
