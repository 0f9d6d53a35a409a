//! The VMM's seccomp filters: one allow-list per kind of thread, each
//! installed by the thread itself before it handles anything the guest
//! wrote, with any other system call killing the whole process (`SIGSYS`,
//! which the jail's keeper reports).
//!
//! The threads of `arrow-vmm serve` and what they may do:
//!
//! - **vCPU** (`vcpu<N>`): `KVM_RUN` and the `KVM_GET_*` calls that save its
//!   state for a template; the register accesses it hands to the device
//!   buses (eventfd writes, the console log's writes and compaction).
//! - **devices** (the event loop): epoll, the vsock sockets (Unix sockets
//!   only: `socket` is allowed for `AF_UNIX` alone), the tap's frames, and
//!   the virtio-fs passthrough's file calls, including the per-thread
//!   `setresuid`/`setresgid` it serves each request with.
//! - **controller** (the main thread, once the guest is ready): waits for
//!   the VM's end, publishing the device counters every second meanwhile
//!   (one file, opened write-only with fixed flags, renamed into place),
//!   stops it (kicking the vCPUs with a signal) and tears it down. Before the ready line it has created or cloned the VM (files,
//!   KVM's VM-level calls, the template cache); the only guest it talked to
//!   then is a template's freshly booted one, which has run nothing but
//!   arrow-init, while a clone's guest is never read by it.
//! - **watchers** (`signals`, `stdin`): wait for a signal or the shim's
//!   pipe to close, then stop the VM.
//!
//! No thread may create a process or a thread, open a network socket,
//! `ioctl` beyond the few numbers it needs (its KVM calls, the tap's
//! offloads, `FIONBIO`), mount, ptrace, load modules or
//! change its filters. The lists come from `strace -f` of boots, template
//! saves, clones and the shim's end-to-end tests (virtio-fs, vsock,
//! networking), and from reading fuse-backend-rs's passthrough; with
//! `ARROW_VMM_SECCOMP=log` the filters log what they would have refused
//! (see the kernel log, `comm` names the thread) instead of killing, which
//! is how to find what a change needs.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_core::confinement::{ThreadConfinement, ThreadKind};

/// The threads of `arrow-vmm serve`, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmmThread {
    Vcpu,
    Devices,
    Controller,
    Watcher,
}

impl VmmThread {
    pub const ALL: [VmmThread; 4] = [
        VmmThread::Vcpu,
        VmmThread::Devices,
        VmmThread::Controller,
        VmmThread::Watcher,
    ];

    fn name(self) -> &'static str {
        match self {
            VmmThread::Vcpu => "vcpu",
            VmmThread::Devices => "devices",
            VmmThread::Controller => "controller",
            VmmThread::Watcher => "watcher",
        }
    }

    /// Parses [`VmmThread::name`].
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .with_context(|| {
                format!("unknown thread kind {name:?} (vcpu, devices, controller, watcher)")
            })
    }
}

impl From<ThreadKind> for VmmThread {
    fn from(kind: ThreadKind) -> Self {
        match kind {
            ThreadKind::Vcpu => VmmThread::Vcpu,
            ThreadKind::Devices => VmmThread::Devices,
        }
    }
}

/// What a filter does with a call outside its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Kill the process (`SECCOMP_RET_KILL_PROCESS`).
    Kill,
    /// Allow and log it: finding what a change needs, never in production.
    Log,
}

/// The compiled filters, installed thread by thread.
pub struct SeccompPolicy {
    filters: BTreeMap<VmmThread, BpfProgram>,
    /// Test hook: this kind of thread makes a forbidden call once confined.
    self_test: Option<VmmThread>,
}

impl SeccompPolicy {
    /// Compiles every thread's filter (before any guest runs, so a bad list
    /// fails the launch, not a thread).
    pub fn new(enforcement: Enforcement, self_test: Option<VmmThread>) -> anyhow::Result<Self> {
        let mismatch = match enforcement {
            Enforcement::Kill => SeccompAction::KillProcess,
            Enforcement::Log => SeccompAction::Log,
        };
        let mut filters = BTreeMap::new();
        for thread in VmmThread::ALL {
            let filter = SeccompFilter::new(
                rules(thread)?,
                mismatch.clone(),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .with_context(|| format!("the {} thread's seccomp filter", thread.name()))?;
            let program: BpfProgram = filter
                .try_into()
                .with_context(|| format!("compiling the {} thread's filter", thread.name()))?;
            filters.insert(thread, program);
        }
        Ok(Self { filters, self_test })
    }

    /// Installs `thread`'s filter on the calling thread.
    pub fn apply(&self, thread: VmmThread) -> anyhow::Result<()> {
        let program = self
            .filters
            .get(&thread)
            .with_context(|| format!("no filter for the {} thread", thread.name()))?;
        seccompiler::apply_filter(program)
            .with_context(|| format!("installing the {} thread's filter", thread.name()))?;
        if self.self_test == Some(thread) {
            forbidden_call(thread);
        }
        Ok(())
    }
}

impl ThreadConfinement for SeccompPolicy {
    fn confine(&self, kind: ThreadKind) -> Result<(), String> {
        self.apply(kind.into()).map_err(|e| format!("{e:#}"))
    }
}

/// The self-test's call: a TCP socket, which no thread may open (the
/// devices thread may open Unix sockets only, so this also checks the
/// argument filter). Returning means the filter let it through.
fn forbidden_call(thread: VmmThread) {
    eprintln!(
        "arrow-vmm: seccomp self-test: the {} thread opens a TCP socket",
        thread.name()
    );
    // SAFETY: socket(2) takes integers only; the descriptor, if the filter
    // lets the call through, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: `fd` was just returned by socket(2) and nothing owns it.
        unsafe { libc::close(fd) };
    }
    eprintln!(
        "arrow-vmm: seccomp self-test: the {} thread's call was NOT refused",
        thread.name()
    );
}

/// `ARROW_VMM_SECCOMP`: unset or `kill` enforces, `log` only logs.
pub fn enforcement_from_env() -> anyhow::Result<Enforcement> {
    match std::env::var("ARROW_VMM_SECCOMP").as_deref() {
        Err(_) | Ok("kill") => Ok(Enforcement::Kill),
        Ok("log") => Ok(Enforcement::Log),
        Ok(other) => bail!("ARROW_VMM_SECCOMP={other:?}: expected \"kill\" or \"log\""),
    }
}

/// Calls every thread may make: memory, locks, time, signals (the vCPU
/// kick, and signal-hook's handler, which writes to its pipe with
/// `sendto` on whichever thread a signal lands), its own end, and an abort
/// (`tgkill` of itself) if it panics.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sendto,
    libc::SYS_write,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The vCPU thread's calls besides [`COMMON`] and its ioctls: the console
/// log (appended with `pwrite`, compacted with `pread` and `ftruncate`),
/// and `close` for what a device reset drops (vsock connections).
const VCPU: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_close,
];

/// The device event loop's calls besides [`COMMON`] and `socket`.
const DEVICES: &[i64] = &[
    // The event loop, its eventfds and timers (vsock credit updates, the
    // NIC's receive hold), and the tap's readiness check.
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_poll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
    // vsock: the hybrid socket's connections and the host's listeners.
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    // virtio-fs passthrough.
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_copy_file_range,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_umask,
    libc::SYS_getxattr,
    libc::SYS_fgetxattr,
    libc::SYS_setxattr,
    libc::SYS_fsetxattr,
    libc::SYS_listxattr,
    libc::SYS_flistxattr,
    libc::SYS_removexattr,
    libc::SYS_fremovexattr,
    libc::SYS_flock,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
];

/// The main thread once the guest is ready, besides [`COMMON`]: waiting,
/// the stop (eventfd writes, thread joins), the teardown (closing the
/// VM's descriptors, removing its vsock socket), and publishing the
/// device counters (`counters.rs`: a temporary file renamed over the
/// last; its `openat` is in [`rules`], with its flags fixed).
const CONTROLLER: &[i64] = &[
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_epoll_ctl,
    libc::SYS_rename,
];

/// The signal and stdin watchers, besides [`COMMON`].
const WATCHER: &[i64] = &[
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_close,
];

/// The ioctls of a vCPU thread: running, and saving its state when the VM
/// is paused for a template (`Vcpu::park`; `KVM_GET_REGS` also reports
/// where a failed vCPU stopped); `TUNSETOFFLOAD` when the guest acks the
/// NIC's features or resets it.
pub const VCPU_IOCTLS: [u64; 11] = [
    TUNSETOFFLOAD,
    kvm::RUN,
    kvm::GET_REGS,
    kvm::GET_SREGS,
    kvm::GET_MSRS,
    kvm::GET_MP_STATE,
    kvm::GET_XSAVE,
    kvm::GET_XCRS,
    kvm::GET_DEBUGREGS,
    kvm::GET_LAPIC,
    kvm::GET_VCPU_EVENTS,
];

/// The tap's offloads (`include/uapi/linux/if_tun.h`).
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// The devices thread's ioctl: `FIONBIO`, with which the standard library
/// makes the vsock's accepted and connected sockets non-blocking.
const DEVICES_IOCTLS: [u64; 1] = [libc::FIONBIO];

/// KVM ioctl numbers (`include/uapi/linux/kvm.h`), checked against
/// `kvm-bindings`' struct sizes by the tests.
mod kvm {
    pub const RUN: u64 = 0xae80;
    pub const GET_REGS: u64 = 0x8090_ae81;
    pub const GET_SREGS: u64 = 0x8138_ae83;
    pub const GET_MSRS: u64 = 0xc008_ae88;
    pub const GET_LAPIC: u64 = 0x8400_ae8e;
    pub const GET_MP_STATE: u64 = 0x8004_ae98;
    pub const GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
    pub const GET_DEBUGREGS: u64 = 0x8080_aea1;
    pub const GET_XSAVE: u64 = 0x9000_aea4;
    pub const GET_XCRS: u64 = 0x8188_aea6;
}

/// An argument equal to `value` (compared as a 32-bit int, as the kernel
/// reads `int` and `unsigned int` arguments).
fn arg_eq(index: u8, value: u64) -> anyhow::Result<SeccompRule> {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .context("a seccomp condition")?;
    SeccompRule::new(vec![condition]).context("a seccomp rule")
}

/// The allow-list of `thread`: syscall number → rules (empty: any
/// arguments).
fn rules(thread: VmmThread) -> anyhow::Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let own: &[i64] = match thread {
        VmmThread::Vcpu => VCPU,
        VmmThread::Devices => DEVICES,
        VmmThread::Controller => CONTROLLER,
        VmmThread::Watcher => WATCHER,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(own)
        .map(|&nr| (nr, Vec::new()))
        .collect();
    match thread {
        VmmThread::Vcpu => {
            let ioctls = VCPU_IOCTLS
                .iter()
                .map(|&nr| arg_eq(1, nr))
                .collect::<anyhow::Result<_>>()?;
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        VmmThread::Devices => {
            rules.insert(libc::SYS_socket, vec![arg_eq(0, libc::AF_UNIX as u64)?]);
            let ioctls = DEVICES_IOCTLS
                .iter()
                .map(|&nr| arg_eq(1, nr))
                .collect::<anyhow::Result<_>>()?;
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        VmmThread::Controller => {
            // Only the counters file's open: no reading, no directories.
            rules.insert(
                libc::SYS_openat,
                vec![arg_eq(2, crate::counters::OPEN_FLAGS as u64)?],
            );
        }
        VmmThread::Watcher => {}
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{
        kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
        kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use std::mem::size_of;

    /// `_IOC(dir, KVMIO, nr, size)`.
    fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
    }
    const READ: u64 = 2;
    const READ_WRITE: u64 = 3;

    #[test]
    fn kvm_ioctl_numbers_match_the_uapi_structs() {
        assert_eq!(TUNSETOFFLOAD, libc::TUNSETOFFLOAD);
        assert_eq!(kvm::RUN, ioc(0, 0x80, 0));
        assert_eq!(kvm::GET_REGS, ioc(READ, 0x81, size_of::<kvm_regs>()));
        assert_eq!(kvm::GET_SREGS, ioc(READ, 0x83, size_of::<kvm_sregs>()));
        assert_eq!(kvm::GET_MSRS, ioc(READ_WRITE, 0x88, size_of::<kvm_msrs>()));
        assert_eq!(
            kvm::GET_LAPIC,
            ioc(READ, 0x8e, size_of::<kvm_lapic_state>())
        );
        assert_eq!(
            kvm::GET_MP_STATE,
            ioc(READ, 0x98, size_of::<kvm_mp_state>())
        );
        assert_eq!(
            kvm::GET_VCPU_EVENTS,
            ioc(READ, 0x9f, size_of::<kvm_vcpu_events>())
        );
        assert_eq!(
            kvm::GET_DEBUGREGS,
            ioc(READ, 0xa1, size_of::<kvm_debugregs>())
        );
        assert_eq!(kvm::GET_XSAVE, ioc(READ, 0xa4, size_of::<kvm_xsave>()));
        assert_eq!(kvm::GET_XCRS, ioc(READ, 0xa6, size_of::<kvm_xcrs>()));
    }

    #[test]
    fn every_filter_compiles_and_forbids_the_dangerous_calls() {
        for thread in VmmThread::ALL {
            let rules = rules(thread).unwrap();
            for nr in [
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_seccomp,
                libc::SYS_prctl,
                libc::SYS_setuid,
                libc::SYS_capset,
                libc::SYS_init_module,
                libc::SYS_bpf,
                libc::SYS_open_by_handle_at,
            ] {
                assert!(!rules.contains_key(&nr), "{thread:?} allows syscall {nr}");
            }
            assert_eq!(
                rules.contains_key(&libc::SYS_ioctl),
                matches!(thread, VmmThread::Vcpu | VmmThread::Devices),
                "{thread:?}"
            );
        }
        let policy = SeccompPolicy::new(Enforcement::Kill, None).unwrap();
        assert_eq!(policy.filters.len(), VmmThread::ALL.len());
    }

    #[test]
    fn only_the_devices_thread_opens_sockets_and_only_unix_ones() {
        assert_eq!(
            rules(VmmThread::Devices).unwrap()[&libc::SYS_socket].len(),
            1
        );
        for thread in [VmmThread::Vcpu, VmmThread::Controller, VmmThread::Watcher] {
            assert!(!rules(thread).unwrap().contains_key(&libc::SYS_socket));
        }
    }

    /// Installs the devices filter on a fresh thread and checks what it
    /// allows and refuses there (refused with `Log` would not show, so the
    /// probe filter returns EPERM instead of killing the test process).
    #[test]
    fn an_installed_filter_refuses_a_tcp_socket_and_allows_a_unix_one() {
        std::thread::spawn(|| {
            // SAFETY: prctl with integer arguments; needed to install a
            // filter without CAP_SYS_ADMIN.
            let set = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(set, 0);
            let filter = SeccompFilter::new(
                rules(VmmThread::Devices).unwrap(),
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let program: BpfProgram = filter.try_into().unwrap();
            seccompiler::apply_filter(&program).unwrap();
            // SAFETY: socket(2) with integer arguments; closed below.
            let tcp = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((tcp, errno), (-1, Some(libc::EPERM)));
            // SAFETY: as above.
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            assert!(unix >= 0);
            // SAFETY: `unix` was just opened and nothing owns it.
            unsafe { libc::close(unix) };
            // SAFETY: as above; getppid takes no arguments.
            assert_eq!(unsafe { libc::getppid() }, -1);
        })
        .join()
        .unwrap();
    }

    /// The controller's filter lets the counters file be published and
    /// refuses any other open (refused calls get EPERM here, as above).
    #[test]
    fn the_controller_may_publish_the_counters_and_open_nothing_else() {
        let dir = std::env::temp_dir().join(format!("arrow-seccomp-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(proto::vm_counters::FILE_NAME);
        std::fs::write(dir.join("other"), b"x").unwrap();
        let (p, d) = (path.clone(), dir.clone());
        std::thread::spawn(move || {
            // SAFETY: prctl with integer arguments, as above.
            let set = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(set, 0);
            let filter = SeccompFilter::new(
                rules(VmmThread::Controller).unwrap(),
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let program: BpfProgram = filter.try_into().unwrap();
            seccompiler::apply_filter(&program).unwrap();
            crate::counters::CountersFile::new(&p)
                .write(&proto::vm_counters::VmCounters::default())
                .unwrap();
            let refused = |r: std::io::Result<std::fs::File>| {
                r.unwrap_err().raw_os_error() == Some(libc::EPERM)
            };
            assert!(refused(std::fs::File::open(d.join("other"))));
            assert!(refused(std::fs::File::create(d.join("other"))));
        })
        .join()
        .unwrap();
        assert!(std::fs::read(&path).unwrap().starts_with(b"{"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn thread_kinds_parse_and_enforcement_is_kill_by_default() {
        assert_eq!(VmmThread::parse("vcpu").unwrap(), VmmThread::Vcpu);
        assert_eq!(VmmThread::parse("watcher").unwrap(), VmmThread::Watcher);
        assert!(VmmThread::parse("gpu").is_err());
        assert_eq!(VmmThread::from(ThreadKind::Devices), VmmThread::Devices);
    }
}
