//! vsock packets from guest descriptor chains: `VsockPacket::from_tx_chain`
//! on a chain the driver wrote any way it liked, and the rx writer into
//! another. A parsed packet must be exactly what its header says; a write
//! must succeed exactly when the chain has room and put the header first.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::Bytes;

use arrow_fuzz::{fill_data, guest_memory, publish, Desc, RINGS};
use vmm_core::fuzzing::GuestQueue;
use vmm_core::virtio::vsock::packet::{Direction, GuestBuffers, VsockHeader, VsockPacket};
use vmm_core::virtio::vsock::{MAX_PKT_BUF_SIZE, VSOCK_PKT_HDR_SIZE};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Bytes the tx chain points at (header and payload).
    data: Vec<u8>,
    tx: Vec<Desc>,
    rx: Vec<Desc>,
    /// A packet for the rx writer.
    rx_hdr: [u8; VSOCK_PKT_HDR_SIZE],
    rx_payload_len: u16,
}

fuzz_target!(|input: Input| {
    if input.tx.is_empty() || input.rx.is_empty() || input.tx.len() > 64 || input.rx.len() > 64 {
        return;
    }
    let mem = guest_memory();
    fill_data(&mem, &input.data);

    let mut txq = GuestQueue::new(&mem, RINGS);
    publish(&mut txq, &input.tx);
    let mut q: virtio_queue::Queue = txq.mock.create_queue().expect("valid mock queue");
    if let Some(chain) = q.pop_descriptor_chain(&mem) {
        if let Ok(pkt) = VsockPacket::from_tx_chain(chain) {
            assert_eq!(pkt.data.len(), pkt.hdr.len as usize);
            assert!(pkt.data.len() <= MAX_PKT_BUF_SIZE);
        }
    }

    let mut rxq = GuestQueue::new(&mem, RINGS + 0x1000);
    publish(&mut rxq, &input.rx);
    let mut q: virtio_queue::Queue = rxq.mock.create_queue().expect("valid mock queue");
    let Some(chain) = q.pop_descriptor_chain(&mem) else {
        return;
    };
    let first = chain.clone().next();
    let Ok(bufs) = GuestBuffers::from_chain(chain, Direction::DeviceWritable) else {
        return;
    };
    let payload = usize::from(input.rx_payload_len).min(MAX_PKT_BUF_SIZE);
    let pkt = VsockPacket {
        hdr: VsockHeader::from_bytes(&input.rx_hdr),
        data: vec![0xa5; payload],
    };
    let needed = VSOCK_PKT_HDR_SIZE + payload;
    match pkt.write_to(&mem, &bufs) {
        Ok(n) => {
            assert!(needed <= bufs.len());
            assert_eq!(n as usize, needed);
            // The header lands first; when the first descriptor holds the
            // whole packet (no later descriptor can alias it), it reads
            // back as written, with `len` set.
            if let Some(d) = first.filter(|d| d.len() as usize >= needed) {
                let mut b = [0u8; VSOCK_PKT_HDR_SIZE];
                mem.read_slice(&mut b, d.addr())
                    .expect("validated descriptor");
                let mut want = pkt.hdr;
                want.len = payload as u32;
                assert_eq!(VsockHeader::from_bytes(&b), want);
            }
        }
        Err(_) => assert!(needed > bufs.len()),
    }
});
