//! A destination-constrained front for the operator's agent, as OpenSSH's agent restrictions
//! do it with `session-bind@openssh.com`: what a relay's forwarded agent channels reach.
//!
//! A relay authenticates to its children with the operator's keys, so its agent channels
//! must reach an agent; but a relay may be compromised, and what it can do with the agent is
//! exactly what this front allows:
//!
//! - `REQUEST_IDENTITIES`: answered (public keys only).
//! - `session-bind@openssh.com`: the client proves which server it is talking to. The server's
//!   host-key signature over the session id must verify, and the host key must be one the
//!   caller's [`Destinations`] allows (a host of the relay's own subtree). A host that offers
//!   a host certificate binds with the certificate: the signature is checked against the key
//!   it certifies, and the caller judges the certificate (its authority, principals and
//!   validity). The binding holds for the rest of this agent connection.
//! - `SIGN_REQUEST`: signed only if the data is an SSH user-authentication request
//!   (`publickey`, or `publickey-hostbound-v00@openssh.com` naming the bound host key) for the
//!   session this connection was bound to, and for the key asked about. A signature is thus
//!   usable only to log into an allowed host, on that one session.
//! - Everything else (adding or removing keys, locking, other extensions): refused.
//!
//! The front holds no keys: signatures come from the [`AgentBackend`] (the operator's
//! ssh-agent, or arbor's in-process agent), one connection per forwarded channel.

use super::forward::{Connector, ForwardedStream};
use russh::keys::PublicKey;
use russh::keys::ssh_key::Certificate;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const FAILURE: u8 = 5;
const SUCCESS: u8 = 6;
const REQUEST_IDENTITIES: u8 = 11;
const SIGN_REQUEST: u8 = 13;
const EXTENSION: u8 = 27;
const USERAUTH_REQUEST: u8 = 50;

/// The largest agent message the front reads (OpenSSH's agent uses 256 KiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// Where signatures really come from.
#[derive(Clone)]
pub enum AgentBackend {
    /// The operator's ssh-agent (`SSH_AUTH_SOCK`).
    Socket(PathBuf),
    /// arbor's in-process agent (`agent::from_key_files`).
    InProcess(mpsc::UnboundedSender<std::io::Result<tokio::io::DuplexStream>>),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl AgentBackend {
    async fn open(&self) -> std::io::Result<Box<dyn Stream>> {
        match self {
            AgentBackend::Socket(path) => {
                Ok(Box::new(tokio::net::UnixStream::connect(path).await?))
            }
            AgentBackend::InProcess(tx) => {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                tx.send(Ok(theirs))
                    .map_err(|_| std::io::Error::other("the in-process agent is gone"))?;
                Ok(Box::new(ours))
            }
        }
    }

    /// The backend unconstrained, for the initiator's own connections.
    pub fn connector(&self) -> Arc<dyn Connector> {
        let backend = self.clone();
        Arc::new(move |mut channel: ForwardedStream| {
            let backend = backend.clone();
            tokio::spawn(async move {
                if let Ok(mut agent) = backend.open().await {
                    let _ = tokio::io::copy_bidirectional(&mut channel, &mut agent).await;
                }
            });
        })
    }
}

/// What a server showed a relay as its identity in a session-bind.
pub enum HostKey {
    Plain(PublicKey),
    Certificate(Box<Certificate>),
}

/// Which server host keys (or host certificates) a relay may bind its agent connections to.
pub type Destinations = Arc<dyn Fn(&HostKey) -> bool + Send + Sync>;

/// Serves each forwarded agent channel through the front: see the module docs. `label` names
/// the relay in refusals.
pub fn constrained(
    backend: AgentBackend,
    allowed: Destinations,
    label: String,
) -> Arc<dyn Connector> {
    Arc::new(move |channel: ForwardedStream| {
        let (backend, allowed, label) = (backend.clone(), allowed.clone(), label.clone());
        tokio::spawn(async move {
            if let Err(e) = serve(channel, &backend, &allowed, &label).await {
                tracing::debug!("{label}: agent channel: {e}");
            }
        });
    })
}

/// Serves one agent connection through the front, as [`constrained`] does for each forwarded
/// channel, until the client closes it. The fuzzing entry point (`integration/fuzz`, target
/// `agent_front`): arbor itself goes through [`constrained`].
pub async fn serve_connection(
    channel: impl AsyncRead + AsyncWrite + Unpin,
    backend: &AgentBackend,
    allowed: &Destinations,
    label: &str,
) -> std::io::Result<()> {
    serve(channel, backend, allowed, label).await
}

/// A session this agent connection was bound to.
struct Binding {
    host_key: Vec<u8>,
    session_id: Vec<u8>,
}

async fn serve(
    mut channel: impl AsyncRead + AsyncWrite + Unpin,
    backend: &AgentBackend,
    allowed: &Destinations,
    label: &str,
) -> std::io::Result<()> {
    let mut binding: Option<Binding> = None;
    let mut upstream: Option<Box<dyn Stream>> = None;
    loop {
        let Some(message) = read_message(&mut channel).await? else {
            return Ok(());
        };
        let verdict = match message.first() {
            Some(&REQUEST_IDENTITIES) => Ok(()),
            Some(&EXTENSION) => match bind(&message[1..], allowed) {
                Ok(b) => {
                    binding = Some(b);
                    write_message(&mut channel, &[SUCCESS]).await?;
                    continue;
                }
                Err(why) => Err(why),
            },
            Some(&SIGN_REQUEST) => may_sign(&message[1..], binding.as_ref()),
            Some(other) => Err(format!("agent request type {other} is not allowed")),
            None => Err("empty agent request".to_string()),
        };
        if let Err(why) = verdict {
            tracing::warn!("{label}: refused an agent request: {why}");
            write_message(&mut channel, &[FAILURE]).await?;
            continue;
        }
        if upstream.is_none() {
            upstream = Some(backend.open().await?);
        }
        let Some(agent) = upstream.as_mut() else {
            continue;
        };
        write_message(agent, &message).await?;
        match read_message(agent).await? {
            Some(answer) => write_message(&mut channel, &answer).await?,
            None => return Ok(()),
        }
    }
}

/// Checks a `session-bind@openssh.com` extension: the host's signature over the session id
/// verifies, and the host key is an allowed destination.
fn bind(body: &[u8], allowed: &Destinations) -> Result<Binding, String> {
    let mut r = Reader(body);
    let name = r.string().ok_or("malformed extension")?;
    if name != b"session-bind@openssh.com" {
        return Err(format!(
            "agent extension {:?} is not allowed",
            String::from_utf8_lossy(name)
        ));
    }
    let host_key = r.string().ok_or("malformed session-bind")?;
    let session_id = r.string().ok_or("malformed session-bind")?;
    let signature = r.string().ok_or("malformed session-bind")?;
    let forwarding = r.byte().ok_or("malformed session-bind")?;
    if forwarding != 0 {
        return Err("a relay may not forward the agent further on its own".into());
    }
    // A certificate's blob starts like a plain key of its algorithm but is not one: tell
    // them apart by the algorithm name before decoding.
    let is_certificate = Reader(host_key)
        .string()
        .is_some_and(|alg| alg.ends_with(b"-cert-v01@openssh.com"));
    let (key, shown) = if is_certificate {
        let cert = Certificate::from_bytes(host_key)
            .map_err(|e| format!("session-bind host certificate: {e}"))?;
        let key = PublicKey::new(cert.public_key().clone(), "");
        (key, HostKey::Certificate(Box::new(cert)))
    } else {
        let key =
            PublicKey::from_bytes(host_key).map_err(|e| format!("session-bind host key: {e}"))?;
        (key.clone(), HostKey::Plain(key))
    };
    let signature = russh::keys::ssh_key::Signature::try_from(signature)
        .map_err(|e| format!("session-bind signature: {e}"))?;
    russh::keys::signature::Verifier::verify(&key, session_id, &signature)
        .map_err(|_| "session-bind: the host's signature over the session id does not verify")?;
    if !allowed(&shown) {
        let what = if is_certificate {
            "a host certificate for key"
        } else {
            "host key"
        };
        return Err(format!(
            "session-bind to {what} {}, which is not a host this relay may log into",
            super::known_hosts::fingerprint(&key)
        ));
    }
    Ok(Binding {
        host_key: host_key.to_vec(),
        session_id: session_id.to_vec(),
    })
}

/// Checks a sign request: user authentication, on the bound session, with the key asked for.
fn may_sign(body: &[u8], binding: Option<&Binding>) -> Result<(), String> {
    let binding = binding.ok_or("a signature without session-bind@openssh.com first")?;
    let mut r = Reader(body);
    let key_blob = r.string().ok_or("malformed sign request")?;
    let mut data = Reader(r.string().ok_or("malformed sign request")?);
    let session_id = data
        .string()
        .ok_or("the data to sign is not a user authentication")?;
    if session_id != binding.session_id {
        return Err("the data to sign is for another session than the one bound".into());
    }
    if data.byte() != Some(USERAUTH_REQUEST) {
        return Err("the data to sign is not a user authentication".into());
    }
    let _user = data.string().ok_or("malformed user authentication")?;
    let service = data.string().ok_or("malformed user authentication")?;
    let method = data.string().ok_or("malformed user authentication")?;
    if service != b"ssh-connection" {
        return Err("user authentication for another service".into());
    }
    if data.byte() != Some(1) {
        return Err("malformed user authentication".into());
    }
    let _algorithm = data.string().ok_or("malformed user authentication")?;
    let signed_key = data.string().ok_or("malformed user authentication")?;
    if signed_key != key_blob {
        return Err("the key in the request is not the key asked to sign".into());
    }
    match method {
        b"publickey" => {}
        b"publickey-hostbound-v00@openssh.com" => {
            let host_key = data.string().ok_or("malformed user authentication")?;
            if host_key != binding.host_key {
                return Err("the request names another host key than the one bound".into());
            }
        }
        _ => return Err("user authentication by another method than publickey".into()),
    }
    if !data.0.is_empty() {
        return Err("trailing bytes after the user authentication".into());
    }
    Ok(())
}

/// Reads SSH wire fields.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        if self.0.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]]) as usize;
        let rest = &self.0[4..];
        if rest.len() < len {
            return None;
        }
        let (s, rest) = rest.split_at(len);
        self.0 = rest;
        Some(s)
    }
}

async fn read_message(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "agent message of {len} bytes exceeds {MAX_MESSAGE}"
        )));
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).await?;
    Ok(Some(body))
}

async fn write_message(w: &mut (impl AsyncWrite + Unpin), body: &[u8]) -> std::io::Result<()> {
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::PrivateKey;
    use russh::keys::signature::Signer;
    use russh::keys::ssh_key::encoding::Encode;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn blob(key: &PublicKey) -> Vec<u8> {
        key.to_bytes().expect("blob")
    }

    /// A session-bind extension body as a client sends it, signed by `host`.
    fn session_bind(host: &PrivateKey, session_id: &[u8], forwarding: u8) -> Vec<u8> {
        session_bind_as(host, &blob(host.public_key()), session_id, forwarding)
    }

    /// The same, with `shown` as the host key blob (a certificate of `host`'s key, say).
    fn session_bind_as(
        host: &PrivateKey,
        shown: &[u8],
        session_id: &[u8],
        forwarding: u8,
    ) -> Vec<u8> {
        let signature: russh::keys::ssh_key::Signature = host.try_sign(session_id).expect("sign");
        let mut body = Vec::new();
        string(&mut body, b"session-bind@openssh.com");
        string(&mut body, shown);
        string(&mut body, session_id);
        let sig_blob = signature.encode_vec().expect("signature blob");
        string(&mut body, &sig_blob);
        body.push(forwarding);
        body
    }

    fn userauth(
        session_id: &[u8],
        user_key: &[u8],
        method: &[u8],
        host_key: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut data = Vec::new();
        string(&mut data, session_id);
        data.push(USERAUTH_REQUEST);
        string(&mut data, b"root");
        string(&mut data, b"ssh-connection");
        string(&mut data, method);
        data.push(1);
        string(&mut data, b"ssh-ed25519");
        string(&mut data, user_key);
        if let Some(h) = host_key {
            string(&mut data, h);
        }
        let mut body = Vec::new();
        string(&mut body, user_key);
        string(&mut body, &data);
        body.extend_from_slice(&0u32.to_be_bytes());
        body
    }

    #[test]
    fn only_a_bound_user_authentication_to_an_allowed_host_is_signed() {
        let (leaf, outsider, user) = (key(1), key(2), key(3));
        let leaf_public = leaf.public_key().clone();
        let allowed: Destinations =
            Arc::new(move |k| matches!(k, HostKey::Plain(k) if k == &leaf_public));
        let session = b"session id of the relay's session with the leaf";
        let user_blob = blob(user.public_key());

        // Bound to the leaf: a user authentication for that session is signed.
        let binding = bind(&session_bind(&leaf, session, 0), &allowed).expect("allowed host");
        assert!(
            may_sign(
                &userauth(session, &user_blob, b"publickey", None),
                Some(&binding)
            )
            .is_ok()
        );
        let leaf_blob = blob(leaf.public_key());
        assert!(
            may_sign(
                &userauth(
                    session,
                    &user_blob,
                    b"publickey-hostbound-v00@openssh.com",
                    Some(&leaf_blob)
                ),
                Some(&binding)
            )
            .is_ok()
        );

        // Another host's key, a forged signature, or further forwarding: no binding.
        assert!(bind(&session_bind(&outsider, session, 0), &allowed).is_err());
        let mut forged = session_bind(&leaf, session, 0);
        let n = forged.len();
        forged[n - 3] ^= 1; // inside the signature
        assert!(bind(&forged, &allowed).is_err());
        assert!(bind(&session_bind(&leaf, session, 1), &allowed).is_err());

        // Without a binding, for another session, or for arbitrary data: refused.
        let request = userauth(session, &user_blob, b"publickey", None);
        assert!(may_sign(&request, None).is_err());
        assert!(
            may_sign(
                &userauth(b"other session", &user_blob, b"publickey", None),
                Some(&binding)
            )
            .is_err()
        );
        let mut arbitrary = Vec::new();
        string(&mut arbitrary, &user_blob);
        string(&mut arbitrary, b"git commit to sign");
        arbitrary.extend_from_slice(&0u32.to_be_bytes());
        assert!(may_sign(&arbitrary, Some(&binding)).is_err());
        let outsider_blob = blob(outsider.public_key());
        assert!(
            may_sign(
                &userauth(
                    session,
                    &user_blob,
                    b"publickey-hostbound-v00@openssh.com",
                    Some(&outsider_blob)
                ),
                Some(&binding)
            )
            .is_err()
        );
    }

    #[test]
    fn a_host_certificate_binds_by_the_key_it_certifies() {
        use russh::keys::ssh_key::certificate::{Builder, CertType};
        let (host, ca, impostor) = (key(4), key(5), key(6));
        let mut b = Builder::new(
            [7u8; 16].to_vec(),
            host.public_key().key_data().clone(),
            0,
            u64::MAX,
        )
        .expect("builder");
        b.cert_type(CertType::Host).expect("type");
        b.key_id("leaf").expect("id");
        b.valid_principal("leaf").expect("principal");
        let cert = b.sign(&ca).expect("sign");
        let cert_blob = cert.to_bytes().expect("blob");
        let ca_key = ca.public_key().key_data().clone();
        // As the initiator judges it: a certificate signed by the known CA.
        let allowed: Destinations =
            Arc::new(move |k| matches!(k, HostKey::Certificate(c) if c.signature_key() == &ca_key));
        let session = b"session id";
        let binding = bind(&session_bind_as(&host, &cert_blob, session, 0), &allowed)
            .expect("certificate binds");
        assert_eq!(binding.host_key, cert_blob);
        // Signed by another key than the certified one: refused.
        let err = bind(
            &session_bind_as(&impostor, &cert_blob, session, 0),
            &allowed,
        )
        .err()
        .expect("an impostor's signature binds nothing");
        assert!(err.contains("does not verify"), "{err}");
        // A certificate the caller does not accept: refused, saying so.
        let none: Destinations = Arc::new(|_| false);
        let err = bind(&session_bind_as(&host, &cert_blob, session, 0), &none)
            .err()
            .expect("refused");
        assert!(err.contains("a host certificate for key"), "{err}");
    }

    #[tokio::test]
    async fn other_agent_requests_are_refused_without_reaching_the_agent() {
        // A backend that is never there: refused requests must not try to reach it.
        let (tx, rx) = mpsc::unbounded_channel();
        drop(rx);
        let backend = AgentBackend::InProcess(tx);
        let allowed: Destinations = Arc::new(|_| true);
        let (mut client, server) = tokio::io::duplex(4096);
        let served = tokio::spawn(async move { serve(server, &backend, &allowed, "r1").await });
        for request in [
            vec![17u8], // ADD_IDENTITY
            vec![19],   // REMOVE_ALL_IDENTITIES
            vec![22],   // LOCK
            vec![SIGN_REQUEST, 0, 0, 0, 0],
        ] {
            write_message(&mut client, &request).await.expect("write");
            let answer = read_message(&mut client)
                .await
                .expect("read")
                .expect("answer");
            assert_eq!(answer, vec![FAILURE], "request {request:?}");
        }
        drop(client);
        served.await.expect("join").expect("serve");
    }
}
