//! The operational surface, in the conformance suite: snapshots, defragmentation, alarms and the
//! space quota, and HTTP on the client port (`/health`, `/version`, `/metrics`, the JSON
//! gateway), each check run against the embedded store and a real etcd 3.4 with the same
//! assertions. Where arbor deliberately differs (the snapshot's format), the check asserts the
//! difference, and docs/store.md states it.

use crate::support::http_client::{get, next_json, post, post_stream, request};
use crate::support::{TestStore, status};
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, Compare, CompareOp, Txn, TxnOp};
use serde_json::{Value, json};
use std::time::Duration;
use tonic::Code;

/// Runs each named check against an embedded store and a real etcd, each made by the given
/// expressions.
macro_rules! both {
    ($embedded:expr, $etcd:expr; $($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = $embedded;
                    crate::ops::checks::$name(&store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let store = $etcd;
                    crate::ops::checks::$name(&store).await;
                }
            )*
        }
    };
}

both!(
    crate::support::embedded().await,
    crate::support::etcd().await;
    snapshot_streams_the_whole_store_ending_in_its_sha256,
    defragment_answers_and_the_store_goes_on,
    an_alarm_caps_writes_until_it_is_disarmed,
    health_version_and_metrics_over_http,
    json_gateway_kv,
    json_gateway_lease_maintenance_and_cluster,
    json_gateway_watch_streams_events,
);

/// The space quota in the quota checks: small, so a few dozen 4 KiB values reach it.
const QUOTA: u64 = 256 << 10;

mod quota {
    both!(
        crate::support::embedded_with_quota(crate::ops::QUOTA).await,
        crate::support::etcd_with_quota(crate::ops::QUOTA).await;
        the_quota_raises_nospace_and_freeing_space_lets_writes_back,
    );
}

pub mod checks {
    use super::*;

    fn s(v: &Value) -> String {
        v.as_str().map(str::to_string).unwrap_or_default()
    }

    fn n(v: &Value) -> i64 {
        s(v).parse()
            .unwrap_or_else(|_| panic!("not a 64-bit integer in a string: {v}"))
    }

    fn u(v: &Value) -> u64 {
        s(v).parse()
            .unwrap_or_else(|_| panic!("not a 64-bit unsigned integer in a string: {v}"))
    }

    fn b64(s: &str) -> String {
        data_encoding::BASE64.encode(s.as_bytes())
    }

    fn keys_of(v: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"))
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        keys
    }

    /// A full header: every field a string of digits, as the gateway writes 64-bit integers.
    fn check_header(h: &Value, revision: i64) {
        assert_eq!(
            keys_of(h),
            ["cluster_id", "member_id", "raft_term", "revision"],
            "{h}"
        );
        for field in ["cluster_id", "member_id", "raft_term"] {
            assert!(u(&h[field]) != 0, "{h}");
        }
        assert_eq!(n(&h["revision"]), revision, "{h}");
    }

    pub async fn snapshot_streams_the_whole_store_ending_in_its_sha256(store: &TestStore) {
        use sha2::Digest;
        let mut c = store.client().await;
        for i in 0..200 {
            c.put(format!("snap/{i:03}"), format!("value {i}"), None)
                .await
                .unwrap();
        }
        let mut stream = c.snapshot().await.unwrap();
        let mut file = Vec::new();
        let mut remaining = None;
        while let Some(resp) = stream.message().await.unwrap() {
            file.extend_from_slice(resp.blob());
            remaining = Some(resp.remaining_bytes());
        }
        assert_eq!(remaining, Some(0), "the last message says nothing remains");
        // etcdctl 3.4 refuses a snapshot whose size is not so (it expects pages and a sha256).
        assert_eq!(file.len() % 512, 32, "{} bytes", file.len());
        let (content, sha) = file.split_at(file.len() - 32);
        assert_eq!(sha2::Sha256::digest(content).as_slice(), sha);
        // The deliberate difference (docs/store.md): etcd sends its bbolt database, arbor its
        // own format, which etcd cannot read and arbor restores.
        if store.is_etcd() {
            assert_eq!(
                content[16..20],
                0xED0C_DAEDu32.to_le_bytes(),
                "bbolt's magic"
            );
        } else {
            assert!(content.starts_with(b"ARBSNAP2"));
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("snap");
            std::fs::write(&path, &file).unwrap();
            let restored = arbor::store::restore(&path, &dir.path().join("data")).unwrap();
            assert_eq!(restored.keys, 200);
        }
    }

    pub async fn defragment_answers_and_the_store_goes_on(store: &TestStore) {
        let mut c = store.client().await;
        for i in 0..50 {
            c.put(format!("d/{i}"), "x".repeat(1000), None)
                .await
                .unwrap();
        }
        c.delete("d/", Some(etcd_client::DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
        let before = c.status().await.unwrap();
        assert!(before.db_size() >= before.raft_used_db_size());
        assert!(before.raft_used_db_size() > 0);
        c.defragment().await.unwrap();
        c.put("after", "defrag", None).await.unwrap();
        assert_eq!(
            c.get("after", None).await.unwrap().kvs()[0].value(),
            b"defrag"
        );
    }

    async fn member_id(c: &mut etcd_client::Client) -> u64 {
        c.status().await.unwrap().header().unwrap().member_id()
    }

    fn no_space(e: etcd_client::Error) {
        let e = status(e);
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert_eq!(e.message(), "etcdserver: mvcc: database space exceeded");
    }

    async fn alarms(c: &mut etcd_client::Client) -> Vec<(u64, AlarmType)> {
        c.alarm(AlarmAction::Get, AlarmType::None, None)
            .await
            .unwrap()
            .alarms()
            .iter()
            .map(|a| (a.member_id(), a.alarm()))
            .collect()
    }

    async fn disarm(c: &mut etcd_client::Client, member: u64) -> Vec<(u64, AlarmType)> {
        let mut only = AlarmOptions::new();
        only.with_member(member);
        c.alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(only))
            .await
            .unwrap()
            .alarms()
            .iter()
            .map(|a| (a.member_id(), a.alarm()))
            .collect()
    }

    /// What a NOSPACE alarm allows and refuses, as etcd's capped applier does.
    async fn check_capped(store: &TestStore, c: &mut etcd_client::Client, member: u64) {
        assert_eq!(alarms(c).await, [(member, AlarmType::Nospace)]);
        no_space(c.put("cap/new", "v", None).await.unwrap_err());
        no_space(
            c.txn(Txn::new().and_then([TxnOp::put("cap/txn", "v", None)]))
                .await
                .unwrap_err(),
        );
        no_space(c.lease_grant(60, None).await.unwrap_err());
        // Reads, deletes, compaction and txns that write no value go on.
        assert_eq!(c.get("cap/keep", None).await.unwrap().kvs().len(), 1);
        let txn = Txn::new()
            .when([Compare::version("cap/keep", CompareOp::Greater, 0)])
            .and_then([
                TxnOp::get("cap/keep", None),
                TxnOp::delete("cap/gone", None),
            ]);
        assert!(c.txn(txn).await.unwrap().succeeded());
        let del = c.delete("cap/del", None).await.unwrap();
        assert_eq!(del.deleted(), 1);
        let rev = del.header().unwrap().revision();
        c.compact(rev, None).await.unwrap();
        let st = c.status().await.unwrap();
        assert!(
            st.errors().iter().any(|e| e.contains("alarm:NOSPACE")),
            "{:?}",
            st.errors()
        );
        let health = get(&store.endpoint, "/health").await;
        assert_eq!(health.status, 503);
        assert_eq!(health.json(), json!({"health": "false"}));
    }

    pub async fn an_alarm_caps_writes_until_it_is_disarmed(store: &TestStore) {
        let mut c = store.client().await;
        let member = member_id(&mut c).await;
        c.put("cap/keep", "1", None).await.unwrap();
        c.put("cap/del", "1", None).await.unwrap();
        let lease = c.lease_grant(60, None).await.unwrap().id();
        assert!(alarms(&mut c).await.is_empty());
        let mut on = AlarmOptions::new();
        on.with_member(member);
        let raised = c
            .alarm(AlarmAction::Activate, AlarmType::Nospace, Some(on))
            .await
            .unwrap();
        assert_eq!(raised.alarms().len(), 1);
        check_capped(store, &mut c, member).await;
        c.lease_revoke(lease).await.unwrap();

        assert_eq!(disarm(&mut c, member).await, [(member, AlarmType::Nospace)]);
        assert!(alarms(&mut c).await.is_empty());
        assert!(
            disarm(&mut c, member).await.is_empty(),
            "nothing left to disarm"
        );
        c.put("cap/new", "v", None).await.unwrap();
        c.lease_grant(60, None).await.unwrap();
        let health = get(&store.endpoint, "/health").await;
        assert_eq!(
            (health.status, health.json()),
            (200, json!({"health": "true"}))
        );
    }

    pub async fn the_quota_raises_nospace_and_freeing_space_lets_writes_back(store: &TestStore) {
        let mut c = store.client().await;
        let member = member_id(&mut c).await;
        c.put("cap/keep", "1", None).await.unwrap();
        c.put("cap/del", "1", None).await.unwrap();
        let value = "q".repeat(4096);
        let mut written = 0;
        let refused = loop {
            assert!(written < 1000, "a {QUOTA}-byte quota never refused a write");
            match c
                .put(format!("fill/{written:04}"), value.clone(), None)
                .await
            {
                Ok(_) => written += 1,
                Err(e) => break e,
            }
        };
        assert!(written > 10, "only {written} values fit");
        no_space(refused);
        check_capped(store, &mut c, member).await;
        assert_eq!(
            c.get("fill/0000", None).await.unwrap().kvs()[0].value(),
            value.as_bytes()
        );

        // The runbook: free space, compact, defragment, disarm.
        let del = c
            .delete(
                "fill/",
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        // Every acknowledged put is there, and the refused one is not. Once, in a loaded full
        // run, etcd's count differed from the puts it acknowledged (not seen again in 15 runs,
        // and that failure kept no figures): etcd is allowed one either way, the embedded
        // store none.
        if store.is_etcd() {
            assert!(
                (written - 1..=written + 1).contains(&del.deleted()),
                "{} deleted, {written} written",
                del.deleted()
            );
        } else {
            assert_eq!(del.deleted(), written);
        }
        c.compact(del.header().unwrap().revision(), None)
            .await
            .unwrap();
        c.defragment().await.unwrap();
        no_space(c.put("still", "refused", None).await.unwrap_err());
        assert_eq!(disarm(&mut c, member).await, [(member, AlarmType::Nospace)]);
        c.put("fill/again", value.clone(), None).await.unwrap();
        assert!(alarms(&mut c).await.is_empty());
    }

    pub async fn health_version_and_metrics_over_http(store: &TestStore) {
        let e = &store.endpoint;
        let mut c = store.client().await;
        c.put("m/k", "v", None).await.unwrap();
        c.get("m/k", None).await.unwrap();
        c.lease_grant(60, None).await.unwrap();
        let mut watch = c.watch("m/", None).await.unwrap();
        assert!(watch.message().await.unwrap().unwrap().created());

        let health = get(e, "/health").await;
        assert_eq!(health.status, 200);
        assert_eq!(health.json(), json!({"health": "true"}));
        assert_eq!(request(e, "POST", "/health", "").await.status, 405);

        let version = get(e, "/version").await;
        assert_eq!(version.status, 200);
        let v = version.json();
        assert_eq!(keys_of(&v), ["etcdcluster", "etcdserver"]);
        assert!(s(&v["etcdcluster"]).starts_with("3.4"), "{v}");
        assert!(s(&v["etcdserver"]).starts_with("3.4"), "{v}");

        let metrics = get(e, "/metrics").await;
        assert_eq!(metrics.status, 200);
        assert!(
            metrics
                .header("content-type")
                .starts_with("text/plain; version=0.0.4"),
            "{:?}",
            metrics.headers
        );
        let value = |name: &str| -> f64 {
            metrics
                .body
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("no {name} in /metrics"))
                .parse()
                .unwrap_or_else(|_| panic!("{name} is not a number"))
        };
        assert_eq!(value("etcd_server_has_leader"), 1.0);
        assert_eq!(value("etcd_server_is_leader"), 1.0);
        assert_eq!(
            value("etcd_server_quota_backend_bytes"),
            (2u64 << 30) as f64
        );
        assert!(value("etcd_mvcc_db_total_size_in_bytes") > 0.0);
        assert!(
            value("etcd_mvcc_db_total_size_in_bytes")
                >= value("etcd_mvcc_db_total_size_in_use_in_bytes")
        );
        assert!(value("etcd_debugging_mvcc_keys_total") >= 1.0);
        assert!(value("etcd_debugging_mvcc_watcher_total") >= 1.0);
        assert!(value("etcd_debugging_mvcc_watch_stream_total") >= 1.0);
        assert!(value("etcd_debugging_lease_granted_total") >= 1.0);
        assert!(value("etcd_disk_wal_fsync_duration_seconds_count") >= 0.0);
        assert!(value("process_resident_memory_bytes") > 0.0);
        let kv = |method: &str| {
            format!("grpc_method=\"{method}\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"")
        };
        assert!(value(&format!("grpc_server_started_total{{{}}}", kv("Put"))) >= 1.0);
        assert!(
            value(&format!(
                "grpc_server_handled_total{{grpc_code=\"OK\",{}}}",
                kv("Range")
            )) >= 1.0
        );
        drop(watch);
    }

    pub async fn json_gateway_kv(store: &TestStore) {
        let e = &store.endpoint;
        let put = post(
            e,
            "/v3/kv/put",
            &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("foo"), b64("bar")),
        )
        .await;
        assert_eq!(put.status, 200, "{}", put.body);
        assert!(put.header("content-type").starts_with("application/json"));
        let put = put.json();
        assert_eq!(keys_of(&put), ["header"]);
        let rev1 = n(&put["header"]["revision"]);
        check_header(&put["header"], rev1);

        let put = post(
            e,
            "/v3/kv/put",
            &format!(
                r#"{{"key":"{}","value":"{}","prev_kv":true}}"#,
                b64("foo"),
                b64("baz")
            ),
        )
        .await
        .json();
        let rev2 = rev1 + 1;
        check_header(&put["header"], rev2);
        let prev = json!({"key": b64("foo"), "create_revision": rev1.to_string(),
            "mod_revision": rev1.to_string(), "version": "1", "value": b64("bar")});
        assert_eq!(put["prev_kv"], prev);

        let foo_kv = json!({"key": b64("foo"), "create_revision": rev1.to_string(),
            "mod_revision": rev2.to_string(), "version": "2", "value": b64("baz")});
        let range = post(e, "/v3/kv/range", &format!(r#"{{"key":"{}"}}"#, b64("foo")))
            .await
            .json();
        assert_eq!(
            keys_of(&range),
            ["count", "header", "kvs"],
            "no \"more\" when false: {range}"
        );
        check_header(&range["header"], rev2);
        assert_eq!(range["kvs"], json!([foo_kv]));
        assert_eq!(range["count"], "1");
        // jsonpb's camelCase names are read too; unknown fields are ignored.
        let count = post(
            e,
            "/v3/kv/range",
            &format!(r#"{{"key":"{}","countOnly":true,"nope":1}}"#, b64("foo")),
        )
        .await
        .json();
        assert_eq!(keys_of(&count), ["count", "header"]);
        post(
            e,
            "/v3/kv/put",
            &format!(r#"{{"key":"{}","value":"{}"}}"#, b64("fop"), b64("x")),
        )
        .await;
        let limited = post(e, "/v3/kv/range", &format!(r#"{{"key":"{}","range_end":"{}","keys_only":true,"limit":"1","sort_order":"ASCEND","sort_target":"KEY"}}"#, b64("fo"), b64("fp"))).await.json();
        assert_eq!(limited["kvs"][0]["key"], b64("foo"));
        assert!(
            limited["kvs"][0].get("value").is_none(),
            "keys_only: {limited}"
        );
        assert_eq!(
            (&limited["more"], &limited["count"]),
            (&json!(true), &json!("2"))
        );
        let rev3 = rev2 + 1;

        // Errors: etcd's message and gRPC code, the HTTP status grpc-gateway maps it to.
        let error =
            |reply: &crate::support::http_client::Reply, status: u16, code: i64, message: &str| {
                assert_eq!(reply.status, status, "{}", reply.body);
                let v = reply.json();
                assert_eq!(v["code"], code, "{v}");
                if !message.is_empty() {
                    assert_eq!(
                        (s(&v["error"]), s(&v["message"])),
                        (message.to_string(), message.to_string())
                    );
                }
            };
        error(
            &post(e, "/v3/kv/range", r#"{"key":""}"#).await,
            400,
            3,
            "etcdserver: key is not provided",
        );
        error(
            &post(e, "/v3/kv/range", "").await,
            400,
            3,
            "etcdserver: key is not provided",
        );
        error(
            &post(
                e,
                "/v3/kv/range",
                &format!(r#"{{"key":"{}","revision":1000000}}"#, b64("foo")),
            )
            .await,
            400,
            11,
            "etcdserver: mvcc: required revision is a future revision",
        );
        // Malformed JSON and bad base64: the message is Go's in etcd, serde's here.
        error(&post(e, "/v3/kv/range", "{bad").await, 400, 3, "");
        error(
            &post(e, "/v3/kv/range", r#"{"key":"not base64!"}"#).await,
            400,
            3,
            "",
        );

        // A txn: only the outer header names the cluster; each response has just its revision.
        let txn = json!({
            "compare": [{"result": "EQUAL", "target": "VALUE", "key": b64("foo"), "value": b64("baz")}],
            "success": [{"request_put": {"key": b64("foo"), "value": b64("qux")}}, {"request_range": {"key": b64("foo")}}],
            "failure": [{"request_delete_range": {"key": b64("foo")}}],
        });
        let done = post(e, "/v3/kv/txn", &txn.to_string()).await.json();
        let rev4 = rev3 + 1;
        check_header(&done["header"], rev4);
        assert_eq!(done["succeeded"], true);
        let qux = json!({"key": b64("foo"), "create_revision": rev1.to_string(),
            "mod_revision": rev4.to_string(), "version": "3", "value": b64("qux")});
        assert_eq!(
            done["responses"],
            json!([
                {"response_put": {"header": {"revision": rev4.to_string()}}},
                {"response_range": {"header": {"revision": rev4.to_string()}, "kvs": [qux], "count": "1"}},
            ])
        );
        let txn = json!({
            "compare": [{"result": "GREATER", "target": "MOD", "key": b64("foo"), "mod_revision": "1000"}],
            "failure": [{"request_range": {"key": b64("foo"), "count_only": true}}],
        });
        let failed = post(e, "/v3/kv/txn", &txn.to_string()).await.json();
        assert!(
            failed.get("succeeded").is_none(),
            "false is left out: {failed}"
        );
        assert_eq!(
            failed["responses"],
            json!([{"response_range": {"header": {"revision": rev4.to_string()}, "count": "1"}}])
        );

        let del = post(
            e,
            "/v3/kv/deleterange",
            &format!(r#"{{"key":"{}","prev_kv":true}}"#, b64("foo")),
        )
        .await
        .json();
        let rev5 = rev4 + 1;
        check_header(&del["header"], rev5);
        assert_eq!(del["deleted"], "1");
        assert_eq!(del["prev_kvs"], json!([qux]));
        let none = post(
            e,
            "/v3/kv/deleterange",
            &format!(r#"{{"key":"{}"}}"#, b64("foo")),
        )
        .await
        .json();
        assert_eq!(keys_of(&none), ["header"]);

        let compacted = post(
            e,
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{rev2}"}}"#),
        )
        .await;
        assert_eq!(compacted.status, 200, "{}", compacted.body);
        check_header(&compacted.json()["header"], rev5);
        error(
            &post(e, "/v3/kv/compaction", &format!(r#"{{"revision":{rev2}}}"#)).await,
            400,
            11,
            "etcdserver: mvcc: required revision has been compacted",
        );

        assert_eq!(request(e, "GET", "/v3/kv/range", "").await.status, 405);
        assert_eq!(post(e, "/v3/kv/nothing", "{}").await.status, 404);
    }

    pub async fn json_gateway_lease_maintenance_and_cluster(store: &TestStore) {
        let e = &store.endpoint;
        let grant = post(e, "/v3/lease/grant", r#"{"TTL":30,"ID":1234}"#)
            .await
            .json();
        assert_eq!(
            (&grant["ID"], &grant["TTL"]),
            (&json!("1234"), &json!("30"))
        );
        let rev = n(&grant["header"]["revision"]);
        check_header(&grant["header"], rev);
        post(
            e,
            "/v3/kv/put",
            &format!(
                r#"{{"key":"{}","value":"{}","lease":"1234"}}"#,
                b64("leased"),
                b64("x")
            ),
        )
        .await;

        let ttl = post(e, "/v3/lease/timetolive", r#"{"ID":"1234","keys":true}"#)
            .await
            .json();
        assert_eq!(keys_of(&ttl), ["ID", "TTL", "grantedTTL", "header", "keys"]);
        assert!((28..=30).contains(&n(&ttl["TTL"])), "{ttl}");
        assert_eq!(
            (&ttl["grantedTTL"], &ttl["keys"]),
            (&json!("30"), &json!([b64("leased")]))
        );
        let missing = post(e, "/v3/kv/lease/timetolive", r#"{"ID":99}"#)
            .await
            .json();
        assert_eq!(
            (&missing["ID"], &missing["TTL"]),
            (&json!("99"), &json!("-1"))
        );
        assert_eq!(keys_of(&missing), ["ID", "TTL", "header"]);
        let leases = post(e, "/v3/lease/leases", "{}").await.json();
        assert_eq!(leases["leases"], json!([{"ID": "1234"}]));

        // Keep-alive streams one answer per request, then ends with the requests.
        let (status, mut lines) = post_stream(e, "/v3/lease/keepalive", r#"{"ID":1234}"#).await;
        assert_eq!(status, 200);
        let kept = next_json(&mut lines).await;
        assert_eq!(keys_of(&kept), ["result"]);
        assert_eq!(
            (&kept["result"]["ID"], &kept["result"]["TTL"]),
            (&json!("1234"), &json!("30"))
        );
        let end = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .expect("the stream ends");
        assert_eq!(end, None);

        let revoked = post(e, "/v3/lease/revoke", r#"{"ID":1234}"#).await.json();
        check_header(&revoked["header"], n(&revoked["header"]["revision"]));
        assert_eq!(keys_of(&revoked), ["header"]);
        let again = post(e, "/v3/lease/revoke", r#"{"ID":1234}"#).await;
        assert_eq!(again.status, 404);
        assert_eq!(
            again.json(),
            json!({"error": "etcdserver: requested lease not found",
            "message": "etcdserver: requested lease not found", "code": 5})
        );

        let status = post(e, "/v3/maintenance/status", "{}").await.json();
        assert_eq!(
            keys_of(&status),
            [
                "dbSize",
                "dbSizeInUse",
                "header",
                "leader",
                "raftAppliedIndex",
                "raftIndex",
                "raftTerm",
                "version"
            ]
        );
        assert_eq!(status["leader"], status["header"]["member_id"]);
        assert!(n(&status["dbSize"]) >= n(&status["dbSizeInUse"]));
        assert_eq!(
            post(e, "/v3/maintenance/alarm", "{}").await.json(),
            json!({})
        );
        assert_eq!(
            post(e, "/v3/maintenance/alarm", r#"{"action":"GET"}"#)
                .await
                .json(),
            json!({})
        );

        // A snapshot streams as base64 blobs, each in its own result line.
        let (code, mut lines) = post_stream(e, "/v3/maintenance/snapshot", "{}").await;
        assert_eq!(code, 200);
        let mut file = Vec::new();
        // Until the stream ends: etcd sends its sha256 after a message saying 0 bytes remain.
        while let Some(line) = tokio::time::timeout(Duration::from_secs(20), lines.recv())
            .await
            .expect("the snapshot within 20s")
        {
            let line: Value = serde_json::from_str(&line).unwrap();
            let blob = data_encoding::BASE64
                .decode(s(&line["result"]["blob"]).as_bytes())
                .unwrap_or_else(|e| panic!("{e}: {line}"));
            file.extend_from_slice(&blob);
        }
        assert_eq!(file.len() % 512, 32);

        let members = post(e, "/v3/cluster/member/list", "{}").await.json();
        assert_eq!(members["members"][0]["ID"], status["header"]["member_id"]);
        assert_eq!(members["members"][0]["clientURLs"], json!([store.endpoint]));
    }

    pub async fn json_gateway_watch_streams_events(store: &TestStore) {
        let e = &store.endpoint;
        let mut c = store.client().await;
        let create = json!({"create_request": {"key": b64("w"), "prev_kv": true}});
        let (status, mut lines) = post_stream(e, "/v3/watch", &create.to_string()).await;
        assert_eq!(status, 200);
        let created = next_json(&mut lines).await;
        assert_eq!(
            keys_of(&created["result"]),
            ["created", "header"],
            "{created}"
        );
        let r1 = c
            .put("w", "1", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let r2 = c
            .put("w", "2", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let r3 = c
            .delete("w", None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
        let v1 = json!({"key": b64("w"), "create_revision": r1.to_string(), "mod_revision": r1.to_string(), "version": "1", "value": b64("1")});
        let v2 = json!({"key": b64("w"), "create_revision": r1.to_string(), "mod_revision": r2.to_string(), "version": "2", "value": b64("2")});
        let mut events = Vec::new();
        while events.len() < 3 {
            let line = next_json(&mut lines).await;
            let result = &line["result"];
            check_header(&result["header"], n(&result["header"]["revision"]));
            events.extend(
                result["events"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{line}"))
                    .iter()
                    .cloned(),
            );
        }
        assert_eq!(
            events,
            [
                json!({"kv": v1.clone()}),
                json!({"kv": v2.clone(), "prev_kv": v1.clone()}),
                json!({"type": "DELETE", "kv": {"key": b64("w"), "mod_revision": r3.to_string()}, "prev_kv": v2}),
            ]
        );
        drop(lines);

        // History, a named watch id and filters; then a start the compaction has passed.
        let replay = json!({"create_request": {"key": b64("w"), "start_revision": r1.to_string(), "watch_id": 7, "filters": ["NOPUT"]}});
        let (_, mut lines) = post_stream(e, "/v3/watch", &replay.to_string()).await;
        let created = next_json(&mut lines).await;
        assert_eq!(
            (
                &created["result"]["watch_id"],
                &created["result"]["created"]
            ),
            (&json!("7"), &json!(true))
        );
        let deletes = next_json(&mut lines).await;
        assert_eq!(deletes["result"]["watch_id"], "7");
        assert_eq!(
            deletes["result"]["events"],
            json!([{"type": "DELETE", "kv": {"key": b64("w"), "mod_revision": r3.to_string()}}])
        );
        drop(lines);

        c.compact(r3, None).await.unwrap();
        let old = json!({"create_request": {"key": b64("w"), "start_revision": r1.to_string()}});
        let (_, mut lines) = post_stream(e, "/v3/watch", &old.to_string()).await;
        assert_eq!(next_json(&mut lines).await["result"]["created"], true);
        let canceled = next_json(&mut lines).await["result"].clone();
        assert_eq!(
            (&canceled["canceled"], &canceled["compact_revision"]),
            (&json!(true), &json!(r3.to_string()))
        );
        assert!(
            canceled["header"].get("revision").is_none(),
            "etcd leaves it at 0: {canceled}"
        );
    }
}
