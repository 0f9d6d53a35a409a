//! Host side of Firecracker-style hybrid vsock: the VMM exposes the guest's
//! vsock ports through one Unix socket, and a `CONNECT <port>` line picks the
//! port for each new connection.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest reply line accepted ("OK 4294967295\n" is 14 bytes).
const MAX_REPLY_LEN: usize = 64;

/// Connects to guest vsock `port` through the VMM's Unix socket at `uds_path`.
///
/// Writes `CONNECT <port>\n` and expects `OK <hostport>\n`; anything else, or
/// EOF (the VMM closes when the guest refuses), is an error. The reply is read
/// one byte at a time so no payload byte that follows it is consumed. The
/// whole handshake must finish within `timeout`; the returned stream has no
/// timeouts set.
pub fn connect(uds_path: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    handshake(UnixStream::connect(uds_path)?, port, timeout)
}

/// The `CONNECT` handshake of [`connect`] on a stream already connected to
/// the VMM's socket: for callers that check who is at the other end (for
/// instance with `SO_PEERCRED`) before they send anything.
pub fn handshake(mut stream: UnixStream, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    // A huge timeout means "no deadline to speak of", not an overflow panic.
    let now = Instant::now();
    let deadline = now
        .checked_add(timeout)
        .unwrap_or(now + Duration::from_secs(86_400 * 365));
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;

    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("vsock port {port}: connection closed during handshake"),
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_REPLY_LEN => {
                return Err(invalid(port, "reply line too long"));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    parse_reply(&line).ok_or_else(|| invalid(port, &String::from_utf8_lossy(&line)))?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Parses `OK <hostport>` (without the newline) into the host port.
fn parse_reply(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("OK ")?
        .trim_end_matches('\r')
        .parse()
        .ok()
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "hybrid vsock handshake timed out",
        ));
    }
    Ok(left)
}

fn invalid(port: u32, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("vsock port {port}: unexpected handshake reply: {what:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn temp_socket(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "arrow-proto-hybrid-{}-{name}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A fake VMM socket: checks the CONNECT line and answers `reply`.
    fn fake_vmm(
        name: &str,
        reply: &'static [u8],
    ) -> (std::path::PathBuf, thread::JoinHandle<String>) {
        let path = temp_socket(name);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            io::BufReader::new(&mut conn).read_line(&mut line).unwrap();
            conn.write_all(reply).unwrap();
            line
        });
        (path, handle)
    }

    #[test]
    fn ok_reply_keeps_following_payload() {
        let (path, server) = fake_vmm("ok", b"OK 1073741824\npayload");
        let mut stream = connect(&path, 1024, Duration::from_secs(5)).unwrap();
        assert_eq!(server.join().unwrap(), "CONNECT 1024\n");
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "payload");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn other_reply_is_an_error() {
        let (path, server) = fake_vmm("nok", b"NOPE\n");
        let err = connect(&path, 1025, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        server.join().unwrap();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn eof_is_an_error() {
        let (path, server) = fake_vmm("eof", b"");
        let err = connect(&path, 1025, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        server.join().unwrap();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn silent_vmm_times_out() {
        let path = temp_socket("silent");
        let listener = UnixListener::bind(&path).unwrap();
        let err = connect(&path, 1024, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ));
        drop(listener);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn parses_replies() {
        assert_eq!(parse_reply(b"OK 52"), Some(52));
        assert_eq!(parse_reply(b"OK 52\r"), Some(52));
        assert_eq!(parse_reply(b"OK"), None);
        assert_eq!(parse_reply(b"ERR 1"), None);
        assert_eq!(parse_reply(b"OK x"), None);
    }
}
