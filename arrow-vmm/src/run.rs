//! `arrow-vmm run`: boot a fresh microVM (or clone its template) whose
//! initramfs holds a root tree and `arrow-init`, run one program through the
//! agent with stdio forwarded both ways, and exit with the program's exit
//! code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use proto::agent::{CreateProcess, StreamKind};
use proto::client::AgentClient;
use proto::{hybrid, STDIO_PORT};
use vmm_core::vm::{ConsoleOutput, Vm};

use crate::guest::{self, connect_agent, explain_exit, AgentHooks, MachineArgs, Timings};
use crate::stdio;
use vmm_core::cancel::Cancel;
use vmm_core::launch::{Launch, Origin};

fn unix_time_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The id of the program in the agent.
const PROCESS_ID: &str = "main";
/// How long the guest may take to power off after the program ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The VM a program runs in: what it boots from and its shape.
#[derive(clap::Args)]
pub struct VmArgs {
    #[command(flatten)]
    machine: MachineArgs,
    /// Directory packed as the guest's root tree (e.g. a busybox tree).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Share this host directory with the guest over virtio-fs (tag
    /// "arrow"; in the guest: mount -t virtiofs arrow <dir>).
    #[arg(long, value_name = "DIR")]
    share: Option<PathBuf>,
    /// Show the guest kernel console on stderr.
    #[arg(long)]
    console: bool,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Boot afresh instead of cloning the matching template.
    #[arg(long)]
    no_template: bool,
    /// The guest's hostname.
    #[arg(long, default_value = "arrow")]
    hostname: String,
    /// Give the program a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Environment variables, KEY=VALUE.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long, default_value = "/")]
    workdir: String,
    /// User as UID[:GID].
    #[arg(short = 'u', long, default_value = "0:0")]
    user: String,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// A private directory for the VM's sockets, removed when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> anyhow::Result<Self> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        Self::sweep_stale(&base);
        let dir = base.join(format!("arrow-vmm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl RunDir {
    /// Removes the directories of arrow-vmm processes that died without
    /// cleaning up (killed by SIGKILL, say).
    fn sweep_stale(base: &Path) {
        let Ok(entries) = std::fs::read_dir(base) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("arrow-vmm-"))
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let dead = matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Err(nix::errno::Errno::ESRCH)
            );
            if dead {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn parse_user(user: &str) -> anyhow::Result<(u32, u32)> {
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let parse = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| anyhow!("--user {user:?}: numeric UID[:GID] expected"))
    };
    Ok((parse(uid)?, parse(gid)?))
}

fn attach(uds: &Path, kind: StreamKind) -> anyhow::Result<std::os::unix::net::UnixStream> {
    let stream = hybrid::connect(uds, STDIO_PORT, Duration::from_secs(5))
        .context("connecting a stdio stream")?;
    AgentClient::attach_stream(stream, PROCESS_ID, kind)
        .with_context(|| format!("attaching {kind:?}"))
}

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT to the program, and terminal
/// size changes to its tty.
fn forward_signals(client: Arc<AgentClient>, tty: bool) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH])
            .context("installing signal handlers")?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let result = if sig == SIGWINCH {
                match (tty, stdio::terminal_size()) {
                    (true, Some((rows, cols))) => client.resize_tty(PROCESS_ID, rows, cols),
                    _ => Ok(()),
                }
            } else {
                client.signal(PROCESS_ID, sig, false)
            };
            if let Err(e) = result {
                eprintln!("arrow-vmm: forwarding signal {sig}: {e}");
            }
        }
    });
    Ok(())
}

/// A running guest whose agent answered, with the directory of its sockets.
struct Guest {
    vm: Vm,
    client: Arc<AgentClient>,
    uds: PathBuf,
    run_dir: RunDir,
    template: Option<PathBuf>,
}

fn start_guest(
    args: &VmArgs,
    origin: Origin,
    hostname: &str,
    timings: &Timings,
) -> anyhow::Result<Guest> {
    let run_dir = RunDir::create()?;
    let uds = run_dir.0.join("vsock.sock");
    let config = guest::vm_config(
        &args.machine,
        args.rootfs.as_deref(),
        args.console,
        &uds,
        args.share.as_deref(),
    )?;
    let show_console = args.console;
    let mut hooks = AgentHooks {
        uds: uds.clone(),
        timings,
        show_cmdline: args.console,
        console: Box::new(move || {
            Ok(if show_console {
                ConsoleOutput::Stderr
            } else {
                ConsoleOutput::Sink
            })
        }),
    };
    // The program gets this process's signals; a start is not cancelled.
    let cancel = Cancel::default();
    let key = guest::template_key(&config)?;
    let cache = guest::template_cache();
    let launch = Launch {
        origin,
        cache: &cache,
        key: &key,
        ready_timeout: Duration::from_secs(args.machine.boot_timeout),
        cancel: &cancel,
    };
    let launched = launch.start(config, &mut hooks)?;
    let client = match launched.ready {
        Some(client) => client,
        None => connect_agent(&launched.vm, &uds, launch.ready_timeout, &cancel)?,
    };
    // A booted guest gets the same identity a clone would.
    let entropy = proto::client::fresh_entropy(64).context("reading host entropy")?;
    client
        .init_clone(unix_time_ns(), &entropy, hostname)
        .context("initialising the guest")?;
    Ok(Guest {
        vm: launched.vm,
        client: Arc::new(client),
        uds,
        run_dir,
        template: launched.template,
    })
}

impl Guest {
    /// Powers the guest off cleanly, stops it if it does not comply, and
    /// removes its sockets.
    ///
    /// What is waited for is the VM's exit, not the agent's reply: the guest
    /// may power off before its reply leaves the vsock device, and this
    /// process holds the device's end of the connection until the VM is
    /// dropped, so the reply could be waited for forever.
    fn shut_down(mut self) {
        let (asked_tx, asked) = std::sync::mpsc::channel();
        let client = Arc::clone(&self.client);
        std::thread::spawn(move || {
            let _ = asked_tx.send(client.shutdown());
        });
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        loop {
            if self.vm.wait(Some(Duration::from_millis(10))).is_some() {
                break;
            }
            if let Ok(Err(e)) = asked.try_recv() {
                eprintln!("arrow-vmm: the guest refused to power off ({e}); stopping it");
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "arrow-vmm: guest did not power off within {SHUTDOWN_GRACE:?}; stopping it"
                );
                break;
            }
        }
        // Stopping and dropping the VM closes the connection, which ends the
        // shutdown call if it still waits.
        self.vm.stop();
        drop(self.run_dir);
    }
}

/// `arrow-vmm template create`: boots a VM, snapshots it as the template for
/// its inputs (replacing any), and prints where it is.
pub fn create_template(args: VmArgs) -> anyhow::Result<ExitCode> {
    let timings = Timings::new(Instant::now(), args.machine.timings);
    let guest = start_guest(&args, Origin::BootAndSaveTemplate, "arrow", &timings)?;
    if let Some(dir) = &guest.template {
        println!("{}", dir.display());
    }
    guest.shut_down();
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let timings = Timings::new(Instant::now(), args.vm.machine.timings);
    let (uid, gid) = parse_user(&args.user)?;
    let origin = if args.no_template {
        Origin::Boot
    } else {
        Origin::CloneOrBoot
    };
    let guest = start_guest(&args.vm, origin, &args.hostname, &timings)?;
    timings.mark("agent-ready");
    let client = guest.client.clone();
    let uds = guest.uds.clone();

    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/root".to_owned(),
    ];
    if args.tty {
        env.push("TERM=xterm".into());
    }
    env.extend(args.env);
    client
        .create_process(CreateProcess {
            id: PROCESS_ID.into(),
            args: args.command,
            env,
            cwd: args.workdir,
            uid,
            gid,
            terminal: args.tty,
            stdin: true,
            ..Default::default()
        })
        .context("creating the program in the guest")?;

    let stdin = attach(&uds, StreamKind::Stdin)?;
    let mut outputs = vec![stdio::spawn_output(
        attach(&uds, StreamKind::Stdout)?,
        std::io::stdout(),
    )];
    if !args.tty {
        outputs.push(stdio::spawn_output(
            attach(&uds, StreamKind::Stderr)?,
            std::io::stderr(),
        ));
    }
    let raw_terminal = if args.tty {
        if let Some((rows, cols)) = stdio::terminal_size() {
            client.resize_tty(PROCESS_ID, rows, cols)?;
        }
        stdio::RawTerminal::enable()
    } else {
        None
    };
    forward_signals(client.clone(), args.tty)?;
    client
        .start_process(PROCESS_ID)
        .context("starting the program in the guest")?;
    timings.mark("program-started");
    stdio::spawn_stdin(stdin);

    let status = client.wait(PROCESS_ID);
    for output in outputs {
        let _ = output.join();
    }
    drop(raw_terminal);
    timings.mark("program-exited");
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            let exit = guest.vm.wait(Some(Duration::from_secs(1)));
            let why = exit
                .map(|x| explain_exit(&guest.vm, &x))
                .unwrap_or_default();
            bail!("lost the program's exit status: {e}. {why}");
        }
    };

    guest.shut_down();
    timings.mark("vm-stopped");

    Ok(if status.signal != 0 {
        eprintln!("arrow-vmm: program killed by signal {}", status.signal);
        ExitCode::from(128u8.wrapping_add(status.signal as u8))
    } else {
        ExitCode::from(status.exit_code as u8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users() {
        assert_eq!(parse_user("0:0").unwrap(), (0, 0));
        assert_eq!(parse_user("1000").unwrap(), (1000, 1000));
        assert_eq!(parse_user("5:7").unwrap(), (5, 7));
        assert!(parse_user("root").is_err());
    }
}
