//! Benchmark: arbor runs whose links stay on the SSH exec channel (`--transport ssh`) against
//! runs whose links move onto QUIC after the SSH bootstrap (`--transport auto`, the default;
//! docs/remote.md, "QUIC between nodes"). Run by hand (`cargo bench --bench links`, as root);
//! writes the `links` section of docs/benchmarks.md.
//!
//! - Time to converged: the 2 relays × 12 leaves lab of `cargo bench --bench tree` (relay
//!   mode, examples/leaf.yaml on every leaf), the initiator's link shaped to 20 Mbit/s, cold
//!   caches (every host's cache emptied before each run): wall time to the converged exit
//!   (minus `--converged-timeout 1`) and bytes on the initiator's veth. Each run's summary
//!   must say its links ran on the transport asked for (`links on QUIC: ...` naming every
//!   host for auto; no QUIC line for ssh), or the bench stops.
//! - Recovery after an outage: r1 with one leaf l1-1 (a graph writing a file),
//!   `--link-timeout 2 --reconnect-grace 60`, unshaped. Once `r1/l1-1: converged` shows, r1
//!   drops everything to and from the initiator's address for 20 s (nftables in r1's
//!   namespace, as integration/tree.rs's outage tests cut a link); then the rules go and the
//!   time until the initiator logs `r1: its link is back after` is the recovery time. Then ^C.
//!
//! Medians of 3 runs per transport, the transports alternating run by run; every run is
//! printed as it ends. arbor always runs as `ip netns exec <initiator's ns> arbor run ...`
//! (this process never enters a lab namespace), and each lab is torn down however the bench
//! ends.

#[path = "../support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::Lab;
use support::harness::{Running, lines_of_both};

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const RUNS: usize = 3;
const TIMEOUT_S: f64 = 1.0;
const OUTAGE: Duration = Duration::from_secs(20);
const RELAYS: usize = 2;
const LEAVES: usize = 12;

/// The transports compared: the label in the tables and the `--transport` value.
const TRANSPORTS: [(&str, &str); 2] = [("SSH", "ssh"), ("QUIC (auto)", "auto")];

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench links` (as root)");
        return;
    }
    let only = std::env::var("ARBOR_LINKS_ONLY").unwrap_or_default();
    assert!(
        ["", "converge", "outage"].contains(&only.as_str()),
        "ARBOR_LINKS_ONLY={only:?}: `converge` or `outage`"
    );
    let converge = if only.is_empty() || only == "converge" {
        let lab = Lab::up(
            "blinks",
            &[
                "--relays",
                &RELAYS.to_string(),
                "--leaves",
                &LEAVES.to_string(),
                "--rate",
                "20mbit",
            ],
        );
        let text = converge_section(&lab);
        lab.down();
        text
    } else {
        String::new()
    };
    let outage = if only.is_empty() || only == "outage" {
        let lab = Lab::up("blinko", &["--relays", "1", "--leaves", "1"]);
        let text = outage_section(&lab);
        lab.down();
        text
    } else {
        String::new()
    };
    let body = format!(
        "### Links on SSH against QUIC (`--transport ssh` / `--transport auto`)\n\n\
         Release build ({}), `--transport ssh` against `--transport auto` (the default: every \
         link moves onto QUIC once SSH has started the child), alternating run by run, \
         median of {RUNS} runs each; every run is listed.\n\n{converge}{outage}",
        support::git_describe()
    );
    println!("{body}");
    if only.is_empty() {
        support::write_bench_section("links", &body);
    } else {
        eprintln!("ARBOR_LINKS_ONLY={only}: docs/benchmarks.md left as it is");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn list(v: &[f64], f: impl Fn(f64) -> String) -> String {
    v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(", ")
}

/// Empties every host's cache and working dirs (and what examples/leaf.yaml writes).
fn clean(lab: &Lab) {
    for h in lab.get("LAB_HOSTS").split(',') {
        lab.sh(
            h,
            "rm -rf /root/.cache/arbor /tmp/from-* /tmp/arbor.* /tmp/links-*",
        );
    }
}

/// The hosts a `links on ...` line names.
fn links_line<'a>(lines: &'a [String], how: &str) -> Option<Vec<&'a str>> {
    let prefix = format!("links on {how}: ");
    lines.iter().find_map(|l| {
        let at = l.find(&prefix)?;
        Some(l[at + prefix.len()..].split(", ").map(str::trim).collect())
    })
}

/// Stops the bench unless the run's summary shows its links on `transport`: for auto, a
/// `links on QUIC:` line naming every host and no other `links on` line; for ssh, no QUIC
/// line (with `--transport ssh` QUIC is never tried, and the summary lists no transport).
fn check_transport(lines: &[String], transport: &str, hosts: &[String]) {
    let quic = links_line(lines, "QUIC");
    let other: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("links on ") && !l.contains("links on QUIC: "))
        .collect();
    match transport {
        "auto" => {
            let named = quic.unwrap_or_else(|| {
                panic!(
                    "--transport auto: the summary has no `links on QUIC:` line; the links did \
                     not run on QUIC:\n{}",
                    lines.join("\n")
                )
            });
            let missing: Vec<&String> = hosts
                .iter()
                .filter(|h| !named.contains(&h.as_str()))
                .collect();
            assert!(
                missing.is_empty() && other.is_empty(),
                "--transport auto: not every link ran on QUIC (missing {missing:?}; {other:?}):\n{}",
                lines.join("\n")
            );
        }
        _ => assert!(
            quic.is_none(),
            "--transport ssh: the summary says links ran on QUIC:\n{}",
            lines.join("\n")
        ),
    }
}

/// One converging run; returns (seconds to the converged exit minus the timeout, bytes out
/// and in on the initiator's link, stdout lines).
fn converge_run(lab: &Lab, topo: &Path, transport: &str) -> (f64, u64, u64, Vec<String>) {
    let (tx0, rx0) = lab.init_link_bytes();
    let started = Instant::now();
    let child = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run", "--topology"])
        .arg(topo)
        .args([
            "--tmp-prefix",
            "--converged-timeout",
            &TIMEOUT_S.to_string(),
            "--transport",
            transport,
        ])
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("ARBOR_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start arbor");
    // Stopped (^C, then killed) if this bench panics while it runs.
    let mut running = Running(child);
    let stdout = running.0.stdout.take().expect("stdout");
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = running.0.wait().expect("wait");
    let took = started.elapsed().as_secs_f64() - TIMEOUT_S;
    let (tx1, rx1) = lab.init_link_bytes();
    assert!(status.success(), "run failed:\n{}", lines.join("\n"));
    (took, tx1 - tx0, rx1 - rx0, lines)
}

fn converge_section(lab: &Lab) -> String {
    let (_d, topo) = support::leaf_topology(RELAYS, LEAVES, false);
    let mut hosts = Vec::new();
    for r in 1..=RELAYS {
        hosts.push(format!("r{r}"));
        for l in 1..=LEAVES {
            hosts.push(format!("r{r}/l{r}-{l}"));
        }
    }
    let n = TRANSPORTS.len();
    let (mut times, mut outs, mut ins) = (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
    for run in 1..=RUNS {
        for (i, (label, transport)) in TRANSPORTS.iter().enumerate() {
            clean(lab);
            let (t, tx, rx, lines) = converge_run(lab, &topo, transport);
            check_transport(&lines, transport, &hosts);
            eprintln!(
                "converge 2 × 12 at 20 Mbit/s, {label}, run {run}/{RUNS}: {t:.2} s, {tx} bytes \
                 out, {rx} bytes in"
            );
            times[i].push(t);
            outs[i].push(tx as f64);
            ins[i].push(rx as f64);
        }
    }
    let mut rows = String::new();
    let mut medians = Vec::new();
    for (i, (label, _)) in TRANSPORTS.iter().enumerate() {
        let (t, o, r) = (
            median(times[i].clone()),
            median(outs[i].clone()),
            median(ins[i].clone()),
        );
        medians.push((t, o, r));
        rows += &format!(
            "| {label} | {RUNS} | {t:.2} s | {:.2} MB | {:.2} MB | {} | {} |\n",
            o / 1e6,
            r / 1e6,
            list(&times[i], |x| format!("{x:.2} s")),
            list(&outs[i], |x| format!("{:.2} MB", x / 1e6)),
        );
    }
    let ((st, so, _), (qt, qo, _)) = (medians[0], medians[1]);
    format!(
        "#### Time to converged: {RELAYS} relays × {LEAVES} leaves, initiator's link at 20 \
         Mbit/s, cold caches\n\n\
         | transport | runs | median time to converged (minus timeout) | median bytes out on \
         the initiator's link | median bytes in | all runs (time) | all runs (bytes out) |\n\
         |---|---:|---:|---:|---:|---|---|\n{rows}\n\
         QUIC (auto) / SSH: time {:.2}×, bytes out {:.2}×. The lab and topology of `cargo bench \
         --bench tree` (relay mode, examples/leaf.yaml on every leaf, `--converged-timeout 1`, \
         the initiator's veth shaped with `integration/lab up --rate 20mbit`), every host's \
         cache emptied before each run. Bytes are the tx and rx counters of the initiator's \
         veth over the whole run (headers included). Every auto run's summary said \
         `links on QUIC:` for all {} links, no ssh run's did.\n\n",
        qt / st,
        qo / so,
        RELAYS * (LEAVES + 1),
    )
}

/// Drops everything between r1 and the initiator's address in r1's namespace (the method of
/// integration/tree.rs's `cut_link`); the rules go when this is dropped.
struct Cut<'a> {
    lab: &'a Lab,
}

impl<'a> Cut<'a> {
    fn new(lab: &'a Lab) -> Cut<'a> {
        let peer = lab.get("LAB_INIT_ADDR");
        let cut = Cut { lab };
        lab.sh(
            "r1",
            &format!(
                "nft add table inet links_cut && \
                 nft 'add chain inet links_cut in {{ type filter hook input priority 0; }}' && \
                 nft 'add chain inet links_cut out {{ type filter hook output priority 0; }}' && \
                 nft add rule inet links_cut in ip saddr {peer} drop && \
                 nft add rule inet links_cut out ip daddr {peer} drop"
            ),
        );
        cut
    }
}

impl Cut<'_> {
    /// Deletes the rules with `nft` run straight in r1's namespace (no `integration/lab exec`
    /// in between, which takes a good part of a second): returns when it started, the moment
    /// the recovery is measured from (the command itself takes milliseconds).
    fn mend(self) -> Instant {
        let started = Instant::now();
        let ns = self.lab.get("HOST_r1_NS").to_string();
        support::local(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "nft",
                "delete",
                "table",
                "inet",
                "links_cut",
            ],
        );
        std::mem::forget(self);
        started
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        self.lab
            .sh("r1", "nft delete table inet links_cut 2>/dev/null; true");
    }
}

/// The first line containing `needle` within `within`; every line seen goes into `seen`.
fn wait_for(
    rx: &mpsc::Receiver<String>,
    needle: &str,
    within: Duration,
    seen: &mut Vec<String>,
) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()?;
        seen.push(line.clone());
        if line.contains(needle) {
            return Some(line);
        }
    }
}

struct Outage {
    /// From the cut to `r1: reconnecting` on stdout.
    detected: f64,
    /// From the restore to `r1: its link is back after`.
    recovered: f64,
    /// How it came back: the rest of that line.
    how: String,
}

fn fail(transport: &str, what: &str, seen: &[String]) -> ! {
    panic!("--transport {transport}: {what}; saw:\n{}", seen.join("\n"))
}

/// One outage run with `transport`.
fn outage_run(lab: &Lab, topo: &Path, transport: &str) -> Outage {
    for h in ["r1", "l1-1"] {
        lab.sh(h, "rm -rf /tmp/arbor.* /tmp/links-*");
    }
    let child = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run", "--topology"])
        .arg(topo)
        .args([
            "--tmp-prefix",
            "--output",
            "text",
            "--link-timeout",
            "2",
            "--reconnect-grace",
            "60",
            "--transport",
            transport,
        ])
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("ARBOR_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start arbor");
    let mut running = Running(child);
    let out = running.0.stdout.take().expect("stdout");
    let err = running.0.stderr.take().expect("stderr");
    let rx = lines_of_both(out, err);
    let mut seen = Vec::new();
    if wait_for(
        &rx,
        "r1/l1-1: converged",
        Duration::from_secs(60),
        &mut seen,
    )
    .is_none()
    {
        fail(transport, "r1/l1-1 never converged within 60 s", &seen);
    }
    // Let the link settle on its transport (the move to QUIC follows the start).
    std::thread::sleep(Duration::from_secs(1));
    let cut = Cut::new(lab);
    let cut_at = Instant::now();
    if wait_for(&rx, "r1: reconnecting", Duration::from_secs(15), &mut seen).is_none() {
        fail(
            transport,
            "r1 never showed as reconnecting within 15 s of the cut",
            &seen,
        );
    }
    let detected = cut_at.elapsed().as_secs_f64();
    std::thread::sleep(OUTAGE.saturating_sub(cut_at.elapsed()));
    // Lines that came during the outage: none may say the link is back.
    seen.extend(rx.try_iter());
    if seen
        .iter()
        .any(|l| l.contains("r1: its link is back after"))
    {
        fail(transport, "r1's link came back during the outage", &seen);
    }
    let restored_at = cut.mend();
    let Some(back) = wait_for(
        &rx,
        "r1: its link is back after",
        Duration::from_secs(60),
        &mut seen,
    ) else {
        fail(
            transport,
            "r1's link never came back within 60 s of the restore",
            &seen,
        )
    };
    let recovered = restored_at.elapsed().as_secs_f64();
    let how = back
        .split_once("its link is back after")
        .map_or(String::new(), |(_, rest)| rest.trim().to_string());
    let (code, _) = running
        .interrupt()
        .unwrap_or_else(|e| fail(transport, &format!("^C: {e:?}"), &seen));
    // The rest of the output: the summary.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(line);
    }
    if code != Some(130) {
        fail(
            transport,
            &format!("exit {code:?} after ^C, want 130"),
            &seen,
        );
    }
    if seen.iter().any(|l| l.contains("FAILED")) {
        fail(transport, "a host failed", &seen);
    }
    let quic = links_line(&seen, "QUIC");
    let quic_r1 = quic.as_ref().is_some_and(|n| n.contains(&"r1"));
    let quic_lost = seen.iter().any(|l| l.contains("QUIC lost"));
    match transport {
        // The link ran on QUIC: the summary says so, or (the QUIC connection lost) that it
        // was re-attached over SSH, which the table then shows.
        "auto" if !quic_r1 && !quic_lost => fail(
            transport,
            "the summary does not say r1's link ran on QUIC",
            &seen,
        ),
        "ssh" if quic.is_some() => fail(transport, "the summary says links ran on QUIC", &seen),
        _ => {}
    }
    // Nothing left running for the next run.
    let deadline = Instant::now() + Duration::from_secs(45);
    for h in ["r1", "l1-1"] {
        while lab.sh(h, "pgrep -x -c arbor || true").trim() != "0" {
            assert!(
                Instant::now() < deadline,
                "{h}: arbor still runs 45 s after ^C"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Outage {
        detected,
        recovered,
        how: format!(
            "{how}{}",
            if quic_lost {
                " (summary: QUIC lost, re-attached over SSH)"
            } else if quic_r1 {
                " (summary: on QUIC)"
            } else {
                ""
            }
        ),
    }
}

fn outage_section(lab: &Lab) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = dir.path().join("write.yaml");
    std::fs::write(
        &graph,
        "graph: write\nresources:\n  file:\n  - name: written\n    path: \
         \"/tmp/links-{{hostname}}\"\n    content: \"written\\n\"\n    state: exists\nedges: []\n",
    )
    .expect("write graph");
    let topo = dir.path().join("topology.yaml");
    std::fs::write(
        &topo,
        format!(
            "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  \
             - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
            graph.display()
        ),
    )
    .expect("write topology");
    let n = TRANSPORTS.len();
    let (mut detected, mut recovered, mut hows) =
        (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
    for run in 1..=RUNS {
        for (i, (label, transport)) in TRANSPORTS.iter().enumerate() {
            let o = outage_run(lab, &topo, transport);
            eprintln!(
                "outage {} s, {label}, run {run}/{RUNS}: reconnecting {:.2} s after the cut, \
                 back {:.2} s after the restore: {}",
                OUTAGE.as_secs(),
                o.detected,
                o.recovered,
                o.how
            );
            detected[i].push(o.detected);
            recovered[i].push(o.recovered);
            hows[i].push(o.how);
        }
    }
    let mut rows = String::new();
    let mut how_rows = String::new();
    for (i, (label, _)) in TRANSPORTS.iter().enumerate() {
        rows += &format!(
            "| {label} | {RUNS} | {:.2} s | {} | {:.2} s |\n",
            median(recovered[i].clone()),
            list(&recovered[i], |x| format!("{x:.2} s")),
            median(detected[i].clone()),
        );
        for (run, how) in hows[i].iter().enumerate() {
            how_rows += &format!("| {label} | {} | {} |\n", run + 1, how.replace('|', "\\|"));
        }
    }
    format!(
        "#### Recovery after a {} s outage of the initiator's link\n\n\
         | transport | runs | median time from the restore to `r1: its link is back` | all \
         runs | median time from the cut to `r1: reconnecting` |\n\
         |---|---:|---:|---|---:|\n{rows}\n\
         | transport | run | the initiator's line after `its link is back after` |\n\
         |---|---:|---|\n{how_rows}\n\
         r1 with one leaf l1-1 (a graph writing a file), unshaped lab link, `--link-timeout 2 \
         --reconnect-grace 60 --output text`, warm caches. Once `r1/l1-1: converged` showed \
         (and one more second), r1's namespace dropped everything to and from the initiator's \
         address (nftables input and output rules, as integration/tree.rs's outage tests cut \
         a link) for {} s (no run's link came back during it); the time is from the start of \
         the `nft delete table` (run straight in r1's namespace, milliseconds) to the \
         initiator's log line `r1: its link is back after`, read as it came. Then ^C (exit \
         130, nothing failed).\n\n",
        OUTAGE.as_secs(),
        OUTAGE.as_secs(),
    )
}
