//! `arrow-cri`: Arrow's standalone CRI server for nodes without containerd.
//!
//! Part 1 (this crate today): the CRI ImageService — pulling from OCI
//! registries ([`pull`]), the content-addressed store with each layer
//! unpacked once ([`store`], [`unpack`]), and the overlayfs roots that
//! part 2's RuntimeService will hand to `containerd-shim-arrow-v1`
//! ([`store::Store::create_rootfs`]). RuntimeService is served but answers
//! `Unimplemented` until part 2 ([`runtime_service`]).

pub mod auth;
pub mod config;
pub mod error;
pub mod hosts;
pub mod image_service;
pub mod pull;
pub mod reference;
pub mod runtime_service;
pub mod server;
pub mod store;
pub mod unpack;
