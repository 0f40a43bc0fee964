//! Benchmark: one artifact to every leaf behind relays, arbor against its peers. Run by hand
//! (`cargo bench --bench peers`, as root); writes the `peers` section of docs/benchmarks.md.
//!
//! The lab: 2 relays × 12 leaves (`--relay-keys`: each relay's key logs in to its own leaves),
//! the initiator's link shaped to 20 Mbit/s both ways, the inner links not. The artifact: 20 MB
//! of pseudo-random (incompressible) bytes, to `/tmp/peers-artifact` on all 24 leaves, whose
//! sha256 is checked on each after every run. Per tool: wall time (median of 3, or one run for
//! a tool whose run takes over a minute) and bytes on the initiator's link (both directions).
//!
//! - **one scp** of the artifact to one relay: the reference for one copy over the link.
//! - **ClusterShell** (Debian's `clustershell`), tree mode with the relays as gateways,
//!   `clush --copy`. It finds the root of its topology.conf by the initiator's short host
//!   name, so it runs in a UTS namespace of its own named `peers-init`; each relay gets an
//!   ssh_config naming its leaves (at the path of the initiator's, which clush passes on).
//! - **Ansible** (Debian's `ansible-core`), `copy` with the relays as ProxyJump hosts (the lab's
//!   ssh_config), forks 24.
//! - **arbor**, relay mode, cold caches (its own binary included in the bytes and the time),
//!   a graph whose file resource has the artifact as `source:`, `seed_siblings: true` (the
//!   relays share the edge network).
//!
//! Then the delta run: 1% of the artifact changed (200 KB in one place), every tool again
//! (arbor's caches warm from its first run). The floor is the unique bytes that must cross
//! (the artifact, plus arbor's binary gzipped for the cold run) ÷ the link rate.
//!
//! `ARBOR_PEERS_LOG=DIR` keeps each arbor run's log (`--log-file`: -v level, every host's
//! events, timestamped) in DIR, to see where a run's time goes. `ARBOR_PEERS_ARGS` adds
//! arguments to arbor's runs (split at whitespace), to compare options.

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::Lab;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const RELAYS: usize = 2;
const LEAVES: usize = 12;
const RATE_BITS: f64 = 20e6;
const SIZE: usize = 20 << 20;
const TARGET: &str = "/tmp/peers-artifact";
const RUNS: usize = 3;
/// A tool whose first run takes longer than this runs once.
const LONG: Duration = Duration::from_secs(60);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench peers` (as root)");
        return;
    }
    install_peers();
    let lab = Lab::up(
        "bpeers",
        &[
            "--relays",
            &RELAYS.to_string(),
            "--leaves",
            &LEAVES.to_string(),
            "--rate",
            "20mbit",
            "--relay-keys",
        ],
    );
    let work = tempfile::tempdir().expect("tempdir");
    let setup = Setup::new(&lab, work.path());
    let only = std::env::var("ARBOR_PEERS_ONLY").unwrap_or_default();
    let tools: Vec<Tool> = [Tool::Scp, Tool::Clush, Tool::Ansible, Tool::Arbor]
        .into_iter()
        .filter(|t| only.is_empty() || only.split(',').any(|o| o == t.key()))
        .collect();

    let mut rows = Vec::new();
    for pass in [Pass::Cold, Pass::Delta] {
        if pass == Pass::Delta {
            setup.keep_old();
            change_one_percent(&setup.artifact);
        }
        let sha = sha256(&setup.artifact);
        for tool in &tools {
            let mut figures = Vec::new();
            loop {
                setup.prepare(*tool, pass);
                eprintln!(
                    "peers: {} ({pass:?}), run {}",
                    tool.name(),
                    figures.len() + 1
                );
                let f = setup.run(*tool);
                setup.check(*tool, &sha);
                let long = f.seconds > LONG.as_secs_f64();
                figures.push(f);
                if pass == Pass::Delta || figures.len() == RUNS || long {
                    break;
                }
            }
            rows.push(Row {
                tool: *tool,
                pass,
                runs: figures.len(),
                seconds: median(figures.iter().map(|f| f.seconds).collect()),
                all: figures.iter().map(|f| f.seconds).collect(),
                bytes: median(figures.iter().map(|f| f.bytes as f64).collect()) as u64,
            });
        }
    }
    let binary_gz = packed_size(Path::new(ARBOR), "gzip -c");
    // What arbor sends once its initiator has made it (docs/remote.md, "The binary's first
    // copy"): the floor counts this, the smaller.
    let binary_xz = packed_size(
        Path::new(ARBOR),
        "xz --x86 --lzma2=preset=1,dict=16MiB -T1 -c",
    );
    let text = table(&rows, binary_gz, binary_xz);
    println!("{text}");
    if only.is_empty() {
        support::write_bench_section("peers", &text);
    }
    lab.down();
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    Cold,
    Delta,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Scp,
    Clush,
    Ansible,
    Arbor,
}

impl Tool {
    fn key(self) -> &'static str {
        match self {
            Tool::Scp => "scp",
            Tool::Clush => "clush",
            Tool::Ansible => "ansible",
            Tool::Arbor => "arbor",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Tool::Scp => "one scp (to one relay)",
            Tool::Clush => "ClusterShell, tree mode",
            Tool::Ansible => "Ansible, forks 24, ProxyJump",
            Tool::Arbor => "arbor, relay mode",
        }
    }
}

struct Figures {
    seconds: f64,
    bytes: u64,
}

struct Row {
    tool: Tool,
    pass: Pass,
    runs: usize,
    seconds: f64,
    /// Every run's time, in order (arbor's first run of a build makes what later runs reuse).
    all: Vec<f64>,
    bytes: u64,
}

struct Setup<'a> {
    lab: &'a Lab,
    dir: PathBuf,
    artifact: PathBuf,
    leaves: Vec<String>,
}

impl<'a> Setup<'a> {
    fn new(lab: &'a Lab, dir: &Path) -> Setup<'a> {
        let artifact = dir.join("artifact.bin");
        std::fs::write(&artifact, pseudo_random(SIZE, 0x5eed)).expect("write the artifact");
        let leaves: Vec<String> = (1..=RELAYS)
            .flat_map(|r| (1..=LEAVES).map(move |l| format!("l{r}-{l}")))
            .collect();
        // ClusterShell: the topology, and on each relay an ssh_config for its leaves.
        let cfg = dir.join("clustershell");
        std::fs::create_dir_all(&cfg).expect("clustershell dir");
        let mut routes = format!("[routes]\npeers-init: r[1-{RELAYS}]\n");
        for r in 1..=RELAYS {
            routes += &format!("r{r}: l{r}-[1-{LEAVES}]\n");
            let mut conf = String::from(
                "Host *\n    User root\n    StrictHostKeyChecking no\n    \
                 UserKnownHostsFile /dev/null\n    LogLevel ERROR\n",
            );
            for l in 1..=LEAVES {
                conf += &format!("Host l{r}-{l}\n    HostName 10.199.{r}.{}\n", 10 + l);
            }
            // clush hands its ssh options (`-F` the initiator's ssh_config) to the gateways
            // too: each relay gets its own file at that path, in its own private /tmp.
            let path = lab.home().join(".ssh/config");
            let path = path.display();
            lab.sh(
                &format!("r{r}"),
                &format!(
                    "mkdir -p $(dirname {path}) && cat > {path} <<'EOF'\n{conf}EOF\nchmod 600 {path}"
                ),
            );
        }
        std::fs::write(cfg.join("topology.conf"), routes).expect("topology.conf");
        std::fs::write(
            cfg.join("clush.conf"),
            format!(
                "[Main]\nfanout: 64\nconnect_timeout: 15\ncommand_timeout: 0\n\
                 ssh_options: -F {}\n",
                lab.home().join(".ssh/config").display()
            ),
        )
        .expect("clush.conf");
        // Ansible: the leaves, each through its relay (the lab's ssh_config says how).
        let mut inventory = String::from("[leaves]\n");
        for leaf in &leaves {
            inventory += &format!("{leaf}\n");
        }
        std::fs::write(dir.join("inventory"), inventory).expect("inventory");
        std::fs::write(
            dir.join("ansible.cfg"),
            format!(
                "[defaults]\nforks = 24\nhost_key_checking = False\ngathering = explicit\n\
                 interpreter_python = /usr/bin/python3\n\n[ssh_connection]\n\
                 ssh_args = -F {}\npipelining = True\n",
                lab.home().join(".ssh/config").display()
            ),
        )
        .expect("ansible.cfg");
        // arbor: the topology, with a graph copying the artifact.
        let graph = dir.join("artifact.yaml");
        std::fs::write(
            &graph,
            format!(
                "graph: peers\nresources:\n  file:\n  - name: {TARGET}\n    \
                 source: artifact.bin\n    mode: \"0644\"\n"
            ),
        )
        .expect("graph");
        // The relays share the edge network: they seed each other (docs/remote.md).
        let mut topo = String::from("seed_siblings: true\ndefaults:\n  user: root\nhosts:\n");
        for r in 1..=RELAYS {
            topo += &format!(
                "- host: 10.199.0.{}\n  name: r{r}\n  children:\n  - host: 10.199.{r}.[{}-{}]\n    \
                 name: l{r}-[1-{LEAVES}]\n    graph: {}\n",
                10 + r,
                11,
                10 + LEAVES,
                graph.display()
            );
        }
        std::fs::write(dir.join("topology.yaml"), topo).expect("topology");
        Setup {
            lab,
            dir: dir.to_path_buf(),
            artifact,
            leaves,
        }
    }

    fn hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = (1..=RELAYS).map(|r| format!("r{r}")).collect();
        hosts.extend(self.leaves.iter().cloned());
        hosts
    }

    /// Before a cold run: no copy of the artifact anywhere, and for arbor no cache. Before a
    /// delta run: every leaf holds the artifact as it was (the copy [`Setup::keep_old`] kept),
    /// which is what a delta is against; arbor keeps its caches.
    fn prepare(&self, tool: Tool, pass: Pass) {
        for h in self.hosts() {
            let mut what = String::from("rm -rf /tmp/arbor.* /tmp/peers-scp /tmp/artifact.bin");
            match pass {
                Pass::Cold => {
                    what += &format!("; rm -f {TARGET}");
                    if tool == Tool::Arbor {
                        what += "; rm -rf /root/.cache/arbor";
                    }
                }
                Pass::Delta => {
                    what += &format!("; [ ! -f /tmp/peers-old ] || cp /tmp/peers-old {TARGET}");
                }
            }
            self.lab.sh(&h, &what);
        }
    }

    /// Keeps each leaf's copy of the artifact as it is, for the delta runs.
    fn keep_old(&self) {
        for h in &self.leaves {
            self.lab.sh(
                h,
                &format!("[ ! -f {TARGET} ] || cp {TARGET} /tmp/peers-old"),
            );
        }
    }

    fn run(&self, tool: Tool) -> Figures {
        let (tx0, rx0) = self.lab.init_link_bytes();
        let started = Instant::now();
        let home = self.lab.home();
        let ssh_config = home.join(".ssh/config");
        let art = self.artifact.display().to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.lab.init_ns()])
            .env("HOME", &home)
            .env_remove("SSH_AUTH_SOCK")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match tool {
            Tool::Scp => {
                cmd.args(["scp", "-q", "-F"])
                    .arg(&ssh_config)
                    .args([&art, "r1:/tmp/peers-scp"]);
            }
            Tool::Clush => {
                // Its own UTS namespace, named as topology.conf's root.
                cmd.args([
                    "unshare",
                    "--uts",
                    "sh",
                    "-c",
                    &format!(
                        "hostname peers-init && exec clush -w l[1-{RELAYS}]-[1-{LEAVES}] \
                         --copy {art} --dest /tmp/"
                    ),
                ])
                .env("CLUSTERSHELL_CFGDIR", self.dir.join("clustershell"));
            }
            Tool::Ansible => {
                cmd.args([
                    "ansible",
                    "leaves",
                    "-i",
                    &self.dir.join("inventory").display().to_string(),
                    "-m",
                    "copy",
                    "-a",
                    &format!("src={art} dest={TARGET} mode=0644"),
                ])
                .env("ANSIBLE_CONFIG", self.dir.join("ansible.cfg"))
                .env("ANSIBLE_LOCAL_TEMP", self.dir.join("ansible-tmp"));
            }
            Tool::Arbor => {
                cmd.arg(ARBOR)
                    .args(["run", "--topology"])
                    .arg(self.dir.join("topology.yaml"))
                    .args(["--tmp-prefix", "--converged-timeout", "0"]);
                // ARBOR_PEERS_ARGS: more arguments for arbor's runs, split at whitespace (to
                // compare `--transport ssh`, say).
                if let Ok(more) = std::env::var("ARBOR_PEERS_ARGS") {
                    cmd.args(more.split_whitespace());
                }
                // ARBOR_PEERS_LOG=DIR: each run's log (-v level, every host's events, with
                // timestamps) in DIR, to see where a run's time goes.
                if let Some(dir) = std::env::var_os("ARBOR_PEERS_LOG") {
                    let n = std::fs::read_dir(&dir).map_or(0, |d| d.count());
                    cmd.arg("--log-file")
                        .arg(Path::new(&dir).join(format!("arbor-{n}.log")));
                }
            }
        }
        let out = cmd.output().expect("run the tool");
        let seconds = started.elapsed().as_secs_f64();
        let (tx1, rx1) = self.lab.init_link_bytes();
        assert!(
            out.status.success(),
            "{} failed:\n{}\n{}",
            tool.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Figures {
            seconds,
            bytes: (tx1 - tx0) + (rx1 - rx0),
        }
    }

    /// The artifact arrived whole: on the relay for scp, on every leaf for the others.
    fn check(&self, tool: Tool, sha: &str) {
        let (hosts, path) = match tool {
            Tool::Scp => (vec!["r1".to_string()], "/tmp/peers-scp".to_string()),
            // clush --copy keeps the file's name.
            Tool::Clush => (self.leaves.clone(), "/tmp/artifact.bin".to_string()),
            _ => (self.leaves.clone(), TARGET.to_string()),
        };
        for h in hosts {
            let got = self
                .lab
                .sh(&h, &format!("sha256sum {path} | cut -d' ' -f1"));
            assert_eq!(
                got.trim(),
                sha,
                "{}: {h}'s copy is not the artifact",
                tool.name()
            );
            if tool == Tool::Clush {
                // Where the other tools put it, so a delta run finds the old copy there.
                self.lab.sh(&h, &format!("mv {path} {TARGET}"));
            }
        }
    }
}

fn install_peers() {
    let missing = ["clush", "ansible"].iter().any(|b| {
        Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .map_or(true, |o| !o.status.success())
    });
    if missing {
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-q", "clustershell", "ansible-core"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .expect("apt-get");
        assert!(
            ok.success(),
            "installing clustershell and ansible-core failed"
        );
    }
}

/// Deterministic incompressible bytes (xorshift64*).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Changes 1% of the file, in one place (new pseudo-random bytes at its middle).
fn change_one_percent(path: &Path) {
    let mut data = std::fs::read(path).expect("read the artifact");
    let n = data.len() / 100;
    let at = data.len() / 2;
    data[at..at + n].copy_from_slice(&pseudo_random(n, 0xde17a));
    std::fs::write(path, data).expect("write the artifact");
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The size of `path` packed by the shell command `pack` (its output on stdout).
fn packed_size(path: &Path, pack: &str) -> u64 {
    let out = Command::new("sh")
        .args(["-c", &format!("{pack} {} | wc -c", path.display())])
        .output()
        .expect("pack");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn table(rows: &[Row], binary_gz: u64, binary_xz: u64) -> String {
    let mut out =
        String::from("### One 20 MB artifact to 24 leaves behind 2 relays, against peers\n\n");
    for pass in [Pass::Cold, Pass::Delta] {
        let (title, unique) = match pass {
            Pass::Cold => ("cold", SIZE as u64 + binary_xz.min(binary_gz)),
            Pass::Delta => ("after a 1% change", (SIZE / 100) as u64),
        };
        let floor = unique as f64 * 8.0 / RATE_BITS;
        let arbor = rows
            .iter()
            .find(|r| r.pass == pass && r.tool == Tool::Arbor)
            .map(|r| r.seconds);
        out += &format!(
            "**{title}** (floor: {:.1} MB unique ÷ 20 Mbit/s = {floor:.1} s)\n\n\
             | tool | runs | wall time | × arbor's time | bytes on the initiator's link | × the artifact | every run |\n\
             |---|---:|---:|---:|---:|---:|---|\n",
            unique as f64 / 1e6
        );
        for r in rows.iter().filter(|r| r.pass == pass) {
            let ratio = arbor.map_or("—".to_string(), |a| format!("{:.2}", r.seconds / a));
            let all: Vec<String> = r.all.iter().map(|s| format!("{s:.1} s")).collect();
            out += &format!(
                "| {} | {} | {:.1} s | {ratio} | {:.1} MB | {:.2} | {} |\n",
                r.tool.name(),
                r.runs,
                r.seconds,
                r.bytes as f64 / 1e6,
                r.bytes as f64 / SIZE as f64,
                all.join(", ")
            );
        }
        out += "\n";
    }
    out += &format!(
        "The lab: 2 relays × 12 leaves, the initiator's link shaped to 20 Mbit/s (tc tbf) both \
         ways, inner links unshaped; a 20 MB pseudo-random (incompressible) artifact; every \
         leaf's sha256 checked after every run. Wall time is the median of {RUNS} runs, or one \
         run for a tool whose run took over a minute; the delta run is one run per tool (arbor \
         with the caches of its cold run, the others over the old copies). Bytes are both \
         directions on the initiator's link. arbor's cold run includes copying its own \
         binary to the relays: {:.1} MB gzipped in the first run of a build, which makes its \
         xz stream for the runs after it, {:.1} MB (the initiator's cache is kept between \
         runs, the hosts' emptied). The floor is the unique bytes that must cross (the \
         artifact and the smaller binary) ÷ the link rate. ClusterShell {}, Ansible {}. \
         Command: `cargo bench --bench peers` (as root; installs clustershell and \
         ansible-core).\n",
        binary_gz as f64 / 1e6,
        binary_xz as f64 / 1e6,
        version("clush", "--version"),
        version("ansible", "--version"),
    );
    out
}

fn version(bin: &str, flag: &str) -> String {
    Command::new(bin)
        .arg(flag)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}
