//! `kv`: a key in the store, set to a value (or absent).
//!
//! After mgmt's kv resource: the key (the name when `key` is missing) holds `value`; with no
//! `value` it is deleted. With `skiplessthan`, a stored value greater than ours (as integers,
//! or as strings with `skipcmpstyle: 1`) is left alone, so that hosts moving through numbered
//! stages only ever move a key forward; a refresh (notify edge) writes our value whatever is
//! stored.
//!
//! The key is always the host's own: `/arbor/kv/<host>/<key>` ([`kv_key`]), the only keys the
//! store lets a host write (docs/security.md). Like mgmt's, the key is not leased: it outlives
//! the run. Reads, writes and the watch go through the engine's one store client (the
//! exchange); the watch is a store watch on the key, not a poll.
//!
//! [`kv_key`]: crate::engine::exchange::kv_key

use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use crate::engine::exchange::Exchange;
use anyhow::{Context as _, bail};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSpec {
    pub name: String,
    /// The key, under the host's own prefix.
    pub key: String,
    /// `None`: the key must not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A stored value greater than ours is left as it is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skiplessthan: bool,
    #[serde(default, skip_serializing_if = "SkipCmpStyle::is_default")]
    pub skipcmpstyle: SkipCmpStyle,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

/// How `skiplessthan` compares values: mgmt's `skipcmpstyle`, 0 or 1 in a graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SkipCmpStyle {
    /// As integers (0). A stored value that is not one is overwritten.
    #[default]
    Int,
    /// As strings, byte by byte (1).
    String,
}

impl SkipCmpStyle {
    fn is_default(&self) -> bool {
        *self == SkipCmpStyle::Int
    }
}

/// What a kv resource reaches the store through: the engine's exchange, acting as `host`.
#[derive(Clone)]
pub struct KvStore {
    exchange: Arc<dyn Exchange>,
    host: String,
}

impl KvStore {
    pub fn new(exchange: Arc<dyn Exchange>, host: impl Into<String>) -> Self {
        KvStore {
            exchange,
            host: host.into(),
        }
    }
}

pub struct KvResource {
    id: ResourceId,
    spec: KvSpec,
    store: KvStore,
}

impl KvResource {
    pub fn new(spec: KvSpec, store: KvStore) -> Self {
        KvResource {
            id: ResourceId::new(Kind::Kv, spec.name.clone()),
            spec,
            store,
        }
    }

    /// The key in the store, for messages.
    fn store_key(&self) -> String {
        self.store
            .exchange
            .kv_store_key(&self.store.host, &self.spec.key)
    }

    /// Whether `stored` may stay although it is not our value: with `skiplessthan`, and no
    /// refresh, when it is greater than ours.
    fn keeps(&self, stored: &str, want: &str, refresh: bool) -> anyhow::Result<bool> {
        if !self.spec.skiplessthan || refresh {
            return Ok(false);
        }
        Ok(match self.spec.skipcmpstyle {
            SkipCmpStyle::Int => {
                // As mgmt: a stored value that is no integer is old or corrupt: overwrite it.
                let Ok(stored) = stored.trim().parse::<i64>() else {
                    return Ok(false);
                };
                let want: i64 = want
                    .trim()
                    .parse()
                    .with_context(|| format!("value `{want}` is not an integer"))?;
                want < stored
            }
            SkipCmpStyle::String => want < stored,
        })
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        let KvStore { exchange, host } = &self.store;
        let key = &self.spec.key;
        let store_key = self.store_key();
        let stored = exchange
            .kv_get(host, key)
            .await
            .with_context(|| format!("reading {store_key}"))?;
        let (what, value) = match (&stored, &self.spec.value) {
            (None, None) => return Ok(Outcome::Unchanged),
            (Some(s), Some(want)) if s == want => return Ok(Outcome::Unchanged),
            (Some(s), Some(want)) if self.keeps(s, want, ctx.refresh)? => {
                return Ok(Outcome::Unchanged);
            }
            (Some(s), None) => (format!("delete {store_key} (it is `{s}`)"), None),
            (Some(s), Some(want)) => (
                format!("set {store_key} to `{want}` (it is `{s}`)"),
                Some(want.clone()),
            ),
            (None, Some(want)) => (
                format!("set {store_key} to `{want}` (it is absent)"),
                Some(want.clone()),
            ),
        };
        if ctx.noop {
            return Ok(Outcome::WouldChange(format!("would {what}")));
        }
        exchange
            .kv_set(host, key, value)
            .await
            .context(what.clone())?;
        Ok(Outcome::Changed(what))
    }

    async fn watch_inner(&self, poke: Poke, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut changes = self
            .store
            .exchange
            .kv_watch(&self.store.host, &self.spec.key);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                change = changes.next() => match change {
                    Some(Ok(())) => poke.poke(),
                    Some(Err(e)) => {
                        return Err(e).with_context(|| format!("watching {}", self.store_key()));
                    }
                    None => bail!("the store watch on {} ended", self.store_key()),
                },
            }
        }
    }
}

impl Resource for KvResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(self.check_apply_inner(ctx))
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.watch_inner(poke, cancel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::exchange::MemoryExchange;
    use std::time::Duration;

    const RUN: ApplyContext = ApplyContext {
        noop: false,
        refresh: false,
    };
    const REFRESH: ApplyContext = ApplyContext {
        noop: false,
        refresh: true,
    };

    fn kv(ex: &MemoryExchange, key: &str, value: Option<&str>) -> KvResource {
        KvResource::new(
            KvSpec {
                name: key.into(),
                key: key.into(),
                value: value.map(Into::into),
                ..KvSpec::default()
            },
            KvStore::new(Arc::new(ex.clone()), "h1"),
        )
    }

    async fn stored(ex: &MemoryExchange, key: &str) -> Option<String> {
        ex.kv_get("h1", key).await.expect("get")
    }

    #[tokio::test]
    async fn sets_the_hosts_own_key_once_then_finds_it_right() {
        let ex = MemoryExchange::new();
        let res = kv(&ex, "color", Some("blue"));
        assert_eq!(res.id().to_string(), "kv[color]");
        let outcome = res.check_apply(RUN).await.expect("set");
        assert!(
            matches!(outcome, Outcome::Changed(ref m) if m.contains("/arbor/kv/h1/color") && m.contains("absent")),
            "{outcome:?}"
        );
        assert_eq!(stored(&ex, "color").await.as_deref(), Some("blue"));
        assert_eq!(ex.kv_get("h2", "color").await.expect("get"), None);
        assert_eq!(
            res.check_apply(RUN).await.expect("check"),
            Outcome::Unchanged
        );
        // Drift (an operator's etcdctl, say) is put right.
        ex.kv_set("h1", "color", Some("red".into()))
            .await
            .expect("drift");
        let outcome = res.check_apply(RUN).await.expect("repair");
        assert!(
            matches!(outcome, Outcome::Changed(ref m) if m.contains("it is `red`")),
            "{outcome:?}"
        );
        assert_eq!(stored(&ex, "color").await.as_deref(), Some("blue"));
    }

    #[tokio::test]
    async fn no_value_deletes_the_key() {
        let ex = MemoryExchange::new();
        ex.kv_set("h1", "gone", Some("x".into()))
            .await
            .expect("put");
        let res = kv(&ex, "gone", None);
        assert!(matches!(
            res.check_apply(RUN).await.expect("delete"),
            Outcome::Changed(ref m) if m.starts_with("delete")
        ));
        assert_eq!(stored(&ex, "gone").await, None);
        assert_eq!(
            res.check_apply(RUN).await.expect("check"),
            Outcome::Unchanged
        );
    }

    #[tokio::test]
    async fn noop_reports_and_writes_nothing() {
        let ex = MemoryExchange::new();
        let res = kv(&ex, "k", Some("v"));
        let noop = ApplyContext {
            noop: true,
            refresh: false,
        };
        assert!(matches!(
            res.check_apply(noop).await.expect("noop"),
            Outcome::WouldChange(ref m) if m.starts_with("would set")
        ));
        assert_eq!(stored(&ex, "k").await, None);
    }

    #[tokio::test]
    async fn skiplessthan_keeps_a_greater_stored_value_until_a_refresh() {
        let ex = MemoryExchange::new();
        let stage = |value: &str, style| {
            let mut r = kv(&ex, "stage", Some(value));
            r.spec.skiplessthan = true;
            r.spec.skipcmpstyle = style;
            r
        };
        ex.kv_set("h1", "stage", Some("10".into()))
            .await
            .expect("put");
        // 9 < 10 as integers: kept. As strings "9" > "10": overwritten.
        let res = stage("9", SkipCmpStyle::Int);
        assert_eq!(
            res.check_apply(RUN).await.expect("check"),
            Outcome::Unchanged
        );
        assert_eq!(stored(&ex, "stage").await.as_deref(), Some("10"));
        let res = stage("11", SkipCmpStyle::Int);
        assert!(res.check_apply(RUN).await.expect("forward").changed());
        assert_eq!(stored(&ex, "stage").await.as_deref(), Some("11"));
        let res = stage("9", SkipCmpStyle::String);
        assert!(res.check_apply(RUN).await.expect("as strings").changed());
        assert_eq!(stored(&ex, "stage").await.as_deref(), Some("9"));
        // A refresh writes our value whatever is stored.
        let res = stage("1", SkipCmpStyle::Int);
        assert_eq!(
            res.check_apply(RUN).await.expect("check"),
            Outcome::Unchanged
        );
        assert!(res.check_apply(REFRESH).await.expect("refresh").changed());
        assert_eq!(stored(&ex, "stage").await.as_deref(), Some("1"));
        // A stored value that is no integer is overwritten.
        ex.kv_set("h1", "stage", Some("junk".into()))
            .await
            .expect("put");
        assert!(res.check_apply(RUN).await.expect("junk").changed());
        assert_eq!(stored(&ex, "stage").await.as_deref(), Some("1"));
    }

    #[tokio::test]
    async fn the_watch_pokes_when_the_key_changes_and_not_for_other_keys() {
        let ex = MemoryExchange::new();
        let res = Arc::new(kv(&ex, "color", Some("blue")));
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        tokio::task::yield_now().await;
        ex.kv_set("h1", "other", Some("x".into()))
            .await
            .expect("other key");
        ex.kv_set("h2", "color", Some("x".into()))
            .await
            .expect("other host");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "poked for another key");
        ex.kv_set("h1", "color", Some("red".into()))
            .await
            .expect("drift");
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the change pokes");
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }
}
