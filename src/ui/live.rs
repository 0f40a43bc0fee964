//! The live view on a terminal: one overall bar (hosts done out of the total, bytes sent, rate,
//! failures, time), a line for each host that is working or failing, and one line that folds
//! every converged host into a nodeset (`r1/l1-[1-3] converged`). Host log lines and failures
//! print above it, whole; it never draws more lines than the terminal has.
//!
//! arbor's own messages on stderr go through [`suspended`] while a view is drawn, so they
//! print above it too instead of tearing it.

use crate::wire::{Event, EventKind, HostState};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The view being drawn, if any, for [`suspended`].
static DRAWN: Mutex<Option<MultiProgress>> = Mutex::new(None);

/// Runs `f` (which writes to the terminal) with the live view, if one is drawn, lifted out of
/// the way, so what `f` prints lands above the view and the view is drawn again below it.
pub fn suspended<R>(f: impl FnOnce() -> R) -> R {
    let drawn = DRAWN.lock().ok().and_then(|d| d.clone());
    match drawn {
        Some(multi) => multi.suspend(f),
        None => f(),
    }
}

/// Runs `f` (which talks with the person at the terminal, e.g. asks a passphrase) with the
/// live view, if one is drawn, cleared and not drawn again until `f` returns.
pub fn paused<R>(f: impl FnOnce() -> R) -> R {
    let drawn = DRAWN.lock().ok().and_then(|d| d.clone());
    let Some(multi) = drawn else {
        return f();
    };
    let _ = multi.clear();
    multi.set_draw_target(ProgressDrawTarget::hidden());
    let result = f();
    multi.set_draw_target(ProgressDrawTarget::stdout_with_hz(10));
    result
}

/// Lines the view keeps for itself besides host lines: the overall bar, "and N more", the
/// folded converged hosts, and one so the cursor's line never scrolls the top away.
const OWN_LINES: usize = 4;

/// What the view knows of one host.
#[derive(Debug, Clone, Default)]
struct Host {
    /// Runs arbor only to relay (no graph): done once running.
    bare: bool,
    /// What it is doing now, as shown on its line.
    doing: String,
    converged: bool,
    failed: bool,
    /// Settled with failures: shown as failing, but done.
    unhealthy: bool,
    /// When its line last changed, to show the most recently active hosts first.
    touched: u64,
}

impl Host {
    fn done(&self) -> bool {
        self.converged || self.failed || self.unhealthy
    }
    fn failing(&self) -> bool {
        self.failed || self.unhealthy
    }
}

pub struct Live {
    multi: MultiProgress,
    overall: ProgressBar,
    /// One line per shown host, top to bottom: failing hosts first, then the busiest.
    slots: Vec<ProgressBar>,
    more: Option<ProgressBar>,
    folded: Option<ProgressBar>,
    hosts: BTreeMap<String, Host>,
    bytes: u64,
    started: Instant,
    ticks: u64,
    /// How many host lines fit under the terminal's height.
    room: usize,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("a fixed template")
        .progress_chars("=> ")
}

impl Live {
    /// A view for the run's hosts, by path, each with whether it only relays (no graph),
    /// drawn on stdout, which must be a terminal.
    pub fn new(hosts: &[(String, bool)]) -> Live {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout_with_hz(10));
        let rows = console::Term::stdout().size().0 as usize;
        let overall = multi.add(ProgressBar::new(hosts.len() as u64));
        overall.set_style(style(
            "[{bar:30}] {pos}/{len} hosts {wide_msg} {elapsed:>4}",
        ));
        overall.enable_steady_tick(Duration::from_millis(250));
        let hosts = hosts
            .iter()
            .map(|(path, bare)| {
                (
                    path.clone(),
                    Host {
                        bare: *bare,
                        doing: "waiting".into(),
                        ..Host::default()
                    },
                )
            })
            .collect();
        if let Ok(mut drawn) = DRAWN.lock() {
            *drawn = Some(multi.clone());
        }
        let mut live = Live {
            multi,
            overall,
            slots: Vec::new(),
            more: None,
            folded: None,
            hosts,
            bytes: 0,
            started: Instant::now(),
            ticks: 0,
            room: rows.saturating_sub(OWN_LINES),
        };
        live.redraw();
        live
    }

    /// Prints `line` above the view.
    pub fn println(&self, line: &str) {
        let _ = self.multi.println(line);
    }

    /// Takes in an event (already sanitised). Returns whether it should also print above the
    /// view as a line: host output, failures, learned host keys and diffs do; stages do not, as the
    /// host's own line shows them.
    pub fn event(&mut self, event: &Event) -> bool {
        let path = event.host.to_string();
        self.ticks += 1;
        let ticks = self.ticks;
        let host = self.hosts.entry(path).or_default();
        let print = match &event.kind {
            EventKind::State(state) => {
                host.doing = super::state_text(state);
                host.converged = match state {
                    HostState::Running => host.bare,
                    HostState::Converged => true,
                    _ => false,
                };
                // A link down is printed too: the operator should see it come and go.
                let failing = matches!(
                    state,
                    HostState::Failed { .. }
                        | HostState::Unhealthy { .. }
                        | HostState::Reconnecting { .. }
                );
                host.failed |= matches!(state, HostState::Failed { .. });
                host.unhealthy = matches!(state, HostState::Unhealthy { .. })
                    || host.unhealthy && matches!(state, HostState::Failed { .. });
                failing
            }
            EventKind::Transfer {
                what,
                sent,
                total,
                cached,
            } => {
                // What crossed this host's own links: transfers to its children.
                if !cached && sent == total && event.host.depth() == 1 {
                    self.bytes += total;
                }
                host.doing = super::transfer_text(what, *sent, *total, *cached);
                false
            }
            EventKind::Log { .. }
            | EventKind::KnownHost { .. }
            | EventKind::Output { .. }
            | EventKind::Diff { .. } => true,
            EventKind::Ended { .. } => true,
            EventKind::Link { .. } => false,
        };
        if !print {
            host.touched = ticks;
        }
        self.redraw();
        print
    }

    /// Puts the current state on the lines: the overall bar, the failing and busiest hosts
    /// (as many as fit), how many more there are, and the converged ones folded.
    fn redraw(&mut self) {
        let done = self.hosts.values().filter(|h| h.done()).count();
        let failed = self.hosts.values().filter(|h| h.failing()).count();
        let seconds = self.started.elapsed().as_secs_f64().max(0.1);
        self.overall.set_length(self.hosts.len() as u64);
        self.overall.set_position(done as u64);
        let mut msg = format!(
            "{} sent, {}/s",
            super::bytes(self.bytes),
            super::bytes((self.bytes as f64 / seconds) as u64)
        );
        if failed > 0 {
            msg.push_str(&format!(", {failed} failed"));
        }
        self.overall.set_message(msg);

        let mut shown: Vec<(&String, &Host)> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.failing() || !h.converged)
            .collect();
        shown.sort_by_key(|(_, h)| (!h.failing(), std::cmp::Reverse(h.touched)));
        let hidden = shown.len().saturating_sub(self.room);
        shown.truncate(self.room);
        shown.sort_by_key(|(_, h)| !h.failing());

        let width = shown
            .iter()
            .map(|(p, _)| p.len())
            .max()
            .unwrap_or(0)
            .min(24);
        while self.slots.len() > shown.len() {
            if let Some(bar) = self.slots.pop() {
                bar.finish_and_clear();
                self.multi.remove(&bar);
            }
        }
        while self.slots.len() < shown.len() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(style("  {prefix} {wide_msg}"));
            let bar = match self.slots.last() {
                Some(last) => self.multi.insert_after(last, bar),
                None => self.multi.insert_after(&self.overall, bar),
            };
            self.slots.push(bar);
        }
        for (bar, (path, host)) in self.slots.iter().zip(&shown) {
            bar.set_prefix(format!("{path:<width$}"));
            bar.set_message(host.doing.clone());
        }

        let anchor = self.slots.last().unwrap_or(&self.overall).clone();
        self.more = line(
            &self.multi,
            self.more.take(),
            &anchor,
            (hidden > 0).then(|| format!("  … and {hidden} more hosts at work")),
        );
        let converged: Vec<&str> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.converged && !h.failing())
            .map(|(p, _)| p.as_str())
            .collect();
        let anchor = self.more.as_ref().unwrap_or(&anchor).clone();
        self.folded = line(
            &self.multi,
            self.folded.take(),
            &anchor,
            (!converged.is_empty())
                .then(|| format!("  {} converged", crate::topology::nodeset::fold(&converged))),
        );
    }

    /// Ends the view: it stays on the screen as last drawn (the overall bar and the folded
    /// line; host lines go) and later text prints below it as plain lines.
    pub fn finish(&mut self) {
        self.redraw();
        for bar in self.slots.drain(..) {
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
        if let Some(more) = self.more.take() {
            more.finish_and_clear();
            self.multi.remove(&more);
        }
        self.overall.finish();
        if let Some(folded) = &self.folded {
            folded.finish();
        }
        if let Ok(mut drawn) = DRAWN.lock() {
            *drawn = None;
        }
    }
}

/// Keeps an optional one-line bar showing `text` after `anchor`: makes it, updates it, or
/// removes it when there is nothing to show.
fn line(
    multi: &MultiProgress,
    bar: Option<ProgressBar>,
    anchor: &ProgressBar,
    text: Option<String>,
) -> Option<ProgressBar> {
    match (bar, text) {
        (Some(bar), Some(text)) => {
            bar.set_message(text);
            Some(bar)
        }
        (None, Some(text)) => {
            let bar = multi.insert_after(anchor, ProgressBar::new_spinner());
            bar.set_style(style("{wide_msg}"));
            bar.set_message(text);
            Some(bar)
        }
        (Some(bar), None) => {
            bar.finish_and_clear();
            multi.remove(&bar);
            None
        }
        (None, None) => None,
    }
}

/// stderr for arbor's own log while a view may be drawn: each write lands above the view.
pub struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        suspended(|| std::io::stderr().write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
