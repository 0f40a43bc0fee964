//! Length-delimited JSON frames over any async byte stream: tokio-util's
//! [`LengthDelimitedCodec`] (4-byte big-endian length, then the body) does the framing, so a
//! read dropped by a `select!` mid-frame loses nothing (the partial frame stays buffered in
//! the `FramedRead`), and serde_json the body.

use super::WireError;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// The largest frame either side accepts: graphs and subtrees fit many times over, and a
/// corrupt length cannot make a node allocate gigabytes.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// The largest frame a parent accepts from a child: events are small (a log line is cut at
/// [`MAX_LINE`]), so a child cannot make its parent buffer more than this per frame.
pub const MAX_UP_FRAME: usize = 64 * 1024;

/// The longest log or stderr line a node sends up; longer lines are cut.
pub const MAX_LINE: usize = 16 * 1024;

fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(max)
        .new_codec()
}

/// Turns the codec's I/O errors into the link's: an over-long length, and a stream that ends
/// inside a frame.
fn read_error(e: std::io::Error) -> WireError {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
    {
        WireError::TooLarge
    } else if e.kind() == std::io::ErrorKind::Other && e.to_string() == "bytes remaining on stream"
    {
        WireError::Closed
    } else {
        WireError::Io(e)
    }
}

/// Writes frames. Each `send` writes one whole frame and flushes.
pub struct FrameWriter<W> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner: FramedWrite::new(inner, codec(MAX_FRAME)),
        }
    }

    pub async fn send<T: Serialize>(&mut self, frame: &T) -> Result<(), WireError> {
        let body = serde_json::to_vec(frame)?;
        if body.len() > MAX_FRAME {
            return Err(WireError::TooLarge);
        }
        self.inner.send(Bytes::from(body)).await.map_err(read_error)
    }

    /// Flushes and closes the stream (the peer reads a clean end).
    pub async fn shutdown(&mut self) -> Result<(), WireError> {
        SinkExt::<Bytes>::close(&mut self.inner).await?;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.inner.into_inner()
    }
}

/// Reads frames. [`FrameReader::recv`] is cancel-safe: a `recv` dropped mid-frame leaves the
/// bytes it read in the reader's buffer, and the next call returns the whole frame.
pub struct FrameReader<R> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_FRAME)
    }

    /// A reader that refuses frames longer than `max` bytes (a parent reading its child's
    /// events uses [`MAX_UP_FRAME`]).
    pub fn with_limit(inner: R, max: usize) -> Self {
        FrameReader {
            inner: FramedRead::new(inner, codec(max)),
        }
    }

    /// The next frame, or `Ok(None)` on a clean end of stream between frames.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, WireError> {
        match self.inner.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(read_error(e)),
            Some(Ok(body)) => Ok(Some(serde_json::from_slice(&body)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Down, Event, EventKind, HostPath, Up};
    use tokio::io::AsyncWriteExt;

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
        assert!(matches!(r.recv::<Down>().await, Err(WireError::TooLarge)));
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
