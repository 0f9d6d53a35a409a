//! virtio-mmio transport and virtio devices.
//!
//! Every device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] serves
//! the virtio-mmio register window for any of them and never knows which
//! device it talks to. The split of work between threads:
//!
//! - vCPU threads reach the transport through the MMIO bus. The transport
//!   negotiates features, collects the queue configuration and, on
//!   `DRIVER_OK`, hands validated queues to the device (`activate`). A
//!   `QueueNotify` write only signals the device's per-queue [`EventFd`]; no
//!   queue is processed on a vCPU thread.
//! - The device is an event-manager subscriber: its queue eventfds (and any
//!   backend file descriptors) wake the event-loop thread, which processes the
//!   queues and raises the interrupt through the shared [`Interrupt`].

pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_utils;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::irq::IrqLine;

/// Guest memory as devices see it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Feature bit: the device complies with virtio 1.0+ (no legacy interface).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: used/avail event index suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for the device.
    pub const DRIVER: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_FAILED;
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport passed a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// The device was already active.
    #[error("device already activated")]
    AlreadyActive,
    /// A host resource the device needs could not be set up.
    #[error("device activation: {0}")]
    Io(#[from] io::Error),
}

impl ActivateError {
    /// The checks every device makes before it takes the queues: not
    /// active yet, and exactly as many queues as it has.
    pub fn check(already_active: bool, expected: usize, got: usize) -> Result<(), Self> {
        if already_active {
            return Err(Self::AlreadyActive);
        }
        if got != expected {
            return Err(Self::QueueCount { expected, got });
        }
        Ok(())
    }
}

/// The interrupt state shared by a transport and its device.
///
/// The device sets status bits and raises the line; the guest reads
/// `InterruptStatus` and clears bits with `InterruptACK` through the
/// transport.
pub struct Interrupt {
    status: AtomicU32,
    irq: IrqLine,
}

impl Interrupt {
    /// A used buffer was added to a queue.
    pub const USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
    /// The configuration space changed (or the device needs a reset).
    pub const CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

    /// Wraps the device's interrupt line.
    pub fn new(irq: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// Sets `bits` in the interrupt status and raises the line.
    pub fn signal(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq.trigger()
    }

    /// Signals that used buffers are available.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(Self::USED_RING)
    }

    /// Signals a configuration change.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(Self::CONFIG)
    }

    /// The current interrupt status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every status bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The line behind this interrupt.
    pub fn irq_line(&self) -> &IrqLine {
        &self.irq
    }
}

/// A virtio device, independent of its transport.
///
/// Queue notifications reach the device through the eventfds returned by
/// [`VirtioDevice::queue_events`]: the transport writes `queue_events()[i]`
/// when the guest writes `i` to `QueueNotify`, and the device (registered
/// with the event manager) processes queue `i` on the event-loop thread.
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// One eventfd per queue, written by the transport on `QueueNotify`.
    fn queue_events(&self) -> &[Arc<EventFd>];

    /// The device-specific feature bits offered to the driver. The transport
    /// adds `VIRTIO_F_VERSION_1` itself.
    fn avail_features(&self) -> u64;

    /// The features the driver accepted (valid once `FEATURES_OK` is set).
    fn acked_features(&self) -> u64;

    /// Records the features the driver accepted.
    fn set_acked_features(&mut self, features: u64);

    /// Reads device configuration space at `offset`; out-of-range bytes read
    /// as zero. Must not panic on any offset or length.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space; out-of-range or read-only writes
    /// are logged and ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the driver's queues, already validated against
    /// `mem` by the transport.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// Whether `activate` succeeded and no reset happened since.
    fn is_activated(&self) -> bool;

    /// The live queues while the device is active, empty otherwise. The
    /// transport's own copies stop advancing at activation, so snapshots
    /// read the rings' positions (`next_avail`, `next_used`) from here.
    fn queues(&self) -> &[Queue];

    /// Returns the device to its pre-activation state: queues, memory and
    /// interrupt are dropped, backend connections are closed.
    fn reset(&mut self);
}

/// Returns descriptor chain `head` to the guest with `len` bytes written.
/// A failure means the ring itself is unusable (the transport validated it
/// at activation), so it is logged under `device` and the chain is lost.
pub(crate) fn add_used(device: &str, q: &mut Queue, mem: &GuestMemory, head: u16, len: u32) {
    if let Err(e) = q.add_used(mem, head, len) {
        log::error!("{device}: cannot add used descriptor {head}: {e:?}");
    }
}

/// Raises the used-buffer interrupt unless the driver suppressed it.
pub(crate) fn signal_used(device: &str, q: &mut Queue, mem: &GuestMemory, interrupt: &Interrupt) {
    // When in doubt, interrupt: a spurious one is cheap, a lost one hangs.
    if q.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.signal_used_queue() {
            log::error!("{device}: cannot raise interrupt: {e}");
        }
    }
}

/// Serves a configuration-space read from `config`; a read outside it is
/// logged and reads as zeros, whatever offset and size the guest used.
pub(crate) fn read_config_space(device: &str, config: &[u8], offset: u64, data: &mut [u8]) {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|start| Some((start, start.checked_add(data.len())?)))
        .and_then(|(start, end)| config.get(start..end));
    match src {
        Some(src) => data.copy_from_slice(src),
        None => {
            log::warn!(
                "{device}: config read at {offset:#x} size {} out of range",
                data.len()
            );
            data.fill(0);
        }
    }
}

/// Refuses a configuration-space write: every field our devices expose is
/// read-only for a virtio 1.x driver.
pub(crate) fn refuse_config_write(device: &str, offset: u64, data: &[u8]) {
    log::warn!(
        "{device}: config space is read-only (write at {offset:#x}, {} bytes)",
        data.len()
    );
}

/// Consumes an eventfd's count after a wakeup.
pub(crate) fn drain(evt: &EventFd) {
    // Non-blocking: EAGAIN just means another wakeup already drained it.
    let _ = evt.read();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inside_config_are_copied() {
        let mut data = [0u8; 2];
        read_config_space("test", &[1, 2, 3, 4], 1, &mut data);
        assert_eq!(data, [2, 3]);
    }

    #[test]
    fn reads_past_or_overflowing_the_end_read_zeros() {
        for offset in [3, 4, u64::MAX] {
            let mut data = [0xffu8; 2];
            read_config_space("test", &[1, 2, 3, 4], offset, &mut data);
            assert_eq!(data, [0, 0], "offset {offset:#x}");
        }
    }
}
