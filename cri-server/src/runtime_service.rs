//! CRI `runtime.v1.RuntimeService`: the one place CRI types meet
//! arrow-cri's own ([`crate::runtime::model`]). Requests are checked and
//! translated here — what a microVM cannot do (host namespaces, hugepages)
//! is refused with the field that asked for it — and answers are built
//! from the runtime's records.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::cgroups_v2::metrics::Metrics;
use futures_util::Stream;
use k8s_cri::v1;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::runtime::exec::ExecOptions;
use crate::runtime::host_cgroup::HostUsage;
use crate::runtime::lifecycle::{Kind, LifecycleEvent};
use crate::runtime::model::{
    self, ContainerSpec, ContainerState, Dns, MountSpec, PodSpec, PodState, PortMapping,
    Propagation, Resources, Seccomp, Security,
};
use crate::runtime::{ContainerStats, Runtime as Engine};
use crate::streaming::{StreamRequest, StreamingServer};

pub struct Runtime {
    engine: Arc<Engine>,
    streaming: Arc<StreamingServer>,
}

impl Runtime {
    pub fn new(engine: Arc<Engine>, streaming: Arc<StreamingServer>) -> Runtime {
        Runtime { engine, streaming }
    }

    /// Refuses a stream into a container that is not running.
    async fn running_container(&self, id: &str) -> Result<(), Status> {
        let c = self.engine.container(id).await?;
        if c.state != ContainerState::Running {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running"
            )));
        }
        Ok(())
    }
}

/// The streams of an exec or attach, checked as kubelet checks them.
fn stream_options(
    cmd: Vec<String>,
    tty: bool,
    stdin: bool,
    stdout: bool,
    stderr: bool,
) -> Result<ExecOptions, Status> {
    if tty && stderr {
        return Err(invalid(
            "tty and stderr cannot both be true: a terminal has one output",
        ));
    }
    if !(stdin || stdout || stderr) {
        return Err(invalid("one of stdin, stdout or stderr must be true"));
    }
    Ok(ExecOptions {
        cmd,
        tty,
        stdin,
        stdout,
        stderr,
    })
}

/// A method arrow-cri does not serve, and why.
pub fn unimplemented(method: &str, why: &str) -> Status {
    Status::unimplemented(format!(
        "RuntimeService.{method} is not implemented by arrow-cri: {why}"
    ))
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn map(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn hashmap(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Refuses a namespace mode a VM cannot give.
fn check_namespaces(ns: Option<&v1::NamespaceOption>, whose: &str) -> Result<bool, Status> {
    let Some(ns) = ns else {
        return Ok(false);
    };
    let node = v1::NamespaceMode::Node as i32;
    for (mode, field) in [
        (ns.network, "hostNetwork"),
        (ns.pid, "hostPID"),
        (ns.ipc, "hostIPC"),
    ] {
        if mode == node {
            return Err(invalid(format!(
                "{whose}: {field} is not possible in an Arrow microVM (the pod has its own \
                 kernel and cannot share the node's namespaces): run this pod with another runtime"
            )));
        }
    }
    if ns.pid == v1::NamespaceMode::Target as i32 {
        return Err(invalid(format!(
            "{whose}: a PID namespace targeting another container ({}) is not supported by arrow-cri",
            ns.target_id
        )));
    }
    if ns
        .userns_options
        .as_ref()
        .is_some_and(|u| u.mode != v1::NamespaceMode::Node as i32)
    {
        return Err(invalid(format!(
            "{whose}: user namespaces are not supported by arrow-cri"
        )));
    }
    Ok(ns.pid == v1::NamespaceMode::Pod as i32)
}

fn resources(r: &v1::LinuxContainerResources, whose: &str) -> Result<Resources, Status> {
    if !r.hugepage_limits.iter().all(|h| h.limit == 0) {
        return Err(invalid(format!(
            "{whose}: hugepage limits are not supported in an Arrow microVM (the guest has no hugepages)"
        )));
    }
    let pos = |v: i64| (v > 0).then_some(v);
    Ok(Resources {
        cpu_period: pos(r.cpu_period).map(|v| v as u64),
        cpu_quota: pos(r.cpu_quota),
        cpu_shares: pos(r.cpu_shares).map(|v| v as u64),
        memory_limit: pos(r.memory_limit_in_bytes),
        memory_swap_limit: pos(r.memory_swap_limit_in_bytes),
        oom_score_adj: (r.oom_score_adj != 0).then_some(r.oom_score_adj),
        cpuset_cpus: r.cpuset_cpus.clone(),
        cpuset_mems: r.cpuset_mems.clone(),
        unified: map(&r.unified),
    })
}

fn seccomp(profile: Option<&v1::SecurityProfile>, legacy: &str) -> Result<Seccomp, Status> {
    use v1::security_profile::ProfileType;
    if let Some(p) = profile {
        return Ok(match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => Seccomp::RuntimeDefault,
            Ok(ProfileType::Unconfined) => Seccomp::Unconfined,
            Ok(ProfileType::Localhost) => Seccomp::Localhost(p.localhost_ref.clone().into()),
            Err(_) => {
                return Err(invalid(format!(
                    "unknown seccomp profile type {}",
                    p.profile_type
                )))
            }
        });
    }
    Ok(match legacy {
        "" | "unconfined" => Seccomp::Unconfined,
        "runtime/default" | "docker/default" => Seccomp::RuntimeDefault,
        other => match other.strip_prefix("localhost/") {
            Some(path) => Seccomp::Localhost(path.into()),
            None => {
                return Err(invalid(format!(
                    "seccomp profile path {other:?} is not understood"
                )))
            }
        },
    })
}

/// CRI's pod config as arrow-cri's pod.
pub fn pod_spec(c: &v1::PodSandboxConfig) -> Result<PodSpec, Status> {
    let meta = c
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("the pod config has no metadata"))?;
    if meta.name.is_empty() {
        return Err(invalid("the pod config has no name"));
    }
    let linux = c.linux.clone().unwrap_or_default();
    let security = linux.security_context.clone().unwrap_or_default();
    let whose = format!("pod {}", meta.name);
    let shared_pid = check_namespaces(security.namespace_options.as_ref(), &whose)?;
    let mut port_mappings = Vec::new();
    for p in &c.port_mappings {
        let protocol = match v1::Protocol::try_from(p.protocol) {
            Ok(v1::Protocol::Tcp) => "tcp",
            Ok(v1::Protocol::Udp) => "udp",
            Ok(v1::Protocol::Sctp) => "sctp",
            Err(_) => return Err(invalid(format!("{whose}: unknown protocol {}", p.protocol))),
        };
        let port = |v: i32, what: &str| {
            u16::try_from(v).map_err(|_| invalid(format!("{whose}: {what} {v} is not a port")))
        };
        // Without a host port a mapping is only documentation (as in
        // containerd): no portmap rule is made for it.
        if p.host_port <= 0 {
            continue;
        }
        port_mappings.push(PortMapping {
            protocol: protocol.into(),
            container_port: port(p.container_port, "containerPort")?,
            host_port: port(p.host_port, "hostPort")?,
            host_ip: p.host_ip.clone(),
        });
    }
    let resources = match linux.resources.as_ref() {
        Some(r) => Some(resources(r, &whose)?),
        None => None,
    };
    Ok(PodSpec {
        name: meta.name.clone(),
        uid: meta.uid.clone(),
        namespace: meta.namespace.clone(),
        attempt: meta.attempt,
        hostname: c.hostname.clone(),
        log_directory: c.log_directory.clone(),
        dns: c.dns_config.as_ref().map(|d| Dns {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        }),
        port_mappings,
        labels: map(&c.labels),
        annotations: map(&c.annotations),
        cgroup_parent: linux.cgroup_parent.clone(),
        sysctls: map(&linux.sysctls),
        resources,
        shared_pid_namespace: shared_pid,
    })
}

/// The deprecated seccomp path older kubelets still send.
#[allow(deprecated)]
fn legacy_seccomp(sc: &v1::LinuxContainerSecurityContext) -> &str {
    &sc.seccomp_profile_path
}

/// CRI's container config as arrow-cri's container.
pub fn container_spec(c: &v1::ContainerConfig) -> Result<ContainerSpec, Status> {
    let meta = c
        .metadata
        .as_ref()
        .ok_or_else(|| invalid("the container config has no metadata"))?;
    if meta.name.is_empty() {
        return Err(invalid("the container config has no name"));
    }
    let whose = format!("container {}", meta.name);
    let image = c
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .filter(|i| !i.is_empty())
        .ok_or_else(|| invalid(format!("{whose}: no image")))?;
    if !c.devices.is_empty() || !c.cdi_devices.is_empty() {
        return Err(invalid(format!(
            "{whose}: host devices cannot be passed into an Arrow microVM"
        )));
    }
    let linux = c.linux.clone().unwrap_or_default();
    let sc = linux.security_context.clone().unwrap_or_default();
    let shared_pid = check_namespaces(sc.namespace_options.as_ref(), &whose)?;
    let id = |v: &Option<v1::Int64Value>, what: &str| -> Result<Option<u32>, Status> {
        v.as_ref()
            .map(|v| {
                u32::try_from(v.value)
                    .map_err(|_| invalid(format!("{whose}: {what} {} is out of range", v.value)))
            })
            .transpose()
    };
    let mut mounts = Vec::new();
    for m in &c.mounts {
        if m.image.as_ref().is_some_and(|i| !i.image.is_empty()) {
            return Err(invalid(format!(
                "{whose}: image volumes ({}) are not supported by arrow-cri",
                m.container_path
            )));
        }
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return Err(invalid(format!(
                "{whose}: ID-mapped mounts ({}) are not supported by arrow-cri",
                m.container_path
            )));
        }
        let propagation = match v1::MountPropagation::try_from(m.propagation) {
            Ok(v1::MountPropagation::PropagationPrivate) => Propagation::Private,
            Ok(v1::MountPropagation::PropagationHostToContainer) => Propagation::HostToContainer,
            Ok(v1::MountPropagation::PropagationBidirectional) => Propagation::Bidirectional,
            Err(_) => {
                return Err(invalid(format!(
                    "{whose}: unknown propagation {}",
                    m.propagation
                )))
            }
        };
        mounts.push(MountSpec {
            container_path: m.container_path.clone(),
            host_path: m.host_path.clone(),
            readonly: m.readonly,
            propagation,
        });
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.add_ambient_capabilities.is_empty() {
        return Err(invalid(format!(
            "{whose}: ambient capabilities are not supported by arrow-cri"
        )));
    }
    let security = Security {
        run_as_user: id(&sc.run_as_user, "runAsUser")?,
        run_as_group: id(&sc.run_as_group, "runAsGroup")?,
        run_as_username: sc.run_as_username.clone(),
        supplemental_groups: sc
            .supplemental_groups
            .iter()
            .map(|g| {
                u32::try_from(*g)
                    .map_err(|_| invalid(format!("{whose}: group {g} is out of range")))
            })
            .collect::<Result<_, _>>()?,
        readonly_rootfs: sc.readonly_rootfs,
        privileged: sc.privileged,
        no_new_privs: sc.no_new_privs,
        add_capabilities: caps.add_capabilities.clone(),
        drop_capabilities: caps.drop_capabilities.clone(),
        masked_paths: (!sc.masked_paths.is_empty()).then(|| sc.masked_paths.clone()),
        readonly_paths: (!sc.readonly_paths.is_empty()).then(|| sc.readonly_paths.clone()),
        seccomp: seccomp(sc.seccomp.as_ref(), legacy_seccomp(&sc))?,
    };
    let resources = match linux.resources.as_ref() {
        Some(r) => Some(resources(r, &whose)?),
        None => None,
    };
    Ok(ContainerSpec {
        name: meta.name.clone(),
        attempt: meta.attempt,
        image,
        command: c.command.clone(),
        args: c.args.clone(),
        working_dir: c.working_dir.clone(),
        envs: c
            .envs
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect(),
        mounts,
        labels: map(&c.labels),
        annotations: map(&c.annotations),
        log_path: c.log_path.clone(),
        tty: c.tty,
        stdin: c.stdin,
        stdin_once: c.stdin_once,
        resources,
        security,
        own_pid_namespace: !shared_pid,
    })
}

fn pod_state(s: PodState) -> i32 {
    match s {
        PodState::Ready => v1::PodSandboxState::SandboxReady as i32,
        PodState::NotReady => v1::PodSandboxState::SandboxNotready as i32,
    }
}

fn container_state(s: ContainerState) -> i32 {
    (match s {
        ContainerState::Created => v1::ContainerState::ContainerCreated,
        ContainerState::Running => v1::ContainerState::ContainerRunning,
        ContainerState::Exited => v1::ContainerState::ContainerExited,
        ContainerState::Unknown => v1::ContainerState::ContainerUnknown,
    }) as i32
}

fn pod_metadata(p: &model::Pod) -> v1::PodSandboxMetadata {
    v1::PodSandboxMetadata {
        name: p.spec.name.clone(),
        uid: p.spec.uid.clone(),
        namespace: p.spec.namespace.clone(),
        attempt: p.spec.attempt,
    }
}

fn container_metadata(c: &model::Container) -> v1::ContainerMetadata {
    v1::ContainerMetadata {
        name: c.spec.name.clone(),
        attempt: c.spec.attempt,
    }
}

fn labels_match(labels: &BTreeMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn image_spec(c: &model::Container) -> v1::ImageSpec {
    v1::ImageSpec {
        image: c.spec.image.clone(),
        ..Default::default()
    }
}

fn container_status(c: &model::Container) -> v1::ContainerStatus {
    let (exit_code, finished_at, reason) = match &c.exit {
        Some(e) => (e.code, e.at, e.reason().to_string()),
        None => (0, 0, String::new()),
    };
    v1::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(container_metadata(c)),
        state: container_state(c.state),
        created_at: c.created_at,
        started_at: c.started_at,
        finished_at,
        exit_code,
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        image_id: c.image_id.clone(),
        reason,
        message: String::new(),
        labels: hashmap(&c.spec.labels),
        annotations: hashmap(&c.spec.annotations),
        mounts: c
            .spec
            .mounts
            .iter()
            .map(|m| v1::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: match m.propagation {
                    Propagation::Private => v1::MountPropagation::PropagationPrivate,
                    Propagation::HostToContainer => {
                        v1::MountPropagation::PropagationHostToContainer
                    }
                    Propagation::Bidirectional => v1::MountPropagation::PropagationBidirectional,
                } as i32,
                ..Default::default()
            })
            .collect(),
        log_path: c.log_file.display().to_string(),
        ..Default::default()
    }
}

fn pod_status(p: &model::Pod) -> v1::PodSandboxStatus {
    v1::PodSandboxStatus {
        id: p.id.clone(),
        metadata: Some(pod_metadata(p)),
        state: pod_state(p.state),
        created_at: p.created_at,
        network: Some(v1::PodSandboxNetworkStatus {
            ip: p.ip.clone().unwrap_or_default(),
            additional_ips: p
                .additional_ips
                .iter()
                .map(|ip| v1::PodIp { ip: ip.clone() })
                .collect(),
        }),
        linux: Some(v1::LinuxPodSandboxStatus {
            namespaces: Some(v1::Namespace {
                options: Some(v1::NamespaceOption {
                    network: v1::NamespaceMode::Pod as i32,
                    pid: if p.spec.shared_pid_namespace {
                        v1::NamespaceMode::Pod
                    } else {
                        v1::NamespaceMode::Container
                    } as i32,
                    ipc: v1::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
            }),
        }),
        labels: hashmap(&p.spec.labels),
        annotations: hashmap(&p.spec.annotations),
        runtime_handler: String::new(),
    }
}

/// A lifecycle event as containerd's CRI plugin sends it: the sandbox's
/// status and every container of the pod, as they were.
fn container_event(e: &LifecycleEvent) -> v1::ContainerEventResponse {
    v1::ContainerEventResponse {
        container_id: e.id.clone(),
        container_event_type: match e.kind {
            Kind::Created => v1::ContainerEventType::ContainerCreatedEvent,
            Kind::Started => v1::ContainerEventType::ContainerStartedEvent,
            Kind::Stopped => v1::ContainerEventType::ContainerStoppedEvent,
            Kind::Deleted => v1::ContainerEventType::ContainerDeletedEvent,
        } as i32,
        created_at: e.at,
        pod_sandbox_status: e.pod.as_ref().map(pod_status),
        containers_statuses: e.containers.iter().map(container_status).collect(),
    }
}

fn u64v(v: u64) -> Option<v1::UInt64Value> {
    Some(v1::UInt64Value { value: v })
}

fn cpu_memory(m: &Metrics, at: i64) -> (v1::CpuUsage, v1::MemoryUsage) {
    let cpu = v1::CpuUsage {
        timestamp: at,
        usage_core_nano_seconds: u64v(m.cpu.usage_usec.saturating_mul(1000)),
        usage_nano_cores: None,
    };
    let usage = m.memory.usage;
    let working_set = usage.saturating_sub(m.memory.inactive_file);
    let available = m
        .memory
        .usage_limit
        .checked_sub(working_set)
        .filter(|_| m.memory.usage_limit > 0 && m.memory.usage_limit < u64::MAX / 2);
    let memory = v1::MemoryUsage {
        timestamp: at,
        working_set_bytes: u64v(working_set),
        available_bytes: available.and_then(u64v),
        usage_bytes: u64v(usage),
        rss_bytes: u64v(m.memory.anon),
        page_faults: u64v(m.memory.pgfault),
        major_page_faults: u64v(m.memory.pgmajfault),
    };
    (cpu, memory)
}

fn host_cpu_memory(h: &HostUsage, at: i64) -> (v1::CpuUsage, v1::MemoryUsage) {
    let cpu = v1::CpuUsage {
        timestamp: at,
        usage_core_nano_seconds: u64v(h.cpu_usage_ns),
        usage_nano_cores: None,
    };
    let memory = v1::MemoryUsage {
        timestamp: at,
        working_set_bytes: u64v(h.working_set),
        available_bytes: None,
        usage_bytes: u64v(h.memory_usage),
        rss_bytes: u64v(h.rss),
        page_faults: u64v(h.page_faults),
        major_page_faults: u64v(h.major_page_faults),
    };
    (cpu, memory)
}

fn container_stats(c: &model::Container, s: &ContainerStats) -> v1::ContainerStats {
    let (cpu, memory) = match &s.metrics {
        Some(m) => {
            let (c, m) = cpu_memory(m, s.timestamp);
            (Some(c), Some(m))
        }
        None => (None, None),
    };
    v1::ContainerStats {
        attributes: Some(v1::ContainerAttributes {
            id: c.id.clone(),
            metadata: Some(container_metadata(c)),
            labels: hashmap(&c.spec.labels),
            annotations: hashmap(&c.spec.annotations),
        }),
        cpu,
        memory,
        writable_layer: Some(v1::FilesystemUsage {
            timestamp: s.timestamp,
            fs_id: Some(v1::FilesystemIdentifier {
                mountpoint: s.writable_dir.display().to_string(),
            }),
            used_bytes: u64v(s.writable_bytes),
            inodes_used: u64v(s.writable_inodes),
        }),
        swap: None,
    }
}

impl Runtime {
    async fn stats_of(&self, c: &model::Container) -> Result<v1::ContainerStats, Status> {
        let s = self.engine.container_stats(&c.id).await?;
        Ok(container_stats(c, &s))
    }

    async fn pod_stats_of(&self, p: &model::Pod) -> Result<v1::PodSandboxStats, Status> {
        let figures = self.engine.pod_stats(&p.id).await?;
        let metrics = figures.guest;
        let at = model::now_nanos();
        let mut containers = Vec::new();
        for c in self
            .engine
            .containers()
            .await
            .iter()
            .filter(|c| c.pod_id == p.id)
        {
            if c.state == ContainerState::Running {
                containers.push(self.stats_of(c).await?);
            }
        }
        // The VM's own figures when the pod has a cgroup on the host (as
        // containerd reads a pod's), else what its containers use.
        let (cpu, memory) = match (&figures.host, &metrics) {
            (Some(h), _) => {
                let (c, m) = host_cpu_memory(h, at);
                (Some(c), Some(m))
            }
            (None, Some(m)) => {
                let (c, m) = cpu_memory(m, at);
                (Some(c), Some(m))
            }
            (None, None) => (None, None),
        };
        Ok(v1::PodSandboxStats {
            attributes: Some(v1::PodSandboxAttributes {
                id: p.id.clone(),
                metadata: Some(pod_metadata(p)),
                labels: hashmap(&p.spec.labels),
                annotations: hashmap(&p.spec.annotations),
            }),
            linux: Some(v1::LinuxPodSandboxStats {
                cpu,
                memory,
                network: None,
                process: metrics.as_ref().map(|m| v1::ProcessUsage {
                    timestamp: at,
                    process_count: u64v(m.pids.current),
                }),
                containers,
            }),
            windows: None,
        })
    }
}

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(
        &self,
        _request: Request<v1::VersionRequest>,
    ) -> Result<Response<v1::VersionResponse>, Status> {
        Ok(Response::new(v1::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "arrow-cri".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<v1::RunPodSandboxRequest>,
    ) -> Result<Response<v1::RunPodSandboxResponse>, Status> {
        let r = request.into_inner();
        if !r.runtime_handler.is_empty() && r.runtime_handler != "arrow" {
            return Err(invalid(format!(
                "runtime handler {:?}: arrow-cri runs every pod as an Arrow microVM (handler \"arrow\" or none)",
                r.runtime_handler
            )));
        }
        let config = r
            .config
            .ok_or_else(|| invalid("RunPodSandbox without a config"))?;
        let spec = pod_spec(&config)?;
        let id = self.engine.run_pod(spec).await?;
        Ok(Response::new(v1::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<v1::StopPodSandboxRequest>,
    ) -> Result<Response<v1::StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        match self.engine.stop_pod(&id).await {
            Ok(()) | Err(Error::NotFound(_)) => Ok(Response::new(v1::StopPodSandboxResponse {})),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<v1::RemovePodSandboxRequest>,
    ) -> Result<Response<v1::RemovePodSandboxResponse>, Status> {
        self.engine
            .remove_pod(&request.into_inner().pod_sandbox_id)
            .await?;
        Ok(Response::new(v1::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<v1::PodSandboxStatusRequest>,
    ) -> Result<Response<v1::PodSandboxStatusResponse>, Status> {
        let r = request.into_inner();
        let pod = self.engine.pod(&r.pod_sandbox_id).await?;
        let mut info = HashMap::new();
        if r.verbose {
            let netns = pod
                .netns
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let verbose = serde_json::json!({
                "shimAddress": pod.shim_address,
                "sandboxPid": pod.sandbox_pid,
                "netns": netns,
                "stopped": pod.stopped,
                "spec": pod.spec,
            });
            info.insert("info".to_string(), verbose.to_string());
        }
        let containers_statuses = self
            .engine
            .containers()
            .await
            .iter()
            .filter(|c| c.pod_id == pod.id)
            .map(container_status)
            .collect();
        Ok(Response::new(v1::PodSandboxStatusResponse {
            status: Some(pod_status(&pod)),
            info,
            containers_statuses,
            timestamp: model::now_nanos(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<v1::ListPodSandboxRequest>,
    ) -> Result<Response<v1::ListPodSandboxResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let items = self
            .engine
            .pods()
            .await
            .iter()
            .filter(|p| filter.id.is_empty() || p.id.starts_with(&filter.id))
            .filter(|p| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == pod_state(p.state))
            })
            .filter(|p| labels_match(&p.spec.labels, &filter.label_selector))
            .map(|p| v1::PodSandbox {
                id: p.id.clone(),
                metadata: Some(pod_metadata(p)),
                state: pod_state(p.state),
                created_at: p.created_at,
                labels: hashmap(&p.spec.labels),
                annotations: hashmap(&p.spec.annotations),
                runtime_handler: String::new(),
            })
            .collect();
        Ok(Response::new(v1::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<v1::CreateContainerRequest>,
    ) -> Result<Response<v1::CreateContainerResponse>, Status> {
        let r = request.into_inner();
        let config = r
            .config
            .ok_or_else(|| invalid("CreateContainer without a config"))?;
        let spec = container_spec(&config)?;
        let id = self
            .engine
            .create_container(&r.pod_sandbox_id, spec)
            .await?;
        Ok(Response::new(v1::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<v1::StartContainerRequest>,
    ) -> Result<Response<v1::StartContainerResponse>, Status> {
        self.engine
            .start_container(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(v1::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<v1::StopContainerRequest>,
    ) -> Result<Response<v1::StopContainerResponse>, Status> {
        let r = request.into_inner();
        self.engine
            .stop_container(&r.container_id, r.timeout)
            .await?;
        Ok(Response::new(v1::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<v1::RemoveContainerRequest>,
    ) -> Result<Response<v1::RemoveContainerResponse>, Status> {
        self.engine
            .remove_container(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(v1::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<v1::ListContainersRequest>,
    ) -> Result<Response<v1::ListContainersResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let containers = self
            .engine
            .containers()
            .await
            .iter()
            .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
            .filter(|c| {
                filter.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&filter.pod_sandbox_id)
            })
            .filter(|c| {
                filter
                    .state
                    .as_ref()
                    .is_none_or(|s| s.state == container_state(c.state))
            })
            .filter(|c| labels_match(&c.spec.labels, &filter.label_selector))
            .map(|c| v1::Container {
                id: c.id.clone(),
                pod_sandbox_id: c.pod_id.clone(),
                metadata: Some(container_metadata(c)),
                image: Some(image_spec(c)),
                image_ref: c.image_ref.clone(),
                image_id: c.image_id.clone(),
                state: container_state(c.state),
                created_at: c.created_at,
                labels: hashmap(&c.spec.labels),
                annotations: hashmap(&c.spec.annotations),
            })
            .collect();
        Ok(Response::new(v1::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<v1::ContainerStatusRequest>,
    ) -> Result<Response<v1::ContainerStatusResponse>, Status> {
        let r = request.into_inner();
        let c = self.engine.container(&r.container_id).await?;
        let mut info = HashMap::new();
        if r.verbose {
            let verbose = serde_json::json!({"podSandboxId": c.pod_id, "spec": c.spec, "oomSeen": c.oom_seen});
            info.insert("info".to_string(), verbose.to_string());
        }
        Ok(Response::new(v1::ContainerStatusResponse {
            status: Some(container_status(&c)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<v1::UpdateContainerResourcesRequest>,
    ) -> Result<Response<v1::UpdateContainerResourcesResponse>, Status> {
        let r = request.into_inner();
        let linux = r
            .linux
            .ok_or_else(|| invalid("UpdateContainerResources without linux resources"))?;
        let res = resources(&linux, &format!("container {}", r.container_id))?;
        self.engine.update_container(&r.container_id, &res).await?;
        Ok(Response::new(v1::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<v1::ReopenContainerLogRequest>,
    ) -> Result<Response<v1::ReopenContainerLogResponse>, Status> {
        self.engine
            .reopen_log(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(v1::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<v1::ExecSyncRequest>,
    ) -> Result<Response<v1::ExecSyncResponse>, Status> {
        let r = request.into_inner();
        let timeout = Duration::from_secs(r.timeout.max(0) as u64);
        let out = self
            .engine
            .exec_sync(&r.container_id, &r.cmd, timeout)
            .await?;
        Ok(Response::new(v1::ExecSyncResponse {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
        }))
    }

    async fn exec(
        &self,
        request: Request<v1::ExecRequest>,
    ) -> Result<Response<v1::ExecResponse>, Status> {
        let r = request.into_inner();
        if r.cmd.is_empty() {
            return Err(invalid("Exec: the command is empty"));
        }
        let options = stream_options(r.cmd, r.tty, r.stdin, r.stdout, r.stderr)?;
        self.running_container(&r.container_id).await?;
        let url = self.streaming.url(StreamRequest::Exec {
            container_id: r.container_id,
            options,
        })?;
        Ok(Response::new(v1::ExecResponse { url }))
    }

    async fn attach(
        &self,
        request: Request<v1::AttachRequest>,
    ) -> Result<Response<v1::AttachResponse>, Status> {
        let r = request.into_inner();
        let options = stream_options(Vec::new(), r.tty, r.stdin, r.stdout, r.stderr)?;
        self.running_container(&r.container_id).await?;
        let url = self.streaming.url(StreamRequest::Attach {
            container_id: r.container_id,
            options,
        })?;
        Ok(Response::new(v1::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<v1::PortForwardRequest>,
    ) -> Result<Response<v1::PortForwardResponse>, Status> {
        let r = request.into_inner();
        let ports = r
            .port
            .iter()
            .map(|p| {
                u16::try_from(*p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid(format!("PortForward: invalid port {p}")))
            })
            .collect::<Result<Vec<u16>, Status>>()?;
        let pod = self.engine.pod(&r.pod_sandbox_id).await?;
        if pod.state != PodState::Ready {
            return Err(Status::failed_precondition(format!(
                "pod {} is not ready",
                r.pod_sandbox_id
            )));
        }
        let url = self.streaming.url(StreamRequest::PortForward {
            pod_id: r.pod_sandbox_id,
            ports,
        })?;
        Ok(Response::new(v1::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<v1::ContainerStatsRequest>,
    ) -> Result<Response<v1::ContainerStatsResponse>, Status> {
        let c = self
            .engine
            .container(&request.into_inner().container_id)
            .await?;
        Ok(Response::new(v1::ContainerStatsResponse {
            stats: Some(self.stats_of(&c).await?),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<v1::ListContainerStatsRequest>,
    ) -> Result<Response<v1::ListContainerStatsResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for c in self.engine.containers().await {
            let wanted = (filter.id.is_empty() || c.id.starts_with(&filter.id))
                && (filter.pod_sandbox_id.is_empty()
                    || c.pod_id.starts_with(&filter.pod_sandbox_id))
                && labels_match(&c.spec.labels, &filter.label_selector)
                && matches!(c.state, ContainerState::Running | ContainerState::Created);
            if wanted {
                stats.push(self.stats_of(&c).await?);
            }
        }
        Ok(Response::new(v1::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<v1::PodSandboxStatsRequest>,
    ) -> Result<Response<v1::PodSandboxStatsResponse>, Status> {
        let pod = self
            .engine
            .pod(&request.into_inner().pod_sandbox_id)
            .await?;
        Ok(Response::new(v1::PodSandboxStatsResponse {
            stats: Some(self.pod_stats_of(&pod).await?),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<v1::ListPodSandboxStatsRequest>,
    ) -> Result<Response<v1::ListPodSandboxStatsResponse>, Status> {
        let filter = request.into_inner().filter.unwrap_or_default();
        let mut stats = Vec::new();
        for p in self.engine.pods().await {
            if (filter.id.is_empty() || p.id.starts_with(&filter.id))
                && labels_match(&p.spec.labels, &filter.label_selector)
                && p.state == PodState::Ready
            {
                stats.push(self.pod_stats_of(&p).await?);
            }
        }
        Ok(Response::new(v1::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        request: Request<v1::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<v1::UpdateRuntimeConfigResponse>, Status> {
        // kubelet sends the pod CIDR here; the CNI config already has it.
        let cidr = request
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        tracing::info!(pod_cidr = %cidr, "UpdateRuntimeConfig (the CNI config decides the pods' addresses)");
        Ok(Response::new(v1::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        _request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let network = self.engine.cni().network();
        let conditions = vec![
            v1::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                ..Default::default()
            },
            match network {
                Ok(_) => v1::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: true,
                    ..Default::default()
                },
                Err(e) => v1::RuntimeCondition {
                    r#type: "NetworkReady".into(),
                    status: false,
                    reason: "NetworkPluginNotReady".into(),
                    message: e.to_string(),
                },
            },
        ];
        Ok(Response::new(v1::StatusResponse {
            status: Some(v1::RuntimeStatus { conditions }),
            ..Default::default()
        }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<v1::CheckpointContainerRequest>,
    ) -> Result<Response<v1::CheckpointContainerResponse>, Status> {
        Err(unimplemented(
            "CheckpointContainer",
            "container checkpoints are not supported by Arrow",
        ))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<v1::ListMetricDescriptorsRequest>,
    ) -> Result<Response<v1::ListMetricDescriptorsResponse>, Status> {
        Err(unimplemented(
            "ListMetricDescriptors",
            "CRI-native metrics are not served; kubelet uses the stats calls",
        ))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<v1::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<v1::ListPodSandboxMetricsResponse>, Status> {
        Err(unimplemented(
            "ListPodSandboxMetrics",
            "CRI-native metrics are not served; kubelet uses the stats calls",
        ))
    }

    async fn runtime_config(
        &self,
        _request: Request<v1::RuntimeConfigRequest>,
    ) -> Result<Response<v1::RuntimeConfigResponse>, Status> {
        Ok(Response::new(v1::RuntimeConfigResponse {
            linux: Some(v1::LinuxRuntimeConfiguration {
                cgroup_driver: v1::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }

    type GetContainerEventsStream =
        Pin<Box<dyn Stream<Item = Result<v1::ContainerEventResponse, Status>> + Send + 'static>>;

    /// Every lifecycle event from the call on, until the client goes. A
    /// client too slow to keep up gets an error ending the stream (it then
    /// lists, as kubelet's Evented PLEG does on any stream error).
    async fn get_container_events(
        &self,
        _request: Request<v1::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        use tokio::sync::broadcast::error::RecvError;
        let rx = self.engine.subscribe();
        let stream = futures_util::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Ok(event) => Some((Ok(container_event(&event)), Some(rx))),
                Err(RecvError::Closed) => None,
                Err(RecvError::Lagged(n)) => Some((
                    Err(Status::resource_exhausted(format!(
                        "GetContainerEvents: the client fell {n} events behind; list pods and containers and subscribe again"
                    ))),
                    None,
                )),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_config() -> v1::PodSandboxConfig {
        v1::PodSandboxConfig {
            metadata: Some(v1::PodSandboxMetadata {
                name: "web".into(),
                uid: "u1".into(),
                namespace: "default".into(),
                attempt: 1,
            }),
            hostname: "web".into(),
            port_mappings: vec![
                v1::PortMapping {
                    protocol: v1::Protocol::Udp as i32,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: String::new(),
                },
                v1::PortMapping {
                    protocol: 0,
                    container_port: 80,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
            linux: Some(v1::LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/podu1".into(),
                resources: Some(v1::LinuxContainerResources {
                    memory_limit_in_bytes: 1 << 28,
                    cpu_quota: 50_000,
                    cpu_period: 100_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pods_translate_and_host_namespaces_are_refused() {
        let spec = pod_spec(&pod_config()).unwrap();
        assert_eq!(spec.name, "web");
        assert_eq!(spec.port_mappings.len(), 1);
        assert_eq!(spec.port_mappings[0].protocol, "udp");
        assert_eq!(spec.resources.unwrap().memory_limit, Some(1 << 28));
        for which in 0..3 {
            let mut c = pod_config();
            let mut ns = v1::NamespaceOption::default();
            match which {
                0 => ns.network = v1::NamespaceMode::Node as i32,
                1 => ns.pid = v1::NamespaceMode::Node as i32,
                _ => ns.ipc = v1::NamespaceMode::Node as i32,
            }
            c.linux.as_mut().unwrap().security_context = Some(v1::LinuxSandboxSecurityContext {
                namespace_options: Some(ns),
                ..Default::default()
            });
            let e = pod_spec(&c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(
                e.message()
                    .contains(["hostNetwork", "hostPID", "hostIPC"][which]),
                "{}",
                e.message()
            );
        }
        let mut no_meta = pod_config();
        no_meta.metadata = None;
        assert!(pod_spec(&no_meta).is_err());
    }

    #[test]
    fn containers_translate() {
        let c = v1::ContainerConfig {
            metadata: Some(v1::ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(v1::ImageSpec {
                image: "busybox".into(),
                ..Default::default()
            }),
            command: vec!["sh".into()],
            envs: vec![v1::KeyValue {
                key: "A".into(),
                value: "1".into(),
            }],
            mounts: vec![v1::Mount {
                container_path: "/data".into(),
                host_path: "/srv".into(),
                readonly: true,
                propagation: 1,
                ..Default::default()
            }],
            linux: Some(v1::LinuxContainerConfig {
                security_context: Some(v1::LinuxContainerSecurityContext {
                    run_as_user: Some(v1::Int64Value { value: 1000 }),
                    namespace_options: Some(v1::NamespaceOption {
                        pid: v1::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    seccomp: Some(v1::SecurityProfile {
                        profile_type: 2,
                        localhost_ref: "/p.json".into(),
                    }),
                    ..Default::default()
                }),
                resources: Some(v1::LinuxContainerResources {
                    hugepage_limits: vec![v1::HugepageLimit {
                        page_size: "2MB".into(),
                        limit: 0,
                    }],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let spec = container_spec(&c).unwrap();
        assert_eq!(spec.security.run_as_user, Some(1000));
        assert!(!spec.own_pid_namespace);
        assert_eq!(spec.mounts[0].propagation, Propagation::HostToContainer);
        assert_eq!(spec.security.seccomp, Seccomp::Localhost("/p.json".into()));
        assert_eq!(spec.envs, vec![("A".to_string(), "1".to_string())]);

        let mut huge = c.clone();
        huge.linux
            .as_mut()
            .unwrap()
            .resources
            .as_mut()
            .unwrap()
            .hugepage_limits[0]
            .limit = 1 << 21;
        assert!(container_spec(&huge)
            .unwrap_err()
            .message()
            .contains("hugepage"));
        let mut bad_user = c.clone();
        bad_user
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .run_as_user = Some(v1::Int64Value { value: -1 });
        assert!(container_spec(&bad_user).is_err());
        let mut no_image = c;
        no_image.image = None;
        assert!(container_spec(&no_image).is_err());
    }

    #[test]
    fn legacy_seccomp_paths() {
        assert_eq!(seccomp(None, "").unwrap(), Seccomp::Unconfined);
        assert_eq!(
            seccomp(None, "runtime/default").unwrap(),
            Seccomp::RuntimeDefault
        );
        assert_eq!(
            seccomp(None, "localhost//x.json").unwrap(),
            Seccomp::Localhost("/x.json".into())
        );
        assert!(seccomp(None, "weird").is_err());
    }

    #[test]
    fn events_carry_the_pod_and_its_containers_as_they_were() {
        let pod = model::Pod {
            id: "p1".into(),
            spec: pod_spec(&pod_config()).unwrap(),
            state: PodState::Ready,
            created_at: 1,
            netns: None,
            ip: Some("10.0.0.2".into()),
            additional_ips: Vec::new(),
            shim_address: String::new(),
            sandbox_pid: 0,
            stopped: false,
        };
        let container = model::Container {
            id: "c1".into(),
            pod_id: "p1".into(),
            spec: ContainerSpec {
                name: "app".into(),
                ..Default::default()
            },
            image_id: "sha256:i".into(),
            image_ref: "busybox".into(),
            state: ContainerState::Exited,
            created_at: 2,
            started_at: 3,
            exit: Some(model::ExitRecord {
                code: 137,
                at: 4,
                oom_killed: true,
            }),
            oom_seen: true,
            log_file: Default::default(),
        };
        let e = container_event(&LifecycleEvent {
            id: "c1".into(),
            kind: Kind::Stopped,
            at: 5,
            pod: Some(pod),
            containers: vec![container],
        });
        assert_eq!(e.container_id, "c1");
        assert_eq!(
            e.container_event_type,
            v1::ContainerEventType::ContainerStoppedEvent as i32
        );
        assert_eq!(e.created_at, 5);
        let sandbox = e.pod_sandbox_status.unwrap();
        assert_eq!(sandbox.id, "p1");
        assert_eq!(sandbox.state, v1::PodSandboxState::SandboxReady as i32);
        let [c] = e.containers_statuses.as_slice() else {
            panic!("one container expected");
        };
        assert_eq!((c.exit_code, c.reason.as_str()), (137, "OOMKilled"));
        let gone = container_event(&LifecycleEvent {
            id: "p1".into(),
            kind: Kind::Deleted,
            at: 6,
            pod: None,
            containers: Vec::new(),
        });
        assert_eq!(
            gone.container_event_type,
            v1::ContainerEventType::ContainerDeletedEvent as i32
        );
        assert!(gone.pod_sandbox_status.is_none());
    }
}
