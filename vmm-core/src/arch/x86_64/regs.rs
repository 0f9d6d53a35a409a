//! Registers of the boot vCPU for the Linux 64-bit boot protocol: long mode,
//! identity-mapped paging, `rsi` pointing at the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Number of page directories: 4 x 1 GiB = the whole 32-bit space, so that
/// early code (and the bare-metal test guest) can reach the MMIO gap.
const PDE_PAGES: u64 = 4;

/// Failure to write boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
#[error("writing {what} to guest memory: {source}")]
pub struct BootWriteError {
    what: &'static str,
    #[source]
    source: vm_memory::GuestMemoryError,
}

fn write<M: GuestMemory, T: vm_memory::ByteValued>(
    mem: &M,
    what: &'static str,
    value: T,
    addr: u64,
) -> Result<(), BootWriteError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|source| BootWriteError { what, source })
}

/// General registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// x87/SSE state the kernel expects at boot.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the GDT, IDT and identity-mapped page tables into guest memory.
pub fn write_boot_tables<M: GuestMemory>(mem: &M) -> Result<(), BootWriteError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write(mem, "GDT", *entry, BOOT_GDT_START + i as u64 * 8)?;
    }
    write(mem, "IDT", 0u64, BOOT_IDT_START)?;

    // PML4[0] -> PDPT; PDPT[i] -> page directory i; each PD maps 1 GiB with
    // 2 MiB pages (present | writable | page size).
    write(mem, "PML4", PDPTE_START | 0x03, PML4_START)?;
    for pd in 0..PDE_PAGES {
        let pd_addr = PDE_START + pd * 0x1000;
        write(mem, "PDPT", pd_addr | 0x03, PDPTE_START + pd * 8)?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            write(mem, "page directory", phys | 0x83, pd_addr + i * 8)?;
        }
    }
    Ok(())
}

/// Special registers for long mode with the boot GDT and page tables.
pub fn configure_sregs(sregs: &mut kvm_sregs) {
    let code = kvm_segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
    let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = mem();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for pd in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + pd * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + pd * 0x1000) | 3);
        }
        // The last 2 MiB page maps 4 GiB - 2 MiB.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
    }

    #[test]
    fn gdt_lands_in_memory() {
        let mem = mem();
        write_boot_tables(&mem).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, BOOT_GDT[1]);
    }

    #[test]
    fn sregs_enter_long_mode_with_paging() {
        let mut sregs = kvm_sregs::default();
        configure_sregs(&mut sregs);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.ss.selector, 0x10);
    }

    #[test]
    fn boot_regs_point_at_zero_page() {
        let regs = boot_regs(0x100_0000);
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 2);
    }

    #[test]
    fn tables_outside_memory_are_an_error() {
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(write_boot_tables(&small).is_err());
    }
}
