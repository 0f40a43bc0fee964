//! `exec`: a shell command, run once and then again only when something says so.
//!
//! After mgmt's exec: the command runs on the first check; afterwards the resource counts as
//! in its desired state until a notify edge refreshes it or its `watchcmd` prints a line. An
//! `ifcmd` guards every run: the command runs only when the ifcmd exits 0. Output goes to the
//! host's log line by line as it is printed; a non-zero exit is a failure naming the command
//! and its exit code.

use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

const DEFAULT_SHELL: &str = "/bin/sh";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub name: String,
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Seconds; applies to `cmd` and to `ifcmd` each. `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifcmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchcmd: Option<String>,
}

pub struct ExecResource {
    id: ResourceId,
    spec: ExecSpec,
    /// Set after a successful run (or a negative ifcmd); cleared by watchcmd output.
    state_ok: AtomicBool,
}

impl ExecResource {
    pub fn new(spec: ExecSpec) -> Self {
        ExecResource {
            id: ResourceId::new(Kind::Exec, spec.name.clone()),
            spec,
            state_ok: AtomicBool::new(false),
        }
    }

    fn shell(&self) -> &str {
        self.spec.shell.as_deref().unwrap_or(DEFAULT_SHELL)
    }

    fn timeout(&self) -> Option<Duration> {
        self.spec.timeout.map(Duration::from_secs)
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        if self.state_ok.load(Ordering::SeqCst) && !ctx.refresh {
            return Ok(Outcome::Unchanged);
        }
        if let Some(ifcmd) = &self.spec.ifcmd {
            let status = run_logged(&self.id, self.shell(), ifcmd, self.timeout())
                .await
                .with_context(|| format!("ifcmd `{ifcmd}`"))?;
            if !status.success() {
                self.state_ok.store(true, Ordering::SeqCst);
                return Ok(Outcome::Unchanged);
            }
        }
        let cmd = &self.spec.cmd;
        if ctx.noop {
            return Ok(Outcome::WouldChange(format!("would run `{cmd}`")));
        }
        let status = run_logged(&self.id, self.shell(), cmd, self.timeout()).await?;
        match status.code() {
            Some(0) => {
                self.state_ok.store(true, Ordering::SeqCst);
                Ok(Outcome::Changed(format!("ran `{cmd}`")))
            }
            Some(code) => bail!("`{cmd}` exited with code {code}"),
            None => bail!("`{cmd}` was killed by a signal ({status})"),
        }
    }

    async fn watch_inner(&self, poke: Poke, cancel: CancellationToken) -> anyhow::Result<()> {
        let Some(watchcmd) = &self.spec.watchcmd else {
            return Ok(());
        };
        let mut child = spawn(self.shell(), watchcmd, Stdio::null())
            .with_context(|| format!("start watchcmd `{watchcmd}`"))?;
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
                        bail!("watchcmd `{watchcmd}` ended ({status})");
                    }
                },
            }
        }
    }
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
}

/// Each command gets its own process group, so a timeout or shutdown kills what the shell
/// started too, not only the shell.
fn spawn(shell: &str, cmd: &str, stdin: Stdio) -> std::io::Result<Child> {
    Command::new(shell)
        .arg("-c")
        .arg(cmd)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
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

/// Runs `cmd` through `shell`, logging its output line by line, under the timeout.
async fn run_logged(
    id: &ResourceId,
    shell: &str,
    cmd: &str,
    timeout: Option<Duration>,
) -> anyhow::Result<ExitStatus> {
    let mut child =
        spawn(shell, cmd, Stdio::null()).with_context(|| format!("start `{cmd}` with {shell}"))?;
    let mut group = GroupKiller(child.id());
    let out = child
        .stdout
        .take()
        .map(|s| tokio::spawn(log_lines(id.clone(), s)));
    let err = child
        .stderr
        .take()
        .map(|s| tokio::spawn(log_lines(id.clone(), s)));
    let status = match timeout {
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
            shell: None,
            timeout: None,
            ifcmd: None,
            watchcmd: None,
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
        spec.ifcmd = Some("false".into());
        let res = ExecResource::new(spec.clone());
        let outcome = res
            .check_apply(ApplyContext::default())
            .await
            .expect("check");
        assert_eq!(outcome, Outcome::Unchanged);
        assert!(!marker.exists());

        spec.ifcmd = Some(format!("test ! -e {}", marker.display()));
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
        spec.watchcmd = Some("echo one; echo two; sleep 30".into());
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
}
