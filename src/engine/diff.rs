//! `--diff`: what a resource changes (or, in noop mode, would change), as lines for people.
//!
//! A diff is made on the host that holds the file, so only the lines travel up the tree, and
//! they travel as one event: every diff is capped ([`MAX_LINES`] lines, [`MAX_BYTES`] bytes,
//! each line cut at [`MAX_LINE_BYTES`]) so that it always fits one frame to the parent
//! (`wire::MAX_UP_FRAME`, even once every byte is JSON-escaped), whatever the file holds.
//! Binary content is never shown: only that it differs, and the sizes.

use crate::engine::resources::ResourceId;
use std::time::Duration;
use tokio::sync::mpsc;

/// At most this many lines per diff, the `… N more lines` marker included.
pub const MAX_LINES: usize = 200;
/// At most this many bytes of lines per diff (before escaping).
pub const MAX_BYTES: usize = 8 * 1024;
/// A longer line is cut there, marked with `…`.
pub const MAX_LINE_BYTES: usize = 512;
/// How long the diff algorithm may look for the smallest diff before it settles for a larger
/// one: a big file must not stall the check.
const DIFF_TIMEOUT: Duration = Duration::from_millis(500);
/// Content with a NUL byte in its first 8000 bytes is binary, as git decides.
const BINARY_SNIFF: usize = 8000;

/// One resource's diff, as the engine reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDiff {
    pub resource: ResourceId,
    /// Capped lines, without newlines.
    pub lines: Vec<String>,
}

/// Where resources send their diffs (`--diff`); the engine's owner reads them from
/// [`Engine::take_diffs`](crate::engine::Engine::take_diffs). Unbounded: a check never waits for the
/// link, and each diff is capped.
#[derive(Clone)]
pub struct DiffSink(mpsc::UnboundedSender<ResourceDiff>);

impl DiffSink {
    pub fn channel() -> (DiffSink, mpsc::UnboundedReceiver<ResourceDiff>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (DiffSink(tx), rx)
    }

    pub fn send(&self, resource: &ResourceId, lines: Vec<String>) {
        let _ = self.0.send(ResourceDiff {
            resource: resource.clone(),
            lines,
        });
    }
}

/// Lines under the caps: pushes until one cap is reached, then only counts, and ends with the
/// `… N more lines` marker.
#[derive(Default)]
pub struct Capped {
    lines: Vec<String>,
    bytes: usize,
    more: usize,
}

impl Capped {
    pub fn push(&mut self, line: &str) {
        let line = cut(line);
        // Room is kept for the marker.
        if self.more > 0
            || self.lines.len() + 1 >= MAX_LINES
            || self.bytes + line.len() > MAX_BYTES - 64
        {
            self.more += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(line);
    }

    /// Counts `n` lines not shown.
    fn skip(&mut self, n: usize) {
        self.more += n;
    }

    pub fn full(&self) -> bool {
        self.more > 0
    }

    pub fn finish(mut self) -> Vec<String> {
        if self.more > 0 {
            let s = if self.more == 1 { "" } else { "s" };
            self.lines.push(format!("… {} more line{s}", self.more));
        }
        self.lines
    }
}

/// `line` cut at [`MAX_LINE_BYTES`] (at a character boundary), marked when cut.
pub fn cut(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_string();
    }
    let mut end = MAX_LINE_BYTES - '…'.len_utf8();
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// Whether `bytes` are to be shown as text: UTF-8 without a NUL near the start.
pub fn is_text(bytes: &[u8]) -> bool {
    !bytes[..bytes.len().min(BINARY_SNIFF)].contains(&0) && std::str::from_utf8(bytes).is_ok()
}

/// The content part of a diff, `old` (`None`: no file) to `new`, into `out`: the `---`/`+++`
/// header, then hunks with 3 lines of context, or `Binary files differ` with both sizes.
pub fn content(out: &mut Capped, path: &str, old: Option<&[u8]>, new: &[u8]) {
    let old_name = if old.is_some() { path } else { "/dev/null" };
    out.push(&format!("--- {old_name}"));
    out.push(&format!("+++ {path}"));
    let old_bytes = old.unwrap_or_default();
    if !is_text(old_bytes) || !is_text(new) {
        out.push(&format!(
            "Binary files differ ({} bytes on the host, {} bytes in the graph)",
            old_bytes.len(),
            new.len()
        ));
        return;
    }
    // Both are UTF-8 (checked just above).
    let (old_text, new_text) = (
        std::str::from_utf8(old_bytes).unwrap_or_default(),
        std::str::from_utf8(new).unwrap_or_default(),
    );
    if old.is_none() && new_text.is_empty() {
        out.push("new empty file");
        return;
    }
    let diff = similar::TextDiff::configure()
        .timeout(DIFF_TIMEOUT)
        .diff_lines(old_text, new_text);
    for hunk in diff.unified_diff().context_radius(3).iter_hunks() {
        if out.full() {
            // Only counted from here: one header and one line per change.
            out.skip(1 + hunk.iter_changes().count());
            continue;
        }
        out.push(&hunk.header().to_string());
        for change in hunk.iter_changes() {
            let value = change.to_string_lossy();
            out.push(&format!(
                "{}{}",
                change.tag(),
                value.strip_suffix('\n').unwrap_or(&value)
            ));
            if change.missing_newline() {
                out.push("\\ No newline at end of file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(old: Option<&str>, new: &str) -> Vec<String> {
        let mut out = Capped::default();
        content(
            &mut out,
            "/etc/motd",
            old.map(str::as_bytes),
            new.as_bytes(),
        );
        out.finish()
    }

    #[test]
    fn a_changed_line_is_a_unified_hunk_with_context() {
        let lines = diff(Some("a\nb\nc\n"), "a\nB\nc\n");
        assert_eq!(
            lines,
            [
                "--- /etc/motd",
                "+++ /etc/motd",
                "@@ -1,3 +1,3 @@",
                " a",
                "-b",
                "+B",
                " c"
            ]
        );
    }

    #[test]
    fn a_new_file_is_all_added() {
        assert_eq!(
            diff(None, "x\ny\n"),
            [
                "--- /dev/null",
                "+++ /etc/motd",
                "@@ -0,0 +1,2 @@",
                "+x",
                "+y"
            ]
        );
        assert_eq!(diff(None, "")[2], "new empty file");
        assert_eq!(
            diff(Some("x"), "x\n")[3..],
            ["-x", "\\ No newline at end of file", "+x"]
        );
    }

    #[test]
    fn a_long_diff_is_capped_with_a_count_of_what_is_left() {
        let new: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let lines = diff(None, &new);
        assert_eq!(lines.len(), MAX_LINES);
        // 2 headers, the hunk header and 1000 lines: all but the ones shown are counted.
        let shown = MAX_LINES - 1;
        assert_eq!(
            lines[MAX_LINES - 1],
            format!("… {} more lines", 1003 - shown)
        );
        // Bytes are capped too, and long lines cut.
        let wide: String = (0..100)
            .map(|_| format!("{}\n", "w".repeat(2000)))
            .collect();
        let lines = diff(None, &wide);
        assert!(lines.iter().map(String::len).sum::<usize>() <= MAX_BYTES);
        assert!(lines[3].len() <= MAX_LINE_BYTES && lines[3].ends_with('…'));
        assert!(lines.last().is_some_and(|l| l.starts_with("… ")));
    }

    #[test]
    fn the_largest_diff_fits_one_frame_to_the_parent_even_escaped() {
        // Control characters take six bytes each once JSON-escaped.
        let nasty: String = (0..2000)
            .map(|_| format!("{}\n", "\u{1}".repeat(3000)))
            .collect();
        let mut out = Capped::default();
        content(&mut out, &"\u{1}".repeat(5000), None, nasty.as_bytes());
        let diff = ResourceDiff {
            resource: ResourceId::new(crate::engine::resources::Kind::File, "\u{1}".repeat(9000)),
            lines: out.finish(),
        };
        let event = crate::wire::Up::Event(crate::wire::Event {
            host: crate::wire::HostPath::parse("a-long-relay-name/another/and-a-leaf"),
            kind: crate::node::diff_event(diff),
        });
        let size = serde_json::to_vec(&event).expect("json").len();
        assert!(size < crate::wire::MAX_UP_FRAME, "{size} bytes");
    }

    #[test]
    fn binary_content_is_never_shown() {
        let mut out = Capped::default();
        content(
            &mut out,
            "/bin/x",
            Some(b"\x7fELF\0\0\x01secret"),
            b"text\n",
        );
        let lines = out.finish();
        assert_eq!(
            lines[2],
            "Binary files differ (13 bytes on the host, 5 bytes in the graph)"
        );
        assert_eq!(lines.len(), 3);
        assert!(!is_text(b"\xff\xfe"), "invalid UTF-8 counts as binary");
    }
}
