//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes of
//! prost encoding. Both peers parse defensively: a frame longer than
//! [`MAX_FRAME_LEN`] is refused before anything is allocated.

use std::io::{self, Read, Write};

use prost::Message;

/// The largest frame body accepted or sent (4 MiB).
pub const MAX_FRAME_LEN: usize = 4 << 20;

/// Why a frame could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame I/O: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge { len: usize },
    #[error("truncated frame: got {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    #[error("undecodable frame: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Encodes `msg` as one frame and writes it with a single `write_all`, so one
/// frame costs one system call on the usual path.
pub fn write_frame<W, M>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    W: Write + ?Sized,
    M: Message,
{
    let len = msg.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    let mut buf = Vec::with_capacity(4 + len);
    // The limit above keeps `len` well inside u32.
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode_raw(&mut buf);
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame. `Ok(None)` is a clean EOF before the first byte of a
/// frame; EOF inside a frame is [`FrameError::Truncated`].
///
/// It reads exactly the frame's bytes and nothing more, so raw bytes that
/// follow a frame (stdio streams) stay in the reader.
pub fn read_frame<M, R>(r: &mut R) -> Result<Option<M>, FrameError>
where
    M: Message + Default,
    R: Read + ?Sized,
{
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated { expected: 4, got }),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    // Grow with the data actually received rather than trusting the length
    // for a big up-front allocation.
    let mut body = Vec::with_capacity(len.min(64 * 1024));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(FrameError::Truncated {
            expected: len,
            got: body.len(),
        });
    }
    Ok(Some(M::decode(body.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{request, Ping, Request, StreamAttach};

    fn ping(id: u64) -> Request {
        Request {
            id,
            body: Some(request::Body::Ping(Ping {})),
        }
    }

    #[test]
    fn round_trip_and_clean_eof() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ping(7)).unwrap();
        write_frame(&mut buf, &ping(8)).unwrap();
        let mut r = buf.as_slice();
        assert_eq!(read_frame::<Request, _>(&mut r).unwrap(), Some(ping(7)));
        assert_eq!(read_frame::<Request, _>(&mut r).unwrap(), Some(ping(8)));
        assert!(read_frame::<Request, _>(&mut r).unwrap().is_none());
    }

    #[test]
    fn header_is_big_endian_length() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ping(1)).unwrap();
        let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len() - 4);
    }

    #[test]
    fn empty_message_is_a_zero_length_frame() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &StreamAttach::default()).unwrap();
        assert_eq!(buf, [0, 0, 0, 0]);
        let got: Option<StreamAttach> = read_frame(&mut buf.as_slice()).unwrap();
        assert_eq!(got, Some(StreamAttach::default()));
    }

    #[test]
    fn truncated_header_and_body() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ping(300)).unwrap();
        let err = read_frame::<Request, _>(&mut &buf[..2]).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ));
        let err = read_frame::<Request, _>(&mut &buf[..buf.len() - 1]).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }));
    }

    #[test]
    fn oversized_length_is_refused() {
        let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
        let err = read_frame::<Request, _>(&mut header.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));

        let big = StreamAttach {
            process_id: "x".repeat(MAX_FRAME_LEN),
            kind: 0,
        };
        let err = write_frame(&mut Vec::new(), &big).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[test]
    fn garbage_body_is_a_decode_error() {
        let frame = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        let err = read_frame::<Request, _>(&mut frame.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)));
    }

    #[test]
    fn reads_no_byte_past_the_frame() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &ping(1)).unwrap();
        buf.extend_from_slice(b"raw");
        let mut r = buf.as_slice();
        read_frame::<Request, _>(&mut r).unwrap().unwrap();
        assert_eq!(r, b"raw");
    }
}
