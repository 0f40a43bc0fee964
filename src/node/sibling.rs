//! Sibling seeding: the first child of a node that holds an artifact seeds its siblings over
//! their own network, so that each artifact crosses the parent's link once, not once per child
//! (docs/remote.md, "Sibling seeding"; the capability model: docs/security.md).
//!
//! - **Only where the topology says so.** `seed_siblings: true` on a host with children (or at
//!   the top of the file, for the initiator's children) marks its children
//!   (`ChildSpec::seed_siblings`); the others are copied to as before.
//! - **Who seeds whom** ([`Board`], one per parent): for each artifact, the first child that
//!   needs it (or already holds it) claims it and receives it from the parent as before; its
//!   siblings wait for that copy and then fetch from it. A failed claim is claimed again.
//! - **Brokered by the parent, no new trust.** A relay holds no key to log into its siblings.
//!   For each fetch the parent draws a capability, 32 random bytes of token and 32 of key, and
//!   hands it over its own SSH connections (stdin of an exec, never a command line) to both
//!   sides: the seeder's `arbor seed-serve`, which checks its cache entry's sha256 first,
//!   listens on the address the parent reached it at, and serves that one file to the first
//!   connection that shows the token, once, within [`EXPIRE`] seconds; and the fetcher's
//!   `arbor seed-fetch`, which connects (within [`CONNECT_TIMEOUT`] seconds), shows the token,
//!   and keeps what it receives only if it has the size and sha256 the parent named.
//! - **The stream** is sealed with ChaCha20-Poly1305 under the capability's key (which never
//!   crosses the siblings' network): whoever else connects, or listens, gets nothing readable,
//!   and a stream that was tampered with, cut short or sent by an impostor is refused. A seeder
//!   that seals garbage with the right key is caught by the sha256.
//! - **The binary's first copy** goes the same way ([`BuildSeeding`]), but the fetcher has no
//!   arbor yet: the parent starts a bash `/dev/tcp` fetch there ([`plain_fetch_command`]) and
//!   the seeder serves its own binary unsealed (`--plain`); the fetcher keeps it only if
//!   `sha256sum` finds the sha256 the parent named, before anything runs it. Not secret, so
//!   not sealed (docs/security.md, "Sibling seeding").
//! - **Falls back.** Any failure (unreachable sibling, refused, corrupt, expired) is reported
//!   and the parent copies the artifact itself; a sibling that could not be reached is not
//!   tried again by the same child.

use crate::ssh::{CommandLine, Session};
use sha2::Digest;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Seconds a capability stays valid once its seeder listens.
pub const EXPIRE: u64 = 30;

/// Seconds a fetcher waits for its sibling to accept the connection before giving up (and the
/// parent copying it instead).
pub const CONNECT_TIMEOUT: u64 = 2;

/// Plaintext bytes per sealed frame.
const FRAME: usize = 256 << 10;

/// The exit code of `arbor seed-fetch` when the sibling could not be reached at all.
pub const UNREACHABLE: u8 = 3;

/// A child that can seed or fetch: the parent's session to it, its arbor and its artifacts dir.
pub struct Peer {
    pub name: String,
    pub session: Arc<Session>,
    pub binary: String,
    pub dir: String,
}

#[derive(Clone)]
enum Slot {
    /// Being copied to its claimant.
    Pending,
    Held(Arc<Peer>),
    /// The claimant's copy failed: the next one to ask claims it.
    Failed,
}

/// Who holds which artifact among one node's children.
#[derive(Default)]
pub struct Board {
    slots: Mutex<HashMap<String, Arc<watch::Sender<Slot>>>>,
    /// (fetcher, seeder) pairs that could not connect: not tried again.
    unreachable: Mutex<HashSet<(String, String)>>,
}

/// What a child does about one artifact.
pub enum Claim {
    /// Receive it from the parent, then [`Publish::held`] it.
    Mine(Publish),
    /// Fetch it from this sibling.
    From(Arc<Peer>),
    /// Receive it from the parent, as without seeding.
    Alone,
    /// Someone else is copying it: ask again with `wait`.
    Later,
}

/// A claim: unless it is published, its siblings are told it failed.
pub struct Publish {
    tx: Arc<watch::Sender<Slot>>,
    done: bool,
}

impl Publish {
    pub fn held(mut self, peer: Arc<Peer>) {
        self.tx.send_replace(Slot::Held(peer));
        self.done = true;
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        if !self.done {
            self.tx.send_replace(Slot::Failed);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Board {
    /// What `me` does about `sha256`: with `wait`, waits for a sibling's copy in flight
    /// (`None` when `cancel` fires); without, answers [`Claim::Later`] instead.
    pub async fn claim(
        &self,
        sha256: &str,
        me: &str,
        wait: bool,
        cancel: &CancellationToken,
    ) -> Option<Claim> {
        loop {
            let mut rx = {
                let mut slots = lock(&self.slots);
                let Some(tx) = slots.get(sha256).cloned() else {
                    let tx = Arc::new(watch::channel(Slot::Pending).0);
                    slots.insert(sha256.to_string(), tx.clone());
                    return Some(Claim::Mine(Publish { tx, done: false }));
                };
                let slot = tx.borrow().clone();
                match slot {
                    Slot::Failed => {
                        tx.send_replace(Slot::Pending);
                        return Some(Claim::Mine(Publish { tx, done: false }));
                    }
                    Slot::Held(peer) if peer.name == me => return Some(Claim::Alone),
                    Slot::Held(peer) => {
                        let cut =
                            lock(&self.unreachable).contains(&(me.to_string(), peer.name.clone()));
                        return Some(if cut { Claim::Alone } else { Claim::From(peer) });
                    }
                    Slot::Pending if !wait => return Some(Claim::Later),
                    Slot::Pending => tx.subscribe(),
                }
            };
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Some(Claim::Alone);
                    }
                }
                _ = cancel.cancelled() => return None,
            }
        }
    }

    /// `peer` already holds `sha256` (it was in its cache): its siblings may fetch it there,
    /// unless someone else holds or is copying it.
    pub fn offer(&self, sha256: &str, peer: &Arc<Peer>) {
        let mut slots = lock(&self.slots);
        match slots.get(sha256) {
            None => {
                slots.insert(
                    sha256.to_string(),
                    Arc::new(watch::channel(Slot::Held(peer.clone())).0),
                );
            }
            Some(tx) => {
                if matches!(*tx.borrow(), Slot::Failed) {
                    tx.send_replace(Slot::Held(peer.clone()));
                }
            }
        }
    }

    fn cut(&self, fetcher: &str, seeder: &str) {
        lock(&self.unreachable).insert((fetcher.to_string(), seeder.to_string()));
    }
}

/// One capability: the token the fetcher shows, and the key the stream is sealed with.
#[derive(Clone, PartialEq, Eq)]
pub struct Capability {
    pub token: [u8; 32],
    pub key: [u8; 32],
}

impl Capability {
    pub fn new() -> Capability {
        Capability {
            token: rand::random(),
            key: rand::random(),
        }
    }

    /// The line handed to both sides on stdin.
    pub fn line(&self) -> String {
        let hex = &data_encoding::HEXLOWER;
        format!("{} {}\n", hex.encode(&self.token), hex.encode(&self.key))
    }

    pub fn parse(line: &str) -> Result<Capability, String> {
        let mut words = line.split_whitespace();
        let mut next = || -> Result<[u8; 32], String> {
            let w = words.next().ok_or("no capability on stdin")?;
            let bytes = data_encoding::HEXLOWER
                .decode(w.as_bytes())
                .map_err(|_| "a malformed capability on stdin")?;
            bytes
                .try_into()
                .map_err(|_| "a malformed capability on stdin".to_string())
        };
        Ok(Capability {
            token: next()?,
            key: next()?,
        })
    }

    fn read_stdin() -> Result<Capability, String> {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("reading the capability: {e}"))?;
        Capability::parse(&line)
    }
}

impl Default for Capability {
    fn default() -> Self {
        Capability::new()
    }
}

/// Why a seeding failed.
#[derive(Debug)]
pub enum SeedError {
    /// The fetcher could not connect to the seeder.
    Unreachable(String),
    Failed(String),
    Stopped,
}

impl std::fmt::Display for SeedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeedError::Unreachable(w) => write!(f, "unreachable: {w}"),
            SeedError::Failed(w) => f.write_str(w),
            SeedError::Stopped => f.write_str("stopped"),
        }
    }
}

/// How many times a seed-serve is asked to start when the host's SSH server closes the channel
/// before answering.
const SERVE_ATTEMPTS: u64 = 3;

/// Why a seed-serve gave no address.
enum Served {
    /// The server closed the channel before answering the exec request: ask again.
    Again,
    Failed(SeedError),
}

/// The address a seed-serve listens on: its first line, once it has checked its cache entry.
async fn serve_address(
    serve: &mut crate::ssh::RemoteCommand,
    from: &str,
    cancel: &CancellationToken,
) -> Result<String, Served> {
    let failed = |e: String| Served::Failed(SeedError::Failed(format!("{from}: {e}")));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        let item = tokio::select! {
            i = serve.next() => i,
            _ = cancel.cancelled() => return Err(Served::Failed(SeedError::Stopped)),
            _ = tokio::time::sleep(Duration::from_secs(120)) => None,
        };
        match item {
            Some(crate::ssh::Output::Stdout(d)) => {
                out.extend_from_slice(&d);
                if let Some(end) = out.iter().position(|b| *b == b'\n') {
                    let line = String::from_utf8_lossy(&out[..end]).to_string();
                    return match line.strip_prefix("listening ") {
                        Some(a) => Ok(a.trim().to_string()),
                        None => Err(failed(format!("seed-serve said {line:?}"))),
                    };
                }
            }
            Some(crate::ssh::Output::Stderr(d)) => err.extend_from_slice(&d),
            Some(crate::ssh::Output::Exit(crate::ssh::ExitStatus::ClosedBeforeReply)) => {
                return Err(Served::Again);
            }
            Some(crate::ssh::Output::Exit(status)) => {
                return Err(failed(format!(
                    "seed-serve ended with {status}: {}",
                    String::from_utf8_lossy(&err).trim()
                )));
            }
            None => return Err(failed("seed-serve did not answer".into())),
        }
    }
}

/// A seed-serve started on a sibling: its capability, its exec and the address it listens on.
struct Seeder {
    cap: Capability,
    exec: crate::ssh::RemoteCommand,
    addr: String,
}

/// Starts `from`'s `arbor seed-serve` for `file` (`sha256`, `size` bytes) under a fresh
/// capability; `plain`: unsealed, for a fetcher with no arbor (see [`Serve::plain`]).
async fn start_seeder(
    from: &Peer,
    file: &str,
    sha256: &str,
    size: u64,
    plain: bool,
    cancel: &CancellationToken,
) -> Result<Seeder, SeedError> {
    let failed = |e: String| SeedError::Failed(format!("{}: {e}", from.name));
    let mut line = CommandLine::new(&from.binary).args([
        "seed-serve",
        "--file",
        file,
        "--sha256",
        sha256,
        "--size",
        &size.to_string(),
        "--expire",
        &EXPIRE.to_string(),
    ]);
    if plain {
        line = line.arg("--plain");
    }
    // A dropbear that closes a channel before answering its exec request (as older ones do
    // when a connection is busy) did not run the command there: ask again, a few times.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let cap = Capability::new();
        let mut exec = from
            .session
            .exec(line.as_str(), &Default::default())
            .await
            .map_err(|e| failed(e.to_string()))?;
        exec.write_stdin(cap.line().as_bytes())
            .await
            .map_err(|e| failed(e.to_string()))?;
        match serve_address(&mut exec, &from.name, cancel).await {
            Err(Served::Again) if attempt < SERVE_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(Served::Again) => {
                return Err(failed(format!(
                    "seed-serve ended with {} {SERVE_ATTEMPTS} times",
                    crate::ssh::ExitStatus::ClosedBeforeReply
                )));
            }
            Err(Served::Failed(e)) => return Err(e),
            Ok(addr) => return Ok(Seeder { cap, exec, addr }),
        }
    }
}

impl Seeder {
    /// Done, whichever way: revoked (if unused), the seeder ends; its word is for the log.
    async fn end(self, from: &str) {
        let _ = self.exec.close_stdin().await;
        let served = tokio::time::timeout(Duration::from_secs(2), self.exec.collect()).await;
        if let Ok(Ok(s)) = served {
            let said = String::from_utf8_lossy(&s.stderr);
            if !said.trim().is_empty() {
                tracing::debug!("{from}: seed-serve: {}", said.trim());
            }
        }
    }
}

/// The parent's side: has `to` fetch the artifact `sha256` (`size` bytes) into `dest` from
/// `from`, under a fresh capability. Ok once `to` holds it, checked.
pub async fn fetch(
    to: &Peer,
    from: &Peer,
    sha256: &str,
    size: u64,
    dest: &str,
    cancel: &CancellationToken,
) -> Result<(), SeedError> {
    let failed = |who: &str, e: String| SeedError::Failed(format!("{who}: {e}"));
    let file = format!("{}/{sha256}", from.dir);
    let seeder = start_seeder(from, &file, sha256, size, false, cancel).await?;
    let fetch_line = CommandLine::new(&to.binary).args([
        "seed-fetch",
        "--from",
        &seeder.addr,
        "--dest",
        dest,
        "--sha256",
        sha256,
        "--size",
        &size.to_string(),
        "--connect-timeout",
        &CONNECT_TIMEOUT.to_string(),
    ]);
    let fetched = async {
        let fetcher = to
            .session
            .exec(fetch_line.as_str(), &Default::default())
            .await
            .map_err(|e| failed(&to.name, e.to_string()))?;
        fetcher
            .write_stdin(seeder.cap.line().as_bytes())
            .await
            .map_err(|e| failed(&to.name, e.to_string()))?;
        let _ = fetcher.close_stdin().await;
        tokio::select! {
            g = fetcher.collect() => g.map_err(|e| failed(&to.name, e.to_string())),
            _ = cancel.cancelled() => Err(SeedError::Stopped),
        }
    }
    .await;
    seeder.end(&from.name).await;
    let got = fetched?;
    let why = String::from_utf8_lossy(&got.stderr).trim().to_string();
    match got.status {
        s if s.success() => Ok(()),
        crate::ssh::ExitStatus::Code(c) if c == UNREACHABLE as u32 => Err(SeedError::Unreachable(
            format!("{} from {}: {why}", to.name, from.name),
        )),
        s => Err(failed(
            &to.name,
            format!("seed-fetch ended with {s}: {why}"),
        )),
    }
}

/// The exit code of a plain fetch when the host lacks what it needs (bash, sha256sum).
const NO_TOOL: u32 = 4;

/// Seconds a plain fetch waits for its connection: siblings on one network connect within
/// milliseconds, and the binary's first copy is on every relay's critical path, so a sibling
/// it cannot reach costs one second before the parent copies it instead.
const PLAIN_CONNECT_TIMEOUT: u64 = 1;

/// Seconds a plain fetch may take once connected: a stalled seeder is given up on.
const PLAIN_FETCH_LIMIT: u64 = 60;

/// The shell a host with no arbor yet fetches a build with: bash's `/dev/tcp` to the seeder
/// (a watchdog ends the connect after [`PLAIN_CONNECT_TIMEOUT`] seconds), the token from stdin, the
/// bytes into a temp file beside `dest` that becomes `dest` (mode 0755) only with `size` bytes
/// and the `sha256`, checked by `sha256sum` before anything could run it; otherwise the temp
/// file is removed. Says `connected` once connected; exits [`UNREACHABLE`] (or is killed by
/// its watchdog) when it could not connect, [`NO_TOOL`] without bash or sha256sum. No traps:
/// a subshell forked while one is set may run it.
fn plain_fetch_command(addr: SocketAddr, dest: &str, sha256: &str, size: u64) -> String {
    let script = format!(
        "set -u; umask 077; t={dir}/.arbor.seed.$$; \
         IFS= read -r token || exit 1; \
         ( sleep {connect}; kill -TERM $$ ) >/dev/null 2>&1 </dev/null & w=$!; \
         exec 3<>/dev/tcp/{host}/{port} || exit {unreachable}; \
         kill $w 2>/dev/null; echo connected; \
         to=; if command -v timeout >/dev/null 2>&1; then to=\"timeout {limit}\"; fi; \
         if printf '%s %s\\n' \"$token\" {sha} >&3 && $to cat <&3 > \"$t\" && \
            [ \"$(wc -c < \"$t\")\" -eq {size} ] && sha256sum \"$t\" | grep -q '^{sha} ' && \
            chmod 755 \"$t\" && mv -f \"$t\" {dest}; then exit 0; fi; \
         n=$(wc -c < \"$t\" 2>/dev/null || echo 0); rm -f \"$t\"; \
         echo \"received $n bytes, not the build {sha} ({size} bytes): not kept\" >&2; exit 1",
        dir = crate::ssh::shell_quote(dest.rsplit_once('/').map_or(".", |(d, _)| d)),
        dest = crate::ssh::shell_quote(dest),
        connect = PLAIN_CONNECT_TIMEOUT,
        unreachable = UNREACHABLE,
        limit = PLAIN_FETCH_LIMIT,
        host = addr.ip(),
        port = addr.port(),
        sha = sha256,
    );
    format!(
        "command -v bash >/dev/null 2>&1 && command -v sha256sum >/dev/null 2>&1 || \
         {{ echo 'no bash or no sha256sum here' >&2; exit {NO_TOOL}; }}; \
         exec bash -c {}",
        crate::ssh::shell_quote(&script)
    )
}

/// The parent's side of a build's first copy: `to` has no arbor yet, so it fetches the build
/// `sha256` (`size` bytes), which `from` runs, with what the host has ([`plain_fetch_command`])
/// into `dest`, under a fresh capability. Ok once `dest` holds it, checked by sha256; a
/// failure within about [`PLAIN_CONNECT_TIMEOUT`] seconds when the sibling cannot be reached.
pub async fn fetch_build(
    to: &BuildSeeding,
    from: &Peer,
    sha256: &str,
    size: u64,
    dest: &str,
    cancel: &CancellationToken,
) -> Result<(), SeedError> {
    let failed = |who: &str, e: String| SeedError::Failed(format!("{who}: {e}"));
    let seeder = start_seeder(from, &from.binary, sha256, size, true, cancel).await?;
    let fetched = async {
        let addr: SocketAddr = seeder.addr.parse().map_err(|e| {
            failed(
                &from.name,
                format!("seed-serve said {:?}: {e}", seeder.addr),
            )
        })?;
        let mut fetcher = to
            .session
            .exec(
                &plain_fetch_command(addr, dest, sha256, size),
                &Default::default(),
            )
            .await
            .map_err(|e| failed(&to.name, e.to_string()))?;
        let token = data_encoding::HEXLOWER.encode(&seeder.cap.token);
        fetcher
            .write_stdin(format!("{token}\n").as_bytes())
            .await
            .map_err(|e| failed(&to.name, e.to_string()))?;
        let _ = fetcher.close_stdin().await;
        // The host's own watchdog ends a connect after PLAIN_CONNECT_TIMEOUT seconds; this
        // one holds if the host has no `kill` or `sleep` that work, and bounds the whole fetch.
        let (mut stderr, mut connected) = (Vec::new(), false);
        let limit = Duration::from_secs(PLAIN_CONNECT_TIMEOUT + 1);
        let mut deadline = tokio::time::Instant::now() + limit;
        let status = loop {
            let item = tokio::select! {
                i = fetcher.next() => i,
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(if connected {
                        failed(&to.name, format!("the fetch took over {PLAIN_FETCH_LIMIT} s"))
                    } else {
                        SeedError::Unreachable(format!(
                            "{} from {}: no connection within {} s",
                            to.name, from.name, limit.as_secs()
                        ))
                    });
                }
                _ = cancel.cancelled() => return Err(SeedError::Stopped),
            };
            match item {
                Some(crate::ssh::Output::Stdout(d)) => {
                    if !connected && d.windows(9).any(|w| w == b"connected") {
                        connected = true;
                        deadline = tokio::time::Instant::now()
                            + Duration::from_secs(PLAIN_FETCH_LIMIT + 2);
                    }
                }
                Some(crate::ssh::Output::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(crate::ssh::Output::Exit(status)) => break status,
                None => break crate::ssh::ExitStatus::Unknown,
            }
        };
        // One line, for the parent's report.
        let said = String::from_utf8_lossy(&stderr);
        let why: Vec<&str> = said
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        Ok((status, connected, why.join("; ")))
    }
    .await;
    seeder.end(&from.name).await;
    let (status, connected, why) = fetched?;
    match status {
        s if s.success() => Ok(()),
        crate::ssh::ExitStatus::Code(NO_TOOL) => Err(failed(&to.name, why)),
        // Refused, unroutable, or ended by its watchdog.
        s if !connected => Err(SeedError::Unreachable(format!(
            "{} from {}: no connection within {PLAIN_CONNECT_TIMEOUT} s ({s}{}{why})",
            to.name,
            from.name,
            if why.is_empty() { "" } else { ": " }
        ))),
        s => Err(failed(&to.name, format!("the fetch ended with {s}: {why}"))),
    }
}

/// A child about to receive its first copy of arbor, for its parent's seeding: the board its
/// siblings share, its name and the parent's session to it. Builds are claimed on the board
/// under [`build_key`], apart from artifacts.
pub struct BuildSeeding {
    pub board: Arc<Board>,
    pub name: String,
    pub session: Arc<Session>,
}

/// A build's name on a [`Board`]: never an artifact's, even one with the same bytes (the file
/// served is the sibling's binary, not an artifact's cache entry).
pub fn build_key(sha256: &str) -> String {
    format!("build {sha256}")
}

impl BuildSeeding {
    /// What this child does about the build `sha256`: see [`Board::claim`].
    pub async fn claim(&self, sha256: &str, cancel: &CancellationToken) -> Option<Claim> {
        self.board
            .claim(&build_key(sha256), &self.name, true, cancel)
            .await
    }

    /// This child holds the build at `binary` (it was in its cache): its siblings may fetch it.
    pub fn offer(&self, sha256: &str, binary: &str) {
        self.board.offer(&build_key(sha256), &self.peer(binary));
    }

    /// This child as a seeder of its build at `binary`.
    pub fn peer(&self, binary: &str) -> Arc<Peer> {
        Arc::new(Peer {
            name: self.name.clone(),
            session: self.session.clone(),
            binary: binary.to_string(),
            dir: String::new(),
        })
    }

    /// Fetches the build from `from` into `dest`; an unreachable sibling is remembered.
    pub async fn fetch(
        &self,
        from: &Peer,
        sha256: &str,
        size: u64,
        dest: &str,
        cancel: &CancellationToken,
    ) -> Result<(), SeedError> {
        let result = fetch_build(self, from, sha256, size, dest, cancel).await;
        if let Err(SeedError::Unreachable(_)) = &result {
            self.board.cut(&self.name, &from.name);
        }
        result
    }
}

/// One child's part in its parent's seeding: the board its siblings share, and itself.
pub struct Seeding {
    pub board: Arc<Board>,
    pub me: Arc<Peer>,
}

impl Seeding {
    /// Fetches `sha256` from `from`; an unreachable sibling is remembered.
    pub async fn fetch(
        &self,
        from: &Peer,
        sha256: &str,
        size: u64,
        cancel: &CancellationToken,
    ) -> Result<(), SeedError> {
        let dest = format!("{}/{sha256}", self.me.dir);
        let result = fetch(&self.me, from, sha256, size, &dest, cancel).await;
        if let Err(SeedError::Unreachable(_)) = &result {
            self.board.cut(&self.me.name, &from.name);
        }
        result
    }
}

/// Seals and opens the stream's frames: ChaCha20-Poly1305 under the capability's key, each
/// frame's nonce its number, its additional data the artifact's sha256 and whether it is the
/// last (so frames cannot be reordered, dropped, cut short or moved to another artifact).
struct Sealer {
    key: ring::aead::LessSafeKey,
    aad: [u8; 33],
    count: u64,
}

impl Sealer {
    fn new(key: &[u8; 32], sha256: &str) -> Result<Sealer, String> {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key)
            .map_err(|_| "bad key".to_string())?;
        let raw = data_encoding::HEXLOWER
            .decode(sha256.as_bytes())
            .map_err(|_| format!("{sha256}: not a sha256"))?;
        let mut aad = [0u8; 33];
        if raw.len() != 32 {
            return Err(format!("{sha256}: not a sha256"));
        }
        aad[..32].copy_from_slice(&raw);
        Ok(Sealer {
            key: ring::aead::LessSafeKey::new(unbound),
            aad,
            count: 0,
        })
    }

    fn nonce(&mut self) -> ring::aead::Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.count.to_be_bytes());
        self.count += 1;
        ring::aead::Nonce::assume_unique_for_key(n)
    }

    fn seal(&mut self, data: &mut Vec<u8>, last: bool) -> Result<(), String> {
        self.aad[32] = last as u8;
        let nonce = self.nonce();
        self.key
            .seal_in_place_append_tag(nonce, ring::aead::Aad::from(self.aad), data)
            .map_err(|_| "sealing failed".to_string())
    }

    fn open<'a>(&mut self, data: &'a mut [u8], last: bool) -> Result<&'a mut [u8], String> {
        self.aad[32] = last as u8;
        let nonce = self.nonce();
        self.key
            .open_in_place(nonce, ring::aead::Aad::from(self.aad), data)
            .map_err(|_| "a frame failed authentication (wrong key, or tampered with)".into())
    }
}

/// Sends `file` (from its start) to `out` as sealed frames: each a 4-byte big-endian length,
/// a flag byte (1 for the last frame) and the sealed bytes. Returns the plaintext bytes sent.
pub fn send_sealed(
    mut file: impl Read,
    out: &mut impl Write,
    key: &[u8; 32],
    sha256: &str,
) -> Result<u64, String> {
    let mut sealer = Sealer::new(key, sha256)?;
    let mut buf = vec![0u8; FRAME];
    let mut sent = 0u64;
    let mut pending: Option<Vec<u8>> = None;
    loop {
        let mut filled = 0;
        while filled < FRAME {
            let n = file.read(&mut buf[filled..]).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        // One frame behind, so that the last one can be flagged.
        if let Some(mut data) = pending.take() {
            let last = filled == 0;
            sent += data.len() as u64;
            sealer.seal(&mut data, last)?;
            write_frame(out, &data, last)?;
            if last {
                break;
            }
        } else if filled == 0 {
            let mut empty = Vec::new();
            sealer.seal(&mut empty, true)?;
            write_frame(out, &empty, true)?;
            break;
        }
        if filled > 0 {
            pending = Some(buf[..filled].to_vec());
        }
    }
    out.flush().map_err(|e| e.to_string())?;
    Ok(sent)
}

fn write_frame(out: &mut impl Write, data: &[u8], last: bool) -> Result<(), String> {
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(data.len() as u32).to_be_bytes());
    head[4] = last as u8;
    out.write_all(&head)
        .and_then(|()| out.write_all(data))
        .map_err(|e| format!("sending: {e}"))
}

/// Reads sealed frames from `input` into `dest` (atomically: a temp file beside it, renamed
/// only once it has `size` bytes and the sha256 `sha256`). Nothing stays behind otherwise.
pub fn receive_sealed(
    input: &mut impl Read,
    dest: &Path,
    key: &[u8; 32],
    sha256: &str,
    size: u64,
) -> Result<(), String> {
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = dir.join(format!(".arbor.seed.{}", std::process::id()));
    // Removed unless it is put into place; this node's children can follow it meanwhile.
    let incoming = crate::node::arriving::Incoming::create(dest, &temp)?;
    receive_into(input, incoming, dest, key, sha256, size)
}

fn receive_into(
    input: &mut impl Read,
    mut incoming: crate::node::arriving::Incoming,
    dest: &Path,
    key: &[u8; 32],
    sha256: &str,
    size: u64,
) -> Result<(), String> {
    let mut sealer = Sealer::new(key, sha256)?;
    let mut hasher = sha2::Sha256::default();
    let mut total = 0u64;
    let tag = ring::aead::CHACHA20_POLY1305.tag_len();
    loop {
        let mut head = [0u8; 5];
        input
            .read_exact(&mut head)
            .map_err(|e| format!("the stream ended early: {e}"))?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let last = head[4] == 1;
        if len < tag || len > FRAME + tag {
            return Err(format!("a frame of {len} bytes"));
        }
        let mut data = vec![0u8; len];
        input
            .read_exact(&mut data)
            .map_err(|e| format!("the stream ended early: {e}"))?;
        let plain = sealer.open(&mut data, last)?;
        total += plain.len() as u64;
        if total > size {
            return Err(format!("more than the {size} bytes expected"));
        }
        hasher.update(&*plain);
        incoming
            .file
            .write_all(plain)
            .map_err(|e| format!("{}: {e}", incoming.path.display()))?;
        if last {
            break;
        }
    }
    let got = data_encoding::HEXLOWER.encode(&hasher.finalize());
    if total != size || got != sha256 {
        return Err(format!(
            "received {total} bytes with sha256 {got}, want {size} bytes with sha256 \
             {sha256}: not kept"
        ));
    }
    incoming
        .finish(0o600, dest)
        .map_err(|e| format!("{}: {e}", dest.display()))
}

/// `arbor seed-serve`: what to serve, and for how long.
#[derive(Debug, Clone)]
pub struct Serve {
    pub file: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub expire: u64,
    /// Where to listen; default: the address this host was reached at over SSH
    /// (`SSH_CONNECTION`), else every address.
    pub bind: Option<String>,
    /// Unsealed ([`PLAIN_REQUEST`] in, the file's bytes out), for a fetcher that has no arbor
    /// yet: only for arbor's own binary, whose sha256 the fetcher checks before it is used.
    pub plain: bool,
}

/// A plain fetch's request: the token and the sha256 in hex, a space between, a newline
/// after (what a shell can send with `printf`).
pub const PLAIN_REQUEST: usize = 64 + 1 + 64 + 1;

/// `arbor seed-fetch`: from where, what, and where to.
#[derive(Debug, Clone)]
pub struct Fetch {
    pub from: String,
    pub dest: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub connect_timeout: u64,
}

/// The address sshd says this session came in on (`SSH_CONNECTION`'s third field).
fn ssh_server_addr() -> Option<std::net::IpAddr> {
    let v = std::env::var("SSH_CONNECTION").ok()?;
    v.split_whitespace().nth(2)?.parse().ok()
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `args.file` once to the first connection showing `cap`'s token for `args.sha256`,
/// after checking the file is that artifact; refuses every other connection; gives up after
/// `args.expire` seconds, or once `revoked` says so before a fetch came. `ready` gets the
/// address it listens on.
pub fn serve(
    args: &Serve,
    cap: &Capability,
    ready: &mut dyn FnMut(SocketAddr),
    revoked: &dyn Fn() -> bool,
) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(args.expire);
    let (mut file, growing) = open_served(&args.file, deadline, revoked)?;
    // A whole cache entry is served only once verified: hashed from the very handle that
    // is then served. A copy still arriving here is served as it arrives, unverified: the
    // fetcher keeps it only with the right sha256, as always.
    if !growing {
        let mut hasher = sha2::Sha256::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        loop {
            let got = file
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", args.file.display()))?;
            if got == 0 {
                break;
            }
            n += got as u64;
            hasher.update(&buf[..got]);
        }
        let sha = data_encoding::HEXLOWER.encode(&hasher.finalize());
        if sha != args.sha256 || n != args.size {
            return Err(format!(
                "{}: {n} bytes with sha256 {sha}, not the artifact {}: not served",
                args.file.display(),
                args.sha256
            ));
        }
    }
    let bind: SocketAddr = match &args.bind {
        Some(b) => b.parse().map_err(|e| format!("--bind {b}: {e}"))?,
        None => SocketAddr::new(
            ssh_server_addr().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
            0,
        ),
    };
    let listener = TcpListener::bind(bind).map_err(|e| format!("listening on {bind}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    ready(listener.local_addr().map_err(|e| e.to_string())?);
    let want_sha = data_encoding::HEXLOWER
        .decode(args.sha256.as_bytes())
        .map_err(|_| "not a sha256".to_string())?;
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "the capability expired after {} s unused",
                args.expire
            ));
        }
        if revoked() {
            return Err("the parent revoked the capability unused".into());
        }
        let (mut conn, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(format!("accepting: {e}")),
        };
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
        let mut asked = [0u8; 64];
        let shown = if args.plain {
            read_plain_request(&mut conn, &mut asked)
        } else {
            conn.read_exact(&mut asked).is_ok()
        };
        if !(shown && same(&asked[..32], &cap.token) && same(&asked[32..], &want_sha)) {
            eprintln!(
                "refused a fetch from {peer}: {}",
                if !shown {
                    "no capability"
                } else if !same(&asked[..32], &cap.token) {
                    "a wrong capability"
                } else {
                    "another artifact than its capability names"
                }
            );
            // A plain fetcher gets nothing at all: too few bytes, which it refuses.
            if !args.plain {
                let _ = conn.write_all(b"N");
            }
            continue;
        }
        // Single use: whatever happens now, this capability is spent.
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))
            .map_err(|e| e.to_string())?;
        let mut file = crate::node::arriving::Tail::new(file, args.size, growing);
        let sent = if args.plain {
            std::io::copy(&mut file, &mut conn).map_err(|e| format!("{peer}: {e}"))?
        } else {
            conn.write_all(b"Y").map_err(|e| format!("{peer}: {e}"))?;
            let mut out = std::io::BufWriter::with_capacity(FRAME + 64, &mut conn);
            let sent = send_sealed(&mut file, &mut out, &cap.key, &args.sha256)
                .map_err(|e| format!("{peer}: {e}"))?;
            drop(out);
            sent
        };
        let _ = conn.shutdown(std::net::Shutdown::Write);
        // Until the fetcher closes: it has read everything.
        let _ = conn.read(&mut [0u8; 1]);
        return Ok(sent);
    }
}

/// The file to serve: `path` once it is there (`false`), or the copy of it that is arriving
/// (`true`, crate::node::arriving), whichever comes first before `deadline`: the parent may
/// name a file whose copy to this node has only just begun.
fn open_served(
    path: &Path,
    deadline: Instant,
    revoked: &dyn Fn() -> bool,
) -> Result<(std::fs::File, bool), String> {
    loop {
        match std::fs::File::open(path) {
            Ok(f) => return Ok((f, false)),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("{}: {e}", path.display()));
            }
            Err(_) => {}
        }
        if let Some(f) = crate::node::arriving::open_growing(path) {
            return Ok((f, true));
        }
        if Instant::now() >= deadline || revoked() {
            return Err(format!(
                "{}: not there, and no copy of it arriving",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a [`PLAIN_REQUEST`] into `asked` (token, then sha256, as bytes); false if it is not
/// one.
fn read_plain_request(conn: &mut TcpStream, asked: &mut [u8; 64]) -> bool {
    let mut line = [0u8; PLAIN_REQUEST];
    if conn.read_exact(&mut line).is_err() || line[64] != b' ' || line[129] != b'\n' {
        return false;
    }
    let hex = &data_encoding::HEXLOWER;
    match (hex.decode(&line[..64]), hex.decode(&line[65..129])) {
        (Ok(token), Ok(sha)) => {
            asked[..32].copy_from_slice(&token);
            asked[32..].copy_from_slice(&sha);
            true
        }
        _ => false,
    }
}

/// Fetches from `args.from` under `cap`; `Err((unreachable, why))`.
pub fn fetch_from(args: &Fetch, cap: &Capability) -> Result<(), (bool, String)> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = args
        .from
        .to_socket_addrs()
        .map_err(|e| (true, format!("{}: {e}", args.from)))?
        .collect();
    let timeout = Duration::from_secs(args.connect_timeout.max(1));
    let mut last = format!("{}: no address", args.from);
    let mut conn = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => last = format!("connecting to {a}: {e}"),
        }
    }
    let mut conn = conn.ok_or((true, last))?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let sha = data_encoding::HEXLOWER
        .decode(args.sha256.as_bytes())
        .map_err(|_| (false, "not a sha256".to_string()))?;
    let mut ask = cap.token.to_vec();
    ask.extend_from_slice(&sha);
    conn.write_all(&ask)
        .map_err(|e| (false, format!("{}: {e}", args.from)))?;
    let mut answer = [0u8; 1];
    match conn.read_exact(&mut answer) {
        Ok(()) if answer == *b"Y" => {}
        _ => return Err((false, format!("{} refused the capability", args.from))),
    }
    let mut input = std::io::BufReader::with_capacity(FRAME + 64, conn);
    receive_sealed(&mut input, &args.dest, &cap.key, &args.sha256, args.size)
        .map_err(|e| (false, format!("from {}: {e}", args.from)))
}

/// The hidden `arbor seed-serve` subcommand: the capability on stdin; prints `listening ADDR`,
/// then exits 0 once it has served, 1 otherwise. The end of its stdin (the parent is done
/// with it, or gone) revokes the capability.
pub fn serve_main(args: &Serve) -> std::process::ExitCode {
    let run = || -> Result<u64, String> {
        let cap = Capability::read_stdin()?;
        let revoked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = revoked.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        serve(
            args,
            &cap,
            &mut |addr| {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "listening {addr}");
                let _ = out.flush();
            },
            &|| revoked.load(std::sync::atomic::Ordering::SeqCst),
        )
    };
    match run() {
        Ok(n) => {
            eprintln!("served {n} bytes");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("arbor seed-serve: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The hidden `arbor seed-fetch` subcommand: the capability on stdin; exits 0 once `--dest`
/// holds the artifact, [`UNREACHABLE`] when the sibling could not be reached, 1 otherwise,
/// leaving nothing behind.
pub fn fetch_main(args: &Fetch) -> std::process::ExitCode {
    let cap = match Capability::read_stdin() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("arbor seed-fetch: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match fetch_from(args, &cap) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err((unreachable, e)) => {
            eprintln!("arbor seed-fetch: {e}");
            std::process::ExitCode::from(if unreachable { UNREACHABLE } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(dir: &Path, bytes: &[u8]) -> (PathBuf, String) {
        let sha = crate::engine::artifacts::sha256_hex(bytes);
        let path = dir.join(&sha);
        std::fs::write(&path, bytes).expect("write");
        (path, sha)
    }

    /// Starts a server on loopback in a thread; its address and its result.
    fn start(
        args: Serve,
        cap: Capability,
    ) -> (SocketAddr, std::thread::JoinHandle<Result<u64, String>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            serve(&args, &cap, &mut |a| tx.send(a).expect("tx"), &|| false)
        });
        (rx.recv().expect("listening"), t)
    }

    fn fetch_args(from: SocketAddr, dest: &Path, sha: &str, size: u64) -> Fetch {
        Fetch {
            from: from.to_string(),
            dest: dest.to_path_buf(),
            sha256: sha.into(),
            size,
            connect_timeout: 1,
        }
    }

    #[test]
    fn a_capability_serves_its_artifact_once_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes: Vec<u8> = (0..(FRAME * 2 + 17))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let (path, sha) = artifact(dir.path(), &bytes);
        let other = crate::engine::artifacts::sha256_hex(b"other");
        let cap = Capability::new();
        let args = Serve {
            file: path,
            sha256: sha.clone(),
            size: bytes.len() as u64,
            expire: 10,
            bind: Some("127.0.0.1:0".into()),
            plain: false,
        };
        let (addr, server) = start(args, cap.clone());
        let dest = dir.path().join("got");
        let size = bytes.len() as u64;
        // A guessed capability: refused, nothing written.
        let wrong = Capability::new();
        let e = fetch_from(&fetch_args(addr, &dest, &sha, size), &wrong).expect_err("wrong");
        assert!(!e.0 && e.1.contains("refused"), "{e:?}");
        // The right token for another artifact: refused.
        let e = fetch_from(&fetch_args(addr, &dest, &other, size), &cap).expect_err("other");
        assert!(e.1.contains("refused"), "{e:?}");
        assert!(!dest.exists());
        // The right one: served, checked, kept.
        fetch_from(&fetch_args(addr, &dest, &sha, size), &cap).expect("fetched");
        assert_eq!(std::fs::read(&dest).expect("read"), bytes);
        assert_eq!(server.join().expect("join"), Ok(size));
        // Used: the seeder is gone.
        let again = dir.path().join("again");
        let e = fetch_from(&fetch_args(addr, &again, &sha, size), &cap).expect_err("reused");
        assert!(e.0, "{e:?}");
        assert!(!again.exists());
    }

    #[test]
    fn a_copy_still_arriving_at_the_seeder_is_served_as_it_arrives_and_followed_at_the_fetcher() {
        use crate::node::arriving;
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes: Vec<u8> = (0..(FRAME * 3 + 5)).map(|i| (i * 7 % 253) as u8).collect();
        let sha = crate::engine::artifacts::sha256_hex(&bytes);
        let size = bytes.len() as u64;
        // The seeder is named the file before its own copy of it has begun.
        let path = dir.path().join(&sha);
        let cap = Capability::new();
        let args = Serve {
            file: path.clone(),
            sha256: sha.clone(),
            size,
            expire: 10,
            bind: Some("127.0.0.1:0".into()),
            plain: false,
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server_cap = cap.clone();
        let server = std::thread::spawn(move || {
            serve(
                &args,
                &server_cap,
                &mut |a| ready_tx.send(a).expect("tx"),
                &|| false,
            )
        });
        std::thread::sleep(Duration::from_millis(100));
        let mut incoming = arriving::Incoming::create(&path, &dir.path().join(".t")).expect("in");
        incoming.file.write_all(&bytes[..FRAME]).expect("write");
        let addr = ready_rx.recv().expect("listening");
        // The fetcher writes where its own children can follow it.
        let dest = dir.path().join("fetched");
        let fetch = fetch_args(addr, &dest, &sha, size);
        let fetcher = std::thread::spawn(move || fetch_from(&fetch, &cap));
        let mut followed = None;
        for _ in 0..200 {
            followed = arriving::open_growing(&dest);
            if followed.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let follower = std::thread::spawn(move || {
            let mut got = Vec::new();
            let file = followed.expect("the fetched copy, arriving");
            arriving::Tail::new(file, size, true)
                .read_to_end(&mut got)
                .map(|_| got)
        });
        for chunk in bytes[FRAME..].chunks(100_000) {
            std::thread::sleep(Duration::from_millis(20));
            incoming.file.write_all(chunk).expect("write");
        }
        incoming.finish(0o600, &path).expect("finish");
        fetcher.join().expect("join").expect("fetched");
        assert_eq!(server.join().expect("join"), Ok(size));
        assert_eq!(std::fs::read(&dest).expect("read"), bytes);
        assert_eq!(follower.join().expect("join").expect("followed"), bytes);

        // Named a file that never comes: it says so once its capability expires.
        let args = Serve {
            file: dir.path().join("never"),
            sha256: sha.clone(),
            size,
            expire: 1,
            bind: Some("127.0.0.1:0".into()),
            plain: false,
        };
        let e = serve(&args, &Capability::new(), &mut |_| {}, &|| false).expect_err("never");
        assert!(e.contains("not there, and no copy of it arriving"), "{e}");
    }

    /// Runs [`plain_fetch_command`] here with `token` on stdin: its exit code and stderr.
    fn plain_fetch(
        addr: SocketAddr,
        dest: &Path,
        sha: &str,
        size: u64,
        token: &str,
    ) -> (i32, String) {
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .args([
                "-c",
                &plain_fetch_command(addr, &dest.display().to_string(), sha, size),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(format!("{token}\n").as_bytes())
            .expect("token");
        drop(stdin);
        let out = child.wait_with_output().expect("wait");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    #[test]
    fn a_host_without_arbor_fetches_a_build_plain_once_and_keeps_it_only_if_its_sha256_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let (path, sha) = artifact(dir.path(), &bytes);
        let size = bytes.len() as u64;
        let serve_args = |file: PathBuf| Serve {
            file,
            sha256: sha.clone(),
            size,
            expire: 10,
            bind: Some("127.0.0.1:0".into()),
            plain: true,
        };
        let hex = |t: &[u8; 32]| data_encoding::HEXLOWER.encode(t);
        let cap = Capability::new();
        let (addr, server) = start(serve_args(path.clone()), cap.clone());
        let dest = dir.path().join("bin").join("arbor");
        std::fs::create_dir(dir.path().join("bin")).expect("mkdir");
        // A guessed token: the seeder sends nothing, nothing is kept.
        let (code, why) = plain_fetch(addr, &dest, &sha, size, &hex(&Capability::new().token));
        assert_eq!(code, 1, "{why}");
        assert!(why.contains("not kept"), "{why}");
        // The right one: kept, executable.
        let (code, why) = plain_fetch(addr, &dest, &sha, size, &hex(&cap.token));
        assert_eq!(code, 0, "{why}");
        assert_eq!(std::fs::read(&dest).expect("read"), bytes);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(server.join().expect("join"), Ok(size));
        // Used: the seeder is gone, the fetch says it could not connect.
        std::fs::remove_file(&dest).expect("rm");
        let (code, why) = plain_fetch(addr, &dest, &sha, size, &hex(&cap.token));
        assert_eq!(code, UNREACHABLE as i32, "{why}");
        // A seeder whose bytes are not the build (its file changed after it was hashed, as
        // a hostile one would send): refused by the sha256, nothing kept.
        let other = dir.path().join("other");
        std::fs::write(&other, &bytes).expect("write");
        let cap = Capability::new();
        let (addr, server) = start(serve_args(other.clone()), cap.clone());
        let mut changed = bytes.clone();
        changed[1000] ^= 1;
        std::fs::write(&other, &changed).expect("change");
        let (code, why) = plain_fetch(addr, &dest, &sha, size, &hex(&cap.token));
        assert_eq!(code, 1, "{why}");
        assert!(why.contains("not kept"), "{why}");
        let _ = server.join();
        let left: Vec<_> = std::fs::read_dir(dir.path().join("bin"))
            .expect("ls")
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_seeder_serves_only_a_verified_entry_and_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, sha) = artifact(dir.path(), b"right bytes");
        std::fs::write(&path, b"wrong bytes").expect("corrupt");
        let args = Serve {
            file: path.clone(),
            sha256: sha.clone(),
            size: 11,
            expire: 1,
            bind: Some("127.0.0.1:0".into()),
            plain: false,
        };
        let e = serve(
            &args,
            &Capability::new(),
            &mut |_| panic!("listened"),
            &|| false,
        )
        .expect_err("bad");
        assert!(e.contains("not served"), "{e}");
        std::fs::write(&path, b"right bytes").expect("fix");
        let (_, server) = start(args, Capability::new());
        let e = server.join().expect("join").expect_err("expired");
        assert!(e.contains("expired"), "{e}");
    }

    #[test]
    fn garbage_from_a_seeder_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let right = b"the artifact".to_vec();
        let sha = crate::engine::artifacts::sha256_hex(&right);
        let cap = Capability::new();
        let dest = dir.path().join("got");
        // A hostile seeder that knows the key seals other bytes: the sha256 catches it.
        let mut stream = Vec::new();
        send_sealed(
            &b"not the artifact".to_vec()[..12],
            &mut stream,
            &cap.key,
            &sha,
        )
        .expect("seal");
        let e = receive_sealed(&mut &stream[..], &dest, &cap.key, &sha, 12).expect_err("garbage");
        assert!(e.contains("not kept"), "{e}");
        // An impostor without the key, or a flipped bit: refused by the seal.
        let mut stream = Vec::new();
        send_sealed(&right[..], &mut stream, &Capability::new().key, &sha).expect("seal");
        let e = receive_sealed(&mut &stream[..], &dest, &cap.key, &sha, 12).expect_err("key");
        assert!(e.contains("authentication"), "{e}");
        let mut stream = Vec::new();
        send_sealed(&right[..], &mut stream, &cap.key, &sha).expect("seal");
        let mut flipped = stream.clone();
        flipped[7] ^= 1;
        let e = receive_sealed(&mut &flipped[..], &dest, &cap.key, &sha, 12).expect_err("bit");
        assert!(e.contains("authentication"), "{e}");
        // Cut short: refused.
        let e = receive_sealed(&mut &stream[..stream.len() - 1], &dest, &cap.key, &sha, 12)
            .expect_err("short");
        assert!(e.contains("ended early"), "{e}");
        assert!(std::fs::read_dir(dir.path()).expect("ls").next().is_none());
        // The real thing.
        receive_sealed(&mut &stream[..], &dest, &cap.key, &sha, 12).expect("right");
        assert_eq!(std::fs::read(&dest).expect("read"), right);
    }

    #[tokio::test]
    async fn the_first_claimant_seeds_and_a_failed_claim_is_claimed_again() {
        let board = Board::default();
        let never = CancellationToken::new();
        let Some(Claim::Mine(mine)) = board.claim("x", "r1", false, &never).await else {
            panic!("r1 claims x");
        };
        assert!(matches!(
            board.claim("x", "r2", false, &never).await,
            Some(Claim::Later)
        ));
        drop(mine);
        let Some(Claim::Mine(_again)) = board.claim("x", "r2", true, &never).await else {
            panic!("r2 claims x again after r1 failed");
        };
        assert!(Capability::parse(&Capability::new().line()).is_ok());
        assert!(Capability::parse("zz").is_err());
    }
}
