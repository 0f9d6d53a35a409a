//! virtio-net tx and rx processing over a socketpair standing in for the
//! tap (same framing, no offloads): guest chains of any shape on both
//! queues, frames of any bytes from the host side, any negotiated subset
//! of the offered features.
//!
//! Oracles: every frame that reaches the tap has a header `check_tx`
//! accepts for the acked features and fits the largest packet; the device
//! never reports writing more into an rx chain than the chain holds.

#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

use arrow_fuzz::{fill_data, guest_memory, publish, Desc, RINGS};
use vmm_core::devices::irq::IrqLine;
use vmm_core::fuzzing::{net_process_rx, net_process_tx, GuestQueue};
use vmm_core::virtio::net::header::NetHeader;
use vmm_core::virtio::net::{Tap, VirtioNet, MAX_PACKET_LEN, VNET_HDR_LEN};
use vmm_core::virtio::{Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A frame from the guest: bytes at DATA, then a chain.
    Tx { data: Vec<u8>, descs: Vec<Desc> },
    /// Rx buffers from the guest.
    RxBuffers { descs: Vec<Desc> },
    /// A frame from the host side of the tap.
    HostFrame(Vec<u8>),
    /// The device's rx work.
    Rx,
}

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both descriptors were just created and are owned here.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Capacity of the rx chain at `head` as published (writable bytes).
fn used_entries(q: &mut GuestQueue<'_>) -> Vec<(u32, u32)> {
    q.take_used()
}

fuzz_target!(|input: (u64, Vec<Op>)| {
    let (features, ops) = input;
    if ops.len() > 64 {
        return;
    }
    let (dev_end, host_end) = socketpair();
    let tap = Tap::from_datagram_socket(dev_end, "fuzz0").expect("datagram tap");
    let mut dev = VirtioNet::new(tap, [2, 0, 0, 0, 0, 1], 1500).expect("device");
    let acked = features & dev.avail_features();
    dev.set_acked_features(acked);
    let mem = guest_memory();
    let mut rxq = GuestQueue::new(&mem, RINGS);
    let mut txq = GuestQueue::new(&mem, RINGS + 0x1000);
    let irq = IrqLine::new(5, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    dev.activate(
        mem.clone(),
        Arc::new(Interrupt::new(irq)),
        vec![
            rxq.mock.create_queue().expect("queue"),
            txq.mock.create_queue().expect("queue"),
        ],
    )
    .expect("activation");
    // Writable capacity of each published rx chain, by head.
    let mut rx_capacity = std::collections::HashMap::new();
    // Once the driver's table wraps, a slot may hold another chain's
    // descriptor than the one recorded: stop checking capacities then.
    let mut published = 0usize;

    for op in ops {
        match op {
            Op::Tx { data, descs } => {
                if descs.is_empty() || descs.len() > 16 {
                    continue;
                }
                fill_data(&mem, &data);
                publish(&mut txq, &descs);
                net_process_tx(&mut dev);
                let mut buf = vec![0u8; MAX_PACKET_LEN + 1];
                loop {
                    // SAFETY: `buf` is writable for its length.
                    let n = unsafe {
                        libc::recv(
                            host_end.as_raw_fd(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            libc::MSG_DONTWAIT,
                        )
                    };
                    if n < 0 {
                        break;
                    }
                    let frame = &buf[..n as usize];
                    assert!(frame.len() > VNET_HDR_LEN && frame.len() <= MAX_PACKET_LEN);
                    let h = NetHeader::parse(frame).expect("a header");
                    assert!(
                        h.check_tx(acked).is_ok(),
                        "unchecked header {h:?} reached the tap"
                    );
                }
            }
            Op::RxBuffers { descs } => {
                if descs.is_empty() || descs.len() > 16 {
                    continue;
                }
                let cap: u64 = descs
                    .iter()
                    .filter(|d| d.write)
                    .map(|d| u64::from(d.len))
                    .sum();
                let head = publish(&mut rxq, &descs);
                // Only plain chains: `next` and indirect tables can make
                // the device see other descriptors than these.
                let plain = descs.iter().enumerate().all(|(i, d)| {
                    !d.indirect && d.next_index.is_none() && d.next == (i + 1 < descs.len())
                });
                published += descs.len();
                if published > usize::from(vmm_core::fuzzing::QSIZE) {
                    rx_capacity.values_mut().for_each(|c| *c = None);
                }
                let fresh = published <= usize::from(vmm_core::fuzzing::QSIZE);
                rx_capacity.insert(u32::from(head), (plain && fresh).then_some(cap));
            }
            Op::HostFrame(frame) => {
                // SAFETY: `frame` is readable for its length.
                unsafe {
                    libc::send(
                        host_end.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                    );
                }
            }
            Op::Rx => {
                net_process_rx(&mut dev);
                for (head, len) in used_entries(&mut rxq) {
                    if let Some(Some(cap)) = rx_capacity.get(&head) {
                        assert!(
                            u64::from(len) <= *cap,
                            "wrote {len} into a {cap}-byte chain"
                        );
                    }
                }
            }
        }
    }
});
