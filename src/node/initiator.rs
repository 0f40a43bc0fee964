//! The node at depth 0. Its parent link is the operator's terminal and its store is the one it
//! embeds (or an etcd cluster given with --seeds). Otherwise it is a node like any other: it
//! may run a graph of its own (--file) and it stages its children (--remote, --topology)
//! with the shared fleet code, configured by the [`NodeConfig`] it builds here and sends down.
//!
//! A run: read every input ([`Plan`]; bad input exits 2 before anything is contacted), open
//! the store, start the local engine and the fleet, follow graph files for live edits, then
//! listen (events, converged flags, finished children, edits, signals) until the
//! [`RunBook`] says the run is done or a signal stops it; tear everything down, print the
//! summary. Exit codes are in [`crate::exit`]: 0 converged, 1 some host failed, 2 bad input,
//! 128 + the signal when stopped by SIGINT (130), SIGTERM (143) or SIGHUP (129). A second
//! signal during teardown exits at once, naming the hosts that may still hold state.

use super::artifacts::Sources;
use super::builds::{Build, Builds, local_platform};
use super::config::RunOptions;
use super::fleet::{self, Fleet, FleetContext};
use super::last_failed::{LastFailed, expand_limit};
use super::run_book::{Next, RunBook};
use super::seeds;
use super::{StopSignals, signal_name};
use crate::engine::artifacts::ArtifactIndex;
use crate::engine::exchange::{Exchange, KV_PREFIX, Keys, kv_host_prefix, new_run_id};
use crate::engine::fs_events::FsEvents;
use crate::engine::graph::{self, Graph};
use crate::engine::reload::{GraphFile, follow_graph_file};
use crate::engine::runner::{Engine, EngineConfig};
use crate::engine::store_exchange::{StoreExchange, converged_flags};
use crate::exit;
use crate::ssh::agent_front::{AgentBackend, Destinations, HostKey};
use crate::ssh::known_hosts::KnownHosts;
use crate::ssh::{self, Target, TerminalPrompter};
use crate::store::auth::{Access, Users};
use crate::store::client::{Endpoints, StoreClient};
use crate::store::{Store, StoreConfig};
use crate::topology::resolve::{Given, Overrides, Resolver};
use crate::ui::{HostReport, Ui};
use crate::wire::{ChildMode, ChildSpec, Event, EventKind, HostPath, HostState, NodeConfig};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A --remote graph, read and checked before anything is contacted.
struct RemoteGraph {
    path: PathBuf,
    /// The graph's name in the run: its file name, made unique.
    key: String,
    text: String,
    spec: ChildSpec,
}

/// Reads every --remote graph: each must parse and name its host with `remote:`; a repeated
/// file is ignored; two graphs naming one host is an error.
fn read_remotes(options: &RunOptions, resolver: &mut Resolver) -> Result<Vec<RemoteGraph>, String> {
    let default_user = ssh::local_user();
    let mut seen_files = BTreeSet::new();
    let mut hosts: HashMap<String, PathBuf> = HashMap::new();
    let mut remotes = Vec::new();
    for path in &options.remotes {
        let canonical =
            std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !seen_files.insert(canonical.clone()) {
            tracing::warn!("{}: given twice; running it once", path.display());
            continue;
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Parse once with a placeholder name to find `remote:`, then for the host itself.
        let probe = graph::parse(&text, path, "remote").map_err(|e| e.to_string())?;
        let Some(url) = probe.remote else {
            return Err(format!(
                "{}: no `remote: ssh://[user@]host[:port]` line, so no host to run it on \
                 (use --file to run a graph here)",
                path.display()
            ));
        };
        let parsed = Target::parse_url(&url, &default_user)
            .map_err(|e| format!("{}: remote: {e}", path.display()))?;
        let target = parsed.target;
        // The host as written is its name in the run; ssh_config says where and how to reach
        // it, the URL's own user and port winning.
        let name = target.host.clone();
        let mut spec = ChildSpec {
            name: name.clone(),
            host: target.host.clone(),
            graph: None,
            mode: ChildMode::Relay,
            password: parsed.password,
            ..Default::default()
        };
        let given = Given {
            user: parsed.user_given.then(|| target.user.clone()),
            port: parsed.port_given.then_some(target.port),
        };
        resolver
            .apply(&mut spec, &given)
            .map_err(|e| format!("{}: remote: {e}", path.display()))?;
        let address = Target::new(spec.user.clone(), spec.host.clone(), spec.port).address();
        if let Some(other) = hosts.insert(address.clone(), path.clone()) {
            return Err(format!(
                "{} and {} both name host {address}; one graph per host",
                other.display(),
                path.display()
            ));
        }
        graph::parse(&text, path, &name).map_err(|e| e.to_string())?;
        let key = format!(
            "{}#{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("graph.yaml"),
            remotes.len()
        );
        spec.graph = Some(key.clone());
        remotes.push(RemoteGraph {
            path: path.clone(),
            key,
            text,
            spec,
        });
    }
    Ok(remotes)
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The store this run uses, and how children's tunnels reach it.
struct RunStore {
    client: StoreClient,
    connector: Arc<dyn ssh::Connector>,
    shutdown: CancellationToken,
    served: Option<tokio::task::JoinHandle<()>>,
    /// A --tmp-prefix state dir, removed at the end.
    temp_dir: Option<tempfile::TempDir>,
    socket: Option<PathBuf>,
    /// The etcd users and roles made for the hosts (--seeds with authentication on).
    run_users: Option<seeds::RunUsers>,
    /// The embedded store's users: holding a reconnecting host's leases goes through them.
    users: Option<Arc<Users>>,
}

/// The name the initiator's own store client authenticates as (no host name can be it).
const INITIATOR_USER: &str = "@initiator";

/// What host `host` may do in the store: read every export of the run and every host's `kv`
/// keys; write its own exports, its own converged flag and its own `kv` keys. (And use its own
/// leases, which the store tracks itself.) A relay (`children` not empty) may also write the
/// exports and converged flags of every host below it: its store front writes them on the
/// relay's shared lease (store/front_leases.rs). That gives it nothing it did not have: it
/// already holds their credentials to start them.
pub(crate) fn host_access(keys: &Keys, host: &str, children: &[ChildSpec]) -> Access {
    fn below(keys: &Keys, specs: &[ChildSpec], write: &mut Vec<Vec<u8>>, own: &mut Vec<Vec<u8>>) {
        for c in specs {
            write.push(keys.host_exports(&c.name).into_bytes());
            own.push(keys.converged(&c.name).into_bytes());
            below(keys, &c.children, write, own);
        }
    }
    let mut write = vec![
        keys.host_exports(host).into_bytes(),
        kv_host_prefix(host).into_bytes(),
    ];
    let mut own = vec![keys.converged(host).into_bytes()];
    below(keys, children, &mut write, &mut own);
    Access::Keys {
        read: vec![
            keys.exports().as_bytes().to_vec(),
            KV_PREFIX.as_bytes().to_vec(),
        ],
        write,
        own,
    }
}

/// Every host's store credential and what it may do ([`host_access`]): read every export of
/// the run and every host's `kv` keys, write its own exports, its own converged flag and its
/// own `kv` keys, use its own leases. Sets each spec's `credential`
/// (sent down to the relays above it, never on a command line) and, where the user is not
/// named after the host (`user_name`), its `store_user`. The embedded store and an etcd with
/// authentication on both enforce exactly these.
fn host_users(
    children: &mut [ChildSpec],
    run: &str,
    user_name: &dyn Fn(&str) -> Option<String>,
) -> Vec<seeds::HostUser> {
    fn walk(
        specs: &mut [ChildSpec],
        keys: &Keys,
        user_name: &dyn Fn(&str) -> Option<String>,
        out: &mut Vec<seeds::HostUser>,
    ) {
        for c in specs {
            let password = secret();
            let store_user = user_name(&c.name);
            out.push(seeds::HostUser {
                name: store_user.clone().unwrap_or_else(|| c.name.clone()),
                password: password.clone(),
                access: host_access(keys, &c.name, &c.children),
            });
            c.credential = Some(password);
            c.store_user = store_user;
            walk(&mut c.children, keys, user_name, out);
        }
    }
    let mut out = Vec::new();
    walk(children, &Keys::for_run(run), user_name, &mut out);
    out
}

/// A random password.
fn secret() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The embedded store's users: every host's ([`host_users`], named after the host), and the
/// initiator's own admin credential.
fn mint_credentials(children: &mut [ChildSpec], run: &str) -> (Users, String) {
    let mut users = Users::new();
    for host in host_users(children, run, &|_| None) {
        users.add(&host.name, &host.password, host.access);
    }
    let admin = secret();
    users.add(INITIATOR_USER, &admin, Access::Admin);
    (users, admin)
}

/// The etcd given with --seeds. With authentication on, the initiator acts as --seeds-user and
/// gives each host an etcd user and role of its own for this run; with it off, hosts connect
/// as nobody and may do anything (said once, as a warning).
async fn open_seeds(
    options: &RunOptions,
    operator: Option<(String, String)>,
    children: &mut [ChildSpec],
    run: &str,
) -> Result<RunStore, String> {
    let endpoints = super::seed_endpoints(&options.seeds).map_err(|e| format!("--seeds: {e}"))?;
    let connected = seeds::connect(
        &endpoints,
        operator.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
    )
    .await?;
    let run_users = if connected.auth {
        let operator = operator.as_ref().map_or("", |(u, _)| u.as_str());
        let hosts = host_users(children, run, &|host| Some(seeds::user_name(run, host)));
        Some(seeds::RunUsers::create(&connected.client, operator, hosts).await?)
    } else {
        tracing::warn!(
            "--seeds: the etcd has authentication off: hosts are not isolated in the store \
             (any host can read and write every key, so forge other hosts' exports and \
             converged flags); see docs/security.md"
        );
        None
    };
    let connector = match super::store_connector(&connected.client, &endpoints) {
        Ok(c) => c,
        Err(e) => {
            if let Some(users) = &run_users {
                users.remove_within(USERS_TEARDOWN).await;
            }
            return Err(format!("--seeds: {e}"));
        }
    };
    Ok(RunStore {
        client: connected.client,
        connector,
        shutdown: CancellationToken::new(),
        served: None,
        temp_dir: None,
        socket: None,
        run_users,
        users: None,
    })
}

/// How long the teardown may take to delete a run's etcd users and roles.
const USERS_TEARDOWN: Duration = Duration::from_secs(30);
/// The same, when a second signal asked to exit at once.
const USERS_TEARDOWN_HURRIED: Duration = Duration::from_secs(3);

/// The embedded store, checking the hosts' credentials in `users`.
async fn open_store(options: &RunOptions, users: (Users, String)) -> Result<RunStore, String> {
    if options.no_server {
        return Err("--no-server needs --seeds: there is no store to use".into());
    }
    // The store listens on a Unix socket in a private dir: only this user can reach it.
    let (state_dir, temp, data_dir) = if options.tmp_prefix {
        // tempfile makes it 0700 with an unpredictable name.
        let t = tempfile::Builder::new()
            .prefix("arbor-run.")
            .tempdir()
            .map_err(|e| format!("creating a temporary state dir: {e}"))?;
        (t.path().to_path_buf(), Some(t), None)
    } else {
        let dir = super::state_dir();
        create_private_dir(&dir)?;
        (dir.clone(), None, Some(dir.join("store")))
    };
    let socket = state_dir.join(format!("store-{}.sock", std::process::id()));
    let (users, admin) = (Some(Arc::new(users.0)), Some(users.1));
    let held = users.clone();
    let store = Store::bind_with(
        &StoreConfig {
            listen: format!("unix:{}", socket.display()),
            data_dir: data_dir.clone(),
            allow_non_loopback: false,
        },
        crate::store::Options {
            data_dir,
            users,
            ..crate::store::Options::default()
        },
    )
    .await
    .map_err(|e| {
        let hint = if format!("{e:#}").contains("in use") {
            "; another arbor run is using this state dir: wait for it, or use --tmp-prefix"
        } else {
            ""
        };
        format!("starting the store in {}: {e:#}{hint}", state_dir.display())
    })?;
    let endpoint = store.endpoint().to_string();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let served = tokio::spawn(async move {
        if let Err(e) = store.serve(token).await {
            tracing::error!("store: {e:#}");
        }
    });
    let endpoints = Endpoints::parse(&endpoint).map_err(|e| format!("{e:#}"))?;
    let client = StoreClient::connect_as(
        &endpoints,
        admin.as_deref().map(|password| (INITIATOR_USER, password)),
    )
    .await
    .map_err(|e| format!("{e:#}"))?;
    tracing::debug!("store at {endpoint}");
    Ok(RunStore {
        client,
        connector: ssh::forward::to_unix(socket.clone()),
        shutdown,
        served: Some(served),
        temp_dir: temp,
        socket: Some(socket),
        run_users: None,
        users: held,
    })
}

impl RunStore {
    /// Stops the embedded store and removes its socket and temporary state dir, or deletes
    /// the run's users and roles from the etcd.
    async fn close(self) {
        if let Some(users) = &self.run_users {
            users.remove_within(USERS_TEARDOWN).await;
        }
        self.shutdown.cancel();
        if let Some(served) = self.served {
            let _ = tokio::time::timeout(Duration::from_secs(2), served).await;
        }
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }

    /// On the way out in a hurry: the socket and a temporary state dir go, and the run's etcd
    /// users and roles if that is quick; nothing else waits.
    async fn abandon(self) {
        if let Some(users) = &self.run_users {
            users.remove_within(USERS_TEARDOWN_HURRIED).await;
        }
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
        drop(self.temp_dir);
    }
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Everything a run needs from its inputs, read and checked before anything is contacted.
struct Plan {
    /// The hosts this run is for (`--limit`'s, or all), whose results go into the failed list.
    ran: BTreeSet<String>,
    last_failed: LastFailed,
    /// This host's name in the run.
    hostname: String,
    local_graph: Option<Graph>,
    /// The initiator's children (--remote hosts, then the topology's), with their subtrees.
    children: Vec<ChildSpec>,
    /// Graph files by key: path and text.
    graphs: BTreeMap<String, (PathBuf, String)>,
    /// The settings every node gets.
    config: NodeConfig,
    builds: Builds,
    /// The `source:` files of every graph, hashed once each.
    sources: Sources,
    /// Those of this host's own graph (--file).
    local_artifacts: ArtifactIndex,
    local_trees: crate::engine::artifacts::TreeIndex,
}

impl Plan {
    /// `Ok(None)`: `--limit @failed` and nothing failed last time, so nothing to do.
    fn read(options: &RunOptions) -> Result<Option<Plan>, String> {
        let hostname = options.hostname.clone().unwrap_or_else(system_hostname);
        let mut local_graph = match &options.file {
            Some(path) => Some(graph::load(path, &hostname).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut resolver = Resolver::for_operator(
            options.ssh_config.as_deref(),
            &super::home_dir(),
            Overrides {
                host_key_policy: options.host_key_policy_given,
                connect_timeout: options.connect_timeout_given,
            },
        )?;
        let remotes = read_remotes(options, &mut resolver)?;
        let topology = match &options.topology {
            Some(path) => {
                Some(crate::topology::load(path, &mut resolver).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let mut children: Vec<ChildSpec> = remotes.iter().map(|r| r.spec.clone()).collect();
        let mut graphs: BTreeMap<String, (PathBuf, String)> = remotes
            .into_iter()
            .map(|r| (r.key, (r.path, r.text)))
            .collect();
        let mut cconns = options.cconns;
        if let Some(t) = topology {
            children.extend(t.hosts);
            graphs.extend(t.graphs);
            cconns = t.cconns.unwrap_or(cconns);
        }
        unique_names(
            &children,
            options.file.is_some().then_some(hostname.as_str()),
        )?;
        let last_failed = LastFailed::for_inputs(
            &super::state_dir(),
            "run",
            options.topology.as_deref(),
            &options.remotes,
            options.file.as_deref(),
        );
        let local = local_graph.is_some().then_some(hostname.as_str());
        let ran = match &options.limit {
            None => all_names(&children, local),
            Some(value) => {
                let Some(ran) = limit_names(value, &children, local, &last_failed)? else {
                    return Ok(None);
                };
                children = limited(&children, &ran);
                if !ran.contains(&hostname) {
                    local_graph = None;
                }
                let used: BTreeSet<String> = graph_keys_used(&children);
                graphs.retain(|key, _| used.contains(key));
                ran
            }
        };
        super::escalate::apply_operator_choices(&mut children, options)?;
        // Sources are read and hashed before anything is contacted: a bad one is bad input.
        let mut sources = Sources::default();
        resolve_artifacts(&mut children, &graphs, &mut sources)?;
        let (local_artifacts, local_trees) = match (&local_graph, &options.file) {
            (Some(g), Some(path)) => {
                let own = sources
                    .resolve_sources(g, path)
                    .map_err(|e| e.to_string())?;
                (
                    sources.local_index(&own.artifacts),
                    sources.local_trees(&own.trees),
                )
            }
            _ => Default::default(),
        };
        let builds = builds(options)?;
        let config = options.node_config(cconns, builds.refs(), &new_run_id());
        Ok(Some(Plan {
            ran,
            last_failed,
            hostname,
            local_graph,
            children,
            graphs,
            config,
            builds,
            sources,
            local_artifacts,
            local_trees,
        }))
    }

    /// Which hosts run each graph: who an edit goes to, and whose name it is checked with.
    fn graph_users(&self) -> BTreeMap<String, Vec<String>> {
        let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut stack: Vec<&ChildSpec> = self.children.iter().collect();
        while let Some(c) = stack.pop() {
            if let Some(g) = &c.graph {
                users.entry(g.clone()).or_default().push(c.name.clone());
            }
            stack.extend(&c.children);
        }
        users
    }
}

/// Gives every host of `children` the artifacts its own graph names (`ChildSpec::artifacts`),
/// reading and hashing the sources (once each) into `sources`.
fn resolve_artifacts(
    children: &mut [ChildSpec],
    graphs: &BTreeMap<String, (PathBuf, String)>,
    sources: &mut Sources,
) -> Result<(), String> {
    for c in children {
        if let Some((path, text)) = c.graph.as_ref().and_then(|key| graphs.get(key))
            // Most graphs name no source: no second parse for them.
            && text.contains("source")
        {
            let g = graph::parse(text, path, &c.name).map_err(|e| e.to_string())?;
            let resolved = sources
                .resolve_sources(&g, path)
                .map_err(|e| e.to_string())?;
            c.artifacts = resolved.artifacts;
            c.trees = resolved.trees;
        }
        resolve_artifacts(&mut c.children, graphs, sources)?;
    }
    Ok(())
}

pub(super) fn builds(options: &RunOptions) -> Result<Builds, String> {
    let mut all = vec![Build::current().map_err(|e| format!("reading arbor's own binary: {e}"))?];
    for (arch, path) in &options.binaries {
        let platform = if arch.contains(' ') || arch.contains('-') {
            arch.clone()
        } else {
            format!("Linux {arch}")
        };
        all.push(Build::from_file(path, &platform).map_err(|e| format!("--binary {arch}: {e}"))?);
    }
    if options.compress != crate::wire::Compress::Never {
        // The gzip stream made for a build is kept beside the copy of it in this machine's
        // cache: the next run of the same build compresses nothing.
        all = all
            .into_iter()
            .map(|b| {
                let kept = (!options.no_caching).then(|| {
                    super::builds::local_bin_cache()
                        .join(&b.sha256)
                        .join(super::builds::KEPT_GZ)
                });
                b.with_gzip(kept, true)
            })
            .collect();
        if !options.no_caching {
            // For the next build's delta upgrades.
            all.iter().for_each(super::builds::keep_locally);
        }
    }
    tracing::debug!("this arbor is for {}", local_platform());
    Ok(Builds::new(all))
}

/// The initiator's own cache (`~/.cache/arbor`): the builds it keeps for delta upgrades,
/// with their gzip streams, and a copy of each artifact it sent, to patch against next time.
/// Leased for the run, like a node's, and bounded by `--cache-max-size` at the run's end,
/// once this run's copies are kept: what it sent and ran with stays, older versions go
/// first (docs/remote.md, "The cache's size").
struct LocalCache {
    root: PathBuf,
    needed: BTreeSet<String>,
    max: super::cache::MaxSize,
    _lease: Option<super::cache::Lease>,
}

impl LocalCache {
    fn take(options: &RunOptions, plan: &Plan) -> Option<LocalCache> {
        use super::cache;
        if options.no_caching {
            return None;
        }
        let max = cache::MaxSize::parse(&plan.config.cache_max_size).ok()?;
        let root = cache::root();
        let mut needed: BTreeSet<String> =
            plan.builds.refs().into_iter().map(|b| b.sha256).collect();
        needed.extend(
            plan.children
                .iter()
                .flat_map(super::artifacts::subtree_artifacts)
                .map(|a| a.sha256),
        );
        Some(LocalCache {
            _lease: cache::lease(&root, &needed),
            root,
            needed,
            max,
        })
    }

    async fn bound(self) {
        let _ = tokio::task::spawn_blocking(move || {
            if super::cache::owned(&self.root) {
                super::cache::evict_logged(&self.root, &self.needed, self.max);
            }
        })
        .await;
    }
}

/// The initiator's fleet: the run's settings, plus what only the initiator has (the
/// operator's key files, known_hosts, prompter and agent).
fn fleet_context(
    options: &RunOptions,
    plan: &Plan,
    store: &RunStore,
    events: mpsc::Sender<Event>,
) -> FleetContext {
    let (connect, known_hosts) = initiator_connect(options, &plan.config, &plan.children);
    FleetContext {
        path: HostPath::root(),
        config: plan.config.clone(),
        agent: None,
        builds: plan.builds.clone(),
        artifacts: Arc::new({
            let mut served = plan.sources.served();
            // Keep what is sent in this machine's own cache, to send patches against next
            // time (`--compress never` and `--no-caching` keep nothing).
            if options.compress != crate::wire::Compress::Never && !options.no_caching {
                served.keep_in(super::artifacts::node_dir(false, None));
            }
            served
        }),
        siblings: Default::default(),
        store: Some(store.connector.clone()),
        graphs: Mutex::new(
            plan.graphs
                .iter()
                .map(|(k, (_, text))| (k.clone(), text.clone()))
                .collect(),
        ),
        known_hosts,
        connect,
        events,
        exec: None,
        quic: Default::default(),
    }
}

/// How the initiator connects: the run's settings plus the operator's key files, known_hosts
/// files, ssh_config and prompter; and the text of the known_hosts files for `children`'s tree,
/// for relays.
pub(super) fn initiator_connect(
    options: &RunOptions,
    config: &NodeConfig,
    children: &[ChildSpec],
) -> (ssh::ConnectOptions, String) {
    let mut connect = fleet::connect_options(config);
    connect
        .host_keys
        .known_hosts
        .extend(options.known_hosts.iter().cloned());
    connect.auth.identities = options.identities.clone();
    // HashKnownHosts comes from the same ssh_config the hosts were resolved with.
    if let Some(file) = &options.ssh_config {
        connect.host_keys.ssh_config = if file.as_path() == Path::new("none") {
            Vec::new()
        } else {
            vec![file.clone()]
        };
    }
    if options.allow_interactive {
        connect.auth.prompter = Some(Arc::new(TerminalPrompter::default()));
    }
    let known_hosts = known_hosts_files(&connect.host_keys.known_hosts, children)
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect::<Vec<_>>()
        .join("\n");
    (connect, known_hosts)
}

/// `files` and every known_hosts file ssh_config names for a host of the tree: what the lines
/// sent down to relays, and the keys their agent front accepts, come from.
fn known_hosts_files(files: &[PathBuf], children: &[ChildSpec]) -> Vec<PathBuf> {
    let mut out = files.to_vec();
    let mut stack: Vec<&ChildSpec> = children.iter().collect();
    while let Some(c) = stack.pop() {
        stack.extend(&c.children);
        for h in c.with_jumps() {
            for f in h
                .user_known_hosts
                .iter()
                .chain(&h.global_known_hosts)
                .flatten()
            {
                if !out.contains(f) {
                    out.push(f.clone());
                }
            }
        }
    }
    out
}

/// Whether any host (or ProxyJump hop) of the tree is checked under accept-new: the run's
/// policy `accept_new`, or its own from ssh_config.
pub(crate) fn any_accept_new(children: &[ChildSpec], accept_new: bool) -> bool {
    children.iter().any(|c| {
        c.with_jumps().any(|h| h.accept_new.unwrap_or(accept_new))
            || any_accept_new(&c.children, accept_new)
    })
}

/// Relays sign for their children with our keys: through our ssh-agent if there is one,
/// else through an agent in this process holding the key files we loaded. Either way each
/// relay reaches it only through a front that signs user authentication to the hosts of that
/// relay's own subtree, bound to their host keys and sessions (`ssh::agent_front`).
pub(super) async fn choose_agent(
    ctx: &FleetContext,
    children: &[ChildSpec],
) -> Option<fleet::AgentFor> {
    if !children.iter().any(has_grandchildren) {
        return None;
    }
    // The in-process agent also holds the IdentityFiles ssh_config names for hosts that
    // relays log into.
    let mut auth = ctx.connect.auth.clone();
    let mut stack: Vec<&ChildSpec> = children.iter().collect();
    while let Some(c) = stack.pop() {
        stack.extend(&c.children);
        for h in c.with_jumps() {
            for f in &h.identity_files {
                let f = PathBuf::from(f);
                if !auth.identities.contains(&f) {
                    auth.identities.push(f);
                }
            }
        }
    }
    let backend = match ssh::agent_socket() {
        Some(socket) => AgentBackend::Socket(socket),
        None => match ssh::agent::from_key_files(&auth).await {
            Ok((backend, keys)) => {
                tracing::debug!("in-process agent with {keys} keys for the relays");
                backend
            }
            Err(e) => {
                eprintln!("arbor: {e}");
                return None;
            }
        },
    };
    let known = Arc::new(
        KnownHosts::load(&known_hosts_files(
            &ctx.connect.host_keys.known_hosts,
            children,
        ))
        .unwrap_or_else(|e| {
            tracing::warn!("known_hosts: {e}");
            KnownHosts::default()
        }),
    );
    let accept_new = ctx.config.accept_new;
    Some(Arc::new(move |spec: &ChildSpec| {
        let allowed = destinations(&known, &spec.children, accept_new);
        ssh::agent_front::constrained(backend.clone(), allowed, spec.name.clone())
    }))
}

/// The host keys a relay whose children are `children` may bind agent sessions to: the keys
/// known_hosts and the topology's pinned keys give for the hosts of its subtree, and host
/// certificates that known_hosts' `@cert-authority` lines accept for one of those hosts (by
/// name and principal, as the relay's own check does). Under accept-new, where some of those
/// hosts have no known key yet, also any key that known_hosts holds for no host at all: at
/// first contact the relay is trusted to say which key such a host has (docs/security.md),
/// but never to claim a key arbor knows as another host's.
fn destinations(known: &Arc<KnownHosts>, children: &[ChildSpec], accept_new: bool) -> Destinations {
    let mut keys: Vec<russh::keys::PublicKey> = Vec::new();
    // (known_hosts name, principal) of every host of the subtree.
    let mut hosts: Vec<(String, String)> = Vec::new();
    let mut some_unknown = false;
    let mut stack: Vec<&ChildSpec> = children.iter().collect();
    while let Some(c) = stack.pop() {
        stack.extend(&c.children);
        // Jump hosts and ProxyJump hops included: the relay logs into them too.
        for h in c.with_jumps() {
            let name = ssh::known_hosts::host_key_name(&h.host, h.port);
            let mut found = known.keys_for(&name);
            if let Some(pinned) = h
                .host_key
                .as_deref()
                .and_then(|k| russh::keys::PublicKey::from_openssh(k).ok())
            {
                found.push(pinned);
            }
            some_unknown |= found.is_empty()
                && !known.has_authority_for(&name)
                && h.accept_new.unwrap_or(accept_new);
            keys.extend(found);
            hosts.push((name, h.host.clone()));
        }
    }
    let first_contact = some_unknown;
    let known = known.clone();
    Arc::new(move |shown: &HostKey| {
        let key_data = match shown {
            HostKey::Plain(k) => k.key_data(),
            HostKey::Certificate(cert) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let certified = hosts.iter().any(|(name, principal)| {
                    matches!(
                        known.verify_certificate(name, principal, cert, now),
                        ssh::known_hosts::CertVerdict::Trusted(_)
                    )
                });
                if certified {
                    return true;
                }
                // As a relay does when no authority vouches: judge the certified key itself.
                cert.public_key()
            }
        };
        keys.iter().any(|k| k.key_data() == key_data)
            || (first_contact
                && !known.knows_key(&russh::keys::PublicKey::new(key_data.clone(), "")))
    })
}

/// Follows every graph file for edits: the local one feeds the local engine; each edit of a
/// graph that hosts run is checked with each host's name and, if valid for all of them,
/// comes out of the returned channel as (key, text) for the fleet to send down. Saves in
/// place and by rename are both seen. An invalid edit is reported (file:line:col) and the
/// hosts keep their running graph.
fn follow_graphs(
    options: &RunOptions,
    plan: &Plan,
    engine: Option<&Engine>,
    stop: &CancellationToken,
) -> mpsc::UnboundedReceiver<(String, String)> {
    let (tx, rx) = mpsc::unbounded_channel();
    if !options.live_edits {
        return rx;
    }
    if let (Some(engine), Some(path), Some(graph)) = (engine, &options.file, &plan.local_graph) {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        match GraphFile::follow(&engine.fs_events(), &path, text) {
            Ok(file) => {
                tokio::spawn(follow_graph_file(
                    file,
                    plan.hostname.clone(),
                    graph.clone(),
                    engine.graph_sender(),
                    stop.clone(),
                ));
            }
            Err(e) => tracing::warn!("{}: cannot follow for edits: {e}", path.display()),
        }
    }
    if plan.graphs.is_empty() {
        return rx;
    }
    let fs = match FsEvents::new() {
        Ok(fs) => fs,
        Err(e) => {
            tracing::warn!("cannot follow graph files for edits: {e}");
            return rx;
        }
    };
    let users = plan.graph_users();
    let artifacts: Arc<HashMap<String, std::collections::BTreeSet<String>>> = Arc::new(
        fleet::subtree_specs(&plan.children)
            .map(|c| {
                let known = c.artifacts.keys().chain(c.trees.keys()).cloned().collect();
                (c.name.clone(), known)
            })
            .collect(),
    );
    for (key, (path, text)) in &plan.graphs {
        let mut file = match GraphFile::follow(&fs, path, text.clone()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("{}: cannot follow for edits: {e}", path.display());
                continue;
            }
        };
        let (key, hosts, tx, stop) = (
            key.clone(),
            users.get(key).cloned().unwrap_or_default(),
            tx.clone(),
            stop.clone(),
        );
        let fs = fs.clone();
        let artifacts = artifacts.clone();
        tokio::spawn(async move {
            let _fs = fs; // the inotify instance lives as long as a follower does
            loop {
                let text = tokio::select! {
                    _ = stop.cancelled() => return,
                    text = file.next_version() => text,
                };
                let invalid =
                    hosts
                        .iter()
                        .find_map(|h| match graph::parse(&text, file.path(), h) {
                            Err(e) => Some(e.to_string()),
                            Ok(g) => {
                                super::artifacts::new_source(&g, file.path(), h, artifacts.get(h))
                            }
                        });
                match invalid {
                    Some(e) => tracing::error!("{e} (hosts keep their running graph)"),
                    None => {
                        if tx.send((key.clone(), text)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    rx
}

/// How the listening part of a run ended.
enum Outcome {
    /// The run book said so, with this exit code.
    Done(u8),
    /// A signal stopped it.
    Stopped(i32),
}

/// What the initiator shows and counts as events arrive.
struct View {
    ui: Ui,
    book: RunBook,
    /// accept-new: where host keys learned by relays are recorded.
    learn_into: Option<PathBuf>,
    /// The ssh_config files whose HashKnownHosts says how to record them.
    ssh_config: Vec<PathBuf>,
    /// Which known_hosts names each relay may report keys for: the hosts it connects to.
    learnable: HashMap<HostPath, HashSet<String>>,
    hostname: String,
    local_reported: Option<HostState>,
    /// Hosts below the relays (depth 2 and more), for their rows in the summary: the
    /// initiator's own children report themselves when their task ends.
    deep: BTreeMap<HostPath, DeepRow>,
    /// The embedded store's users, to hold the leases of a host whose link is reconnecting
    /// (and of its subtree) until it is back or fails; none with --seeds.
    leases: Option<Arc<Users>>,
    /// The hosts whose leases are held now.
    holding: super::lease_holds::Holding,
}

/// What the initiator heard of a host below a relay.
#[derive(Default)]
struct DeepRow {
    first: Option<Instant>,
    last: Option<Instant>,
    bytes: u64,
    /// The transfers counted in `bytes`: each once, however many "done" events it has.
    counted: std::collections::BTreeSet<String>,
    cached: Option<bool>,
    cause: Option<String>,
    /// What its relay's link to it runs on, as the relay says.
    transport: Option<(String, Option<String>)>,
}

impl DeepRow {
    fn heard(&mut self, kind: &EventKind, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
        match kind {
            EventKind::State(HostState::Failed { cause }) => {
                self.cause.get_or_insert_with(|| cause.clone());
            }
            EventKind::Transfer { cached: true, .. } => self.cached = Some(true),
            EventKind::Link { transport, note } => {
                self.transport = Some((transport.clone(), note.clone()));
            }
            EventKind::Transfer {
                what, sent, total, ..
            } if sent == total => {
                if self.counted.insert(what.clone()) {
                    self.bytes += total;
                }
                self.cached.get_or_insert(false);
            }
            _ => {}
        }
    }
}

/// Every host at depth 2 and more in `children`'s subtrees, by path.
/// Every host of the run by path (`r1/l1-2`), with whether it only relays (runs no graph),
/// and this host when it runs a graph of its own: what the live view counts.
fn view_hosts(children: &[ChildSpec], local: Option<&str>) -> Vec<(String, bool)> {
    let mut hosts: Vec<(String, bool)> = local
        .map(|l| (l.to_string(), false))
        .into_iter()
        .chain(
            super::tree_paths(children)
                .into_iter()
                .map(|(path, c)| (path.to_string(), c.graph.is_none())),
        )
        .collect();
    hosts.sort();
    hosts
}

fn deep_rows(children: &[ChildSpec]) -> BTreeMap<HostPath, DeepRow> {
    super::tree_paths(children)
        .into_iter()
        .filter(|(path, _)| path.depth() > 1)
        .map(|(path, _)| (path, DeepRow::default()))
        .collect()
}

impl View {
    /// Summary rows for the hosts below the relays, named by path (`r1/l1-2`).
    fn deep_reports(&self) -> Vec<HostReport> {
        self.deep
            .iter()
            .map(|(path, row)| {
                let failed = self.book.has_failed(path.name());
                let cause = match (&row.cause, row.first) {
                    (Some(c), _) => Some(c.clone()),
                    (None, None) if failed => Some("not reached: a host above it failed".into()),
                    (None, _) if failed => Some("its relay failed".into()),
                    (None, _) => None,
                };
                HostReport {
                    name: path.to_string(),
                    ok: !failed && row.cause.is_none(),
                    cause,
                    elapsed: match (row.first, row.last) {
                        (Some(a), Some(b)) => b.duration_since(a),
                        _ => Duration::ZERO,
                    },
                    bytes: row.bytes,
                    cached: row.cached,
                    store_over_tcp: false,
                    transport: row.transport.clone(),
                }
            })
            .collect()
    }

    fn event(&mut self, event: &Event) {
        if let Some(row) = self.deep.get_mut(&event.host) {
            row.heard(&event.kind, Instant::now());
        }
        if !learned_key(
            event,
            self.learn_into.as_deref(),
            &self.ssh_config,
            &self.learnable,
        ) {
            return;
        }
        if let EventKind::State(state) = &event.kind {
            self.book.state(event.host.name(), state);
            self.hold_leases(event.host.name(), state);
        }
        self.ui.event(event);
    }

    /// While a host's link is down (reconnecting), its subtree's keepalives cannot reach the
    /// store: their leases are held there (node/lease_holds.rs).
    fn hold_leases(&mut self, host: &str, state: &HostState) {
        let Some(users) = &self.leases else { return };
        let subtree = self.book.subtree(host);
        self.holding
            .state(host, state, &subtree, users.as_ref(), "store");
    }

    /// The local engine's new status.
    fn local_status(&mut self, status: &crate::engine::Status) {
        let state = super::relay::settled_state(status, self.local_reported.as_ref());
        if let Some(state) = &state
            && Some(state) != self.local_reported.as_ref()
        {
            self.event(&Event {
                host: HostPath::root().child(&self.hostname),
                kind: EventKind::State(state.clone()),
            });
            self.local_reported = Some(state.clone());
        }
    }
}

/// Runs the initiator; returns the exit code.
pub async fn run(options: RunOptions) -> u8 {
    let started = Instant::now();
    let plan = match Plan::read(&options) {
        Ok(Some(plan)) => plan,
        Ok(None) => {
            eprintln!("arbor: no host failed in the last run of these inputs; nothing to do");
            return exit::OK;
        }
        Err(e) => {
            eprintln!("arbor: {e}");
            return exit::BAD_INPUT;
        }
    };
    // The operator's etcd password is read (or asked) before anything is contacted.
    let operator = match seeds::operator(&options) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("arbor: {e}");
            return exit::BAD_INPUT;
        }
    };
    let mut signals = match StopSignals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("arbor: cannot handle signals: {e}");
            return exit::FAILED;
        }
    };
    // The embedded store checks every host's credential, and so does an etcd given with
    // --seeds that has authentication on (docs/security.md).
    let mut plan = plan;
    let run = plan.config.run.clone();
    let opened = if options.seeds.is_empty() {
        let users = mint_credentials(&mut plan.children, &run);
        open_store(&options, users).await
    } else {
        open_seeds(&options, operator, &mut plan.children, &run).await
    };
    let store = match opened {
        Ok(s) => s,
        Err(e) if !options.seeds.is_empty() => {
            eprintln!("arbor: {e}");
            return exit::FAILED;
        }
        Err(e) => {
            eprintln!("arbor: store: {e}");
            return exit::FAILED;
        }
    };
    let keys = Keys::for_run(&plan.config.run);
    let exchange: Arc<dyn Exchange> =
        Arc::new(StoreExchange::new(store.client.clone(), keys.clone()));
    let hostname = plan.hostname.clone();
    let mut engine = match &plan.local_graph {
        Some(g) => {
            let mut c = EngineConfig::new(hostname.clone());
            c.noop = options.noop;
            c.artifacts = plan.local_artifacts.clone();
            c.trees = plan.local_trees.clone();
            c.diff = options.diff;
            match Engine::start(g.clone(), c, exchange.clone()) {
                Ok(e) => Some(e),
                Err(e) => {
                    eprintln!("arbor: {hostname}: cannot start the engine: {e:#}");
                    store.close().await;
                    return exit::FAILED;
                }
            }
        }
        None => None,
    };

    let ui = match Ui::for_run(
        options.json,
        options.plain,
        options.quiet,
        options.log_file.as_deref(),
    ) {
        Ok(ui) => ui,
        Err(e) => {
            eprintln!("arbor: --log-file: {e}");
            store.close().await;
            return exit::BAD_INPUT;
        }
    };
    let local_cache = LocalCache::take(&options, &plan);
    let (events_tx, mut events) = mpsc::channel(super::child_link::CHILD_QUEUE * 4);
    let mut ctx = fleet_context(&options, &plan, &store, events_tx);
    ctx.agent = choose_agent(&ctx, &plan.children).await;
    let learn_into = any_accept_new(&plan.children, options.accept_new)
        .then(|| ctx.connect.host_keys.learn_into.clone())
        .flatten();
    let ssh_config = ctx.connect.host_keys.ssh_config.clone();
    let mut fleet = Fleet::start(Arc::new(ctx), plan.children.clone());
    let stop_following = CancellationToken::new();
    let mut edits = follow_graphs(&options, &plan, engine.as_ref(), &stop_following);

    let mut view = View {
        ui,
        book: RunBook::new(
            &plan.children,
            engine.is_some().then_some(hostname.as_str()),
            options.converged_timeout,
        ),
        learn_into,
        learnable: learnable_names(&plan.children, options.accept_new),
        ssh_config,
        hostname: hostname.clone(),
        local_reported: None,
        deep: deep_rows(&plan.children),
        leases: store.users.clone(),
        holding: Default::default(),
    };
    view.ui.hosts(&view_hosts(
        &plan.children,
        engine.is_some().then_some(hostname.as_str()),
    ));
    let mut local_status = engine.as_ref().map(|e| e.status());
    let mut local_diffs = engine.as_mut().and_then(Engine::take_diffs);
    let mut flags = converged_flags(&store.client, &keys);
    let mut reports: Vec<HostReport> = Vec::new();
    let mut fleet_done = fleet.is_empty();

    let outcome = loop {
        let deadline = match view.book.next(tokio::time::Instant::now()) {
            Next::Done(code) => break Outcome::Done(code),
            Next::Wait(deadline) => deadline,
        };
        tokio::select! {
            signal = signals.next() => {
                crate::ui::live::suspended(|| {
                    eprintln!("arbor: {}; stopping every host", signal_name(signal))
                });
                break Outcome::Stopped(signal);
            }
            event = events.recv() => {
                if let Some(event) = event {
                    view.event(&event);
                }
            }
            flag = flags.next() => match flag {
                Some(Ok((host, value))) => view.book.converged_flag(&host, value),
                Some(Err(e)) => {
                    crate::ui::live::suspended(|| eprintln!("arbor: store: {e:#}"));
                    break Outcome::Done(exit::FAILED);
                }
                None => {}
            },
            report = fleet.next_finished(), if !fleet_done => match report {
                Some(r) => {
                    view.book.finished(&r.name, r.ok);
                    reports.push(r);
                }
                None => fleet_done = true,
            },
            diff = super::next_diff(&mut local_diffs) => {
                if let Some(diff) = diff {
                    view.event(&Event {
                        host: HostPath::root().child(&hostname),
                        kind: super::diff_event(diff),
                    });
                }
            }
            status = super::next_status(&mut local_status) => {
                if let Some(status) = status {
                    view.local_status(&status);
                }
            }
            edit = edits.recv() => {
                if let Some((key, text)) = edit {
                    let path = plan.graphs.get(&key).map(|(p, _)| p.display().to_string());
                    let sent = fleet.update_graph(&key, &text);
                    tracing::info!(
                        "{}: changed; sending it on ({sent} of this node's children run it)",
                        path.unwrap_or(key)
                    );
                }
            }
            _ = super::sleep_until(deadline) => {}
        }
    };
    // The live view ends as last drawn; what follows prints below it.
    view.ui.stopping();
    if let Outcome::Done(exit::OK) = outcome {
        let timeout = options.converged_timeout.unwrap_or_default().as_secs();
        let unhealthy = view.book.unhealthy();
        if unhealthy.is_empty() {
            eprintln!("arbor: every host converged for {timeout}s; finishing");
        } else {
            let names: Vec<&str> = unhealthy.keys().map(String::as_str).collect();
            eprintln!(
                "arbor: every host settled for {timeout}s, with failures on {}; finishing",
                names.join(", ")
            );
        }
    }

    // Teardown: children (bottom-up through the tree), then our own engine, then the store.
    // A second signal meanwhile ends the process at once.
    stop_following.cancel();
    let second_signal = {
        let drain = async {
            while let Some(event) = events.recv().await {
                view.event(&event);
            }
        };
        let teardown = async { tokio::join!(fleet.shutdown(), drain).0 };
        tokio::select! {
            rest = teardown => {
                reports.extend(rest);
                None
            }
            signal = signals.next() => Some(signal),
        }
    };
    if let Some(signal) = second_signal {
        let left = view.book.may_hold_state();
        eprintln!(
            "arbor: {} during teardown; exiting now without waiting for the hosts",
            signal_name(signal)
        );
        if !left.is_empty() {
            eprintln!(
                "arbor: these hosts may still hold a working dir or a running arbor (each \
                 removes its own once its link closes): {}",
                left.join(", ")
            );
        }
        store.abandon().await;
        let code = match outcome {
            Outcome::Stopped(first) => exit::for_signal(first),
            Outcome::Done(_) => exit::for_signal(signal),
        };
        std::process::exit(code.into());
    }
    let local_ok = match engine {
        Some(engine) => {
            let status = engine.status().borrow().clone();
            for (id, why) in &status.failures {
                eprintln!("arbor: {hostname}: {id}: {why}");
            }
            for why in status.collect_errors.values().chain(&status.export_error) {
                eprintln!("arbor: {hostname}: {why}");
            }
            engine.stop().await;
            Some(status.healthy())
        }
        None => None,
    };
    store.close().await;

    reports.extend(view.deep_reports());
    // A host whose arbor ended cleanly but whose resources settled with failures failed too:
    // the summary says so, as the exit code and the failed list do.
    for r in &mut reports {
        let name = HostPath::parse(&r.name).name().to_string();
        if let (true, Some(failures)) = (r.ok, view.book.unhealthy().get(&name)) {
            r.ok = false;
            r.cause = Some(format!("settled with failures: {}", failures.join("; ")));
        }
    }
    let any_failed = reports.iter().any(|r| !r.ok) || local_ok == Some(false);
    let code = match outcome {
        Outcome::Stopped(signal) => exit::for_signal(signal),
        Outcome::Done(_) if any_failed => exit::FAILED,
        Outcome::Done(code) => code,
    };
    view.ui.summary(
        &reports,
        local_ok.map(|ok| (hostname.as_str(), ok, started.elapsed())),
        code,
    );
    // The failed list, for `--limit @failed`: hosts that failed or settled with failures.
    let mut failed: BTreeSet<String> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(|r| HostPath::parse(&r.name).name().to_string())
        .chain(view.book.unhealthy().keys().cloned())
        .collect();
    if local_ok == Some(false) {
        failed.insert(hostname.clone());
    }
    if let Some(cache) = local_cache {
        cache.bound().await;
    }
    failed.retain(|h| plan.ran.contains(h));
    if let Err(e) = plan.last_failed.update(&plan.ran, &failed) {
        eprintln!("arbor: keeping the list of failed hosts: {e}");
    } else if !failed.is_empty() {
        eprintln!(
            "arbor: failed: {}; rerun them alone with --limit @failed",
            crate::topology::nodeset::fold(&failed.iter().collect::<Vec<_>>())
        );
    }
    code
}

/// Every host a run reaches (jump hosts too) and the local one.
fn all_names(children: &[ChildSpec], local: Option<&str>) -> BTreeSet<String> {
    fleet::subtree_specs(children)
        .map(|c| c.name.clone())
        .chain(local.map(str::to_string))
        .collect()
}

/// The hosts a `--limit` names, checked against the run's: a name given in the nodeset must
/// be one of them (a jump host runs nothing, so it cannot be); names from the failed list
/// that the run no longer has are dropped with a warning. `Ok(None)` when the limit is only
/// `@failed` and the list is empty.
fn limit_names(
    value: &str,
    children: &[ChildSpec],
    local: Option<&str>,
    last_failed: &LastFailed,
) -> Result<Option<BTreeSet<String>>, String> {
    let limit = expand_limit(value, || last_failed.read()).map_err(|e| format!("--limit {e}"))?;
    let mut modes: HashMap<&str, ChildMode> = fleet::subtree_specs(children)
        .map(|c| (c.name.as_str(), c.mode))
        .collect();
    if let Some(local) = local {
        modes.insert(local, ChildMode::Relay);
    }
    let mut out = BTreeSet::new();
    for name in &limit.named {
        match modes.get(name.as_str()) {
            None => {
                return Err(format!(
                    "--limit {value:?}: {name} is not a host of this run"
                ));
            }
            Some(ChildMode::Jump) => {
                return Err(format!(
                    "--limit {value:?}: {name} is a jump host (`mode: jump`): it runs nothing; \
                     name the hosts behind it"
                ));
            }
            Some(ChildMode::Relay) => {
                out.insert(name.clone());
            }
        }
    }
    for name in limit.failed.iter().flatten() {
        match modes.get(name.as_str()) {
            Some(ChildMode::Relay) => {
                out.insert(name.clone());
            }
            Some(ChildMode::Jump) => {}
            None => tracing::warn!(
                "--limit @failed: {name} failed last time but is no longer a host of this run"
            ),
        }
    }
    if out.is_empty() && limit.named.is_empty() {
        return Ok(None);
    }
    Ok(Some(out))
}

/// The run's tree cut down to the `limit`ed hosts and the relays (and jump hosts) on their
/// way: a relay that is not in the limit stages its children and runs no graph.
fn limited(specs: &[ChildSpec], limit: &BTreeSet<String>) -> Vec<ChildSpec> {
    specs
        .iter()
        .filter_map(|s| {
            let children = limited(&s.children, limit);
            let wanted = limit.contains(&s.name);
            (wanted || !children.is_empty()).then(|| ChildSpec {
                children,
                graph: if wanted { s.graph.clone() } else { None },
                ..s.clone()
            })
        })
        .collect()
}

/// The graph keys a tree uses.
fn graph_keys_used(children: &[ChildSpec]) -> BTreeSet<String> {
    fleet::subtree_specs(children)
        .filter_map(|c| c.graph.clone())
        .collect()
}

/// Names must be unique in the whole run (they key the store); the topology checks its own
/// tree, this checks --remote hosts, topology hosts and this host together.
fn unique_names(children: &[ChildSpec], local: Option<&str>) -> Result<(), String> {
    let mut seen: BTreeSet<String> = local.into_iter().map(str::to_string).collect();
    let mut stack: Vec<&ChildSpec> = children.iter().collect();
    while let Some(c) = stack.pop() {
        if !seen.insert(c.name.clone()) {
            return Err(format!(
                "host name {} appears twice in this run; names must be unique",
                c.name
            ));
        }
        stack.extend(c.children.iter());
    }
    Ok(())
}

/// For each relay (by path), the known_hosts names of the hosts it connects to: its children,
/// and the children it reaches through its jump hosts.
/// Only hosts (and ProxyJump hops) checked under accept-new count: `accept_new` is the run's
/// policy, a host's own (from ssh_config) wins.
pub(super) fn learnable_names(
    children: &[ChildSpec],
    accept_new: bool,
) -> HashMap<HostPath, HashSet<String>> {
    fn reached(
        at: &HostPath,
        specs: &[ChildSpec],
        accept_new: bool,
        names: &mut HashSet<String>,
        out: &mut HashMap<HostPath, HashSet<String>>,
    ) {
        for c in specs {
            for h in c.with_jumps() {
                if h.accept_new.unwrap_or(accept_new) {
                    names.insert(ssh::known_hosts::host_key_name(&h.host, h.port));
                }
            }
            let path = at.child(&c.name);
            match c.mode {
                // The node above a jump host connects to the jump host's children itself.
                ChildMode::Jump => reached(&path, &c.children, accept_new, names, out),
                ChildMode::Relay => {
                    let mut own = HashSet::new();
                    reached(&path, &c.children, accept_new, &mut own, out);
                    if !own.is_empty() {
                        out.insert(path, own);
                    }
                }
            }
        }
    }
    let mut out = HashMap::new();
    reached(
        &HostPath::root(),
        children,
        accept_new,
        &mut HashSet::new(),
        &mut out,
    );
    out
}

pub(super) fn has_grandchildren(spec: &ChildSpec) -> bool {
    match spec.mode {
        ChildMode::Jump => spec.children.iter().any(has_grandchildren),
        ChildMode::Relay => !spec.children.is_empty(),
    }
}

/// A relay's report of a host key it learned under accept-new (`event`, if it is one):
/// recorded in `learn_into` when it comes from the relay that connects to that host (by
/// `learnable`, from [`learnable_names`]), refused with a warning otherwise. Returns false
/// for a refused report, which is not shown.
pub(super) fn learned_key(
    event: &Event,
    learn_into: Option<&Path>,
    ssh_config: &[PathBuf],
    learnable: &HashMap<HostPath, HashSet<String>>,
) -> bool {
    let (EventKind::KnownHost { name, key }, Some(file)) = (&event.kind, learn_into) else {
        return true;
    };
    // Only the relay that connects to a host may report its key.
    if ssh::known_hosts::valid_reported_name(name)
        && learnable
            .get(&event.host)
            .is_some_and(|names| names.contains(name))
    {
        record_learned_key(file, ssh_config, name, key, &event.host);
        true
    } else {
        tracing::warn!(
            "{}: ignored its report of a host key for {:?}: not a host it connects to",
            event.host,
            crate::ui::printable(name)
        );
        false
    }
}

/// Records a host key a relay learned under accept-new in our known_hosts.
fn record_learned_key(
    file: &Path,
    ssh_config: &[PathBuf],
    name: &str,
    key: &str,
    via: &crate::wire::HostPath,
) {
    let Ok(parsed) = russh::keys::PublicKey::from_openssh(key) else {
        tracing::warn!("{via}: reported an unreadable host key for {name}");
        return;
    };
    let known =
        crate::ssh::known_hosts::KnownHosts::load(&[file.to_path_buf()]).unwrap_or_default();
    if matches!(
        known.verify(name, &parsed),
        crate::ssh::known_hosts::Verdict::Trusted(_)
    ) {
        return;
    }
    // The host as ssh_config's `Host` patterns see it: the name without `[…]:port`.
    let host = name
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
        .map_or(name, |(host, _)| host);
    let append = if crate::ssh::ssh_config::hash_known_hosts(ssh_config, host) {
        crate::ssh::known_hosts::append_hashed
    } else {
        crate::ssh::known_hosts::append
    };
    match append(file, name, &parsed) {
        Ok(()) => tracing::warn!(
            "{via}: learned the host key of {name} ({}); recorded in {}",
            crate::ssh::known_hosts::fingerprint(&parsed),
            file.display()
        ),
        Err(e) => tracing::error!(
            "recording the host key of {name} in {}: {e}",
            file.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_hosts_transfer_is_counted_once_however_often_it_says_done() {
        let mut row = DeepRow::default();
        let transfer = |what: &str, sent, total| EventKind::Transfer {
            what: what.into(),
            sent,
            total,
            cached: false,
        };
        let now = Instant::now();
        row.heard(&transfer("artifact 9c1e", 10, 21), now);
        row.heard(&transfer("artifact 9c1e", 21, 21), now);
        row.heard(&transfer("artifact 9c1e", 21, 21), now);
        row.heard(&transfer("arbor.gz", 5, 5), now);
        assert_eq!(row.bytes, 26);
        assert_eq!(row.cached, Some(false));
    }
}
