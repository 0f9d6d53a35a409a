//! The host side of a pod's virtio-fs share: one tree per pod that
//! `arrow-vmm` exports to the guest, on which the shim mounts each
//! container's rootfs and binds its volumes. The guest sees every one of
//! these mounts through the one device, so containers can come and go
//! without touching the VM's devices.
//!
//! The guest is hostile, and the VMM serves this tree to it with root's
//! rights, so the shim (root) never resolves a path the guest can change:
//!
//! - `<pod>/skeleton/` holds the directories and mount-point files the shim
//!   creates (`<container>/rootfs`, `<container>/mounts/<n>`). It is never
//!   exported.
//! - `<pod>/shared/` is what the VMM exports: a read-only, `nosuid`,
//!   `nodev`, `noexec` bind mount of the skeleton, with each container's
//!   rootfs and volumes mounted on top of it. The guest can write only
//!   inside those mounts (each writable or not by its own flags); the
//!   skeleton's own entries, every path the shim walks, are read-only to it,
//!   so it can plant no symlink and fill no host directory there.
//! - Each mount is complete before it is attached: binds are cloned from
//!   their source with `open_tree`, given their flags with `mount_setattr`
//!   and only then moved into the view with `move_mount`, so a read-only
//!   volume is never writable, not even for an instant. Every mount in the
//!   view is `nodev`: a device node the guest creates in its rootfs or a
//!   volume can never be opened on the host by the VMM.
//! - Unmounting uses `UMOUNT_NOFOLLOW`.
//!
//! Layout: `<share>/<container>/rootfs` and `<share>/<container>/mounts/<n>`.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};

use crate::spec::{check_identifier, SharedBind, SpecError};

/// A failed host mount.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("mount {kind} {source_path} on {target}: {err}")]
    Mount {
        kind: String,
        source_path: String,
        target: PathBuf,
        err: nix::Error,
    },
    #[error("mount options for {target} are {len} bytes, more than a page: too many image layers")]
    OptionsTooLong { target: PathBuf, len: usize },
    #[error("{what} {path}: {err}")]
    Io {
        what: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("share path {0:?} is not a plain relative path inside the container's directory")]
    BadSharePath(String),
    #[error("{0} is already set up: a pod of this id still has its share (delete it first)")]
    AlreadySetUp(PathBuf),
    #[error(transparent)]
    Id(#[from] SpecError),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShareError + 'a {
    move |err| ShareError::Io {
        what,
        path: path.to_path_buf(),
        err,
    }
}

/// A rootfs mount a container is created with (a snapshot: overlay, bind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Mount flags by OCI/fstab option name; `true` clears the flag.
fn flag_for(option: &str) -> Option<(MsFlags, bool)> {
    Some(match option {
        "ro" => (MsFlags::MS_RDONLY, false),
        "rw" => (MsFlags::MS_RDONLY, true),
        "bind" => (MsFlags::MS_BIND, false),
        "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, false),
        "nosuid" => (MsFlags::MS_NOSUID, false),
        "suid" => (MsFlags::MS_NOSUID, true),
        "nodev" => (MsFlags::MS_NODEV, false),
        "dev" => (MsFlags::MS_NODEV, true),
        "noexec" => (MsFlags::MS_NOEXEC, false),
        "exec" => (MsFlags::MS_NOEXEC, true),
        "noatime" => (MsFlags::MS_NOATIME, false),
        "relatime" => (MsFlags::MS_RELATIME, false),
        "strictatime" => (MsFlags::MS_STRICTATIME, false),
        "sync" => (MsFlags::MS_SYNCHRONOUS, false),
        "async" => (MsFlags::MS_SYNCHRONOUS, true),
        "remount" => (MsFlags::MS_REMOUNT, false),
        // Propagation is the guest's business; here every mount is private.
        "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" => {
            (MsFlags::empty(), false)
        }
        _ => return None,
    })
}

/// Splits options into mount flags and the data string.
pub(crate) fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match flag_for(option) {
            Some((flag, true)) => flags.remove(flag),
            Some((flag, false)) => flags.insert(flag),
            None => data.push(option.as_str()),
        }
    }
    (flags, data.join(","))
}

/// A pod's share: the skeleton the shim writes and the read-only view the
/// VMM exports (see the module doc).
#[derive(Clone, Debug)]
pub struct PodShare {
    skeleton: PathBuf,
    view: PathBuf,
}

impl PodShare {
    /// The share of the pod whose state directory is `pod_root`.
    pub fn new(pod_root: &Path) -> PodShare {
        PodShare {
            skeleton: pod_root.join("skeleton"),
            view: pod_root.join("shared"),
        }
    }

    /// The directory the VMM exports to the guest.
    pub fn view(&self) -> &Path {
        &self.view
    }

    /// Creates the skeleton and mounts the read-only view of it. Runs
    /// before the VM exists, so the guest never sees the view writable.
    pub fn set_up(&self) -> Result<(), ShareError> {
        fs::create_dir_all(&self.skeleton).map_err(io_err("create", &self.skeleton))?;
        fs::create_dir_all(&self.view).map_err(io_err("create", &self.view))?;
        let mountinfo = read_mountinfo()?;
        if !mounts_under(&mountinfo, &self.view).is_empty() {
            return Err(ShareError::AlreadySetUp(self.view.clone()));
        }
        let fail = |err| ShareError::Mount {
            kind: "bind".into(),
            source_path: self.skeleton.display().to_string(),
            target: self.view.clone(),
            err,
        };
        mount(
            Some(&self.skeleton),
            &self.view,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(fail)?;
        let sealed = mount(
            None::<&str>,
            &self.view,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .and_then(|()| {
            // Container mounts on the view stay out of the host's other
            // mount namespaces (private), but reach the VMM's jail, whose
            // copy of the view is a slave of this one (shared, in a peer
            // group of its own).
            mount(
                None::<&str>,
                &self.view,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )?;
            mount(
                None::<&str>,
                &self.view,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )
        });
        if let Err(err) = sealed {
            let _ = umount2(&self.view, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
            return Err(fail(err));
        }
        Ok(())
    }

    /// Mounts container `id`'s rootfs and binds in the view. On error
    /// everything already mounted is undone.
    pub fn add_container(
        &self,
        id: &str,
        rootfs: &[RootfsMount],
        bundle_rootfs: &Path,
        binds: &[SharedBind],
    ) -> Result<ContainerShare, ShareError> {
        check_identifier("container id", id)?;
        let this = ContainerShare {
            share: self.clone(),
            id: id.to_string(),
        };
        this.populate(rootfs, bundle_rootfs, binds)?;
        Ok(this)
    }

    /// Unmounts everything of container `id` and removes its directories.
    pub fn remove_container(&self, id: &str) -> Result<(), ShareError> {
        check_identifier("container id", id)?;
        // The view's directory is the skeleton's, seen read-only.
        unmount_under(&self.view.join(id))?;
        remove_tree(&self.skeleton.join(id))
    }
}

/// One container's part of a pod's share; `unmount` (or drop) removes it.
#[derive(Debug)]
pub struct ContainerShare {
    share: PodShare,
    id: String,
}

impl ContainerShare {
    fn populate(
        &self,
        rootfs: &[RootfsMount],
        bundle_rootfs: &Path,
        binds: &[SharedBind],
    ) -> Result<(), ShareError> {
        let skeleton = self.share.skeleton.join(&self.id);
        let view = self.share.view.join(&self.id);
        let mount_point = skeleton.join("rootfs");
        fs::create_dir_all(&mount_point).map_err(io_err("create", &mount_point))?;
        let target = view.join("rootfs");
        if rootfs.is_empty() {
            // `ctr run --rootfs` or a bundle whose rootfs is already there.
            attach_bind(bundle_rootfs, &target, true, BindAttrs::default())?;
        }
        for m in rootfs {
            mount_one(m, &target)?;
        }
        for b in binds {
            let relative = share_path_of(&self.id, &b.share_path)?;
            let source = Path::new(&b.source);
            // The clone fixes what is mounted: the source path is not looked
            // at again, so its type below is the type of what gets attached.
            let tree = clone_tree(source, true)?;
            let is_dir = fs::File::from(tree.try_clone().map_err(io_err("dup", source))?)
                .metadata()
                .map_err(io_err("bind source", source))?
                .is_dir();
            let mount_point = self.share.skeleton.join(&relative);
            if let Some(parent) = mount_point.parent() {
                fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            if is_dir {
                fs::create_dir_all(&mount_point).map_err(io_err("create", &mount_point))?;
            } else {
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&mount_point)
                    .map_err(io_err("create", &mount_point))?;
            }
            let attrs = BindAttrs {
                read_only: b.read_only,
                ..BindAttrs::default()
            };
            attach(tree, source, &self.share.view.join(&relative), true, attrs)?;
        }
        Ok(())
    }

    /// The container's directory in the view the guest sees.
    pub fn dir(&self) -> PathBuf {
        self.share.view.join(&self.id)
    }

    /// Unmounts everything of the container and removes its directories.
    pub fn unmount(&self) -> Result<(), ShareError> {
        self.share.remove_container(&self.id)
    }
}

impl Drop for ContainerShare {
    fn drop(&mut self) {
        // The view's directory is the skeleton's, seen read-only.
        if self.share.skeleton.join(&self.id).exists() {
            if let Err(e) = self.unmount() {
                log::warn!("cleaning container {} of the share: {e}", self.id);
            }
        }
    }
}

/// `share_path` (from the spec plan) as a relative path of plain
/// components under container `id`'s directory.
pub(crate) fn share_path_of(id: &str, share_path: &str) -> Result<PathBuf, ShareError> {
    let path = Path::new(share_path);
    let plain = path.components().all(|c| matches!(c, Component::Normal(_)));
    let mut components = path.components();
    let under_id = components.next() == Some(Component::Normal(id.as_ref()));
    if !plain || !under_id || components.next().is_none() {
        return Err(ShareError::BadSharePath(share_path.to_string()));
    }
    Ok(path.to_path_buf())
}

/// Per-mount flags a bind gets before it is attached. Every mount in the
/// view is `nodev` (see the module doc).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BindAttrs {
    read_only: bool,
    nosuid: bool,
    noexec: bool,
}

impl BindAttrs {
    fn from_flags(flags: MsFlags) -> BindAttrs {
        BindAttrs {
            read_only: flags.contains(MsFlags::MS_RDONLY),
            nosuid: flags.contains(MsFlags::MS_NOSUID),
            noexec: flags.contains(MsFlags::MS_NOEXEC),
        }
    }

    fn mount_attr_set(self) -> u64 {
        let mut set = libc::MOUNT_ATTR_NODEV;
        if self.read_only {
            set |= libc::MOUNT_ATTR_RDONLY;
        }
        if self.nosuid {
            set |= libc::MOUNT_ATTR_NOSUID;
        }
        if self.noexec {
            set |= libc::MOUNT_ATTR_NOEXEC;
        }
        set
    }
}

/// A detached copy of the mount tree at `source` (`recursive`: with the
/// mounts below it).
fn clone_tree(source: &Path, recursive: bool) -> Result<OwnedFd, ShareError> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    open_tree(rustix::fs::CWD, source, flags).map_err(|err| ShareError::Mount {
        kind: "bind".into(),
        source_path: source.display().to_string(),
        target: PathBuf::new(),
        err: nix::Error::from_raw(err.raw_os_error()),
    })
}

/// Binds `source` on `target` in one step that the guest cannot observe
/// half done (see [`attach`]).
fn attach_bind(
    source: &Path,
    target: &Path,
    recursive: bool,
    attrs: BindAttrs,
) -> Result<(), ShareError> {
    let tree = clone_tree(source, recursive)?;
    attach(tree, source, target, recursive, attrs)
}

/// Gives the detached `tree` its flags, then attaches it on `target`.
fn attach(
    tree: OwnedFd,
    source: &Path,
    target: &Path,
    recursive: bool,
    attrs: BindAttrs,
) -> Result<(), ShareError> {
    let fail = |err: nix::Error| ShareError::Mount {
        kind: "bind".into(),
        source_path: source.display().to_string(),
        target: target.to_path_buf(),
        err,
    };
    let attr = libc::mount_attr {
        attr_set: attrs.mount_attr_set(),
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let mut at_flags = libc::AT_EMPTY_PATH;
    if recursive {
        at_flags |= libc::AT_RECURSIVE;
    }
    // SAFETY: mount_setattr(2) reads `size_of::<mount_attr>()` bytes from
    // `attr`, which lives across the call; the path is a static empty C
    // string and `tree` an open descriptor we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            at_flags as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(fail(nix::Error::last()));
    }
    move_mount(
        &tree,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|err| fail(nix::Error::from_raw(err.raw_os_error())))
}

/// Mounts one of containerd's rootfs mounts on `target`, with all its
/// flags in the one call that attaches it (binds through [`attach_bind`]).
fn mount_one(m: &RootfsMount, target: &Path) -> Result<(), ShareError> {
    let (flags, data) = parse_options(&m.options);
    if flags.contains(MsFlags::MS_BIND) {
        let recursive = flags.contains(MsFlags::MS_REC);
        return attach_bind(
            Path::new(&m.source),
            target,
            recursive,
            BindAttrs::from_flags(flags),
        );
    }
    if data.len() >= 4096 {
        return Err(ShareError::OptionsTooLong {
            target: target.to_path_buf(),
            len: data.len(),
        });
    }
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(
        Some(m.source.as_str()),
        target,
        Some(m.kind.as_str()),
        (flags | MsFlags::MS_NODEV) - MsFlags::MS_REMOUNT,
        data,
    )
    .map_err(|err| ShareError::Mount {
        kind: m.kind.clone(),
        source_path: m.source.clone(),
        target: target.to_path_buf(),
        err,
    })
}

fn read_mountinfo() -> Result<String, ShareError> {
    fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))
}

/// Mount points at or below `dir`, deepest (latest) first, from
/// `/proc/self/mountinfo`.
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.reverse();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(octal, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts every mount at or below `dir` (lazily if busy), then removes
/// the directory tree. Never follows into a mount it failed to unmount.
pub fn remove_tree(dir: &Path) -> Result<(), ShareError> {
    unmount_under(dir)?;
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ShareError::Io {
            what: "remove",
            path: dir.to_path_buf(),
            err: e,
        }),
    }
}

/// Unmounts every mount at or below `dir` (lazily if busy), and checks
/// that none is left.
fn unmount_under(dir: &Path) -> Result<(), ShareError> {
    let mountinfo = read_mountinfo()?;
    for point in mounts_under(&mountinfo, dir) {
        if let Err(e) = umount2(&point, MntFlags::UMOUNT_NOFOLLOW) {
            log::debug!("umount {}: {e}; detaching", point.display());
            if let Err(err) = umount2(&point, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                if err != nix::Error::EINVAL && err != nix::Error::ENOENT {
                    return Err(ShareError::Mount {
                        kind: "umount".into(),
                        source_path: String::new(),
                        target: point,
                        err,
                    });
                }
            }
        }
    }
    // Anything still mounted here now would make remove_dir_all reach into
    // host data: check again before deleting.
    let mountinfo = read_mountinfo()?;
    if let Some(point) = mounts_under(&mountinfo, dir).into_iter().next() {
        return Err(ShareError::Mount {
            kind: "umount".into(),
            source_path: String::new(),
            target: point,
            err: nix::Error::EBUSY,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "nosuid", "lowerdir=/a:/b", "upperdir=/u", "rw"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_NOSUID, "rw after ro clears it");
        assert_eq!(data, "lowerdir=/a:/b,upperdir=/u");
        let (flags, data) = parse_options(&["rbind".to_string(), "ro".to_string()]);
        assert_eq!(
            flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
        assert!(data.is_empty());
    }

    #[test]
    fn mountinfo_finds_nested_mounts_deepest_first() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/root rw
40 22 0:40 / /run/arrow/k8s/pod/shared/c1/rootfs rw - overlay overlay rw
41 40 8:1 /x /run/arrow/k8s/pod/shared/c1/mounts/0 ro - ext4 /dev/root rw
42 22 8:1 /y /run/arrow/k8s/pod/shared/c10/rootfs rw - ext4 /dev/root rw
43 22 8:1 /z /run/arrow/k8s/pod/shared/c1/mounts/with\\040space rw - ext4 /dev/root rw
";
        let found = mounts_under(info, Path::new("/run/arrow/k8s/pod/shared/c1"));
        assert_eq!(
            found,
            vec![
                PathBuf::from("/run/arrow/k8s/pod/shared/c1/mounts/with space"),
                PathBuf::from("/run/arrow/k8s/pod/shared/c1/mounts/0"),
                PathBuf::from("/run/arrow/k8s/pod/shared/c1/rootfs"),
            ]
        );
    }

    #[test]
    fn unescape_keeps_plain_backslashes() {
        assert_eq!(unescape_mountinfo("a\\040b"), "a b");
        assert_eq!(unescape_mountinfo("a\\b"), "a\\b");
        assert_eq!(unescape_mountinfo("end\\"), "end\\");
    }

    #[test]
    fn remove_tree_removes_plain_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("c1/mounts/0");
        fs::create_dir_all(&dir).unwrap();
        remove_tree(&tmp.path().join("c1")).unwrap();
        assert!(!tmp.path().join("c1").exists());
        // Idempotent.
        remove_tree(&tmp.path().join("c1")).unwrap();
    }

    #[test]
    fn share_paths_stay_under_their_container() {
        assert_eq!(
            share_path_of("c1", "c1/mounts/0").unwrap(),
            PathBuf::from("c1/mounts/0")
        );
        for bad in ["c2/mounts/0", "c1", "c1/../c2/mounts/0", "/c1/mounts/0", ""] {
            assert!(share_path_of("c1", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bind_attrs_always_nodev() {
        assert_eq!(
            BindAttrs::default().mount_attr_set(),
            libc::MOUNT_ATTR_NODEV
        );
        let ro = BindAttrs::from_flags(MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(
            ro.mount_attr_set(),
            libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID
        );
    }

    fn mounts_in(dir: &Path) -> Vec<PathBuf> {
        mounts_under(&read_mountinfo().unwrap(), dir)
    }

    #[test]
    fn share_binds_files_and_dirs_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let pod = PodShare::new(&tmp.path().join("pod"));
        pod.set_up().unwrap();
        assert!(
            matches!(pod.set_up(), Err(ShareError::AlreadySetUp(_))),
            "a second set-up is refused"
        );
        let view = pod.view().to_path_buf();
        let rootfs = tmp.path().join("bundle-rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        let volume = tmp.path().join("vol");
        fs::create_dir_all(&volume).unwrap();
        fs::write(volume.join("f"), "data").unwrap();
        let hosts = tmp.path().join("hosts");
        fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let binds = vec![
            SharedBind {
                source: volume.display().to_string(),
                share_path: "c1/mounts/0".into(),
                read_only: false,
            },
            SharedBind {
                source: hosts.display().to_string(),
                share_path: "c1/mounts/1".into(),
                read_only: true,
            },
        ];
        let c = pod.add_container("c1", &[], &rootfs, &binds).unwrap();
        assert_eq!(c.dir(), view.join("c1"));
        assert!(view.join("c1/rootfs/bin").is_dir());
        assert_eq!(
            fs::read_to_string(view.join("c1/mounts/0/f")).unwrap(),
            "data"
        );
        fs::write(view.join("c1/mounts/0/g"), "guest").unwrap();
        assert!(
            fs::write(view.join("c1/mounts/1"), "x").is_err(),
            "read-only bind"
        );
        // The guest's view of the skeleton is read-only: nothing can be
        // planted where the shim works.
        let erofs = |r: io::Result<()>| {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
        };
        erofs(std::os::unix::fs::symlink("/etc", view.join("c2")));
        erofs(std::os::unix::fs::symlink("/etc", view.join("c1/evil")));
        erofs(fs::remove_dir(view.join("c1/mounts")));
        erofs(fs::rename(view.join("c1"), view.join("c1-moved")));
        erofs(fs::write(view.join("filler"), "x"));
        erofs(fs::create_dir(view.join("c1/mounts/2")));

        c.unmount().unwrap();
        assert!(!view.join("c1").exists());
        assert!(!tmp.path().join("pod/skeleton/c1").exists());
        assert_eq!(fs::read_to_string(volume.join("f")).unwrap(), "data");
        assert_eq!(fs::read_to_string(volume.join("g")).unwrap(), "guest");
        assert!(
            pod.add_container("../c1", &[], &rootfs, &[]).is_err(),
            "ids are plain identifiers"
        );
        remove_tree(&tmp.path().join("pod")).unwrap();
        assert!(mounts_in(tmp.path()).is_empty());
    }

    #[test]
    fn share_drops_what_it_mounted_on_error_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let pod = PodShare::new(&tmp.path().join("pod"));
        pod.set_up().unwrap();
        let rootfs = tmp.path().join("bundle-rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        let binds = vec![SharedBind {
            source: tmp.path().join("missing").display().to_string(),
            share_path: "c1/mounts/0".into(),
            read_only: false,
        }];
        assert!(pod.add_container("c1", &[], &rootfs, &binds).is_err());
        assert_eq!(mounts_in(tmp.path()), vec![pod.view().to_path_buf()]);
        assert!(!pod.view().join("c1").exists());
        remove_tree(&tmp.path().join("pod")).unwrap();
    }
}
