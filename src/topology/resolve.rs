//! Every host of a run resolved through the operator's ssh_config, on the initiator: the
//! address, user, port, identity files, timeouts, host-key policy and ProxyJump hops it gives
//! go into the host's [`ChildSpec`], so relays (which have no ssh_config of the operator's)
//! connect as the initiator would (docs/ssh.md, "ssh_config").
//!
//! Precedence: the command line, then the topology (or a `--remote` URL), then ssh_config,
//! then the defaults (the local user, port 22).

use crate::ssh::ssh_config::{HostConfig, Preset, SshConfig};
use crate::wire::ChildSpec;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// ProxyJump chains longer than this (a hop's own ProxyJump included) are refused: a loop.
const MAX_HOPS: usize = 8;

/// What the command line says for every host, beating the topology and ssh_config.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--host-key-policy` given: ssh_config's StrictHostKeyChecking is not used.
    pub host_key_policy: bool,
    /// `--connect-timeout` given: ssh_config's ConnectTimeout is not used.
    pub connect_timeout: bool,
}

/// Resolves hosts through one [`SshConfig`], reporting each warning once.
pub struct Resolver {
    config: SshConfig,
    overrides: Overrides,
    warned: HashSet<String>,
    /// Public keys of identity files, by path (`None`: unreadable).
    keys: HashMap<PathBuf, Option<String>>,
}

/// What the topology (or a URL) set for a host itself: these beat ssh_config.
#[derive(Debug, Clone, Default)]
pub struct Given {
    pub user: Option<String>,
    pub port: Option<u16>,
}

impl Resolver {
    pub fn new(config: SshConfig, overrides: Overrides) -> Resolver {
        Resolver {
            config,
            overrides,
            warned: HashSet::new(),
            keys: HashMap::new(),
        }
    }

    /// No ssh_config: hosts resolve to themselves, the local user, port 22.
    pub fn none() -> Resolver {
        Resolver::new(SshConfig::empty(), Overrides::default())
    }

    /// The operator's configuration: `file` as `ssh -F` (`none` for no file), else
    /// ~/.ssh/config then /etc/ssh/ssh_config.
    pub fn for_operator(
        file: Option<&Path>,
        home: &Path,
        overrides: Overrides,
    ) -> Result<Resolver, String> {
        let config = match file {
            Some(f) => SshConfig::load_file(f, home)?,
            None => SshConfig::load_default(home)?,
        };
        Ok(Resolver::new(config, overrides))
    }

    /// Resolves `spec`, whose `host` is the host as written, in place: `given` is what the
    /// topology or URL set.
    pub fn apply(&mut self, spec: &mut ChildSpec, given: &Given) -> Result<(), String> {
        let resolved = self.resolve(&spec.host, given)?;
        let jumps = self.jumps(&spec.host, &resolved, 0)?;
        self.fill(spec, resolved);
        spec.jumps = jumps;
        Ok(())
    }

    fn resolve(&mut self, host: &str, given: &Given) -> Result<HostConfig, String> {
        let preset = Preset {
            user: given.user.clone(),
            port: given.port,
        };
        let resolved = self
            .config
            .resolve(host, &preset)
            .map_err(|e| format!("ssh config: {e}"))?;
        for w in &resolved.warnings {
            if self.warned.insert(w.clone()) {
                tracing::warn!("ssh config: {w}");
            }
        }
        Ok(resolved)
    }

    fn fill(&mut self, spec: &mut ChildSpec, resolved: HostConfig) {
        spec.host = resolved.hostname;
        spec.user = resolved.user;
        spec.port = resolved.port;
        spec.identities_only = resolved.identities_only;
        spec.identity_files = resolved
            .identity_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        spec.identity_keys = resolved
            .identity_files
            .iter()
            .filter_map(|p| self.public_key(p))
            .collect();
        spec.user_known_hosts = resolved.user_known_hosts;
        spec.global_known_hosts = resolved.global_known_hosts;
        if !self.overrides.connect_timeout {
            spec.connect_timeout = resolved.connect_timeout;
        }
        if !self.overrides.host_key_policy {
            spec.accept_new = resolved.accept_new;
        }
    }

    /// The hops of `resolved`'s ProxyJump: each resolved in turn; the first hop's own
    /// ProxyJump comes before it (as `ssh -J` connects to the first hop with its own config),
    /// later hops' are not used.
    fn jumps(
        &mut self,
        for_host: &str,
        resolved: &HostConfig,
        depth: usize,
    ) -> Result<Vec<ChildSpec>, String> {
        let mut hops = Vec::new();
        for (i, hop) in resolved.proxy_jump.iter().enumerate() {
            if depth + hops.len() >= MAX_HOPS {
                return Err(format!(
                    "ssh config: the ProxyJump chain of {for_host} is longer than {MAX_HOPS} hops \
                     (a loop?)"
                ));
            }
            let hop_config = self.resolve(
                &hop.host,
                &Given {
                    user: hop.user.clone(),
                    port: hop.port,
                },
            )?;
            if i == 0 {
                hops.extend(self.jumps(for_host, &hop_config, depth + 1)?);
            }
            let mut spec = ChildSpec {
                name: hop.host.clone(),
                host: hop.host.clone(),
                ..ChildSpec::default()
            };
            self.fill(&mut spec, hop_config);
            hops.push(spec);
        }
        Ok(hops)
    }

    /// The public key of an identity file, "type base64", once per file.
    fn public_key(&mut self, path: &Path) -> Option<String> {
        self.keys
            .entry(path.to_path_buf())
            .or_insert_with(|| {
                let mut key = crate::ssh::auth::file_public_key(path)?;
                key.set_comment("");
                key.to_openssh().ok()
            })
            .clone()
    }
}

/// `user@address:port` as `topology check` shows it, IPv6 in brackets, with the ProxyJump hops.
pub fn address(spec: &ChildSpec) -> String {
    let one = |s: &ChildSpec| {
        let host = if s.host.contains(':') {
            format!("[{}]", s.host)
        } else {
            s.host.clone()
        };
        format!("{}@{host}:{}", s.user, s.port)
    };
    if spec.jumps.is_empty() {
        one(spec)
    } else {
        let hops: Vec<String> = spec.jumps.iter().map(one).collect();
        format!("{} via {}", one(spec), hops.join(","))
    }
}
