//! The virtio-vsock device: moves packets between the virtqueues and the
//! [`Muxer`].
//!
//! Queue work runs on the event-loop thread (see `event_handler.rs`): the
//! tx queue feeds guest packets to the muxer, the rx queue is filled with
//! whatever the muxer has for the guest, and the event queue carries the
//! transport-reset event.

use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory as _;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::Muxer;
use super::packet::{Direction, GuestBuffers, PacketError, VsockPacket};
use super::{
    VsockError, EVQ_INDEX, MAX_PKT_BUF_SIZE, NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX,
    VIRTIO_ID_VSOCK, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VSOCK_PKT_HDR_SIZE,
};
use crate::virtio::{
    add_used, read_config_space, refuse_config_write, signal_used, ActivateError, GuestMemory,
    Interrupt, VirtioDevice,
};

/// The device as log lines name it.
const LOG_NAME: &str = "vsock";

struct Active {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
}

/// A virtio-vsock device bridged to Unix sockets.
pub struct VirtioVsock {
    cid: u64,
    queue_max_sizes: [u16; NUM_QUEUES],
    queue_evts: Vec<Arc<EventFd>>,
    acked_features: u64,
    active: Option<Active>,
    pub(super) muxer: Muxer,
    /// Written when another thread changed what the event loop must watch
    /// (reset, activation, transport reset).
    pub(super) kick_evt: EventFd,
    pub(super) timer: TimerFd,
    timer_deadline: Option<Instant>,
    tx_throttled: bool,
    transport_reset_pending: bool,
}

impl VirtioVsock {
    /// Creates the device for guest `cid` and starts listening on
    /// `uds_path` (which must not exist; it is removed when the device is
    /// dropped).
    pub fn new(cid: u64, uds_path: impl AsRef<Path>) -> Result<Self, VsockError> {
        // 0-2 are reserved; the guest stores its CID in 32 bits and
        // u32::MAX is VMADDR_CID_ANY.
        if cid <= 2 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        let queue_evts = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VsockError::EventFd)?;
        let kick_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd)?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?;
        let muxer = Muxer::new(cid, uds_path.as_ref())?;
        Ok(Self {
            cid,
            queue_max_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queue_evts,
            acked_features: 0,
            active: None,
            muxer,
            kick_evt,
            timer,
            timer_deadline: None,
            tx_throttled: false,
            transport_reset_pending: false,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The Unix socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Tells the guest that every vsock connection is gone
    /// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`), e.g. after a snapshot restore,
    /// and drops ours. The event is delivered now if the guest has posted an
    /// event buffer, otherwise as soon as it does.
    pub fn send_transport_reset(&mut self) {
        self.muxer.reset();
        self.transport_reset_pending = true;
        self.process_evq();
        self.kick();
    }

    fn kick(&self) {
        if let Err(e) = self.kick_evt.write(1) {
            error!("vsock: cannot wake the event loop: {e}");
        }
    }

    pub(super) fn queue_evt(&self, index: usize) -> &EventFd {
        &self.queue_evts[index]
    }

    /// Delivers a pending transport-reset event.
    pub(super) fn process_evq(&mut self) {
        if !self.transport_reset_pending {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let q = &mut active.queues[EVQ_INDEX];
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            debug!("vsock: no event buffer yet for the transport reset");
            return;
        };
        let head = chain.head_index();
        let mut len = 0u32;
        match GuestBuffers::from_chain(chain, Direction::DeviceWritable) {
            Ok(bufs) if bufs.len() >= 4 => {
                match write_event(mem, &bufs, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) {
                    Ok(()) => {
                        len = 4;
                        self.transport_reset_pending = false;
                    }
                    Err(e) => warn!("vsock: cannot write event: {e}"),
                }
            }
            Ok(_) => warn!("vsock: event buffer too small"),
            Err(e) => warn!("vsock: bad event buffer: {e}"),
        }
        add_used(LOG_NAME, q, mem, head, len);
        signal_used(LOG_NAME, q, mem, &active.interrupt);
    }

    /// Feeds the guest's tx packets to the muxer. Returns whether any chain
    /// was consumed.
    pub(super) fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let q = &mut active.queues[TXQ_INDEX];
        let mut used = false;
        self.tx_throttled = false;
        loop {
            // RSTs for the guest pile up when it does not post rx buffers;
            // stop taking its packets until they drain.
            if self.muxer.rst_backlog_full() {
                self.tx_throttled = true;
                break;
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match VsockPacket::from_tx_chain(chain) {
                Ok(pkt) => self.muxer.handle_guest_pkt(pkt),
                Err(e) => warn!("vsock: dropping bad tx packet: {e}"),
            }
            add_used(LOG_NAME, q, mem, head, 0);
            used = true;
        }
        if used {
            signal_used(LOG_NAME, q, mem, &active.interrupt);
        }
        used
    }

    /// Fills rx buffers with packets from the muxer. Returns whether any
    /// chain was used.
    pub(super) fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let q = &mut active.queues[RXQ_INDEX];
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let bufs = match GuestBuffers::from_chain(chain, Direction::DeviceWritable) {
                Ok(b) if b.len() >= VSOCK_PKT_HDR_SIZE => b,
                Ok(b) => {
                    warn!("vsock: rx buffer of {} bytes is too small", b.len());
                    add_used(LOG_NAME, q, mem, head, 0);
                    used = true;
                    continue;
                }
                Err(e) => {
                    warn!("vsock: bad rx buffer: {e}");
                    add_used(LOG_NAME, q, mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let max_payload = (bufs.len() - VSOCK_PKT_HDR_SIZE).min(MAX_PKT_BUF_SIZE);
            let Some(pkt) = self.muxer.next_rx_pkt(max_payload) else {
                // Nothing after all: give the buffer back.
                q.go_to_previous_position();
                break;
            };
            let len = match pkt.write_to(mem, &bufs) {
                Ok(n) => n,
                Err(e) => {
                    // Validated above, so this means memory went away.
                    error!("vsock: cannot write rx packet: {e}");
                    0
                }
            };
            add_used(LOG_NAME, q, mem, head, len);
            used = true;
        }
        if used {
            signal_used(LOG_NAME, q, mem, &active.interrupt);
        }
        used
    }

    /// Runs tx, then rx, until neither can progress.
    pub(crate) fn process_queues(&mut self) {
        self.process_tx();
        self.process_rx_work();
    }

    /// Fills rx, and resumes throttled tx when that drained the backlog.
    /// Rx may have work that no queue event announces (a host stream became
    /// readable, a deadline passed), so this runs after every event.
    pub(super) fn process_rx_work(&mut self) {
        for _ in 0..64 {
            let rx = self.process_rx();
            if !(self.tx_throttled && rx && self.process_tx()) {
                break;
            }
        }
    }

    /// Accepts host clients.
    pub(super) fn accept_clients(&mut self) {
        let ready = self.active.is_some();
        self.muxer.accept_clients(ready, Instant::now());
    }

    /// Arms the timer for the muxer's next deadline. `force` re-arms even if
    /// the deadline did not change (the timer fired: setting it clears its
    /// readiness).
    pub(super) fn rearm_timer(&mut self, force: bool) {
        let next = self.muxer.next_deadline();
        if next == self.timer_deadline && !force {
            return;
        }
        self.timer_deadline = next;
        let result = match next {
            Some(deadline) => {
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            error!("vsock: cannot arm timer: {e}");
        }
    }

    /// The deadline timer's file descriptor.
    pub(super) fn timer_fd(&self) -> i32 {
        self.timer.as_raw_fd()
    }
}

fn write_event(mem: &GuestMemory, bufs: &GuestBuffers, id: u32) -> Result<(), PacketError> {
    // struct virtio_vsock_event { le32 id; }
    bufs.write_at(mem, 0, &id.to_le_bytes())
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        // Stream sockets only: no SEQPACKET. VERSION_1 comes from the
        // transport.
        0
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(LOG_NAME, &self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        refuse_config_write(LOG_NAME, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        ActivateError::check(self.active.is_some(), NUM_QUEUES, queues.len())?;
        debug!(
            "vsock: activated, guest CID {}, {} bytes of memory",
            self.cid,
            mem.last_addr().0
        );
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        // The guest may have queued packets before the event loop noticed.
        self.kick();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.tx_throttled = false;
        self.transport_reset_pending = false;
        self.muxer.reset();
        self.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::IrqLine;

    fn temp_path(tag: &str) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "arrow-vsock-dev-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    #[test]
    fn identity_and_config() {
        let path = temp_path("cfg");
        let dev = VirtioVsock::new(0x1234_5678, &path).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
        assert_eq!(dev.queue_events().len(), 3);
        let mut b8 = [0u8; 8];
        dev.read_config(0, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x1234_5678);
        let mut b4 = [0u8; 4];
        dev.read_config(4, &mut b4);
        assert_eq!(b4, [0; 4]);
        dev.read_config(6, &mut b4);
        assert_eq!(b4, [0; 4], "straddles the end");
        dev.read_config(u64::MAX, &mut b4);
        assert_eq!(b4, [0; 4]);
        // The path is taken while the device lives.
        assert!(VirtioVsock::new(3, &path).is_err());
        drop(dev);
        assert!(!path.exists());
    }

    #[test]
    fn rejects_reserved_cids() {
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(matches!(
                VirtioVsock::new(cid, temp_path("cid")),
                Err(VsockError::InvalidCid(c)) if c == cid
            ));
        }
    }

    #[test]
    fn activate_checks_queue_count_and_twice() {
        let mut dev = VirtioVsock::new(3, temp_path("act")).unwrap();
        let mem = GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        let irq = IrqLine::new(5, EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let interrupt = Arc::new(Interrupt::new(irq));
        let queues = || {
            (0..3)
                .map(|_| Queue::new(QUEUE_SIZE).unwrap())
                .collect::<Vec<_>>()
        };
        assert!(matches!(
            dev.activate(
                mem.clone(),
                interrupt.clone(),
                vec![Queue::new(16).unwrap()]
            ),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 1
            })
        ));
        dev.activate(mem.clone(), interrupt.clone(), queues())
            .unwrap();
        assert!(dev.is_activated());
        assert!(matches!(
            dev.activate(mem.clone(), interrupt.clone(), queues()),
            Err(ActivateError::AlreadyActive)
        ));
        dev.reset();
        assert!(!dev.is_activated());
        dev.activate(mem, interrupt, queues()).unwrap();
    }
}
