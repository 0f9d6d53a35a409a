//! Snapshot state of the virtio-fs device.
//!
//! It exists so a template VM's virtio-fs device comes back in a clone with
//! another host directory behind it: the state holds only the tag and the
//! negotiated features; the shared directory (and whether it is read-only)
//! is attached per clone at restore. Queues belong to the transport's state
//! (`virtio/persist.rs`), which re-activates the device.
//!
//! Open FUSE inodes and file handles cannot be carried over: the restored
//! passthrough file system knows only the root. The design mounts the
//! share in the guest only after the clone starts, so a template never has
//! a FUSE session; saving a device whose guest has one is refused rather
//! than producing clones whose mount fails in odd ways.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{FsError, VirtioFs};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// The saved state of a [`VirtioFs`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioFsState {
    /// The tag the guest mounts the device by.
    pub tag: String,
    /// The features the driver accepted.
    pub acked_features: u64,
}

impl VirtioFs {
    /// Saves the device's state; refused ([`FsError::SessionOpen`]) while
    /// the guest has a FUSE session on it.
    pub fn save(&self) -> Result<VirtioFsState, FsError> {
        if self.has_fuse_session() {
            return Err(FsError::SessionOpen {
                tag: self.tag().to_owned(),
            });
        }
        Ok(VirtioFsState {
            tag: self.tag().to_owned(),
            acked_features: self.acked_features(),
        })
    }

    /// Rebuilds the device from `state`, sharing `shared_dir` (read-only if
    /// `read_only`). The device is not active; the transport's restore
    /// activates it.
    pub fn restore(
        state: &VirtioFsState,
        shared_dir: &Path,
        read_only: bool,
    ) -> Result<Self, FsError> {
        let mut dev = Self::new(&state.tag, shared_dir, read_only)?;
        let offered = dev.avail_features() | (1u64 << VIRTIO_F_VERSION_1);
        if state.acked_features & !offered != 0 {
            return Err(FsError::UnofferedFeatures {
                acked: state.acked_features,
                offered,
            });
        }
        dev.set_acked_features(state.acked_features);
        Ok(dev)
    }
}
