//! Arrow's host <-> guest agent protocol: the generated message types, the
//! frame format, the hybrid-vsock connect handshake and a host-side client.
//!
//! `agent.proto` is the contract; this crate is its one implementation of the
//! wire format, shared by the shim (host) and arrow-init (guest). Beside
//! it, with feature `vm-record`, the pod VM record the shim writes for
//! `arrow monitor`, the device counters the VMM publishes for it and the
//! VMM's ready line and the shim's control channel to its VMM.

pub mod client;
pub mod frame;
pub mod hybrid;
pub mod mac;
#[cfg(feature = "vm-record")]
pub mod vm_counters;
#[cfg(feature = "vm-record")]
pub mod vm_record;
#[cfg(feature = "vm-record")]
pub mod vmm_control;
#[cfg(feature = "vm-record")]
pub mod vmm_ready;

/// Types generated from `agent.proto` (package `arrow.agent.v1`).
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/arrow.agent.v1.rs"));
}

pub use frame::{read_frame, write_frame, FrameError, MAX_FRAME_LEN};

/// The guest's vsock context id.
pub const GUEST_CID: u32 = 3;
/// Vsock port of the agent RPC service.
pub const AGENT_PORT: u32 = 1024;
/// Vsock port of the stdio stream service.
pub const STDIO_PORT: u32 = 1025;
/// Vsock port of the port-forward stream service.
pub const FORWARD_PORT: u32 = 1026;

/// Fewest bytes of entropy `InitClone` accepts (256 bits).
pub const CLONE_ENTROPY_MIN: usize = 32;
/// Most bytes of entropy `InitClone` accepts.
pub const CLONE_ENTROPY_MAX: usize = 4096;
/// Longest hostname `InitClone` accepts (Linux `HOST_NAME_MAX`), in bytes.
pub const HOSTNAME_MAX: usize = 64;
