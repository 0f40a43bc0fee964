//! The agent front a relay's forwarded agent channels reach (`ssh::agent_front`): any byte
//! stream from the relay is served without a panic, and a request reaches the operator's agent
//! (here a stub in-process agent that records what it gets) only if the front's policy allows
//! it: `REQUEST_IDENTITIES`, or a `SIGN_REQUEST` whose data is a user authentication
//! (`publickey`, or `publickey-hostbound-v00@openssh.com` naming the bound host key) for the
//! session this connection was bound to by a `session-bind@openssh.com` that the allowed host
//! signed, with the key asked for, and nothing after it. Nothing else ever reaches the agent:
//! no other message type, no extension, no signature before a binding or for another session.
//!
//! Input: the bytes the relay sends (agent messages, `len: u32 BE | type | body`). The seeds
//! carry session-binds signed by the allowed host (key seed 1) and by another host (seed 2).
//!
//! `ARBOR_FUZZ_WRITE_SEEDS=DIR` writes the seeds instead (see README.md);
//! `ARBOR_FUZZ_VERBOSE=1` tells what each input did.
#![no_main]

use arbor::ssh::agent_front::{AgentBackend, Destinations, HostKey, serve_connection};
use libfuzzer_sys::fuzz_target;
use russh::keys::signature::{Signer, Verifier};
use russh::keys::ssh_key::encoding::Encode;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{PrivateKey, PublicKey};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const FAILURE: u8 = 5;
const IDENTITIES_ANSWER: u8 = 12;
const REQUEST_IDENTITIES: u8 = 11;
const SIGN_REQUEST: u8 = 13;
const SIGN_RESPONSE: u8 = 14;
const EXTENSION: u8 = 27;
const USERAUTH_REQUEST: u8 = 50;
/// The front's limit on one message.
const MAX_MESSAGE: usize = 256 * 1024;

fn key(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

/// The host the relay may bind to.
fn allowed_host() -> &'static PrivateKey {
    static K: OnceLock<PrivateKey> = OnceLock::new();
    K.get_or_init(|| key(1))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
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
        let len = u32::from_be_bytes(self.0.get(..4)?.try_into().ok()?) as usize;
        let s = self.0.get(4..4 + len)?;
        self.0 = &self.0[4 + len..];
        Some(s)
    }
}

/// The agent messages in the relay's byte stream, as far as the front can read them.
fn messages(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len > MAX_MESSAGE || data.len() - 4 < len {
            break;
        }
        out.push(&data[4..4 + len]);
        data = &data[4 + len..];
    }
    out
}

struct Binding {
    host_key: Vec<u8>,
    session_id: Vec<u8>,
}

/// A session-bind the allowed host signed, without further forwarding.
fn valid_bind(body: &[u8]) -> Option<Binding> {
    let mut r = Reader(body);
    if r.string()? != b"session-bind@openssh.com" {
        return None;
    }
    let host_key = r.string()?;
    let session_id = r.string()?;
    let signature = r.string()?;
    if r.byte()? != 0 {
        return None;
    }
    let key = PublicKey::from_bytes(host_key).ok()?;
    if &key != allowed_host().public_key() {
        return None;
    }
    let signature = russh::keys::ssh_key::Signature::try_from(signature).ok()?;
    Verifier::verify(&key, session_id, &signature).ok()?;
    Some(Binding {
        host_key: host_key.to_vec(),
        session_id: session_id.to_vec(),
    })
}

/// A user authentication for the bound session, to the bound host, with the key asked for.
fn signable(body: &[u8], binding: Option<&Binding>) -> bool {
    let Some(binding) = binding else {
        return false;
    };
    let check = || -> Option<bool> {
        let mut r = Reader(body);
        let key_blob = r.string()?;
        let mut d = Reader(r.string()?);
        let ok = d.string()? == binding.session_id
            && d.byte()? == USERAUTH_REQUEST
            && d.string().is_some()
            && d.string()? == b"ssh-connection";
        let method = d.string()?;
        let ok = ok && d.byte()? == 1 && d.string().is_some() && d.string()? == key_blob;
        let ok = ok
            && match method {
                b"publickey" => true,
                b"publickey-hostbound-v00@openssh.com" => d.string()? == binding.host_key,
                _ => false,
            };
        Some(ok && d.0.is_empty())
    };
    check().unwrap_or(false)
}

/// For each message, whether the policy lets it reach the agent.
fn allowed(messages: &[&[u8]]) -> Vec<bool> {
    let mut binding = None;
    messages
        .iter()
        .map(|m| match m.first() {
            Some(&REQUEST_IDENTITIES) => true,
            Some(&EXTENSION) => {
                if let Some(b) = valid_bind(&m[1..]) {
                    binding = Some(b);
                }
                false
            }
            Some(&SIGN_REQUEST) => signable(&m[1..], binding.as_ref()),
            _ => false,
        })
        .collect()
}

async fn read_message(r: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let mut body = vec![0; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body).await.ok()?;
    Some(body)
}

async fn write_message(w: &mut (impl AsyncWrite + Unpin), body: &[u8]) -> std::io::Result<()> {
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await
}

/// The operator's agent, as a stub: records each request and answers it.
async fn stub_agent(
    mut connections: mpsc::UnboundedReceiver<std::io::Result<tokio::io::DuplexStream>>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
) {
    while let Some(Ok(mut conn)) = connections.recv().await {
        while let Some(request) = read_message(&mut conn).await {
            let answer: &[u8] = match request.first() {
                Some(&REQUEST_IDENTITIES) => &[IDENTITIES_ANSWER, 0, 0, 0, 0],
                Some(&SIGN_REQUEST) => &[SIGN_RESPONSE, 0, 0, 0, 3, b's', b'i', b'g'],
                _ => &[FAILURE],
            };
            seen.lock().expect("lock").push(request);
            if write_message(&mut conn, answer).await.is_err() {
                break;
            }
        }
    }
}

fuzz_target!(
    init: {
        if let Ok(dir) = std::env::var("ARBOR_FUZZ_WRITE_SEEDS") {
            write_seeds(Path::new(&dir));
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let replies = runtime().block_on(async {
            let (tx, rx) = mpsc::unbounded_channel();
            let agent = tokio::spawn(stub_agent(rx, seen.clone()));
            let backend = AgentBackend::InProcess(tx);
            let host = allowed_host().public_key().clone();
            let destinations: Destinations =
                Arc::new(move |k: &HostKey| matches!(k, HostKey::Plain(k) if k == &host));
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (mut from_front, mut to_front) = tokio::io::split(client);
            let front = serve_connection(server, &backend, &destinations, "fuzz");
            let relay = async {
                let _ = to_front.write_all(data).await;
                let _ = to_front.shutdown().await;
            };
            let answers = async {
                let mut replies = 0usize;
                while read_message(&mut from_front).await.is_some() {
                    replies += 1;
                }
                replies
            };
            let (_, (), replies) = tokio::join!(front, relay, answers);
            drop(backend);
            agent.await.expect("the stub agent");
            replies
        });

        let messages = messages(data);
        assert!(replies <= messages.len(), "more answers than requests");
        let allowed = allowed(&messages);
        let seen = seen.lock().expect("lock");
        if std::env::var_os("ARBOR_FUZZ_VERBOSE").is_some() {
            eprintln!(
                "{} requests, {} allowed, {} reached the agent, {replies} answers",
                messages.len(),
                allowed.iter().filter(|a| **a).count(),
                seen.len()
            );
        }
        // What reached the agent is, in order, some of the messages the policy allows.
        let mut next = 0;
        for request in seen.iter() {
            match (next..messages.len()).find(|&i| allowed[i] && messages[i] == request.as_slice()) {
                Some(i) => next = i + 1,
                None => panic!(
                    "the agent got a request the front must refuse: {request:02x?} (requests: \
                     {messages:02x?})"
                ),
            }
        }
    }
);

// ---- seeds ----

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn message(out: &mut Vec<u8>, body: &[u8]) {
    string(out, body);
}

fn blob(key: &PublicKey) -> Vec<u8> {
    key.to_bytes().expect("blob")
}

/// A session-bind as OpenSSH's client sends it, signed by `host`.
fn session_bind(host: &PrivateKey, session_id: &[u8], forwarding: u8) -> Vec<u8> {
    let signature: russh::keys::ssh_key::Signature = host.try_sign(session_id).expect("sign");
    let mut body = vec![EXTENSION];
    string(&mut body, b"session-bind@openssh.com");
    string(&mut body, &blob(host.public_key()));
    string(&mut body, session_id);
    string(&mut body, &signature.encode_vec().expect("signature blob"));
    body.push(forwarding);
    body
}

/// A sign request for a user authentication, as ssh sends it to its agent.
fn sign_userauth(session_id: &[u8], user_key: &[u8], host_key: Option<&[u8]>) -> Vec<u8> {
    let mut data = Vec::new();
    string(&mut data, session_id);
    data.push(USERAUTH_REQUEST);
    string(&mut data, b"root");
    string(&mut data, b"ssh-connection");
    match host_key {
        None => string(&mut data, b"publickey"),
        Some(_) => string(&mut data, b"publickey-hostbound-v00@openssh.com"),
    }
    data.push(1);
    string(&mut data, b"ssh-ed25519");
    string(&mut data, user_key);
    if let Some(h) = host_key {
        string(&mut data, h);
    }
    let mut body = vec![SIGN_REQUEST];
    string(&mut body, user_key);
    string(&mut body, &data);
    body.extend_from_slice(&0u32.to_be_bytes());
    body
}

fn write_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).expect("seed dir");
    let (host, outsider, user) = (allowed_host(), key(2), key(3));
    let session = b"the relay's session with the leaf";
    let user_blob = blob(user.public_key());
    let host_blob = blob(host.public_key());
    let seeds: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "bind-then-sign",
            vec![
                vec![REQUEST_IDENTITIES],
                session_bind(host, session, 0),
                sign_userauth(session, &user_blob, None),
                sign_userauth(session, &user_blob, Some(&host_blob)),
            ],
        ),
        (
            "refused",
            vec![
                vec![17], // ADD_IDENTITY
                vec![19], // REMOVE_ALL_IDENTITIES
                vec![22], // LOCK
                sign_userauth(session, &user_blob, None),
                session_bind(&outsider, session, 0),
                sign_userauth(session, &user_blob, None),
                session_bind(host, session, 1),
                sign_userauth(session, &user_blob, None),
            ],
        ),
        (
            "other-session",
            vec![
                session_bind(host, session, 0),
                sign_userauth(b"another session", &user_blob, None),
                sign_userauth(session, &user_blob, Some(&blob(outsider.public_key()))),
                {
                    let mut arbitrary = vec![SIGN_REQUEST];
                    string(&mut arbitrary, &user_blob);
                    string(&mut arbitrary, b"a git commit to sign");
                    arbitrary.extend_from_slice(&0u32.to_be_bytes());
                    arbitrary
                },
                {
                    let mut other = vec![EXTENSION];
                    string(&mut other, b"restrict-destination-v00@openssh.com");
                    other
                },
            ],
        ),
    ];
    for (name, bodies) in seeds {
        let mut stream = Vec::new();
        for body in bodies {
            message(&mut stream, &body);
        }
        std::fs::write(dir.join(name), stream).expect("write seed");
    }
}
