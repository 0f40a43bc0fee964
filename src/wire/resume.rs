//! Sequence numbers and acknowledgements on a link's frames, both ways.
//!
//! Every frame that carries something (events and fetches up; graphs, fetch answers and
//! shutdowns down) goes out [`Numbered`] with the next sequence number of its direction,
//! starting at 1; hellos, heartbeats and acks carry none (0). Each end acknowledges the last
//! number it took in order with an `Ack` frame on every heartbeat, and keeps what it sent and
//! was not yet acknowledged in an [`Outbox`], within a byte budget: that is what a re-attach
//! over a new connection would replay ([`Outbox::replay_after`]). The receiving end's
//! [`Inbox`] takes each number once, in order: a number it already took is a duplicate and is
//! dropped, a number past the next one is a gap (frames lost), which it counts and reports.
//!
//! On one SSH connection TCP never loses or repeats a frame, so there the numbers only confirm
//! it. When the parent re-attaches over a new SSH connection (crate::node::reattach), each end
//! sends again what the other says it has not taken ([`LinkSeqs::replay_after`]), and the
//! inboxes drop what had come both ways. A link that comes back reports how many frames were
//! in flight and whether any was lost or repeated.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How many bytes of sent but unacknowledged frames each end of a link keeps at most. Past
/// it the oldest are forgotten (counted), and a replay that would need them is refused.
pub const REPLAY_BUDGET: usize = 16 * 1024 * 1024;

/// A frame with its sequence number (0: none), as one JSON object (`{"seq":7,"type":…}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Numbered<T> {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    #[serde(flatten)]
    pub frame: T,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl<T> Numbered<T> {
    /// A frame without a number (hello, heartbeat, ack).
    pub fn bare(frame: T) -> Self {
        Numbered { seq: 0, frame }
    }
}

/// What one end sent and the other has not acknowledged yet.
#[derive(Debug)]
pub struct Outbox<T> {
    next: u64,
    kept: VecDeque<(u64, usize, T)>,
    bytes: usize,
    budget: usize,
    /// The highest number forgotten before it was acknowledged (budget exceeded), 0 if none.
    forgotten_through: u64,
    /// The highest number acknowledged.
    acked: u64,
}

impl<T: Clone> Outbox<T> {
    pub fn new(budget: usize) -> Self {
        Outbox {
            next: 1,
            kept: VecDeque::new(),
            bytes: 0,
            budget,
            forgotten_through: 0,
            acked: 0,
        }
    }

    /// Numbers `frame` (of `size` bytes on the wire) and keeps a copy until it is
    /// acknowledged; forgets the oldest copies past the budget.
    pub fn number(&mut self, frame: T, size: usize) -> Numbered<T> {
        let seq = self.next;
        self.next += 1;
        self.kept.push_back((seq, size, frame.clone()));
        self.bytes += size;
        while self.bytes > self.budget
            && let Some((old, size, _)) = self.kept.pop_front()
        {
            self.bytes -= size;
            self.forgotten_through = old;
        }
        Numbered { seq, frame }
    }

    /// The other end took every frame up to `seq`: forget them. A number never sent is
    /// ignored (the other end is confused, or lying).
    pub fn ack(&mut self, seq: u64) {
        if seq >= self.next || seq <= self.acked {
            return;
        }
        self.acked = seq;
        while self.kept.front().is_some_and(|(s, _, _)| *s <= seq) {
            if let Some((_, size, _)) = self.kept.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// Frames sent and not acknowledged: how many, and their bytes.
    pub fn unacked(&self) -> (usize, usize) {
        (self.kept.len(), self.bytes)
    }

    /// The highest number sent (0: none yet).
    pub fn last_sent(&self) -> u64 {
        self.next - 1
    }

    /// Every frame after `seq` (what the other end says it took last), to send again; `Err`
    /// with the first number that is no longer kept when the budget made it forget some.
    pub fn replay_after(&self, seq: u64) -> Result<Vec<Numbered<T>>, u64> {
        if seq < self.forgotten_through {
            return Err(seq + 1);
        }
        Ok(self
            .kept
            .iter()
            .filter(|(s, _, _)| *s > seq)
            .map(|(s, _, f)| Numbered {
                seq: *s,
                frame: f.clone(),
            })
            .collect())
    }
}

/// What an [`Inbox`] made of a numbered frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// The next one: handle it.
    New,
    /// Taken before: drop it.
    Duplicate,
    /// Past the next one: `lost` frames never came; handle it.
    Gap { lost: u64 },
}

/// The numbers one end took, in order.
#[derive(Debug, Default)]
pub struct Inbox {
    last: u64,
    pub duplicates: u64,
    pub lost: u64,
}

impl Inbox {
    pub fn accept(&mut self, seq: u64) -> Accepted {
        if seq <= self.last {
            self.duplicates += 1;
            return Accepted::Duplicate;
        }
        let lost = seq - self.last - 1;
        self.last = seq;
        if lost == 0 {
            Accepted::New
        } else {
            self.lost += lost;
            Accepted::Gap { lost }
        }
    }

    /// The last number taken: what this end acknowledges.
    pub fn last(&self) -> u64 {
        self.last
    }
}

/// One end of a link: the numbers of what it sends (frames of type `T`) and of what it
/// receives. Shared by the tasks that write and read the link.
#[derive(Debug)]
pub struct LinkSeqs<T> {
    out: std::sync::Mutex<Outbox<T>>,
    inbox: std::sync::Mutex<Inbox>,
}

fn lock<X>(m: &std::sync::Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Clone + Serialize> LinkSeqs<T> {
    pub fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(LinkSeqs {
            out: std::sync::Mutex::new(Outbox::new(REPLAY_BUDGET)),
            inbox: std::sync::Mutex::new(Inbox::default()),
        })
    }

    /// `frame` with the next number, kept until acknowledged.
    pub fn number(&self, frame: T) -> Numbered<T> {
        let size = serde_json::to_vec(&frame).map(|v| v.len()).unwrap_or(0);
        self.number_weighed(frame, size)
    }

    /// As [`LinkSeqs::number`], for a frame whose size as written (`size` bytes) the caller
    /// measured already.
    pub fn number_weighed(&self, frame: T, size: usize) -> Numbered<T> {
        lock(&self.out).number(frame, size)
    }

    /// The other end took everything up to `seq`.
    pub fn acked(&self, seq: u64) {
        lock(&self.out).ack(seq);
    }

    /// A numbered frame came in.
    pub fn accept(&self, seq: u64) -> Accepted {
        lock(&self.inbox).accept(seq)
    }

    /// What to acknowledge: the last number taken in order.
    pub fn received(&self) -> u64 {
        lock(&self.inbox).last()
    }

    /// Every frame sent after `seq` (what the other end says it took last), to send again on
    /// a re-attached link; `Err` with the first number no longer kept (budget exceeded).
    pub fn replay_after(&self, seq: u64) -> Result<Vec<Numbered<T>>, u64> {
        let mut out = lock(&self.out);
        out.ack(seq);
        out.replay_after(seq)
    }

    /// For a link that came back: what was in flight, and whether anything was lost or
    /// repeated (`sent` and `got` name the directions, as "up" and "down").
    pub fn report(&self, sent: &str, got: &str) -> String {
        let (count, bytes) = lock(&self.out).unacked();
        let inbox = lock(&self.inbox);
        let order = if inbox.lost == 0 && inbox.duplicates == 0 {
            "none lost or repeated".to_string()
        } else {
            format!("{} lost, {} repeated", inbox.lost, inbox.duplicates)
        };
        format!(
            "frames {sent}: {count} ({bytes} bytes) not yet acknowledged; frames {got}: #{} \
             taken in order, {order}",
            inbox.last()
        )
    }
}

/// What `arbor reattach` itself sends first on the re-attach socket, before it splices the
/// parent's stream to it: the agent socket of its own SSH connection (when the parent
/// forwards its agent), which replaces the one the node took at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Splice {
    #[serde(default)]
    pub agent: Option<String>,
    /// The parent serves its (constrained) agent on this link's own streams (a QUIC link:
    /// crate::node::quic_child::serve_agent), so the node needs no SSH connection's
    /// forwarded agent to log in to its children.
    #[serde(default)]
    pub agent_on_link: bool,
}

/// The parent's first frame on a re-attached link: the one-time token, and the last number
/// it took from the child in order (the child replays what came after).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub token: String,
    pub acked: u64,
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resume")
            .field("token", &"…")
            .field("acked", &self.acked)
            .finish()
    }
}

/// A new one-time re-attach token: 32 random bytes, in hex.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `given` is `expected`, in time that does not depend on where they differ.
pub fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for (i, expected) in b.iter().enumerate() {
        diff |= a.get(i).copied().unwrap_or(0) ^ expected;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_frames_are_forgotten_and_a_replay_sends_exactly_the_rest() {
        let mut out = Outbox::new(1000);
        for i in 0..5 {
            assert_eq!(out.number(format!("f{i}"), 10).seq, i + 1);
        }
        assert_eq!(out.unacked(), (5, 50));
        out.ack(2);
        assert_eq!(out.unacked(), (3, 30));
        // A late or repeated ack changes nothing; an ack of a number never sent is ignored.
        out.ack(1);
        out.ack(99);
        assert_eq!(out.unacked(), (3, 30));
        let again = out.replay_after(3).unwrap_or_default();
        assert_eq!(
            again
                .iter()
                .map(|n| (n.seq, n.frame.as_str()))
                .collect::<Vec<_>>(),
            vec![(4, "f3"), (5, "f4")]
        );
        // The receiving end takes the replay after what it had: nothing lost, nothing twice.
        let mut inbox = Inbox::default();
        for seq in 1..=3 {
            assert_eq!(inbox.accept(seq), Accepted::New);
        }
        // Frames 3, then 4 and 5 again, as a replay after an ack of 2 would send them.
        for n in out.replay_after(2).unwrap_or_default() {
            let _ = inbox.accept(n.seq);
        }
        assert_eq!((inbox.last(), inbox.duplicates, inbox.lost), (5, 1, 0));
    }

    #[test]
    fn past_the_budget_the_oldest_are_forgotten_and_a_replay_that_needs_them_is_refused() {
        let mut out = Outbox::new(25);
        for i in 0..4 {
            out.number(i, 10);
        }
        // 40 bytes kept would exceed 25: frames 1 and 2 went.
        assert_eq!(out.unacked(), (2, 20));
        assert_eq!(out.replay_after(1), Err(2));
        assert_eq!(
            out.replay_after(2).map(|v| v.len()),
            Ok(2),
            "the other end had 2: 3 and 4 are kept"
        );
        assert_eq!(out.last_sent(), 4);
    }

    #[test]
    fn tokens_are_fresh_and_compared_whole() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token(&b, &a));
        assert!(!same_token(&a[..63], &a));
        assert!(!same_token(&format!("{a}0"), &a));
        assert!(!same_token("", &a));
    }

    #[test]
    fn a_link_replays_after_the_peers_ack_and_forgets_what_it_took() {
        let seqs = LinkSeqs::<String>::new();
        for i in 0..4 {
            seqs.number(format!("f{i}"));
        }
        let again = seqs.replay_after(2).unwrap_or_default();
        assert_eq!(again.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![3, 4]);
        // The ack in the handshake counts: 1 and 2 are no longer kept.
        assert_eq!(lock(&seqs.out).unacked().0, 2);
    }

    #[test]
    fn an_inbox_counts_gaps_and_duplicates() {
        let mut inbox = Inbox::default();
        assert_eq!(inbox.accept(1), Accepted::New);
        assert_eq!(inbox.accept(4), Accepted::Gap { lost: 2 });
        assert_eq!(inbox.accept(4), Accepted::Duplicate);
        assert_eq!(inbox.accept(2), Accepted::Duplicate);
        assert_eq!(inbox.accept(5), Accepted::New);
        assert_eq!((inbox.last(), inbox.lost, inbox.duplicates), (5, 2, 2));
    }

    #[test]
    fn a_numbered_frame_is_one_object_and_a_bare_one_has_no_number() {
        use crate::wire::{Down, Up};
        let n = Numbered {
            seq: 7,
            frame: Down::Shutdown {
                reason: "done".into(),
            },
        };
        let text = serde_json::to_string(&n).unwrap_or_default();
        assert_eq!(text, r#"{"seq":7,"type":"shutdown","reason":"done"}"#);
        let back: Numbered<Down> = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, n);
        let bare = serde_json::to_string(&Numbered::bare(Up::Heartbeat)).unwrap_or_default();
        assert_eq!(bare, r#"{"type":"heartbeat"}"#);
        let old: Numbered<Up> = serde_json::from_str(r#"{"type":"heartbeat"}"#).expect("parse");
        assert_eq!(old.seq, 0);
        // Every frame survives the envelope, an ack's own number included.
        for frame in [Up::Ack { acked: 9 }, Up::Heartbeat, Up::hello()] {
            let text = serde_json::to_string(&Numbered::bare(frame.clone())).unwrap_or_default();
            let back: Numbered<Up> = serde_json::from_str(&text).expect("parse");
            assert_eq!(back.frame, frame, "{text}");
        }
        for frame in [Down::Ack { acked: 9 }, Down::Heartbeat, Down::hello()] {
            let text = serde_json::to_string(&Numbered {
                seq: 3,
                frame: frame.clone(),
            })
            .unwrap_or_default();
            let back: Numbered<Down> = serde_json::from_str(&text).expect("parse");
            assert_eq!((back.seq, back.frame), (3, frame), "{text}");
        }
    }
}
