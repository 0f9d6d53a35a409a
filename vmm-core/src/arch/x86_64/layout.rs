//! Guest physical memory layout.
//!
//! Low memory holds the boot structures (as in Firecracker); the kernel goes
//! at its ELF physical address above 1 MiB; the initramfs at the top of RAM
//! below the MMIO gap; virtio-mmio devices live in the gap below 4 GiB.

/// GDT used while entering 64-bit mode.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT; the kernel installs its own immediately.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table; PDPT and page directories follow it.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories identity-mapping 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line the x86 kernel accepts (`COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table is written here and
/// RAM in the e820 map stops here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap; RAM above it is relocated past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Size of the MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of each virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device; later devices take the next ones.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest GSI the IOAPIC routes (24 pins).
pub const IRQ_MAX: u32 = 23;
/// Port and GSI of the 16550 console (COM1).
pub const SERIAL_PORT: u64 = 0x3f8;
/// GSI of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// Ports of the i8042 controller (0x60..=0x64).
pub const I8042_PORT: u64 = 0x60;
/// KVM needs three pages for the TSS below 4 GiB, outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Local APIC base address.
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IO_APIC_DEFAULT_PHYS_BASE: u32 = 0xfec0_0000;

// The boot structures must not overlap; checked at compile time.
const _: () = {
    assert!(BOOT_IDT_START >= BOOT_GDT_START + 4 * 8);
    assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(ZERO_PAGE_START + 0x1000 <= PML4_START);
};

/// The guest RAM regions, as (start, size), for `mem_size` bytes of RAM:
/// below the MMIO gap, and whatever does not fit there above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// Guest address and GSI of the `index`th virtio-mmio device.
pub fn virtio_mmio_slot(index: u32) -> Option<(u64, u32)> {
    let gsi = VIRTIO_IRQ_BASE.checked_add(index)?;
    (gsi <= IRQ_MAX).then(|| (VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE, gsi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_fit_below_the_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_guests_are_split_around_the_gap() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions[0], (0, MMIO_GAP_START));
        assert_eq!(regions[1], (1 << 32, (4 << 30) - MMIO_GAP_START));
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn virtio_slots_stop_at_the_last_ioapic_pin() {
        assert_eq!(virtio_mmio_slot(0), Some((0xd000_0000, 5)));
        assert_eq!(virtio_mmio_slot(1), Some((0xd000_1000, 6)));
        assert_eq!(virtio_mmio_slot(18), Some((0xd001_2000, 23)));
        assert_eq!(virtio_mmio_slot(19), None);
    }
}
