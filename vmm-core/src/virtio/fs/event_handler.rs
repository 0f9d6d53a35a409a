//! What wakes the virtio-fs device: the event-manager subscriber, and the
//! queue processing it runs.
//!
//! The device watches its two queue eventfds (written by the transport on
//! `QueueNotify`) and a kick eventfd (written when another thread activated
//! or reset it). Every descriptor chain on a notified queue is one FUSE
//! request, served synchronously on the event-loop thread.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use fuse_backend_rs::abi::fuse_abi::Opcode;
use log::{error, warn};
use virtio_queue::QueueT;

use super::device::{VirtioFs, LOG_NAME};
use super::request::{handle_chain, Served};
use super::{HIPRIO_QUEUE_INDEX, NUM_QUEUES, REQUEST_QUEUE_INDEX};
use crate::virtio::{add_used, drain, signal_used};

impl VirtioFs {
    /// Serves every request waiting on queue `index`. Returns how many
    /// chains were used.
    pub(crate) fn process_queue(&mut self, index: usize) -> usize {
        self.finish_reset();
        let read_only = self.read_only();
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let mem = &active.mem;
        let Some(q) = active.queues.get_mut(index) else {
            return 0;
        };
        let mut used = 0;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let served = handle_chain(&self.server, read_only, mem, chain);
            // Any request but a served DESTROY leaves state behind in the
            // passthrough file system (or may have: a failed request is
            // counted too, to be safe).
            self.session_open = !matches!(
                served,
                Ok(Served { opcode: Some(op), .. }) if op == Opcode::Destroy as u32
            );
            // Plain adds: the event loop is the only writer, under the
            // device's lock.
            self.requests = self.requests.wrapping_add(1);
            let len = match served {
                Ok(served) => {
                    if served.error {
                        self.errors = self.errors.wrapping_add(1);
                    }
                    served.len
                }
                Err(e) => {
                    self.unanswered = self.unanswered.wrapping_add(1);
                    warn!("virtio-fs: queue {index}, chain {head}: {e}");
                    0
                }
            };
            add_used(LOG_NAME, q, mem, head, len);
            used += 1;
        }
        if used > 0 {
            signal_used(LOG_NAME, q, mem, &active.interrupt);
        }
        used
    }

    /// Drops what the guest's previous FUSE session held, if a reset asked.
    pub(super) fn finish_reset(&mut self) {
        if std::mem::take(&mut self.destroy_pending) {
            self.fs_destroy();
        }
    }

    fn process_all(&mut self) {
        for index in 0..NUM_QUEUES {
            self.process_queue(index);
        }
    }
}

impl MutEventSubscriber for VirtioFs {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            self.queue_evt(HIPRIO_QUEUE_INDEX).as_raw_fd(),
            self.queue_evt(REQUEST_QUEUE_INDEX).as_raw_fd(),
            self.kick_evt.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                error!("virtio-fs: cannot watch fd {fd}: {e:?}");
            }
        }
        self.process_all();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.kick_evt.as_raw_fd() {
            drain(&self.kick_evt);
            self.finish_reset();
            self.process_all();
            return;
        }
        for index in [HIPRIO_QUEUE_INDEX, REQUEST_QUEUE_INDEX] {
            if fd == self.queue_evt(index).as_raw_fd() {
                drain(self.queue_evt(index));
                self.process_queue(index);
                return;
            }
        }
        warn!("virtio-fs: event on unknown fd {fd}");
    }
}
