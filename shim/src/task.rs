//! The shim v2 Task service: what containerd calls for every container and
//! exec of the pod this shim serves.
//!
//! The pod's sandbox (pause) container *is* the VM: creating it starts the
//! VM, its pid is the VMM's, killing it stops the VM, and no pause process
//! runs in the guest (a VM holds the pod's namespaces by itself). App
//! containers are created in that VM through the agent. A container with no
//! pod around it (`ctr run`) gets a VM of its own, stopped when it is
//! deleted.
//!
//! Every pid reported to containerd is the VMM's host pid (as Kata does):
//! a guest pid means nothing on the host, and the guest chooses it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    Empty, ExecProcessRequest, KillRequest, PidsRequest, PidsResponse, ResizePtyRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::monitor::{monitor_subscribe, monitor_unsubscribe};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::monitor::Topic;
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Context, Task, TtrpcContext, TtrpcResult};
use oci_spec::runtime::Spec;
use proto::agent::StreamKind;
use proto::client::{AgentClient, ClientError};
use tokio::sync::Mutex;

use crate::port_forward::Loopback;
use crate::process::{Exit, Process, StdioPaths};
use crate::reaper::ReaperExits;
use crate::stats;
use arrow_runtime::cgroup::CgroupPath;
use arrow_runtime::network::{self, GuestNetwork, PodNetworkMode};
use arrow_runtime::oom::{self, OomFilter, OomSink, OOM_MIN_INTERVAL};
use arrow_runtime::share::{ContainerShare, RootfsMount};
use arrow_runtime::spec::{self, PodVmSize, Role};
use arrow_runtime::stdio::{self, Sink};
use arrow_runtime::vm::{PodDir, PodVm, VmNic};

/// Makes containerd's port-forward (a dial to 127.0.0.1:<port> in the pod's
/// network namespace) reach the guest, for as long as the VM runs.
async fn serve_port_forward(
    vm: &Arc<PodVm>,
    netns: &Path,
    pod_id: &str,
) -> Result<(), network::NetworkError> {
    let path = netns.to_path_buf();
    // Before iptables is spawned: the reaper may be the one that sees it end.
    let mut exits = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| network::NetworkError::Thread(e.to_string()))?;
    let sub_id = exits.id;
    let loopback = tokio::task::spawn_blocking(move || Loopback::listen(&path, &mut exits)).await;
    let _ = monitor_unsubscribe(sub_id).await;
    let loopback = loopback.map_err(|e| network::NetworkError::Thread(e.to_string()))??;
    loopback.serve(vm, pod_id)
}

/// The status containerd sees for an error.
fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn agent_status(context: &str, err: ClientError) -> ttrpc::Error {
    let code = match &err {
        ClientError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        ClientError::NotFound(_) => Code::NOT_FOUND,
        ClientError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        ClientError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        ClientError::ConnectionClosed(_)
        | ClientError::Io(_)
        | ClientError::Frame(_)
        | ClientError::Unavailable(_) => Code::UNAVAILABLE,
        ClientError::Timeout { .. } => Code::DEADLINE_EXCEEDED,
        _ => Code::INTERNAL,
    };
    status(code, format!("{context}: {err}"))
}

/// Runs a blocking agent call off the async runtime.
async fn call<T, F>(agent: Arc<AgentClient>, context: &str, f: F) -> TtrpcResult<T>
where
    T: Send + 'static,
    F: FnOnce(&AgentClient) -> Result<T, ClientError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&agent)).await {
        Ok(result) => result.map_err(|e| agent_status(context, e)),
        Err(e) => Err(status(Code::INTERNAL, format!("{context}: {e}"))),
    }
}

/// Gives the guest's NIC the pod's addresses and routes, IPv6 included. A
/// guest kernel built without IPv6 (Arrow's before it had it, or a
/// custom one) refuses IPv6 with FAILED_PRECONDITION before any route is
/// added; the pod then gets IPv4 alone, and each IPv6 item left out is
/// logged. Resending is safe: the agent creates or replaces each address
/// and route.
async fn configure_guest_network(
    vm: &PodVm,
    guest: &GuestNetwork,
    pod_id: &str,
) -> TtrpcResult<()> {
    const WHAT: &str = "configuring the guest network";
    let (request, _) = guest.to_request(true);
    let agent = vm.agent();
    let first = tokio::task::spawn_blocking(move || agent.configure_network(request))
        .await
        .map_err(|e| status(Code::INTERNAL, format!("{WHAT}: {e}")))?;
    match first {
        Ok(()) => Ok(()),
        Err(ClientError::FailedPrecondition(m)) if m.contains("no IPv6 support") => {
            let (request, left_out) = guest.to_request(false);
            for item in left_out {
                log::warn!("pod {pod_id}: {item} not configured: the guest kernel has no IPv6");
            }
            call(vm.agent(), WHAT, move |a| a.configure_network(request)).await
        }
        Err(e) => Err(agent_status(WHAT, e)),
    }
}

fn timestamp(at: std::time::SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(at))
}

/// A container of the pod.
struct Container {
    bundle: String,
    role: Role,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    share: Option<ContainerShare>,
}

/// Everything this shim runs: one pod (one VM) and its containers.
#[derive(Default)]
struct Pod {
    vm: Option<Arc<PodVm>>,
    /// The signal containerd killed the sandbox with, for its exit status.
    stop_signal: Option<u32>,
    /// The sandbox spec's sysctls, applied with each app container's.
    sysctls: Vec<proto::agent::Sysctl>,
    containers: HashMap<String, Container>,
    /// Containers being created: their ids are taken, and the pod's lock
    /// is not held while their VM boots or the guest creates them, so
    /// every other call (state, stats, kill, connect) is served meanwhile.
    creating: HashSet<String>,
    /// A sandbox's or standalone container's VM is starting.
    vm_starting: bool,
}

impl Pod {
    fn container(&self, id: &str) -> TtrpcResult<&Container> {
        self.containers
            .get(id)
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("exec {exec_id} of {id} not found")))
    }

    fn vm(&self) -> TtrpcResult<Arc<PodVm>> {
        self.vm
            .clone()
            .ok_or_else(|| status(Code::FAILED_PRECONDITION, "the pod's VM is not running"))
    }
}

/// Publishes task events to containerd.
#[derive(Clone)]
struct Events {
    publisher: Arc<RemotePublisher>,
    namespace: String,
}

impl Events {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, topic, &self.namespace, event)
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }

    async fn exit(&self, p: &Process, exit: Exit) {
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: p.container_id.clone(),
                id: p.event_id().to_string(),
                pid: p.pid(),
                exit_status: exit.status,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        )
        .await;
    }
}

/// The Task service of one shim.
#[derive(Clone)]
pub struct TaskService {
    pod: Arc<Mutex<Pod>>,
    events: Events,
    namespace: String,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(publisher: RemotePublisher, namespace: &str, exit: Arc<ExitSignal>) -> Self {
        TaskService {
            pod: Arc::new(Mutex::new(Pod::default())),
            events: Events {
                publisher: Arc::new(publisher),
                namespace: namespace.to_string(),
            },
            namespace: namespace.to_string(),
            exit,
        }
    }

    /// Starts the pod's VM and the tasks that follow it: its exit, and OOM
    /// kills in the guest. A spec with a network namespace path (CNI ran
    /// there) gets its network joined to the guest's NIC first, and the
    /// guest configured once it is up; without one the guest has only `lo`.
    async fn start_vm(&self, pod_id: &str, spec: &Spec, role: &Role) -> TtrpcResult<Arc<PodVm>> {
        spec::refuse_host_namespaces(spec)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let shape = PodVmSize::for_spec(spec, role)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let hostname = spec.hostname().clone().unwrap_or_default();
        let dir = PodDir::new(&self.namespace, pod_id)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let cgroup = pod_cgroup(pod_id, spec)?;
        let (nic, guest_net) = match PodNetworkMode::of(spec) {
            PodNetworkMode::Namespace(netns) => {
                let path = netns.clone();
                let net = tokio::task::spawn_blocking(move || network::set_up(&path))
                    .await
                    .map_err(|e| status(Code::INTERNAL, e.to_string()))?
                    .map_err(|e| {
                        let code = match e {
                            network::NetworkError::HostNetns(_)
                            | network::NetworkError::NotNetns(_) => Code::INVALID_ARGUMENT,
                            _ => Code::INTERNAL,
                        };
                        status(code, format!("pod network: {e}"))
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
            dir.clone(),
            shape,
            &hostname,
            nic,
            cgroup.as_ref(),
            &ReaperExits,
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
                return Err(status(Code::INTERNAL, format!("starting the pod VM: {e}")));
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
            if let Err(e) = serve_port_forward(&vm, netns, pod_id).await {
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
    /// and the shim's connections into it end too. Its network goes first,
    /// so whoever sees the exit (containerd then runs CNI DEL) finds the
    /// namespace as CNI left it.
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
                    if p.status() != Status::STOPPED && p.set_exited(status) {
                        ended.push(p.clone());
                    }
                }
            }
        }
        for p in ended {
            if let Some(exit) = p.exit() {
                self.events.exit(&p, exit).await;
            }
        }
    }

    /// Creates an app container in the pod's VM: shares its files, has the
    /// guest assemble it, prepares its init process and stdio.
    /// The part of `create` that runs without the pod's lock: the VM's
    /// start for a sandbox or a standalone container, the container in the
    /// guest for an app (`member_of`: the pod's VM and sysctls).
    async fn create_unlocked(
        &self,
        req: &CreateTaskRequest,
        spec: &Spec,
        role: &Role,
        member_of: Option<(Arc<PodVm>, Vec<proto::agent::Sysctl>)>,
    ) -> TtrpcResult<(Arc<PodVm>, Option<ContainerShare>, Arc<Process>)> {
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
            (Role::PodMember { sandbox_id }, None) => Err(status(
                Code::FAILED_PRECONDITION,
                format!("pod sandbox {sandbox_id} is not running in this shim"),
            )),
        }
    }

    async fn create_app(
        &self,
        vm: &Arc<PodVm>,
        req: &CreateTaskRequest,
        spec: &Spec,
        pod_sysctls: &[proto::agent::Sysctl],
    ) -> TtrpcResult<(ContainerShare, Arc<Process>)> {
        let id = req.id.clone();
        let mut plan = spec::plan_container(&id, spec)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        spec::merge_pod_sysctls(pod_sysctls, &mut plan.request.sysctls);
        for w in &plan.warnings {
            log::warn!("container {id}: {w}");
        }
        let process_spec = spec.process().as_ref().ok_or_else(|| {
            status(
                Code::INVALID_ARGUMENT,
                spec::SpecError::NoProcess.to_string(),
            )
        })?;
        let create_process = spec::process_request(&id, &id, process_spec, !req.stdin.is_empty())
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let rootfs: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let bundle_rootfs = spec
            .root()
            .as_ref()
            .map(|r| Path::new(&req.bundle).join(r.path()))
            .unwrap_or_else(|| PathBuf::from(&req.bundle).join("rootfs"));
        let pod_share = vm.dir().share();
        let binds = plan.binds.clone();
        let share_id = id.clone();
        let share = tokio::task::spawn_blocking(move || {
            pod_share.add_container(&share_id, &rootfs, &bundle_rootfs, &binds)
        })
        .await
        .map_err(|e| status(Code::INTERNAL, e.to_string()))?
        .map_err(|e| status(Code::INTERNAL, format!("sharing the rootfs: {e}")))?;

        let request = plan.request;
        call(
            vm.agent(),
            "creating the container in the guest",
            move |a| a.create_container(request),
        )
        .await?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        // No pid until started: containerd's client deletes a created
        // task only when its pid is 0 (a start that failed leaves one).
        let process = Arc::new(Process::new(&id, "", &id, stdio));
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
    ) -> TtrpcResult<()> {
        let stdout = Sink::parse(&process.stdio.stdout)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let stderr = Sink::parse(&process.stdio.stderr)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        request.terminal = process.stdio.terminal;
        request.stdin = !process.stdio.stdin.is_empty();
        call(vm.agent(), "creating the process in the guest", move |a| {
            a.create_process(request)
        })
        .await?;
        let attached = self.attach_stdio(vm, process, stdout, stderr).await;
        if attached.is_err() {
            let agent_id = process.agent_id.clone();
            let _ = call(vm.agent(), "undo", move |a| a.delete_process(&agent_id)).await;
        }
        attached
    }

    async fn attach_stdio(
        &self,
        vm: &Arc<PodVm>,
        process: &Arc<Process>,
        stdout: Sink,
        stderr: Sink,
    ) -> TtrpcResult<()> {
        let mut outputs = vec![(StreamKind::Stdout, stdout)];
        if !process.stdio.terminal {
            outputs.push((StreamKind::Stderr, stderr));
        }
        for (kind, sink) in outputs {
            let Some(file) = sink
                .open()
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?
            else {
                continue;
            };
            let vm2 = vm.clone();
            let pid = process.agent_id.clone();
            let stream = tokio::task::spawn_blocking(move || vm2.attach(&pid, kind))
                .await
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?
                .map_err(|e| status(Code::INTERNAL, format!("attaching {kind:?}: {e}")))?;
            let name = format!("{}/{} {kind:?}", process.container_id, process.exec_id);
            process.add_output(stdio::copy_output(stream, file, name));
        }
        if !process.stdio.stdin.is_empty() {
            let vm2 = vm.clone();
            let pid = process.agent_id.clone();
            let stream = tokio::task::spawn_blocking(move || vm2.attach(&pid, StreamKind::Stdin))
                .await
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?
                .map_err(|e| status(Code::INTERNAL, format!("attaching stdin: {e}")))?;
            let _ = stdio::copy_stdin(
                PathBuf::from(&process.stdio.stdin),
                stream,
                process.stdin_close.clone(),
            );
        }
        Ok(())
    }

    /// Waits for a started guest process, then publishes its exit.
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
                    this.events.exit(&process, exit).await;
                }
            }
            if process.exec_id.is_empty() {
                this.end_execs(&vm, &process.container_id).await;
            }
        });
    }

    /// When a container's init exits, its execs go with it (as they do
    /// when runc's PID namespace ends).
    async fn end_execs(&self, vm: &Arc<PodVm>, container_id: &str) {
        let execs: Vec<Arc<Process>> = {
            let pod = self.pod.lock().await;
            match pod.containers.get(container_id) {
                Some(c) => c.execs.values().cloned().collect(),
                None => return,
            }
        };
        for p in execs {
            if p.status() == Status::RUNNING || p.status() == Status::PAUSED {
                let id = p.agent_id.clone();
                let _ = call(vm.agent(), "kill exec", move |a| a.signal(&id, 9, true)).await;
            }
        }
    }

    async fn delete_container(&self, pod: &mut Pod, id: &str) -> TtrpcResult<Arc<Process>> {
        let c = pod.container(id)?;
        let init = c.init.clone();
        if matches!(init.status(), Status::RUNNING | Status::PAUSED) {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {id} is still running; kill it first"),
            ));
        }
        let role = c.role.clone();
        let Some(mut c) = pod.containers.remove(id) else {
            return Err(status(Code::NOT_FOUND, format!("container {id} not found")));
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
            tokio::task::spawn_blocking(move || share.unmount())
                .await
                .map_err(|e| status(Code::INTERNAL, e.to_string()))?
                .map_err(|e| status(Code::INTERNAL, format!("unmounting the rootfs: {e}")))?;
        }
        if init.set_exited(137) {
            if let Some(exit) = init.exit() {
                self.events.exit(&init, exit).await;
            }
        }
        let ends_vm = matches!(role, Role::Sandbox | Role::Standalone);
        if ends_vm {
            if let Some(vm) = pod.vm.take() {
                vm.stop().await;
                if let Some(netns) = vm.netns() {
                    tear_down_network(netns.to_path_buf()).await;
                }
                let dir = vm.dir().clone();
                // App containers the sandbox outlived: their shares go too.
                let rest: Vec<_> = pod.containers.drain().collect();
                drop(rest);
                tokio::task::spawn_blocking(move || dir.clean_up())
                    .await
                    .map_err(|e| status(Code::INTERNAL, e.to_string()))?
                    .map_err(|e| status(Code::INTERNAL, format!("cleaning the pod: {e}")))?;
            }
        }
        let exit = init.exit();
        self.events
            .publish(
                topics::TASK_DELETE_EVENT_TOPIC,
                Box::new(TaskDelete {
                    container_id: id.to_string(),
                    pid: init.pid(),
                    exit_status: exit.map(|e| e.status).unwrap_or(0),
                    exited_at: exit.map(|e| timestamp(e.at)).unwrap_or_default(),
                    id: id.to_string(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(init)
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
fn pod_cgroup(pod_id: &str, spec: &Spec) -> TtrpcResult<Option<CgroupPath>> {
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
    let text = path.to_str().ok_or_else(|| {
        status(
            Code::INVALID_ARGUMENT,
            format!("cgroupsPath {path:?} is not UTF-8"),
        )
    })?;
    CgroupPath::parse(text)
        .map(Some)
        .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))
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

fn load_spec(bundle: &str) -> TtrpcResult<Spec> {
    let path = Path::new(bundle).join("config.json");
    Spec::load(&path).map_err(|e| {
        status(
            Code::INVALID_ARGUMENT,
            format!("reading the OCI spec {}: {e}", path.display()),
        )
    })
}

fn any_json(any: &MessageField<Any>, what: &str) -> TtrpcResult<Vec<u8>> {
    any.as_ref()
        .map(|a| a.value.clone())
        .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("{what} is missing")))
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "restoring a container from a checkpoint is not supported by Arrow",
            ));
        }
        let begun = std::time::Instant::now();
        let spec = load_spec(&req.bundle)?;
        let role =
            Role::of(&req.id, &spec).map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        // Claimed under the lock, created without it.
        let member_of = {
            let mut pod = self.pod.lock().await;
            if pod.containers.contains_key(&req.id) || pod.creating.contains(&req.id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("container {} already exists", req.id),
                ));
            }
            let member_of = match &role {
                Role::Sandbox | Role::Standalone => {
                    if pod.vm.is_some() || pod.vm_starting {
                        return Err(status(
                            Code::ALREADY_EXISTS,
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
                        status(
                            Code::FAILED_PRECONDITION,
                            format!("pod sandbox {sandbox_id} is not running in this shim"),
                        )
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
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!(
                        "pod sandbox {sandbox_id} ended while {} was created",
                        req.id
                    ),
                ));
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
        self.events
            .publish(
                topics::TASK_CREATE_EVENT_TOPIC,
                Box::new(TaskCreate {
                    container_id: req.id.clone(),
                    bundle: req.bundle.clone(),
                    rootfs: req.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: req.stdin.clone(),
                        stdout: req.stdout.clone(),
                        stderr: req.stderr.clone(),
                        terminal: req.terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let (vm, process, role) = {
            let pod = self.pod.lock().await;
            let c = pod.container(&req.id)?;
            (
                pod.vm()?,
                pod.process(&req.id, &req.exec_id)?,
                c.role.clone(),
            )
        };
        if process.status() != Status::CREATED {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("{} is not in the created state", process.event_id()),
            ));
        }
        let started_at = std::time::Instant::now();
        let pid = vm.pid();
        if role == Role::Sandbox && req.exec_id.is_empty() {
            log::info!("start {}: the VM, pid {pid}", req.id);
        } else {
            let agent_id = process.agent_id.clone();
            let guest_pid = call(vm.agent(), "starting the process", move |a| {
                a.start_process(&agent_id)
            })
            .await?;
            log::info!(
                "start {} {}: guest pid {guest_pid} (reported as the VMM's, {pid}) in {} ms",
                req.id,
                req.exec_id,
                started_at.elapsed().as_millis()
            );
        }
        process.set_running(pid);
        if !(role == Role::Sandbox && req.exec_id.is_empty()) {
            self.follow_process(vm, process.clone());
        }
        if req.exec_id.is_empty() {
            self.events
                .publish(
                    topics::TASK_START_EVENT_TOPIC,
                    Box::new(TaskStart {
                        container_id: req.id.clone(),
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
        } else {
            self.events
                .publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    Box::new(TaskExecStarted {
                        container_id: req.id.clone(),
                        exec_id: req.exec_id.clone(),
                        pid,
                        ..Default::default()
                    }),
                )
                .await;
        }
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let mut pod = self.pod.lock().await;
        let process = if req.exec_id.is_empty() {
            self.delete_container(&mut pod, &req.id).await?
        } else {
            let process = pod.process(&req.id, &req.exec_id)?;
            if matches!(process.status(), Status::RUNNING | Status::PAUSED) {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is still running", req.exec_id),
                ));
            }
            if let Ok(vm) = pod.vm() {
                if !vm.has_exited() {
                    let agent_id = process.agent_id.clone();
                    let _ = call(vm.agent(), "delete", move |a| a.delete_process(&agent_id)).await;
                }
            }
            if let Some(c) = pod.containers.get_mut(&req.id) {
                c.execs.remove(&req.exec_id);
            }
            process.set_exited(137);
            process
        };
        let exit = process.exit();
        Ok(api::DeleteResponse {
            pid: process.pid(),
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).unwrap_or_default(),
            ..Default::default()
        })
    }

    /// Every container's processes run in the VM, so on the host they are
    /// the VMM (the guest's own pids are the guest's word and mean nothing
    /// here).
    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pod = self.pod.lock().await;
        pod.container(&req.id)?;
        let vm = pod.vm()?;
        Ok(PidsResponse {
            processes: vec![ProcessInfo {
                pid: vm.pid(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.freeze(&req.id, true).await?;
        self.events
            .publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.freeze(&req.id, false).await?;
        self.events
            .publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: req.id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(status(
            Code::UNIMPLEMENTED,
            "checkpointing a container is not supported by Arrow",
        ))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let mut pod = self.pod.lock().await;
        let role = pod.container(&req.id)?.role.clone();
        let process = pod.process(&req.id, &req.exec_id)?;
        let signal = req.signal;
        if signal > 64 {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("bad signal {signal}"),
            ));
        }
        if role == Role::Sandbox && req.exec_id.is_empty() {
            if process.status() == Status::STOPPED {
                return Err(status(Code::NOT_FOUND, "process already finished"));
            }
            if signal == 0 {
                return Ok(Empty::new());
            }
            pod.stop_signal.get_or_insert(signal);
            if let Some(vm) = pod.vm.clone() {
                if process.status() == Status::CREATED {
                    // Never started: containerd still expects an exit.
                    process.set_running(vm.pid());
                }
                tokio::spawn(async move {
                    vm.stop().await;
                });
            }
            return Ok(Empty::new());
        }
        let vm = pod.vm()?;
        drop(pod);
        match process.status() {
            Status::STOPPED => Err(status(Code::NOT_FOUND, "process already finished")),
            Status::CREATED => {
                if signal == 0 {
                    return Ok(Empty::new());
                }
                // Never executed: it "dies" of the signal, as runc's
                // waiting init would.
                let agent_id = process.agent_id.clone();
                let _ = call(vm.agent(), "delete", move |a| a.delete_process(&agent_id)).await;
                if process.set_exited(128 + signal) {
                    if let Some(exit) = process.exit() {
                        self.events.exit(&process, exit).await;
                    }
                }
                Ok(Empty::new())
            }
            _ => {
                let agent_id = process.agent_id.clone();
                // containerd SIGKILLs an exec whose ExecSync timed out: its
                // whole process group goes (the guest makes each process a
                // session and group leader), so nothing it started outlives
                // the request, as nothing outlives runc's exec.
                let all = req.all || (!req.exec_id.is_empty() && signal == libc::SIGKILL as u32);
                call(vm.agent(), "signalling the process", move |a| {
                    a.signal(&agent_id, signal as i32, all)
                })
                .await
                .map_err(|e| match e {
                    ttrpc::Error::RpcStatus(s) if s.code() == Code::NOT_FOUND => {
                        status(Code::NOT_FOUND, "process already finished")
                    }
                    other => other,
                })?;
                if req.all && req.exec_id.is_empty() {
                    self.end_execs_with(&vm, &req.id, signal).await;
                }
                Ok(Empty::new())
            }
        }
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let (vm, container_init) = {
            let pod = self.pod.lock().await;
            let c = pod.container(&req.id)?;
            if c.role == Role::Sandbox {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    "the pod sandbox is the VM itself; exec into an app container",
                ));
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(status(
                    Code::ALREADY_EXISTS,
                    format!("exec {} already exists", req.exec_id),
                ));
            }
            (pod.vm()?, c.init.clone())
        };
        if container_init.status() != Status::RUNNING {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        let json = any_json(&req.spec, "the exec process spec")?;
        let process_spec = spec::parse_process(&json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("exec process spec: {e}")))?;
        let agent_id = format!("{}.exec.{}", req.id, req.exec_id);
        let request =
            spec::process_request(&agent_id, &req.id, &process_spec, !req.stdin.is_empty())
                .map_err(|e| status(Code::INVALID_ARGUMENT, e.to_string()))?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let process = Arc::new(Process::new(&req.id, &req.exec_id, &agent_id, stdio));
        self.prepare_process(&vm, &process, request).await?;
        {
            let mut pod = self.pod.lock().await;
            match pod.containers.get_mut(&req.id) {
                Some(c) => {
                    c.execs.insert(req.exec_id.clone(), process);
                }
                None => {
                    return Err(status(
                        Code::NOT_FOUND,
                        format!("container {} was deleted meanwhile", req.id),
                    ))
                }
            }
        }
        self.events
            .publish(
                topics::TASK_EXEC_ADDED_EVENT_TOPIC,
                Box::new(TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let (vm, process) = {
            let pod = self.pod.lock().await;
            (pod.vm()?, pod.process(&req.id, &req.exec_id)?)
        };
        if process.agent_id.is_empty() {
            return Err(status(
                Code::FAILED_PRECONDITION,
                "the sandbox has no terminal",
            ));
        }
        let (agent_id, rows, cols) = (process.agent_id.clone(), req.height, req.width);
        call(vm.agent(), "resizing the terminal", move |a| {
            a.resize_tty(&agent_id, rows, cols)
        })
        .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let process = self.pod.lock().await.process(&req.id, &req.exec_id)?;
        if req.stdin {
            process.stdin_close.request();
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let (vm, role) = {
            let pod = self.pod.lock().await;
            (pod.vm()?, pod.container(&req.id)?.role.clone())
        };
        let json = any_json(&req.resources, "resources")?;
        let resources = spec::parse_resources(&json)
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("resources: {e}")))?;
        if role == Role::Sandbox {
            // The VM's size is fixed at its start; the pod's containers
            // carry the limits.
            log::warn!("update of the sandbox's resources ignored: the VM keeps its size");
            return Ok(Empty::new());
        }
        let mut warnings = Vec::new();
        let request = spec::resources_request(&resources, &mut warnings);
        for w in warnings {
            log::warn!("update {}: {w}", req.id);
        }
        let id = req.id.clone();
        call(vm.agent(), "updating resources", move |a| {
            a.update_container(&id, request)
        })
        .await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let process = self.pod.lock().await.process(&req.id, &req.exec_id)?;
        let exit = process.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let (vm, ids) = {
            let pod = self.pod.lock().await;
            let c = pod.container(&req.id)?;
            let ids: Vec<String> = if c.role == Role::Sandbox {
                // The pod: every app container together.
                pod.containers
                    .iter()
                    .filter(|(_, c)| c.role != Role::Sandbox)
                    .map(|(id, _)| id.clone())
                    .collect()
            } else {
                vec![req.id.clone()]
            };
            (pod.vm()?, ids)
        };
        let mut all = Vec::new();
        for id in ids {
            let cid = id.clone();
            match call(vm.agent(), "reading stats", move |a| {
                a.container_stats(&cid)
            })
            .await
            {
                Ok(s) => all.push(s),
                Err(e) if all.is_empty() && id == req.id => return Err(e),
                Err(e) => log::debug!("stats of {id}: {e}"),
            }
        }
        let metrics = stats::metrics(&all);
        // containerd resolves the type by its bare full name (typeurl), not
        // by the `type.googleapis.com/` form `Any::pack` writes: ctr and the
        // CRI plugin could not decode that one.
        let any = Any {
            type_url: metrics.descriptor_dyn().full_name().to_string(),
            value: metrics
                .write_to_bytes()
                .map_err(|e| status(Code::INTERNAL, format!("encoding metrics: {e}")))?,
            ..Default::default()
        };
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let pod = self.pod.lock().await;
        let task_pid = pod.container(&req.id).map(|c| c.init.pid()).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let pod = self.pod.lock().await;
        if !pod.containers.is_empty() || !pod.creating.is_empty() {
            return Ok(Empty::new());
        }
        if let Some(vm) = &pod.vm {
            vm.kill();
        }
        self.exit.signal();
        Ok(Empty::new())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let pod = self.pod.lock().await;
        let bundle = pod.container(&req.id)?.bundle.clone();
        let p = pod.process(&req.id, &req.exec_id)?;
        let exit = p.exit();
        Ok(StateResponse {
            id: p.event_id().to_string(),
            bundle,
            pid: p.pid(),
            status: p.status().into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| timestamp(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }
}

/// OOM reports pass for the pod's app containers only (the sandbox is the
/// VM itself: no guest container has its id).
#[async_trait]
impl OomSink for TaskService {
    async fn is_ours(&self, id: &str) -> bool {
        let pod = self.pod.lock().await;
        pod.containers
            .get(id)
            .is_some_and(|c| c.role != Role::Sandbox)
    }

    async fn publish(&self, container_id: String) {
        self.events
            .publish(
                topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id,
                    ..Default::default()
                }),
            )
            .await;
    }
}

impl TaskService {
    async fn freeze(&self, id: &str, frozen: bool) -> TtrpcResult<()> {
        let (vm, role, process) = {
            let pod = self.pod.lock().await;
            let c = pod.container(id)?;
            (pod.vm()?, c.role.clone(), c.init.clone())
        };
        if role == Role::Sandbox {
            return Err(status(
                Code::UNIMPLEMENTED,
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

    async fn end_execs_with(&self, vm: &Arc<PodVm>, container_id: &str, signal: u32) {
        let execs: Vec<Arc<Process>> = {
            let pod = self.pod.lock().await;
            match pod.containers.get(container_id) {
                Some(c) => c.execs.values().cloned().collect(),
                None => return,
            }
        };
        for p in execs {
            if p.status() == Status::RUNNING {
                let id = p.agent_id.clone();
                let _ = call(vm.agent(), "signal exec", move |a| {
                    a.signal(&id, signal as i32, true)
                })
                .await;
            }
        }
    }
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
        let err = pod_cgroup("p", &bad).unwrap_err();
        assert!(err.to_string().contains("INVALID_ARGUMENT"), "{err}");
    }
}
