//! What the fuzz targets in `fuzz/` need beyond the public API (feature
//! `fuzzing`): the device work normally run by the event loop, receive
//! coalescing and the fake guest driver of the unit tests.
//!
//! It exists so targets drive the very code a guest reaches, synchronously
//! and without an event manager, while those internals stay private to
//! product builds.

pub use crate::virtio::net::coalesce::Merge;
pub use crate::virtio::test_utils::{new_mem, GuestQueue, MEM_SIZE, QSIZE};

use crate::virtio::fs::VirtioFs;
use crate::virtio::net::VirtioNet;
use crate::virtio::vsock::VirtioVsock;

/// Serves every FUSE request waiting on queue `index` of an active device;
/// returns how many chains were used.
pub fn fs_process_queue(dev: &mut VirtioFs, index: usize) -> usize {
    dev.process_queue(index)
}

/// Runs an active vsock device's tx, then rx, until neither can progress.
pub fn vsock_process_queues(dev: &mut VirtioVsock) {
    dev.process_queues();
}

/// Sends an active NIC's waiting guest frames to its tap; returns whether
/// any chain was used.
pub fn net_process_tx(dev: &mut VirtioNet) -> bool {
    dev.process_tx()
}

/// Moves frames waiting in an active NIC's tap into the guest's buffers;
/// returns whether any chain was used.
pub fn net_process_rx(dev: &mut VirtioNet) -> bool {
    dev.process_rx()
}
