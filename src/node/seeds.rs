//! An etcd given with `--seeds`: connecting to it as the operator's etcd user, finding out
//! whether it checks credentials, and giving each host of the run an etcd user of its own.
//!
//! With authentication on, the initiator acts as `--seeds-user` (a user with the root role)
//! and makes, per host, a role and a user both named `arbor.<run>.<host>`: the user has a
//! random password and only that role, and the role grants in etcd's terms exactly the
//! [`Access`] the embedded store would give the host (read the run's exports, read and write
//! the host's own exports prefix and its own converged key). The names carry the run id, so
//! concurrent runs never collide, and a run killed before its teardown leaves names that say
//! which run they were (docs/security.md says how to remove them). The teardown deletes them
//! all, on every path out of the run.
//!
//! With authentication off every client may do everything; the run goes on as before, with a
//! warning that hosts are not isolated in the store.
//!
//! etcd 3.4 has no `AuthStatus` call: an unauthenticated read is what tells. etcd answers it
//! "user name is empty" when it checks credentials, and `Authenticate` with "authentication is
//! not enabled" when it does not.

use super::config::RunOptions;
use crate::store::auth::{Access, prefix_end};
use crate::store::client::{Endpoints, StoreClient};
use etcd_client::{Permission, PermissionType};
use futures::StreamExt;
use std::path::Path;
use std::time::Duration;

/// Where the password of `--seeds-user` is read from when no file is given.
pub const PASSWORD_ENV: &str = "ARBOR_SEEDS_PASSWORD";

/// Requests to the etcd's auth API under way at once: adding a user costs the etcd a bcrypt
/// hash, so a large fleet's users are made a few at a time, not one after another.
const AT_ONCE: usize = 8;

/// The etcd user (and role) name of `host` in run `run`.
pub fn user_name(run: &str, host: &str) -> String {
    format!("arbor.{run}.{host}")
}

/// The operator's etcd credential, `--seeds-user` with its password: from
/// `--seeds-password-file`, else [`PASSWORD_ENV`], else (with `--allow-interactive`) the
/// terminal. `None` without `--seeds-user`.
pub fn operator(options: &RunOptions) -> Result<Option<(String, String)>, String> {
    let Some(user) = &options.seeds_user else {
        return Ok(None);
    };
    if let Some(path) = &options.seeds_password_file {
        return read_password_file("--seeds-password-file", path).map(|p| Some((user.clone(), p)));
    }
    if let Some(password) = std::env::var_os(PASSWORD_ENV) {
        let password = password
            .into_string()
            .map_err(|_| format!("--seeds-user {user}: {PASSWORD_ENV} is not UTF-8"))?;
        return Ok(Some((user.clone(), password)));
    }
    if options.allow_interactive {
        let prompter = crate::ssh::TerminalPrompter::default();
        if let Some(password) = prompter.secret(&format!("etcd password for {user}: ")) {
            return Ok(Some((user.clone(), password)));
        }
        return Err(format!(
            "--seeds-user {user}: no password: the terminal could not be asked"
        ));
    }
    Err(format!(
        "--seeds-user {user}: no password: give it in {PASSWORD_ENV} or in a file named by \
         --seeds-password-file (or use --allow-interactive to be asked)"
    ))
}

/// The first line of the password file `path`, given with `flag` (a file others can read
/// earns a warning).
pub fn read_password_file(flag: &str, path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "{flag} {}: readable by other users (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let line = text.lines().next().unwrap_or("");
    Ok(line.to_string())
}

/// The etcd, connected as the operator (or anonymously), and whether it checks credentials.
pub struct Connected {
    pub client: StoreClient,
    pub auth: bool,
}

/// Connects to the etcd at `endpoints` as `operator` and finds out whether it checks
/// credentials. Errors are sentences that name `--seeds`.
pub async fn connect(
    endpoints: &Endpoints,
    operator: Option<(&str, &str)>,
) -> Result<Connected, String> {
    let at = match endpoints {
        Endpoints::Http(urls) => urls.join(","),
        Endpoints::Unix(path) => format!("unix:{}", path.display()),
    };
    if let Some((user, password)) = operator {
        match StoreClient::connect_as(endpoints, Some((user, password))).await {
            Ok(client) => {
                // Listing users is for the root role only: the run needs it to add users.
                if let Err(e) = client.raw().user_list().await {
                    let why = e.to_string();
                    if why.contains("permission denied") {
                        return Err(format!(
                            "--seeds: --seeds-user {user} may not manage the etcd's users and \
                             roles at {at} (it needs the root role)"
                        ));
                    }
                    return Err(format!("--seeds: the etcd at {at}: {why}"));
                }
                return Ok(Connected { client, auth: true });
            }
            Err(e) => {
                let text = format!("{e:#}");
                if text.contains("authentication is not enabled") {
                    tracing::warn!(
                        "--seeds: the etcd at {at} has authentication off, so --seeds-user \
                         {user} is not used"
                    );
                } else if text.contains("invalid user ID or password") {
                    return Err(format!(
                        "--seeds: the etcd at {at} refused --seeds-user {user}: wrong user name \
                         or password"
                    ));
                } else {
                    return Err(format!("--seeds: {text}"));
                }
            }
        }
    }
    let client = StoreClient::connect(endpoints)
        .await
        .map_err(|e| format!("--seeds: {e:#}"))?;
    // An anonymous read tells whether the etcd checks credentials.
    let probe = client
        .raw()
        .get(
            "/arbor/",
            Some(etcd_client::GetOptions::new().with_count_only()),
        )
        .await;
    match probe {
        Ok(_) => Ok(Connected {
            client,
            auth: false,
        }),
        Err(e) if e.to_string().contains("user name is empty") => Err(format!(
            "--seeds: the etcd at {at} has authentication on: give --seeds-user NAME (a user \
             with the root role), with its password in {PASSWORD_ENV} or in a file named by \
             --seeds-password-file"
        )),
        Err(e) => Err(format!("--seeds: the etcd at {at}: {e}")),
    }
}

/// One host's etcd user: its name (also its role's), password and access.
pub struct HostUser {
    pub name: String,
    pub password: String,
    pub access: Access,
}

/// The etcd permissions granting `access` (admin is never given to a host).
pub fn permissions(access: &Access) -> Vec<Permission> {
    let Access::Keys { read, write, own } = access else {
        return Vec::new();
    };
    let prefix = |kind: PermissionType, p: &Vec<u8>| {
        let perm = Permission::new(kind, p.clone());
        match prefix_end(p) {
            Some(end) => perm.with_range_end(end),
            None => perm.with_from_key(),
        }
    };
    let mut out: Vec<Permission> = read
        .iter()
        .map(|p| prefix(PermissionType::Read, p))
        .collect();
    out.extend(write.iter().map(|p| prefix(PermissionType::Readwrite, p)));
    out.extend(own.iter().map(|k| Permission::read_write(k.clone())));
    out
}

/// The users and roles made for a run; [`RunUsers::remove`] deletes them.
pub struct RunUsers {
    client: etcd_client::Client,
    names: Vec<String>,
}

impl RunUsers {
    /// Makes a role and a user for each host. On failure, whatever was made is deleted again
    /// and the error says why.
    pub async fn create(
        client: &StoreClient,
        operator: &str,
        hosts: Vec<HostUser>,
    ) -> Result<RunUsers, String> {
        let users = RunUsers {
            client: client.raw(),
            names: hosts.iter().map(|h| h.name.clone()).collect(),
        };
        let made = futures::stream::iter(hosts)
            .map(|host| {
                let mut auth = users.client.auth_client();
                async move {
                    let name = host.name;
                    auth.role_add(name.as_str()).await?;
                    for perm in permissions(&host.access) {
                        auth.role_grant_permission(name.as_str(), perm).await?;
                    }
                    auth.user_add(name.as_str(), host.password, None).await?;
                    auth.user_grant_role(name.as_str(), name.as_str()).await?;
                    Ok::<(), etcd_client::Error>(())
                }
            })
            .buffer_unordered(AT_ONCE)
            .collect::<Vec<_>>()
            .await;
        if let Some(Err(e)) = made.into_iter().find(Result::is_err) {
            let why = e.to_string();
            let _ = users.remove().await;
            if why.contains("permission denied") {
                return Err(format!(
                    "--seeds: --seeds-user {operator} may not add users and roles to the etcd \
                     (it needs the root role): {why}"
                ));
            }
            return Err(format!(
                "--seeds: making the run's etcd users and roles: {why}"
            ));
        }
        tracing::debug!("--seeds: made {} etcd users and roles", users.names.len());
        Ok(users)
    }

    /// Deletes every user and role of the run (those already gone are no error). Returns the
    /// names not deleted, with why.
    pub async fn remove(&self) -> Result<(), String> {
        let failed: Vec<String> = futures::stream::iter(self.names.iter())
            .map(|name| {
                let mut auth = self.client.auth_client();
                async move {
                    let gone = |r: Result<(), etcd_client::Error>| match r {
                        Ok(()) => Ok(()),
                        Err(e) if e.to_string().contains("not found") => Ok(()),
                        Err(e) => Err(e.to_string()),
                    };
                    let user = gone(auth.user_delete(name.as_str()).await.map(|_| ()));
                    let role = gone(auth.role_delete(name.as_str()).await.map(|_| ()));
                    user.and(role).map_err(|e| format!("{name}: {e}"))
                }
            })
            .buffer_unordered(AT_ONCE)
            .filter_map(|r| async move { r.err() })
            .collect()
            .await;
        if failed.is_empty() {
            return Ok(());
        }
        Err(failed.join("; "))
    }

    /// [`RunUsers::remove`] within `limit`, saying on stderr what is left if it fails.
    pub async fn remove_within(&self, limit: Duration) {
        let left = match tokio::time::timeout(limit, self.remove()).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(_) => format!("not done within {}s", limit.as_secs()),
        };
        let run = self
            .names
            .first()
            .and_then(|n| n.split('.').nth(1))
            .unwrap_or("?");
        eprintln!(
            "arbor: --seeds: could not delete this run's etcd users and roles ({left}); \
             they are named arbor.{run}.* (docs/security.md says how to delete them)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hosts_access_becomes_etcd_ranges() {
        let access = Access::Keys {
            read: vec![b"/arbor/runs/r/exports/".to_vec()],
            write: vec![b"/arbor/runs/r/exports/h1/".to_vec()],
            own: vec![b"/arbor/runs/r/converged/h1".to_vec()],
        };
        let got: Vec<(i32, String, String)> = permissions(&access)
            .iter()
            .map(|p| {
                (
                    p.get_type(),
                    String::from_utf8_lossy(p.key()).into_owned(),
                    String::from_utf8_lossy(p.range_end()).into_owned(),
                )
            })
            .collect();
        let (read, readwrite) = (
            PermissionType::Read as i32,
            PermissionType::Readwrite as i32,
        );
        assert_eq!(
            got,
            vec![
                (
                    read,
                    "/arbor/runs/r/exports/".into(),
                    "/arbor/runs/r/exports0".into()
                ),
                (
                    readwrite,
                    "/arbor/runs/r/exports/h1/".into(),
                    "/arbor/runs/r/exports/h10".into()
                ),
                (readwrite, "/arbor/runs/r/converged/h1".into(), "".into()),
            ]
        );
        assert!(permissions(&Access::Admin).is_empty());
        assert_eq!(user_name("0123", "web-1"), "arbor.0123.web-1");
    }
}
