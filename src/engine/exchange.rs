//! What the engine needs from the store: publish this host's exports, watch everyone's,
//! publish this host's converged flag. Nothing else of the store is visible to the engine.
//!
//! # Key layout (etcd v3)
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/arbor/exports/<host>/<kind>/<name>` | the resource spec, [`encode_spec`] (YAML) | the host's |
//! | `/arbor/converged/<host>` | `true` or `false` | the host's |
//!
//! - [`Exchange::publish`] is one transaction: delete the prefix `/arbor/exports/<host>/`, then
//!   put every export, all on the host's lease, so watchers never see half a replacement.
//! - [`Exchange::watch_exports`] is a range get of `/arbor/exports/` followed by a watch of that
//!   prefix from the get's revision + 1; after every event it re-sends the full current set of
//!   the kind (keys split with [`parse_export_key`]).
//! - The lease is granted when the host joins and kept alive while it runs: a host that dies
//!   loses its exports and flag when the lease expires; one that exits calls
//!   [`Exchange::withdraw`] (revoke) so they vanish at once. A host that restarts re-publishes.
//!
//! [`MemoryExchange`] implements this in process, for the engine's unit tests (and, until the
//! embedded store lands on this branch, for the local runner).

use crate::engine::resources::{Kind, ResourceSpec};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

pub const EXPORTS_PREFIX: &str = "/arbor/exports/";
pub const CONVERGED_PREFIX: &str = "/arbor/converged/";

/// A resource exported by a host (name without `@@`), as every collector sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedResource {
    pub host: String,
    pub spec: ResourceSpec,
}

/// The store as the engine uses it. Object safe: engines hold an `Arc<dyn Exchange>`.
pub trait Exchange: Send + Sync + 'static {
    /// Replaces this host's exported resources with `exports`, on the host's lease.
    fn publish(&self, host: &str, exports: Vec<ResourceSpec>) -> BoxFuture<'_, anyhow::Result<()>>;

    /// Every host's exports of `kind`: first the current set, then the full set again after
    /// every change. An `Err` item reports a broken watch; the stream may end after it.
    fn watch_exports(
        &self,
        kind: Kind,
    ) -> BoxStream<'static, anyhow::Result<Vec<ExportedResource>>>;

    /// Publishes this host's converged flag.
    fn set_converged(&self, host: &str, converged: bool) -> BoxFuture<'_, anyhow::Result<()>>;

    /// The host is leaving: its exports and flag go now, not when the lease times out.
    fn withdraw(&self, host: &str) -> BoxFuture<'_, anyhow::Result<()>>;
}

pub fn export_key(host: &str, kind: Kind, name: &str) -> String {
    format!("{EXPORTS_PREFIX}{host}/{kind}/{name}")
}

/// `/arbor/exports/<host>/<kind>/<name>` → (host, kind, name); names may contain `/`.
pub fn parse_export_key(key: &str) -> Option<(&str, Kind, &str)> {
    let rest = key.strip_prefix(EXPORTS_PREFIX)?;
    let (host, rest) = rest.split_once('/')?;
    let (kind, name) = rest.split_once('/')?;
    Some((host, Kind::parse(kind)?, name))
}

pub fn converged_key(host: &str) -> String {
    format!("{CONVERGED_PREFIX}{host}")
}

/// The value stored under an export key.
pub fn encode_spec(spec: &ResourceSpec) -> anyhow::Result<String> {
    Ok(serde_saphyr::to_string(spec)?)
}

pub fn decode_spec(value: &str) -> anyhow::Result<ResourceSpec> {
    Ok(serde_saphyr::from_str(value)?)
}

/// An in-process [`Exchange`]: a map and a change counter. For the engine's unit tests, and
/// for the local runner until it embeds the real store. Leases are simulated by
/// [`MemoryExchange::expire`].
/// Clones share one exchange.
#[derive(Clone)]
pub struct MemoryExchange {
    inner: Arc<MemoryInner>,
}

struct MemoryInner {
    state: Mutex<MemoryState>,
    changes: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct MemoryState {
    exports: BTreeMap<String, Vec<ResourceSpec>>,
    converged: BTreeMap<String, bool>,
}

impl Default for MemoryExchange {
    fn default() -> Self {
        MemoryExchange {
            inner: Arc::new(MemoryInner {
                state: Mutex::new(MemoryState::default()),
                changes: tokio::sync::watch::channel(0).0,
            }),
        }
    }
}

impl MemoryExchange {
    pub fn new() -> Self {
        Self::default()
    }

    /// The host's lease ran out (it died without withdrawing).
    pub fn expire(&self, host: &str) {
        self.remove_host(host);
    }

    /// The last converged flag the host published, if any.
    pub fn converged(&self, host: &str) -> Option<bool> {
        self.lock().converged.get(host).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        // Plain maps: a panic elsewhere cannot leave them half-updated.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove_host(&self, host: &str) {
        let mut s = self.lock();
        s.exports.remove(host);
        s.converged.remove(host);
        drop(s);
        self.inner.changes.send_modify(|n| *n += 1);
    }

    fn snapshot(&self, kind: Kind) -> Vec<ExportedResource> {
        self.lock()
            .exports
            .iter()
            .flat_map(|(host, specs)| {
                specs
                    .iter()
                    .filter(move |s| s.kind() == kind)
                    .map(move |s| ExportedResource {
                        host: host.clone(),
                        spec: s.clone(),
                    })
            })
            .collect()
    }
}

impl Exchange for MemoryExchange {
    fn publish(&self, host: &str, exports: Vec<ResourceSpec>) -> BoxFuture<'_, anyhow::Result<()>> {
        self.lock().exports.insert(host.to_string(), exports);
        self.inner.changes.send_modify(|n| *n += 1);
        Box::pin(async { Ok(()) })
    }

    fn watch_exports(
        &self,
        kind: Kind,
    ) -> BoxStream<'static, anyhow::Result<Vec<ExportedResource>>> {
        let me = self.clone();
        let mut rx = self.inner.changes.subscribe();
        rx.mark_changed();
        Box::pin(futures::stream::unfold(
            (me, rx, None::<Vec<ExportedResource>>),
            move |(me, mut rx, last)| async move {
                loop {
                    rx.changed().await.ok()?;
                    let now = me.snapshot(kind);
                    // Only sets that differ: other kinds' changes are not news.
                    if last.as_ref() != Some(&now) {
                        return Some((Ok(now.clone()), (me, rx, Some(now))));
                    }
                }
            },
        ))
    }

    fn set_converged(&self, host: &str, converged: bool) -> BoxFuture<'_, anyhow::Result<()>> {
        self.lock().converged.insert(host.to_string(), converged);
        Box::pin(async { Ok(()) })
    }

    fn withdraw(&self, host: &str) -> BoxFuture<'_, anyhow::Result<()>> {
        self.remove_host(host);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::resources::{FileSpec, FileState, NoopSpec};
    use futures::StreamExt;

    fn file(name: &str) -> ResourceSpec {
        ResourceSpec::File(FileSpec {
            name: name.into(),
            path: format!("/tmp/{name}").into(),
            content: Some(format!("i am {name}\n")),
            state: FileState::Exists,
            mode: Some(0o644),
        })
    }

    #[test]
    fn specs_round_trip_through_the_stored_encoding() {
        for spec in [file("f"), ResourceSpec::Noop(NoopSpec { name: "n".into() })] {
            let text = encode_spec(&spec).expect("encode");
            assert_eq!(decode_spec(&text).expect("decode"), spec, "{text}");
        }
    }

    #[test]
    fn export_keys_split_back_into_host_kind_and_name() {
        let key = export_key("h1", Kind::File, "a/b");
        assert_eq!(key, "/arbor/exports/h1/file/a/b");
        assert_eq!(parse_export_key(&key), Some(("h1", Kind::File, "a/b")));
        assert_eq!(parse_export_key("/arbor/exports/h1/pkg/x"), None);
    }

    #[tokio::test]
    async fn watchers_see_the_current_set_then_every_change_and_expiry() {
        let ex = MemoryExchange::new();
        ex.publish("a", vec![file("fa")]).await.expect("publish");
        let mut files = ex.watch_exports(Kind::File);
        let first = files.next().await.expect("item").expect("ok");
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].host, "a");
        ex.publish(
            "b",
            vec![
                file("fb"),
                ResourceSpec::Noop(NoopSpec { name: "n".into() }),
            ],
        )
        .await
        .expect("publish");
        let second = files.next().await.expect("item").expect("ok");
        assert_eq!(second.len(), 2, "noop exports are not in the file set");
        ex.expire("a");
        let third = files.next().await.expect("item").expect("ok");
        assert_eq!(
            third.iter().map(|e| e.host.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
    }
}
