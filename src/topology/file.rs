//! Reading a topology file: serde-saphyr reads raw structs that keep source locations and
//! reject unknown keys, then [`Builder`] checks what the YAML shape cannot say (nodesets,
//! names, depth, modes, graph files) and builds the [`ChildSpec`] tree.

use super::resolve::{Given, Resolver};
use super::{MAX_DEPTH, Topology, TopologyError, nodeset};
use crate::wire::{Become, ChildMode, ChildSpec};
use serde::Deserialize;
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

/// Reads and validates the topology file at `path`, and every graph file it names; hosts are
/// resolved through `resolver` (the operator's ssh_config).
pub fn load(path: &Path, resolver: &mut Resolver) -> Result<Topology, TopologyError> {
    let source = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with(&source, path, resolver)
}

/// Parses and validates topology text, with no ssh_config. `path` names the file in errors,
/// and graph paths are relative to its directory; the graph files are read and checked.
pub fn parse(source: &str, path: &Path) -> Result<Topology, TopologyError> {
    parse_with(source, path, &mut Resolver::none())
}

/// [`parse`], resolving every host through `resolver`.
pub fn parse_with(
    source: &str,
    path: &Path,
    resolver: &mut Resolver,
) -> Result<Topology, TopologyError> {
    let invalid = |line: u64, column: u64, message: String| TopologyError::Invalid {
        path: path.to_path_buf(),
        line: line.max(1),
        column: column.max(1),
        message,
    };
    if source.trim().is_empty() || source.trim() == "---" {
        return Err(invalid(1, 1, "missing `hosts`: the file is empty".into()));
    }
    let raw: Spanned<RawTopology> = serde_saphyr::from_str(source).map_err(|e| {
        let (line, column, message) = crate::engine::graph::yaml_error(&e);
        invalid(line, column, message)
    })?;
    let base = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let root = loc(&raw);
    let raw = raw.value;
    let mut builder = Builder {
        path,
        source,
        base,
        defaults: raw.defaults.unwrap_or_default(),
        graphs: BTreeMap::new(),
        names: HashMap::new(),
        resolver,
    };
    let cconns = builder.cconns(raw.cconns.as_ref())?;
    let hosts = match &raw.hosts {
        None => return Err(builder.error(root, "missing `hosts`".into())),
        Some(h) if h.value.is_empty() => {
            return Err(builder.error(
                loc(h),
                "`hosts` is empty: a topology needs at least one host".into(),
            ));
        }
        Some(h) => builder.entries(&h.value, 1)?,
    };
    let mut hosts = hosts;
    if builder.flag(raw.seed_siblings.as_ref(), "seed_siblings")? {
        for h in &mut hosts {
            h.seed_siblings = true;
        }
    }
    Ok(Topology {
        cconns,
        hosts,
        graphs: builder.graphs,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    defaults: Option<RawDefaults>,
    cconns: Option<Spanned<String>>,
    /// The initiator's children can reach each other (`node::sibling`).
    seed_siblings: Option<Spanned<String>>,
    hosts: Option<Spanned<Vec<Spanned<RawEntry>>>>,
}

/// What makes sense for every host: not its address, name, graph, children, mode or key.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    user: Option<Spanned<String>>,
    port: Option<Spanned<String>>,
    identity: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    cconns: Option<Spanned<String>>,
    #[serde(rename = "become")]
    escalate: Option<Spanned<String>>,
    become_user: Option<Spanned<String>>,
    quic_ports: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    host: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    port: Option<Spanned<String>>,
    graph: Option<Spanned<String>>,
    children: Option<Spanned<Vec<Spanned<RawEntry>>>>,
    identity: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    host_key: Option<Spanned<String>>,
    cconns: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    #[serde(rename = "become")]
    escalate: Option<Spanned<String>>,
    become_user: Option<Spanned<String>>,
    /// This host's children can reach each other (`node::sibling`).
    seed_siblings: Option<Spanned<String>>,
    /// The UDP ports it listens on for its parent's QUIC link, `FIRST-LAST`.
    quic_ports: Option<Spanned<String>>,
}

fn loc<T>(s: &Spanned<T>) -> (u64, u64) {
    (s.referenced.line(), s.referenced.column())
}

struct Builder<'a> {
    /// The topology file, as named in errors.
    path: &'a Path,
    source: &'a str,
    /// Where relative graph paths start.
    base: PathBuf,
    defaults: RawDefaults,
    graphs: BTreeMap<String, (PathBuf, String)>,
    /// Every name so far, and where it was given.
    names: HashMap<String, (u64, u64)>,
    resolver: &'a mut Resolver,
}

impl Builder<'_> {
    fn error(&self, (line, column): (u64, u64), message: String) -> TopologyError {
        TopologyError::Invalid {
            path: self.path.to_path_buf(),
            line: line.max(1),
            column: column.max(1),
            message,
        }
    }

    /// An error at the character `at` (0-based) inside the scalar `s`: past the opening
    /// quote if the scalar is quoted.
    fn error_inside(&self, s: &Spanned<String>, at: usize, message: String) -> TopologyError {
        let (line, column) = loc(s);
        let quoted = self
            .source
            .lines()
            .nth((line as usize).saturating_sub(1))
            .and_then(|l| l.chars().nth((column as usize).saturating_sub(1)))
            .is_some_and(|c| c == '"' || c == '\'');
        self.error((line, column + u64::from(quoted) + at as u64), message)
    }

    fn entries(
        &mut self,
        raw: &[Spanned<RawEntry>],
        depth: usize,
    ) -> Result<Vec<ChildSpec>, TopologyError> {
        let mut specs = Vec::new();
        for entry in raw {
            specs.extend(self.entry(entry, depth)?);
        }
        Ok(specs)
    }

    /// One entry: as many hosts as its nodeset names, each with the entry's subtree.
    fn entry(
        &mut self,
        entry: &Spanned<RawEntry>,
        depth: usize,
    ) -> Result<Vec<ChildSpec>, TopologyError> {
        let e = &entry.value;
        let Some(host) = &e.host else {
            return Err(self.error(loc(entry), "missing `host`".into()));
        };
        if host.value.is_empty() {
            return Err(self.error(loc(host), "`host` is empty".into()));
        }
        if depth > MAX_DEPTH {
            return Err(self.error(
                loc(host),
                format!(
                    "`{}` is at depth {depth}, over the limit of {MAX_DEPTH}",
                    host.value
                ),
            ));
        }
        let hosts = nodeset::expand(&host.value).map_err(|err| {
            self.error_inside(
                host,
                err.at,
                format!("bad nodeset `{}`: {}", host.value, err.message),
            )
        })?;
        let (names, name_at) = match &e.name {
            None => (hosts.clone(), host),
            Some(name) => {
                let names = nodeset::expand(&name.value).map_err(|err| {
                    self.error_inside(
                        name,
                        err.at,
                        format!("bad nodeset `{}`: {}", name.value, err.message),
                    )
                })?;
                if names.len() != hosts.len() {
                    return Err(self.error(
                        loc(name),
                        format!(
                            "`name` `{}` expands to {} but `host` `{}` to {}: they must pair up",
                            name.value,
                            count(names.len(), "name"),
                            host.value,
                            count(hosts.len(), "host"),
                        ),
                    ));
                }
                (names, name)
            }
        };
        for name in &names {
            if name.contains('/') {
                return Err(self.error(
                    loc(name_at),
                    format!("name `{name}` contains `/`, which separates names in host paths"),
                ));
            }
            if let Some((l, c)) = self.names.get(name) {
                return Err(self.error(
                    loc(name_at),
                    format!(
                        "duplicate name {name} (also at {}:{l}:{c})",
                        self.path.display()
                    ),
                ));
            }
            self.names.insert(name.clone(), loc(name_at));
        }

        let mode = match &e.mode {
            None => ChildMode::Relay,
            Some(m) => match m.value.as_str() {
                "relay" => ChildMode::Relay,
                "jump" => ChildMode::Jump,
                other => {
                    return Err(
                        self.error(loc(m), format!("mode `{other}` is not one of: relay, jump"))
                    );
                }
            },
        };
        let no_children = e.children.as_ref().is_none_or(|c| c.value.is_empty());
        if let (ChildMode::Jump, Some(m)) = (mode, &e.mode) {
            if let Some(g) = &e.graph {
                return Err(self.error(
                    loc(g),
                    "a `mode: jump` host only forwards TCP and runs nothing, so it takes no `graph`"
                        .into(),
                ));
            }
            if no_children {
                return Err(self.error(
                    loc(m),
                    "a `mode: jump` host needs `children`: it is only a hop on the way to them"
                        .into(),
                ));
            }
        }

        let user = match e.user.as_ref().or(self.defaults.user.as_ref()) {
            Some(u) if u.value.is_empty() => {
                return Err(self.error(loc(u), "`user` is empty".into()));
            }
            Some(u) => Some(u.value.clone()),
            None => None,
        };
        let port = match e.port.as_ref().or(self.defaults.port.as_ref()) {
            Some(p) => match p.value.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => {
                    return Err(self.error(
                        loc(p),
                        format!("port `{}` is not a number from 1 to 65535", p.value),
                    ));
                }
            },
            None => None,
        };
        let password = e.password.as_ref().or(self.defaults.password.as_ref());
        if let Some(p) = password {
            tracing::warn!(
                "{}:{}: a password in a topology file is readable by anyone who can read the file; prefer keys",
                self.path.display(),
                p.referenced.line()
            );
        }
        let password = password.map(|p| p.value.clone());
        if let Some(key) = &e.host_key
            && let Err(err) = russh::keys::PublicKey::from_openssh(&key.value)
        {
            return Err(self.error(
                loc(key),
                format!("`host_key` is not an OpenSSH public key (\"type base64\"): {err}"),
            ));
        }
        let graph = match &e.graph {
            None => None,
            Some(g) => Some(self.graph(g)?),
        };
        let children = match &e.children {
            Some(c) if !c.value.is_empty() => {
                if hosts.len() > 1 {
                    return Err(self.error(
                        loc(host),
                        format!(
                            "`host` `{}` expands to {}, but an entry with `children` needs a \
                             single host (names under it would repeat)",
                            host.value,
                            count(hosts.len(), "host")
                        ),
                    ));
                }
                self.entries(&c.value, depth + 1)?
            }
            _ => Vec::new(),
        };
        let mut children = children;
        if self.flag(e.seed_siblings.as_ref(), "seed_siblings")? {
            if children.is_empty() {
                let at = e.seed_siblings.as_ref().map(loc).unwrap_or_default();
                return Err(self.error(
                    at,
                    "`seed_siblings` on a host without `children` would do nothing: it says \
                     that this host's children can reach each other"
                        .into(),
                ));
            }
            for c in &mut children {
                c.seed_siblings = true;
            }
        }
        let identity = e
            .identity
            .as_ref()
            .or(self.defaults.identity.as_ref())
            .map(|i| i.value.clone());
        let cconns = self.cconns(e.cconns.as_ref().or(self.defaults.cconns.as_ref()))?;
        let quic_ports = e
            .quic_ports
            .as_ref()
            .or(self.defaults.quic_ports.as_ref())
            .map(|p| {
                crate::cli::parse_port_range(&p.value)
                    .map_err(|why| self.error(loc(p), format!("quic_ports {why}")))
            })
            .transpose()?;
        let escalate = self.escalate(e, mode)?;
        let given = Given { user, port };
        let mut specs = Vec::new();
        for (host, name) in hosts.into_iter().zip(names) {
            let mut spec = ChildSpec {
                name,
                host,
                graph: graph.clone(),
                mode,
                host_key: e.host_key.as_ref().map(|k| k.value.clone()),
                identity: identity.clone(),
                password: password.clone(),
                cconns,
                children: children.clone(),
                credential: None,
                escalate: escalate.clone(),
                quic_ports,
                ..Default::default()
            };
            let at = e.host.as_ref().map(loc).unwrap_or_default();
            self.resolver
                .apply(&mut spec, &given)
                .map_err(|m| self.error(at, m))?;
            specs.push(spec);
        }
        Ok(specs)
    }

    /// A `true`/`false` key (absent: false).
    fn flag(&self, value: Option<&Spanned<String>>, key: &str) -> Result<bool, TopologyError> {
        match value {
            None => Ok(false),
            Some(v) => match v.value.as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                other => Err(self.error(loc(v), format!("{key} `{other}` is not true or false"))),
            },
        }
    }

    /// `become` and `become_user` of an entry (its own, else the defaults').
    fn escalate(&self, e: &RawEntry, mode: ChildMode) -> Result<Option<Become>, TopologyError> {
        let on = match e.escalate.as_ref().or(self.defaults.escalate.as_ref()) {
            None => false,
            Some(b) => match b.value.as_str() {
                "true" => true,
                "false" => false,
                other => {
                    return Err(
                        self.error(loc(b), format!("become `{other}` is not true or false"))
                    );
                }
            },
        };
        let user = e
            .become_user
            .as_ref()
            .or(self.defaults.become_user.as_ref());
        if let Some(u) = user {
            if u.value.is_empty() {
                return Err(self.error(loc(u), "`become_user` is empty".into()));
            }
            if u.value != "root" {
                return Err(self.error(
                    loc(u),
                    format!(
                        "become_user `{}`: only root is supported (arbor's working dir, store \
                         socket and forwarded agent are reachable by the login user and root \
                         only; docs/topology.md)",
                        u.value
                    ),
                ));
            }
            if let Some(own) = &e.become_user
                && !on
            {
                return Err(self.error(
                    loc(own),
                    "`become_user` without `become: true` would do nothing".into(),
                ));
            }
        }
        if on && mode == ChildMode::Jump {
            // From `defaults:` it concerns the hosts that run arbor only.
            if let Some(own) = &e.escalate {
                return Err(self.error(
                    loc(own),
                    "a `mode: jump` host runs nothing, so it has nothing to `become` for".into(),
                ));
            }
            return Ok(None);
        }
        Ok(on.then(|| Become {
            user: user.map_or_else(|| "root".to_string(), |u| u.value.clone()),
            password: None,
        }))
    }

    fn cconns(&self, raw: Option<&Spanned<String>>) -> Result<Option<usize>, TopologyError> {
        raw.map(|c| {
            c.value.parse::<usize>().map_err(|_| {
                self.error(
                    loc(c),
                    format!("cconns `{}` is not a count (0 for no limit)", c.value),
                )
            })
        })
        .transpose()
    }

    /// Resolves, reads and checks a graph file once; returns its key.
    fn graph(&mut self, g: &Spanned<String>) -> Result<String, TopologyError> {
        let written = self.base.join(&g.value);
        let canonical = std::fs::canonicalize(&written).map_err(|err| {
            let shown = normalize(&written);
            let why = match err.kind() {
                std::io::ErrorKind::NotFound => "not found".to_string(),
                _ => err.to_string(),
            };
            self.error(
                loc(g),
                format!("graph file `{}` ({}): {why}", g.value, shown.display()),
            )
        })?;
        let key = canonical.display().to_string();
        if self.graphs.contains_key(&key) {
            return Ok(key);
        }
        let text = std::fs::read_to_string(&canonical).map_err(|err| {
            self.error(
                loc(g),
                format!("graph file `{}`: {}: {err}", g.value, canonical.display()),
            )
        })?;
        if let Err(source) = crate::engine::graph::parse(&text, &canonical, "check") {
            let (line, column) = loc(g);
            return Err(TopologyError::Graph {
                path: self.path.to_path_buf(),
                line,
                column,
                source,
            });
        }
        self.graphs.insert(key.clone(), (canonical, text));
        Ok(key)
    }
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// `path` made absolute and with `.` and `..` removed, for a path that does not exist.
fn normalize(path: &Path) -> PathBuf {
    let absolute = std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}
