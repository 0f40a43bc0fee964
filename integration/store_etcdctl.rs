//! Debian's etcdctl (ETCDCTL_API=3) against the embedded store over TCP: every command arbor's
//! users are told they can use, with assertions on what etcdctl prints.

#[path = "support/mod.rs"]
mod support;

use std::process::Stdio;
use std::time::Duration;
use support::TestStore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const ETCDCTL: &str = "/usr/bin/etcdctl";

fn etcdctl(store: &TestStore) -> Command {
    etcdctl_at(&store.endpoint)
}

/// etcdctl 3.4's `endpoint status`, `endpoint health` and `defrag` send an endpoint given as a
/// URL verbatim as the HTTP/2 :authority ("http://127.0.0.1:2379"); the store lets it pass
/// (src/store/authority.rs), so both forms are tested.
fn etcdctl_at(endpoint: &str) -> Command {
    let mut cmd = Command::new(ETCDCTL);
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=5s")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs etcdctl with `args` (and `stdin`), expects success, returns stdout.
async fn run(store: &TestStore, args: &[&str], stdin: Option<&str>) -> String {
    run_at(&store.endpoint, args, stdin).await
}

async fn run_at(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = etcdctl_at(endpoint);
    cmd.args(args);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("run /usr/bin/etcdctl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes())
            .await
            .expect("write etcdctl stdin");
    }
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("etcdctl finishes")
        .expect("etcdctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "etcdctl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_drives_the_embedded_store() {
    let store = support::embedded().await;
    let port = store.endpoint.rsplit(':').next().unwrap().to_string();

    assert_eq!(run(&store, &["put", "foo", "bar"], None).await, "OK\n");
    assert_eq!(run(&store, &["put", "foo/a", "1"], None).await, "OK\n");
    assert_eq!(run(&store, &["put", "foo/b", "2"], None).await, "OK\n");
    assert_eq!(
        run(&store, &["get", "--prefix", "foo"], None).await,
        "foo\nbar\nfoo/a\n1\nfoo/b\n2\n"
    );
    assert_eq!(
        run(&store, &["get", "foo/a", "--print-value-only"], None).await,
        "1\n"
    );
    assert_eq!(run(&store, &["del", "foo"], None).await, "1\n");
    assert_eq!(run(&store, &["del", "nothing"], None).await, "0\n");

    let txn = "value(\"foo/a\") = \"1\"\n\nput foo/c yes\n\nput foo/c no\n\n";
    assert_eq!(run(&store, &["txn"], Some(txn)).await, "SUCCESS\n\nOK\n");
    let txn = "value(\"foo/a\") = \"9\"\n\nput foo/c yes\n\nget foo/c\n\n";
    assert_eq!(
        run(&store, &["txn"], Some(txn)).await,
        "FAILURE\n\nfoo/c\nyes\n"
    );

    // Replay from revision 2 (the first put), then a live event.
    let mut watch = etcdctl(&store)
        .args(["watch", "--rev=2", "--prefix", "foo"])
        .spawn()
        .expect("etcdctl watch");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let mut seen = Vec::new();
    let want = [
        "PUT", "foo", "bar", "PUT", "foo/a", "1", "PUT", "foo/b", "2", "DELETE", "foo", "", "PUT",
        "foo/c", "yes", "PUT", "foo/live", "now",
    ];
    let mut live_written = false;
    while seen.len() < want.len() {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("etcdctl watch prints within 10s")
            .expect("read etcdctl output")
            .expect("etcdctl watch keeps running");
        seen.push(line);
        // Once the history is replayed, a live event.
        if seen.len() == 15 && !live_written {
            run(&store, &["put", "foo/live", "now"], None).await;
            live_written = true;
        }
    }
    assert_eq!(
        seen, want,
        "a DELETE prints its key and an empty value line"
    );
    watch.kill().await.expect("stop etcdctl watch");

    let grant = run(&store, &["lease", "grant", "60"], None).await;
    // "lease 694d8b1e9c0dbf0a granted with TTL(60s)"
    let id = grant
        .split_whitespace()
        .nth(1)
        .expect("a lease id")
        .to_string();
    assert_eq!(grant, format!("lease {id} granted with TTL(60s)\n"));
    assert_eq!(
        run(
            &store,
            &["put", &format!("--lease={id}"), "leased", "v"],
            None
        )
        .await,
        "OK\n"
    );
    assert_eq!(
        run(&store, &["lease", "keep-alive", "--once", &id], None).await,
        format!("lease {id} keepalived with TTL(60)\n")
    );
    let ttl = run(&store, &["lease", "timetolive", "--keys", &id], None).await;
    assert!(
        ttl.starts_with(&format!("lease {id} granted with TTL(60s), remaining(")),
        "{ttl}"
    );
    assert!(ttl.ends_with("attached keys([leased])\n"), "{ttl}");
    assert_eq!(
        run(&store, &["lease", "list"], None).await,
        format!("found 1 leases\n{id}\n")
    );
    assert_eq!(
        run(&store, &["lease", "revoke", &id], None).await,
        format!("lease {id} revoked\n")
    );
    assert_eq!(run(&store, &["get", "leased"], None).await, "");

    let mut c = store.client().await;
    let member = format!(
        "{:x}",
        c.status().await.unwrap().header().unwrap().member_id()
    );
    // Both ways users write an endpoint: a URL (which etcdctl 3.4 sends as the HTTP/2
    // :authority of these two commands) and host:port.
    let url = format!("http://127.0.0.1:{port}");
    let host_port = format!("127.0.0.1:{port}");
    for endpoint in [&url, &host_port] {
        let status = run_at(endpoint, &["endpoint", "status"], None).await;
        // "endpoint, member, version, db size, is leader, is learner, term, index, applied, errors"
        let fields: Vec<&str> = status.trim_end().split(", ").collect();
        assert_eq!(fields[0], endpoint.as_str(), "{status}");
        assert_eq!(fields[1], member, "{status}");
        assert_eq!(fields[2], "3.4.0", "{status}");
        assert_eq!(fields[4], "true", "the store is its own leader: {status}");
        assert_eq!(fields[5], "false", "{status}");
        // etcdctl 3.4 prints the health report on stderr.
        let out = etcdctl_at(endpoint)
            .args(["endpoint", "health"])
            .output()
            .await
            .expect("etcdctl endpoint health");
        let health = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{health}");
        assert!(
            health.starts_with(&format!(
                "{endpoint} is healthy: successfully committed proposal"
            )),
            "{health}"
        );
    }

    let members = run(&store, &["member", "list"], None).await;
    assert_eq!(
        members,
        format!("{member}, started, arbor, , http://127.0.0.1:{port}, false\n")
    );
}

/// Runs etcdctl expecting it to fail; returns what it printed on stderr.
async fn run_failing(endpoint: &str, args: &[&str]) -> String {
    let out = etcdctl_at(endpoint)
        .args(args)
        .output()
        .await
        .expect("run /usr/bin/etcdctl");
    assert!(!out.status.success(), "etcdctl {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_backs_up_defragments_and_handles_the_nospace_alarm() {
    let store = support::embedded_with_quota(64 << 10).await;
    let port = store.endpoint.rsplit(':').next().unwrap().to_string();
    let host_port = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(&store, &["put", "keep", "1"], None).await, "OK\n");

    let file = dir.path().join("backup.snap");
    let file = file.to_str().unwrap();
    assert_eq!(
        run(&store, &["snapshot", "save", file], None).await,
        format!("Snapshot saved at {file}\n")
    );
    // The file is arbor's format: etcdctl cannot read it (docs/store.md).
    let status = run_failing(&store.endpoint, &["snapshot", "status", file]).await;
    assert!(status.contains("Error: invalid database"), "{status}");

    // Like endpoint status, defrag sends the endpoint as :authority: both forms work.
    for endpoint in [&store.endpoint, &host_port] {
        assert_eq!(
            run_at(endpoint, &["defrag"], None).await,
            format!("Finished defragmenting etcd member[{endpoint}]\n")
        );
    }
    assert_eq!(run(&store, &["alarm", "list"], None).await, "");

    let mut c = store.client().await;
    let value = "x".repeat(4096);
    let mut i = 0;
    while c
        .put(format!("fill/{i}"), value.clone(), None)
        .await
        .is_ok()
    {
        i += 1;
        assert!(i < 100, "a 64 KiB quota never refused a write");
    }
    let refused = run_failing(&store.endpoint, &["put", "more", "x"]).await;
    assert!(
        refused.contains("Error: etcdserver: mvcc: database space exceeded"),
        "{refused}"
    );
    let member = c.status().await.unwrap().header().unwrap().member_id();
    let alarm = format!("memberID:{member} alarm:NOSPACE");
    assert_eq!(
        run(&store, &["alarm", "list"], None).await.trim_end(),
        alarm
    );
    let status = run_at(&host_port, &["endpoint", "status"], None).await;
    assert!(status.trim_end().ends_with(&alarm), "{status}");
    assert_eq!(
        run(&store, &["get", "keep", "--print-value-only"], None).await,
        "1\n"
    );
    assert_eq!(
        run(&store, &["del", "--prefix", "fill/"], None).await,
        format!("{i}\n")
    );
    let rev = c
        .get("keep", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(
        run(&store, &["compact", &rev.to_string()], None).await,
        format!("compacted revision {rev}\n")
    );
    assert_eq!(
        run(&store, &["alarm", "disarm"], None).await.trim_end(),
        alarm
    );
    assert_eq!(run(&store, &["put", "more", "x"], None).await, "OK\n");
    assert_eq!(run(&store, &["alarm", "list"], None).await, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_auth_commands_say_arbor_uses_per_host_credentials() {
    let store = support::embedded().await;
    for args in [
        &["user", "list"][..],
        &["role", "list"],
        &["auth", "enable"],
        &["user", "add", "alice", "--new-user-password=pw"],
        &["role", "grant-permission", "r", "read", "k"],
    ] {
        let err = run_failing(&store.endpoint, args).await;
        assert!(
            err.contains("is not supported: the store has no etcd users or roles; arbor uses per-host credentials"),
            "{args:?}: {err}"
        );
    }
    let err = run_failing(&store.endpoint, &["--user=root:pw", "get", "k"]).await;
    assert!(err.contains("per-host credentials"), "{err}");
}
