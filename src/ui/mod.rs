//! The operator's view: every event from every host, live, one line each, and the summary at
//! the end. Host output reads like the article's `host | line`, but as it happens.

pub mod live;

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
    /// What the link from its parent ran on last (`quic`, `ssh`), with why not QUIC when
    /// QUIC was tried; `None` when no link was set up.
    pub transport: Option<(String, Option<String>)>,
}

/// The version of the JSON event schema (docs/events.md).
pub const EVENTS_VERSION: u32 = 1;

/// At most one progress event per host and transfer this often in JSON.
const JSON_PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Prints events as they arrive (stdout), in arrival order: lines for people, or with
/// [`Ui::json`] one JSON object per line for programs.
#[derive(Default)]
pub struct Ui {
    /// Transfers already reported as finished, so repeated updates print once.
    done_transfers: std::collections::HashSet<(String, String)>,
    json: bool,
    /// `-q`: only failures, settling with failures, and warnings or errors from hosts.
    quiet: bool,
    /// `--log-file`: every event as a timestamped text line, whatever the view shows.
    log_file: Option<std::fs::File>,
    /// JSON: transfers whose final event was written.
    json_done: std::collections::HashSet<(String, String)>,
    /// JSON: when each (host, transfer) last had a progress event.
    progress_at: std::collections::HashMap<(String, String), std::time::Instant>,
    /// The run is being torn down: hosts still running see the ones already gone withdraw
    /// their exports, and those "changed"/"converged" flips say nothing about the run.
    stopping: bool,
    /// `--output text`: plain lines even on a terminal.
    plain: bool,
    /// The live view, while one is drawn (text output on a terminal, not `-q`).
    live: Option<live::Live>,
    /// The live view was drawn and has ended: lines follow it as they would on it, without
    /// timestamps.
    live_ended: bool,
}

impl Ui {
    pub fn new() -> Self {
        Self::default()
    }

    /// The view a run asks for: JSON or text (`plain`: never the live view), `quiet`, and a
    /// log file (opened to append).
    pub fn for_run(
        json: bool,
        plain: bool,
        quiet: bool,
        log_file: Option<&std::path::Path>,
    ) -> std::io::Result<Self> {
        let log_file = match log_file {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => None,
        };
        Ok(Ui {
            json,
            plain,
            quiet,
            log_file,
            ..Self::default()
        })
    }

    /// Appends `line` to the log file, if any, after a timestamp.
    fn record(&self, line: &str) {
        if let Some(mut f) = self.log_file.as_ref() {
            let _ = writeln!(f, "{} {line}", timestamp(std::time::SystemTime::now()));
        }
    }

    /// Whether `-q` hides this event: everything but failures, links down, settling with failures, host
    /// log lines at warn or error level, and diffs (asked for with `--diff`).
    fn hidden_when_quiet(kind: &EventKind) -> bool {
        match kind {
            EventKind::State(
                HostState::Failed { .. }
                | HostState::Unhealthy { .. }
                | HostState::Reconnecting { .. },
            ) => false,
            EventKind::Diff { .. } => false,
            EventKind::Log { line, .. } => {
                let level = line.split_whitespace().next().unwrap_or_default();
                !matches!(level, "WARN" | "ERROR")
            }
            _ => true,
        }
    }

    /// Writes one JSON object, with the schema version, the type and a timestamp, as a line.
    fn emit(&self, kind: &str, host: Option<&str>, mut fields: serde_json::Value) {
        let mut object = serde_json::json!({
            "v": EVENTS_VERSION,
            "ts": timestamp(std::time::SystemTime::now()),
            "type": kind,
        });
        if let Some(host) = host {
            object["host"] = host.into();
        }
        if let (Some(object), Some(fields)) = (object.as_object_mut(), fields.as_object_mut()) {
            object.append(fields);
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{object}");
        let _ = out.flush();
    }

    fn event_json(&mut self, event: &Event) {
        use serde_json::json;
        let host = event.host.to_string();
        let (kind, fields) = match &event.kind {
            EventKind::Log { line, stderr } => (
                "log",
                json!({ "stream": if *stderr { "stderr" } else { "stdout" }, "line": line }),
            ),
            EventKind::State(HostState::Staging { step }) => ("stage", json!({ "step": step })),
            EventKind::State(state) => {
                let (name, extra) = match state {
                    HostState::Staging { .. } | HostState::Running => ("running", json!({})),
                    HostState::Converged => ("converged", json!({})),
                    HostState::Changed => ("changed", json!({})),
                    HostState::Unhealthy { failures } => {
                        ("unhealthy", json!({ "failures": failures }))
                    }
                    HostState::Failed { cause } => ("failed", json!({ "cause": cause })),
                    HostState::Reconnecting { grace } => {
                        ("reconnecting", json!({ "grace": grace }))
                    }
                    HostState::Exited => ("exited", json!({})),
                };
                let mut fields = json!({ "state": name });
                if let (Some(f), Some(extra)) = (fields.as_object_mut(), extra.as_object()) {
                    f.extend(extra.clone());
                }
                ("state", fields)
            }
            EventKind::Transfer {
                what,
                sent,
                total,
                cached,
            } => {
                let key = (host.clone(), what.clone());
                let done = *cached || sent == total;
                let now = std::time::Instant::now();
                if done {
                    if !self.json_done.insert(key) {
                        return;
                    }
                } else if self
                    .progress_at
                    .get(&key)
                    .is_some_and(|at| now.duration_since(*at) < JSON_PROGRESS_EVERY)
                {
                    return;
                } else {
                    self.progress_at.insert(key, now);
                }
                (
                    "transfer",
                    json!({ "what": what, "sent": sent, "total": total, "cached": cached }),
                )
            }
            EventKind::KnownHost { name, .. } => ("host_key", json!({ "name": name })),
            EventKind::Diff { resource, lines } => {
                ("diff", json!({ "resource": resource, "lines": lines }))
            }
            // Only `arbor exec` asks for these (node::exec prints them itself).
            EventKind::Output { lines, stderr } => (
                "output",
                json!({
                    "stream": if *stderr { "stderr" } else { "stdout" },
                    "lines": lines.split('\n').collect::<Vec<_>>(),
                }),
            ),
            EventKind::Ended { code, signal } => {
                ("ended", json!({ "code": code, "signal": signal }))
            }
            EventKind::Link { transport, note } => {
                ("link", json!({ "transport": transport, "note": note }))
            }
        };
        self.emit(kind, Some(&host), fields);
    }

    /// From now on, state flips other than exits and failures are not shown.
    /// The run's hosts, by path, each with whether it only relays (runs no graph): on a
    /// terminal, with text output and without `-q`, the live view starts here. Elsewhere
    /// events print as plain timestamped lines.
    pub fn hosts(&mut self, hosts: &[(String, bool)]) {
        if !self.json && !self.plain && !self.quiet && is_terminal() && self.live.is_none() {
            self.live = Some(live::Live::new(hosts));
        }
    }

    /// The run is being torn down: the live view ends (as last drawn) and what follows
    /// prints as plain lines.
    pub fn stopping(&mut self) {
        self.stopping = true;
        if let Some(mut live) = self.live.take() {
            live.finish();
            self.live_ended = true;
        }
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
        if self.json {
            if self.log_file.is_some()
                && let Some(line) = self.text_line(event)
            {
                self.record(&line);
            }
            self.event_json(event);
            return;
        }
        let line = self.text_line(event);
        if let Some(live) = self.live.as_mut() {
            if live.event(event)
                && let Some(line) = &line
            {
                live.println(line);
            }
            if let Some(line) = &line {
                self.record(line);
            }
            return;
        }
        let Some(line) = line else {
            return;
        };
        self.record(&line);
        if self.quiet && Self::hidden_when_quiet(&event.kind) {
            return;
        }
        let stamp = match self.live_ended {
            true => String::new(),
            false => timestamp(std::time::SystemTime::now()) + " ",
        };
        let mut out = std::io::stdout().lock();
        for line in line.split('\n') {
            let _ = writeln!(out, "{stamp}{line}");
        }
        let _ = out.flush();
    }

    /// The text line for `event`, or `None` for a transfer update not worth a line (a
    /// repeated "copied", progress where no terminal shows it).
    fn text_line(&mut self, event: &Event) -> Option<String> {
        let host = printable(&event.host.to_string()).into_owned();
        let line = match &event.kind {
            EventKind::Log { line, stderr } => {
                if *stderr {
                    format!("{host} ! {line}")
                } else {
                    format!("{host} | {line}")
                }
            }
            EventKind::State(state) => format!("{host}: {}", state_text(state)),
            EventKind::Transfer {
                what,
                sent,
                total,
                cached,
            } => {
                // Progress shows on the live view's host line, never as lines.
                if !cached
                    && (sent != total || !self.done_transfers.insert((host.clone(), what.clone())))
                {
                    return None;
                }
                format!("{host}: {}", transfer_text(what, *sent, *total, *cached))
            }
            EventKind::KnownHost { name, .. } => {
                format!("{host}: learned the host key of {name}")
            }
            EventKind::Diff { lines, .. } => lines
                .iter()
                .map(|line| format!("{host} | {line}"))
                .collect::<Vec<_>>()
                .join("\n"),
            // Only `arbor exec` asks for these; its own view prints them (node::exec).
            EventKind::Output { lines, stderr } => lines
                .split('\n')
                .map(|line| format!("{host} {} {line}", if *stderr { '!' } else { '|' }))
                .collect::<Vec<_>>()
                .join("\n"),
            EventKind::Ended { code, .. } => format!("{host}: command ended with exit code {code}"),
            EventKind::Link { transport, note } => match note {
                Some(note) => format!("{host}: link on {} ({note})", transport.to_uppercase()),
                None => format!("{host}: link on {}", transport.to_uppercase()),
            },
        };
        Some(line)
    }

    /// The table at the end: host, result, time, bytes sent, binary from cache. Causes may
    /// quote remote text: it is shown without control characters. In JSON, one `summary`
    /// object that also carries the run's exit code.
    pub fn summary(
        &mut self,
        reports: &[HostReport],
        local: Option<(&str, bool, Duration)>,
        exit_code: u8,
    ) {
        if self.json {
            let mut hosts: Vec<serde_json::Value> = Vec::new();
            if let Some((name, ok, elapsed)) = local {
                hosts.push(serde_json::json!({
                    "host": name, "local": true, "result": if ok { "ok" } else { "failed" },
                    "seconds": elapsed.as_secs_f64(),
                }));
            }
            let mut sorted: Vec<&HostReport> = reports.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            for r in sorted {
                hosts.push(serde_json::json!({
                    "host": r.name,
                    "result": if r.ok { "ok" } else { "failed" },
                    "seconds": r.elapsed.as_secs_f64(),
                    "bytes_sent": r.bytes,
                    "cached": r.cached,
                    "cause": r.cause.as_deref().map(|c| printable(c).into_owned()),
                    "store_over_tcp": r.store_over_tcp,
                    "transport": r.transport.as_ref().map(|(t, _)| t),
                }));
            }
            self.emit(
                "summary",
                None,
                serde_json::json!({ "exit_code": exit_code, "hosts": hosts }),
            );
            return;
        }
        if let Some(mut live) = self.live.take() {
            live.finish();
        }
        use std::fmt::Write as _;
        let mut out = String::from("\n");
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
        // Which transport each link used, the reasons QUIC was not used grouped.
        let mut links: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
        for r in reports {
            if let Some((transport, note)) = &r.transport {
                let key = match note {
                    Some(note) => format!("{} ({})", transport.to_uppercase(), printable(note)),
                    None => transport.to_uppercase(),
                };
                links.entry(key).or_default().push(r.name.as_str());
            }
        }
        for (how, mut names) in links {
            names.sort();
            let _ = writeln!(out, "links on {how}: {}", names.join(", "));
        }
        self.record(&out);
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}

/// What a host's state says, after its name: on a text line and on the live view's line.
pub(crate) fn state_text(state: &HostState) -> String {
    match state {
        HostState::Staging { step } => step.clone(),
        HostState::Running => "running".into(),
        HostState::Converged => "converged".into(),
        HostState::Changed => "changed".into(),
        HostState::Unhealthy { failures } => {
            format!("settled with failures: {}", failures.join("; "))
        }
        HostState::Failed { cause } => format!("FAILED: {cause}"),
        HostState::Reconnecting { grace } => {
            format!("reconnecting (link down; its subtree runs on for up to {grace}s)")
        }
        HostState::Exited => "exited".into(),
    }
}

/// What a transfer says, after the host's name.
pub(crate) fn transfer_text(what: &str, sent: u64, total: u64, cached: bool) -> String {
    if cached {
        format!("{what} already in the host's cache")
    } else if sent == total {
        format!("copied {what} ({})", bytes(total))
    } else {
        format!(
            "copying {what} {}% of {}",
            sent * 100 / total.max(1),
            bytes(total)
        )
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
        EventKind::Diff { resource, lines } => EventKind::Diff {
            resource: p(resource),
            lines: lines.iter().map(|l| p(l)).collect(),
        },
        EventKind::Link { transport, note } => EventKind::Link {
            transport: p(transport),
            note: note.as_deref().map(p),
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

/// Seconds since the epoch as UTC (year, month, day, hour, minute, second).
pub fn civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem / 60 % 60, rem % 60)
}

/// `t` in RFC 3339, UTC, with milliseconds: `2026-12-02T01:55:00.123Z`.
pub fn timestamp(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (year, month, day, h, m, s) = civil(d.as_secs());
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        d.subsec_millis()
    )
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
    fn timestamps_are_rfc3339_utc() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_796_176_500_123);
        assert_eq!(timestamp(t), "2026-12-02T01:55:00.123Z");
        assert_eq!(timestamp(std::time::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2024-02-29, a leap day.
        assert_eq!(civil(1_709_164_800), (2024, 2, 29, 0, 0, 0));
    }

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
