//! Interrupt lines into the in-kernel irqchip.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line: an `EventFd` registered with KVM as an
/// irqfd for one GSI, so raising it never needs a vCPU exit.
#[derive(Clone)]
pub struct IrqLine {
    gsi: u32,
    evt: Arc<EventFd>,
}

impl IrqLine {
    /// Wraps an eventfd that the caller registered (or will register) as the
    /// irqfd of `gsi`.
    pub fn new(gsi: u32, evt: EventFd) -> Self {
        Self {
            gsi,
            evt: Arc::new(evt),
        }
    }

    /// The GSI this line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd behind the line, for irqfd registration.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}
