//! End-to-end tests of hierarchical runs: topology files, relays at depth 2 and 3, jump hosts,
//! teardown at every depth, a killed relay, and host keys learned at depth. The lab is 2 relays
//! × 3 leaves; the leaves are unreachable from the initiator, and the relays hold no private
//! key, so every leaf is reached through a relay signing with the initiator's key. Two hosts
//! run Debian's dropbear instead of OpenSSH: the relay r2 and the leaf l1-2 (under r1).

#[macro_use]
mod support;

use support::harness::{
    Running, Test, TestResult, exited, fail, lines_of, output_text as text, wait_lines,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const HOSTS: [&str; 8] = ["r1", "r2", "l1-1", "l1-2", "l1-3", "l2-1", "l2-2", "l2-3"];
const LEAVES: [&str; 6] = ["l1-1", "l1-2", "l1-3", "l2-1", "l2-2", "l2-3"];

fn main() -> std::process::ExitCode {
    let tests: Vec<Test> = vec![
        (
            "leaves_exchange_files_through_relays_with_one_binary_per_relay_on_the_link",
            leaves_exchange_files_through_relays_with_one_binary_per_relay_on_the_link,
        ),
        (
            "relays_with_keys_of_their_own_still_sign_for_their_leaves",
            relays_with_keys_of_their_own_still_sign_for_their_leaves,
        ),
        (
            "a_relay_under_a_relay_works_at_depth_3",
            a_relay_under_a_relay_works_at_depth_3,
        ),
        (
            "jump_hosts_give_the_same_result",
            jump_hosts_give_the_same_result,
        ),
        (
            "ctrl_c_tears_down_every_depth",
            ctrl_c_tears_down_every_depth,
        ),
        (
            "a_killed_relay_fails_its_subtree_and_the_rest_converges",
            a_killed_relay_fails_its_subtree_and_the_rest_converges,
        ),
        (
            "leaf_host_keys_are_learned_at_depth_only_under_accept_new",
            leaf_host_keys_are_learned_at_depth_only_under_accept_new,
        ),
        ("a_bad_topology_exits_2", a_bad_topology_exits_2),
        (
            "compress_sends_the_binary_gzipped_once_per_relay",
            compress_sends_the_binary_gzipped_once_per_relay,
        ),
        (
            "a_topology_without_graphs_ends_once_every_host_runs",
            a_topology_without_graphs_ends_once_every_host_runs,
        ),
    ];
    support::harness::run_with_lab(
        "tree",
        &["--relays", "2", "--leaves", "3", "--dropbear", "r2,l1-2"],
        true,
        tests,
    )
}

/// A topology file in a temp dir; `{leaf}` in `body` becomes the leaf graph's path.
struct Topo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn topology(body: &str) -> Topo {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = support::repo_root().join("examples/leaf.yaml");
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, body.replace("{leaf}", &leaf.to_string_lossy())).expect("write");
    Topo { _dir: dir, path }
}

const TWO_RELAYS: &str = "\
defaults:
  user: root
hosts:
- host: 10.199.0.11
  name: r1
  children:
  - host: 10.199.1.1[1-3]
    name: l1-[1-3]
    graph: {leaf}
- host: 10.199.0.12
  name: r2
  children:
  - host: 10.199.2.1[1-3]
    name: l2-[1-3]
    graph: {leaf}
";

fn arbor_command(lab: &Lab, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.init_ns(), ARBOR, "run"])
        .args(args)
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info");
    c
}

fn run(lab: &Lab, topo: &Topo, extra: &[&str]) -> Output {
    let mut args = vec![
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
    ];
    args.extend_from_slice(extra);
    arbor_command(lab, &lab.home(), &args)
        .output()
        .expect("run arbor")
}

fn clean(lab: &Lab, caches: bool) {
    for h in HOSTS {
        let extra = if caches { " /root/.cache/arbor" } else { "" };
        lab.sh(h, &format!("rm -rf /tmp/from-* /tmp/arbor.*{extra}"));
    }
}

fn leftovers(lab: &Lab, host: &str) -> String {
    lab.sh(
        host,
        "pgrep -x -a arbor || true; ls -d /tmp/arbor.* 2>/dev/null || true",
    )
}

fn check_no_leftovers(lab: &Lab, hosts: &[&str]) -> TestResult {
    // Leaves whose relay vanished notice their link is gone and clean up on their own.
    let deadline = Instant::now() + Duration::from_secs(8);
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

/// The collected files on a leaf: sorted "name: content" lines.
fn collected(lab: &Lab, leaf: &str) -> String {
    lab.sh(
        leaf,
        "for f in /tmp/from-*; do [ -f \"$f\" ] && printf '%s: %s' \"$(basename $f)\" \"$(cat $f)\" && echo; done | sort",
    )
}

/// The run exited 0 and every leaf holds all six leaves' files; returns the run's output.
fn exchanged(lab: &Lab, out: &Output) -> Result<String, libtest_mimic::Failed> {
    let log = exited(out, 0)?;
    let want = expect_collected(&LEAVES);
    for leaf in LEAVES {
        let got = collected(lab, leaf);
        check!(
            got == want,
            "{leaf} collected:\n{got}\nwant:\n{want}\n{log}"
        );
    }
    Ok(log)
}

fn expect_collected(names: &[&str]) -> String {
    let mut v: Vec<String> = names
        .iter()
        .map(|n| format!("from-{n}: hello from {n}\n"))
        .collect();
    v.sort();
    v.concat()
}

fn leaves_exchange_files_through_relays_with_one_binary_per_relay_on_the_link(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    for r in ["r1", "r2"] {
        let keys = lab.sh(r, "ls /root/.ssh/id_* 2>/dev/null || true");
        check!(keys.trim().is_empty(), "{r} holds a private key: {keys}");
    }
    let topo = topology(TWO_RELAYS);
    let binary = std::fs::metadata(ARBOR).map_err(fail)?.len();
    let (tx0, rx0) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let (tx1, rx1) = lab.init_link_bytes();
    let log = exchanged(lab, &out)?;
    // Events from depth 2 arrive tagged with their path.
    check!(
        log.contains("r1/l1-2 | "),
        "no output tagged r1/l1-2\n{log}"
    );
    let sent = tx1 - tx0;
    let limit = 2 * binary + 2 * binary / 10;
    check!(
        sent <= limit,
        "the initiator's link carried {sent} bytes out (and {} in); two relays x {binary}-byte \
         binary + 10% is {limit}",
        rx1 - rx0
    );
    check_no_leftovers(lab, &HOSTS)
}

fn relays_with_keys_of_their_own_still_sign_for_their_leaves(lab: &Lab) -> TestResult {
    clean(lab, false);
    // Each relay gets a key of its own that its leaves do not accept: the relay tries it
    // (after the forwarded agent), and the run must still reach every leaf.
    for r in ["r1", "r2"] {
        lab.sh(r, "ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519");
    }
    let topo = topology(TWO_RELAYS);
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    for r in ["r1", "r2"] {
        lab.sh(r, "rm -f /root/.ssh/id_ed25519 /root/.ssh/id_ed25519.pub");
    }
    exchanged(lab, &out)?;
    check_no_leftovers(lab, &HOSTS)
}

fn a_relay_under_a_relay_works_at_depth_3(lab: &Lab) -> TestResult {
    clean(lab, false);
    // r1 reaches itself again over its rack address: a relay at depth 2 whose leaves are at 3.
    let topo = topology(
        "\
defaults:
  user: root
hosts:
- host: 10.199.0.11
  name: r1
  children:
  - host: 10.199.1.1
    name: r1-inner
    children:
    - host: 10.199.1.1[1-3]
      name: l1-[1-3]
      graph: {leaf}
",
    );
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let log = exited(&out, 0)?;
    check!(
        log.contains("r1/r1-inner/l1-3 | "),
        "no output tagged with the depth-3 path\n{log}"
    );
    let want = expect_collected(&["l1-1", "l1-2", "l1-3"]);
    for leaf in ["l1-1", "l1-2", "l1-3"] {
        let got = collected(lab, leaf);
        check!(got == want, "{leaf} collected:\n{got}\n{log}");
    }
    check_no_leftovers(lab, &HOSTS)
}

fn jump_hosts_give_the_same_result(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(&TWO_RELAYS.replace("  name: r1\n", "  name: r1\n  mode: jump\n"));
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    exchanged(lab, &out)?;
    check_no_leftovers(lab, &HOSTS)
}

/// With --compress, the initiator's link carries two gzipped binaries, relays keep theirs to
/// pass on without recompressing, and every leaf ends up with the exact binary.
fn compress_sends_the_binary_gzipped_once_per_relay(lab: &Lab) -> TestResult {
    clean(lab, true);
    let topo = topology(TWO_RELAYS);
    let sha_of = |out: &[u8]| {
        String::from_utf8_lossy(out)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let local_sha = sha_of(
        &Command::new("sha256sum")
            .arg(ARBOR)
            .output()
            .map_err(fail)?
            .stdout,
    );
    // What gzip -6 makes of the binary: the reference for the bytes on the link.
    let gz = Command::new("sh")
        .args(["-c", &format!("gzip -6 -c '{ARBOR}' | wc -c")])
        .output()
        .map_err(fail)?;
    let gz: u64 = String::from_utf8_lossy(&gz.stdout)
        .trim()
        .parse()
        .map_err(fail)?;
    let binary = std::fs::metadata(ARBOR).map_err(fail)?.len();

    let (tx0, _) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "2", "--compress"]);
    let (tx1, _) = lab.init_link_bytes();
    let log = exchanged(lab, &out)?;
    for line in ["r1: copied arbor.gz", "r2/l2-3: copied arbor.gz"] {
        check!(log.contains(line), "no line {line:?}\n{log}");
    }
    let sent = tx1 - tx0;
    let limit = 2 * gz + 2 * gz * 15 / 100;
    check!(
        sent <= limit,
        "the initiator's link carried {sent} bytes out; two relays x {gz} bytes (gzip -6 of \
         the {binary}-byte binary) + 15% is {limit}"
    );
    for (host, keeps) in [("r1", true), ("r2", true), ("l1-1", false), ("l2-3", false)] {
        let dir = lab.sh(host, "ls -d /root/.cache/arbor/bin/*/ 2>/dev/null || true");
        let dir = dir.trim();
        check!(!dir.is_empty(), "{host}: no cache entry");
        let sha = sha_of(lab.sh(host, &format!("sha256sum {dir}arbor")).as_bytes());
        check!(
            sha == local_sha,
            "{host}: cached arbor has sha256 {sha}, want {local_sha}"
        );
        let kept = lab.sh(host, &format!("ls -a {dir}"));
        check!(
            kept.contains("arbor.gz") == keeps,
            "{host}: cache dir holds {kept:?} (a relay keeps arbor.gz, a leaf does not)"
        );
        check!(
            !kept.contains(".arbor.unpack"),
            "{host}: an unpacking temp file was left: {kept:?}"
        );
    }
    check_no_leftovers(lab, &HOSTS)
}

/// Hosts with nothing to apply are converged as soon as they run: --converged-timeout ends
/// the run (it used to wait for a convergence flag that no host would ever write).
fn a_topology_without_graphs_ends_once_every_host_runs(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(&TWO_RELAYS.replace("    graph: {leaf}\n", ""));
    let started = Instant::now();
    let mut command = arbor_command(
        lab,
        &lab.home(),
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "--tmp-prefix",
            "--converged-timeout",
            "1",
        ],
    );
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run arbor");
    let deadline = started + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        return Err(fail(format!(
            "still running after 60 s with --converged-timeout 1\n{}",
            text(&out)
        )));
    }
    let out = child.wait_with_output().expect("output");
    let log = exited(&out, 0)?;
    check!(
        log.contains("r2/l2-3: running"),
        "a leaf never reported running\n{log}"
    );
    check!(
        collected(lab, "l1-1").is_empty(),
        "a leaf without a graph wrote files"
    );
    check_no_leftovers(lab, &HOSTS)
}

fn start(lab: &Lab, topo: &Topo, extra: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut args = vec![
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
    ];
    args.extend_from_slice(extra);
    let mut child = arbor_command(lab, &lab.home(), &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start arbor");
    let rx = lines_of(child.stdout.take().expect("stdout"));
    (Running(child), rx)
}

fn ctrl_c_tears_down_every_depth(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    let (mut running, rx) = start(lab, &topo, &[]);
    let converged: Vec<String> = [
        "r1/l1-1", "r1/l1-2", "r1/l1-3", "r2/l2-1", "r2/l2-2", "r2/l2-3",
    ]
    .iter()
    .map(|p| format!("{p}: converged"))
    .collect();
    wait_lines(&rx, &converged, Duration::from_secs(90))?;
    for h in HOSTS {
        let n = lab.sh(h, "pgrep -x -c arbor || true");
        check!(n.trim() != "0", "{h}: no arbor running during the run");
    }
    let started = Instant::now();
    unsafe {
        libc::kill(running.0.id() as i32, libc::SIGINT);
    }
    let status = loop {
        if let Some(s) = running.0.try_wait().map_err(fail)? {
            break s;
        }
        check!(
            started.elapsed() < Duration::from_secs(15),
            "no exit after ^C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    check!(
        status.code() == Some(130),
        "exit {:?} after ^C",
        status.code()
    );
    check!(
        took < Duration::from_secs(6),
        "took {took:?} to stop the tree"
    );
    for h in HOSTS {
        let left = leftovers(lab, h);
        check!(
            left.trim().is_empty(),
            "{h} has leftovers right after exit: {left}"
        );
    }
    Ok(())
}

fn a_killed_relay_fails_its_subtree_and_the_rest_converges(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    let (mut running, rx) = start(lab, &topo, &["--converged-timeout", "3"]);
    wait_lines(
        &rx,
        &[
            "r1/l1-1: running".to_string(),
            "r1/l1-3: running".to_string(),
        ],
        Duration::from_secs(90),
    )?;
    // Kill r1's arbor outright: no shutdown path runs there.
    lab.sh("r1", "pkill -9 -x arbor");
    let mut lines = Vec::new();
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }
        if let Some(s) = running.0.try_wait().map_err(fail)? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        lines.push(line);
    }
    let log = lines.join("\n");
    check!(status.code() == Some(1), "exit {:?}\n{log}", status.code());
    check!(
        log.contains("r1: FAILED: r1: arbor ended unexpectedly (killed by SIGKILL"),
        "no clear cause for r1\n{log}"
    );
    let r1_row = log.lines().find(|l| l.starts_with("r1 ")).unwrap_or("");
    check!(
        r1_row.contains("failed"),
        "summary row for r1: {r1_row:?}\n{log}"
    );
    // r2's subtree carried on: each of its leaves has at least its own rack's files.
    for leaf in ["l2-1", "l2-2", "l2-3"] {
        let got = collected(lab, leaf);
        for n in ["l2-1", "l2-2", "l2-3"] {
            check!(
                got.contains(&format!("from-{n}: hello from {n}")),
                "{leaf} lacks {n}'s file:\n{got}\n{log}"
            );
        }
    }
    // r1's leaves lost their relay: they exit and clean up on their own.
    check_no_leftovers(lab, &HOSTS)
}

fn leaf_host_keys_are_learned_at_depth_only_under_accept_new(lab: &Lab) -> TestResult {
    clean(lab, false);
    // A HOME whose known_hosts knows the relays but no leaf.
    let home = tempfile::tempdir().map_err(fail)?;
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).map_err(fail)?;
    std::fs::copy(
        lab.home().join(".ssh/id_ed25519"),
        ssh_dir.join("id_ed25519"),
    )
    .map_err(fail)?;
    let kh = std::fs::read_to_string(lab.home().join(".ssh/known_hosts")).map_err(fail)?;
    let relays_only: Vec<&str> = kh
        .lines()
        .filter(|l| !l.starts_with("10.199.1.1") && !l.starts_with("10.199.2.1"))
        .collect();
    let known = ssh_dir.join("known_hosts");
    std::fs::write(&known, relays_only.join("\n") + "\n").map_err(fail)?;
    let topo = topology(TWO_RELAYS);
    let args = [
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
        "--converged-timeout",
        "2",
    ];

    let strict = arbor_command(lab, home.path(), &args)
        .output()
        .map_err(fail)?;
    let log = text(&strict);
    check!(
        strict.status.code() == Some(1),
        "strict: exit {:?}\n{log}",
        strict.status.code()
    );
    check!(
        log.contains("l1-1: host key: unknown host key"),
        "strict: no host key refusal for l1-1\n{log}"
    );
    let after = std::fs::read_to_string(&known).map_err(fail)?;
    check!(
        !after.contains("10.199.1.11 "),
        "strict recorded a key:\n{after}"
    );

    let mut accept: Vec<&str> = args.to_vec();
    accept.extend(["--host-key-policy", "accept-new"]);
    let learned = arbor_command(lab, home.path(), &accept)
        .output()
        .map_err(fail)?;
    let log = text(&learned);
    check!(
        learned.status.code() == Some(0),
        "accept-new: exit {:?}\n{log}",
        learned.status.code()
    );
    let after = std::fs::read_to_string(&known).map_err(fail)?;
    for leaf in LEAVES {
        let addr = lab.addr(leaf);
        let real = lab.sh(leaf, "cut -d' ' -f1,2 /run/arbor/ssh_host_ed25519_key.pub");
        check!(
            after.contains(&format!("{addr} {}", real.trim())),
            "known_hosts lacks {leaf}'s real key ({addr}):\n{after}"
        );
    }
    Ok(())
}

fn a_bad_topology_exits_2(lab: &Lab) -> TestResult {
    let topo = topology(&TWO_RELAYS.replace("  name: r2\n", "  name: r2\n  colour: blue\n"));
    let (tx0, _) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "1"]);
    let (tx1, _) = lab.init_link_bytes();
    let log = exited(&out, 2)?;
    check!(
        log.contains(&format!("{}:12:3:", topo.path.display())) && log.contains("colour"),
        "no file:line for the unknown key\n{log}"
    );
    check!(
        tx1 - tx0 < 1000,
        "{} bytes went out for a bad topology",
        tx1 - tx0
    );
    Ok(())
}
