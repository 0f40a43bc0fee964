//! Benchmark: the engine's event paths. Two engines share one exchange; we measure the latency
//! from a changed export to the collected file written by the other engine, drift repair
//! latency, and a graph of 1,000 files (time to first convergence, memory). Writes its table
//! into docs/benchmarks.md. Run by hand: `cargo bench --bench engine`.
//!
//! Waiting is by inotify (arbor's own `FsEvents`), so the figures are not rounded up to a
//! polling interval.

#[path = "../support/mod.rs"]
mod support;

use arbor::engine::fs_events::FsEvents;
use arbor::engine::graph::{self, Graph};
use arbor::engine::store_exchange::StoreExchange;
use arbor::engine::{Engine, EngineConfig, Exchange};
use arbor::store::client::{Endpoints, StoreClient};
use arbor::store::{Store, StoreConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SAMPLES: usize = 200;
const FILES: usize = 1000;

/// The exchange the engines share: the embedded store (in memory) on a loopback port, through
/// the store client, as hosts in a run use it.
async fn new_exchange() -> Arc<dyn Exchange> {
    let config = StoreConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: None,
        allow_non_loopback: false,
    };
    let store = Store::bind(&config).await.expect("embedded store");
    let endpoint = store.endpoint().to_string();
    tokio::spawn(store.serve(tokio_util::sync::CancellationToken::new()));
    let client = StoreClient::connect(&Endpoints::parse(&endpoint).expect("endpoint"))
        .await
        .expect("store client");
    Arc::new(StoreExchange::new(
        client,
        arbor::engine::exchange::Keys::for_run("bench"),
    ))
}

fn main() {
    // `cargo test --all-targets` runs bench binaries too (without `--bench`): measure only
    // under `cargo bench`, so tests never rewrite docs/benchmarks.md.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (export_p50, export_p99) = rt.block_on(export_to_collected());
    let (drift_p50, drift_p99) = rt.block_on(drift_repair());
    let (first_write, converged, rss_mb) = rt.block_on(thousand_files());
    let table = format!(
        "| measure | p50 | p99 | target |\n|---|---|---|---|\n\
         | export changed → collected file written on the other engine | {} | {} | p50 < 20 ms |\n\
         | managed file edited → restored | {} | {} | p50 < 100 ms |\n\n\
         | {FILES} file resources | figure |\n|---|---|\n\
         | start → every file written | {} |\n\
         | start → converged flag (includes the 500 ms quiet period) | {} |\n\
         | resident memory after convergence (whole process) | {rss_mb:.1} MB |\n\n\
         {SAMPLES} samples each; two engines in one process sharing the embedded store \
         (in memory) over loopback gRPC. Command: `cargo bench --bench engine`.\n",
        ms(export_p50),
        ms(export_p99),
        ms(drift_p50),
        ms(drift_p99),
        ms(first_write),
        ms(converged),
    );
    println!("{table}");
    support::write_bench_section("engine", &table);
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn parse(src: &str, host: &str) -> Graph {
    graph::parse(src, Path::new("bench.yaml"), host).unwrap_or_else(|e| panic!("{e}"))
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.50), at(0.99))
}

/// Waits (by inotify) until `path` holds `want`.
async fn until_content(sub: &arbor::engine::fs_events::Subscription, path: &Path, want: &str) {
    loop {
        if std::fs::read_to_string(path).ok().as_deref() == Some(want) {
            return;
        }
        tokio::time::timeout(Duration::from_secs(10), sub.changed())
            .await
            .unwrap_or_else(|_| panic!("{} never held {want:?}", path.display()));
    }
}

async fn converged(engine: &Engine) {
    let (status, held) = engine
        .wait_for(Duration::from_secs(60), |s| s.converged)
        .await;
    assert!(held, "not converged: {status:?}");
}

async fn export_to_collected() -> (Duration, Duration) {
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let exporter_graph = |n: usize| {
        parse(
            &format!(
                "graph: a\nresources:\n  file:\n  - name: \"@@probe\"\n    path: /x/probe\n    content: \"{n}\\n\"\n"
            ),
            "a",
        )
    };
    let collector = format!(
        "graph: b\ncollect:\n- kind: file\n  pattern: {}/\n",
        db.path().display()
    );
    let ex = new_exchange().await;
    let a = Engine::start(exporter_graph(0), EngineConfig::new("a"), ex.clone()).expect("a");
    let b = Engine::start(parse(&collector, "b"), EngineConfig::new("b"), ex).expect("b");
    let fs = FsEvents::new().expect("inotify");
    let probe = db.path().join("probe");
    let sub = fs.subscribe(&probe).expect("watch probe");
    until_content(&sub, &probe, "0\n").await;
    let mut samples = Vec::with_capacity(SAMPLES);
    for n in 1..=SAMPLES {
        let g = exporter_graph(n);
        let start = Instant::now();
        a.load_graph(g);
        until_content(&sub, &probe, &format!("{n}\n")).await;
        samples.push(start.elapsed());
    }
    a.stop().await;
    b.stop().await;
    drop(da);
    percentiles(samples)
}

async fn drift_repair() -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("guarded");
    let src = format!(
        "graph: g\nresources:\n  file:\n  - name: guarded\n    path: {}\n    content: \"right\\n\"\n",
        path.display()
    );
    let e = Engine::start(
        parse(&src, "h"),
        EngineConfig::new("h"),
        new_exchange().await,
    )
    .expect("e");
    let fs = FsEvents::new().expect("inotify");
    let sub = fs.subscribe(&path).expect("watch");
    until_content(&sub, &path, "right\n").await;
    converged(&e).await;
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        std::fs::write(&path, "wrong\n").expect("vandalise");
        until_content(&sub, &path, "right\n").await;
        samples.push(start.elapsed());
    }
    e.stop().await;
    percentiles(samples)
}

async fn thousand_files() -> (Duration, Duration, f64) {
    let dir = tempfile::tempdir().expect("dir");
    let mut src = String::from("graph: big\nresources:\n  file:\n");
    for i in 0..FILES {
        src.push_str(&format!(
            "  - name: f{i}\n    path: {}/f{i}\n    content: \"file {i}\\n\"\n",
            dir.path().display()
        ));
    }
    let g = parse(&src, "h");
    let last = dir.path().join(format!("f{}", FILES - 1));
    let fs = FsEvents::new().expect("inotify");
    let sub = fs.subscribe(&last).expect("watch");
    let start = Instant::now();
    let e = Engine::start(g, EngineConfig::new("h"), new_exchange().await).expect("e");
    until_content(&sub, &last, &format!("file {}\n", FILES - 1)).await;
    // The last file in the graph is not necessarily the last written: wait for all.
    let (status, held) = e
        .wait_for(Duration::from_secs(60), |s| s.changes as usize >= FILES)
        .await;
    assert!(held, "{status:?}");
    let first_write = start.elapsed();
    converged(&e).await;
    let converged_at = start.elapsed();
    let rss = rss_mb();
    e.stop().await;
    (first_write, converged_at, rss)
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
