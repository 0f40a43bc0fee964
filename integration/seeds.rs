//! End-to-end tests of `arbor run --seeds` against a real etcd (Debian's etcd 3.4, started in
//! the lab's initiator namespace by each test) with authentication on and off, and the lab's
//! real SSH hosts: r1 relays for its leaf l1-1, r2 runs a graph of its own.
//!
//! With authentication on, each host must get an etcd user and role of its own for the run,
//! limited to its own keys (checked two ways: the roles' key ranges as root reads them, and a
//! misbehaving r1 whose attempts with the very credential arbor gave it are refused by etcd),
//! and none may remain once the run is over, however it ends.

#[macro_use]
mod support;

use support::harness::{
    Running, Test, TestResult, exited, fail, lines_of, output_text as text, wait_lines,
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
    let out = lines_of(child.stdout.take().expect("stdout"));
    let err = child.stderr.take().expect("stderr");
    let (tx, merged) = mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in out {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx2.send(line).is_err() {
                break;
            }
        }
    });
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
        let want = format!(
            "Role {name}\nKV Read:\n\
             \t{base}/converged/{host}\n\
             \t[{base}/exports/, {base}/exports0) (prefix {base}/exports/)\n\
             \t[{base}/exports/{host}/, {base}/exports/{host}0) (prefix {base}/exports/{host}/)\n\
             KV Write:\n\
             \t{base}/converged/{host}\n\
             \t[{base}/exports/{host}/, {base}/exports/{host}0) (prefix {base}/exports/{host}/)\n"
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
