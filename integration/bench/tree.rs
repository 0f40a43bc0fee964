//! Benchmark: hierarchical runs. Run by hand (`cargo bench --bench tree`, as root); writes its
//! tables into docs/benchmarks.md.
//!
//! - A 2 × 12 lab whose initiator link is shaped to 20 Mbit/s (inner links unshaped), cold
//!   cache: relay mode against jump mode on the same topology and graphs; time to converged,
//!   bytes on the initiator's link, and the floor (bytes that must cross / link rate). Then
//!   both modes again with --compress.
//! - A 4 × 24 lab (100 hosts) at full link speed: time to converged, SSH connections the
//!   initiator holds, and the peak memory of a relay with 24 children.

#[path = "../support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
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
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn topology(relays: usize, leaves: usize, jump: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = support::repo_root().join("examples/leaf.yaml");
    let mut text = String::from("defaults:\n  user: root\nhosts:\n");
    for r in 1..=relays {
        text += &format!("- host: 10.199.0.{}\n  name: r{r}\n", 10 + r);
        if jump {
            text += "  mode: jump\n";
        }
        text += &format!(
            "  children:\n  - host: 10.199.{r}.[{}-{}]\n    name: l{r}-[1-{leaves}]\n    graph: {}\n",
            11,
            10 + leaves,
            leaf.display()
        );
    }
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, text).expect("write topology");
    (dir, path)
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
    let (_d1, relay) = topology(2, 12, false);
    let (_d2, jump) = topology(2, 12, true);
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
    let (_d, topo) = topology(4, 24, false);
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
