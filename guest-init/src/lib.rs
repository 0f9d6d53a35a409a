//! arrow-init: PID 1 of an Arrow guest. It mounts what a container expects,
//! reaps every zombie and serves the agent protocol (`proto`) over vsock, so
//! the host can create, start, signal and wait for the pod's processes.
//!
//! Everything lives in this library so host tests can run the real agent on
//! Unix sockets (`init::run_unix`); the binary only picks the mode.

pub mod log;

pub mod agent;
pub mod capabilities;
pub mod clone;
pub mod cmdline;
pub mod conn;
pub mod container;
pub mod error;
pub mod forward;
pub mod init;
pub mod mounts;
pub mod network;
pub mod process;
pub mod reaper;
pub mod seccomp;
pub mod stdio;
pub mod supervisor;
pub mod vsock;
