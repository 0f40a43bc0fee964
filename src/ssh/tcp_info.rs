//! The kernel's view of a TCP connection (`getsockopt(TCP_INFO)`, Linux): how fast the link
//! delivered what was sent, and whether the link or the far end held the sender back.
//!
//! A rate timed by the application (bytes between two lines of output) includes the far end's
//! scheduling: on a host whose CPU is busy, a LAN reads as a thin link. The kernel's
//! delivery rate comes from acknowledgements, which the far end's kernel sends as data
//! arrives. docs/remote.md, "Compression".

use std::os::fd::{AsRawFd, OwnedFd};

/// The part of the kernel's `struct tcp_info` (linux/tcp.h, append-only) read here.
#[repr(C)]
#[derive(Default)]
struct Raw {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    /// bit 0: `tcpi_delivery_rate_app_limited`.
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
}

/// What the kernel says about a connection's sending side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkInfo {
    /// Bytes the far end acknowledged, over the connection's whole life.
    pub bytes_acked: u64,
    /// The latest delivery rate sample, bytes/s.
    pub delivery_rate: f64,
    /// That sample was taken while the sender had too little to send to fill the link.
    pub app_limited: bool,
}

impl LinkInfo {
    /// Reads a socket's `TCP_INFO`; `None` where the kernel is too old to report a delivery
    /// rate (before Linux 4.9) or the descriptor is not a TCP socket.
    pub fn read(socket: &OwnedFd) -> Option<LinkInfo> {
        let mut raw = Raw::default();
        let mut len = std::mem::size_of::<Raw>() as libc::socklen_t;
        // SAFETY: `raw` is a plain repr(C) struct of `len` bytes the kernel fills (at most
        // `len` of them), and `len` is a valid in/out length.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut raw as *mut Raw).cast(),
                &mut len,
            )
        };
        if rc != 0 || (len as usize) < std::mem::size_of::<Raw>() {
            return None;
        }
        Some(LinkInfo {
            bytes_acked: raw.bytes_acked,
            delivery_rate: raw.delivery_rate as f64,
            app_limited: raw.flags & 1 != 0,
        })
    }

    /// What changed between `earlier` and this reading (a copy's share of a connection).
    pub fn since(&self, earlier: &LinkInfo) -> LinkInfo {
        LinkInfo {
            bytes_acked: self.bytes_acked.saturating_sub(earlier.bytes_acked),
            ..*self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_kernel_counts_what_a_connection_delivered() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut sink = Vec::new();
            s.read_to_end(&mut sink).unwrap();
            sink.len()
        });
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let fd = OwnedFd::from(s.try_clone().unwrap());
        let before = LinkInfo::read(&fd).expect("TCP_INFO on a TCP socket");
        s.write_all(&vec![7u8; 1 << 20]).unwrap();
        // Acknowledged once the reader has it all.
        s.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(reader.join().unwrap(), 1 << 20);
        let after = LinkInfo::read(&fd).unwrap();
        let copy = after.since(&before);
        assert!(copy.bytes_acked >= 1 << 20, "{copy:?}");
        assert!(copy.delivery_rate > 0.0, "{copy:?}");
        // Not a TCP socket: no reading.
        let file = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        assert_eq!(LinkInfo::read(&file), None);
    }
}
