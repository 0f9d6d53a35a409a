//! The legacy devices a guest reaches through port I/O: the 16550 serial
//! console and the i8042 on a bus, with register reads and writes of any
//! port and width; the bus itself with arbitrary device ranges.
//!
//! Oracles: the bus takes a range exactly when it overlaps none it has and
//! routes an access exactly when a range holds its address; the console
//! keeps at most its tail; the serial state survives a save and restore.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

use vmm_core::devices::bus::{Bus, BusDevice};
use vmm_core::devices::i8042::I8042;
use vmm_core::devices::irq::IrqLine;
use vmm_core::devices::serial::{ConsoleTail, SerialConsole, CONSOLE_TAIL_BYTES};
use vmm_core::exit::ExitNotifier;
use vmm_sys_util::eventfd::EventFd;

const COM1: u64 = 0x3f8;
const I8042_BASE: u64 = 0x60;

#[derive(Arbitrary, Debug)]
enum Op {
    /// An access near the devices (`port` from 0x50), or anywhere.
    Read { port: u16, width: u8, raw: bool },
    Write {
        port: u16,
        width: u8,
        value: u64,
        raw: bool,
    },
    /// Another device range on the bus.
    Insert { base: u64, len: u64 },
    /// Save the serial state and restore it into a fresh console.
    SaveRestore,
}

struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

fn irq() -> IrqLine {
    IrqLine::new(4, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
}

fuzz_target!(|ops: Vec<Op>| {
    if ops.len() > 512 {
        return;
    }
    let tail = ConsoleTail::default();
    let serial = Arc::new(Mutex::new(SerialConsole::new(irq(), None, tail.clone())));
    let mut bus = Bus::new();
    let mut ranges: Vec<(u64, u64)> = vec![(COM1, 8), (I8042_BASE, 5)];
    bus.insert(serial.clone(), COM1, 8).expect("COM1");
    bus.insert(
        Arc::new(Mutex::new(I8042::new(ExitNotifier::new()))),
        I8042_BASE,
        5,
    )
    .expect("i8042");

    let held =
        |ranges: &[(u64, u64)], addr: u64| ranges.iter().any(|&(b, l)| addr >= b && addr - b < l);
    for op in ops {
        match op {
            Op::Read { port, width, raw } => {
                let addr = if raw {
                    u64::from(port)
                } else {
                    0x50 + u64::from(port % 0x3b0)
                };
                let mut data = vec![0xffu8; usize::from(width % 8) + 1];
                assert_eq!(bus.read(addr, &mut data), held(&ranges, addr));
            }
            Op::Write {
                port,
                width,
                value,
                raw,
            } => {
                let addr = if raw {
                    u64::from(port)
                } else {
                    0x50 + u64::from(port % 0x3b0)
                };
                let n = usize::from(width % 8) + 1;
                assert_eq!(
                    bus.write(addr, &value.to_le_bytes()[..n]),
                    held(&ranges, addr)
                );
            }
            Op::Insert { base, len } => {
                let overlaps = len == 0
                    || base.checked_add(len).is_none()
                    || ranges.iter().any(|&(b, l)| base < b + l && b < base + len);
                let r = bus.insert(Arc::new(Mutex::new(Sink)), base, len);
                assert_eq!(
                    r.is_err(),
                    overlaps,
                    "insert {base:#x}+{len:#x} into {ranges:x?}"
                );
                if r.is_ok() {
                    ranges.push((base, len));
                }
            }
            Op::SaveRestore => {
                let state = serial.lock().expect("not poisoned").save();
                let restored = SerialConsole::restore(&state, irq(), None, ConsoleTail::default())
                    .expect("a saved state restores");
                assert_eq!(restored.save(), state);
            }
        }
        assert!(tail.text().len() <= CONSOLE_TAIL_BYTES * 3, "tail grew");
    }
});
