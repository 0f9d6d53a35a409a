//! Shared pieces of Arrow's fuzz targets: guest memory with a hole in it,
//! descriptor chains a hostile driver might publish, and scratch
//! directories.
//!
//! Each target in `fuzz_targets/` drives real product code with inputs
//! built by `arbitrary`; see the README's Fuzzing section.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use arbitrary::Arbitrary;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::fuzzing::GuestQueue;
use vmm_core::virtio::GuestMemory;

/// Guest RAM: `[0, LOW_END)` and `[HIGH_START, HIGH_END)`, so chains can
/// straddle a hole and run off either end.
pub const LOW_END: u64 = 0x2_0000;
/// Start of the second region.
pub const HIGH_START: u64 = 0x3_0000;
/// End of guest memory.
pub const HIGH_END: u64 = 0x4_0000;
/// Where the first queue's rings go (each queue takes 0x1000).
pub const RINGS: u64 = 0x1000;
/// Where the fuzzer's own bytes are written: chains mostly point here.
pub const DATA: u64 = 0x8000;

/// Fresh guest memory with a hole between two regions.
pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH_START), (HIGH_END - HIGH_START) as usize),
    ])
    .expect("two fixed, disjoint regions")
}

/// Copies `bytes` to [`DATA`], as much as fits before the hole.
pub fn fill_data(mem: &GuestMemory, bytes: &[u8]) {
    let n = bytes.len().min((LOW_END - DATA) as usize);
    mem.write_slice(&bytes[..n], GuestAddress(DATA))
        .expect("DATA..LOW_END is guest memory");
}

/// Where a descriptor points: mostly into the fuzzer's data, sometimes
/// anywhere (the hole, past the end, the rings themselves, overflowing).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Addr {
    Data(u16),
    High(u16),
    Raw(u64),
}

impl Addr {
    /// The guest address.
    pub fn resolve(self) -> u64 {
        match self {
            Addr::Data(o) => DATA + u64::from(o),
            Addr::High(o) => HIGH_START + u64::from(o),
            Addr::Raw(a) => a,
        }
    }
}

/// One descriptor as a driver may write it.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Desc {
    pub addr: Addr,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// Another descriptor follows.
    pub next: bool,
    /// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
    pub indirect: bool,
    /// `next` as written; `None` chains to the following descriptor.
    pub next_index: Option<u8>,
}

/// Publishes `descs` as one chain on `q` (raw: flags and `next` as the
/// fuzzer chose); returns its head.
pub fn publish(q: &mut GuestQueue<'_>, descs: &[Desc]) -> u16 {
    let base = if q.next_desc as usize + descs.len() > vmm_core::fuzzing::QSIZE as usize {
        0
    } else {
        q.next_desc
    };
    let raw: Vec<(u64, u32, u16, u16)> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut flags = 0u16;
            if d.write {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if d.next {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if d.indirect {
                flags |= VRING_DESC_F_INDIRECT as u16;
            }
            let next = match d.next_index {
                Some(n) => u16::from(n),
                None => base + i as u16 + 1,
            };
            (d.addr.resolve(), d.len, flags, next)
        })
        .collect();
    q.add_raw(&raw)
}

/// A well-formed chain over `[addr, addr + len)` pieces, `write` for
/// device-writable ones.
pub fn well_formed(pieces: &[(u64, u32, bool)]) -> Vec<Desc> {
    pieces
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, write))| Desc {
            addr: Addr::Raw(addr),
            len,
            write,
            next: i + 1 < pieces.len(),
            indirect: false,
            next_index: None,
        })
        .collect()
}

/// A directory of its own under the temporary directory, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `<tmp>/arrow-fuzz-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("arrow-fuzz-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating a scratch directory");
        Self(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An event counter a target bumps on a path worth seeing taken (frames
/// actually merged, say), printed as `arrow-fuzz stat NAME: N` when the
/// fuzzer exits normally; `hack/fuzz.sh` repeats those lines in its
/// summary, so a campaign shows the oracle had something to check.
pub struct Counter {
    name: &'static str,
    n: AtomicU64,
    registered: std::sync::Once,
}

/// The counters to print at exit.
static COUNTERS: std::sync::Mutex<Vec<&'static Counter>> = std::sync::Mutex::new(Vec::new());

impl Counter {
    /// A counter printed as `name`.
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            n: AtomicU64::new(0),
            registered: std::sync::Once::new(),
        }
    }

    /// Adds `k`; the first call arranges for the total to be printed.
    pub fn add(&'static self, k: u64) {
        self.registered.call_once(|| {
            let mut all = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
            if all.is_empty() {
                // SAFETY: registers a function with no preconditions that
                // only reads statics; atexit copies the pointer.
                unsafe { libc::atexit(print_counters) };
            }
            all.push(self);
        });
        self.n.fetch_add(k, Ordering::Relaxed);
    }

    /// The total so far.
    pub fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

extern "C" fn print_counters() {
    let all = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    for c in all.iter() {
        eprintln!("arrow-fuzz stat {}: {}", c.name, c.get());
    }
}
