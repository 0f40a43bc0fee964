//! Benchmark: remote execution against the lab. Run by hand (`cargo bench --bench remote`, as
//! root); writes its tables into docs/benchmarks.md.
//!
//! - the article's two-host example: time to converged exit and bytes on the initiator's link,
//!   cold cache vs warm cache;
//! - live-edit latency: from the saved edit to the new content on the host, flat (depth 1)
//!   and on a leaf behind a relay (depth 2, a topology graph);
//! - fan-out: 24 hosts reached flat from a host that sees them all (the initiator runs inside
//!   the relay's network), warm cache: time to converged, peak memory of the initiator and of
//!   the remote processes.

#[path = "../support/mod.rs"]
mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const RUNS: usize = 3;
const TIMEOUT_S: u64 = 1;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench remote` (as root)");
        return;
    }
    let binary = std::fs::metadata(ARBOR).expect("arbor binary").len();
    let mut out = String::new();
    {
        let lab = Lab::up("bremote", &["--relays", "2", "--leaves", "1"]);
        out += &two_hosts(&lab, binary);
        out += &live_edit(&lab);
        out += &live_edit_at_depth_2(&lab);
        lab.down();
    }
    {
        let lab = Lab::up("bfan", &["--relays", "1", "--leaves", "24", "--relay-keys"]);
        out += &fan_out(&lab);
        lab.down();
    }
    println!("{out}");
    support::write_bench_section("remote", &out);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Graph files with `remote:` pointed at `addr`, in `dir`.
fn run_initiator(lab: &Lab, args: &[String]) -> (Duration, std::process::Output) {
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run"])
        .args(args)
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .expect("run arbor");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "arbor failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (took, out)
}

fn two_hosts(lab: &Lab, binary: u64) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = support::article_graph(dir.path(), "a", &lab.addr("r1"));
    let b = support::article_graph(dir.path(), "b", &lab.addr("r2"));
    let args: Vec<String> = [
        "--remote",
        &a.to_string_lossy(),
        "--remote",
        &b.to_string_lossy(),
        "--converged-timeout",
        &TIMEOUT_S.to_string(),
        "--tmp-prefix",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut cold_t, mut warm_t, mut cold_b, mut warm_b) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        for h in ["r1", "r2"] {
            lab.sh(h, "rm -rf /root/.cache/arbor /tmp/file*");
        }
        let (tx0, _) = lab.init_link_bytes();
        let (t, _) = run_initiator(lab, &args);
        let (tx1, _) = lab.init_link_bytes();
        let (w, _) = run_initiator(lab, &args);
        let (tx2, _) = lab.init_link_bytes();
        cold_t.push(t.as_secs_f64());
        warm_t.push(w.as_secs_f64());
        cold_b.push((tx1 - tx0) as f64 / 2.0);
        warm_b.push((tx2 - tx1) as f64 / 2.0);
    }
    let (ct, wt) = (median(cold_t), median(warm_t));
    format!(
        "### The article's example on two hosts\n\n\
         | cache | time to converged exit | minus --converged-timeout | bytes sent per host (link) |\n\
         |---|---|---|---|\n\
         | cold | {ct:.2} s | {:.2} s | {:.0} |\n\
         | warm | {wt:.2} s | {:.2} s | {:.0} |\n\n\
         Binary on the wire: {binary} bytes. Bytes are what crossed the initiator's link \
         (tx counter of its veth, all traffic) divided by the two hosts. Median of {RUNS} runs, \
         `--converged-timeout {TIMEOUT_S}`, release build, unshaped lab link.\n\n",
        ct - TIMEOUT_S as f64,
        median(cold_b),
        wt - TIMEOUT_S as f64,
        median(warm_b),
    )
}

fn live_edit(lab: &Lab) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = support::article_graph(dir.path(), "a", &lab.addr("r1"));
    let b = support::article_graph(dir.path(), "b", &lab.addr("r2"));
    let args = [
        OsStr::new("--remote"),
        a.as_os_str(),
        OsStr::new("--remote"),
        b.as_os_str(),
    ];
    let mut child = start_and_wait(lab, &args, "r1", "/tmp/file1a", "i am file1a\n");
    std::thread::sleep(Duration::from_secs(2));
    let original = std::fs::read_to_string(&a).expect("graph");
    let samples = edit_latencies(lab, "r1", "/tmp/file1a", &a, &|marker| {
        original.replace("i am file1a", &format!("i am file1a, {marker}"))
    });
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let _ = child.wait();
    let mut sorted = samples.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    format!(
        "### Live edit\n\n\
         | metric | value | target |\n|---|---|---|\n\
         | saved edit → new content on the host, median of {} | {:.0} ms | < 300 ms |\n\
         | fastest / slowest | {:.0} ms / {:.0} ms | |\n\n\
         Measured by a process busy-waiting on the host for the new content, started before \
         the edit (its own start-up is excluded; its wake-up adds at most a few ms).\n\n",
        samples.len(),
        median(samples),
        sorted[0],
        sorted[sorted.len() - 1]
    )
}

/// Saved edit → new content on l1-1, behind r1, for a topology graph (saves by rename).
fn live_edit_at_depth_2(lab: &Lab) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = dir.path().join("edit.yaml");
    let version = |content: &str| {
        format!(
            "graph: edit\nresources:\n  file:\n  - name: edited\n    path: /tmp/edited\n    content: \"{content}\\n\"\n    state: exists\nedges: []\n"
        )
    };
    std::fs::write(&graph, version("start")).expect("graph");
    let topo = dir.path().join("topology.yaml");
    std::fs::write(
        &topo,
        format!(
            "defaults:\n  user: root\nhosts:\n- host: {}\n  name: r1\n  children:\n  - host: {}\n    name: l1-1\n    graph: {}\n",
            lab.addr("r1"),
            lab.addr("l1-1"),
            graph.display()
        ),
    )
    .expect("topology");
    let args = [OsStr::new("--topology"), topo.as_os_str()];
    let mut child = start_and_wait(lab, &args, "l1-1", "/tmp/edited", "start\n");
    std::thread::sleep(Duration::from_secs(2));
    let samples = edit_latencies(lab, "l1-1", "/tmp/edited", &graph, &version);
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let _ = child.wait();
    let _ = lab.exec("l1-1", "rm -f /tmp/edited");
    let mut sorted = samples.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    format!(
        "### Live edit at depth 2\n\n\
         | metric | value | target |\n|---|---|---|\n\
         | saved edit (by rename) of a topology graph → new content on a leaf behind a relay, median of {} | {:.0} ms | < 300 ms |\n\
         | fastest / slowest | {:.0} ms / {:.0} ms | |\n\n\
         Measured as above, with the busy-waiting process on the leaf.\n\n",
        samples.len(),
        median(samples),
        sorted[0],
        sorted[sorted.len() - 1]
    )
}

/// Starts a continuous `arbor run --tmp-prefix ARGS` in the initiator's namespace and waits
/// until `file` on `host` holds `content` (the first graph is applied).
fn start_and_wait(
    lab: &Lab,
    args: &[&OsStr],
    host: &str,
    file: &str,
    content: &str,
) -> std::process::Child {
    let child = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run", "--tmp-prefix"])
        .args(args)
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start arbor");
    let deadline = Instant::now() + Duration::from_secs(60);
    while lab.sh(host, &format!("cat {file} 2>/dev/null || true")) != content {
        assert!(Instant::now() < deadline, "the run never applied the graph");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// Seven edits of `graph`, each saved by rename with `edit(marker)`'s text: milliseconds from
/// the save until `file` on `host` holds the marker, as seen by a process busy-waiting there
/// (started before the edit, so its own start-up is excluded).
fn edit_latencies(
    lab: &Lab,
    host: &str,
    file: &str,
    graph: &Path,
    edit: &dyn Fn(&str) -> String,
) -> Vec<f64> {
    let mut samples = Vec::new();
    for i in 0..7 {
        let marker = format!("edit number {i}");
        let mut watcher = Command::new(support::repo_root().join("integration/lab"))
            .args(["exec", "--name", &lab.name, host, "sh", "-c"])
            .arg(format!(
                "while ! grep -q '{marker}' {file} 2>/dev/null; do :; done"
            ))
            .spawn()
            .expect("watcher");
        std::thread::sleep(Duration::from_millis(300));
        let tmp = graph.with_file_name(".edit.swp");
        std::fs::write(&tmp, edit(&marker)).expect("write edit");
        let saved = Instant::now();
        std::fs::rename(&tmp, graph).expect("save edit");
        watcher.wait().expect("watcher");
        samples.push(saved.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(300));
    }
    samples
}

fn fan_out(lab: &Lab) -> String {
    // Graphs must be visible inside r1's mount namespace (its /tmp is private).
    let dir = support::repo_root().join("target/bench-fanout");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("graph dir");
    let mut args: Vec<String> = Vec::new();
    for j in 1..=24 {
        let addr = lab.addr(&format!("l1-{j}"));
        let graph = format!(
            "graph: fan\nresources:\n  file:\n  - name: \"@@from-{{{{hostname}}}}\"\n    path: \"/tmp/from-{{{{hostname}}}}\"\n    content: \"hello from {{{{hostname}}}}\\n\"\ncollect:\n- kind: file\n  pattern: \"/tmp/\"\nremote: ssh://root@{addr}:22\n"
        );
        let path = dir.join(format!("leaf{j}.yaml"));
        std::fs::write(&path, graph).expect("write graph");
        args.push("--remote".into());
        args.push(path.to_string_lossy().into_owned());
    }
    args.extend(
        [
            "--converged-timeout",
            &TIMEOUT_S.to_string(),
            "--tmp-prefix",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let run = || {
        let started = Instant::now();
        let out = Command::new(support::repo_root().join("integration/lab"))
            .args([
                "exec",
                "--name",
                &lab.name,
                "r1",
                "/usr/bin/time",
                "-f",
                "maxrss=%M",
                ARBOR,
                "run",
            ])
            .args(&args)
            .output()
            .expect("run arbor on r1");
        let took = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "fan-out run failed:\n{stdout}\n{stderr}"
        );
        let initiator_kib: f64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("maxrss="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        let remote_mb = stdout
            .lines()
            .filter_map(|l| l.split("peak memory ").nth(1))
            .filter_map(|v| v.trim_end_matches(" MB").parse::<f64>().ok())
            .fold(0.0, f64::max);
        let files = lab.sh("l1-24", "ls /tmp/from-* | wc -l");
        assert_eq!(files.trim(), "24", "a leaf did not collect every file");
        (took, initiator_kib / 1024.0, remote_mb)
    };
    let _cold = run();
    let (mut t, mut im, mut rm) = (vec![], vec![], vec![]);
    for _ in 0..RUNS {
        let (a, b, c) = run();
        t.push(a);
        im.push(b);
        rm.push(c);
    }
    let took = median(t);
    format!(
        "### Fan-out: 24 hosts, flat, warm cache\n\n\
         | metric | value | target |\n|---|---|---|\n\
         | time to converged exit, minus --converged-timeout | {:.2} s | < 3 s |\n\
         | peak RSS of the initiator | {:.1} MB | |\n\
         | peak RSS of a remote process (largest of 24) | {:.1} MB | < 30 MB |\n\n\
         A lab of 1 relay × 24 leaves; the initiator runs on the relay (`integration/lab exec \
         r1`), which sees every leaf, and reaches the 24 leaves flat. Each leaf exports a file \
         and collects all 24. Median of {RUNS} warm runs after one cold run; peak RSS from \
         `/usr/bin/time` (initiator) and from each remote process's own VmHWM report. \
         Command: `cargo bench --bench remote`.\n",
        took - TIMEOUT_S as f64,
        median(im),
        median(rm)
    )
}
