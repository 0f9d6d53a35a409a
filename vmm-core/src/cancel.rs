//! Ending a VM's start early: a signal or the shim's lifeline closing asks
//! for it on one thread, the thread starting or running the VM notices it
//! (a wait for the template lock, a boot, the wait for the guest agent).

use std::sync::Mutex;

use crate::vm::{StopHandle, Vm};

/// The command was asked to end (a signal, stdin closed) before the guest
/// was ready.
#[derive(Debug, thiserror::Error)]
#[error("interrupted ({0})")]
pub struct Interrupted(pub String);

/// A request to end early, shared between the threads that notice one (a
/// signal, stdin closing) and the one starting and running the VM. It
/// stops the VM it watches, so waits on the VM end at once.
#[derive(Default)]
pub struct Cancel {
    /// One lock for both, so a request and a new VM to watch never miss
    /// each other.
    state: Mutex<CancelState>,
}

#[derive(Default)]
struct CancelState {
    reason: Option<String>,
    vm: Option<StopHandle>,
}

impl Cancel {
    /// Asks to end, for `reason`; the first reason is kept.
    pub fn request(&self, reason: String) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.reason.get_or_insert(reason);
        if let Some(vm) = &state.vm {
            vm.stop();
        }
    }

    /// Why an end was asked for, if it was.
    pub fn reason(&self) -> Option<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.reason.clone()
    }

    /// `Err(Interrupted)` once an end was asked for.
    pub fn check(&self) -> Result<(), Interrupted> {
        self.reason().map_or(Ok(()), |r| Err(Interrupted(r)))
    }

    /// Stops `vm` on a request (at once if one came already).
    pub fn watch(&self, vm: &Vm) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let handle = vm.stop_handle();
        if state.reason.is_some() {
            handle.stop();
        }
        state.vm = Some(handle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_keeps_the_first_reason() {
        let cancel = Cancel::default();
        assert!(cancel.check().is_ok());
        cancel.request("SIGTERM".into());
        cancel.request("stdin closed".into());
        assert_eq!(cancel.reason().as_deref(), Some("SIGTERM"));
        let err = cancel.check().unwrap_err();
        assert_eq!(err.to_string(), "interrupted (SIGTERM)");
    }
}
