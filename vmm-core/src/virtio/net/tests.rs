//! Device tests: a fake guest driver on real guest memory, one end of a
//! datagram socketpair as the tap (one datagram = header + frame), the
//! device driven directly or from a real event manager.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventSet, SubscriberOps};
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::{VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::header::{device_features, NetHeader, BASE_FEATURES, F_NEEDS_CSUM, GSO_TCPV4};
use super::*;
use crate::devices::irq::IrqLine;
use crate::virtio::test_utils::{new_mem, GuestQueue, MEM_SIZE, QSIZE};
use crate::virtio::{GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

const MAC: [u8; 6] = [0x02, 0xa7, 0x72, 0, 0, 1];

/// The fake guest and the host's end of the fake tap.
struct Guest<'a> {
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    dev: Arc<Mutex<VirtioNet>>,
    irq: EventFd,
    host: UnixDatagram,
}

fn fake_tap() -> (Tap, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    (Tap::from_datagram_socket(a.into(), "fake0").unwrap(), b)
}

impl<'a> Guest<'a> {
    /// A device over a fake tap, `acked` negotiated, activated on fresh
    /// queues in `mem`.
    fn start(mem: &'a GuestMemory, acked: u64) -> Self {
        let (tap, host) = fake_tap();
        let mut dev = VirtioNet::new(tap, MAC, 1500).unwrap();
        dev.set_acked_features(acked | (1 << VIRTIO_F_VERSION_1));
        let rx = GuestQueue::new(mem, 0x1_0000);
        let tx = GuestQueue::new(mem, 0x2_0000);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(IrqLine::new(5, irq.try_clone().unwrap())));
        dev.activate(
            mem.clone(),
            interrupt,
            vec![
                rx.mock.create_queue().unwrap(),
                tx.mock.create_queue().unwrap(),
            ],
        )
        .unwrap();
        Self {
            rx,
            tx,
            dev: Arc::new(Mutex::new(dev)),
            irq,
            host,
        }
    }

    fn dev(&self) -> std::sync::MutexGuard<'_, VirtioNet> {
        self.dev.lock().unwrap()
    }

    /// Interrupts raised since the last call.
    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    fn recv_host(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_PACKET_LEN + 16];
        match self.host.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }
}

/// A 12-byte header with `flags`, `gso_type`, `gso_size`.
fn hdr(flags: u8, gso_type: u8, gso_size: u16) -> Vec<u8> {
    let mut h = vec![0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[test]
fn identity_config_space_and_features() {
    let (tap, _host) = fake_tap();
    let mut dev = VirtioNet::new(tap, MAC, 9000).unwrap();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 2]);
    assert_eq!(dev.queue_events().len(), 2);
    // A fake tap has no offloads: only the base features are offered.
    assert_eq!(dev.avail_features(), BASE_FEATURES);
    for bit in [
        vn::VIRTIO_NET_F_MAC,
        vn::VIRTIO_NET_F_MTU,
        vn::VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(dev.avail_features() & (1 << bit), 0, "bit {bit}");
    }
    let mut cfg = [0xffu8; CONFIG_SPACE_SIZE];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(&cfg[6..8], &[0, 0], "status");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000, "mtu");
    let mut mtu = [0u8; 2];
    dev.read_config(10, &mut mtu);
    assert_eq!(u16::from_le_bytes(mtu), 9000);
    // Out of range and straddling reads are zeroes; writes are ignored.
    let mut b = [0xffu8; 4];
    dev.read_config(10, &mut b);
    assert_eq!(b, [0; 4]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    dev.write_config(0, &[0xaa; 6]);
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(device_features(true) & BASE_FEATURES, BASE_FEATURES);
}

#[test]
fn bad_macs_and_mtus_are_refused() {
    for mac in [[0u8; 6], [1, 0, 0, 0, 0, 1], [0xff; 6]] {
        let (tap, _h) = fake_tap();
        assert!(matches!(
            VirtioNet::new(tap, mac, 1500),
            Err(NetError::InvalidMac(_))
        ));
    }
    for mtu in [0, 67, MAX_MTU + 1] {
        let (tap, _h) = fake_tap();
        assert!(matches!(
            VirtioNet::new(tap, MAC, mtu),
            Err(NetError::InvalidMtu(m)) if m == mtu
        ));
    }
    assert_eq!(parse_mac("02:a7:72:00:00:01"), Some(MAC));
    assert_eq!(parse_mac("02-A7-72-0-0-1"), Some(MAC));
    for bad in [
        "",
        "02:a7:72:00:00",
        "02:a7:72:00:00:01:02",
        "02:a7:72:00:00:g1",
        "002:a7:72:00:00:01",
    ] {
        assert_eq!(parse_mac(bad), None, "{bad}");
    }
    assert_eq!(format_mac(&MAC), "02:a7:72:00:00:01");
}

#[test]
fn tx_gathers_header_and_frame_into_one_tap_write_per_chain() {
    let mem = new_mem();
    let mut g = Guest::start(&mem, BASE_FEATURES);
    let f1 = frame(60, 1);
    let f2 = frame(1514, 2);
    // Header and frame in separate descriptors, as Linux sends them...
    mem.write_slice(&hdr(0, 0, 0), GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&f1, GuestAddress(0x10_1000)).unwrap();
    g.tx.add_chain(&[(0x10_0000, 12, false), (0x10_1000, 60, false)]);
    // ...or together, split at an odd place, header across descriptors.
    let mut packet = hdr(0, 0, 0);
    packet.extend_from_slice(&f2);
    mem.write_slice(&packet[..5], GuestAddress(0x11_0000))
        .unwrap();
    mem.write_slice(&packet[5..], GuestAddress(0x12_0000))
        .unwrap();
    g.tx.add_chain(&[
        (0x11_0000, 5, false),
        (0x12_0000, packet.len() as u32 - 5, false),
    ]);
    assert!(g.dev().process_tx());
    assert_eq!(g.interrupts(), 1, "one interrupt for the batch");
    let got1 = g.recv_host().unwrap();
    assert_eq!(&got1[..12], &hdr(0, 0, 0)[..]);
    assert_eq!(&got1[12..], &f1[..]);
    assert_eq!(g.recv_host().unwrap(), packet);
    assert!(g.recv_host().is_none());
    assert_eq!(g.tx.take_used(), vec![(0, 0), (2, 0)]);
    let stats = g.dev().stats();
    assert_eq!(
        (stats.tx_frames, stats.tx_bytes, stats.tx_dropped),
        (2, 1574, 0)
    );
    // Nothing queued: no interrupt.
    assert!(!g.dev().process_tx());
    assert_eq!(g.interrupts(), 0);
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted() {
    let mem = new_mem();
    let mut g = Guest::start(&mem, BASE_FEATURES);
    let good = {
        let mut p = hdr(0, 0, 0);
        p.extend_from_slice(&frame(100, 3));
        p
    };
    mem.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    mem.write_slice(&hdr(F_NEEDS_CSUM, 0, 0), GuestAddress(0x11_0000))
        .unwrap();
    mem.write_slice(&hdr(F_NEEDS_CSUM, GSO_TCPV4, 1448), GuestAddress(0x12_0000))
        .unwrap();
    let bad: Vec<Vec<(u64, u32, bool)>> = vec![
        // Short header.
        vec![(0x10_0000, 11, false)],
        // Header only.
        vec![(0x10_0000, 12, false)],
        // A device-writable descriptor.
        vec![(0x10_0000, 12, false), (0x10_1000, 100, true)],
        // Outside guest memory, and wrapping around the address space.
        vec![(0x10_0000, 12, false), (MEM_SIZE as u64 - 4, 100, false)],
        vec![(u64::MAX - 3, 112, false)],
        // Longer than any frame.
        vec![(0x10_0000, MAX_PACKET_LEN as u32 + 1, false)],
        // Checksum offload and GSO were not negotiated.
        vec![(0x11_0000, 112, false)],
        vec![(0x12_0000, 112, false)],
    ];
    for chain in &bad {
        g.tx.add_chain(chain);
    }
    // A loop in the descriptor table ends at the queue size.
    let head = g.tx.next_desc;
    g.tx.add_raw(&[
        (0x10_0000, 112, VRING_DESC_F_NEXT as u16, head + 1),
        (0x10_0000, 112, VRING_DESC_F_NEXT as u16, head),
    ]);
    g.tx.add_chain(&[(0x10_0000, good.len() as u32, false)]);
    g.dev().process_tx();
    let used = g.tx.take_used();
    assert_eq!(used.len(), bad.len() + 2, "every chain is returned");
    assert!(used.iter().all(|&(_, len)| len == 0));
    // The looping chain is cut at the queue size (64 descriptors): a
    // bounded frame of its repeated bytes, harmless. Then the good frame.
    let looped = g.recv_host().unwrap();
    assert_eq!(looped.len(), usize::from(QSIZE) * 112);
    assert!(g.recv_host().unwrap() == good);
    assert!(g.recv_host().is_none());
    let stats = g.dev().stats();
    assert_eq!(stats.tx_frames, 2);
    assert_eq!(stats.tx_dropped, bad.len() as u64);
}

#[test]
fn offloaded_tx_headers_pass_when_negotiated() {
    let mem = new_mem();
    let csum_tso = BASE_FEATURES | (1 << vn::VIRTIO_NET_F_CSUM) | (1 << vn::VIRTIO_NET_F_HOST_TSO4);
    let mut g = Guest::start(&mem, csum_tso);
    let mut p = hdr(F_NEEDS_CSUM, GSO_TCPV4, 1448);
    p.extend_from_slice(&frame(3000, 4));
    mem.write_slice(&p, GuestAddress(0x10_0000)).unwrap();
    g.tx.add_chain(&[(0x10_0000, p.len() as u32, false)]);
    g.dev().process_tx();
    assert_eq!(g.recv_host().unwrap(), p, "header passed through as is");
}

/// Posts `n` single-descriptor rx buffers of `size` bytes at `base`.
fn post_rx(g: &mut Guest, n: usize, size: u32, base: u64) {
    for i in 0..n {
        g.rx.add_chain(&[(base + i as u64 * 0x1_0000, size, true)]);
    }
}

fn read_guest(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn rx_spreads_a_frame_over_mergeable_buffers() {
    let mem = new_mem();
    let mut g = Guest::start(&mem, BASE_FEATURES);
    post_rx(&mut g, 4, 1536, 0x20_0000);
    let small = frame(64, 5);
    let big = frame(3000, 6);
    for f in [&small, &big] {
        let mut p = hdr(0, 0, 0);
        p[10] = 0xee; // the tap leaves num_buffers alone
        p.extend_from_slice(f);
        g.host.send(&p).unwrap();
    }
    assert!(g.dev().process_rx());
    assert_eq!(g.interrupts(), 1, "one interrupt for the batch");
    // 12 + 64 in the first buffer; 12 + 3000 over the next two.
    assert_eq!(g.rx.take_used(), vec![(0, 76), (1, 1536), (2, 1476)]);
    let first = read_guest(&mem, 0x20_0000, 76);
    assert_eq!(&first[10..12], &[1, 0], "num_buffers 1");
    assert_eq!(&first[12..], &small[..]);
    let second = read_guest(&mem, 0x21_0000, 1536);
    assert_eq!(&second[10..12], &[2, 0], "num_buffers 2");
    let mut got = second[12..].to_vec();
    got.extend(read_guest(&mem, 0x22_0000, 1476));
    assert_eq!(got, big);
    let stats = g.dev().stats();
    assert_eq!((stats.rx_frames, stats.rx_bytes), (2, 3064));
}

/// A guest that takes TSO4 with checksum hints (so rx coalesces), with
/// eight 1536-byte rx buffers posted.
fn tso_guest(mem: &GuestMemory) -> Guest<'_> {
    let tso = (1 << vn::VIRTIO_NET_F_GUEST_CSUM) | (1 << vn::VIRTIO_NET_F_GUEST_TSO4);
    let mut g = Guest::start(mem, BASE_FEATURES | tso);
    post_rx(&mut g, 8, 1536, 0x20_0000);
    g
}

#[test]
fn queued_segments_of_one_flow_reach_the_guest_as_one_gso_frame() {
    use super::coalesce::{tcp_segment, TCP_ACK, TCP_PSH};
    // The last byte of the TCP ACK number, behind the virtio-net, Ethernet
    // and IPv4 headers.
    const TCP_ACK_NUMBER_AT: usize = 12 + 14 + 20 + 11;
    let mem = new_mem();
    let mut g = tso_guest(&mem);
    let mss = 1448;
    let frames = [
        tcp_segment(0, &frame(mss, 1), TCP_ACK, 5),
        tcp_segment(mss as u32, &frame(mss, 2), TCP_ACK | TCP_PSH, 6),
        // Not part of it: another flow's (other ACK number).
        tcp_segment(2 * mss as u32, &frame(mss, 3), TCP_ACK, 6),
    ];
    let mut frames = frames;
    frames[2][TCP_ACK_NUMBER_AT] ^= 1;
    for f in &frames {
        g.host.send(f).unwrap();
    }
    assert!(g.dev().process_rx());
    let used = g.rx.take_used();
    // 12 + 14 + 20 + 32 + 2 * 1448 = 2974 bytes over two buffers, then the
    // third segment (1526 bytes) in one.
    assert_eq!(used, vec![(0, 1536), (1, 1438), (2, 1526)]);
    let merged = read_guest(&mem, 0x20_0000, 12);
    let hdr = NetHeader::parse(&merged).unwrap();
    assert_eq!(
        (hdr.gso_type, hdr.gso_size, hdr.num_buffers),
        (GSO_TCPV4, 1448, 2)
    );
    let stats = g.dev().stats();
    assert_eq!((stats.rx_frames, stats.rx_coalesced), (2, 1));
    assert_eq!(stats.rx_bytes, 2962 + 1514);
}

#[test]
fn frames_wait_in_the_tap_while_the_guest_polls_then_come_merged() {
    use super::coalesce::{tcp_segment, TCP_ACK};
    let mem = new_mem();
    let mut g = tso_guest(&mem);
    // The driver turned the rx interrupt off: it is still working through
    // earlier frames.
    let flags = g.rx.mock.avail_addr();
    mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, flags)
        .unwrap();
    for i in 0..3u32 {
        g.host
            .send(&tcp_segment(i * 1000, &frame(1000, 1), TCP_ACK, 5))
            .unwrap();
    }
    assert!(!g.dev().process_rx(), "held while the guest polls");
    assert!(!g.dev().process_rx(), "still held at the recheck");
    assert!(g.rx.take_used().is_empty());
    assert_eq!(g.dev().stats().rx_held, 1, "one hold, rechecked");
    // It turned the interrupt back on: all three arrive as one frame.
    mem.write_obj(0u16, flags).unwrap();
    assert!(g.dev().process_rx());
    assert_eq!(
        g.rx.take_used().len(),
        3,
        "12 + 66 + 3000 bytes in three buffers"
    );
    let stats = g.dev().stats();
    assert_eq!((stats.rx_frames, stats.rx_coalesced), (1, 2));
}

#[test]
fn nothing_is_held_while_the_tap_is_empty() {
    let mem = new_mem();
    let g = tso_guest(&mem);
    mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, g.rx.mock.avail_addr())
        .unwrap();
    assert!(!g.dev().process_rx());
    assert_eq!(g.dev().stats().rx_held, 0);
}

#[test]
fn a_guest_that_polls_without_end_still_gets_its_frames() {
    use super::coalesce::{tcp_segment, TCP_ACK};
    let mem = new_mem();
    let mut g = tso_guest(&mem);
    mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, g.rx.mock.avail_addr())
        .unwrap();
    g.host
        .send(&tcp_segment(0, &frame(1000, 1), TCP_ACK, 5))
        .unwrap();
    assert!(!g.dev().process_rx());
    std::thread::sleep(super::device::RX_HOLD_MAX);
    assert!(g.dev().process_rx(), "delivered once held for RX_HOLD_MAX");
    assert_eq!(g.rx.take_used().len(), 1);
}

#[test]
fn without_guest_tso_frames_are_not_coalesced() {
    use super::coalesce::{tcp_segment, TCP_ACK};
    let mem = new_mem();
    let mut g = Guest::start(&mem, BASE_FEATURES | (1 << vn::VIRTIO_NET_F_GUEST_CSUM));
    post_rx(&mut g, 8, 1536, 0x20_0000);
    for i in 0..3u32 {
        g.host
            .send(&tcp_segment(i * 100, &frame(100, 1), TCP_ACK, 5))
            .unwrap();
    }
    assert!(g.dev().process_rx());
    assert_eq!(g.rx.take_used().len(), 3);
    assert_eq!(g.dev().stats().rx_coalesced, 0);
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain_or_is_dropped() {
    let mem = new_mem();
    let mut g = Guest::start(&mem, 0);
    // Small-buffer layout: one chain of header + 1514 bytes... posted as
    // two descriptors.
    g.rx.add_chain(&[(0x20_0000, 12, true), (0x20_1000, 1514, true)]);
    let too_big = frame(2000, 7);
    let fits = frame(1514, 8);
    for f in [&too_big, &fits] {
        let mut p = hdr(0, 0, 0);
        p.extend_from_slice(f);
        g.host.send(&p).unwrap();
    }
    g.dev().process_rx();
    // The big frame is dropped without consuming the buffer.
    assert_eq!(g.rx.take_used(), vec![(0, 1526)]);
    assert_eq!(&read_guest(&mem, 0x20_0000, 12)[10..12], &[1, 0]);
    assert_eq!(read_guest(&mem, 0x20_1000, 1514), fits);
    let stats = g.dev().stats();
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 1));
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_the_frame_dropped() {
    let mem = new_mem();
    let mut g = Guest::start(&mem, BASE_FEATURES);
    // A read-only buffer, one outside memory, one too small for the
    // header: each costs a frame.
    g.rx.add_chain(&[(0x20_0000, 1536, false)]);
    g.rx.add_chain(&[(MEM_SIZE as u64 - 100, 1536, true)]);
    g.rx.add_chain(&[(0x20_0000, 8, true)]);
    // A good first buffer followed by a bad one: the frame needs both.
    g.rx.add_chain(&[(0x21_0000, 100, true)]);
    g.rx.add_chain(&[(0x22_0000, 100, false)]);
    post_rx(&mut g, 1, 1536, 0x30_0000);
    for seed in 0..5 {
        let mut p = hdr(0, 0, 0);
        p.extend_from_slice(&frame(if seed == 3 { 150 } else { 60 }, seed));
        g.host.send(&p).unwrap();
    }
    g.dev().process_rx();
    let used = g.rx.take_used();
    assert_eq!(
        used,
        vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 72)],
        "bad chains come back empty; the last frame lands"
    );
    let stats = g.dev().stats();
    assert_eq!((stats.rx_frames, stats.rx_dropped), (1, 4));
    assert_eq!(&read_guest(&mem, 0x30_0000 + 12, 60)[..], &frame(60, 4)[..]);
}

#[test]
fn rx_waits_for_buffers_and_resumes_on_notify_through_the_event_loop() {
    let mem = new_mem();
    let mut g = Guest::start(&mem, BASE_FEATURES);
    let mut em = EventManager::<Arc<Mutex<VirtioNet>>>::new().unwrap();
    em.add_subscriber(g.dev.clone());
    em.run_with_timeout(0).unwrap();
    assert_eq!(g.dev().tap_interest, Some(EventSet::IN));
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
    for f in &frames {
        let mut p = hdr(0, 0, 0);
        p.extend_from_slice(f);
        g.host.send(&p).unwrap();
    }
    // No buffers: the first frame waits and the tap is not polled.
    em.run_with_timeout(100).unwrap();
    assert!(g.rx.take_used().is_empty());
    assert_eq!(g.dev().tap_interest, None);
    assert!(g.dev().stats().rx_deferred >= 1);
    // Nothing spins meanwhile.
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    // One buffer and a notify: one frame, then it waits again.
    post_rx(&mut g, 1, 1536, 0x20_0000);
    g.dev().queue_events()[RXQ_INDEX].write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(g.rx.take_used(), vec![(0, 112)]);
    assert_eq!(read_guest(&mem, 0x20_0000 + 12, 100), frames[0]);
    // Enough buffers: the rest arrive, and the tap is polled again.
    post_rx(&mut g, 4, 1536, 0x30_0000);
    g.dev().queue_events()[RXQ_INDEX].write(1).unwrap();
    for _ in 0..3 {
        em.run_with_timeout(50).unwrap();
    }
    assert_eq!(g.rx.take_used(), vec![(1, 113), (2, 114)]);
    assert_eq!(g.dev().tap_interest, Some(EventSet::IN));
    // A new frame is picked up by EPOLLIN alone.
    let mut p = hdr(0, 0, 0);
    p.extend_from_slice(&frame(70, 9));
    g.host.send(&p).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(g.rx.take_used(), vec![(3, 82)]);
    assert_eq!(g.dev().stats().rx_frames, 4);
    assert!(g.interrupts() >= 1);
    // Tx through the loop as well.
    let mut p = hdr(0, 0, 0);
    p.extend_from_slice(&frame(80, 10));
    mem.write_slice(&p, GuestAddress(0x40_0000)).unwrap();
    g.tx.add_chain(&[(0x40_0000, p.len() as u32, false)]);
    g.dev().queue_events()[TXQ_INDEX].write(1).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(g.recv_host().unwrap(), p);
}

#[test]
fn reset_stops_polling_the_tap_and_drops_a_waiting_frame() {
    let mem = new_mem();
    let g = Guest::start(&mem, BASE_FEATURES);
    let mut em = EventManager::<Arc<Mutex<VirtioNet>>>::new().unwrap();
    em.add_subscriber(g.dev.clone());
    let mut p = hdr(0, 0, 0);
    p.extend_from_slice(&frame(60, 1));
    g.host.send(&p).unwrap();
    em.run_with_timeout(50).unwrap();
    assert_eq!(g.dev().tap_interest, None, "waiting for buffers");
    g.dev().reset();
    assert!(!g.dev().is_activated());
    assert_eq!(g.dev().acked_features(), 0);
    em.run_with_timeout(50).unwrap();
    assert_eq!(g.dev().tap_interest, None);
    assert!(!g.dev().process_rx());
}

#[test]
fn snapshot_state_round_trip_on_a_new_tap() {
    let (tap, _h) = fake_tap();
    let mut dev = VirtioNet::new(tap, MAC, 1400).unwrap();
    let acked = BASE_FEATURES | (1 << VIRTIO_F_VERSION_1);
    dev.set_acked_features(acked);
    let state = dev.save();
    assert_eq!(
        state,
        VirtioNetState {
            mac: MAC,
            mtu: 1400,
            acked_features: acked
        }
    );
    let bytes = postcard::to_stdvec(&state).unwrap();
    let back: VirtioNetState = postcard::from_bytes(&bytes).unwrap();
    let (tap2, _h2) = fake_tap();
    let restored = VirtioNet::restore(&back, tap2).unwrap();
    assert_eq!(restored.save(), state);
    assert!(!restored.is_activated());

    // Offloads the new tap cannot do: refused.
    let mut offloaded = state.clone();
    offloaded.acked_features |= 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
    let (tap3, _h3) = fake_tap();
    assert!(matches!(
        VirtioNet::restore(&offloaded, tap3),
        Err(NetError::UnofferedFeatures { .. })
    ));
    let mut bad_mac = state;
    bad_mac.mac = [0xff; 6];
    let (tap4, _h4) = fake_tap();
    assert!(matches!(
        VirtioNet::restore(&bad_mac, tap4),
        Err(NetError::InvalidMac(_))
    ));
}
