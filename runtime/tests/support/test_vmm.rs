//! `arrow-test-vmm`: `arrow-vmm serve` without a VM, for the pod runtime's
//! tests on hosts without KVM or containerd (`tests/pod.rs`). Never
//! installed; nothing but those tests runs it.
//!
//! It keeps the VMM's side of the contract the runtime relies on: the
//! command line (`serve --vsock-uds PATH --shared-dir DIR --control-fd N`,
//! other flags ignored), the control channel (`ready` first, `stop`
//! answered, its end or garbage ends the "VM"), and the hybrid vsock socket
//! (`CONNECT <port>` → `OK <port>`), whose agent, stdio and port-forward
//! ports lead to the real agent: arrow-init in its `--listen-unix` mode on
//! the host, with the pod's share as its share. arrow-init runs in a PID
//! namespace of its own, under this binary as its PID 1 (`arrow-test-vmm
//! init CMD...`, a minimal init: arrow-init as PID 1 would be the guest's
//! init), killed if this process dies: as in a VM, nothing the pod ran
//! outlives it. The "VM" ends when the agent does (a
//! Shutdown request, or killed), as a VM ends with its PID 1.
//!
//! arrow-init is `$ARROW_INIT_BIN`, else the `arrow-init` next to this
//! binary (cargo builds both into the same target directory).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use proto::vmm_control::{self, ControlRequest, VmmMessage};
use proto::vmm_ready::VmmReady;

/// How long arrow-init may take to listen.
const AGENT_START: Duration = Duration::from_secs(10);
/// The longest `CONNECT <port>` line accepted.
const MAX_CONNECT_LINE: usize = 32;

struct Args {
    vsock_uds: PathBuf,
    shared_dir: PathBuf,
    control_fd: i32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("serve") {
        return Err(
            "usage: arrow-test-vmm serve --vsock-uds PATH --shared-dir DIR \
                    --control-fd N [arrow-vmm's other flags, ignored]"
                .into(),
        );
    }
    let (mut vsock_uds, mut shared_dir, mut control_fd) = (None, None, None);
    while let Some(flag) = args.next() {
        if matches!(flag.as_str(), "--no-template" | "--no-confine") {
            continue;
        }
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--vsock-uds" => vsock_uds = Some(PathBuf::from(value)),
            "--shared-dir" => shared_dir = Some(PathBuf::from(value)),
            "--control-fd" => {
                control_fd = Some(value.parse().map_err(|e| format!("--control-fd: {e}"))?)
            }
            _ => {}
        }
    }
    Ok(Args {
        vsock_uds: vsock_uds.ok_or("--vsock-uds is required")?,
        shared_dir: shared_dir.ok_or("--shared-dir is required")?,
        control_fd: control_fd.ok_or("--control-fd is required")?,
    })
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("init") {
        return init(std::env::args().skip(2).collect());
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arrow-test-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let started = Instant::now();
    let args = parse_args()?;
    // SAFETY: the runtime passes its socket pair's other end with this
    // number and clears its close-on-exec for us alone; nothing else in
    // this process owns it.
    let control = unsafe { UnixStream::from_raw_fd(args.control_fd) };
    // A mount namespace of our own whose mounts are slaves of the host's:
    // the bind below stays here, and the container roots the runtime
    // mounts on the share reach us (and arrow-init), as they reach a VMM.
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(CLONE_NEWNS): {e}"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| format!("making / a slave: {e}"))?;
    let vmm_dir = args
        .vsock_uds
        .parent()
        .ok_or("--vsock-uds has no directory")?;
    let dir = vmm_dir.join("test-agent");
    for sub in ["shared", "sysctl/kernel"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| format!("creating {}: {e}", dir.join(sub).display()))?;
    }
    mount(
        Some(&args.shared_dir),
        &dir.join("shared"),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("binding the share: {e}"))?;

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut agent = Command::new(exe);
    agent
        .arg("init")
        .arg(arrow_init()?)
        .arg("--listen-unix")
        .arg(&dir);
    // SAFETY: runs in the forked child before exec; prctl and unshare
    // are async-signal-safe system calls on integers. The new PID
    // namespace is for the child's children (see `init`).
    unsafe {
        agent.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1
                || libc::unshare(libc::CLONE_NEWPID) == -1
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut agent = agent
        .spawn()
        .map_err(|e| format!("starting arrow-init: {e}"))?;
    let agent_pid = agent.id();
    // Its last socket.
    let deadline = Instant::now() + AGENT_START;
    while !dir.join("forward.sock").exists() {
        if Instant::now() > deadline || matches!(agent.try_wait(), Ok(Some(_))) {
            let _ = agent.kill();
            return Err("arrow-init did not listen".into());
        }
        thread::sleep(Duration::from_millis(10));
    }
    let vsock = UnixListener::bind(&args.vsock_uds)
        .map_err(|e| format!("binding {}: {e}", args.vsock_uds.display()))?;
    let agent_dir = dir.clone();
    thread::spawn(move || serve_vsock(&vsock, &agent_dir));

    let mut writer = control
        .try_clone()
        .map_err(|e| format!("control channel: {e}"))?;
    let ready = VmmReady {
        ready: true,
        cloned: false,
        pid: std::process::id(),
        vsock_uds: args.vsock_uds.display().to_string(),
        ready_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    vmm_control::write_message(&mut writer, &VmmMessage::Ready(ready))
        .map_err(|e| e.to_string())?;

    // The agent's end is the VM's.
    let socket = args.vsock_uds.clone();
    thread::spawn(move || {
        let _ = agent.wait();
        let _ = std::fs::remove_file(&socket);
        std::process::exit(0);
    });
    let mut requests = io::BufReader::new(control);
    loop {
        let reply = match vmm_control::read_message::<ControlRequest>(&mut requests) {
            Ok(ControlRequest::Stop) => {
                let _ = vmm_control::write_message(&mut writer, &VmmMessage::Done);
                break;
            }
            Ok(other) => VmmMessage::Failed(format!("arrow-test-vmm runs no VM: no {other:?}")),
            // The runtime's end closed, or it said something else: as
            // arrow-vmm, stop.
            Err(_) => break,
        };
        if vmm_control::write_message(&mut writer, &reply).is_err() {
            break;
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = std::fs::remove_file(&args.vsock_uds);
    Ok(())
}

/// Runs `command` in the PID namespace this process's children start in:
/// its first child is that namespace's PID 1 ([`reap`]), which runs the
/// command. Exits with the command's status; if this process dies, so does
/// the namespace's PID 1, and with it, by the kernel, every process in the
/// namespace.
fn init(command: Vec<String>) -> ExitCode {
    // SAFETY: this process has one thread (it was just executed and
    // started none), so the child may do anything after fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // SAFETY: prctl with integer arguments only.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            std::process::exit(reap(&command));
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                    return ExitCode::from(u8::try_from(code).unwrap_or(1))
                }
                Err(nix::errno::Errno::EINTR) => {}
                Ok(_) | Err(_) => return ExitCode::FAILURE,
            }
        },
        Err(e) => {
            eprintln!("arrow-test-vmm init: fork: {e}");
            ExitCode::FAILURE
        }
    }
}

/// PID 1 of the agent's namespace: runs `command`, reaps whatever is
/// orphaned to it, and returns the command's exit code once it ends.
fn reap(command: &[String]) -> i32 {
    let Some((program, args)) = command.split_first() else {
        eprintln!("arrow-test-vmm init: no command");
        return 1;
    };
    let child = match Command::new(program).args(args).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("arrow-test-vmm init: starting {program}: {e}");
            return 1;
        }
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    loop {
        match nix::sys::wait::wait() {
            Ok(nix::sys::wait::WaitStatus::Exited(p, code)) if p == pid => return code,
            Ok(nix::sys::wait::WaitStatus::Signaled(p, signal, _)) if p == pid => {
                return 128 + signal as i32
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 1,
        }
    }
}

fn arrow_init() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ARROW_INIT_BIN") {
        return Ok(path.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe.with_file_name("arrow-init");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no arrow-init at {} nor $ARROW_INIT_BIN",
            path.display()
        ))
    }
}

/// Serves the hybrid vsock socket: each connection names a guest port,
/// which leads to one of the agent's sockets.
fn serve_vsock(listener: &UnixListener, agent_dir: &Path) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let agent_dir = agent_dir.to_path_buf();
        thread::spawn(move || {
            if let Err(e) = connect(conn, &agent_dir) {
                eprintln!("arrow-test-vmm: vsock connection: {e}");
            }
        });
    }
}

fn connect(mut conn: UnixStream, agent_dir: &Path) -> io::Result<()> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_CONNECT_LINE {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let port: u32 = String::from_utf8_lossy(&line)
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad line {line:?}")))?;
    let socket = match port {
        proto::AGENT_PORT => "agent.sock",
        proto::STDIO_PORT => "stdio.sock",
        proto::FORWARD_PORT => "forward.sock",
        // Nothing listens there: the connection closes, as a reset would.
        _ => return Ok(()),
    };
    let guest = UnixStream::connect(agent_dir.join(socket))?;
    conn.write_all(format!("OK {port}\n").as_bytes())?;
    let (conn2, guest2) = (conn.try_clone()?, guest.try_clone()?);
    let up = thread::spawn(move || pump(conn2, guest2));
    pump(guest, conn);
    let _ = up.join();
    Ok(())
}

/// Copies until EOF, then passes the EOF on.
fn pump(mut from: UnixStream, mut to: UnixStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}
