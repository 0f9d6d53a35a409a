//! The virtio-mmio transport in front of a real vsock device: register
//! reads and writes of any offset, width (1 to 8 bytes) and value, mixed
//! with a well-behaved driver's initialisation (so the fuzzer gets past it)
//! and guest packets on the activated queues.
//!
//! Oracles: the identification registers never change, the status is
//! always one the initialisation sequence can reach, the device is active
//! exactly when DRIVER_OK is set without NEEDS_RESET, and a reset clears
//! the interrupt status.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_mmio as regs;

use arrow_fuzz::{fill_data, guest_memory, publish, Desc, ScratchDir, RINGS};
use vmm_core::devices::bus::BusDevice;
use vmm_core::devices::irq::IrqLine;
use vmm_core::fuzzing::{vsock_process_queues, GuestQueue, QSIZE};
use vmm_core::virtio::mmio::{MmioTransport, MMIO_MAGIC_VALUE, MMIO_VERSION, VENDOR_ID};
use vmm_core::virtio::vsock::VirtioVsock;
use vmm_core::virtio::{status, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Step {
    Read {
        offset: u16,
        width: u8,
    },
    Write {
        offset: u16,
        width: u8,
        value: u64,
    },
    /// ACKNOWLEDGE, DRIVER, features (`None`: all offered), FEATURES_OK,
    /// the three queues at their rings, DRIVER_OK.
    Init {
        features: Option<u64>,
        queue_size: Option<u16>,
    },
    /// A chain on queue `q` (0 rx, 1 tx, 2 event), then a notify and the
    /// device's queue work.
    Chain {
        q: u8,
        data: Vec<u8>,
        descs: Vec<Desc>,
    },
}

fn reg_write(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

fn reg_read(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

fuzz_target!(|steps: Vec<Step>| {
    if steps.len() > 64 {
        return;
    }
    let dir = ScratchDir::new("mmio");
    let mem = guest_memory();
    let mut queues: Vec<GuestQueue<'_>> = (0..3)
        .map(|i| GuestQueue::new(&mem, RINGS + 0x1000 * i))
        .collect();
    let dev = Arc::new(Mutex::new(
        VirtioVsock::new(3, dir.path().join("v")).expect("vsock device"),
    ));
    let irq = IrqLine::new(5, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
    let as_dyn: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
    let mut t = MmioTransport::new(mem.clone(), as_dyn, irq);

    for step in steps {
        match step {
            Step::Read { offset, width } => {
                let mut data = vec![0u8; usize::from(width % 8) + 1];
                t.read(u64::from(offset % 0x1100), &mut data);
            }
            Step::Write {
                offset,
                width,
                value,
            } => {
                let n = usize::from(width % 8) + 1;
                t.write(u64::from(offset % 0x1100), &value.to_le_bytes()[..n]);
            }
            Step::Init {
                features,
                queue_size,
            } => {
                reg_write(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
                reg_write(&mut t, regs::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
                reg_write(
                    &mut t,
                    regs::VIRTIO_MMIO_STATUS,
                    status::ACKNOWLEDGE | status::DRIVER,
                );
                let mut offered = 0u64;
                for sel in 0..2u32 {
                    reg_write(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel);
                    offered |= u64::from(reg_read(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES))
                        << (32 * sel);
                }
                let want = features.unwrap_or(offered);
                for sel in 0..2u32 {
                    reg_write(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                    reg_write(
                        &mut t,
                        regs::VIRTIO_MMIO_DRIVER_FEATURES,
                        (want >> (32 * sel)) as u32,
                    );
                }
                reg_write(
                    &mut t,
                    regs::VIRTIO_MMIO_STATUS,
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
                );
                for (i, q) in queues.iter().enumerate() {
                    reg_write(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, i as u32);
                    let size = queue_size.map_or(u32::from(QSIZE), u32::from);
                    reg_write(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM, size);
                    for (lo, hi, addr) in [
                        (
                            regs::VIRTIO_MMIO_QUEUE_DESC_LOW,
                            regs::VIRTIO_MMIO_QUEUE_DESC_HIGH,
                            q.mock.desc_table_addr().0,
                        ),
                        (
                            regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                            regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                            q.mock.avail_addr().0,
                        ),
                        (
                            regs::VIRTIO_MMIO_QUEUE_USED_LOW,
                            regs::VIRTIO_MMIO_QUEUE_USED_HIGH,
                            q.mock.used_addr().0,
                        ),
                    ] {
                        reg_write(&mut t, lo, addr as u32);
                        reg_write(&mut t, hi, (addr >> 32) as u32);
                    }
                    reg_write(&mut t, regs::VIRTIO_MMIO_QUEUE_READY, 1);
                }
                reg_write(
                    &mut t,
                    regs::VIRTIO_MMIO_STATUS,
                    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
                );
            }
            Step::Chain { q, data, descs } => {
                if descs.is_empty() || descs.len() > 16 {
                    continue;
                }
                let q = usize::from(q % 3);
                fill_data(&mem, &data);
                publish(&mut queues[q], &descs);
                reg_write(&mut t, regs::VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
                let mut d = dev.lock().expect("not poisoned");
                if d.is_activated() {
                    vsock_process_queues(&mut d);
                }
            }
        }

        assert_eq!(
            reg_read(&mut t, regs::VIRTIO_MMIO_MAGIC_VALUE),
            MMIO_MAGIC_VALUE
        );
        assert_eq!(reg_read(&mut t, regs::VIRTIO_MMIO_VERSION), MMIO_VERSION);
        assert_eq!(reg_read(&mut t, regs::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(reg_read(&mut t, regs::VIRTIO_MMIO_DEVICE_ID), 19);
        let s = t.device_status();
        let sticky = status::FAILED | status::DEVICE_NEEDS_RESET;
        let steps = [0, 1, 3, 11, 15];
        assert!(steps.contains(&(s & !sticky)), "unreachable status {s:#x}");
        let active = dev.lock().expect("not poisoned").is_activated();
        if s & status::DRIVER_OK != 0 && s & status::DEVICE_NEEDS_RESET == 0 {
            assert!(active, "DRIVER_OK but the device is not active");
        }
        if s & status::DRIVER_OK == 0 {
            assert!(!active, "active device without DRIVER_OK (status {s:#x})");
        }
        if s == 0 {
            assert_eq!(t.interrupt().status(), 0);
        }
    }
    drop(t);
    drop(dev);
});
