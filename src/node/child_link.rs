//! The parent's end of a link to a staged child: the store tunnel, the exec of arbor on the
//! child, control frames down its stdin, and its event frames (and raw stderr) coming up.

use super::stage::Staged;
use crate::ssh::{CommandLine, Connector, ExecOptions, ExitStatus, ForwardEnd, Output, Session};
use crate::wire::resume::{Accepted, LinkSeqs, Numbered};
use crate::wire::{
    Down, Event, EventKind, FrameReader, FrameWriter, HostPath, MAX_LINE, MAX_UP_FRAME, Start, Up,
};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// What comes up from a child, already tagged with paths relative to the parent.
#[derive(Debug)]
pub enum FromChild {
    Event(Event),
    /// The child asks for the build with this sha256 (a child of its own runs on that
    /// build's platform).
    Fetch {
        sha256: String,
    },
    /// A heartbeat: the child is still there.
    Alive,
    /// The child listens for this node's QUIC connection (crate::wire::quic): on this UDP
    /// port, with the certificate of this sha256; or could not (`error`).
    Quic {
        port: u16,
        fingerprint: String,
        error: Option<String>,
    },
    /// The child's arbor ended (or the link broke). `error`: the last lines of its stderr.
    /// `attachment`: which connection's channel ended (0: the first; each re-attach counts
    /// one more), so the end of a connection the parent re-attached away from is told apart.
    Exited {
        status: ExitStatus,
        error: Option<String>,
        attachment: u32,
    },
}

/// The parent's handle on a running child: send control frames, and know its tunnel end.
pub struct ChildLink {
    writer: FrameWriter<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    /// The store tunnel's end on the child (none for `arbor exec`, which has no store).
    pub tunnel: Option<ForwardEnd>,
    /// The sequence numbers of this link: of the control frames sent down, of the frames
    /// taken from the child (crate::wire::resume).
    seqs: Arc<LinkSeqs<Down>>,
    /// Where every attachment's reader sends what comes up.
    events: mpsc::Sender<FromChild>,
    me: HostPath,
    allowed: Arc<HashSet<HostPath>>,
    /// Which connection the link is on now (0: the first).
    attachment: u32,
    /// The number the last re-attach try took (each try its own, so the end of a failed
    /// try's channel is never taken for the current one's).
    tries: u32,
    /// Stops the current attachment's reader once the link moved to a new one.
    reading: tokio_util::sync::CancellationToken,
    /// The one-time token the child holds, when it was offered a re-attach.
    token: Option<String>,
    /// The QUIC connection the link runs on, once it moved there.
    quic: Option<QuicLink>,
    /// The child was offered QUIC (`Start::quic`).
    quic_offered: bool,
}

/// A link's QUIC connection, and which attachment it is.
struct QuicLink {
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    attachment: u32,
}

/// What an attachment's reader needs: where frames go, and what the child may say.
#[derive(Clone)]
struct Sink {
    me: HostPath,
    allowed: Arc<HashSet<HostPath>>,
    seqs: Arc<LinkSeqs<Down>>,
    events: mpsc::Sender<FromChild>,
}

impl ChildLink {
    /// Sends a control frame; graphs, fetch answers and shutdowns go numbered.
    pub async fn send(&mut self, frame: &Down) -> Result<(), crate::wire::WireError> {
        match frame {
            Down::Hello(_) | Down::Start(_) | Down::Heartbeat | Down::Ack { .. } => {
                self.writer.send(&Numbered::bare(frame)).await
            }
            _ => {
                let numbered = self.seqs.number(frame.clone());
                self.writer.send(&numbered).await
            }
        }
    }

    /// A heartbeat, acknowledging the child's frames taken so far.
    pub async fn beat(&mut self) -> Result<(), crate::wire::WireError> {
        let seq = self.seqs.received();
        self.send(&Down::Ack { acked: seq }).await
    }

    /// What was in flight, and whether anything was lost or repeated (for a link back).
    pub fn sequence_report(&self) -> String {
        self.seqs.report("down", "up")
    }

    /// Closes the child's stdin: the child takes that as "parent gone" and exits.
    pub async fn close(&mut self) {
        let _ = self.writer.shutdown().await;
    }

    /// Whether the child was offered a re-attach (it holds a token).
    pub fn can_reattach(&self) -> bool {
        self.token.is_some()
    }

    /// Which connection the link is on now (0: the first).
    pub fn attachment(&self) -> u32 {
        self.attachment
    }

    /// Offers the child a re-attach: a new one-time token, down the link.
    async fn offer_token(&mut self) -> Result<(), crate::wire::WireError> {
        let token = crate::wire::resume::new_token();
        self.token = Some(token.clone());
        self.send(&Down::Reattach { token }).await
    }

    /// Moves the link onto `session`, a fresh SSH connection to the child's host: the store
    /// tunnel again (at the same socket, or the same loopback port), then `arbor reattach`
    /// there, the token, and the replay of what the child did not take; then a new token for
    /// the next time. On error the link stays where it was (a later try may work).
    pub async fn reattach(
        &mut self,
        session: &Session,
        staged: &Staged,
        store: Option<Arc<dyn Connector>>,
        forward_agent: bool,
        timeout: std::time::Duration,
    ) -> Result<(), String> {
        if self.token.is_none() {
            return Err("no re-attach was offered".to_string());
        }
        let label = session.label().to_string();
        let tunnel = match (&self.tunnel, store) {
            (Some(ForwardEnd::Unix(path)), Some(store)) => {
                // The old connection's sshd may still hold (or have left) the socket there.
                let rm = CommandLine::new("rm").args(["-f", "--", path]);
                let _ = session.output(rm.as_str()).await;
                Some(
                    session
                        .forward_unix(path, store)
                        .await
                        .map_err(|e| format!("store tunnel: {e}"))?,
                )
            }
            (Some(ForwardEnd::Tcp(port)), Some(store)) => Some(
                session
                    .forward_tcp_port(*port, store)
                    .await
                    .map_err(|e| format!("store tunnel: {e}"))?,
            ),
            (tunnel, _) => tunnel.clone(),
        };
        let line = CommandLine::new(&staged.binary).args(["reattach", "--dir", &staged.workdir]);
        let command = session
            .exec(line.as_str(), &ExecOptions { forward_agent })
            .await
            .map_err(|e| format!("{label}: reattach: {e}"))?;
        self.tries += 1;
        let attachment = self.tries;
        let reading = tokio_util::sync::CancellationToken::new();
        let (writer, answer) = attach(
            command,
            Vec::new(),
            self.sink(),
            attachment,
            reading.clone(),
        );
        self.resume(writer, answer, reading, attachment, timeout, &label, None)
            .await
            .map_err(|e| format!("{label}: reattach: {e}"))?;
        self.tunnel = tunnel;
        // Back on SSH: a QUIC connection the link ran on before is over.
        if let Some(quic) = self.quic.take() {
            quic.connection.close(0u32.into(), b"moved to SSH");
        }
        Ok(())
    }

    /// Moves the link onto QUIC: connects to the child at `addr` with its certificate
    /// (`fingerprint`, from `Up::Quic`) pinned and this node's own (`me`, whose fingerprint
    /// went down in `Start::quic`), opens the control stream, and re-attaches over it as over
    /// a fresh SSH connection (the token, the replay). The streams the child opens afterwards
    /// are its store connections, each served by `store`. On error the link stays on SSH.
    #[allow(clippy::too_many_arguments)]
    pub async fn move_to_quic(
        &mut self,
        label: &str,
        addr: std::net::SocketAddr,
        fingerprint: &str,
        me: &crate::wire::quic::Identity,
        tuning: &crate::wire::quic::Tuning,
        store: Option<Arc<dyn Connector>>,
        agent: Option<Arc<dyn Connector>>,
        timeout: std::time::Duration,
    ) -> Result<(), String> {
        use crate::wire::quic;
        let (endpoint, connection) =
            quic::connect(addr, me, fingerprint, tuning, quic::CONNECT_TIMEOUT)
                .await
                .map_err(|e| format!("QUIC to {addr}: {e}"))?;
        let opened = async {
            let (send, recv) = connection
                .open_bi()
                .await
                .map_err(|e| format!("QUIC to {addr}: control stream: {e}"))?;
            self.tries += 1;
            let attachment = self.tries;
            let reading = tokio_util::sync::CancellationToken::new();
            let answer = read_frames(
                Box::new(recv),
                self.sink(),
                reading.clone(),
                Ended::Stream {
                    attachment,
                    connection: connection.clone(),
                },
            );
            self.resume(
                Box::new(send),
                answer,
                reading,
                attachment,
                timeout,
                label,
                Some(crate::wire::resume::Splice {
                    agent: None,
                    agent_on_link: agent.is_some(),
                }),
            )
            .await
            .map_err(|e| format!("QUIC to {addr}: {e}"))?;
            Ok::<u32, String>(attachment)
        };
        match opened.await {
            Ok(attachment) => {
                if store.is_some() || agent.is_some() {
                    tokio::spawn(serve_child_streams(connection.clone(), store, agent));
                }
                self.quic = Some(QuicLink {
                    endpoint,
                    connection,
                    attachment,
                });
                Ok(())
            }
            Err(e) => {
                connection.close(0u32.into(), b"");
                endpoint.close(0u32.into(), b"");
                Err(e)
            }
        }
    }

    /// Whether the child was offered QUIC: only then is its `Up::Quic` taken.
    pub fn quic_offered(&self) -> bool {
        self.quic_offered
    }

    /// Whether the link runs on QUIC now.
    pub fn on_quic(&self) -> bool {
        self.quic
            .as_ref()
            .is_some_and(|q| q.attachment == self.attachment)
    }

    /// The QUIC connection the link runs on now, if it does.
    pub fn quic_connection(&self) -> Option<quinn::Connection> {
        self.quic
            .as_ref()
            .filter(|q| q.attachment == self.attachment)
            .map(|q| q.connection.clone())
    }

    /// What the link runs on now, for the operator.
    pub fn transport(&self) -> &'static str {
        if self.on_quic() { "quic" } else { "ssh" }
    }

    /// Ends the QUIC connection (the child ended, or the link is given up).
    pub fn close_quic(&mut self) {
        if let Some(quic) = self.quic.take() {
            quic.connection.close(0u32.into(), b"done");
            quic.endpoint.close(0u32.into(), b"done");
        }
    }

    fn sink(&self) -> Sink {
        Sink {
            me: self.me.clone(),
            allowed: self.allowed.clone(),
            seqs: self.seqs.clone(),
            events: self.events.clone(),
        }
    }

    /// The re-attach exchange on a new stream (`writer` down, its reader answering on
    /// `answer`): the splice (over QUIC, where no `arbor reattach` sends one), the token and
    /// the number taken, the child's answer, the replay of what it had not taken; then the
    /// link is on the new stream, and a new token goes down for the next time.
    #[allow(clippy::too_many_arguments)]
    async fn resume(
        &mut self,
        writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
        answer: tokio::sync::oneshot::Receiver<Result<u64, String>>,
        reading: tokio_util::sync::CancellationToken,
        attachment: u32,
        timeout: std::time::Duration,
        label: &str,
        splice: Option<crate::wire::resume::Splice>,
    ) -> Result<(), String> {
        let token = self
            .token
            .clone()
            .ok_or_else(|| "no re-attach was offered".to_string())?;
        let mut writer = FrameWriter::new(writer);
        let resume = crate::wire::resume::Resume {
            token,
            acked: self.seqs.received(),
        };
        let exchange = async {
            if let Some(splice) = &splice {
                writer
                    .send(splice)
                    .await
                    .map_err(|e| format!("sending the splice: {e}"))?;
            }
            writer
                .send(&resume)
                .await
                .map_err(|e| format!("sending the token: {e}"))?;
            match answer.await {
                Ok(Ok(acked)) => Ok(acked),
                Ok(Err(e)) => Err(e),
                Err(_) => Err("the re-attach ended before the child answered".to_string()),
            }
        };
        let acked = match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(acked)) => acked,
            Ok(Err(e)) => {
                reading.cancel();
                return Err(e);
            }
            Err(_) => {
                reading.cancel();
                return Err(format!("no answer within {}s", timeout.as_secs()));
            }
        };
        // The token is used: the child holds none until the new one comes.
        self.token = None;
        let replay = self.seqs.replay_after(acked).map_err(|first| {
            format!("the frames down from #{first} on were forgotten (past the replay budget)")
        })?;
        let count = replay.len();
        for frame in replay {
            writer
                .send(&frame)
                .await
                .map_err(|e| format!("replaying: {e}"))?;
        }
        tracing::debug!("{label}: re-attached; sent again {count} frame(s) down (after #{acked})");
        self.reading.cancel();
        self.reading = reading;
        self.writer = writer;
        self.attachment = attachment;
        self.offer_token()
            .await
            .map_err(|e| format!("sending a new token: {e}"))?;
        Ok(())
    }
}

/// Serves the streams a child opens on its QUIC link, by their first byte: one of its store
/// connections (it listens at its store socket once the link moved,
/// crate::node::quic_child), piped to `store` as a tunnelled one would be; or a connection
/// to this node's agent for it (`agent`: the connector its SSH connection would forward, with
/// the same constraints), if it has one. Anything else is closed. Ends with the connection.
async fn serve_child_streams(
    connection: quinn::Connection,
    store: Option<Arc<dyn Connector>>,
    agent: Option<Arc<dyn Connector>>,
) {
    use super::quic_child::{STREAM_AGENT, STREAM_STORE};
    while let Ok((send, mut recv)) = connection.accept_bi().await {
        let (store, agent) = (store.clone(), agent.clone());
        tokio::spawn(async move {
            let mut kind = [0u8; 1];
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                recv.read_exact(&mut kind),
            )
            .await;
            let to = match (read, kind[0]) {
                (Ok(Ok(_)), STREAM_STORE) => store,
                (Ok(Ok(_)), STREAM_AGENT) => agent,
                _ => None,
            };
            if let Some(to) = to {
                to.connect(Box::new(tokio::io::join(recv, send)));
            }
        });
    }
}

/// How many items wait in one child's queue at most. Each is a frame of at most
/// [`MAX_UP_FRAME`] bytes or a stderr line of at most [`MAX_LINE`], so one child can make its
/// parent hold at most 16 MiB; when the queue is full, reading from the child waits (and
/// SSH flow control makes the child wait in turn).
pub const CHILD_QUEUE: usize = 256;

/// The paths, relative to a child, that the child may send events about: itself (the root
/// path) and every host of its subtree (jump hosts included, as their children's events are
/// tagged under them). Anything else is dropped: a child reports on its own subtree only.
pub fn subtree_paths(children: &[crate::wire::ChildSpec]) -> HashSet<HostPath> {
    fn walk(at: &HostPath, specs: &[crate::wire::ChildSpec], out: &mut HashSet<HostPath>) {
        for c in specs {
            let path = at.child(&c.name);
            walk(&path, &c.children, out);
            out.insert(path);
        }
    }
    let mut out = HashSet::from([HostPath::root()]);
    walk(&HostPath::root(), children, &mut out);
    out
}

/// Opens the store tunnel (when there is a `store`), starts arbor on the child, exchanges
/// hellos and sends `start`.
/// Errors are whole sentences naming the host and the step (`l1-3: forward: …`).
/// Events from the child arrive on the returned receiver, tagged with the child's path
/// relative to this node (its name first), until a final [`FromChild::Exited`]; events about
/// hosts outside the child's subtree ([`subtree_paths`] of `start.children`) are dropped.
/// `offer_reattach`: the child gets a one-time token to be re-attached with
/// (crate::node::reattach).
#[allow(clippy::too_many_arguments)]
pub async fn launch(
    session: &Session,
    me: HostPath,
    staged: &Staged,
    store: Option<Arc<dyn Connector>>,
    start: Start,
    forward_agent: bool,
    hello_timeout: std::time::Duration,
    offer_reattach: bool,
) -> Result<(ChildLink, mpsc::Receiver<FromChild>), LaunchError> {
    let tunnel = match store {
        Some(store) => {
            let socket = format!("{}/store.sock", staged.workdir);
            Some(
                session
                    .forward_unix_or_tcp(&socket, store)
                    .await
                    .map_err(|e| e.to_string())?,
            )
        }
        None => None,
    };

    let name = me.name().to_string();
    if let Some(crate::ssh::ForwardEnd::Tcp(port)) = &tunnel {
        // A host gets no credential only from an etcd without authentication (--seeds).
        let who = if start.credential.is_some() {
            "and the store refuses them without the host's credential"
        } else {
            "and the store (an etcd with authentication off) lets them do anything"
        };
        tracing::warn!(
            "{name}: the store tunnel ends on loopback TCP port {port} there (its sshd refused \
             Unix-socket forwarding): local processes can reach that port, {who}"
        );
    }
    let workdir = super::escalate::node_workdir(staged);
    let mut args: Vec<String> = [
        "run",
        "--hostname",
        &name,
        "--no-server",
        "--workdir",
        &workdir,
        "--depth",
        &start.path.depth().to_string(),
    ]
    .map(String::from)
    .into();
    if let Some(tunnel) = &tunnel {
        args.extend(["--seeds".to_string(), tunnel.to_string()]);
    }
    if let Some(graph) = &staged.graph {
        let graph = match &staged.escalate {
            Some(_) => format!("{workdir}/graph.yaml"),
            None => graph.clone(),
        };
        args.extend(["--file".to_string(), graph]);
    }
    let line = match &staged.escalate {
        None => CommandLine::new(&staged.binary)
            .args(&args)
            .as_str()
            .to_string(),
        Some(become_) => super::escalate::start_command(staged, become_, &args),
    };
    let mut command = session
        .exec(&line, &ExecOptions { forward_agent })
        .await
        .map_err(|e| e.to_string())?;
    // Through sudo: the first bytes of arbor's frames may have come with sudo's go-ahead.
    let head = match &staged.escalate {
        Some(become_) => {
            let label = session.label();
            match super::escalate::handshake(&mut command, become_, label, hello_timeout).await {
                Ok(head) => head,
                Err(failed) => {
                    // sudo may still wait for another try, holding its lock on the user's
                    // time stamp (a second sudo would wait for it): end it first.
                    let _ = command.close_stdin().await;
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(3), async {
                        while command.next().await.is_some() {}
                    })
                    .await;
                    return Err(LaunchError {
                        message: failed.message,
                        nothing_as_root: failed.nothing_as_root,
                    });
                }
            }
        }
        None => Vec::new(),
    };

    let (events_tx, events_rx) = mpsc::channel(CHILD_QUEUE);
    let allowed = Arc::new(subtree_paths(&start.children));
    let quic_offered = start.quic.is_some();
    let seqs = LinkSeqs::<Down>::new();
    let reading = tokio_util::sync::CancellationToken::new();
    let sink = Sink {
        me: me.clone(),
        allowed: allowed.clone(),
        seqs: seqs.clone(),
        events: events_tx.clone(),
    };
    let (writer, hello_rx) = attach(command, head, sink, 0, reading.clone());
    let mut control = ChildLink {
        writer: FrameWriter::new(writer),
        tunnel,
        seqs,
        events: events_tx,
        me,
        allowed,
        attachment: 0,
        tries: 0,
        reading,
        token: None,
        quic: None,
        quic_offered,
    };

    let label = session.label();
    control
        .send(&Down::hello())
        .await
        .map_err(|e| format!("{label}: start: sending hello: {e}"))?;
    control
        .send(&Down::Start(Box::new(start)))
        .await
        .map_err(|e| format!("{label}: start: sending start: {e}"))?;
    if offer_reattach {
        control
            .offer_token()
            .await
            .map_err(|e| format!("{label}: start: sending the re-attach token: {e}"))?;
    }
    match tokio::time::timeout(hello_timeout, hello_rx).await {
        Ok(Ok(Ok(_))) => Ok((control, events_rx)),
        Ok(Ok(Err(e))) => Err(format!("{label}: start: {e}").into()),
        // The child exited before saying hello: its stderr (already queued) says why.
        Ok(Err(_)) => Ok((control, events_rx)),
        Err(_) => Err(format!(
            "{label}: start: arbor was started but did not answer within {}s \
             (a hung host, or not an arbor build); stopped it",
            hello_timeout.as_secs()
        )
        .into()),
    }
}

/// Pumps one exec channel of the child's (the first, or a re-attach's): stdout bytes into a
/// frame reader, stderr lines up as logs, and the exit status last, once the reader has
/// passed on every frame the child sent (the parent stops reading at the exit: events still
/// being parsed would be lost). Frames are taken once across every attachment (`seqs`), and
/// events about hosts outside the child's subtree (`allowed`) are dropped. Returns the
/// channel's stdin, and the answer to the first frame: `Ok(0)` for a hello, `Ok(acked)` for
/// a re-attach the child took, `Err` for a refusal or a link that broke first.
fn attach(
    mut command: crate::ssh::RemoteCommand,
    head: Vec<u8>,
    sink: Sink,
    attachment: u32,
    stop: tokio_util::sync::CancellationToken,
) -> (
    Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    tokio::sync::oneshot::Receiver<Result<u64, String>>,
) {
    let (frames_in, frames_out) = tokio::io::duplex(256 * 1024);
    let writer: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = Box::new(command.stdin_writer());
    let pump_tx = sink.events.clone();
    let pump_me = sink.me.clone();
    let (reader_done, reader_finished) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut frames_in = frames_in;
        if !head.is_empty() {
            let _ = frames_in.write_all(&head).await;
        }
        let mut stderr_buf = Vec::new();
        let mut stderr_tail = Tail::default();
        let mut status = ExitStatus::Unknown;
        while let Some(item) = command.next().await {
            match item {
                // Once the link moved on from this channel (its reader stopped), what still comes
                // on stdout is dropped (a re-attach replays whatever the parent had not
                // taken); the channel is still read, for stderr and the exit status.
                Output::Stdout(data) => {
                    let _ = frames_in.write_all(&data).await;
                }
                Output::Stderr(data) => {
                    stderr_buf.extend_from_slice(&data);
                    while let Some(pos) = stderr_buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = stderr_buf.drain(..=pos).collect();
                        stderr_tail.push(&line[..line.len() - 1]);
                        send_stderr(&pump_tx, &pump_me, &line[..line.len() - 1]).await;
                    }
                    // A line without an end is sent in pieces, never buffered past MAX_LINE.
                    while stderr_buf.len() >= MAX_LINE {
                        let line: Vec<u8> = stderr_buf.drain(..MAX_LINE).collect();
                        send_stderr(&pump_tx, &pump_me, &line).await;
                    }
                }
                Output::Exit(s) => status = s,
            }
        }
        if !stderr_buf.is_empty() {
            stderr_tail.push(&stderr_buf);
            send_stderr(&pump_tx, &pump_me, &stderr_buf).await;
        }
        drop(frames_in);
        let _ = reader_finished.await;
        let _ = pump_tx
            .send(FromChild::Exited {
                status,
                error: stderr_tail.joined(),
                attachment,
            })
            .await;
    });

    let hello_rx = read_frames(Box::new(frames_out), sink, stop, Ended::Pump(reader_done));
    (writer, hello_rx)
}

/// What happens when an attachment's reader ends.
enum Ended {
    /// An exec channel's: its pump, told so, reports the exit (with the channel's status).
    Pump(tokio::sync::oneshot::Sender<()>),
    /// A QUIC stream's: the connection is over, and the end is reported here (the child's
    /// exit status comes on its exec channel, crate::node::fleet).
    Stream {
        attachment: u32,
        connection: quinn::Connection,
    },
}

/// Reads one attachment's frames: the child's hello (or re-attach answer) first, then
/// events, re-tagged under this child's path. Returns the answer to the first frame.
fn read_frames(
    source: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    sink: Sink,
    stop: tokio_util::sync::CancellationToken,
    ended: Ended,
) -> tokio::sync::oneshot::Receiver<Result<u64, String>> {
    let Sink {
        me,
        allowed,
        seqs,
        events: events_tx,
    } = sink;
    let (hello_tx, hello_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (_done, stream_end) = match ended {
            // Dropped when this task ends: the pump then reports the exit.
            Ended::Pump(done) => (Some(done), None),
            Ended::Stream {
                attachment,
                connection,
            } => (None, Some((attachment, connection))),
        };
        let mut reader = FrameReader::with_limit(source, MAX_UP_FRAME);
        let mut refused = 0u64;
        // The exit code the child said it ends with (its last frame).
        let mut bye: Option<u8> = None;
        let mut hello_tx = Some(hello_tx);
        loop {
            let got = tokio::select! {
                got = reader.recv::<Numbered<Up>>() => got,
                _ = stop.cancelled() => break,
            };
            // A numbered frame is taken once, in order (crate::wire::resume); what the child
            // numbers is untrusted like the rest: a gap or a repeat is reported, not obeyed.
            let frame = match got {
                Ok(Some(Numbered { seq, frame })) if seq > 0 => match seqs.accept(seq) {
                    Accepted::Duplicate => continue,
                    Accepted::Gap { lost } => {
                        tracing::error!(
                            "{me}: link: {lost} frame(s) from it never came (#{seq} after #{})",
                            seq - lost - 1
                        );
                        Ok(Some(frame))
                    }
                    Accepted::New => Ok(Some(frame)),
                },
                other => other.map(|f| f.map(|n| n.frame)),
            };
            match frame {
                Ok(Some(Up::Ack { acked })) => {
                    seqs.acked(acked);
                    if events_tx.send(FromChild::Alive).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Up::Hello(hello))) => {
                    if let Some(tx) = hello_tx.take() {
                        let _ = tx.send(hello.check().map(|()| 0).map_err(|e| e.to_string()));
                    }
                }
                Ok(Some(Up::Resumed { acked })) => {
                    if let Some(tx) = hello_tx.take() {
                        let _ = tx.send(Ok(acked));
                    }
                }
                Ok(Some(Up::Refused { reason })) => {
                    if let Some(tx) = hello_tx.take() {
                        let _ = tx.send(Err(format!("refused: {reason}")));
                    }
                    break;
                }
                Ok(Some(Up::Event(mut event))) => {
                    if !allowed.contains(&event.host) {
                        refused += 1;
                        if refused == 1 {
                            tracing::warn!(
                                "{me}: sent an event about {:?}, which is not in its subtree; \
                                 dropping such events",
                                event.host.to_string()
                            );
                        }
                        continue;
                    }
                    event.host = event.host.under(&me);
                    if events_tx.send(FromChild::Event(event)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Up::Fetch { sha256 })) => {
                    if events_tx.send(FromChild::Fetch { sha256 }).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Up::Heartbeat)) => {
                    if events_tx.send(FromChild::Alive).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Up::Bye { code })) => bye = Some(code),
                Ok(Some(Up::Quic {
                    port,
                    fingerprint,
                    error,
                })) => {
                    let said = FromChild::Quic {
                        port,
                        fingerprint,
                        error,
                    };
                    if events_tx.send(said).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if let Some(tx) = hello_tx.take() {
                        let _ = tx.send(Err(format!("link: {e}")));
                    } else {
                        tracing::warn!("{me}: link: {e}");
                    }
                    break;
                }
            }
        }
        if let Some((attachment, connection)) = stream_end {
            connection.close(0u32.into(), b"stream ended");
            // Not when the link moved on from this stream (the reader was stopped).
            if !stop.is_cancelled() {
                let status = bye.map_or(ExitStatus::Unknown, |code| ExitStatus::Code(code.into()));
                let _ = events_tx
                    .send(FromChild::Exited {
                        status,
                        error: None,
                        attachment,
                    })
                    .await;
            }
        }
    });
    hello_rx
}

/// Why a child could not be started.
#[derive(Debug)]
pub struct LaunchError {
    /// A sentence naming the host and the step.
    pub message: String,
    /// Through sudo, nothing ran as root (sudo refused the password, or wanted one): the
    /// cleanup must not ask sudo again.
    pub nothing_as_root: bool,
}

impl From<String> for LaunchError {
    fn from(message: String) -> Self {
        LaunchError {
            message,
            nothing_as_root: false,
        }
    }
}

/// One line of the child's raw stderr, sent up as its log (in pieces that fit a frame).
async fn send_stderr(tx: &mpsc::Sender<FromChild>, host: &HostPath, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    for piece in crate::wire::line_pieces(&text) {
        let _ = tx
            .send(FromChild::Event(Event {
                host: host.clone(),
                kind: EventKind::Log {
                    line: piece.to_string(),
                    stderr: true,
                },
            }))
            .await;
    }
}

/// Lines kept of a child's stderr, and of its log file, to say why it ended.
const TAIL_LINES: usize = 5;
/// Longest line kept, in characters.
const TAIL_LINE_CHARS: usize = 300;

/// The last [`TAIL_LINES`] non-empty lines of a stream, each cut to [`TAIL_LINE_CHARS`].
#[derive(Default)]
struct Tail(std::collections::VecDeque<String>);

impl Tail {
    fn push(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        if self.0.len() == TAIL_LINES {
            self.0.pop_front();
        }
        let mut kept: String = line.chars().take(TAIL_LINE_CHARS).collect();
        if kept.len() < line.len() {
            kept.push('…');
        }
        self.0.push_back(kept);
    }

    /// The lines on one line (a cause is one line in the summary), or `None` if there are none.
    fn joined(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| Vec::from(self.0.clone()).join(" / "))
    }
}

/// Why a child's arbor ended when it was not asked to, for its failure: how it ended (exit
/// code, signal, or closed before the command ran), then the last lines of its stderr (`stderr`, from
/// [`FromChild::Exited`]) and of `arbor.log` in its working dir. Call it before the working
/// dir is removed. A node that exits on its own removes its working dir, so the log is there
/// to read when it did not get that far: killed, crashed, or never past its start.
pub async fn why_ended(
    session: &Session,
    staged: &Staged,
    status: &ExitStatus,
    stderr: Option<&str>,
) -> String {
    let mut why = status.to_string();
    if let Some(stderr) = stderr {
        why.push_str(&format!("; stderr: {stderr}"));
    }
    if let Some(log) = log_tail(session, staged).await {
        why.push_str(&format!("; arbor.log: {log}"));
    }
    why
}

/// The last lines of `<workdir>/arbor.log` on the child, if it is there (bounded in time: the
/// host may be gone).
async fn log_tail(session: &Session, staged: &Staged) -> Option<String> {
    let workdir = super::escalate::node_workdir(staged);
    if !workdir.contains("/arbor.") || session.is_closed() {
        return None;
    }
    let log = format!("{workdir}/arbor.log");
    let command = CommandLine::new("tail").args(["-n", &TAIL_LINES.to_string(), "--", &log]);
    let out = match &staged.escalate {
        // Root's dir: only root reads it.
        Some(become_) => super::escalate::run(session, become_, command.as_str()).await?,
        None => {
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                session.output(command.as_str()),
            )
            .await;
            match read {
                Ok(Ok(out)) if out.status.success() => out.stdout,
                _ => return None,
            }
        }
    };
    let mut tail = Tail::default();
    for line in out.split(|b| *b == b'\n') {
        tail.push(line);
    }
    tail.joined()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_last_non_empty_lines_cut_short() {
        let mut tail = Tail::default();
        assert_eq!(tail.joined(), None);
        for i in 0..8 {
            tail.push(format!("line {i}").as_bytes());
            tail.push(b"  ");
        }
        assert_eq!(
            tail.joined().as_deref(),
            Some("line 3 / line 4 / line 5 / line 6 / line 7")
        );
        let mut long = Tail::default();
        long.push("é".repeat(400).as_bytes());
        let kept = long.joined().unwrap_or_default();
        assert_eq!(kept.chars().count(), TAIL_LINE_CHARS + 1);
        assert!(kept.ends_with('…'));
    }
}
