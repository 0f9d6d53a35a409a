//! `arrow-vmm serve`: the per-pod VMM process the containerd shim starts.
//!
//! It starts the pod's guest (a clone of the matching template, made first
//! if missing, or a fresh boot), says so (on the shim's control channel,
//! `--control-fd`, see `control.rs`; else one JSON line on stdout), and
//! then only runs the VM: the shim is the agent's client (it calls
//! `InitClone`, creates the containers) through the hybrid vsock socket,
//! and the containers' files come over the virtio-fs share. With
//! `--net-tap-fd N` the guest gets a NIC over the tap the shim opened and
//! left open as descriptor N (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`); a clone
//! attaches it to the template's NIC. The process
//! ends with the VM:
//!
//! - the guest resets or powers off: exit 0 (1 if the kernel panicked);
//! - SIGTERM or SIGINT, a `stop` request or the control channel's end (the
//!   shim holds the other end, so a VMM never outlives a killed shim), or
//!   stdin's EOF with `--exit-on-stdin-eof`: the VM is stopped, its socket
//!   removed, exit 0;
//! - a fatal VM error: exit 1, the reason on stderr.
//!
//! Failures before the ready line go to stderr with a non-zero exit.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};

use proto::vmm_control::VmmMessage;
use proto::vmm_ready::VmmReady;
use vmm_core::devices::console_log::ConsoleLog;

use crate::confine;
use crate::control::{self, ControlChannel, Event};
use crate::counters::{CountersFile, PUBLISH_INTERVAL};
use crate::jail::{Access, Jail, JailPath};
use crate::paths;
use crate::seccomp::{self, Enforcement, SeccompPolicy, VmmThread};
use vmm_core::exit::VmExit;
use vmm_core::template::TemplateCache;
use vmm_core::vm::ConsoleOutput;
use vmm_core::vm::VmConfig;

use crate::guest::{self, explain_exit, AgentHooks, MachineArgs, Timings};
use vmm_core::cancel::{Cancel, Interrupted};
use vmm_core::launch::{Launch, LaunchError, Origin};

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Path of the hybrid vsock Unix socket through which the host reaches
    /// guest ports (`CONNECT <port>`); a stale socket there is replaced, and
    /// the socket is removed when the VM ends.
    #[arg(long, value_name = "PATH")]
    vsock_uds: PathBuf,
    /// Host directory shared with the guest over virtio-fs, tag "arrow".
    #[arg(long, value_name = "DIR")]
    shared_dir: Option<PathBuf>,
    /// Append the guest console to this file (it is dropped otherwise); the
    /// file is kept at most 1 MiB long, holding the newest output.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Publish the devices' counters to this file (`proto::vm_counters`),
    /// rewritten whole every second and when the VM stops. Jailed, it
    /// must be in the vsock socket's directory, the only one the VMM may
    /// write.
    #[arg(long, value_name = "FILE")]
    counters: Option<PathBuf>,
    /// Boot afresh instead of cloning the matching template.
    #[arg(long)]
    no_template: bool,
    /// Stop the VM and exit when stdin reaches EOF.
    #[arg(long)]
    exit_on_stdin_eof: bool,
    /// The shim's control channel (`proto::vmm_control`): an inherited
    /// socket. The ready message goes there instead of stdout; the VM
    /// stops when the other end closes.
    #[arg(long, value_name = "FD")]
    control_fd: Option<i32>,
    /// An empty directory to build the VMM's jail on (see `jail.rs`);
    /// default: `<socket path>.jail` beside the vsock socket.
    #[arg(long, value_name = "DIR")]
    jail: Option<PathBuf>,
    /// Debugging only: no jail, no seccomp filters, and keep every
    /// privilege, descriptor and variable the caller gave (see `confine.rs`,
    /// `jail.rs` and `seccomp.rs`).
    #[arg(long)]
    no_confine: bool,
    /// Tests only (refused unless ARROW_VMM_SELF_TEST=1): once confined, a
    /// thread of this kind (vcpu, devices, controller, watcher) makes a
    /// call its filter forbids, which must kill the VMM with SIGSYS.
    #[arg(long, value_name = "KIND", hide = true)]
    seccomp_self_test: Option<String>,
}

/// What the VMM says once the guest is ready.
fn ready_message(cloned: bool, pid: u32, vsock_uds: &str, ready: Duration) -> VmmReady {
    VmmReady {
        ready: true,
        cloned,
        pid,
        vsock_uds: vsock_uds.to_owned(),
        ready_ms: u64::try_from(ready.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The controller's life while the VM runs: answers the shim's requests,
/// publishes the counters every [`PUBLISH_INTERVAL`], and returns how the
/// VM ended. A scoped watcher thread turns the VM's end into an event, so
/// one wait serves both. Once it is started, the main thread takes its
/// own filter: from here on it only waits, answers, publishes the
/// counters, stops and tears down (no more threads).
fn control_loop<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    vm: &'env vmm_core::vm::Vm,
    events: &Receiver<Event>,
    events_tx: Sender<Event>,
    control: Option<&ControlChannel>,
    mut counters: Option<&mut CountersFile>,
    seccomp: Option<Arc<SeccompPolicy>>,
) -> anyhow::Result<VmExit> {
    let watcher_policy = seccomp.clone();
    std::thread::Builder::new()
        .name("exit".into())
        .spawn_scoped(scope, move || {
            // A filter that fails to apply leaves this thread only waiting;
            // the failure is reported by the threads that do work.
            if let Some(policy) = &watcher_policy {
                let _ = policy.apply(VmmThread::Watcher);
            }
            let exit = vm.wait(None).unwrap_or(VmExit::Stopped);
            let _ = events_tx.send(Event::Exited(exit));
        })
        .context("starting the exit watcher")?;
    if let Some(policy) = &seccomp {
        if let Err(e) = policy.apply(VmmThread::Controller) {
            // The exit watcher must see an end, or the scope never closes.
            vm.stop_handle().stop();
            return Err(e);
        }
    }
    let mut next_publish = Instant::now();
    loop {
        if let Some(file) = counters.as_deref_mut() {
            if Instant::now() >= next_publish {
                file.publish(vm);
                next_publish = Instant::now() + PUBLISH_INTERVAL;
            }
        }
        let wait = match counters {
            Some(_) => next_publish.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        match events.recv_timeout(wait) {
            Ok(Event::Exited(exit)) => return Ok(exit),
            Ok(Event::Request(request)) => {
                let reply = control::answer(vm, request);
                if let Some(control) = control {
                    // A shim that is gone closed the channel: the reader
                    // has already asked for the stop.
                    let _ = control.send(&reply);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            // The exit watcher holds a sender until it has sent the exit.
            Err(RecvTimeoutError::Disconnected) => return Ok(VmExit::Stopped),
        }
    }
}

/// Makes room for the vsock socket at `path`: a socket nobody accepts on
/// (left by a VMM that was killed) is removed; a live one, or anything else,
/// is an error, never replaced.
fn prepare_socket_path(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("--vsock-uds {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!("--vsock-uds {}: exists and is not a socket", path.display());
    }
    match UnixStream::connect(path) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display())),
        Ok(_) => bail!(
            "--vsock-uds {}: another process is listening there",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("--vsock-uds {}", path.display())),
    }
}

/// Confines a watcher thread; a failure stops the VM.
fn confine_watcher(seccomp: Option<&SeccompPolicy>, cancel: &Cancel) -> bool {
    match seccomp.map(|p| p.apply(VmmThread::Watcher)) {
        Some(Err(e)) => {
            cancel.request(format!("{e:#}"));
            false
        }
        _ => true,
    }
}

/// Turns SIGTERM and SIGINT into a cancel request.
fn watch_signals(cancel: Arc<Cancel>, seccomp: Option<Arc<SeccompPolicy>>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if !confine_watcher(seccomp.as_deref(), &cancel) {
                return;
            }
            for sig in signals.forever() {
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                cancel.request(format!("{name} received"));
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Reads `input` to its end (or an error), then requests a cancel.
fn watch_eof(
    mut input: impl Read + Send + 'static,
    cancel: Arc<Cancel>,
    seccomp: Option<Arc<SeccompPolicy>>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            if !confine_watcher(seccomp.as_deref(), &cancel) {
                return;
            }
            let mut buf = [0u8; 512];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            cancel.request("stdin closed".into());
        })
        .context("starting the stdin thread")?;
    Ok(())
}

/// The guest console: appended to `path`, kept at most
/// [`CONSOLE_LOG_MAX_BYTES`](vmm_core::devices::console_log::CONSOLE_LOG_MAX_BYTES) long (the newest output), or dropped.
fn console_output(path: Option<&Path>) -> anyhow::Result<ConsoleOutput> {
    let Some(path) = path else {
        return Ok(ConsoleOutput::Sink);
    };
    let log = ConsoleLog::open(path)
        .with_context(|| format!("opening the console log {}", path.display()))?;
    Ok(ConsoleOutput::Writer(Box::new(log)))
}

/// `path` absolute and without symlinks.
fn canonical(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))
}

/// The vsock socket's path with its directory resolved (the socket itself
/// may not exist yet).
fn absolute_socket_path(path: &Path) -> anyhow::Result<PathBuf> {
    absolute_file_path(path, "--vsock-uds")
}

/// `path` with its directory resolved (the file itself may not exist
/// yet); `option` names it in errors.
fn absolute_file_path(path: &Path, option: &str) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{option} {}: no file name", path.display()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    Ok(canonical(dir)?.join(name))
}

/// What the VMM of `config` needs in its jail: KVM, the kernel (arrow-init
/// is in the initramfs, in memory already), the template to clone (or the
/// cache, to create it), the share, its sockets' directory and console log.
fn jail_plan(args: &ServeArgs, config: &VmConfig, key: &str) -> anyhow::Result<Jail> {
    let socket_dir = args
        .vsock_uds
        .parent()
        .context("the vsock socket has no directory")?
        .to_path_buf();
    let mut entries = vec![
        JailPath::new("/dev/kvm", Access::Device),
        JailPath::new(&config.kernel, Access::ReadOnly),
        JailPath::new(&socket_dir, Access::ReadWrite),
    ];
    if !args.no_template {
        let cache = TemplateCache::new(paths::cache_dir().join("templates"));
        let template = cache.dir(key);
        if template.join(vmm_core::snapshot::VMSTATE_FILE).is_file() {
            // Cloned, never written.
            entries.push(JailPath::new(template, Access::ReadOnly));
        } else {
            // Created here (or by a concurrent launch this one waits for).
            entries.push(JailPath::new(
                paths::cache_dir().join("templates"),
                Access::ReadWrite,
            ));
        }
    }
    if let Some(share) = &args.shared_dir {
        // With the containers' mounts, now and later; the read-only top
        // of the shim's view stays read-only.
        entries.push(JailPath::new(canonical(share)?, Access::ReadWrite).recursive());
    }
    if let Some(log) = &args.console_log {
        if log.parent() != Some(socket_dir.as_path()) {
            entries.push(JailPath::new(log, Access::ReadWrite));
        }
    }
    if let Some(counters) = &args.counters {
        // Replaced by a rename, so its directory must be writable: only
        // the sockets' is, and no other is bound for it.
        if counters.parent() != Some(socket_dir.as_path()) {
            bail!(
                "--counters {}: must be in the vsock socket's directory {}",
                counters.display(),
                socket_dir.display()
            );
        }
    }
    let root = match &args.jail {
        Some(dir) => dir.clone(),
        None => {
            let mut name = args.vsock_uds.as_os_str().to_owned();
            name.push(".jail");
            PathBuf::from(name)
        }
    };
    Ok(Jail {
        root,
        paths: entries,
    })
}

pub fn serve(mut args: ServeArgs) -> anyhow::Result<ExitCode> {
    let timings = Timings::new(Instant::now(), args.machine.timings);
    // Refused before anything else happens.
    let self_test = match &args.seccomp_self_test {
        None => None,
        Some(_) if std::env::var_os("ARROW_VMM_SELF_TEST").as_deref() != Some("1".as_ref()) => {
            bail!("--seccomp-self-test is for tests only (ARROW_VMM_SELF_TEST=1)")
        }
        Some(kind) => Some(VmmThread::parse(kind)?),
    };
    // Claimed before anything could close it.
    let control = args
        .control_fd
        .map(ControlChannel::from_inherited)
        .transpose()?;
    // The process the caller started: the one to signal, jailed or not.
    let pid = std::process::id();
    // First, while this is the only thread (the timings count it).
    if args.no_confine {
        eprintln!(
            "arrow-vmm: WARNING: --no-confine: no jail, and the VMM keeps every privilege \
             it was given; for debugging only"
        );
    } else {
        let keep: Vec<i32> = args
            .machine
            .net_tap_fd
            .into_iter()
            .chain(args.control_fd)
            .collect();
        confine::shed_inheritance(&keep).context("confining the VMM")?;
        // The jail holds these at their host paths: make them absolute
        // and free of symlinks first.
        args.vsock_uds = absolute_socket_path(&args.vsock_uds)?;
        if let Some(counters) = &args.counters {
            args.counters = Some(absolute_file_path(counters, "--counters")?);
        }
        if let Some(kernel) = &args.machine.kernel {
            args.machine.kernel = Some(canonical(kernel)?);
        }
        if let Some(share) = &args.shared_dir {
            args.shared_dir = Some(canonical(share)?);
        }
        if let Some(log) = &args.console_log {
            // Bound into the jail, so it must exist.
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(log)
                .with_context(|| format!("creating the console log {}", log.display()))?;
            args.console_log = Some(canonical(log)?);
        }
        let cache = canonical(&paths::cache_dir().join("templates")).or_else(|_| {
            let cache = TemplateCache::new(paths::cache_dir().join("templates"));
            cache.create_root()?;
            canonical(&paths::cache_dir().join("templates"))
        })?;
        // Single-threaded still: the template cache is found by this name.
        std::env::set_var("ARROW_CACHE", cache.parent().unwrap_or(&cache));
    }
    let uds = args
        .vsock_uds
        .to_str()
        .with_context(|| format!("--vsock-uds {}: not UTF-8", args.vsock_uds.display()))?
        .to_owned();
    prepare_socket_path(&args.vsock_uds)?;
    let mut config = guest::vm_config(
        &args.machine,
        None,
        false,
        &args.vsock_uds,
        args.shared_dir.as_deref(),
    )?;
    config.kernel = canonical(&config.kernel)?;
    let key = guest::template_key(&config)?;
    let seccomp = if args.no_confine {
        None
    } else {
        let enforcement = seccomp::enforcement_from_env()?;
        if enforcement == Enforcement::Log {
            eprintln!(
                "arrow-vmm: WARNING: ARROW_VMM_SECCOMP=log: the seccomp filters only log \
                 what they would refuse; for finding a filter's gaps only"
            );
        }
        // Compiled before the jail: a bad filter fails here, loudly.
        let policy = Arc::new(SeccompPolicy::new(enforcement, self_test)?);
        jail_plan(&args, &config, &key)?
            .enter()
            .context("jailing the VMM")?;
        confine::drop_privileges().context("confining the VMM")?;
        timings.mark("jailed");
        config.confinement = Some(policy.clone());
        Some(policy)
    };
    let cancel = Arc::new(Cancel::default());
    watch_signals(cancel.clone(), seccomp.clone())?;
    if args.exit_on_stdin_eof {
        watch_eof(std::io::stdin(), cancel.clone(), seccomp.clone())?;
    }
    // The shim's requests and the VM's end, for the controller below.
    let (events_tx, events) = mpsc::channel();
    if let Some(control) = &control {
        control.serve(events_tx.clone(), cancel.clone(), seccomp.clone())?;
    }
    let console_log = args.console_log.clone();
    let mut hooks = AgentHooks {
        uds: args.vsock_uds.clone(),
        timings: &timings,
        show_cmdline: false,
        console: Box::new(move || console_output(console_log.as_deref())),
    };
    let cache = guest::template_cache();
    let launch = Launch {
        origin: if args.no_template {
            Origin::Boot
        } else {
            Origin::CloneOrBoot
        },
        cache: &cache,
        key: &key,
        ready_timeout: Duration::from_secs(args.machine.boot_timeout),
        cancel: &cancel,
    };
    let launched = match launch.start(config, &mut hooks) {
        Ok(launched) => launched,
        Err(LaunchError::Interrupted(Interrupted(reason))) => {
            eprintln!("arrow-vmm: {reason} before the VM was ready; stopped");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    let mut vm = launched.vm;
    // The shim makes its own connections to the agent.
    drop(launched.ready);

    let ready = ready_message(launched.cloned, pid, &uds, timings.elapsed());
    match &control {
        Some(control) => control
            .send(&VmmMessage::Ready(ready))
            .context("sending the ready message")?,
        None => {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{}", ready.to_line())
                .and_then(|()| stdout.flush())
                .context("writing the ready line")?;
        }
    }
    timings.mark("ready");

    let mut counters = args.counters.as_deref().map(CountersFile::new);
    let exit = std::thread::scope(|scope| {
        control_loop(
            scope,
            &vm,
            &events,
            events_tx,
            control.as_ref(),
            counters.as_mut(),
            seccomp.clone(),
        )
    })?;
    vm.stop();
    // The final figures, with the devices stopped.
    if let Some(file) = counters.as_mut() {
        file.publish(&vm);
    }
    if let Some(net) = vm.net_stats() {
        eprintln!(
            "arrow-vmm: network: {} frames in ({} bytes, {} more merged into them, held {} \
             times, {} dropped), {} frames out ({} bytes, {} dropped)",
            net.rx_frames,
            net.rx_bytes,
            net.rx_coalesced,
            net.rx_held,
            net.rx_dropped,
            net.tx_frames,
            net.tx_bytes,
            net.tx_dropped
        );
    }
    let code = match &exit {
        VmExit::Stopped => {
            let why = cancel.reason().unwrap_or_else(|| "stop requested".into());
            eprintln!("arrow-vmm: {why}; VM stopped");
            ExitCode::SUCCESS
        }
        VmExit::Reset | VmExit::PowerOff => match vm.console().kernel_panic() {
            Some(panic) => {
                eprintln!("arrow-vmm: the guest kernel panicked: {panic}");
                ExitCode::from(1)
            }
            None => ExitCode::SUCCESS,
        },
        VmExit::VcpuError { .. } => {
            eprintln!("arrow-vmm: {}", explain_exit(&vm, &exit));
            ExitCode::from(1)
        }
    };
    // Dropping the VM removes its vsock socket.
    drop(vm);
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_is_one_json_object() {
        assert_eq!(
            ready_message(
                true,
                42,
                "/run/arrow/pod/vsock.sock",
                Duration::from_millis(57)
            )
            .to_line(),
            r#"{"ready":true,"cloned":true,"pid":42,"vsock_uds":"/run/arrow/pod/vsock.sock","ready_ms":57}"#
        );
        assert_eq!(
            ready_message(false, 1, "a", Duration::from_secs(16)).to_line(),
            r#"{"ready":true,"cloned":false,"pid":1,"vsock_uds":"a","ready_ms":16000}"#
        );
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("arrow-serve-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn stale_sockets_are_replaced_live_ones_and_files_are_not() {
        let dir = temp("sock");
        let path = dir.join("vsock.sock");
        prepare_socket_path(&path).unwrap();

        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = prepare_socket_path(&path).unwrap_err();
        assert!(err.to_string().contains("listening"), "{err}");
        assert!(path.exists());
        drop(listener); // the file stays, nobody accepts
        prepare_socket_path(&path).unwrap();
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").unwrap();
        let err = prepare_socket_path(&path).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert!(path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eof_on_the_input_cancels() {
        let cancel = Arc::new(Cancel::default());
        watch_eof(&b"some bytes first"[..], cancel.clone(), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while cancel.reason().is_none() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(cancel.reason().as_deref(), Some("stdin closed"));
    }

    #[test]
    fn the_console_log_is_appended_to_and_capped() {
        let dir = temp("console");
        let path = dir.join("console.log");
        std::fs::write(&path, b"old\n").unwrap();
        for line in [&b"one\n"[..], b"two\n"] {
            match console_output(Some(&path)).unwrap() {
                ConsoleOutput::Writer(mut w) => w.write_all(line).unwrap(),
                _ => panic!("a file writer expected"),
            }
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"old\none\ntwo\n");
        // A guest flooding its console: the file stays within the cap.
        match console_output(Some(&path)).unwrap() {
            ConsoleOutput::Writer(mut w) => {
                for i in 0..(3 << 20) / 4096 {
                    w.write_all(format!("{i:04095}\n").as_bytes()).unwrap();
                }
                w.write_all(b"newest\n").unwrap();
            }
            _ => panic!("a file writer expected"),
        }
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(
            len <= vmm_core::devices::console_log::CONSOLE_LOG_MAX_BYTES,
            "{len}"
        );
        assert!(std::fs::read(&path).unwrap().ends_with(b"newest\n"));
        assert!(matches!(console_output(None).unwrap(), ConsoleOutput::Sink));
        assert!(console_output(Some(&dir.join("missing/x"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
