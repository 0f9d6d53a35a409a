//! Stream sockets as plain file descriptors, so the agent serves AF_VSOCK in
//! the guest and AF_UNIX in host tests with the same code.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

/// Whether `err` means the peer or the transport ended the connection (the
/// host closed it, or the VMM reset vsock after a snapshot restore): the
/// connection is over, nothing is wrong with the agent.
pub fn is_disconnect(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ECONNRESET
                | libc::EPIPE
                | libc::ENOTCONN
                | libc::ECONNABORTED
                | libc::ESHUTDOWN
                | libc::ETIMEDOUT
        )
    )
}

/// A connected stream socket.
#[derive(Debug)]
pub struct Conn(File);

impl Conn {
    /// Wraps a connected stream socket.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self(File::from(fd))
    }

    /// Stops reading, writing or both; wakes any thread blocked on the socket.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown(2) on a socket fd we own; no memory is passed.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), how) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for &Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.0).read(buf)
    }
}

impl Write for &Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening stream socket.
#[derive(Debug)]
pub struct Listener(OwnedFd);

impl Listener {
    /// Wraps a socket that is already bound and listening.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Waits for the next connection (close-on-exec, so spawned processes
    /// never inherit it).
    pub fn accept(&self) -> io::Result<Conn> {
        loop {
            // SAFETY: accept4(2) on our listening fd; the peer address is not
            // requested (null pointers are allowed).
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                return Ok(Conn::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Self {
        Self(listener.into())
    }
}
