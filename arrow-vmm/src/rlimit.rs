//! The VMM process's own descriptor limit.
//!
//! It exists so one VM's process can never hold more descriptors than one
//! VM needs ([`OPEN_FILES_LIMIT`]), whatever limit it inherited from
//! containerd: the guest drives how many files the virtio-fs device keeps
//! open, and if the device's own bounds ever miscounted, this is the
//! backstop.

use std::io;

use vmm_core::vm::OPEN_FILES_LIMIT;

/// Sets `RLIMIT_NOFILE` (soft and hard) to `limit` and returns the soft
/// limit now in force. Lowering always works; raising past the inherited
/// hard limit needs `CAP_SYS_RESOURCE`, and without it the soft limit is
/// raised to the hard one instead (still a bound, only a lower one).
pub fn limit_open_files(limit: u64) -> io::Result<u64> {
    let mut current = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut current) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let wanted = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        return Ok(limit);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) || current.rlim_max >= limit {
        return Err(err);
    }
    let capped = libc::rlimit {
        rlim_cur: current.rlim_max,
        rlim_max: current.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(current.rlim_max)
}

/// Sets `RLIMIT_CORE` to 0: a VMM killed by its seccomp filter (`SIGSYS`)
/// or crashing must not dump the guest's memory into a core file on the
/// host. (No `RLIMIT_FSIZE`: the guest's writes through virtio-fs are
/// legitimately large, and a limit would kill the VMM with `SIGXFSZ`;
/// no `RLIMIT_NPROC`: it counts every process of the uid host-wide, and
/// the seccomp filters forbid creating processes and threads anyway.)
pub fn forbid_core_dumps() -> io::Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Applies [`OPEN_FILES_LIMIT`]; a failure is not fatal (the virtio-fs
/// bounds still hold), and is returned as a line for the caller's log.
pub fn apply() -> Option<String> {
    match limit_open_files(OPEN_FILES_LIMIT) {
        Ok(n) if n < OPEN_FILES_LIMIT => Some(format!(
            "arrow-vmm: RLIMIT_NOFILE is {n}, below the {OPEN_FILES_LIMIT} one VM may need: \
             the guest may see ENFILE/EMFILE early"
        )),
        Ok(_) => None,
        Err(e) => Some(format!(
            "arrow-vmm: cannot set RLIMIT_NOFILE to {OPEN_FILES_LIMIT}: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nofile() -> (u64, u64) {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `limit_open_files`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
        (r.rlim_cur, r.rlim_max)
    }

    #[test]
    fn the_process_gets_one_vms_worth_of_descriptors() {
        let (_, hard) = nofile();
        let got = limit_open_files(OPEN_FILES_LIMIT).unwrap();
        // Root, or an inherited hard limit at least as high, gets exactly
        // the limit (hard too: a lowered inherited one); otherwise the
        // inherited hard limit, which is below it.
        if got == OPEN_FILES_LIMIT {
            assert_eq!(nofile().1, OPEN_FILES_LIMIT);
        } else {
            assert!(hard < OPEN_FILES_LIMIT && got == hard);
        }
        assert_eq!(nofile().0, got);
        assert_eq!(OPEN_FILES_LIMIT, 151_552);
    }

    #[test]
    fn core_dumps_are_forbidden_for_good() {
        forbid_core_dumps().unwrap();
        let mut r = libc::rlimit {
            rlim_cur: 1,
            rlim_max: 1,
        };
        // SAFETY: as in `limit_open_files`.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut r) }, 0);
        assert_eq!((r.rlim_cur, r.rlim_max), (0, 0));
    }
}
