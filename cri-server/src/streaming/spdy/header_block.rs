//! SPDY/3 name/value header blocks and their session-long zlib streams.
//!
//! A block is a 32-bit count, then for each pair a 32-bit name length, the
//! name, a 32-bit value length and the value (several values joined by NUL).
//! Each direction of a session deflates all its blocks on ONE zlib stream
//! seeded with [`DICTIONARY`], ending every block with a sync flush, so a
//! block can only be read after every earlier block of that direction.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary::{DICTIONARY, DICTIONARY_ID};
use super::{Headers, SpdyError};

/// Most name/value pairs one block may carry (after splitting NUL-joined values).
pub const MAX_HEADERS: usize = 256;
/// Largest header block accepted, decompressed.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// Serialises `headers` into an uncompressed block: names lowercased, repeated
/// names merged into one NUL-joined value (SPDY/3 forbids duplicate names).
pub fn encode_block(headers: &Headers) -> Result<Vec<u8>, SpdyError> {
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if name.is_empty() {
            return Err(SpdyError::HeaderBlock("empty header name"));
        }
        match merged.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => {
                v.push('\0');
                v.push_str(value);
            }
            None => merged.push((name, value.clone())),
        }
    }
    let mut out = Vec::new();
    put_len(&mut out, merged.len())?;
    for (name, value) in &merged {
        put_len(&mut out, name.len())?;
        out.extend_from_slice(name.as_bytes());
        put_len(&mut out, value.len())?;
        out.extend_from_slice(value.as_bytes());
    }
    Ok(out)
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), SpdyError> {
    let len = u32::try_from(len).map_err(|_| SpdyError::HeaderBlock("header too long"))?;
    out.extend_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Parses an uncompressed block, refusing anything malformed: bad lengths,
/// trailing bytes, empty, uppercase or duplicate names, non-UTF-8 text, and
/// more than [`MAX_HEADERS`] pairs.
pub fn parse_block(block: &[u8]) -> Result<Headers, SpdyError> {
    let mut rest = block;
    let count = take_u32(&mut rest)? as usize;
    // Each pair takes at least 8 bytes (two lengths) plus a 1-byte name.
    if count > MAX_HEADERS || count > rest.len() / 9 {
        return Err(SpdyError::HeaderBlock("too many headers"));
    }
    let mut headers = Headers::with_capacity(count);
    let mut names: Vec<&str> = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take_str(&mut rest)?;
        if name.is_empty() {
            return Err(SpdyError::HeaderBlock("empty header name"));
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(SpdyError::HeaderBlock("header name not lowercase"));
        }
        if names.contains(&name) {
            return Err(SpdyError::HeaderBlock("duplicate header name"));
        }
        names.push(name);
        let value = take_str(&mut rest)?;
        for v in value.split('\0') {
            if headers.len() == MAX_HEADERS {
                return Err(SpdyError::HeaderBlock("too many headers"));
            }
            headers.push((name.to_owned(), v.to_owned()));
        }
    }
    if !rest.is_empty() {
        return Err(SpdyError::HeaderBlock("trailing bytes after headers"));
    }
    Ok(headers)
}

fn take_u32(rest: &mut &[u8]) -> Result<u32, SpdyError> {
    let (head, tail) = rest
        .split_first_chunk::<4>()
        .ok_or(SpdyError::HeaderBlock("truncated header block"))?;
    *rest = tail;
    Ok(u32::from_be_bytes(*head))
}

fn take_str<'a>(rest: &mut &'a [u8]) -> Result<&'a str, SpdyError> {
    let len = take_u32(rest)? as usize;
    if len > rest.len() {
        return Err(SpdyError::HeaderBlock("header length past the block's end"));
    }
    let (s, tail) = rest.split_at(len);
    *rest = tail;
    std::str::from_utf8(s).map_err(|_| SpdyError::HeaderBlock("header is not UTF-8"))
}

/// The sending direction's zlib stream.
pub struct HeaderDeflater {
    z: Compress,
}

impl HeaderDeflater {
    pub fn new() -> Result<Self, SpdyError> {
        // Level 9 like Go's framer; blocks are small and mostly repeats.
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(&DICTIONARY)
            .map_err(|_| SpdyError::Compression("cannot load the SPDY dictionary"))?;
        Ok(Self { z })
    }

    /// Compresses one block onto the stream and sync-flushes it.
    pub fn compress(&mut self, block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(block.len() / 2 + 64);
        let mut consumed = 0usize;
        // Each pass either consumes input or fills the output; the bound is
        // generous and only guards against a backend that stops progressing.
        for _ in 0..(block.len() / 64 + 64) {
            if out.capacity() - out.len() < 64 {
                out.reserve(block.len() - consumed + 64);
            }
            let before = self.z.total_in();
            self.z
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|_| SpdyError::Compression("deflate failed"))?;
            consumed += usize::try_from(self.z.total_in() - before)
                .map_err(|_| SpdyError::Compression("deflate overran its input"))?;
            // zlib's rule: the flush is complete once output space was left over.
            if consumed == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
        Err(SpdyError::Compression("deflate made no progress"))
    }
}

/// The receiving direction's zlib stream.
pub struct HeaderInflater {
    z: Decompress,
}

impl HeaderInflater {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }

    /// Decompresses one block's bytes (up to [`MAX_HEADER_BLOCK`] out). Any
    /// error leaves the stream unusable: the session must end.
    pub fn decompress(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity((input.len() * 4).clamp(64, MAX_HEADER_BLOCK));
        let mut pos = 0usize;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(SpdyError::HeaderBlockTooLarge(MAX_HEADER_BLOCK));
                }
                out.reserve((out.len()).clamp(256, MAX_HEADER_BLOCK - out.len()));
            }
            let (in_before, out_before) = (self.z.total_in(), out.len());
            let mut dictionary_loaded = false;
            match self
                .z
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => {
                    return Err(SpdyError::Compression("peer ended its header zlib stream"))
                }
                Ok(_) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(DICTIONARY_ID) => {
                        self.z.set_dictionary(&DICTIONARY).map_err(|_| {
                            SpdyError::Compression("cannot load the SPDY dictionary")
                        })?;
                        dictionary_loaded = true;
                    }
                    Some(_) => return Err(SpdyError::Compression("wrong zlib dictionary")),
                    None => return Err(SpdyError::Compression("corrupt header block")),
                },
            }
            let consumed = usize::try_from(self.z.total_in() - in_before)
                .map_err(|_| SpdyError::Compression("inflate overran its input"))?;
            pos += consumed;
            // Done once all input is in and the output had room to spare.
            if pos >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if consumed == 0 && out.len() == out_before && !dictionary_loaded {
                if pos >= input.len() {
                    return Ok(out);
                }
                return Err(SpdyError::Compression("inflate made no progress"));
            }
        }
    }
}

impl Default for HeaderInflater {
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

    #[test]
    fn block_round_trip_merges_and_splits_repeated_names() {
        let headers = h(&[("StreamType", "data"), ("port", "80"), ("port", "443")]);
        let block = encode_block(&headers).unwrap();
        let parsed = parse_block(&block).unwrap();
        assert_eq!(
            parsed,
            h(&[("streamtype", "data"), ("port", "80"), ("port", "443")])
        );
        assert_eq!(
            parse_block(&encode_block(&vec![]).unwrap()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn an_empty_value_survives() {
        let headers = h(&[("x", "")]);
        assert_eq!(
            parse_block(&encode_block(&headers).unwrap()).unwrap(),
            headers
        );
    }

    #[test]
    fn compression_round_trip_across_blocks_on_one_stream() {
        let mut d = HeaderDeflater::new().unwrap();
        let mut i = HeaderInflater::new();
        let blocks: Vec<Headers> = (0..20)
            .map(|n| {
                h(&[
                    ("streamtype", if n % 2 == 0 { "stdout" } else { "stderr" }),
                    ("requestid", &n.to_string()),
                    ("big", &"x".repeat(n * 500)),
                ])
            })
            .collect();
        let mut wires = Vec::new();
        for b in &blocks {
            let wire = d.compress(&encode_block(b).unwrap()).unwrap();
            wires.push(wire.clone());
            assert_eq!(parse_block(&i.decompress(&wire).unwrap()).unwrap(), *b);
        }
        // The second block refers back into the first: on a fresh stream it
        // cannot be read.
        let mut fresh = HeaderInflater::new();
        assert!(fresh
            .decompress(&wires[1])
            .and_then(|b| parse_block(&b))
            .is_err());
    }

    /// Two dependent blocks deflated by C zlib (Python's `zlib.compressobj`
    /// with the SPDY dictionary, level 9, `Z_SYNC_FLUSH` after each).
    #[test]
    fn reads_blocks_from_c_zlib() {
        let b1 = hex(
            "78f9e3c6a7c202e50e703a2b294a4dcc851625aca9a0800632388b20d196094ace8c0600000000ffff",
        );
        let b2 = hex("c2aa1898bc53f2c1a5369a6a00000000ffff");
        let mut i = HeaderInflater::new();
        assert_eq!(
            parse_block(&i.decompress(&b1).unwrap()).unwrap(),
            h(&[("streamtype", "error"), ("requestid", "0")])
        );
        assert_eq!(
            parse_block(&i.decompress(&b2).unwrap()).unwrap(),
            h(&[("streamtype", "stdout"), ("requestid", "0")])
        );
    }

    #[test]
    fn wrong_dictionary_is_refused() {
        let mut c = Compress::new(Compression::default(), true);
        c.set_dictionary(b"not the spdy dictionary").unwrap();
        let mut out = Vec::with_capacity(256);
        c.compress_vec(
            &encode_block(&vec![]).unwrap(),
            &mut out,
            FlushCompress::Sync,
        )
        .unwrap();
        assert!(HeaderInflater::new().decompress(&out).is_err());
    }

    #[test]
    fn garbage_is_refused() {
        assert!(HeaderInflater::new()
            .decompress(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
            .is_err());
    }

    #[test]
    fn a_decompression_bomb_is_refused() {
        let mut d = HeaderDeflater::new().unwrap();
        let big = vec![0u8; MAX_HEADER_BLOCK * 4];
        let wire = d.compress(&big).unwrap();
        assert!(wire.len() < 4096);
        assert!(matches!(
            HeaderInflater::new().decompress(&wire),
            Err(SpdyError::HeaderBlockTooLarge(_))
        ));
    }

    #[test]
    fn malformed_blocks_are_refused() {
        let good = encode_block(&h(&[("a", "b")])).unwrap();
        for cut in 0..good.len() {
            assert!(parse_block(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(parse_block(&trailing).is_err());
        // A count far beyond what the bytes can hold.
        assert!(parse_block(&[0xff, 0xff, 0xff, 0xff]).is_err());
        // A name length past the end.
        assert!(parse_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0]).is_err());
        let upper = [&[0, 0, 0, 1, 0, 0, 0, 1][..], b"A", &[0, 0, 0, 0]].concat();
        assert!(parse_block(&upper).is_err());
        let empty = [&[0, 0, 0, 1, 0, 0, 0, 0][..], &[0, 0, 0, 0, 0]].concat();
        assert!(parse_block(&empty).is_err());
        let dup = [
            &[0, 0, 0, 2, 0, 0, 0, 1][..],
            b"a",
            &[0, 0, 0, 0, 0, 0, 0, 1],
            b"a",
            &[0, 0, 0, 0],
        ]
        .concat();
        assert!(parse_block(&dup).is_err());
        let not_utf8 = [&[0, 0, 0, 1, 0, 0, 0, 1][..], b"a", &[0, 0, 0, 1, 0xff]].concat();
        assert!(parse_block(&not_utf8).is_err());
        // Too many values once split on NUL.
        let many = encode_block(&h(&[("a", &"\0".repeat(MAX_HEADERS))])).unwrap();
        assert!(parse_block(&many).is_err());
    }
}
