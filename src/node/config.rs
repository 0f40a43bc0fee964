//! What a run is asked to do, as plain data. `cli` builds [`RunOptions`] from the command
//! line; the initiator turns them, with the topology, into the [`NodeConfig`] that every node
//! of the run receives in its `Start` frame, so a relay stages its children with exactly the
//! settings the initiator used for it.

use crate::wire::{BuildRef, NodeConfig};
use std::path::PathBuf;
use std::time::Duration;

/// `arbor run`, as plain data.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Graph to run locally.
    pub file: Option<PathBuf>,
    /// Graphs to run on the hosts they name.
    pub remotes: Vec<PathBuf>,
    /// A topology file naming the hosts to reach and their graphs.
    pub topology: Option<PathBuf>,
    /// `--limit`: only these hosts (a nodeset, `@failed` for the last run's failures), with
    /// the relays on their way as relays only.
    pub limit: Option<String>,
    /// Exit after being converged this long.
    pub converged_timeout: Option<Duration>,
    pub noop: bool,
    /// `--diff`: show what resources change (or, with `noop`, would change) as diffs.
    pub diff: bool,
    /// `None`: this machine's host name.
    pub hostname: Option<String>,
    /// Send graph files to their hosts again when they are edited.
    pub live_edits: bool,
    /// Simultaneous SSH connections being set up (0: unlimited).
    pub cconns: usize,
    pub no_caching: bool,
    /// `--cache-max-size`: the cap on each host's cache, as written (`cache::MaxSize`).
    pub cache_max_size: String,
    /// `--compress never|auto|always`.
    pub compress: crate::wire::Compress,
    /// `--transport ssh|quic|auto`.
    pub transport: crate::wire::Transport,
    /// `--quic-ports FIRST-LAST`.
    pub quic_ports: Option<(u16, u16)>,
    /// `--congestion cubic|bbr|newreno`.
    pub congestion: crate::wire::quic::Congestion,
    pub tmp_prefix: bool,
    pub seeds: Vec<String>,
    /// The etcd user the initiator acts as at the --seeds etcd.
    pub seeds_user: Option<String>,
    /// Where that user's password is (else ARBOR_SEEDS_PASSWORD, or the terminal).
    pub seeds_password_file: Option<PathBuf>,
    pub no_server: bool,
    /// `-F`: the only ssh_config file to read (`none`: no file); `None`: ~/.ssh/config and
    /// /etc/ssh/ssh_config.
    pub ssh_config: Option<PathBuf>,
    pub identities: Vec<PathBuf>,
    pub known_hosts: Vec<PathBuf>,
    pub accept_new: bool,
    /// `--host-key-policy` was given: it beats ssh_config's StrictHostKeyChecking.
    pub host_key_policy_given: bool,
    pub allow_interactive: bool,
    /// `-k`: ask once for an SSH password used for every host.
    pub ask_pass: bool,
    /// `--password-file`: that password, from a file.
    pub password_file: Option<PathBuf>,
    /// `--become`: start arbor as root through sudo on every host.
    pub escalate: bool,
    /// `-K`: ask once for the sudo password.
    pub ask_become_pass: bool,
    /// `--become-password-file`: that password, from a file.
    pub become_password_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// `--connect-timeout` was given: it beats ssh_config's ConnectTimeout.
    pub connect_timeout_given: bool,
    /// Builds for other platforms: (platform, path).
    pub binaries: Vec<(String, PathBuf)>,
    pub remote_tmp: String,
    /// Log level: 0 info, 1 debug, 2 trace.
    pub verbosity: u8,
    /// `--output json`: events and the summary as JSON lines on stdout.
    pub json: bool,
    /// `--output text`: plain timestamped lines, never the live view.
    pub plain: bool,
    /// Seconds without a frame after which a link counts as down (`--link-timeout`).
    pub link_timeout: u64,
    /// Seconds a down link may take to come back before its subtree is torn down
    /// (`--reconnect-grace`).
    pub reconnect_grace: u64,
    /// `-q`: the view shows warnings, errors, failures and the summary only.
    pub quiet: bool,
    /// `--log-file`: every event is also written there, with a timestamp.
    pub log_file: Option<PathBuf>,
    /// 0 for the initiator.
    pub depth: usize,
    /// A staged node's working dir on its host.
    pub workdir: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        let node = NodeConfig::default();
        RunOptions {
            file: None,
            remotes: Vec::new(),
            topology: None,
            limit: None,
            converged_timeout: None,
            noop: false,
            diff: false,
            hostname: None,
            live_edits: true,
            cconns: node.cconns,
            no_caching: false,
            cache_max_size: node.cache_max_size.clone(),
            compress: crate::wire::Compress::Auto,
            transport: node.transport,
            quic_ports: node.quic_ports,
            congestion: node.congestion,
            tmp_prefix: false,
            seeds: Vec::new(),
            seeds_user: None,
            seeds_password_file: None,
            no_server: false,
            ssh_config: None,
            identities: Vec::new(),
            known_hosts: Vec::new(),
            accept_new: false,
            host_key_policy_given: false,
            allow_interactive: false,
            ask_pass: false,
            password_file: None,
            escalate: false,
            ask_become_pass: false,
            become_password_file: None,
            connect_timeout: Duration::from_secs(node.connect_timeout),
            connect_timeout_given: false,
            binaries: Vec::new(),
            remote_tmp: node.remote_tmp,
            verbosity: 0,
            json: false,
            plain: false,
            quiet: false,
            log_file: None,
            link_timeout: node.link_timeout,
            reconnect_grace: node.reconnect_grace,
            depth: 0,
            workdir: None,
        }
    }
}

/// `arbor exec`, as plain data.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// `-w`: the nodesets of the hosts to run on (joined).
    pub nodesets: Vec<String>,
    /// `-x`: nodesets of hosts to leave out.
    pub exclude: Vec<String>,
    /// With a topology, `-w` names its hosts, reached through its relays.
    pub topology: Option<PathBuf>,
    /// `-b`: gather identical outputs at the end.
    pub gather: bool,
    /// The command's words, joined with spaces for the remote shell (as ssh does).
    pub command: Vec<String>,
    /// Without a topology: the SSH user and port given on the command line (they beat
    /// ssh_config's User and Port; default: the local user, 22).
    pub user: Option<String>,
    pub port: Option<u16>,
    /// The settings shared with `arbor run`: cconns, keys, known_hosts, host-key policy,
    /// timeouts, builds, remote tmp, caching, compression, verbosity.
    pub run: RunOptions,
}

/// The shortest wait for a started child's hello: a loaded host can take a few seconds to
/// exec a freshly copied binary.
const MIN_HELLO_TIMEOUT: u64 = 10;

impl RunOptions {
    /// The settings every node of this run gets; `cconns` as the topology may override it,
    /// `builds` every build the initiator can copy, `run` the run's id.
    pub fn node_config(&self, cconns: usize, builds: Vec<BuildRef>, run: &str) -> NodeConfig {
        let connect_timeout = self.connect_timeout.as_secs().max(1);
        NodeConfig {
            run: run.to_string(),
            connect_timeout,
            hello_timeout: (2 * connect_timeout).max(MIN_HELLO_TIMEOUT),
            verbosity: self.verbosity,
            // With a log file, hosts still send everything for it to keep.
            quiet: self.quiet && self.log_file.is_none(),
            remote_tmp: self.remote_tmp.clone(),
            no_caching: self.no_caching,
            cache_max_size: self.cache_max_size.clone(),
            compress: self.compress,
            accept_new: self.accept_new,
            cconns,
            converged_timeout: self.converged_timeout.map(|d| d.as_secs()),
            link_timeout: self.link_timeout.max(1),
            reconnect_grace: self.reconnect_grace,
            transport: self.transport,
            quic_ports: self.quic_ports,
            congestion: self.congestion,
            noop: self.noop,
            diff: self.diff,
            builds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_that_applies_below_reaches_the_node_config() {
        let options = RunOptions {
            connect_timeout: Duration::from_secs(2),
            verbosity: 1,
            remote_tmp: "/var/tmp".into(),
            no_caching: true,
            cache_max_size: "10%".into(),
            compress: crate::wire::Compress::Always,
            accept_new: true,
            converged_timeout: Some(Duration::from_secs(5)),
            noop: true,
            diff: true,
            quiet: true,
            transport: crate::wire::Transport::Quic,
            quic_ports: Some((60000, 60010)),
            congestion: crate::wire::quic::Congestion::Bbr,
            ..RunOptions::default()
        };
        let builds = vec![BuildRef {
            platform: "Linux aarch64".into(),
            sha256: "ab".into(),
            size: 3,
        }];
        let node = options.node_config(7, builds.clone(), "0123456789abcdef");
        assert_eq!(
            node,
            NodeConfig {
                run: "0123456789abcdef".into(),
                connect_timeout: 2,
                hello_timeout: MIN_HELLO_TIMEOUT,
                verbosity: 1,
                quiet: true,
                remote_tmp: "/var/tmp".into(),
                no_caching: true,
                cache_max_size: "10%".into(),
                compress: crate::wire::Compress::Always,
                accept_new: true,
                cconns: 7,
                transport: crate::wire::Transport::Quic,
                quic_ports: Some((60000, 60010)),
                congestion: crate::wire::quic::Congestion::Bbr,
                converged_timeout: Some(5),
                noop: true,
                diff: true,
                link_timeout: crate::wire::LINK_TIMEOUT,
                reconnect_grace: crate::wire::RECONNECT_GRACE,
                builds,
            }
        );
        // With a log file to fill, hosts still send everything.
        let logged = RunOptions {
            log_file: Some("run.log".into()),
            ..options.clone()
        };
        assert!(!logged.node_config(7, Vec::new(), "r").quiet);
        // It survives the trip down the link unchanged.
        let json = serde_json::to_string(&node).expect("json");
        assert_eq!(
            serde_json::from_str::<NodeConfig>(&json).expect("parse"),
            node
        );
    }

    #[test]
    fn a_config_without_a_cache_cap_gets_the_default() {
        let mut json = serde_json::to_value(NodeConfig::default()).expect("json");
        json.as_object_mut()
            .expect("object")
            .remove("cache_max_size");
        let node: NodeConfig = serde_json::from_value(json).expect("parse");
        assert_eq!(node.cache_max_size, crate::node::cache::DEFAULT_MAX_SIZE);
        assert_eq!(
            RunOptions::default()
                .node_config(1, Vec::new(), "r")
                .cache_max_size,
            "1G"
        );
    }

    #[test]
    fn a_long_connect_timeout_lengthens_the_hello_wait() {
        let options = RunOptions {
            connect_timeout: Duration::from_secs(30),
            ..RunOptions::default()
        };
        assert_eq!(options.node_config(1, Vec::new(), "r").hello_timeout, 60);
    }
}
