//! `pkg`: a package installed (any version, the newest, or one version) or not installed.
//!
//! After mgmt's pkg resource, through dpkg and apt on Debian-family hosts instead of
//! PackageKit (arbor detects dpkg; a host without it, rpm/dnf ones included, fails the
//! resource saying so). What is installed is read with `dpkg-query`, what could be installed
//! with `apt-cache policy`: both read only local files, so a package that is already right
//! never touches the network, and neither does a `source:` .deb whose dependencies are met.
//! `apt-get update` runs only when a package must be installed and apt knows no version that
//! would do.
//!
//! Installs go through `apt-get install` (a `source:` .deb as a local file), removals through
//! `dpkg --remove` (as PackageKit, which refuses to remove what other packages depend on).
//! The watch is inotify on `/var/lib/dpkg/status`, which dpkg rewrites (by rename) whenever
//! a package changes: a package removed by hand is put back on the next check.

use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use crate::engine::artifacts::ArtifactFile;
use crate::engine::fs_events::FsEvents;
use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Output;
use tokio_util::sync::CancellationToken;

/// The file dpkg rewrites whenever a package is installed, removed or changes state.
pub const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// What mgmt's `state` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PkgState {
    /// Any version (mgmt's default).
    #[default]
    Installed,
    Uninstalled,
    /// The newest version apt knows of (apt's candidate).
    Newest,
    /// Exactly this version.
    Version(String),
}

impl PkgState {
    /// As written in a graph: `installed`, `uninstalled`, `newest`, or a version.
    pub fn parse(s: &str) -> Result<PkgState, String> {
        Ok(match s {
            "installed" => PkgState::Installed,
            "uninstalled" => PkgState::Uninstalled,
            "newest" => PkgState::Newest,
            "" => return Err("pkg state must not be empty".into()),
            "latest" => {
                return Err("pkg state `latest` is not valid: did you mean `newest`?".into());
            }
            v if valid_version(v) => PkgState::Version(v.to_string()),
            v => {
                return Err(format!(
                    "pkg state `{v}` is not installed, uninstalled, newest or a Debian version \
                     (digits first; letters, digits and . + ~ - : only)"
                ));
            }
        })
    }
}

/// A Debian version: `[epoch:]upstream[-revision]`, starting with a digit (Debian policy 5.6.12).
pub fn valid_version(v: &str) -> bool {
    let upstream = v.split_once(':').map_or(v, |(epoch, rest)| {
        if epoch.chars().all(|c| c.is_ascii_digit()) && !epoch.is_empty() {
            rest
        } else {
            ""
        }
    });
    upstream.starts_with(|c: char| c.is_ascii_digit())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~-:".contains(c))
}

/// A Debian package name (Debian policy 5.6.1), optionally with `:arch`. Never starts with
/// `-`, so it is never taken for an option.
pub fn valid_name(name: &str) -> bool {
    let (pkg, arch) = match name.split_once(':') {
        Some((p, a)) => (p, Some(a)),
        None => (name, None),
    };
    pkg.len() >= 2
        && pkg.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && pkg
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
        && arch.is_none_or(|a| {
            !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PkgSpec {
    /// The package, as apt names it.
    pub name: String,
    #[serde(default)]
    pub state: PkgState,
    /// A .deb on the initiator (an artifact), installed instead of one from apt's sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A version lower than the installed one may be installed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allowdowngrade: bool,
    /// Packages from sources apt cannot authenticate may be installed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allowuntrusted: bool,
    /// Packages from non-free components (non-free, non-free-firmware, contrib, restricted,
    /// multiverse) may be installed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allownonfree: bool,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

/// One package as dpkg knows it on this host (`dpkg-query -W`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub version: String,
    pub section: String,
}

/// Parses `dpkg-query -W -f '${db:Status-Status}\t${Version}\t${Section}\n' NAME`: the
/// installed package, if any line says `installed` (a multi-arch name may give several
/// lines; `config-files`, `half-installed` and the like are not installed).
pub fn parse_dpkg_query(out: &str) -> Option<Installed> {
    out.lines().find_map(|line| {
        let mut f = line.split('\t');
        let (status, version) = (f.next()?.trim(), f.next()?.trim());
        (status == "installed" && !version.is_empty()).then(|| Installed {
            version: version.to_string(),
            section: f.next().unwrap_or("").trim().to_string(),
        })
    })
}

/// What `apt-cache policy NAME` says: the candidate and every version apt knows of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub candidate: Option<String>,
    pub versions: Vec<String>,
}

/// Parses `apt-cache policy NAME` (empty output: apt knows no such package).
pub fn parse_policy(out: &str) -> Policy {
    let mut policy = Policy::default();
    let mut in_table = false;
    for line in out.lines() {
        let t = line.trim();
        if let Some(c) = t.strip_prefix("Candidate:") {
            let c = c.trim();
            if c != "(none)" && !c.is_empty() {
                policy.candidate = Some(c.to_string());
            }
        } else if t == "Version table:" {
            in_table = true;
        } else if in_table {
            // Versions are indented 5 (or `*** ` for the installed one); their sources 8.
            let indent = line.len() - line.trim_start().len();
            let t = t.strip_prefix("*** ").unwrap_or(t);
            if indent <= 5
                && let Some(v) = t.split_whitespace().next()
            {
                policy.versions.push(v.to_string());
            }
        }
    }
    policy
}

/// Whether a Debian section is in a component mgmt's PackageKit filter calls non-free.
pub fn non_free(section: &str) -> bool {
    matches!(
        section.split_once('/').map(|(c, _)| c),
        Some("non-free" | "non-free-firmware" | "contrib" | "restricted" | "multiverse")
    )
}

/// What a check decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    /// `apt-get install` of the package from apt's sources, at this version if given.
    Install {
        version: Option<String>,
        downgrade: bool,
    },
    /// `apt-get install` of the source .deb.
    InstallDeb,
    Remove,
    /// apt knows no version that would do: `apt-get update`, then plan again (once).
    UpdateLists,
}

/// The .deb of a `source:`: what `dpkg-deb -f` says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deb {
    pub package: String,
    pub version: String,
}

/// Decides what to do for `spec` given what is installed, what apt knows (`None`: not asked
/// yet, nor needed), the source .deb, and whether the lists were already updated in this
/// check. `newer(a, b)` says whether version `a` is greater than `b` (dpkg's order).
pub fn plan(
    spec: &PkgSpec,
    installed: Option<&Installed>,
    policy: Option<&Policy>,
    deb: Option<&Deb>,
    updated: bool,
    newer: &dyn Fn(&str, &str) -> bool,
) -> anyhow::Result<Plan> {
    let name = &spec.name;
    if let Some(i) = installed
        && !spec.allownonfree
        && spec.state != PkgState::Uninstalled
        && non_free(&i.section)
    {
        bail!(
            "{name} is installed from a non-free component (section {}); set allownonfree to \
             manage it",
            i.section
        );
    }
    if let Some(deb) = deb
        && deb.package != *name
    {
        bail!("the source .deb is package `{}`, not `{name}`", deb.package);
    }
    let missing = |what: &str| -> anyhow::Result<Plan> {
        if updated {
            bail!("apt knows no {what} of {name} on this host, even after apt-get update");
        }
        Ok(Plan::UpdateLists)
    };
    match (&spec.state, installed) {
        (PkgState::Uninstalled, None) => Ok(Plan::Nothing),
        (PkgState::Uninstalled, Some(_)) => Ok(Plan::Remove),
        (PkgState::Installed, Some(_)) => Ok(Plan::Nothing),
        (PkgState::Installed, None) if deb.is_some() => Ok(Plan::InstallDeb),
        (PkgState::Version(v), Some(i)) if *v == i.version => Ok(Plan::Nothing),
        (PkgState::Version(v), i) => {
            let downgrade = i.is_some_and(|i| newer(&i.version, v));
            if downgrade && !spec.allowdowngrade {
                bail!(
                    "{name} {} is installed, higher than {v}: set allowdowngrade to install {v}",
                    i.map(|i| i.version.as_str()).unwrap_or_default()
                );
            }
            if let Some(deb) = deb {
                if deb.version != *v {
                    bail!(
                        "the source .deb is {name} {}, not the version {v} state asks for",
                        deb.version
                    );
                }
                return Ok(Plan::InstallDeb);
            }
            match policy {
                Some(p) if p.versions.iter().any(|have| have == v) => Ok(Plan::Install {
                    version: Some(v.clone()),
                    downgrade,
                }),
                _ => missing(&format!("version {v}")),
            }
        }
        (PkgState::Installed, None) => match policy.and_then(|p| p.candidate.as_ref()) {
            Some(_) => Ok(Plan::Install {
                version: None,
                downgrade: false,
            }),
            None => missing("version"),
        },
        (PkgState::Newest, i) => match (policy.and_then(|p| p.candidate.as_ref()), i) {
            (Some(c), Some(i)) if *c == i.version => Ok(Plan::Nothing),
            // A newer version installed than apt offers (a local build): it is the newest.
            (Some(c), Some(i)) if newer(&i.version, c) => Ok(Plan::Nothing),
            (Some(c), _) => Ok(Plan::Install {
                version: Some(c.clone()),
                downgrade: false,
            }),
            (None, Some(_)) => Ok(Plan::Nothing),
            (None, None) => missing("version"),
        },
    }
}

/// Serializes this host's dpkg and apt runs: resources are checked concurrently, and dpkg
/// takes one lock.
static APT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a program to its end (killed if the check is dropped: on a timeout or shutdown), its
/// output captured.
pub(super) async fn output(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    run(program, args, true).await
}

/// Runs a program to its end, its output captured; `kill` says whether it dies with the check
/// (dpkg and apt-get changing packages are left to finish: killed halfway they would leave
/// packages half-installed).
async fn run(program: &str, args: &[&str], kill: bool) -> anyhow::Result<Output> {
    tokio::process::Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(kill)
        .output()
        .await
        .with_context(|| format!("run {program}"))
}

/// The last lines of a failed command's output, for its error.
pub(super) fn failed(what: &str, out: &Output) -> anyhow::Error {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(6)..].join("\n  ");
    anyhow::anyhow!("`{what}` failed ({}):\n  {tail}", out.status)
}

/// A query (killed with the check) that must succeed.
async fn checked(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    succeeded(program, args, output(program, args).await?)
}

/// A change to the packages (left to finish if the check is dropped) that must succeed.
async fn changed(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    succeeded(program, args, run(program, args, false).await?)
}

fn succeeded(program: &str, args: &[&str], out: Output) -> anyhow::Result<Output> {
    if !out.status.success() {
        return Err(failed(&format!("{program} {}", args.join(" ")), &out));
    }
    Ok(out)
}

pub struct PkgResource {
    id: ResourceId,
    spec: PkgSpec,
    fs: FsEvents,
    /// The blob of `spec.source` on this host, if it was given one.
    artifact: Option<ArtifactFile>,
    /// dpkg's status file, watched ([`DPKG_STATUS`]; another in tests).
    status: std::path::PathBuf,
}

impl PkgResource {
    pub fn new(spec: PkgSpec, fs: FsEvents, artifact: Option<ArtifactFile>) -> Self {
        PkgResource {
            id: ResourceId::new(Kind::Pkg, spec.name.clone()),
            spec,
            fs,
            artifact,
            status: DPKG_STATUS.into(),
        }
    }

    async fn installed(&self) -> anyhow::Result<Option<Installed>> {
        let out = output(
            "dpkg-query",
            &[
                "-W",
                "-f",
                "${db:Status-Status}\t${Version}\t${Section}\n",
                &self.spec.name,
            ],
        )
        .await?;
        // Exit 1 with "no packages found": dpkg never heard of it.
        if !out.status.success() && !out.stdout.is_empty() {
            return Err(failed("dpkg-query", &out));
        }
        Ok(parse_dpkg_query(&String::from_utf8_lossy(&out.stdout)))
    }

    async fn policy(&self) -> anyhow::Result<Policy> {
        let out = checked("apt-cache", &["policy", &self.spec.name]).await?;
        Ok(parse_policy(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The candidate's (or `version`'s) section, from apt's lists, for the non-free check.
    async fn section(&self, version: Option<&str>) -> anyhow::Result<String> {
        let target = match version {
            Some(v) => format!("{}={v}", self.spec.name),
            None => self.spec.name.clone(),
        };
        let out = checked("apt-cache", &["show", "--no-all-versions", &target]).await?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Section:"))
            .unwrap_or("")
            .trim()
            .to_string())
    }

    /// The source .deb, verified, copied into a private temp dir under a name apt takes as
    /// a file (`NAME.deb`), and what it says it is.
    async fn deb(&self) -> anyhow::Result<Option<(tempfile::TempDir, Deb)>> {
        let Some(source) = &self.spec.source else {
            return Ok(None);
        };
        let Some(artifact) = self.artifact.clone() else {
            bail!(
                "source `{source}`: this host was given no artifact for it (sources are copied \
                 when the run starts: a source added by a live edit needs a restart)"
            );
        };
        let name = self.spec.name.replace(':', "_");
        let (dir, path) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let bytes = artifact.read_verified()?;
            let dir = tempfile::Builder::new().prefix("arbor-pkg-").tempdir()?;
            let path = dir.path().join(format!("{name}.deb"));
            std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
            Ok((dir, path))
        })
        .await
        .context("reading the source .deb")??;
        let path = path.to_string_lossy().into_owned();
        let out = checked("dpkg-deb", &["-f", &path, "Package", "Version"])
            .await
            .with_context(|| format!("source `{source}` is not a .deb"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |f: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{f}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        Ok(Some((
            dir,
            Deb {
                package: field("Package"),
                version: field("Version"),
            },
        )))
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        if !Path::new("/usr/bin/dpkg-query").exists() {
            if Path::new("/usr/bin/rpm").exists() {
                bail!("this host uses rpm: only dpkg/apt hosts are supported yet");
            }
            bail!("this host has no dpkg: only Debian-family (dpkg/apt) hosts are supported");
        }
        let _apt = APT.lock().await;
        let name = &self.spec.name;
        let installed = self.installed().await?;
        // Already right whatever apt or a source .deb would say: neither is read.
        let right = matches!(
            (&self.spec.state, &installed),
            (PkgState::Uninstalled, None) | (PkgState::Installed, Some(_))
        ) || matches!(
            (&self.spec.state, &installed),
            (PkgState::Version(v), Some(i)) if *v == i.version
        );
        let deb = if right { None } else { self.deb().await? };
        let needs_policy =
            !right && deb.is_none() && !matches!(self.spec.state, PkgState::Uninstalled);
        let policy = if needs_policy {
            Some(self.policy().await?)
        } else {
            None
        };
        let deb_info = deb.as_ref().map(|(_, d)| d);
        let mut step = plan(
            &self.spec,
            installed.as_ref(),
            policy.as_ref(),
            deb_info,
            false,
            &dpkg_newer,
        )?;
        let was = installed.as_ref().map_or("not installed".to_string(), |i| {
            format!("{} installed", i.version)
        });
        if step == Plan::Nothing {
            return Ok(Outcome::Unchanged);
        }
        if ctx.noop {
            let would = match &step {
                Plan::Remove => format!("would remove {name} ({was})"),
                Plan::InstallDeb => format!(
                    "would install {name} {} from its source .deb ({was})",
                    deb_info.map(|d| d.version.as_str()).unwrap_or_default()
                ),
                Plan::Install {
                    version: Some(v), ..
                } => format!("would install {name} {v} ({was})"),
                Plan::Install { version: None, .. } | Plan::UpdateLists => {
                    format!("would install {name} ({was})")
                }
                Plan::Nothing => unreachable!(),
            };
            return Ok(Outcome::WouldChange(would));
        }
        if step == Plan::UpdateLists {
            tracing::info!(
                "{}: apt knows no version that would do: apt-get update",
                self.id
            );
            changed("apt-get", &["-q", "update"]).await?;
            let policy = self.policy().await?;
            step = plan(
                &self.spec,
                installed.as_ref(),
                Some(&policy),
                deb_info,
                true,
                &dpkg_newer,
            )?;
        }
        let mut apt = vec![
            "-q",
            "-y",
            "-o",
            "DPkg::Lock::Timeout=60",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ];
        if self.spec.allowuntrusted {
            apt.extend(["-o", "APT::Get::AllowUnauthenticated=true"]);
        }
        apt.push("install");
        let done = match &step {
            Plan::Nothing | Plan::UpdateLists => return Ok(Outcome::Unchanged),
            Plan::Remove => {
                changed("dpkg", &["--remove", name]).await?;
                format!("removed {name} ({was})")
            }
            Plan::InstallDeb => {
                let (dir, deb) = deb.as_ref().context("no source .deb")?;
                let path = dir.path().join(format!("{}.deb", name.replace(':', "_")));
                let path = path.to_string_lossy().into_owned();
                if self.spec.allowdowngrade {
                    apt.push("--allow-downgrades");
                }
                apt.push(&path);
                changed("apt-get", &apt).await?;
                format!(
                    "installed {name} {} from its source .deb ({was})",
                    deb.version
                )
            }
            Plan::Install { version, downgrade } => {
                if !self.spec.allownonfree {
                    let section = self.section(version.as_deref()).await?;
                    if non_free(&section) {
                        bail!(
                            "{name} is in a non-free component (section {section}); set \
                             allownonfree to install it"
                        );
                    }
                }
                let target = match version {
                    Some(v) => format!("{name}={v}"),
                    None => name.clone(),
                };
                if *downgrade {
                    apt.push("--allow-downgrades");
                }
                apt.push(&target);
                changed("apt-get", &apt).await?;
                format!("installed {target} ({was})")
            }
        };
        // dpkg said it succeeded: check that it did what the state asks.
        let now = self.installed().await?;
        let reached = match (&self.spec.state, &now) {
            (PkgState::Uninstalled, None) => true,
            (PkgState::Uninstalled, Some(_)) => false,
            (PkgState::Version(v), Some(i)) => *v == i.version,
            (_, Some(_)) => true,
            (_, None) => false,
        };
        if !reached {
            bail!(
                "{done}, yet dpkg now says {}",
                now.map_or("not installed".to_string(), |i| format!(
                    "{} installed",
                    i.version
                ))
            );
        }
        Ok(Outcome::Changed(done))
    }
}

/// Whether version `a` is greater than `b` in dpkg's order (`dpkg --compare-versions`; the
/// planner asks at most twice a check, and only when a package is installed).
fn dpkg_newer(a: &str, b: &str) -> bool {
    std::process::Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .stdin(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Resource for PkgResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(self.check_apply_inner(ctx))
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            if !self.status.exists() {
                // Nothing to watch: the check says why the host is not supported.
                cancel.cancelled().await;
                return Ok(());
            }
            // dpkg rewrites it (by rename) several times a run; the scheduler coalesces pokes.
            super::file::watch_path(&self.fs, &self.status, &cancel, || poke.poke()).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(state: PkgState) -> PkgSpec {
        PkgSpec {
            name: "hello".into(),
            state,
            ..PkgSpec::default()
        }
    }

    fn inst(v: &str) -> Installed {
        Installed {
            version: v.into(),
            section: "misc".into(),
        }
    }

    /// A stand-in for dpkg's order that is right for the versions used here.
    fn newer(a: &str, b: &str) -> bool {
        a > b
    }

    fn policy(candidate: Option<&str>, versions: &[&str]) -> Policy {
        Policy {
            candidate: candidate.map(Into::into),
            versions: versions.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn p(
        s: &PkgSpec,
        i: Option<&Installed>,
        pol: Option<&Policy>,
        deb: Option<&Deb>,
    ) -> anyhow::Result<Plan> {
        plan(s, i, pol, deb, false, &newer)
    }

    #[test]
    fn states_parse_as_mgmt_spells_them() {
        assert_eq!(PkgState::parse("installed"), Ok(PkgState::Installed));
        assert_eq!(PkgState::parse("uninstalled"), Ok(PkgState::Uninstalled));
        assert_eq!(PkgState::parse("newest"), Ok(PkgState::Newest));
        assert_eq!(
            PkgState::parse("1:2.10-3+deb12u1~bpo"),
            Ok(PkgState::Version("1:2.10-3+deb12u1~bpo".into()))
        );
        assert!(PkgState::parse("latest").unwrap_err().contains("newest"));
        assert!(PkgState::parse("").is_err());
        assert!(PkgState::parse("present").is_err());
        assert!(PkgState::parse("1.0 && rm").is_err());
        assert!(PkgState::parse("x:1.0").is_err());
    }

    #[test]
    fn names_are_debian_package_names_and_never_options() {
        for good in ["hello", "libc6", "g++", "python3.11", "libc6:amd64", "0ad"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "", "a", "-y", "--purge", "Hello", "a b", "x/y", "hello:", "a;b",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn dpkg_query_output_says_what_is_installed() {
        assert_eq!(
            parse_dpkg_query("installed\t2.10-3\tmisc\n"),
            Some(inst("2.10-3"))
        );
        // Removed but its configuration kept: not installed, as dpkg -l says `rc`.
        assert_eq!(parse_dpkg_query("config-files\t2.10-3\tmisc\n"), None);
        assert_eq!(parse_dpkg_query("not-installed\t\t\n"), None);
        assert_eq!(parse_dpkg_query("half-installed\t1\tmisc\n"), None);
        assert_eq!(parse_dpkg_query(""), None);
        // Multi-arch: one line per architecture.
        assert_eq!(
            parse_dpkg_query("not-installed\t\t\ninstalled\t1.2\tnon-free/libs\n"),
            Some(Installed {
                version: "1.2".into(),
                section: "non-free/libs".into()
            })
        );
    }

    #[test]
    fn apt_cache_policy_output_gives_the_candidate_and_the_versions() {
        let out = "hello:\n  Installed: 2.10-2\n  Candidate: 2.10-3\n  Version table:\n     \
                   2.10-3 500\n        500 http://deb.debian.org/debian bookworm/main amd64 \
                   Packages\n *** 2.10-2 100\n        100 /var/lib/dpkg/status\n";
        assert_eq!(
            parse_policy(out),
            policy(Some("2.10-3"), &["2.10-3", "2.10-2"])
        );
        let none = "hello:\n  Installed: (none)\n  Candidate: (none)\n  Version table:\n";
        assert_eq!(parse_policy(none), policy(None, &[]));
        assert_eq!(parse_policy(""), Policy::default());
    }

    #[test]
    fn installed_with_the_package_present_asks_apt_nothing() {
        // No policy given: the planner must not need one.
        assert_eq!(
            p(&spec(PkgState::Installed), Some(&inst("1.0")), None, None).unwrap(),
            Plan::Nothing
        );
        assert_eq!(
            p(&spec(PkgState::Uninstalled), None, None, None).unwrap(),
            Plan::Nothing
        );
        assert_eq!(
            p(
                &spec(PkgState::Version("1.0".into())),
                Some(&inst("1.0")),
                None,
                None
            )
            .unwrap(),
            Plan::Nothing
        );
    }

    #[test]
    fn missing_packages_are_installed_and_present_ones_removed() {
        let pol = policy(Some("1.1"), &["1.1", "1.0"]);
        assert_eq!(
            p(&spec(PkgState::Installed), None, Some(&pol), None).unwrap(),
            Plan::Install {
                version: None,
                downgrade: false
            }
        );
        assert_eq!(
            p(&spec(PkgState::Uninstalled), Some(&inst("1.0")), None, None).unwrap(),
            Plan::Remove
        );
        assert_eq!(
            p(
                &spec(PkgState::Newest),
                Some(&inst("1.0")),
                Some(&pol),
                None
            )
            .unwrap(),
            Plan::Install {
                version: Some("1.1".into()),
                downgrade: false
            }
        );
        assert_eq!(
            p(
                &spec(PkgState::Newest),
                Some(&inst("1.1")),
                Some(&pol),
                None
            )
            .unwrap(),
            Plan::Nothing
        );
        // A local build newer than anything apt offers is the newest.
        assert_eq!(
            p(
                &spec(PkgState::Newest),
                Some(&inst("2.0")),
                Some(&pol),
                None
            )
            .unwrap(),
            Plan::Nothing
        );
    }

    #[test]
    fn an_unknown_version_updates_the_lists_once_then_fails() {
        let none = policy(None, &[]);
        assert_eq!(
            p(&spec(PkgState::Installed), None, Some(&none), None).unwrap(),
            Plan::UpdateLists
        );
        let err = plan(
            &spec(PkgState::Installed),
            None,
            Some(&none),
            None,
            true,
            &newer,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("even after apt-get update"), "{err}");
        let v = spec(PkgState::Version("3.0".into()));
        let pol = policy(Some("1.1"), &["1.1"]);
        assert_eq!(p(&v, None, Some(&pol), None).unwrap(), Plan::UpdateLists);
    }

    #[test]
    fn a_lower_version_needs_allowdowngrade() {
        let mut v = spec(PkgState::Version("1.0".into()));
        let pol = policy(Some("1.1"), &["1.1", "1.0"]);
        let err = p(&v, Some(&inst("1.1")), Some(&pol), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("allowdowngrade"), "{err}");
        v.allowdowngrade = true;
        assert_eq!(
            p(&v, Some(&inst("1.1")), Some(&pol), None).unwrap(),
            Plan::Install {
                version: Some("1.0".into()),
                downgrade: true
            }
        );
    }

    #[test]
    fn a_source_deb_must_be_the_package_and_version_asked_for() {
        let deb = Deb {
            package: "hello".into(),
            version: "1.0".into(),
        };
        let mut s = spec(PkgState::Installed);
        s.source = Some("hello.deb".into());
        assert_eq!(p(&s, None, None, Some(&deb)).unwrap(), Plan::InstallDeb);
        assert_eq!(
            p(&s, Some(&inst("0.9")), None, Some(&deb)).unwrap(),
            Plan::Nothing
        );
        s.state = PkgState::Version("1.0".into());
        assert_eq!(
            p(&s, Some(&inst("0.9")), None, Some(&deb)).unwrap(),
            Plan::InstallDeb
        );
        s.state = PkgState::Version("2.0".into());
        assert!(p(&s, None, None, Some(&deb)).is_err());
        let other = Deb {
            package: "world".into(),
            version: "1.0".into(),
        };
        s.state = PkgState::Installed;
        let err = p(&s, None, None, Some(&other)).unwrap_err().to_string();
        assert!(err.contains("`world`"), "{err}");
    }

    #[tokio::test]
    async fn the_watch_pokes_when_dpkg_rewrites_its_status_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = dir.path().join("status");
        std::fs::write(&status, "Package: hello\n").expect("write");
        let fs = FsEvents::new().expect("inotify");
        let mut res = PkgResource::new(spec(PkgState::Installed), fs, None);
        res.status = status.clone();
        let res = std::sync::Arc::new(res);
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        // As dpkg does: status-new, then renamed over status.
        let new = dir.path().join("status-new");
        std::fs::write(&new, "Package: hello\nStatus: deinstall ok config-files\n").expect("write");
        std::fs::rename(&new, &status).expect("rename");
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("the rename pokes");
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    #[test]
    fn non_free_packages_need_allownonfree() {
        assert!(non_free("non-free/libs") && non_free("contrib/utils"));
        assert!(non_free("non-free-firmware/kernel"));
        assert!(!non_free("misc") && !non_free("libs"));
        let nf = Installed {
            version: "1".into(),
            section: "non-free/misc".into(),
        };
        let mut s = spec(PkgState::Installed);
        assert!(p(&s, Some(&nf), None, None).is_err());
        s.allownonfree = true;
        assert_eq!(p(&s, Some(&nf), None, None).unwrap(), Plan::Nothing);
        // Removing is always allowed.
        assert_eq!(
            p(&spec(PkgState::Uninstalled), Some(&nf), None, None).unwrap(),
            Plan::Remove
        );
    }
}
