//! Pods and containers, each pod an Arrow microVM run by its own
//! `containerd-shim-arrow-v1`, driven over the shim v2 Task API as
//! containerd drives it. This module is protocol-neutral: CRI is translated
//! into [`model`] types in `runtime_service.rs` and nowhere else.
//!
//! A pod's life: a network namespace and CNI ([`cni`]), a sandbox bundle
//! whose spec ([`spec`]) the shim turns into the VM, then app containers
//! whose roots come from the image store and whose output the shim writes
//! into FIFOs that [`logs`] copies into the CRI log. Everything is recorded
//! under the state directory ([`state`]), and the shims outlive arrow-cri:
//! a restarted arrow-cri reconnects to them and asks each running
//! container's shim to `Wait`, so an exit while it was down is not lost.

pub mod cni;
pub mod events;
pub mod exec;
pub mod host_cgroup;
pub mod lifecycle;
pub mod logs;
pub mod model;
pub mod shim;
pub mod spec;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::Duration;

use containerd_shim_protos::cgroups_v2::metrics::Metrics;
use tokio::sync::{mpsc, watch, Mutex};

use crate::error::{Error, Result};
use crate::store::Store;
use model::{Container, ContainerSpec, ContainerState, ExitRecord, Pod, PodSpec, PodState};
use shim::{Launcher, Shim};

/// How long a sandbox VM may take to stop after SIGKILL.
const SANDBOX_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a container may take to die after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// Most output ExecSync keeps per stream.
const EXEC_OUTPUT_LIMIT: usize = 16 << 20;

/// Where the runtime keeps things and what it runs.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub state_dir: PathBuf,
    pub shim: PathBuf,
    /// The CRI socket (the shims' `-address`).
    pub listen: PathBuf,
    pub cni: cni::Cni,
}

/// A running container's output copy.
struct Output {
    log: Arc<logs::LogFile>,
    done: watch::Sender<bool>,
    /// The output as it comes, for attach.
    tap: logs::Tap,
}

#[derive(Default)]
struct Tables {
    pods: BTreeMap<String, Pod>,
    containers: BTreeMap<String, Container>,
}

/// What ExecSync returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

/// Where the host's cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A pod's figures.
#[derive(Debug, Clone, Default)]
pub struct PodStats {
    /// The app containers' cgroups in the guest, summed by the shim.
    pub guest: Option<Metrics>,
    /// The pod's cgroup on the host: the VM as the node pays for it.
    pub host: Option<host_cgroup::HostUsage>,
}

/// A container's figures.
#[derive(Debug, Clone, Default)]
pub struct ContainerStats {
    /// From the guest's cgroup; `None` when the shim could not give them.
    pub metrics: Option<Metrics>,
    /// Bytes and inodes of its writable layer.
    pub writable_bytes: u64,
    pub writable_inodes: u64,
    pub writable_dir: PathBuf,
    pub timestamp: i64,
}

pub struct Runtime {
    store: Arc<Store>,
    state: state::StateDir,
    launcher: Launcher,
    cni: cni::Cni,
    tables: Mutex<Tables>,
    shims: StdMutex<HashMap<String, Shim>>,
    outputs: StdMutex<HashMap<String, Output>>,
    /// Created/started/stopped/deleted, for GetContainerEvents.
    lifecycle: lifecycle::Publisher,
    /// Serves the shims' events while the runtime lives (in a mutex only
    /// because the server is not `Sync`).
    _events: StdMutex<containerd_shim_protos::ttrpc::asynchronous::Server>,
}

pub(crate) fn random_id() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Internal(format!("reading /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn not_found(what: &str, id: &str) -> Error {
    Error::NotFound(format!("{what} {id:?} does not exist"))
}

impl Runtime {
    /// Opens the state directory, serves the Events socket, and takes over
    /// the pods and containers a previous arrow-cri left.
    pub async fn start(store: Arc<Store>, options: RuntimeOptions) -> Result<Arc<Runtime>> {
        let state = state::StateDir::open(&options.state_dir)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let events = events::serve(&state.events_socket(), tx).await?;
        let launcher = Launcher {
            binary: options.shim.clone(),
            address: options.listen.clone(),
            events: state.events_socket(),
        };
        let (pods, containers) = state.load();
        let tables = Tables {
            pods: pods.into_iter().map(|p| (p.id.clone(), p)).collect(),
            containers: containers.into_iter().map(|c| (c.id.clone(), c)).collect(),
        };
        let runtime = Arc::new(Runtime {
            store,
            state,
            launcher,
            cni: options.cni,
            tables: Mutex::new(tables),
            shims: StdMutex::new(HashMap::new()),
            outputs: StdMutex::new(HashMap::new()),
            lifecycle: lifecycle::Publisher::default(),
            _events: StdMutex::new(events),
        });
        tokio::spawn(follow_events(Arc::downgrade(&runtime), rx));
        runtime.reconnect().await;
        Ok(runtime)
    }

    pub fn cni(&self) -> &cni::Cni {
        &self.cni
    }

    /// Every lifecycle event from now on (GetContainerEvents).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<lifecycle::LifecycleEvent>> {
        self.lifecycle.subscribe()
    }

    /// Publishes `kind` for `id` (a container, or the pod itself) with the
    /// pod's records as `t` holds them now.
    fn publish(&self, t: &Tables, id: &str, pod_id: &str, kind: lifecycle::Kind) {
        self.lifecycle.publish(
            id,
            kind,
            t.pods.get(pod_id),
            t.containers.values().filter(|c| c.pod_id == pod_id),
        );
    }

    /// After a restart: each pod's shim is asked about its containers; an
    /// exit that happened meanwhile is recorded, running ones get their
    /// output copy and exit watch back.
    async fn reconnect(self: &Arc<Self>) {
        let (pods, containers) = {
            let t = self.tables.lock().await;
            (
                t.pods.values().cloned().collect::<Vec<_>>(),
                t.containers.values().cloned().collect::<Vec<_>>(),
            )
        };
        for pod in pods
            .iter()
            .filter(|p| !p.stopped && !p.shim_address.is_empty())
        {
            match Shim::connect(&pod.shim_address).await {
                Ok(s) => {
                    self.shim_cache().insert(pod.id.clone(), s.clone());
                    if let Ok(st) = s.state(&pod.id, "").await {
                        if st.status == containerd_shim_protos::api::Status::STOPPED {
                            self.sandbox_exited(&pod.id).await;
                        }
                    }
                    tracing::info!(pod = %pod.id, "reconnected to the pod's shim");
                }
                Err(e) => {
                    tracing::warn!(pod = %pod.id, "the pod's shim is gone: {e}");
                    self.sandbox_exited(&pod.id).await;
                }
            }
        }
        for c in containers {
            if !matches!(c.state, ContainerState::Running | ContainerState::Created) {
                continue;
            }
            let Ok(shim) = self.shim_of(&c.pod_id).await else {
                self.set_unknown(&c.id).await;
                continue;
            };
            match shim.state(&c.id, "").await {
                Ok(st) if st.status == containerd_shim_protos::api::Status::STOPPED => {
                    self.record_exit(&c.id, st.exit_status, st.exited_at).await;
                }
                Ok(_) => {
                    if let Err(e) = self.attach_output(&c) {
                        tracing::warn!(container = %c.id, "reattaching its output: {e}");
                    }
                    if c.state == ContainerState::Running {
                        self.watch_exit(&c.id, shim);
                    }
                }
                Err(e) => {
                    tracing::warn!(container = %c.id, "its shim does not know it: {e}");
                    self.set_unknown(&c.id).await;
                }
            }
        }
    }

    fn shim_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Shim>> {
        self.shims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn output_table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Output>> {
        self.outputs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn shim_of(&self, pod_id: &str) -> Result<Shim> {
        if let Some(s) = self.shim_cache().get(pod_id) {
            return Ok(s.clone());
        }
        let address = {
            let t = self.tables.lock().await;
            let pod = t
                .pods
                .get(pod_id)
                .ok_or_else(|| not_found("pod sandbox", pod_id))?;
            pod.shim_address.clone()
        };
        if address.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {pod_id} has no shim"
            )));
        }
        let s = Shim::connect(&address).await?;
        self.shim_cache().insert(pod_id.to_string(), s.clone());
        Ok(s)
    }

    // ------------------------------------------------------------ pods

    /// RunPodSandbox: network, files, bundle, shim, VM.
    pub async fn run_pod(&self, spec: PodSpec) -> Result<String> {
        let id = random_id()?;
        let dir = self.state.pod_dir(&id);
        let bundle = dir.join("bundle");
        let make = || -> std::io::Result<()> {
            std::fs::create_dir_all(bundle.join("rootfs"))?;
            std::fs::create_dir_all(dir.join("shm"))?;
            // The shim logs into `log` in its bundle; a regular file, not
            // containerd's FIFO, so nothing blocks while arrow-cri is down.
            std::fs::File::create(bundle.join("log"))?;
            Ok(())
        };
        make().map_err(|e| Error::io(format!("creating {}", dir.display()), &dir, &e))?;
        let mut pod = Pod {
            id: id.clone(),
            spec,
            state: PodState::NotReady,
            created_at: model::now_nanos(),
            netns: None,
            ip: None,
            additional_ips: Vec::new(),
            shim_address: String::new(),
            sandbox_pid: 0,
            stopped: false,
        };
        self.state.save_pod(&pod)?;
        self.tables
            .lock()
            .await
            .pods
            .insert(id.clone(), pod.clone());
        match self.bring_up(&mut pod).await {
            Ok(()) => {
                pod.state = PodState::Ready;
                self.state.save_pod(&pod)?;
                let mut t = self.tables.lock().await;
                t.pods.insert(id.clone(), pod);
                self.publish(&t, &id, &id, lifecycle::Kind::Created);
                self.publish(&t, &id, &id, lifecycle::Kind::Started);
                Ok(id)
            }
            Err(e) => {
                tracing::warn!(pod = %id, "RunPodSandbox failed: {e}");
                pod.stopped = true;
                self.tear_down(&pod).await;
                self.tables.lock().await.pods.remove(&id);
                if let Err(e) = self.state.remove_pod(&id) {
                    tracing::warn!(pod = %id, "{e}");
                }
                Err(e)
            }
        }
    }

    async fn bring_up(&self, pod: &mut Pod) -> Result<()> {
        let dir = self.state.pod_dir(&pod.id);
        let netns = tokio::task::spawn_blocking({
            let name = format!("arrow-cri-{}", &pod.id[..32]);
            move || cni::create_netns(&name)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        pod.netns = Some(netns.clone());
        self.state.save_pod(pod)?;
        let network = self.cni.network()?;
        let args = cni::cni_args(&pod.spec.namespace, &pod.spec.name, &pod.id, &pod.spec.uid);
        let attachment = self
            .cni
            .add(&network, &pod.id, &netns, &args, &pod.spec.port_mappings)
            .await?;
        state::write_json(&dir.join("cni.json"), &attachment)?;
        let mut ips = attachment.ips().into_iter();
        pod.ip = ips.next();
        pod.additional_ips = ips.collect();
        let hostname = if pod.spec.hostname.is_empty() {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            pod.spec.hostname.clone()
        };
        cni::write_file(&dir.join("hostname"), &format!("{hostname}\n"))?;
        cni::write_file(
            &dir.join("hosts"),
            &spec::hosts(&hostname, pod.ip.as_deref()),
        )?;
        cni::write_file(&dir.join("resolv.conf"), &spec::resolv_conf(&pod.spec))?;
        let bundle = dir.join("bundle");
        let sandbox = spec::sandbox_spec(&pod.id, &pod.spec, Some(&netns));
        state::write_json(&bundle.join("config.json"), &sandbox)?;
        self.state.save_pod(pod)?;

        let address = self.launcher.start(&pod.id, &bundle).await?;
        pod.shim_address = address.clone();
        self.state.save_pod(pod)?;
        let shim = Shim::connect(&address).await?;
        self.shim_cache().insert(pod.id.clone(), shim.clone());
        let none = Path::new("");
        pod.sandbox_pid = shim
            .create(&pod.id, &bundle, &[], none, none, none, false)
            .await?;
        shim.start(&pod.id, "").await?;
        Ok(())
    }

    /// Stops what a pod has running and undoes its network; safe to repeat
    /// and on a half-made pod.
    async fn tear_down(&self, pod: &Pod) {
        if !pod.shim_address.is_empty() {
            if let Ok(shim) = self.shim_of(&pod.id).await {
                match shim.kill(&pod.id, "", libc::SIGKILL as u32, false).await {
                    Ok(()) | Err(Error::NotFound(_)) => {
                        if let Err(e) = shim.wait(&pod.id, "", SANDBOX_STOP_TIMEOUT).await {
                            tracing::warn!(pod = %pod.id, "waiting for the VM to stop: {e}");
                        }
                    }
                    Err(e) => tracing::warn!(pod = %pod.id, "stopping the VM: {e}"),
                }
            }
        }
        let dir = self.state.pod_dir(&pod.id);
        if let Some(netns) = &pod.netns {
            let cached = dir.join("cni.json");
            if cached.exists() {
                match state::read_json::<cni::Attachment>(&cached) {
                    Ok(a) => match self.cni.del(&a).await {
                        Ok(()) => {
                            let _ = std::fs::remove_file(&cached);
                        }
                        Err(e) => tracing::warn!(pod = %pod.id, "CNI DEL: {e}"),
                    },
                    Err(e) => tracing::warn!(pod = %pod.id, "{e}"),
                }
            }
            let path = netns.clone();
            match tokio::task::spawn_blocking(move || cni::remove_netns(&path)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(pod = %pod.id, "{e}"),
                Err(e) => tracing::warn!(pod = %pod.id, "{e}"),
            }
        }
    }

    /// StopPodSandbox: its containers are killed, its VM stopped, its
    /// network torn down. Stopping a stopped pod is no error.
    pub async fn stop_pod(&self, id: &str) -> Result<()> {
        let pod = {
            let t = self.tables.lock().await;
            t.pods
                .get(id)
                .cloned()
                .ok_or_else(|| not_found("pod sandbox", id))?
        };
        if pod.stopped {
            return Ok(());
        }
        let members: Vec<String> = {
            let t = self.tables.lock().await;
            t.containers
                .values()
                .filter(|c| c.pod_id == id && c.state == ContainerState::Running)
                .map(|c| c.id.clone())
                .collect()
        };
        for c in members {
            if let Err(e) = self.stop_container(&c, 0).await {
                tracing::warn!(container = %c, "stopping with its pod: {e}");
            }
        }
        self.tear_down(&pod).await;
        let mut t = self.tables.lock().await;
        let mut was_ready = false;
        if let Some(p) = t.pods.get_mut(id) {
            was_ready = p.state == PodState::Ready;
            p.stopped = true;
            p.state = PodState::NotReady;
            p.netns = None;
            self.state.save_pod(p)?;
        }
        // Containers the VM took with it.
        let now = model::now_nanos();
        let mut ended = Vec::new();
        for c in t.containers.values_mut().filter(|c| c.pod_id == id) {
            if matches!(c.state, ContainerState::Running | ContainerState::Created) {
                c.state = ContainerState::Exited;
                c.exit.get_or_insert(ExitRecord {
                    code: 137,
                    at: now,
                    oom_killed: false,
                });
                self.state.save_container(c)?;
                ended.push(c.id.clone());
            }
        }
        for c in &ended {
            self.publish(&t, c, id, lifecycle::Kind::Stopped);
        }
        if was_ready {
            self.publish(&t, id, id, lifecycle::Kind::Stopped);
        }
        drop(t);
        for c in self.output_ids_of(id).await {
            self.finish_output(&c);
        }
        Ok(())
    }

    async fn output_ids_of(&self, pod_id: &str) -> Vec<String> {
        let t = self.tables.lock().await;
        t.containers
            .values()
            .filter(|c| c.pod_id == pod_id)
            .map(|c| c.id.clone())
            .collect()
    }

    /// RemovePodSandbox: stops it if needed, removes its containers, ends
    /// its shim and removes its state. Removing an unknown pod is no error.
    pub async fn remove_pod(&self, id: &str) -> Result<()> {
        if !self.tables.lock().await.pods.contains_key(id) {
            return Ok(());
        }
        self.stop_pod(id).await?;
        for c in self.output_ids_of(id).await {
            self.remove_container(&c).await?;
        }
        let dir = self.state.pod_dir(id);
        let bundle = dir.join("bundle");
        match self.shim_of(id).await {
            Ok(shim) => {
                match shim.delete(id, "").await {
                    Ok(()) | Err(Error::NotFound(_)) => {}
                    Err(e) => tracing::warn!(pod = %id, "deleting the sandbox task: {e}"),
                }
                if let Err(e) = shim.shutdown().await {
                    tracing::warn!(pod = %id, "{e}");
                }
            }
            Err(_) if bundle.join("config.json").exists() => {
                // The shim is gone: its delete command undoes what it left.
                if let Err(e) = self.launcher.delete(id, &bundle).await {
                    tracing::warn!(pod = %id, "{e}");
                }
            }
            Err(_) => {}
        }
        self.shim_cache().remove(id);
        self.state.remove_pod(id)?;
        let mut t = self.tables.lock().await;
        self.publish(&t, id, id, lifecycle::Kind::Deleted);
        t.pods.remove(id);
        Ok(())
    }

    pub async fn pod(&self, id: &str) -> Result<Pod> {
        self.tables
            .lock()
            .await
            .pods
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("pod sandbox", id))
    }

    pub async fn pods(&self) -> Vec<Pod> {
        self.tables.lock().await.pods.values().cloned().collect()
    }

    /// The sandbox task ended (the VM stopped): the pod is not ready.
    async fn sandbox_exited(&self, id: &str) {
        let mut t = self.tables.lock().await;
        let Some(p) = t.pods.get_mut(id) else { return };
        if p.state != PodState::Ready {
            return;
        }
        tracing::info!(pod = %id, "the pod's VM stopped");
        p.state = PodState::NotReady;
        if let Err(e) = self.state.save_pod(p) {
            tracing::warn!("{e}");
        }
        self.publish(&t, id, id, lifecycle::Kind::Stopped);
    }

    // ------------------------------------------------------ containers

    /// CreateContainer: its root from the image store, its bundle and
    /// output FIFOs, then Create in the pod's shim.
    pub async fn create_container(&self, pod_id: &str, spec: ContainerSpec) -> Result<String> {
        let pod = self.pod(pod_id).await?;
        if pod.state != PodState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "pod sandbox {pod_id} is not ready: containers are created in a running pod"
            )));
        }
        {
            let t = self.tables.lock().await;
            if let Some(other) = t.containers.values().find(|c| {
                c.pod_id == pod_id && c.spec.name == spec.name && c.spec.attempt == spec.attempt
            }) {
                return Err(Error::FailedPrecondition(format!(
                    "pod {pod_id} already has a container named {:?} (attempt {}): {}",
                    spec.name, spec.attempt, other.id
                )));
            }
        }
        let image = self.store.find(&spec.image).ok_or_else(|| {
            Error::NotFound(format!(
                "image {:?} is not in the store: pull it first",
                spec.image
            ))
        })?;
        let config = self
            .store
            .read_blob(image.config_digest())
            .and_then(|b| spec::ImageConfig::parse(&b))?;
        let files = self.image_files(&image);
        let id = random_id()?;
        let dir = self.state.container_dir(&id);
        let bundle = dir.join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs"))
            .map_err(|e| Error::io(format!("creating {}", bundle.display()), &dir, &e))?;
        let log_file = if pod.spec.log_directory.is_empty() || spec.log_path.is_empty() {
            PathBuf::new()
        } else {
            Path::new(&pod.spec.log_directory).join(&spec.log_path)
        };
        let image_ref = image
            .repo_digests
            .first()
            .cloned()
            .unwrap_or_else(|| image.id.clone());
        let container = Container {
            id: id.clone(),
            pod_id: pod_id.to_string(),
            spec,
            image_id: image.id.clone(),
            image_ref,
            state: ContainerState::Created,
            created_at: model::now_nanos(),
            started_at: 0,
            exit: None,
            oom_seen: false,
            log_file,
        };
        match self.create_in_shim(&pod, &container, &config, &files).await {
            Ok(()) => {
                self.state.save_container(&container)?;
                let mut t = self.tables.lock().await;
                t.containers.insert(id.clone(), container);
                self.publish(&t, &id, pod_id, lifecycle::Kind::Created);
                Ok(id)
            }
            Err(e) => {
                self.finish_output(&id);
                if let Err(e) = self.store.remove_rootfs(&id) {
                    tracing::warn!(container = %id, "{e}");
                }
                let _ = self.state.remove_container(&id);
                Err(e)
            }
        }
    }

    async fn create_in_shim(
        &self,
        pod: &Pod,
        c: &Container,
        config: &spec::ImageConfig,
        files: &spec::ImageFiles,
    ) -> Result<()> {
        let pod_dir = self.state.pod_dir(&pod.id);
        let dir = self.state.container_dir(&c.id);
        let bundle = dir.join("bundle");
        let pod_files = spec::PodFiles {
            hostname: pod_dir.join("hostname"),
            hosts: pod_dir.join("hosts"),
            resolv_conf: pod_dir.join("resolv.conf"),
            shm: pod_dir.join("shm"),
        };
        let oci = spec::container_spec(&spec::ContainerInputs {
            id: &c.id,
            pod_id: &pod.id,
            pod: &pod.spec,
            container: &c.spec,
            image: config,
            image_files: files,
            pod_files: &pod_files,
            netns: pod.netns.as_deref(),
            sandbox_pid: pod.sandbox_pid,
        })?;
        state::write_json(&bundle.join("config.json"), &oci)?;
        let fifos: &[&str] = if c.spec.stdin {
            &["stdin", "stdout", "stderr"]
        } else {
            &["stdout", "stderr"]
        };
        for fifo in fifos {
            logs::make_fifo(&dir.join(fifo))
                .map_err(|e| Error::Internal(format!("making the {fifo} FIFO: {e}")))?;
        }
        self.attach_output(c)?;
        let mounts = self.store.create_rootfs(&c.id, &c.image_id)?;
        let shim = self.shim_of(&pod.id).await?;
        let stderr = if c.spec.tty {
            PathBuf::new()
        } else {
            dir.join("stderr")
        };
        let stdin = if c.spec.stdin {
            dir.join("stdin")
        } else {
            PathBuf::new()
        };
        shim.create(
            &c.id,
            &bundle,
            &mounts,
            &stdin,
            &dir.join("stdout"),
            &stderr,
            c.spec.tty,
        )
        .await?;
        Ok(())
    }

    /// The image's `/etc/passwd` and `/etc/group`, from its topmost layer
    /// that has them. Links are not followed: an image's files never name
    /// the host's.
    fn image_files(&self, image: &crate::store::ImageRecord) -> spec::ImageFiles {
        let read = |rel: &str| -> Option<String> {
            for l in image.layers.iter().rev() {
                let layer = self.store.layer(&l.diff_id)?;
                let dir = self.store.layer_dir(layer.id);
                let etc = dir.join("etc");
                match std::fs::symlink_metadata(&etc) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return None,
                    Err(_) => continue,
                }
                let file = etc.join(rel);
                match std::fs::symlink_metadata(&file) {
                    Ok(m) if m.is_file() && m.len() < (4 << 20) => {
                        return std::fs::read_to_string(&file).ok()
                    }
                    // A whiteout, a link or anything else hides lower layers.
                    Ok(_) => return None,
                    Err(_) => continue,
                }
            }
            None
        };
        spec::ImageFiles {
            passwd: read("passwd"),
            group: read("group"),
        }
    }

    /// Starts copying a container's FIFOs into its log (idempotent).
    fn attach_output(&self, c: &Container) -> Result<()> {
        let mut outputs = self.output_table();
        if outputs.contains_key(&c.id) {
            return Ok(());
        }
        let log = logs::LogFile::open(&c.log_file).map_err(|e| {
            Error::Internal(format!("opening the log {}: {e}", c.log_file.display()))
        })?;
        let (done, rx) = watch::channel(false);
        let (tap, _) = tokio::sync::broadcast::channel(logs::TAP_DEPTH);
        let dir = self.state.container_dir(&c.id);
        for (name, stream) in [
            ("stdout", logs::Stream::Stdout),
            ("stderr", logs::Stream::Stderr),
        ] {
            let fifo = dir.join(name);
            if fifo.exists() {
                tokio::spawn(logs::copy_fifo(
                    fifo,
                    stream,
                    log.clone(),
                    tap.clone(),
                    rx.clone(),
                ));
            }
        }
        outputs.insert(c.id.clone(), Output { log, done, tap });
        Ok(())
    }

    /// The container's output is complete: its copies drain and end.
    fn finish_output(&self, id: &str) {
        if let Some(o) = self.output_table().remove(id) {
            let _ = o.done.send(true);
        }
    }

    pub async fn container(&self, id: &str) -> Result<Container> {
        self.tables
            .lock()
            .await
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("container", id))
    }

    pub async fn containers(&self) -> Vec<Container> {
        self.tables
            .lock()
            .await
            .containers
            .values()
            .cloned()
            .collect()
    }

    pub async fn start_container(self: &Arc<Self>, id: &str) -> Result<()> {
        let c = self.container(id).await?;
        if c.state != ContainerState::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is {:?}: only a created container can be started",
                c.state
            )));
        }
        let shim = self.shim_of(&c.pod_id).await?;
        shim.start(id, "").await?;
        {
            let mut t = self.tables.lock().await;
            if let Some(c) = t.containers.get_mut(id) {
                let started = c.state == ContainerState::Created;
                if started {
                    c.state = ContainerState::Running;
                    c.started_at = model::now_nanos();
                }
                self.state.save_container(c)?;
                if started {
                    let pod_id = c.pod_id.clone();
                    self.publish(&t, id, &pod_id, lifecycle::Kind::Started);
                }
            }
        }
        self.watch_exit(id, shim);
        Ok(())
    }

    /// Waits (in a task) for the container's exit through its shim: exits
    /// are recorded even if the shim's event does not reach us.
    fn watch_exit(self: &Arc<Self>, id: &str, shim: Shim) {
        let id = id.to_string();
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            let waited = shim.wait(&id, "", Duration::ZERO).await;
            let Some(runtime) = runtime.upgrade() else {
                return;
            };
            match waited {
                Ok((status, at)) => runtime.record_exit(&id, status, at).await,
                Err(e) => tracing::debug!(container = %id, "waiting: {e}"),
            }
        });
    }

    /// Records how container `id` ended (the first report wins) and
    /// finishes its output.
    pub async fn record_exit(&self, id: &str, status: u32, at: i64) {
        {
            let mut t = self.tables.lock().await;
            let Some(c) = t.containers.get_mut(id) else {
                drop(t);
                if self.tables.lock().await.pods.contains_key(id) {
                    self.sandbox_exited(id).await;
                }
                return;
            };
            if c.exit.is_none() {
                c.exit = Some(ExitRecord {
                    code: status as i32,
                    at: if at > 0 { at } else { model::now_nanos() },
                    oom_killed: c.oom_seen,
                });
                c.state = ContainerState::Exited;
                if let Err(e) = self.state.save_container(c) {
                    tracing::warn!("{e}");
                }
                let pod_id = c.pod_id.clone();
                self.publish(&t, id, &pod_id, lifecycle::Kind::Stopped);
            }
        }
        self.finish_output(id);
    }

    async fn record_oom(&self, id: &str) {
        let mut t = self.tables.lock().await;
        if let Some(c) = t.containers.get_mut(id) {
            c.oom_seen = true;
            if let Some(exit) = c.exit.as_mut() {
                exit.oom_killed = true;
            }
            if let Err(e) = self.state.save_container(c) {
                tracing::warn!("{e}");
            }
        }
    }

    async fn set_unknown(&self, id: &str) {
        let mut t = self.tables.lock().await;
        if let Some(c) = t.containers.get_mut(id) {
            c.state = ContainerState::Unknown;
            let _ = self.state.save_container(c);
        }
    }

    /// StopContainer: SIGTERM, then SIGKILL after `timeout_s` seconds.
    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let c = self.container(id).await?;
        if c.state != ContainerState::Running {
            return Ok(());
        }
        let shim = self.shim_of(&c.pod_id).await?;
        if timeout_s > 0 {
            match shim.kill(id, "", libc::SIGTERM as u32, false).await {
                Ok(()) => {
                    let grace = Duration::from_secs(timeout_s as u64);
                    if let Ok((status, at)) = shim.wait(id, "", grace).await {
                        self.record_exit(id, status, at).await;
                        return Ok(());
                    }
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        match shim.kill(id, "", libc::SIGKILL as u32, true).await {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let (status, at) = shim.wait(id, "", KILL_TIMEOUT).await?;
        self.record_exit(id, status, at).await;
        Ok(())
    }

    /// RemoveContainer: killed if running, deleted in the shim, its root
    /// and state removed. Removing an unknown container is no error.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let Ok(c) = self.container(id).await else {
            return Ok(());
        };
        if c.state == ContainerState::Running {
            self.stop_container(id, 0).await?;
        }
        let pod_stopped = self.pod(&c.pod_id).await.map(|p| p.stopped).unwrap_or(true);
        if let Ok(shim) = self.shim_of(&c.pod_id).await {
            match shim.delete(id, "").await {
                Ok(()) | Err(Error::NotFound(_)) => {}
                // The VM, and the container in it, is gone: the shim's
                // own clean-up of the pod undoes the rest.
                Err(e) if pod_stopped => {
                    tracing::debug!(container = %id, "deleting in a stopped pod: {e}")
                }
                Err(e) => return Err(e),
            }
        }
        self.finish_output(id);
        self.store.remove_rootfs(id)?;
        self.state.remove_container(id)?;
        let mut t = self.tables.lock().await;
        if t.containers.remove(id).is_some() {
            self.publish(&t, id, &c.pod_id, lifecycle::Kind::Deleted);
        }
        Ok(())
    }

    /// UpdateContainerResources: new cgroup limits in the guest.
    pub async fn update_container(&self, id: &str, resources: &model::Resources) -> Result<()> {
        let c = self.container(id).await?;
        if matches!(c.state, ContainerState::Exited | ContainerState::Unknown) {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let shim = self.shim_of(&c.pod_id).await?;
        let json = spec::resources_value(resources);
        shim.update(
            id,
            serde_json::to_vec(&json).map_err(|e| Error::Internal(e.to_string()))?,
        )
        .await?;
        let mut t = self.tables.lock().await;
        if let Some(c) = t.containers.get_mut(id) {
            c.spec.resources = Some(resources.clone());
            self.state.save_container(c)?;
        }
        Ok(())
    }

    /// ReopenContainerLog: after kubelet rotated the file.
    pub async fn reopen_log(&self, id: &str) -> Result<()> {
        let c = self.container(id).await?;
        if c.state != ContainerState::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running: its log is closed"
            )));
        }
        let outputs = self.output_table();
        let o = outputs.get(id).ok_or_else(|| {
            Error::FailedPrecondition(format!("container {id} has no output copy"))
        })?;
        o.log
            .reopen()
            .map_err(|e| Error::Internal(format!("reopening {}: {e}", c.log_file.display())))
    }

    /// The shim of running container `id` and the OCI process of an exec
    /// of `cmd` in it: the container's own process (user, environment,
    /// capabilities, working directory) with `cmd` as its arguments.
    async fn exec_process_spec(
        &self,
        id: &str,
        cmd: &[String],
    ) -> Result<(Shim, serde_json::Value)> {
        let c = self.container(id).await?;
        if c.state != ContainerState::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        let shim = self.shim_of(&c.pod_id).await?;
        let dir = self.state.container_dir(id);
        let spec: serde_json::Value = state::read_json(&dir.join("bundle/config.json"))?;
        let mut process = spec.get("process").cloned().unwrap_or_default();
        process["args"] = serde_json::json!(cmd);
        Ok((shim, process))
    }

    /// ExecSync: runs `cmd` in the container, waits at most `timeout`
    /// (zero: no limit) and returns its output and exit code.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecResult> {
        if cmd.is_empty() {
            return Err(Error::InvalidArgument(
                "ExecSync: the command is empty".into(),
            ));
        }
        let (shim, mut process) = self.exec_process_spec(id, cmd).await?;
        let dir = self.state.container_dir(id);
        process["terminal"] = serde_json::json!(false);
        let exec_id = random_id()?[..16].to_string();
        let out_path = dir.join(format!("exec-{exec_id}-stdout"));
        let err_path = dir.join(format!("exec-{exec_id}-stderr"));
        for p in [&out_path, &err_path] {
            logs::make_fifo(p).map_err(|e| Error::Internal(format!("exec FIFO: {e}")))?;
        }
        let (done, rx) = watch::channel(false);
        let out_task = tokio::spawn(collect_fifo(out_path.clone(), rx.clone()));
        let err_task = tokio::spawn(collect_fifo(err_path.clone(), rx));
        let run = async {
            let json = serde_json::to_vec(&process).map_err(|e| Error::Internal(e.to_string()))?;
            let stdio = shim::ExecStdio {
                stdin: Path::new(""),
                stdout: &out_path,
                stderr: &err_path,
                terminal: false,
            };
            shim.exec(id, &exec_id, json, &stdio).await?;
            shim.start(id, &exec_id).await?;
            let waited = if timeout.is_zero() {
                shim.wait(id, &exec_id, Duration::ZERO).await
            } else {
                match tokio::time::timeout(timeout, shim.wait(id, &exec_id, Duration::ZERO)).await {
                    Ok(w) => w,
                    Err(_) => {
                        let _ = shim.kill(id, &exec_id, libc::SIGKILL as u32, false).await;
                        let _ = shim.wait(id, &exec_id, KILL_TIMEOUT).await;
                        Err(Error::DeadlineExceeded(format!(
                            "ExecSync in {id}: the command did not finish within {} s and was killed",
                            timeout.as_secs_f64()
                        )))
                    }
                }
            };
            waited
        };
        let result = run.await;
        let _ = done.send(true);
        let stdout = out_task.await.unwrap_or_default();
        let stderr = err_task.await.unwrap_or_default();
        match shim.delete(id, &exec_id).await {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => tracing::debug!(container = %id, "deleting exec {exec_id}: {e}"),
        }
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        let (status, _) = result?;
        Ok(ExecResult {
            stdout,
            stderr,
            exit_code: status as i32,
        })
    }

    /// A container's figures: the guest cgroup's and its writable layer's.
    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats> {
        let c = self.container(id).await?;
        let mut out = ContainerStats {
            timestamp: model::now_nanos(),
            writable_dir: self.store.rootfs_dir(id).join("upper"),
            ..Default::default()
        };
        if matches!(c.state, ContainerState::Running | ContainerState::Created) {
            let shim = self.shim_of(&c.pod_id).await?;
            out.metrics = match shim.stats(id).await {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::debug!(container = %id, "stats: {e}");
                    None
                }
            };
        }
        let dir = out.writable_dir.clone();
        let (bytes, inodes) = tokio::task::spawn_blocking(move || disk_usage(&dir))
            .await
            .unwrap_or((0, 0));
        out.writable_bytes = bytes;
        out.writable_inodes = inodes;
        Ok(out)
    }

    /// The pod's figures: the VM's own from the pod's cgroup on the host,
    /// and its app containers' together from the guest (through the shim).
    pub async fn pod_stats(&self, id: &str) -> Result<PodStats> {
        let pod = self.pod(id).await?;
        if pod.state != PodState::Ready {
            return Ok(PodStats::default());
        }
        let shim = self.shim_of(id).await?;
        let guest = shim.stats(id).await.ok();
        let parent = pod.spec.cgroup_parent.clone();
        let host = tokio::task::spawn_blocking(move || {
            host_cgroup::read_usage(Path::new(CGROUP_ROOT), &parent)
        })
        .await
        .unwrap_or(None);
        Ok(PodStats { guest, host })
    }
}

/// Reads a FIFO until `done`, keeping at most [`EXEC_OUTPUT_LIMIT`] bytes.
async fn collect_fifo(path: PathBuf, mut done: watch::Receiver<bool>) -> Vec<u8> {
    let Ok(rx) = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&path)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let push = |out: &mut Vec<u8>, data: &[u8]| {
        let room = EXEC_OUTPUT_LIMIT.saturating_sub(out.len());
        out.extend_from_slice(&data[..data.len().min(room)]);
    };
    loop {
        if *done.borrow() {
            break;
        }
        tokio::select! {
            r = rx.readable() => {
                if r.is_err() { break; }
                match rx.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => push(&mut out, &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            c = done.changed() => { if c.is_err() { break; } }
        }
    }
    logs::drain(rx, |data| push(&mut out, data));
    out
}

/// Bytes and inodes under `dir`, not following links or crossing mounts.
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else {
        return (0, 0);
    };
    let dev = top.dev();
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() && m.dev() == dev {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// Applies the shims' events until the runtime goes.
async fn follow_events(
    runtime: std::sync::Weak<Runtime>,
    mut rx: mpsc::UnboundedReceiver<events::ShimEvent>,
) {
    while let Some(event) = rx.recv().await {
        let Some(r) = runtime.upgrade() else { return };
        match event {
            events::ShimEvent::Exit {
                container_id,
                exec_id,
                status,
                at,
            } if exec_id.is_empty() => r.record_exit(&container_id, status, at).await,
            events::ShimEvent::Exit { .. } => {}
            events::ShimEvent::Oom { container_id } => r.record_oom(&container_id).await,
        }
    }
}
