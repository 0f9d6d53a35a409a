//! The local side of a program's stdio: copying between this process's
//! stdin/stdout/stderr and the guest streams, and the terminal in raw mode
//! for `-t`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use nix::sys::termios::{self, SetArg, Termios};

/// Copies `from` into `to` until EOF on `from`, flushing as it goes so
/// interactive output appears at once. Errors writing end the copy quietly
/// (the reader went away).
fn pump(mut from: impl Read, mut to: impl Write) -> io::Result<u64> {
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Copies a guest output stream to a local writer on its own thread.
pub fn spawn_output(stream: UnixStream, to: impl Write + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        if let Err(e) = pump(stream, to) {
            eprintln!("arrow-vmm: reading guest output: {e}");
        }
    })
}

/// Copies this process's stdin into the guest's stdin stream, then closes
/// the stream's write side (EOF for the program). The thread may stay
/// blocked on a read of our stdin after the program exits; it is not joined.
pub fn spawn_stdin(stream: UnixStream) {
    std::thread::spawn(move || {
        let _ = pump(io::stdin().lock(), &stream);
        let _ = stream.shutdown(Shutdown::Write);
    });
}

/// The local terminal in raw mode, restored on drop.
pub struct RawTerminal {
    saved: Termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal.
    pub fn enable() -> Option<Self> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// The size of the local terminal as (rows, cols), if stdout is one.
pub fn terminal_size() -> Option<(u32, u32)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid struct we pass.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then(|| (u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pump_copies_until_eof() {
        let mut out = Vec::new();
        assert_eq!(pump(&b"hello world"[..], &mut out).unwrap(), 11);
        assert_eq!(out, b"hello world");
    }

    #[test]
    fn pump_stops_quietly_when_the_writer_is_gone() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert_eq!(pump(&b"data"[..], Broken).unwrap(), 0);
    }
}
