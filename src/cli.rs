//! The command line, and nothing else: clap definitions turned into plain config values.
//!
//! The rest of arbor sees only [`Command`] and the config structs it carries, never clap,
//! so every job can be driven from tests without building argument vectors.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// arbor bootstraps and manages fleets of machines over SSH, with nothing installed on them
/// first. It copies itself to each host, tunnels the host back to a coordination store on the
/// initiator, and runs a graph of resources there. Hosts behind jump hosts are reached through
/// relays: a host with children re-launches itself as a relay and stages its own children.
#[derive(Parser, Debug)]
#[command(name = "arbor", version, about, long_about, propagate_version = true)]
struct Args {
    /// More log output: -v for debug, -vv for trace (ARBOR_LOG overrides).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Print arbor's version.
    Version,
    /// Run the coordination store alone: an etcd v3 API server (etcdctl works against it).
    Store {
        /// Where to listen: host:port or unix:PATH. Loopback only, unless --allow-non-loopback.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Persist the store here (every acknowledged write survives a crash); in memory if unset.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
        /// Listen on a non-loopback address. The store has no authentication.
        #[arg(long)]
        allow_non_loopback: bool,
    },
    /// Run a graph of resources and keep it converged.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The graph file (mgmt YAML) to run on this host.
    // Required until --remote/--topology offer other sources of graphs.
    #[arg(long, value_name = "GRAPH", required = true)]
    file: Option<PathBuf>,
    /// Exit once converged for this many seconds (0 if converged, 1 if resources failed).
    #[arg(long, value_name = "SECONDS")]
    converged_timeout: Option<u64>,
    /// Check and report what would change; change nothing.
    #[arg(long)]
    noop: bool,
    /// The host name to run as (publishes under it; `{{hostname}}` in graphs). Default: this
    /// machine's host name.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Do not watch the graph file for edits.
    #[arg(long)]
    no_watch: bool,
}

/// What the user asked for, as plain data.
#[derive(Debug)]
pub enum Command {
    Version,
    Store(crate::store::StoreConfig),
    Run(RunConfig),
}

/// `arbor run`, as plain data. More sources of graphs (--remote, --topology) and of the
/// store (--seeds) join here as fields.
#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    /// Graph to run locally.
    pub file: Option<PathBuf>,
    /// Exit after being converged this long.
    pub converged_timeout: Option<Duration>,
    pub noop: bool,
    /// `None`: this machine's host name.
    pub hostname: Option<String>,
    /// Re-read and apply the graph file when it changes.
    pub watch: bool,
}

/// One invocation of arbor: the job and how chatty the log should be (0 = info).
#[derive(Debug)]
pub struct Invocation {
    pub verbosity: u8,
    pub command: Command,
}

/// Parses the process arguments. On `--help`, `--version` or a usage error, clap has already
/// printed what it has to say and the returned exit code ends the process (2 for bad usage).
pub fn parse() -> Result<Invocation, ExitCode> {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return Err(ExitCode::from(code));
        }
    };
    let command = match args.command {
        Some(Sub::Version) => Command::Version,
        Some(Sub::Store {
            listen,
            data_dir,
            allow_non_loopback,
        }) => Command::Store(crate::store::StoreConfig {
            listen,
            data_dir,
            allow_non_loopback,
        }),
        Some(Sub::Run(run)) => Command::Run(RunConfig {
            file: run.file,
            converged_timeout: run.converged_timeout.map(Duration::from_secs),
            noop: run.noop,
            hostname: run.hostname,
            watch: !run.no_watch,
        }),
        None => {
            use clap::CommandFactory;
            let _ = Args::command().print_help();
            return Err(ExitCode::from(2));
        }
    };
    Ok(Invocation {
        verbosity: args.verbose,
        command,
    })
}
