//! `arrow`: install Arrow on a node, check the host, print its RuntimeClass.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use arrowctl::check::{self, Host};
use arrowctl::containerd_config::ConfigVersion;
use arrowctl::install::{self, InstallPlan, Kind, Outcome, Undo};
use arrowctl::{k3s_template, monitor, runtimeclass};

const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
const PREFIX: &str = "/usr/local/bin";

#[derive(Parser)]
#[command(
    name = "arrow",
    about = "Run Kubernetes pods as KVM microVMs: install, check, RuntimeClass, metrics"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the binaries and guest kernel, and add runtime `arrow` to
    /// containerd's config (or k3s's template). Idempotent.
    Install {
        /// containerd's config (default /etc/containerd/config.toml, unless
        /// --k3s is given).
        #[arg(long, value_name = "CONFIG")]
        containerd: Option<PathBuf>,
        /// Edit k3s's containerd template instead (default
        /// /var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl).
        #[arg(long, value_name = "TEMPLATE", num_args = 0..=1,
              default_missing_value = k3s_template::DEFAULT_TEMPLATE)]
        k3s: Option<PathBuf>,
        /// Where the binaries go (containerd must find the shim on its PATH).
        #[arg(long, value_name = "DIR", default_value = PREFIX)]
        prefix: PathBuf,
        /// Where the built binaries are (default: beside this `arrow`, as
        /// hack/build.sh leaves them in target/arrow).
        #[arg(long, value_name = "DIR")]
        from: Option<PathBuf>,
        /// The guest kernel to install (default $ARROW_KERNEL, else the one
        /// already in the cache, hack/build-kernel.sh's).
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
        /// Only edit the config; leave binaries and kernel alone.
        #[arg(long)]
        config_only: bool,
        /// The record of what install changed, for uninstall.
        #[arg(long, value_name = "FILE", default_value = install::DEFAULT_RECORD)]
        record: PathBuf,
    },
    /// Undo what `arrow install` did, restoring each file it replaced.
    Uninstall {
        #[arg(long, value_name = "FILE", default_value = install::DEFAULT_RECORD)]
        record: PathBuf,
        /// Restore originals even over files changed since install.
        #[arg(long)]
        force: bool,
    },
    /// Check whether this host can run Arrow; exit status 1 if it cannot.
    Check {
        #[arg(long, value_name = "CONFIG", default_value = CONTAINERD_CONFIG)]
        containerd: PathBuf,
        #[arg(long, value_name = "DIR", default_value = PREFIX)]
        prefix: PathBuf,
        /// The guest kernel (default $ARROW_KERNEL, else the cache's).
        #[arg(long, value_name = "FILE")]
        kernel: Option<PathBuf>,
    },
    /// Print the Kubernetes RuntimeClass (deploy/runtimeclass.yaml).
    Runtimeclass,
    /// Serve the node's pod metrics to Prometheus: GET /metrics.
    Monitor {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8090")]
        listen: String,
        /// The shim's state directory (default $ARROW_STATE_DIR, else
        /// /run/arrow).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// The cache arrow-vmm reads the guest kernel and templates from.
fn cache_dir() -> PathBuf {
    std::env::var_os("ARROW_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/arrow"))
}

/// Where arrow-vmm looks for the kernel when the shim starts it.
fn default_kernel() -> PathBuf {
    cache_dir().join("kernel/vmlinux")
}

fn own_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

fn containerd_version() -> Option<String> {
    let out = Command::new("containerd").arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Binary => "binary",
        Kind::Kernel => "guest kernel",
        Kind::ContainerdConfig => "containerd config",
        Kind::K3sTemplate => "k3s template",
    }
}

#[allow(clippy::too_many_arguments)]
fn run_install(
    containerd: Option<PathBuf>,
    k3s: Option<PathBuf>,
    prefix: PathBuf,
    from: Option<PathBuf>,
    kernel: Option<PathBuf>,
    config_only: bool,
    record: PathBuf,
) -> Result<()> {
    let containerd = match (&containerd, &k3s) {
        (None, Some(_)) => None,
        (c, _) => Some(
            c.clone()
                .unwrap_or_else(|| PathBuf::from(CONTAINERD_CONFIG)),
        ),
    };
    let major = containerd_version()
        .as_deref()
        .and_then(check::parse_containerd_version)
        .map_or(1, |(major, _)| major);
    let (binaries, kernel) = if config_only {
        (None, None)
    } else {
        let from = match from.or_else(own_dir) {
            Some(f) => f,
            None => anyhow::bail!("cannot tell where this arrow runs from: pass --from DIR"),
        };
        let dest = default_kernel();
        let src = kernel
            .or_else(|| std::env::var_os("ARROW_KERNEL").map(PathBuf::from))
            .unwrap_or_else(|| dest.clone());
        (Some((from, prefix.clone())), Some((src, dest)))
    };
    let plan = InstallPlan {
        binaries,
        kernel,
        containerd: containerd.map(|c| (c, ConfigVersion::for_containerd_major(major))),
        k3s: k3s.clone(),
        record,
    };
    let changes = install::install(&plan)?;
    let mut config_changed = None;
    for c in &changes {
        let what = match &c.outcome {
            Outcome::Created => "created  ".to_string(),
            Outcome::Replaced(_) => "replaced ".to_string(),
            Outcome::Updated => "updated  ".to_string(),
            Outcome::Unchanged => "unchanged".to_string(),
        };
        let note = match &c.outcome {
            Outcome::Replaced(b) => format!(" (the original is kept at {})", b.display()),
            _ => String::new(),
        };
        println!("{what} {} ({}){note}", c.path.display(), kind_name(c.kind));
        if c.outcome != Outcome::Unchanged
            && matches!(c.kind, Kind::ContainerdConfig | Kind::K3sTemplate)
        {
            config_changed = Some(c.kind);
        }
    }
    if binaries_in_place(&plan) {
        println!(
            "unchanged {} (binaries run from there already)",
            prefix.display()
        );
    }
    match config_changed {
        Some(Kind::K3sTemplate) => {
            println!(
                "runtime arrow added; restart k3s: systemctl restart k3s (k3s-agent on agents)"
            )
        }
        Some(_) => {
            println!("runtime arrow added; restart containerd: systemctl restart containerd")
        }
        None => println!("runtime arrow already configured; nothing to restart"),
    }
    println!("then: arrow check; arrow runtimeclass | kubectl apply -f -");
    Ok(())
}

fn binaries_in_place(plan: &InstallPlan) -> bool {
    matches!(&plan.binaries, Some((from, prefix))
        if std::fs::canonicalize(from).ok() == std::fs::canonicalize(prefix).ok())
}

fn run_uninstall(record: &Path, force: bool) -> Result<bool> {
    if !record.exists() {
        println!("nothing to undo: no install record at {}", record.display());
        return Ok(true);
    }
    let undone = install::uninstall(record, force)?;
    let mut clean = true;
    let mut config_changed = None;
    for (entry, undo) in &undone {
        let path = entry.path.display();
        let kind = kind_name(entry.kind);
        match undo {
            Undo::Restored => println!("restored  {path} ({kind}), byte for byte"),
            Undo::Removed => println!("removed   {path} ({kind})"),
            Undo::EditedOut(backup) => println!(
                "edited    {path} ({kind}): changed since install, so only runtime arrow was taken out{}",
                backup.as_ref().map(|b| format!("; the original is still at {}", b.display())).unwrap_or_default()
            ),
            Undo::LeftAlone(backup) => {
                clean = false;
                println!(
                    "left      {path} ({kind}): changed since install, not touched{}; `arrow uninstall --force` would restore it",
                    backup.as_ref().map(|b| format!(" (the original is at {})", b.display())).unwrap_or_default()
                );
            }
        }
        if matches!(entry.kind, Kind::ContainerdConfig | Kind::K3sTemplate) {
            config_changed = Some(entry.kind);
        }
    }
    match config_changed {
        Some(Kind::K3sTemplate) => {
            println!("restart k3s: systemctl restart k3s (k3s-agent on agents)")
        }
        Some(_) => println!("restart containerd: systemctl restart containerd"),
        None => {}
    }
    Ok(clean)
}

fn run_check(containerd: PathBuf, prefix: PathBuf, kernel: Option<PathBuf>) -> bool {
    let kernel = kernel
        .or_else(|| std::env::var_os("ARROW_KERNEL").map(PathBuf::from))
        .unwrap_or_else(default_kernel);
    let host = Host {
        dev_kvm: PathBuf::from("/dev/kvm"),
        sys_module: PathBuf::from("/sys/module"),
        kernel,
        prefix,
        own_dir: own_dir(),
        containerd_config: containerd,
        containerd_version: containerd_version(),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        cni_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        dev_tun: PathBuf::from("/dev/net/tun"),
        meminfo: PathBuf::from("/proc/meminfo"),
        cache: cache_dir(),
    };
    let lines = check::run(&host);
    for l in &lines {
        println!("{l}");
    }
    let passed = check::passed(&lines);
    if passed {
        println!("this host can run Arrow");
    } else {
        println!("this host cannot run Arrow yet: fix the FAIL lines");
    }
    passed
}

fn run_monitor(listen: &str, state_dir: Option<PathBuf>) -> Result<()> {
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let sources = monitor::Sources::host(state_dir);
    eprintln!(
        "arrow monitor: serving http://{}/metrics for the pods in {}",
        listener
            .local_addr()
            .map_or(listen.to_string(), |a| a.to_string()),
        sources.state_dir.display()
    );
    monitor::Monitor::new(sources)
        .serve(listener)
        .context("serving")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Install {
            containerd,
            k3s,
            prefix,
            from,
            kernel,
            config_only,
            record,
        } => run_install(containerd, k3s, prefix, from, kernel, config_only, record).map(|()| true),
        Cmd::Uninstall { record, force } => run_uninstall(&record, force).context("uninstall"),
        Cmd::Check {
            containerd,
            prefix,
            kernel,
        } => Ok(run_check(containerd, prefix, kernel)),
        Cmd::Runtimeclass => {
            print!("{}", runtimeclass::MANIFEST);
            Ok(true)
        }
        Cmd::Monitor { listen, state_dir } => run_monitor(&listen, state_dir).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("arrow: {e:#}");
            ExitCode::from(2)
        }
    }
}
