//! Per-vCPU CPUID: KVM's supported set, with the topology fields every vCPU
//! needs to tell itself apart, and, on emulating hosts, the features the
//! instruction emulator cannot execute hidden from the guest kernel.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX bits.
mod leaf1_ecx {
    pub const CX16: u32 = 13;
    pub const PCID: u32 = 17;
    pub const POPCNT: u32 = 23;
    pub const XSAVE: u32 = 26;
    pub const OSXSAVE: u32 = 27;
    pub const AVX: u32 = 28;
    pub const RDRAND: u32 = 30;
    pub const HYPERVISOR: u32 = 31;
}
const LEAF1_EDX_HTT: u32 = 28;

/// Leaf 7 subleaf 0 EBX bits the emulator cannot run (or that enable
/// instructions it cannot run): FSGSBASE, AVX2, SMEP, ERMS, INVPCID, AVX-512
/// (F, DQ, IFMA, PF, ER, CD, BW, VL), RDSEED, ADX is fine, SMAP, CLFLUSHOPT,
/// CLWB.
const LEAF7_EBX_EMULATOR_UNSAFE: u32 = (1 << 0)
    | (1 << 5)
    | (1 << 7)
    | (1 << 9)
    | (1 << 10)
    | (1 << 16)
    | (1 << 17)
    | (1 << 18)
    | (1 << 20)
    | (1 << 21)
    | (1 << 23)
    | (1 << 24)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7 ECX: AVX-512 VBMI/VBMI2/VNNI/BITALG/VPOPCNTDQ, VAES, VPCLMULQDQ,
/// GFNI (VEX/EVEX encoded), RDPID.
const LEAF7_ECX_EMULATOR_UNSAFE: u32 = (1 << 1)
    | (1 << 6)
    | (1 << 8)
    | (1 << 9)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 14)
    | (1 << 22);
/// Leaf 7 EDX: AVX-512 4VNNIW/4FMAPS, FSRM, VP2INTERSECT.
const LEAF7_EDX_EMULATOR_UNSAFE: u32 = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 8);
/// Leaf 7 subleaf 1 EAX: AVX-VNNI, AVX512_BF16.
const LEAF7_1_EAX_EMULATOR_UNSAFE: u32 = (1 << 4) | (1 << 5);
/// Leaf 0xd subleaf 1 EAX: XSAVEOPT, XSAVEC, XGETBV1, XSAVES.
const LEAFD_1_EAX_XSAVE_VARIANTS: u32 = 0xf;

fn clear(reg: &mut u32, bits: u32) {
    *reg &= !bits;
}

/// Fills in what identifies vCPU `cpu_index` of `vcpu_count`: its APIC ID in
/// leaves 1, 0xb and 0x1f, the logical processor count, and the hypervisor
/// bit.
pub fn set_topology(entries: &mut [kvm_cpuid_entry2], cpu_index: u8, vcpu_count: u8) {
    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_index) << 24)
                    | (u32::from(vcpu_count) << 16);
                if vcpu_count > 1 {
                    entry.edx |= 1 << LEAF1_EDX_HTT;
                }
                entry.ecx |= 1 << leaf1_ecx::HYPERVISOR;
            }
            0xb | 0x1f => {
                // Level 0 (SMT): one thread per core. Level 1 (core): every
                // vCPU a core of one package. Higher levels are invalid.
                let (eax, ebx, ecx) = match entry.index {
                    0 => (0, 1, 1 << 8),
                    1 => (
                        u32::from(vcpu_count).next_power_of_two().trailing_zeros(),
                        u32::from(vcpu_count),
                        1 | (2 << 8),
                    ),
                    n => (0, 0, n),
                };
                entry.eax = eax;
                entry.ebx = ebx;
                entry.ecx = ecx;
                entry.edx = u32::from(cpu_index);
            }
            _ => {}
        }
    }
}

/// Hides the CPU features that a software-emulated guest kernel must not use
/// (see HOST-KVM.md: the emulator cannot execute XSAVE/XRSTOR, POPCNT,
/// CLAC/STAC, RDRAND/RDSEED and friends; CMPXCHG16B, which SLUB uses when
/// CX16 is advertised, fails with a KVM internal error in `mm_init`). Equivalent to the guest command
/// line's `noxsave clearcpuid=…`, but it also keeps guest user space from
/// assuming features whose kernel support is off.
pub fn mask_for_instruction_emulation(entries: &mut [kvm_cpuid_entry2]) {
    use leaf1_ecx::*;
    for entry in entries.iter_mut() {
        match (entry.function, entry.index) {
            (0x1, _) => clear(
                &mut entry.ecx,
                (1 << CX16)
                    | (1 << PCID)
                    | (1 << POPCNT)
                    | (1 << XSAVE)
                    | (1 << OSXSAVE)
                    | (1 << AVX)
                    | (1 << RDRAND),
            ),
            (0x7, 0) => {
                clear(&mut entry.ebx, LEAF7_EBX_EMULATOR_UNSAFE);
                clear(&mut entry.ecx, LEAF7_ECX_EMULATOR_UNSAFE);
                clear(&mut entry.edx, LEAF7_EDX_EMULATOR_UNSAFE);
            }
            (0x7, 1) => clear(&mut entry.eax, LEAF7_1_EAX_EMULATOR_UNSAFE),
            (0xd, 1) => clear(&mut entry.eax, LEAFD_1_EAX_XSAVE_VARIANTS),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_follow_the_vcpu_index() {
        let mut entries = vec![entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        set_topology(&mut entries, 3, 4);
        assert_eq!(entries[0].ebx >> 24, 3);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(entries[1].edx, 3);
        assert_eq!(entries[2].eax, 2);
        assert_eq!(entries[2].ebx, 4);
        assert_eq!(entries[3].ebx, 0, "levels past core are invalid");
    }

    #[test]
    fn emulation_mask_hides_xsave_popcnt_smap() {
        let mut entries = vec![
            entry(1, 0),
            entry(7, 0),
            entry(0xd, 1),
            entry(0x8000_0001, 0),
        ];
        mask_for_instruction_emulation(&mut entries);
        assert_eq!(entries[0].ecx & (1 << 26), 0, "xsave");
        assert_eq!(entries[0].ecx & (1 << 23), 0, "popcnt");
        assert_eq!(entries[0].ecx & (1 << 13), 0, "cx16");
        assert_eq!(entries[1].ebx & (1 << 20), 0, "smap");
        assert_eq!(entries[1].ebx & (1 << 18), 0, "rdseed");
        assert_eq!(entries[1].edx & (1 << 4), 0, "fsrm");
        assert_eq!(entries[2].eax & 0xf, 0, "xsave variants");
        assert_eq!(entries[3].ecx, u32::MAX, "other leaves untouched");
        assert_ne!(entries[0].ecx & 1, 0, "sse3 kept");
    }
}
