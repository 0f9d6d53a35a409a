//! The host side of a pod's virtio-fs share: one directory per pod that
//! `arrow-vmm` exports to the guest, under which the shim mounts each
//! container's rootfs and bind-mounts its volumes. The guest sees every one
//! of these mounts through the one device, so containers can come and go
//! without touching the VM's devices.
//!
//! Layout: `<share>/<container>/rootfs` and `<share>/<container>/mounts/<n>`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::spec::SharedBind;

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
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ShareError + 'a {
    move |err| ShareError::Io {
        what,
        path: path.to_path_buf(),
        err,
    }
}

/// A rootfs mount containerd passes with `Create` (a snapshot).
#[derive(Clone, Debug)]
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
fn parse_options(options: &[String]) -> (MsFlags, String) {
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

/// One container's part of the share; `unmount` (or drop) removes it.
#[derive(Debug)]
pub struct ContainerShare {
    dir: PathBuf,
}

impl ContainerShare {
    /// Mounts container `id`'s rootfs and binds under `share/<id>`. On error
    /// everything already mounted is undone.
    pub fn create(
        share: &Path,
        id: &str,
        rootfs: &[RootfsMount],
        bundle_rootfs: &Path,
        binds: &[SharedBind],
    ) -> Result<ContainerShare, ShareError> {
        let dir = share.join(id);
        let this = ContainerShare { dir };
        this.populate(share, rootfs, bundle_rootfs, binds)?;
        Ok(this)
    }

    fn populate(
        &self,
        share: &Path,
        rootfs: &[RootfsMount],
        bundle_rootfs: &Path,
        binds: &[SharedBind],
    ) -> Result<(), ShareError> {
        let target = self.dir.join("rootfs");
        fs::create_dir_all(&target).map_err(io_err("create", &target))?;
        if rootfs.is_empty() {
            // `ctr run --rootfs` or a bundle whose rootfs is already there.
            bind(bundle_rootfs, &target, false)?;
        }
        for m in rootfs {
            mount_one(m, &target)?;
        }
        for b in binds {
            let target = share.join(&b.share_path);
            let source = Path::new(&b.source);
            let is_dir = fs::metadata(source)
                .map_err(io_err("bind source", source))?
                .is_dir();
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            }
            if is_dir {
                fs::create_dir_all(&target).map_err(io_err("create", &target))?;
            } else {
                fs::File::create(&target).map_err(io_err("create", &target))?;
            }
            bind(source, &target, b.read_only)?;
        }
        Ok(())
    }

    /// The container's directory in the share.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unmounts everything under the container's directory and removes it.
    pub fn unmount(&self) -> Result<(), ShareError> {
        remove_tree(&self.dir)
    }
}

impl Drop for ContainerShare {
    fn drop(&mut self) {
        if self.dir.exists() {
            if let Err(e) = remove_tree(&self.dir) {
                log::warn!("cleaning {}: {e}", self.dir.display());
            }
        }
    }
}

fn mount_one(m: &RootfsMount, target: &Path) -> Result<(), ShareError> {
    let (flags, data) = parse_options(&m.options);
    if data.len() >= 4096 {
        return Err(ShareError::OptionsTooLong {
            target: target.to_path_buf(),
            len: data.len(),
        });
    }
    let kind = if flags.contains(MsFlags::MS_BIND) {
        None
    } else {
        Some(m.kind.as_str())
    };
    let data = (!data.is_empty()).then_some(data.as_str());
    let fail = |err| ShareError::Mount {
        kind: m.kind.clone(),
        source_path: m.source.clone(),
        target: target.to_path_buf(),
        err,
    };
    mount(
        Some(m.source.as_str()),
        target,
        kind,
        flags - MsFlags::MS_RDONLY,
        data,
    )
    .map_err(fail)?;
    if flags.contains(MsFlags::MS_RDONLY) {
        let ro = flags | MsFlags::MS_REMOUNT;
        let ro = if flags.contains(MsFlags::MS_BIND) {
            ro
        } else {
            ro - MsFlags::MS_BIND
        };
        mount(None::<&str>, target, None::<&str>, ro, data).map_err(fail)?;
    }
    Ok(())
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), ShareError> {
    let fail = |err| ShareError::Mount {
        kind: "bind".into(),
        source_path: source.display().to_string(),
        target: target.to_path_buf(),
        err,
    };
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(fail)?;
    if read_only {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(fail)?;
    }
    Ok(())
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
fn unescape_mountinfo(field: &str) -> String {
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
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
    for point in mounts_under(&mountinfo, dir) {
        if let Err(e) = umount2(&point, MntFlags::empty()) {
            log::debug!("umount {}: {e}; detaching", point.display());
            if let Err(err) = umount2(&point, MntFlags::MNT_DETACH) {
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
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
    if let Some(point) = mounts_under(&mountinfo, dir).into_iter().next() {
        return Err(ShareError::Mount {
            kind: "umount".into(),
            source_path: String::new(),
            target: point,
            err: nix::Error::EBUSY,
        });
    }
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
    fn share_binds_files_and_dirs_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to mount");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let share = tmp.path().join("share");
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
        let c = ContainerShare::create(&share, "c1", &[], &rootfs, &binds).unwrap();
        assert!(share.join("c1/rootfs/bin").is_dir());
        assert_eq!(
            fs::read_to_string(share.join("c1/mounts/0/f")).unwrap(),
            "data"
        );
        assert!(
            fs::write(share.join("c1/mounts/1"), "x").is_err(),
            "read-only bind"
        );
        c.unmount().unwrap();
        assert!(!share.join("c1").exists());
        assert_eq!(fs::read_to_string(volume.join("f")).unwrap(), "data");
    }
}
