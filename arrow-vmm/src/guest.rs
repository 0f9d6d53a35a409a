//! Getting a guest whose arrow-init is reachable, shared by `run`,
//! `template create` and `serve`: the VM's configuration from the command
//! line, and what vmm-core's clone-or-boot launch (`vmm_core::launch`)
//! needs from an Arrow VMM: consoles, timings, and waiting for the agent.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::client::AgentClient;
use proto::{hybrid, AGENT_PORT, GUEST_CID};
use vmm_core::exit::VmExit;
use vmm_core::hypervisor::KvmFlavour;
use vmm_core::initramfs::Initramfs;
use vmm_core::virtio::net::{self, Tap};
use vmm_core::vm::{ConsoleOutput, FsConfig, NetConfig, Vm, VmConfig, VsockConfig};

use crate::paths;
use vmm_core::cancel::Cancel;
pub use vmm_core::launch::{explain_exit, template_key};
use vmm_core::launch::{LaunchError, LaunchEvent, LaunchHooks};
use vmm_core::template::TemplateCache;

/// Where arrow-init lives in the initramfs (`rdinit=`).
pub const INIT_PATH: &str = "/.arrow/init";
/// The virtio-fs tag of the directory shared with `run --share` and
/// `serve --shared-dir`; arrow-init mounts it by this tag.
pub const SHARE_TAG: &str = "arrow";

/// The machine a guest runs on and what it boots: options common to every
/// subcommand that starts an Arrow guest.
#[derive(clap::Args)]
pub struct MachineArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = paths::parse_size)]
    pub memory: u64,
    /// Guest kernel (uncompressed ELF vmlinux); default: the cached build.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Static arrow-init binary; default: next to arrow-vmm.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Seconds to wait for arrow-init to be reachable after the VM starts.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// Extra kernel arguments.
    #[arg(long = "kernel-arg")]
    pub kernel_args: Vec<String>,
    /// Print how long each phase took (for benchmarks) on stderr.
    #[arg(long)]
    pub timings: bool,
    /// Give the guest a NIC (virtio-net, eth0) over this inherited tap file
    /// descriptor, opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    #[arg(long, value_name = "FD", conflicts_with = "net_tap")]
    pub net_tap_fd: Option<i32>,
    /// Give the guest a NIC over the tap NAME, opened (or created) here
    /// (needs CAP_NET_ADMIN; for debugging).
    #[arg(long, value_name = "NAME")]
    pub net_tap: Option<String>,
    /// The NIC's MAC address (part of the template key).
    #[arg(long, value_name = "MAC", default_value = DEFAULT_MAC, value_parser = parse_mac)]
    pub net_mac: [u8; 6],
    /// The MTU the guest's NIC is told (part of the template key).
    #[arg(long, value_name = "BYTES", default_value_t = 1500)]
    pub net_mtu: u16,
}

/// The guest NIC's default MAC: locally administered, unicast.
pub const DEFAULT_MAC: &str = "02:a7:72:00:00:01";

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    match net::parse_mac(s) {
        Some(mac) if net::mac_is_valid(&mac) => Ok(mac),
        Some(_) => Err(format!("{s}: not a unicast address")),
        None => Err(format!("{s}: expected six hex bytes, e.g. {DEFAULT_MAC}")),
    }
}

/// The NIC from `--net-tap-fd` or `--net-tap`, if either is given.
///
/// Call at most once per process: it takes ownership of the inherited
/// descriptor.
fn net_config(machine: &MachineArgs) -> anyhow::Result<Option<NetConfig>> {
    let tap = match (machine.net_tap_fd, &machine.net_tap) {
        (Some(fd), _) => {
            // stdin, stdout and stderr have their own uses here.
            if fd < 3 {
                bail!("--net-tap-fd {fd}: must be 3 or more");
            }
            // SAFETY: F_GETFD only inspects the descriptor table.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                bail!(
                    "--net-tap-fd {fd}: not an open file descriptor ({})",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: the descriptor was inherited open (checked above) and
            // nothing else in this process owns it; this is the only place
            // that claims it, once.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            Tap::from_fd(owned).with_context(|| format!("--net-tap-fd {fd}"))?
        }
        (None, Some(name)) => Tap::open_named(name)?,
        (None, None) => return Ok(None),
    };
    Ok(Some(NetConfig {
        tap,
        mac: machine.net_mac,
        mtu: machine.net_mtu,
    }))
}

/// The initramfs: an optional root tree, and arrow-init at [`INIT_PATH`].
pub fn build_initramfs(rootfs: Option<&Path>, init: &Path) -> anyhow::Result<Vec<u8>> {
    let mut cpio = Initramfs::new();
    if let Some(root) = rootfs {
        if !root.is_dir() {
            bail!("--rootfs {}: not a directory", root.display());
        }
        cpio.add_tree(root)?;
    }
    let init_bytes = std::fs::read(init).with_context(|| format!("reading {}", init.display()))?;
    cpio.add_dir(".arrow", 0o755);
    cpio.add_file(INIT_PATH.trim_start_matches('/'), 0o755, &init_bytes)?;
    Ok(cpio.finish())
}

/// The configuration of an Arrow guest: kernel, arrow-init (with `rootfs`
/// packed around it, if any), the vsock device on `uds`, `share` as
/// virtio-fs tag [`SHARE_TAG`], and a NIC if the machine has a tap. With `debug_console`, arrow-init logs to
/// the console, else the kernel is told to be quiet. The console is left
/// to the caller.
pub fn vm_config(
    machine: &MachineArgs,
    rootfs: Option<&Path>,
    debug_console: bool,
    uds: &Path,
    share: Option<&Path>,
) -> anyhow::Result<VmConfig> {
    let kernel = paths::kernel(machine.kernel.as_deref())?;
    let init = paths::init(machine.init.as_deref())?;
    if let Some(dir) = share {
        if !dir.is_dir() {
            bail!("shared directory {}: not a directory", dir.display());
        }
    }
    let mut config = VmConfig::new(kernel);
    config.vcpus = machine.vcpus;
    config.memory_bytes = machine.memory;
    config.initramfs = Some(build_initramfs(rootfs, &init)?);
    config.kernel_args = vec![format!("rdinit={INIT_PATH}")];
    config.kernel_args.push(
        if debug_console {
            "arrow.debug"
        } else {
            "quiet"
        }
        .into(),
    );
    config
        .kernel_args
        .extend(machine.kernel_args.iter().cloned());
    config.vsock = Some(VsockConfig {
        guest_cid: u64::from(GUEST_CID),
        uds_path: uds.to_path_buf(),
    });
    config.fs = share.map(|dir| FsConfig {
        tag: SHARE_TAG.into(),
        shared_dir: dir.to_path_buf(),
        read_only: false,
    });
    config.net = net_config(machine)?;
    config.flavour = Some(KvmFlavour::detect());
    Ok(config)
}

/// Phase timestamps since the command started, printed with `--timings`.
pub struct Timings {
    start: Instant,
    enabled: bool,
}

impl Timings {
    pub fn new(start: Instant, enabled: bool) -> Self {
        Self { start, enabled }
    }

    pub fn mark(&self, phase: &str) {
        if self.enabled {
            eprintln!(
                "arrow-vmm: timing {phase} {:.1} ms",
                self.start.elapsed().as_secs_f64() * 1000.0
            );
        }
    }

    /// Time since the command started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Polls the agent until it answers, the VM ends, `cancel` is requested or
/// `timeout` passes.
pub fn connect_agent(
    vm: &Vm,
    uds: &Path,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<AgentClient, LaunchError> {
    let deadline = Instant::now() + timeout;
    loop {
        cancel.check()?;
        if let Some(exit) = vm.wait(Some(Duration::ZERO)) {
            return Err(LaunchError::Stopped {
                what: "guest",
                why: explain_exit(vm, &exit),
            });
        }
        if let Ok(stream) = hybrid::connect(uds, AGENT_PORT, Duration::from_secs(2)) {
            if let Ok(client) = AgentClient::from_unix(stream) {
                if client.ping().is_ok() {
                    return Ok(client);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(LaunchError::NotReady(format!(
                "guest did not become ready within {} s (arrow-init never answered); {}",
                timeout.as_secs(),
                explain_exit(vm, &VmExit::Stopped)
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// arrow-vmm's side of a launch: each attempt's console, the phases'
/// timings and messages, and what "ready" means for an Arrow guest:
/// arrow-init answers on vsock.
pub struct AgentHooks<'a> {
    /// The host end of the guest's hybrid vsock.
    pub uds: PathBuf,
    pub timings: &'a Timings,
    /// Print the KVM flavour and kernel command line on stderr.
    pub show_cmdline: bool,
    pub console: Box<dyn FnMut() -> anyhow::Result<ConsoleOutput> + 'a>,
}

impl LaunchHooks for AgentHooks<'_> {
    type Ready = AgentClient;

    fn console(&mut self) -> std::io::Result<ConsoleOutput> {
        (self.console)().map_err(|e| std::io::Error::other(format!("{e:#}")))
    }

    fn wait_ready(
        &mut self,
        vm: &Vm,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Result<AgentClient, LaunchError> {
        connect_agent(vm, &self.uds, timeout, cancel)
    }

    fn event(&mut self, event: LaunchEvent<'_>) {
        match event {
            LaunchEvent::Built { flavour, cmdline } => {
                if self.show_cmdline {
                    eprintln!("arrow-vmm: {flavour} ; cmdline: {cmdline}");
                }
                self.timings.mark("vm-built");
            }
            LaunchEvent::Booted => self.timings.mark("booted"),
            LaunchEvent::TemplateSaved => self.timings.mark("template-saved"),
            LaunchEvent::TemplateNotSaved(e) => {
                eprintln!("arrow-vmm: could not save a template: {e}");
            }
            LaunchEvent::TemplateRemoved(why) => eprintln!("arrow-vmm: {why}"),
            LaunchEvent::CloneRestored => self.timings.mark("clone-restored"),
            LaunchEvent::CloneReady => self.timings.mark("clone-vsock-reset"),
        }
    }
}

/// The template cache this VMM uses (`$ARROW_CACHE/templates`).
pub fn template_cache() -> TemplateCache {
    TemplateCache::new(paths::cache_dir().join("templates"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_holds_init_where_rdinit_points() {
        let init = std::env::current_exe().unwrap();
        let cpio = build_initramfs(None, &init).unwrap();
        let text = String::from_utf8_lossy(&cpio[..400]);
        assert!(text.contains(".arrow/init"));
        assert!(build_initramfs(Some(Path::new("/nonexistent")), &init).is_err());
    }

    #[derive(clap::Parser)]
    struct Machine {
        #[command(flatten)]
        machine: MachineArgs,
    }

    fn machine(args: &[&str]) -> Result<MachineArgs, clap::Error> {
        use clap::Parser;
        Machine::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|m| m.machine)
    }

    #[test]
    fn net_flags() {
        let m = machine(&[]).unwrap();
        assert!(net_config(&m).unwrap().is_none(), "no tap, no NIC");
        assert_eq!(m.net_mac, [0x02, 0xa7, 0x72, 0, 0, 1]);
        assert_eq!(m.net_mtu, 1500);
        let m = machine(&["--net-mac", "02:00:00:00:00:2a", "--net-mtu", "9000"]).unwrap();
        assert_eq!((m.net_mac, m.net_mtu), ([2, 0, 0, 0, 0, 0x2a], 9000));
        assert!(
            machine(&["--net-mac", "01:00:00:00:00:01"]).is_err(),
            "multicast"
        );
        assert!(machine(&["--net-mac", "nonsense"]).is_err());
        assert!(machine(&["--net-tap-fd", "5", "--net-tap", "tap0"]).is_err());
        let err = net_config(&machine(&["--net-tap-fd", "1"]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("3 or more"), "{err}");
        let err = net_config(&machine(&["--net-tap-fd", "987654"]).unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("not an open file descriptor"),
            "{err}"
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(null).to_string();
        // Claimed (and closed) by net_config, refused: not a tap.
        let err = net_config(&machine(&["--net-tap-fd", &fd]).unwrap()).unwrap_err();
        assert!(format!("{err:#}").contains("not a tap"), "{err:#}");
    }
}
