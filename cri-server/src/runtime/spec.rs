//! OCI runtime specs for the shim, built from arrow-cri's pod and container
//! types as containerd's CRI plugin builds them, so that
//! `containerd-shim-arrow-v1` cannot tell which front door called it: the
//! same default mounts, capabilities, masked paths and annotations
//! (`io.kubernetes.cri.*`: container type, sandbox id, the pod's limits
//! that size its VM).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::model::{ContainerSpec, MountSpec, PodSpec, Propagation, Resources, Seccomp, Security};
use crate::error::{Error, Result};

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's and containerd's default capabilities.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability Linux knows (a privileged container gets them all).
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What an image's config says about how to run it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub user: String,
    pub working_dir: String,
}

impl ImageConfig {
    /// From an OCI image config blob (`config` of the image's JSON).
    pub fn parse(blob: &[u8]) -> Result<ImageConfig> {
        let v: Value = serde_json::from_slice(blob)
            .map_err(|e| Error::Internal(format!("the image config is not JSON: {e}")))?;
        let c = v.get("config").cloned().unwrap_or(Value::Null);
        let strings = |key: &str| -> Vec<String> {
            c.get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        };
        let string = |key: &str| c.get(key).and_then(Value::as_str).unwrap_or("").to_string();
        Ok(ImageConfig {
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            env: strings("Env"),
            user: string("User"),
            working_dir: string("WorkingDir"),
        })
    }
}

/// The process's identity in the container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// The image's `/etc/passwd` and `/etc/group`, to look names up in.
#[derive(Debug, Clone, Default)]
pub struct ImageFiles {
    pub passwd: Option<String>,
    pub group: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry> + '_ {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || l.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0].to_string(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
        })
    })
}

/// (name, gid, members) of each group.
fn group_entries(text: &str) -> impl Iterator<Item = (String, u32, Vec<String>)> + '_ {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || l.starts_with('#') {
            return None;
        }
        let members = f[3]
            .split(',')
            .filter(|m| !m.is_empty())
            .map(String::from)
            .collect();
        Some((f[0].to_string(), f[2].parse().ok()?, members))
    })
}

impl ImageFiles {
    fn user_by_name(&self, name: &str) -> Option<PasswdEntry> {
        passwd_entries(self.passwd.as_deref()?).find(|e| e.name == name)
    }

    fn user_by_uid(&self, uid: u32) -> Option<PasswdEntry> {
        passwd_entries(self.passwd.as_deref()?).find(|e| e.uid == uid)
    }

    fn group_by_name(&self, name: &str) -> Option<u32> {
        group_entries(self.group.as_deref()?)
            .find(|(n, _, _)| n == name)
            .map(|(_, gid, _)| gid)
    }

    /// The groups that list `user` as a member.
    fn groups_of(&self, user: &str) -> Vec<u32> {
        let Some(text) = self.group.as_deref() else {
            return Vec::new();
        };
        group_entries(text)
            .filter(|(_, _, members)| members.iter().any(|m| m == user))
            .map(|(_, gid, _)| gid)
            .collect()
    }
}

/// Resolves who the container runs as, as containerd does: the security
/// context's user (id or name) and group first, else the image's `User`
/// (`uid`, `name`, `uid:gid`, `name:group`); names are looked up in the
/// image's files; the user's groups there and the supplemental groups
/// become additional groups.
pub fn resolve_user(security: &Security, image_user: &str, files: &ImageFiles) -> Result<User> {
    if security.run_as_group.is_some()
        && security.run_as_user.is_none()
        && security.run_as_username.is_empty()
    {
        return Err(Error::InvalidArgument(
            "securityContext.runAsGroup is set without runAsUser or a user name: the group of \
             an unknown user cannot be chosen (set runAsUser too)"
                .into(),
        ));
    }
    let lookup_name = |name: &str| {
        files.user_by_name(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "user {name:?} is not in the image's /etc/passwd: use a numeric id or add the user to the image"
            ))
        })
    };
    let (uid, mut gid, name) = if let Some(uid) = security.run_as_user {
        let entry = files.user_by_uid(uid);
        (
            uid,
            entry.as_ref().map(|e| e.gid).unwrap_or(0),
            entry.map(|e| e.name),
        )
    } else if !security.run_as_username.is_empty() {
        let e = lookup_name(&security.run_as_username)?;
        (e.uid, e.gid, Some(e.name))
    } else {
        let (user, group) = match image_user.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (image_user, None),
        };
        let (uid, gid, name) = if user.is_empty() {
            (0, 0, files.user_by_uid(0).map(|e| e.name))
        } else if let Ok(uid) = user.parse::<u32>() {
            let entry = files.user_by_uid(uid);
            (
                uid,
                entry.as_ref().map(|e| e.gid).unwrap_or(0),
                entry.map(|e| e.name),
            )
        } else {
            let e = lookup_name(user)?;
            (e.uid, e.gid, Some(e.name))
        };
        let gid = match group {
            None | Some("") => gid,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => files.group_by_name(g).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "the image's user {image_user:?}: group {g:?} is not in its /etc/group"
                    ))
                })?,
            },
        };
        (uid, gid, name)
    };
    if let Some(g) = security.run_as_group {
        gid = g;
    }
    let mut additional = name.map(|n| files.groups_of(&n)).unwrap_or_default();
    additional.extend(security.supplemental_groups.iter().copied());
    let mut seen = std::collections::BTreeSet::new();
    additional.retain(|g| *g != gid && seen.insert(*g));
    Ok(User {
        uid,
        gid,
        additional_gids: additional,
    })
}

/// The command line: the CRI command replaces the image's entrypoint, the
/// CRI args its cmd.
pub fn resolve_args(c: &ContainerSpec, image: &ImageConfig) -> Result<Vec<String>> {
    let args = if !c.command.is_empty() {
        c.command.iter().chain(&c.args).cloned().collect()
    } else if !c.args.is_empty() {
        image.entrypoint.iter().chain(&c.args).cloned().collect()
    } else {
        image
            .entrypoint
            .iter()
            .chain(&image.cmd)
            .cloned()
            .collect::<Vec<_>>()
    };
    if args.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "container {:?}: no command: neither the container config nor image {} has a command or entrypoint",
            c.name, c.image
        )));
    }
    Ok(args)
}

/// `HOSTNAME`, the image's environment, then the container's, a later
/// value of a name replacing an earlier one; `PATH` if nothing set it.
pub fn resolve_env(hostname: &str, c: &ContainerSpec, image: &ImageConfig) -> Vec<String> {
    let mut env: Vec<String> = vec![format!("HOSTNAME={hostname}")];
    let mut set = |entry: String| {
        let key = entry.split('=').next().unwrap_or("").to_string();
        if let Some(old) = env
            .iter_mut()
            .find(|e| e.split('=').next() == Some(key.as_str()))
        {
            *old = entry;
        } else {
            env.push(entry);
        }
    };
    for e in &image.env {
        set(e.clone());
    }
    for (k, v) in &c.envs {
        set(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    env
}

fn capability_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    }
}

/// The capability set: all of them when privileged, else the defaults with
/// the security context's drops then adds (`ALL` in either).
pub fn capabilities(security: &Security) -> Result<Vec<String>> {
    if security.privileged {
        return Ok(ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect());
    }
    let known = |c: &str| -> Result<String> {
        let name = capability_name(c);
        if ALL_CAPABILITIES.contains(&name.as_str()) {
            Ok(name)
        } else {
            Err(Error::InvalidArgument(format!(
                "unknown capability {c:?} in the security context"
            )))
        }
    };
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    for d in &security.drop_capabilities {
        if d.eq_ignore_ascii_case("ALL") {
            caps.clear();
        } else {
            let name = known(d)?;
            caps.retain(|c| *c != name);
        }
    }
    for a in &security.add_capabilities {
        if a.eq_ignore_ascii_case("ALL") {
            caps = ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect();
        } else {
            let name = known(a)?;
            if !caps.contains(&name) {
                caps.push(name);
            }
        }
    }
    Ok(caps)
}

fn default_mounts() -> Vec<Value> {
    vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ]
}

/// OCI `LinuxResources` for `r` (also what Update sends the shim).
pub fn resources_value(r: &Resources) -> Value {
    let mut out = Map::new();
    let mut memory = Map::new();
    if let Some(limit) = r.memory_limit {
        memory.insert("limit".into(), json!(limit));
    }
    if let Some(swap) = r.memory_swap_limit {
        memory.insert("swap".into(), json!(swap));
    }
    if !memory.is_empty() {
        out.insert("memory".into(), Value::Object(memory));
    }
    let mut cpu = Map::new();
    if let Some(v) = r.cpu_shares {
        cpu.insert("shares".into(), json!(v));
    }
    if let Some(v) = r.cpu_quota {
        cpu.insert("quota".into(), json!(v));
    }
    if let Some(v) = r.cpu_period {
        cpu.insert("period".into(), json!(v));
    }
    if !r.cpuset_cpus.is_empty() {
        cpu.insert("cpus".into(), json!(r.cpuset_cpus));
    }
    if !r.cpuset_mems.is_empty() {
        cpu.insert("mems".into(), json!(r.cpuset_mems));
    }
    if !cpu.is_empty() {
        out.insert("cpu".into(), Value::Object(cpu));
    }
    if !r.unified.is_empty() {
        out.insert("unified".into(), json!(r.unified));
    }
    Value::Object(out)
}

/// The pod's cgroup: `<cgroup_parent>/<id>` (cgroupfs), or systemd's
/// `slice:prefix:name` form when the parent is a `.slice`.
pub fn cgroups_path(parent: &str, id: &str) -> String {
    if parent.ends_with(".slice") {
        format!("{parent}:arrow-cri:{id}")
    } else if parent.is_empty() {
        String::new()
    } else {
        format!("{}/{id}", parent.trim_end_matches('/'))
    }
}

fn pod_annotations(pod_id: &str, pod: &PodSpec) -> Map<String, Value> {
    let mut a = Map::new();
    a.insert(SANDBOX_ID.into(), json!(pod_id));
    a.insert("io.kubernetes.cri.sandbox-name".into(), json!(pod.name));
    a.insert(
        "io.kubernetes.cri.sandbox-namespace".into(),
        json!(pod.namespace),
    );
    a.insert("io.kubernetes.cri.sandbox-uid".into(), json!(pod.uid));
    a
}

/// The sandbox container's spec: the pod's VM (its process is never run:
/// the shim turns the sandbox into the VM itself).
pub fn sandbox_spec(pod_id: &str, pod: &PodSpec, netns: Option<&Path>) -> Value {
    let mut annotations = pod_annotations(pod_id, pod);
    for (k, v) in &pod.annotations {
        annotations.insert(k.clone(), json!(v));
    }
    annotations.insert(CONTAINER_TYPE.into(), json!("sandbox"));
    annotations.insert(
        "io.kubernetes.cri.sandbox-log-directory".into(),
        json!(pod.log_directory),
    );
    let mut linux = Map::new();
    if let Some(r) = &pod.resources {
        // The pod's limits, from which the shim sizes the VM.
        let positive_i = |v: Option<i64>| v.filter(|v| *v > 0).map(|v| v.to_string());
        let positive_u = |v: Option<u64>| v.filter(|v| *v > 0).map(|v| v.to_string());
        for (key, value) in [
            (
                "io.kubernetes.cri.sandbox-memory",
                positive_i(r.memory_limit),
            ),
            (
                "io.kubernetes.cri.sandbox-cpu-quota",
                positive_i(r.cpu_quota),
            ),
            (
                "io.kubernetes.cri.sandbox-cpu-period",
                positive_u(r.cpu_period),
            ),
            (
                "io.kubernetes.cri.sandbox-cpu-shares",
                positive_u(r.cpu_shares),
            ),
        ] {
            if let Some(v) = value {
                annotations.insert(key.into(), json!(v));
            }
        }
    }
    let mut network = json!({"type": "network"});
    if let Some(path) = netns {
        network["path"] = json!(path);
    }
    linux.insert(
        "namespaces".into(),
        json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, network]),
    );
    let cgroups = cgroups_path(&pod.cgroup_parent, pod_id);
    if !cgroups.is_empty() {
        linux.insert("cgroupsPath".into(), json!(cgroups));
    }
    if !pod.sysctls.is_empty() {
        linux.insert("sysctl".into(), json!(pod.sysctls));
    }
    linux.insert("resources".into(), json!({"cpu": {"shares": 2}}));
    linux.insert("maskedPaths".into(), json!(MASKED_PATHS));
    linux.insert("readonlyPaths".into(), json!(READONLY_PATHS));
    json!({
        "ociVersion": "1.1.0",
        "process": {
            "user": {"uid": 65535, "gid": 65535},
            "args": ["/pause"],
            "env": [DEFAULT_PATH],
            "cwd": "/",
            "noNewPrivileges": true,
            "capabilities": {
                "bounding": DEFAULT_CAPABILITIES,
                "effective": DEFAULT_CAPABILITIES,
                "permitted": DEFAULT_CAPABILITIES,
            },
            "oomScoreAdj": -998,
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": pod.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "annotations": annotations,
        "linux": linux,
    })
}

/// Files of the pod the containers get.
#[derive(Debug, Clone)]
pub struct PodFiles {
    pub hostname: PathBuf,
    pub hosts: PathBuf,
    pub resolv_conf: PathBuf,
    pub shm: PathBuf,
}

/// Everything a container's spec is made from.
pub struct ContainerInputs<'a> {
    pub id: &'a str,
    pub pod_id: &'a str,
    pub pod: &'a PodSpec,
    pub container: &'a ContainerSpec,
    pub image: &'a ImageConfig,
    /// The image's files (for user names).
    pub image_files: &'a ImageFiles,
    pub pod_files: &'a PodFiles,
    pub netns: Option<&'a Path>,
    /// The sandbox task's pid (the VMM), as containerd names the pod's
    /// namespaces by it.
    pub sandbox_pid: u32,
}

fn bind(destination: &str, source: &Path, readonly: bool, propagation: &str) -> Value {
    json!({
        "destination": destination,
        "type": "bind",
        "source": source,
        "options": ["rbind", propagation, if readonly { "ro" } else { "rw" }],
    })
}

fn user_mount(m: &MountSpec) -> Value {
    let propagation = match m.propagation {
        Propagation::Private => "rprivate",
        Propagation::HostToContainer => "rslave",
        Propagation::Bidirectional => "rshared",
    };
    bind(
        &m.container_path,
        Path::new(&m.host_path),
        m.readonly,
        propagation,
    )
}

/// An app container's spec.
pub fn container_spec(i: &ContainerInputs) -> Result<Value> {
    let c = i.container;
    let s = &c.security;
    let args = resolve_args(c, i.image)?;
    let user = resolve_user(s, &i.image.user, i.image_files)?;
    let caps = capabilities(s)?;
    let cwd = if !c.working_dir.is_empty() {
        c.working_dir.clone()
    } else if !i.image.working_dir.is_empty() {
        i.image.working_dir.clone()
    } else {
        "/".to_string()
    };
    if !cwd.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "working directory {cwd:?} must be an absolute path"
        )));
    }
    let mut process = json!({
        "terminal": c.tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
        "args": args,
        "env": resolve_env(&i.pod.hostname, c, i.image),
        "cwd": cwd,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": s.no_new_privs,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1_048_576u64, "soft": 1_048_576u64}],
    });
    if let Some(adj) = c.resources.as_ref().and_then(|r| r.oom_score_adj) {
        process["oomScoreAdj"] = json!(adj);
    }

    // Mounts: the defaults, then the pod's files and /dev/shm unless the
    // container mounts something there itself, then its own.
    let mut mounts = default_mounts();
    let taken = |path: &str| c.mounts.iter().any(|m| m.container_path == path);
    if !taken("/dev/shm") {
        mounts.push(bind("/dev/shm", &i.pod_files.shm, false, "rprivate"));
    }
    for (dest, source) in [
        ("/etc/hostname", &i.pod_files.hostname),
        ("/etc/hosts", &i.pod_files.hosts),
        ("/etc/resolv.conf", &i.pod_files.resolv_conf),
    ] {
        if !taken(dest) {
            mounts.push(bind(dest, source, s.readonly_rootfs, "rprivate"));
        }
    }
    for m in &c.mounts {
        if !m.container_path.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "mount {:?}: the container path must be absolute",
                m.container_path
            )));
        }
        // A host path that is a symlink is resolved here, as containerd
        // does: the bind is of what the link names.
        let source = std::fs::canonicalize(&m.host_path).map_err(|e| {
            Error::InvalidArgument(format!(
                "mount {} -> {}: the host path cannot be used: {e}",
                m.host_path, m.container_path
            ))
        })?;
        mounts.push(user_mount(&MountSpec {
            host_path: source.display().to_string(),
            ..m.clone()
        }));
    }

    let mut annotations = pod_annotations(i.pod_id, i.pod);
    for (k, v) in &c.annotations {
        annotations.insert(k.clone(), json!(v));
    }
    annotations.insert(CONTAINER_TYPE.into(), json!("container"));
    annotations.insert("io.kubernetes.cri.container-name".into(), json!(c.name));
    annotations.insert("io.kubernetes.cri.image-name".into(), json!(c.image));

    let pid = if c.own_pid_namespace {
        json!({"type": "pid"})
    } else {
        json!({"type": "pid", "path": format!("/proc/{}/ns/pid", i.sandbox_pid)})
    };
    let mut network = json!({"type": "network"});
    if let Some(path) = i.netns {
        network["path"] = json!(path);
    }
    let mut linux = Map::new();
    linux.insert(
        "namespaces".into(),
        json!([
            pid,
            {"type": "ipc", "path": format!("/proc/{}/ns/ipc", i.sandbox_pid)},
            {"type": "uts", "path": format!("/proc/{}/ns/uts", i.sandbox_pid)},
            {"type": "mount"},
            network,
        ]),
    );
    let cgroups = cgroups_path(&i.pod.cgroup_parent, i.pod_id);
    if !cgroups.is_empty() {
        // The container's cgroup under the pod's.
        let path = if i.pod.cgroup_parent.ends_with(".slice") {
            format!("{}:arrow-cri:{}", i.pod.cgroup_parent, i.id)
        } else {
            format!("{cgroups}/{}", i.id)
        };
        linux.insert("cgroupsPath".into(), json!(path));
    }
    if let Some(r) = &c.resources {
        linux.insert("resources".into(), resources_value(r));
    }
    if !s.privileged {
        let masked = s
            .masked_paths
            .clone()
            .unwrap_or_else(|| MASKED_PATHS.iter().map(|p| p.to_string()).collect());
        let readonly = s
            .readonly_paths
            .clone()
            .unwrap_or_else(|| READONLY_PATHS.iter().map(|p| p.to_string()).collect());
        linux.insert("maskedPaths".into(), json!(masked));
        linux.insert("readonlyPaths".into(), json!(readonly));
    }
    match &s.seccomp {
        Seccomp::Unconfined => {}
        Seccomp::RuntimeDefault => {
            return Err(Error::InvalidArgument(
                "seccomp profile RuntimeDefault is not available in arrow-cri yet: use \
                 Unconfined or a Localhost profile file"
                    .into(),
            ))
        }
        Seccomp::Localhost(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::InvalidArgument(format!("seccomp profile {}: {e}", path.display()))
            })?;
            let profile: Value = serde_json::from_str(&text).map_err(|e| {
                Error::InvalidArgument(format!(
                    "seccomp profile {} is not JSON: {e}",
                    path.display()
                ))
            })?;
            linux.insert("seccomp".into(), profile);
        }
    }
    let mut spec = json!({
        "ociVersion": "1.1.0",
        "process": process,
        "root": {"path": "rootfs", "readonly": s.readonly_rootfs},
        "hostname": i.pod.hostname,
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    });
    if s.privileged {
        spec["process"]["noNewPrivileges"] = json!(false);
    }
    Ok(spec)
}

/// The pod's `/etc/resolv.conf`: its DNS config, else the node's file.
pub fn resolv_conf(pod: &PodSpec) -> String {
    match &pod.dns {
        Some(dns) => {
            let mut out = String::new();
            if !dns.searches.is_empty() {
                out.push_str(&format!("search {}\n", dns.searches.join(" ")));
            }
            for s in &dns.servers {
                out.push_str(&format!("nameserver {s}\n"));
            }
            if !dns.options.is_empty() {
                out.push_str(&format!("options {}\n", dns.options.join(" ")));
            }
            out
        }
        None => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
    }
}

/// The pod's `/etc/hosts`.
pub fn hosts(hostname: &str, ip: Option<&str>) -> String {
    let mut out = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(ip) = ip {
        out.push_str(&format!("{ip}\t{hostname}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::model::*;
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,root\nappgrp:x:1001:\nstaff:x:50:app\n";

    fn files() -> ImageFiles {
        ImageFiles {
            passwd: Some(PASSWD.into()),
            group: Some(GROUP.into()),
        }
    }

    #[test]
    fn users_from_the_context_and_the_image() {
        let f = files();
        let none = Security::default();
        assert_eq!(
            resolve_user(&none, "", &f).unwrap(),
            User {
                uid: 0,
                gid: 0,
                additional_gids: vec![10]
            }
        );
        assert_eq!(
            resolve_user(&none, "app", &f).unwrap(),
            User {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![10, 50]
            }
        );
        assert_eq!(resolve_user(&none, "1000:staff", &f).unwrap().gid, 50);
        assert_eq!(
            resolve_user(&none, "4242:7", &f).unwrap(),
            User {
                uid: 4242,
                gid: 7,
                additional_gids: vec![]
            }
        );
        assert!(resolve_user(&none, "ghost", &f).is_err());
        assert!(resolve_user(&none, "app:ghosts", &f).is_err());

        let by_id = Security {
            run_as_user: Some(1000),
            run_as_group: Some(3000),
            supplemental_groups: vec![4000, 10],
            ..Default::default()
        };
        assert_eq!(
            resolve_user(&by_id, "nobody", &f).unwrap(),
            User {
                uid: 1000,
                gid: 3000,
                additional_gids: vec![10, 50, 4000]
            }
        );
        let by_name = Security {
            run_as_username: "nobody".into(),
            ..Default::default()
        };
        assert_eq!(resolve_user(&by_name, "", &f).unwrap().uid, 65534);
        let group_only = Security {
            run_as_group: Some(5),
            ..Default::default()
        };
        let e = resolve_user(&group_only, "app", &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("runAsGroup"), "{e}");
    }

    fn container(command: &[&str], args: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: "c".into(),
            image: "img".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            own_pid_namespace: true,
            ..Default::default()
        }
    }

    #[test]
    fn command_line_and_environment() {
        let image = ImageConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["x".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            ..Default::default()
        };
        assert_eq!(
            resolve_args(&container(&[], &[]), &image).unwrap(),
            ["/ep", "x"]
        );
        assert_eq!(
            resolve_args(&container(&[], &["y"]), &image).unwrap(),
            ["/ep", "y"]
        );
        assert_eq!(
            resolve_args(&container(&["sh"], &["-c", "z"]), &image).unwrap(),
            ["sh", "-c", "z"]
        );
        assert!(resolve_args(&container(&[], &[]), &ImageConfig::default()).is_err());
        let mut c = container(&[], &[]);
        c.envs = vec![("A".into(), "pod".into()), ("B".into(), "1=2".into())];
        assert_eq!(
            resolve_env("h", &c, &image),
            ["HOSTNAME=h", "PATH=/bin", "A=pod", "B=1=2"]
        );
        assert_eq!(
            resolve_env("h", &c, &ImageConfig::default())
                .last()
                .unwrap(),
            DEFAULT_PATH
        );
    }

    #[test]
    fn capability_sets() {
        let mut s = Security::default();
        assert_eq!(capabilities(&s).unwrap().len(), DEFAULT_CAPABILITIES.len());
        s.drop_capabilities = vec!["ALL".into()];
        s.add_capabilities = vec!["net_admin".into(), "CAP_KILL".into()];
        assert_eq!(capabilities(&s).unwrap(), ["CAP_NET_ADMIN", "CAP_KILL"]);
        s.drop_capabilities = vec!["CHOWN".into()];
        s.add_capabilities = vec![];
        assert!(!capabilities(&s).unwrap().contains(&"CAP_CHOWN".to_string()));
        s.add_capabilities = vec!["ALL".into()];
        assert_eq!(capabilities(&s).unwrap().len(), ALL_CAPABILITIES.len());
        s.add_capabilities = vec!["FLY".into()];
        assert!(capabilities(&s).is_err());
        let p = Security {
            privileged: true,
            ..Default::default()
        };
        assert_eq!(capabilities(&p).unwrap().len(), ALL_CAPABILITIES.len());
    }

    #[test]
    fn cgroup_paths() {
        assert_eq!(cgroups_path("/kubepods/podx", "id"), "/kubepods/podx/id");
        assert_eq!(
            cgroups_path("kubepods-podx.slice", "id"),
            "kubepods-podx.slice:arrow-cri:id"
        );
        assert_eq!(cgroups_path("", "id"), "");
    }

    #[test]
    fn pod_files() {
        let pod = PodSpec {
            dns: Some(Dns {
                servers: vec!["1.1.1.1".into()],
                searches: vec!["a.b".into()],
                options: vec!["ndots:5".into()],
            }),
            ..Default::default()
        };
        assert_eq!(
            resolv_conf(&pod),
            "search a.b\nnameserver 1.1.1.1\noptions ndots:5\n"
        );
        assert!(hosts("web", Some("10.99.0.3")).ends_with("10.99.0.3\tweb\n"));
    }

    #[test]
    fn image_config_parses() {
        let blob = br#"{"config": {"Entrypoint": ["/a"], "Cmd": ["b"], "Env": ["X=1"], "User": "app", "WorkingDir": "/w"}}"#;
        let c = ImageConfig::parse(blob).unwrap();
        assert_eq!(c.entrypoint, ["/a"]);
        assert_eq!(c.user, "app");
        assert_eq!(ImageConfig::parse(b"{}").unwrap(), ImageConfig::default());
        assert!(ImageConfig::parse(b"[").is_err());
    }

    /// The shim reads what arrow-cri writes exactly as it reads
    /// containerd's specs: roles, VM shape, network, mounts, process.
    #[test]
    fn the_shim_reads_our_specs_as_containerds() {
        use arrow_runtime::spec::{
            plan_container, process_request, refuse_host_namespaces, PodVmSize, Role,
        };
        let dir = tempfile::tempdir().unwrap();
        let pod = PodSpec {
            name: "web".into(),
            uid: "u1".into(),
            namespace: "default".into(),
            hostname: "web".into(),
            cgroup_parent: "/kubepods/podu1".into(),
            sysctls: [(
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "0".to_string(),
            )]
            .into(),
            resources: Some(Resources {
                memory_limit: Some(512 << 20),
                cpu_quota: Some(150_000),
                cpu_period: Some(100_000),
                ..Default::default()
            }),
            ..Default::default()
        };
        let netns = Path::new("/run/netns/arrow-cri-x");
        let sandbox: oci_spec::runtime::Spec =
            serde_json::from_value(sandbox_spec("pod1", &pod, Some(netns))).unwrap();
        assert_eq!(Role::of("pod1", &sandbox).unwrap(), Role::Sandbox);
        refuse_host_namespaces(&sandbox).unwrap();
        let shape = PodVmSize::for_spec(&sandbox, &Role::Sandbox).unwrap();
        assert_eq!((shape.memory_bytes, shape.vcpus), (640 << 20, 2));
        assert_eq!(
            arrow_runtime::network::PodNetworkMode::of(&sandbox),
            arrow_runtime::network::PodNetworkMode::Namespace(netns.into())
        );
        assert_eq!(arrow_runtime::spec::sysctls(&sandbox).len(), 1);

        // A volume whose host path is a symlink: the bind is of its target.
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        let mut c = container(&["sh", "-c", "id"], &[]);
        c.mounts = vec![MountSpec {
            container_path: "/data".into(),
            host_path: link.display().to_string(),
            readonly: true,
            propagation: Propagation::HostToContainer,
        }];
        c.security.run_as_user = Some(1000);
        c.security.readonly_rootfs = true;
        let pod_files = PodFiles {
            hostname: dir.path().join("hostname"),
            hosts: dir.path().join("hosts"),
            resolv_conf: dir.path().join("resolv.conf"),
            shm: dir.path().join("shm"),
        };
        let image = ImageConfig::default();
        let json = container_spec(&ContainerInputs {
            id: "c1",
            pod_id: "pod1",
            pod: &pod,
            container: &c,
            image: &image,
            image_files: &files(),
            pod_files: &pod_files,
            netns: Some(netns),
            sandbox_pid: 42,
        })
        .unwrap();
        let spec: oci_spec::runtime::Spec = serde_json::from_value(json).unwrap();
        assert_eq!(
            Role::of("c1", &spec).unwrap(),
            Role::PodMember {
                sandbox_id: "pod1".into()
            }
        );
        let plan = plan_container("c1", &spec).unwrap();
        assert!(plan.request.readonly_rootfs);
        assert!(plan
            .binds
            .iter()
            .any(|b| b.source == data.display().to_string() && b.read_only));
        let shm = plan
            .request
            .mounts
            .iter()
            .find(|m| m.destination == "/dev/shm")
            .unwrap();
        assert_eq!(shm.r#type, "tmpfs");
        for file in ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"] {
            assert!(
                plan.request.mounts.iter().any(|m| m.destination == file),
                "{file}"
            );
        }
        assert_eq!(plan.request.hostname, "web");
        let process = process_request("c1", "c1", spec.process().as_ref().unwrap(), false).unwrap();
        assert_eq!(process.args, ["sh", "-c", "id"]);
        assert_eq!((process.uid, process.gid), (1000, 1001));
        assert!(process.env.contains(&"HOSTNAME=web".to_string()));
        let caps = process.capabilities.unwrap();
        assert_eq!(caps.bounding.len(), DEFAULT_CAPABILITIES.len());

        // A missing host path is refused before the shim sees it.
        c.mounts[0].host_path = dir.path().join("nope").display().to_string();
        let refused = container_spec(&ContainerInputs {
            id: "c1",
            pod_id: "pod1",
            pod: &pod,
            container: &c,
            image: &image,
            image_files: &files(),
            pod_files: &pod_files,
            netns: Some(netns),
            sandbox_pid: 42,
        });
        assert!(matches!(refused, Err(Error::InvalidArgument(_))));
    }
}
