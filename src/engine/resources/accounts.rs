//! What `user` and `group` share: the account files as the host has them, and running the
//! host's own tools (`useradd`, `groupmod`, …) to change them.
//!
//! Accounts are read from `/etc/passwd` and `/etc/group`, the files those tools change (not
//! from other NSS sources such as LDAP, which they do not manage either). Each check reads
//! them afresh; a watch is inotify on the files (through `/etc`, so the tools' rename into
//! place is seen).

use crate::engine::fs_events::FsEvents;
use crate::engine::resources::{Outcome, Poke};
use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// What one check of a user or group found: in its state, or a command that puts it there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Unchanged,
    Run { what: String, run: ToolRun },
}

impl Plan {
    /// Runs the command (or, under noop, says what it would do).
    pub async fn carry_out(self, noop: bool) -> anyhow::Result<Outcome> {
        match self {
            Plan::Unchanged => Ok(Outcome::Unchanged),
            Plan::Run { what, .. } if noop => Ok(Outcome::WouldChange(format!("would {what}"))),
            Plan::Run { what, run } => {
                run.run().await?;
                Ok(Outcome::Changed(format!("{what}: {}", run.display())))
            }
        }
    }
}

pub const ETC_PASSWD: &str = "/etc/passwd";
pub const ETC_GROUP: &str = "/etc/group";

/// `state:` of a user or group. mgmt has no default: the graph parser requires one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountState {
    #[default]
    Exists,
    Absent,
}

/// One line of `/etc/passwd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
}

/// One line of `/etc/group`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupEntry {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

/// The host's users and groups at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accounts {
    pub users: Vec<PasswdEntry>,
    pub groups: Vec<GroupEntry>,
}

impl Accounts {
    /// Parses the text of `/etc/passwd` and `/etc/group`. Comments, blank lines, NIS `+`/`-`
    /// lines and malformed lines are skipped, as the C library does.
    pub fn parse(passwd: &str, group: &str) -> Accounts {
        let users = passwd
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() < 7 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                    return None;
                }
                Some(PasswdEntry {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                    shell: f[6].to_string(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() < 4 || f[0].is_empty() || f[0].starts_with(['#', '+', '-']) {
                    return None;
                }
                Some(GroupEntry {
                    name: f[0].to_string(),
                    gid: f[2].parse().ok()?,
                    members: f[3]
                        .split(',')
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect(),
                })
            })
            .collect();
        Accounts { users, groups }
    }

    /// Reads the host's files.
    pub async fn read(passwd: &Path, group: &Path) -> anyhow::Result<Accounts> {
        let p = tokio::fs::read_to_string(passwd)
            .await
            .with_context(|| format!("reading {}", passwd.display()))?;
        let g = tokio::fs::read_to_string(group)
            .await
            .with_context(|| format!("reading {}", group.display()))?;
        Ok(Accounts::parse(&p, &g))
    }

    pub fn user(&self, name: &str) -> Option<&PasswdEntry> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn user_by_uid(&self, uid: u32) -> Option<&PasswdEntry> {
        self.users.iter().find(|u| u.uid == uid)
    }

    pub fn group(&self, name: &str) -> Option<&GroupEntry> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn group_by_gid(&self, gid: u32) -> Option<&GroupEntry> {
        self.groups.iter().find(|g| g.gid == gid)
    }

    /// The supplementary groups of `user` (whose primary group is `gid`), sorted.
    pub fn supplementary(&self, user: &str, gid: u32) -> Vec<String> {
        let mut names: Vec<String> = self
            .groups
            .iter()
            .filter(|g| g.gid != gid && g.members.iter().any(|m| m == user))
            .map(|g| g.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// As mgmt (and systemd's strict rule, https://systemd.io/USER_NAMES/): a letter or `_`, then
/// up to 30 letters, digits, `_` or `-`. Used for group names too.
pub fn valid_account_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && s.len() <= 31
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A command of the host's to run: a tool and its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolRun {
    pub tool: &'static str,
    pub args: Vec<String>,
}

impl ToolRun {
    pub fn new(tool: &'static str, args: Vec<String>) -> Self {
        ToolRun { tool, args }
    }

    /// As a shell would show it, for messages.
    pub fn display(&self) -> String {
        let mut s = self.tool.to_string();
        for a in &self.args {
            s.push(' ');
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./,:=@+".contains(c))
            {
                s.push_str(a);
            } else {
                s.push('\'');
                s.push_str(&a.replace('\'', r"'\''"));
                s.push('\'');
            }
        }
        s
    }

    /// Runs it and fails with its exit status and what it printed on stderr.
    pub async fn run(&self) -> anyhow::Result<()> {
        let path = find_tool(self.tool)
            .with_context(|| format!("`{}`: {} not found", self.display(), self.tool))?;
        let out = tokio::process::Command::new(&path)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running `{}`", self.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let err = err.trim();
            match out.status.code() {
                Some(code) => bail!(
                    "`{}` exited with code {code}{}{err}",
                    self.display(),
                    if err.is_empty() { "" } else { ": " }
                ),
                None => bail!("`{}` was killed by a signal", self.display()),
            }
        }
        Ok(())
    }
}

/// The tool on `PATH`, or in the sbin directories, where the account tools live and which a
/// non-login `PATH` may lack.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Pokes for every change to any of `paths` (through their directories), until `cancel`.
pub async fn watch_files(
    fs: &FsEvents,
    paths: &[&Path],
    poke: &Poke,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let watches = paths
        .iter()
        .map(|p| async move { super::file::watch_path(fs, p, cancel, || poke.poke()).await });
    let results = futures::future::join_all(watches).await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        \n\
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
        alice:x:1001:1001:Alice,,,:/home/alice:/bin/bash\n\
        broken:x:notanumber:1::/:/bin/sh\n\
        +nisuser::::::\n";
    const GROUP: &str = "root:x:0:\n\
        daemon:x:1:\n\
        alice:x:1001:\n\
        wheel:x:10:alice,bob\n\
        audio:x:29:bob,alice\n\
        staff:x:50:\n";

    #[test]
    fn passwd_and_group_parse_and_odd_lines_are_skipped() {
        let a = Accounts::parse(PASSWD, GROUP);
        assert_eq!(
            a.users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(),
            ["root", "daemon", "alice"]
        );
        let alice = a.user("alice").expect("alice");
        assert_eq!((alice.uid, alice.gid), (1001, 1001));
        assert_eq!(
            (alice.home.as_str(), alice.shell.as_str()),
            ("/home/alice", "/bin/bash")
        );
        assert_eq!(a.user_by_uid(1).map(|u| u.name.as_str()), Some("daemon"));
        assert_eq!(a.group_by_gid(10).map(|g| g.name.as_str()), Some("wheel"));
        assert_eq!(a.group("wheel").map(|g| g.members.len()), Some(2));
        assert_eq!(a.supplementary("alice", 1001), ["audio", "wheel"]);
        assert_eq!(a.supplementary("bob", 29), ["wheel"]);
        assert!(a.supplementary("root", 0).is_empty());
    }

    #[test]
    fn account_names_follow_mgmts_rule() {
        for ok in ["alice", "_svc", "a-b_c9", &"a".repeat(31)] {
            assert!(valid_account_name(ok), "{ok}");
        }
        for bad in [
            "",
            "9lives",
            "-x",
            "a b",
            "a:b",
            "ä",
            "a.b",
            &"a".repeat(32),
        ] {
            assert!(!valid_account_name(bad), "{bad}");
        }
    }

    #[test]
    fn commands_display_as_a_shell_would_take_them() {
        let run = ToolRun::new(
            "usermod",
            vec![
                "--shell".into(),
                "/bin/my shell".into(),
                "--groups".into(),
                "".into(),
                "it's".into(),
            ],
        );
        assert_eq!(
            run.display(),
            r"usermod --shell '/bin/my shell' --groups '' 'it'\''s'"
        );
    }
}
