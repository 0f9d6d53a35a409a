//! End to end: `arrow-vmm serve` as the shim uses it, on the real guest
//! kernel and arrow-init. It boots Linux once (10-30 s where the guest
//! kernel is emulated), so it runs only when `ARROW_KERNEL` names the
//! kernel; arrow-init comes from `ARROW_INIT`, else `$ARROW_BIN_DIR` or
//! `target/arrow/` as `hack/build.sh` stages it.
//!
//! Two `serve`s start at once with no template: one boots and makes it
//! while the other waits on the template lock, then clones it. Both
//! agents answer through their sockets; SIGTERM ends one, the end of stdin
//! the other, each exiting 0 and removing its socket. Two more clones run
//! with the shim's control channel (ready, counters, pause, resume, stop;
//! its closing as the lifeline). Then a clone per
//! thread kind runs the seccomp self-test: that thread makes a call its
//! filter forbids once confined, and the VMM dies of SIGSYS.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;

use proto::client::AgentClient;
use proto::vmm_control::{read_message, write_message, ControlRequest, VmmMessage};
use proto::vmm_ready::VmmReady;
use proto::{hybrid, AGENT_PORT};

fn arrow_init() -> Option<PathBuf> {
    if let Some(init) = std::env::var_os("ARROW_INIT") {
        return Some(init.into());
    }
    let bin_dir = std::env::var_os("ARROW_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/arrow"));
    let init = bin_dir.join("arrow-init");
    init.is_file().then_some(init)
}

/// The first line `child` prints, within `timeout`.
fn ready_line(child: &mut Child, timeout: Duration) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(timeout).expect("no ready line in time")
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "serve did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The agent behind `uds`, as the shim gets it: `InitClone` first (the
/// host's time, fresh entropy, a hostname), then anything.
fn initialised_agent(uds: &Path) -> AgentClient {
    let stream = hybrid::connect(uds, AGENT_PORT, Duration::from_secs(10)).unwrap();
    let client = AgentClient::from_unix(stream).unwrap();
    let entropy = proto::client::fresh_entropy(64).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    client
        .init_clone(now.as_nanos() as u64, &entropy, "pod")
        .unwrap();
    client.ping().unwrap();
    client
}

/// Starts a `serve` (a clone of the template in `cache`) with a control
/// channel, as the shim does; returns it, the shim's end and the socket.
fn serve_with_control(
    base: &Path,
    cache: &Path,
    kernel: &std::ffi::OsStr,
    init: &Path,
    name: &str,
) -> (Child, BufReader<UnixStream>, PathBuf) {
    let share = base.join(format!("share-{name}"));
    std::fs::create_dir_all(&share).unwrap();
    let uds = base.join(format!("{name}.sock"));
    let (shim_end, vmm_end) = UnixStream::pair().unwrap();
    let fd = vmm_end.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_arrow-vmm"));
    cmd.env("ARROW_CACHE", cache)
        .args(["serve", "--memory", "128M", "--control-fd"])
        .arg(fd.to_string())
        .arg("--kernel")
        .arg(kernel)
        .arg("--init")
        .arg(init)
        .arg("--vsock-uds")
        .arg(&uds)
        .arg("--shared-dir")
        .arg(&share)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: runs in the forked child before exec and only calls fcntl,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn arrow-vmm serve");
    drop(vmm_end);
    shim_end
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    (child, BufReader::new(shim_end), uds)
}

fn request(shim: &mut BufReader<UnixStream>, request: ControlRequest) -> VmmMessage {
    write_message(shim.get_mut(), &request).unwrap();
    read_message(shim).unwrap()
}

/// The control channel: ready on it, counters, pause (the agent cannot
/// answer) and resume (it answers again), stop; and its closing is the
/// lifeline.
fn controlled_serves(base: &Path, cache: &Path, kernel: &std::ffi::OsStr, init: &Path) {
    let (mut c, mut shim, uds) = serve_with_control(base, cache, kernel, init, "c");
    let ready = match read_message::<VmmMessage>(&mut shim).unwrap() {
        VmmMessage::Ready(ready) => ready,
        other => panic!("ready expected, got {other:?}"),
    };
    assert!(ready.ready && ready.cloned, "{ready:?}");
    assert_eq!(ready.pid, c.id());
    assert_eq!(Path::new(&ready.vsock_uds), uds);
    let client = initialised_agent(&uds);

    match request(&mut shim, ControlRequest::Counters) {
        VmmMessage::Counters(counters) => {
            // A clone's counters start at zero; its guest mounts the share
            // with its first container.
            let fs = counters.fs.expect("a share, so fs counters");
            assert_eq!(fs.errors, 0, "{fs:?}");
            assert!(counters.net.is_none(), "no NIC: {counters:?}");
        }
        other => panic!("counters expected, got {other:?}"),
    }
    assert_eq!(request(&mut shim, ControlRequest::Pause), VmmMessage::Done);
    assert_eq!(request(&mut shim, ControlRequest::Pause), VmmMessage::Done);
    let paused = hybrid::connect(&uds, AGENT_PORT, Duration::from_secs(3));
    assert!(paused.is_err(), "a paused guest answered a connection");
    assert_eq!(request(&mut shim, ControlRequest::Resume), VmmMessage::Done);
    client.ping().unwrap();
    hybrid::connect(&uds, AGENT_PORT, Duration::from_secs(10)).unwrap();

    assert_eq!(request(&mut shim, ControlRequest::Stop), VmmMessage::Done);
    assert_eq!(wait_exit(&mut c, Duration::from_secs(15)).code(), Some(0));
    assert!(!uds.exists(), "Stop removed the socket");

    let (mut d, mut shim, uds) = serve_with_control(base, cache, kernel, init, "d");
    assert!(matches!(
        read_message::<VmmMessage>(&mut shim).unwrap(),
        VmmMessage::Ready(_)
    ));
    drop(shim);
    assert_eq!(wait_exit(&mut d, Duration::from_secs(15)).code(), Some(0));
    assert!(!uds.exists(), "the channel's end removed the socket");
}

#[test]
fn two_serves_boot_once_then_clone_and_both_end_cleanly() {
    let (Some(kernel), Some(init)) = (std::env::var_os("ARROW_KERNEL"), arrow_init()) else {
        eprintln!("skipped: set ARROW_KERNEL (and build arrow-init with hack/build.sh)");
        return;
    };
    let base = std::env::temp_dir().join(format!("arrow-serve-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let cache = base.join("cache");
    let mut serves = Vec::new();
    for name in ["a", "b"] {
        let share = base.join(format!("share-{name}"));
        std::fs::create_dir_all(&share).unwrap();
        let uds = base.join(format!("{name}.sock"));
        let child = Command::new(env!("CARGO_BIN_EXE_arrow-vmm"))
            .env("ARROW_CACHE", &cache)
            .args(["serve", "--memory", "128M", "--exit-on-stdin-eof"])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--init")
            .arg(&init)
            .arg("--vsock-uds")
            .arg(&uds)
            .arg("--shared-dir")
            .arg(&share)
            .arg("--console-log")
            .arg(base.join(format!("{name}.console")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn arrow-vmm serve");
        serves.push((child, uds));
    }

    let mut cloned = Vec::new();
    for (child, uds) in &mut serves {
        let line = ready_line(child, Duration::from_secs(300));
        assert!(line.ends_with("}\n"), "one JSON line: {line:?}");
        let ready = VmmReady::parse_line(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert_eq!(ready.pid, child.id(), "{line}");
        assert_eq!(ready.vsock_uds, uds.display().to_string(), "{line}");
        cloned.push(ready.cloned);

        eprintln!("ready: {line}");
        initialised_agent(uds);
    }
    cloned.sort();
    assert_eq!(cloned, [false, true], "one boot made the template");
    assert_eq!(
        std::fs::read_dir(cache.join("templates"))
            .unwrap()
            .filter(|e| !e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.'))
            .count(),
        1
    );

    let (mut b, b_uds) = serves.pop().unwrap();
    let (mut a, a_uds) = serves.pop().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(wait_exit(&mut a, Duration::from_secs(15)).code(), Some(0));
    assert!(!a_uds.exists(), "SIGTERM removed the socket");
    assert!(b_uds.exists(), "the other VM runs on");

    drop(b.stdin.take());
    assert_eq!(wait_exit(&mut b, Duration::from_secs(15)).code(), Some(0));
    assert!(!b_uds.exists(), "stdin's EOF removed the socket");

    controlled_serves(&base, &cache, &kernel, &init);

    for kind in ["vcpu", "devices", "controller", "watcher"] {
        let share = base.join(format!("share-{kind}"));
        std::fs::create_dir_all(&share).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_arrow-vmm"))
            .env("ARROW_CACHE", &cache)
            .env("ARROW_VMM_SELF_TEST", "1")
            .args(["serve", "--memory", "128M", "--seccomp-self-test", kind])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--init")
            .arg(&init)
            .arg("--vsock-uds")
            .arg(base.join(format!("{kind}.sock")))
            .arg("--shared-dir")
            .arg(&share)
            .stdin(Stdio::null())
            .output()
            .expect("run arrow-vmm serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("self-test {kind}: {:?}\n{stderr}", out.status);
        assert_eq!(
            out.status.code(),
            Some(128 + libc::SIGSYS),
            "{kind}: {stderr}"
        );
        assert!(
            stderr.contains("killed by SIGSYS"),
            "{kind}: the keeper says why: {stderr}"
        );
        assert!(
            !stderr.contains("NOT refused"),
            "{kind}: the call went through: {stderr}"
        );
    }
    // Outside tests the hook is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_arrow-vmm"))
        .env_remove("ARROW_VMM_SELF_TEST")
        .args(["serve", "--seccomp-self-test", "vcpu", "--kernel"])
        .arg(&kernel)
        .arg("--vsock-uds")
        .arg(base.join("refused.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("for tests only"));
    std::fs::remove_dir_all(&base).unwrap();
}
