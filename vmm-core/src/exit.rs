//! How a VM ends, and the one place every thread reports it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset, triple fault, or a KVM
    /// reset event). Arrow guests boot with `reboot=k panic=-1`, so both a
    /// clean power-off by `arrow-init` and a kernel panic end here; which of
    /// the two it was is told by the console and the agent.
    Reset,
    /// The guest asked KVM for a power-off.
    PowerOff,
    /// The host stopped the VM.
    Stopped,
    /// A vCPU failed; the VM cannot go on.
    VcpuError { vcpu: u8, message: String },
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset the machine"),
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Stopped => write!(f, "stopped by the host"),
            VmExit::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
        }
    }
}

/// Records the first exit reported by any thread and wakes those waiting for
/// it. Later reports are ignored: the first cause is the one that matters.
#[derive(Clone, Default)]
pub struct ExitNotifier {
    inner: Arc<(Mutex<Option<VmExit>>, Condvar)>,
    /// Mirrors "an exit was reported" for the vCPU loops' lock-free check.
    exited: Arc<AtomicBool>,
}

impl ExitNotifier {
    /// Creates a notifier with no exit yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports an exit; returns false when one was already reported.
    pub fn notify(&self, exit: VmExit) -> bool {
        let (lock, cvar) = &*self.inner;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return false;
        }
        *slot = Some(exit);
        self.exited.store(true, Ordering::Release);
        cvar.notify_all();
        true
    }

    /// Whether an exit was reported; cheap enough for every vCPU exit.
    pub fn has_exited(&self) -> bool {
        self.exited.load(Ordering::Acquire)
    }

    /// The exit, if one was reported.
    pub fn exit(&self) -> Option<VmExit> {
        let (lock, _) = &*self.inner;
        lock.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for an exit, at most `timeout` (forever with `None`).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let (lock, cvar) = &*self.inner;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(exit) = slot.as_ref() {
                return Some(exit.clone());
            }
            slot = match deadline {
                None => cvar.wait(slot).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    cvar.wait_timeout(slot, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

impl vm_superio::Trigger for ExitNotifier {
    type E = std::convert::Infallible;

    /// The i8042 "pulse reset line" command.
    fn trigger(&self) -> Result<(), Self::E> {
        self.notify(VmExit::Reset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins_and_wakes_waiters() {
        let n = ExitNotifier::new();
        let waiter = {
            let n = n.clone();
            std::thread::spawn(move || n.wait(None))
        };
        assert!(n.notify(VmExit::Reset));
        assert!(!n.notify(VmExit::Stopped));
        assert!(n.has_exited());
        assert_eq!(waiter.join().unwrap(), Some(VmExit::Reset));
        assert_eq!(n.exit(), Some(VmExit::Reset));
    }

    #[test]
    fn wait_times_out_without_exit() {
        let n = ExitNotifier::new();
        assert_eq!(n.wait(Some(Duration::from_millis(10))), None);
    }
}
