//! `containerd-shim-arrow-v1`: the containerd shim v2 that runs each pod as
//! an Arrow microVM. One shim serves one pod: the sandbox container starts
//! the VM (`arrow-vmm serve`, a clone of a booted template), app containers
//! are created in it through the agent (`proto`), their files shared over
//! virtio-fs. The pod runtime itself is `arrow-runtime`; this crate is its
//! containerd front door: the ttrpc Task service, containerd's events,
//! process states and metrics, and the reaper's child exits.

pub mod reaper;
pub mod service;
pub mod stats;
pub mod task;
