//! Packs an initramfs (a `newc` cpio archive) in memory: the container's
//! root tree plus `arrow-init`, so a guest boots straight into PID 1 with no
//! disk image.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const NEWC_MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFIFO: u32 = 0o010_000;

/// Errors packing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading the host tree failed.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A name cannot go into a cpio archive.
    #[error("path {0:?} cannot be stored in the initramfs")]
    BadName(PathBuf),
    /// A file is larger than a newc header can describe (4 GiB).
    #[error("{0} is too large for a newc archive")]
    TooLarge(PathBuf),
}

/// A `newc` archive under construction.
#[derive(Default)]
pub struct Initramfs {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Initramfs {
    /// Starts an empty archive.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            next_ino: 1,
        }
    }

    fn pad4(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), mtime: u32, data: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let header = format!(
            "{NEWC_MAGIC}{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            size = data.len(),
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            namesize = name.len() + 1,
            check = 0,
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    /// Adds a directory. `path` is relative to the guest root.
    pub fn add_dir(&mut self, path: &str, perm: u32) {
        self.entry(path, S_IFDIR | (perm & 0o7777), (0, 0), 0, &[]);
    }

    /// Adds a regular file.
    pub fn add_file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), InitramfsError> {
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge(path.into()));
        }
        self.entry(path, S_IFREG | (perm & 0o7777), (0, 0), 0, data);
        Ok(())
    }

    /// Adds a symbolic link to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, (0, 0), 0, target.as_bytes());
    }

    /// Adds everything below host directory `root`, with guest paths relative
    /// to the guest root. Owners become root; modes, links and device nodes
    /// are kept. Sockets are skipped.
    pub fn add_tree(&mut self, root: &Path) -> Result<(), InitramfsError> {
        self.add_tree_at(root, root)
    }

    fn add_tree_at(&mut self, root: &Path, dir: &Path) -> Result<(), InitramfsError> {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| InitramfsError::Read { path, source }
        };
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(read_err(dir))?
            .collect::<Result<_, _>>()
            .map_err(read_err(dir))?;
        // Sorted, so the same tree always packs to the same bytes.
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(read_err(&path))?;
            let name = path
                .strip_prefix(root)
                .ok()
                .and_then(Path::to_str)
                .ok_or_else(|| InitramfsError::BadName(path.clone()))?
                .to_owned();
            let perm = meta.mode() & 0o7777;
            let mtime = u32::try_from(meta.mtime()).unwrap_or(0);
            let ft = meta.file_type();
            if ft.is_dir() {
                self.entry(&name, S_IFDIR | perm, (0, 0), mtime, &[]);
                self.add_tree_at(root, &path)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(read_err(&path))?;
                let target = target
                    .to_str()
                    .ok_or_else(|| InitramfsError::BadName(path.clone()))?;
                self.entry(&name, S_IFLNK | 0o777, (0, 0), mtime, target.as_bytes());
            } else if ft.is_file() {
                let data = fs::read(&path).map_err(read_err(&path))?;
                if u32::try_from(data.len()).is_err() {
                    return Err(InitramfsError::TooLarge(path));
                }
                self.entry(&name, S_IFREG | perm, (0, 0), mtime, &data);
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let kind = if ft.is_char_device() {
                    S_IFCHR
                } else if ft.is_block_device() {
                    S_IFBLK
                } else {
                    S_IFIFO
                };
                let rdev = meta.rdev();
                let dev = (libc::major(rdev), libc::minor(rdev));
                self.entry(&name, kind | perm, dev, mtime, &[]);
            }
        }
        Ok(())
    }

    /// Closes the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry(TRAILER, 0, (0, 0), 0, &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal newc reader for checking what was packed.
    fn parse(buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut pos = 0;
        let field = |b: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        loop {
            let hdr = &buf[pos..pos + 110];
            assert_eq!(&hdr[..6], b"070701");
            let mode = field(hdr, 1);
            let size = field(hdr, 6) as usize;
            let namesize = field(hdr, 11) as usize;
            let name = std::str::from_utf8(&buf[pos + 110..pos + 110 + namesize - 1])
                .unwrap()
                .to_owned();
            pos = (pos + 110 + namesize + 3) & !3;
            let data = buf[pos..pos + size].to_vec();
            pos = (pos + size + 3) & !3;
            if name == TRAILER {
                assert_eq!(pos, buf.len());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn packs_files_dirs_and_links() {
        let mut cpio = Initramfs::new();
        cpio.add_dir(".arrow", 0o755);
        cpio.add_file(".arrow/init", 0o755, b"\x7fELF").unwrap();
        cpio.add_symlink("bin/sh", "busybox");
        let entries = parse(&cpio.finish());
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].0, ".arrow");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(entries[1].2, b"\x7fELF");
        assert_eq!(entries[1].1, S_IFREG | 0o755);
        assert_eq!(entries[2].1 & 0o170_000, S_IFLNK);
        assert_eq!(entries[2].2, b"busybox");
    }

    #[test]
    fn packs_a_host_tree_in_sorted_order() {
        let dir = std::env::temp_dir().join(format!("arrow-cpio-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/busybox"), b"binary").unwrap();
        std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
        fs::write(dir.join("a.txt"), b"hello").unwrap();
        let mut cpio = Initramfs::new();
        cpio.add_tree(&dir).unwrap();
        let names: Vec<_> = parse(&cpio.finish()).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["a.txt", "bin", "bin/busybox", "bin/sh"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_tree_is_a_clear_error() {
        let mut cpio = Initramfs::new();
        let err = cpio.add_tree(Path::new("/nonexistent/arrow")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/arrow"), "{err}");
    }
}
