//! Benchmark: consecutive runs on hosts that run Debian's dropbear (dropbear-bin) instead of
//! OpenSSH. Run by hand (`cargo bench --bench dropbear`, as root); writes its table into
//! docs/benchmarks.md.
//!
//! The lab is one relay r1 and its leaf l1-1, both running dropbear. Four series of
//! `ARBOR_BENCH_RUNS` (default 50) consecutive runs each:
//! - flat: `arbor run --remote` of the article's first graph on r1;
//! - behind a relay: a topology with r1 as the relay and the leaf graph on l1-1;
//!
//! each cold (the hosts' cache emptied before every run) and then warm. A run succeeds when it
//! exits 0 and the host (or the leaf) holds the graph's file. dropbear before 2024.86 used to
//! lose the exec of arbor after the sftp copy (mkj/dropbear#173): "arbor ended unexpectedly".
//!
//! `ARBOR_BENCH_BINARY=PATH` runs another arbor build instead (an older one, to compare); the
//! table is then printed only, not written into docs/benchmarks.md.

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
/// A run that takes longer than this is killed and counted as failed.
const RUN_LIMIT: Duration = Duration::from_secs(120);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench dropbear` (as root)");
        return;
    }
    let runs: usize = std::env::var("ARBOR_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(50);
    let other = std::env::var("ARBOR_BENCH_BINARY").ok();
    let arbor = other.clone().unwrap_or_else(|| ARBOR.to_string());
    let version = support::local("sh", &["-c", "dropbear -V 2>&1 | head -n 1"]);
    let version = version.trim();

    let lab = Lab::up(
        "bdropbear",
        &["--relays", "1", "--leaves", "1", "--dropbear", "r1,l1-1"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let flat = support::article_graph(dir.path(), "a", &lab.addr("r1"))
        .to_string_lossy()
        .into_owned();
    let topology = relay_topology(dir.path(), &lab.addr("r1"), &lab.addr("l1-1"));
    let flat_args = vec!["--remote".to_string(), flat];
    let relay_args = vec!["--topology".to_string(), topology];

    let mut rows = String::new();
    let mut failures = String::new();
    for (case, args, hosts, proof) in [
        (
            "flat (`--remote`, r1)",
            &flat_args,
            &["r1"][..],
            ("r1", "/tmp/file1a"),
        ),
        (
            "behind a relay (r1 → l1-1)",
            &relay_args,
            &["r1", "l1-1"][..],
            ("l1-1", "/tmp/from-l1-1"),
        ),
    ] {
        for cold in [true, false] {
            let mut ok = 0;
            let mut times = Vec::new();
            for i in 0..runs {
                let caches = if cold { " /root/.cache/arbor" } else { "" };
                for h in hosts {
                    lab.sh(
                        h,
                        &format!("rm -rf /tmp/file* /tmp/from-* /tmp/arbor.*{caches}"),
                    );
                }
                let (took, result) = run_once(&lab, &arbor, args);
                times.push(took.as_secs_f64());
                let landed = lab.sh(proof.0, &format!("test -s {} && echo yes || true", proof.1));
                match result {
                    Ok(()) if landed.trim() == "yes" => ok += 1,
                    Ok(()) => {
                        failures += &format!("- {case}, run {}: exit 0 but no {}\n", i + 1, proof.1)
                    }
                    Err(why) => failures += &format!("- {case}, run {}: {why}\n", i + 1),
                }
            }
            times.sort_by(|a, b| a.total_cmp(b));
            let cache = if cold { "cold" } else { "warm" };
            let line = format!(
                "| {case} | {cache} | {ok} of {runs} | {:.2} s | {:.2} s |\n",
                times[times.len() / 2],
                times[times.len() - 1]
            );
            eprint!("{line}");
            rows += &line;
        }
    }
    lab.down();

    let build = match &other {
        Some(path) => format!("the arbor at `{path}`"),
        None => "the release build".to_string(),
    };
    let out = format!(
        "### Consecutive runs on dropbear hosts\n\n\
         | case | cache | runs that succeeded | median time | slowest |\n\
         |---|---|---|---|---|\n\
         {rows}\n\
         {version} (Debian's dropbear-bin) on r1 and l1-1 (`integration/lab up --relays 1 \
         --leaves 1 --dropbear r1,l1-1`); {runs} consecutive runs per row, in the order shown, \
         with {build}, `--converged-timeout 1 --tmp-prefix`, unshaped lab link. Cold: the \
         hosts' cache emptied before every run. A run succeeds when it exits 0 and the graph's \
         file is on the host. Command: `cargo bench --bench dropbear` (as root).\n\n{}",
        if failures.is_empty() {
            String::new()
        } else {
            format!("Failed runs:\n\n{failures}\n")
        }
    );
    println!("{out}");
    if other.is_none() {
        support::write_bench_section("dropbear", &out);
    }
}

/// One `arbor run ARGS --converged-timeout 1 --tmp-prefix` in the initiator's namespace: how
/// long it took, and the failure lines of its output if it did not exit 0.
fn run_once(lab: &Lab, arbor: &str, args: &[String]) -> (Duration, Result<(), String>) {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), arbor, "run"])
        .args(args)
        .args(["--converged-timeout", "1", "--tmp-prefix"])
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run arbor");
    while child.try_wait().expect("wait").is_none() && started.elapsed() < RUN_LIMIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("arbor output");
    if out.status.success() {
        return (took, Ok(()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = text.lines().filter(|l| l.contains("FAILED")).collect();
    let why = if failed.is_empty() {
        format!(
            "exit {:?} after {took:.1?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    } else {
        format!("exit {:?}: {}", out.status.code(), failed.join("; "))
    };
    (took, Err(why))
}

/// The article's first graph with `remote:` pointed at `addr`.
/// A topology: `relay` relays for `leaf`, which runs examples/leaf.yaml.
fn relay_topology(dir: &Path, relay: &str, leaf: &str) -> String {
    let graph = support::repo_root().join("examples/leaf.yaml");
    let text = format!(
        "defaults:\n  user: root\nhosts:\n- host: {relay}\n  name: r1\n  children:\n  \
         - host: {leaf}\n    name: l1-1\n    graph: {}\n",
        graph.display()
    );
    let path = dir.join("topology.yaml");
    std::fs::write(&path, text).expect("write topology");
    path.to_string_lossy().into_owned()
}
