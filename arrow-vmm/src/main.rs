//! `arrow-vmm`: Arrow's VMM process.
//!
//! `serve` is the per-pod VMM process the containerd shim starts; `run`
//! starts a microVM with a root tree and runs one program in it (the demo
//! and debugging mode); `template create` makes a template; `boot` boots
//! any kernel with its console on stdout; `test-guest` writes the
//! bare-metal test guest used by tests and benchmarks.

mod confine;
mod control;
mod counters;
mod guest;
mod jail;
mod paths;
mod rlimit;
mod run;
mod seccomp;
mod serve;
mod stdio;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmm_core::exit::VmExit;
use vmm_core::test_guest::GuestProgram;
use vmm_core::vm::{ConsoleOutput, Vm, VmConfig};

#[derive(Parser)]
#[command(name = "arrow-vmm", version, about = "Arrow's KVM microVM monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pod's microVM for the shim: say "ready" once arrow-init is
    /// reachable (on the control channel with --control-fd, else as one
    /// JSON line on stdout:
    /// {"ready":true,"cloned":..,"pid":..,"vsock_uds":..,"ready_ms":..}),
    /// then run until the guest ends, a signal or a stop request.
    Serve(serve::ServeArgs),
    /// Boot a microVM and run one program in it; exit with its exit code.
    Run(run::RunArgs),
    /// Manage templates: booted VMs that later VMs are cloned from.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Boot a kernel with its console on stdout until the guest resets.
    Boot(BootArgs),
    /// Write the bare-metal test guest (prints "ready" and resets) as ELF.
    TestGuest {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Spin after "ready" instead of resetting (for memory figures).
        #[arg(long, conflicts_with = "idle")]
        spin: bool,
        /// Halt for good after "ready" instead of resetting: a VM that
        /// stays open without using a CPU (hack/test-hwkvm.sh keeps one).
        #[arg(long)]
        idle: bool,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Boot a VM, snapshot it when arrow-init is ready (replacing the
    /// template for the same inputs), and print the template's directory.
    Create(run::VmArgs),
}

#[derive(clap::Args)]
struct BootArgs {
    /// ELF kernel to boot.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest memory, e.g. 128M or 1G.
    #[arg(long, default_value = "128M", value_parser = paths::parse_size)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Extra kernel arguments.
    #[arg(long = "kernel-arg")]
    kernel_args: Vec<String>,
}

fn boot(args: BootArgs) -> anyhow::Result<ExitCode> {
    let mut config = VmConfig::new(&args.kernel);
    config.memory_bytes = args.memory;
    config.vcpus = args.vcpus;
    config.kernel_args = args.kernel_args;
    config.console = ConsoleOutput::Writer(Box::new(std::io::stdout()));
    let mut vm = Vm::build(config).context("building the VM")?;
    vm.start().context("starting the VM")?;
    match vm.wait(None).unwrap_or(VmExit::Stopped) {
        VmExit::Reset | VmExit::PowerOff => Ok(ExitCode::SUCCESS),
        other => anyhow::bail!("the VM ended abnormally: {other}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any VM exists: no command needs more than one VM's worth. Only
    // `serve` (the shim's, whose stderr is the pod's vmm.log) says when the
    // limit could not be set; `run`'s stderr is the guest program's.
    let limit_warning = rlimit::apply();
    if let (Command::Serve(_), Some(warning)) = (&cli.command, limit_warning) {
        eprintln!("{warning}");
    }
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Run(args) => run::run(args),
        Command::Template(TemplateCommand::Create(args)) => run::create_template(args),
        Command::Boot(args) => boot(args),
        Command::TestGuest { out, spin, idle } => {
            let mut guest = GuestProgram::new();
            guest.serial_write(b"ready\n");
            if spin {
                guest.count_forever(0x20_0000);
            } else if idle {
                guest.halt_forever();
            } else {
                guest.reset().halt_forever();
            }
            guest
                .write_elf(&out)
                .with_context(|| format!("writing {}", out.display()))
                .map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("arrow-vmm: {e:#}");
        // As `docker run`: 125 when the runtime itself failed.
        ExitCode::from(125)
    })
}
