//! Container output to the CRI log file, in the format kubelet reads:
//! `<RFC 3339 nano timestamp> <stdout|stderr> <P|F> <line>\n`, where `P`
//! marks a piece of a line longer than [`MAX_LINE`] (or cut by the stream's
//! end is written `F`, as containerd does).
//!
//! The shim writes a container's stdout and stderr into FIFOs that
//! arrow-cri made; one task per FIFO copies them here. The FIFO is opened
//! read-write so that it never reports end of file (the shim may not have
//! opened it yet, and arrow-cri may restart while the container runs): the
//! copy ends when the container's exit is known, after draining what the
//! FIFO still holds (the shim reports an exit only once the output is in it).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::net::unix::pipe;
use tokio::sync::watch;

/// Longest line piece written in one record (containerd's default).
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// `P` (partial) or `F` (full line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Partial,
    Full,
}

/// Cuts a byte stream into CRI log lines.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Adds `data`; every complete line (or [`MAX_LINE`] piece) goes to `out`.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<(Tag, Vec<u8>)>) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.pending.extend_from_slice(&data[..i]);
                    self.flush_long(out);
                    out.push((Tag::Full, std::mem::take(&mut self.pending)));
                    data = &data[i + 1..];
                }
                None => {
                    self.pending.extend_from_slice(data);
                    self.flush_long(out);
                    data = &[];
                }
            }
        }
    }

    fn flush_long(&mut self, out: &mut Vec<(Tag, Vec<u8>)>) {
        while self.pending.len() > MAX_LINE {
            let rest = self.pending.split_off(MAX_LINE);
            out.push((Tag::Partial, std::mem::replace(&mut self.pending, rest)));
        }
    }

    /// The end of the stream: a last line without a newline is written whole.
    pub fn finish(&mut self, out: &mut Vec<(Tag, Vec<u8>)>) {
        if !self.pending.is_empty() {
            out.push((Tag::Full, std::mem::take(&mut self.pending)));
        }
    }
}

/// RFC 3339 with nanoseconds in UTC, as kubelet writes and parses it.
pub fn rfc3339_nano(at: SystemTime) -> String {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// One CRI log record.
pub fn record(at: SystemTime, stream: Stream, tag: Tag, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 48);
    out.extend_from_slice(rfc3339_nano(at).as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.name().as_bytes());
    out.extend_from_slice(match tag {
        Tag::Partial => b" P ",
        Tag::Full => b" F ",
    });
    out.extend_from_slice(line);
    out.push(b'\n');
    out
}

/// A container's CRI log file, shared by its stdout and stderr copies.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

fn open_log(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    /// Opens (creating) `path` for appending; an empty path discards output.
    pub fn open(path: &Path) -> io::Result<Arc<LogFile>> {
        let file = if path.as_os_str().is_empty() {
            None
        } else {
            Some(open_log(path)?)
        };
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        }))
    }

    /// After a log rotation renamed the file: writes go to a new one.
    pub fn reopen(&self) -> io::Result<()> {
        if self.path.as_os_str().is_empty() {
            return Ok(());
        }
        let file = open_log(&self.path)?;
        *self.file.lock().unwrap_or_else(PoisonError::into_inner) = Some(file);
        Ok(())
    }

    fn write(&self, stream: Stream, lines: &[(Tag, Vec<u8>)]) {
        if lines.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let mut data = Vec::new();
        for (tag, line) in lines {
            data.extend(record(now, stream, *tag, line));
        }
        let mut guard = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = guard.as_mut() {
            if let Err(e) = f.write_all(&data) {
                tracing::warn!(path = %self.path.display(), "writing the container log: {e}");
            }
        }
    }
}

/// Creates a FIFO at `path` (mode 0600), replacing nothing.
pub fn make_fifo(path: &Path) -> io::Result<()> {
    match nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// A container's output as it is read, for attached clients.
pub type Tap = tokio::sync::broadcast::Sender<(Stream, bytes::Bytes)>;

/// Chunks an attached client may fall behind by before it loses some.
pub const TAP_DEPTH: usize = 256;

/// Copies FIFO `fifo` into `log` until `done` turns true, then drains it.
/// Runs as a task; returns when the stream is finished.
pub async fn copy_fifo(
    fifo: PathBuf,
    stream: Stream,
    log: Arc<LogFile>,
    tap: Tap,
    mut done: watch::Receiver<bool>,
) {
    let receiver = match pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&fifo)
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(fifo = %fifo.display(), "opening the output FIFO: {e}");
            return;
        }
    };
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 32 * 1024];
    let mut lines = Vec::new();
    loop {
        if *done.borrow() {
            break;
        }
        tokio::select! {
            ready = receiver.readable() => {
                if ready.is_err() {
                    break;
                }
                match receiver.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        // Copied only for attached clients.
                        if tap.receiver_count() > 0 {
                            let _ = tap.send((stream, bytes::Bytes::copy_from_slice(&buf[..n])));
                        }
                        splitter.push(&buf[..n], &mut lines);
                        log.write(stream, &lines);
                        lines.clear();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::warn!(fifo = %fifo.display(), "reading: {e}");
                        break;
                    }
                }
            }
            changed = done.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
    }
    // Whatever the FIFO still holds was written before the exit. Read
    // directly: tokio's try_read trusts a readiness it may not have seen.
    drain(receiver, |data| {
        if tap.receiver_count() > 0 {
            let _ = tap.send((stream, bytes::Bytes::copy_from_slice(data)));
        }
        splitter.push(data, &mut lines)
    });
    splitter.finish(&mut lines);
    log.write(stream, &lines);
}

/// Reads what `receiver`'s FIFO holds now, without waiting.
pub fn drain(receiver: pipe::Receiver, mut sink: impl FnMut(&[u8])) {
    let Ok(fd) = receiver.into_nonblocking_fd() else {
        return;
    };
    let mut file = File::from(fd);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match io::Read::read(&mut file, &mut buf) {
            Ok(n) if n > 0 => sink(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lines_partial_pieces_and_the_end() {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        s.push(b"hel", &mut out);
        assert!(out.is_empty());
        s.push(b"lo\nworld\n\nx", &mut out);
        assert_eq!(
            out,
            vec![
                (Tag::Full, b"hello".to_vec()),
                (Tag::Full, b"world".to_vec()),
                (Tag::Full, b"".to_vec()),
            ]
        );
        out.clear();
        let long = vec![b'a'; MAX_LINE * 2 + 5];
        s.push(&long, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|(t, l)| *t == Tag::Partial && l.len() == MAX_LINE));
        assert_eq!(out[0].1[0], b'x');
        out.clear();
        s.finish(&mut out);
        assert_eq!(out, vec![(Tag::Full, vec![b'a'; 6])]);
        out.clear();
        s.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn timestamps_and_records() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_475_713_029, 669_794_202);
        assert_eq!(rfc3339_nano(at), "2016-10-06T00:17:09.669794202Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_nano(leap), "2000-02-29T00:00:00.000000000Z");
        assert_eq!(
            record(at, Stream::Stderr, Tag::Partial, b"x y"),
            b"2016-10-06T00:17:09.669794202Z stderr P x y\n".to_vec()
        );
    }

    #[tokio::test]
    async fn fifo_copy_drains_after_done_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("out");
        make_fifo(&fifo).unwrap();
        let log_path = dir.path().join("log");
        let log = LogFile::open(&log_path).unwrap();
        let (tx, rx) = watch::channel(false);
        let (tap, _) = tokio::sync::broadcast::channel(TAP_DEPTH);
        let task = tokio::spawn(copy_fifo(
            fifo.clone(),
            Stream::Stdout,
            log.clone(),
            tap,
            rx,
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        {
            let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
            w.write_all(b"one\ntwo").unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::rename(&log_path, dir.path().join("log.1")).unwrap();
        log.reopen().unwrap();
        {
            let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
            w.write_all(b" three\n").unwrap();
        }
        tx.send(true).unwrap();
        task.await.unwrap();
        let old = std::fs::read_to_string(dir.path().join("log.1")).unwrap();
        assert!(old.ends_with(" stdout F one\n"), "{old}");
        let new = std::fs::read_to_string(&log_path).unwrap();
        assert!(new.ends_with(" stdout F two three\n"), "{new}");
    }
}
