//! vCPUs: set-up for the 64-bit boot, and the run loop each vCPU thread
//! spins in, dispatching I/O and MMIO exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::confinement::{confine_thread, Confinement, ThreadKind};
use crate::devices::bus::Bus;
use crate::exit::{ExitNotifier, VmExit};
use crate::snapshot::vcpu_state::{VcpuState, VcpuStateError};

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl on the vCPU failed.
    #[error("vCPU {index}: {what}: {source}")]
    Kvm {
        index: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("vCPU {index}: KVM set only {set} of {wanted} boot MSRs")]
    Msrs {
        index: u8,
        set: usize,
        wanted: usize,
    },
    /// Building the MSR list failed.
    #[error("vCPU {index}: building the MSR list: {source:?}")]
    MsrList {
        index: u8,
        source: vmm_sys_util::fam::Error,
    },
    /// The vCPU thread could not be started.
    #[error("spawning the thread of vCPU {index}: {source}")]
    Spawn {
        index: u8,
        #[source]
        source: std::io::Error,
    },
    /// Restoring saved state into the vCPU failed.
    #[error("vCPU {index}: {source}")]
    Restore {
        index: u8,
        #[source]
        source: VcpuStateError,
    },
    /// The kick signal handler could not be installed.
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// One vCPU, configured and ready to run on its own thread.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    cpuid: CpuId,
    /// The MSRs a snapshot saves (KVM's index list).
    msr_index_list: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and gives it CPUID, MSRs and LAPIC
    /// set-up; the boot vCPU (index 0) also gets registers for `entry`.
    pub fn new(
        vm: &VmFd,
        index: u8,
        count: u8,
        base_cpuid: &CpuId,
        entry: u64,
        msr_index_list: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let kvm_err = |what| {
            move |source| VcpuError::Kvm {
                index,
                what,
                source,
            }
        };
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create"))?;

        let mut cpuid = base_cpuid.clone();
        cpuid::set_topology(cpuid.as_mut_slice(), index, count);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;

        let msrs = msr::boot_msrs().map_err(|source| VcpuError::MsrList { index, source })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                wanted: msrs.as_slice().len(),
            });
        }

        let mut lapic = fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
        interrupts::configure_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;

        // Secondary vCPUs wait for INIT/SIPI from the boot vCPU.
        if index == 0 {
            fd.set_regs(&regs::boot_regs(entry))
                .map_err(kvm_err("set registers"))?;
            fd.set_fpu(&regs::boot_fpu()).map_err(kvm_err("set FPU"))?;
            let mut sregs = fd.get_sregs().map_err(kvm_err("get sregs"))?;
            regs::configure_sregs(&mut sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
        }
        Ok(Self {
            index,
            fd,
            cpuid,
            msr_index_list,
        })
    }

    /// Creates vCPU `index` with the state saved in a snapshot.
    pub fn restore(
        vm: &VmFd,
        index: u8,
        state: &VcpuState,
        msr_index_list: Arc<Vec<u32>>,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|source| VcpuError::Kvm {
                index,
                what: "create",
                source,
            })?;
        state
            .restore(&fd)
            .map_err(|source| VcpuError::Restore { index, source })?;
        let cpuid = CpuId::from_entries(&state.cpuid)
            .map_err(|source| VcpuError::MsrList { index, source })?;
        Ok(Self {
            index,
            fd,
            cpuid,
            msr_index_list,
        })
    }

    /// Starts the vCPU on its own thread, confined by `confinement` before
    /// its first `KVM_RUN`. The thread ends when the VM exits for any
    /// reason, reported to `exit`.
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: ExitNotifier,
        control: Arc<VcpuControl>,
        confinement: Option<Confinement>,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                if let Err(message) = confine_thread(confinement.as_ref(), ThreadKind::Vcpu) {
                    exit.notify(VmExit::VcpuError {
                        vcpu: index,
                        message,
                    });
                    return;
                }
                self.run_loop(&pio, &mmio, &exit, &control)
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle { thread })
    }

    /// Stops at a clean point: completes any I/O KVM still has pending (one
    /// `KVM_RUN` with immediate exit), saves the state for the snapshot, and
    /// waits until resumed or the VM ends.
    fn park(&mut self, control: &VcpuControl, exit: &ExitNotifier) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
        let saved = VcpuState::save(&self.fd, &self.cpuid, &self.msr_index_list)
            .map_err(|e| format!("vCPU {}: {e}", self.index));
        let mut st = control.lock();
        st.saved.push((self.index, saved));
        st.parked += 1;
        control.cvar.notify_all();
        let generation = st.generation;
        while st.generation == generation && !exit.has_exited() {
            st = control
                .cvar
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.parked -= 1;
    }

    fn run_loop(mut self, pio: &Bus, mmio: &Bus, exit: &ExitNotifier, control: &VcpuControl) {
        while !exit.has_exited() {
            if control.pause.load(Ordering::Acquire) {
                self.park(control, exit);
                continue;
            }
            if let Some(mut reason) = self.run_once(pio, mmio) {
                if let VmExit::VcpuError { message, .. } = &mut reason {
                    if let Ok(regs) = self.fd.get_regs() {
                        message.push_str(&format!(" (rip {:#x})", regs.rip));
                    }
                }
                exit.notify(reason);
            }
        }
    }

    /// Runs the guest until one exit is handled; returns why the VM must
    /// end, if it must.
    fn run_once(&mut self, pio: &Bus, mmio: &Bus) -> Option<VmExit> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    // Nothing there: an ISA bus floats high.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
                None
            }
            // With the in-kernel irqchip KVM handles HLT itself; a HLT that
            // reaches us means the guest stopped for good.
            Ok(VcpuExit::Hlt) => Some(VmExit::PowerOff),
            Ok(VcpuExit::Shutdown) => Some(VmExit::Reset),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(VmExit::Reset),
                KVM_SYSTEM_EVENT_CRASH => Some(VmExit::VcpuError {
                    vcpu: index,
                    message: "guest crashed (KVM_SYSTEM_EVENT_CRASH)".into(),
                }),
                other => Some(VmExit::VcpuError {
                    vcpu: index,
                    message: format!("unknown KVM system event {other}"),
                }),
            },
            Ok(VcpuExit::InternalError) => Some(VmExit::VcpuError {
                vcpu: index,
                message: "KVM internal error".into(),
            }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::VcpuError {
                vcpu: index,
                message: format!("KVM entry failed: reason {reason:#x} on host CPU {cpu}"),
            }),
            Ok(other) => Some(VmExit::VcpuError {
                vcpu: index,
                message: format!("unexpected exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: the loop re-checks whether the VM is ending.
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VmExit::VcpuError {
                vcpu: index,
                message: format!("KVM_RUN failed: {e}"),
            }),
        }
    }
}

/// Pausing and resuming the vCPUs of one VM, and the states they saved when
/// they parked.
#[derive(Default)]
pub struct VcpuControl {
    /// Checked by every vCPU loop iteration, so it is an atomic.
    pause: AtomicBool,
    state: Mutex<ControlState>,
    cvar: Condvar,
}

#[derive(Default)]
struct ControlState {
    parked: usize,
    /// Bumped by each resume, so a parked vCPU knows it may go on.
    generation: u64,
    saved: Vec<(u8, Result<VcpuState, String>)>,
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks every vCPU to park, kicks them out of `KVM_RUN`, and waits until
    /// all `handles` are parked (or their threads ended). Returns each vCPU's
    /// saved state, ordered by index.
    pub fn pause(
        &self,
        handles: &[VcpuHandle],
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, String> {
        self.lock().saved.clear();
        self.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.lock();
            let running = handles.iter().filter(|h| !h.thread.is_finished()).count();
            if st.parked >= running {
                break;
            }
            drop(st);
            if Instant::now() > deadline {
                self.resume();
                return Err(format!("vCPUs did not pause within {timeout:?}"));
            }
            for h in handles {
                let _ = h.thread.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut saved = std::mem::take(&mut self.lock().saved);
        saved.sort_by_key(|(index, _)| *index);
        if saved.len() != handles.len() {
            return Err("a vCPU thread ended before it could be paused".into());
        }
        saved.into_iter().map(|(_, state)| state).collect()
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let mut st = self.lock();
        st.generation += 1;
        self.cvar.notify_all();
    }
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Kicks the vCPU out of `KVM_RUN` until its thread ends (the caller has
    /// already reported an exit, so the loop stops). Gives up after
    /// `timeout`, returning false.
    pub fn stop(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() {
            if Instant::now() > deadline {
                return false;
            }
            // Fails only if the thread is already gone.
            let _ = self.thread.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            std::thread::sleep(Duration::from_millis(1));
        }
        // The loop never panics on guest input; a panic here is a bug that
        // has already been reported on stderr.
        let _ = self.thread.join();
        true
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| VcpuError::Signal(vmm_sys_util::errno::Error::new(errno)))
}
