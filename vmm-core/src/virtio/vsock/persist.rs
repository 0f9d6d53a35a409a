//! Snapshot state of the vsock device.
//!
//! It exists so a template VM's vsock device comes back in a clone: the
//! guest CID, the negotiated features and where host-port allocation stands.
//! Queues belong to the transport's state (`virtio/persist.rs`), which
//! re-activates the device. Host connections are not carried over: the
//! restored device listens on a new Unix socket and starts with none, and
//! the VM builder then calls [`VirtioVsock::send_transport_reset`] so the
//! guest drops the connections it still believes in.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{VirtioVsock, VsockError, HOST_PORT_FIRST};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// The saved state of a [`VirtioVsock`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub cid: u64,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The next host port for host-initiated connections. Carried over so
    /// a clone's first connections do not reuse the ports of the
    /// template's, which the guest may not have dropped yet when they
    /// arrive (the reset event and rx are separate queues).
    pub next_host_port: u32,
}

impl VirtioVsock {
    /// Saves the device's state.
    pub fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid(),
            acked_features: self.acked_features(),
            next_host_port: self.muxer.next_host_port(),
        }
    }

    /// Rebuilds the device from `state`, listening on `uds_path` (which
    /// must not exist). The device is not active and has no connections;
    /// the transport's restore activates it.
    pub fn restore(state: &VsockState, uds_path: impl AsRef<Path>) -> Result<Self, VsockError> {
        if !(HOST_PORT_FIRST..u32::MAX).contains(&state.next_host_port) {
            return Err(VsockError::InvalidHostPort(state.next_host_port));
        }
        // Checked before the listener exists, so a bad state leaves no
        // socket file behind.
        let mut dev = Self::new(state.cid, uds_path)?;
        let offered = dev.avail_features() | (1u64 << VIRTIO_F_VERSION_1);
        if state.acked_features & !offered != 0 {
            return Err(VsockError::UnofferedFeatures {
                acked: state.acked_features,
                offered,
            });
        }
        dev.set_acked_features(state.acked_features);
        dev.muxer.set_next_host_port(state.next_host_port);
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    use event_manager::SubscriberOps;
    use virtio_bindings::virtio_mmio as regs;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::super::tests::{
        read_available, temp_path, Em, Guest, Harness, GUEST_CID, MEM_SIZE, QSIZE,
    };
    use super::super::*;
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::irq::IrqLine;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::persist::MmioTransportState;
    use crate::virtio::{status, GuestMemory};

    const FULL: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn notify(t: &mut MmioTransport, queue: usize) {
        wr(t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32);
    }

    /// What the guest's virtio_mmio + vsock drivers do at probe.
    fn driver_init(t: &mut MmioTransport, g: &Guest) {
        wr(t, regs::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        wr(
            t,
            regs::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(t, regs::VIRTIO_MMIO_STATUS, FULL & !status::DRIVER_OK);
        for (i, q) in [&g.rx, &g.tx, &g.ev].into_iter().enumerate() {
            wr(t, regs::VIRTIO_MMIO_QUEUE_SEL, i as u32);
            wr(t, regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
            wr(
                t,
                regs::VIRTIO_MMIO_QUEUE_DESC_LOW,
                q.mock.desc_table_addr().0 as u32,
            );
            wr(
                t,
                regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                q.mock.avail_addr().0 as u32,
            );
            wr(
                t,
                regs::VIRTIO_MMIO_QUEUE_USED_LOW,
                q.mock.used_addr().0 as u32,
            );
            wr(t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
        }
        wr(t, regs::VIRTIO_MMIO_STATUS, FULL);
        assert_eq!(t.device_status(), FULL);
    }

    /// A new "process": guest memory copied from the template's, as the
    /// clone maps it from the snapshot file.
    fn copy_memory(from: &GuestMemory) -> GuestMemory {
        let mut bytes = vec![0u8; MEM_SIZE];
        from.read_slice(&mut bytes, GuestAddress(0)).unwrap();
        let to = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        to.write_slice(&bytes, GuestAddress(0)).unwrap();
        to
    }

    #[test]
    fn state_round_trip_and_validation() {
        let path = temp_path("persist-state");
        let mut dev = VirtioVsock::new(0x1234, &path).unwrap();
        dev.set_acked_features(1 << 32);
        dev.muxer.set_next_host_port(HOST_PORT_FIRST + 7);
        let state = dev.save();
        assert_eq!(
            state,
            VsockState {
                cid: 0x1234,
                acked_features: 1 << 32,
                next_host_port: HOST_PORT_FIRST + 7,
            }
        );
        let bytes = postcard::to_allocvec(&state).unwrap();
        let back: VsockState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, state);

        // The old path is still taken; a new one works.
        assert!(matches!(
            VirtioVsock::restore(&back, &path),
            Err(VsockError::Listen { .. })
        ));
        let path2 = temp_path("persist-state2");
        let r = VirtioVsock::restore(&back, &path2).unwrap();
        assert_eq!(r.save(), state);
        assert_eq!(r.uds_path(), path2.as_path());
        assert!(!r.is_activated());
        assert_eq!(r.muxer.connection_count(), 0);
        drop(r);
        assert!(!path2.exists());

        let bad = [
            VsockState {
                cid: 2,
                ..state.clone()
            },
            VsockState {
                cid: u64::from(u32::MAX),
                ..state.clone()
            },
            VsockState {
                acked_features: (1 << 32) | 1,
                ..state.clone()
            },
            VsockState {
                next_host_port: 5,
                ..state.clone()
            },
            VsockState {
                next_host_port: u32::MAX,
                ..state.clone()
            },
        ];
        for s in bad {
            let p = temp_path("persist-bad");
            assert!(VirtioVsock::restore(&s, &p).is_err(), "{s:?}");
            assert!(!p.exists(), "no socket left behind for {s:?}");
        }
    }

    #[test]
    fn clone_continues_rings_and_resets_transport() {
        // --- The template process. ---
        let mut h = Harness::new("persist-tmpl");
        let mem = h.mem.clone();
        let mut g = Guest::new(&mem);
        let irq = IrqLine::new(5, h.irq.try_clone().unwrap());
        let mut t = MmioTransport::new(mem.clone(), h.dev.clone(), irq);
        driver_init(&mut t, &g);
        // Linux posts event buffers at probe and refills rx as it goes.
        g.post_events(4);
        g.post_rx(8);
        notify(&mut t, EVQ_INDEX);
        notify(&mut t, RXQ_INDEX);

        // CONNECT / REQUEST / RESPONSE / data, through the transport.
        let mut client = UnixStream::connect(&h.path).unwrap();
        client.set_nonblocking(true).unwrap();
        client.write_all(b"CONNECT 1234\n").unwrap();
        h.pump(&mut g, |g| !g.received.is_empty());
        let (req, _) = g.received.remove(0);
        assert_eq!(req.op, op::REQUEST);
        let old_port = req.src_port;
        g.send(op::RESPONSE, 1234, old_port, 0, b"");
        notify(&mut t, TXQ_INDEX);
        let mut got = Vec::new();
        h.pump(&mut g, |_| {
            read_available(&mut client, &mut got);
            got.ends_with(b"\n")
        });
        assert_eq!(got, format!("OK {old_port}\n").as_bytes());
        client.write_all(b"to guest").unwrap();
        h.pump(&mut g, |g| !g.received.is_empty());
        assert_eq!(g.received.remove(0).1, b"to guest");
        g.send(op::RW, 1234, old_port, 0, b"to host");
        notify(&mut t, TXQ_INDEX);
        let mut got = Vec::new();
        h.pump(&mut g, |_| {
            read_available(&mut client, &mut got);
            got.len() >= 7
        });
        assert_eq!(got, b"to host");
        assert_eq!(h.dev.lock().unwrap().muxer.connection_count(), 1);

        // --- Snapshot, mid-connection. ---
        let t_bytes = postcard::to_allocvec(&t.save()).unwrap();
        let v_bytes = postcard::to_allocvec(&h.dev.lock().unwrap().save()).unwrap();
        let snapshot_mem = copy_memory(&mem);
        let t_state: MmioTransportState = postcard::from_bytes(&t_bytes).unwrap();
        let v_state: VsockState = postcard::from_bytes(&v_bytes).unwrap();
        assert!(t_state.activated);
        assert_eq!(t_state.status, FULL);
        let positions: Vec<_> = t_state
            .queues
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect();
        // rx: REQUEST + data; tx: RESPONSE + data; no event yet.
        assert_eq!(positions, vec![(2, 2), (2, 2), (0, 0)]);
        assert_eq!(v_state.cid, GUEST_CID);
        assert_eq!(v_state.acked_features, 1 << 32);
        assert_eq!(v_state.next_host_port, old_port + 1);

        // The template process goes away with its connections.
        let old_path = h.path.clone();
        drop(t);
        drop(h);
        let mut rest = Vec::new();
        assert!(
            read_available(&mut client, &mut rest),
            "old client sees EOF"
        );
        assert!(UnixStream::connect(&old_path).is_err());

        // --- The clone process: new memory, device, transport, socket. ---
        let mem2 = snapshot_mem;
        let mut g2 = g.resume_on(&mem2);
        let path2 = temp_path("persist-clone");
        let dev2 = Arc::new(Mutex::new(VirtioVsock::restore(&v_state, &path2).unwrap()));
        let mut em2 = Em::new().unwrap();
        em2.add_subscriber(dev2.clone());
        let irq_evt2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq2 = IrqLine::new(5, irq_evt2.try_clone().unwrap());
        let mut t2 = MmioTransport::restore(mem2.clone(), dev2.clone(), irq2, &t_state).unwrap();
        assert!(dev2.lock().unwrap().is_activated());
        assert_eq!(t2.device_status(), FULL);
        assert_eq!(t2.save(), t_state);
        for i in 0..NUM_QUEUES as u32 {
            wr(&mut t2, regs::VIRTIO_MMIO_QUEUE_SEL, i);
            assert_eq!(rd(&mut t2, regs::VIRTIO_MMIO_QUEUE_READY), 1);
        }
        assert_eq!(dev2.lock().unwrap().muxer.connection_count(), 0);

        // What the builder does next: the guest learns its connections are
        // gone, in a buffer it posted before the snapshot.
        dev2.lock().unwrap().send_transport_reset();
        g2.collect();
        assert_eq!(g2.events, vec![VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]);
        assert!(irq_evt2.read().unwrap() >= 1, "event interrupt raised");
        let mut h2 = Harness {
            mem: mem2.clone(),
            dev: dev2.clone(),
            em: em2,
            irq: irq_evt2,
            path: path2.clone(),
        };

        // A packet the guest posts now is processed at the saved position:
        // the stale connection is unknown, so exactly one RST comes back.
        g2.send(op::RW, 1234, old_port, 0, b"stale");
        notify(&mut t2, TXQ_INDEX);
        h2.pump(&mut g2, |g| !g.received.is_empty());
        h2.pump(&mut g2, |_| true);
        assert_eq!(g2.received.len(), 1);
        let (rst, _) = g2.received.remove(0);
        assert_eq!(rst.op, op::RST);
        assert_eq!((rst.src_port, rst.dst_port), (old_port, 1234));
        assert_eq!(g2.tx.last_used, 3, "one new tx buffer used");

        // A new CONNECT works end to end, on a port the template never used.
        let mut client2 = UnixStream::connect(&path2).unwrap();
        client2.set_nonblocking(true).unwrap();
        client2.write_all(b"CONNECT 1234\n").unwrap();
        h2.pump(&mut g2, |g| !g.received.is_empty());
        let (req2, _) = g2.received.remove(0);
        assert_eq!(req2.op, op::REQUEST);
        assert_eq!(req2.dst_port, 1234);
        assert_eq!(req2.src_port, old_port + 1);
        let port2 = req2.src_port;
        g2.send(op::RESPONSE, 1234, port2, 0, b"");
        notify(&mut t2, TXQ_INDEX);
        let mut got = Vec::new();
        h2.pump(&mut g2, |_| {
            read_available(&mut client2, &mut got);
            got.ends_with(b"\n")
        });
        assert_eq!(got, format!("OK {port2}\n").as_bytes());
        client2.write_all(b"hello clone").unwrap();
        h2.pump(&mut g2, |g| !g.received.is_empty());
        let (rw, data) = g2.received.remove(0);
        assert_eq!((rw.op, rw.dst_port), (op::RW, 1234));
        assert_eq!(data, b"hello clone");
        g2.send(op::RW, 1234, port2, 0, b"hello host");
        notify(&mut t2, TXQ_INDEX);
        let mut got = Vec::new();
        h2.pump(&mut g2, |_| {
            read_available(&mut client2, &mut got);
            got.len() >= 10
        });
        assert_eq!(got, b"hello host");
        assert_eq!(dev2.lock().unwrap().muxer.connection_count(), 1);

        drop(t2);
        drop(h2);
        drop(dev2);
        assert!(!path2.exists());
    }
}
