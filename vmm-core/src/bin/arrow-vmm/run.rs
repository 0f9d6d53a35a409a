//! `arrow-vmm run`: boot a fresh microVM whose initramfs holds a root tree
//! and `arrow-init`, run one program through the agent with stdio forwarded
//! both ways, and exit with the program's exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use proto::agent::{CreateProcess, StreamKind};
use proto::client::AgentClient;
use proto::{hybrid, AGENT_PORT, GUEST_CID, STDIO_PORT};
use vmm_core::exit::VmExit;
use vmm_core::hypervisor::KvmFlavour;
use vmm_core::initramfs::Initramfs;
use vmm_core::vm::{ConsoleOutput, RestoreConfig, Vm, VmConfig, VsockConfig};

use crate::paths;
use crate::stdio;
use crate::template::{TemplateCache, TemplateInputs};

fn unix_time_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Where arrow-init lives in the initramfs (`rdinit=`).
const INIT_PATH: &str = "/.arrow/init";
/// The id of the program in the agent.
const PROCESS_ID: &str = "main";
/// How long the guest may take to power off after the program ended.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The VM a program runs in: what it boots from and its shape.
#[derive(clap::Args)]
pub struct VmArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = paths::parse_size)]
    memory: u64,
    /// Directory packed as the guest's root tree (e.g. a busybox tree).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Guest kernel (uncompressed ELF vmlinux); default: the cached build.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Static arrow-init binary; default: next to arrow-vmm.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Show the guest kernel console on stderr.
    #[arg(long)]
    console: bool,
    /// Seconds to wait for arrow-init to answer after the VM starts.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// Extra kernel arguments.
    #[arg(long = "kernel-arg")]
    kernel_args: Vec<String>,
    /// Print how long each phase took (for benchmarks) on stderr.
    #[arg(long)]
    timings: bool,
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

fn build_initramfs(rootfs: Option<&Path>, init: &Path) -> anyhow::Result<Vec<u8>> {
    let mut cpio = Initramfs::new();
    if let Some(root) = rootfs {
        if !root.is_dir() {
            bail!("--rootfs {}: not a directory", root.display());
        }
        cpio.add_tree(root)?;
    }
    let init_bytes = std::fs::read(init).with_context(|| format!("reading {}", init.display()))?;
    cpio.add_dir(".arrow", 0o755);
    cpio.add_file(INIT_PATH.trim_start_matches('/'), 0o755, &init_bytes)?;
    Ok(cpio.finish())
}

/// Says why a VM ended before or while serving the program.
fn explain_exit(vm: &Vm, exit: &VmExit) -> String {
    if let Some(panic) = vm.console().kernel_panic() {
        return format!("the guest kernel panicked: {panic}");
    }
    let tail = vm.console().text();
    let last: Vec<&str> = tail.lines().rev().take(15).collect();
    let last: Vec<&str> = last.into_iter().rev().collect();
    if last.is_empty() {
        format!("the VM ended ({exit}) with no console output")
    } else {
        format!(
            "the VM ended ({exit}); last console lines:\n  {}",
            last.join("\n  ")
        )
    }
}

/// Polls the agent until it answers, the VM ends, or `timeout` passes.
fn connect_agent(vm: &Vm, uds: &Path, timeout: Duration) -> anyhow::Result<AgentClient> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(exit) = vm.wait(Some(Duration::ZERO)) {
            bail!(
                "guest stopped before arrow-init was ready: {}",
                explain_exit(vm, &exit)
            );
        }
        if let Ok(stream) = hybrid::connect(uds, AGENT_PORT, Duration::from_secs(2)) {
            if let Ok(client) = AgentClient::from_unix(stream) {
                if client.ping().is_ok() {
                    return Ok(client);
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "guest did not become ready within {} s (arrow-init never answered); {}",
                timeout.as_secs(),
                explain_exit(vm, &VmExit::Stopped)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
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

/// Phase timestamps since process start, printed with `--timings`.
struct Timings {
    start: Instant,
    enabled: bool,
}

impl Timings {
    fn mark(&self, phase: &str) {
        if self.enabled {
            eprintln!(
                "arrow-vmm: timing {phase} {:.1} ms",
                self.start.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
}

/// How to get a guest VM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Clone the matching template; boot (and save a template) if none.
    CloneOrBoot,
    /// Boot afresh and save no template.
    Boot,
    /// Boot afresh and save the template, replacing any.
    BootAndSaveTemplate,
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
    let kernel = paths::kernel(args.kernel.as_deref())?;
    let init = paths::init(args.init.as_deref())?;
    let initramfs = build_initramfs(args.rootfs.as_deref(), &init)?;
    let run_dir = RunDir::create()?;
    let uds = run_dir.0.join("vsock.sock");
    let mut kernel_args = vec![format!("rdinit={INIT_PATH}")];
    kernel_args.push(if args.console { "arrow.debug" } else { "quiet" }.into());
    kernel_args.extend(args.kernel_args.iter().cloned());
    let flavour = KvmFlavour::detect();
    let console = || {
        if args.console {
            ConsoleOutput::Stderr
        } else {
            ConsoleOutput::Sink
        }
    };

    let kernel_bytes =
        std::fs::read(&kernel).with_context(|| format!("reading {}", kernel.display()))?;
    let key = TemplateInputs {
        kernel: &kernel_bytes,
        initramfs: &initramfs,
        vcpus: args.vcpus,
        memory_bytes: args.memory,
        kernel_args: &kernel_args,
        flavour: &flavour.to_string(),
    }
    .key();
    let cache = TemplateCache::new(paths::cache_dir().join("templates"));
    let clone = match origin {
        Origin::CloneOrBoot => cache.clone_vm(
            &key,
            RestoreConfig {
                console: console(),
                vsock_uds_path: Some(uds.clone()),
                flavour: Some(flavour),
            },
        ),
        Origin::Boot | Origin::BootAndSaveTemplate => None,
    };
    let timeout = Duration::from_secs(args.boot_timeout);

    if let Some(mut vm) = clone {
        timings.mark("clone-restored");
        vm.start().context("starting the clone")?;
        let client = connect_agent(&vm, &uds, timeout)?;
        let entropy = proto::client::fresh_entropy(64).context("reading host entropy")?;
        client
            .init_clone(unix_time_ns(), &entropy, hostname)
            .context("initialising the clone")?;
        return Ok(Guest {
            vm,
            client: Arc::new(client),
            uds,
            run_dir,
            template: Some(cache.dir(&key)),
        });
    }

    let mut config = VmConfig::new(&kernel);
    config.vcpus = args.vcpus;
    config.memory_bytes = args.memory;
    config.initramfs = Some(initramfs);
    config.vsock = Some(VsockConfig {
        guest_cid: u64::from(GUEST_CID),
        uds_path: uds.clone(),
    });
    config.kernel_args = kernel_args;
    config.console = console();
    config.flavour = Some(flavour);
    let mut vm = Vm::build(config).context("building the VM")?;
    if args.console {
        eprintln!("arrow-vmm: {} ; cmdline: {}", vm.flavour(), vm.cmdline());
    }
    timings.mark("vm-built");
    vm.start().context("starting the VM")?;
    let client = connect_agent(&vm, &uds, timeout)?;
    timings.mark("booted");
    let mut template = None;
    if origin != Origin::Boot {
        if origin == Origin::BootAndSaveTemplate {
            let _ = std::fs::remove_dir_all(cache.dir(&key));
        }
        match cache.publish(&key, &mut vm) {
            Ok(dir) => {
                timings.mark("template-saved");
                template = Some(dir);
            }
            Err(e) if origin == Origin::BootAndSaveTemplate => return Err(e),
            Err(e) => eprintln!("arrow-vmm: could not save a template: {e:#}"),
        }
    }
    // A booted guest gets the same identity a clone would.
    let entropy = proto::client::fresh_entropy(64).context("reading host entropy")?;
    client
        .init_clone(unix_time_ns(), &entropy, hostname)
        .context("initialising the guest")?;
    Ok(Guest {
        vm,
        client: Arc::new(client),
        uds,
        run_dir,
        template,
    })
}

impl Guest {
    /// Powers the guest off cleanly, stops it if it does not comply, and
    /// removes its sockets.
    fn shut_down(mut self) {
        if self.client.shutdown().is_ok() && self.vm.wait(Some(SHUTDOWN_GRACE)).is_none() {
            eprintln!("arrow-vmm: guest did not power off within {SHUTDOWN_GRACE:?}; stopping it");
        }
        self.vm.stop();
        drop(self.run_dir);
    }
}

/// `arrow-vmm template create`: boots a VM, snapshots it as the template for
/// its inputs (replacing any), and prints where it is.
pub fn create_template(args: VmArgs) -> anyhow::Result<ExitCode> {
    let timings = Timings {
        start: Instant::now(),
        enabled: args.timings,
    };
    let guest = start_guest(&args, Origin::BootAndSaveTemplate, "arrow", &timings)?;
    if let Some(dir) = &guest.template {
        println!("{}", dir.display());
    }
    guest.shut_down();
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let timings = Timings {
        start: Instant::now(),
        enabled: args.vm.timings,
    };
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

    #[test]
    fn initramfs_holds_init_where_rdinit_points() {
        let init = std::env::current_exe().unwrap();
        let cpio = build_initramfs(None, &init).unwrap();
        let text = String::from_utf8_lossy(&cpio[..400]);
        assert!(text.contains(".arrow/init"));
        assert!(build_initramfs(Some(Path::new("/nonexistent")), &init).is_err());
    }
}
