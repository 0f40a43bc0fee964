//! `arbor run --file G` as a user runs it: exit codes, messages, files on disk.

use std::path::Path;
use std::process::{Command, Output};

/// Runs arbor with its state (the embedded store's data) in a fresh temp dir, so tests running
/// side by side don't share ~/.local/state/arbor, and without the tester's own config file
/// (docs/config.md).
fn arbor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(args)
        .arg("--tmp-prefix")
        .env("ARBOR_LOG", "arbor=warn")
        .env("XDG_CONFIG_HOME", "/nonexistent/arbor-test-config")
        .output()
        .expect("run arbor")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write graph");
    path.display().to_string()
}

#[test]
fn every_bad_graph_exits_2_naming_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "unknown-key.yaml",
            "graph: g\nresorces: {}\n",
            ":2:1: ",
            "resorces",
        ),
        (
            "missing-graph.yaml",
            "resources: {}\n",
            ":1:1: ",
            "missing `graph`",
        ),
        (
            "duplicate.yaml",
            "graph: g\nresources:\n  noop:\n  - name: a\n  - name: a\n",
            ":5:11: ",
            "duplicate noop name `a`",
        ),
        (
            "relative.yaml",
            "graph: g\nresources:\n  file:\n  - name: a\n    path: tmp/a\n",
            ":5:11: ",
            "relative",
        ),
        (
            "bad-edge.yaml",
            "graph: g\nresources:\n  noop:\n  - name: a\nedges:\n- name: e\n  from: {kind: noop, name: a}\n  to: {kind: noop, name: b}\n",
            ":8:26: ",
            "noop[b]",
        ),
        (
            "cycle.yaml",
            "graph: g\nresources:\n  noop:\n  - name: a\n  - name: b\nedges:\n- name: ab\n  from: {kind: noop, name: a}\n  to: {kind: noop, name: b}\n- name: ba\n  from: {kind: noop, name: b}\n  to: {kind: noop, name: a}\n",
            ":7:9: ",
            "cycle: noop[a] -> noop[b] -> noop[a]",
        ),
        (
            "refused-field.yaml",
            "graph: g\nresources:\n  exec:\n  - name: e\n    cmd: \"true\"\n    mtimes: [/etc/passwd]\n",
            ":6:13: ",
            "not supported: exec mtimes",
        ),
        (
            "refused-meta.yaml",
            "graph: g\nresources:\n  file:\n  - name: f\n    path: /tmp/f\n    meta:\n      realize: true\n",
            ":7:16: ",
            "not supported: meta.realize: true",
        ),
        (
            "timer-unknown-field.yaml",
            "graph: g\nresources:\n  timer:\n  - name: t\n    interval: 1\n    jitter: 2\n",
            ":6:5: ",
            "jitter",
        ),
        (
            "kv-unknown-field.yaml",
            "graph: g\nresources:\n  kv:\n  - name: k\n    value: v\n    ttl: 5\n",
            ":6:5: ",
            "ttl",
        ),
        (
            "kv-collected.yaml",
            "graph: g\ncollect:\n- kind: kv\n",
            ":3:9: ",
            "not supported: collecting kv",
        ),
        (
            "pkg-refused-field.yaml",
            "graph: g\nresources:\n  pkg:\n  - name: hello\n    allowunsupported: false\n",
            ":5:23: ",
            "not supported: pkg allowunsupported: false",
        ),
        (
            "pkg-latest.yaml",
            "graph: g\nresources:\n  pkg:\n  - name: hello\n    state: latest\n",
            ":5:12: ",
            "did you mean `newest`",
        ),
        (
            "svc-session.yaml",
            "graph: g\nresources:\n  svc:\n  - name: web\n    session: true\n",
            ":5:14: ",
            "not supported: svc session: true",
        ),
        (
            "svc-unknown-field.yaml",
            "graph: g\nresources:\n  svc:\n  - name: web\n    restart: always\n",
            ":5:5: ",
            "restart",
        ),
    ];
    for (name, text, at, needle) in cases {
        let path = write(dir.path(), name, text);
        let out = arbor(&["run", "--file", &path, "--converged-timeout", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}{at}")) && stderr.contains(needle),
            "{name}: want {path}{at}...{needle} in {stderr}"
        );
    }
}

#[test]
fn the_articles_graph_converges_and_exits_0_with_its_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let src = include_str!("../examples/remote2a.yaml").replace("/tmp/", &format!("{d}/"));
    let path = write(dir.path(), "remote2a.yaml", &src);
    let out = arbor(&[
        "run",
        "--file",
        &path,
        "--converged-timeout",
        "1",
        "--hostname",
        "a",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).expect(n);
    assert_eq!(read("file1a"), "i am file1a\n");
    // Its own export, collected back through the exchange.
    assert_eq!(read("file2a"), "i am file2a, exported from host a\n");
}

#[test]
fn the_metaparams_example_converges_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/meta.yaml"))
            .expect("example")
            .replace("/tmp/arbor-meta", &dir.path().display().to_string());
    let path = write(dir.path(), "meta.yaml", &text);
    let out = arbor(&["run", "--file", &path, "--converged-timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).expect(n);
    assert_eq!(
        read("tries").lines().count(),
        3,
        "two retries, then success"
    );
    assert!(dir.path().join("built").exists());
    let log = read("log");
    assert_eq!(log.matches("built").count(), 1, "{log}");
    assert!(log.contains("job1") && log.contains("job2"), "{log}");
    assert!(
        !dir.path().join("report").exists(),
        "a noop resource was written"
    );
}

#[test]
fn a_failing_resource_exits_1_naming_command_and_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "fail.yaml",
        "graph: g\nresources:\n  exec:\n  - name: bad\n    cmd: \"exit 4\"\n",
    );
    let out = arbor(&[
        "run",
        "--file",
        &path,
        "--converged-timeout",
        "1",
        "--no-watch",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("exec[bad]: `exit 4` exited with code 4"),
        "{stderr}"
    );
}

#[test]
fn noop_changes_nothing_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let src = include_str!("../examples/remote2a.yaml").replace("/tmp/", &format!("{d}/"));
    let path = write(dir.path(), "remote2a.yaml", &src);
    let out = arbor(&["run", "--file", &path, "--converged-timeout", "1", "--noop"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("file1a").exists());
    assert!(!dir.path().join("file2a").exists());
}

/// `--diff` here (the initiator's own graph): a rewritten file, a new one, a removed one and
/// a binary one each show what changes, in text and as JSON `diff` events; with `--noop`
/// nothing changes, and once applied there is nothing left to show.
#[test]
fn diff_shows_each_change_of_a_local_run_and_noop_keeps_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |n: &str| dir.path().join(n);
    std::fs::write(at("conf"), "a\nb\nc\n").expect("seed");
    std::fs::write(at("old"), "bye\n").expect("seed");
    std::fs::write(at("blob"), b"\x7fELF\x00\x01\x02").expect("seed");
    let graph = write(
        dir.path(),
        "g.yaml",
        &format!(
            "graph: g\nresources:\n  file:\n  - name: conf\n    path: {0}/conf\n    content: \"a\\nB\\nc\\n\"\n  - name: new\n    path: {0}/new\n    content: \"fresh\\n\"\n    mode: \"0600\"\n  - name: old\n    path: {0}/old\n    state: absent\n  - name: blob\n    path: {0}/blob\n    content: \"text\\n\"\nedges: []\n",
            dir.path().display()
        ),
    );
    let d = dir.path().display().to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--file", &graph, "--converged-timeout", "1"];
        args.extend_from_slice(&["--hostname", "h1", "--output", "text"]);
        args.extend_from_slice(extra);
        let out = arbor(&args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The diff lines, without their timestamps.
        stdout
            .lines()
            .filter_map(|l| l.split_once(" h1 | ").map(|(_, line)| line.to_string()))
            .collect::<Vec<_>>()
    };
    let want: Vec<String> = vec![
        format!("--- {d}/conf"),
        format!("+++ {d}/conf"),
        "@@ -1,3 +1,3 @@".into(),
        " a".into(),
        "-b".into(),
        "+B".into(),
        " c".into(),
        format!("{d}/new: new file, mode 0600"),
        "--- /dev/null".into(),
        format!("+++ {d}/new"),
        "@@ -0,0 +1 @@".into(),
        "+fresh".into(),
        format!("{d}/old: removed (state: absent; it held 4 bytes)"),
        format!("--- {d}/blob"),
        format!("+++ {d}/blob"),
        "Binary files differ (7 bytes on the host, 5 bytes in the graph)".into(),
    ];
    let sorted = |mut v: Vec<String>| {
        // Resources are checked concurrently: diffs come in any order, each whole.
        v.sort();
        v
    };
    let shown = run(&["--noop", "--diff"]);
    assert_eq!(sorted(shown), sorted(want.clone()));
    assert_eq!(
        std::fs::read_to_string(at("conf")).expect("conf"),
        "a\nb\nc\n"
    );
    assert!(!at("new").exists() && at("old").exists());
    // JSON: one `diff` event per resource, with its lines.
    let out = arbor(&[
        "run",
        "--file",
        &graph,
        "--converged-timeout",
        "1",
        "--hostname",
        "h1",
        "--noop",
        "--diff",
        "--output",
        "json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let diffs: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "diff")
        .collect();
    let mut resources: Vec<&str> = diffs
        .iter()
        .filter_map(|v| v["resource"].as_str())
        .collect();
    resources.sort();
    assert_eq!(
        resources,
        ["file[blob]", "file[conf]", "file[new]", "file[old]"],
        "{stdout}"
    );
    assert!(
        diffs
            .iter()
            .all(|v| v["host"] == "h1" && v["lines"].is_array()),
        "{stdout}"
    );
    // Applied: the same diffs, the files changed, and then nothing to show.
    assert_eq!(sorted(run(&["--diff"])), sorted(want));
    assert_eq!(
        std::fs::read_to_string(at("conf")).expect("conf"),
        "a\nB\nc\n"
    );
    assert!(at("new").exists() && !at("old").exists());
    assert_eq!(run(&["--diff"]), Vec::<String>::new());
}

#[test]
fn exec_output_reaches_the_log_tagged_with_the_resource() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        dir.path(),
        "echo.yaml",
        "graph: g\nresources:\n  exec:\n  - name: greet\n    cmd: \"echo hello from {{hostname}}; echo to stderr >&2\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args([
            "run",
            "--file",
            &path,
            "--converged-timeout",
            "1",
            "--hostname",
            "h9",
        ])
        .env("ARBOR_LOG", "arbor=info")
        .output()
        .expect("run arbor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("exec[greet]: hello from h9"), "{stderr}");
    assert!(stderr.contains("exec[greet]: to stderr"), "{stderr}");
}

/// `arbor completions SHELL` prints a script that the shell accepts and that completes arbor's
/// commands and flags.
#[test]
fn completions_load_in_bash_and_name_the_commands_and_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["completions", "bash"])
        .output()
        .expect("run arbor");
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).expect("utf-8");
    // Loaded into bash, then asked what follows `arbor run --to`.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "arbor.bash", &script);
    let probe = format!(
        "source {path}; COMP_WORDS=(arbor run --to); COMP_CWORD=2; COMP_LINE='arbor run --to'; \
         COMP_POINT=${{#COMP_LINE}}; _arbor arbor --to run; printf '%s\\n' \"${{COMPREPLY[@]}}\"; \
         COMP_WORDS=(arbor ''); COMP_CWORD=1; _arbor arbor '' arbor; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let out = Command::new("bash")
        .args(["--norc", "-c", &probe])
        .output()
        .expect("run bash");
    let words = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{words}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["--topology", "run", "store", "topology", "completions"] {
        assert!(
            words.lines().any(|l| l == want),
            "bash does not complete {want}:\n{words}"
        );
    }
    for (shell, marker) in [("zsh", "#compdef arbor"), ("fish", "complete -c arbor")] {
        let out = Command::new(env!("CARGO_BIN_EXE_arbor"))
            .args(["completions", shell])
            .output()
            .expect("run arbor");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(marker),
            "{shell}:\n{text}"
        );
        assert!(text.contains("topology"), "{shell}:\n{text}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(["completions", "tcsh"])
        .output()
        .expect("run arbor");
    assert_eq!(bad.status.code(), Some(2));
}

/// `arbor-man DIR` writes a page per command that groff renders without a warning.
#[test]
fn man_pages_render_for_every_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_arbor-man"))
        .arg(dir.path())
        .output()
        .expect("run arbor-man");
    assert!(out.status.success(), "{out:?}");
    for page in [
        "arbor.1",
        "arbor-run.1",
        "arbor-store.1",
        "arbor-topology-check.1",
    ] {
        let path = dir.path().join(page);
        assert!(path.exists(), "no {page}");
        let rendered = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww"])
            .arg(&path)
            .output()
            .expect("run groff (integration/deps installs groff-base)");
        let text = String::from_utf8_lossy(&rendered.stdout);
        let warnings = String::from_utf8_lossy(&rendered.stderr);
        assert!(
            rendered.status.success() && warnings.trim().is_empty(),
            "{page}: {warnings}"
        );
        if page == "arbor-run.1" {
            // Rendered text may hyphenate: look for the flag as groff prints it.
            assert!(text.contains("topology"), "{page}:\n{text}");
        }
    }
}

/// `-q` leaves the summary and failures on stdout; `--log-file` keeps every line with a
/// timestamp anyway; `--color` and NO_COLOR decide the colours of the log on stderr.
#[test]
fn quiet_log_file_and_colour_do_what_they_say() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let path = write(
        dir.path(),
        "g.yaml",
        &format!(
            "graph: g\nresources:\n  file:\n  - name: f\n    path: {d}/made\n    content: hi\n    state: exists\n"
        ),
    );
    let log = dir.path().join("run.log");
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_arbor"));
        c.args([
            "run",
            "--file",
            &path,
            "--converged-timeout",
            "1",
            "--tmp-prefix",
        ])
        .args(["--hostname", "h1"])
        .args(extra)
        .env_remove("ARBOR_LOG")
        .env_remove("NO_COLOR");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run arbor")
    };

    let out = run(&["-q", "--log-file", log.to_str().expect("utf-8")], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        !stdout.contains("h1: converged"),
        "-q showed states:\n{stdout}"
    );
    assert!(
        stdout.contains("HOST") && stdout.contains("h1 (local)"),
        "{stdout}"
    );
    assert!(!stderr.contains("INFO"), "-q logged info:\n{stderr}");
    let kept = std::fs::read_to_string(&log).expect("log file");
    // Every line starts with an RFC 3339 timestamp, the events and the engine's log included.
    assert!(
        kept.lines()
            .filter(|l| !l.is_empty())
            .any(|l| l.ends_with("h1: converged") && l.as_bytes().get(10) == Some(&b'T')),
        "no timestamped converged line:\n{kept}"
    );
    assert!(
        kept.contains("created"),
        "the engine's info log is not kept:\n{kept}"
    );
    assert!(kept.contains("HOST"), "the summary is not kept:\n{kept}");
    assert!(!kept.contains('\x1b'), "colours in the log file:\n{kept}");

    // stderr is not a terminal here: auto means no colour, always means colour, and NO_COLOR
    // turns auto off. Each run creates the file again, so each logs at info.
    let made = dir.path().join("made");
    let stderr_of = |extra: &[&str], env: &[(&str, &str)]| {
        let _ = std::fs::remove_file(&made);
        let out = run(extra, env);
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(text.contains("INFO"), "{extra:?}: nothing logged:\n{text}");
        text
    };
    assert!(!stderr_of(&[], &[]).contains('\x1b'));
    assert!(stderr_of(&["--color", "always"], &[]).contains("\x1b["));
    assert!(!stderr_of(&["--color", "never"], &[]).contains('\x1b'));
    assert!(!stderr_of(&["--color", "auto"], &[("NO_COLOR", "1")]).contains('\x1b'));
    // -q and -v together is a usage error.
    assert_eq!(run(&["-q", "-v"], &[]).status.code(), Some(2));
    // A log file that cannot be opened: exit 2, naming it.
    let bad = run(&["--log-file", "/nonexistent/dir/x.log"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("/nonexistent/dir/x.log"));
}

/// A host that must never be contacted: a listener of the test's (nonblocking), and its port.
fn silent_host() -> (std::net::TcpListener, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    (listener, port)
}

/// Each case (file name, graph text, `:line:col: `, what stderr must say) written into `dir`
/// and run: exit 2, the graph's place and the message on stderr, within 5 s, and `host`
/// never contacted.
fn refused_before_contact(
    dir: &Path,
    host: &std::net::TcpListener,
    cases: impl IntoIterator<Item = (&'static str, String, &'static str, String)>,
) {
    for (name, text, at, needle) in cases {
        let path = write(dir, name, &text);
        let started = std::time::Instant::now();
        let out = arbor(&["run", "--remote", &path, "--converged-timeout", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}{at}")),
            "{name}: want {path}{at} in {stderr}"
        );
        assert!(
            stderr.contains(&needle),
            "{name}: want {needle:?} in {stderr}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{name}: took {:?}",
            started.elapsed()
        );
        match host.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{name}: the host was contacted: {other:?}"),
        }
    }
}

/// A source that is missing, a directory, or given with `content` is bad input: exit 2 with
/// the graph's file:line:col and the path, before any host is contacted (the host here is a
/// listener of the test's that must see no connection).
#[test]
fn a_bad_source_exits_2_naming_the_graph_place_and_the_path_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("adir")).expect("mkdir");
    let (listener, port) = silent_host();
    let graph = |source: &str, extra: &str| {
        format!(
            "graph: g\nremote: ssh://root@127.0.0.1:{port}\nresources:\n  file:\n  \
             - name: /tmp/arbor-test-source\n{extra}    source: {source}\n"
        )
    };
    let missing = dir.path().join("missing.bin");
    let cases = [
        (
            "missing.yaml",
            graph("missing.bin", ""),
            ":6:13: ",
            format!("source `missing.bin`: {}: No such file", missing.display()),
        ),
        (
            "absolute.yaml",
            graph(&missing.display().to_string(), ""),
            ":6:13: ",
            format!("{}: No such file", missing.display()),
        ),
        (
            "directory.yaml",
            graph("adir", ""),
            ":6:13: ",
            "a directory source ends in `/`".to_string(),
        ),
        (
            "both.yaml",
            graph("adir", "    content: x\n"),
            ":7:13: ",
            "`source` and `content` both given".to_string(),
        ),
    ];
    refused_before_contact(dir.path(), &listener, cases);
}

/// An exported file's source goes with the export, as its content, in the store: one that is
/// not UTF-8 text, or sources that come to more than an export may carry, exit 2 at the
/// graph's place, naming the path, before any host is contacted.
#[test]
fn an_exported_files_source_that_is_not_text_or_too_big_exits_2_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("binary.dat"),
        [0x7f, b'E', b'L', b'F', 0xff, 0xfe],
    )
    .expect("write");
    std::fs::write(dir.path().join("big.txt"), "x".repeat((1 << 20) + 1)).expect("write");
    let (listener, port) = silent_host();
    let graph = |source: &str| {
        format!(
            "graph: g\nremote: ssh://root@127.0.0.1:{port}\nresources:\n  file:\n  \
             - name: \"@@published\"\n    path: /tmp/arbor-test-published\n    source: {source}\n"
        )
    };
    let cases = [
        (
            "binary.yaml",
            graph("binary.dat"),
            ":7:13: ",
            format!(
                "source `binary.dat`: {} is not UTF-8 text",
                dir.path().join("binary.dat").display()
            ),
        ),
        (
            "big.yaml",
            graph("big.txt"),
            ":7:13: ",
            "over the 1048576 a host's exports may carry".to_string(),
        ),
    ];
    refused_before_contact(dir.path(), &listener, cases);
}

/// Source directories too: a missing one, one holding a symlink, a file named as a directory,
/// a directory source to a path not ending in `/`, or with `content`, or without `recurse`:
/// exit 2 at the graph's place, naming the path, before any host is contacted.
#[test]
fn a_bad_source_directory_exits_2_naming_the_graph_place_and_the_path_before_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("linked/sub")).expect("mkdir");
    std::os::unix::fs::symlink("/etc", dir.path().join("linked/sub/out")).expect("symlink");
    std::fs::write(dir.path().join("afile"), "x").expect("write");
    let (listener, port) = silent_host();
    let graph = |target: &str, source: &str, extra: &str| {
        format!(
            "graph: g\nremote: ssh://root@127.0.0.1:{port}\nresources:\n  file:\n  \
             - name: {target}\n{extra}    source: {source}\n"
        )
    };
    let d = "/tmp/arbor-test-tree/";
    let cases = [
        (
            "missing.yaml",
            graph(d, "nodir/", "    recurse: true\n"),
            ":7:13: ",
            format!(
                "source `nodir/`: {}: No such file",
                dir.path().join("nodir/").display()
            ),
        ),
        (
            "symlink.yaml",
            graph(d, "linked/", "    recurse: true\n"),
            ":7:13: ",
            format!(
                "{} is a symlink",
                dir.path().join("linked/sub/out").display()
            ),
        ),
        (
            "not-a-dir.yaml",
            graph(d, "afile/", "    recurse: true\n"),
            ":7:13: ",
            "afile/: Not a directory".to_string(),
        ),
        (
            "file-path.yaml",
            graph("/tmp/arbor-test-tree", "linked/", "    recurse: true\n"),
            ":7:13: ",
            "both must be directories (ending in `/`) or both files".to_string(),
        ),
        (
            "no-recurse.yaml",
            graph(d, "linked/", ""),
            ":6:13: ",
            "copying it needs `recurse: true`".to_string(),
        ),
        (
            "content.yaml",
            graph(d, "linked/", "    recurse: true\n    content: x\n"),
            ":8:13: ",
            "`source` and `content` both given".to_string(),
        ),
    ];
    refused_before_contact(dir.path(), &listener, cases);
}

/// The initiator's own graph (--file) copies a source directory from where it is.
#[test]
fn a_local_directory_with_a_source_gets_its_tree_and_modes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("conf/sub")).expect("mkdir");
    std::fs::write(dir.path().join("conf/sub/f"), "deep\n").expect("write");
    std::fs::set_permissions(
        dir.path().join("conf/sub/f"),
        std::fs::Permissions::from_mode(0o604),
    )
    .expect("chmod");
    let target = dir.path().join("out/a/b");
    let path = write(
        dir.path(),
        "g.yaml",
        &format!(
            "graph: g\nresources:\n  file:\n  - name: {}/\n    source: conf/\n    recurse: true\n",
            target.display()
        ),
    );
    let out = arbor(&["run", "--file", &path, "--converged-timeout", "1"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copy = target.join("sub/f");
    assert_eq!(std::fs::read_to_string(&copy).expect("copied"), "deep\n");
    let mode = std::fs::metadata(&copy).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode, 0o604);
}

/// The initiator's own graph (--file) reads its source where it is.
#[test]
fn a_local_file_with_a_source_gets_its_bytes_and_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("data.bin"), &bytes).expect("write");
    let target = dir.path().join("out/copy.bin");
    std::fs::create_dir(dir.path().join("out")).expect("mkdir");
    let path = write(
        dir.path(),
        "g.yaml",
        &format!(
            "graph: g\nresources:\n  file:\n  - name: {}\n    source: data.bin\n    mode: \"0604\"\n",
            target.display()
        ),
    );
    let out = arbor(&["run", "--file", &path, "--converged-timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        std::fs::read(&target).expect("read") == bytes,
        "wrong bytes"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&target)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o604);
}

/// arbor with `home` as HOME, `xdg` as XDG_CONFIG_HOME (unset when `None`), exactly the
/// `ARBOR_*` variables of `env` (none inherited), and `/etc` as it is, or, with `system`, with
/// that text as /etc/arbor/config.toml in a private mount namespace (an overlay over /etc:
/// the machine's own /etc is never written). `None` when `system` is asked for but cannot be
/// had (not root, or no overlayfs).
fn arbor_configured(
    home: &Path,
    xdg: Option<&Path>,
    system: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Option<Output> {
    let mut c = match system {
        None => Command::new(env!("CARGO_BIN_EXE_arbor")),
        Some(text) => {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return None;
            }
            let layer = home.join("etc-overlay");
            for d in ["upper/arbor", "work"] {
                std::fs::create_dir_all(layer.join(d)).expect("overlay dirs");
            }
            std::fs::write(layer.join("upper/arbor/config.toml"), text).expect("system config");
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!(
                    "mount -t overlay overlay -o lowerdir=/etc,upperdir={0}/upper,workdir={0}/work /etc || exit 99; exec \"$@\"",
                    layer.display()
                ))
                .args(["sh", env!("CARGO_BIN_EXE_arbor")]);
            c
        }
    };
    c.args(args).env("HOME", home).env_remove("XDG_CONFIG_HOME");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ARBOR_") {
            c.env_remove(k);
        }
    }
    if let Some(xdg) = xdg {
        c.env("XDG_CONFIG_HOME", xdg);
    }
    c.env("ARBOR_LOG", "arbor=warn").envs(env.iter().copied());
    let out = c.output().expect("run arbor");
    (out.status.code() != Some(99)).then_some(out)
}

/// What a finished `arbor run` printed on stdout: "json" when its last line is the JSON
/// summary, "text" when it is the text summary table.
fn output_format(out: &Output) -> &'static str {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    if serde_json::from_str::<serde_json::Value>(last).is_ok_and(|v| v["type"] == "summary") {
        "json"
    } else if stdout.contains("HOST ") {
        "text"
    } else {
        panic!("neither summary on stdout:\n{stdout}")
    }
}

/// The default `arbor run --help` shows for --cconns.
fn cconns_default(out: &Output) -> String {
    let help = String::from_utf8_lossy(&out.stdout);
    let at = help.find("--cconns").expect("--cconns in the help");
    let rest = &help[at..];
    let start = rest.find("[default: ").expect("a default") + "[default: ".len();
    rest[start..]
        .split(']')
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn config_files_then_arbor_variables_then_the_command_line_set_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let xdg = dir.path().join("xdg");
    std::fs::create_dir_all(home.join(".config/arbor")).expect("mkdir");
    std::fs::create_dir_all(xdg.join("arbor")).expect("mkdir");
    let graph = write(
        dir.path(),
        "g.yaml",
        "graph: g\nresources:\n  noop:\n  - name: n\nedges: []\n",
    );
    let run = [
        "run",
        "--file",
        &graph,
        "--converged-timeout",
        "1",
        "--tmp-prefix",
    ];

    // Nothing configured: text.
    let out = arbor_configured(&home, None, None, &[], &run).expect("run");
    assert_eq!(output_format(&out), "text");
    // ~/.config/arbor/config.toml, without XDG_CONFIG_HOME.
    std::fs::write(
        home.join(".config/arbor/config.toml"),
        "output = \"json\"\ncconns = 5\n",
    )
    .expect("user config");
    let out = arbor_configured(&home, None, None, &[], &run).expect("run");
    assert_eq!(output_format(&out), "json");
    let help = arbor_configured(&home, None, None, &[], &["run", "--help"]).expect("help");
    assert_eq!(cconns_default(&help), "5");
    // $XDG_CONFIG_HOME/arbor/config.toml instead of ~/.config when it is set.
    std::fs::write(xdg.join("arbor/config.toml"), "output = \"text\"\n").expect("xdg config");
    let out = arbor_configured(&home, Some(&xdg), None, &[], &run).expect("run");
    assert_eq!(output_format(&out), "text");
    // The environment beats the file; the command line beats the environment.
    let json = [("ARBOR_OUTPUT", "json"), ("ARBOR_CCONNS", "9")];
    let out = arbor_configured(&home, Some(&xdg), None, &json, &run).expect("run");
    assert_eq!(output_format(&out), "json");
    let help = arbor_configured(&home, None, None, &json, &["run", "--help"]).expect("help");
    assert_eq!(cconns_default(&help), "9");
    let on_the_command_line = [&run[..], &["--output", "text"]].concat();
    let out = arbor_configured(&home, Some(&xdg), None, &json, &on_the_command_line).expect("run");
    assert_eq!(output_format(&out), "text");

    // `quiet` from a file hides the states; -v on the command line beats it (no conflict).
    std::fs::write(xdg.join("arbor/config.toml"), "quiet = true\n").expect("xdg config");
    let states = |extra: &[&str]| {
        let out = arbor_configured(&home, Some(&xdg), None, &[], &[&run[..], extra].concat())
            .expect("run");
        assert_eq!(output_format(&out), "text");
        String::from_utf8_lossy(&out.stdout).contains(": converged")
    };
    assert!(!states(&[]), "quiet from the config file did not apply");
    assert!(
        states(&["-v"]),
        "-v did not beat quiet from the config file"
    );

    // /etc/arbor/config.toml: under the user's file, which beats it key by key.
    let system = "output = \"json\"\ncconns = 3\n";
    std::fs::remove_file(home.join(".config/arbor/config.toml")).expect("rm");
    let Some(out) = arbor_configured(&home, None, Some(system), &[], &run) else {
        eprintln!("skipped /etc/arbor/config.toml: needs root and overlayfs for a private /etc");
        return;
    };
    assert_eq!(output_format(&out), "json");
    let help = arbor_configured(&home, None, Some(system), &[], &["run", "--help"]).expect("help");
    assert_eq!(cconns_default(&help), "3");
    std::fs::write(home.join(".config/arbor/config.toml"), "cconns = 5\n").expect("user config");
    let help = arbor_configured(&home, None, Some(system), &[], &["run", "--help"]).expect("help");
    assert_eq!(cconns_default(&help), "5");
    let out = arbor_configured(&home, None, Some(system), &[], &run).expect("run");
    assert_eq!(
        output_format(&out),
        "json",
        "the system file's output was lost"
    );
    let out = arbor_configured(&home, None, Some(system), &[("ARBOR_OUTPUT", "text")], &run)
        .expect("run");
    assert_eq!(output_format(&out), "text");
}

#[test]
fn an_unknown_config_key_or_bad_value_exits_2_naming_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let config = home.join(".config/arbor/config.toml");
    std::fs::create_dir_all(config.parent().expect("dir")).expect("mkdir");
    let made = dir.path().join("made");
    let graph = write(
        dir.path(),
        "g.yaml",
        &format!(
            "graph: g\nresources:\n  file:\n  - name: f\n    path: {}\n    content: x\nedges: []\n",
            made.display()
        ),
    );
    let run = [
        "run",
        "--file",
        &graph,
        "--converged-timeout",
        "1",
        "--tmp-prefix",
    ];
    let refused = |text: &str, env: &[(&str, &str)], needle: &str| {
        std::fs::write(&config, text).expect("config");
        let out = arbor_configured(&home, None, None, env, &run).expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{text:?}: want {needle:?} in {stderr}"
        );
        assert!(!made.exists(), "{text:?}: the graph ran");
        stderr
    };
    let at = config.display().to_string();
    refused(
        "cconns = 5\n\n  outptu = \"json\"\n",
        &[],
        &format!("{at}:3:3: unknown key `outptu`"),
    );
    refused(
        "output = \"xml\"\n",
        &[],
        &format!("{at}:1:10: output: invalid value: expected one of auto, text, json"),
    );
    refused(
        "no-caching = 1\n",
        &[],
        &format!("{at}:1:14: no-caching: expected true or false"),
    );
    // `compress` was a boolean before it took never|auto|always.
    refused(
        "compress = true\n",
        &[],
        &format!("{at}:1:12: compress: expected a string or a number"),
    );
    refused("cconns = \n", &[], &format!("{at}:1:"));
    refused(
        "",
        &[("ARBOR_CCONNS", "lots")],
        "ARBOR_CCONNS: cconns: invalid value",
    );
    // A secret in a config file is never printed, in an error or in --help.
    let secret = "seeds = [\"http://u:hunter2@127.0.0.1:1\"]\n";
    let stderr = refused(
        &format!("{secret}bogus = 1\n"),
        &[],
        &format!("{at}:2:1: unknown key `bogus`"),
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    std::fs::write(&config, secret).expect("config");
    let help = arbor_configured(&home, None, None, &[], &["run", "--help"]).expect("help");
    assert_eq!(help.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&help.stdout).contains("hunter2"));
    // The same file, fixed, runs; etcd credentials without `seeds` are not used.
    std::fs::write(
        &config,
        "cconns = 5\nseeds-user = \"root\"\nseeds-password-file = \"/nonexistent\"\n",
    )
    .expect("config");
    let out = arbor_configured(&home, None, None, &[], &run).expect("run");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(made.exists());
}

#[test]
fn help_names_the_config_files_and_the_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [&["--help"][..], &["run", "--help"], &["exec", "--help"]] {
        let out = arbor_configured(dir.path(), None, None, &[], args).expect("help");
        let help = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "/etc/arbor/config.toml",
            "~/.config/arbor/config.toml",
            "ARBOR_",
        ] {
            assert!(help.contains(needle), "{args:?}: no {needle}:\n{help}");
        }
    }
}
