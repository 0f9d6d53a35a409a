//! The filesystems a container expects, mounted by PID 1 at boot. The rootfs
//! is the user's tree, so mount points may be missing: they are created on
//! demand (after a failed mount, so a present one costs no extra call).

use std::io;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use crate::log_error;

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// In order: later targets live inside earlier ones.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Symlinks every Linux userland expects in /dev.
const DEV_LINKS: &[(&str, &str)] = &[
    ("pts/ptmx", "/dev/ptmx"),
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
];

/// Character devices created when the kernel has no devtmpfs.
const FALLBACK_NODES: &[(&str, u64, u64, u32)] = &[
    ("/dev/null", 1, 3, 0o666),
    ("/dev/zero", 1, 5, 0o666),
    ("/dev/full", 1, 7, 0o666),
    ("/dev/random", 1, 8, 0o666),
    ("/dev/urandom", 1, 9, 0o666),
    ("/dev/tty", 5, 0, 0o666),
    ("/dev/console", 5, 1, 0o600),
    ("/dev/kmsg", 1, 11, 0o644),
];

/// Mounts everything and creates the /dev links. Failures are logged and
/// skipped: PID 1 carries on with what it has.
pub fn mount_all() {
    for spec in MOUNTS {
        match mount_one(spec) {
            Ok(()) => {}
            Err(Errno::ENODEV) if spec.fstype == "devtmpfs" => dev_fallback(),
            Err(e) => log_error!("mount {} on {}: {e}", spec.fstype, spec.target),
        }
    }
    // devtmpfs made a ptmx node; ours must be the devpts instance's.
    let _ = nix::unistd::unlink("/dev/ptmx");
    for (target, link) in DEV_LINKS {
        match nix::unistd::symlinkat(*target, nix::fcntl::AT_FDCWD, *link) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => log_error!("symlink {link}: {e}"),
        }
    }
}

fn mount_one(spec: &MountSpec) -> Result<(), Errno> {
    let attempt = || {
        mount(
            Some(spec.source),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        )
    };
    match attempt() {
        Err(Errno::ENOENT) => {
            match nix::unistd::mkdir(spec.target, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => attempt(),
                Err(e) => Err(e),
            }
        }
        // Already mounted (e.g. the kernel mounted devtmpfs itself).
        Err(Errno::EBUSY) => Ok(()),
        other => other,
    }
}

/// No devtmpfs in this kernel: a tmpfs /dev with the basic nodes.
fn dev_fallback() {
    let spec = MountSpec {
        source: "tmpfs",
        target: "/dev",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    };
    if let Err(e) = mount_one(&spec) {
        log_error!("mount tmpfs on /dev: {e}");
        return;
    }
    for &(path, major, minor, mode) in FALLBACK_NODES {
        let dev = nix::sys::stat::makedev(major, minor);
        if let Err(e) = nix::sys::stat::mknod(
            path,
            nix::sys::stat::SFlag::S_IFCHR,
            Mode::from_bits_truncate(mode),
            dev,
        ) {
            log_error!("mknod {path}: {}", io::Error::from(e));
        }
    }
}
