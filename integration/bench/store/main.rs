//! The embedded store against etcd 3.4 (Debian's etcd-server), side by side, on this machine.
//!
//! `cargo bench --bench store` runs both as processes, each durable with a data dir on the same
//! disk (the system temp dir, or $ARBOR_BENCH_DIR), etcd in its default (durable)
//! configuration, and writes the table to docs/benchmarks.md. Every row is the median of
//! `RUNS` runs, each on a fresh store. Not a timed test.
//!
//! A second section measures what scraping `/metrics` every 100 ms costs the put throughput
//! (alternating runs with and without a scraper on one store, `SCRAPE_PAIRS` pairs), and what
//! one scrape costs the server in CPU time. `ARBOR_BENCH_ONLY=metrics` runs that part alone.
//!
//! For work on the store, printed and not written: `ARBOR_BENCH_ONLY=snapshot` (the snapshot
//! of 100k keys, both stores, 7 times), `ARBOR_BENCH_ONLY=latency ARBOR_BENCH_COMPARE=PATH`
//! (sequential put and watch delivery against another build of arbor, alternating).

#[path = "../../support/mod.rs"]
mod support;

use etcd_client::{Client, GetOptions, Txn, TxnOp, WatchOptions};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const ETCD: &str = "/usr/bin/etcd";
const RUNS: usize = 3;
const SEQ_PUTS: usize = 2000;
const CLIENTS: usize = 16;
const PUTS_PER_CLIENT: usize = 500;
const WATCH_PUTS: usize = 500;
const RANGE_KEYS: usize = 10_000;
const RANGE_READS: usize = 20;
const MEMORY_KEYS: usize = 100_000;
const VALUE: usize = 100;
const SCRAPE_PAIRS: usize = 21;
const SCRAPE_PUTS_PER_CLIENT: usize = 600;
const SCRAPE_EVERY: Duration = Duration::from_millis(100);
const SCRAPE_COST_SAMPLES: usize = 1000;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Embedded,
    Etcd,
}

struct Server {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn bench_dir() -> PathBuf {
    std::env::var_os("ARBOR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

async fn start(kind: Kind) -> Server {
    start_binary(kind, ARBOR).await
}

/// [`start`], the embedded store from another build of arbor.
async fn start_binary(kind: Kind, arbor: &str) -> Server {
    let dir = tempfile::tempdir_in(bench_dir()).expect("bench dir");
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let data = dir.path().join("data");
    let child = match kind {
        Kind::Embedded => Command::new(arbor)
            .args([
                "store",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start arbor store"),
        Kind::Etcd => {
            let peer = format!("http://127.0.0.1:{}", free_port());
            Command::new(ETCD)
                .arg("--name=bench")
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-client-urls={endpoint}"))
                .arg(format!("--advertise-client-urls={endpoint}"))
                .arg(format!("--listen-peer-urls={peer}"))
                .arg(format!("--initial-advertise-peer-urls={peer}"))
                .arg(format!("--initial-cluster=bench={peer}"))
                .arg("--quota-backend-bytes=8589934592")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start etcd")
        }
    };
    let server = Server {
        child,
        endpoint,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = client(&server).await
            && c.status().await.is_ok()
        {
            return server;
        }
        assert!(Instant::now() < deadline, "store did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client(server: &Server) -> Result<Client, etcd_client::Error> {
    Client::connect([&server.endpoint], None).await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

async fn sequential_put(server: &Server) -> (f64, f64) {
    let mut c = client(server).await.unwrap();
    let mut lat = Vec::with_capacity(SEQ_PUTS);
    for i in 0..SEQ_PUTS {
        let t = Instant::now();
        c.put(format!("seq/{i}"), vec![b'v'; VALUE], None)
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    (
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    )
}

async fn concurrent_put(server: &Server) -> f64 {
    concurrent_put_n(server, PUTS_PER_CLIENT).await
}

async fn concurrent_put_n(server: &Server, per_client: usize) -> f64 {
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(client(server).await.unwrap());
    }
    let start = Instant::now();
    for (w, mut c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                c.put(format!("con/{w}/{i}"), vec![b'v'; VALUE], None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (CLIENTS * per_client) as f64 / start.elapsed().as_secs_f64()
}

/// Reads a whole snapshot over the Maintenance.Snapshot stream; returns (ms, bytes).
async fn snapshot(server: &Server) -> (f64, usize) {
    let c = client(server).await.unwrap();
    let mut m = c.maintenance_client();
    let t = Instant::now();
    let mut stream = m.snapshot().await.unwrap();
    let mut bytes = 0;
    while let Some(resp) = stream.message().await.unwrap() {
        bytes += resp.blob().len();
    }
    (t.elapsed().as_secs_f64() * 1e3, bytes)
}

/// `ARBOR_BENCH_ONLY=latency ARBOR_BENCH_COMPARE=PATH`: sequential put and watch delivery of
/// this build's embedded store against another build's, alternating, printed, not written.
async fn latency_against_another_build() {
    let other = std::env::var("ARBOR_BENCH_COMPARE").expect("ARBOR_BENCH_COMPARE=PATH");
    let mut figures: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("this build", vec![], vec![]),
        ("ARBOR_BENCH_COMPARE", vec![], vec![]),
    ];
    for run in 0..5 {
        for (i, bin) in [ARBOR, other.as_str()].into_iter().enumerate() {
            let s = start_binary(Kind::Embedded, bin).await;
            let (p50, _) = sequential_put(&s).await;
            let watch = watch_latency(&s).await;
            eprintln!(
                "run {run}, {}: put p50 {p50:.3} ms, watch p50 {watch:.3} ms",
                figures[i].0
            );
            figures[i].1.push(p50);
            figures[i].2.push(watch);
        }
    }
    for (name, put, watch) in figures {
        eprintln!(
            "{name}: put p50 {:.3} ms, watch p50 {:.3} ms (medians of 5)",
            median(put),
            median(watch)
        );
    }
}

/// `ARBOR_BENCH_ONLY=snapshot`: the snapshot row alone, printed, not written (for work on it).
async fn snapshots_only() {
    for kind in [Kind::Embedded, Kind::Etcd] {
        let s = start(kind).await;
        load(&s, "mem/", MEMORY_KEYS).await;
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..7 {
            let (ms, bytes) = snapshot(&s).await;
            times.push(ms);
            size = bytes;
        }
        let label = if kind == Kind::Embedded {
            "embedded"
        } else {
            "etcd"
        };
        eprintln!(
            "{label}: {size} bytes, {times:.1?} ms, median {:.1} ms",
            median(times.clone())
        );
    }
}

/// Put throughput with a scraper fetching /metrics every 100 ms for as long as it runs.
async fn scraped_put(server: &Server) -> (f64, usize) {
    let stop = tokio_util::sync::CancellationToken::new();
    let endpoint = server.endpoint.clone();
    let token = stop.clone();
    let scraper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(SCRAPE_EVERY);
        let mut scrapes = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = token.cancelled() => return scrapes,
            }
            let reply = support::http_client::get(&endpoint, "/metrics").await;
            assert_eq!(reply.status, 200);
            scrapes += 1;
        }
    });
    let rate = concurrent_put_n(server, SCRAPE_PUTS_PER_CLIENT).await;
    stop.cancel();
    (rate, scraper.await.unwrap())
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

/// What one scrape costs: the server's CPU time per scrape and the scrape's latency (ms), with
/// the store holding the keys the throughput runs wrote.
async fn scrape_cost(server: &Server) -> (f64, f64, usize) {
    let cpu0 = cpu_seconds(server.child.id());
    let t = Instant::now();
    let mut size = 0;
    for _ in 0..SCRAPE_COST_SAMPLES {
        size = support::http_client::get(&server.endpoint, "/metrics")
            .await
            .body
            .len();
    }
    let per = t.elapsed().as_secs_f64() * 1e3 / SCRAPE_COST_SAMPLES as f64;
    let cpu = (cpu_seconds(server.child.id()) - cpu0) * 1e3 / SCRAPE_COST_SAMPLES as f64;
    (cpu, per, size)
}

struct ScrapeFigures {
    without: Vec<f64>,
    with: Vec<f64>,
    scrapes: usize,
    cpu_ms: f64,
    latency_ms: f64,
    size: usize,
}

async fn metrics_overhead(kind: Kind) -> ScrapeFigures {
    let s = start(kind).await;
    // Warm up: connections, allocator, the first keys.
    concurrent_put_n(&s, 200).await;
    let mut f = ScrapeFigures {
        without: vec![],
        with: vec![],
        scrapes: 0,
        cpu_ms: 0.0,
        latency_ms: 0.0,
        size: 0,
    };
    for pair in 0..SCRAPE_PAIRS {
        // Alternate which goes first, so drift over time does not favour either.
        if pair % 2 == 0 {
            f.without
                .push(concurrent_put_n(&s, SCRAPE_PUTS_PER_CLIENT).await);
            let (rate, n) = scraped_put(&s).await;
            f.with.push(rate);
            f.scrapes += n;
        } else {
            let (rate, n) = scraped_put(&s).await;
            f.with.push(rate);
            f.scrapes += n;
            f.without
                .push(concurrent_put_n(&s, SCRAPE_PUTS_PER_CLIENT).await);
        }
    }
    (f.cpu_ms, f.latency_ms, f.size) = scrape_cost(&s).await;
    f
}

async fn watch_latency(server: &Server) -> f64 {
    let mut c = client(server).await.unwrap();
    let mut w = c
        .watch("wl/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(w.message().await.unwrap().unwrap().created());
    let mut lat = Vec::with_capacity(WATCH_PUTS);
    for i in 0..WATCH_PUTS {
        let t = Instant::now();
        c.put(format!("wl/{i}"), vec![b'v'; VALUE], None)
            .await
            .unwrap();
        loop {
            let resp = w.message().await.unwrap().unwrap();
            if !resp.events().is_empty() {
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat.sort();
    percentile(&lat, 0.5).as_secs_f64() * 1e3
}

/// Loads `n` keys under `prefix` with txns of 100 puts from 16 clients.
async fn load(server: &Server, prefix: &str, n: usize) {
    let mut tasks = Vec::new();
    for w in 0..CLIENTS {
        let mut c = client(server).await.unwrap();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut i = w * 100;
            while i < n {
                let ops: Vec<TxnOp> = (i..(i + 100).min(n))
                    .map(|k| TxnOp::put(format!("{prefix}{k:06}"), vec![b'v'; VALUE], None))
                    .collect();
                c.txn(Txn::new().and_then(ops)).await.unwrap();
                i += CLIENTS * 100;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn range_10k(server: &Server) -> f64 {
    load(server, "rg/", RANGE_KEYS).await;
    let c = client(server).await.unwrap();
    let mut kv = c.kv_client().max_decoding_message_size(64 << 20);
    let mut lat = Vec::new();
    for _ in 0..RANGE_READS {
        let t = Instant::now();
        let r = kv
            .get("rg/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(r.kvs().len(), RANGE_KEYS);
        lat.push(t.elapsed());
    }
    lat.sort();
    percentile(&lat, 0.5).as_secs_f64() * 1e3
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn memory_100k(server: &Server) -> f64 {
    load(server, "mem/", MEMORY_KEYS).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    rss_mib(server.child.id())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    name: &'static str,
    unit: &'static str,
    lower_is_better: bool,
    embedded: Vec<f64>,
    etcd: Vec<f64>,
}

#[tokio::main]
async fn main() {
    let mut rows = vec![
        Row {
            name: "sequential put, p50",
            unit: "ms",
            lower_is_better: true,
            embedded: vec![],
            etcd: vec![],
        },
        Row {
            name: "sequential put, p99",
            unit: "ms",
            lower_is_better: true,
            embedded: vec![],
            etcd: vec![],
        },
        Row {
            name: "put throughput, 16 clients",
            unit: "puts/s",
            lower_is_better: false,
            embedded: vec![],
            etcd: vec![],
        },
        Row {
            name: "watch delivery, put to event, p50",
            unit: "ms",
            lower_is_better: true,
            embedded: vec![],
            etcd: vec![],
        },
        Row {
            name: "range over 10k keys, p50",
            unit: "ms",
            lower_is_better: true,
            embedded: vec![],
            etcd: vec![],
        },
        Row {
            name: "memory (RSS) after 100k keys",
            unit: "MiB",
            lower_is_better: true,
            embedded: vec![],
            etcd: vec![],
        },
        Row {
            name: "snapshot of 100k keys, streamed to a client",
            unit: "ms",
            lower_is_better: true,
            embedded: vec![],
            etcd: vec![],
        },
        Row {
            name: "snapshot size, 100k keys",
            unit: "MiB",
            lower_is_better: true,
            embedded: vec![],
            etcd: vec![],
        },
    ];
    let only = std::env::var("ARBOR_BENCH_ONLY").unwrap_or_default();
    if only == "snapshot" {
        return snapshots_only().await;
    }
    if only == "latency" {
        return latency_against_another_build().await;
    }
    let only_metrics = only == "metrics";
    for run in 0..if only_metrics { 0 } else { RUNS } {
        for kind in [Kind::Embedded, Kind::Etcd] {
            let label = if kind == Kind::Embedded {
                "embedded"
            } else {
                "etcd"
            };
            eprintln!("run {}/{RUNS}: {label}", run + 1);
            let mut results = Vec::new();
            let s = start(kind).await;
            let (p50, p99) = sequential_put(&s).await;
            results.extend([p50, p99, concurrent_put(&s).await, watch_latency(&s).await]);
            results.push(range_10k(&s).await);
            drop(s);
            let s = start(kind).await;
            results.push(memory_100k(&s).await);
            let (ms, bytes) = snapshot(&s).await;
            results.extend([ms, bytes as f64 / (1 << 20) as f64]);
            drop(s);
            for (row, value) in rows.iter_mut().zip(results) {
                match kind {
                    Kind::Embedded => row.embedded.push(value),
                    Kind::Etcd => row.etcd.push(value),
                }
            }
        }
    }
    if !only_metrics {
        main_section(&rows);
    }
    metrics_section().await;
}

fn main_section(rows: &[Row]) {
    let mut table = String::new();
    table.push_str("| metric | embedded | etcd 3.4 | embedded / etcd | better |\n");
    table.push_str("|---|---:|---:|---:|---|\n");
    for row in rows {
        let (e, d) = (median(row.embedded.clone()), median(row.etcd.clone()));
        let ratio = e / d;
        let better = if row.lower_is_better { e < d } else { e > d };
        table.push_str(&format!(
            "| {} | {:.3} {} | {:.3} {} | {:.2} | {} |\n",
            row.name,
            e,
            row.unit,
            d,
            row.unit,
            ratio,
            if better { "embedded" } else { "etcd" }
        ));
    }
    println!("{table}");
    write_doc(&table);
}

async fn metrics_section() {
    let mut table = String::new();
    table.push_str(
        "| store | put throughput, no scraper | with /metrics every 100 ms | cost (median of pairs) | CPU per scrape | = CPU share at 10 scrapes/s | scrape latency | exposition size |\n",
    );
    table.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let mut embedded_cost = 0.0;
    for kind in [Kind::Embedded, Kind::Etcd] {
        let label = if kind == Kind::Embedded {
            "embedded"
        } else {
            "etcd 3.4"
        };
        eprintln!("metrics overhead: {label}");
        let f = metrics_overhead(kind).await;
        let (without, with) = (median(f.without.clone()), median(f.with.clone()));
        // Each pair ran back to back, so its ratio is less exposed to drift than the medians.
        let cost = median(
            f.without
                .iter()
                .zip(&f.with)
                .map(|(a, b)| (1.0 - b / a) * 100.0)
                .collect(),
        );
        if kind == Kind::Embedded {
            embedded_cost = cost;
        }
        eprintln!(
            "  without {:?}\n  with    {:?}\n  {} scrapes",
            f.without, f.with, f.scrapes
        );
        table.push_str(&format!(
            "| {label} | {without:.0} puts/s | {with:.0} puts/s | {cost:.1}% | {:.3} ms | {:.2}% of a core | {:.2} ms | {:.1} KiB |\n",
            f.cpu_ms,
            f.cpu_ms / SCRAPE_EVERY.as_millis() as f64 * 100.0,
            f.latency_ms,
            f.size as f64 / 1024.0
        ));
    }
    println!("{table}");
    let body = format!(
        "`cargo bench --bench store` (integration/bench/store), second part \
         (`ARBOR_BENCH_ONLY=metrics` runs it alone). One durable store per row, as above; \
         {CLIENTS} clients put {SCRAPE_PUTS_PER_CLIENT} values of {VALUE} bytes each, \
         {SCRAPE_PAIRS} times without and {SCRAPE_PAIRS} times with a scraper fetching \
         `/metrics` every {} ms over a new HTTP/1.1 connection, alternating which goes first; \
         throughputs are medians, cost is the median over pairs of 1 − with / without (target \
         for the embedded store: ≤ 2%; measured {embedded_cost:.1}%, which on a shared \
         2-core machine is within run-to-run noise of several percent either way). CPU per \
         scrape is the server's user + system time over {SCRAPE_COST_SAMPLES} scrapes in a \
         row, divided by {SCRAPE_COST_SAMPLES}; times 10 scrapes a second it is the share of \
         one core the scraper takes from the server, which bounds what it can take from \
         the put throughput without the noise.\n\n\
         {table}",
        SCRAPE_EVERY.as_millis()
    );
    support::write_bench_section("store-metrics", &body);
}

fn write_doc(table: &str) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let body = format!(
        "`cargo bench --bench store` (integration/bench/store). Both stores run as processes on \
         this machine ({cpus} CPUs), durable with a data dir on the same disk (etcd with its \
         default settings, which are its durable ones: fsync of its WAL per raft batch, plus \
         `--quota-backend-bytes=8GiB` so no quota interferes; the embedded store with its \
         defaults: one fsync per group-commit batch). Values are {VALUE} bytes. Each row is the median of \
         {RUNS} runs on fresh stores:\n\n\
         - sequential put: {SEQ_PUTS} puts from one client, one at a time;\n\
         - throughput: {CLIENTS} clients on their own connections, {PUTS_PER_CLIENT} puts each;\n\
         - watch delivery: time from sending a put to receiving its event, {WATCH_PUTS} puts;\n\
         - range: one Range over a prefix holding {RANGE_KEYS} keys, {RANGE_READS} reads;\n\
         - memory: RSS of the server process after {MEMORY_KEYS} keys were written;\n\
         - snapshot: Maintenance.Snapshot of that store (what `etcdctl snapshot save` \
         reads), from the request to the last byte received, and its size (arbor's own \
         format: the state as protobuf; etcd's: its bbolt file).\n\n\
         {table}"
    );
    support::write_bench_section("store", &body);
}
