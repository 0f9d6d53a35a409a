//! The vsock muxer as a state machine: guest packets with arbitrary
//! headers, host clients and host sockets doing arbitrary things, readiness
//! as poll(2) reports it, time passing.
//!
//! The oracle is credit (virtio 1.2, 5.10.6.3): every data packet the
//! device sends fits the credit the guest last advertised on that
//! connection, `buf_alloc - (tx_cnt - fwd_cnt)` (with the wrapping counters
//! of the spec, and no credit for a guest that claims to have forwarded
//! more than it got), counted from zero for each new connection; and the
//! device never holds more of the guest's bytes for a host stream than the
//! `buf_alloc` it advertises.

#![no_main]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::io::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use event_manager::EventSet;
use libfuzzer_sys::fuzz_target;

use arrow_fuzz::ScratchDir;
use vmm_core::virtio::vsock::muxer::{FdOp, Muxer};
use vmm_core::virtio::vsock::packet::{VsockHeader, VsockPacket};
use vmm_core::virtio::vsock::{
    op, CONN_TX_BUF_SIZE, HOST_PORT_FIRST, MAX_CONNECTIONS, MAX_PKT_BUF_SIZE, VSOCK_HOST_CID,
    VSOCK_TYPE_STREAM,
};

const GUEST_CID: u64 = 3;
/// Host ports with a listener at `<uds>_<port>`; others refuse.
const LISTENING: [u32; 2] = [1, 2];
/// Longest `OK <port>\n` line the device queues for a host client.
const MAX_OK_LINE: usize = "OK 4294967295\n".len();

#[derive(Arbitrary, Debug)]
enum Port {
    Small(u8),
    Host(u8),
    Raw(u32),
}

impl Port {
    fn resolve(&self) -> u32 {
        match self {
            Port::Small(p) => u32::from(p % 4),
            Port::Host(k) => HOST_PORT_FIRST + u32::from(k % 4),
            Port::Raw(p) => *p,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct GuestPkt {
    src_port: Port,
    dst_port: Port,
    op: u8,
    flags: u8,
    buf_alloc: u32,
    fwd_cnt: u32,
    len: u16,
    src_cid: Option<u64>,
    dst_cid: Option<u64>,
    type_: Option<u16>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Guest(GuestPkt),
    /// A host client connects and sends a line (and maybe data after it).
    HostConnect {
        port: u8,
        raw: Option<Vec<u8>>,
        extra: u8,
    },
    HostWrite {
        stream: u8,
        len: u16,
    },
    HostRead {
        stream: u8,
        max: u16,
    },
    HostShutdown {
        stream: u8,
        write_only: bool,
    },
    HostClose {
        stream: u8,
    },
    /// Readiness of every watched descriptor, as poll(2) reports it.
    Poll,
    /// The guest posts an rx buffer with room for `max_payload` bytes.
    Rx {
        max_payload: u16,
    },
    Advance {
        ms: u16,
    },
    Reset,
}

/// What the guest advertised on one connection, and what it was sent.
#[derive(Clone, Copy, Debug, Default)]
struct Credit {
    buf_alloc: u32,
    fwd_cnt: u32,
    sent: u32,
}

impl Credit {
    fn available(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(self.sent.wrapping_sub(self.fwd_cnt))
    }
}

/// The guest's view of its connections, keyed `(host port, guest port)`.
#[derive(Default)]
struct GuestModel {
    known: HashMap<(u32, u32), Credit>,
    /// The credit of the guest's REQUESTs not answered yet.
    requested: HashMap<(u32, u32), (u32, u32)>,
}

impl GuestModel {
    fn sent_by_guest(&mut self, h: &VsockHeader) {
        if h.src_cid != GUEST_CID || h.dst_cid != VSOCK_HOST_CID || h.type_ != VSOCK_TYPE_STREAM {
            return;
        }
        let key = (h.dst_port, h.src_port);
        match h.op {
            op::RST => {
                self.known.remove(&key);
            }
            op::REQUEST => {
                if !self.known.contains_key(&key) {
                    self.requested.insert(key, (h.buf_alloc, h.fwd_cnt));
                }
            }
            _ => {
                if let Some(c) = self.known.get_mut(&key) {
                    c.buf_alloc = h.buf_alloc;
                    c.fwd_cnt = h.fwd_cnt;
                }
            }
        }
    }

    fn received(&mut self, pkt: &VsockPacket, max_payload: usize) {
        let h = &pkt.hdr;
        assert_eq!(h.src_cid, VSOCK_HOST_CID);
        assert_eq!(h.dst_cid, GUEST_CID);
        assert_eq!(h.type_, VSOCK_TYPE_STREAM);
        assert!(pkt.data.len() <= max_payload.min(MAX_PKT_BUF_SIZE));
        assert!(
            pkt.data.is_empty() || h.op == op::RW,
            "payload on op {}",
            h.op
        );
        let key = (h.src_port, h.dst_port);
        match h.op {
            op::REQUEST => {
                self.known.insert(key, Credit::default());
            }
            op::RESPONSE => {
                let (buf_alloc, fwd_cnt) = self.requested.remove(&key).unwrap_or_default();
                self.known.insert(
                    key,
                    Credit {
                        buf_alloc,
                        fwd_cnt,
                        sent: 0,
                    },
                );
            }
            op::RST => {
                self.known.remove(&key);
            }
            op::RW => {
                if let Some(c) = self.known.get_mut(&key) {
                    let len = pkt.data.len() as u32;
                    assert!(
                        len <= c.available(),
                        "{len} bytes sent on {key:?} with credit {c:?}"
                    );
                    c.sent = c.sent.wrapping_add(len);
                }
            }
            _ => {}
        }
        if h.op != op::RST {
            // Every packet of a connection carries our credit.
            assert_eq!(h.buf_alloc, CONN_TX_BUF_SIZE);
        }
    }
}

struct Harness {
    muxer: Muxer,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
    watched: HashMap<RawFd, EventSet>,
    model: GuestModel,
    now: Instant,
}

impl Harness {
    fn new(dir: &Path) -> Self {
        let uds = dir.join("v");
        let muxer = Muxer::new(GUEST_CID, &uds).expect("a fresh socket path");
        let listeners = LISTENING
            .iter()
            .map(|p| {
                let l = UnixListener::bind(dir.join(format!("v_{p}"))).expect("listener");
                l.set_nonblocking(true).expect("non-blocking listener");
                l
            })
            .collect();
        Self {
            muxer,
            listeners,
            streams: Vec::new(),
            watched: HashMap::new(),
            model: GuestModel::default(),
            now: Instant::now(),
        }
    }

    fn stream(&mut self, i: u8) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[usize::from(i) % n])
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Guest(g) => self.guest(g),
            Op::HostConnect { port, raw, extra } => {
                let Ok(mut s) = UnixStream::connect(self.muxer.uds_path()) else {
                    return;
                };
                let _ = s.set_nonblocking(true);
                let mut bytes =
                    raw.unwrap_or_else(|| format!("CONNECT {}\n", port % 4).into_bytes());
                bytes.extend(std::iter::repeat_n(b'x', usize::from(extra)));
                let _ = s.write(&bytes);
                self.streams.push(s);
                self.muxer.accept_clients(true, self.now);
            }
            Op::HostWrite { stream, len } => {
                if let Some(s) = self.stream(stream) {
                    let _ = s.write(&vec![b'h'; usize::from(len)]);
                }
            }
            Op::HostRead { stream, max } => {
                if let Some(s) = self.stream(stream) {
                    let mut buf = vec![0u8; usize::from(max)];
                    let _ = s.read(&mut buf);
                }
            }
            Op::HostShutdown { stream, write_only } => {
                if let Some(s) = self.stream(stream) {
                    let how = if write_only {
                        std::net::Shutdown::Write
                    } else {
                        std::net::Shutdown::Both
                    };
                    let _ = s.shutdown(how);
                }
            }
            Op::HostClose { stream } => {
                if !self.streams.is_empty() {
                    let i = usize::from(stream) % self.streams.len();
                    self.streams.swap_remove(i);
                }
            }
            Op::Poll => self.poll(),
            Op::Rx { max_payload } => {
                let max = usize::from(max_payload);
                if let Some(pkt) = self.muxer.next_rx_pkt(max) {
                    self.model.received(&pkt, max);
                }
            }
            Op::Advance { ms } => {
                self.now += Duration::from_millis(u64::from(ms));
                self.muxer.check_deadlines(self.now);
            }
            Op::Reset => {
                self.muxer.reset();
                self.model = GuestModel::default();
            }
        }
        let watched = &mut self.watched;
        self.muxer.sync_interest(|op| {
            match op {
                FdOp::Add(fd, set) | FdOp::Modify(fd, set) => {
                    watched.insert(fd, set);
                }
                FdOp::Remove(fd) => {
                    watched.remove(&fd);
                }
            }
            true
        });
        self.check();
    }

    fn guest(&mut self, g: GuestPkt) {
        let len = usize::from(g.len).min(MAX_PKT_BUF_SIZE);
        let hdr = VsockHeader {
            src_cid: g.src_cid.unwrap_or(GUEST_CID),
            dst_cid: g.dst_cid.unwrap_or(VSOCK_HOST_CID),
            src_port: g.src_port.resolve(),
            dst_port: g.dst_port.resolve(),
            len: len as u32,
            type_: g.type_.unwrap_or(VSOCK_TYPE_STREAM),
            op: u16::from(g.op % 9),
            flags: u32::from(g.flags),
            buf_alloc: g.buf_alloc,
            fwd_cnt: g.fwd_cnt,
        };
        self.model.sent_by_guest(&hdr);
        self.muxer.handle_guest_pkt(VsockPacket {
            hdr,
            data: vec![b'g'; len],
        });
        for l in &self.listeners {
            while let Ok((s, _)) = l.accept() {
                let _ = s.set_nonblocking(true);
                self.streams.push(s);
            }
        }
    }

    fn poll(&mut self) {
        let mut fds: Vec<libc::pollfd> = self
            .watched
            .iter()
            .map(|(&fd, set)| {
                let mut events = 0;
                if set.contains(EventSet::IN) {
                    events |= libc::POLLIN;
                }
                if set.contains(EventSet::OUT) {
                    events |= libc::POLLOUT;
                }
                libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                }
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds; timeout 0.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            return;
        }
        for p in fds {
            let mut set = EventSet::empty();
            if p.revents & libc::POLLIN != 0 {
                set |= EventSet::IN;
            }
            if p.revents & libc::POLLOUT != 0 {
                set |= EventSet::OUT;
            }
            if p.revents & libc::POLLHUP != 0 {
                set |= EventSet::HANG_UP;
            }
            if p.revents & libc::POLLERR != 0 {
                set |= EventSet::ERROR;
            }
            if !set.is_empty() {
                self.muxer.notify_fd(p.fd, set, true, self.now);
            }
        }
    }

    fn check(&self) {
        assert!(self.muxer.connection_count() <= MAX_CONNECTIONS);
        for conn in self.muxer.connections() {
            let (guest, all) = conn.buffered();
            assert!(
                guest <= CONN_TX_BUF_SIZE as usize,
                "{:?} holds {guest} guest bytes",
                conn.key()
            );
            assert!(all <= guest + MAX_OK_LINE);
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > 256 {
        return;
    }
    let dir = ScratchDir::new("vsock-muxer");
    let mut h = Harness::new(dir.path());
    for op in ops {
        h.run(op);
    }
    drop(h);
});
