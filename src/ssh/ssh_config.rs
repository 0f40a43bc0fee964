//! The operator's OpenSSH client configuration, read by arbor itself (docs/ssh.md, "ssh_config").
//!
//! [`SshConfig`] reads `~/.ssh/config` and `/etc/ssh/ssh_config` (or one file, as `ssh -F`)
//! once, with every `Include` in place; [`SshConfig::resolve`] then gives the settings for
//! one host as ssh(1) would:
//!
//! - the first value obtained for a keyword wins (`IdentityFile` accumulates); values given
//!   before reading (the command line's, the topology's) count as obtained first;
//! - lines before the first `Host`/`Match` apply to every host; a `Host` block applies when
//!   one of its patterns matches the host as written (`*`, `?`, `!` negation);
//! - `Match` takes `all`, `host`, `originalhost`, `user` and `localuser` (each may be negated
//!   with `!`, comma lists of patterns); any other criterion (`exec`, `canonical`, `final`,
//!   `localnetwork`, `tagged`, …) makes the block not apply, with a warning;
//! - `Include` reads other files in place (globs; relative paths are under ~/.ssh for the
//!   user's file or `-F`, under /etc/ssh for the system's); an `Include` inside a block that
//!   does not apply contributes nothing.
//!
//! The keywords honoured are in [`HONOURED`]; ones in [`WARNED`] would change what a
//! connection trusts or reaches, so a value for them that applies is reported; every other
//! keyword is ignored.

use std::path::{Path, PathBuf};

/// The system-wide client configuration.
pub const GLOBAL_FILE: &str = "/etc/ssh/ssh_config";

/// Where relative `Include`s of the system-wide file start.
const SYSTEM_DIR: &str = "/etc/ssh";

/// Include depth at which ssh(1) gives up too.
const MAX_INCLUDE_DEPTH: usize = 16;

/// As ssh(1): at most this many IdentityFile lines count.
const MAX_IDENTITY_FILES: usize = 100;

/// The keywords arbor follows.
pub const HONOURED: &[&str] = &[
    "Host",
    "Match",
    "Include",
    "HostName",
    "User",
    "Port",
    "IdentityFile",
    "IdentitiesOnly",
    "ConnectTimeout",
    "UserKnownHostsFile",
    "GlobalKnownHostsFile",
    "StrictHostKeyChecking",
    "HashKnownHosts",
    "ProxyJump",
];

/// Keywords arbor does not follow whose value changes what a connection trusts, offers or
/// reaches: a value that applies to a host is reported (once per line) so that nobody relies on
/// it. Lower case.
pub const WARNED: &[&str] = &[
    "proxycommand",
    "hostkeyalias",
    "knownhostscommand",
    "revokedhostkeys",
    "hostkeyalgorithms",
    "ciphers",
    "macs",
    "kexalgorithms",
    "pubkeyacceptedalgorithms",
    "pubkeyacceptedkeytypes",
    "casignaturealgorithms",
    "canonicalizehostname",
    "identityagent",
    "certificatefile",
    "pkcs11provider",
    "securitykeyprovider",
    "bindaddress",
    "bindinterface",
    "addressfamily",
    "preferredauthentications",
    "pubkeyauthentication",
    "passwordauthentication",
    "kbdinteractiveauthentication",
    "forwardagent",
    "checkhostip",
    "verifyhostkeydns",
    "updatehostkeys",
];

/// The files ssh(1) reads for a user whose home is `home`: `~/.ssh/config`, then the system's.
pub fn default_files(home: &Path) -> Vec<PathBuf> {
    vec![home.join(".ssh").join("config"), PathBuf::from(GLOBAL_FILE)]
}

/// Whether `HashKnownHosts yes` applies to `host` (as named on the command line) in `files`
/// (files under /etc are read as system files, others as the user's). Missing or unreadable
/// files count as empty; the default is no.
pub fn hash_known_hosts(files: &[PathBuf], host: &str) -> bool {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    let sources = files
        .iter()
        .map(|f| {
            if f.starts_with("/etc") {
                Source::System(f.clone())
            } else {
                Source::User(f.clone())
            }
        })
        .collect::<Vec<_>>();
    let config = SshConfig::read(&sources, &home, false).unwrap_or_default();
    config
        .lookup(host, "hashknownhosts")
        .is_some_and(|v| v.eq_ignore_ascii_case("yes"))
}

/// Which kind of file: it decides where relative `Include`s start.
#[derive(Debug, Clone)]
pub enum Source {
    /// The user's file or one given with `-F`: relative includes under ~/.ssh.
    User(PathBuf),
    /// The system-wide file: relative includes under /etc/ssh.
    System(PathBuf),
}

/// One line of a file that matters.
#[derive(Debug, Clone)]
enum Item {
    Host(Vec<String>),
    Match(Vec<String>),
    /// The files an Include named, read.
    Include(Vec<File>),
    Set {
        keyword: String,
        args: Vec<String>,
    },
}

#[derive(Debug, Clone)]
struct File {
    path: PathBuf,
    /// (line number, item)
    items: Vec<(usize, Item)>,
}

/// The operator's client configuration, read once.
#[derive(Debug, Clone, Default)]
pub struct SshConfig {
    files: Vec<File>,
    home: PathBuf,
    local_user: String,
    local_host: String,
}

/// The settings for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// The host as written (the alias).
    pub original: String,
    /// The address to connect to: `HostName` (with `%h`), or the host as written.
    pub hostname: String,
    pub user: String,
    pub port: u16,
    /// `IdentityFile`s in order, `~`, `${VAR}` and `%` tokens expanded.
    pub identity_files: Vec<PathBuf>,
    pub identities_only: bool,
    /// `ConnectTimeout`, seconds.
    pub connect_timeout: Option<u64>,
    /// `UserKnownHostsFile` (`none`: an empty list).
    pub user_known_hosts: Option<Vec<PathBuf>>,
    /// `GlobalKnownHostsFile` (`none`: an empty list).
    pub global_known_hosts: Option<Vec<PathBuf>>,
    /// `StrictHostKeyChecking` as arbor's policy: `Some(true)` accept-new, `Some(false)`
    /// strict (yes, ask, and no/off, which arbor never honours: see the warnings).
    pub accept_new: Option<bool>,
    pub hash_known_hosts: bool,
    /// `ProxyJump` hops, first hop first (`none` or unset: empty).
    pub proxy_jump: Vec<JumpHost>,
    /// Settings arbor does not follow, or follows differently: `file:line: text`.
    pub warnings: Vec<String>,
}

/// One `ProxyJump` hop: `[user@]host[:port]` or `ssh://[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHost {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

/// Values obtained before the files are read: they win over the files' (as ssh's `-l`/`-p`).
#[derive(Debug, Clone, Default)]
pub struct Preset {
    pub user: Option<String>,
    pub port: Option<u16>,
}

/// What the files said, before defaults and expansion.
#[derive(Default)]
struct Obtained {
    hostname: Option<String>,
    user: Option<String>,
    port: Option<u16>,
    identity_files: Vec<(String, String)>,
    identities_only: Option<bool>,
    connect_timeout: Option<u64>,
    user_known_hosts: Option<(String, Vec<String>)>,
    global_known_hosts: Option<(String, Vec<String>)>,
    strict: Option<(String, String)>,
    hash_known_hosts: Option<bool>,
    proxy: Option<(String, Proxy)>,
    other: Vec<(String, String)>,
    warnings: Vec<String>,
    errors: Vec<String>,
    /// For [`SshConfig::lookup`].
    wanted: Option<(String, Option<String>)>,
}

enum Proxy {
    Jump(String),
    None,
    Command,
}

impl SshConfig {
    /// What ssh(1) reads for a user whose home is `home`: ~/.ssh/config, then
    /// /etc/ssh/ssh_config. Missing files are empty.
    pub fn load_default(home: &Path) -> Result<SshConfig, String> {
        Self::read(
            &[
                Source::User(home.join(".ssh").join("config")),
                Source::System(PathBuf::from(GLOBAL_FILE)),
            ],
            home,
            false,
        )
    }

    /// Only `file`, as `ssh -F FILE` (`none`: no file at all). It must exist.
    pub fn load_file(file: &Path, home: &Path) -> Result<SshConfig, String> {
        if file == Path::new("none") {
            return Self::read(&[], home, false);
        }
        Self::read(&[Source::User(file.to_path_buf())], home, true)
    }

    /// No configuration: every host resolves to itself, the local user, port 22.
    pub fn empty() -> SshConfig {
        SshConfig {
            files: Vec::new(),
            home: PathBuf::from("/"),
            local_user: super::local_user(),
            local_host: local_hostname(),
        }
    }

    /// Reads `sources` in order. With `must_exist`, a file that cannot be read is an error;
    /// otherwise it counts as empty (as ssh(1) treats a missing ~/.ssh/config).
    pub fn read(sources: &[Source], home: &Path, must_exist: bool) -> Result<SshConfig, String> {
        let mut files = Vec::new();
        for source in sources {
            let (path, base) = match source {
                Source::User(p) => (p, home.join(".ssh")),
                Source::System(p) => (p, PathBuf::from(SYSTEM_DIR)),
            };
            match std::fs::read_to_string(path) {
                Ok(text) => files.push(parse_file(path, &text, &base, home, 0)?),
                Err(e) if must_exist => {
                    return Err(format!("ssh config {}: {e}", path.display()));
                }
                Err(_) => {}
            }
        }
        Ok(SshConfig {
            files,
            home: home.to_path_buf(),
            local_user: super::local_user(),
            local_host: local_hostname(),
        })
    }

    /// The first value of `keyword` (lower case) that applies to `host`, as written.
    pub fn lookup(&self, host: &str, keyword: &str) -> Option<String> {
        let mut got = Obtained {
            wanted: Some((keyword.to_string(), None)),
            ..Obtained::default()
        };
        self.evaluate(host, &mut got);
        got.wanted.and_then(|(_, v)| v)
    }

    /// The settings for `host` as written (an alias, a name or an address), `preset` values
    /// winning over the files'. An error names the file and line of a value that is wrong.
    pub fn resolve(&self, host: &str, preset: &Preset) -> Result<HostConfig, String> {
        let mut got = Obtained {
            user: preset.user.clone(),
            port: preset.port,
            ..Obtained::default()
        };
        self.evaluate(host, &mut got);
        if let Some(e) = got.errors.first() {
            return Err(e.clone());
        }
        let hostname = match &got.hostname {
            Some(h) => expand_percent_h(h, host),
            None => host.to_string(),
        };
        let user = got.user.clone().unwrap_or_else(|| self.local_user.clone());
        let port = got.port.unwrap_or(22);
        let mut warnings = std::mem::take(&mut got.warnings);
        let tokens = Tokens {
            config: self,
            original: host,
            hostname: &hostname,
            user: &user,
            port,
        };
        let mut identity_files = Vec::new();
        for (at, raw) in &got.identity_files {
            identity_files.push(PathBuf::from(
                tokens
                    .expand(raw)
                    .map_err(|e| format!("{at}: IdentityFile {raw}: {e}"))?,
            ));
        }
        let files = |v: &Option<(String, Vec<String>)>, what: &str| -> Result<_, String> {
            let Some((at, raw)) = v else { return Ok(None) };
            if raw.len() == 1 && raw[0].eq_ignore_ascii_case("none") {
                return Ok(Some(Vec::new()));
            }
            raw.iter()
                .map(|f| {
                    tokens
                        .expand(f)
                        .map(PathBuf::from)
                        .map_err(|e| format!("{at}: {what} {f}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        };
        let user_known_hosts = files(&got.user_known_hosts, "UserKnownHostsFile")?;
        let global_known_hosts = files(&got.global_known_hosts, "GlobalKnownHostsFile")?;
        let accept_new = match &got.strict {
            None => None,
            Some((at, v)) => match v.to_ascii_lowercase().as_str() {
                "yes" | "ask" => Some(false),
                "accept-new" => Some(true),
                "no" | "off" => {
                    warnings.push(format!(
                        "{at}: StrictHostKeyChecking {v} is not honoured: arbor never connects \
                         to a host whose key it cannot check; it checks this host as `strict` \
                         (use --host-key-policy accept-new to record unknown keys)"
                    ));
                    Some(false)
                }
                _ => {
                    return Err(format!(
                        "{at}: StrictHostKeyChecking {v}: not one of yes, accept-new, no, off, ask"
                    ));
                }
            },
        };
        let proxy_jump = match &got.proxy {
            Some((at, Proxy::Jump(spec))) => {
                parse_jumps(spec).map_err(|e| format!("{at}: ProxyJump {spec}: {e}"))?
            }
            _ => Vec::new(),
        };
        for (at, keyword) in &got.other {
            warnings.push(format!(
                "{at}: {keyword} is not supported by arbor and is ignored for {host} \
                 (docs/ssh.md lists what arbor follows)"
            ));
        }
        Ok(HostConfig {
            original: host.to_string(),
            hostname,
            user,
            port,
            identity_files,
            identities_only: got.identities_only.unwrap_or(false),
            connect_timeout: got.connect_timeout,
            user_known_hosts,
            global_known_hosts,
            accept_new,
            hash_known_hosts: got.hash_known_hosts.unwrap_or(false),
            proxy_jump,
            warnings,
        })
    }

    fn evaluate(&self, host: &str, got: &mut Obtained) {
        let host = host.to_ascii_lowercase();
        for file in &self.files {
            let mut active = true;
            self.walk(file, &host, got, &mut active, false);
        }
    }

    /// Applies `file`'s items. `active` is whether the current block applies; `never` is set
    /// inside an Include that sits in a block that does not apply.
    fn walk(&self, file: &File, host: &str, got: &mut Obtained, active: &mut bool, never: bool) {
        for (line, item) in &file.items {
            let at = || format!("{}:{line}", file.path.display());
            match item {
                Item::Host(patterns) => *active = !never && host_matches(patterns, host),
                Item::Match(criteria) => {
                    *active = !never
                        && match self.match_applies(criteria, host, got) {
                            Ok(applies) => applies,
                            Err(e) => {
                                got.warnings.push(format!("{}: {e}", at()));
                                false
                            }
                        }
                }
                Item::Include(files) => {
                    let outer = *active;
                    for f in files {
                        self.walk(f, host, got, active, never || !outer);
                        *active = outer;
                    }
                }
                Item::Set { keyword, args } if *active => got.set(keyword, args, &at()),
                Item::Set { .. } => {}
            }
        }
    }

    /// Whether a `Match` line applies. `Err` for a criterion arbor cannot evaluate.
    fn match_applies(
        &self,
        criteria: &[String],
        host: &str,
        got: &Obtained,
    ) -> Result<bool, String> {
        if criteria.is_empty() {
            return Err("Match with no criteria".into());
        }
        let mut all = true;
        let mut i = 0;
        while i < criteria.len() {
            let raw = &criteria[i];
            let (negated, name) = match raw.strip_prefix('!') {
                Some(n) => (true, n.to_ascii_lowercase()),
                None => (false, raw.to_ascii_lowercase()),
            };
            if name == "all" {
                i += 1;
                all &= !negated;
                continue;
            }
            let arg = criteria
                .get(i + 1)
                .ok_or_else(|| format!("Match {raw} needs an argument"))?;
            i += 2;
            let subject = match name.as_str() {
                // As ssh(1): the HostName obtained so far (with %h), else the host as written.
                "host" => got
                    .hostname
                    .as_ref()
                    .map(|h| expand_percent_h(h, host))
                    .unwrap_or_else(|| host.to_string()),
                "originalhost" => host.to_string(),
                "user" => got.user.clone().unwrap_or_else(|| self.local_user.clone()),
                "localuser" => self.local_user.clone(),
                other => {
                    return Err(format!(
                        "Match {other} is not supported by arbor: this block is taken as not \
                         applying (arbor evaluates Match all, host, originalhost, user and \
                         localuser)"
                    ));
                }
            };
            let matched = pattern_list_matches(arg, &subject);
            all &= matched != negated;
        }
        Ok(all)
    }
}

impl Obtained {
    fn set(&mut self, keyword: &str, args: &[String], at: &str) {
        if let Some((wanted, value)) = &mut self.wanted {
            if value.is_none() && keyword == wanted.as_str() {
                *value = args.first().cloned();
            }
            return;
        }
        let first = args.first().cloned().unwrap_or_default();
        let bad = |what: &str| format!("{at}: {keyword} {first}: {what}");
        let yes_no = |v: &str| match v.to_ascii_lowercase().as_str() {
            "yes" | "true" => Some(true),
            "no" | "false" => Some(false),
            _ => None,
        };
        match keyword {
            "hostname" if self.hostname.is_none() => self.hostname = Some(first),
            "user" if self.user.is_none() => self.user = Some(first),
            "port" if self.port.is_none() => match first.parse::<u16>() {
                Ok(p) if p > 0 => self.port = Some(p),
                _ => self.errors.push(bad("not a port from 1 to 65535")),
            },
            "identityfile" if self.identity_files.len() < MAX_IDENTITY_FILES => {
                self.identity_files.push((at.to_string(), first));
            }
            "identitiesonly" if self.identities_only.is_none() => match yes_no(&first) {
                Some(v) => self.identities_only = Some(v),
                None => self.errors.push(bad("expected yes or no")),
            },
            "connecttimeout" if self.connect_timeout.is_none() => {
                if first.eq_ignore_ascii_case("none") {
                    self.connect_timeout = None;
                } else {
                    match parse_seconds(&first) {
                        Some(s) if s > 0 => self.connect_timeout = Some(s),
                        _ => self.errors.push(bad("not a time (seconds, or e.g. 1m30s)")),
                    }
                }
            }
            "userknownhostsfile" if self.user_known_hosts.is_none() => {
                self.user_known_hosts = Some((at.to_string(), args.to_vec()));
            }
            "globalknownhostsfile" if self.global_known_hosts.is_none() => {
                self.global_known_hosts = Some((at.to_string(), args.to_vec()));
            }
            "stricthostkeychecking" if self.strict.is_none() => {
                self.strict = Some((at.to_string(), first));
            }
            "hashknownhosts" if self.hash_known_hosts.is_none() => {
                self.hash_known_hosts = Some(first.eq_ignore_ascii_case("yes"));
            }
            // ProxyJump and ProxyCommand share one setting in ssh(1): the first one wins.
            "proxyjump" if self.proxy.is_none() => {
                let proxy = if first.eq_ignore_ascii_case("none") {
                    Proxy::None
                } else {
                    Proxy::Jump(first)
                };
                self.proxy = Some((at.to_string(), proxy));
            }
            "proxycommand" if self.proxy.is_none() => {
                if first.eq_ignore_ascii_case("none") {
                    self.proxy = Some((at.to_string(), Proxy::None));
                } else {
                    self.proxy = Some((at.to_string(), Proxy::Command));
                    self.other.push((at.to_string(), "ProxyCommand".into()));
                }
            }
            // Only the first value counts, as for every keyword.
            k if WARNED.contains(&k)
                && k != "proxycommand"
                && !self
                    .other
                    .iter()
                    .any(|(_, seen)| seen.eq_ignore_ascii_case(k)) =>
            {
                self.other.push((at.to_string(), display_keyword(k)));
            }
            _ => {}
        }
    }
}

fn display_keyword(lower: &str) -> String {
    const NAMES: &[&str] = &[
        "HostKeyAlias",
        "KnownHostsCommand",
        "RevokedHostKeys",
        "HostKeyAlgorithms",
        "Ciphers",
        "MACs",
        "KexAlgorithms",
        "PubkeyAcceptedAlgorithms",
        "PubkeyAcceptedKeyTypes",
        "CASignatureAlgorithms",
        "CanonicalizeHostname",
        "IdentityAgent",
        "CertificateFile",
        "PKCS11Provider",
        "SecurityKeyProvider",
        "BindAddress",
        "BindInterface",
        "AddressFamily",
        "PreferredAuthentications",
        "PubkeyAuthentication",
        "PasswordAuthentication",
        "KbdInteractiveAuthentication",
        "ForwardAgent",
        "CheckHostIP",
        "VerifyHostKeyDNS",
        "UpdateHostKeys",
    ];
    NAMES
        .iter()
        .find(|n| n.eq_ignore_ascii_case(lower))
        .map_or_else(|| lower.to_string(), |n| n.to_string())
}

/// `%h` and `%%` in a HostName.
fn expand_percent_h(value: &str, host: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// What `%` tokens in file names stand for.
struct Tokens<'a> {
    config: &'a SshConfig,
    original: &'a str,
    hostname: &'a str,
    user: &'a str,
    port: u16,
}

impl Tokens<'_> {
    /// `~/` (the operator's home), `${VAR}` and `%d %h %i %l %n %p %r %u %%`.
    fn expand(&self, raw: &str) -> Result<String, String> {
        let mut s = String::new();
        let rest = if raw == "~" {
            s.push_str(&self.config.home.to_string_lossy());
            ""
        } else if let Some(rest) = raw.strip_prefix("~/") {
            s.push_str(&self.config.home.to_string_lossy());
            s.push('/');
            rest
        } else if raw.starts_with('~') {
            return Err("~user is not supported: write the path".into());
        } else {
            raw
        };
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '%' => match chars.next() {
                    Some('%') => s.push('%'),
                    Some('d') => s.push_str(&self.config.home.to_string_lossy()),
                    Some('h') => s.push_str(self.hostname),
                    Some('i') => s.push_str(&unsafe { libc::getuid() }.to_string()),
                    Some('l') => s.push_str(&self.config.local_host),
                    Some('n') => s.push_str(self.original),
                    Some('p') => s.push_str(&self.port.to_string()),
                    Some('r') => s.push_str(self.user),
                    Some('u') => s.push_str(&self.config.local_user),
                    Some(t) => return Err(format!("token %{t} is not supported")),
                    None => return Err("a lone % at the end".into()),
                },
                '$' if chars.peek() == Some(&'{') => {
                    chars.next();
                    let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let value = std::env::var(&name)
                        .map_err(|_| format!("environment variable {name} is not set"))?;
                    s.push_str(&value);
                }
                c => s.push(c),
            }
        }
        Ok(s)
    }
}

/// `ConnectTimeout`: seconds, or a time such as `1m30s` (s, m, h, d, w).
fn parse_seconds(v: &str) -> Option<u64> {
    if let Ok(n) = v.parse::<u64>() {
        return Some(n);
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().ok()?;
        number.clear();
        let unit = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 604800,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    if !number.is_empty() {
        total = total.checked_add(number.parse::<u64>().ok()?)?;
    }
    Some(total)
}

/// `ProxyJump a,user@b:2222,ssh://c` into hops.
fn parse_jumps(spec: &str) -> Result<Vec<JumpHost>, String> {
    spec.split(',')
        .map(|hop| {
            let hop = hop.trim();
            let hop = hop.strip_prefix("ssh://").unwrap_or(hop);
            let hop = hop.strip_suffix('/').unwrap_or(hop);
            let (user, hostport) = match hop.rsplit_once('@') {
                Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
                Some(_) => return Err("empty user name".to_string()),
                None => (None, hop),
            };
            let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
                let (h, after) = v6.split_once(']').ok_or("unclosed [")?;
                (h, after.strip_prefix(':'))
            } else {
                match hostport.split_once(':') {
                    Some((h, p)) if !p.contains(':') => (h, Some(p)),
                    _ => (hostport, None),
                }
            };
            if host.is_empty() {
                return Err("empty host".into());
            }
            let port = match port {
                None => None,
                Some(p) => Some(
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("bad port {p:?}"))?,
                ),
            };
            Ok(JumpHost {
                user,
                host: host.to_string(),
                port,
            })
        })
        .collect()
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Parses one file, reading its Includes in place.
fn parse_file(
    path: &Path,
    text: &str,
    base: &Path,
    home: &Path,
    depth: usize,
) -> Result<File, String> {
    let mut items = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let Some((keyword, args)) = split_line(raw) else {
            continue;
        };
        let item = match keyword.as_str() {
            "host" => Item::Host(args),
            "match" => Item::Match(args),
            "include" => {
                if depth >= MAX_INCLUDE_DEPTH {
                    return Err(format!(
                        "{}:{line}: Include nested more than {MAX_INCLUDE_DEPTH} deep",
                        path.display()
                    ));
                }
                let mut files = Vec::new();
                for pattern in &args {
                    for f in expand_include(pattern, base, home) {
                        // As ssh(1): a file that a glob finds but cannot be read is skipped.
                        if let Ok(text) = std::fs::read_to_string(&f) {
                            files.push(parse_file(&f, &text, base, home, depth + 1)?);
                        }
                    }
                }
                Item::Include(files)
            }
            _ => Item::Set { keyword, args },
        };
        items.push((line, item));
    }
    Ok(File {
        path: path.to_path_buf(),
        items,
    })
}

/// `Keyword args...` or `Keyword=args`: the keyword in lower case and its arguments (double
/// quotes group words). Comments and blank lines give `None`.
fn split_line(raw: &str) -> Option<(String, Vec<String>)> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let keyword = line[..end].to_ascii_lowercase();
    let mut rest = line[end..].trim_start();
    if let Some(after) = rest.strip_prefix('=') {
        rest = after.trim_start();
    }
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in rest.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            '#' if !quoted && !any => break,
            c if c.is_whitespace() && !quoted => {
                if any {
                    args.push(std::mem::take(&mut current));
                    any = false;
                }
            }
            c => {
                current.push(c);
                any = true;
            }
        }
    }
    if any {
        args.push(current);
    }
    Some((keyword, args))
}

/// A `Host` line applies when a pattern matches and no negated one does.
fn host_matches(patterns: &[String], host: &str) -> bool {
    let mut matched = false;
    for pattern in patterns {
        if let Some(negated) = pattern.strip_prefix('!') {
            if super::known_hosts::wildcard_match(negated, host) {
                return false;
            }
        } else if super::known_hosts::wildcard_match(pattern, host) {
            matched = true;
        }
    }
    matched
}

/// A `Match` argument: comma-separated patterns, `!` negating one (a negated match wins).
fn pattern_list_matches(list: &str, subject: &str) -> bool {
    let patterns: Vec<String> = list.split(',').map(str::to_string).collect();
    host_matches(&patterns, subject)
}

/// The files an `Include` pattern names, sorted: `~/` is under the home, relative paths are
/// under `base` (~/.ssh or /etc/ssh), and `*`/`?` glob in any component.
fn expand_include(pattern: &str, base: &Path, home: &Path) -> Vec<PathBuf> {
    let path = if let Some(rest) = pattern.strip_prefix("~/") {
        home.join(rest)
    } else if pattern.starts_with('/') {
        PathBuf::from(pattern)
    } else {
        base.join(pattern)
    };
    let mut found = vec![PathBuf::new()];
    for part in path.components() {
        let part = part.as_os_str().to_string_lossy().into_owned();
        if !part.contains(['*', '?']) {
            for f in &mut found {
                f.push(&part);
            }
            continue;
        }
        let mut next = Vec::new();
        for dir in &found {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    // As glob(3): a leading dot is matched only by a leading dot.
                    (!name.starts_with('.') || part.starts_with('.'))
                        && super::known_hosts::wildcard_match(&part, &name)
                })
                .map(|e| e.path())
                .collect();
            names.sort();
            next.extend(names);
        }
        found = next;
    }
    found.retain(|p| p.is_file());
    found
}

#[cfg(test)]
mod tests;
