//! The VMM's least privilege: `arrow-vmm serve` parses everything a hostile
//! guest sends, so before any thread starts (capabilities and
//! `no_new_privs` are per thread, and threads inherit them) it keeps only
//! what the rest of its life needs.
//!
//! - Every descriptor it inherited is closed but stdio and the ones named
//!   on its command line (the tap).
//! - Its environment keeps only `ARROW_*` (where the kernel, arrow-init and
//!   the template cache are).
//! - `no_new_privs`: nothing it could ever exec gains privileges.
//! - Capabilities: the bounding, permitted and effective sets keep only
//!   [`KEPT_CAPABILITIES`], the inheritable and ambient sets are empty.
//!   virtio-fs passthrough serves each guest request with the guest's uid
//!   and gid (per-thread `setresuid`/`setresgid`) and keeps ownership,
//!   modes and times as the guest sets them; that is all they are for.
//!   Everything else goes, `CAP_SYS_ADMIN`, `CAP_NET_ADMIN`, `CAP_MKNOD`
//!   (the guest cannot create device nodes on the host), `CAP_SETFCAP`
//!   (nor file capabilities) and `CAP_DAC_READ_SEARCH` (nor
//!   `open_by_handle_at` anywhere on the filesystem) included.

use std::os::fd::RawFd;

use anyhow::Context;
use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities `arrow-vmm serve` keeps, each for virtio-fs:
/// `CAP_CHOWN` (files the guest creates or chowns get the guest's owner),
/// `CAP_DAC_OVERRIDE` (the share is root's; the guest's own permission
/// checks already ran in its kernel), `CAP_FOWNER` (chmod, utimes and
/// xattrs on files the serving uid does not own), `CAP_FSETID` (writes keep
/// set-id bits as the guest expects), `CAP_SETUID` and `CAP_SETGID` (serve
/// each request as the guest's uid and gid).
pub const KEPT_CAPABILITIES: [Capability; 6] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
];

/// The first step, before the jail: only the descriptors and variables
/// the VMM was given on purpose. `keep_fds` are the inherited descriptors
/// to keep besides stdio. Call it before any other thread exists.
pub fn shed_inheritance(keep_fds: &[RawFd]) -> anyhow::Result<()> {
    close_inherited_fds(keep_fds)?;
    clean_environment();
    Ok(())
}

/// The last step, in the jail: no core dumps (they would hold the guest's
/// memory), `no_new_privs` and only [`KEPT_CAPABILITIES`]. Call it before
/// any other thread exists.
pub fn drop_privileges() -> anyhow::Result<()> {
    crate::rlimit::forbid_core_dumps().context("setting RLIMIT_CORE to 0")?;
    set_no_new_privs()?;
    drop_capabilities(&KEPT_CAPABILITIES)
}

/// For the jail's keeper, which only waits and forwards signals.
pub fn drop_all_privileges() -> anyhow::Result<()> {
    set_no_new_privs()?;
    drop_capabilities(&[])
}

fn set_no_new_privs() -> anyhow::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only and
    // changes no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    Ok(())
}

/// Closes every descriptor above stderr that is not in `keep`.
fn close_inherited_fds(keep: &[RawFd]) -> anyhow::Result<()> {
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .context("listing /proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    // The listing's own descriptor is closed by now: closing it again just
    // fails with EBADF.
    for fd in open {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closes a descriptor no Rust object owns: this runs
            // before anything in this process opened one.
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

/// Drops every variable but `ARROW_*`.
fn clean_environment() {
    let drop: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| !k.to_string_lossy().starts_with("ARROW_"))
        .collect();
    for key in drop {
        // Single-threaded still (see `confine`).
        std::env::remove_var(key);
    }
}

fn drop_capabilities(keep: &[Capability]) -> anyhow::Result<()> {
    let permitted = caps::read(None, CapSet::Permitted).context("reading capabilities")?;
    if permitted.is_empty() {
        // Not root: nothing to drop.
        return Ok(());
    }
    let kept: CapsHashSet = keep
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    // Bounding first: dropping from it needs CAP_SETPCAP, which goes next.
    let bounding = caps::read(None, CapSet::Bounding).context("reading the bounding set")?;
    for cap in bounding.difference(&kept) {
        caps::drop(None, CapSet::Bounding, *cap)
            .with_context(|| format!("dropping {cap} from the bounding set"))?;
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient set")?;
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable set")?;
    caps::set(None, CapSet::Effective, &kept).context("setting the effective set")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting the permitted set")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `KEPT_CAPABILITIES` as the mask `/proc/<pid>/status` shows.
    fn kept_mask() -> u64 {
        KEPT_CAPABILITIES
            .iter()
            .fold(0, |mask, c| mask | (1u64 << c.index()))
    }

    #[test]
    fn the_kept_mask_is_the_documented_one() {
        // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, FSETID 4, SETGID 6, SETUID 7.
        assert_eq!(kept_mask(), 0b1101_1011);
        assert_eq!(format!("{:016x}", kept_mask()), "00000000000000db");
    }
}
