//! Starting and talking to `containerd-shim-arrow-v1` as containerd does
//! (shim v2): `start` in the sandbox's bundle with the namespace, id and our
//! address prints the shim's ttrpc socket; the Task API is called on it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use containerd_shim_protos::api;
use containerd_shim_protos::cgroups_v2::metrics::Metrics;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::context;

use crate::error::{Error, Result};
use crate::store::Mount;

/// The containerd namespace arrow-cri's pods are in (the shim's state is
/// under `/run/arrow/<namespace>/`).
pub const NAMESPACE: &str = "arrow-cri";
/// Most calls are quick; Create of a sandbox boots (or clones) a VM.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const CREATE_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
pub struct Launcher {
    /// The shim binary (a path, or a name looked up on `PATH`).
    pub binary: PathBuf,
    /// Our CRI socket, the shim's `-address` (its socket path is derived
    /// from it, so two arrow-cri never share a shim socket).
    pub address: PathBuf,
    /// The Events socket the shims publish to.
    pub events: PathBuf,
}

impl Launcher {
    /// Starts the shim of pod `id` whose sandbox bundle is `bundle`;
    /// returns its ttrpc address.
    pub async fn start(&self, id: &str, bundle: &Path) -> Result<String> {
        let out = tokio::process::Command::new(&self.binary)
            .args(["-namespace", NAMESPACE, "-id", id, "-address"])
            .arg(&self.address)
            .args(["-publish-binary", "", "start"])
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", &self.events)
            // Its own process group: a terminal's Ctrl-C to arrow-cri must
            // not reach the shims, which outlive arrow-cri by design.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "starting the shim {}: {e} (is containerd-shim-arrow-v1 installed? set [runtime] shim)",
                    self.binary.display()
                ))
            })?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "the shim's start failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !address.starts_with("unix://") {
            return Err(Error::Internal(format!(
                "the shim's start printed {address:?}, not a unix:// address"
            )));
        }
        Ok(address)
    }

    /// `shim delete` for a shim that is gone: it undoes the host state
    /// of container `id` (the whole pod's for its sandbox).
    pub async fn delete(&self, id: &str, bundle: &Path) -> Result<()> {
        let out = tokio::process::Command::new(&self.binary)
            .args(["-namespace", NAMESPACE, "-id", id, "-address"])
            .arg(&self.address)
            .arg("-bundle")
            .arg(bundle)
            .args(["-publish-binary", "", "delete"])
            .current_dir(bundle)
            .env("TTRPC_ADDRESS", &self.events)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| Error::Internal(format!("shim delete of {id}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Internal(format!(
                "shim delete of {id} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// A pod's shim, over ttrpc.
#[derive(Clone)]
pub struct Shim {
    client: TaskClient,
}

fn ctx(timeout: Duration) -> context::Context {
    let mut c = context::with_timeout(timeout.as_nanos() as i64);
    c.add("containerd-namespace".into(), NAMESPACE.into());
    c
}

/// A ttrpc error as the CRI error a user can act on.
pub fn shim_error(what: &str, e: ttrpc::Error) -> Error {
    use ttrpc::Code;
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let msg = format!("{what}: {}", s.message());
            match s.code() {
                Code::NOT_FOUND => Error::NotFound(msg),
                Code::INVALID_ARGUMENT => Error::InvalidArgument(msg),
                Code::FAILED_PRECONDITION => Error::FailedPrecondition(msg),
                Code::ALREADY_EXISTS => Error::FailedPrecondition(msg),
                Code::UNIMPLEMENTED => Error::InvalidArgument(msg),
                Code::DEADLINE_EXCEEDED => Error::Unavailable(msg),
                _ => Error::Internal(msg),
            }
        }
        other => Error::Unavailable(format!("{what}: the shim did not answer: {other}")),
    }
}

/// The result of `State`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    pub pid: u32,
    pub status: api::Status,
    pub exit_status: u32,
    pub exited_at: i64,
}

fn nanos(
    t: &MessageField<containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp>,
) -> i64 {
    t.as_ref()
        .map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos))
        .unwrap_or(0)
}

impl Shim {
    pub async fn connect(address: &str) -> Result<Shim> {
        let client = Client::connect(address)
            .await
            .map_err(|e| Error::Unavailable(format!("connecting to the shim at {address}: {e}")))?;
        Ok(Shim {
            client: TaskClient::new(client),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        rootfs: &[Mount],
        stdin: &Path,
        stdout: &Path,
        stderr: &Path,
        terminal: bool,
    ) -> Result<u32> {
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            rootfs: rootfs
                .iter()
                .map(|m| containerd_shim_protos::types::mount::Mount {
                    type_: m.kind.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                    ..Default::default()
                })
                .collect(),
            terminal,
            stdin: path_or_empty(stdin),
            stdout: path_or_empty(stdout),
            stderr: path_or_empty(stderr),
            ..Default::default()
        };
        let r = self
            .client
            .create(ctx(CREATE_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("creating {id}"), e))?;
        Ok(r.pid)
    }

    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .start(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("starting {id}"), e))?;
        Ok(r.pid)
    }

    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = api::KillRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.client
            .kill(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("signalling {id}"), e))?;
        Ok(())
    }

    /// Waits for a process to exit: (status, nanoseconds since the epoch).
    pub async fn wait(&self, id: &str, exec_id: &str, timeout: Duration) -> Result<(u32, i64)> {
        let req = api::WaitRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .wait(ctx(timeout), &req)
            .await
            .map_err(|e| shim_error(&format!("waiting for {id}"), e))?;
        Ok((r.exit_status, nanos(&r.exited_at)))
    }

    pub async fn state(&self, id: &str, exec_id: &str) -> Result<TaskState> {
        let req = api::StateRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .state(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("state of {id}"), e))?;
        Ok(TaskState {
            pid: r.pid,
            status: r.status.enum_value_or_default(),
            exit_status: r.exit_status,
            exited_at: nanos(&r.exited_at),
        })
    }

    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = api::DeleteRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client
            .delete(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("deleting {id}"), e))?;
        Ok(())
    }

    /// Adds exec `exec_id` (an OCI `Process` as JSON) to container `id`,
    /// its stdio on the FIFOs of `stdio` (an empty path: none).
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: &ExecStdio<'_>,
    ) -> Result<()> {
        let req = api::ExecProcessRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            stdin: path_or_empty(stdio.stdin),
            stdout: path_or_empty(stdio.stdout),
            stderr: path_or_empty(stdio.stderr),
            terminal: stdio.terminal,
            spec: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: process_json,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client
            .exec(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("exec in {id}"), e))?;
        Ok(())
    }

    /// Sets the size of a process's terminal.
    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let req = api::ResizePtyRequest {
            id: id.into(),
            exec_id: exec_id.into(),
            width,
            height,
            ..Default::default()
        };
        self.client
            .resize_pty(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("resizing the terminal of {id}"), e))?;
        Ok(())
    }

    /// Closes a process's stdin once the bytes already in its FIFO are in.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = api::CloseIORequest {
            id: id.into(),
            exec_id: exec_id.into(),
            stdin: true,
            ..Default::default()
        };
        self.client
            .close_io(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("closing the stdin of {id}"), e))?;
        Ok(())
    }

    /// Applies new limits (an OCI `LinuxResources` as JSON).
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let req = api::UpdateTaskRequest {
            id: id.into(),
            resources: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: resources_json,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.client
            .update(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("updating {id}"), e))?;
        Ok(())
    }

    /// cgroup v2 figures of a container (of every app container for the
    /// sandbox).
    pub async fn stats(&self, id: &str) -> Result<Metrics> {
        let req = api::StatsRequest {
            id: id.into(),
            ..Default::default()
        };
        let r = self
            .client
            .stats(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(|e| shim_error(&format!("stats of {id}"), e))?;
        let any = r
            .stats
            .as_ref()
            .ok_or_else(|| Error::Internal(format!("stats of {id}: the shim sent none")))?;
        Metrics::parse_from_bytes(&any.value)
            .map_err(|e| Error::Internal(format!("stats of {id}: {e}")))
    }

    /// Tells the shim to exit (it does once no container is left).
    pub async fn shutdown(&self) -> Result<()> {
        let req = api::ShutdownRequest {
            now: true,
            ..Default::default()
        };
        match self.client.shutdown(ctx(CALL_TIMEOUT), &req).await {
            Ok(_) => Ok(()),
            // The shim exits while answering.
            Err(ttrpc::Error::Socket(_)) | Err(ttrpc::Error::LocalClosed) => Ok(()),
            Err(ttrpc::Error::RemoteClosed) => Ok(()),
            Err(e) => Err(shim_error("shutting the shim down", e)),
        }
    }
}

/// The FIFOs of an exec (an empty path: that stream is not wanted).
pub struct ExecStdio<'a> {
    pub stdin: &'a Path,
    pub stdout: &'a Path,
    pub stderr: &'a Path,
    pub terminal: bool,
}

fn path_or_empty(p: &Path) -> String {
    p.display().to_string()
}
