//! End to end: VM templates. One boot makes a template; every later VM of
//! the same inputs is a clone restored from it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use integration::{arrow_run, arrow_vmm, boot_lock, busybox_rootfs, kernel, leftovers_of};

const MEMORY: &str = "128M";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The tests' template, made afresh once per run (a boot costs ~40 s on
/// kvm_pvm); a test that spoils it leaves it rebuilt by its own run.
fn create_template() -> std::path::PathBuf {
    static TEMPLATE: OnceLock<std::path::PathBuf> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let out = Command::new(arrow_vmm())
                .args(["template", "create", "--memory", MEMORY, "--kernel"])
                .arg(kernel())
                .arg("--rootfs")
                .arg(busybox_rootfs())
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out.stderr));
            let dir = std::path::PathBuf::from(text(&out.stdout).trim());
            assert!(dir.join("vmstate").is_file() && dir.join("memory").is_file());
            dir
        })
        .clone()
}

#[test]
fn ten_clones_of_one_template_run_different_commands() {
    let _boot = boot_lock();
    let template = create_template();
    for i in 0..10u8 {
        let script = format!("echo clone {i}; hostname; exit {i}");
        let host = format!("clone-{i}");
        let out = arrow_run(
            &["--memory", MEMORY, "--timings", "--hostname", &host],
            &["/bin/sh", "-c", &script],
        )
        .output()
        .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(i32::from(i)), "{stderr}");
        assert_eq!(text(&out.stdout), format!("clone {i}\n{host}\n"));
        assert!(
            stderr.contains("timing clone-restored"),
            "not a clone: {stderr}"
        );
    }
    assert!(template.join("vmstate").is_file());
}

#[test]
fn concurrent_clones_are_isolated_and_killing_one_spares_the_rest() {
    let _boot = boot_lock();
    let template = create_template();
    let mut a = arrow_run(
        &["--memory", MEMORY],
        &[
            "/bin/sh",
            "-c",
            "echo secret > /tmp/a; echo written; exec sleep 1000",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut line = String::new();
    BufReader::new(a.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "written\n");

    let b = arrow_run(
        &["--memory", MEMORY],
        &["/bin/sh", "-c", "cat /tmp/a 2>&1; ps -o args"],
    )
    .output()
    .unwrap();
    let b_out = text(&b.stdout);
    assert_eq!(b.status.code(), Some(0), "{}", text(&b.stderr));
    assert!(b_out.contains("No such file"), "B sees A's file: {b_out}");
    assert!(!b_out.contains("sleep 1000"), "B sees A's process: {b_out}");

    a.kill().unwrap();
    a.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(template.join("vmstate").is_file(), "the template survives");
    let c = arrow_run(&["--memory", MEMORY], &["/bin/echo", "still fine"])
        .output()
        .unwrap();
    assert_eq!(c.status.code(), Some(0), "{}", text(&c.stderr));
    assert_eq!(text(&c.stdout), "still fine\n");
    // The next arrow-vmm swept the killed one's socket directory.
    assert!(leftovers_of(a.id()).is_empty());
}

#[test]
fn a_corrupt_template_is_rebuilt_not_used() {
    let _boot = boot_lock();
    let template = create_template();
    let state = template.join("vmstate");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let out = arrow_run(
        &["--memory", MEMORY, "--timings"],
        &["/bin/echo", "rebuilt"],
    )
    .output()
    .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "rebuilt\n");
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(
        stderr.contains("timing vm-built"),
        "booted afresh: {stderr}"
    );
    assert!(stderr.contains("timing template-saved"), "{stderr}");
}

/// A clone's monotonic clock and uptime go on from the template's, however
/// long the template sat on disk, while its wall clock is the host's.
fn clone_clocks() -> (f64, u64) {
    let out = arrow_run(
        &["--memory", MEMORY, "--timings"],
        &["/bin/sh", "-c", "cut -d' ' -f1 /proc/uptime; date +%s"],
    )
    .output()
    .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("timing clone-restored"),
        "not a clone: {stderr}"
    );
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let uptime = lines.next().and_then(|l| l.parse().ok());
    let wall = lines.next().and_then(|l| l.parse().ok());
    match (uptime, wall) {
        (Some(uptime), Some(wall)) => (uptime, wall),
        _ => panic!("unexpected output {stdout:?}: {stderr}"),
    }
}

#[test]
fn a_clone_resumes_at_the_templates_time_with_the_hosts_wall_clock() {
    let _boot = boot_lock();
    create_template();
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let first = clone_clocks();
    const AWAY: u64 = 12;
    std::thread::sleep(Duration::from_secs(AWAY));
    let before = unix_now();
    let second = clone_clocks();
    let after = unix_now();
    // Each clone runs from the template's moment for a few seconds; the
    // host's seconds between them must not show.
    assert!(
        second.0 < first.0 + (AWAY / 2) as f64,
        "the clone's clock ran on while the template was idle: uptime {} then {} s, {AWAY} s apart",
        first.0,
        second.0
    );
    assert!(
        (before..=after + 1).contains(&second.1),
        "the clone's wall clock {} is not the host's ({before}..={after})",
        second.1
    );
}
