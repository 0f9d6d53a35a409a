//! A console log file whose size is bounded: the guest writes to its
//! serial console at any rate, and the host's disk must not fill up with it.
//!
//! It is one file, appended to until it would grow past its cap; then it is
//! compacted in place to the newest half of the cap (the older output is
//! dropped, starting at a line boundary when there is one) and appending
//! goes on. So the file never exceeds the cap, always holds the newest
//! output, and whoever reads it (`tail`, the shim) needs to know of no
//! rotation. Compaction copies at most half the cap once per half cap
//! written: amortised, one extra write per byte of console output.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The cap of a console log: its file never grows past it.
///
/// 1 MiB holds thousands of lines of boot log and panic output, which is
/// what the log is for, at a disk cost that does not matter per pod.
pub const CONSOLE_LOG_MAX_BYTES: u64 = 1 << 20;

/// A file the console is appended to, kept at most `cap` bytes long.
pub struct ConsoleLog {
    file: File,
    /// The file's length as written by us.
    len: u64,
    cap: u64,
}

impl ConsoleLog {
    /// Opens (creating it with mode 0640) the log at `path`, capped at
    /// [`CONSOLE_LOG_MAX_BYTES`]. Output is appended after what the file
    /// already holds.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::with_cap(path, CONSOLE_LOG_MAX_BYTES)
    }

    /// As [`ConsoleLog::open`] with another cap (at least 2 bytes).
    pub fn with_cap(path: &Path, cap: u64) -> io::Result<Self> {
        if cap < 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a console log cap must be at least 2 bytes",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut log = Self { file, len, cap };
        if log.len > cap {
            // Left over from before the cap, or by someone else.
            log.compact(&[])?;
        }
        Ok(log)
    }

    /// The file's current length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rewrites the file as the newest `cap / 2` bytes of its contents
    /// followed by `data`, cut at the first line boundary if there is one.
    fn compact(&mut self, data: &[u8]) -> io::Result<()> {
        let keep = self.cap / 2;
        let data = &data[data.len().saturating_sub(keep as usize)..];
        let from_file = (keep - data.len() as u64).min(self.len);
        let mut kept = vec![0u8; from_file as usize];
        self.file.read_exact_at(&mut kept, self.len - from_file)?;
        kept.extend_from_slice(data);
        // Do not start with the end of a line whose beginning was dropped.
        let start = match kept.iter().position(|&b| b == b'\n') {
            Some(nl) if nl + 1 < kept.len() => nl + 1,
            _ => 0,
        };
        let kept = &kept[start..];
        self.file.write_all_at(kept, 0)?;
        self.file.set_len(kept.len() as u64)?;
        self.len = kept.len() as u64;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.len + data.len() as u64 > self.cap {
            self.compact(data)?;
        } else {
            self.file.write_all_at(data, self.len)?;
            self.len += data.len() as u64;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "arrow-console-log-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn many_mib_stay_within_the_cap_and_the_newest_lines_are_kept() {
        let dir = temp_dir("flood");
        let path = dir.join("console.log");
        let mut log = ConsoleLog::open(&path).unwrap();
        let mut last = String::new();
        let mut written = 0u64;
        let mut n = 0u64;
        // 8 MiB of lines, in pieces of every size, some one byte at a time
        // as the UART writes them.
        while written < 8 << 20 {
            last = format!("line {n} {}\n", "x".repeat((n % 200) as usize));
            if n.is_multiple_of(7) {
                for b in last.as_bytes() {
                    log.write_all(std::slice::from_ref(b)).unwrap();
                }
            } else {
                log.write_all(last.as_bytes()).unwrap();
            }
            written += last.len() as u64;
            n += 1;
            let on_disk = std::fs::metadata(&path).unwrap().len();
            assert!(
                on_disk <= CONSOLE_LOG_MAX_BYTES,
                "{on_disk} after {n} lines"
            );
            assert_eq!(on_disk, log.len());
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(&last), "the newest line is there");
        assert!(text.len() as u64 >= CONSOLE_LOG_MAX_BYTES / 2 - 256);
        assert!(text.starts_with("line "), "starts at a line boundary");
        // Lines are whole and in order.
        let numbers: Vec<u64> = text
            .lines()
            .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(*numbers.last().unwrap(), n - 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn appends_to_an_existing_file_and_compacts_an_oversized_one() {
        let dir = temp_dir("reopen");
        let path = dir.join("console.log");
        std::fs::write(&path, b"old\n").unwrap();
        ConsoleLog::with_cap(&path, 64)
            .unwrap()
            .write_all(b"new\n")
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\nnew\n");

        // A file already past the cap is cut down when opened.
        let big: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        std::fs::write(&path, &big).unwrap();
        let mut log = ConsoleLog::with_cap(&path, 64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), &big[68..]);
        // One write larger than the cap keeps its newest half.
        let huge: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8 | 1).collect();
        log.write_all(&huge).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), &huge[968..]);
        assert!(ConsoleLog::with_cap(&path, 1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
