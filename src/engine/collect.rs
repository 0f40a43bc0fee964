//! Collected resources: how another host's export becomes a resource on this host.
//!
//! As in mgmt, a collected file lands in the collect entry's `pattern` directory under its
//! exported basename. Collected resources get names that cannot clash with the graph's own
//! (`@@<host>/<name>`: a local name never starts with `@@`), so two hosts may export the same
//! name and a host collects its own exports beside its local resources.
//!
//! # What a host logs about them
//!
//! In an all-to-all exchange every host collects every host's exports: a line per collected
//! resource and host would be N² lines travelling up the tree. So at info level a host logs a
//! summary per collected kind ([`CollectSummary`]): what came, changed and went in the set,
//! and what it changed on disk (named when there are at most [`SUMMARY_NAMES`] changes,
//! counted otherwise). It logs one when it settles after something happened, or every
//! [`SUMMARY_EVERY`] while it keeps changing. The line per resource (`file[@@h/f]: created
//! /tmp/f`, `…: no longer managed`) is at debug (`-v`). Failures stay at error level, one per
//! resource.

use crate::engine::exchange::ExportedResource;
use crate::engine::graph::{Collect, EXPORT_PREFIX, Graph};
use crate::engine::reload::Diff;
use crate::engine::resources::{FileState, Kind, ResourceId, ResourceSpec};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// Whether `id` names a collected resource (`@@<host>/<name>`): a local name never starts
/// with `@@`.
pub fn is_collected(id: &ResourceId) -> bool {
    id.name.starts_with(EXPORT_PREFIX)
}

/// A summary names at most this many changes made on the host; beyond that it counts them.
pub const SUMMARY_NAMES: usize = 3;

/// While a host keeps changing (it never settles), a summary at least this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// What happened to one kind's collected resources since the last summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Tally {
    new: usize,
    updated: usize,
    gone: usize,
    /// Changes made on this host (`Outcome::Changed`), and the first few as `id: what`.
    changed: usize,
    /// Changes it would make (`Outcome::WouldChange`, noop).
    would: usize,
    named: Vec<String>,
}

/// The summaries of collected resources a host logs at info level (see the module's doc).
#[derive(Debug, Default)]
pub struct CollectSummary {
    tallies: BTreeMap<Kind, Tally>,
    /// When the oldest change not yet summarized happened.
    since: Option<Instant>,
}

impl CollectSummary {
    fn tally(&mut self, kind: Kind, now: Instant) -> &mut Tally {
        self.since.get_or_insert(now);
        self.tallies.entry(kind).or_default()
    }

    /// The collected resources a diff of the desired set adds, changes and removes.
    pub fn record_diff(&mut self, diff: &Diff, now: Instant) {
        for spec in &diff.added {
            if is_collected(&spec.id()) {
                self.tally(spec.kind(), now).new += 1;
            }
        }
        for spec in &diff.changed {
            if is_collected(&spec.id()) {
                self.tally(spec.kind(), now).updated += 1;
            }
        }
        for id in &diff.removed {
            if is_collected(id) {
                self.tally(id.kind, now).gone += 1;
            }
        }
    }

    /// A collected resource's check changed something (`would`: would have, under noop).
    pub fn record_change(&mut self, id: &ResourceId, what: &str, would: bool, now: Instant) {
        let t = self.tally(id.kind, now);
        if would {
            t.would += 1;
        } else {
            t.changed += 1;
        }
        if t.changed + t.would <= SUMMARY_NAMES {
            t.named.push(format!("{id}: {what}"));
        }
    }

    /// The host is leaving: what other hosts did as they left too (their exports gone) is
    /// not news worth a line at the end of every host's run; anything else is kept.
    pub fn forget_departures(&mut self) {
        self.tallies
            .retain(|_, t| t.new + t.updated + t.changed + t.would > 0);
        if self.tallies.is_empty() {
            self.since = None;
        }
    }

    /// When a summary is due even if the host does not settle.
    pub fn due(&self) -> Option<Instant> {
        self.since.map(|t| t + SUMMARY_EVERY)
    }

    /// The summary lines (one per kind with news) if there is news, and starts over.
    /// `managed` are the resources the host manages now; `failures` those failing.
    pub fn take<'a>(
        &mut self,
        managed: &[ResourceId],
        failures: impl IntoIterator<Item = &'a ResourceId>,
    ) -> Vec<String> {
        self.since = None;
        let tallies = std::mem::take(&mut self.tallies);
        if tallies.is_empty() {
            return Vec::new();
        }
        let failures: Vec<&ResourceId> =
            failures.into_iter().filter(|id| is_collected(id)).collect();
        tallies
            .into_iter()
            .map(|(kind, t)| {
                let of_kind = |id: &&ResourceId| id.kind == kind && is_collected(id);
                let total = managed.iter().filter(of_kind).count();
                let failing = failures.iter().copied().filter(of_kind).count();
                summary_line(kind, total, failing, &t)
            })
            .collect()
    }
}

fn summary_line(kind: Kind, total: usize, failing: usize, t: &Tally) -> String {
    let plural = if total == 1 { "" } else { "s" };
    let mut line = format!("collected {total} {kind} resource{plural}");
    let set: Vec<String> = [(t.new, "new"), (t.updated, "updated"), (t.gone, "gone")]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    if !set.is_empty() {
        line.push_str(&format!(" ({})", set.join(", ")));
    }
    if t.changed + t.would <= SUMMARY_NAMES {
        for named in &t.named {
            line.push_str("; ");
            line.push_str(named);
        }
    } else {
        if t.changed > 0 {
            line.push_str(&format!("; {} changed on this host", t.changed));
        }
        if t.would > 0 {
            line.push_str(&format!("; {} would change on this host (noop)", t.would));
        }
        line.push_str(" (-v shows each)");
    }
    if failing > 0 {
        line.push_str(&format!("; {failing} failing"));
    }
    line
}

/// The local spec for one collected export, or `None` (logged) if it is unusable or not
/// allowed here. Another host's export is untrusted input, whatever its own graph said: a
/// collected file lands in the collect pattern's directory under its exported basename (so
/// no path it carries can escape the pattern), loses setuid and setgid bits unless the
/// collect entry has `allow_setid`, keeps no owner or group, and is never `state: absent` (a collector creates and
/// updates; it does not delete on another host's word); an exec resource is collected only
/// with `allow_commands`.
pub fn collected_spec(exported: &ExportedResource, collect: &Collect) -> Option<ResourceSpec> {
    let refuse = |why: &str| {
        tracing::warn!(
            "ignoring {} exported by {}: {why}",
            exported.spec.id(),
            exported.host
        );
        None
    };
    let mut spec = exported.spec.clone();
    spec.set_name(format!(
        "{EXPORT_PREFIX}{}/{}",
        exported.host,
        exported.spec.name()
    ));
    match &mut spec {
        ResourceSpec::File(f) => {
            let Some(dir) = &collect.pattern else {
                return refuse("collecting files needs a pattern");
            };
            let base = match f.path.components().next_back() {
                Some(std::path::Component::Normal(base)) => base.to_owned(),
                _ => return refuse("its path has no file name"),
            };
            f.path = dir.join(base);
            if f.source.is_some() {
                return refuse("a collected file cannot name a `source` (artifacts are per host)");
            }
            if f.state == FileState::Absent {
                return refuse("a collected file cannot be `state: absent`");
            }
            if f.owner.is_some() || f.group.is_some() {
                tracing::warn!(
                    "{} exported by {}: dropping its owner/group (a collected file belongs \
                     to the collector)",
                    exported.spec.id(),
                    exported.host
                );
                f.owner = None;
                f.group = None;
            }
            if let Some(mode) = &mut f.mode
                && !collect.allow_setid
                && *mode & 0o6000 != 0
            {
                tracing::warn!(
                    "{} exported by {}: dropping its setuid/setgid bits (mode {:o}); \
                     `allow_setid: true` in the collect entry keeps them",
                    exported.spec.id(),
                    exported.host,
                    *mode
                );
                *mode &= !0o6000;
            }
        }
        ResourceSpec::Exec(_) if !collect.allow_commands => {
            return refuse("collecting exec resources needs `allow_commands: true`");
        }
        _ => {}
    }
    Some(spec)
}

/// Everything this host should manage: the graph's own resources, then every collected one.
pub fn desired(
    graph: &Graph,
    collected: &HashMap<Kind, Vec<ExportedResource>>,
) -> Vec<ResourceSpec> {
    let mut specs = graph.resources.clone();
    for c in &graph.collect {
        for exported in collected.get(&c.kind).into_iter().flatten() {
            specs.extend(collected_spec(exported, c));
        }
    }
    specs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::resources::FileSpec;
    use std::path::PathBuf;

    fn exported(host: &str, path: &str) -> ExportedResource {
        ExportedResource {
            host: host.into(),
            spec: ResourceSpec::File(FileSpec {
                name: "file2b".into(),
                path: path.into(),
                content: Some("x".into()),
                state: FileState::Exists,
                mode: None,
                ..FileSpec::default()
            }),
        }
    }

    fn pattern(dir: &str) -> Collect {
        Collect {
            kind: Kind::File,
            pattern: Some(PathBuf::from(dir)),
            ..Collect::default()
        }
    }

    fn path_of(spec: Option<ResourceSpec>) -> Option<PathBuf> {
        match spec? {
            ResourceSpec::File(f) => Some(f.path),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_collected_file_lands_in_the_pattern_directory_under_its_basename() {
        let spec =
            collected_spec(&exported("b", "/tmp/file2b"), &pattern("/srv/in/")).expect("usable");
        assert_eq!(spec.name(), "@@b/file2b");
        assert_eq!(path_of(Some(spec)), Some(PathBuf::from("/srv/in/file2b")));
    }

    #[test]
    fn no_exported_path_escapes_the_pattern() {
        let c = pattern("/srv/in/");
        for (path, want) in [
            (
                "/tmp/../../root/.ssh/authorized_keys",
                Some("/srv/in/authorized_keys"),
            ),
            ("../../etc/passwd", Some("/srv/in/passwd")),
            ("/etc/..", None),
            ("/", None),
            ("..", None),
        ] {
            assert_eq!(
                path_of(collected_spec(&exported("b", path), &c)),
                want.map(PathBuf::from),
                "{path}"
            );
        }
        // Without a pattern nothing is collected (graphs cannot say so; this is the guard).
        let none = Collect {
            kind: Kind::File,
            ..Collect::default()
        };
        assert!(collected_spec(&exported("b", "/tmp/file2b"), &none).is_none());
    }

    #[test]
    fn setid_bits_and_absent_files_are_not_taken_from_other_hosts() {
        let mut e = exported("b", "/tmp/tool");
        if let ResourceSpec::File(f) = &mut e.spec {
            f.mode = Some(0o6755);
        }
        let mode = |c: &Collect| match collected_spec(&e, c) {
            Some(ResourceSpec::File(f)) => f.mode,
            other => panic!("unexpected {other:?}"),
        };
        assert_eq!(mode(&pattern("/srv/")), Some(0o755));
        let trusting = Collect {
            allow_setid: true,
            ..pattern("/srv/")
        };
        assert_eq!(mode(&trusting), Some(0o6755));
        if let ResourceSpec::File(f) = &mut e.spec {
            f.state = FileState::Absent;
        }
        assert!(collected_spec(&e, &pattern("/srv/")).is_none());
    }

    #[test]
    fn a_collected_file_keeps_no_owner_or_group_from_its_exporter() {
        let mut e = exported("b", "/tmp/f");
        if let ResourceSpec::File(f) = &mut e.spec {
            f.owner = Some("attacker".into());
            f.group = Some("wheel".into());
        }
        match collected_spec(&e, &pattern("/srv/")) {
            Some(ResourceSpec::File(f)) => assert_eq!((f.owner, f.group), (None, None)),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn collected_file(host: &str, name: &str) -> ResourceSpec {
        collected_spec(&exported(host, &format!("/tmp/{name}")), &pattern("/srv/")).expect("usable")
    }

    #[test]
    fn a_summary_counts_the_set_and_names_a_few_changes() {
        let t0 = Instant::now();
        let mut s = CollectSummary::default();
        assert_eq!(s.due(), None);
        assert!(s.take(&[], []).is_empty(), "no news, no line");
        let specs: Vec<ResourceSpec> = ["a", "b"].iter().map(|h| collected_file(h, "f")).collect();
        let local = ResourceSpec::File(FileSpec {
            name: "mine".into(),
            ..FileSpec::default()
        });
        let diff = Diff {
            added: specs.iter().cloned().chain([local.clone()]).collect(),
            ..Diff::default()
        };
        s.record_diff(&diff, t0);
        s.record_change(&specs[0].id(), "created /srv/f", false, t0);
        assert_eq!(s.due(), Some(t0 + SUMMARY_EVERY));
        let managed: Vec<ResourceId> = specs.iter().chain([&local]).map(|s| s.id()).collect();
        assert_eq!(
            s.take(&managed, []),
            ["collected 2 file resources (2 new); file[@@a/file2b]: created /srv/f"]
        );
        assert_eq!(s.due(), None);
        // Local resources are never counted, however they change.
        s.record_diff(
            &Diff {
                removed: vec![local.id()],
                ..Diff::default()
            },
            t0,
        );
        assert!(s.take(&managed, []).is_empty());
        // A host that leaves does not report others leaving, only what else happened.
        let gone = Diff {
            removed: vec![specs[0].id()],
            ..Diff::default()
        };
        s.record_diff(&gone, t0);
        s.forget_departures();
        assert_eq!(s.due(), None);
        assert!(s.take(&managed, []).is_empty());
        s.record_diff(&gone, t0);
        s.record_change(&specs[1].id(), "updated content of /srv/f", false, t0);
        s.forget_departures();
        assert_eq!(
            s.take(&managed[1..], []),
            ["collected 1 file resource (1 gone); file[@@b/file2b]: updated content of /srv/f"]
        );
    }

    #[test]
    fn a_summary_of_many_changes_counts_them_instead_of_naming_them() {
        let t0 = Instant::now();
        let mut s = CollectSummary::default();
        let specs: Vec<ResourceSpec> = (0..47)
            .map(|i| collected_file(&format!("h{i}"), "f"))
            .collect();
        let managed: Vec<ResourceId> = specs.iter().map(|s| s.id()).collect();
        s.record_diff(
            &Diff {
                added: specs[..3].to_vec(),
                changed: specs[3..5].to_vec(),
                removed: vec![ResourceId::new(Kind::File, "@@gone/f")],
                unchanged: 42,
            },
            t0,
        );
        for spec in &specs[..4] {
            s.record_change(&spec.id(), "created /srv/f", false, t0);
        }
        s.record_change(&specs[4].id(), "would create /srv/f", true, t0);
        assert_eq!(
            s.take(
                &managed,
                [&specs[0].id(), &ResourceId::new(Kind::File, "local")]
            ),
            [
                "collected 47 file resources (3 new, 2 updated, 1 gone); 4 changed on this \
                 host; 1 would change on this host (noop) (-v shows each); 1 failing"
            ]
        );
    }

    #[test]
    fn exec_resources_are_collected_only_with_allow_commands() {
        let e = ExportedResource {
            host: "b".into(),
            spec: ResourceSpec::Exec(Box::new(crate::engine::resources::ExecSpec {
                name: "x".into(),
                cmd: "touch /tmp/owned".into(),
                ..Default::default()
            })),
        };
        let c = Collect {
            kind: Kind::Exec,
            ..Collect::default()
        };
        assert!(collected_spec(&e, &c).is_none());
        let opted_in = Collect {
            allow_commands: true,
            ..c
        };
        assert!(collected_spec(&e, &opted_in).is_some());
    }
}
