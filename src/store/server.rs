//! Serving the store: where it listens, who may reach it, and how it stops.
//!
//! The store has no authentication, so by default it only listens where nothing but this
//! machine can reach it: a loopback address, or a Unix socket (created 0600). Any other address
//! needs `allow_non_loopback`.

use super::authority::FixAuthority;
use super::backend::{Backend, Options};
use super::http::{Front, FrontLayer};
use super::kv::{GRPC_OVERHEAD_BYTES, KvService, MAX_REQUEST_BYTES};
use super::lease::LeaseService;
use super::maintenance::{ClusterService, MaintenanceService};
use super::watch::WatchService;
use anyhow::{Context, bail};
use etcd_client::proto::{
    PbClusterServer, PbKvServer, PbLeaseServer, PbMaintenanceServer, PbWatchServer,
};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;

/// What `arbor store` was asked to do, as plain data.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `host:port` or `unix:PATH`.
    pub listen: String,
    /// Where the store persists; `None` keeps it in memory.
    pub data_dir: Option<PathBuf>,
    /// Listen on an address other hosts can reach.
    pub allow_non_loopback: bool,
}

/// A parsed listen address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(s: &str) -> anyhow::Result<ListenAddr> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                bail!("listen address {s:?}: no socket path after unix:");
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if !s.contains(':') {
            bail!("listen address {s:?}: expected host:port or unix:PATH");
        }
        Ok(ListenAddr::Tcp(s.to_string()))
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A store bound to its address, not yet serving.
pub struct Store {
    backend: Arc<Backend>,
    listener: Listener,
    endpoint: String,
}

impl Store {
    /// Opens the store (replaying its data dir) and binds its address.
    pub async fn bind(config: &StoreConfig) -> anyhow::Result<Store> {
        let options = Options {
            data_dir: config.data_dir.clone(),
            ..Options::default()
        };
        Self::bind_with(config, options).await
    }

    /// [`Store::bind`] with every knob of the store's policy exposed (tests use short ones).
    pub async fn bind_with(config: &StoreConfig, options: Options) -> anyhow::Result<Store> {
        let listen = ListenAddr::parse(&config.listen)?;
        let listener = match &listen {
            ListenAddr::Tcp(addr) => {
                Listener::Tcp(bind_tcp(addr, config.allow_non_loopback).await?)
            }
            ListenAddr::Unix(path) => Listener::Unix(bind_unix(path)?, path.clone()),
        };
        let endpoint = match &listener {
            Listener::Tcp(l) => format!("http://{}", l.local_addr().context("local address")?),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        };
        let backend = Backend::open(options)?;
        Ok(Store {
            backend,
            listener,
            endpoint,
        })
    }

    /// How clients reach this store: `http://host:port` or `unix:PATH`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Serves until `shutdown` fires, then closes every stream and returns.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let limit = MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES;
        let b = &self.backend;
        // Clients behind a tunnel can vanish without a reset: probe idle connections so their
        // streams end instead of lingering.
        // HTTP/1.1 as well as HTTP/2, for /health, /metrics and the JSON gateway (curl, scripts);
        // the front sends everything that is not gRPC there.
        let front = Front::new(b.clone(), vec![self.endpoint.clone()]);
        let router = tonic::transport::Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(FrontLayer(front))
            .add_service(
                PbKvServer::new(KvService { backend: b.clone() }).max_decoding_message_size(limit),
            )
            .add_service(
                PbWatchServer::new(WatchService { backend: b.clone() })
                    .max_decoding_message_size(limit),
            )
            .add_service(
                PbLeaseServer::new(LeaseService { backend: b.clone() })
                    .max_decoding_message_size(limit),
            )
            .add_service(PbMaintenanceServer::new(MaintenanceService {
                backend: b.clone(),
            }))
            .add_service(PbClusterServer::new(ClusterService {
                backend: b.clone(),
                client_urls: vec![self.endpoint.clone()],
            }));
        let closing = b.closing();
        let signal = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                closing.cancel();
            }
        };
        let served = async {
            match self.listener {
                Listener::Tcp(l) => {
                    // Small requests must not wait for Nagle's algorithm.
                    let incoming = TcpListenerStream::new(l).map(|s| {
                        s.map(|s| {
                            let _ = s.set_nodelay(true);
                            FixAuthority::new(s)
                        })
                    });
                    router.serve_with_incoming_shutdown(incoming, signal).await
                }
                Listener::Unix(l, ref path) => {
                    let r = router
                        .serve_with_incoming_shutdown(
                            UnixListenerStream::new(l).map(|s| s.map(FixAuthority::new)),
                            signal,
                        )
                        .await;
                    let _ = std::fs::remove_file(path);
                    r
                }
            }
        };
        // Streams end when the store closes; a client that keeps a connection open anyway does
        // not hold the process for more than a few seconds.
        let result = tokio::select! {
            r = served => r.context("serving the store"),
            () = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(5)).await } => {
                tracing::warn!("store: clients still connected after shutdown; closing anyway");
                Ok(())
            }
        };
        self.backend.close().await;
        result
    }
}

/// What `arbor store` was asked to do.
#[derive(Debug, Clone)]
pub enum StoreCommand {
    /// Serve until stopped.
    Serve {
        config: StoreConfig,
        /// The space quota; `None` for none.
        quota_bytes: Option<u64>,
    },
    /// Make a new data dir from a snapshot file, then exit.
    Restore {
        snapshot: PathBuf,
        data_dir: PathBuf,
    },
}

/// Runs `arbor store` (serving until `shutdown` fires) or `arbor store restore`.
pub async fn run(command: StoreCommand, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, quota_bytes) = match command {
        StoreCommand::Serve {
            config,
            quota_bytes,
        } => (config, quota_bytes),
        StoreCommand::Restore { snapshot, data_dir } => {
            let restored = super::restore::restore(&snapshot, &data_dir)?;
            println!(
                "restored {} into {}: {restored}",
                snapshot.display(),
                data_dir.display()
            );
            return Ok(());
        }
    };
    let options = Options {
        data_dir: config.data_dir.clone(),
        quota_bytes,
        ..Options::default()
    };
    let store = Store::bind_with(&config, options).await?;
    match &config.data_dir {
        Some(dir) => tracing::info!(
            "store: serving {} (data in {})",
            store.endpoint(),
            dir.display()
        ),
        None => tracing::info!("store: serving {} (in memory)", store.endpoint()),
    }
    store.serve(shutdown).await
}

async fn bind_tcp(addr: &str, allow_non_loopback: bool) -> anyhow::Result<TcpListener> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving listen address {addr}"))?
        .collect();
    if !allow_non_loopback && let Some(open) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        bail!(
            "refusing to listen on {addr} ({}): it is not a loopback address, and the store has \
             no authentication; pass --allow-non-loopback to listen there anyway",
            open.ip()
        );
    }
    // localhost may resolve to ::1 and 127.0.0.1; prefer IPv4, which every client tries.
    let chosen = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .with_context(|| format!("listen address {addr} resolves to nothing"))?;
    TcpListener::bind(chosen)
        .await
        .with_context(|| format!("listening on {chosen}"))
}

fn bind_unix(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            );
        }
        // A socket left by a store that died; a live one would still hold its data dir lock.
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            ListenAddr::parse("unix:/run/a.sock").unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("127.0.0.1:2379").unwrap(),
            ListenAddr::Tcp("127.0.0.1:2379".into())
        );
        assert!(ListenAddr::parse("unix:").is_err());
        assert!(ListenAddr::parse("localhost").is_err());
    }

    #[tokio::test]
    async fn non_loopback_addresses_are_refused_without_the_flag() {
        let err = bind_tcp("0.0.0.0:0", false).await.unwrap_err();
        assert!(err.to_string().contains("--allow-non-loopback"), "{err}");
        assert!(bind_tcp("0.0.0.0:0", true).await.is_ok());
        assert!(bind_tcp("127.0.0.1:0", false).await.is_ok());
    }
}
