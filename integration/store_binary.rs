//! `arbor store` as a process: kill -9 in the middle of a write load loses no acknowledged
//! write, the listen address policy holds, a backup taken with etcdctl restores with
//! `arbor store restore`, and the space quota flag applies.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const WRITERS: usize = 8;
const KEYS_PER_WRITER: usize = 50;
/// Large values make each batch's write and fsync take a while, so the kill often lands while
/// writes are queued, written or being synced.
const PADDING: usize = 32 << 10;

/// The `arbor store` child; killed with SIGKILL when dropped.
struct StoreProcess {
    child: Child,
    endpoint: String,
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start(data: &Path, log: &Path) -> StoreProcess {
    start_with(data, log, &[]).await
}

async fn start_with(data: &Path, log: &Path, extra: &[&str]) -> StoreProcess {
    let port = free_port();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("store log");
    let child = Command::new(ARBOR)
        .args([
            "store",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start arbor store");
    let store = StoreProcess {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([&store.endpoint], None).await
            && c.status().await.is_ok()
        {
            return store;
        }
        assert!(Instant::now() < deadline, "arbor store did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the writers know: per key, the last acknowledged (value, revision), and per writer the
/// write that was in flight when the store died (it may or may not have landed).
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, (String, i64)>,
    in_flight: HashMap<usize, (String, String)>,
    count: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("store.log");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut seq = 0u64;
    for round in 0..3 {
        let mut store = start(&data, &log).await;
        check(&store.endpoint, &ledger, round).await;

        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let client = etcd_client::Client::connect([&store.endpoint], None)
                .await
                .unwrap();
            let ledger = ledger.clone();
            seq += 1_000_000;
            let base = seq;
            writers.push(tokio::spawn(async move {
                let mut client = client;
                for i in 0.. {
                    let key = format!("crash/{w}/{}", i % KEYS_PER_WRITER);
                    let value = format!("{}-{}-{}", base, i, "p".repeat(PADDING));
                    ledger
                        .lock()
                        .unwrap()
                        .in_flight
                        .insert(w, (key.clone(), value.clone()));
                    match client.put(key.clone(), value.clone(), None).await {
                        Ok(resp) => {
                            let rev = resp.header().map_or(0, |h| h.revision());
                            let mut l = ledger.lock().unwrap();
                            l.in_flight.remove(&w);
                            l.acked.insert(key, (value, rev));
                            l.count += 1;
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // SIGKILL: no shutdown path runs.
        store.child.kill().expect("kill -9 the store");
        let _ = store.child.wait();
        for w in writers {
            let _ = tokio::time::timeout(Duration::from_secs(20), w).await;
        }
        assert!(
            ledger.lock().unwrap().count > 100 * (round + 1),
            "the load really ran"
        );
    }
    let store = start(&data, &log).await;
    check(&store.endpoint, &ledger, 3).await;
}

/// Every acknowledged key holds its acknowledged value and revision, unless the writer's next
/// (unacknowledged) write to that key landed.
async fn check(endpoint: &str, ledger: &Mutex<Ledger>, round: usize) {
    let c = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let resp = c
        .kv_client()
        .max_decoding_message_size(256 << 20)
        .get("crash/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let stored: HashMap<String, (String, i64)> = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                ),
            )
        })
        .collect();
    let l = ledger.lock().unwrap();
    let max_acked = l.acked.values().map(|(_, r)| *r).max().unwrap_or(0);
    assert!(
        resp.header().unwrap().revision() >= max_acked,
        "round {round}: the store went back in revisions"
    );
    for (key, (value, rev)) in &l.acked {
        let got = stored.get(key);
        let landed_later = l
            .in_flight
            .values()
            .any(|(k, v)| k == key && got.map(|g| &g.0) == Some(v));
        if landed_later {
            continue;
        }
        assert_eq!(
            got,
            Some(&(value.clone(), *rev)),
            "round {round}: acknowledged write to {key} lost"
        );
    }
}

#[test]
fn a_non_loopback_listen_address_is_refused_without_the_flag() {
    let out = Command::new(ARBOR)
        .args(["store", "--listen", "0.0.0.0:0"])
        .output()
        .expect("run arbor store");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0")
            && stderr.contains("--allow-non-loopback"),
        "{stderr}"
    );
}

/// Where each frame (`len: u32 LE | crc: u32 LE | payload`) of a log segment starts.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut pos = 0;
    while pos + 8 <= bytes.len() {
        starts.push(pos);
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        pos += 8 + len;
    }
    assert_eq!(pos, bytes.len(), "the log ends on a frame boundary");
    starts
}

fn log_segment(data: &Path) -> std::path::PathBuf {
    std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("wal-") && n.ends_with(".log"))
        })
        .expect("a log segment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_corrupt_in_the_middle_refuses_to_start_and_a_torn_tail_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("store.log");
    {
        let store = start(&data, &log).await;
        let mut c = etcd_client::Client::connect([&store.endpoint], None)
            .await
            .unwrap();
        for i in 0..6 {
            c.put(format!("wal/{i}"), format!("value-{i}"), None)
                .await
                .unwrap();
        }
        // Dropped: SIGKILL. Every acknowledged write is in the log.
    }
    let seg = log_segment(&data);
    let intact = std::fs::read(&seg).unwrap();
    let starts = frame_starts(&intact);
    assert!(starts.len() >= 6, "{} records", starts.len());

    // One byte of a record in the middle flips.
    let mid = starts[starts.len() / 2];
    let mut corrupt = intact.clone();
    corrupt[mid + 8 + 2] ^= 0x20;
    std::fs::write(&seg, &corrupt).unwrap();
    let mut child = Command::new(ARBOR)
        .args([
            "store",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start arbor store");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("arbor store started on a log corrupt in the middle");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit {status}: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is corrupt at byte offset {mid}",
            seg.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        corrupt,
        "the corrupt log was changed"
    );

    // A torn tail instead (half a record after the last one): truncated, and every write is
    // there.
    let mut torn = intact.clone();
    torn.extend_from_slice(&intact[starts[1]..starts[1] + 11]);
    std::fs::write(&seg, &torn).unwrap();
    let store = start(&data, &log).await;
    let mut c = etcd_client::Client::connect([&store.endpoint], None)
        .await
        .unwrap();
    for i in 0..6 {
        let resp = c.get(format!("wal/{i}"), None).await.unwrap();
        assert_eq!(
            resp.kvs().first().map(|kv| kv.value().to_vec()),
            Some(format!("value-{i}").into_bytes())
        );
    }
    drop(store);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("dropped a torn record (11 bytes)"),
        "{logged}"
    );
}

const ETCDCTL: &str = "/usr/bin/etcdctl";

fn etcdctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(ETCDCTL)
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--command-timeout=10s")
        .args(args)
        .output()
        .expect("run /usr/bin/etcdctl")
}

/// Everything a client can see of a store: every live key with its versions and lease, the
/// revision, the compaction point (by what a read there answers), the leases with their TTLs
/// and keys, and the history a watch replays.
#[derive(Debug, PartialEq)]
struct Seen {
    revision: i64,
    kvs: Vec<(String, String, i64, i64, i64, i64)>,
    at_compaction: Vec<(String, String)>,
    before_compaction: Option<tonic::Code>,
    leases: Vec<(i64, i64, Vec<String>)>,
    history: Vec<(i32, String, i64)>,
}

async fn seen(endpoint: &str, compacted: i64) -> Seen {
    use etcd_client::{GetOptions, LeaseTimeToLiveOptions, WatchOptions};
    let mut c = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let all = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let kvs = all
        .kvs()
        .iter()
        .map(|kv| {
            (
                s(kv.key()),
                s(kv.value()),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect();
    let at = c
        .get(
            "",
            Some(GetOptions::new().with_all_keys().with_revision(compacted)),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| (s(kv.key()), s(kv.value())))
        .collect();
    let before = c
        .get(
            "",
            Some(
                GetOptions::new()
                    .with_all_keys()
                    .with_revision(compacted - 1),
            ),
        )
        .await
        .err()
        .map(|e| match e {
            etcd_client::Error::GRpcStatus(st) => st.code(),
            other => panic!("{other:?}"),
        });
    let mut leases = Vec::new();
    for l in c.leases().await.unwrap().leases() {
        let ttl = c
            .lease_time_to_live(l.id(), Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await
            .unwrap();
        leases.push((
            l.id(),
            ttl.granted_ttl(),
            ttl.keys().iter().map(|k| s(k)).collect(),
        ));
    }
    leases.sort();
    let revision = all.header().unwrap().revision();
    let mut w = c
        .watch(
            "",
            Some(
                WatchOptions::new()
                    .with_all_keys()
                    .with_start_revision(compacted),
            ),
        )
        .await
        .unwrap();
    let mut history = Vec::new();
    while history.last().map(|(_, _, r)| *r) != Some(revision) {
        let resp = tokio::time::timeout(Duration::from_secs(20), w.message())
            .await
            .expect("the history within 20s")
            .unwrap()
            .unwrap();
        assert!(!resp.canceled(), "{resp:?}");
        for e in resp.events() {
            let kv = e.kv().unwrap();
            history.push((e.event_type() as i32, s(kv.key()), kv.mod_revision()));
        }
    }
    Seen {
        revision,
        kvs,
        at_compaction: at,
        before_compaction: before,
        leases,
        history,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_save_then_restore_then_start_gives_back_every_key_revision_and_lease() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("store.log");
    let store = start(&dir.path().join("data"), &log).await;
    let mut c = etcd_client::Client::connect([&store.endpoint], None)
        .await
        .unwrap();
    let long = c.lease_grant(600, None).await.unwrap().id();
    let short = c.lease_grant(90, None).await.unwrap().id();
    c.lease_grant(300, None).await.unwrap();
    for i in 0..300 {
        let lease = match i % 10 {
            0 => Some(etcd_client::PutOptions::new().with_lease(long)),
            1 => Some(etcd_client::PutOptions::new().with_lease(short)),
            _ => None,
        };
        c.put(format!("k/{i:03}"), format!("v{i}"), lease)
            .await
            .unwrap();
    }
    for i in 0..50 {
        c.put(format!("k/{i:03}"), format!("again {i}"), None)
            .await
            .unwrap();
    }
    let compacted = c
        .delete("k/299", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.compact(compacted, None).await.unwrap();
    for i in 100..120 {
        c.delete(format!("k/{i:03}"), None).await.unwrap();
        c.put(format!("k/{i:03}"), "reborn", None).await.unwrap();
    }
    let before = seen(&store.endpoint, compacted).await;
    assert_eq!(before.before_compaction, Some(tonic::Code::OutOfRange));
    assert_eq!(before.leases.len(), 3);
    let ids = c.status().await.unwrap().header().unwrap().cluster_id();

    let file = dir.path().join("backup.snap");
    let out = etcdctl(
        &store.endpoint,
        &["snapshot", "save", file.to_str().unwrap()],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(said, format!("Snapshot saved at {}\n", file.display()));
    drop(store);

    let restored = dir.path().join("restored");
    let out = Command::new(ARBOR)
        .args(["store", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&restored)
        .output()
        .expect("run arbor store restore");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.starts_with(&format!(
            "restored {} into {}: revision {}",
            file.display(),
            restored.display(),
            before.revision
        )) && said.contains(&format!("{} keys, 3 leases", before.kvs.len())),
        "{said}"
    );
    let store = start(&restored, &log).await;
    assert_eq!(seen(&store.endpoint, compacted).await, before);
    let mut c = etcd_client::Client::connect([&store.endpoint], None)
        .await
        .unwrap();
    let header = c.status().await.unwrap().header().unwrap().clone();
    assert_ne!(header.cluster_id(), ids, "a restored store is a new store");
    // It takes writes from where the snapshot left off.
    let next = c.put("after", "restore", None).await.unwrap();
    assert_eq!(next.header().unwrap().revision(), before.revision + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_corrupted_snapshot_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = start(&dir.path().join("data"), &dir.path().join("store.log")).await;
    let mut c = etcd_client::Client::connect([&store.endpoint], None)
        .await
        .unwrap();
    for i in 0..100 {
        c.put(format!("k/{i}"), "v".repeat(100), None)
            .await
            .unwrap();
    }
    let file = dir.path().join("good.snap");
    assert!(
        etcdctl(
            &store.endpoint,
            &["snapshot", "save", file.to_str().unwrap()]
        )
        .status
        .success()
    );
    let good = std::fs::read(&file).unwrap();
    let restore = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let target = dir.path().join(format!("{name}.data"));
        let out = Command::new(ARBOR)
            .args(["store", "restore"])
            .arg(&path)
            .arg("--data-dir")
            .arg(&target)
            .output()
            .expect("run arbor store restore");
        assert_eq!(out.status.code(), Some(1), "{name} restored");
        assert!(!target.exists(), "{name}: nothing is created");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let half = restore("half", &good[..good.len() / 2]);
    assert!(
        half.contains("half cannot be restored: truncated: the header announces"),
        "{half}"
    );
    let tail = restore("tail", &good[..good.len() - 10]);
    assert!(
        tail.contains("truncated: the file ends inside its checksum trailer"),
        "{tail}"
    );
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 1;
    let corrupt = restore("flipped", &flipped);
    assert!(
        corrupt.contains("corrupt: its sha256 does not match"),
        "{corrupt}"
    );
    let mut bolt = vec![0u8; 8192];
    bolt[16..20].copy_from_slice(&0xED0C_DAEDu32.to_le_bytes());
    let etcd = restore("etcd", &bolt);
    assert!(
        etcd.contains("this is an etcd snapshot (a bbolt database)"),
        "{etcd}"
    );
    // A data dir is never overwritten.
    let taken = dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("x"), "x").unwrap();
    let out = Command::new(ARBOR)
        .args(["store", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(&taken)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_flag_sets_the_space_quota() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("store.log");
    let store = start_with(
        &dir.path().join("data"),
        &log,
        &["--quota-backend-bytes", "100000"],
    )
    .await;
    let mut c = etcd_client::Client::connect([&store.endpoint], None)
        .await
        .unwrap();
    c.put("small", "fits", None).await.unwrap();
    let err = c.put("large", "x".repeat(120_000), None).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("etcdserver: mvcc: database space exceeded"),
        "{err}"
    );
    let metrics = http_get(&store.endpoint, "/metrics").await;
    assert!(
        metrics.contains("\netcd_server_quota_backend_bytes 100000\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\narbor_store_alarm{alarm=\"NOSPACE\"} 1\n"),
        "{metrics}"
    );
    drop(store);
    // The alarm is kept across a restart, until disarmed.
    let store = start_with(
        &dir.path().join("data"),
        &log,
        &["--quota-backend-bytes=-1"],
    )
    .await;
    let mut c = etcd_client::Client::connect([&store.endpoint], None)
        .await
        .unwrap();
    assert!(
        c.put("small", "again", None).await.is_err(),
        "NOSPACE still raised"
    );
    let out = etcdctl(&store.endpoint, &["alarm", "disarm"]);
    assert!(out.status.success());
    c.put("large", "x".repeat(120_000), None).await.unwrap();
    let metrics = http_get(&store.endpoint, "/metrics").await;
    assert!(
        metrics.contains("\netcd_server_quota_backend_bytes -1\n"),
        "no quota: {metrics}"
    );
}

/// GET over plain HTTP/1.1 (the store serves it beside gRPC), the body as text.
async fn http_get(endpoint: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    reply
}
