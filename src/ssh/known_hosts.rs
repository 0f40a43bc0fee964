//! known_hosts files, read the way OpenSSH reads them.
//!
//! russh ships a small known_hosts checker, but it stops at the first line it cannot parse and
//! knows nothing of patterns, negation, `@revoked` or `@cert-authority`. arbor refuses to connect
//! on a changed key and must say which file and line disagree, so it reads the files itself.
//!
//! Supported: plain names and `[host]:port`, comma lists, `*`/`?` wildcards, `!` negation,
//! hashed entries (`|1|salt|hmac-sha1`), `@revoked` markers and `@cert-authority` lines (host
//! certificates: [`KnownHosts::verify_certificate`]). Lines that do not parse are skipped, as
//! OpenSSH does. [`KnownHosts::host_key_order`] says which host-key algorithms to offer first, as
//! OpenSSH orders them by what the files hold for the host.

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Algorithm, Certificate, EcdsaCurve, HashAlg, PublicKey};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The system-wide known_hosts files OpenSSH reads besides the user's
/// (`GlobalKnownHostsFile`'s default). A missing file is an empty one.
pub const GLOBAL_FILES: [&str; 2] = ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"];

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

/// What the known_hosts files say about a host certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertVerdict {
    /// An `@cert-authority` line for this host names the signer, and the certificate is valid
    /// for this host now.
    Trusted(Origin),
    /// No `@cert-authority` line for this host names the certificate's signer. OpenSSH then
    /// judges the plain key inside the certificate, and so does arbor.
    UnknownAuthority,
    /// The signer is trusted for this host (at `origin`), but the certificate is not valid.
    Invalid { origin: Origin, reason: String },
    /// The certificate's key or its authority's key is `@revoked`.
    Revoked(Origin),
}

/// The host-key algorithms to offer a host, most preferred first: certificate algorithms
/// (offered ahead of plain keys) and plain ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKeyOrder {
    pub certificates: Vec<Algorithm>,
    pub keys: Vec<Algorithm>,
}

/// OpenSSH's default host-key algorithm order, as far as russh supports it. SHA-1 `ssh-rsa` comes
/// last and is never offered for certificates (OpenSSH refuses it there by default).
pub fn default_algorithms() -> Vec<Algorithm> {
    vec![
        Algorithm::Ed25519,
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP256,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP384,
        },
        Algorithm::Ecdsa {
            curve: EcdsaCurve::NistP521,
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha512),
        },
        Algorithm::Rsa {
            hash: Some(HashAlg::Sha256),
        },
        Algorithm::Rsa { hash: None },
    ]
}

/// Whether a negotiated algorithm can carry a key of `key`'s type (any RSA signature hash fits
/// an RSA key).
fn algorithm_fits(algorithm: &Algorithm, key: &Algorithm) -> bool {
    match (algorithm, key) {
        (Algorithm::Rsa { .. }, k) => matches!(k, Algorithm::Rsa { .. }),
        (a, k) => a == k,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
struct Entry {
    origin: Origin,
    marker: Marker,
    patterns: String,
    key: PublicKey,
    /// The line as read (trimmed), for handing entries down the tree.
    line: String,
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

    /// The `@revoked` line for `key`, if any.
    fn revoked(&self, key: &russh::keys::ssh_key::public::KeyData) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| e.marker == Marker::Revoked && e.key.key_data() == key)
    }

    /// The entries a node needs to check the hosts known as `names` (see [`host_key_name`]), as
    /// known_hosts text: the plain and `@cert-authority` lines whose patterns match one of the
    /// names (hashed ones included), and every `@revoked` line. What a relay should receive for
    /// its subtree, instead of the operator's whole files.
    pub fn lines_for<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> String {
        let names: Vec<&str> = names.into_iter().collect();
        let mut out = String::new();
        for entry in &self.entries {
            let wanted = entry.marker == Marker::Revoked
                || names.iter().any(|n| patterns_match(&entry.patterns, n));
            if wanted {
                out.push_str(&entry.line);
                out.push('\n');
            }
        }
        out
    }

    /// Checks `key` offered by the host known as `name` (see [`host_key_name`]).
    pub fn verify(&self, name: &str, key: &PublicKey) -> Verdict {
        if let Some(entry) = self.revoked(key.key_data()) {
            return Verdict::Revoked(entry.origin.clone());
        }
        let mut changed = None;
        for entry in self.entries.iter().filter(|e| e.marker == Marker::None) {
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

    /// Checks a host certificate offered by the host known as `name` (see [`host_key_name`]),
    /// to which arbor connected as `principal` (the host name or address, without port), at
    /// `now` (seconds since the epoch). As OpenSSH: the signer must be named by an
    /// `@cert-authority` line matching `name`; the certificate must be a host certificate, its
    /// CA signature must verify, `now` must lie in its validity window, `principal` must be one
    /// of its principals (compared ignoring ASCII case), and it must carry no critical options.
    /// Stricter than OpenSSH: a certificate that lists no principals is refused (OpenSSH takes
    /// it as valid for every host), and so is a CA signature made with SHA-1 `ssh-rsa` (refused
    /// by OpenSSH's default `CASignatureAlgorithms` too).
    pub fn verify_certificate(
        &self,
        name: &str,
        principal: &str,
        cert: &Certificate,
        now: u64,
    ) -> CertVerdict {
        if let Some(entry) = self
            .revoked(cert.public_key())
            .or_else(|| self.revoked(cert.signature_key()))
        {
            return CertVerdict::Revoked(entry.origin.clone());
        }
        let Some(authority) = self.entries.iter().find(|e| {
            e.marker == Marker::CertAuthority
                && e.key.key_data() == cert.signature_key()
                && patterns_match(&e.patterns, name)
        }) else {
            return CertVerdict::UnknownAuthority;
        };
        match certificate_problem(cert, principal, now) {
            None => CertVerdict::Trusted(authority.origin.clone()),
            Some(reason) => CertVerdict::Invalid {
                origin: authority.origin.clone(),
                reason,
            },
        }
    }

    /// The host-key algorithms to offer the host known as `name`, as OpenSSH orders them:
    /// certificate algorithms first when an `@cert-authority` line names the host, then the
    /// plain algorithms of the keys the files hold for it, then the rest in the default order.
    /// With a pinned key, only the pinned key's algorithms are offered, and no certificates.
    pub fn host_key_order(&self, name: &str, pinned: Option<&PublicKey>) -> HostKeyOrder {
        let defaults = default_algorithms();
        if let Some(pinned) = pinned {
            let keys: Vec<Algorithm> = defaults
                .into_iter()
                .filter(|a| algorithm_fits(a, &pinned.algorithm()))
                .collect();
            return HostKeyOrder {
                certificates: Vec::new(),
                keys,
            };
        }
        let matching: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.marker != Marker::Revoked && patterns_match(&e.patterns, name))
            .collect();
        let known: Vec<Algorithm> = matching
            .iter()
            .filter(|e| e.marker == Marker::None)
            .map(|e| e.key.algorithm())
            .collect();
        let (mut first, rest): (Vec<Algorithm>, Vec<Algorithm>) =
            defaults.iter().cloned().partition(|a| {
                *a != (Algorithm::Rsa { hash: None }) && known.iter().any(|k| algorithm_fits(a, k))
            });
        first.extend(rest);
        let certificates = if matching.iter().any(|e| e.marker == Marker::CertAuthority) {
            defaults
                .into_iter()
                .filter(|a| *a != Algorithm::Rsa { hash: None })
                .collect()
        } else {
            Vec::new()
        };
        HostKeyOrder {
            certificates,
            keys: first,
        }
    }
}

/// Why `cert` is not valid for `principal` at `now`, or `None` when it is. The signer is
/// already known to be trusted for the host.
fn certificate_problem(cert: &Certificate, principal: &str, now: u64) -> Option<String> {
    if cert.cert_type() != CertType::Host {
        return Some("it is a user certificate, not a host certificate".into());
    }
    if cert.signature().algorithm() == (Algorithm::Rsa { hash: None }) {
        return Some("its CA signature uses ssh-rsa (SHA-1), which is not accepted".into());
    }
    if now < cert.valid_after() {
        return Some(format!(
            "not valid before {} (it is {} now)",
            utc(cert.valid_after()),
            utc(now)
        ));
    }
    if now >= cert.valid_before() {
        return Some(format!(
            "expired at {} (it is {} now)",
            utc(cert.valid_before()),
            utc(now)
        ));
    }
    // validate_at checks the signature against the signer's key; the window and the signer are
    // already checked above, so a failure here is the signature alone.
    let ca_fingerprint = cert.signature_key().fingerprint(HashAlg::Sha256);
    if cert.validate_at(now, [&ca_fingerprint]).is_err() {
        return Some("its CA signature does not verify".into());
    }
    let principals = cert.valid_principals();
    if principals.is_empty() {
        return Some("it lists no principals (arbor does not accept such certificates)".into());
    }
    if !principals.iter().any(|p| p.eq_ignore_ascii_case(principal)) {
        return Some(format!(
            "{principal:?} is not one of its principals ({})",
            principals.join(", ")
        ));
    }
    if !cert.critical_options().is_empty() {
        let names: Vec<&str> = cert.critical_options().keys().map(String::as_str).collect();
        return Some(format!(
            "it carries critical options ({}), which host certificates cannot",
            names.join(", ")
        ));
    }
    None
}

/// Seconds since the epoch as `YYYY-MM-DD hh:mm:ss UTC` (`forever` past year 9999).
fn utc(secs: u64) -> String {
    if secs >= 253_402_300_800 {
        return "forever".into();
    }
    let (year, month, day, h, m, sec) = crate::ui::civil(secs);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{sec:02} UTC")
}

fn parse_line(raw: &str, file: &Path, line: usize) -> Option<Entry> {
    let text = raw.trim();
    if text.is_empty() || text.starts_with('#') {
        return None;
    }
    let mut fields = text.split_whitespace();
    let mut first = fields.next()?;
    let mut marker = Marker::None;
    if first.starts_with('@') {
        marker = match first {
            "@revoked" => Marker::Revoked,
            "@cert-authority" => Marker::CertAuthority,
            _ => return None,
        };
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
        marker,
        patterns: first.to_string(),
        key,
        line: text.to_string(),
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

fn host_hmac(salt: &[u8], name: &str) -> Option<Vec<u8>> {
    let mac = Hmac::<sha1::Sha1>::new_from_slice(salt).ok()?;
    Some(
        mac.chain_update(name.as_bytes())
            .finalize()
            .into_bytes()
            .to_vec(),
    )
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
pub(crate) fn wildcard_match(pattern: &str, name: &str) -> bool {
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
    /// The plain host keys entries vouch for `name` with (not revoked ones, not CAs).
    pub fn keys_for(&self, name: &str) -> Vec<PublicKey> {
        self.entries
            .iter()
            .filter(|e| matches!(e.marker, Marker::None) && patterns_match(&e.patterns, name))
            .map(|e| e.key.clone())
            .collect()
    }

    /// Whether an `@cert-authority` line applies to the host known as `name`.
    pub fn has_authority_for(&self, name: &str) -> bool {
        self.entries
            .iter()
            .any(|e| e.marker == Marker::CertAuthority && patterns_match(&e.patterns, name))
    }

    /// Whether any entry, for any host, holds `key`.
    pub fn knows_key(&self, key: &PublicKey) -> bool {
        self.entries
            .iter()
            .any(|e| e.key.key_data() == key.key_data())
    }
}

/// Whether `name`, reported by another node (a relay that learned a host key under
/// accept-new), is safe to write into known_hosts as a host name: a plain host name or IP
/// address (letters, digits, `.`, `-`, `_`, and `:` for IPv6), or `[that]:port` with a port of
/// 1–65535. Nothing that known_hosts would read as more than one literal name passes: no
/// wildcards (`*`, `?`), negation (`!`), lists (`,`), hashes (`|`), markers (`@`), comments
/// (`#`), whitespace or control characters (a newline would start a line of the sender's
/// choosing), and no empty name or one starting with `-` or `.`.
pub fn valid_reported_name(name: &str) -> bool {
    fn plain(host: &str) -> bool {
        !host.is_empty()
            && host.len() <= 253
            && !host.starts_with(['-', '.'])
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
            && host.bytes().any(|b| b.is_ascii_alphanumeric())
    }
    if let Some(rest) = name.strip_prefix('[') {
        let Some((host, port)) = rest.split_once("]:") else {
            return false;
        };
        plain(host)
            && !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    } else {
        plain(name)
    }
}

/// Appends `name key` to a known_hosts file (accept-new), creating it and its directory with
/// private modes if needed. The entry is written in one `write` so concurrent appenders from
/// one process don't interleave within a line.
pub fn append(file: &Path, name: &str, key: &PublicKey) -> std::io::Result<()> {
    append_line(file, name, key)
}

/// Like [`append`], but the name is written hashed (`|1|salt|hmac-sha1`, a fresh random salt),
/// as OpenSSH does under `HashKnownHosts yes`: the file then does not list the hosts it knows.
pub fn append_hashed(file: &Path, name: &str, key: &PublicKey) -> std::io::Result<()> {
    let salt: [u8; 20] = rand::random();
    let mac =
        host_hmac(&salt, name).ok_or_else(|| std::io::Error::other("hashing the host name"))?;
    let hashed = format!("|1|{}|{}", BASE64.encode(&salt), BASE64.encode(&mac));
    append_line(file, &hashed, key)
}

fn append_line(file: &Path, name: &str, key: &PublicKey) -> std::io::Result<()> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("refusing to record host name {name:?}"),
        ));
    }
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

    const KEY_ECDSA: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBB5xTJOf1ZkPQEZGHhP78dUq0ErrVPjUvGMyNAwaOKXeT2f5f81jS4QlpmMtekqSQL1sRSZ2sE0IPmMFj7gIaKI=";
    const KEY_RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCuOs2OvtMfBWAAlISFnvhae1pahtLLlEu+9tdHCKjj8jRaP1hx/Vitf97G3tybJswWhn3AhphvzJYgaw4vfqspuiURIxMLtPhHGX9q8h+Rc9GLsjHyWKMfQVYcYiWliPLtap6NR1TElomyL6HVYJ/PKwCu0IJAfYdmQqkQH4nQvXf7WQGBiLSQ+ShRv8jjXobTaHrMSetjgvMxSkxwr54i1xwPsKyNEzOxB0K3CTe+l8jCAPd2j40rNQtkyA7fYLnKf0FRrGdU2DIzAX2oZMTURtSZMgEPv69+XVcJCTCWp29JvJRkr0SRElehzfO4JWoDrZAy/cHzw36ibJI0mJUz";

    fn ed25519(seed: u8) -> russh::keys::PrivateKey {
        russh::keys::PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &[seed; 32],
        ))
    }

    struct CertSpec<'a> {
        principals: &'a [&'a str],
        after: u64,
        before: u64,
        kind: CertType,
        critical: Option<(&'a str, &'a str)>,
    }

    const NOW: u64 = 1_700_000_000;

    fn spec(principals: &'static [&'static str]) -> CertSpec<'static> {
        CertSpec {
            principals,
            after: NOW - 3600,
            before: NOW + 3600,
            kind: CertType::Host,
            critical: None,
        }
    }

    fn cert(
        host: &russh::keys::PrivateKey,
        ca: &russh::keys::PrivateKey,
        s: CertSpec,
    ) -> Certificate {
        use russh::keys::ssh_key::certificate::Builder;
        let mut b = Builder::new(
            [7u8; 16].to_vec(),
            host.public_key().key_data().clone(),
            s.after,
            s.before,
        )
        .expect("builder");
        b.cert_type(s.kind)
            .expect("type")
            .key_id("test")
            .expect("id");
        if s.principals.is_empty() {
            b.all_principals_valid().expect("principals");
        }
        for p in s.principals {
            b.valid_principal(*p).expect("principal");
        }
        if let Some((k, v)) = s.critical {
            b.critical_option(k, v).expect("critical");
        }
        b.sign(ca).expect("sign")
    }

    fn ca_line(patterns: &str, ca: &russh::keys::PrivateKey) -> String {
        let text = ca.public_key().to_openssh().expect("openssh");
        format!("@cert-authority {patterns} {text}\n")
    }

    #[test]
    fn order_puts_the_known_key_types_first() {
        let ecdsa = known(&format!("r1 {KEY_ECDSA}\n"));
        let order = ecdsa.host_key_order("r1", None);
        assert_eq!(
            order.keys[0],
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256
            }
        );
        assert_eq!(order.keys.len(), default_algorithms().len());
        assert!(order.certificates.is_empty());
        // Another host: the default order, Ed25519 first.
        assert_eq!(ecdsa.host_key_order("r2", None).keys, default_algorithms());

        let rsa = known(&format!("r1 {KEY_RSA}\n"));
        let order = rsa.host_key_order("r1", None);
        assert_eq!(
            &order.keys[..2],
            &[
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512)
                },
                Algorithm::Rsa {
                    hash: Some(HashAlg::Sha256)
                }
            ]
        );
        assert_eq!(order.keys[2], Algorithm::Ed25519);
        assert_eq!(
            *order.keys.last().expect("last"),
            Algorithm::Rsa { hash: None }
        );
    }

    #[test]
    fn order_ignores_revoked_keys_and_follows_a_pin() {
        let k = known(&format!("@revoked r1 {KEY_ECDSA}\n"));
        assert_eq!(k.host_key_order("r1", None).keys, default_algorithms());
        let pinned = key(KEY_ECDSA);
        let order = known("").host_key_order("r1", Some(&pinned));
        assert_eq!(
            order.keys,
            vec![Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256
            }]
        );
        assert!(order.certificates.is_empty());
    }

    #[test]
    fn a_cert_authority_for_the_host_puts_certificates_first() {
        let ca = ed25519(9);
        let k = known(&ca_line("*.dc1,!bad.dc1", &ca));
        let order = k.host_key_order("n1.dc1", None);
        assert_eq!(order.certificates[0], Algorithm::Ed25519);
        assert!(!order.certificates.contains(&Algorithm::Rsa { hash: None }));
        assert!(k.host_key_order("bad.dc1", None).certificates.is_empty());
        assert!(k.host_key_order("n1.dc2", None).certificates.is_empty());
    }

    #[test]
    fn certificate_from_a_trusted_authority_is_trusted() {
        let (ca, host) = (ed25519(9), ed25519(1));
        let k = known(&format!("# CAs\n{}", ca_line("*.dc1", &ca)));
        let c = cert(&host, &ca, spec(&["n1.dc1", "10.0.0.1"]));
        assert_eq!(
            k.verify_certificate("n1.dc1", "n1.dc1", &c, NOW),
            CertVerdict::Trusted(Origin {
                file: "kh".into(),
                line: 2
            })
        );
        assert!(matches!(
            k.verify_certificate("n1.dc1", "N1.DC1", &c, NOW),
            CertVerdict::Trusted(_)
        ));
        // The CA's own key is not a host key.
        assert_eq!(
            k.verify("n1.dc1", &ca.public_key().clone()),
            Verdict::Unknown
        );
    }

    #[test]
    fn certificate_problems_name_the_authority_line_and_the_reason() {
        let (ca, host) = (ed25519(9), ed25519(1));
        let k = known(&ca_line("*", &ca));
        let invalid = |c: &Certificate, principal: &str, now: u64| match k
            .verify_certificate(principal, principal, c, now)
        {
            CertVerdict::Invalid { origin, reason } => {
                assert_eq!(origin.to_string(), "kh:1");
                reason
            }
            other => panic!("expected Invalid, got {other:?}"),
        };
        let c = cert(&host, &ca, spec(&["n1"]));
        assert!(invalid(&c, "n2", NOW).contains("\"n2\" is not one of its principals (n1)"));
        assert!(invalid(&c, "n1", NOW + 7200).contains("expired at 2023-11-14 23:13:20 UTC"));
        assert!(invalid(&c, "n1", NOW - 7200).contains("not valid before 2023-11-14 21:13:20 UTC"));
        let user = cert(
            &host,
            &ca,
            CertSpec {
                kind: CertType::User,
                ..spec(&["n1"])
            },
        );
        assert!(invalid(&user, "n1", NOW).contains("user certificate"));
        let anyone = cert(&host, &ca, spec(&[]));
        assert!(invalid(&anyone, "n1", NOW).contains("no principals"));
        let critical = cert(
            &host,
            &ca,
            CertSpec {
                critical: Some(("force-command", "true")),
                ..spec(&["n1"])
            },
        );
        assert!(invalid(&critical, "n1", NOW).contains("critical options (force-command)"));
    }

    #[test]
    fn tampered_certificate_fails_its_signature() {
        let (ca, host) = (ed25519(9), ed25519(1));
        let k = known(&ca_line("*", &ca));
        let mut bytes = cert(&host, &ca, spec(&["aaaa"]))
            .to_bytes()
            .expect("encode");
        let at = bytes
            .windows(4)
            .position(|w| w == b"aaaa")
            .expect("principal in the encoding");
        bytes[at..at + 4].copy_from_slice(b"bbbb");
        let forged = Certificate::from_bytes(&bytes).expect("decode");
        match k.verify_certificate("bbbb", "bbbb", &forged, NOW) {
            CertVerdict::Invalid { reason, .. } => {
                assert!(reason.contains("signature"), "{reason}")
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn certificate_from_an_unknown_or_revoked_authority() {
        let (ca, other_ca, host) = (ed25519(9), ed25519(8), ed25519(1));
        let c = cert(&host, &ca, spec(&["n1"]));
        // A CA for other hosts, or another CA for this one, does not vouch.
        let k = known(&format!(
            "{}{}",
            ca_line("*.dc2", &ca),
            ca_line("*", &other_ca)
        ));
        assert_eq!(
            k.verify_certificate("n1", "n1", &c, NOW),
            CertVerdict::UnknownAuthority
        );
        // A revoked CA, or a revoked host key inside the certificate, refuses.
        let ca_pub = ca.public_key().to_openssh().expect("openssh");
        let k = known(&format!("{}@revoked * {ca_pub}\n", ca_line("*", &ca)));
        assert!(matches!(
            k.verify_certificate("n1", "n1", &c, NOW),
            CertVerdict::Revoked(_)
        ));
        let host_pub = host.public_key().to_openssh().expect("openssh");
        let k = known(&format!("{}@revoked * {host_pub}\n", ca_line("*", &ca)));
        assert!(matches!(
            k.verify_certificate("n1", "n1", &c, NOW),
            CertVerdict::Revoked(_)
        ));
    }

    #[test]
    fn lines_for_a_subtree_hold_its_hosts_its_authorities_and_every_revocation() {
        let ca = ed25519(9);
        let text = format!(
            "# header\nl1-1,10.0.1.11 {KEY_A}\nl2-1 {KEY_B}\n{}@revoked other {KEY_ECDSA}\n\
             |1|{}|{} {KEY_B}\n",
            ca_line("l1-*", &ca),
            BASE64.encode(b"salt"),
            BASE64.encode(&host_hmac(b"salt", "[l1-2]:2222").expect("hmac")),
        );
        let k = known(&text);
        let lines = k.lines_for(["10.0.1.11", "[l1-2]:2222", "l1-3"]);
        let got: Vec<&str> = lines.lines().collect();
        assert_eq!(got.len(), 4, "{lines}");
        assert!(got[0].starts_with("l1-1,10.0.1.11 "));
        assert!(got[1].starts_with("@cert-authority l1-* "));
        assert!(got[2].starts_with("@revoked other "));
        assert!(got[3].starts_with("|1|"));
        assert!(!lines.contains("l2-1"));
        // What is handed down verifies as the whole file does.
        let down = known(&lines);
        assert!(matches!(
            down.verify("10.0.1.11", &key(KEY_A)),
            Verdict::Trusted(_)
        ));
        assert!(matches!(
            down.verify("[l1-2]:2222", &key(KEY_B)),
            Verdict::Trusted(_)
        ));
        assert_eq!(k.lines_for(std::iter::empty()).lines().count(), 1);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(NOW), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(u64::MAX), "forever");
    }

    #[test]
    fn reported_names_are_plain_host_names() {
        for good in [
            "r1",
            "10.199.0.11",
            "fd00:199::11",
            "host-1.dc_1.example",
            "[h]:2222",
            "[fd00::1]:22",
        ] {
            assert!(valid_reported_name(good), "{good:?} refused");
        }
        for bad in [
            "",
            "*",
            "r?",
            "*.dc1",
            "!r1",
            "r1,r2",
            "|1|abc|def",
            "@cert-authority",
            "r1\n@cert-authority * ssh-ed25519 AAAA",
            "r1 ssh-ed25519",
            "r1\t",
            "#r1",
            "-oProxyCommand",
            ".",
            "::",
            "[h]",
            "[h]:",
            "[h]:0",
            "[h]:65536",
            "[h]:22x",
            "[h:22",
            "[[h]]:22",
            "h]:22",
            "r\u{e9}1",
            "r1\u{0}",
        ] {
            assert!(!valid_reported_name(bad), "{bad:?} accepted");
        }
        assert!(!valid_reported_name(&"a".repeat(254)));
    }

    #[test]
    fn append_hashed_hides_the_name_and_still_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("known_hosts");
        append_hashed(&file, "10.199.0.11", &key(KEY_A)).expect("append");
        append_hashed(&file, "[h]:2222", &key(KEY_B)).expect("append");
        let text = std::fs::read_to_string(&file).expect("read");
        assert!(
            !text.contains("10.199.0.11") && !text.contains("[h]"),
            "{text}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        for line in &lines {
            let name = line.split(' ').next().expect("name");
            let parts: Vec<&str> = name.split('|').collect();
            assert_eq!(parts.len(), 4, "{name}");
            assert_eq!(BASE64.decode(parts[2].as_bytes()).expect("salt").len(), 20);
            assert_eq!(BASE64.decode(parts[3].as_bytes()).expect("hash").len(), 20);
        }
        // Fresh salts: the same name hashes differently each time.
        append_hashed(&file, "10.199.0.11", &key(KEY_A)).expect("append");
        let again = std::fs::read_to_string(&file).expect("read");
        let first: Vec<&str> = again
            .lines()
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_ne!(first[0], first[2]);
        let k = KnownHosts::load(&[file]).expect("load");
        assert!(matches!(
            k.verify("10.199.0.11", &key(KEY_A)),
            Verdict::Trusted(_)
        ));
        assert!(matches!(
            k.verify("[h]:2222", &key(KEY_B)),
            Verdict::Trusted(_)
        ));
        assert_eq!(k.verify("10.199.0.12", &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn append_refuses_names_that_would_break_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("known_hosts");
        assert!(append(&file, "r1\n@cert-authority *", &key(KEY_A)).is_err());
        assert!(!file.exists() || std::fs::read_to_string(&file).expect("read").is_empty());
    }
}
