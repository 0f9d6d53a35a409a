//! `arrow-pod`: runs one command as a Kubernetes pod through the CRI, for
//! demos and for people without `crictl`.
//!
//! ```text
//! arrow-pod [--address SOCK] run [--handler arrow|runc] [--image IMG] [--name N]
//!           [--keep] [--timeout SECS] -- CMD...
//! arrow-pod [--address SOCK] ls
//! arrow-pod [--address SOCK] rm-all
//! ```
//!
//! `run` makes a pod sandbox with the runtime handler, one container running
//! CMD in it, waits for the container to exit, copies its log lines
//! (stdout and stderr) to stdout as they come, reports the pod id, its IP,
//! the handler and the timings on stderr, stops and removes the pod (unless
//! `--keep`) and exits with the container's exit code. Pods it makes carry
//! the label `arrow-pod=true`; `rm-all` removes every pod with it. `ls` lists
//! every pod of the CRI server and its containers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use integration::containerd::{ADDRESS, BUSYBOX_IMAGE};
use integration::cri::{
    self, container_config, pod_config, remove_cgroup_dirs, unique_name, CriClient, Pod,
    CGROUP_PARENT, LOG_ROOT,
};
use k8s_cri::v1 as api;

/// The label on every pod (and container) `arrow-pod run` makes.
const LABEL: &str = "arrow-pod";

#[derive(Parser)]
#[command(
    name = "arrow-pod",
    about = "Run a command as a pod through the CRI (containerd's CRI plugin or arrow-cri)"
)]
struct Cli {
    /// The CRI socket (default: the private test containerd of hack/containerd.sh).
    #[arg(long, global = true, default_value = ADDRESS)]
    address: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD in a new pod, print its output, exit with its exit code.
    Run(RunArgs),
    /// List pods and their containers.
    Ls,
    /// Stop and remove every pod made by `arrow-pod run`.
    RmAll,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The CRI runtime handler.
    #[arg(long, default_value = "arrow")]
    handler: String,
    /// The container's image (it must be in containerd already: hack/images.sh import).
    #[arg(long, default_value = BUSYBOX_IMAGE)]
    image: String,
    /// The pod's name (default: a unique arrow-pod-… name).
    #[arg(long)]
    name: Option<String>,
    /// Leave the pod behind (stopped container, running sandbox).
    #[arg(long)]
    keep: bool,
    /// Give up waiting for the container after this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// The command and its arguments (replaces the image's entrypoint).
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run_cli(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("arrow-pod: {e:#}");
            125
        }
    };
    std::process::exit(code);
}

async fn run_cli(cli: Cli) -> Result<i32> {
    let client = CriClient::connect(&cli.address).await?;
    client
        .wait_ready(Duration::from_secs(10))
        .await
        .context("is containerd running? (hack/containerd.sh start)")?;
    match cli.command {
        Cmd::Run(args) => run(&client, args).await,
        Cmd::Ls => ls(&client).await.map(|()| 0),
        Cmd::RmAll => rm_all(&client).await.map(|()| 0),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// What `run` has made so far, for clean-up on error or Ctrl-C.
#[derive(Default)]
struct Made {
    pod: Option<Pod>,
}

async fn run(client: &CriClient, args: RunArgs) -> Result<i32> {
    let made = Arc::new(Mutex::new(Made::default()));
    let outcome = tokio::select! {
        r = run_pod(client, &args, made.clone()) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("arrow-pod: interrupted");
            Ok(130)
        }
    };
    let pod = made.lock().unwrap_or_else(|e| e.into_inner()).pod.take();
    if let Some(pod) = pod {
        if args.keep {
            eprintln!(
                "arrow-pod: kept pod {} (remove it with `arrow-pod rm-all`)",
                pod.id
            );
        } else {
            let t0 = Instant::now();
            match remove_pod(client, &pod).await {
                Ok(()) => eprintln!(
                    "arrow-pod: pod stopped and removed in {}",
                    secs(t0.elapsed())
                ),
                Err(e) => eprintln!("arrow-pod: removing pod {}: {e:#}", pod.id),
            }
        }
    }
    outcome
}

async fn run_pod(client: &CriClient, args: &RunArgs, made: Arc<Mutex<Made>>) -> Result<i32> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| unique_name("arrow-pod"));
    let mut config = pod_config(&name);
    config.labels.clear();
    config.labels.insert(LABEL.to_string(), "true".to_string());

    let t0 = Instant::now();
    let pod = client.run_pod_sandbox_with(config, &args.handler).await?;
    let sandbox_ready = t0.elapsed();
    made.lock().unwrap_or_else(|e| e.into_inner()).pod = Some(pod.clone());
    let ip = client
        .pod_sandbox_status(&pod.id)
        .await
        .ok()
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .filter(|ip| !ip.is_empty())
        .unwrap_or_else(|| "(none)".to_string());
    eprintln!(
        "arrow-pod: pod {} ({name}), handler {}, IP {ip}",
        pod.id, args.handler
    );

    let log_path = "app.log";
    let command: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let mut cconfig = container_config("app", &args.image, &command, log_path);
    cconfig.labels.clear();
    cconfig.labels.insert(LABEL.to_string(), "true".to_string());
    let id = client.create_container_with(&pod, cconfig).await?;
    let created = t0.elapsed();
    client.start_container(&id).await?;
    let started = t0.elapsed();

    let log_file = pod.log_file(log_path);
    let mut log = LogFollower::new(log_file);
    let mut first_line = None;
    let deadline = (args.timeout > 0).then(|| Instant::now() + Duration::from_secs(args.timeout));
    let mut next_status = Instant::now();
    let exit_code = loop {
        if log.pump()? && first_line.is_none() {
            first_line = Some(t0.elapsed());
        }
        if Instant::now() >= next_status {
            let status = client.container_status(&id).await?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                break status.exit_code;
            }
            next_status = Instant::now() + Duration::from_millis(25);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            bail!(
                "container {id} still running after {} s (--timeout)",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let exited = t0.elapsed();
    // The runtime may copy the last output just after the exit: drain until
    // the log stops growing for a moment.
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(100) {
        if log.pump()? {
            first_line.get_or_insert(t0.elapsed());
            quiet_since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log.finish();

    let first = first_line.map_or_else(|| "no output".to_string(), secs);
    eprintln!(
        "arrow-pod: timings from RunPodSandbox: sandbox ready {}, container created {}, \
         started {}, first log line {first}, exited {}",
        secs(sandbox_ready),
        secs(created),
        secs(started),
        secs(exited)
    );
    eprintln!("arrow-pod: container {id} exited with code {exit_code}");
    Ok(if (0..=255).contains(&exit_code) {
        exit_code
    } else {
        255
    })
}

/// Copies new lines of a CRI log file to stdout.
struct LogFollower {
    path: PathBuf,
    offset: u64,
    pending: Vec<u8>,
}

impl LogFollower {
    fn new(path: PathBuf) -> Self {
        LogFollower {
            path,
            offset: 0,
            pending: Vec::new(),
        }
    }

    /// Prints the lines added since the last call; true if there were any.
    fn pump(&mut self) -> Result<bool> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        let len = file.metadata()?.len();
        if len <= self.offset {
            return Ok(false);
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.pending.extend_from_slice(&buf);
        let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') else {
            return Ok(false);
        };
        let complete: Vec<u8> = self.pending.drain(..=end).collect();
        self.print(&String::from_utf8_lossy(&complete))?;
        Ok(true)
    }

    fn print(&self, text: &str) -> Result<()> {
        let lines =
            cri::parse_cri_log(text).with_context(|| format!("parsing {}", self.path.display()))?;
        let mut out = std::io::stdout().lock();
        out.write_all(cri::log_text(&lines, None).as_bytes())?;
        out.flush()?;
        Ok(())
    }

    /// Prints what is left (a last line without its newline).
    fn finish(&mut self) {
        if !self.pending.is_empty() {
            let rest = String::from_utf8_lossy(&self.pending).into_owned();
            let _ = self.print(&rest);
            self.pending.clear();
        }
    }
}

/// Stops and removes a pod, its log directory and per-pod cgroups.
async fn remove_pod(client: &CriClient, pod: &Pod) -> Result<()> {
    client.remove_pod(pod).await
}

/// The log directory and cgroup parent `pod_config` gave a pod, rebuilt
/// from its metadata.
fn pod_dirs(meta: &api::PodSandboxMetadata) -> (PathBuf, String) {
    (
        Path::new(LOG_ROOT).join(format!("{}_{}_{}", meta.namespace, meta.name, meta.uid)),
        format!("{CGROUP_PARENT}/pod{}", meta.uid),
    )
}

async fn rm_all(client: &CriClient) -> Result<()> {
    let mut removed = 0;
    let mut failed = 0;
    for pod in client.list_pod_sandboxes().await? {
        if pod.labels.get(LABEL).map(String::as_str) != Some("true") {
            continue;
        }
        let result = async {
            client.stop_pod_sandbox(&pod.id).await?;
            client.remove_pod_sandbox(&pod.id).await
        }
        .await;
        match result {
            Ok(()) => {
                if let Some(meta) = &pod.metadata {
                    let (logs, cgroup) = pod_dirs(meta);
                    let _ = std::fs::remove_dir_all(logs);
                    remove_cgroup_dirs(&cgroup);
                }
                println!("removed pod {}", pod.id);
                removed += 1;
            }
            Err(e) => {
                eprintln!("arrow-pod: removing pod {}: {e:#}", pod.id);
                failed += 1;
            }
        }
    }
    eprintln!("arrow-pod: {removed} pod(s) removed");
    if failed > 0 {
        bail!("{failed} pod(s) could not be removed");
    }
    Ok(())
}

fn age(created_at_ns: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let s = (now - created_at_ns).max(0) / 1_000_000_000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn made_by(labels: &std::collections::HashMap<String, String>) -> &'static str {
    let has = |k: &str| labels.get(k).map(String::as_str) == Some("true");
    if has(LABEL) {
        "arrow-pod"
    } else if has("arrow-cri-bench") {
        "arrow-cri-bench"
    } else if has("arrow-test") {
        "arrow-test"
    } else {
        "-"
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

async fn ls(client: &CriClient) -> Result<()> {
    let mut pods = client.list_pod_sandboxes().await?;
    pods.sort_by_key(|p| p.created_at);
    let containers = client.list_containers(None).await?;
    println!(
        "{:<13}  {:<8}  {:<8}  {:>5}  {:<15}  {:<15}  NAME",
        "POD", "HANDLER", "STATE", "AGE", "IP", "MADE BY"
    );
    for pod in &pods {
        let state = match api::PodSandboxState::try_from(pod.state) {
            Ok(api::PodSandboxState::SandboxReady) => "ready",
            Ok(api::PodSandboxState::SandboxNotready) => "notready",
            Err(_) => "?",
        };
        let ip = client
            .pod_sandbox_status(&pod.id)
            .await
            .ok()
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .filter(|ip| !ip.is_empty())
            .unwrap_or_else(|| "-".to_string());
        let name = pod.metadata.as_ref().map_or("", |m| m.name.as_str());
        let handler = if pod.runtime_handler.is_empty() {
            "(default)"
        } else {
            pod.runtime_handler.as_str()
        };
        println!(
            "{:<13}  {:<8}  {:<8}  {:>5}  {:<15}  {:<15}  {name}",
            short(&pod.id),
            handler,
            state,
            age(pod.created_at),
            ip,
            made_by(&pod.labels)
        );
        for c in containers.iter().filter(|c| c.pod_sandbox_id == pod.id) {
            let state = match cri::ContainerState::try_from(c.state) {
                Ok(cri::ContainerState::ContainerCreated) => "created",
                Ok(cri::ContainerState::ContainerRunning) => "running",
                Ok(cri::ContainerState::ContainerExited) => "exited",
                _ => "unknown",
            };
            let cname = c.metadata.as_ref().map_or("", |m| m.name.as_str());
            let image = c.image.as_ref().map_or("", |i| i.image.as_str());
            println!(
                "  └ {:<13}  {:<8}  {:>5}  {cname}  ({image})",
                short(&c.id),
                state,
                age(c.created_at)
            );
        }
    }
    let orphans = containers
        .iter()
        .filter(|c| !pods.iter().any(|p| p.id == c.pod_sandbox_id))
        .count();
    if orphans > 0 {
        println!("({orphans} container(s) of pods not listed)");
    }
    if pods.is_empty() {
        println!("(no pods)");
    }
    Ok(())
}
