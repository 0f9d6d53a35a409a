//! Interactive execs for the streaming server (`kubectl exec`, `crictl exec
//! -it`): a process added to a running container through its shim, its
//! stdio on FIFOs arrow-cri holds, copied to and from whatever the client's
//! protocol gives ([`ExecIo`]), as containerd's CRI plugin does with runc.
//!
//! The output FIFOs are opened read-write, so they never report end of
//! file: a copy ends when the process's exit is known, after draining what
//! the FIFO still holds (the shim reports an exit only once the output is
//! in the FIFO), as the log copies of [`super::logs`] do.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use super::shim::{ExecStdio, Shim};
use super::{logs, Runtime, KILL_TIMEOUT};
use crate::error::{Error, Result};

/// What a client asked of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOptions {
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// A terminal's size, as the client's resize messages give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    pub width: u16,
    pub height: u16,
}

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// The client's side of an exec or attach, whatever its protocol.
pub struct ExecIo {
    pub stdin: Option<BoxRead>,
    pub stdout: Option<BoxWrite>,
    pub stderr: Option<BoxWrite>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
    /// Resolves when the client has gone (its connection closed).
    pub gone: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// How a stream session ended, for the client's error channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    Exited(i32),
    /// The client went away; the process was killed (exec) or left running
    /// (attach).
    ClientGone,
    Failed(String),
}

impl Runtime {
    /// Runs `opts.cmd` in container `id` with the client's stdio until it
    /// exits; a client that goes away takes the process with it (SIGKILL),
    /// as with containerd.
    pub async fn exec_streaming(&self, id: &str, opts: &ExecOptions, io: ExecIo) -> ExecOutcome {
        match self.exec_streaming_inner(id, opts, io).await {
            Ok(outcome) => outcome,
            Err(e) => ExecOutcome::Failed(e.to_string()),
        }
    }

    async fn exec_streaming_inner(
        &self,
        id: &str,
        opts: &ExecOptions,
        mut io: ExecIo,
    ) -> Result<ExecOutcome> {
        if opts.cmd.is_empty() {
            return Err(Error::InvalidArgument("Exec: the command is empty".into()));
        }
        let (shim, mut process) = self.exec_process_spec(id, &opts.cmd).await?;
        process["terminal"] = serde_json::json!(opts.tty);
        let exec_id = super::random_id()?[..16].to_string();
        let fifos = ExecFifos::make(
            &self.state.container_dir(id),
            &exec_id,
            opts.stdin,
            opts.stdout,
            opts.stderr && !opts.tty,
        )?;
        let json = serde_json::to_vec(&process).map_err(|e| Error::Internal(e.to_string()))?;
        let (done, done_rx) = watch::channel(false);
        let empty = PathBuf::new();
        // Every end of ours is open before the exec exists (read-write
        // opens never wait for the other side), so nothing can fail
        // between its start and its end.
        let ends = (|| -> Result<_> {
            let stdout = fifos.stdout.as_deref().map(open_output).transpose()?;
            let stderr = fifos.stderr.as_deref().map(open_output).transpose()?;
            let stdin = match &fifos.stdin {
                Some(path) => Some(
                    pipe::OpenOptions::new()
                        .read_write(true)
                        .open_sender(path)
                        .map_err(|e| {
                            Error::Internal(format!("opening the exec's stdin FIFO: {e}"))
                        })?,
                ),
                None => None,
            };
            Ok((stdin, stdout, stderr))
        })();
        let (stdin_tx, stdout_rx, stderr_rx) = match ends {
            Ok(ends) => ends,
            Err(e) => {
                fifos.remove();
                return Err(e);
            }
        };
        let mut copies = Vec::new();
        for (rx, out) in [(stdout_rx, io.stdout.take()), (stderr_rx, io.stderr.take())] {
            if let (Some(rx), Some(out)) = (rx, out) {
                copies.push(tokio::spawn(copy_output(rx, out, done_rx.clone())));
            }
        }
        let stdio = ExecStdio {
            stdin: fifos.stdin.as_deref().unwrap_or(&empty),
            stdout: fifos.stdout.as_deref().unwrap_or(&empty),
            stderr: fifos.stderr.as_deref().unwrap_or(&empty),
            terminal: opts.tty,
        };
        let started = async {
            shim.exec(id, &exec_id, json, &stdio).await?;
            shim.start(id, &exec_id).await
        }
        .await;
        if let Err(e) = started {
            let _ = done.send(true);
            let _ = shim.delete(id, &exec_id).await;
            fifos.remove();
            return Err(e);
        }
        let mut side_tasks = Vec::new();
        if let (Some(tx), Some(input)) = (stdin_tx, io.stdin.take()) {
            side_tasks.push(tokio::spawn(copy_stdin(
                input,
                tx,
                shim.clone(),
                id.to_string(),
                exec_id.clone(),
            )));
        }
        if let Some(mut resize) = io.resize.take() {
            let (shim, id, exec_id) = (shim.clone(), id.to_string(), exec_id.clone());
            side_tasks.push(tokio::spawn(async move {
                while let Some(size) = resize.recv().await {
                    let (w, h) = (u32::from(size.width), u32::from(size.height));
                    if let Err(e) = shim.resize_pty(&id, &exec_id, w, h).await {
                        tracing::debug!(container = %id, "resize: {e}");
                    }
                }
            }));
        }
        let outcome = tokio::select! {
            waited = shim.wait(id, &exec_id, std::time::Duration::ZERO) => match waited {
                Ok((status, _)) => ExecOutcome::Exited(status as i32),
                Err(e) => ExecOutcome::Failed(e.to_string()),
            },
            _ = &mut io.gone => {
                let _ = shim.kill(id, &exec_id, libc::SIGKILL as u32, false).await;
                let _ = shim.wait(id, &exec_id, KILL_TIMEOUT).await;
                ExecOutcome::ClientGone
            }
        };
        let _ = done.send(true);
        for c in copies {
            let _ = c.await;
        }
        for t in side_tasks {
            t.abort();
        }
        match shim.delete(id, &exec_id).await {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => tracing::debug!(container = %id, "deleting exec {exec_id}: {e}"),
        }
        fifos.remove();
        Ok(outcome)
    }
}

impl Runtime {
    /// Attaches the client to running container `id`: its output from now
    /// on, its stdin if it has one (the first client to end it closes it
    /// for good under `stdin_once`), its terminal's size. Ends when the
    /// container exits or the client goes; the container runs on.
    pub async fn attach_streaming(&self, id: &str, opts: &ExecOptions, io: ExecIo) -> ExecOutcome {
        match self.attach_inner(id, opts, io).await {
            Ok(outcome) => outcome,
            Err(e) => ExecOutcome::Failed(e.to_string()),
        }
    }

    async fn attach_inner(
        &self,
        id: &str,
        opts: &ExecOptions,
        mut io: ExecIo,
    ) -> Result<ExecOutcome> {
        let c = self.container(id).await?;
        if c.state != super::model::ContainerState::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running"
            )));
        }
        if opts.stdin && !c.spec.stdin {
            return Err(Error::InvalidArgument(format!(
                "container {id} was not created with stdin: it has none to attach to"
            )));
        }
        let shim = self.shim_of(&c.pod_id).await?;
        let (mut output, mut exited) = {
            let outputs = self.output_table();
            let o = outputs.get(id).ok_or_else(|| {
                Error::FailedPrecondition(format!("container {id} has no output to attach to"))
            })?;
            (o.tap.subscribe(), o.done.subscribe())
        };
        let mut side_tasks = Vec::new();
        if let Some(input) = io.stdin.take().filter(|_| opts.stdin) {
            let path = self.state.container_dir(id).join("stdin");
            let tx = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(&path)
                .map_err(|e| Error::Internal(format!("opening the stdin of {id}: {e}")))?;
            let once = c.spec.stdin_once;
            let (shim, id) = (shim.clone(), id.to_string());
            side_tasks.push(tokio::spawn(async move {
                copy_into(input, tx).await;
                if once {
                    if let Err(e) = shim.close_stdin(&id, "").await {
                        tracing::debug!(container = %id, "closing stdin: {e}");
                    }
                }
            }));
        }
        if let Some(mut resize) = io.resize.take().filter(|_| c.spec.tty) {
            let (shim, id) = (shim.clone(), id.to_string());
            side_tasks.push(tokio::spawn(async move {
                while let Some(size) = resize.recv().await {
                    let (w, h) = (u32::from(size.width), u32::from(size.height));
                    if let Err(e) = shim.resize_pty(&id, "", w, h).await {
                        tracing::debug!(container = %id, "resize: {e}");
                    }
                }
            }));
        }
        let mut stdout = io.stdout.take().filter(|_| opts.stdout);
        let mut stderr = io.stderr.take().filter(|_| opts.stderr);
        // The output ends when every copy of the container's FIFOs has
        // drained after its exit and dropped its end of the tap (Closed);
        // the exit itself only starts a bound on that wait.
        let mut drain_until: Option<tokio::time::Instant> = None;
        let outcome = loop {
            if drain_until.is_none() && *exited.borrow() {
                drain_until = Some(tokio::time::Instant::now() + OUTPUT_DRAIN);
            }
            let drained = async {
                match drain_until {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                chunk = output.recv() => match chunk {
                    Ok((stream, data)) => {
                        let out = match stream {
                            logs::Stream::Stdout => &mut stdout,
                            logs::Stream::Stderr => &mut stderr,
                        };
                        if let Some(w) = out {
                            if w.write_all(&data).await.is_err() {
                                *out = None;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(container = %id, "an attached client lost {n} chunks");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break ExecOutcome::Exited(0),
                },
                changed = exited.changed(), if drain_until.is_none() => {
                    if changed.is_err() {
                        drain_until = Some(tokio::time::Instant::now() + OUTPUT_DRAIN);
                    }
                }
                () = drained => break ExecOutcome::Exited(0),
                _ = &mut io.gone => break ExecOutcome::ClientGone,
            }
        };
        // What was read before the end.
        while let Ok((stream, data)) = output.try_recv() {
            let out = match stream {
                logs::Stream::Stdout => &mut stdout,
                logs::Stream::Stderr => &mut stderr,
            };
            if let Some(w) = out {
                let _ = w.write_all(&data).await;
            }
        }
        for w in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        }
        for t in side_tasks {
            t.abort();
        }
        Ok(outcome)
    }
}

/// How long an attach waits, after its container exited, for the rest of
/// the output (the copies drain the FIFOs at once; this only bounds it).
const OUTPUT_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Copies a client's stdin into a FIFO until the client ends it.
async fn copy_into(mut input: BoxRead, mut tx: pipe::Sender) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match input.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// The FIFOs of one exec, in its container's state directory.
struct ExecFifos {
    stdin: Option<PathBuf>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
}

impl ExecFifos {
    fn make(dir: &Path, exec_id: &str, stdin: bool, stdout: bool, stderr: bool) -> Result<Self> {
        let path =
            |want: bool, name: &str| want.then(|| dir.join(format!("exec-{exec_id}-{name}")));
        let fifos = ExecFifos {
            stdin: path(stdin, "stdin"),
            stdout: path(stdout, "stdout"),
            stderr: path(stderr, "stderr"),
        };
        for p in fifos.paths() {
            if let Err(e) = logs::make_fifo(p) {
                fifos.remove();
                return Err(Error::Internal(format!("exec FIFO {}: {e}", p.display())));
            }
        }
        Ok(fifos)
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.stdin, &self.stdout, &self.stderr]
            .into_iter()
            .flatten()
    }

    fn remove(&self) {
        for p in self.paths() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(super) fn open_output(path: &Path) -> Result<pipe::Receiver> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|e| Error::Internal(format!("opening {}: {e}", path.display())))
}

/// Copies an output FIFO to the client until `done`, then drains it. A
/// client that stops reading only loses its own copy.
async fn copy_output(rx: pipe::Receiver, mut out: BoxWrite, mut done: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut client_ok = true;
    loop {
        if *done.borrow() {
            break;
        }
        tokio::select! {
            r = rx.readable() => {
                if r.is_err() { break; }
                match rx.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if client_ok && out.write_all(&buf[..n]).await.is_err() {
                            client_ok = false;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => break,
                }
            }
            c = done.changed() => { if c.is_err() { break; } }
        }
    }
    let mut rest = Vec::new();
    logs::drain(rx, |data| rest.extend_from_slice(data));
    if client_ok {
        let _ = out.write_all(&rest).await;
        let _ = out.flush().await;
        let _ = out.shutdown().await;
    }
}

/// Copies the client's stdin into the exec's FIFO; at the client's end of
/// stdin, the process's stdin is closed.
async fn copy_stdin(input: BoxRead, tx: pipe::Sender, shim: Shim, id: String, exec_id: String) {
    copy_into(input, tx).await;
    if let Err(e) = shim.close_stdin(&id, &exec_id).await {
        tracing::debug!(container = %id, "closing the exec's stdin: {e}");
    }
}
