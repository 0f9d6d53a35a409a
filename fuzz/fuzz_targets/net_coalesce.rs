//! Receive coalescing over a list of frames, as the device feeds it from
//! the tap: mostly TCP/IPv4 segments of two flows, with any field or byte
//! disturbed. Oracles: the merged frame carries exactly the payloads of the
//! frames it took, in order, from one flow with contiguous sequence
//! numbers; it fits the buffer and an IPv4 packet; its IPv4 header
//! checksum is valid and its length right. Counters (printed at exit)
//! show how many inputs started a merge and how many merged two or more
//! frames, so a campaign proves the oracles saw real merges.

#![no_main]

use arbitrary::Arbitrary;
use arrow_fuzz::Counter;
use libfuzzer_sys::fuzz_target;

use vmm_core::fuzzing::Merge;
use vmm_core::virtio::net::header::{NetHeader, F_DATA_VALID, F_NEEDS_CSUM, GSO_TCPV4};
use vmm_core::virtio::net::{MAX_PACKET_LEN, VNET_HDR_LEN};

const ETH: usize = 14;
const IP_OFF: usize = VNET_HDR_LEN + ETH;
const TCP_OFF: usize = IP_OFF + 20;

/// Inputs whose first frame started a merge.
static STARTED: Counter = Counter::new("net_coalesce merges started");
/// Merges that took two or more frames.
static MERGED: Counter = Counter::new("net_coalesce merges of 2+ frames");
/// Frames taken into those merges.
static FRAMES: Counter = Counter::new("net_coalesce frames merged");
/// Frames refused by a merge in progress (a cross-flow or out-of-order
/// frame, a different header...).
static REFUSED: Counter = Counter::new("net_coalesce frames refused");

#[derive(Arbitrary, Debug)]
struct Frame {
    /// Which of two flows (addresses and ports).
    flow: bool,
    /// Continue the sequence (else use `seq`).
    in_order: bool,
    seq: u32,
    payload: u16,
    /// TCP flags: ACK|PSH mostly.
    flags: Option<u8>,
    /// With a timestamp option (32-byte TCP header), its value.
    tsval: Option<u32>,
    /// GSO TCPv4 with this size.
    gso_size: Option<u16>,
    data_valid: bool,
    /// Bytes flipped: (offset, xor).
    flips: Vec<(u16, u8)>,
    /// Bytes cut off the end.
    cut: u8,
}

/// The ones'-complement sum of `b` folded to 16 bits.
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn build(f: &Frame, seq: u32, tag: u8) -> Vec<u8> {
    let tcp_len = if f.tsval.is_some() { 32 } else { 20 };
    let payload = usize::from(f.payload % 9000);
    let total = 20 + tcp_len + payload;
    let mut b = vec![0u8; VNET_HDR_LEN];
    let (flags, gso_type, gso_size) = match f.gso_size {
        Some(s) => (F_NEEDS_CSUM, GSO_TCPV4, s),
        None if f.data_valid => (F_DATA_VALID, 0, 0),
        None => (F_NEEDS_CSUM, 0, 0),
    };
    NetHeader {
        flags,
        gso_type,
        gso_size,
        csum_start: (TCP_OFF - VNET_HDR_LEN) as u16,
        csum_offset: 16,
        ..NetHeader::default()
    }
    .write(&mut b);
    let last = if f.flow { 2 } else { 1 };
    b.extend([2, 0, 0, 0, 0, last, 2, 0, 0, 0, 0, 9, 0x08, 0x00]);
    b.extend([0x45, 0]);
    b.extend((total as u16).to_be_bytes());
    b.extend([0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, last, 10, 0, 0, 9]);
    b.extend(5000u16.to_be_bytes());
    b.extend((40000u16 + u16::from(last)).to_be_bytes());
    b.extend(seq.to_be_bytes());
    b.extend(1u32.to_be_bytes());
    b.extend([
        ((tcp_len / 4) as u8) << 4,
        f.flags.unwrap_or(0x18),
        1,
        0,
        0,
        0,
        0,
        0,
    ]);
    if let Some(ts) = f.tsval {
        b.extend([1, 1, 8, 10]);
        b.extend(ts.to_be_bytes());
        b.extend(7u32.to_be_bytes());
    }
    b.extend((0..payload).map(|i| tag.wrapping_add(i as u8)));
    for &(at, x) in &f.flips {
        let at = usize::from(at);
        if at < b.len() {
            b[at] ^= x;
        }
    }
    b.truncate(b.len().saturating_sub(usize::from(f.cut)));
    b
}

/// The TCP payload of a frame that parsed as a segment.
fn payload(frame: &[u8]) -> &[u8] {
    let tcp_len = usize::from(frame[TCP_OFF + 12] >> 4) * 4;
    &frame[TCP_OFF + tcp_len..]
}

#[derive(Arbitrary, Debug)]
struct Input {
    frames: Vec<Frame>,
    /// The receive buffer's room past the first frame (else the device's
    /// full `MAX_PACKET_LEN`).
    room: Option<u16>,
}

fuzz_target!(|input: Input| {
    let Input { frames, room } = input;
    if frames.is_empty() || frames.len() > 64 {
        return;
    }
    let mut seqs = [1000u32, 5000u32];
    let built: Vec<Vec<u8>> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let s = &mut seqs[usize::from(f.flow)];
            let seq = if f.in_order { *s } else { f.seq };
            let b = build(f, seq, i as u8);
            *s = seq.wrapping_add(usize::from(f.payload % 9000) as u32);
            b
        })
        .collect();

    let head = &built[0];
    if head.len() > MAX_PACKET_LEN {
        return;
    }
    let room = room.map_or(MAX_PACKET_LEN, |r| head.len() + usize::from(r));
    let mut buf = vec![0u8; room.min(MAX_PACKET_LEN)];
    buf[..head.len()].copy_from_slice(head);
    let mut len = head.len();
    let Some(mut merge) = Merge::start(&buf[..len]) else {
        return;
    };
    STARTED.add(1);
    let mut taken = vec![head];
    for next in &built[1..] {
        if merge.closed() {
            break;
        }
        let before = buf[..len].to_vec();
        if !merge.append(&mut buf, &mut len, next) {
            assert_eq!(buf[..len], before[..], "a refused frame changed the merge");
            REFUSED.add(1);
            break;
        }
        assert!(len <= buf.len(), "the merge outgrew its buffer");
        taken.push(next);
    }
    assert_eq!(merge.frames() as usize, taken.len());
    merge.finish(&mut buf[..len]);
    let frame = &buf[..len];

    // Payload conserved, in order.
    let want: Vec<u8> = taken.iter().flat_map(|f| payload(f).to_vec()).collect();
    assert_eq!(payload(frame), &want[..]);
    assert!(len - IP_OFF <= usize::from(u16::MAX));

    // One flow: Ethernet and IP addresses, ports; contiguous sequence.
    let seq = |f: &[u8]| u32::from_be_bytes(f[TCP_OFF + 4..TCP_OFF + 8].try_into().unwrap());
    let mut next_seq = seq(head);
    for f in &taken {
        assert_eq!(f[VNET_HDR_LEN..IP_OFF], head[VNET_HDR_LEN..IP_OFF]);
        assert_eq!(f[IP_OFF + 12..IP_OFF + 20], head[IP_OFF + 12..IP_OFF + 20]);
        assert_eq!(f[TCP_OFF..TCP_OFF + 4], head[TCP_OFF..TCP_OFF + 4]);
        assert_eq!(seq(f), next_seq);
        next_seq = next_seq.wrapping_add(payload(f).len() as u32);
    }

    if taken.len() > 1 {
        MERGED.add(1);
        FRAMES.add(taken.len() as u64);
        let ip = &frame[IP_OFF..TCP_OFF];
        assert_eq!(csum(ip), 0xffff, "IPv4 header checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            len - IP_OFF
        );
        let h = NetHeader::parse(frame).expect("a whole frame");
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert!(h.gso_size > 0);
    }
});
