//! Translating OCI runtime specs into what Arrow does with them: the pod's VM
//! shape, the agent's `CreateContainer` and `CreateProcess` calls.
//!
//! Everything a spec asks for is either honoured in the guest, or named in a
//! warning (things a VM makes moot, like device cgroups), or refused with an
//! error (things we cannot do and that would change what the program sees).

use std::collections::HashMap;

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Mount, Process, Spec};
use proto::agent;

/// Annotation CRI puts on every container of a pod: `sandbox` or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// Annotation CRI puts on every container of a pod: the pod's sandbox id.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// Pod-level limits containerd 1.7+ adds to the sandbox spec.
const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// Guest RAM when nothing limits the pod.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// What the guest kernel and arrow-init need on top of the containers'
/// limits.
pub const MEMORY_OVERHEAD: u64 = 64 << 20;
/// Guest RAM is a multiple of this, so that similar pods share a template.
pub const MEMORY_STEP: u64 = 128 << 20;
/// vCPUs when nothing limits the pod.
pub const DEFAULT_VCPUS: u8 = 1;
/// Most vCPUs a pod gets.
pub const MAX_VCPUS: u8 = 8;

/// A spec Arrow cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the spec has no process")]
    NoProcess,
    #[error("process.args is empty")]
    NoArgs,
    #[error("mount {destination}: type {kind:?} is not supported in an Arrow microVM")]
    UnsupportedMount { destination: String, kind: String },
    #[error("mount {0}: a bind mount needs a source")]
    BindWithoutSource(String),
    #[error("mount destination {0:?} must be an absolute path")]
    RelativeDestination(String),
    #[error("annotation {key}={value:?}: {why}")]
    BadAnnotation {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(
        "{field}: the spec shares the host's {namespace} namespace (no linux.namespaces \
         entry of type {namespace}); an Arrow microVM has its own kernel and cannot \
         share it: run this pod with another RuntimeClass"
    )]
    HostNamespace {
        field: &'static str,
        namespace: &'static str,
    },
    #[error("{what} {value:?} is not a plain identifier (letters, digits and . _ - inside, at most 76 characters)")]
    BadIdentifier { what: &'static str, value: String },
}

/// Refuses anything but containerd's identifiers (`[A-Za-z0-9]+` joined by
/// single `.`, `_` or `-`, at most 76 characters): ids and namespaces
/// become path components on the host, so `..`, `/` and the like must never
/// get that far.
pub fn check_identifier(what: &'static str, value: &str) -> Result<(), SpecError> {
    let bytes = value.as_bytes();
    let separator = |b: &u8| matches!(b, b'.' | b'_' | b'-');
    let ok = !bytes.is_empty()
        && bytes.len() <= 76
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || separator(b))
        && !bytes.first().is_some_and(separator)
        && !bytes.last().is_some_and(separator)
        && !bytes
            .windows(2)
            .any(|w| separator(&w[0]) && separator(&w[1]));
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadIdentifier {
            what,
            value: value.to_string(),
        })
    }
}

/// What a container is to the pod, from CRI's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The pod's sandbox (pause) container: it becomes the VM itself.
    Sandbox,
    /// An app container of the pod whose sandbox has this id.
    PodMember { sandbox_id: String },
    /// A container with no pod around it (`ctr run`): it gets a VM of its own.
    Standalone,
}

impl Role {
    /// Reads the role of container `id` from its spec's annotations. Both
    /// ids must be plain identifiers: they name host directories.
    pub fn of(id: &str, spec: &Spec) -> Result<Role, SpecError> {
        check_identifier("container id", id)?;
        let annotations = spec.annotations().as_ref();
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        Ok(match (get(CONTAINER_TYPE), get(SANDBOX_ID)) {
            (Some("sandbox"), _) => Role::Sandbox,
            (_, Some(sandbox)) if sandbox != id => {
                check_identifier(SANDBOX_ID, sandbox)?;
                Role::PodMember {
                    sandbox_id: sandbox.to_string(),
                }
            }
            (_, Some(_)) => Role::Sandbox,
            _ => Role::Standalone,
        })
    }

    /// The id of the pod (and of its one shim and VM) container `id` belongs to.
    pub fn pod_id<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            Role::PodMember { sandbox_id } => sandbox_id,
            Role::Sandbox | Role::Standalone => id,
        }
    }
}

/// The size of a pod's VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodVmSize {
    pub memory_bytes: u64,
    pub vcpus: u8,
}

impl PodVmSize {
    /// Sizes the VM of a pod from the spec that creates it.
    ///
    /// The rule: memory = the pod's memory limit + [`MEMORY_OVERHEAD`],
    /// rounded up to [`MEMORY_STEP`], or [`DEFAULT_MEMORY`] when unlimited;
    /// vCPUs = ceil(CPU quota / period), at least 1 and at most
    /// [`MAX_VCPUS`], or [`DEFAULT_VCPUS`] when unlimited. The pod's limits
    /// are the sandbox annotations containerd 1.7+ sets (the sum of the
    /// containers' limits), else, for a standalone container, its own
    /// cgroup limits. containerd 1.6 does not tell a sandbox its pod's
    /// limits, so pods under it get the defaults; the limits still apply to
    /// each container's cgroup inside the guest.
    pub fn for_spec(spec: &Spec, role: &Role) -> Result<PodVmSize, SpecError> {
        let annotations = spec.annotations().clone().unwrap_or_default();
        let (memory, quota, period) = match role {
            Role::Sandbox => (
                annotation_i64(&annotations, SANDBOX_MEMORY)?,
                annotation_i64(&annotations, SANDBOX_CPU_QUOTA)?,
                annotation_i64(&annotations, SANDBOX_CPU_PERIOD)?,
            ),
            _ => {
                let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
                let memory = resources
                    .and_then(|r| r.memory().as_ref())
                    .and_then(|m| m.limit());
                let cpu = resources.and_then(|r| r.cpu().as_ref());
                (
                    memory,
                    cpu.and_then(|c| c.quota()),
                    cpu.and_then(|c| c.period()).map(|p| p as i64),
                )
            }
        };
        Ok(PodVmSize {
            memory_bytes: memory_for_limit(memory),
            vcpus: vcpus_for_quota(quota, period),
        })
    }
}

fn annotation_i64(
    annotations: &HashMap<String, String>,
    key: &'static str,
) -> Result<Option<i64>, SpecError> {
    match annotations.get(key) {
        None => Ok(None),
        Some(value) => value
            .parse::<i64>()
            .map(Some)
            .map_err(|e| SpecError::BadAnnotation {
                key,
                value: value.clone(),
                why: e.to_string(),
            }),
    }
}

fn memory_for_limit(limit: Option<i64>) -> u64 {
    match limit {
        Some(limit) if limit > 0 => {
            let wanted = (limit as u64).saturating_add(MEMORY_OVERHEAD);
            wanted.div_ceil(MEMORY_STEP).saturating_mul(MEMORY_STEP)
        }
        _ => DEFAULT_MEMORY,
    }
}

fn vcpus_for_quota(quota: Option<i64>, period: Option<i64>) -> u8 {
    match (quota, period) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => {
            let vcpus = (quota as u64).div_ceil(period as u64);
            vcpus.clamp(1, u64::from(MAX_VCPUS)) as u8
        }
        _ => DEFAULT_VCPUS,
    }
}

/// A bind mount the host shares into the guest: `source` on the host is
/// mounted at `share_path` (relative to the pod's shared directory), which
/// the guest binds at `destination` in the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedBind {
    pub source: String,
    pub share_path: String,
    pub read_only: bool,
}

/// What the guest must do for a container, and what the host must share
/// before it can.
#[derive(Debug)]
pub struct ContainerPlan {
    pub request: agent::CreateContainer,
    pub binds: Vec<SharedBind>,
    /// Things the spec asks for that the guest does not do, for the log.
    pub warnings: Vec<String>,
}

/// The namespaces a VM cannot share with the host, with the Kubernetes pod
/// field that asks for each (CRI: `NamespaceMode::NODE`).
const HOST_NAMESPACES: [(LinuxNamespaceType, &str, &str); 3] = [
    (LinuxNamespaceType::Network, "hostNetwork", "network"),
    (LinuxNamespaceType::Pid, "hostPID", "pid"),
    (LinuxNamespaceType::Ipc, "hostIPC", "ipc"),
];

/// Refuses a VM's spec (sandbox or standalone) that leaves out the network,
/// PID or IPC namespace, which is how containerd says "share the host's".
/// Inside a VM these would silently be the guest's own, so the pod would
/// run but not see what it asked for (the host's interfaces, processes or
/// IPC objects); refusing names the field so the user picks a runc
/// RuntimeClass instead.
pub fn refuse_host_namespaces(spec: &Spec) -> Result<(), SpecError> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    for (typ, field, namespace) in HOST_NAMESPACES {
        let asked = namespaces.is_some_and(|ns| ns.iter().any(|n| n.typ() == typ));
        if !asked {
            return Err(SpecError::HostNamespace { field, namespace });
        }
    }
    Ok(())
}

/// The spec's `linux.sysctl`, sorted by key.
pub fn sysctls(spec: &Spec) -> Vec<agent::Sysctl> {
    let mut sysctls: Vec<_> = spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
        .iter()
        .flat_map(|m| m.iter())
        .map(|(key, value)| agent::Sysctl {
            key: key.clone(),
            value: value.clone(),
        })
        .collect();
    sysctls.sort_by(|a, b| a.key.cmp(&b.key));
    sysctls
}

/// Adds the pod's sysctls (from the sandbox spec) to a container's own,
/// which win on the same key. Under runc the pod's sysctls are set in the
/// pause container's namespaces, which the app containers join; in a VM
/// those namespaces are the guest's, so the guest applies them with the
/// first container, before it starts.
pub fn merge_pod_sysctls(pod: &[agent::Sysctl], own: &mut Vec<agent::Sysctl>) {
    for s in pod {
        if !own.iter().any(|o| o.key == s.key) {
            own.push(s.clone());
        }
    }
    own.sort_by(|a, b| a.key.cmp(&b.key));
}

/// The PID namespace a container asks for, as containerd's CRI plugin
/// writes Kubernetes' PID modes into `linux.namespaces`: a `pid` entry
/// without a path is a namespace of its own (CONTAINER, also `ctr run`'s
/// default); one with a path (`/proc/<pid>/ns/pid`) joins the pod's (POD,
/// shareProcessNamespace). In Arrow every task pid containerd knows is the
/// VMM's, so TARGET mode (an ephemeral container joining another
/// container's namespace, whose path names that container's "pid") looks
/// the same as POD and gets the pod's: a superset of the target's
/// processes. No `pid` entry (hostPID) was refused with the sandbox; an app
/// container without one gets the pod's too.
pub fn pid_namespace(spec: &Spec) -> agent::PidNamespace {
    let pid = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Pid));
    match pid {
        Some(ns) if ns.path().is_none() => agent::PidNamespace::Container,
        _ => agent::PidNamespace::Pod,
    }
}

/// Where a container's rootfs lives in the pod's share.
pub fn rootfs_share_path(container_id: &str) -> String {
    format!("{container_id}/rootfs")
}

/// Plans container `id`: its mounts (bind sources become paths in the
/// share), masked and read-only paths, sysctls, hostname and limits.
pub fn plan_container(id: &str, spec: &Spec) -> Result<ContainerPlan, SpecError> {
    let mut warnings = Vec::new();
    let mut binds = Vec::new();
    let mut mounts = Vec::new();
    for mount in spec.mounts().iter().flatten() {
        if let Some(w) = propagation_warning(mount) {
            warnings.push(w);
        }
        if let Some(m) = plan_mount(id, mount, &mut binds)? {
            mounts.push(m);
        }
    }
    let readonly_rootfs = spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false);
    let linux = spec.linux().as_ref();
    let mut request = agent::CreateContainer {
        id: id.to_string(),
        rootfs: rootfs_share_path(id),
        readonly_rootfs,
        mounts,
        hostname: spec.hostname().clone().unwrap_or_default(),
        pid_namespace: pid_namespace(spec) as i32,
        ..Default::default()
    };
    if let Some(linux) = linux {
        request.masked_paths = linux.masked_paths().clone().unwrap_or_default();
        request.readonly_paths = linux.readonly_paths().clone().unwrap_or_default();
        request.sysctls = sysctls(spec);
        if let Some(resources) = linux.resources() {
            request.resources = Some(resources_request(resources, &mut warnings));
        }
        if let Some(profile) = linux.seccomp() {
            let program = crate::seccomp::compile(profile)?;
            if !program.unknown.is_empty() {
                warnings.push(format!(
                    "linux.seccomp: system calls unknown on x86_64 skipped: {}",
                    program.unknown.join(", ")
                ));
            }
            request.seccomp = Some(agent::Seccomp {
                program: program.to_bytes(),
                flags: program.flags,
            });
        }
        if linux.devices().as_ref().is_some_and(|d| !d.is_empty()) {
            warnings.push("linux.devices: host devices are not passed into the VM".into());
        }
        if linux.mount_label().is_some() {
            warnings.push("linux.mountLabel: SELinux labels are not applied".into());
        }
    }
    if spec.hooks().is_some() {
        warnings.push("hooks: OCI hooks are not run by Arrow".into());
    }
    if let Some(process) = spec.process() {
        if process.apparmor_profile().is_some() {
            warnings.push("process.apparmorProfile: AppArmor is not applied in the guest".into());
        }
        if process.selinux_label().is_some() {
            warnings.push("process.selinuxLabel: SELinux is not applied in the guest".into());
        }
    }
    Ok(ContainerPlan {
        request,
        binds,
        warnings,
    })
}

/// Bidirectional propagation cannot cross the VM: a mount made in the guest
/// lives in the guest's kernel, which virtio-fs cannot show to the host.
/// The volume is still shared (files written land on the host), so this is
/// logged rather than refused.
fn propagation_warning(mount: &Mount) -> Option<String> {
    let options = mount.options().as_ref()?;
    let shared = options.iter().any(|o| o == "shared" || o == "rshared");
    shared.then(|| {
        format!(
            "mount {}: {} propagation does not reach the host: mounts made under it in the \
             VM stay in the VM (virtio-fs shares files, not mounts)",
            mount.destination().display(),
            if options.iter().any(|o| o == "rshared") {
                "rshared"
            } else {
                "shared"
            }
        )
    })
}

fn plan_mount(
    id: &str,
    mount: &Mount,
    binds: &mut Vec<SharedBind>,
) -> Result<Option<agent::Mount>, SpecError> {
    let destination = mount.destination().to_string_lossy().into_owned();
    if !destination.starts_with('/') {
        return Err(SpecError::RelativeDestination(destination));
    }
    let options = mount.options().clone().unwrap_or_default();
    let is_bind = options.iter().any(|o| o == "bind" || o == "rbind");
    let kind = mount.typ().clone().unwrap_or_default();
    let kind = if is_bind { "bind".to_string() } else { kind };
    // CRI binds the pod's /dev/shm from a host tmpfs. Over virtio-fs it
    // would be a slow file share with no shared-memory semantics, so the
    // guest gets its own tmpfs (shared by nothing else in the VM).
    if kind == "bind" && destination == "/dev/shm" {
        return Ok(Some(agent::Mount {
            destination,
            r#type: "tmpfs".into(),
            source: "shm".into(),
            options: vec![
                "nosuid".into(),
                "noexec".into(),
                "nodev".into(),
                "mode=1777".into(),
                "size=65536k".into(),
            ],
        }));
    }
    let (kind, source) = match kind.as_str() {
        "bind" | "none" | "" => {
            let Some(source) = mount.source() else {
                return Err(SpecError::BindWithoutSource(destination));
            };
            let share_path = format!("{id}/mounts/{}", binds.len());
            binds.push(SharedBind {
                source: source.to_string_lossy().into_owned(),
                share_path: share_path.clone(),
                read_only: options.iter().any(|o| o == "ro"),
            });
            ("bind".to_string(), share_path)
        }
        "tmpfs" | "proc" | "sysfs" | "devpts" | "mqueue" | "cgroup2" => (
            kind.clone(),
            mount
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| kind.clone()),
        ),
        // runc's default spec mounts cgroup v1; the guest has only v2.
        "cgroup" => ("cgroup2".to_string(), "cgroup2".to_string()),
        other => {
            return Err(SpecError::UnsupportedMount {
                destination,
                kind: other.to_string(),
            })
        }
    };
    Ok(Some(agent::Mount {
        destination,
        r#type: kind,
        source,
        options,
    }))
}

/// cgroup limits for the guest. Only what a guest cgroup v2 can do.
pub fn resources_request(
    resources: &LinuxResources,
    warnings: &mut Vec<String>,
) -> agent::Resources {
    let mut out = agent::Resources::default();
    if let Some(memory) = resources.memory() {
        out.memory_limit = memory.limit().filter(|l| *l > 0);
        out.memory_swap = memory.swap().filter(|l| *l > 0);
        if memory.reservation().is_some() || memory.kernel().is_some() {
            warnings.push("memory reservation/kernel limits are not applied".into());
        }
    }
    if let Some(cpu) = resources.cpu() {
        out.cpu_quota = cpu.quota();
        out.cpu_period = cpu.period();
        out.cpu_shares = cpu.shares().filter(|s| *s > 0);
        if cpu.cpus().is_some() || cpu.mems().is_some() {
            warnings.push("cpuset cpus/mems are not applied (the VM has its own vCPUs)".into());
        }
    }
    if let Some(pids) = resources.pids() {
        out.pids_limit = Some(pids.limit());
    }
    if resources.block_io().is_some() || resources.hugepage_limits().is_some() {
        warnings.push("blockIO and hugepage limits are not applied".into());
    }
    out
}

/// Parses the `LinuxResources` JSON containerd sends with `Update`.
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources, serde_json::Error> {
    serde_json::from_slice(json)
}

/// Parses the OCI `Process` JSON containerd sends with `Exec`.
pub fn parse_process(json: &[u8]) -> Result<Process, serde_json::Error> {
    serde_json::from_slice(json)
}

/// The agent call that prepares `process` of container `container_id`.
pub fn process_request(
    agent_id: &str,
    container_id: &str,
    process: &Process,
    with_stdin: bool,
) -> Result<agent::CreateProcess, SpecError> {
    let args = process.args().clone().unwrap_or_default();
    if args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    if process.command_line().is_some() {
        return Err(SpecError::Unsupported(
            "process.commandLine is a Windows field".into(),
        ));
    }
    let user = process.user();
    let rlimits = process
        .rlimits()
        .iter()
        .flatten()
        .map(|r| agent::Rlimit {
            r#type: rlimit_name(&format!("{:?}", r.typ())),
            soft: r.soft(),
            hard: r.hard(),
        })
        .collect();
    let capabilities = process.capabilities().as_ref().map(|caps| {
        let names = |set: &Option<oci_spec::runtime::Capabilities>| {
            let mut v: Vec<String> = set.iter().flatten().map(|c| format!("CAP_{c}")).collect();
            v.sort();
            v
        };
        agent::Capabilities {
            bounding: names(caps.bounding()),
            effective: names(caps.effective()),
            inheritable: names(caps.inheritable()),
            permitted: names(caps.permitted()),
            ambient: names(caps.ambient()),
        }
    });
    Ok(agent::CreateProcess {
        id: agent_id.to_string(),
        args,
        env: process.env().clone().unwrap_or_default(),
        cwd: process.cwd().to_string_lossy().into_owned(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        rlimits,
        terminal: process.terminal().unwrap_or(false),
        stdin: with_stdin,
        root: String::new(),
        umask: user.umask(),
        no_new_privs: process.no_new_privileges().unwrap_or(false),
        container_id: container_id.to_string(),
        capabilities,
        oom_score_adj: process.oom_score_adj(),
    })
}

/// oci-spec's rlimit type prints as `RlimitNofile`; the agent wants the OCI
/// name `RLIMIT_NOFILE`.
fn rlimit_name(debug_name: &str) -> String {
    let rest = debug_name.strip_prefix("Rlimit").unwrap_or(debug_name);
    format!("RLIMIT_{}", rest.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).expect("test spec parses")
    }

    const BASE: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10]},
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin"],
            "cwd": "/work",
            "terminal": false,
            "noNewPrivileges": true,
            "oomScoreAdj": 5,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"]}
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "web",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
            {"destination": "/data", "source": "/srv/data", "options": ["rbind", "rw"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind", "rw"]}
        ],
        "linux": {
            "resources": {
                "memory": {"limit": 209715200},
                "cpu": {"quota": 150000, "period": 100000, "shares": 512},
                "pids": {"limit": 64}
            },
            "sysctl": {"net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1"},
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    }"#;

    #[test]
    fn host_namespaces_are_refused_by_field() {
        let with = |types: &[&str]| {
            let ns: Vec<String> = types
                .iter()
                .map(|t| format!(r#"{{"type": "{t}"}}"#))
                .collect();
            spec(&format!(
                r#"{{"ociVersion": "1.0.2", "linux": {{"namespaces": [{}]}}}}"#,
                ns.join(",")
            ))
        };
        assert!(refuse_host_namespaces(&with(&["pid", "ipc", "uts", "mount", "network"])).is_ok());
        let err = refuse_host_namespaces(&with(&["pid", "ipc", "mount"])).unwrap_err();
        assert!(err.to_string().starts_with("hostNetwork: "), "{err}");
        let err = refuse_host_namespaces(&with(&["ipc", "network"])).unwrap_err();
        assert!(err.to_string().starts_with("hostPID: "), "{err}");
        let err = refuse_host_namespaces(&with(&["pid", "network"])).unwrap_err();
        assert!(err.to_string().starts_with("hostIPC: "), "{err}");
        let none = spec(r#"{"ociVersion": "1.0.2"}"#);
        assert!(refuse_host_namespaces(&none).is_err());
    }

    #[test]
    fn pid_namespace_follows_the_specs_pid_entry() {
        let with = |ns: &str| {
            spec(&format!(
                r#"{{"ociVersion": "1.0.2", "linux": {{"namespaces": [{{"type": "ipc"}}{ns}]}}}}"#
            ))
        };
        use agent::PidNamespace as P;
        assert_eq!(pid_namespace(&with(r#",{"type": "pid"}"#)), P::Container);
        let pod = r#",{"type": "pid", "path": "/proc/4242/ns/pid"}"#;
        assert_eq!(pid_namespace(&with(pod)), P::Pod);
        assert_eq!(pid_namespace(&with("")), P::Pod);
        assert_eq!(pid_namespace(&spec(r#"{"ociVersion": "1.0.2"}"#)), P::Pod);
        // The request carries it.
        let mut s = spec(BASE);
        let plan = plan_container("c", &s).unwrap();
        assert_eq!(plan.request.pid_namespace(), P::Pod);
        let linux: oci_spec::runtime::Linux =
            serde_json::from_str(r#"{"namespaces": [{"type": "pid"}, {"type": "mount"}]}"#)
                .unwrap();
        s.set_linux(Some(linux));
        let plan = plan_container("c", &s).unwrap();
        assert_eq!(plan.request.pid_namespace(), P::Container);
    }

    #[test]
    fn shared_propagation_is_logged() {
        let mut s = spec(BASE);
        let mut mounts = s.mounts().clone().unwrap();
        let mut options = mounts[3].options().clone().unwrap();
        options.push("rshared".into());
        mounts[3].set_options(Some(options));
        s.set_mounts(Some(mounts));
        let plan = plan_container("c", &s).unwrap();
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.starts_with("mount /data: rshared propagation does not reach")),
            "{:?}",
            plan.warnings
        );
        assert!(plan_container("c", &spec(BASE))
            .unwrap()
            .warnings
            .iter()
            .all(|w| !w.contains("propagation")));
    }

    #[test]
    fn seccomp_is_compiled_for_the_guest() {
        let mut s = spec(BASE);
        assert!(plan_container("c", &s).unwrap().request.seccomp.is_none());
        let profile: oci_spec::runtime::LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
                {"names": ["sethostname", "socketcall"], "action": "SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let mut linux = s.linux().clone().unwrap();
        linux.set_seccomp(Some(profile));
        s.set_linux(Some(linux));
        let plan = plan_container("c", &s).unwrap();
        let seccomp = plan.request.seccomp.unwrap();
        // arch check (6), one rule (2), the default (1).
        assert_eq!(seccomp.program.len(), 9 * 8);
        assert!(plan.warnings.iter().any(|w| w.contains("socketcall")));
    }

    #[test]
    fn pod_sysctls_merge_under_the_containers_own() {
        let s = |k: &str, v: &str| agent::Sysctl {
            key: k.into(),
            value: v.into(),
        };
        let pod = sysctls(&spec(BASE));
        assert_eq!(
            pod,
            vec![
                s("kernel.shm_rmid_forced", "1"),
                s("net.ipv4.ip_forward", "1")
            ]
        );
        let mut own = vec![s("net.ipv4.ip_forward", "0"), s("fs.mqueue.msg_max", "100")];
        merge_pod_sysctls(&pod, &mut own);
        assert_eq!(
            own,
            vec![
                s("fs.mqueue.msg_max", "100"),
                s("kernel.shm_rmid_forced", "1"),
                s("net.ipv4.ip_forward", "0")
            ]
        );
    }

    #[test]
    fn roles_follow_cri_annotations() {
        let mut s = spec(BASE);
        assert_eq!(Role::of("c", &s).unwrap(), Role::Standalone);
        s.set_annotations(Some(HashMap::from([
            (CONTAINER_TYPE.to_string(), "sandbox".to_string()),
            (SANDBOX_ID.to_string(), "pod".to_string()),
        ])));
        assert_eq!(Role::of("pod", &s).unwrap(), Role::Sandbox);
        s.set_annotations(Some(HashMap::from([
            (CONTAINER_TYPE.to_string(), "container".to_string()),
            (SANDBOX_ID.to_string(), "pod".to_string()),
        ])));
        let role = Role::of("app", &s).unwrap();
        assert_eq!(
            role,
            Role::PodMember {
                sandbox_id: "pod".into()
            }
        );
        assert_eq!(role.pod_id("app"), "pod");
        for bad in ["../pod", "a/b", "..", "", "pod/"] {
            s.set_annotations(Some(HashMap::from([(
                SANDBOX_ID.to_string(),
                bad.to_string(),
            )])));
            assert!(Role::of("app", &s).is_err(), "sandbox id {bad:?}");
        }
        assert!(Role::of("../app", &spec(BASE)).is_err());
    }

    #[test]
    fn identifiers_are_containerds() {
        for good in ["a", "k8s.io", "abc-123_x.y", &"f".repeat(64)] {
            check_identifier("id", good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/a",
            "a..b",
            "-a",
            "a-",
            "a b",
            "a\0",
            "ä",
            &"f".repeat(77),
        ] {
            assert!(check_identifier("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn vm_shape_rule() {
        let s = spec(BASE);
        // 200 MiB + 64 MiB overhead, rounded up to 128 MiB steps; 1.5 CPUs -> 2.
        assert_eq!(
            PodVmSize::for_spec(&s, &Role::Standalone).unwrap(),
            PodVmSize {
                memory_bytes: 384 << 20,
                vcpus: 2
            }
        );
        // A sandbox without containerd 1.7's annotations gets the defaults.
        assert_eq!(
            PodVmSize::for_spec(&s, &Role::Sandbox).unwrap(),
            PodVmSize {
                memory_bytes: DEFAULT_MEMORY,
                vcpus: DEFAULT_VCPUS
            }
        );
        let mut s = spec(BASE);
        s.set_annotations(Some(HashMap::from([
            (SANDBOX_MEMORY.to_string(), "1073741824".to_string()),
            (SANDBOX_CPU_QUOTA.to_string(), "1000000".to_string()),
            (SANDBOX_CPU_PERIOD.to_string(), "100000".to_string()),
        ])));
        assert_eq!(
            PodVmSize::for_spec(&s, &Role::Sandbox).unwrap(),
            PodVmSize {
                memory_bytes: 1152 << 20,
                vcpus: MAX_VCPUS
            }
        );
        s.set_annotations(Some(HashMap::from([(
            SANDBOX_MEMORY.to_string(),
            "lots".to_string(),
        )])));
        assert!(PodVmSize::for_spec(&s, &Role::Sandbox).is_err());
    }

    #[test]
    fn container_plan_shares_binds_and_keeps_guest_mounts() {
        let plan = plan_container("c1", &spec(BASE)).unwrap();
        let r = &plan.request;
        assert_eq!(r.rootfs, "c1/rootfs");
        assert!(r.readonly_rootfs);
        assert_eq!(r.hostname, "web");
        let kinds: Vec<_> = r.mounts.iter().map(|m| m.r#type.as_str()).collect();
        assert_eq!(kinds, ["proc", "cgroup2", "bind", "bind", "tmpfs"]);
        assert_eq!(r.mounts[2].source, "c1/mounts/0");
        assert_eq!(r.mounts[3].source, "c1/mounts/1");
        assert_eq!(
            plan.binds,
            vec![
                SharedBind {
                    source: "/var/lib/x/hosts".into(),
                    share_path: "c1/mounts/0".into(),
                    read_only: true
                },
                SharedBind {
                    source: "/srv/data".into(),
                    share_path: "c1/mounts/1".into(),
                    read_only: false
                },
            ]
        );
        assert_eq!(r.masked_paths, ["/proc/kcore"]);
        assert_eq!(r.readonly_paths, ["/proc/sys"]);
        assert_eq!(r.sysctls[0].key, "kernel.shm_rmid_forced");
        let res = r.resources.as_ref().unwrap();
        assert_eq!(res.memory_limit, Some(209715200));
        assert_eq!(res.cpu_quota, Some(150000));
        assert_eq!(res.cpu_period, Some(100000));
        assert_eq!(res.cpu_shares, Some(512));
        assert_eq!(res.pids_limit, Some(64));
    }

    #[test]
    fn unsupported_mounts_are_refused() {
        let mut s = spec(BASE);
        let bad: Vec<Mount> = serde_json::from_str(
            r#"[{"destination": "/x", "type": "nfs", "source": "server:/x"}]"#,
        )
        .unwrap();
        s.set_mounts(Some(bad));
        let err = plan_container("c", &s).unwrap_err();
        assert!(err.to_string().contains("nfs"), "{err}");
        let relative: Vec<Mount> =
            serde_json::from_str(r#"[{"destination": "x", "type": "tmpfs"}]"#).unwrap();
        s.set_mounts(Some(relative));
        assert!(plan_container("c", &s).is_err());
    }

    #[test]
    fn process_request_carries_everything() {
        let s = spec(BASE);
        let p = process_request("c1", "c1", s.process().as_ref().unwrap(), true).unwrap();
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!((p.uid, p.gid), (1000, 1000));
        assert_eq!(p.additional_gids, [10]);
        assert_eq!(p.cwd, "/work");
        assert!(p.no_new_privs && p.stdin && !p.terminal);
        assert_eq!(p.oom_score_adj, Some(5));
        assert_eq!(p.rlimits[0].r#type, "RLIMIT_NOFILE");
        assert_eq!((p.rlimits[0].soft, p.rlimits[0].hard), (512, 1024));
        let caps = p.capabilities.unwrap();
        assert_eq!(caps.bounding, ["CAP_CHOWN", "CAP_KILL"]);
        assert_eq!(caps.effective, ["CAP_KILL"]);
        assert!(caps.ambient.is_empty());
        assert_eq!(p.container_id, "c1");
    }

    #[test]
    fn exec_process_json_parses() {
        let p = parse_process(
            br#"{"args": ["ls"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "terminal": true}"#,
        )
        .unwrap();
        let req = process_request("c1.exec.e1", "c1", &p, false).unwrap();
        assert!(req.terminal);
        let empty = parse_process(br#"{"cwd": "/", "user": {"uid": 0, "gid": 0}}"#).unwrap();
        assert!(matches!(
            process_request("x", "c1", &empty, false),
            Err(SpecError::NoArgs)
        ));
    }

    #[test]
    fn update_resources_json_parses() {
        let r = parse_resources(
            br#"{"memory": {"limit": 1048576}, "cpu": {"quota": 5000, "period": 10000}}"#,
        )
        .unwrap();
        let mut warnings = Vec::new();
        let req = resources_request(&r, &mut warnings);
        assert_eq!(req.memory_limit, Some(1048576));
        assert_eq!(req.cpu_quota, Some(5000));
        assert!(warnings.is_empty());
    }
}
