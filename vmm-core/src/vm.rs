//! A microVM: built in one place from one validated [`VmConfig`] (as in
//! Firecracker's builder), then started, waited on and stopped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, layout, mptable::MAX_VCPUS};
use crate::cmdline::{CmdlineError, KernelCmdline};
use crate::confinement::{confine_thread, Confinement, ThreadKind};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::I8042;
use crate::devices::irq::IrqLine;
use crate::devices::serial::{ConsoleTail, SerialConsole};
use crate::exit::{ExitNotifier, VmExit};
use crate::hypervisor::KvmFlavour;
use crate::loader::{self, LoadError};
use crate::snapshot::vcpu_state::VcpuState;
use crate::snapshot::{
    self, FsSnapshot, HostSignature, KvmVmState, NetSnapshot, SnapshotError, VmShape, VmSnapshot,
    VsockSnapshot,
};
use crate::vcpu::{Vcpu, VcpuControl, VcpuError, VcpuHandle};
use crate::virtio::fs::{FsError, FsStats, VirtioFs, MAX_HANDLES, MAX_INODES};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::{format_mac, NetError, NetStats, Tap, VirtioNet};
use crate::virtio::persist::MmioTransportState;
use crate::virtio::vsock::{VirtioVsock, VsockError};
use crate::virtio::VirtioDevice;

/// Descriptors a VMM process needs besides its virtio-fs share's: KVM
/// (VM, vCPUs, irqfds, ioeventfds), eventfds and the epoll of the event
/// loop, the tap, the console log, and the vsock device's sockets (at most
/// 1024 connections and 64 pending clients).
pub const OPEN_FILES_HEADROOM: u64 = 4096;

/// The `RLIMIT_NOFILE` a VMM process sets for itself (131072 + 16384 +
/// 4096 = 151552): one VM's worth, so that even a miscount of the
/// virtio-fs bounds ([`MAX_INODES`], [`MAX_HANDLES`]) ends in `EMFILE` for
/// this VM, never in the host running out of descriptors. It does not
/// inherit containerd's (often 1048576 or more).
pub const OPEN_FILES_LIMIT: u64 = (MAX_INODES + MAX_HANDLES) as u64 + OPEN_FILES_HEADROOM;

/// The event loop's subscribers: every device with host-side I/O.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Where the guest console goes.
pub enum ConsoleOutput {
    /// Dropped (the last 16 KiB are still kept for diagnostics).
    Sink,
    /// This process's stderr.
    Stderr,
    /// Any writer: a file, a pipe.
    Writer(Box<dyn Write + Send>),
}

impl ConsoleOutput {
    /// The writer, leaving `Sink` behind.
    fn take_writer(&mut self) -> Option<Box<dyn Write + Send>> {
        match std::mem::replace(self, ConsoleOutput::Sink) {
            ConsoleOutput::Sink => None,
            ConsoleOutput::Stderr => Some(Box::new(std::io::stderr())),
            ConsoleOutput::Writer(w) => Some(w),
        }
    }
}

/// The host backends of a clone: everything the snapshot cannot carry.
pub struct RestoreConfig {
    /// Console output.
    pub console: ConsoleOutput,
    /// New path of the vsock device's Unix socket (needed when the snapshot
    /// has a vsock device).
    pub vsock_uds_path: Option<PathBuf>,
    /// The directory the clone's virtio-fs device shares: needed exactly
    /// when the snapshot has one (a template holds the device, each clone
    /// attaches its own directory).
    pub fs_shared_dir: Option<PathBuf>,
    /// Whether the clone's share is read-only (see [`FsConfig::read_only`]).
    pub fs_read_only: bool,
    /// The tap behind the clone's virtio-net device: needed exactly when
    /// the snapshot has one (a template holds the NIC, each clone attaches
    /// its own tap).
    pub net_tap: Option<Tap>,
    /// Override of the detected KVM flavour.
    pub flavour: Option<KvmFlavour>,
    /// Run on each thread the clone starts, before it touches guest input.
    pub confinement: Option<Confinement>,
}

impl Default for RestoreConfig {
    /// No backends, console dropped, flavour detected.
    fn default() -> Self {
        Self {
            console: ConsoleOutput::Sink,
            vsock_uds_path: None,
            fs_shared_dir: None,
            fs_read_only: false,
            net_tap: None,
            flavour: None,
            confinement: None,
        }
    }
}

/// The vsock device: the guest's context id, and the Unix socket on which
/// the host reaches guest ports (`CONNECT <port>`).
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// Guest context id (3 or more).
    pub guest_cid: u64,
    /// Path of the host-side Unix socket; `<path>_<port>` for guest-initiated
    /// connections.
    pub uds_path: PathBuf,
}

/// The virtio-fs device: a host directory the guest mounts by tag
/// (`mount -t virtiofs <tag> <dir>`).
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// The tag the guest mounts the share by (1 to 36 bytes).
    pub tag: String,
    /// The host directory the guest sees.
    pub shared_dir: PathBuf,
    /// Refuse every request that would change the directory (`EROFS`).
    pub read_only: bool,
}

/// The virtio-net device: the guest's NIC over a tap the caller opened.
#[derive(Debug)]
pub struct NetConfig {
    /// The tap (opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`).
    pub tap: Tap,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The MTU the guest is told (68 to 65521).
    pub mtu: u16,
}

/// Everything needed to build a VM.
pub struct VmConfig {
    /// Number of vCPUs, 1..=32.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// Uncompressed ELF kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// An initramfs (`newc` cpio), if any.
    pub initramfs: Option<Vec<u8>>,
    /// Extra kernel arguments, appended last.
    pub kernel_args: Vec<String>,
    /// Console output.
    pub console: ConsoleOutput,
    /// A virtio-vsock device with a hybrid Unix-socket backend, if any.
    pub vsock: Option<VsockConfig>,
    /// A virtio-fs device sharing a host directory, if any. It takes the
    /// virtio-mmio slot after the vsock device's.
    pub fs: Option<FsConfig>,
    /// A virtio-net device over a tap, if any. It takes the virtio-mmio
    /// slot after the virtio-fs device's (or the vsock device's).
    pub net: Option<NetConfig>,
    /// Override of the detected KVM flavour (tests, or a host the detection
    /// gets wrong).
    pub flavour: Option<KvmFlavour>,
    /// Run on each thread the VM starts (vCPUs, device event loop), first
    /// thing, before it touches guest input; see [`crate::confinement`].
    pub confinement: Option<Confinement>,
}

impl VmConfig {
    /// A config with one vCPU, 128 MiB, no initramfs, console dropped.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            vcpus: 1,
            memory_bytes: 128 << 20,
            kernel: kernel.into(),
            initramfs: None,
            kernel_args: Vec::new(),
            console: ConsoleOutput::Sink,
            vsock: None,
            fs: None,
            net: None,
            flavour: None,
            confinement: None,
        }
    }

    /// The virtio devices in slot order, each with what the guest sees of
    /// it (not the host backends, which a clone replaces). A snapshot only
    /// restores into the same set, so a template cache keys on it.
    pub fn device_set(&self) -> Vec<String> {
        let mut set = Vec::new();
        if let Some(vsock) = &self.vsock {
            set.push(format!("virtio-vsock cid={}", vsock.guest_cid));
        }
        if let Some(fs) = &self.fs {
            set.push(format!("virtio-fs tag={}", fs.tag));
        }
        if let Some(net) = &self.net {
            set.push(format!(
                "virtio-net mac={} mtu={}",
                format_mac(&net.mac),
                net.mtu
            ));
        }
        set
    }

    /// The backends of this config as a [`RestoreConfig`], for a clone of
    /// a VM built from it: same socket path and shared directory, and a
    /// duplicate of the tap's descriptor.
    pub fn restore_config(&self, console: ConsoleOutput) -> RestoreConfig {
        let net_tap = self.net.as_ref().and_then(|n| {
            n.tap
                .try_clone()
                .map_err(|e| log::error!("duplicating the tap descriptor: {e}"))
                .ok()
        });
        RestoreConfig {
            console,
            vsock_uds_path: self.vsock.as_ref().map(|v| v.uds_path.clone()),
            fs_shared_dir: self.fs.as_ref().map(|f| f.shared_dir.clone()),
            fs_read_only: self.fs.as_ref().is_some_and(|f| f.read_only),
            net_tap,
            flavour: self.flavour,
            confinement: self.confinement.clone(),
        }
    }
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm ({0}); Arrow needs KVM: load kvm_intel, kvm_amd or kvm_pvm and check permissions")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU count is out of range.
    #[error("{0} vCPUs requested; Arrow supports 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
    /// The memory size is out of range.
    #[error("{0} bytes of guest memory requested; at least 16 MiB, in whole MiB, is needed")]
    MemorySize(u64),
    /// Guest memory cannot be allocated.
    #[error("allocating {size} bytes of guest memory: {source}")]
    Memory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// Loading the boot payload failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The command line is invalid.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// A device could not be placed on a bus.
    #[error("placing a device: {0}")]
    Bus(BusError),
    /// Too many devices for the IOAPIC's pins.
    #[error("too many virtio devices")]
    TooManyDevices,
    /// The vsock device could not be created.
    #[error("vsock device: {0}")]
    Vsock(VsockError),
    /// The virtio-fs device could not be created, restored or saved.
    #[error("virtio-fs device: {0}")]
    Fs(FsError),
    /// The virtio-net device could not be created or restored.
    #[error("virtio-net device: {0}")]
    Net(NetError),
    /// The backends given for a clone do not match the snapshot's devices.
    #[error("{0}")]
    Backends(String),
    /// An eventfd could not be created.
    #[error("creating an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// vCPU set-up or start failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The event loop could not be created or started.
    #[error("device event loop: {0}")]
    EventLoop(String),
    /// Saving or loading a snapshot failed.
    #[error("snapshot: {0}")]
    Snapshot(SnapshotError),
    /// A snapshot could not be taken or restored.
    #[error("{0}")]
    Restore(String),
    /// `start` was called twice.
    #[error("the VM was already started")]
    AlreadyStarted,
    /// The vCPUs could not be paused, or the VM was not running.
    #[error("pausing the VM: {0}")]
    Pause(String),
}

// These wrap errors whose message already ends with their own cause, so
// the wrapped error is not exposed as `source()`: an error chain printed
// whole (`{:#}`) would say it twice.
macro_rules! from_without_source {
    ($($variant:ident($error:ty)),*) => {$(
        impl From<$error> for VmError {
            fn from(e: $error) -> Self {
                VmError::$variant(e)
            }
        }
    )*};
}
from_without_source!(
    Bus(BusError),
    Vsock(VsockError),
    Fs(FsError),
    Net(NetError),
    Snapshot(SnapshotError)
);

impl VmError {
    /// Whether an error of [`Vm::restore`] is the snapshot's fault (it is
    /// unreadable, corrupt, from another format or host, or holds state
    /// this host refuses) rather than this host's or the clone's backends'
    /// (no KVM, out of memory, a socket path in use, a missing shared
    /// directory). A template cache drops and rebuilds a snapshot only for
    /// the former: rebuilding would not cure the latter.
    pub fn is_snapshot_fault(&self) -> bool {
        match self {
            VmError::Snapshot(_) | VmError::Restore(_) | VmError::Vcpu(_) => true,
            VmError::Vsock(e) => matches!(
                e,
                VsockError::InvalidCid(_)
                    | VsockError::UnofferedFeatures { .. }
                    | VsockError::InvalidHostPort(_)
            ),
            VmError::Fs(e) => matches!(
                e,
                FsError::InvalidTag(_) | FsError::UnofferedFeatures { .. }
            ),
            VmError::Net(e) => matches!(
                e,
                NetError::InvalidMac(_)
                    | NetError::InvalidMtu(_)
                    | NetError::UnofferedFeatures { .. }
            ),
            _ => false,
        }
    }
}

/// The vsock device and its transport, kept for snapshots.
type VsockHandles = (Arc<Mutex<MmioTransport>>, Arc<Mutex<VirtioVsock>>);
/// The virtio-fs device and its transport, kept for snapshots.
type FsHandles = (Arc<Mutex<MmioTransport>>, Arc<Mutex<VirtioFs>>);
/// The virtio-net device and its transport, kept for snapshots.
type NetHandles = (Arc<Mutex<MmioTransport>>, Arc<Mutex<VirtioNet>>);

/// A built, possibly running, microVM. Dropping it stops the VM.
pub struct Vm {
    // Field order matters for drop: threads stop (in `Drop`) before the
    // VM fd and the guest memory they use go away.
    vcpus: Vec<Vcpu>,
    running: Vec<VcpuHandle>,
    control: Arc<VcpuControl>,
    /// Whether [`Vm::pause`] parked the vCPUs; the lock also keeps a pause
    /// and a resume from crossing.
    paused: Mutex<bool>,
    event_loop: Option<EventLoop>,
    subscribers: Vec<Subscriber>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitNotifier,
    console: ConsoleTail,
    serial: Arc<Mutex<SerialConsole>>,
    vsock: Option<VsockHandles>,
    /// For a clone: what tells the guest took its vsock transport reset.
    vsock_reset: Option<ResetWatch>,
    fs: Option<FsHandles>,
    net: Option<NetHandles>,
    flavour: KvmFlavour,
    shape: VmShape,
    memory: GuestMemoryMmap<()>,
    vm_fd: VmFd,
    confinement: Option<Confinement>,
}

impl Vm {
    /// Builds the whole VM from `config`: KVM objects, guest memory, legacy
    /// and virtio devices, the boot payload, and configured vCPUs. Nothing
    /// runs until [`Vm::start`].
    pub fn build(mut config: VmConfig) -> Result<Self, VmError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount(config.vcpus));
        }
        if config.memory_bytes < (16 << 20) || !config.memory_bytes.is_multiple_of(1 << 20) {
            return Err(VmError::MemorySize(config.memory_bytes));
        }
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let flavour = config.flavour.unwrap_or_else(KvmFlavour::detect);
        let memory =
            loader::create_guest_memory(config.memory_bytes).map_err(|source| VmError::Memory {
                size: config.memory_bytes,
                source,
            })?;
        let vm_fd = create_kvm_vm(&kvm, &memory)?;
        let exit = ExitNotifier::new();
        let console = ConsoleTail::default();
        let serial_irq = new_irq_line(&vm_fd, layout::SERIAL_IRQ)?;
        let serial = SerialConsole::new(serial_irq, config.console.take_writer(), console.clone());
        let serial = Arc::new(Mutex::new(serial));
        let pio = legacy_bus(serial.clone(), &exit)?;

        let mut cmdline = KernelCmdline::for_flavour(flavour, config.vcpus);
        let mut devices = VirtioDevices::new();
        let vsock = match &config.vsock {
            Some(vsock) => {
                let dev = Arc::new(Mutex::new(VirtioVsock::new(
                    vsock.guest_cid,
                    vsock.uds_path.clone(),
                )?));
                let transport = devices.attach_new(&vm_fd, &memory, dev.clone(), &mut cmdline)?;
                Some((transport, dev))
            }
            None => None,
        };
        // After the vsock device, which binds its socket first: setting up
        // the passthrough file system clears the process umask.
        let fs = match &config.fs {
            Some(fs) => {
                let dev = Arc::new(Mutex::new(VirtioFs::new(
                    &fs.tag,
                    &fs.shared_dir,
                    fs.read_only,
                )?));
                let transport = devices.attach_new(&vm_fd, &memory, dev.clone(), &mut cmdline)?;
                Some((transport, dev))
            }
            None => None,
        };
        let net = match config.net.take() {
            Some(net) => {
                let dev = Arc::new(Mutex::new(VirtioNet::new(net.tap, net.mac, net.mtu)?));
                let transport = devices.attach_new(&vm_fd, &memory, dev.clone(), &mut cmdline)?;
                Some((transport, dev))
            }
            None => None,
        };
        for arg in &config.kernel_args {
            cmdline.push(arg.clone())?;
        }
        let cmdline = cmdline.build()?;

        let entry = loader::load_boot_payload(
            &memory,
            config.memory_bytes,
            config.vcpus,
            &config.kernel,
            config.initramfs.as_deref(),
            &cmdline,
        )?;

        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let mut base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        if flavour.emulates_guest_kernel() {
            cpuid::mask_for_instruction_emulation(base_cpuid.as_mut_slice());
        }
        let msr_index_list = msr_index_list(&kvm)?;
        let vcpus = (0..config.vcpus)
            .map(|i| {
                Vcpu::new(
                    &vm_fd,
                    i,
                    config.vcpus,
                    &base_cpuid,
                    entry.0,
                    msr_index_list.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Self {
            vcpus,
            running: Vec::new(),
            control: Arc::new(VcpuControl::default()),
            paused: Mutex::new(false),
            event_loop: None,
            subscribers: devices.subscribers,
            pio: Arc::new(pio),
            mmio: Arc::new(devices.mmio),
            exit,
            console,
            serial,
            vsock,
            vsock_reset: None,
            fs,
            net,
            flavour,
            shape: VmShape {
                vcpus: config.vcpus,
                memory_bytes: config.memory_bytes,
                cmdline,
            },
            memory,
            vm_fd,
            confinement: config.confinement.take(),
        })
    }

    /// Creates a clone of the VM saved in `snapshot_dir`: its memory mapped
    /// copy-on-write from the snapshot's memory file, every vCPU, in-kernel
    /// irqchip and device state restored, and host backends attached anew
    /// (console writer, vsock socket path, virtio-fs shared directory, tap).
    /// After [`Vm::start`] the guest continues where the snapshot was taken;
    /// its vsock connections are reset so it drops those of the template.
    ///
    /// Every device of the snapshot needs its backend in `config`, and a
    /// shared directory or a tap needs its device in the snapshot; a
    /// mismatch is [`VmError::Backends`].
    pub fn restore(snapshot_dir: &Path, mut config: RestoreConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let flavour = config.flavour.unwrap_or_else(KvmFlavour::detect);
        let snap = snapshot::read_state(snapshot_dir, &HostSignature::current(flavour))?;
        let vcpu_count = snap.vcpus.len();
        if vcpu_count == 0
            || vcpu_count > usize::from(MAX_VCPUS)
            || vcpu_count != usize::from(snap.shape.vcpus)
        {
            return Err(VmError::Restore(format!(
                "snapshot holds {vcpu_count} vCPU states for a {}-vCPU VM",
                snap.shape.vcpus
            )));
        }
        let memory = snapshot::memory::map_private(
            &snapshot_dir.join(snapshot::MEMORY_FILE),
            snap.shape.memory_bytes,
        )?;
        let vm_fd = create_kvm_vm(&kvm, &memory)?;
        // Refusals of the saved state are the snapshot's fault (`Restore`),
        // unlike KVM failures to create the VM.
        let state_err = |what| {
            move |e: kvm_ioctls::Error| VmError::Restore(format!("restoring the {what}: {e}"))
        };
        for chip in &snap.vm.irqchips {
            vm_fd.set_irqchip(chip).map_err(state_err("irqchip"))?;
        }
        vm_fd.set_pit2(&snap.vm.pit).map_err(state_err("PIT"))?;
        let clock = kvm_bindings::kvm_clock_data {
            clock: snap.vm.clock.clock,
            ..Default::default()
        };
        vm_fd.set_clock(&clock).map_err(state_err("kvmclock"))?;

        let exit = ExitNotifier::new();
        let console = ConsoleTail::default();
        let serial_irq = new_irq_line(&vm_fd, layout::SERIAL_IRQ)?;
        let serial = SerialConsole::restore(
            &snap.serial,
            serial_irq,
            config.console.take_writer(),
            console.clone(),
        )
        .map_err(VmError::Restore)?;
        let serial = Arc::new(Mutex::new(serial));
        let pio = legacy_bus(serial.clone(), &exit)?;

        let mut devices = VirtioDevices::new();
        let vsock = match (&snap.vsock, config.vsock_uds_path.take()) {
            (Some(saved), Some(uds_path)) => {
                let dev = Arc::new(Mutex::new(VirtioVsock::restore(&saved.device, uds_path)?));
                let transport = devices.attach_restored(
                    &vm_fd,
                    &memory,
                    dev.clone(),
                    &saved.transport,
                    "vsock",
                )?;
                Some((transport, dev))
            }
            (Some(_), None) => {
                return Err(VmError::Backends(
                    "the snapshot has a vsock device: a socket path for it is needed".into(),
                ))
            }
            (None, _) => None,
        };
        // Same slot order as `build`: vsock, then virtio-fs.
        let fs = match (&snap.fs, config.fs_shared_dir.take()) {
            (Some(saved), Some(dir)) => {
                let dev = Arc::new(Mutex::new(VirtioFs::restore(
                    &saved.device,
                    &dir,
                    config.fs_read_only,
                )?));
                let transport = devices.attach_restored(
                    &vm_fd,
                    &memory,
                    dev.clone(),
                    &saved.transport,
                    "virtio-fs",
                )?;
                Some((transport, dev))
            }
            (Some(saved), None) => {
                return Err(VmError::Backends(format!(
                    "the snapshot has a virtio-fs device (tag {:?}): a shared directory for it \
                     is needed",
                    saved.device.tag
                )))
            }
            (None, Some(dir)) => {
                return Err(VmError::Backends(format!(
                    "the snapshot has no virtio-fs device to share {} through",
                    dir.display()
                )))
            }
            (None, None) => None,
        };
        // Then virtio-net.
        let net = match (&snap.net, config.net_tap.take()) {
            (Some(saved), Some(tap)) => {
                let dev = Arc::new(Mutex::new(VirtioNet::restore(&saved.device, tap)?));
                let transport = devices.attach_restored(
                    &vm_fd,
                    &memory,
                    dev.clone(),
                    &saved.transport,
                    "virtio-net",
                )?;
                Some((transport, dev))
            }
            (Some(saved), None) => {
                return Err(VmError::Backends(format!(
                    "the snapshot has a virtio-net device (MAC {}): a tap for it is needed",
                    format_mac(&saved.device.mac)
                )))
            }
            (None, Some(tap)) => {
                return Err(VmError::Backends(format!(
                    "the snapshot has no virtio-net device to attach tap {} to",
                    tap.name()
                )))
            }
            (None, None) => None,
        };

        let msr_index_list = msr_index_list(&kvm)?;
        let vcpus = snap
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, state)| Vcpu::restore(&vm_fd, i as u8, state, msr_index_list.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let vsock_reset = vsock.as_ref().map(|(_, dev)| {
            let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
            let before = ResetWatch::event_queue(&dev, &memory);
            dev.send_transport_reset();
            let after = ResetWatch::event_queue(&dev, &memory);
            ResetWatch {
                avail_idx: after.map(|(avail, _)| avail),
                delivered: matches!((before, after), (Some((_, a)), Some((_, b))) if a != b),
            }
        });

        Ok(Self {
            vcpus,
            running: Vec::new(),
            control: Arc::new(VcpuControl::default()),
            paused: Mutex::new(false),
            event_loop: None,
            subscribers: devices.subscribers,
            pio: Arc::new(pio),
            mmio: Arc::new(devices.mmio),
            exit,
            console,
            serial,
            vsock,
            vsock_reset,
            fs,
            net,
            flavour,
            shape: snap.shape,
            memory,
            vm_fd,
            confinement: config.confinement.take(),
        })
    }

    /// Pauses the running VM at a clean point, writes a snapshot of it into
    /// `dir` (`vmstate` and `memory`, readable by this user only: guest
    /// memory holds the guest's secrets, and whoever can write it controls
    /// every clone), then resumes it if `resume`.
    ///
    /// A VM whose guest has a FUSE session on its virtio-fs device (it
    /// mounted the share) cannot be snapshotted: [`FsError::SessionOpen`].
    pub fn snapshot(&mut self, dir: &Path, resume: bool) -> Result<(), VmError> {
        if self.running.is_empty() {
            return Err(VmError::Restore(
                "only a running VM can be snapshotted".into(),
            ));
        }
        if self.is_paused() {
            return Err(VmError::Restore(
                "a paused VM cannot be snapshotted; resume it first".into(),
            ));
        }
        let vcpus = self
            .control
            .pause(&self.running, Duration::from_secs(10))
            .map_err(VmError::Restore);
        let result = vcpus.and_then(|vcpus| self.write_snapshot(dir, vcpus));
        if resume {
            self.control.resume();
        }
        result
    }

    fn write_snapshot(&self, dir: &Path, vcpus: Vec<VcpuState>) -> Result<(), VmError> {
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let mut irqchips = Vec::new();
        for chip_id in 0..3 {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("get irqchip"))?;
            irqchips.push(chip);
        }
        let vm = KvmVmState {
            irqchips,
            pit: self.vm_fd.get_pit2().map_err(kvm_err("get PIT"))?,
            clock: self.vm_fd.get_clock().map_err(kvm_err("get kvmclock"))?,
        };
        // The device locks are held until guest memory is written, so the
        // event loop cannot move a queue on after its state was saved.
        let vsock = self.vsock.as_ref().map(|(t, d)| {
            (
                t.lock().unwrap_or_else(|e| e.into_inner()),
                d.lock().unwrap_or_else(|e| e.into_inner()),
            )
        });
        let fs_locked = self.fs.as_ref().map(|(t, d)| {
            (
                t.lock().unwrap_or_else(|e| e.into_inner()),
                d.lock().unwrap_or_else(|e| e.into_inner()),
            )
        });
        let net = self.net.as_ref().map(|(t, d)| {
            (
                t.lock().unwrap_or_else(|e| e.into_inner()),
                d.lock().unwrap_or_else(|e| e.into_inner()),
            )
        });
        // Refused before anything is written if the guest uses the share.
        let fs = match &fs_locked {
            Some((t, d)) => Some(FsSnapshot {
                device: d.save()?,
                transport: t.save_from(&**d),
            }),
            None => None,
        };
        snapshot::create_dir(dir)?;
        let state = VmSnapshot {
            host: HostSignature::current(self.flavour),
            shape: self.shape.clone(),
            vm,
            vcpus,
            serial: self.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
            vsock: vsock.as_ref().map(|(t, d)| VsockSnapshot {
                transport: t.save_from(&**d),
                device: d.save(),
            }),
            fs,
            net: net.as_ref().map(|(t, d)| NetSnapshot {
                transport: t.save_from(&**d),
                device: d.save(),
            }),
        };
        snapshot::memory::save(&self.memory, &dir.join(snapshot::MEMORY_FILE))?;
        // vmstate last: its presence marks a complete snapshot.
        snapshot::write_state(dir, &state)?;
        drop(vsock);
        drop(fs_locked);
        drop(net);
        Ok(())
    }

    /// Starts the device event loop and every vCPU.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.vcpus.is_empty() {
            return Err(VmError::AlreadyStarted);
        }
        self.event_loop = Some(EventLoop::start(
            std::mem::take(&mut self.subscribers),
            self.exit.clone(),
            self.confinement.clone(),
        )?);
        for vcpu in self.vcpus.drain(..) {
            let handle = vcpu.start(
                self.pio.clone(),
                self.mmio.clone(),
                self.exit.clone(),
                self.control.clone(),
                self.confinement.clone(),
            )?;
            self.running.push(handle);
        }
        Ok(())
    }

    /// Waits for the VM to end, at most `timeout`; `None` if it still runs.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        self.exit.wait(timeout)
    }

    /// Whether the guest has taken the vsock transport reset a clone starts
    /// with ([`Vm::restore`] sends it). Until it has, the guest still holds
    /// the template's connections and the reset, when the guest gets to it,
    /// also kills connections made to the clone meanwhile; a host that must
    /// connect exactly once waits for this first. True for a VM that was
    /// not restored or has no vsock device.
    ///
    /// The guest's driver handles the event and then posts the buffer
    /// again, which is what this watches for on the event queue.
    pub fn vsock_reset_taken(&self) -> bool {
        let (Some(watch), Some((_, dev))) = (&self.vsock_reset, &self.vsock) else {
            return true;
        };
        let dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        let Some((avail, _)) = ResetWatch::event_queue(&dev, &self.memory) else {
            // Not active (the guest reset the device): nothing is left.
            return true;
        };
        let Some(at_restore) = watch.avail_idx else {
            return true;
        };
        // Delivered at restore: the next buffer posted follows the event's
        // handling. Not delivered (no buffer was posted): one buffer takes
        // it, the one after follows its handling.
        let wanted = if watch.delivered { 1 } else { 2 };
        avail.wrapping_sub(at_restore) >= wanted
    }

    /// Parks every vCPU until [`Vm::resume`]: the guest stops running, its
    /// memory and devices stay as they are (devices finish what the guest
    /// had already queued). Pausing a paused VM does nothing; a paused VM
    /// can still be stopped.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if self.running.is_empty() || self.exit.has_exited() {
            return Err(VmError::Pause("the VM is not running".into()));
        }
        if *paused {
            return Ok(());
        }
        self.control
            .pause(&self.running, timeout)
            .map_err(VmError::Pause)?;
        *paused = true;
        Ok(())
    }

    /// Lets the vCPUs of a paused VM run again; does nothing otherwise.
    pub fn resume(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut *paused) {
            self.control.resume();
        }
    }

    /// Whether the VM is paused ([`Vm::pause`]).
    pub fn is_paused(&self) -> bool {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A handle that ends the VM from another thread (a signal watcher, a
    /// watchdog) without owning it: [`Vm::wait`] then returns
    /// [`VmExit::Stopped`], and the owner calls [`Vm::stop`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.exit.clone())
    }

    /// Stops the VM (if still running) and joins its threads. Returns how it
    /// ended.
    pub fn stop(&mut self) -> VmExit {
        self.exit.notify(VmExit::Stopped);
        for vcpu in self.running.drain(..) {
            if !vcpu.stop(Duration::from_secs(5)) {
                log::error!("a vCPU thread did not stop within 5 s");
            }
        }
        if let Some(event_loop) = self.event_loop.take() {
            event_loop.join();
        }
        self.exit.exit().unwrap_or(VmExit::Stopped)
    }

    /// The virtio-net device's traffic counters, if the VM has one.
    pub fn net_stats(&self) -> Option<NetStats> {
        let (_, dev) = self.net.as_ref()?;
        Some(dev.lock().unwrap_or_else(|e| e.into_inner()).stats())
    }

    /// The virtio-fs device's counters, if the VM has one.
    pub fn fs_stats(&self) -> Option<FsStats> {
        let (_, dev) = self.fs.as_ref()?;
        Some(dev.lock().unwrap_or_else(|e| e.into_inner()).stats())
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }

    /// The KVM flavour the VM runs on.
    pub fn flavour(&self) -> KvmFlavour {
        self.flavour
    }

    /// The kernel command line the guest booted with.
    pub fn cmdline(&self) -> &str {
        &self.shape.cmdline
    }

    /// vCPUs and memory.
    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    /// The last lines of the guest console.
    pub fn console(&self) -> &ConsoleTail {
        &self.console
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the vsock event queue stood right after a clone's transport reset;
/// see [`Vm::vsock_reset_taken`].
struct ResetWatch {
    /// The guest's available index of the event queue.
    avail_idx: Option<u16>,
    /// Whether the reset event was written at restore.
    delivered: bool,
}

impl ResetWatch {
    /// The event queue's available index (as the guest wrote it) and the
    /// device's next used index, if the device is active.
    fn event_queue(dev: &VirtioVsock, mem: &GuestMemoryMmap<()>) -> Option<(u16, u16)> {
        let q = dev.queues().get(crate::virtio::vsock::EVQ_INDEX)?;
        let avail = q.avail_idx(mem, Ordering::Acquire).ok()?;
        Some((avail.0, q.next_used()))
    }
}

/// Ends a VM from another thread; see [`Vm::stop_handle`].
#[derive(Clone)]
pub struct StopHandle(ExitNotifier);

impl StopHandle {
    /// Reports the VM as stopped by the host, waking [`Vm::wait`]; vCPUs
    /// leave the guest at their next exit, or when the owner calls
    /// [`Vm::stop`]. Returns false when the VM had already ended.
    pub fn stop(&self) -> bool {
        self.0.notify(VmExit::Stopped)
    }
}

/// Places virtio devices on the MMIO bus, one window and one GSI each.
struct VirtioDevices {
    mmio: Bus,
    subscribers: Vec<Subscriber>,
    next_slot: u32,
}

impl VirtioDevices {
    fn new() -> Self {
        Self {
            mmio: Bus::new(),
            subscribers: Vec::new(),
            next_slot: 0,
        }
    }

    /// The window and GSI of the next device.
    fn next_slot(&mut self) -> Result<(u64, u32), VmError> {
        let slot = layout::virtio_mmio_slot(self.next_slot).ok_or(VmError::TooManyDevices)?;
        self.next_slot += 1;
        Ok(slot)
    }

    /// Puts a new device in the next slot behind a fresh transport, tells
    /// the guest kernel where it is, and returns the transport.
    fn attach_new<D: VirtioDevice + MutEventSubscriber + Send + 'static>(
        &mut self,
        vm_fd: &VmFd,
        memory: &GuestMemoryMmap<()>,
        dev: Arc<Mutex<D>>,
        cmdline: &mut KernelCmdline,
    ) -> Result<Arc<Mutex<MmioTransport>>, VmError> {
        let (base, gsi) = self.next_slot()?;
        let irq = new_irq_line(vm_fd, gsi)?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            memory.clone(),
            dev.clone(),
            irq,
        )));
        self.place(transport.clone(), base, Some(dev))?;
        cmdline.push_virtio_mmio(base, gsi);
        Ok(transport)
    }

    /// Puts a restored device in the next slot (the order `build` gave
    /// them) behind its restored transport, and returns the transport.
    fn attach_restored<D: VirtioDevice + MutEventSubscriber + Send + 'static>(
        &mut self,
        vm_fd: &VmFd,
        memory: &GuestMemoryMmap<()>,
        dev: Arc<Mutex<D>>,
        saved: &MmioTransportState,
        what: &str,
    ) -> Result<Arc<Mutex<MmioTransport>>, VmError> {
        let (base, gsi) = self.next_slot()?;
        let irq = new_irq_line(vm_fd, gsi)?;
        let transport = MmioTransport::restore(memory.clone(), dev.clone(), irq, saved)
            .map_err(|e| VmError::Restore(format!("{what} transport: {e}")))?;
        let transport = Arc::new(Mutex::new(transport));
        self.place(transport.clone(), base, Some(dev))?;
        Ok(transport)
    }

    fn place(
        &mut self,
        transport: Arc<Mutex<MmioTransport>>,
        base: u64,
        subscriber: Option<Subscriber>,
    ) -> Result<(), VmError> {
        self.mmio
            .insert(transport, base, layout::VIRTIO_MMIO_SIZE)?;
        self.subscribers.extend(subscriber);
        Ok(())
    }
}

/// A KVM VM with its in-kernel irqchip and PIT, and `memory` registered.
fn create_kvm_vm(kvm: &Kvm, memory: &GuestMemoryMmap<()>) -> Result<VmFd, VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vm_fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm_fd
        .set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set TSS address"))?;
    vm_fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    for (slot, region) in memory.iter().enumerate() {
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the
        // Vm keeps until after the VM fd is closed; no other slot overlaps.
        unsafe { vm_fd.set_user_memory_region(mem_region) }
            .map_err(kvm_err("register guest memory"))?;
    }
    Ok(vm_fd)
}

/// The port I/O bus: COM1 and the i8042.
fn legacy_bus(serial: Arc<Mutex<SerialConsole>>, exit: &ExitNotifier) -> Result<Bus, VmError> {
    let mut pio = Bus::new();
    pio.insert(serial, layout::SERIAL_PORT, 8)?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        layout::I8042_PORT,
        5,
    )?;
    Ok(pio)
}

/// The MSRs a snapshot saves: all KVM lists.
fn msr_index_list(kvm: &Kvm) -> Result<Arc<Vec<u32>>, VmError> {
    let list = kvm.get_msr_index_list().map_err(|source| VmError::Kvm {
        what: "get MSR index list",
        source,
    })?;
    Ok(Arc::new(list.as_slice().to_vec()))
}

fn new_irq_line(vm_fd: &VmFd, gsi: u32) -> Result<IrqLine, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&evt, gsi)
        .map_err(|source| VmError::Kvm {
            what: "register irqfd",
            source,
        })?;
    Ok(IrqLine::new(gsi, evt))
}

/// The thread that serves every device's host-side I/O from one epoll set.
struct EventLoop {
    thread: JoinHandle<()>,
    /// Written by [`EventLoop::join`] so the loop notices the VM ended at once.
    wake: EventFd,
}

/// Wakes the event loop; reading it is all it needs.
struct Waker(EventFd);

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("registering the event loop's waker: {e:?}");
        }
    }
}

impl EventLoop {
    /// How often the loop checks whether the VM has ended, should a wake-up
    /// be missed.
    const TICK_MS: i32 = 1000;

    fn start(
        subscribers: Vec<Subscriber>,
        exit: ExitNotifier,
        confinement: Option<Confinement>,
    ) -> Result<Self, VmError> {
        let mut manager =
            EventManager::<Subscriber>::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
        for sub in subscribers {
            manager.add_subscriber(sub);
        }
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        let waker = wake.try_clone().map_err(VmError::EventFd)?;
        manager.add_subscriber(Arc::new(Mutex::new(Waker(waker))));
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                if let Err(message) = confine_thread(confinement.as_ref(), ThreadKind::Devices) {
                    exit.notify(VmExit::VcpuError { vcpu: 0, message });
                    return;
                }
                while !exit.has_exited() {
                    if let Err(e) = manager.run_with_timeout(Self::TICK_MS) {
                        log::error!("device event loop failed: {e:?}");
                        exit.notify(VmExit::VcpuError {
                            vcpu: 0,
                            message: format!("device event loop failed: {e:?}"),
                        });
                    }
                }
            })
            .map_err(|e| VmError::EventLoop(e.to_string()))?;
        Ok(Self { thread, wake })
    }

    /// Wakes the loop (the caller has reported the VM's exit) and joins it.
    fn join(self) {
        let _ = self.wake.write(1);
        let _ = self.thread.join();
    }
}
