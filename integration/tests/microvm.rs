//! End to end: `arrow-vmm run` boots the real guest kernel into arrow-init on
//! real KVM and runs busybox programs in it. Each boot costs 10-15 s where
//! guest kernel code is emulated, so each test makes its boot count.

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use integration::{arrow_run, arrow_vmm, boot_lock, kernel, leftovers_of};

fn run_with_stdin(extra: &[&str], command: &[&str], stdin: &[u8]) -> (Output, u32) {
    let mut child = arrow_run(extra, command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn arrow-vmm");
    let pid = child.id();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    (child.wait_with_output().unwrap(), pid)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn program_output_exit_code_stdin_cpus_and_memory() {
    let _boot = boot_lock();
    let (out, pid) = run_with_stdin(
        &["--memory", "256M"],
        &[
            "/bin/sh",
            "-c",
            "echo hi; nproc; grep MemTotal /proc/meminfo; read line; echo \"got $line\"; echo err >&2; exit 3",
        ],
        b"from the host\n",
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("hi"));
    assert_eq!(lines.next(), Some("1"), "one vCPU");
    let mem_kb: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .expect("MemTotal line");
    // The kernel keeps some for itself; it must see most of the 256 MiB.
    assert!(
        (200_000..=262_144).contains(&mem_kb),
        "MemTotal {mem_kb} kB"
    );
    assert_eq!(lines.next(), Some("got from the host"));
    assert_eq!(stderr.trim(), "err");
    assert!(leftovers_of(pid).is_empty(), "{:?}", leftovers_of(pid));
}

#[test]
fn signal_death_is_reported_and_tty_works() {
    let _boot = boot_lock();
    let (out, pid) = run_with_stdin(
        &["-t"],
        &["/bin/sh", "-c", "tty; stty size; kill -9 $$"],
        b"",
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(128 + 9),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stdout.contains("/dev/pts/0"), "tty: {stdout}");
    assert!(stderr.contains("killed by signal 9"), "{stderr}");
    assert!(leftovers_of(pid).is_empty());
}

#[test]
fn two_vcpus_are_seen() {
    // Secondary vCPUs start on kvm_pvm as on hardware KVM (INIT/SIPI and the
    // real-mode trampoline are handled by KVM itself): only a boot starts
    // them, so this one never clones.
    let _boot = boot_lock();
    let (out, _) = run_with_stdin(&["--vcpus", "2", "--no-template"], &["/bin/nproc"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "2");
}

#[test]
fn a_guest_kernel_panic_ends_with_a_clear_error_and_no_leftovers() {
    let _boot = boot_lock();
    // An init that dies at once makes the kernel panic ("Attempted to kill
    // init!"); with panic=-1 the guest resets and the VM ends. The
    // bare-metal test guest, run as a Linux program, dies on its first port
    // I/O instruction (SIGSEGV).
    let dir = std::env::temp_dir().join(format!("arrow-panic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let false_init = dir.join("init");
    let made = std::process::Command::new(arrow_vmm())
        .args(["test-guest", "--out"])
        .arg(&false_init)
        .status()
        .unwrap();
    assert!(made.success());
    let started = Instant::now();
    let (out, pid) = run_with_stdin(
        &["--init", false_init.to_str().unwrap()],
        &["/bin/true"],
        b"",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("guest kernel panicked"), "{stderr}");
    assert!(stderr.contains("Attempted to kill init"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(leftovers_of(pid).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_guest_that_never_becomes_ready_times_out_cleanly() {
    let _boot = boot_lock();
    let (out, pid) = run_with_stdin(
        &["--boot-timeout", "1", "--no-template"],
        &["/bin/true"],
        b"",
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("did not become ready within 1 s"),
        "{stderr}"
    );
    assert!(leftovers_of(pid).is_empty());
}

#[test]
fn missing_kernel_or_kvm_fail_at_once() {
    let out = std::process::Command::new(arrow_vmm())
        .args(["run", "--kernel", "/nonexistent/vmlinux", "--", "/bin/true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("guest kernel not found at /nonexistent/vmlinux"));
    // The real kernel exists, so the error above was about the path alone.
    assert!(kernel().exists());
}
