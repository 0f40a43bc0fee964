//! Staging a child: the one code path every node, at every depth, uses to put arbor on a host.
//!
//! 1. Check the host's OS and architecture (`uname -sm`) and pick the build to copy; refuse
//!    before copying anything if none matches.
//! 2. Create a private working dir (mktemp: mode 0700, unpredictable name).
//! 3. Copy the binary into the content-addressed cache `~/.cache/arbor/bin/<sha256>/arbor`
//!    (XDG_CACHE_HOME respected) unless an intact copy (size and sha256) is already there; with
//!    --no-caching, into the working dir instead. Uploads are atomic, so an interrupted copy
//!    never leaves a bad cache entry, and the far side's sha256 is checked after the copy.
//! 4. Copy the graph into the working dir.
//!
//! Tunnel and exec come after, in `child.rs`.

use crate::ssh::{CommandLine, Session, SshError, shell_quote};
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A build of arbor that can be copied to hosts of one OS and architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    /// `uname -sm` of the hosts it runs on, e.g. "Linux x86_64".
    pub platform: String,
}

impl Build {
    /// Hashes the file at `path`, a build for `platform`.
    pub fn from_file(path: &Path, platform: &str) -> std::io::Result<Build> {
        let bytes = std::fs::read(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Build {
            path: path.to_path_buf(),
            sha256: data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(&bytes)),
            size: bytes.len() as u64,
            platform: platform.to_string(),
        })
    }

    /// The running executable: what a node copies to its children by default.
    pub fn current() -> std::io::Result<Build> {
        Build::from_file(&std::env::current_exe()?, &local_platform())
    }
}

/// `uname -sm` of this machine, as arbor was built for it.
pub fn local_platform() -> String {
    let os = match std::env::consts::OS {
        "linux" => "Linux",
        "macos" => "Darwin",
        "freebsd" => "FreeBSD",
        other => other,
    };
    format!("{os} {}", std::env::consts::ARCH)
}

/// The builds a node can copy, by platform.
#[derive(Debug, Clone, Default)]
pub struct Builds {
    by_platform: BTreeMap<String, Arc<Build>>,
}

impl Builds {
    pub fn new(builds: impl IntoIterator<Item = Build>) -> Self {
        Builds {
            by_platform: builds
                .into_iter()
                .map(|b| (normalize_platform(&b.platform), Arc::new(b)))
                .collect(),
        }
    }

    pub fn for_platform(&self, platform: &str) -> Option<Arc<Build>> {
        self.by_platform.get(&normalize_platform(platform)).cloned()
    }

    pub fn platforms(&self) -> Vec<String> {
        self.by_platform.keys().cloned().collect()
    }
}

/// "Linux x86_64", "linux-x86_64", "x86_64" (Linux implied) all name one platform.
pub fn normalize_platform(text: &str) -> String {
    let parts: Vec<String> = text
        .split(|c: char| c.is_whitespace() || c == '-' || c == '/')
        .filter(|s| !s.is_empty())
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let (os, arch) = match parts.as_slice() {
        [arch] => ("linux".to_string(), arch.clone()),
        [os, arch, ..] => (os.clone(), arch.clone()),
        [] => (String::new(), String::new()),
    };
    let arch = match arch.as_str() {
        "amd64" => "x86_64".to_string(),
        "arm64" => "aarch64".to_string(),
        _ => arch,
    };
    format!("{os} {arch}")
}

/// How to stage.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// Parent of the working dir on the host (--remote-tmp).
    pub remote_tmp: String,
    /// Copy the binary into the working dir, and remove it at the end (--no-caching).
    pub no_caching: bool,
}

impl Default for StageOptions {
    fn default() -> Self {
        StageOptions {
            remote_tmp: "/tmp".into(),
            no_caching: false,
        }
    }
}

/// A staged host: where things are, and what it cost.
#[derive(Debug, Clone)]
pub struct Staged {
    pub workdir: String,
    pub binary: String,
    pub graph: Option<String>,
    pub platform: String,
    /// The binary was already in the host's cache.
    pub cached: bool,
    /// Bytes of files copied (binary and graph).
    pub bytes_copied: u64,
}

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error(
        "{host}: stage: host runs {platform}, and no build for it was given \
         (this arbor is for {available}); pass --binary ARCH=PATH"
    )]
    Platform {
        host: String,
        platform: String,
        available: String,
    },
    #[error("{host}: stage: {what}")]
    Other { host: String, what: String },
}

/// Progress of one transfer: what, bytes sent, total.
pub type Progress<'a> = &'a mut (dyn FnMut(&str, u64, u64) + Send);

/// Stages `session`'s host: see the module docs.
pub async fn stage(
    session: &Session,
    builds: &Builds,
    options: &StageOptions,
    graph: Option<(&str, &[u8])>,
    progress: Progress<'_>,
) -> Result<Staged, StageError> {
    let host = session.label().to_string();
    let other = |what: String| StageError::Other {
        host: host.clone(),
        what,
    };

    let uname = session.run_checked("uname -sm").await?;
    let platform = String::from_utf8_lossy(&uname).trim().to_string();
    let Some(build) = builds.for_platform(&platform) else {
        return Err(StageError::Platform {
            host: host.clone(),
            platform,
            available: builds.platforms().join(", "),
        });
    };

    // One round trip: the working dir, the cache dir, and whether the cache holds this build.
    let probe = format!(
        "set -e; umask 077; \
         w=$(mktemp -d {tmp}/arbor.XXXXXXXXXX); echo \"$w\"; \
         c=\"${{XDG_CACHE_HOME:-$HOME/.cache}}/arbor/bin\"; echo \"$c\"; \
         f=\"$c\"/{sha}/arbor; \
         if [ -f \"$f\" ] && [ \"$(wc -c < \"$f\")\" -eq {size} ] && \
            sha256sum \"$f\" | grep -q '^{sha} '; then echo cached; else echo missing; fi",
        tmp = shell_quote(options.remote_tmp.trim_end_matches('/')),
        sha = build.sha256,
        size = build.size,
    );
    let out = session.run_checked(&probe).await?;
    let out = String::from_utf8_lossy(&out);
    let mut lines = out.lines();
    let (Some(workdir), Some(cache), Some(state)) = (lines.next(), lines.next(), lines.next())
    else {
        return Err(other(format!("unexpected probe output: {out:?}")));
    };
    let workdir = workdir.to_string();
    let cached = state == "cached" && !options.no_caching;

    let sftp = session.sftp().await?;
    let mut bytes_copied = 0;
    // Named `arbor` inside a directory named by its hash, so `ps` and `pgrep arbor` show it.
    let entry = format!("{cache}/{}", build.sha256);
    let binary = if options.no_caching {
        format!("{workdir}/arbor")
    } else {
        format!("{entry}/arbor")
    };
    if !cached {
        if !options.no_caching {
            session
                .run_checked(
                    CommandLine::new("mkdir")
                        .args(["-p", "-m", "700", &entry])
                        .as_str(),
                )
                .await?;
        }
        let mut file = tokio::fs::File::open(&build.path)
            .await
            .map_err(|e| other(format!("opening {}: {e}", build.path.display())))?;
        let uploaded = sftp
            .upload(&mut file, build.size, &binary, 0o755, &mut |sent, total| {
                progress("arbor", sent, total)
            })
            .await?;
        bytes_copied += uploaded.bytes;
        let check = session
            .run_checked(CommandLine::new("sha256sum").arg(&binary).as_str())
            .await?;
        if !String::from_utf8_lossy(&check).starts_with(&build.sha256) {
            let _ = sftp.remove(&binary).await;
            return Err(other(format!(
                "copy of arbor to {binary} is corrupt (sha256 mismatch); removed it"
            )));
        }
    } else {
        progress("arbor", build.size, build.size);
    }

    let graph = match graph {
        Some((name, text)) => {
            let path = format!("{workdir}/{name}");
            let uploaded = sftp
                .upload(
                    &mut &text[..],
                    text.len() as u64,
                    &path,
                    0o600,
                    &mut |_, _| {},
                )
                .await?;
            bytes_copied += uploaded.bytes;
            Some(path)
        }
        None => None,
    };
    Ok(Staged {
        workdir,
        binary,
        graph,
        platform,
        cached,
        bytes_copied,
    })
}

/// Removes a working dir (and with it a --no-caching binary). Best effort: the host may be gone.
pub async fn remove_workdir(session: &Session, workdir: &str) -> Result<(), SshError> {
    // Guard against ever removing something that is not one of our working dirs.
    if !workdir.contains("/arbor.") {
        return Ok(());
    }
    session
        .run_checked(CommandLine::new("rm").args(["-rf", "--", workdir]).as_str())
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_normalize() {
        assert_eq!(normalize_platform("Linux x86_64"), "linux x86_64");
        assert_eq!(normalize_platform("x86_64"), "linux x86_64");
        assert_eq!(normalize_platform("linux-arm64"), "linux aarch64");
        assert_eq!(normalize_platform("Linux aarch64"), "linux aarch64");
    }

    #[test]
    fn local_platform_matches_uname() {
        let uname = std::process::Command::new("uname")
            .arg("-sm")
            .output()
            .expect("uname");
        let uname = String::from_utf8_lossy(&uname.stdout);
        assert_eq!(
            normalize_platform(uname.trim()),
            normalize_platform(&local_platform())
        );
    }

    #[test]
    fn build_hash_is_sha256_of_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("b");
        std::fs::write(&p, b"abc").expect("write");
        let b = Build::from_file(&p, "Linux x86_64").expect("build");
        assert_eq!(
            b.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(b.size, 3);
        let set = Builds::new([b]);
        assert!(set.for_platform("x86_64").is_some());
        assert!(set.for_platform("Linux aarch64").is_none());
    }
}
