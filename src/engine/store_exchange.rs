//! [`Exchange`] over the coordination store: the real thing every run uses, with the embedded
//! store or an etcd cluster alike (see the key layout in `exchange.rs`).
//!
//! Each host's keys live on a lease of [`LEASE_TTL`] seconds, kept alive while the host runs:
//! a host that dies without withdrawing loses its exports and converged flag when the lease
//! runs out, and collectors see them go. A lease that expires while the host lives (the store
//! was out of reach for longer than that) is replaced, and the host's exports and flag are
//! written again on the new one as soon as the store answers; so are those whose write failed
//! (the connection broke under it), without waiting for the host's next change.

use super::exchange::{Exchange, ExportedResource, Keys, decode_spec, encode_spec, kv_key};
use super::resources::{Kind, ResourceSpec};
use crate::store::client::{EventKind, KeepAlive, StoreClient, Txn, TxnOp};
use anyhow::Context;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify};

/// Seconds a host's keys outlive the host.
pub const LEASE_TTL: i64 = 10;

/// How soon writing a host's keys again is retried while the store is out of reach.
const RESTORE_RETRY: Duration = Duration::from_secs(1);

/// The store as the engine's exchange. Clones share the client and the leases.
#[derive(Clone)]
pub struct StoreExchange {
    shared: Arc<Shared>,
}

struct Shared {
    client: StoreClient,
    keys: Keys,
    hosts: Mutex<HashMap<String, HostKeys>>,
}

/// What the exchange holds for one host: its lease, and what it last wrote on it, so that it
/// can write it again after a write failed, or on a new lease should the old one expire (the
/// store was out of reach longer than [`LEASE_TTL`]: the host's exports and flag went with the
/// lease).
#[derive(Default)]
struct HostKeys {
    lease: Option<(i64, KeepAlive)>,
    exports: Option<Vec<ResourceSpec>>,
    converged: Option<bool>,
    /// Told when a write failed: [`keep_written`] tries it again.
    unwritten: Arc<Notify>,
    /// [`keep_written`] for this host; stopped with the host.
    restorer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for HostKeys {
    fn drop(&mut self) {
        if let Some(restorer) = &self.restorer {
            restorer.abort();
        }
    }
}

impl StoreExchange {
    /// The exchange of one run (its keys are under `keys`).
    pub fn new(client: StoreClient, keys: Keys) -> Self {
        StoreExchange {
            shared: Arc::new(Shared {
                client,
                keys,
                hosts: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Shared {
    /// The host's lease, granted (and kept alive) on first use. A lease that expired is
    /// replaced, and what the host had written on it is written again on the new one.
    async fn lease(&self, host: &str, keys: &mut HostKeys) -> anyhow::Result<i64> {
        if let Some((id, keep)) = &keys.lease
            && keep.is_alive()
        {
            return Ok(*id);
        }
        let id = self.client.lease_grant(LEASE_TTL).await?;
        let keep = self.client.keep_alive(id, LEASE_TTL);
        let expired = keys.lease.replace((id, keep)).is_some();
        if expired {
            tracing::warn!(
                "store: {host}'s lease expired while the store was out of reach; writing its \
                 exports and converged flag again"
            );
            if let Some(exports) = &keys.exports {
                self.write_exports(host, exports, id).await?;
            }
            if let Some(converged) = keys.converged {
                self.write_converged(host, converged, id).await?;
            }
        }
        Ok(id)
    }

    /// Starts the host's [`keep_written`], once.
    fn keep_written(self: &Arc<Self>, host: &str, keys: &mut HostKeys) {
        if keys.restorer.is_none() {
            keys.restorer = Some(tokio::spawn(keep_written(
                Arc::downgrade(self),
                host.to_string(),
                keys.unwritten.clone(),
            )));
        }
    }

    async fn publish(
        self: &Arc<Self>,
        host: &str,
        exports: Vec<ResourceSpec>,
    ) -> anyhow::Result<()> {
        let mut hosts = self.hosts.lock().await;
        let keys = hosts.entry(host.to_string()).or_default();
        self.keep_written(host, keys);
        keys.exports = Some(exports.clone());
        let written = async {
            let lease = self.lease(host, keys).await?;
            self.write_exports(host, &exports, lease).await
        }
        .await;
        if written.is_err() {
            keys.unwritten.notify_one();
        }
        written
    }

    async fn set_converged(self: &Arc<Self>, host: &str, converged: bool) -> anyhow::Result<()> {
        let mut hosts = self.hosts.lock().await;
        let keys = hosts.entry(host.to_string()).or_default();
        self.keep_written(host, keys);
        keys.converged = Some(converged);
        let written = async {
            let lease = self.lease(host, keys).await?;
            self.write_converged(host, converged, lease).await
        }
        .await;
        if written.is_err() {
            keys.unwritten.notify_one();
        }
        written
    }

    /// Writes everything the host holds (its exports and flag) on its lease.
    async fn write_all(&self, host: &str, keys: &mut HostKeys) -> anyhow::Result<()> {
        let lease = self.lease(host, keys).await?;
        if let Some(exports) = &keys.exports {
            self.write_exports(host, exports, lease).await?;
        }
        if let Some(converged) = keys.converged {
            self.write_converged(host, converged, lease).await?;
        }
        Ok(())
    }

    async fn write_converged(&self, host: &str, converged: bool, lease: i64) -> anyhow::Result<()> {
        self.client
            .put_leased(self.keys.converged(host), converged.to_string(), lease)
            .await?;
        Ok(())
    }

    /// Makes the host's exports exactly `exports`, on `lease`, in one transaction.
    async fn write_exports(
        &self,
        host: &str,
        exports: &[ResourceSpec],
        lease: i64,
    ) -> anyhow::Result<()> {
        let prefix = self.keys.host_exports(host);
        let (current, _) = self.client.get_prefix(prefix.as_bytes()).await?;
        let mut wanted = BTreeMap::new();
        for spec in exports {
            wanted.insert(
                self.keys.export(host, spec.kind(), spec.name()),
                encode_spec(spec).with_context(|| format!("encoding export {}", spec.name()))?,
            );
        }
        let mut ops = Vec::new();
        for kv in &current {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if !wanted.contains_key(&key) {
                ops.push(TxnOp::delete(key, None));
            }
        }
        for (key, value) in wanted {
            let unchanged = current.iter().any(|kv| {
                kv.key() == key.as_bytes() && kv.value() == value.as_bytes() && kv.lease() == lease
            });
            if !unchanged {
                ops.push(TxnOp::put(
                    key,
                    value,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                ));
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        // One transaction: watchers never see half of a replacement.
        self.client.txn(Txn::new().and_then(ops)).await?;
        Ok(())
    }
}

/// Writes a host's keys again whenever they may be missing from the store: after a write
/// failed (the connection broke under it, say when a member died), and each time its lease
/// expires (on a new lease). Retries while the store is out of reach, so exports and flags come
/// back without waiting for the host's next change. Ends when the exchange is gone; the host's
/// withdrawal aborts it.
async fn keep_written(shared: std::sync::Weak<Shared>, host: String, unwritten: Arc<Notify>) {
    loop {
        let expiry = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let hosts = shared.hosts.lock().await;
            let Some(keys) = hosts.get(&host) else {
                return;
            };
            keys.lease.as_ref().map(|(_, keep)| keep.expiry())
        };
        let expired = async {
            match expiry {
                Some(expiry) => expiry.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = expired => {}
            () = unwritten.notified() => {}
        }
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut hosts = shared.hosts.lock().await;
            let Some(keys) = hosts.get_mut(&host) else {
                return;
            };
            match shared.write_all(&host, keys).await {
                Ok(()) => {
                    // Says that the error a failed write logged is mended.
                    tracing::info!("store: {host}'s exports and converged flag written again");
                    break;
                }
                Err(e) => tracing::debug!("store: writing {host}'s keys again: {e:#}; will retry"),
            }
            drop(hosts);
            tokio::time::sleep(RESTORE_RETRY).await;
        }
    }
}

/// Current exports of every host, by key, as the watch keeps them.
fn snapshot(
    keys: &Keys,
    all: &BTreeMap<String, ResourceSpec>,
    kind: Kind,
) -> Vec<ExportedResource> {
    all.iter()
        .filter_map(|(key, spec)| {
            let (host, k, _) = keys.parse_export(key)?;
            (k == kind).then(|| ExportedResource {
                host: host.to_string(),
                spec: spec.clone(),
            })
        })
        .collect()
}

impl Exchange for StoreExchange {
    fn publish(&self, host: &str, exports: Vec<ResourceSpec>) -> BoxFuture<'_, anyhow::Result<()>> {
        let host = host.to_string();
        Box::pin(async move { self.shared.publish(&host, exports).await })
    }

    fn watch_exports(
        &self,
        kind: Kind,
    ) -> BoxStream<'static, anyhow::Result<Vec<ExportedResource>>> {
        let client = self.shared.client.clone();
        let keys = self.shared.keys.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<Vec<ExportedResource>> = None;
            // Read everything, then follow changes; start over if the history is compacted.
            loop {
                let (kvs, revision) = match client.get_prefix_serializable(keys.exports()).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let mut all = BTreeMap::new();
                for kv in kvs {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    match decode_spec(&String::from_utf8_lossy(kv.value())) {
                        Ok(spec) => {
                            all.insert(key, spec);
                        }
                        Err(e) => tracing::warn!("store: ignoring export {key}: {e}"),
                    }
                }
                let now = snapshot(&keys, &all, kind);
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                let mut events = client.watch_prefix(keys.exports(), revision + 1);
                while let Some(event) = events.next().await {
                    let event = match event {
                        Ok(e) => e,
                        Err(lost) => {
                            tracing::warn!("{lost}; reading exports again");
                            break;
                        }
                    };
                    let key = String::from_utf8_lossy(&event.key).into_owned();
                    match event.kind {
                        EventKind::Put => {
                            match decode_spec(&String::from_utf8_lossy(&event.value)) {
                                Ok(spec) => {
                                    all.insert(key, spec);
                                }
                                Err(e) => tracing::warn!("store: ignoring export {key}: {e}"),
                            }
                        }
                        EventKind::Delete => {
                            all.remove(&key);
                        }
                    }
                    let now = snapshot(&keys, &all, kind);
                    if last.as_ref() != Some(&now) {
                        if tx.send(Ok(now.clone())).await.is_err() {
                            return;
                        }
                        last = Some(now);
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    fn set_converged(&self, host: &str, converged: bool) -> BoxFuture<'_, anyhow::Result<()>> {
        let host = host.to_string();
        Box::pin(async move { self.shared.set_converged(&host, converged).await })
    }

    fn withdraw(&self, host: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        let host = host.to_string();
        Box::pin(async move {
            let keys = self.shared.hosts.lock().await.remove(&host);
            match keys.and_then(|mut k| k.lease.take()) {
                // Revoking deletes every key on the lease at once.
                Some((id, _keep)) => self.shared.client.lease_revoke(id).await,
                None => Ok(()),
            }
        })
    }

    fn kv_get(&self, host: &str, key: &str) -> BoxFuture<'_, anyhow::Result<Option<String>>> {
        let key = kv_key(host, key);
        Box::pin(async move {
            let kv = self.shared.client.get(key.as_bytes()).await?;
            Ok(kv.map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
    }

    fn kv_set(
        &self,
        host: &str,
        key: &str,
        value: Option<String>,
    ) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = kv_key(host, key);
        Box::pin(async move {
            match value {
                // No lease: the key outlives the host's run, as mgmt's do.
                Some(v) => self.shared.client.put(key, v).await.map(|_| ()),
                None => self.shared.client.delete(key).await.map(|_| ()),
            }
        })
    }

    fn kv_watch(&self, host: &str, key: &str) -> BoxStream<'static, anyhow::Result<()>> {
        let client = self.shared.client.clone();
        let key = kv_key(host, key);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // The store client's watch resumes across broken connections by itself; only a
            // lost history makes it end, and then a change may have been missed: say so, and
            // watch again from now.
            loop {
                let mut events = client.watch_prefix(key.as_bytes(), 0);
                while let Some(event) = events.next().await {
                    let news = match event {
                        // A prefix watch: keys that merely start with this one are not news.
                        Ok(e) => e.key == key.as_bytes(),
                        Err(lost) => {
                            tracing::warn!("{lost}; watching {key} again");
                            true
                        }
                    };
                    if news && tx.send(Ok(())).await.is_err() {
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Every host's converged flag, as the initiator follows them: `(host, converged)` updates,
/// starting with the current flags. A deleted flag (host withdrew or its lease expired) is
/// reported as `None`.
pub fn converged_flags(
    client: &StoreClient,
    keys: &Keys,
) -> BoxStream<'static, anyhow::Result<(String, Option<bool>)>> {
    let client = client.clone();
    let keys = keys.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (kvs, revision) = match client.get_prefix(keys.converged_prefix()).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for kv in kvs {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let Some(host) = keys.converged_host(&key).map(str::to_string) else {
                    continue;
                };
                let value = kv.value() == b"true";
                if tx.send(Ok((host, Some(value)))).await.is_err() {
                    return;
                }
            }
            let mut events = client.watch_prefix(keys.converged_prefix(), revision + 1);
            while let Some(event) = events.next().await {
                let Ok(event) = event else { break };
                let key = String::from_utf8_lossy(&event.key).into_owned();
                let Some(host) = keys.converged_host(&key).map(str::to_string) else {
                    continue;
                };
                let value = match event.kind {
                    EventKind::Put => Some(event.value == b"true"),
                    EventKind::Delete => None,
                };
                if tx.send(Ok((host, value))).await.is_err() {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
