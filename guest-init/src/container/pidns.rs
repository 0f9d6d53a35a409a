//! A container's own PID namespace (agent.proto, `PidNamespace.CONTAINER`).
//!
//! Its init is cloned straight into a new PID namespace, so the app is PID 1
//! there, as under runc; later processes (execs) join that namespace through
//! the init's pidfd. procfs shows the PID namespace of the process that
//! mounts it, so the container's "proc" mounts (and the masked and read-only
//! paths below them) cannot be made at CreateContainer by arrow-init: they
//! are resolved and opened then, and mounted by the init itself, inside its
//! namespace, before it executes. That code runs in the spawn child, which
//! borrows the agent's memory (see `process`): it makes raw system calls on
//! data prepared here and allocates nothing.
//!
//! When the init exits the kernel kills every other process of the
//! namespace and ends it (as with runc); an init that does not reap its
//! orphans leaves zombies only in its own namespace, until it exits.

use std::ffi::{c_char, c_int, CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// A started process.
#[derive(Debug)]
pub struct Spawned {
    /// In the agent's PID namespace.
    pub pid: i32,
    /// The init of a new PID namespace: its pidfd, which later processes
    /// join the namespace by (it stays valid after the init is gone, and
    /// joining then fails with ESRCH).
    pub pidfd: Option<OwnedFd>,
}

/// procfs' `f_type` (statfs(2)).
const PROC_SUPER_MAGIC: libc::c_long = 0x9fa0;

/// How a new process stands to PID namespaces.
#[derive(Clone, Copy)]
pub enum PidNs<'a> {
    /// In the agent's own: a guest process, or one of a POD container.
    Inherit,
    /// PID 1 of a new namespace, which first makes these mounts from
    /// inside it (the init of a CONTAINER container).
    New(&'a InitMounts),
    /// In the namespace of the process this pidfd refers to (an exec of a
    /// CONTAINER container; its init's pidfd).
    Join(BorrowedFd<'a>),
}

/// A failed step in the child: what, and errno.
pub type ChildFailure = (&'static str, c_int);

/// The mounts a CONTAINER container's init makes inside its namespace.
#[derive(Debug)]
pub struct InitMounts {
    mounts: Vec<InitMount>,
    /// Bound over masked files (the guest's, as at create).
    dev_null: CString,
}

/// One "proc" mount of the container, resolved inside its root at create.
#[derive(Debug)]
pub struct InitMount {
    /// The mount point (O_PATH); kept open so that the init mounts on
    /// exactly what was resolved, through `target_path` (never read: it is
    /// held for its number).
    _target: OwnedFd,
    /// `/proc/self/fd/<target>`.
    target_path: CString,
    /// The mount point's parent directory (O_PATH) and its name there:
    /// looking the name up again crosses into the new mount, to reach the
    /// paths below it.
    parent: OwnedFd,
    name: CString,
    flags: libc::c_ulong,
    data: Option<CString>,
    /// Relative to the mount: masked paths, then read-only ones.
    masked: Vec<CString>,
    readonly: Vec<CString>,
}

impl InitMounts {
    pub fn new(mounts: Vec<InitMount>, dev_null: &std::path::Path) -> Result<Self, String> {
        use std::os::unix::ffi::OsStrExt;
        let dev_null = CString::new(dev_null.as_os_str().as_bytes())
            .map_err(|_| format!("{} contains a NUL byte", dev_null.display()))?;
        Ok(Self { mounts, dev_null })
    }

    /// Makes the mounts, from inside the init's namespace.
    ///
    /// # Safety
    /// Only for the spawn child (see `process::setup_and_exec`): raw system
    /// calls, no allocation. The fds it uses belong to `self`, which the
    /// parent keeps alive (it is suspended meanwhile).
    pub unsafe fn mount_in_child(&self) -> Result<(), ChildFailure> {
        for m in &self.mounts {
            let data = m
                .data
                .as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast());
            if libc::mount(
                c"proc".as_ptr(),
                m.target_path.as_ptr(),
                c"proc".as_ptr(),
                m.flags,
                data,
            ) == -1
            {
                return Err(("mount the container's proc", errno()));
            }
            if m.masked.is_empty() && m.readonly.is_empty() {
                continue;
            }
            let proc_root = open_path(m.parent.as_raw_fd(), &m.name, 0)
                .map_err(|e| ("open the container's proc", e))?;
            let done = below_proc(proc_root, m, &self.dev_null);
            libc::close(proc_root);
            done?;
        }
        Ok(())
    }
}

/// Masks and read-only paths below a freshly mounted proc (`proc_root`).
unsafe fn below_proc(proc_root: c_int, m: &InitMount, dev_null: &CStr) -> Result<(), ChildFailure> {
    let mut sfs: libc::statfs = std::mem::zeroed();
    if libc::fstatfs(proc_root, &mut sfs) == -1 {
        return Err(("open the container's proc", errno()));
    }
    if sfs.f_type != PROC_SUPER_MAGIC {
        // The name was swapped for something else since create.
        return Err(("open the container's proc", libc::ELOOP));
    }
    for rel in &m.masked {
        mask(proc_root, rel, dev_null).map_err(|e| ("mask a path below /proc", e))?;
    }
    for rel in &m.readonly {
        readonly(proc_root, rel).map_err(|e| ("make a path below /proc read-only", e))?;
    }
    Ok(())
}

/// A directory gets an empty read-only tmpfs, anything else `dev_null`;
/// a missing path is skipped (as at create).
unsafe fn mask(proc_root: c_int, rel: &CStr, dev_null: &CStr) -> Result<(), c_int> {
    let fd = match open_path(proc_root, rel, libc::RESOLVE_BENEATH) {
        Ok(fd) => fd,
        Err(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut st: libc::stat = std::mem::zeroed();
    let mut rc = libc::fstat(fd, &mut st);
    if rc == 0 {
        let at = FdPath::new(fd);
        rc = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            libc::mount(
                c"tmpfs".as_ptr(),
                at.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        } else {
            libc::mount(
                dev_null.as_ptr(),
                at.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
    }
    let err = errno();
    libc::close(fd);
    if rc == -1 {
        return Err(err);
    }
    Ok(())
}

/// Binds the path over itself and remounts that read-only, keeping its
/// nosuid/nodev/noexec/atime flags; a missing path is skipped.
unsafe fn readonly(proc_root: c_int, rel: &CStr) -> Result<(), c_int> {
    let fd = match open_path(proc_root, rel, libc::RESOLVE_BENEATH) {
        Ok(fd) => fd,
        Err(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let here = FdPath::new(fd);
    let rc = libc::mount(
        here.as_ptr(),
        here.as_ptr(),
        std::ptr::null(),
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    );
    let err = errno();
    libc::close(fd);
    if rc == -1 {
        return Err(err);
    }
    // Looked up again: the bind just made, not what is under it.
    let fd = open_path(proc_root, rel, libc::RESOLVE_BENEATH)?;
    let mut svfs: libc::statvfs = std::mem::zeroed();
    // (glibc takes the flags from statfs(2): the kernel has set ST_VALID
    // since 2.6.36, so it never falls back to reading /proc/mounts.)
    let mut rc = libc::fstatvfs(fd, &mut svfs);
    if rc == 0 {
        let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept_flags(svfs.f_flag);
        let at = FdPath::new(fd);
        rc = libc::mount(
            std::ptr::null(),
            at.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        );
    }
    let err = errno();
    libc::close(fd);
    if rc == -1 {
        return Err(err);
    }
    Ok(())
}

/// The per-mount flags (statvfs `f_flag`, ST_*) a read-only remount must
/// repeat, as MS_* flags.
fn kept_flags(st: libc::c_ulong) -> libc::c_ulong {
    [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ]
    .iter()
    .filter(|(s, _)| st & s != 0)
    .fold(0, |acc, (_, ms)| acc | ms)
}

/// openat2(O_PATH | O_CLOEXEC) without following any symlink.
unsafe fn open_path(dir: c_int, path: &CStr, resolve: u64) -> Result<c_int, c_int> {
    let mut how: libc::open_how = std::mem::zeroed();
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = resolve | libc::RESOLVE_NO_SYMLINKS;
    let fd = libc::syscall(
        libc::SYS_openat2,
        dir,
        path.as_ptr(),
        &how as *const libc::open_how,
        std::mem::size_of::<libc::open_how>(),
    );
    if fd == -1 {
        return Err(errno());
    }
    Ok(fd as c_int)
}

fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// `/proc/self/fd/<fd>` as a C string, built on the stack (no allocation).
struct FdPath {
    buf: [u8; 32],
}

impl FdPath {
    fn new(fd: c_int) -> Self {
        const PREFIX: &[u8] = b"/proc/self/fd/";
        let mut buf = [0u8; 32];
        buf[..PREFIX.len()].copy_from_slice(PREFIX);
        let mut digits = [0u8; 10];
        let mut n = fd.unsigned_abs();
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for (i, d) in digits[..len].iter().rev().enumerate() {
            buf[PREFIX.len() + i] = *d;
        }
        // The rest of `buf` is zero: the terminating NUL.
        Self { buf }
    }

    fn as_ptr(&self) -> *const c_char {
        self.buf.as_ptr().cast()
    }

    #[cfg(test)]
    fn as_cstr(&self) -> &CStr {
        CStr::from_bytes_until_nul(&self.buf).unwrap_or_default()
    }
}

impl InitMount {
    /// `target` is the resolved mount point (O_PATH), `parent` its parent
    /// directory and `name` its name there; `flags` and `data` as mount(2)
    /// takes them.
    pub fn new(
        target: OwnedFd,
        parent: OwnedFd,
        name: &std::ffi::OsStr,
        flags: libc::c_ulong,
        data: &str,
    ) -> Result<Self, String> {
        use std::os::unix::ffi::OsStrExt;
        let target_path = FdPath::new(target.as_raw_fd());
        let name = CString::new(name.as_bytes()).map_err(|_| "a NUL byte in a mount point")?;
        let data = match data {
            "" => None,
            d => Some(CString::new(d).map_err(|_| "a NUL byte in mount options")?),
        };
        Ok(Self {
            target_path: target_path.as_cstr_owned(),
            _target: target,
            parent,
            name,
            flags,
            data,
            masked: Vec::new(),
            readonly: Vec::new(),
        })
    }

    /// A masked path, as components below the mount ("." for the mount
    /// itself).
    pub fn add_masked(&mut self, rel: &[&str]) -> Result<(), String> {
        self.masked.push(relative(rel)?);
        Ok(())
    }

    /// A read-only path, as components below the mount.
    pub fn add_readonly(&mut self, rel: &[&str]) -> Result<(), String> {
        self.readonly.push(relative(rel)?);
        Ok(())
    }
}

impl FdPath {
    fn as_cstr_owned(&self) -> CString {
        let len = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.buf.len());
        // No NUL inside the first `len` bytes, by construction.
        CString::new(&self.buf[..len]).unwrap_or_default()
    }
}

fn relative(rel: &[&str]) -> Result<CString, String> {
    let joined = if rel.is_empty() {
        ".".to_string()
    } else {
        rel.join("/")
    };
    CString::new(joined).map_err(|_| "a NUL byte in a path".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_paths_are_built_without_allocating() {
        for (fd, want) in [
            (0, "/proc/self/fd/0"),
            (7, "/proc/self/fd/7"),
            (10, "/proc/self/fd/10"),
            (1234567, "/proc/self/fd/1234567"),
            (i32::MAX, "/proc/self/fd/2147483647"),
        ] {
            let p = FdPath::new(fd);
            assert_eq!(p.as_cstr().to_str().unwrap(), want);
            assert_eq!(p.as_cstr_owned().to_str().unwrap(), want);
        }
    }

    #[test]
    fn remount_keeps_the_mounts_flags() {
        let st = libc::ST_NOSUID | libc::ST_NOEXEC | libc::ST_RELATIME | libc::ST_RDONLY;
        assert_eq!(
            kept_flags(st),
            libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_RELATIME
        );
        assert_eq!(kept_flags(0), 0);
    }

    #[test]
    fn paths_below_the_mount_are_relative() {
        assert_eq!(
            relative(&["sys", "kernel"]).unwrap().to_str(),
            Ok("sys/kernel")
        );
        assert_eq!(relative(&[]).unwrap().to_str(), Ok("."));
        assert!(relative(&["a\0b"]).is_err());
    }

    /// The child's steps on a real proc, in a private mount namespace: the
    /// test runs itself again under `unshare --mount` (root only; skipped
    /// otherwise). The fds must be opened in the namespace that mounts.
    #[test]
    fn masks_and_read_only_paths_below_a_proc() {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        const INSIDE: &str = "ARROW_PIDNS_TEST_IN_MOUNT_NS";
        const NAME: &str = "container::pidns::tests::masks_and_read_only_paths_below_a_proc";
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: not root");
            return;
        }
        if std::env::var_os(INSIDE).is_none() {
            let exe = std::env::current_exe().unwrap();
            let run = std::process::Command::new("unshare")
                .args(["--mount", "--propagation", "private"])
                .arg(exe)
                .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
                .env(INSIDE, "1")
                .output();
            match run {
                Err(e) => eprintln!("skipping: unshare(1): {e}"),
                Ok(out) => assert!(
                    out.status.success()
                        && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
            return;
        }
        let dir = std::env::temp_dir().join(format!("arrow-pidns-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc")).unwrap();
        let open = |p: &std::path::Path| -> OwnedFd {
            std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(p)
                .unwrap()
                .into()
        };
        let mut m = InitMount::new(
            open(&dir.join("proc")),
            open(&dir),
            std::ffi::OsStr::new("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        )
        .unwrap();
        m.add_masked(&["cmdline"]).unwrap();
        m.add_masked(&["driver"]).unwrap();
        m.add_masked(&["no-such-thing"]).unwrap();
        m.add_readonly(&["sys"]).unwrap();
        let mounts = InitMounts::new(vec![m], std::path::Path::new("/dev/null")).unwrap();
        // SAFETY: raw system calls on fds `mounts` owns; this process is in
        // a mount namespace of its own.
        let done = unsafe { mounts.mount_in_child() };
        let proc = dir.join("proc");
        let cmdline = std::fs::metadata(proc.join("cmdline"));
        let driver = std::fs::read_dir(proc.join("driver")).map(|d| d.count());
        let write = std::fs::write(proc.join("sys/kernel/shm_rmid_forced"), "0");
        let mounted = proc.join("self/status").exists();
        drop(mounts);
        crate::container::rootfs::unmount_all(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(done, Ok(()));
        assert!(mounted);
        assert!(cmdline.unwrap().file_type().is_char_device());
        assert_eq!(driver.unwrap(), 0);
        assert_eq!(write.unwrap_err().raw_os_error(), Some(libc::EROFS));
    }
}
