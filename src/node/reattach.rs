//! Re-attaching a parent to a running child over a fresh SSH connection.
//!
//! At launch the parent sends its child a one-time token (`Down::Reattach`, down the
//! encrypted control channel). The child then listens on `reattach.sock` in its working dir
//! (the dir is 0700, the socket 0600, both the user's; a peer of another uid is refused).
//! When the parent's SSH connection is gone (or the link is down and the connection may be),
//! the parent connects again (the same host-key check and jump path as at first) and runs
//! the hidden `arbor reattach --dir WORKDIR` there, which connects to that socket, sends
//! [`Splice`] (its own agent socket), and splices its stdin and stdout to it. Through it the
//! parent sends [`Resume`]: the token and the last number it took from the child. The child
//! compares the token in constant time and takes it (single use); a wrong or used one is
//! refused (`Up::Refused`) and logged. A good one gets `Up::Resumed` with the last number the
//! child took; both ends then replay what the other had not taken
//! ([`LinkSeqs::replay_after`](crate::wire::resume::LinkSeqs::replay_after)) and go on over
//! the new stream, and the parent sends a new token for the next time.

use crate::wire::resume::{LinkSeqs, Numbered, Resume, Splice, same_token};
use crate::wire::{FrameReader, FrameWriter, Up};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// The socket's name in the child's working dir.
pub const SOCKET: &str = "reattach.sock";

/// How long a connection to the socket has to present its token.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// A byte stream's read half, boxed.
pub type BoxRead = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
/// A byte stream's write half, boxed.
pub type BoxWrite = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
/// Frames from the parent.
pub type LinkReader = FrameReader<BoxRead>;

/// The child's side: the token it holds, and where a re-attached stream goes.
pub struct Offer {
    dir: Option<PathBuf>,
    token: Mutex<Option<String>>,
    listening: AtomicBool,
    /// A token came: this node waits for a re-attach when its connection ends.
    pub offered: Arc<AtomicBool>,
    seqs: Arc<LinkSeqs<Up>>,
    readers: mpsc::Sender<LinkReader>,
    writers: mpsc::Sender<(BoxWrite, u64)>,
    /// This node listens for its parent's QUIC connection too (crate::node::quic_child).
    quic: AtomicBool,
    /// The QUIC connection the link runs on now, if it does: a node that exits waits for its
    /// parent to have read its last frames there.
    pub connection: Arc<Mutex<Option<quinn::Connection>>>,
    /// The parent's agent is served at this node's agent socket (over the QUIC link).
    agent_served: AtomicBool,
    /// Where this node's store connections go, when it holds its store socket
    /// (crate::node::quic_child::take_store_socket).
    store: Mutex<Option<Arc<super::quic_child::StoreRoute>>>,
}

impl Offer {
    pub fn new(
        dir: Option<PathBuf>,
        seqs: Arc<LinkSeqs<Up>>,
        readers: mpsc::Sender<LinkReader>,
        writers: mpsc::Sender<(BoxWrite, u64)>,
    ) -> Arc<Self> {
        Arc::new(Offer {
            dir,
            token: Mutex::new(None),
            listening: AtomicBool::new(false),
            offered: Arc::default(),
            seqs,
            readers,
            writers,
            quic: AtomicBool::new(false),
            connection: Arc::default(),
            agent_served: AtomicBool::new(false),
            store: Mutex::new(None),
        })
    }

    /// This node listens for its parent's QUIC connection: a token from the parent makes
    /// its link wait for a re-attach when a stream ends, even without the socket.
    pub fn listening_on_quic(&self) {
        self.quic.store(true, Ordering::SeqCst);
        if let Some(dir) = &self.dir {
            *self.store.lock().unwrap_or_else(|e| e.into_inner()) =
                super::quic_child::take_store_socket(dir);
        }
    }

    /// The QUIC connection the link runs on now, if it does.
    pub fn quic_connection(&self) -> Option<quinn::Connection> {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the link runs on a QUIC connection now.
    pub fn on_quic(&self) -> bool {
        self.connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// A token from the parent: it replaces the one before; the first starts the listener.
    pub fn token(self: &Arc<Self>, token: String) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
        if self.quic.load(Ordering::SeqCst) {
            self.offered.store(true, Ordering::SeqCst);
        }
        let Some(dir) = self.dir.clone() else {
            return;
        };
        if self.listening.swap(true, Ordering::SeqCst) {
            return;
        }
        match listen(&dir) {
            Ok(listener) => {
                self.offered.store(true, Ordering::SeqCst);
                let offer = self.clone();
                tokio::spawn(async move { offer.serve(listener).await });
            }
            Err(e) => tracing::warn!("re-attach: not listening: {e}"),
        }
    }

    /// The parent keeps the link on SSH: store connections go through the tunnel.
    pub fn no_quic(&self) {
        if let Some(route) = self
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            route.stay_on_ssh();
        }
    }

    /// Whether a token is held (one comes right after the start frame).
    fn holds_token(&self) -> bool {
        self.token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Takes the token if `given` is it (single use).
    fn take(&self, given: &str) -> bool {
        let mut held = self.token.lock().unwrap_or_else(|e| e.into_inner());
        match held.as_deref() {
            Some(expected) if same_token(given, expected) => {
                *held = None;
                true
            }
            _ => false,
        }
    }

    async fn serve(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            let stream = accept_own(&listener, "re-attach").await;
            let offer = self.clone();
            tokio::spawn(async move {
                let (read, write) = stream.into_split();
                let handshake = offer.handshake(Box::new(read), Box::new(write), None);
                match tokio::time::timeout(HANDSHAKE, handshake).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("re-attach refused: {e}"),
                    Err(_) => tracing::warn!(
                        "re-attach refused: no token within {}s",
                        HANDSHAKE.as_secs()
                    ),
                }
            });
        }
    }

    /// One re-attach: the splice, the token, the answer; then the link is on this stream (of
    /// the re-attach socket, or of a QUIC `connection`).
    pub(super) async fn handshake(
        &self,
        read: BoxRead,
        write: BoxWrite,
        connection: Option<quinn::Connection>,
    ) -> Result<(), String> {
        let mut reader: LinkReader = FrameReader::new(read);
        let mut writer = FrameWriter::new(write);
        let splice = match reader.recv::<Splice>().await {
            Ok(Some(s)) => s,
            Ok(None) => return Err("the connection closed before the splice said anything".into()),
            Err(e) => return Err(format!("splice: {e}")),
        };
        let resume = match reader.recv::<Resume>().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err("the connection closed before a token came".into()),
            Err(e) => return Err(format!("resume: {e}")),
        };
        // Over QUIC the parent may come as soon as it hears where this node listens, before
        // the token it sent after the start frame is read here.
        let wait = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.holds_token() && tokio::time::Instant::now() < wait {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.take(&resume.token) {
            let _ = writer
                .send(&Numbered::bare(Up::Refused {
                    reason: "wrong or used re-attach token".into(),
                }))
                .await;
            return Err("a wrong or already used token".into());
        }
        if let Some(agent) = splice.agent.filter(|a| !a.is_empty()) {
            crate::ssh::set_agent_socket(PathBuf::from(agent));
        }
        if let (Some(_), true, Some(dir)) = (&connection, splice.agent_on_link, &self.dir)
            && !self.agent_served.swap(true, Ordering::SeqCst)
        {
            // The parent's agent over the QUIC link: what this node's own logins use from
            // now on (its SSH connection, and the agent sshd forwarded on it, may go).
            match super::quic_child::serve_agent(dir, self.connection.clone()) {
                Ok(socket) => crate::ssh::set_agent_socket(socket),
                Err(e) => tracing::warn!("QUIC: no agent on the link: {e}"),
            }
        }
        writer
            .send(&Numbered::bare(Up::Resumed {
                acked: self.seqs.received(),
            }))
            .await
            .map_err(|e| format!("answering: {e}"))?;
        let route = self.store.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let (Some(connection), Some(route)) = (&connection, route) {
            route.to_quic(connection.clone());
        }
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = connection;
        let _ = self.readers.send(reader).await;
        let _ = self.writers.send((writer.into_inner(), resume.acked)).await;
        Ok(())
    }
}

/// The next connection to `listener` from this user; others are refused, and logged under
/// `what`.
pub(super) async fn accept_own(
    listener: &tokio::net::UnixListener,
    what: &str,
) -> tokio::net::UnixStream {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        match same_user(&stream) {
            Ok(()) => return stream,
            Err(e) => tracing::warn!("{what}: {e}"),
        }
    }
}

/// Listens on the socket in `dir`, which must be a private dir of this user.
pub(super) fn listen_private(dir: &Path, name: &str) -> Result<tokio::net::UnixListener, String> {
    check_private_dir(dir)?;
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

/// Listens on the re-attach socket in `dir`, which must be a private dir of this user.
fn listen(dir: &Path) -> Result<tokio::net::UnixListener, String> {
    listen_private(dir, SOCKET)
}

/// Refuses a peer on a private socket that is not this node's user.
pub(super) fn same_user(stream: &tokio::net::UnixStream) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == me => Ok(()),
        Ok(cred) => Err(format!(
            "refused a connection from uid {} (not this node's user)",
            cred.uid()
        )),
        Err(e) => Err(format!("refused a connection: {e}")),
    }
}

/// `dir` is a real dir (not a link) of this user that no one else may enter.
fn check_private_dir(dir: &Path) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{}: not a private dir of this user (mode {:o}, uid {})",
            dir.display(),
            meta.mode() & 0o7777,
            meta.uid()
        ));
    }
    Ok(())
}

/// `arbor reattach --dir DIR` (hidden; run by a parent over a fresh SSH connection): connects
/// to the running node's socket in its working dir and splices stdin and stdout to it.
pub async fn splice_main(dir: &Path) -> u8 {
    let named_ours = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("arbor."));
    if !named_ours {
        eprintln!(
            "arbor reattach: {}: not an arbor working dir",
            dir.display()
        );
        return crate::exit::BAD_INPUT;
    }
    if let Err(e) = check_private_dir(dir) {
        eprintln!("arbor reattach: {e}");
        return crate::exit::FAILED;
    }
    let path = dir.join(SOCKET);
    let mut socket = match tokio::net::UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("arbor reattach: {}: {e}", path.display());
            return crate::exit::FAILED;
        }
    };
    let splice = Splice {
        agent: crate::ssh::agent_socket().map(|p| p.to_string_lossy().into_owned()),
        agent_on_link: false,
    };
    {
        let mut writer = FrameWriter::new(&mut socket);
        if let Err(e) = writer.send(&splice).await {
            eprintln!("arbor reattach: {e}");
            return crate::exit::FAILED;
        }
    }
    // Done when the node's side ends (it exited, or took another re-attach); the end of stdin
    // (the parent's connection went) only closes the way down, and the node, seeing it,
    // closes its side in turn.
    let (mut from_node, mut to_node) = socket.into_split();
    let up = async {
        let mut stdout = tokio::io::stdout();
        let _ = tokio::io::copy(&mut from_node, &mut stdout).await;
        let _ = stdout.flush().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut to_node).await;
        let _ = to_node.shutdown().await;
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = up => {}
        () = down => {}
    }
    crate::exit::OK
}
