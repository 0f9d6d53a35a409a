//! The guest kernel command line: Arrow's base settings, what the host's KVM
//! flavour needs, the virtio-mmio devices, and the caller's own arguments, in
//! that order so the caller can override.

use crate::arch::x86_64::layout::{CMDLINE_MAX_SIZE, VIRTIO_MMIO_SIZE};
use crate::hypervisor::KvmFlavour;

/// Settings every Arrow guest boots with: the console on COM1, reboot via
/// the i8042 (which ends the VM), reboot at once on panic, no KASLR (the
/// template snapshot and the emulator both prefer a fixed layout), only
/// one legacy UART to probe, and kvm-clock as the clock.
///
/// kvm-clock because a clone's clocks must resume where the template's
/// stopped: the VMM restores kvm-clock (`KVM_SET_CLOCK`) on every flavour,
/// while a restored TSC is ignored by kvm_pvm. A guest on the TSC (which
/// Linux prefers when the TSC is invariant) saw every second the template
/// had spent on disk pass at once, and its kernel spent seconds of
/// emulated work catching up (timers, timekeeping) before a clone of an
/// hours-old template answered. The vDSO reads kvm-clock as it reads the
/// TSC, without a system call.
pub const BASE_ARGS: &[&str] = &[
    "console=ttyS0",
    "reboot=k",
    "panic=-1",
    "nokaslr",
    "8250.nr_uarts=1",
    "clocksource=kvm-clock",
];

/// Errors building a command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// An argument holds a character the kernel would split or choke on.
    #[error("kernel argument {0:?} contains whitespace, a quote or a NUL byte")]
    BadArgument(String),
    /// The whole line is longer than the kernel accepts.
    #[error("kernel command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    TooLong(usize),
}

/// A kernel command line under construction.
#[derive(Clone, Debug, Default)]
pub struct KernelCmdline {
    args: Vec<String>,
}

impl KernelCmdline {
    /// Starts from Arrow's base settings plus those `flavour` needs for a
    /// guest of `vcpus` vCPUs.
    pub fn for_flavour(flavour: KvmFlavour, vcpus: u8) -> Self {
        let mut line = Self::default();
        line.args.extend(BASE_ARGS.iter().map(|s| s.to_string()));
        line.args
            .extend(flavour.kernel_args(vcpus).iter().map(|s| s.to_string()));
        line
    }

    /// The arguments so far, in order.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Appends one argument (`key`, `key=value`).
    pub fn push(&mut self, arg: impl Into<String>) -> Result<(), CmdlineError> {
        let arg = arg.into();
        if arg.is_empty()
            || arg
                .chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\0')
        {
            return Err(CmdlineError::BadArgument(arg));
        }
        self.args.push(arg);
        Ok(())
    }

    /// Declares a virtio-mmio device for the kernel's command-line probe.
    pub fn push_virtio_mmio(&mut self, base: u64, gsi: u32) {
        self.args.push(format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_SIZE >> 10,
            base,
            gsi
        ));
    }

    /// The final line, checked against the kernel's length limit.
    pub fn build(&self) -> Result<String, CmdlineError> {
        let line = self.args.join(" ");
        if line.len() >= CMDLINE_MAX_SIZE {
            return Err(CmdlineError::TooLong(line.len()));
        }
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_flavour_devices_then_caller() {
        let mut line = KernelCmdline::for_flavour(KvmFlavour::Hardware("kvm_intel"), 1);
        line.push_virtio_mmio(0xd000_0000, 5);
        line.push("rdinit=/.arrow/init").unwrap();
        let s = line.build().unwrap();
        assert!(s.starts_with("console=ttyS0 reboot=k panic=-1"));
        assert!(s.contains(" virtio_mmio.device=4K@0xd0000000:5 rdinit=/.arrow/init"));
        assert!(!s.contains("noxsave"));
    }

    #[test]
    fn every_flavour_keeps_time_on_kvm_clock() {
        for flavour in [KvmFlavour::Pvm, KvmFlavour::Hardware("kvm_amd")] {
            let s = KernelCmdline::for_flavour(flavour, 2).build().unwrap();
            assert!(s.contains(" clocksource=kvm-clock"), "{s}");
        }
    }

    #[test]
    fn pvm_gets_its_workarounds() {
        let s = KernelCmdline::for_flavour(KvmFlavour::Pvm, 1)
            .build()
            .unwrap();
        assert!(s.contains("noxsave"));
        assert!(s.contains("clearcpuid="));
    }

    #[test]
    fn rejects_bad_arguments_and_overlong_lines() {
        let mut line = KernelCmdline::default();
        assert!(line.push("a b").is_err());
        assert!(line.push("").is_err());
        assert!(line.push("q\"").is_err());
        line.push("x".repeat(CMDLINE_MAX_SIZE)).unwrap();
        assert!(matches!(line.build(), Err(CmdlineError::TooLong(_))));
    }
}
