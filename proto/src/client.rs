//! Host-side, synchronous agent client. One reader thread owns the read half
//! of the connection and hands each `Response` to the caller waiting on its
//! id, so a blocking `wait` on one thread never holds up calls from others.
//!
//! The guest is untrusted: every call but the long polls (`wait`,
//! `wait_oom`) has a deadline, a frame the guest sends that is too large or
//! undecodable ends the connection (failing every call in flight), and a
//! call that gives up leaves nothing behind in the table of pending calls.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use crate::agent::{
    error::Code, request, response, CloneInitialized, CloseStdin, ConfigureNetwork, ContainerStats,
    CreateContainer, CreateProcess, DeleteProcess, Exited, FreezeContainer, InitClone, ListPids,
    Ping, Pong, PortForwardOpen, PortForwardOpened, RemoveContainer, Request, ResizeTty, Resources,
    Response, Shutdown, SignalProcess, StartProcess, Stats, StreamAttach, StreamAttached,
    StreamKind, UpdateContainer, WaitOom, WaitProcess,
};
use crate::frame::{read_frame, write_frame, FrameError};

/// A failed agent call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("agent internal error: {0}")]
    Internal(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("agent connection closed: {0}")]
    ConnectionClosed(String),
    #[error("agent did not answer {call} within {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("agent answered {got} to a {call} call")]
    UnexpectedResponse {
        call: &'static str,
        got: &'static str,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("agent connection I/O: {0}")]
    Io(#[from] io::Error),
}

impl ClientError {
    /// Maps a protocol `Error` to the matching variant.
    pub fn from_wire(err: crate::agent::Error) -> Self {
        let message = err.message;
        match Code::try_from(err.code).unwrap_or(Code::Unknown) {
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::NotFound => Self::NotFound(message),
            Code::AlreadyExists => Self::AlreadyExists(message),
            Code::FailedPrecondition => Self::FailedPrecondition(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::Internal | Code::Unknown => Self::Internal(message),
        }
    }
}

/// How long an ordinary call may take before it fails with
/// [`ClientError::Timeout`]: an agent answers these in milliseconds, and a
/// guest that goes silent must not pin the caller's thread forever.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the `StreamAttach` handshake of a stdio connection may take.
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call may wait for its answer.
#[derive(Clone, Copy, Debug)]
enum Deadline {
    /// The client's call timeout.
    Ordinary,
    /// Twice that: creating or removing a container mounts, unmounts and
    /// kills, which a loaded host may make slow.
    Slow,
    /// None: a long poll that legitimately blocks until something happens
    /// in the guest; it ends when the connection does.
    LongPoll,
}

/// The exit of a process, as reported by `wait`.
pub type ExitStatus = Exited;

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Calls in flight, by request id.
#[derive(Default)]
struct Calls {
    pending: HashMap<u64, SyncSender<Response>>,
    /// Set once the reader stopped; no new call may start.
    closed: Option<String>,
}

struct Shared {
    calls: Mutex<Calls>,
    /// A handle on the connection's socket (when it is one), shut down to
    /// end the connection for both halves.
    closer: Option<UnixStream>,
}

impl Shared {
    fn calls(&self) -> MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection: no call may start, every call in flight fails
    /// (dropping its sender wakes it) and the socket is shut down, so the
    /// reader thread sees EOF and the peer sees the close.
    fn close(&self, reason: String) {
        {
            let mut calls = self.calls();
            calls.closed.get_or_insert(reason);
            calls.pending.clear();
        }
        if let Some(closer) = &self.closer {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A call's entry in the pending table; dropping it (answered, failed,
/// timed out or unwound) removes the entry, so a reply that comes late or
/// never leaks nothing. Ids are never reused, so removing an entry the
/// reader already took is harmless.
struct PendingCall<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingCall<'_> {
    fn drop(&mut self) {
        self.shared.calls().pending.remove(&self.id);
    }
}

/// A multiplexed connection to the guest agent; share it between threads by
/// reference (`&AgentClient` is enough for every call).
pub struct AgentClient {
    writer: Mutex<Box<dyn Write + Send>>,
    /// Shut down on drop (through `shared.closer`) so the reader thread sees
    /// EOF and exits.
    shared: Arc<Shared>,
    next_id: AtomicU64,
    /// The deadline of an ordinary call (see [`DEFAULT_CALL_TIMEOUT`]).
    call_timeout: Duration,
}

impl AgentClient {
    /// Builds a client over a connected Unix stream (e.g. from
    /// [`crate::hybrid::connect`]). Writes time out too, so a guest that
    /// stops reading cannot block a caller (and every caller behind it).
    pub fn from_unix(stream: UnixStream) -> io::Result<Self> {
        stream.set_write_timeout(Some(DEFAULT_CALL_TIMEOUT))?;
        let reader = stream.try_clone()?;
        let closer = stream.try_clone()?;
        Self::start(reader, stream, Some(closer))
    }

    /// Builds a client over any stream pair. The reader thread ends when
    /// `reader` reaches EOF or fails; writes to `writer` are not bounded in
    /// time unless it bounds them itself.
    pub fn new<R, W>(reader: R, writer: W) -> io::Result<Self>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        Self::start(reader, writer, None)
    }

    fn start<R, W>(reader: R, writer: W, closer: Option<UnixStream>) -> io::Result<Self>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let shared = Arc::new(Shared {
            calls: Mutex::new(Calls::default()),
            closer,
        });
        let for_reader = Arc::clone(&shared);
        thread::Builder::new()
            .name("agent-client-reader".into())
            .spawn(move || dispatch_responses(BufReader::new(reader), &for_reader))?;
        Ok(Self {
            writer: Mutex::new(Box::new(writer)),
            shared,
            next_id: AtomicU64::new(1),
            call_timeout: DEFAULT_CALL_TIMEOUT,
        })
    }

    /// Replaces [`DEFAULT_CALL_TIMEOUT`] as the deadline of ordinary calls
    /// (container creation and removal get twice it; `wait` and `wait_oom`
    /// none) and of each write to a Unix stream.
    pub fn with_call_timeout(mut self, timeout: Duration) -> io::Result<Self> {
        if let Some(closer) = &self.shared.closer {
            closer.set_write_timeout(Some(timeout))?;
        }
        self.call_timeout = timeout;
        Ok(self)
    }

    /// Ends the connection: calls in flight (long polls included) fail with
    /// `ConnectionClosed`, as does every later call. For when the VM is
    /// gone, whatever the guest's end of the connection still does.
    pub fn close(&self) {
        self.shared.close("closed by the host".into());
    }

    /// Checks the agent is alive and returns its version and uptime.
    pub fn ping(&self) -> Result<Pong> {
        match self.call("ping", Deadline::Ordinary, request::Body::Ping(Ping {}))? {
            response::Result::Pong(pong) => Ok(pong),
            other => Err(unexpected("ping", &other)),
        }
    }

    /// Makes a freshly restored clone unique: sets its wall clock to
    /// `unix_time_ns`, mixes `entropy` into its kernel random pool and
    /// reseeds the CRNG, and sets its hostname unless `hostname` is empty
    /// (see `InitClone` in agent.proto). Call it first on a new clone, with
    /// the time sampled just before and entropy from [`fresh_entropy`].
    pub fn init_clone(
        &self,
        unix_time_ns: u64,
        entropy: &[u8],
        hostname: &str,
    ) -> Result<CloneInitialized> {
        let body = request::Body::InitClone(InitClone {
            unix_time_ns,
            entropy: entropy.to_vec(),
            hostname: hostname.into(),
        });
        match self.call("init_clone", Deadline::Ordinary, body)? {
            response::Result::CloneInitialized(done) => Ok(done),
            other => Err(unexpected("init_clone", &other)),
        }
    }

    /// Prepares a process (see `CreateProcess` in agent.proto).
    pub fn create_process(&self, req: CreateProcess) -> Result<()> {
        match self.call(
            "create_process",
            Deadline::Ordinary,
            request::Body::CreateProcess(req),
        )? {
            response::Result::ProcessCreated(_) => Ok(()),
            other => Err(unexpected("create_process", &other)),
        }
    }

    /// Executes a created process and returns its guest pid.
    pub fn start_process(&self, id: &str) -> Result<u32> {
        let body = request::Body::StartProcess(StartProcess { id: id.into() });
        match self.call("start_process", Deadline::Ordinary, body)? {
            response::Result::Started(started) => Ok(started.pid),
            other => Err(unexpected("start_process", &other)),
        }
    }

    /// Sends `signal` to the process, or to its whole process group if `all`.
    pub fn signal(&self, id: &str, signal: i32, all: bool) -> Result<()> {
        let body = request::Body::SignalProcess(SignalProcess {
            id: id.into(),
            signal,
            all,
        });
        match self.call("signal_process", Deadline::Ordinary, body)? {
            response::Result::Signalled(_) => Ok(()),
            other => Err(unexpected("signal_process", &other)),
        }
    }

    /// Blocks until the process exited and its output streams were flushed.
    /// A long poll: no deadline, it ends with `ConnectionClosed` when the
    /// connection does (see [`AgentClient::close`]).
    pub fn wait(&self, id: &str) -> Result<ExitStatus> {
        let body = request::Body::WaitProcess(WaitProcess { id: id.into() });
        match self.call("wait_process", Deadline::LongPoll, body)? {
            response::Result::Exited(exited) => Ok(exited),
            other => Err(unexpected("wait_process", &other)),
        }
    }

    /// Sets a terminal process's window size.
    pub fn resize_tty(&self, id: &str, rows: u32, cols: u32) -> Result<()> {
        let body = request::Body::ResizeTty(ResizeTty {
            id: id.into(),
            rows,
            cols,
        });
        match self.call("resize_tty", Deadline::Ordinary, body)? {
            response::Result::TtyResized(_) => Ok(()),
            other => Err(unexpected("resize_tty", &other)),
        }
    }

    /// Gives the process EOF on stdin.
    pub fn close_stdin(&self, id: &str) -> Result<()> {
        let body = request::Body::CloseStdin(CloseStdin { id: id.into() });
        match self.call("close_stdin", Deadline::Ordinary, body)? {
            response::Result::StdinClosed(_) => Ok(()),
            other => Err(unexpected("close_stdin", &other)),
        }
    }

    /// Forgets a created or exited process.
    pub fn delete_process(&self, id: &str) -> Result<()> {
        let body = request::Body::DeleteProcess(DeleteProcess { id: id.into() });
        match self.call("delete_process", Deadline::Ordinary, body)? {
            response::Result::ProcessDeleted(_) => Ok(()),
            other => Err(unexpected("delete_process", &other)),
        }
    }

    /// Prepares a container: mounts its rootfs and mounts, creates its
    /// cgroup, applies sysctls and the hostname (see `CreateContainer` in
    /// agent.proto). Runs nothing; its processes are created with
    /// `CreateProcess.container_id`.
    pub fn create_container(&self, req: CreateContainer) -> Result<()> {
        match self.call(
            "create_container",
            Deadline::Slow,
            request::Body::CreateContainer(req),
        )? {
            response::Result::ContainerCreated(_) => Ok(()),
            other => Err(unexpected("create_container", &other)),
        }
    }

    /// Kills what is left in the container, unmounts everything it had,
    /// removes its cgroup and forgets its processes.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        let body = request::Body::RemoveContainer(RemoveContainer { id: id.into() });
        match self.call("remove_container", Deadline::Slow, body)? {
            response::Result::ContainerRemoved(_) => Ok(()),
            other => Err(unexpected("remove_container", &other)),
        }
    }

    /// Applies the set fields of `resources` to the container's cgroup.
    pub fn update_container(&self, id: &str, resources: Resources) -> Result<()> {
        let body = request::Body::UpdateContainer(UpdateContainer {
            id: id.into(),
            resources: Some(resources),
        });
        match self.call("update_container", Deadline::Ordinary, body)? {
            response::Result::ContainerUpdated(_) => Ok(()),
            other => Err(unexpected("update_container", &other)),
        }
    }

    /// Freezes (`frozen`, pause) or thaws (resume) every process of the
    /// container; returns once the cgroup reports the change.
    pub fn freeze_container(&self, id: &str, frozen: bool) -> Result<()> {
        let body = request::Body::FreezeContainer(FreezeContainer {
            id: id.into(),
            frozen,
        });
        match self.call("freeze_container", Deadline::Ordinary, body)? {
            response::Result::ContainerFrozen(_) => Ok(()),
            other => Err(unexpected("freeze_container", &other)),
        }
    }

    /// Reads the container's cgroup statistics.
    pub fn container_stats(&self, id: &str) -> Result<Stats> {
        let body = request::Body::ContainerStats(ContainerStats { id: id.into() });
        match self.call("container_stats", Deadline::Ordinary, body)? {
            response::Result::Stats(stats) => Ok(stats),
            other => Err(unexpected("container_stats", &other)),
        }
    }

    /// The guest pids of the container's processes.
    pub fn list_pids(&self, id: &str) -> Result<Vec<u32>> {
        let body = request::Body::ListPids(ListPids { id: id.into() });
        match self.call("list_pids", Deadline::Ordinary, body)? {
            response::Result::Pids(pids) => Ok(pids.pids),
            other => Err(unexpected("list_pids", &other)),
        }
    }

    /// Blocks until a container records an OOM kill not reported before and
    /// returns its id (oldest first). Keep one such call in flight, on a
    /// thread of its own; a long poll with no deadline, it ends with
    /// `ConnectionClosed` when the connection does. The id is the guest's
    /// word: check it names a container of this pod before acting on it.
    pub fn wait_oom(&self) -> Result<String> {
        match self.call(
            "wait_oom",
            Deadline::LongPoll,
            request::Body::WaitOom(WaitOom {}),
        )? {
            response::Result::OomEvent(event) => Ok(event.container_id),
            other => Err(unexpected("wait_oom", &other)),
        }
    }

    /// Configures the guest's NIC (MAC, MTU, addresses, up) and routes
    /// (see `ConfigureNetwork` in agent.proto). The shim sends it once,
    /// right after the VM is ready, for a pod that has a network namespace.
    pub fn configure_network(&self, req: ConfigureNetwork) -> Result<()> {
        match self.call(
            "configure_network",
            Deadline::Ordinary,
            request::Body::ConfigureNetwork(req),
        )? {
            response::Result::NetworkConfigured(_) => Ok(()),
            other => Err(unexpected("configure_network", &other)),
        }
    }

    /// Asks the guest to power off. The VM may vanish before its reply
    /// arrives, so a connection closing after the request went out counts as
    /// success.
    pub fn shutdown(&self) -> Result<()> {
        match self.call(
            "shutdown",
            Deadline::Ordinary,
            request::Body::Shutdown(Shutdown {}),
        ) {
            Ok(response::Result::ShutdownStarted(_)) | Err(ClientError::ConnectionClosed(_)) => {
                Ok(())
            }
            Ok(other) => Err(unexpected("shutdown", &other)),
            Err(e) => Err(e),
        }
    }

    /// Performs the `StreamAttach` handshake on a fresh stdio connection and
    /// hands the stream back, ready for raw bytes.
    pub fn attach_stream<S: Read + Write>(
        stream: S,
        process_id: &str,
        kind: StreamKind,
    ) -> Result<S> {
        attach_stream(stream, process_id, kind)
    }

    fn call(
        &self,
        call: &'static str,
        deadline: Deadline,
        body: request::Body,
    ) -> Result<response::Result> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        {
            let mut calls = self.shared.calls();
            if let Some(reason) = &calls.closed {
                return Err(ClientError::ConnectionClosed(reason.clone()));
            }
            calls.pending.insert(id, tx);
        }
        let _pending = PendingCall {
            shared: &self.shared,
            id,
        };
        let req = Request {
            id,
            body: Some(body),
        };
        let written = {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            write_frame(&mut **writer, &req).and_then(|()| writer.flush().map_err(Into::into))
        };
        if let Err(e) = written {
            // Part of the frame may be out: the stream is no longer framed.
            self.shared.close(format!("writing a {call} request: {e}"));
            return Err(match e {
                FrameError::Io(io) if is_timeout(&io) => ClientError::Timeout {
                    call,
                    after: self.call_timeout,
                },
                other => other.into(),
            });
        }
        let closed = |shared: &Shared| {
            let reason = shared.calls().closed.clone();
            ClientError::ConnectionClosed(reason.unwrap_or_else(|| "reader stopped".into()))
        };
        let after = match deadline {
            Deadline::Ordinary => Some(self.call_timeout),
            Deadline::Slow => Some(self.call_timeout.saturating_mul(2)),
            Deadline::LongPoll => None,
        };
        let resp = match after {
            None => rx.recv().map_err(|_| closed(&self.shared))?,
            Some(after) => match rx.recv_timeout(after) {
                Ok(resp) => resp,
                Err(RecvTimeoutError::Disconnected) => return Err(closed(&self.shared)),
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.calls().pending.remove(&id).is_some() {
                        return Err(ClientError::Timeout { call, after });
                    }
                    // The reader took the entry just now and is handing the
                    // reply over (without blocking: the channel has room).
                    rx.recv().map_err(|_| closed(&self.shared))?
                }
            },
        };
        match resp.result {
            Some(response::Result::Error(err)) => Err(ClientError::from_wire(err)),
            Some(result) => Ok(result),
            None => Err(ClientError::UnexpectedResponse {
                call,
                got: "an empty response",
            }),
        }
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        if let Some(closer) = &self.shared.closer {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Whether an I/O error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`
/// report `EAGAIN`).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// [`attach_stream`] on a Unix stream (a fresh hybrid-vsock connection),
/// bounded by `timeout`: a guest that never answers the handshake fails it
/// with [`ClientError::Timeout`] rather than pinning the caller. The stream
/// comes back with no timeouts set.
pub fn attach_unix_stream(
    stream: UnixStream,
    process_id: &str,
    kind: StreamKind,
    timeout: Duration,
) -> Result<UnixStream> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let stream = attach_stream(stream, process_id, kind).map_err(|e| match e {
        ClientError::Frame(FrameError::Io(io)) | ClientError::Io(io) if is_timeout(&io) => {
            ClientError::Timeout {
                call: "stream_attach",
                after: timeout,
            }
        }
        other => other,
    })?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// [`open_port_forward`] on a Unix stream (a fresh hybrid-vsock connection
/// to [`crate::FORWARD_PORT`]), bounded by `timeout` like
/// [`attach_unix_stream`]. The stream comes back with no timeouts set.
pub fn port_forward_unix_stream(
    stream: UnixStream,
    port: u16,
    timeout: Duration,
) -> Result<UnixStream> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let stream = open_port_forward(stream, port).map_err(|e| match e {
        ClientError::Frame(FrameError::Io(io)) | ClientError::Io(io) if is_timeout(&io) => {
            ClientError::Timeout {
                call: "port_forward_open",
                after: timeout,
            }
        }
        other => other,
    })?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Performs the `PortForwardOpen` handshake on a fresh port-forward
/// connection: once it returns, the stream is a byte pipe to a TCP
/// connection to `127.0.0.1:port` in the guest.
///
/// Reads exactly one frame back, so no stream byte is lost.
pub fn open_port_forward<S: Read + Write>(mut stream: S, port: u16) -> Result<S> {
    write_frame(
        &mut stream,
        &PortForwardOpen {
            port: u32::from(port),
        },
    )?;
    stream.flush()?;
    match read_frame::<PortForwardOpened, _>(&mut stream)? {
        None => Err(ClientError::ConnectionClosed(
            "port-forward connection closed during open".into(),
        )),
        Some(PortForwardOpened { error: Some(err) }) => Err(ClientError::from_wire(err)),
        Some(PortForwardOpened { error: None }) => Ok(stream),
    }
}

/// Performs the `StreamAttach` handshake on a fresh stdio connection.
///
/// Reads exactly one frame back, so no stream byte is lost.
pub fn attach_stream<S: Read + Write>(
    mut stream: S,
    process_id: &str,
    kind: StreamKind,
) -> Result<S> {
    let attach = StreamAttach {
        process_id: process_id.into(),
        kind: kind as i32,
    };
    write_frame(&mut stream, &attach)?;
    stream.flush()?;
    match read_frame::<StreamAttached, _>(&mut stream)? {
        None => Err(ClientError::ConnectionClosed(
            "stdio connection closed during attach".into(),
        )),
        Some(StreamAttached { error: Some(err) }) => Err(ClientError::from_wire(err)),
        Some(StreamAttached { error: None }) => Ok(stream),
    }
}

/// `len` bytes from the host's CSPRNG (/dev/urandom, which never blocks once
/// the host's pool is initialised), for `InitClone`'s `entropy`
/// ([`crate::CLONE_ENTROPY_MIN`]..=[`crate::CLONE_ENTROPY_MAX`] bytes).
pub fn fresh_entropy(len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// The reader thread: routes every response to its caller until the
/// connection ends or the guest sends a frame that is too large (refused
/// before anything is allocated) or undecodable, then fails every call still
/// waiting and shuts the connection down.
fn dispatch_responses<R: Read>(mut reader: R, shared: &Shared) {
    let reason = loop {
        match read_frame::<Response, _>(&mut reader) {
            Ok(Some(resp)) => {
                // A response nobody waits for (unknown id, or a call that
                // timed out) is dropped.
                if let Some(tx) = shared.calls().pending.remove(&resp.id) {
                    let _ = tx.send(resp);
                }
            }
            Ok(None) => break "agent closed the connection".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    shared.close(reason);
}

fn unexpected(call: &'static str, got: &response::Result) -> ClientError {
    let got = match got {
        response::Result::Error(_) => "error",
        response::Result::ProcessCreated(_) => "process_created",
        response::Result::Started(_) => "started",
        response::Result::Signalled(_) => "signalled",
        response::Result::Exited(_) => "exited",
        response::Result::TtyResized(_) => "tty_resized",
        response::Result::StdinClosed(_) => "stdin_closed",
        response::Result::ShutdownStarted(_) => "shutdown_started",
        response::Result::Pong(_) => "pong",
        response::Result::ProcessDeleted(_) => "process_deleted",
        response::Result::CloneInitialized(_) => "clone_initialized",
        response::Result::ContainerCreated(_) => "container_created",
        response::Result::ContainerRemoved(_) => "container_removed",
        response::Result::ContainerUpdated(_) => "container_updated",
        response::Result::ContainerFrozen(_) => "container_frozen",
        response::Result::Stats(_) => "stats",
        response::Result::Pids(_) => "pids",
        response::Result::OomEvent(_) => "oom_event",
        response::Result::NetworkConfigured(_) => "network_configured",
    };
    ClientError::UnexpectedResponse { call, got }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{Error as WireError, ProcessCreated, Started};
    use std::sync::mpsc::Receiver;
    use std::time::Duration;

    /// An in-process fake agent: forwards every request to the test, which
    /// answers through `answer`.
    struct FakeAgent {
        requests: Receiver<Request>,
        conn: UnixStream,
    }

    impl FakeAgent {
        fn answer(&self, id: u64, result: response::Result) {
            let resp = Response {
                id,
                result: Some(result),
            };
            write_frame(&mut &self.conn, &resp).unwrap();
        }

        fn next(&self) -> Request {
            self.requests.recv_timeout(Duration::from_secs(5)).unwrap()
        }
    }

    fn pair() -> (AgentClient, FakeAgent) {
        let (client_end, server_end) = UnixStream::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = server_end.try_clone().unwrap();
        thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            while let Ok(Some(req)) = read_frame::<Request, _>(&mut reader) {
                if tx.send(req).is_err() {
                    break;
                }
            }
        });
        let client = AgentClient::from_unix(client_end).unwrap();
        (
            client,
            FakeAgent {
                requests: rx,
                conn: server_end,
            },
        )
    }

    #[test]
    fn ping_round_trip() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let call = s.spawn(|| client.ping().unwrap());
            let req = agent.next();
            assert!(matches!(req.body, Some(request::Body::Ping(_))));
            agent.answer(
                req.id,
                response::Result::Pong(Pong {
                    version: "1.2.3".into(),
                    uptime_ms: 42,
                }),
            );
            let pong = call.join().unwrap();
            assert_eq!((pong.version.as_str(), pong.uptime_ms), ("1.2.3", 42));
        });
    }

    #[test]
    fn wait_does_not_block_other_calls() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let waiter = s.spawn(|| client.wait("p1").unwrap());
            let wait_req = agent.next();
            assert!(matches!(wait_req.body, Some(request::Body::WaitProcess(_))));

            let starter = s.spawn(|| client.start_process("p2").unwrap());
            let start_req = agent.next();
            agent.answer(start_req.id, response::Result::Started(Started { pid: 99 }));
            assert_eq!(starter.join().unwrap(), 99);
            assert!(!waiter.is_finished());

            agent.answer(
                wait_req.id,
                response::Result::Exited(Exited {
                    exit_code: -1,
                    signal: 9,
                }),
            );
            let exited = waiter.join().unwrap();
            assert_eq!((exited.exit_code, exited.signal), (-1, 9));
        });
    }

    #[test]
    fn error_codes_map_to_variants() {
        let (client, agent) = pair();
        let cases = [
            (Code::InvalidArgument, "InvalidArgument"),
            (Code::NotFound, "NotFound"),
            (Code::AlreadyExists, "AlreadyExists"),
            (Code::FailedPrecondition, "FailedPrecondition"),
            (Code::Internal, "Internal"),
            (Code::Unknown, "Internal"),
        ];
        for (code, want) in cases {
            thread::scope(|s| {
                let call = s.spawn(|| client.create_process(CreateProcess::default()));
                let req = agent.next();
                agent.answer(
                    req.id,
                    response::Result::Error(WireError {
                        code: code as i32,
                        message: "m".into(),
                    }),
                );
                let err = call.join().unwrap().unwrap_err();
                assert!(format!("{err:?}").starts_with(want), "{code:?} -> {err:?}");
            });
        }
    }

    #[test]
    fn mismatched_result_is_reported() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let call = s.spawn(|| client.start_process("p"));
            let req = agent.next();
            agent.answer(req.id, response::Result::ProcessCreated(ProcessCreated {}));
            let err = call.join().unwrap().unwrap_err();
            assert!(matches!(err, ClientError::UnexpectedResponse { .. }));
        });
    }

    #[test]
    fn closed_connection_fails_pending_and_later_calls() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let waiter = s.spawn(|| client.wait("p"));
            agent.next();
            agent.conn.shutdown(std::net::Shutdown::Both).unwrap();
            let err = waiter.join().unwrap().unwrap_err();
            assert!(matches!(err, ClientError::ConnectionClosed(_)));
        });
        assert!(matches!(
            client.ping().unwrap_err(),
            ClientError::ConnectionClosed(_) | ClientError::Frame(_) | ClientError::Io(_)
        ));
    }

    #[test]
    fn shutdown_accepts_a_vanishing_vm() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let call = s.spawn(|| client.shutdown());
            agent.next();
            agent.conn.shutdown(std::net::Shutdown::Both).unwrap();
            call.join().unwrap().unwrap();
        });
    }

    #[test]
    fn init_clone_round_trip() {
        let (client, agent) = pair();
        let entropy = fresh_entropy(crate::CLONE_ENTROPY_MIN).unwrap();
        thread::scope(|s| {
            let call = s.spawn(|| client.init_clone(1_700_000_000_000_000_000, &entropy, "c1"));
            let req = agent.next();
            let Some(request::Body::InitClone(init)) = req.body else {
                panic!("sent {:?}", req.body);
            };
            assert_eq!(init.unix_time_ns, 1_700_000_000_000_000_000);
            assert_eq!(init.entropy, entropy);
            assert_eq!(init.hostname, "c1");
            agent.answer(
                req.id,
                response::Result::CloneInitialized(CloneInitialized {
                    previous_unix_time_ns: 5,
                    entropy_bytes: 32,
                    hostname: "c1".into(),
                }),
            );
            let done = call.join().unwrap().unwrap();
            assert_eq!(
                (
                    done.previous_unix_time_ns,
                    done.entropy_bytes,
                    done.hostname.as_str()
                ),
                (5, 32, "c1")
            );
        });
    }

    #[test]
    fn fresh_entropy_is_fresh() {
        let a = fresh_entropy(64).unwrap();
        let b = fresh_entropy(64).unwrap();
        assert_eq!((a.len(), b.len()), (64, 64));
        assert_ne!(a, b);
        assert!(fresh_entropy(0).unwrap().is_empty());
    }

    #[test]
    fn container_calls_round_trip() {
        use crate::agent::{
            ContainerCreated, ContainerFrozen, ContainerRemoved, ContainerUpdated, Mount, OomEvent,
            Pids, StatEntry,
        };
        let (client, agent) = pair();
        thread::scope(|s| {
            let create = CreateContainer {
                id: "c1".into(),
                rootfs: "c1/rootfs".into(),
                readonly_rootfs: true,
                mounts: vec![Mount {
                    destination: "/proc".into(),
                    r#type: "proc".into(),
                    source: "proc".into(),
                    options: vec!["nosuid".into()],
                }],
                hostname: "pod".into(),
                ..Default::default()
            };
            let sent = create.clone();
            let call = s.spawn(|| client.create_container(sent));
            let req = agent.next();
            assert_eq!(req.body, Some(request::Body::CreateContainer(create)));
            agent.answer(
                req.id,
                response::Result::ContainerCreated(ContainerCreated {}),
            );
            call.join().unwrap().unwrap();

            let call = s.spawn(|| client.remove_container("c1"));
            let req = agent.next();
            assert_eq!(
                req.body,
                Some(request::Body::RemoveContainer(RemoveContainer {
                    id: "c1".into()
                }))
            );
            agent.answer(
                req.id,
                response::Result::ContainerRemoved(ContainerRemoved {}),
            );
            call.join().unwrap().unwrap();

            let resources = Resources {
                memory_limit: Some(64 << 20),
                cpu_quota: Some(-1),
                pids_limit: Some(100),
                ..Default::default()
            };
            let c = &client;
            let call = s.spawn(move || c.update_container("c1", resources));
            let req = agent.next();
            assert_eq!(
                req.body,
                Some(request::Body::UpdateContainer(UpdateContainer {
                    id: "c1".into(),
                    resources: Some(resources),
                }))
            );
            agent.answer(
                req.id,
                response::Result::ContainerUpdated(ContainerUpdated {}),
            );
            call.join().unwrap().unwrap();

            let call = s.spawn(|| client.freeze_container("c1", true));
            let req = agent.next();
            assert_eq!(
                req.body,
                Some(request::Body::FreezeContainer(FreezeContainer {
                    id: "c1".into(),
                    frozen: true,
                }))
            );
            agent.answer(
                req.id,
                response::Result::ContainerFrozen(ContainerFrozen {}),
            );
            call.join().unwrap().unwrap();

            let call = s.spawn(|| client.container_stats("c1"));
            let req = agent.next();
            assert_eq!(
                req.body,
                Some(request::Body::ContainerStats(ContainerStats {
                    id: "c1".into()
                }))
            );
            let stats = Stats {
                cpu_usage_usec: 7,
                memory_stat: vec![StatEntry {
                    key: "anon".into(),
                    value: 4096,
                }],
                pids_current: 2,
                ..Default::default()
            };
            agent.answer(req.id, response::Result::Stats(stats.clone()));
            assert_eq!(call.join().unwrap().unwrap(), stats);

            let call = s.spawn(|| client.list_pids("c1"));
            let req = agent.next();
            assert_eq!(
                req.body,
                Some(request::Body::ListPids(ListPids { id: "c1".into() }))
            );
            agent.answer(req.id, response::Result::Pids(Pids { pids: vec![5, 9] }));
            assert_eq!(call.join().unwrap().unwrap(), vec![5, 9]);

            let call = s.spawn(|| client.wait_oom());
            let req = agent.next();
            assert_eq!(req.body, Some(request::Body::WaitOom(WaitOom {})));
            agent.answer(
                req.id,
                response::Result::OomEvent(OomEvent {
                    container_id: "c1".into(),
                }),
            );
            assert_eq!(call.join().unwrap().unwrap(), "c1");
        });
    }

    #[test]
    fn container_calls_report_errors_and_mismatches() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let call = s.spawn(|| client.remove_container("nope"));
            let req = agent.next();
            agent.answer(
                req.id,
                response::Result::Error(WireError {
                    code: Code::NotFound as i32,
                    message: "container \"nope\" not found".into(),
                }),
            );
            assert!(matches!(
                call.join().unwrap().unwrap_err(),
                ClientError::NotFound(m) if m.contains("nope")
            ));

            let call = s.spawn(|| client.list_pids("c"));
            let req = agent.next();
            agent.answer(req.id, response::Result::Pong(Pong::default()));
            assert!(matches!(
                call.join().unwrap().unwrap_err(),
                ClientError::UnexpectedResponse {
                    call: "list_pids",
                    got: "pong"
                }
            ));

            let call = s.spawn(|| client.start_process("p"));
            let req = agent.next();
            agent.answer(
                req.id,
                response::Result::OomEvent(crate::agent::OomEvent::default()),
            );
            assert!(matches!(
                call.join().unwrap().unwrap_err(),
                ClientError::UnexpectedResponse {
                    got: "oom_event",
                    ..
                }
            ));
        });
    }

    #[test]
    fn configure_network_round_trip() {
        use crate::agent::{Interface, IpAddress, NetworkConfigured, Route};
        let (client, agent) = pair();
        let req = ConfigureNetwork {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: vec![0x02, 0, 0, 0, 0, 7],
                mtu: 1450,
                addresses: vec![IpAddress {
                    address: "10.88.0.7".into(),
                    prefix_len: 16,
                }],
            }],
            routes: vec![Route {
                destination: "0.0.0.0/0".into(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
        };
        thread::scope(|s| {
            let sent = req.clone();
            let call = s.spawn(|| client.configure_network(sent));
            let got = agent.next();
            assert_eq!(got.body, Some(request::Body::ConfigureNetwork(req)));
            agent.answer(
                got.id,
                response::Result::NetworkConfigured(NetworkConfigured {}),
            );
            call.join().unwrap().unwrap();

            let call = s.spawn(|| client.configure_network(ConfigureNetwork::default()));
            let got = agent.next();
            agent.answer(got.id, response::Result::Pong(Pong::default()));
            assert!(matches!(
                call.join().unwrap().unwrap_err(),
                ClientError::UnexpectedResponse {
                    call: "configure_network",
                    got: "pong"
                }
            ));
        });
    }

    #[test]
    fn wait_oom_does_not_block_other_calls_and_ends_with_the_connection() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let oom = s.spawn(|| client.wait_oom());
            let oom_req = agent.next();
            assert!(matches!(oom_req.body, Some(request::Body::WaitOom(_))));
            let pids = s.spawn(|| client.list_pids("c"));
            let req = agent.next();
            agent.answer(
                req.id,
                response::Result::Pids(crate::agent::Pids { pids: vec![1] }),
            );
            assert_eq!(pids.join().unwrap().unwrap(), vec![1]);
            assert!(!oom.is_finished());
            agent.conn.shutdown(std::net::Shutdown::Both).unwrap();
            assert!(matches!(
                oom.join().unwrap().unwrap_err(),
                ClientError::ConnectionClosed(_)
            ));
        });
    }

    fn pending_calls(client: &AgentClient) -> usize {
        client.shared.calls().pending.len()
    }

    #[test]
    fn silent_agent_times_out_and_frees_the_slot() {
        let (client, agent) = pair();
        let client = client
            .with_call_timeout(Duration::from_millis(100))
            .unwrap();
        thread::scope(|s| {
            let call = s.spawn(|| client.ping());
            let req = agent.next();
            let err = call.join().unwrap().unwrap_err();
            assert!(
                matches!(err, ClientError::Timeout { call: "ping", after } if after == Duration::from_millis(100)),
                "{err:?}"
            );
            assert_eq!(pending_calls(&client), 0);
            // The reply coming late is dropped; the connection still works.
            agent.answer(req.id, response::Result::Pong(Pong::default()));
            let call = s.spawn(|| client.ping());
            let req = agent.next();
            agent.answer(req.id, response::Result::Pong(Pong::default()));
            call.join().unwrap().unwrap();
            assert_eq!(pending_calls(&client), 0);
        });
    }

    #[test]
    fn container_creation_gets_twice_the_deadline() {
        let (client, agent) = pair();
        let client = client.with_call_timeout(Duration::from_millis(50)).unwrap();
        thread::scope(|s| {
            let call = s.spawn(|| client.create_container(CreateContainer::default()));
            agent.next();
            assert!(matches!(
                call.join().unwrap().unwrap_err(),
                ClientError::Timeout { call: "create_container", after } if after == Duration::from_millis(100)
            ));
            assert_eq!(pending_calls(&client), 0);
        });
    }

    #[test]
    fn long_polls_have_no_deadline_but_end_on_close() {
        let (client, agent) = pair();
        let client = client.with_call_timeout(Duration::from_millis(20)).unwrap();
        thread::scope(|s| {
            let waiter = s.spawn(|| client.wait("p"));
            let oom = s.spawn(|| client.wait_oom());
            agent.next();
            agent.next();
            thread::sleep(Duration::from_millis(200));
            assert!(!waiter.is_finished() && !oom.is_finished());
            assert_eq!(pending_calls(&client), 2);
            client.close();
            for call in [
                waiter.join().unwrap().map(drop),
                oom.join().unwrap().map(drop),
            ] {
                assert!(
                    matches!(call, Err(ClientError::ConnectionClosed(ref m)) if m.contains("host"))
                );
            }
        });
        assert_eq!(pending_calls(&client), 0);
        assert!(matches!(
            client.ping().unwrap_err(),
            ClientError::ConnectionClosed(_)
        ));
    }

    /// The frame reader refuses the length before allocating anything; the
    /// client ends the connection and fails what was in flight.
    #[test]
    fn oversized_reply_ends_the_connection() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let waiter = s.spawn(|| client.wait("p"));
            let pinger = s.spawn(|| client.ping());
            agent.next();
            agent.next();
            (&agent.conn).write_all(&u32::MAX.to_be_bytes()).unwrap();
            for call in [
                waiter.join().unwrap().map(drop),
                pinger.join().unwrap().map(drop),
            ] {
                assert!(
                    matches!(call, Err(ClientError::ConnectionClosed(ref m)) if m.contains("exceeds")),
                    "{call:?}"
                );
            }
        });
        assert_eq!(pending_calls(&client), 0);
        assert!(matches!(
            client.ping().unwrap_err(),
            ClientError::ConnectionClosed(_)
        ));
        // The client shut the socket down: the agent's reader saw EOF.
        assert!(matches!(
            agent.requests.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        ));
    }

    #[test]
    fn undecodable_reply_ends_the_connection() {
        let (client, agent) = pair();
        thread::scope(|s| {
            let call = s.spawn(|| client.list_pids("c"));
            agent.next();
            (&agent.conn)
                .write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
                .unwrap();
            assert!(matches!(
                call.join().unwrap().unwrap_err(),
                ClientError::ConnectionClosed(m) if m.contains("undecodable")
            ));
        });
        assert_eq!(pending_calls(&client), 0);
    }

    #[test]
    fn attach_times_out_on_a_silent_guest() {
        let (host, _guest) = UnixStream::pair().unwrap();
        let err = attach_unix_stream(host, "p", StreamKind::Stdout, Duration::from_millis(100))
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout {
                    call: "stream_attach",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn attach_handshake() {
        let (host, guest) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut guest = guest;
            let attach: StreamAttach = read_frame(&mut guest).unwrap().unwrap();
            assert_eq!(attach.process_id, "p");
            assert_eq!(attach.kind, StreamKind::Stdout as i32);
            write_frame(&mut guest, &StreamAttached { error: None }).unwrap();
            guest.write_all(b"output").unwrap();
        });
        let mut stream = AgentClient::attach_stream(host, "p", StreamKind::Stdout).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        assert_eq!(out, "output");
        server.join().unwrap();
    }

    #[test]
    fn attach_refused() {
        let (host, guest) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let mut guest = guest;
            let _: Option<StreamAttach> = read_frame(&mut guest).unwrap();
            let error = WireError {
                code: Code::NotFound as i32,
                message: "no such process".into(),
            };
            write_frame(&mut guest, &StreamAttached { error: Some(error) }).unwrap();
        });
        let err = attach_stream(host, "p", StreamKind::Stdin).unwrap_err();
        assert!(matches!(err, ClientError::NotFound(_)));
        server.join().unwrap();
    }
}
