//! Lets etcdctl's `http://` endpoints through to the store's HTTP/2 server.
//!
//! etcdctl 3.4 (grpc-go) sends an endpoint written as a URL verbatim as the HTTP/2
//! `:authority` of some commands (`endpoint status`, `endpoint health`, `defrag`):
//! `http://127.0.0.1:2379`. That is not an authority (RFC 3986 has no `/` in one), and the
//! HTTP/2 layer under tonic (h2) refuses the request with PROTOCOL_ERROR, where etcd's grpc-go
//! server lets it pass. Users write `http://` endpoints, so the store reads every connection
//! through [`FixAuthority`], which rewrites such a value before h2 sees it:
//! `http://127.0.0.1:2379` becomes `httpx--127.0.0.1:2379`, a valid authority that the store
//! ignores as it ignores every authority.
//!
//! The rewrite keeps every length: the value is replaced in place, byte for byte when sent
//! as a plain literal and code for code when Huffman-coded (`:` and `x` both have 7-bit codes,
//! `/` and `-` 6-bit ones). So frame lengths, and the HPACK dynamic table (whose accounting
//! counts value lengths) stay exactly as the client sees them, and no HPACK state has to be
//! kept: a later request that names the indexed entry gets the rewritten value.
//!
//! Scope: the `:authority` pseudo-header sent as a literal with the static table's name
//! (index 1), which is how HPACK encoders send it, or with a plain literal name. Anything
//! else passes untouched, as does every connection that does not start with the HTTP/2
//! preface (the JSON gateway's HTTP/1). A header block larger than [`MAX_BLOCK`] passes
//! untouched too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest header block (HEADERS and its CONTINUATIONs) held back to be looked at.
pub const MAX_BLOCK: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not yet known whether the client speaks HTTP/2.
    Detect,
    /// Frames: rewritten where needed.
    H2,
    /// Anything else, or an oversized block: passed through untouched from here on.
    Plain,
}

/// Reads an incoming connection, rewriting `:authority` values that are URLs; writes pass
/// through.
pub struct FixAuthority<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner`, not yet given to the reader.
    pending: Vec<u8>,
    /// How much of `pending`, from its start, may be given out as it is.
    ready: usize,
    /// Payload bytes of the current frame still to pass through (frames other than headers).
    passing: usize,
    eof: bool,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> Self {
        FixAuthority {
            inner,
            mode: Mode::Detect,
            pending: Vec::new(),
            ready: 0,
            passing: 0,
            eof: false,
        }
    }

    /// Moves `ready` forward over whatever in `pending` can be given out now.
    fn advance(&mut self) {
        loop {
            match self.mode {
                Mode::Plain => {
                    self.ready = self.pending.len();
                    return;
                }
                Mode::Detect => {
                    let n = self.pending.len().min(PREFACE.len());
                    if self.pending[..n] != PREFACE[..n] {
                        self.mode = Mode::Plain;
                        continue;
                    }
                    if n < PREFACE.len() {
                        if self.eof {
                            self.mode = Mode::Plain;
                            continue;
                        }
                        return;
                    }
                    self.ready = PREFACE.len();
                    self.mode = Mode::H2;
                }
                Mode::H2 => {
                    if self.passing > 0 {
                        let n = self.passing.min(self.pending.len() - self.ready);
                        self.ready += n;
                        self.passing -= n;
                        if self.passing > 0 {
                            return;
                        }
                    }
                    let rest = &self.pending[self.ready..];
                    if rest.len() < FRAME_HEADER {
                        return;
                    }
                    let (len, kind) = frame_header(rest);
                    if kind != HEADERS {
                        self.ready += FRAME_HEADER;
                        self.passing = len;
                        continue;
                    }
                    match header_block(rest) {
                        Block::Incomplete if self.eof => self.mode = Mode::Plain,
                        Block::Incomplete => return,
                        Block::TooLarge => self.mode = Mode::Plain,
                        Block::Complete { end, fragments } => {
                            let start = self.ready;
                            fix_fragments(&mut self.pending[start..start + end], &fragments);
                            self.ready += end;
                        }
                    }
                }
            }
        }
    }
}

fn frame_header(b: &[u8]) -> (usize, u8) {
    let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
    (len, b[3])
}

enum Block {
    Incomplete,
    TooLarge,
    /// The frames of the block end at `end`; the header block fragments are these ranges.
    Complete {
        end: usize,
        fragments: Vec<(usize, usize)>,
    },
}

/// The header block that starts with the HEADERS frame at the start of `b`, with its
/// CONTINUATION frames.
fn header_block(b: &[u8]) -> Block {
    let mut at = 0;
    let mut fragments = Vec::new();
    loop {
        if at + FRAME_HEADER > b.len() {
            return if at > MAX_BLOCK {
                Block::TooLarge
            } else {
                Block::Incomplete
            };
        }
        let (len, kind) = frame_header(&b[at..]);
        let flags = b[at + 4];
        let payload = at + FRAME_HEADER;
        let end = payload + len;
        if end > MAX_BLOCK {
            return Block::TooLarge;
        }
        if end > b.len() {
            return Block::Incomplete;
        }
        // The first frame is HEADERS; anything but CONTINUATION after it is the peer's
        // protocol error, for h2 to answer: pass it untouched.
        if at > 0 && kind != CONTINUATION {
            return Block::Complete {
                end: at,
                fragments: Vec::new(),
            };
        }
        let (mut from, mut to) = (payload, end);
        if kind == HEADERS {
            if flags & PADDED != 0 {
                let Some(&pad) = b.get(payload) else {
                    return Block::Complete {
                        end,
                        fragments: Vec::new(),
                    };
                };
                from += 1;
                to = to.saturating_sub(usize::from(pad));
            }
            if flags & PRIORITY != 0 {
                from += 5;
            }
        }
        if from <= to {
            fragments.push((from, to));
        }
        at = end;
        if flags & END_HEADERS != 0 {
            return Block::Complete { end, fragments };
        }
    }
}

/// Rewrites the block made of `fragments` of `frames` in place.
fn fix_fragments(frames: &mut [u8], fragments: &[(usize, usize)]) {
    let mut block: Vec<u8> = Vec::new();
    for &(from, to) in fragments {
        block.extend_from_slice(&frames[from..to]);
    }
    if !fix_block(&mut block) {
        return;
    }
    let mut at = 0;
    for &(from, to) in fragments {
        frames[from..to].copy_from_slice(&block[at..at + (to - from)]);
        at += to - from;
    }
}

/// Reads an HPACK integer with an `n`-bit prefix at `b[*at]`.
fn integer(b: &[u8], at: &mut usize, n: u32) -> Option<usize> {
    let mask = (1u16 << n) as u8 - 1;
    let mut value = usize::from(*b.get(*at)? & mask);
    *at += 1;
    if value < usize::from(mask) {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let byte = *b.get(*at)?;
        *at += 1;
        if shift > 28 {
            return None;
        }
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
}

/// A string literal at `b[*at]`: (Huffman-coded, range of its bytes).
fn string(b: &[u8], at: &mut usize) -> Option<(bool, usize, usize)> {
    let huffman = *b.get(*at)? & 0x80 != 0;
    let len = integer(b, at, 7)?;
    let from = *at;
    let to = from.checked_add(len).filter(|&to| to <= b.len())?;
    *at = to;
    Some((huffman, from, to))
}

/// Rewrites every `:authority` value in an HPACK header block that is a URL; whether any was.
/// Stops at the first thing it cannot read (h2 will refuse the block anyway).
fn fix_block(b: &mut [u8]) -> bool {
    let mut at = 0;
    let mut changed = false;
    while at < b.len() {
        let first = b[at];
        let prefix = if first & 0x80 != 0 {
            // Indexed field: nothing literal to look at.
            if integer(b, &mut at, 7).is_none() {
                return changed;
            }
            continue;
        } else if first & 0x40 != 0 {
            6 // literal with incremental indexing
        } else if first & 0x20 != 0 {
            // Dynamic table size update.
            if integer(b, &mut at, 5).is_none() {
                return changed;
            }
            continue;
        } else {
            4 // literal without indexing, or never indexed
        };
        let Some(index) = integer(b, &mut at, prefix) else {
            return changed;
        };
        let is_authority = if index == 0 {
            match string(b, &mut at) {
                Some((false, from, to)) => &b[from..to] == b":authority",
                Some((true, _, _)) => false,
                None => return changed,
            }
        } else {
            index == 1
        };
        let Some((huffman, from, to)) = string(b, &mut at) else {
            return changed;
        };
        if is_authority {
            let value = &mut b[from..to];
            changed |= if huffman {
                fix_huffman(value)
            } else {
                fix_plain(value)
            };
        }
    }
    changed
}

/// `http://…` or `https://…` → `httpx--…` or `httpsx--…`.
fn fix_plain(value: &mut [u8]) -> bool {
    for scheme in [&b"http"[..], b"https"] {
        let n = scheme.len();
        if value.len() > n + 3 && value.starts_with(scheme) && &value[n..n + 3] == b"://" {
            value[n..n + 3].copy_from_slice(b"x--");
            return true;
        }
    }
    false
}

/// HPACK Huffman codes (RFC 7541, Appendix B) of the characters involved: (code, bits).
const H: (u32, u32) = (0x27, 6);
const T: (u32, u32) = (0x9, 5);
const P: (u32, u32) = (0x2b, 6);
const S: (u32, u32) = (0x8, 5);
const COLON: (u32, u32) = (0x5c, 7);
const SLASH: (u32, u32) = (0x18, 6);
const X: (u32, u32) = (0x79, 7);
const DASH: (u32, u32) = (0x16, 6);

/// The Huffman-coded form of [`fix_plain`]: the codes of `://` (7+6+6 bits) become those of
/// `x--` (7+6+6 bits) at the same bit offset.
fn fix_huffman(value: &mut [u8]) -> bool {
    for scheme in [&[H, T, T, P][..], &[H, T, T, P, S]] {
        let mut offset = 0;
        let mut matches = true;
        for &(code, bits) in scheme.iter().chain(&[COLON, SLASH, SLASH]) {
            if bits_at(value, offset, bits) != Some(code) {
                matches = false;
                break;
            }
            offset += bits;
        }
        // Something must follow the scheme for this to be a URL, not just "http://". Padding
        // is fewer than 8 bits, all ones (a prefix of EOS); no symbol's code is.
        let total = value.len() as u32 * 8;
        let rest = total.saturating_sub(offset);
        let padding_only =
            rest < 8 && bits_at(value, offset, rest).is_some_and(|b| b == (1u32 << rest) - 1);
        if !matches || rest == 0 || padding_only {
            continue;
        }
        let mut at = offset - (COLON.1 + SLASH.1 + SLASH.1);
        for (code, bits) in [X, DASH, DASH] {
            set_bits(value, at, bits, code);
            at += bits;
        }
        return true;
    }
    false
}

/// The `bits` bits of `b` from bit `offset` (most significant first).
fn bits_at(b: &[u8], offset: u32, bits: u32) -> Option<u32> {
    let mut v = 0;
    for i in offset..offset + bits {
        let byte = *b.get((i / 8) as usize)?;
        v = (v << 1) | u32::from((byte >> (7 - i % 8)) & 1);
    }
    Some(v)
}

fn set_bits(b: &mut [u8], offset: u32, bits: u32, code: u32) {
    for (k, i) in (offset..offset + bits).enumerate() {
        let bit = (code >> (bits - 1 - k as u32)) & 1;
        let mask = 1u8 << (7 - i % 8);
        let byte = &mut b[(i / 8) as usize];
        if bit == 1 {
            *byte |= mask;
        } else {
            *byte &= !mask;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.drain(..n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // What was held back and never completed goes out as it is.
                if this.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.mode = Mode::Plain;
                this.advance();
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
            } else {
                this.pending.extend_from_slice(rb.filled());
            }
            this.advance();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FixAuthority<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// RFC 7541 Huffman coding, for the characters these tests use.
    fn huffman(text: &str) -> Vec<u8> {
        let code = |c: char| -> (u32, u32) {
            match c {
                'h' => H,
                't' => T,
                'p' => P,
                's' => S,
                ':' => COLON,
                '/' => SLASH,
                'x' => X,
                '-' => DASH,
                '0' => (0x0, 5),
                '1' => (0x1, 5),
                '2' => (0x2, 5),
                '.' => (0x17, 6),
                '7' => (0x1b, 6),
                '9' => (0x1d, 6),
                '3' => (0x19, 6),
                other => panic!("no code for {other:?} in this test"),
            }
        };
        let mut bits: Vec<u8> = Vec::new();
        for c in text.chars() {
            let (v, n) = code(c);
            for k in (0..n).rev() {
                bits.push(((v >> k) & 1) as u8);
            }
        }
        while !bits.len().is_multiple_of(8) {
            bits.push(1); // EOS padding
        }
        bits.chunks(8)
            .map(|c| c.iter().fold(0u8, |a, &b| (a << 1) | b))
            .collect()
    }

    fn decode_huffman(b: &[u8]) -> String {
        let table = [H, T, P, S, COLON, SLASH, X, DASH];
        let chars = ['h', 't', 'p', 's', ':', '/', 'x', '-'];
        let extra = [
            ((0x0, 5), '0'),
            ((0x1, 5), '1'),
            ((0x2, 5), '2'),
            ((0x17, 6), '.'),
            ((0x1b, 6), '7'),
            ((0x1d, 6), '9'),
            ((0x19, 6), '3'),
        ];
        let mut out = String::new();
        let mut at = 0u32;
        'next: while at + 5 <= b.len() as u32 * 8 {
            for (i, &(code, n)) in table.iter().enumerate() {
                if bits_at(b, at, n) == Some(code) {
                    out.push(chars[i]);
                    at += n;
                    continue 'next;
                }
            }
            for &((code, n), c) in &extra {
                if bits_at(b, at, n) == Some(code) {
                    out.push(c);
                    at += n;
                    continue 'next;
                }
            }
            break;
        }
        out
    }

    fn literal_authority(value: &[u8], huffman: bool) -> Vec<u8> {
        let mut b = vec![0x41]; // literal with incremental indexing, name index 1
        b.push(u8::try_from(value.len()).expect("short") | if huffman { 0x80 } else { 0 });
        b.extend_from_slice(value);
        b
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    async fn through(input: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Small pieces: frames arrive split anywhere.
            for piece in input.chunks(7) {
                client.write_all(piece).await.expect("write");
            }
        });
        let mut fixed = FixAuthority::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.expect("read");
        writer.await.expect("writer");
        out
    }

    #[test]
    fn huffman_values_are_rewritten_code_for_code() {
        for (url, want) in [
            ("http://127.0.0.1:2379", "httpx--127.0.0.1:2379"),
            ("https://10.0.0.1:2379", "httpsx--10.0.0.1:2379"),
        ] {
            let mut v = huffman(url);
            let len = v.len();
            assert!(fix_huffman(&mut v), "{url}");
            assert_eq!(v.len(), len);
            assert_eq!(decode_huffman(&v), want);
        }
        for untouched in ["127.0.0.1:2379", "http://", "http:2379"] {
            let mut v = huffman(untouched);
            let before = v.clone();
            assert!(!fix_huffman(&mut v), "{untouched}");
            assert_eq!(v, before);
        }
    }

    #[tokio::test]
    async fn urls_in_authority_become_valid_authorities_and_nothing_else_changes() {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (indexed)
        block.extend(literal_authority(b"http://127.0.0.1:2379", false));
        block.extend([0x44, 0x02, b'/', b'x']); // :path, literal
        let data = frame(0x0, 0x1, 1, b"hello, not headers: http://127.0.0.1:2379");
        // The same request again, its block split over HEADERS and CONTINUATION, padded.
        let mut block2 = literal_authority(&huffman("http://127.0.0.1:2379"), true);
        block2.extend([0x82]);
        let mut padded = vec![3u8];
        padded.extend_from_slice(&block2[..4]);
        padded.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(&data);
        input.extend(frame(HEADERS, PADDED, 3, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, &block2[4..]));
        let out = through(input.clone()).await;
        assert_eq!(out.len(), input.len());
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("httpx--127.0.0.1:2379"), "{text}");
        // The DATA frame's text is left alone.
        assert_eq!(text.matches("http://127.0.0.1:2379").count(), 1, "{text}");
        assert!(text.contains("hello, not headers: http://127.0.0.1:2379"));
        // Exactly the authority bytes differ.
        let diffs: Vec<usize> = (0..out.len()).filter(|&i| out[i] != input[i]).collect();
        assert!(!diffs.is_empty() && diffs.len() <= 3 + 3, "{diffs:?}");
    }

    #[tokio::test]
    async fn other_protocols_pass_untouched() {
        let http1 = b"POST /v3/kv/range HTTP/1.1\r\nHost: http://127.0.0.1:2379\r\n\r\n{}".to_vec();
        assert_eq!(through(http1.clone()).await, http1);
        let short = b"PRI * HT".to_vec();
        assert_eq!(through(short.clone()).await, short);
    }
}
