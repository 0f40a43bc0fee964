//! Collected resources: how another host's export becomes a resource on this host.
//!
//! As in mgmt, a collected file lands in the collect entry's `pattern` directory under its
//! exported basename. Collected resources get names that cannot clash with the graph's own
//! (`@@<host>/<name>`: a local name never starts with `@@`), so two hosts may export the same
//! name and a host collects its own exports beside its local resources.

use crate::engine::exchange::ExportedResource;
use crate::engine::graph::{Collect, EXPORT_PREFIX, Graph};
use crate::engine::resources::{FileState, Kind, ResourceSpec};
use std::collections::HashMap;

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
