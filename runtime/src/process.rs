//! A process of a pod: a container's init process or an exec, with its
//! state, exit, and the threads copying its stdio. The states are the
//! runtime's own; each front door names them in its protocol.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::stdio::StdinClose;

/// How long the exit of a process waits for its output copies to finish
/// (the guest already flushed them when it reported the exit; this bounds
/// a reader that stopped reading).
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Where a process's stdio goes: FIFOs or `file://`/`binary://` URIs, as
/// the front door was asked (empty: none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// As runc reports it: the exit code, or 128 + the signal that killed it.
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    /// From the agent's `Exited`: code, or -1 and the signal.
    pub fn from_guest(exit_code: i32, signal: i32) -> u32 {
        if signal > 0 {
            128 + signal as u32
        } else {
            exit_code.clamp(0, 255) as u32
        }
    }
}

/// Where a process is in its life. Paused is a frozen running process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessState {
    Created,
    Running,
    Paused,
    Stopped,
}

struct State {
    status: ProcessState,
    /// The pid front doors report: the VMM's host pid, never a guest pid
    /// (0 until the process has one).
    pid: u32,
}

/// One process of a container.
pub struct Process {
    pub container_id: String,
    /// Empty for a container's init process.
    pub exec_id: String,
    /// The process's id in the agent; empty for the sandbox (the VM itself).
    pub agent_id: String,
    pub stdio: StdioPaths,
    state: Mutex<State>,
    exit: watch::Sender<Option<Exit>>,
    pub stdin_close: StdinClose,
    outputs: Mutex<Vec<JoinHandle<()>>>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, agent_id: &str, stdio: StdioPaths) -> Process {
        Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            agent_id: agent_id.into(),
            stdio,
            state: Mutex::new(State {
                status: ProcessState::Created,
                pid: 0,
            }),
            exit: watch::channel(None).0,
            stdin_close: StdinClose::default(),
            outputs: Mutex::new(Vec::new()),
        }
    }

    fn locked(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The id of this process in events: the exec id, or the container id.
    pub fn event_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn state(&self) -> ProcessState {
        self.locked().status
    }

    pub fn pid(&self) -> u32 {
        self.locked().pid
    }

    pub fn set_pid(&self, pid: u32) {
        self.locked().pid = pid;
    }

    pub fn set_running(&self, pid: u32) {
        let mut s = self.locked();
        if s.status != ProcessState::Stopped {
            s.status = ProcessState::Running;
            s.pid = pid;
        }
    }

    pub fn set_paused(&self, paused: bool) {
        let mut s = self.locked();
        match (s.status, paused) {
            (ProcessState::Running, true) => s.status = ProcessState::Paused,
            (ProcessState::Paused, false) => s.status = ProcessState::Running,
            _ => {}
        }
    }

    pub fn add_output(&self, handle: JoinHandle<()>) {
        self.outputs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    /// Waits (a bounded time) for the output copies to reach EOF.
    pub async fn drain_outputs(&self) {
        let handles: Vec<_> =
            std::mem::take(&mut *self.outputs.lock().unwrap_or_else(PoisonError::into_inner));
        if handles.is_empty() {
            return;
        }
        let joined = tokio::task::spawn_blocking(move || {
            for h in handles {
                let _ = h.join();
            }
        });
        if tokio::time::timeout(OUTPUT_DRAIN, joined).await.is_err() {
            log::warn!(
                "{}/{}: output still open {OUTPUT_DRAIN:?} after exit",
                self.container_id,
                self.exec_id
            );
        }
    }

    /// Records the exit; returns false if it was already recorded (so
    /// exactly one exit event is sent).
    pub fn set_exited(&self, status: u32) -> bool {
        {
            let mut s = self.locked();
            if s.status == ProcessState::Stopped {
                return false;
            }
            s.status = ProcessState::Stopped;
        }
        self.stdin_close.request();
        self.exit.send_replace(Some(Exit {
            status,
            at: SystemTime::now(),
        }));
        true
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The sender lives in self, so this cannot happen while we
                // hold &self; report a kill rather than hang.
                return Exit {
                    status: 137,
                    at: SystemTime::now(),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_as_runc_reports_it() {
        assert_eq!(Exit::from_guest(3, 0), 3);
        assert_eq!(Exit::from_guest(-1, 9), 137);
        assert_eq!(Exit::from_guest(-1, 15), 143);
        assert_eq!(Exit::from_guest(300, 0), 255);
    }

    #[tokio::test]
    async fn exit_is_recorded_once_and_wakes_waiters() {
        let p = std::sync::Arc::new(Process::new("c", "", "c", StdioPaths::default()));
        assert_eq!(p.state(), ProcessState::Created);
        p.set_running(42);
        assert_eq!((p.state(), p.pid()), (ProcessState::Running, 42));
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await.status })
        };
        assert!(p.set_exited(7));
        assert!(!p.set_exited(9), "second exit ignored");
        assert_eq!(waiter.await.unwrap(), 7);
        assert_eq!(p.exit().unwrap().status, 7);
        p.set_running(1);
        assert_eq!(
            p.state(),
            ProcessState::Stopped,
            "a stopped process stays stopped"
        );
    }

    #[test]
    fn pause_only_from_running() {
        let p = Process::new("c", "", "c", StdioPaths::default());
        p.set_paused(true);
        assert_eq!(p.state(), ProcessState::Created);
        p.set_running(5);
        p.set_paused(true);
        assert_eq!(p.state(), ProcessState::Paused);
        p.set_paused(false);
        assert_eq!(p.state(), ProcessState::Running);
    }
}
