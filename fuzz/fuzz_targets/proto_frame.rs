//! Agent protocol frames from a hostile peer: `read_frame` over bytes that
//! arrive in arbitrary pieces, decoding every message type either side
//! reads. Oracles: a frame is read exactly (no byte of what follows is
//! consumed), a decoded message survives an encode/decode round trip, and
//! a length past the limit is refused before its body is read.

#![no_main]

use std::io::{self, Read};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;

use proto::agent::{
    PortForwardOpen, PortForwardOpened, Request, Response, StreamAttach, StreamAttached,
};
use proto::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    bytes: Vec<u8>,
    /// Sizes of the pieces the bytes arrive in (0: an `EINTR`).
    chunks: Vec<u8>,
}

/// A reader that hands out its bytes in the given piece sizes.
struct Pieces<'a> {
    bytes: &'a [u8],
    pos: usize,
    chunks: std::iter::Cycle<std::vec::IntoIter<u8>>,
    /// The last read was an `EINTR`: the next one makes progress (a
    /// reader interrupted forever is not a peer's doing).
    interrupted: bool,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let piece = self.chunks.next().unwrap_or(255);
        if piece == 0 && self.pos < self.bytes.len() && !self.interrupted {
            self.interrupted = true;
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.interrupted = false;
        let n = usize::from(piece.max(1))
            .min(buf.len())
            .min(self.bytes.len() - self.pos);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn check<M: Message + Default + PartialEq>(input: &Input) {
    let mut chunks = input.chunks.clone();
    if chunks.is_empty() {
        chunks.push(255);
    }
    let mut r = Pieces {
        bytes: &input.bytes,
        pos: 0,
        chunks: chunks.into_iter().cycle(),
        interrupted: false,
    };
    let declared = input
        .bytes
        .get(..4)
        .map(|h| u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize);
    match read_frame::<M, _>(&mut r) {
        Ok(None) => assert!(input.bytes.is_empty()),
        Ok(Some(m)) => {
            let len = declared.expect("a whole header");
            assert_eq!(r.pos, 4 + len, "read past the frame");
            let mut out = Vec::new();
            write_frame(&mut out, &m).expect("re-encoding fits");
            let again: M = read_frame(&mut out.as_slice())
                .expect("own frame decodes")
                .expect("not EOF");
            assert!(again == m, "round trip changed the message");
        }
        Err(FrameError::TooLarge { len }) => {
            assert!(len > MAX_FRAME_LEN);
            assert_eq!(r.pos, 4, "body read before the length was checked");
        }
        Err(_) => {
            if let Some(len) = declared {
                assert!(r.pos <= 4 + len, "read past the frame");
            }
        }
    }
}

fuzz_target!(|input: Input| {
    match input.kind % 6 {
        0 => check::<Response>(&input),
        1 => check::<Request>(&input),
        2 => check::<StreamAttach>(&input),
        3 => check::<StreamAttached>(&input),
        4 => check::<PortForwardOpen>(&input),
        _ => check::<PortForwardOpened>(&input),
    }
});
