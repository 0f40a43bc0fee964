//! Running commands: stdout and stderr streamed apart as they arrive, stdin written at will,
//! and the exit status or signal at the end. Command lines are built with [`CommandLine`],
//! which quotes every argument for a POSIX shell, so no caller joins strings into one.

use super::error::{Cause, Result, Step};
use super::session::Session;
use bytes::Bytes;
use russh::ChannelMsg;
use russh::client::Msg;
use russh::{ChannelReadHalf, ChannelWriteHalf};
use std::borrow::Cow;

/// Quotes `arg` for a POSIX shell. Safe characters pass as they are; anything else is
/// wrapped in single quotes, with embedded single quotes written as `'\''`.
pub fn shell_quote(arg: &str) -> Cow<'_, str> {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b));
    if safe {
        Cow::Borrowed(arg)
    } else {
        Cow::Owned(format!("'{}'", arg.replace('\'', r"'\''")))
    }
}

/// A remote command line built from separate arguments, each quoted.
#[derive(Debug, Clone, Default)]
pub struct CommandLine {
    line: String,
}

impl CommandLine {
    pub fn new(program: &str) -> Self {
        CommandLine {
            line: shell_quote(program).into_owned(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<str>) -> Self {
        self.line.push(' ');
        self.line.push_str(&shell_quote(arg.as_ref()));
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn as_str(&self) -> &str {
        &self.line
    }
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    Signal {
        signal: String,
        core_dumped: bool,
    },
    /// The channel closed without an exit status (connection lost, or the server didn't say).
    Unknown,
    /// The server closed the channel before answering the exec request: the command did not
    /// run on this channel (dropbear before 2024.86 can do this; see `ssh::sftp`). That
    /// dropbear may still start it on the closed channel, where it finds its stdin closed.
    ClosedBeforeReply,
    /// The server refused the exec request.
    Refused,
}

impl ExitStatus {
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal {
                signal,
                core_dumped,
            } => write!(
                f,
                "killed by SIG{signal}{}",
                if *core_dumped { " (core dumped)" } else { "" }
            ),
            ExitStatus::Unknown => write!(f, "no exit status (channel closed)"),
            ExitStatus::ClosedBeforeReply => write!(
                f,
                "no exit status: the server closed the channel before answering the exec request"
            ),
            ExitStatus::Refused => write!(f, "the server refused to run the command"),
        }
    }
}

/// One thing a running command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    /// Always the last item.
    Exit(ExitStatus),
}

/// Options for [`Session::exec`].
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Request agent forwarding on this channel (served by the session's agent connector).
    pub forward_agent: bool,
}

/// A command running on the far host.
pub struct RemoteCommand {
    label: String,
    read: ChannelReadHalf,
    write: ChannelWriteHalf<Msg>,
    status: Option<ExitStatus>,
    /// Replies to our channel requests still due; the exec request's is the last.
    replies_due: u8,
    /// The server accepted the exec request.
    started: bool,
    done: bool,
}

/// Everything a finished command produced.
#[derive(Debug, Clone)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

impl Session {
    /// Starts `command` (a shell command line: build it with [`CommandLine`]).
    pub async fn exec(&self, command: &str, options: &ExecOptions) -> Result<RemoteCommand> {
        let channel = self.open_channel(Step::Exec).await?;
        if options.forward_agent {
            channel
                .agent_forward(true)
                .await
                .map_err(|e| self.error(Step::Exec, e))?;
        }
        channel
            .exec(true, command)
            .await
            .map_err(|e| self.error(Step::Exec, e))?;
        let (read, write) = channel.split();
        Ok(RemoteCommand {
            label: self.label().to_string(),
            read,
            write,
            status: None,
            replies_due: if options.forward_agent { 2 } else { 1 },
            started: false,
            done: false,
        })
    }

    /// Runs `command` to completion with empty stdin and collects its output.
    pub async fn output(&self, command: &str) -> Result<Collected> {
        self.output_with_input(command, &[]).await
    }

    /// [`Session::output`] with `input` on the command's stdin: for a list that grows with the
    /// work (a command line is capped: 128 KiB for one argument on Linux, 9000 bytes in
    /// dropbear).
    pub async fn output_with_input(&self, command: &str, input: &[u8]) -> Result<Collected> {
        let cmd = self.exec(command, &ExecOptions::default()).await?;
        if !input.is_empty() {
            cmd.write_stdin(input).await?;
        }
        cmd.close_stdin().await?;
        cmd.collect().await
    }

    /// Runs `command` and fails unless it exits 0; the error carries its stderr.
    pub async fn run_checked(&self, command: &str) -> Result<Vec<u8>> {
        self.run_checked_with_input(command, &[]).await
    }

    /// [`Session::run_checked`] with `input` on the command's stdin
    /// ([`Session::output_with_input`]).
    pub async fn run_checked_with_input(&self, command: &str, input: &[u8]) -> Result<Vec<u8>> {
        let out = self.output_with_input(command, input).await?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(self.error(
                Step::Exec,
                Cause::Other(format!(
                    "`{command}` failed with {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            ))
        }
    }
}

impl RemoteCommand {
    /// The next piece of output, then the exit status, then `None`.
    pub async fn next(&mut self) -> Option<Output> {
        if self.done {
            return None;
        }
        loop {
            match self.read.wait().await {
                Some(ChannelMsg::Data { data }) => return Some(Output::Stdout(data)),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    return Some(Output::Stderr(data));
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => {
                    self.status = Some(ExitStatus::Code(exit_status));
                }
                Some(ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    ..
                }) => {
                    self.status = Some(ExitStatus::Signal {
                        signal: signal_name_of(&signal_name),
                        core_dumped,
                    });
                }
                // Replies come in the order of the requests: agent forwarding's (whose refusal
                // only means no agent), then the exec request's.
                Some(ChannelMsg::Success) if self.replies_due > 0 => {
                    self.replies_due -= 1;
                    self.started = self.replies_due == 0;
                }
                Some(ChannelMsg::Failure) if self.replies_due > 0 => {
                    self.replies_due -= 1;
                    if self.replies_due == 0 {
                        self.done = true;
                        let _ = self.write.close().await;
                        return Some(Output::Exit(ExitStatus::Refused));
                    }
                }
                // Closed by the server before it answered the exec request.
                Some(ChannelMsg::Close) if !self.started && self.status.is_none() => {
                    self.done = true;
                    return Some(Output::Exit(ExitStatus::ClosedBeforeReply));
                }
                Some(ChannelMsg::Close) | None => {
                    self.done = true;
                    return Some(Output::Exit(
                        self.status.take().unwrap_or(ExitStatus::Unknown),
                    ));
                }
                Some(_) => {}
            }
        }
    }

    /// Writes to the command's stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        self.write
            .data_bytes(Bytes::copy_from_slice(data))
            .await
            .map_err(|e| self.error(e))
    }

    /// A writer for the command's stdin (for framed protocols over stdin).
    pub fn stdin_writer(&self) -> impl tokio::io::AsyncWrite + Send + Unpin + 'static {
        self.write.make_writer()
    }

    /// Sends EOF on stdin.
    pub async fn close_stdin(&self) -> Result<()> {
        self.write.eof().await.map_err(|e| self.error(e))
    }

    /// Reads everything to the end.
    pub async fn collect(mut self) -> Result<Collected> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(item) = self.next().await {
            match item {
                Output::Stdout(d) => stdout.extend_from_slice(&d),
                Output::Stderr(d) => stderr.extend_from_slice(&d),
                Output::Exit(status) => {
                    return Ok(Collected {
                        stdout,
                        stderr,
                        status,
                    });
                }
            }
        }
        Err(self.error(Cause::Other("output ended twice".into())))
    }

    fn error(&self, cause: impl Into<Cause>) -> super::error::SshError {
        super::error::SshError::new(self.label.clone(), Step::Exec, cause)
    }
}

fn signal_name_of(sig: &russh::Sig) -> String {
    let debug = format!("{sig:?}");
    match sig {
        russh::Sig::Custom(name) => name.clone(),
        _ => debug,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_leaves_safe_words_and_wraps_the_rest() {
        assert_eq!(shell_quote("/tmp/a-b_c.d"), "/tmp/a-b_c.d");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn quoted_command_line_survives_a_real_shell() {
        let nasty = ["a b", "it's", "$HOME", "`id`", "x;y", "\"q\"", "\\n", "*"];
        let line = CommandLine::new("printf").arg("%s\\n").args(nasty);
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(line.as_str())
            .output()
            .expect("run sh");
        let printed = String::from_utf8(out.stdout).expect("utf8");
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(lines, nasty);
    }
}
