//! Shared by the end-to-end test binaries: a lab of real SSH hosts (integration/lab) that is
//! brought up for one test binary and always torn down, failed tests included.
#![allow(dead_code)]

pub mod harness;
pub mod http_client;
mod store;
pub mod terminal;
#[allow(unused_imports)]
pub use store::*;

/// Fails the test with a message unless the condition holds.
#[allow(unused_macros)]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(support::harness::fail(format!($($fmt)+)));
        }
    };
}

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running lab. Dropping it runs `integration/lab down`.
pub struct Lab {
    pub name: String,
    env: HashMap<String, String>,
}

impl Lab {
    /// Brings up a lab for this test process, named `<prefix><pid>` so that concurrent runs
    /// (and a developer's own labs) never touch each other. Labs left by killed runs of the
    /// same prefix, whose process is gone, are torn down first.
    pub fn up(prefix: &str, args: &[&str]) -> Lab {
        assert!(
            unsafe { libc::geteuid() } == 0,
            "the end-to-end tests build network namespaces and must run as root"
        );
        let script = repo_root().join("integration/lab");
        reap_stale_labs(prefix);
        let name = format!("{prefix}{}", std::process::id());
        let name = name.as_str();
        let out = Command::new(&script)
            .args(["up", "--name", name])
            .args(args)
            .output()
            .expect("run integration/lab up");
        if !out.status.success() {
            let _ = Command::new(&script)
                .args(["down", "--name", name])
                .output();
            panic!(
                "integration/lab up failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env_path = Command::new(&script)
            .args(["env", "--name", name])
            .output()
            .expect("run integration/lab env");
        let env_path = String::from_utf8_lossy(&env_path.stdout).trim().to_string();
        let text = std::fs::read_to_string(&env_path)
            .unwrap_or_else(|e| panic!("reading lab env {env_path}: {e}"));
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Lab {
            name: name.to_string(),
            env,
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("lab env has no {key}"))
    }

    fn host_key(host: &str, what: &str) -> String {
        format!("HOST_{}_{what}", host.replace('-', "_"))
    }

    /// The address the initiator (or, for leaves, the relay) uses for `host`.
    pub fn addr(&self, host: &str) -> String {
        self.get(&Self::host_key(host, "ADDR")).to_string()
    }

    pub fn addr6(&self, host: &str) -> String {
        self.get(&Self::host_key(host, "ADDR6")).to_string()
    }

    /// The initiator's HOME: .ssh/id_ed25519 and .ssh/known_hosts live there.
    pub fn home(&self) -> PathBuf {
        PathBuf::from(self.get("LAB_HOME"))
    }

    pub fn dir(&self) -> PathBuf {
        PathBuf::from(self.get("LAB_DIR"))
    }

    pub fn init_ns(&self) -> &str {
        self.get("LAB_INIT_NS")
    }

    /// Runs a shell command on a lab host (or `init`) and returns its output.
    pub fn exec(&self, host: &str, shell: &str) -> Output {
        Command::new(repo_root().join("integration/lab"))
            .args(["exec", "--name", &self.name, host, "sh", "-c", shell])
            .output()
            .expect("run integration/lab exec")
    }

    /// Like [`exec`](Self::exec) but returns stdout and panics on failure.
    pub fn sh(&self, host: &str, shell: &str) -> String {
        let out = self.exec(host, shell);
        assert!(
            out.status.success(),
            "`{shell}` on {host} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Bytes sent and received on the initiator's link, from its counters.
    pub fn init_link_bytes(&self) -> (u64, u64) {
        let out = Command::new("ip")
            .args(["netns", "exec", self.init_ns(), "cat"])
            .arg(format!(
                "/sys/class/net/{}/statistics/tx_bytes",
                self.get("LAB_INIT_IF")
            ))
            .arg(format!(
                "/sys/class/net/{}/statistics/rx_bytes",
                self.get("LAB_INIT_IF")
            ))
            .output()
            .expect("read link counters");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut n = text.lines().map(|l| l.trim().parse::<u64>().unwrap_or(0));
        (n.next().unwrap_or(0), n.next().unwrap_or(0))
    }

    /// Moves the calling thread into the initiator's network namespace and runs `f` on a
    /// runtime confined to this thread, so every socket it opens is the initiator's.
    pub fn run<F: Future>(&self, f: F) -> F::Output {
        enter_netns(self.init_ns());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(f)
    }

    pub fn down(&self) {
        let _ = Command::new(repo_root().join("integration/lab"))
            .args(["down", "--name", &self.name])
            .output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.down();
    }
}

/// Tears down labs named `<prefix><pid>` whose pid no longer runs.
fn reap_stale_labs(prefix: &str) {
    let base = std::env::var("ARBOR_LAB_DIR").unwrap_or_else(|_| "/tmp/arbor-lab".into());
    let Ok(entries) = std::fs::read_dir(&base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new(repo_root().join("integration/lab"))
                .args(["down", "--name", &name])
                .output();
        }
    }
}

/// Joins the named network namespace on the calling thread only.
pub fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let path = Path::new("/run/netns").join(name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// Runs a command on this machine (outside the lab) and returns stdout, panicking on failure.
pub fn local(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Replaces the block between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in
/// docs/benchmarks.md with `body` (appending the block if it is missing), stamped with the date.
/// The mgmt article's example graph `examples/remote2{which}.yaml`, its `remote:` pointed at
/// `addr`, written into `dir`; returns its path.
pub fn article_graph(dir: &Path, which: &str, addr: &str) -> PathBuf {
    let src = std::fs::read_to_string(repo_root().join(format!("examples/remote2{which}.yaml")))
        .expect("example");
    let text: String = src
        .lines()
        .map(|l| {
            if l.starts_with("remote:") {
                format!("remote: ssh://root@{addr}:22\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let path = dir.join(format!("remote2{which}.yaml"));
    std::fs::write(&path, text).expect("write graph");
    path
}

/// The benches' lab topology: `relays` relays (10.199.0.11, …), each with `leaves` leaves
/// (10.199.R.11, …) running examples/leaf.yaml; with `jump`, each relay is a jump host
/// (`mode: jump`) instead. The file lives as long as the returned dir.
pub fn leaf_topology(relays: usize, leaves: usize, jump: bool) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = repo_root().join("examples/leaf.yaml");
    let mut text = String::from("defaults:\n  user: root\nhosts:\n");
    for r in 1..=relays {
        text += &format!("- host: 10.199.0.{}\n  name: r{r}\n", 10 + r);
        if jump {
            text += "  mode: jump\n";
        }
        text += &format!(
            "  children:\n  - host: 10.199.{r}.[{}-{}]\n    name: l{r}-[1-{leaves}]\n    graph: {}\n",
            11,
            10 + leaves,
            leaf.display()
        );
    }
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, text).expect("write topology");
    (dir, path)
}

/// The commit being measured, `+` when the code (not the docs) differs from it.
pub fn git_describe() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR")])
            .args(args)
            .output()
            .ok()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let code = ["src", "integration", "Cargo.toml", "Cargo.lock"];
    let clean = git(&[&["diff", "--quiet", "HEAD", "--"][..], &code[..]].concat())
        .is_some_and(|o| o.status.success());
    if clean { commit } else { format!("{commit}+") }
}

pub fn write_bench_section(name: &str, body: &str) {
    let path = repo_root().join("docs/benchmarks.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let (open, close) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let date = local("date", &["-u", "+%Y-%m-%d"]);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let block = format!(
        "{open}\n_Measured {} on this project's {cpus}-core machine._\n\n{body}{close}",
        date.trim()
    );
    let new = match (text.find(&open), text.find(&close)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{block}{}", &text[..a], &text[b + close.len()..])
        }
        _ => format!("{}\n{block}\n", text.trim_end()),
    };
    std::fs::write(&path, new).expect("write docs/benchmarks.md");
}

/// The store's Prometheus text from `/metrics` on its Unix socket (HTTP/1.0: a plain body).
pub fn scrape(socket: &Path) -> Option<String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: store\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.starts_with("HTTP/1").then_some(text)
}

pub fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{metrics}"))
}

/// The embedded store's socket of the arbor with pid `pid` (`--tmp-prefix`: in a fresh
/// `arbor-run.*` dir under the temp dir).
pub fn store_socket(pid: u32) -> Option<PathBuf> {
    let name = format!("store-{pid}.sock");
    std::fs::read_dir(std::env::temp_dir())
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("arbor-run."))
        .map(|e| e.path().join(&name))
        .find(|p| p.exists())
}
