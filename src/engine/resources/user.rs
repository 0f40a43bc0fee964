//! `user`: a local account that exists with the given attributes, or is absent.
//!
//! After mgmt's user resource (engine/resources/user.go): the resource's name is the user's
//! name; `state` is `exists` or `absent`; `uid`, `gid` or `group` (the primary group, by
//! number or name, not both), `groups` (the supplementary groups, compared as a set),
//! `homedir` (ending in `/`, compared and set without it), `shell` and `allowduplicateuid`
//! are each managed only when given. Changes are made with the host's own `useradd`,
//! `usermod` and `userdel`, with the same arguments mgmt gives them: every given field, not
//! only those that differ; no home directory is created or removed. A `uid` another user
//! already has is an error unless `allowduplicateuid`.
//!
//! The check reads `/etc/passwd` and `/etc/group` (see [`super::accounts`]); the watch is
//! inotify on both, so a user deleted or changed by hand is put back within milliseconds.

pub use super::accounts::Plan;
use super::accounts::{AccountState, Accounts, ETC_GROUP, ETC_PASSWD, ToolRun, watch_files};
use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use crate::engine::fs_events::FsEvents;
use anyhow::bail;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSpec {
    /// The user's name (the resource's name).
    pub name: String,
    pub state: AccountState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The primary group by number (not with `group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// The primary group by name (not with `gid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The supplementary groups, exactly (an empty list: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
    /// The home directory, without its trailing `/` (as mgmt stores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homedir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allowduplicateuid: bool,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

/// `/a//b/./c/` → `/a/b/c`, as Go's `filepath.Clean` for the absolute paths homes are.
pub fn clean_path(p: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    if p.starts_with('/') {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".into()
    } else {
        joined
    }
}

/// Compares the user in `accounts` with `spec` and says what would put it right.
pub fn plan(spec: &UserSpec, accounts: &Accounts) -> anyhow::Result<Plan> {
    let name = &spec.name;
    let have = accounts.user(name);
    if spec.state == AccountState::Absent {
        return Ok(match have {
            None => Plan::Unchanged,
            Some(u) => Plan::Run {
                what: format!("delete user {name} (uid {})", u.uid),
                run: ToolRun::new("userdel", vec![name.clone()]),
            },
        });
    }
    if let Some(uid) = spec.uid
        && !spec.allowduplicateuid
        && let Some(other) = accounts.user_by_uid(uid)
        && other.name != *name
    {
        bail!(
            "uid {uid} is already taken by user `{}` (set allowduplicateuid to share it)",
            other.name
        );
    }
    let mut args = Vec::new();
    if spec.allowduplicateuid {
        args.push("--non-unique".to_string());
    }
    if let Some(uid) = spec.uid {
        args.extend(["--uid".into(), uid.to_string()]);
    }
    if let Some(gid) = spec.gid {
        args.extend(["--gid".into(), gid.to_string()]);
    }
    if let Some(group) = &spec.group {
        args.extend(["--gid".into(), group.clone()]);
    }
    let groups = spec.groups.as_ref().map(|g| {
        let mut g = g.clone();
        g.sort();
        g.dedup();
        g
    });
    if let Some(groups) = &groups {
        args.extend(["--groups".into(), groups.join(",")]);
    }
    if let Some(home) = &spec.homedir {
        args.extend(["--home".into(), clean_path(home)]);
    }
    if let Some(shell) = &spec.shell {
        args.extend(["--shell".into(), shell.clone()]);
    }
    let Some(u) = have else {
        args.push(name.clone());
        return Ok(Plan::Run {
            what: format!("add user {name}"),
            run: ToolRun::new("useradd", args),
        });
    };
    let mut diffs = Vec::new();
    if let Some(uid) = spec.uid
        && uid != u.uid
    {
        diffs.push(format!("uid {} → {uid}", u.uid));
    }
    if let Some(gid) = spec.gid
        && gid != u.gid
    {
        diffs.push(format!("gid {} → {gid}", u.gid));
    }
    if let Some(group) = &spec.group {
        let current = accounts.group_by_gid(u.gid).map(|g| g.name.as_str());
        if current != Some(group.as_str()) {
            diffs.push(format!(
                "group {} → {group}",
                current.map_or_else(|| format!("gid {}", u.gid), str::to_string)
            ));
        }
    }
    if let Some(groups) = &groups {
        let current = accounts.supplementary(name, u.gid);
        if current != *groups {
            diffs.push(format!(
                "groups [{}] → [{}]",
                current.join(","),
                groups.join(",")
            ));
        }
    }
    if let Some(home) = &spec.homedir
        && clean_path(home) != clean_path(&u.home)
    {
        diffs.push(format!("homedir {} → {}", u.home, clean_path(home)));
    }
    if let Some(shell) = &spec.shell
        && *shell != u.shell
    {
        diffs.push(format!("shell {} → {shell}", u.shell));
    }
    if diffs.is_empty() {
        return Ok(Plan::Unchanged);
    }
    args.push(name.clone());
    Ok(Plan::Run {
        what: format!("modify user {name} ({})", diffs.join(", ")),
        run: ToolRun::new("usermod", args),
    })
}

pub struct UserResource {
    id: ResourceId,
    spec: UserSpec,
    fs: FsEvents,
    passwd: PathBuf,
    group: PathBuf,
}

impl UserResource {
    pub fn new(spec: UserSpec, fs: FsEvents) -> Self {
        UserResource {
            id: ResourceId::new(Kind::User, spec.name.clone()),
            spec,
            fs,
            passwd: PathBuf::from(ETC_PASSWD),
            group: PathBuf::from(ETC_GROUP),
        }
    }

    /// For tests: account files elsewhere than /etc (the tools still change /etc: tests only
    /// check in noop mode).
    #[cfg(test)]
    pub fn with_files(mut self, passwd: &Path, group: &Path) -> Self {
        self.passwd = passwd.to_path_buf();
        self.group = group.to_path_buf();
        self
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        let accounts = Accounts::read(&self.passwd, &self.group).await?;
        plan(&self.spec, &accounts)?.carry_out(ctx.noop).await
    }
}

impl Resource for UserResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(self.check_apply_inner(ctx))
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let paths: [&Path; 2] = [&self.passwd, &self.group];
            watch_files(&self.fs, &paths, &poke, &cancel).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
        alice:x:1001:1001::/home/alice:/bin/sh\n\
        bob:x:1002:100::/home/bob:/bin/bash\n";
    const GROUP: &str = "root:x:0:\n\
        users:x:100:\n\
        alice:x:1001:\n\
        wheel:x:10:alice\n\
        audio:x:29:\n";

    fn accounts() -> Accounts {
        Accounts::parse(PASSWD, GROUP)
    }

    fn user(name: &str) -> UserSpec {
        UserSpec {
            name: name.into(),
            ..UserSpec::default()
        }
    }

    fn run_of(p: Plan) -> (String, String) {
        match p {
            Plan::Run { what, run } => (what, run.display()),
            Plan::Unchanged => panic!("no change planned"),
        }
    }

    #[test]
    fn a_missing_user_is_added_with_every_given_field() {
        let spec = UserSpec {
            uid: Some(1500),
            group: Some("users".into()),
            groups: Some(vec!["wheel".into(), "audio".into()]),
            homedir: Some("/srv/carol/".into()),
            shell: Some("/bin/bash".into()),
            ..user("carol")
        };
        let (what, cmd) = run_of(plan(&spec, &accounts()).expect("plan"));
        assert_eq!(what, "add user carol");
        assert_eq!(
            cmd,
            "useradd --uid 1500 --gid users --groups audio,wheel --home /srv/carol --shell /bin/bash carol"
        );
        let (_, cmd) = run_of(
            plan(
                &UserSpec {
                    gid: Some(100),
                    allowduplicateuid: true,
                    uid: Some(0),
                    ..user("toor")
                },
                &accounts(),
            )
            .expect("plan"),
        );
        assert_eq!(cmd, "useradd --non-unique --uid 0 --gid 100 toor");
    }

    #[test]
    fn a_user_that_matches_is_unchanged_and_only_given_fields_count() {
        let a = accounts();
        assert_eq!(plan(&user("alice"), &a).expect("plan"), Plan::Unchanged);
        let spec = UserSpec {
            uid: Some(1001),
            gid: Some(1001),
            groups: Some(vec!["wheel".into()]),
            homedir: Some("/home//alice/".into()),
            shell: Some("/bin/sh".into()),
            ..user("alice")
        };
        assert_eq!(plan(&spec, &a).expect("plan"), Plan::Unchanged);
        let by_name = UserSpec {
            group: Some("users".into()),
            groups: Some(vec![]),
            ..user("bob")
        };
        assert_eq!(plan(&by_name, &a).expect("plan"), Plan::Unchanged);
    }

    #[test]
    fn a_user_that_differs_is_modified_saying_what_differs() {
        let spec = UserSpec {
            uid: Some(1001),
            groups: Some(vec!["audio".into()]),
            shell: Some("/bin/bash".into()),
            ..user("alice")
        };
        let (what, cmd) = run_of(plan(&spec, &accounts()).expect("plan"));
        assert_eq!(
            what,
            "modify user alice (groups [wheel] → [audio], shell /bin/sh → /bin/bash)"
        );
        assert_eq!(
            cmd,
            "usermod --uid 1001 --groups audio --shell /bin/bash alice"
        );
        let (what, _) = run_of(
            plan(
                &UserSpec {
                    group: Some("wheel".into()),
                    ..user("bob")
                },
                &accounts(),
            )
            .expect("plan"),
        );
        assert_eq!(what, "modify user bob (group users → wheel)");
    }

    #[test]
    fn absent_deletes_only_a_user_that_exists() {
        let gone = UserSpec {
            state: AccountState::Absent,
            ..user("alice")
        };
        let (what, cmd) = run_of(plan(&gone, &accounts()).expect("plan"));
        assert_eq!(
            (what.as_str(), cmd.as_str()),
            ("delete user alice (uid 1001)", "userdel alice")
        );
        let never = UserSpec {
            state: AccountState::Absent,
            ..user("nobody-here")
        };
        assert_eq!(plan(&never, &accounts()).expect("plan"), Plan::Unchanged);
    }

    #[test]
    fn a_uid_another_user_has_is_refused_unless_duplicates_are_allowed() {
        let spec = UserSpec {
            uid: Some(1002),
            ..user("alice")
        };
        let err = plan(&spec, &accounts()).expect_err("taken");
        assert!(
            err.to_string()
                .contains("uid 1002 is already taken by user `bob`"),
            "{err}"
        );
        let shared = UserSpec {
            allowduplicateuid: true,
            ..spec
        };
        let (_, cmd) = run_of(plan(&shared, &accounts()).expect("plan"));
        assert_eq!(cmd, "usermod --non-unique --uid 1002 alice");
    }

    #[tokio::test]
    async fn noop_reads_the_files_and_the_watch_sees_them_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (passwd, group) = (dir.path().join("passwd"), dir.path().join("group"));
        std::fs::write(&passwd, PASSWD).expect("passwd");
        std::fs::write(&group, GROUP).expect("group");
        let fs = FsEvents::new().expect("inotify");
        let res =
            std::sync::Arc::new(UserResource::new(user("carol"), fs).with_files(&passwd, &group));
        assert_eq!(res.id().to_string(), "user[carol]");
        let noop = ApplyContext {
            noop: true,
            refresh: false,
        };
        assert_eq!(
            res.check_apply(noop).await.expect("check"),
            Outcome::WouldChange("would add user carol".into())
        );
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // As useradd does: a new file renamed over the old one.
        let next = dir.path().join("passwd+");
        std::fs::write(
            &next,
            format!("{PASSWD}carol:x:1600:1600::/home/carol:/bin/sh\n"),
        )
        .expect("passwd+");
        std::fs::rename(&next, &passwd).expect("rename");
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("the rename pokes");
        assert_eq!(
            res.check_apply(noop).await.expect("check"),
            Outcome::Unchanged
        );
        // The group file is watched too.
        while rx.try_recv().is_ok() {}
        std::fs::write(&group, format!("{GROUP}carol:x:1600:\n")).expect("group");
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("a group change pokes");
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    #[test]
    fn homes_compare_cleaned() {
        assert_eq!(clean_path("/home/a/"), "/home/a");
        assert_eq!(clean_path("/home//a/./b/../c"), "/home/a/c");
        assert_eq!(clean_path("/"), "/");
    }
}
