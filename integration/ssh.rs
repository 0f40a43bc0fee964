//! End-to-end tests of the SSH layer against the lab's real OpenSSH servers.
//!
//! One lab (3 relays, 1 leaf each; every sshd with Ed25519, ECDSA and RSA host keys and host
//! certificates from the lab's CA) serves the whole binary and is torn down at the end, failed
//! tests included. Each test runs in the initiator's network namespace.

#[macro_use]
mod support;

use arbor::ssh::{
    self, AgentSource, Cause, ConnectOptions, ExecOptions, ExitStatus, HostKeyPolicy, Output,
    Prompter, Session, Step, Target,
};
use libtest_mimic::Failed;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::harness::{Test, TestResult, fail};
use support::{Lab, local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> std::process::ExitCode {
    let tests: Vec<Test> = vec![
        (
            "exec_streams_stdout_and_stderr_apart_with_exit_code",
            exec_streams_stdout_and_stderr_apart_with_exit_code,
        ),
        (
            "exec_feeds_stdin_and_reports_signals",
            exec_feeds_stdin_and_reports_signals,
        ),
        (
            "sftp_upload_50mb_matches_sha256_and_mode",
            sftp_upload_50mb_matches_sha256_and_mode,
        ),
        (
            "sftp_reupload_replaces_existing_file",
            sftp_reupload_replaces_existing_file,
        ),
        (
            "remote_forward_unix_socket_carries_both_directions",
            remote_forward_unix_socket_carries_both_directions,
        ),
        (
            "remote_forward_tcp_loopback_carries_both_directions",
            remote_forward_tcp_loopback_carries_both_directions,
        ),
        (
            "changed_host_key_is_refused_with_fingerprint_and_line",
            changed_host_key_is_refused_with_fingerprint_and_line,
        ),
        (
            "unknown_host_key_is_refused_under_strict",
            unknown_host_key_is_refused_under_strict,
        ),
        (
            "accept_new_records_unknown_key",
            accept_new_records_unknown_key,
        ),
        (
            "accept_new_hashes_the_name_under_hash_known_hosts",
            accept_new_hashes_the_name_under_hash_known_hosts,
        ),
        ("pinned_key_decides_alone", pinned_key_decides_alone),
        ("auth_by_agent", auth_by_agent),
        ("auth_by_default_key_file", auth_by_default_key_file),
        (
            "auth_by_encrypted_key_with_passphrase",
            auth_by_encrypted_key_with_passphrase,
        ),
        (
            "wrong_key_is_refused_listing_methods_tried",
            wrong_key_is_refused_listing_methods_tried,
        ),
        (
            "agent_forwarding_serves_far_side_ssh_add",
            agent_forwarding_serves_far_side_ssh_add,
        ),
        (
            "unreachable_host_fails_within_connect_timeout",
            unreachable_host_fails_within_connect_timeout,
        ),
        (
            "unrouted_leaf_fails_fast_naming_connect",
            unrouted_leaf_fails_fast_naming_connect,
        ),
        ("ipv6_in_brackets_connects", ipv6_in_brackets_connects),
        (
            "dns_name_that_does_not_resolve_names_the_host",
            dns_name_that_does_not_resolve_names_the_host,
        ),
        (
            "host_known_only_by_ecdsa_or_rsa_connects_and_accept_new_adds_nothing",
            host_known_only_by_ecdsa_or_rsa_connects_and_accept_new_adds_nothing,
        ),
        (
            "host_certificate_from_a_cert_authority_line_is_accepted",
            host_certificate_from_a_cert_authority_line_is_accepted,
        ),
        (
            "certificate_from_an_unknown_authority_falls_back_to_the_plain_key",
            certificate_from_an_unknown_authority_falls_back_to_the_plain_key,
        ),
        (
            "host_certificate_with_wrong_principal_or_expired_is_refused",
            host_certificate_with_wrong_principal_or_expired_is_refused,
        ),
        (
            "a_run_at_depth_2_trusts_hosts_known_only_by_ecdsa_or_by_a_cert_authority",
            a_run_at_depth_2_trusts_hosts_known_only_by_ecdsa_or_by_a_cert_authority,
        ),
        (
            "a_leafs_expired_certificate_at_depth_2_fails_that_leaf_naming_it",
            a_leafs_expired_certificate_at_depth_2_fails_that_leaf_naming_it,
        ),
    ];
    // Every sshd has Ed25519, ECDSA and RSA host keys, each with a host certificate from the
    // lab's CA. r3 and its leaf are reserved for the tests that re-sign certificates (they
    // take RESIGNING in turn).
    support::harness::run_with_lab(
        "ssh",
        &[
            "--relays",
            "3",
            "--leaves",
            "1",
            "--host-keys",
            "ed25519,ecdsa,rsa",
            "--host-ca",
        ],
        false,
        tests,
    )
}

/// Options as arbor uses them for the lab's HOME, minus any agent from the environment.
fn options(lab: &Lab) -> ConnectOptions {
    let mut o = ConnectOptions::for_home(&lab.home());
    o.auth.agent = AgentSource::None;
    o.connect_timeout = Duration::from_secs(5);
    o
}

fn target(lab: &Lab, host: &str) -> Target {
    Target::new("root", lab.addr(host), 22)
}

async fn session(lab: &Lab, host: &str) -> Result<Session, Failed> {
    ssh::connect(&target(lab, host), &options(lab))
        .await
        .map_err(fail)
}

/// The SHA256 fingerprint of a lab host's real key, from the lab's known_hosts.
fn host_fingerprint(lab: &Lab, addr: &str) -> String {
    let text = std::fs::read_to_string(lab.home().join(".ssh/known_hosts")).expect("known_hosts");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(addr) || l.starts_with(&format!("{addr},")))
        .unwrap_or_else(|| panic!("no known_hosts line for {addr}"));
    let key: Vec<&str> = line.split_whitespace().skip(1).take(2).collect();
    let key = russh::keys::PublicKey::from_openssh(&key.join(" ")).expect("parse host key");
    ssh::known_hosts::fingerprint(&key)
}

fn keygen(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_string_lossy().to_string();
    local(
        "ssh-keygen",
        &[
            "-q", "-t", "ed25519", "-N", passphrase, "-C", name, "-f", &p,
        ],
    );
    path
}

fn authorize(lab: &Lab, host: &str, key: &Path) {
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).expect("pub key");
    lab.sh(
        host,
        &format!(
            "printf '%s\\n' {} >> /root/.ssh/authorized_keys",
            ssh::shell_quote(pubkey.trim())
        ),
    );
}

fn exec_streams_stdout_and_stderr_apart_with_exit_code(lab: &Lab) -> TestResult {
    lab.run(async {
        let s = session(lab, "r1").await?;
        let out = s
            .output("echo to-out; echo to-err >&2; hostname; exit 3")
            .await
            .map_err(fail)?;
        check!(
            out.stdout == b"to-out\nr1\n",
            "stdout {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        check!(
            out.stderr == b"to-err\n",
            "stderr {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
        check!(out.status == ExitStatus::Code(3), "status {}", out.status);

        // Output arrives as it is produced, not at exit.
        let mut cmd = s
            .exec("echo first; sleep 2; echo second", &ExecOptions::default())
            .await
            .map_err(fail)?;
        let started = Instant::now();
        let first = cmd.next().await;
        check!(
            first == Some(Output::Stdout("first\n".into())),
            "first item {first:?}"
        );
        check!(
            started.elapsed() < Duration::from_millis(1500),
            "first line took {:?}: output is not streamed",
            started.elapsed()
        );
        let rest = cmd.collect().await.map_err(fail)?;
        check!(rest.stdout == b"second\n", "rest {:?}", rest.stdout);
        check!(rest.status.success(), "status {}", rest.status);
        Ok(())
    })
}

fn exec_feeds_stdin_and_reports_signals(lab: &Lab) -> TestResult {
    lab.run(async {
        let s = session(lab, "r1").await?;
        let cmd = s
            .exec("tr a-z A-Z", &ExecOptions::default())
            .await
            .map_err(fail)?;
        cmd.write_stdin(b"hello ").await.map_err(fail)?;
        let mut w = cmd.stdin_writer();
        w.write_all(b"world").await.map_err(fail)?;
        w.flush().await.map_err(fail)?;
        drop(w);
        cmd.close_stdin().await.map_err(fail)?;
        let out = cmd.collect().await.map_err(fail)?;
        check!(out.stdout == b"HELLO WORLD", "stdout {:?}", out.stdout);

        let out = s.output("kill -TERM $$").await.map_err(fail)?;
        check!(
            matches!(&out.status, ExitStatus::Signal { signal, .. } if signal == "TERM"),
            "status {}",
            out.status
        );
        Ok(())
    })
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(data))
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sftp_upload_50mb_matches_sha256_and_mode(lab: &Lab) -> TestResult {
    let data = pseudo_random(50 * 1024 * 1024, 7);
    let expected = sha256_hex(&data);
    lab.run(async {
        let s = session(lab, "r1").await?;
        let sftp = s.sftp().await.map_err(fail)?;
        let mut calls = 0u32;
        let mut last = (0, 0);
        let done = sftp
            .upload(
                &mut &data[..],
                data.len() as u64,
                "/tmp/big.bin",
                0o640,
                &mut |sent, total| {
                    calls += 1;
                    last = (sent, total);
                },
            )
            .await
            .map_err(fail)?;
        check!(done.bytes == data.len() as u64, "uploaded {}", done.bytes);
        check!(calls > 10, "progress called {calls} times");
        check!(last == (done.bytes, done.bytes), "last progress {last:?}");
        Ok::<(), Failed>(())
    })?;
    let far = lab.sh(
        "r1",
        "sha256sum /tmp/big.bin; stat -c %a /tmp/big.bin; ls -a /tmp",
    );
    check!(far.contains(&expected), "far side: {far}");
    check!(far.lines().nth(1) == Some("640"), "mode on far side: {far}");
    check!(!far.contains(".arbor-"), "temp file left behind: {far}");
    // The file lives on r1 only: hosts do not share /tmp.
    let r2 = lab.sh("r2", "ls /tmp");
    check!(!r2.contains("big.bin"), "r2 sees r1's /tmp: {r2}");
    Ok(())
}

fn sftp_reupload_replaces_existing_file(lab: &Lab) -> TestResult {
    let first = pseudo_random(300_000, 1);
    let second = pseudo_random(200_000, 2);
    lab.run(async {
        let s = session(lab, "r2").await?;
        let sftp = s.sftp().await.map_err(fail)?;
        for data in [&first, &second] {
            sftp.upload(
                &mut &data[..],
                data.len() as u64,
                "/tmp/again.bin",
                0o600,
                &mut |_, _| {},
            )
            .await
            .map_err(fail)?;
        }
        Ok::<(), Failed>(())
    })?;
    let far = lab.sh("r2", "sha256sum /tmp/again.bin; stat -c %a /tmp/again.bin");
    check!(far.contains(&sha256_hex(&second)), "far side: {far}");
    check!(far.lines().nth(1) == Some("600"), "mode: {far}");
    Ok(())
}

/// A local TCP service that returns each byte plus one: the reply proves both directions.
async fn plus_one_service() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            for b in &mut buf[..n] {
                                *b = b.wrapping_add(1);
                            }
                            if conn.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Python on the far host: connect, send 256 KiB, check every byte came back plus one.
fn far_client(connect: &str) -> String {
    let script = format!(
        r#"
import socket
{connect}
data = bytes(i % 251 for i in range(262144))
s.sendall(data)
got = b""
while len(got) < len(data):
    chunk = s.recv(65536)
    if not chunk:
        break
    got += chunk
ok = got == bytes((b + 1) % 256 for b in data)
print("ok" if ok else "mismatch", len(got))
"#
    );
    format!("python3 -c {}", ssh::shell_quote(&script))
}

fn remote_forward_unix_socket_carries_both_directions(lab: &Lab) -> TestResult {
    lab.run(async {
        let service = plus_one_service().await;
        let s = session(lab, "r1").await?;
        s.run_checked("rm -rf /tmp/fwd-test && mkdir -m 700 /tmp/fwd-test")
            .await
            .map_err(fail)?;
        let end = s
            .forward_unix("/tmp/fwd-test/store.sock", ssh::forward::to_tcp(service))
            .await
            .map_err(fail)?;
        check!(
            end == ssh::ForwardEnd::Unix("/tmp/fwd-test/store.sock".into()),
            "end {end:?}"
        );
        let out = s
            .run_checked(&far_client(
                "s = socket.socket(socket.AF_UNIX); s.connect('/tmp/fwd-test/store.sock')",
            ))
            .await
            .map_err(fail)?;
        let out = String::from_utf8_lossy(&out);
        check!(out.trim() == "ok 262144", "far client said {out}");
        s.cancel_forward(&end).await.map_err(fail)?;
        Ok(())
    })
}

fn remote_forward_tcp_loopback_carries_both_directions(lab: &Lab) -> TestResult {
    lab.run(async {
        let service = plus_one_service().await;
        let s = session(lab, "r1").await?;
        let end = s
            .forward_tcp_loopback(ssh::forward::to_tcp(service))
            .await
            .map_err(fail)?;
        let ssh::ForwardEnd::Tcp(port) = end else {
            return Err(fail(format!("expected a TCP end, got {end:?}")));
        };
        check!(port > 0, "port {port}");
        let out = s
            .run_checked(&far_client(&format!(
                "s = socket.create_connection(('127.0.0.1', {port}))"
            )))
            .await
            .map_err(fail)?;
        let out = String::from_utf8_lossy(&out);
        check!(out.trim() == "ok 262144", "far client said {out}");
        Ok(())
    })
}

fn changed_host_key_is_refused_with_fingerprint_and_line(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let other = keygen(dir.path(), "other", "");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).map_err(fail)?;
    let kh = dir.path().join("known_hosts");
    let addr = lab.addr("r1");
    std::fs::write(&kh, format!("# first line\n{addr} {}\n", other_pub.trim())).map_err(fail)?;
    let real = host_fingerprint(lab, &addr);
    lab.run(async {
        let mut o = options(lab);
        o.host_keys.known_hosts = vec![kh.clone()];
        o.host_keys.policy = HostKeyPolicy::AcceptNew; // never overrides a changed key
        o.host_keys.learn_into = Some(kh.clone());
        let err = match ssh::connect(&target(lab, "r1"), &o).await {
            Ok(_) => return Err(fail("connected despite a changed host key")),
            Err(e) => e,
        };
        let msg = err.to_string();
        check!(err.step == Step::HostKey, "step {}: {msg}", err.step);
        check!(matches!(err.cause, Cause::HostKeyChanged { .. }), "{msg}");
        check!(
            msg.contains(&real),
            "message lacks fingerprint {real}: {msg}"
        );
        check!(
            msg.contains(&format!("{}:2", kh.display())),
            "message lacks file:line: {msg}"
        );
        check!(msg.starts_with(&format!("{addr}:22: host key:")), "{msg}");
        Ok::<(), Failed>(())
    })?;
    let after = std::fs::read_to_string(&kh).map_err(fail)?;
    check!(
        after.lines().count() == 2,
        "known_hosts was modified: {after}"
    );
    Ok(())
}

fn unknown_host_key_is_refused_under_strict(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let kh = dir.path().join("known_hosts");
    let real = host_fingerprint(lab, &lab.addr("r1"));
    lab.run(async {
        let mut o = options(lab);
        o.host_keys.known_hosts = vec![kh.clone()];
        o.host_keys.learn_into = Some(kh.clone());
        let err = match ssh::connect(&target(lab, "r1"), &o).await {
            Ok(_) => return Err(fail("connected to an unknown host under strict")),
            Err(e) => e,
        };
        let msg = err.to_string();
        check!(matches!(err.cause, Cause::HostKeyUnknown { .. }), "{msg}");
        check!(msg.contains(&real), "no fingerprint in: {msg}");
        Ok::<(), Failed>(())
    })?;
    check!(!kh.exists(), "strict policy wrote known_hosts");
    Ok(())
}

fn accept_new_records_unknown_key(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let kh = dir.path().join("ssh/known_hosts");
    let addr = lab.addr("r2");
    lab.run(async {
        let mut o = options(lab);
        o.host_keys.known_hosts = vec![kh.clone()];
        o.host_keys.learn_into = Some(kh.clone());
        o.host_keys.ssh_config = Vec::new(); // HashKnownHosts no
        o.host_keys.policy = HostKeyPolicy::AcceptNew;
        let s = ssh::connect(&target(lab, "r2"), &o).await.map_err(fail)?;
        s.disconnect().await;
        // Now known: strict accepts it.
        o.host_keys.policy = HostKeyPolicy::Strict;
        ssh::connect(&target(lab, "r2"), &o).await.map_err(fail)?;
        Ok::<(), Failed>(())
    })?;
    let text = std::fs::read_to_string(&kh).map_err(fail)?;
    check!(text.lines().count() == 1, "recorded: {text}");
    check!(
        text.starts_with(&format!("{addr} ssh-ed25519 ")),
        "recorded: {text}"
    );
    Ok(())
}

fn accept_new_hashes_the_name_under_hash_known_hosts(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let kh = dir.path().join("known_hosts");
    let config = dir.path().join("config");
    let addr = lab.addr("r2");
    std::fs::write(
        &config,
        format!("Host {addr}\n    HashKnownHosts yes\nHost *\n    HashKnownHosts no\n"),
    )
    .map_err(fail)?;
    lab.run(async {
        let mut o = only(lab, &kh, HostKeyPolicy::AcceptNew);
        o.host_keys.ssh_config = vec![config.clone()];
        ssh::connect(&target(lab, "r2"), &o).await.map_err(fail)?;
        o.host_keys.policy = HostKeyPolicy::Strict;
        ssh::connect(&target(lab, "r2"), &o).await.map_err(fail)?;
        Ok::<(), Failed>(())
    })?;
    let text = std::fs::read_to_string(&kh).map_err(fail)?;
    check!(
        text.lines().count() == 1 && text.starts_with("|1|") && !text.contains(&addr),
        "recorded: {text}"
    );
    Ok(())
}

fn pinned_key_decides_alone(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let other = keygen(dir.path(), "pin", "");
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).map_err(fail)?;
    lab.run(async {
        let mut o = options(lab);
        o.host_keys.pinned =
            Some(russh::keys::PublicKey::from_openssh(other_pub.trim()).map_err(fail)?);
        let err = match ssh::connect(&target(lab, "r1"), &o).await {
            Ok(_) => return Err(fail("connected despite a wrong pinned key")),
            Err(e) => e,
        };
        check!(
            matches!(err.cause, Cause::HostKeyPinMismatch { .. }),
            "{err}"
        );
        Ok(())
    })
}

struct Agent {
    child: std::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start_with(key: &Path) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let child = std::process::Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start ssh-agent");
        // The socket file appears at bind(), before listen(): wait until it accepts.
        for _ in 0..250 {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::process::Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &socket)
            .output()
            .expect("ssh-add");
        assert!(out.status.success(), "ssh-add: {out:?}");
        Agent {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn auth_by_agent(lab: &Lab) -> TestResult {
    let agent = Agent::start_with(&lab.home().join(".ssh/id_ed25519"));
    lab.run(async {
        let mut o = options(lab);
        o.auth.default_identities.clear();
        o.auth.agent = AgentSource::Socket(agent.socket.clone());
        let s = ssh::connect(&target(lab, "r1"), &o).await.map_err(fail)?;
        let out = s.run_checked("hostname").await.map_err(fail)?;
        check!(out == b"r1\n", "hostname {out:?}");
        // And without the agent, nothing else would have worked.
        o.auth.agent = AgentSource::None;
        check!(
            ssh::connect(&target(lab, "r1"), &o).await.is_err(),
            "connected with no credentials at all"
        );
        Ok(())
    })
}

fn auth_by_default_key_file(lab: &Lab) -> TestResult {
    lab.run(async {
        let o = options(lab);
        check!(
            o.auth.default_identities[0] == lab.home().join(".ssh/id_ed25519"),
            "default identity {:?}",
            o.auth.default_identities
        );
        let s = ssh::connect(&target(lab, "r2"), &o).await.map_err(fail)?;
        let out = s.run_checked("hostname").await.map_err(fail)?;
        check!(out == b"r2\n", "hostname {out:?}");
        Ok(())
    })
}

struct FixedPassphrase(&'static str);

impl Prompter for FixedPassphrase {
    fn passphrase(&self, _key: &Path) -> Option<String> {
        Some(self.0.to_string())
    }
    fn password(&self, _user: &str, _host: &str) -> Option<String> {
        None
    }
    fn keyboard_interactive(
        &self,
        _host: &str,
        _instructions: &str,
        _prompts: &[(String, bool)],
    ) -> Option<Vec<String>> {
        None
    }
}

fn auth_by_encrypted_key_with_passphrase(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let key = keygen(dir.path(), "enc", "sekrit phrase");
    authorize(lab, "r2", &key);
    lab.run(async {
        let mut o = options(lab);
        o.auth.default_identities.clear();
        o.auth.identities = vec![key.clone()];

        // No prompts allowed: refused, and the message says why.
        let err = match ssh::connect(&target(lab, "r2"), &o).await {
            Ok(_) => return Err(fail("used an encrypted key without its passphrase")),
            Err(e) => e,
        };
        check!(err.step == Step::Auth, "{err}");
        check!(
            err.to_string().contains("encrypted, no passphrase"),
            "{err}"
        );

        o.auth.prompter = Some(Arc::new(FixedPassphrase("wrong")));
        check!(
            ssh::connect(&target(lab, "r2"), &o).await.is_err(),
            "a wrong passphrase worked"
        );

        o.auth.prompter = Some(Arc::new(FixedPassphrase("sekrit phrase")));
        let s = ssh::connect(&target(lab, "r2"), &o).await.map_err(fail)?;
        let out = s.run_checked("hostname").await.map_err(fail)?;
        check!(out == b"r2\n", "hostname {out:?}");
        Ok(())
    })
}

fn wrong_key_is_refused_listing_methods_tried(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let key = keygen(dir.path(), "stranger", "");
    lab.run(async {
        let mut o = options(lab);
        o.auth.default_identities.clear();
        o.auth.identities = vec![key.clone()];
        o.auth.password = Some("not-the-password".into());
        let err = match ssh::connect(&target(lab, "r1"), &o).await {
            Ok(_) => return Err(fail("an unauthorized key was accepted")),
            Err(e) => e,
        };
        let msg = err.to_string();
        check!(err.step == Step::Auth, "{msg}");
        check!(msg.contains("permission denied for root"), "{msg}");
        check!(
            msg.contains(&format!("key {}", key.display())),
            "tried list lacks the key: {msg}"
        );
        check!(
            msg.contains("password from the URL"),
            "tried list lacks the password: {msg}"
        );
        check!(msg.contains("the server allows publickey"), "{msg}");
        Ok(())
    })
}

fn agent_forwarding_serves_far_side_ssh_add(lab: &Lab) -> TestResult {
    let key = lab.home().join(".ssh/id_ed25519");
    let agent = Agent::start_with(&key);
    let fingerprint = local("ssh-keygen", &["-lf", &key.to_string_lossy()]);
    let fingerprint = fingerprint
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    lab.run(async {
        let s = session(lab, "r1").await?;
        s.set_agent_connector(ssh::forward::to_unix(agent.socket.clone()));
        // Without forwarding requested, the far side has no agent (sshd keeps one agent
        // socket per connection once any channel asks, so ask this first).
        let out = s.output("ssh-add -l").await.map_err(fail)?;
        check!(!out.status.success(), "agent visible without forwarding");

        let cmd = s
            .exec(
                "ssh-add -l",
                &ExecOptions {
                    forward_agent: true,
                },
            )
            .await
            .map_err(fail)?;
        cmd.close_stdin().await.map_err(fail)?;
        let out = cmd.collect().await.map_err(fail)?;
        let text = String::from_utf8_lossy(&out.stdout);
        check!(
            out.status.success() && text.contains(&fingerprint),
            "ssh-add -l on r1: {} {text} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    })
}

fn unreachable_host_fails_within_connect_timeout(lab: &Lab) -> TestResult {
    lab.run(async {
        let mut o = options(lab);
        o.connect_timeout = Duration::from_secs(2);
        // On the edge network, but no host answers there.
        let t = Target::new("root", "10.199.0.99", 22);
        let started = Instant::now();
        let err = match ssh::connect(&t, &o).await {
            Ok(_) => return Err(fail("connected to a host that does not exist")),
            Err(e) => e,
        };
        let took = started.elapsed();
        check!(err.step == Step::Connect, "{err}");
        check!(
            err.to_string().starts_with("10.199.0.99:22: connect:"),
            "{err}"
        );
        check!(took < Duration::from_millis(2500), "took {took:?}: {err}");
        Ok(())
    })
}

fn unrouted_leaf_fails_fast_naming_connect(lab: &Lab) -> TestResult {
    lab.run(async {
        let mut o = options(lab);
        o.label = Some("l1-1".into());
        let started = Instant::now();
        let err = match ssh::connect(&target(lab, "l1-1"), &o).await {
            Ok(_) => return Err(fail("reached a leaf from the initiator: the lab leaks")),
            Err(e) => e,
        };
        check!(err.step == Step::Connect, "{err}");
        check!(err.to_string().starts_with("l1-1: connect:"), "{err}");
        check!(started.elapsed() < Duration::from_secs(1), "{err}");
        Ok(())
    })
}

fn ipv6_in_brackets_connects(lab: &Lab) -> TestResult {
    let addr6 = lab.addr6("r1");
    lab.run(async {
        let t = Target::new("root", format!("[{addr6}]"), 22);
        check!(t.address() == format!("[{addr6}]:22"), "{}", t.address());
        let s = ssh::connect(&t, &options(lab)).await.map_err(fail)?;
        check!(s.peer().is_ipv6(), "peer {}", s.peer());
        let out = s.run_checked("hostname").await.map_err(fail)?;
        check!(out == b"r1\n", "hostname {out:?}");
        Ok(())
    })
}

fn dns_name_that_does_not_resolve_names_the_host(lab: &Lab) -> TestResult {
    lab.run(async {
        let t = Target::new("root", "no-such-host.invalid", 2222);
        let err = match ssh::connect(&t, &options(lab)).await {
            Ok(_) => return Err(fail("connected to a name that cannot resolve")),
            Err(e) => e,
        };
        check!(matches!(err.cause, Cause::Resolve(_)), "{err}");
        check!(
            err.to_string()
                .starts_with("no-such-host.invalid:2222: connect: cannot resolve address"),
            "{err}"
        );
        Ok(())
    })
}

/// `type base64` of a lab host's public host key of `kind` (ed25519, ecdsa, rsa).
fn host_key_text(lab: &Lab, host: &str, kind: &str) -> String {
    let var = format!(
        "HOST_{}_HOSTKEY_{}",
        host.replace('-', "_"),
        kind.to_ascii_uppercase()
    );
    let text = std::fs::read_to_string(lab.get(&var)).expect("host key file");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The lab CA's public key, `type base64`.
fn host_ca_text(lab: &Lab) -> String {
    let text = std::fs::read_to_string(lab.get("LAB_HOST_CA_PUB")).expect("CA file");
    text.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Signs `host`'s host keys again with the lab CA (extra ssh-keygen options: `-n`, `-V`) and
/// restarts its sshd.
fn resign(lab: &Lab, host: &str, options: &[&str]) -> TestResult {
    let out = std::process::Command::new(support::repo_root().join("integration/lab"))
        .args(["host-cert", "--name", &lab.name, host])
        .args(options)
        .output()
        .map_err(fail)?;
    check!(
        out.status.success(),
        "lab host-cert {host} {options:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Strict and accept-new options over exactly `known_hosts` (no other file).
fn only(lab: &Lab, known_hosts: &Path, policy: HostKeyPolicy) -> ConnectOptions {
    let mut o = options(lab);
    o.host_keys.known_hosts = vec![known_hosts.to_path_buf()];
    o.host_keys.learn_into = Some(known_hosts.to_path_buf());
    o.host_keys.policy = policy;
    o
}

fn host_known_only_by_ecdsa_or_rsa_connects_and_accept_new_adds_nothing(lab: &Lab) -> TestResult {
    // The hosts also have an Ed25519 key, which russh would otherwise ask for first: the
    // known key's type must be offered first, as OpenSSH does.
    for kind in ["ecdsa", "rsa"] {
        let dir = tempfile::tempdir().map_err(fail)?;
        let kh = dir.path().join("known_hosts");
        let text = format!(
            "{} {}\n{} {}\n",
            lab.addr("r1"),
            host_key_text(lab, "r1", kind),
            lab.addr("l1-1"),
            host_key_text(lab, "l1-1", kind)
        );
        std::fs::write(&kh, &text).map_err(fail)?;
        lab.run(async {
            for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
                let o = only(lab, &kh, policy);
                let s = ssh::connect(&target(lab, "r1"), &o)
                    .await
                    .map_err(|e| fail(format!("{kind}, {policy:?}: {e}")))?;
                let out = s.run_checked("hostname").await.map_err(fail)?;
                check!(out == b"r1\n", "hostname {out:?}");
                // Through r1 to its leaf, as a relay reaches its children.
                let leaf = ssh::connect_via(&s, &target(lab, "l1-1"), &o)
                    .await
                    .map_err(|e| fail(format!("{kind}, {policy:?}, via r1: {e}")))?;
                let out = leaf.run_checked("hostname").await.map_err(fail)?;
                check!(out == b"l1-1\n", "hostname {out:?}");
            }
            // Entries handed down from a parent count as well.
            let mut o = only(lab, &dir.path().join("absent"), HostKeyPolicy::Strict);
            o.host_keys.extra_entries = text.clone();
            ssh::connect(&target(lab, "r1"), &o)
                .await
                .map_err(|e| fail(format!("{kind}, entries from the parent: {e}")))?;
            Ok::<(), Failed>(())
        })?;
        let after = std::fs::read_to_string(&kh).map_err(fail)?;
        check!(after == text, "accept-new changed known_hosts:\n{after}");
    }
    Ok(())
}

fn host_certificate_from_a_cert_authority_line_is_accepted(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let kh = dir.path().join("known_hosts");
    // Only the CA: no host's own key is listed anywhere.
    let text = format!(
        "@cert-authority 10.199.*,fd00:199::* {}\n",
        host_ca_text(lab)
    );
    std::fs::write(&kh, &text).map_err(fail)?;
    let addr6 = lab.addr6("r2");
    lab.run(async {
        for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
            let o = only(lab, &kh, policy);
            for host in ["r1", "r2"] {
                let s = ssh::connect(&target(lab, host), &o)
                    .await
                    .map_err(|e| fail(format!("{host}, {policy:?}: {e}")))?;
                let out = s.run_checked("hostname").await.map_err(fail)?;
                check!(
                    out == host
                        .as_bytes()
                        .iter()
                        .chain(b"\n")
                        .copied()
                        .collect::<Vec<_>>(),
                    "hostname {out:?}"
                );
                if host == "r1" {
                    let leaf = ssh::connect_via(&s, &target(lab, "l1-1"), &o)
                        .await
                        .map_err(|e| fail(format!("l1-1 via r1, {policy:?}: {e}")))?;
                    leaf.run_checked("true").await.map_err(fail)?;
                }
            }
            // By its IPv6 address, a principal of r2's certificate too.
            let t = Target::new("root", addr6.clone(), 22);
            ssh::connect(&t, &o)
                .await
                .map_err(|e| fail(format!("{addr6}, {policy:?}: {e}")))?;
        }
        Ok::<(), Failed>(())
    })?;
    let after = std::fs::read_to_string(&kh).map_err(fail)?;
    check!(after == text, "accept-new changed known_hosts:\n{after}");
    Ok(())
}

fn certificate_from_an_unknown_authority_falls_back_to_the_plain_key(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let other = keygen(dir.path(), "other-ca", "");
    let other_ca = std::fs::read_to_string(other.with_extension("pub")).map_err(fail)?;
    let ca_line = format!("@cert-authority * {}\n", other_ca.trim());
    let addr = lab.addr("r1");
    // With r1's plain key listed, the connection goes ahead on that key (as OpenSSH).
    let with_key = dir.path().join("with_key");
    std::fs::write(
        &with_key,
        format!("{ca_line}{addr} {}\n", host_key_text(lab, "r1", "ed25519")),
    )
    .map_err(fail)?;
    let without = dir.path().join("without");
    std::fs::write(&without, &ca_line).map_err(fail)?;
    lab.run(async {
        let o = only(lab, &with_key, HostKeyPolicy::Strict);
        ssh::connect(&target(lab, "r1"), &o)
            .await
            .map_err(|e| fail(format!("with the plain key listed: {e}")))?;
        let o = only(lab, &without, HostKeyPolicy::Strict);
        let err = match ssh::connect(&target(lab, "r1"), &o).await {
            Ok(_) => return Err(fail("connected with a certificate from an unknown CA")),
            Err(e) => e,
        };
        let msg = err.to_string();
        check!(err.step == Step::HostKey, "{msg}");
        check!(
            matches!(err.cause, Cause::HostCertUnknownAuthority { .. }),
            "{msg}"
        );
        let lab_ca = russh::keys::PublicKey::from_openssh(&host_ca_text(lab)).map_err(fail)?;
        let lab_ca = ssh::known_hosts::fingerprint(&lab_ca);
        check!(
            msg.contains(&lab_ca),
            "message lacks the CA {lab_ca}: {msg}"
        );
        Ok::<(), Failed>(())
    })
}

/// Held by the tests that re-sign r3's or l3-1's certificates and restart their sshd.
static RESIGNING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn host_certificate_with_wrong_principal_or_expired_is_refused(lab: &Lab) -> TestResult {
    let _r3 = RESIGNING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().map_err(fail)?;
    let kh = dir.path().join("known_hosts");
    let text = format!("# the lab CA\n@cert-authority * {}\n", host_ca_text(lab));
    std::fs::write(&kh, &text).map_err(fail)?;
    let cases: [(&[&str], &str); 2] = [
        (
            &["-n", "wrong.name"],
            "\"10.199.0.13\" is not one of its principals (wrong.name)",
        ),
        (&["-V", "20200101:20200102"], "expired at 2020-01-0"),
    ];
    let result = (|| {
        for (options, reason) in cases {
            resign(lab, "r3", options)?;
            lab.run(async {
                for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
                    let o = only(lab, &kh, policy);
                    let err = match ssh::connect(&target(lab, "r3"), &o).await {
                        Ok(_) => {
                            return Err(fail(format!(
                                "connected with a bad certificate ({options:?}, {policy:?})"
                            )));
                        }
                        Err(e) => e,
                    };
                    let msg = err.to_string();
                    check!(err.step == Step::HostKey, "{msg}");
                    check!(matches!(err.cause, Cause::HostCertInvalid { .. }), "{msg}");
                    check!(msg.contains(reason), "message lacks {reason:?}: {msg}");
                    check!(
                        msg.contains(&format!("{}:2", kh.display())),
                        "message lacks the CA's file:line: {msg}"
                    );
                }
                Ok::<(), Failed>(())
            })?;
        }
        Ok::<(), Failed>(())
    })();
    // A good certificate again: r3 connects.
    resign(lab, "r3", &[])?;
    result?;
    lab.run(async {
        let o = only(lab, &kh, HostKeyPolicy::Strict);
        ssh::connect(&target(lab, "r3"), &o)
            .await
            .map_err(|e| fail(format!("after re-signing: {e}")))?;
        Ok::<(), Failed>(())
    })?;
    let after = std::fs::read_to_string(&kh).map_err(fail)?;
    check!(after == text, "known_hosts changed:\n{after}");
    Ok(())
}

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");

/// A private HOME holding the lab's client key and exactly `known_hosts`.
fn home_with(lab: &Lab, known_hosts: &str) -> Result<tempfile::TempDir, Failed> {
    let home = tempfile::tempdir().map_err(fail)?;
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).map_err(fail)?;
    std::fs::copy(
        lab.home().join(".ssh/id_ed25519"),
        ssh_dir.join("id_ed25519"),
    )
    .map_err(fail)?;
    std::fs::write(ssh_dir.join("known_hosts"), known_hosts).map_err(fail)?;
    Ok(home)
}

/// `arbor run` from the initiator's namespace over `topology` (relay → leaf pairs, every leaf
/// running examples/leaf.yaml), with `home` as HOME and no agent of the caller's.
fn arbor_run(
    lab: &Lab,
    home: &Path,
    pairs: &[(&str, &str)],
    extra: &[&str],
) -> Result<std::process::Output, Failed> {
    let leaf = support::repo_root().join("examples/leaf.yaml");
    let mut topo = String::from("defaults:\n  user: root\nhosts:\n");
    for (relay, child) in pairs {
        topo += &format!(
            "- host: {}\n  name: {relay}\n  children:\n  - host: {}\n    name: {child}\n    graph: {}\n",
            lab.addr(relay),
            lab.addr(child),
            leaf.display()
        );
    }
    let dir = tempfile::tempdir().map_err(fail)?;
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, topo).map_err(fail)?;
    for (relay, child) in pairs {
        for h in [relay, child] {
            lab.sh(h, "rm -rf /tmp/from-*");
        }
    }
    std::process::Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "run", "--topology"])
        .arg(&path)
        .args([
            "--tmp-prefix",
            "--converged-timeout",
            "2",
            "--connect-timeout",
            "5",
        ])
        .args(extra)
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info")
        .output()
        .map_err(fail)
}

/// The run exited with `code`; its output text, or a failure that starts with `context`.
fn exited_as(out: &std::process::Output, code: i32, context: String) -> Result<String, Failed> {
    support::harness::exited(out, code)
        .map_err(|e| fail(format!("{context}: {}", e.message().unwrap_or_default())))
}

/// No arbor process and no working dir is left on `hosts`.
fn nothing_left(lab: &Lab, hosts: &[&str]) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(8);
    for h in hosts {
        loop {
            let left = lab.sh(
                h,
                "pgrep -x -a arbor || true; ls -d /tmp/arbor.* 2>/dev/null || true",
            );
            if left.trim().is_empty() {
                break;
            }
            check!(Instant::now() < deadline, "{h} has leftovers: {left}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn a_run_at_depth_2_trusts_hosts_known_only_by_ecdsa_or_by_a_cert_authority(
    lab: &Lab,
) -> TestResult {
    // Every sshd also has an Ed25519 key, which it would prefer. The leaves are reached by the
    // relays, with the known_hosts lines the initiator hands down to them.
    let pairs = [("r1", "l1-1"), ("r2", "l2-1")];
    let mut ecdsa_only = String::new();
    for h in ["r1", "r2", "l1-1", "l2-1"] {
        ecdsa_only += &format!("{} {}\n", lab.addr(h), host_key_text(lab, h, "ecdsa"));
    }
    let ca_only = format!("@cert-authority 10.199.* {}\n", host_ca_text(lab));
    for (what, known) in [("ECDSA keys only", &ecdsa_only), ("the CA only", &ca_only)] {
        for policy in ["strict", "accept-new"] {
            let home = home_with(lab, known)?;
            let out = arbor_run(lab, home.path(), &pairs, &["--host-key-policy", policy])?;
            let log = exited_as(&out, 0, format!("known_hosts with {what}, {policy}"))?;
            for leaf in ["l1-1", "l2-1"] {
                let got = lab.sh(leaf, "cat /tmp/from-l1-1 /tmp/from-l2-1");
                check!(
                    got == "hello from l1-1\nhello from l2-1\n",
                    "{what}, {policy}: {leaf} collected {got:?}\n{log}"
                );
            }
            let after =
                std::fs::read_to_string(home.path().join(".ssh/known_hosts")).map_err(fail)?;
            check!(
                &after == known,
                "{what}, {policy}: known_hosts changed:\n{after}"
            );
        }
    }
    nothing_left(lab, &["r1", "r2", "l1-1", "l2-1"])
}

fn a_leafs_expired_certificate_at_depth_2_fails_that_leaf_naming_it(lab: &Lab) -> TestResult {
    let _r3 = RESIGNING.lock().unwrap_or_else(|e| e.into_inner());
    let known = format!("@cert-authority 10.199.* {}\n", host_ca_text(lab));
    let home = home_with(lab, &known)?;
    resign(lab, "l3-1", &["-V", "20200101:20200102"])?;
    let result = (|| {
        let pairs = [("r3", "l3-1")];
        for policy in ["strict", "accept-new"] {
            let out = arbor_run(lab, home.path(), &pairs, &["--host-key-policy", policy])?;
            let log = exited_as(&out, 1, policy.to_string())?;
            check!(
                log.contains("l3-1: host key: host certificate")
                    && log.contains("is not valid: expired"),
                "{policy}: no expired-certificate error naming l3-1\n{log}"
            );
            // The summary has a row for the leaf, below its relay's.
            check!(
                log.lines().any(|l| l.starts_with("r3/l3-1  ")
                    && l.contains(" failed ")
                    && l.contains("is not valid: expired")),
                "{policy}: the summary has no failed row for r3/l3-1\n{log}"
            );
            check!(
                !log.contains("r3: host key"),
                "{policy}: the relay's own valid certificate was refused\n{log}"
            );
            nothing_left(lab, &["r3"])?;
        }
        let after = std::fs::read_to_string(home.path().join(".ssh/known_hosts")).map_err(fail)?;
        check!(after == known, "known_hosts changed:\n{after}");
        Ok::<(), Failed>(())
    })();
    resign(lab, "l3-1", &[])?;
    result?;
    // Signed again: the same run converges.
    let out = arbor_run(lab, home.path(), &[("r3", "l3-1")], &[])?;
    exited_as(&out, 0, "after re-signing".to_string())?;
    Ok(())
}
