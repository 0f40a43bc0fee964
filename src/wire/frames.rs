//! The frame types. Control flows down ([`Down`]), events flow up ([`Up`]).

use super::{PROTOCOL_VERSION, WireError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A host's place in the tree: names from the first hop down, shown as `r1/l1-2`.
/// The initiator is the empty path.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostPath(Vec<String>);

impl HostPath {
    pub fn root() -> Self {
        HostPath(Vec::new())
    }

    pub fn parse(text: &str) -> Self {
        HostPath(
            text.split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        )
    }

    pub fn child(&self, name: &str) -> Self {
        let mut v = self.0.clone();
        v.push(name.to_string());
        HostPath(v)
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn depth(&self) -> usize {
        self.0.len()
    }

    /// The path of the host above this one (the root for a top-level host and the root).
    pub fn parent(&self) -> HostPath {
        let mut v = self.0.clone();
        v.pop();
        HostPath(v)
    }

    /// The host's own name (the last segment).
    pub fn name(&self) -> &str {
        self.0.last().map_or("", String::as_str)
    }

    /// The first segment below `self` on the way to `other`, if `other` is below `self`.
    pub fn next_hop<'a>(&self, other: &'a HostPath) -> Option<&'a str> {
        if other.0.len() > self.0.len() && other.0.starts_with(&self.0) {
            Some(&other.0[self.0.len()])
        } else {
            None
        }
    }

    /// Prefixes `self` with `parent`: how a relay re-tags its children's events.
    pub fn under(&self, parent: &HostPath) -> HostPath {
        let mut v = parent.0.clone();
        v.extend(self.0.iter().cloned());
        HostPath(v)
    }
}

impl std::fmt::Display for HostPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("(initiator)")
        } else {
            f.write_str(&self.0.join("/"))
        }
    }
}

/// The first frame each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// arbor's version, for messages.
    pub version: String,
}

impl Hello {
    pub fn ours() -> Self {
        Hello {
            protocol: PROTOCOL_VERSION,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Checks the peer's hello against ours.
    pub fn check(&self) -> Result<(), WireError> {
        if self.protocol == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(WireError::Version {
                ours: PROTOCOL_VERSION,
                theirs: self.protocol,
            })
        }
    }
}

/// How a node reaches a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildMode {
    /// arbor runs on the child, which stages its own children.
    #[default]
    Relay,
    /// A pure TCP hop: nothing runs there; its children are reached through it.
    Jump,
}

/// One child in a subtree sent down to a relay. The initiator resolves every host through the
/// operator's ssh_config (docs/ssh.md): `host`, `user`, `port` and the fields below are what it
/// resolved, so relays, which have no ssh_config of the operator's, connect as it would.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildSpec {
    /// Identity in the run (unique in the whole tree).
    pub name: String,
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Key into [`Start::graphs`].
    pub graph: Option<String>,
    #[serde(default)]
    pub mode: ChildMode,
    /// A pinned host key, "type base64".
    pub host_key: Option<String>,
    /// A key path on the node that connects.
    pub identity: Option<String>,
    /// A password from the target URL (insecure; goes down the control channel only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    pub cconns: Option<usize>,
    #[serde(default)]
    pub children: Vec<ChildSpec>,
    /// The host's store credential (the initiator makes one per host); goes down the control
    /// channel only, to the relays above the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The store user that credential is the password of, when it is not the host's name (an
    /// etcd given with --seeds: users named per run, `arbor.<run>.<host>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_user: Option<String>,
    /// ssh_config `IdentityFile`s: key paths on the initiator, tried there before any agent key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_files: Vec<String>,
    /// The public keys ("type base64") of `identity` and `identity_files` that the initiator
    /// could read: a relay signs with these agent keys first (and only these with
    /// `identities_only`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_keys: Vec<String>,
    /// ssh_config `IdentitiesOnly yes`: no agent key but the named ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub identities_only: bool,
    /// Seconds for the TCP connect and SSH handshake, when not the run's (ssh_config
    /// `ConnectTimeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<u64>,
    /// This host's host-key policy, when not the run's (ssh_config `StrictHostKeyChecking`):
    /// true for accept-new, false for strict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_new: Option<bool>,
    /// ssh_config `ProxyJump`: the hops, first hop first, through which the connecting node
    /// reaches this host (each hop a host of its own, with no graph and no children).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jumps: Vec<ChildSpec>,
    /// ssh_config `UserKnownHostsFile` for this host, on the initiator (`None`: the default
    /// ~/.ssh/known_hosts). Never sent: relays check keys against the lines they receive.
    #[serde(skip)]
    pub user_known_hosts: Option<Vec<std::path::PathBuf>>,
    /// ssh_config `GlobalKnownHostsFile`, likewise (`None`: /etc/ssh/ssh_known_hosts{,2}).
    #[serde(skip)]
    pub global_known_hosts: Option<Vec<std::path::PathBuf>>,
    /// The artifacts this host's own graph names with `source:`, by the source as written
    /// (after `{{hostname}}`): what its parent puts in its cache before starting it, and what
    /// its file resources read. Every relay above it receives them too, once each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, ArtifactRef>,
    /// The manifests of the directories this host's own graph names with `source:` (by the
    /// source as written): each file of them is an artifact, put in its cache like the rest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trees: BTreeMap<String, crate::engine::artifacts::Manifest>,
    /// Start arbor there as another user through sudo (`become`), after logging in as `user`.
    #[serde(rename = "become", default, skip_serializing_if = "Option::is_none")]
    pub escalate: Option<Become>,
    /// `password` was asked of the operator (`-k`) or read from `--password-file`, not taken
    /// from a URL or topology file (which earns a warning each use).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub password_asked: bool,
    /// Its siblings can reach it and it them (`seed_siblings: true` on its parent's entry,
    /// or at the top of the topology file): an artifact one of them holds is fetched from it
    /// rather than copied again by the parent (`node::sibling`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seed_siblings: bool,
    /// The UDP ports it listens on for QUIC (its topology entry's `quic_ports`), beating
    /// `--quic-ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_ports: Option<(u16, u16)>,
}

/// How arbor is started on a host that forbids root logins: `sudo` to `user` (root), with
/// `password` fed to `sudo -S` on the exec channel when sudo wants one (never on argv). The
/// password goes down the control channel only, to the relays above the host.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Become {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl std::fmt::Debug for Become {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Become")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A file's content as a content-addressed blob (`source:` in a graph): kept in every node's
/// cache as `~/.cache/arbor/artifacts/<sha256>`, checked by its sha256 before any use.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub sha256: String,
    pub size: u64,
}

impl ChildSpec {
    /// This host and the ProxyJump hops used to reach it.
    pub fn with_jumps(&self) -> impl Iterator<Item = &ChildSpec> {
        std::iter::once(self).chain(self.jumps.iter())
    }
}

/// A build of arbor a node can have its parent fetch for it: the hosts of `platform` run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRef {
    /// `uname -sm` of its hosts, e.g. "Linux aarch64".
    pub platform: String,
    pub sha256: String,
    pub size: u64,
}

/// The settings of a run that apply at every depth: built once at the initiator from its
/// flags and topology, sent down in every [`Start`], and used by each node to stage its own
/// children exactly as it was staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeConfig {
    /// The run's id: every store key of the run is under `/arbor/runs/<run>/`.
    pub run: String,
    /// Seconds for a child's TCP connect and SSH handshake.
    pub connect_timeout: u64,
    /// Seconds for a started child's arbor to say hello.
    pub hello_timeout: u64,
    /// Log level: 0 info, 1 debug, 2 trace.
    pub verbosity: u8,
    /// Warnings and errors only (`-q`), whatever `verbosity` says.
    #[serde(default)]
    pub quiet: bool,
    /// Where working dirs are created on hosts.
    pub remote_tmp: String,
    /// Copy the binary into each working dir instead of the host's cache.
    pub no_caching: bool,
    /// The cap on each host's cache (`--cache-max-size`, as written: `node::cache::MaxSize`).
    #[serde(default = "default_cache_max_size")]
    pub cache_max_size: String,
    /// When copies are compressed (`--compress`): see [`Compress`].
    #[serde(default)]
    pub compress: Compress,
    /// Record unknown host keys (reported up to the initiator) instead of refusing them.
    pub accept_new: bool,
    /// At most this many children being set up at once (0: no limit).
    pub cconns: usize,
    pub converged_timeout: Option<u64>,
    pub noop: bool,
    /// `--diff`: each host reports what its resources change (or would) as diffs.
    #[serde(default)]
    pub diff: bool,
    /// Seconds without any frame from the other end after which a link counts as down: the
    /// parent fails the child, the child tears its subtree down (`--link-timeout`).
    #[serde(default = "default_link_timeout")]
    pub link_timeout: u64,
    /// Seconds a link may stay down, once counted down, before giving up on it: the child
    /// keeps its subtree running that long, then tears it down; the parent shows the host
    /// as reconnecting that long, then fails it (`--reconnect-grace`).
    #[serde(default = "default_reconnect_grace")]
    pub reconnect_grace: u64,
    /// What links run on once SSH has started a child (`--transport`).
    #[serde(default)]
    pub transport: Transport,
    /// The UDP ports a child listens on for QUIC (`--quic-ports`): `None` for any free port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic_ports: Option<(u16, u16)>,
    /// How each QUIC link's sender controls congestion (`--congestion`).
    #[serde(default)]
    pub congestion: crate::wire::quic::Congestion,
    /// Every build of arbor the run has, for children of other platforms: a node that lacks
    /// one asks its parent for it (`Up::Fetch`).
    pub builds: Vec<BuildRef>,
}

/// `--compress`: when copies between nodes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// Never: every copy is plain, and no delta is sent.
    Never,
    /// At a level chosen from each link's measured rate: none on a LAN, more on thinner links
    /// (`node::transfer::level_for`).
    #[default]
    Auto,
    /// Always, at the level the link's rate gives, and at least the lowest.
    Always,
}

impl Compress {
    pub fn parse(s: &str) -> Option<Compress> {
        match s {
            "never" => Some(Compress::Never),
            "auto" => Some(Compress::Auto),
            "always" => Some(Compress::Always),
            _ => None,
        }
    }
}

/// `--transport`: what a link between a parent and its child runs on once SSH has staged and
/// started the child (docs/remote.md, "QUIC").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The SSH exec channel only.
    Ssh,
    /// QUIC, or the child fails when it cannot be set up.
    Quic,
    /// QUIC when UDP gets through within a second, the SSH channel otherwise.
    #[default]
    Auto,
}

impl Transport {
    pub fn parse(s: &str) -> Option<Transport> {
        match s {
            "ssh" => Some(Transport::Ssh),
            "quic" => Some(Transport::Quic),
            "auto" => Some(Transport::Auto),
            _ => None,
        }
    }
}

/// The parent's side of a QUIC link, in a child's [`Start`]: the parent will connect over QUIC
/// presenting the certificate with this sha256 (the only one the child accepts), to a UDP
/// port of `ports` (`None`: any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuicStart {
    pub parent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<(u16, u16)>,
}

/// [`NodeConfig::link_timeout`] unless told otherwise.
pub const LINK_TIMEOUT: u64 = 60;

/// How often each end of a link sends a heartbeat: every 5 s, or more often for a short link
/// timeout, so that at least four beats fit in one.
pub fn heartbeat_every(link_timeout: u64) -> std::time::Duration {
    std::time::Duration::from_millis((link_timeout * 1000 / 4).clamp(250, 5000))
}

fn default_link_timeout() -> u64 {
    LINK_TIMEOUT
}

/// [`NodeConfig::reconnect_grace`] unless told otherwise.
pub const RECONNECT_GRACE: u64 = 60;

fn default_reconnect_grace() -> u64 {
    RECONNECT_GRACE
}

fn default_cache_max_size() -> String {
    crate::node::cache::DEFAULT_MAX_SIZE.to_string()
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            run: String::new(),
            connect_timeout: 10,
            hello_timeout: 20,
            verbosity: 0,
            quiet: false,
            remote_tmp: "/tmp".into(),
            no_caching: false,
            cache_max_size: default_cache_max_size(),
            compress: Compress::Auto,
            accept_new: false,
            cconns: 64,
            converged_timeout: None,
            noop: false,
            diff: false,
            link_timeout: LINK_TIMEOUT,
            reconnect_grace: RECONNECT_GRACE,
            transport: Transport::default(),
            quic_ports: None,
            congestion: crate::wire::quic::Congestion::default(),
            builds: Vec::new(),
        }
    }
}

/// Run parameters for a node: everything it needs that must not appear on a command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// This node's name in the run.
    pub hostname: String,
    /// This node's path from the initiator.
    pub path: HostPath,
    /// Key into `graphs` for this node's own graph.
    pub graph: Option<String>,
    /// Graph texts by name, each sent once for the whole subtree.
    pub graphs: BTreeMap<String, String>,
    pub children: Vec<ChildSpec>,
    /// known_hosts lines for this node's subtree.
    pub known_hosts: String,
    /// The artifacts this node's own graph names (its `ChildSpec::artifacts`), already in its
    /// cache (or its working dir with --no-caching) when it starts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, ArtifactRef>,
    /// Its own graph's source directories (its `ChildSpec::trees`), their files in its cache.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trees: BTreeMap<String, crate::engine::artifacts::Manifest>,
    /// The run's settings, for this node and its subtree.
    pub config: NodeConfig,
    /// This node's store credential (its password), when the store checks credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The store user `credential` belongs to; `None`: the user named `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_user: Option<String>,
    /// `arbor exec`: instead of running graphs, run this command on the targeted hosts of the
    /// subtree (`children`, already pruned to the paths that lead to targets). No store, no
    /// engine: the node stages only the children that relay to targets, and exits when every
    /// child is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecJob>,
    /// Set when the parent will move the link onto QUIC: the child listens, and says where
    /// (`Up::Quic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quic: Option<QuicStart>,
    /// Artifacts of this node's subtree (sha256s) the parent is still putting into its cache
    /// as it starts: a relay stages its children meanwhile, a copy of one of these to them
    /// waits for `Down::Arrived`, and so does the node's own engine reading one of its own
    /// (crate::engine::artifacts::Arrival).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arriving: Vec<String>,
}

/// An ad-hoc command (`arbor exec`) for a subtree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecJob {
    /// The command line, run by each target's login shell as ssh would run it.
    pub command: String,
    /// The names of the hosts, in the receiving node's subtree only, that run it. The others
    /// in the subtree only relay to them.
    pub targets: Vec<String>,
}

/// Control frames, parent to child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Down {
    Hello(Hello),
    Start(Box<Start>),
    /// A new text for graph `name`: every host in the subtree using it applies the difference.
    Graph {
        name: String,
        text: String,
    },
    /// Stop: the subtree tears down bottom-up and exits.
    Shutdown {
        reason: String,
    },
    /// The answer to `Up::Fetch`: the build is in this node's cache at `Ok(path)`, or why not.
    Fetched {
        sha256: String,
        result: Result<String, String>,
    },
    /// The parent is still there ([`heartbeat_every`]).
    Heartbeat,
    /// A heartbeat that also acknowledges every numbered frame up through `acked`
    /// ([`resume`](super::resume); not `seq`, the numbered envelope's own field).
    Ack {
        acked: u64,
    },
    /// The one-time token that lets the parent re-attach to this node over a fresh SSH
    /// connection (`arbor reattach`, crate::node::reattach); each replaces the one before.
    Reattach {
        token: String,
    },
    /// The link stays on SSH: the parent could not (or would not) move it onto QUIC.
    NoQuic,
    /// An artifact of `Start::arriving` is in this relay's cache now, or (`error`) will not
    /// be: the parent's copy failed, and the children that need it fail with this reason.
    Arrived {
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// A host's state, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HostState {
    /// Being staged: connect, copy, tunnel, exec.
    Staging {
        step: String,
    },
    Running,
    Converged,
    /// Was converged, then something changed.
    Changed,
    /// Settled (nothing left to do, nothing changing) but some resources failed.
    Unhealthy {
        failures: Vec<String>,
    },
    Failed {
        cause: String,
    },
    /// Its link is down (nothing from it for the link timeout); its subtree keeps running,
    /// and the link may come back within `grace` seconds; past them the host fails.
    Reconnecting {
        grace: u64,
    },
    /// Ended cleanly.
    Exited,
}

/// What happened on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    Log {
        line: String,
        #[serde(default)]
        stderr: bool,
    },
    State(HostState),
    Transfer {
        what: String,
        sent: u64,
        total: u64,
        cached: bool,
    },
    /// A host key learned under accept-new, for the initiator's known_hosts.
    KnownHost {
        name: String,
        key: String,
    },
    /// Lines of an ad-hoc command's output (`arbor exec`), joined by `\n`, without the last
    /// newline: as many whole lines as fit in [`MAX_LINE`](super::MAX_LINE) bytes once
    /// JSON-escaped ([`pack_lines`]); a longer line comes in pieces, each a line of its own.
    Output {
        lines: String,
        #[serde(default)]
        stderr: bool,
    },
    /// `--diff`: what `resource` (`file[motd]`) changed on the host, or would change under
    /// `--noop`, as lines without newlines, capped by the host (`engine::diff`) so that the
    /// event fits a frame.
    Diff {
        resource: String,
        lines: Vec<String>,
    },
    /// The link from the host's parent to it runs on `transport` (`quic` or `ssh`) from now
    /// on; `note` says why it is not on QUIC when QUIC was tried.
    Link {
        transport: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// The ad-hoc command ended on the host: its exit code (128 + N when signal N killed it),
    /// and the signal's name when the server reported one.
    Ended {
        code: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
    },
}

/// How many bytes `c` takes inside a JSON string: a frame carries the escaped form, so a line
/// of control characters is up to six times its own size on the link.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// How many bytes `text` takes inside a JSON string.
fn json_size(text: &str) -> usize {
    text.chars().map(json_len).sum()
}

/// `lines` packed for `Output` events: each text is whole lines joined by `\n` and takes at
/// most [`MAX_LINE`](super::MAX_LINE) bytes once JSON-escaped; a line too long for one is cut
/// into pieces ([`line_pieces`]), each a line of its own. Nothing for no lines.
pub fn pack_lines<S: AsRef<str>>(lines: &[S]) -> Vec<String> {
    let mut packed = Vec::new();
    let mut current = String::new();
    let mut size = 0;
    let mut any = false;
    for line in lines {
        for piece in line_pieces(line.as_ref()) {
            let piece_size = json_size(piece);
            // A separator `\n` is two bytes escaped.
            if any && size + 2 + piece_size > super::MAX_LINE {
                packed.push(std::mem::take(&mut current));
                size = 0;
                any = false;
            }
            if any {
                current.push('\n');
                size += 2;
            }
            current.push_str(piece);
            size += piece_size;
            any = true;
        }
    }
    if any {
        packed.push(current);
    }
    packed
}

/// The length of the longest prefix of `text` (at a character boundary) whose JSON form is at
/// most [`MAX_LINE`](super::MAX_LINE) bytes.
fn fitting_prefix(text: &str) -> usize {
    let mut size = 0;
    for (at, c) in text.char_indices() {
        size += json_len(c);
        if size > super::MAX_LINE {
            return at;
        }
    }
    text.len()
}

/// `line` cut so that it takes at most [`MAX_LINE`](super::MAX_LINE) bytes in a frame (at a
/// character boundary), marked when cut.
pub fn cut_line(line: &str) -> String {
    let end = fitting_prefix(line);
    if end == line.len() {
        return line.to_string();
    }
    format!("{}… (cut at {} bytes)", &line[..end], super::MAX_LINE)
}

/// `line` in pieces that each take at most [`MAX_LINE`](super::MAX_LINE) bytes in a frame, so
/// that an event carrying one always fits in [`MAX_UP_FRAME`](super::MAX_UP_FRAME) whatever
/// the text (control characters are escaped six times their size). An empty line is one
/// empty piece.
pub fn line_pieces(line: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = line;
    loop {
        let end = fitting_prefix(rest);
        pieces.push(&rest[..end]);
        rest = &rest[end..];
        if rest.is_empty() {
            return pieces;
        }
    }
}

/// An event tagged with the host it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub host: HostPath,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Event frames, child to parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Up {
    Hello(Hello),
    Event(Event),
    /// Copy the build with this sha256 (one of `NodeConfig::builds`) into this node's cache:
    /// a child of this node runs on its platform.
    Fetch {
        sha256: String,
    },
    /// The child is still there ([`heartbeat_every`]).
    Heartbeat,
    /// A heartbeat that also acknowledges every numbered frame down through `acked`
    /// ([`resume`](super::resume); not `seq`, the numbered envelope's own field).
    Ack {
        acked: u64,
    },
    /// The answer to a re-attach (crate::node::reattach): the token was good, and this node
    /// took every numbered frame down through `acked`; it replays what came after.
    Resumed {
        acked: u64,
    },
    /// The answer to a re-attach with a wrong or used token: nothing else follows.
    Refused {
        reason: String,
    },
    /// The node's last frame: it exits with this code. Over QUIC, where the exit status of
    /// the SSH channel may never come (that connection gone), this is how it ended.
    Bye {
        code: u8,
    },
    /// The child listens for its parent's QUIC connection on this UDP port, with the
    /// certificate of this sha256 (the answer to [`Start::quic`]), or could not (`error`).
    Quic {
        port: u16,
        fingerprint: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Up {
    pub fn hello() -> Self {
        Up::Hello(Hello::ours())
    }
}

impl Down {
    pub fn hello() -> Self {
        Down::Hello(Hello::ours())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_paths_route_and_retag() {
        let r1 = HostPath::parse("r1");
        let leaf = HostPath::parse("r1/l1-2");
        assert_eq!(leaf.to_string(), "r1/l1-2");
        assert_eq!(r1.next_hop(&leaf), Some("l1-2"));
        assert_eq!(HostPath::root().next_hop(&leaf), Some("r1"));
        assert_eq!(leaf.next_hop(&r1), None);
        assert_eq!(HostPath::parse("l1-2").under(&r1), leaf);
        assert_eq!(leaf.name(), "l1-2");
        assert_eq!(leaf.depth(), 2);
    }

    #[test]
    fn hello_mismatch_names_both_versions() {
        let theirs = Hello {
            protocol: PROTOCOL_VERSION + 1,
            version: "9.9.9".into(),
        };
        let err = theirs.check().expect_err("mismatch");
        assert_eq!(
            err.to_string(),
            format!(
                "protocol mismatch: this side speaks version {PROTOCOL_VERSION}, the other side {}",
                PROTOCOL_VERSION + 1
            )
        );
    }

    #[test]
    fn a_line_of_control_characters_fits_in_a_frame_once_escaped() {
        use crate::wire::{MAX_LINE, MAX_UP_FRAME};
        let nasty = "\u{1}".repeat(MAX_LINE);
        let pieces = line_pieces(&nasty);
        assert!(pieces.len() >= 6, "{} pieces", pieces.len());
        assert_eq!(pieces.concat(), nasty);
        for piece in &pieces {
            let frame = serde_json::to_vec(&Up::Event(Event {
                host: HostPath::parse("r1/l1-2"),
                kind: EventKind::Output {
                    lines: piece.to_string(),
                    stderr: false,
                },
            }))
            .expect("json");
            assert!(frame.len() <= MAX_LINE + 200, "{} bytes", frame.len());
            assert!(frame.len() < MAX_UP_FRAME);
        }
        assert_eq!(line_pieces(""), [""]);
        assert_eq!(line_pieces("plain"), ["plain"]);
        let cut = cut_line(&nasty);
        assert!(cut.ends_with(&format!("(cut at {MAX_LINE} bytes)")));
        assert!(serde_json::to_vec(&cut).expect("json").len() <= MAX_LINE + 64);
        let long = "é".repeat(MAX_LINE);
        let pieces = line_pieces(&long);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].len(), MAX_LINE);
    }

    #[test]
    fn lines_are_packed_whole_into_texts_that_fit_a_frame() {
        use crate::wire::MAX_LINE;
        assert!(pack_lines::<&str>(&[]).is_empty());
        assert_eq!(pack_lines(&["a", "", "b"]), ["a\n\nb"]);
        let many: Vec<String> = (0..10_000).map(|i| format!("line {i}")).collect();
        let packed = pack_lines(&many);
        assert!(
            packed.len() > 1 && packed.len() < 10,
            "{} texts",
            packed.len()
        );
        let back: Vec<&str> = packed.iter().flat_map(|t| t.split('\n')).collect();
        assert_eq!(back, many);
        for text in &packed {
            assert!(serde_json::to_vec(text).expect("json").len() <= MAX_LINE + 2);
        }
        let nasty = "\u{1}".repeat(MAX_LINE);
        let packed = pack_lines(&["x", nasty.as_str(), "y"]);
        assert_eq!(packed.concat().replace('\n', ""), format!("x{nasty}y"));
        for text in &packed {
            assert!(serde_json::to_vec(text).expect("json").len() <= MAX_LINE + 2);
        }
    }

    #[test]
    fn event_json_is_flat_and_readable() {
        let e = Up::Event(Event {
            host: HostPath::parse("r1/l1-2"),
            kind: EventKind::State(HostState::Converged),
        });
        let json = serde_json::to_string(&e).expect("json");
        assert_eq!(
            json,
            r#"{"type":"event","host":["r1","l1-2"],"kind":"state","state":"converged"}"#
        );
        let back: Up = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, e);
    }
}
