//! Remote forwards (the server listens, we connect) and the routing of channels the server
//! opens toward us: forwarded Unix sockets, forwarded TCP ports, and forwarded agent requests.

use super::error::{Cause, Result, Step};
use super::session::Session;
use russh::ChannelStream;
use russh::client::Msg;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A byte stream both ways.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Duplex for T {}

/// A connection to serve: a channel the server opened toward us, or a stream of a QUIC link
/// (crate::node::child_link), as a byte stream.
pub type ForwardedStream = Box<dyn Duplex>;

/// A channel the server opened, as a [`ForwardedStream`].
pub(crate) fn boxed(channel: ChannelStream<Msg>) -> ForwardedStream {
    Box::new(channel)
}

/// Takes each connection the server forwards to us. Called on the connection's event loop:
/// an implementation must not block; it spawns whatever serves the stream.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, stream: ForwardedStream);
}

impl<F: Fn(ForwardedStream) + Send + Sync + 'static> Connector for F {
    fn connect(&self, stream: ForwardedStream) {
        self(stream)
    }
}

/// A connector that pipes each forwarded connection to a local TCP address.
pub fn to_tcp(addr: SocketAddr) -> Arc<dyn Connector> {
    Arc::new(move |mut stream: ForwardedStream| {
        tokio::spawn(async move {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(mut local) => {
                    let _ = local.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut local).await;
                }
                Err(e) => tracing::warn!("forwarded connection to {addr}: {e}"),
            }
        });
    })
}

/// A connector that pipes each forwarded connection to a local Unix socket.
pub fn to_unix(path: PathBuf) -> Arc<dyn Connector> {
    Arc::new(move |mut stream: ForwardedStream| {
        let path = path.clone();
        tokio::spawn(async move {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(mut local) => {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut local).await;
                }
                Err(e) => tracing::warn!("forwarded connection to {}: {e}", path.display()),
            }
        });
    })
}

/// Which connector serves which forward. Shared between a [`Session`] and its russh handler.
#[derive(Default)]
pub(crate) struct Routes {
    unix: Mutex<HashMap<String, Arc<dyn Connector>>>,
    tcp: Mutex<HashMap<u32, Arc<dyn Connector>>>,
    agent: Mutex<Option<Arc<dyn Connector>>>,
}

impl Routes {
    pub(crate) fn unix(&self, path: &str) -> Option<Arc<dyn Connector>> {
        self.unix.lock().ok()?.get(path).cloned()
    }

    pub(crate) fn tcp(&self, _address: &str, port: u32) -> Option<Arc<dyn Connector>> {
        self.tcp.lock().ok()?.get(&port).cloned()
    }

    pub(crate) fn agent(&self) -> Option<Arc<dyn Connector>> {
        self.agent.lock().ok()?.clone()
    }

    pub(crate) fn set_agent(&self, connector: Arc<dyn Connector>) {
        if let Ok(mut slot) = self.agent.lock() {
            *slot = Some(connector);
        }
    }
}

/// Where a remote forward listens on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardEnd {
    /// A Unix socket path on the server.
    Unix(String),
    /// A loopback TCP port on the server.
    Tcp(u16),
}

impl std::fmt::Display for ForwardEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardEnd::Unix(path) => write!(f, "unix:{path}"),
            ForwardEnd::Tcp(port) => write!(f, "127.0.0.1:{port}"),
        }
    }
}

impl Session {
    /// Asks the server to listen on the Unix socket `path` (streamlocal-forward@openssh.com) and
    /// hands each connection to `connector`. The socket's directory should be private.
    pub async fn forward_unix(
        &self,
        path: &str,
        connector: Arc<dyn Connector>,
    ) -> Result<ForwardEnd> {
        if let Ok(mut routes) = self.routes().unix.lock() {
            routes.insert(path.to_string(), connector);
        }
        match self.handle().streamlocal_forward(path).await {
            Ok(()) => Ok(ForwardEnd::Unix(path.to_string())),
            Err(e) => {
                if let Ok(mut routes) = self.routes().unix.lock() {
                    routes.remove(path);
                }
                Err(self.error(
                    Step::Forward,
                    refused(e, &format!("listening on unix:{path}")),
                ))
            }
        }
    }

    /// Asks the server to listen on a loopback TCP port of its choosing and hands each
    /// connection to `connector`. Returns the port.
    pub async fn forward_tcp_loopback(&self, connector: Arc<dyn Connector>) -> Result<ForwardEnd> {
        let port = self
            .handle()
            .tcpip_forward("127.0.0.1", 0)
            .await
            .map_err(|e| self.error(Step::Forward, refused(e, "listening on 127.0.0.1:0")))?;
        if let Ok(mut routes) = self.routes().tcp.lock() {
            routes.insert(port, connector);
        }
        let port = u16::try_from(port).map_err(|_| {
            self.error(
                Step::Forward,
                Cause::Other(format!("server chose port {port}")),
            )
        })?;
        Ok(ForwardEnd::Tcp(port))
    }

    /// Asks the server to listen on loopback TCP `port` (the port a forward of an earlier
    /// connection had: a re-attached child's store client knows that one).
    pub async fn forward_tcp_port(
        &self,
        port: u16,
        connector: Arc<dyn Connector>,
    ) -> Result<ForwardEnd> {
        if let Ok(mut routes) = self.routes().tcp.lock() {
            routes.insert(u32::from(port), connector);
        }
        match self
            .handle()
            .tcpip_forward("127.0.0.1", u32::from(port))
            .await
        {
            Ok(_) => Ok(ForwardEnd::Tcp(port)),
            Err(e) => {
                if let Ok(mut routes) = self.routes().tcp.lock() {
                    routes.remove(&u32::from(port));
                }
                Err(self.error(
                    Step::Forward,
                    refused(e, &format!("listening on 127.0.0.1:{port}")),
                ))
            }
        }
    }

    /// A Unix-socket forward at `path`, or a loopback TCP port where the server refuses socket
    /// forwarding (old servers, or `AllowStreamLocalForwarding no`).
    pub async fn forward_unix_or_tcp(
        &self,
        path: &str,
        connector: Arc<dyn Connector>,
    ) -> Result<ForwardEnd> {
        match self.forward_unix(path, connector.clone()).await {
            Ok(end) => Ok(end),
            Err(e) => {
                tracing::debug!("{e}; falling back to a loopback TCP forward");
                self.forward_tcp_loopback(connector).await
            }
        }
    }

    /// Stops a remote forward.
    pub async fn cancel_forward(&self, end: &ForwardEnd) -> Result<()> {
        let result = match end {
            ForwardEnd::Unix(path) => {
                if let Ok(mut routes) = self.routes().unix.lock() {
                    routes.remove(path);
                }
                self.handle().cancel_streamlocal_forward(path.clone()).await
            }
            ForwardEnd::Tcp(port) => {
                if let Ok(mut routes) = self.routes().tcp.lock() {
                    routes.remove(&u32::from(*port));
                }
                self.handle()
                    .cancel_tcpip_forward("127.0.0.1", u32::from(*port))
                    .await
            }
        };
        result.map_err(|e| self.error(Step::Forward, e))
    }
}

fn refused(e: russh::Error, what: &str) -> Cause {
    match e {
        russh::Error::RequestDenied => Cause::Refused(what.to_string()),
        other => Cause::Protocol(other),
    }
}
