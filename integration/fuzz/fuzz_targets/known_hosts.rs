//! The known_hosts reader: any text parses without panicking; lookups, the host-key order and
//! certificate checks answer for any name; a name `valid_reported_name` accepts is written and
//! read back as exactly that one name.
//!
//! Input: the first line is the host name to look up, the rest is a known_hosts file. The whole
//! input is also tried as an OpenSSH certificate blob.
#![no_main]

use arbor::ssh::known_hosts::{KnownHosts, Verdict, valid_reported_name};
use libfuzzer_sys::fuzz_target;
use russh::keys::{Certificate, PublicKey};
use std::path::Path;
use std::sync::OnceLock;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICFdh+Xix+uKRfj0U8suy9mi2P0EzkM+5jU3fS/U6QHW";

fn key() -> &'static PublicKey {
    static K: OnceLock<PublicKey> = OnceLock::new();
    K.get_or_init(|| PublicKey::from_openssh(KEY).expect("fixed key"))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(cert) = Certificate::from_bytes(data) {
        let k = KnownHosts::default();
        let _ = k.verify_certificate("h", "h", &cert, 1_700_000_000);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (name, file) = text.split_once('\n').unwrap_or((text, ""));
    let mut known = KnownHosts::default();
    known.add_text(Path::new("fuzz"), file);
    let _ = known.verify(name, key());
    let order = known.host_key_order(name, None);
    assert!(!order.keys.is_empty(), "no host-key algorithm offered");
    let pinned = known.host_key_order(name, Some(key()));
    assert!(pinned.certificates.is_empty() && !pinned.keys.is_empty());

    if valid_reported_name(name) {
        // What a relay reports is recorded as one line naming exactly that host.
        assert!(!name.chars().any(|c| c.is_whitespace() || c.is_control()));
        assert!(!name.contains(['*', '?', '!', ',', '|', '@', '#']));
        let mut one = KnownHosts::default();
        one.add_text(Path::new("one"), &format!("{name} {KEY}\n"));
        assert!(
            matches!(one.verify(name, key()), Verdict::Trusted(_)),
            "{name:?} does not match itself"
        );
        let other = format!("x{name}");
        assert_eq!(
            one.verify(&other, key()),
            Verdict::Unknown,
            "{name:?} matches {other:?}"
        );
    }
});
