//! The command line, and nothing else: clap definitions turned into plain config values.
//!
//! The rest of arbor sees only [`Command`] and the config structs it carries, never clap,
//! so every job can be driven from tests without building argument vectors.

mod defaults;

use clap::{FromArgMatches, Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

pub use crate::node::config::{ExecOptions, RunOptions};

/// arbor bootstraps and manages fleets of machines over SSH, with nothing installed on them
/// first. It copies itself to each host, tunnels the host back to a coordination store on the
/// initiator, and runs a graph of resources there. Hosts behind jump hosts are reached through
/// relays: a host with children re-launches itself as a relay and stages its own children.
#[derive(Parser, Debug)]
#[command(
    name = "arbor",
    version,
    about,
    long_about,
    propagate_version = true,
    after_help = CONFIG_HELP
)]
struct Args {
    /// More log output: -v for debug, -vv for trace (ARBOR_LOG overrides). Reaches every
    /// host of a run.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Less output: warnings, errors, failures and the summary only. Reaches every host of a
    /// run (unless --log-file keeps everything).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Also write everything to this file, with timestamps, whatever -q or --output show:
    /// arbor's log at the -v level, and every host's events.
    #[arg(long, value_name = "PATH", global = true)]
    log_file: Option<PathBuf>,
    /// Colours in arbor's log on stderr: auto (when stderr is a terminal and NO_COLOR is not
    /// set), always, never.
    #[arg(long, value_name = "WHEN", global = true, default_value = "auto",
          value_parser = ["auto", "always", "never"])]
    color: String,

    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Print arbor's version.
    Version,
    /// Run the coordination store alone: an etcd v3 API server (etcdctl works against it),
    /// with /health, /version, /metrics and etcd's JSON gateway on the same port.
    #[command(
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true,
        after_help = STORE_EXAMPLES
    )]
    Store {
        #[command(subcommand)]
        action: Option<StoreSub>,
        /// Where to listen: host:port or unix:PATH. Loopback only, unless --allow-non-loopback.
        #[arg(long, value_name = "ADDR", required = true)]
        listen: Option<String>,
        /// Persist the store here (every acknowledged write survives a crash); in memory if unset.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
        /// Listen on a non-loopback address. The store has no authentication.
        #[arg(long)]
        allow_non_loopback: bool,
        /// The space quota, as etcd's flag: past it writes are refused and the NOSPACE alarm
        /// is raised. 0 is the default (2 GiB), a negative value means no quota.
        #[arg(
            long,
            value_name = "BYTES",
            default_value_t = 0,
            allow_negative_numbers = true
        )]
        quota_backend_bytes: i64,
    },
    /// Run graphs here, on hosts over SSH, or through relays, and keep them converged.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Run a command on many hosts at once (ClusterShell's clush, through arbor's relays): on
    /// the SSH hosts a nodeset names, or on topology hosts by name. Output is live, each line
    /// prefixed by its host; stderr goes to stderr.
    #[command(after_help = EXEC_EXAMPLES)]
    Exec(Box<ExecArgs>),
    /// Work with topology files (docs/topology.md).
    #[command(subcommand)]
    Topology(TopologySub),
    /// Print a shell completion script for arbor.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// (internal) Read a zstd stream on stdin (a patch against --patch-from if given) and
    /// write it to --dest atomically, only if it has --size bytes and the --sha256: how a
    /// parent copies to a host that already runs arbor (`node::transfer`).
    #[command(hide = true)]
    Receive {
        #[arg(long, value_name = "PATH")]
        dest: PathBuf,
        #[arg(long, value_name = "HEX")]
        sha256: String,
        #[arg(long, value_name = "BYTES")]
        size: u64,
        /// Octal.
        #[arg(long, value_name = "MODE", default_value = "600")]
        mode: String,
        #[arg(long, value_name = "PATH")]
        patch_from: Option<PathBuf>,
    },
    /// (internal) Sibling seeding: serve the verified cache entry --file once, to the first
    /// connection showing the capability read from stdin (`node::sibling`).
    #[command(hide = true)]
    SeedServe {
        #[arg(long, value_name = "PATH")]
        file: PathBuf,
        #[arg(long, value_name = "HEX")]
        sha256: String,
        #[arg(long, value_name = "BYTES")]
        size: u64,
        #[arg(long, value_name = "SECONDS", default_value_t = crate::node::sibling::EXPIRE)]
        expire: u64,
        #[arg(long, value_name = "ADDR")]
        bind: Option<String>,
        /// Unsealed, for a fetcher with no arbor yet (the binary's first copy): the request
        /// is a line of hex, the answer the file's bytes as they are.
        #[arg(long)]
        plain: bool,
    },
    /// (internal) Sibling seeding: fetch an artifact from a sibling's seed-serve under the
    /// capability read from stdin, keeping it only if it has --size bytes and the --sha256.
    #[command(hide = true)]
    SeedFetch {
        #[arg(long, value_name = "ADDR")]
        from: String,
        #[arg(long, value_name = "PATH")]
        dest: PathBuf,
        #[arg(long, value_name = "HEX")]
        sha256: String,
        #[arg(long, value_name = "BYTES")]
        size: u64,
        #[arg(long, value_name = "SECONDS", default_value_t = crate::node::sibling::CONNECT_TIMEOUT)]
        connect_timeout: u64,
    },
    /// (internal) Connect to the re-attach socket of the node running in working dir --dir
    /// and splice stdin and stdout to it: how a parent reaches a running child over a fresh
    /// SSH connection (`node::reattach`).
    #[command(hide = true)]
    Reattach {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

const CONFIG_HELP: &str = "\
Configuration: flag defaults come from /etc/arbor/config.toml, then
$XDG_CONFIG_HOME/arbor/config.toml (default ~/.config/arbor/config.toml), then ARBOR_*
environment variables (ARBOR_CCONNS=32, ARBOR_OUTPUT=json, ARBOR_LINK_TIMEOUT=30); each beats
the one before, and the command line beats them all. Keys are the long flags' names
(`cconns = 32`); an unknown key is an error (exit 2). The keys: docs/config.md.";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  arbor completions bash > /etc/bash_completion.d/arbor
  arbor completions zsh > \"${fpath[1]}/_arbor\"
  arbor completions fish > ~/.config/fish/completions/arbor.fish";

#[derive(Subcommand, Debug)]
enum StoreSub {
    /// Make a new data dir from a snapshot that `etcdctl snapshot save` took of an arbor store.
    Restore {
        /// The snapshot file.
        file: PathBuf,
        /// The data dir to create; it must not exist, or be empty.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
    },
}

const STORE_EXAMPLES: &str = "\
Examples:
  arbor store --listen 127.0.0.1:2379 --data-dir ./data
      serve the store; etcdctl --endpoints=http://127.0.0.1:2379 and curl work against it
  ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 snapshot save backup.snap
      back it up (arbor's own snapshot format, see docs/store.md)
  arbor store restore backup.snap --data-dir ./restored
      make a new data dir from that backup, then serve it with --data-dir ./restored";

#[derive(Subcommand, Debug)]
enum TopologySub {
    /// Validate a topology file and print the tree it describes (exit 2 if invalid).
    Check {
        /// The topology file (YAML).
        file: PathBuf,
        /// Resolve hosts through this ssh_config file only, as `ssh -F` (`none`: no file).
        /// Default: ~/.ssh/config, then /etc/ssh/ssh_config.
        #[arg(short = 'F', long = "ssh-config", value_name = "FILE")]
        ssh_config: Option<PathBuf>,
    },
}

const RUN_EXAMPLES: &str = "\
Examples:
  arbor run --file site.yaml --converged-timeout 5
      run one graph on this machine until it has been converged for 5 s
  arbor run --remote a.yaml --remote b.yaml --converged-timeout 5
      copy arbor to the hosts each graph's `remote: ssh://user@host:port` names, run each graph
      there, exchange exports through the store embedded here, exit once all are converged
  arbor run --topology topology/dc1.yaml
      reach hosts behind relays and jump hosts; run until ^C
  arbor run --topology topology/dc1.yaml --compress never --converged-timeout 10
      the same, every copy plain (the default, auto, compresses by each link's measured rate)
  arbor run --topology topology/dc1.yaml --transport ssh --converged-timeout 10
      keep every link on its SSH channel (the default, auto, moves links onto QUIC when UDP
      gets through, so they ride out a change of this machine's address)
  arbor run --topology topology/dc1.yaml --limit 'rack1-n[01-08]' --converged-timeout 10
      only those hosts (and the relays on their way, which run no graph of their own)
  arbor run --topology topology/dc1.yaml --limit @failed --converged-timeout 10
      only the hosts that failed in the last run of this topology
  arbor run -F ./ssh_config --topology site.yaml
      resolve hosts through that ssh_config only (default: ~/.ssh/config, /etc/ssh/ssh_config):
      aliases, HostName, User, Port, IdentityFile, ProxyJump... (docs/ssh.md)

Defaults for these flags can be set in /etc/arbor/config.toml, ~/.config/arbor/config.toml
($XDG_CONFIG_HOME respected) and ARBOR_* variables (ARBOR_OUTPUT=json); see `arbor --help`.

Exit codes: 0 converged, 1 some host failed, 2 bad input (nothing contacted),
130 ^C, 143 SIGTERM, 129 SIGHUP (each tears every host down first; a second signal
exits at once and names the hosts that may still hold state).";

const EXEC_EXAMPLES: &str = "\
Examples:
  arbor exec -w 'n[01-40]' -- uptime
      run uptime on n01 … n40 over SSH (as ssh_config says, else the local user; -l USER)
  arbor exec -w 10.199.0.[11-12] -b -- uname -r
      gather identical outputs at the end under one folded nodeset, as clush -b
  arbor exec --topology topology/lab.yaml -w 'l[1-2]-[1-3]' -x l2-3 -- df -h /
      run on five leaves through their relays; no other host is contacted
  arbor exec --topology topology/dc1.yaml -w rack1-n07 -- 'journalctl -n 20 | grep -i err'
      one host behind a relay; the command is one shell line, run by the login shell
  arbor exec --topology topology/dc1.yaml -w @failed -- uptime
      only the hosts whose command failed in the last arbor exec over this topology

The hosts' login shell runs COMMAND (its words joined by spaces, as ssh does), with stdin from
/dev/null, in a process group of its own: ^C (or a lost connection) kills that group on every
host, and no arbor process or working dir is left on the relays.

Defaults for the SSH flags can be set in /etc/arbor/config.toml, ~/.config/arbor/config.toml
($XDG_CONFIG_HOME respected) and ARBOR_* variables (ARBOR_CCONNS=32); see `arbor --help`.

Exit codes: the largest exit code of COMMAND across hosts; 255 when a host could not be
reached (or its connection, staging or relay failed); 2 for bad input (a bad nodeset, an empty
command, a host not in the topology; nothing contacted); 130 on ^C (143 SIGTERM, 129 SIGHUP).";

/// `--quic-ports`: `FIRST-LAST`, both ports, FIRST at most LAST (also a topology's
/// `quic_ports`).
pub fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?}: expected FIRST-LAST, two UDP ports (1-65535), FIRST <= LAST");
    let (first, last) = s.trim().split_once('-').ok_or_else(bad)?;
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(bad());
    }
    Ok((first, last))
}

/// `--cache-max-size`: a size the cache policy understands, kept as written.
fn parse_cache_max_size(s: &str) -> Result<String, String> {
    crate::node::cache::MaxSize::parse(s).map(|_| s.trim().to_string())
}

/// The SSH, link and staging flags `arbor run` and `arbor exec` share.
#[derive(clap::Args, Debug)]
struct SshArgs {
    /// Seconds without a word on a link (every link sends heartbeats, four or more per timeout) before it
    /// counts as down: the parent shows that host as reconnecting, and the host keeps its
    /// subtree running for --reconnect-grace. Covers links that die without a FIN.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::wire::LINK_TIMEOUT)]
    link_timeout: u64,
    /// Seconds a link counted down may take to come back (on the same SSH connection) before
    /// giving up on it: then the parent fails that host, and the host, cut off, tears its
    /// own subtree down and removes every working dir, as on ^C. 0: give up at once.
    #[arg(long, value_name = "SECONDS", default_value_t = crate::wire::RECONNECT_GRACE)]
    reconnect_grace: u64,
    /// What each link between a parent and its child runs on once SSH has staged and started
    /// the child. auto (the default): QUIC when UDP gets through (the child listens on a UDP
    /// port, the parent connects with both ends' certificates pinned through the SSH channel;
    /// control frames, events and store traffic then ride its streams, and the link follows
    /// an address change of the parent), else the SSH channel within a second. ssh: the SSH
    /// channel only. quic: QUIC, or the host fails. The summary says which each link used
    /// (docs/remote.md, "QUIC between nodes").
    #[arg(long, value_name = "HOW", default_value = "auto",
          value_parser = ["ssh", "quic", "auto"])]
    transport: String,
    /// The UDP ports children listen on for QUIC, as FIRST-LAST (for a firewall that lets
    /// only those through); a topology entry's quic_ports sets them for its host. Default:
    /// any free port.
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_port_range)]
    quic_ports: Option<(u16, u16)>,
    /// How a QUIC link's sender controls congestion, at every depth. cubic (the default), as
    /// TCP and so SSH do: it fills a thin link, also past a busy far end. bbr: keeps the
    /// link's queue short (a 6 ms round trip under load against 70 ms) and does not take
    /// random loss for congestion, for lossy links; quinn's BBR is experimental, and fell to
    /// 0.9 of the link with a round trip under a millisecond. newreno: the classic.
    #[arg(long, value_name = "HOW", default_value = "cubic",
          value_parser = ["cubic", "bbr", "newreno"])]
    congestion: String,
    /// At most this many SSH connections being set up at once (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 64)]
    cconns: usize,
    /// Copy arbor (and the graphs' source: files) into each host's working dir and remove them
    /// at the end, instead of keeping them in the host's cache (~/.cache/arbor): nothing is
    /// kept.
    #[arg(long)]
    no_caching: bool,
    /// When copies between nodes are compressed. auto (the default): each link's rate is
    /// measured when its host is staged (512 KiB on the probe's stdin); copies go plain on a
    /// LAN (12 MB/s and up) and compressed on slower links, at a higher zstd level the slower
    /// the link. arbor's first copy to a host (no arbor there yet) goes gzipped if the host
    /// has gzip. Once arbor is on a host, artifacts and builds are streamed to it
    /// zstd-compressed and unpacked by arbor itself there, as a zstd patch against the older
    /// version the host's cache holds when there is one (a delta upgrade). always: compress
    /// on every link, whatever its rate. never: plain copies, no deltas. `--compress` alone
    /// means always (docs/remote.md, "Compression").
    #[arg(long, value_name = "WHEN", default_value = "auto", num_args = 0..=1,
          default_missing_value = "always", value_parser = ["never", "auto", "always"])]
    compress: String,
    /// Resolve hosts through this ssh_config file only, as `ssh -F` (`none`: no file).
    /// Default: ~/.ssh/config, then /etc/ssh/ssh_config. arbor follows HostName, User, Port,
    /// IdentityFile, IdentitiesOnly, ConnectTimeout, UserKnownHostsFile, GlobalKnownHostsFile,
    /// StrictHostKeyChecking, HashKnownHosts and ProxyJump in Host and Match blocks and
    /// Includes (docs/ssh.md); the command line beats the topology, which beats ssh_config.
    #[arg(short = 'F', long = "ssh-config", value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// An SSH private key to try first, before the topology's and ssh_config's keys and
    /// before any agent key (repeatable).
    #[arg(long = "identity", short = 'i', value_name = "KEY")]
    identities: Vec<PathBuf>,
    /// An extra known_hosts file to trust (repeatable); ~/.ssh/known_hosts is always read.
    #[arg(long = "known-hosts", value_name = "FILE")]
    known_hosts: Vec<PathBuf>,
    /// strict: refuse unknown and changed host keys. accept-new: record unknown keys in
    /// ~/.ssh/known_hosts, still refuse changed ones. Default: ssh_config's
    /// StrictHostKeyChecking for the host (yes: strict, accept-new; `no` is never honoured:
    /// strict), else strict.
    #[arg(long, value_name = "POLICY", value_parser = ["strict", "accept-new"])]
    host_key_policy: Option<String>,
    /// Ask on the terminal for passphrases and passwords when keys and the agent fail.
    #[arg(long)]
    allow_interactive: bool,
    /// Ask once, on the terminal, for an SSH password used for every host (tried after keys;
    /// relays get it for their own subtree only). Beats a topology's `password:`.
    #[arg(short = 'k', long)]
    ask_pass: bool,
    /// Read the SSH password of -k from this file (its first line; keep it mode 0600)
    /// instead of asking.
    #[arg(long, value_name = "PATH", conflicts_with = "ask_pass")]
    password_file: Option<PathBuf>,
    /// Become root through `sudo` on every host, after logging in as the host's user (as
    /// `become: true` on every topology entry): `arbor run` starts arbor there as root, from
    /// a copy the login user cannot change; `arbor exec` runs the command as root
    /// (docs/topology.md, "Become").
    #[arg(long = "become")]
    escalate: bool,
    /// Ask once, on the terminal, for the sudo password of the hosts that become root, and
    /// feed it to `sudo -S` on each (never on a command line; relays get it for their own
    /// subtree only).
    #[arg(short = 'K', long)]
    ask_become_pass: bool,
    /// Read the sudo password of --ask-become-pass from this file (its first line; keep it
    /// mode 0600) instead of asking.
    #[arg(long, value_name = "PATH", conflicts_with = "ask_become_pass")]
    become_password_file: Option<PathBuf>,
    /// Seconds to wait for a host's TCP connect and SSH handshake. Default: ssh_config's
    /// ConnectTimeout for the host, else 10.
    #[arg(long, value_name = "SECONDS")]
    connect_timeout: Option<u64>,
    /// A build of arbor for hosts of another platform, as ARCH=PATH (e.g.
    /// aarch64=./arbor-aarch64 or "Linux aarch64"=PATH). Repeatable.
    #[arg(long = "binary", value_name = "ARCH=PATH")]
    binaries: Vec<String>,
    /// Where working dirs are created on hosts.
    #[arg(long, value_name = "DIR", default_value = "/tmp")]
    remote_tmp: String,
}

impl SshArgs {
    /// These flags into `options`; `Err` (exit 2, said on stderr) for a bad --binary.
    fn apply(self, options: &mut RunOptions) -> Result<(), ExitCode> {
        let mut binaries = Vec::new();
        for spec in &self.binaries {
            match spec.split_once('=') {
                Some((arch, path)) if !arch.is_empty() && !path.is_empty() => {
                    binaries.push((arch.to_string(), PathBuf::from(path)))
                }
                _ => {
                    eprintln!("arbor: --binary {spec:?}: expected ARCH=PATH");
                    return Err(ExitCode::from(crate::exit::BAD_INPUT));
                }
            }
        }
        options.link_timeout = self.link_timeout;
        options.reconnect_grace = self.reconnect_grace;
        options.cconns = self.cconns;
        options.no_caching = self.no_caching;
        options.compress = crate::wire::Compress::parse(&self.compress).unwrap_or_default();
        options.transport = crate::wire::Transport::parse(&self.transport).unwrap_or_default();
        options.quic_ports = self.quic_ports;
        options.congestion =
            crate::wire::quic::Congestion::parse(&self.congestion).unwrap_or_default();
        options.ssh_config = self.ssh_config;
        options.identities = self.identities;
        options.known_hosts = self.known_hosts;
        options.accept_new = self.host_key_policy.as_deref() == Some("accept-new");
        options.host_key_policy_given = self.host_key_policy.is_some();
        options.allow_interactive = self.allow_interactive;
        options.ask_pass = self.ask_pass;
        options.password_file = self.password_file;
        options.escalate = self.escalate;
        options.ask_become_pass = self.ask_become_pass;
        options.become_password_file = self.become_password_file;
        options.connect_timeout = Duration::from_secs(self.connect_timeout.unwrap_or(10));
        options.connect_timeout_given = self.connect_timeout.is_some();
        options.binaries = binaries;
        options.remote_tmp = self.remote_tmp;
        Ok(())
    }
}

/// `arbor exec`'s flags (the help text and examples come from `Sub::Exec`).
#[derive(clap::Args, Debug)]
struct ExecArgs {
    /// The hosts to run on, as a nodeset (`n[01-40]`, `a,b`, `10.0.0.[1-9]`; repeatable);
    /// `@failed` stands for the hosts whose command failed in the last `arbor exec` over the
    /// same topology (or without one). Without --topology these are SSH hosts, resolved
    /// through ssh_config; with it, names of the topology's hosts.
    #[arg(short = 'w', long = "nodes", value_name = "NODESET", required = true)]
    nodesets: Vec<String>,
    /// Hosts to leave out, as a nodeset (repeatable).
    #[arg(short = 'x', long = "exclude", value_name = "NODESET")]
    exclude: Vec<String>,
    /// Reach the hosts -w names as this topology file says: through its relays and jump
    /// hosts, with its users, ports and keys (docs/topology.md). Only the paths to them are
    /// contacted.
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Gather identical outputs and print each once at the end, under the folded nodeset of
    /// the hosts that gave it (as clush -b); stderr stays live.
    #[arg(short = 'b', long = "gather")]
    gather: bool,
    /// The SSH user, without --topology (default: ssh_config's User, else the local user).
    #[arg(short = 'l', long, value_name = "USER", conflicts_with = "topology")]
    user: Option<String>,
    /// The SSH port, without --topology (default: ssh_config's Port, else 22).
    #[arg(short = 'p', long, value_name = "PORT", conflicts_with = "topology",
          value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    #[command(flatten)]
    ssh: SshArgs,
    /// The command, after `--`: its words are joined by spaces and run by each host's login
    /// shell, as ssh runs a command.
    #[arg(
        value_name = "COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

/// `arbor run`'s flags (the help text and examples come from `Sub::Run`).
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// A graph file (mgmt YAML) to run on this host.
    #[arg(long, value_name = "GRAPH")]
    file: Option<PathBuf>,
    /// A graph to run on the host its `remote: ssh://[user[:password]@]host[:port]` names.
    /// Repeat for more hosts.
    #[arg(long = "remote", value_name = "GRAPH")]
    remotes: Vec<PathBuf>,
    /// A topology file: the hosts to reach, through relays and jump hosts, and the graph
    /// each runs (docs/topology.md).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Run only on these hosts (a nodeset of host names; relays on their way stage them but
    /// run no graph). `@failed` (alone or in the list) stands for the hosts that failed in the
    /// last run of the same --topology/--remote/--file, kept in
    /// ~/.local/state/arbor/failed/ ($XDG_STATE_HOME respected).
    #[arg(long, value_name = "NODESET")]
    limit: Option<String>,
    /// Exit once every host has been converged at the same time for this many seconds.
    /// Without it, run until ^C.
    #[arg(long, value_name = "SECONDS")]
    converged_timeout: Option<u64>,
    /// Check and report what would change; change nothing.
    #[arg(long)]
    noop: bool,
    /// Show what each resource changes (with --noop: would change) as a unified diff, made on
    /// its host: file content, and a line each for mode, owner and group. Each diff is capped
    /// at 200 lines and 8 KiB (a last line counts what was left out); binary content is never
    /// shown, only its size. Lines print as `host | line` (docs/events.md, `diff`).
    #[arg(long)]
    diff: bool,
    /// The host name to run as (publishes under it; `{{hostname}}` in graphs). Default: this
    /// machine's host name.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Do not watch graph files for edits (by default an edit is applied on its host live).
    #[arg(long)]
    no_watch: bool,
    /// What goes to stdout. auto: on a terminal, a live view (an overall bar, a line per
    /// working or failing host, converged hosts folded into one nodeset, host output above
    /// it); elsewhere, as text. text: plain timestamped lines, one per event, no bars. json:
    /// one JSON object per event and a final summary object, nothing else (schema in
    /// docs/events.md). Messages from arbor itself go to stderr in every format.
    #[arg(long, value_name = "FORMAT", default_value = "auto", value_parser = ["auto", "text", "json"])]
    output: String,
    /// Keep the embedded store in memory in a fresh temporary state dir, not in
    /// ~/.local/state/arbor.
    #[arg(long)]
    tmp_prefix: bool,
    /// Bound each host's cache (~/.cache/arbor: builds and artifacts) to SIZE (512M, 2G, or
    /// N% of the filesystem holding it; 0 keeps only what runs are using). Each staged host,
    /// at every depth, evicts the least recently used entries past it when its arbor starts,
    /// never one a run on the host is using (docs/remote.md, "The cache's size").
    #[arg(long, value_name = "SIZE", default_value = crate::node::cache::DEFAULT_MAX_SIZE,
          value_parser = parse_cache_max_size)]
    cache_max_size: String,
    /// Use an existing etcd cluster (comma-separated http://host:port URLs) instead of the
    /// embedded store. If the etcd has authentication enabled, give --seeds-user: arbor then
    /// makes an etcd user and role per host for the run, limited to that host's own keys, and
    /// deletes them at the end. With authentication off, hosts are not isolated in the store
    /// (docs/security.md).
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    seeds: Vec<String>,
    /// The etcd user arbor acts as at the --seeds etcd; it needs the root role (it adds and
    /// deletes the run's users and roles). Its password is read from --seeds-password-file,
    /// else from the environment variable ARBOR_SEEDS_PASSWORD, else (with
    /// --allow-interactive) asked on the terminal; never from the command line.
    #[arg(long, value_name = "NAME", requires = "seeds")]
    seeds_user: Option<String>,
    /// A file holding the --seeds-user's password (one line; keep it mode 0600).
    #[arg(long, value_name = "PATH", requires = "seeds_user")]
    seeds_password_file: Option<PathBuf>,
    /// Start no store here (with --seeds, or on a remote host whose store is tunnelled).
    #[arg(long)]
    no_server: bool,
    #[command(flatten)]
    ssh: SshArgs,
    /// (internal) This node's depth in the tree; >0 means a parent staged it.
    #[arg(long, default_value_t = 0, hide = true)]
    depth: usize,
    /// (internal) This node's working dir on its host.
    #[arg(long, value_name = "DIR", hide = true)]
    workdir: Option<PathBuf>,
}

/// What the user asked for, as plain data.
#[derive(Debug)]
pub enum Command {
    Version,
    Store(crate::store::StoreCommand),
    Run(Box<RunOptions>),
    Exec(Box<ExecOptions>),
    /// `arbor topology check [-F SSH_CONFIG] FILE`.
    TopologyCheck {
        file: PathBuf,
        ssh_config: Option<PathBuf>,
    },
    /// `arbor completions SHELL`: the script, on stdout.
    Completions(clap_complete::Shell),
    /// `arbor receive` (internal): a compressed copy from a parent.
    Receive(crate::node::transfer::Receive),
    /// `arbor seed-serve` (internal): sibling seeding's serving side.
    SeedServe(crate::node::sibling::Serve),
    /// `arbor seed-fetch` (internal): sibling seeding's fetching side.
    SeedFetch(crate::node::sibling::Fetch),
    /// `arbor reattach` (internal): a parent's new stream to a running node.
    Reattach {
        dir: PathBuf,
    },
}

/// arbor's whole command line as clap sees it: for completions and the man pages
/// (`cargo run --bin arbor-man`).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Args::command()
}

/// Writes the completion script for `shell` to stdout.
pub fn print_completions(shell: clap_complete::Shell) {
    let mut cmd = command();
    clap_complete::generate(shell, &mut cmd, "arbor", &mut std::io::stdout());
}

/// One invocation of arbor: the job and how chatty the log should be (0 = info).
#[derive(Debug)]
pub struct Invocation {
    pub verbosity: u8,
    /// `-q`: warnings and errors only.
    pub quiet: bool,
    /// `--log-file`: everything, with timestamps.
    pub log_file: Option<PathBuf>,
    /// Colours on stderr, from `--color` and NO_COLOR.
    pub color: bool,
    pub command: Command,
}

/// Whether the global flag `id` was on the command line (before or after the subcommand).
fn given_on_command_line(matches: &clap::ArgMatches, id: &str) -> bool {
    let mut level = Some(matches);
    while let Some(m) = level {
        if m.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            return true;
        }
        level = m.subcommand().map(|(_, sub)| sub);
    }
    false
}

/// Whether arbor's log on stderr is coloured: `--color WHEN`, where auto means stderr is a
/// terminal and NO_COLOR (https://no-color.org) is unset or empty.
fn colour(when: &str) -> bool {
    use std::io::IsTerminal;
    match when {
        "always" => true,
        "never" => false,
        _ => {
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        }
    }
}

/// Parses the process arguments, with the defaults config files and `ARBOR_*` variables set
/// (`defaults`). On `--help`, `--version` or a usage error, clap has already printed what it
/// has to say and the returned exit code ends the process (2 for bad usage, or for a bad
/// config file or variable).
pub fn parse() -> Result<Invocation, ExitCode> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // A node staged by a parent takes its settings from the link only.
    let staged = Args::try_parse_from(&argv).is_ok_and(|a| {
        matches!(&a.command, Some(Sub::Run(run)) if run.depth > 0)
            || matches!(
                &a.command,
                Some(
                    Sub::Receive { .. }
                        | Sub::SeedServe { .. }
                        | Sub::SeedFetch { .. }
                        | Sub::Reattach { .. }
                )
            )
    });
    let cmd = if staged {
        command()
    } else {
        match defaults::apply(command(), &defaults::Sources::of_process()) {
            Ok(cmd) => cmd,
            Err(e) => {
                eprintln!("arbor: {e}");
                return Err(ExitCode::from(crate::exit::BAD_INPUT));
            }
        }
    };
    let usage = |e: clap::Error| {
        let code = if e.use_stderr() {
            crate::exit::BAD_INPUT
        } else {
            crate::exit::OK
        };
        let _ = e.print();
        ExitCode::from(code)
    };
    let matches = cmd.try_get_matches_from(argv).map_err(usage)?;
    let mut args = Args::from_arg_matches(&matches).map_err(usage)?;
    // -v on the command line beats `quiet` from a config file or the environment.
    if args.verbose > 0 && !given_on_command_line(&matches, "quiet") {
        args.quiet = false;
    }
    let command = match args.command {
        Some(Sub::Version) => Command::Version,
        Some(Sub::Store {
            action: Some(StoreSub::Restore { file, data_dir }),
            ..
        }) => Command::Store(crate::store::StoreCommand::Restore {
            snapshot: file,
            data_dir,
        }),
        Some(Sub::Store {
            action: None,
            listen,
            data_dir,
            allow_non_loopback,
            quota_backend_bytes,
        }) => Command::Store(crate::store::StoreCommand::Serve {
            config: crate::store::StoreConfig {
                // clap requires --listen without a subcommand.
                listen: listen.unwrap_or_default(),
                data_dir,
                allow_non_loopback,
            },
            quota_bytes: match quota_backend_bytes {
                0 => Some(crate::store::DEFAULT_QUOTA_BYTES),
                q if q < 0 => None,
                q => Some(q as u64),
            },
        }),
        Some(Sub::Topology(TopologySub::Check { file, ssh_config })) => {
            Command::TopologyCheck { file, ssh_config }
        }
        Some(Sub::Completions { shell }) => Command::Completions(shell),
        Some(Sub::Reattach { dir }) => Command::Reattach { dir },
        Some(Sub::Receive {
            dest,
            sha256,
            size,
            mode,
            patch_from,
        }) => {
            let Ok(mode) = u32::from_str_radix(&mode, 8) else {
                eprintln!("arbor: receive: --mode {mode:?}: expected an octal mode");
                return Err(ExitCode::from(crate::exit::BAD_INPUT));
            };
            Command::Receive(crate::node::transfer::Receive {
                dest,
                sha256,
                size,
                mode,
                patch_from,
                plain: false,
            })
        }
        Some(Sub::SeedServe {
            file,
            sha256,
            size,
            expire,
            bind,
            plain,
        }) => Command::SeedServe(crate::node::sibling::Serve {
            file,
            sha256,
            size,
            expire,
            bind,
            plain,
        }),
        Some(Sub::SeedFetch {
            from,
            dest,
            sha256,
            size,
            connect_timeout,
        }) => Command::SeedFetch(crate::node::sibling::Fetch {
            from,
            dest,
            sha256,
            size,
            connect_timeout,
        }),
        Some(Sub::Exec(exec)) => {
            let exec = *exec;
            let mut run = RunOptions {
                verbosity: args.verbose,
                quiet: args.quiet,
                log_file: args.log_file.clone(),
                ..RunOptions::default()
            };
            exec.ssh.apply(&mut run)?;
            Command::Exec(Box::new(ExecOptions {
                nodesets: exec.nodesets,
                exclude: exec.exclude,
                topology: exec.topology,
                gather: exec.gather,
                command: exec.command,
                user: exec.user,
                port: exec.port,
                run,
            }))
        }
        Some(Sub::Run(run)) => {
            if run.file.is_none()
                && run.remotes.is_empty()
                && run.topology.is_none()
                && run.depth == 0
            {
                eprintln!(
                    "arbor: run needs something to run: --file GRAPH, --remote GRAPH and/or \
                     --topology FILE (see arbor run --help)"
                );
                return Err(ExitCode::from(crate::exit::BAD_INPUT));
            }
            let mut run = *run;
            // Only a config file or ARBOR_* variable can get these here without --seeds (the
            // command line requires it), and they mean nothing without it.
            if run.seeds.is_empty() {
                run.seeds_user = None;
                run.seeds_password_file = None;
            }
            let mut options = RunOptions {
                file: run.file,
                remotes: run.remotes,
                topology: run.topology,
                limit: run.limit,
                converged_timeout: run.converged_timeout.map(Duration::from_secs),
                noop: run.noop,
                diff: run.diff,
                hostname: run.hostname,
                live_edits: !run.no_watch,
                json: run.output == "json",
                plain: run.output == "text",
                tmp_prefix: run.tmp_prefix,
                cache_max_size: run.cache_max_size,
                seeds: run.seeds,
                seeds_user: run.seeds_user,
                seeds_password_file: run.seeds_password_file,
                no_server: run.no_server,
                verbosity: args.verbose,
                quiet: args.quiet,
                log_file: args.log_file.clone(),
                depth: run.depth,
                workdir: run.workdir,
                ..RunOptions::default()
            };
            run.ssh.apply(&mut options)?;
            Command::Run(Box::new(options))
        }
        None => {
            use clap::CommandFactory;
            let _ = Args::command().print_help();
            return Err(ExitCode::from(crate::exit::BAD_INPUT));
        }
    };
    Ok(Invocation {
        verbosity: args.verbose,
        quiet: args.quiet,
        color: colour(&args.color),
        log_file: args.log_file,
        command,
    })
}
