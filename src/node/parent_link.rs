//! A child's end of the link to its parent: control frames on stdin, event frames on stdout.
//!
//! stdout carries nothing but frames, so a child's log goes up as `Log` events (and into
//! `arbor.log` in its working dir); stderr stays free for panics and raw text, which the
//! parent relays as the child's stderr lines.

use super::reattach::{BoxRead, BoxWrite, LinkReader, Offer};
use crate::wire::resume::{Accepted, LinkSeqs, Numbered};
use crate::wire::{
    Down, Event, EventKind, FrameReader, FrameWriter, HostPath, Start, Up, WireError,
};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// How many bytes of frames (as written, JSON) wait at most to be written up: this node's
/// events and log lines and its subtree's, while the link is slow or down. Events from
/// children wait for room (backpressure reaches them through their own budgets); this
/// node's own log lines are dropped, and counted, when there is none, since the log cannot
/// wait. Frames already written and not yet acknowledged are kept apart, within
/// [`REPLAY_BUDGET`](crate::wire::resume::REPLAY_BUDGET).
pub const UP_BUDGET: usize = 16 << 20;

/// The queue's length in frames: never what binds (no frame up is under 64 bytes), so the
/// budget above is the bound. Tokio allocates the queue's slots as they fill.
const UP_QUEUE: usize = UP_BUDGET / 64;

/// A frame waiting to be written up, holding its share of [`UP_BUDGET`] until it is.
pub struct Queued {
    frame: Up,
    _room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Queued {
    /// A frame outside the budget: hellos and heartbeats, a few bytes each and never many.
    fn bare(frame: Up) -> Self {
        Queued { frame, _room: None }
    }
}

/// How much of the budget `frame` takes: its size as written.
fn weight(frame: &Up) -> u32 {
    let size = serde_json::to_vec(frame).map_or(crate::wire::MAX_UP_FRAME, |v| v.len());
    size.min(UP_BUDGET) as u32
}

/// How long an exiting node waits for its parent to read its last frames on a QUIC link.
const QUIC_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends events up. Cheap to clone; the writer task drains the queue.
#[derive(Clone)]
pub struct Upstream {
    tx: mpsc::Sender<Queued>,
    /// What is left of [`UP_BUDGET`].
    room: Arc<tokio::sync::Semaphore>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Cancelled once this node gave up on its parent: nothing waits for room any more.
    gone: tokio_util::sync::CancellationToken,
}

impl Upstream {
    /// An upstream whose frames go to the returned queue, within `budget` bytes.
    fn queue(budget: usize) -> (Upstream, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(UP_QUEUE.max(1));
        let up = Upstream {
            tx,
            room: Arc::new(tokio::sync::Semaphore::new(budget)),
            dropped: Arc::default(),
            gone: tokio_util::sync::CancellationToken::new(),
        };
        (up, rx)
    }

    /// An event about `host` (relative to this node: the root path is this node itself);
    /// waits for room in the queue (while the link is down too), but not once this node
    /// gave up on its parent: then the event is dropped, so a node whose queue filled during
    /// an outage still gets to tear its subtree down.
    pub async fn event(&self, host: HostPath, kind: EventKind) {
        self.send(Up::Event(Event { host, kind })).await;
    }

    /// Queues `frame` once there is room for it in the budget.
    async fn send(&self, frame: Up) {
        let weight = weight(&frame);
        tokio::select! {
            room = self.room.clone().acquire_many_owned(weight) => {
                let queued = Queued { frame, _room: room.ok() };
                tokio::select! {
                    _ = self.tx.send(queued) => {}
                    _ = self.gone.cancelled() => {}
                }
            }
            _ = self.gone.cancelled() => {}
        }
    }

    /// Queues `frame` if there is room for it now.
    fn try_send(&self, frame: Up) -> bool {
        let Ok(room) = self.room.clone().try_acquire_many_owned(weight(&frame)) else {
            return false;
        };
        self.tx
            .try_send(Queued {
                frame,
                _room: Some(room),
            })
            .is_ok()
    }

    /// An event about this node itself.
    pub async fn own(&self, kind: EventKind) {
        self.event(HostPath::root(), kind).await;
    }

    /// Forwards a child's event as it is (already tagged under this node).
    pub async fn forward(&self, event: Event) {
        self.send(Up::Event(event)).await;
    }

    /// A log line of this node's: sent if there is room, else dropped and counted (the next
    /// line that fits says how many were lost).
    fn log(&self, line: String) {
        use std::sync::atomic::Ordering;
        let lost = self.dropped.load(Ordering::Relaxed);
        let log = |line: String| {
            Up::Event(Event {
                host: HostPath::root(),
                kind: EventKind::Log {
                    line,
                    stderr: false,
                },
            })
        };
        if lost > 0 {
            let note = format!("({lost} log lines were dropped: the link to the parent was full)");
            if self.try_send(log(note)) {
                self.dropped.fetch_sub(lost, Ordering::Relaxed);
            }
        }
        if !self.try_send(log(crate::wire::cut_line(&line))) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The last frame: this node exits with `code`.
    pub async fn bye(&self, code: u8) {
        self.send(Up::Bye { code }).await;
    }

    /// Asks the parent to copy the build with this sha256 into this node's cache; the answer
    /// comes down as `Down::Fetched`.
    pub async fn fetch(&self, sha256: String) {
        self.send(Up::Fetch { sha256 }).await;
    }
}

/// Control frames from the parent.
pub struct Downstream {
    rx: mpsc::Receiver<Down>,
}

impl Downstream {
    /// The next control frame other than a heartbeat; `None` when the parent is gone: stdin
    /// closed or broken (and no re-attach within the grace period when one was offered), or
    /// nothing from it for the link timeout and then the reconnect grace (a link that died
    /// without a FIN and did not come back). Cancel-safe.
    pub async fn recv(&mut self) -> Option<Down> {
        self.rx.recv().await
    }

    /// Reads the link on a task of its own, so that the link timeout measures the parent's
    /// silence, not how long this node took to ask for the next frame. After `timeout` of
    /// silence the link counts as down, but this node keeps running for `grace` more: if a
    /// frame comes within it (the same SSH connection, once the network is back), the link
    /// is up again and nothing was lost (SSH and TCP retransmit what was in flight). When the
    /// parent offered a re-attach (a token came), a stream that ends or breaks counts as down
    /// too, and the parent may re-attach over a new one (`swaps`, crate::node::reattach)
    /// within the grace period.
    fn spawn(
        reader: LinkReader,
        timeout: std::time::Duration,
        grace: std::time::Duration,
        seqs: Arc<LinkSeqs<Up>>,
        offer: Arc<Offer>,
        mut swaps: Option<mpsc::Receiver<LinkReader>>,
        gone: tokio_util::sync::CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let _gone = gone.drop_guard();
            let mut reader = Some(reader);
            let mut down_since: Option<tokio::time::Instant> = None;
            // Cancelled when the SSH channel the link moved away from (onto QUIC) ended and the
            // parent's end of the QUIC connection did not answer a probe: a killed parent
            // (whose SSH connection closes, where its QUIC connection just goes quiet).
            let parent_gone = tokio_util::sync::CancellationToken::new();
            let mut gone_seen = false;
            loop {
                let deadline = match down_since {
                    Some(since) => since + grace,
                    None => tokio::time::Instant::now() + timeout,
                };
                let frame = tokio::select! {
                    biased;
                    () = parent_gone.cancelled(), if !gone_seen && down_since.is_none() && !grace.is_zero() => {
                        gone_seen = true;
                        tracing::warn!(
                            "the parent's SSH connection closed and its QUIC end does not \
                             answer: the link is down; this node and its subtree keep running \
                             for up to {}s while it comes back",
                            grace.as_secs()
                        );
                        down_since = Some(tokio::time::Instant::now());
                        continue;
                    }
                    swapped = next_swap(&mut swaps) => {
                        if let (Some(old), Some(connection)) = (reader.take(), offer.quic_connection()) {
                            tokio::spawn(drain(old, connection, parent_gone.clone()));
                        }
                        reader = Some(swapped);
                        match down_since.take() {
                            Some(since) => tracing::warn!(
                                "the link to the parent is back after {}s down: it re-attached \
                                 over a new connection; {}",
                                since.elapsed().as_secs(),
                                seqs.report("up", "down")
                            ),
                            // The parent moving the link onto QUIC, as it does at start.
                            None if offer.on_quic() => tracing::debug!(
                                "the link moved onto QUIC; {}",
                                seqs.report("up", "down")
                            ),
                            None => tracing::warn!(
                                "the parent re-attached over a new connection; {}",
                                seqs.report("up", "down")
                            ),
                        }
                        continue;
                    }
                    read = tokio::time::timeout_at(deadline, recv_from(&mut reader)) => read,
                };
                let frame = match frame {
                    Err(_) if down_since.is_none() && !grace.is_zero() => {
                        tracing::warn!(
                            "no word from the parent for {}s: the link is down; this node and \
                             its subtree keep running for up to {}s while it comes back",
                            timeout.as_secs(),
                            grace.as_secs()
                        );
                        down_since = Some(tokio::time::Instant::now());
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(
                            "the link to the parent is down for good (nothing from it, and no \
                             re-attach, within the {}s grace); tearing this subtree down",
                            grace.as_secs()
                        );
                        break;
                    }
                    Ok(frame) => frame,
                };
                // A stream that ended or broke: with a re-attach offered, wait for one.
                let ended = match &frame {
                    Ok(None) => Some("closed".to_string()),
                    Err(e) => Some(e.to_string()),
                    Ok(Some(_)) => None,
                };
                if let Some(why) = ended {
                    if offer.offered.load(std::sync::atomic::Ordering::SeqCst)
                        && !grace.is_zero()
                        && swaps.is_some()
                    {
                        tracing::warn!(
                            "the connection to the parent ended ({why}); this node and its \
                             subtree keep running for up to {}s for the parent to re-attach",
                            grace.as_secs()
                        );
                        reader = None;
                        down_since.get_or_insert_with(tokio::time::Instant::now);
                        continue;
                    }
                    if let Err(e) = &frame {
                        tracing::warn!("control link: {e}");
                    }
                    break;
                }
                if let Some(since) = down_since.take() {
                    tracing::warn!(
                        "the link to the parent is back after {}s down; {}",
                        (since.elapsed() + timeout).as_secs(),
                        seqs.report("up", "down")
                    );
                }
                let Ok(Some(Numbered { seq, frame })) = frame else {
                    break;
                };
                // A numbered frame is taken once, in order (crate::wire::resume).
                if seq > 0 {
                    match seqs.accept(seq) {
                        Accepted::Duplicate => continue,
                        Accepted::Gap { lost } => {
                            tracing::error!(
                                "control link: {lost} frame(s) from the parent never came \
                                 (#{seq} after #{})",
                                seq - lost - 1
                            );
                        }
                        Accepted::New => {}
                    }
                }
                match frame {
                    Down::Heartbeat => {}
                    Down::Ack { acked } => seqs.acked(acked),
                    Down::Reattach { token } => offer.token(token),
                    Down::NoQuic => offer.no_quic(),
                    frame => {
                        if tx.send(frame).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Downstream { rx }
    }
}

/// The next frame from the current stream; pending while there is none (it ended, and a
/// re-attach may bring another).
async fn recv_from(reader: &mut Option<LinkReader>) -> Result<Option<Numbered<Down>>, WireError> {
    match reader {
        Some(r) => r.recv::<Numbered<Down>>().await,
        None => std::future::pending().await,
    }
}

/// Reads the SSH stream the link moved away from (onto QUIC) to its end (what still comes
/// there is dropped: a re-attach replays what was not taken). Then probes the parent's end
/// of `connection`: a byte on a stream of its own, which a live parent's QUIC stack
/// acknowledges within milliseconds; nothing back within [`PROBE`] (and no frame meanwhile)
/// means the parent is gone (`gone`).
async fn drain(
    mut old: LinkReader,
    connection: quinn::Connection,
    gone: tokio_util::sync::CancellationToken,
) {
    while let Ok(Some(_)) = old.recv::<Numbered<Down>>().await {}
    if connection.close_reason().is_some() {
        return;
    }
    let before = connection.stats().udp_rx.datagrams;
    if let Ok(mut probe) = connection.open_uni().await {
        let _ = probe.write_all(&[0]).await;
        let _ = probe.finish();
    }
    tokio::time::sleep(PROBE).await;
    if connection.stats().udp_rx.datagrams == before {
        gone.cancel();
    }
}

/// How long a probe of the parent's QUIC end waits for any answer.
const PROBE: std::time::Duration = std::time::Duration::from_millis(1500);

/// The next stream a re-attach brought; pending forever once no more can come.
async fn next_swap<T>(swaps: &mut Option<mpsc::Receiver<T>>) -> T {
    let got = match swaps.as_mut() {
        Some(rx) => rx.recv().await,
        None => None,
    };
    match got {
        Some(x) => x,
        None => {
            *swaps = None;
            std::future::pending().await
        }
    }
}

/// Sends up the frames the parent did not take before it re-attached (those after `acked`),
/// on the new stream; `None` if that stream broke already.
async fn resume_writer(
    writer: BoxWrite,
    acked: u64,
    seqs: &LinkSeqs<Up>,
) -> Option<FrameWriter<BoxWrite>> {
    let mut out = FrameWriter::new(writer);
    match seqs.replay_after(acked) {
        Ok(frames) => {
            let count = frames.len();
            for frame in frames {
                if out.send(&frame).await.is_err() {
                    return None;
                }
            }
            tracing::debug!(
                "re-attached: sent again the {count} frame(s) up the parent had not taken \
                 (after #{acked})"
            );
        }
        Err(first) => tracing::error!(
            "re-attached, but the frames up from #{first} on were forgotten (past the replay \
             budget of {} bytes): they are lost",
            crate::wire::resume::REPLAY_BUDGET
        ),
    }
    Some(out)
}

/// Opens the link on stdin/stdout: hello both ways, then the `Start` frame. The returned
/// [`Upstream`] keeps a writer task alive until every clone is dropped; the join handle
/// completes when the last queued frame is written. `workdir`: where the re-attach socket
/// goes, once the parent offers one (crate::node::reattach).
pub async fn open(
    workdir: Option<std::path::PathBuf>,
) -> Result<(Start, Upstream, Downstream, tokio::task::JoinHandle<()>), WireError> {
    let (up, mut rx) = Upstream::queue(UP_BUDGET);
    let seqs = LinkSeqs::<Up>::new();
    let numbering = seqs.clone();
    let (readers_tx, readers_rx) = mpsc::channel::<LinkReader>(1);
    let (writers_tx, writers_rx) = mpsc::channel::<(BoxWrite, u64)>(1);
    let offer = Offer::new(workdir, seqs.clone(), readers_tx, writers_tx);
    let offered = offer.offered.clone();
    let last_quic = offer.clone();
    let gone = up.gone.clone();
    let given_up = gone.clone();
    let writer = tokio::spawn(async move {
        let mut swaps = Some(writers_rx);
        let stdout: BoxWrite = Box::new(tokio::io::stdout());
        let mut out = Some(FrameWriter::new(stdout));
        loop {
            let frame = tokio::select! {
                biased;
                (writer, acked) = next_swap(&mut swaps) => {
                    out = resume_writer(writer, acked, &numbering).await;
                    continue;
                }
                // Its share of the budget is given back once it is written, or numbered and
                // kept for a replay.
                queued = rx.recv(), if out.is_some() => match queued {
                    Some(queued) => queued,
                    None => break,
                },
                // No stream, and the parent was given up on: nothing more goes anywhere.
                () = given_up.cancelled(), if out.is_none() => break,
            };
            let Queued { frame, _room: held } = frame;
            // Events and fetches are numbered; hellos and heartbeats (acks) are not. The
            // replay budget counts a frame's size as the up budget weighed it.
            let frame = match (frame, &held) {
                (frame @ (Up::Event(_) | Up::Fetch { .. }), Some(room)) => {
                    numbering.number_weighed(frame, room.num_permits())
                }
                (frame @ (Up::Event(_) | Up::Fetch { .. }), None) => numbering.number(frame),
                (other, _) => Numbered::bare(other),
            };
            let Some(current) = out.as_mut() else {
                continue;
            };
            // A write stuck on a dead connection gives way to a re-attach, which sends this
            // frame again if it was numbered.
            let sent = tokio::select! {
                biased;
                (writer, acked) = next_swap(&mut swaps) => {
                    out = resume_writer(writer, acked, &numbering).await;
                    continue;
                }
                sent = current.send(&frame) => sent,
            };
            if sent.is_err() {
                if offered.load(std::sync::atomic::Ordering::SeqCst) {
                    // Kept numbered: a re-attach sends it again.
                    out = None;
                } else {
                    break;
                }
            }
        }
        // Over QUIC, frames written are not sent yet: wait for the parent to have read to
        // the end of the stream (it closes the connection then).
        let connection = last_quic
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(connection) = connection {
            if let Some(out) = out.as_mut() {
                let _ = out.shutdown().await;
            }
            let _ = tokio::time::timeout(QUIC_FLUSH, connection.closed()).await;
        }
    });
    let _ = up.tx.send(Queued::bare(Up::hello())).await;
    let stdin: BoxRead = Box::new(tokio::io::stdin());
    let mut reader = FrameReader::new(stdin);
    match reader.recv::<Down>().await? {
        Some(Down::Hello(hello)) => hello.check()?,
        Some(_) => return Err(WireError::NoHello),
        None => return Err(WireError::Closed),
    }
    let start = match reader.recv::<Down>().await? {
        Some(Down::Start(start)) => *start,
        Some(_) => return Err(WireError::NoHello),
        None => return Err(WireError::Closed),
    };
    if let Some(quic) = &start.quic {
        let said = super::quic_child::listen(quic, &start.config, offer.clone());
        let _ = up.tx.send(Queued::bare(said)).await;
    }
    // Heartbeats up, while anything else holds the upstream (a weak handle does not keep
    // the writer alive at exit).
    let weak = up.tx.downgrade();
    let every = crate::wire::heartbeat_every(start.config.link_timeout);
    let acks = seqs.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(tx) = weak.upgrade() else { break };
            // Each heartbeat acknowledges the control frames taken so far. A full queue
            // means frames are flowing anyway.
            let _ = tx.try_send(Queued::bare(Up::Ack {
                acked: acks.received(),
            }));
        }
    });
    let down = Downstream::spawn(
        reader,
        std::time::Duration::from_secs(start.config.link_timeout.max(1)),
        std::time::Duration::from_secs(start.config.reconnect_grace),
        seqs,
        offer,
        Some(readers_rx),
        gone,
    );
    Ok((start, up, down, writer))
}

/// A `tracing` writer for a child: each log line goes up as a `Log` event, and into the
/// working dir's log file while the node runs.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Mutex<EventLogInner>>,
}

struct EventLogInner {
    up: Option<Upstream>,
    file: Option<std::fs::File>,
    pending: Vec<u8>,
}

impl EventLog {
    pub fn new(file: Option<std::fs::File>) -> Self {
        EventLog {
            inner: Arc::new(Mutex::new(EventLogInner {
                up: None,
                file,
                pending: Vec::new(),
            })),
        }
    }

    /// Lines logged before the link is open are kept in the file only.
    pub fn attach(&self, up: Upstream) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.up = Some(up);
        }
    }

    /// Stops sending lines up (they still go to the file). The subscriber keeps its clone of
    /// this log for the life of the process, so without this the writer task would never see
    /// the last [`Upstream`] drop, and the node's exit would wait for its deadline.
    pub fn detach(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.up = None;
        }
    }
}

impl Write for EventLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(buf.len());
        };
        if let Some(file) = inner.file.as_mut() {
            let _ = file.write_all(buf);
        }
        inner.pending.extend_from_slice(buf);
        while let Some(pos) = inner.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = inner.pending.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if let Some(up) = &inner.up {
                up.log(text);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for EventLog {
    type Writer = EventLog;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn line(text: &str) -> Up {
        Up::Event(Event {
            host: HostPath::root(),
            kind: EventKind::Log {
                line: text.to_string(),
                stderr: false,
            },
        })
    }

    #[tokio::test]
    async fn frames_up_wait_within_a_byte_budget_and_log_lines_past_it_are_counted() {
        let text = "x".repeat(1000);
        let each = weight(&line(&text)) as usize;
        let (up, mut rx) = Upstream::queue(4 * each + 50);
        // Four lines fit; the fifth and sixth do not, and are counted.
        for _ in 0..6 {
            up.log(text.clone());
        }
        assert_eq!(up.dropped.load(std::sync::atomic::Ordering::Relaxed), 2);
        // An event waits for room (the budget, not the queue's length, is what binds).
        let waiting = tokio::spawn({
            let up = up.clone();
            let text = text.clone();
            async move {
                up.own(EventKind::Log {
                    line: text,
                    stderr: false,
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "queued past the budget");
        // A frame's room comes back once it is done with (written), not when it is taken.
        let first = rx.recv().await.expect("queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "room given back before the frame was written"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room came back")
            .expect("task");
        // The next line that fits says how many were lost.
        for _ in 0..4 {
            drop(rx.recv().await.expect("queued"));
        }
        up.log("after".into());
        let mut said = Vec::new();
        while let Ok(q) = rx.try_recv() {
            if let Up::Event(Event {
                kind: EventKind::Log { line, .. },
                ..
            }) = q.frame
            {
                said.push(line);
            }
        }
        assert_eq!(
            said,
            [
                "(2 log lines were dropped: the link to the parent was full)",
                "after"
            ]
        );
        // A node that gave up on its parent waits for nothing.
        up.gone.cancel();
        tokio::time::timeout(
            Duration::from_secs(1),
            up.own(EventKind::Log {
                line: "x".repeat(UP_BUDGET),
                stderr: false,
            }),
        )
        .await
        .expect("no wait once gone");
    }
}
