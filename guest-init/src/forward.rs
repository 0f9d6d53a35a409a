//! Port-forward streams (`kubectl port-forward`): each connection on the
//! forward port opens one TCP connection to `127.0.0.1:<port>` inside the
//! guest, then carries its bytes both ways. The guest's loopback is the
//! pod's, so a server a container binds to localhost is reachable, exactly
//! as kubelet's port-forward reaches it under runc, and nothing of the pod
//! network is exposed on the host.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

use proto::agent::{PortForwardOpen, PortForwardOpened};
use proto::{read_frame, write_frame};

use crate::agent::THREAD_STACK;
use crate::conn::{Conn, Listener};
use crate::error::AgentError;
use crate::log_debug;

/// How long connecting to the forwarded port may take: on loopback a
/// listener answers at once, so this only bounds a full accept backlog.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Buffer of each direction's copy.
const COPY_BUF: usize = 32 * 1024;

/// Accepts port-forward connections forever; returns only if accepting
/// fails for good.
pub fn serve(listener: Listener) -> io::Error {
    crate::agent::accept_loop(&listener, "forward", |conn| move || handle_connection(conn))
}

fn handle_connection(conn: Conn) {
    // Unbuffered: the raw bytes that follow must stay in the socket.
    let open: PortForwardOpen = match read_frame(&mut &conn) {
        Ok(Some(open)) => open,
        Ok(None) => return,
        Err(e) => {
            log_debug!("dropping port-forward connection: {e}");
            return;
        }
    };
    let opened = connect(open.port);
    let reply = PortForwardOpened {
        error: opened.as_ref().err().map(AgentError::to_wire),
    };
    if let Err(e) = write_frame(&mut &conn, &reply) {
        log_debug!("port-forward reply: {e}");
        return;
    }
    match opened {
        Ok(tcp) => relay(&conn, &tcp),
        Err(e) => log_debug!("port-forward refused: {e}"),
    }
}

/// Connects to the guest's 127.0.0.1:`port`.
fn connect(port: u32) -> Result<TcpStream, AgentError> {
    let port = u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| AgentError::InvalidArgument(format!("bad port {port} to forward")))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut => {
            AgentError::Unavailable(format!("connect to {addr} in the pod: {e}"))
        }
        _ => AgentError::Internal {
            what: "connect to the forwarded port",
            source: e,
        },
    })?;
    // Small writes (an interactive protocol) go out at once, as on the host.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Carries bytes both ways until both directions ended: host -> guest on a
/// second thread, guest -> host on this one. An end of stream is passed on
/// as a half-close; an error ends both directions.
fn relay(conn: &Conn, tcp: &TcpStream) {
    let abort = || {
        let _ = conn.shutdown(Shutdown::Both);
        let _ = tcp.shutdown(Shutdown::Both);
    };
    thread::scope(|scope| {
        let upstream = thread::Builder::new()
            .name("forward-up".into())
            .stack_size(THREAD_STACK)
            .spawn_scoped(scope, || match pump(conn, tcp) {
                Ok(()) => {
                    let _ = tcp.shutdown(Shutdown::Write);
                }
                Err(e) => {
                    log_debug!("port-forward host -> pod: {e}");
                    abort();
                }
            });
        if let Err(e) = upstream {
            log_debug!("port-forward: cannot start a copy thread: {e}");
            abort();
            return;
        }
        match pump(tcp, conn) {
            Ok(()) => {
                let _ = conn.shutdown(Shutdown::Write);
            }
            Err(e) => {
                log_debug!("port-forward pod -> host: {e}");
                abort();
            }
        }
    });
}

/// Copies `src` to `dst` until `src` ends.
fn pump(mut src: impl Read, mut dst: impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => dst.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;

    fn conn_pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn::from_fd(a.into()), b)
    }

    #[test]
    fn bad_ports_are_invalid_arguments() {
        for port in [0, 65536, u32::MAX] {
            let err = connect(port).unwrap_err();
            assert_eq!(err.code(), proto::agent::error::Code::InvalidArgument);
        }
    }

    #[test]
    fn a_closed_port_is_unavailable() {
        // Bound, then closed: nobody listens there now.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = connect(u32::from(port)).unwrap_err();
        assert_eq!(err.code(), proto::agent::error::Code::Unavailable, "{err}");
    }

    #[test]
    fn relays_both_ways_and_passes_half_closes_on() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(&got).unwrap();
        });
        let (conn, mut host) = conn_pair();
        let agent = thread::spawn(move || handle_connection(conn));
        let host = proto::client::open_port_forward(&mut host, port).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        host.write_all(&data).unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        host.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        echo.join().unwrap();
        agent.join().unwrap();
    }

    #[test]
    fn the_open_reply_carries_the_refusal() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (conn, mut host) = conn_pair();
        let agent = thread::spawn(move || handle_connection(conn));
        match proto::client::open_port_forward(&mut host, port) {
            Err(proto::client::ClientError::Unavailable(msg)) => assert!(msg.contains("refused")),
            other => panic!("{:?}", other.map(|_| ())),
        }
        agent.join().unwrap();
    }
}
