//! A container's seccomp filter (agent.proto `Seccomp`): compiled from the
//! OCI profile by the host, checked here once at CreateContainer, loaded by
//! each of the container's processes in the spawn child just before exec.

use std::os::raw::c_int;

use proto::agent::Seccomp;

/// The kernel's limit on a filter's length (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;
/// TSYNC | LOG | SPEC_ALLOW | WAIT_KILLABLE_RECV: the flags that need no
/// listener or other state on our side.
const ALLOWED_FLAGS: u32 = 1 | 2 | 4 | 32;
/// seccomp(2) operation.
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;

/// `struct sock_filter`, kept as our own type for its derives.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// A validated filter, ready to load without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    insns: Vec<Insn>,
    flags: u32,
}

impl Filter {
    /// Checks the sizes and flags; the kernel checks the program itself.
    pub fn parse(s: &Seccomp) -> Result<Self, String> {
        let n = s.program.len() / 8;
        if !s.program.len().is_multiple_of(8) || n == 0 || n > MAX_INSNS {
            return Err(format!(
                "seccomp program of {} bytes: must be 1 to {MAX_INSNS} instructions of 8 bytes",
                s.program.len()
            ));
        }
        if s.flags & !ALLOWED_FLAGS != 0 {
            return Err(format!("seccomp flags {:#x} not supported", s.flags));
        }
        let insns = s
            .program
            .chunks_exact(8)
            .map(|c| Insn {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        Ok(Self {
            insns,
            flags: s.flags,
        })
    }

    /// Loads the filter into the calling process; returns the errno on
    /// failure.
    ///
    /// # Safety
    /// Safe to call in the spawn child (one raw system call, no
    /// allocation); the caller must have no_new_privs set or hold
    /// CAP_SYS_ADMIN, else the kernel refuses with EACCES.
    pub unsafe fn load(&self) -> Result<(), c_int> {
        let prog = libc::sock_fprog {
            // At most MAX_INSNS (checked in parse).
            len: self.insns.len() as u16,
            // Insn is #[repr(C)] with sock_filter's layout.
            filter: self.insns.as_ptr() as *mut libc::sock_filter,
        };
        let rc = libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            libc::c_ulong::from(self.flags),
            &prog as *const libc::sock_fprog,
        );
        if rc == 0 {
            Ok(())
        } else {
            Err(*libc::__errno_location())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ld [0]; jeq 39 (getpid), 0, 1; ret ERRNO|77; ret ALLOW`.
    fn getpid_blocker() -> Vec<u8> {
        let insn = |code: u16, jt: u8, jf: u8, k: u32| {
            let mut v = code.to_ne_bytes().to_vec();
            v.extend([jt, jf]);
            v.extend(k.to_ne_bytes());
            v
        };
        [
            insn(0x20, 0, 0, 0),
            insn(0x15, 0, 1, libc::SYS_getpid as u32),
            insn(0x06, 0, 0, 0x0005_0000 | 77),
            insn(0x06, 0, 0, 0x7fff_0000),
        ]
        .concat()
    }

    #[test]
    fn sizes_and_flags_are_checked() {
        let ok = Seccomp {
            program: getpid_blocker(),
            flags: 2,
        };
        assert!(Filter::parse(&ok).is_ok());
        for (program, flags) in [
            (vec![], 0),
            (vec![0; 12], 0),
            (vec![0; 8 * (MAX_INSNS + 1)], 0),
            (getpid_blocker(), 8),
        ] {
            assert!(Filter::parse(&Seccomp { program, flags }).is_err());
        }
    }

    #[test]
    fn a_loaded_filter_blocks() {
        let filter = Filter::parse(&Seccomp {
            program: getpid_blocker(),
            flags: 0,
        })
        .unwrap();
        // SAFETY: the child makes raw system calls only and _exit()s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                let code = match filter.load() {
                    Err(_) => 1,
                    Ok(()) if libc::syscall(libc::SYS_getpid) != -1 => 2,
                    Ok(()) if *libc::__errno_location() != 77 => 3,
                    Ok(()) => 0,
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }
}
