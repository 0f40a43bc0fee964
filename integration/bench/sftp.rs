//! Benchmark: SFTP upload throughput of arbor against OpenSSH's own sftp, same file, same lab
//! link, same run, alternating, median of several runs. Writes its table into
//! docs/benchmarks.md. Run by hand: `cargo bench --bench sftp` (as root).

#[path = "../support/mod.rs"]
mod support;

use arbor::ssh::{self, AgentSource, ConnectOptions, Target};
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};
use support::Lab;

const SIZE_MB: usize = 200;
const RUNS: usize = 5;

fn main() {
    // `cargo bench` passes --bench; anything else (cargo test --all-targets) must not start a
    // lab and move gigabytes.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench sftp` (as root)");
        return;
    }
    let lab = Lab::up("bsftp", &["--relays", "1", "--leaves", "1"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("payload.bin");
    write_payload(&file, SIZE_MB);
    let addr = lab.addr("r1");

    let (mut ours, mut openssh, mut openssh_gcm) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..RUNS {
        let a = arbor_upload(&lab, &file, &addr);
        let o = openssh_upload(&lab, &file, &addr, None);
        let g = openssh_upload(&lab, &file, &addr, Some("aes256-gcm@openssh.com"));
        eprintln!(
            "run {run}: arbor {:.0} MB/s, openssh sftp {:.0} MB/s, openssh sftp aes256-gcm {:.0} MB/s",
            mbps(a),
            mbps(o),
            mbps(g)
        );
        ours.push(a);
        openssh.push(o);
        openssh_gcm.push(g);
    }
    let (a, o, g) = (
        median(&mut ours),
        median(&mut openssh),
        median(&mut openssh_gcm),
    );
    let far = lab.sh(
        "r1",
        "sha256sum /tmp/arbor.bin /tmp/openssh.bin | cut -d' ' -f1 | uniq | wc -l",
    );
    assert_eq!(far.trim(), "1", "the two uploads differ on the far host");
    let table = format!(
        "| tool | median time | throughput | ratio |\n|---|---|---|---|\n\
         | arbor (russh + russh-sftp, pipelined) | {:.2} s | {:.0} MB/s | {:.2}× |\n\
         | OpenSSH sftp `put` (its default cipher) | {:.2} s | {:.0} MB/s | 1.00× |\n\
         | OpenSSH sftp `put` with `-c aes256-gcm@openssh.com` (arbor's cipher) | {:.2} s | {:.0} MB/s | {:.2}× |\n\n\
         {SIZE_MB} MB file, initiator → r1 over the unshaped lab link, median of {RUNS} runs \
         each, alternating; each run includes connect and auth (and, for OpenSSH, starting \
         the sftp process). Ratio is throughput relative to OpenSSH with its defaults \
         (target for arbor ≥ 0.8×). Command: `cargo bench --bench sftp`.\n",
        a.as_secs_f64(),
        mbps(a),
        o.as_secs_f64() / a.as_secs_f64(),
        o.as_secs_f64(),
        mbps(o),
        g.as_secs_f64(),
        mbps(g),
        o.as_secs_f64() / g.as_secs_f64(),
    );
    println!("{table}");
    support::write_bench_section("sftp", &table);
    lab.down();
}

fn write_payload(path: &std::path::Path, mb: usize) {
    let mut f = std::fs::File::create(path).expect("create payload");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mb {
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        f.write_all(&block).expect("write payload");
    }
}

fn mbps(d: Duration) -> f64 {
    SIZE_MB as f64 * 1.048576 / d.as_secs_f64()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn arbor_upload(lab: &Lab, file: &std::path::Path, addr: &str) -> Duration {
    let lab_ref = lab;
    std::thread::scope(|s| {
        s.spawn(|| {
            lab_ref.run(async {
                let mut o = ConnectOptions::for_home(&lab_ref.home());
                o.auth.agent = AgentSource::None;
                let started = Instant::now();
                let session = ssh::connect(&Target::new("root", addr, 22), &o)
                    .await
                    .expect("connect");
                let sftp = session.sftp().await.expect("sftp");
                let mut source = tokio::fs::File::open(file).await.expect("open payload");
                let size = source.metadata().await.expect("stat").len();
                sftp.upload(&mut source, size, "/tmp/arbor.bin", 0o644, &mut |_, _| {})
                    .await
                    .expect("upload");
                started.elapsed()
            })
        })
        .join()
        .expect("arbor upload thread")
    })
}

fn openssh_upload(lab: &Lab, file: &std::path::Path, addr: &str, cipher: Option<&str>) -> Duration {
    let batch = format!("put {} /tmp/openssh.bin\n", file.display());
    let batch_file = file.with_extension("batch");
    std::fs::write(&batch_file, batch).expect("write batch");
    let home = lab.home();
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), "sftp", "-q", "-b"])
        .arg(&batch_file)
        .arg("-i")
        .arg(home.join(".ssh/id_ed25519"))
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            home.join(".ssh/known_hosts").display()
        ))
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
        .args(cipher.map(|c| ["-c", c]).into_iter().flatten())
        .arg(format!("root@{addr}"))
        .output()
        .expect("run sftp");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "openssh sftp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}
