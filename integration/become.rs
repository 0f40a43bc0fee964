//! End-to-end tests of `become` against lab hosts that refuse root logins (`integration/lab up
//! --become-hosts`): r1 and its leaf l1-1 let the lab's key in as `ops` (sudo without a
//! password) and `opsp` (sudo wants one); l1-2 is an ordinary host that takes root logins.
//!
//! What a user would check: root's files on the far hosts (a graph writes into /root, which
//! the login users cannot), the errors of a refused or missing sudo password, `-k` logging in
//! with a password alone (no key in the initiator's home), `arbor exec --become`, and that no
//! arbor process, working dir or root dir is left on any host.

#[macro_use]
mod support;

use support::harness::{Test, TestResult, exited, fail, output_text as text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::Lab;
use support::terminal::Terminal;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const HOSTS: [&str; 3] = ["r1", "l1-1", "l1-2"];
const OPS_SSH_PASSWORD: &str = "ops-lab-ssh";
const OPSP_SUDO_PASSWORD: &str = "opsp-lab-sudo";

fn main() -> std::process::ExitCode {
    let tests: Vec<Test> = vec![
        (
            "a_relay_and_its_leaf_become_root_through_passwordless_sudo_at_depth_2",
            a_relay_and_its_leaf_become_root_through_passwordless_sudo_at_depth_2,
        ),
        (
            "a_sudo_password_from_a_file_reaches_depth_2_and_never_shows",
            a_sudo_password_from_a_file_reaches_depth_2_and_never_shows,
        ),
        (
            "a_missing_or_wrong_sudo_password_fails_naming_the_host_and_leaves_nothing",
            a_missing_or_wrong_sudo_password_fails_naming_the_host_and_leaves_nothing,
        ),
        (
            "an_ssh_password_alone_logs_in_at_depth_1_and_2",
            an_ssh_password_alone_logs_in_at_depth_1_and_2,
        ),
        (
            "exec_become_runs_the_command_as_root_at_depth_2",
            exec_become_runs_the_command_as_root_at_depth_2,
        ),
        (
            "become_on_the_command_line_reaches_hosts_without_it_in_the_topology",
            become_on_the_command_line_reaches_hosts_without_it_in_the_topology,
        ),
        (
            "on_a_terminal_the_ssh_and_sudo_passwords_are_each_asked_once_per_run",
            on_a_terminal_the_ssh_and_sudo_passwords_are_each_asked_once_per_run,
        ),
    ];
    support::harness::run_with_lab(
        "become",
        &[
            "--relays",
            "1",
            "--leaves",
            "2",
            "--become-hosts",
            "r1,l1-1",
        ],
        true,
        tests,
    )
}

/// Writes /root/become-proof (only root can) with the host's name, and reports converged.
const PROOF_GRAPH: &str = "\
---
graph: proof
resources:
  file:
  - name: proof
    path: /root/become-proof
    content: |
      written by {{hostname}}
    state: exists
edges: []
";

/// A topology and its graph in a temp dir; `{graph}` in `body` becomes the graph's path.
struct Topo {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Topo {
    /// A file beside the topology holding `password` on its first line.
    fn password_file(&self, name: &str, password: &str) -> Result<PathBuf, libtest_mimic::Failed> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, format!("{password}\n")).map_err(fail)?;
        Ok(path)
    }
}

fn topology(body: &str) -> Topo {
    let dir = tempfile::tempdir().expect("tempdir");
    let graph = dir.path().join("proof.yaml");
    std::fs::write(&graph, PROOF_GRAPH).expect("write graph");
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, body.replace("{graph}", &graph.to_string_lossy())).expect("write");
    Topo { dir, path }
}

/// r1 and l1-1 log in as `user` and become root (`become` as given); l1-2 logs in as root.
fn tree(user: &str, become_: &str) -> String {
    format!(
        "\
hosts:
- host: 10.199.0.11
  name: r1
  user: {user}
  {become_}
  graph: {{graph}}
  children:
  - host: 10.199.1.11
    name: l1-1
    user: {user}
    {become_}
    graph: {{graph}}
  - host: 10.199.1.12
    name: l1-2
    user: root
    graph: {{graph}}
"
    )
}

fn arbor(lab: &Lab, home: &Path, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR])
        .args(args)
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info")
        .output()
        .expect("run arbor")
}

fn run(lab: &Lab, topo: &Topo, extra: &[&str]) -> Output {
    let mut args = vec![
        "run",
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
        "--converged-timeout",
        "1",
    ];
    args.extend_from_slice(extra);
    arbor(lab, &lab.home(), &args)
}

/// An initiator home with the lab's known_hosts and no key: only a password can log in.
fn keyless_home(lab: &Lab) -> Result<tempfile::TempDir, libtest_mimic::Failed> {
    let home = tempfile::tempdir().map_err(fail)?;
    std::fs::create_dir(home.path().join(".ssh")).map_err(fail)?;
    std::fs::copy(
        lab.home().join(".ssh/known_hosts"),
        home.path().join(".ssh/known_hosts"),
    )
    .map_err(fail)?;
    Ok(home)
}

fn clean(lab: &Lab) {
    for h in HOSTS {
        lab.sh(h, "rm -rf /root/become-proof /tmp/arbor.*");
    }
}

/// Who owns /root/become-proof and what it says, on `host` ("" when it is not there).
fn proof(lab: &Lab, host: &str) -> String {
    lab.sh(
        host,
        "[ -f /root/become-proof ] && printf '%s: ' \"$(stat -c %U /root/become-proof)\" && \
         cat /root/become-proof || true",
    )
}

fn check_proofs(lab: &Lab, hosts: &[&str], log: &str) -> TestResult {
    for h in hosts {
        let got = proof(lab, h);
        check!(
            got == format!("root: written by {h}\n"),
            "{h}: /root/become-proof is {got:?}\n{log}"
        );
    }
    Ok(())
}

/// No arbor process, no working dir (the login user's or root's) on any host.
fn check_nothing_left(lab: &Lab) -> TestResult {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(8);
    for h in HOSTS {
        loop {
            let left = lab.sh(
                h,
                "pgrep -a arbor || true; ls -d /tmp/arbor.* 2>/dev/null || true",
            );
            if left.trim().is_empty() {
                break;
            }
            check!(
                std::time::Instant::now() < deadline,
                "{h} has leftovers: {left}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    Ok(())
}

fn a_relay_and_its_leaf_become_root_through_passwordless_sudo_at_depth_2(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology(&tree("ops", "become: true"));
    let out = run(lab, &topo, &[]);
    let log = exited(&out, 0)?;
    check_proofs(lab, &["r1", "l1-1", "l1-2"], &log)?;
    // The binary the relay staged its leaves from stays in the login user's cache.
    let cached = lab.sh("r1", "ls /home/ops/.cache/arbor/bin | wc -l");
    check!(cached.trim() == "1", "r1: ops's cache: {cached}\n{log}");
    check_nothing_left(lab)
}

fn a_sudo_password_from_a_file_reaches_depth_2_and_never_shows(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology(&tree("opsp", "become: true"));
    let file = topo.password_file("sudo-password", OPSP_SUDO_PASSWORD)?;
    let out = run(
        lab,
        &topo,
        &[
            "--become-password-file",
            file.to_str().unwrap_or_default(),
            "-v",
        ],
    );
    let log = exited(&out, 0)?;
    check_proofs(lab, &["r1", "l1-1", "l1-2"], &log)?;
    check!(
        !log.contains(OPSP_SUDO_PASSWORD),
        "the password shows in the output:\n{log}"
    );
    check_nothing_left(lab)
}

fn a_missing_or_wrong_sudo_password_fails_naming_the_host_and_leaves_nothing(
    lab: &Lab,
) -> TestResult {
    clean(lab);
    let topo = topology(&tree("opsp", "become: true"));
    let out = run(lab, &topo, &[]);
    let log = text(&out);
    check!(
        out.status.code() == Some(1),
        "exit {:?}:\n{log}",
        out.status
    );
    check!(
        log.contains("r1: become: sudo did not start arbor as root")
            && log.contains("a password is required")
            && log.contains("--ask-become-pass"),
        "no clear error for r1:\n{log}"
    );
    check!(proof(lab, "r1").is_empty(), "r1 has a proof:\n{log}");
    check_nothing_left(lab)?;

    let file = topo.password_file("wrong", "not-the-password")?;
    let out = run(
        lab,
        &topo,
        &["--become-password-file", file.to_str().unwrap_or_default()],
    );
    let log = text(&out);
    check!(
        out.status.code() == Some(1),
        "exit {:?}:\n{log}",
        out.status
    );
    check!(
        log.contains("r1: become: sudo refused the password for root"),
        "no clear error for a wrong password:\n{log}"
    );
    check!(
        !log.contains("not-the-password"),
        "the password shows:\n{log}"
    );
    check_nothing_left(lab)
}

fn an_ssh_password_alone_logs_in_at_depth_1_and_2(lab: &Lab) -> TestResult {
    clean(lab);
    let home = keyless_home(lab)?;
    let body = "\
hosts:
- host: 10.199.0.11
  name: r1
  user: ops
  become: true
  graph: {graph}
  children:
  - host: 10.199.1.11
    name: l1-1
    user: ops
    become: true
    graph: {graph}
";
    let topo = topology(body);
    let password = topo.password_file("ssh-password", OPS_SSH_PASSWORD)?;
    let topo_path = topo.path.to_str().unwrap_or_default();
    let args = [
        "run",
        "--topology",
        topo_path,
        "--tmp-prefix",
        "--converged-timeout",
        "1",
        "--password-file",
        password.to_str().unwrap_or_default(),
    ];
    let out = arbor(lab, home.path(), &args);
    let log = exited(&out, 0)?;
    check_proofs(lab, &["r1", "l1-1"], &log)?;
    check!(
        !log.contains(OPS_SSH_PASSWORD) && !log.contains("insecure"),
        "the password or a URL-password warning shows:\n{log}"
    );
    check_nothing_left(lab)?;

    // A wrong one: refused, naming what was tried.
    topo.password_file("ssh-password", "wrong")?;
    let out = arbor(lab, home.path(), &args);
    let log = text(&out);
    check!(
        out.status.code() == Some(1),
        "exit {:?}:\n{log}",
        out.status
    );
    check!(
        log.contains("r1") && log.contains("password (-k)"),
        "no clear error:\n{log}"
    );
    check_nothing_left(lab)
}

fn exec_become_runs_the_command_as_root_at_depth_2(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology(&tree("opsp", ""));
    let file = topo.password_file("sudo-password", OPSP_SUDO_PASSWORD)?;
    let topo_path = topo.path.to_str().unwrap_or_default();
    let out = arbor(
        lab,
        &lab.home(),
        &[
            "exec",
            "-w",
            "r1,l1-[1-2]",
            "--topology",
            topo_path,
            "--become",
            "--become-password-file",
            file.to_str().unwrap_or_default(),
            "--",
            "id -un",
        ],
    );
    let log = exited(&out, 0)?;
    for h in ["r1", "r1/l1-1", "r1/l1-2"] {
        check!(
            log.contains(&format!("{h} | root\n")),
            "{h} did not run as root:\n{log}"
        );
    }
    check!(
        !log.contains(OPSP_SUDO_PASSWORD)
            && !log.contains("PROMPT")
            && !log.contains("[arbor-become]"),
        "the password or sudo's prompt shows:\n{log}"
    );
    check_nothing_left(lab)
}

fn become_on_the_command_line_reaches_hosts_without_it_in_the_topology(lab: &Lab) -> TestResult {
    clean(lab);
    let topo = topology(&tree("ops", ""));
    let out = run(lab, &topo, &["--become"]);
    let log = exited(&out, 0)?;
    check_proofs(lab, &["r1", "l1-1", "l1-2"], &log)?;
    check_nothing_left(lab)
}

/// `-k -K` on a terminal, no key in the initiator's home: one question for the SSH password
/// and one for sudo's, whatever the number of hosts (a relay and its leaf, both `opsp`, whose
/// SSH password is its sudo password), and neither is echoed.
fn on_a_terminal_the_ssh_and_sudo_passwords_are_each_asked_once_per_run(lab: &Lab) -> TestResult {
    clean(lab);
    let home = keyless_home(lab)?;
    let topo = topology(&tree("opsp", "become: true"));
    // l1-2 takes root only by key: out of this run.
    let body = std::fs::read_to_string(&topo.path).map_err(fail)?;
    let cut = body.find("  - host: 10.199.1.12").unwrap_or(body.len());
    std::fs::write(&topo.path, &body[..cut]).map_err(fail)?;
    let term = Terminal::start(
        lab,
        home.path(),
        &[
            "--topology",
            &topo.path.to_string_lossy(),
            "--tmp-prefix",
            "--converged-timeout",
            "1",
            "-k",
            "-K",
        ],
    )?;
    let (mut ssh_asked, mut sudo_asked) = (0, 0);
    let history = term.until_exit(std::time::Duration::from_secs(120), |screen| {
        let ssh = screen.matches("SSH password (every host):").count();
        let sudo = screen
            .matches("sudo password (2 hosts become root):")
            .count();
        if ssh > ssh_asked && screen.trim_end().ends_with(':') {
            ssh_asked = ssh;
            term.type_line(OPSP_SUDO_PASSWORD);
        }
        if sudo > sudo_asked && screen.trim_end().ends_with(':') {
            sudo_asked = sudo;
            term.type_line(OPSP_SUDO_PASSWORD);
        }
    })?;
    check!(
        history.contains("ARBOR-EXIT=0"),
        "the run did not exit 0:\n{history}"
    );
    check!(
        history.matches("SSH password (every host):").count() == 1
            && history
                .matches("sudo password (2 hosts become root):")
                .count()
                == 1,
        "each password was not asked exactly once:\n{history}"
    );
    check!(
        !history.contains(OPSP_SUDO_PASSWORD),
        "a password was echoed:\n{history}"
    );
    check_proofs(lab, &["r1", "l1-1"], &history)?;
    check_nothing_left(lab)
}
