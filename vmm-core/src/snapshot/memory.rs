//! Guest RAM in a snapshot: written sparsely (zero pages become holes), and
//! mapped back `MAP_PRIVATE` so every clone shares the template's pages until
//! it writes to them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::SnapshotError;
use crate::arch::x86_64::layout;

const PAGE: usize = 4096;
const CHUNK: usize = 2 << 20;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes every RAM region, in order, into `path`; all-zero pages are left
/// as holes. Returns the file's length.
pub fn save(mem: &GuestMemoryMmap<()>, path: &Path) -> Result<u64, SnapshotError> {
    let file = super::create_file(path)?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io_err(path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let n = CHUNK.min((region.len() - done) as usize);
            let addr = region.start_addr().unchecked_add(done);
            mem.read_slice(&mut buf[..n], addr)
                .map_err(|e| SnapshotError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(e),
                })?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, file_offset + done + (i * PAGE) as u64)
                        .map_err(io_err(path))?;
                }
            }
            done += n as u64;
        }
        file_offset += region.len();
    }
    file.sync_all().map_err(io_err(path))?;
    Ok(total)
}

/// Maps `path` as the RAM of a `mem_size` guest, privately: reads come from
/// the file (and the page cache every clone shares), writes stay with this
/// process.
pub fn map_private(path: &Path, mem_size: u64) -> Result<GuestMemoryMmap<()>, SnapshotError> {
    let file = File::open(path).map_err(io_err(path))?;
    let found = file.metadata().map_err(io_err(path))?.len();
    if found != mem_size {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            found,
            expected: mem_size,
        });
    }
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, size) in layout::ram_regions(mem_size) {
        let fd = file.try_clone().map_err(io_err(path))?;
        let mapping = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::new(fd, file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| SnapshotError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(e),
            })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| {
            SnapshotError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other("guest region overflows"),
            }
        })?;
        regions.push(region);
        file_offset += size;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| SnapshotError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn round_trip_is_sparse_and_private() {
        let dir = std::env::temp_dir().join(format!("arrow-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let mem = crate::loader::create_guest_memory(32 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x1234_u16, GuestAddress((32 << 20) - 2))
            .unwrap();
        assert_eq!(save(&mem, &path).unwrap(), 32 << 20);
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages are holes");

        let clone = map_private(&path, 32 << 20).unwrap();
        assert_eq!(
            clone.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            clone.read_obj::<u16>(GuestAddress((32 << 20) - 2)).unwrap(),
            0x1234
        );
        clone.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        let again = map_private(&path, 32 << 20).unwrap();
        assert_eq!(
            again.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );

        assert!(matches!(
            map_private(&path, 64 << 20),
            Err(SnapshotError::MemorySize { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
