//! x86_64 boot: memory layout, boot parameters, page tables and GDT, CPUID,
//! MSRs, the local APIC and the MP table.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
