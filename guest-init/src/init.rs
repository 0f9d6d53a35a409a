//! What arrow-init does from start to serving, as PID 1 in the guest or, for
//! host tests, as an ordinary process serving on Unix sockets.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::thread;

use crate::agent::{self, Agent, OnShutdown};
use crate::clone::{ClonePlatform, GuestPlatform, RecordingPlatform};
use crate::conn::Listener;
use crate::container::{Containers, Layout};
use crate::reaper::Reaper;
use crate::supervisor::Supervisor;
use crate::{cmdline, forward, log, log_error, mounts, network, stdio, vsock};

/// PID 1: mounts, agent on vsock, and never returns. A fatal error powers
/// the VM off; if even that fails, it idles (exiting would panic the kernel).
pub fn run_pid1() -> ! {
    mounts::mount_all();
    // Before any other open, so no fd of ours lands on 0-2.
    let null = std_fds_and_null();
    log::use_kmsg();
    let settings = read_settings();
    log::set_debug(settings.debug);
    // Before the template snapshot: clones get lo and a NIC that is up.
    match network::boot_up() {
        Ok(true) => {
            if let Err(e) = network::tune_tcp() {
                log_error!("tuning TCP for {}: {e}", network::BOOT_NIC);
            }
        }
        Ok(false) => {}
        Err(e) => log_error!("bringing lo and {} up: {e}", network::BOOT_NIC),
    }
    let err = match null.and_then(|null| serve_vsock(&settings, null)) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    log_error!("fatal: {err}; powering off");
    agent::power_off();
    loop {
        thread::park();
    }
}

fn read_settings() -> cmdline::Settings {
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_else(|e| {
        log_error!("/proc/cmdline: {e}");
        String::new()
    });
    let (settings, complaints) = cmdline::parse(&text);
    for complaint in complaints {
        log_error!("kernel command line: {complaint}");
    }
    settings
}

fn serve_vsock(
    settings: &cmdline::Settings,
    null: OwnedFd,
) -> io::Result<std::convert::Infallible> {
    let listeners = Listeners {
        agent: vsock::listen_port(settings.agent_port)?,
        stdio: vsock::listen_port(settings.stdio_port)?,
        forward: vsock::listen_port(settings.forward_port)?,
    };
    if settings.debug {
        console_line("arrow-init: ready\n");
    }
    Err(serve(
        null,
        listeners,
        OnShutdown::PowerOff,
        Box::new(GuestPlatform),
        Layout::guest(),
        true,
    ))
}

/// Host-test mode: serves the agent on `dir`/agent.sock, stdio on
/// `dir`/stdio.sock and port-forward on `dir`/forward.sock; Shutdown exits. Becomes a child subreaper so orphans
/// come back to it as they would to PID 1. InitClone only records what it
/// would do, in `dir`/[`CLONE_JOURNAL`]: this runs on the host, whose clock,
/// random pool and hostname are not ours. Containers live under `dir` too
/// (see [`Layout::for_host_tests`]), in a mount namespace of their own.
pub fn run_unix(dir: &Path) -> io::Result<()> {
    // First, while this process has a single thread (unshare needs that).
    let layout = Layout::for_host_tests(dir);
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let null = std_fds_and_null()?;
    let bind = |name: &str| -> io::Result<Listener> {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(UnixListener::bind(path)?.into())
    };
    let platform = RecordingPlatform::for_host_tests(&dir.join(CLONE_JOURNAL))?;
    let listeners = Listeners {
        agent: bind("agent.sock")?,
        stdio: bind("stdio.sock")?,
        forward: bind("forward.sock")?,
    };
    Err(serve(
        null,
        listeners,
        OnShutdown::Exit,
        Box::new(platform),
        layout,
        false,
    ))
}

/// The file in the `--listen-unix` directory where InitClone's effects are
/// recorded, one line each.
pub const CLONE_JOURNAL: &str = "clone-platform.log";

/// The listening sockets of arrow-init's three services.
struct Listeners {
    agent: Listener,
    stdio: Listener,
    forward: Listener,
}

/// Starts the reaper, the stdio and the port-forward services, then serves
/// the agent on this thread; returns only the error that stopped it.
fn serve(
    null: OwnedFd,
    listeners: Listeners,
    on_shutdown: OnShutdown,
    platform: Box<dyn ClonePlatform>,
    layout: Layout,
    guest_network: bool,
) -> io::Error {
    let reaper = match Reaper::start() {
        Ok(reaper) => reaper,
        Err(e) => return e,
    };
    let supervisor = Arc::new(Supervisor::new(reaper, null));
    let for_stdio = Arc::clone(&supervisor);
    let Listeners {
        agent: agent_l,
        stdio: stdio_l,
        forward: forward_l,
    } = listeners;
    let stdio_thread = thread::Builder::new()
        .name("stdio-accept".into())
        .spawn(move || {
            let e = stdio::serve(for_stdio, stdio_l);
            log_error!("stdio service stopped: {e}");
        });
    if let Err(e) = stdio_thread {
        return e;
    }
    let forward_thread = thread::Builder::new()
        .name("forward-accept".into())
        .spawn(move || {
            let e = forward::serve(forward_l);
            log_error!("port-forward service stopped: {e}");
        });
    if let Err(e) = forward_thread {
        return e;
    }
    let containers = Containers::new(layout);
    let mut agent = Agent::new(supervisor, containers, on_shutdown, platform);
    if guest_network {
        agent = agent.with_guest_network();
    }
    agent::serve(Arc::new(agent), agent_l)
}

/// Makes sure fds 0-2 are open (the kernel leaves them closed when the
/// rootfs has no /dev/console), so a child's stdio fds are always >= 3, and
/// returns a /dev/null fd for unattached stdio. One open in the usual case.
fn std_fds_and_null() -> io::Result<OwnedFd> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        let fd: OwnedFd = file.into();
        let raw = fd.into_raw_fd();
        if raw > 2 {
            // SAFETY: we just took ownership of it from `fd`.
            return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        // Leave it in place as 0, 1 or 2 and open again. It is
        // close-on-exec, but a child's 0-2 are always set explicitly.
    }
}

/// One best-effort line on the (slow) serial console.
fn console_line(line: &str) {
    if let Ok(mut console) = OpenOptions::new().write(true).open("/dev/console") {
        let _ = console.write_all(line.as_bytes());
    }
}
