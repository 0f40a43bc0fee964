//! End-to-end tests of `arbor run --seeds` against a real etcd (Debian's etcd 3.4, started in
//! the lab's initiator namespace by each test) with authentication on and off, and the lab's
//! real SSH hosts: r1 relays for its leaf l1-1, r2 runs a graph of its own.
//!
//! With authentication on, each host must get an etcd user and role of its own for the run,
//! limited to its own keys (checked two ways: the roles' key ranges as root reads them, and a
//! misbehaving r1 whose attempts with the very credential arbor gave it are refused by etcd),
//! and none may remain once the run is over, however it ends.
//!
//! Against a cluster of three members, a run must outlive the death of the member its tunnels
//! use: every tunnel fails over to a living one, at depth 1 (r2) and through a relay (l1-1).

#[macro_use]
mod support;

use support::harness::{
    Running, Test, TestResult, exited, fail, lines_of_both, output_text as text, wait_lines,
};

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const HOSTS: [&str; 3] = ["r1", "l1-1", "r2"];
/// The hosts with a graph: each exports /tmp/from-<name> and collects every host's.
const LEAVES: [&str; 2] = ["l1-1", "r2"];
const ROOT_PASSWORD: &str = "etcd-root-secret";
const CLIENT_URL: &str = "http://127.0.0.1:23791";

fn main() -> std::process::ExitCode {
    let tests: Vec<Test> = vec![
        (
            "hosts_get_etcd_users_of_their_own_keys_and_none_outlive_a_ctrl_c",
            hosts_get_etcd_users_of_their_own_keys_and_none_outlive_a_ctrl_c,
        ),
        (
            "a_second_signal_during_teardown_still_deletes_the_runs_users_and_roles",
            a_second_signal_during_teardown_still_deletes_the_runs_users_and_roles,
        ),
        (
            "a_finished_run_deletes_its_etcd_users_and_roles",
            a_finished_run_deletes_its_etcd_users_and_roles,
        ),
        (
            "wrong_or_missing_operator_credentials_fail_naming_seeds",
            wrong_or_missing_operator_credentials_fail_naming_seeds,
        ),
        (
            "with_authentication_off_the_run_warns_once_that_hosts_are_not_isolated",
            with_authentication_off_the_run_warns_once_that_hosts_are_not_isolated,
        ),
        (
            "when_the_member_in_use_dies_tunnels_fail_over_and_exports_and_edits_live_on",
            when_the_member_in_use_dies_tunnels_fail_over_and_exports_and_edits_live_on,
        ),
    ];
    support::harness::run_with_lab("seeds", &["--relays", "2", "--leaves", "1"], true, tests)
}

/// A real etcd in the initiator's namespace, killed however the test ends.
struct Etcd {
    child: Child,
    ns: String,
    _data: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd; with `auth`, adds the user root (role root) and enables authentication.
    fn start(lab: &Lab, auth: bool) -> Result<Etcd, libtest_mimic::Failed> {
        let data = tempfile::tempdir().map_err(fail)?;
        let peer = "http://127.0.0.1:23801";
        let child = Command::new("ip")
            .args(["netns", "exec", lab.init_ns(), "/usr/bin/etcd"])
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", CLIENT_URL])
            .args(["--advertise-client-urls", CLIENT_URL])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            // Tokens unused for a second expire (300 s by default): hosts must authenticate
            // again on their own, as they would in a long run.
            .args(["--auth-token-ttl", "1"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data.path().join("etcd.log")).map_err(fail)?)
            .spawn()
            .map_err(fail)?;
        let etcd = Etcd {
            child,
            ns: lab.init_ns().to_string(),
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !etcd.ctl(None, &["endpoint", "health"]).status.success() {
            check!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        if auth {
            for args in [
                &["user", "add", &format!("root:{ROOT_PASSWORD}")][..],
                &["user", "grant-role", "root", "root"],
                &["auth", "enable"],
            ] {
                etcd.ok(None, args)?;
            }
        }
        Ok(etcd)
    }

    /// etcdctl against this etcd, as `user` ("name:password", passed in the environment).
    fn ctl(&self, user: Option<&str>, args: &[&str]) -> Output {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &self.ns,
            "etcdctl",
            "--endpoints",
            CLIENT_URL,
        ])
        .args(args)
        .env("ETCDCTL_API", "3")
        .env_remove("ETCDCTL_USER");
        if let Some(user) = user {
            c.env("ETCDCTL_USER", user);
        }
        c.output().expect("run etcdctl")
    }

    /// etcdctl that must succeed; its stdout.
    fn ok(&self, user: Option<&str>, args: &[&str]) -> Result<String, libtest_mimic::Failed> {
        let out = self.ctl(user, args);
        check!(out.status.success(), "etcdctl {args:?}\n{}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// etcdctl as root.
    fn root(&self, args: &[&str]) -> Result<String, libtest_mimic::Failed> {
        self.ok(Some(&format!("root:{ROOT_PASSWORD}")), args)
    }

    /// The etcd's users and roles, as root: (users, roles), one name a line.
    fn users_and_roles(&self) -> Result<(String, String), libtest_mimic::Failed> {
        Ok((self.root(&["user", "list"])?, self.root(&["role", "list"])?))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Undoes a change to a lab host however the test ends.
struct Undo<'a> {
    lab: &'a Lab,
    host: &'a str,
    shell: String,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec(self.host, &self.shell);
    }
}

struct Topo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// r1 (no graph of its own) relays for l1-1; r2 is reached directly; l1-1 and r2 run the
/// leaf graph (examples/leaf.yaml).
fn topology(lab: &Lab) -> Topo {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = support::repo_root().join("examples/leaf.yaml");
    let leaf = leaf.to_string_lossy();
    let body = format!(
        "defaults:\n  user: root\nhosts:\n\
         - host: {r1}\n  name: r1\n  children:\n  - host: {l11}\n    name: l1-1\n    graph: {leaf}\n\
         - host: {r2}\n  name: r2\n  graph: {leaf}\n",
        r1 = lab.addr("r1"),
        l11 = lab.addr("l1-1"),
        r2 = lab.addr("r2"),
    );
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, body).expect("write topology");
    Topo { _dir: dir, path }
}

/// `arbor run --topology T --tmp-prefix --seeds URL EXTRA` in the initiator's namespace.
fn arbor_command(lab: &Lab, topo: &Topo, extra: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.init_ns(), ARBOR, "run"])
        .args(["--topology", topo.path.to_str().unwrap_or_default()])
        .args(["--tmp-prefix", "--seeds", CLIENT_URL])
        .args(extra)
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("ARBOR_SEEDS_PASSWORD")
        .env("ARBOR_LOG", "arbor=info")
        .stdin(Stdio::null());
    c
}

fn clean(lab: &Lab) {
    for h in HOSTS {
        lab.sh(
            h,
            "rm -rf /tmp/from-* /tmp/arbor.* /tmp/escaped /tmp/evil /root/escaped",
        );
    }
}

fn leftovers(lab: &Lab, host: &str) -> String {
    lab.sh(
        host,
        "pgrep -x -a arbor || true; ls -d /tmp/arbor.* 2>/dev/null || true",
    )
}

fn check_no_leftovers(lab: &Lab) -> TestResult {
    for h in HOSTS {
        let left = leftovers(lab, h);
        check!(left.trim().is_empty(), "{h} has leftovers: {left}");
    }
    Ok(())
}

/// Every leaf collected both leaves' files.
fn check_exchanged(lab: &Lab, log: &str) -> TestResult {
    let want = "from-l1-1: hello from l1-1\nfrom-r2: hello from r2\n";
    for leaf in LEAVES {
        let got = lab.sh(
            leaf,
            "for f in /tmp/from-*; do [ -f \"$f\" ] && printf '%s: %s' \"$(basename $f)\" \"$(cat $f)\" && echo; done | sort",
        );
        check!(
            got == want,
            "{leaf} collected:\n{got}\nwant:\n{want}\n{log}"
        );
    }
    Ok(())
}

/// Only root is left in the etcd: no arbor user or role (etcd 3.4 does not list the built-in
/// role root).
fn check_only_root(etcd: &Etcd, log: &str) -> TestResult {
    let (users, roles) = etcd.users_and_roles()?;
    check!(
        users.trim() == "root" && roles.trim().is_empty(),
        "users:\n{users}roles:\n{roles}are left\n{log}"
    );
    Ok(())
}

/// Starts the run; stdout and stderr lines come out of one channel.
fn start(lab: &Lab, topo: &Topo, extra: &[&str]) -> (Running, mpsc::Receiver<String>) {
    let mut child = arbor_command(lab, topo, extra)
        .env("ARBOR_SEEDS_PASSWORD", ROOT_PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start arbor");
    let merged = lines_of_both(
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    (Running(child), merged)
}

fn hosts_get_etcd_users_of_their_own_keys_and_none_outlive_a_ctrl_c(lab: &Lab) -> TestResult {
    clean(lab);
    let etcd = Etcd::start(lab, true)?;
    // r1 runs a test build that tries, with its own credential, what it must not do
    // (ARBOR_TEST_MISBEHAVE, honoured by debug builds only).
    lab.sh(
        "r1",
        "mkdir -p /root/.ssh && echo ARBOR_TEST_MISBEHAVE=forge > /root/.ssh/environment",
    );
    let _undo = Undo {
        lab,
        host: "r1",
        shell: "rm -f /root/.ssh/environment".into(),
    };
    let topo = topology(lab);
    let (mut running, rx) = start(lab, &topo, &["--seeds-user", "root"]);
    let converged = ["r1/l1-1: converged", "r2: converged"].map(String::from);
    let mut seen = wait_lines(&rx, &converged, Duration::from_secs(90))?;
    check_exchanged(lab, &seen.join("\n"))?;

    // During the run: one user and one role per host, named for the run, each user with only
    // its own role, each role with exactly the host's keys.
    let (users, roles) = etcd.users_and_roles()?;
    let arbor_users: Vec<&str> = users.lines().filter(|u| *u != "root").collect();
    check!(arbor_users.len() == 3, "users during the run:\n{users}");
    let run = arbor_users[0]
        .strip_prefix("arbor.")
        .and_then(|rest| rest.split('.').next())
        .unwrap_or_default()
        .to_string();
    check!(run.len() == 16, "no run id in user {}", arbor_users[0]);
    let mut want_names: Vec<String> = HOSTS.iter().map(|h| format!("arbor.{run}.{h}")).collect();
    want_names.sort();
    let sorted = |text: &str| {
        let mut v: Vec<String> = text.lines().map(str::to_string).collect();
        v.sort();
        v
    };
    check!(sorted(&roles) == want_names, "roles:\n{roles}");
    want_names.push("root".into());
    want_names.sort();
    check!(sorted(&users) == want_names, "users:\n{users}");
    for host in HOSTS {
        let name = format!("arbor.{run}.{host}");
        let user = etcd.root(&["user", "get", &name])?;
        check!(
            user == format!("User: {name}\nRoles: {name}\n"),
            "user {name}:\n{user}"
        );
        let role = etcd.root(&["role", "get", &name])?;
        let base = format!("/arbor/runs/{run}");
        // A relay may also write its subtree's exports and converged flags (its store front
        // writes them on its shared lease): r1's role names l1-1's too.
        let subtree: &[&str] = if host == "r1" {
            &["l1-1", "r1"]
        } else {
            &[host]
        };
        let converged: String = subtree
            .iter()
            .map(|h| format!("\t{base}/converged/{h}\n"))
            .collect();
        let exports: String = subtree
            .iter()
            .map(|h| {
                format!(
                    "\t[{base}/exports/{h}/, {base}/exports/{h}0) (prefix {base}/exports/{h}/)\n"
                )
            })
            .collect();
        let want = format!(
            "Role {name}\nKV Read:\n\
             \t[/arbor/kv/, /arbor/kv0) (prefix /arbor/kv/)\n\
             \t[/arbor/kv/{host}/, /arbor/kv/{host}0) (prefix /arbor/kv/{host}/)\n\
             {converged}\
             \t[{base}/exports/, {base}/exports0) (prefix {base}/exports/)\n\
             {exports}\
             KV Write:\n\
             \t[/arbor/kv/{host}/, /arbor/kv/{host}0) (prefix /arbor/kv/{host}/)\n\
             {converged}\
             {exports}"
        );
        check!(role == want, "role {name}:\n{role}\nwant:\n{want}");
    }

    // r1's own credential, used by its own arbor against the real etcd: nothing beyond its
    // keys. (etcd lets any authenticated user compact the history, so "compacting" is not
    // among these: docs/security.md.)
    let attacks = [
        "publishing as another host",
        "reading the store without a credential",
        "writing another host's export",
        "writing another host's converged flag",
        "deleting every key",
    ];
    let refused: Vec<String> = attacks
        .iter()
        .map(|a| format!("misbehaving: {a}: refused"))
        .collect();
    let missing: Vec<String> = refused
        .iter()
        .filter(|r| !seen.iter().any(|l| l.contains(r.as_str())))
        .cloned()
        .collect();
    seen.extend(wait_lines(&rx, &missing, Duration::from_secs(20))?);
    for attack in attacks {
        check!(
            !seen
                .iter()
                .any(|l| l.contains(&format!("misbehaving: {attack}: ALLOWED"))),
            "etcd allowed r1 {attack}\n{}",
            seen.join("\n")
        );
    }

    let (code, _) = running.interrupt()?;
    let rest: Vec<String> = rx.try_iter().collect();
    let log = format!("{}\n{}", seen.join("\n"), rest.join("\n"));
    check!(code == Some(130), "exit {code:?} after ^C\n{log}");
    check_only_root(&etcd, &log)?;
    check_no_leftovers(lab)?;
    Ok(())
}

fn a_second_signal_during_teardown_still_deletes_the_runs_users_and_roles(lab: &Lab) -> TestResult {
    clean(lab);
    let etcd = Etcd::start(lab, true)?;
    let topo = topology(lab);
    let (mut running, rx) = start(lab, &topo, &["--seeds-user", "root"]);
    let converged = ["r1/l1-1: converged", "r2: converged"].map(String::from);
    let seen = wait_lines(&rx, &converged, Duration::from_secs(90))?;
    let (users, _) = etcd.users_and_roles()?;
    check!(users.contains("arbor."), "no run users:\n{users}");
    // A leaf that cannot answer holds the teardown up, so a second signal lands during it.
    lab.sh("l1-1", "pkill -STOP -x arbor");
    let _resume = Undo {
        lab,
        host: "l1-1",
        shell: "pkill -CONT -x arbor".into(),
    };
    unsafe {
        libc::kill(running.0.id() as i32, libc::SIGINT);
    }
    std::thread::sleep(Duration::from_millis(700));
    check!(
        running.0.try_wait().map_err(fail)?.is_none(),
        "the teardown ended before the second signal; nothing to force"
    );
    let second = Instant::now();
    unsafe {
        libc::kill(running.0.id() as i32, libc::SIGTERM);
    }
    let status = loop {
        if let Some(status) = running.0.try_wait().map_err(fail)? {
            break status;
        }
        check!(
            second.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of the second signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = second.elapsed();
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        rest.push(line);
    }
    let log = format!("{}\n{}", seen.join("\n"), rest.join("\n"));
    check!(
        status.code() == Some(130),
        "exit {:?}\n{log}",
        status.code()
    );
    check!(
        took < Duration::from_secs(2),
        "exit took {took:?} after the second signal\n{log}"
    );
    check_only_root(&etcd, &log)?;
    // Once resumed, the stopped leaf finds its link gone and cleans up after itself.
    lab.sh("l1-1", "pkill -CONT -x arbor");
    let deadline = Instant::now() + Duration::from_secs(10);
    for h in HOSTS {
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

fn a_finished_run_deletes_its_etcd_users_and_roles(lab: &Lab) -> TestResult {
    clean(lab);
    let etcd = Etcd::start(lab, true)?;
    let topo = topology(lab);
    let dir = tempfile::tempdir().map_err(fail)?;
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, format!("{ROOT_PASSWORD}\n")).map_err(fail)?;
    std::fs::set_permissions(
        &password_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(fail)?;
    let out = arbor_command(
        lab,
        &topo,
        &[
            "--seeds-user",
            "root",
            "--seeds-password-file",
            password_file.to_str().unwrap_or_default(),
            "--converged-timeout",
            "2",
        ],
    )
    .output()
    .map_err(fail)?;
    let log = exited(&out, 0)?;
    check_exchanged(lab, &log)?;
    check!(
        !log.contains("not isolated"),
        "warned about isolation with authentication on\n{log}"
    );
    // Tokens expired all through the run (--auth-token-ttl 1): every host authenticated again.
    check!(
        !log.contains("invalid auth token") && !log.contains("WARN"),
        "a host's request failed\n{log}"
    );
    check_only_root(&etcd, &log)?;
    check_no_leftovers(lab)?;
    Ok(())
}

/// A run that must fail before any host is contacted, with `want` in its output.
fn fails_early(
    lab: &Lab,
    etcd: &Etcd,
    extra: &[&str],
    password: Option<&str>,
    code: i32,
    want: &str,
) -> TestResult {
    let topo = topology(lab);
    let mut command = arbor_command(lab, &topo, extra);
    if let Some(p) = password {
        command.env("ARBOR_SEEDS_PASSWORD", p);
    }
    let out = command.output().map_err(fail)?;
    let log = exited(&out, code)?;
    check!(
        log.contains(want),
        "{extra:?}: the error does not say {want:?}\n{log}"
    );
    check_no_leftovers(lab)?;
    let (users, roles) = etcd.users_and_roles()?;
    check!(
        !users.contains("arbor.") && !roles.contains("arbor."),
        "{extra:?} left users:\n{users}roles:\n{roles}"
    );
    for h in HOSTS {
        let ran = lab.sh(h, "ls -d /tmp/from-* 2>/dev/null || true");
        check!(ran.trim().is_empty(), "{h} ran a graph: {ran}");
    }
    Ok(())
}

fn wrong_or_missing_operator_credentials_fail_naming_seeds(lab: &Lab) -> TestResult {
    clean(lab);
    let etcd = Etcd::start(lab, true)?;
    // A user without the root role, allowed everything under /arbor/ but not to add users.
    etcd.root(&["user", "add", "ops:ops-secret"])?;
    etcd.root(&["role", "add", "ops"])?;
    etcd.root(&[
        "role",
        "grant-permission",
        "ops",
        "readwrite",
        "--prefix=true",
        "/arbor/",
    ])?;
    etcd.root(&["user", "grant-role", "ops", "ops"])?;

    fails_early(
        lab,
        &etcd,
        &[],
        None,
        1,
        &format!(
            "arbor: --seeds: the etcd at {CLIENT_URL} has authentication on: give --seeds-user NAME"
        ),
    )?;
    fails_early(
        lab,
        &etcd,
        &["--seeds-user", "root"],
        Some("not-the-password"),
        1,
        &format!(
            "arbor: --seeds: the etcd at {CLIENT_URL} refused --seeds-user root: wrong user name or password"
        ),
    )?;
    fails_early(
        lab,
        &etcd,
        &["--seeds-user", "nobody"],
        Some(ROOT_PASSWORD),
        1,
        "refused --seeds-user nobody",
    )?;
    fails_early(
        lab,
        &etcd,
        &["--seeds-user", "root"],
        None,
        2,
        "arbor: --seeds-user root: no password: give it in ARBOR_SEEDS_PASSWORD",
    )?;
    fails_early(
        lab,
        &etcd,
        &["--seeds-user", "ops"],
        Some("ops-secret"),
        1,
        "arbor: --seeds: --seeds-user ops may not manage the etcd's users and roles",
    )?;
    fails_early(
        lab,
        &etcd,
        &[
            "--seeds-user",
            "root",
            "--seeds-password-file",
            "/nonexistent/etcd-password",
        ],
        None,
        2,
        "--seeds-password-file /nonexistent/etcd-password:",
    )?;
    // The password is never on the command line: there is no flag for it.
    let topo = topology(lab);
    let out = arbor_command(lab, &topo, &["--seeds-password", ROOT_PASSWORD])
        .output()
        .map_err(fail)?;
    exited(&out, 2)?;
    Ok(())
}

fn with_authentication_off_the_run_warns_once_that_hosts_are_not_isolated(lab: &Lab) -> TestResult {
    clean(lab);
    let etcd = Etcd::start(lab, false)?;
    let topo = topology(lab);
    let out = arbor_command(lab, &topo, &["--converged-timeout", "2"])
        .output()
        .map_err(fail)?;
    let log = exited(&out, 0)?;
    check_exchanged(lab, &log)?;
    let warnings = log.matches("hosts are not isolated in the store").count();
    check!(warnings == 1, "{warnings} isolation warnings\n{log}");
    // No users were made: the etcd has none at all.
    let users = etcd.ok(None, &["user", "list"])?;
    check!(users.trim().is_empty(), "users:\n{users}");
    check_no_leftovers(lab)?;
    Ok(())
}

/// A cluster of three etcd members on loopback in the initiator's namespace, each with its own
/// ports and data dir; every member still running is killed however the test ends.
struct Cluster {
    members: Vec<Option<Child>>,
    ns: String,
    dir: tempfile::TempDir,
}

/// The cluster's client URLs, in the order `--seeds` lists them.
const MEMBER_URLS: [&str; 3] = [
    "http://127.0.0.1:23811",
    "http://127.0.0.1:23812",
    "http://127.0.0.1:23813",
];
const MEMBER_PEERS: [&str; 3] = [
    "http://127.0.0.1:23821",
    "http://127.0.0.1:23822",
    "http://127.0.0.1:23823",
];

impl Cluster {
    /// Starts the three members, waits for the cluster to be healthy, adds root and turns
    /// authentication on (tokens expire after a second unused, as in [`Etcd::start`]).
    fn start(lab: &Lab) -> Result<Cluster, libtest_mimic::Failed> {
        let dir = tempfile::tempdir().map_err(fail)?;
        let initial: Vec<String> = MEMBER_PEERS
            .iter()
            .enumerate()
            .map(|(i, peer)| format!("m{}={peer}", i + 1))
            .collect();
        let initial = initial.join(",");
        let mut cluster = Cluster {
            members: Vec::new(),
            ns: lab.init_ns().to_string(),
            dir,
        };
        for (i, (client, peer)) in MEMBER_URLS.iter().zip(MEMBER_PEERS).enumerate() {
            let name = format!("m{}", i + 1);
            let log = std::fs::File::create(cluster.dir.path().join(format!("{name}.log")))
                .map_err(fail)?;
            let child = Command::new("ip")
                .args(["netns", "exec", lab.init_ns(), "/usr/bin/etcd"])
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(cluster.dir.path().join(&name))
                .args(["--listen-client-urls", client])
                .args(["--advertise-client-urls", client])
                .args(["--listen-peer-urls", peer])
                .args(["--initial-advertise-peer-urls", peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "arbor-failover-test"])
                .args(["--auth-token-ttl", "1"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(fail)?;
            cluster.members.push(Some(child));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster
            .ctl(&MEMBER_URLS, None, &["endpoint", "health"])
            .status
            .success()
        {
            check!(
                Instant::now() < deadline,
                "the etcd cluster did not come up\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        for args in [
            &["user", "add", &format!("root:{ROOT_PASSWORD}")][..],
            &["user", "grant-role", "root", "root"],
            &["auth", "enable"],
        ] {
            let out = cluster.ctl(&MEMBER_URLS, None, args);
            check!(out.status.success(), "etcdctl {args:?}\n{}", text(&out));
        }
        Ok(cluster)
    }

    /// etcdctl against `endpoints`, as `user` ("name:password", in the environment).
    fn ctl(&self, endpoints: &[&str], user: Option<&str>, args: &[&str]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "etcdctl", "--endpoints"])
            .arg(endpoints.join(","))
            .args(["--dial-timeout", "2s", "--command-timeout", "5s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .env_remove("ETCDCTL_USER");
        if let Some(user) = user {
            c.env("ETCDCTL_USER", user);
        }
        c.output().expect("run etcdctl")
    }

    /// etcdctl as root against the members still alive; its stdout.
    fn root(&self, args: &[&str]) -> Result<String, libtest_mimic::Failed> {
        let alive: Vec<&str> = MEMBER_URLS
            .iter()
            .zip(&self.members)
            .filter(|(_, m)| m.is_some())
            .map(|(url, _)| *url)
            .collect();
        let out = self.ctl(&alive, Some(&format!("root:{ROOT_PASSWORD}")), args);
        check!(out.status.success(), "etcdctl {args:?}\n{}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills member `i` (0-based) with SIGKILL, as a crash would, and waits for it to be gone.
    fn kill(&mut self, i: usize) -> TestResult {
        if let Some(mut child) = self.members.get_mut(i).and_then(Option::take) {
            child.kill().map_err(fail)?;
            child.wait().map_err(fail)?;
        }
        Ok(())
    }

    /// Every member's log, for failure messages.
    fn logs(&self) -> String {
        (1..=3)
            .map(|i| {
                let path = self.dir.path().join(format!("m{i}.log"));
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- m{i}.log (last lines)\n{}\n", tail.join("\n"))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.members.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The leaf graph (each host exports /tmp/from-<name> saying `greeting`, and collects every
/// host's), written where the test can edit it: (dir, graph path, topology path).
fn editable_topology(lab: &Lab, greeting: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = dir.path().join("leaf.yaml");
    write_leaf_graph(&graph, greeting);
    let body = format!(
        "defaults:\n  user: root\nhosts:\n\
         - host: {r1}\n  name: r1\n  children:\n  - host: {l11}\n    name: l1-1\n    graph: {leaf}\n\
         - host: {r2}\n  name: r2\n  graph: {leaf}\n",
        r1 = lab.addr("r1"),
        l11 = lab.addr("l1-1"),
        r2 = lab.addr("r2"),
        leaf = graph.display(),
    );
    let topology = dir.path().join("topology.yaml");
    std::fs::write(&topology, body).expect("write topology");
    (dir, graph, topology)
}

/// Writes the leaf graph with `greeting`, saved by rename as editors do.
fn write_leaf_graph(path: &std::path::Path, greeting: &str) {
    let text = format!(
        "graph: leaf\nresources:\n  file:\n  - name: \"@@from-{{{{hostname}}}}\"\n    \
         path: \"/tmp/from-{{{{hostname}}}}\"\n    content: |\n      {greeting} from {{{{hostname}}}}\n    \
         state: exists\ncollect:\n- kind: file\n  pattern: \"/tmp/\"\nedges: []\n"
    );
    let tmp = path.with_extension("yaml.new");
    std::fs::write(&tmp, text).expect("write graph");
    std::fs::rename(&tmp, path).expect("rename graph");
}

/// What each leaf holds of the collected files: `from-<host>: <content>` lines, sorted.
fn collected(lab: &Lab, leaf: &str) -> String {
    lab.sh(
        leaf,
        "for f in /tmp/from-*; do [ -f \"$f\" ] && printf '%s: %s' \"$(basename $f)\" \"$(cat $f)\" && echo; done | sort",
    )
}

fn when_the_member_in_use_dies_tunnels_fail_over_and_exports_and_edits_live_on(
    lab: &Lab,
) -> TestResult {
    clean(lab);
    let mut cluster = Cluster::start(lab)?;
    let (_dir, graph, topology) = editable_topology(lab, "hello");
    let seeds = MEMBER_URLS.join(",");
    let mut child = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run"])
        .arg("--topology")
        .arg(&topology)
        .args(["--tmp-prefix", "--seeds", &seeds, "--seeds-user", "root"])
        .env("HOME", lab.home())
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_SEEDS_PASSWORD", ROOT_PASSWORD)
        .env("ARBOR_LOG", "arbor=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(fail)?;
    let rx = lines_of_both(
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let mut running = Running(child);
    let converged = ["r1/l1-1: converged", "r2: converged"].map(String::from);
    let mut seen = wait_lines(&rx, &converged, Duration::from_secs(90))?;
    check_exchanged(lab, &seen.join("\n"))?;

    // The tunnels connect to the first member listed: kill it, as a crash would.
    cluster.kill(0)?;
    let killed = Instant::now();
    // Longer than a lease's lifetime (10 s): exports held only by a lease nobody can renew
    // would be gone by now.
    while killed.elapsed() < Duration::from_secs(15) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    let log = |seen: &[String]| format!("{}\n{}", seen.join("\n"), cluster.logs());
    check!(
        running.0.try_wait().map_err(fail)?.is_none(),
        "the run ended after the member died\n{}",
        log(&seen)
    );
    let exports = cluster.root(&["get", "--prefix", "/arbor/runs/", "--keys-only"])?;
    for leaf in LEAVES {
        check!(
            exports.contains(&format!("/exports/{leaf}/file/from-{leaf}")),
            "{leaf}'s export is gone from the etcd {:?} after the member died:\n{exports}\n{}",
            killed.elapsed(),
            log(&seen)
        );
    }

    // An edit made after the death still flows: published through the new member, collected
    // by both leaves.
    write_leaf_graph(&graph, "hello again");
    let want = "from-l1-1: hello again from l1-1\nfrom-r2: hello again from r2\n";
    let deadline = Instant::now() + Duration::from_secs(30);
    for leaf in LEAVES {
        loop {
            while let Ok(line) = rx.try_recv() {
                seen.push(line);
            }
            let got = collected(lab, leaf);
            if got == want {
                break;
            }
            check!(
                Instant::now() < deadline,
                "{leaf} collected, 30 s after the edit:\n{got}\nwant:\n{want}\n{}",
                log(&seen)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let values = cluster.root(&["get", "--prefix", "/arbor/runs/", "--print-value-only"])?;
    for leaf in LEAVES {
        check!(
            values.contains(&format!("hello again from {leaf}")),
            "the etcd does not hold {leaf}'s edited export:\n{values}"
        );
    }

    // The failover was reported once, naming the dead member and the new one.
    let (code, _) = running.interrupt()?;
    seen.extend(rx.try_iter());
    let failovers: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("127.0.0.1:23811") && l.contains("now"))
        .collect();
    check!(
        failovers.len() == 1
            && (failovers[0].contains("127.0.0.1:23812")
                || failovers[0].contains("127.0.0.1:23813")),
        "want one warning of the failover from 127.0.0.1:23811 to another member, got {failovers:?}\n{}",
        log(&seen)
    );
    check!(
        !seen.iter().any(|l| l.contains("FAILED")),
        "a host failed\n{}",
        log(&seen)
    );
    check!(code == Some(130), "exit {code:?} after ^C\n{}", log(&seen));
    let users = cluster.root(&["user", "list"])?;
    check!(
        users.trim() == "root",
        "users left:\n{users}\n{}",
        log(&seen)
    );
    check_no_leftovers(lab)?;
    Ok(())
}
