//! Arrow's pod runtime: what runs a pod as a microVM, free of any front
//! door's protocol. The containerd shim (`shim/`) translates its ttrpc Task
//! API into these types; nothing here knows containerd, ttrpc or tonic.
//!
//! - [`pod`]: the pod and its lifecycle ([`pod::PodRuntime`]: create,
//!   start, exec, kill, wait, delete, state, stats), with its own
//!   [`process`] states, [`error`] kinds that front doors map to their
//!   status codes, and [`events`] sent as values to the front door;
//! - [`vm`]: the pod's VM (an `arrow-vmm serve` process, its control
//!   channel and the agent connection), its state directory;
//! - [`exits`]: how the runtime learns that the VMM exited, which the
//!   front door provides (a shim's reaper, or plain waiting);
//! - [`share`]: the pod's virtio-fs share (container roots and binds);
//! - [`network`]: joining the pod's CNI network to the guest's NIC;
//! - [`cgroup`]: the pod's cgroup on the host, where the VMM runs;
//! - [`spec`]: reading OCI specs into agent requests; [`seccomp`] their
//!   seccomp profiles;
//! - [`stdio`]: container stdio between FIFOs or files and guest streams;
//! - [`oom`]: the guest's OOM kills, as events for the front door;
//! - [`port_forward`]: port-forward into the guest from the pod's network
//!   namespace; [`command`] runs the host tool it needs.

pub mod cgroup;
pub mod command;
pub mod error;
pub mod events;
pub mod exits;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod network;
pub mod oom;
pub mod pod;
pub mod port_forward;
pub mod process;
pub mod seccomp;
pub mod share;
pub mod spec;
pub mod stdio;
mod syscalls_x86_64;
pub mod vm;
