//! The hosts that failed in the last run of the same inputs, for `arbor run --limit @failed`.
//!
//! After every run the initiator writes the list to
//! `$XDG_STATE_HOME/arbor/failed/<key>` (`~/.local/state/arbor/failed/<key>` without
//! XDG_STATE_HOME), one host name a line under a comment naming the run's inputs. The key is
//! the first 16 hex digits of the sha256 of those inputs: the canonical paths of the topology
//! file, of the `--remote` graphs (sorted) and of the `--file` graph. So each topology keeps
//! its own list, wherever arbor is started from.
//!
//! A run updates the list rather than replacing it: the hosts it ran leave it, then those of
//! them that failed join it again. A `--limit` run therefore leaves the other hosts' entries as
//! they were, and rerunning `--limit @failed` until it exits 0 empties it.

use sha2::Digest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The `--limit` item that stands for the last run's failed hosts.
pub const FAILED: &str = "@failed";

/// One run's list of failed hosts, on disk.
#[derive(Debug, Clone)]
pub struct LastFailed {
    pub path: PathBuf,
    /// What the run's inputs were, for the file's comment and messages.
    pub inputs: String,
}

impl LastFailed {
    /// The list of the `job` (`run` or `exec`) whose inputs are `topology`, `remotes` and
    /// `file`, kept under `state_dir`.
    pub fn for_inputs(
        state_dir: &Path,
        job: &str,
        topology: Option<&Path>,
        remotes: &[PathBuf],
        file: Option<&Path>,
    ) -> LastFailed {
        let canonical = |p: &Path| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        };
        let mut parts = vec![format!("arbor {job}")];
        if let Some(t) = topology {
            parts.push(format!("--topology {}", canonical(t)));
        }
        let mut remotes: Vec<String> = remotes.iter().map(|r| canonical(r)).collect();
        remotes.sort();
        remotes.dedup();
        parts.extend(remotes.into_iter().map(|r| format!("--remote {r}")));
        if let Some(f) = file {
            parts.push(format!("--file {}", canonical(f)));
        }
        let inputs = parts.join(" ");
        let digest = sha2::Sha256::digest(inputs.as_bytes());
        let key = data_encoding::HEXLOWER.encode(&digest[..8]);
        LastFailed {
            path: state_dir.join("failed").join(key),
            inputs,
        }
    }

    /// The hosts that failed last time; `Err` when no run of these inputs wrote a list yet.
    pub fn read(&self) -> Result<Vec<String>, String> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "{FAILED}: no `{}` has finished yet (no list at {})",
                    self.inputs,
                    self.path.display()
                )
            } else {
                format!("{FAILED}: {}: {e}", self.path.display())
            }
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    /// After a run: the hosts in `ran` leave the list, those in `failed` join it. Written
    /// atomically (a temp file renamed over the list), in a private directory.
    pub fn update(&self, ran: &BTreeSet<String>, failed: &BTreeSet<String>) -> Result<(), String> {
        let mut hosts: BTreeSet<String> = self.read().unwrap_or_default().into_iter().collect();
        hosts.retain(|h| !ran.contains(h));
        hosts.extend(failed.iter().cloned());
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            writeln!(
                tmp,
                "# arbor: hosts that failed in the last run of {}",
                self.inputs.replace('\n', " ")
            )?;
            for h in &hosts {
                writeln!(tmp, "{h}")?;
            }
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o600))?;
            tmp.persist(&self.path).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// The hosts a `--limit` (or `arbor exec -w`) value names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limit {
    /// Named in the nodeset itself, in order.
    pub named: Vec<String>,
    /// From the failed list, when [`FAILED`] is one of the items (`None` when it is not).
    pub failed: Option<Vec<String>>,
}

impl Limit {
    /// Every host, each once: the failed list's first.
    pub fn all(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        self.failed
            .iter()
            .flatten()
            .chain(&self.named)
            .filter(|n| seen.insert(n.to_string()))
            .cloned()
            .collect()
    }
}

/// Expands a `--limit` value: a nodeset whose comma-separated items may include
/// [`FAILED`], which stands for `last_failed` (read only if it is used).
pub fn expand_limit(
    value: &str,
    last_failed: impl FnOnce() -> Result<Vec<String>, String>,
) -> Result<Limit, String> {
    let mut items: Vec<String> = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in value.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    let (failed_items, sets): (Vec<String>, Vec<String>) =
        items.into_iter().partition(|i| i == FAILED);
    let mut limit = Limit::default();
    if !failed_items.is_empty() {
        limit.failed = Some(last_failed()?);
    }
    if !sets.is_empty() {
        let set = sets.join(",");
        limit.named = crate::topology::nodeset::expand(&set).map_err(|e| {
            format!(
                "{value:?}: bad nodeset at character {} of {set:?}: {e}",
                e.at + 1
            )
        })?;
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_updates_its_own_list_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let topo = dir.path().join("t.yaml");
        std::fs::write(&topo, "x").expect("write");
        let list = LastFailed::for_inputs(dir.path(), "run", Some(&topo), &[], None);
        let other =
            LastFailed::for_inputs(dir.path(), "run", None, std::slice::from_ref(&topo), None);
        let exec = LastFailed::for_inputs(dir.path(), "exec", Some(&topo), &[], None);
        assert_ne!(list.path, other.path);
        assert_ne!(list.path, exec.path);
        assert!(
            list.read()
                .expect_err("none yet")
                .contains("no `arbor run --topology")
        );
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        list.update(&set(&["a", "b", "c"]), &set(&["b", "c"]))
            .expect("write");
        assert_eq!(list.read().expect("read"), ["b", "c"]);
        // A limited run of b: b leaves the list, c stays.
        list.update(&set(&["b"]), &set(&[])).expect("write");
        assert_eq!(list.read().expect("read"), ["c"]);
        list.update(&set(&["c"]), &set(&[])).expect("write");
        assert!(list.read().expect("read").is_empty());
        // The same topology named another way is the same list.
        let again = LastFailed::for_inputs(
            dir.path(),
            "run",
            Some(&dir.path().join(".").join("t.yaml")),
            &[],
            None,
        );
        assert_eq!(again.path, list.path);
    }

    #[test]
    fn a_limit_mixes_nodesets_and_the_failed_list() {
        let failed = || Ok(vec!["l1-2".to_string(), "r2".to_string()]);
        let limit = expand_limit("l[1-2]-2,@failed", failed).expect("ok");
        assert_eq!(limit.named, ["l1-2", "l2-2"]);
        assert_eq!(
            limit.failed.as_deref(),
            Some(&["l1-2".into(), "r2".into()][..])
        );
        assert_eq!(limit.all(), ["l1-2", "r2", "l2-2"]);
        let limit = expand_limit("r[1-2]", || Err("unused".into())).expect("ok");
        assert_eq!(
            (limit.named, limit.failed),
            (vec!["r1".into(), "r2".into()], None)
        );
        assert!(expand_limit("@failed", || Err("none".into())).is_err());
        assert!(expand_limit("r[1-", failed).is_err());
    }
}
