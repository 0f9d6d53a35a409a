//! A fake guest driver for device tests: split virtqueues laid out in real
//! guest memory, filled and read the way a guest driver would.

// Test scaffolding (unit tests, fuzz targets): a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::GuestMemory;

/// The size of every test queue.
pub const QSIZE: u16 = 64;
/// The size of test guest memory.
pub const MEM_SIZE: usize = 0x100_0000;

/// `MEM_SIZE` bytes of guest memory from address 0.
pub fn new_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One queue as the guest driver sees it.
pub struct GuestQueue<'a> {
    pub mock: MockSplitQueue<'a, GuestMemory>,
    mem: &'a GuestMemory,
    /// Where the next chain's descriptors go in the table.
    pub next_desc: u16,
    avail_idx: u16,
    /// The used index the driver has read up to.
    pub last_used: u16,
}

impl<'a> GuestQueue<'a> {
    /// A queue whose rings start at guest address `ring`.
    pub fn new(mem: &'a GuestMemory, ring: u64) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(ring), QSIZE),
            mem,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// The same driver state over `mem`, a copy of this queue's memory (a
    /// snapshot restored in another process).
    pub fn resume_on<'b>(&self, mem: &'b GuestMemory) -> GuestQueue<'b> {
        // Creating the mock zeroes the rings' flags and indexes; keep the
        // restored ones.
        let start = self.mock.desc_table_addr();
        let mut rings = vec![0u8; (self.mock.end().0 - start.0) as usize];
        mem.read_slice(&mut rings, start).unwrap();
        let mock = MockSplitQueue::create(mem, start, QSIZE);
        mem.write_slice(&rings, start).unwrap();
        GuestQueue {
            mock,
            mem,
            next_desc: self.next_desc,
            avail_idx: self.avail_idx,
            last_used: self.last_used,
        }
    }

    /// Publishes raw descriptors `(addr, len, flags, next)`, stored
    /// consecutively from `next_desc` (or from 0 when they would not fit
    /// before the end of the table); the first is the head.
    pub fn add_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        if self.next_desc as usize + descs.len() > QSIZE as usize {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.mock.desc_table().store(head + i as u16, d).unwrap();
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % QSIZE;
        let avail = self.mock.avail_addr();
        let slot = 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, avail.unchecked_add(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// Publishes a chain of `(addr, len, device_writable)` descriptors.
    pub fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let base = if self.next_desc as usize + descs.len() > QSIZE as usize {
            0
        } else {
            self.next_desc
        };
        let raw: Vec<_> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut next = 0;
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = base + i as u16 + 1;
                }
                (addr, len, flags, next)
            })
            .collect();
        self.add_raw(&raw)
    }

    /// New used entries `(head, len)`.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let used = self.mock.used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.last_used != idx {
            let slot = 4 + 8 * u64::from(self.last_used % QSIZE);
            let id: u32 = self.mem.read_obj(used.unchecked_add(slot)).unwrap();
            let len: u32 = self.mem.read_obj(used.unchecked_add(slot + 4)).unwrap();
            out.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }
}
