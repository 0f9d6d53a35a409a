//! Snapshot state of the virtio-mmio transport and its queues.
//!
//! It exists so a template VM's virtio devices come back in a clone exactly
//! where the guest left them: the transport's registers, the negotiated
//! features and every queue's configuration and ring positions. A restored
//! active device is re-activated with queues that continue from the saved
//! `next_avail`/`next_used`, so the guest's rings (restored with guest
//! memory) stay in step. Device-specific state lives beside each device
//! (e.g. `vsock/persist.rs`).
//!
//! A state comes from a file, so it is untrusted: every value is checked
//! against the device and guest memory, and an inconsistent state is a
//! [`PersistError`], never a panic.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use log::error;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemory as _};

use super::mmio::MmioTransport;
use super::{
    status, ActivateError, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::irq::IrqLine;

/// Why a saved transport state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The state belongs to another kind of device.
    #[error("snapshot is for device type {state}, the device is type {device}")]
    DeviceType { state: u32, device: u32 },
    /// The state has a different number of queues than the device.
    #[error("snapshot has {state} queues, the device has {device}")]
    QueueCount { state: usize, device: usize },
    /// A queue's maximum size differs from what the device offers.
    #[error("queue {index}: snapshot max size {state}, the device offers {device}")]
    QueueMaxSize {
        index: usize,
        state: u16,
        device: u16,
    },
    /// A queue's size, maximum size or ring alignment is invalid.
    #[error("queue {index}: invalid state: {source}")]
    InvalidQueue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// An active device's queue is not ready.
    #[error("queue {index} of an active device is not ready")]
    QueueNotReady { index: usize },
    /// A ring of an active queue does not lie inside guest memory.
    #[error("queue {index}: {ring} at {addr:#x} ({len} bytes) is outside guest memory")]
    RingOutsideMemory {
        index: usize,
        ring: &'static str,
        addr: u64,
        len: u64,
    },
    /// The device status is not one the transport can reach.
    #[error("invalid device status {0:#x}")]
    InvalidStatus(u32),
    /// The activation flag disagrees with `DRIVER_OK`.
    #[error("snapshot says activated={activated} but device status is {status:#x}")]
    ActivationMismatch { activated: bool, status: u32 },
    /// The negotiated features include some the device does not offer.
    #[error("negotiated features {driver:#x} not offered by the device ({offered:#x})")]
    UnofferedFeatures { driver: u64, offered: u64 },
    /// The device's own state acks other features than the transport.
    #[error("device acks features {device:#x}, the transport negotiated {transport:#x}")]
    AckedFeatures { device: u64, transport: u64 },
    /// Interrupt status bits other than used-ring and config.
    #[error("invalid interrupt status {0:#x}")]
    InterruptStatus(u32),
    /// The device was already active before the restore.
    #[error("the device is already active")]
    DeviceActive,
    /// Re-activating the device failed.
    #[error("re-activating the device: {0}")]
    Activate(#[source] ActivateError),
}

/// A queue's configuration and ring positions: what `virtio_queue::QueueState`
/// holds, serializable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The maximum size the device offers.
    pub max_size: u16,
    /// The size the driver selected.
    pub size: u16,
    /// Whether the driver finished configuring the queue.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// The next available-ring entry the device will read.
    pub next_avail: u16,
    /// The next used-ring entry the device will write.
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in use.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        q.state().into()
    }
}

impl TryFrom<&QueueSnapshot> for Queue {
    type Error = virtio_queue::Error;

    /// Checks the maximum size, the size (a power of two, at most the
    /// maximum) and the rings' alignment; not guest memory.
    fn try_from(s: &QueueSnapshot) -> Result<Self, Self::Error> {
        Queue::try_from(QueueState::from(*s))
    }
}

/// The saved state of an [`MmioTransport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The virtio device ID, checked at restore.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver wrote (accepted once `FEATURES_OK` is set).
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Interrupt status bits not yet acknowledged by the guest.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Every queue, in device order.
    pub queues: Vec<QueueSnapshot>,
    /// Whether the device was active (it is re-activated on restore).
    pub activated: bool,
}

/// Bytes a split queue's three rings occupy, as `(name, address, length)`.
fn ring_areas(q: &QueueSnapshot) -> [(&'static str, u64, u64); 3] {
    let size = u64::from(q.size);
    [
        ("descriptor table", q.desc_table, 16 * size),
        // flags, idx, ring[size], used_event
        ("available ring", q.avail_ring, 6 + 2 * size),
        // flags, idx, ring[size] of {id, len}, avail_event
        ("used ring", q.used_ring, 6 + 8 * size),
    ]
}

/// Whether `status` is one the transport's state machine can reach.
fn status_reachable(value: u32) -> bool {
    use status::*;
    let sticky = FAILED | DEVICE_NEEDS_RESET;
    let steps = [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ];
    steps.contains(&(value & !sticky))
}

impl MmioTransport {
    /// Saves the transport's registers and queues. For an active device
    /// the queues' ring positions come from the device's live queues.
    ///
    /// The caller pauses the vCPUs and the device's event loop first.
    pub fn save(&self) -> MmioTransportState {
        self.save_from(&*self.device())
    }

    /// Like [`MmioTransport::save`], with the device already locked by the
    /// caller (who holds it so the event loop cannot move a queue on until
    /// guest memory is saved too).
    pub fn save_from(&self, dev: &dyn VirtioDevice) -> MmioTransportState {
        let activated = dev.is_activated();
        let live = dev.queues();
        let queues = if activated && live.len() == self.queues.len() {
            live.iter().map(QueueSnapshot::from).collect()
        } else {
            if activated {
                // A device bug; the transport's copies are the best we have.
                error!(
                    "virtio-mmio: active device exposes {} queues, expected {}; \
                     saving the positions from activation",
                    live.len(),
                    self.queues.len()
                );
            }
            self.queues.iter().map(QueueSnapshot::from).collect()
        };
        MmioTransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues,
            activated,
        }
    }

    /// Rebuilds a transport in front of `device` (restored from its own
    /// state, not active) over the clone's guest memory `mem`, raising
    /// `irq`. If the device was active, its queues are checked against
    /// `mem` and it is re-activated with them, so it continues the guest's
    /// rings where they were.
    ///
    /// Pending interrupt status bits are restored without raising the
    /// line; the interrupt controller's own state says whether the guest
    /// still has one to take.
    pub fn restore(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq: IrqLine,
        state: &MmioTransportState,
    ) -> Result<Self, PersistError> {
        let (queues, queue_evts, device_type, device_features) = {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            let device_features = dev.avail_features() | (1u64 << VIRTIO_F_VERSION_1);
            validate(state, &*dev, device_features, &mem)?;
            let queues = queues_from(&state.queues)?;
            (
                queues,
                dev.queue_events().to_vec(),
                dev.device_type(),
                device_features,
            )
        };
        let interrupt = Arc::new(Interrupt {
            status: AtomicU32::new(state.interrupt_status),
            irq,
        });
        let transport = Self {
            mem,
            device,
            interrupt,
            queue_evts,
            queues,
            device_type,
            device_features,
            device_features_sel: state.device_features_sel,
            driver_features: state.driver_features,
            driver_features_sel: state.driver_features_sel,
            queue_sel: state.queue_sel,
            status: state.status,
            config_generation: state.config_generation,
        };
        if state.activated {
            // Copies, as at DRIVER_OK: the device owns its queues, the
            // transport keeps its own for register reads.
            let live = queues_from(&state.queues)?;
            transport
                .device()
                .activate(transport.mem.clone(), transport.interrupt.clone(), live)
                .map_err(PersistError::Activate)?;
        }
        Ok(transport)
    }
}

/// Builds the queues of a saved state (sizes and alignment checked).
fn queues_from(snapshots: &[QueueSnapshot]) -> Result<Vec<Queue>, PersistError> {
    snapshots
        .iter()
        .enumerate()
        .map(|(index, q)| {
            Queue::try_from(q).map_err(|source| PersistError::InvalidQueue { index, source })
        })
        .collect()
}

/// Checks `state` against the device and guest memory.
fn validate(
    state: &MmioTransportState,
    dev: &dyn VirtioDevice,
    device_features: u64,
    mem: &GuestMemory,
) -> Result<(), PersistError> {
    if dev.is_activated() {
        return Err(PersistError::DeviceActive);
    }
    if state.device_type != dev.device_type() {
        return Err(PersistError::DeviceType {
            state: state.device_type,
            device: dev.device_type(),
        });
    }
    let max_sizes = dev.queue_max_sizes();
    if state.queues.len() != max_sizes.len() || dev.queue_events().len() != max_sizes.len() {
        return Err(PersistError::QueueCount {
            state: state.queues.len(),
            device: max_sizes.len(),
        });
    }
    if !status_reachable(state.status) {
        return Err(PersistError::InvalidStatus(state.status));
    }
    let driver_ok = state.status & status::DRIVER_OK != 0;
    if state.activated != driver_ok {
        return Err(PersistError::ActivationMismatch {
            activated: state.activated,
            status: state.status,
        });
    }
    let features_ok = state.status & status::FEATURES_OK != 0;
    if features_ok
        && (state.driver_features & !device_features != 0
            || state.driver_features & (1u64 << VIRTIO_F_VERSION_1) == 0)
    {
        return Err(PersistError::UnofferedFeatures {
            driver: state.driver_features,
            offered: device_features,
        });
    }
    // The device learns the features at FEATURES_OK and forgets them on reset.
    let acked = if features_ok {
        state.driver_features
    } else {
        0
    };
    if dev.acked_features() != acked {
        return Err(PersistError::AckedFeatures {
            device: dev.acked_features(),
            transport: acked,
        });
    }
    if state.interrupt_status & !(Interrupt::USED_RING | Interrupt::CONFIG) != 0 {
        return Err(PersistError::InterruptStatus(state.interrupt_status));
    }
    let event_idx = features_ok && state.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
    for (index, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
        // What MmioTransport::new gives a queue the device sized wrongly.
        let device_max = Queue::new(max).unwrap_or_default().max_size();
        if q.max_size != device_max {
            return Err(PersistError::QueueMaxSize {
                index,
                state: q.max_size,
                device: device_max,
            });
        }
        let queue =
            Queue::try_from(q).map_err(|source| PersistError::InvalidQueue { index, source })?;
        if !state.activated {
            continue;
        }
        if !q.ready {
            return Err(PersistError::QueueNotReady { index });
        }
        for (ring, addr, len) in ring_areas(q) {
            let inside = usize::try_from(len).is_ok_and(|n| mem.check_range(GuestAddress(addr), n))
                && addr.checked_add(len).is_some();
            if !inside {
                return Err(PersistError::RingOutsideMemory {
                    index,
                    ring,
                    addr,
                    len,
                });
            }
        }
        // The same check the transport makes at DRIVER_OK.
        if !queue.is_valid(mem) {
            return Err(PersistError::RingOutsideMemory {
                index,
                ring: "queue",
                addr: q.desc_table,
                len: 0,
            });
        }
        if q.event_idx_enabled != event_idx {
            log::warn!(
                "virtio-mmio: queue {index} event_idx={} disagrees with the negotiated \
                 features; keeping the saved value",
                q.event_idx_enabled
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use virtio_bindings::virtio_mmio as regs;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    const MEM_SIZE: usize = 0x10_0000;
    const FULL: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    /// A device that keeps the queues it is activated with.
    struct FakeDevice {
        evts: Vec<Arc<EventFd>>,
        acked: u64,
        queues: Vec<Queue>,
        active: bool,
        fail_activate: bool,
        activations: Arc<AtomicUsize>,
    }

    impl FakeDevice {
        fn new() -> Self {
            Self {
                evts: (0..2)
                    .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
                    .collect(),
                acked: 0,
                queues: Vec::new(),
                active: false,
                fail_activate: false,
                activations: Arc::default(),
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn queue_events(&self) -> &[Arc<EventFd>] {
            &self.evts
        }
        fn avail_features(&self) -> u64 {
            (1 << 3) | (1 << VIRTIO_RING_F_EVENT_IDX)
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _interrupt: Arc<Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::AlreadyActive);
            }
            self.queues = queues;
            self.active = true;
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active
        }
        fn queues(&self) -> &[Queue] {
            if self.active {
                &self.queues
            } else {
                &[]
            }
        }
        fn reset(&mut self) {
            self.active = false;
            self.queues.clear();
        }
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn irq() -> IrqLine {
        IrqLine::new(5, EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    /// A transport driven by a guest driver up to DRIVER_OK, with event
    /// index negotiated.
    fn active_transport() -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        let dev = Arc::new(Mutex::new(FakeDevice::new()));
        let mut t = MmioTransport::new(mem(), dev.clone(), irq());
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_DRIVER_FEATURES,
            (1 << 3) | (1 << VIRTIO_RING_F_EVENT_IDX),
        );
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, FULL & !status::DRIVER_OK);
        for (i, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, i);
            wr(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, 8);
            wr(&mut t, regs::VIRTIO_MMIO_QUEUE_DESC_LOW, base);
            wr(&mut t, regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
            wr(&mut t, regs::VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
            wr(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
        }
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, FULL);
        assert_eq!(t.device_status(), FULL);
        (t, dev)
    }

    /// A fresh device in the state the device's own restore would give.
    fn restored_device(acked: u64) -> Arc<Mutex<FakeDevice>> {
        let mut d = FakeDevice::new();
        d.acked = acked;
        Arc::new(Mutex::new(d))
    }

    fn restore(state: &MmioTransportState) -> Result<MmioTransport, PersistError> {
        let dev = restored_device(state.driver_features);
        MmioTransport::restore(mem(), dev, irq(), state)
    }

    fn round_trip(state: &MmioTransportState) -> MmioTransportState {
        let bytes = postcard::to_allocvec(state).unwrap();
        postcard::from_bytes(&bytes).unwrap()
    }

    #[test]
    fn queue_snapshot_converts_both_ways() {
        let state = QueueState {
            max_size: 256,
            next_avail: 0xfff0,
            next_used: 0xffe0,
            event_idx_enabled: true,
            size: 64,
            ready: true,
            desc_table: 0x1_0000,
            avail_ring: 0x1_1002,
            used_ring: 0x1_2004,
        };
        let snap = QueueSnapshot::from(state);
        assert_eq!(QueueState::from(snap), state);
        let q = Queue::try_from(&snap).unwrap();
        assert_eq!(q.state(), state);
        assert_eq!(QueueSnapshot::from(&q), snap);
        let bytes = postcard::to_allocvec(&snap).unwrap();
        assert_eq!(postcard::from_bytes::<QueueSnapshot>(&bytes).unwrap(), snap);
        // A freshly created queue converts too.
        let fresh = Queue::new(16).unwrap();
        assert_eq!(
            Queue::try_from(&QueueSnapshot::from(&fresh)).unwrap(),
            fresh
        );
    }

    #[test]
    fn queue_snapshot_rejects_invalid_values() {
        let good = QueueSnapshot::from(Queue::new(16).unwrap().state());
        let bad = [
            QueueSnapshot { size: 12, ..good },
            QueueSnapshot { size: 0, ..good },
            QueueSnapshot { size: 32, ..good },
            QueueSnapshot {
                max_size: 0,
                ..good
            },
            QueueSnapshot {
                max_size: 15,
                ..good
            },
            QueueSnapshot {
                desc_table: 0x1_0008,
                ..good
            },
            QueueSnapshot {
                avail_ring: 0x1_0001,
                ..good
            },
            QueueSnapshot {
                used_ring: 0x1_0002,
                ..good
            },
        ];
        for s in bad {
            assert!(Queue::try_from(&s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn inactive_transport_round_trip() {
        let dev = Arc::new(Mutex::new(FakeDevice::new()));
        let mut t = MmioTransport::new(mem(), dev, irq());
        wr(&mut t, regs::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        wr(
            &mut t,
            regs::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 1);
        let state = round_trip(&t.save());
        assert!(!state.activated);
        assert_eq!(state.status, status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(state.driver_features, 1 << 3);

        // Features are not accepted yet, so the device acks none.
        let dev = restored_device(0);
        let mut r = MmioTransport::restore(mem(), dev.clone(), irq(), &state).unwrap();
        assert_eq!(r.save(), state);
        assert!(!dev.lock().unwrap().active);
        assert_eq!(rd(&mut r, regs::VIRTIO_MMIO_DEVICE_FEATURES), 1, "sel 1");
        // The driver carries on: FEATURES_OK needs VERSION_1 too.
        wr(&mut r, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut r, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut r, regs::VIRTIO_MMIO_STATUS, FULL & !status::DRIVER_OK);
        assert_eq!(r.device_status(), FULL & !status::DRIVER_OK);
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | (1 << 3));
    }

    #[test]
    fn active_transport_round_trip_continues_rings() {
        let (mut t, dev) = active_transport();
        // The device consumed some buffers since activation.
        {
            let mut d = dev.lock().unwrap();
            d.queues[0].set_next_avail(5);
            d.queues[0].set_next_used(4);
            d.queues[1].set_next_avail(0xffff);
            d.queues[1].set_next_used(0xffff);
        }
        t.interrupt().signal_used_queue().unwrap();
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 1);
        let state = round_trip(&t.save());
        assert!(state.activated);
        assert_eq!(state.status, FULL);
        assert_eq!(state.interrupt_status, Interrupt::USED_RING);
        assert_eq!(state.queue_sel, 1);
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (5, 4)
        );
        assert_eq!(state.queues[1].next_avail, 0xffff);
        assert!(state.queues.iter().all(|q| q.event_idx_enabled && q.ready));
        assert!(state.queues.iter().all(|q| q.size == 8));

        let new_dev = restored_device(state.driver_features);
        let activations = new_dev.lock().unwrap().activations.clone();
        let mut r = MmioTransport::restore(mem(), new_dev.clone(), irq(), &state).unwrap();
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        {
            let d = new_dev.lock().unwrap();
            assert_eq!(d.queues.len(), 2);
            assert_eq!((d.queues[0].next_avail(), d.queues[0].next_used()), (5, 4));
            assert_eq!(d.queues[1].next_used(), 0xffff);
            assert_eq!(d.queues[0].desc_table(), 0x1_0000);
        }
        assert_eq!(r.save(), state);
        // The guest sees the same registers.
        assert_eq!(r.device_status(), FULL);
        assert_eq!(rd(&mut r, regs::VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(
            rd(&mut r, regs::VIRTIO_MMIO_INTERRUPT_STATUS),
            Interrupt::USED_RING
        );
        wr(
            &mut r,
            regs::VIRTIO_MMIO_INTERRUPT_ACK,
            Interrupt::USED_RING,
        );
        assert_eq!(rd(&mut r, regs::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Notifications reach the new device's eventfds.
        wr(&mut r, regs::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(new_dev.lock().unwrap().evts[1].read().unwrap(), 1);
        // And a reset works as usual.
        wr(&mut r, regs::VIRTIO_MMIO_STATUS, 0);
        assert!(!new_dev.lock().unwrap().active);
    }

    #[test]
    fn corrupted_states_are_errors() {
        let (t, _) = active_transport();
        let good = t.save();
        restore(&good).unwrap();

        let mut s = good.clone();
        s.queues.pop();
        assert!(matches!(
            restore(&s),
            Err(PersistError::QueueCount {
                state: 1,
                device: 2
            })
        ));
        let mut s = good.clone();
        s.queues.push(s.queues[0]);
        assert!(matches!(
            restore(&s),
            Err(PersistError::QueueCount { state: 3, .. })
        ));
        let mut s = good.clone();
        s.queues[1].size = 6;
        assert!(matches!(
            restore(&s),
            Err(PersistError::InvalidQueue { index: 1, .. })
        ));
        let mut s = good.clone();
        s.queues[0].size = 32;
        assert!(matches!(
            restore(&s),
            Err(PersistError::InvalidQueue { index: 0, .. })
        ));
        let mut s = good.clone();
        s.queues[0].max_size = 32;
        assert!(matches!(
            restore(&s),
            Err(PersistError::QueueMaxSize { index: 0, .. })
        ));
        let mut s = good.clone();
        s.queues[1].used_ring = MEM_SIZE as u64 - 8;
        assert!(matches!(
            restore(&s),
            Err(PersistError::RingOutsideMemory {
                index: 1,
                ring: "used ring",
                ..
            })
        ));
        let mut s = good.clone();
        s.queues[0].desc_table = !0xf_u64;
        assert!(matches!(
            restore(&s),
            Err(PersistError::RingOutsideMemory { index: 0, .. })
        ));
        let mut s = good.clone();
        s.queues[1].ready = false;
        assert!(matches!(
            restore(&s),
            Err(PersistError::QueueNotReady { index: 1 })
        ));
        let mut s = good.clone();
        s.activated = false;
        assert!(matches!(
            restore(&s),
            Err(PersistError::ActivationMismatch { .. })
        ));
        for bad in [0x100 | FULL, status::DRIVER, FULL & !status::FEATURES_OK] {
            let mut s = good.clone();
            s.status = bad;
            assert!(
                matches!(restore(&s), Err(PersistError::InvalidStatus(v)) if v == bad),
                "{bad:#x}"
            );
        }
        let mut s = good.clone();
        s.driver_features |= 1 << 20;
        assert!(matches!(
            restore(&s),
            Err(PersistError::UnofferedFeatures { .. })
        ));
        let mut s = good.clone();
        s.driver_features &= !(1 << 32);
        assert!(matches!(
            restore(&s),
            Err(PersistError::UnofferedFeatures { .. })
        ));
        let mut s = good.clone();
        s.interrupt_status = 0x10;
        assert!(matches!(
            restore(&s),
            Err(PersistError::InterruptStatus(0x10))
        ));
        let mut s = good.clone();
        s.device_type = 19;
        assert!(matches!(
            restore(&s),
            Err(PersistError::DeviceType {
                state: 19,
                device: 42
            })
        ));

        // The device's own state must agree with the negotiated features.
        let dev = restored_device(1 << 3);
        assert!(matches!(
            MmioTransport::restore(mem(), dev.clone(), irq(), &good),
            Err(PersistError::AckedFeatures { .. })
        ));
        assert!(!dev.lock().unwrap().active);
        // An active device, or one that refuses, is an error too.
        let dev = restored_device(good.driver_features);
        dev.lock().unwrap().active = true;
        assert!(matches!(
            MmioTransport::restore(mem(), dev, irq(), &good),
            Err(PersistError::DeviceActive)
        ));
        let dev = restored_device(good.driver_features);
        dev.lock().unwrap().fail_activate = true;
        let err = MmioTransport::restore(mem(), dev, irq(), &good)
            .err()
            .unwrap();
        assert!(matches!(err, PersistError::Activate(_)));
        assert!(err.to_string().contains("re-activating"));
        // Rings are checked against the clone's memory, not the template's.
        let small = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1_8000)]).unwrap();
        let dev = restored_device(good.driver_features);
        assert!(matches!(
            MmioTransport::restore(small, dev, irq(), &good),
            Err(PersistError::RingOutsideMemory { index: 1, .. })
        ));
    }

    #[test]
    fn inactive_state_skips_memory_checks_but_not_sizes() {
        let dev = Arc::new(Mutex::new(FakeDevice::new()));
        let t = MmioTransport::new(mem(), dev, irq());
        let mut s = t.save();
        // Not configured yet: the guest may still write any address.
        s.queues[0].desc_table = 0x4000_0000;
        restore(&s).unwrap();
        s.queues[0].size = 3;
        assert!(matches!(
            restore(&s),
            Err(PersistError::InvalidQueue { index: 0, .. })
        ));
    }
}
