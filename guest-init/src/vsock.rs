//! The guest end of virtio-vsock: a listening AF_VSOCK socket per service.

use std::io;

use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::conn::Listener;

/// Listens on vsock `port` for connections from any CID (in practice the
/// host, through the VMM).
pub fn listen_port(port: u32) -> io::Result<Listener> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = VsockAddr::new(libc::VMADDR_CID_ANY, port);
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    listen(&fd, Backlog::new(64)?)?;
    Ok(Listener::from_fd(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_where_vsock_exists() {
        let port = 40_000 + std::process::id() % 20_000;
        match listen_port(port) {
            Ok(_) => {}
            // Hosts without the vsock family cannot run this test.
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => panic!("vsock listen on {port}: {e}"),
        }
    }
}
