//! `arrow monitor`: the node's Prometheus endpoint, one per node, as
//! kata-monitor is for Kata.
//!
//! Why a daemon of its own rather than a listener in a component that
//! already runs: the shim is one process per pod and lives only as long as
//! its pod, so no shim can speak for the node; `arrow-cri` is optional (most
//! nodes run containerd's CRI plugin) and holds every pod's lifecycle, which
//! a scraper should not be able to slow down or crash. The monitor needs no
//! privilege beyond reading `/proc` and the pods' state directories under
//! `/run/arrow`, keeps no state of its own (everything is read when
//! Prometheus scrapes), and a crash of it touches no pod.
//!
//! What it reads, per pod directory `/run/arrow/<containerd namespace>/<sandbox id>/`
//! (see `runtime/src/vm.rs`, `PodDir`):
//! - `vmm.pid`: the process the shim started. When the VMM is jailed that
//!   is its *keeper*, and the VMM itself is the keeper's `arrow-vmm` child
//!   (`arrow-vmm/src/jail.rs`); the figures are the VMM's.
//! - `vm.json` ([`VmRecord`]): guest memory, vCPUs, clone or boot, the start
//!   phases' durations, written by the shim once the VM is ready.
//! - `/proc/<vmm>/smaps_rollup` (RSS, PSS), `/proc/<vmm>/stat` (CPU time)
//!   and `/proc/<vmm>/task/*/stat` of the `vcpu*` threads (vCPU time).
//! - `vmm/counters.json` ([`VmCounters`]): the virtio-net and virtio-fs
//!   counters, which the VMM itself rewrites every second. The VMM handles
//!   a hostile guest's input, so this file is untrusted: it is opened
//!   without following a symlink (`O_NOFOLLOW`; the `vmm` directory itself
//!   is the shim's, the VMM cannot replace it) or blocking on a FIFO,
//!   must be a regular file of at most [`COUNTERS_MAX_LEN`] bytes, and is
//!   parsed strictly. A bad one is a scrape error and drops only that
//!   pod's device series.
//!
//! A pod that goes away while it is read is left out silently; a file that
//! is there but cannot be read or understood counts in
//! `arrow_monitor_scrape_errors_total` and is logged.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::vm_counters::{VmCounters, MAX_LEN as COUNTERS_MAX_LEN};
use proto::vm_record::VmRecord;

/// The state directory the shim keeps pods in (`$ARROW_STATE_DIR` replaces
/// it, as for the shim).
pub const DEFAULT_STATE_DIR: &str = "/run/arrow";

/// The content type of what [`encode_scrape`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What can go wrong reading one pod.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {what}", path.display())]
    Parse { path: PathBuf, what: String },
}

/// The memory figures of `/proc/<pid>/smaps_rollup`, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub rss_bytes: u64,
    pub pss_bytes: u64,
}

/// `smaps_rollup`'s `Rss:` and `Pss:` lines (in kB). None if either is
/// missing (a process without memory: a zombie).
pub fn parse_smaps_rollup(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb = rest.trim().strip_suffix("kB")?.trim();
            kb.parse::<u64>().ok()?.checked_mul(1024)
        })
    };
    Some(Memory {
        rss_bytes: field("Rss")?,
        pss_bytes: field("Pss")?,
    })
}

/// What the monitor uses of `/proc/<pid>/stat` (or a task's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    pub ppid: u32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

/// Parses `PID (COMM) STATE PPID ... UTIME STIME ...`; COMM may hold spaces
/// and parentheses, so it ends at the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is STATE (field 3 of proc(5)): UTIME is 14, STIME 15.
    let num = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(Stat {
        comm: comm.to_string(),
        ppid: u32::try_from(num(1)?).ok()?,
        cpu_ticks: num(11)?.checked_add(num(12)?)?,
    })
}

/// The figures of one pod's VMM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VmmFigures {
    pub memory: Memory,
    pub cpu_seconds: f64,
    pub vcpu_seconds: f64,
}

/// One pod as a scrape saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodFigures {
    pub namespace: String,
    pub pod: String,
    /// None while the shim has not written it yet (the VM is starting).
    pub record: Option<VmRecord>,
    /// None if they could not be read (counted as an error).
    pub vmm: Option<VmmFigures>,
    /// The devices' counters: None before the VMM first wrote them, or if
    /// the file is bad (counted as an error).
    pub devices: Option<VmCounters>,
}

/// Everything one scrape found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    pub pods: Vec<PodFigures>,
    /// Files that were there but could not be read or understood.
    pub errors: Vec<MonitorErrorText>,
}

/// A [`MonitorError`] as text (errors are logged and counted, not kept).
pub type MonitorErrorText = String;

/// Where to read from: the shim's state directory and procfs (both
/// replaceable, for tests).
#[derive(Clone, Debug)]
pub struct Sources {
    pub state_dir: PathBuf,
    pub proc_dir: PathBuf,
    /// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
    pub ticks_per_second: u64,
}

impl Sources {
    /// The host's: `$ARROW_STATE_DIR` or `/run/arrow`, `/proc`.
    pub fn host(state_dir: Option<PathBuf>) -> Sources {
        let state_dir = state_dir
            .or_else(|| std::env::var_os("ARROW_STATE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        Sources {
            state_dir,
            proc_dir: PathBuf::from("/proc"),
            ticks_per_second: clock_ticks(),
        }
    }
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

/// Whether an I/O error means the thing went away (a pod or process ending
/// while we read it), which is not an error of the scrape.
fn vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Reads a file: Ok(None) if it (or its process) is gone.
fn read_optional(path: &Path) -> Result<Option<String>, MonitorError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if vanished(&e) => Ok(None),
        Err(source) => Err(MonitorError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads and parses the VMM's counters file as untrusted input (see the
/// module doc): Ok(None) if it is not there (yet).
pub fn read_counters(path: &Path) -> Result<Option<VmCounters>, MonitorError> {
    let io_error = |source| MonitorError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match fs::OpenOptions::new()
        .read(true)
        // A symlink fails with ELOOP; a FIFO opens without a writer.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(e)),
    };
    let meta = file.metadata().map_err(io_error)?;
    if !meta.is_file() {
        return Err(parse_error(path, "not a regular file"));
    }
    let mut bytes = Vec::new();
    // One byte past the cap tells a file that is too long.
    file.take(COUNTERS_MAX_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    VmCounters::parse(&bytes)
        .map(Some)
        .map_err(|e| parse_error(path, e.to_string()))
}

fn parse_error(path: &Path, what: impl Into<String>) -> MonitorError {
    MonitorError::Parse {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// The names of the directories in `dir`, sorted; none if it is gone.
fn subdirs(dir: &Path) -> Result<Vec<String>, MonitorError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if vanished(&e) => return Ok(Vec::new()),
        Err(source) => {
            return Err(MonitorError::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

const VMM_COMM: &str = "arrow-vmm";

impl Sources {
    fn proc_path(&self, pid: u32, rest: &str) -> PathBuf {
        self.proc_dir.join(pid.to_string()).join(rest)
    }

    /// A process's stat: None if it is gone.
    fn stat(&self, path: &Path) -> Result<Option<Stat>, MonitorError> {
        match read_optional(path)? {
            None => Ok(None),
            Some(text) => parse_stat(&text)
                .map(Some)
                .ok_or_else(|| parse_error(path, "not a stat line")),
        }
    }

    /// The VMM behind the pid the shim recorded: the keeper's `arrow-vmm`
    /// child if it has one (jailed), else the process itself (started with
    /// `--no-confine`). None if it is not (or no longer) an arrow-vmm.
    fn find_vmm(&self, recorded: u32) -> Result<Option<u32>, MonitorError> {
        match self.stat(&self.proc_path(recorded, "stat"))? {
            Some(stat) if stat.comm == VMM_COMM => {}
            _ => return Ok(None),
        }
        let children = self.proc_path(recorded, &format!("task/{recorded}/children"));
        let Some(children) = read_optional(&children)? else {
            return Ok(None);
        };
        for child in children.split_whitespace() {
            let Ok(child) = child.parse::<u32>() else {
                continue;
            };
            if let Some(stat) = self.stat(&self.proc_path(child, "stat"))? {
                if stat.comm == VMM_COMM && stat.ppid == recorded {
                    return Ok(Some(child));
                }
            }
        }
        Ok(Some(recorded))
    }

    /// The VMM's memory and CPU figures; None if it went away meanwhile.
    fn vmm_figures(&self, pid: u32) -> Result<Option<VmmFigures>, MonitorError> {
        let smaps = self.proc_path(pid, "smaps_rollup");
        let Some(text) = read_optional(&smaps)? else {
            return Ok(None);
        };
        // A zombie's is empty: the VMM is ending.
        if text.trim().is_empty() {
            return Ok(None);
        }
        let memory =
            parse_smaps_rollup(&text).ok_or_else(|| parse_error(&smaps, "no Rss or Pss"))?;
        let Some(stat) = self.stat(&self.proc_path(pid, "stat"))? else {
            return Ok(None);
        };
        let mut vcpu_ticks = 0u64;
        for task in subdirs(&self.proc_path(pid, "task"))? {
            // A thread that ended since the listing is simply not counted.
            if let Some(t) = self.stat(&self.proc_path(pid, &format!("task/{task}/stat")))? {
                if t.comm.starts_with("vcpu") {
                    vcpu_ticks = vcpu_ticks.saturating_add(t.cpu_ticks);
                }
            }
        }
        let hz = self.ticks_per_second.max(1) as f64;
        Ok(Some(VmmFigures {
            memory,
            cpu_seconds: stat.cpu_ticks as f64 / hz,
            vcpu_seconds: vcpu_ticks as f64 / hz,
        }))
    }

    /// One pod: None if it has no running VMM (starting, or gone).
    fn pod(
        &self,
        namespace: &str,
        pod: &str,
        errors: &mut Vec<MonitorErrorText>,
    ) -> Option<PodFigures> {
        let dir = self.state_dir.join(namespace).join(pod);
        let pid_path = dir.join("vmm.pid");
        let recorded = match read_optional(&pid_path) {
            Ok(Some(text)) if text.trim().is_empty() => return None,
            Ok(Some(text)) => match text.trim().parse::<u32>() {
                Ok(pid) => pid,
                Err(_) => {
                    errors.push(parse_error(&pid_path, "not a pid").to_string());
                    return None;
                }
            },
            Ok(None) => return None,
            Err(e) => {
                errors.push(e.to_string());
                return None;
            }
        };
        let vmm = match self.find_vmm(recorded) {
            Ok(Some(pid)) => pid,
            Ok(None) => return None,
            Err(e) => {
                errors.push(e.to_string());
                return None;
            }
        };
        let figures = match self.vmm_figures(vmm) {
            Ok(Some(f)) => Some(f),
            Ok(None) => return None,
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        };
        let record_path = dir.join("vm.json");
        let record = match read_optional(&record_path) {
            Ok(Some(text)) => match VmRecord::parse(&text) {
                Ok(record) => Some(record),
                Err(e) => {
                    errors.push(parse_error(&record_path, e.to_string()).to_string());
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        };
        // The VMM's own directory (the shim's `PodDir::vmm_dir`).
        let devices = match read_counters(&dir.join("vmm").join(proto::vm_counters::FILE_NAME)) {
            Ok(devices) => devices,
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        };
        Some(PodFigures {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            record,
            vmm: figures,
            devices,
        })
    }

    /// Reads every pod of every namespace.
    pub fn gather(&self) -> Scrape {
        let mut scrape = Scrape::default();
        let namespaces = match subdirs(&self.state_dir) {
            Ok(n) => n,
            Err(e) => {
                scrape.errors.push(e.to_string());
                return scrape;
            }
        };
        for namespace in namespaces {
            let pods = match subdirs(&self.state_dir.join(&namespace)) {
                Ok(p) => p,
                Err(e) => {
                    scrape.errors.push(e.to_string());
                    continue;
                }
            };
            for pod in pods {
                if let Some(figures) = self.pod(&namespace, &pod, &mut scrape.errors) {
                    scrape.pods.push(figures);
                }
            }
        }
        scrape
    }
}

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

fn labels(pod: &PodFigures) -> Labels {
    vec![
        ("namespace", pod.namespace.clone()),
        ("pod", pod.pod.clone()),
    ]
}

/// The exposition text of a scrape; `errors_total` is the monitor's count
/// of scrape errors since it started.
pub fn encode_scrape(scrape: &Scrape, errors_total: u64) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let pods = Gauge::<i64>::default();
    pods.set(i64::try_from(scrape.pods.len()).unwrap_or(i64::MAX));
    registry.register("arrow_pods", "Pods with a running VM", pods);
    let errors = Counter::<u64>::default();
    errors.inc_by(errors_total);
    registry.register(
        "arrow_monitor_scrape_errors",
        "Pod files that were present but unreadable or malformed",
        errors,
    );

    let memory = Family::<Labels, Gauge>::default();
    let vcpus = Family::<Labels, Gauge>::default();
    let cloned = Family::<Labels, Gauge>::default();
    let phases = Family::<Labels, FloatGauge>::default();
    let rss = Family::<Labels, Gauge>::default();
    let pss = Family::<Labels, Gauge>::default();
    let vcpu_seconds = Family::<Labels, FloatCounter>::default();
    let cpu_seconds = Family::<Labels, FloatCounter>::default();
    let bytes = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for pod in &scrape.pods {
        let l = labels(pod);
        if let Some(r) = &pod.record {
            memory.get_or_create(&l).set(bytes(r.guest_memory_bytes));
            vcpus.get_or_create(&l).set(i64::from(r.vcpus));
            cloned.get_or_create(&l).set(i64::from(r.cloned));
            for (phase, ms) in [
                ("vmm_ready", r.vmm_ready_ms),
                ("agent_ready", r.agent_ready_ms),
            ] {
                let mut l = l.clone();
                l.push(("phase", phase.to_string()));
                phases.get_or_create(&l).set(ms as f64 / 1000.0);
            }
        }
        if let Some(f) = &pod.vmm {
            rss.get_or_create(&l).set(bytes(f.memory.rss_bytes));
            pss.get_or_create(&l).set(bytes(f.memory.pss_bytes));
            vcpu_seconds.get_or_create(&l).inc_by(f.vcpu_seconds);
            cpu_seconds.get_or_create(&l).inc_by(f.cpu_seconds);
        }
    }
    registry.register(
        "arrow_pod_vm_memory_bytes",
        "The guest's memory size",
        memory,
    );
    registry.register("arrow_pod_vcpus", "The guest's vCPUs", vcpus);
    registry.register(
        "arrow_pod_cloned",
        "1 if the VM was restored from a template, 0 if it booted",
        cloned,
    );
    registry.register(
        "arrow_pod_start_phase_seconds",
        "How long each phase of the VM's start took: vmm_ready (spawn to the VMM's ready message), \
         agent_ready (ready message to the agent connected and initialised)",
        phases,
    );
    registry.register(
        "arrow_pod_vmm_rss_bytes",
        "Resident memory of the pod's VMM process",
        rss,
    );
    registry.register(
        "arrow_pod_vmm_pss_bytes",
        "Proportional set size of the pod's VMM (template pages shared between clones split)",
        pss,
    );
    registry.register(
        "arrow_pod_vcpu_seconds",
        "CPU time of the VMM's vCPU threads",
        vcpu_seconds,
    );
    registry.register(
        "arrow_pod_vmm_cpu_seconds",
        "CPU time of the whole VMM process (vCPUs, devices, main thread)",
        cpu_seconds,
    );
    register_device_series(&mut registry, scrape);
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

/// A device counter series: its name (`_total` is added), help, and the
/// value a pod's counters give it (None: the pod lacks the device).
type DeviceSeries = (&'static str, &'static str, fn(&VmCounters) -> Option<u64>);

/// The devices' counters, one series each, as the VMM counts them.
const DEVICE_SERIES: [DeviceSeries; 11] = [
    (
        "arrow_pod_net_rx_bytes",
        "Bytes the pod's NIC delivered to the guest (without virtio-net headers)",
        |c| c.net.map(|n| n.rx_bytes),
    ),
    (
        "arrow_pod_net_tx_bytes",
        "Bytes the guest sent out through the pod's NIC (without virtio-net headers)",
        |c| c.net.map(|n| n.tx_bytes),
    ),
    (
        "arrow_pod_net_rx_frames",
        "Frames the pod's NIC delivered to the guest (several merged tap frames count once)",
        |c| c.net.map(|n| n.rx_frames),
    ),
    (
        "arrow_pod_net_tx_frames",
        "Frames the guest sent out through the pod's NIC",
        |c| c.net.map(|n| n.tx_frames),
    ),
    (
        "arrow_pod_net_rx_dropped_frames",
        "Frames for the guest the VMM dropped (malformed guest buffers, frames too big for them)",
        |c| c.net.map(|n| n.rx_dropped),
    ),
    (
        "arrow_pod_net_tx_dropped_frames",
        "Frames from the guest the VMM dropped (malformed chains or headers, tap errors)",
        |c| c.net.map(|n| n.tx_dropped),
    ),
    (
        "arrow_pod_fs_requests",
        "FUSE requests the guest sent to the pod's virtio-fs share",
        |c| c.fs.map(|f| f.requests),
    ),
    (
        "arrow_pod_fs_errors",
        "virtio-fs requests answered with an error number (lookups of missing names included)",
        |c| c.fs.map(|f| f.errors),
    ),
    (
        "arrow_pod_fs_unanswered_requests",
        "virtio-fs requests the VMM could not answer (malformed)",
        |c| c.fs.map(|f| f.unanswered),
    ),
    (
        "arrow_pod_fs_read_bytes",
        "File data the guest read from the pod's virtio-fs share",
        |c| c.fs.map(|f| f.read_bytes),
    ),
    (
        "arrow_pod_fs_write_bytes",
        "File data the guest wrote to the pod's virtio-fs share",
        |c| c.fs.map(|f| f.write_bytes),
    ),
];

fn register_device_series(registry: &mut Registry, scrape: &Scrape) {
    for (name, help, value) in DEVICE_SERIES {
        let family = Family::<Labels, Counter<u64>>::default();
        for pod in &scrape.pods {
            if let Some(v) = pod.devices.as_ref().and_then(value) {
                family.get_or_create(&labels(pod)).inc_by(v);
            }
        }
        registry.register(name, help, family);
    }
}

/// The monitor: gathers and encodes on each scrape, counts errors.
pub struct Monitor {
    sources: Sources,
    errors_total: AtomicU64,
}

impl Monitor {
    pub fn new(sources: Sources) -> Monitor {
        Monitor {
            sources,
            errors_total: AtomicU64::new(0),
        }
    }

    /// One scrape's exposition text; the errors it met are logged.
    pub fn scrape(&self) -> Result<String, std::fmt::Error> {
        let scrape = self.sources.gather();
        for e in &scrape.errors {
            eprintln!("arrow monitor: {e}");
        }
        let n = scrape.errors.len() as u64;
        let total = self.errors_total.fetch_add(n, Ordering::Relaxed) + n;
        encode_scrape(&scrape, total)
    }

    /// Serves `GET /metrics` (404 for any other path) on `listener`, a
    /// thread per connection, forever.
    pub fn serve(self, listener: TcpListener) -> io::Result<()> {
        let monitor = Arc::new(self);
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("arrow monitor: accept: {e}");
                    continue;
                }
            };
            let monitor = monitor.clone();
            std::thread::spawn(move || {
                if let Err(e) = monitor.answer(conn) {
                    eprintln!("arrow monitor: {e}");
                }
            });
        }
        Ok(())
    }

    fn answer(&self, mut conn: TcpStream) -> io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut reader = BufReader::new(io::Read::take(&conn, 16 * 1024));
        let mut request = String::new();
        reader.read_line(&mut request)?;
        // The headers: read up to the blank line, ignored.
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        let response = match route(&request) {
            Route::Metrics { head } => match self.scrape() {
                Ok(body) => response("200 OK", CONTENT_TYPE, &body, head),
                Err(_) => response(
                    "500 Internal Server Error",
                    "text/plain",
                    "encoding failed\n",
                    head,
                ),
            },
            Route::NotFound => response("404 Not Found", "text/plain", "not found\n", false),
            Route::BadMethod => {
                response("405 Method Not Allowed", "text/plain", "GET only\n", false)
            }
        };
        conn.write_all(response.as_bytes())?;
        conn.flush()
    }
}

/// What a request line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics { head: bool },
    NotFound,
    BadMethod,
}

/// Routes `METHOD TARGET HTTP/x.y`: `/metrics` (with or without a query).
pub fn route(request_line: &str) -> Route {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::BadMethod,
    };
    if path == "/metrics" {
        Route::Metrics { head }
    } else {
        Route::NotFound
    }
}

fn response(status: &str, content_type: &str, body: &str, head: bool) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{}",
        body.len(),
        if head { "" } else { body }
    )
}

/// Parses exposition text into `name{labels} -> value` for the samples
/// (comments skipped), for tests and the e2e test's assertions.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse::<f64>().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS_ROLLUP: &str = "\
55d0c0a00000-7ffd5a7f4000 ---p 00000000 00:00 0                          [rollup]
Rss:               45312 kB
Pss:               20480 kB
Pss_Anon:          10240 kB
Shared_Clean:      30000 kB
Swap:                  0 kB
";

    /// `vm.json` exactly as the shim writes it (its test checks the text).
    const VM_JSON: &str = r#"{"guest_memory_bytes":268435456,"vcpus":2,"cloned":true,"vmm_ready_ms":412,"agent_ready_ms":35}"#;

    /// A `counters.json` as the VMM writes it.
    const COUNTERS_JSON: &str = r#"{"net":{"rx_frames":10,"rx_bytes":1500,"rx_dropped":1,"tx_frames":12,"tx_bytes":2000,"tx_dropped":2},"fs":{"requests":300,"errors":20,"unanswered":3,"read_bytes":1048576,"write_bytes":4096}}"#;

    fn stat_line(pid: u32, comm: &str, ppid: u32, utime: u64, stime: u64) -> String {
        format!(
            "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 1200 0 0 0 {utime} {stime} 0 0 20 0 3 0 \
             123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
        )
    }

    #[test]
    fn smaps_rollup_gives_rss_and_pss_in_bytes() {
        assert_eq!(
            parse_smaps_rollup(SMAPS_ROLLUP),
            Some(Memory {
                rss_bytes: 45312 * 1024,
                pss_bytes: 20480 * 1024
            })
        );
        // A zombie's, or a truncated one.
        assert_eq!(parse_smaps_rollup(""), None);
        assert_eq!(parse_smaps_rollup("Rss: 12 kB\n"), None);
        assert_eq!(parse_smaps_rollup("Rss: x kB\nPss: 1 kB\n"), None);
    }

    #[test]
    fn stat_parses_comm_with_spaces_and_parentheses() {
        let stat = parse_stat(&stat_line(7, "a) (b", 3, 150, 50)).unwrap();
        assert_eq!(
            stat,
            Stat {
                comm: "a) (b".into(),
                ppid: 3,
                cpu_ticks: 200
            }
        );
        assert_eq!(parse_stat("7 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn routes_only_metrics() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route("HEAD /metrics?x=1 HTTP/1.0"),
            Route::Metrics { head: true }
        );
        assert_eq!(route("GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route("GET /metrics/x HTTP/1.1"), Route::NotFound);
        assert_eq!(route("POST /metrics HTTP/1.1"), Route::BadMethod);
        assert_eq!(route(""), Route::BadMethod);
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// A fake host: pod `a` jailed (keeper 100, VMM 101 with two vCPU
    /// threads), pod `b` unconfined (VMM 200 itself), pod `gone` whose VMM
    /// has exited, pod `starting` without a pid yet, pod `bad` with a
    /// malformed vm.json, and a pid reused by another program.
    fn fake_host() -> (tempfile::TempDir, Sources) {
        let tmp = tempfile::tempdir().unwrap();
        let proc_dir = tmp.path().join("proc");
        let state = tmp.path().join("state");
        let p = |rest: &str| proc_dir.join(rest);
        write(&p("100/stat"), &stat_line(100, "arrow-vmm", 1, 1, 1));
        write(&p("100/task/100/children"), "99 101 ");
        write(&p("99/stat"), &stat_line(99, "sh", 100, 0, 0));
        write(&p("101/stat"), &stat_line(101, "arrow-vmm", 100, 300, 100));
        write(&p("101/smaps_rollup"), SMAPS_ROLLUP);
        write(
            &p("101/task/101/stat"),
            &stat_line(101, "arrow-vmm", 100, 10, 10),
        );
        write(
            &p("101/task/102/stat"),
            &stat_line(102, "vcpu0", 100, 150, 50),
        );
        write(
            &p("101/task/103/stat"),
            &stat_line(103, "vcpu1", 100, 50, 50),
        );
        write(
            &p("101/task/104/stat"),
            &stat_line(104, "devices", 100, 20, 20),
        );
        write(&p("200/stat"), &stat_line(200, "arrow-vmm", 1, 50, 50));
        write(&p("200/task/200/children"), "");
        write(&p("200/smaps_rollup"), "Rss: 2048 kB\nPss: 1024 kB\n");
        write(
            &p("200/task/200/stat"),
            &stat_line(200, "arrow-vmm", 1, 50, 50),
        );
        write(&p("300/stat"), &stat_line(300, "bash", 1, 5, 5));
        let s = |rest: &str| state.join(rest);
        write(&s("k8s.io/a/vmm.pid"), "100");
        write(&s("k8s.io/a/vm.json"), VM_JSON);
        write(&s("k8s.io/a/vmm/counters.json"), COUNTERS_JSON);
        write(&s("k8s.io/b/vmm.pid"), "200\n");
        write(&s("k8s.io/gone/vmm.pid"), "4242");
        write(&s("k8s.io/gone/vm.json"), VM_JSON);
        write(&s("k8s.io/reused/vmm.pid"), "300");
        fs::create_dir_all(s("k8s.io/starting/vmm")).unwrap();
        write(&s("other/bad/vmm.pid"), "200");
        write(&s("other/bad/vm.json"), "{\"guest_memory");
        write(&s("not-a-namespace-file"), "");
        let sources = Sources {
            state_dir: state,
            proc_dir,
            ticks_per_second: 100,
        };
        (tmp, sources)
    }

    #[test]
    fn gathers_the_running_pods_and_their_vmm_figures() {
        let (_tmp, sources) = fake_host();
        let scrape = sources.gather();
        let names: Vec<(&str, &str)> = scrape
            .pods
            .iter()
            .map(|p| (p.namespace.as_str(), p.pod.as_str()))
            .collect();
        assert_eq!(names, [("k8s.io", "a"), ("k8s.io", "b"), ("other", "bad")]);
        let a = &scrape.pods[0];
        assert_eq!(a.record.as_ref().unwrap().guest_memory_bytes, 256 << 20);
        let vmm = a.vmm.unwrap();
        // The jailed VMM's figures, not its keeper's.
        assert_eq!(vmm.memory.rss_bytes, 45312 * 1024);
        assert_eq!(vmm.cpu_seconds, 4.0);
        assert_eq!(vmm.vcpu_seconds, 3.0);
        let devices = a.devices.unwrap();
        assert_eq!(devices.net.unwrap().tx_bytes, 2000);
        assert_eq!(devices.fs.unwrap().read_bytes, 1 << 20);
        let b = &scrape.pods[1];
        assert_eq!(b.record, None, "not written yet: no error");
        assert_eq!(b.devices, None, "not written yet: no error");
        assert_eq!(b.vmm.unwrap().cpu_seconds, 1.0);
        assert_eq!(b.vmm.unwrap().vcpu_seconds, 0.0);
        assert_eq!(scrape.errors.len(), 1, "{:?}", scrape.errors);
        assert!(
            scrape.errors[0].contains("bad/vm.json"),
            "{:?}",
            scrape.errors
        );
    }

    #[test]
    fn a_missing_state_dir_is_no_pods() {
        let (tmp, mut sources) = fake_host();
        sources.state_dir = tmp.path().join("none");
        assert_eq!(sources.gather(), Scrape::default());
    }

    #[test]
    fn encodes_each_pods_series() {
        let (_tmp, sources) = fake_host();
        let monitor = Monitor::new(sources);
        let text = monitor.scrape().unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE arrow_pod_vcpu_seconds counter"),
            "{text}"
        );
        let s = samples(&text);
        let a = r#"namespace="k8s.io",pod="a""#;
        let expect = [
            ("arrow_pods".to_string(), 3.0),
            ("arrow_monitor_scrape_errors_total".into(), 1.0),
            (format!("arrow_pod_vm_memory_bytes{{{a}}}"), 268435456.0),
            (format!("arrow_pod_vcpus{{{a}}}"), 2.0),
            (format!("arrow_pod_cloned{{{a}}}"), 1.0),
            (format!("arrow_pod_vmm_rss_bytes{{{a}}}"), 45312.0 * 1024.0),
            (format!("arrow_pod_vmm_pss_bytes{{{a}}}"), 20480.0 * 1024.0),
            (format!("arrow_pod_vcpu_seconds_total{{{a}}}"), 3.0),
            (format!("arrow_pod_vmm_cpu_seconds_total{{{a}}}"), 4.0),
            (
                format!("arrow_pod_start_phase_seconds{{{a},phase=\"vmm_ready\"}}"),
                0.412,
            ),
            (
                format!("arrow_pod_start_phase_seconds{{{a},phase=\"agent_ready\"}}"),
                0.035,
            ),
            (format!("arrow_pod_net_rx_bytes_total{{{a}}}"), 1500.0),
            (format!("arrow_pod_net_tx_bytes_total{{{a}}}"), 2000.0),
            (format!("arrow_pod_net_rx_frames_total{{{a}}}"), 10.0),
            (format!("arrow_pod_net_tx_frames_total{{{a}}}"), 12.0),
            (format!("arrow_pod_net_rx_dropped_frames_total{{{a}}}"), 1.0),
            (format!("arrow_pod_net_tx_dropped_frames_total{{{a}}}"), 2.0),
            (format!("arrow_pod_fs_requests_total{{{a}}}"), 300.0),
            (format!("arrow_pod_fs_errors_total{{{a}}}"), 20.0),
            (
                format!("arrow_pod_fs_unanswered_requests_total{{{a}}}"),
                3.0,
            ),
            (format!("arrow_pod_fs_read_bytes_total{{{a}}}"), 1048576.0),
            (format!("arrow_pod_fs_write_bytes_total{{{a}}}"), 4096.0),
        ];
        for (series, value) in expect {
            assert_eq!(s.get(&series), Some(&value), "{series} in\n{text}");
        }
        // Pod b has no record yet: only its process figures.
        assert!(s.contains_key(r#"arrow_pod_vmm_rss_bytes{namespace="k8s.io",pod="b"}"#));
        assert!(!s.contains_key(r#"arrow_pod_cloned{namespace="k8s.io",pod="b"}"#));
        assert!(!text.contains(r#"fs_requests_total{namespace="k8s.io",pod="b"}"#));
        assert!(
            text.contains("# TYPE arrow_pod_net_rx_bytes counter"),
            "{text}"
        );
        assert!(!text.contains("gone") && !text.contains("starting") && !text.contains("reused"));
        // The error count adds up over scrapes.
        let again = samples(&monitor.scrape().unwrap());
        assert_eq!(again.get("arrow_monitor_scrape_errors_total"), Some(&2.0));
    }

    #[test]
    fn counters_files_are_read_as_untrusted_input() {
        let tmp = tempfile::tempdir().unwrap();
        let path = |name: &str| tmp.path().join(name);
        assert!(read_counters(&path("missing")).unwrap().is_none());
        write(&path("good"), COUNTERS_JSON);
        assert_eq!(
            read_counters(&path("good"))
                .unwrap()
                .unwrap()
                .fs
                .unwrap()
                .requests,
            300
        );
        // A symlink (even to a good file), a FIFO (no writer: must not
        // block), a directory, a file past the cap, garbage.
        std::os::unix::fs::symlink(path("good"), path("link")).unwrap();
        let fifo =
            std::ffi::CString::new(path("fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        fs::create_dir(path("dir")).unwrap();
        write(
            &path("long"),
            &format!("{COUNTERS_JSON}{}", " ".repeat(COUNTERS_MAX_LEN)),
        );
        write(&path("garbage"), "{\"net\":{\"rx_frames\":-1}}");
        for bad in ["link", "fifo", "dir", "long", "garbage"] {
            assert!(read_counters(&path(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_counters_file_drops_only_that_pods_device_series() {
        let (_tmp, sources) = fake_host();
        let b = sources.state_dir.join("k8s.io/b/vmm");
        fs::create_dir_all(&b).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", b.join("counters.json")).unwrap();
        let scrape = sources.gather();
        assert_eq!(scrape.errors.len(), 2, "{:?}", scrape.errors);
        assert!(scrape
            .errors
            .iter()
            .any(|e| e.contains("b/vmm/counters.json")));
        let text = encode_scrape(&scrape, 2).unwrap();
        let s = samples(&text);
        let b = r#"namespace="k8s.io",pod="b""#;
        assert!(s.contains_key(&format!("arrow_pod_vmm_rss_bytes{{{b}}}")));
        assert!(!text.contains(&format!("arrow_pod_fs_requests_total{{{b}}}")));
        let a = r#"namespace="k8s.io",pod="a""#;
        assert_eq!(
            s.get(&format!("arrow_pod_fs_requests_total{{{a}}}")),
            Some(&300.0)
        );
    }

    #[test]
    fn serves_metrics_and_404_over_http() {
        use std::io::Read;
        let (_tmp, sources) = fake_host();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || Monitor::new(sources).serve(listener));
        let get = |path: &str| {
            let mut conn = TcpStream::connect(addr).unwrap();
            write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            conn.read_to_string(&mut out).unwrap();
            out
        };
        let metrics = get("/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains(CONTENT_TYPE));
        assert!(metrics.contains("arrow_pods 3"), "{metrics}");
        assert!(get("/").starts_with("HTTP/1.1 404"));
    }
}
