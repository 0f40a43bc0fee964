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
        if self.stopping
            && matches!(
                event.kind,
                EventKind::State(HostState::Changed | HostState::Converged | HostState::Running)
            )
        {
            return;
        }
        let host = event.host.to_string();
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
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// The table at the end: host, result, time, bytes sent, binary from cache.
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
                r.cause.as_deref().unwrap_or("")
            );
        }
        let _ = out.flush();
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
