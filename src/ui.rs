//! The operator's view: every event from every host, live, one line each, and the summary at
//! the end. Host output reads like the article's `host | line`, but as it happens.

use crate::wire::{Event, EventKind, HostState};
use std::io::Write;
use std::time::Duration;

/// How one host's part in the run ended, for the summary.
#[derive(Debug, Clone)]
pub struct HostReport {
    pub name: String,
    pub ok: bool,
    /// Why it failed, naming the step.
    pub cause: Option<String>,
    pub elapsed: Duration,
    pub bytes: u64,
    pub cached: Option<bool>,
    /// The host's store tunnel ends on a loopback TCP port (its sshd refused Unix-socket
    /// forwarding), where any local process can reach it.
    pub store_over_tcp: bool,
}

/// Prints events as they arrive (stdout), in arrival order.
#[derive(Default)]
pub struct Ui {
    /// Transfers already reported as finished, so repeated updates print once.
    done_transfers: std::collections::HashSet<(String, String)>,
    /// The run is being torn down: hosts still running see the ones already gone withdraw
    /// their exports, and those "changed"/"converged" flips say nothing about the run.
    stopping: bool,
}

impl Ui {
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, state flips other than exits and failures are not shown.
    pub fn stopping(&mut self) {
        self.stopping = true;
    }

    pub fn event(&mut self, event: &Event) {
        let event = &sanitized(event);
        if self.stopping
            && matches!(
                event.kind,
                EventKind::State(HostState::Changed | HostState::Converged | HostState::Running)
            )
        {
            return;
        }
        let host = printable(&event.host.to_string()).into_owned();
        let line = match &event.kind {
            EventKind::Log { line, stderr } => {
                if *stderr {
                    format!("{host} ! {line}")
                } else {
                    format!("{host} | {line}")
                }
            }
            EventKind::State(state) => match state {
                HostState::Staging { step } => format!("{host}: {step}"),
                HostState::Running => format!("{host}: running"),
                HostState::Converged => format!("{host}: converged"),
                HostState::Changed => format!("{host}: changed"),
                HostState::Unhealthy { failures } => {
                    format!("{host}: settled with failures: {}", failures.join("; "))
                }
                HostState::Failed { cause } => format!("{host}: FAILED: {cause}"),
                HostState::Exited => format!("{host}: exited"),
            },
            EventKind::Transfer {
                what,
                sent,
                total,
                cached,
            } => {
                if *cached {
                    format!("{host}: {what} already in the host's cache")
                } else if sent == total {
                    if !self.done_transfers.insert((host.clone(), what.clone())) {
                        return;
                    }
                    format!("{host}: copied {what} ({})", bytes(*total))
                } else {
                    // Progress lines only where a person watches.
                    if !is_terminal() {
                        return;
                    }
                    format!(
                        "{host}: copying {what} {}% of {}",
                        sent * 100 / (*total).max(1),
                        bytes(*total)
                    )
                }
            }
            EventKind::KnownHost { name, .. } => {
                format!("{host}: learned the host key of {name}")
            }
            // Only `arbor exec` asks for these; its own view prints them (node::exec).
            EventKind::Output { lines, stderr } => lines
                .split('\n')
                .map(|line| format!("{host} {} {line}", if *stderr { '!' } else { '|' }))
                .collect::<Vec<_>>()
                .join("\n"),
            EventKind::Ended { code, .. } => format!("{host}: command ended with exit code {code}"),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// The table at the end: host, result, time, bytes sent, binary from cache. Causes may
    /// quote remote text: it is shown without control characters.
    pub fn summary(&self, reports: &[HostReport], local: Option<(&str, bool, Duration)>) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:>8} {:>10} {:<6}  CAUSE",
            "HOST", "RESULT", "TIME", "SENT", "CACHED"
        );
        if let Some((name, ok, elapsed)) = local {
            let _ = writeln!(
                out,
                "{:<24} {:<8} {:>8} {:>10} {:<6}",
                format!("{name} (local)"),
                if ok { "ok" } else { "failed" },
                format!("{:.1}s", elapsed.as_secs_f64()),
                "-",
                "-"
            );
        }
        let mut sorted: Vec<&HostReport> = reports.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        for r in sorted {
            let _ = writeln!(
                out,
                "{:<24} {:<8} {:>8} {:>10} {:<6}  {}",
                r.name,
                if r.ok { "ok" } else { "failed" },
                format!("{:.1}s", r.elapsed.as_secs_f64()),
                bytes(r.bytes),
                match r.cached {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                },
                printable(r.cause.as_deref().unwrap_or(""))
            );
        }
        let tcp: Vec<&str> = reports
            .iter()
            .filter(|r| r.store_over_tcp)
            .map(|r| r.name.as_str())
            .collect();
        if !tcp.is_empty() {
            let _ = writeln!(
                out,
                "store tunnel on loopback TCP (sshd refused Unix-socket forwarding): {}",
                tcp.join(", ")
            );
        }
        let _ = out.flush();
    }
}

/// `text` as it may reach the terminal: control characters (which could move the cursor,
/// rewrite earlier lines or change the terminal's state) and bidirectional overrides become
/// visible escapes (`\x1b` → `^[`, others `\u{…}`); tabs stay. Whatever a remote host sends
/// passes through here; the colours arbor adds itself are added after.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            c if !bad(c) => out.push(c),
            c if (c as u32) < 0x20 => {
                out.push('^');
                out.push(char::from(b'@' + c as u8));
            }
            '\u{7f}' => out.push_str("^?"),
            c => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// An event with every text a remote host chose made printable.
pub fn sanitized(event: &Event) -> Event {
    let p = |s: &str| printable(s).into_owned();
    let kind = match &event.kind {
        EventKind::Log { line, stderr } => EventKind::Log {
            line: p(line),
            stderr: *stderr,
        },
        EventKind::State(state) => EventKind::State(match state {
            HostState::Staging { step } => HostState::Staging { step: p(step) },
            HostState::Unhealthy { failures } => HostState::Unhealthy {
                failures: failures.iter().map(|f| p(f)).collect(),
            },
            HostState::Failed { cause } => HostState::Failed { cause: p(cause) },
            other => other.clone(),
        }),
        EventKind::Transfer {
            what,
            sent,
            total,
            cached,
        } => EventKind::Transfer {
            what: p(what),
            sent: *sent,
            total: *total,
            cached: *cached,
        },
        EventKind::KnownHost { name, key } => EventKind::KnownHost {
            name: p(name),
            key: p(key),
        },
        // Line by line: the newlines that separate them stay.
        EventKind::Output { lines, stderr } => EventKind::Output {
            lines: lines.split('\n').map(p).collect::<Vec<_>>().join("\n"),
            stderr: *stderr,
        },
        EventKind::Ended { code, signal } => EventKind::Ended {
            code: *code,
            signal: signal.as_deref().map(p),
        },
    };
    Event {
        host: event.host.clone(),
        kind,
    }
}

fn is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}

/// 1234567 → "1.2 MB".
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_text_reaches_the_terminal_without_control_characters() {
        assert_eq!(printable("plain\ttext"), "plain\ttext");
        assert_eq!(
            printable("\x1b[2J\x1b]0;owned\x07red\rback"),
            "^[[2J^[]0;owned^Gred^Mback"
        );
        assert_eq!(printable("a\u{202E}b\u{7f}"), "a\\u{202e}b^?");
        assert_eq!(printable("line\nnext"), "line^Jnext");
    }
}
