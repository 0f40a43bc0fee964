//! 10,000 simulated hosts behind 100 relay fronts, against the real store and front code, on
//! this machine: `cargo bench --bench scale` writes the `scale` section of docs/benchmarks.md.
//!
//! The store is `arbor store` (in memory), a process of its own, so its memory and CPU are
//! its own. Each rack has a relay uplink: a TCP proxy on loopback to the store that counts the
//! bytes both ways. With fronts, a relay front (arbor's own, in this process) serves the rack
//! over that uplink, sharing two prefixes: the rack's exports and the global one. Direct, the
//! rack's hosts use the uplink themselves (as leaves do through chained tunnels). The hosts of
//! a rack share one HTTP/2 connection (to their front, or up the uplink), each with streams of
//! its own: that keeps this machine's file descriptors in bounds and changes no count the
//! store or the front sees.
//!
//! Each simulated host, all started at once: grants a lease and keeps it alive; exports one
//! key under its rack's prefix with that lease; reads its rack's prefix and the global one
//! (serializably, as a leaf reads the exports) and watches both from the revision after; once
//! it has seen every host of its rack and the global key, writes its converged key. The run
//! ends when every host has; watchers and leases are read from the store's `/metrics` then.
//!
//! Sizes: 100 × 100 and 50 × 100 (is a rack's uplink independent of the other racks?), each
//! with fronts and direct, `RUNS` runs each, alternating; medians. `ARBOR_SCALE_SIZES=RxH,…`
//! chooses other sizes, `ARBOR_SCALE_RUNS` the runs; `ARBOR_SCALE_PRINT=1` prints without
//! writing the docs.

#[path = "../support/mod.rs"]
mod support;

use arbor::store::relay_front::{FrontConfig, FrontListener, serve_on};
use etcd_client::{Client, GetOptions, PutOptions, WatchOptions};
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const RUNS: usize = 3;
const LEASE_TTL: i64 = 60;
const KEEPALIVE_EVERY: Duration = Duration::from_secs(20);
const VALUE_BYTES: usize = 100;
const DEADLINE: Duration = Duration::from_secs(600);
const GLOBAL_KEY: &str = "/sim/global/config";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Fronts,
    Direct,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Fronts => "relay fronts",
            Mode::Direct => "direct (no fronts)",
        }
    }
}

struct Store {
    child: Child,
    endpoint: String,
    addr: String,
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_store() -> Store {
    let port = support::free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(ARBOR)
        .args(["store", "--listen", &addr, "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start arbor store");
    let store = Store {
        child,
        endpoint: format!("http://{addr}"),
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = Client::connect([&store.endpoint], None).await
            && c.status().await.is_ok()
        {
            return store;
        }
        assert!(Instant::now() < deadline, "the store did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Peak resident memory (kB) and CPU seconds (user + system) of process `pid`.
fn usage(pid: &str) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (peak, (ticks(11) + ticks(12)) / 100.0)
}

fn rack_prefix(rack: usize) -> String {
    format!("/sim/exports/rack-{rack:03}/")
}

/// One simulated host, until `stop`; an error counts only if it came before the stop (which
/// cuts the uplinks).
async fn host(
    c: Client,
    rack: usize,
    index: usize,
    per_rack: usize,
    stop: CancellationToken,
) -> Result<(), etcd_client::Error> {
    let r = live(c, rack, index, per_rack, stop.clone()).await;
    if stop.is_cancelled() { Ok(()) } else { r }
}

async fn live(
    mut c: Client,
    rack: usize,
    index: usize,
    per_rack: usize,
    stop: CancellationToken,
) -> Result<(), etcd_client::Error> {
    let lease = c.lease_grant(LEASE_TTL, None).await?.id();
    let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
    let keep = stop.clone();
    tokio::spawn(async move {
        loop {
            if keeper.keep_alive().await.is_err() || acks.message().await.is_err() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(KEEPALIVE_EVERY) => {}
                () = keep.cancelled() => return,
            }
        }
    });
    let prefix = rack_prefix(rack);
    let leased = PutOptions::new().with_lease(lease);
    let name = format!("{prefix}host-{index:03}");
    c.put(name, "x".repeat(VALUE_BYTES), Some(leased.clone()))
        .await?;
    let read = GetOptions::new().with_prefix().with_serializable();
    let rack_now = c.get(prefix.as_str(), Some(read.clone())).await?;
    let mut seen: HashSet<Vec<u8>> = rack_now.kvs().iter().map(|kv| kv.key().to_vec()).collect();
    let from = rack_now.header().map_or(0, |h| h.revision()) + 1;
    let follow = WatchOptions::new().with_prefix().with_start_revision(from);
    let mut rack_events = c.watch(prefix.as_str(), Some(follow)).await?;
    let global_now = c.get("/sim/global/", Some(read)).await?;
    let mut global = global_now
        .kvs()
        .iter()
        .any(|kv| kv.key() == GLOBAL_KEY.as_bytes());
    let from = global_now.header().map_or(0, |h| h.revision()) + 1;
    let follow = WatchOptions::new().with_prefix().with_start_revision(from);
    let mut globals = c.watch("/sim/global/", Some(follow)).await?;
    let mut converged = false;
    loop {
        if !converged && global && seen.len() >= per_rack {
            converged = true;
            let key = format!("/sim/converged/{rack:03}-{index:03}");
            c.put(key, "true", Some(leased.clone())).await?;
        }
        tokio::select! {
            m = rack_events.message() => match m? {
                Some(resp) => {
                    for e in resp.events() {
                        if let Some(kv) = e.kv() {
                            seen.insert(kv.key().to_vec());
                        }
                    }
                }
                None => return Ok(()),
            },
            m = globals.message() => match m? {
                Some(resp) => global |= resp.events().iter().any(|e| e.kv().is_some()),
                None => return Ok(()),
            },
            () = stop.cancelled() => return Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
struct Figures {
    seconds: f64,
    store_rss_mb: f64,
    store_cpu: f64,
    bench_cpu: f64,
    uplink_median: u64,
    uplink_max: u64,
    watchers: f64,
    leases: f64,
    errors: usize,
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(-1.0)
}

async fn run(mode: Mode, racks: usize, per_rack: usize) -> Figures {
    let store = start_store().await;
    let store_pid = store.child.id().to_string();
    let mut admin = Client::connect([&store.endpoint], None).await.unwrap();
    admin.put(GLOBAL_KEY, "v1", None).await.unwrap();
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..racks {
        let (addr, down, up) = support::counting_proxy(&store.addr, stop.clone()).await;
        counters.push((down, up));
        let endpoint = match mode {
            Mode::Direct => format!("http://{addr}"),
            Mode::Fronts => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}", listener.local_addr().unwrap());
                let upstream = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy();
                let rack = clients.len();
                let config = FrontConfig {
                    shared_prefixes: vec![rack_prefix(rack).into_bytes(), b"/sim/global/".to_vec()],
                    credential: None,
                    users: Default::default(),
                    holds: Default::default(),
                };
                serve_on(FrontListener::Tcp(listener), upstream, config, stop.clone())
                    .await
                    .unwrap();
                url
            }
        };
        clients.push(Client::connect([endpoint], None).await.unwrap());
    }
    let total = racks * per_rack;
    let mut converged = admin
        .watch("/sim/converged/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let (bench_cpu_before, store_cpu_before) = (usage("self").1, usage(&store_pid).1);
    let started = Instant::now();
    let mut hosts = Vec::new();
    for (rack, client) in clients.iter().enumerate() {
        for index in 0..per_rack {
            let c = client.clone();
            hosts.push(tokio::spawn(host(c, rack, index, per_rack, stop.clone())));
        }
    }
    let mut done = 0;
    while done < total {
        let m = tokio::time::timeout_at((started + DEADLINE).into(), converged.message()).await;
        let resp = m
            .unwrap_or_else(|_| panic!("{done} of {total} converged after {DEADLINE:?}"))
            .unwrap()
            .unwrap();
        done += resp.events().len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let metrics = support::http_client::get(&store.endpoint, "/metrics")
        .await
        .body;
    let (rss, store_cpu) = usage(&store_pid);
    let bench_cpu = usage("self").1 - bench_cpu_before;
    let mut bytes: Vec<u64> = counters
        .iter()
        .map(|(d, u)| d.load(Ordering::Relaxed) + u.load(Ordering::Relaxed))
        .collect();
    bytes.sort();
    stop.cancel();
    let mut errors = 0;
    for h in hosts {
        if !matches!(h.await, Ok(Ok(()))) {
            errors += 1;
        }
    }
    Figures {
        seconds,
        store_rss_mb: rss as f64 / 1024.0,
        store_cpu: store_cpu - store_cpu_before,
        bench_cpu,
        uplink_median: bytes[bytes.len() / 2],
        uplink_max: *bytes.last().unwrap(),
        watchers: gauge(&metrics, "etcd_debugging_mvcc_watcher_total"),
        leases: gauge(&metrics, "arbor_store_leases"),
        errors,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sizes() -> Vec<(usize, usize)> {
    let spec = std::env::var("ARBOR_SCALE_SIZES").unwrap_or_else(|_| "100x100,50x100".into());
    spec.split(',')
        .map(|s| {
            let (r, h) = s.split_once('x').expect("sizes are RACKSxHOSTS");
            (r.trim().parse().unwrap(), h.trim().parse().unwrap())
        })
        .collect()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs: usize = std::env::var("ARBOR_SCALE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUNS);
    let mut rows = Vec::new();
    for (racks, per_rack) in sizes() {
        let mut all: Vec<(Mode, Vec<Figures>)> =
            vec![(Mode::Fronts, vec![]), (Mode::Direct, vec![])];
        for i in 0..runs {
            for (mode, figures) in &mut all {
                let f = runtime.block_on(run(*mode, racks, per_rack));
                eprintln!("{racks} x {per_rack}, {mode:?}, run {}: {f:?}", i + 1);
                figures.push(f);
            }
        }
        for (mode, figures) in all {
            let m = |get: fn(&Figures) -> f64| median(figures.iter().map(get).collect());
            rows.push(format!(
                "| {} | {racks} × {per_rack} | {:.1} s | {:.0} MB | {:.1} s | {:.1} s | {:.1} kB / {:.1} kB | {:.0} | {:.0} | {} |",
                mode.label(),
                m(|f| f.seconds),
                m(|f| f.store_rss_mb),
                m(|f| f.store_cpu),
                m(|f| f.bench_cpu),
                m(|f| f.uplink_median as f64) / 1000.0,
                m(|f| f.uplink_max as f64) / 1000.0,
                m(|f| f.watchers),
                m(|f| f.leases),
                figures.iter().map(|f| f.errors).sum::<usize>(),
            ));
        }
    }
    let body = format!(
        "### 10,000 simulated hosts behind 100 relay fronts\n\n\
         | mode | racks × hosts | all converged | store peak RSS | store CPU | fronts + hosts CPU | bytes per relay uplink (median / max) | watchers at the store | leases at the store | host errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{}\n\n\
         Targets (issue 14), on this 2-core machine: all converged in under 60 s, store RSS under \
         500 MB, bytes per relay uplink independent of the hosts under other relays (compare a \
         size's row with the one of half as many racks). Every host grants a lease and keeps it \
         alive, exports one {VALUE_BYTES}-byte key under its rack's prefix with it, reads its \
         rack's prefix and a global one serializably and watches both, and writes its converged \
         key once it has seen its whole rack and the global key; all hosts start at once. The \
         store is `arbor store` in memory, a process of its own (RSS is its peak, VmHWM; CPU is \
         user + system over the run). Fronts and hosts run in the bench process, the hosts of a \
         rack over one HTTP/2 connection to their front (direct: up the uplink), each with \
         streams of its own. Uplinks are loopback TCP proxies counting both directions. Medians \
         of {runs} runs per row, the modes alternating. Command: `cargo bench --bench scale`.\n\n",
        rows.join("\n")
    );
    print!("{body}");
    if std::env::var_os("ARBOR_SCALE_PRINT").is_none() {
        support::write_bench_section("scale", &body);
    }
}
