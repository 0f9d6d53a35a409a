//! Turning a `CreateProcess` into a running process: validation up front (so
//! mistakes surface at create time, and the child allocates nothing), a pty
//! when asked, and a vfork-style spawn.
//!
//! The spawn uses `clone(CLONE_VM | CLONE_VFORK)`: the child borrows the
//! agent's memory until it execs, so no page tables are copied and the agent
//! takes no copy-on-write faults afterwards (both are expensive on emulated
//! KVM, see HOST-KVM.md). In return the child may only make raw system calls
//! on data prepared beforehand; it reports a failure by writing into the
//! parent's `ChildArgs` and exiting.
//!
//! PID namespaces (`PidNs`): the init of a container with a namespace of its
//! own is cloned with `CLONE_NEWPID` (and `CLONE_PIDFD`, the handle its
//! execs join by). A process joining a namespace needs two clones, since
//! `setns(CLONE_NEWPID)` only places the caller's later children: an
//! intermediate child joins and clones the real one with `CLONE_PARENT`
//! (so it is the agent's child, reaped as any other), reports its pid and
//! exits.

use std::ffi::{c_char, c_int, c_void, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use proto::agent::CreateProcess;

use crate::capabilities::{self, CapSets};
use crate::container::pidns::{InitMounts, PidNs, Spawned};
use crate::container::Placement;
use crate::seccomp::Filter;

/// The child's stack; it only makes a few system calls.
const CHILD_STACK_SIZE: usize = 64 * 1024;
/// PATH used when the process's environment has none (the OCI/runc default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A rejected `CreateProcess`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidPlan(pub String);

/// Why a spawn failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("clone: {0}")]
    Clone(io::Error),
    /// A setup step or the exec failed in the child.
    #[error("{stage}: {source}")]
    Child {
        stage: &'static str,
        source: io::Error,
    },
}

/// Credentials to switch to.
#[derive(Debug)]
struct Identity {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// A validated process description, ready to spawn without allocating.
#[derive(Debug)]
pub struct Plan {
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Paths to try with execve, in order (the PATH lookup, done up front).
    programs: Vec<CString>,
    root: Option<CString>,
    cwd: CString,
    /// None when the agent's own credentials already match.
    identity: Option<Identity>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    umask: Option<libc::mode_t>,
    no_new_privs: bool,
    /// A container's cgroup.procs: the child writes "0" there to join.
    cgroup_procs: Option<CString>,
    /// The oom_score_adj to write, as text.
    oom_score_adj: Option<CString>,
    /// Capability sets to apply; None = leave them as they are.
    caps: Option<CapSets>,
    /// The container's seccomp filter, loaded last (see `setup_and_exec`).
    seccomp: Option<Arc<Filter>>,
    /// Whether the process gets a pty.
    pub terminal: bool,
    /// Whether the process gets a stdin pipe (non-terminal only).
    pub stdin: bool,
}

impl Plan {
    /// Validates `req`. `agent_ids` are the agent's (euid, egid): a process
    /// that keeps them and has no supplementary groups skips the credential
    /// system calls. `placement` is the container named by
    /// `req.container_id` (looked up by the caller).
    pub fn new(
        req: &CreateProcess,
        agent_ids: (u32, u32),
        placement: Option<&Placement>,
    ) -> Result<Self, InvalidPlan> {
        if req.args.is_empty() || req.args[0].is_empty() {
            return Err(InvalidPlan("args must name a program".into()));
        }
        let argv = req
            .args
            .iter()
            .map(|a| cstring(a, "args"))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = req
            .env
            .iter()
            .map(|e| cstring(e, "env"))
            .collect::<Result<Vec<_>, _>>()?;
        let path = req
            .env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        let programs = candidates(&req.args[0], path)
            .into_iter()
            .map(|p| cstring(&p, "args[0]"))
            .collect::<Result<Vec<_>, _>>()?;

        let (root, cgroup_procs) = match (placement, req.root.as_str()) {
            (Some(_), r) if !r.is_empty() => {
                return Err(InvalidPlan("root must be empty with a container_id".into()))
            }
            (Some(p), _) => {
                if p.container_id != req.container_id {
                    return Err(InvalidPlan(format!(
                        "placement of {:?} for container_id {:?}",
                        p.container_id, req.container_id
                    )));
                }
                (
                    Some(path_cstring(&p.root, "container root")?),
                    Some(path_cstring(&p.cgroup_procs, "container cgroup")?),
                )
            }
            (None, _) if !req.container_id.is_empty() => {
                return Err(InvalidPlan(format!(
                    "container {:?} not found",
                    req.container_id
                )))
            }
            (None, "" | "/") => (None, None),
            (None, r) if r.starts_with('/') => (Some(cstring(r, "root")?), None),
            (None, r) => return Err(InvalidPlan(format!("root {r:?} is not absolute"))),
        };
        let cwd = match req.cwd.as_str() {
            "" => cstring("/", "cwd")?,
            c if c.starts_with('/') => cstring(c, "cwd")?,
            c => return Err(InvalidPlan(format!("cwd {c:?} is not absolute"))),
        };
        let identity = if (req.uid, req.gid) == agent_ids && req.additional_gids.is_empty() {
            None
        } else {
            Some(Identity {
                uid: req.uid,
                gid: req.gid,
                groups: req.additional_gids.clone(),
            })
        };
        let rlimits = req
            .rlimits
            .iter()
            .map(|r| {
                let resource = rlimit_resource(&r.r#type)
                    .ok_or_else(|| InvalidPlan(format!("unknown rlimit {:?}", r.r#type)))?;
                if r.soft > r.hard {
                    return Err(InvalidPlan(format!("{}: soft limit above hard", r.r#type)));
                }
                Ok((
                    resource,
                    libc::rlimit {
                        rlim_cur: r.soft,
                        rlim_max: r.hard,
                    },
                ))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let umask = match req.umask {
            Some(m) if m > 0o777 => return Err(InvalidPlan(format!("umask {m:#o} out of range"))),
            m => m,
        };
        let oom_score_adj = match req.oom_score_adj {
            Some(adj) if !(-1000..=1000).contains(&adj) => {
                return Err(InvalidPlan(format!(
                    "oom_score_adj {adj} out of range (-1000..=1000)"
                )))
            }
            Some(adj) => Some(cstring(&adj.to_string(), "oom_score_adj")?),
            None => None,
        };
        let caps = req
            .capabilities
            .as_ref()
            .map(|c| CapSets::parse(c, capabilities::last_cap()))
            .transpose()
            .map_err(InvalidPlan)?;
        Ok(Self {
            argv,
            envp,
            programs,
            root,
            cwd,
            identity,
            rlimits,
            umask,
            no_new_privs: req.no_new_privs,
            cgroup_procs,
            oom_score_adj,
            caps,
            seccomp: placement.and_then(|p| p.seccomp.clone()),
            terminal: req.terminal,
            stdin: req.stdin && !req.terminal,
        })
    }
}

fn cstring(s: &str, field: &str) -> Result<CString, InvalidPlan> {
    CString::new(s).map_err(|_| InvalidPlan(format!("{field} contains a NUL byte")))
}

fn path_cstring(p: &std::path::Path, field: &str) -> Result<CString, InvalidPlan> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| InvalidPlan(format!("{field} contains a NUL byte")))
}

/// The execve candidates for `program`, as execvp would try them.
fn candidates(program: &str, path: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            format!("{}/{program}", dir.trim_end_matches('/'))
        })
        .collect()
}

/// Maps an OCI rlimit name to its resource number.
fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

/// A pseudo-terminal pair; both ends close-on-exec.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pty in three system calls: open /dev/ptmx, unlock, and
/// TIOCGPTPEER for the slave (no /dev/pts path lookup).
pub fn open_pty() -> io::Result<Pty> {
    let master: OwnedFd = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?
        .into();
    pty_from_master(master)
}

/// Opens a pty of the devpts instance a container sees: its /dev/ptmx,
/// resolved as inside the container (openat2 RESOLVE_IN_ROOT, so its
/// symlinks cannot lead out). A container without one, or none given, gets
/// the guest's.
pub fn open_pty_in(root: Option<&std::path::Path>) -> io::Result<Pty> {
    let Some(root) = root else {
        return open_pty();
    };
    let root: OwnedFd = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_PATH)
        .open(root)?
        .into();
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let path = c"dev/ptmx";
    // SAFETY: openat2 reads the path and the open_how (of the size given)
    // and returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd == -1 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO | libc::ENOSYS) => open_pty(),
            _ => Err(err),
        };
    }
    // SAFETY: openat2 returned a fresh fd that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd as c_int) };
    pty_from_master(master)
}

fn pty_from_master(master: OwnedFd) -> io::Result<Pty> {
    let unlock: c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which is valid.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new fd.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if slave == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a fresh fd that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok(Pty { master, slave })
}

/// Sets a pty's window size (the process gets SIGWINCH).
pub fn set_window_size(master: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The child's stdio: fds to become 0, 1, 2, and whether fd 0 is a pty slave
/// to make the controlling terminal. The fds must be >= 3 (the agent keeps
/// 0-2 open, see `init::std_fds_and_null`), so placing one cannot clobber
/// another.
#[derive(Clone, Copy, Debug)]
pub struct ChildStdio {
    pub fds: [RawFd; 3],
    pub controlling_tty: bool,
}

/// Everything the child reads, prepared by the parent, plus where it reports
/// a failure. Lives in the parent's frame, which is suspended while the
/// child runs.
struct ChildArgs<'a> {
    plan: &'a Plan,
    argv: *const *const c_char,
    envp: *const *const c_char,
    stdio: ChildStdio,
    /// The init of a new PID namespace makes these mounts from inside it.
    init_mounts: Option<&'a InitMounts>,
    /// Joining: the pidfd whose namespace to join, the stack of the process
    /// cloned into it, and where its pid is reported.
    join: Option<RawFd>,
    join_stack_top: *mut u8,
    joined_pid: c_int,
    failed_stage: Option<&'static str>,
    errno: c_int,
}

/// A child stack; uninitialised on purpose: only the pages the child
/// touches get faulted.
struct Stack(Vec<u8>);

impl Stack {
    fn new() -> Self {
        Self(Vec::with_capacity(CHILD_STACK_SIZE))
    }

    fn top(&mut self) -> *mut u8 {
        // SAFETY: the pointer stays inside the allocation (one past the end
        // is allowed); rounding down keeps it there and gives the ABI's
        // alignment.
        unsafe {
            let end = self.0.as_mut_ptr().add(CHILD_STACK_SIZE);
            end.sub(end as usize % 16)
        }
    }
}

/// Spawns the process described by `plan` in a new session, in the PID
/// namespace `ns` says, and returns its pid once it has exec'd. On a
/// child-side failure the child has exited with 127 and is left for the
/// reaper.
pub fn spawn(plan: &Plan, stdio: ChildStdio, ns: PidNs<'_>) -> Result<Spawned, SpawnError> {
    let argv = null_terminated(&plan.argv);
    let envp = null_terminated(&plan.envp);
    let mut stack = Stack::new();
    let mut join_stack = Stack::new();
    let mut args = ChildArgs {
        plan,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdio,
        init_mounts: None,
        join: None,
        join_stack_top: std::ptr::null_mut(),
        joined_pid: 0,
        failed_stage: None,
        errno: 0,
    };
    let base = libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD;
    let (entry, flags): (extern "C" fn(*mut c_void) -> c_int, c_int) = match ns {
        PidNs::Inherit => (child_main, base),
        PidNs::New(mounts) => {
            args.init_mounts = Some(mounts);
            (child_main, base | libc::CLONE_NEWPID | libc::CLONE_PIDFD)
        }
        PidNs::Join(pidfd) => {
            args.join = Some(pidfd.as_raw_fd());
            args.join_stack_top = join_stack.top();
            (join_main, base)
        }
    };
    let stack_top = stack.top();
    let mut pidfd: c_int = -1;

    // SAFETY: sigset_t is plain data; sigfillset initialises it fully.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset/pthread_sigmask write only into our locals. Signals
    // stay blocked while the child shares our memory, so no handler of ours
    // can run on the child's side; the child clears its mask before exec.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `entry` only uses `args` (valid: this frame is suspended by
    // CLONE_VFORK until the child execs or exits; a joining child is itself
    // suspended until its own child does) and the stacks, live allocations
    // of CHILD_STACK_SIZE bytes each. With CLONE_PIDFD the kernel writes
    // the pidfd into `pidfd` (the parent_tid argument).
    let pid = unsafe {
        libc::clone(
            entry,
            stack_top.cast::<c_void>(),
            flags,
            (&mut args as *mut ChildArgs<'_>).cast::<c_void>(),
            &mut pidfd as *mut c_int,
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    drop(join_stack);

    if pid == -1 {
        return Err(SpawnError::Clone(clone_err));
    }
    // SAFETY: a pidfd the kernel just made for us, owned by nobody else.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    // SAFETY: the child has exec'd or exited (CLONE_VFORK), so nothing writes
    // `args` any more; volatile reads keep the compiler from assuming the
    // fields are unchanged since we set them.
    let (stage, errno, joined_pid) = unsafe {
        (
            std::ptr::read_volatile(&args.failed_stage),
            std::ptr::read_volatile(&args.errno),
            std::ptr::read_volatile(&args.joined_pid),
        )
    };
    match stage {
        None if args.join.is_some() => Ok(Spawned {
            pid: joined_pid,
            pidfd: None,
        }),
        None => Ok(Spawned { pid, pidfd }),
        Some(stage) => Err(SpawnError::Child {
            stage,
            source: io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Entry point of the intermediate child of a process that joins a PID
/// namespace: joins it, clones the real child into it (as the agent's
/// child, `CLONE_PARENT`; suspended until that one execs or exits), reports
/// its pid and exits.
extern "C" fn join_main(arg: *mut c_void) -> c_int {
    let a = arg.cast::<ChildArgs<'_>>();
    // SAFETY: `arg` is the parent's `ChildArgs`, alive in its suspended
    // frame; only plain field reads and writes through the raw pointer, as
    // the grandchild uses the same struct while this child is suspended.
    unsafe {
        let (Some(pidfd), stack_top) = ((*a).join, (*a).join_stack_top) else {
            return report(a, "join the container's PID namespace", libc::EINVAL);
        };
        if libc::setns(pidfd, libc::CLONE_NEWPID) == -1 {
            return report(a, "join the container's PID namespace", errno());
        }
        let pid = libc::clone(
            child_main,
            stack_top.cast::<c_void>(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::SIGCHLD,
            arg,
        );
        if pid == -1 {
            return report(a, "clone into the container's PID namespace", errno());
        }
        // A failed grandchild already reported its stage.
        std::ptr::write_volatile(std::ptr::addr_of_mut!((*a).joined_pid), pid);
    }
    0
}

/// Records a child-side failure in the parent's `ChildArgs`; returns the
/// child's exit code.
///
/// # Safety
/// `a` must be the parent's live `ChildArgs`, not otherwise in use.
unsafe fn report(a: *mut ChildArgs<'_>, stage: &'static str, err: c_int) -> c_int {
    std::ptr::write_volatile(std::ptr::addr_of_mut!((*a).errno), err);
    std::ptr::write_volatile(std::ptr::addr_of_mut!((*a).failed_stage), Some(stage));
    127
}

fn null_terminated(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Entry point of the cloned child.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    let a = arg.cast::<ChildArgs<'_>>();
    // SAFETY: `arg` is the `ChildArgs` passed to clone, alive in the
    // suspended parent frame; nothing else touches it while we run. Runs
    // only in the freshly cloned child, see `setup_and_exec`.
    let (stage, errno) = unsafe { setup_and_exec(&*a) };
    // SAFETY: plain stores into the parent's struct, read after we exit.
    unsafe { report(a, stage, errno) }
}

fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Prepares the child and execs; returns only on failure, with the step and
/// errno.
///
/// # Safety
/// Must run only in the CLONE_VM child: it makes raw system calls and
/// allocates nothing. Credentials are changed with raw syscalls because
/// glibc's wrappers would broadcast the change to the parent's threads.
unsafe fn setup_and_exec(a: &ChildArgs<'_>) -> (&'static str, c_int) {
    let plan = a.plan;
    if libc::setsid() == -1 {
        return ("setsid", errno());
    }
    if a.stdio.controlling_tty && libc::ioctl(a.stdio.fds[0], libc::TIOCSCTTY, 0) == -1 {
        return ("set controlling tty", errno());
    }
    for (target, &fd) in (0..).zip(a.stdio.fds.iter()) {
        let rc = if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        };
        if rc == -1 {
            return ("set up stdio", errno());
        }
    }
    // Into the container's cgroup before anything else runs or is
    // allocated for the process ("0" = the writer). Still as root and in
    // the guest's root.
    if let Some(procs) = &plan.cgroup_procs {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd == -1 {
            return ("join the container's cgroup", errno());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = errno();
        libc::close(fd);
        if written != 1 {
            return ("join the container's cgroup", err);
        }
    }
    // The init of a new PID namespace: the container's proc, from inside
    // it, while still in the guest's root.
    if let Some(mounts) = a.init_mounts {
        if let Err(failed) = mounts.mount_in_child() {
            return failed;
        }
    }
    // A vfork child's write stays its own (the kernel skips processes
    // sharing the mm when the writer is in vfork).
    if let Some(adj) = &plan.oom_score_adj {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd == -1 {
            return ("oom_score_adj", errno());
        }
        let bytes = adj.as_bytes();
        let written = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let err = errno();
        libc::close(fd);
        if written != bytes.len() as isize {
            return ("oom_score_adj", err);
        }
    }
    for (resource, limit) in &plan.rlimits {
        if libc::setrlimit(*resource, limit) == -1 {
            return ("setrlimit", errno());
        }
    }
    if let Some(root) = &plan.root {
        if libc::chroot(root.as_ptr()) == -1 {
            return ("chroot", errno());
        }
    }
    // Absolute, so inside the new root; done as root, before dropping ids.
    if libc::chdir(plan.cwd.as_ptr()) == -1 {
        return ("chdir", errno());
    }
    if let Some(mask) = plan.umask {
        libc::umask(mask);
    }
    // runc's order: without no_new_privs, loading needs CAP_SYS_ADMIN, so
    // before any capability is dropped; with it, as late as possible.
    if let (Some(filter), false) = (&plan.seccomp, plan.no_new_privs) {
        if let Err(e) = filter.load() {
            return ("seccomp", e);
        }
    }
    if let Some(caps) = &plan.caps {
        // Needs CAP_SETPCAP: while still root.
        if let Err(e) = capabilities::drop_bounding(caps) {
            return ("drop bounding capabilities", e);
        }
    }
    if let Some(id) = &plan.identity {
        // Keep the permitted set across setuid, to apply `caps` after it.
        if plan.caps.is_some() {
            if let Err(e) = capabilities::keep_caps(true) {
                return ("PR_SET_KEEPCAPS", e);
            }
        }
        if libc::syscall(libc::SYS_setgroups, id.groups.len(), id.groups.as_ptr()) == -1 {
            return ("setgroups", errno());
        }
        if libc::syscall(libc::SYS_setresgid, id.gid, id.gid, id.gid) == -1 {
            return ("setgid", errno());
        }
        if libc::syscall(libc::SYS_setresuid, id.uid, id.uid, id.uid) == -1 {
            return ("setuid", errno());
        }
        if plan.caps.is_some() {
            if let Err(e) = capabilities::keep_caps(false) {
                return ("PR_SET_KEEPCAPS", e);
            }
        }
    }
    if let Some(caps) = &plan.caps {
        if let Err(failed) = capabilities::apply(caps) {
            return failed;
        }
    }
    if plan.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1 {
        return ("no_new_privs", errno());
    }
    if let (Some(filter), true) = (&plan.seccomp, plan.no_new_privs) {
        if let Err(e) = filter.load() {
            return ("seccomp", e);
        }
    }
    // The Rust runtime ignores SIGPIPE; an ignored signal survives exec.
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

    // execvp's rules: skip candidates that do not exist, remember EACCES.
    let mut result = libc::ENOENT;
    for program in &plan.programs {
        libc::execve(program.as_ptr(), a.argv, a.envp);
        match errno() {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => result = libc::EACCES,
            other => return ("exec", other),
        }
    }
    ("exec", result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::Rlimit;

    fn req(args: &[&str]) -> CreateProcess {
        CreateProcess {
            id: "p".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn path_lookup_candidates() {
        assert_eq!(candidates("/bin/sh", "/x"), vec!["/bin/sh"]);
        assert_eq!(candidates("./a", "/x"), vec!["./a"]);
        assert_eq!(
            candidates("sh", "/usr/bin/::/bin"),
            vec!["/usr/bin/sh", "./sh", "/bin/sh"]
        );
    }

    #[test]
    fn plan_uses_env_path() {
        let mut r = req(&["sh"]);
        r.env = vec!["A=1".into(), "PATH=/opt/bin".into()];
        let plan = Plan::new(&r, (0, 0), None).unwrap();
        assert_eq!(plan.programs, vec![CString::new("/opt/bin/sh").unwrap()]);
        let plan = Plan::new(&req(&["sh"]), (0, 0), None).unwrap();
        assert_eq!(plan.programs.len(), DEFAULT_PATH.split(':').count());
    }

    #[test]
    fn plan_rejects_bad_requests() {
        assert!(Plan::new(&req(&[]), (0, 0), None).is_err());
        assert!(Plan::new(&req(&["a\0b"]), (0, 0), None).is_err());
        let mut r = req(&["sh"]);
        r.cwd = "relative".into();
        assert!(Plan::new(&r, (0, 0), None).is_err());
        let mut r = req(&["sh"]);
        r.root = "rootfs".into();
        assert!(Plan::new(&r, (0, 0), None).is_err());
        let mut r = req(&["sh"]);
        r.rlimits = vec![Rlimit {
            r#type: "RLIMIT_BOGUS".into(),
            soft: 1,
            hard: 1,
        }];
        assert!(Plan::new(&r, (0, 0), None).is_err());
        r.rlimits[0].r#type = "RLIMIT_NOFILE".into();
        r.rlimits[0].soft = 2;
        assert!(Plan::new(&r, (0, 0), None).is_err());
        let mut r = req(&["sh"]);
        r.umask = Some(0o1000);
        assert!(Plan::new(&r, (0, 0), None).is_err());
    }

    #[test]
    fn plan_skips_credentials_it_already_has() {
        assert!(Plan::new(&req(&["sh"]), (0, 0), None)
            .unwrap()
            .identity
            .is_none());
        let mut r = req(&["sh"]);
        r.uid = 1000;
        assert!(Plan::new(&r, (0, 0), None).unwrap().identity.is_some());
        let mut r = req(&["sh"]);
        r.additional_gids = vec![5];
        assert!(Plan::new(&r, (0, 0), None).unwrap().identity.is_some());
    }

    #[test]
    fn plan_defaults() {
        let mut r = req(&["sh"]);
        r.root = "/".into();
        r.terminal = true;
        r.stdin = true;
        let plan = Plan::new(&r, (0, 0), None).unwrap();
        assert!(plan.root.is_none());
        assert_eq!(plan.cwd.as_bytes(), b"/");
        assert!(plan.terminal && !plan.stdin);
    }

    fn placement() -> Placement {
        Placement {
            seccomp: None,
            container_id: "c1".into(),
            root: "/run/arrow/containers/c1/root".into(),
            cgroup_procs: "/sys/fs/cgroup/c1/cgroup.procs".into(),
        }
    }

    #[test]
    fn plan_in_a_container() {
        let mut r = req(&["sh"]);
        r.container_id = "c1".into();
        r.oom_score_adj = Some(-999);
        let plan = Plan::new(&r, (0, 0), Some(&placement())).unwrap();
        assert_eq!(plan.root.as_deref(), Some(c"/run/arrow/containers/c1/root"));
        assert_eq!(
            plan.cgroup_procs.as_deref(),
            Some(c"/sys/fs/cgroup/c1/cgroup.procs")
        );
        assert_eq!(plan.oom_score_adj.as_deref(), Some(c"-999"));
        assert!(plan.caps.is_none());

        // `root` and a container exclude each other.
        r.root = "/elsewhere".into();
        let err = Plan::new(&r, (0, 0), Some(&placement())).unwrap_err();
        assert!(err.0.contains("root"), "{err}");
        // A container the caller did not find, or another one's placement.
        let mut r = req(&["sh"]);
        r.container_id = "c2".into();
        assert!(Plan::new(&r, (0, 0), None).is_err());
        assert!(Plan::new(&r, (0, 0), Some(&placement())).is_err());
        // A guest process has neither.
        let plan = Plan::new(&req(&["sh"]), (0, 0), None).unwrap();
        assert!(plan.root.is_none() && plan.cgroup_procs.is_none());
    }

    #[test]
    fn plan_checks_oom_score_adj_and_capabilities() {
        for (adj, ok) in [(-1000, true), (1000, true), (-1001, false), (1001, false)] {
            let mut r = req(&["sh"]);
            r.oom_score_adj = Some(adj);
            assert_eq!(Plan::new(&r, (0, 0), None).is_ok(), ok, "{adj}");
        }
        let mut r = req(&["sh"]);
        r.capabilities = Some(proto::agent::Capabilities {
            bounding: vec!["CAP_CHOWN".into()],
            ambient: vec!["CAP_CHOWN".into()],
            ..Default::default()
        });
        let caps = Plan::new(&r, (0, 0), None).unwrap().caps.unwrap();
        assert_eq!((caps.bounding, caps.ambient, caps.effective), (1, 1, 0));
        r.capabilities.as_mut().unwrap().permitted = vec!["CAP_WHATEVER".into()];
        let err = Plan::new(&r, (0, 0), None).unwrap_err();
        assert!(err.0.contains("CAP_WHATEVER"), "{err}");
    }

    #[test]
    fn pty_pair_and_window_size() {
        let pty = open_pty().unwrap();
        set_window_size(&pty.master, 40, 100).unwrap();
        // SAFETY: TIOCGWINSZ writes a winsize into our local.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_row, ws.ws_col), (40, 100));
    }
}
