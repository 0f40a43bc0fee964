//! Graph files (mgmt 0.0.x YAML): the model, parsing, and every check that can be made
//! before anything runs.
//!
//! Every error names `file:line:column`, so a user can jump to the mistake; the CLI exits 2
//! for them. Parsing is in two steps: serde-saphyr reads the file into raw structs that keep
//! source locations ([`Spanned`]) and reject unknown keys; [`validate`] then checks what the
//! YAML shape cannot say (names, paths, edges, cycles) and builds the plain [`Graph`].

use crate::engine::resources::{
    ExecSpec, FileSpec, FileState, Kind, NoopSpec, ResourceId, ResourceSpec,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    name: Spanned<String>,
    path: Spanned<String>,
    content: Option<String>,
    state: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    name: Spanned<String>,
    cmd: String,
    shell: Option<String>,
    timeout: Option<u64>,
    ifcmd: Option<String>,
    watchcmd: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNoop {
    name: Spanned<String>,
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
    let resources = raw.resources.unwrap_or_default();
    for f in resources.file.unwrap_or_default() {
        declared.push(declare_file(&f, host)?);
    }
    for e in resources.exec.unwrap_or_default() {
        let spec = ResourceSpec::Exec(ExecSpec {
            name: x(&e.value.name.value),
            cmd: x(&e.value.cmd),
            shell: e.value.shell.as_deref().map(x),
            // As in mgmt, 0 means no limit.
            timeout: e.value.timeout.filter(|t| *t > 0),
            ifcmd: e.value.ifcmd.as_deref().map(x),
            watchcmd: e.value.watchcmd.as_deref().map(x),
        });
        declared.push(declare(spec, &e.value.name)?);
    }
    for n in resources.noop.unwrap_or_default() {
        let spec = ResourceSpec::Noop(NoopSpec {
            name: x(&n.value.name.value),
        });
        declared.push(declare(spec, &n.value.name)?);
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
    let edges = edges(raw.edges.unwrap_or_default(), &declared, host)?;

    let (exported, local): (Vec<_>, Vec<_>) = declared.into_iter().partition(|d| d.exported);
    Ok(Graph {
        name,
        comment: raw.comment.as_deref().map(x),
        remote: raw.remote.as_deref().map(x),
        resources: local.into_iter().map(|d| d.spec).collect(),
        exports: exported.into_iter().map(|d| d.spec).collect(),
        collect,
        edges,
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
            None => None,
            Some(p) => Some(absolute(p, &expand(&p.value, host), "collect pattern")?),
        };
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
    if let Some((i, cycle)) = find_cycle(&edges) {
        let names: Vec<String> = cycle.iter().map(ToString::to_string).collect();
        let (l, c) = edge_at.get(i).copied().unwrap_or((1, 1));
        return Err((l, c, format!("cycle: {}", names.join(" -> "))));
    }
    Ok(edges)
}

fn declare_file(f: &Spanned<RawFile>, host: &str) -> Result<Declared, Located> {
    let raw = &f.value;
    let path = absolute(&raw.path, &expand(&raw.path.value, host), "path")?;
    if raw.path.value.ends_with('/') {
        return Err(fail(
            &raw.path,
            format!(
                "path `{}` names a directory; file wants a file",
                raw.path.value
            ),
        ));
    }
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
    let spec = ResourceSpec::File(FileSpec {
        name: expand(&raw.name.value, host),
        path,
        content: raw.content.as_deref().map(|c| expand(c, host)),
        state,
        mode,
    });
    declare(spec, &raw.name)
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
    })
}

fn parse_kind(s: &Spanned<String>) -> Result<Kind, Located> {
    Kind::parse(&s.value).ok_or_else(|| {
        fail(
            s,
            format!(
                "unknown resource kind `{}` (known: file, exec, noop)",
                s.value
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
