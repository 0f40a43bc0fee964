//! The operator's terminal as a [`Prompter`]: questions go to /dev/tty, never to stdout (which
//! may carry output a script reads), and secrets are read with echo off.

use super::auth::Prompter;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

/// Asks on /dev/tty. One question at a time, even when many hosts connect at once.
#[derive(Default)]
pub struct TerminalPrompter {
    lock: Mutex<()>,
}

impl TerminalPrompter {
    /// Asks `question` on the terminal and reads the answer with echo off; `None` without a
    /// terminal.
    pub fn secret(&self, question: &str) -> Option<String> {
        self.ask(question, false)
    }

    fn ask(&self, question: &str, echo: bool) -> Option<String> {
        let _one_at_a_time = self.lock.lock().ok()?;
        // The live view steps aside while the question is on the terminal.
        crate::ui::live::paused(|| self.ask_tty(question, echo))
    }

    fn ask_tty(&self, question: &str, echo: bool) -> Option<String> {
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .ok()?;
        let mut out = tty.try_clone().ok()?;
        out.write_all(question.as_bytes()).ok()?;
        out.flush().ok()?;
        let restore = if echo { None } else { EchoOff::new(&tty) };
        let mut line = String::new();
        let read = BufReader::new(&tty).read_line(&mut line);
        drop(restore);
        if !echo {
            let _ = out.write_all(b"\n");
        }
        read.ok()?;
        Some(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

impl Prompter for TerminalPrompter {
    fn passphrase(&self, key: &Path) -> Option<String> {
        self.ask(
            &format!("Enter passphrase for key {}: ", key.display()),
            false,
        )
    }

    fn password(&self, user: &str, host: &str) -> Option<String> {
        self.ask(&format!("{user}@{host}'s password: "), false)
    }

    fn keyboard_interactive(
        &self,
        host: &str,
        instructions: &str,
        prompts: &[(String, bool)],
    ) -> Option<Vec<String>> {
        if !instructions.is_empty() {
            let mut tty = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/tty")
                .ok()?;
            writeln!(tty, "({host}) {instructions}").ok()?;
        }
        prompts
            .iter()
            .map(|(text, echo)| self.ask(&format!("({host}) {text}"), *echo))
            .collect()
    }
}

/// Turns terminal echo off until dropped.
struct EchoOff {
    fd: i32,
    saved: libc::termios,
}

impl EchoOff {
    fn new(tty: &std::fs::File) -> Option<EchoOff> {
        use std::os::fd::AsRawFd;
        let fd = tty.as_raw_fd();
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
            return None;
        }
        Some(EchoOff { fd, saved })
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new` on the same fd.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}
