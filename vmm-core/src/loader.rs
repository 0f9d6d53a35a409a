//! Puts a guest's boot payload in memory: the ELF kernel, the initramfs, the
//! command line, the zero page and the MP table.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::{boot_params, layout, mptable, regs};

/// Errors loading a guest's boot payload.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel image cannot be opened.
    #[error("guest kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a loadable ELF `vmlinux`.
    #[error("loading guest kernel {path} (an uncompressed ELF vmlinux is expected): {source}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line is too long for the x86 kernel.
    #[error("kernel command line is {0} bytes; the limit is {max}", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// The command line holds a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initramfs does not fit between the kernel and the MMIO gap.
    #[error("initramfs of {size} bytes does not fit in guest memory (kernel ends at {kernel_end:#x}, RAM below the MMIO gap ends at {ram_end:#x})")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    /// Writing into guest memory failed.
    #[error("writing {what} into guest memory: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The zero page cannot be built.
    #[error(transparent)]
    BootParams(#[from] boot_params::BootParamsError),
    /// The MP table cannot be built.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The GDT or page tables cannot be written.
    #[error(transparent)]
    BootTables(#[from] regs::BootWriteError),
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryPoint(pub u64);

/// Guest address for an initramfs of `size` bytes: page aligned, as high as
/// possible in RAM below the MMIO gap, above `kernel_end`.
pub fn initrd_address(mem_size: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let ram_end = mem_size.min(layout::MMIO_GAP_START);
    let addr = ram_end.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

/// Loads kernel, initramfs and command line for a vCPU count, and writes
/// every boot structure. Returns the kernel entry point.
pub fn load_boot_payload(
    mem: &GuestMemoryMmap<()>,
    mem_size: u64,
    vcpus: u8,
    kernel: &Path,
    initramfs: Option<&[u8]>,
    cmdline: &str,
) -> Result<EntryPoint, LoadError> {
    let mut image = File::open(kernel).map_err(|source| LoadError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded = Elf::load(
        mem,
        None,
        &mut image,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|source| LoadError::LoadKernel {
        path: kernel.to_path_buf(),
        source,
    })?;

    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(LoadError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(LoadError::CmdlineNul);
    }
    let mut cmdline_bytes = cmdline.as_bytes().to_vec();
    cmdline_bytes.push(0);
    mem.write_slice(&cmdline_bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|source| LoadError::Write {
            what: "command line",
            source,
        })?;

    let initrd = match initramfs {
        Some(data) => {
            let size = data.len() as u64;
            let addr = initrd_address(mem_size, loaded.kernel_end, size).ok_or(
                LoadError::InitrdTooLarge {
                    size,
                    kernel_end: loaded.kernel_end,
                    ram_end: mem_size.min(layout::MMIO_GAP_START),
                },
            )?;
            mem.write_slice(data, GuestAddress(addr))
                .map_err(|source| LoadError::Write {
                    what: "initramfs",
                    source,
                })?;
            Some((addr, size))
        }
        None => None,
    };

    let params = boot_params::build(mem_size, cmdline.len(), initrd)?;
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| LoadError::Write {
            what: "zero page",
            source,
        })?;
    mptable::setup_mptable(mem, vcpus)?;
    regs::write_boot_tables(mem)?;
    Ok(EntryPoint(loaded.kernel_load.0))
}

/// Guest memory for `mem_size` bytes of RAM, laid out around the MMIO gap.
pub fn create_guest_memory(
    mem_size: u64,
) -> Result<GuestMemoryMmap<()>, vm_memory::mmap::FromRangesError> {
    let ranges: Vec<_> = layout::ram_regions(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemory;

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        assert_eq!(
            initrd_address(128 << 20, 0x200_0000, 0x1800),
            Some((128 << 20) - 0x2000)
        );
        // Above the gap, it still stays below it.
        assert_eq!(
            initrd_address(8 << 30, 0x200_0000, 0x1000),
            Some(layout::MMIO_GAP_START - 0x1000)
        );
    }

    #[test]
    fn initrd_never_overlaps_the_kernel() {
        assert_eq!(initrd_address(64 << 20, 60 << 20, 8 << 20), None);
        assert_eq!(initrd_address(1 << 20, 0, 2 << 20), None);
    }

    #[test]
    fn guest_memory_matches_the_layout() {
        let mem = create_guest_memory(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert!(mem.address_in_range(GuestAddress((64 << 20) - 1)));
        assert!(!mem.address_in_range(GuestAddress(64 << 20)));
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let err = load_boot_payload(
            &mem,
            16 << 20,
            1,
            Path::new("/nonexistent/vmlinux"),
            None,
            "",
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn non_elf_kernel_is_rejected() {
        let path = std::env::temp_dir().join(format!("arrow-not-elf-{}", std::process::id()));
        std::fs::write(&path, b"this is not an ELF file at all, not even close....").unwrap();
        let mem = create_guest_memory(16 << 20).unwrap();
        let err = load_boot_payload(&mem, 16 << 20, 1, &path, None, "").unwrap_err();
        assert!(matches!(err, LoadError::LoadKernel { .. }), "{err}");
        std::fs::remove_file(path).unwrap();
    }
}
