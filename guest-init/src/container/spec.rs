//! Validation of `CreateContainer` / `UpdateContainer`: everything is checked
//! (and parsed) before the guest changes anything, so a malformed request is
//! INVALID_ARGUMENT and leaves nothing behind.

use std::path::PathBuf;
use std::sync::Arc;

use nix::mount::MsFlags;
use proto::agent::{CreateContainer, Mount, PidNamespace, Resources};
use proto::HOSTNAME_MAX;

use super::paths::clean_components;
use crate::seccomp::Filter;

/// Longest container id (a path component and a cgroup name).
pub const MAX_ID_LEN: usize = 128;

/// The cgroup v2 period bounds the kernel accepts (cpu.max), microseconds.
const CPU_PERIOD_MIN: u64 = 1_000;
const CPU_PERIOD_MAX: u64 = 1_000_000;
/// The smallest positive quota the kernel accepts (cpu.max), microseconds.
const CPU_QUOTA_MIN: i64 = 1_000;

/// A validated `CreateContainer`.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub id: String,
    /// Relative to the share.
    pub rootfs: String,
    pub readonly_rootfs: bool,
    pub mounts: Vec<MountPlan>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctls: Vec<SysctlPlan>,
    pub resources: Resources,
    pub hostname: String,
    /// Loaded by each of the container's processes.
    pub seccomp: Option<Arc<Filter>>,
    pub pid_namespace: PidNamespace,
}

impl ContainerSpec {
    /// Whether `m` is mounted by the container's init rather than at
    /// create: a "proc" of a container with its own PID namespace, which
    /// must show that namespace, so only a process inside it can mount it.
    pub fn mounted_by_init(&self, m: &MountPlan) -> bool {
        self.pid_namespace == PidNamespace::Container && m.kind == MountKind::Fs("proc")
    }

    /// The components of `path` below the destination of a mount made by
    /// the init (see [`Self::mounted_by_init`]), with that mount's index:
    /// masked and read-only paths there are applied by the init too.
    pub fn below_init_mount<'a>(&self, path: &'a str) -> Option<(usize, Vec<&'a str>)> {
        let parts = clean_components(path).ok()?;
        self.mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| self.mounted_by_init(m))
            .find_map(|(i, m)| {
                let base = clean_components(&m.destination).ok()?;
                parts
                    .starts_with(&base)
                    .then(|| (i, parts[base.len()..].to_vec()))
            })
    }
}

/// How a mount is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    /// A bind mount of a path of the share.
    Bind,
    /// A filesystem the guest mounts itself (tmpfs, proc, ...).
    Fs(&'static str),
    /// cgroup2: the container's own cgroup directory, bound.
    Cgroup,
}

/// One validated OCI mount.
#[derive(Debug, Clone, PartialEq)]
pub struct MountPlan {
    /// Absolute, inside the container.
    pub destination: String,
    pub kind: MountKind,
    /// Bind: relative to the share. Fs: the mount source (device name).
    pub source: String,
    pub options: MountOptions,
}

/// OCI mount options split into what mount(2) takes as flags, the
/// propagation changes made afterwards, and the rest (filesystem data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Per-mount flags (ro, nosuid, nodev, noexec, atime, ...), without
    /// MS_BIND, MS_REC and propagation.
    pub flags: MsFlags,
    /// "bind" or "rbind" appeared: the mount is a bind mount.
    pub bind: bool,
    /// Bind recursively ("rbind", or a bind mount that says neither).
    pub recursive: bool,
    /// MS_PRIVATE, MS_SHARED, MS_SLAVE, MS_UNBINDABLE (maybe | MS_REC), in
    /// order.
    pub propagation: Vec<MsFlags>,
    /// Everything else, comma-joined, for the filesystem.
    pub data: String,
}

/// A sysctl: its file under /proc/sys and the value to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysctlPlan {
    pub key: String,
    /// Relative to /proc/sys.
    pub path: PathBuf,
    pub value: String,
}

enum Opt {
    Set(MsFlags),
    Clear(MsFlags),
    Bind { recursive: bool },
    Propagation(MsFlags),
}

fn option(name: &str) -> Option<Opt> {
    use MsFlags as F;
    let nosymfollow = F::from_bits_retain(libc::MS_NOSYMFOLLOW);
    Some(match name {
        "defaults" => Opt::Set(F::empty()),
        "ro" => Opt::Set(F::MS_RDONLY),
        "rw" => Opt::Clear(F::MS_RDONLY),
        "nosuid" => Opt::Set(F::MS_NOSUID),
        "suid" => Opt::Clear(F::MS_NOSUID),
        "nodev" => Opt::Set(F::MS_NODEV),
        "dev" => Opt::Clear(F::MS_NODEV),
        "noexec" => Opt::Set(F::MS_NOEXEC),
        "exec" => Opt::Clear(F::MS_NOEXEC),
        "sync" => Opt::Set(F::MS_SYNCHRONOUS),
        "async" => Opt::Clear(F::MS_SYNCHRONOUS),
        "dirsync" => Opt::Set(F::MS_DIRSYNC),
        "mand" => Opt::Set(F::MS_MANDLOCK),
        "nomand" => Opt::Clear(F::MS_MANDLOCK),
        "noatime" => Opt::Set(F::MS_NOATIME),
        "atime" => Opt::Clear(F::MS_NOATIME),
        "nodiratime" => Opt::Set(F::MS_NODIRATIME),
        "diratime" => Opt::Clear(F::MS_NODIRATIME),
        "relatime" => Opt::Set(F::MS_RELATIME),
        "norelatime" => Opt::Clear(F::MS_RELATIME),
        "strictatime" => Opt::Set(F::MS_STRICTATIME),
        "nostrictatime" => Opt::Clear(F::MS_STRICTATIME),
        "lazytime" => Opt::Set(F::MS_LAZYTIME),
        "nolazytime" => Opt::Clear(F::MS_LAZYTIME),
        "iversion" => Opt::Set(F::MS_I_VERSION),
        "noiversion" => Opt::Clear(F::MS_I_VERSION),
        "silent" => Opt::Set(F::MS_SILENT),
        "loud" => Opt::Clear(F::MS_SILENT),
        "nosymfollow" => Opt::Set(nosymfollow),
        "symfollow" => Opt::Clear(nosymfollow),
        "bind" => Opt::Bind { recursive: false },
        "rbind" => Opt::Bind { recursive: true },
        "private" => Opt::Propagation(F::MS_PRIVATE),
        "rprivate" => Opt::Propagation(F::MS_PRIVATE | F::MS_REC),
        "shared" => Opt::Propagation(F::MS_SHARED),
        "rshared" => Opt::Propagation(F::MS_SHARED | F::MS_REC),
        "slave" => Opt::Propagation(F::MS_SLAVE),
        "rslave" => Opt::Propagation(F::MS_SLAVE | F::MS_REC),
        "unbindable" => Opt::Propagation(F::MS_UNBINDABLE),
        "runbindable" => Opt::Propagation(F::MS_UNBINDABLE | F::MS_REC),
        _ => return None,
    })
}

/// Parses OCI mount options: flags in order (a later "rw" undoes an
/// earlier "ro"), the rest kept as filesystem data.
pub fn parse_options(options: &[String]) -> Result<MountOptions, String> {
    let mut flags = MsFlags::empty();
    let (mut bind, mut rbind) = (false, false);
    let mut propagation = Vec::new();
    let mut data: Vec<&str> = Vec::new();
    for opt in options {
        if opt.contains('\0') {
            return Err(format!("mount option {opt:?} contains a NUL byte"));
        }
        if opt == "remount" {
            return Err("mount option \"remount\" is not supported".into());
        }
        match option(opt) {
            Some(Opt::Set(f)) => flags |= f,
            Some(Opt::Clear(f)) => flags &= !f,
            Some(Opt::Bind { recursive }) => {
                bind = true;
                rbind |= recursive;
            }
            Some(Opt::Propagation(p)) => propagation.push(p),
            None if opt.is_empty() => {}
            None => data.push(opt),
        }
    }
    Ok(MountOptions {
        flags,
        bind,
        recursive: rbind || !bind,
        propagation,
        data: data.join(","),
    })
}

/// Checks a container id: it names a directory and a cgroup.
pub fn validate_id(id: &str) -> Result<(), String> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if id.is_empty() || id.len() > MAX_ID_LEN || !ok_chars || id.starts_with('.') {
        return Err(format!(
            "container id {id:?} must be 1 to {MAX_ID_LEN} of [A-Za-z0-9._-], not starting with '.'"
        ));
    }
    Ok(())
}

/// An absolute path inside the container, below its root, that stays
/// inside it lexically.
fn container_path(path: &str, what: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{what} {path:?} is not absolute"));
    }
    match clean_components(path) {
        Ok(parts) if parts.is_empty() => Err(format!("{what} {path:?} is the root itself")),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// A path relative to the share that stays inside it lexically.
fn share_path(path: &str, what: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if path.starts_with('/') {
        return Err(format!("{what} {path:?} must be relative to the share"));
    }
    clean_components(path)
        .map(drop)
        .map_err(|e| format!("{what}: {e}"))
}

fn mount_plan(m: &Mount) -> Result<MountPlan, String> {
    let dest = &m.destination;
    container_path(dest, "mount destination")?;
    let options = parse_options(&m.options).map_err(|e| format!("mount {dest}: {e}"))?;
    let kind = match m.r#type.as_str() {
        "bind" => MountKind::Bind,
        // OCI's spelling of a bind mount with an unset type.
        "" | "none" if options.bind => MountKind::Bind,
        "tmpfs" => MountKind::Fs("tmpfs"),
        "proc" => MountKind::Fs("proc"),
        "sysfs" => MountKind::Fs("sysfs"),
        "devpts" => MountKind::Fs("devpts"),
        "mqueue" => MountKind::Fs("mqueue"),
        // containerd's default spec says "cgroup"; the guest has only v2.
        "cgroup2" | "cgroup" => MountKind::Cgroup,
        other => return Err(format!("mount {dest}: unsupported type {other:?}")),
    };
    if m.source.contains('\0') {
        return Err(format!("mount {dest}: source contains a NUL byte"));
    }
    match kind {
        MountKind::Bind => share_path(&m.source, &format!("mount {dest}: source"))?,
        _ if options.bind => {
            return Err(format!(
                "mount {dest}: bind options on a {:?} mount",
                m.r#type
            ))
        }
        _ => {}
    }
    Ok(MountPlan {
        destination: dest.clone(),
        kind,
        source: m.source.clone(),
        options,
    })
}

fn sysctl_plan(key: &str, value: &str) -> Result<SysctlPlan, String> {
    if key.contains('\0') || value.contains('\0') {
        return Err(format!("sysctl {key:?} contains a NUL byte"));
    }
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty() || p.contains('/')) {
        return Err(format!("bad sysctl key {key:?}"));
    }
    Ok(SysctlPlan {
        key: key.to_string(),
        path: parts.iter().collect(),
        value: value.to_string(),
    })
}

/// Checks the limits the kernel would refuse anyway, so they are
/// INVALID_ARGUMENT rather than a failed write.
pub fn validate_resources(r: &Resources) -> Result<(), String> {
    if let Some(period) = r.cpu_period {
        if !(CPU_PERIOD_MIN..=CPU_PERIOD_MAX).contains(&period) {
            return Err(format!(
                "cpu_period {period} out of range ({CPU_PERIOD_MIN}..={CPU_PERIOD_MAX} us)"
            ));
        }
    }
    if let Some(quota) = r.cpu_quota {
        if quota > 0 && quota < CPU_QUOTA_MIN {
            return Err(format!("cpu_quota {quota} below {CPU_QUOTA_MIN} us"));
        }
    }
    Ok(())
}

/// Validates a whole `CreateContainer`.
pub fn validate(req: &CreateContainer) -> Result<ContainerSpec, String> {
    validate_id(&req.id)?;
    share_path(&req.rootfs, "rootfs")?;
    let mounts = req
        .mounts
        .iter()
        .map(mount_plan)
        .collect::<Result<Vec<_>, _>>()?;
    for p in &req.masked_paths {
        container_path(p, "masked path")?;
    }
    for p in &req.readonly_paths {
        container_path(p, "readonly path")?;
    }
    let sysctls = req
        .sysctls
        .iter()
        .map(|s| sysctl_plan(&s.key, &s.value))
        .collect::<Result<Vec<_>, _>>()?;
    let resources = req.resources.unwrap_or_default();
    validate_resources(&resources)?;
    if req.hostname.len() > HOSTNAME_MAX || req.hostname.contains('\0') {
        return Err(format!(
            "hostname {:?} is longer than {HOSTNAME_MAX} bytes or contains a NUL byte",
            req.hostname
        ));
    }
    let seccomp = req
        .seccomp
        .as_ref()
        .map(|s| Filter::parse(s).map(Arc::new))
        .transpose()?;
    let pid_namespace = PidNamespace::try_from(req.pid_namespace)
        .map_err(|_| format!("unknown pid_namespace {}", req.pid_namespace))?;
    let spec = ContainerSpec {
        id: req.id.clone(),
        rootfs: req.rootfs.clone(),
        readonly_rootfs: req.readonly_rootfs,
        mounts,
        masked_paths: req.masked_paths.clone(),
        readonly_paths: req.readonly_paths.clone(),
        sysctls,
        resources,
        hostname: req.hostname.clone(),
        seccomp,
        pid_namespace,
    };
    // A mount below one the init makes would be hidden by it.
    for m in &spec.mounts {
        if spec.mounted_by_init(m) {
            continue;
        }
        if let Some((i, _)) = spec.below_init_mount(&m.destination) {
            return Err(format!(
                "mount {} is below the \"proc\" mount on {}: not supported in a container \
                 with its own PID namespace (its init mounts that proc when it starts)",
                m.destination, spec.mounts[i].destination
            ));
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::Sysctl;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn mount(dest: &str, ty: &str, src: &str, options: &[&str]) -> Mount {
        Mount {
            destination: dest.into(),
            r#type: ty.into(),
            source: src.into(),
            options: opts(options),
        }
    }

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = parse_options(&opts(&[
            "nosuid",
            "noexec",
            "nodev",
            "mode=755",
            "size=65536k",
            "strictatime",
            "rprivate",
        ]))
        .unwrap();
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_STRICTATIME
        );
        assert_eq!(o.propagation, vec![MsFlags::MS_PRIVATE | MsFlags::MS_REC]);
        assert_eq!(o.data, "mode=755,size=65536k");
        assert!(!o.bind);

        let o = parse_options(&opts(&[
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
        ]))
        .unwrap();
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC);
        assert_eq!(o.data, "newinstance,ptmxmode=0666,mode=0620,gid=5");
    }

    #[test]
    fn later_options_override_earlier_ones() {
        let o = parse_options(&opts(&["ro", "nosuid", "rw", "suid", "relatime"])).unwrap();
        assert_eq!(o.flags, MsFlags::MS_RELATIME);
        let o = parse_options(&opts(&["rw", "ro"])).unwrap();
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        let o = parse_options(&opts(&["nosymfollow", "defaults", ""])).unwrap();
        assert_eq!(o.flags.bits(), libc::MS_NOSYMFOLLOW);
        assert_eq!(o.data, "");
    }

    #[test]
    fn bind_recursion() {
        let o = parse_options(&opts(&["rbind", "ro"])).unwrap();
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, MsFlags::MS_RDONLY);
        let o = parse_options(&opts(&["bind"])).unwrap();
        assert!(o.bind && !o.recursive);
        let o = parse_options(&opts(&["bind", "rbind"])).unwrap();
        assert!(o.recursive);
        // A bind mount that says neither is recursive (what a volume wants).
        let o = parse_options(&opts(&["ro"])).unwrap();
        assert!(!o.bind && o.recursive);
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(parse_options(&opts(&["remount"])).is_err());
        assert!(parse_options(&opts(&["mode=7\u{0}55"])).is_err());
    }

    #[test]
    fn ids() {
        for ok in [
            "a",
            "c1",
            "0123abcdef",
            "my-ctr_1.2",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a\nb",
            "a\0",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mounts_are_checked() {
        let ok = mount_plan(&mount("/data", "bind", "vol/data", &["rbind", "ro"])).unwrap();
        assert_eq!(ok.kind, MountKind::Bind);
        assert_eq!(ok.source, "vol/data");
        let ok = mount_plan(&mount("/etc/hosts", "none", "c1/hosts", &["bind"])).unwrap();
        assert_eq!(ok.kind, MountKind::Bind);
        let ok = mount_plan(&mount("/sys/fs/cgroup", "cgroup", "cgroup", &["ro"])).unwrap();
        assert_eq!(ok.kind, MountKind::Cgroup);
        let ok = mount_plan(&mount("/dev/pts", "devpts", "devpts", &["newinstance"])).unwrap();
        assert_eq!(ok.kind, MountKind::Fs("devpts"));

        for (m, why) in [
            (mount("data", "bind", "v", &[]), "not absolute"),
            (mount("/", "tmpfs", "tmpfs", &[]), "root itself"),
            (mount("/a/../..", "tmpfs", "tmpfs", &[]), "above"),
            (mount("/x", "bind", "/var/lib/v", &["rbind"]), "relative"),
            (mount("/x", "bind", "", &["rbind"]), "empty"),
            (mount("/x", "bind", "v/../../etc", &["rbind"]), "above"),
            (mount("/x", "ext4", "/dev/vda", &[]), "unsupported"),
            (mount("/x", "none", "v", &[]), "unsupported"),
            (mount("/x", "tmpfs", "tmpfs", &["bind"]), "bind options"),
            (mount("/x", "tmpfs", "tmp\0fs", &[]), "NUL"),
        ] {
            let err = mount_plan(&m).unwrap_err();
            assert!(err.contains(why), "{m:?}: {err}");
        }
    }

    #[test]
    fn sysctls() {
        let s = sysctl_plan("net.ipv4.ip_forward", "1").unwrap();
        assert_eq!(s.path, PathBuf::from("net/ipv4/ip_forward"));
        for bad in ["", "net..x", ".net", "net.", "net/ipv4", "a.b\0"] {
            assert!(sysctl_plan(bad, "1").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resources() {
        let mut r = Resources {
            cpu_period: Some(100_000),
            cpu_quota: Some(50_000),
            ..Default::default()
        };
        assert!(validate_resources(&r).is_ok());
        r.cpu_quota = Some(-1);
        assert!(validate_resources(&r).is_ok());
        r.cpu_quota = Some(0);
        assert!(validate_resources(&r).is_ok());
        r.cpu_quota = Some(999);
        assert!(validate_resources(&r).is_err());
        r.cpu_quota = None;
        r.cpu_period = Some(999);
        assert!(validate_resources(&r).is_err());
        r.cpu_period = Some(1_000_001);
        assert!(validate_resources(&r).is_err());
    }

    #[test]
    fn whole_request() {
        let req = CreateContainer {
            id: "c1".into(),
            rootfs: "c1/rootfs".into(),
            mounts: vec![mount("/proc", "proc", "proc", &["nosuid"])],
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            sysctls: vec![Sysctl {
                key: "kernel.shm_rmid_forced".into(),
                value: "1".into(),
            }],
            hostname: "pod".into(),
            ..Default::default()
        };
        let spec = validate(&req).unwrap();
        assert_eq!(spec.mounts.len(), 1);
        assert_eq!(
            spec.sysctls[0].path,
            PathBuf::from("kernel/shm_rmid_forced")
        );
        assert_eq!(spec.resources, Resources::default());

        for (change, why) in [
            (
                Box::new(|r: &mut CreateContainer| r.id = "a/b".into())
                    as Box<dyn Fn(&mut CreateContainer)>,
                "container id",
            ),
            (Box::new(|r| r.rootfs = String::new()), "rootfs is empty"),
            (Box::new(|r| r.rootfs = "/abs".into()), "relative"),
            (
                Box::new(|r| r.masked_paths.push("proc".into())),
                "masked path",
            ),
            (
                Box::new(|r| r.readonly_paths.push("/../x".into())),
                "readonly path",
            ),
            (
                Box::new(|r| r.masked_paths.push("/./".into())),
                "root itself",
            ),
            (Box::new(|r| r.hostname = "h".repeat(65)), "hostname"),
            (
                Box::new(|r| {
                    r.resources = Some(Resources {
                        cpu_period: Some(1),
                        ..Default::default()
                    })
                }),
                "cpu_period",
            ),
        ] {
            let mut bad = req.clone();
            change(&mut bad);
            let err = validate(&bad).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn own_pid_namespace_defers_proc_and_what_is_below_it() {
        let mut req = CreateContainer {
            id: "c".into(),
            rootfs: "c/rootfs".into(),
            mounts: vec![
                mount("/proc", "proc", "proc", &["nosuid"]),
                mount("/dev", "tmpfs", "tmpfs", &[]),
            ],
            ..Default::default()
        };
        // POD (the default, also of an older host): nothing deferred.
        let pod = validate(&req).unwrap();
        assert_eq!(pod.pid_namespace, PidNamespace::Pod);
        assert!(!pod.mounted_by_init(&pod.mounts[0]));
        assert_eq!(pod.below_init_mount("/proc/kcore"), None);

        req.pid_namespace = PidNamespace::Container as i32;
        let own = validate(&req).unwrap();
        assert!(own.mounted_by_init(&own.mounts[0]));
        assert!(!own.mounted_by_init(&own.mounts[1]));
        assert_eq!(
            own.below_init_mount("/proc/kcore"),
            Some((0, vec!["kcore"]))
        );
        assert_eq!(
            own.below_init_mount("/proc/./sys/../sys/kernel"),
            Some((0, vec!["sys", "kernel"]))
        );
        assert_eq!(own.below_init_mount("/proc"), Some((0, vec![])));
        assert_eq!(own.below_init_mount("/procfs"), None);
        assert_eq!(own.below_init_mount("/sys/firmware"), None);

        // A mount the proc would hide is refused; an unknown mode too.
        let mut below = req.clone();
        below.mounts.push(mount("/proc/sys", "tmpfs", "tmpfs", &[]));
        let err = validate(&below).unwrap_err();
        assert!(err.contains("below the \"proc\" mount"), "{err}");
        let mut unknown = req.clone();
        unknown.pid_namespace = 7;
        assert!(validate(&unknown).unwrap_err().contains("pid_namespace"));
    }
}
