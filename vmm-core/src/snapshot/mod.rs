//! VM snapshots: the saved state of a paused VM (`vmstate`) and its RAM
//! (`memory`), which a new VMM process maps copy-on-write to start a clone.
//!
//! `vmstate` is versioned and checksummed; a snapshot from another format
//! version, another host CPU or another KVM flavour, or one that is
//! truncated or corrupt, is refused with an error that says which.

pub mod memory;
pub mod vcpu_state;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use crate::devices::serial::SerialSnapshot;
use crate::virtio::fs::VirtioFsState;
use crate::virtio::net::VirtioNetState;
use crate::virtio::persist::MmioTransportState;
use crate::virtio::vsock::persist::VsockState;
use vcpu_state::VcpuState;

/// First bytes of a `vmstate` file.
pub const MAGIC: &[u8; 8] = b"ARROWSNP";
/// Bumped whenever the saved state's layout changes.
/// 2: the virtio-fs device.
/// 3: the virtio-net device.
pub const FORMAT_VERSION: u32 = 3;
/// Name of the state file inside a snapshot directory.
pub const VMSTATE_FILE: &str = "vmstate";
/// Name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Errors reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not a snapshot at all.
    #[error("{0}: not an Arrow snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// Written by another format version.
    #[error(
        "{path}: snapshot format version {found}, this arrow-vmm reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    /// Shorter than its header says.
    #[error("{0}: snapshot is truncated")]
    Truncated(PathBuf),
    /// The checksum does not match.
    #[error("{0}: snapshot is corrupt (checksum mismatch)")]
    Checksum(PathBuf),
    /// The state does not decode.
    #[error("{path}: snapshot state does not decode: {source}")]
    Decode {
        path: PathBuf,
        #[source]
        source: postcard::Error,
    },
    /// The state does not encode.
    #[error("encoding snapshot state: {0}")]
    Encode(#[source] postcard::Error),
    /// Taken on a host this one cannot restore.
    #[error("snapshot was taken on {taken}, this host is {here}: it cannot be restored here")]
    Host { taken: String, here: String },
    /// The memory file does not match the state.
    #[error("{path}: memory file is {found} bytes, the snapshot needs {expected}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
}

/// What a snapshot can only be restored on: the same CPU model and the same
/// KVM flavour (CPUID, MSRs and XSAVE layout must be valid on the host).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSignature {
    /// CPUID vendor string.
    pub cpu_vendor: String,
    /// CPUID leaf 1 EAX: family, model, stepping.
    pub cpu_signature: u32,
    /// The KVM flavour, as displayed.
    pub flavour: String,
}

impl HostSignature {
    /// This host's signature.
    pub fn current(flavour: crate::hypervisor::KvmFlavour) -> Self {
        let leaf0 = std::arch::x86_64::__cpuid(0);
        let leaf1 = std::arch::x86_64::__cpuid(1);
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        Self {
            cpu_vendor: String::from_utf8_lossy(&vendor).into_owned(),
            cpu_signature: leaf1.eax,
            flavour: flavour.to_string(),
        }
    }
}

impl std::fmt::Display for HostSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPU {:#x} on {}",
            self.cpu_vendor, self.cpu_signature, self.flavour
        )
    }
}

/// The shape a VM had: what a clone gets without booting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    pub vcpus: u8,
    pub memory_bytes: u64,
    /// The command line the template booted with.
    pub cmdline: String,
}

/// The VM-wide in-kernel state: PIC, IOAPIC, PIT and kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    /// PIC master, PIC slave, IOAPIC (KVM chip ids 0, 1, 2).
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The virtio-vsock device and its transport.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VsockSnapshot {
    pub transport: MmioTransportState,
    pub device: VsockState,
}

/// The virtio-fs device and its transport. The shared directory is not
/// part of it: each clone attaches its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FsSnapshot {
    pub transport: MmioTransportState,
    pub device: VirtioFsState,
}

/// The virtio-net device and its transport. The tap is not part of it:
/// each clone attaches its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetSnapshot {
    pub transport: MmioTransportState,
    pub device: VirtioNetState,
}

/// Everything in `vmstate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub host: HostSignature,
    pub shape: VmShape,
    pub vm: KvmVmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub vsock: Option<VsockSnapshot>,
    pub fs: Option<FsSnapshot>,
    pub net: Option<NetSnapshot>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// Encodes the state with its header: magic, format version, payload length
/// and CRC-32 of the payload.
pub fn encode(state: &VmSnapshot) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_stdvec(state).map_err(SnapshotError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and checks a `vmstate` file's bytes (`path` is for messages).
pub fn decode(bytes: &[u8], path: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path_buf = || path.to_path_buf();
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path_buf()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated(path_buf()));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path_buf(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    let payload = &bytes[HEADER_LEN..];
    if (payload.len() as u64) < len {
        return Err(SnapshotError::Truncated(path_buf()));
    }
    let payload = &payload[..len as usize];
    if crc32fast::hash(payload) != word(20) {
        return Err(SnapshotError::Checksum(path_buf()));
    }
    postcard::from_bytes(payload).map_err(|source| SnapshotError::Decode {
        path: path_buf(),
        source,
    })
}

/// Creates a snapshot directory (and any missing parent) accessible to this
/// user only. The modes are explicit because the process umask cannot be
/// trusted: the virtio-fs passthrough clears it.
pub fn create_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Creates (or truncates) a snapshot file readable and writable by this
/// user only; see [`create_dir`] for why the mode is explicit.
pub(crate) fn create_file(path: &Path) -> Result<File, SnapshotError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
}

/// Writes `vmstate` into `dir` (atomically: a reader never sees half a file).
pub fn write_state(dir: &Path, state: &VmSnapshot) -> Result<(), SnapshotError> {
    let bytes = encode(state)?;
    let path = dir.join(VMSTATE_FILE);
    let tmp = dir.join(format!("{VMSTATE_FILE}.tmp"));
    let mut file = create_file(&tmp)?;
    file.write_all(&bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads and checks `dir/vmstate`, and that the host can restore it.
pub fn read_state(dir: &Path, host: &HostSignature) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(VMSTATE_FILE);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(&path))?;
    let state = decode(&bytes, &path)?;
    if &state.host != host {
        return Err(SnapshotError::Host {
            taken: state.host.to_string(),
            here: host.to_string(),
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::KvmFlavour;

    fn sample() -> VmSnapshot {
        VmSnapshot {
            host: HostSignature::current(KvmFlavour::Pvm),
            shape: VmShape {
                vcpus: 1,
                memory_bytes: 64 << 20,
                cmdline: "console=ttyS0".into(),
            },
            vm: KvmVmState {
                irqchips: vec![kvm_irqchip::default(); 3],
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data::default(),
            },
            vcpus: vec![VcpuState {
                cpuid: vec![Default::default(); 2],
                msrs: vec![Default::default(); 3],
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                debugregs: Default::default(),
                lapic: Default::default(),
                mp_state: Default::default(),
                vcpu_events: Default::default(),
            }],
            serial: SerialSnapshot::default(),
            vsock: None,
            fs: None,
            net: None,
        }
    }

    fn path() -> &'static Path {
        Path::new("vmstate")
    }

    #[test]
    fn round_trip() {
        let mut snap = sample();
        snap.vcpus[0].regs.rip = 0xffff_ffff_8100_0000;
        let bytes = encode(&snap).unwrap();
        let back = decode(&bytes, path()).unwrap();
        assert_eq!(back.shape, snap.shape);
        assert_eq!(back.host, snap.host);
        assert_eq!(back.vcpus[0].regs.rip, 0xffff_ffff_8100_0000);
        assert_eq!(back.vcpus[0].msrs.len(), 3);
    }

    #[test]
    fn other_versions_are_refused() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8] = 99;
        assert!(matches!(
            decode(&bytes, path()),
            Err(SnapshotError::Version { found: 99, .. })
        ));
    }

    #[test]
    fn truncated_and_corrupt_files_are_refused() {
        let bytes = encode(&sample()).unwrap();
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1], path()),
            Err(SnapshotError::Truncated(_))
        ));
        assert!(matches!(
            decode(&bytes[..10], path()),
            Err(SnapshotError::Truncated(_))
        ));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            decode(&flipped, path()),
            Err(SnapshotError::Checksum(_))
        ));
        assert!(matches!(
            decode(b"not a snapshot", path()),
            Err(SnapshotError::BadMagic(_))
        ));
    }

    #[test]
    fn snapshots_from_another_host_are_refused() {
        let dir = std::env::temp_dir().join(format!("arrow-snapstate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut snap = sample();
        snap.host.cpu_signature ^= 1;
        write_state(&dir, &snap).unwrap();
        let here = HostSignature::current(KvmFlavour::Pvm);
        let err = read_state(&dir, &here).unwrap_err();
        assert!(matches!(err, SnapshotError::Host { .. }), "{err}");
        snap.host = here.clone();
        write_state(&dir, &snap).unwrap();
        assert!(read_state(&dir, &here).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The same CPU under the other KVM flavour cannot restore a snapshot:
    /// kvm_pvm's CPUID is masked and its XSAVE state legacy-only, while
    /// hardware KVM's has AVX and friends on, so each refuses the other's.
    #[test]
    fn snapshots_from_the_other_kvm_flavour_are_refused() {
        let dir = std::env::temp_dir().join(format!("arrow-snapflavour-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pvm = HostSignature::current(KvmFlavour::Pvm);
        let amd = HostSignature::current(KvmFlavour::Hardware("kvm_amd"));
        for (taken, here) in [(&pvm, &amd), (&amd, &pvm)] {
            let mut snap = sample();
            snap.host = taken.clone();
            write_state(&dir, &snap).unwrap();
            match read_state(&dir, here) {
                Err(SnapshotError::Host { taken: t, here: h }) => {
                    assert_eq!(t, taken.to_string());
                    assert_eq!(h, here.to_string());
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert!(read_state(&dir, taken).is_ok());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
