//! What the engine needs from the store: publish this host's exports, watch everyone's,
//! publish this host's converged flag, and read, write and watch this host's `kv` keys.
//! Nothing else of the store is visible to the engine.
//!
//! # Key layout (etcd v3)
//!
//! | key | value | lease |
//! |---|---|---|
//! | `/arbor/runs/<run>/exports/<host>/<kind>/<name>` | the resource spec, [`encode_spec`] (JSON) | the host's |
//! | `/arbor/runs/<run>/converged/<host>` | `true` or `false` | the host's |
//! | `/arbor/kv/<host>/<key>` | a `kv` resource's value, as written | none |
//!
//! Exports and converged flags are under the run's own prefix ([`Keys`]): a run never takes
//! another run's exports or converged flags (say, those of a killed run whose leases have not
//! expired) for its own. `kv` keys are the host's, not the run's: as in mgmt they are state
//! that outlives the run that wrote it ([`kv_key`]).
//!
//! - [`Exchange::publish`] is one transaction: delete the host's exports prefix, then put every
//!   export, all on the host's lease, so watchers never see half a replacement.
//! - [`Exchange::watch_exports`] is a range get of the run's exports prefix followed by a watch
//!   of that prefix from the get's revision + 1; after every event it re-sends the full current
//!   set of the kind (keys split with [`Keys::parse_export`]).
//! - The lease is granted when the host joins and kept alive while it runs: a host that dies
//!   loses its exports and flag when the lease expires; one that exits calls
//!   [`Exchange::withdraw`] (revoke) so they vanish at once. A host that restarts re-publishes.
//!
//! [`MemoryExchange`] implements this in process, for the engine's unit tests; every run uses
//! the store (`store_exchange.rs`).

use crate::engine::resources::{Kind, ResourceSpec};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The key layout of one run: everything under `/arbor/runs/<run>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    exports: String,
    converged: String,
}

impl Keys {
    /// The keys of the run with id `run` (the initiator makes one per run).
    pub fn for_run(run: &str) -> Keys {
        Keys {
            exports: format!("/arbor/runs/{run}/exports/"),
            converged: format!("/arbor/runs/{run}/converged/"),
        }
    }

    /// Where every host's exports are.
    pub fn exports(&self) -> &str {
        &self.exports
    }

    /// Where one host's exports are.
    pub fn host_exports(&self, host: &str) -> String {
        format!("{}{host}/", self.exports)
    }

    pub fn export(&self, host: &str, kind: Kind, name: &str) -> String {
        format!("{}{host}/{kind}/{name}", self.exports)
    }

    /// `<exports>/<host>/<kind>/<name>` → (host, kind, name); names may contain `/`.
    pub fn parse_export<'a>(&self, key: &'a str) -> Option<(&'a str, Kind, &'a str)> {
        let rest = key.strip_prefix(self.exports.as_str())?;
        let (host, rest) = rest.split_once('/')?;
        let (kind, name) = rest.split_once('/')?;
        Some((host, Kind::parse(kind)?, name))
    }

    /// Where every host's converged flag is.
    pub fn converged_prefix(&self) -> &str {
        &self.converged
    }

    pub fn converged(&self, host: &str) -> String {
        format!("{}{host}", self.converged)
    }

    /// The host a converged-flag key names.
    pub fn converged_host<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.converged.as_str())
    }
}

/// Where every host's `kv` keys are.
pub const KV_PREFIX: &str = "/arbor/kv/";

/// Where one host's `kv` keys are: the only ones it may write.
pub fn kv_host_prefix(host: &str) -> String {
    format!("{KV_PREFIX}{host}/")
}

/// The store key of `kv` key `key` of `host`. The key is appended as it is: store keys are
/// flat, so no text in it (`../other/x`, say) leaves the host's prefix.
pub fn kv_key(host: &str, key: &str) -> String {
    format!("{}{key}", kv_host_prefix(host))
}

/// A fresh run id: 16 hex digits from the OS's random source.
pub fn new_run_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

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

    /// Where `host`'s `kv` key `key` is in the store, for messages: [`kv_key`].
    fn kv_store_key(&self, host: &str, key: &str) -> String {
        kv_key(host, key)
    }

    /// The value of `host`'s `kv` key `key` ([`kv_key`]), if it exists.
    fn kv_get(&self, host: &str, key: &str) -> BoxFuture<'_, anyhow::Result<Option<String>>>;

    /// Sets `host`'s `kv` key `key` to `value`, or deletes it for `None`. Not leased: the key
    /// outlives the host's run.
    fn kv_set(
        &self,
        host: &str,
        key: &str,
        value: Option<String>,
    ) -> BoxFuture<'_, anyhow::Result<()>>;

    /// An item each time `host`'s `kv` key `key` may have changed (and when the watch had to
    /// start over, so a change may have been missed). An `Err` item reports a broken watch; the
    /// stream may end after it.
    fn kv_watch(&self, host: &str, key: &str) -> BoxStream<'static, anyhow::Result<()>>;
}

/// The value stored under an export key: JSON, which every etcd tool shows readably, and
/// which keeps a YAML serializer out of the binary.
pub fn encode_spec(spec: &ResourceSpec) -> anyhow::Result<String> {
    Ok(serde_json::to_string(spec)?)
}

pub fn decode_spec(value: &str) -> anyhow::Result<ResourceSpec> {
    Ok(serde_json::from_str(value)?)
}

/// The puts of [`Exchange::publish`] for one host: (key, value) per export.
pub fn encode_exports(
    keys: &Keys,
    host: &str,
    exports: &[ResourceSpec],
) -> anyhow::Result<Vec<(String, String)>> {
    exports
        .iter()
        .map(|spec| {
            Ok((
                keys.export(host, spec.kind(), spec.name()),
                encode_spec(spec)?,
            ))
        })
        .collect()
}

/// The set [`Exchange::watch_exports`] sends, from the (key, value) pairs under the run's
/// exports prefix: those of `kind`, the host taken from the key. A value that does not
/// decode is an error naming its key (another arbor version, or a hand-written key).
pub fn decode_exports<'a>(
    keys: &Keys,
    kind: Kind,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> anyhow::Result<Vec<ExportedResource>> {
    let mut out = Vec::new();
    for (key, value) in pairs {
        let Some((host, key_kind, _)) = keys.parse_export(key) else {
            continue;
        };
        if key_kind != kind {
            continue;
        }
        let spec = decode_spec(value).map_err(|e| anyhow::anyhow!("{key}: {e:#}"))?;
        out.push(ExportedResource {
            host: host.to_string(),
            spec,
        });
    }
    Ok(out)
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
    /// By [`kv_key`]; kept when a host withdraws, as the store keeps them.
    kv: BTreeMap<String, String>,
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

    fn kv_get(&self, host: &str, key: &str) -> BoxFuture<'_, anyhow::Result<Option<String>>> {
        let value = self.lock().kv.get(&kv_key(host, key)).cloned();
        Box::pin(async { Ok(value) })
    }

    fn kv_set(
        &self,
        host: &str,
        key: &str,
        value: Option<String>,
    ) -> BoxFuture<'_, anyhow::Result<()>> {
        let key = kv_key(host, key);
        let mut s = self.lock();
        match value {
            Some(v) => s.kv.insert(key, v),
            None => s.kv.remove(&key),
        };
        drop(s);
        self.inner.changes.send_modify(|n| *n += 1);
        Box::pin(async { Ok(()) })
    }

    fn kv_watch(&self, host: &str, key: &str) -> BoxStream<'static, anyhow::Result<()>> {
        let key = kv_key(host, key);
        let me = self.clone();
        let rx = self.inner.changes.subscribe();
        let last = me.lock().kv.get(&key).cloned();
        Box::pin(futures::stream::unfold(
            (me, rx, last),
            move |(me, mut rx, last)| {
                let key = key.clone();
                async move {
                    loop {
                        rx.changed().await.ok()?;
                        let now = me.lock().kv.get(&key).cloned();
                        // Only this key's changes are news.
                        if now != last {
                            return Some((Ok(()), (me, rx, now)));
                        }
                    }
                }
            },
        ))
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
            ..FileSpec::default()
        })
    }

    #[test]
    fn specs_round_trip_through_the_stored_encoding() {
        for spec in [
            file("f"),
            ResourceSpec::Noop(NoopSpec {
                name: "n".into(),
                ..NoopSpec::default()
            }),
        ] {
            let text = encode_spec(&spec).expect("encode");
            assert_eq!(decode_spec(&text).expect("decode"), spec, "{text}");
        }
    }

    #[test]
    fn export_keys_split_back_into_host_kind_and_name() {
        let keys = Keys::for_run("r1");
        let key = keys.export("h1", Kind::File, "a/b");
        assert_eq!(key, "/arbor/runs/r1/exports/h1/file/a/b");
        assert_eq!(keys.parse_export(&key), Some(("h1", Kind::File, "a/b")));
        assert_eq!(keys.parse_export("/arbor/runs/r1/exports/h1/cron/x"), None);
        // Another run's keys are not this run's.
        assert_eq!(Keys::for_run("r2").parse_export(&key), None);
        assert_eq!(keys.converged_host(&keys.converged("h1")), Some("h1"));
        assert_eq!(
            Keys::for_run("r2").converged_host(&keys.converged("h1")),
            None
        );
    }

    #[test]
    fn kv_keys_stay_under_their_hosts_prefix_whatever_they_say() {
        assert_eq!(kv_key("h1", "color"), "/arbor/kv/h1/color");
        for key in ["../h2/color", "/h2/color", "", "a/../../h2"] {
            assert!(
                kv_key("h1", key).starts_with(&kv_host_prefix("h1")),
                "{key:?}"
            );
        }
        // One host's prefix never covers another's whose name it starts.
        assert!(!kv_key("h10", "x").starts_with(&kv_host_prefix("h1")));
    }

    #[test]
    fn published_pairs_decode_back_into_the_kinds_set() {
        let noop = ResourceSpec::Noop(NoopSpec {
            name: "n".into(),
            ..NoopSpec::default()
        });
        let keys = Keys::for_run("r");
        let pairs = encode_exports(&keys, "h1", &[file("f"), noop]).expect("encode");
        assert_eq!(pairs[0].0, "/arbor/runs/r/exports/h1/file/f");
        let set = decode_exports(
            &keys,
            Kind::File,
            pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .expect("decode");
        assert_eq!(
            set,
            vec![ExportedResource {
                host: "h1".into(),
                spec: file("f")
            }]
        );
        let err = decode_exports(
            &keys,
            Kind::File,
            [("/arbor/runs/r/exports/h1/file/x", "{not: [a spec")],
        )
        .expect_err("garbage");
        assert!(
            err.to_string().contains("/arbor/runs/r/exports/h1/file/x"),
            "{err}"
        );
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
                ResourceSpec::Noop(NoopSpec {
                    name: "n".into(),
                    ..NoopSpec::default()
                }),
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
