//! The 16550 console on COM1. Its output goes to a writer chosen by the VMM's
//! user (a file, a pipe, stderr, nothing); the last few KiB are also kept in
//! memory so a VM that dies can say why (e.g. a kernel panic message).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart16550, Trigger};

use super::bus::BusDevice;
use super::irq::IrqLine;

/// Bytes of console output kept for diagnostics.
pub const CONSOLE_TAIL_BYTES: usize = 16 * 1024;

/// The tail of the guest console, shared with whoever reports a VM's end.
#[derive(Clone, Default)]
pub struct ConsoleTail {
    buf: Arc<Mutex<VecDeque<u8>>>,
}

impl ConsoleTail {
    fn push(&self, data: &[u8]) {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        buf.extend(data);
        let excess = buf.len().saturating_sub(CONSOLE_TAIL_BYTES);
        buf.drain(..excess);
    }

    /// The kept output, lossily decoded.
    pub fn text(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = buf.as_slices();
        let mut bytes = a.to_vec();
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The kernel's panic line, if the console shows one.
    pub fn kernel_panic(&self) -> Option<String> {
        let text = self.text();
        let start = text.find("Kernel panic")?;
        Some(
            text[start..]
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        )
    }
}

/// Where console output goes, besides the in-memory tail.
struct ConsoleWriter {
    out: Option<Box<dyn Write + Send>>,
    tail: ConsoleTail,
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tail.push(data);
        if let Some(out) = self.out.as_mut() {
            // A console reader that went away must not stop the guest.
            if out.write_all(data).is_err() {
                self.out = None;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(out) = self.out.as_mut() {
            let _ = out.flush();
        }
        Ok(())
    }
}

/// Raises the UART's interrupt through its irqfd.
struct IrqTrigger(IrqLine);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The UART's registers and receive FIFO, for snapshots (vm-superio's
/// `SerialState` has no serde support).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1: a 16550 UART from vm-superio on the port I/O bus.
pub struct SerialConsole {
    uart: Uart16550<IrqTrigger, NoEvents, ConsoleWriter>,
}

impl SerialConsole {
    /// Creates the console; `out` of `None` drops output (the tail is kept).
    pub fn new(irq: IrqLine, out: Option<Box<dyn Write + Send>>, tail: ConsoleTail) -> Self {
        Self {
            uart: Uart16550::new(IrqTrigger(irq), ConsoleWriter { out, tail }),
        }
    }
}

impl SerialConsole {
    /// The UART's state for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        self.uart.state().into()
    }

    /// A console in the saved state, writing to `out`.
    pub fn restore(
        state: &SerialSnapshot,
        irq: IrqLine,
        out: Option<Box<dyn Write + Send>>,
        tail: ConsoleTail,
    ) -> Result<Self, String> {
        Uart16550::from_state(
            &state.into(),
            IrqTrigger(irq),
            NoEvents,
            ConsoleWriter { out, tail },
        )
        .map(|uart| Self { uart })
        .map_err(|e| format!("restoring the serial console: {e:?}"))
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(offset, *byte) {
                log::warn!("serial console write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console(out: Option<Box<dyn Write + Send>>) -> (SerialConsole, ConsoleTail) {
        let tail = ConsoleTail::default();
        let irq = IrqLine::new(4, EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (SerialConsole::new(irq, out, tail.clone()), tail)
    }

    #[test]
    fn bytes_written_to_thr_reach_writer_and_tail() {
        let shared = Shared::default();
        let (mut dev, tail) = console(Some(Box::new(shared.clone())));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*shared.0.lock().unwrap(), b"hi\n");
        assert_eq!(tail.text(), "hi\n");
    }

    #[test]
    fn tail_is_bounded_and_finds_panics() {
        let (mut dev, tail) = console(None);
        for _ in 0..CONSOLE_TAIL_BYTES {
            dev.write(0, b"x");
        }
        for b in b"\nKernel panic - not syncing: VFS\nmore\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(tail.text().len(), CONSOLE_TAIL_BYTES);
        assert_eq!(
            tail.kernel_panic().as_deref(),
            Some("Kernel panic - not syncing: VFS")
        );
    }

    #[test]
    fn state_round_trips() {
        let (mut dev, _) = console(None);
        dev.write(7, &[0x5a]); // scratch register
        dev.write(3, &[0x03]); // line control
        let state = dev.save();
        let irq = IrqLine::new(4, EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut back = SerialConsole::restore(&state, irq, None, ConsoleTail::default()).unwrap();
        let mut b = [0u8];
        back.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        assert_eq!(back.save(), state);
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let (mut dev, tail) = console(None);
        dev.write(0, b"ab");
        dev.write(u64::MAX, b"a");
        let mut wide = [0xffu8; 4];
        dev.read(5, &mut wide);
        assert_eq!(wide, [0; 4]);
        assert_eq!(tail.text(), "");
    }
}
