//! The pod's microVM, as the runtime sees it: an `arrow-vmm serve` child
//! process, the agent connection into the guest, and the pod's state
//! directory on the host.
//!
//! The VMM runs as its own process (it handles untrusted guest input), with
//! a control channel to the shim ([`proto::vmm_control`]: an inherited
//! socket pair, no path): the VMM says on it when the VM is ready, the shim
//! asks on it for a stop, and when the shim dies for any reason its end
//! closes and the VMM stops the VM and exits, so a killed shim never leaks
//! a VM.

use std::fs::{self, File, OpenOptions};
use std::io::BufReader;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Pid;
use proto::agent::StreamKind;
use proto::client::{AgentClient, ClientError};
use proto::vm_record::VmRecord;
use proto::vmm_control::{self, ControlError, ControlRequest, VmmMessage};
use proto::vmm_ready::VmmReady;
use tokio::sync::watch;

use crate::cgroup::{self, CgroupError, CgroupPath, PodCgroup};
use crate::exits::ChildExits;
use crate::share::PodShare;
use crate::spec::{check_identifier, PodVmSize, SpecError};
use crate::stdio::{GuestStream, GuestStreams};

/// How long a VM may take to be ready: a clone takes well under a second,
/// but the first pod of a shape creates the template (a full Linux boot,
/// ~20-40 s on nested KVM without hardware support).
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the guest gets to power off before the VMM is asked to stop
/// it, and the VMM to stop it before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long the VMM gets to answer a control request.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors starting or talking to the pod's VM.
#[derive(Debug, thiserror::Error)]
pub enum PodVmError {
    #[error("arrow-vmm not found next to the shim ({0}) nor as $ARROW_VMM")]
    VmmNotFound(PathBuf),
    #[error("starting arrow-vmm: {0}")]
    Spawn(std::io::Error),
    #[error("arrow-vmm failed before the VM was ready: {0}")]
    NotReady(String),
    #[error("the VMM's control channel: {0}")]
    Control(#[from] ControlError),
    #[error("the VMM refused {request:?}: {reason}")]
    Refused {
        request: ControlRequest,
        reason: String,
    },
    #[error("connecting to the agent: {0}")]
    Connect(std::io::Error),
    #[error("agent: {0}")]
    Agent(#[from] ClientError),
    #[error("pod state directory {path}: {err}")]
    StateDir { path: PathBuf, err: std::io::Error },
    #[error("the pod's share: {0}")]
    Share(crate::share::ShareError),
    #[error("the pod's cgroup: {0}")]
    Cgroup(CgroupError),
    #[error(
        "{} is served by pid {peer}, not by the pod's VMM (pid {vmm}): refusing to talk to it",
        path.display()
    )]
    ForeignPeer { path: PathBuf, peer: i32, vmm: u32 },
}

impl From<CgroupError> for PodVmError {
    /// A spawn that failed for another reason than the cgroup is a spawn
    /// error.
    fn from(e: CgroupError) -> PodVmError {
        match e {
            CgroupError::Spawn(err) => PodVmError::Spawn(err),
            e => PodVmError::Cgroup(e),
        }
    }
}

/// Where a pod's host-side files live.
#[derive(Clone, Debug)]
pub struct PodDir {
    root: PathBuf,
}

impl PodDir {
    /// `/run/arrow/<namespace>/<pod id>`; `$ARROW_STATE_DIR` replaces
    /// `/run/arrow` (tests). Both names must be plain identifiers.
    pub fn new(namespace: &str, pod_id: &str) -> Result<PodDir, SpecError> {
        check_identifier("namespace", namespace)?;
        check_identifier("pod id", pod_id)?;
        let base = std::env::var_os("ARROW_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/arrow"));
        Ok(PodDir {
            root: base.join(namespace).join(pod_id),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The pod's share: what the guest sees over virtio-fs.
    pub fn share(&self) -> PodShare {
        PodShare::new(&self.root)
    }
    /// The only directory of the pod the VMM can write: its sockets and
    /// the guest's console log (bound into its jail).
    pub fn vmm_dir(&self) -> PathBuf {
        self.root.join("vmm")
    }
    /// The empty directory the VMM builds its jail on.
    pub fn jail(&self) -> PathBuf {
        self.root.join("jail")
    }
    pub fn vsock(&self) -> PathBuf {
        self.vmm_dir().join("vsock.sock")
    }
    pub fn vmm_pid(&self) -> PathBuf {
        self.root.join("vmm.pid")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.root.join("vmm.log")
    }
    pub fn console_log(&self) -> PathBuf {
        self.vmm_dir().join("console.log")
    }
    /// The devices' live counters, which the VMM rewrites every second
    /// ([`proto::vm_counters`]), for `arrow monitor`.
    pub fn counters(&self) -> PathBuf {
        self.vmm_dir().join(proto::vm_counters::FILE_NAME)
    }
    /// The cgroup directories the shim created for the VMM, one a line.
    pub fn cgroup_record(&self) -> PathBuf {
        self.root.join("cgroups")
    }
    /// What the VM is and how it started ([`VmRecord`]), for `arrow monitor`.
    pub fn vm_record(&self) -> PathBuf {
        self.root.join("vm.json")
    }

    /// Kills a VMM a dead shim left (by its pid file, if it is still an
    /// arrow-vmm), removes the cgroups the shim created for it (see
    /// [`cgroup::remove_recorded`]), unmounts everything in the share and
    /// removes the directory.
    pub fn clean_up(&self) -> Result<(), crate::share::ShareError> {
        if let Ok(text) = fs::read_to_string(self.vmm_pid()) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
                if exe.file_name().is_some_and(|n| n == "arrow-vmm") {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        if let Err(e) = cgroup::remove_recorded(&self.cgroup_record()) {
            log::warn!("{e}");
        }
        crate::share::remove_tree(&self.root)
    }
}

/// The host side of the guest's NIC, for `arrow-vmm --net-tap-fd`.
///
/// The guest NIC keeps the VMM's default MAC (the VMM puts the MAC in the
/// template key, so one fixed MAC means one template for every pod);
/// arrow-init gives it the pod's MAC before it has an address
/// (`ConfigureNetwork`). The MTU is the device's advertised maximum, so it
/// is the pod's: pods of one cluster share it, and so share a template.
#[derive(Debug)]
pub struct VmNic {
    /// The tap, close-on-exec: only the VMM inherits it (see `start`).
    pub tap: OwnedFd,
    pub mtu: u32,
    /// The pod's network namespace, where the tap is.
    pub netns: PathBuf,
}

/// A running pod VM.
pub struct PodVm {
    pid: u32,
    dir: PodDir,
    agent: Arc<AgentClient>,
    cloned: bool,
    /// The network namespace whose tap the VM's NIC uses, if it has one.
    netns: Option<PathBuf>,
    /// The shim's end of the control channel; closing it makes the VMM
    /// stop the VM.
    control: Arc<Mutex<Option<BufReader<UnixStream>>>>,
    exit: watch::Receiver<Option<i32>>,
    /// The stdio streams attached to the guest's processes.
    streams: Arc<GuestStreams>,
}

impl PodVm {
    /// Starts `arrow-vmm serve` for the pod (a clone of the matching
    /// template, or a fresh boot), connects to the agent and, for a clone,
    /// makes it unique with `InitClone`. With `nic`, the guest gets a
    /// virtio-net NIC over that tap; the shim's copy of the descriptor is
    /// closed once the VMM has its own, so the tap lives as long as the VMM.
    /// With `cgroup`, the VMM runs in that cgroup from before its exec (the
    /// directories the shim creates for it are recorded in the pod's
    /// directory, for [`PodDir::clean_up`]). `exits` tells when the VMM
    /// exited (see [`crate::exits`]). `vmm` is the binary to run (see
    /// [`vmm_binary`]).
    pub async fn start(
        vmm: &Path,
        dir: PodDir,
        shape: PodVmSize,
        hostname: &str,
        nic: Option<VmNic>,
        cgroup: Option<&CgroupPath>,
        exits: &dyn ChildExits,
    ) -> Result<PodVm, PodVmError> {
        fs::create_dir_all(dir.vmm_dir()).map_err(|err| PodVmError::StateDir {
            path: dir.vmm_dir(),
            err,
        })?;
        let share = dir.share();
        share.set_up().map_err(PodVmError::Share)?;
        // Before spawning: a reaper may reap the VMM before we would
        // otherwise be listening.
        let listener = exits.listen().await.map_err(PodVmError::Spawn)?;
        let log = File::create(dir.vmm_log()).map_err(|err| PodVmError::StateDir {
            path: dir.vmm_log(),
            err,
        })?;
        let log_out = log.try_clone().map_err(|err| PodVmError::StateDir {
            path: dir.vmm_log(),
            err,
        })?;
        // No host file the VMM does not need: stdin is an empty pipe (its
        // writer closed here; the control channel is the lifeline), stdout
        // goes to the log with stderr (a CLI-only ready line lands there).
        let (no_input, writer) = std::io::pipe().map_err(PodVmError::Spawn)?;
        drop(writer);
        let mut cmd = Command::new(vmm);
        // A clean environment: only where the kernel, arrow-init and the
        // templates are (`ARROW_*`), none of containerd's.
        cmd.env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| k.to_string_lossy().starts_with("ARROW_")));
        cmd.arg("serve")
            .arg("--vcpus")
            .arg(shape.vcpus.to_string())
            .arg("--memory")
            .arg(format!("{}M", shape.memory_bytes >> 20))
            .arg("--vsock-uds")
            .arg(dir.vsock())
            .arg("--shared-dir")
            .arg(share.view())
            .arg("--console-log")
            .arg(dir.console_log())
            .arg("--counters")
            .arg(dir.counters())
            .arg("--jail")
            .arg(dir.jail())
            .stdin(Stdio::from(no_input))
            .stdout(Stdio::from(log_out))
            .stderr(Stdio::from(log));
        // Both ends close-on-exec: only the VMM inherits its own (see the
        // pre_exec below).
        let (control, vmm_end) = UnixStream::pair().map_err(PodVmError::Spawn)?;
        cmd.arg("--control-fd").arg(vmm_end.as_raw_fd().to_string());
        let mut inherited = vec![vmm_end.as_raw_fd()];
        if std::env::var_os("ARROW_NO_TEMPLATE").is_some() {
            cmd.arg("--no-template");
        }
        // For debugging and for measuring the jail's cost only: set in the
        // shim's environment by whoever runs the node, never by a pod.
        if std::env::var_os("ARROW_VMM_NO_CONFINE").is_some() {
            log::warn!(
                "ARROW_VMM_NO_CONFINE is set: the VMM in {} runs without its jail and \
                 seccomp filters, with every privilege of the shim",
                dir.root.display()
            );
            cmd.arg("--no-confine");
        }
        if let Some(nic) = &nic {
            let fd = nic.tap.as_raw_fd();
            cmd.arg("--net-tap-fd")
                .arg(fd.to_string())
                .arg("--net-mtu")
                .arg(nic.mtu.to_string());
            inherited.push(fd);
        }
        // SAFETY: runs in the forked child before exec and only calls
        // fcntl, which is async-signal-safe, on descriptors open in the
        // shim (the child has copies). Clearing close-on-exec there (not
        // in the shim) means no other child the shim spawns meanwhile
        // inherits the tap or the control channel.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &inherited {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let spawn_at = Instant::now();
        let spawned = match cgroup {
            Some(path) => PodCgroup::prepare(path, &dir.cgroup_record())
                .and_then(|cgroup| cgroup.spawn(&mut cmd))
                .map_err(PodVmError::from),
            None => cmd.spawn().map_err(PodVmError::Spawn),
        };
        // The VMM has its copies now (or failed): ours would keep the tap
        // and the channel open.
        let netns = nic.map(|nic| nic.netns);
        drop(vmm_end);
        let child: Child = spawned?;
        let pid = child.id();
        let _ = fs::write(dir.vmm_pid(), pid.to_string());
        let (exit_tx, exit_rx) = watch::channel(None);
        let exit = listener.exit_of(child);
        tokio::spawn(async move {
            let _ = exit_tx.send(Some(exit.await));
        });
        let mut reader = BufReader::new(control);
        let vm = PodVm {
            pid,
            dir: dir.clone(),
            agent: Arc::new(placeholder_agent()?),
            cloned: false,
            netns,
            control: Arc::default(),
            exit: exit_rx,
            streams: Arc::default(),
        };
        let ready = tokio::task::spawn_blocking(move || {
            let ready = read_ready(&mut reader, READY_TIMEOUT);
            (reader, ready)
        })
        .await;
        let ready = match ready {
            Ok((reader, Ok(ready))) => {
                *vm.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader);
                ready
            }
            Ok((_, Err(why))) => {
                vm.kill();
                return Err(PodVmError::NotReady(format!("{why}; {}", vm.log_tail())));
            }
            Err(join) => {
                vm.kill();
                return Err(PodVmError::NotReady(join.to_string()));
            }
        };
        log::info!(
            "pod VM pid {pid} ready in {} ms ({})",
            ready.ready_ms,
            if ready.cloned { "clone" } else { "fresh boot" }
        );
        let ready_at = Instant::now();
        let uds = dir.vsock();
        let hostname = hostname.to_string();
        let cloned = ready.cloned;
        let connected = tokio::task::spawn_blocking(move || -> Result<AgentClient, PodVmError> {
            let stream = connect_vmm(&uds, pid, proto::AGENT_PORT, Duration::from_secs(10))?;
            let agent = AgentClient::from_unix(stream).map_err(PodVmError::Connect)?;
            // A clone needs the host's clock and fresh entropy; a fresh
            // boot has both, but like a clone it needs the pod's hostname.
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let entropy = proto::client::fresh_entropy(64).map_err(PodVmError::Connect)?;
            agent.init_clone(now, &entropy, &hostname)?;
            Ok(agent)
        })
        .await
        .map_err(|e| PodVmError::NotReady(e.to_string()))
        .and_then(|r| r);
        match connected {
            Ok(agent) => {
                let record = VmRecord {
                    guest_memory_bytes: shape.memory_bytes,
                    vcpus: shape.vcpus,
                    cloned,
                    vmm_ready_ms: millis(ready_at - spawn_at),
                    agent_ready_ms: millis(ready_at.elapsed()),
                };
                // Only the monitor reads it: a pod runs without it.
                if let Err(e) = record.write(&dir.vm_record()) {
                    log::warn!("writing {}: {e}", dir.vm_record().display());
                }
                Ok(PodVm {
                    agent: Arc::new(agent),
                    cloned,
                    ..vm
                })
            }
            Err(e) => {
                vm.kill();
                Err(e)
            }
        }
    }

    /// The VMM's pid on the host (the pod sandbox's pid).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn cloned(&self) -> bool {
        self.cloned
    }

    pub fn dir(&self) -> &PodDir {
        &self.dir
    }

    /// The pod network namespace holding the tap of the VM's NIC.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    pub fn agent(&self) -> Arc<AgentClient> {
        self.agent.clone()
    }

    /// Opens a stdio stream of guest process `process_id`; it is shut down
    /// by [`PodVm::end_connections`].
    pub fn attach(&self, process_id: &str, kind: StreamKind) -> Result<GuestStream, PodVmError> {
        let stream = connect_vmm(
            &self.dir.vsock(),
            self.pid,
            proto::STDIO_PORT,
            Duration::from_secs(10),
        )?;
        let stream = proto::client::attach_unix_stream(
            stream,
            process_id,
            kind,
            proto::client::ATTACH_TIMEOUT,
        )?;
        self.streams.track(stream).map_err(PodVmError::Connect)
    }

    /// Opens a stream to TCP port `port` on the guest's 127.0.0.1
    /// (port-forward); it is shut down by [`PodVm::end_connections`]. The
    /// guest refusing (nothing listens there) is [`ClientError::Unavailable`].
    pub fn port_forward(&self, port: u16, timeout: Duration) -> Result<GuestStream, PodVmError> {
        let stream = connect_vmm(&self.dir.vsock(), self.pid, proto::FORWARD_PORT, timeout)?;
        let stream = proto::client::port_forward_unix_stream(stream, port, timeout)?;
        self.streams.track(stream).map_err(PodVmError::Connect)
    }

    /// Once the VMM exited: fails the agent calls still waiting (long polls
    /// included) and shuts down every stdio stream, whatever the other end
    /// of those connections still does, so nothing the shim runs stays
    /// blocked on a VM that is gone.
    pub fn end_connections(&self) {
        self.agent.close();
        self.streams.end_all();
    }

    /// A receiver that holds the VMM's exit code once it exited.
    pub fn exit_watch(&self) -> watch::Receiver<Option<i32>> {
        self.exit.clone()
    }

    /// Waits for the VMM to exit and returns its exit code (128 + signal if
    /// it was killed).
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        loop {
            if let Some(code) = *rx.borrow_and_update() {
                return code;
            }
            if rx.changed().await.is_err() {
                return 255;
            }
        }
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Stops the VM: asks the guest to power off, then the VMM to stop the
    /// VM (a guest may ignore the first), then kills the VMM; returns once
    /// it is gone.
    pub async fn stop(&self) -> i32 {
        if !self.has_exited() {
            let agent = self.agent.clone();
            let _ = tokio::time::timeout(
                STOP_GRACE,
                tokio::task::spawn_blocking(move || agent.shutdown()),
            )
            .await;
            if tokio::time::timeout(STOP_GRACE, self.wait()).await.is_err() {
                if let Err(e) = self.request(ControlRequest::Stop).await {
                    log::warn!("asking the VMM (pid {}) to stop: {e}", self.pid);
                }
                if tokio::time::timeout(STOP_GRACE, self.wait()).await.is_err() {
                    log::warn!("the VMM (pid {}) did not stop; killing it", self.pid);
                    self.kill();
                }
            }
        }
        self.wait().await
    }

    /// Sends `request` on the control channel and returns the VMM's reply
    /// ([`VmmMessage::Failed`] as [`PodVmError::Refused`]).
    pub async fn request(&self, request: ControlRequest) -> Result<VmmMessage, PodVmError> {
        let control = self.control.clone();
        let pid = self.pid;
        tokio::task::spawn_blocking(move || {
            let mut control = control.lock().unwrap_or_else(|e| e.into_inner());
            let reader = control.as_mut().ok_or(ControlError::Closed)?;
            reader
                .get_ref()
                .set_read_timeout(Some(CONTROL_TIMEOUT))
                .map_err(ControlError::Io)?;
            vmm_control::write_message(reader.get_mut(), &request)?;
            match vmm_control::read_message::<VmmMessage>(reader) {
                Ok(VmmMessage::Failed(reason)) => Err(PodVmError::Refused { request, reason }),
                Ok(VmmMessage::Ready(_)) => Err(PodVmError::Control(ControlError::Io(
                    std::io::Error::other(format!("VMM pid {pid} said ready twice")),
                ))),
                Ok(reply) => Ok(reply),
                Err(e) => {
                    // A reply that is late, bad or missing leaves the
                    // channel out of step: it is not used again.
                    control.take();
                    Err(e.into())
                }
            }
        })
        .await
        .map_err(|e| PodVmError::Control(ControlError::Io(std::io::Error::other(e))))?
    }

    /// Kills the VMM at once.
    pub fn kill(&self) {
        // A request in flight holds the channel (up to CONTROL_TIMEOUT):
        // the SIGKILL below closes the VMM's end anyway, so never wait.
        match self.control.try_lock() {
            Ok(mut control) => drop(control.take()),
            Err(std::sync::TryLockError::Poisoned(p)) => drop(p.into_inner().take()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
        if !self.has_exited() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.vmm_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        if tail.is_empty() {
            "arrow-vmm printed nothing".into()
        } else {
            format!("arrow-vmm said: {}", tail.join(" | "))
        }
    }
}

/// Connects to guest vsock `port` through the pod's VMM socket `uds`, after
/// checking that the peer is the VMM the shim started (`vmm_pid`, or in its
/// jail the keeper's child).
///
/// The socket lies in the one directory a VMM can write, and connect(2)
/// follows symlinks: a compromised VMM could point it at another pod's VMM
/// (whose guest would then get this pod's requests) or at a host daemon.
/// The kernel's record of who listens (`SO_PEERCRED`) cannot be forged, and
/// it is checked before a byte is sent.
///
/// The guest's agent ports always listen, so a handshake the VMM ends
/// (the guest refused the connection, or did not answer it within the
/// VMM's deadline: a guest busy with other connections) is tried again,
/// on a new connection, until `timeout` is spent.
fn connect_vmm(
    uds: &Path,
    vmm_pid: u32,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, PodVmError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let stream = connect_checked(uds, vmm_pid)?;
        let left = deadline.saturating_duration_since(Instant::now());
        match proto::hybrid::handshake(stream, port, left) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) && Instant::now() + pause < deadline =>
            {
                log::debug!("vsock port {port}: {e}; trying again in {pause:?}");
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            done => return done.map_err(PodVmError::Connect),
        }
    }
}

/// A connection to the VMM's vsock socket, once `SO_PEERCRED` shows the
/// pod's VMM (or its jailed child) serves it.
fn connect_checked(uds: &Path, vmm_pid: u32) -> Result<UnixStream, PodVmError> {
    let stream = UnixStream::connect(uds).map_err(PodVmError::Connect)?;
    let peer = getsockopt(&stream, sockopt::PeerCredentials)
        .map_err(|e| PodVmError::Connect(e.into()))?
        .pid();
    if !is_process_or_child(peer, vmm_pid) {
        return Err(PodVmError::ForeignPeer {
            path: uds.to_path_buf(),
            peer,
            vmm: vmm_pid,
        });
    }
    Ok(stream)
}

/// Whether `pid` is `parent` or one of its children.
fn is_process_or_child(pid: i32, parent: u32) -> bool {
    if u32::try_from(pid) == Ok(parent) {
        return true;
    }
    // PID (COMM) STATE PPID ...; COMM may hold spaces and parentheses.
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse::<u32>().ok())
        == Some(parent)
}

/// An agent client on a dead socket pair, so a `PodVm` can exist (and be
/// killed on error) before the real connection is made.
fn placeholder_agent() -> Result<AgentClient, PodVmError> {
    let (a, _b) = UnixStream::pair().map_err(PodVmError::Connect)?;
    AgentClient::from_unix(a).map_err(PodVmError::Connect)
}

/// Waits at most `timeout` for the VMM's first message, which must be
/// [`VmmMessage::Ready`].
fn read_ready(control: &mut BufReader<UnixStream>, timeout: Duration) -> Result<VmmReady, String> {
    control
        .get_ref()
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    match vmm_control::read_message::<VmmMessage>(control) {
        Ok(VmmMessage::Ready(ready)) if ready.ready => Ok(ready),
        Ok(other) => Err(format!("arrow-vmm said {other:?} instead of ready")),
        Err(ControlError::Closed) => Err("arrow-vmm exited before it was ready".into()),
        Err(ControlError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Err(format!("not ready after {timeout:?}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The VMM a pod runs: `$ARROW_VMM`, else `arrow-vmm` next to the running
/// binary (the shim's, or arrow-cri's).
pub fn vmm_binary() -> Result<PathBuf, PodVmError> {
    if let Some(path) = std::env::var_os("ARROW_VMM") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(PodVmError::Spawn)?;
    let path = exe.with_file_name("arrow-vmm");
    if path.is_file() {
        Ok(path)
    } else {
        Err(PodVmError::VmmNotFound(path))
    }
}

/// Opens `path` for appending, creating it (for `file://` log URIs).
pub fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// What the shim reads when the VMM sends `bytes` then closes its end
    /// (or keeps it open, saying nothing, with `keep_open`).
    fn ready_from(bytes: &[u8], keep_open: bool) -> Result<VmmReady, String> {
        let (shim, mut vmm) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut vmm, bytes).unwrap();
        let _kept = keep_open.then_some(vmm);
        read_ready(&mut BufReader::new(shim), Duration::from_millis(200))
    }

    #[test]
    fn the_ready_message_is_read_and_others_refused() {
        let line =
            br#"{"ready":{"ready":true,"cloned":true,"pid":7,"vsock_uds":"/x","ready_ms":31}}
"#;
        let ready = ready_from(line, false).unwrap();
        assert!(ready.cloned);
        assert_eq!(ready.ready_ms, 31);
        assert!(ready_from(b"", false).unwrap_err().contains("exited"));
        assert!(ready_from(b"", true)
            .unwrap_err()
            .contains("not ready after"));
        assert!(ready_from(b"garbage\n", false).is_err());
        assert!(ready_from(b"\"done\"\n", false)
            .unwrap_err()
            .contains("instead of ready"));
        let not_ready = br#"{"ready":{"ready":false,"cloned":true,"pid":7,"vsock_uds":"/x"}}
"#;
        assert!(ready_from(not_ready, false).is_err());
    }

    /// A `PodVm` whose VMM is a thread of this test answering `replies`
    /// (raw lines) on the control channel, one per request; pid 0 is never
    /// signalled (it has "exited").
    fn vm_with_control(
        replies: Vec<&'static str>,
    ) -> (PodVm, std::thread::JoinHandle<()>, UnixStream) {
        let (shim, vmm) = UnixStream::pair().unwrap();
        let vmm_side = vmm.try_clone().unwrap();
        let server = std::thread::spawn(move || {
            let mut reader = BufReader::new(vmm.try_clone().unwrap());
            let mut vmm = vmm;
            for reply in replies {
                if vmm_control::read_message::<ControlRequest>(&mut reader).is_err() {
                    return;
                }
                std::io::Write::write_all(&mut vmm, reply.as_bytes()).unwrap();
            }
            // Then take requests without answering until the shim's end
            // closes.
            while vmm_control::read_message::<ControlRequest>(&mut reader).is_ok() {}
        });
        let (_tx, exit) = watch::channel(Some(0));
        let vm = PodVm {
            pid: 0,
            dir: PodDir::new("test", "control").unwrap(),
            agent: Arc::new(placeholder_agent().unwrap()),
            cloned: true,
            netns: None,
            control: Arc::new(Mutex::new(Some(BufReader::new(shim)))),
            exit,
            streams: Arc::default(),
        };
        (vm, server, vmm_side)
    }

    #[tokio::test]
    async fn control_requests_get_their_replies_and_a_bad_one_ends_the_channel() {
        let (vm, server, _) = vm_with_control(vec![
            "{\"counters\":{\"net\":null,\"fs\":null}}\n",
            "{\"failed\":\"vCPUs did not pause\"}\n",
            "\"done\"\n",
            "garbage\n",
        ]);
        assert!(matches!(
            vm.request(ControlRequest::Counters).await.unwrap(),
            VmmMessage::Counters(_)
        ));
        let err = vm.request(ControlRequest::Pause).await.unwrap_err();
        assert!(
            matches!(&err, PodVmError::Refused { request: ControlRequest::Pause, reason } if reason == "vCPUs did not pause"),
            "{err}"
        );
        assert_eq!(
            vm.request(ControlRequest::Resume).await.unwrap(),
            VmmMessage::Done
        );
        let err = vm.request(ControlRequest::Counters).await.unwrap_err();
        assert!(
            matches!(err, PodVmError::Control(ControlError::Malformed { .. })),
            "{err}"
        );
        // Out of step after a bad reply: the channel is closed, not reused.
        let err = vm.request(ControlRequest::Counters).await.unwrap_err();
        assert!(
            matches!(err, PodVmError::Control(ControlError::Closed)),
            "{err}"
        );
        server.join().unwrap();
    }

    #[tokio::test]
    async fn kill_closes_the_channel_and_never_waits_for_a_request() {
        // A VMM that never answers: the request holds the channel.
        let (vm, server, vmm_side) = vm_with_control(vec![]);
        let vm = Arc::new(vm);
        let asking = vm.clone();
        let request = tokio::spawn(async move { asking.request(ControlRequest::Counters).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        vm.kill();
        assert!(started.elapsed() < Duration::from_secs(1), "kill waited");
        // The VMM's end going away ends the request.
        vmm_side.shutdown(std::net::Shutdown::Both).unwrap();
        assert!(matches!(
            request.await.unwrap().unwrap_err(),
            PodVmError::Control(ControlError::Closed)
        ));
        server.join().unwrap();
        // A kill with nothing in flight closes the channel: the VMM sees it.
        let (vm2, server2, _) = vm_with_control(vec![]);
        vm2.kill();
        server2.join().unwrap();
        assert!(matches!(
            vm2.request(ControlRequest::Stop).await.unwrap_err(),
            PodVmError::Control(ControlError::Closed)
        ));
    }

    /// A listener in this process stands for the VMM.
    fn listening(name: &str) -> (PathBuf, std::os::unix::net::UnixListener) {
        let path =
            std::env::temp_dir().join(format!("arrow-shim-vm-{}-{name}.sock", std::process::id()));
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        (path, listener)
    }

    #[test]
    fn connect_vmm_refuses_a_socket_served_by_another_process() {
        let (path, _listener) = listening("foreign");
        // Neither this process nor its child: as if the socket had been
        // replaced by a symlink to some other process's.
        let not_ours = std::process::id() + 1_000_000;
        let err = connect_vmm(&path, not_ours, 1024, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, PodVmError::ForeignPeer { .. }), "{err}");
        assert!(err.to_string().contains("not by the pod's VMM"), "{err}");
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn connect_vmm_accepts_the_vmm_and_its_jailed_child() {
        let (path, listener) = listening("ours");
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut conn, _) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&mut conn)
                    .read_line(&mut line)
                    .unwrap();
                std::io::Write::write_all(&mut conn, b"OK 1\n").unwrap();
            }
        });
        let me = std::process::id();
        connect_vmm(&path, me, 1024, Duration::from_secs(5)).unwrap();
        // This process as the keeper's child: the keeper is our parent.
        let parent = std::os::unix::process::parent_id();
        assert!(is_process_or_child(me as i32, parent));
        connect_vmm(&path, parent, 1024, Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn connect_vmm_tries_again_when_the_vmm_ends_the_handshake() {
        let (path, listener) = listening("refused");
        let server = std::thread::spawn(move || {
            // Two refusals (closed after the CONNECT line), then an answer.
            for answer in [None, None, Some(b"OK 7\n")] {
                let (mut conn, _) = listener.accept().unwrap();
                let mut line = String::new();
                std::io::BufReader::new(&mut conn)
                    .read_line(&mut line)
                    .unwrap();
                assert_eq!(line, "CONNECT 1026\n");
                if let Some(answer) = answer {
                    std::io::Write::write_all(&mut conn, answer).unwrap();
                }
            }
            listener
        });
        connect_vmm(&path, std::process::id(), 1026, Duration::from_secs(5)).unwrap();
        let listener = server.join().unwrap();

        // Refused until the deadline: the refusal is the error.
        let refuser = std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let mut line = String::new();
                        let _ = std::io::BufReader::new(&mut conn).read_line(&mut line);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let err =
            connect_vmm(&path, std::process::id(), 1026, Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("closed during handshake"), "{err}");
        refuser.join().unwrap();
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn pod_dir_layout() {
        let d = PodDir {
            root: PathBuf::from("/run/arrow/k8s.io/pod1"),
        };
        assert_eq!(d.share().view(), Path::new("/run/arrow/k8s.io/pod1/shared"));
        // The VMM writes only in vmm/ (bound into its jail).
        assert_eq!(
            d.vsock(),
            PathBuf::from("/run/arrow/k8s.io/pod1/vmm/vsock.sock")
        );
        assert_eq!(
            d.console_log(),
            PathBuf::from("/run/arrow/k8s.io/pod1/vmm/console.log")
        );
        assert_eq!(
            d.counters(),
            PathBuf::from("/run/arrow/k8s.io/pod1/vmm/counters.json")
        );
        assert_eq!(d.jail(), PathBuf::from("/run/arrow/k8s.io/pod1/jail"));
    }
}
