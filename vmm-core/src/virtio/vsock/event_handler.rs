//! What wakes the vsock device: the event-manager subscriber.
//!
//! The device watches its three queue eventfds (written by the transport on
//! `QueueNotify`), a kick eventfd (written when another thread reset or
//! activated it), a deadline timer, the Unix listener and every host stream.
//! After each event it fills rx with whatever became ready and brings the
//! epoll set in line with the connections (`EPOLLIN` only while the guest
//! has credit, `EPOLLOUT` only while data waits for the host).

use std::os::unix::io::AsRawFd;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use super::device::VirtioVsock;
use super::muxer::FdOp;
use super::{EVQ_INDEX, RXQ_INDEX, TXQ_INDEX};
use crate::virtio::{drain, VirtioDevice};

impl VirtioVsock {
    /// Applies the muxer's epoll changes; repeats rx once if a failed
    /// registration reset a connection.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        for _ in 0..2 {
            let killed = self.muxer.sync_interest(|op| {
                let result = match op {
                    FdOp::Add(fd, set) => ops.add(Events::new_raw(fd, set)),
                    FdOp::Modify(fd, set) => ops.modify(Events::new_raw(fd, set)),
                    FdOp::Remove(fd) => ops.remove(Events::empty_raw(fd)),
                };
                result
                    .map_err(|e| warn!("vsock: epoll update {op:?} failed: {e:?}"))
                    .is_ok()
            });
            if !killed {
                break;
            }
            self.process_rx_work();
        }
    }

    fn after_event(&mut self, ops: &mut EventOps, timer_fired: bool) {
        self.process_rx_work();
        self.sync_interest(ops);
        self.rearm_timer(timer_fired);
    }
}

impl MutEventSubscriber for VirtioVsock {
    fn init(&mut self, ops: &mut EventOps) {
        let fixed = [
            self.queue_evt(RXQ_INDEX).as_raw_fd(),
            self.queue_evt(TXQ_INDEX).as_raw_fd(),
            self.queue_evt(EVQ_INDEX).as_raw_fd(),
            self.kick_evt.as_raw_fd(),
            self.timer_fd(),
            self.muxer.listener_fd(),
        ];
        for fd in fixed {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!("vsock: cannot watch fd {fd}: {e:?}");
            }
        }
        self.after_event(ops, false);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        let mut timer_fired = false;
        if fd == self.queue_evt(RXQ_INDEX).as_raw_fd() {
            drain(self.queue_evt(RXQ_INDEX));
            self.process_rx_work();
        } else if fd == self.queue_evt(TXQ_INDEX).as_raw_fd() {
            drain(self.queue_evt(TXQ_INDEX));
            self.process_queues();
        } else if fd == self.queue_evt(EVQ_INDEX).as_raw_fd() {
            drain(self.queue_evt(EVQ_INDEX));
            self.process_evq();
        } else if fd == self.kick_evt.as_raw_fd() {
            drain(&self.kick_evt);
            // Whatever changed, look at every queue.
            self.process_evq();
            self.process_queues();
        } else if fd == self.timer_fd() {
            timer_fired = true;
            self.muxer.check_deadlines(Instant::now());
        } else if fd == self.muxer.listener_fd() {
            self.accept_clients();
        } else {
            let ready = self.is_activated();
            self.muxer.notify_fd(fd, set, ready, Instant::now());
        }
        self.after_event(ops, timer_fired);
    }
}
