//! End-to-end tests: a fake guest driver on real guest memory, the device
//! on a real event manager, real Unix sockets on the host side.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::VsockHeader;
use super::*;
use crate::devices::irq::IrqLine;
use crate::virtio::test_utils;
pub(super) use crate::virtio::test_utils::{MEM_SIZE, QSIZE};
use crate::virtio::{GuestMemory, Interrupt, VirtioDevice};

pub(super) const GUEST_CID: u64 = 3;

pub(super) type Em = EventManager<Arc<Mutex<VirtioVsock>>>;

pub(super) fn temp_path(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "arrow-vsock-e2e-{tag}-{}-{nanos}",
        std::process::id()
    ))
}

/// One queue as the guest driver sees it, with an arena for its buffers.
pub(super) struct GuestQueue<'a> {
    ring: test_utils::GuestQueue<'a>,
    /// Where this queue's buffers live.
    buf_base: u64,
    next_buf: u64,
}

impl<'a> Deref for GuestQueue<'a> {
    type Target = test_utils::GuestQueue<'a>;

    fn deref(&self) -> &Self::Target {
        &self.ring
    }
}

impl DerefMut for GuestQueue<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.ring
    }
}

impl<'a> GuestQueue<'a> {
    fn new(mem: &'a GuestMemory, ring: u64, buf_base: u64) -> Self {
        Self {
            ring: test_utils::GuestQueue::new(mem, ring),
            buf_base,
            next_buf: 0,
        }
    }

    /// The same driver state over `mem`, a copy of this queue's memory (a
    /// snapshot restored in another process).
    fn resume_on<'b>(&self, mem: &'b GuestMemory) -> GuestQueue<'b> {
        GuestQueue {
            ring: self.ring.resume_on(mem),
            buf_base: self.buf_base,
            next_buf: self.next_buf,
        }
    }

    fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// A fresh buffer of `len` bytes (the arena wraps; tests stay small).
    fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > 0x10_0000 {
            self.next_buf = 0;
        }
        let a = self.buf_base + self.next_buf;
        self.next_buf += (len + 0xfff) & !0xfff;
        a
    }
}

/// The fake guest driver.
pub(super) struct Guest<'a> {
    mem: &'a GuestMemory,
    pub(super) rx: GuestQueue<'a>,
    pub(super) tx: GuestQueue<'a>,
    pub(super) ev: GuestQueue<'a>,
    /// Head index of posted rx chains -> (header addr, data addr).
    rx_bufs: std::collections::HashMap<u32, (u64, u64)>,
    ev_bufs: std::collections::HashMap<u32, u64>,
    pub(super) received: Vec<(VsockHeader, Vec<u8>)>,
    pub(super) events: Vec<u32>,
}

impl<'a> Guest<'a> {
    pub(super) fn new(mem: &'a GuestMemory) -> Self {
        Self {
            mem,
            rx: GuestQueue::new(mem, 0x1_0000, 0x10_0000),
            tx: GuestQueue::new(mem, 0x2_0000, 0x20_0000),
            ev: GuestQueue::new(mem, 0x3_0000, 0x30_0000),
            rx_bufs: Default::default(),
            ev_bufs: Default::default(),
            received: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The same driver, continuing on `mem`, a copy of this guest's
    /// memory (a snapshot restored in another process).
    pub(super) fn resume_on<'b>(&self, mem: &'b GuestMemory) -> Guest<'b> {
        Guest {
            mem,
            rx: self.rx.resume_on(mem),
            tx: self.tx.resume_on(mem),
            ev: self.ev.resume_on(mem),
            rx_bufs: self.rx_bufs.clone(),
            ev_bufs: self.ev_bufs.clone(),
            received: Vec::new(),
            events: Vec::new(),
        }
    }

    /// Posts rx buffers the way Linux 6.1 does: header and data in two
    /// descriptors.
    pub(super) fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let hdr = self.rx.alloc(44);
            let data = self.rx.alloc(4096);
            let head = self.rx.add_chain(&[(hdr, 44, true), (data, 4096, true)]);
            self.rx_bufs.insert(u32::from(head), (hdr, data));
        }
    }

    pub(super) fn post_events(&mut self, n: usize) {
        for _ in 0..n {
            let a = self.ev.alloc(4);
            let head = self.ev.add_chain(&[(a, 4, true)]);
            self.ev_bufs.insert(u32::from(head), a);
        }
    }

    pub(super) fn send(&mut self, op: u16, src_port: u32, dst_port: u32, flags: u32, data: &[u8]) {
        let h = VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            len: data.len() as u32,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        };
        let ha = self.tx.alloc(44);
        self.mem
            .write_slice(&h.to_bytes(), GuestAddress(ha))
            .unwrap();
        if data.is_empty() {
            self.tx.add_chain(&[(ha, 44, false)]);
        } else {
            let da = self.tx.alloc(data.len() as u64);
            self.mem.write_slice(data, GuestAddress(da)).unwrap();
            self.tx
                .add_chain(&[(ha, 44, false), (da, data.len() as u32, false)]);
        }
    }

    /// Collects what the device put in rx and event buffers.
    pub(super) fn collect(&mut self) {
        for (head, len) in self.rx.take_used() {
            let (ha, da) = self.rx_bufs.remove(&head).expect("known rx head");
            assert!(len >= 44, "rx packet of {len} bytes");
            let mut hb = [0u8; 44];
            self.mem.read_slice(&mut hb, GuestAddress(ha)).unwrap();
            let h = VsockHeader::from_bytes(&hb);
            assert_eq!(h.len, len - 44);
            let mut data = vec![0u8; h.len as usize];
            self.mem.read_slice(&mut data, GuestAddress(da)).unwrap();
            self.received.push((h, data));
        }
        for (head, len) in self.ev.take_used() {
            let a = self.ev_bufs.remove(&head).expect("known event head");
            assert_eq!(len, 4);
            self.events
                .push(self.mem.read_obj::<u32>(GuestAddress(a)).unwrap());
        }
        // tx buffers are only recycled.
        self.tx.take_used();
    }
}

pub(super) struct Harness {
    pub(super) mem: GuestMemory,
    pub(super) dev: Arc<Mutex<VirtioVsock>>,
    pub(super) em: Em,
    pub(super) irq: EventFd,
    pub(super) path: PathBuf,
}

impl Harness {
    pub(super) fn new(tag: &str) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let path = temp_path(tag);
        let dev = Arc::new(Mutex::new(VirtioVsock::new(GUEST_CID, &path).unwrap()));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Self {
            mem,
            dev,
            em,
            irq,
            path,
        }
    }

    fn activate(&mut self, guest: &Guest) {
        let irq = IrqLine::new(5, self.irq.try_clone().unwrap());
        let queues = vec![guest.rx.queue(), guest.tx.queue(), guest.ev.queue()];
        self.dev
            .lock()
            .unwrap()
            .activate(self.mem.clone(), Arc::new(Interrupt::new(irq)), queues)
            .unwrap();
    }

    fn notify(&self, queue: usize) {
        self.dev.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
    }

    /// Runs the event loop until `done` holds (or panics after 5 s).
    pub(super) fn pump(&mut self, guest: &mut Guest, mut done: impl FnMut(&mut Guest) -> bool) {
        let start = Instant::now();
        loop {
            self.em.run_with_timeout(20).unwrap();
            guest.collect();
            if done(guest) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out pumping"
            );
        }
    }
}

pub(super) fn read_available(s: &mut UnixStream, out: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) => panic!("client read: {e}"),
        }
    }
}

#[test]
fn host_initiated_connection_end_to_end() {
    let mut h = Harness::new("hostinit");
    let mem = h.mem.clone();
    let mut g = Guest::new(&mem);
    h.activate(&g);
    g.post_rx(8);
    h.notify(RXQ_INDEX);

    let mut client = UnixStream::connect(&h.path).unwrap();
    client.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 1234\n").unwrap();

    // The guest sees a REQUEST to port 1234 from a fresh host port.
    h.pump(&mut g, |g| !g.received.is_empty());
    let (req, _) = g.received.remove(0);
    assert_eq!(req.op, op::REQUEST);
    assert_eq!((req.src_cid, req.dst_cid), (VSOCK_HOST_CID, GUEST_CID));
    assert_eq!(req.dst_port, 1234);
    assert!(req.src_port >= HOST_PORT_FIRST);
    let host_port = req.src_port;
    assert!(h.irq.read().unwrap() >= 1, "rx interrupt raised");

    // The guest accepts; the client reads OK.
    g.send(op::RESPONSE, 1234, host_port, 0, b"");
    h.notify(TXQ_INDEX);
    let mut got = Vec::new();
    h.pump(&mut g, |_| {
        read_available(&mut client, &mut got);
        got.ends_with(b"\n")
    });
    assert_eq!(got, format!("OK {host_port}\n").as_bytes());

    // Host to guest.
    client.write_all(b"hello guest").unwrap();
    h.pump(&mut g, |g| !g.received.is_empty());
    let (rw, data) = g.received.remove(0);
    assert_eq!(rw.op, op::RW);
    assert_eq!((rw.src_port, rw.dst_port), (host_port, 1234));
    assert_eq!(data, b"hello guest");
    assert_eq!(rw.buf_alloc, CONN_TX_BUF_SIZE);

    // Guest to host, more than one rx-buffer's worth the other way too.
    g.send(op::RW, 1234, host_port, 0, b"hello host");
    h.notify(TXQ_INDEX);
    let mut got = Vec::new();
    h.pump(&mut g, |_| {
        read_available(&mut client, &mut got);
        got.len() >= 10
    });
    assert_eq!(got, b"hello host");

    let big: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
    client.write_all(&big).unwrap();
    g.post_rx(8);
    h.notify(RXQ_INDEX);
    let mut echoed = Vec::new();
    h.pump(&mut g, |g| {
        for (hdr, data) in g.received.drain(..) {
            assert_eq!(hdr.op, op::RW);
            assert!(data.len() <= 4096);
            echoed.extend_from_slice(&data);
        }
        echoed.len() >= big.len()
    });
    assert_eq!(echoed, big);

    // The guest closes: the client sees EOF and the guest an RST.
    g.send(
        op::SHUTDOWN,
        1234,
        host_port,
        VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND,
        b"",
    );
    h.notify(TXQ_INDEX);
    let mut rest = Vec::new();
    h.pump(&mut g, |g| {
        g.received.iter().any(|(hdr, _)| hdr.op == op::RST)
            && read_available(&mut client, &mut rest)
    });
    assert!(rest.is_empty());
    assert_eq!(h.dev.lock().unwrap().muxer.connection_count(), 0);

    // Transport reset reaches the event queue once a buffer is there.
    h.dev.lock().unwrap().send_transport_reset();
    g.post_events(1);
    h.notify(EVQ_INDEX);
    h.pump(&mut g, |g| !g.events.is_empty());
    assert_eq!(g.events, vec![VIRTIO_VSOCK_EVENT_TRANSPORT_RESET]);

    let path = h.path.clone();
    drop(h);
    assert!(!path.exists(), "listener socket removed on drop");
}

#[test]
fn guest_rst_and_no_listener() {
    let mut h = Harness::new("rst");
    let mem = h.mem.clone();
    let mut g = Guest::new(&mem);
    h.activate(&g);
    g.post_rx(4);
    h.notify(RXQ_INDEX);

    let mut client = UnixStream::connect(&h.path).unwrap();
    client.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 77\n").unwrap();
    h.pump(&mut g, |g| !g.received.is_empty());
    let (req, _) = g.received.remove(0);
    // Nobody listens on guest port 77.
    g.send(op::RST, 77, req.src_port, 0, b"");
    h.notify(TXQ_INDEX);
    let mut got = Vec::new();
    h.pump(&mut g, |_| read_available(&mut client, &mut got));
    assert!(got.is_empty());

    // A guest connection to a host port nobody serves is reset.
    g.send(op::REQUEST, 4000, 5555, 0, b"");
    h.notify(TXQ_INDEX);
    h.pump(&mut g, |g| !g.received.is_empty());
    let (rst, _) = g.received.remove(0);
    assert_eq!(rst.op, op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (5555, 4000));
}

#[test]
fn guest_initiated_connection_end_to_end() {
    let mut h = Harness::new("guestinit");
    let mem = h.mem.clone();
    let mut g = Guest::new(&mem);
    h.activate(&g);
    g.post_rx(4);
    h.notify(RXQ_INDEX);

    let mut lpath = OsString::from(h.path.as_os_str());
    lpath.push("_6000");
    let listener = UnixListener::bind(&lpath).unwrap();
    g.send(op::REQUEST, 4001, 6000, 0, b"");
    h.notify(TXQ_INDEX);
    h.pump(&mut g, |g| !g.received.is_empty());
    let (resp, _) = g.received.remove(0);
    assert_eq!(resp.op, op::RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (6000, 4001));

    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    g.send(op::RW, 4001, 6000, 0, b"from guest");
    h.notify(TXQ_INDEX);
    let mut got = Vec::new();
    h.pump(&mut g, |_| {
        read_available(&mut host, &mut got);
        got.len() >= 10
    });
    assert_eq!(got, b"from guest");

    host.write_all(b"from host").unwrap();
    drop(host);
    // Data, then SHUTDOWN with both flags since the host closed.
    h.pump(&mut g, |g| {
        g.received.iter().any(|(hdr, _)| hdr.op == op::SHUTDOWN)
    });
    assert_eq!(g.received[0].1, b"from host");
    let (shut, _) = g.received.last().unwrap();
    assert_eq!(
        shut.flags,
        VSOCK_FLAGS_SHUTDOWN_RCV | VSOCK_FLAGS_SHUTDOWN_SEND
    );
    g.send(op::RST, 4001, 6000, 0, b"");
    h.notify(TXQ_INDEX);
    h.pump(&mut g, |_| true);
    h.pump(&mut g, |_| true);
    assert_eq!(h.dev.lock().unwrap().muxer.connection_count(), 0);
    let _ = std::fs::remove_file(&lpath);
}

#[test]
fn clients_closed_before_activation_and_after_reset() {
    let mut h = Harness::new("inactive");
    let mem = h.mem.clone();
    let mut g = Guest::new(&mem);
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    h.pump(&mut g, |_| read_available(&mut client, &mut got));

    // Established connection, then a device reset: the client sees EOF.
    h.activate(&g);
    g.post_rx(4);
    h.notify(RXQ_INDEX);
    let mut client = UnixStream::connect(&h.path).unwrap();
    client.set_nonblocking(true).unwrap();
    client.write_all(b"CONNECT 1\n").unwrap();
    h.pump(&mut g, |g| !g.received.is_empty());
    h.dev.lock().unwrap().reset();
    let mut got = Vec::new();
    h.pump(&mut g, |_| read_available(&mut client, &mut got));
    assert!(!h.dev.lock().unwrap().is_activated());
}

#[test]
fn malformed_tx_chains_do_not_stop_the_device() {
    let mut h = Harness::new("malformed");
    let mem = h.mem.clone();
    let mut g = Guest::new(&mem);
    h.activate(&g);
    g.post_rx(4);
    h.notify(RXQ_INDEX);
    // Too short, out of memory, write-only, then a good REQUEST to nowhere.
    let a = g.tx.alloc(64);
    g.tx.add_chain(&[(a, 10, false)]);
    g.tx.add_chain(&[(MEM_SIZE as u64 - 8, 44, false)]);
    g.tx.add_chain(&[(a, 44, true)]);
    g.send(op::REQUEST, 1, 9, 0, b"");
    h.notify(TXQ_INDEX);
    h.pump(&mut g, |g| !g.received.is_empty());
    assert_eq!(g.received[0].0.op, op::RST);
}

#[test]
fn mmio_transport_drives_vsock() {
    use crate::devices::bus::BusDevice;
    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::status;
    use virtio_bindings::virtio_mmio as regs;

    let mut h = Harness::new("mmio");
    let mem = h.mem.clone();
    let g = Guest::new(&mem);
    let irq = IrqLine::new(5, h.irq.try_clone().unwrap());
    // What the VM builder does: the device coerces to the trait object.
    let mut t = MmioTransport::new(h.mem.clone(), h.dev.clone(), irq);
    let wr = |t: &mut MmioTransport, reg: u32, v: u32| t.write(u64::from(reg), &v.to_le_bytes());
    let rd = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(
        rd(&mut t, u64::from(regs::VIRTIO_MMIO_DEVICE_ID)),
        VIRTIO_ID_VSOCK
    );
    assert_eq!(rd(&mut t, 0x100), GUEST_CID as u32);
    assert_eq!(rd(&mut t, 0x104), 0);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
    wr(
        &mut t,
        regs::VIRTIO_MMIO_STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    let feat = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, feat);
    assert_eq!(t.device_status(), feat);
    for (i, q) in [&g.rx, &g.tx, &g.ev].into_iter().enumerate() {
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, i as u32);
        assert_eq!(
            rd(&mut t, u64::from(regs::VIRTIO_MMIO_QUEUE_NUM_MAX)),
            u32::from(QUEUE_SIZE)
        );
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        wr(
            &mut t,
            regs::VIRTIO_MMIO_QUEUE_DESC_LOW,
            q.mock.desc_table_addr().0 as u32,
        );
        wr(
            &mut t,
            regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            q.mock.avail_addr().0 as u32,
        );
        wr(
            &mut t,
            regs::VIRTIO_MMIO_QUEUE_USED_LOW,
            q.mock.used_addr().0 as u32,
        );
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, feat | status::DRIVER_OK);
    assert_eq!(t.device_status(), feat | status::DRIVER_OK);
    assert!(h.dev.lock().unwrap().is_activated());
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, TXQ_INDEX as u32);
    assert_eq!(
        h.dev.lock().unwrap().queue_events()[TXQ_INDEX]
            .read()
            .unwrap(),
        1
    );
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    assert!(!h.dev.lock().unwrap().is_activated());
    h.em.run_with_timeout(10).unwrap();
}
