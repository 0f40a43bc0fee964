//! SFTP uploads: pipelined, atomic, fsynced once.
//!
//! A file is written under a temporary name in the target's directory, its mode set, fsynced
//! once, and renamed over the target with posix-rename@openssh.com (plain SFTP rename fails
//! when the target exists). A reader of the target therefore sees the old file or the whole
//! new one, never a torn one, and an interrupted upload leaves only a temp file, which is
//! removed on error.
//!
//! Many writes are kept in flight at once: with one outstanding write, throughput would be
//! one chunk per round trip.
//!
//! [`Sftp::close`] ends the session and waits until the server has closed the channel, that
//! is, until its sftp-server has exited and been reaped. A command started on the same
//! connection before that can be lost: dropbear before 2024.86 closes every session channel
//! that has not started its command yet (EOF and CLOSE, no exit status, no reply to the exec
//! request) when it handles a child's exit in the same turn of its loop (mkj/dropbear#173,
//! fixed by mkj/dropbear#326); the command then never runs, or runs on the closed channel and
//! finds its stdin closed. OpenSSH ties a child's exit to its own channel only.

use super::error::{Cause, Result, SshError, Step};
use super::session::Session;
use futures::stream::{FuturesUnordered, StreamExt};
use russh::client::Msg;
use russh::{Channel, ChannelMsg};
use russh_sftp::client::RawSftpSession;
use russh_sftp::extensions::HardlinkExtension;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Bytes per write request. OpenSSH's sftp-server accepts up to 256 KiB messages.
const CHUNK: usize = 64 * 1024;
/// Write requests in flight: enough to cover the link's bandwidth-delay product, and no more.
/// More only queues in the server: sshd holds what sftp-server has not yet read in one
/// channel buffer that it reallocates and zeroes as it grows, so on a LAN 64 writes in
/// flight upload at 198 MB/s and 8 at 321 MB/s, and a relay copying to 24 children at once
/// spent 80% of the CPU in sshd's page faults (docs/ssh.md, "Writes in flight").
///
/// The floor suits a LAN; the count grows with the round trip measured at open, sized for a
/// link of up to [`SIZED_FOR_BYTES_PER_SEC`], to the cap (OpenSSH's 2 MiB channel window
/// bounds what is useful anyway). Concurrent uploads share [`IN_FLIGHT_TOTAL`].
const IN_FLIGHT_FLOOR: usize = 8;
const IN_FLIGHT_CAP: usize = 32;
const SIZED_FOR_BYTES_PER_SEC: f64 = 125e6;
/// Writes in flight across every upload of this process; each keeps at least
/// [`IN_FLIGHT_MIN`] however many run.
const IN_FLIGHT_TOTAL: usize = 64;
const IN_FLIGHT_MIN: usize = 4;

/// How many writes one upload wants in flight over a link with this round trip.
fn in_flight_for(rtt: std::time::Duration) -> usize {
    let bdp = rtt.as_secs_f64() * SIZED_FOR_BYTES_PER_SEC;
    ((bdp / CHUNK as f64).ceil() as usize).clamp(IN_FLIGHT_FLOOR, IN_FLIGHT_CAP)
}

/// Uploads running in this process right now.
static UPLOADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts one running upload while it lives.
struct Running;

impl Running {
    fn start() -> Self {
        UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Running
    }

    /// This upload's share of the writes in flight, given what it wants on its own.
    fn share(&self, wanted: usize) -> usize {
        let n = UPLOADS.load(std::sync::atomic::Ordering::Relaxed).max(1);
        wanted.min(IN_FLIGHT_TOTAL / n).max(IN_FLIGHT_MIN)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        UPLOADS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}
/// Seconds a single request may take: generous, for thin links carrying many writes.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// How long [`Sftp::close`] waits for the server to close the channel.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const POSIX_RENAME: &str = "posix-rename@openssh.com";
const FSYNC: &str = "fsync@openssh.com";

/// An SFTP session on one host.
pub struct Sftp {
    label: String,
    raw: RawSftpSession,
    posix_rename: bool,
    fsync: bool,
    /// Completes once the server has closed the channel (or the connection is gone).
    closed: oneshot::Receiver<()>,
}

impl Session {
    /// Opens the sftp subsystem.
    pub async fn sftp(&self) -> Result<Sftp> {
        let channel = self.open_channel(Step::Sftp).await?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| self.error(Step::Sftp, e))?;
        let (stream, closed) = watched_stream(channel);
        let raw = RawSftpSession::new(stream);
        raw.set_timeout(REQUEST_TIMEOUT_SECS);
        let version = raw
            .init()
            .await
            .map_err(|e| self.error(Step::Sftp, Cause::Sftp(format!("init: {e}"))))?;
        Ok(Sftp {
            label: self.label().to_string(),
            posix_rename: version.extensions.contains_key(POSIX_RENAME),
            fsync: version.extensions.contains_key(FSYNC),
            raw,
            closed,
        })
    }
}

/// The channel as the byte stream the sftp client speaks, and a receiver that completes when
/// the server closes the channel. The server's messages are read here, not by the stream, so
/// its CLOSE (which follows EOF and the exit status) is seen even after the sftp client has
/// stopped reading.
fn watched_stream(
    channel: Channel<Msg>,
) -> (
    impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    oneshot::Receiver<()>,
) {
    let (mut read, write) = channel.split();
    // Boxed as 'static: the writer holds its own handle on the channel, not a borrow.
    let to_server: Box<dyn AsyncWrite + Send + Unpin> = Box::new(write.make_writer());
    let (mut to_client, from_server) = tokio::io::duplex(2 * CHUNK);
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut open = true;
        while let Some(msg) = read.wait().await {
            match msg {
                // An error means the sftp client is gone: its data is no longer wanted.
                ChannelMsg::Data { data } if open => {
                    open = to_client.write_all(&data).await.is_ok();
                }
                ChannelMsg::Eof => {
                    let _ = to_client.shutdown().await;
                    open = false;
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = closed_tx.send(());
    });
    (tokio::io::join(from_server, to_server), closed_rx)
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uploaded {
    pub bytes: u64,
}

impl Sftp {
    /// Ends the session: EOF to the server's sftp-server, then waits (at most 10 s) until the
    /// server has closed the channel, so the next command on this connection is safe (see the
    /// module docs). Dropping an `Sftp` ends the session without waiting.
    pub async fn close(self) -> Result<()> {
        let _ = self.raw.close_session();
        let Sftp { label, closed, .. } = self;
        match tokio::time::timeout(CLOSE_TIMEOUT, closed).await {
            Ok(_) => Ok(()),
            Err(_) => Err(SshError::new(
                label,
                Step::Sftp,
                Cause::Sftp(format!(
                    "close: the server did not close the sftp channel within {CLOSE_TIMEOUT:?}"
                )),
            )),
        }
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) -> SshError {
        SshError::new(
            self.label.clone(),
            Step::Sftp,
            Cause::Sftp(format!("{what}: {e}")),
        )
    }

    /// Uploads `size` bytes from `source` to `remote` atomically with `mode`.
    /// `progress(sent, total)` is called as the server acknowledges writes.
    pub async fn upload(
        &self,
        source: &mut (dyn AsyncRead + Unpin + Send),
        size: u64,
        remote: &str,
        mode: u32,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Uploaded> {
        let never = CancellationToken::new();
        self.upload_until(&never, source, size, remote, mode, progress)
            .await
    }

    /// [`Sftp::upload`], stopped early when `cancel` fires: the temp file is removed and the
    /// target left as it was, so a stopped run leaves no partial file behind.
    pub async fn upload_until(
        &self,
        cancel: &CancellationToken,
        source: &mut (dyn AsyncRead + Unpin + Send),
        size: u64,
        remote: &str,
        mode: u32,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<Uploaded> {
        let temp = temp_name(remote);
        let attrs = FileAttributes {
            permissions: Some(mode),
            ..FileAttributes::empty()
        };
        let flags = OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE | OpenFlags::EXCLUDE;
        let opened = std::time::Instant::now();
        let handle = self
            .raw
            .open(temp.clone(), flags, attrs)
            .await
            .map_err(|e| self.error(&format!("upload of {remote}: creating {temp}"), e))?
            .handle;
        let wanted = in_flight_for(opened.elapsed());

        let written = tokio::select! {
            written = self.write_all(&handle, source, size, remote, wanted, progress) => written,
            _ = cancel.cancelled() => Err(self.error(&format!("upload of {remote}"), "stopped")),
        };
        let finished = match written {
            Ok(bytes) => self
                .finish(&handle, &temp, remote, mode)
                .await
                .map(|_| bytes),
            Err(e) => Err(e),
        };
        match finished {
            Ok(bytes) => Ok(Uploaded { bytes }),
            Err(e) => {
                let _ = self.raw.close(handle).await;
                let _ = self.raw.remove(temp).await;
                Err(e)
            }
        }
    }

    async fn write_all(
        &self,
        handle: &str,
        source: &mut (dyn AsyncRead + Unpin + Send),
        size: u64,
        remote: &str,
        wanted: usize,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<u64> {
        let what = format!("upload of {remote}");
        let mut in_flight = FuturesUnordered::new();
        let (mut offset, mut acked) = (0u64, 0u64);
        let mut eof = false;
        let running = Running::start();
        loop {
            while !eof && in_flight.len() < running.share(wanted) {
                let mut chunk = vec![0u8; CHUNK];
                let n = read_full(source, &mut chunk)
                    .await
                    .map_err(|e| self.error(&format!("{what}: reading the local file"), e))?;
                if n == 0 {
                    eof = true;
                    break;
                }
                chunk.truncate(n);
                let at = offset;
                offset += n as u64;
                let raw = &self.raw;
                in_flight.push(async move { raw.write(handle, at, chunk).await.map(|_| n as u64) });
            }
            match in_flight.next().await {
                Some(Ok(n)) => {
                    acked += n;
                    progress(acked, size.max(acked));
                }
                Some(Err(e)) => return Err(self.error(&what, e)),
                None => break,
            }
        }
        if acked != size {
            return Err(self.error(
                &what,
                format!("the local file changed during upload ({acked} of {size} bytes)"),
            ));
        }
        Ok(acked)
    }

    async fn finish(&self, handle: &str, temp: &str, remote: &str, mode: u32) -> Result<()> {
        let what = format!("upload of {remote}");
        // The server applies its umask at open; set the mode exactly.
        let attrs = FileAttributes {
            permissions: Some(mode),
            ..FileAttributes::empty()
        };
        self.raw
            .fsetstat(handle, attrs)
            .await
            .map_err(|e| self.error(&format!("{what}: setting mode {mode:o}"), e))?;
        if self.fsync {
            let data: Vec<u8> = russh_sftp::extensions::FsyncExtension {
                handle: handle.to_string(),
            }
            .try_into()
            .map_err(|e| self.error(&what, e))?;
            self.raw
                .extended(FSYNC, data)
                .await
                .map_err(|e| self.error(&format!("{what}: fsync"), e))?;
        }
        self.raw
            .close(handle)
            .await
            .map_err(|e| self.error(&format!("{what}: close"), e))?;
        self.rename_over(temp, remote).await
    }

    /// Renames `from` over `to`, replacing it atomically where the server allows.
    pub async fn rename_over(&self, from: &str, to: &str) -> Result<()> {
        let what = format!("renaming {from} to {to}");
        if self.posix_rename {
            let data: Vec<u8> = HardlinkExtension {
                oldpath: from.to_string(),
                newpath: to.to_string(),
            }
            .try_into()
            .map_err(|e| self.error(&what, e))?;
            return match self.raw.extended(POSIX_RENAME, data).await {
                Ok(russh_sftp::protocol::Packet::Status(s)) if s.status_code == StatusCode::Ok => {
                    Ok(())
                }
                Ok(russh_sftp::protocol::Packet::Status(s)) => {
                    Err(self.error(&what, format!("{}: {}", s.status_code, s.error_message)))
                }
                Ok(_) => Err(self.error(&what, "unexpected reply")),
                Err(e) => Err(self.error(&what, e)),
            };
        }
        // No atomic replace on this server: remove, then rename (a short window without `to`).
        let _ = self.raw.remove(to).await;
        self.raw
            .rename(from, to)
            .await
            .map(|_| ())
            .map_err(|e| self.error(&what, e))
    }

    /// Creates a directory with `mode`.
    pub async fn mkdir(&self, path: &str, mode: u32) -> Result<()> {
        let attrs = FileAttributes {
            permissions: Some(mode),
            ..FileAttributes::empty()
        };
        self.raw
            .mkdir(path, attrs)
            .await
            .map(|_| ())
            .map_err(|e| self.error(&format!("mkdir {path}"), e))
    }

    /// Size and mode of a remote file, or `None` if it does not exist.
    pub async fn stat(&self, path: &str) -> Result<Option<(u64, u32)>> {
        match self.raw.stat(path).await {
            Ok(attrs) => Ok(Some((
                attrs.attrs.size.unwrap_or(0),
                attrs.attrs.permissions.unwrap_or(0),
            ))),
            Err(russh_sftp::client::error::Error::Status(s))
                if s.status_code == StatusCode::NoSuchFile =>
            {
                Ok(None)
            }
            Err(e) => Err(self.error(&format!("stat {path}"), e)),
        }
    }

    /// Removes a file.
    pub async fn remove(&self, path: &str) -> Result<()> {
        self.raw
            .remove(path)
            .await
            .map(|_| ())
            .map_err(|e| self.error(&format!("remove {path}"), e))
    }
}

/// `.name.arbor-<random>` beside `remote`, so the rename stays on one filesystem.
fn temp_name(remote: &str) -> String {
    let (dir, base) = match remote.rsplit_once('/') {
        Some((dir, base)) => (format!("{dir}/"), base),
        None => (String::new(), remote),
    };
    format!("{dir}.{base}.arbor-{:016x}", rand::random::<u64>())
}

async fn read_full(
    source: &mut (dyn AsyncRead + Unpin + Send),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = source.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_flight_follow_the_round_trip() {
        use std::time::Duration;
        assert_eq!(in_flight_for(Duration::from_micros(300)), IN_FLIGHT_FLOOR);
        // 10 ms at 125 MB/s is 1.25 MB: 20 writes of 64 KiB.
        assert_eq!(in_flight_for(Duration::from_millis(10)), 20);
        assert_eq!(in_flight_for(Duration::from_millis(200)), IN_FLIGHT_CAP);
    }

    #[test]
    fn temp_name_stays_in_the_target_directory() {
        let t = temp_name("/root/.cache/arbor/bin/abc");
        assert!(t.starts_with("/root/.cache/arbor/bin/.abc.arbor-"), "{t}");
        assert_ne!(temp_name("/x/y"), temp_name("/x/y"));
        assert!(temp_name("rel").starts_with(".rel.arbor-"));
    }
}
