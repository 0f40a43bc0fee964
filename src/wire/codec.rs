//! Length-delimited JSON frames over any async byte stream.

use super::WireError;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame either side accepts: graphs and subtrees fit many times over, and a
/// corrupt length cannot make a node allocate gigabytes.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Writes frames. Each `send` writes one whole frame and flushes.
pub struct FrameWriter<W> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            buf: Vec::new(),
        }
    }

    pub async fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), WireError> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        serde_json::to_writer(&mut self.buf, frame)?;
        let len = self.buf.len() - 4;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        self.buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
        self.inner.write_all(&self.buf).await?;
        self.inner.flush().await?;
        Ok(())
    }

    pub async fn shutdown(&mut self) -> Result<(), WireError> {
        self.inner.shutdown().await?;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads frames. [`FrameReader::recv`] is cancel-safe: bytes already read stay buffered in
/// the reader, so a `recv` dropped by a `select!` mid-frame loses nothing, and the next call
/// picks the frame up where the last one stopped.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
        }
    }

    /// The next frame, or `Ok(None)` on a clean end of stream between frames.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_FRAME {
                    return Err(WireError::TooLarge(len));
                }
                if self.buf.len() >= 4 + len {
                    let frame = serde_json::from_slice(&self.buf[4..4 + len]);
                    self.buf.drain(..4 + len);
                    return Ok(Some(frame?));
                }
                self.buf.reserve(4 + len - self.buf.len());
            } else {
                self.buf.reserve(64 * 1024);
            }
            // `read_buf` either appends what it read or, if dropped while pending, nothing.
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Closed)
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Down, Event, EventKind, HostPath, Up};

    #[tokio::test]
    async fn frames_round_trip_in_order() {
        let (a, b) = tokio::io::duplex(64);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let sent = vec![
            Up::hello(),
            Up::Event(Event {
                host: HostPath::parse("r1/l1-2"),
                kind: EventKind::Log {
                    line: "hello | with a pipe".into(),
                    stderr: false,
                },
            }),
        ];
        let writer = tokio::spawn(async move {
            for f in &sent {
                w.send(f).await.expect("send");
            }
            sent
        });
        let mut got = Vec::new();
        while let Some(frame) = r.recv::<Up>().await.expect("recv") {
            got.push(frame);
            if got.len() == 2 {
                break;
            }
        }
        let sent = writer.await.expect("writer");
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn oversized_length_is_refused_without_allocating() {
        let mut bytes = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(
            r.recv::<Down>().await,
            Err(WireError::TooLarge(n)) if n == MAX_FRAME + 1
        ));
    }

    #[tokio::test]
    async fn truncated_frame_is_closed_not_clean_eof() {
        let mut bytes = 10u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{\"ty");
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(r.recv::<Down>().await, Err(WireError::Closed)));
        let mut empty = FrameReader::new(&b""[..]);
        assert!(matches!(empty.recv::<Down>().await, Ok(None)));
    }

    /// A `recv` dropped mid-frame (as a `select!` does when another branch wins) must not
    /// lose the bytes it already read: the next `recv` returns the whole frame.
    #[tokio::test]
    async fn recv_dropped_mid_frame_loses_nothing() {
        let (mut a, b) = tokio::io::duplex(1024);
        let mut r = FrameReader::new(b);
        let mut bytes = Vec::new();
        let mut w = FrameWriter::new(&mut bytes);
        w.send(&Down::Shutdown {
            reason: "bye".into(),
        })
        .await
        .expect("encode");
        // The length and half the body arrive; the read is then cancelled.
        a.write_all(&bytes[..8]).await.expect("write");
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(50), r.recv::<Down>()).await;
        assert!(cancelled.is_err(), "a half frame must not complete");
        a.write_all(&bytes[8..]).await.expect("write");
        let frame = r.recv::<Down>().await.expect("recv");
        assert!(matches!(frame, Some(Down::Shutdown { reason }) if reason == "bye"));
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let mut bytes = 3u32.to_be_bytes().to_vec();
        bytes.extend_from_slice(b"zzz");
        let mut r = FrameReader::new(&bytes[..]);
        assert!(matches!(
            r.recv::<Down>().await,
            Err(WireError::Malformed(_))
        ));
    }
}
