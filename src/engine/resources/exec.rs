//! `exec`: a shell command, run once and then again only when something says so.
//!
//! After mgmt's exec: the command runs on the first check; afterwards the resource counts as
//! in its desired state until a notify edge refreshes it or its `watchcmd` prints a line. An
//! `ifcmd` guards every run: the command runs only when the ifcmd exits 0. Output goes to the
//! host's log line by line as it is printed; a non-zero exit is a failure naming the command
//! and its exit code.

use super::meta::Meta;
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use crate::engine::fs_events::FsEvents;
use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const DEFAULT_SHELL: &str = "/bin/sh";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub name: String,
    pub cmd: String,
    /// Run `cmd` itself with these arguments, without a shell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Directory `cmd` runs in (`None`: arbor's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// When set, every command sees exactly these variables and no others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Run every command as this user / group (a name or a number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Seconds; applies to each command (`cmd`, the guards, `donecmd`). `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// `cmd` runs only if this exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifcmd: Option<Aux>,
    /// `cmd` runs only if this exits non-zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nifcmd: Option<Aux>,
    /// `cmd` runs only while this path does not exist; it is watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creates: Option<PathBuf>,
    /// Runs after `cmd` succeeds; its failure is the resource's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub donecmd: Option<Aux>,
    /// Each line it prints makes `cmd` run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchcmd: Option<Aux>,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

/// A command beside the main one (`ifcmd`, `nifcmd`, `donecmd`, `watchcmd`) with its own
/// shell (`None`: the resource's `shell`) and working directory (`None`: arbor's own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aux {
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
}

impl Aux {
    pub fn new(cmd: impl Into<String>) -> Self {
        Aux {
            cmd: cmd.into(),
            ..Aux::default()
        }
    }
}

/// One command to start: through `shell -c`, or `program` with `args` directly.
struct Run<'a> {
    what: &'a str,
    shell: &'a str,
    cmd: &'a str,
    args: Option<&'a [String]>,
    cwd: Option<&'a PathBuf>,
}

pub struct ExecResource {
    id: ResourceId,
    spec: ExecSpec,
    fs: Option<FsEvents>,
    /// Set after a successful run (or a guard saying no); cleared by watchcmd output and by
    /// events on `creates`.
    state_ok: AtomicBool,
}

impl ExecResource {
    pub fn new(spec: ExecSpec) -> Self {
        ExecResource {
            id: ResourceId::new(Kind::Exec, spec.name.clone()),
            spec,
            fs: None,
            state_ok: AtomicBool::new(false),
        }
    }

    /// With the engine's inotify instance, to watch `creates`.
    pub fn with_fs(spec: ExecSpec, fs: FsEvents) -> Self {
        ExecResource {
            fs: Some(fs),
            ..ExecResource::new(spec)
        }
    }

    fn shell(&self) -> &str {
        self.spec.shell.as_deref().unwrap_or(DEFAULT_SHELL)
    }

    fn timeout(&self) -> Option<Duration> {
        self.spec.timeout.map(Duration::from_secs)
    }

    fn aux<'a>(&'a self, what: &'a str, aux: &'a Aux) -> Run<'a> {
        Run {
            what,
            shell: aux.shell.as_deref().unwrap_or(self.shell()),
            cmd: &aux.cmd,
            args: None,
            cwd: aux.cwd.as_ref(),
        }
    }

    fn spawn(&self, run: &Run<'_>) -> anyhow::Result<Child> {
        let mut command = match run.args {
            Some(args) => {
                let mut c = Command::new(run.cmd);
                c.args(args);
                c
            }
            None => {
                let mut c = Command::new(run.shell);
                c.arg("-c").arg(run.cmd);
                c
            }
        };
        if let Some(dir) = run.cwd {
            command.current_dir(dir);
        }
        if let Some(env) = &self.spec.env {
            command.env_clear().envs(env);
        }
        if let Some(user) = &self.spec.user {
            command.uid(lookup_uid(user)?);
        }
        if let Some(group) = &self.spec.group {
            command.gid(lookup_gid(group)?);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| match run.args {
                Some(_) => format!("start {} `{}`", run.what, run.cmd),
                None => format!("start {} `{}` with {}", run.what, run.cmd, run.shell),
            })
    }

    /// Runs a guard; `Ok(true)` if it exited 0.
    async fn guard(&self, what: &str, aux: &Aux) -> anyhow::Result<bool> {
        let status = self
            .run_logged(&self.aux(what, aux))
            .await
            .with_context(|| format!("{what} `{}`", aux.cmd))?;
        Ok(status.success())
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        if self.state_ok.load(Ordering::SeqCst) && !ctx.refresh {
            return Ok(Outcome::Unchanged);
        }
        let skip = if let Some(ifcmd) = &self.spec.ifcmd
            && !self.guard("ifcmd", ifcmd).await?
        {
            true
        } else if let Some(nifcmd) = &self.spec.nifcmd
            && self.guard("nifcmd", nifcmd).await?
        {
            true
        } else {
            self.spec
                .creates
                .as_ref()
                // As mgmt, a stat that succeeds: a dangling symlink does not count.
                .is_some_and(|p| std::fs::metadata(p).is_ok())
        };
        if skip {
            self.state_ok.store(true, Ordering::SeqCst);
            return Ok(Outcome::Unchanged);
        }
        let cmd = &self.spec.cmd;
        if ctx.noop {
            return Ok(Outcome::WouldChange(format!("would run `{cmd}`")));
        }
        let main = Run {
            what: "cmd",
            shell: self.shell(),
            cmd,
            args: (!self.spec.args.is_empty()).then_some(self.spec.args.as_slice()),
            cwd: self.spec.cwd.as_ref(),
        };
        exited_ok(cmd, self.run_logged(&main).await?)?;
        if let Some(done) = &self.spec.donecmd {
            let status = self
                .run_logged(&self.aux("donecmd", done))
                .await
                .with_context(|| format!("donecmd `{}`", done.cmd))?;
            exited_ok(&done.cmd, status).context("donecmd")?;
        }
        self.state_ok.store(true, Ordering::SeqCst);
        Ok(Outcome::Changed(format!("ran `{cmd}`")))
    }

    async fn watch_inner(&self, poke: Poke, cancel: CancellationToken) -> anyhow::Result<()> {
        let watches_creates = self.spec.creates.is_some() && self.fs.is_some();
        if self.spec.watchcmd.is_none() && !watches_creates {
            return Ok(());
        }
        let creates = async {
            match (&self.spec.creates, &self.fs) {
                (Some(path), Some(fs)) => {
                    let on_event = || {
                        self.state_ok.store(false, Ordering::SeqCst);
                        poke.poke();
                    };
                    super::file::watch_path(fs, path, &cancel, on_event).await
                }
                _ => {
                    cancel.cancelled().await;
                    Ok(())
                }
            }
        };
        let watchcmd = self.watch_cmd(poke.clone(), cancel.clone());
        tokio::select! {
            r = creates => r,
            r = watchcmd => r,
        }
    }

    async fn watch_cmd(&self, poke: Poke, cancel: CancellationToken) -> anyhow::Result<()> {
        let Some(watchcmd) = &self.spec.watchcmd else {
            cancel.cancelled().await;
            return Ok(());
        };
        let mut child = self.spawn(&self.aux("watchcmd", watchcmd))?;
        let _group = GroupKiller(child.id());
        let stdout = child.stdout.take().context("watchcmd stdout")?;
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(log_lines(self.id.clone(), stderr));
        }
        let mut lines = BufReader::new(stdout).lines();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                line = lines.next_line() => match line {
                    Ok(Some(line)) => {
                        tracing::debug!("{}: watchcmd: {line}", self.id);
                        self.state_ok.store(false, Ordering::SeqCst);
                        poke.poke();
                    }
                    Ok(None) | Err(_) => {
                        let status = child.wait().await.context("wait for watchcmd")?;
                        bail!("watchcmd `{}` ended ({status})", watchcmd.cmd);
                    }
                },
            }
        }
    }

    /// Runs a command, logging its output line by line, under the timeout.
    async fn run_logged(&self, run: &Run<'_>) -> anyhow::Result<ExitStatus> {
        let cmd = run.cmd;
        let mut child = self.spawn(run)?;
        let mut group = GroupKiller(child.id());
        let out = child
            .stdout
            .take()
            .map(|s| tokio::spawn(log_lines(self.id.clone(), s)));
        let err = child
            .stderr
            .take()
            .map(|s| tokio::spawn(log_lines(self.id.clone(), s)));
        let status = match self.timeout() {
            Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
                Ok(status) => status,
                Err(_) => bail!("`{cmd}` timed out after {}s", limit.as_secs()),
            },
            None => child.wait().await,
        }
        .with_context(|| format!("wait for `{cmd}`"))?;
        group.disarm();
        for mut reader in [out, err].into_iter().flatten() {
            if tokio::time::timeout(OUTPUT_GRACE, &mut reader)
                .await
                .is_err()
            {
                reader.abort();
            }
        }
        Ok(status)
    }
}

fn exited_ok(cmd: &str, status: ExitStatus) -> anyhow::Result<()> {
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => bail!("`{cmd}` exited with code {code}"),
        None => bail!("`{cmd}` was killed by a signal ({status})"),
    }
}

/// A user name or number → uid.
pub(super) fn lookup_uid(user: &str) -> anyhow::Result<u32> {
    if let Ok(n) = user.parse() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(user).context("user name")?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all-zero bytes are a valid passwd (null pointers, zero ids).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r (reentrant: checks run concurrently) writes only into `pw` and `buf`,
    // both valid for the sizes given, and sets `found` to `&pw` or null.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        bail!("no user `{user}`");
    }
    Ok(pw.pw_uid)
}

/// A group name or number → gid.
pub(super) fn lookup_gid(group: &str) -> anyhow::Result<u32> {
    if let Ok(n) = group.parse() {
        return Ok(n);
    }
    let name = std::ffi::CString::new(group).context("group name")?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: all-zero bytes are a valid group (null pointers, zero id).
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in lookup_uid, for the group database.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        bail!("no group `{group}`");
    }
    Ok(gr.gr_gid)
}

impl Resource for ExecResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(self.check_apply_inner(ctx))
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.watch_inner(poke, cancel))
    }

    /// As mgmt, a polled exec runs (guards permitting) on every tick.
    fn polled(&self) {
        self.state_ok.store(false, Ordering::SeqCst);
    }
}

/// How long output may keep flowing after the shell exits (from something it left running
/// in the background) before we stop reading it.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Kills a process group when dropped (timeout, cancellation, or an early return), unless
/// disarmed: a command that exits normally may leave a daemon running on purpose.
struct GroupKiller(Option<u32>);

impl GroupKiller {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) with a negative pid signals the process group we created for
            // this child; it touches no memory. ESRCH (already gone) is fine to ignore.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

async fn log_lines(id: ResourceId, stream: impl AsyncRead + Unpin) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::info!("{id}: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn exec(cmd: &str) -> ExecSpec {
        ExecSpec {
            name: "e".into(),
            cmd: cmd.into(),
            ..ExecSpec::default()
        }
    }

    fn count_lines(path: &Path) -> usize {
        std::fs::read_to_string(path)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn runs_once_then_only_on_refresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let res = ExecResource::new(exec(&format!("echo run >> {}", log.display())));
        let first = res.check_apply(ApplyContext::default()).await.expect("run");
        assert!(matches!(first, Outcome::Changed(_)));
        let again = res
            .check_apply(ApplyContext::default())
            .await
            .expect("check");
        assert_eq!(again, Outcome::Unchanged);
        assert_eq!(count_lines(&log), 1);
        let refresh = ApplyContext {
            noop: false,
            refresh: true,
        };
        res.check_apply(refresh).await.expect("refresh");
        assert_eq!(count_lines(&log), 2);
    }

    #[tokio::test]
    async fn a_non_zero_exit_is_a_failure_naming_command_and_code() {
        let res = ExecResource::new(exec("exit 3"));
        let err = res
            .check_apply(ApplyContext::default())
            .await
            .expect_err("must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("`exit 3`") && msg.contains("code 3"), "{msg}");
    }

    #[tokio::test]
    async fn a_background_process_holding_the_output_does_not_hang_the_run() {
        let start = std::time::Instant::now();
        let res = ExecResource::new(exec("sleep 5 & echo started"));
        let outcome = res.check_apply(ApplyContext::default()).await.expect("run");
        assert!(matches!(outcome, Outcome::Changed(_)));
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn the_timeout_kills_the_command() {
        let mut spec = exec("sleep 30");
        spec.timeout = Some(1);
        let res = ExecResource::new(spec);
        let start = std::time::Instant::now();
        let err = res
            .check_apply(ApplyContext::default())
            .await
            .expect_err("must time out");
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn ifcmd_guards_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker");
        let mut spec = exec(&format!("touch {}", marker.display()));
        spec.ifcmd = Some(Aux::new("false"));
        let res = ExecResource::new(spec.clone());
        let outcome = res
            .check_apply(ApplyContext::default())
            .await
            .expect("check");
        assert_eq!(outcome, Outcome::Unchanged);
        assert!(!marker.exists());

        spec.ifcmd = Some(Aux::new(format!("test ! -e {}", marker.display())));
        let res = ExecResource::new(spec);
        res.check_apply(ApplyContext::default()).await.expect("run");
        assert!(marker.exists());
        let refresh = ApplyContext {
            noop: false,
            refresh: true,
        };
        // Refreshed, but the ifcmd now says no.
        assert_eq!(
            res.check_apply(refresh).await.expect("check"),
            Outcome::Unchanged
        );
    }

    #[tokio::test]
    async fn noop_reports_the_command_without_running_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker");
        let res = ExecResource::new(exec(&format!("touch {}", marker.display())));
        let ctx = ApplyContext {
            noop: true,
            refresh: false,
        };
        let outcome = res.check_apply(ctx).await.expect("noop");
        assert!(matches!(outcome, Outcome::WouldChange(ref m) if m.contains("touch")));
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn each_watchcmd_line_pokes_and_makes_the_command_run_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("log");
        let mut spec = exec(&format!("echo run >> {}", log.display()));
        spec.watchcmd = Some(Aux::new("echo one; echo two; sleep 30"));
        let res = std::sync::Arc::new(ExecResource::new(spec));
        res.check_apply(ApplyContext::default())
            .await
            .expect("first run");
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a poke per line");
        }
        let outcome = res
            .check_apply(ApplyContext::default())
            .await
            .expect("rerun");
        assert!(matches!(outcome, Outcome::Changed(_)));
        assert_eq!(count_lines(&log), 2);
        cancel.cancel();
        watcher
            .await
            .expect("join")
            .expect("watch ends cleanly on cancel");
    }

    fn run() -> ApplyContext {
        ApplyContext::default()
    }

    #[tokio::test]
    async fn args_run_the_program_directly_without_a_shell() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("a file; with $(odd) chars");
        let mut spec = exec("/usr/bin/touch");
        spec.args = vec![odd.display().to_string()];
        ExecResource::new(spec)
            .check_apply(run())
            .await
            .expect("run");
        assert!(odd.exists());
    }

    #[tokio::test]
    async fn cwd_env_and_user_apply_to_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = exec("echo \"$GREETING ${HOME:-nohome}\" > out; id -u > uid");
        spec.cwd = Some(dir.path().to_path_buf());
        spec.env = Some([("GREETING".to_string(), "hi".to_string())].into());
        // Ourselves, by name: allowed without root, and proves the lookup.
        // SAFETY: getuid cannot fail; getpwuid's record is read at once.
        let me = unsafe {
            let pw = libc::getpwuid(libc::getuid());
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned()
        };
        spec.user = Some(me);
        // SAFETY: getgid cannot fail; getgrgid's record is read at once.
        let my_group = unsafe {
            let gr = libc::getgrgid(libc::getgid());
            std::ffi::CStr::from_ptr((*gr).gr_name)
                .to_string_lossy()
                .into_owned()
        };
        spec.group = Some(my_group);
        ExecResource::new(spec)
            .check_apply(run())
            .await
            .expect("run");
        // Only the given variables: HOME is gone.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).expect("out"),
            "hi nohome\n"
        );
        // SAFETY: getuid cannot fail.
        let uid = unsafe { libc::getuid() };
        assert_eq!(
            std::fs::read_to_string(dir.path().join("uid")).expect("uid"),
            format!("{uid}\n")
        );
    }

    #[tokio::test]
    async fn an_unknown_user_fails_the_resource() {
        let mut spec = exec("true");
        spec.user = Some("no-such-user-arbor".into());
        let err = ExecResource::new(spec)
            .check_apply(run())
            .await
            .expect_err("must fail");
        assert!(format!("{err:#}").contains("no user"), "{err:#}");
    }

    #[tokio::test]
    async fn nifcmd_blocks_the_command_when_it_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("marker");
        let mut spec = exec(&format!("touch {}", marker.display()));
        spec.nifcmd = Some(Aux::new("true"));
        let res = ExecResource::new(spec.clone());
        assert_eq!(
            res.check_apply(run()).await.expect("check"),
            Outcome::Unchanged
        );
        assert!(!marker.exists());
        spec.nifcmd = Some(Aux::new("false"));
        ExecResource::new(spec)
            .check_apply(run())
            .await
            .expect("run");
        assert!(marker.exists());
    }

    #[tokio::test]
    async fn ifshell_and_ifcwd_are_the_guards_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("flag"), "").expect("flag");
        let marker = dir.path().join("marker");
        let mut spec = exec(&format!("touch {}", marker.display()));
        // bash-only syntax, relative to ifcwd.
        spec.ifcmd = Some(Aux {
            cmd: "[[ -e flag ]]".into(),
            shell: Some("/bin/bash".into()),
            cwd: Some(dir.path().to_path_buf()),
        });
        ExecResource::new(spec)
            .check_apply(run())
            .await
            .expect("run");
        assert!(marker.exists());
    }

    #[tokio::test]
    async fn donecmd_runs_after_success_and_its_failure_is_the_resources() {
        let dir = tempfile::tempdir().expect("tempdir");
        let done = dir.path().join("done");
        let mut spec = exec("true");
        spec.donecmd = Some(Aux::new(format!("touch {}", done.display())));
        ExecResource::new(spec.clone())
            .check_apply(run())
            .await
            .expect("run");
        assert!(done.exists());
        spec.donecmd = Some(Aux::new("exit 4"));
        let err = ExecResource::new(spec)
            .check_apply(run())
            .await
            .expect_err("donecmd failed");
        assert!(format!("{err:#}").contains("donecmd"), "{err:#}");
        // Not run after a failed cmd.
        let mut spec = exec("false");
        std::fs::remove_file(&done).expect("rm");
        spec.donecmd = Some(Aux::new(format!("touch {}", done.display())));
        ExecResource::new(spec)
            .check_apply(run())
            .await
            .expect_err("cmd fails");
        assert!(!done.exists());
    }

    #[tokio::test]
    async fn creates_skips_the_command_while_the_path_exists_and_is_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let created = dir.path().join("created");
        let log = dir.path().join("log");
        let mut spec = exec(&format!(
            "echo run >> {}; touch {}",
            log.display(),
            created.display()
        ));
        spec.creates = Some(created.clone());
        let fs = FsEvents::new().expect("inotify");
        let res = std::sync::Arc::new(ExecResource::with_fs(spec, fs));
        res.check_apply(run()).await.expect("first run");
        assert_eq!(count_lines(&log), 1);
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res.clone(), cancel.clone());
        // Settle: the watch may see our own touch first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}
        assert_eq!(
            res.check_apply(run()).await.expect("check"),
            Outcome::Unchanged
        );
        std::fs::remove_file(&created).expect("rm");
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the removal pokes");
        res.check_apply(run()).await.expect("rerun");
        assert_eq!(count_lines(&log), 2);
        // Exists again: refreshing does not run it.
        let refresh = ApplyContext {
            noop: false,
            refresh: true,
        };
        assert_eq!(
            res.check_apply(refresh).await.expect("check"),
            Outcome::Unchanged
        );
        assert_eq!(count_lines(&log), 2);
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }

    #[tokio::test]
    async fn watchshell_and_watchcwd_run_the_watchcmd() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("lines"), "a\n").expect("lines");
        let mut spec = exec("true");
        spec.watchcmd = Some(Aux {
            cmd: "cat lines; [[ 1 ]] && sleep 30".into(),
            shell: Some("/bin/bash".into()),
            cwd: Some(dir.path().to_path_buf()),
        });
        let res = std::sync::Arc::new(ExecResource::new(spec));
        let cancel = CancellationToken::new();
        let (watcher, mut rx) = crate::engine::resources::spawn_watch(res, cancel.clone());
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a poke for the line");
        cancel.cancel();
        watcher.await.expect("join").expect("clean end");
    }
}
