//! `arrow check`: whether this host can run Arrow, one line per thing
//! checked, each failure or warning saying what to do.
//!
//! The checks read only the host (files, sysfs, one `containerd --version`,
//! and `/dev/kvm` itself: a VM is created and dropped to prove KVM works).
//! Where each thing is looked for is a [`Host`] field, so the logic is tested
//! against a fake tree.

use std::fmt;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use vmm_core::hypervisor::KvmFlavour;

use crate::containerd_config;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Arrow runs, but something is missing or will surprise.
    Warn,
    /// Arrow cannot run pods until this is fixed.
    Fail,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub status: Status,
    pub what: &'static str,
    pub message: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        write!(f, "{tag} {:<11} {}", self.what, self.message)
    }
}

/// Where the checks look.
#[derive(Clone, Debug)]
pub struct Host {
    pub dev_kvm: PathBuf,
    pub sys_module: PathBuf,
    pub kernel: PathBuf,
    /// Where the binaries are installed (`arrow install --prefix`).
    pub prefix: PathBuf,
    /// Where this `arrow` was started from (a build's binaries, maybe).
    pub own_dir: Option<PathBuf>,
    pub containerd_config: PathBuf,
    /// `containerd --version`'s output, `None` if it could not run.
    pub containerd_version: Option<String>,
    pub cgroup_root: PathBuf,
    pub cni_dirs: Vec<PathBuf>,
    pub dev_tun: PathBuf,
    pub meminfo: PathBuf,
    /// The template cache (guest memory images live there).
    pub cache: PathBuf,
}

/// Guest kernel options arrow-init and the VMM depend on.
const KERNEL_OPTIONS: [&str; 10] = [
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_VSOCKETS",
    "CONFIG_VIRTIO_NET",
    "CONFIG_VIRTIO_FS",
    "CONFIG_FUSE_FS",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_DEVTMPFS",
    "CONFIG_CGROUPS",
    "CONFIG_MEMCG",
    "CONFIG_PID_NS",
];
const CNI_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// A VM of the default shape (256 MiB) and its VMM; below this nothing starts.
const MIN_AVAILABLE_MIB: u64 = 320;
/// Room for a template or two besides running pods.
const COMFORTABLE_AVAILABLE_MIB: u64 = 1024;
/// A template's memory image is as large as the guest (sparse on disk).
const MIN_CACHE_DISK_MIB: u64 = 1024;

fn line(status: Status, what: &'static str, message: impl Into<String>) -> Line {
    Line {
        status,
        what,
        message: message.into(),
    }
}

/// Runs every check.
pub fn run(host: &Host) -> Vec<Line> {
    let mut lines = vec![check_kvm(host)];
    lines.extend(check_kernel(host));
    lines.extend(check_binaries(host));
    lines.push(check_containerd_version(host));
    lines.push(check_containerd_config(host));
    lines.push(check_cgroup(host));
    lines.push(check_cni(host));
    lines.push(check_tun(host));
    lines.push(line(
        Status::Ok,
        "vsock",
        "no host vsock module needed: arrow-vmm serves virtio-vsock itself, over Unix sockets",
    ));
    lines.push(check_memory(host));
    lines
}

/// Whether every line passed (warnings pass).
pub fn passed(lines: &[Line]) -> bool {
    lines.iter().all(|l| l.status != Status::Fail)
}

fn check_kvm(host: &Host) -> Line {
    const WHAT: &str = "kvm";
    let meta = match fs::metadata(&host.dev_kvm) {
        Ok(m) => m,
        Err(e) => {
            return line(
                Status::Fail,
                WHAT,
                format!(
                    "{}: {e}; load kvm_intel or kvm_amd (or kvm_pvm in a VM without nested virtualisation)",
                    host.dev_kvm.display()
                ),
            )
        }
    };
    if !meta.file_type().is_char_device() {
        return line(
            Status::Fail,
            WHAT,
            format!(
                "{} is not a character device; it is not KVM",
                host.dev_kvm.display()
            ),
        );
    }
    let Ok(path) = std::ffi::CString::new(host.dev_kvm.as_os_str().as_encoded_bytes()) else {
        return line(Status::Fail, WHAT, "the KVM device path has a NUL byte");
    };
    let kvm = match kvm_ioctls::Kvm::new_with_path(&path) {
        Ok(k) => k,
        Err(e) => {
            return line(
                Status::Fail,
                WHAT,
                format!(
                    "cannot open {} ({e}): run as root or join group kvm",
                    host.dev_kvm.display()
                ),
            )
        }
    };
    let version = kvm.get_api_version();
    if version != 12 {
        return line(
            Status::Fail,
            WHAT,
            format!(
                "{} does not answer as KVM ({}): load kvm_intel, kvm_amd or kvm_pvm",
                host.dev_kvm.display(),
                if version < 0 {
                    "KVM_GET_API_VERSION fails".to_string()
                } else {
                    format!("API version {version}, want 12")
                }
            ),
        );
    }
    if let Err(e) = kvm.create_vm() {
        return line(
            Status::Fail,
            WHAT,
            format!(
                "{} opens but cannot create a VM ({e}); is another hypervisor holding VT-x/AMD-V?",
                host.dev_kvm.display()
            ),
        );
    }
    let flavour = KvmFlavour::detect_in(&host.sys_module);
    let status = match flavour {
        KvmFlavour::Unknown => Status::Warn,
        _ => Status::Ok,
    };
    let note = match flavour {
        KvmFlavour::Pvm => "; guest kernel code is emulated: boots take 10-20 s, clones are fast",
        KvmFlavour::Unknown => "; no kvm_intel, kvm_amd or kvm_pvm module: assuming hardware KVM",
        KvmFlavour::Hardware(_) => "",
    };
    line(
        status,
        WHAT,
        format!("{} usable, {flavour}{note}", host.dev_kvm.display()),
    )
}

/// The ELF machine of an x86-64 executable and whether it is static; `None`
/// if `data` is no ELF64 little-endian file.
pub(crate) fn elf_info(data: &[u8]) -> Option<(u16, bool)> {
    if data.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |off: usize| {
        data.get(off..off.checked_add(2)?)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| {
        data.get(off..off.checked_add(4)?)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let machine = u16_at(18)?;
    let phoff = usize::try_from(u64::from_le_bytes(data.get(32..40)?.try_into().ok()?)).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(54)?), usize::from(u16_at(56)?));
    const PT_INTERP: u32 = 3;
    let dynamic = (0..phnum)
        .any(|i| u32_at(phoff.saturating_add(i.saturating_mul(phentsize))) == Some(PT_INTERP));
    Some((machine, !dynamic))
}

pub(crate) const EM_X86_64: u16 = 62;

fn check_kernel(host: &Host) -> Vec<Line> {
    const WHAT: &str = "kernel";
    let data = match fs::read(&host.kernel) {
        Ok(d) => d,
        Err(e) => {
            return vec![line(
                Status::Fail,
                WHAT,
                format!(
                    "no guest kernel at {} ({e}): build it with hack/build-kernel.sh, then arrow install",
                    host.kernel.display()
                ),
            )]
        }
    };
    if elf_info(&data).map(|(m, _)| m) != Some(EM_X86_64) {
        return vec![line(
            Status::Fail,
            WHAT,
            format!(
                "{} is not an x86-64 ELF vmlinux (a bzImage will not do)",
                host.kernel.display()
            ),
        )];
    }
    // hack/build-kernel.sh keeps the config beside the vmlinux it built.
    let real = fs::canonicalize(&host.kernel).unwrap_or_else(|_| host.kernel.clone());
    let config_path = real.with_file_name("config");
    let Ok(config) = fs::read_to_string(&config_path) else {
        return vec![line(
            Status::Warn,
            WHAT,
            format!(
                "{} is a vmlinux, but without {} its options cannot be checked",
                host.kernel.display(),
                config_path.display()
            ),
        )];
    };
    let missing: Vec<&str> = KERNEL_OPTIONS
        .iter()
        .copied()
        .filter(|opt| !config.lines().any(|l| l == format!("{opt}=y")))
        .collect();
    if missing.is_empty() {
        vec![line(
            Status::Ok,
            WHAT,
            format!(
                "{} (built-in virtio-mmio, vsock, net, fs)",
                host.kernel.display()
            ),
        )]
    } else {
        vec![line(
            Status::Fail,
            WHAT,
            format!(
                "{} lacks {} (arrow-init needs them built in): rebuild with hack/build-kernel.sh",
                host.kernel.display(),
                missing.join(", ")
            ),
        )]
    }
}

fn check_binaries(host: &Host) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut missing = Vec::new();
    for name in ["containerd-shim-arrow-v1", "arrow-vmm", "arrow-init"] {
        if !host.prefix.join(name).is_file() {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        lines.push(line(
            Status::Fail,
            "binaries",
            format!(
                "{} missing in {}: run arrow install",
                missing.join(", "),
                host.prefix.display()
            ),
        ));
        return lines;
    }
    let init = host.prefix.join("arrow-init");
    match fs::read(&init).ok().as_deref().and_then(elf_info) {
        Some((EM_X86_64, true)) => {}
        _ => {
            lines.push(line(
                Status::Fail,
                "arrow-init",
                format!("{} is not a static x86-64 executable: the guest has no loader; rebuild with hack/build.sh", init.display()),
            ));
            return lines;
        }
    }
    // The installed set should be the build this `arrow` came with, when it
    // came with one (hack/build.sh's directory: a static arrow-init beside
    // it; not cargo's target/release).
    let own_build = host.own_dir.as_ref().filter(|own| {
        matches!(
            fs::read(own.join("arrow-init"))
                .ok()
                .as_deref()
                .and_then(elf_info),
            Some((_, true))
        )
    });
    let stale: Vec<&str> = match own_build {
        Some(own) if fs::canonicalize(own).ok() != fs::canonicalize(&host.prefix).ok() => {
            ["containerd-shim-arrow-v1", "arrow-vmm", "arrow-init"]
                .into_iter()
                .filter(
                    |n| match (fs::read(own.join(n)), fs::read(host.prefix.join(n))) {
                        (Ok(a), Ok(b)) => a != b,
                        _ => false,
                    },
                )
                .collect()
        }
        _ => Vec::new(),
    };
    if stale.is_empty() {
        lines.push(line(
            Status::Ok,
            "binaries",
            format!(
                "shim, arrow-vmm and a static arrow-init in {}",
                host.prefix.display()
            ),
        ));
    } else {
        lines.push(line(
            Status::Warn,
            "binaries",
            format!(
                "{} in {} differ from the build beside this arrow: run arrow install",
                stale.join(", "),
                host.prefix.display()
            ),
        ));
    }
    lines
}

/// `(major, minor)` from `containerd --version` output
/// (`containerd github.com/containerd/containerd 1.6.20~ds1 ...`).
pub fn parse_containerd_version(out: &str) -> Option<(u32, u32)> {
    out.split_whitespace().find_map(|word| {
        let word = word.strip_prefix('v').unwrap_or(word);
        let mut parts = word.split(['.', '~', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    })
}

fn check_containerd_version(host: &Host) -> Line {
    const WHAT: &str = "containerd";
    let Some(out) = &host.containerd_version else {
        return line(
            Status::Warn,
            WHAT,
            "not found: install containerd 1.6+ (apt-get install containerd), or run pods with arrow-cri",
        );
    };
    match parse_containerd_version(out) {
        None => line(Status::Warn, WHAT, format!("cannot read its version from {:?}", out.trim())),
        Some((major, minor)) if (major, minor) < (1, 6) => line(
            Status::Fail,
            WHAT,
            format!("{major}.{minor} is too old: shim v2 with sandbox annotations needs 1.6 or newer"),
        ),
        Some((1, 6)) => line(
            Status::Ok,
            WHAT,
            "1.6: pods run; it does not pass pod limits to the sandbox, so every pod VM gets 256 MiB and 1 vCPU (1.7+ sizes VMs)",
        ),
        Some((major, minor)) => line(Status::Ok, WHAT, format!("{major}.{minor}")),
    }
}

fn check_containerd_config(host: &Host) -> Line {
    const WHAT: &str = "runtime";
    let path = &host.containerd_config;
    match fs::read_to_string(path) {
        Err(e) => line(
            Status::Warn,
            WHAT,
            format!(
                "{} ({e}): run arrow install to add runtime arrow",
                path.display()
            ),
        ),
        Ok(text) => match containerd_config::has_runtime(&text) {
            Ok(true) => line(
                Status::Ok,
                WHAT,
                format!("arrow configured in {}", path.display()),
            ),
            Ok(false) => line(
                Status::Warn,
                WHAT,
                format!(
                    "{} has no runtime arrow: run arrow install, then restart containerd",
                    path.display()
                ),
            ),
            Err(e) => line(Status::Warn, WHAT, format!("{}: {e}", path.display())),
        },
    }
}

/// cgroup v2 when the root is cgroup2fs, v1 (or hybrid) when it is tmpfs.
fn check_cgroup(host: &Host) -> Line {
    const WHAT: &str = "cgroup";
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    match nix::sys::statfs::statfs(&host.cgroup_root) {
        Err(e) => line(
            Status::Fail,
            WHAT,
            format!(
                "{}: {e}; mount the cgroup filesystem",
                host.cgroup_root.display()
            ),
        ),
        Ok(fs) => {
            let magic = fs.filesystem_type().0;
            if magic == CGROUP2_SUPER_MAGIC {
                line(Status::Ok, WHAT, "v2 (unified)")
            } else if magic == TMPFS_MAGIC && host.cgroup_root.join("memory").is_dir() {
                let hybrid = if host.cgroup_root.join("unified").is_dir() {
                    " (hybrid)"
                } else {
                    ""
                };
                line(
                    Status::Ok,
                    WHAT,
                    format!("v1{hybrid}: pods' VMMs are charged to their memory cgroups"),
                )
            } else {
                line(
                    Status::Fail,
                    WHAT,
                    format!(
                        "{} is neither cgroup2 nor a v1 hierarchy with memory",
                        host.cgroup_root.display()
                    ),
                )
            }
        }
    }
}

fn check_cni(host: &Host) -> Line {
    const WHAT: &str = "cni";
    let mut dirs = host.cni_dirs.clone();
    if let Some(dir) = fs::read_to_string(&host.containerd_config)
        .ok()
        .and_then(|t| containerd_config::cni_bin_dir(&t))
    {
        dirs.insert(0, PathBuf::from(dir));
    }
    for dir in &dirs {
        if CNI_PLUGINS.iter().all(|p| dir.join(p).is_file()) {
            return line(
                Status::Ok,
                WHAT,
                format!("{} in {}", CNI_PLUGINS.join(", "), dir.display()),
            );
        }
    }
    line(
        Status::Warn,
        WHAT,
        format!(
            "no {} in {}: install containernetworking-plugins (pods then have no network)",
            CNI_PLUGINS.join(", "),
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        ),
    )
}

fn check_tun(host: &Host) -> Line {
    match fs::metadata(&host.dev_tun) {
        Ok(m) if m.file_type().is_char_device() => line(
            Status::Ok,
            "tun",
            format!("{} (each pod's NIC is a tap)", host.dev_tun.display()),
        ),
        _ => line(
            Status::Fail,
            "tun",
            format!(
                "no {}: modprobe tun (each pod's NIC is a tap)",
                host.dev_tun.display()
            ),
        ),
    }
}

/// `MemAvailable` in MiB from /proc/meminfo's text.
fn available_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The nearest existing directory at or above `path`.
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("/"))
}

fn check_memory(host: &Host) -> Line {
    const WHAT: &str = "memory";
    let Some(avail) = fs::read_to_string(&host.meminfo)
        .ok()
        .as_deref()
        .and_then(available_mib)
    else {
        return line(
            Status::Warn,
            WHAT,
            format!("cannot read MemAvailable from {}", host.meminfo.display()),
        );
    };
    let dir = existing_ancestor(&host.cache);
    let disk = nix::sys::statvfs::statvfs(dir)
        .ok()
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()) / (1 << 20));
    let disk_note = match disk {
        Some(d) => format!("; {d} MiB free for templates under {}", dir.display()),
        None => String::new(),
    };
    if avail < MIN_AVAILABLE_MIB {
        return line(
            Status::Fail,
            WHAT,
            format!("{avail} MiB available: a default pod VM needs about {MIN_AVAILABLE_MIB} MiB{disk_note}"),
        );
    }
    if disk.is_some_and(|d| d < MIN_CACHE_DISK_MIB) {
        return line(
            Status::Warn,
            WHAT,
            format!("{avail} MiB available{disk_note}: a template's memory image can take up to its guest size; free some space"),
        );
    }
    if avail < COMFORTABLE_AVAILABLE_MIB {
        return line(
            Status::Warn,
            WHAT,
            format!("{avail} MiB available: enough for a template and a pod or two{disk_note}"),
        );
    }
    line(
        Status::Ok,
        WHAT,
        format!("{avail} MiB available{disk_note}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(dir: &Path) -> Host {
        Host {
            dev_kvm: dir.join("dev/kvm"),
            sys_module: dir.join("sys/module"),
            kernel: dir.join("kernel/vmlinux"),
            prefix: dir.join("bin"),
            own_dir: None,
            containerd_config: dir.join("config.toml"),
            containerd_version: None,
            cgroup_root: dir.join("cgroup"),
            cni_dirs: vec![dir.join("cni")],
            dev_tun: dir.join("dev/net/tun"),
            meminfo: dir.join("meminfo"),
            cache: dir.join("cache"),
        }
    }

    fn find<'a>(lines: &'a [Line], what: &str) -> &'a Line {
        lines.iter().find(|l| l.what == what).unwrap()
    }

    #[test]
    fn an_empty_host_fails_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let lines = run(&fake_host(dir.path()));
        assert!(!passed(&lines));
        let kvm = find(&lines, "kvm");
        assert_eq!(kvm.status, Status::Fail);
        assert!(kvm.message.contains("kvm_intel"), "{kvm}");
        assert!(find(&lines, "kernel")
            .message
            .contains("hack/build-kernel.sh"));
        assert!(find(&lines, "binaries").message.contains("arrow install"));
        assert_eq!(find(&lines, "tun").status, Status::Fail);
        assert_eq!(find(&lines, "cni").status, Status::Warn);
        assert_eq!(find(&lines, "containerd").status, Status::Warn);
        assert_eq!(find(&lines, "memory").status, Status::Warn);
    }

    #[test]
    fn a_regular_file_is_no_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let host = fake_host(dir.path());
        fs::create_dir_all(host.dev_kvm.parent().unwrap()).unwrap();
        fs::write(&host.dev_kvm, "").unwrap();
        let l = check_kvm(&host);
        assert_eq!(l.status, Status::Fail);
        assert!(l.message.contains("not a character device"), "{l}");
    }

    #[test]
    fn kernel_options_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let host = fake_host(dir.path());
        fs::create_dir_all(host.kernel.parent().unwrap()).unwrap();
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[18] = 62;
        fs::write(&host.kernel, &elf).unwrap();
        assert_eq!(check_kernel(&host)[0].status, Status::Warn);
        let config: String = KERNEL_OPTIONS.iter().map(|o| format!("{o}=y\n")).collect();
        fs::write(host.kernel.with_file_name("config"), &config).unwrap();
        assert_eq!(check_kernel(&host)[0].status, Status::Ok);
        fs::write(
            host.kernel.with_file_name("config"),
            config.replace("CONFIG_VIRTIO_FS=y", ""),
        )
        .unwrap();
        let l = &check_kernel(&host)[0];
        assert_eq!(l.status, Status::Fail);
        assert!(l.message.contains("CONFIG_VIRTIO_FS"), "{l}");
    }

    #[test]
    fn elf_parsing_is_bounded() {
        assert_eq!(elf_info(b"\x7fELF\x02\x01"), None);
        assert_eq!(elf_info(b"nope"), None);
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[18] = 62;
        // Program headers far past the end: no interpreter found, no panic.
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        elf[54] = 56;
        elf[56] = 0xff;
        assert_eq!(elf_info(&elf), Some((62, true)));
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            elf_info(&me),
            Some((62, false)),
            "test binaries are dynamic"
        );
    }

    #[test]
    fn containerd_versions() {
        let debian = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3";
        assert_eq!(parse_containerd_version(debian), Some((1, 6)));
        assert_eq!(
            parse_containerd_version("containerd github.com/containerd/containerd/v2 v2.0.4 1a43"),
            Some((2, 0))
        );
        assert_eq!(parse_containerd_version("what"), None);
        let dir = tempfile::tempdir().unwrap();
        let mut host = fake_host(dir.path());
        host.containerd_version = Some("containerd x 1.5.9".into());
        assert_eq!(check_containerd_version(&host).status, Status::Fail);
        host.containerd_version = Some(debian.into());
        assert_eq!(check_containerd_version(&host).status, Status::Ok);
    }

    #[test]
    fn runtime_and_cni_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let host = fake_host(dir.path());
        let cni = dir.path().join("elsewhere");
        fs::create_dir_all(&cni).unwrap();
        for p in CNI_PLUGINS {
            fs::write(cni.join(p), "").unwrap();
        }
        let config = format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{}\"\n",
            cni.display()
        );
        fs::write(&host.containerd_config, &config).unwrap();
        assert_eq!(check_containerd_config(&host).status, Status::Warn);
        assert_eq!(check_cni(&host).status, Status::Ok);
        fs::write(
            &host.containerd_config,
            containerd_config::add_runtime(&config).unwrap(),
        )
        .unwrap();
        assert_eq!(check_containerd_config(&host).status, Status::Ok);
    }

    #[test]
    fn memory_thresholds() {
        assert_eq!(
            available_mib("MemTotal: 1 kB\nMemAvailable:    2097152 kB\n"),
            Some(2048)
        );
        assert_eq!(available_mib("MemTotal: 1 kB\n"), None);
        let dir = tempfile::tempdir().unwrap();
        let host = fake_host(dir.path());
        fs::write(&host.meminfo, "MemAvailable: 102400 kB\n").unwrap();
        assert_eq!(check_memory(&host).status, Status::Fail);
        fs::write(&host.meminfo, "MemAvailable: 524288 kB\n").unwrap();
        assert_eq!(check_memory(&host).status, Status::Warn);
    }
}
