//! The one store client the rest of arbor uses, over etcd-client, for the embedded store and a
//! real etcd alike.
//!
//! Endpoints are `http://host:port` (one or more; a real etcd cluster given with `--seeds`) or
//! a Unix socket, `unix:PATH`, which is how a remote host reaches the store: the tunnel end is a
//! socket in its private working dir. Either way the connection comes back by itself after a
//! break; what the client adds on top is [`StoreClient::watch_prefix`], a watch that resumes
//! from the last revision it delivered, so a tunnel that drops and comes back loses no event.

use anyhow::{Context, bail};
use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions,
    WatchOptions,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse, TxnResponse};

/// How often the connection is probed, and how long a probe may go unanswered before the
/// connection counts as broken (a tunnel can die without a reset).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response the client accepts. One revision is never split across watch
/// responses, and a delete of many keys is one revision, so this is far above the request
/// limit.
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// Watch reconnection backoff bounds.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Where the store is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// `http://host:port` URLs of one store or of an etcd cluster's members.
    Http(Vec<String>),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Endpoints {
    /// Parses `unix:PATH`, or a comma-separated list of `http://host:port` URLs.
    pub fn parse(s: &str) -> anyhow::Result<Endpoints> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                bail!("store endpoint {s:?}: no socket path after unix:");
            }
            return Ok(Endpoints::Unix(PathBuf::from(path)));
        }
        let urls: Vec<String> = s.split(',').map(|u| u.trim().to_string()).collect();
        for url in &urls {
            if !url.starts_with("http://") {
                bail!("store endpoint {url:?}: expected http://host:port or unix:PATH");
            }
        }
        Ok(Endpoints::Http(urls))
    }
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEvent {
    pub kind: EventKind,
    pub key: Vec<u8>,
    /// Empty for a delete.
    pub value: Vec<u8>,
    /// The revision of the change (the key's mod revision).
    pub revision: i64,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A watch cannot go on without losing events. The caller must read the current state again
/// and watch from there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchLost {
    /// The store no longer has the history the watch would resume from.
    #[error(
        "store watch on {prefix:?}: history before revision {compact_revision} is compacted, \
         and the watch had only reached revision {next_revision}"
    )]
    Compacted {
        prefix: String,
        compact_revision: i64,
        next_revision: i64,
    },
    /// The endpoint now answers with another store (another cluster id): say, an initiator
    /// restarted with a fresh in-memory store. Its revisions have nothing to do with the old.
    #[error(
        "store watch on {prefix:?}: the store was replaced (cluster {old_cluster:x} is now \
         {new_cluster:x}); its history is not the one being watched"
    )]
    StoreReplaced {
        prefix: String,
        old_cluster: u64,
        new_cluster: u64,
    },
}

/// The store client. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct StoreClient {
    client: Client,
    /// The connection under `client`, for calls made as other callers (a relay's front).
    channel: tonic::transport::Channel,
    target: String,
    /// A cluster's members, which one connections go to (`None` for a Unix socket).
    members: Option<Arc<super::members::Members>>,
}

impl StoreClient {
    pub async fn connect(endpoints: &Endpoints) -> anyhow::Result<StoreClient> {
        Self::connect_as(endpoints, None).await
    }

    /// Connects as a user (name, password): the client authenticates with etcd's
    /// `Auth.Authenticate` and every request then carries the token, as etcd expects.
    pub async fn connect_as(
        endpoints: &Endpoints,
        user: Option<(&str, &str)>,
    ) -> anyhow::Result<StoreClient> {
        // A real etcd's tokens expire (after 5 minutes unused, by default): the client then
        // authenticates again and retries.
        let with_user = |options: ConnectOptions| match user {
            Some((name, password)) => options
                .with_user(name, password)
                .with_auto_token_refresh(true),
            None => options,
        };
        match endpoints {
            Endpoints::Http(urls) => {
                let target = urls.join(",");
                let members = super::members::Members::resolve(urls)
                    .await
                    .map_err(|e| anyhow::anyhow!(e))
                    .with_context(|| format!("connecting to the store at {target}"))?;
                let channel = members_channel(members.clone())?;
                let options = user.map(|_| with_user(ConnectOptions::new()));
                let client =
                    Client::from_channel(etcd_client::Channel::Tonic(channel.clone()), options)
                        .await
                        .with_context(|| format!("connecting to the store at {target}"))?;
                Ok(StoreClient {
                    client,
                    channel,
                    target,
                    members: Some(members),
                })
            }
            Endpoints::Unix(path) => {
                let channel = unix_channel(path.clone())?;
                let options = user.map(|_| with_user(ConnectOptions::new()));
                let client =
                    Client::from_channel(etcd_client::Channel::Tonic(channel.clone()), options)
                        .await
                        .with_context(|| {
                            format!("connecting to the store at unix:{}", path.display())
                        })?;
                Ok(StoreClient {
                    client,
                    channel,
                    target: format!("unix:{}", path.display()),
                    members: None,
                })
            }
        }
    }

    /// The connection to the store, for a relay's front to pass its children's calls through.
    pub fn channel(&self) -> tonic::transport::Channel {
        self.channel.clone()
    }

    /// The members a client of a cluster connects to (`None` for a Unix socket): children's
    /// store tunnels connect through the same ones, so they fail over together.
    pub fn members(&self) -> Option<Arc<super::members::Members>> {
        self.members.clone()
    }

    /// The underlying etcd-client, for what the helpers here do not cover.
    pub fn raw(&self) -> Client {
        self.client.clone()
    }

    fn context(&self, what: &str) -> String {
        format!("store {}: {what}", self.target)
    }

    /// Puts `value` under `key`; returns the revision of the write.
    pub async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> anyhow::Result<i64> {
        self.put_with(key, value, None).await
    }

    /// Puts `value` under `key`, held by lease `lease` (the key goes when the lease does).
    pub async fn put_leased(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> anyhow::Result<i64> {
        self.put_with(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
    }

    async fn put_with(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> anyhow::Result<i64> {
        let key = key.into();
        let resp = self
            .client
            .clone()
            .put(key.clone(), value, options)
            .await
            .with_context(|| self.context(&format!("put {}", String::from_utf8_lossy(&key))))?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// The current version of `key`, if it exists.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> anyhow::Result<Option<KeyValue>> {
        let key = key.into();
        let mut resp = self
            .client
            .clone()
            .get(key.clone(), None)
            .await
            .with_context(|| self.context(&format!("get {}", String::from_utf8_lossy(&key))))?;
        Ok(resp.take_kvs().into_iter().next())
    }

    /// Every key under `prefix`, in key order, and the revision they were read at (the
    /// revision to watch from, plus one, to see every later change).
    pub async fn get_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
    ) -> anyhow::Result<(Vec<KeyValue>, i64)> {
        self.read_prefix(prefix.into(), GetOptions::new().with_prefix())
            .await
    }

    /// [`StoreClient::get_prefix`], read serializably: a relay's store front answers it from
    /// its copy of the run's exports instead of sending every key down its uplink again
    /// (relay_front.rs). It still sees this client's own writes.
    pub async fn get_prefix_serializable(
        &self,
        prefix: impl Into<Vec<u8>>,
    ) -> anyhow::Result<(Vec<KeyValue>, i64)> {
        let options = GetOptions::new().with_prefix().with_serializable();
        self.read_prefix(prefix.into(), options).await
    }

    async fn read_prefix(
        &self,
        prefix: Vec<u8>,
        options: GetOptions,
    ) -> anyhow::Result<(Vec<KeyValue>, i64)> {
        let mut resp = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .get(prefix.clone(), Some(options))
            .await
            .with_context(|| {
                self.context(&format!("get prefix {}", String::from_utf8_lossy(&prefix)))
            })?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok((resp.take_kvs(), revision))
    }

    /// Deletes `key`; returns how many keys went (0 or 1).
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> anyhow::Result<i64> {
        self.delete_with(key.into(), None).await
    }

    /// Deletes every key under `prefix`; returns how many went.
    pub async fn delete_prefix(&self, prefix: impl Into<Vec<u8>>) -> anyhow::Result<i64> {
        self.delete_with(prefix.into(), Some(DeleteOptions::new().with_prefix()))
            .await
    }

    async fn delete_with(
        &self,
        key: Vec<u8>,
        options: Option<DeleteOptions>,
    ) -> anyhow::Result<i64> {
        let resp = self
            .client
            .clone()
            .delete(key.clone(), options)
            .await
            .with_context(|| self.context(&format!("delete {}", String::from_utf8_lossy(&key))))?;
        Ok(resp.deleted())
    }

    pub async fn txn(&self, txn: Txn) -> anyhow::Result<TxnResponse> {
        self.client
            .clone()
            .txn(txn)
            .await
            .with_context(|| self.context("txn"))
    }

    /// Grants a lease of `ttl` seconds; returns its id.
    pub async fn lease_grant(&self, ttl: i64) -> anyhow::Result<i64> {
        let resp = self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .with_context(|| self.context(&format!("grant a lease of {ttl}s")))?;
        Ok(resp.id())
    }

    pub async fn lease_revoke(&self, id: i64) -> anyhow::Result<()> {
        self.client
            .clone()
            .lease_revoke(id)
            .await
            .with_context(|| self.context(&format!("revoke lease {id:x}")))?;
        Ok(())
    }

    /// Keeps lease `id` alive, renewing it every `ttl / 3` seconds through reconnections,
    /// until the handle is dropped or the store says the lease is gone. A renewal that fails
    /// (the connection broke, or nothing answered within `ttl / 3`) is tried again on a new
    /// stream after [`RENEW_RETRY`], so a client whose tunnel moved to another member renews
    /// well before the lease runs out.
    pub fn keep_alive(&self, id: i64, ttl: i64) -> KeepAlive {
        let client = self.client.clone();
        let every = Duration::from_secs(u64::try_from(ttl / 3).unwrap_or(0).max(1));
        let expired = tokio_util::sync::CancellationToken::new();
        let said = expired.clone();
        let task = tokio::spawn(async move {
            let mut open = None;
            // Opening the stream renews the lease once: do it at once.
            let mut wait = Duration::ZERO;
            loop {
                tokio::time::sleep(wait).await;
                match renew(&client, id, &mut open, every).await {
                    Renewal::Renewed => wait = every,
                    Renewal::Expired => {
                        tracing::warn!("store: lease {id:x} expired; no longer renewing it");
                        said.cancel();
                        return;
                    }
                    Renewal::Broken(e) => {
                        tracing::debug!("store: renewing lease {id:x}: {e}; will retry");
                        open = None;
                        wait = RENEW_RETRY.min(every);
                    }
                }
            }
        });
        KeepAlive { task, expired }
    }

    /// Every change under `prefix` from revision `from_rev` on (0: from now), in revision
    /// order, across broken connections: after a break the watch is made again from the
    /// revision after the last one delivered. The stream ends with a [`WatchLost`] if the store
    /// has compacted that history away or has been replaced by another store, and when the
    /// stream is dropped the watch stops.
    pub fn watch_prefix(
        &self,
        prefix: impl Into<Vec<u8>>,
        from_rev: i64,
    ) -> ReceiverStream<Result<StoreEvent, WatchLost>> {
        let (tx, rx) = mpsc::channel(256);
        let watch = ResumingWatch {
            client: self.client.clone(),
            prefix: prefix.into(),
            next: from_rev,
            cluster: None,
            tx,
        };
        tokio::spawn(watch.run());
        ReceiverStream::new(rx)
    }
}

/// Renews a lease while alive; dropping it stops renewing (the lease then expires by itself).
pub struct KeepAlive {
    task: tokio::task::JoinHandle<()>,
    expired: tokio_util::sync::CancellationToken,
}

impl KeepAlive {
    /// False once the lease is known to have expired.
    pub fn is_alive(&self) -> bool {
        !self.expired.is_cancelled() && !self.task.is_finished()
    }

    /// Completes when the store has said the lease is gone (its keys with it); never while
    /// the store is only out of reach.
    pub fn expiry(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.expired.clone().cancelled_owned()
    }
}

/// How soon a renewal that failed is tried again.
const RENEW_RETRY: Duration = Duration::from_millis(500);

/// What one renewal of a lease found.
enum Renewal {
    Renewed,
    /// The store answered that the lease is gone.
    Expired,
    /// No answer: the connection broke, or nothing came back in time.
    Broken(String),
}

type KeepAliveStream = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Renews lease `id` once, on the stream in `open` (opened first if there is none).
async fn renew(
    client: &Client,
    id: i64,
    open: &mut Option<KeepAliveStream>,
    within: Duration,
) -> Renewal {
    let attempt = async {
        match open {
            None => match client.clone().lease_keep_alive(id).await {
                Ok(stream) => {
                    *open = Some(stream);
                    Renewal::Renewed
                }
                // etcd-client's way of saying the store answered TTL 0 to the first renewal.
                Err(etcd_client::Error::LeaseKeepAliveError(e)) if e == "lease not found" => {
                    Renewal::Expired
                }
                Err(e) => Renewal::Broken(e.to_string()),
            },
            Some((keeper, stream)) => {
                // A failed send means the stream is gone with its connection, not the lease.
                if let Err(e) = keeper.keep_alive().await {
                    return Renewal::Broken(e.to_string());
                }
                match stream.message().await {
                    Ok(Some(resp)) if resp.ttl() <= 0 => Renewal::Expired,
                    Ok(Some(_)) => Renewal::Renewed,
                    Ok(None) => Renewal::Broken("keep-alive stream closed".into()),
                    Err(e) => Renewal::Broken(e.to_string()),
                }
            }
        }
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(renewal) => renewal,
        Err(_) => Renewal::Broken(format!("no answer within {within:?}")),
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct ResumingWatch {
    client: Client,
    prefix: Vec<u8>,
    /// The first revision not yet delivered (0 until the first watch says where "now" is).
    next: i64,
    /// The store's cluster id, from the first reply.
    cluster: Option<u64>,
    tx: mpsc::Sender<Result<StoreEvent, WatchLost>>,
}

/// Why one watch stream ended.
enum End {
    /// The consumer dropped the stream, or history is gone: stop for good.
    Stop,
    /// The connection broke: make the watch again.
    Retry,
    /// The store refused the watch's token ("invalid auth token"): it expired, say at the
    /// member now answering. etcd 3.4 cancels the watch rather than failing the call, so
    /// etcd-client does not authenticate again by itself.
    Denied,
}

/// How often a refused watch may make the client authenticate again (each costs the etcd a
/// bcrypt hash).
const REAUTH_EVERY: Duration = Duration::from_secs(10);

impl ResumingWatch {
    async fn run(mut self) {
        let mut backoff = RETRY_MIN;
        let mut reauthenticated: Option<tokio::time::Instant> = None;
        loop {
            let delivered_before = self.next;
            match self.watch_once().await {
                End::Stop => return,
                End::Retry => {}
                End::Denied => {
                    if reauthenticated.is_none_or(|at| at.elapsed() >= REAUTH_EVERY) {
                        reauthenticated = Some(tokio::time::Instant::now());
                        match self.client.refresh_token().await {
                            // Again at once, while the new token is fresh.
                            Ok(()) => continue,
                            Err(e) => tracing::debug!(
                                "store: watch on {:?}: authenticating again: {e}",
                                self.prefix_str()
                            ),
                        }
                    }
                }
            }
            if self.next != delivered_before {
                backoff = RETRY_MIN;
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.tx.closed() => return,
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    async fn watch_once(&mut self) -> End {
        let mut options = WatchOptions::new().with_prefix().with_progress_notify();
        if self.next > 0 {
            options = options.with_start_revision(self.next);
        }
        let mut watch_client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let mut stream = tokio::select! {
            r = watch_client.watch(self.prefix.clone(), Some(options)) => match r {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!("store: watch on {:?}: {e}; retrying", self.prefix_str());
                    return End::Retry;
                }
            },
            () = self.tx.closed() => return End::Stop,
        };
        loop {
            let msg = tokio::select! {
                msg = stream.message() => msg,
                () = self.tx.closed() => return End::Stop,
            };
            let resp = match msg {
                Ok(Some(resp)) => resp,
                Ok(None) => return End::Retry,
                Err(e) => {
                    tracing::debug!(
                        "store: watch on {:?} broke: {e}; resuming",
                        self.prefix_str()
                    );
                    return End::Retry;
                }
            };
            let header_rev = resp.header().map_or(0, |h| h.revision());
            if let Some(cluster) = resp.header().map(|h| h.cluster_id()) {
                match self.cluster {
                    None => self.cluster = Some(cluster),
                    Some(old) if old != cluster => {
                        let lost = WatchLost::StoreReplaced {
                            prefix: self.prefix_str(),
                            old_cluster: old,
                            new_cluster: cluster,
                        };
                        let _ = self.tx.send(Err(lost)).await;
                        return End::Stop;
                    }
                    Some(_) => {}
                }
            }
            if resp.compact_revision() > 0 {
                let lost = WatchLost::Compacted {
                    prefix: self.prefix_str(),
                    compact_revision: resp.compact_revision(),
                    next_revision: self.next,
                };
                let _ = self.tx.send(Err(lost)).await;
                return End::Stop;
            }
            if resp.canceled() {
                tracing::debug!(
                    "store: watch on {:?} canceled: {}",
                    self.prefix_str(),
                    resp.cancel_reason()
                );
                if resp.cancel_reason().contains("invalid auth token") {
                    return End::Denied;
                }
                return End::Retry;
            }
            if resp.created() {
                if self.next == 0 {
                    self.next = header_rev + 1;
                }
                continue;
            }
            if resp.events().is_empty() {
                // A progress notification: every change up to header_rev has been sent.
                self.next = self.next.max(header_rev + 1);
                continue;
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let event = StoreEvent {
                    kind: match ev.event_type() {
                        EventType::Put => EventKind::Put,
                        EventType::Delete => EventKind::Delete,
                    },
                    key: kv.key().to_vec(),
                    value: kv.value().to_vec(),
                    revision: kv.mod_revision(),
                    create_revision: kv.create_revision(),
                    version: kv.version(),
                    lease: kv.lease(),
                };
                if kv.mod_revision() < self.next {
                    continue; // already delivered before a reconnect
                }
                self.next = kv.mod_revision() + 1;
                if self.tx.send(Ok(event)).await.is_err() {
                    return End::Stop;
                }
            }
        }
    }

    fn prefix_str(&self) -> String {
        String::from_utf8_lossy(&self.prefix).into_owned()
    }
}

/// The tonic endpoint of a channel whose connector picks where it connects: the URI only
/// fills the HTTP/2 :authority.
fn store_endpoint() -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(tonic::transport::Endpoint::try_from("http://arbor-store")
        .context("building the store endpoint")?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// A channel that connects to a cluster's members on demand (and again after a break), one at
/// a time, failing over from a member that does not answer to the next
/// ([`super::members::Members`]). Each member gets its own connect timeout there.
fn members_channel(
    members: Arc<super::members::Members>,
) -> anyhow::Result<tonic::transport::Channel> {
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let members = members.clone();
        async move {
            let stream = members.connect().await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(store_endpoint()?.connect_with_connector_lazy(connector))
}

/// A channel that dials the Unix socket at `path` on demand (and again after a break).
fn unix_channel(path: PathBuf) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = store_endpoint()?.connect_timeout(CONNECT_TIMEOUT);
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoints::parse("unix:/tmp/s").unwrap(),
            Endpoints::Unix("/tmp/s".into())
        );
        assert_eq!(
            Endpoints::parse("http://a:1, http://b:2").unwrap(),
            Endpoints::Http(vec!["http://a:1".into(), "http://b:2".into()])
        );
        assert!(Endpoints::parse("a:1").is_err());
    }
}
