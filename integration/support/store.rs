//! Stores for the store tests to run against: the embedded store (in this process, on a free
//! loopback port) and a real etcd (Debian's /usr/bin/etcd, on free loopback ports with a temp
//! data dir, killed when the handle drops, also when a test fails).

#![allow(dead_code)]

use arbor::store::{Options, Store, StoreConfig};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const ETCD: &str = "/usr/bin/etcd";

/// How often watches with progress_notify hear from either store in tests.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

pub enum Kind {
    Embedded {
        shutdown: CancellationToken,
        done: tokio::task::JoinHandle<()>,
    },
    Etcd {
        child: Child,
    },
    /// A relay's store front (arbor::store::relay_front) over another store, sharing watches
    /// on every key.
    Front {
        under: Box<TestStore>,
        shutdown: CancellationToken,
    },
}

/// A running store; dropping it stops it.
pub struct TestStore {
    /// `http://127.0.0.1:port`
    pub endpoint: String,
    pub kind: Kind,
    pub dir: tempfile::TempDir,
}

impl TestStore {
    pub fn name(&self) -> &'static str {
        match &self.kind {
            Kind::Embedded { .. } => "embedded",
            Kind::Etcd { .. } => "etcd",
            Kind::Front { under, .. } if under.is_etcd() => "front over etcd",
            Kind::Front { .. } => "front over embedded",
        }
    }

    /// Whether the store that answers is a real etcd (directly or behind a front).
    pub fn is_etcd(&self) -> bool {
        match &self.kind {
            Kind::Etcd { .. } => true,
            Kind::Front { under, .. } => under.is_etcd(),
            Kind::Embedded { .. } => false,
        }
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.endpoint], None)
            .await
            .expect("connect to the test store")
    }

    /// Stops an embedded store and waits until it has let go of its data dir.
    pub async fn stop(mut self) {
        match &mut self.kind {
            Kind::Embedded { shutdown, done } => {
                shutdown.cancel();
                let _ = done.await;
            }
            Kind::Front { shutdown, under } => {
                shutdown.cancel();
                if let Kind::Embedded { shutdown, done } = &mut under.kind {
                    shutdown.cancel();
                    let _ = done.await;
                }
            }
            Kind::Etcd { .. } => {}
        }
    }
}

/// A relay's store front on a free loopback port over `under`, sharing watches on every key.
pub async fn front(under: TestStore) -> TestStore {
    use arbor::store::relay_front::{FrontConfig, FrontListener, serve_on};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the front");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let upstream = tonic::transport::Endpoint::from_shared(under.endpoint.clone())
        .expect("endpoint")
        .connect_lazy();
    let shutdown = CancellationToken::new();
    let config = FrontConfig {
        shared_prefixes: vec![Vec::new()],
        credential: None,
        users: Default::default(),
        holds: Default::default(),
    };
    serve_on(
        FrontListener::Tcp(listener),
        upstream,
        config,
        shutdown.clone(),
    )
    .await
    .expect("start the front");
    TestStore {
        endpoint,
        kind: Kind::Front {
            under: Box::new(under),
            shutdown,
        },
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        match &mut self.kind {
            Kind::Front { shutdown, .. } => shutdown.cancel(),
            Kind::Embedded { shutdown, .. } => shutdown.cancel(),
            Kind::Etcd { child } => {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Children of a test must not outlive it, even when the test process is killed outright
/// (Drop does not run then): the kernel sends them SIGKILL when the spawning thread ends.
pub trait DieWithParent {
    fn die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    fn die_with_parent(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn test_options(data_dir: Option<PathBuf>) -> Options {
    Options {
        data_dir,
        progress_notify_interval: PROGRESS_INTERVAL,
        ..Options::default()
    }
}

/// The embedded store, in memory, in this process.
pub async fn embedded() -> TestStore {
    embedded_with(None).await
}

/// The embedded store persisting in `data_dir` (a fresh temp dir's subdir if `None` is given,
/// the store lives in memory).
pub async fn embedded_with(data_dir: Option<&Path>) -> TestStore {
    embedded_listening("127.0.0.1:0", test_options(data_dir.map(Path::to_path_buf))).await
}

/// The embedded store in memory with a space quota of `quota` bytes.
pub async fn embedded_with_quota(quota: u64) -> TestStore {
    let options = Options {
        quota_bytes: Some(quota),
        ..test_options(None)
    };
    embedded_listening("127.0.0.1:0", options).await
}

/// A real etcd with a space quota of `quota` bytes.
pub async fn etcd_with_quota(quota: u64) -> TestStore {
    etcd_with(&[&format!("--quota-backend-bytes={quota}")]).await
}

pub async fn embedded_listening(listen: &str, options: Options) -> TestStore {
    let config = StoreConfig {
        listen: listen.to_string(),
        data_dir: options.data_dir.clone(),
        allow_non_loopback: false,
    };
    let store = Store::bind_with(&config, options)
        .await
        .expect("start the embedded store");
    let endpoint = store.endpoint().to_string();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let done = tokio::spawn(async move {
        if let Err(e) = store.serve(token).await {
            eprintln!("embedded store: {e:#}");
        }
    });
    TestStore {
        endpoint,
        kind: Kind::Embedded { shutdown, done },
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

/// A real etcd 3.4 on free loopback ports, with a temp data dir.
pub async fn etcd() -> TestStore {
    etcd_with(&[]).await
}

/// [`etcd`] with more flags (`--quota-backend-bytes=...`).
pub async fn etcd_with(args: &[&str]) -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client_port, peer_port) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log file");
    let child = Command::new(ETCD)
        .arg("--name=test")
        .arg(format!("--data-dir={}", dir.path().join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=test={peer_url}"))
        .arg(format!(
            "--experimental-watch-progress-notify-interval={}ms",
            PROGRESS_INTERVAL.as_millis()
        ))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .die_with_parent()
        .spawn()
        .expect("start /usr/bin/etcd (Debian's etcd-server)");
    let store = TestStore {
        endpoint: client_url,
        kind: Kind::Etcd { child },
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([&store.endpoint], None).await
            && c.status().await.is_ok()
        {
            return store;
        }
        assert!(
            Instant::now() < deadline,
            "etcd did not come up; see its log"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gRPC status of a failed call.
pub fn status(e: etcd_client::Error) -> tonic::Status {
    match e {
        etcd_client::Error::GRpcStatus(s) => s,
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

/// A TCP proxy on loopback to `to` (host:port), counting the bytes that come back from it
/// (`down`) and go to it (`up`), until `stop`: a relay's uplink, measured. Its address first.
pub async fn counting_proxy(
    to: &str,
    stop: CancellationToken,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (down, up) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (to, d, u) = (to.to_string(), down.clone(), up.clone());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stop.cancelled() => return,
            };
            let Ok((client, _)) = accepted else { return };
            let Ok(server) = tokio::net::TcpStream::connect(&to).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, u.clone(), stop.clone()));
            tokio::spawn(pump(sr, cw, d.clone(), stop.clone()));
        }
    });
    (addr, down, up)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => n,
            () = stop.cancelled() => return,
        };
        match n {
            Ok(n) if n > 0 => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                counter.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            _ => return,
        }
    }
}
