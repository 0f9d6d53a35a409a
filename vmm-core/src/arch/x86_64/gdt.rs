//! The boot GDT: flat 64-bit code and data segments and a TSS descriptor.

use kvm_bindings::kvm_segment;

/// Packs a GDT entry from flags (the access byte and the G/D/L bits as in
/// Firecracker's notation, e.g. `0xa09b`), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Selector index of the code segment in [`BOOT_GDT`].
pub const CODE_INDEX: u8 = 1;
/// Selector index of the data segment.
pub const DATA_INDEX: u8 = 2;
/// Selector index of the TSS.
pub const TSS_INDEX: u8 = 3;

/// The `kvm_segment` KVM expects for GDT entry `index` holding `entry`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let flag = |shift: u32, mask: u64| ((entry >> shift) & mask) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: {
            let raw = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
            // With the granularity bit the limit counts 4 KiB pages.
            if flag(55, 1) == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: u16::from(index) * 8,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 0x3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: flag(55, 1),
        avl: flag(52, 1),
        padding: 0,
        unusable: u8::from(flag(47, 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_present_ring0() {
        let seg = kvm_segment_from_gdt(BOOT_GDT[1], CODE_INDEX);
        assert_eq!(seg.selector, 8);
        assert_eq!(seg.l, 1);
        assert_eq!(seg.db, 0);
        assert_eq!(seg.present, 1);
        assert_eq!(seg.dpl, 0);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.base, 0);
    }

    #[test]
    fn entry_round_trips_base_and_limit() {
        let entry = gdt_entry(0x808b, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(entry, TSS_INDEX);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.g, 1);
        assert_eq!(seg.limit, 0xabcd_efff);
        assert_eq!(seg.selector, 0x18);
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn null_entry_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(BOOT_GDT[0], 0).unusable, 1);
    }
}
