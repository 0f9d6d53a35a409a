//! The OCI `linux.seccomp` profile compiled to the classic BPF program the
//! guest loads for every process of the container (its init and its execs),
//! as runc loads the one libseccomp builds.
//!
//! Compiled here, on the host, so that arrow-init only validates and loads
//! bytes (every guest instruction is expensive on emulated hosts) and this
//! logic is testable without a VM. The guest is x86_64 (KVM runs the host's
//! architecture), so system call numbers are x86_64's.
//!
//! Semantics, as runc with libseccomp gives them for the profiles containerd
//! and Kubernetes write:
//! - a system call matching no rule gets `defaultAction`;
//! - rules are tried in profile order and the first whose conditions all
//!   hold decides; a rule whose action is the default's is dropped as runc
//!   drops it ("redundant");
//! - several conditions on the same argument make one rule per condition
//!   (runc's fallback, since libseccomp refuses them in one rule);
//! - `SCMP_CMP_MASKED_EQ` is `(arg & value) == valueTwo`, comparisons are on
//!   all 64 bits;
//! - names this kernel's table does not know are skipped (runc ignores
//!   system calls libseccomp cannot resolve);
//! - another architecture than x86_64 (the guest kernel has no IA-32 or x32
//!   entry) kills the process, libseccomp's "bad arch" action.

use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

use crate::syscalls_x86_64::SYSCALLS;

/// `AUDIT_ARCH_X86_64`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// System call numbers with this bit are the x32 ABI.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The kernel's limit on a filter's length (BPF_MAXINSNS).
pub const MAX_INSNS: usize = 4096;

// struct seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;

// Seccomp return values.
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_DATA: u32 = 0x0000_ffff;

// seccomp(2) filter flags.
const FLAG_TSYNC: u32 = 1;
const FLAG_LOG: u32 = 2;
const FLAG_SPEC_ALLOW: u32 = 4;
const FLAG_WAIT_KILLABLE_RECV: u32 = 32;

/// A profile Arrow cannot load.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    #[error("linux.seccomp: SCMP_ACT_NOTIFY needs a seccomp agent (listenerPath), which Arrow does not run in the guest")]
    Notify,
    #[error("linux.seccomp: argument index {0} is out of range (0..=5)")]
    ArgIndex(usize),
    #[error("linux.seccomp: the rule for {0} is too long for a BPF jump")]
    RuleTooLong(String),
    #[error("linux.seccomp: the filter has {0} instructions, more than the kernel's {MAX_INSNS}")]
    TooLong(usize),
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

impl Insn {
    const fn stmt(code: u16, k: u32) -> Self {
        Self {
            code,
            jt: 0,
            jf: 0,
            k,
        }
    }
}

/// A compiled profile: what `CreateContainer.seccomp` carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub insns: Vec<Insn>,
    /// seccomp(2) `SECCOMP_FILTER_FLAG_*`.
    pub flags: u32,
    /// Names in the profile this table does not know (skipped, for the log).
    pub unknown: Vec<String>,
}

impl Program {
    /// `struct sock_filter` array in the host's (= guest's) byte order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.insns.len() * 8);
        for i in &self.insns {
            out.extend_from_slice(&i.code.to_ne_bytes());
            out.push(i.jt);
            out.push(i.jf);
            out.extend_from_slice(&i.k.to_ne_bytes());
        }
        out
    }
}

/// The x86_64 number of system call `name`.
pub fn syscall_number(name: &str) -> Option<u32> {
    SYSCALLS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .map(|i| SYSCALLS[i].1)
}

/// What an OCI action returns (`errno_ret` defaults to EPERM, as runc).
fn action(action: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<u32, SeccompError> {
    let data = errno_ret.unwrap_or(libc::EPERM as u32) & RET_DATA;
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => return Err(SeccompError::Notify),
    })
}

/// A jump target inside a rule while it is being built.
#[derive(Clone, Copy)]
enum Target {
    Next,
    Fail,
    Skip(u8),
}

/// An instruction whose jumps are resolved once the rule's length is known.
struct Pending {
    insn: Insn,
    jt: Target,
    jf: Target,
}

fn ld(off: u32) -> Pending {
    Pending {
        insn: Insn::stmt(LD_W_ABS, off),
        jt: Target::Next,
        jf: Target::Next,
    }
}

fn and(k: u32) -> Pending {
    Pending {
        insn: Insn::stmt(ALU_AND_K, k),
        jt: Target::Next,
        jf: Target::Next,
    }
}

fn jump(code: u16, k: u32, jt: Target, jf: Target) -> Pending {
    Pending {
        insn: Insn::stmt(code, k),
        jt,
        jf,
    }
}

/// The checks of one condition; falling through means it holds.
fn condition(arg: &LinuxSeccompArg, out: &mut Vec<Pending>) -> Result<(), SeccompError> {
    use LinuxSeccompOperator as Op;
    use Target::{Fail, Next, Skip};
    let index = arg.index();
    if index > 5 {
        return Err(SeccompError::ArgIndex(index));
    }
    let lo = OFF_ARGS + 8 * index as u32;
    let hi = lo + 4;
    let split = |v: u64| ((v >> 32) as u32, v as u32);
    let (v_hi, v_lo) = split(arg.value());
    match arg.op() {
        Op::ScmpCmpEq => out.extend([
            ld(hi),
            jump(JEQ_K, v_hi, Next, Fail),
            ld(lo),
            jump(JEQ_K, v_lo, Next, Fail),
        ]),
        Op::ScmpCmpNe => out.extend([
            ld(hi),
            jump(JEQ_K, v_hi, Next, Skip(2)),
            ld(lo),
            jump(JEQ_K, v_lo, Fail, Next),
        ]),
        Op::ScmpCmpMaskedEq => {
            let (d_hi, d_lo) = split(arg.value_two().unwrap_or(0));
            out.extend([
                ld(hi),
                and(v_hi),
                jump(JEQ_K, d_hi, Next, Fail),
                ld(lo),
                and(v_lo),
                jump(JEQ_K, d_lo, Next, Fail),
            ])
        }
        // High words decide unless equal; then the low words, unsigned.
        Op::ScmpCmpGt | Op::ScmpCmpGe => out.extend([
            ld(hi),
            jump(JGT_K, v_hi, Skip(3), Next),
            jump(JEQ_K, v_hi, Next, Fail),
            ld(lo),
            jump(
                if arg.op() == Op::ScmpCmpGt {
                    JGT_K
                } else {
                    JGE_K
                },
                v_lo,
                Next,
                Fail,
            ),
        ]),
        Op::ScmpCmpLt | Op::ScmpCmpLe => out.extend([
            ld(hi),
            jump(JGT_K, v_hi, Fail, Next),
            jump(JEQ_K, v_hi, Next, Skip(2)),
            ld(lo),
            jump(
                if arg.op() == Op::ScmpCmpLt {
                    JGE_K
                } else {
                    JGT_K
                },
                v_lo,
                Fail,
                Next,
            ),
        ]),
    }
    Ok(())
}

/// Emits one rule: `nr` with `conditions` (all must hold) returns `ret`.
/// The accumulator holds `nr` on entry when `acc_is_nr`; returns whether it
/// still does after the rule.
fn rule(
    name: &str,
    nr: u32,
    conditions: &[&LinuxSeccompArg],
    ret: u32,
    acc_is_nr: bool,
    out: &mut Vec<Insn>,
) -> Result<bool, SeccompError> {
    if !acc_is_nr {
        out.push(Insn::stmt(LD_W_ABS, OFF_NR));
    }
    let mut body = Vec::new();
    for c in conditions {
        condition(c, &mut body)?;
    }
    // jeq nr; body; ret. A failed check jumps past the ret.
    let len = body.len() + 1;
    let too_long = || SeccompError::RuleTooLong(name.to_string());
    out.push(Insn {
        code: JEQ_K,
        jt: 0,
        jf: u8::try_from(len).map_err(|_| too_long())?,
        k: nr,
    });
    for (i, p) in body.iter().enumerate() {
        let resolve = |t: Target| -> Result<u8, SeccompError> {
            match t {
                Target::Next => Ok(0),
                Target::Skip(n) => Ok(n),
                // From instruction i to the first one after the ret.
                Target::Fail => u8::try_from(len - i - 1).map_err(|_| too_long()),
            }
        };
        out.push(Insn {
            jt: resolve(p.jt)?,
            jf: resolve(p.jf)?,
            ..p.insn
        });
    }
    out.push(Insn::stmt(RET_K, ret));
    Ok(conditions.is_empty())
}

/// Compiles `profile` for the x86_64 guest.
pub fn compile(profile: &LinuxSeccomp) -> Result<Program, SeccompError> {
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut insns = vec![
        Insn::stmt(LD_W_ABS, OFF_ARCH),
        Insn {
            code: JEQ_K,
            jt: 1,
            jf: 0,
            k: AUDIT_ARCH_X86_64,
        },
        Insn::stmt(RET_K, RET_KILL_PROCESS),
        Insn::stmt(LD_W_ABS, OFF_NR),
        Insn {
            code: JGE_K,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        Insn::stmt(RET_K, RET_KILL_PROCESS),
    ];
    let mut unknown = Vec::new();
    let mut acc_is_nr = true;
    for call in profile.syscalls().iter().flatten() {
        let ret = action(call.action(), call.errno_ret())?;
        if ret == default {
            continue;
        }
        let args: Vec<&LinuxSeccompArg> = call.args().iter().flatten().collect();
        let same_index_twice = args
            .iter()
            .enumerate()
            .any(|(i, a)| args[..i].iter().any(|b| b.index() == a.index()));
        let rules: Vec<Vec<&LinuxSeccompArg>> = if same_index_twice {
            args.iter().map(|a| vec![*a]).collect()
        } else {
            vec![args]
        };
        for name in call.names() {
            let Some(nr) = syscall_number(name) else {
                if !unknown.contains(name) {
                    unknown.push(name.clone());
                }
                continue;
            };
            for conditions in &rules {
                acc_is_nr = rule(name, nr, conditions, ret, acc_is_nr, &mut insns)?;
            }
        }
    }
    insns.push(Insn::stmt(RET_K, default));
    if insns.len() > MAX_INSNS {
        return Err(SeccompError::TooLong(insns.len()));
    }
    let flags = profile
        .flags()
        .iter()
        .flatten()
        .map(|f| match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => FLAG_SPEC_ALLOW,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => FLAG_WAIT_KILLABLE_RECV,
        })
        .fold(0, |a, b| a | b);
    Ok(Program {
        insns,
        flags,
        unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("test profile parses")
    }

    /// Runs `prog` the way the kernel does, on one system call.
    fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            pc += 1;
            let jmp = |taken: bool| if taken { i.jt } else { i.jf } as usize;
            match i.code {
                LD_W_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                ALU_AND_K => acc &= i.k,
                JEQ_K => pc += jmp(acc == i.k),
                JGT_K => pc += jmp(acc > i.k),
                JGE_K => pc += jmp(acc >= i.k),
                RET_K => return i.k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    const X86_64: u32 = AUDIT_ARCH_X86_64;

    #[test]
    fn names_resolve() {
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("sethostname"), Some(170));
        assert_eq!(syscall_number("clone3"), Some(435));
        assert_eq!(syscall_number("socketcall"), None);
        assert!(SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn first_matching_rule_or_the_default() {
        let p = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [
                  {"names": ["read", "write", "socketcall"], "action": "SCMP_ACT_ALLOW"},
                  {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
                  {"names": ["getpid"], "action": "SCMP_ACT_ERRNO"},
                  {"names": ["kill"], "action": "SCMP_ACT_KILL_PROCESS"}
                ]}"#,
        ))
        .unwrap();
        assert_eq!(p.unknown, vec!["socketcall".to_string()]);
        let eperm = RET_ERRNO | libc::EPERM as u32;
        assert_eq!(run(&p.insns, X86_64, 0, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p.insns, X86_64, 1, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p.insns, X86_64, 435, [0; 6]), RET_ERRNO | 38);
        assert_eq!(run(&p.insns, X86_64, 170, [0; 6]), eperm);
        assert_eq!(run(&p.insns, X86_64, 62, [0; 6]), RET_KILL_PROCESS);
        // The redundant getpid rule was dropped.
        assert_eq!(p.insns.len(), 6 + 2 * 4 + 1);
        // Other architectures and x32 numbers are killed.
        assert_eq!(run(&p.insns, 0x4000_0003, 0, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(
            run(&p.insns, X86_64, X32_SYSCALL_BIT, [0; 6]),
            RET_KILL_PROCESS
        );
    }

    #[test]
    fn argument_comparisons_are_64_bit() {
        let rule = |op: &str, v: u64, v2: u64| {
            compile(&profile(&format!(
                r#"{{"defaultAction": "SCMP_ACT_ALLOW",
                    "syscalls": [{{"names": ["personality"], "action": "SCMP_ACT_ERRNO",
                      "args": [{{"index": 1, "value": {v}, "valueTwo": {v2}, "op": "{op}"}}]}}]}}"#
            )))
            .unwrap()
        };
        let blocked = |p: &Program, arg: u64| {
            let ret = run(&p.insns, X86_64, 135, [0, arg, 0, 0, 0, 0]);
            assert!(ret == RET_ALLOW || ret == RET_ERRNO | 1, "{ret:#x}");
            ret != RET_ALLOW
        };
        let big = 5u64 << 32 | 7;
        let values = [0, 6, 7, 8, 4 << 32 | 9, big, 5 << 32, 6 << 32, u64::MAX];
        for (op, want) in [
            ("SCMP_CMP_EQ", (|a, v| a == v) as fn(u64, u64) -> bool),
            ("SCMP_CMP_NE", |a, v| a != v),
            ("SCMP_CMP_GT", |a, v| a > v),
            ("SCMP_CMP_GE", |a, v| a >= v),
            ("SCMP_CMP_LT", |a, v| a < v),
            ("SCMP_CMP_LE", |a, v| a <= v),
        ] {
            let p = rule(op, big, 0);
            for a in values {
                assert_eq!(blocked(&p, a), want(a, big), "{op} {a:#x}");
            }
        }
        // (arg & mask) == datum: containerd's clone rule (no CLONE_NEW*).
        let mask = 0x7E02_0000u64;
        let p = rule("SCMP_CMP_MASKED_EQ", mask, 0);
        assert!(blocked(&p, 0x11));
        assert!(!blocked(&p, 0x1000_0000));
        assert!(!blocked(&p, 1 << 40 | 0x2000_0000));
    }

    #[test]
    fn same_argument_twice_is_either_condition() {
        let p = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [
                  {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                  {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                 {"names": ["kill"], "action": "SCMP_ACT_ALLOW", "args": [
                  {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                  {"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]}]}"#,
        ))
        .unwrap();
        let ret = |nr, a0, a1| run(&p.insns, X86_64, nr, [a0, a1, 0, 0, 0, 0]);
        assert_eq!(ret(135, 0, 0), RET_ALLOW);
        assert_eq!(ret(135, 8, 0), RET_ALLOW);
        assert_ne!(ret(135, 9, 0), RET_ALLOW);
        assert_eq!(ret(62, 1, 9), RET_ALLOW);
        assert_ne!(ret(62, 1, 8), RET_ALLOW);
        assert_ne!(ret(62, 2, 9), RET_ALLOW);
    }

    #[test]
    fn refusals_and_flags() {
        let err = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}"#,
        ))
        .unwrap_err();
        assert_eq!(err, SeccompError::Notify);
        let err = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["read"],
                "action": "SCMP_ACT_ERRNO", "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}"#,
        ))
        .unwrap_err();
        assert_eq!(err, SeccompError::ArgIndex(6));
        let p = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]}"#,
        ))
        .unwrap();
        assert_eq!(p.flags, FLAG_LOG | FLAG_SPEC_ALLOW);
        assert_eq!(p.to_bytes().len(), p.insns.len() * 8);
    }

    /// The kernel itself accepts and applies a compiled profile (a forked
    /// child loads it with no_new_privs, then calls what it blocks).
    #[test]
    fn the_kernel_applies_it() {
        let p = compile(&profile(
            r#"{"defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                             {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "args": [
                               {"index": 0, "value": 4294967296, "op": "SCMP_CMP_LT"}]}]}"#,
        ))
        .unwrap();
        let filter: Vec<libc::sock_filter> = p
            .insns
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the child makes only async-signal-safe raw system calls
        // on memory prepared before the fork, then _exit()s.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: as above; `prog` outlives the calls.
            unsafe {
                let code = if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    10
                } else if libc::syscall(libc::SYS_seccomp, 1, p.flags, &prog) != 0 {
                    11
                } else if libc::sethostname(c"x".as_ptr(), 1) != -1
                    || *libc::__errno_location() != 13
                {
                    12
                } else if libc::syscall(libc::SYS_getpriority, 0, 0) != -1
                    || *libc::__errno_location() != libc::EPERM
                {
                    13
                } else if libc::syscall(libc::SYS_getpriority, 1u64 << 32, 0) == -1 {
                    // Not below 2^32 in 64 bits: allowed (the kernel then
                    // reads `which` as the int 0).
                    14
                } else {
                    0
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        // 11: the kernel refused it; 12/13: it did not block; 14: it
        // blocked too much.
        assert_eq!(libc::WEXITSTATUS(status), 0, "child failed at that step");
    }
}
