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
