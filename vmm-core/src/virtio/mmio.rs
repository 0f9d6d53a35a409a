//! The virtio-mmio (version 2, "modern") transport.
//!
//! It exists so a device only implements [`VirtioDevice`]: this type serves
//! the register window the guest's `virtio_mmio` driver probes, runs the
//! device-status state machine, negotiates features, collects each queue's
//! configuration and activates the device on `DRIVER_OK`. Every access comes
//! from the guest, so wrong sizes, offsets and out-of-order writes are logged
//! and ignored (reads return zero), never panics.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error, warn};
use virtio_bindings::virtio_mmio as regs;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    status, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;
use crate::devices::irq::IrqLine;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("ARRW"); drivers do not interpret it.
pub const VENDOR_ID: u32 = 0x5752_5241;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = regs::VIRTIO_MMIO_CONFIG as u64;
/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// A virtio-mmio register window in front of one device.
///
/// Fields are visible to `super::persist`, which saves and rebuilds them.
pub struct MmioTransport {
    pub(super) mem: GuestMemory,
    pub(super) device: Arc<Mutex<dyn VirtioDevice>>,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queue_evts: Vec<Arc<EventFd>>,
    pub(super) queues: Vec<Queue>,
    pub(super) device_type: u32,
    pub(super) device_features: u64,
    pub(super) device_features_sel: u32,
    pub(super) driver_features: u64,
    pub(super) driver_features_sel: u32,
    pub(super) queue_sel: u32,
    pub(super) status: u32,
    pub(super) config_generation: u32,
}

impl MmioTransport {
    /// Puts a transport in front of `device`, raising `irq` for its
    /// interrupts.
    pub fn new(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>, irq: IrqLine) -> Self {
        let (queues, queue_evts, device_type, device_features) = {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            let queues = dev
                .queue_max_sizes()
                .iter()
                // A max size of 0 or above 32768 is a device bug; the queue
                // then reports QueueNumMax 0 and can never be made valid.
                .map(|&max| Queue::new(max).unwrap_or_default())
                .collect();
            (
                queues,
                dev.queue_events().to_vec(),
                dev.device_type(),
                dev.avail_features() | (1u64 << VIRTIO_F_VERSION_1),
            )
        };
        Self {
            mem,
            device,
            interrupt: Arc::new(Interrupt::new(irq)),
            queue_evts,
            queues,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        }
    }

    /// The interrupt shared with the device.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The current device status register.
    pub fn device_status(&self) -> u32 {
        self.status
    }

    pub(super) fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        // A poisoned lock means a thread panicked inside the device; keep
        // serving the guest rather than cascading the panic.
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0
            && self.status & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) == 0
    }

    /// Applies `f` to the selected queue if it may be configured now and is
    /// not live yet.
    fn update_queue(&mut self, what: &str, f: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            warn!(
                "virtio-mmio: {what} write in device status {:#x} ignored",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        match self.queues.get_mut(sel as usize) {
            Some(q) if !q.ready() => f(q),
            Some(_) => warn!("virtio-mmio: {what} write to ready queue {sel} ignored"),
            None => warn!("virtio-mmio: {what} write to missing queue {sel} ignored"),
        }
    }

    fn reset(&mut self) {
        debug!("virtio-mmio: device reset");
        {
            let mut dev = self.device();
            dev.reset();
            dev.set_acked_features(0);
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn set_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        if value == self.status {
            return;
        }
        if value & FAILED != 0 {
            warn!("virtio-mmio: driver set FAILED");
            self.status |= FAILED;
            return;
        }
        // Each step adds exactly the next bit of the initialisation sequence.
        let old = self.status;
        let next = match old {
            0 => ACKNOWLEDGE,
            s if s == ACKNOWLEDGE => DRIVER,
            s if s == ACKNOWLEDGE | DRIVER => FEATURES_OK,
            s if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => DRIVER_OK,
            _ => 0,
        };
        if next == 0 || value != old | next {
            warn!("virtio-mmio: status transition {old:#x} -> {value:#x} ignored");
            return;
        }
        match next {
            FEATURES_OK => {
                if self.features_acceptable() {
                    self.device().set_acked_features(self.driver_features);
                    self.status = value;
                } else {
                    // FEATURES_OK stays clear; the driver reads it back and fails.
                    warn!(
                        "virtio-mmio: driver features {:#x} not acceptable (offered {:#x})",
                        self.driver_features, self.device_features
                    );
                }
            }
            DRIVER_OK => self.activate(value),
            _ => self.status = value,
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.device_features == 0
            && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self, value: u32) {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.is_valid(&self.mem) {
                error!("virtio-mmio: queue {i} not ready or invalid at DRIVER_OK");
                self.fail_needs_reset();
                return;
            }
        }
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(mut copy) => {
                    copy.set_event_idx(event_idx);
                    queues.push(copy);
                }
                Err(e) => {
                    error!("virtio-mmio: cannot copy queue: {e:?}");
                    self.fail_needs_reset();
                    return;
                }
            }
        }
        let result = self
            .device()
            .activate(self.mem.clone(), self.interrupt.clone(), queues);
        match result {
            Ok(()) => self.status = value,
            Err(e) => {
                error!("virtio-mmio: device activation failed: {e}");
                self.fail_needs_reset();
            }
        }
    }

    fn fail_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config_change() {
            error!("virtio-mmio: cannot raise config interrupt: {e}");
        }
    }

    fn read_reg(&self, offset: u32) -> u32 {
        match offset {
            regs::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            regs::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            regs::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            regs::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            regs::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            regs::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            regs::VIRTIO_MMIO_QUEUE_READY => {
                self.selected_queue().map_or(0, |q| u32::from(q.ready()))
            }
            regs::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            regs::VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: a length of all ones says so.
            regs::VIRTIO_MMIO_SHM_LEN_LOW
            | regs::VIRTIO_MMIO_SHM_LEN_HIGH
            | regs::VIRTIO_MMIO_SHM_BASE_LOW
            | regs::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            regs::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                warn!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u32, v: u32) {
        match offset {
            regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::VIRTIO_MMIO_DRIVER_FEATURES => {
                if self.status != status::ACKNOWLEDGE | status::DRIVER {
                    warn!(
                        "virtio-mmio: DriverFeatures write in status {:#x} ignored",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    sel => {
                        if v != 0 {
                            warn!("virtio-mmio: DriverFeatures bits {v:#x} for page {sel} ignored");
                        }
                    }
                }
            }
            regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            regs::VIRTIO_MMIO_QUEUE_NUM => {
                self.update_queue("QueueNum", |q| match u16::try_from(v) {
                    Ok(n) => q.set_size(n),
                    Err(_) => warn!("virtio-mmio: queue size {v} out of range"),
                })
            }
            regs::VIRTIO_MMIO_QUEUE_READY => {
                if !self.queue_config_allowed() {
                    warn!(
                        "virtio-mmio: QueueReady write in status {:#x} ignored",
                        self.status
                    );
                    return;
                }
                let sel = self.queue_sel as usize;
                match self.queues.get_mut(sel) {
                    Some(q) => q.set_ready(v == 1),
                    None => warn!("virtio-mmio: QueueReady write to missing queue {sel}"),
                }
            }
            regs::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            regs::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            regs::VIRTIO_MMIO_STATUS => self.set_status(v),
            regs::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.update_queue("QueueDescLow", |q| q.set_desc_table_address(Some(v), None))
            }
            regs::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.update_queue("QueueDescHigh", |q| q.set_desc_table_address(None, Some(v)))
            }
            regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.update_queue("QueueDriverLow", |q| {
                q.set_avail_ring_address(Some(v), None)
            }),
            regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.update_queue("QueueDriverHigh", |q| {
                q.set_avail_ring_address(None, Some(v))
            }),
            regs::VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.update_queue("QueueDeviceLow", |q| q.set_used_ring_address(Some(v), None))
            }
            regs::VIRTIO_MMIO_QUEUE_USED_HIGH => self.update_queue("QueueDeviceHigh", |q| {
                q.set_used_ring_address(None, Some(v))
            }),
            regs::VIRTIO_MMIO_SHM_SEL => {}
            _ => warn!("virtio-mmio: write of unknown or read-only register {offset:#x}"),
        }
    }

    fn notify(&self, index: u32) {
        if self.status & status::DRIVER_OK == 0 {
            warn!("virtio-mmio: QueueNotify before DRIVER_OK ignored");
            return;
        }
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    error!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => warn!("virtio-mmio: QueueNotify for missing queue {index}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_SPACE_OFFSET {
            if offset < MMIO_WINDOW_SIZE {
                self.device()
                    .read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                warn!("virtio-mmio: read beyond the window at {offset:#x}");
            }
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn!(
                "virtio-mmio: bad register read at {offset:#x}, size {}",
                data.len()
            );
            return;
        }
        let v = self.read_reg(offset as u32);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if offset >= MMIO_WINDOW_SIZE {
                warn!("virtio-mmio: write beyond the window at {offset:#x}");
            } else if self.status & status::DRIVER == 0 || self.status & status::FAILED != 0 {
                warn!(
                    "virtio-mmio: config write in status {:#x} ignored",
                    self.status
                );
            } else {
                self.device()
                    .write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                "virtio-mmio: bad register write at {offset:#x}, size {}",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            warn!("virtio-mmio: unaligned register write at {offset:#x}");
            return;
        }
        self.write_reg(offset as u32, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    struct FakeDevice {
        max_sizes: Vec<u16>,
        evts: Vec<Arc<EventFd>>,
        acked: u64,
        config: [u8; 8],
        active: bool,
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        fail_activate: bool,
        queue_sizes: Vec<u16>,
    }

    impl FakeDevice {
        fn new() -> Self {
            Self {
                max_sizes: vec![16, 16],
                evts: (0..2)
                    .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
                    .collect(),
                acked: 0,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                active: false,
                activations: Arc::default(),
                resets: Arc::default(),
                fail_activate: false,
                queue_sizes: Vec::new(),
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn queue_events(&self) -> &[Arc<EventFd>] {
            &self.evts
        }
        fn avail_features(&self) -> u64 {
            1 << 3
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let Ok(off) = usize::try_from(offset) else {
                return;
            };
            if let Some(src) = off
                .checked_add(data.len())
                .and_then(|end| self.config.get(off..end))
            {
                data.copy_from_slice(src);
            }
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
            self.queue_sizes = queues.iter().map(|q| q.size()).collect();
            self.active = true;
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active
        }
        fn queues(&self) -> &[Queue] {
            &[]
        }
        fn reset(&mut self) {
            self.active = false;
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn setup(dev: FakeDevice) -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let irq = IrqLine::new(5, EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (MmioTransport::new(mem, dev.clone(), irq), dev)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0xffu8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[allow(non_snake_case)]
    fn R(reg: u32) -> u64 {
        u64::from(reg)
    }

    fn negotiate(t: &mut MmioTransport) {
        wr(t, R(regs::VIRTIO_MMIO_STATUS), status::ACKNOWLEDGE);
        wr(
            t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1);
        wr(t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1);
        wr(t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 0);
        wr(t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1 << 3);
        wr(
            t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, idx: u32, base: u64) {
        wr(t, R(regs::VIRTIO_MMIO_QUEUE_SEL), idx);
        wr(t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 16);
        wr(t, R(regs::VIRTIO_MMIO_QUEUE_DESC_LOW), base as u32);
        wr(t, R(regs::VIRTIO_MMIO_QUEUE_DESC_HIGH), 0);
        wr(
            t,
            R(regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW),
            (base + 0x1000) as u32,
        );
        wr(t, R(regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH), 0);
        wr(
            t,
            R(regs::VIRTIO_MMIO_QUEUE_USED_LOW),
            (base + 0x2000) as u32,
        );
        wr(t, R(regs::VIRTIO_MMIO_QUEUE_USED_HIGH), 0);
        wr(t, R(regs::VIRTIO_MMIO_QUEUE_READY), 1);
    }

    const FULL: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn identity_registers() {
        let (mut t, _) = setup(FakeDevice::new());
        assert_eq!(rd(&mut t, 0), MMIO_MAGIC_VALUE);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 19);
        assert_eq!(rd(&mut t, 0xc), VENDOR_ID);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM_MAX)), 16);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_SEL), 7);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM_MAX)), 0);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_SHM_LEN_LOW)), u32::MAX);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_CONFIG_GENERATION)), 0);
    }

    #[test]
    fn bad_sizes_and_offsets_are_ignored() {
        let (mut t, _) = setup(FakeDevice::new());
        let mut b2 = [0xffu8; 2];
        t.read(0, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b8 = [0xffu8; 8];
        t.read(0, &mut b8);
        assert_eq!(b8, [0; 8]);
        assert_eq!(rd(&mut t, 2), 0, "unaligned read");
        assert_eq!(rd(&mut t, 0x18), 0, "hole in the register map");
        assert_eq!(
            rd(&mut t, R(regs::VIRTIO_MMIO_QUEUE_DESC_LOW)),
            0,
            "write-only"
        );
        let mut empty = [];
        t.read(0, &mut empty);
        t.read(u64::MAX, &mut b2);
        assert_eq!(b2, [0, 0]);
        // Writes of the wrong size or offset change nothing.
        t.write(R(regs::VIRTIO_MMIO_STATUS), &[1]);
        t.write(R(regs::VIRTIO_MMIO_STATUS), &[1, 0, 0, 0, 0, 0, 0, 0]);
        t.write(R(regs::VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
        t.write(u64::MAX, &[1, 0, 0, 0]);
        t.write(0x0, &[1, 0, 0, 0]);
        t.write(0x200, &[]);
        assert_eq!(t.device_status(), 0);
    }

    #[test]
    fn config_space_reads_are_bounded() {
        let (mut t, _) = setup(FakeDevice::new());
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b4 = [0xffu8; 4];
        t.read(0x104, &mut b4);
        assert_eq!(b4, [5, 6, 7, 8]);
        t.read(0x106, &mut b4);
        assert_eq!(b4, [0; 4], "straddles the end of config space");
        t.read(0xffc, &mut b4);
        assert_eq!(b4, [0; 4]);
        t.read(0x1000, &mut b4);
        assert_eq!(b4, [0; 4]);
    }

    #[test]
    fn features_and_status_sequence() {
        let (mut t, dev) = setup(FakeDevice::new());
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_DEVICE_FEATURES)), 1 << 3);
        wr(&mut t, R(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL), 1);
        assert_eq!(
            rd(&mut t, R(regs::VIRTIO_MMIO_DEVICE_FEATURES)),
            1,
            "VERSION_1 offered"
        );
        wr(&mut t, R(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL), 2);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_DEVICE_FEATURES)), 0);

        // Skipping ACKNOWLEDGE is refused.
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), status::DRIVER);
        assert_eq!(t.device_status(), 0);
        // Driver features before DRIVER are ignored.
        wr(&mut t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1 << 3);
        negotiate(&mut t);
        assert_eq!(
            t.device_status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        assert_eq!(dev.lock().unwrap().acked, (1 << 32) | (1 << 3));
        // Features are frozen after FEATURES_OK.
        wr(&mut t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES), 0);
        assert_eq!(t.driver_features, (1 << 32) | (1 << 3));
    }

    #[test]
    fn features_ok_refused_for_unoffered_or_legacy() {
        let (mut t, _) = setup(FakeDevice::new());
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), status::ACKNOWLEDGE);
        wr(
            &mut t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER,
        );
        // No VERSION_1: a legacy driver.
        wr(&mut t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1 << 3);
        wr(
            &mut t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(t.device_status() & status::FEATURES_OK, 0);
        // A feature we never offered.
        wr(&mut t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1);
        wr(&mut t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1 | 2);
        wr(
            &mut t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(t.device_status() & status::FEATURES_OK, 0);
        wr(&mut t, R(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1);
        wr(
            &mut t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(t.device_status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_config_only_between_features_ok_and_driver_ok() {
        let (mut t, _) = setup(FakeDevice::new());
        // Before FEATURES_OK: ignored.
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 8);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(t.queues[0].size(), 16);
        assert!(!t.queues[0].ready());
        negotiate(&mut t);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 8);
        assert_eq!(t.queues[0].size(), 8);
        // Invalid sizes are refused by the queue.
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 7);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 32);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 0x1_0000);
        assert_eq!(t.queues[0].size(), 8);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_QUEUE_READY)), 1);
        // A ready queue cannot be reconfigured.
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 4);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_DESC_LOW), 0x8000);
        assert_eq!(t.queues[0].size(), 8);
        assert_eq!(t.queues[0].desc_table(), 0);
        // Writes to a missing queue are ignored.
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_SEL), 9);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NUM), 4);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_QUEUE_READY)), 0);
    }

    #[test]
    fn activation_on_driver_ok_and_notify() {
        let (mut t, dev) = setup(FakeDevice::new());
        let activations = dev.lock().unwrap().activations.clone();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        // Notify before DRIVER_OK is ignored.
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NOTIFY), 1);
        assert!(dev.lock().unwrap().evts[1].read().is_err());
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), FULL);
        assert_eq!(t.device_status(), FULL);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        assert_eq!(dev.lock().unwrap().queue_sizes, vec![16, 16]);
        // Queue config after DRIVER_OK is ignored.
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_SEL), 0);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(t.queues[0].ready());
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NOTIFY), 1);
        assert_eq!(dev.lock().unwrap().evts[1].read().unwrap(), 1);
        wr(&mut t, R(regs::VIRTIO_MMIO_QUEUE_NOTIFY), 5);
        // Writing DRIVER_OK again does not re-activate.
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), FULL);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn driver_ok_with_invalid_queue_needs_reset() {
        let (mut t, dev) = setup(FakeDevice::new());
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        // Queue 1 points outside guest memory.
        setup_queue(&mut t, 1, 0xfff_0000);
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), FULL);
        assert_eq!(t.device_status() & status::DRIVER_OK, 0);
        assert_ne!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            rd(&mut t, R(regs::VIRTIO_MMIO_INTERRUPT_STATUS)) & Interrupt::CONFIG,
            0
        );
        assert!(!dev.lock().unwrap().active);
    }

    #[test]
    fn driver_ok_with_unready_queue_or_failing_device() {
        let (mut t, _) = setup(FakeDevice::new());
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), FULL);
        assert_ne!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);

        let mut failing = FakeDevice::new();
        failing.fail_activate = true;
        let (mut t, _) = setup(failing);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), FULL);
        assert_eq!(t.device_status() & status::DRIVER_OK, 0);
        assert_ne!(t.device_status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let (mut t, _) = setup(FakeDevice::new());
        t.interrupt()
            .signal(Interrupt::USED_RING | Interrupt::CONFIG)
            .unwrap();
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_INTERRUPT_STATUS)), 3);
        wr(
            &mut t,
            R(regs::VIRTIO_MMIO_INTERRUPT_ACK),
            Interrupt::USED_RING,
        );
        assert_eq!(
            rd(&mut t, R(regs::VIRTIO_MMIO_INTERRUPT_STATUS)),
            Interrupt::CONFIG
        );
        assert_eq!(t.interrupt().irq_line().eventfd().read().unwrap(), 1);
    }

    #[test]
    fn reset_and_failed() {
        let (mut t, dev) = setup(FakeDevice::new());
        let resets = dev.lock().unwrap().resets.clone();
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), FULL);
        t.interrupt().signal_used_queue().unwrap();
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(t.device_status(), 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert!(!dev.lock().unwrap().active);
        assert_eq!(dev.lock().unwrap().acked, 0);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_INTERRUPT_STATUS)), 0);
        assert_eq!(rd(&mut t, R(regs::VIRTIO_MMIO_QUEUE_READY)), 0);
        assert_eq!(t.queues[1].size(), 16);

        // FAILED sticks until reset, and blocks further progress.
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), status::ACKNOWLEDGE);
        wr(
            &mut t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::FAILED,
        );
        assert_eq!(t.device_status(), status::ACKNOWLEDGE | status::FAILED);
        wr(
            &mut t,
            R(regs::VIRTIO_MMIO_STATUS),
            status::ACKNOWLEDGE | status::DRIVER,
        );
        assert_eq!(t.device_status(), status::ACKNOWLEDGE | status::FAILED);
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(t.device_status(), 0);
        // The full sequence works again after a reset.
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x1_0000);
        setup_queue(&mut t, 1, 0x2_0000);
        wr(&mut t, R(regs::VIRTIO_MMIO_STATUS), FULL);
        assert_eq!(t.device_status(), FULL);
    }
}
