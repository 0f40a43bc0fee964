//! [`Exchange`] over the coordination store: the real thing every run uses, with the embedded
//! store or an etcd cluster alike (see the key layout in `exchange.rs`).
//!
//! Each host's keys live on a lease of [`LEASE_TTL`] seconds, kept alive while the host runs:
//! a host that dies without withdrawing loses its exports and converged flag when the lease
//! runs out, and collectors see them go.

use super::exchange::{Exchange, ExportedResource, Keys, decode_spec, encode_spec};
use super::resources::{Kind, ResourceSpec};
use crate::store::client::{EventKind, KeepAlive, StoreClient, Txn, TxnOp};
use anyhow::Context;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Seconds a host's keys outlive the host.
pub const LEASE_TTL: i64 = 10;

/// The store as the engine's exchange. Clones share the client and the leases.
#[derive(Clone)]
pub struct StoreExchange {
    client: StoreClient,
    keys: Keys,
    leases: Arc<Mutex<HashMap<String, (i64, KeepAlive)>>>,
}

impl StoreExchange {
    /// The exchange of one run (its keys are under `keys`).
    pub fn new(client: StoreClient, keys: Keys) -> Self {
        StoreExchange {
            client,
            keys,
            leases: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The host's lease, granted (and kept alive) on first use.
    async fn lease(&self, host: &str) -> anyhow::Result<i64> {
        let mut leases = self.leases.lock().await;
        if let Some((id, keep)) = leases.get(host)
            && keep.is_alive()
        {
            return Ok(*id);
        }
        let id = self.client.lease_grant(LEASE_TTL).await?;
        let keep = self.client.keep_alive(id, LEASE_TTL);
        leases.insert(host.to_string(), (id, keep));
        Ok(id)
    }

    async fn publish_inner(&self, host: &str, exports: Vec<ResourceSpec>) -> anyhow::Result<()> {
        let lease = self.lease(host).await?;
        let prefix = self.keys.host_exports(host);
        let (current, _) = self.client.get_prefix(prefix.as_bytes()).await?;
        let mut wanted = BTreeMap::new();
        for spec in &exports {
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
        Box::pin(async move { self.publish_inner(&host, exports).await })
    }

    fn watch_exports(
        &self,
        kind: Kind,
    ) -> BoxStream<'static, anyhow::Result<Vec<ExportedResource>>> {
        let client = self.client.clone();
        let keys = self.keys.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<Vec<ExportedResource>> = None;
            // Read everything, then follow changes; start over if the history is compacted.
            loop {
                let (kvs, revision) = match client.get_prefix(keys.exports()).await {
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
        Box::pin(async move {
            let lease = self.lease(&host).await?;
            self.client
                .put_leased(self.keys.converged(&host), converged.to_string(), lease)
                .await?;
            Ok(())
        })
    }

    fn withdraw(&self, host: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        let host = host.to_string();
        Box::pin(async move {
            let lease = self.leases.lock().await.remove(&host);
            match lease {
                // Revoking deletes every key on the lease at once.
                Some((id, _keep)) => self.client.lease_revoke(id).await,
                None => Ok(()),
            }
        })
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
