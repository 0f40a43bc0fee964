//! End-to-end tests of arbor following the operator's ssh_config against real sshd hosts: an
//! alias with HostName, User, Port and IdentityFile; ProxyJump to a leaf the initiator cannot
//! reach; `topology check` printing what ssh_config resolved; and named keys tried before an
//! agent's keys, so an agent holding more keys than sshd's MaxAuthTries (6) does not lock the
//! right key out. The lab is 1 relay × 1 leaf whose sshds also listen on port 2222. Every run
//! has a HOME of its own: no test reads the real ~/.ssh/config.

#[macro_use]
mod support;

use support::harness::{Test, TestResult, exited, fail, output_text as text};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
/// The second port every lab sshd listens on (ARBOR_LAB_SSHD_EXTRA).
const PORT: u16 = 2222;

fn main() -> std::process::ExitCode {
    // SAFETY: no other thread runs yet; the lab script inherits it.
    unsafe { std::env::set_var("ARBOR_LAB_SSHD_EXTRA", format!("Port 22\nPort {PORT}")) };
    let tests: Vec<Test> = vec![
        (
            "an_alias_with_hostname_user_port_and_identity_file_works",
            an_alias_with_hostname_user_port_and_identity_file_works,
        ),
        (
            "proxy_jump_reaches_a_leaf_through_a_relay",
            proxy_jump_reaches_a_leaf_through_a_relay,
        ),
        (
            "a_relay_follows_the_proxy_jump_the_initiator_resolved",
            a_relay_follows_the_proxy_jump_the_initiator_resolved,
        ),
        (
            "a_named_key_logs_in_past_an_agent_holding_seven_wrong_keys",
            a_named_key_logs_in_past_an_agent_holding_seven_wrong_keys,
        ),
        (
            "identities_only_keeps_the_agents_other_keys_out",
            identities_only_keeps_the_agents_other_keys_out,
        ),
    ];
    support::harness::run_with_lab("sshcfg", &["--relays", "1", "--leaves", "1"], true, tests)
}

/// A HOME of the test's own: the lab's client key at `keys/lab` (not a default ~/.ssh/id_*
/// name), known_hosts with the lab's lines, r1's only as `[addr]:2222` (so a connection to
/// r1 on port 22 is refused: unknown host key), and `config` as ~/.ssh/config, where `{key}`
/// is the key's path.
fn home(lab: &Lab, config: &str) -> Result<tempfile::TempDir, libtest_mimic::Failed> {
    let home = tempfile::tempdir().map_err(fail)?;
    let ssh = home.path().join(".ssh");
    let keys = home.path().join("keys");
    std::fs::create_dir_all(&ssh).map_err(fail)?;
    std::fs::create_dir_all(&keys).map_err(fail)?;
    let key = keys.join("lab");
    std::fs::copy(lab.home().join(".ssh/id_ed25519"), &key).map_err(fail)?;
    let known = std::fs::read_to_string(lab.home().join(".ssh/known_hosts")).map_err(fail)?;
    let r1 = lab.addr("r1");
    let mut lines = String::new();
    for line in known.lines() {
        match line.split_once(' ') {
            Some((names, key)) if names.split(',').any(|n| n == r1) => {
                lines.push_str(&format!("[{r1}]:{PORT} {key}\n"))
            }
            _ => lines.push_str(&format!("{line}\n")),
        }
    }
    std::fs::write(ssh.join("known_hosts"), lines).map_err(fail)?;
    std::fs::write(
        ssh.join("config"),
        config.replace("{key}", &key.to_string_lossy()),
    )
    .map_err(fail)?;
    Ok(home)
}

fn topology(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("topology.yaml");
    std::fs::write(&path, body).expect("write topology");
    path
}

/// `arbor ARGS` in the initiator's namespace with `home` as HOME and `agent` as its agent.
fn arbor(lab: &Lab, home: &Path, agent: Option<&Path>, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.init_ns(), ARBOR])
        .args(args)
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info");
    if let Some(socket) = agent {
        c.env("SSH_AUTH_SOCK", socket);
    }
    c
}

/// Runs a topology without graphs (it ends once every host runs) and returns its output; a
/// run still going after 60 s is killed and fails the test.
fn run_topology(
    lab: &Lab,
    home: &Path,
    agent: Option<&Path>,
    topo: &Path,
) -> Result<Output, libtest_mimic::Failed> {
    let topo = topo.to_str().unwrap_or_default();
    let mut child = arbor(
        lab,
        home,
        agent,
        &[
            "run",
            "--topology",
            topo,
            "--tmp-prefix",
            "--converged-timeout",
            "1",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .map_err(fail)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().map_err(fail)?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().map_err(fail)?.is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().map_err(fail)?;
        return Err(fail(format!("still running after 60 s\n{}", text(&out))));
    }
    child.wait_with_output().map_err(fail)
}

fn an_alias_with_hostname_user_port_and_identity_file_works(lab: &Lab) -> TestResult {
    let r1 = lab.addr("r1");
    let home = home(
        lab,
        &format!(
            "Host web\n  HostName {r1}\n  User root\n  Port {PORT}\n  IdentityFile {{key}}\n\
             Host stranger\n  HostName {r1}\n  User nosuchuser\n  Port {PORT}\n  \
             IdentityFile {{key}}\n"
        ),
    )?;
    let topo = topology(home.path(), "hosts:\n- host: web\n");
    // check shows what ssh_config resolved.
    let out = arbor(
        lab,
        home.path(),
        None,
        &["topology", "check", topo.to_str().unwrap_or_default()],
    )
    .output()
    .map_err(fail)?;
    let log = exited(&out, 0)?;
    check!(
        log.lines()
            .any(|l| l.starts_with("web ") && l.contains(&format!("root@{r1}:{PORT} "))),
        "topology check did not print root@{r1}:{PORT} for web\n{log}"
    );
    // The run reaches it: known_hosts knows r1's key only as [addr]:2222 (strict), and the
    // only key is the IdentityFile (no agent, no ~/.ssh/id_*).
    let out = run_topology(lab, home.path(), None, &topo)?;
    let log = exited(&out, 0)?;
    check!(log.contains("web: running"), "web never ran\n{log}");
    // User is followed too: the same host as a user that does not exist is refused.
    let topo = topology(home.path(), "hosts:\n- host: stranger\n");
    let out = run_topology(lab, home.path(), None, &topo)?;
    let log = exited(&out, 1)?;
    check!(
        log.contains("nosuchuser"),
        "the refusal does not name the user from ssh_config\n{log}"
    );
    // The topology's user beats ssh_config's.
    let topo = topology(home.path(), "hosts:\n- host: stranger\n  user: root\n");
    let out = run_topology(lab, home.path(), None, &topo)?;
    let log = exited(&out, 0)?;
    check!(
        log.contains("stranger: running"),
        "stranger never ran\n{log}"
    );
    Ok(())
}

fn proxy_jump_reaches_a_leaf_through_a_relay(lab: &Lab) -> TestResult {
    let (r1, leaf) = (lab.addr("r1"), lab.addr("l1-1"));
    let home = home(
        lab,
        &format!(
            "Host relay\n  HostName {r1}\n  Port {PORT}\nHost leaf\n  HostName {leaf}\n  \
             ProxyJump relay\nHost *\n  User root\n  IdentityFile {{key}}\n"
        ),
    )?;
    let topo = topology(home.path(), "hosts:\n- host: leaf\n");
    let out = arbor(
        lab,
        home.path(),
        None,
        &["topology", "check", topo.to_str().unwrap_or_default()],
    )
    .output()
    .map_err(fail)?;
    let log = exited(&out, 0)?;
    check!(
        log.contains(&format!("root@{leaf}:22 via root@{r1}:{PORT}")),
        "topology check does not show the hop\n{log}"
    );
    // The leaf is unreachable from the initiator except through the relay.
    let out = run_topology(lab, home.path(), None, &topo)?;
    let log = exited(&out, 0)?;
    check!(log.contains("leaf: running"), "the leaf never ran\n{log}");
    // ProxyJump none (first value wins) sends it direct, where it cannot be reached.
    let none = home.path().join("none.conf");
    std::fs::write(
        &none,
        format!(
            "Host leaf\n  ProxyJump none\n  HostName {leaf}\n  User root\n  \
             IdentityFile {}\n  ConnectTimeout 2\n",
            home.path().join("keys/lab").display()
        ),
    )
    .map_err(fail)?;
    let out = arbor(
        lab,
        home.path(),
        None,
        &[
            "run",
            "-F",
            none.to_str().unwrap_or_default(),
            "--topology",
            topo.to_str().unwrap_or_default(),
            "--tmp-prefix",
            "--converged-timeout",
            "1",
        ],
    )
    .output()
    .map_err(fail)?;
    let log = exited(&out, 1)?;
    check!(log.contains("leaf"), "{log}");
    Ok(())
}

/// At depth 2: the relay reaches its child through the hop the initiator resolved (here the
/// relay itself on port 2222), signing with the initiator's IdentityFile key through the
/// forwarded agent. The relay has no ssh_config of its own.
fn a_relay_follows_the_proxy_jump_the_initiator_resolved(lab: &Lab) -> TestResult {
    let (r1, leaf) = (lab.addr("r1"), lab.addr("l1-1"));
    let home = home(
        lab,
        &format!(
            "Host relay\n  HostName {r1}\n  Port {PORT}\nHost leaf\n  HostName {leaf}\n  \
             ProxyJump relay\nHost *\n  User root\n  IdentityFile {{key}}\n"
        ),
    )?;
    let topo = topology(
        home.path(),
        "hosts:\n- host: relay\n  children:\n  - host: leaf\n",
    );
    let out = run_topology(lab, home.path(), None, &topo)?;
    let log = exited(&out, 0)?;
    check!(
        log.contains("relay/leaf: running"),
        "the leaf never ran under the relay\n{log}"
    );
    Ok(())
}

/// An ssh-agent of the test's own, killed when dropped.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// An agent holding `wrong` fresh keys the lab does not authorize, plus `extra` keys.
    fn start(wrong: usize, extra: &[&Path]) -> Result<Agent, libtest_mimic::Failed> {
        let dir = tempfile::tempdir().map_err(fail)?;
        let socket = dir.path().join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(fail)?;
        let agent = Agent {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !agent.socket.exists() {
            check!(Instant::now() < deadline, "ssh-agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut keys: Vec<PathBuf> = Vec::new();
        for i in 0..wrong {
            let key = agent._dir.path().join(format!("wrong{i}"));
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key)
                .output()
                .map_err(fail)?;
            check!(out.status.success(), "ssh-keygen: {}", text(&out));
            keys.push(key);
        }
        keys.extend(extra.iter().map(|p| p.to_path_buf()));
        for key in &keys {
            let out = Command::new("ssh-add")
                .arg(key)
                .env("SSH_AUTH_SOCK", &agent.socket)
                .output()
                .map_err(fail)?;
            check!(out.status.success(), "ssh-add: {}", text(&out));
        }
        Ok(agent)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn a_named_key_logs_in_past_an_agent_holding_seven_wrong_keys(lab: &Lab) -> TestResult {
    let r1 = lab.addr("r1");
    let agent = Agent::start(7, &[])?;
    // The right key named by IdentityFile is tried before the agent's seven.
    let home = home(
        lab,
        &format!("Host r1\n  HostName {r1}\n  Port {PORT}\n  User root\n  IdentityFile {{key}}\n"),
    )?;
    let topo = topology(home.path(), "hosts:\n- host: r1\n");
    let out = run_topology(lab, home.path(), Some(&agent.socket), &topo)?;
    let log = exited(&out, 0)?;
    check!(log.contains("r1: running"), "r1 never ran\n{log}");
    // The control: the same key as ~/.ssh/id_ed25519, named nowhere, comes after the agent's
    // keys, and sshd (MaxAuthTries 6) gives up before it.
    let control = home.path().join(".ssh/config");
    std::fs::write(
        &control,
        format!("Host r1\n  HostName {r1}\n  Port {PORT}\n  User root\n"),
    )
    .map_err(fail)?;
    std::fs::copy(
        home.path().join("keys/lab"),
        home.path().join(".ssh/id_ed25519"),
    )
    .map_err(fail)?;
    let out = run_topology(lab, home.path(), Some(&agent.socket), &topo)?;
    let log = exited(&out, 1)?;
    check!(
        log.contains("agent (7 keys)") && log.contains("MaxAuthTries"),
        "the control run did not fail on the agent's keys\n{log}"
    );
    Ok(())
}

fn identities_only_keeps_the_agents_other_keys_out(lab: &Lab) -> TestResult {
    let r1 = lab.addr("r1");
    let right = lab.home().join(".ssh/id_ed25519");
    let agent = Agent::start(1, &[&right])?;
    // IdentityFile names a key the lab does not authorize; the agent holds the right one.
    let wrong = agent._dir.path().join("wrong0");
    let config = |only: &str| {
        format!(
            "Host r1\n  HostName {r1}\n  Port {PORT}\n  User root\n  IdentityFile {}\n  \
             IdentitiesOnly {only}\n",
            wrong.display()
        )
    };
    let home = home(lab, &config("yes"))?;
    let topo = topology(home.path(), "hosts:\n- host: r1\n");
    let out = run_topology(lab, home.path(), Some(&agent.socket), &topo)?;
    let log = exited(&out, 1)?;
    check!(
        !log.contains("agent (") && log.contains("wrong0"),
        "IdentitiesOnly yes still tried other agent keys\n{log}"
    );
    // Without it, the agent's right key is tried after the named one, and logs in.
    std::fs::write(home.path().join(".ssh/config"), config("no")).map_err(fail)?;
    let out = run_topology(lab, home.path(), Some(&agent.socket), &topo)?;
    let log = exited(&out, 0)?;
    check!(log.contains("r1: running"), "r1 never ran\n{log}");
    Ok(())
}
