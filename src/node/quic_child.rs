//! A child's end of a QUIC link (crate::wire::quic).
//!
//! When its parent offers QUIC in the start frame (`Start::quic`, with the parent's
//! certificate fingerprint), the child makes a certificate of its own, listens on a UDP port,
//! and says where up the SSH channel (`Up::Quic`). The parent connects with both
//! certificates pinned, opens the control stream and re-attaches over it exactly as over a
//! fresh SSH connection (crate::node::reattach: the one-time token, the replay), so the link
//! moves onto QUIC with nothing lost or repeated. The child's store connections follow: from
//! the start it holds its store socket in its working dir itself (the SSH tunnel's end moved
//! aside); a connection made there waits for the link to settle (moved, or the parent saying
//! it stays on SSH), then is a stream the child opens on the QUIC connection, which the
//! parent pipes to its store as it would a tunnelled one, or goes through the tunnel.

use super::reattach::Offer;
use crate::wire::quic::{Congestion, Identity, Listener, Tuning};
use crate::wire::{NodeConfig, QuicStart, Up};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The store socket the SSH tunnel ends at, in the working dir (crate::node::child_link).
const STORE_SOCKET: &str = "store.sock";

/// How long an accepted connection has to open its control stream and re-attach.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Starts listening for the parent's QUIC connection as `quic` says; returns the frame that
/// tells the parent where (or why not).
pub fn listen(quic: &QuicStart, config: &NodeConfig, offer: Arc<Offer>) -> Up {
    let ip = ssh_server_ip().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let ports = quic.ports.map(|(a, b)| a..=b).unwrap_or(0..=0);
    let tuning = tuning(config);
    let bound = Identity::generate().and_then(|me| {
        let listener = Listener::bind(ip, ports, &me, &quic.parent, &tuning)?;
        Ok((me, listener))
    });
    match bound {
        Ok((me, listener)) => {
            let port = listener.local_addr().port();
            offer.listening_on_quic();
            tracing::debug!("QUIC: listening on {}", listener.local_addr());
            tokio::spawn(serve(listener, offer, tuning.congestion));
            Up::Quic {
                port,
                fingerprint: me.fingerprint().to_string(),
                error: None,
            }
        }
        Err(e) => {
            tracing::info!("QUIC: not listening ({e}); the link stays on SSH");
            Up::Quic {
                port: 0,
                fingerprint: String::new(),
                error: Some(e.to_string()),
            }
        }
    }
}

/// The link's QUIC timing from the run's settings, the same at both ends: keep-alives as
/// often as heartbeats, and a connection kept through the link timeout and the grace.
pub fn tuning(config: &NodeConfig) -> Tuning {
    Tuning {
        keep_alive: crate::wire::heartbeat_every(config.link_timeout),
        idle: Duration::from_secs(config.link_timeout.max(1) + config.reconnect_grace),
        congestion: config.congestion,
    }
}

/// The address this host's sshd took the parent's connection on (`SSH_CONNECTION`): the
/// parent reached it there, so it can send UDP there too, and nothing listens on the others.
fn ssh_server_ip() -> Option<IpAddr> {
    let connection = std::env::var("SSH_CONNECTION").ok()?;
    connection.split_whitespace().nth(2)?.parse().ok()
}

/// Takes the parent's connections (the handshake already checked its certificate): each
/// opens a control stream and re-attaches over it.
async fn serve(listener: Listener, offer: Arc<Offer>, congestion: Congestion) {
    while let Some(connection) = listener.accept().await {
        let connection = match connection {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("QUIC: refused a connection: {e}");
                continue;
            }
        };
        let offer = offer.clone();
        tokio::spawn(async move {
            let attached = tokio::time::timeout(HANDSHAKE, async {
                let (send, recv) = connection
                    .accept_bi()
                    .await
                    .map_err(|e| format!("no control stream: {e}"))?;
                offer
                    .handshake(Box::new(recv), Box::new(send), Some(connection.clone()))
                    .await
            })
            .await;
            let refused = match attached {
                Ok(Ok(())) => {
                    tracing::debug!(
                        "QUIC: the link runs on {} (congestion control: {})",
                        connection.remote_address(),
                        congestion.name()
                    );
                    receive_copies(connection).await;
                    return;
                }
                Ok(Err(e)) => e,
                Err(_) => format!("no re-attach within {}s", HANDSHAKE.as_secs()),
            };
            tracing::warn!("QUIC: re-attach refused: {refused}");
            connection.close(1u32.into(), b"refused");
        });
    }
}

/// Where the store connections made at this node's store socket go: as streams of the QUIC
/// connection once the link moved there, else through the SSH tunnel. Until the parent has
/// moved the link or said it will not (`Down::NoQuic`), for at most [`DECIDE`], a new
/// connection waits.
#[derive(Default)]
pub struct StoreRoute {
    quic: std::sync::Mutex<Option<quinn::Connection>>,
    decided: tokio_util::sync::CancellationToken,
}

/// How long a store connection waits for the link's transport to be settled: past the
/// parent's QUIC connect timeout, with room for a slow handshake.
const DECIDE: Duration = Duration::from_secs(3);

impl StoreRoute {
    /// The store connections go over `connection` from now on.
    pub fn to_quic(&self, connection: quinn::Connection) {
        *self.quic.lock().unwrap_or_else(|e| e.into_inner()) = Some(connection);
        self.decided.cancel();
    }

    /// The link stays on SSH: the store connections go through the tunnel.
    pub fn stay_on_ssh(&self) {
        self.decided.cancel();
    }

    fn quic(&self) -> Option<quinn::Connection> {
        let held = self.quic.lock().unwrap_or_else(|e| e.into_inner());
        held.as_ref()
            .filter(|c| c.close_reason().is_none())
            .cloned()
    }
}

/// Puts this node's own listener at the store socket in `dir` (the SSH tunnel's end, moved
/// aside to `store.sock.ssh`), so that its store connections can move onto the QUIC link
/// when it comes ([`StoreRoute::to_quic`]). Each connection to it (from this user only: the
/// socket is 0600 in a 0700 dir) is piped through the tunnel until then, and over QUIC
/// after. A tunnel that ends on a TCP port (an sshd that refused Unix-socket forwarding)
/// stays as it is: `None`.
pub fn take_store_socket(dir: &Path) -> Option<Arc<StoreRoute>> {
    use std::os::unix::fs::FileTypeExt;
    let path = dir.join(STORE_SOCKET);
    let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return None;
    }
    let staging = format!("{STORE_SOCKET}.quic");
    let tunnel = dir.join(format!("{STORE_SOCKET}.ssh"));
    let moved = super::reattach::listen_private(dir, &staging).and_then(|listener| {
        std::fs::rename(&path, &tunnel).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::rename(dir.join(&staging), &path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(listener)
    });
    let listener = match moved {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("QUIC: the store stays on the SSH tunnel: {e}");
            let _ = std::fs::remove_file(dir.join(&staging));
            if !path.exists() {
                let _ = std::fs::rename(&tunnel, &path);
            }
            return None;
        }
    };
    let route = Arc::new(StoreRoute::default());
    let serving = route.clone();
    tokio::spawn(async move {
        loop {
            let stream = super::reattach::accept_own(&listener, "store socket").await;
            let (route, tunnel) = (serving.clone(), tunnel.clone());
            tokio::spawn(async move { pipe_store(stream, &route, &tunnel).await });
        }
    });
    Some(route)
}

/// What a stream this node opens on its QUIC link carries: its first byte.
pub const STREAM_STORE: u8 = b's';
/// A connection to the parent's agent (crate::node::quic_child::serve_agent).
pub const STREAM_AGENT: u8 = b'a';

/// Pipes `stream` over a new stream of `connection` that says it carries `kind`.
async fn pipe_over(mut stream: tokio::net::UnixStream, connection: &quinn::Connection, kind: u8) {
    match connection.open_bi().await {
        Ok((mut send, recv)) => {
            if send.write_all(&[kind]).await.is_err() {
                return;
            }
            let mut quic = tokio::io::join(recv, send);
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut quic).await;
        }
        Err(e) => tracing::debug!("a stream over QUIC: {e}"),
    }
}

/// One store connection, over QUIC when the link is there, else through the tunnel (until
/// the link moves).
async fn pipe_store(mut stream: tokio::net::UnixStream, route: &StoreRoute, tunnel: &Path) {
    let _ = tokio::time::timeout(DECIDE, route.decided.cancelled()).await;
    if let Some(connection) = route.quic() {
        pipe_over(stream, &connection, STREAM_STORE).await;
        return;
    }
    match tokio::net::UnixStream::connect(tunnel).await {
        Ok(mut ssh) => {
            let _ = tokio::io::copy_bidirectional(&mut stream, &mut ssh).await;
        }
        Err(e) => tracing::debug!("store through the tunnel: {e}"),
    }
}

/// The agent socket's name in the working dir.
pub const AGENT_SOCKET: &str = "agent.sock";

/// Serves the parent's agent at `agent.sock` in the private dir `dir` (0600, this user's
/// connections only): each connection to it is a stream of the QUIC connection the link
/// runs on now (`link`), which the parent pipes to the agent it would forward over SSH,
/// under the same destination constraints. Returns the socket's path.
pub fn serve_agent(
    dir: &Path,
    link: Arc<std::sync::Mutex<Option<quinn::Connection>>>,
) -> Result<std::path::PathBuf, String> {
    let listener = super::reattach::listen_private(dir, AGENT_SOCKET)?;
    tokio::spawn(async move {
        loop {
            let stream = super::reattach::accept_own(&listener, "agent socket").await;
            let connection = link
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .filter(|c| c.close_reason().is_none());
            match connection {
                Some(c) => {
                    tokio::spawn(async move { pipe_over(stream, &c, STREAM_AGENT).await });
                }
                None => tracing::warn!("agent socket: the link is not on QUIC now"),
            }
        }
    });
    Ok(dir.join(AGENT_SOCKET))
}

/// The parent's copies over the link (a build or an artifact this node fetched while the
/// link runs on QUIC, when the SSH connection may be gone): every stream the parent opens
/// after the control stream is one, received as `arbor receive` would.
async fn receive_copies(connection: quinn::Connection) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        tokio::spawn(receive_copy(send, recv));
    }
}

/// One copy: its header line, the bytes into place (checked), then `ok` or why not.
async fn receive_copy(mut send: quinn::SendStream, recv: quinn::RecvStream) {
    use crate::node::transfer::{self, STREAM_LINE_MAX, StreamHeader};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut reader = tokio::io::BufReader::new(recv);
    let mut line = Vec::new();
    let read = (&mut reader)
        .take(STREAM_LINE_MAX)
        .read_until(b'\n', &mut line)
        .await;
    let received = match read {
        Err(e) => Err(format!("reading the header: {e}")),
        Ok(_) => match serde_json::from_slice::<StreamHeader>(&line) {
            Err(e) => Err(format!("a bad header: {e}")),
            Ok(header) => {
                let args = transfer::Receive {
                    dest: header.dest,
                    sha256: header.sha256,
                    size: header.size,
                    mode: header.mode,
                    patch_from: header.patch_from,
                    plain: header.plain,
                };
                let input = tokio_util::io::SyncIoBridge::new(reader);
                tokio::task::spawn_blocking(move || {
                    if let Some(dir) = args.dest.parent() {
                        use std::os::unix::fs::DirBuilderExt;
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o700)
                            .create(dir)
                            .map_err(|e| format!("{}: {e}", dir.display()))?;
                    }
                    match transfer::receive(&args, input) {
                        Ok(()) => Ok(args.dest),
                        Err(e) => Err(format!("{}: {e}", args.dest.display())),
                    }
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
            }
        },
    };
    let answer = match received {
        Ok(dest) => {
            tracing::debug!("QUIC: received {}", dest.display());
            "ok\n".to_string()
        }
        Err(e) => {
            tracing::warn!("QUIC: a copy from the parent failed: {e}");
            format!("{e}\n")
        }
    };
    let _ = send.write_all(answer.as_bytes()).await;
    let _ = send.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::transfer::{self, Send, SendError};
    use crate::wire::quic;
    use tokio_util::sync::CancellationToken;

    /// A parent's connection to a child that takes copies on it, as after a re-attach.
    async fn linked() -> (quinn::Endpoint, quinn::Connection) {
        let (parent, kid) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let tuning = Tuning {
            keep_alive: Duration::from_secs(1),
            idle: Duration::from_secs(10),
            congestion: Congestion::default(),
        };
        let listener = Listener::bind(
            std::net::Ipv4Addr::LOCALHOST.into(),
            41000..=41999,
            &kid,
            parent.fingerprint(),
            &tuning,
        )
        .unwrap();
        let addr = listener.local_addr();
        tokio::spawn(async move {
            let connection = listener.accept().await.unwrap().unwrap();
            receive_copies(connection).await;
            drop(listener);
        });
        quic::connect(
            addr,
            &parent,
            kid.fingerprint(),
            &tuning,
            Duration::from_secs(5),
        )
        .await
        .unwrap()
    }

    fn sha256_hex(data: &[u8]) -> String {
        use sha2::Digest;
        data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(data))
    }

    #[tokio::test]
    async fn a_copy_over_the_quic_link_lands_checked_compressed_or_plain_and_a_wrong_one_is_refused()
     {
        use std::os::unix::fs::PermissionsExt;
        let (_endpoint, connection) = linked().await;
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&local, &data).unwrap();
        let sha = sha256_hex(&data);
        let never = CancellationToken::new();
        for (plain, name) in [(false, "zstd"), (true, "plain")] {
            // Into a dir that does not exist yet, as a build's dir in the cache.
            let remote = dir.path().join(format!("cache/{name}/arbor"));
            let remote = remote.to_str().unwrap();
            let send = Send {
                what: name,
                local: &local,
                size: data.len() as u64,
                sha256: &sha,
                mode: 0o755,
                level: 3,
                base: None,
                receiver: "",
                remote,
            };
            let sent =
                transfer::send_quic(&connection, "kid", &send, plain, &never, &mut |_, _| {})
                    .await
                    .unwrap();
            assert_eq!(std::fs::read(remote).unwrap(), data, "{name}");
            let mode = std::fs::metadata(remote).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o755, "{name}");
            // Compressed, the repetitive bytes take a fraction; plain, all of them.
            if plain {
                assert!(sent >= data.len() as u64, "{name}: {sent} bytes sent");
            } else {
                assert!(sent < data.len() as u64 / 10, "{name}: {sent} bytes sent");
            }
        }
        // A size that is not the bytes' own (plain: zstd's own frame would catch it at this
        // end): the sender reads that many bytes and no more, so the child gets a copy whose
        // sha256 is wrong, refuses it, says why, and leaves nothing.
        let remote = dir.path().join("cache/wrong/blob");
        let send = Send {
            what: "wrong",
            local: &local,
            size: data.len() as u64 - 1,
            sha256: &sha,
            mode: 0o600,
            level: 1,
            base: None,
            receiver: "",
            remote: remote.to_str().unwrap(),
        };
        let err = transfer::send_quic(&connection, "kid", &send, true, &never, &mut |_, _| {})
            .await
            .unwrap_err();
        let SendError::Failed(why) = err else {
            panic!("not a failed copy: {err}");
        };
        assert!(
            why.contains("kid: wrong over QUIC: the child refused it")
                && why.contains(&format!("received {} bytes with sha256", data.len() - 1))
                && why.contains(&format!("want {} bytes with sha256 {sha}", data.len() - 1)),
            "{why}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path().join("cache/wrong"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
