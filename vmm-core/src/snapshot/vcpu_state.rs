//! A vCPU's architectural state, as KVM exposes it, and how to read it from
//! and write it back to a vCPU fd.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Everything needed to resume a vCPU where it stopped.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given (restored first: it decides which MSRs
    /// and XSAVE features exist).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM would read back.
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (the legacy region when the guest has no XSAVE).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
}

/// A KVM call on a vCPU that failed while saving or restoring it.
#[derive(Debug, thiserror::Error)]
#[error("vCPU state: {what}: {source}")]
pub struct VcpuStateError {
    what: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError { what, source }
}

/// Reads the MSRs in `index_list` that this vCPU supports. KVM stops at the
/// first MSR it cannot read; that one is skipped and reading goes on.
fn read_msrs(fd: &VcpuFd, index_list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(index_list.len());
    let mut rest: &[u32] = index_list;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError {
            what: "too many MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("get MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        rest = &rest[(read + 1).min(rest.len())..];
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread is parked
    /// outside `KVM_RUN`).
    pub fn save(
        fd: &VcpuFd,
        cpuid: &CpuId,
        msr_index_list: &[u32],
    ) -> Result<Self, VcpuStateError> {
        Ok(Self {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state: fd.get_mp_state().map_err(kvm("get MP state"))?,
            regs: fd.get_regs().map_err(kvm("get registers"))?,
            sregs: fd.get_sregs().map_err(kvm("get special registers"))?,
            xsave: fd.get_xsave().map_err(kvm("get XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("get XCRs"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("get debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm("get LAPIC"))?,
            msrs: read_msrs(fd, msr_index_list)?,
            vcpu_events: fd.get_vcpu_events().map_err(kvm("get vCPU events"))?,
        })
    }

    /// Writes the state into a freshly created vCPU, in the order KVM needs:
    /// CPUID first, the LAPIC after the special registers (which hold the
    /// APIC base), MSRs and pending events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError {
            what: "CPUID has too many entries",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm("set registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set special registers"))?;
        // SAFETY: `xsave` is a complete kvm_xsave read by KVM_GET_XSAVE on a
        // vCPU with the same CPUID, so it is the size KVM_SET_XSAVE expects.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set XCRs"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("set debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("set LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| VcpuStateError {
            what: "too many MSRs",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if set != self.msrs.len() {
            return Err(VcpuStateError {
                what: "KVM refused an MSR",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("set vCPU events"))?;
        Ok(())
    }
}
