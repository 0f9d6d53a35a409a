//! SPDY/3.1 frames: encoding, and incremental decoding of untrusted bytes.
//!
//! Every frame starts with 8 bytes. Control frames: `1 | version:15 |
//! type:16`, then `flags:8 | length:24`. Data frames: `0 | stream-id:31`,
//! then `flags:8 | length:24`. The decoder hands DATA payloads out in chunks
//! as they arrive (so a 16 MiB frame is never held whole) and buffers only
//! control frames, up to [`MAX_CONTROL_FRAME`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::header_block::{encode_block, parse_block, HeaderDeflater, HeaderInflater};
use super::{Headers, SpdyError};

/// The protocol version in every control frame.
pub const VERSION: u16 = 3;
/// FLAG_FIN on DATA, SYN_STREAM, SYN_REPLY and HEADERS: the sender is done.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM: the recipient may not send.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Largest length the 24-bit field can carry.
pub const MAX_FRAME_LEN: usize = 0x00ff_ffff;
/// Largest control frame accepted (their payload is buffered whole).
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Largest DATA chunk handed out by the decoder.
pub const MAX_DATA_CHUNK: usize = 16 * 1024;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes (SPDY/3 section 2.6.3).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// SETTINGS ids used here.
pub mod setting {
    pub const MAX_CONCURRENT_STREAMS: u32 = 4;
    pub const INITIAL_WINDOW_SIZE: u32 = 7;
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A decoded (or to-be-encoded) frame. Stream ids are 31-bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A whole DATA frame when encoding; a chunk of one when decoding (FLAG_FIN
    /// only on the last chunk).
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type this version does not know: ignored.
    Unknown {
        frame_type: u16,
    },
}

/// Encodes frames for one direction of a session (it owns that direction's
/// header zlib stream, so frames must be encoded in wire order).
pub struct FrameEncoder {
    deflater: HeaderDeflater,
}

impl FrameEncoder {
    pub fn new() -> Result<Self, SpdyError> {
        Ok(Self {
            deflater: HeaderDeflater::new()?,
        })
    }

    /// Appends `frame`'s bytes to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), SpdyError> {
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let block = self.deflater.compress(&encode_block(headers)?)?;
                control_head(out, TYPE_SYN_STREAM, *flags, 10 + block.len())?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(associated_to & 0x7fff_ffff);
                out.put_u8((priority & 0x07) << 5);
                out.put_u8(0); // credential slot
                out.put_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.deflater.compress(&encode_block(headers)?)?;
                control_head(out, TYPE_SYN_REPLY, *flags, 4 + block.len())?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_slice(&block);
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.deflater.compress(&encode_block(headers)?)?;
                control_head(out, TYPE_HEADERS, *flags, 4 + block.len())?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control_head(out, TYPE_RST_STREAM, 0, 8)?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::Settings { flags, entries } => {
                control_head(out, TYPE_SETTINGS, *flags, 4 + 8 * entries.len())?;
                out.put_u32(entries.len() as u32);
                for e in entries {
                    out.put_u32((u32::from(e.flags) << 24) | (e.id & 0x00ff_ffff));
                    out.put_u32(e.value);
                }
            }
            Frame::Ping { id } => {
                control_head(out, TYPE_PING, 0, 4)?;
                out.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control_head(out, TYPE_GOAWAY, 0, 8)?;
                out.put_u32(last_good_stream_id & 0x7fff_ffff);
                out.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control_head(out, TYPE_WINDOW_UPDATE, 0, 8)?;
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32(delta & 0x7fff_ffff);
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_FRAME_LEN {
                    return Err(SpdyError::FrameTooLarge(data.len()));
                }
                out.reserve(8 + data.len());
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32((u32::from(*flags) << 24) | data.len() as u32);
                out.put_slice(data);
            }
            Frame::Unknown { .. } => {
                return Err(SpdyError::Protocol("cannot encode an unknown frame type"))
            }
        }
        Ok(())
    }
}

fn control_head(out: &mut BytesMut, ty: u16, flags: u8, len: usize) -> Result<(), SpdyError> {
    if len > MAX_FRAME_LEN {
        return Err(SpdyError::FrameTooLarge(len));
    }
    out.reserve(8 + len);
    out.put_u16(0x8000 | VERSION);
    out.put_u16(ty);
    out.put_u32((u32::from(flags) << 24) | len as u32);
    Ok(())
}

/// A DATA frame whose payload is still arriving.
struct DataInProgress {
    stream_id: u32,
    flags: u8,
    remaining: usize,
}

/// Decodes the peer's bytes. Errors are fatal to the session: after one, the
/// byte stream (and its header zlib stream) can no longer be trusted.
pub struct FrameDecoder {
    inflater: HeaderInflater,
    data: Option<DataInProgress>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self {
            inflater: HeaderInflater::new(),
            data: None,
        }
    }

    /// Takes the next frame (or DATA chunk) off the front of `buf`; `Ok(None)`
    /// when more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if let Some(d) = &mut self.data {
            if buf.is_empty() {
                return Ok(None);
            }
            let n = d.remaining.min(buf.len()).min(MAX_DATA_CHUNK);
            d.remaining -= n;
            let frame = Frame::Data {
                stream_id: d.stream_id,
                flags: if d.remaining == 0 { d.flags } else { 0 },
                data: buf.split_to(n).freeze(),
            };
            if d.remaining == 0 {
                self.data = None;
            }
            return Ok(Some(frame));
        }
        let Some(head) = buf.first_chunk::<8>() else {
            return Ok(None);
        };
        let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = head[4];
        let len = (u32::from_be_bytes([0, head[5], head[6], head[7]])) as usize;
        if first & 0x8000_0000 == 0 {
            let stream_id = first & 0x7fff_ffff;
            if stream_id == 0 {
                return Err(SpdyError::InvalidFrame("DATA", "stream id 0"));
            }
            buf.advance(8);
            if len == 0 {
                return Ok(Some(Frame::Data {
                    stream_id,
                    flags,
                    data: Bytes::new(),
                }));
            }
            self.data = Some(DataInProgress {
                stream_id,
                flags,
                remaining: len,
            });
            return self.decode(buf);
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        let ty = (first & 0xffff) as u16;
        if version != VERSION {
            return Err(SpdyError::UnsupportedVersion(version));
        }
        if len > MAX_CONTROL_FRAME {
            return Err(SpdyError::FrameTooLarge(len));
        }
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        buf.advance(8);
        let payload = buf.split_to(len).freeze();
        self.control(ty, flags, payload).map(Some)
    }

    fn control(&mut self, ty: u16, flags: u8, mut p: Bytes) -> Result<Frame, SpdyError> {
        let exact = |p: &Bytes, n: usize, kind: &'static str| {
            if p.len() == n {
                Ok(())
            } else {
                Err(SpdyError::InvalidFrame(kind, "wrong length"))
            }
        };
        let at_least = |p: &Bytes, n: usize, kind: &'static str| {
            if p.len() >= n {
                Ok(())
            } else {
                Err(SpdyError::InvalidFrame(kind, "too short"))
            }
        };
        let nonzero = |id: u32, kind: &'static str| {
            if id == 0 {
                Err(SpdyError::InvalidFrame(kind, "stream id 0"))
            } else {
                Ok(id)
            }
        };
        Ok(match ty {
            TYPE_SYN_STREAM => {
                at_least(&p, 10, "SYN_STREAM")?;
                let stream_id = nonzero(p.get_u32() & 0x7fff_ffff, "SYN_STREAM")?;
                let associated_to = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                let headers = parse_block(&self.inflater.decompress(&p)?)?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers,
                }
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                let kind = if ty == TYPE_HEADERS {
                    "HEADERS"
                } else {
                    "SYN_REPLY"
                };
                at_least(&p, 4, kind)?;
                let stream_id = nonzero(p.get_u32() & 0x7fff_ffff, kind)?;
                let headers = parse_block(&self.inflater.decompress(&p)?)?;
                if ty == TYPE_HEADERS {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            TYPE_RST_STREAM => {
                exact(&p, 8, "RST_STREAM")?;
                let stream_id = nonzero(p.get_u32() & 0x7fff_ffff, "RST_STREAM")?;
                let status = p.get_u32();
                if status == 0 {
                    return Err(SpdyError::InvalidFrame("RST_STREAM", "status 0"));
                }
                Frame::RstStream { stream_id, status }
            }
            TYPE_SETTINGS => {
                at_least(&p, 4, "SETTINGS")?;
                let n = p.get_u32() as usize;
                if n > p.len() / 8 || p.len() != n * 8 {
                    return Err(SpdyError::InvalidFrame("SETTINGS", "wrong entry count"));
                }
                let entries = (0..n)
                    .map(|_| {
                        let fid = p.get_u32();
                        Setting {
                            flags: (fid >> 24) as u8,
                            id: fid & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                exact(&p, 4, "PING")?;
                Frame::Ping { id: p.get_u32() }
            }
            TYPE_GOAWAY => {
                exact(&p, 8, "GOAWAY")?;
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            TYPE_WINDOW_UPDATE => {
                exact(&p, 8, "WINDOW_UPDATE")?;
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & 0x7fff_ffff,
                    delta: p.get_u32() & 0x7fff_ffff,
                }
            }
            frame_type => Frame::Unknown { frame_type },
        })
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// Decodes everything in `buf`, gluing DATA chunks back into frames.
    fn decode_all(dec: &mut FrameDecoder, buf: &mut BytesMut) -> Vec<Frame> {
        let mut out: Vec<Frame> = Vec::new();
        let mut partial: Option<(u32, Vec<u8>)> = None;
        while let Some(f) = dec.decode(buf).unwrap() {
            match f {
                Frame::Data {
                    stream_id,
                    flags,
                    data,
                } => {
                    let (_, mut acc) = partial.take().unwrap_or((stream_id, Vec::new()));
                    acc.extend_from_slice(&data);
                    if flags & FLAG_FIN != 0 || dec.data.is_none() {
                        out.push(Frame::Data {
                            stream_id,
                            flags,
                            data: Bytes::from(acc),
                        });
                    } else {
                        partial = Some((stream_id, acc));
                    }
                }
                f => out.push(f),
            }
        }
        assert!(buf.is_empty());
        out
    }

    fn every_kind() -> Vec<Frame> {
        vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: h(&[("streamtype", "error"), ("port", "8080")]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 1,
                priority: 7,
                flags: FLAG_FIN,
                headers: h(&[("streamtype", "data"), ("port", "8080")]),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            },
            Frame::Headers {
                stream_id: 1,
                flags: FLAG_FIN,
                headers: h(&[("x-trailer", "1")]),
            },
            Frame::RstStream {
                stream_id: 5,
                status: rst::CANCEL,
            },
            Frame::Settings {
                flags: 0,
                entries: vec![Setting {
                    flags: 0,
                    id: setting::INITIAL_WINDOW_SIZE,
                    value: 1 << 20,
                }],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 3,
                status: goaway::OK,
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 0x7fff_ffff,
            },
            Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            Frame::Data {
                stream_id: 9,
                flags: FLAG_FIN,
                data: Bytes::from(vec![0xa5; 100_000]),
            },
        ]
    }

    #[test]
    fn every_frame_kind_round_trips() {
        let mut enc = FrameEncoder::new().unwrap();
        let mut dec = FrameDecoder::new();
        let frames = every_kind();
        let mut buf = BytesMut::new();
        for f in &frames {
            enc.encode(f, &mut buf).unwrap();
        }
        assert_eq!(decode_all(&mut dec, &mut buf), frames);
    }

    #[test]
    fn decodes_byte_by_byte() {
        let mut enc = FrameEncoder::new().unwrap();
        let frames = every_kind();
        let mut wire = BytesMut::new();
        for f in &frames {
            enc.encode(f, &mut wire).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                match f {
                    Frame::Data { data: d, flags, .. } if dec.data.is_some() => {
                        assert_eq!(flags, 0);
                        data.extend_from_slice(&d)
                    }
                    Frame::Data {
                        stream_id,
                        flags,
                        data: d,
                    } => {
                        data.extend_from_slice(&d);
                        got.push(Frame::Data {
                            stream_id,
                            flags,
                            data: Bytes::from(std::mem::take(&mut data)),
                        });
                    }
                    f => got.push(f),
                }
            }
        }
        assert_eq!(got, frames);
    }

    #[test]
    fn data_is_handed_out_in_bounded_chunks() {
        let mut enc = FrameEncoder::new().unwrap();
        let mut buf = BytesMut::new();
        enc.encode(
            &Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::from(vec![1; 3 * MAX_DATA_CHUNK + 5]),
            },
            &mut buf,
        )
        .unwrap();
        let mut dec = FrameDecoder::new();
        let mut sizes = Vec::new();
        let mut fins = Vec::new();
        while let Some(Frame::Data { data, flags, .. }) = dec.decode(&mut buf).unwrap() {
            sizes.push(data.len());
            fins.push(flags & FLAG_FIN != 0);
        }
        assert_eq!(sizes, [MAX_DATA_CHUNK, MAX_DATA_CHUNK, MAX_DATA_CHUNK, 5]);
        assert_eq!(fins, [false, false, false, true]);
    }

    /// SYN_STREAM and SYN_REPLY as node-spdy's parser tests carry them
    /// (each on its own fresh zlib stream).
    #[test]
    fn decodes_known_frames_from_another_implementation() {
        let syn = hex("800300010000002c0000000100000000000078f9e3c6a7c202e50e507ab442a45a77d7105006b32a4804974d8cfa00000000ffff");
        let mut buf = BytesMut::from(&syn[..]);
        assert_eq!(
            FrameDecoder::new().decode(&mut buf).unwrap(),
            Some(Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: h(&[(":method", "GET"), (":path", "/")]),
            })
        );
        let reply = hex("80030002000000140000000178f9e3c6a7c202a6230600000000ffff");
        let mut buf = BytesMut::from(&reply[..]);
        assert_eq!(
            FrameDecoder::new().decode(&mut buf).unwrap(),
            Some(Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: vec![],
            })
        );
        // A DATA frame and the empty FIN frame Go's spdystream writes on Close.
        let data = hex("000000010000001157726974696e6720746f2073747265616d0000000101000000");
        let mut buf = BytesMut::from(&data[..]);
        let mut dec = FrameDecoder::new();
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"Writing to stream"),
            })
        );
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new(),
            })
        );
    }

    #[test]
    fn encodes_fixed_frames_byte_exact() {
        let mut enc = FrameEncoder::new().unwrap();
        let mut buf = BytesMut::new();
        enc.encode(&Frame::Ping { id: 1 }, &mut buf).unwrap();
        enc.encode(
            &Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            &mut buf,
        )
        .unwrap();
        enc.encode(
            &Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            &mut buf,
        )
        .unwrap();
        let expected: String = [
            "80030006 00000004 00000001",          // PING 1
            "80030003 00000008 00000003 00000005", // RST_STREAM 3 CANCEL
            "00000001 01000000",                   // DATA 1, FIN, empty
        ]
        .concat()
        .split_whitespace()
        .collect();
        assert_eq!(&buf[..], &hex(&expected)[..]);
    }

    #[test]
    fn unknown_control_frames_are_skipped() {
        let mut buf = BytesMut::from(&hex("8003000a00000003abcdef")[..]);
        let mut enc = FrameEncoder::new().unwrap();
        enc.encode(&Frame::Ping { id: 2 }, &mut buf).unwrap();
        let mut dec = FrameDecoder::new();
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Frame::Unknown { frame_type: 10 })
        );
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(Frame::Ping { id: 2 }));
    }

    #[test]
    fn truncated_frames_wait_for_more() {
        let mut enc = FrameEncoder::new().unwrap();
        let mut wire = BytesMut::new();
        enc.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: h(&[("a", "b")]),
            },
            &mut wire,
        )
        .unwrap();
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            assert_eq!(FrameDecoder::new().decode(&mut buf).unwrap(), None);
        }
    }

    #[test]
    fn malformed_frames_are_refused() {
        let bad: &[(&str, &str)] = &[
            ("DATA on stream 0", "0000000000000001ff"),
            ("version 2", "80020006000000040000000a"),
            ("oversized control", "80030001ffffffff"),
            ("short SYN_STREAM", "8003000100000004000000010000"),
            ("SYN_STREAM id 0", "800300010000000a00000000000000000000"),
            ("short SYN_REPLY", "800300020000000200000000"),
            ("RST long", "80030003000000090000000100000005ff"),
            ("RST status 0", "800300030000000800000001 00000000"),
            ("RST stream 0", "800300030000000800000000 00000005"),
            ("PING short", "8003000600000002 0001"),
            ("GOAWAY short", "8003000700000004 00000000"),
            ("WINDOW_UPDATE short", "8003000900000004 00000001"),
            ("SETTINGS count", "8003000400000004 00000001"),
            (
                "SETTINGS huge count",
                "800300040000000c ffffffff 0000000700000001",
            ),
            (
                "SYN_STREAM garbage block",
                "800300010000000e 00000001 00000000 0000 deadbeef",
            ),
        ];
        for (what, hx) in bad {
            let hx: String = hx.split_whitespace().collect();
            let mut buf = BytesMut::from(&hex(&hx)[..]);
            assert!(
                FrameDecoder::new().decode(&mut buf).is_err(),
                "{what} was accepted"
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: random bytes, and valid frames with bytes flipped.
        let mut enc = FrameEncoder::new().unwrap();
        let mut valid = BytesMut::new();
        for f in every_kind() {
            enc.encode(&f, &mut valid).unwrap();
        }
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..2000 {
            let mut bytes = if round % 2 == 0 {
                (0..(rand() % 256))
                    .map(|_| rand() as u8)
                    .collect::<Vec<u8>>()
            } else {
                valid.to_vec()
            };
            if !bytes.is_empty() {
                for _ in 0..(1 + rand() % 4) {
                    let i = (rand() as usize) % bytes.len();
                    bytes[i] ^= rand() as u8;
                }
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let mut dec = FrameDecoder::new();
            while let Ok(Some(_)) = dec.decode(&mut buf) {}
        }
    }
}
