//! The host side of the vsock device: Unix sockets in place of host vsock.
//!
//! The muxer owns the listener at `uds_path`, the host clients still
//! completing their `CONNECT <port>\n` handshake, and every [`Connection`].
//! It routes guest packets to connections (or answers them with RST), hands
//! out the next packet for the guest in round-robin order, and keeps the
//! epoll interest of every host stream in step with the connection states
//! ([`Muxer::sync_interest`]). Streams are closed only after they left the
//! epoll set, so a file descriptor number is never reused while the event
//! manager still knows it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::ops::Bound;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use event_manager::EventSet;
use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::socket::{
    connect, recv, socket, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};

use super::connection::{ConnKey, Connection};
use super::packet::VsockPacket;
use super::{
    op, VsockError, CLIENT_LINE_TIMEOUT, HOST_PORT_FIRST, MAX_CONNECTIONS, MAX_PENDING_CLIENTS,
    MAX_RST_BACKLOG, VSOCK_HOST_CID, VSOCK_TYPE_STREAM,
};

/// Longest `CONNECT <port>\n` line we accept.
pub const MAX_CONNECT_LINE: usize = 32;

/// Why a host client's handshake failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client closed before a full line.
    #[error("client closed during the handshake")]
    Eof,
    /// No newline within [`MAX_CONNECT_LINE`] bytes.
    #[error("CONNECT line too long")]
    TooLong,
    /// Not `CONNECT <decimal port>\n`.
    #[error("malformed CONNECT line")]
    Malformed,
    /// The port does not fit a vsock port.
    #[error("port out of range")]
    PortOutOfRange,
    /// Reading the socket failed.
    #[error("handshake read failed: {0}")]
    Io(Errno),
}

/// Parses `CONNECT <port>\n` (a trailing `\r` is tolerated).
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let line = line.strip_suffix(b"\n").ok_or(HandshakeError::Malformed)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .strip_prefix(b"CONNECT ")
        .ok_or(HandshakeError::Malformed)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HandshakeError::Malformed);
    }
    // All ASCII digits, so valid UTF-8.
    let s = std::str::from_utf8(digits).map_err(|_| HandshakeError::Malformed)?;
    match s.parse::<u32>() {
        // u32::MAX is VMADDR_PORT_ANY, not a real port.
        Ok(port) if port != u32::MAX => Ok(port),
        _ => Err(HandshakeError::PortOutOfRange),
    }
}

/// A change to apply to the event manager's epoll set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdOp {
    /// Start watching `fd`.
    Add(RawFd, EventSet),
    /// Change the events watched on `fd`.
    Modify(RawFd, EventSet),
    /// Stop watching `fd`.
    Remove(RawFd),
}

#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The Unix-socket backend of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: BTreeMap<ConnKey, Connection>,
    fd_conn: HashMap<RawFd, ConnKey>,
    clients: HashMap<RawFd, PendingClient>,
    rst_backlog: VecDeque<VsockPacket>,
    registered: HashMap<RawFd, EventSet>,
    graveyard: Vec<UnixStream>,
    next_host_port: u32,
    rr_cursor: Option<ConnKey>,
}

impl Muxer {
    /// Listens on `uds_path`, which must not exist.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        if let Err(e) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(uds_path);
            return Err(listen_err(e));
        }
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: BTreeMap::new(),
            fd_conn: HashMap::new(),
            clients: HashMap::new(),
            rst_backlog: VecDeque::new(),
            registered: HashMap::new(),
            graveyard: Vec::new(),
            next_host_port: HOST_PORT_FIRST,
            rr_cursor: None,
        })
    }

    /// The path host clients connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The listener's file descriptor (watch it for `EPOLLIN`).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Every live connection, for the fuzz targets' invariants.
    #[cfg(feature = "fuzzing")]
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values()
    }

    /// The host port the next host-initiated connection tries first.
    pub fn next_host_port(&self) -> u32 {
        self.next_host_port
    }

    /// Continues host-port allocation at `port` (after a snapshot restore,
    /// so new connections do not reuse the ports of connections the guest
    /// may not have dropped yet). Ports outside `HOST_PORT_FIRST..u32::MAX`
    /// restart at [`HOST_PORT_FIRST`].
    pub fn set_next_host_port(&mut self, port: u32) {
        self.next_host_port = if (HOST_PORT_FIRST..u32::MAX).contains(&port) {
            port
        } else {
            HOST_PORT_FIRST
        };
    }

    /// Accepts host clients. With `guest_ready` false (no driver yet) they
    /// are closed at once.
    pub fn accept_clients(&mut self, guest_ready: bool, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !guest_ready {
                        debug!("vsock: guest driver not ready, closing host client");
                        continue;
                    }
                    if self.clients.len() >= MAX_PENDING_CLIENTS {
                        warn!("vsock: too many pending host clients, closing one");
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("vsock: cannot make host client non-blocking: {e}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.clients.insert(
                        fd,
                        PendingClient {
                            stream,
                            line: Vec::new(),
                            deadline: now + CLIENT_LINE_TIMEOUT,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: accept on {:?} failed: {e}", self.uds_path);
                    break;
                }
            }
        }
    }

    /// Handles readiness of a host stream (client or connection).
    pub fn notify_fd(&mut self, fd: RawFd, evset: EventSet, guest_ready: bool, now: Instant) {
        if self.clients.contains_key(&fd) {
            self.handle_client(fd, evset, guest_ready, now);
        } else if let Some(&key) = self.fd_conn.get(&fd) {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.notify_host(evset);
            }
            self.reap(key);
        } else {
            debug!("vsock: event {evset:?} for unknown fd {fd}");
        }
    }

    fn handle_client(&mut self, fd: RawFd, evset: EventSet, guest_ready: bool, now: Instant) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let result = if evset.contains(EventSet::IN) {
            read_connect_line(client)
        } else {
            Ok(None)
        };
        let result = match result {
            Ok(None) if evset.intersects(EventSet::HANG_UP | EventSet::ERROR) => {
                Err(HandshakeError::Eof)
            }
            r => r,
        };
        let port = match result {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(e) => {
                debug!("vsock: host client handshake failed: {e}");
                self.drop_client(fd);
                return;
            }
        };
        let Some(client) = self.clients.remove(&fd) else {
            return;
        };
        if !guest_ready {
            self.bury(client.stream);
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached, refusing host client");
            self.bury(client.stream);
            return;
        }
        let host_port = self.alloc_host_port();
        let key = ConnKey {
            local_port: host_port,
            peer_port: port,
        };
        debug!("vsock: host client connecting to guest port {port} from {host_port}");
        self.fd_conn.insert(fd, key);
        self.conns.insert(
            key,
            Connection::new_local(client.stream, key, self.guest_cid, now),
        );
    }

    fn drop_client(&mut self, fd: RawFd) {
        if let Some(client) = self.clients.remove(&fd) {
            self.bury(client.stream);
        }
    }

    fn local_port_in_use(&self, port: u32) -> bool {
        let lo = ConnKey {
            local_port: port,
            peer_port: 0,
        };
        let hi = ConnKey {
            local_port: port,
            peer_port: u32::MAX,
        };
        self.conns.range(lo..=hi).next().is_some()
    }

    /// A host port not used by any live connection; ports are handed out in
    /// order from [`HOST_PORT_FIRST`], wrapping, so they are not reused soon.
    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = if port >= u32::MAX - 1 {
                HOST_PORT_FIRST
            } else {
                port + 1
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if !self.local_port_in_use(port) {
                return port;
            }
        }
    }

    /// Whether the RST backlog is full; tx processing should pause.
    pub fn rst_backlog_full(&self) -> bool {
        self.rst_backlog.len() >= MAX_RST_BACKLOG
    }

    fn queue_rst(&mut self, pkt: &VsockPacket) {
        let h = &pkt.hdr;
        if h.op == op::RST {
            return;
        }
        if self.rst_backlog_full() {
            warn!(
                "vsock: RST backlog full, dropping RST to guest port {}",
                h.src_port
            );
            return;
        }
        self.rst_backlog.push_back(VsockPacket::control(
            (VSOCK_HOST_CID, h.dst_port),
            (self.guest_cid, h.src_port),
            op::RST,
        ));
    }

    /// Routes one packet from the guest.
    pub fn handle_guest_pkt(&mut self, pkt: VsockPacket) {
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid {
            warn!("vsock: dropping packet with source CID {}", h.src_cid);
            return;
        }
        if h.dst_cid != VSOCK_HOST_CID || h.type_ != VSOCK_TYPE_STREAM {
            debug!(
                "vsock: resetting packet to CID {} type {}",
                h.dst_cid, h.type_
            );
            self.queue_rst(&pkt);
            return;
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            if h.op == op::REQUEST {
                warn!("vsock: REQUEST for existing connection {key:?}");
                conn.kill();
            } else {
                conn.handle_guest_pkt(&pkt);
            }
            self.reap(key);
            return;
        }
        match h.op {
            op::REQUEST => self.connect_to_host(key, h.buf_alloc, h.fwd_cnt, &pkt),
            op::RST => {}
            _ => self.queue_rst(&pkt),
        }
    }

    fn connect_to_host(&mut self, key: ConnKey, buf_alloc: u32, fwd_cnt: u32, pkt: &VsockPacket) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached, refusing guest connection");
            self.queue_rst(pkt);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                debug!("vsock: guest port {} connected to {path:?}", key.peer_port);
                self.fd_conn.insert(stream.as_raw_fd(), key);
                self.conns.insert(
                    key,
                    Connection::new_peer(stream, key, self.guest_cid, buf_alloc, fwd_cnt),
                );
            }
            Err(e) => {
                debug!("vsock: guest connection to {path:?} refused: {e}");
                self.queue_rst(pkt);
            }
        }
    }

    /// Whether a packet for the guest may be ready.
    pub fn has_pending_rx(&self) -> bool {
        !self.rst_backlog.is_empty() || self.conns.values().any(Connection::has_pending_rx)
    }

    /// The next packet for the guest (payload at most `max_payload` bytes),
    /// taking connections in turn.
    pub fn next_rx_pkt(&mut self, max_payload: usize) -> Option<VsockPacket> {
        if let Some(p) = self.rst_backlog.pop_front() {
            return Some(p);
        }
        let keys: Vec<ConnKey> = match self.rr_cursor {
            Some(c) => self
                .conns
                .range((Bound::Excluded(c), Bound::Unbounded))
                .chain(self.conns.range(..=c))
                .filter(|(_, conn)| conn.has_pending_rx())
                .map(|(k, _)| *k)
                .collect(),
            None => self
                .conns
                .iter()
                .filter(|(_, conn)| conn.has_pending_rx())
                .map(|(k, _)| *k)
                .collect(),
        };
        for key in keys {
            let pkt = self
                .conns
                .get_mut(&key)
                .and_then(|c| c.next_rx_pkt(max_payload));
            self.reap(key);
            if pkt.is_some() {
                self.rr_cursor = Some(key);
                return pkt;
            }
        }
        None
    }

    /// The earliest deadline of any connection or pending client.
    pub fn next_deadline(&self) -> Option<Instant> {
        let conns = self.conns.values().filter_map(Connection::deadline);
        let clients = self.clients.values().map(|c| c.deadline);
        conns.chain(clients).min()
    }

    /// Expires handshakes and shutdowns due at `now`.
    pub fn check_deadlines(&mut self, now: Instant) {
        let expired: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            debug!("vsock: host client did not send CONNECT in time");
            self.drop_client(fd);
        }
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.check_deadline(now);
            }
            self.reap(key);
        }
    }

    fn reap(&mut self, key: ConnKey) {
        if self.conns.get(&key).is_some_and(Connection::is_closed) {
            if let Some(conn) = self.conns.remove(&key) {
                self.fd_conn.remove(&conn.fd());
                self.bury(conn.into_stream());
            }
        }
    }

    /// Closes `stream` once it is off the epoll set.
    fn bury(&mut self, stream: UnixStream) {
        if self.registered.contains_key(&stream.as_raw_fd()) {
            self.graveyard.push(stream);
        }
    }

    /// Drops every connection and pending client without telling the guest
    /// (device reset or transport reset). Host clients see EOF at once; the
    /// streams close at the next [`Self::sync_interest`].
    pub fn reset(&mut self) {
        if !self.conns.is_empty() {
            info!("vsock: dropping {} connections", self.conns.len());
        }
        let conns = std::mem::take(&mut self.conns);
        self.fd_conn.clear();
        for (_, conn) in conns {
            let stream = conn.into_stream();
            let _ = stream.shutdown(std::net::Shutdown::Both);
            self.bury(stream);
        }
        let clients = std::mem::take(&mut self.clients);
        for (_, client) in clients {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
            self.bury(client.stream);
        }
        self.rst_backlog.clear();
        self.rr_cursor = None;
    }

    /// Brings the epoll set in line with what every host stream needs,
    /// calling `apply` for each change (it returns whether the change took),
    /// then closes buried streams. Streams whose registration failed are
    /// reset; returns whether that happened (then rx has work again).
    pub fn sync_interest(&mut self, mut apply: impl FnMut(FdOp) -> bool) -> bool {
        let mut desired: HashMap<RawFd, EventSet> = HashMap::new();
        for conn in self.conns.values() {
            if let Some(set) = conn.interest() {
                desired.insert(conn.fd(), set);
            }
        }
        for fd in self.clients.keys() {
            desired.insert(*fd, EventSet::IN);
        }
        let stale: Vec<RawFd> = self
            .registered
            .keys()
            .filter(|fd| !desired.contains_key(fd))
            .copied()
            .collect();
        for fd in stale {
            if !apply(FdOp::Remove(fd)) {
                warn!("vsock: cannot unwatch fd {fd}");
            }
            self.registered.remove(&fd);
        }
        let mut failed = Vec::new();
        for (fd, set) in desired {
            let op = match self.registered.get(&fd) {
                Some(old) if *old == set => continue,
                Some(_) => FdOp::Modify(fd, set),
                None => FdOp::Add(fd, set),
            };
            if apply(op) {
                self.registered.insert(fd, set);
            } else {
                warn!("vsock: cannot watch fd {fd} for {set:?}");
                failed.push(fd);
            }
        }
        self.graveyard.clear();
        let mut killed = false;
        for fd in failed {
            if self.clients.contains_key(&fd) {
                // Not registered, so closing it now is safe.
                self.clients.remove(&fd);
            } else if let Some(&key) = self.fd_conn.get(&fd) {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.kill();
                    killed = true;
                }
                self.reap(key);
            }
        }
        killed
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            debug!("vsock: cannot remove {:?}: {e}", self.uds_path);
        }
    }
}

/// Reads what is available of the `CONNECT` line without consuming bytes
/// past its newline (they belong to the stream). Returns the port once the
/// line is complete.
fn read_connect_line(client: &mut PendingClient) -> Result<Option<u32>, HandshakeError> {
    loop {
        let room = MAX_CONNECT_LINE.saturating_sub(client.line.len());
        if room == 0 {
            return Err(HandshakeError::TooLong);
        }
        let mut peek = [0u8; MAX_CONNECT_LINE];
        let n = match recv(
            client.stream.as_raw_fd(),
            &mut peek[..room],
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => return Err(HandshakeError::Eof),
            Ok(n) => n,
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(HandshakeError::Io(e)),
        };
        let (take, complete) = match peek[..n].iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (n, false),
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let got = match client.stream.read(&mut buf[..take]) {
            Ok(0) => return Err(HandshakeError::Eof),
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => {
                return Err(HandshakeError::Io(Errno::from_raw(
                    e.raw_os_error().unwrap_or(0),
                )))
            }
        };
        client.line.extend_from_slice(&buf[..got]);
        if complete && got == take {
            return parse_connect_line(&client.line).map(Some);
        }
    }
}

/// Connects to a Unix stream socket without ever blocking (a full backlog
/// fails with `EAGAIN` instead of waiting).
fn connect_nonblocking(path: &Path) -> nix::Result<UnixStream> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::connection::ConnState;
    use crate::virtio::vsock::packet::VsockHeader;
    use std::io::Write;
    use std::time::Duration;

    const GUEST_CID: u64 = 3;

    pub(crate) fn temp_path(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir();
        let unique = format!(
            "arrow-vsock-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        dir.join(unique)
    }

    fn guest_pkt(op: u16, src_port: u32, dst_port: u32) -> VsockPacket {
        VsockPacket {
            hdr: VsockHeader {
                src_cid: GUEST_CID,
                dst_cid: VSOCK_HOST_CID,
                src_port,
                dst_port,
                len: 0,
                type_: VSOCK_TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 65536,
                fwd_cnt: 0,
            },
            data: Vec::new(),
        }
    }

    /// Accepts the client and feeds it `bytes`; returns the muxer's view.
    fn connect_client(m: &mut Muxer, bytes: &[u8]) -> UnixStream {
        let mut client = UnixStream::connect(m.uds_path()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        m.accept_clients(true, Instant::now());
        client.write_all(bytes).unwrap();
        let fds: Vec<RawFd> = m.clients.keys().copied().collect();
        for fd in fds {
            m.notify_fd(fd, EventSet::IN, true, Instant::now());
        }
        client
    }

    #[test]
    fn parse_connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 52\n"), Ok(52));
        assert_eq!(parse_connect_line(b"CONNECT 52\r\n"), Ok(52));
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967294\n"),
            Ok(u32::MAX - 1)
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967295\n"),
            Err(HandshakeError::PortOutOfRange)
        );
        assert_eq!(
            parse_connect_line(b"CONNECT 99999999999\n"),
            Err(HandshakeError::PortOutOfRange)
        );
        for bad in [
            &b"CONNECT 52"[..],
            b"connect 52\n",
            b"CONNECT\n",
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT +5\n",
            b"CONNECT 5 6\n",
            b"CONNECT  5\n",
            b"CONNECT 0x10\n",
            b"\n",
            b"",
        ] {
            assert_eq!(
                parse_connect_line(bad),
                Err(HandshakeError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn good_connect_sends_request_from_fresh_host_ports() {
        let path = temp_path("good");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        let _c1 = connect_client(&mut m, b"CONNECT 52\n");
        let _c2 = connect_client(&mut m, b"CONNECT 52\n");
        assert_eq!(m.connection_count(), 2);
        let p1 = m.next_rx_pkt(4096).unwrap();
        let p2 = m.next_rx_pkt(4096).unwrap();
        assert!(m.next_rx_pkt(4096).is_none());
        for p in [&p1, &p2] {
            assert_eq!(p.hdr.op, op::REQUEST);
            assert_eq!(p.hdr.dst_port, 52);
            assert_eq!(p.hdr.dst_cid, GUEST_CID);
            assert_eq!(p.hdr.src_cid, VSOCK_HOST_CID);
            assert!(p.hdr.src_port >= HOST_PORT_FIRST);
        }
        assert_ne!(p1.hdr.src_port, p2.hdr.src_port);
        drop(m);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn connect_line_in_pieces_keeps_following_bytes() {
        let path = temp_path("pieces");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        let mut client = connect_client(&mut m, b"CONN");
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.clients.len(), 1);
        client.write_all(b"ECT 7\nearly data").unwrap();
        let fd = *m.clients.keys().next().unwrap();
        m.notify_fd(fd, EventSet::IN, true, Instant::now());
        assert_eq!(m.connection_count(), 1);
        let req = m.next_rx_pkt(4096).unwrap();
        let mut resp = guest_pkt(op::RESPONSE, 7, req.hdr.src_port);
        resp.hdr.buf_alloc = 4096;
        m.handle_guest_pkt(resp);
        let mut line = String::new();
        let mut b = [0u8; 1];
        while !line.ends_with('\n') {
            std::io::Read::read_exact(&mut client, &mut b).unwrap();
            line.push(b[0] as char);
        }
        assert_eq!(line, format!("OK {}\n", req.hdr.src_port));
        // The bytes after the line were left in the stream for the guest.
        m.notify_fd(fd, EventSet::IN, true, Instant::now());
        assert_eq!(m.next_rx_pkt(4096).unwrap().data, b"early data");
    }

    #[test]
    fn malformed_or_out_of_range_connect_closes_client() {
        let path = temp_path("bad");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        for line in [&b"HELLO 52\n"[..], b"CONNECT 4294967296\n", &[b'A'; 40]] {
            let mut client = connect_client(&mut m, line);
            assert_eq!(m.connection_count(), 0);
            assert!(m.clients.is_empty());
            m.sync_interest(|_| true);
            let mut buf = [0u8; 8];
            // Closed: EOF, or a reset when unread bytes were left behind.
            match std::io::Read::read(&mut client, &mut buf) {
                Ok(n) => assert_eq!(n, 0, "{line:?}"),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{line:?}"),
            }
        }
    }

    #[test]
    fn clients_closed_when_guest_not_ready_or_silent() {
        let path = temp_path("notready");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        m.accept_clients(false, Instant::now());
        assert!(m.clients.is_empty());
        let mut buf = [0u8; 4];
        assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap(), 0);

        // A client that never sends its line times out.
        let mut client = UnixStream::connect(&path).unwrap();
        let now = Instant::now();
        m.accept_clients(true, now);
        m.sync_interest(|_| true);
        assert_eq!(m.next_deadline(), Some(now + CLIENT_LINE_TIMEOUT));
        m.check_deadlines(now + CLIENT_LINE_TIMEOUT);
        m.sync_interest(|_| true);
        assert!(m.clients.is_empty());
        assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap(), 0);
    }

    #[test]
    fn guest_rst_closes_host_client() {
        let path = temp_path("rst");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        let mut client = connect_client(&mut m, b"CONNECT 1234\n");
        m.sync_interest(|_| true);
        let req = m.next_rx_pkt(4096).unwrap();
        m.handle_guest_pkt(guest_pkt(op::RST, 1234, req.hdr.src_port));
        assert_eq!(m.connection_count(), 0);
        m.sync_interest(|_| true);
        let mut buf = [0u8; 4];
        assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap(), 0);
        // No RST is sent back for an RST.
        assert!(m.next_rx_pkt(4096).is_none());
    }

    #[test]
    fn request_timeout_resets_and_closes() {
        let path = temp_path("timeout");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        let mut client = connect_client(&mut m, b"CONNECT 1234\n");
        m.next_rx_pkt(4096).unwrap();
        let deadline = m.next_deadline().unwrap();
        m.check_deadlines(deadline);
        assert_eq!(m.next_rx_pkt(4096).unwrap().hdr.op, op::RST);
        assert_eq!(m.connection_count(), 0);
        m.sync_interest(|_| true);
        let mut buf = [0u8; 4];
        assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap(), 0);
    }

    #[test]
    fn guest_initiated_connections() {
        let path = temp_path("guestinit");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        // Nobody listens on <path>_9000: RST.
        m.handle_guest_pkt(guest_pkt(op::REQUEST, 5000, 9000));
        let rst = m.next_rx_pkt(4096).unwrap();
        assert_eq!(rst.hdr.op, op::RST);
        assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (9000, 5000));

        let mut lpath = OsString::from(path.as_os_str());
        lpath.push("_9000");
        let listener = UnixListener::bind(&lpath).unwrap();
        m.handle_guest_pkt(guest_pkt(op::REQUEST, 5000, 9000));
        let resp = m.next_rx_pkt(4096).unwrap();
        assert_eq!(resp.hdr.op, op::RESPONSE);
        let (mut host, _) = listener.accept().unwrap();
        let mut rw = guest_pkt(op::RW, 5000, 9000);
        rw.data = b"hi host".to_vec();
        rw.hdr.len = 7;
        m.handle_guest_pkt(rw);
        let mut buf = [0u8; 7];
        std::io::Read::read_exact(&mut host, &mut buf).unwrap();
        assert_eq!(&buf, b"hi host");
        let _ = std::fs::remove_file(&lpath);
    }

    #[test]
    fn bad_packets_are_reset_or_dropped() {
        let path = temp_path("badpkt");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        // Wrong source CID: dropped.
        let mut p = guest_pkt(op::REQUEST, 1, 2);
        p.hdr.src_cid = 99;
        m.handle_guest_pkt(p);
        assert!(!m.has_pending_rx());
        // Wrong destination CID, type or unknown connection: RST.
        let mut p = guest_pkt(op::REQUEST, 1, 2);
        p.hdr.dst_cid = 7;
        m.handle_guest_pkt(p);
        let mut p = guest_pkt(op::REQUEST, 1, 2);
        p.hdr.type_ = 2;
        m.handle_guest_pkt(p);
        m.handle_guest_pkt(guest_pkt(op::RW, 1, 2));
        m.handle_guest_pkt(guest_pkt(0xffff, 1, 2));
        for _ in 0..4 {
            assert_eq!(m.next_rx_pkt(4096).unwrap().hdr.op, op::RST);
        }
        assert!(m.next_rx_pkt(4096).is_none());
        // The backlog is bounded.
        for i in 0..(MAX_RST_BACKLOG as u32 + 10) {
            m.handle_guest_pkt(guest_pkt(op::RW, i, 2));
        }
        assert!(m.rst_backlog_full());
        assert_eq!(m.rst_backlog.len(), MAX_RST_BACKLOG);
    }

    #[test]
    fn interest_sync_and_reset() {
        let path = temp_path("sync");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        let mut client = connect_client(&mut m, b"CONNECT 52\n");
        let mut ops = Vec::new();
        m.sync_interest(|op| {
            ops.push(op);
            true
        });
        // The connection waits for the guest: registered with no events.
        assert!(matches!(ops.as_slice(), [FdOp::Add(_, set)] if set.is_empty()));
        let req = m.next_rx_pkt(4096).unwrap();
        m.handle_guest_pkt(guest_pkt(op::RESPONSE, 52, req.hdr.src_port));
        ops.clear();
        m.sync_interest(|op| {
            ops.push(op);
            true
        });
        assert!(matches!(ops.as_slice(), [FdOp::Modify(_, set)] if *set == EventSet::IN));
        let conn_state = m.conns.values().next().unwrap().state();
        assert_eq!(conn_state, ConnState::Established);

        m.reset();
        assert_eq!(m.connection_count(), 0);
        ops.clear();
        m.sync_interest(|op| {
            ops.push(op);
            true
        });
        assert!(matches!(ops.as_slice(), [FdOp::Remove(_)]));
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut client, &mut buf).unwrap();
        assert!(buf[..n].starts_with(b"OK"));
        assert_eq!(std::io::Read::read(&mut client, &mut buf).unwrap(), 0);
    }

    #[test]
    fn failed_registration_resets_connection() {
        let path = temp_path("regfail");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        let _client = connect_client(&mut m, b"CONNECT 52\n");
        let req = m.next_rx_pkt(4096).unwrap();
        m.handle_guest_pkt(guest_pkt(op::RESPONSE, 52, req.hdr.src_port));
        assert!(m.sync_interest(|_| false));
        assert_eq!(m.next_rx_pkt(4096).unwrap().hdr.op, op::RST);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn host_ports_skip_live_ones_and_wrap() {
        let path = temp_path("ports");
        let mut m = Muxer::new(GUEST_CID, &path).unwrap();
        m.next_host_port = u32::MAX - 2;
        let _c = connect_client(&mut m, b"CONNECT 1\n");
        assert_eq!(m.conns.keys().next().unwrap().local_port, u32::MAX - 2);
        let p1 = m.alloc_host_port();
        assert_eq!(p1, u32::MAX - 1);
        assert_eq!(m.alloc_host_port(), HOST_PORT_FIRST);
        m.next_host_port = u32::MAX - 2;
        // u32::MAX - 2 is live, so it is skipped.
        assert_eq!(m.alloc_host_port(), u32::MAX - 1);
    }
}
