//! `arrow-cri`: Arrow's standalone CRI server for nodes without containerd.
//!
//! The CRI ImageService — pulling from OCI registries ([`pull`]), the
//! content-addressed store with each layer unpacked once ([`store`],
//! [`unpack`]) — and the RuntimeService: pods as Arrow microVMs, each run by
//! its own `containerd-shim-arrow-v1` over the shim v2 Task API
//! ([`runtime`]), with CRI translated in one place ([`runtime_service`]).

pub mod auth;
pub mod config;
pub mod error;
pub mod hosts;
pub mod image_service;
pub mod pull;
pub mod reference;
pub mod runtime;
pub mod runtime_service;
pub mod server;
pub mod store;
pub mod streaming;
pub mod unpack;
