//! `arbor store` as a process: kill -9 in the middle of a write load loses no acknowledged
//! write, and the listen address policy holds.

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
