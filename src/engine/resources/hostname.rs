//! `hostname`: the host's pretty, static and transient names.
//!
//! After mgmt's hostname resource (engine/resources/hostname.go): `hostname` (the resource's
//! name when missing) is the value of each of `pretty_hostname`, `static_hostname` and
//! `transient_hostname` that is not given; one given as `""` is not managed. The graph parser
//! resolves that, so a spec holds the three names to keep (`None`: not managed).
//!
//! Where they live, as systemd-hostnamed keeps them: the pretty name in `/etc/machine-info`
//! (`PRETTY_HOSTNAME=`), the static one in `/etc/hostname`, the transient one in the kernel
//! (`/proc/sys/kernel/hostname`, what `hostname` prints). The check reads those. On a host
//! running systemd (`/run/systemd/system` exists), changes go through `hostnamectl` (so
//! hostnamed, as mgmt goes through its D-Bus API); elsewhere arbor writes the files itself and
//! sets the kernel's name. After applying, the names are read again: one that did not take
//! (hostnamed keeps the transient name equal to a set static one) fails the resource, naming
//! it, rather than being reported as done.
//!
//! The watch: inotify on `/etc/hostname` and `/etc/machine-info`, and the kernel's own
//! notification on `/proc/sys/kernel/hostname` (it wakes `poll` with `POLLPRI` when
//! `sethostname()` runs, by hostnamed or by hand), so nothing is polled and no D-Bus
//! connection is needed: hostnamed's PropertiesChanged signals, which mgmt listens to, follow
//! exactly these three. The kernel's notification is not per UTS namespace (a container
//! setting its own name wakes it too); such a wake-up costs one check that reads three small
//! files and finds nothing to do.

use super::accounts::{ToolRun, find_tool, watch_files};
use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use crate::engine::fs_events::FsEvents;
use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

pub const ETC_HOSTNAME: &str = "/etc/hostname";
pub const ETC_MACHINE_INFO: &str = "/etc/machine-info";
pub const KERNEL_HOSTNAME: &str = "/proc/sys/kernel/hostname";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostnameSpec {
    pub name: String,
    /// Each `None` is not managed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transient: Option<String>,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

/// A name systemd-hostnamed takes as a static or transient host name (its
/// `hostname_is_valid`): 1 to 64 characters of letters, digits, `-`, `_` and `.`, with no
/// empty label.
pub fn valid_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.split('.').all(|label| !label.is_empty())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// The three names as the host has them (empty when unset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub pretty: String,
    pub static_name: String,
    pub transient: String,
}

/// One of the three names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Pretty,
    Static,
    Transient,
}

impl Which {
    fn field(self) -> &'static str {
        match self {
            Which::Pretty => "pretty_hostname",
            Which::Static => "static_hostname",
            Which::Transient => "transient_hostname",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Which::Pretty => "--pretty",
            Which::Static => "--static",
            Which::Transient => "--transient",
        }
    }
}

/// The names that differ from the spec, in the order mgmt sets them: pretty, static,
/// transient; with the value wanted.
pub fn differences(spec: &HostnameSpec, have: &Names) -> Vec<(Which, String)> {
    [
        (Which::Pretty, &spec.pretty, &have.pretty),
        (Which::Static, &spec.static_name, &have.static_name),
        (Which::Transient, &spec.transient, &have.transient),
    ]
    .into_iter()
    .filter_map(|(which, want, have)| match want {
        Some(want) if want != have => Some((which, want.clone())),
        _ => None,
    })
    .collect()
}

/// The `hostnamectl` command that sets one name (systemd 249 and later spell it
/// `hostname`; earlier ones `set-hostname`, which later ones still take).
pub fn hostnamectl(which: Which, value: &str) -> ToolRun {
    ToolRun::new(
        "hostnamectl",
        vec![which.flag().into(), "set-hostname".into(), value.into()],
    )
}

/// `/etc/hostname`'s name: its first line that is not a comment, trimmed.
pub fn parse_etc_hostname(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default()
        .to_string()
}

/// `PRETTY_HOSTNAME` of `/etc/machine-info` (an env file: the value may be quoted).
pub fn parse_pretty(machine_info: &str) -> String {
    let Some(raw) = machine_info.lines().find_map(|l| {
        l.trim()
            .strip_prefix("PRETTY_HOSTNAME=")
            .map(str::to_string)
    }) else {
        return String::new();
    };
    let raw = raw.trim();
    let mut out = String::new();
    let mut chars = raw.chars();
    let quote = match raw.chars().next() {
        Some(q @ ('"' | '\'')) => {
            chars.next();
            Some(q)
        }
        _ => None,
    };
    while let Some(c) = chars.next() {
        match (c, quote) {
            (q, Some(end)) if q == end => break,
            ('\\', Some('\'')) => out.push('\\'),
            ('\\', _) => {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            (c, _) => out.push(c),
        }
    }
    out
}

/// `/etc/machine-info` with `PRETTY_HOSTNAME` set to `value` (quoted as hostnamed writes
/// it), other lines kept.
pub fn with_pretty(machine_info: &str, value: &str) -> String {
    let mut quoted = String::from("\"");
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '`' | '$') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    let mut out: Vec<String> = machine_info
        .lines()
        .filter(|l| !l.trim().starts_with("PRETTY_HOSTNAME="))
        .map(str::to_string)
        .collect();
    out.push(format!("PRETTY_HOSTNAME={quoted}"));
    out.join("\n") + "\n"
}

pub struct HostnameResource {
    id: ResourceId,
    spec: HostnameSpec,
    fs: FsEvents,
    etc_hostname: PathBuf,
    machine_info: PathBuf,
}

async fn read_or_empty(path: &Path) -> anyhow::Result<String> {
    match tokio::fs::read_to_string(path).await {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `path` whole: a temporary file beside it, renamed over it.
async fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("arbor-tmp");
    tokio::fs::write(&tmp, text)
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    let perms = std::os::unix::fs::PermissionsExt::from_mode(0o644);
    tokio::fs::set_permissions(&tmp, perms)
        .await
        .with_context(|| format!("chmod {}", tmp.display()))?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

impl HostnameResource {
    pub fn new(spec: HostnameSpec, fs: FsEvents) -> Self {
        HostnameResource {
            id: ResourceId::new(Kind::Hostname, spec.name.clone()),
            spec,
            fs,
            etc_hostname: PathBuf::from(ETC_HOSTNAME),
            machine_info: PathBuf::from(ETC_MACHINE_INFO),
        }
    }

    /// For tests: the files elsewhere than /etc (the kernel's name is still the real one).
    #[cfg(test)]
    pub fn with_files(mut self, etc_hostname: &Path, machine_info: &Path) -> Self {
        self.etc_hostname = etc_hostname.to_path_buf();
        self.machine_info = machine_info.to_path_buf();
        self
    }

    async fn read(&self) -> anyhow::Result<Names> {
        Ok(Names {
            pretty: parse_pretty(&read_or_empty(&self.machine_info).await?),
            static_name: parse_etc_hostname(&read_or_empty(&self.etc_hostname).await?),
            transient: read_or_empty(Path::new(KERNEL_HOSTNAME))
                .await?
                .trim()
                .to_string(),
        })
    }

    /// Sets one name without systemd: the files hostnamed would write, and sethostname().
    async fn set_directly(&self, which: Which, value: &str) -> anyhow::Result<String> {
        match which {
            Which::Pretty => {
                let old = read_or_empty(&self.machine_info).await?;
                write_atomic(&self.machine_info, &with_pretty(&old, value)).await?;
                Ok(format!("wrote {}", self.machine_info.display()))
            }
            Which::Static => {
                write_atomic(&self.etc_hostname, &format!("{value}\n")).await?;
                Ok(format!("wrote {}", self.etc_hostname.display()))
            }
            Which::Transient => {
                tokio::fs::write(KERNEL_HOSTNAME, value)
                    .await
                    .with_context(|| format!("sethostname {value} ({KERNEL_HOSTNAME})"))?;
                Ok("sethostname".into())
            }
        }
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        let have = self.read().await?;
        let diffs = differences(&self.spec, &have);
        if diffs.is_empty() {
            return Ok(Outcome::Unchanged);
        }
        let current = |w: Which| match w {
            Which::Pretty => &have.pretty,
            Which::Static => &have.static_name,
            Which::Transient => &have.transient,
        };
        let what: Vec<String> = diffs
            .iter()
            .map(|(w, want)| format!("{} `{}` → `{want}`", w.field(), current(*w)))
            .collect();
        let what = format!("set {}", what.join(", "));
        if ctx.noop {
            return Ok(Outcome::WouldChange(format!("would {what}")));
        }
        let systemd =
            Path::new("/run/systemd/system").is_dir() && find_tool("hostnamectl").is_some();
        let mut how = Vec::new();
        for (which, want) in &diffs {
            if systemd {
                let run = hostnamectl(*which, want);
                run.run().await?;
                how.push(run.display());
            } else {
                how.push(self.set_directly(*which, want).await?);
            }
        }
        let after = self.read().await?;
        if let Some((which, want)) = differences(&self.spec, &after).into_iter().next() {
            let now = match which {
                Which::Pretty => &after.pretty,
                Which::Static => &after.static_name,
                Which::Transient => &after.transient,
            };
            let why = if which == Which::Transient && systemd && !after.static_name.is_empty() {
                " (systemd-hostnamed keeps the transient name equal to the static one while \
                 that is set)"
            } else {
                ""
            };
            bail!(
                "{} is `{now}` after `{}`, not `{want}`{why}",
                which.field(),
                how.join("; ")
            );
        }
        Ok(Outcome::Changed(format!("{what} ({})", how.join("; "))))
    }

    async fn watch_inner(&self, poke: Poke, cancel: CancellationToken) -> anyhow::Result<()> {
        let files: [&Path; 2] = [&self.etc_hostname, &self.machine_info];
        tokio::try_join!(
            watch_files(&self.fs, &files, &poke, &cancel),
            watch_kernel_hostname(&poke, &cancel),
        )?;
        Ok(())
    }
}

/// Pokes whenever the kernel's host name is set: `/proc/sys/kernel/hostname` wakes `poll`
/// with `POLLPRI` on each `sethostname()` (in any UTS namespace: the check sorts it out).
async fn watch_kernel_hostname(poke: &Poke, cancel: &CancellationToken) -> anyhow::Result<()> {
    let file = std::fs::File::open(KERNEL_HOSTNAME)
        .with_context(|| format!("opening {KERNEL_HOSTNAME}"))?;
    // SAFETY: the File owns its descriptor, which stays open (and the same) until the
    // AsyncFd, which owns the File, is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) }
        .map_err(|e| anyhow::anyhow!("watching {KERNEL_HOSTNAME}: {e}"))?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            ready = fd.ready(Interest::PRIORITY) => {
                let mut guard = ready.with_context(|| format!("watching {KERNEL_HOSTNAME}"))?;
                guard.clear_ready();
                poke.poke();
            }
        }
    }
}

impl Resource for HostnameResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(self.check_apply_inner(ctx))
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.watch_inner(poke, cancel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn noop_reads_the_files_and_the_watch_sees_them_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (etc_hostname, machine_info) = (dir.path().join("hostname"), dir.path().join("info"));
        std::fs::write(&etc_hostname, "old\n").expect("hostname");
        let spec = HostnameSpec {
            name: "h".into(),
            pretty: Some("Pretty".into()),
            static_name: Some("new".into()),
            transient: None,
            ..HostnameSpec::default()
        };
        let fs = FsEvents::new().expect("inotify");
        let res = std::sync::Arc::new(
            HostnameResource::new(spec, fs).with_files(&etc_hostname, &machine_info),
        );
        assert_eq!(res.id().to_string(), "hostname[h]");
        let noop = ApplyContext {
            noop: true,
            refresh: false,
        };
        assert_eq!(
            res.check_apply(noop).await.expect("check"),
            Outcome::WouldChange(
                "would set pretty_hostname `` → `Pretty`, static_hostname `old` → `new`".into()
            )
        );
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        while rx.try_recv().is_ok() {}
        std::fs::write(&machine_info, "PRETTY_HOSTNAME=Pretty\n").expect("info");
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("machine-info pokes");
        std::fs::write(&etc_hostname, "new\n").expect("hostname");
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("/etc/hostname pokes");
        assert_eq!(
            res.check_apply(noop).await.expect("check"),
            Outcome::Unchanged
        );
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    #[test]
    fn host_names_are_checked_as_hostnamed_does() {
        for ok in [
            "web1",
            "test.hostname.example.com",
            "a_b-c",
            &"a".repeat(64),
        ] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            ".lead",
            "trail.",
            "a..b",
            "ä",
            "x/y",
            &"a".repeat(65),
        ] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn only_managed_names_that_differ_are_set_in_mgmts_order() {
        let spec = HostnameSpec {
            name: "h".into(),
            pretty: Some("Web One".into()),
            static_name: Some("web1".into()),
            transient: None,
            ..HostnameSpec::default()
        };
        let have = Names {
            pretty: String::new(),
            static_name: "old".into(),
            transient: "whatever".into(),
        };
        assert_eq!(
            differences(&spec, &have),
            [
                (Which::Pretty, "Web One".to_string()),
                (Which::Static, "web1".to_string())
            ]
        );
        let right = Names {
            pretty: "Web One".into(),
            static_name: "web1".into(),
            transient: "other".into(),
        };
        assert!(differences(&spec, &right).is_empty());
        assert_eq!(
            hostnamectl(Which::Transient, "web1").display(),
            "hostnamectl --transient set-hostname web1"
        );
        assert_eq!(
            hostnamectl(Which::Pretty, "Web One").display(),
            "hostnamectl --pretty set-hostname 'Web One'"
        );
    }

    #[test]
    fn the_files_hostnamed_keeps_read_and_write_back() {
        assert_eq!(parse_etc_hostname("# comment\n\n  web1  \nother\n"), "web1");
        assert_eq!(parse_etc_hostname(""), "");
        let info = "ICON_NAME=computer\nPRETTY_HOSTNAME=\"My \\\"Box\\\" \\$1\"\n";
        assert_eq!(parse_pretty(info), "My \"Box\" $1");
        assert_eq!(parse_pretty("PRETTY_HOSTNAME=plain\n"), "plain");
        assert_eq!(
            parse_pretty("PRETTY_HOSTNAME='single \\ q'\n"),
            "single \\ q"
        );
        assert_eq!(parse_pretty("CHASSIS=vm\n"), "");
        let written = with_pretty(info, "New `one`");
        assert_eq!(
            written,
            "ICON_NAME=computer\nPRETTY_HOSTNAME=\"New \\`one\\`\"\n"
        );
        assert_eq!(parse_pretty(&written), "New `one`");
        assert_eq!(with_pretty("", "x"), "PRETTY_HOSTNAME=\"x\"\n");
    }
}
