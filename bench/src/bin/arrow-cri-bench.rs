//! Pod start, stop and memory through containerd's CRI, Arrow against runc,
//! in the same run against the same containerd (hack/bench-cri.sh), and
//! with `--arrow-cri` through arrow-cri too, no containerd in its path
//! (hack/bench-arrow-cri.sh). A benchmark: it prints figures and asserts
//! nothing.
//!
//! `arrow-cri-bench [N] [M] [--arrow-cri [--daemon-pods P]]`:
//! - one untimed warm-up pod per runtime (the first Arrow pod of a VM shape
//!   may create the VM template: reported as "template creation");
//! - N timed pods per runtime, the runtimes taking turns: RunPodSandbox,
//!   CreateContainer, StartContainer of `sh -c 'echo ready; sleep 3600'`
//!   until its first line is in the CRI log file, then StopPodSandbox and
//!   RemovePodSandbox (timed apart); median, min and max side by side, and
//!   the ratio arrow/runc of the medians;
//! - memory per idle pod: M pods per runtime at once (`sleep 3600`), left
//!   idle a few seconds, then the host PSS of each pod's processes: for
//!   Arrow the containerd-shim-arrow-v1 of the pod and its arrow-vmm (whose
//!   PSS holds the guest memory the VM touched), for runc the
//!   containerd-shim-runc-v2 with the pause and container processes under it;
//! - with `--arrow-cri`: a column for arrow-cri (the built daemon on
//!   directories of its own, its image pulled from Debian's docker-registry
//!   on loopback), and the daemon's own memory (RSS) idle and with P pods
//!   running.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bench::{cpu_count, host_kernel, kvm_flavour, shell_words, Summary, Table};
use clap::Parser;
use integration::arrow_cri::{Daemon, Registry};
use integration::containerd::{ADDRESS, BUSYBOX_IMAGE, LOG};
use integration::cri::{
    container_config, pod_config, remove_cgroup_dirs, unique_name, ContainerState, CriClient, Pod,
};

/// The label on every pod (and container) this benchmark makes.
const LABEL: &str = "arrow-cri-bench";
const START_CMD: [&str; 3] = ["sh", "-c", "echo ready; sleep 3600"];
const IDLE_CMD: [&str; 2] = ["sleep", "3600"];

#[derive(Parser)]
#[command(
    name = "arrow-cri-bench",
    about = "Pod start/stop and memory per idle pod through containerd's CRI: arrow vs runc"
)]
struct Args {
    /// Timed pod starts per runtime.
    #[arg(default_value_t = 5)]
    runs: usize,
    /// Idle pods per runtime, at once, for the memory figures (0: skip).
    #[arg(default_value_t = 3)]
    idle: usize,
    /// The CRI socket (default: the private test containerd of hack/containerd.sh).
    #[arg(long, default_value = ADDRESS)]
    address: String,
    /// The runtime handlers to compare; the ratio is the second over the first.
    #[arg(long, value_delimiter = ',', default_value = "runc,arrow")]
    handlers: Vec<String>,
    /// The containers' image.
    #[arg(long, default_value = BUSYBOX_IMAGE)]
    image: String,
    /// Seconds the idle pods are left alone before their memory is read.
    #[arg(long, default_value_t = 5.0)]
    settle: f64,
    /// Seconds one pod may take to start (the first may create a template).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Also through arrow-cri (built by hack/build.sh, started here).
    #[arg(long)]
    arrow_cri: bool,
    /// Pods running at once while arrow-cri's own RSS is read (0: skip).
    #[arg(long, default_value_t = 20)]
    daemon_pods: usize,
}

/// One column: a CRI server and the runtime handler asked of it.
struct Target {
    label: String,
    cri: CriClient,
    handler: String,
    image: String,
}

/// arrow-cri and what it needs, alive while the benchmark runs.
struct ArrowCri {
    daemon: Daemon,
    _registry: Registry,
    _dir: tempfile::TempDir,
}

impl ArrowCri {
    async fn start() -> Result<(ArrowCri, Target)> {
        let registry = Registry::start()?;
        let image = registry.push_busybox().await?;
        let dir = tempfile::Builder::new()
            .prefix("arrow-cri-bench")
            .tempdir_in("/tmp")?;
        let daemon = Daemon::start(dir.path())?;
        let cri = CriClient::connect(daemon.socket()).await?;
        cri.image
            .clone()
            .pull_image(k8s_cri::v1::PullImageRequest {
                image: Some(k8s_cri::v1::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .context("arrow-cri: PullImage")?;
        let target = Target {
            label: "arrow-cri".into(),
            cri,
            handler: String::new(),
            image,
        };
        Ok((
            ArrowCri {
                daemon,
                _registry: registry,
                _dir: dir,
            },
            target,
        ))
    }
}

/// arrow-cri's RSS and peak RSS (KiB) with `count` idle pods running.
async fn daemon_memory(a: &ArrowCri, t: &Target, count: usize) -> Result<(u64, u64, u64)> {
    let idle = a.daemon.rss_kb();
    let mut pods = Vec::new();
    let mut failed = None;
    for _ in 0..count {
        match start_idle_pod(t.cri.clone(), t.handler.clone(), t.image.clone()).await {
            Ok(p) => pods.push(p),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = a.daemon.rss_kb();
    let peak = std::fs::read_to_string(format!("/proc/{}/status", a.daemon.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    for (pod, _) in &pods {
        remove_quietly(&t.cri, pod).await;
        clean_pod_dirs(pod);
    }
    if let Some(e) = failed {
        return Err(e.context(format!("{} of {count} pods started", pods.len())));
    }
    Ok((idle, loaded, peak))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---- processes ---------------------------------------------------------

#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    args: Vec<String>,
    comm: String,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // PID (COMM) STATE PPID …; COMM may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let Some(ppid) = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let args = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.push(Proc {
            pid,
            ppid,
            args,
            comm,
        });
    }
    out
}

impl Proc {
    /// The file name of argv[0], else the kernel's comm.
    fn name(&self) -> String {
        self.args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.comm.clone())
    }

    fn is_shim_of(&self, sandbox_id: &str) -> bool {
        self.name().starts_with("containerd-shim")
            && self
                .args
                .windows(2)
                .any(|w| w[0] == "-id" && w[1] == sandbox_id)
    }
}

/// The pod's shim (the one started with `-id SANDBOX_ID`; failing that, a
/// shim whose command line names the sandbox) and every process under it.
fn pod_processes(all: &[Proc], sandbox_id: &str) -> Option<Vec<Proc>> {
    let shim = all.iter().find(|p| p.is_shim_of(sandbox_id)).or_else(|| {
        all.iter().find(|p| {
            p.name().starts_with("containerd-shim") && p.args.iter().any(|a| a.contains(sandbox_id))
        })
    })?;
    let mut children: HashMap<u32, Vec<&Proc>> = HashMap::new();
    for p in all {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut found = vec![shim.clone()];
    let mut i = 0;
    while i < found.len() {
        let pid = found[i].pid;
        for c in children.get(&pid).into_iter().flatten() {
            found.push((*c).clone());
        }
        i += 1;
    }
    Some(found)
}

/// (PSS, RSS) in KiB from /proc/PID/smaps_rollup.
fn pss_rss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let field = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("Pss:"), field("Rss:")))
}

// ---- containerd's log ----------------------------------------------------

fn log_len() -> u64 {
    std::fs::metadata(LOG).map(|m| m.len()).unwrap_or(0)
}

fn log_since(offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(LOG) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            text = String::from_utf8_lossy(&buf).into_owned();
        }
    }
    text
}

/// The lines of containerd's log since `offset` that matter for a failure:
/// errors and warnings, and whatever names the pod.
fn log_excerpt(offset: u64, pod_id: Option<&str>) -> String {
    let text = log_since(offset);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("level=error")
                || l.contains("level=warning")
                || l.contains("level=fatal")
                || pod_id.is_some_and(|id| l.contains(id))
        })
        .collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// What the shim logged about the pod's VM: (ready ms, cloned).
fn vm_ready_line(offset: u64, vmm_pid: u32) -> Option<(u64, bool)> {
    let needle = format!("pod VM pid {vmm_pid} ready in ");
    let text = log_since(offset);
    let line = text.lines().find(|l| l.contains(&needle))?;
    let rest = &line[line.find(&needle)? + needle.len()..];
    let ms = rest.split_whitespace().next()?.parse().ok()?;
    Some((ms, rest.contains("(clone)")))
}

/// The handler as a name part (arrow-cri's is empty).
fn handler_tag(handler: &str) -> &str {
    if handler.is_empty() {
        "default"
    } else {
        handler
    }
}

// ---- one pod -------------------------------------------------------------

/// The timings of one pod, in ms.
#[derive(Debug, Default, Clone)]
struct Sample {
    sandbox: f64,
    create: f64,
    start: f64,
    first_output: f64,
    total: f64,
    stop: f64,
    remove: f64,
    stop_remove: f64,
    /// For Arrow: the VM's ready time and whether it was a clone.
    vm: Option<(u64, bool)>,
}

/// A kubelet-like pod config (`pod_config`) with this benchmark's label.
fn bench_pod_config(name: &str) -> k8s_cri::v1::PodSandboxConfig {
    let mut config = pod_config(name);
    config.labels.clear();
    config.labels.insert(LABEL.to_string(), "true".to_string());
    config
}

/// Removes what `remove_pod` would after the CRI calls: the log directory
/// and the per-pod cgroups.
fn clean_pod_dirs(pod: &Pod) {
    let _ = std::fs::remove_dir_all(pod.log_directory());
    if let Some(linux) = &pod.config.linux {
        remove_cgroup_dirs(&linux.cgroup_parent);
    }
}

async fn remove_quietly(cri: &CriClient, pod: &Pod) {
    if let Err(e) = cri.remove_pod(pod).await {
        eprintln!("  (could not remove pod {}: {e:#})", pod.id);
    }
}

/// The pod's arrow-vmm, if it has one.
fn vmm_pid_of(sandbox_id: &str) -> Option<u32> {
    pod_processes(&processes(), sandbox_id)?
        .iter()
        .find(|p| p.name() == "arrow-vmm")
        .map(|p| p.pid)
}

async fn wait_first_line(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // A line is complete once its newline is written.
        if std::fs::read(path).is_ok_and(|b| b.contains(&b'\n')) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("no output in {} after {timeout:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts a pod until its container's first output line, then stops and
/// removes it.
async fn start_stop(
    cri: &CriClient,
    handler: &str,
    image: &str,
    timeout: Duration,
) -> Result<Sample> {
    let offset = log_len();
    let name = unique_name(&format!("bench-{}", handler_tag(handler)));
    let config = bench_pod_config(&name);
    let mut s = Sample::default();

    let t0 = Instant::now();
    let pod = cri.run_pod_sandbox_with(config, handler).await?;
    let t1 = Instant::now();
    let started = async {
        let mut cconfig = container_config("app", image, &START_CMD, "app.log");
        cconfig.labels.clear();
        cconfig.labels.insert(LABEL.to_string(), "true".to_string());
        let id = cri.create_container_with(&pod, cconfig).await?;
        let t2 = Instant::now();
        cri.start_container(&id).await?;
        let t3 = Instant::now();
        wait_first_line(&pod.log_file("app.log"), timeout).await?;
        let t4 = Instant::now();
        anyhow::Ok((t2, t3, t4))
    }
    .await;
    let (t2, t3, t4) = match started {
        Ok(t) => t,
        Err(e) => {
            let excerpt = log_excerpt(offset, Some(&pod.id));
            remove_quietly(cri, &pod).await;
            return Err(e.context(format!(
                "pod {} ({handler}); containerd's log:\n{excerpt}",
                pod.id
            )));
        }
    };
    s.sandbox = ms(t1 - t0);
    s.create = ms(t2 - t1);
    s.start = ms(t3 - t2);
    s.first_output = ms(t4 - t3);
    s.total = ms(t4 - t0);
    if let Some(pid) = vmm_pid_of(&pod.id) {
        s.vm = vm_ready_line(offset, pid);
    }

    let t5 = Instant::now();
    let stopped = cri.stop_pod_sandbox(&pod.id).await;
    let t6 = Instant::now();
    let removed = match stopped {
        Ok(()) => cri.remove_pod_sandbox(&pod.id).await,
        Err(e) => Err(e),
    };
    let t7 = Instant::now();
    if let Err(e) = removed {
        let excerpt = log_excerpt(offset, Some(&pod.id));
        remove_quietly(cri, &pod).await;
        return Err(e.context(format!(
            "stopping/removing pod {} ({handler}); containerd's log:\n{excerpt}",
            pod.id
        )));
    }
    clean_pod_dirs(&pod);
    s.stop = ms(t6 - t5);
    s.remove = ms(t7 - t6);
    s.stop_remove = ms(t7 - t5);
    Ok(s)
}

// ---- idle pods -------------------------------------------------------------

/// One idle pod's memory.
struct PodMemory {
    pod_id: String,
    pss_kib: u64,
    rss_kib: u64,
    /// PSS by process name (count, KiB).
    parts: Vec<(String, usize, u64)>,
}

async fn start_idle_pod(cri: CriClient, handler: String, image: String) -> Result<(Pod, String)> {
    let name = unique_name(&format!("idle-{}", handler_tag(&handler)));
    let config = bench_pod_config(&name);
    let pod = cri.run_pod_sandbox_with(config, &handler).await?;
    let started = async {
        let mut cconfig = container_config("idle", &image, &IDLE_CMD, "idle.log");
        cconfig.labels.clear();
        cconfig.labels.insert(LABEL.to_string(), "true".to_string());
        let id = cri.create_container_with(&pod, cconfig).await?;
        cri.start_container(&id).await?;
        anyhow::Ok(id)
    }
    .await;
    match started {
        Ok(id) => Ok((pod, id)),
        Err(e) => {
            remove_quietly(&cri, &pod).await;
            Err(e.context(format!("idle pod {} ({handler})", pod.id)))
        }
    }
}

fn measure_pod(all: &[Proc], pod_id: &str) -> Result<PodMemory> {
    let procs = pod_processes(all, pod_id)
        .with_context(|| format!("no shim process found for pod {pod_id}"))?;
    let mut parts: Vec<(String, usize, u64)> = Vec::new();
    let (mut pss, mut rss) = (0, 0);
    for p in &procs {
        // A process may be gone already (a short-lived helper).
        let Ok((p_pss, p_rss)) = pss_rss_kib(p.pid) else {
            continue;
        };
        pss += p_pss;
        rss += p_rss;
        let name = p.name();
        match parts.iter_mut().find(|(n, _, _)| *n == name) {
            Some(part) => {
                part.1 += 1;
                part.2 += p_pss;
            }
            None => parts.push((name, 1, p_pss)),
        }
    }
    Ok(PodMemory {
        pod_id: pod_id.to_string(),
        pss_kib: pss,
        rss_kib: rss,
        parts,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Starts `count` idle pods of `handler` at once, lets them settle,
/// measures them, removes them.
async fn idle_memory(
    cri: &CriClient,
    handler: &str,
    image: &str,
    count: usize,
    settle: Duration,
) -> Result<Vec<PodMemory>> {
    let offset = log_len();
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..count {
        set.spawn(start_idle_pod(
            cri.clone(),
            handler.to_string(),
            image.to_string(),
        ));
    }
    let mut pods = Vec::new();
    let mut errors = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(pod)) => pods.push(pod),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    eprintln!(
        "  {handler}: {} of {count} idle pods started in {:.2} s",
        pods.len(),
        t0.elapsed().as_secs_f64()
    );
    for e in &errors {
        eprintln!("  {handler}: idle pod failed: {e}");
    }
    if !errors.is_empty() {
        eprintln!("  containerd's log:\n{}", log_excerpt(offset, None));
    }

    let measured = async {
        // Running, then left alone.
        let deadline = Instant::now() + Duration::from_secs(60);
        for (pod, id) in &pods {
            loop {
                let state = cri.container_status(id).await?.state;
                if state == ContainerState::ContainerRunning as i32 {
                    break;
                }
                if state == ContainerState::ContainerExited as i32 || Instant::now() >= deadline {
                    bail!("idle container {id} of pod {} is not running", pod.id);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(settle).await;
        let all = processes();
        pods.iter()
            .map(|(pod, _)| measure_pod(&all, &pod.id))
            .collect::<Result<Vec<_>>>()
    }
    .await;

    for (pod, _) in &pods {
        remove_quietly(cri, pod).await;
    }
    let measured = measured?;
    if pods.is_empty() {
        bail!("no idle {handler} pod started");
    }
    Ok(measured)
}

// ---- report ----------------------------------------------------------------

/// A command line as one would type it.
#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.handlers.is_empty() && !args.arrow_cri {
        bail!("--handlers: none given");
    }
    let cri = CriClient::connect(&args.address).await?;
    cri.wait_ready(Duration::from_secs(30))
        .await
        .context("is containerd running? (hack/containerd.sh start)")?;
    let version = cri.version().await?;
    let timeout = Duration::from_secs(args.timeout);

    // What an interrupted run left.
    let mut leftovers = 0;
    for pod in cri.list_pod_sandboxes().await? {
        if pod.labels.get(LABEL).map(String::as_str) == Some("true") {
            let _ = cri.stop_pod_sandbox(&pod.id).await;
            let _ = cri.remove_pod_sandbox(&pod.id).await;
            leftovers += 1;
        }
    }
    if leftovers > 0 {
        eprintln!("removed {leftovers} pod(s) an earlier run left");
    }
    let mut targets = Vec::new();
    let arrow_cri = if args.arrow_cri {
        eprintln!("starting arrow-cri (and a registry to pull its image from)");
        let (a, t) = ArrowCri::start().await?;
        targets.push(t);
        Some(a)
    } else {
        None
    };
    for handler in &args.handlers {
        targets.push(Target {
            label: if args.arrow_cri {
                format!("containerd/{handler}")
            } else {
                handler.clone()
            },
            cri: cri.clone(),
            handler: handler.clone(),
            image: args.image.clone(),
        });
    }
    let labels: Vec<String> = targets.iter().map(|t| t.label.clone()).collect();

    println!("== Arrow CRI benchmark: {} ==", labels.join(" vs "));
    println!("KVM: {}", kvm_flavour());
    println!("CPUs: {}   host kernel: {}", cpu_count(), host_kernel());
    println!(
        "CRI: {} {} (API {}) at {}",
        version.runtime_name, version.runtime_version, version.runtime_api_version, args.address
    );
    println!(
        "image: {}   start command: {}   idle command: {}",
        args.image,
        shell_words(&START_CMD),
        shell_words(&IDLE_CMD)
    );
    println!();

    // Warm-up: one untimed pod each.
    eprintln!("warm-up: one untimed pod per runtime");
    let mut warmups = Vec::new();
    for t in &targets {
        let handler = &t.label;
        let r = start_stop(&t.cri, &t.handler, &t.image, timeout).await;
        match &r {
            Ok(s) => eprintln!("  {handler}: first output after {:.0} ms", s.total),
            Err(e) => eprintln!("  {handler}: FAILED: {e:#}"),
        }
        warmups.push(r);
    }

    // Timed runs, the runtimes taking turns.
    eprintln!("timed: {} pods per runtime, taking turns", args.runs);
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    let mut failures: Vec<Vec<String>> = vec![Vec::new(); targets.len()];
    for i in 0..args.runs {
        for (h, t) in targets.iter().enumerate() {
            let handler = &t.label;
            match start_stop(&t.cri, &t.handler, &t.image, timeout).await {
                Ok(s) => {
                    eprintln!(
                        "  {}/{} {handler}: start {:.0} ms, stop+remove {:.0} ms{}",
                        i + 1,
                        args.runs,
                        s.total,
                        s.stop_remove,
                        s.vm.map(|(vm, cloned)| format!(
                            " (VM ready in {vm} ms, {})",
                            if cloned { "clone" } else { "fresh boot" }
                        ))
                        .unwrap_or_default()
                    );
                    samples[h].push(s);
                }
                Err(e) => {
                    eprintln!("  {}/{} {handler}: FAILED: {e:#}", i + 1, args.runs);
                    failures[h].push(format!("{e:#}"));
                }
            }
        }
    }

    // Memory.
    let settle = Duration::from_secs_f64(args.settle);
    let mut memory: Vec<Result<Vec<PodMemory>>> = Vec::new();
    if args.idle > 0 {
        eprintln!(
            "memory: {} idle pods per runtime at once, {:.0} s to settle",
            args.idle, args.settle
        );
        for t in &targets {
            let r = idle_memory(&t.cri, &t.handler, &t.image, args.idle, settle).await;
            if let Err(e) = &r {
                eprintln!("  {}: FAILED: {e:#}", t.label);
            }
            memory.push(r);
        }
    }
    let mut daemon = None;
    if let (Some(a), Some(t), true) = (&arrow_cri, targets.first(), args.daemon_pods > 0) {
        eprintln!("arrow-cri's own memory with {} pods", args.daemon_pods);
        daemon = Some(daemon_memory(a, t, args.daemon_pods).await);
    }

    // ---- the report ----
    println!("warm-up (untimed, one pod per runtime):");
    for (handler, r) in labels.iter().zip(&warmups) {
        match r {
            Ok(s) => {
                print!("  {handler:<6} first output after {:>8.1} ms", s.total);
                match s.vm {
                    Some((vm, false)) => println!(
                        "   template creation: yes (VM booted afresh and saved as the template, \
                         ready after {vm} ms)"
                    ),
                    Some((vm, true)) => println!(
                        "   template creation: no (VM cloned from an existing template, ready in {vm} ms)"
                    ),
                    None => println!(),
                }
            }
            Err(e) => println!(
                "  {handler:<6} FAILED: {}",
                e.to_string().lines().next().unwrap_or("")
            ),
        }
    }
    println!();

    let table = Table {
        handlers: &labels,
        label_width: 34,
    };
    println!(
        "{}",
        table.header(&format!("pod start/stop, ms (N={})", args.runs))
    );
    type Field = fn(&Sample) -> f64;
    let rows: [(&str, Field); 8] = [
        ("RunPodSandbox", |s| s.sandbox),
        ("CreateContainer", |s| s.create),
        ("StartContainer", |s| s.start),
        ("  then first output line", |s| s.first_output),
        ("POD START (to first output)", |s| s.total),
        ("StopPodSandbox", |s| s.stop),
        ("RemovePodSandbox", |s| s.remove),
        ("STOP+REMOVE", |s| s.stop_remove),
    ];
    for (label, field) in rows {
        let stats: Vec<_> = samples
            .iter()
            .map(|v| Summary::of(&v.iter().map(field).collect::<Vec<_>>()))
            .collect();
        // Below the 2 ms polling step a ratio means nothing.
        println!("{}", table.row(label, &stats, 2.0));
    }
    for (h, handler) in labels.iter().enumerate() {
        let vms: Vec<(u64, bool)> = samples[h].iter().filter_map(|s| s.vm).collect();
        if vms.is_empty() {
            continue;
        }
        let fresh = vms.iter().filter(|(_, cloned)| !cloned).count();
        let v: Vec<f64> = vms.iter().map(|(ms, _)| *ms as f64).collect();
        let one = Table {
            handlers: std::slice::from_ref(handler),
            label_width: 34,
        };
        println!(
            "{}   ({} clones, {fresh} fresh boots; arrow-vmm's own figure)",
            one.row(&format!("  {handler}: VM ready"), &[Summary::of(&v)], 0.0),
            vms.len() - fresh
        );
    }
    for (handler, f) in labels.iter().zip(&failures) {
        if !f.is_empty() {
            println!("{handler}: {} of {} timed pods FAILED:", f.len(), args.runs);
            for e in f {
                println!("  {e}");
            }
        }
    }

    if args.idle > 0 {
        println!();
        println!(
            "memory per idle pod: {} pods per runtime at once, `{}`, measured after {:.0} s idle",
            args.idle,
            shell_words(&IDLE_CMD),
            args.settle
        );
        println!("  host PSS (MiB) of the pod's shim and every process under it (arrow: + arrow-vmm, which maps guest RAM)");
        for (handler, r) in labels.iter().zip(&memory) {
            match r {
                Ok(pods) => {
                    for m in pods {
                        let parts: Vec<String> = m
                            .parts
                            .iter()
                            .map(|(name, n, kib)| {
                                if *n > 1 {
                                    format!("{name} x{n} {:.1}", mib(*kib))
                                } else {
                                    format!("{name} {:.1}", mib(*kib))
                                }
                            })
                            .collect();
                        println!(
                            "  {handler:<6} pod {}: PSS {:>6.1}  (RSS {:>6.1})  = {}",
                            &m.pod_id[..13.min(m.pod_id.len())],
                            mib(m.pss_kib),
                            mib(m.rss_kib),
                            parts.join(" + ")
                        );
                    }
                }
                Err(e) => println!("  {handler:<6} FAILED: {e:#}"),
            }
        }
        let stats: Vec<_> = memory
            .iter()
            .map(|r| {
                r.as_ref().ok().and_then(|pods| {
                    Summary::of(&pods.iter().map(|m| mib(m.pss_kib)).collect::<Vec<_>>())
                })
            })
            .collect();
        println!(
            "{}",
            table.header(&format!("memory, MiB (M={})", args.idle))
        );
        println!("{}", table.row("PSS PER IDLE POD", &stats, 0.0));
    }
    match daemon {
        Some(Ok((idle, loaded, peak))) => {
            println!();
            println!(
                "arrow-cri daemon RSS: {:.1} MiB with no pod, {:.1} MiB with {} pods running (peak {:.1} MiB)",
                mib(idle),
                mib(loaded),
                args.daemon_pods,
                mib(peak)
            );
        }
        Some(Err(e)) => println!(
            "arrow-cri daemon RSS with {} pods: FAILED: {e:#}",
            args.daemon_pods
        ),
        None => {}
    }
    drop(arrow_cri);
    Ok(())
}
