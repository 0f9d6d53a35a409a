//! Process capabilities (`CreateProcess.capabilities`): OCI names turned into
//! kernel bit masks up front (names from the `caps` crate), and the raw
//! system calls that apply them in the spawned child, which may not
//! allocate (see `process::spawn`).
//!
//! The order is runc's: drop the bounding set while still root, switch
//! credentials with PR_SET_KEEPCAPS so the permitted set survives setuid,
//! then set effective/permitted/inheritable with capset(2) and raise the
//! ambient set. execve(2) then transforms the sets as usual.

use std::ffi::{c_int, c_ulong};
use std::str::FromStr;
use std::sync::OnceLock;

use proto::agent::Capabilities;

/// What the kernel of Linux 6.1 knows (CAP_CHECKPOINT_RESTORE), used when
/// /proc/sys/kernel/cap_last_cap cannot be read.
const DEFAULT_LAST_CAP: u32 = 40;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The five sets of a process as bit masks (bit n = capability n).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
    /// The highest capability this kernel knows; the bounding set is
    /// dropped up to it, and higher bits are cleared from every set.
    pub last_cap: u32,
}

impl CapSets {
    /// Parses the OCI names of every set. Unknown names are errors; names
    /// the crate knows but this kernel does not are left out (as runc does).
    pub fn parse(c: &Capabilities, last_cap: u32) -> Result<Self, String> {
        let last_cap = last_cap.min(63);
        let known = u64::MAX >> (63 - last_cap);
        Ok(Self {
            bounding: mask(&c.bounding, "bounding")? & known,
            effective: mask(&c.effective, "effective")? & known,
            permitted: mask(&c.permitted, "permitted")? & known,
            inheritable: mask(&c.inheritable, "inheritable")? & known,
            ambient: mask(&c.ambient, "ambient")? & known,
            last_cap,
        })
    }
}

/// The bit mask of `names` ("CAP_CHOWN", ...); `set` names the set in the
/// error.
pub fn mask(names: &[String], set: &str) -> Result<u64, String> {
    names.iter().try_fold(0u64, |acc, name| {
        caps::Capability::from_str(name)
            .map(|cap| acc | cap.bitmask())
            .map_err(|_| format!("unknown capability {name:?} in the {set} set"))
    })
}

/// The kernel's highest capability number, read once from
/// /proc/sys/kernel/cap_last_cap.
pub fn last_cap() -> u32 {
    static LAST: OnceLock<u32> = OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|&n| n < 64)
            .unwrap_or(DEFAULT_LAST_CAP)
    })
}

fn errno() -> c_int {
    // SAFETY: __errno_location always returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Removes every capability outside `sets.bounding` from the bounding set.
///
/// # Safety
/// Raw system calls only, on plain data: safe in the CLONE_VM child.
pub unsafe fn drop_bounding(sets: &CapSets) -> Result<(), c_int> {
    for cap in 0..=sets.last_cap {
        if sets.bounding & (1 << cap) == 0
            && libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0) == -1
        {
            return Err(errno());
        }
    }
    Ok(())
}

/// Sets PR_SET_KEEPCAPS (around setuid, so the permitted set survives it).
///
/// # Safety
/// A raw system call: safe in the CLONE_VM child.
pub unsafe fn keep_caps(on: bool) -> Result<(), c_int> {
    if libc::prctl(libc::PR_SET_KEEPCAPS, c_ulong::from(on), 0, 0, 0) == -1 {
        return Err(errno());
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets effective, permitted and inheritable with capset(2), then makes the
/// ambient set exactly `sets.ambient`. Returns the failed step and errno.
///
/// # Safety
/// Raw system calls on stack data only: safe in the CLONE_VM child.
pub unsafe fn apply(sets: &CapSets) -> Result<(), (&'static str, c_int)> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |mask: u64, high: bool| (if high { mask >> 32 } else { mask }) as u32;
    let data = [false, true].map(|high| CapData {
        effective: word(sets.effective, high),
        permitted: word(sets.permitted, high),
        inheritable: word(sets.inheritable, high),
    });
    if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) == -1 {
        return Err(("capset", errno()));
    }
    let clear = libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong;
    if libc::prctl(libc::PR_CAP_AMBIENT, clear, 0, 0, 0) == -1 {
        return Err(("clear ambient capabilities", errno()));
    }
    for cap in 0..=sets.last_cap {
        if sets.ambient & (1 << cap) != 0 {
            let raise = libc::PR_CAP_AMBIENT_RAISE as c_ulong;
            if libc::prctl(libc::PR_CAP_AMBIENT, raise, cap as c_ulong, 0, 0) == -1 {
                return Err(("raise ambient capability", errno()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_oci_names_into_masks() {
        let c = Capabilities {
            bounding: names(&["CAP_CHOWN", "CAP_KILL", "CAP_CHECKPOINT_RESTORE"]),
            effective: names(&["CAP_NET_BIND_SERVICE"]),
            permitted: names(&["CAP_NET_BIND_SERVICE", "CAP_SYS_ADMIN"]),
            inheritable: vec![],
            ambient: names(&["CAP_NET_BIND_SERVICE"]),
        };
        let sets = CapSets::parse(&c, 40).unwrap();
        assert_eq!(sets.bounding, 1 | (1 << 5) | (1 << 40));
        assert_eq!(sets.effective, 1 << 10);
        assert_eq!(sets.permitted, (1 << 10) | (1 << 21));
        assert_eq!(sets.inheritable, 0);
        assert_eq!(sets.ambient, 1 << 10);
        assert_eq!(sets.last_cap, 40);
    }

    #[test]
    fn unknown_names_are_refused_and_naming_the_set() {
        let c = Capabilities {
            effective: names(&["CAP_CHOWN", "CAP_BOGUS"]),
            ..Default::default()
        };
        let err = CapSets::parse(&c, 40).unwrap_err();
        assert!(
            err.contains("CAP_BOGUS") && err.contains("effective"),
            "{err}"
        );
        // OCI spells them in capitals with the prefix.
        assert!(mask(&names(&["chown"]), "bounding").is_err());
        assert!(mask(&names(&["CHOWN"]), "bounding").is_err());
        assert_eq!(mask(&[], "bounding"), Ok(0));
    }

    #[test]
    fn capabilities_beyond_the_kernel_are_left_out() {
        let c = Capabilities {
            bounding: names(&["CAP_CHOWN", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]),
            ..Default::default()
        };
        // An older kernel whose last capability is CAP_AUDIT_READ (37).
        let sets = CapSets::parse(&c, 37).unwrap();
        assert_eq!(sets.bounding, 1);
        let sets = CapSets::parse(&c, 200).unwrap();
        assert_eq!(sets.last_cap, 63);
    }

    #[test]
    fn reads_the_kernels_last_capability() {
        let last = last_cap();
        assert!((36..64).contains(&last), "{last}");
    }
}
