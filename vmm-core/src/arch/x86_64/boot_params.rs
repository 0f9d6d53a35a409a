//! The Linux zero page: setup header fields a boot loader fills in, and the
//! e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_RAM: u32 = 1;

/// Errors filling the zero page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// More RAM ranges than the zero page's e820 table holds.
    #[error("too many e820 entries")]
    E820Full,
    /// The guest has less RAM than the kernel needs to be loaded.
    #[error("guest memory of {0} bytes is too small to boot")]
    MemoryTooSmall(u64),
    /// The initramfs lies outside what the 32-bit header fields can express.
    #[error("initramfs at {addr:#x} (+{size:#x}) is not addressable by the boot header")]
    InitrdOutOfRange { addr: u64, size: u64 },
}

fn add_e820(params: &mut boot_params, addr: u64, size: u64) -> Result<(), BootParamsError> {
    let idx = params.e820_entries as usize;
    let slot = params
        .e820_table
        .get_mut(idx)
        .ok_or(BootParamsError::E820Full)?;
    *slot = boot_e820_entry {
        addr,
        size,
        type_: E820_RAM,
    };
    params.e820_entries += 1;
    Ok(())
}

/// Builds the zero page for `mem_size` bytes of RAM, a command line of
/// `cmdline_len` bytes (without NUL) at [`CMDLINE_START`], and an optional
/// initramfs `(addr, size)`.
pub fn build(
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<boot_params, BootParamsError> {
    if mem_size <= HIMEM_START {
        return Err(BootParamsError::MemoryTooSmall(mem_size));
    }
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len.min(CMDLINE_MAX_SIZE - 1) as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some((addr, size)) = initrd {
        let end = addr.checked_add(size);
        match (u32::try_from(addr), u32::try_from(size), end) {
            (Ok(a), Ok(s), Some(end)) if end <= MMIO_GAP_START => {
                params.hdr.ramdisk_image = a;
                params.hdr.ramdisk_size = s;
            }
            _ => return Err(BootParamsError::InitrdOutOfRange { addr, size }),
        }
    }

    add_e820(&mut params, 0, EBDA_START)?;
    if mem_size <= MMIO_GAP_START {
        add_e820(&mut params, HIMEM_START, mem_size - HIMEM_START)?;
    } else {
        add_e820(&mut params, HIMEM_START, MMIO_GAP_START - HIMEM_START)?;
        add_e820(&mut params, MMIO_GAP_END, mem_size - MMIO_GAP_START)?;
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_low_and_high_ram() {
        let p = build(128 << 20, 100, Some((0x700_0000, 0x10000))).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 100);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x10000);
        assert_eq!({ p.e820_entries }, 2);
        let e = p.e820_table;
        assert_eq!(({ e[0].addr }, { e[0].size }), (0, EBDA_START));
        assert_eq!(
            ({ e[1].addr }, { e[1].size }),
            (HIMEM_START, (128 << 20) - HIMEM_START)
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let p = build(4 << 30, 0, None).unwrap();
        assert_eq!({ p.e820_entries }, 3);
        let e = p.e820_table;
        assert_eq!({ e[1].addr } + { e[1].size }, MMIO_GAP_START);
        assert_eq!({ e[2].addr }, 1 << 32);
        assert_eq!({ e[2].size }, (4 << 30) - MMIO_GAP_START);
        assert_eq!({ p.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn rejects_tiny_memory_and_unreachable_initrd() {
        assert!(matches!(
            build(0x1000, 0, None),
            Err(BootParamsError::MemoryTooSmall(0x1000))
        ));
        assert!(matches!(
            build(8 << 30, 0, Some((5 << 30, 0x1000))),
            Err(BootParamsError::InitrdOutOfRange { .. })
        ));
    }
}
