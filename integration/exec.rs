//! End-to-end tests of `arbor exec` against the lab's real SSH hosts: flat over a nodeset of
//! addresses, exit codes (the largest; 255 for a host not reached), through relays to exactly
//! the targeted leaves (no other host contacted: sshd logs unchanged, no marker, nothing left),
//! `-b` gathering under folded nodesets, ^C at depth 2 leaving nothing running; and
//! `arbor run --limit`, `--limit @failed` and `arbor exec -w @failed`.
//!
//! The lab is 2 relays × 3 leaves, with Debian's dropbear instead of OpenSSH on the relay r2
//! and the leaf l1-2, as in the tree tests.

#[macro_use]
mod support;

use support::harness::{Running, Test, TestResult, exited, fail, lines_of, wait_lines};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const HOSTS: [&str; 8] = ["r1", "r2", "l1-1", "l1-2", "l1-3", "l2-1", "l2-2", "l2-3"];

fn main() -> std::process::ExitCode {
    let tests: Vec<Test> = vec![
        (
            "flat_over_a_nodeset_of_addresses_with_stderr_apart_and_escapes_shown",
            flat_over_a_nodeset_of_addresses_with_stderr_apart_and_escapes_shown,
        ),
        (
            "the_largest_exit_code_wins_and_an_unreachable_host_is_255",
            the_largest_exit_code_wins_and_an_unreachable_host_is_255,
        ),
        (
            "through_relays_only_the_targeted_hosts_run_and_no_other_is_contacted",
            through_relays_only_the_targeted_hosts_run_and_no_other_is_contacted,
        ),
        (
            "gather_folds_identical_outputs_under_one_nodeset",
            gather_folds_identical_outputs_under_one_nodeset,
        ),
        (
            "large_output_through_relays_arrives_whole_and_in_order",
            large_output_through_relays_arrives_whole_and_in_order,
        ),
        (
            "ctrl_c_at_depth_2_leaves_nothing_running",
            ctrl_c_at_depth_2_leaves_nothing_running,
        ),
        (
            "bad_input_exits_2_before_contacting_anything",
            bad_input_exits_2_before_contacting_anything,
        ),
        (
            "exec_at_failed_reruns_only_the_hosts_whose_command_failed",
            exec_at_failed_reruns_only_the_hosts_whose_command_failed,
        ),
        (
            "run_limit_reaches_only_its_hosts_and_limit_failed_reruns_the_failures",
            run_limit_reaches_only_its_hosts_and_limit_failed_reruns_the_failures,
        ),
    ];
    support::harness::run_with_lab(
        "exec",
        &["--relays", "2", "--leaves", "3", "--dropbear", "r2,l1-2"],
        true,
        tests,
    )
}

/// A topology of the lab, without graphs (exec runs none), in a temp dir.
struct Topo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn topology() -> Topo {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("topology.yaml");
    std::fs::write(
        &path,
        "\
defaults:
  user: root
hosts:
- host: 10.199.0.11
  name: r1
  children:
  - host: 10.199.1.1[1-3]
    name: l1-[1-3]
- host: 10.199.0.12
  name: r2
  children:
  - host: 10.199.2.1[1-3]
    name: l2-[1-3]
",
    )
    .expect("write");
    Topo { _dir: dir, path }
}

/// `arbor exec ARGS` in the initiator's namespace, with the lab's HOME and no agent.
fn exec_command(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.init_ns(), ARBOR, "exec"])
        .args(args)
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info");
    c
}

fn exec(lab: &Lab, args: &[&str]) -> Output {
    exec_command(lab, args).output().expect("run arbor exec")
}

fn stdout_lines(out: &Output) -> Vec<String> {
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What arbor or a test command left on a host: arbor processes, wrappers, the test's
/// sleeps, working dirs.
fn leftovers(lab: &Lab, host: &str) -> String {
    lab.sh(
        host,
        "pgrep -a -x arbor || true; pgrep -a -f 'arbor-exec|sleep 6[0-9]' | grep -v pgrep || true; \
         ls -d /tmp/arbor.* 2>/dev/null || true",
    )
}

fn check_no_leftovers(lab: &Lab, hosts: &[&str], within: Duration) -> TestResult {
    let deadline = Instant::now() + within;
    for h in hosts {
        loop {
            let left = leftovers(lab, h);
            if left.trim().is_empty() {
                break;
            }
            check!(Instant::now() < deadline, "{h} has leftovers: {left}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Each host's sshd (or dropbear) log size: a host that was not contacted logs nothing. Taken
/// once the logs are quiet (a session that just ended may still log its disconnect).
fn sshd_logs(lab: &Lab) -> BTreeMap<&'static str, u64> {
    let mut last = log_sizes(lab);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(150));
        let now = log_sizes(lab);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

fn log_sizes(lab: &Lab) -> BTreeMap<&'static str, u64> {
    HOSTS
        .iter()
        .map(|h| {
            let key = format!("HOST_{}_SSHD_LOG", h.replace('-', "_"));
            let size = std::fs::metadata(lab.get(&key)).map_or(0, |m| m.len());
            (*h, size)
        })
        .collect()
}

/// The hosts whose sshd log grew since `before`.
fn contacted(lab: &Lab, before: &BTreeMap<&'static str, u64>) -> Vec<&'static str> {
    let after = log_sizes(lab);
    HOSTS
        .iter()
        .copied()
        .filter(|h| after.get(h) != before.get(h))
        .collect()
}

fn clean(lab: &Lab) {
    for h in HOSTS {
        lab.sh(h, "rm -rf /tmp/arbor.* /tmp/exec-marker");
    }
}

fn flat_over_a_nodeset_of_addresses_with_stderr_apart_and_escapes_shown(lab: &Lab) -> TestResult {
    clean(lab);
    for r in ["r1", "r2"] {
        lab.sh(r, "rm -rf /root/.cache/arbor");
    }
    let out = exec(
        lab,
        &[
            "-w",
            "10.199.0.[11-12]",
            "--",
            "hostname; echo to-stderr >&2; printf 'esc \\033[2J\\n'",
        ],
    );
    let log = exited(&out, 0)?;
    let lines = stdout_lines(&out);
    check!(
        lines
            == [
                "10.199.0.11 | esc ^[[2J",
                "10.199.0.11 | r1",
                "10.199.0.12 | esc ^[[2J",
                "10.199.0.12 | r2",
            ],
        "stdout lines {lines:?}\n{log}"
    );
    let err = stderr_text(&out);
    for want in ["10.199.0.11 ! to-stderr", "10.199.0.12 ! to-stderr"] {
        check!(err.contains(want), "no {want:?} on stderr\n{log}");
    }
    check!(
        !out.stdout.contains(&0x1b),
        "an escape reached stdout\n{log}"
    );
    // Names are resolved through ssh_config, as for `arbor run --remote`: an alias works,
    // and its name is the prefix.
    let dir = tempfile::tempdir().map_err(fail)?;
    let config = dir.path().join("ssh_config");
    std::fs::write(&config, "Host first\n  HostName 10.199.0.11\n  User root\n").map_err(fail)?;
    let out = exec(
        lab,
        &[
            "-F",
            config.to_str().unwrap_or_default(),
            "-w",
            "first",
            "--",
            "hostname",
        ],
    );
    let log = exited(&out, 0)?;
    let lines = stdout_lines(&out);
    check!(lines == ["first | r1"], "stdout lines {lines:?}\n{log}");
    // At depth 1 a plain exec is enough: nothing of arbor was copied or left.
    for r in ["r1", "r2"] {
        let cache = lab.sh(r, "ls -d /root/.cache/arbor 2>/dev/null || true");
        check!(cache.trim().is_empty(), "{r}: arbor was copied: {cache}");
    }
    check_no_leftovers(lab, &["r1", "r2"], Duration::from_secs(3))
}

fn the_largest_exit_code_wins_and_an_unreachable_host_is_255(lab: &Lab) -> TestResult {
    clean(lab);
    let out = exec(
        lab,
        &[
            "-w",
            "10.199.0.11,10.199.0.12",
            "--",
            "case $(hostname) in r2) exit 3;; *) exit 1;; esac",
        ],
    );
    let log = exited(&out, 3)?;
    let err = stderr_text(&out);
    check!(
        err.contains("arbor: 10.199.0.12: exited with exit code 3")
            && err.contains("arbor: 10.199.0.11: exited with exit code 1"),
        "exit codes not named per host\n{log}"
    );
    // 10.199.1.11 is a leaf: the initiator has no route to it.
    let out = exec(
        lab,
        &[
            "--connect-timeout",
            "3",
            "-w",
            "10.199.0.12,10.199.1.11",
            "--",
            "exit 3",
        ],
    );
    let log = exited(&out, 255)?;
    let err = stderr_text(&out);
    check!(
        err.contains("arbor: 10.199.1.11: FAILED: 10.199.1.11: connect:")
            && err.contains("arbor: 10.199.1.11: no exit code (255)"),
        "the unreachable host is not named\n{log}"
    );
    check!(
        err.contains("arbor: 10.199.0.12: exited with exit code 3"),
        "the reachable host's code is not reported\n{log}"
    );
    Ok(())
}

fn through_relays_only_the_targeted_hosts_run_and_no_other_is_contacted(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology();
    let topo_path = topo.path.to_str().unwrap_or_default();
    let command = "hostname > /tmp/exec-marker; echo ran on $(hostname)";
    let before = sshd_logs(lab);
    let out = exec(
        lab,
        &[
            "--topology",
            topo_path,
            "-w",
            "l1-2,l2-[1-2]",
            "--",
            command,
        ],
    );
    let log = exited(&out, 0)?;
    let lines = stdout_lines(&out);
    check!(
        lines
            == [
                "r1/l1-2 | ran on l1-2",
                "r2/l2-1 | ran on l2-1",
                "r2/l2-2 | ran on l2-2",
            ],
        "stdout lines {lines:?}\n{log}"
    );
    let touched = contacted(lab, &before);
    check!(
        touched == ["r1", "r2", "l1-2", "l2-1", "l2-2"],
        "hosts whose sshd saw a connection: {touched:?}\n{log}"
    );
    for h in HOSTS {
        let marker = lab.sh(h, "cat /tmp/exec-marker 2>/dev/null || true");
        let targeted = ["l1-2", "l2-1", "l2-2"].contains(&h);
        check!(
            marker.trim() == if targeted { h } else { "" },
            "{h}: marker {marker:?}\n{log}"
        );
    }
    check_no_leftovers(lab, &HOSTS, Duration::from_secs(5))?;

    // One leaf: the other relay is not contacted at all. A targeted relay runs it too.
    clean(lab);
    let before = sshd_logs(lab);
    let out = exec(
        lab,
        &["--topology", topo_path, "-w", "r1,l1-3", "--", command],
    );
    let log = exited(&out, 0)?;
    let lines = stdout_lines(&out);
    check!(
        lines == ["r1 | ran on r1", "r1/l1-3 | ran on l1-3"],
        "stdout lines {lines:?}\n{log}"
    );
    let touched = contacted(lab, &before);
    check!(
        touched == ["r1", "l1-3"],
        "hosts whose sshd saw a connection: {touched:?}\n{log}"
    );
    check_no_leftovers(lab, &HOSTS, Duration::from_secs(5))
}

fn gather_folds_identical_outputs_under_one_nodeset(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology();
    let out = exec(
        lab,
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "-b",
            "-w",
            "l[1-2]-[1-3]",
            "--",
            "echo same; [ $(hostname) = l2-3 ] && echo odd; echo err-$(hostname) >&2; true",
        ],
    );
    let log = exited(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = "\
---------------
l1-[1-3],l2-[1-2] (5)
---------------
same
---------------
l2-3 (1)
---------------
same
odd
";
    check!(
        stdout == want,
        "gathered stdout:\n{stdout}\nwant:\n{want}\n{log}"
    );
    // stderr stays live, per host.
    let err = stderr_text(&out);
    for (path, host) in [("r1/l1-2", "l1-2"), ("r2/l2-3", "l2-3")] {
        let want = format!("{path} ! err-{host}");
        check!(err.contains(&want), "no {want:?} on stderr\n{log}");
    }
    // Flat, the same folding of addresses.
    let out = exec(lab, &["-b", "-w", "10.199.0.[11-12]", "--", "echo hi"]);
    let log = exited(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    check!(
        stdout == "---------------\n10.199.0.[11-12] (2)\n---------------\nhi\n",
        "gathered stdout:\n{stdout}\n{log}"
    );
    Ok(())
}

/// 20 MB in 20 000 lines from each of three leaves under both relays (one of them dropbear):
/// every line arrives, in order, and the exit code with them. (A parent used to drop the
/// events of a child still being parsed when the child's channel ended, and a relay the
/// events still queued for its parent after 1 s.)
fn large_output_through_relays_arrives_whole_and_in_order(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology();
    let started = Instant::now();
    let out = exec(
        lab,
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "-w",
            "l1-[1-2],l2-1",
            "--",
            "awk 'BEGIN { s = sprintf(\"%1000s\", \"\"); gsub(/ /, \"x\", s); \
             for (i = 1; i <= 20000; i++) print i, s }'; echo err >&2; exit 4",
        ],
    );
    let took = started.elapsed();
    let log_tail = |out: &Output| {
        let err = stderr_text(out);
        err.lines().rev().take(10).collect::<Vec<_>>().join("\n")
    };
    check!(
        out.status.code() == Some(4),
        "exit {:?}\n{}",
        out.status.code(),
        log_tail(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for path in ["r1/l1-1", "r1/l1-2", "r2/l2-1"] {
        let prefix = format!("{path} | ");
        let numbers: Vec<u64> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| l.split_once(' ')?.0.parse().ok())
            .collect();
        check!(
            numbers.len() == 20_000 && numbers.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
            "{path}: {} lines, not 1..=20000 in order\n{}",
            numbers.len(),
            log_tail(&out)
        );
    }
    check!(took < Duration::from_secs(30), "took {took:?}");
    Ok(())
}

fn ctrl_c_at_depth_2_leaves_nothing_running(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology();
    let mut child = exec_command(
        lab,
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "-w",
            "l1-[1-2],l2-1",
            "--",
            "echo started; sleep 60; echo never",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .map_err(fail)?;
    let rx = lines_of(child.stdout.take().ok_or_else(|| fail("no stdout"))?);
    let stderr = child.stderr.take();
    let mut running = Running(child);
    let started: Vec<String> = ["r1/l1-1", "r1/l1-2", "r2/l2-1"]
        .iter()
        .map(|p| format!("{p} | started"))
        .collect();
    wait_lines(&rx, &started, Duration::from_secs(60))?;
    for h in ["l1-1", "l1-2", "l2-1"] {
        let n = lab.sh(h, "pgrep -c -x sleep || true");
        check!(
            n.trim() == "1",
            "{h}: {n:?} sleeps running during the command"
        );
    }
    for r in ["r1", "r2"] {
        let n = lab.sh(r, "pgrep -x -c arbor || true");
        check!(
            n.trim() == "1",
            "{r}: no arbor relay running during the command"
        );
    }
    let (code, took) = running.interrupt()?;
    let mut err = String::new();
    if let Some(mut stderr) = stderr {
        use std::io::Read;
        let _ = stderr.read_to_string(&mut err);
    }
    let rest: Vec<String> = rx.try_iter().collect();
    check!(
        code == Some(130),
        "exit {code:?} after ^C, want 130\n{}\n{err}",
        rest.join("\n")
    );
    check!(took < Duration::from_secs(5), "took {took:?} to stop");
    check!(
        !rest.iter().any(|l| l.contains("never")),
        "a command ran past ^C: {rest:?}"
    );
    check_no_leftovers(lab, &HOSTS, Duration::from_secs(3))
}

fn bad_input_exits_2_before_contacting_anything(lab: &Lab) -> TestResult {
    let topo = topology();
    let topo_path = topo.path.to_str().unwrap_or_default();
    let before = sshd_logs(lab);
    let cases: [(&[&str], &str); 5] = [
        (&["-w", "n[1-", "--", "true"], "bad nodeset"),
        (&["-w", "10.199.0.11", "--", " "], "no command to run"),
        (
            &["--topology", topo_path, "-w", "l1-1,l9-9", "--", "true"],
            "no host named \"l9-9\"",
        ),
        (
            &["-w", "10.199.0.11", "-x", "10.199.0.11", "--", "true"],
            "no host left",
        ),
        (&["-w", "10.199.0.11"], "required"),
    ];
    for (args, want) in cases {
        let out = exec(lab, args);
        let log = exited(&out, 2)?;
        check!(
            stderr_text(&out).contains(want),
            "{args:?}: no {want:?} in the error\n{log}"
        );
    }
    let touched = contacted(lab, &before);
    check!(touched.is_empty(), "bad input contacted {touched:?}");
    Ok(())
}

/// The failed-hosts lists of the lab's HOME, removed so that a test starts from none.
fn forget_failures(lab: &Lab) {
    let _ = std::fs::remove_dir_all(lab.home().join(".local/state/arbor/failed"));
}

fn exec_at_failed_reruns_only_the_hosts_whose_command_failed(lab: &Lab) -> TestResult {
    clean(lab);
    forget_failures(lab);
    let out = exec(lab, &["-w", "@failed", "--", "true"]);
    let log = exited(&out, 2)?;
    check!(
        stderr_text(&out).contains("no `arbor exec` has finished yet"),
        "no list yet, but no such error\n{log}"
    );
    let out = exec(
        lab,
        &["-w", "10.199.0.[11-12]", "--", "test $(hostname) = r1"],
    );
    exited(&out, 1)?;
    let before = sshd_logs(lab);
    let out = exec(lab, &["-w", "@failed", "--", "hostname"]);
    let log = exited(&out, 0)?;
    let lines = stdout_lines(&out);
    check!(
        lines == ["10.199.0.12 | r2"],
        "stdout lines {lines:?}\n{log}"
    );
    let touched = contacted(lab, &before);
    check!(touched == ["r2"], "contacted {touched:?}\n{log}");
    let out = exec(lab, &["-w", "@failed", "--", "hostname"]);
    let log = exited(&out, 0)?;
    check!(
        out.stdout.is_empty() && stderr_text(&out).contains("nothing to do"),
        "a rerun with nothing failed ran something\n{log}"
    );
    Ok(())
}

/// `arbor run ARGS --tmp-prefix` in the initiator's namespace, with the lab's HOME.
fn run(lab: &Lab, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run", "--tmp-prefix"])
        .args(args)
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info")
        .output()
        .expect("run arbor run")
}

fn run_limit_reaches_only_its_hosts_and_limit_failed_reruns_the_failures(lab: &Lab) -> TestResult {
    clean(lab);
    forget_failures(lab);
    // Each leaf runs one exec, which fails where /tmp/make-me-fail exists.
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("check.yaml");
    std::fs::write(
        &graph,
        "\
graph: check
resources:
  exec:
  - name: check
    cmd: \"test ! -e /tmp/make-me-fail && hostname > /tmp/exec-marker\"
    shell: /bin/sh
    timeout: 10
edges: []
",
    )
    .map_err(fail)?;
    let topo = dir.path().join("topology.yaml");
    std::fs::write(
        &topo,
        std::fs::read_to_string(topology().path)
            .map_err(fail)?
            .replace(
                "name: l1-[1-3]\n",
                "name: l1-[1-3]\n    graph: check.yaml\n",
            )
            .replace(
                "name: l2-[1-3]\n",
                "name: l2-[1-3]\n    graph: check.yaml\n",
            ),
    )
    .map_err(fail)?;
    let topo = topo.to_str().unwrap_or_default();
    for h in ["l1-2", "l2-3"] {
        lab.sh(h, "touch /tmp/make-me-fail");
    }
    let _undo = Undo(lab);
    let markers = |lab: &Lab| -> Vec<&'static str> {
        HOSTS
            .iter()
            .copied()
            .filter(|h| {
                !lab.sh(h, "cat /tmp/exec-marker 2>/dev/null || true")
                    .is_empty()
            })
            .collect()
    };
    let limited = |limit: &str| -> Result<(Output, Vec<&'static str>), libtest_mimic::Failed> {
        let before = sshd_logs(lab);
        let out = run(
            lab,
            &[
                "--topology",
                topo,
                "--converged-timeout",
                "1",
                "--limit",
                limit,
            ],
        );
        Ok((out, contacted(lab, &before)))
    };

    // Three leaves: the other leaves are not contacted; the failures are listed.
    let (out, touched) = limited("l1-[1-2],l2-3")?;
    let log = exited(&out, 1)?;
    check!(
        touched == ["r1", "r2", "l1-1", "l1-2", "l2-3"],
        "contacted {touched:?}\n{log}"
    );
    check!(
        markers(lab) == ["l1-1"],
        "markers on {:?}\n{log}",
        markers(lab)
    );
    check!(
        log.contains("arbor: failed: l1-2,l2-3; rerun them alone with --limit @failed"),
        "the failures are not named\n{log}"
    );
    let lists: Vec<PathBuf> = std::fs::read_dir(lab.home().join(".local/state/arbor/failed"))
        .map_err(fail)?
        .flatten()
        .map(|e| e.path())
        .collect();
    check!(lists.len() == 1, "failed lists: {lists:?}");
    let list = std::fs::read_to_string(&lists[0]).map_err(fail)?;
    check!(
        list.ends_with("\nl1-2\nl2-3\n") && list.contains(topo),
        "the list:\n{list}"
    );

    // One failure fixed: both are rerun, and only they (with their relays).
    lab.sh("l1-2", "rm /tmp/make-me-fail");
    let (out, touched) = limited("@failed")?;
    let log = exited(&out, 1)?;
    check!(
        touched == ["r1", "r2", "l1-2", "l2-3"],
        "contacted {touched:?}\n{log}"
    );
    check!(
        markers(lab) == ["l1-1", "l1-2"],
        "markers on {:?}\n{log}",
        markers(lab)
    );

    // The other fixed: only l2-3 and its relay; then nothing is left to rerun.
    lab.sh("l2-3", "rm /tmp/make-me-fail");
    let (out, touched) = limited("@failed")?;
    let log = exited(&out, 0)?;
    check!(touched == ["r2", "l2-3"], "contacted {touched:?}\n{log}");
    let (out, touched) = limited("@failed")?;
    let log = exited(&out, 0)?;
    check!(
        touched.is_empty() && log.contains("nothing to do"),
        "contacted {touched:?}\n{log}"
    );
    let (out, touched) = limited("l1-1,l9-9")?;
    let log = exited(&out, 2)?;
    check!(
        touched.is_empty() && log.contains("l9-9 is not a host of this run"),
        "contacted {touched:?}\n{log}"
    );
    check_no_leftovers(lab, &HOSTS, Duration::from_secs(5))
}

/// Removes the failure triggers however the test ends.
struct Undo<'a>(&'a Lab);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        for h in HOSTS {
            let _ = self.0.exec(h, "rm -f /tmp/make-me-fail");
        }
    }
}
