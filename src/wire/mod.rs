//! The frames a node exchanges with its parent over the SSH exec channel: control frames down
//! the child's stdin, event frames up its stdout. stderr stays free for panics and raw text.
//!
//! Each frame is a 4-byte big-endian length and a JSON body. JSON because the frames are small
//! (graphs, log lines, states), readable when debugging a hop by hand, and tolerant of added
//! fields; the binary itself never travels as frames (it goes by SFTP). The first frame each
//! way is a [`Hello`] carrying [`PROTOCOL_VERSION`]; a mismatch ends the link with an error
//! naming both versions, before anything else is read.

mod codec;
mod frames;
pub mod quic;
pub mod resume;

pub use codec::{FrameReader, FrameWriter, MAX_FRAME, MAX_LINE, MAX_UP_FRAME};
pub use frames::*;

/// Bumped on any incompatible change to the frames below.
pub const PROTOCOL_VERSION: u32 = 9;

/// Errors of the framed link.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("link closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("frame exceeds the size limit")]
    TooLarge,
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("protocol mismatch: this side speaks version {ours}, the other side {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error("expected a hello frame first")]
    NoHello,
}
