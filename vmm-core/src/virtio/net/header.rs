//! The `virtio_net_hdr_v1` in front of every frame, and the feature rules
//! that say which headers each side may send.
//!
//! The guest's header goes to the tap as it is, so it is checked against
//! what the guest negotiated first: the tap would take a GSO or
//! checksum-offload request the guest never acked. The tap's header goes to
//! the guest with `num_buffers` set and, when the guest cannot take
//! checksum hints, its flags cleared.

use virtio_bindings::virtio_net as vn;

use super::VNET_HDR_LEN;

/// A feature bit as a mask.
const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Checksum and segmentation offloads, offered only when the tap can do
/// them.
pub const OFFLOAD_FEATURES: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_ECN)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_ECN);

/// What every device offers: its MAC, its MTU and mergeable rx buffers.
/// (`VIRTIO_F_VERSION_1` comes from the transport.)
pub const BASE_FEATURES: u64 =
    bit(vn::VIRTIO_NET_F_MAC) | bit(vn::VIRTIO_NET_F_MTU) | bit(vn::VIRTIO_NET_F_MRG_RXBUF);

/// The device features for a tap that can (or cannot) do offloads.
pub fn device_features(tap_offloads: bool) -> u64 {
    if tap_offloads {
        BASE_FEATURES | OFFLOAD_FEATURES
    } else {
        BASE_FEATURES
    }
}

/// Whether `features` include feature bit `n`.
pub fn has(features: u64, n: u32) -> bool {
    features & bit(n) != 0
}

/// The `TUN_F_*` flags for `TUNSETOFFLOAD` that match what the guest can
/// receive: checksum hints with `GUEST_CSUM`, then TSO4/TSO6 (and ECN on
/// them) only on top of it, as the tap requires. UFO is neither offered nor
/// set.
pub fn tun_offload_flags(acked: u64) -> u32 {
    if !has(acked, vn::VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(acked, vn::VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(acked, vn::VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 && has(acked, vn::VIRTIO_NET_F_GUEST_ECN)
    {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const F_DATA_VALID: u8 = vn::VIRTIO_NET_HDR_F_DATA_VALID as u8;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = vn::VIRTIO_NET_HDR_GSO_NONE as u8;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = vn::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
/// `VIRTIO_NET_HDR_GSO_ECN`, or'ed into a TCP GSO type.
pub const GSO_ECN: u8 = vn::VIRTIO_NET_HDR_GSO_ECN as u8;

/// Offset of `num_buffers` in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// The fields of a `virtio_net_hdr_v1` the device looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Why a header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than 12 bytes.
    #[error("header of {0} bytes, {VNET_HDR_LEN} needed")]
    Short(usize),
    /// A checksum-offload request without the feature that allows it.
    #[error("checksum offload requested (flags {0:#x}) but not negotiated")]
    CsumNotNegotiated(u8),
    /// Unknown flag bits.
    #[error("unknown header flags {0:#x}")]
    Flags(u8),
    /// A GSO type that was not negotiated, or is unknown.
    #[error("GSO type {0:#x} not negotiated")]
    Gso(u8),
    /// GSO without a segment size, or without a checksum request.
    #[error("GSO type {gso_type:#x} with gso_size {gso_size} and flags {flags:#x}")]
    GsoFields {
        gso_type: u8,
        gso_size: u16,
        flags: u8,
    },
}

impl NetHeader {
    /// Parses the first 12 bytes of `bytes` (little endian, VERSION_1).
    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b = bytes
            .get(..VNET_HDR_LEN)
            .ok_or(HeaderError::Short(bytes.len()))?;
        let le16 = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        Ok(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(NUM_BUFFERS_OFFSET),
        })
    }

    /// Writes the header into the first 12 bytes of `out` (which must have
    /// them), the inverse of [`NetHeader::parse`].
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        let fields = [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ];
        for (i, v) in fields.into_iter().enumerate() {
            out[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Checks a header the guest sent against the features it acked: only
    /// `NEEDS_CSUM` with `CSUM`, and TCPv4/TCPv6 GSO (with ECN) only with
    /// the matching `HOST_*` features.
    pub fn check_tx(&self, acked: u64) -> Result<(), HeaderError> {
        if self.flags & !F_NEEDS_CSUM != 0 {
            return Err(HeaderError::Flags(self.flags));
        }
        if self.flags & F_NEEDS_CSUM != 0 && !has(acked, vn::VIRTIO_NET_F_CSUM) {
            return Err(HeaderError::CsumNotNegotiated(self.flags));
        }
        if self.gso_type == GSO_NONE {
            return Ok(());
        }
        let allowed = match self.gso_type & !GSO_ECN {
            GSO_TCPV4 => has(acked, vn::VIRTIO_NET_F_HOST_TSO4),
            GSO_TCPV6 => has(acked, vn::VIRTIO_NET_F_HOST_TSO6),
            _ => false,
        };
        let ecn_ok = self.gso_type & GSO_ECN == 0 || has(acked, vn::VIRTIO_NET_F_HOST_ECN);
        if !allowed || !ecn_ok {
            return Err(HeaderError::Gso(self.gso_type));
        }
        if self.gso_size == 0 || self.flags & F_NEEDS_CSUM == 0 {
            return Err(HeaderError::GsoFields {
                gso_type: self.gso_type,
                gso_size: self.gso_size,
                flags: self.flags,
            });
        }
        Ok(())
    }

    /// Checks a header the tap gave for a frame to the guest: GSO only of
    /// the kinds the guest acked (the tap was told with `TUNSETOFFLOAD`, so
    /// anything else is a tap that ignored it).
    pub fn check_rx(&self, acked: u64) -> Result<(), HeaderError> {
        if self.gso_type == GSO_NONE {
            return Ok(());
        }
        let allowed = match self.gso_type & !GSO_ECN {
            GSO_TCPV4 => has(acked, vn::VIRTIO_NET_F_GUEST_TSO4),
            GSO_TCPV6 => has(acked, vn::VIRTIO_NET_F_GUEST_TSO6),
            _ => false,
        };
        let ecn_ok = self.gso_type & GSO_ECN == 0 || has(acked, vn::VIRTIO_NET_F_GUEST_ECN);
        if allowed && ecn_ok {
            Ok(())
        } else {
            Err(HeaderError::Gso(self.gso_type))
        }
    }
}

/// Makes the tap's header in `packet` fit for the guest: `num_buffers` set,
/// and the flags cleared when the guest did not ack `GUEST_CSUM` (the
/// device must not send checksum hints then).
pub fn prepare_rx_header(packet: &mut [u8], acked: u64, num_buffers: u16) {
    if packet.len() < VNET_HDR_LEN {
        return;
    }
    if !has(acked, vn::VIRTIO_NET_F_GUEST_CSUM) {
        packet[0] = 0;
    }
    packet[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, gso_type: u8, gso_size: u16) -> NetHeader {
        NetHeader {
            flags,
            gso_type,
            gso_size,
            ..NetHeader::default()
        }
    }

    #[test]
    fn parses_little_endian_fields() {
        let bytes = [1, 3, 0x36, 0, 0xa8, 5, 0x22, 0, 0x10, 0, 2, 0, 0xee];
        let h = NetHeader::parse(&bytes).unwrap();
        assert_eq!(
            h,
            NetHeader {
                flags: 1,
                gso_type: 3,
                hdr_len: 0x36,
                gso_size: 1448,
                csum_start: 0x22,
                csum_offset: 0x10,
                num_buffers: 2,
            }
        );
        let mut out = [0u8; VNET_HDR_LEN];
        h.write(&mut out);
        assert_eq!(out, bytes[..VNET_HDR_LEN]);
        assert_eq!(NetHeader::parse(&bytes[..11]), Err(HeaderError::Short(11)));
        assert_eq!(NetHeader::parse(&[]), Err(HeaderError::Short(0)));
    }

    #[test]
    fn offload_flags_follow_the_guest_features() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, &b| acc | bit(b));
        assert_eq!(tun_offload_flags(0), 0);
        assert_eq!(tun_offload_flags(BASE_FEATURES), 0);
        // TSO without GUEST_CSUM is a driver bug: no offloads at all.
        assert_eq!(
            tun_offload_flags(f(&[
                vn::VIRTIO_NET_F_GUEST_TSO4,
                vn::VIRTIO_NET_F_GUEST_TSO6
            ])),
            0
        );
        assert_eq!(
            tun_offload_flags(f(&[vn::VIRTIO_NET_F_GUEST_CSUM])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tun_offload_flags(f(&[
                vn::VIRTIO_NET_F_GUEST_CSUM,
                vn::VIRTIO_NET_F_GUEST_TSO4
            ])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4
        );
        // ECN only rides on TSO.
        assert_eq!(
            tun_offload_flags(f(&[
                vn::VIRTIO_NET_F_GUEST_CSUM,
                vn::VIRTIO_NET_F_GUEST_ECN
            ])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tun_offload_flags(device_features(true)),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        // Host-side (guest tx) features do not change what the tap sends.
        assert_eq!(
            tun_offload_flags(f(&[vn::VIRTIO_NET_F_CSUM, vn::VIRTIO_NET_F_HOST_TSO4])),
            0
        );
        assert_eq!(device_features(false) & OFFLOAD_FEATURES, 0);
    }

    #[test]
    fn tx_headers_need_their_features() {
        let all = device_features(true);
        let none = BASE_FEATURES;
        assert_eq!(hdr(0, GSO_NONE, 0).check_tx(none), Ok(()));
        assert_eq!(
            hdr(F_NEEDS_CSUM, GSO_NONE, 0).check_tx(none),
            Err(HeaderError::CsumNotNegotiated(F_NEEDS_CSUM))
        );
        assert_eq!(hdr(F_NEEDS_CSUM, GSO_NONE, 0).check_tx(all), Ok(()));
        assert_eq!(
            hdr(F_DATA_VALID, GSO_NONE, 0).check_tx(all),
            Err(HeaderError::Flags(F_DATA_VALID))
        );
        assert_eq!(hdr(F_NEEDS_CSUM, GSO_TCPV4, 1448).check_tx(all), Ok(()));
        assert_eq!(hdr(F_NEEDS_CSUM, GSO_TCPV6, 1428).check_tx(all), Ok(()));
        assert_eq!(
            hdr(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 1448).check_tx(all),
            Ok(())
        );
        let csum_only = none | bit(vn::VIRTIO_NET_F_CSUM);
        assert_eq!(
            hdr(F_NEEDS_CSUM, GSO_TCPV4, 1448).check_tx(csum_only),
            Err(HeaderError::Gso(GSO_TCPV4))
        );
        let tso4 = csum_only | bit(vn::VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(
            hdr(F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 1448).check_tx(tso4),
            Err(HeaderError::Gso(GSO_TCPV4 | GSO_ECN))
        );
        // UDP/UFO and unknown types are never allowed.
        for t in [3, 5, 0x7f] {
            assert_eq!(
                hdr(F_NEEDS_CSUM, t, 1000).check_tx(all),
                Err(HeaderError::Gso(t))
            );
        }
        // GSO needs a segment size and a checksum request.
        assert!(matches!(
            hdr(F_NEEDS_CSUM, GSO_TCPV4, 0).check_tx(all),
            Err(HeaderError::GsoFields { .. })
        ));
        assert!(matches!(
            hdr(0, GSO_TCPV4, 1448).check_tx(all),
            Err(HeaderError::GsoFields { .. })
        ));
    }

    #[test]
    fn rx_headers_and_their_fix_up() {
        let all = device_features(true);
        assert_eq!(hdr(0, GSO_TCPV4, 1448).check_rx(all), Ok(()));
        assert_eq!(
            hdr(0, GSO_TCPV4, 1448).check_rx(BASE_FEATURES),
            Err(HeaderError::Gso(GSO_TCPV4))
        );
        assert_eq!(hdr(0, 3, 1448).check_rx(all), Err(HeaderError::Gso(3)));

        let mut packet = [F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb, 0x42];
        prepare_rx_header(&mut packet, all, 3);
        assert_eq!(
            &packet[..],
            &[F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0x42]
        );
        prepare_rx_header(&mut packet, BASE_FEATURES, 1);
        assert_eq!(packet[0], 0, "no checksum hints without GUEST_CSUM");
        assert_eq!(&packet[10..12], &[1, 0]);
        // Too short: left alone, no panic.
        let mut short = [7u8; 5];
        prepare_rx_header(&mut short, all, 1);
        assert_eq!(short, [7; 5]);
    }
}
