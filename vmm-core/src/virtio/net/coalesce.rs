//! Receive coalescing: consecutive TCP/IPv4 segments of one flow that wait
//! in the tap go to the guest as one GSO frame.
//!
//! Why: the guest pays per frame (an interrupt, IP and TCP receive, an
//! ACK), not per byte, and where the guest kernel is emulated (`kvm_pvm`)
//! each frame costs milliseconds. The host's TCP sizes its TSO bursts by
//! its pacing rate, so a slow receiver is sent small frames and stays slow.
//! Merging the frames that queue up in the tap while the guest is busy is
//! what Linux's GRO does for a NIC, done here once, natively, instead of by
//! the guest.
//!
//! The rules are GRO's (`tcp_gro_receive`): same Ethernet addresses, IPv4
//! without options or fragments, same addresses, TOS and TTL, same ports
//! and ACK number, in-order sequence numbers, ACK and PSH as the only
//! flags, equal segment sizes with only the last one shorter, and checksums
//! the host already trusts (`NEEDS_CSUM` from a local sender, or
//! `DATA_VALID`). Two differences, both because only frames that have
//! already arrived are merged, so nothing waits for a later one: PSH does
//! not end a merge (a sender blocked on a slow receiver marks every burst
//! PSH; the merged frame carries it), and TCP options must be equal except
//! that the timestamp option may advance (the merged frame carries the
//! newest value and echo, as Linux's old LRO did), since a paced stream is
//! stamped anew every millisecond.
//!
//! The merged frame is what a TSO sender would have produced: GSO TCPv4 with
//! the segment size, `NEEDS_CSUM` with the pseudo-header sum in the TCP
//! checksum field, the IPv4 length and header checksum rewritten.

use super::header::{NetHeader, F_DATA_VALID, F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4};
use super::VNET_HDR_LEN;

const ETH_HDR_LEN: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IP_OFF: usize = VNET_HDR_LEN + ETH_HDR_LEN;
/// IPv4 without options: version 4, IHL 5.
const IP_HDR_LEN: usize = 20;
const IP_VERSION_IHL: u8 = 0x45;
const IPPROTO_TCP: u8 = 6;
const TCP_OFF: usize = IP_OFF + IP_HDR_LEN;
const TCP_HDR_MIN: usize = 20;
/// The TCP checksum field, from the start of the TCP header.
const TCP_CSUM_OFFSET: usize = 16;
pub(super) const TCP_PSH: u8 = 0x08;
pub(super) const TCP_ACK: u8 = 0x10;
/// NOP, NOP, timestamp (kind 8, length 10): how Linux lays out a segment's
/// only option.
const TIMESTAMP_OPTION: [u8; 4] = [1, 1, 8, 10];
/// The largest IPv4 packet.
const MAX_IP_LEN: usize = u16::MAX as usize;

/// A frame (virtio-net header first) that is a plain TCP/IPv4 data segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    /// TCP header length.
    tcp_len: usize,
    payload: usize,
    /// The sender's segment size: `gso_size` of a GSO frame, the payload of
    /// a plain one.
    mss: usize,
    seq: u32,
    flags: u8,
}

impl Segment {
    fn parse(frame: &[u8]) -> Option<Segment> {
        let hdr = NetHeader::parse(frame).ok()?;
        if hdr.flags & (F_NEEDS_CSUM | F_DATA_VALID) == 0 {
            return None;
        }
        if frame.get(IP_OFF - 2..IP_OFF)? != ETHERTYPE_IPV4 {
            return None;
        }
        let ip = frame.get(IP_OFF..TCP_OFF)?;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
        if ip[0] != IP_VERSION_IHL
            || ip[9] != IPPROTO_TCP
            || fragment != 0
            || IP_OFF + total != frame.len()
        {
            return None;
        }
        let tcp = frame.get(TCP_OFF..TCP_OFF + TCP_HDR_MIN)?;
        let tcp_len = usize::from(tcp[12] >> 4) * 4;
        let payload = total.checked_sub(IP_HDR_LEN + tcp_len)?;
        if tcp_len < TCP_HDR_MIN || payload == 0 {
            return None;
        }
        if hdr.flags & F_NEEDS_CSUM != 0
            && (usize::from(hdr.csum_start) != TCP_OFF - VNET_HDR_LEN
                || usize::from(hdr.csum_offset) != TCP_CSUM_OFFSET)
        {
            return None;
        }
        let mss = match hdr.gso_type {
            GSO_NONE => payload,
            GSO_TCPV4 if hdr.gso_size > 0 => usize::from(hdr.gso_size),
            _ => return None,
        };
        Some(Segment {
            tcp_len,
            payload,
            mss,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            flags: tcp[13],
        })
    }

    /// Whether only full segments are in it: a shorter one ends a flow's
    /// burst.
    fn is_full(&self) -> bool {
        self.payload.is_multiple_of(self.mss)
    }
}

/// A frame being built from consecutive segments, in a buffer of its own.
#[derive(Debug)]
pub struct Merge {
    head: Segment,
    next_seq: u32,
    segments: u32,
    closed: bool,
}

impl Merge {
    /// Starts a merge at `frame` if it is a full data segment with no flag
    /// but ACK and PSH; `None` leaves the frame as it is.
    pub fn start(frame: &[u8]) -> Option<Merge> {
        let head = Segment::parse(frame)?;
        if head.flags & !TCP_PSH != TCP_ACK || !head.is_full() {
            return None;
        }
        Some(Merge {
            head,
            next_seq: head.seq.wrapping_add(head.payload as u32),
            segments: 1,
            closed: false,
        })
    }

    /// Whether nothing more can be appended (a short segment came).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// How many frames went into it.
    pub fn frames(&self) -> u32 {
        self.segments
    }

    /// Appends `next`'s payload to the merged frame (`buf[..*len]`) if it
    /// continues the flow and fits `buf`. Returns false, with nothing
    /// changed, if not.
    pub fn append(&mut self, buf: &mut [u8], len: &mut usize, next: &[u8]) -> bool {
        if self.closed {
            return false;
        }
        let Some(seg) = Segment::parse(next) else {
            return false;
        };
        let new_len = *len + seg.payload;
        let same_flow = buf[VNET_HDR_LEN..IP_OFF - 2] == next[VNET_HDR_LEN..IP_OFF - 2]
            // TOS; TTL; addresses.
            && buf[IP_OFF + 1] == next[IP_OFF + 1]
            && buf[IP_OFF + 8] == next[IP_OFF + 8]
            && buf[IP_OFF + 12..TCP_OFF] == next[IP_OFF + 12..TCP_OFF]
            // Ports; then the ACK number.
            && buf[TCP_OFF..TCP_OFF + 4] == next[TCP_OFF..TCP_OFF + 4]
            && buf[TCP_OFF + 8..TCP_OFF + 12] == next[TCP_OFF + 8..TCP_OFF + 12];
        if !same_flow
            || seg.seq != self.next_seq
            || seg.tcp_len != self.head.tcp_len
            || seg.flags & !TCP_PSH != TCP_ACK
            || !self.fits_segment_size(&seg)
            || new_len - IP_OFF > MAX_IP_LEN
            || new_len > buf.len()
        {
            return false;
        }
        let options = TCP_OFF + TCP_HDR_MIN..TCP_OFF + self.head.tcp_len;
        if buf[options.clone()] != next[options.clone()] {
            if !timestamps_advance(&buf[options.clone()], &next[options.clone()]) {
                return false;
            }
            buf[options.clone()].copy_from_slice(&next[options]);
        }
        // The newest window; PSH carried over.
        buf[TCP_OFF + 14..TCP_OFF + 16].copy_from_slice(&next[TCP_OFF + 14..TCP_OFF + 16]);
        buf[TCP_OFF + 13] |= seg.flags & TCP_PSH;
        let payload_at = TCP_OFF + self.head.tcp_len;
        buf[*len..new_len].copy_from_slice(&next[payload_at..]);
        *len = new_len;
        self.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        self.segments += 1;
        // A short segment ends the sender's burst: a GSO frame with a
        // partial last segment, or a plain one below the head's size.
        self.closed = !seg.is_full() || seg.payload < self.head.mss;
        true
    }

    /// A GSO frame must have the head's segment size; a plain segment
    /// may be the head's size or, as the last one, shorter.
    fn fits_segment_size(&self, seg: &Segment) -> bool {
        let plain = seg.mss == seg.payload;
        seg.mss == self.head.mss || plain && seg.payload < self.head.mss
    }

    /// Rewrites the headers of the merged frame `buf[..len]`, if anything
    /// was appended: GSO TCPv4 with the head's segment size, the checksum
    /// left to the guest's stack as a partial one, IPv4 length and header
    /// checksum.
    pub fn finish(&self, frame: &mut [u8]) {
        if self.segments < 2 {
            return;
        }
        let ip_len = frame.len() - IP_OFF;
        let hdr = NetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: (ETH_HDR_LEN + IP_HDR_LEN + self.head.tcp_len) as u16,
            gso_size: self.head.mss as u16,
            csum_start: (TCP_OFF - VNET_HDR_LEN) as u16,
            csum_offset: TCP_CSUM_OFFSET as u16,
            num_buffers: 0,
        };
        hdr.write(&mut frame[..VNET_HDR_LEN]);
        let ip = &mut frame[IP_OFF..TCP_OFF];
        ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        ip[10..12].fill(0);
        let ip_csum = !fold(sum16(ip, 0));
        ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        // The pseudo-header sum, not complemented: what a sender leaves in
        // the field for the device (here the guest) to finish.
        let tcp_len = (ip_len - IP_HDR_LEN) as u32;
        let pseudo = sum16(&ip[12..20], u32::from(IPPROTO_TCP) + tcp_len);
        let csum = TCP_OFF + TCP_CSUM_OFFSET;
        frame[csum..csum + 2].copy_from_slice(&fold(pseudo).to_be_bytes());
    }
}

/// Whether `next` differs from `head` only by a later (or equal) timestamp
/// option, laid out as Linux sends it.
fn timestamps_advance(head: &[u8], next: &[u8]) -> bool {
    let is_timestamp = |o: &[u8]| o.len() == 12 && o[..4] == TIMESTAMP_OPTION;
    if !is_timestamp(head) || !is_timestamp(next) {
        return false;
    }
    let tsval = |o: &[u8]| u32::from_be_bytes([o[4], o[5], o[6], o[7]]);
    (tsval(next).wrapping_sub(tsval(head)) as i32) >= 0
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words, on top of
/// `start`, unfolded.
fn sum16(bytes: &[u8], start: u32) -> u32 {
    bytes.chunks(2).fold(start, |acc, w| {
        acc + u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))
    })
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
/// A TCP/IPv4 segment from 10.88.0.1:5201 to 10.88.0.7:40000 with a
/// timestamp option, behind a virtio-net header with `NEEDS_CSUM`, as
/// the tap gives a locally sent one.
pub(super) fn tcp_segment(seq: u32, payload: &[u8], flags: u8, tsval: u32) -> Vec<u8> {
    let tcp_len = 32;
    let total = IP_HDR_LEN + tcp_len + payload.len();
    let mut f = vec![0u8; VNET_HDR_LEN];
    NetHeader {
        flags: F_NEEDS_CSUM,
        csum_start: (TCP_OFF - VNET_HDR_LEN) as u16,
        csum_offset: TCP_CSUM_OFFSET as u16,
        ..NetHeader::default()
    }
    .write(&mut f);
    f.extend([0x0a, 0x58, 0x0a, 0x58, 0, 7, 0x0a, 0x58, 0x0a, 0x58, 0, 1]);
    f.extend(ETHERTYPE_IPV4);
    f.extend([IP_VERSION_IHL, 0]);
    f.extend((total as u16).to_be_bytes());
    f.extend([0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
    f.extend([10, 88, 0, 1, 10, 88, 0, 7]);
    f.extend(5201u16.to_be_bytes());
    f.extend(40000u16.to_be_bytes());
    f.extend(seq.to_be_bytes());
    f.extend(777u32.to_be_bytes());
    f.extend([
        (tcp_len as u8 / 4) << 4,
        flags,
        0x01,
        0xf6,
        0xab,
        0xcd,
        0,
        0,
    ]);
    f.extend(TIMESTAMP_OPTION);
    f.extend(tsval.to_be_bytes());
    f.extend(99u32.to_be_bytes());
    f.extend(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: usize = 1448;

    fn payload(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    /// Merges `frames` as the device does; returns the frame and how many
    /// went into it.
    fn merge(frames: &[Vec<u8>]) -> (Vec<u8>, u32) {
        let mut buf = vec![0u8; VNET_HDR_LEN + 65550];
        let mut len = frames[0].len();
        buf[..len].copy_from_slice(&frames[0]);
        let Some(mut m) = Merge::start(&frames[0]) else {
            return (frames[0].clone(), 1);
        };
        for f in &frames[1..] {
            if !m.append(&mut buf, &mut len, f) {
                break;
            }
        }
        m.finish(&mut buf[..len]);
        buf.truncate(len);
        (buf, m.frames())
    }

    #[test]
    fn consecutive_segments_become_one_gso_frame() {
        let frames = [
            tcp_segment(1000, &payload(MSS, 1), TCP_ACK, 5),
            tcp_segment(1000 + MSS as u32, &payload(MSS, 2), TCP_ACK, 6),
            tcp_segment(
                1000 + 2 * MSS as u32,
                &payload(100, 3),
                TCP_ACK | TCP_PSH,
                6,
            ),
        ];
        let (f, n) = merge(&frames);
        assert_eq!(n, 3);
        assert_eq!(f.len(), TCP_OFF + 32 + 2 * MSS + 100);
        let hdr = NetHeader::parse(&f).unwrap();
        assert_eq!(hdr.gso_type, GSO_TCPV4);
        assert_eq!(usize::from(hdr.gso_size), MSS);
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!(usize::from(hdr.hdr_len), ETH_HDR_LEN + IP_HDR_LEN + 32);
        // IPv4 length, and a header checksum that verifies.
        let ip = &f[IP_OFF..TCP_OFF];
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            f.len() - IP_OFF
        );
        assert_eq!(fold(sum16(ip, 0)), 0xffff);
        // PSH carried over; the newest timestamp; payload in order.
        assert_eq!(f[TCP_OFF + 13], TCP_ACK | TCP_PSH);
        assert_eq!(f[TCP_OFF + 24..TCP_OFF + 28], 6u32.to_be_bytes());
        let data = &f[TCP_OFF + 32..];
        assert!(data[..MSS].iter().all(|&b| b == 1));
        assert!(data[MSS..2 * MSS].iter().all(|&b| b == 2));
        assert!(data[2 * MSS..].iter().all(|&b| b == 3));
        // Completing the partial checksum as a NIC would gives a segment
        // whose checksum verifies against the pseudo-header.
        let mut done = f.clone();
        let csum = !fold(sum16(&done[TCP_OFF..], 0));
        done[TCP_OFF + 16..TCP_OFF + 18].copy_from_slice(&csum.to_be_bytes());
        let tcp_len = (done.len() - TCP_OFF) as u32;
        let pseudo = sum16(&done[IP_OFF + 12..TCP_OFF], 6 + tcp_len);
        assert_eq!(fold(sum16(&done[TCP_OFF..], pseudo)), 0xffff);
    }

    #[test]
    fn a_short_segment_closes_the_merge_and_push_does_not() {
        let frames = [
            tcp_segment(0, &payload(MSS, 1), TCP_ACK, 5),
            tcp_segment(MSS as u32, &payload(500, 2), TCP_ACK, 5),
            tcp_segment(MSS as u32 + 500, &payload(MSS, 3), TCP_ACK, 5),
        ];
        assert_eq!(merge(&frames).1, 2);
        // How a sender blocked on a slow receiver sends: every burst pushed.
        let frames = [
            tcp_segment(0, &payload(MSS, 1), TCP_ACK | TCP_PSH, 5),
            tcp_segment(MSS as u32, &payload(MSS, 2), TCP_ACK | TCP_PSH, 5),
            tcp_segment(2 * MSS as u32, &payload(MSS, 3), TCP_ACK, 6),
        ];
        let (f, n) = merge(&frames);
        assert_eq!(n, 3);
        assert_eq!(f[TCP_OFF + 13], TCP_ACK | TCP_PSH);
    }

    #[test]
    fn what_breaks_the_flow_is_not_merged() {
        let head = tcp_segment(0, &payload(MSS, 1), TCP_ACK, 5);
        let next = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut s = tcp_segment(MSS as u32, &payload(MSS, 2), TCP_ACK, 5);
            f(&mut s);
            s
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "out of order",
                tcp_segment(MSS as u32 + 1, &payload(MSS, 2), TCP_ACK, 5),
            ),
            ("other port", next(&|s| s[TCP_OFF + 1] ^= 1)),
            ("other ACK number", next(&|s| s[TCP_OFF + 11] ^= 1)),
            ("other source", next(&|s| s[IP_OFF + 15] ^= 1)),
            ("other TTL", next(&|s| s[IP_OFF + 8] ^= 1)),
            ("other MAC", next(&|s| s[VNET_HDR_LEN] ^= 1)),
            ("FIN", next(&|s| s[TCP_OFF + 13] |= 1)),
            (
                "older timestamp",
                tcp_segment(MSS as u32, &payload(MSS, 2), TCP_ACK, 4),
            ),
            ("unverified checksum", next(&|s| s[0] = 0)),
            ("IPv4 options", next(&|s| s[IP_OFF] = 0x46)),
            ("fragment", next(&|s| s[IP_OFF + 6] |= 0x20)),
            (
                "longer segment",
                tcp_segment(MSS as u32, &payload(MSS + 1, 2), TCP_ACK, 5),
            ),
            ("no payload", tcp_segment(MSS as u32, &[], TCP_ACK, 5)),
        ];
        for (what, next) in cases {
            let (f, n) = merge(&[head.clone(), next]);
            assert_eq!(n, 1, "{what}");
            assert_eq!(f, head, "{what}: the head is left as it was");
        }
    }

    #[test]
    fn only_full_ack_or_push_segments_start_a_merge() {
        assert!(Merge::start(&tcp_segment(0, &payload(MSS, 1), TCP_ACK, 5)).is_some());
        assert!(Merge::start(&tcp_segment(0, &payload(MSS, 1), TCP_ACK | TCP_PSH, 5)).is_some());
        assert!(Merge::start(&tcp_segment(0, &payload(MSS, 1), TCP_ACK | 0x20, 5)).is_none());
        assert!(Merge::start(&tcp_segment(0, &[], TCP_ACK, 5)).is_none());
        let mut arp = tcp_segment(0, &payload(MSS, 1), TCP_ACK, 5);
        arp[IP_OFF - 1] = 0x06;
        assert!(Merge::start(&arp).is_none());
        assert!(Merge::start(&[0u8; 20]).is_none());
    }

    #[test]
    fn gso_frames_merge_by_their_segment_size() {
        let mut head = tcp_segment(0, &payload(2 * MSS, 1), TCP_ACK, 5);
        let mut next = tcp_segment(2 * MSS as u32, &payload(2 * MSS, 2), TCP_ACK, 5);
        for f in [&mut head, &mut next] {
            let mut h = NetHeader::parse(f).unwrap();
            h.gso_type = GSO_TCPV4;
            h.gso_size = MSS as u16;
            h.write(&mut f[..VNET_HDR_LEN]);
        }
        let (f, n) = merge(&[head, next]);
        assert_eq!(n, 2);
        assert_eq!(f.len(), TCP_OFF + 32 + 4 * MSS);
        assert_eq!(usize::from(NetHeader::parse(&f).unwrap().gso_size), MSS);
    }

    #[test]
    fn the_merged_frame_stays_within_an_ipv4_packet() {
        let seg = 8000;
        let frames: Vec<_> = (0..10)
            .map(|i| tcp_segment(i * seg as u32, &payload(seg, 1), TCP_ACK, 5))
            .collect();
        let (f, n) = merge(&frames);
        assert_eq!(n, 8);
        assert!(f.len() - IP_OFF <= MAX_IP_LEN);
    }
}
