//! A child's end of the link to its parent: control frames on stdin, event frames on stdout.
//!
//! stdout carries nothing but frames, so a child's log goes up as `Log` events (and into
//! `arbor.log` in its working dir); stderr stays free for panics and raw text, which the
//! parent relays as the child's stderr lines.

use crate::wire::{
    Down, Event, EventKind, FrameReader, FrameWriter, HostPath, Start, Up, WireError,
};
use std::io::Write;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Sends events up. Cheap to clone; sending never blocks (the writer task drains the queue).
#[derive(Clone)]
pub struct Upstream {
    tx: mpsc::UnboundedSender<Up>,
}

impl Upstream {
    /// An event about `host` (relative to this node: the root path is this node itself).
    pub fn event(&self, host: HostPath, kind: EventKind) {
        let _ = self.tx.send(Up::Event(Event { host, kind }));
    }

    /// An event about this node itself.
    pub fn own(&self, kind: EventKind) {
        self.event(HostPath::root(), kind);
    }

    /// Forwards a child's event as it is (already tagged under this node).
    pub fn forward(&self, event: Event) {
        let _ = self.tx.send(Up::Event(event));
    }

    /// Asks the parent to copy the build with this sha256 into this node's cache; the answer
    /// comes down as `Down::Fetched`.
    pub fn fetch(&self, sha256: String) {
        let _ = self.tx.send(Up::Fetch { sha256 });
    }
}

/// Control frames from the parent.
pub struct Downstream {
    reader: FrameReader<tokio::io::Stdin>,
}

impl Downstream {
    /// The next control frame; `None` when the parent is gone (stdin closed or broken).
    pub async fn recv(&mut self) -> Option<Down> {
        match self.reader.recv::<Down>().await {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!("control link: {e}");
                None
            }
        }
    }
}

/// Opens the link on stdin/stdout: hello both ways, then the `Start` frame. The returned
/// [`Upstream`] keeps a writer task alive until every clone is dropped; the join handle
/// completes when the last queued frame is written.
pub async fn open() -> Result<(Start, Upstream, Downstream, tokio::task::JoinHandle<()>), WireError>
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Up>();
    let writer = tokio::spawn(async move {
        let mut out = FrameWriter::new(tokio::io::stdout());
        while let Some(frame) = rx.recv().await {
            if out.send(&frame).await.is_err() {
                break;
            }
        }
    });
    let up = Upstream { tx };
    let _ = up.tx.send(Up::hello());
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
    Ok((start, up, Downstream { reader }, writer))
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
                up.own(EventKind::Log {
                    line: text,
                    stderr: false,
                });
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
