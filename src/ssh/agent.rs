//! An SSH agent inside this process, for relays to sign with the initiator's keys when no
//! ssh-agent runs here. It holds only the keys this run loaded, lives as long as the run, and is
//! reachable only through the agent channels of the sessions it is attached to: the keys never
//! leave this process, only signatures do.

use super::agent_front::AgentBackend;
use super::auth::{AuthOptions, load_key};
use russh::keys::agent::client::AgentClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Loads the key files `auth` would try (defaults that exist, then --identity), skipping any
/// that cannot be read or stay encrypted, and serves them as an agent; returns it and how
/// many keys it holds. Relays reach it only through `agent_front`.
pub async fn from_key_files(auth: &AuthOptions) -> Result<(AgentBackend, usize), String> {
    let mut keys = Vec::new();
    let files = auth
        .default_identities
        .iter()
        .filter(|p| p.exists())
        .chain(auth.identities.iter());
    for path in files {
        match load_key(path, auth.prompter.clone()).await {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => tracing::warn!(
                "{}: encrypted and no passphrase available; relays cannot sign with it",
                path.display()
            ),
            Err(e) => tracing::warn!("{}: {e}", path.display()),
        }
    }
    let count = keys.len();

    let (tx, rx) = mpsc::unbounded_channel::<std::io::Result<tokio::io::DuplexStream>>();
    tokio::spawn(async move {
        let _ = russh::keys::agent::server::serve(UnboundedReceiverStream::new(rx), ()).await;
    });
    // Load the keys through the agent protocol itself, on a private connection.
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tx.send(Ok(theirs))
        .map_err(|_| "the in-process agent did not start".to_string())?;
    let mut client = AgentClient::connect(ours);
    for key in &keys {
        client
            .add_identity(key, &[])
            .await
            .map_err(|e| format!("loading a key into the in-process agent: {e}"))?;
    }
    drop(client);

    Ok((AgentBackend::InProcess(tx), count))
}
