//! The vsock wire format, parsed defensively from guest descriptor chains.
//!
//! A packet is a 44-byte little-endian header followed by `len` bytes of
//! payload. Tx chains (guest to device) must be all device-readable, rx
//! chains (device to guest) all device-writable; either may split header and
//! payload across descriptors any way it likes. Every descriptor is checked
//! to lie in guest memory before use, and `len` is bounded by both the chain
//! and [`MAX_PKT_BUF_SIZE`].

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{MAX_PKT_BUF_SIZE, VSOCK_PKT_HDR_SIZE, VSOCK_TYPE_STREAM};

/// Most non-empty descriptors in one chain (Linux uses one or two).
pub const MAX_CHAIN_SEGMENTS: usize = 64;

/// Why a descriptor chain could not carry a packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// A tx chain contained a device-writable descriptor.
    #[error("unexpected write-only descriptor in a tx chain")]
    UnexpectedWriteOnly,
    /// An rx chain contained a device-readable descriptor.
    #[error("unexpected read-only descriptor in an rx chain")]
    UnexpectedReadOnly,
    /// The chain has more non-empty descriptors than we accept.
    #[error("chain has more than {MAX_CHAIN_SEGMENTS} descriptors")]
    TooManyDescriptors,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfGuestMemory { addr: u64, len: u32 },
    /// The chain is too small for the header.
    #[error("chain holds {0} bytes, less than a vsock header")]
    HeaderTooShort(usize),
    /// `hdr.len` is above the maximum packet size.
    #[error("payload length {0} exceeds the maximum packet size")]
    PayloadTooLarge(u32),
    /// `hdr.len` is larger than what the chain carries.
    #[error("payload length {len} exceeds the {avail} bytes left in the chain")]
    PayloadExceedsChain { len: u32, avail: usize },
    /// The rx chain cannot hold the packet.
    #[error("rx chain of {capacity} bytes cannot hold a {needed}-byte packet")]
    BufferTooSmall { needed: usize, capacity: usize },
    /// Guest memory access failed after validation.
    #[error("guest memory access failed at {0:#x}")]
    MemoryAccess(u64),
}

/// `struct virtio_vsock_hdr`, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decodes a header from its little-endian wire form.
    pub fn from_bytes(b: &[u8; VSOCK_PKT_HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in its little-endian wire form.
    pub fn to_bytes(&self) -> [u8; VSOCK_PKT_HDR_SIZE] {
        let mut b = [0u8; VSOCK_PKT_HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet with its payload copied out of (or destined for) guest memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VsockPacket {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

impl VsockPacket {
    /// A control packet (no payload) of stream type.
    pub fn control(src: (u64, u32), dst: (u64, u32), op: u16) -> Self {
        Self {
            hdr: VsockHeader {
                src_cid: src.0,
                src_port: src.1,
                dst_cid: dst.0,
                dst_port: dst.1,
                type_: VSOCK_TYPE_STREAM,
                op,
                ..Default::default()
            },
            data: Vec::new(),
        }
    }

    /// Parses a guest tx chain. Any error leaves guest memory untouched.
    pub fn from_tx_chain<M>(chain: DescriptorChain<M>) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory + Sized,
    {
        GuestBuffers::from_chain(chain, Direction::DeviceReadable)?.read_packet()
    }

    /// Writes the packet into an rx chain's buffers; returns the bytes
    /// written (header plus payload).
    pub fn write_to<M: GuestMemory>(
        &self,
        mem: &M,
        bufs: &GuestBuffers,
    ) -> Result<u32, PacketError> {
        let needed = VSOCK_PKT_HDR_SIZE + self.data.len();
        if bufs.direction != Direction::DeviceWritable || needed > bufs.total {
            return Err(PacketError::BufferTooSmall {
                needed,
                capacity: bufs.total,
            });
        }
        let mut hdr = self.hdr;
        hdr.len = self.data.len() as u32;
        bufs.write_at(mem, 0, &hdr.to_bytes())?;
        bufs.write_at(mem, VSOCK_PKT_HDR_SIZE, &self.data)?;
        Ok(needed as u32)
    }
}

/// Which way a chain's buffers go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Guest to device (tx).
    DeviceReadable,
    /// Device to guest (rx).
    DeviceWritable,
}

/// The validated buffers of one descriptor chain.
#[derive(Debug)]
pub struct GuestBuffers {
    segs: Vec<(GuestAddress, usize)>,
    total: usize,
    direction: Direction,
    tx_bytes: Option<Vec<u8>>,
}

impl GuestBuffers {
    /// Walks `chain`, checking every descriptor's direction and that it lies
    /// in guest memory. For tx chains the bytes are copied out at once (up to
    /// a header plus the largest payload), so later guest writes cannot
    /// change what we parse.
    pub fn from_chain<M>(
        chain: DescriptorChain<M>,
        direction: Direction,
    ) -> Result<Self, PacketError>
    where
        M: Deref,
        M::Target: GuestMemory + Sized,
    {
        let mut chain = chain;
        let mut segs = Vec::new();
        let mut total = 0usize;
        // The chain iterator stops by itself after queue-size descriptors, on
        // a descriptor it cannot read and on a bad indirect table.
        while let Some(desc) = chain.next() {
            let writable = desc.is_write_only();
            match (direction, writable) {
                (Direction::DeviceReadable, true) => return Err(PacketError::UnexpectedWriteOnly),
                (Direction::DeviceWritable, false) => return Err(PacketError::UnexpectedReadOnly),
                _ => {}
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if !chain.memory().check_range(desc.addr(), len) {
                return Err(PacketError::OutOfGuestMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            if segs.len() >= MAX_CHAIN_SEGMENTS {
                return Err(PacketError::TooManyDescriptors);
            }
            segs.push((desc.addr(), len));
            total = total.saturating_add(len);
        }
        let mut bufs = Self {
            segs,
            total,
            direction,
            tx_bytes: None,
        };
        if direction == Direction::DeviceReadable {
            let n = bufs.total.min(VSOCK_PKT_HDR_SIZE + MAX_PKT_BUF_SIZE);
            let mut bytes = vec![0u8; n];
            bufs.read_at(chain.memory(), 0, &mut bytes)?;
            bufs.tx_bytes = Some(bytes);
        }
        Ok(bufs)
    }

    /// Total bytes the chain covers.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the chain covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Parses the packet copied out of a tx chain.
    pub fn read_packet(&self) -> Result<VsockPacket, PacketError> {
        let bytes = match (&self.tx_bytes, self.direction) {
            (Some(b), Direction::DeviceReadable) => b,
            _ => return Err(PacketError::UnexpectedWriteOnly),
        };
        let Some(hdr_bytes) = bytes.get(..VSOCK_PKT_HDR_SIZE) else {
            return Err(PacketError::HeaderTooShort(self.total));
        };
        let mut hb = [0u8; VSOCK_PKT_HDR_SIZE];
        hb.copy_from_slice(hdr_bytes);
        let hdr = VsockHeader::from_bytes(&hb);
        if hdr.len as usize > MAX_PKT_BUF_SIZE {
            return Err(PacketError::PayloadTooLarge(hdr.len));
        }
        let avail = self.total - VSOCK_PKT_HDR_SIZE;
        if hdr.len as usize > avail {
            return Err(PacketError::PayloadExceedsChain {
                len: hdr.len,
                avail,
            });
        }
        let end = VSOCK_PKT_HDR_SIZE + hdr.len as usize;
        // `end <= total` and `end <= HDR + MAX`, so `bytes` holds it.
        let data = bytes
            .get(VSOCK_PKT_HDR_SIZE..end)
            .ok_or(PacketError::PayloadExceedsChain {
                len: hdr.len,
                avail,
            })?
            .to_vec();
        Ok(VsockPacket { hdr, data })
    }

    fn read_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        buf: &mut [u8],
    ) -> Result<(), PacketError> {
        self.access(offset, buf.len(), |addr, range| {
            mem.read_slice(&mut buf[range], addr)
                .map_err(|_| PacketError::MemoryAccess(addr.0))
        })
    }

    /// Writes `buf` at byte `offset` of the chain.
    pub fn write_at<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        buf: &[u8],
    ) -> Result<(), PacketError> {
        if self.direction != Direction::DeviceWritable {
            return Err(PacketError::UnexpectedReadOnly);
        }
        self.access(offset, buf.len(), |addr, range| {
            mem.write_slice(&buf[range], addr)
                .map_err(|_| PacketError::MemoryAccess(addr.0))
        })
    }

    /// Calls `f(guest_addr, range_in_buf)` for each piece of the byte range
    /// `[offset, offset + len)` of the chain.
    fn access(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), PacketError>,
    ) -> Result<(), PacketError> {
        let end = offset.checked_add(len).filter(|&e| e <= self.total).ok_or(
            PacketError::BufferTooSmall {
                needed: offset.saturating_add(len),
                capacity: self.total,
            },
        )?;
        let mut seg_start = 0usize;
        let mut done = offset;
        for &(addr, seg_len) in &self.segs {
            let seg_end = seg_start + seg_len;
            if done < end && done < seg_end && done >= seg_start {
                let n = (seg_end - done).min(end - done);
                let within = (done - seg_start) as u64;
                let gaddr = GuestAddress(addr.0.wrapping_add(within));
                f(gaddr, (done - offset)..(done - offset + n))?;
                done += n;
            }
            seg_start = seg_end;
            if done >= end {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::GuestMemory as Mem;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const MEM_SIZE: usize = 0x10_0000;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn hdr(len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: VSOCK_TYPE_STREAM,
            op: super::super::op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    fn parse(m: &Mem, descs: &[RawDescriptor]) -> Result<VsockPacket, PacketError> {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        VsockPacket::from_tx_chain(chain)
    }

    #[test]
    fn header_round_trip() {
        let h = hdr(9);
        assert_eq!(VsockHeader::from_bytes(&h.to_bytes()), h);
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
    }

    #[test]
    fn parses_header_and_payload_split_anywhere() {
        let m = mem();
        let mut bytes = hdr(10).to_bytes().to_vec();
        bytes.extend_from_slice(b"0123456789");
        m.write_slice(&bytes[..30], GuestAddress(0x1_0000)).unwrap();
        m.write_slice(&bytes[30..], GuestAddress(0x2_0000)).unwrap();
        let pkt = parse(
            &m,
            &[
                desc(0x1_0000, 30, false),
                desc(0x3_0000, 0, false),
                desc(0x2_0000, 24, false),
            ],
        )
        .unwrap();
        assert_eq!(pkt.hdr, hdr(10));
        assert_eq!(pkt.data, b"0123456789");
    }

    #[test]
    fn rejects_short_header() {
        let m = mem();
        m.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        assert_eq!(
            parse(&m, &[desc(0x1_0000, 43, false)]),
            Err(PacketError::HeaderTooShort(43))
        );
        assert_eq!(
            parse(&m, &[desc(0x1_0000, 0, false)]),
            Err(PacketError::HeaderTooShort(0))
        );
    }

    #[test]
    fn rejects_len_beyond_chain_or_max() {
        let m = mem();
        m.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        assert_eq!(
            parse(&m, &[desc(0x1_0000, 44 + 99, false)]),
            Err(PacketError::PayloadExceedsChain {
                len: 100,
                avail: 99
            })
        );
        m.write_slice(&hdr(u32::MAX).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        assert_eq!(
            parse(&m, &[desc(0x1_0000, 0x8_0000, false)]),
            Err(PacketError::PayloadTooLarge(u32::MAX))
        );
        // A header-only packet with a zero length is fine.
        m.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        assert_eq!(parse(&m, &[desc(0x1_0000, 44, false)]).unwrap().data, b"");
    }

    #[test]
    fn rejects_wrong_direction() {
        let m = mem();
        m.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        assert_eq!(
            parse(&m, &[desc(0x1_0000, 44, false), desc(0x2_0000, 16, true)]),
            Err(PacketError::UnexpectedWriteOnly)
        );
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x1_0000, 44, true), desc(0x2_0000, 16, false)])
            .unwrap();
        assert_eq!(
            GuestBuffers::from_chain(chain, Direction::DeviceWritable).unwrap_err(),
            PacketError::UnexpectedReadOnly
        );
    }

    #[test]
    fn rejects_out_of_memory_descriptors() {
        let m = mem();
        assert_eq!(
            parse(&m, &[desc(MEM_SIZE as u64 - 10, 44, false)]),
            Err(PacketError::OutOfGuestMemory {
                addr: MEM_SIZE as u64 - 10,
                len: 44
            })
        );
        assert!(matches!(
            parse(&m, &[desc(u64::MAX - 4, 44, false)]),
            Err(PacketError::OutOfGuestMemory { .. })
        ));
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x1_0000, 44, true), desc(0xffff_0000, 8, true)])
            .unwrap();
        assert!(matches!(
            GuestBuffers::from_chain(chain, Direction::DeviceWritable),
            Err(PacketError::OutOfGuestMemory { .. })
        ));
    }

    #[test]
    fn rejects_too_many_descriptors() {
        let m = mem();
        let descs: Vec<RawDescriptor> = (0..MAX_CHAIN_SEGMENTS as u64 + 1)
            .map(|i| desc(0x1_0000 + i, 1, false))
            .collect();
        let q = MockSplitQueue::new(&m, 128);
        let chain = q.build_desc_chain(&descs).unwrap();
        assert_eq!(
            VsockPacket::from_tx_chain(chain),
            Err(PacketError::TooManyDescriptors)
        );
    }

    #[test]
    fn looping_chain_terminates() {
        let m = mem();
        m.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let q = MockSplitQueue::new(&m, 4);
        // Two descriptors pointing at each other.
        let next = VRING_DESC_F_NEXT as u16;
        q.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x1_0000, 44, next, 1)),
                RawDescriptor::from(SplitDescriptor::new(0x1_0000, 44, next, 0)),
            ],
            0,
        )
        .unwrap();
        let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
        use virtio_queue::QueueT;
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        // The chain ends after queue-size descriptors; the packet parses.
        let pkt = VsockPacket::from_tx_chain(chain).unwrap();
        assert_eq!(pkt.hdr.len, 0);
    }

    #[test]
    fn writes_rx_packet_across_descriptors() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[desc(0x1_0000, 20, true), desc(0x2_0000, 4096, true)])
            .unwrap();
        let bufs = GuestBuffers::from_chain(chain, Direction::DeviceWritable).unwrap();
        assert_eq!(bufs.len(), 4116);
        let pkt = VsockPacket {
            hdr: hdr(0),
            data: b"hello".to_vec(),
        };
        assert_eq!(pkt.write_to(&m, &bufs).unwrap(), 49);
        let mut out = [0u8; 49];
        m.read_slice(&mut out[..20], GuestAddress(0x1_0000))
            .unwrap();
        m.read_slice(&mut out[20..], GuestAddress(0x2_0000))
            .unwrap();
        let mut hb = [0u8; 44];
        hb.copy_from_slice(&out[..44]);
        assert_eq!(VsockHeader::from_bytes(&hb), hdr(5));
        assert_eq!(&out[44..], b"hello");

        let big = VsockPacket {
            hdr: hdr(0),
            data: vec![0; 5000],
        };
        assert_eq!(
            big.write_to(&m, &bufs),
            Err(PacketError::BufferTooSmall {
                needed: 5044,
                capacity: 4116
            })
        );
    }
}
