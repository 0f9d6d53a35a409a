//! Address-decoded buses for port I/O and MMIO exits.
//!
//! A vCPU thread that exits on an I/O or MMIO access looks the address up here
//! and hands the access to the device that owns the range. Devices sit behind a
//! `Mutex` because every vCPU thread may reach them, and the device event loop
//! may too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO.
///
/// `offset` is relative to the start of the range the device was inserted at.
/// Implementations must not panic on any offset or data length: both come
/// straight from the guest.
pub trait BusDevice: Send {
    /// Handles a guest read; unhandled bytes should be left as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// A range of length zero was requested.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

#[derive(Clone)]
struct BusRange {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((&prev_base, prev)) = self.ranges.range(..end).next_back() {
            if prev_base + prev.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, &BusRange)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, range))
    }

    /// Dispatches a read; returns false when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, range)) => {
                // A poisoned lock means another vCPU thread panicked inside the
                // device; keep serving rather than cascading the panic.
                let mut dev = range.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, range)) => {
                let mut dev = range.device.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(bus.read(0x105, &mut buf));
        assert_eq!(buf, [5, 5]);
        assert!(bus.write(0x10f, &[1]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0xf, vec![1])));
        assert!(!bus.read(0x110, &mut buf));
        assert!(!bus.read(0xff, &mut buf));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(dev.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(dev.clone(), 0xf0, 0x11).is_err());
        assert!(bus.insert(dev.clone(), 0x0, 0).is_err());
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        bus.insert(dev, 0x110, 0x10).unwrap();
    }
}
