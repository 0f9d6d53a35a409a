//! A small Kubernetes CRI (`runtime.v1`) client for the tests and benchmarks:
//! tonic over a Unix socket, with the calls a kubelet makes to run a pod and
//! its containers, and a reader for the CRI container log format.
//!
//! The generated clients are public (`runtime`, `image`) for anything the
//! helpers do not cover.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1::ContainerState;

/// Where pods made by [`CriClient::run_pod_sandbox`] keep their container logs.
pub const LOG_ROOT: &str = "/var/log/arrow-test/pods";
/// The cgroupfs parent of the per-pod cgroups those pods get.
pub const CGROUP_PARENT: &str = "/arrow-test";

/// A pod sandbox that runs, with the config it was made from (containers are
/// created against it).
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: cri::PodSandboxConfig,
    pub handler: String,
}

impl Pod {
    /// The pod's log directory (`log_directory` of its config).
    pub fn log_directory(&self) -> PathBuf {
        PathBuf::from(&self.config.log_directory)
    }

    /// Where the log of a container created with `log_path` goes.
    pub fn log_file(&self, log_path: &str) -> PathBuf {
        self.log_directory().join(log_path)
    }
}

/// What `ExecSync` returned.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A name no other pod or container of this machine has had: `prefix`, the
/// process id, a counter and the time.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000)
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:09}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The namespaces a kubelet asks for by default: the pod's network and IPC,
/// a PID namespace per container (no `shareProcessNamespace`).
pub fn kubelet_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A kubelet-like pod config: namespace `default`, a unique uid, a log
/// directory under [`LOG_ROOT`], a per-pod cgroup under [`CGROUP_PARENT`].
pub fn pod_config(name: &str) -> cri::PodSandboxConfig {
    let uid = unique_name("uid");
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.clone(),
            namespace: "default".to_string(),
            attempt: 0,
        }),
        hostname: name.chars().take(63).collect(),
        log_directory: format!("{LOG_ROOT}/default_{name}_{uid}"),
        labels: HashMap::from([("arrow-test".to_string(), "true".to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("{CGROUP_PARENT}/pod{uid}"),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container config: `command` replaces the image's entrypoint (empty:
/// the image's own), the log goes to `log_path` in the pod's log directory.
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    log_path: &str,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: log_path.to_string(),
        labels: HashMap::from([("arrow-test".to_string(), "true".to_string())]),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(kubelet_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A CRI client over a Unix socket.
#[derive(Clone)]
pub struct CriClient {
    pub runtime: RuntimeServiceClient<Channel>,
    pub image: ImageServiceClient<Channel>,
    socket: PathBuf,
}

impl CriClient {
    /// Connects to the CRI server at `socket` (a path, or `unix://PATH`).
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self> {
        let raw = socket.as_ref().to_string_lossy();
        let path = PathBuf::from(raw.strip_prefix("unix://").unwrap_or(&raw));
        let connect_to = path.clone();
        // The URI is a placeholder: the connector always dials the socket.
        let channel = Endpoint::try_from("http://[::1]:0")?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = connect_to.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .with_context(|| format!("connecting to CRI at {}", path.display()))?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            image: ImageServiceClient::new(channel),
            socket: path,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn version(&self) -> Result<cri::VersionResponse> {
        let request = cri::VersionRequest {
            version: "v1".to_string(),
        };
        Ok(self.runtime.clone().version(request).await?.into_inner())
    }

    /// The runtime's conditions (`RuntimeReady`, `NetworkReady`) by type.
    pub async fn status(&self) -> Result<HashMap<String, cri::RuntimeCondition>> {
        let response = self
            .runtime
            .clone()
            .status(cri::StatusRequest { verbose: false })
            .await?
            .into_inner();
        Ok(response
            .status
            .map(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c.r#type.clone(), c))
            .collect())
    }

    /// Waits until the runtime and its network report ready (the CRI plugin
    /// refuses calls for a moment after containerd starts).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.status().await {
                Ok(conditions) => {
                    let ready = |t: &str| conditions.get(t).is_some_and(|c| c.status);
                    if ready("RuntimeReady") && ready("NetworkReady") {
                        return Ok(());
                    }
                    format!("{conditions:?}")
                }
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("CRI at {} not ready: {last}", self.socket.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs a pod sandbox made by [`pod_config`] with runtime handler
    /// `handler` (`runc`, `arrow`; empty for the default).
    pub async fn run_pod_sandbox(&self, name: &str, handler: &str) -> Result<Pod> {
        self.run_pod_sandbox_with(pod_config(name), handler).await
    }

    pub async fn run_pod_sandbox_with(
        &self,
        config: cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<Pod> {
        std::fs::create_dir_all(&config.log_directory)
            .with_context(|| format!("creating {}", config.log_directory))?;
        let request = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        let id = match self.runtime.clone().run_pod_sandbox(request).await {
            Ok(response) => response.into_inner().pod_sandbox_id,
            Err(status) => {
                let _ = std::fs::remove_dir_all(&config.log_directory);
                return Err(status).with_context(|| format!("RunPodSandbox (handler {handler:?})"));
            }
        };
        Ok(Pod {
            id,
            config,
            handler: handler.to_string(),
        })
    }

    pub async fn pod_sandbox_status(&self, pod_id: &str) -> Result<cri::PodSandboxStatus> {
        let request = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_string(),
            verbose: false,
        };
        self.runtime
            .clone()
            .pod_sandbox_status(request)
            .await?
            .into_inner()
            .status
            .context("PodSandboxStatus without a status")
    }

    pub async fn stop_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let request = cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.runtime
            .clone()
            .stop_pod_sandbox(request)
            .await
            .context("StopPodSandbox")?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let request = cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_string(),
        };
        self.runtime
            .clone()
            .remove_pod_sandbox(request)
            .await
            .context("RemovePodSandbox")?;
        Ok(())
    }

    /// Stops and removes `pod`, then deletes its log directory and its empty
    /// per-pod cgroups (what a kubelet would clean up).
    pub async fn remove_pod(&self, pod: &Pod) -> Result<()> {
        self.stop_pod_sandbox(&pod.id).await?;
        self.remove_pod_sandbox(&pod.id).await?;
        let _ = std::fs::remove_dir_all(pod.log_directory());
        if let Some(parent) = pod.config.linux.as_ref().map(|l| &l.cgroup_parent) {
            remove_cgroup_dirs(parent);
        }
        Ok(())
    }

    pub async fn list_pod_sandboxes(&self) -> Result<Vec<cri::PodSandbox>> {
        let request = cri::ListPodSandboxRequest { filter: None };
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(request)
            .await?
            .into_inner()
            .items)
    }

    /// Creates a container in `pod` from [`container_config`].
    pub async fn create_container(
        &self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
        log_path: &str,
    ) -> Result<String> {
        self.create_container_with(pod, container_config(name, image, command, log_path))
            .await
    }

    pub async fn create_container_with(
        &self,
        pod: &Pod,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        Ok(self
            .runtime
            .clone()
            .create_container(request)
            .await
            .context("CreateContainer")?
            .into_inner()
            .container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let request = cri::StartContainerRequest {
            container_id: id.to_string(),
        };
        self.runtime
            .clone()
            .start_container(request)
            .await
            .context("StartContainer")?;
        Ok(())
    }

    /// Stops a container: its stop signal, then SIGKILL after `timeout_s`.
    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> Result<()> {
        let request = cri::StopContainerRequest {
            container_id: id.to_string(),
            timeout: timeout_s,
        };
        self.runtime
            .clone()
            .stop_container(request)
            .await
            .context("StopContainer")?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let request = cri::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        self.runtime
            .clone()
            .remove_container(request)
            .await
            .context("RemoveContainer")?;
        Ok(())
    }

    pub async fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let request = cri::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        self.runtime
            .clone()
            .container_status(request)
            .await
            .context("ContainerStatus")?
            .into_inner()
            .status
            .context("ContainerStatus without a status")
    }

    /// Polls until the container has exited; returns its exit code.
    pub async fn wait_container_exit(&self, id: &str, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(id).await?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            if Instant::now() >= deadline {
                bail!(
                    "container {id} still {:?} after {timeout:?}",
                    ContainerState::try_from(status.state)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `cmd` in the container and waits for it (`timeout_s` 0: no limit).
    pub async fn exec_sync(&self, id: &str, cmd: &[&str], timeout_s: i64) -> Result<ExecOutput> {
        let request = cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        };
        let response = self
            .runtime
            .clone()
            .exec_sync(request)
            .await
            .context("ExecSync")?
            .into_inner();
        Ok(ExecOutput {
            exit_code: response.exit_code,
            stdout: response.stdout,
            stderr: response.stderr,
        })
    }

    /// The streaming URL of an exec of `cmd` (see [`crate::streaming`]).
    pub async fn exec(
        &self,
        id: &str,
        cmd: &[&str],
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    ) -> Result<String> {
        let request = cri::ExecRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout,
            stderr,
        };
        let response = self
            .runtime
            .clone()
            .exec(request)
            .await
            .context("Exec")?
            .into_inner();
        Ok(response.url)
    }

    /// The streaming URL of an attach to container `id`.
    pub async fn attach(&self, id: &str, tty: bool, stdin: bool) -> Result<String> {
        let request = cri::AttachRequest {
            container_id: id.to_string(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        };
        let response = self
            .runtime
            .clone()
            .attach(request)
            .await
            .context("Attach")?
            .into_inner();
        Ok(response.url)
    }

    /// The streaming URL for port-forward to `ports` of the pod (see
    /// [`crate::portforward`]).
    pub async fn port_forward(&self, pod_id: &str, ports: &[u16]) -> Result<String> {
        let request = cri::PortForwardRequest {
            pod_sandbox_id: pod_id.to_string(),
            port: ports.iter().map(|&p| i32::from(p)).collect(),
        };
        let response = self
            .runtime
            .clone()
            .port_forward(request)
            .await
            .context("PortForward")?
            .into_inner();
        Ok(response.url)
    }

    pub async fn container_stats(&self, id: &str) -> Result<cri::ContainerStats> {
        let request = cri::ContainerStatsRequest {
            container_id: id.to_string(),
        };
        self.runtime
            .clone()
            .container_stats(request)
            .await
            .context("ContainerStats")?
            .into_inner()
            .stats
            .context("ContainerStats without stats")
    }

    /// Containers, of one pod if `pod_id` is given.
    pub async fn list_containers(&self, pod_id: Option<&str>) -> Result<Vec<cri::Container>> {
        let request = cri::ListContainersRequest {
            filter: pod_id.map(|p| cri::ContainerFilter {
                pod_sandbox_id: p.to_string(),
                ..Default::default()
            }),
        };
        Ok(self
            .runtime
            .clone()
            .list_containers(request)
            .await?
            .into_inner()
            .containers)
    }

    /// The image as the CRI image service sees it, if it has it.
    pub async fn image_status(&self, image: &str) -> Result<Option<cri::Image>> {
        let request = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        };
        Ok(self
            .image
            .clone()
            .image_status(request)
            .await?
            .into_inner()
            .image)
    }

    /// Stops and removes every pod labelled `arrow-test=true` (what earlier,
    /// interrupted test runs left).
    pub async fn remove_test_pods(&self) -> Result<usize> {
        let mut removed = 0;
        for pod in self.list_pod_sandboxes().await? {
            if pod.labels.get("arrow-test").map(String::as_str) == Some("true") {
                self.stop_pod_sandbox(&pod.id).await?;
                self.remove_pod_sandbox(&pod.id).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Deletes the (empty) cgroup directory `path` in every cgroupfs hierarchy
/// mounted under /sys/fs/cgroup, and the v2 one.
pub fn remove_cgroup_dirs(path: &str) {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut bases: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    bases.push(PathBuf::from("/sys/fs/cgroup"));
    for base in bases {
        let dir = base.join(rel);
        if dir.is_dir() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// One line of a CRI container log: `TIMESTAMP STREAM TAG CONTENT`, where
/// the tag is `F` for a full line and `P` for a partial one (split at the
/// runtime's line size limit; the next line goes on with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// RFC 3339 with nanoseconds, as the runtime wrote it.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub partial: bool,
    pub content: String,
}

/// Parses CRI log text; malformed lines are reported as errors.
pub fn parse_cri_log(text: &str) -> Result<Vec<LogLine>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("not a CRI log line: {line:?}");
        };
        // Tags are `:`-separated; the first says full or partial.
        let partial = match tag.split(':').next() {
            Some("P") => true,
            Some("F") => false,
            _ => bail!("not a CRI log tag {tag:?} in {line:?}"),
        };
        out.push(LogLine {
            time: time.to_string(),
            stream: stream.to_string(),
            partial,
            content: parts.next().unwrap_or("").to_string(),
        });
    }
    Ok(out)
}

/// Reads and parses a CRI log file.
pub fn read_cri_log(path: impl AsRef<Path>) -> Result<Vec<LogLine>> {
    let path = path.as_ref();
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_cri_log(&text)
}

/// What a container wrote, rebuilt from its log lines: partial lines joined,
/// a newline after each full one; only `stream` (`stdout`/`stderr`) if given.
pub fn log_text(lines: &[LogLine], stream: Option<&str>) -> String {
    let mut text = String::new();
    for line in lines {
        if stream.is_some_and(|s| s != line.stream) {
            continue;
        }
        text.push_str(&line.content);
        if !line.partial {
            text.push('\n');
        }
    }
    text
}

/// Polls the log at `path` until its text (as [`log_text`] rebuilds it)
/// contains `needle`; returns the text.
pub async fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read_cri_log(path)
            .map(|l| log_text(&l, None))
            .unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if Instant::now() >= deadline {
            bail!(
                "{needle:?} not in {} after {timeout:?}: {text:?}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_partial_lines() {
        let text = "2016-10-06T00:17:09.669794202Z stdout F hello\n\
                    2016-10-06T00:17:09.669794203Z stderr P par\n\
                    2016-10-06T00:17:09.669794204Z stderr F tial\n\
                    2016-10-06T00:17:10.113242941Z stdout F \n";
        let lines = parse_cri_log(text).unwrap();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].stream, "stdout");
        assert_eq!(lines[0].content, "hello");
        assert!(lines[1].partial);
        assert_eq!(log_text(&lines, None), "hello\npartial\n\n");
        assert_eq!(log_text(&lines, Some("stderr")), "partial\n");
        assert_eq!(log_text(&lines, Some("stdout")), "hello\n\n");
    }

    #[test]
    fn refuses_other_formats() {
        assert!(parse_cri_log("just text\n").is_err());
        assert!(parse_cri_log("2016-10-06T00:17:09Z stdout X a\n").is_err());
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique_name("a"), unique_name("a"));
    }
}
