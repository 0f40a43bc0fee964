//! The store conformance suite: every check is written once, against an endpoint, and runs
//! four times: against the embedded store, against a real etcd 3.4 (Debian's etcd-server),
//! and against a relay's store front (arbor::store::relay_front, sharing every watch) over
//! each of them.
//! The assertions are the same for both; where etcd's behaviour is loose (a TTL that is
//! counting down), the check states the range etcd promises.

#[path = "support/mod.rs"]
mod support;

#[path = "store_conformance_ops.rs"]
mod ops;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions,
};
use std::time::Duration;
use support::{TestStore, status};
use tonic::Code;

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn keys(kvs: &[etcd_client::KeyValue]) -> Vec<String> {
    kvs.iter().map(|kv| s(kv.key())).collect()
}

/// Runs each named check against both stores.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = super::support::embedded().await;
                    super::checks::$name(&store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = super::support::etcd().await;
                    super::checks::$name(&store).await;
                }
            )*
        }
        /// Through a relay's store front, over each store.
        mod front_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = super::support::front(super::support::embedded().await).await;
                    super::checks::$name(&store).await;
                }
            )*
        }
        mod front_etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = super::support::front(super::support::etcd().await).await;
                    super::checks::$name(&store).await;
                }
            )*
        }
    };
}

conformance!(
    put_and_get_track_create_mod_revision_and_version,
    headers_carry_cluster_member_revision_and_term,
    range_honours_every_option,
    put_options_lease_prev_kv_ignore_value_ignore_lease,
    delete_range_returns_prev_kvs_and_counts,
    txn_compares_every_target_with_every_result,
    txn_runs_nested_ops_and_fills_every_response,
    txn_refuses_duplicate_keys_and_too_many_ops,
    compaction_makes_old_revisions_unreadable,
    watch_replays_history_with_prev_kv_and_filters,
    watch_compacted_start_is_refused_with_the_compact_revision,
    watch_stream_carries_many_watches_and_cancels_one,
    watch_progress_request_and_progress_notify,
    watch_fragments_a_revision_too_large_for_one_message,
    lease_grant_keepalive_ttl_leases_revoke,
    lease_expiry_deletes_keys_and_watchers_see_it,
    concurrent_writers_and_watchers_see_every_event_in_revision_order,
    client_watch_resumes_after_its_connection_is_cut,
    client_helpers_and_keep_alive,
    oversized_requests_get_a_clear_error,
    malformed_requests_get_an_error_and_the_store_goes_on,
    status_and_member_list_describe_one_leader,
);

mod checks {
    use super::*;
    use arbor::store::client::{Endpoints, EventKind, StoreClient};
    use tokio_stream::StreamExt;

    pub async fn put_and_get_track_create_mod_revision_and_version(store: &TestStore) {
        let mut c = store.client().await;
        let r1 = c.put("k", "v1", None).await.unwrap();
        let rev1 = r1.header().unwrap().revision();
        let r2 = c.put("k", "v2", None).await.unwrap();
        assert_eq!(
            r2.header().unwrap().revision(),
            rev1 + 1,
            "one revision per put"
        );
        let got = c.get("k", None).await.unwrap();
        let kv = &got.kvs()[0];
        assert_eq!(kv.value(), b"v2");
        assert_eq!(kv.create_revision(), rev1);
        assert_eq!(kv.mod_revision(), rev1 + 1);
        assert_eq!(kv.version(), 2);
        assert_eq!(got.count(), 1);
        c.delete("k", None).await.unwrap();
        let r3 = c.put("k", "v3", None).await.unwrap();
        let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
        assert_eq!(
            kv.create_revision(),
            r3.header().unwrap().revision(),
            "new generation"
        );
        assert_eq!(kv.version(), 1);
        let missing = c.get("nope", None).await.unwrap();
        assert!(missing.kvs().is_empty());
        assert_eq!(missing.count(), 0);
        let err = status(c.get("", None).await.unwrap_err());
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "etcdserver: key is not provided");
    }

    pub async fn headers_carry_cluster_member_revision_and_term(store: &TestStore) {
        let mut c = store.client().await;
        let put = c.put("h", "1", None).await.unwrap();
        let get = c.get("h", None).await.unwrap();
        let del = c.delete("h", None).await.unwrap();
        let grant = c.lease_grant(10, None).await.unwrap();
        let status = c.status().await.unwrap();
        let members = c.member_list().await.unwrap();
        let headers = [
            put.header().unwrap(),
            get.header().unwrap(),
            del.header().unwrap(),
            grant.header().unwrap(),
            status.header().unwrap(),
            members.header().unwrap(),
        ];
        let first = headers[0];
        for (i, h) in headers.iter().enumerate() {
            assert_ne!(h.cluster_id(), 0);
            assert_eq!(h.cluster_id(), first.cluster_id());
            assert_ne!(h.member_id(), 0);
            assert_eq!(h.member_id(), first.member_id());
            assert_ne!(h.raft_term(), 0);
            // etcd leaves MemberList's header revision at 0; the embedded store fills it.
            if i < 5 {
                assert!(h.revision() >= first.revision());
            }
        }
        assert_eq!(
            get.header().unwrap().revision(),
            put.header().unwrap().revision()
        );
        assert_eq!(
            del.header().unwrap().revision(),
            put.header().unwrap().revision() + 1
        );
    }

    pub async fn range_honours_every_option(store: &TestStore) {
        let mut c = store.client().await;
        // Values sort in the opposite order to keys; k3 is written twice (version 2).
        let mut first_rev = 0;
        for (i, k) in ["r/k1", "r/k2", "r/k3", "r/k4", "r/k5"].iter().enumerate() {
            let value = format!("v{}", 9 - i);
            let r = c.put(*k, value, None).await.unwrap();
            if i == 0 {
                first_rev = r.header().unwrap().revision();
            }
        }
        c.put("r/k3", "v7", None).await.unwrap();
        let latest = c
            .put("s", "outside", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();

        let all = c
            .get("r/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(keys(all.kvs()), ["r/k1", "r/k2", "r/k3", "r/k4", "r/k5"]);
        assert_eq!(all.count(), 5);
        assert!(!all.more());

        let range = c
            .get("r/k2", Some(GetOptions::new().with_range("r/k4")))
            .await
            .unwrap();
        assert_eq!(keys(range.kvs()), ["r/k2", "r/k3"]);

        let from = c
            .get("r/k4", Some(GetOptions::new().with_from_key()))
            .await
            .unwrap();
        assert_eq!(keys(from.kvs()), ["r/k4", "r/k5", "s"]);

        let limited = c
            .get("r/", Some(GetOptions::new().with_prefix().with_limit(2)))
            .await
            .unwrap();
        assert_eq!(keys(limited.kvs()), ["r/k1", "r/k2"]);
        assert!(limited.more());
        assert_eq!(limited.count(), 5);
        let exact = c
            .get("r/", Some(GetOptions::new().with_prefix().with_limit(5)))
            .await
            .unwrap();
        assert!(!exact.more());

        let old = c
            .get(
                "r/",
                Some(GetOptions::new().with_prefix().with_revision(first_rev + 1)),
            )
            .await
            .unwrap();
        assert_eq!(keys(old.kvs()), ["r/k1", "r/k2"]);
        assert_eq!(
            old.header().unwrap().revision(),
            latest,
            "the header names the store's revision, not the one read"
        );

        let keys_only = c
            .get("r/", Some(GetOptions::new().with_prefix().with_keys_only()))
            .await
            .unwrap();
        assert!(keys_only.kvs().iter().all(|kv| kv.value().is_empty()));
        assert_eq!(keys_only.kvs().len(), 5);

        let count_only = c
            .get(
                "r/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .unwrap();
        assert!(count_only.kvs().is_empty());
        assert_eq!(count_only.count(), 5);

        let sorted = |target, order| {
            let mut c = c.clone();
            async move {
                let r = c
                    .get(
                        "r/",
                        Some(GetOptions::new().with_prefix().with_sort(target, order)),
                    )
                    .await
                    .unwrap();
                keys(r.kvs())
            }
        };
        assert_eq!(
            sorted(SortTarget::Key, SortOrder::Descend).await,
            ["r/k5", "r/k4", "r/k3", "r/k2", "r/k1"]
        );
        assert_eq!(
            sorted(SortTarget::Value, SortOrder::Ascend).await,
            ["r/k5", "r/k4", "r/k3", "r/k2", "r/k1"]
        );
        assert_eq!(
            sorted(SortTarget::Mod, SortOrder::Descend).await,
            ["r/k3", "r/k5", "r/k4", "r/k2", "r/k1"]
        );
        assert_eq!(
            sorted(SortTarget::Create, SortOrder::Descend).await,
            ["r/k5", "r/k4", "r/k3", "r/k2", "r/k1"]
        );
        assert_eq!(
            sorted(SortTarget::Version, SortOrder::Descend).await[0],
            "r/k3"
        );
        // A target without an order sorts ascending.
        assert_eq!(
            sorted(SortTarget::Value, SortOrder::None).await,
            ["r/k5", "r/k4", "r/k3", "r/k2", "r/k1"]
        );

        let sorted_limited = c
            .get(
                "r/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Value, SortOrder::Ascend)
                        .with_limit(2),
                ),
            )
            .await
            .unwrap();
        assert_eq!(
            keys(sorted_limited.kvs()),
            ["r/k5", "r/k4"],
            "limit applies after sort"
        );
        assert!(sorted_limited.more());

        let min_mod = c
            .get(
                "r/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_min_mod_revision(first_rev + 3),
                ),
            )
            .await
            .unwrap();
        assert_eq!(keys(min_mod.kvs()), ["r/k3", "r/k4", "r/k5"]);
        assert_eq!(min_mod.count(), 5, "count is before the filters");
        let max_mod = c
            .get(
                "r/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_max_mod_revision(first_rev + 1),
                ),
            )
            .await
            .unwrap();
        assert_eq!(keys(max_mod.kvs()), ["r/k1", "r/k2"]);
        let created = c
            .get(
                "r/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_min_create_revision(first_rev + 1)
                        .with_max_create_revision(first_rev + 2),
                ),
            )
            .await
            .unwrap();
        assert_eq!(keys(created.kvs()), ["r/k2", "r/k3"]);

        let serializable = c
            .get("r/k1", Some(GetOptions::new().with_serializable()))
            .await
            .unwrap();
        assert_eq!(serializable.kvs()[0].value(), b"v9");

        let empty = c
            .get("r/k4", Some(GetOptions::new().with_range("r/k2")))
            .await
            .unwrap();
        assert!(
            empty.kvs().is_empty(),
            "range_end before key is an empty range"
        );
    }

    pub async fn put_options_lease_prev_kv_ignore_value_ignore_lease(store: &TestStore) {
        let mut c = store.client().await;
        let lease = c.lease_grant(60, None).await.unwrap().id();
        c.put("p", "v1", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
        let r = c
            .put(
                "p",
                "v2",
                Some(PutOptions::new().with_prev_key().with_ignore_lease()),
            )
            .await
            .unwrap();
        let prev = r.prev_key().expect("prev_kv");
        assert_eq!(prev.value(), b"v1");
        assert_eq!(prev.lease(), lease);
        let kv = c.get("p", None).await.unwrap().kvs()[0].clone();
        assert_eq!(kv.lease(), lease, "ignore_lease keeps the lease");
        assert_eq!(kv.value(), b"v2");

        c.put("p", "", Some(PutOptions::new().with_ignore_value()))
            .await
            .unwrap();
        let kv = c.get("p", None).await.unwrap().kvs()[0].clone();
        assert_eq!(kv.value(), b"v2", "ignore_value keeps the value");
        assert_eq!(kv.lease(), 0, "a put without ignore_lease drops the lease");
        assert_eq!(kv.version(), 3);

        let r = c
            .put("fresh", "x", Some(PutOptions::new().with_prev_key()))
            .await
            .unwrap();
        assert!(r.prev_key().is_none());

        let err = status(
            c.put("absent", "", Some(PutOptions::new().with_ignore_value()))
                .await
                .unwrap_err(),
        );
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "etcdserver: key not found");
        let err = status(
            c.put("p", "x", Some(PutOptions::new().with_ignore_value()))
                .await
                .unwrap_err(),
        );
        assert_eq!(err.message(), "etcdserver: value is provided");
        let err = status(
            c.put(
                "p",
                "x",
                Some(PutOptions::new().with_lease(lease).with_ignore_lease()),
            )
            .await
            .unwrap_err(),
        );
        assert_eq!(err.message(), "etcdserver: lease is provided");
        let err = status(
            c.put("p", "x", Some(PutOptions::new().with_lease(0x1234)))
                .await
                .unwrap_err(),
        );
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.message(), "etcdserver: requested lease not found");
        let err = status(c.put("", "x", None).await.unwrap_err());
        assert_eq!(err.message(), "etcdserver: key is not provided");
    }

    pub async fn delete_range_returns_prev_kvs_and_counts(store: &TestStore) {
        let mut c = store.client().await;
        for k in ["d/a", "d/b", "d/c", "d/d", "e"] {
            c.put(k, format!("val-{k}"), None).await.unwrap();
        }
        let one = c
            .delete("d/a", Some(DeleteOptions::new().with_prev_key()))
            .await
            .unwrap();
        assert_eq!(one.deleted(), 1);
        assert_eq!(one.prev_kvs()[0].value(), b"val-d/a");
        let before = one.header().unwrap().revision();
        let range = c
            .delete("d/b", Some(DeleteOptions::new().with_range("d/d")))
            .await
            .unwrap();
        assert_eq!(range.deleted(), 2);
        assert!(range.prev_kvs().is_empty(), "no prev_kvs unless asked");
        assert_eq!(
            range.header().unwrap().revision(),
            before + 1,
            "one revision for all"
        );
        let nothing = c.delete("d/zz", None).await.unwrap();
        assert_eq!(nothing.deleted(), 0);
        assert_eq!(
            nothing.header().unwrap().revision(),
            before + 1,
            "no revision for nothing"
        );
        let prefix = c
            .delete(
                "d/",
                Some(DeleteOptions::new().with_prefix().with_prev_key()),
            )
            .await
            .unwrap();
        assert_eq!(keys(prefix.prev_kvs()), ["d/d"]);
        assert_eq!(c.get("e", None).await.unwrap().count(), 1);
    }

    pub async fn txn_compares_every_target_with_every_result(store: &TestStore) {
        let mut c = store.client().await;
        let lease = c.lease_grant(60, None).await.unwrap().id();
        let r = c
            .put("t/a", "m", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
        let create = r.header().unwrap().revision();
        c.put("t/a", "m", Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap();
        let modr = create + 1;
        c.put("t/b", "z", None).await.unwrap();

        let check = |cmp: Compare, want: bool, what: &'static str| {
            let mut c = c.clone();
            async move {
                let r = c.txn(Txn::new().when([cmp])).await.unwrap();
                assert_eq!(r.succeeded(), want, "{what}");
            }
        };
        use CompareOp::*;
        check(Compare::value("t/a", Equal, "m"), true, "value =").await;
        check(Compare::value("t/a", NotEqual, "m"), false, "value !=").await;
        check(Compare::value("t/a", Greater, "a"), true, "value >").await;
        check(Compare::value("t/a", Less, "a"), false, "value <").await;
        check(Compare::version("t/a", Equal, 2), true, "version =").await;
        check(Compare::version("t/a", Greater, 1), true, "version >").await;
        check(Compare::version("t/a", Less, 2), false, "version <").await;
        check(Compare::version("t/a", NotEqual, 2), false, "version !=").await;
        check(
            Compare::create_revision("t/a", Equal, create),
            true,
            "create =",
        )
        .await;
        check(
            Compare::create_revision("t/a", Less, create),
            false,
            "create <",
        )
        .await;
        check(
            Compare::create_revision("t/a", Greater, create - 1),
            true,
            "create >",
        )
        .await;
        check(
            Compare::create_revision("t/a", NotEqual, create),
            false,
            "create !=",
        )
        .await;
        check(Compare::mod_revision("t/a", Equal, modr), true, "mod =").await;
        check(Compare::mod_revision("t/a", Less, modr + 1), true, "mod <").await;
        check(Compare::mod_revision("t/a", Greater, modr), false, "mod >").await;
        check(
            Compare::mod_revision("t/a", NotEqual, create),
            true,
            "mod !=",
        )
        .await;
        check(Compare::lease("t/a", Equal, lease), true, "lease =").await;
        check(Compare::lease("t/b", Equal, 0), true, "no lease = 0").await;
        check(Compare::lease("t/a", NotEqual, lease), false, "lease !=").await;
        check(Compare::lease("t/a", Greater, 0), true, "lease >").await;
        check(Compare::lease("t/a", Less, 0), false, "lease <").await;
        // Missing keys: version/create/mod are 0; a value compare is false.
        check(
            Compare::version("t/none", Equal, 0),
            true,
            "missing version = 0",
        )
        .await;
        check(
            Compare::create_revision("t/none", Equal, 0),
            true,
            "missing create = 0",
        )
        .await;
        check(Compare::value("t/none", Equal, ""), false, "missing value").await;
        check(
            Compare::value("t/none", NotEqual, "x"),
            false,
            "missing value !=",
        )
        .await;
        // Over a range, every key must satisfy the compare.
        check(
            Compare::value("t/", Greater, "a").with_prefix(),
            true,
            "range all >",
        )
        .await;
        check(
            Compare::value("t/", Equal, "m").with_prefix(),
            false,
            "range not all =",
        )
        .await;
        check(
            Compare::version("t/a", Greater, 0).with_range("t/c"),
            true,
            "range version",
        )
        .await;
        // All compares of a txn must hold.
        let r = c
            .txn(Txn::new().when([
                Compare::value("t/a", Equal, "m"),
                Compare::value("t/b", Equal, "nope"),
            ]))
            .await
            .unwrap();
        assert!(!r.succeeded());
    }

    pub async fn txn_runs_nested_ops_and_fills_every_response(store: &TestStore) {
        let mut c = store.client().await;
        let base = c
            .put("n/x", "1", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let txn = Txn::new()
            .when([Compare::value("n/x", CompareOp::Equal, "1")])
            .and_then([
                TxnOp::put("n/y", "2", Some(PutOptions::new().with_prev_key())),
                TxnOp::get("n/", Some(GetOptions::new().with_prefix())),
                TxnOp::delete("n/x", Some(DeleteOptions::new().with_prev_key())),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::version("n/x", CompareOp::Equal, 1)])
                        .and_then([TxnOp::put("n/then", "t", None)])
                        .or_else([TxnOp::put("n/else", "e", None)]),
                ),
            ])
            .or_else([TxnOp::put("n/failed", "f", None)]);
        let r = c.txn(txn).await.unwrap();
        assert!(r.succeeded());
        assert_eq!(
            r.header().unwrap().revision(),
            base + 1,
            "one revision for the txn"
        );
        let ops = r.op_responses();
        assert_eq!(ops.len(), 4);
        match &ops[0] {
            TxnOpResponse::Put(p) => assert!(p.prev_key().is_none()),
            _ => panic!("op 0 is a put"),
        }
        match &ops[1] {
            // Reads in a txn see its earlier writes.
            TxnOpResponse::Get(g) => {
                assert_eq!(keys(g.kvs()), ["n/x", "n/y"]);
                assert_eq!(g.kvs()[1].mod_revision(), base + 1);
            }
            _ => panic!("op 1 is a get"),
        }
        match &ops[2] {
            TxnOpResponse::Delete(d) => {
                assert_eq!(d.deleted(), 1);
                assert_eq!(d.prev_kvs()[0].value(), b"1");
            }
            _ => panic!("op 2 is a delete"),
        }
        match &ops[3] {
            // Nested compares are evaluated before the txn ran: n/x still had version 1.
            TxnOpResponse::Txn(t) => {
                assert!(t.succeeded());
                assert_eq!(t.op_responses().len(), 1);
            }
            _ => panic!("op 3 is a txn"),
        }
        let all = c
            .get("n/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(keys(all.kvs()), ["n/then", "n/y"]);
        assert!(all.kvs().iter().all(|kv| kv.mod_revision() == base + 1));

        let failed = c
            .txn(
                Txn::new()
                    .when([Compare::value("n/x", CompareOp::Equal, "1")])
                    .and_then([TxnOp::put("n/nope", "x", None)])
                    .or_else([TxnOp::get("n/y", None)]),
            )
            .await
            .unwrap();
        assert!(!failed.succeeded());
        assert_eq!(
            failed.header().unwrap().revision(),
            base + 1,
            "a txn that writes nothing makes no revision"
        );
        match &failed.op_responses()[0] {
            TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"2"),
            _ => panic!("else op is a get"),
        }
    }

    pub async fn txn_refuses_duplicate_keys_and_too_many_ops(store: &TestStore) {
        let mut c = store.client().await;
        let dup = c
            .txn(Txn::new().and_then([TxnOp::put("dup", "1", None), TxnOp::put("dup", "2", None)]))
            .await
            .unwrap_err();
        let dup = status(dup);
        assert_eq!(dup.code(), Code::InvalidArgument);
        assert_eq!(
            dup.message(),
            "etcdserver: duplicate key given in txn request"
        );
        let put_in_deleted = c
            .txn(Txn::new().and_then([
                TxnOp::delete("a", Some(DeleteOptions::new().with_range("c"))),
                TxnOp::put("b", "1", None),
            ]))
            .await
            .unwrap_err();
        assert_eq!(
            status(put_in_deleted).message(),
            "etcdserver: duplicate key given in txn request"
        );
        // The two branches of a nested txn may put the same key: only one runs.
        c.txn(
            Txn::new().and_then([TxnOp::txn(
                Txn::new()
                    .when([Compare::version("q", CompareOp::Equal, 0)])
                    .and_then([TxnOp::put("q", "then", None)])
                    .or_else([TxnOp::put("q", "else", None)]),
            )]),
        )
        .await
        .unwrap();
        assert_eq!(c.get("q", None).await.unwrap().kvs()[0].value(), b"then");
        assert!(
            c.get("dup", None).await.unwrap().kvs().is_empty(),
            "nothing was written"
        );

        let ops: Vec<TxnOp> = (0..129)
            .map(|i| TxnOp::put(format!("m{i}"), "", None))
            .collect();
        let err = status(c.txn(Txn::new().and_then(ops)).await.unwrap_err());
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "etcdserver: too many operations in txn request"
        );
        let ops: Vec<TxnOp> = (0..128)
            .map(|i| TxnOp::put(format!("m{i}"), "", None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await.unwrap();
    }

    pub async fn compaction_makes_old_revisions_unreadable(store: &TestStore) {
        let mut c = store.client().await;
        let r1 = c
            .put("c", "1", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        c.put("c", "2", None).await.unwrap();
        let r3 = c
            .put("c", "3", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let resp = c.compact(r3 - 1, None).await.unwrap();
        assert!(resp.header().unwrap().revision() >= r3);
        let err = status(
            c.get("c", Some(GetOptions::new().with_revision(r1)))
                .await
                .unwrap_err(),
        );
        assert_eq!(err.code(), Code::OutOfRange);
        assert_eq!(
            err.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let at = c
            .get("c", Some(GetOptions::new().with_revision(r3 - 1)))
            .await
            .unwrap();
        assert_eq!(
            at.kvs()[0].value(),
            b"2",
            "the compaction revision stays readable"
        );
        let err = status(
            c.get("c", Some(GetOptions::new().with_revision(r3 + 100)))
                .await
                .unwrap_err(),
        );
        assert_eq!(err.code(), Code::OutOfRange);
        assert_eq!(
            err.message(),
            "etcdserver: mvcc: required revision is a future revision"
        );
        let err = status(c.compact(r3 - 1, None).await.unwrap_err());
        assert_eq!(
            err.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        let err = status(c.compact(r3 + 100, None).await.unwrap_err());
        assert_eq!(
            err.message(),
            "etcdserver: mvcc: required revision is a future revision"
        );
    }

    pub async fn watch_replays_history_with_prev_kv_and_filters(store: &TestStore) {
        let mut c = store.client().await;
        let start = c
            .put("w/a", "1", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        c.put("w/b", "1", None).await.unwrap();
        c.put("w/a", "2", None).await.unwrap();
        c.delete("w/b", None).await.unwrap();
        c.put("other", "x", None).await.unwrap();

        let mut w = c
            .watch(
                "w/",
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(start)
                        .with_prev_key(),
                ),
            )
            .await
            .unwrap();
        let created = w.message().await.unwrap().unwrap();
        assert!(created.created());
        assert!(
            created.events().is_empty(),
            "the created reply carries no events"
        );
        let events = collect_events(&mut w, 4).await;
        let summary: Vec<(EventType, String, i64)> = events
            .iter()
            .map(|e| {
                (
                    e.event_type(),
                    s(e.kv().unwrap().key()),
                    e.kv().unwrap().mod_revision(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (EventType::Put, "w/a".into(), start),
                (EventType::Put, "w/b".into(), start + 1),
                (EventType::Put, "w/a".into(), start + 2),
                (EventType::Delete, "w/b".into(), start + 3),
            ]
        );
        assert!(events[0].prev_kv().is_none());
        assert_eq!(events[2].prev_kv().unwrap().value(), b"1");
        assert_eq!(events[3].prev_kv().unwrap().value(), b"1");
        assert_eq!(
            events[3].kv().unwrap().value(),
            b"",
            "a delete carries no value"
        );

        let mut noput = watch_created(
            &mut c,
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start)
                    .with_filters([WatchFilterType::NoPut]),
            ),
        )
        .await;
        let events = collect_events(&mut noput, 1).await;
        assert_eq!(events[0].event_type(), EventType::Delete);
        let mut nodelete = watch_created(
            &mut c,
            "w/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start)
                    .with_filters([WatchFilterType::NoDelete]),
            ),
        )
        .await;
        let events = collect_events(&mut nodelete, 3).await;
        assert!(events.iter().all(|e| e.event_type() == EventType::Put));
        // Live events follow the replay.
        c.put("w/c", "live", None).await.unwrap();
        let events = collect_events(&mut nodelete, 1).await;
        assert_eq!(events[0].kv().unwrap().key(), b"w/c");
    }

    pub async fn watch_compacted_start_is_refused_with_the_compact_revision(store: &TestStore) {
        let mut c = store.client().await;
        let r1 = c
            .put("wc", "1", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let r2 = c
            .put("wc", "2", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        c.put("wc", "3", None).await.unwrap();
        c.compact(r2, None).await.unwrap();
        let mut w = c
            .watch("wc", Some(WatchOptions::new().with_start_revision(r1)))
            .await
            .unwrap();
        let mut saw_created = false;
        loop {
            let resp = tokio::time::timeout(Duration::from_secs(5), w.message())
                .await
                .expect("a reply")
                .unwrap()
                .expect("the stream stays open");
            if resp.created() {
                saw_created = true;
            }
            if resp.compact_revision() != 0 {
                assert!(saw_created, "created comes first");
                assert!(resp.canceled());
                assert_eq!(resp.compact_revision(), r2);
                assert!(resp.events().is_empty());
                break;
            }
        }
        // From the compaction revision itself, the watch works.
        let mut w = watch_created(
            &mut c,
            "wc",
            Some(WatchOptions::new().with_start_revision(r2)),
        )
        .await;
        let events = collect_events(&mut w, 2).await;
        assert_eq!(events[0].kv().unwrap().mod_revision(), r2);
    }

    pub async fn watch_stream_carries_many_watches_and_cancels_one(store: &TestStore) {
        let mut c = store.client().await;
        let mut w = c.watch("m/a", None).await.unwrap();
        let first = w.message().await.unwrap().unwrap();
        assert!(first.created());
        let a_id = first.watch_id();
        w.watch("m/b", Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let second = w.message().await.unwrap().unwrap();
        assert!(second.created());
        let b_id = second.watch_id();
        assert_ne!(a_id, b_id);

        c.put("m/a", "1", None).await.unwrap();
        c.put("m/b/1", "1", None).await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let resp = next_with_events(&mut w).await;
            for e in resp.events() {
                seen.push((resp.watch_id(), s(e.kv().unwrap().key())));
            }
        }
        assert_eq!(
            seen,
            [(a_id, "m/a".to_string()), (b_id, "m/b/1".to_string())]
        );

        w.cancel(a_id).await.unwrap();
        let canceled = tokio::time::timeout(Duration::from_secs(5), w.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(canceled.canceled());
        assert_eq!(canceled.watch_id(), a_id);
        c.put("m/a", "2", None).await.unwrap();
        c.put("m/b/2", "2", None).await.unwrap();
        let resp = next_with_events(&mut w).await;
        assert_eq!(resp.watch_id(), b_id, "the canceled watch hears nothing");
        assert_eq!(resp.events()[0].kv().unwrap().key(), b"m/b/2");
    }

    pub async fn watch_progress_request_and_progress_notify(store: &TestStore) {
        let mut c = store.client().await;
        let rev = c
            .put("pg", "1", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let mut w = watch_created(&mut c, "pg-idle", None).await;
        w.request_progress().await.unwrap();
        let progress = tokio::time::timeout(Duration::from_secs(5), w.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            progress.watch_id(),
            -1,
            "a progress reply is about no single watch"
        );
        assert!(progress.events().is_empty());
        assert_eq!(progress.header().unwrap().revision(), rev);

        let mut n = c
            .watch(
                "pg-notify",
                Some(WatchOptions::new().with_progress_notify()),
            )
            .await
            .unwrap();
        let created = n.message().await.unwrap().unwrap();
        assert!(created.created());
        let later = c
            .put("pg", "2", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let notify = tokio::time::timeout(Duration::from_secs(10), n.message())
            .await
            .expect("a progress notification within the interval")
            .unwrap()
            .unwrap();
        assert_eq!(notify.watch_id(), created.watch_id());
        assert!(notify.events().is_empty() && !notify.canceled() && !notify.created());
        assert!(notify.header().unwrap().revision() >= later);
    }

    pub async fn watch_fragments_a_revision_too_large_for_one_message(store: &TestStore) {
        const KEYS: usize = 300;
        let mut c = store.client().await;
        for i in 0..KEYS {
            c.put(format!("fr/{i:03}"), vec![b'v'; 10 << 10], None)
                .await
                .unwrap();
        }
        let mut watches = Vec::new();
        for fragment in [true, false] {
            let mut options = WatchOptions::new().with_prefix().with_prev_key();
            if fragment {
                options = options.with_fragment();
            }
            let mut w = c
                .watch_client()
                .max_decoding_message_size(64 << 20)
                .watch("fr/", Some(options))
                .await
                .unwrap();
            assert!(w.message().await.unwrap().unwrap().created());
            watches.push((fragment, w));
        }
        // One revision deleting 300 keys whose previous values total 3 MiB.
        let rev = c
            .delete("fr/", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        for (fragment, mut w) in watches {
            let mut parts = Vec::new();
            let mut events = 0;
            while events < KEYS {
                let resp = next_with_events(&mut w).await;
                events += resp.events().len();
                assert!(
                    resp.events()
                        .iter()
                        .all(|e| e.kv().unwrap().mod_revision() == rev)
                );
                parts.push(resp.0.fragment);
            }
            assert_eq!(events, KEYS);
            if fragment {
                assert!(parts.len() >= 2, "split: {parts:?}");
                assert!(!parts[parts.len() - 1], "the last part ends the revision");
                assert!(parts[..parts.len() - 1].iter().all(|f| *f), "{parts:?}");
            } else {
                assert_eq!(parts, [false], "without fragment a revision is one message");
            }
        }
    }

    pub async fn lease_grant_keepalive_ttl_leases_revoke(store: &TestStore) {
        let mut c = store.client().await;
        let grant = c.lease_grant(30, None).await.unwrap();
        assert_eq!(grant.ttl(), 30);
        let id = grant.id();
        assert!(id > 0);
        let chosen = c
            .lease_grant(
                30,
                Some(etcd_client::LeaseGrantOptions::new().with_id(0x7777)),
            )
            .await
            .unwrap();
        assert_eq!(chosen.id(), 0x7777);
        let err = status(
            c.lease_grant(
                30,
                Some(etcd_client::LeaseGrantOptions::new().with_id(0x7777)),
            )
            .await
            .unwrap_err(),
        );
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.message(), "etcdserver: lease already exists");

        c.put("l/1", "a", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
        c.put("l/2", "b", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
        let ttl = c
            .lease_time_to_live(
                id,
                Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
            )
            .await
            .unwrap();
        assert_eq!(ttl.granted_ttl(), 30);
        assert!((28..=30).contains(&ttl.ttl()), "remaining {}", ttl.ttl());
        let mut lease_keys: Vec<String> = ttl.keys().iter().map(|k| s(k)).collect();
        lease_keys.sort();
        assert_eq!(lease_keys, ["l/1", "l/2"]);

        let (mut keeper, mut answers) = c.lease_keep_alive(id).await.unwrap();
        keeper.keep_alive().await.unwrap();
        let answer = answers.message().await.unwrap().unwrap();
        assert_eq!((answer.id(), answer.ttl()), (id, 30));
        // The store answers TTL 0 for an unknown lease, which etcd-client reports as an error.
        match c.lease_keep_alive(0x4242).await {
            Err(etcd_client::Error::LeaseKeepAliveError(m)) => assert_eq!(m, "lease not found"),
            Err(e) => panic!("unknown lease: unexpected error {e:?}"),
            Ok(_) => panic!("unknown lease kept alive"),
        }

        let mut ids: Vec<i64> = c
            .leases()
            .await
            .unwrap()
            .leases()
            .iter()
            .map(|l| l.id())
            .collect();
        ids.sort();
        let mut want = vec![id, 0x7777];
        want.sort();
        assert_eq!(ids, want);

        let before = c
            .get("l/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let rev = before.header().unwrap().revision();
        let revoked = c.lease_revoke(id).await.unwrap();
        assert_eq!(
            revoked.header().unwrap().revision(),
            rev + 1,
            "one revision for its keys"
        );
        let after = c
            .get("l/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert!(after.kvs().is_empty());
        let gone = c.lease_time_to_live(id, None).await.unwrap();
        assert_eq!(gone.ttl(), -1);
        let err = status(c.lease_revoke(id).await.unwrap_err());
        assert_eq!(err.code(), Code::NotFound);
        assert_eq!(err.message(), "etcdserver: requested lease not found");
        let err = status(c.lease_grant(9_000_000_001, None).await.unwrap_err());
        assert_eq!(err.message(), "etcdserver: too large lease TTL");
    }

    pub async fn lease_expiry_deletes_keys_and_watchers_see_it(store: &TestStore) {
        let mut c = store.client().await;
        let grant = c.lease_grant(1, None).await.unwrap();
        assert_eq!(grant.ttl(), 2, "TTLs below the minimum are raised to it");
        let id = grant.id();
        c.put("x/1", "a", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
        c.put("x/2", "b", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
        c.put("x/3", "kept", None).await.unwrap();
        let mut w = watch_created(
            &mut c,
            "x/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await;
        let events = tokio::time::timeout(Duration::from_secs(10), collect_events(&mut w, 2))
            .await
            .expect("the lease expires within 10s");
        let mut deleted: Vec<String> = events
            .iter()
            .map(|e| {
                assert_eq!(e.event_type(), EventType::Delete);
                assert_eq!(e.prev_kv().unwrap().lease(), id);
                s(e.kv().unwrap().key())
            })
            .collect();
        deleted.sort();
        assert_eq!(deleted, ["x/1", "x/2"]);
        assert_eq!(
            events[0].kv().unwrap().mod_revision(),
            events[1].kv().unwrap().mod_revision()
        );
        let left = c
            .get("x/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(keys(left.kvs()), ["x/3"]);
        assert_eq!(c.lease_time_to_live(id, None).await.unwrap().ttl(), -1);
    }

    pub async fn concurrent_writers_and_watchers_see_every_event_in_revision_order(
        store: &TestStore,
    ) {
        const WRITERS: usize = 16;
        const PUTS: usize = 40;
        let mut c = store.client().await;
        let start = c
            .get("cw", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision()
            + 1;
        let live = watch_created(&mut c, "cw/", Some(WatchOptions::new().with_prefix())).await;

        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let mut c = store.client().await;
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..PUTS {
                    let r = c
                        .put(format!("cw/{w:02}"), format!("{i}"), None)
                        .await
                        .unwrap();
                    revs.push(r.header().unwrap().revision());
                }
                revs
            }));
        }
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        acked.sort();
        acked.dedup();
        assert_eq!(
            acked.len(),
            WRITERS * PUTS,
            "every put has its own revision"
        );

        let replay = c
            .watch(
                "cw/",
                Some(WatchOptions::new().with_prefix().with_start_revision(start)),
            )
            .await
            .unwrap();
        for (name, mut w) in [("live", live), ("replay", replay)] {
            if name == "replay" {
                assert!(w.message().await.unwrap().unwrap().created());
            }
            let events = tokio::time::timeout(
                Duration::from_secs(30),
                collect_events(&mut w, WRITERS * PUTS),
            )
            .await
            .expect("all events arrive");
            let revs: Vec<i64> = events
                .iter()
                .map(|e| e.kv().unwrap().mod_revision())
                .collect();
            assert_eq!(revs, acked, "{name}: every event, in revision order");
            // Each writer's own puts arrive in the order it made them.
            let mut last = [-1i64; WRITERS];
            for e in &events {
                let kv = e.kv().unwrap();
                let w: usize = s(&kv.key()[3..]).parse().unwrap();
                let i: i64 = s(kv.value()).parse().unwrap();
                assert_eq!(i, last[w] + 1, "{name}: writer {w} in order");
                assert_eq!(kv.version(), i + 1);
                last[w] = i;
            }
        }
    }

    pub async fn client_watch_resumes_after_its_connection_is_cut(store: &TestStore) {
        let proxy = Proxy::start(&store.endpoint).await;
        let through = StoreClient::connect(&Endpoints::parse(&proxy.endpoint).unwrap())
            .await
            .unwrap();
        let direct = StoreClient::connect(&Endpoints::parse(&store.endpoint).unwrap())
            .await
            .unwrap();
        let (_, rev) = direct.get_prefix("rs/").await.unwrap();
        let mut events = through.watch_prefix("rs/", rev + 1);
        for i in 0..10 {
            direct.put(format!("rs/{i:02}"), "before").await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < 10 {
            got.push(next_event(&mut events).await);
        }
        proxy.cut();
        for i in 10..20 {
            direct.put(format!("rs/{i:02}"), "during").await.unwrap();
        }
        direct.delete("rs/00").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.restore();
        while got.len() < 21 {
            got.push(next_event(&mut events).await);
        }
        let revs: Vec<i64> = got.iter().map(|e| e.revision).collect();
        let mut sorted = revs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(revs, sorted, "no event twice, none out of order");
        assert_eq!(revs.len(), 21);
        assert_eq!(revs[20] - revs[0], 20, "no event lost");
        assert_eq!(got[20].kind, EventKind::Delete);
        assert!(proxy.connections() >= 2, "the client really reconnected");
        // Nothing more arrives.
        let extra = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
        assert!(extra.is_err(), "unexpected event {extra:?}");
    }

    pub async fn client_helpers_and_keep_alive(store: &TestStore) {
        use arbor::store::client::{Compare, CompareOp, Txn, TxnOp};
        let c = StoreClient::connect(&Endpoints::parse(&store.endpoint).unwrap())
            .await
            .unwrap();
        let r1 = c.put("ch/a", "1").await.unwrap();
        c.put("ch/b", "2").await.unwrap();
        assert_eq!(c.get("ch/a").await.unwrap().unwrap().value(), b"1");
        assert!(c.get("ch/none").await.unwrap().is_none());
        let (kvs, rev) = c.get_prefix("ch/").await.unwrap();
        assert_eq!(keys(&kvs), ["ch/a", "ch/b"]);
        assert_eq!(rev, r1 + 1);
        let txn = Txn::new()
            .when([Compare::mod_revision("ch/a", CompareOp::Equal, r1)])
            .and_then([TxnOp::put("ch/c", "3", None)]);
        assert!(c.txn(txn).await.unwrap().succeeded());
        assert_eq!(c.delete("ch/a").await.unwrap(), 1);
        assert_eq!(c.delete_prefix("ch/").await.unwrap(), 2);

        // A kept-alive lease outlives its TTL; once the handle is dropped it expires.
        let lease = c.lease_grant(2).await.unwrap();
        c.put_leased("ch/leased", "x", lease).await.unwrap();
        let keeper = c.keep_alive(lease, 2);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(keeper.is_alive());
        assert!(
            c.get("ch/leased").await.unwrap().is_some(),
            "kept alive past its TTL"
        );
        drop(keeper);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while c.get("ch/leased").await.unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the lease never expired"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Keeping a revoked lease alive stops by itself.
        let lease = c.lease_grant(30).await.unwrap();
        c.lease_revoke(lease).await.unwrap();
        let keeper = c.keep_alive(lease, 3);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!keeper.is_alive(), "renewing a lease that is gone stops");
    }

    pub async fn oversized_requests_get_a_clear_error(store: &TestStore) {
        let mut c = store.client().await;
        let limit = arbor::store::MAX_REQUEST_BYTES;
        assert_eq!(limit, 1_572_864, "etcd's default --max-request-bytes");
        c.put("big-ok", vec![b'x'; limit - 1024], None)
            .await
            .unwrap();
        let err = status(
            c.put("big", vec![b'x'; limit + 1024], None)
                .await
                .unwrap_err(),
        );
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "etcdserver: request is too large");
        let txn = Txn::new().and_then([TxnOp::put("big", vec![b'x'; limit + 1024], None)]);
        let err = status(c.txn(txn).await.unwrap_err());
        assert_eq!(err.message(), "etcdserver: request is too large");
        // Past the gRPC limit (request limit + 512 KiB) gRPC itself refuses the message. etcd
        // (grpc-go) says ResourceExhausted, tonic OutOfRange; both name the size.
        let err = status(c.put("huge", vec![b'x'; 3 << 20], None).await.unwrap_err());
        assert!(
            matches!(err.code(), Code::ResourceExhausted | Code::OutOfRange),
            "{err:?}"
        );
        assert!(
            err.message().contains("larger") || err.message().contains("too large"),
            "{err:?}"
        );
        assert!(c.get("big", None).await.unwrap().kvs().is_empty());
        // The store still works.
        c.put("after", "ok", None).await.unwrap();
    }

    pub async fn malformed_requests_get_an_error_and_the_store_goes_on(store: &TestStore) {
        /// A PutRequest whose key (field 1, bytes) is sent as a varint.
        #[derive(Clone, PartialEq, prost::Message)]
        struct BadPut {
            #[prost(uint64, tag = "1")]
            key: u64,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct Empty {}
        let channel = tonic::transport::Endpoint::from_shared(store.endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<BadPut, Empty, _>(
                tonic::Request::new(BadPut { key: 7 }),
                "/etcdserverpb.KV/Put".parse().unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        // grpc-go and tonic both answer Internal, naming the decoding failure.
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert!(
            err.message().contains("unmarshal") || err.message().contains("decode"),
            "{err:?}"
        );
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<Empty, Empty, _>(
                tonic::Request::new(Empty {}),
                "/etcdserverpb.KV/NoSuchMethod".parse().unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
        let mut c = store.client().await;
        c.put("still", "fine", None).await.unwrap();
        assert_eq!(
            c.get("still", None).await.unwrap().kvs()[0].value(),
            b"fine"
        );
    }

    pub async fn status_and_member_list_describe_one_leader(store: &TestStore) {
        let mut c = store.client().await;
        c.put("st", "1", None).await.unwrap();
        let st = c.status().await.unwrap();
        let member = st.header().unwrap().member_id();
        assert_eq!(st.leader(), member);
        assert!(st.version().starts_with("3."), "{}", st.version());
        assert!(st.raft_index() > 0);
        assert_ne!(st.raft_term(), 0);
        let list = c.member_list().await.unwrap();
        assert_eq!(list.members().len(), 1);
        let m = &list.members()[0];
        assert_eq!(m.id(), member);
        assert_eq!(m.client_urls(), std::slice::from_ref(&store.endpoint));
        assert!(!m.is_learner());
    }

    /// Reads events until `n` have arrived (failing after 20s).
    /// Opens a watch and checks that its first response says it was created.
    async fn watch_created(
        c: &mut etcd_client::Client,
        key: &str,
        options: Option<WatchOptions>,
    ) -> etcd_client::WatchStream {
        let mut w = c.watch(key, options).await.unwrap();
        assert!(w.message().await.unwrap().unwrap().created());
        w
    }

    async fn collect_events(w: &mut etcd_client::WatchStream, n: usize) -> Vec<etcd_client::Event> {
        let mut out = Vec::new();
        while out.len() < n {
            let resp = next_with_events(w).await;
            out.extend(resp.events().iter().cloned());
        }
        assert_eq!(out.len(), n, "exactly {n} events");
        out
    }

    async fn next_with_events(w: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
        loop {
            let resp = tokio::time::timeout(Duration::from_secs(20), w.message())
                .await
                .expect("watch reply within 20s")
                .expect("watch stream ok")
                .expect("watch stream open");
            assert!(
                !resp.canceled(),
                "watch canceled: {:?}",
                resp.cancel_reason()
            );
            if !resp.events().is_empty() {
                return resp;
            }
        }
    }

    async fn next_event(
        events: &mut (
                 impl tokio_stream::Stream<
            Item = Result<arbor::store::client::StoreEvent, arbor::store::client::WatchLost>,
        > + Unpin
             ),
    ) -> arbor::store::client::StoreEvent {
        tokio::time::timeout(Duration::from_secs(20), events.next())
            .await
            .expect("an event within 20s")
            .expect("the watch goes on")
            .expect("no history lost")
    }

    /// A TCP proxy in front of the store whose connections the test can cut.
    struct Proxy {
        endpoint: String,
        state: std::sync::Arc<ProxyState>,
        _task: tokio::task::JoinHandle<()>,
    }

    struct ProxyState {
        /// Bumped on every cut; a connection from an older epoch closes.
        epoch: tokio::sync::watch::Sender<u64>,
        refusing: std::sync::atomic::AtomicBool,
        accepted: std::sync::atomic::AtomicUsize,
    }

    impl Proxy {
        async fn start(upstream: &str) -> Proxy {
            use std::sync::atomic::Ordering;
            let upstream = upstream.trim_start_matches("http://").to_string();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            let state = std::sync::Arc::new(ProxyState {
                epoch: tokio::sync::watch::Sender::new(0),
                refusing: false.into(),
                accepted: 0.into(),
            });
            let st = state.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut down, _)) = listener.accept().await else {
                        return;
                    };
                    if st.refusing.load(Ordering::SeqCst) {
                        drop(down);
                        continue;
                    }
                    st.accepted.fetch_add(1, Ordering::SeqCst);
                    let upstream = upstream.clone();
                    let mut epoch = st.epoch.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = epoch.changed() => {}
                        }
                    });
                }
            });
            Proxy {
                endpoint,
                state,
                _task: task,
            }
        }

        /// Drops every open connection and refuses new ones.
        fn cut(&self) {
            use std::sync::atomic::Ordering;
            self.state.refusing.store(true, Ordering::SeqCst);
            self.state.epoch.send_modify(|e| *e += 1);
        }

        fn restore(&self) {
            self.state
                .refusing
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }

        fn connections(&self) -> usize {
            self.state
                .accepted
                .load(std::sync::atomic::Ordering::SeqCst)
        }
    }
}

/// etcd 3.4 refuses a watch made with a token that has expired (`invalid auth token` in a
/// canceled response, not an error of the call), so nothing makes etcd-client authenticate
/// again: the client's watch must, or it stays refused for good. That is what a host's watch
/// meets after its tunnel fails over to a member where its token has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_watch_made_with_an_expired_token_authenticates_again() {
    use arbor::store::client::{Endpoints, EventKind, StoreClient};
    use tokio_stream::StreamExt;
    let store = support::etcd_with(&["--auth-token-ttl=1"]).await;
    let mut admin = store.client().await;
    admin.user_add("root", "root-secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let endpoints = Endpoints::parse(&store.endpoint).unwrap();
    let writer = StoreClient::connect_as(&endpoints, Some(("root", "root-secret")))
        .await
        .unwrap();
    let watcher = StoreClient::connect_as(&endpoints, Some(("root", "root-secret")))
        .await
        .unwrap();
    // The watcher's token expires unused.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, rev) = writer.get_prefix("tok/").await.unwrap();
    let mut events = watcher.watch_prefix("tok/", rev + 1);
    writer.put("tok/a", "1").await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("no event within 10 s: the watch stayed refused")
        .expect("the watch ended")
        .expect("the watch was lost");
    assert_eq!((event.kind, event.key), (EventKind::Put, b"tok/a".to_vec()));
}
