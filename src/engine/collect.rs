//! Collected resources: how another host's export becomes a resource on this host.
//!
//! As in mgmt, a collected file lands in the collect entry's `pattern` directory under its
//! exported basename. Collected resources get names that cannot clash with the graph's own
//! (`@@<host>/<name>`: a local name never starts with `@@`), so two hosts may export the same
//! name and a host collects its own exports beside its local resources.

use crate::engine::exchange::ExportedResource;
use crate::engine::graph::{Collect, EXPORT_PREFIX, Graph};
use crate::engine::resources::{Kind, ResourceSpec};
use std::collections::HashMap;

/// The local spec for one collected export, or `None` (logged) if it is unusable here.
pub fn collected_spec(exported: &ExportedResource, collect: &Collect) -> Option<ResourceSpec> {
    let mut spec = exported.spec.clone();
    spec.set_name(format!(
        "{EXPORT_PREFIX}{}/{}",
        exported.host,
        exported.spec.name()
    ));
    if let ResourceSpec::File(f) = &mut spec {
        if let (Some(dir), Some(base)) = (&collect.pattern, f.path.file_name()) {
            f.path = dir.join(base);
        }
        if !f.path.is_absolute() || f.path.file_name().is_none() {
            tracing::warn!(
                "ignoring {} exported by {}: path {} is not an absolute file path",
                exported.spec.id(),
                exported.host,
                f.path.display()
            );
            return None;
        }
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
    use crate::engine::resources::{FileSpec, FileState};
    use std::path::{Path, PathBuf};

    fn exported(host: &str, path: &str) -> ExportedResource {
        ExportedResource {
            host: host.into(),
            spec: ResourceSpec::File(FileSpec {
                name: "file2b".into(),
                path: path.into(),
                content: Some("x".into()),
                state: FileState::Exists,
                mode: None,
            }),
        }
    }

    #[test]
    fn a_collected_file_lands_in_the_pattern_directory_under_its_basename() {
        let c = Collect {
            kind: Kind::File,
            pattern: Some(PathBuf::from("/srv/in/")),
        };
        let spec = collected_spec(&exported("b", "/tmp/file2b"), &c).expect("usable");
        assert_eq!(spec.name(), "@@b/file2b");
        match spec {
            ResourceSpec::File(f) => assert_eq!(f.path, Path::new("/srv/in/file2b")),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn without_a_pattern_the_exported_path_is_kept_and_must_be_absolute() {
        let c = Collect {
            kind: Kind::File,
            pattern: None,
        };
        let spec = collected_spec(&exported("b", "/tmp/file2b"), &c).expect("usable");
        assert!(matches!(spec, ResourceSpec::File(ref f) if f.path == Path::new("/tmp/file2b")));
        assert!(collected_spec(&exported("b", "tmp/x"), &c).is_none());
    }
}
