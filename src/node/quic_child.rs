//! A child's end of a QUIC link (crate::wire::quic).
//!
//! When its parent offers QUIC in the start frame (`Start::quic`, with the parent's
//! certificate fingerprint), the child makes a certificate of its own, listens on a UDP port,
//! and says where up the SSH channel (`Up::Quic`). The parent connects with both
//! certificates pinned, opens the control stream and re-attaches over it exactly as over a
//! fresh SSH connection (crate::node::reattach: the one-time token, the replay), so the link
//! moves onto QUIC with nothing lost or repeated. Then the child's store socket in its working
//! dir moves too: a listener of its own replaces the SSH tunnel's, and each store connection
//! made there from then on is a stream the child opens on the QUIC connection, which the
//! parent pipes to its store as it would a tunnelled one.

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
            tokio::spawn(serve(listener, offer));
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
        congestion: Congestion::default(),
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
async fn serve(listener: Listener, offer: Arc<Offer>) {
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
                    tracing::debug!("QUIC: the link runs on {}", connection.remote_address());
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

/// Moves the store socket in `dir` onto `connection`: a listener of this node's replaces the
/// SSH tunnel's at the same path (a rename, so the path always answers), and each connection
/// to it (from this user only, as the socket is 0600 in a 0700 dir) becomes a stream on the
/// QUIC connection. Connections made before stay on the tunnel while it lasts. A tunnel that
/// ends on a TCP port (an sshd that refused Unix-socket forwarding) stays where it is.
pub fn move_store(dir: &Path, connection: quinn::Connection) {
    use std::os::unix::fs::FileTypeExt;
    let path = dir.join(STORE_SOCKET);
    let is_socket = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return;
    }
    let staging = format!("{STORE_SOCKET}.quic");
    let listener = match super::reattach::listen_private(dir, &staging) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("QUIC: the store stays on the SSH tunnel: {e}");
            return;
        }
    };
    if let Err(e) = std::fs::rename(dir.join(&staging), &path) {
        tracing::warn!("QUIC: the store stays on the SSH tunnel: {e}");
        let _ = std::fs::remove_file(dir.join(&staging));
        return;
    }
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
                _ = connection.closed() => break,
            };
            if let Err(e) = super::reattach::same_user(&stream) {
                tracing::warn!("store socket: {e}");
                continue;
            }
            let connection = connection.clone();
            tokio::spawn(async move {
                let mut stream = stream;
                match connection.open_bi().await {
                    Ok((send, recv)) => {
                        let mut quic = tokio::io::join(recv, send);
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut quic).await;
                    }
                    Err(e) => tracing::debug!("store over QUIC: {e}"),
                }
            });
        }
    });
}
