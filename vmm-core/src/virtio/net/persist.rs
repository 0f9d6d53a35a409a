//! Snapshot state of the virtio-net device.
//!
//! It exists so a template VM's NIC comes back in a clone with the clone's
//! own tap behind it: the state holds what the guest saw (MAC, MTU) and the
//! negotiated features; the tap is attached per clone at restore and told
//! the offloads the guest negotiated. Queues belong to the transport's
//! state (`virtio/persist.rs`), which re-activates the device with the
//! saved ring positions, so rx buffers the guest posted before the snapshot
//! take the clone's first frames. Frames in flight are not saved.

use serde::{Deserialize, Serialize};

use super::{NetError, Tap, VirtioNet};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// The saved state of a [`VirtioNet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioNetState {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The MTU the guest was told.
    pub mtu: u16,
    /// The features the driver accepted.
    pub acked_features: u64,
}

impl VirtioNet {
    /// Saves the device's state.
    pub fn save(&self) -> VirtioNetState {
        VirtioNetState {
            mac: self.mac(),
            mtu: self.mtu(),
            acked_features: self.acked_features(),
        }
    }

    /// Rebuilds the device from `state` over the clone's `tap`, which is
    /// set up for the offloads the guest negotiated. The device is not
    /// active; the transport's restore activates it.
    pub fn restore(state: &VirtioNetState, tap: Tap) -> Result<Self, NetError> {
        let mut dev = Self::new(tap, state.mac, state.mtu)?;
        let offered = dev.avail_features() | (1u64 << VIRTIO_F_VERSION_1);
        if state.acked_features & !offered != 0 {
            return Err(NetError::UnofferedFeatures {
                acked: state.acked_features,
                offered,
            });
        }
        dev.set_acked_features(state.acked_features);
        dev.apply_offloads()?;
        Ok(dev)
    }
}
