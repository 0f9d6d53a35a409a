//! SPDY/3.1 sessions, as spoken by Go's `github.com/moby/spdystream` (the
//! transport under `kubectl exec`/`attach`/`port-forward` once the HTTP/1.1
//! connection is upgraded with `Upgrade: SPDY/3.1`).
//!
//! [`SpdySession::start`] runs a session over any byte stream: a reader task
//! decodes frames ([`frame`]), decompresses header blocks on the session's
//! zlib stream ([`header_block`], [`dictionary`]) and routes them to
//! [`SpdyStream`]s; a writer task owns the write half and sends the frames
//! queued by everyone else, in order.
//!
//! Flow control, and how it meets spdystream: spdystream implements none. It
//! never sends WINDOW_UPDATE or SETTINGS, ignores both when received (they
//! fall through to its "unhandled frame type" branch), and writes each
//! `Write` as one DATA frame whatever the windows; it backs off only through
//! TCP, its frame workers blocking until the application reads. So:
//! - Sending: windows are tracked always but only *enforced* once the peer
//!   has shown it does flow control (sent SETTINGS or WINDOW_UPDATE), so a
//!   spdystream peer never leaves us waiting for an update that cannot come.
//! - Receiving: we announce our windows (SETTINGS, a session WINDOW_UPDATE)
//!   and grant WINDOW_UPDATEs as the application reads, so a conforming peer
//!   never stalls; what is buffered is bounded by [`session::RECV_BUFFER`]:
//!   past it the reader stops reading the connection until the application
//!   catches up (spdystream's own behaviour). A peer that does flow control
//!   and still overruns a window has broken the protocol: its stream is
//!   reset, or for the session window the session ends.

pub mod dictionary;
pub mod frame;
pub mod header_block;
mod session;

#[cfg(test)]
mod tests;

pub use session::{Role, SpdyReadHalf, SpdySession, SpdyStream, SpdyWriteHalf};

/// Header names are lowercase (SPDY/3 requires it); a name sent with several
/// values (NUL-joined on the wire) appears once per value.
pub type Headers = Vec<(String, String)>;

/// The first value of header `name` (compared case-insensitively).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// What went wrong in a session or stream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY frame of {0} bytes is too large")]
    FrameTooLarge(usize),
    #[error("invalid SPDY {0} frame: {1}")]
    InvalidFrame(&'static str, &'static str),
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    #[error("SPDY header compression: {0}")]
    Compression(&'static str),
    #[error("SPDY header block: {0}")]
    HeaderBlock(&'static str),
    #[error("SPDY header block larger than {0} bytes")]
    HeaderBlockTooLarge(usize),
    #[error("SPDY protocol error: {0}")]
    Protocol(&'static str),
    #[error("SPDY stream reset by the peer (status {0})")]
    StreamReset(u32),
    #[error("SPDY stream ids exhausted")]
    StreamIdsExhausted,
    #[error("SPDY session closed")]
    SessionClosed,
    #[error("SPDY connection I/O: {0}")]
    Io(std::sync::Arc<std::io::Error>),
}

impl From<std::io::Error> for SpdyError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(std::sync::Arc::new(e))
    }
}
