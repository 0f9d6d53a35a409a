//! One vsock stream bridged to one host Unix stream: the connection state
//! machine and its credit-based flow control.
//!
//! Names follow the device's point of view: the *peer* is the guest, *local*
//! is the host side. Guest-to-host bytes are buffered in `to_host` (never
//! more than the `buf_alloc` we advertise: a guest that overruns its credit
//! is reset); host-to-guest bytes are read from the Unix stream only when
//! the guest has advertised room for them, straight into an rx packet.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use event_manager::EventSet;
use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};

use super::packet::VsockPacket;
use super::{
    op, CONN_CREDIT_UPDATE_THRESHOLD, CONN_REQUEST_TIMEOUT, CONN_SHUTDOWN_TIMEOUT,
    CONN_TX_BUF_SIZE, MAX_PKT_BUF_SIZE, VSOCK_FLAGS_SHUTDOWN_RCV, VSOCK_FLAGS_SHUTDOWN_SEND,
    VSOCK_HOST_CID,
};

/// Identifies a connection: host-side port and guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnKey {
    /// The host-side port (the guest's destination port, or the port we
    /// allocated for a host-initiated connection).
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's RESPONSE.
    LocalInit,
    /// Guest-initiated: the host socket is connected, RESPONSE queued.
    PeerInit,
    /// Data flows (possibly half-closed).
    Established,
    /// Winding down with a deadline: waiting for the guest's RST after our
    /// full SHUTDOWN, or for guest data to drain before our RST.
    Closing,
    /// An RST must be sent to the guest; then the connection is closed.
    Killed,
    /// Nothing more to do; the muxer drops it.
    Closed,
}

const P_REQUEST: u8 = 1 << 0;
const P_RESPONSE: u8 = 1 << 1;
const P_SHUTDOWN: u8 = 1 << 2;
const P_CREDIT_UPDATE: u8 = 1 << 3;
const P_CREDIT_REQUEST: u8 = 1 << 4;
const P_RST: u8 = 1 << 5;

/// A vsock stream and the host Unix stream it is bridged to.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    peer_cid: u64,
    state: ConnState,
    pending: u8,
    deadline: Option<Instant>,

    // Guest to host.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are ours (the `OK` line), not the
    /// guest's, and so do not count for credit.
    to_host_uncounted: usize,
    recv_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    peer_shut_send: bool,
    peer_shut_recv: bool,
    host_write_shut: bool,

    // Host to guest.
    sent_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,
    shutdown_flags_sent: u32,
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, peer_cid: u64, state: ConnState, pending: u8) -> Self {
        Self {
            stream,
            key,
            peer_cid,
            state,
            pending,
            deadline: None,
            to_host: VecDeque::new(),
            to_host_uncounted: 0,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_shut_send: false,
            peer_shut_recv: false,
            host_write_shut: false,
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            shutdown_flags_sent: 0,
            credit_requested: false,
        }
    }

    /// A host-initiated connection: a REQUEST to the guest is queued and the
    /// guest has [`CONN_REQUEST_TIMEOUT`] to answer. `stream` must be
    /// non-blocking.
    pub fn new_local(stream: UnixStream, key: ConnKey, peer_cid: u64, now: Instant) -> Self {
        let mut c = Self::new(stream, key, peer_cid, ConnState::LocalInit, P_REQUEST);
        c.deadline = Some(now + CONN_REQUEST_TIMEOUT);
        c
    }

    /// A guest-initiated connection whose host socket is connected; the
    /// RESPONSE is queued. `buf_alloc`/`fwd_cnt` come from the REQUEST.
    pub fn new_peer(
        stream: UnixStream,
        key: ConnKey,
        peer_cid: u64,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Self {
        let mut c = Self::new(stream, key, peer_cid, ConnState::PeerInit, P_RESPONSE);
        c.peer_buf_alloc = buf_alloc;
        c.peer_fwd_cnt = Wrapping(fwd_cnt);
        c
    }

    /// The connection's ports.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The current state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host stream's file descriptor.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Gives up the host stream (to close it once it is off the epoll set).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// When the connection must next be looked at by [`Self::check_deadline`].
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the muxer can drop the connection.
    pub fn is_closed(&self) -> bool {
        self.state == ConnState::Closed
    }

    /// Bytes the guest may still send us (as far as we have told it).
    pub fn our_free_space(&self) -> usize {
        CONN_TX_BUF_SIZE as usize - self.buffered_to_host()
    }

    /// Bytes waiting for the host stream: the guest's (what its credit
    /// bounds) and all of them (with our `OK` line), for the fuzz targets'
    /// invariants.
    #[cfg(feature = "fuzzing")]
    pub fn buffered(&self) -> (usize, usize) {
        (self.buffered_to_host(), self.to_host.len())
    }

    fn buffered_to_host(&self) -> usize {
        self.to_host.len() - self.to_host_uncounted
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Resets the connection: an RST goes to the guest unless it never
    /// heard of the connection.
    pub fn kill(&mut self) {
        match self.state {
            ConnState::Closed | ConnState::Killed => {}
            ConnState::LocalInit if self.pending & P_REQUEST != 0 => self.close(),
            _ => {
                self.state = ConnState::Killed;
                self.pending = P_RST;
                self.deadline = None;
            }
        }
    }

    fn close(&mut self) {
        self.state = ConnState::Closed;
        self.pending = 0;
        self.deadline = None;
    }

    fn can_read_host(&self) -> bool {
        self.state == ConnState::Established && !self.host_eof && !self.peer_shut_recv
    }

    /// Whether [`Self::next_rx_pkt`] may produce a packet.
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            ConnState::Closed => false,
            ConnState::Killed => true,
            _ => {
                self.pending != 0
                    || (self.host_readable && self.can_read_host() && self.peer_credit() > 0)
            }
        }
    }

    /// The epoll events wanted on the host stream; `None` to leave the epoll
    /// set (closed, or hung up: then reads are driven by rx processing).
    pub fn interest(&self) -> Option<EventSet> {
        match self.state {
            ConnState::Closed | ConnState::Killed => None,
            _ if self.host_hup => None,
            _ => {
                let mut set = EventSet::empty();
                if self.can_read_host() && !self.host_readable && self.peer_credit() > 0 {
                    set |= EventSet::IN;
                }
                if !self.to_host.is_empty() {
                    set |= EventSet::OUT;
                }
                Some(set)
            }
        }
    }

    /// Expires a pending handshake or shutdown.
    pub fn check_deadline(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            debug!(
                "vsock: connection {:?} timed out in {:?}",
                self.key, self.state
            );
            self.deadline = None;
            if matches!(self.state, ConnState::LocalInit | ConnState::Closing) {
                self.kill();
            }
        }
    }

    /// Handles readiness of the host stream.
    pub fn notify_host(&mut self, evset: EventSet) {
        if matches!(self.state, ConnState::Closed | ConnState::Killed) {
            return;
        }
        if evset.contains(EventSet::ERROR) {
            self.kill();
            return;
        }
        if evset.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if evset.contains(EventSet::OUT) {
            self.flush_to_host();
        }
        if evset.contains(EventSet::HANG_UP) && !self.host_hup {
            self.host_hup = true;
            match self.state {
                ConnState::LocalInit | ConnState::PeerInit => self.kill(),
                _ => {
                    // Drain what the host left, then tell the guest.
                    self.host_readable = true;
                    if !self.can_read_host() {
                        self.host_eof = true;
                        self.pending |= P_SHUTDOWN;
                    }
                }
            }
        }
    }

    /// Handles a packet from the guest for this connection.
    pub fn handle_guest_pkt(&mut self, pkt: &VsockPacket) {
        let h = &pkt.hdr;
        if matches!(self.state, ConnState::Closed | ConnState::Killed) {
            return;
        }
        if h.op == op::RST {
            debug!("vsock: guest reset connection {:?}", self.key);
            self.close();
            return;
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
        match (self.state, h.op) {
            (ConnState::LocalInit, op::RESPONSE) if self.pending & P_REQUEST == 0 => {
                self.state = ConnState::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.key.local_port);
                self.to_host_uncounted = line.len();
                self.to_host.extend(line.as_bytes());
                self.flush_to_host();
            }
            (ConnState::Established | ConnState::Closing, op::RW) => self.recv_data(&pkt.data),
            (ConnState::Established | ConnState::Closing, op::CREDIT_UPDATE) => {}
            (ConnState::Established | ConnState::Closing, op::CREDIT_REQUEST) => {
                self.pending |= P_CREDIT_UPDATE;
            }
            (ConnState::Established | ConnState::Closing, op::SHUTDOWN) => {
                self.peer_shut_recv |= h.flags & VSOCK_FLAGS_SHUTDOWN_RCV != 0;
                self.peer_shut_send |= h.flags & VSOCK_FLAGS_SHUTDOWN_SEND != 0;
                self.flush_to_host();
            }
            (state, op) => {
                warn!(
                    "vsock: unexpected op {op} in state {state:?} on {:?}",
                    self.key
                );
                self.kill();
            }
        }
        self.maybe_finish();
    }

    fn recv_data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.peer_shut_send {
            warn!(
                "vsock: guest sent data after SHUTDOWN(SEND) on {:?}",
                self.key
            );
            self.kill();
            return;
        }
        if data.len() > self.our_free_space() {
            warn!(
                "vsock: guest overran its credit on {:?} ({} bytes, {} free)",
                self.key,
                data.len(),
                self.our_free_space()
            );
            self.kill();
            return;
        }
        self.recv_cnt += Wrapping(data.len() as u32);
        self.to_host.extend(data);
        self.flush_to_host();
    }

    /// Writes buffered guest data to the host stream without blocking.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send(
                self.stream.as_raw_fd(),
                front,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => {
                    let n = n.min(self.to_host.len());
                    self.to_host.drain(..n);
                    let ours = n.min(self.to_host_uncounted);
                    self.to_host_uncounted -= ours;
                    self.fwd_cnt += Wrapping((n - ours) as u32);
                    if n == 0 {
                        break;
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    debug!("vsock: host stream of {:?} failed: {e}", self.key);
                    self.kill();
                    return;
                }
            }
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CONN_CREDIT_UPDATE_THRESHOLD {
            self.pending |= P_CREDIT_UPDATE;
        }
        if self.to_host.is_empty() && self.peer_shut_send && !self.host_write_shut {
            // The host sees EOF; errors mean it is gone already.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.host_write_shut = true;
        }
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        if !matches!(self.state, ConnState::Established | ConnState::Closing) {
            return;
        }
        if self.peer_shut_send && self.peer_shut_recv {
            if self.to_host.is_empty() {
                self.kill();
            } else if self.state == ConnState::Established {
                self.state = ConnState::Closing;
                self.deadline = Some(Instant::now() + CONN_SHUTDOWN_TIMEOUT);
            }
            return;
        }
        // Both directions are finished: ours announced, theirs flushed.
        if self.host_write_shut
            && self.shutdown_flags_sent & VSOCK_FLAGS_SHUTDOWN_SEND != 0
            && self.pending & P_SHUTDOWN == 0
        {
            self.kill();
        }
    }

    fn control(&self, op: u16) -> VsockPacket {
        VsockPacket::control(
            (VSOCK_HOST_CID, self.key.local_port),
            (self.peer_cid, self.key.peer_port),
            op,
        )
    }

    /// The next packet for the guest, with a payload of at most
    /// `max_payload` bytes, if any.
    pub fn next_rx_pkt(&mut self, max_payload: usize) -> Option<VsockPacket> {
        let mut pkt = match self.state {
            ConnState::Closed => return None,
            ConnState::Killed => self.next_rx_pkt_killed()?,
            ConnState::LocalInit => {
                if self.pending & P_REQUEST == 0 {
                    return None;
                }
                self.pending &= !P_REQUEST;
                self.control(op::REQUEST)
            }
            ConnState::PeerInit => {
                if self.pending & P_RESPONSE == 0 {
                    return None;
                }
                self.pending &= !P_RESPONSE;
                self.state = ConnState::Established;
                self.control(op::RESPONSE)
            }
            ConnState::Established | ConnState::Closing => match self.read_host(max_payload) {
                Some(p) => p,
                None => self.next_control()?,
            },
        };
        pkt.hdr.buf_alloc = CONN_TX_BUF_SIZE;
        pkt.hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        // Every packet carries our credit.
        self.pending &= !P_CREDIT_UPDATE;
        Some(pkt)
    }

    fn read_host(&mut self, max_payload: usize) -> Option<VsockPacket> {
        if !(self.host_readable && self.can_read_host()) {
            return None;
        }
        let n = max_payload
            .min(MAX_PKT_BUF_SIZE)
            .min(self.peer_credit() as usize);
        if n == 0 {
            return None;
        }
        let mut buf = vec![0u8; n];
        match recv(self.stream.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => {
                self.host_readable = false;
                self.host_eof = true;
                self.pending |= P_SHUTDOWN;
                None
            }
            Ok(k) => {
                buf.truncate(k);
                self.sent_cnt += Wrapping(k as u32);
                if self.peer_credit() == 0 && !self.credit_requested {
                    self.pending |= P_CREDIT_REQUEST;
                    self.credit_requested = true;
                }
                let mut pkt = self.control(op::RW);
                pkt.data = buf;
                Some(pkt)
            }
            Err(Errno::EAGAIN) => {
                self.host_readable = false;
                None
            }
            Err(Errno::EINTR) => None,
            Err(e) => {
                debug!("vsock: host stream of {:?} failed: {e}", self.key);
                self.kill();
                None
            }
        }
    }

    fn next_control(&mut self) -> Option<VsockPacket> {
        if self.state == ConnState::Killed {
            return self.next_rx_pkt_killed();
        }
        if self.pending & P_SHUTDOWN != 0 {
            self.pending &= !P_SHUTDOWN;
            let mut flags = VSOCK_FLAGS_SHUTDOWN_SEND;
            if self.host_hup {
                flags |= VSOCK_FLAGS_SHUTDOWN_RCV;
            }
            if flags & !self.shutdown_flags_sent != 0 {
                self.shutdown_flags_sent |= flags;
                if flags & VSOCK_FLAGS_SHUTDOWN_RCV != 0 && self.state == ConnState::Established {
                    self.state = ConnState::Closing;
                    self.deadline = Some(Instant::now() + CONN_SHUTDOWN_TIMEOUT);
                }
                let mut pkt = self.control(op::SHUTDOWN);
                pkt.hdr.flags = flags;
                self.maybe_finish();
                return Some(pkt);
            }
        }
        if self.pending & P_CREDIT_UPDATE != 0 {
            return Some(self.control(op::CREDIT_UPDATE));
        }
        if self.pending & P_CREDIT_REQUEST != 0 {
            self.pending &= !P_CREDIT_REQUEST;
            return Some(self.control(op::CREDIT_REQUEST));
        }
        None
    }

    /// The RST of a killed connection (if the guest knows it), after which
    /// the connection is closed.
    fn next_rx_pkt_killed(&mut self) -> Option<VsockPacket> {
        let rst = self.pending & P_RST != 0;
        self.close();
        rst.then(|| self.control(op::RST))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::VsockHeader;
    use crate::virtio::vsock::VSOCK_TYPE_STREAM;
    use std::io::{Read, Write};
    use std::time::Duration;

    const GUEST_CID: u64 = 3;
    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 52,
    };

    fn guest_pkt(op: u16, data: &[u8]) -> VsockPacket {
        VsockPacket {
            hdr: VsockHeader {
                src_cid: GUEST_CID,
                dst_cid: VSOCK_HOST_CID,
                src_port: KEY.peer_port,
                dst_port: KEY.local_port,
                len: data.len() as u32,
                type_: VSOCK_TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 1024,
                fwd_cnt: 0,
            },
            data: data.to_vec(),
        }
    }

    fn shutdown_pkt(flags: u32) -> VsockPacket {
        let mut p = guest_pkt(op::SHUTDOWN, b"");
        p.hdr.flags = flags;
        p
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (a, b)
    }

    /// An established host-initiated connection; the client has read `OK`.
    fn established() -> (Connection, UnixStream) {
        let (a, mut client) = pair();
        let mut c = Connection::new_local(a, KEY, GUEST_CID, Instant::now());
        let req = c.next_rx_pkt(4096).unwrap();
        assert_eq!(req.hdr.op, op::REQUEST);
        assert_eq!(req.hdr.src_port, KEY.local_port);
        assert_eq!(req.hdr.dst_port, KEY.peer_port);
        assert_eq!(req.hdr.dst_cid, GUEST_CID);
        assert_eq!(req.hdr.buf_alloc, CONN_TX_BUF_SIZE);
        c.handle_guest_pkt(&guest_pkt(op::RESPONSE, b""));
        assert_eq!(c.state(), ConnState::Established);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        (c, client)
    }

    #[test]
    fn handshake_and_data_both_ways() {
        let (mut c, mut client) = established();
        c.handle_guest_pkt(&guest_pkt(op::RW, b"ping"));
        let mut buf = [0u8; 4];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // The OK line does not count as forwarded guest data.
        assert_eq!(c.fwd_cnt.0, 4);

        client.write_all(b"pong").unwrap();
        assert_eq!(c.interest(), Some(EventSet::IN));
        c.notify_host(EventSet::IN);
        assert!(c.has_pending_rx());
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!((p.hdr.op, p.data.as_slice()), (op::RW, &b"pong"[..]));
        assert_eq!(p.hdr.fwd_cnt, 4);
        // Nothing more to read: the next attempt finds EAGAIN and re-arms IN.
        assert!(c.next_rx_pkt(4096).is_none());
        assert_eq!(c.interest(), Some(EventSet::IN));
    }

    #[test]
    fn request_timeout_and_rst_while_waiting() {
        let (a, _client) = pair();
        let now = Instant::now();
        let mut c = Connection::new_local(a, KEY, GUEST_CID, now);
        // Timing out before the REQUEST went out closes silently.
        c.check_deadline(now + CONN_REQUEST_TIMEOUT);
        assert!(c.is_closed());

        let (a, _client) = pair();
        let mut c = Connection::new_local(a, KEY, GUEST_CID, now);
        c.next_rx_pkt(0).unwrap();
        c.check_deadline(now + Duration::from_millis(1));
        assert_eq!(c.state(), ConnState::LocalInit);
        c.check_deadline(now + CONN_REQUEST_TIMEOUT);
        assert_eq!(c.next_rx_pkt(0).unwrap().hdr.op, op::RST);
        assert!(c.is_closed());

        let (a, _client) = pair();
        let mut c = Connection::new_local(a, KEY, GUEST_CID, now);
        c.next_rx_pkt(0).unwrap();
        c.handle_guest_pkt(&guest_pkt(op::RST, b""));
        assert!(c.is_closed());
        assert!(!c.has_pending_rx());
    }

    #[test]
    fn unexpected_ops_reset_the_connection() {
        let (a, _client) = pair();
        let mut c = Connection::new_local(a, KEY, GUEST_CID, Instant::now());
        c.next_rx_pkt(0).unwrap();
        c.handle_guest_pkt(&guest_pkt(op::RW, b"early"));
        assert_eq!(c.state(), ConnState::Killed);
        assert_eq!(c.next_rx_pkt(0).unwrap().hdr.op, op::RST);

        let (mut c, _client) = established();
        c.handle_guest_pkt(&guest_pkt(op::REQUEST, b""));
        assert_eq!(c.next_rx_pkt(0).unwrap().hdr.op, op::RST);
    }

    #[test]
    fn never_sends_more_than_peer_credit() {
        let (mut c, mut client) = established();
        // The guest advertised 1024 bytes of buffer.
        client.write_all(&[7u8; 3000]).unwrap();
        c.notify_host(EventSet::IN);
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!(p.data.len(), 1024);
        assert_eq!(c.peer_credit(), 0);
        // Out of credit: ask for more, and stop reading the host.
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!(p.hdr.op, op::CREDIT_REQUEST);
        assert!(c.next_rx_pkt(4096).is_none());
        assert!(!c.has_pending_rx());
        assert_eq!(c.interest(), Some(EventSet::empty()));
        // The guest consumed 512 bytes.
        let mut upd = guest_pkt(op::CREDIT_UPDATE, b"");
        upd.hdr.fwd_cnt = 512;
        c.handle_guest_pkt(&upd);
        assert_eq!(c.peer_credit(), 512);
        assert!(c.has_pending_rx());
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!(p.data.len(), 512);
        // Small rx buffers bound the payload too.
        upd.hdr.fwd_cnt = 1536;
        c.handle_guest_pkt(&upd);
        assert_eq!(c.next_rx_pkt(100).unwrap().data.len(), 100);
    }

    #[test]
    fn guest_overrunning_credit_is_reset() {
        let (mut c, client) = established();
        // The host never reads, so data piles up in the socket and then in
        // our buffer; the guest may send at most CONN_TX_BUF_SIZE unacked.
        let chunk = vec![1u8; MAX_PKT_BUF_SIZE];
        let mut sent = 0usize;
        while sent + chunk.len() <= CONN_TX_BUF_SIZE as usize {
            c.handle_guest_pkt(&guest_pkt(op::RW, &chunk));
            sent += chunk.len();
            assert_eq!(c.state(), ConnState::Established);
        }
        // Credit updates carry fwd_cnt for what reached the socket; the guest
        // honouring them can keep going, but ignoring them overruns.
        let mut over = 0;
        while c.state() == ConnState::Established && over < 64 {
            c.handle_guest_pkt(&guest_pkt(op::RW, &chunk));
            over += 1;
        }
        assert_eq!(c.state(), ConnState::Killed);
        assert!(c.to_host.len() <= CONN_TX_BUF_SIZE as usize + 16);
        drop(client);
    }

    #[test]
    fn credit_update_after_forwarding_threshold() {
        let (mut c, mut client) = established();
        let chunk = vec![1u8; 32 * 1024];
        c.handle_guest_pkt(&guest_pkt(op::RW, &chunk));
        assert!(!c.has_pending_rx());
        c.handle_guest_pkt(&guest_pkt(op::RW, &chunk));
        let mut sink = vec![0u8; 64 * 1024];
        client.read_exact(&mut sink).unwrap();
        assert!(c.has_pending_rx());
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!(p.hdr.op, op::CREDIT_UPDATE);
        assert_eq!(p.hdr.fwd_cnt, 64 * 1024);
        assert_eq!(p.hdr.buf_alloc, CONN_TX_BUF_SIZE);
        // A credit request is answered.
        c.handle_guest_pkt(&guest_pkt(op::CREDIT_REQUEST, b""));
        assert_eq!(c.next_rx_pkt(4096).unwrap().hdr.op, op::CREDIT_UPDATE);
    }

    #[test]
    fn slow_host_buffers_then_drains_on_epollout() {
        let (mut c, mut client) = established();
        let chunk = vec![9u8; MAX_PKT_BUF_SIZE];
        for _ in 0..4 {
            c.handle_guest_pkt(&guest_pkt(op::RW, &chunk));
        }
        assert_eq!(c.state(), ConnState::Established);
        let buffered = c.to_host.len();
        assert!(buffered > 0, "socket buffer should have filled");
        assert!(c.interest().unwrap().contains(EventSet::OUT));
        let mut sink = vec![0u8; 4 * MAX_PKT_BUF_SIZE];
        let mut got = 0;
        while got < sink.len() {
            c.notify_host(EventSet::OUT);
            got += client.read(&mut sink[got..]).unwrap();
        }
        assert!(c.to_host.is_empty());
        assert_eq!(c.fwd_cnt.0 as usize, 4 * MAX_PKT_BUF_SIZE);
        assert!(!c.interest().unwrap().contains(EventSet::OUT));
    }

    #[test]
    fn guest_half_close_then_host_eof() {
        let (mut c, mut client) = established();
        c.handle_guest_pkt(&guest_pkt(op::RW, b"req"));
        c.handle_guest_pkt(&shutdown_pkt(VSOCK_FLAGS_SHUTDOWN_SEND));
        assert_eq!(c.state(), ConnState::Established);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"req", "host sees the data, then EOF");
        // Data after SHUTDOWN(SEND) is a protocol error... but first the
        // host answers and closes its side.
        client.write_all(b"resp").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        c.notify_host(EventSet::IN);
        assert_eq!(c.next_rx_pkt(4096).unwrap().data, b"resp");
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!(p.hdr.op, op::SHUTDOWN);
        assert_eq!(p.hdr.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
        // Both directions are done: the connection resets and closes.
        assert_eq!(c.next_rx_pkt(4096).unwrap().hdr.op, op::RST);
        assert!(c.is_closed());
    }

    #[test]
    fn guest_full_shutdown_flushes_then_resets() {
        let (mut c, mut client) = established();
        c.handle_guest_pkt(&guest_pkt(op::RW, b"bye"));
        c.handle_guest_pkt(&shutdown_pkt(
            VSOCK_FLAGS_SHUTDOWN_SEND | VSOCK_FLAGS_SHUTDOWN_RCV,
        ));
        assert_eq!(c.state(), ConnState::Killed);
        assert_eq!(c.next_rx_pkt(4096).unwrap().hdr.op, op::RST);
        assert!(c.is_closed());
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"bye");
    }

    #[test]
    fn guest_shutdown_rcv_stops_host_reads() {
        let (mut c, mut client) = established();
        c.handle_guest_pkt(&shutdown_pkt(VSOCK_FLAGS_SHUTDOWN_RCV));
        client.write_all(b"ignored").unwrap();
        c.notify_host(EventSet::IN);
        assert!(c.next_rx_pkt(4096).is_none());
        assert_eq!(c.interest(), Some(EventSet::empty()));
        // Guest-to-host still works.
        c.handle_guest_pkt(&guest_pkt(op::RW, b"x"));
        let mut b = [0u8; 1];
        client.read_exact(&mut b).unwrap();
    }

    #[test]
    fn host_close_sends_full_shutdown_and_waits_for_rst() {
        let (mut c, mut client) = established();
        client.write_all(b"last").unwrap();
        drop(client);
        c.notify_host(EventSet::IN | EventSet::HANG_UP);
        assert_eq!(c.interest(), None, "hung-up streams leave the epoll set");
        assert_eq!(c.next_rx_pkt(4096).unwrap().data, b"last");
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!(p.hdr.op, op::SHUTDOWN);
        assert_eq!(
            p.hdr.flags,
            VSOCK_FLAGS_SHUTDOWN_SEND | VSOCK_FLAGS_SHUTDOWN_RCV
        );
        assert_eq!(c.state(), ConnState::Closing);
        c.handle_guest_pkt(&guest_pkt(op::RST, b""));
        assert!(c.is_closed());

        // Without the guest's RST the deadline resets the connection.
        let (mut c, client) = established();
        drop(client);
        c.notify_host(EventSet::IN | EventSet::HANG_UP);
        assert_eq!(c.next_rx_pkt(4096).unwrap().hdr.op, op::SHUTDOWN);
        c.check_deadline(Instant::now() + CONN_SHUTDOWN_TIMEOUT + Duration::from_millis(1));
        assert_eq!(c.next_rx_pkt(4096).unwrap().hdr.op, op::RST);
    }

    #[test]
    fn guest_initiated_response() {
        let (a, _b) = pair();
        let mut c = Connection::new_peer(a, KEY, GUEST_CID, 4096, 0);
        assert!(c.has_pending_rx());
        let p = c.next_rx_pkt(4096).unwrap();
        assert_eq!(p.hdr.op, op::RESPONSE);
        assert_eq!(c.state(), ConnState::Established);
        assert_eq!(c.peer_credit(), 4096);
        // Host socket gone before the response: RST instead.
        let (a, b) = pair();
        drop(b);
        let mut c = Connection::new_peer(a, KEY, GUEST_CID, 4096, 0);
        c.notify_host(EventSet::HANG_UP);
        assert_eq!(c.next_rx_pkt(4096).unwrap().hdr.op, op::RST);
    }

    #[test]
    fn writes_to_closed_host_reset_without_sigpipe() {
        let (mut c, client) = established();
        drop(client);
        c.handle_guest_pkt(&guest_pkt(op::RW, b"into the void"));
        assert_eq!(c.state(), ConnState::Killed);
    }
}
