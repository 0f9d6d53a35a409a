//! The Intel MultiProcessor table, so a guest without ACPI finds every vCPU,
//! the IOAPIC and how ISA interrupts are routed.
//!
//! The table is serialised field by field (little endian) rather than by
//! casting packed structs, so the layout is explicit and needs no `unsafe`.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{APIC_DEFAULT_PHYS_BASE, EBDA_START, IO_APIC_DEFAULT_PHYS_BASE, IRQ_MAX};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPC_SPEC: u8 = 4;
const MPC_OEM: &[u8; 8] = b"ARROW   ";
const MPC_PRODUCT_ID: &[u8; 12] = b"MICROVM     ";
const BUS_TYPE_ISA: &[u8; 6] = b"ISA   ";

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;
/// Family 6 stepping, as Firecracker reports.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Polarity and trigger "conforms to bus": edge, active high for ISA.
const MP_IRQFLAG_DEFAULT: u16 = 0;

/// Most vCPUs Arrow gives a guest: the table must fit in the 1 KiB between
/// the EBDA start and 640 KiB (32 vCPUs take 924 bytes).
pub const MAX_VCPUS: u8 = 32;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Zero or too many vCPUs.
    #[error("the MP table cannot describe {0} vCPUs (1..={MAX_VCPUS})")]
    VcpuCount(u8),
    /// The table does not fit below 640 KiB.
    #[error("the MP table ({0} bytes) does not fit in the EBDA")]
    TooLarge(usize),
    /// Guest memory rejected the write.
    #[error("writing the MP table to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer structure and configuration table as bytes,
/// meant to be placed at `base`.
pub fn build(base: u64, vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus + 1;

    // Entries of the configuration table.
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(BUS_TYPE_ISA);
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&IO_APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    for irq in 0..=IRQ_MAX as u8 {
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT]);
        entries.extend_from_slice(&MP_IRQFLAG_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, irq, ioapic_id, irq]);
    }
    for (irqtype, dest_apic, lint) in [(MP_IRQ_EXTINT, 0, 0), (MP_IRQ_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[MP_LINTSRC, irqtype]);
        entries.extend_from_slice(&MP_IRQFLAG_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[0, 0, dest_apic, lint]);
    }
    let entry_count = u16::from(vcpus) + 1 + 1 + (IRQ_MAX as u16 + 1) + 2;

    const MPF_LEN: usize = 16;
    const MPC_HEADER_LEN: usize = 44;
    let table_len = MPC_HEADER_LEN + entries.len();

    let mut mpc = Vec::with_capacity(table_len);
    mpc.extend_from_slice(MPC_SIGNATURE);
    mpc.extend_from_slice(&(table_len as u16).to_le_bytes());
    mpc.push(MPC_SPEC);
    mpc.push(0); // checksum, filled below
    mpc.extend_from_slice(MPC_OEM);
    mpc.extend_from_slice(MPC_PRODUCT_ID);
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&entry_count.to_le_bytes());
    mpc.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    mpc.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum, reserved
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut out = Vec::with_capacity(MPF_LEN + table_len);
    out.extend_from_slice(MPF_SIGNATURE);
    let physptr = u32::try_from(base + MPF_LEN as u64).map_err(|_| MptableError::TooLarge(0))?;
    out.extend_from_slice(&physptr.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(MPC_SPEC);
    out.push(0); // checksum
    out.extend_from_slice(&[0u8; 5]); // features: no default configuration
    out[10] = checksum(&out[..MPF_LEN]);
    out.extend_from_slice(&mpc);
    Ok(out)
}

/// Writes the MP table for `vcpus` vCPUs at the start of the EBDA.
pub fn setup_mptable<M: GuestMemory>(mem: &M, vcpus: u8) -> Result<(), MptableError> {
    let table = build(EBDA_START, vcpus)?;
    if EBDA_START + table.len() as u64 > 0xa0000 {
        return Err(MptableError::TooLarge(table.len()));
    }
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        let table = build(EBDA_START, 2).unwrap();
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let mpc = &table[16..];
        assert_eq!(&mpc[..4], b"PCMP");
        let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(sum(mpc), 0);
        let physptr = u32::from_le_bytes(table[4..8].try_into().unwrap());
        assert_eq!(u64::from(physptr), EBDA_START + 16);
    }

    #[test]
    fn one_processor_entry_per_vcpu_and_only_the_first_boots() {
        let table = build(EBDA_START, 3).unwrap();
        let entries = &table[16 + 44..];
        let count = u16::from_le_bytes([table[16 + 34], table[16 + 35]]);
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
        for cpu in 0..3 {
            let e = &entries[cpu * 20..cpu * 20 + 20];
            assert_eq!(e[0], MP_PROCESSOR);
            assert_eq!(e[1], cpu as u8);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
        }
        let ioapic = &entries[3 * 20 + 8..3 * 20 + 16];
        assert_eq!(ioapic[0], MP_IOAPIC);
        assert_eq!(ioapic[1], 4);
    }

    #[test]
    fn rejects_impossible_vcpu_counts() {
        assert!(matches!(
            build(EBDA_START, 0),
            Err(MptableError::VcpuCount(0))
        ));
        assert!(build(EBDA_START, MAX_VCPUS + 1).is_err());
    }

    #[test]
    fn largest_table_fits_in_the_ebda() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, MAX_VCPUS).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
