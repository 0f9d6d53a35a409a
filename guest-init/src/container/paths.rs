//! Paths inside a container root (or the share) resolved safely: symlinks
//! are followed the way a process chrooted into that root would see them
//! (an absolute target starts at the root, `..` stops at the root), so a
//! symlink in the container's files can never lead a mount outside. The
//! resolved path is then opened component by component with O_NOFOLLOW
//! (creating what is missing), and mounts go through the fd
//! (/proc/self/fd/N), so a path swapped for a symlink in between is refused
//! rather than followed.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};

/// Symlinks followed in one resolution before giving up (the kernel's
/// MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;

/// The normal components of `path`, with `.` dropped and `..` applied
/// lexically; a `..` that would climb above the start is an error.
pub fn clean_components(path: &str) -> Result<Vec<&str>, String> {
    if path.contains('\0') {
        return Err(format!("{path:?} contains a NUL byte"));
    }
    let mut out = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(format!("{path:?} climbs above its root with '..'"));
                }
            }
            p => out.push(p),
        }
    }
    Ok(out)
}

/// Resolves `path` inside `root` as a process chrooted into `root` would:
/// every symlink met on the way is replaced by its target (absolute
/// targets restart at `root`, `..` never climbs above it). Returns the
/// components relative to `root`; they contain no symlink, and the trailing
/// ones may not exist yet. `path` itself must not climb above the root
/// (see [`clean_components`]).
pub fn resolve_in_root(root: &Path, path: &str) -> io::Result<Vec<OsString>> {
    let clean =
        clean_components(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // Still to walk, in reverse (the next one is last).
    let mut pending: Vec<OsString> = clean.iter().rev().map(OsString::from).collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    let mut here = root.to_path_buf();
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            here = join_all(root, &resolved);
            continue;
        }
        if part == "." || part.is_empty() {
            continue;
        }
        let candidate = here.join(&part);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = std::fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                    here = root.to_path_buf();
                }
                for comp in target.components().rev() {
                    match comp {
                        Component::Normal(c) => pending.push(c.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
                    }
                }
            }
            Ok(_) => {
                here = candidate;
                resolved.push(part);
            }
            // Not there (yet): the rest is taken as written.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                here = candidate;
                resolved.push(part);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(resolved)
}

fn join_all(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// What to create when the last component is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// Nothing: a missing path is NotFound.
    Nothing,
    /// A directory (mode 0755), like the missing parents.
    Dir,
    /// An empty regular file (mode 0644), for a file bind mount.
    File,
}

/// Opens `parts` (from [`resolve_in_root`]) below `root` as an O_PATH fd,
/// one component at a time with O_NOFOLLOW, so nothing outside `root` can be
/// reached even if a component became a symlink after resolution (that is
/// an error, ELOOP or ENOTDIR). Missing parents are created as directories
/// unless `create` is `Nothing`; a missing last component as `create` says.
/// Mount points crossed on the way are entered, as a path lookup does.
pub fn open_in_root(
    root: BorrowedFd<'_>,
    parts: &[OsString],
    create: Create,
) -> io::Result<OwnedFd> {
    let path_flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = root.try_clone_to_owned()?;
    let Some((last, parents)) = parts.split_last() else {
        return Ok(dir);
    };
    for part in parents {
        let open = || {
            openat(
                dir.as_fd(),
                part.as_os_str(),
                path_flags | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
        };
        let next = match open() {
            Err(Errno::ENOENT) if create != Create::Nothing => {
                match mkdirat(
                    dir.as_fd(),
                    part.as_os_str(),
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => open()?,
                    Err(e) => return Err(e.into()),
                }
            }
            other => other?,
        };
        dir = next;
    }
    let last = last.as_os_str();
    let fd = match openat(dir.as_fd(), last, path_flags, Mode::empty()) {
        Err(Errno::ENOENT) if create != Create::Nothing => {
            let made = match create {
                Create::Dir => mkdirat(dir.as_fd(), last, Mode::from_bits_truncate(0o755)),
                _ => openat(
                    dir.as_fd(),
                    last,
                    OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                )
                .map(drop),
            };
            match made {
                Ok(()) | Err(Errno::EEXIST) => {
                    openat(dir.as_fd(), last, path_flags, Mode::empty())?
                }
                Err(e) => return Err(e.into()),
            }
        }
        other => other?,
    };
    if is_symlink(&fd)? {
        // Replaced by a symlink since it was resolved.
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    Ok(fd)
}

/// Resolves `path` in `root` (a directory path and an fd of it) and opens
/// it, creating what is missing as `create` says.
pub fn open_resolved(
    root: &Path,
    root_fd: BorrowedFd<'_>,
    path: &str,
    create: Create,
) -> io::Result<OwnedFd> {
    let parts = resolve_in_root(root, path)?;
    open_in_root(root_fd, &parts, create)
}

fn is_symlink(fd: &OwnedFd) -> io::Result<bool> {
    let st = fstat(fd.as_fd())?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
}

/// Whether the fd is a directory.
pub fn is_dir(fd: &OwnedFd) -> io::Result<bool> {
    let st = fstat(fd.as_fd())?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
}

/// The path through which system calls that take a path reach the file
/// `fd` was opened on (the mount target or source).
pub fn fd_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Opens a directory of the guest itself (a root, the share) as an O_PATH
/// fd.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// The mount points in /proc/self/mountinfo text that are `root` or below
/// it, in the file's order (parents before what is mounted on them).
pub fn mount_points_under(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(OsStr::from_bytes(&unescape_mountinfo(field))))
        .filter(|p| p.starts_with(root))
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4);
        match digits {
            Some(d) if b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(value as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("arrow-paths-{name}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn names(parts: &[OsString]) -> Vec<&str> {
        parts.iter().map(|p| p.to_str().unwrap()).collect()
    }

    #[test]
    fn clean_components_applies_dots() {
        assert_eq!(clean_components("/a/./b//c/").unwrap(), ["a", "b", "c"]);
        assert_eq!(clean_components("/a/../b").unwrap(), ["b"]);
        assert!(clean_components("/").unwrap().is_empty());
        assert!(clean_components("a/b").is_ok());
        let err = clean_components("/a/../../etc").unwrap_err();
        assert!(err.contains("above"), "{err}");
        assert!(clean_components("/..").is_err());
        assert!(clean_components("/a\0").is_err());
    }

    /// A container tree with the symlinks real images have, and hostile ones.
    fn tree() -> TempDir {
        let t = TempDir::new("tree");
        let r = &t.0;
        for d in [
            "etc",
            "usr/share/zoneinfo",
            "run/systemd/resolve",
            "var",
            "data",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        std::fs::write(r.join("usr/share/zoneinfo/UTC"), "tz").unwrap();
        symlink("/usr/share/zoneinfo/UTC", r.join("etc/localtime")).unwrap();
        symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            r.join("etc/resolv.conf"),
        )
        .unwrap();
        symlink("/run", r.join("var/run")).unwrap();
        symlink("../../../../../../etc", r.join("data/escape")).unwrap();
        symlink("/", r.join("data/slash")).unwrap();
        symlink("loop2", r.join("data/loop1")).unwrap();
        symlink("loop1", r.join("data/loop2")).unwrap();
        t
    }

    #[test]
    fn resolves_like_a_chroot() {
        let t = tree();
        let r = &t.0;
        let res = |p: &str| resolve_in_root(r, p).map(|v| names(&v).join("/"));
        assert_eq!(res("/etc/localtime").unwrap(), "usr/share/zoneinfo/UTC");
        // Dangling inside the root: resolved to where it points, to create.
        assert_eq!(
            res("/etc/resolv.conf").unwrap(),
            "run/systemd/resolve/stub-resolv.conf"
        );
        assert_eq!(res("/var/run/x/y").unwrap(), "run/x/y");
        assert_eq!(res("/new/dir").unwrap(), "new/dir");
        assert_eq!(res("/").unwrap(), "");
        // Symlinks that try to leave stop at the root.
        assert_eq!(res("/data/escape/passwd").unwrap(), "etc/passwd");
        assert_eq!(res("/data/slash/etc").unwrap(), "etc");
        assert_eq!(
            res("/data/loop1").unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        // The request itself may not climb out.
        assert_eq!(
            res("/data/../../etc").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        // A file in the middle of the path.
        assert!(res("/usr/share/zoneinfo/UTC/x").is_err());
    }

    #[test]
    fn opens_and_creates_inside_the_root() {
        let t = tree();
        let r = &t.0;
        let root = open_dir(r).unwrap();
        let open = |p: &str, c: Create| open_resolved(r, root.as_fd(), p, c);

        // Missing: NotFound unless asked to create.
        let err = open("/a/b/c", Create::Nothing).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!r.join("a").exists());

        let dir = open("/a/b/c", Create::Dir).unwrap();
        assert!(is_dir(&dir).unwrap());
        assert!(r.join("a/b/c").is_dir());

        let file = open("/etc/resolv.conf", Create::File).unwrap();
        assert!(!is_dir(&file).unwrap());
        assert!(r.join("run/systemd/resolve/stub-resolv.conf").is_file());

        // Through an escaping symlink: created inside, never outside.
        open("/data/escape/new-file", Create::File).unwrap();
        assert!(r.join("etc/new-file").is_file());

        // The fd's path reaches the same file.
        let fd = open("/usr/share/zoneinfo/UTC", Create::Nothing).unwrap();
        assert_eq!(std::fs::read_to_string(fd_path(&fd)).unwrap(), "tz");

        let root_again = open("/", Create::Nothing).unwrap();
        assert!(is_dir(&root_again).unwrap());
    }

    #[test]
    fn a_symlink_swapped_in_after_resolution_is_refused() {
        let t = tree();
        let r = &t.0;
        let root = open_dir(r).unwrap();
        let parts = resolve_in_root(r, "/swap/inner").unwrap();
        // Someone replaces the directory with a symlink out of the root.
        symlink("/", r.join("swap")).unwrap();
        let err = open_in_root(root.as_fd(), &parts, Create::Dir).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)),
            "{err}"
        );
        // A last component that became a symlink.
        let parts = resolve_in_root(r, "/data/last").unwrap();
        symlink("/etc", r.join("data/last")).unwrap();
        let err = open_in_root(root.as_fd(), &parts, Create::File).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn mountinfo_entries_under_a_root() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
40 22 0:40 / /run/arrow/containers/c1/root rw - virtiofs arrow rw
41 40 0:41 / /run/arrow/containers/c1/root/proc rw - proc proc rw
42 40 0:42 / /run/arrow/containers/c1/root/my\\040dir rw - tmpfs tmpfs rw
43 40 0:43 / /run/arrow/containers/c10/root rw - virtiofs arrow rw
44 41 0:44 / /run/arrow/containers/c1/root/proc/kcore rw - devtmpfs dev rw
";
        let got = mount_points_under(text, Path::new("/run/arrow/containers/c1/root"));
        let want: Vec<PathBuf> = [
            "/run/arrow/containers/c1/root",
            "/run/arrow/containers/c1/root/proc",
            "/run/arrow/containers/c1/root/my dir",
            "/run/arrow/containers/c1/root/proc/kcore",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
        assert!(mount_points_under("garbage\n\n1 2", Path::new("/")).is_empty());
        assert_eq!(unescape_mountinfo(r"a\134b\011\0"), b"a\\b\t\\0");
    }
}
