//! `containerd-shim-arrow-v1`: the containerd shim v2 that runs each pod as
//! an Arrow microVM. One shim serves one pod: the sandbox container starts
//! the VM (`arrow-vmm serve`, a clone of a booted template), app containers
//! are created in it through the agent (`proto`), their files shared over
//! virtio-fs.

pub mod cgroup;
pub mod command;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod network;
pub mod oom;
pub mod port_forward;
pub mod process;
pub mod seccomp;
pub mod service;
pub mod share;
pub mod spec;
pub mod stats;
pub mod stdio;
mod syscalls_x86_64;
pub mod task;
pub mod vm;
