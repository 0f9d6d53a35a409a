//! The agent's processes and their lifecycle (created -> running -> exited ->
//! deleted): what each call may do in which state, and the stdio ends each
//! process holds until a stream attaches or it starts.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use proto::agent::{CreateProcess, StreamKind};

use crate::conn::Conn;
use crate::container::pidns::{PidNs, Spawned};
use crate::container::Placement;
use crate::error::AgentError;
use crate::process::{self, ChildStdio, Plan};
use crate::reaper::{ExitStatus, Reaper};

/// How long `wait` keeps waiting for output EOF after the process exited,
/// for descendants that keep the pipes open (daemons): the output keeps
/// flowing, only the reply stops waiting for it.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(2);

fn internal(what: &'static str) -> impl FnOnce(io::Error) -> AgentError {
    move |source| AgentError::Internal { what, source }
}

enum Phase {
    Created(Box<Plan>),
    /// Transient, while `start` holds the lock.
    Starting,
    Running(i32),
    Exited {
        status: ExitStatus,
        at: Instant,
    },
    Deleted,
}

/// The agent's end of the process's stdin.
enum Stdin {
    /// No stdin requested: the process reads /dev/null.
    Unavailable,
    /// The pipe's write end, until a STDIN stream takes it.
    Pipe(OwnedFd),
    /// A terminal whose STDIN stream has not attached yet.
    Tty,
    /// Owned by a stream; kept to end that stream on CloseStdin or exit.
    Attached(Arc<Conn>),
    Closed,
}

/// The fds the child gets as 0/1/2, held until start (unset = /dev/null).
#[derive(Default)]
struct ChildFds {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// A terminal's slave side: all three.
    tty_slave: Option<OwnedFd>,
}

struct State {
    phase: Phase,
    pty_master: Option<OwnedFd>,
    child_fds: ChildFds,
    stdin: Stdin,
    stdout_attached: bool,
    stderr_attached: bool,
    /// Output streams whose copy has not reached EOF yet.
    outputs_open: u32,
}

/// One process the agent knows.
pub struct Process {
    id: String,
    /// The container it runs in, if any.
    container: Option<String>,
    state: Mutex<State>,
    changed: Condvar,
}

impl Process {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark_exited(&self, status: ExitStatus) {
        let mut st = self.state();
        if matches!(st.phase, Phase::Deleted) {
            // Forgotten with its container while it ran; nobody asks.
            return;
        }
        st.phase = Phase::Exited {
            status,
            at: Instant::now(),
        };
        // Nobody will read stdin any more: free the stream's thread.
        if let Stdin::Attached(conn) = &st.stdin {
            let _ = conn.shutdown(std::net::Shutdown::Read);
        }
        st.stdin = Stdin::Closed;
        self.changed.notify_all();
    }

    /// Called by an output copy once it reached EOF and shut its stream.
    pub fn output_done(&self) {
        let mut st = self.state();
        st.outputs_open = st.outputs_open.saturating_sub(1);
        self.changed.notify_all();
    }

    /// Called by the stdin copy when it stops.
    pub fn stdin_done(&self) {
        let mut st = self.state();
        if matches!(st.stdin, Stdin::Attached(_)) {
            st.stdin = Stdin::Closed;
        }
    }
}

/// What an attached stream copies.
pub enum Attachment {
    /// Host bytes go into this fd (pipe write end or pty master).
    Stdin(File),
    /// Bytes from this fd go to the host; `pipe` says splice(2) can move
    /// them (a pty master cannot be spliced).
    Output { src: File, pipe: bool },
}

/// The table of processes.
pub struct Supervisor {
    /// A BTreeMap, not a HashMap: a HashMap's hash keys would be the same
    /// in every clone of a template snapshot.
    processes: Mutex<BTreeMap<String, Arc<Process>>>,
    reaper: Arc<Reaper>,
    /// Opened once; every unattached stdio of every process uses it.
    null: OwnedFd,
    /// The agent's (euid, egid).
    agent_ids: (u32, u32),
}

impl Supervisor {
    /// `null` must be /dev/null opened read-write.
    pub fn new(reaper: Arc<Reaper>, null: OwnedFd) -> Self {
        // SAFETY: geteuid/getegid cannot fail and touch no memory.
        let agent_ids = unsafe { (libc::geteuid(), libc::getegid()) };
        Self {
            processes: Mutex::new(BTreeMap::new()),
            reaper,
            null,
            agent_ids,
        }
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Process>>> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Result<Arc<Process>, AgentError> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(id.to_string()))
    }

    /// CreateProcess: validates, prepares stdio, executes nothing. A
    /// process of a container comes with its `placement` (the caller holds
    /// the container locked).
    pub fn create(
        &self,
        req: &CreateProcess,
        placement: Option<&Placement>,
    ) -> Result<(), AgentError> {
        if req.id.is_empty() {
            return Err(AgentError::InvalidArgument("process id is empty".into()));
        }
        if self.table().contains_key(&req.id) {
            return Err(AgentError::AlreadyExists(req.id.clone()));
        }
        let plan = Plan::new(req, self.agent_ids, placement)
            .map_err(|e| AgentError::InvalidArgument(format!("process {:?}: {e}", req.id)))?;
        let mut child_fds = ChildFds::default();
        let mut pty_master = None;
        let stdin = if plan.terminal {
            // A container's own devpts instance, so the process finds its
            // tty under its /dev/pts.
            let root = placement.map(|p| p.root.as_path());
            let pty = process::open_pty_in(root).map_err(internal("open pty"))?;
            child_fds.tty_slave = Some(pty.slave);
            pty_master = Some(pty.master);
            Stdin::Tty
        } else if plan.stdin {
            let (read, write) = pipe().map_err(internal("stdin pipe"))?;
            child_fds.stdin = Some(read);
            Stdin::Pipe(write)
        } else {
            Stdin::Unavailable
        };
        let process = Arc::new(Process {
            id: req.id.clone(),
            container: placement.map(|p| p.container_id.clone()),
            state: Mutex::new(State {
                phase: Phase::Created(Box::new(plan)),
                pty_master,
                child_fds,
                stdin,
                stdout_attached: false,
                stderr_attached: false,
                outputs_open: 0,
            }),
            changed: Condvar::new(),
        });
        let mut table = self.table();
        if table.contains_key(&req.id) {
            return Err(AgentError::AlreadyExists(req.id.clone()));
        }
        table.insert(req.id.clone(), process);
        Ok(())
    }

    /// StreamAttach: hands the stream's fd to the caller's copy loop.
    pub fn attach(
        &self,
        id: &str,
        kind: StreamKind,
        conn: &Arc<Conn>,
    ) -> Result<(Arc<Process>, Attachment), AgentError> {
        let process = self.get(id)?;
        let mut st = process.state();
        let attachment = match kind {
            StreamKind::Stdin => attach_stdin(&mut st, id, conn)?,
            StreamKind::Stdout | StreamKind::Stderr => attach_output(&mut st, id, kind)?,
        };
        drop(st);
        Ok((process, attachment))
    }

    /// StartProcess: executes a created process, in the PID namespace `ns`
    /// says; returns its pid (and the pidfd of a new namespace's init).
    pub fn start(&self, id: &str, ns: PidNs<'_>) -> Result<Spawned, AgentError> {
        let process = self.get(id)?;
        let mut st = process.state();
        let plan = match std::mem::replace(&mut st.phase, Phase::Starting) {
            Phase::Created(plan) => plan,
            Phase::Deleted => {
                st.phase = Phase::Deleted;
                return Err(AgentError::NotFound(format!("{id} (deleted)")));
            }
            other => {
                st.phase = other;
                return Err(AgentError::FailedPrecondition(format!(
                    "process {id:?} was already started"
                )));
            }
        };
        let null = self.null.as_raw_fd();
        let fds = &st.child_fds;
        let stdio = match &fds.tty_slave {
            Some(slave) => ChildStdio {
                fds: [slave.as_raw_fd(); 3],
                controlling_tty: true,
            },
            None => {
                let or_null = |fd: &Option<OwnedFd>| fd.as_ref().map_or(null, |f| f.as_raw_fd());
                ChildStdio {
                    fds: [
                        or_null(&fds.stdin),
                        or_null(&fds.stdout),
                        or_null(&fds.stderr),
                    ],
                    controlling_tty: false,
                }
            }
        };
        let for_exit = Arc::clone(&process);
        let mut pidfd = None;
        let spawned = self.reaper.spawn_watched(
            || {
                process::spawn(&plan, stdio, ns).map(|s| {
                    pidfd = s.pidfd;
                    s.pid
                })
            },
            move |status| for_exit.mark_exited(status),
        );
        // The child has its copies (or failed): closing ours lets the output
        // copies see EOF when the process is done.
        st.child_fds = ChildFds::default();
        match spawned {
            Ok(pid) => {
                st.phase = Phase::Running(pid);
                Ok(Spawned { pid, pidfd })
            }
            Err(e) => {
                // It never ran; waiters see the shell's "cannot execute".
                st.phase = Phase::Exited {
                    status: ExitStatus::Exited(127),
                    at: Instant::now(),
                };
                st.stdin = Stdin::Closed;
                process.changed.notify_all();
                Err(AgentError::FailedPrecondition(format!(
                    "start process {id:?}: {e}"
                )))
            }
        }
    }

    /// SignalProcess.
    pub fn signal(&self, id: &str, signal: i32, all: bool) -> Result<(), AgentError> {
        if !(0..=64).contains(&signal) {
            return Err(AgentError::InvalidArgument(format!("bad signal {signal}")));
        }
        let process = self.get(id)?;
        let st = process.state();
        let pid = match st.phase {
            Phase::Running(pid) => pid,
            Phase::Created(_) | Phase::Starting => {
                return Err(AgentError::FailedPrecondition(format!(
                    "process {id:?} is not started"
                )))
            }
            Phase::Exited { .. } | Phase::Deleted => {
                return Err(AgentError::NotFound(format!("{id} (already exited)")))
            }
        };
        let target = if all { -pid } else { pid };
        // SAFETY: kill(2) takes plain integers. Between the reaper's waitpid
        // and its recording the exit under our lock the pid is free, but it
        // is only handed out again after the pid space wraps around.
        if unsafe { libc::kill(target, signal) } == -1 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ESRCH) => AgentError::NotFound(format!("{id} (no process left)")),
                Some(libc::EINVAL) => AgentError::InvalidArgument(format!("bad signal {signal}")),
                _ => AgentError::Internal {
                    what: "kill",
                    source: err,
                },
            });
        }
        Ok(())
    }

    /// WaitProcess: blocks until the process exited and its output streams
    /// are done (or the drain grace ran out).
    pub fn wait(&self, id: &str) -> Result<ExitStatus, AgentError> {
        let process = self.get(id)?;
        let mut st = process.state();
        loop {
            match st.phase {
                Phase::Exited { status, at } => {
                    let left = OUTPUT_DRAIN_GRACE.saturating_sub(at.elapsed());
                    if st.outputs_open == 0 || left.is_zero() {
                        return Ok(status);
                    }
                    st = process
                        .changed
                        .wait_timeout(st, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                Phase::Deleted => return Err(AgentError::NotFound(format!("{id} (deleted)"))),
                _ => {
                    st = process
                        .changed
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner)
                }
            }
        }
    }

    /// ResizeTty.
    pub fn resize_tty(&self, id: &str, rows: u32, cols: u32) -> Result<(), AgentError> {
        let (Ok(rows), Ok(cols)) = (u16::try_from(rows), u16::try_from(cols)) else {
            return Err(AgentError::InvalidArgument(format!(
                "window size {rows}x{cols} out of range"
            )));
        };
        let process = self.get(id)?;
        let st = process.state();
        if matches!(st.phase, Phase::Exited { .. } | Phase::Deleted) {
            return Err(AgentError::FailedPrecondition(format!(
                "process {id:?} exited"
            )));
        }
        let master = st.pty_master.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!("process {id:?} has no terminal"))
        })?;
        process::set_window_size(master, rows, cols).map_err(internal("resize tty"))
    }

    /// CloseStdin.
    pub fn close_stdin(&self, id: &str) -> Result<(), AgentError> {
        let process = self.get(id)?;
        let mut st = process.state();
        match std::mem::replace(&mut st.stdin, Stdin::Closed) {
            // The copy thread sees EOF, drains what arrived, closes the pipe.
            Stdin::Attached(conn) => {
                let _ = conn.shutdown(std::net::Shutdown::Read);
            }
            Stdin::Unavailable => st.stdin = Stdin::Unavailable,
            Stdin::Pipe(_) | Stdin::Tty | Stdin::Closed => {}
        }
        Ok(())
    }

    /// DeleteProcess.
    pub fn delete(&self, id: &str) -> Result<(), AgentError> {
        let mut table = self.table();
        let process = table
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(id.to_string()))?;
        let mut st = process.state();
        if matches!(st.phase, Phase::Running(_) | Phase::Starting) {
            return Err(AgentError::FailedPrecondition(format!(
                "process {id:?} is running"
            )));
        }
        table.remove(id);
        st.phase = Phase::Deleted;
        st.child_fds = ChildFds::default();
        st.pty_master = None;
        if let Stdin::Attached(conn) = &st.stdin {
            let _ = conn.shutdown(std::net::Shutdown::Read);
        }
        st.stdin = Stdin::Closed;
        process.changed.notify_all();
        Ok(())
    }

    /// The container a process runs in (None: a process of the guest).
    pub fn container_of(&self, id: &str) -> Result<Option<String>, AgentError> {
        Ok(self.get(id)?.container.clone())
    }

    /// Forgets every process of a container, as DeleteProcess would but
    /// whatever their state (the container is being removed; running ones
    /// are about to be killed). Waiters get NOT_FOUND. Returns how many.
    pub fn forget_container(&self, container: &str) -> usize {
        let mut table = self.table();
        let ids: Vec<String> = table
            .iter()
            .filter(|(_, p)| p.container.as_deref() == Some(container))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some(process) = table.remove(id) {
                let mut st = process.state();
                st.phase = Phase::Deleted;
                st.child_fds = ChildFds::default();
                st.pty_master = None;
                if let Stdin::Attached(conn) = &st.stdin {
                    let _ = conn.shutdown(std::net::Shutdown::Read);
                }
                st.stdin = Stdin::Closed;
                process.changed.notify_all();
            }
        }
        ids.len()
    }

    /// Kills every running process group (leaving a test-mode agent).
    pub fn kill_all(&self) {
        for process in self.table().values() {
            if let Phase::Running(pid) = process.state().phase {
                // SAFETY: kill(2) takes plain integers.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        }
    }
}

fn attach_stdin(st: &mut State, id: &str, conn: &Arc<Conn>) -> Result<Attachment, AgentError> {
    if matches!(st.phase, Phase::Exited { .. } | Phase::Deleted) {
        return Err(AgentError::FailedPrecondition(format!(
            "process {id:?} exited"
        )));
    }
    let dst = match std::mem::replace(&mut st.stdin, Stdin::Attached(Arc::clone(conn))) {
        Stdin::Pipe(write) => write,
        Stdin::Tty => match st.pty_master.as_ref().map(OwnedFd::try_clone) {
            Some(Ok(master)) => master,
            Some(Err(e)) => {
                st.stdin = Stdin::Tty;
                return Err(AgentError::Internal {
                    what: "dup pty",
                    source: e,
                });
            }
            None => {
                st.stdin = Stdin::Closed;
                return Err(AgentError::FailedPrecondition(format!(
                    "process {id:?} exited"
                )));
            }
        },
        previous => {
            let err = match &previous {
                Stdin::Attached(_) => AgentError::AlreadyExists(format!("stdin of {id}")),
                Stdin::Unavailable => {
                    AgentError::FailedPrecondition(format!("process {id:?} has no stdin"))
                }
                _ => AgentError::FailedPrecondition(format!("stdin of {id:?} is closed")),
            };
            st.stdin = previous;
            return Err(err);
        }
    };
    Ok(Attachment::Stdin(File::from(dst)))
}

fn attach_output(st: &mut State, id: &str, kind: StreamKind) -> Result<Attachment, AgentError> {
    if !matches!(st.phase, Phase::Created(_)) {
        return Err(AgentError::FailedPrecondition(format!(
            "output streams of {id:?} must attach before start"
        )));
    }
    let is_stdout = kind == StreamKind::Stdout;
    let attached = if is_stdout {
        st.stdout_attached
    } else {
        st.stderr_attached
    };
    if attached {
        return Err(AgentError::AlreadyExists(format!(
            "{} of {id}",
            kind.as_str_name()
        )));
    }
    let attachment = match &st.pty_master {
        Some(_) if !is_stdout => {
            return Err(AgentError::InvalidArgument(format!(
                "terminal process {id:?} has no STDERR stream"
            )))
        }
        Some(master) => Attachment::Output {
            src: File::from(master.try_clone().map_err(internal("dup pty"))?),
            pipe: false,
        },
        None => {
            let (read, write) = pipe().map_err(internal("output pipe"))?;
            if is_stdout {
                st.child_fds.stdout = Some(write);
            } else {
                st.child_fds.stderr = Some(write);
            }
            Attachment::Output {
                src: File::from(read),
                pipe: true,
            }
        }
    };
    if is_stdout {
        st.stdout_attached = true;
    } else {
        st.stderr_attached = true;
    }
    st.outputs_open += 1;
    Ok(attachment)
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
