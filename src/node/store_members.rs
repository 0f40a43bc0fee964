//! Where the store tunnels of a node's children end when the store is reached over TCP: the
//! members of the etcd given with `--seeds` (at the initiator), or a relay's own tunnel end
//! where its server gave it a loopback port (one endpoint).
//!
//! Every connection a child's tunnel forwards is piped to one endpoint, tried in turn starting
//! from the last one that worked: when the member in use dies, the next connection (a host's
//! etcd client reconnects by itself) lands on a living member, and so do all after it. Nothing
//! follows a member that hangs while its port still accepts: that connection stays with it
//! until the host's client gives up on it (its keepalive), and the next one is accepted by the
//! same port again (docs/remote.md).
//!
//! A switch is said once, at warn level, naming the endpoint given up and the new one; so is a
//! time when none answers, until one does again. Single connections that fail are debug.

use crate::ssh::forward::{Connector, ForwardedStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;

/// How long one endpoint may take to accept a connection before the next is tried (a member
/// whose machine is gone answers nothing, rather than refusing).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The endpoints, and which one connections go to first.
pub(crate) struct StoreMembers {
    /// `host:port`, as given (resolved again for each connection).
    endpoints: Vec<String>,
    state: Mutex<Preferred>,
}

struct Preferred {
    /// The endpoint the last successful connection went to.
    index: usize,
    /// Whether "no endpoint answers" was said since the last success.
    all_down_said: bool,
}

impl StoreMembers {
    /// The endpoints `host:port` (or `http://host:port`), each checked to resolve now, so a
    /// typo fails the run before any host is contacted.
    pub(crate) async fn resolve(urls: &[String]) -> Result<Arc<StoreMembers>, String> {
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
        Ok(Arc::new(StoreMembers {
            endpoints,
            state: Mutex::new(Preferred {
                index: 0,
                all_down_said: false,
            }),
        }))
    }

    /// A connector that pipes each forwarded connection to the first endpoint that accepts it.
    pub(crate) fn connector(self: &Arc<Self>) -> Arc<dyn Connector> {
        let members = self.clone();
        Arc::new(move |mut stream: ForwardedStream| {
            let members = members.clone();
            tokio::spawn(async move {
                // A connection no endpoint takes is dropped: the host's client sees it close
                // and tries again.
                if let Some(mut member) = members.connect().await {
                    let _ = member.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut member).await;
                }
            });
        })
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

    /// A connection to the preferred endpoint, else to the next that accepts one.
    pub(crate) async fn connect(&self) -> Option<TcpStream> {
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
                        self.connected(first, index, &failed);
                        return Some(stream);
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
                };
            tracing::debug!("store tunnel: connecting to {endpoint}: {cause}");
            failed.push(format!("{endpoint} ({cause})"));
        }
        let mut state = self.lock();
        if !state.all_down_said {
            state.all_down_said = true;
            tracing::warn!(
                "store tunnels: no store endpoint answers: {}; hosts are cut off from the store \
                 until one does",
                failed.join(", ")
            );
        }
        None
    }

    /// A connection that started at endpoint `first` succeeded at `index`, after `failed`.
    /// Only the first connection to get past a dead endpoint moves the preference and says so.
    fn connected(&self, first: usize, index: usize, failed: &[String]) {
        let mut state = self.lock();
        let was_down = std::mem::replace(&mut state.all_down_said, false);
        if index != first && state.index == first {
            state.index = index;
            tracing::warn!(
                "store tunnels: {} given up; store tunnels now go to {}",
                failed.join(", "),
                self.endpoints[index]
            );
        } else if was_down {
            tracing::warn!(
                "store tunnels: {} answers again; store tunnels go to it",
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
        let members = StoreMembers::resolve(&urls).await.expect("resolve");
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
        let members = StoreMembers::resolve(&[dead, live_b.clone(), live_c.clone()])
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
        let members = StoreMembers::resolve(&[closed_port().await, closed_port().await])
            .await
            .expect("resolve");
        assert!(members.connect().await.is_none());
        assert!(members.connect().await.is_none());
    }

    #[tokio::test]
    async fn an_endpoint_that_does_not_resolve_fails_at_once() {
        let err = StoreMembers::resolve(&["http://no-such-host.invalid:2379".to_string()])
            .await
            .err()
            .unwrap_or_default();
        assert!(err.contains("no-such-host.invalid:2379"), "{err}");
    }
}
