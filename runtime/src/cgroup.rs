//! The pod's cgroup on the host, which `arrow-vmm serve` joins.
//!
//! The VMM holds the guest's RAM and runs its vCPU threads, so it belongs
//! in the pod's cgroup: the pod's limits then apply to the VM, and
//! kubelet's accounting and eviction see what the pod really costs. The
//! cgroup is the sandbox's `linux.cgroupsPath`, in both forms containerd
//! passes (cgroupfs paths and the systemd driver's `slice:prefix:name`),
//! joined in every mounted hierarchy (cgroup v2, or v1/hybrid).
//!
//! The VMM joins between fork and exec (see [`PodCgroup::spawn`]), so it
//! never allocates guest memory nor runs the guest anywhere else.
//!
//! **Overhead**: being charged to the pod, the VM must fit the pod's
//! limits, so a RuntimeClass's `overhead.podFixed.memory` has to declare
//! what the VMM holds beyond the containers' limits: the guest RAM the VM
//! touches above them (the VM gets the pod's limit + 64 MiB, rounded up to
//! 128 MiB, and the guest may touch all of it: 64 to 191 MiB above the
//! limit) plus the VMM's own RSS (a few MiB). A clone's guest RAM is the
//! template's file mapped private: only the pages it writes are its own;
//! the template's page cache is charged to whichever cgroup first read it.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

/// How long removing a cgroup waits for a killed VMM to finish exiting
/// (a cgroup with a process in it cannot be removed).
const REMOVE_GRACE: Duration = Duration::from_secs(2);

/// Errors finding, creating, joining or removing the pod's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroupsPath {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("reading {path}: {err}")]
    Read { path: PathBuf, err: io::Error },
    #[error("no cgroup hierarchy is mounted (no cgroup or cgroup2 mount in /proc/self/mountinfo)")]
    NoHierarchy,
    #[error("the shim's own cgroup in the {hierarchy} hierarchy is not in /proc/self/cgroup")]
    OwnCgroup { hierarchy: String },
    #[error("creating cgroup {dir} ({hierarchy} hierarchy): {err}")]
    Create {
        dir: PathBuf,
        hierarchy: String,
        err: io::Error,
    },
    #[error("giving the new cpuset cgroup {dir} its parent's CPUs and memory nodes: {err}")]
    Cpuset { dir: PathBuf, err: io::Error },
    #[error("opening {path} ({hierarchy} hierarchy): {err}")]
    Open {
        path: PathBuf,
        hierarchy: String,
        err: io::Error,
    },
    #[error("recording the created cgroups in {path}: {err}")]
    Record { path: PathBuf, err: io::Error },
    #[error("joining cgroup {dir} ({hierarchy} hierarchy): {err}")]
    Join {
        dir: PathBuf,
        hierarchy: String,
        err: io::Error,
    },
    #[error("preparing the spawn: {0}")]
    Pipe(io::Error),
    /// The process failed to start for a reason other than the join.
    #[error("{0}")]
    Spawn(io::Error),
    #[error("removing cgroup {dir}: {err}")]
    Remove { dir: PathBuf, err: io::Error },
}

/// A `linux.cgroupsPath`, resolved to a path inside each hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupPath {
    /// From each hierarchy's root (cgroupfs `/a/b`, and every systemd path).
    Absolute(PathBuf),
    /// From the shim's own cgroup in each hierarchy (cgroupfs `a/b`, as
    /// runc's cgroupfs driver reads it).
    Relative(PathBuf),
}

impl CgroupPath {
    /// Parses either form: `slice:prefix:name` (the systemd driver's; a
    /// cgroupfs path has no `:`) or a cgroupfs path. `.`/`..` components,
    /// control characters and the root cgroup itself are refused: the path
    /// comes from the container's spec.
    pub fn parse(text: &str) -> Result<CgroupPath, CgroupError> {
        let bad = |why| CgroupError::BadPath {
            path: text.to_string(),
            why,
        };
        if text.chars().any(|c| c.is_control()) {
            return Err(bad("control characters"));
        }
        if text.contains(':') {
            return systemd_path(text).map_err(bad);
        }
        let mut path = PathBuf::new();
        for part in text.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." {
                return Err(bad("`.` and `..` components are refused"));
            }
            path.push(part);
        }
        if path.as_os_str().is_empty() {
            return Err(bad("names no cgroup below the root"));
        }
        if text.starts_with('/') {
            Ok(CgroupPath::Absolute(path))
        } else {
            Ok(CgroupPath::Relative(path))
        }
    }
}

/// `slice:prefix:name` → `<expanded slice>/<prefix>-<name>.scope` (or the
/// slice `name` itself if it is one), as runc's systemd driver names it.
fn systemd_path(text: &str) -> Result<CgroupPath, &'static str> {
    let parts: Vec<&str> = text.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err("a systemd cgroupsPath is slice:prefix:name");
    };
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let unit_part_ok = |s: &str| !s.contains('/') && s != "." && s != "..";
    if name.is_empty() || !unit_part_ok(name) || !unit_part_ok(prefix) {
        return Err("bad unit name");
    }
    let unit = if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    let mut path = expand_slice(slice)?;
    path.push(unit);
    Ok(CgroupPath::Absolute(path))
}

/// `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice`: each `-` separated
/// prefix of a slice's name is a parent slice (`-.slice` is the root).
fn expand_slice(slice: &str) -> Result<PathBuf, &'static str> {
    let Some(base) = slice.strip_suffix(".slice") else {
        return Err("the slice's name must end in .slice");
    };
    if base.is_empty() || slice.contains('/') {
        return Err("bad slice name");
    }
    let mut path = PathBuf::new();
    if base == "-" {
        return Ok(path);
    }
    let mut prefix = String::new();
    for part in base.split('-') {
        if part.is_empty() {
            return Err("bad slice name (empty component)");
        }
        path.push(format!("{prefix}{part}.slice"));
        prefix.push_str(part);
        prefix.push('-');
    }
    Ok(path)
}

/// A mounted cgroup hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    /// The cgroup the mount shows at its mount point (`/` unless only part
    /// of the hierarchy is mounted).
    pub root: PathBuf,
    /// v1: the controllers (`cpu`, `cpuacct`...); empty for v2 and named
    /// hierarchies.
    pub controllers: Vec<String>,
    /// v1 `name=` hierarchies (`systemd`).
    pub name: Option<String>,
    pub v2: bool,
}

impl Hierarchy {
    /// How it appears in `/proc/self/cgroup`'s second field and in errors.
    pub fn label(&self) -> String {
        match (&self.name, self.v2) {
            (_, true) => "cgroup2".into(),
            (Some(name), false) => format!("name={name}"),
            (None, false) => self.controllers.join(","),
        }
    }

    /// A named v1 hierarchy holds no controller, so no limit: failing to
    /// join it only loses bookkeeping (it is skipped, with a log line).
    fn optional(&self) -> bool {
        !self.v2 && self.controllers.is_empty()
    }

    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// Superblock options of a v1 mount that are not controllers.
const V1_OPTIONS: &[&str] = &[
    "rw",
    "ro",
    "none",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "favordynmods",
];

/// The cgroup hierarchies in a `/proc/self/mountinfo`, each once (a
/// hierarchy mounted twice has one device number).
pub fn parse_hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(dev), Some(root), Some(mount_point), Some(fstype), Some(options)) = (
            left.get(2),
            left.get(3),
            left.get(4),
            right.first(),
            right.get(2),
        ) else {
            continue;
        };
        let v2 = match *fstype {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        if !seen.insert(dev.to_string()) {
            continue;
        }
        let mut controllers = Vec::new();
        let mut name = None;
        if !v2 {
            for opt in options.split(',') {
                if let Some(n) = opt.strip_prefix("name=") {
                    name = Some(n.to_string());
                } else if !opt.contains('=') && !V1_OPTIONS.contains(&opt) {
                    controllers.push(opt.to_string());
                }
            }
        }
        found.push(Hierarchy {
            mount_point: PathBuf::from(unescape(mount_point)),
            root: PathBuf::from(unescape(root)),
            controllers,
            name,
            v2,
        });
    }
    found
}

/// mountinfo escapes space, tab, newline and `\` as `\ooo`.
fn unescape(field: &str) -> std::ffi::OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(v as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    OsStr::from_bytes(&out).to_os_string()
}

/// The shim's own cgroup in `h`, from `/proc/self/cgroup`'s text.
fn own_cgroup(proc_self_cgroup: &str, h: &Hierarchy) -> Option<PathBuf> {
    for line in proc_self_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(list), Some(path)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let matches = if h.v2 {
            id == "0" && list.is_empty()
        } else if let Some(name) = &h.name {
            list.split(',')
                .any(|c| c.strip_prefix("name=") == Some(name))
        } else {
            let mut a: Vec<&str> = list.split(',').collect();
            let mut b: Vec<&str> = h.controllers.iter().map(String::as_str).collect();
            a.sort_unstable();
            b.sort_unstable();
            !list.is_empty() && a == b
        };
        if matches {
            return Some(PathBuf::from(path));
        }
    }
    None
}

/// `path` (from the hierarchy's root) under `h`'s mount point.
fn in_mount(h: &Hierarchy, path: &Path) -> PathBuf {
    let below = path.strip_prefix(&h.root).unwrap_or(path);
    let rel: PathBuf = below
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    h.mount_point.join(rel)
}

/// The pod's cgroup directory in each hierarchy the VMM joins.
pub fn cgroup_dirs(
    hierarchies: &[Hierarchy],
    path: &CgroupPath,
    proc_self_cgroup: &str,
) -> Result<Vec<(Hierarchy, PathBuf)>, CgroupError> {
    let mut dirs = Vec::new();
    for h in hierarchies {
        let dir = match path {
            CgroupPath::Absolute(p) => h.mount_point.join(p),
            CgroupPath::Relative(p) => {
                let own =
                    own_cgroup(proc_self_cgroup, h).ok_or_else(|| CgroupError::OwnCgroup {
                        hierarchy: h.label(),
                    })?;
                in_mount(h, &own).join(p)
            }
        };
        dirs.push((h.clone(), dir));
    }
    Ok(dirs)
}

/// One hierarchy's cgroup, ready to be joined.
#[derive(Debug)]
struct Join {
    hierarchy: String,
    dir: PathBuf,
    /// Its `cgroup.procs`, open for writing and close-on-exec.
    procs: File,
}

/// The pod's cgroup in every hierarchy, created and opened, for
/// [`PodCgroup::spawn`].
#[derive(Debug)]
pub struct PodCgroup {
    joins: Vec<Join>,
}

impl PodCgroup {
    /// Finds the hierarchies, creates the pod's cgroup in each (`mkdir -p`)
    /// and opens their `cgroup.procs`. Every directory it creates is
    /// appended to `record` at once, for [`remove_recorded`]; on failure
    /// it removes them itself.
    pub fn prepare(path: &CgroupPath, record: &Path) -> Result<PodCgroup, CgroupError> {
        let mountinfo = read("/proc/self/mountinfo")?;
        let hierarchies = parse_hierarchies(&mountinfo);
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        let own = match path {
            CgroupPath::Relative(_) => read("/proc/self/cgroup")?,
            CgroupPath::Absolute(_) => String::new(),
        };
        let dirs = cgroup_dirs(&hierarchies, path, &own)?;
        let mut created = Vec::new();
        let prepared = prepare_dirs(&dirs, record, &mut created);
        if prepared.is_err() {
            for dir in created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        prepared.map(|joins| PodCgroup { joins })
    }

    /// The directories the VMM joins, one per hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.joins.iter().map(|j| j.dir.as_path())
    }

    /// Spawns `cmd` in the pod's cgroup: the child writes `0` (itself) to
    /// each `cgroup.procs` before exec, so the program never runs anywhere
    /// else. A join that fails fails the spawn, as [`CgroupError::Join`].
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child, CgroupError> {
        // The closure owns copies of the descriptors (close-on-exec, like
        // the originals), so it stays sound whatever outlives what.
        let mut fds = Vec::with_capacity(self.joins.len());
        for j in &self.joins {
            let fd: OwnedFd = j.procs.try_clone().map_err(CgroupError::Pipe)?.into();
            fds.push(fd);
        }
        // The child reports which join failed here (std only passes the
        // errno back); non-blocking: it has written before spawn returns.
        let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| CgroupError::Pipe(e.into()))?;
        // SAFETY: the closure runs in the forked child before exec, where
        // only async-signal-safe calls are allowed: it calls libc::write on
        // descriptors it owns and reads errno; it allocates nothing (the
        // io::Error of an errno is not boxed).
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        let err = io::Error::last_os_error();
                        let index = (i as u32).to_ne_bytes();
                        libc::write(report_w.as_raw_fd(), index.as_ptr().cast(), 4);
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
        let err = match cmd.spawn() {
            Ok(child) => {
                let dirs: Vec<String> = self.dirs().map(|d| d.display().to_string()).collect();
                log::info!("pid {} runs in cgroup {}", child.id(), dirs.join(", "));
                return Ok(child);
            }
            Err(err) => err,
        };
        let mut index = [0u8; 4];
        let failed = File::from(report_r)
            .read_exact(&mut index)
            .ok()
            .and_then(|()| self.joins.get(u32::from_ne_bytes(index) as usize));
        Err(match failed {
            Some(j) => CgroupError::Join {
                dir: j.dir.clone(),
                hierarchy: j.hierarchy.clone(),
                err,
            },
            None => CgroupError::Spawn(err),
        })
    }
}

fn read(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|err| CgroupError::Read {
        path: PathBuf::from(path),
        err,
    })
}

/// Can't-write errors, which skip an optional (named) hierarchy.
fn is_denied(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::EROFS)
    )
}

fn prepare_dirs(
    dirs: &[(Hierarchy, PathBuf)],
    record: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<Vec<Join>, CgroupError> {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(record)
        .map_err(|err| CgroupError::Record {
            path: record.to_path_buf(),
            err,
        })?;
    let mut joins = Vec::new();
    for (h, dir) in dirs {
        let label = h.label();
        let before = created.len();
        let made = create_dirs(&h.mount_point, dir, &label, created, &mut log, record);
        if h.has("cpuset") {
            if let Ok(()) = made {
                for new in &created[before..] {
                    inherit_cpuset(new)?;
                }
            }
        }
        let opened = made.and_then(|()| {
            let path = dir.join("cgroup.procs");
            OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|err| CgroupError::Open {
                    path,
                    hierarchy: label.clone(),
                    err,
                })
        });
        match opened {
            Ok(procs) => joins.push(Join {
                hierarchy: label,
                dir: dir.clone(),
                procs,
            }),
            Err(CgroupError::Create { err, .. } | CgroupError::Open { err, .. })
                if h.optional() && is_denied(&err) =>
            {
                log::warn!(
                    "not joining {} in the {label} hierarchy (it holds no controller): {err}",
                    dir.display()
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(joins)
}

/// `mkdir -p dir` below `mount_point`, recording each directory it makes.
fn create_dirs(
    mount_point: &Path,
    dir: &Path,
    hierarchy: &str,
    created: &mut Vec<PathBuf>,
    log: &mut File,
    record: &Path,
) -> Result<(), CgroupError> {
    let rel = dir.strip_prefix(mount_point).unwrap_or(dir);
    let mut at = mount_point.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match fs::create_dir(&at) {
            Ok(()) => {
                created.push(at.clone());
                let mut line = at.as_os_str().as_bytes().to_vec();
                line.push(b'\n');
                log.write_all(&line).map_err(|err| CgroupError::Record {
                    path: record.to_path_buf(),
                    err,
                })?;
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(CgroupError::Create {
                    dir: at,
                    hierarchy: hierarchy.to_string(),
                    err,
                })
            }
        }
    }
    Ok(())
}

/// A new v1 cpuset cgroup has no CPUs nor memory nodes, and joining it
/// fails (ENOSPC) until it gets some: give it its parent's, as runc does.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let fail = |err| CgroupError::Cpuset {
            dir: dir.to_path_buf(),
            err,
        };
        let own = fs::read_to_string(dir.join(file)).map_err(fail)?;
        if !own.trim().is_empty() {
            continue;
        }
        let value = fs::read_to_string(parent.join(file)).map_err(fail)?;
        fs::write(dir.join(file), value.trim()).map_err(fail)?;
    }
    Ok(())
}

/// Removes the cgroups listed in `record` (by [`PodCgroup::prepare`]),
/// deepest first, only the empty ones: a parent that has someone else's
/// cgroup in it stays. A cgroup whose process is still exiting (a VMM just
/// killed) is retried for a short while. A missing record is nothing to do.
pub fn remove_recorded(record: &Path) -> Result<(), CgroupError> {
    let text = match fs::read(record) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => {
            return Err(CgroupError::Read {
                path: record.to_path_buf(),
                err,
            })
        }
    };
    let deadline = Instant::now() + REMOVE_GRACE;
    let mut first_error = None;
    for line in text.split(|b| *b == b'\n').rev() {
        if line.is_empty() {
            continue;
        }
        let dir = Path::new(OsStr::from_bytes(line));
        if let Err(e) = remove_cgroup(dir, deadline) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn remove_cgroup(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    loop {
        let err = match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        match err.raw_os_error() {
            Some(libc::ENOENT) => return Ok(()),
            // Not empty: someone else's cgroup (or file) is in it.
            Some(libc::ENOTEMPTY) => return Ok(()),
            Some(libc::EBUSY) if has_subdir(dir) => return Ok(()),
            Some(libc::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                return Err(CgroupError::Remove {
                    dir: dir.to_path_buf(),
                    err,
                })
            }
        }
    }
}

fn has_subdir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_type().is_ok_and(|t| t.is_dir()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abs(p: &str) -> CgroupPath {
        CgroupPath::Absolute(PathBuf::from(p))
    }

    #[test]
    fn cgroupfs_paths() {
        assert_eq!(
            CgroupPath::parse("/kubepods/besteffort/pod1234/abcd").unwrap(),
            abs("kubepods/besteffort/pod1234/abcd")
        );
        assert_eq!(
            CgroupPath::parse("//default///ctr1/").unwrap(),
            abs("default/ctr1")
        );
        assert_eq!(
            CgroupPath::parse("pods/ctr1").unwrap(),
            CgroupPath::Relative(PathBuf::from("pods/ctr1"))
        );
    }

    #[test]
    fn systemd_paths_expand_like_runc() {
        assert_eq!(
            CgroupPath::parse("kubepods-besteffort-pod12_34.slice:cri-containerd:abcd").unwrap(),
            abs("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_34.slice/cri-containerd-abcd.scope")
        );
        assert_eq!(
            CgroupPath::parse("kubepods.slice:cri-containerd:x").unwrap(),
            abs("kubepods.slice/cri-containerd-x.scope")
        );
        assert_eq!(
            CgroupPath::parse(":arrow:x").unwrap(),
            abs("system.slice/arrow-x.scope")
        );
        assert_eq!(CgroupPath::parse("-.slice::x").unwrap(), abs("x.scope"));
        assert_eq!(
            CgroupPath::parse("machine.slice:p:pod-x.slice").unwrap(),
            abs("machine.slice/pod-x.slice")
        );
    }

    #[test]
    fn bad_paths_are_refused() {
        for bad in [
            "",
            "/",
            "///",
            "/kubepods/../etc",
            "..",
            "a/./b",
            "/a\nb",
            "a:b",
            "a.slice:b:c:d",
            "a.slice:p:",
            "a.slice:p:..",
            "a.slice:p:x/y",
            "a.slice:../p:x",
            "notaslice:p:x",
            "a--b.slice:p:x",
            "-a.slice:p:x",
            "a/b.slice:p:x",
            ".slice:p:x",
        ] {
            let err = CgroupPath::parse(bad).unwrap_err();
            assert!(matches!(err, CgroupError::BadPath { .. }), "{bad:?}: {err}");
        }
    }

    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset,clone_children
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,release_agent=/lib/systemd/systemd-cgroups-agent,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
90 22 0:32 /docker /mnt/again\\040mem rw,relatime - cgroup cgroup rw,memory
";

    const UNIFIED: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hierarchies_of_a_hybrid_host() {
        let h = parse_hierarchies(HYBRID);
        let labels: Vec<String> = h.iter().map(Hierarchy::label).collect();
        assert_eq!(
            labels,
            ["cpu,cpuacct", "cpuset", "memory", "name=systemd", "cgroup2"]
        );
        assert_eq!(h[0].mount_point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert!(h[1].has("cpuset") && !h[1].optional());
        assert!(h[3].optional());
        assert_eq!(h[3].name.as_deref(), Some("systemd"));
        assert!(h[4].v2 && !h[4].optional());
        assert_eq!(h[4].mount_point, Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn hierarchies_of_a_unified_host() {
        let h = parse_hierarchies(UNIFIED);
        assert_eq!(h.len(), 1);
        assert!(h[0].v2);
        assert_eq!(h[0].mount_point, Path::new("/sys/fs/cgroup"));
        assert_eq!(h[0].root, Path::new("/"));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/mnt/a\\040b\\134c"), OsStr::new("/mnt/a b\\c"));
        assert_eq!(unescape("/x\\04"), OsStr::new("/x\\04"));
    }

    #[test]
    fn dirs_in_each_hierarchy() {
        let h = parse_hierarchies(HYBRID);
        let own = "\
9:name=systemd:/system.slice/containerd.service
4:memory:/system.slice/containerd.service
3:cpuset:/
2:cpuacct,cpu:/system.slice
0::/system.slice/containerd.service
";
        let dirs = cgroup_dirs(&h, &abs("kubepods/pod1/abc"), own).unwrap();
        let got: Vec<&Path> = dirs.iter().map(|(_, d)| d.as_path()).collect();
        assert_eq!(
            got,
            [
                "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/abc",
                "/sys/fs/cgroup/cpuset/kubepods/pod1/abc",
                "/sys/fs/cgroup/memory/kubepods/pod1/abc",
                "/sys/fs/cgroup/systemd/kubepods/pod1/abc",
                "/sys/fs/cgroup/unified/kubepods/pod1/abc",
            ]
            .map(Path::new)
        );
        let rel = CgroupPath::Relative(PathBuf::from("vm"));
        let dirs = cgroup_dirs(&h, &rel, own).unwrap();
        let got: Vec<&Path> = dirs.iter().map(|(_, d)| d.as_path()).collect();
        assert_eq!(
            got,
            [
                "/sys/fs/cgroup/cpu,cpuacct/system.slice/vm",
                "/sys/fs/cgroup/cpuset/vm",
                "/sys/fs/cgroup/memory/system.slice/containerd.service/vm",
                "/sys/fs/cgroup/systemd/system.slice/containerd.service/vm",
                "/sys/fs/cgroup/unified/system.slice/containerd.service/vm",
            ]
            .map(Path::new)
        );
        let err = cgroup_dirs(&h, &rel, "0::/\n").unwrap_err();
        assert!(matches!(err, CgroupError::OwnCgroup { .. }), "{err}");
    }

    #[test]
    fn removes_only_what_it_recorded_and_only_when_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = a.join("b");
        let other = a.join("other");
        fs::create_dir_all(&b).unwrap();
        fs::create_dir_all(&other).unwrap();
        let keep = tmp.path().join("existed");
        fs::create_dir(&keep).unwrap();
        let record = tmp.path().join("record");
        fs::write(
            &record,
            format!(
                "{}\n{}\n{}\n",
                a.display(),
                b.display(),
                tmp.path().join("gone").display()
            ),
        )
        .unwrap();
        remove_recorded(&record).unwrap();
        assert!(!b.exists(), "recorded and empty");
        assert!(a.exists(), "recorded but holds someone else's");
        assert!(keep.exists(), "never recorded");
        remove_recorded(&tmp.path().join("no-record")).unwrap();
    }

    /// Really creates a cgroup under a temporary name in every hierarchy,
    /// spawns `sleep` into it, and removes it. Root only.
    #[test]
    fn sleep_joins_a_real_cgroup() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating cgroups needs root");
            return;
        }
        let name = format!("arrow-cgroup-test-{}", std::process::id());
        let path = CgroupPath::parse(&format!("/{name}/pod")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let record = tmp.path().join("cgroups");
        let cg = PodCgroup::prepare(&path, &record).unwrap();
        let dirs: Vec<PathBuf> = cg.dirs().map(Path::to_path_buf).collect();
        assert!(!dirs.is_empty());
        let mut child = cg.spawn(Command::new("sleep").arg("30")).unwrap();
        let cgroups = fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let want = format!("/{name}/pod");
        for dir in &dirs {
            assert!(dir.ends_with(format!("{name}/pod")), "{}", dir.display());
        }
        let joined = cgroups.lines().filter(|l| l.ends_with(&want)).count();
        assert_eq!(joined, dirs.len(), "{cgroups}");
        remove_recorded(&record).unwrap();
        for dir in &dirs {
            assert!(!dir.exists(), "{} left behind", dir.display());
            assert!(!dir.parent().unwrap().exists(), "parent left behind");
        }

        // A cgroup gone between prepare and spawn: the spawn fails, naming
        // the cgroup and the hierarchy.
        let cg = PodCgroup::prepare(&path, &record).unwrap();
        remove_recorded(&record).unwrap();
        let err = cg.spawn(&mut Command::new("true")).unwrap_err();
        match &err {
            CgroupError::Join { dir, err, .. } => {
                assert_eq!(dir, &dirs[0]);
                assert!(err.raw_os_error().is_some(), "{err}");
            }
            other => panic!("{other}"),
        }
        eprintln!("{err}");
    }
}
