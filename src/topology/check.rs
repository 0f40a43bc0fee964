//! `arbor topology check FILE`: validate a topology and show the tree it describes.

use super::Topology;
use crate::wire::{ChildMode, ChildSpec};
use std::path::{Component, Path, PathBuf};

/// Validates the topology at `path` and prints its tree on stdout, every host resolved through
/// the operator's ssh_config (`ssh_config`: `-F FILE`, else ~/.ssh/config and
/// /etc/ssh/ssh_config). Returns the exit code: 0 when valid, 2 when not (the error,
/// `file:line:column: message`, goes to stderr).
pub fn run(path: &Path, ssh_config: Option<&Path>, home: &Path) -> u8 {
    let mut resolver = match super::resolve::Resolver::for_operator(
        ssh_config,
        home,
        super::resolve::Overrides::default(),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arbor: {e}");
            return crate::exit::BAD_INPUT;
        }
    };
    match super::load(path, &mut resolver) {
        Ok(topology) => {
            print!("{}", render(&topology, path));
            crate::exit::OK
        }
        Err(e) => {
            eprintln!("arbor: {e}");
            crate::exit::BAD_INPUT
        }
    }
}

/// One row of the table, before alignment.
struct Row {
    tree: String,
    address: String,
    depth: usize,
    mode: &'static str,
    graph: String,
    fan_out: usize,
}

/// The tree as an aligned table, one host a line, then the totals. MODE is `relay` (arbor
/// runs there and stages children), `leaf` (a relay without children) or `jump`. Graph files
/// are shown relative to the topology file's directory.
pub fn render(topology: &Topology, path: &Path) -> String {
    let base = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    let mut rows = Vec::new();
    add_rows(topology, &topology.hosts, &base, "", 1, &mut rows);

    let headers = ["NAME", "ADDRESS", "DEPTH", "MODE", "GRAPH", "FAN-OUT"];
    let width = |i: usize, cell: &dyn Fn(&Row) -> usize| {
        rows.iter()
            .map(cell)
            .max()
            .unwrap_or(0)
            .max(headers[i].len())
    };
    let w = [
        width(0, &|r| r.tree.chars().count()),
        width(1, &|r| r.address.chars().count()),
        width(2, &|r| r.depth.to_string().len()),
        width(3, &|r| r.mode.len()),
        width(4, &|r| r.graph.chars().count()),
        width(5, &|r| r.fan_out.to_string().len()),
    ];
    // `{:<N}` pads by chars, so the tree's box-drawing characters line up.
    let line = |c: [&str; 6]| {
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {:<w4$}  {:>w5$}\n",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4],
            w5 = w[5],
        )
    };
    let mut out = line(headers);
    for r in &rows {
        out.push_str(&line([
            &r.tree,
            &r.address,
            &r.depth.to_string(),
            r.mode,
            &r.graph,
            &r.fan_out.to_string(),
        ]));
    }
    let modes = |mode: &str| rows.iter().filter(|r| r.mode == mode).count();
    out.push_str(&format!(
        "\n{}: valid: {} ({}, {}, {}), max depth {}\n",
        path.display(),
        plural(topology.host_count(), "host", "hosts"),
        plural(modes("relay"), "relay", "relays"),
        plural(modes("jump"), "jump host", "jump hosts"),
        plural(modes("leaf"), "leaf", "leaves"),
        topology.max_depth(),
    ));
    out
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn add_rows(
    topology: &Topology,
    specs: &[ChildSpec],
    base: &Path,
    indent: &str,
    depth: usize,
    rows: &mut Vec<Row>,
) {
    for (i, spec) in specs.iter().enumerate() {
        let last = i + 1 == specs.len();
        let (branch, below) = match (depth, last) {
            (1, _) => ("", ""),
            (_, false) => ("├─ ", "│  "),
            (_, true) => ("└─ ", "   "),
        };
        let graph = match &spec.graph {
            None => "-".to_string(),
            Some(key) => topology
                .graphs
                .get(key)
                .map(|(path, _)| relative(path, base).display().to_string())
                .unwrap_or_else(|| key.clone()),
        };
        rows.push(Row {
            tree: format!("{indent}{branch}{}", spec.name),
            address: match &spec.escalate {
                Some(b) => format!("{} (sudo {})", super::resolve::address(spec), b.user),
                None => super::resolve::address(spec),
            },
            depth,
            mode: match spec.mode {
                ChildMode::Jump => "jump",
                ChildMode::Relay if spec.children.is_empty() => "leaf",
                ChildMode::Relay => "relay",
            },
            graph,
            fan_out: spec.children.len(),
        });
        add_rows(
            topology,
            &spec.children,
            base,
            &format!("{indent}{below}"),
            depth + 1,
            rows,
        );
    }
}

/// `path` relative to the directory `base` (both absolute), with `..` where needed.
fn relative(path: &Path, base: &Path) -> PathBuf {
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return path.to_path_buf();
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for part in &p[common..] {
        out.push(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_with_dotdot() {
        assert_eq!(
            relative(Path::new("/w/examples/leaf.yaml"), Path::new("/w/topology")),
            Path::new("../examples/leaf.yaml")
        );
        assert_eq!(
            relative(Path::new("/w/topology/g.yaml"), Path::new("/w/topology")),
            Path::new("g.yaml")
        );
    }
}
