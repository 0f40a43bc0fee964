use super::*;
use crate::engine::resources::{
    AccountState, FileState, GroupSpec, Kind, Meta, PkgState, ResourceId, ResourceSpec,
    SkipCmpStyle, SvcStartup, SvcState,
};

fn ok(src: &str) -> Graph {
    match parse(src, Path::new("g.yaml"), "h1") {
        Ok(g) => g,
        Err(e) => panic!("expected a valid graph, got: {e}"),
    }
}

/// Asserts the error is `g.yaml:line:col: ...` and contains `needle`.
fn err_at(src: &str, line: u64, column: u64, needle: &str) {
    let err = match parse(src, Path::new("g.yaml"), "h1") {
        Ok(_) => panic!("expected an error containing {needle:?}"),
        Err(e) => e.to_string(),
    };
    let prefix = format!("g.yaml:{line}:{column}: ");
    assert!(
        err.starts_with(&prefix),
        "want prefix {prefix:?}, got {err:?}"
    );
    assert!(err.contains(needle), "want {needle:?} in {err:?}");
}

#[test]
fn the_articles_graphs_parse_unchanged() {
    let a = ok(include_str!("../../../examples/remote2a.yaml"));
    assert_eq!(a.name, "mygraph");
    assert_eq!(
        a.remote.as_deref(),
        Some("ssh://root:vagrant@192.168.121.201:22")
    );
    assert_eq!(a.resources.len(), 1);
    assert_eq!(a.resources[0].id(), ResourceId::new(Kind::File, "file1a"));
    assert_eq!(a.exports.len(), 1);
    match &a.exports[0] {
        ResourceSpec::File(f) => {
            assert_eq!(f.name, "file2a");
            assert_eq!(f.path, Path::new("/tmp/file2a"));
            assert_eq!(
                f.content.as_deref(),
                Some("i am file2a, exported from host a\n")
            );
            assert_eq!(f.state, FileState::Exists);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        a.collect,
        vec![Collect {
            kind: Kind::File,
            pattern: Some(PathBuf::from("/tmp/")),
            ..Collect::default()
        }]
    );
    assert!(a.edges.is_empty());
    let b = ok(include_str!("../../../examples/remote2b.yaml"));
    assert_eq!(b.exports[0].name(), "file2b");
}

#[test]
fn the_local_example_parses_with_edges_and_notify() {
    let g = ok(include_str!("../../../examples/local.yaml"));
    assert_eq!(g.edges.len(), 2);
    assert!(g.edges[1].notify);
    match &g.resources.iter().find(|r| r.kind() == Kind::File) {
        Some(ResourceSpec::File(f)) => {
            assert_eq!(f.mode, Some(0o644));
            assert_eq!(f.content.as_deref(), Some("greeting = hello from h1\n"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn hostname_expands_in_names_paths_and_content() {
    let g = ok(r#"
graph: g
resources:
  file:
  - name: "@@from-{{hostname}}"
    path: "/tmp/from-{{hostname}}"
    content: "{{hostname}}\n"
"#);
    match &g.exports[0] {
        ResourceSpec::File(f) => {
            assert_eq!(f.name, "from-h1");
            assert_eq!(f.path, Path::new("/tmp/from-h1"));
            assert_eq!(f.content.as_deref(), Some("h1\n"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn an_unknown_top_level_key_is_an_error_at_the_key() {
    err_at("graph: g\nresorces: {}\n", 2, 1, "resorces");
}

#[test]
fn an_unknown_resource_key_is_an_error_at_the_key() {
    err_at(
        "graph: g\nresources:\n  file:\n  - name: a\n    path: /tmp/a\n    ownr: root\n",
        6,
        5,
        "ownr",
    );
}

#[test]
fn an_unknown_resource_kind_is_an_error() {
    err_at("graph: g\nresources:\n  cron: []\n", 3, 3, "cron");
}

#[test]
fn a_missing_graph_is_an_error() {
    err_at("comment: no name\nresources: {}\n", 1, 1, "missing `graph`");
    err_at("", 1, 1, "missing `graph`");
}

#[test]
fn an_empty_graph_name_is_an_error_at_the_value() {
    err_at("graph: \"\"\n", 1, 8, "must not be empty");
}

#[test]
fn duplicate_names_within_a_kind_are_an_error_at_the_second() {
    let src = "graph: g\nresources:\n  file:\n  - name: a\n    path: /tmp/a\n  - name: \"@@a\"\n    path: /tmp/b\n";
    err_at(
        src,
        6,
        11,
        "duplicate file name `a` (first declared at line 4, column 11)",
    );
}

#[test]
fn the_same_name_in_two_kinds_is_fine() {
    let g =
        ok("graph: g\nresources:\n  noop:\n  - name: a\n  exec:\n  - name: a\n    cmd: \"true\"\n");
    assert_eq!(g.resources.len(), 2);
}

#[test]
fn a_relative_path_is_an_error_at_the_path() {
    err_at(
        "graph: g\nresources:\n  file:\n  - name: a\n    path: tmp/a\n",
        5,
        11,
        "relative",
    );
    err_at(
        "graph: g\ncollect:\n- kind: file\n  pattern: tmp/\n",
        4,
        12,
        "relative",
    );
}

#[test]
fn a_bad_state_or_mode_is_an_error_at_the_value() {
    err_at(
        "graph: g\nresources:\n  file:\n  - name: a\n    path: /tmp/a\n    state: present\n",
        6,
        12,
        "state `present`",
    );
    err_at(
        "graph: g\nresources:\n  file:\n  - name: a\n    path: /tmp/a\n    mode: \"0999\"\n",
        6,
        11,
        "mode",
    );
}

#[test]
fn an_edge_naming_a_missing_resource_is_an_error_at_the_name() {
    let src = "graph: g\nresources:\n  noop:\n  - name: a\nedges:\n- name: e\n  from: {kind: noop, name: a}\n  to: {kind: noop, name: b}\n";
    err_at(src, 8, 26, "noop[b], which is not in the graph");
}

#[test]
fn an_edge_naming_an_exported_resource_is_an_error() {
    let src = "graph: g\nresources:\n  noop:\n  - name: a\n  - name: \"@@b\"\nedges:\n- name: e\n  from: {kind: noop, name: a}\n  to: {kind: noop, name: \"@@b\"}\n";
    err_at(src, 9, 26, "exported");
}

#[test]
fn an_edge_with_an_unknown_kind_is_an_error_at_the_kind() {
    let src = "graph: g\nresources:\n  noop:\n  - name: a\nedges:\n- name: e\n  from: {kind: cron, name: a}\n  to: {kind: noop, name: a}\n";
    err_at(src, 7, 16, "unknown resource kind `cron`");
}

#[test]
fn a_cycle_is_an_error_naming_every_resource_in_it() {
    let src = "\
graph: g
resources:
  noop:
  - name: a
  - name: b
  - name: c
  - name: d
edges:
- name: d-a
  from: {kind: noop, name: d}
  to: {kind: noop, name: a}
- name: a-b
  from: {kind: noop, name: a}
  to: {kind: noop, name: b}
- name: b-c
  from: {kind: noop, name: b}
  to: {kind: noop, name: c}
- name: c-a
  from: {kind: noop, name: c}
  to: {kind: noop, name: a}
";
    err_at(
        src,
        12,
        9,
        "cycle: noop[a] -> noop[b] -> noop[c] -> noop[a]",
    );
}

#[test]
fn a_self_edge_is_a_cycle() {
    let src = "graph: g\nresources:\n  noop:\n  - name: a\nedges:\n- name: loop\n  from: {kind: noop, name: a}\n  to: {kind: noop, name: a}\n";
    err_at(src, 6, 9, "cycle: noop[a] -> noop[a]");
}

#[test]
fn a_missing_required_field_is_an_error_with_a_location() {
    let err = parse(
        "graph: g\nresources:\n  file:\n  - name: a\n",
        Path::new("g.yaml"),
        "h1",
    )
    .expect_err("path is required");
    let msg = err.to_string();
    assert!(msg.starts_with("g.yaml:") && msg.contains("path"), "{msg}");
}

#[test]
fn reading_a_missing_file_names_it() {
    let err = load(Path::new("/nonexistent/g.yaml"), "h1").expect_err("no file");
    assert!(err.to_string().contains("/nonexistent/g.yaml"));
}

#[test]
fn collecting_a_kind_twice_is_an_error() {
    err_at(
        "graph: g\ncollect:\n- kind: file\n  pattern: /a/\n- kind: file\n  pattern: /tmp/\n",
        5,
        9,
        "twice",
    );
}

#[test]
fn collecting_files_without_a_pattern_is_an_error() {
    err_at(
        "graph: g\ncollect:\n- kind: file\n",
        3,
        9,
        "needs a `pattern`",
    );
}

#[test]
fn collecting_exec_needs_an_explicit_opt_in() {
    err_at(
        "graph: g\ncollect:\n- kind: exec\n",
        3,
        9,
        "allow_commands: true",
    );
    let g = ok("graph: g\ncollect:\n- kind: exec\n  allow_commands: true\n");
    assert!(g.collect[0].allow_commands);
}

/// Every field arbor supports from mgmt's format, in one graph.
const EVERY_SUPPORTED_FIELD: &str = r#"graph: parity
comment: every supported field
resources:
  noop:
  - name: n
    comment: a join point
    meta: {autoedge: true, autogroup: false, dollar: false, realize: false, hidden: false, export: []}
  file:
  - name: f
    path: /srv/old/f.conf
    dirname: /etc/app/
    basename: app.conf
    content: "x\n"
    state: exists
    mode: "0640"
    owner: root
    group: "0"
    force: false
    recurse: false
    purge: false
    symlink: false
    meta:
      noop: true
      retry: -1
      retryreset: true
      delay: 250
      timeout: 5000
      poll: 30
      limit: 2.5
      burst: 3
      reset: true
      sema: ["disk", "net:2"]
      rewatch: true
      autoedge: false
      autogroup: true
  - name: /srv/by-name
  exec:
  - name: e
    cmd: /usr/bin/install
    args: ["-d", "/srv/x"]
    cwd: /srv
    env: {LANG: C, PATH_X: "/bin"}
    user: daemon
    group: daemon
    timeout: 9
    ifcmd: "test -d /srv"
    ifcwd: /
    ifshell: /bin/bash
    nifcmd: "test -d /srv/x"
    nifcwd: /
    nifshell: /bin/sh
    creates: /srv/x/.done
    donecmd: "touch /srv/x/.done"
    donecwd: /srv
    doneshell: /bin/sh
    watchcmd: "inotifywait -m /srv"
    watchcwd: /
    watchshell: /bin/sh
    meta: {retry: 2, delay: 100, limit: .inf}
  - name: "echo named"
  timer:
  - name: t
    interval: 30
    meta: {limit: .inf}
  kv:
  - name: k
    key: stage
    value: "3"
    mapped: true
    skiplessthan: true
    skipcmpstyle: 0
    meta: {retry: 1}
  - name: gone
collect:
- kind: noop
  pattern: ""
"#;

#[test]
fn every_supported_mgmt_field_parses_with_its_meaning() {
    use crate::engine::resources::exec::Aux;
    use crate::engine::resources::meta::Rate;
    let g = ok(EVERY_SUPPORTED_FIELD);
    let file = |name: &str| match g.resources.iter().find(|r| r.name() == name) {
        Some(ResourceSpec::File(f)) => f.clone(),
        other => panic!("{other:?}"),
    };
    let exec = |name: &str| match g.resources.iter().find(|r| r.name() == name) {
        Some(ResourceSpec::Exec(e)) => e.clone(),
        other => panic!("{other:?}"),
    };
    let f = file("f");
    assert_eq!(f.path, Path::new("/etc/app/app.conf"));
    assert_eq!(f.mode, Some(0o640));
    assert_eq!(
        (f.owner.as_deref(), f.group.as_deref()),
        (Some("root"), Some("0"))
    );
    let m = &f.meta;
    assert!(m.noop && m.retry_reset && m.rewatch && m.reset);
    assert_eq!((m.retry, m.delay, m.timeout, m.poll), (-1, 250, 5000, 30));
    assert_eq!((m.limit, m.burst), (Some(Rate(2.5)), 3));
    assert_eq!(m.sema, vec!["disk".to_string(), "net:2".to_string()]);
    // A missing path is the name, as in mgmt.
    assert_eq!(file("/srv/by-name").path, Path::new("/srv/by-name"));

    let e = exec("e");
    assert_eq!(e.cmd, "/usr/bin/install");
    assert_eq!(e.args, vec!["-d".to_string(), "/srv/x".to_string()]);
    assert_eq!(e.cwd.as_deref(), Some(Path::new("/srv")));
    assert_eq!(e.env.as_ref().map(|v| v["LANG"].as_str()), Some("C"));
    assert_eq!(
        (e.user.as_deref(), e.group.as_deref()),
        (Some("daemon"), Some("daemon"))
    );
    assert_eq!(
        e.ifcmd,
        Some(Aux {
            cmd: "test -d /srv".into(),
            shell: Some("/bin/bash".into()),
            cwd: Some("/".into()),
        })
    );
    assert_eq!(
        e.nifcmd.as_ref().map(|a| a.cmd.as_str()),
        Some("test -d /srv/x")
    );
    assert_eq!(e.creates.as_deref(), Some(Path::new("/srv/x/.done")));
    assert_eq!(
        e.donecmd.as_ref().and_then(|a| a.cwd.as_deref()),
        Some(Path::new("/srv"))
    );
    assert_eq!(
        e.watchcmd.as_ref().and_then(|a| a.shell.as_deref()),
        Some("/bin/sh")
    );
    assert_eq!((e.meta.retry, e.meta.limit), (2, None));
    // A missing cmd is the name, as in mgmt.
    assert_eq!(exec("echo named").cmd, "echo named");
    assert_eq!(g.collect[0].pattern, None);

    let find = |kind: Kind, name: &str| {
        g.resources
            .iter()
            .find(|r| r.id() == ResourceId::new(kind, name))
            .cloned()
    };
    let Some(ResourceSpec::Timer(t)) = find(Kind::Timer, "t") else {
        panic!("no timer t");
    };
    assert_eq!(t.interval, 30);
    let Some(ResourceSpec::Kv(k)) = find(Kind::Kv, "k") else {
        panic!("no kv k");
    };
    assert_eq!(
        (k.key.as_str(), k.value.as_deref(), k.skiplessthan),
        ("stage", Some("3"), true)
    );
    assert_eq!(k.skipcmpstyle, SkipCmpStyle::Int);
    assert_eq!(k.meta.retry, 1);
    // As in mgmt: a missing key is the name, a missing value deletes the key.
    let Some(ResourceSpec::Kv(gone)) = find(Kind::Kv, "gone") else {
        panic!("no kv gone");
    };
    assert_eq!((gone.key.as_str(), gone.value), ("gone", None));
}

#[test]
fn mgmts_kv_examples_parse_with_their_meaning() {
    // examples/yaml/kv1.yaml to kv4.yaml in mgmt's repository, as they are there.
    let kv = |g: &Graph, name: &str| match g.resources.iter().find(|r| r.name() == name) {
        Some(ResourceSpec::Kv(k)) => k.clone(),
        other => panic!("{other:?}"),
    };
    let g = ok(
        "---\ngraph: mygraph\nresources:\n  kv:\n  - name: kv1\n    key: \"hello\"\n    value: \"world\"\nedges: []\n",
    );
    assert_eq!(kv(&g, "kv1").value.as_deref(), Some("world"));
    let g = ok(
        "---\ngraph: mygraph\nresources:\n  kv:\n  - name: kv1\n    key: \"iamdeleted\"\nedges: []\n",
    );
    assert_eq!(kv(&g, "kv1").value, None);
    let g = ok(
        "---\ngraph: mygraph\nresources:\n  kv:\n  - name: kv1\n    key: \"stage\"\n    value: \"3\"\n    skiplessthan: true\nedges: []\n",
    );
    assert!(kv(&g, "kv1").skiplessthan);
    let mut kv4 = String::from("---\ngraph: mygraph\nresources:\n  kv:\n");
    for n in 1..=3 {
        kv4.push_str(&format!(
            "  - name: kv{n}\n    key: \"stage\"\n    value: \"{n}\"\n    skiplessthan: true\n"
        ));
    }
    kv4.push_str("edges:\n");
    for (e, from, to) in [(1, 1, 2), (2, 2, 3)] {
        kv4.push_str(&format!(
            "- name: e{e}\n  from:\n    kind: kv\n    name: kv{from}\n  to:\n    kind: kv\n    name: kv{to}\n"
        ));
    }
    let g = ok(&kv4);
    assert_eq!(kv(&g, "kv3").value.as_deref(), Some("3"));
    assert_eq!(g.edges[1].to, ResourceId::new(Kind::Kv, "kv3"));
    // Strings compared as strings; a number is its text; the hostname expands; an exported
    // kv's key is its name without `@@`.
    let g = ok(
        "graph: g\nresources:\n  kv:\n  - name: a\n    value: 7\n  - name: \"{{hostname}}-b\"\n    value: \"up on {{hostname}}\"\n    skiplessthan: true\n    skipcmpstyle: 1\n  - name: \"@@shared\"\n    value: x\n",
    );
    assert_eq!(kv(&g, "a").value.as_deref(), Some("7"));
    let b = kv(&g, "h1-b");
    assert_eq!(
        (b.key.as_str(), b.value.as_deref(), b.skipcmpstyle),
        ("h1-b", Some("up on h1"), SkipCmpStyle::String)
    );
    match &g.exports[0] {
        ResourceSpec::Kv(k) => assert_eq!((k.name.as_str(), k.key.as_str()), ("shared", "shared")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_timer_and_kv_fields_are_errors_at_their_place() {
    let timer = |fields: &str| format!("graph: g\nresources:\n  timer:\n  - name: t\n{fields}");
    err_at(&timer("    intervall: 3\n"), 5, 5, "intervall");
    err_at(&timer(""), 4, 11, "timer needs an `interval`");
    err_at(&timer("    interval: 0\n"), 5, 15, "at least 1 second");
    let e = parse(&timer("    interval: -2\n"), Path::new("g.yaml"), "h1")
        .expect_err("negative")
        .to_string();
    assert!(e.starts_with("g.yaml:5:"), "{e}");
    let kv = |fields: &str| format!("graph: g\nresources:\n  kv:\n  - name: k\n{fields}");
    err_at(&kv("    vaule: x\n"), 5, 5, "vaule");
    err_at(&kv("    key: \"\"\n"), 5, 10, "kv key must not be empty");
    err_at(
        &kv("    value: x\n    skiplessthan: true\n    skipcmpstyle: 2\n"),
        7,
        19,
        "skipcmpstyle 2 is not 0",
    );
    err_at(
        &kv("    value: three\n    skiplessthan: true\n"),
        4,
        11,
        "kv value `three` is not an integer",
    );
    // As mgmt: the style is checked only when it is used, a non-integer only when compared
    // as one.
    ok(&kv("    value: three\n    skipcmpstyle: 7\n"));
    ok(&kv(
        "    value: three\n    skiplessthan: true\n    skipcmpstyle: 1\n",
    ));
    err_at(
        "graph: g\ncollect:\n- kind: kv\n",
        3,
        9,
        "not supported: collecting kv",
    );
    ok("graph: g\ncollect:\n- kind: timer\n");
}

#[test]
fn pkg_and_svc_parse_with_mgmts_defaults_and_meaning() {
    let g = parse(
        "graph: g\nresources:\n  pkg:\n  - name: hello\n  - name: cowsay\n    state: \
         uninstalled\n  - name: tree\n    state: newest\n    allownonfree: true\n  - name: \
         jq\n    state: 1.6-2.1\n    allowdowngrade: true\n    allowuntrusted: true\n    \
         allowunsupported: true\n  - name: local\n    source: debs/local_1.0_all.deb\n  \
         svc:\n  - name: web\n    state: running\n    startup: enabled\n  - name: \
         db\n    state: stopped\n    startup: disabled\n    session: false\n  - name: \
         other\n    state: \"\"\nedges:\n- name: e\n  from: {kind: pkg, name: hello}\n  \
         to: {kind: svc, name: web}\n  notify: true\n",
        Path::new("g.yaml"),
        "h1",
    )
    .expect("valid");
    let pkg = |name: &str| {
        g.resources
            .iter()
            .find_map(|r| match r {
                ResourceSpec::Pkg(p) if p.name == name => Some(p.clone()),
                _ => None,
            })
            .expect(name)
    };
    assert_eq!(pkg("hello").state, PkgState::Installed);
    assert_eq!(pkg("cowsay").state, PkgState::Uninstalled);
    assert!(pkg("tree").state == PkgState::Newest && pkg("tree").allownonfree);
    let jq = pkg("jq");
    assert_eq!(jq.state, PkgState::Version("1.6-2.1".into()));
    assert!(jq.allowdowngrade && jq.allowuntrusted && !jq.allownonfree);
    assert_eq!(
        pkg("local").source.as_deref(),
        Some("debs/local_1.0_all.deb")
    );
    assert_eq!(g.sources.len(), 1);
    assert_eq!(g.sources[0].source, "debs/local_1.0_all.deb");
    let svc = |name: &str| {
        g.resources
            .iter()
            .find_map(|r| match r {
                ResourceSpec::Svc(s) if s.name == name => Some(s.clone()),
                _ => None,
            })
            .expect(name)
    };
    assert_eq!(
        (svc("web").state, svc("web").startup),
        (Some(SvcState::Running), Some(SvcStartup::Enabled))
    );
    assert_eq!(
        (svc("db").state, svc("db").startup),
        (Some(SvcState::Stopped), Some(SvcStartup::Disabled))
    );
    assert_eq!((svc("other").state, svc("other").startup), (None, None));
    assert!(g.edges[0].notify && g.edges[0].to.kind == Kind::Svc);
}

#[test]
fn a_file_writing_a_services_unit_gets_mgmts_automatic_edge_to_the_svc() {
    let g = ok(
        "graph: g\nresources:\n  file:\n  - name: /etc/systemd/system/web.service\n    \
                content: x\n  - name: /usr/lib/systemd/system/db.service\n    content: x\n    \
                meta: {autoedge: false}\n  - name: /etc/systemd/system/other.service\n    \
                content: x\n  svc:\n  - name: web\n  - name: db\n  - name: other\n\
                edges:\n- name: back\n  from: {kind: svc, name: other}\n  to: {kind: file, \
                name: /etc/systemd/system/other.service}\n",
    );
    let autos: Vec<String> = g
        .edges
        .iter()
        .filter(|e| e.name.starts_with("autoedge"))
        .map(|e| format!("{} -> {} {}", e.from, e.to, e.notify))
        .collect();
    // db turned it off; other has an edge the other way already (another would be a cycle).
    assert_eq!(
        autos,
        ["file[/etc/systemd/system/web.service] -> svc[web] false"]
    );
}

#[test]
fn mgmts_pkg_and_svc_examples_parse_with_their_meaning_or_are_refused_by_name() {
    // examples/yaml/pkg1.yaml, pkg2.yaml, svc1.yaml and svc2.yaml in mgmt's repository.
    for (state, want) in [
        ("installed", PkgState::Installed),
        ("uninstalled", PkgState::Uninstalled),
    ] {
        let g = ok(&format!(
            "---\ngraph: mygraph\nresources:\n  pkg:\n  - name: powertop\n    state: \
             {state}\nedges: []\n"
        ));
        assert!(
            matches!(&g.resources[0], ResourceSpec::Pkg(p) if p.name == "powertop" && p.state == want)
        );
    }
    let g = ok(
        "---\ngraph: mygraph\nresources:\n  noop:\n  - name: noop1\n  file:\n  - name: \
                file1\n    path: \"/tmp/mgmt/f1\"\n    content: |\n      i am f1\n    state: \
                exists\n  svc:\n  - name: purpleidea\n    state: running\n    startup: \
                enabled\nedges:\n- name: e1\n  from:\n    kind: noop\n    name: noop1\n  to:\n    \
                kind: file\n    name: file1\n- name: e2\n  from:\n    kind: file\n    name: \
                file1\n  to:\n    kind: svc\n    name: purpleidea\n",
    );
    assert!(g.resources.iter().any(|r| matches!(r, ResourceSpec::Svc(s)
        if s.name == "purpleidea"
            && s.state == Some(SvcState::Running)
            && s.startup == Some(SvcStartup::Enabled))));
    assert_eq!(g.edges.len(), 2);
    err_at(
        "---\ngraph: mygraph\nresources:\n  svc:\n  - name: purpleidea\n    state: running\n    \
         session: true\nedges: []\n",
        7,
        14,
        "not supported: svc session: true",
    );
}

#[test]
fn bad_pkg_and_svc_fields_are_errors_at_their_place() {
    let pkg = |fields: &str| format!("graph: g\nresources:\n  pkg:\n  - name: hello\n{fields}");
    err_at(&pkg("    state: latest\n"), 5, 12, "did you mean `newest`");
    err_at(&pkg("    state: \"\"\n"), 5, 12, "must not be empty");
    err_at(
        &pkg("    state: present\n"),
        5,
        12,
        "is not installed, uninstalled",
    );
    err_at(&pkg("    stat: installed\n"), 5, 5, "stat");
    err_at(
        &pkg("    allowunsupported: false\n"),
        5,
        23,
        "not supported: pkg allowunsupported: false",
    );
    err_at(
        &pkg("    state: uninstalled\n    source: a.deb\n"),
        6,
        13,
        "`source` on a pkg with `state: uninstalled`",
    );
    err_at(
        &pkg("    state: newest\n    source: a.deb\n"),
        6,
        13,
        "a .deb is one version",
    );
    err_at(
        "graph: g\nresources:\n  pkg:\n  - name: --purge\n",
        4,
        11,
        "not a Debian package name",
    );
    err_at(
        "graph: g\nresources:\n  pkg:\n  - name: \"@@xy\"\n    source: a.deb\n",
        5,
        13,
        "not supported: `source` on an exported pkg",
    );
    let svc = |fields: &str| format!("graph: g\nresources:\n  svc:\n  - name: web\n{fields}");
    err_at(
        &svc("    state: started\n"),
        5,
        12,
        "not one of: running, stopped",
    );
    err_at(
        &svc("    startup: boot\n"),
        5,
        14,
        "not one of: enabled, disabled",
    );
    err_at(
        &svc("    session: true\n"),
        5,
        14,
        "not supported: svc session: true",
    );
    err_at(
        "graph: g\nresources:\n  svc:\n  - name: web.service\n",
        4,
        11,
        "the unit without `.service`",
    );
    err_at(
        "graph: g\nresources:\n  svc:\n  - name: a/b\n",
        4,
        11,
        "not a systemd unit name",
    );
    for kind in ["pkg", "svc"] {
        err_at(
            &format!("graph: g\ncollect:\n- kind: {kind}\n"),
            3,
            9,
            &format!("not supported: collecting {kind}"),
        );
    }
}

#[test]
fn fields_arbor_cannot_honour_are_refused_by_name_and_place() {
    let file = |field: &str| {
        format!("graph: g\nresources:\n  file:\n  - name: f\n    path: /f\n    {field}\n")
    };
    for (field, needle) in [
        ("force: true", "not supported: file force: true"),
        ("symlink: true", "not supported: file symlink: true"),
        ("fragments: [/a]", "not supported: file fragments"),
        ("selinux: x", "not supported: file selinux"),
        ("meta: {realize: true}", "not supported: meta.realize: true"),
        ("meta: {hidden: true}", "not supported: meta.hidden: true"),
        ("meta: {export: [\"*\"]}", "not supported: meta.export"),
        ("meta: {limit: 0, burst: 1}", "not supported: meta.limit"),
    ] {
        let column = 5 + field.find(':').map_or(0, |i| i as u64 + 2);
        let column = if field.starts_with("meta") {
            column + field[field.find('{').unwrap() + 1..].find(':').unwrap() as u64 + 3
        } else {
            column
        };
        err_at(&file(field), 6, column, needle);
    }
    let exec = |field: &str| {
        format!("graph: g\nresources:\n  exec:\n  - name: e\n    cmd: x\n    {field}\n")
    };
    for (field, needle) in [
        ("watchfiles: [/a]", "not supported: exec watchfiles"),
        ("mtimes: [/a]", "not supported: exec mtimes"),
        ("ifequals: x", "not supported: exec ifequals"),
        ("ifequals_stdout: x", "not supported: exec ifequals_stdout"),
        ("sig: SIGINT", "not supported: exec sig"),
        ("send_output: x", "not supported: exec send_output"),
    ] {
        let column = 5 + field.find(':').unwrap() as u64 + 2;
        err_at(&exec(field), 6, column, needle);
    }
    err_at(
        "graph: g\nresources:\n  noop:\n  - name: n\n    meta: {autogroup: true}\n",
        5,
        23,
        "not supported: meta.autogroup: true on a noop",
    );
    err_at(
        "graph: g\ncollect:\n- kind: file\n  pattern: \"\"\n",
        4,
        12,
        "not supported: an empty collect `pattern` for files",
    );
}

#[test]
fn bad_metaparam_and_exec_values_are_errors() {
    let exec = |extra: &str| {
        format!("graph: g\nresources:\n  exec:\n  - name: e\n    cmd: x\n    {extra}\n")
    };
    err_at(&exec("meta: {retry: -2}"), 6, 19, "meta.retry");
    err_at(&exec("meta: {poll: -5}"), 6, 18, "meta.poll");
    err_at(&exec("meta: {limit: 3}"), 6, 19, "burst");
    err_at(&exec("meta: {sema: [\"4\"]}"), 6, 19, "meta.sema");
    err_at(&exec("meta: {colour: red}"), 6, 12, "colour");
    err_at(
        &exec("args: [a]\n    shell: /bin/sh"),
        6,
        11,
        "`args` cannot be used with a `shell`",
    );
    err_at(
        &exec("env: {\"1X\": a}"),
        6,
        10,
        "not a valid variable name",
    );
    err_at(&exec("cwd: rel"), 6, 10, "relative");
    err_at(
        "graph: g\nresources:\n  file:\n  - name: f\n    path: /a/f\n    dirname: /a\n",
        6,
        14,
        "dirname `/a` must be an absolute directory",
    );
}

#[test]
fn a_file_source_is_kept_as_written_with_its_place() {
    let g = ok(
        "graph: g\nresources:\n  file:\n  - name: /etc/big\n    source: files/{{hostname}}.bin\n    mode: \"0640\"\n",
    );
    let ResourceSpec::File(f) = &g.resources[0] else {
        panic!("not a file: {:?}", g.resources[0]);
    };
    assert_eq!(f.source.as_deref(), Some("files/h1.bin"));
    assert_eq!(f.content, None);
    assert_eq!(
        g.sources,
        vec![SourceAt {
            source: "files/h1.bin".into(),
            line: 5,
            column: 13,
            exported: false,
        }]
    );
    // No source, no entry.
    assert!(
        ok("graph: g\nresources:\n  file:\n  - name: /a\n    content: x\n")
            .sources
            .is_empty()
    );
}

#[test]
fn bad_sources_are_errors_at_the_source() {
    let file = |fields: &str| format!("graph: g\nresources:\n  file:\n  - name: /f\n{fields}");
    err_at(
        &file("    content: x\n    source: a.bin\n"),
        6,
        13,
        "`source` and `content` both given",
    );
    err_at(
        &file("    source: a.bin\n    content: x\n"),
        5,
        13,
        "`source` and `content` both given",
    );
    err_at(
        &file("    source: dir/\n"),
        5,
        13,
        "both must be directories (ending in `/`) or both files",
    );
    err_at(&file("    source: \"\"\n"), 5, 13, "must not be empty");
    err_at(
        &file("    state: absent\n    source: a.bin\n"),
        6,
        13,
        "`state: absent`",
    );
    // An exported file carries its source (published as its content by the exporter).
    let g =
        ok("graph: g\nresources:\n  file:\n  - name: \"@@f\"\n    path: /f\n    source: a.bin\n");
    assert_eq!(
        g.sources,
        vec![SourceAt {
            source: "a.bin".into(),
            line: 6,
            column: 13,
            exported: true,
        }]
    );
}

#[test]
fn directories_follow_mgmts_rules() {
    let dir = |fields: &str| format!("graph: g\nresources:\n  file:\n  - name: /d/\n{fields}");
    // A directory, and a directory copied from a source directory with purge.
    let g = ok(&dir("    mode: \"0750\"\n"));
    let Some(ResourceSpec::File(f)) = g.resources.first() else {
        panic!("no file: {g:?}");
    };
    assert!(f.is_dir() && !f.recurse && !f.purge && f.mode == Some(0o750));
    let g = ok(&format!(
        "{}  - name: /d/managed\n    content: x\n  - name: /elsewhere\n",
        dir("    source: conf/\n    recurse: true\n    purge: true\n")
    ));
    let Some(ResourceSpec::File(f)) = g.resources.first() else {
        panic!("no file: {g:?}");
    };
    assert!(f.is_dir() && f.recurse && f.purge);
    assert_eq!(f.source.as_deref(), Some("conf/"));
    assert_eq!(f.keep, [PathBuf::from("/d/managed")]);
    // As mgmt's autoedges: the directory before what is in it.
    let dir_id = ResourceId::new(Kind::File, "/d/");
    let edges: Vec<_> = g.edges.iter().map(|e| (&e.from, &e.to)).collect();
    assert_eq!(
        edges,
        [(&dir_id, &ResourceId::new(Kind::File, "/d/managed"))]
    );
    ok(&dir("    state: absent\n    recurse: true\n"));
    // Refused, each at its place.
    err_at(
        &dir("    source: conf/\n"),
        5,
        13,
        "copying it needs `recurse: true`",
    );
    err_at(
        &dir("    source: conf\n    recurse: true\n"),
        5,
        13,
        "both must be directories",
    );
    err_at(
        &dir("    content: x\n"),
        5,
        14,
        "`content` on the directory `/d/`",
    );
    err_at(
        &dir("    source: conf/\n    content: x\n    recurse: true\n"),
        5,
        13,
        "`source` and `content` both given",
    );
    err_at(
        &dir("    purge: true\n"),
        5,
        12,
        "`purge: true` needs `recurse: true`",
    );
    err_at(
        "graph: g\nresources:\n  file:\n  - name: /f\n    source: a\n    recurse: true\n",
        6,
        14,
        "`recurse: true` with a single-file source",
    );
    err_at(
        "graph: g\nresources:\n  file:\n  - name: /f\n    purge: true\n    recurse: true\n",
        5,
        12,
        "not a directory",
    );
    err_at(
        "graph: g\nresources:\n  file:\n  - name: /\n    state: absent\n    recurse: true\n",
        4,
        11,
        "will not purge or remove `/`",
    );
    err_at(
        "graph: g\nresources:\n  file:\n  - name: \"@@d\"\n    path: /d/\n",
        4,
        11,
        "not supported: an exported directory",
    );
    err_at(
        &dir("    force: true\n"),
        5,
        12,
        "not supported: file force: true",
    );
}

#[test]
fn mgmts_user_group_and_hostname_examples_parse_with_their_meaning() {
    // examples/yaml/user1.yaml, group1.yaml and hostname.yaml in mgmt's repository, as there.
    let g = ok(
        "---\ngraph: mygraph\nresources:\n  user:\n  - name: testuser\n    uid: 1002\n    gid: 100\n    state: exists\nedges: []\n",
    );
    let Some(ResourceSpec::User(u)) = g.resources.first() else {
        panic!("no user: {g:?}");
    };
    assert_eq!(
        (u.name.as_str(), u.state, u.uid, u.gid),
        ("testuser", AccountState::Exists, Some(1002), Some(100))
    );
    assert_eq!(
        (&u.group, &u.groups, &u.homedir, &u.shell),
        (&None, &None, &None, &None)
    );
    let g = ok(
        "---\ngraph: mygraph\nresources:\n  group:\n  - name: testgroup\n    state: exists\n    gid: 10000\nedges: []\n",
    );
    assert_eq!(
        g.resources,
        [ResourceSpec::Group(GroupSpec {
            name: "testgroup".into(),
            state: AccountState::Exists,
            gid: Some(10000),
            meta: Meta::default(),
        })]
    );
    let g = ok(
        "---\ngraph: mygraph\nresources:\n  hostname:\n    - name: Hostname Watcher @ TestHost\n      hostname: test.hostname.example.com\nedges: []\n",
    );
    let Some(ResourceSpec::Hostname(h)) = g.resources.first() else {
        panic!("no hostname: {g:?}");
    };
    let want = Some("test.hostname.example.com".to_string());
    assert_eq!(
        (&h.pretty, &h.static_name, &h.transient),
        (&want, &want, &want)
    );
    assert_eq!(
        g.resources[0].id().to_string(),
        "hostname[Hostname Watcher @ TestHost]"
    );
}

#[test]
fn every_user_group_and_hostname_field_parses_with_its_meaning() {
    let g = ok(
        "graph: g\nresources:\n  user:\n  - name: \"{{hostname}}-svc\"\n    state: exists\n    uid: 4300\n    group: ops\n    groups: [audio, wheel]\n    homedir: /srv//svc/\n    shell: /bin/bash\n    allowduplicateuid: true\n  - name: gone\n    state: absent\n  group:\n  - name: ops\n    state: exists\n  - name: old\n    state: absent\n  hostname:\n  - name: web\n    pretty_hostname: Web One\n    static_hostname: \"{{hostname}}.example.com\"\n    transient_hostname: \"\"\n",
    );
    let user = |n: &str| match g
        .resources
        .iter()
        .find(|r| r.id() == ResourceId::new(Kind::User, n))
    {
        Some(ResourceSpec::User(u)) => u.clone(),
        other => panic!("no user {n}: {other:?}"),
    };
    let svc = user("h1-svc");
    assert_eq!(svc.uid, Some(4300));
    assert_eq!(svc.group.as_deref(), Some("ops"));
    assert_eq!(
        svc.groups,
        Some(vec!["audio".to_string(), "wheel".to_string()])
    );
    assert_eq!(svc.homedir.as_deref(), Some("/srv/svc"));
    assert_eq!(svc.shell.as_deref(), Some("/bin/bash"));
    assert!(svc.allowduplicateuid);
    assert_eq!(user("gone").state, AccountState::Absent);
    let Some(ResourceSpec::Hostname(h)) = g.resources.iter().find(|r| r.kind() == Kind::Hostname)
    else {
        panic!("no hostname");
    };
    assert_eq!(h.pretty.as_deref(), Some("Web One"));
    assert_eq!(h.static_name.as_deref(), Some("h1.example.com"));
    assert_eq!(h.transient, None, "\"\" is not managed");
    // As mgmt, the user comes after the group it names (an automatic edge), and a user that
    // is to be absent before it; meta autoedge: false turns that off.
    assert_eq!(
        g.edges,
        [Edge {
            name: "autoedge group[ops] -> user[h1-svc]".into(),
            from: ResourceId::new(Kind::Group, "ops"),
            to: ResourceId::new(Kind::User, "h1-svc"),
            notify: false,
        }]
    );
    let g = ok(
        "graph: g\nresources:\n  user:\n  - name: u\n    state: absent\n    gid: 70\n  - name: v\n    state: exists\n    groups: [g]\n    meta: {autoedge: false}\n  group:\n  - name: g\n    state: exists\n    gid: 70\n",
    );
    let ends: Vec<(String, String)> = g
        .edges
        .iter()
        .map(|e| (e.from.to_string(), e.to.to_string()))
        .collect();
    assert_eq!(ends, [("user[u]".to_string(), "group[g]".to_string())]);
}

#[test]
fn bad_user_group_and_hostname_fields_are_errors_at_their_place() {
    let user = |fields: &str| format!("graph: g\nresources:\n  user:\n  - name: u\n{fields}");
    err_at(
        &user("    state: exists\n    homdir: /x/\n"),
        6,
        5,
        "homdir",
    );
    err_at(&user(""), 4, 11, "user needs a `state`");
    err_at(
        &user("    state: present\n"),
        5,
        12,
        "state `present` is not one of",
    );
    err_at(
        &user("    state: exists\n    gid: 5\n    group: g\n"),
        6,
        10,
        "`gid` or `group`, not both",
    );
    err_at(
        &user("    state: exists\n    group: g\n    groups: [a, g]\n"),
        7,
        13,
        "the primary group `g` must not be listed",
    );
    err_at(
        &user("    state: exists\n    groups: [u]\n"),
        6,
        13,
        "the user's own name",
    );
    err_at(
        &user("    state: exists\n    homedir: /home/u\n"),
        6,
        14,
        "must be an absolute directory ending in `/`",
    );
    err_at(
        "graph: g\nresources:\n  user:\n  - name: \"9 lives\"\n    state: exists\n",
        4,
        11,
        "is not a valid user name",
    );
    let group = |fields: &str| format!("graph: g\nresources:\n  group:\n  - name: grp\n{fields}");
    err_at(
        &group("    state: exists\n    members: [a]\n"),
        6,
        5,
        "members",
    );
    err_at(&group(""), 4, 11, "group needs a `state`");
    let hostname =
        |fields: &str| format!("graph: g\nresources:\n  hostname:\n  - name: h\n{fields}");
    err_at(&hostname("    domain: x\n"), 5, 5, "domain");
    err_at(
        &hostname("    static_hostname: not valid\n"),
        5,
        22,
        "static_hostname `not valid` is not a valid host name",
    );
    // The name is the fallback, so it must then be a valid host name.
    err_at(
        "graph: g\nresources:\n  hostname:\n  - name: My Box\n",
        4,
        11,
        "static_hostname `My Box` is not a valid host name",
    );
    ok(
        "graph: g\nresources:\n  hostname:\n  - name: My Box\n    static_hostname: box\n    transient_hostname: box\n",
    );
    for kind in ["user", "group", "hostname"] {
        err_at(
            &format!("graph: g\ncollect:\n- kind: {kind}\n"),
            3,
            9,
            &format!("not supported: collecting {kind}"),
        );
    }
}
