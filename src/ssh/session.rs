//! Connecting: TCP with a timeout, the SSH handshake, host key verification, and the
//! [`Session`] handle every other step works through.

use super::auth::{self, AuthOptions};
use super::error::{Cause, Result, SshError, Step};
use super::forward::{Connector, Routes};
use super::known_hosts::{self, CertVerdict, HostKeyOrder, KnownHosts, Verdict};
use russh::Channel;
use russh::client::ChannelOpenHandle;
use russh::client::{self, Msg};
use russh::keys::{Certificate, PublicKey, PublicKeyOrCertificate};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where to connect: a user on a host and port. `host` is a DNS name or an IP address
/// (IPv6 without brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    pub fn new(user: impl Into<String>, host: impl Into<String>, port: u16) -> Self {
        let host = host.into();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Target {
            user: user.into(),
            host,
            port,
        }
    }

    /// `host:port`, with IPv6 addresses in brackets: how errors name the host by default.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What to do with a host key that no known_hosts entry vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKeyPolicy {
    /// Refuse unknown and changed keys (the default).
    #[default]
    Strict,
    /// Record unknown keys in the user's known_hosts; still refuse changed keys.
    AcceptNew,
}

/// How host keys are checked.
#[derive(Debug, Clone, Default)]
pub struct HostKeyOptions {
    pub policy: HostKeyPolicy,
    /// Files searched, in order: usually ~/.ssh/known_hosts, the system-wide
    /// /etc/ssh/ssh_known_hosts and ssh_known_hosts2 ([`known_hosts::GLOBAL_FILES`]), plus any
    /// given with --known-hosts.
    pub known_hosts: Vec<PathBuf>,
    /// Extra entries as text (a relay gets its subtree's entries this way).
    pub extra_entries: String,
    /// Where accept-new records new keys (usually ~/.ssh/known_hosts).
    pub learn_into: Option<PathBuf>,
    /// OpenSSH client config files consulted for `HashKnownHosts` (usually ~/.ssh/config and
    /// /etc/ssh/ssh_config): when it says yes for the host, accept-new writes the name hashed.
    pub ssh_config: Vec<PathBuf>,
    /// A pinned key: when set, it alone decides.
    pub pinned: Option<PublicKey>,
    /// Under accept-new, keys learned are also sent here as (known_hosts name, "type base64"):
    /// how a relay reports keys learned at depth to the initiator.
    pub report_learned: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
}

/// Everything needed to open a session besides the target.
#[derive(Clone)]
pub struct ConnectOptions {
    /// How errors name this host (defaults to `host:port`).
    pub label: Option<String>,
    /// Bound on TCP connect plus the SSH handshake.
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the connection is given up (a link that may ride out
    /// an outage asks for enough to last it).
    pub keepalive_max: usize,
    pub host_keys: HostKeyOptions,
    pub auth: AuthOptions,
}

impl ConnectOptions {
    /// Options with arbor's defaults for `HOME`: ~/.ssh/known_hosts and the system-wide
    /// known_hosts files (as OpenSSH's defaults), default identities, the agent from
    /// SSH_AUTH_SOCK, a 10 s connect timeout, strict host keys.
    pub fn for_home(home: &std::path::Path) -> Self {
        let known = home.join(".ssh").join("known_hosts");
        let mut files = vec![known.clone()];
        files.extend(known_hosts::GLOBAL_FILES.iter().map(PathBuf::from));
        ConnectOptions {
            label: None,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            keepalive_max: 3,
            host_keys: HostKeyOptions {
                policy: HostKeyPolicy::Strict,
                known_hosts: files,
                extra_entries: String::new(),
                learn_into: Some(known),
                ssh_config: super::ssh_config::default_files(home),
                pinned: None,
                report_learned: None,
            },
            auth: AuthOptions::for_home(home),
        }
    }
}

/// An authenticated SSH connection to one host.
pub struct Session {
    label: String,
    handle: client::Handle<ClientHandler>,
    routes: Arc<Routes>,
    peer: SocketAddr,
    /// The ProxyJump hop this session runs through, kept open as long as this session and
    /// closed with it ([`connect_through`]).
    via: Option<Arc<Session>>,
    /// A duplicate of the TCP socket, for the kernel's view of the link; none through a jump
    /// host, whose socket is the jump host's.
    socket: Option<Arc<std::os::fd::OwnedFd>>,
}

impl Session {
    /// How errors name this host.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The address the TCP connection reached.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The kernel's view of this connection's sending side (`TCP_INFO`), where arbor holds
    /// its socket.
    pub fn link_info(&self) -> Option<super::LinkInfo> {
        super::LinkInfo::read(self.socket.as_deref()?)
    }

    pub(crate) fn handle(&self) -> &client::Handle<ClientHandler> {
        &self.handle
    }

    pub(crate) fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    pub(crate) fn error(&self, step: Step, cause: impl Into<Cause>) -> SshError {
        SshError::new(self.label.clone(), step, cause)
    }

    /// Opens a session channel (for exec or sftp).
    pub(crate) async fn open_channel(&self, step: Step) -> Result<Channel<Msg>> {
        self.handle
            .channel_open_session()
            .await
            .map_err(|e| self.error(step, e))
    }

    /// Serves forwarded agent channels (`auth-agent@openssh.com`) with `connector`. Without one,
    /// the server's attempts to open agent channels are refused.
    pub fn set_agent_connector(&self, connector: Arc<dyn Connector>) {
        self.routes.set_agent(connector);
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Ends the connection politely, then the ProxyJump hops it ran through.
    pub async fn disconnect(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "arbor done", "en")
            .await;
        let mut next = self.via.clone();
        while let Some(hop) = next {
            let _ = hop
                .handle
                .disconnect(russh::Disconnect::ByApplication, "arbor done", "en")
                .await;
            next = hop.via.clone();
        }
    }
}

/// Connects to `target`, verifies its host key, and authenticates.
pub async fn connect(target: &Target, options: &ConnectOptions) -> Result<Session> {
    connect_with(target, options, None).await
}

/// Like [`connect`], but the TCP connection is a direct-tcpip channel through `jump` (as
/// OpenSSH's ProxyJump): the target sees a connection from the jump host, and the SSH session
/// (host key check, auth, everything) is end to end between us and the target.
pub async fn connect_via(
    jump: &Session,
    target: &Target,
    options: &ConnectOptions,
) -> Result<Session> {
    connect_with(target, options, Some(jump)).await
}

/// Like [`connect_via`], but the new session owns `hop` (a ProxyJump hop opened for it alone):
/// the hop stays open as long as the session and is closed by its [`Session::disconnect`].
pub async fn connect_through(
    hop: Arc<Session>,
    target: &Target,
    options: &ConnectOptions,
) -> Result<Session> {
    let mut session = connect_with(target, options, Some(&hop)).await?;
    session.via = Some(hop);
    Ok(session)
}

async fn connect_with(
    target: &Target,
    options: &ConnectOptions,
    jump: Option<&Session>,
) -> Result<Session> {
    let label = options.label.clone().unwrap_or_else(|| target.address());
    let err = |step, cause: Cause| SshError::new(label.clone(), step, cause);

    let verdict = Arc::new(Mutex::new(None));
    let routes = Arc::new(Routes::default());
    let known = KnownHosts::load(&options.host_keys.known_hosts)
        .map(|mut k| {
            k.add_text(
                std::path::Path::new("(entries from the parent)"),
                &options.host_keys.extra_entries,
            );
            k
        })
        .map_err(|e| err(Step::HostKey, Cause::Io(e)))?;
    let name = known_hosts::host_key_name(&target.host, target.port);
    // Offer first the host-key algorithms known_hosts holds for this host, as OpenSSH does: a
    // host known only by its ECDSA key must not be asked for its Ed25519 key.
    let order = known.host_key_order(&name, options.host_keys.pinned.as_ref());
    let handler = ClientHandler {
        name,
        principal: target.host.clone(),
        options: options.host_keys.clone(),
        known,
        refusal: verdict.clone(),
        routes: routes.clone(),
    };
    let config = Arc::new(client_config(
        options.keepalive_interval,
        options.keepalive_max,
        order,
    ));

    let handshake = async {
        let connected = match jump {
            None => {
                let (socket, peer) = tcp_connect(target)
                    .await
                    .map_err(|c| err(Step::Connect, c))?;
                let kept = std::os::fd::AsFd::as_fd(&socket)
                    .try_clone_to_owned()
                    .ok()
                    .map(Arc::new);
                client::connect_stream(config, socket, handler)
                    .await
                    .map(|h| (h, peer, kept))
            }
            Some(jump) => {
                let channel = jump
                    .handle()
                    .channel_open_direct_tcpip(
                        target.host.clone(),
                        u32::from(target.port),
                        "127.0.0.1",
                        0,
                    )
                    .await
                    .map_err(|e| {
                        err(
                            Step::Connect,
                            Cause::Other(format!("through {}: {e}", jump.label())),
                        )
                    })?;
                let peer = format!("{}:{}", target.host, target.port)
                    .parse()
                    .unwrap_or_else(|_| jump.peer());
                client::connect_stream(config, channel.into_stream(), handler)
                    .await
                    .map(|h| (h, peer, None))
            }
        };
        match connected {
            Ok(pair) => Ok(pair),
            Err(e) => {
                let refusal = verdict.lock().ok().and_then(|mut v| v.take());
                Err(match refusal {
                    Some(cause) => err(Step::HostKey, cause),
                    None => err(Step::Connect, Cause::Protocol(e)),
                })
            }
        }
    };
    let (mut handle, peer, socket) = tokio::time::timeout(options.connect_timeout, handshake)
        .await
        .map_err(|_| err(Step::Connect, Cause::Timeout(options.connect_timeout)))??;

    auth::authenticate(&mut handle, &label, &target.user, &options.auth).await?;
    Ok(Session {
        label,
        handle,
        routes,
        peer,
        via: None,
        socket,
    })
}

fn client_config(keepalive: Duration, keepalive_max: usize, order: HostKeyOrder) -> client::Config {
    // AES-GCM first: hardware-accelerated almost everywhere, and the fastest for bulk copies.
    let preferred = russh::Preferred {
        key: std::borrow::Cow::Owned(order.keys),
        host_key_certificates: std::borrow::Cow::Owned(order.certificates),
        cipher: std::borrow::Cow::Owned(vec![
            russh::cipher::AES_256_GCM,
            russh::cipher::AES_128_GCM,
            russh::cipher::CHACHA20_POLY1305,
            russh::cipher::AES_256_CTR,
            russh::cipher::AES_128_CTR,
        ]),
        ..Default::default()
    };
    client::Config {
        keepalive_interval: Some(keepalive),
        keepalive_max: keepalive_max.max(1),
        nodelay: true,
        // Large windows keep bulk uploads from stalling on window adjustments.
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: 32768,
        channel_buffer_size: 256,
        preferred,
        ..Default::default()
    }
}

async fn tcp_connect(
    target: &Target,
) -> std::result::Result<(tokio::net::TcpStream, SocketAddr), Cause> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| Cause::Resolve(format!("{}: {e}", target.host)))?
        .collect();
    if addrs.is_empty() {
        return Err(Cause::Resolve(format!("{}: no addresses", target.host)));
    }
    let mut last = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(socket) => {
                let _ = socket.set_nodelay(true);
                return Ok((socket, addr));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Cause::Io(last.unwrap_or_else(|| {
        std::io::Error::other("no address worked")
    })))
}

/// russh's callbacks for one connection: host key checks and channels the server opens.
pub(crate) struct ClientHandler {
    /// The host's known_hosts name (`host` or `[host]:port`).
    name: String,
    /// The name a host certificate must list as a principal: the host as connected to.
    principal: String,
    options: HostKeyOptions,
    known: KnownHosts,
    refusal: Arc<Mutex<Option<Cause>>>,
    routes: Arc<Routes>,
}

impl ClientHandler {
    /// Judges a host certificate as OpenSSH does: valid and signed by an authority that an
    /// `@cert-authority` line names for this host; a certificate from an authority no line
    /// names falls back to the plain key inside it.
    fn judge_certificate(&self, cert: &Certificate) -> std::result::Result<(), Cause> {
        let key = PublicKey::from(cert.public_key().clone());
        let fingerprint = known_hosts::fingerprint(&key);
        if self.options.pinned.is_some() {
            return self.judge(&key);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match self
            .known
            .verify_certificate(&self.name, &self.principal, cert, now)
        {
            CertVerdict::Trusted(origin) => {
                tracing::debug!(
                    "{}: host certificate {:?} (serial {}) accepted by the CA at {origin}",
                    self.name,
                    cert.key_id(),
                    cert.serial()
                );
                Ok(())
            }
            CertVerdict::Invalid { origin, reason } => Err(Cause::HostCertInvalid {
                name: self.name.clone(),
                fingerprint,
                origin: origin.to_string(),
                reason,
            }),
            CertVerdict::Revoked(origin) => Err(Cause::HostKeyRevoked {
                name: self.name.clone(),
                fingerprint,
                origin: origin.to_string(),
            }),
            CertVerdict::UnknownAuthority => match self.judge(&key) {
                Err(Cause::HostKeyUnknown { searched, .. }) => {
                    Err(Cause::HostCertUnknownAuthority {
                        name: self.name.clone(),
                        fingerprint,
                        authority: known_hosts::fingerprint(&PublicKey::from(
                            cert.signature_key().clone(),
                        )),
                        searched,
                    })
                }
                other => other,
            },
        }
    }

    fn judge(&self, key: &PublicKey) -> std::result::Result<(), Cause> {
        let fingerprint = known_hosts::fingerprint(key);
        let name = self.name.clone();
        if let Some(pinned) = &self.options.pinned {
            return if pinned.key_data() == key.key_data() {
                Ok(())
            } else {
                Err(Cause::HostKeyPinMismatch {
                    name,
                    fingerprint,
                    pinned: known_hosts::fingerprint(pinned),
                })
            };
        }
        match self.known.verify(&self.name, key) {
            Verdict::Trusted(_) => Ok(()),
            Verdict::Changed(origin) => Err(Cause::HostKeyChanged {
                name,
                fingerprint,
                origin: origin.to_string(),
            }),
            Verdict::Revoked(origin) => Err(Cause::HostKeyRevoked {
                name,
                fingerprint,
                origin: origin.to_string(),
            }),
            Verdict::Unknown => match (
                self.options.policy,
                &self.options.learn_into,
                &self.options.report_learned,
            ) {
                (HostKeyPolicy::AcceptNew, learn_into, report)
                    if learn_into.is_some() || report.is_some() =>
                {
                    if let Some(file) = learn_into {
                        let hashed = super::ssh_config::hash_known_hosts(
                            &self.options.ssh_config,
                            &self.principal,
                        );
                        let record = if hashed {
                            known_hosts::append_hashed
                        } else {
                            known_hosts::append
                        };
                        record(file, &self.name, key).map_err(|e| {
                            Cause::HostKeyRecord(format!("{}: {e}", file.display()))
                        })?;
                        tracing::warn!(
                            "{}: recorded new host key {fingerprint} in {}{}",
                            self.name,
                            file.display(),
                            if hashed {
                                " (hashed: HashKnownHosts yes)"
                            } else {
                                ""
                            }
                        );
                    }
                    if let Some(report) = report {
                        let text = key
                            .to_openssh()
                            .map_err(|e| Cause::HostKeyRecord(format!("encoding the key: {e}")))?;
                        let _ = report.send((self.name.clone(), text));
                    }
                    Ok(())
                }
                _ => Err(Cause::HostKeyUnknown {
                    name,
                    fingerprint,
                    searched: self.searched(),
                }),
            },
        }
    }

    fn searched(&self) -> String {
        let mut files: Vec<String> = self
            .options
            .known_hosts
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        if !self.options.extra_entries.is_empty() {
            files.push("entries from the parent".into());
        }
        files.join(", ")
    }
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> std::result::Result<bool, Self::Error> {
        let judged = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.judge(key),
            PublicKeyOrCertificate::Certificate(cert) => self.judge_certificate(cert),
        };
        match judged {
            Ok(()) => Ok(true),
            Err(cause) => {
                if let Ok(mut slot) = self.refusal.lock() {
                    *slot = Some(cause);
                }
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> std::result::Result<(), Self::Error> {
        match self.routes.tcp(connected_address, connected_port) {
            Some(connector) => {
                reply.accept().await;
                connector.connect(super::forward::boxed(channel.into_stream()));
            }
            None => drop(reply),
        }
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> std::result::Result<(), Self::Error> {
        match self.routes.unix(socket_path) {
            Some(connector) => {
                reply.accept().await;
                connector.connect(super::forward::boxed(channel.into_stream()));
            }
            None => drop(reply),
        }
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> std::result::Result<(), Self::Error> {
        match self.routes.agent() {
            Some(connector) => {
                reply.accept().await;
                connector.connect(super::forward::boxed(channel.into_stream()));
            }
            None => drop(reply),
        }
        Ok(())
    }
}

/// A target parsed from `ssh://[user[:password]@]host[:port]`, and the password if the URL
/// carried one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    pub target: Target,
    pub password: Option<String>,
    /// The URL named the user (else `target.user` is the default).
    pub user_given: bool,
    /// The URL named the port (else `target.port` is 22).
    pub port_given: bool,
}

impl Target {
    /// Parses `ssh://[user[:password]@]host[:port]` (IPv6 in brackets). The default port is 22
    /// and the default user is `default_user`, as with ssh.
    pub fn parse_url(url: &str, default_user: &str) -> std::result::Result<TargetUrl, String> {
        let rest = url
            .strip_prefix("ssh://")
            .ok_or_else(|| format!("{url:?}: expected ssh://[user[:password]@]host[:port]"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let user_given = userinfo.is_some();
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (user.to_string(), Some(pass.to_string())),
                None => (u.to_string(), None),
            },
            None => (default_user.to_string(), None),
        };
        if user.is_empty() {
            return Err(format!("{url:?}: empty user name"));
        }
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in an IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(format!("{url:?}: unexpected {after:?} after the address")),
            };
            (host.to_string(), port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) if !p.contains(':') => (h.to_string(), Some(p)),
                Some(_) => {
                    return Err(format!(
                        "{url:?}: put an IPv6 address in brackets: [addr]:port"
                    ));
                }
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let port_given = port.is_some();
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
            None => 22,
        };
        Ok(TargetUrl {
            target: Target::new(user, host, port),
            password,
            user_given,
            port_given,
        })
    }
}

/// The local user's name, the default SSH user (as with ssh).
pub fn local_user() -> String {
    // SAFETY: getpwuid returns a pointer into static storage or null; we copy the name at once.
    let from_passwd = unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            None
        } else {
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_str()
                .ok()
                .map(str::to_string)
        }
    };
    from_passwd
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".into())
}

#[cfg(test)]
mod url_tests {
    use super::*;

    fn parse(url: &str) -> TargetUrl {
        Target::parse_url(url, "me").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn urls_parse_like_ssh() {
        assert_eq!(parse("ssh://h").target, Target::new("me", "h", 22));
        assert_eq!(
            parse("ssh://root@10.0.0.5:2222").target,
            Target::new("root", "10.0.0.5", 2222)
        );
        let t = parse("ssh://u:s3cret@[fd00::1]:22");
        assert_eq!(t.target, Target::new("u", "fd00::1", 22));
        assert_eq!(t.password.as_deref(), Some("s3cret"));
        assert_eq!(parse("ssh://[fd00::1]").target.address(), "[fd00::1]:22");
    }

    #[test]
    fn defaults_read_the_users_and_the_system_known_hosts() {
        let o = ConnectOptions::for_home(std::path::Path::new("/home/u"));
        assert_eq!(
            o.host_keys.known_hosts,
            vec![
                PathBuf::from("/home/u/.ssh/known_hosts"),
                PathBuf::from("/etc/ssh/ssh_known_hosts"),
                PathBuf::from("/etc/ssh/ssh_known_hosts2"),
            ]
        );
        // New keys go to the user's file only.
        assert_eq!(
            o.host_keys.learn_into,
            Some(PathBuf::from("/home/u/.ssh/known_hosts"))
        );
        assert_eq!(
            o.host_keys.ssh_config,
            vec![
                PathBuf::from("/home/u/.ssh/config"),
                PathBuf::from("/etc/ssh/ssh_config"),
            ]
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        let err = |u: &str| Target::parse_url(u, "me").expect_err(u);
        assert!(err("root@h").contains("expected ssh://"));
        assert!(err("ssh://h:99999").contains("bad port"));
        assert!(err("ssh://fd00::1").contains("brackets"));
        assert!(err("ssh://[fd00::1").contains("unclosed"));
        assert!(err("ssh://@h").contains("empty user"));
    }
}
