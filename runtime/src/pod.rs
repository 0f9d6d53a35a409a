//! The pod: one microVM and the containers and processes in it, with the
//! lifecycle every front door drives (create, start, exec, signal, wait,
//! delete, state, stats), in the runtime's own request, state, error and
//! event types.
//!
//! The pod's sandbox container *is* the VM: creating it starts the VM, its
//! pid is the VMM's, killing it stops the VM, and no pause process runs in
//! the guest (a VM holds the pod's namespaces by itself). App containers
//! are created in that VM through the agent. A container with no pod around
//! it (`ctr run`) gets a VM of its own, stopped when it is deleted.
//!
//! Every pid reported is the VMM's host pid (as Kata does): a guest pid
//! means nothing on the host, and the guest chooses it.
//!
//! No lock is held across a VM's boot or an agent call that creates
//! something: an id is claimed under the pod's lock (`creating`), the work
//! is done without it, and the result recorded under it again, so state,
//! stats, kill and the like are answered meanwhile.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use oci_spec::runtime::Spec;
use proto::agent::StreamKind;
use proto::client::{AgentClient, ClientError};
use tokio::sync::Mutex;

use crate::cgroup::CgroupPath;
use crate::error::{ErrorKind, Result, RuntimeError};
use crate::events::{self, EventSender, PodEvent};
use crate::exits::ChildExits;
use crate::network::{self, GuestNetwork, PodNetworkMode};
use crate::oom::{self, OomFilter, OomSink, OOM_MIN_INTERVAL};
use crate::port_forward::Loopback;
use crate::process::{Exit, Process, ProcessState, StdioPaths};
use crate::share::{ContainerShare, RootfsMount};
use crate::spec::{self, PodVmSize, Role};
use crate::stdio::{self, Sink};
use crate::vm::{self, PodDir, PodVm, VmNic};

/// A container to create: its OCI bundle (whose `config.json` says what
/// it is: a pod's sandbox, a member of one, or a container on its own),
/// its root filesystem mounts, and where its init process's stdio goes.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    pub id: String,
    pub bundle: String,
    pub rootfs: Vec<RootfsMount>,
    pub stdio: StdioPaths,
}

/// A process to add to a running container: an OCI `process` (JSON).
#[derive(Clone, Debug, Default)]
pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    pub process_json: Vec<u8>,
    pub stdio: StdioPaths,
}

/// What a process looks like now. `id` is the exec id, or the container
/// id for its init process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessStatus {
    pub id: String,
    pub bundle: String,
    pub pid: u32,
    pub state: ProcessState,
    pub stdio: StdioPaths,
    pub exit: Option<Exit>,
}

/// What a deleted process left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub pid: u32,
    pub exit: Option<Exit>,
}

/// A container of the pod.
struct Container {
    bundle: String,
    role: Role,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    share: Option<ContainerShare>,
}

/// Everything one runtime runs: one pod (one VM) and its containers.
#[derive(Default)]
struct Pod {
    vm: Option<Arc<PodVm>>,
    /// The signal the sandbox was killed with, for its exit status.
    stop_signal: Option<u32>,
    /// The sandbox spec's sysctls, applied with each app container's.
    sysctls: Vec<proto::agent::Sysctl>,
    containers: HashMap<String, Container>,
    /// Containers being created: their ids are taken, and the pod's lock
    /// is not held while their VM boots or the guest creates them.
    creating: HashSet<String>,
    /// A sandbox's or standalone container's VM is starting.
    vm_starting: bool,
}

impl Pod {
    fn container(&self, id: &str) -> Result<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| RuntimeError::not_found(format!("container {id} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| RuntimeError::not_found(format!("exec {exec_id} of {id} not found")))
    }

    fn vm(&self) -> Result<Arc<PodVm>> {
        self.vm
            .clone()
            .ok_or_else(|| RuntimeError::precondition("the pod's VM is not running"))
    }
}

/// Runs a blocking agent call off the async runtime.
async fn call<T, F>(agent: Arc<AgentClient>, context: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&AgentClient) -> std::result::Result<T, ClientError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&agent)).await {
        Ok(result) => result.map_err(|e| RuntimeError::agent(context, e)),
        Err(e) => Err(RuntimeError::internal(format!("{context}: {e}"))),
    }
}

/// Runs blocking host work (mounts, netlink) off the async runtime.
async fn blocking<T, E, F>(context: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: FnOnce() -> std::result::Result<T, E> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| RuntimeError::internal(format!("{context}: {e}"))),
        Err(e) => Err(RuntimeError::internal(format!("{context}: {e}"))),
    }
}

/// The pod runtime of one pod. Cheap to clone: clones share the pod.
#[derive(Clone)]
pub struct PodRuntime {
    pod: Arc<Mutex<Pod>>,
    events: EventSender,
    namespace: String,
    exits: Arc<dyn ChildExits>,
    /// The VMM binary, if not [`vm::vmm_binary`]'s.
    vmm: Option<PathBuf>,
}

impl PodRuntime {
    /// A runtime for a pod of `namespace` (the front door's namespace,
    /// part of the pod's state directory). Its events go to `events`; the
    /// exits of the children it spawns come from `exits`.
    pub fn new(namespace: &str, events: EventSender, exits: Arc<dyn ChildExits>) -> Self {
        PodRuntime {
            pod: Arc::new(Mutex::new(Pod::default())),
            events,
            namespace: namespace.to_string(),
            exits,
            vmm: None,
        }
    }

    /// Runs `vmm` as each VM's VMM instead of `arrow-vmm`: anything that
    /// keeps its contract (command line, control channel, hybrid vsock).
    /// The runtime's tests run pods without KVM this way, with a stand-in
    /// that serves arrow-init on the host (`tests/support/test_vmm.rs`).
    pub fn with_vmm(mut self, vmm: PathBuf) -> Self {
        self.vmm = Some(vmm);
        self
    }

    fn send(&self, event: PodEvent) {
        events::send(&self.events, event);
    }

    fn send_exit(&self, p: &Process, exit: Exit) {
        self.send(PodEvent::Exited {
            container_id: p.container_id.clone(),
            id: p.event_id().to_string(),
            pid: p.pid(),
            exit,
        });
    }

    /// Creates a container; its pid (the VMM's for a sandbox; 0 for an
    /// app container until it starts: containerd's client deletes a
    /// created task only when its pid is 0).
    pub async fn create(&self, req: CreateRequest) -> Result<u32> {
        let begun = std::time::Instant::now();
        let spec = load_spec(&req.bundle)?;
        let role = Role::of(&req.id, &spec).map_err(|e| RuntimeError::invalid(e.to_string()))?;
        // Claimed under the lock, created without it.
        let member_of = {
            let mut pod = self.pod.lock().await;
            if pod.containers.contains_key(&req.id) || pod.creating.contains(&req.id) {
                return Err(RuntimeError::new(
                    ErrorKind::AlreadyExists,
                    format!("container {} already exists", req.id),
                ));
            }
            let member_of = match &role {
                Role::Sandbox | Role::Standalone => {
                    if pod.vm.is_some() || pod.vm_starting {
                        return Err(RuntimeError::new(
                            ErrorKind::AlreadyExists,
                            if role == Role::Sandbox {
                                "this shim already runs a pod VM"
                            } else {
                                "this shim already runs a VM; a standalone container needs its own"
                            },
                        ));
                    }
                    pod.vm_starting = true;
                    None
                }
                Role::PodMember { sandbox_id } => {
                    let vm = pod.vm().map_err(|_| {
                        RuntimeError::precondition(format!(
                            "pod sandbox {sandbox_id} is not running in this shim"
                        ))
                    })?;
                    Some((vm, pod.sysctls.clone()))
                }
            };
            pod.creating.insert(req.id.clone());
            member_of
        };
        log::info!("create {} ({role:?})", req.id);
        let created = self.create_unlocked(&req, &spec, &role, member_of).await;
        let mut pod = self.pod.lock().await;
        pod.creating.remove(&req.id);
        if matches!(role, Role::Sandbox | Role::Standalone) {
            pod.vm_starting = false;
        }
        let (vm, share, init) = created?;
        if role == Role::Sandbox {
            pod.sysctls = spec::sysctls(&spec);
        }
        if let Role::PodMember { sandbox_id } = &role {
            // The sandbox may have been deleted meanwhile: its VM is gone,
            // and the container with it (its share is unmounted on drop).
            if !pod.vm.as_ref().is_some_and(|v| Arc::ptr_eq(v, &vm)) {
                return Err(RuntimeError::precondition(format!(
                    "pod sandbox {sandbox_id} ended while {} was created",
                    req.id
                )));
            }
        }
        let pid = init.pid();
        log::info!(
            "create {} done in {} ms",
            req.id,
            begun.elapsed().as_millis()
        );
        pod.vm = Some(vm);
        pod.containers.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                role,
                init,
                execs: HashMap::new(),
                share,
            },
        );
        drop(pod);
        self.send(PodEvent::Created {
            container_id: req.id,
            bundle: req.bundle,
            rootfs: req.rootfs,
            stdio: req.stdio,
            pid,
        });
        Ok(pid)
    }

    /// Starts a container's init process (`exec_id` empty) or an exec;
    /// the pid reported for it.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (vm, process, role) = {
            let pod = self.pod.lock().await;
            let c = pod.container(id)?;
            (pod.vm()?, pod.process(id, exec_id)?, c.role.clone())
        };
        if process.state() != ProcessState::Created {
            return Err(RuntimeError::precondition(format!(
                "{} is not in the created state",
                process.event_id()
            )));
        }
        let started_at = std::time::Instant::now();
        let pid = vm.pid();
        let is_vm = role == Role::Sandbox && exec_id.is_empty();
        if is_vm {
            log::info!("start {id}: the VM, pid {pid}");
        } else {
            let agent_id = process.agent_id.clone();
            let guest_pid = call(vm.agent(), "starting the process", move |a| {
                a.start_process(&agent_id)
            })
            .await?;
            log::info!(
                "start {id} {exec_id}: guest pid {guest_pid} (reported as the VMM's, {pid}) in {} ms",
                started_at.elapsed().as_millis()
            );
        }
        process.set_running(pid);
        if !is_vm {
            self.follow_process(vm, process.clone());
        }
        if exec_id.is_empty() {
            self.send(PodEvent::Started {
                container_id: id.to_string(),
                pid,
            });
        } else {
            self.send(PodEvent::ExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid,
            });
        }
        Ok(pid)
    }

    /// Deletes a stopped container (all of the pod with its sandbox) or
    /// exec.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted> {
        let mut pod = self.pod.lock().await;
        let process = if exec_id.is_empty() {
            self.delete_container(&mut pod, id).await?
        } else {
            let process = pod.process(id, exec_id)?;
            if matches!(
                process.state(),
                ProcessState::Running | ProcessState::Paused
            ) {
                return Err(RuntimeError::precondition(format!(
                    "exec {exec_id} is still running"
                )));
            }
            if let Ok(vm) = pod.vm() {
                if !vm.has_exited() {
                    let agent_id = process.agent_id.clone();
                    let _ = call(vm.agent(), "delete", move |a| a.delete_process(&agent_id)).await;
                }
            }
            if let Some(c) = pod.containers.get_mut(id) {
                c.execs.remove(exec_id);
            }
            process.set_exited(137);
            process
        };
        Ok(Deleted {
            pid: process.pid(),
            exit: process.exit(),
        })
    }

    /// The host pids of a container's processes: all of them run in the
    /// VM, so on the host they are the VMM (the guest's own pids are the
    /// guest's word and mean nothing here).
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let pod = self.pod.lock().await;
        pod.container(id)?;
        Ok(vec![pod.vm()?.pid()])
    }

    /// Freezes an app container (as runc freezes its cgroup).
    pub async fn pause(&self, id: &str) -> Result<()> {
        self.freeze(id, true).await?;
        self.send(PodEvent::Paused {
            container_id: id.to_string(),
        });
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.freeze(id, false).await?;
        self.send(PodEvent::Resumed {
            container_id: id.to_string(),
        });
        Ok(())
    }

    /// Sends `signal` to a process (`all`: every process of the
    /// container). Any signal to the sandbox stops the VM.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let mut pod = self.pod.lock().await;
        let role = pod.container(id)?.role.clone();
        let process = pod.process(id, exec_id)?;
        if signal > 64 {
            return Err(RuntimeError::invalid(format!("bad signal {signal}")));
        }
        let finished = || RuntimeError::not_found("process already finished");
        if role == Role::Sandbox && exec_id.is_empty() {
            if process.state() == ProcessState::Stopped {
                return Err(finished());
            }
            if signal == 0 {
                return Ok(());
            }
            pod.stop_signal.get_or_insert(signal);
            if let Some(vm) = pod.vm.clone() {
                if process.state() == ProcessState::Created {
                    // Never started: an exit is still expected.
                    process.set_running(vm.pid());
                }
                tokio::spawn(async move {
                    vm.stop().await;
                });
            }
            return Ok(());
        }
        let vm = pod.vm()?;
        drop(pod);
        match process.state() {
            ProcessState::Stopped => Err(finished()),
            ProcessState::Created => {
                if signal == 0 {
                    return Ok(());
                }
                // Never executed: it "dies" of the signal, as runc's
                // waiting init would.
                let agent_id = process.agent_id.clone();
                let _ = call(vm.agent(), "delete", move |a| a.delete_process(&agent_id)).await;
                if process.set_exited(128 + signal) {
                    if let Some(exit) = process.exit() {
                        self.send_exit(&process, exit);
                    }
                }
                Ok(())
            }
            ProcessState::Running | ProcessState::Paused => {
                let agent_id = process.agent_id.clone();
                // containerd SIGKILLs an exec whose ExecSync timed out: its
                // whole process group goes (the guest makes each process a
                // session and group leader), so nothing it started outlives
                // the request, as nothing outlives runc's exec.
                let group = all || (!exec_id.is_empty() && signal == libc::SIGKILL as u32);
                call(vm.agent(), "signalling the process", move |a| {
                    a.signal(&agent_id, signal as i32, group)
                })
                .await
                .map_err(|e| match e.kind {
                    ErrorKind::NotFound => finished(),
                    _ => e,
                })?;
                if all && exec_id.is_empty() {
                    self.signal_execs(&vm, id, signal, false).await;
                }
                Ok(())
            }
        }
    }

    /// Adds an exec process to a running app container (not started yet).
    pub async fn exec(&self, req: ExecRequest) -> Result<()> {
        let id = &req.container_id;
        let (vm, container_init) = {
            let pod = self.pod.lock().await;
            let c = pod.container(id)?;
            if c.role == Role::Sandbox {
                return Err(RuntimeError::precondition(
                    "the pod sandbox is the VM itself; exec into an app container",
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(RuntimeError::new(
                    ErrorKind::AlreadyExists,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            (pod.vm()?, c.init.clone())
        };
        if container_init.state() != ProcessState::Running {
            return Err(RuntimeError::precondition(format!(
                "container {id} is not running"
            )));
        }
        let process_spec = spec::parse_process(&req.process_json)
            .map_err(|e| RuntimeError::invalid(format!("exec process spec: {e}")))?;
        let agent_id = format!("{id}.exec.{}", req.exec_id);
        let request =
            spec::process_request(&agent_id, id, &process_spec, !req.stdio.stdin.is_empty())
                .map_err(|e| RuntimeError::invalid(e.to_string()))?;
        let process = Arc::new(Process::new(id, &req.exec_id, &agent_id, req.stdio));
        self.prepare_process(&vm, &process, request).await?;
        {
            let mut pod = self.pod.lock().await;
            match pod.containers.get_mut(id) {
                Some(c) => {
                    c.execs.insert(req.exec_id.clone(), process);
                }
                None => {
                    return Err(RuntimeError::not_found(format!(
                        "container {id} was deleted meanwhile"
                    )))
                }
            }
        }
        self.send(PodEvent::ExecAdded {
            container_id: req.container_id,
            exec_id: req.exec_id,
        });
        Ok(())
    }

    /// Resizes a process's terminal.
    pub async fn resize_pty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let (vm, process) = {
            let pod = self.pod.lock().await;
            (pod.vm()?, pod.process(id, exec_id)?)
        };
        if process.agent_id.is_empty() {
            return Err(RuntimeError::precondition("the sandbox has no terminal"));
        }
        let agent_id = process.agent_id.clone();
        call(vm.agent(), "resizing the terminal", move |a| {
            a.resize_tty(&agent_id, rows, cols)
        })
        .await
    }

    /// Gives a process EOF on stdin once what was written reached it.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let process = self.pod.lock().await.process(id, exec_id)?;
        process.stdin_close.request();
        Ok(())
    }

    /// Applies new resources (OCI `linux.resources`, JSON) to a container.
    pub async fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        let (vm, role) = {
            let pod = self.pod.lock().await;
            (pod.vm()?, pod.container(id)?.role.clone())
        };
        let resources = spec::parse_resources(resources_json)
            .map_err(|e| RuntimeError::invalid(format!("resources: {e}")))?;
        if role == Role::Sandbox {
            // The VM's size is fixed at its start; the pod's containers
            // carry the limits.
            log::warn!("update of the sandbox's resources ignored: the VM keeps its size");
            return Ok(());
        }
        let mut warnings = Vec::new();
        let request = spec::resources_request(&resources, &mut warnings);
        for w in warnings {
            log::warn!("update {id}: {w}");
        }
        let cid = id.to_string();
        call(vm.agent(), "updating resources", move |a| {
            a.update_container(&cid, request)
        })
        .await
    }

    /// Waits for a process's exit.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit> {
        let process = self.pod.lock().await.process(id, exec_id)?;
        Ok(process.wait().await)
    }

    /// The guest's cgroup figures of a container; for the sandbox, of
    /// every app container of the pod.
    pub async fn stats(&self, id: &str) -> Result<Vec<proto::agent::Stats>> {
        let (vm, ids) = {
            let pod = self.pod.lock().await;
            let c = pod.container(id)?;
            let ids: Vec<String> = if c.role == Role::Sandbox {
                pod.containers
                    .iter()
                    .filter(|(_, c)| c.role != Role::Sandbox)
                    .map(|(id, _)| id.clone())
                    .collect()
            } else {
                vec![id.to_string()]
            };
            (pod.vm()?, ids)
        };
        let mut all = Vec::new();
        for cid in ids {
            let asked = cid.clone();
            match call(vm.agent(), "reading stats", move |a| {
                a.container_stats(&asked)
            })
            .await
            {
                Ok(s) => all.push(s),
                Err(e) if all.is_empty() && cid == id => return Err(e),
                Err(e) => log::debug!("stats of {cid}: {e}"),
            }
        }
        Ok(all)
    }

    /// The pid of a container's init process, 0 if there is none.
    pub async fn init_pid(&self, id: &str) -> u32 {
        let pod = self.pod.lock().await;
        pod.container(id).map(|c| c.init.pid()).unwrap_or(0)
    }

    /// Ends the pod if nothing is left in it: true if the front door may
    /// exit now (its VM, if any, is killed).
    pub async fn shutdown(&self) -> bool {
        let pod = self.pod.lock().await;
        if !pod.containers.is_empty() || !pod.creating.is_empty() {
            return false;
        }
        if let Some(vm) = &pod.vm {
            vm.kill();
        }
        true
    }

    /// A process's state.
    pub async fn state(&self, id: &str, exec_id: &str) -> Result<ProcessStatus> {
        let pod = self.pod.lock().await;
        let bundle = pod.container(id)?.bundle.clone();
        let p = pod.process(id, exec_id)?;
        Ok(ProcessStatus {
            id: p.event_id().to_string(),
            bundle,
            pid: p.pid(),
            state: p.state(),
            stdio: p.stdio.clone(),
            exit: p.exit(),
        })
    }

    /// Starts the pod's VM and the tasks that follow it: its exit, and OOM
    /// kills in the guest. A spec with a network namespace path (CNI ran
    /// there) gets its network joined to the guest's NIC first, and the
    /// guest configured once it is up; without one the guest has only `lo`.
    async fn start_vm(&self, pod_id: &str, spec: &Spec, role: &Role) -> Result<Arc<PodVm>> {
        spec::refuse_host_namespaces(spec).map_err(|e| RuntimeError::invalid(e.to_string()))?;
        let shape =
            PodVmSize::for_spec(spec, role).map_err(|e| RuntimeError::invalid(e.to_string()))?;
        let hostname = spec.hostname().clone().unwrap_or_default();
        let dir = PodDir::new(&self.namespace, pod_id)
            .map_err(|e| RuntimeError::invalid(e.to_string()))?;
        let cgroup = pod_cgroup(pod_id, spec)?;
        let vmm = match &self.vmm {
            Some(path) => path.clone(),
            None => vm::vmm_binary().map_err(|e| RuntimeError::internal(e.to_string()))?,
        };
        let (nic, guest_net) = match PodNetworkMode::of(spec) {
            PodNetworkMode::Namespace(netns) => {
                let path = netns.clone();
                let net = tokio::task::spawn_blocking(move || network::set_up(&path))
                    .await
                    .map_err(|e| RuntimeError::internal(e.to_string()))?
                    .map_err(|e| {
                        let kind = match e {
                            network::NetworkError::HostNetns(_)
                            | network::NetworkError::NotNetns(_) => ErrorKind::InvalidArgument,
                            _ => ErrorKind::Internal,
                        };
                        RuntimeError::new(kind, format!("pod network: {e}"))
                    })?;
                log::info!(
                    "pod {pod_id}: guest NIC joined to {} in {} (MAC {}, MTU {})",
                    net.interface,
                    netns.display(),
                    network::format_mac(&net.guest.mac),
                    net.guest.mtu
                );
                let nic = VmNic {
                    tap: net.tap,
                    mtu: net.guest.mtu,
                    netns,
                };
                (Some(nic), Some(net.guest))
            }
            PodNetworkMode::NoNic => {
                log::warn!(
                    "pod {pod_id}: the spec names no network namespace path (a new empty \
                     one): the guest gets no NIC, only lo"
                );
                (None, None)
            }
        };
        let netns = nic.as_ref().map(|n| n.netns.clone());
        let started = PodVm::start(
            &vmm,
            dir.clone(),
            shape,
            &hostname,
            nic,
            cgroup.as_ref(),
            self.exits.as_ref(),
        )
        .await;
        let vm = match started {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                if let Some(netns) = netns {
                    tear_down_network(netns).await;
                }
                if let Err(clean) = dir.clean_up() {
                    log::warn!(
                        "cleaning {} after a failed start: {clean}",
                        dir.root().display()
                    );
                }
                return Err(RuntimeError::internal(format!("starting the pod VM: {e}")));
            }
        };
        if let Some(guest) = guest_net {
            if let Err(e) = configure_guest_network(&vm, &guest, pod_id).await {
                stop_and_clean(&vm).await;
                return Err(e);
            }
        }
        if let Some(netns) = vm.netns() {
            // The pod works without it; only port-forward would not.
            let served = match Loopback::listen(netns, self.exits.as_ref()).await {
                Ok(loopback) => loopback.serve(&vm, pod_id),
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                log::warn!("pod {pod_id}: no port-forward: {e}");
            }
        }
        let this = self.clone();
        let watched = vm.clone();
        tokio::spawn(async move { this.follow_vm(watched).await });
        let filter = OomFilter::new(OOM_MIN_INTERVAL);
        tokio::spawn(oom::follow(vm.agent(), filter, self.clone()));
        Ok(vm)
    }

    /// When the VMM exits, every process still running in it has ended,
    /// and the runtime's connections into it end too. Its network goes
    /// first, so whoever sees the exit (containerd then runs CNI DEL) finds
    /// the namespace as CNI left it.
    async fn follow_vm(&self, vm: Arc<PodVm>) {
        let code = vm.wait().await;
        vm.end_connections();
        if let Some(netns) = vm.netns() {
            tear_down_network(netns.to_path_buf()).await;
        }
        let mut ended = Vec::new();
        {
            let pod = self.pod.lock().await;
            let same_vm = pod.vm.as_ref().is_some_and(|v| Arc::ptr_eq(v, &vm));
            if !same_vm {
                return;
            }
            let sandbox_status = pod.stop_signal.map(|s| 128 + s).unwrap_or(code as u32);
            if code != 0 && pod.stop_signal.is_none() {
                log::error!("the pod VM (arrow-vmm pid {}) exited with {code}", vm.pid());
            }
            for c in pod.containers.values() {
                let status = if c.role == Role::Sandbox {
                    sandbox_status
                } else {
                    137
                };
                for p in std::iter::once(&c.init).chain(c.execs.values()) {
                    if p.state() != ProcessState::Stopped && p.set_exited(status) {
                        ended.push(p.clone());
                    }
                }
            }
        }
        for p in ended {
            if let Some(exit) = p.exit() {
                self.send_exit(&p, exit);
            }
        }
    }

    /// The part of `create` that runs without the pod's lock: the VM's
    /// start for a sandbox or a standalone container, the container in the
    /// guest for an app (`member_of`: the pod's VM and sysctls).
    async fn create_unlocked(
        &self,
        req: &CreateRequest,
        spec: &Spec,
        role: &Role,
        member_of: Option<(Arc<PodVm>, Vec<proto::agent::Sysctl>)>,
    ) -> Result<(Arc<PodVm>, Option<ContainerShare>, Arc<Process>)> {
        match (role, member_of) {
            (Role::Sandbox, _) => {
                let vm = self.start_vm(&req.id, spec, role).await?;
                let init = Arc::new(Process::new(&req.id, "", "", StdioPaths::default()));
                init.set_pid(vm.pid());
                Ok((vm, None, init))
            }
            (Role::Standalone, _) => {
                let vm = self.start_vm(&req.id, spec, role).await?;
                match self.create_app(&vm, req, spec, &[]).await {
                    Ok((share, init)) => Ok((vm, Some(share), init)),
                    Err(e) => {
                        stop_and_clean(&vm).await;
                        Err(e)
                    }
                }
            }
            (Role::PodMember { .. }, Some((vm, sysctls))) => {
                let (share, init) = self.create_app(&vm, req, spec, &sysctls).await?;
                Ok((vm, Some(share), init))
            }
            (Role::PodMember { sandbox_id }, None) => Err(RuntimeError::precondition(format!(
                "pod sandbox {sandbox_id} is not running in this shim"
            ))),
        }
    }

    /// Creates an app container in the pod's VM: shares its files, has the
    /// guest assemble it, prepares its init process and stdio.
    async fn create_app(
        &self,
        vm: &Arc<PodVm>,
        req: &CreateRequest,
        spec: &Spec,
        pod_sysctls: &[proto::agent::Sysctl],
    ) -> Result<(ContainerShare, Arc<Process>)> {
        let id = req.id.clone();
        let mut plan =
            spec::plan_container(&id, spec).map_err(|e| RuntimeError::invalid(e.to_string()))?;
        spec::merge_pod_sysctls(pod_sysctls, &mut plan.request.sysctls);
        for w in &plan.warnings {
            log::warn!("container {id}: {w}");
        }
        let process_spec = spec
            .process()
            .as_ref()
            .ok_or_else(|| RuntimeError::invalid(spec::SpecError::NoProcess.to_string()))?;
        let create_process =
            spec::process_request(&id, &id, process_spec, !req.stdio.stdin.is_empty())
                .map_err(|e| RuntimeError::invalid(e.to_string()))?;
        let bundle_rootfs = spec
            .root()
            .as_ref()
            .map(|r| Path::new(&req.bundle).join(r.path()))
            .unwrap_or_else(|| PathBuf::from(&req.bundle).join("rootfs"));
        let pod_share = vm.dir().share();
        let (rootfs, binds, share_id) = (req.rootfs.clone(), plan.binds.clone(), id.clone());
        let share = blocking("sharing the rootfs", move || {
            pod_share.add_container(&share_id, &rootfs, &bundle_rootfs, &binds)
        })
        .await?;

        let request = plan.request;
        call(
            vm.agent(),
            "creating the container in the guest",
            move |a| a.create_container(request),
        )
        .await?;
        // No pid until started.
        let process = Arc::new(Process::new(&id, "", &id, req.stdio.clone()));
        if let Err(e) = self.prepare_process(vm, &process, create_process).await {
            let rid = id.clone();
            let _ = call(vm.agent(), "undo", move |a| a.remove_container(&rid)).await;
            return Err(e);
        }
        Ok((share, process))
    }

    /// Creates `process` in the agent and attaches its stdio.
    async fn prepare_process(
        &self,
        vm: &Arc<PodVm>,
        process: &Arc<Process>,
        mut request: proto::agent::CreateProcess,
    ) -> Result<()> {
        let stdout =
            Sink::parse(&process.stdio.stdout).map_err(|e| RuntimeError::invalid(e.to_string()))?;
        let stderr =
            Sink::parse(&process.stdio.stderr).map_err(|e| RuntimeError::invalid(e.to_string()))?;
        request.terminal = process.stdio.terminal;
        request.stdin = !process.stdio.stdin.is_empty();
        call(vm.agent(), "creating the process in the guest", move |a| {
            a.create_process(request)
        })
        .await?;
        let attached = attach_stdio(vm, process, stdout, stderr).await;
        if attached.is_err() {
            let agent_id = process.agent_id.clone();
            let _ = call(vm.agent(), "undo", move |a| a.delete_process(&agent_id)).await;
        }
        attached
    }

    /// Waits for a started guest process, then sends its exit.
    fn follow_process(&self, vm: Arc<PodVm>, process: Arc<Process>) {
        let this = self.clone();
        tokio::spawn(async move {
            let agent = vm.agent();
            let agent_id = process.agent_id.clone();
            let status = match tokio::task::spawn_blocking(move || agent.wait(&agent_id)).await {
                Ok(Ok(exited)) => Exit::from_guest(exited.exit_code, exited.signal),
                Ok(Err(e)) => {
                    log::warn!("waiting for {}: {e}", process.agent_id);
                    137
                }
                Err(e) => {
                    log::warn!("waiting for {}: {e}", process.agent_id);
                    137
                }
            };
            process.drain_outputs().await;
            if process.set_exited(status) {
                if let Some(exit) = process.exit() {
                    this.send_exit(&process, exit);
                }
            }
            if process.exec_id.is_empty() {
                // A container's execs go with its init process (as they
                // do when runc's PID namespace ends).
                this.signal_execs(&vm, &process.container_id, libc::SIGKILL as u32, true)
                    .await;
            }
        });
    }

    /// Signals every exec of a container that runs (`paused_too`: or is
    /// frozen), with its process group.
    async fn signal_execs(
        &self,
        vm: &Arc<PodVm>,
        container_id: &str,
        signal: u32,
        paused_too: bool,
    ) {
        let execs: Vec<Arc<Process>> = {
            let pod = self.pod.lock().await;
            match pod.containers.get(container_id) {
                Some(c) => c.execs.values().cloned().collect(),
                None => return,
            }
        };
        for p in execs {
            let state = p.state();
            if state == ProcessState::Running || (paused_too && state == ProcessState::Paused) {
                let id = p.agent_id.clone();
                let _ = call(vm.agent(), "signal exec", move |a| {
                    a.signal(&id, signal as i32, true)
                })
                .await;
            }
        }
    }

    async fn delete_container(&self, pod: &mut Pod, id: &str) -> Result<Arc<Process>> {
        let c = pod.container(id)?;
        let init = c.init.clone();
        if matches!(init.state(), ProcessState::Running | ProcessState::Paused) {
            return Err(RuntimeError::precondition(format!(
                "container {id} is still running; kill it first"
            )));
        }
        let role = c.role.clone();
        let Some(mut c) = pod.containers.remove(id) else {
            return Err(RuntimeError::not_found(format!("container {id} not found")));
        };
        let vm = pod.vm.clone();
        if let (Some(vm), false) = (&vm, role == Role::Sandbox) {
            if !vm.has_exited() {
                let (agent_id, cid) = (init.agent_id.clone(), id.to_string());
                let _ = call(vm.agent(), "delete", move |a| a.delete_process(&agent_id)).await;
                if let Err(e) = call(vm.agent(), "removing the container", move |a| {
                    a.remove_container(&cid)
                })
                .await
                {
                    log::warn!("container {id}: {e}");
                }
            }
        }
        if let Some(share) = c.share.take() {
            blocking("unmounting the rootfs", move || share.unmount()).await?;
        }
        if init.set_exited(137) {
            if let Some(exit) = init.exit() {
                self.send_exit(&init, exit);
            }
        }
        if matches!(role, Role::Sandbox | Role::Standalone) {
            if let Some(vm) = pod.vm.take() {
                vm.stop().await;
                if let Some(netns) = vm.netns() {
                    tear_down_network(netns.to_path_buf()).await;
                }
                let dir = vm.dir().clone();
                // App containers the sandbox outlived: their shares go too.
                let rest: Vec<_> = pod.containers.drain().collect();
                drop(rest);
                blocking("cleaning the pod", move || dir.clean_up()).await?;
            }
        }
        self.send(PodEvent::Deleted {
            container_id: id.to_string(),
            pid: init.pid(),
            exit: init.exit(),
        });
        Ok(init)
    }

    async fn freeze(&self, id: &str, frozen: bool) -> Result<()> {
        let (vm, role, process) = {
            let pod = self.pod.lock().await;
            let c = pod.container(id)?;
            (pod.vm()?, c.role.clone(), c.init.clone())
        };
        if role == Role::Sandbox {
            return Err(RuntimeError::new(
                ErrorKind::Unimplemented,
                "pausing a whole pod sandbox is not supported; pause its containers",
            ));
        }
        let cid = id.to_string();
        call(vm.agent(), "freezing the container", move |a| {
            a.freeze_container(&cid, frozen)
        })
        .await?;
        process.set_paused(frozen);
        Ok(())
    }
}

/// OOM reports pass for the pod's app containers only (the sandbox is the
/// VM itself: no guest container has its id).
#[async_trait]
impl OomSink for PodRuntime {
    async fn is_ours(&self, id: &str) -> bool {
        let pod = self.pod.lock().await;
        pod.containers
            .get(id)
            .is_some_and(|c| c.role != Role::Sandbox)
    }

    async fn publish(&self, container_id: String) {
        self.send(PodEvent::OutOfMemory { container_id });
    }
}

/// Attaches the process's stdout and stderr (stdout alone for a terminal)
/// to their sinks, and its stdin to its source.
async fn attach_stdio(
    vm: &Arc<PodVm>,
    process: &Arc<Process>,
    stdout: Sink,
    stderr: Sink,
) -> Result<()> {
    let mut outputs = vec![(StreamKind::Stdout, stdout)];
    if !process.stdio.terminal {
        outputs.push((StreamKind::Stderr, stderr));
    }
    for (kind, sink) in outputs {
        let Some(file) = sink
            .open()
            .map_err(|e| RuntimeError::invalid(e.to_string()))?
        else {
            continue;
        };
        let (vm2, pid) = (vm.clone(), process.agent_id.clone());
        let stream = blocking(&format!("attaching {kind:?}"), move || {
            vm2.attach(&pid, kind)
        })
        .await?;
        let name = format!("{}/{} {kind:?}", process.container_id, process.exec_id);
        process.add_output(stdio::copy_output(stream, file, name));
    }
    if !process.stdio.stdin.is_empty() {
        let (vm2, pid) = (vm.clone(), process.agent_id.clone());
        let stream = blocking("attaching stdin", move || {
            vm2.attach(&pid, StreamKind::Stdin)
        })
        .await?;
        let _ = stdio::copy_stdin(
            PathBuf::from(&process.stdio.stdin),
            stream,
            process.stdin_close.clone(),
        );
    }
    Ok(())
}

/// Gives the guest's NIC the pod's addresses and routes, IPv6 included. A
/// guest kernel built without IPv6 (Arrow's before it had it, or a
/// custom one) refuses IPv6 with FAILED_PRECONDITION before any route is
/// added; the pod then gets IPv4 alone, and each IPv6 item left out is
/// logged. Resending is safe: the agent creates or replaces each address
/// and route.
async fn configure_guest_network(vm: &PodVm, guest: &GuestNetwork, pod_id: &str) -> Result<()> {
    const WHAT: &str = "configuring the guest network";
    let (request, _) = guest.to_request(true);
    let agent = vm.agent();
    let first = tokio::task::spawn_blocking(move || agent.configure_network(request))
        .await
        .map_err(|e| RuntimeError::internal(format!("{WHAT}: {e}")))?;
    match first {
        Ok(()) => Ok(()),
        Err(ClientError::FailedPrecondition(m)) if m.contains("no IPv6 support") => {
            let (request, left_out) = guest.to_request(false);
            for item in left_out {
                log::warn!("pod {pod_id}: {item} not configured: the guest kernel has no IPv6");
            }
            call(vm.agent(), WHAT, move |a| a.configure_network(request)).await
        }
        Err(e) => Err(RuntimeError::agent(WHAT, e)),
    }
}

/// Removes the tap and tc redirect from the pod's network namespace;
/// failures are logged (the VM is gone either way, and the namespace's own
/// removal would take the rest).
async fn tear_down_network(netns: PathBuf) {
    let path = netns.clone();
    match tokio::task::spawn_blocking(move || network::tear_down(&path)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("tearing down the network in {}: {e}", netns.display()),
        Err(e) => log::warn!("tearing down the network in {}: {e}", netns.display()),
    }
}

/// The cgroup the pod's VMM runs in: the spec's `linux.cgroupsPath`.
fn pod_cgroup(pod_id: &str, spec: &Spec) -> Result<Option<CgroupPath>> {
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref());
    let Some(path) = path.filter(|p| !p.as_os_str().is_empty()) else {
        log::warn!(
            "pod {pod_id}: the spec has no linux.cgroupsPath: arrow-vmm stays in the shim's \
             cgroup, outside the pod's limits and accounting"
        );
        return Ok(None);
    };
    let text = path
        .to_str()
        .ok_or_else(|| RuntimeError::invalid(format!("cgroupsPath {path:?} is not UTF-8")))?;
    CgroupPath::parse(text)
        .map(Some)
        .map_err(|e| RuntimeError::invalid(e.to_string()))
}

/// Stops a VM that failed to become a pod and removes what it had.
async fn stop_and_clean(vm: &PodVm) {
    vm.stop().await;
    if let Some(netns) = vm.netns() {
        tear_down_network(netns.to_path_buf()).await;
    }
    if let Err(e) = vm.dir().clean_up() {
        log::warn!("cleaning {}: {e}", vm.dir().root().display());
    }
}

/// The bundle's OCI spec.
fn load_spec(bundle: &str) -> Result<Spec> {
    let path = Path::new(bundle).join("config.json");
    Spec::load(&path)
        .map_err(|e| RuntimeError::invalid(format!("reading the OCI spec {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(linux: serde_json::Value) -> Spec {
        serde_json::from_value(serde_json::json!({ "ociVersion": "1.0.2", "linux": linux }))
            .unwrap()
    }

    #[test]
    fn the_pod_cgroup_is_the_specs_cgroups_path() {
        let spec = spec_with(serde_json::json!({
            "cgroupsPath": "kubepods-burstable-pod1.slice:cri-containerd:abc"
        }));
        assert_eq!(
            pod_cgroup("p", &spec).unwrap(),
            Some(CgroupPath::Absolute(PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-abc.scope"
            )))
        );
        assert_eq!(
            pod_cgroup("p", &spec_with(serde_json::json!({}))).unwrap(),
            None
        );
        let bad = spec_with(serde_json::json!({ "cgroupsPath": "/kubepods/../x" }));
        assert_eq!(
            pod_cgroup("p", &bad).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
    }
}
