//! Which KVM this host has, and what a guest needs because of it.
//!
//! Hardware KVM (`kvm_intel`, `kvm_amd`) runs a guest kernel natively.
//! `kvm_pvm` (software nested virtualisation by shadow paging) runs guest
//! user code natively but emulates guest kernel code instruction by
//! instruction, which cannot execute several instruction families; the guest
//! must be told not to use them (HOST-KVM.md).

use std::fmt;
use std::path::Path;

/// The KVM implementation behind `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavour {
    /// Hardware-assisted KVM: `kvm_intel` or `kvm_amd`.
    Hardware(&'static str),
    /// `kvm_pvm`: guest kernel code is emulated.
    Pvm,
    /// `/dev/kvm` works but no known module is loaded (e.g. built in).
    Unknown,
}

impl KvmFlavour {
    /// Detects the flavour from the loaded kernel modules.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Detects the flavour from a sysfs module directory (for tests).
    pub fn detect_in(sys_module: &Path) -> Self {
        if sys_module.join("kvm_pvm").exists() {
            KvmFlavour::Pvm
        } else if sys_module.join("kvm_intel").exists() {
            KvmFlavour::Hardware("kvm_intel")
        } else if sys_module.join("kvm_amd").exists() {
            KvmFlavour::Hardware("kvm_amd")
        } else {
            KvmFlavour::Unknown
        }
    }

    /// Whether guest kernel code is emulated, so CPUID must hide what the
    /// emulator cannot run.
    pub fn emulates_guest_kernel(self) -> bool {
        self == KvmFlavour::Pvm
    }

    /// Kernel command-line settings this flavour needs, beyond Arrow's base,
    /// for a guest with `vcpus` vCPUs.
    pub fn kernel_args(self, vcpus: u8) -> Vec<&'static str> {
        match self {
            KvmFlavour::Pvm => {
                let mut args = vec![
                    // Belt and braces with the CPUID mask; both were measured
                    // (hack/kernel/README.md). The kernel copies clearcpuid's
                    // value into 128 bytes: keep it short, `noxsave` covers
                    // the XSAVE family.
                    "noxsave",
                    "clearcpuid=popcnt,smap,smep,rdrand,rdseed,fsgsbase,invpcid,pcid,rdpid,clflushopt,clwb,erms,fsrm,cx16",
                    // Every page-attribute change and every timer check is
                    // emulated: skip what costs seconds and buys nothing here.
                    "rodata=off",
                    "mitigations=off",
                    "tsc=reliable",
                    "no_timer_check",
                ];
                if vcpus == 1 {
                    // Patching out 6144 LOCK prefixes one by one costs 2.8 s.
                    args.push("noreplace-smp");
                }
                args
            }
            KvmFlavour::Hardware(_) | KvmFlavour::Unknown => Vec::new(),
        }
    }
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvmFlavour::Hardware(module) => write!(f, "hardware KVM ({module})"),
            KvmFlavour::Pvm => write!(f, "kvm_pvm (software nested KVM, guest kernel emulated)"),
            KvmFlavour::Unknown => write!(f, "KVM (unknown flavour, treated as hardware)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_from_module_directories() {
        let dir = std::env::temp_dir().join(format!("arrow-flavour-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Unknown);
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Hardware("kvm_amd"));
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&dir), KvmFlavour::Pvm);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_pvm_needs_extra_kernel_args() {
        assert!(KvmFlavour::Pvm.kernel_args(1).contains(&"noxsave"));
        assert!(KvmFlavour::Pvm.kernel_args(1).contains(&"noreplace-smp"));
        assert!(!KvmFlavour::Pvm.kernel_args(2).contains(&"noreplace-smp"));
        assert!(KvmFlavour::Hardware("kvm_intel").kernel_args(1).is_empty());
        let clear = KvmFlavour::Pvm
            .kernel_args(1)
            .into_iter()
            .find(|a| a.starts_with("clearcpuid="))
            .unwrap();
        assert!(
            clear.len() - "clearcpuid=".len() < 128,
            "the kernel's buffer is 128 bytes"
        );
        assert!(KvmFlavour::Pvm.emulates_guest_kernel());
        assert!(!KvmFlavour::Unknown.emulates_guest_kernel());
    }
}
