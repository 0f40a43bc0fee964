//! Graph files (mgmt 0.0.x YAML): the model, parsing, and every check that can be made
//! before anything runs.
//!
//! Every error names `file:line:column`, so a user can jump to the mistake; the CLI exits 2
//! for them. Parsing is in two steps: serde-saphyr reads the file into raw structs that keep
//! source locations ([`Spanned`]) and reject unknown keys; [`validate`] then checks what the
//! YAML shape cannot say (names, paths, edges, cycles) and builds the plain [`Graph`].

use crate::engine::resources::accounts::valid_account_name;
use crate::engine::resources::exec::Aux;
use crate::engine::resources::hostname::valid_hostname;
use crate::engine::resources::meta::Rate;
use crate::engine::resources::{
    AccountState, ExecSpec, FileSpec, FileState, GroupSpec, HostnameSpec, Kind, KvSpec, Meta,
    NoopSpec, PkgSpec, PkgState, ResourceId, ResourceSpec, SkipCmpStyle, SvcSpec, SvcStartup,
    SvcState, TimerSpec, UserSpec,
};
use crate::engine::template::expand;
use serde::Deserialize;
use serde_saphyr::{MessageFormatter, Spanned};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};

/// Prefix of a resource name that exports it instead of applying it here.
pub const EXPORT_PREFIX: &str = "@@";

/// A validated graph for one host, `{{hostname}}` already expanded. The default is the empty
/// graph an engine starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graph {
    pub name: String,
    pub comment: Option<String>,
    /// Read only by the initiator with --remote.
    pub remote: Option<String>,
    /// Resources applied on this host, in file order.
    pub resources: Vec<ResourceSpec>,
    /// Resources published for others (and this host) to collect, `@@` stripped.
    pub exports: Vec<ResourceSpec>,
    pub collect: Vec<Collect>,
    pub edges: Vec<Edge>,
    /// Every file's and pkg's `source:` as written (after `{{hostname}}`), with where: the initiator
    /// reads them (relative to the graph file) and turns them into artifacts.
    pub sources: Vec<SourceAt>,
}

/// A file's `source:` and where it is in the graph file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceAt {
    pub source: String,
    pub line: u64,
    pub column: u64,
    /// An exported file's: the host publishes it as the export's content, so it must be text
    /// that fits an export (node::artifacts::Sources::resolve_sources checks).
    pub exported: bool,
}

/// Pull in every host's exports of a kind. What other hosts export is untrusted: a collected
/// file lands under `pattern` (required for files), loses setuid/setgid bits unless
/// `allow_setid`, and exec resources are collected only with `allow_commands`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Collect {
    pub kind: Kind,
    /// For file: the directory collected files are written to (pattern + basename).
    pub pattern: Option<PathBuf>,
    /// Keep setuid and setgid bits of collected files (`allow_setid: true`).
    pub allow_setid: bool,
    /// Run exec resources other hosts export (`allow_commands: true`).
    pub allow_commands: bool,
}

/// `from` is applied before `to`; with `notify`, a change in `from` refreshes `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    pub name: String,
    pub from: ResourceId,
    pub to: ResourceId,
    pub notify: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// Reads and validates the graph file at `path` for the host `hostname`.
pub fn load(path: &Path, hostname: &str) -> Result<Graph, GraphError> {
    let source = std::fs::read_to_string(path).map_err(|source| GraphError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&source, path, hostname)
}

/// Parses and validates graph text; `path` is only used in error messages.
pub fn parse(source: &str, path: &Path, hostname: &str) -> Result<Graph, GraphError> {
    let at = |line: u64, column: u64, message: String| GraphError::Invalid {
        path: path.to_path_buf(),
        line: line.max(1),
        column: column.max(1),
        message,
    };
    if source.trim().is_empty() || source.trim() == "---" {
        return Err(at(1, 1, "missing `graph`: the file is empty".into()));
    }
    let raw: Spanned<RawGraph> = serde_saphyr::from_str(source).map_err(|e| {
        let (line, column, message) = yaml_error(&e);
        at(line, column, message)
    })?;
    let root = (raw.referenced.line(), raw.referenced.column());
    validate(raw.value, root, hostname).map_err(|(line, column, message)| at(line, column, message))
}

type Located = (u64, u64, String);

/// Where a YAML error is (line, column) and what it says, on one line: for graph and
/// topology files alike.
pub(crate) fn yaml_error(e: &serde_saphyr::Error) -> Located {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    let message = serde_saphyr::UserMessageFormatter.format_message(e.without_snippet());
    (line, column, message.escape_debug().to_string())
}

fn loc<T>(s: &Spanned<T>) -> (u64, u64) {
    (s.referenced.line(), s.referenced.column())
}

fn fail<T>(s: &Spanned<T>, message: String) -> Located {
    let (l, c) = loc(s);
    (l, c, message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraph {
    graph: Option<Spanned<String>>,
    comment: Option<String>,
    remote: Option<String>,
    resources: Option<RawResources>,
    collect: Option<Vec<Spanned<RawCollect>>>,
    edges: Option<Vec<Spanned<RawEdge>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    file: Option<Vec<Spanned<RawFile>>>,
    exec: Option<Vec<Spanned<RawExec>>>,
    noop: Option<Vec<Spanned<RawNoop>>>,
    timer: Option<Vec<Spanned<RawTimer>>>,
    kv: Option<Vec<Spanned<RawKv>>>,
    user: Option<Vec<Spanned<RawUser>>>,
    group: Option<Vec<Spanned<RawGroup>>>,
    hostname: Option<Vec<Spanned<RawHostname>>>,
    pkg: Option<Vec<Spanned<RawPkg>>>,
    svc: Option<Vec<Spanned<RawSvc>>>,
}

/// A field mgmt knows and arbor refuses: kept only for where it is.
type Refused = Option<Spanned<serde::de::IgnoredAny>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: Spanned<String>,
    /// As in mgmt, the name when missing.
    path: Option<Spanned<String>>,
    dirname: Option<Spanned<String>>,
    basename: Option<Spanned<String>>,
    content: Option<Spanned<String>>,
    /// A file on the initiator whose bytes are the content (an artifact).
    source: Option<Spanned<String>>,
    state: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    force: Option<Spanned<bool>>,
    recurse: Option<Spanned<bool>>,
    purge: Option<Spanned<bool>>,
    symlink: Option<Spanned<bool>>,
    fragments: Refused,
    owner: Option<String>,
    group: Option<String>,
    selinux: Refused,
    meta: Option<Spanned<RawMeta>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    name: Spanned<String>,
    /// As in mgmt, the name when missing.
    cmd: Option<Spanned<String>>,
    args: Option<Spanned<Vec<String>>>,
    cwd: Option<Spanned<String>>,
    shell: Option<Spanned<String>>,
    env: Option<Spanned<BTreeMap<String, String>>>,
    user: Option<String>,
    group: Option<String>,
    timeout: Option<u64>,
    ifcmd: Option<String>,
    ifcwd: Option<Spanned<String>>,
    ifshell: Option<String>,
    nifcmd: Option<String>,
    nifcwd: Option<Spanned<String>>,
    nifshell: Option<String>,
    creates: Option<Spanned<String>>,
    donecmd: Option<String>,
    donecwd: Option<Spanned<String>>,
    doneshell: Option<String>,
    watchcmd: Option<String>,
    watchcwd: Option<Spanned<String>>,
    watchshell: Option<String>,
    watchfiles: Refused,
    mtimes: Refused,
    ifequals: Refused,
    ifequals_stdout: Refused,
    sig: Refused,
    send_output: Refused,
    send_stdout: Refused,
    send_stderr: Refused,
    meta: Option<Spanned<RawMeta>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNoop {
    name: Spanned<String>,
    /// mgmt's noop `comment`: text for the reader; it changes nothing.
    #[allow(dead_code)]
    comment: Option<String>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's timer (engine/resources/timer.go).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimer {
    name: Spanned<String>,
    /// Seconds; mgmt's default 0 would make its ticker panic, so it is required here.
    interval: Option<Spanned<u32>>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's kv (engine/resources/kv.go).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKv {
    name: Spanned<String>,
    /// As in mgmt, the name when missing.
    key: Option<Spanned<String>>,
    /// As in mgmt, none means the key is deleted.
    value: Option<String>,
    /// Every key is the host's own here, as mgmt's `mapped: true` keys are: accepted either way.
    #[allow(dead_code)]
    mapped: Option<bool>,
    skiplessthan: Option<bool>,
    skipcmpstyle: Option<Spanned<i64>>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's user (engine/resources/user.go): the name is the user's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: Spanned<String>,
    /// Required, as in mgmt: `exists` or `absent`.
    state: Option<Spanned<String>>,
    uid: Option<u32>,
    gid: Option<Spanned<u32>>,
    group: Option<Spanned<String>>,
    groups: Option<Spanned<Vec<String>>>,
    homedir: Option<Spanned<String>>,
    shell: Option<Spanned<String>>,
    allowduplicateuid: Option<bool>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's group (engine/resources/group.go): the name is the group's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Spanned<String>,
    state: Option<Spanned<String>>,
    gid: Option<u32>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's hostname (engine/resources/hostname.go).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHostname {
    name: Spanned<String>,
    /// The value of each name not given; the resource's name when missing or empty.
    hostname: Option<Spanned<String>>,
    pretty_hostname: Option<String>,
    static_hostname: Option<Spanned<String>>,
    transient_hostname: Option<Spanned<String>>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's pkg (engine/resources/pkg.go), through dpkg/apt.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPkg {
    name: Spanned<String>,
    /// mgmt's default: installed.
    state: Option<Spanned<String>>,
    allowdowngrade: Option<bool>,
    allowuntrusted: Option<bool>,
    allownonfree: Option<bool>,
    /// PackageKit's "supported" filter has no dpkg/apt equivalent: only `true` is accepted.
    allowunsupported: Option<Spanned<bool>>,
    /// arbor's: a .deb on the initiator (an artifact), installed with no network.
    source: Option<Spanned<String>>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's svc (engine/resources/svc.go), through systemctl.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSvc {
    name: Spanned<String>,
    state: Option<Spanned<String>>,
    startup: Option<Spanned<String>>,
    session: Option<Spanned<bool>>,
    meta: Option<Spanned<RawMeta>>,
}

/// mgmt's metaparams (engine/metaparams.go, and `autoedge`/`autogroup` of its 0.0.x format).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    autoedge: Option<bool>,
    autogroup: Option<Spanned<bool>>,
    noop: Option<bool>,
    retry: Option<Spanned<i16>>,
    retryreset: Option<bool>,
    delay: Option<u64>,
    timeout: Option<u64>,
    poll: Option<Spanned<i32>>,
    limit: Option<Spanned<f64>>,
    burst: Option<Spanned<u32>>,
    reset: Option<bool>,
    sema: Option<Vec<Spanned<String>>>,
    rewatch: Option<bool>,
    realize: Option<Spanned<bool>>,
    dollar: Option<bool>,
    hidden: Option<Spanned<bool>>,
    export: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollect {
    kind: Spanned<String>,
    pattern: Option<Spanned<String>>,
    allow_setid: Option<bool>,
    allow_commands: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    name: Spanned<String>,
    from: Spanned<RawVertex>,
    to: Spanned<RawVertex>,
    notify: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVertex {
    kind: Spanned<String>,
    name: Spanned<String>,
}

/// A declared resource before it is split into applied and exported.
struct Declared {
    spec: ResourceSpec,
    exported: bool,
    at: (u64, u64),
    /// `meta: {autoedge: false}` turns mgmt's automatic edges off for this resource.
    autoedge: bool,
}

/// mgmt's automatic edges that arbor makes: from a file resource writing a service's unit
/// file (`/etc/systemd/system/NAME.service` or `/usr/lib/systemd/system/NAME.service`, mgmt's
/// two) to that svc, unless either turns them off, an edge between the two is already
/// written, or it would close a cycle.
fn unit_file_edges(declared: &[Declared], edges: &mut Vec<Edge>) {
    for svc in declared.iter().filter(|d| d.autoedge && !d.exported) {
        let ResourceSpec::Svc(s) = &svc.spec else {
            continue;
        };
        let unit_files = [
            format!("/etc/systemd/system/{}.service", s.name),
            format!("/usr/lib/systemd/system/{}.service", s.name),
        ];
        for file in declared.iter().filter(|d| d.autoedge && !d.exported) {
            let ResourceSpec::File(f) = &file.spec else {
                continue;
            };
            if !unit_files.iter().any(|u| Path::new(u) == f.path) {
                continue;
            }
            let (from, to) = (file.spec.id(), svc.spec.id());
            if edges
                .iter()
                .any(|e| (e.from == from && e.to == to) || (e.from == to && e.to == from))
            {
                continue;
            }
            edges.push(Edge {
                name: format!("autoedge {from} -> {to}"),
                from,
                to,
                notify: false,
            });
            if find_cycle(edges).is_some() {
                edges.pop();
            }
        }
    }
}

fn validate(raw: RawGraph, root: (u64, u64), host: &str) -> Result<Graph, Located> {
    let x = |s: &str| expand(s, host);
    let name = match &raw.graph {
        None => return Err((root.0, root.1, "missing `graph`".into())),
        Some(g) if g.value.trim().is_empty() => {
            return Err(fail(g, "`graph` must not be empty".into()));
        }
        Some(g) => x(&g.value),
    };

    let mut declared = Vec::new();
    let mut sources = Vec::new();
    let resources = raw.resources.unwrap_or_default();
    for f in resources.file.unwrap_or_default() {
        let mut d = declare_file(&f, host)?;
        d.autoedge = autoedge(f.value.meta.as_ref());
        if let ResourceSpec::File(spec) = &d.spec
            && d.exported
            && spec.is_dir()
        {
            return Err(not_supported(
                loc(&f.value.name),
                "an exported directory (a path ending in `/`)",
                "collectors receive single files",
            ));
        }
        if let (ResourceSpec::File(spec), Some(at)) = (&d.spec, &f.value.source) {
            sources.push(source_at(&spec.source, at, d.exported, Kind::File)?);
        }
        declared.push(d);
    }
    for e in resources.exec.unwrap_or_default() {
        declared.push(declare_exec(&e, host)?);
    }
    for n in resources.noop.unwrap_or_default() {
        let meta = meta(n.value.meta.as_ref(), Kind::Noop)?;
        let spec = ResourceSpec::Noop(NoopSpec {
            name: x(&n.value.name.value),
            meta,
        });
        declared.push(declare(spec, &n.value.name)?);
    }
    for t in resources.timer.unwrap_or_default() {
        declared.push(declare_timer(&t, host)?);
    }
    for k in resources.kv.unwrap_or_default() {
        declared.push(declare_kv(&k, host)?);
    }
    for u in resources.user.unwrap_or_default() {
        declared.push(declare_user(&u, host)?);
    }
    for g in resources.group.unwrap_or_default() {
        declared.push(declare_group(&g, host)?);
    }
    for h in resources.hostname.unwrap_or_default() {
        declared.push(declare_hostname(&h, host)?);
    }
    for p in resources.pkg.unwrap_or_default() {
        let d = declare_pkg(&p, host)?;
        if let (ResourceSpec::Pkg(spec), Some(at)) = (&d.spec, &p.value.source) {
            sources.push(source_at(&spec.source, at, d.exported, Kind::Pkg)?);
        }
        declared.push(d);
    }
    for v in resources.svc.unwrap_or_default() {
        let mut d = declare_svc(&v, host)?;
        d.autoedge = autoedge(v.value.meta.as_ref());
        declared.push(d);
    }

    // Duplicate names within a kind, exported or not: `@@a` and `a` would be two different
    // things under one name.
    let mut seen: HashMap<ResourceId, (u64, u64)> = HashMap::new();
    for d in &declared {
        if let Some((l, c)) = seen.insert(d.spec.id(), d.at) {
            return Err((
                d.at.0,
                d.at.1,
                format!(
                    "duplicate {} name `{}` (first declared at line {l}, column {c})",
                    d.spec.kind(),
                    d.spec.name()
                ),
            ));
        }
    }

    let collect = collect_entries(raw.collect.unwrap_or_default(), host)?;
    let mut edges = edges(raw.edges.unwrap_or_default(), &declared, host)?;
    unit_file_edges(&declared, &mut edges);

    keep_from_purges(&mut declared);
    let (exported, local): (Vec<_>, Vec<_>) = declared.into_iter().partition(|d| d.exported);
    Ok(Graph {
        name,
        comment: raw.comment.as_deref().map(x),
        remote: raw.remote.as_deref().map(x),
        resources: local.into_iter().map(|d| d.spec).collect(),
        exports: exported.into_iter().map(|d| d.spec).collect(),
        collect,
        edges,
        sources,
    })
}

fn collect_entries(raw: Vec<Spanned<RawCollect>>, host: &str) -> Result<Vec<Collect>, Located> {
    let mut collect: Vec<Collect> = Vec::new();
    for c in raw {
        let kind = parse_kind(&c.value.kind)?;
        if collect.iter().any(|have| have.kind == kind) {
            return Err(fail(
                &c.value.kind,
                format!("collect lists kind `{kind}` twice"),
            ));
        }
        let pattern = match &c.value.pattern {
            // mgmt's default: no pattern. Only files use one.
            Some(p) if p.value.is_empty() && kind != Kind::File => None,
            Some(p) if p.value.is_empty() => {
                return Err(fail(
                    p,
                    "not supported: an empty collect `pattern` for files (in mgmt each \
                     collected file keeps the path its exporter chose; here another host never \
                     chooses a path: give the directory collected files land in)"
                        .into(),
                ));
            }
            None => None,
            Some(p) => Some(absolute(p, &expand(&p.value, host), "collect pattern")?),
        };
        if kind == Kind::Kv {
            return Err(not_supported(
                loc(&c.value.kind),
                "collecting kv",
                "a collected kv would let other hosts choose keys and values in this host's \
                 own key space",
            ));
        }
        if matches!(kind, Kind::User | Kind::Group | Kind::Hostname) {
            return Err(not_supported(
                loc(&c.value.kind),
                &format!("collecting {kind}"),
                "other hosts would choose this host's accounts or name",
            ));
        }
        if matches!(kind, Kind::Pkg | Kind::Svc) {
            return Err(not_supported(
                loc(&c.value.kind),
                &format!("collecting {kind}"),
                "other hosts would choose what this host installs or runs as root",
            ));
        }
        if kind == Kind::File && pattern.is_none() {
            return Err(fail(
                &c.value.kind,
                "collecting files needs a `pattern`: the directory collected files land in \
                 (a collected file never chooses its own path)"
                    .into(),
            ));
        }
        let allow_commands = c.value.allow_commands.unwrap_or(false);
        if kind == Kind::Exec && !allow_commands {
            return Err(fail(
                &c.value.kind,
                "collecting exec resources runs commands that other hosts chose; add \
                 `allow_commands: true` to this collect entry to allow it"
                    .into(),
            ));
        }
        collect.push(Collect {
            kind,
            pattern,
            allow_setid: c.value.allow_setid.unwrap_or(false),
            allow_commands,
        });
    }
    Ok(collect)
}

/// Edges between resources applied here, checked for missing ends and cycles.
fn edges(
    raw: Vec<Spanned<RawEdge>>,
    declared: &[Declared],
    host: &str,
) -> Result<Vec<Edge>, Located> {
    let exported: HashMap<ResourceId, bool> =
        declared.iter().map(|d| (d.spec.id(), d.exported)).collect();
    let mut edges = Vec::new();
    let mut edge_at = Vec::new();
    for e in raw {
        let edge_name = expand(&e.value.name.value, host);
        let end = |end: &Spanned<RawVertex>| -> Result<ResourceId, Located> {
            let kind = parse_kind(&end.value.kind)?;
            let name = expand(&end.value.name.value, host);
            let id = ResourceId::new(kind, name.strip_prefix(EXPORT_PREFIX).unwrap_or(&name));
            match exported.get(&id) {
                Some(false) => Ok(id),
                Some(true) => Err(fail(
                    &end.value.name,
                    format!(
                        "edge `{edge_name}` names {id}, which is exported (@@), not applied on this host"
                    ),
                )),
                None => Err(fail(
                    &end.value.name,
                    format!("edge `{edge_name}` names {id}, which is not in the graph"),
                )),
            }
        };
        let (from, to) = (end(&e.value.from)?, end(&e.value.to)?);
        edge_at.push(loc(&e.value.name));
        edges.push(Edge {
            name: edge_name,
            from,
            to,
            notify: e.value.notify.unwrap_or(false),
        });
    }
    for (edge, at) in auto_edges(declared) {
        edges.push(edge);
        edge_at.push(at);
    }
    if let Some((i, cycle)) = find_cycle(&edges) {
        let names: Vec<String> = cycle.iter().map(ToString::to_string).collect();
        let (l, c) = edge_at.get(i).copied().unwrap_or((1, 1));
        return Err((l, c, format!("cycle: {}", names.join(" -> "))));
    }
    Ok(edges)
}

fn declare_file(f: &Spanned<RawFile>, host: &str) -> Result<Declared, Located> {
    let raw = &f.value;
    let x = |s: &str| expand(s, host);
    refuse_value(
        &raw.force,
        "file force: true",
        "arbor never replaces a directory or another non-file at a file's path",
    )?;
    refuse_value(
        &raw.symlink,
        "file symlink: true",
        "arbor's file resource does not manage symlinks",
    )?;
    refuse(
        &raw.fragments,
        "file fragments",
        "content from fragment files is not implemented; use `content`",
    )?;
    refuse(
        &raw.selinux,
        "file selinux",
        "SELinux contexts are not managed",
    )?;
    // As in mgmt: the path (or the name), then `dirname` and `basename` replace its parts.
    let base_at = raw.path.as_ref().unwrap_or(&raw.name);
    let mut path = x(&base_at.value);
    if raw.dirname.is_some() || raw.basename.is_some() {
        let (d, b) = match path.rfind('/') {
            Some(i) => (path[..=i].to_string(), path[i + 1..].to_string()),
            None => (String::new(), path.clone()),
        };
        let dir = match &raw.dirname {
            Some(dn) => {
                let v = x(&dn.value);
                if !v.starts_with('/') || !v.ends_with('/') {
                    return Err(fail(
                        dn,
                        format!("dirname `{v}` must be an absolute directory ending in `/`"),
                    ));
                }
                v
            }
            None => d,
        };
        let base = match &raw.basename {
            Some(bn) => {
                let v = x(&bn.value);
                if v.is_empty() || v.contains('/') {
                    return Err(fail(
                        bn,
                        format!("basename `{v}` must be a file name without `/`"),
                    ));
                }
                v
            }
            None => b,
        };
        path = format!("{dir}{base}");
    }
    let at = raw.dirname.as_ref().unwrap_or(base_at);
    let path_buf = absolute(at, &path, "path")?;
    // As in mgmt: a path ending in `/` is a directory.
    let is_dir = path.ends_with('/');
    let recurse = raw.recurse.as_ref().is_some_and(|r| r.value);
    let purge = raw.purge.as_ref().is_some_and(|p| p.value);
    let state = match &raw.state {
        None => FileState::Exists,
        Some(s) => match s.value.as_str() {
            "exists" => FileState::Exists,
            "absent" => FileState::Absent,
            other => {
                return Err(fail(
                    s,
                    format!("state `{other}` is not one of: exists, absent"),
                ));
            }
        },
    };
    let mode = match &raw.mode {
        None => None,
        Some(m) => Some(parse_mode(&m.value).ok_or_else(|| {
            fail(
                m,
                format!(
                    "mode `{}` is not octal permission bits like \"0644\"",
                    m.value
                ),
            )
        })?),
    };
    let source = match (&raw.source, &raw.content) {
        (Some(s), Some(_)) => {
            return Err(fail(
                s,
                "`source` and `content` both given; a file takes its content from one".into(),
            ));
        }
        (Some(s), None) if state == FileState::Absent => {
            return Err(fail(s, "`source` on a file with `state: absent`".into()));
        }
        (Some(s), None) => {
            let v = x(&s.value);
            if v.trim().is_empty() {
                return Err(fail(s, "`source` must not be empty".into()));
            }
            // mgmt's rules: a directory source goes to a directory, recursively.
            if v.ends_with('/') != is_dir {
                return Err(fail(
                    s,
                    format!(
                        "source `{v}` and path `{path}`: both must be directories (ending in \
                         `/`) or both files"
                    ),
                ));
            }
            if is_dir && !recurse {
                return Err(fail(
                    s,
                    format!("source `{v}` is a directory: copying it needs `recurse: true`"),
                ));
            }
            if !is_dir && let Some(r) = raw.recurse.as_ref().filter(|r| r.value) {
                return Err(fail(
                    r,
                    "`recurse: true` with a single-file source (recurse copies directories)".into(),
                ));
            }
            Some(v)
        }
        (None, _) => None,
    };
    if is_dir && let Some(c) = &raw.content {
        return Err(fail(
            c,
            format!("`content` on the directory `{path}` (a path ending in `/`)"),
        ));
    }
    if let Some(p) = raw.purge.as_ref().filter(|p| p.value) {
        if !is_dir {
            return Err(fail(
                p,
                format!("`purge: true` on `{path}`, which is not a directory (ending in `/`)"),
            ));
        }
        if !recurse {
            return Err(fail(p, "`purge: true` needs `recurse: true`".into()));
        }
        if state == FileState::Absent {
            return Err(fail(p, "`purge: true` with `state: absent`".into()));
        }
    }
    if is_dir && path_buf.parent().is_none() && (purge || state == FileState::Absent) {
        return Err(fail(
            at,
            "arbor will not purge or remove `/` (mgmt refuses too)".into(),
        ));
    }
    let spec = ResourceSpec::File(FileSpec {
        name: x(&raw.name.value),
        path: path_buf,
        recurse,
        purge,
        keep: Vec::new(),
        content: raw.content.as_ref().map(|c| x(&c.value)),
        source,
        state,
        mode,
        owner: raw.owner.as_deref().map(x),
        group: raw.group.as_deref().map(x),
        meta: meta(raw.meta.as_ref(), Kind::File)?,
    });
    declare(spec, &raw.name)
}

/// As mgmt: a purging directory never removes the path of another file resource of the
/// graph (nor a directory holding one).
fn keep_from_purges(declared: &mut [Declared]) {
    let files: Vec<PathBuf> = declared
        .iter()
        .filter(|d| !d.exported)
        .filter_map(|d| match &d.spec {
            ResourceSpec::File(f) => Some(crate::engine::resources::file_tree::root_of(f)),
            _ => None,
        })
        .collect();
    for d in declared.iter_mut().filter(|d| !d.exported) {
        if let ResourceSpec::File(f) = &mut d.spec
            && f.purge
        {
            let root = crate::engine::resources::file_tree::root_of(f);
            f.keep = files
                .iter()
                .filter(|p| p.starts_with(&root) && **p != root)
                .cloned()
                .collect();
        }
    }
}

fn declare_exec(e: &Spanned<RawExec>, host: &str) -> Result<Declared, Located> {
    let raw = &e.value;
    let x = |s: &str| expand(s, host);
    for (field, name) in [
        (&raw.watchfiles, "exec watchfiles"),
        (&raw.mtimes, "exec mtimes"),
        (&raw.ifequals, "exec ifequals"),
        (&raw.ifequals_stdout, "exec ifequals_stdout"),
        (&raw.sig, "exec sig"),
    ] {
        refuse(field, name, "not implemented yet")?;
    }
    for (field, name) in [
        (&raw.send_output, "exec send_output"),
        (&raw.send_stdout, "exec send_stdout"),
        (&raw.send_stderr, "exec send_stderr"),
    ] {
        refuse(field, name, "arbor has no send/recv between resources")?;
    }
    let cmd_at = raw.cmd.as_ref().unwrap_or(&raw.name);
    let cmd = x(&cmd_at.value);
    let args = match &raw.args {
        None => Vec::new(),
        Some(a) if raw.shell.is_some() => {
            return Err(fail(a, "`args` cannot be used with a `shell`".into()));
        }
        Some(a) if cmd.split_whitespace().count() > 1 => {
            return Err(fail(
                a,
                "`args` cannot be used when `cmd` has arguments of its own".into(),
            ));
        }
        Some(a) => a.value.iter().map(|s| x(s)).collect(),
    };
    let env = match &raw.env {
        None => None,
        Some(env) => {
            if let Some(bad) = env.value.keys().find(|k| !valid_env_name(k)) {
                return Err(fail(
                    env,
                    format!("env: `{bad}` is not a valid variable name"),
                ));
            }
            Some(env.value.iter().map(|(k, v)| (k.clone(), x(v))).collect())
        }
    };
    let cwd = |c: &Option<Spanned<String>>, what: &str| -> Result<Option<PathBuf>, Located> {
        c.as_ref()
            .map(|c| absolute(c, &x(&c.value), what))
            .transpose()
    };
    let aux = |cmd: &Option<String>, shell: &Option<String>, dir: Option<PathBuf>| {
        cmd.as_deref().map(|c| Aux {
            cmd: x(c),
            shell: shell.as_deref().map(x),
            cwd: dir,
        })
    };
    let spec = ResourceSpec::Exec(Box::new(ExecSpec {
        name: x(&raw.name.value),
        cmd,
        args,
        shell: raw.shell.as_ref().map(|s| x(&s.value)),
        cwd: cwd(&raw.cwd, "cwd")?,
        env,
        user: raw.user.as_deref().map(x),
        group: raw.group.as_deref().map(x),
        // As in mgmt, 0 means no limit.
        timeout: raw.timeout.filter(|t| *t > 0),
        ifcmd: aux(&raw.ifcmd, &raw.ifshell, cwd(&raw.ifcwd, "ifcwd")?),
        nifcmd: aux(&raw.nifcmd, &raw.nifshell, cwd(&raw.nifcwd, "nifcwd")?),
        creates: cwd(&raw.creates, "creates")?,
        donecmd: aux(&raw.donecmd, &raw.doneshell, cwd(&raw.donecwd, "donecwd")?),
        watchcmd: aux(
            &raw.watchcmd,
            &raw.watchshell,
            cwd(&raw.watchcwd, "watchcwd")?,
        ),
        meta: meta(raw.meta.as_ref(), Kind::Exec)?,
    }));
    declare(spec, &raw.name)
}

fn declare_timer(t: &Spanned<RawTimer>, host: &str) -> Result<Declared, Located> {
    let raw = &t.value;
    let interval = match &raw.interval {
        None => {
            return Err(fail(
                &raw.name,
                "timer needs an `interval`: the seconds between its ticks".into(),
            ));
        }
        Some(i) if i.value == 0 => {
            return Err(fail(
                i,
                "timer interval 0: it must be at least 1 second".into(),
            ));
        }
        Some(i) => i.value,
    };
    let spec = ResourceSpec::Timer(TimerSpec {
        name: expand(&raw.name.value, host),
        interval,
        meta: meta(raw.meta.as_ref(), Kind::Timer)?,
    });
    declare(spec, &raw.name)
}

fn declare_kv(k: &Spanned<RawKv>, host: &str) -> Result<Declared, Located> {
    let raw = &k.value;
    let x = |s: &str| expand(s, host);
    // As mgmt, the name when missing (without the `@@` of an exported one).
    let key = match &raw.key {
        Some(k) if k.value.is_empty() => {
            return Err(fail(k, "kv key must not be empty".into()));
        }
        Some(k) => x(&k.value),
        None => {
            let name = x(&raw.name.value);
            name.strip_prefix(EXPORT_PREFIX)
                .unwrap_or(&name)
                .to_string()
        }
    };
    let value = raw.value.as_deref().map(x);
    let skiplessthan = raw.skiplessthan.unwrap_or(false);
    let skipcmpstyle = match &raw.skipcmpstyle {
        None => SkipCmpStyle::Int,
        Some(s) => match s.value {
            0 => SkipCmpStyle::Int,
            1 => SkipCmpStyle::String,
            // mgmt checks the style only when it is used.
            _ if !skiplessthan => SkipCmpStyle::Int,
            n => {
                return Err(fail(
                    s,
                    format!("kv skipcmpstyle {n} is not 0 (as integers) or 1 (as strings)"),
                ));
            }
        },
    };
    if skiplessthan
        && skipcmpstyle == SkipCmpStyle::Int
        && let Some(v) = &value
        && v.trim().parse::<i64>().is_err()
    {
        return Err(fail(
            &raw.name,
            format!(
                "kv value `{v}` is not an integer, which skiplessthan compares it as                  (skipcmpstyle 1 compares strings)"
            ),
        ));
    }
    let spec = ResourceSpec::Kv(KvSpec {
        name: x(&raw.name.value),
        key,
        value,
        skiplessthan,
        skipcmpstyle,
        meta: meta(raw.meta.as_ref(), Kind::Kv)?,
    });
    declare(spec, &raw.name)
}

/// mgmt's automatic edges for the kinds here that have them: a user's groups (`gid`, `group`,
/// `groups`) that are group resources of this host come before the user when it exists, and
/// after it when it is absent (members go before their group). Not for exported resources,
/// and not when the user says `meta: {autoedge: false}`. Each is placed at the user.
fn auto_edges(declared: &[Declared]) -> Vec<(Edge, (u64, u64))> {
    let groups: Vec<&GroupSpec> = declared
        .iter()
        .filter(|d| !d.exported)
        .filter_map(|d| match &d.spec {
            ResourceSpec::Group(g) => Some(g),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    // As mgmt: a file (or directory) depends on the nearest directory resource above it.
    let dirs: Vec<(PathBuf, ResourceId)> = declared
        .iter()
        .filter(|d| !d.exported)
        .filter_map(|d| match &d.spec {
            ResourceSpec::File(f) if f.is_dir() => {
                Some((crate::engine::resources::file_tree::root_of(f), d.spec.id()))
            }
            _ => None,
        })
        .collect();
    for d in declared.iter().filter(|d| !d.exported && d.autoedge) {
        let ResourceSpec::File(f) = &d.spec else {
            continue;
        };
        let root = crate::engine::resources::file_tree::root_of(f);
        let nearest = root
            .ancestors()
            .skip(1)
            .find_map(|a| dirs.iter().find(|(p, _)| p == a));
        if let Some((_, dir)) = nearest {
            let to = d.spec.id();
            out.push((
                Edge {
                    name: format!("autoedge {dir} -> {to}"),
                    from: dir.clone(),
                    to,
                    notify: false,
                },
                d.at,
            ));
        }
    }
    for d in declared.iter().filter(|d| !d.exported && d.autoedge) {
        let ResourceSpec::User(u) = &d.spec else {
            continue;
        };
        let named: Vec<&str> = u
            .group
            .iter()
            .chain(u.groups.iter().flatten())
            .map(String::as_str)
            .collect();
        for g in &groups {
            let by_gid = u.gid.is_some() && u.gid == g.gid;
            if !by_gid && !named.contains(&g.name.as_str()) {
                continue;
            }
            let (user, group) = (d.spec.id(), ResourceId::new(Kind::Group, g.name.clone()));
            let (from, to) = match u.state {
                AccountState::Exists => (group, user),
                AccountState::Absent => (user, group),
            };
            out.push((
                Edge {
                    name: format!("autoedge {from} -> {to}"),
                    from,
                    to,
                    notify: false,
                },
                d.at,
            ));
        }
    }
    out
}

/// `state:` of a user or group: required, as in mgmt (it has no default).
fn account_state(
    state: &Option<Spanned<String>>,
    name_at: &Spanned<String>,
    kind: Kind,
) -> Result<AccountState, Located> {
    match state {
        None => Err(fail(
            name_at,
            format!("{kind} needs a `state`: exists or absent (as in mgmt, there is no default)"),
        )),
        Some(s) => match s.value.as_str() {
            "exists" => Ok(AccountState::Exists),
            "absent" => Ok(AccountState::Absent),
            other => Err(fail(
                s,
                format!("state `{other}` is not one of: exists, absent"),
            )),
        },
    }
}

/// The name a user or group resource manages: its name, `{{hostname}}` expanded and `@@`
/// stripped, checked as mgmt does.
fn account_name(name_at: &Spanned<String>, host: &str, kind: Kind) -> Result<String, Located> {
    let full = expand(&name_at.value, host);
    let bare = full.strip_prefix(EXPORT_PREFIX).unwrap_or(&full);
    if !valid_account_name(bare) {
        return Err(fail(
            name_at,
            format!(
                "{kind} name `{bare}` is not a valid {kind} name (a letter or `_`, then up to 30 \
                 letters, digits, `_` or `-`)"
            ),
        ));
    }
    Ok(bare.to_string())
}

fn declare_user(u: &Spanned<RawUser>, host: &str) -> Result<Declared, Located> {
    let raw = &u.value;
    let x = |s: &str| expand(s, host);
    let name = account_name(&raw.name, host, Kind::User)?;
    let state = account_state(&raw.state, &raw.name, Kind::User)?;
    if let (Some(gid), Some(_)) = (&raw.gid, &raw.group) {
        return Err(fail(gid, "user takes `gid` or `group`, not both".into()));
    }
    let group = match &raw.group {
        Some(g) => {
            let v = x(&g.value);
            if !valid_account_name(&v) {
                return Err(fail(g, format!("group `{v}` is not a valid group name")));
            }
            Some(v)
        }
        None => None,
    };
    let groups = match &raw.groups {
        Some(gs) => {
            let mut out = Vec::new();
            for g in &gs.value {
                let v = x(g);
                if !valid_account_name(&v) {
                    return Err(fail(gs, format!("groups: `{v}` is not a valid group name")));
                }
                if group.as_deref() == Some(v.as_str()) {
                    return Err(fail(
                        gs,
                        format!("groups: the primary group `{v}` must not be listed"),
                    ));
                }
                if v == name {
                    return Err(fail(
                        gs,
                        format!("groups: the user's own name `{v}` must not be listed"),
                    ));
                }
                out.push(v);
            }
            Some(out)
        }
        None => None,
    };
    let homedir = match &raw.homedir {
        Some(h) => {
            let v = x(&h.value);
            if !v.starts_with('/') || !v.ends_with('/') {
                return Err(fail(
                    h,
                    format!("homedir `{v}` must be an absolute directory ending in `/`"),
                ));
            }
            Some(crate::engine::resources::user::clean_path(&v))
        }
        None => None,
    };
    let shell = match &raw.shell {
        Some(s) if s.value.is_empty() || s.value.contains([':', '\n']) => {
            return Err(fail(s, format!("shell `{}` is not a usable path", s.value)));
        }
        Some(s) => Some(x(&s.value)),
        None => None,
    };
    let spec = ResourceSpec::User(UserSpec {
        name: x(&raw.name.value),
        state,
        uid: raw.uid,
        gid: raw.gid.as_ref().map(|g| g.value),
        group,
        groups,
        homedir,
        shell,
        allowduplicateuid: raw.allowduplicateuid.unwrap_or(false),
        meta: meta(raw.meta.as_ref(), Kind::User)?,
    });
    let mut d = declare(spec, &raw.name)?;
    d.autoedge = autoedge(raw.meta.as_ref());
    Ok(d)
}

fn declare_group(g: &Spanned<RawGroup>, host: &str) -> Result<Declared, Located> {
    let raw = &g.value;
    account_name(&raw.name, host, Kind::Group)?;
    let spec = ResourceSpec::Group(GroupSpec {
        name: expand(&raw.name.value, host),
        state: account_state(&raw.state, &raw.name, Kind::Group)?,
        gid: raw.gid,
        meta: meta(raw.meta.as_ref(), Kind::Group)?,
    });
    declare(spec, &raw.name)
}

fn declare_pkg(p: &Spanned<RawPkg>, host: &str) -> Result<Declared, Located> {
    let raw = &p.value;
    let x = |s: &str| expand(s, host);
    let name = x(&raw.name.value);
    let bare = name.strip_prefix(EXPORT_PREFIX).unwrap_or(&name);
    if !crate::engine::resources::pkg::valid_name(bare) {
        return Err(fail(
            &raw.name,
            format!(
                "pkg name `{bare}` is not a Debian package name (lower-case letters, digits and \
                 + - ., starting with a letter or digit; optionally :arch)"
            ),
        ));
    }
    if let Some(u) = &raw.allowunsupported
        && !u.value
    {
        return Err(not_supported(
            loc(u),
            "pkg allowunsupported: false",
            "PackageKit's \"supported\" filter has no dpkg/apt equivalent; arbor installs \
             whatever apt's sources offer, as with allowunsupported: true",
        ));
    }
    let state = match &raw.state {
        None => PkgState::Installed,
        Some(s) => PkgState::parse(&x(&s.value)).map_err(|e| fail(s, e))?,
    };
    let source = match &raw.source {
        None => None,
        Some(s) => {
            let v = x(&s.value);
            if v.trim().is_empty() {
                return Err(fail(s, "`source` must not be empty".into()));
            }
            match state {
                PkgState::Uninstalled => {
                    return Err(fail(
                        s,
                        "`source` on a pkg with `state: uninstalled`".into(),
                    ));
                }
                PkgState::Newest => {
                    return Err(fail(
                        s,
                        "`source` with `state: newest`: a .deb is one version; say `installed` \
                         or the version"
                            .into(),
                    ));
                }
                _ => {}
            }
            Some(v)
        }
    };
    let spec = ResourceSpec::Pkg(PkgSpec {
        name,
        state,
        source,
        allowdowngrade: raw.allowdowngrade.unwrap_or(false),
        allowuntrusted: raw.allowuntrusted.unwrap_or(false),
        allownonfree: raw.allownonfree.unwrap_or(false),
        meta: meta(raw.meta.as_ref(), Kind::Pkg)?,
    });
    declare(spec, &raw.name)
}

fn declare_hostname(h: &Spanned<RawHostname>, host: &str) -> Result<Declared, Located> {
    let raw = &h.value;
    let x = |s: &str| expand(s, host);
    // As mgmt: `hostname`, or the resource's name when it is missing or empty, is the value
    // of each name not given; a name given as "" is not managed.
    let full = x(&raw.name.value);
    let bare = full
        .strip_prefix(EXPORT_PREFIX)
        .unwrap_or(&full)
        .to_string();
    let (fallback, fallback_at) = match &raw.hostname {
        Some(hn) if !hn.value.is_empty() => (x(&hn.value), hn),
        _ => (bare, &raw.name),
    };
    let name_of =
        |given: &Option<Spanned<String>>, field: &str| -> Result<Option<String>, Located> {
            let (value, at) = match given {
                Some(g) if g.value.is_empty() => return Ok(None),
                Some(g) => (x(&g.value), g),
                None => (fallback.clone(), fallback_at),
            };
            if !valid_hostname(&value) {
                return Err(fail(
                    at,
                    format!(
                        "{field} `{value}` is not a valid host name (1 to 64 letters, digits, `-`, \
                     `_` and `.`, no empty label)"
                    ),
                ));
            }
            Ok(Some(value))
        };
    let pretty = match &raw.pretty_hostname {
        Some(p) if p.is_empty() => None,
        Some(p) => Some(x(p)),
        None => Some(fallback.clone()),
    };
    let spec = ResourceSpec::Hostname(HostnameSpec {
        name: full.clone(),
        pretty,
        static_name: name_of(&raw.static_hostname, "static_hostname")?,
        transient: name_of(&raw.transient_hostname, "transient_hostname")?,
        meta: meta(raw.meta.as_ref(), Kind::Hostname)?,
    });
    declare(spec, &raw.name)
}

fn declare_svc(v: &Spanned<RawSvc>, host: &str) -> Result<Declared, Located> {
    let raw = &v.value;
    let x = |s: &str| expand(s, host);
    refuse_value(
        &raw.session,
        "svc session: true",
        "user services (systemctl --user) are not managed; only the system's",
    )?;
    let name = x(&raw.name.value);
    let bare = name.strip_prefix(EXPORT_PREFIX).unwrap_or(&name);
    if bare.ends_with(".service") {
        return Err(fail(
            &raw.name,
            format!(
                "svc name `{bare}`: the name is the unit without `.service` (as in mgmt, which \
                 adds it)"
            ),
        ));
    }
    if !crate::engine::resources::svc::valid_name(bare) {
        return Err(fail(
            &raw.name,
            format!("svc name `{bare}` is not a systemd unit name"),
        ));
    }
    let state = match &raw.state {
        None => None,
        Some(s) => match x(&s.value).as_str() {
            // As mgmt: empty is the same as not given.
            "" => None,
            "running" => Some(SvcState::Running),
            "stopped" => Some(SvcState::Stopped),
            other => {
                return Err(fail(
                    s,
                    format!("svc state `{other}` is not one of: running, stopped"),
                ));
            }
        },
    };
    let startup = match &raw.startup {
        None => None,
        Some(s) => match x(&s.value).as_str() {
            "" => None,
            "enabled" => Some(SvcStartup::Enabled),
            "disabled" => Some(SvcStartup::Disabled),
            other => {
                return Err(fail(
                    s,
                    format!("svc startup `{other}` is not one of: enabled, disabled"),
                ));
            }
        },
    };
    let spec = ResourceSpec::Svc(SvcSpec {
        name,
        state,
        startup,
        meta: meta(raw.meta.as_ref(), Kind::Svc)?,
    });
    declare(spec, &raw.name)
}

/// A resource's `source:` (as expanded, written at `at`), to be sent down as an artifact.
/// An exported file's goes to the exporting host, which publishes it as the export's content;
/// refused on an exported pkg (collectors install no packages from another host's word).
fn source_at(
    source: &Option<String>,
    at: &Spanned<String>,
    exported: bool,
    kind: Kind,
) -> Result<SourceAt, Located> {
    if exported && kind != Kind::File {
        return Err(not_supported(
            loc(at),
            &format!("`source` on an exported {kind}"),
            "only an exported file carries its source, as its content",
        ));
    }
    let (line, column) = loc(at);
    Ok(SourceAt {
        source: source.clone().unwrap_or_default(),
        line,
        column,
        exported,
    })
}

/// mgmt's `meta.autoedge` (default true).
fn autoedge(raw: Option<&Spanned<RawMeta>>) -> bool {
    raw.and_then(|m| m.value.autoedge).unwrap_or(true)
}

/// As mgmt: letters, digits and `_`, not starting with a digit.
fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn not_supported(at: (u64, u64), field: &str, why: &str) -> Located {
    (at.0, at.1, format!("not supported: {field} ({why})"))
}

/// A field arbor refuses in any form.
fn refuse<T>(field: &Option<Spanned<T>>, name: &str, why: &str) -> Result<(), Located> {
    match field {
        Some(f) => Err(not_supported(loc(f), name, why)),
        None => Ok(()),
    }
}

/// A flag arbor accepts only as `false` (its behaviour); `true` would need what it lacks.
fn refuse_value(field: &Option<Spanned<bool>>, name: &str, why: &str) -> Result<(), Located> {
    match field {
        Some(f) if f.value => Err(not_supported(loc(f), name, why)),
        _ => Ok(()),
    }
}

/// The metaparams of one resource, refusing what would need behaviour arbor lacks.
fn meta(raw: Option<&Spanned<RawMeta>>, kind: Kind) -> Result<Meta, Located> {
    let Some(raw) = raw else {
        return Ok(Meta::default());
    };
    let m = &raw.value;
    // `autoedge`: read by `autoedge` where arbor makes mgmt's automatic edges: a user's groups
    // before it (`auto_edges`), a file writing a unit file before its svc (`unit_file_edges`).
    // The others (a file's parent directories, a pkg's file list) are not made (docs).
    let _ = m.autoedge;
    // `autogroup`: of these kinds mgmt groups only noops, which merges their edges.
    if kind == Kind::Noop {
        refuse_value(
            &m.autogroup,
            "meta.autogroup: true on a noop",
            "arbor never merges resources into one; leave it out or set it false",
        )?;
    }
    refuse_value(
        &m.realize,
        "meta.realize: true",
        "arbor may replace a resource on reload before its first apply",
    )?;
    refuse_value(
        &m.hidden,
        "meta.hidden: true",
        "export with a `@@` name prefix instead",
    )?;
    if let Some(e) = &m.export
        && !e.value.is_empty()
    {
        return Err(not_supported(
            loc(e),
            "meta.export",
            "export with a `@@` name prefix instead",
        ));
    }
    // `dollar` lifts a check of mgmt's language; arbor never refuses names starting with `$`.
    let _ = m.dollar;
    let retry = match &m.retry {
        Some(r) if r.value < -1 => {
            return Err(fail(
                r,
                format!("meta.retry {} must be -1 (forever) or more", r.value),
            ));
        }
        Some(r) => r.value,
        None => 0,
    };
    let poll = match &m.poll {
        Some(p) if p.value < -1 => {
            return Err(fail(
                p,
                format!("meta.poll {} must be -1, 0 or seconds", p.value),
            ));
        }
        Some(p) => p.value,
        None => 0,
    };
    let burst = m.burst.as_ref().map(|b| b.value).unwrap_or(0);
    let limit = match &m.limit {
        Some(l) if l.value == f64::INFINITY => None,
        Some(l) if !(l.value > 0.0 && l.value.is_finite()) => {
            return Err(not_supported(
                loc(l),
                "meta.limit",
                "the rate must be a positive number of events a second, or .inf",
            ));
        }
        Some(l) if burst == 0 => {
            return Err(fail(
                l,
                "meta.limit needs a `burst` of 1 or more (with none, no event ever passes)".into(),
            ));
        }
        Some(l) => Some(Rate(l.value)),
        None => None,
    };
    let mut sema = Vec::new();
    for s in m.sema.iter().flatten() {
        if s.value.is_empty() || s.value.parse::<i64>().is_ok() {
            return Err(fail(
                s,
                format!("meta.sema `{}` is not `id` or `id:count`", s.value),
            ));
        }
        sema.push(s.value.clone());
    }
    Ok(Meta {
        noop: m.noop.unwrap_or(false),
        retry,
        retry_reset: m.retryreset.unwrap_or(false),
        delay: m.delay.unwrap_or(0),
        timeout: m.timeout.unwrap_or(0),
        poll,
        limit,
        burst,
        sema,
        rewatch: m.rewatch.unwrap_or(false),
        reset: m.reset.unwrap_or(false),
    })
}

/// Splits off `@@` and checks the name is usable.
fn declare(mut spec: ResourceSpec, name_at: &Spanned<String>) -> Result<Declared, Located> {
    let full = spec.name().to_string();
    let (exported, bare) = match full.strip_prefix(EXPORT_PREFIX) {
        Some(bare) => (true, bare),
        None => (false, full.as_str()),
    };
    if bare.trim().is_empty() {
        return Err(fail(
            name_at,
            format!("{} name must not be empty", spec.kind()),
        ));
    }
    spec.set_name(bare.to_string());
    Ok(Declared {
        spec,
        exported,
        at: loc(name_at),
        autoedge: true,
    })
}

fn parse_kind(s: &Spanned<String>) -> Result<Kind, Located> {
    Kind::parse(&s.value).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        fail(
            s,
            format!(
                "unknown resource kind `{}` (known: {})",
                s.value,
                known.join(", ")
            ),
        )
    })
}

fn absolute(at: &Spanned<String>, value: &str, what: &str) -> Result<PathBuf, Located> {
    let path = PathBuf::from(value);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(fail(
            at,
            format!("{what} `{value}` is relative; it must be absolute"),
        ))
    }
}

/// "0644", "644", "0o644" → 0o644.
fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

/// Returns the index of an edge on a cycle and the cycle's resources, first repeated last.
fn find_cycle(edges: &[Edge]) -> Option<(usize, Vec<ResourceId>)> {
    // Deterministic order: nodes sorted, out-edges in file order.
    let mut out: BTreeMap<&ResourceId, Vec<usize>> = BTreeMap::new();
    for (i, e) in edges.iter().enumerate() {
        out.entry(&e.from).or_default().push(i);
        out.entry(&e.to).or_default();
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnStack,
        Done,
    }
    let mut mark: HashMap<&ResourceId, Mark> = out.keys().map(|k| (*k, Mark::New)).collect();
    let starts: Vec<&ResourceId> = out.keys().copied().collect();
    for start in starts {
        if mark.get(start) != Some(&Mark::New) {
            continue;
        }
        // Stack of (node, edge that led here, next out-edge position).
        let mut stack: Vec<(&ResourceId, Option<usize>, usize)> = vec![(start, None, 0)];
        mark.insert(start, Mark::OnStack);
        while let Some(top) = stack.last_mut() {
            let (node, _, next) = *top;
            let outs = out.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if next >= outs.len() {
                mark.insert(node, Mark::Done);
                stack.pop();
                continue;
            }
            top.2 += 1;
            let ei = outs[next];
            let to = &edges[ei].to;
            match mark.get(to).copied().unwrap_or(Mark::New) {
                Mark::New => {
                    mark.insert(to, Mark::OnStack);
                    stack.push((to, Some(ei), 0));
                }
                Mark::OnStack => {
                    let from = stack.iter().position(|(n, _, _)| *n == to).unwrap_or(0);
                    let mut cycle: Vec<ResourceId> =
                        stack[from..].iter().map(|(n, _, _)| (*n).clone()).collect();
                    cycle.push(to.clone());
                    // Point at the first edge of the cycle in file order.
                    let first = stack[from + 1..]
                        .iter()
                        .filter_map(|(_, e, _)| *e)
                        .chain([ei])
                        .min()
                        .unwrap_or(ei);
                    return Some((first, cycle));
                }
                Mark::Done => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests;
