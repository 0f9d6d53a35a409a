//! What wakes the virtio-net device: the event-manager subscriber.
//!
//! The device watches its two queue eventfds (written by the transport on
//! `QueueNotify`), a kick eventfd (written when another thread activated or
//! reset it) and the tap. The tap is watched for `EPOLLIN` only while the
//! device is active and the guest has rx buffers (a frame that found none
//! waits until the guest notifies the rx queue), and for `EPOLLOUT` only
//! while a guest frame waits for room in the tap. A tap that reports an
//! error (its interface was deleted) is no longer watched.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{error, warn};

use super::device::VirtioNet;
use super::{RXQ_INDEX, TXQ_INDEX};
use crate::virtio::drain;

impl VirtioNet {
    /// What the tap should be watched for now.
    fn wanted_tap_interest(&self) -> Option<EventSet> {
        if self.active.is_none() || self.tap_broken {
            return None;
        }
        let mut set = EventSet::empty();
        if !self.rx_needs_buffers && self.rx_hold_since.is_none() {
            set |= EventSet::IN;
        }
        if self.tx_blocked {
            set |= EventSet::OUT;
        }
        (!set.is_empty()).then_some(set)
    }

    /// Brings the epoll registration of the tap in line with the state.
    fn sync_tap_interest(&mut self, ops: &mut EventOps) {
        let want = self.wanted_tap_interest();
        if want == self.tap_interest {
            return;
        }
        let fd = self.tap.as_raw_fd();
        let result = match (self.tap_interest, want) {
            (None, Some(set)) => ops.add(Events::new_raw(fd, set)),
            (Some(_), Some(set)) => ops.modify(Events::new_raw(fd, set)),
            (Some(_), None) => ops.remove(Events::empty_raw(fd)),
            (None, None) => Ok(()),
        };
        match result {
            Ok(()) => self.tap_interest = want,
            Err(e) => error!("virtio-net: epoll update for the tap failed: {e:?}"),
        }
    }
}

impl MutEventSubscriber for VirtioNet {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.queue_evt(RXQ_INDEX).as_raw_fd(),
            self.queue_evt(TXQ_INDEX).as_raw_fd(),
            self.kick_evt.as_raw_fd(),
            self.rx_hold_timer.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!("virtio-net: cannot watch fd {fd}: {e:?}");
            }
        }
        self.process_tx();
        self.process_rx();
        self.sync_tap_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        if fd == self.queue_evt(RXQ_INDEX).as_raw_fd() {
            drain(self.queue_evt(RXQ_INDEX));
            // New buffers: a waiting frame goes first, then the tap.
            self.process_rx();
        } else if fd == self.queue_evt(TXQ_INDEX).as_raw_fd() {
            drain(self.queue_evt(TXQ_INDEX));
            self.process_tx();
        } else if fd == self.kick_evt.as_raw_fd() {
            drain(&self.kick_evt);
            self.process_tx();
            self.process_rx();
        } else if fd == self.rx_hold_timer.as_raw_fd() {
            // Reading clears it; `process_rx` re-arms it if it holds on.
            let _ = self.rx_hold_timer.wait();
            self.process_rx();
        } else if fd == self.tap.as_raw_fd() {
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                // A tap reports an error only once its interface is gone;
                // epoll would report it again at once, forever.
                error!(
                    "virtio-net: tap {} failed ({set:?}); the NIC is disconnected",
                    self.tap.name()
                );
                self.tap_broken = true;
            } else {
                if set.contains(EventSet::OUT) {
                    self.process_tx();
                }
                if set.contains(EventSet::IN) {
                    self.process_rx();
                }
            }
        } else {
            warn!("virtio-net: event on unknown fd {fd}");
        }
        self.sync_tap_interest(ops);
    }
}
