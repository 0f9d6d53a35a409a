//! What happens to a pod's containers and processes, as values: the
//! runtime sends them, in order, on a channel its front door drains into
//! its own protocol (the shim into containerd's task events).

use tokio::sync::mpsc;

use crate::process::{Exit, StdioPaths};
use crate::share::RootfsMount;

/// One event of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEvent {
    /// A container was created; its init process waits to be started.
    Created {
        container_id: String,
        bundle: String,
        rootfs: Vec<RootfsMount>,
        stdio: StdioPaths,
        pid: u32,
    },
    /// A container's init process started.
    Started {
        container_id: String,
        pid: u32,
    },
    /// An exec process was added to a container.
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    /// A process ended (sent once per process). `id` is the exec id, or
    /// the container id for its init process.
    Exited {
        container_id: String,
        id: String,
        pid: u32,
        exit: Exit,
    },
    /// A container was deleted; `exit` is its init process's.
    Deleted {
        container_id: String,
        pid: u32,
        exit: Option<Exit>,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
    /// The guest's OOM killer killed a process of this app container.
    OutOfMemory {
        container_id: String,
    },
}

/// Where the runtime sends its events. The channel is unbounded so that
/// no runtime call ever waits for a slow consumer; a front door that is
/// gone (receiver dropped) loses them.
pub type EventSender = mpsc::UnboundedSender<PodEvent>;

/// Sends `event`; a closed channel is logged, never an error of the call
/// that caused the event.
pub(crate) fn send(events: &EventSender, event: PodEvent) {
    if let Err(e) = events.send(event) {
        log::warn!("pod event dropped, nobody receives events: {:?}", e.0);
    }
}
