//! Authentication: the keys named for the host first (`--identity`, the topology's `identity:`,
//! ssh_config's `IdentityFile`s: from the agent when it holds them, else from the file), then
//! the agent's other keys and the default key files (not with `IdentitiesOnly`), then a
//! password from the target URL, then prompts (only when the user allowed interactive prompts).
//!
//! Named keys come before the agent's other keys, unlike OpenSSH (which tries agent keys
//! first, then files not in the agent): an agent holding more keys than the server's
//! `MaxAuthTries` (6 by default) would otherwise lock the right key out.
//!
//! RSA keys always sign with rsa-sha2-256/512; a server that only takes SHA-1 signatures is
//! refused rather than downgraded.

use super::error::{Cause, Result, SshError, Step};
use super::session::ClientHandler;
use russh::client::{AuthResult, Handle, KeyboardInteractiveAuthResponse};
use russh::keys::agent::client::AgentClient;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Answers questions only a person can: passphrases, passwords, keyboard-interactive prompts.
/// Called from a blocking thread, so an implementation may read a terminal.
pub trait Prompter: Send + Sync {
    fn passphrase(&self, key: &Path) -> Option<String>;
    fn password(&self, user: &str, host: &str) -> Option<String>;
    /// One answer per prompt; `(text, echo)` pairs.
    fn keyboard_interactive(
        &self,
        host: &str,
        instructions: &str,
        prompts: &[(String, bool)],
    ) -> Option<Vec<String>>;
}

/// The agent socket arbor took from its environment at start ([`take_agent_socket`]).
static AGENT_SOCKET: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Takes SSH_AUTH_SOCK out of this process's environment and keeps it for arbor's own use, so
/// the commands graphs run never see an agent socket. Call it first thing in `main`, before
/// any thread starts.
pub fn take_agent_socket() {
    let socket = std::env::var_os("SSH_AUTH_SOCK")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    // SAFETY: called from `main` before the runtime or any other thread exists, so nothing
    // reads the environment concurrently.
    unsafe { std::env::remove_var("SSH_AUTH_SOCK") };
    let _ = AGENT_SOCKET.set(socket);
}

/// The agent socket of the SSH connection a parent re-attached through
/// ([`set_agent_socket`]): it replaces the one taken at start, which went with the old
/// connection.
static REATTACHED_AGENT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// A parent re-attached this node over a new SSH connection whose forwarded agent is at
/// `socket` (crate::node::reattach): [`agent_socket`] names it from now on.
pub fn set_agent_socket(socket: PathBuf) {
    *REATTACHED_AGENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(socket);
}

/// The agent socket this process may use: the one of the connection a parent re-attached
/// through, else the one taken at start, or (when nothing was taken, as in tests)
/// SSH_AUTH_SOCK.
pub fn agent_socket() -> Option<PathBuf> {
    if let Some(socket) = REATTACHED_AGENT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        return Some(socket);
    }
    match AGENT_SOCKET.get() {
        Some(taken) => taken.clone(),
        None => std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
    }
}

/// Where agent identities come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentSource {
    /// The socket named by SSH_AUTH_SOCK when arbor started ([`agent_socket`]), if set.
    Env,
    /// A specific agent socket.
    Socket(PathBuf),
    /// No agent.
    None,
}

/// How to authenticate.
#[derive(Clone)]
pub struct AuthOptions {
    pub agent: AgentSource,
    /// Default key files (~/.ssh/id_ed25519, id_ecdsa, id_rsa), tried after the agent's keys;
    /// with `identities_only`, only when no key is named.
    pub default_identities: Vec<PathBuf>,
    /// Key files named for this host (--identity, the topology's, ssh_config's), tried first,
    /// in order: through the agent when it holds the key, else from the file.
    pub identities: Vec<PathBuf>,
    /// Public keys named for this host without a file here (a relay gets the initiator's
    /// IdentityFile keys this way): tried from the agent after `identities`.
    pub named_keys: Vec<PublicKey>,
    /// ssh_config `IdentitiesOnly yes`: no agent key but the named ones, no default files
    /// when keys are named.
    pub identities_only: bool,
    /// A password from the target URL or a topology (insecure: a warning is printed when it
    /// is used), or the one the operator gave for the run (`asked`).
    pub password: Option<String>,
    /// `password` was asked of the operator (`-k`) or read from `--password-file`.
    pub password_asked: bool,
    /// Set only with --allow-interactive.
    pub prompter: Option<Arc<dyn Prompter>>,
}

impl AuthOptions {
    pub fn for_home(home: &Path) -> Self {
        let ssh = home.join(".ssh");
        AuthOptions {
            agent: AgentSource::Env,
            default_identities: ["id_ed25519", "id_ecdsa", "id_rsa"]
                .iter()
                .map(|n| ssh.join(n))
                .collect(),
            identities: Vec::new(),
            named_keys: Vec::new(),
            identities_only: false,
            password: None,
            password_asked: false,
            prompter: None,
        }
    }
}

/// The public key of a key file: from `FILE.pub`, else from the private key file (an OpenSSH
/// key keeps its public half readable even when encrypted). `None` when neither is readable.
pub fn file_public_key(path: &Path) -> Option<PublicKey> {
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    std::fs::read_to_string(PathBuf::from(pub_path))
        .ok()
        .and_then(|t| PublicKey::from_openssh(t.trim()).ok())
        .or_else(|| {
            let text = std::fs::read_to_string(path).ok()?;
            PrivateKey::from_openssh(&text)
                .ok()
                .map(|k| k.public_key().clone())
        })
}

struct Attempts {
    tried: Vec<String>,
    allowed: Vec<String>,
}

impl Attempts {
    fn note_failure(&mut self, result: &AuthResult) {
        if let AuthResult::Failure {
            remaining_methods, ..
        } = result
        {
            self.allowed = remaining_methods
                .iter()
                .map(|m| <&'static str>::from(m).to_string())
                .collect();
        }
    }
}

pub(crate) async fn authenticate(
    handle: &mut Handle<ClientHandler>,
    label: &str,
    user: &str,
    options: &AuthOptions,
) -> Result<()> {
    let err = |cause: Cause| SshError::new(label.to_string(), Step::Auth, cause);
    let mut attempts = Attempts {
        tried: Vec::new(),
        allowed: Vec::new(),
    };
    let rsa_hash = handle
        .best_supported_rsa_hash()
        .await
        .map_err(|e| err(Cause::Protocol(e)))?
        .flatten();

    let mut agent = open_agent(handle, options, &mut attempts).await;
    // Keys already offered (by their public half), so none is offered twice.
    let mut offered: Vec<PublicKey> = Vec::new();
    let named = !options.identities.is_empty() || !options.named_keys.is_empty();
    // With IdentitiesOnly and nothing named, the default files are the named keys (as ssh).
    let defaults_named = !named && options.identities_only;
    let named_files: Vec<&PathBuf> = if defaults_named {
        options
            .default_identities
            .iter()
            .filter(|p| p.exists())
            .collect()
    } else {
        options.identities.iter().collect()
    };

    // 1. The named keys: through the agent when it holds them, else from their files.
    for path in named_files {
        let public = file_public_key(path);
        if let (Some(key), Some(agent)) = (&public, agent.as_mut())
            && agent.holds(key)
        {
            offered.push(key.clone());
            attempts
                .tried
                .push(format!("agent key of {}", path.display()));
            if agent
                .try_key(handle, user, key, rsa_hash, &mut attempts)
                .await
            {
                return Ok(());
            }
            if handle.is_closed() {
                return Err(err(closed(&attempts)));
            }
            continue;
        }
        if let Some(key) = public {
            offered.push(key);
        }
        match try_key_file(handle, label, user, path, options, rsa_hash, &mut attempts).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(_) if handle.is_closed() => return Err(err(closed(&attempts))),
            Err(cause) => return Err(err(cause)),
        }
        if handle.is_closed() {
            return Err(err(closed(&attempts)));
        }
    }
    for key in &options.named_keys {
        if offered.iter().any(|k| k.key_data() == key.key_data()) {
            continue;
        }
        offered.push(key.clone());
        let Some(agent) = agent.as_mut() else { break };
        if !agent.holds(key) {
            attempts.tried.push(format!(
                "named key {} (not in the agent)",
                super::known_hosts::fingerprint(key)
            ));
            continue;
        }
        attempts.tried.push(format!(
            "agent key {}",
            super::known_hosts::fingerprint(key)
        ));
        if agent
            .try_key(handle, user, key, rsa_hash, &mut attempts)
            .await
        {
            return Ok(());
        }
        if handle.is_closed() {
            return Err(err(closed(&attempts)));
        }
    }

    // 2. Unless IdentitiesOnly: the agent's other keys, then the default files.
    if !options.identities_only {
        if let Some(agent) = agent.as_mut() {
            let others: Vec<PublicKey> = agent
                .keys
                .iter()
                .filter(|k| !offered.iter().any(|o| o.key_data() == k.key_data()))
                .cloned()
                .collect();
            attempts
                .tried
                .push(format!("agent ({} keys)", others.len()));
            for key in others {
                offered.push(key.clone());
                if agent
                    .try_key(handle, user, &key, rsa_hash, &mut attempts)
                    .await
                {
                    return Ok(());
                }
                if handle.is_closed() {
                    return Err(err(closed(&attempts)));
                }
            }
        }
        let defaults = options
            .default_identities
            .iter()
            .filter(|p| p.exists() && !options.identities.contains(p));
        for path in defaults {
            if file_public_key(path)
                .is_some_and(|k| offered.iter().any(|o| o.key_data() == k.key_data()))
            {
                continue;
            }
            match try_key_file(handle, label, user, path, options, rsa_hash, &mut attempts).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(_) if handle.is_closed() => return Err(err(closed(&attempts))),
                Err(cause) => return Err(err(cause)),
            }
            if handle.is_closed() {
                return Err(err(closed(&attempts)));
            }
        }
    }
    if let Some(password) = &options.password {
        if options.password_asked {
            attempts.tried.push("password (-k)".into());
        } else {
            tracing::warn!(
                "{label}: using a password from the target URL; this is insecure (it may be in \
                 shell history and files): prefer keys"
            );
            attempts.tried.push("password from the URL".into());
        }
        let result = handle
            .authenticate_password(user, password)
            .await
            .map_err(|e| err(Cause::Protocol(e)))?;
        if result.success() {
            return Ok(());
        }
        attempts.note_failure(&result);
    }
    if let Some(prompter) = &options.prompter
        && try_prompts(handle, label, user, prompter.clone(), &mut attempts)
            .await
            .map_err(err)?
    {
        return Ok(());
    }
    let tried = if attempts.tried.is_empty() {
        "nothing (no agent, no key files, no password)".to_string()
    } else {
        attempts.tried.join(", ")
    };
    Err(err(Cause::AuthRefused {
        user: user.to_string(),
        tried,
        allowed: attempts.allowed,
    }))
}

/// The server hung up during authentication: most likely after too many failed keys.
fn closed(attempts: &Attempts) -> Cause {
    Cause::Other(format!(
        "the server closed the connection during authentication, most likely after too many \
         failed keys (sshd's MaxAuthTries, 6 by default); tried {}. Name the right key \
         (--identity, the topology's identity:, or IdentityFile in ssh_config): named keys are \
         tried first",
        attempts.tried.join(", ")
    ))
}

/// A connected agent and the keys it holds.
struct Agent {
    client: AgentClient<tokio::net::UnixStream>,
    keys: Vec<PublicKey>,
}

impl Agent {
    fn holds(&self, key: &PublicKey) -> bool {
        self.keys.iter().any(|k| k.key_data() == key.key_data())
    }

    /// Offers `key` and signs with the agent; true when the server accepted it.
    async fn try_key(
        &mut self,
        handle: &mut Handle<ClientHandler>,
        user: &str,
        key: &PublicKey,
        rsa_hash: Option<HashAlg>,
        attempts: &mut Attempts,
    ) -> bool {
        let hash = match key.algorithm() {
            Algorithm::Rsa { .. } => match rsa_hash {
                Some(h) => Some(h),
                None => return false, // never SHA-1
            },
            _ => None,
        };
        match handle
            .authenticate_publickey_with(user, key.clone(), hash, &mut self.client)
            .await
        {
            Ok(result) if result.success() => true,
            Ok(result) => {
                attempts.note_failure(&result);
                false
            }
            Err(e) => {
                tracing::debug!("agent signing failed: {e:?}");
                false
            }
        }
    }
}

/// Connects to the agent `options` names, binds it to this session and lists its keys.
async fn open_agent(
    handle: &Handle<ClientHandler>,
    options: &AuthOptions,
    attempts: &mut Attempts,
) -> Option<Agent> {
    let socket = match &options.agent {
        AgentSource::None => return None,
        AgentSource::Socket(path) => path.clone(),
        AgentSource::Env => agent_socket()?,
    };
    let mut agent = match AgentClient::connect_uds(&socket).await {
        Ok(agent) => agent,
        Err(e) => {
            tracing::debug!("agent at {}: {e}", socket.display());
            attempts
                .tried
                .push(format!("agent ({}: unreachable)", socket.display()));
            return None;
        }
    };
    // Tell the agent which server this is (OpenSSH's session-bind@openssh.com): an agent with
    // destination constraints, such as the one arbor fronts for relays, signs only then. An
    // agent that does not know the extension refuses it, and is used as before.
    if let Some(binding) = handle.agent_session_binding()
        && let Err(e) = agent.bind_session(binding, false).await
    {
        tracing::debug!("agent at {}: session-bind: {e:?}", socket.display());
    }
    match agent.request_identities().await {
        Ok(ids) => Some(Agent {
            client: agent,
            keys: ids
                .into_iter()
                .map(|id| id.public_key().into_owned())
                .collect(),
        }),
        Err(e) => {
            attempts.tried.push(format!("agent ({e})"));
            None
        }
    }
}

async fn try_key_file(
    handle: &mut Handle<ClientHandler>,
    label: &str,
    user: &str,
    path: &Path,
    options: &AuthOptions,
    rsa_hash: Option<HashAlg>,
    attempts: &mut Attempts,
) -> std::result::Result<bool, Cause> {
    let key = match load_key(path, options.prompter.clone()).await {
        Ok(Some(key)) => key,
        Ok(None) => {
            attempts
                .tried
                .push(format!("key {} (encrypted, no passphrase)", path.display()));
            return Ok(false);
        }
        Err(e) => {
            // An unreadable explicit identity is the user's mistake: say so and go on.
            tracing::warn!("{label}: cannot use key {}: {e}", path.display());
            attempts
                .tried
                .push(format!("key {} (unreadable)", path.display()));
            return Ok(false);
        }
    };
    let hash = match key.algorithm() {
        Algorithm::Rsa { .. } => match rsa_hash {
            Some(h) => Some(h),
            None => {
                attempts.tried.push(format!(
                    "key {} (skipped: server offers no rsa-sha2 signatures)",
                    path.display()
                ));
                return Ok(false);
            }
        },
        _ => None,
    };
    attempts.tried.push(format!("key {}", path.display()));
    let result = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
        .await?;
    if result.success() {
        return Ok(true);
    }
    attempts.note_failure(&result);
    Ok(false)
}

/// Loads a private key; for an encrypted key asks the prompter (if any) for the passphrase.
/// `Ok(None)` means encrypted and no passphrase available.
pub(crate) async fn load_key(
    path: &Path,
    prompter: Option<Arc<dyn Prompter>>,
) -> std::result::Result<Option<PrivateKey>, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| e.to_string())?;
    let key = PrivateKey::from_openssh(&text)
        .or_else(|_| russh::keys::decode_secret_key(&text, None))
        .map_err(|e| e.to_string())?;
    if !key.is_encrypted() {
        return Ok(Some(key));
    }
    let Some(prompter) = prompter else {
        return Ok(None);
    };
    // One question per key and run, however many hosts (and the agent for the relays) use
    // it: hosts that connect meanwhile wait for the answer instead of asking again.
    let mut decrypted = DECRYPTED.lock().await;
    let id = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(known) = decrypted.get(&id)
        && known.public_key().key_data() == key.public_key().key_data()
    {
        return Ok(Some(known.clone()));
    }
    let asked = path.to_path_buf();
    let passphrase = tokio::task::spawn_blocking(move || prompter.passphrase(&asked))
        .await
        .map_err(|e| e.to_string())?;
    let Some(passphrase) = passphrase else {
        return Ok(None);
    };
    let key = key
        .decrypt(passphrase.as_bytes())
        .map_err(|_| "wrong passphrase".to_string())?;
    decrypted.insert(id, key.clone());
    Ok(Some(key))
}

/// Keys decrypted in this process, by canonical path: a passphrase is asked once per run.
/// They stay in this process's memory only, as in an agent's.
static DECRYPTED: std::sync::LazyLock<
    tokio::sync::Mutex<std::collections::HashMap<std::path::PathBuf, PrivateKey>>,
> = std::sync::LazyLock::new(Default::default);

async fn try_prompts(
    handle: &mut Handle<ClientHandler>,
    label: &str,
    user: &str,
    prompter: Arc<dyn Prompter>,
    attempts: &mut Attempts,
) -> std::result::Result<bool, Cause> {
    attempts.tried.push("keyboard-interactive".into());
    let mut response = handle
        .authenticate_keyboard_interactive_start(user, None::<String>)
        .await?;
    loop {
        match response {
            KeyboardInteractiveAuthResponse::Success => return Ok(true),
            KeyboardInteractiveAuthResponse::Failure {
                remaining_methods, ..
            } => {
                attempts.allowed = remaining_methods
                    .iter()
                    .map(|m| <&'static str>::from(m).to_string())
                    .collect();
                break;
            }
            KeyboardInteractiveAuthResponse::InfoRequest {
                instructions,
                prompts,
                ..
            } => {
                let asked: Vec<(String, bool)> =
                    prompts.into_iter().map(|p| (p.prompt, p.echo)).collect();
                let p = prompter.clone();
                let host = label.to_string();
                let answers = tokio::task::spawn_blocking(move || {
                    p.keyboard_interactive(&host, &instructions, &asked)
                })
                .await
                .map_err(|e| Cause::Other(e.to_string()))?;
                let Some(answers) = answers else {
                    return Ok(false);
                };
                response = handle
                    .authenticate_keyboard_interactive_respond(answers)
                    .await?;
            }
        }
    }
    attempts.tried.push("password prompt".into());
    let p = prompter.clone();
    let (u, h) = (user.to_string(), label.to_string());
    let password = tokio::task::spawn_blocking(move || p.password(&u, &h))
        .await
        .map_err(|e| Cause::Other(e.to_string()))?;
    let Some(password) = password else {
        return Ok(false);
    };
    let result = handle.authenticate_password(user, password).await?;
    if !result.success() {
        attempts.note_failure(&result);
    }
    Ok(result.success())
}
