//! Unpacking one image layer (a tar changeset, OCI image spec "layer") into
//! a directory of its own, in the form overlayfs takes as a lower directory.
//!
//! The tar is untrusted input: a malicious registry chooses every name, link
//! target, mode and owner in it, and `arrow-cri` unpacks it as root. So:
//!
//! - every entry's path is normalised (leading `/` and `./` dropped) and an
//!   entry with a `..` component is refused, for the entry's own path and for a
//!   hard link's target alike;
//! - the entry's parent directory is opened with `openat2(RESOLVE_IN_ROOT)`
//!   on the layer directory, so a symbolic link among the parents (one the
//!   same tar made, absolute or not) is resolved as if the layer directory
//!   were `/` — as containerd's and runc's scoped resolution do — and can
//!   never lead out of it; magic links (`/proc/self/...`) are refused;
//! - the entry itself is created relative to that parent descriptor, without
//!   following a link in its last component (`O_EXCL|O_NOFOLLOW`, `mkdirat`,
//!   `symlinkat`, `mknodat`, `linkat` without `AT_SYMLINK_FOLLOW`), after
//!   whatever stood at that name (of an earlier entry) is removed;
//! - symbolic links are stored as they are, whatever their target: they are
//!   only ever followed inside the container's own root;
//! - device nodes are skipped with a log line; `trusted.*` xattrs (overlayfs'
//!   own, such as `trusted.overlay.redirect`) are never taken from a layer.
//!
//! OCI whiteouts become overlayfs whiteouts: `.wh.NAME` a character device
//! 0/0 named `NAME`, `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr on
//! its directory.
//!
//! The uncompressed stream's sha256 is returned so the caller can check it
//! against the image config's `diff_id`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The xattr overlayfs reads to make a directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

#[derive(Debug, Error)]
pub enum UnpackError {
    /// The layer is malformed or hostile: refused as a whole.
    #[error("layer refused: entry {path:?}: {reason}")]
    Refused { path: String, reason: String },
    #[error("layer entry {path:?}: {source}")]
    Entry {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the layer: {0}")]
    Read(#[from] io::Error),
}

impl UnpackError {
    /// The underlying I/O error, if any (to tell a full disk from a bad layer).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            UnpackError::Refused { .. } => None,
            UnpackError::Entry { source, .. } => Some(source),
            UnpackError::Read(e) => Some(e),
        }
    }
}

/// What unpacking found.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    /// `sha256:…` of the uncompressed tar stream (the layer's diff_id).
    pub diff_id: String,
    /// Bytes of regular file content written.
    pub bytes: u64,
    pub entries: u64,
    /// Device nodes skipped.
    pub skipped_devices: u64,
}

/// The layer's compression, told from its first bytes (a media type may say
/// gzip where the blob is plain tar; the magic number does not lie).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn detect(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks the (possibly compressed) layer blob read from `blob` into the
/// existing, empty directory `dest`.
pub fn unpack_layer<R: Read>(blob: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let mut blob = io::BufReader::with_capacity(256 * 1024, blob);
    let head = {
        use std::io::BufRead;
        blob.fill_buf()?.to_vec()
    };
    let reader: Box<dyn Read> = match Compression::detect(&head) {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(blob)?),
        Compression::None => Box::new(blob),
    };
    unpack_tar(reader, dest)
}

/// Unpacks an uncompressed tar stream into `dest`.
pub fn unpack_tar<R: Read>(reader: R, dest: &Path) -> Result<UnpackStats, UnpackError> {
    let root = rustix::fs::open(
        dest,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Entry {
        path: dest.display().to_string(),
        source: e.into(),
    })?;
    let mut hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    let mut stats = UnpackStats::default();
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let mut unpacker = Unpacker {
            root: root.as_fd(),
            parent_cache: None,
            dir_times: Vec::new(),
        };
        for entry in archive.entries()? {
            let mut entry = entry?;
            unpacker.entry(&mut entry, &mut stats)?;
        }
        unpacker.finish()?;
    }
    // The tar reader stops at the end-of-archive blocks; the diff_id covers
    // every byte of the stream, padding included.
    io::copy(&mut hashing, &mut io::sink())?;
    let digest = hashing.hasher.finalize();
    stats.diff_id = format!("sha256:{}", hex(&digest));
    Ok(stats)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// An entry's path made relative and checked: no `..`, no empty name.
/// Returns the components, the last one the entry's own name.
pub fn clean_path(raw: &Path) -> Result<Vec<&OsStr>, String> {
    let mut parts = Vec::new();
    for component in raw.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => parts.push(name),
            Component::ParentDir => return Err("path has a `..` component".into()),
            Component::Prefix(_) => return Err("path has a prefix".into()),
        }
    }
    Ok(parts)
}

fn join(parts: &[&OsStr]) -> PathBuf {
    let mut path = PathBuf::new();
    for part in parts {
        path.push(part);
    }
    path
}

/// Owner, mode, times and xattrs of an entry, from its header and its PAX
/// records (which override the header's numbers when present).
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

struct Unpacker<'a> {
    root: BorrowedFd<'a>,
    /// The last parent opened, by its path relative to the root: entries of
    /// one directory come together. Dropped whenever the tree changes shape
    /// (a directory, link or whiteout made, anything removed).
    parent_cache: Option<(PathBuf, OwnedFd)>,
    /// Directory times, set at the end (creating entries changes them).
    dir_times: Vec<(PathBuf, i64)>,
}

fn errno_io(e: Errno) -> io::Error {
    e.into()
}

impl<'a> Unpacker<'a> {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        stats: &mut UnpackStats,
    ) -> Result<(), UnpackError> {
        let raw_path = entry.path()?.into_owned();
        let shown = raw_path.display().to_string();
        let refuse = |reason: String| UnpackError::Refused {
            path: shown.clone(),
            reason,
        };
        let parts = clean_path(&raw_path).map_err(&refuse)?;
        stats.entries += 1;
        let kind = entry.header().entry_type();
        let Some((&name, parent_parts)) = parts.split_last() else {
            // The layer's own root ("./"): nothing to create.
            return Ok(());
        };
        let parent = join(parent_parts);
        let wrap = |e: io::Error| UnpackError::Entry {
            path: shown.clone(),
            source: e,
        };

        // Whiteouts.
        let name_bytes = name.as_bytes();
        if name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            self.parent_cache = None;
            let pfd = self.open_parent(&parent, true).map_err(wrap)?;
            if name_bytes == OPAQUE_MARKER.as_bytes() {
                let dir = rustix::fs::openat(
                    pfd,
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| wrap(e.into()))?;
                rustix::fs::fsetxattr(&dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                    .map_err(|e| wrap(e.into()))?;
            } else if name_bytes.starts_with(b".wh..wh.") {
                // aufs metadata (.wh..wh.plnk, .wh..wh.aufs): not content.
            } else {
                let target = OsStr::from_bytes(&name_bytes[WHITEOUT_PREFIX.len()..]);
                if target.is_empty()
                    || target == "."
                    || target == ".."
                    || target.as_bytes().contains(&b'/')
                {
                    return Err(refuse("whiteout of an invalid name".into()));
                }
                remove_existing(pfd, target, false).map_err(wrap)?;
                rustix::fs::mknodat(
                    pfd,
                    target,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| wrap(e.into()))?;
            }
            return Ok(());
        }

        let meta = entry_meta(entry).map_err(wrap)?;
        match kind {
            tar::EntryType::Directory => {
                self.parent_cache = None;
                let pfd = self.open_parent(&parent, true).map_err(wrap)?;
                // An existing directory is kept (its content too: a later
                // entry for the same directory only changes its metadata);
                // anything else there is replaced.
                let existing = stat_at(pfd, name).map_err(wrap)?;
                if existing
                    .is_some_and(|st| FileType::from_raw_mode(st.st_mode) != FileType::Directory)
                {
                    remove_existing(pfd, name, false).map_err(wrap)?;
                }
                match rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(wrap(e.into())),
                }
                let fd = rustix::fs::openat(
                    pfd,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| wrap(e.into()))?;
                set_fd_meta(&fd, &meta, false).map_err(wrap)?;
                self.dir_times.push((join(&parts), meta.mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let pfd = self.open_parent(&parent, false).map_err(wrap)?;
                if remove_existing(pfd, name, false).map_err(wrap)? {
                    self.parent_cache = None;
                }
                let pfd = self.open_parent(&parent, false).map_err(wrap)?;
                let fd = rustix::fs::openat(
                    pfd,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| wrap(e.into()))?;
                let mut file = std::fs::File::from(fd);
                let n = io::copy(entry, &mut file).map_err(wrap)?;
                stats.bytes += n;
                set_fd_meta(&file, &meta, true).map_err(wrap)?;
            }
            tar::EntryType::Symlink => {
                self.parent_cache = None;
                let target = entry
                    .link_name()?
                    .ok_or_else(|| refuse("symbolic link without a target".into()))?
                    .into_owned();
                let pfd = self.open_parent(&parent, true).map_err(wrap)?;
                remove_existing(pfd, name, false).map_err(wrap)?;
                rustix::fs::symlinkat(target.as_os_str(), pfd, name).map_err(|e| wrap(e.into()))?;
                rustix::fs::chownat(
                    pfd,
                    name,
                    Some(Uid::from_raw(meta.uid)),
                    Some(Gid::from_raw(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| wrap(e.into()))?;
                let times = timestamps(meta.mtime);
                rustix::fs::utimensat(pfd, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| wrap(e.into()))?;
            }
            tar::EntryType::Link => {
                self.parent_cache = None;
                let target = entry
                    .link_name()?
                    .ok_or_else(|| refuse("hard link without a target".into()))?
                    .into_owned();
                let tparts =
                    clean_path(&target).map_err(|r| refuse(format!("hard link target: {r}")))?;
                let Some((&tname, tparent_parts)) = tparts.split_last() else {
                    return Err(refuse("hard link to the layer's root".into()));
                };
                let tparent = join(tparent_parts);
                let tfd = open_in_root(self.root, &tparent).map_err(|e| {
                    wrap(io::Error::new(
                        e.kind(),
                        format!("hard link target {}: {e}", target.display()),
                    ))
                })?;
                let pfd = self.open_parent(&parent, true).map_err(wrap)?;
                if join(&tparts) != join(&parts) {
                    remove_existing(pfd, name, false).map_err(wrap)?;
                    // Without AT_SYMLINK_FOLLOW: a link to a symbolic link
                    // is a link to the symbolic link itself.
                    rustix::fs::linkat(&tfd, tname, pfd, name, AtFlags::empty()).map_err(|e| {
                        wrap(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("hard link to {}: {e}", target.display()),
                        ))
                    })?;
                }
            }
            tar::EntryType::Fifo => {
                self.parent_cache = None;
                let pfd = self.open_parent(&parent, true).map_err(wrap)?;
                remove_existing(pfd, name, false).map_err(wrap)?;
                rustix::fs::mknodat(pfd, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(|e| wrap(e.into()))?;
                let fd = rustix::fs::openat(
                    pfd,
                    name,
                    OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| wrap(e.into()))?;
                set_path_meta(&fd, &meta).map_err(wrap)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                stats.skipped_devices += 1;
                tracing::info!(entry = %shown, "device node in a layer skipped (devices come from the runtime, not the image)");
            }
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                tracing::info!(entry = %shown, kind = ?other, "tar entry of an unknown kind skipped");
            }
        }
        Ok(())
    }

    /// The parent directory `rel` (relative to the root), created (mode
    /// 0755, root's) when missing, as containerd does for tars that name a
    /// file before its directory.
    fn open_parent(&mut self, rel: &Path, _fresh: bool) -> io::Result<BorrowedFd<'_>> {
        let cached = match self.parent_cache.take() {
            Some((path, fd)) if path == rel => (path, fd),
            _ => (rel.to_path_buf(), ensure_dir(self.root, rel)?),
        };
        Ok(self.parent_cache.insert(cached).1.as_fd())
    }

    fn finish(&mut self) -> Result<(), UnpackError> {
        self.parent_cache = None;
        // Deepest first does not matter for times: setting a directory's
        // times changes no other directory's.
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            let wrap = |e: io::Error| UnpackError::Entry {
                path: path.display().to_string(),
                source: e,
            };
            // The directory may have been replaced since by a later entry.
            match open_in_root(self.root, &path) {
                Ok(fd) => {
                    rustix::fs::utimensat(&fd, "", &timestamps(mtime), AtFlags::EMPTY_PATH)
                        .map_err(|e| wrap(e.into()))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {}
                Err(e) => return Err(wrap(e)),
            }
        }
        Ok(())
    }
}

/// Opens the directory `rel` under `root`, every symbolic link on the way
/// resolved as if `root` were `/`.
pub fn open_in_root(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let path: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        root,
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
    )
    .map_err(|e| {
        if e == Errno::NOSYS {
            io::Error::other("openat2 is not available: arrow-cri needs Linux 5.6 or later")
        } else {
            errno_io(e)
        }
    })
}

/// `rel` as a directory under `root`, with its missing ancestors made.
fn ensure_dir(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    match open_in_root(root, rel) {
        Ok(fd) => Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let name = rel.file_name().ok_or(e)?;
            let parent = rel.parent().unwrap_or(Path::new(""));
            let pfd = ensure_dir(root, parent)?;
            match rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o755)) {
                Ok(()) => {}
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            // Opened below the parent just resolved, never following a link:
            // a name that exists but is not a directory (a dangling symbolic
            // link, say) is an error, not a way out.
            rustix::fs::openat(
                &pfd,
                name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("parent directory {}: {e}", rel.display()),
                )
            })
        }
        Err(e) => Err(e),
    }
}

fn stat_at(dir: impl AsFd, name: &OsStr) -> io::Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes whatever is at `name` in `dir` (a whole tree for a directory).
/// Returns whether something was there.
fn remove_existing(dir: impl AsFd, name: &OsStr, keep_dir: bool) -> io::Result<bool> {
    let dir = dir.as_fd();
    let Some(st) = stat_at(dir, name)? else {
        return Ok(false);
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        if keep_dir {
            return Ok(true);
        }
        remove_tree_at(dir, name)?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(true)
}

/// Removes the directory `name` in `dir` and everything in it, never
/// following a symbolic link.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR) | Err(Errno::LOOP) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let mut names = Vec::new();
    {
        let iter = rustix::fs::Dir::read_from(&fd)?;
        for entry in iter {
            let entry = entry?;
            let n = entry.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            names.push((n.to_vec(), entry.file_type()));
        }
    }
    for (n, kind) in names {
        let n = OsStr::from_bytes(&n);
        if kind == FileType::Directory {
            remove_tree_at(fd.as_fd(), n)?;
        } else {
            match rustix::fs::unlinkat(&fd, n, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(Errno::ISDIR) => remove_tree_at(fd.as_fd(), n)?,
                Err(e) => return Err(e.into()),
            }
        }
    }
    drop(fd);
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes the directory tree at `path` (its last component not followed).
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{}: no name to remove", path.display())))?;
    let pfd = match rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    remove_tree_at(pfd.as_fd(), name)
}

fn timestamps(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let header = entry.header();
    let mut meta = Meta {
        mode: header.mode()? & 0o7777,
        uid: header.uid()?.try_into().unwrap_or(u32::MAX - 1),
        gid: header.gid()?.try_into().unwrap_or(u32::MAX - 1),
        mtime: header.mtime().unwrap_or(0).min(i64::MAX as u64) as i64,
        xattrs: Vec::new(),
    };
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            };
            match key {
                "uid" => {
                    if let Some(n) = number() {
                        meta.uid = n.try_into().unwrap_or(u32::MAX - 1);
                    }
                }
                "gid" => {
                    if let Some(n) = number() {
                        meta.gid = n.try_into().unwrap_or(u32::MAX - 1);
                    }
                }
                "mtime" => {
                    if let Some(secs) = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.split('.').next())
                        .and_then(|v| v.parse::<i64>().ok())
                    {
                        meta.mtime = secs;
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        if name.starts_with("trusted.") {
                            tracing::debug!(xattr = name, "trusted.* xattr in a layer ignored");
                        } else {
                            meta.xattrs.push((name.to_string(), value.to_vec()));
                        }
                    }
                }
            }
        }
    }
    // uid_t -1 means "unchanged" to chown; never pass it.
    if meta.uid == u32::MAX {
        meta.uid = u32::MAX - 1;
    }
    if meta.gid == u32::MAX {
        meta.gid = u32::MAX - 1;
    }
    Ok(meta)
}

/// Owner, then mode (chown clears set-id bits), xattrs and, for files,
/// times, on an open descriptor.
fn set_fd_meta(fd: impl AsFd, meta: &Meta, times: bool) -> io::Result<()> {
    let fd = fd.as_fd();
    rustix::fs::fchown(
        fd,
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
    )?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    for (name, value) in &meta.xattrs {
        match rustix::fs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
            Ok(()) => {}
            // A filesystem without user xattrs, or an xattr name the kernel
            // does not know: the file is still right, the xattr is lost.
            Err(Errno::OPNOTSUPP) | Err(Errno::PERM) | Err(Errno::INVAL) => {
                tracing::warn!(xattr = %name, "xattr from a layer could not be set");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if times {
        rustix::fs::futimens(fd, &timestamps(meta.mtime))?;
    }
    Ok(())
}

/// Owner, mode and times through an `O_PATH` descriptor (FIFOs: opening one
/// for real would block).
fn set_path_meta(fd: &OwnedFd, meta: &Meta) -> io::Result<()> {
    rustix::fs::chownat(
        fd,
        "",
        Some(Uid::from_raw(meta.uid)),
        Some(Gid::from_raw(meta.gid)),
        AtFlags::EMPTY_PATH,
    )?;
    // fchmodat has no AT_EMPTY_PATH before Linux 6.6: go through /proc.
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
    rustix::fs::chmod(proc.as_str(), Mode::from_raw_mode(meta.mode))?;
    rustix::fs::utimensat(fd, "", &timestamps(meta.mtime), AtFlags::EMPTY_PATH)?;
    Ok(())
}

/// Bytes and inodes used under `path` (st_blocks, each inode once).
pub fn disk_usage(path: &Path) -> io::Result<(u64, u64)> {
    let mut seen: HashMap<(u64, u64), ()> = HashMap::new();
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in rd {
            let entry = entry?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            use std::os::unix::fs::MetadataExt;
            if seen.insert((meta.dev(), meta.ino()), ()).is_none() {
                bytes += meta.blocks() * 512;
                inodes += 1;
            }
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        let ok = |p: &str| clean_path(Path::new(p)).map(|v| join(&v));
        assert_eq!(ok("./a/b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(ok("/a//b/").unwrap(), PathBuf::from("a/b"));
        assert_eq!(ok("./").unwrap(), PathBuf::from(""));
        assert!(ok("a/../b").is_err());
        assert!(ok("../x").is_err());
        assert!(ok("/..").is_err());
    }

    #[test]
    fn compression_magic() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd, 0]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"etc/\0\0"), Compression::None);
        assert_eq!(Compression::detect(&[]), Compression::None);
    }
}
