//! Arrow's VMM library: a KVM microVM with a 64-bit Linux boot, legacy serial
//! and i8042 devices, and virtio-mmio devices served from one event loop.
//!
//! It knows nothing of OCI or Kubernetes; the `arrow-vmm` binary and the shim
//! build on it.

pub mod arch;
pub mod cancel;
pub mod cmdline;
pub mod confinement;
pub mod devices;
pub mod exit;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod hypervisor;
pub mod initramfs;
pub mod launch;
pub mod loader;
pub mod snapshot;
pub mod template;
pub mod test_guest;
pub mod vcpu;
pub mod virtio;
pub mod vm;
