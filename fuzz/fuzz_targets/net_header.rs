//! The virtio-net header rules under any negotiated features: parsing and
//! writing round-trip, `check_tx` lets through only what the guest acked,
//! `check_rx` only GSO kinds the guest can take, the rx header rewrite
//! touches only what it must; and MAC parsing round-trips.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_net as vn;

use vmm_core::virtio::net::header::{
    has, prepare_rx_header, tun_offload_flags, NetHeader, F_NEEDS_CSUM, GSO_ECN, GSO_NONE,
    GSO_TCPV4, GSO_TCPV6, NUM_BUFFERS_OFFSET,
};
use vmm_core::virtio::net::{format_mac, parse_mac, VNET_HDR_LEN};

#[derive(Arbitrary, Debug)]
struct Input {
    bytes: Vec<u8>,
    acked: u64,
    num_buffers: u16,
    mac: String,
}

fuzz_target!(|input: Input| {
    let acked = input.acked;
    match NetHeader::parse(&input.bytes) {
        Err(_) => assert!(input.bytes.len() < VNET_HDR_LEN),
        Ok(h) => {
            let mut out = [0u8; VNET_HDR_LEN];
            h.write(&mut out);
            assert_eq!(out[..], input.bytes[..VNET_HDR_LEN]);
            assert_eq!(NetHeader::parse(&out), Ok(h));

            if h.check_tx(acked).is_ok() {
                assert_eq!(h.flags & !F_NEEDS_CSUM, 0);
                if h.flags & F_NEEDS_CSUM != 0 {
                    assert!(has(acked, vn::VIRTIO_NET_F_CSUM));
                }
                if h.gso_type != GSO_NONE {
                    assert!(h.gso_size > 0 && h.flags & F_NEEDS_CSUM != 0);
                    match h.gso_type & !GSO_ECN {
                        GSO_TCPV4 => assert!(has(acked, vn::VIRTIO_NET_F_HOST_TSO4)),
                        GSO_TCPV6 => assert!(has(acked, vn::VIRTIO_NET_F_HOST_TSO6)),
                        other => panic!("GSO type {other:#x} let through"),
                    }
                    if h.gso_type & GSO_ECN != 0 {
                        assert!(has(acked, vn::VIRTIO_NET_F_HOST_ECN));
                    }
                }
            }
            if h.check_rx(acked).is_ok() && h.gso_type != GSO_NONE {
                match h.gso_type & !GSO_ECN {
                    GSO_TCPV4 => assert!(has(acked, vn::VIRTIO_NET_F_GUEST_TSO4)),
                    GSO_TCPV6 => assert!(has(acked, vn::VIRTIO_NET_F_GUEST_TSO6)),
                    other => panic!("GSO type {other:#x} let through"),
                }
                if h.gso_type & GSO_ECN != 0 {
                    assert!(has(acked, vn::VIRTIO_NET_F_GUEST_ECN));
                }
            }
        }
    }

    let mut packet = input.bytes.clone();
    prepare_rx_header(&mut packet, acked, input.num_buffers);
    assert_eq!(packet.len(), input.bytes.len());
    if packet.len() >= VNET_HDR_LEN {
        let h = NetHeader::parse(&packet).expect("long enough");
        assert_eq!(h.num_buffers, input.num_buffers);
        if !has(acked, vn::VIRTIO_NET_F_GUEST_CSUM) {
            assert_eq!(h.flags, 0);
        }
        assert_eq!(
            packet[1..NUM_BUFFERS_OFFSET],
            input.bytes[1..NUM_BUFFERS_OFFSET]
        );
        assert_eq!(packet[VNET_HDR_LEN..], input.bytes[VNET_HDR_LEN..]);
    } else {
        assert_eq!(packet, input.bytes);
    }

    let tun = tun_offload_flags(acked);
    if tun != 0 {
        assert!(has(acked, vn::VIRTIO_NET_F_GUEST_CSUM));
    }

    if let Some(mac) = parse_mac(&input.mac) {
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
    }
});
