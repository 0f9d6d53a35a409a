//! The VMM's end of the shim's control channel ([`proto::vmm_control`]):
//! an inherited socket (`--control-fd N`), no path, so only the shim that
//! started this VMM can speak on it.
//!
//! A reader thread (a watcher) takes the shim's requests: `Stop`, and the
//! channel's end (the shim died), cancel at once, whatever the VM is
//! doing; the others wait for the controller (main) thread, which alone
//! touches the running VM. Replies are whole lines written with one call,
//! so the two threads never interleave inside one.

use std::fs::File;
use std::io::BufReader;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use proto::vmm_control::{self, ControlError, ControlRequest, VmmMessage};
use vmm_core::cancel::Cancel;
use vmm_core::vm::Vm;

use crate::seccomp::{SeccompPolicy, VmmThread};

/// How long the vCPUs get to park on `Pause`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the controller thread waits for once the VM runs.
pub enum Event {
    /// A request from the shim, for the controller to answer.
    Request(ControlRequest),
    /// The VM ended.
    Exited(vmm_core::exit::VmExit),
}

/// The VMM's end of the channel.
pub struct ControlChannel {
    socket: Arc<File>,
}

impl ControlChannel {
    /// Claims the inherited descriptor `fd`, which must be an open socket.
    pub fn from_inherited(fd: RawFd) -> anyhow::Result<Self> {
        if fd <= 2 {
            bail!("--control-fd {fd}: not a descriptor above stderr");
        }
        // SAFETY: fstat only writes the stat buffer it is given.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `stat` is a valid, writable stat buffer; an fd that is not
        // open just fails with EBADF.
        if unsafe { libc::fstat(fd, &mut stat) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("--control-fd {fd}"));
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            bail!("--control-fd {fd}: not a socket");
        }
        // SAFETY: the descriptor is open (checked above), was inherited for
        // this purpose, and this is the only place that claims it, once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            socket: Arc::new(File::from(owned)),
        })
    }

    /// Sends one message to the shim.
    pub fn send(&self, msg: &VmmMessage) -> Result<(), ControlError> {
        vmm_control::write_message(&mut &*self.socket, msg)
    }

    /// Starts the reader thread: `Stop` and the channel's end cancel the
    /// VM (`Stop` is answered first); every other request goes to
    /// `events`, for the controller.
    pub fn serve(
        &self,
        events: Sender<Event>,
        cancel: Arc<Cancel>,
        seccomp: Option<Arc<SeccompPolicy>>,
    ) -> anyhow::Result<()> {
        let socket = self.socket.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                if let Some(Err(e)) = seccomp.map(|p| p.apply(VmmThread::Watcher)) {
                    cancel.request(format!("{e:#}"));
                    return;
                }
                let reason = read_requests(&socket, &events);
                cancel.request(reason);
            })
            .context("starting the control thread")?;
        Ok(())
    }
}

/// Reads requests until `Stop`, the channel's end or a bad line; returns
/// why the VM must stop.
fn read_requests(socket: &File, events: &Sender<Event>) -> String {
    let mut reader = BufReader::new(socket);
    loop {
        match vmm_control::read_message::<ControlRequest>(&mut reader) {
            Ok(ControlRequest::Stop) => {
                // Answered before the stop: the shim then waits for the exit.
                let _ = vmm_control::write_message(&mut &*socket, &VmmMessage::Done);
                return "stop requested by the shim".into();
            }
            Ok(request) => {
                if events.send(Event::Request(request)).is_err() {
                    // The controller is gone: the VMM is ending anyway.
                    return "the controller ended".into();
                }
            }
            Err(ControlError::Closed) => return "the shim's control channel closed".into(),
            Err(e) => {
                // A shim speaking another protocol version, or garbage:
                // nothing more on this channel can be trusted.
                let _ = vmm_control::write_message(
                    &mut &*socket,
                    &VmmMessage::Failed(format!("{e}; stopping")),
                );
                return format!("control channel: {e}");
            }
        }
    }
}

/// The controller's answer to `request` for the running `vm`.
pub fn answer(vm: &Vm, request: ControlRequest) -> VmmMessage {
    match request {
        ControlRequest::Pause => match vm.pause(PAUSE_TIMEOUT) {
            Ok(()) => VmmMessage::Done,
            Err(e) => VmmMessage::Failed(e.to_string()),
        },
        ControlRequest::Resume => {
            vm.resume();
            VmmMessage::Done
        }
        ControlRequest::Counters => {
            VmmMessage::Counters(crate::counters::counters(vm.net_stats(), vm.fs_stats()))
        }
        // Served by the reader thread; never queued.
        ControlRequest::Stop => VmmMessage::Failed("Stop is not the controller's".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Instant;

    fn channel() -> (ControlChannel, BufReader<UnixStream>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let channel = ControlChannel::from_inherited(theirs.into_raw_fd()).unwrap();
        (channel, BufReader::new(ours))
    }

    fn wait_for_reason(cancel: &Cancel) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(reason) = cancel.reason() {
                return reason;
            }
            assert!(Instant::now() < deadline, "no cancel");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn only_open_sockets_are_claimed() {
        assert!(ControlChannel::from_inherited(1).is_err());
        assert!(ControlChannel::from_inherited(999_999).is_err());
        let file = File::open("/proc/self/stat").unwrap();
        let err = ControlChannel::from_inherited(file.into_raw_fd())
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
    }

    #[test]
    fn requests_reach_the_controller_and_stop_cancels_after_its_reply() {
        let (channel, mut shim) = channel();
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(Cancel::default());
        channel.serve(tx, cancel.clone(), None).unwrap();
        channel
            .send(&VmmMessage::Ready(proto::vmm_ready::VmmReady {
                ready: true,
                cloned: false,
                pid: 1,
                vsock_uds: "/x".into(),
                ready_ms: 0,
            }))
            .unwrap();
        assert!(matches!(
            vmm_control::read_message::<VmmMessage>(&mut shim).unwrap(),
            VmmMessage::Ready(_)
        ));
        for request in [ControlRequest::Pause, ControlRequest::Counters] {
            vmm_control::write_message(shim.get_mut(), &request).unwrap();
            match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
                Event::Request(got) => assert_eq!(got, request),
                Event::Exited(_) => panic!("no exit expected"),
            }
        }
        assert!(cancel.reason().is_none());
        vmm_control::write_message(shim.get_mut(), &ControlRequest::Stop).unwrap();
        assert_eq!(
            vmm_control::read_message::<VmmMessage>(&mut shim).unwrap(),
            VmmMessage::Done
        );
        assert_eq!(wait_for_reason(&cancel), "stop requested by the shim");
    }

    #[test]
    fn the_shims_end_closing_cancels() {
        let (channel, shim) = channel();
        let (tx, _rx) = mpsc::channel();
        let cancel = Arc::new(Cancel::default());
        channel.serve(tx, cancel.clone(), None).unwrap();
        drop(shim);
        assert_eq!(
            wait_for_reason(&cancel),
            "the shim's control channel closed"
        );
    }

    #[test]
    fn garbage_is_answered_and_cancels() {
        let (channel, mut shim) = channel();
        let (tx, _rx) = mpsc::channel();
        let cancel = Arc::new(Cancel::default());
        channel.serve(tx, cancel.clone(), None).unwrap();
        std::io::Write::write_all(shim.get_mut(), b"\"reboot\"\n").unwrap();
        let mut line = String::new();
        shim.read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"failed\""), "{line}");
        assert!(wait_for_reason(&cancel).starts_with("control channel: bad control message"));
    }
}
