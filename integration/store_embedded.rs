//! What only the embedded store has: its data dir across restarts, its Unix socket, its
//! auto-compaction and snapshot policy, and the RPCs it leaves out.

#[path = "support/mod.rs"]
mod support;

use arbor::store::client::{Endpoints, EventKind, StoreClient, WatchLost};
use arbor::store::{Options, StoreConfig};
use etcd_client::{GetOptions, LeaseTimeToLiveOptions, PutOptions, WatchOptions};
use std::path::Path;
use std::time::Duration;
use support::{embedded_listening, embedded_with, status, test_options};
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_data_dir_keeps_data_revisions_leases_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = embedded_with(Some(&data)).await;
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "the data dir is its owner's only");
    let mut c = store.client().await;
    let lease = c.lease_grant(300, None).await.unwrap().id();
    for i in 0..50 {
        c.put(format!("k/{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    c.delete("k/00", None).await.unwrap();
    let compact_at = c.get("k/10", None).await.unwrap().kvs()[0].mod_revision();
    c.compact(compact_at, None).await.unwrap();
    let before = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let ids = c.status().await.unwrap().header().unwrap().clone();
    drop(c);
    store.stop().await;

    let store = embedded_with(Some(&data)).await;
    let mut c = store.client().await;
    let after = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    assert_eq!(
        after.header().unwrap().revision(),
        before.header().unwrap().revision()
    );
    assert_eq!(after.kvs().len(), before.kvs().len());
    for (a, b) in after.kvs().iter().zip(before.kvs()) {
        assert_eq!(
            (
                a.key(),
                a.value(),
                a.create_revision(),
                a.mod_revision(),
                a.version(),
                a.lease()
            ),
            (
                b.key(),
                b.value(),
                b.create_revision(),
                b.mod_revision(),
                b.version(),
                b.lease()
            )
        );
    }
    let header = after.header().unwrap();
    assert_eq!(
        header.cluster_id(),
        ids.cluster_id(),
        "the ids belong to the data dir"
    );
    assert_eq!(header.member_id(), ids.member_id());
    let err = status(
        c.get(
            "k/01",
            Some(GetOptions::new().with_revision(compact_at - 1)),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        err.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let ttl = c
        .lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 300);
    assert!(
        ttl.ttl() > 290,
        "a restart gives leases their full TTL again"
    );
    assert_eq!(ttl.keys(), [b"leased".to_vec()]);
    // History since the compaction is still there for watches.
    let mut w = c
        .watch(
            "k/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(compact_at),
            ),
        )
        .await
        .unwrap();
    assert!(w.message().await.unwrap().unwrap().created());
    let first = w.message().await.unwrap().unwrap();
    assert_eq!(first.events()[0].kv().unwrap().mod_revision(), compact_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_record_at_the_end_of_the_log_is_dropped_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = embedded_with(Some(&data)).await;
    let mut c = store.client().await;
    for i in 0..20 {
        c.put(format!("t/{i}"), "v", None).await.unwrap();
    }
    drop(c);
    store.stop().await;
    let wal = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a log segment");
    let len = std::fs::metadata(&wal).unwrap().len();
    // Half of a record that claims 100 bytes, as a crash mid-write leaves it.
    let mut bytes = std::fs::read(&wal).unwrap();
    bytes.extend_from_slice(&[100, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
    std::fs::write(&wal, &bytes).unwrap();

    let store = embedded_with(Some(&data)).await;
    let mut c = store.client().await;
    let all = c
        .get("t/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.count(), 20);
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        len,
        "the torn tail is cut off"
    );
    c.put("t/after", "v", None).await.unwrap();
    drop(c);
    store.stop().await;
    let store = embedded_with(Some(&data)).await;
    let mut c = store.client().await;
    let all = c
        .get("t/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(all.count(), 21, "writes after the cut are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restart_the_log_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let options = || Options {
        snapshot_after_bytes: 8 << 10,
        ..test_options(Some(data.clone()))
    };
    let store = embedded_listening("127.0.0.1:0", options()).await;
    let mut c = store.client().await;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                c.put(format!("s/{w}/{i:03}"), vec![b'v'; 200], None)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let before = c
        .get("s/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(before.count(), 800);
    let segments = log_segments(&data);
    assert_eq!(segments.len(), 1, "old segments are removed: {segments:?}");
    assert!(
        !segments[0].ends_with("wal-00000000000000000001.log"),
        "the log was restarted after a snapshot: {segments:?}"
    );
    assert!(data.join("snapshot.pb").exists());
    drop(c);
    store.stop().await;

    let store = embedded_listening("127.0.0.1:0", options()).await;
    let mut c = store.client().await;
    let after = c
        .get("s/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(after.count(), 800);
    assert_eq!(
        after.header().unwrap().revision(),
        before.header().unwrap().revision()
    );
    // Every revision is still there for a watch from the start.
    let mut w = c
        .watch(
            "s/",
            Some(WatchOptions::new().with_prefix().with_start_revision(1)),
        )
        .await
        .unwrap();
    let mut seen = 0;
    while seen < 800 {
        let resp = w.message().await.unwrap().unwrap();
        seen += resp.events().len();
    }
    assert_eq!(seen, 800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_compaction_keeps_the_newest_revisions_only() {
    let options = Options {
        retain_revisions: 100,
        ..test_options(None)
    };
    let store = embedded_listening("127.0.0.1:0", options).await;
    let mut c = store.client().await;
    let mut last = 0;
    for i in 0..400 {
        last = c
            .put("ac", format!("{i}"), None)
            .await
            .unwrap()
            .header()
            .unwrap()
            .revision();
    }
    let err = status(
        c.get("ac", Some(GetOptions::new().with_revision(2)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        err.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    let kept = c
        .get("ac", Some(GetOptions::new().with_revision(last - 100)))
        .await
        .unwrap();
    assert_eq!(kept.kvs()[0].mod_revision(), last - 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_over_a_unix_socket_resumes_its_watch_across_a_store_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("store.sock");
    let listen = format!("unix:{}", socket.display());
    let store = embedded_listening(&listen, test_options(Some(data.clone()))).await;
    assert_eq!(store.endpoint, listen);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only the owner may reach the store");

    let client = StoreClient::connect(&Endpoints::parse(&listen).unwrap())
        .await
        .unwrap();
    let (_, rev) = client.get_prefix("u/").await.unwrap();
    let mut events = client.watch_prefix("u/", rev + 1);
    for i in 0..5 {
        client.put(format!("u/{i}"), "a").await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(next(&mut events).await);
    }
    store.stop().await;
    assert!(
        client.put("u/x", "down").await.is_err(),
        "the store is down"
    );

    let store = embedded_listening(&listen, test_options(Some(data.clone()))).await;
    let direct = StoreClient::connect(&Endpoints::parse(&store.endpoint).unwrap())
        .await
        .unwrap();
    for i in 5..10 {
        direct.put(format!("u/{i}"), "b").await.unwrap();
    }
    direct.delete("u/0").await.unwrap();
    while got.len() < 11 {
        got.push(next(&mut events).await);
    }
    let revs: Vec<i64> = got.iter().map(|e| e.revision).collect();
    assert!(
        revs.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap, no repeat: {revs:?}"
    );
    assert_eq!(got[10].kind, EventKind::Delete);
    assert_eq!(client.get("u/9").await.unwrap().unwrap().value(), b"b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_watch_from_compacted_history_reports_it() {
    let options = Options {
        retain_revisions: 10,
        ..test_options(None)
    };
    let store = embedded_listening("127.0.0.1:0", options).await;
    let client = StoreClient::connect(&Endpoints::parse(&store.endpoint).unwrap())
        .await
        .unwrap();
    for i in 0..50 {
        client.put("h/k", format!("{i}")).await.unwrap();
    }
    let mut events = client.watch_prefix("h/", 2);
    let lost = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("a verdict within 20s")
        .expect("the stream ends with the reason");
    match lost {
        Err(WatchLost::Compacted {
            compact_revision,
            next_revision,
            ..
        }) => {
            assert_eq!(next_revision, 2);
            assert!(compact_revision > 2, "{compact_revision}");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(events.next().await.is_none(), "the watch stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_watch_reports_a_store_replaced_by_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("unix:{}", dir.path().join("store.sock").display());
    let store = embedded_listening(&listen, test_options(None)).await;
    let client = StoreClient::connect(&Endpoints::parse(&listen).unwrap())
        .await
        .unwrap();
    let (_, rev) = client.get_prefix("r/").await.unwrap();
    let mut events = client.watch_prefix("r/", rev + 1);
    client.put("r/1", "old").await.unwrap();
    assert_eq!(next(&mut events).await.value, b"old");
    store.stop().await;
    // A fresh in-memory store on the same socket: revisions start over.
    let _store = embedded_listening(&listen, test_options(None)).await;
    client.put("r/2", "new").await.unwrap();
    let lost = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("a verdict within 20s")
        .expect("the stream ends with the reason");
    match lost {
        Err(WatchLost::StoreReplaced { prefix, .. }) => assert_eq!(prefix, "r/"),
        other => panic!("expected StoreReplaced, got {other:?}"),
    }
    assert!(events.next().await.is_none(), "the watch stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_outside_the_subset_answer_unimplemented_saying_why() {
    let store = embedded_with(None).await;
    let mut c = store.client().await;
    let err = status(
        c.member_add(["http://127.0.0.1:1"], None)
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::Unimplemented);
    let err = status(c.hash_kv(0).await.unwrap_err());
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("Maintenance.HashKV"), "{err:?}");
    let err = status(c.lock("l", None).await.unwrap_err());
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(
        err.message(),
        "arbor store: v3lockpb.Lock is not served (docs/store.md lists what is)"
    );
    // etcd's auth API: a clear refusal, whichever call.
    let err = status(c.auth_enable().await.unwrap_err());
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("Auth.AuthEnable is not supported")
            && err.message().contains("per-host credentials"),
        "{err:?}"
    );
    let err = status(c.user_list().await.unwrap_err());
    assert!(err.message().contains("Auth.UserList"), "{err:?}");
    // The same over the JSON gateway.
    let reply = support::http_client::post(&store.endpoint, "/v3/auth/user/list", "{}").await;
    assert_eq!(reply.status, 501, "{}", reply.body);
    assert!(
        reply.body.contains("per-host credentials"),
        "{}",
        reply.body
    );
    // And the store goes on serving.
    c.put("still", "here", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_store_cannot_open_a_data_dir_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _store = embedded_with(Some(&data)).await;
    let config = StoreConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: Some(data.clone()),
        allow_non_loopback: false,
    };
    let err = match arbor::store::Store::bind(&config).await {
        Ok(_) => panic!("two stores on one data dir"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("in use"), "{err}");
}

fn log_segments(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect()
}

async fn next(
    events: &mut tokio_stream::wrappers::ReceiverStream<
        Result<arbor::store::client::StoreEvent, arbor::store::client::WatchLost>,
    >,
) -> arbor::store::client::StoreEvent {
    tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("an event within 20s")
        .expect("the watch goes on")
        .expect("no history lost")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragment_folds_the_log_into_a_snapshot_and_the_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = embedded_with(Some(&data)).await;
    let mut c = store.client().await;
    for i in 0..200 {
        c.put(format!("d/{i:03}"), "v".repeat(1000), None)
            .await
            .unwrap();
    }
    c.delete("d/1", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    let rev = c
        .put("d/last", "x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(rev, None).await.unwrap();
    let before = c.status().await.unwrap();
    let log_bytes = |dir: &Path| -> u64 {
        log_segments(dir)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    };
    assert!(log_bytes(&data) > 200_000, "the log holds every write");
    assert!(before.db_size() > before.raft_used_db_size() + 200_000);

    c.defragment().await.unwrap();
    let after = c.status().await.unwrap();
    assert_eq!(log_bytes(&data), 0, "the log starts over");
    assert_eq!(log_segments(&data).len(), 1);
    assert_eq!(after.db_size(), after.raft_used_db_size());
    assert_eq!(after.raft_used_db_size(), before.raft_used_db_size());
    let snapshot = std::fs::metadata(data.join("snapshot.pb")).unwrap().len();
    assert!(snapshot > 100_000 && snapshot < 200_000, "{snapshot}");

    let metrics = support::http_client::get(&store.endpoint, "/metrics")
        .await
        .body;
    let has = |prefix: &str| metrics.lines().any(|l| l.starts_with(prefix));
    assert!(
        has("etcd_disk_backend_defrag_duration_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        !has("etcd_disk_wal_fsync_duration_seconds_count 0"),
        "the log was fsynced"
    );
    // arbor times every request by method (etcd only with --metrics=extensive).
    assert!(
        has(
            "grpc_server_handling_seconds_count{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 201"
        ),
        "{metrics}"
    );
    store.stop().await;

    let store = embedded_with(Some(&data)).await;
    let mut c = store.client().await;
    let all = c
        .get(
            "d/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(all.count(), 101);
    assert_eq!(all.header().unwrap().revision(), rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_alone_gives_space_back_to_the_quota() {
    // arbor counts what it holds, so compaction frees room at once; etcd counts its file,
    // which only defragmentation shrinks (docs/store.md).
    let store = support::embedded_with_quota(200 << 10).await;
    let mut c = store.client().await;
    let mut last = 0;
    for i in 0.. {
        match c.put("same/key", "v".repeat(4096), None).await {
            Ok(r) => last = r.header().unwrap().revision(),
            Err(e) => {
                assert!(i > 10, "{e}");
                break;
            }
        }
    }
    let full = c.status().await.unwrap().raft_used_db_size();
    c.compact(last, None).await.unwrap();
    let compacted = c.status().await.unwrap().raft_used_db_size();
    assert!(
        compacted < 10_000,
        "one version left: {compacted} bytes of {full}"
    );
    let mut member = etcd_client::AlarmOptions::new();
    member.with_member(c.status().await.unwrap().header().unwrap().member_id());
    c.alarm(
        etcd_client::AlarmAction::Deactivate,
        etcd_client::AlarmType::Nospace,
        Some(member),
    )
    .await
    .unwrap();
    c.put("same/key", "fits again", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_gateway_refuses_what_a_web_page_could_send() {
    use support::http_client::request_with;
    let store = embedded_with(None).await;
    let e = &store.endpoint;
    let body = r#"{"key":"Zm9v","value":"YmFy"}"#;
    let page = request_with(
        e,
        "POST",
        "/v3/kv/put",
        body,
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert_eq!(page.json()["code"], 7);
    let rebound = request_with(
        e,
        "POST",
        "/v3/kv/put",
        body,
        &[("host", "evil.example:80")],
    )
    .await;
    assert_eq!(rebound.status, 403, "{}", rebound.body);
    let mut c = store.client().await;
    assert!(
        c.get("foo", None).await.unwrap().kvs().is_empty(),
        "nothing was written"
    );
    // A script (no Origin, an IP or localhost as Host) is served.
    let script = request_with(e, "POST", "/v3/kv/put", body, &[("host", "localhost")]).await;
    assert_eq!(script.status, 200, "{}", script.body);
    // /health, /version and /metrics answer anyone.
    let health = request_with(
        e,
        "GET",
        "/health",
        "",
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(health.status, 200);
}

/// A run's store: every request needs a token from `Auth.Authenticate`, each user reaches
/// only its own keys, and over HTTP only `/health`, `/version` and `/metrics` answer without
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_with_users_checks_every_request_over_grpc_and_http() {
    use arbor::store::auth::{Access, Users};
    use support::http_client::request_with;
    let mut users = Users::new();
    users.add(
        "h1",
        "pw1",
        Access::Keys {
            read: vec![b"/run/exports/".to_vec()],
            write: vec![b"/run/exports/h1/".to_vec()],
            own: vec![b"/run/converged/h1".to_vec()],
        },
    );
    users.add("admin", "pwa", Access::Admin);
    let options = Options {
        users: Some(std::sync::Arc::new(users)),
        ..test_options(None)
    };
    let store = embedded_listening("127.0.0.1:0", options).await;
    let endpoints = Endpoints::parse(&store.endpoint).expect("endpoints");

    // No credential, a wrong one: refused.
    let anonymous = StoreClient::connect(&endpoints).await.expect("connect");
    let err = anonymous.get_prefix("/").await.expect_err("no token");
    assert!(format!("{err:#}").contains("user name is empty"), "{err:#}");
    assert!(
        StoreClient::connect_as(&endpoints, Some(("h1", "wrong")))
            .await
            .is_err()
    );

    // h1: its own keys, every export to read, nothing else.
    let h1 = StoreClient::connect_as(&endpoints, Some(("h1", "pw1")))
        .await
        .expect("h1");
    let mut raw = h1.raw();
    raw.put("/run/exports/h1/file/a", "mine", None)
        .await
        .expect("own export");
    raw.put("/run/converged/h1", "true", None)
        .await
        .expect("own flag");
    for key in ["/run/exports/h2/file/a", "/run/converged/h2", "/elsewhere"] {
        let e = raw.put(key, "x", None).await.expect_err(key);
        assert!(e.to_string().contains("permission denied"), "{key}: {e}");
    }
    assert_eq!(
        h1.get_prefix("/run/exports/").await.expect("read").0.len(),
        1
    );
    assert!(h1.delete_prefix("/").await.is_err());
    assert!(raw.compact(1, None).await.is_err());

    // The admin does what it likes.
    let admin = StoreClient::connect_as(&endpoints, Some(("admin", "pwa")))
        .await
        .expect("admin");
    assert_eq!(admin.get_prefix("/").await.expect("all").0.len(), 2);

    // HTTP: health answers anyone; the gateway wants the token.
    let e = &store.endpoint;
    let health = request_with(e, "GET", "/health", "", &[]).await;
    assert_eq!(health.status, 200, "{}", health.body);
    let range = r#"{"key":"L3J1bi9leHBvcnRzLw==","range_end":"L3J1bi9leHBvcnRzMA=="}"#;
    let without = request_with(e, "POST", "/v3/kv/range", range, &[]).await;
    assert_eq!(without.status, 401, "{}", without.body);
}

/// A store with users (a relay, hosts h1 and h2 that may read the run's exports and write
/// their own, an outsider who may not read them) and a relay front over it, as the relay,
/// sharing the exports. Its uplink runs through a proxy that counts the bytes coming down
/// (the store's answers). The front serves until the guard drops.
async fn front_with_users() -> (
    support::TestStore,
    Endpoints,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    tokio_util::sync::DropGuard,
    std::sync::Arc<arbor::store::relay_front::Holds>,
) {
    use arbor::store::auth::{Access, Users};
    use arbor::store::relay_front::{FrontConfig, FrontListener, serve_on};
    let host = |name: &str| Access::Keys {
        read: vec![b"/run/exports/".to_vec()],
        write: vec![format!("/run/exports/{name}/").into_bytes()],
        own: vec![],
    };
    let mut users = Users::new();
    for name in ["h1", "h2"] {
        users.add(name, &format!("pw-{name}"), host(name));
    }
    // The relay may write its subtree's exports too: its front writes them on its shared
    // lease (as the initiator grants a relay).
    let relay = Access::Keys {
        read: vec![b"/run/exports/".to_vec()],
        write: ["relay", "h1", "h2"]
            .map(|n| format!("/run/exports/{n}/").into_bytes())
            .to_vec(),
        own: vec![],
    };
    users.add("relay", "pw-relay", relay);
    users.add("admin", "pw-admin", Access::Admin);
    users.add(
        "outsider",
        "pw-outsider",
        Access::Keys {
            read: vec![b"/other/".to_vec()],
            write: vec![b"/other/".to_vec()],
            own: vec![],
        },
    );
    let options = Options {
        users: Some(std::sync::Arc::new(users)),
        ..test_options(None)
    };
    let store = embedded_listening("127.0.0.1:0", options).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let store_addr = store.endpoint.trim_start_matches("http://").to_string();
    let (uplink, down, _) = support::counting_proxy(&store_addr, stop.clone()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = tonic::transport::Endpoint::from_shared(format!("http://{uplink}"))
        .unwrap()
        .connect_lazy();
    let holds = std::sync::Arc::new(arbor::store::relay_front::Holds::default());
    let config = FrontConfig {
        shared_prefixes: vec![b"/run/exports/".to_vec()],
        credential: Some(("relay".into(), "pw-relay".into())),
        users: ["h1", "h2"]
            .map(|n| (n.to_string(), host(n)))
            .into_iter()
            .collect(),
        holds: holds.clone(),
    };
    serve_on(FrontListener::Tcp(listener), upstream, config, stop.clone())
        .await
        .unwrap();
    let front = Endpoints::parse(&front_url).unwrap();
    (store, front, down, stop.drop_guard(), holds)
}

/// What a leaf does first (a serializable read of every export) costs the relay's uplink
/// almost nothing when a front answers it: twenty children's reads of 100 kB of exports bring
/// less down the uplink than one linearizable read, which passes through. Each child gets
/// exactly what the store holds, sees its own writes and deletes at once, and keeps its
/// rights: an outsider's read is refused by the store above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_front_answers_serializable_reads_of_the_exports_from_its_copy() {
    use std::sync::atomic::Ordering;
    let (store, front, down, _stop, _) = front_with_users().await;
    let direct = StoreClient::connect_as(
        &Endpoints::parse(&store.endpoint).unwrap(),
        Some(("h1", "pw-h1")),
    )
    .await
    .unwrap();
    let value = "x".repeat(2000);
    for i in 0..50 {
        direct
            .put(format!("/run/exports/h1/f{i:02}"), value.as_str())
            .await
            .unwrap();
    }
    let (want, _) = direct.get_prefix("/run/exports/").await.unwrap();
    assert_eq!(want.len(), 50);
    let mut children = Vec::new();
    for i in 0..20 {
        let name = if i % 2 == 0 { "h1" } else { "h2" };
        let client = StoreClient::connect_as(&front, Some((name, &format!("pw-{name}"))))
            .await
            .expect("connect through the front");
        children.push(client);
    }
    // The first read may wait for the front's copy to take in the fifty puts.
    let first = children[0]
        .get_prefix_serializable("/run/exports/")
        .await
        .unwrap();
    assert_eq!(first.0.len(), 50);
    let before = down.load(Ordering::Relaxed);
    for child in &children {
        let (got, _) = child
            .get_prefix_serializable("/run/exports/")
            .await
            .unwrap();
        let pairs = |kvs: &[etcd_client::KeyValue]| -> Vec<(Vec<u8>, Vec<u8>, i64)> {
            kvs.iter()
                .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
                .collect()
        };
        assert_eq!(
            pairs(&got),
            pairs(&want),
            "a child's read differs from the store's"
        );
    }
    let cached = down.load(Ordering::Relaxed) - before;
    let before = down.load(Ordering::Relaxed);
    children[1].get_prefix("/run/exports/").await.unwrap();
    let passed = down.load(Ordering::Relaxed) - before;
    println!("uplink bytes down: 20 serializable reads {cached}, 1 linearizable read {passed}");
    assert!(
        passed > 100_000,
        "the linearizable read passed through: {passed}"
    );
    assert!(
        cached < passed,
        "twenty reads from the front's copy cost {cached} bytes, one passed through {passed}"
    );

    // Its own writes, updates and deletes, read back at once through the front, and still
    // from its copy: twenty updates and reads bring less down than one read passed through.
    let h1 = &children[0];
    let elsewhere = StoreClient::connect_as(
        &Endpoints::parse(&store.endpoint).unwrap(),
        Some(("outsider", "pw-outsider")),
    )
    .await
    .unwrap();
    let before = down.load(Ordering::Relaxed);
    for i in 0..20 {
        let value = format!("update {i}");
        h1.put("/run/exports/h1/f07", value.as_str()).await.unwrap();
        // The store's newest revision then lies outside the range: the copy is known current
        // only by its count and newest key there.
        elsewhere.put("/other/k", value.as_str()).await.unwrap();
        let (got, _) = h1.get_prefix_serializable("/run/exports/").await.unwrap();
        let f07 = got.iter().find(|kv| kv.key() == b"/run/exports/h1/f07");
        assert_eq!(
            f07.map(|kv| kv.value()),
            Some(value.as_bytes()),
            "update {i} not read back"
        );
    }
    let updates = down.load(Ordering::Relaxed) - before;
    assert!(
        updates < passed,
        "twenty updates and reads cost {updates} bytes, one read passed through {passed}"
    );
    for i in 0..20 {
        let key = format!("/run/exports/h1/new{i:02}");
        h1.put(key.as_str(), "v").await.unwrap();
        let (got, _) = h1.get_prefix_serializable("/run/exports/").await.unwrap();
        assert!(
            got.iter().any(|kv| kv.key() == key.as_bytes()),
            "{key} not read back"
        );
        h1.delete(key.as_str()).await.unwrap();
        let (got, _) = h1.get_prefix_serializable("/run/exports/").await.unwrap();
        assert!(
            !got.iter().any(|kv| kv.key() == key.as_bytes()),
            "{key} read back after its delete"
        );
    }

    let outsider = StoreClient::connect_as(&front, Some(("outsider", "pw-outsider")))
        .await
        .unwrap();
    let refused = outsider
        .get_prefix_serializable("/run/exports/")
        .await
        .expect_err("an outsider may not read the exports");
    assert!(
        format!("{refused:#}").contains("permission denied"),
        "{refused:#}"
    );
}

/// A relay's store front over a store with users: twenty children's watches on the run's
/// exports share one upstream watch (the store above counts one watcher), every one of them
/// sees a write made through the front, and each child keeps exactly its own rights: a user
/// who may not read the exports gets etcd's "permission denied" for its watch, and a write to
/// another host's keys through the front is refused by the store above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_front_shares_one_upstream_watch_and_keeps_each_childs_rights() {
    let (store, front, _, _stop, _) = front_with_users().await;
    let watchers = || async {
        let metrics = support::http_client::get(&store.endpoint, "/metrics")
            .await
            .body;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(-1.0)
    };

    let mut streams = Vec::new();
    for i in 0..20 {
        let name = if i % 2 == 0 { "h1" } else { "h2" };
        let client = StoreClient::connect_as(&front, Some((name, &format!("pw-{name}"))))
            .await
            .expect("connect through the front");
        // Half as clients do it: read, then watch from the revision after the read.
        let mut options = etcd_client::WatchOptions::new().with_prefix();
        if i % 4 < 2 {
            let (_, rev) = client.get_prefix("/run/exports/").await.expect("read");
            options = options.with_start_revision(rev + 1);
        }
        let mut stream = client
            .raw()
            .watch("/run/exports/", Some(options))
            .await
            .expect("watch");
        let created = stream.message().await.unwrap().unwrap();
        assert!(created.created() && !created.canceled(), "{created:?}");
        streams.push((client, stream));
    }
    assert_eq!(
        watchers().await,
        1.0,
        "one upstream watch for twenty children"
    );

    let h1 = StoreClient::connect_as(&front, Some(("h1", "pw-h1")))
        .await
        .unwrap();
    let mut raw = h1.raw();
    raw.put("/run/exports/h1/file", "hello", None)
        .await
        .expect("h1 writes its own export through the front");
    for (_, stream) in &mut streams {
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        assert_eq!(resp.events().len(), 1);
        let kv = resp.events()[0].kv().unwrap();
        assert_eq!(
            (kv.key(), kv.value()),
            (&b"/run/exports/h1/file"[..], &b"hello"[..])
        );
    }
    let e = raw
        .put("/run/exports/h2/file", "forged", None)
        .await
        .expect_err("h1 may not write h2's keys");
    assert!(e.to_string().contains("permission denied"), "{e}");

    let outsider = StoreClient::connect_as(&front, Some(("outsider", "pw-outsider")))
        .await
        .unwrap();
    let mut stream = outsider
        .raw()
        .watch(
            "/run/exports/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await
        .expect("the stream opens");
    let resp = stream.message().await.unwrap().unwrap();
    assert!(resp.canceled(), "{resp:?}");
    assert!(
        resp.cancel_reason().contains("permission denied"),
        "{resp:?}"
    );
    // Without a token, the shared watch is no way around the store's check either.
    let anonymous = StoreClient::connect(&front).await.unwrap();
    let watched = anonymous
        .raw()
        .watch(
            "/run/exports/",
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await;
    let refused = match watched {
        Err(e) => e.to_string(),
        Ok(mut stream) => match stream.message().await {
            Err(e) => e.to_string(),
            Ok(resp) => format!("answered: {resp:?}"),
        },
    };
    assert!(refused.contains("user name is empty"), "{refused}");
    assert_eq!(
        watchers().await,
        1.0,
        "a refused watch costs the store nothing"
    );
}

/// Leases through a relay front are the front's: ten children's leases are one lease at the
/// store above, kept alive by the front; a child's lease that is not kept alive takes its keys,
/// and only its keys, with it in one revision; a child can neither write on another's lease
/// nor write another host's keys on its own (the front writes on the relay's lease, so it
/// checks); and when the relay's lease is gone above, every lease below is gone with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_front_holds_its_subtrees_leases_on_one_lease_above() {
    let (store, front, _down, _stop, _) = front_with_users().await;
    let admin = StoreClient::connect_as(
        &Endpoints::parse(&store.endpoint).unwrap(),
        Some(("admin", "pw-admin")),
    )
    .await
    .unwrap();
    let mut above = admin.raw();
    let mut children = Vec::new();
    for i in 0..10 {
        let name = if i % 2 == 0 { "h1" } else { "h2" };
        let client = StoreClient::connect_as(&front, Some((name, &format!("pw-{name}"))))
            .await
            .expect("connect through the front");
        let mut raw = client.raw();
        let lease = raw.lease_grant(3, None).await.unwrap().id();
        raw.put(
            format!("/run/exports/{name}/k{i}"),
            "v",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
        children.push((name, raw, lease));
    }
    let at_store = above.leases().await.unwrap();
    assert_eq!(
        at_store.leases().len(),
        1,
        "the store above holds one lease for the subtree: {:?}",
        at_store.leases()
    );
    let up = at_store.leases()[0].id();
    let own = children[0].1.get("/run/exports/h1/k0", None).await.unwrap();
    assert_eq!(
        own.kvs()[0].lease(),
        children[0].2,
        "a child reads its key back on its own lease"
    );

    // Neither another child's lease nor another host's key.
    let h1_lease = children[0].2;
    for (who, what) in [(1, "h2 on h1's lease"), (0, "h1 on h2's keys")] {
        let err = children[who]
            .1
            .put(
                "/run/exports/h2/x",
                "v",
                Some(PutOptions::new().with_lease(h1_lease)),
            )
            .await
            .unwrap_err();
        assert_eq!(status(err).code(), Code::PermissionDenied, "{what}");
    }
    let (kvs, _) = admin.get_prefix("/run/exports/h2/x").await.unwrap();
    assert!(kvs.is_empty(), "a refused write landed");

    // Every lease but child 0's kept alive: its key goes, alone.
    let beating = tokio_util::sync::CancellationToken::new();
    for (_, raw, lease) in children.iter().skip(1) {
        let (mut keeper, mut answers) = raw.clone().lease_keep_alive(*lease).await.unwrap();
        let stop = beating.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if keeper.keep_alive().await.is_err() {
                    return;
                }
                let _ = answers.message().await;
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (kvs, _) = admin.get_prefix("/run/exports/").await.unwrap();
        let keys: Vec<String> = kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        if !keys.iter().any(|k| k.ends_with("/k0")) {
            assert_eq!(keys.len(), 9, "only the expired lease's key went: {keys:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "child 0's key outlived its lease: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone = children[0]
        .1
        .lease_time_to_live(h1_lease, None)
        .await
        .unwrap();
    assert_eq!(gone.ttl(), -1, "the expired lease is gone below too");
    assert_eq!(
        above.leases().await.unwrap().leases().len(),
        1,
        "the relay's lease stays while others use it"
    );

    // The relay's lease gone above: every key of the subtree goes, and every lease below
    // answers as gone.
    above.lease_revoke(up).await.unwrap();
    let (kvs, _) = admin.get_prefix("/run/exports/").await.unwrap();
    assert!(
        kvs.is_empty(),
        "the subtree's keys outlived the relay's lease"
    );
    beating.cancel();
    let lease = children[1].2;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        // etcd-client reports a lease answered as gone (TTL 0) as an error.
        let ttl = match children[1].1.lease_keep_alive(lease).await {
            Err(_) => 0,
            Ok(_) => 1,
        };
        if ttl <= 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a lease below outlived the relay's lease above"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // And a new lease works again, on a new lease above.
    let fresh = children[1].1.lease_grant(3, None).await.unwrap().id();
    children[1]
        .1
        .put(
            "/run/exports/h2/again",
            "v",
            Some(PutOptions::new().with_lease(fresh)),
        )
        .await
        .unwrap();
    let now = above.leases().await.unwrap();
    assert_eq!(now.leases().len(), 1);
    assert_ne!(now.leases()[0].id(), up, "a new lease above");
}

/// A child whose link to its relay is down cannot keep its lease alive: while the relay holds
/// it, its lease at the front is renewed instead of expiring, and its keys stay; once released,
/// the lease runs out as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_childs_lease_at_the_front_outlives_its_ttl_until_released() {
    let (store, front, _down, _stop, holds) = front_with_users().await;
    let admin = StoreClient::connect_as(
        &Endpoints::parse(&store.endpoint).unwrap(),
        Some(("admin", "pw-admin")),
    )
    .await
    .unwrap();
    let h1 = StoreClient::connect_as(&front, Some(("h1", "pw-h1")))
        .await
        .unwrap();
    let mut raw = h1.raw();
    let lease = raw.lease_grant(2, None).await.unwrap().id();
    raw.put(
        "/run/exports/h1/held",
        "v",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    holds.hold(
        &["h1".to_string()],
        std::time::Instant::now() + Duration::from_secs(60),
    );
    // No keepalive for twice the TTL, and more.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (kvs, _) = admin.get_prefix("/run/exports/h1/held").await.unwrap();
    assert_eq!(kvs.len(), 1, "a held lease expired");
    holds.release(&["h1".to_string()]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    loop {
        let (kvs, _) = admin.get_prefix("/run/exports/h1/held").await.unwrap();
        if kvs.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a released lease did not run out"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
