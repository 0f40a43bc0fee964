use super::*;
use crate::engine::resources::{FileState, Kind, ResourceId, ResourceSpec};

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
        "graph: g\nresources:\n  file:\n  - name: a\n    path: /tmp/a\n    owner: root\n",
        6,
        5,
        "owner",
    );
}

#[test]
fn an_unknown_resource_kind_is_an_error() {
    err_at("graph: g\nresources:\n  pkg: []\n", 3, 3, "pkg");
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
    let src = "graph: g\nresources:\n  noop:\n  - name: a\nedges:\n- name: e\n  from: {kind: svc, name: a}\n  to: {kind: noop, name: a}\n";
    err_at(src, 7, 16, "unknown resource kind `svc`");
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
