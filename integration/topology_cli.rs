//! `arbor topology check FILE` as a user runs it: the examples in topology/ print their tree
//! and exit 0; every kind of bad file exits 2 naming file:line:column.

use std::path::Path;
use std::process::{Command, Output};

/// `arbor topology check FILE` with a HOME of its own (no ~/.ssh/config) and `extra` args.
fn check_with(file: &Path, extra: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("tempdir");
    Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["topology", "check"])
        .args(extra)
        .arg(file)
        .env("HOME", home.path())
        .env("ARBOR_LOG", "arbor=warn")
        .output()
        .expect("run arbor")
}

fn check(file: &Path) -> Output {
    check_with(file, &["-F", "none"])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("topology")
        .join(name)
}

#[test]
fn the_lab_topology_prints_two_relays_and_six_leaves() {
    let out = check(&example("lab.yaml"));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("NAME "), "{stdout}");
    assert!(
        lines[0].ends_with("FAN-OUT"),
        "header ends with FAN-OUT: {stdout}"
    );
    let r1 = lines[1].split_whitespace().collect::<Vec<_>>();
    assert_eq!(r1, ["r1", "root@10.199.0.11:22", "1", "relay", "-", "3"]);
    let leaf = lines[4].split_whitespace().collect::<Vec<_>>();
    assert_eq!(
        leaf,
        [
            "└─",
            "l1-3",
            "root@10.199.1.13:22",
            "2",
            "leaf",
            "../examples/leaf.yaml",
            "0"
        ]
    );
    // Every row is as wide as the header: the columns line up.
    let width = lines[0].chars().count();
    for row in &lines[1..9] {
        assert_eq!(
            row.chars().count(),
            width,
            "misaligned row {row:?} in\n{stdout}"
        );
    }
    assert!(
        stdout.contains("valid: 8 hosts (2 relays, 0 jump hosts, 6 leaves), max depth 2"),
        "{stdout}"
    );
}

#[test]
fn the_datacenter_topology_prints_44_hosts_through_a_relay_and_a_jump_host() {
    let out = check(&example("dc1.yaml"));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert!(
        stdout.contains("valid: 44 hosts (1 relay, 1 jump host, 42 leaves), max depth 2"),
        "{stdout}"
    );
    let row = |name: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.split_whitespace().any(|w| w == name))
            .unwrap_or_else(|| panic!("no row for {name} in\n{stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row("jump1"),
        [
            "jump1",
            "ops@jump1.dc1:22",
            "1",
            "relay",
            "../examples/relay.yaml",
            "30"
        ]
    );
    assert_eq!(
        row("jump2"),
        ["jump2", "ops@jump2.dc1:2222", "1", "jump", "-", "12"]
    );
    assert_eq!(
        row("rack1-n30"),
        [
            "└─",
            "rack1-n30",
            "ops@10.1.0.40:22",
            "2",
            "leaf",
            "../examples/leaf.yaml",
            "0"
        ]
    );
    assert_eq!(
        row("db2"),
        [
            "└─",
            "db2",
            "postgres@10.2.1.2:2200",
            "2",
            "leaf",
            "../examples/leaf.yaml",
            "0"
        ]
    );
}

#[test]
fn every_bad_topology_exits_2_naming_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("g.yaml"),
        "graph: g\nresources:\n  noop:\n  - name: n\n",
    )
    .expect("write graph");
    std::fs::write(
        dir.path().join("bad-graph.yaml"),
        "graph: g\nresorces: {}\n",
    )
    .expect("write bad graph");
    let deep = {
        let mut s = String::from("hosts:\n");
        for i in 1..=9 {
            if i > 1 {
                s.push_str(&format!("{}children:\n", "  ".repeat(2 * i - 3)));
            }
            s.push_str(&format!("{}- host: h{i}\n", "  ".repeat(2 * (i - 1))));
        }
        s
    };
    let cases: Vec<(&str, String, &str, String)> = vec![
        (
            "unknown-key.yaml",
            "hosts:\n- host: a\n  nmae: b\n".into(),
            ":3:3: ",
            "unknown field `nmae`".into(),
        ),
        (
            "missing-host.yaml",
            "hosts:\n- name: a\n".into(),
            ":2:3: ",
            "missing `host`".into(),
        ),
        (
            "bad-port.yaml",
            "hosts:\n- host: a\n  port: ssh\n".into(),
            ":3:9: ",
            "port `ssh` is not a number from 1 to 65535".into(),
        ),
        (
            "duplicate.yaml",
            "hosts:\n- host: 10.0.0.[1-7]\n  name: rack1-n[01-07]\n- host: 10.0.1.7\n  name: rack1-n07\n"
                .into(),
            ":5:9: ",
            "duplicate.yaml:3:9)".into(),
        ),
        (
            "sizes.yaml",
            "hosts:\n- host: 10.1.0.[11-40]\n  name: rack1-n[01-29]\n".into(),
            ":3:9: ",
            "expands to 29 names but `host` `10.1.0.[11-40]` to 30 hosts".into(),
        ),
        (
            "nodeset.yaml",
            "hosts:\n- host: n[5-3]\n".into(),
            ":2:11: ",
            "reversed range `5-3`".into(),
        ),
        (
            "unclosed.yaml",
            "hosts:\n- host: n[1-3\n".into(),
            ":2:10: ",
            "unclosed `[`".into(),
        ),
        (
            "missing-graph.yaml",
            "hosts:\n- host: a\n  graph: nope.yaml\n".into(),
            ":3:10: ",
            format!("({}): not found", dir.path().join("nope.yaml").display()),
        ),
        (
            "invalid-graph.yaml",
            "hosts:\n- host: a\n  graph: bad-graph.yaml\n".into(),
            "bad-graph.yaml:2:1: ",
            "invalid-graph.yaml:3:10)".into(),
        ),
        (
            "too-deep.yaml",
            deep,
            ":18:41: ",
            "`h9` is at depth 9, over the limit of 8".into(),
        ),
        (
            "jump-graph.yaml",
            "hosts:\n- host: j\n  mode: jump\n  graph: g.yaml\n  children:\n  - host: b\n".into(),
            ":4:10: ",
            "takes no `graph`".into(),
        ),
        (
            "jump-leaf.yaml",
            "hosts:\n- host: j\n  mode: jump\n".into(),
            ":3:9: ",
            "a `mode: jump` host needs `children`".into(),
        ),
        (
            "host-key.yaml",
            "hosts:\n- host: a\n  host_key: ssh-ed25519 AAAA\n".into(),
            ":3:13: ",
            "`host_key` is not an OpenSSH public key".into(),
        ),
    ];
    for (name, source, at, needle) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, source).expect("write topology");
        let out = check(&path);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: stderr {stderr:?}");
        assert!(
            out.stdout.is_empty(),
            "{name}: printed a tree for a bad file"
        );
        assert!(stderr.contains(at), "{name}: want {at:?} in {stderr:?}");
        assert!(
            stderr.contains(needle.as_str()),
            "{name}: want {needle:?} in {stderr:?}"
        );
    }
}

#[test]
fn a_missing_topology_file_exits_2() {
    let out = check(Path::new("/nonexistent/topology.yaml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/topology.yaml: No such file"));
}

#[test]
fn a_password_is_accepted_with_a_warning_naming_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pw.yaml");
    std::fs::write(&path, "hosts:\n- host: a\n  password: secret\n").expect("write");
    let out = check(&path);
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("pw.yaml:3: a password in a topology file"),
        "{stderr}"
    );
}

/// Hosts are shown as ssh_config resolves them: HostName, User, Port from the file given with
/// -F, the topology's own user and port winning, ProxyJump hops after "via".
#[test]
fn check_prints_hosts_as_ssh_config_resolves_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ssh_config");
    std::fs::write(
        &config,
        "Host web\n  HostName 10.9.0.5\n  User deploy\n  Port 2222\n\
         Host db\n  HostName 10.9.0.6\n  ProxyJump ops@bastion:2200\n\
         Host bastion\n  HostName 10.9.0.1\n\
         Host *\n  User fallback\n  StrictHostKeyChecking no\n",
    )
    .expect("write");
    let topo = dir.path().join("t.yaml");
    std::fs::write(
        &topo,
        "hosts:\n- host: web\n- host: db\n  port: 2022\n- host: other\n  user: me\n",
    )
    .expect("write");
    let out = check_with(&topo, &["-F", config.to_str().expect("utf-8")]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .take(3)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..2], ["web", "deploy@10.9.0.5:2222"], "{stdout}");
    assert_eq!(
        rows[1][..4],
        ["db", "fallback@10.9.0.6:2022", "via", "ops@10.9.0.1:2200"],
        "{stdout}"
    );
    assert_eq!(rows[2][..2], ["other", "me@other:22"], "{stdout}");
    // StrictHostKeyChecking no is reported, once, and never honoured.
    assert_eq!(
        stderr
            .matches("StrictHostKeyChecking no is not honoured")
            .count(),
        1,
        "{stderr}"
    );
}

/// A wrong ssh_config value, or a -F file that does not exist, exits 2 saying where.
#[test]
fn a_bad_ssh_config_exits_2_naming_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ssh_config");
    std::fs::write(&config, "Host *\n  Port ssh\n").expect("write");
    let topo = dir.path().join("t.yaml");
    std::fs::write(&topo, "hosts:\n- host: x\n").expect("write");
    let out = check_with(&topo, &["-F", config.to_str().expect("utf-8")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2: port ssh: not a port", config.display())),
        "{stderr}"
    );
    let out = check_with(&example("lab.yaml"), &["-F", "/nonexistent/ssh_config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/ssh_config"));
}

/// Without -F, ~/.ssh/config of the HOME arbor runs with is read.
#[test]
fn check_reads_the_users_ssh_config_by_default() {
    let home = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(home.path().join(".ssh")).expect("mkdir");
    std::fs::write(home.path().join(".ssh/config"), "Include conf.d/*\n").expect("write");
    std::fs::create_dir_all(home.path().join(".ssh/conf.d")).expect("mkdir");
    std::fs::write(
        home.path().join(".ssh/conf.d/lab"),
        "Host r1\n  HostName 10.199.0.99\n  Port 2200\n",
    )
    .expect("write");
    let topo = home.path().join("t.yaml");
    std::fs::write(&topo, "hosts:\n- host: r1\n  user: root\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["topology", "check"])
        .arg(&topo)
        .env("HOME", home.path())
        .output()
        .expect("run arbor");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.contains("root@10.199.0.99:2200"), "{stdout}");
}
