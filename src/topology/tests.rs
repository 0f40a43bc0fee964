use super::*;
use crate::wire::ChildMode;
use std::path::Path;

const GRAPH: &str = "graph: g\nresources:\n  noop:\n  - name: n\n";

/// A temp dir holding `g.yaml` (a valid graph) and `bad.yaml` (an invalid one); topologies
/// are parsed as `<dir>/t.yaml`.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("g.yaml"), GRAPH).expect("write graph");
        std::fs::write(dir.path().join("bad.yaml"), "graph: g\nresorces: {}\n")
            .expect("write bad graph");
        Dir { dir }
    }

    fn topology_path(&self) -> PathBuf {
        self.dir.path().join("t.yaml")
    }

    fn parse(&self, source: &str) -> Result<Topology, TopologyError> {
        parse(source, &self.topology_path())
    }

    fn ok(&self, source: &str) -> Topology {
        match self.parse(source) {
            Ok(t) => t,
            Err(e) => panic!("expected a valid topology, got: {e}"),
        }
    }

    /// Asserts the whole error text: `<dir>/t.yaml:line:column: message`.
    fn err_at(&self, source: &str, line: u64, column: u64, message: &str) {
        let err = match self.parse(source) {
            Ok(t) => panic!("expected {message:?}, got {t:?}"),
            Err(e) => e.to_string(),
        };
        let want = format!(
            "{}:{line}:{column}: {message}",
            self.topology_path().display()
        );
        assert_eq!(err, want);
    }
}

fn names(specs: &[ChildSpec]) -> Vec<&str> {
    specs.iter().map(|s| s.name.as_str()).collect()
}

#[test]
fn a_nodeset_entry_becomes_one_child_per_host_with_paired_names() {
    let d = Dir::new();
    let t = d.ok("hosts:\n- host: 10.1.0.[11-13]\n  name: rack1-n[01-03]\n");
    assert_eq!(names(&t.hosts), ["rack1-n01", "rack1-n02", "rack1-n03"]);
    let hosts: Vec<&str> = t.hosts.iter().map(|s| s.host.as_str()).collect();
    assert_eq!(hosts, ["10.1.0.11", "10.1.0.12", "10.1.0.13"]);
}

#[test]
fn the_name_defaults_to_the_host() {
    let d = Dir::new();
    let t = d.ok("hosts:\n- host: n[1-2]\n");
    assert_eq!(names(&t.hosts), ["n1", "n2"]);
}

#[test]
fn defaults_apply_unless_an_entry_overrides_them() {
    let d = Dir::new();
    let t = d.ok(concat!(
        "defaults:\n  user: ops\n  port: 2222\n  identity: /k\n  cconns: 5\n",
        "cconns: 32\n",
        "hosts:\n- host: a\n- host: b\n  user: root\n  port: 22\n  identity: /other\n  cconns: 1\n",
    ));
    assert_eq!(t.cconns, Some(32));
    let a = &t.hosts[0];
    assert_eq!(
        (a.user.as_str(), a.port, a.identity.as_deref(), a.cconns),
        ("ops", 2222, Some("/k"), Some(5))
    );
    let b = &t.hosts[1];
    assert_eq!(
        (b.user.as_str(), b.port, b.identity.as_deref(), b.cconns),
        ("root", 22, Some("/other"), Some(1))
    );
}

#[test]
fn without_defaults_the_user_is_the_local_user_and_the_port_22() {
    let d = Dir::new();
    let t = d.ok("hosts:\n- host: a\n");
    assert_eq!(t.hosts[0].user, crate::ssh::local_user());
    assert_eq!(t.hosts[0].port, 22);
    assert_eq!(t.hosts[0].mode, ChildMode::Relay);
    assert_eq!(t.cconns, None);
}

#[test]
fn a_graph_used_by_many_hosts_is_read_once_under_its_canonical_path() {
    let d = Dir::new();
    std::fs::create_dir(d.dir.path().join("sub")).expect("mkdir");
    let t = d.ok(concat!(
        "hosts:\n- host: r\n  graph: g.yaml\n  children:\n",
        "  - host: n[1-3]\n    graph: ./sub/../g.yaml\n",
    ));
    assert_eq!(t.graphs.len(), 1);
    let canonical = std::fs::canonicalize(d.dir.path().join("g.yaml")).expect("canonical");
    let key = canonical.display().to_string();
    assert_eq!(t.graphs[&key], (canonical, GRAPH.to_string()));
    assert_eq!(t.hosts[0].graph.as_deref(), Some(key.as_str()));
    assert!(
        t.hosts[0]
            .children
            .iter()
            .all(|c| c.graph.as_deref() == Some(key.as_str()))
    );
    assert_eq!(graph_keys(&t.hosts[0]), BTreeSet::from([key.as_str()]));
}

#[test]
fn children_nest_and_jump_hosts_carry_them() {
    let d = Dir::new();
    let t = d.ok(concat!(
        "hosts:\n- host: j\n  mode: jump\n  children:\n",
        "  - host: r\n    children:\n    - host: l[1-2]\n      graph: g.yaml\n",
    ));
    assert_eq!(t.hosts[0].mode, ChildMode::Jump);
    assert_eq!(names(&t.hosts[0].children), ["r"]);
    assert_eq!(names(&t.hosts[0].children[0].children), ["l1", "l2"]);
    assert_eq!(t.host_count(), 4);
    assert_eq!(t.max_depth(), 3);
}

#[test]
fn a_pinned_host_key_and_a_password_are_kept() {
    let d = Dir::new();
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIQSPd+K5rScxJxI5htasbNxa8l3lBJihg1AePUt3hh5";
    let t = d.ok(&format!(
        "hosts:\n- host: a\n  host_key: {key}\n  password: secret\n"
    ));
    assert_eq!(t.hosts[0].host_key.as_deref(), Some(key));
    assert_eq!(t.hosts[0].password.as_deref(), Some("secret"));
}

#[test]
fn depth_up_to_the_limit_is_accepted() {
    let d = Dir::new();
    let t = d.ok(&nested(MAX_DEPTH));
    assert_eq!(t.max_depth(), MAX_DEPTH);
}

/// Hosts h1 … h<depth>, each the only child of the one before.
fn nested(depth: usize) -> String {
    let mut s = String::from("hosts:\n");
    for i in 1..=depth {
        let pad = "  ".repeat(2 * (i - 1));
        if i > 1 {
            s.push_str(&format!("{}children:\n", "  ".repeat(2 * (i - 1) - 1)));
        }
        s.push_str(&format!("{pad}- host: h{i}\n"));
    }
    s
}

#[test]
fn the_examples_in_topology_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lab = load(
        &root.join("topology/lab.yaml"),
        &mut super::resolve::Resolver::none(),
    )
    .expect("lab.yaml is valid");
    assert_eq!(lab.host_count(), 8);
    assert_eq!(names(&lab.hosts), ["r1", "r2"]);
    assert_eq!(names(&lab.hosts[1].children), ["l2-1", "l2-2", "l2-3"]);
    assert_eq!(lab.hosts[1].children[2].host, "10.199.2.13");
    assert_eq!(lab.graphs.len(), 1);
    let dc1 = load(
        &root.join("topology/dc1.yaml"),
        &mut super::resolve::Resolver::none(),
    )
    .expect("dc1.yaml is valid");
    assert_eq!(dc1.host_count(), 44);
    assert_eq!(dc1.graphs.len(), 2);
}

// Every validation error, at its exact place.

#[test]
fn an_unknown_key_is_reported_at_the_key() {
    Dir::new().err_at(
        "hosts:\n- host: a\n  nmae: b\n",
        3,
        3,
        "unknown field `nmae`, expected one of host, name, user, port, graph, children, \
         identity, password, host_key, cconns, mode, become, become_user, seed_siblings, \
         quic_ports",
    );
    Dir::new().err_at(
        "defaults:\n  mode: jump\nhosts:\n- host: a\n",
        2,
        3,
        "unknown field `mode`, expected one of user, port, identity, password, cconns, become, \
         become_user, quic_ports",
    );
}

#[test]
fn quic_ports_come_from_the_entry_else_the_defaults() {
    let t = Dir::new()
        .parse(
            "defaults:\n  quic_ports: 60000-60010\nhosts:\n- host: a\n- host: b\n  quic_ports: 61000-61000\n",
        )
        .unwrap();
    let ports: Vec<_> = t.hosts.iter().map(|h| h.quic_ports).collect();
    assert_eq!(ports, [Some((60000, 60010)), Some((61000, 61000))]);
}

#[test]
fn a_missing_host_is_reported_at_its_entry() {
    Dir::new().err_at("hosts:\n- name: a\n", 2, 3, "missing `host`");
}

#[test]
fn missing_or_empty_hosts_are_reported() {
    let d = Dir::new();
    d.err_at("", 1, 1, "missing `hosts`: the file is empty");
    d.err_at("cconns: 3\n", 1, 1, "missing `hosts`");
    d.err_at(
        "hosts: []\n",
        1,
        8,
        "`hosts` is empty: a topology needs at least one host",
    );
}

#[test]
fn bad_types_are_reported_at_the_value() {
    let d = Dir::new();
    d.err_at(
        "hosts:\n- host: a\n  port: 70000\n",
        3,
        9,
        "port `70000` is not a number from 1 to 65535",
    );
    d.err_at(
        "hosts:\n- host: a\n  cconns: many\n",
        3,
        11,
        "cconns `many` is not a count (0 for no limit)",
    );
    d.err_at(
        "hosts:\n- host: a\n  quic_ports: 9000-8000\n",
        3,
        15,
        "quic_ports \"9000-8000\": expected FIRST-LAST, two UDP ports (1-65535), FIRST <= LAST",
    );
    d.err_at("hosts:\n- host: [a]\n", 2, 9, "expected string scalar");
    d.err_at(
        "hosts:\n- host: a\n  mode: proxy\n",
        3,
        9,
        "mode `proxy` is not one of: relay, jump",
    );
}

#[test]
fn a_duplicate_name_names_both_places() {
    let d = Dir::new();
    let first = format!("{}:2:9", d.topology_path().display());
    d.err_at(
        "hosts:\n- host: n[1-3]\n- host: x\n  children:\n  - host: n2\n",
        5,
        11,
        &format!("duplicate name n2 (also at {first})"),
    );
    let first = format!("{}:3:9", d.topology_path().display());
    d.err_at(
        "hosts:\n- host: 10.0.0.[1-2]\n  name: rack1-n[06-07]\n- host: 10.0.1.7\n  name: rack1-n07\n",
        5,
        9,
        &format!("duplicate name rack1-n07 (also at {first})"),
    );
}

#[test]
fn a_name_nodeset_of_another_size_gives_both_sizes() {
    Dir::new().err_at(
        "hosts:\n- host: 10.1.0.[11-40]\n  name: rack1-n[01-29]\n",
        3,
        9,
        "`name` `rack1-n[01-29]` expands to 29 names but `host` `10.1.0.[11-40]` to 30 hosts: \
         they must pair up",
    );
}

#[test]
fn bad_nodeset_syntax_points_at_the_offending_character() {
    let d = Dir::new();
    d.err_at(
        "hosts:\n- host: n[1-3\n",
        2,
        10,
        "bad nodeset `n[1-3`: unclosed `[`",
    );
    // Quoted: one column further for the quote.
    d.err_at(
        "hosts:\n- host: \"n[3-1]\"\n",
        2,
        12,
        "bad nodeset `n[3-1]`: reversed range `3-1`",
    );
    d.err_at(
        "hosts:\n- host: a\n  name: b[x-]\n",
        3,
        13,
        "bad nodeset `b[x-]`: `x-` has no upper bound",
    );
    d.err_at(
        "hosts:\n- host: \"[fd00::1]\"\n",
        2,
        10,
        "bad nodeset `[fd00::1]`: an IPv6 address is written without brackets and cannot be a \
         nodeset",
    );
}

#[test]
fn a_missing_graph_file_names_the_resolved_path() {
    let d = Dir::new();
    let resolved = d.dir.path().join("nope.yaml");
    d.err_at(
        "hosts:\n- host: a\n  graph: nope.yaml\n",
        3,
        10,
        &format!("graph file `nope.yaml` ({}): not found", resolved.display()),
    );
}

#[test]
fn an_invalid_graph_file_gives_the_graphs_own_error_and_where_it_is_named() {
    let d = Dir::new();
    let err = d
        .parse("hosts:\n- host: a\n  graph: bad.yaml\n")
        .expect_err("bad graph")
        .to_string();
    let graph = std::fs::canonicalize(d.dir.path().join("bad.yaml")).expect("canonical");
    assert_eq!(
        err,
        format!(
            "{}:2:1: unknown field `resorces`, expected one of graph, comment, remote, \
             resources, collect, edges (graph named at {}:3:10)",
            graph.display(),
            d.topology_path().display()
        )
    );
}

#[test]
fn depth_over_the_limit_is_reported_at_the_deepest_host() {
    let src = nested(MAX_DEPTH + 1);
    let line = src.lines().count() as u64;
    Dir::new().err_at(&src, line, 41, "`h9` is at depth 9, over the limit of 8");
}

#[test]
fn a_jump_host_takes_children_but_no_graph() {
    let d = Dir::new();
    d.err_at(
        "hosts:\n- host: a\n  mode: jump\n  graph: g.yaml\n  children:\n  - host: b\n",
        4,
        10,
        "a `mode: jump` host only forwards TCP and runs nothing, so it takes no `graph`",
    );
    d.err_at(
        "hosts:\n- host: a\n  mode: jump\n",
        3,
        9,
        "a `mode: jump` host needs `children`: it is only a hop on the way to them",
    );
    d.err_at(
        "hosts:\n- host: a\n  mode: jump\n  children: []\n",
        3,
        9,
        "a `mode: jump` host needs `children`: it is only a hop on the way to them",
    );
}

#[test]
fn children_under_a_nodeset_of_several_hosts_are_refused() {
    Dir::new().err_at(
        "hosts:\n- host: a[1-2]\n  children:\n  - host: b\n",
        2,
        9,
        "`host` `a[1-2]` expands to 2 hosts, but an entry with `children` needs a single host \
         (names under it would repeat)",
    );
}

#[test]
fn a_bad_pinned_host_key_is_reported_at_the_value() {
    Dir::new().err_at(
        "hosts:\n- host: a\n  host_key: ssh-ed25519 AAAA\n",
        3,
        13,
        "`host_key` is not an OpenSSH public key (\"type base64\"): length invalid",
    );
}

#[test]
fn a_name_with_a_slash_is_refused() {
    Dir::new().err_at(
        "hosts:\n- host: a\n  name: a/b\n",
        3,
        9,
        "name `a/b` contains `/`, which separates names in host paths",
    );
}

#[test]
fn become_is_set_per_host_or_in_defaults_and_checked() {
    let t = Dir::new().ok(
        "defaults:\n  become: true\nhosts:\n- host: a\n- host: b\n  become: false\n\
         - host: j\n  mode: jump\n  children:\n  - host: c\n    become_user: root\n",
    );
    let become_of = |s: &crate::wire::ChildSpec| s.escalate.as_ref().map(|b| b.user.clone());
    assert_eq!(become_of(&t.hosts[0]).as_deref(), Some("root"));
    assert_eq!(become_of(&t.hosts[1]), None);
    // A jump host runs nothing: `become` from the defaults passes it by.
    assert_eq!(become_of(&t.hosts[2]), None);
    assert_eq!(become_of(&t.hosts[2].children[0]).as_deref(), Some("root"));
    Dir::new().err_at(
        "hosts:\n- host: a\n  become: yes\n",
        3,
        11,
        "become `yes` is not true or false",
    );
    Dir::new().err_at(
        "hosts:\n- host: a\n  become_user: root\n",
        3,
        16,
        "`become_user` without `become: true` would do nothing",
    );
    Dir::new().err_at(
        "hosts:\n- host: a\n  become: true\n  become_user: deploy\n",
        4,
        16,
        "become_user `deploy`: only root is supported (arbor's working dir, store socket and \
         forwarded agent are reachable by the login user and root only; docs/topology.md)",
    );
    Dir::new().err_at(
        "hosts:\n- host: j\n  mode: jump\n  become: true\n  children:\n  - host: c\n",
        4,
        11,
        "a `mode: jump` host runs nothing, so it has nothing to `become` for",
    );
}

#[test]
fn seed_siblings_marks_the_children_of_its_host_or_of_the_initiator() {
    let t = Dir::new().ok(
        "seed_siblings: true\nhosts:\n- host: r1\n  seed_siblings: true\n  children:\n  \
         - host: l[1-2]\n- host: r2\n  children:\n  - host: m1\n",
    );
    let seeds = |s: &[ChildSpec]| s.iter().map(|c| c.seed_siblings).collect::<Vec<_>>();
    assert_eq!(seeds(&t.hosts), [true, true]);
    assert_eq!(seeds(&t.hosts[0].children), [true, true]);
    assert_eq!(seeds(&t.hosts[1].children), [false]);
    assert_eq!(seeds(&Dir::new().ok("hosts:\n- host: a\n").hosts), [false]);
    Dir::new().err_at(
        "seed_siblings: yes\nhosts:\n- host: a\n",
        1,
        16,
        "seed_siblings `yes` is not true or false",
    );
    Dir::new().err_at(
        "hosts:\n- host: a\n  seed_siblings: true\n",
        3,
        18,
        "`seed_siblings` on a host without `children` would do nothing: it says that this \
         host's children can reach each other",
    );
}
