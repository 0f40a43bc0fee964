//! What every end-to-end test binary shares: a lab for the whole binary, trials run with
//! libtest-mimic, and helpers for arbor runs that must stop however a test ends.

use super::Lab;
use libtest_mimic::{Arguments, Failed, Trial};
use std::process::{Child, Output};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

pub type TestResult = Result<(), Failed>;
pub type Test = (&'static str, fn(&Lab) -> TestResult);

/// Brings up a lab (`<prefix><pid>`, with `lab_args`), runs `tests` against it (one at a time
/// when they share hosts), and tears the lab down whatever the tests did.
pub fn run_with_lab(
    prefix: &str,
    lab_args: &[&str],
    one_at_a_time: bool,
    tests: Vec<Test>,
) -> std::process::ExitCode {
    isolate_from_the_testers_config();
    let mut args = Arguments::from_args();
    if one_at_a_time {
        args.test_threads = Some(1);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // The no-root tier: `cargo test` as a normal user runs the unit, store and CLI tests.
        eprintln!(
            "{prefix}: skipping {} lab tests: the lab needs root (network namespaces, sshd); \
             run integration/test as root for everything",
            tests.len()
        );
        let trials = tests
            .into_iter()
            .map(|(name, _)| Trial::test(name, || Ok(())).with_ignored_flag(true))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let lab = Arc::new(Lab::up(prefix, lab_args));
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let lab = lab.clone();
            Trial::test(name, move || test(&lab))
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    lab.down();
    conclusion.exit_code()
}

pub fn fail(msg: impl std::fmt::Display) -> Failed {
    Failed::from(msg.to_string())
}

/// A finished run's stdout and stderr, labelled, for checks and failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The run exited with `code`; returns its output text for further checks.
pub fn exited(out: &Output, code: i32) -> Result<String, Failed> {
    let log = output_text(out);
    if out.status.code() != Some(code) {
        return Err(fail(format!("exit {:?}\n{log}", out.status.code())));
    }
    Ok(log)
}

/// A running arbor that is stopped (^C, then killed) however the test ends.
pub struct Running(pub Child);

impl Running {
    /// Sends ^C and waits for the exit; returns the exit code and how long it took.
    pub fn interrupt(&mut self) -> Result<(Option<i32>, Duration), Failed> {
        let started = Instant::now();
        // `ip netns exec` execs arbor, so the child's pid is arbor's.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGINT);
        }
        loop {
            if let Some(status) = self.0.try_wait().map_err(fail)? {
                return Ok((status.code(), started.elapsed()));
            }
            if started.elapsed() > Duration::from_secs(15) {
                return Err(fail("arbor did not exit within 15 s of ^C"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.interrupt();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for a line containing each of `needles` (in any order); returns the lines seen.
pub fn wait_lines(
    rx: &mpsc::Receiver<String>,
    needles: &[String],
    within: Duration,
) -> Result<Vec<String>, Failed> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut missing: Vec<&String> = needles.iter().collect();
    while !missing.is_empty() {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                missing.retain(|n| !line.contains(n.as_str()));
                seen.push(line);
            }
            Err(_) => {
                return Err(fail(format!(
                    "never saw {missing:?} within {within:?}; saw:\n{}",
                    seen.join("\n")
                )));
            }
        }
    }
    Ok(seen)
}

/// Reads a child's stdout lines on a thread, into a channel.
pub fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    send_lines(stdout, tx);
    rx
}

/// Reads a child's stdout and stderr lines, each on a thread, into one channel (in the order
/// they arrive).
pub fn lines_of_both(
    stdout: std::process::ChildStdout,
    stderr: std::process::ChildStderr,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    send_lines(stdout, tx.clone());
    send_lines(stderr, tx);
    rx
}

/// Sends `from`'s lines on `tx` from a thread of its own, until either ends.
fn send_lines(from: impl std::io::Read + Send + 'static, tx: mpsc::Sender<String>) {
    use std::io::{BufRead, BufReader};
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

/// The arbor runs a test starts must not pick up the tester's own defaults: no
/// `$XDG_CONFIG_HOME/arbor/config.toml` (nor `~/.config`: XDG_CONFIG_HOME points nowhere) and
/// no `ARBOR_*` variables, but for the lab's own (`ARBOR_LAB_*`).
fn isolate_from_the_testers_config() {
    let inherited: Vec<std::ffi::OsString> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("ARBOR_") && !k.starts_with("ARBOR_LAB_")
        })
        .collect();
    // SAFETY: called first thing in main, before any thread of this process exists.
    unsafe {
        for k in inherited {
            std::env::remove_var(k);
        }
        std::env::set_var("XDG_CONFIG_HOME", "/nonexistent/arbor-test-config");
    }
}
