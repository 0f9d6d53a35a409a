//! Shared set-up for Arrow's end-to-end tests: where the built binaries, the
//! guest kernel and the test root tree are, and a lock so guest boots do not
//! run concurrently (on emulating hosts they only slow each other down).

pub mod arrow_cri;
pub mod containerd;
pub mod cri;
pub mod netns;
pub mod portforward;
pub mod streaming;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("integration/ lives in the workspace")
        .to_path_buf()
}

fn env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

fn cache_dir() -> PathBuf {
    env_or("ARROW_CACHE", PathBuf::from("/var/cache/arrow"))
}

fn must_exist(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} not found at {}: run hack/test.sh (it builds everything the end-to-end tests need)",
        path.display()
    );
    path
}

/// Where `hack/build.sh` stages the binaries (`$ARROW_BIN_DIR`).
pub fn bin_dir() -> PathBuf {
    env_or("ARROW_BIN_DIR", workspace_root().join("target/arrow"))
}

/// `arrow-vmm`, as staged by `hack/build.sh`.
pub fn arrow_vmm() -> PathBuf {
    must_exist(bin_dir().join("arrow-vmm"), "arrow-vmm")
}

/// The operator's `arrow` command, as staged by `hack/build.sh`.
pub fn arrow_cli() -> PathBuf {
    must_exist(bin_dir().join("arrow"), "arrow")
}

/// The guest kernel built by `hack/build-kernel.sh`.
pub fn kernel() -> PathBuf {
    must_exist(
        env_or("ARROW_KERNEL", cache_dir().join("kernel/vmlinux")),
        "the guest kernel",
    )
}

/// The busybox root tree made by `hack/mkrootfs-busybox.sh`.
pub fn busybox_rootfs() -> PathBuf {
    must_exist(
        env_or("ARROW_ROOTFS", cache_dir().join("rootfs/busybox")),
        "the busybox root tree",
    )
}

/// How many pod cycles a leak test runs: `default`, or
/// `$ARROW_E2E_POD_CYCLES` (e.g. 50 for a soak). A leak shows after one
/// cycle (each test compares exact counts before and after); on an emulated
/// guest kernel a cycle costs 10-15 s, so CI runs a few.
pub fn pod_cycles(default: usize) -> usize {
    std::env::var("ARROW_E2E_POD_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// Serialises tests that boot guests.
pub fn boot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// An `arrow-vmm run` command with the test kernel and root tree.
pub fn arrow_run(extra: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(arrow_vmm());
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel())
        .arg("--rootfs")
        .arg(busybox_rootfs())
        .args(extra)
        .arg("--")
        .args(command);
    cmd
}

/// Whether `/dev/kvm` is hardware KVM (not `kvm_pvm`).
pub fn hardware_kvm() -> bool {
    !Path::new("/sys/module/kvm_pvm").exists()
}

/// Leftovers an `arrow-vmm` with this pid would have made.
pub fn leftovers_of(pid: u32) -> Vec<PathBuf> {
    let name = format!("arrow-vmm-{pid}");
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    [base.join(&name)]
        .into_iter()
        .filter(|p| p.exists())
        .collect()
}
