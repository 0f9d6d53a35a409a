//! The agent RPC server: one thread per connection reads `Request` frames
//! and answers each with a `Response`; `WaitProcess` runs on its own thread so
//! it blocks only its own request.

use std::io::{self, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use proto::agent::{
    request::Body, response, ContainerCreated, ContainerFrozen, ContainerRemoved, ContainerUpdated,
    Exited, NetworkConfigured, OomEvent, Pids, Pong, ProcessCreated, ProcessDeleted, Request,
    Response, ShutdownStarted, Signalled, StartProcess, StdinClosed, TtyResized,
};
use proto::{read_frame, write_frame, FrameError};

use crate::clone::{self, ClonePlatform};
use crate::conn::{is_disconnect, Conn, Listener};
use crate::container::pidns::PidNs;
use crate::container::Containers;
use crate::error::AgentError;
use crate::network;
use crate::reaper::ExitStatus;
use crate::supervisor::Supervisor;
use crate::{log_debug, log_error, log_info};

/// Stack of per-connection and per-wait threads (they hold little: a frame
/// buffer and a few small structs).
pub(crate) const THREAD_STACK: usize = 256 * 1024;

/// What `Shutdown` does after replying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnShutdown {
    /// sync, then reboot(RB_AUTOBOOT): the VMM sees the reset and exits.
    PowerOff,
    /// Kill the running processes and exit (host tests).
    Exit,
}

/// The agent: the process table, the containers, what shutdown means here
/// and what InitClone (and a container's hostname) changes (the guest
/// itself, or a fake in host tests).
pub struct Agent {
    supervisor: Arc<Supervisor>,
    containers: Containers,
    on_shutdown: OnShutdown,
    platform: Box<dyn ClonePlatform>,
    /// Whether ConfigureNetwork may change this kernel's network (PID 1 in
    /// the guest); in host-test mode it would change the host's, so it is
    /// refused there.
    guest_network: bool,
}

impl Agent {
    pub fn new(
        supervisor: Arc<Supervisor>,
        containers: Containers,
        on_shutdown: OnShutdown,
        platform: Box<dyn ClonePlatform>,
    ) -> Self {
        Self {
            supervisor,
            containers,
            on_shutdown,
            platform,
            guest_network: false,
        }
    }

    /// Lets ConfigureNetwork configure this kernel's interfaces (only for
    /// PID 1 in the guest).
    pub fn with_guest_network(mut self) -> Self {
        self.guest_network = true;
        self
    }

    /// The process table, shared with the stdio service.
    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }

    fn dispatch(self: &Arc<Self>, req: Request, out: &Arc<Responder>) {
        let sup = &self.supervisor;
        let result = match req.body {
            None => Err(AgentError::InvalidArgument(
                "request body missing or unknown to this agent".into(),
            )),
            Some(Body::WaitProcess(wait)) => {
                let (agent, out2) = (Arc::clone(self), Arc::clone(out));
                let waiter = thread::Builder::new()
                    .name("wait".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || {
                        let result = agent.supervisor.wait(&wait.id).map(exited);
                        out2.send(req.id, result);
                    });
                match waiter {
                    Ok(_) => return,
                    Err(e) => Err(AgentError::Internal {
                        what: "spawn wait thread",
                        source: e,
                    }),
                }
            }
            Some(Body::Shutdown(_)) => {
                out.send(
                    req.id,
                    Ok(response::Result::ShutdownStarted(ShutdownStarted {})),
                );
                self.shut_down();
                return;
            }
            Some(Body::WaitOom(_)) => {
                let (agent, out2) = (Arc::clone(self), Arc::clone(out));
                let waiter = thread::Builder::new()
                    .name("wait-oom".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || agent.wait_oom(req.id, &out2));
                match waiter {
                    Ok(_) => return,
                    Err(e) => Err(AgentError::Internal {
                        what: "spawn wait-oom thread",
                        source: e,
                    }),
                }
            }
            Some(Body::CreateProcess(create)) => {
                let created = if create.container_id.is_empty() {
                    sup.create(&create, None)
                } else {
                    self.containers
                        .with_placement(&create.container_id, |place| {
                            sup.create(&create, Some(place))
                        })
                };
                created.map(|()| response::Result::ProcessCreated(ProcessCreated {}))
            }
            Some(Body::StartProcess(StartProcess { id })) => {
                let started = match sup.container_of(&id) {
                    Ok(Some(container)) => self
                        .containers
                        .start_in(&container, |ns| sup.start(&id, ns)),
                    Ok(None) => sup.start(&id, PidNs::Inherit).map(|s| s.pid),
                    Err(e) => Err(e),
                };
                started.map(|pid| {
                    response::Result::Started(proto::agent::Started {
                        pid: pid.unsigned_abs(),
                    })
                })
            }
            Some(Body::CreateContainer(create)) => self
                .containers
                .create(&create, &*self.platform)
                .map(|()| response::Result::ContainerCreated(ContainerCreated {})),
            Some(Body::RemoveContainer(r)) => self
                .containers
                .remove(&r.id, |id| sup.forget_container(id))
                .map(|()| response::Result::ContainerRemoved(ContainerRemoved {})),
            Some(Body::UpdateContainer(u)) => self
                .containers
                .update(&u.id, &u.resources.unwrap_or_default())
                .map(|()| response::Result::ContainerUpdated(ContainerUpdated {})),
            Some(Body::FreezeContainer(f)) => self
                .containers
                .freeze(&f.id, f.frozen)
                .map(|()| response::Result::ContainerFrozen(ContainerFrozen {})),
            Some(Body::ContainerStats(s)) => {
                self.containers.stats(&s.id).map(response::Result::Stats)
            }
            Some(Body::ListPids(l)) => self
                .containers
                .pids(&l.id)
                .map(|pids| response::Result::Pids(Pids { pids })),
            Some(Body::SignalProcess(s)) => sup
                .signal(&s.id, s.signal, s.all)
                .map(|()| response::Result::Signalled(Signalled {})),
            Some(Body::ResizeTty(r)) => sup
                .resize_tty(&r.id, r.rows, r.cols)
                .map(|()| response::Result::TtyResized(TtyResized {})),
            Some(Body::CloseStdin(c)) => sup
                .close_stdin(&c.id)
                .map(|()| response::Result::StdinClosed(StdinClosed {})),
            Some(Body::DeleteProcess(d)) => sup
                .delete(&d.id)
                .map(|()| response::Result::ProcessDeleted(ProcessDeleted {})),
            Some(Body::InitClone(init)) => clone::init_clone(&*self.platform, &init).map(|done| {
                log_info!(
                    "clone initialised: wall clock was {} ns, {} bytes of entropy, hostname {:?}",
                    done.previous_unix_time_ns,
                    done.entropy_bytes,
                    done.hostname
                );
                response::Result::CloneInitialized(done)
            }),
            Some(Body::ConfigureNetwork(net)) => self
                .configure_network(&net)
                .map(|()| response::Result::NetworkConfigured(NetworkConfigured {})),
            Some(Body::Ping(_)) => Ok(response::Result::Pong(Pong {
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_ms: uptime_ms(),
            })),
        };
        out.send(req.id, result);
    }

    fn configure_network(&self, req: &proto::agent::ConfigureNetwork) -> Result<(), AgentError> {
        if !self.guest_network {
            // Validated all the same, so host tests see the real checks.
            network::plan(req).map_err(AgentError::InvalidArgument)?;
            return Err(AgentError::FailedPrecondition(
                "ConfigureNetwork only runs in a guest (this agent serves host tests)".into(),
            ));
        }
        network::configure(req)?;
        log_info!(
            "network configured: {} interface(s), {} route(s)",
            req.interfaces.len(),
            req.routes.len()
        );
        Ok(())
    }

    /// WaitOom, on its own thread: answers with the next OOM kill, or
    /// gives up once the connection is gone (a kill taken but not sent is
    /// put back for the next WaitOom).
    fn wait_oom(&self, id: u64, out: &Responder) {
        let still_wanted =
            || !out.closed.load(Ordering::Relaxed) && !out.gone.load(Ordering::Relaxed);
        let Some(container_id) = self.containers.wait_oom(still_wanted) else {
            return;
        };
        let event = response::Result::OomEvent(OomEvent {
            container_id: container_id.clone(),
        });
        if !out.send(id, Ok(event)) {
            self.containers.requeue_oom(container_id);
        }
    }

    fn shut_down(&self) {
        match self.on_shutdown {
            OnShutdown::PowerOff => power_off(),
            OnShutdown::Exit => {
                log_info!("shutdown requested, exiting");
                self.supervisor.kill_all();
                // Host tests: leave no mount or cgroup behind.
                self.containers
                    .remove_all(|id| self.supervisor.forget_container(id));
                std::process::exit(0);
            }
        }
    }
}

/// Syncs and resets the VM. Returns only if the reboot call failed (PID 1
/// then keeps serving).
pub fn power_off() {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT) {
        Ok(never) => match never {},
        Err(e) => log_error!("reboot: {e}"),
    }
}

fn exited(status: ExitStatus) -> response::Result {
    response::Result::Exited(match status {
        ExitStatus::Exited(code) => Exited {
            exit_code: code,
            signal: 0,
        },
        ExitStatus::Signalled(signal) => Exited {
            exit_code: -1,
            signal,
        },
    })
}

/// Milliseconds since boot (CLOCK_BOOTTIME; a vDSO call, no kernel entry).
/// Read at every call, never cached: in a clone it continues from the
/// template's uptime and is never stepped like the wall clock.
fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into our local.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000
}

/// The write half of an RPC connection, shared by the connection's reader
/// and its wait threads; one frame is written at a time.
struct Responder {
    conn: Arc<Conn>,
    lock: Mutex<()>,
    /// Set once a write found the connection gone: later answers (waits
    /// finishing after a reset) are dropped without a system call.
    gone: AtomicBool,
    /// Set when the connection's reader stopped (the host closed it, or it
    /// broke): calls still waiting give up.
    closed: AtomicBool,
}

impl Responder {
    /// Sends the answer to call `id`; returns whether it was written.
    fn send(&self, id: u64, result: Result<response::Result, AgentError>) -> bool {
        let result = result.unwrap_or_else(|e| {
            log_debug!("request {id}: {e}");
            response::Result::Error(e.to_wire())
        });
        let resp = Response {
            id,
            result: Some(result),
        };
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if self.gone.load(Ordering::Relaxed) {
            return false;
        }
        if let Err(e) = write_frame(&mut &*self.conn, &resp) {
            log_debug!("response {id} not sent: {e}");
            if matches!(&e, FrameError::Io(io) if is_disconnect(io)) {
                self.gone.store(true, Ordering::Relaxed);
            }
            return false;
        }
        true
    }
}

/// Accepts RPC connections forever; returns only if accepting fails for
/// good.
pub fn serve(agent: Arc<Agent>, listener: Listener) -> io::Error {
    accept_loop(&listener, "agent", move |conn| {
        let agent = Arc::clone(&agent);
        move || serve_connection(&agent, conn)
    })
}

/// Serves one RPC connection until the host closes it or sends a frame
/// that does not decode; then wakes this connection's long polls and shuts
/// the socket down. Public so the fuzz target can drive the real request
/// handling in-process, one connection per input.
pub fn serve_connection(agent: &Arc<Agent>, conn: Conn) {
    let conn = Arc::new(conn);
    let out = Arc::new(Responder {
        conn: Arc::clone(&conn),
        lock: Mutex::new(()),
        gone: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    // Buffered: a frame's header and body usually arrive in one read.
    let mut reader = BufReader::with_capacity(8 * 1024, &*conn);
    loop {
        match read_frame::<Request, _>(&mut reader) {
            Ok(Some(req)) => agent.dispatch(req, &out),
            Ok(None) => break,
            // Expected after a snapshot restore (vsock transport reset) or
            // when the host goes away: not worth a kmsg record.
            Err(FrameError::Io(e)) if is_disconnect(&e) => {
                log_debug!("agent connection ended: {e}");
                break;
            }
            Err(e) => {
                log_info!("dropping agent connection: {e}");
                break;
            }
        }
    }
    out.closed.store(true, Ordering::Relaxed);
    // A WaitOom of this connection stops waiting.
    agent.containers.wake_oom_waiters();
    // Waits still in flight hold the fd; make sure the peer sees the end now.
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

/// Runs `handler(conn)` on a new thread for every accepted connection.
/// Failed accepts (an aborted pending connection, a vsock transport reset,
/// out of fds or memory) and failed thread starts are logged and retried
/// with [`Backoff`], so PID 1 never spins; returns the error only when the
/// listener itself is broken.
pub(crate) fn accept_loop<H, F>(listener: &Listener, name: &str, mut handler: H) -> io::Error
where
    H: FnMut(Conn) -> F,
    F: FnOnce() + Send + 'static,
{
    let mut backoff = Backoff::default();
    loop {
        let failed = match listener.accept() {
            Ok(conn) => {
                let spawned = thread::Builder::new()
                    .name(format!("{name}-conn"))
                    .stack_size(THREAD_STACK)
                    .spawn(handler(conn));
                match spawned {
                    Ok(_) => {
                        backoff.reset();
                        continue;
                    }
                    Err(e) => {
                        log_error!("{name}: cannot start connection thread: {e}");
                        e
                    }
                }
            }
            Err(e) if listener_is_broken(&e) => return e,
            Err(e) => {
                if is_disconnect(&e) || e.raw_os_error() == Some(libc::EPROTO) {
                    log_debug!("{name}: accept: {e}");
                } else {
                    log_error!("{name}: accept: {e}");
                }
                e
            }
        };
        let pause = backoff.next_delay();
        if !pause.is_zero() {
            log_debug!("{name}: {failed}; retrying in {pause:?}");
            thread::sleep(pause);
        }
    }
}

/// Errors after which accept(2) can never succeed on this socket.
fn listener_is_broken(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP)
    )
}

/// Delay before retrying after consecutive failures: none after the first
/// (one aborted connection is routine), then 10 ms doubling up to 1 s.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        match self.failures {
            1 => Duration::ZERO,
            n => Self::FIRST
                .saturating_mul(1 << (n - 2).min(16))
                .min(Self::MAX),
        }
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let ms: Vec<u128> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ms, [0, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        for _ in 0..100 {
            assert!(b.next_delay() <= Backoff::MAX);
        }
        b.reset();
        assert_eq!(b.next_delay(), Duration::ZERO);
    }

    #[test]
    fn disconnects_are_not_broken_listeners() {
        for errno in [
            libc::ECONNRESET,
            libc::ECONNABORTED,
            libc::EPIPE,
            libc::ENOTCONN,
        ] {
            let err = io::Error::from_raw_os_error(errno);
            assert!(is_disconnect(&err));
            assert!(!listener_is_broken(&err));
        }
        assert!(listener_is_broken(&io::Error::from_raw_os_error(
            libc::EBADF
        )));
        assert!(!is_disconnect(&io::Error::from_raw_os_error(libc::EMFILE)));
    }

    /// An accept loop whose listener failed keeps failing without spinning.
    #[test]
    fn broken_listener_ends_the_loop() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // A connected socket is not listening: accept says EINVAL.
        let listener = Listener::from_fd(a.into());
        let err = accept_loop(&listener, "test", |_conn| || {});
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
