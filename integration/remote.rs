//! End-to-end tests of `arbor run --remote` against the lab's real SSH hosts: the article's
//! example, caching, teardown, live edits, failures, and a real etcd as the store.
//!
//! The tests share the lab's hosts r1 (OpenSSH) and r2 (Debian's dropbear), so they run one at
//! a time; each starts by clearing what earlier tests left in /tmp.

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

fn main() -> std::process::ExitCode {
    let tests: Vec<Test> = vec![
        (
            "the_articles_example_exchanges_files_and_cleans_up",
            the_articles_example_exchanges_files_and_cleans_up,
        ),
        (
            "a_warm_cache_copies_no_binary",
            a_warm_cache_copies_no_binary,
        ),
        (
            "no_caching_leaves_nothing_of_arbor_behind",
            no_caching_leaves_nothing_of_arbor_behind,
        ),
        (
            "ctrl_c_stops_every_host_and_exits_130",
            ctrl_c_stops_every_host_and_exits_130,
        ),
        (
            "a_live_edit_reaches_the_host_during_the_run",
            a_live_edit_reaches_the_host_during_the_run,
        ),
        (
            "an_unreachable_host_fails_alone_with_exit_1",
            an_unreachable_host_fails_alone_with_exit_1,
        ),
        ("a_wrong_host_key_is_refused", a_wrong_host_key_is_refused),
        (
            "a_bad_graph_exits_2_before_connecting",
            a_bad_graph_exits_2_before_connecting,
        ),
        (
            "the_example_works_with_a_real_etcd_as_the_store",
            the_example_works_with_a_real_etcd_as_the_store,
        ),
        (
            "a_host_whose_arbor_fails_at_start_says_why",
            a_host_whose_arbor_fails_at_start_says_why,
        ),
    ];
    support::harness::run_with_lab(
        "remote",
        &["--relays", "2", "--leaves", "1", "--dropbear", "r2"],
        true,
        tests,
    )
}

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");

/// The article's two graphs, pointed at lab hosts, in a temp dir.
struct Graphs {
    dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
}

impl Graphs {
    /// `--remote A --remote B --tmp-prefix` followed by `extra`.
    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--remote".into(),
            self.a.to_string_lossy().into_owned(),
            "--remote".into(),
            self.b.to_string_lossy().into_owned(),
            "--tmp-prefix".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

/// Borrows a list of owned arguments as `&str`s.
fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn article_graphs(lab: &Lab, host_a: &str, host_b: &str) -> Graphs {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, src: &str, addr: &str| {
        let text = std::fs::read_to_string(support::repo_root().join(src)).expect("example");
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("remote:") {
                    format!("remote: ssh://root@{addr}:22")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write graph");
        path
    };
    let a = write("remote2a.yaml", "examples/remote2a.yaml", host_a);
    let b = write("remote2b.yaml", "examples/remote2b.yaml", host_b);
    let _ = lab;
    Graphs { dir, a, b }
}

/// `arbor run ARGS` in the initiator's namespace, with the lab's HOME.
fn arbor_command(lab: &Lab, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.init_ns(), ARBOR, "run"])
        .args(args)
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info");
    c
}

fn arbor(lab: &Lab, args: &[&str]) -> Output {
    arbor_command(lab, args).output().expect("run arbor")
}

fn clean_hosts(lab: &Lab) {
    for h in ["r1", "r2"] {
        lab.sh(h, "rm -rf /tmp/file* /tmp/arbor.* /root/.cache/arbor");
    }
}

/// What arbor left on a host: its processes and its working dirs.
fn leftovers(lab: &Lab, host: &str) -> String {
    lab.sh(
        host,
        "pgrep -x -a arbor || true; ls -d /tmp/arbor.* 2>/dev/null || true",
    )
}

fn read_far(lab: &Lab, host: &str, path: &str) -> String {
    lab.sh(host, &format!("cat {path} 2>/dev/null || echo MISSING"))
}

fn check_article_files(lab: &Lab) -> TestResult {
    let want_a = [
        ("/tmp/file1a", "i am file1a\n"),
        ("/tmp/file2a", "i am file2a, exported from host a\n"),
        ("/tmp/file2b", "i am file2b, exported from host b\n"),
    ];
    let want_b = [
        ("/tmp/file1b", "i am file1b\n"),
        ("/tmp/file2a", "i am file2a, exported from host a\n"),
        ("/tmp/file2b", "i am file2b, exported from host b\n"),
    ];
    for (host, want) in [("r1", &want_a), ("r2", &want_b)] {
        for (path, content) in want.iter() {
            let got = read_far(lab, host, path);
            check!(
                got == *content,
                "{host}:{path} holds {got:?}, want {content:?}"
            );
        }
    }
    check!(
        read_far(lab, "r1", "/tmp/file1b") == "MISSING\n",
        "b's local file reached a"
    );
    Ok(())
}

fn the_articles_example_exchanges_files_and_cleans_up(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    let out = arbor(lab, &strs(&g.args(&["--converged-timeout", "2"])));
    let log = exited(&out, 0)?;
    check_article_files(lab)?;
    for h in ["r1", "r2"] {
        let left = leftovers(lab, h);
        check!(left.trim().is_empty(), "{h} has leftovers: {left}\n{log}");
        let cache = lab.sh(h, "ls /root/.cache/arbor/bin/*/arbor | wc -l");
        check!(cache.trim() == "1", "{h}: binary not cached: {cache}");
    }
    // Live output, tagged with the host, and the summary.
    check!(
        log.contains(&format!("{} | ", lab.addr("r1"))),
        "no tagged output\n{log}"
    );
    check!(
        log.contains("HOST") && log.contains("RESULT"),
        "no summary\n{log}"
    );
    drop(g.dir);
    Ok(())
}

fn a_warm_cache_copies_no_binary(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    let args = [
        "--remote",
        &*g.a.to_string_lossy(),
        "--remote",
        &*g.b.to_string_lossy(),
        "--converged-timeout",
        "1",
        "--tmp-prefix",
        // Plain copies: the cold run's bytes are counted in whole binaries.
        "--compress",
        "never",
    ]
    .map(str::to_string);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let binary = std::fs::metadata(ARBOR).map_err(fail)?.len();

    let (tx0, _) = lab.init_link_bytes();
    let cold = arbor(lab, &args);
    let (tx1, _) = lab.init_link_bytes();
    check!(cold.status.success(), "cold run failed\n{}", text(&cold));
    let warm = arbor(lab, &args);
    let (tx2, _) = lab.init_link_bytes();
    check!(warm.status.success(), "warm run failed\n{}", text(&warm));

    let (cold_bytes, warm_bytes) = (tx1 - tx0, tx2 - tx1);
    check!(
        cold_bytes >= 2 * binary,
        "cold run sent {cold_bytes} bytes, less than two copies of the {binary}-byte binary"
    );
    check!(
        warm_bytes < binary / 10 && warm_bytes < 2_000_000,
        "warm run sent {warm_bytes} bytes (binary is {binary})\n{}",
        text(&warm)
    );
    let summary = String::from_utf8_lossy(&warm.stdout);
    let cached_rows = summary
        .lines()
        .filter(|l| l.starts_with("10.199.") && l.contains(" yes "))
        .count();
    check!(
        cached_rows == 2,
        "summary does not show both cached:\n{summary}"
    );
    Ok(())
}

fn no_caching_leaves_nothing_of_arbor_behind(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    let out = arbor(
        lab,
        &strs(&g.args(&["--converged-timeout", "1", "--no-caching"])),
    );
    check!(out.status.success(), "run failed\n{}", text(&out));
    check_article_files(lab)?;
    for h in ["r1", "r2"] {
        let left = lab.sh(
            h,
            "pgrep -x -a arbor; ls -d /tmp/arbor.* /root/.cache/arbor 2>/dev/null; \
             find / -xdev \\( -path /proc -o -path '*/target' \\) -prune -o \
               -name 'arbor*' -newer /tmp/file1* -print 2>/dev/null; true",
        );
        check!(left.trim().is_empty(), "{h} keeps: {left}");
    }
    Ok(())
}

/// Starts a continuous run; returns the child and a channel of its stdout lines.
fn start_continuous(lab: &Lab, graphs: &[&Path]) -> (Running, mpsc::Receiver<String>) {
    let mut args: Vec<String> = Vec::new();
    for g in graphs {
        args.push("--remote".into());
        args.push(g.to_string_lossy().into_owned());
    }
    args.push("--tmp-prefix".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = arbor_command(lab, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start arbor");
    let rx = lines_of(child.stdout.take().expect("stdout"));
    (Running(child), rx)
}

fn ctrl_c_stops_every_host_and_exits_130(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    let (mut child, rx) = start_continuous(lab, &[&g.a, &g.b]);
    let converged = [
        format!("{}: converged", lab.addr("r1")),
        format!("{}: converged", lab.addr("r2")),
    ];
    wait_lines(&rx, &converged, Duration::from_secs(60))?;
    // Both hosts run arbor now.
    for h in ["r1", "r2"] {
        let procs = lab.sh(h, "pgrep -x -c arbor || true");
        check!(procs.trim() != "0", "{h}: no arbor running during the run");
    }
    let (code, took) = child.interrupt()?;
    check!(code == Some(130), "exit code {code:?} after ^C");
    check!(took < Duration::from_secs(6), "took {took:?} to stop");
    for h in ["r1", "r2"] {
        let left = leftovers(lab, h);
        check!(left.trim().is_empty(), "{h} has leftovers after ^C: {left}");
    }
    Ok(())
}

fn a_live_edit_reaches_the_host_during_the_run(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    let (mut child, rx) = start_continuous(lab, &[&g.a, &g.b]);
    let r1 = lab.addr("r1");
    let result = (|| {
        wait_lines(&rx, &[format!("{r1}: converged")], Duration::from_secs(60))?;
        // Write the edit the way editors do: a new file renamed over the old one.
        let text = std::fs::read_to_string(&g.a).map_err(fail)?;
        let edited = text.replace("i am file1a", "i am file1a, edited live");
        let tmp = g.dir.path().join(".remote2a.yaml.swp");
        std::fs::write(&tmp, edited).map_err(fail)?;
        let saved = Instant::now();
        std::fs::rename(&tmp, &g.a).map_err(fail)?;
        loop {
            if read_far(lab, "r1", "/tmp/file1a") == "i am file1a, edited live\n" {
                break;
            }
            if saved.elapsed() > Duration::from_secs(10) {
                return Err(fail("the edit never reached r1"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        wait_lines(
            &rx,
            &[
                format!("{r1} | "),
                "copied over new graph definition".to_string(),
            ],
            Duration::from_secs(5),
        )?;
        Ok(())
    })();
    let stopped = child.interrupt();
    result?;
    stopped?;
    Ok(())
}

fn an_unreachable_host_fails_alone_with_exit_1(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), "10.199.0.99");
    let out = arbor(
        lab,
        &strs(&g.args(&["--converged-timeout", "1", "--connect-timeout", "2"])),
    );
    let log = exited(&out, 1)?;
    check!(
        log.contains("10.199.0.99: connect:"),
        "the error does not name the host and step\n{log}"
    );
    check!(
        read_far(lab, "r1", "/tmp/file1a") == "i am file1a\n",
        "the good host did not converge\n{log}"
    );
    check!(leftovers(lab, "r1").trim().is_empty(), "r1 has leftovers");
    Ok(())
}

fn a_wrong_host_key_is_refused(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    // A HOME whose known_hosts holds another key for r1.
    let home = tempfile::tempdir().map_err(fail)?;
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).map_err(fail)?;
    std::fs::copy(
        lab.home().join(".ssh/id_ed25519"),
        ssh_dir.join("id_ed25519"),
    )
    .map_err(fail)?;
    support::local(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            &home.path().join("other").to_string_lossy(),
        ],
    );
    let other = std::fs::read_to_string(home.path().join("other.pub")).map_err(fail)?;
    let kh = std::fs::read_to_string(lab.home().join(".ssh/known_hosts")).map_err(fail)?;
    let r1 = lab.addr("r1");
    let mut lines: Vec<String> = kh
        .lines()
        .filter(|l| {
            !l.split_whitespace()
                .next()
                .unwrap_or("")
                .split(',')
                .any(|h| h == r1)
        })
        .map(str::to_string)
        .collect();
    lines.push(format!("{r1} {}", other.trim()));
    std::fs::write(ssh_dir.join("known_hosts"), lines.join("\n") + "\n").map_err(fail)?;

    let out = arbor_command(
        lab,
        &[
            "--remote",
            &g.a.to_string_lossy(),
            "--remote",
            &g.b.to_string_lossy(),
            "--converged-timeout",
            "1",
            "--tmp-prefix",
        ],
    )
    .env("HOME", home.path())
    .output()
    .map_err(fail)?;
    let log = exited(&out, 1)?;
    check!(
        log.contains(&format!("{r1}: host key: HOST KEY CHANGED")),
        "no host key error for r1\n{log}"
    );
    check!(
        read_far(lab, "r1", "/tmp/file1a") == "MISSING\n",
        "arbor ran on a host whose key was wrong"
    );
    Ok(())
}

fn a_bad_graph_exits_2_before_connecting(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    let text_b = std::fs::read_to_string(&g.b).map_err(fail)?;
    std::fs::write(
        &g.b,
        text_b.replace("state: exists", "state: exists\n    colour: blue"),
    )
    .map_err(fail)?;
    let (tx0, _) = lab.init_link_bytes();
    let out = arbor(lab, &strs(&g.args(&[])));
    let (tx1, _) = lab.init_link_bytes();
    let log = exited(&out, 2)?;
    check!(
        log.contains(&format!("{}:", g.b.display())) && log.contains("colour"),
        "the error does not name the file and key\n{log}"
    );
    check!(
        tx1 - tx0 < 1000,
        "{} bytes went out for a bad graph",
        tx1 - tx0
    );
    check!(leftovers(lab, "r1").trim().is_empty(), "r1 was touched");
    Ok(())
}

fn the_example_works_with_a_real_etcd_as_the_store(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let data = tempfile::tempdir().map_err(fail)?;
    let port = 23791;
    let url = format!("http://127.0.0.1:{port}");
    let mut etcd = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), "/usr/bin/etcd"])
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", "http://127.0.0.1:23801"])
        .args(["--initial-advertise-peer-urls", "http://127.0.0.1:23801"])
        .args(["--initial-cluster", "default=http://127.0.0.1:23801"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(fail)?;
    let result = (|| {
        // etcd takes a moment to listen (longer on a busy machine): arbor's --seeds is not
        // what this test is about when the member is not up yet.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    lab.init_ns(),
                    "etcdctl",
                    "--endpoints",
                    &url,
                ])
                .args(["endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .map_err(fail)?;
            if health.status.success() {
                break;
            }
            check!(
                Instant::now() < deadline,
                "etcd at {url} is not healthy after 30 s: {}",
                String::from_utf8_lossy(&health.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
        let out = arbor(
            lab,
            &strs(&g.args(&["--converged-timeout", "2", "--seeds", &url])),
        );
        exited(&out, 0)?;
        check_article_files(lab)?;
        // The exports went through etcd: it saw the revisions.
        let status = Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.init_ns(),
                "etcdctl",
                "--endpoints",
                &url,
            ])
            .args(["endpoint", "status", "-w", "json"])
            .env("ETCDCTL_API", "3")
            .output()
            .map_err(fail)?;
        let status = String::from_utf8_lossy(&status.stdout);
        check!(status.contains("\"revision\""), "etcdctl: {status}");
        Ok(())
    })();
    let _ = etcd.kill();
    let _ = etcd.wait();
    result
}

/// An arbor that fails at start, on both servers: the failure names its exit code, the end of
/// its stderr and the end of its log, not only that it ended.
fn a_host_whose_arbor_fails_at_start_says_why(lab: &Lab) -> TestResult {
    clean_hosts(lab);
    let g = article_graphs(lab, &lab.addr("r1"), &lab.addr("r2"));
    // Staged in place of arbor (--binary for this platform): it reads the start of its control
    // link, leaves a line in its log and one on stderr, and exits 3.
    let fake = g.dir.path().join("failing-arbor");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         while [ $# -gt 0 ]; do [ \"$1\" = --workdir ] && w=$2; shift; done\n\
         head -c 1 >/dev/null\n\
         echo 'ERROR store: the tunnel refused the connection' >> \"$w/arbor.log\"\n\
         echo 'failing-arbor: giving up' >&2\n\
         exit 3\n",
    )
    .map_err(fail)?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(fail)?;
    let binary = format!("{}={}", std::env::consts::ARCH, fake.display());
    let out = arbor(
        lab,
        &strs(&g.args(&["--converged-timeout", "1", "--binary", &binary])),
    );
    let log = exited(&out, 1)?;
    for h in ["r1", "r2"] {
        let want = format!(
            "{addr}: FAILED: {addr}: arbor ended unexpectedly (exit code 3; \
             stderr: failing-arbor: giving up; \
             arbor.log: ERROR store: the tunnel refused the connection)",
            addr = lab.addr(h)
        );
        check!(log.contains(&want), "{h}: no line {want:?}\n{log}");
        let left = leftovers(lab, h);
        check!(left.trim().is_empty(), "{h} has leftovers: {left}");
    }
    Ok(())
}
