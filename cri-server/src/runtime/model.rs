//! arrow-cri's own pod and container types: what a pod or container was
//! asked to be (translated once from CRI in `runtime_service.rs`) and what
//! it is now. Persisted as JSON, one file per pod and per container, so a
//! restarted arrow-cri finds them again.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The pod a kubelet asks for, in arrow-cri's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub hostname: String,
    pub log_directory: String,
    pub dns: Option<Dns>,
    pub port_mappings: Vec<PortMapping>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub cgroup_parent: String,
    pub sysctls: BTreeMap<String, String>,
    /// The pod's total limits (kubelet sums its containers'): they size the VM.
    pub resources: Option<Resources>,
    /// Processes of all containers share one PID namespace
    /// (`shareProcessNamespace`).
    pub shared_pid_namespace: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// `tcp`, `udp` or `sctp`, as the CNI `portMappings` capability spells it.
    pub protocol: String,
    pub container_port: u16,
    pub host_port: u16,
    pub host_ip: String,
}

/// cgroup limits, CRI's `LinuxContainerResources` without what a VM cannot
/// honour (refused at translation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_period: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_shares: Option<u64>,
    pub memory_limit: Option<i64>,
    pub memory_swap_limit: Option<i64>,
    pub oom_score_adj: Option<i64>,
    pub cpuset_cpus: String,
    pub cpuset_mems: String,
    pub unified: BTreeMap<String, String>,
}

/// A container a kubelet asks for, in arrow-cri's terms.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub attempt: u32,
    /// The image as the client named it.
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<MountSpec>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Relative to the pod's log directory.
    pub log_path: String,
    pub tty: bool,
    /// The container has a stdin (a FIFO attach writes into).
    #[serde(default)]
    pub stdin: bool,
    /// The first attach that ends its stdin closes the container's.
    #[serde(default)]
    pub stdin_once: bool,
    pub resources: Option<Resources>,
    pub security: Security,
    /// The container has a PID namespace of its own (the kubelet default);
    /// false: the pod's.
    pub own_pid_namespace: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    pub propagation: Propagation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Propagation {
    Private,
    HostToContainer,
    Bidirectional,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub run_as_user: Option<u32>,
    pub run_as_group: Option<u32>,
    pub run_as_username: String,
    pub supplemental_groups: Vec<u32>,
    pub readonly_rootfs: bool,
    pub privileged: bool,
    pub no_new_privs: bool,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    /// `None`: the runtime's defaults.
    pub masked_paths: Option<Vec<String>>,
    pub readonly_paths: Option<Vec<String>>,
    pub seccomp: Seccomp,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seccomp {
    #[default]
    Unconfined,
    RuntimeDefault,
    /// An OCI seccomp profile (JSON) in this file on the node.
    Localhost(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    Ready,
    NotReady,
}

/// A pod as arrow-cri keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub id: String,
    pub spec: PodSpec,
    pub state: PodState,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// `/run/netns/<name>`; empty once removed.
    pub netns: Option<PathBuf>,
    /// The pod's first IP from CNI.
    pub ip: Option<String>,
    pub additional_ips: Vec<String>,
    /// The shim's ttrpc address (`unix://…`).
    pub shim_address: String,
    /// The sandbox task's pid (the VMM), which containerd names the pod's
    /// namespaces by in its containers' specs.
    #[serde(default)]
    pub sandbox_pid: u32,
    /// The sandbox VM has stopped (its task was killed and waited for).
    pub stopped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: i32,
    /// Nanoseconds since the epoch.
    pub at: i64,
    pub oom_killed: bool,
}

impl ExitRecord {
    /// CRI's reason: `OOMKilled`, else `Completed` for 0 and `Error`.
    pub fn reason(&self) -> &'static str {
        if self.oom_killed {
            "OOMKilled"
        } else if self.code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }
}

/// A container as arrow-cri keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    pub id: String,
    pub pod_id: String,
    pub spec: ContainerSpec,
    /// The image's id (`sha256:` of its config) and the reference it was
    /// resolved from (a repo digest if the store has one).
    pub image_id: String,
    pub image_ref: String,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub exit: Option<ExitRecord>,
    /// An OOM event arrived for it (the exit that follows is `OOMKilled`).
    pub oom_seen: bool,
    /// The absolute path of the CRI log file, or empty for none.
    pub log_file: PathBuf,
}

/// Nanoseconds since the epoch, now.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons() {
        let mut e = ExitRecord {
            code: 0,
            at: 1,
            oom_killed: false,
        };
        assert_eq!(e.reason(), "Completed");
        e.code = 3;
        assert_eq!(e.reason(), "Error");
        e.code = 137;
        e.oom_killed = true;
        assert_eq!(e.reason(), "OOMKilled");
    }
}
