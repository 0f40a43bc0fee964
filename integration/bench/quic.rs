//! Benchmark: one large transfer from the initiator to a relay, over arbor's SSH transport
//! (russh, an exec channel whose stdin the bytes go down) against QUIC (`wire::quic`, one
//! stream, pinned certificates both ways) with each congestion controller quinn offers, on
//! the lab's link unshaped, shaped to 20 Mbit/s (tc tbf, as `integration/lab up --rate`), and
//! shaped with 1% random loss each way (nftables `numgen random mod 100 < 1 drop` in both
//! namespaces). Same bytes, same link, same run, alternating; medians of several runs. Each
//! time includes connecting (TCP + SSH auth; the QUIC handshake) and ends when the far end
//! says it has every byte. This measures the transports alone, which the node loop moves its
//! frames and artifacts onto; it is what chose QUIC's congestion controller.
//!
//! Run by hand: `cargo bench --bench quic` (as root). `ARBOR_QUIC_MB` (default 200) sets the
//! size and `ARBOR_QUIC_RUNS` (default 3) the runs per case; `ARBOR_QUIC_LINKS` picks links
//! (comma list of `lan`, `thin`, `lossy`).

#[path = "../support/mod.rs"]
mod support;

use arbor::ssh::{self, AgentSource, ConnectOptions, Target};
use arbor::wire::quic::{self, Congestion, Identity, Listener, Tuning};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use support::Lab;
use tokio::io::AsyncWriteExt;

const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Ssh,
    Quic(Congestion),
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Ssh => "SSH (russh exec channel)",
            Transport::Quic(Congestion::Cubic) => "QUIC, Cubic",
            Transport::Quic(Congestion::NewReno) => "QUIC, NewReno",
            Transport::Quic(Congestion::Bbr) => "QUIC, BBR",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Link {
    Lan,
    Thin,
    Lossy,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Link::Lan => "unshaped lab link",
            Link::Thin => "20 Mbit/s (tc tbf)",
            Link::Lossy => "20 Mbit/s, 1% random loss each way",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Link::Lan => "lan",
            Link::Thin => "thin",
            Link::Lossy => "lossy",
        }
    }
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("benchmark: run it with `cargo bench --bench quic` (as root)");
        return;
    }
    let mb = env_num("ARBOR_QUIC_MB", 200);
    let runs = env_num("ARBOR_QUIC_RUNS", 3);
    let links: Vec<Link> = {
        let want = std::env::var("ARBOR_QUIC_LINKS").unwrap_or_else(|_| "lan,thin,lossy".into());
        [Link::Lan, Link::Thin, Link::Lossy]
            .into_iter()
            .filter(|l| want.split(',').any(|w| w.trim() == l.key()))
            .collect()
    };
    let transports = [
        Transport::Ssh,
        Transport::Quic(Congestion::Cubic),
        Transport::Quic(Congestion::NewReno),
        Transport::Quic(Congestion::Bbr),
    ];
    let lab = Lab::up("bquic", &["--relays", "1", "--leaves", "0"]);
    let bytes = (mb * CHUNK) as u64;
    let mut table = String::from(
        "| link | transport | median time | throughput | time vs SSH | RTT under load |\n\
         |---|---|---|---|---|---|\n",
    );
    for &link in &links {
        shape(&lab, link);
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); transports.len()];
        let mut rtts: Vec<Vec<Duration>> = vec![Vec::new(); transports.len()];
        for run in 0..runs {
            for (i, &t) in transports.iter().enumerate() {
                let (took, rtt) = match t {
                    Transport::Ssh => (ssh_send(&lab, bytes), None),
                    Transport::Quic(cc) => {
                        let (took, rtt) = quic_send(&lab, bytes, cc);
                        (took, Some(rtt))
                    }
                };
                eprintln!(
                    "{} run {run}: {}: {:.2} s ({:.1} MB/s), RTT under load {:?}",
                    link.name(),
                    t.name(),
                    took.as_secs_f64(),
                    bytes as f64 / 1e6 / took.as_secs_f64(),
                    rtt
                );
                times[i].push(took);
                if let Some(r) = rtt {
                    rtts[i].push(r);
                }
            }
        }
        let ssh = median(&mut times[0]);
        for (i, &t) in transports.iter().enumerate() {
            let m = median(&mut times[i]);
            let rtt = if rtts[i].is_empty() {
                "—".to_string()
            } else {
                format!("{:.0} ms", median(&mut rtts[i]).as_secs_f64() * 1e3)
            };
            table.push_str(&format!(
                "| {} | {} | {:.2} s | {:.1} MB/s | {:.2}× | {rtt} |\n",
                link.name(),
                t.name(),
                m.as_secs_f64(),
                bytes as f64 / 1e6 / m.as_secs_f64(),
                m.as_secs_f64() / ssh.as_secs_f64()
            ));
        }
    }
    table.push_str(&format!(
        "\n{mb} MiB from the initiator's namespace to r1, median of {runs} runs per case, the \
         transports alternating within each run. Each time includes connecting and ends when \
         r1 has every byte. RTT under load: quinn's smoothed round trip with three \
         quarters sent, the delay a control frame queued behind the transfer would see \
         (the lab's propagation delay is under a millisecond; the rest is queue). Command: `ARBOR_QUIC_MB={mb} ARBOR_QUIC_RUNS={runs} \
         cargo bench --bench quic`.\n"
    ));
    println!("{table}");
    support::write_bench_section("quic", &table);
    lab.down();
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Sets the initiator's link to `link`: tbf both ways as the lab does for `--rate`, and for
/// loss an nftables rule dropping 1% of what each end receives.
fn shape(lab: &Lab, link: Link) {
    let (init, edge, r1) = (lab.init_ns(), lab.get("LAB_EDGE_NS"), lab.get("HOST_r1_NS"));
    for (ns, dev) in [(init, "edge0"), (edge, "p-init")] {
        let _ = Command::new("tc")
            .args(["-n", ns, "qdisc", "del", "dev", dev, "root"])
            .output();
        if link != Link::Lan {
            support::local(
                "tc",
                &[
                    "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", "20mbit",
                    "burst", "25000", "latency", "100ms",
                ],
            );
        }
    }
    for ns in [init, r1] {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", ns, "nft", "delete", "table", "inet", "bquic",
            ])
            .output();
        if link == Link::Lossy {
            support::local(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "nft",
                    "add table inet bquic; \
                     add chain inet bquic input { type filter hook input priority 0; }; \
                     add rule inet bquic input numgen random mod 100 < 1 drop",
                ],
            );
        }
    }
}

fn block() -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..CHUNK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `bytes` down an exec channel to `cat > /dev/null` on r1, over arbor's SSH.
fn ssh_send(lab: &Lab, bytes: u64) -> Duration {
    let addr = lab.addr("r1");
    std::thread::scope(|s| {
        s.spawn(|| {
            lab.run(async {
                let mut o = ConnectOptions::for_home(&lab.home());
                o.auth.agent = AgentSource::None;
                let data = block();
                let started = Instant::now();
                let session = ssh::connect(&Target::new("root", &addr, 22), &o)
                    .await
                    .expect("connect");
                let command = session
                    .exec("wc -c", &Default::default())
                    .await
                    .expect("exec");
                let mut stdin = command.stdin_writer();
                let mut sent = 0;
                while sent < bytes {
                    stdin.write_all(&data).await.expect("write");
                    sent += data.len() as u64;
                }
                stdin.shutdown().await.expect("eof");
                let out = command.collect().await.expect("collect");
                let took = started.elapsed();
                let got: u64 = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("wc -c");
                assert_eq!(got, bytes, "r1 received {got} of {bytes} bytes over SSH");
                took
            })
        })
        .join()
        .expect("ssh thread")
    })
}

/// `bytes` over one QUIC stream to a listener in r1's namespace, with `cc`.
fn quic_send(lab: &Lab, bytes: u64, cc: Congestion) -> (Duration, Duration) {
    let tuning = Tuning {
        keep_alive: Duration::from_secs(5),
        idle: Duration::from_secs(60),
        congestion: cc,
    };
    let (parent, child) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let r1_ns = lab.get("HOST_r1_NS").to_string();
    let r1_addr: std::net::IpAddr = lab.addr("r1").parse().unwrap();
    let (port_tx, port_rx) = std::sync::mpsc::channel::<SocketAddr>();
    let parent_fp = parent.fingerprint().to_string();
    let child_fp = child.fingerprint().to_string();
    std::thread::scope(|s| {
        let server = s.spawn(move || {
            support::enter_netns(&r1_ns);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let listener =
                    Listener::bind(r1_addr, 47000..=47999, &child, &parent_fp, &tuning).unwrap();
                port_tx.send(listener.local_addr()).unwrap();
                let conn = listener.accept().await.unwrap().unwrap();
                let (mut send, mut recv) = conn.accept_bi().await.unwrap();
                let mut got = 0u64;
                while let Some(chunk) = recv.read_chunk(CHUNK, true).await.unwrap() {
                    got += chunk.bytes.len() as u64;
                }
                send.write_all(&got.to_be_bytes()).await.unwrap();
                send.finish().unwrap();
                let _ = conn.closed().await;
                listener.close();
            })
        });
        let addr = port_rx.recv().expect("listener address");
        let client = s.spawn(move || {
            lab.run(async move {
                let data = bytes::Bytes::from(block());
                let started = Instant::now();
                let (endpoint, conn) =
                    quic::connect(addr, &parent, &child_fp, &tuning, Duration::from_secs(5))
                        .await
                        .expect("QUIC connect");
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                let mut sent = 0;
                let mut rtt = Duration::ZERO;
                while sent < bytes {
                    send.write_chunk(data.clone()).await.unwrap();
                    sent += data.len() as u64;
                    // The round trip while the link is busy: the queue the controller keeps.
                    if rtt.is_zero() && sent >= bytes * 3 / 4 {
                        rtt = conn.rtt();
                    }
                }
                send.finish().unwrap();
                let reply = recv.read_to_end(8).await.unwrap();
                let took = started.elapsed();
                let got = u64::from_be_bytes(reply.try_into().unwrap());
                assert_eq!(got, bytes, "r1 received {got} of {bytes} bytes over QUIC");
                conn.close(0u32.into(), b"done");
                endpoint.wait_idle().await;
                (took, rtt)
            })
        });
        // The client's thread, not this one, enters the initiator's namespace: the lab's
        // teardown kills whatever is left in its namespaces.
        let took = client.join().expect("QUIC client thread");
        server.join().expect("QUIC listener thread");
        took
    })
}
