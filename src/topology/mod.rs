//! Topology files: which hosts a run reaches, through which relays and jump hosts, running
//! which graphs (docs/topology.md).
//!
//! [`load`] turns a file into a [`Topology`]: nodesets expanded so every [`ChildSpec`] is
//! one host, defaults applied, every graph file read, checked and keyed once. Everything that
//! can be wrong with the file is reported before anything connects, as
//! `file:line:column: message` (the CLI exits 2). `arbor topology check` is [`check::run`].

pub mod check;
mod file;
pub mod nodeset;
pub mod resolve;

use crate::engine::graph::GraphError;
use crate::wire::ChildSpec;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;

pub use file::{load, parse, parse_with};

/// The deepest a host may sit below the initiator (top-level hosts are depth 1). Jump hosts
/// count: each is a hop.
pub const MAX_DEPTH: usize = 8;

/// A validated topology: what the initiator stages and sends down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The file's top-level `cconns`, overriding --cconns.
    pub cconns: Option<usize>,
    /// The initiator's direct children, each with its subtree.
    pub hosts: Vec<ChildSpec>,
    /// Graph files by key (their canonical path, the key `ChildSpec::graph` holds): the path
    /// and the text, read once however many hosts use it.
    pub graphs: BTreeMap<String, (PathBuf, String)>,
}

impl Topology {
    /// Every host in the tree, jump hosts included.
    pub fn host_count(&self) -> usize {
        fn count(specs: &[ChildSpec]) -> usize {
            specs.iter().map(|s| 1 + count(&s.children)).sum()
        }
        count(&self.hosts)
    }

    /// The depth of the deepest host (0 for no hosts).
    pub fn max_depth(&self) -> usize {
        fn depth(specs: &[ChildSpec]) -> usize {
            specs
                .iter()
                .map(|s| 1 + depth(&s.children))
                .max()
                .unwrap_or(0)
        }
        depth(&self.hosts)
    }
}

/// The graph keys `spec` and its subtree use: what a relay needs sent down with its subtree.
pub fn graph_keys(spec: &ChildSpec) -> BTreeSet<&str> {
    let mut keys = BTreeSet::new();
    let mut stack = vec![spec];
    while let Some(s) = stack.pop() {
        keys.extend(s.graph.as_deref());
        stack.extend(&s.children);
    }
    keys
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A graph file the topology names is invalid: the graph's own error (which names the
    /// graph file, line and column), then where the topology names it.
    #[error("{source} (graph named at {}:{line}:{column})", path.display())]
    Graph {
        path: PathBuf,
        line: u64,
        column: u64,
        source: GraphError,
    },
}

#[cfg(test)]
mod tests;
