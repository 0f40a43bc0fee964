//! The node loop: every arbor process in a run, at every depth, is a node. Its parent link is
//! the operator's terminal (the initiator) or the stdin/stdout of the SSH exec channel its
//! parent opened (a relay or leaf). It stages its children with one code path (`stage`).

pub mod child;
pub mod fleet;
pub mod initiator;
pub mod parent;
pub mod relay;
pub mod stage;

/// Sleeps until `deadline`, or forever without one (for an optional arm of `select!`).
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The engine's next status, if there is an engine (forever pending otherwise); `None` once
/// the engine is gone.
pub(crate) async fn next_status(
    status: &mut Option<tokio::sync::watch::Receiver<crate::engine::host::Status>>,
) -> Option<crate::engine::host::Status> {
    match status {
        Some(rx) => {
            if rx.changed().await.is_err() {
                *status = None;
                return None;
            }
            Some(rx.borrow_and_update().clone())
        }
        None => std::future::pending().await,
    }
}

/// The store named by --seeds: `unix:PATH`, or URLs where a bare `host:port` means
/// `http://host:port` (how the tunnel end of a TCP forward is written).
pub(crate) fn seed_endpoints(seeds: &[String]) -> Result<crate::store::client::Endpoints, String> {
    let first = seeds.first().ok_or("no store endpoint (--seeds)")?;
    if first.starts_with("unix:") {
        return crate::store::client::Endpoints::parse(first).map_err(|e| format!("{e:#}"));
    }
    let urls: Vec<String> = seeds
        .iter()
        .map(|s| {
            if s.starts_with("http://") {
                s.clone()
            } else {
                format!("http://{s}")
            }
        })
        .collect();
    crate::store::client::Endpoints::parse(&urls.join(",")).map_err(|e| format!("{e:#}"))
}

/// Connects each child's store tunnel to `endpoints` (its first URL for a cluster).
pub(crate) async fn store_connector(
    endpoints: &crate::store::client::Endpoints,
) -> Result<std::sync::Arc<dyn crate::ssh::Connector>, String> {
    use crate::store::client::Endpoints;
    match endpoints {
        Endpoints::Unix(path) => Ok(crate::ssh::forward::to_unix(path.clone())),
        Endpoints::Http(urls) => {
            let first = urls
                .first()
                .map(|u| u.trim_start_matches("http://"))
                .ok_or("no store endpoint")?;
            let addr = tokio::net::lookup_host(first)
                .await
                .map_err(|e| format!("store endpoint {first}: {e}"))?
                .next()
                .ok_or_else(|| format!("store endpoint {first}: no address"))?;
            Ok(crate::ssh::forward::to_tcp(addr))
        }
    }
}
