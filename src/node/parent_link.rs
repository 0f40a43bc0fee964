//! A child's end of the link to its parent: control frames on stdin, event frames on stdout.
//!
//! stdout carries nothing but frames, so a child's log goes up as `Log` events (and into
//! `arbor.log` in its working dir); stderr stays free for panics and raw text, which the
//! parent relays as the child's stderr lines.

use crate::wire::resume::{Accepted, LinkSeqs, Numbered};
use crate::wire::{
    Down, Event, EventKind, FrameReader, FrameWriter, HostPath, Start, Up, WireError,
};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// How many frames wait to be written up at most; with frames of at most
/// [`MAX_UP_FRAME`](crate::wire::MAX_UP_FRAME) bytes, a node never queues more than 64 MiB
/// for its parent. Events from children wait for room (backpressure reaches them through
/// their own bounded queues); this node's own log lines are dropped, and counted, when the
/// queue is full, since the log cannot wait.
pub const UP_QUEUE: usize = 1024;

/// Sends events up. Cheap to clone; the writer task drains the queue.
#[derive(Clone)]
pub struct Upstream {
    tx: mpsc::Sender<Up>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// Cancelled once this node gave up on its parent: nothing waits for room any more.
    gone: tokio_util::sync::CancellationToken,
}

impl Upstream {
    /// An event about `host` (relative to this node: the root path is this node itself);
    /// waits for room in the queue (while the link is down too), but not once this node
    /// gave up on its parent: then the event is dropped, so a node whose queue filled during
    /// an outage still gets to tear its subtree down.
    pub async fn event(&self, host: HostPath, kind: EventKind) {
        self.send(Up::Event(Event { host, kind })).await;
    }

    async fn send(&self, frame: Up) {
        tokio::select! {
            _ = self.tx.send(frame) => {}
            _ = self.gone.cancelled() => {}
        }
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
        if lost > 0 && self.tx.capacity() > 1 {
            let note = format!("({lost} log lines were dropped: the link to the parent was full)");
            if self
                .tx
                .try_send(Up::Event(Event {
                    host: HostPath::root(),
                    kind: EventKind::Log {
                        line: note,
                        stderr: false,
                    },
                }))
                .is_ok()
            {
                self.dropped.fetch_sub(lost, Ordering::Relaxed);
            }
        }
        let sent = self.tx.try_send(Up::Event(Event {
            host: HostPath::root(),
            kind: EventKind::Log {
                line: crate::wire::cut_line(&line),
                stderr: false,
            },
        }));
        if sent.is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
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
    /// closed or broken, or nothing from it for the link timeout and then the reconnect grace
    /// (a link that died without a FIN and did not come back). Cancel-safe.
    pub async fn recv(&mut self) -> Option<Down> {
        self.rx.recv().await
    }

    /// Reads stdin on a task of its own, so that the link timeout measures the parent's
    /// silence, not how long this node took to ask for the next frame. After `timeout` of
    /// silence the link counts as down, but this node keeps running for `grace` more: if a
    /// frame comes within it (the same SSH connection, once the network is back), the link
    /// is up again and nothing was lost (SSH and TCP retransmit what was in flight).
    fn spawn(
        mut reader: FrameReader<tokio::io::Stdin>,
        timeout: std::time::Duration,
        grace: std::time::Duration,
        seqs: Arc<LinkSeqs<Up>>,
        gone: tokio_util::sync::CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let _gone = gone.drop_guard();
            let mut down_since: Option<std::time::Instant> = None;
            loop {
                let wait = if down_since.is_some() { grace } else { timeout };
                let frame = match tokio::time::timeout(wait, reader.recv::<Numbered<Down>>()).await
                {
                    Err(_) if down_since.is_none() && !grace.is_zero() => {
                        tracing::warn!(
                            "no word from the parent for {}s: the link is down; this node and \
                             its subtree keep running for up to {}s while it comes back",
                            timeout.as_secs(),
                            grace.as_secs()
                        );
                        down_since = Some(std::time::Instant::now());
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!(
                            "no word from the parent for {}s: the link is down for good; \
                             tearing this subtree down",
                            (timeout
                                + if down_since.is_some() {
                                    grace
                                } else {
                                    Default::default()
                                })
                            .as_secs()
                        );
                        break;
                    }
                    Ok(frame) => frame,
                };
                if let Some(since) = down_since.take()
                    && matches!(frame, Ok(Some(_)))
                {
                    tracing::warn!(
                        "the link to the parent is back after {}s down; {}",
                        (since.elapsed() + timeout).as_secs(),
                        seqs.report("up", "down")
                    );
                }
                // A numbered frame is taken once, in order (crate::wire::resume).
                let frame = match frame {
                    Ok(Some(Numbered { seq, frame })) if seq > 0 => match seqs.accept(seq) {
                        Accepted::Duplicate => continue,
                        Accepted::Gap { lost } => {
                            tracing::error!(
                                "control link: {lost} frame(s) from the parent never came \
                                 (#{seq} after #{})",
                                seq - lost - 1
                            );
                            Ok(Some(frame))
                        }
                        Accepted::New => Ok(Some(frame)),
                    },
                    other => other.map(|f| f.map(|n| n.frame)),
                };
                match frame {
                    Ok(Some(Down::Heartbeat)) => {}
                    Ok(Some(Down::Ack { acked })) => seqs.acked(acked),
                    Ok(Some(frame)) => {
                        if tx.send(frame).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("control link: {e}");
                        break;
                    }
                }
            }
        });
        Downstream { rx }
    }
}

/// Opens the link on stdin/stdout: hello both ways, then the `Start` frame. The returned
/// [`Upstream`] keeps a writer task alive until every clone is dropped; the join handle
/// completes when the last queued frame is written.
pub async fn open() -> Result<(Start, Upstream, Downstream, tokio::task::JoinHandle<()>), WireError>
{
    let (tx, mut rx) = mpsc::channel::<Up>(UP_QUEUE);
    let seqs = LinkSeqs::<Up>::new();
    let numbering = seqs.clone();
    let writer = tokio::spawn(async move {
        let mut out = FrameWriter::new(tokio::io::stdout());
        while let Some(frame) = rx.recv().await {
            // Events and fetches are numbered; hellos and heartbeats (acks) are not.
            let frame = match frame {
                Up::Event(_) | Up::Fetch { .. } => numbering.number(frame),
                other => Numbered::bare(other),
            };
            if out.send(&frame).await.is_err() {
                break;
            }
        }
    });
    let gone = tokio_util::sync::CancellationToken::new();
    let up = Upstream {
        tx,
        dropped: Arc::default(),
        gone: gone.clone(),
    };
    let _ = up.tx.send(Up::hello()).await;
    let mut reader = FrameReader::new(tokio::io::stdin());
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
            let _ = tx.try_send(Up::Ack {
                acked: acks.received(),
            });
        }
    });
    let down = Downstream::spawn(
        reader,
        std::time::Duration::from_secs(start.config.link_timeout.max(1)),
        std::time::Duration::from_secs(start.config.reconnect_grace),
        seqs,
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
