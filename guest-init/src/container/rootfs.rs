//! Assembling a container's root: the rootfs bound from the share, then the
//! OCI mounts in order, a populated /dev when the spec gives it a tmpfs,
//! masked and read-only paths, and finally the read-only root. Every path
//! inside the root is resolved with `paths` (never outside the root) and
//! every mount goes through an fd of its target.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fchmodat, makedev, mknodat, FchmodatFlags, Mode, SFlag};
use nix::sys::statvfs::{statvfs, FsFlags};

use super::cgroup::Cgroup;
use super::paths::{
    self, clean_components, fd_path, open_dir, open_in_root, open_resolved, resolve_in_root, Create,
};
use super::pidns::InitMount;
use super::spec::{ContainerSpec, MountKind, MountPlan};
use crate::log_error;

/// The device nodes of a container's /dev (runc's defaults):
/// (name, major, minor).
const DEV_NODES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The symlinks of a container's /dev: (target, name).
const DEV_LINKS: &[(&str, &str)] = &[
    ("pts/ptmx", "ptmx"),
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
];

/// Where a container's files come from and go.
pub struct Places<'a> {
    /// The share (sources of the rootfs and of bind mounts).
    pub share: &'a Path,
    /// The container's root, an existing empty directory.
    pub root: &'a Path,
    pub cgroup: &'a Cgroup,
    /// Bound over masked files.
    pub dev_null: &'a Path,
}

/// Builds the root. Returns the mounts its init makes (the "proc" mounts of
/// a container with its own PID namespace, with the masked and read-only
/// paths below them; see `pidns`), resolved and opened but not mounted. On
/// error, what was mounted stays for the caller's teardown
/// ([`unmount_all`]).
pub fn assemble(spec: &ContainerSpec, at: &Places<'_>) -> Result<Vec<InitMount>, String> {
    let share =
        open_dir(at.share).map_err(|e| format!("open share {}: {e}", at.share.display()))?;
    let rootfs = open_resolved(at.share, share.as_fd(), &spec.rootfs, Create::Nothing)
        .map_err(|e| format!("rootfs {:?}: {e}", spec.rootfs))?;
    if !paths::is_dir(&rootfs).map_err(|e| format!("rootfs {:?}: {e}", spec.rootfs))? {
        return Err(format!("rootfs {:?} is not a directory", spec.rootfs));
    }
    mount(
        Some(fd_path(&rootfs).as_str()),
        at.root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        format!(
            "bind rootfs {:?} on {}: {e}",
            spec.rootfs,
            at.root.display()
        )
    })?;
    // The mounted rootfs, not the directory under it.
    let root = open_dir(at.root).map_err(|e| format!("open {}: {e}", at.root.display()))?;
    let ctx = Ctx {
        root_path: at.root,
        root: &root,
        share_path: at.share,
        share: &share,
    };

    let mut dev_tmpfs = false;
    // (index in spec.mounts, the mount)
    let mut by_init: Vec<(usize, InitMount)> = Vec::new();
    for (i, m) in spec.mounts.iter().enumerate() {
        if spec.mounted_by_init(m) {
            let prepared = ctx
                .prepare_init_mount(m)
                .map_err(|e| format!("mount {} (proc, by the init): {e}", m.destination))?;
            by_init.push((i, prepared));
            continue;
        }
        ctx.mount_one(m, at.cgroup)
            .map_err(|e| format!("mount {} ({}): {e}", m.destination, kind_name(m.kind)))?;
        let is_dev = clean_components(&m.destination).is_ok_and(|c| c == ["dev"]);
        dev_tmpfs |= is_dev && m.kind == MountKind::Fs("tmpfs");
    }
    if dev_tmpfs {
        ctx.populate_dev()
            .map_err(|e| format!("populate /dev: {e}"))?;
    }
    for p in &spec.masked_paths {
        if let Some((i, rel)) = spec.below_init_mount(p) {
            let k = init_mount(&by_init, i)?;
            by_init[k].1.add_masked(&rel)?;
            continue;
        }
        ctx.mask(p, at.dev_null)
            .map_err(|e| format!("mask {p}: {e}"))?;
    }
    for p in &spec.readonly_paths {
        if let Some((i, rel)) = spec.below_init_mount(p) {
            let k = init_mount(&by_init, i)?;
            by_init[k].1.add_readonly(&rel)?;
            continue;
        }
        ctx.readonly(p)
            .map_err(|e| format!("make {p} read-only: {e}"))?;
    }
    if spec.readonly_rootfs {
        remount_readonly(at.root).map_err(|e| format!("make the root read-only: {e}"))?;
    }
    Ok(by_init.into_iter().map(|(_, m)| m).collect())
}

/// Where mount `i` of the spec is among those the init makes.
fn init_mount(by_init: &[(usize, InitMount)], i: usize) -> Result<usize, String> {
    by_init
        .iter()
        .position(|(j, _)| *j == i)
        .ok_or_else(|| format!("mount {i} is not made by the init"))
}

fn kind_name(kind: MountKind) -> &'static str {
    match kind {
        MountKind::Bind => "bind",
        MountKind::Fs(t) => t,
        MountKind::Cgroup => "cgroup2",
    }
}

struct Ctx<'a> {
    root_path: &'a Path,
    root: &'a OwnedFd,
    share_path: &'a Path,
    share: &'a OwnedFd,
}

impl Ctx<'_> {
    fn open(&self, path: &str, create: Create) -> io::Result<OwnedFd> {
        open_resolved(self.root_path, self.root.as_fd(), path, create)
    }

    /// Resolves (and creates) a mount point for the init to mount on, and
    /// opens it and its parent (see `pidns::InitMount`).
    fn prepare_init_mount(&self, m: &MountPlan) -> Result<InitMount, String> {
        let parts = resolve_in_root(self.root_path, &m.destination).map_err(|e| e.to_string())?;
        let Some((name, parents)) = parts.split_last() else {
            return Err("the mount point is the root".into());
        };
        let parent = open_in_root(self.root.as_fd(), parents, Create::Dir)
            .map_err(|e| format!("destination's parent: {e}"))?;
        let target = open_in_root(self.root.as_fd(), &parts, Create::Dir)
            .map_err(|e| format!("destination: {e}"))?;
        if !paths::is_dir(&target).map_err(|e| e.to_string())? {
            return Err("the destination is not a directory".into());
        }
        InitMount::new(
            target,
            parent,
            name,
            m.options.flags.bits() as libc::c_ulong,
            &m.options.data,
        )
    }

    fn mount_one(&self, m: &MountPlan, cgroup: &Cgroup) -> Result<(), String> {
        let o = &m.options;
        let source = match m.kind {
            MountKind::Bind => Some(
                open_resolved(
                    self.share_path,
                    self.share.as_fd(),
                    &m.source,
                    Create::Nothing,
                )
                .map_err(|e| format!("source {:?}: {e}", m.source))?,
            ),
            MountKind::Cgroup => Some(
                open_dir(cgroup.dir())
                    .map_err(|e| format!("cgroup {}: {e}", cgroup.dir().display()))?,
            ),
            MountKind::Fs(_) => None,
        };
        let create = match &source {
            Some(src) if !paths::is_dir(src).map_err(|e| e.to_string())? => Create::File,
            _ => Create::Dir,
        };
        let target = self
            .open(&m.destination, create)
            .map_err(|e| format!("destination: {e}"))?;
        let target = fd_path(&target);
        match (m.kind, &source) {
            (MountKind::Fs(fstype), _) => {
                let src = if m.source.is_empty() {
                    fstype
                } else {
                    &m.source
                };
                let data = (!o.data.is_empty()).then_some(o.data.as_str());
                mount(Some(src), target.as_str(), Some(fstype), o.flags, data)
                    .map_err(|e| e.to_string())?;
            }
            (_, Some(src)) => {
                let recursive = m.kind == MountKind::Bind && o.recursive;
                let flags = MsFlags::MS_BIND
                    | if recursive {
                        MsFlags::MS_REC
                    } else {
                        MsFlags::empty()
                    };
                mount(
                    Some(fd_path(src).as_str()),
                    target.as_str(),
                    None::<&str>,
                    flags,
                    None::<&str>,
                )
                .map_err(|e| e.to_string())?;
                if !o.flags.is_empty() {
                    // Bind mounts take their flags in a remount of the new
                    // mount (reopened: the fd above is the one under it).
                    let mounted = self
                        .open(&m.destination, Create::Nothing)
                        .map_err(|e| e.to_string())?;
                    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | o.flags;
                    mount(
                        None::<&str>,
                        fd_path(&mounted).as_str(),
                        None::<&str>,
                        flags,
                        None::<&str>,
                    )
                    .map_err(|e| format!("remount {:?}: {e}", o.flags))?;
                }
            }
            (_, None) => return Err("no source to bind".into()),
        }
        for &propagation in &o.propagation {
            let mounted = self
                .open(&m.destination, Create::Nothing)
                .map_err(|e| e.to_string())?;
            mount(
                None::<&str>,
                fd_path(&mounted).as_str(),
                None::<&str>,
                propagation,
                None::<&str>,
            )
            .map_err(|e| format!("set propagation {propagation:?}: {e}"))?;
        }
        Ok(())
    }

    /// runc's /dev: the standard nodes (mode 0666, root's) and links.
    fn populate_dev(&self) -> Result<(), String> {
        let dev = self
            .open("/dev", Create::Nothing)
            .map_err(|e| e.to_string())?;
        // A directory fd that *at calls can create in.
        let dev = nix::fcntl::openat(
            dev.as_fd(),
            ".",
            nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC
                | nix::fcntl::OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| format!("open /dev: {e}"))?;
        let mode = Mode::from_bits_truncate(0o666);
        for &(name, major, minor) in DEV_NODES {
            match mknodat(
                dev.as_fd(),
                name,
                SFlag::S_IFCHR,
                mode,
                makedev(major, minor),
            ) {
                // Mounted there by the spec: keep it.
                Err(Errno::EEXIST) => continue,
                other => other.map_err(|e| format!("mknod /dev/{name}: {e}"))?,
            }
            // mknod applied our umask.
            fchmodat(dev.as_fd(), name, mode, FchmodatFlags::FollowSymlink)
                .map_err(|e| format!("chmod /dev/{name}: {e}"))?;
        }
        for &(target, name) in DEV_LINKS {
            match nix::unistd::symlinkat(target, dev.as_fd(), name) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(format!("symlink /dev/{name}: {e}")),
            }
        }
        Ok(())
    }

    /// A directory gets an empty read-only tmpfs, anything else /dev/null.
    fn mask(&self, path: &str, dev_null: &Path) -> Result<(), String> {
        let fd = match self.open(path, Create::Nothing) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(|e| e.to_string())?,
        };
        let target = fd_path(&fd);
        let done = if paths::is_dir(&fd).map_err(|e| e.to_string())? {
            mount(
                Some("tmpfs"),
                target.as_str(),
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None::<&str>,
            )
        } else {
            mount(
                Some(dev_null),
                target.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        done.map_err(|e| e.to_string())
    }

    /// Binds the path over itself and remounts that read-only, keeping its
    /// other flags.
    fn readonly(&self, path: &str) -> Result<(), String> {
        let fd = match self.open(path, Create::Nothing) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other.map_err(|e| e.to_string())?,
        };
        let here = fd_path(&fd);
        mount(
            Some(here.as_str()),
            here.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("bind: {e}"))?;
        let mounted = self
            .open(path, Create::Nothing)
            .map_err(|e| e.to_string())?;
        remount_readonly(Path::new(&fd_path(&mounted))).map_err(|e| format!("remount: {e}"))
    }
}

/// MS_REMOUNT | MS_BIND | MS_RDONLY of the mount at `target`, keeping its
/// nosuid/nodev/noexec/atime flags.
fn remount_readonly(target: &Path) -> Result<(), Errno> {
    let have = statvfs(target)?.flags();
    let keep = [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ];
    let flags = keep.iter().filter(|(st, _)| have.contains(*st)).fold(
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        |acc, (_, ms)| acc | *ms,
    );
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
}

/// Unmounts everything at or below `root` (as /proc/self/mountinfo lists
/// it, so also what was mounted inside by the container itself), last
/// mounted first; what stays busy is detached lazily.
pub fn unmount_all(root: &Path) -> Result<(), String> {
    let nofollow = MntFlags::UMOUNT_NOFOLLOW;
    let mut busy: Vec<PathBuf> = Vec::new();
    // A few rounds: an unmount can uncover a mount beneath it.
    for _ in 0..4 {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
        let points = paths::mount_points_under(&text, root);
        if points.is_empty() {
            return Ok(());
        }
        busy.clear();
        for p in points.iter().rev() {
            match umount2(p, nofollow) {
                // EINVAL: no longer a mount point (went with its parent).
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(_) => busy.push(p.clone()),
            }
        }
    }
    let mut failed = Vec::new();
    for p in &busy {
        match umount2(p, nofollow | MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {
                log_error!("{} was busy; detached it lazily", p.display());
            }
            Err(e) => failed.push(format!("unmount {}: {e}", p.display())),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}
