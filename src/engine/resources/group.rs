//! `group`: a local group that exists (with a given gid) or is absent.
//!
//! After mgmt's group resource (engine/resources/group.go): the resource's name is the
//! group's name; `state` is `exists` or `absent`; `gid` is managed when given, and a gid
//! another group has is an error. Changes are made with the host's `groupadd`, `groupmod -g`
//! and `groupdel`. The check reads `/etc/group`; the watch is inotify on it.

use super::accounts::{AccountState, Accounts, ETC_GROUP, ETC_PASSWD, ToolRun, watch_files};
use super::meta::Meta;
use super::user::Plan;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use crate::engine::fs_events::FsEvents;
use anyhow::bail;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// The group's name (the resource's name).
    pub name: String,
    pub state: AccountState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

/// Compares the group in `accounts` with `spec` and says what would put it right.
pub fn plan(spec: &GroupSpec, accounts: &Accounts) -> anyhow::Result<Plan> {
    let name = &spec.name;
    let have = accounts.group(name);
    if spec.state == AccountState::Absent {
        return Ok(match have {
            None => Plan::Unchanged,
            Some(g) => Plan::Run {
                what: format!("delete group {name} (gid {})", g.gid),
                run: ToolRun::new("groupdel", vec![name.clone()]),
            },
        });
    }
    if let Some(gid) = spec.gid
        && let Some(other) = accounts.group_by_gid(gid)
        && other.name != *name
    {
        bail!("gid {gid} already belongs to group `{}`", other.name);
    }
    let gid_args = |gid: Option<u32>| match gid {
        Some(gid) => vec!["-g".to_string(), gid.to_string(), name.clone()],
        None => vec![name.clone()],
    };
    Ok(match (have, spec.gid) {
        (None, gid) => Plan::Run {
            what: format!("add group {name}"),
            run: ToolRun::new("groupadd", gid_args(gid)),
        },
        (Some(g), Some(gid)) if g.gid != gid => Plan::Run {
            what: format!("modify group {name} (gid {} → {gid})", g.gid),
            run: ToolRun::new("groupmod", gid_args(Some(gid))),
        },
        (Some(_), _) => Plan::Unchanged,
    })
}

pub struct GroupResource {
    id: ResourceId,
    spec: GroupSpec,
    fs: FsEvents,
    passwd: PathBuf,
    group: PathBuf,
}

impl GroupResource {
    pub fn new(spec: GroupSpec, fs: FsEvents) -> Self {
        GroupResource {
            id: ResourceId::new(Kind::Group, spec.name.clone()),
            spec,
            fs,
            passwd: PathBuf::from(ETC_PASSWD),
            group: PathBuf::from(ETC_GROUP),
        }
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        let accounts = Accounts::read(&self.passwd, &self.group).await?;
        plan(&self.spec, &accounts)?.carry_out(ctx.noop).await
    }
}

impl Resource for GroupResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(self.check_apply_inner(ctx))
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let paths: [&Path; 1] = [&self.group];
            watch_files(&self.fs, &paths, &poke, &cancel).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accounts() -> Accounts {
        Accounts::parse("", "root:x:0:\nstaff:x:50:\nops:x:4000:alice\n")
    }

    fn group(name: &str, gid: Option<u32>) -> GroupSpec {
        GroupSpec {
            name: name.into(),
            gid,
            ..GroupSpec::default()
        }
    }

    fn cmd(p: Plan) -> String {
        match p {
            Plan::Run { run, .. } => run.display(),
            Plan::Unchanged => panic!("no change planned"),
        }
    }

    #[test]
    fn groups_are_added_modified_deleted_or_left_alone() {
        let a = accounts();
        assert_eq!(
            cmd(plan(&group("dev", None), &a).expect("plan")),
            "groupadd dev"
        );
        assert_eq!(
            cmd(plan(&group("dev", Some(4100)), &a).expect("plan")),
            "groupadd -g 4100 dev"
        );
        assert_eq!(
            plan(&group("ops", None), &a).expect("plan"),
            Plan::Unchanged
        );
        assert_eq!(
            plan(&group("ops", Some(4000)), &a).expect("plan"),
            Plan::Unchanged
        );
        let modify = plan(&group("ops", Some(4001)), &a).expect("plan");
        assert!(
            matches!(&modify, Plan::Run { what, .. } if what == "modify group ops (gid 4000 → 4001)"),
            "{modify:?}"
        );
        assert_eq!(cmd(modify), "groupmod -g 4001 ops");
        let absent = |name: &str| GroupSpec {
            state: AccountState::Absent,
            ..group(name, None)
        };
        assert_eq!(cmd(plan(&absent("ops"), &a).expect("plan")), "groupdel ops");
        assert_eq!(plan(&absent("dev"), &a).expect("plan"), Plan::Unchanged);
    }

    #[test]
    fn a_gid_another_group_has_is_an_error() {
        let err = plan(&group("dev", Some(50)), &accounts()).expect_err("taken");
        assert!(
            err.to_string()
                .contains("gid 50 already belongs to group `staff`"),
            "{err}"
        );
    }
}
