//! Copying a guest process's stdio between its vsock streams and what
//! containerd gave us: FIFOs (ctr, CRI) or a `file://` log URI.
//!
//! Output is copied by one thread per stream until the guest shuts the
//! stream down; `WaitProcess` answers only after that, and the shim joins
//! these threads before it reports the exit, so nothing written just before
//! an exit is lost.
//!
//! Every stream is tracked by its VM's [`GuestStreams`], which shuts them
//! all down when the VM ends: a guest that goes silent (or a VMM that is
//! gone) must not leave a copy thread blocked forever.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Where containerd wants a stream to go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    /// Nothing (empty path).
    None,
    /// A FIFO (or any path) to write to.
    Path(PathBuf),
    /// `file:///path`: appended to.
    File(PathBuf),
}

/// A stdio target containerd asked for that we cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error(
        "log URI {0:?}: binary:// loggers are not supported by Arrow yet; use fifos or file://"
    )]
    BinaryLogger(String),
    #[error("log URI {0:?}: unknown scheme")]
    UnknownScheme(String),
    #[error("opening {path}: {err}")]
    Open { path: PathBuf, err: io::Error },
}

impl Sink {
    /// Parses a stdout/stderr value of a Create/Exec request.
    pub fn parse(value: &str) -> Result<Sink, StdioError> {
        if value.is_empty() {
            return Ok(Sink::None);
        }
        if let Some(path) = value.strip_prefix("file://") {
            return Ok(Sink::File(PathBuf::from(path)));
        }
        if value.starts_with("binary://") {
            return Err(StdioError::BinaryLogger(value.into()));
        }
        if value.contains("://") {
            return Err(StdioError::UnknownScheme(value.into()));
        }
        Ok(Sink::Path(PathBuf::from(value)))
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Sink::None)
    }

    /// Opens the target. A FIFO is opened read-write, which never blocks
    /// and keeps it open even between readers; containerd sees EOF when we
    /// close it.
    pub fn open(&self) -> Result<Option<File>, StdioError> {
        let (path, file) = match self {
            Sink::None => return Ok(None),
            Sink::Path(path) => (path, OpenOptions::new().read(true).write(true).open(path)),
            Sink::File(path) => (
                path,
                OpenOptions::new().create(true).append(true).open(path),
            ),
        };
        file.map(Some).map_err(|err| StdioError::Open {
            path: path.clone(),
            err,
        })
    }
}

/// The stdio streams open into one VM.
#[derive(Debug, Default)]
pub struct GuestStreams {
    inner: Mutex<Tracked>,
}

#[derive(Debug, Default)]
struct Tracked {
    next_id: u64,
    /// A second handle on each open stream, to shut it down by.
    open: HashMap<u64, UnixStream>,
    /// Set once the VM ended: streams tracked later are shut down at once.
    ended: bool,
}

impl GuestStreams {
    fn tracked(&self) -> MutexGuard<'_, Tracked> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks `stream` until the returned [`GuestStream`] is dropped.
    pub fn track(self: &Arc<Self>, stream: UnixStream) -> io::Result<GuestStream> {
        let handle = stream.try_clone()?;
        let mut tracked = self.tracked();
        if tracked.ended {
            let _ = handle.shutdown(Shutdown::Both);
        }
        let id = tracked.next_id;
        tracked.next_id += 1;
        tracked.open.insert(id, handle);
        Ok(GuestStream {
            stream,
            streams: Arc::clone(self),
            id,
        })
    }

    /// Shuts every stream down (reads see EOF, writes fail), now and for
    /// streams tracked later: the VM ended.
    pub fn end_all(&self) {
        let mut tracked = self.tracked();
        tracked.ended = true;
        for handle in tracked.open.values() {
            let _ = handle.shutdown(Shutdown::Both);
        }
    }

    /// How many streams are open.
    pub fn open(&self) -> usize {
        self.tracked().open.len()
    }
}

/// A guest stdio stream, shut down with its VM (see [`GuestStreams`]).
#[derive(Debug)]
pub struct GuestStream {
    stream: UnixStream,
    streams: Arc<GuestStreams>,
    id: u64,
}

impl GuestStream {
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }

    /// Whether the VM ended (the stream is shut down).
    fn vm_ended(&self) -> bool {
        self.streams.tracked().ended
    }
}

impl Read for GuestStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for GuestStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl Read for &GuestStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.stream).read(buf)
    }
}

impl Write for &GuestStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&self.stream).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for GuestStream {
    /// Closes the tracking handle too, so the connection closes with the
    /// stream.
    fn drop(&mut self) {
        self.streams.tracked().open.remove(&self.id);
    }
}

/// Copies a guest output stream into `sink` until the guest ends it or its
/// VM ends.
pub fn copy_output(mut stream: GuestStream, mut sink: File, name: String) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 32 * 1024];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("{name}: reading guest stream: {e}");
                    break;
                }
            };
            if let Err(e) = sink.write_all(&buf[..n]) {
                // The reader went away: keep draining the guest so the
                // process is not blocked on a full stream.
                log::debug!("{name}: writing output: {e}");
            }
        }
    })
}

/// Ends a stdin copy: set when containerd calls CloseIO or the process
/// exited.
#[derive(Clone, Default)]
pub struct StdinClose(Arc<AtomicBool>);

impl StdinClose {
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Copies the stdin FIFO at `path` into the guest stream. The FIFO is
/// opened read-write and non-blocking so that no writer (or a writer coming
/// later) never blocks us; the stream's write side is shut down (EOF for
/// the process) once a close was requested and the FIFO is drained. The
/// copy also ends when the VM does.
pub fn copy_stdin(path: PathBuf, mut stream: GuestStream, close: StdinClose) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path);
        let mut fifo = match fifo {
            Ok(f) => f,
            Err(e) => {
                log::warn!("stdin {}: {e}", path.display());
                let _ = stream.shutdown(Shutdown::Write);
                return;
            }
        };
        let mut buf = [0u8; 32 * 1024];
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let ready = {
                let mut fds = [PollFd::new(fifo.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(100u8)).unwrap_or(0)
            };
            if ready > 0 {
                match fifo.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            if stream.vm_ended() {
                break;
            }
            if close.requested() {
                // Give bytes a writer put in just before closing a moment
                // to be seen, then end.
                let deadline = *drain_deadline
                    .get_or_insert_with(|| Instant::now() + Duration::from_millis(50));
                if ready == 0 && Instant::now() >= deadline {
                    break;
                }
            }
        }
        let _ = stream.shutdown(Shutdown::Write);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_parse() {
        assert_eq!(Sink::parse("").unwrap(), Sink::None);
        assert_eq!(
            Sink::parse("/run/x/stdout").unwrap(),
            Sink::Path("/run/x/stdout".into())
        );
        assert_eq!(
            Sink::parse("file:///var/log/c.log").unwrap(),
            Sink::File("/var/log/c.log".into())
        );
        assert!(matches!(
            Sink::parse("binary:///usr/bin/logger?x=1"),
            Err(StdioError::BinaryLogger(_))
        ));
        assert!(Sink::parse("http://x").is_err());
    }

    #[test]
    fn output_is_copied_until_the_guest_ends_it() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let sink = Sink::File(out.clone()).open().unwrap().unwrap();
        let (mut guest, host) = UnixStream::pair().unwrap();
        let streams = Arc::new(GuestStreams::default());
        let t = copy_output(streams.track(host).unwrap(), sink, "test".into());
        guest.write_all(b"hello ").unwrap();
        guest.write_all(b"world\n").unwrap();
        drop(guest);
        t.join().unwrap();
        assert_eq!(std::fs::read_to_string(out).unwrap(), "hello world\n");
    }

    #[test]
    fn stdin_is_copied_from_a_fifo_then_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (host, mut guest) = UnixStream::pair().unwrap();
        let close = StdinClose::default();
        let streams = Arc::new(GuestStreams::default());
        let t = copy_stdin(fifo.clone(), streams.track(host).unwrap(), close.clone());
        let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"input\n").unwrap();
        drop(w);
        close.request();
        t.join().unwrap();
        let mut got = String::new();
        guest.read_to_string(&mut got).unwrap();
        assert_eq!(got, "input\n");
    }

    /// A guest that goes silent, never ending its streams: ending the VM's
    /// streams ends both copies (and frees their tracking handles).
    #[test]
    fn streams_end_with_the_vm() {
        let tmp = tempfile::tempdir().unwrap();
        let sink = Sink::File(tmp.path().join("out")).open().unwrap().unwrap();
        let fifo = tmp.path().join("stdin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let streams = Arc::new(GuestStreams::default());
        let (out_host, _out_guest) = UnixStream::pair().unwrap();
        let (in_host, mut in_guest) = UnixStream::pair().unwrap();
        let out = copy_output(streams.track(out_host).unwrap(), sink, "test".into());
        let input = copy_stdin(fifo, streams.track(in_host).unwrap(), StdinClose::default());
        std::thread::sleep(Duration::from_millis(100));
        assert!(!out.is_finished() && !input.is_finished());
        assert_eq!(streams.open(), 2);

        streams.end_all();
        out.join().unwrap();
        input.join().unwrap();
        assert_eq!(streams.open(), 0);
        let mut rest = Vec::new();
        in_guest.read_to_end(&mut rest).unwrap();

        // A stream opened after the VM ended is shut down at once.
        let (late, _guest) = UnixStream::pair().unwrap();
        let mut late = streams.track(late).unwrap();
        assert_eq!(late.read(&mut [0u8; 1]).unwrap(), 0);
    }
}
