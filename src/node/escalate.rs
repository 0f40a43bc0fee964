//! Become: arbor started on a host as root through sudo, after logging in as a user that may
//! not log in as root (`become: true` in a topology, `--become` on the command line).
//!
//! Staging is the login user's, as without become: the probe, the binary cache in the login
//! user's home and the working dir W (mode 0700) are theirs. Root must not run anything the
//! login user can still change, so the start goes:
//!
//! 1. `sudo -n` (or, when the operator gave a password, `sudo -S` with a prompt of ours) runs
//!    a short script as root. The password is written to the exec channel's stdin when sudo
//!    prints that prompt, never put on argv; a second prompt means sudo refused it.
//! 2. The script makes `W.root` (mode 0700, root's; `mkdir` fails if anything is there
//!    already, so the login user cannot plant it; the script removes it again if it fails), copies the binary there and checks its
//!    sha256 against the build the parent staged, copies the graph and a kept `arbor.gz`
//!    (which arbor checks again before passing it on), prints a marker line and execs the
//!    copy as `arbor run --workdir W.root`. The store socket stays in W, made by sshd for the
//!    login user; root reaches it. A relay gets the forwarded agent socket (sudo resets the
//!    environment) and the login user's cache dir, where its parent put the artifacts (they are
//!    checked by sha256 before any use).
//! 3. The parent waits for the marker, then speaks the usual protocol on stdin/stdout.
//!
//! Cleanup runs through sudo too: the parent removes `W.root` (and, when arbor never said
//! hello, stops it) as root, W as the login user.

use super::config::RunOptions;
use super::stage::Staged;
use crate::ssh::{CommandLine, ExecOptions, Output, RemoteCommand, Session, shell_quote};
use crate::wire::{Become, ChildMode, ChildSpec};
use std::time::Duration;

/// What root's script prints on stdout once it is about to exec arbor.
const READY: &[u8] = b"arbor-become-ready\n";
/// sudo's password prompt (`sudo -p`): ours, so it is told apart from anything else on stderr.
const PROMPT: &str = "[arbor-become] password: ";
/// How much of sudo's stderr is kept for an error message.
const KEEP_STDERR: usize = 2048;

/// arbor's working dir on a host it was started on through sudo: root's, beside the login
/// user's.
pub fn root_dir(workdir: &str) -> String {
    format!("{workdir}.root")
}

/// The dir arbor runs in on a staged host: W, or W.root with become.
pub fn node_workdir(staged: &Staged) -> String {
    match &staged.escalate {
        Some(_) => root_dir(&staged.workdir),
        None => staged.workdir.clone(),
    }
}

/// `sudo` and its options, up to `--`.
pub fn sudo(become_: &Become) -> String {
    let prompt = match &become_.password {
        Some(_) => format!("-S -p {}", shell_quote(PROMPT)),
        None => "-n".to_string(),
    };
    format!("sudo {prompt} -u {} --", shell_quote(&become_.user))
}

/// Root's script: `$1` W, `$2` the staged binary, `$3` its sha256, `$4` the agent socket (may
/// be empty), `$5` the login user's cache dir; then arbor's arguments.
const START_SCRIPT: &str = r#"set -e; umask 077
w=$1 bin=$2 sha=$3 agent=$4 cache=$5; shift 5
r="$w.root"
mkdir -m 700 -- "$r"
trap 'rm -rf -- "$r"' EXIT
cp -- "$bin" "$r/arbor"
if ! printf '%s  %s\n' "$sha" "$r/arbor" | sha256sum -c --status; then
  echo "become: the staged binary changed before root could copy it (sha256 mismatch); not run" >&2
  exit 1
fi
if [ -f "$w/graph.yaml" ]; then cp -- "$w/graph.yaml" "$r/graph.yaml"; fi
if [ -f "${bin%/*}/arbor.gz" ]; then cp -- "${bin%/*}/arbor.gz" "$r/arbor.gz"; fi
if [ -n "$agent" ]; then SSH_AUTH_SOCK=$agent; export SSH_AUTH_SOCK; fi
XDG_CACHE_HOME=$cache; export XDG_CACHE_HOME
cd "$r"
trap - EXIT
echo arbor-become-ready
exec "$r/arbor" "$@""#;

/// The command line that starts arbor with `args` as root (see the module docs). `args` name
/// the root dir ([`root_dir`]) as the working dir.
pub fn start_command(staged: &Staged, become_: &Become, args: &[String]) -> String {
    let cache = staged
        .cache
        .strip_suffix("/arbor/bin")
        .unwrap_or(&staged.cache);
    let script = CommandLine::new("/bin/sh").args([
        "-c",
        START_SCRIPT,
        "arbor-become",
        &staged.workdir,
        &staged.binary,
        &staged.sha256,
    ]);
    // The agent socket is the login user's shell's to expand: sshd set it for this channel.
    let rest = CommandLine::new(cache).args(args);
    format!(
        "{} {} \"${{SSH_AUTH_SOCK:-}}\" {}",
        sudo(become_),
        script.as_str(),
        rest.as_str()
    )
}

/// Why sudo did not start root's script.
pub struct Refused {
    /// A sentence naming the host and the step.
    pub message: String,
    /// sudo refused the password or wanted one: nothing ran as root.
    pub nothing_as_root: bool,
}

/// Waits until sudo has started root's script: answers sudo's password prompt once, and
/// returns the bytes of stdout that came after the marker (the start of arbor's frames).
pub async fn handshake(
    command: &mut RemoteCommand,
    become_: &Become,
    label: &str,
    timeout: Duration,
) -> Result<Vec<u8>, Refused> {
    let failed = |message: String| Refused {
        message,
        nothing_as_root: false,
    };
    let (mut stdout, mut stderr) = (Vec::<u8>::new(), Vec::<u8>::new());
    let mut prompts = Prompts::new(Some(become_));
    let user = &become_.user;
    let work = async {
        while let Some(item) = command.next().await {
            match item {
                Output::Stdout(data) => {
                    stdout.extend_from_slice(&data);
                    if let Some(at) = find(&stdout, READY) {
                        return Ok(stdout.split_off(at + READY.len()));
                    }
                    if stdout.len() > KEEP_STDERR {
                        return Err(failed(format!(
                            "{label}: become: unexpected output before arbor started: {:?}",
                            String::from_utf8_lossy(&stdout[..200])
                        )));
                    }
                }
                Output::Stderr(data) => {
                    // Anything else sudo says (a warning, "Sorry, try again.") is kept for
                    // the error message.
                    let said = prompts.answer(&data, command, label).await?;
                    if stderr.len() < KEEP_STDERR {
                        stderr.extend_from_slice(&said);
                    }
                }
                Output::Exit(status) => {
                    let said = String::from_utf8_lossy(&stderr).replace(PROMPT, "");
                    let said = said.trim();
                    let wants_password = said.contains("a password is required");
                    let hint = if wants_password {
                        " (sudo wants a password: pass --ask-become-pass or \
                         --become-password-file)"
                    } else if said.contains("command not found") || said.contains("sudo: not found")
                    {
                        " (the host has no sudo)"
                    } else {
                        ""
                    };
                    return Err(Refused {
                        message: format!(
                            "{label}: become: sudo did not start arbor as {user}: {status}; \
                             stderr: {said}{hint}"
                        ),
                        nothing_as_root: wants_password,
                    });
                }
            }
        }
        Err(failed(format!(
            "{label}: become: the channel closed before arbor started"
        )))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(failed(format!(
                "{label}: become: sudo did not start arbor within {}s",
                timeout.as_secs()
            )))
        })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Runs shell `script` as the become user (cleanup, reading a log), bounded in time; its
/// stdout, or `None` if it could not run.
pub async fn run(session: &Session, become_: &Become, script: &str) -> Option<Vec<u8>> {
    let line = format!(
        "{} {}",
        sudo(become_),
        CommandLine::new("/bin/sh").args(["-c", script]).as_str()
    );
    let work = async {
        let command = session.exec(&line, &ExecOptions::default()).await.ok()?;
        if let Some(password) = &become_.password {
            // Read by sudo if it asks, else by the script, which ignores its stdin.
            command
                .write_stdin(format!("{password}\n").as_bytes())
                .await
                .ok()?;
        }
        command.close_stdin().await.ok()?;
        let out = command.collect().await.ok()?;
        out.status.success().then_some(out.stdout)
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .ok()
        .flatten()
}

/// Removes root's dir of a staged host that became root, after running shell `first` as root
/// if given, with one sudo (a refused password costs sudo's delay once). Best effort: the host
/// may be gone.
pub async fn remove_root_dir(session: &Session, staged: &Staged, first: Option<&str>) {
    let Some(become_) = &staged.escalate else {
        return;
    };
    let mut script: Vec<String> = first.map(str::to_string).into_iter().collect();
    // Never anything that is not one of our working dirs.
    if staged.workdir.contains("/arbor.") {
        let dir = root_dir(&staged.workdir);
        script.push(
            CommandLine::new("rm")
                .args(["-rf", "--", &dir])
                .as_str()
                .to_string(),
        );
    }
    if !script.is_empty() {
        let _ = run(session, become_, &script.join("; ")).await;
    }
}

/// Answers sudo's password prompt (ours) in a command's stderr once: for the start of arbor
/// ([`handshake`]) and for `arbor exec`.
pub struct Prompts<'a> {
    become_: Option<&'a Become>,
    answered: bool,
    /// The end of the stderr seen so far, shorter than the prompt: a prompt split across two
    /// reads is still seen.
    tail: Vec<u8>,
}

impl<'a> Prompts<'a> {
    pub fn new(become_: Option<&'a Become>) -> Self {
        Prompts {
            become_,
            answered: false,
            tail: Vec::new(),
        }
    }

    /// `data` without the prompt; the password is written to stdin the first time the prompt
    /// shows. A second prompt means sudo refused it: an error naming `host`.
    pub async fn answer(
        &mut self,
        data: &[u8],
        command: &RemoteCommand,
        host: &str,
    ) -> Result<Vec<u8>, Refused> {
        let Some(become_) = self.become_.filter(|b| b.password.is_some()) else {
            return Ok(data.to_vec());
        };
        let mut seen = std::mem::take(&mut self.tail);
        seen.extend_from_slice(data);
        let prompts = count(&seen, PROMPT.as_bytes());
        self.tail = seen[seen.len().saturating_sub(PROMPT.len() - 1)..].to_vec();
        if prompts == 0 {
            return Ok(data.to_vec());
        }
        if self.answered {
            return Err(Refused {
                message: format!(
                    "{host}: become: sudo refused the password for {} (it asked again)",
                    become_.user
                ),
                nothing_as_root: true,
            });
        }
        self.answered = true;
        let line = format!("{}\n", become_.password.as_deref().unwrap_or_default());
        command
            .write_stdin(line.as_bytes())
            .await
            .map_err(|e| Refused {
                message: format!("{host}: become: {e}"),
                nothing_as_root: false,
            })?;
        let text = String::from_utf8_lossy(data).replacen(PROMPT, "", 1);
        Ok(text.into_bytes())
    }
}

/// The command line's `--become`, and the passwords the operator gives once per run (`-k`,
/// `--password-file`, `-K`, `--become-password-file`), put into every host's spec that needs
/// them: before anything is contacted, so a missing answer is bad input. The command line
/// beats the topology.
pub fn apply_operator_choices(
    children: &mut [ChildSpec],
    options: &RunOptions,
) -> Result<(), String> {
    fn each(specs: &mut [ChildSpec], f: &mut dyn FnMut(&mut ChildSpec)) {
        for spec in specs {
            f(spec);
            each(&mut spec.jumps, f);
            each(&mut spec.children, f);
        }
    }
    let prompter = crate::ssh::TerminalPrompter::default();
    if options.escalate {
        each(children, &mut |spec| {
            if spec.mode == ChildMode::Relay && spec.escalate.is_none() {
                spec.escalate = Some(Become {
                    user: "root".into(),
                    password: None,
                });
            }
        });
    }
    let mut becoming = 0;
    each(children, &mut |spec| {
        becoming += usize::from(spec.escalate.is_some())
    });
    let become_password = match (&options.become_password_file, options.ask_become_pass) {
        (Some(path), _) => Some(super::seeds::read_password_file(
            "--become-password-file",
            path,
        )?),
        (None, true) if becoming > 0 => Some(
            prompter
                .secret(&format!(
                    "sudo password ({becoming} host{} become root): ",
                    if becoming == 1 { "" } else { "s" }
                ))
                .ok_or("--ask-become-pass: no terminal to ask on (use --become-password-file)")?,
        ),
        _ => None,
    };
    if (options.ask_become_pass || options.become_password_file.is_some()) && becoming == 0 {
        tracing::warn!(
            "a sudo password was given, but no host becomes root (--become, or `become: true` \
             in the topology)"
        );
    }
    if let Some(password) = become_password {
        each(children, &mut |spec| {
            if let Some(b) = &mut spec.escalate {
                b.password = Some(password.clone());
            }
        });
    }
    let password = match (&options.password_file, options.ask_pass) {
        (Some(path), _) => Some(super::seeds::read_password_file("--password-file", path)?),
        (None, true) if !children.is_empty() => Some(
            prompter
                .secret("SSH password (every host): ")
                .ok_or("--ask-pass: no terminal to ask on (use --password-file)")?,
        ),
        _ => None,
    };
    if let Some(password) = password {
        each(children, &mut |spec| {
            spec.password = Some(password.clone());
            spec.password_asked = true;
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_command_quotes_everything_and_keeps_the_password_off_argv() {
        let staged = Staged {
            workdir: "/tmp/arbor.abc".into(),
            cache: "/home/o p/.cache/arbor/bin".into(),
            binary: "/home/o p/.cache/arbor/bin/ff/arbor".into(),
            graph: None,
            platform: "Linux x86_64".into(),
            cached: true,
            bytes_copied: 0,
            sha256: "ff".into(),
            escalate: None,
            rate: None,
        };
        let with_password = Become {
            user: "root".into(),
            password: Some("s3cret; rm -rf /".into()),
        };
        let line = start_command(&staged, &with_password, &["run".into(), "--x y".into()]);
        assert!(!line.contains("s3cret"), "{line}");
        assert!(line.starts_with("sudo -S -p '[arbor-become] password: ' -u root -- /bin/sh -c "));
        assert!(
            line.ends_with(" \"${SSH_AUTH_SOCK:-}\" '/home/o p/.cache' run '--x y'"),
            "{line}"
        );
        let without = Become {
            user: "root".into(),
            password: None,
        };
        assert!(start_command(&staged, &without, &[]).starts_with("sudo -n -u root -- "));
    }

    #[test]
    fn the_start_script_is_valid_shell() {
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", START_SCRIPT])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
