//! The hook through which the VMM binary confines each thread a VM starts.
//!
//! The library starts the vCPU threads and the device event loop itself, so
//! only it can run code on them before they touch anything the guest wrote.
//! What the confinement is (a seccomp filter per thread kind, in
//! `arrow-vmm`) is the binary's policy; the library only calls it, first
//! thing on each thread, and ends the VM if it fails: a thread that could not
//! be confined never runs the guest.

use std::sync::Arc;

/// The kinds of thread a [`Vm`](crate::vm::Vm) runs, each with its own needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// Runs one vCPU: `KVM_RUN`, and the legacy and virtio-mmio register
    /// accesses the guest's exits hand to the device buses.
    Vcpu,
    /// The event loop serving every device's host side: virtqueues, the
    /// vsock sockets, the tap, the virtio-fs passthrough.
    Devices,
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
        })
    }
}

/// Confines the calling thread for the work of `kind`. Called on the new
/// thread before it runs anything else; an error ends the VM.
pub trait ThreadConfinement: Send + Sync {
    fn confine(&self, kind: ThreadKind) -> Result<(), String>;
}

/// A shared confinement, as configs carry it.
pub type Confinement = Arc<dyn ThreadConfinement>;

/// Runs `confinement` (if any) for `kind` on this thread.
pub(crate) fn confine_thread(
    confinement: Option<&Confinement>,
    kind: ThreadKind,
) -> Result<(), String> {
    match confinement {
        Some(c) => c
            .confine(kind)
            .map_err(|e| format!("confining the {kind} thread: {e}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Record(Mutex<Vec<ThreadKind>>);

    impl ThreadConfinement for Record {
        fn confine(&self, kind: ThreadKind) -> Result<(), String> {
            self.0.lock().unwrap().push(kind);
            if kind == ThreadKind::Devices {
                Err("no filter".into())
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn errors_name_the_thread_kind() {
        let record: Confinement = Arc::new(Record(Mutex::new(Vec::new())));
        assert!(confine_thread(None, ThreadKind::Vcpu).is_ok());
        assert!(confine_thread(Some(&record), ThreadKind::Vcpu).is_ok());
        let err = confine_thread(Some(&record), ThreadKind::Devices).unwrap_err();
        assert_eq!(err, "confining the devices thread: no filter");
    }
}
