//! The members of an etcd cluster given as several `http://host:port` URLs (`--seeds`), and
//! failing over between them: every new connection, the client's own and each one a child's
//! store tunnel forwards, goes to the member that last took one, else to the next that does,
//! in turn. When the member in use dies, the next connection (clients reconnect by
//! themselves) lands on a living member, and so do all after it. One URL (a relay's tunnel end
//! on a loopback port) is a cluster of one.
//!
//! Not covered: a member that hangs while its port still accepts. Its connections stay with it
//! until the client's keepalive gives up on them, and the next connection is accepted by the
//! same port again (docs/remote.md).
//!
//! A switch is said once, at warn level, naming the member given up and the new one; so is a
//! time when none answers, until one does again. Single connections that fail are debug.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// How long one member may take to accept a connection before the next is tried (a member
/// whose machine is gone answers nothing, rather than refusing).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The members, and which one connections go to first.
pub struct Members {
    /// `host:port`, as given (resolved again for each connection).
    endpoints: Vec<String>,
    state: Mutex<Preferred>,
}

struct Preferred {
    /// The endpoint the last successful connection went to.
    index: usize,
    /// Whether "no member answers" was said since the last success.
    all_down_said: bool,
}

impl Members {
    /// The members at `host:port` (or `http://host:port`), each checked to resolve now, so a
    /// typo fails the run before any host is contacted.
    pub async fn resolve(urls: &[String]) -> Result<Arc<Members>, String> {
        let mut endpoints = Vec::new();
        for url in urls {
            let endpoint = url.trim_start_matches("http://").to_string();
            tokio::net::lookup_host(endpoint.as_str())
                .await
                .map_err(|e| format!("store endpoint {endpoint}: {e}"))?
                .next()
                .ok_or_else(|| format!("store endpoint {endpoint}: no address"))?;
            endpoints.push(endpoint);
        }
        if endpoints.is_empty() {
            return Err("no store endpoint".into());
        }
        Ok(Arc::new(Members {
            endpoints,
            state: Mutex::new(Preferred {
                index: 0,
                all_down_said: false,
            }),
        }))
    }

    /// The preferred endpoint now (`host:port`).
    #[cfg(test)]
    fn preferred(&self) -> String {
        let index = self.lock().index;
        self.endpoints[index].clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Preferred> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to the preferred member, else to the next that accepts one.
    pub async fn connect(&self) -> std::io::Result<TcpStream> {
        let first = self.lock().index;
        let count = self.endpoints.len();
        let mut failed = Vec::new();
        for step in 0..count {
            let index = (first + step) % count;
            let endpoint = &self.endpoints[index];
            let cause =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint.as_str()))
                    .await
                {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        self.connected(first, index, &failed);
                        return Ok(stream);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
                };
            tracing::debug!("store: connecting to {endpoint}: {cause}");
            failed.push(format!("{endpoint} ({cause})"));
        }
        let failed = failed.join(", ");
        let mut state = self.lock();
        if !state.all_down_said {
            state.all_down_said = true;
            tracing::warn!(
                "store: no member answers: {failed}; the store is out of reach until one does"
            );
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no store member answers: {failed}"),
        ))
    }

    /// A connection that started at endpoint `first` succeeded at `index`, after `failed`.
    /// Only the first connection to get past a dead endpoint moves the preference and says so.
    fn connected(&self, first: usize, index: usize, failed: &[String]) {
        let mut state = self.lock();
        let was_down = std::mem::replace(&mut state.all_down_said, false);
        if index != first && state.index == first {
            state.index = index;
            tracing::warn!(
                "store: member {} given up; connections to the store now go to {}",
                failed.join(", "),
                self.endpoints[index]
            );
        } else if was_down {
            tracing::warn!(
                "store: member {} answers again; connections to the store go to it",
                self.endpoints[index]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A port nothing listens on (bound, then closed).
    async fn closed_port() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        addr.to_string()
    }

    #[tokio::test]
    async fn connections_go_to_the_first_endpoint_while_it_accepts() {
        let a = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let urls =
            [a.local_addr(), b.local_addr()].map(|addr| format!("http://{}", addr.expect("addr")));
        let members = Members::resolve(&urls).await.expect("resolve");
        for _ in 0..3 {
            let _stream = members.connect().await.expect("connect");
            a.accept().await.expect("a accepts");
        }
        assert_eq!(members.preferred(), urls[0].trim_start_matches("http://"));
    }

    #[tokio::test]
    async fn a_dead_endpoint_is_passed_over_and_the_next_one_kept() {
        let dead = closed_port().await;
        let b = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let live_b = b.local_addr().expect("addr").to_string();
        let live_c = c.local_addr().expect("addr").to_string();
        let members = Members::resolve(&[dead, live_b.clone(), live_c.clone()])
            .await
            .expect("resolve");
        let _first = members.connect().await.expect("connect");
        b.accept().await.expect("b accepts");
        assert_eq!(members.preferred(), live_b);
        // The next connections start at b, the one that worked.
        let _second = members.connect().await.expect("connect");
        b.accept().await.expect("b accepts again");
        // b dies too: on to c, and back around to the dead one only after it.
        drop(b);
        let _third = members.connect().await.expect("connect");
        c.accept().await.expect("c accepts");
        assert_eq!(members.preferred(), live_c);
    }

    #[tokio::test]
    async fn no_endpoint_answering_gives_no_connection() {
        let members = Members::resolve(&[closed_port().await, closed_port().await])
            .await
            .expect("resolve");
        assert!(members.connect().await.is_err());
        assert!(members.connect().await.is_err());
    }

    #[tokio::test]
    async fn an_endpoint_that_does_not_resolve_fails_at_once() {
        let err = Members::resolve(&["http://no-such-host.invalid:2379".to_string()])
            .await
            .err()
            .unwrap_or_default();
        assert!(err.contains("no-such-host.invalid:2379"), "{err}");
    }
}
