//! `arrow`, the operator's command: install Arrow on a node (binaries, guest
//! kernel, runtime `arrow` in containerd's or k3s's config) and take it off
//! again, check whether a host can run it, print its RuntimeClass, serve
//! the node's pod metrics to Prometheus (`arrow monitor`).
//!
//! Everything is here as a library so it is tested without root; `main.rs`
//! only reads arguments and prints.

pub mod check;
pub mod containerd_config;
pub mod error;
pub mod install;
pub mod k3s_template;
pub mod monitor;
pub mod runtimeclass;

pub use error::{Error, Result};
