//! What the shim reads from containerd and the kernel: an OCI spec (JSON)
//! through role, VM shape, host-namespace, network-mode and container-plan
//! decisions (seccomp compilation included), exec `Process` and update
//! `LinuxResources` JSON, mountinfo, mount options, share paths and ids.
//!
//! The first byte picks the parser; the rest is its text.
//!
//! Oracles: a planned bind always lands under the container's own share
//! directory; an accepted id is a containerd identifier; a VM shape is in
//! range; a compiled seccomp filter is one the kernel accepts (length,
//! every jump inside the program, ends in a return); mountinfo lookups
//! stay under the directory asked for.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use oci_spec::runtime::Spec;

use arrow_runtime::fuzzing::{parse_options, share_path_of, unescape_mountinfo};
use arrow_runtime::network::PodNetworkMode;
use arrow_runtime::seccomp::MAX_INSNS;
use arrow_runtime::share::mounts_under;
use arrow_runtime::spec::{
    check_identifier, parse_process, parse_resources, plan_container, process_request,
    refuse_host_namespaces, resources_request, sysctls, Role, PodVmSize, DEFAULT_MEMORY, MAX_VCPUS,
    MEMORY_STEP,
};

const BPF_CLASS_JMP: u16 = 0x05;
const BPF_CLASS_RET: u16 = 0x06;
const BPF_JA: u16 = 0x00;

/// The containerd identifier rule, written out independently.
fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 76
        && s.split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn check_seccomp(bytes: &[u8]) {
    assert_eq!(bytes.len() % 8, 0);
    let n = bytes.len() / 8;
    assert!(n > 0 && n <= MAX_INSNS, "{n} instructions");
    for (i, insn) in bytes.chunks(8).enumerate() {
        let code = u16::from_ne_bytes([insn[0], insn[1]]);
        let (jt, jf) = (usize::from(insn[2]), usize::from(insn[3]));
        let k = u32::from_ne_bytes([insn[4], insn[5], insn[6], insn[7]]) as usize;
        if code & 0x07 == BPF_CLASS_JMP {
            if code & 0xf0 == BPF_JA {
                assert!(i + 1 + k < n, "insn {i}: ja {k} out of {n}");
            } else {
                assert!(i + 1 + jt.max(jf) < n, "insn {i}: jump out of {n}");
            }
        }
    }
    let last = u16::from_ne_bytes([bytes[bytes.len() - 8], bytes[bytes.len() - 7]]);
    assert_eq!(
        last & 0x07,
        BPF_CLASS_RET,
        "the filter does not end in a return"
    );
}

fn spec(json: &str) {
    let Ok(spec) = serde_json::from_str::<Spec>(json) else {
        return;
    };
    let _ = refuse_host_namespaces(&spec);
    let _ = sysctls(&spec);
    let _ = PodNetworkMode::of(&spec);
    for id in ["c1", "sandbox-1"] {
        let Ok(role) = Role::of(id, &spec) else {
            continue;
        };
        if let Role::PodMember { sandbox_id } = &role {
            assert!(is_identifier(sandbox_id));
        }
        if let Ok(shape) = PodVmSize::for_spec(&spec, &role) {
            assert!((1..=MAX_VCPUS).contains(&shape.vcpus));
            assert!(shape.memory_bytes == DEFAULT_MEMORY || shape.memory_bytes % MEMORY_STEP == 0);
            assert!(shape.memory_bytes > 0);
        }
        if let Ok(plan) = plan_container(id, &spec) {
            for bind in &plan.binds {
                assert!(
                    share_path_of(id, &bind.share_path).is_ok(),
                    "bind {:?} escapes {id}'s share",
                    bind.share_path
                );
            }
            if let Some(s) = &plan.request.seccomp {
                check_seccomp(&s.program);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 6 {
        0 => spec(text),
        1 => {
            if let Ok(process) = parse_process(rest) {
                let _ = process_request("e1", "c1", &process, true);
            }
        }
        2 => {
            if let Ok(resources) = parse_resources(rest) {
                let _ = resources_request(&resources, &mut Vec::new());
            }
        }
        3 => {
            let dir = Path::new("/run/arrow/k8s.io/pod/shared");
            for p in mounts_under(text, dir) {
                assert!(p.starts_with(dir), "{p:?} is not under {dir:?}");
            }
            for field in text.split([' ', '\n']) {
                assert!(unescape_mountinfo(field).len() <= field.len() * 3);
            }
        }
        4 => {
            let options: Vec<String> = text.split(',').map(str::to_owned).collect();
            let (_, data) = parse_options(&options);
            for known in ["ro", "rw", "bind", "rbind", "nosuid", "nodev", "noexec"] {
                assert!(
                    !data.split(',').any(|o| o == known),
                    "{known} left in the data"
                );
            }
        }
        _ => {
            let accepted = check_identifier("id", text).is_ok();
            assert_eq!(accepted, is_identifier(text), "{text:?}");
            if let Ok(p) = share_path_of("c1", text) {
                assert!(p.starts_with("c1") && p != Path::new("c1"));
                assert!(p
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_))));
            }
        }
    }
});
