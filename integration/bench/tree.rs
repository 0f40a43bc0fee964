//! Benchmark: hierarchical runs. Run by hand (`cargo bench --bench tree`, as root); writes its
//! tables into docs/benchmarks.md.
//!
//! - A 2 × 12 lab whose initiator link is shaped to 20 Mbit/s (inner links unshaped), cold
//!   cache: relay mode against jump mode on the same topology and graphs; time to converged,
//!   bytes on the initiator's link, and the floor (bytes that must cross / link rate). Then
//!   both modes again with --compress.
//! - A 4 × 24 lab (100 hosts) at full link speed: time to converged, SSH connections the
//!   initiator holds, and the peak memory of a relay with 24 children.
//! - The all-to-all exchange at 2 × 24 and 2 × 48 leaves, warm caches (section
//!   `tree-exchange`; `ARBOR_BENCH_ONLY=exchange` runs it alone): bytes per leaf on the
//!   initiator's link, the log lines the hosts send up, and the watches, watch streams and
//!   leases the initiator's store holds once every leaf is converged, read from the store's
//!   `/metrics` on its Unix socket.
//! - `--compress` compared (section `tree-compress`; `ARBOR_BENCH_ONLY=compress` runs it
//!   alone): on the 2 × 12 lab at 20 Mbit/s and unshaped, cold caches, the default (auto)
//!   against `--compress always` (the gzip copy the old `--compress` flag made, plus zstd for
//!   artifacts) and `--compress never`, with the binary alone and with an 8 MiB text artifact
//!   on every leaf; medians of 3, alternating run by run. `ARBOR_BENCH_BASELINE=PATH` (with
//!   `ARBOR_BENCH_BASELINE_LABEL`) measures another arbor build the same way, alternating
//!   run by run, for a before/after comparison.

#[path = "../support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const RUNS: usize = 3;
const TIMEOUT_S: f64 = 1.0;
const RATE_BITS: f64 = 20e6;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench tree` (as root)");
        return;
    }
    let only = std::env::var("ARBOR_BENCH_ONLY").unwrap_or_default();
    if only == "exchange" {
        return exchange_section();
    }
    if only == "compress" {
        return compress_section();
    }
    assert!(
        only.is_empty(),
        "ARBOR_BENCH_ONLY={only:?}: only `exchange` is known"
    );
    let binary = std::fs::metadata(ARBOR).expect("arbor binary").len();
    let mut out = String::new();
    {
        let lab = Lab::up(
            "btree",
            &["--relays", "2", "--leaves", "12", "--rate", "20mbit"],
        );
        out += &relay_vs_jump(&lab, binary);
        lab.down();
    }
    {
        let lab = Lab::up("bhundred", &["--relays", "4", "--leaves", "24"]);
        out += &hundred(&lab);
        lab.down();
    }
    println!("{out}");
    support::write_bench_section("tree", &out);
    exchange_section();
    compress_section();
}

/// An 8 MiB text artifact (log-like lines) in a graph for every leaf: its dir and the graph.
fn text_artifact_graph() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut data = Vec::new();
    let mut i = 0u64;
    while data.len() < 8 << 20 {
        data.extend_from_slice(
            format!(
                "{i:08} host{} GET /api/v1/items/{} 200 {} ms\n",
                i % 97,
                i.wrapping_mul(7919) % 100_003,
                i % 313
            )
            .as_bytes(),
        );
        i += 1;
    }
    std::fs::write(dir.path().join("data.bin"), &data).expect("write artifact");
    let graph = dir.path().join("artifact.yaml");
    std::fs::write(
        &graph,
        "graph: artifact\nresources:\n  file:\n  - name: /tmp/from-artifact.bin\n    \
         source: data.bin\n",
    )
    .expect("write graph");
    (dir, graph)
}

/// The same topology as `topology`, every leaf running `graph`.
fn topology_with(relays: usize, leaves: usize, graph: &Path) -> (tempfile::TempDir, PathBuf) {
    let (dir, path) = support::leaf_topology(relays, leaves, false);
    let leaf = support::repo_root().join("examples/leaf.yaml");
    let text = std::fs::read_to_string(&path)
        .expect("read topology")
        .replace(&leaf.display().to_string(), &graph.display().to_string());
    std::fs::write(&path, text).expect("write topology");
    (dir, path)
}

/// `--compress` never / always / auto (the default), on one lab, for two workloads.
fn compress_runs(lab: &Lab, label: &str) -> String {
    let (_d1, plain) = support::leaf_topology(2, 12, false);
    let (_d2, art_graph) = text_artifact_graph();
    let (_d3, with_art) = topology_with(2, 12, &art_graph);
    let modes: [(&str, &[&str]); 3] = [
        ("never", &["--compress", "never"]),
        ("always", &["--compress", "always"]),
        ("auto (default)", &[]),
    ];
    let mut rows = String::new();
    for (workload, topo) in [
        ("binary only", &plain),
        ("binary + 8 MiB text artifact", &with_art),
    ] {
        let mut times = vec![vec![]; modes.len()];
        let mut bytes = vec![vec![]; modes.len()];
        for _ in 0..RUNS {
            for (i, (_, extra)) in modes.iter().enumerate() {
                clean(lab);
                let (t, b, _, _) = run(lab, topo, extra);
                times[i].push(t);
                bytes[i].push(b as f64);
            }
        }
        let each: Vec<String> = times
            .iter()
            .map(|ts| {
                ts.iter()
                    .map(|t| format!("{t:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        let t: Vec<f64> = times.into_iter().map(median).collect();
        let b: Vec<f64> = bytes.into_iter().map(median).collect();
        for (i, (mode, _)) in modes.iter().enumerate() {
            rows += &format!(
                "| {label} | {workload} | {mode} | {:.1} s ({}) | {:.0} | {:.2} | {:.2} |\n",
                t[i],
                each[i],
                b[i],
                t[i] / t[0],
                t[i] / t[1],
            );
        }
    }
    rows
}

fn compress_section() {
    let mut rows = String::new();
    {
        let lab = Lab::up(
            "bcomp",
            &["--relays", "2", "--leaves", "12", "--rate", "20mbit"],
        );
        rows += &compress_runs(&lab, "20 Mbit/s");
        lab.down();
    }
    {
        let lab = Lab::up("bcompu", &["--relays", "2", "--leaves", "12"]);
        rows += &compress_runs(&lab, "unshaped");
        lab.down();
    }
    let out = format!(
        "### `--compress`: never, always, auto (the default)\n\n\
         2 relays × 12 leaves, cold caches (every host's cache emptied before each run, the \
         initiator's kept), release build. `always` is what `--compress` did before it took a \
         value (the binary gzipped), plus zstd for artifacts; `auto` compresses only below \
         12 MB/s, the rate the kernel measured over a probe of 512 KiB when its host is \
         staged (to a host without the binary, the head of its packed copy, which on a thin \
         link the copy does not send again), or over the binary's copy where no probe ran: a \
         relay whose own binary came plain or as xz copies it plain to a host without it \
         (docs/remote.md, \"Compression\"). Median of {RUNS} runs each, the three modes \
         alternating run by run. Bytes are the tx counter of the initiator's veth.\n\n\
         | link | workload | mode | time to converged (minus timeout), median (each run) | bytes out on the \
         initiator's link | time / never | time / always |\n|---|---|---|---|---|---|---|\n\
         {rows}\n\
         Targets: on 20 Mbit/s, auto's time / always ≤ 1; unshaped, auto's time / never ≤ 1.\n\n"
    );
    println!("{out}");
    support::write_bench_section("tree-compress", &out);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn clean(lab: &Lab) {
    for h in lab.get("LAB_HOSTS").split(',') {
        lab.sh(h, "rm -rf /root/.cache/arbor /tmp/from-* /tmp/arbor.*");
    }
}

/// One run; returns (seconds to converged exit minus the timeout, bytes out on the link,
/// stdout lines, peak count of the initiator's SSH connections).
fn run(lab: &Lab, topo: &PathBuf, extra: &[&str]) -> (f64, u64, Vec<String>, usize) {
    let (tx0, _) = lab.init_link_bytes();
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run", "--topology"])
        .arg(topo)
        .args([
            "--tmp-prefix",
            "--converged-timeout",
            &TIMEOUT_S.to_string(),
        ])
        .args(extra)
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start arbor");
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let mut peak_conns = 0;
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        let ss = Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.init_ns(),
                "ss",
                "-Htn",
                "state",
                "established",
                "( dport = :22 )",
            ])
            .output()
            .expect("ss");
        peak_conns = peak_conns.max(String::from_utf8_lossy(&ss.stdout).lines().count());
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = started.elapsed().as_secs_f64() - TIMEOUT_S;
    let status = child.wait().expect("wait");
    let lines = reader.join().expect("reader");
    let (tx1, _) = lab.init_link_bytes();
    assert!(status.success(), "run failed:\n{}", lines.join("\n"));
    (took, tx1 - tx0, lines, peak_conns)
}

fn relay_vs_jump(lab: &Lab, binary: u64) -> String {
    let (_d1, relay) = support::leaf_topology(2, 12, false);
    let (_d2, jump) = support::leaf_topology(2, 12, true);
    let (mut rt, mut rb, mut jt, mut jb) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        clean(lab);
        let (t, b, _, _) = run(lab, &relay, &[]);
        rt.push(t);
        rb.push(b as f64);
        clean(lab);
        let (t, b, _, _) = run(lab, &jump, &[]);
        jt.push(t);
        jb.push(b as f64);
    }
    let (rt, rb, jt, jb) = (median(rt), median(rb), median(jt), median(jb));
    // The same with --compress: the binary crosses gzipped.
    let (mut crt, mut crb, mut cjt, mut cjb) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        clean(lab);
        let (t, b, _, _) = run(lab, &relay, &["--compress"]);
        crt.push(t);
        crb.push(b as f64);
        clean(lab);
        let (t, b, _, _) = run(lab, &jump, &["--compress"]);
        cjt.push(t);
        cjb.push(b as f64);
    }
    let (crt, crb, cjt, cjb) = (median(crt), median(crb), median(cjt), median(cjb));
    let gz = gzipped_size();
    let gz_floor = 2.0 * gz as f64 * 8.0 / RATE_BITS;
    let floor = 2.0 * binary as f64 * 8.0 / RATE_BITS;
    format!(
        "### Relays vs jump hosts: 2 × 12 leaves, initiator link at 20 Mbit/s, cold cache\n\n\
         | mode | time to converged (minus timeout) | bytes out on the initiator's link |\n\
         |---|---|---|\n\
         | relay | {rt:.1} s | {rb:.0} ({:.2}× two binaries) |\n\
         | jump | {jt:.1} s | {jb:.0} ({:.1}× two binaries) |\n\n\
         | figure | value | target |\n|---|---|---|\n\
         | floor: 2 binaries ({binary} bytes each) / 20 Mbit/s | {floor:.1} s | |\n\
         | relay time / (1.25 × floor + 2 s) | {:.2} | ≤ 1 |\n\
         | jump time / relay time | {:.1}× | ≥ 8× |\n\
         | relay bytes / (2 × binary + 10%) | {:.2} | ≤ 1 |\n\n\
         Same topology and graphs (examples/leaf.yaml on every leaf) in both modes; in jump mode \
         the relays run nothing and the initiator stages all 24 leaves through them. Median of \
         {RUNS} runs each, alternating, every cache emptied before each run. Bytes are the tx \
         counter of the initiator's veth (all traffic, headers included).\n\n\
         #### The same with `--compress` (off by default)\n\n\
         | mode | time to converged (minus timeout) | bytes out on the initiator's link | \
         time vs uncompressed |\n|---|---|---|---|\n\
         | relay | {crt:.1} s | {crb:.0} ({:.2}× two gzipped binaries) | {:.2} |\n\
         | jump | {cjt:.1} s | {cjb:.0} ({:.1}× two gzipped binaries) | {:.2} |\n\n\
         | figure | value |\n|---|---|\n\
         | floor: 2 gzipped binaries ({gz} bytes each, gzip -6) / 20 Mbit/s | {gz_floor:.1} s |\n\
         | relay time / (1.25 × floor + 2 s) | {:.2} |\n\
         | jump time / relay time | {:.1}× |\n\n\
         Compressing shrinks what must cross, so both modes gain and the ratio between them \
         shrinks: the fixed costs (connect, start, converge) weigh more against a shorter \
         transfer (docs/topology.md).\n\n",
        rb / (2.0 * binary as f64),
        jb / (2.0 * binary as f64),
        rt / (1.25 * floor + 2.0),
        jt / rt,
        rb / (2.2 * binary as f64),
        crb / (2.0 * gz as f64),
        crt / rt,
        cjb / (2.0 * gz as f64),
        cjt / jt,
        crt / (1.25 * gz_floor + 2.0),
        cjt / crt,
    )
}

/// What `gzip -6` makes of the binary (arbor's own compressor gives within a few percent).
fn gzipped_size() -> u64 {
    let out = Command::new("sh")
        .args(["-c", &format!("gzip -6 -c '{ARBOR}' | wc -c")])
        .output()
        .expect("gzip");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("gzip size")
}

fn hundred(lab: &Lab) -> String {
    let (_d, topo) = support::leaf_topology(4, 24, false);
    // Each relay logs its own peak memory as it exits.
    let relay_peak = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.starts_with("r") && !l.contains('/') && l.contains("peak memory"))
            .filter_map(|l| l.split("peak memory ").nth(1))
            .filter_map(|v| v.trim_end_matches(" MB").parse::<f64>().ok())
            .fold(0.0, f64::max)
    };
    let (mut cold, mut warm, mut conns, mut cold_mb, mut warm_mb) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        clean(lab);
        let (t, _, lines, c) = run(lab, &topo, &[]);
        cold.push(t);
        conns.push(c as f64);
        cold_mb.push(relay_peak(&lines));
        let (t, _, lines, c) = run(lab, &topo, &[]);
        warm.push(t);
        conns.push(c as f64);
        warm_mb.push(relay_peak(&lines));
    }
    format!(
        "### 100 hosts: 4 relays × 24 leaves, full link speed\n\n\
         | metric | value | target |\n|---|---|---|\n\
         | time to converged, cold cache (minus timeout) | {:.1} s | |\n\
         | time to converged, warm cache (minus timeout) | {:.1} s | |\n\
         | SSH connections the initiator holds (peak, sampled every 250 ms) | {:.0} | 4 |\n\
         | peak RSS of a relay with 24 children, cold cache (it copies the binary 24 times) | {:.1} MB | < 60 MB |\n\
         | peak RSS of a relay with 24 children, warm cache | {:.1} MB | < 60 MB |\n\n\
         Every leaf exports a file and collects all 96. Medians of {RUNS} cold and {RUNS} warm \
         runs, alternating. The RSS figures are the largest relay's own VmHWM, which it logs as \
         it exits. Command: `cargo bench --bench tree` (both tables).\n",
        median(cold),
        median(warm),
        median(conns),
        median(cold_mb),
        median(warm_mb)
    )
}

/// The sizes of the exchange scenario: leaves per relay, 2 relays.
const EXCHANGE_LEAVES: [usize; 2] = [24, 48];

/// One warm run of the exchange, as seen from the initiator.
#[derive(Clone, Copy, Debug, Default)]
struct Exchange {
    tx: u64,
    rx: u64,
    /// Log lines the hosts sent up (`host | …` on stdout).
    host_lines: usize,
    /// Of those, lines about collected resources (per file or summaries).
    collect_lines: usize,
    /// The store's gauges once every leaf had said converged.
    watchers: f64,
    watch_streams: f64,
    leases: f64,
}

/// One run of `arbor` (the given build) on `topo`; the store is scraped once every one of
/// `leaves` leaf paths has said converged (with `--converged-timeout 1` the run then stays up
/// for a second before it tears down).
fn run_exchange(lab: &Lab, arbor: &Path, topo: &Path, leaves: usize) -> Exchange {
    let (tx0, rx0) = lab.init_link_bytes();
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.init_ns()])
        .arg(arbor)
        .args(["run", "--topology"])
        .arg(topo)
        .args([
            "--tmp-prefix",
            "--converged-timeout",
            &TIMEOUT_S.to_string(),
        ])
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("ARBOR_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start arbor");
    // `ip netns exec` execs arbor: the child's pid is arbor's.
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut state: std::collections::HashMap<String, bool> = Default::default();
    let mut lines = Vec::new();
    let mut at_converged = None;
    for line in lines_rx.iter() {
        // `<timestamp> r1/l1-2: converged`
        if let Some((host, what)) = line.get(25..).and_then(|l| l.split_once(": "))
            && host.contains('/')
            && !host.contains(' ')
        {
            match what {
                "converged" => {
                    state.insert(host.to_string(), true);
                }
                "changed" => {
                    state.insert(host.to_string(), false);
                }
                _ => {}
            }
        }
        if at_converged.is_none() && state.len() == leaves && state.values().all(|c| *c) {
            let metrics = support::store_socket(pid)
                .and_then(|s| support::scrape(&s))
                .expect("scrape the initiator's store while converged");
            at_converged = Some(metrics);
        }
        lines.push(line);
    }
    let status = child.wait().expect("wait");
    reader.join().expect("reader");
    let (tx1, rx1) = lab.init_link_bytes();
    assert!(status.success(), "run failed:\n{}", lines.join("\n"));
    let metrics = at_converged.expect("every leaf converged");
    let host_lines: Vec<&String> = lines.iter().filter(|l| l.contains(" | ")).collect();
    Exchange {
        tx: tx1 - tx0,
        rx: rx1 - rx0,
        host_lines: host_lines.len(),
        collect_lines: host_lines
            .iter()
            .filter(|l| l.contains(" file[@@") || l.contains(" collected "))
            .count(),
        watchers: support::gauge(&metrics, "etcd_debugging_mvcc_watcher_total"),
        watch_streams: support::gauge(&metrics, "etcd_debugging_mvcc_watch_stream_total"),
        leases: support::gauge(&metrics, "arbor_store_leases"),
    }
}

/// The exchange scenario, written as its own section of docs/benchmarks.md.
fn exchange_section() {
    let this = PathBuf::from(ARBOR);
    let mut builds = vec![(
        format!("this build ({})", support::git_describe()),
        this.clone(),
    )];
    if let Ok(path) = std::env::var("ARBOR_BENCH_BASELINE") {
        let label = std::env::var("ARBOR_BENCH_BASELINE_LABEL")
            .unwrap_or_else(|_| format!("baseline `{path}`"));
        builds.push((label, PathBuf::from(path)));
    }
    let mut table = String::from(
        "| build | leaves | link bytes per leaf (out + in) | out / in per leaf | log lines from \
         hosts (of which about collected files) | watchers | watch streams | leases |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut per_leaf: Vec<(String, usize, f64)> = Vec::new();
    for per_relay in EXCHANGE_LEAVES {
        let leaves = 2 * per_relay;
        let lab = Lab::up(
            "bexch",
            &["--relays", "2", "--leaves", &per_relay.to_string()],
        );
        let (_d, topo) = support::leaf_topology(2, per_relay, false);
        clean(&lab);
        // Warm every build's cache (and the lab) with one run each, not counted.
        for (_, arbor) in &builds {
            run_exchange(&lab, arbor, &topo, leaves);
        }
        let mut samples: Vec<Vec<Exchange>> = vec![Vec::new(); builds.len()];
        for run in 0..RUNS {
            for (i, (label, arbor)) in builds.iter().enumerate() {
                // Warm caches, but the collected files are written again on every run.
                for h in lab.get("LAB_LEAF_HOSTS").split(',') {
                    lab.sh(h, "rm -rf /tmp/from-* /tmp/arbor.*");
                }
                eprintln!("exchange 2 × {per_relay}, {label}: run {}/{RUNS}", run + 1);
                samples[i].push(run_exchange(&lab, arbor, &topo, leaves));
            }
        }
        for ((label, _), s) in builds.iter().zip(samples) {
            let m = |f: fn(&Exchange) -> f64| median(s.iter().map(f).collect());
            let (tx, rx) = (m(|e| e.tx as f64), m(|e| e.rx as f64));
            let total = m(|e| (e.tx + e.rx) as f64) / leaves as f64;
            per_leaf.push((label.clone(), per_relay, total));
            table += &format!(
                "| {label} | 2 × {per_relay} | {:.1} kB | {:.1} / {:.1} kB | {:.0} ({:.0}) | \
                 {:.0} | {:.0} | {:.0} |\n",
                total / 1e3,
                tx / leaves as f64 / 1e3,
                rx / leaves as f64 / 1e3,
                m(|e| e.host_lines as f64),
                m(|e| e.collect_lines as f64),
                m(|e| e.watchers),
                m(|e| e.watch_streams),
                m(|e| e.leases),
            );
        }
        lab.down();
    }
    let mut ratios = String::new();
    for (label, _) in &builds {
        let at = |n: usize| {
            per_leaf
                .iter()
                .find(|(l, p, _)| l == label && *p == n)
                .map_or(f64::NAN, |(_, _, b)| *b)
        };
        ratios += &format!(
            "| {label} | {:.2} | ≤ 1.15 |\n",
            at(EXCHANGE_LEAVES[1]) / at(EXCHANGE_LEAVES[0])
        );
    }
    let [small, big] = EXCHANGE_LEAVES;
    // The exact command, baseline included.
    let mut command = String::from("`ARBOR_BENCH_ONLY=exchange ");
    if let Some((label, path)) = builds.get(1) {
        command += &format!(
            "ARBOR_BENCH_BASELINE={} ARBOR_BENCH_BASELINE_LABEL='{label}' ",
            path.display()
        );
    }
    command += "cargo bench --bench tree`";
    let body = format!(
        "### All-to-all exchange: 2 × {small} and 2 × {big} leaves, warm caches, full link \
         speed\n\n\
         {table}\n\
         | build | link bytes per leaf at 2 × {big} / at 2 × {small} | target (issue 14) |\n\
         |---|---:|---|\n\
         {ratios}\n\
         Every leaf runs examples/leaf.yaml: it exports /tmp/from-<name> and collects every \
         leaf's. Each size has its own lab (2 relays, unshaped link); one uncounted run per \
         build fills the caches, then {RUNS} runs per build, alternating, each after removing \
         the leaves' collected files (so every run writes them all) but not the cache. Figures \
         are medians. Link bytes are the tx and rx counters of the initiator's veth over the \
         whole run (staging, store traffic, events, teardown; headers included), divided by \
         the leaves. Log lines are the `host | …` lines on the initiator's stdout at the \
         default level; those about collected files are per-file lines (`file[@@…]`) or \
         summaries (`collected …`). Watchers, watch streams and leases are the gauges \
         `etcd_debugging_mvcc_watcher_total`, `etcd_debugging_mvcc_watch_stream_total` and \
         `arbor_store_leases` of the initiator's embedded store, read from its `/metrics` \
         (on its Unix socket) as soon as every leaf has said converged, before the run ends. \
         Command: {command} (as root).\n"
    );
    println!("{body}");
    support::write_bench_section("tree-exchange", &body);
}
