//! The run's bookkeeping at the initiator, as a plain value: which hosts are converged,
//! settled with failures, failed, running or gone; when the run is done; and its exit code.
//! The initiator feeds it what it hears (state events, converged flags in the store, finished
//! children) and asks it what to do next, so the rules are unit-tested without a lab.

use crate::wire::{ChildMode, ChildSpec, HostState};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// What the run should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep going; look again at this instant at the latest (`None`: only on news).
    Wait(Option<Instant>),
    /// The run is over, with this exit code.
    Done(u8),
}

#[derive(Debug, Default)]
pub struct RunBook {
    /// Hosts that run a graph: done when converged, or settled with failures.
    with_graph: BTreeSet<String>,
    /// Hosts that run arbor without a graph (relays only): done once running.
    bare: BTreeSet<String>,
    /// Every host's descendants: a failed relay takes its subtree with it.
    below: HashMap<String, Vec<String>>,
    converged: BTreeMap<String, bool>,
    staged: BTreeSet<String>,
    running: BTreeSet<String>,
    unhealthy: BTreeMap<String, Vec<String>>,
    failed: BTreeSet<String>,
    exited: BTreeSet<String>,
    converged_timeout: Option<Duration>,
    all_since: Option<Instant>,
}

impl RunBook {
    /// The run's hosts: `children` (the initiator's, with their subtrees) and, with `local`,
    /// this host running a graph of its own.
    pub fn new(
        children: &[ChildSpec],
        local: Option<&str>,
        converged_timeout: Option<Duration>,
    ) -> RunBook {
        let mut book = RunBook {
            converged_timeout,
            ..RunBook::default()
        };
        for c in children {
            book.index(c);
        }
        if let Some(name) = local {
            book.with_graph.insert(name.to_string());
        }
        book
    }

    fn index(&mut self, spec: &ChildSpec) -> Vec<String> {
        if spec.graph.is_some() {
            self.with_graph.insert(spec.name.clone());
        } else if spec.mode == ChildMode::Relay {
            self.bare.insert(spec.name.clone());
        }
        let mut below = Vec::new();
        for c in &spec.children {
            below.push(c.name.clone());
            below.extend(self.index(c));
        }
        self.below.insert(spec.name.clone(), below.clone());
        below
    }

    /// `host` and every host below it.
    pub fn subtree(&self, host: &str) -> Vec<String> {
        let mut all = vec![host.to_string()];
        all.extend(self.below.get(host).into_iter().flatten().cloned());
        all
    }

    /// A host's new state (events carry it; names are unique in a run).
    pub fn state(&mut self, host: &str, state: &HostState) {
        match state {
            HostState::Staging { .. } => {
                self.staged.insert(host.to_string());
            }
            HostState::Failed { .. } => {
                if let Some(below) = self.below.get(host) {
                    self.failed.extend(below.iter().cloned());
                }
                self.failed.insert(host.to_string());
            }
            HostState::Unhealthy { failures } => {
                self.unhealthy.insert(host.to_string(), failures.clone());
            }
            HostState::Running => {
                self.unhealthy.remove(host);
                self.running.insert(host.to_string());
            }
            HostState::Exited => {
                self.exited.insert(host.to_string());
            }
            HostState::Converged | HostState::Changed => {
                self.unhealthy.remove(host);
            }
            // Not failed: the link may come back (a failure follows if it does not).
            HostState::Reconnecting { .. } => {}
        }
    }

    /// A host's converged flag in the store (`None`: removed).
    pub fn converged_flag(&mut self, host: &str, value: Option<bool>) {
        match value {
            Some(v) => self.converged.insert(host.to_string(), v),
            None => self.converged.remove(host),
        };
    }

    /// A child's task ended (`ok`: it exited cleanly when told to).
    pub fn finished(&mut self, host: &str, ok: bool) {
        if !ok {
            self.failed.insert(host.to_string());
        }
    }

    /// Whether every host that is still in the run is done, and if so, since when.
    pub fn next(&mut self, now: Instant) -> Next {
        let alive: Vec<&String> = self
            .with_graph
            .iter()
            .filter(|h| !self.failed.contains(*h))
            .collect();
        let alive_bare: Vec<&String> = self
            .bare
            .iter()
            .filter(|h| !self.failed.contains(*h))
            .collect();
        let anyone = !(self.with_graph.is_empty() && self.bare.is_empty());
        if anyone && alive.is_empty() && alive_bare.is_empty() {
            return Next::Done(crate::exit::FAILED); // nothing left that could converge
        }
        let all_done = anyone
            && alive
                .iter()
                .all(|h| self.converged.get(*h) == Some(&true) || self.unhealthy.contains_key(*h))
            && alive_bare.iter().all(|h| self.running.contains(*h));
        if all_done {
            self.all_since.get_or_insert(now);
        } else {
            self.all_since = None;
        }
        match (self.converged_timeout, self.all_since) {
            (Some(timeout), Some(since)) if now >= since + timeout => Next::Done(self.exit_code()),
            (Some(timeout), Some(since)) => Next::Wait(Some(since + timeout)),
            _ => Next::Wait(None),
        }
    }

    /// 0 if no host failed or settled with failures, else 1.
    pub fn exit_code(&self) -> u8 {
        if self.failed.is_empty() && self.unhealthy.is_empty() {
            crate::exit::OK
        } else {
            crate::exit::FAILED
        }
    }

    /// Whether `host` failed, itself or with a relay above it.
    pub fn has_failed(&self, host: &str) -> bool {
        self.failed.contains(host)
    }

    /// Hosts settled with failed resources, and what failed.
    pub fn unhealthy(&self) -> &BTreeMap<String, Vec<String>> {
        &self.unhealthy
    }

    /// Hosts that were being staged or ran, and have not reported a clean exit: they may
    /// still hold a working dir or a running arbor if the run ends now.
    pub fn may_hold_state(&self) -> Vec<String> {
        self.staged
            .iter()
            .chain(&self.running)
            .filter(|h| !self.exited.contains(*h))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, graph: bool, children: Vec<ChildSpec>) -> ChildSpec {
        ChildSpec {
            name: name.into(),
            host: name.into(),
            port: 22,
            user: "root".into(),
            graph: graph.then(|| "g".to_string()),
            mode: ChildMode::Relay,
            host_key: None,
            identity: None,
            password: None,
            cconns: None,
            children,
            credential: None,
            ..Default::default()
        }
    }

    /// r1 (no graph) with leaves l1, l2 (graphs); r2 with a graph of its own.
    fn tree() -> Vec<ChildSpec> {
        vec![
            host(
                "r1",
                false,
                vec![host("l1", true, vec![]), host("l2", true, vec![])],
            ),
            host("r2", true, vec![]),
        ]
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn the_run_ends_once_everyone_has_been_converged_for_the_timeout() {
        let mut book = RunBook::new(&tree(), None, Some(T));
        let t0 = Instant::now();
        assert_eq!(book.next(t0), Next::Wait(None));
        book.state("r1", &HostState::Running);
        for h in ["l1", "l2", "r2"] {
            book.converged_flag(h, Some(true));
        }
        assert_eq!(book.next(t0), Next::Wait(Some(t0 + T)));
        // A flip back resets the clock.
        book.converged_flag("l2", Some(false));
        assert_eq!(book.next(t0 + T / 2), Next::Wait(None));
        book.converged_flag("l2", Some(true));
        let t1 = t0 + T;
        assert_eq!(book.next(t1), Next::Wait(Some(t1 + T)));
        assert_eq!(book.next(t1 + T), Next::Done(0));
    }

    #[test]
    fn without_a_timeout_the_run_never_ends_on_its_own() {
        let mut book = RunBook::new(&[host("a", true, vec![])], None, None);
        book.converged_flag("a", Some(true));
        assert_eq!(book.next(Instant::now()), Next::Wait(None));
    }

    #[test]
    fn a_relay_without_a_graph_counts_once_it_runs() {
        let mut book = RunBook::new(&[host("r", false, vec![])], None, Some(T));
        let t0 = Instant::now();
        assert_eq!(book.next(t0), Next::Wait(None));
        book.state("r", &HostState::Running);
        assert_eq!(book.next(t0), Next::Wait(Some(t0 + T)));
    }

    #[test]
    fn a_failed_relay_takes_its_subtree_and_the_rest_still_converges_with_exit_1() {
        let mut book = RunBook::new(&tree(), None, Some(T));
        let t0 = Instant::now();
        book.state("r1", &HostState::Failed { cause: "x".into() });
        book.converged_flag("r2", Some(true));
        assert_eq!(book.next(t0), Next::Wait(Some(t0 + T)));
        assert_eq!(book.next(t0 + T), Next::Done(1));
    }

    #[test]
    fn a_reconnecting_relay_is_not_failed_and_names_its_subtree() {
        let mut book = RunBook::new(&tree(), None, Some(T));
        let t0 = Instant::now();
        book.state("r1", &HostState::Reconnecting { grace: 60 });
        assert!(!book.has_failed("r1"));
        assert_eq!(book.exit_code(), 0);
        let mut subtree = book.subtree("r1");
        subtree.sort();
        assert_eq!(subtree, ["l1", "l2", "r1"]);
        book.converged_flag("r2", Some(true));
        assert_eq!(
            book.next(t0),
            Next::Wait(None),
            "r1's subtree is not converged yet"
        );
    }

    #[test]
    fn when_every_host_failed_the_run_ends_at_once_with_exit_1() {
        let mut book = RunBook::new(&tree(), None, Some(T));
        book.state("r1", &HostState::Failed { cause: "x".into() });
        book.finished("r2", false);
        assert_eq!(book.next(Instant::now()), Next::Done(1));
    }

    #[test]
    fn hosts_settled_with_failures_end_the_run_with_exit_1() {
        let mut book = RunBook::new(&[host("a", true, vec![])], Some("me"), Some(T));
        let t0 = Instant::now();
        book.converged_flag("me", Some(true));
        book.state(
            "a",
            &HostState::Unhealthy {
                failures: vec!["exec[x]: exit 3".into()],
            },
        );
        assert_eq!(book.next(t0), Next::Wait(Some(t0 + T)));
        assert_eq!(book.next(t0 + T), Next::Done(1));
        assert_eq!(book.unhealthy().len(), 1);
        // Healthy again: the failure is forgotten.
        book.state("a", &HostState::Converged);
        assert_eq!(book.exit_code(), 0);
    }

    #[test]
    fn hosts_that_may_hold_state_are_those_started_and_not_exited() {
        let mut book = RunBook::new(&tree(), None, None);
        book.state(
            "r1",
            &HostState::Staging {
                step: "copy".into(),
            },
        );
        book.state("l1", &HostState::Running);
        book.state(
            "r2",
            &HostState::Staging {
                step: "connect".into(),
            },
        );
        book.state("r2", &HostState::Exited);
        assert_eq!(book.may_hold_state(), vec!["l1", "r1"]);
    }
}
