//! `arbor run --file G` as a user runs it: exit codes, messages, files on disk.

use std::path::Path;
use std::process::{Command, Output};

/// Runs arbor with its state (the embedded store's data) in a fresh temp dir, so tests running
/// side by side don't share ~/.local/state/arbor.
fn arbor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args(args)
        .arg("--tmp-prefix")
        .env("ARBOR_LOG", "arbor=warn")
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
