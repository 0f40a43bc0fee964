//! Errors of the SSH layer: each names the host, the step that failed, and why.

use std::fmt;
use std::time::Duration;

/// The step of talking to a host that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    HostKey,
    Auth,
    Sftp,
    Exec,
    Forward,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Connect => "connect",
            Step::HostKey => "host key",
            Step::Auth => "auth",
            Step::Sftp => "sftp",
            Step::Exec => "exec",
            Step::Forward => "forward",
        })
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error("timed out after {}", humantime(*.0))]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot resolve address: {0}")]
    Resolve(String),
    #[error(
        "unknown host key {fingerprint} for {name} (not in {searched}); \
         add it to known_hosts or use --host-key-policy accept-new"
    )]
    HostKeyUnknown {
        name: String,
        fingerprint: String,
        searched: String,
    },
    #[error(
        "HOST KEY CHANGED: {name} offered {fingerprint}, but {origin} holds a different key; \
         refusing to connect (possible man-in-the-middle)"
    )]
    HostKeyChanged {
        name: String,
        fingerprint: String,
        origin: String,
    },
    #[error("host key {fingerprint} for {name} does not match the pinned key {pinned}")]
    HostKeyPinMismatch {
        name: String,
        fingerprint: String,
        pinned: String,
    },
    #[error("host key {fingerprint} for {name} is revoked at {origin}")]
    HostKeyRevoked {
        name: String,
        fingerprint: String,
        origin: String,
    },
    #[error(
        "host certificate of {name} (key {fingerprint}, signed by the CA at {origin}) \
         is not valid: {reason}; refusing to connect"
    )]
    HostCertInvalid {
        name: String,
        fingerprint: String,
        origin: String,
        reason: String,
    },
    #[error(
        "unknown host key {fingerprint} for {name}: its certificate is signed by CA \
         {authority}, which no @cert-authority line for {name} names (searched {searched}), \
         and the key itself is not listed either"
    )]
    HostCertUnknownAuthority {
        name: String,
        fingerprint: String,
        authority: String,
        searched: String,
    },
    #[error("cannot record host key: {0}")]
    HostKeyRecord(String),
    #[error("permission denied for {user}; tried {tried}{}", server_allows(.allowed))]
    AuthRefused {
        user: String,
        tried: String,
        allowed: Vec<String>,
    },
    #[error("{0}")]
    Protocol(#[from] russh::Error),
    #[error("{0}")]
    Sftp(String),
    #[error("server refused the request: {0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

fn server_allows(allowed: &[String]) -> String {
    if allowed.is_empty() {
        String::new()
    } else {
        format!("; the server allows {}", allowed.join(", "))
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// An SSH failure: `host: step: cause`, e.g. `10.0.0.5:22: auth: permission denied for root`.
#[derive(Debug, thiserror::Error)]
#[error("{host}: {step}: {cause}")]
pub struct SshError {
    pub host: String,
    pub step: Step,
    #[source]
    pub cause: Cause,
}

impl SshError {
    pub fn new(host: impl Into<String>, step: Step, cause: impl Into<Cause>) -> Self {
        SshError {
            host: host.into(),
            step,
            cause: cause.into(),
        }
    }
}

pub type Result<T, E = SshError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_host_step_and_cause() {
        let e = SshError::new(
            "r1",
            Step::Auth,
            Cause::AuthRefused {
                user: "root".into(),
                tried: "agent (0 keys), key /root/.ssh/id_ed25519".into(),
                allowed: vec!["publickey".into()],
            },
        );
        assert_eq!(
            e.to_string(),
            "r1: auth: permission denied for root; tried agent (0 keys), \
             key /root/.ssh/id_ed25519; the server allows publickey"
        );
        let t = SshError::new(
            "h:22",
            Step::Connect,
            Cause::Timeout(Duration::from_secs(3)),
        );
        assert_eq!(t.to_string(), "h:22: connect: timed out after 3s");
    }
}
