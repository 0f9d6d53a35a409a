//! The VMM's jail, set up before the VMM reads anything a guest wrote: a
//! process of its own in new PID, mount, IPC, UTS and network namespaces,
//! whose root is a small tmpfs holding only what one VM needs, bound at
//! the same absolute paths as on the host (so nothing else in the VMM
//! changes): `/dev/kvm`, the kernel and arrow-init read-only, the template
//! (read-only, or the template cache read-write for the process that
//! creates it), the pod's share, the directory of its own sockets,
//! console log and device counters, and a `/proc` with only its own processes
//! (`subset=pid`: no `/proc/sys`, no `/proc/sysrq-trigger`).
//!
//! A process cannot enter a new PID namespace itself, only its children
//! can, so `arrow-vmm serve` forks once: the child is the VMM (PID 1 of its
//! namespace) and the parent, the process the shim started, stays behind
//! as its *keeper*: without privileges, it forwards SIGTERM and SIGINT,
//! and exits as the VMM did (128 + the signal if it was killed, e.g. 159
//! for SIGSYS), so the shim sees the VMM's end exactly as before. The VMM
//! dies with its keeper (`PR_SET_PDEATHSIG`), so killing the pid the shim
//! knows kills the VM.
//!
//! The network namespace is empty: the tap arrives as a descriptor and the
//! vsock sockets are files.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, fork, pivot_root, ForkResult, Pid};

/// How the jail may use one host path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read-only, nosuid, nodev, noexec.
    ReadOnly,
    /// Writable, nosuid, nodev, noexec.
    ReadWrite,
    /// A device node to open read-write (`/dev/kvm`): nosuid, noexec.
    Device,
}

/// One host path bound into the jail at the same absolute path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailPath {
    pub path: PathBuf,
    pub access: Access,
    /// With the mounts below it, which keep receiving the host's later
    /// mounts there (the containers' rootfs in the share).
    pub recursive: bool,
}

impl JailPath {
    pub fn new(path: impl Into<PathBuf>, access: Access) -> Self {
        Self {
            path: path.into(),
            access,
            recursive: false,
        }
    }

    pub fn recursive(mut self) -> Self {
        self.recursive = true;
        self
    }
}

/// What a jail holds and where it is built.
#[derive(Debug)]
pub struct Jail {
    /// An empty host directory the jail's tmpfs is mounted on (in the
    /// VMM's own mount namespace only: on the host it stays empty).
    pub root: PathBuf,
    pub paths: Vec<JailPath>,
}

/// Where `path` goes under `root`: the same absolute path, which must be
/// absolute and plain (no `..`), as a jail holds nothing else.
fn inside(root: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    if !path.is_absolute() {
        bail!("{}: a jail path must be absolute", path.display());
    }
    let mut out = root.to_path_buf();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(name) => out.push(name),
            _ => bail!("{}: a jail path must be plain", path.display()),
        }
    }
    Ok(out)
}

impl Jail {
    /// Moves the calling process into the jail; call it while this process
    /// has a single thread and all privileges still. Returns in the jailed
    /// VMM; the calling process becomes its keeper and never returns.
    pub fn enter(self) -> anyhow::Result<()> {
        // Checked here, before the namespaces, where errors are plain.
        for p in &self.paths {
            inside(&self.root, &p.path)?;
            fs::symlink_metadata(&p.path).with_context(|| format!("jail: {}", p.path.display()))?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&self.root)
            .with_context(|| format!("creating the jail root {}", self.root.display()))?;
        unshare(CloneFlags::CLONE_NEWPID).context("unsharing the PID namespace")?;
        // The VMM learns here that its keeper died before it could ask to
        // die with it: the keeper holds the write end for its life.
        let (alive_r, alive_w) = nix::unistd::pipe().context("creating the keeper pipe")?;
        // SAFETY: the process has one thread (the caller's contract), so
        // the child may run any code, not only async-signal-safe code.
        match unsafe { fork() }.context("forking the jailed VMM")? {
            ForkResult::Parent { child } => {
                drop(alive_r);
                keep(child, &self.root, alive_w)
            }
            ForkResult::Child => {
                drop(alive_w);
                die_with_keeper(alive_r)?;
                self.build().context("building the jail")
            }
        }
    }

    /// In the VMM (PID 1 of its namespace): the other namespaces, the
    /// jail's tree, `pivot_root` into it, its `/proc`.
    fn build(self) -> anyhow::Result<()> {
        unshare(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWNET,
        )
        .context("unsharing the mount, IPC, UTS and network namespaces")?;
        // Nothing done here reaches the host; the host's later mounts in
        // the share still reach the VMM.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&str>,
        )
        .context("making the mounts slaves of the host's")?;
        let _ = nix::unistd::sethostname("arrow-vmm");
        mount(
            Some("arrow-vmm-jail"),
            &self.root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0755,size=1m,nr_inodes=4096"),
        )
        .context("mounting the jail's tmpfs")?;
        for p in &self.paths {
            bind(&self.root, p).with_context(|| format!("binding {}", p.path.display()))?;
        }
        let proc_dir = self.root.join("proc");
        fs::DirBuilder::new()
            .mode(0o555)
            .create(&proc_dir)
            .context("creating /proc in the jail")?;
        chdir(&self.root).context("entering the jail")?;
        // The old root is stacked under the new one, then detached.
        pivot_root(".", ".").context("pivot_root into the jail")?;
        umount2(".", MntFlags::MNT_DETACH).context("detaching the host's root")?;
        chdir("/").context("entering the jail's root")?;
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("subset=pid"),
        )
        .context("mounting the jail's /proc")?;
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .context("making the jail's root read-only")?;
        Ok(())
    }
}

/// Binds `p` at its own path under `root`, then gives the bind its flags.
fn bind(root: &Path, p: &JailPath) -> anyhow::Result<()> {
    let target = inside(root, &p.path)?;
    let is_dir = fs::metadata(&p.path)?.is_dir();
    if let Some(parent) = target.parent() {
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(parent)?;
    }
    if is_dir {
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(&target)?;
    } else {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&target)?;
    }
    let mut flags = MsFlags::MS_BIND;
    if p.recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(&p.path), &target, None::<&str>, flags, None::<&str>)?;
    let mut attrs = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
    // Never writable where the host's mount is not (the shim's share view).
    let source = nix::sys::statvfs::statvfs(&p.path)?;
    if source
        .flags()
        .contains(nix::sys::statvfs::FsFlags::ST_RDONLY)
    {
        attrs |= MsFlags::MS_RDONLY;
    }
    match p.access {
        Access::ReadOnly => attrs |= MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Access::ReadWrite => attrs |= MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Access::Device => attrs |= MsFlags::MS_NOEXEC,
    }
    mount(None::<&str>, &target, None::<&str>, attrs, None::<&str>)?;
    Ok(())
}

/// Asks for SIGKILL when the keeper dies, then checks it has not already.
fn die_with_keeper(alive: OwnedFd) -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("PR_SET_PDEATHSIG");
    }
    let mut fds = [libc::pollfd {
        fd: alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: polls one valid pollfd that lives across the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
    if ready != 0 {
        // The write end is closed: the keeper is gone.
        std::process::exit(1);
    }
    Ok(())
}

/// The keeper: forwards SIGTERM and SIGINT to the VMM and exits as it
/// did. It keeps no privilege and no stdio but stderr.
fn keep(vmm: Pid, jail_root: &Path, alive: OwnedFd) -> ! {
    let mut signals = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGCHLD,
        Signal::SIGHUP,
    ] {
        signals.add(sig);
    }
    // Blocked, then taken one by one with sigwait: no handler runs.
    let _ = signals.thread_block();
    // The VMM has its own copies: the shim's pipes end with the VMM.
    if let Ok(null) = CString::new("/dev/null") {
        // SAFETY: opens /dev/null and dup2s it over stdin and stdout,
        // which no Rust object owns in this process any more.
        unsafe {
            let fd = libc::open(null.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::dup2(fd, 0);
                libc::dup2(fd, 1);
                libc::close(fd);
            }
        }
    }
    let _ = crate::confine::drop_all_privileges();
    let code = loop {
        match waitpid(vmm, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                let why = if sig == Signal::SIGSYS {
                    " (a system call its seccomp filter does not allow)"
                } else {
                    ""
                };
                eprintln!("arrow-vmm: the VMM was killed by {sig}{why}");
                break 128 + sig as i32;
            }
            Err(nix::errno::Errno::ECHILD) => break 1,
            _ => {}
        }
        match signals.wait() {
            Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                let _ = kill(vmm, sig);
            }
            Ok(Signal::SIGHUP) => {
                let _ = kill(vmm, Signal::SIGTERM);
            }
            _ => {}
        }
    };
    drop(alive);
    // The jail's mount point, empty on the host.
    let _ = fs::remove_dir(jail_root);
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_paths_are_the_host_paths_under_the_root() {
        let root = Path::new("/run/arrow/ns/pod/jail");
        assert_eq!(
            inside(root, Path::new("/dev/kvm")).unwrap(),
            Path::new("/run/arrow/ns/pod/jail/dev/kvm")
        );
        assert!(inside(root, Path::new("dev/kvm")).is_err());
        assert!(inside(root, Path::new("/var/../etc/shadow")).is_err());
        assert!(inside(root, Path::new("/var/./cache")).is_ok());
    }
}
