//! `arbor run` on a real terminal: a tmux pane, for the live view and the prompts.

use super::Lab;
use super::harness::{fail, output_text};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// `arbor run ARGS` in a tmux pane of its own (100 × 30, a private tmux server), as an
/// operator runs it on a terminal; the server goes when this does.
pub struct Terminal {
    socket: String,
}

impl Terminal {
    pub fn start(lab: &Lab, home: &Path, args: &[&str]) -> Result<Terminal, libtest_mimic::Failed> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let term = Terminal {
            socket: format!(
                "arbor-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        };
        let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let args: Vec<String> = args.iter().map(|a| quote(a)).collect();
        let command = format!(
            "ip netns exec {} env -u SSH_AUTH_SOCK HOME={} ARBOR_LOG=arbor=info {} run {}; \
             echo ARBOR-EXIT=$?; sleep 600",
            lab.init_ns(),
            quote(&home.to_string_lossy()),
            env!("CARGO_BIN_EXE_arbor"),
            args.join(" "),
        );
        let started = term.tmux(&[
            "new-session",
            "-d",
            "-x",
            "100",
            "-y",
            "30",
            "-s",
            "run",
            &command,
        ]);
        if !started.status.success() {
            return Err(fail(format!("tmux: {}", output_text(&started))));
        }
        Ok(term)
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux")
    }

    /// What the pane shows now.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "run"]).stdout)
            .into_owned()
    }

    /// Types `text` and Enter.
    pub fn type_line(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "run", "-l", text]);
        self.tmux(&["send-keys", "-t", "run", "Enter"]);
    }

    /// Shows `each` the screen every 100 ms until arbor has exited; returns the whole pane,
    /// history included.
    pub fn until_exit(
        &self,
        within: Duration,
        mut each: impl FnMut(&str),
    ) -> Result<String, libtest_mimic::Failed> {
        let deadline = Instant::now() + within;
        loop {
            let screen = self.screen();
            each(&screen);
            if screen.contains("ARBOR-EXIT=") {
                let all = self.tmux(&["capture-pane", "-p", "-S", "-", "-t", "run"]);
                return Ok(String::from_utf8_lossy(&all.stdout).into_owned());
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "no exit within {within:?}; last screen:\n{screen}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}
