//! known_hosts files, read the way OpenSSH reads them.
//!
//! russh ships a small known_hosts checker, but it stops at the first line it cannot parse and
//! knows nothing of patterns, negation or `@revoked`. arbor refuses to connect on a changed key
//! and must say which file and line disagree, so it reads the files itself.
//!
//! Supported: plain names and `[host]:port`, comma lists, `*`/`?` wildcards, `!` negation,
//! hashed entries (`|1|salt|hmac-sha1`), `@revoked` markers. `@cert-authority` lines are skipped
//! (arbor does not accept host certificates). Lines that do not parse are skipped, as OpenSSH does.

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::{HashAlg, PublicKey};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The name a host has in known_hosts: `host` on port 22, `[host]:port` elsewhere.
pub fn host_key_name(host: &str, port: u16) -> String {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if port == 22 {
        bare.to_string()
    } else {
        format!("[{bare}]:{port}")
    }
}

/// SHA256 fingerprint of a key, as `ssh-keygen -l` prints it (`SHA256:...`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Where a known_hosts entry came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// What the known_hosts files say about a host's offered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A matching entry vouches for the key.
    Trusted(Origin),
    /// No entry names this host with a key of this type.
    Unknown,
    /// Entries name this host, but with a different key of the same type.
    Changed(Origin),
    /// The key is marked `@revoked`.
    Revoked(Origin),
}

#[derive(Debug, Clone)]
struct Entry {
    origin: Origin,
    revoked: bool,
    patterns: String,
    key: PublicKey,
}

/// A set of known_hosts entries read from one or more files.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

impl KnownHosts {
    /// Reads every file that exists; a missing file is an empty one.
    pub fn load(files: &[PathBuf]) -> std::io::Result<Self> {
        let mut known = KnownHosts::default();
        for file in files {
            match std::fs::read_to_string(file) {
                Ok(text) => known.add_text(file, &text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("reading {}: {e}", file.display()),
                    ));
                }
            }
        }
        Ok(known)
    }

    /// Adds entries from text (a file's contents, or entries sent down the tree).
    pub fn add_text(&mut self, file: &Path, text: &str) {
        for (index, raw) in text.lines().enumerate() {
            if let Some(entry) = parse_line(raw, file, index + 1) {
                self.entries.push(entry);
            }
        }
    }

    /// Checks `key` offered by the host known as `name` (see [`host_key_name`]).
    pub fn verify(&self, name: &str, key: &PublicKey) -> Verdict {
        let mut changed = None;
        for entry in &self.entries {
            if entry.key.key_data() == key.key_data() && entry.revoked {
                return Verdict::Revoked(entry.origin.clone());
            }
        }
        for entry in self.entries.iter().filter(|e| !e.revoked) {
            if !patterns_match(&entry.patterns, name) {
                continue;
            }
            if entry.key.key_data() == key.key_data() {
                return Verdict::Trusted(entry.origin.clone());
            }
            if entry.key.algorithm() == key.algorithm() && changed.is_none() {
                changed = Some(entry.origin.clone());
            }
        }
        match changed {
            Some(origin) => Verdict::Changed(origin),
            None => Verdict::Unknown,
        }
    }
}

fn parse_line(raw: &str, file: &Path, line: usize) -> Option<Entry> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let mut fields = text.split_whitespace();
    let mut first = fields.next()?;
    let mut revoked = false;
    if first.starts_with('@') {
        match first {
            "@revoked" => revoked = true,
            _ => return None, // @cert-authority: not used by arbor
        }
        first = fields.next()?;
    }
    let key_type = fields.next()?;
    let key_b64 = fields.next()?;
    let key = PublicKey::from_openssh(&format!("{key_type} {key_b64}")).ok()?;
    Some(Entry {
        origin: Origin {
            file: file.to_path_buf(),
            line,
        },
        revoked,
        patterns: first.to_string(),
        key,
    })
}

/// OpenSSH semantics: any negated match rejects; otherwise any positive match accepts.
fn patterns_match(patterns: &str, name: &str) -> bool {
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(hashed) = pattern.strip_prefix("|1|") {
            if hashed_matches(hashed, name) {
                matched = true;
            }
        } else if let Some(negated) = pattern.strip_prefix('!') {
            if wildcard_match(negated, name) {
                return false;
            }
        } else if wildcard_match(pattern, name) {
            matched = true;
        }
    }
    matched
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.chain_update(name.as_bytes())
        .verify_slice(&hash)
        .is_ok()
}

/// `*` matches any run, `?` one character; the comparison ignores ASCII case, as OpenSSH does.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let n: Vec<char> = name.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

impl KnownHosts {
    /// The keys entries vouch for `name` with (not revoked ones).
    pub fn keys_for(&self, name: &str) -> Vec<PublicKey> {
        self.entries
            .iter()
            .filter(|e| !e.revoked && patterns_match(&e.patterns, name))
            .map(|e| e.key.clone())
            .collect()
    }

    /// Whether any entry, for any host, holds `key`.
    pub fn knows_key(&self, key: &PublicKey) -> bool {
        self.entries
            .iter()
            .any(|e| e.key.key_data() == key.key_data())
    }
}

/// The lines of known_hosts `text` that can vouch for one of `names` (plain, hashed or
/// pattern entries naming it, and `@cert-authority` lines whose patterns match it), plus every
/// `@revoked` line: what a relay needs to verify those hosts, and nothing about others.
pub fn lines_naming(text: &str, names: &[String]) -> String {
    let mut out = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(mut first) = fields.next() else {
            continue;
        };
        if first == "@revoked" {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if first.starts_with('@') {
            let Some(next) = fields.next() else { continue };
            first = next;
        }
        if names.iter().any(|n| patterns_match(first, n)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Appends `name key` to a known_hosts file (accept-new), creating it and its directory with
/// private modes if needed. The entry is written in one `write` so concurrent appenders from
/// one process don't interleave within a line.
pub fn append(file: &Path, name: &str, key: &PublicKey) -> std::io::Result<()> {
    if let Some(dir) = file.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let openssh = key
        .to_openssh()
        .map_err(|e| std::io::Error::other(format!("encoding host key: {e}")))?;
    let mut fields = openssh.split_whitespace();
    let (kind, data) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
    let mut needs_newline = false;
    if let Ok(existing) = std::fs::read(file) {
        needs_newline = existing.last().is_some_and(|b| *b != b'\n');
    }
    let line = format!(
        "{}{name} {kind} {data}\n",
        if needs_newline { "\n" } else { "" }
    );
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(file)?.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICFdh+Xix+uKRfj0U8suy9mi2P0EzkM+5jU3fS/U6QHW";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFJFB3eQcX7UbV6It2wZdHpCAgvEAO08yth1zWKfJeZ0";

    fn key(text: &str) -> PublicKey {
        PublicKey::from_openssh(text).expect("test key parses")
    }

    fn known(text: &str) -> KnownHosts {
        let mut k = KnownHosts::default();
        k.add_text(Path::new("kh"), text);
        k
    }

    #[test]
    fn plain_entry_trusts_its_key_and_names_the_line() {
        let k = known(&format!("# comment\n\nr1,10.0.0.1 {KEY_A}\n"));
        assert_eq!(
            k.verify("10.0.0.1", &key(KEY_A)),
            Verdict::Trusted(Origin {
                file: "kh".into(),
                line: 3
            })
        );
    }

    #[test]
    fn changed_key_reports_the_disagreeing_line() {
        let k = known(&format!("garbage line\nr1 {KEY_A}\n"));
        assert_eq!(
            k.verify("r1", &key(KEY_B)),
            Verdict::Changed(Origin {
                file: "kh".into(),
                line: 2
            })
        );
    }

    #[test]
    fn unknown_host_is_unknown() {
        let k = known(&format!("r1 {KEY_A}\n"));
        assert_eq!(k.verify("r2", &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn non_default_port_uses_bracket_form() {
        assert_eq!(host_key_name("h", 2222), "[h]:2222");
        assert_eq!(host_key_name("fd00::1", 22), "fd00::1");
        assert_eq!(host_key_name("[fd00::1]", 2222), "[fd00::1]:2222");
        let k = known(&format!("[h]:2222 {KEY_A}\n"));
        assert!(matches!(
            k.verify("[h]:2222", &key(KEY_A)),
            Verdict::Trusted(_)
        ));
        assert_eq!(k.verify("h", &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn hashed_entry_matches_only_its_host() {
        // Produced by `ssh-keygen -H` for host "10.199.0.11".
        let salt = BASE64.encode(b"0123456789abcdefghij");
        let mac = Hmac::<sha1::Sha1>::new_from_slice(b"0123456789abcdefghij")
            .expect("hmac key")
            .chain_update(b"10.199.0.11")
            .finalize()
            .into_bytes();
        let line = format!("|1|{salt}|{} {KEY_A}\n", BASE64.encode(&mac));
        let k = known(&line);
        assert!(matches!(
            k.verify("10.199.0.11", &key(KEY_A)),
            Verdict::Trusted(_)
        ));
        assert_eq!(k.verify("10.199.0.12", &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn wildcards_and_negation() {
        let k = known(&format!("*.dc1,!bad.dc1 {KEY_A}\n"));
        assert!(matches!(
            k.verify("n1.dc1", &key(KEY_A)),
            Verdict::Trusted(_)
        ));
        assert_eq!(k.verify("bad.dc1", &key(KEY_A)), Verdict::Unknown);
        assert!(wildcard_match("n?.dc*", "n1.dc1"));
        assert!(!wildcard_match("n?.dc", "n10.dc"));
    }

    #[test]
    fn revoked_key_is_refused_even_when_listed() {
        let k = known(&format!("@revoked * {KEY_A}\nr1 {KEY_A}\n"));
        assert!(matches!(k.verify("r1", &key(KEY_A)), Verdict::Revoked(_)));
    }

    #[test]
    fn append_then_verify_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sub/known_hosts");
        append(&file, "[h]:2222", &key(KEY_A)).expect("append");
        let k = KnownHosts::load(&[file]).expect("load");
        assert!(matches!(
            k.verify("[h]:2222", &key(KEY_A)),
            Verdict::Trusted(_)
        ));
    }

    #[test]
    fn a_relay_is_sent_only_the_lines_naming_its_subtree() {
        let text = "# comment\n\
                    l1-1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
                    r2,other ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
                    [10.0.0.*]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n\
                    @revoked * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n";
        let got = lines_naming(text, &["l1-1".into(), "[10.0.0.7]:2222".into()]);
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 3, "{got}");
        assert!(lines[0].starts_with("l1-1 "));
        assert!(lines[1].starts_with("[10.0.0.*]:2222 "));
        assert!(lines[2].starts_with("@revoked "));
        assert!(!got.contains("r2,other"));
    }
}
