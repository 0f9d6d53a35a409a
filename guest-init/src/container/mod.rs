//! Containers (agent.proto, CONTAINERS): a root filesystem assembled from
//! the virtio-fs share plus a cgroup v2 directory; processes created with a
//! `container_id` run chrooted into the root and inside the cgroup.
//!
//! Each container has a lock held for the whole of every call on it
//! (create, remove, update, freeze, and process create/start), so a process
//! never starts in a container being frozen or removed. Lock order:
//! a container's lock, then the table's or the supervisor's; the table
//! lock is never held while taking a container's.

pub mod cgroup;
pub mod oom;
pub mod paths;
pub mod pidns;
pub mod rootfs;
pub mod spec;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use proto::agent::{CreateContainer, PidNamespace, Resources, Stats};

use crate::clone::ClonePlatform;
use crate::error::AgentError;
use crate::seccomp::Filter;
use crate::{log_error, log_info};
use cgroup::Cgroup;
use oom::OomWatcher;
use pidns::{InitMounts, PidNs, Spawned};
use spec::{ContainerSpec, SysctlPlan};

/// FreezeContainer's wait for cgroup.events.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// RemoveContainer's wait for the killed processes to be gone.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where containers live. The guest's is [`Layout::guest`]; host tests use
/// [`Layout::for_host_tests`].
#[derive(Debug, Clone)]
pub struct Layout {
    /// Sources of rootfs and bind mounts.
    pub share: PathBuf,
    /// (tag, fstype) of the filesystem to mount at `share` on first use;
    /// None = `share` is a plain directory.
    pub share_device: Option<(&'static str, &'static str)>,
    /// `<containers>/<id>/root` is a container's root.
    pub containers: PathBuf,
    /// Mount a cgroup2 hierarchy here before first use (host tests).
    pub cgroup_mount: Option<PathBuf>,
    /// Containers' cgroups are created in this one.
    pub cgroup_parent: PathBuf,
    /// Where sysctls are written.
    pub proc_sys: PathBuf,
    /// Bound over masked files.
    pub dev_null: PathBuf,
    /// Set when containers cannot work here, saying why.
    pub unavailable: Option<String>,
}

impl Layout {
    /// PID 1's layout (see agent.proto).
    pub fn guest() -> Self {
        Self {
            share: "/run/arrow/shared".into(),
            share_device: Some(("arrow", "virtiofs")),
            containers: "/run/arrow/containers".into(),
            cgroup_mount: None,
            cgroup_parent: "/sys/fs/cgroup".into(),
            proc_sys: "/proc/sys".into(),
            dev_null: "/dev/null".into(),
            unavailable: None,
        }
    }

    /// Host-test mode (`--listen-unix DIR`): the share is `DIR/shared`,
    /// roots under `DIR/containers`, sysctls written to plain files under
    /// `DIR/sysctl`, and cgroups in a child of a cgroup2 hierarchy mounted
    /// at `DIR/cgroup2`. Moves this process into a mount namespace of its
    /// own whose mounts are slaves of the host's, so nothing it mounts
    /// reaches the host while mounts the host makes under a shared mount
    /// (a pod's share, as the runtime mounts container roots there) reach
    /// it, as they reach a VMM; must be called while the
    /// process has one thread. Without the privilege for that, every
    /// container call fails, saying so.
    pub fn for_host_tests(dir: &Path) -> Self {
        let unavailable = slave_mount_namespace().err().map(|e| {
            format!("containers need a mount namespace of their own in host-test mode: {e}")
        });
        let cgroup_mount = dir.join("cgroup2");
        Self {
            share: dir.join("shared"),
            share_device: None,
            containers: dir.join("containers"),
            cgroup_parent: cgroup_mount.join(format!("arrow-init-test-{}", std::process::id())),
            cgroup_mount: Some(cgroup_mount),
            proc_sys: dir.join("sysctl"),
            dev_null: "/dev/null".into(),
            unavailable,
        }
    }
}

fn slave_mount_namespace() -> Result<(), Errno> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
}

/// What a process of a container needs to enter it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub container_id: String,
    /// chroot here.
    pub root: PathBuf,
    /// Write "0" here to join the cgroup.
    pub cgroup_procs: PathBuf,
    /// The container's seccomp filter, if any.
    pub seccomp: Option<Arc<Filter>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Creating,
    Ready,
    /// Removal started (and maybe failed: it may be retried).
    Removing,
    Gone,
}

struct CState {
    phase: Phase,
    frozen: bool,
    /// The pidfd of the init of the container's own PID namespace, once
    /// started: what later processes join.
    pid_init: Option<OwnedFd>,
}

/// A container's PID namespace (agent.proto, PidNamespace).
enum Pid {
    /// The guest's.
    Pod,
    /// Its own; its init makes these mounts inside it. Set once the root
    /// is assembled.
    Own(Option<InitMounts>),
}

/// One container.
struct Container {
    id: String,
    /// `<containers>/<id>`.
    dir: PathBuf,
    root: PathBuf,
    cgroup: Cgroup,
    seccomp: Option<Arc<Filter>>,
    pid: Mutex<Pid>,
    state: Mutex<CState>,
}

impl Container {
    fn state(&self) -> MutexGuard<'_, CState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn placement(&self) -> Placement {
        Placement {
            container_id: self.id.clone(),
            root: self.root.clone(),
            cgroup_procs: self.cgroup.procs_path(),
            seccomp: self.seccomp.clone(),
        }
    }
}

#[derive(Default)]
struct Setup {
    share_ready: bool,
    cgroup_ready: bool,
}

/// The agent's containers.
pub struct Containers {
    layout: Layout,
    /// Ordered, not hashed: nothing a template's clones would share.
    table: Mutex<BTreeMap<String, Arc<Container>>>,
    setup: Mutex<Setup>,
    oom: Arc<OomWatcher>,
}

fn guest_err(msg: String) -> AgentError {
    AgentError::Guest(msg)
}

impl Containers {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            table: Mutex::new(BTreeMap::new()),
            setup: Mutex::new(Setup::default()),
            oom: OomWatcher::new(),
        }
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Container>>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::ContainerNotFound(id.to_string()))
    }

    /// Runs `f` with a ready container locked.
    fn with_ready<T>(
        &self,
        id: &str,
        f: impl FnOnce(&Container, &mut CState) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        let c = self.get(id)?;
        let mut st = c.state();
        if st.phase != Phase::Ready {
            return Err(AgentError::ContainerNotFound(id.to_string()));
        }
        f(&c, &mut st)
    }

    /// Runs `f` (a process create) with the placement of a ready container,
    /// which stays locked meanwhile.
    pub fn with_placement<T>(
        &self,
        id: &str,
        f: impl FnOnce(&Placement) -> Result<T, AgentError>,
    ) -> Result<T, AgentError> {
        self.with_ready(id, |c, _| f(&c.placement()))
    }

    /// Runs `start` (a process start) with the container locked, refusing
    /// while it is frozen (the new process would freeze in the middle of
    /// its start). In a container with its own PID namespace the first
    /// process started is that namespace's init, and every later one joins
    /// it. Returns the pid.
    pub fn start_in(
        &self,
        id: &str,
        start: impl FnOnce(PidNs<'_>) -> Result<Spawned, AgentError>,
    ) -> Result<i32, AgentError> {
        self.with_ready(id, |c, st| {
            if st.frozen {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {id:?} is frozen"
                )));
            }
            let pid = c.pid.lock().unwrap_or_else(PoisonError::into_inner);
            let ns = match (&*pid, &st.pid_init) {
                (Pid::Pod, _) => PidNs::Inherit,
                (Pid::Own(_), Some(init)) => PidNs::Join(init.as_fd()),
                (Pid::Own(Some(mounts)), None) => PidNs::New(mounts),
                (Pid::Own(None), None) => {
                    return Err(guest_err(format!(
                        "container {id:?}: its init's mounts were not prepared"
                    )))
                }
            };
            let spawned = start(ns)?;
            if let Some(pidfd) = spawned.pidfd {
                st.pid_init = Some(pidfd);
            }
            Ok(spawned.pid)
        })
    }

    /// CreateContainer.
    pub fn create(
        &self,
        req: &CreateContainer,
        platform: &dyn ClonePlatform,
    ) -> Result<(), AgentError> {
        let spec = spec::validate(req).map_err(AgentError::InvalidArgument)?;
        if let Some(why) = &self.layout.unavailable {
            return Err(guest_err(why.clone()));
        }
        let dir = self.layout.containers.join(&spec.id);
        let c = Arc::new(Container {
            id: spec.id.clone(),
            root: dir.join("root"),
            dir,
            cgroup: Cgroup::new(self.layout.cgroup_parent.join(&spec.id)),
            seccomp: spec.seccomp.clone(),
            pid: Mutex::new(match spec.pid_namespace {
                PidNamespace::Pod => Pid::Pod,
                PidNamespace::Container => Pid::Own(None),
            }),
            state: Mutex::new(CState {
                phase: Phase::Creating,
                frozen: false,
                pid_init: None,
            }),
        });
        let mut st = c.state();
        {
            let mut table = self.table();
            if table.contains_key(&spec.id) {
                return Err(AgentError::ContainerExists(spec.id));
            }
            table.insert(spec.id.clone(), Arc::clone(&c));
        }
        match self.build(&c, &spec, platform) {
            Ok(()) => {
                st.phase = Phase::Ready;
                log_info!("container {} created", spec.id);
                Ok(())
            }
            Err(msg) => {
                let undo = self.teardown(&c);
                st.phase = Phase::Gone;
                self.table().remove(&spec.id);
                let mut msg = format!("create container {:?}: {msg}", spec.id);
                if let Err(e) = undo {
                    log_error!("container {}: undoing a failed create: {e}", spec.id);
                    msg.push_str(&format!(" (and undoing it: {e})"));
                }
                Err(guest_err(msg))
            }
        }
    }

    fn build(
        &self,
        c: &Container,
        spec: &ContainerSpec,
        platform: &dyn ClonePlatform,
    ) -> Result<(), String> {
        self.prepare()?;
        c.cgroup.create()?;
        c.cgroup.apply(&spec.resources)?;
        std::fs::create_dir_all(&c.root)
            .map_err(|e| format!("create {}: {e}", c.root.display()))?;
        let by_init = rootfs::assemble(
            spec,
            &rootfs::Places {
                share: &self.layout.share,
                root: &c.root,
                cgroup: &c.cgroup,
                dev_null: &self.layout.dev_null,
            },
        )?;
        if let Pid::Own(mounts) = &mut *c.pid.lock().unwrap_or_else(PoisonError::into_inner) {
            *mounts = Some(InitMounts::new(by_init, &self.layout.dev_null)?);
        }
        let applied = apply_sysctls(&self.layout.proc_sys, &spec.sysctls)?;
        if !spec.hostname.is_empty() {
            if let Err(e) = platform.set_hostname(&spec.hostname) {
                restore_sysctls(&applied);
                return Err(format!("set hostname {:?}: {e}", spec.hostname));
            }
        }
        // Without the memory controller (some host tests) there is no
        // memory.events and so no OOM to report.
        let events = c.cgroup.file("memory.events");
        if let Err(e) = self.oom.watch(&c.id, &events) {
            if e.kind() != io::ErrorKind::NotFound {
                log_error!("container {}: cannot watch {}: {e}", c.id, events.display());
            }
        }
        Ok(())
    }

    /// First use: mounts the share and readies the cgroup parent.
    fn prepare(&self) -> Result<(), String> {
        let mut setup = self.setup.lock().unwrap_or_else(PoisonError::into_inner);
        let l = &self.layout;
        if !setup.share_ready {
            std::fs::create_dir_all(&l.share)
                .map_err(|e| format!("create {}: {e}", l.share.display()))?;
            if let Some((tag, fstype)) = l.share_device {
                match mount(
                    Some(tag),
                    &l.share,
                    Some(fstype),
                    MsFlags::empty(),
                    None::<&str>,
                ) {
                    // Mounted already.
                    Ok(()) | Err(Errno::EBUSY) => {}
                    Err(e) => {
                        return Err(format!(
                            "mount the {fstype} share {tag:?} on {}: {e}",
                            l.share.display()
                        ))
                    }
                }
            }
            setup.share_ready = true;
        }
        if !setup.cgroup_ready {
            if let Some(at) = &l.cgroup_mount {
                std::fs::create_dir_all(at).map_err(|e| format!("create {}: {e}", at.display()))?;
                match mount(
                    Some("cgroup2"),
                    at,
                    Some("cgroup2"),
                    MsFlags::empty(),
                    None::<&str>,
                ) {
                    Ok(()) | Err(Errno::EBUSY) => {}
                    Err(e) => return Err(format!("mount cgroup2 on {}: {e}", at.display())),
                }
            }
            std::fs::create_dir_all(&l.cgroup_parent)
                .map_err(|e| format!("create {}: {e}", l.cgroup_parent.display()))?;
            cgroup::enable_controllers(&l.cgroup_parent)?;
            setup.cgroup_ready = true;
        }
        Ok(())
    }

    /// Undoes a container: kills its processes, unmounts its root, removes
    /// its cgroup and directories. Idempotent; never deletes anything but
    /// empty directories, so the share's files are safe even when an
    /// unmount failed.
    fn teardown(&self, c: &Container) -> Result<(), String> {
        let mut errors = Vec::new();
        // Its fds of mount points in the root would keep them busy.
        if let Pid::Own(mounts) = &mut *c.pid.lock().unwrap_or_else(PoisonError::into_inner) {
            *mounts = None;
        }
        if c.cgroup.dir().exists() {
            if let Err(e) = c.cgroup.kill_all(KILL_TIMEOUT) {
                errors.push(e);
            }
        }
        self.oom.unwatch(&c.id);
        if let Err(e) = rootfs::unmount_all(&c.root) {
            errors.push(e);
        }
        if let Err(e) = c.cgroup.remove() {
            errors.push(e);
        }
        for d in [&c.root, &c.dir] {
            match std::fs::remove_dir(d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    errors.push(format!("remove {}: {e}", d.display()))
                }
                _ => {}
            }
        }
        release_share_inodes();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// RemoveContainer: its processes are forgotten first
    /// (`forget_processes`, the supervisor's, which returns how many; the
    /// container's lock is held, so no start is in progress), then killed,
    /// then the container is undone. A failed removal may be retried.
    pub fn remove(
        &self,
        id: &str,
        forget_processes: impl FnOnce(&str) -> usize,
    ) -> Result<(), AgentError> {
        let c = self.get(id)?;
        let mut st = c.state();
        if matches!(st.phase, Phase::Gone | Phase::Creating) {
            return Err(AgentError::ContainerNotFound(id.to_string()));
        }
        st.phase = Phase::Removing;
        st.pid_init = None;
        let forgotten = forget_processes(id);
        self.teardown(&c)
            .map_err(|e| guest_err(format!("remove container {id:?}: {e}")))?;
        st.phase = Phase::Gone;
        self.table().remove(id);
        log_info!("container {id} removed ({forgotten} process(es) forgotten)");
        Ok(())
    }

    /// UpdateContainer.
    pub fn update(&self, id: &str, resources: &Resources) -> Result<(), AgentError> {
        spec::validate_resources(resources).map_err(AgentError::InvalidArgument)?;
        self.with_ready(id, |c, _| {
            c.cgroup
                .apply(resources)
                .map_err(|e| guest_err(format!("update container {id:?}: {e}")))
        })
    }

    /// FreezeContainer.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), AgentError> {
        self.with_ready(id, |c, st| {
            let done = c.cgroup.freeze(frozen, FREEZE_TIMEOUT);
            // What the cgroup was told, even if it has not got there yet.
            st.frozen = c
                .cgroup
                .read("cgroup.freeze")
                .map_or(frozen, |s| s.trim() == "1");
            let verb = if frozen { "freeze" } else { "thaw" };
            done.map_err(|e| guest_err(format!("{verb} container {id:?}: {e}")))
        })
    }

    /// ContainerStats.
    pub fn stats(&self, id: &str) -> Result<Stats, AgentError> {
        self.with_ready(id, |c, _| {
            c.cgroup
                .stats(realtime_ns())
                .map_err(|e| guest_err(format!("stats of container {id:?}: {e}")))
        })
    }

    /// ListPids.
    pub fn pids(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        self.with_ready(id, |c, _| {
            c.cgroup
                .pids()
                .map_err(|e| guest_err(format!("pids of container {id:?}: {e}")))
        })
    }

    /// WaitOom: the next unreported OOM kill, while `keep_waiting`.
    pub fn wait_oom(&self, keep_waiting: impl Fn() -> bool) -> Option<String> {
        self.oom.wait(keep_waiting)
    }

    /// Wakes WaitOom calls so those whose connection closed give up.
    pub fn wake_oom_waiters(&self) {
        self.oom.wake_all();
    }

    /// Puts back an OOM kill whose report could not be sent.
    pub fn requeue_oom(&self, container: String) {
        self.oom.requeue(container);
    }

    /// Removes every container (host-test shutdown) and, in host-test
    /// mode, the cgroup made for them.
    pub fn remove_all(&self, forget_processes: impl Fn(&str) -> usize) {
        let ids: Vec<String> = self.table().keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove(&id, &forget_processes) {
                log_error!("{e}");
            }
        }
        if self.layout.cgroup_mount.is_some() && self.layout.cgroup_parent.exists() {
            let _ = std::fs::remove_dir(&self.layout.cgroup_parent);
        }
    }
}

/// Writes each sysctl, remembering the old value; on a failure restores
/// the ones written and says which failed.
fn apply_sysctls(
    proc_sys: &Path,
    sysctls: &[SysctlPlan],
) -> Result<Vec<(PathBuf, String)>, String> {
    let mut applied = Vec::new();
    for s in sysctls {
        let path = proc_sys.join(&s.path);
        let result = std::fs::read_to_string(&path).and_then(|old| {
            write_value(&path, &s.value)?;
            Ok(old)
        });
        match result {
            Ok(old) => applied.push((path, old)),
            Err(e) => {
                restore_sysctls(&applied);
                return Err(format!("sysctl {} = {:?}: {e}", s.key, s.value));
            }
        }
    }
    Ok(applied)
}

fn restore_sysctls(applied: &[(PathBuf, String)]) {
    for (path, old) in applied.iter().rev() {
        if let Err(e) = write_value(path, old.trim_end_matches('\n')) {
            log_error!("restoring {}: {e}", path.display());
        }
    }
}

/// One write, no create (O_TRUNC, as runc opens them, changes nothing in
/// /proc/sys, and makes the host tests' plain files behave alike).
fn write_value(path: &Path, value: &str) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::options()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(value.as_bytes())
}

/// CLOCK_REALTIME in ns since the epoch.
fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into our local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Evicts the guest's unused dentries and inodes, so that FUSE forgets
/// those of a removed container's rootfs: until then the VMM holds a
/// handle on each, which keeps the host's (already unmounted) overlay of
/// the container alive. Other containers only lose cache.
fn release_share_inodes() {
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "2") {
        log_info!("dropping the guest's dentry cache: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::Supervisor;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("arrow-ctr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sysctls_are_written_and_restored_on_failure() {
        let dir = temp("sysctl");
        std::fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        std::fs::write(dir.join("net/ipv4/ip_forward"), "0\n").unwrap();
        std::fs::write(dir.join("kernel_x"), "5\n").unwrap();
        let plan = |key: &str, value: &str| SysctlPlan {
            key: key.into(),
            path: key.split('.').collect(),
            value: value.into(),
        };
        let ok = [plan("net.ipv4.ip_forward", "1"), plan("kernel_x", "6")];
        let applied = apply_sysctls(&dir, &ok).unwrap();
        assert_eq!(applied.len(), 2);
        assert_eq!(
            std::fs::read_to_string(dir.join("net/ipv4/ip_forward")).unwrap(),
            "1"
        );
        restore_sysctls(&applied);
        assert_eq!(
            std::fs::read_to_string(dir.join("net/ipv4/ip_forward")).unwrap(),
            "0"
        );
        assert_eq!(std::fs::read_to_string(dir.join("kernel_x")).unwrap(), "5");

        let bad = [plan("kernel_x", "7"), plan("net.nope", "1")];
        let err = apply_sysctls(&dir, &bad).unwrap_err();
        assert!(err.contains("net.nope"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("kernel_x")).unwrap(), "5");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unavailable_layout_refuses_after_validation() {
        let mut layout = Layout::guest();
        layout.unavailable = Some("not here".into());
        let containers = Containers::new(layout);
        let platform = crate::clone::RecordingPlatform::new(1, "t");
        let bad = CreateContainer::default();
        assert!(matches!(
            containers.create(&bad, &platform),
            Err(AgentError::InvalidArgument(_))
        ));
        let ok = CreateContainer {
            id: "c".into(),
            rootfs: "c/rootfs".into(),
            ..Default::default()
        };
        let err = containers.create(&ok, &platform).unwrap_err();
        assert!(err.to_string().contains("not here"));
        let null = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .unwrap();
        let sup = Supervisor::new(crate::reaper::Reaper::start().unwrap(), null.into());
        assert!(matches!(
            containers.remove("c", |id| sup.forget_container(id)),
            Err(AgentError::ContainerNotFound(_))
        ));
        assert!(matches!(
            containers.stats("c"),
            Err(AgentError::ContainerNotFound(_))
        ));
    }
}
