//! `arbor run --file G`: one graph, run on this host.
//!
//! Exit codes: 0 converged (with --converged-timeout) or interrupted with nothing failing;
//! 1 resources failed; 2 the graph file is invalid (the message names file:line:col).

use crate::cli::RunConfig;
use crate::engine::exchange::{Exchange, MemoryExchange};
use crate::engine::graph;
use crate::engine::host::{Engine, EngineConfig};
use crate::engine::reload::watch_graph_file;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const EXIT_CONVERGED: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;

pub async fn run(config: &RunConfig) -> u8 {
    let Some(file) = &config.file else {
        eprintln!("arbor: run needs --file GRAPH");
        return EXIT_BAD_INPUT;
    };
    let hostname = config.hostname.clone().unwrap_or_else(system_hostname);
    let graph = match graph::load(file, &hostname) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("arbor: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    // Until the embedded store is wired in here, a local run exchanges with itself in
    // memory: its own exports are still collected, as with a store.
    let exchange: Arc<dyn Exchange> = Arc::new(MemoryExchange::new());
    let mut engine_config = EngineConfig::new(&hostname);
    engine_config.noop = config.noop;
    tracing::info!(
        "{hostname}: running graph `{}` from {}",
        graph.name,
        file.display()
    );
    let engine = match Engine::start(graph.clone(), engine_config, exchange) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("arbor: cannot start the engine: {e:#}");
            return EXIT_FAILED;
        }
    };
    let stop_watch = CancellationToken::new();
    if config.watch {
        tokio::spawn(watch_graph_file(
            file.clone(),
            hostname.clone(),
            engine.fs_watcher(),
            graph,
            engine.graph_sender(),
            stop_watch.clone(),
        ));
    }
    let code = wait(&engine, config).await;
    stop_watch.cancel();
    let last = engine.status().borrow().clone();
    engine.stop().await;
    for (id, why) in &last.failures {
        eprintln!("arbor: {id}: {why}");
    }
    for why in last.collect_errors.values() {
        eprintln!("arbor: {why}");
    }
    code
}

/// Until ^C, or until settled for --converged-timeout.
async fn wait(engine: &Engine, config: &RunConfig) -> u8 {
    let mut status = engine.status();
    let mut settled_since: Option<Instant> = None;
    loop {
        let now = status.borrow_and_update().clone();
        settled_since = match (now.settled, settled_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
        let code = if now.healthy() {
            EXIT_CONVERGED
        } else {
            EXIT_FAILED
        };
        let deadline = config
            .converged_timeout
            .zip(settled_since)
            .map(|(timeout, since)| since + timeout);
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted");
                return code;
            }
            changed = status.changed() => if changed.is_err() {
                return EXIT_FAILED;
            },
            _ = sleep_until(deadline), if deadline.is_some() => {
                if code == EXIT_CONVERGED {
                    tracing::info!("converged for {:?}, exiting", config.converged_timeout.unwrap_or_default());
                }
                return code;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The kernel's idea of this host's name (what `hostname` prints).
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
