//! The node at depth 0. Its parent link is the operator's terminal and its store is the one it
//! embeds (or an etcd cluster given with --seeds). Otherwise it is a node like any other: it
//! may run a graph of its own (--file) and it stages its children (--remote) with the shared
//! fleet code.
//!
//! Exit codes: 0 every host converged (or ran until ^C without failing... see below), 1 some
//! host failed, 2 bad input (nothing was contacted), 130 interrupted by ^C.

use super::fleet::{ChildReport, Fleet, FleetContext};
use super::stage::{Build, Builds, StageOptions, local_platform};
use crate::cli::RunConfig;
use crate::engine::exchange::Exchange;
use crate::engine::graph;
use crate::engine::host::{Engine, EngineConfig};
use crate::engine::reload::watch_graph_file;
use crate::engine::store_exchange::{StoreExchange, watch_converged};
use crate::engine::watch::FsWatcher;
use crate::ssh::{self, ConnectOptions, HostKeyPolicy, Target, TerminalPrompter};
use crate::store::client::{Endpoints, StoreClient};
use crate::store::{Store, StoreConfig};
use crate::ui::Ui;
use crate::wire::{ChildMode, ChildSpec, EventKind, HostState};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;

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
fn read_remotes(config: &RunConfig) -> Result<Vec<RemoteGraph>, String> {
    let default_user = ssh::local_user();
    let mut seen_files = BTreeSet::new();
    let mut hosts: HashMap<String, PathBuf> = HashMap::new();
    let mut remotes = Vec::new();
    for path in &config.remotes {
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
        let address = target.address();
        if let Some(other) = hosts.insert(address.clone(), path.clone()) {
            return Err(format!(
                "{} and {} both name host {address}; one graph per host",
                other.display(),
                path.display()
            ));
        }
        let name = target.host.clone();
        graph::parse(&text, path, &name).map_err(|e| e.to_string())?;
        let key = format!(
            "{}#{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("graph.yaml"),
            remotes.len()
        );
        remotes.push(RemoteGraph {
            path: path.clone(),
            key: key.clone(),
            text,
            spec: ChildSpec {
                name,
                host: target.host.clone(),
                port: target.port,
                user: target.user.clone(),
                graph: Some(key),
                mode: ChildMode::Relay,
                host_key: None,
                identity: None,
                password: parsed.password,
                cconns: None,
                children: Vec::new(),
            },
        });
    }
    Ok(remotes)
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
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
    temp_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
}

async fn open_store(config: &RunConfig) -> Result<RunStore, String> {
    if !config.seeds.is_empty() {
        let endpoints =
            super::seed_endpoints(&config.seeds).map_err(|e| format!("--seeds: {e}"))?;
        let client = StoreClient::connect(&endpoints)
            .await
            .map_err(|e| format!("{e:#}"))?;
        let connector = super::store_connector(&endpoints)
            .await
            .map_err(|e| format!("--seeds: {e}"))?;
        return Ok(RunStore {
            client,
            connector,
            shutdown: CancellationToken::new(),
            served: None,
            temp_dir: None,
            socket: None,
        });
    }
    if config.no_server {
        return Err("--no-server needs --seeds: there is no store to use".into());
    }
    // The store listens on a Unix socket in a private dir: only this user can reach it.
    let (state_dir, temp, data_dir) = if config.tmp_prefix {
        let t = make_temp_dir().map_err(|e| format!("creating a temporary state dir: {e}"))?;
        (t.clone(), Some(t), None)
    } else {
        let dir = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".local/state"))
            .join("arbor");
        create_private_dir(&dir)?;
        (dir.clone(), None, Some(dir.join("store")))
    };
    let socket = state_dir.join(format!("store-{}.sock", std::process::id()));
    let store = Store::bind(&StoreConfig {
        listen: format!("unix:{}", socket.display()),
        data_dir,
        allow_non_loopback: false,
    })
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
    let client = StoreClient::connect(&Endpoints::parse(&endpoint).map_err(|e| format!("{e:#}"))?)
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
    })
}

/// A fresh private (0700) directory under $TMPDIR or /tmp.
fn make_temp_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let base = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let template = base.join("arbor-run.XXXXXXXXXX");
    let mut bytes = template.as_os_str().as_bytes().to_vec();
    bytes.push(0);
    // SAFETY: `bytes` is a NUL-terminated template that mkdtemp rewrites in place.
    let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    bytes.pop();
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&bytes)))
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

fn builds(config: &RunConfig) -> Result<Builds, String> {
    let mut all = vec![Build::current().map_err(|e| format!("reading arbor's own binary: {e}"))?];
    for (arch, path) in &config.binaries {
        let platform = if arch.contains(' ') || arch.contains('-') {
            arch.clone()
        } else {
            format!("Linux {arch}")
        };
        all.push(Build::from_file(path, &platform).map_err(|e| format!("--binary {arch}: {e}"))?);
    }
    if config.compress {
        all = all.into_iter().map(|b| b.with_gzip(false)).collect();
    }
    tracing::debug!("this arbor is for {}", local_platform());
    Ok(Builds::new(all))
}

fn connect_options(config: &RunConfig) -> ConnectOptions {
    let mut o = ConnectOptions::for_home(&home());
    o.connect_timeout = config.connect_timeout;
    o.host_keys
        .known_hosts
        .extend(config.known_hosts.iter().cloned());
    o.host_keys.policy = if config.accept_new {
        HostKeyPolicy::AcceptNew
    } else {
        HostKeyPolicy::Strict
    };
    o.auth.identities = config.identities.clone();
    if config.allow_interactive {
        o.auth.prompter = Some(Arc::new(TerminalPrompter::default()));
    }
    o
}

/// Runs the initiator; returns the exit code.
pub async fn run(config: RunConfig) -> u8 {
    let started = Instant::now();
    let hostname = config.hostname.clone().unwrap_or_else(system_hostname);

    // Bad input is found before anything is contacted.
    let local_graph = match &config.file {
        Some(path) => match graph::load(path, &hostname) {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("arbor: {e}");
                return EXIT_BAD_INPUT;
            }
        },
        None => None,
    };
    let remotes = match read_remotes(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arbor: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let topology = match &config.topology {
        Some(path) => match crate::topology::load(path) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("arbor: {e}");
                return EXIT_BAD_INPUT;
            }
        },
        None => None,
    };
    let mut children: Vec<ChildSpec> = remotes.iter().map(|r| r.spec.clone()).collect();
    let mut graphs: BTreeMap<String, String> = remotes
        .iter()
        .map(|r| (r.key.clone(), r.text.clone()))
        .collect();
    let mut cconns = config.cconns;
    if let Some(t) = &topology {
        children.extend(t.hosts.iter().cloned());
        graphs.extend(
            t.graphs
                .iter()
                .map(|(k, (_, text))| (k.clone(), text.clone())),
        );
        cconns = t.cconns.unwrap_or(cconns);
    }
    if let Err(e) = unique_names(
        &children,
        config.file.is_some().then_some(hostname.as_str()),
    ) {
        eprintln!("arbor: {e}");
        return EXIT_BAD_INPUT;
    }
    let builds = match builds(&config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("arbor: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let store = match open_store(&config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("arbor: store: {e}");
            return EXIT_FAILED;
        }
    };
    let exchange: Arc<dyn Exchange> = Arc::new(StoreExchange::new(store.client.clone()));

    // Who must be converged for the run to end: every host with a graph, at any depth, and
    // every host running arbor without one (done once it runs: there is nothing to apply).
    let mut expected: BTreeSet<String> = BTreeSet::new();
    let mut bare: BTreeSet<String> = BTreeSet::new();
    let mut subtrees: HashMap<String, Vec<String>> = HashMap::new();
    for c in &children {
        index_tree(c, &mut expected, &mut bare, &mut subtrees);
    }
    let engine = match local_graph {
        Some(g) => {
            expected.insert(hostname.clone());
            let mut c = EngineConfig::new(hostname.clone());
            c.noop = config.noop;
            match Engine::start(g, c, exchange.clone()) {
                Ok(e) => Some(e),
                Err(e) => {
                    eprintln!("arbor: {hostname}: cannot start the engine: {e:#}");
                    return EXIT_FAILED;
                }
            }
        }
        None => None,
    };
    let stop_watches = CancellationToken::new();
    if let (Some(engine), Some(path), true) = (&engine, &config.file, config.watch)
        && let Ok(g) = graph::load(path, &hostname)
    {
        {
            tokio::spawn(watch_graph_file(
                std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
                hostname.clone(),
                engine.fs_watcher(),
                g,
                engine.graph_sender(),
                stop_watches.clone(),
            ));
        }
    }

    let (events_tx, mut events) = mpsc::channel(4096);
    let connect = connect_options(&config);
    // Relays sign for their children with our keys: through our ssh-agent if there is one,
    // else through an agent in this process holding the key files we loaded.
    let has_relays = children.iter().any(has_grandchildren);
    let agent: Option<Arc<dyn ssh::Connector>> = match std::env::var_os("SSH_AUTH_SOCK") {
        Some(sock) => Some(ssh::forward::to_unix(sock.into())),
        None if has_relays => match ssh::agent::from_key_files(&connect.auth).await {
            Ok((agent, keys)) => {
                tracing::debug!("in-process agent with {keys} keys for the relays");
                Some(agent)
            }
            Err(e) => {
                eprintln!("arbor: {e}");
                None
            }
        },
        None => None,
    };
    let known_hosts = connect
        .host_keys
        .known_hosts
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect::<Vec<_>>()
        .join("\n");
    let learn_into = connect.host_keys.learn_into.clone();
    let ctx = Arc::new(FleetContext {
        path: crate::wire::HostPath::root(),
        connect,
        builds,
        stage: StageOptions {
            remote_tmp: config.remote_tmp.clone(),
            no_caching: config.no_caching,
            compress: config.compress,
        },
        store: store.connector.clone(),
        agent,
        graphs,
        known_hosts,
        accept_new: config.accept_new,
        cconns,
        converged_timeout: config.converged_timeout.map(|d| d.as_secs()),
        noop: config.noop,
        events: events_tx,
    });
    let mut fleet = Fleet::start(ctx, children);

    // Live edits of --remote graphs go to their hosts.
    let (edits_tx, mut edits) = mpsc::unbounded_channel::<(String, String)>();
    if config.watch {
        match FsWatcher::new() {
            Ok(fs) => {
                for r in &remotes {
                    let path = std::fs::canonicalize(&r.path).unwrap_or_else(|_| r.path.clone());
                    tokio::spawn(watch_remote_graph(
                        fs.clone(),
                        path,
                        r.key.clone(),
                        r.spec.name.clone(),
                        r.text.clone(),
                        edits_tx.clone(),
                        stop_watches.clone(),
                    ));
                }
            }
            Err(e) => tracing::warn!("cannot watch graph files for edits: {e}"),
        }
    }
    drop(edits_tx);

    let mut ui = Ui::new();
    let mut converged: BTreeMap<String, bool> = BTreeMap::new();
    // Hosts settled with failed resources: done, but the run exits 1.
    let mut unhealthy: BTreeSet<String> = BTreeSet::new();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    let mut local_status = engine.as_ref().map(|e| e.status());
    let mut local_reported: Option<HostState> = None;
    let mut flags = watch_converged(&store.client);
    let mut all_since: Option<tokio::time::Instant> = None;
    let mut reports: Vec<ChildReport> = Vec::new();
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let mut fleet_done = fleet.is_empty();
    let mut running: BTreeSet<String> = BTreeSet::new();

    let outcome = loop {
        let alive: Vec<&String> = expected.iter().filter(|h| !failed.contains(*h)).collect();
        let alive_bare: Vec<&String> = bare.iter().filter(|h| !failed.contains(*h)).collect();
        let all_converged = !(alive.is_empty() && alive_bare.is_empty())
            && alive
                .iter()
                .all(|h| converged.get(*h) == Some(&true) || unhealthy.contains(*h))
            && alive_bare.iter().all(|h| running.contains(*h));
        if all_converged {
            all_since.get_or_insert_with(tokio::time::Instant::now);
        } else {
            all_since = None;
        }
        if alive.is_empty() && alive_bare.is_empty() && !(expected.is_empty() && bare.is_empty()) {
            break EXIT_FAILED; // nothing left that could converge
        }
        let deadline = config
            .converged_timeout
            .zip(all_since)
            .map(|(timeout, since)| since + timeout);
        tokio::select! {
            _ = &mut interrupt => {
                eprintln!("arbor: interrupted; stopping every host");
                break EXIT_INTERRUPTED;
            }
            event = events.recv() => {
                let Some(event) = event else { continue };
                if let (EventKind::KnownHost { name, key }, true, Some(file)) =
                    (&event.kind, config.accept_new, &learn_into)
                {
                    record_learned_key(file, name, key, &event.host);
                }
                if let EventKind::State(state) = &event.kind {
                    let host = event.host.name().to_string();
                    match state {
                        HostState::Failed { .. } => {
                            // A failed relay takes its whole subtree with it.
                            if let Some(below) = subtrees.get(&host) {
                                failed.extend(below.iter().cloned());
                            }
                            failed.insert(host);
                        }
                        HostState::Unhealthy { .. } => {
                            unhealthy.insert(host);
                        }
                        HostState::Running => {
                            unhealthy.remove(&host);
                            running.insert(host);
                        }
                        _ => {
                            unhealthy.remove(&host);
                        }
                    }
                }
                ui.event(&event);
            }
            flag = flags.next() => match flag {
                Some(Ok((host, value))) => {
                    match value {
                        Some(v) => { converged.insert(host, v); }
                        None => { converged.remove(&host); }
                    }
                }
                Some(Err(e)) => {
                    eprintln!("arbor: store: {e:#}");
                    break EXIT_FAILED;
                }
                None => {}
            },
            report = fleet.next_finished(), if !fleet_done => match report {
                Some(r) => {
                    if !r.ok {
                        failed.insert(r.name.clone());
                    }
                    reports.push(r);
                }
                None => fleet_done = true,
            },
            status = super::next_status(&mut local_status) => {
                let Some(now) = status else { continue };
                let state = super::relay::settled_state(&now, local_reported.as_ref());
                if state.is_some() && state != local_reported {
                    match &state {
                        Some(HostState::Unhealthy { .. }) => unhealthy.insert(hostname.clone()),
                        _ => unhealthy.remove(&hostname),
                    };
                    if let Some(state) = &state {
                        ui.event(&crate::wire::Event {
                            host: crate::wire::HostPath::root().child(&hostname),
                            kind: EventKind::State(state.clone()),
                        });
                    }
                    local_reported = state;
                }
            }
            edit = edits.recv() => {
                if let Some((key, text)) = edit {
                    fleet.update_graph(&key, &text);
                }
            }
            _ = super::sleep_until(deadline) => {
                let timeout = config.converged_timeout.unwrap_or_default();
                if unhealthy.is_empty() {
                    eprintln!("arbor: every host converged for {}s; finishing", timeout.as_secs());
                } else {
                    eprintln!(
                        "arbor: every host settled for {}s, with failures on {}; finishing",
                        timeout.as_secs(),
                        unhealthy.iter().cloned().collect::<Vec<_>>().join(", ")
                    );
                }
                break EXIT_OK;
            }
        }
    };

    // Teardown: children (bottom-up through the tree), then our own engine, then the store.
    stop_watches.cancel();
    ui.stopping();
    let drain = async {
        while let Some(event) = events.recv().await {
            ui.event(&event);
        }
    };
    let (mut rest, ()) = tokio::join!(fleet.shutdown("the run is over"), drain);
    reports.append(&mut rest);
    let local = match engine {
        Some(engine) => {
            let status = engine.status().borrow().clone();
            for (id, why) in &status.failures {
                eprintln!("arbor: {hostname}: {id}: {why}");
            }
            engine.stop().await;
            Some(status.healthy())
        }
        None => None,
    };
    store.shutdown.cancel();
    if let Some(served) = store.served {
        let _ = tokio::time::timeout(Duration::from_secs(2), served).await;
    }
    if let Some(socket) = &store.socket {
        let _ = std::fs::remove_file(socket);
    }
    if let Some(dir) = &store.temp_dir {
        let _ = std::fs::remove_dir_all(dir);
    }

    ui.summary(
        &reports,
        local.map(|ok| (hostname.as_str(), ok, started.elapsed())),
    );
    let any_failed = reports.iter().any(|r| !r.ok)
        || local == Some(false)
        || !failed.is_empty()
        || !unhealthy.is_empty();
    match outcome {
        EXIT_INTERRUPTED => EXIT_INTERRUPTED,
        _ if any_failed => EXIT_FAILED,
        code => code,
    }
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

/// Collects the hosts that run a graph, those that run arbor without one (jump hosts run
/// nothing), and each node's descendants.
fn index_tree(
    spec: &ChildSpec,
    expected: &mut BTreeSet<String>,
    bare: &mut BTreeSet<String>,
    subtrees: &mut HashMap<String, Vec<String>>,
) -> Vec<String> {
    if spec.graph.is_some() {
        expected.insert(spec.name.clone());
    } else if spec.mode == ChildMode::Relay {
        bare.insert(spec.name.clone());
    }
    let mut below = Vec::new();
    for c in &spec.children {
        below.push(c.name.clone());
        below.extend(index_tree(c, expected, bare, subtrees));
    }
    subtrees.insert(spec.name.clone(), below.clone());
    below
}

fn has_grandchildren(spec: &ChildSpec) -> bool {
    match spec.mode {
        ChildMode::Jump => spec.children.iter().any(has_grandchildren),
        ChildMode::Relay => !spec.children.is_empty(),
    }
}

/// Records a host key a relay learned under accept-new in our known_hosts.
fn record_learned_key(file: &Path, name: &str, key: &str, via: &crate::wire::HostPath) {
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
    match crate::ssh::known_hosts::append(file, name, &parsed) {
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

/// Watches one --remote graph file; each valid new version goes to its host.
async fn watch_remote_graph(
    fs: FsWatcher,
    path: PathBuf,
    key: String,
    host: String,
    mut last: String,
    edits: mpsc::UnboundedSender<(String, String)>,
    cancel: CancellationToken,
) {
    let sub = match fs.subscribe(&path) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("{}: cannot watch for edits: {e}", path.display());
            return;
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sub.changed() => {}
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if text == last {
            continue;
        }
        match graph::parse(&text, &path, &host) {
            Ok(_) => {
                tracing::info!("{}: changed; sending it to {host}", path.display());
                last = text.clone();
                if edits.send((key.clone(), text)).is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!("{e} (the host keeps its running graph)"),
        }
    }
}
