//! VMM tests on real KVM with the bare-metal test guest: boots in
//! milliseconds, drives the serial port, the i8042, stray port I/O and MMIO,
//! and ends the VM the way Linux does.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_core::exit::VmExit;
use vmm_core::test_guest::GuestProgram;
use vmm_core::vm::{ConsoleOutput, Vm, VmConfig};

#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, d: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(d);
        Ok(d.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

fn guest_file(program: &GuestProgram, name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("arrow-guest-{}-{name}.elf", std::process::id()));
    program.write_elf(&path).unwrap();
    path
}

fn run(program: &GuestProgram, name: &str, timeout: Duration) -> (Option<VmExit>, Vec<u8>, Vm) {
    let kernel = guest_file(program, name);
    let out = Captured::default();
    let mut config = VmConfig::new(&kernel);
    config.memory_bytes = 32 << 20;
    config.console = ConsoleOutput::Writer(Box::new(out.clone()));
    let mut vm = Vm::build(config).expect("build VM (is /dev/kvm usable?)");
    vm.start().unwrap();
    let exit = vm.wait(Some(timeout));
    std::fs::remove_file(kernel).unwrap();
    (exit, out.bytes(), vm)
}

#[test]
fn serial_output_then_i8042_reset_ends_the_vm() {
    let mut p = GuestProgram::new();
    p.serial_write(b"hello from the guest\n")
        .reset()
        .halt_forever();
    let (exit, out, _vm) = run(&p, "hello", Duration::from_secs(10));
    assert_eq!(exit, Some(VmExit::Reset));
    assert_eq!(out, b"hello from the guest\n");
}

#[test]
fn stray_port_io_and_wild_mmio_do_not_stop_the_vm() {
    let mut p = GuestProgram::new();
    p.port_write(0x1234, b"junk")
        .port_read_to_serial(0x1234) // nothing there: reads 0xff
        .write32(0xdead_0000, 0x1234_5678) // MMIO gap, no device
        .write32(0xd000_0000, 0xffff_ffff) // where virtio would be, none configured
        .read32_to_serial(0xdead_0000) // unbacked MMIO reads 0
        .port_write(0x64, &[0x00, 0xff]) // i8042 commands that are not reset
        .serial_write(b"!")
        .reset();
    let (exit, out, _vm) = run(&p, "stray", Duration::from_secs(10));
    assert_eq!(exit, Some(VmExit::Reset));
    assert_eq!(out, [0xff, 0, 0, 0, 0, b'!']);
}

#[test]
fn a_spinning_guest_is_stopped_by_the_host() {
    let mut p = GuestProgram::new();
    p.serial_write(b"spin").count_forever(0x20_0000);
    let (exit, out, mut vm) = run(&p, "spin", Duration::from_millis(200));
    assert_eq!(exit, None, "the guest spins until stopped");
    assert_eq!(out, b"spin");
    assert_eq!(vm.stop(), VmExit::Stopped);
    let counter: u64 =
        vm_memory::Bytes::read_obj(vm.memory(), vm_memory::GuestAddress(0x20_0000)).unwrap();
    assert!(counter > 0, "the guest ran");
}

#[test]
fn a_paused_guest_does_not_run_until_resumed() {
    let mut p = GuestProgram::new();
    p.serial_write(b"spin").count_forever(0x20_0000);
    let (exit, _, mut vm) = run(&p, "pause", Duration::from_millis(200));
    assert_eq!(exit, None, "the guest spins");
    let counter = |vm: &Vm| -> u64 {
        vm_memory::Bytes::read_obj(vm.memory(), vm_memory::GuestAddress(0x20_0000)).unwrap()
    };
    vm.pause(Duration::from_secs(10)).unwrap();
    vm.pause(Duration::from_secs(10)).unwrap(); // already paused: nothing
    assert!(vm.is_paused());
    let paused_at = counter(&vm);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counter(&vm), paused_at, "a paused guest ran");
    let dir = std::env::temp_dir().join(format!("arrow-paused-snap-{}", std::process::id()));
    let err = vm.snapshot(&dir, true).unwrap_err();
    assert!(err.to_string().contains("paused"), "{err}");
    assert!(vm.is_paused(), "a refused snapshot does not resume");
    vm.resume();
    assert!(!vm.is_paused());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counter(&vm) == paused_at {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest did not resume"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // A paused VM can be stopped; a stopped one cannot be paused.
    vm.pause(Duration::from_secs(10)).unwrap();
    assert_eq!(vm.stop(), VmExit::Stopped);
    assert!(vm.pause(Duration::from_secs(1)).is_err());
}

#[test]
fn a_guest_that_halts_with_interrupts_off_is_stopped_cleanly() {
    let mut p = GuestProgram::new();
    p.serial_write(b"h").halt_forever();
    let (exit, out, mut vm) = run(&p, "halt", Duration::from_millis(100));
    assert_eq!(exit, None);
    assert_eq!(out, b"h");
    assert_eq!(vm.stop(), VmExit::Stopped);
}

#[test]
fn missing_kernel_fails_before_anything_runs() {
    let config = VmConfig::new("/nonexistent/vmlinux");
    let err = Vm::build(config).err().expect("must fail");
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn bad_shapes_are_rejected() {
    let mut p = GuestProgram::new();
    p.reset();
    let kernel = guest_file(&p, "shapes");
    let mut config = VmConfig::new(&kernel);
    config.vcpus = 0;
    assert!(Vm::build(config).is_err());
    let mut config = VmConfig::new(&kernel);
    config.memory_bytes = (16 << 20) + 1;
    assert!(Vm::build(config).is_err());
    std::fs::remove_file(kernel).unwrap();
}

mod snapshots {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_core::vm::RestoreConfig;

    const COUNTER: u64 = 0x20_0000;

    fn counter(vm: &Vm) -> u64 {
        vm.memory().read_obj(GuestAddress(COUNTER)).unwrap()
    }

    #[test]
    fn a_snapshot_taken_mid_run_continues_in_ten_clones() {
        let mut p = GuestProgram::new();
        p.serial_write(b"go").count_forever(COUNTER);
        let kernel = guest_file(&p, "counter");
        let out = Captured::default();
        let mut config = VmConfig::new(&kernel);
        config.memory_bytes = 32 << 20;
        config.console = ConsoleOutput::Writer(Box::new(out.clone()));
        let mut vm = Vm::build(config).unwrap();
        vm.start().unwrap();
        std::thread::sleep(Duration::from_millis(50));

        let dir = std::env::temp_dir().join(format!("arrow-snap-{}", std::process::id()));
        vm.snapshot(&dir, true).unwrap();
        let saved: u64 = {
            let mem = std::fs::read(dir.join("memory")).unwrap();
            u64::from_le_bytes(
                mem[COUNTER as usize..COUNTER as usize + 8]
                    .try_into()
                    .unwrap(),
            )
        };
        assert!(saved > 0, "the guest counted before the snapshot");
        // The original goes on after the snapshot.
        std::thread::sleep(Duration::from_millis(20));
        assert!(counter(&vm) > saved);
        vm.stop();

        for _ in 0..10 {
            let mut clone = Vm::restore(&dir, RestoreConfig::default()).unwrap();
            assert_eq!(
                counter(&clone),
                saved,
                "the clone starts where the snapshot was"
            );
            clone.start().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while counter(&clone) <= saved {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the clone does not run"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(clone.stop(), VmExit::Stopped);
        }
        assert_eq!(out.bytes(), b"go", "clones do not replay the console");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_clone_resumes_port_io_and_resets_as_the_original_would() {
        // The guest prints, waits for the host to write a flag, prints again
        // and resets; the snapshot is taken while it spins on the flag.
        let flag = 0x30_0000;
        let mut p = GuestProgram::new();
        p.serial_write(b"a")
            .wait_until_changed32(flag, 0)
            .serial_write(b"b")
            .reset();
        let kernel = guest_file(&p, "flag");
        let mut config = VmConfig::new(&kernel);
        config.memory_bytes = 32 << 20;
        let mut vm = Vm::build(config).unwrap();
        vm.start().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let dir = std::env::temp_dir().join(format!("arrow-snap-flag-{}", std::process::id()));
        vm.snapshot(&dir, false).unwrap();
        vm.stop();

        let out = Captured::default();
        let mut clone = Vm::restore(
            &dir,
            RestoreConfig {
                console: ConsoleOutput::Writer(Box::new(out.clone())),
                ..RestoreConfig::default()
            },
        )
        .unwrap();
        clone.memory().write_obj(1u32, GuestAddress(flag)).unwrap();
        clone.start().unwrap();
        assert_eq!(
            clone.wait(Some(Duration::from_secs(5))),
            Some(VmExit::Reset)
        );
        assert_eq!(out.bytes(), b"b");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_missing_or_corrupt_snapshot_is_refused() {
        let config = RestoreConfig::default;
        let dir = std::env::temp_dir().join(format!("arrow-snap-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Vm::restore(&dir, config()).err().unwrap();
        assert!(err.to_string().contains("vmstate"), "{err}");
        std::fs::write(dir.join("vmstate"), b"ARROWSNP\x01\0\0\0garbage").unwrap();
        let err = Vm::restore(&dir, config()).err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(err.is_snapshot_fault(), "a template cache drops it");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The virtio-fs device wired into a VM: the bare-metal guest drives its
/// virtio-mmio registers as a driver would, the host lays out the queues and
/// FUSE requests in guest memory, and snapshots keep the device but not the
/// shared directory.
mod virtio_fs {
    use super::*;
    use std::mem::size_of;

    use fuse_backend_rs::abi::fuse_abi::Opcode;
    use fuse_backend_rs::abi::fuse_abi::{
        EntryOut, InHeader, InitIn, InitOut, OutHeader, KERNEL_MINOR_VERSION, KERNEL_VERSION,
        ROOT_ID,
    };
    use virtio_bindings::virtio_mmio as regs;
    use vm_memory::{ByteValued, Bytes, GuestAddress};
    use vmm_core::arch::x86_64::layout;
    use vmm_core::virtio::fs::FsError;
    use vmm_core::vm::{FsConfig, RestoreConfig, VmError};

    const QUEUE_SIZE: u32 = 16;
    /// Rings of queue `i` at `RINGS + i * 0x1_0000`: descriptors, then the
    /// available ring at +0x1000, the used ring at +0x2000.
    const RINGS: u64 = 0x40_0000;
    const REQUEST_QUEUE: u64 = 1;
    /// Request `i` at `IN_BUF + i * 0x1000`, its reply at `OUT_BUF + ...`.
    const IN_BUF: u64 = 0x50_0000;
    const OUT_BUF: u64 = 0x60_0000;
    /// The host sets it to let the guest notify the request queue.
    const GO: u64 = 0x30_0000;
    const HELLO: &[u8] = b"hello from the clone's share\n";

    fn rings(queue: u64) -> (u64, u64, u64) {
        let base = RINGS + queue * 0x1_0000;
        (base, base + 0x1000, base + 0x2000)
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("arrow-vm-fs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A guest that sets the device at `slot` up (VERSION_1, both queues),
    /// prints "a", waits for the host's GO, notifies the request queue,
    /// waits for a used buffer, prints "done" and spins.
    fn driver_program(slot: u32) -> GuestProgram {
        let (base, _) = layout::virtio_mmio_slot(slot).unwrap();
        let reg = |r: u32| base + u64::from(r);
        let mut p = GuestProgram::new();
        p.write32(reg(regs::VIRTIO_MMIO_STATUS), 1)
            .write32(reg(regs::VIRTIO_MMIO_STATUS), 3)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 0)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES), 0)
            .write32(reg(regs::VIRTIO_MMIO_STATUS), 0xb);
        for queue in 0..2 {
            let (desc, avail, used) = rings(queue);
            p.write32(reg(regs::VIRTIO_MMIO_QUEUE_SEL), queue as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_NUM), QUEUE_SIZE)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_DESC_LOW), desc as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_DESC_HIGH), 0)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW), avail as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH), 0)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_USED_LOW), used as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_USED_HIGH), 0)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_READY), 1);
        }
        let (_, _, used) = rings(REQUEST_QUEUE);
        p.write32(reg(regs::VIRTIO_MMIO_STATUS), 0xf)
            .serial_write(b"a")
            .wait_until_changed32(GO, 0)
            .write32(reg(regs::VIRTIO_MMIO_QUEUE_NOTIFY), REQUEST_QUEUE as u32)
            // flags (0) and idx: changes when the device uses a chain.
            .wait_until_changed32(used, 0)
            .serial_write(b"done")
            .count_forever(0x20_0000);
        p
    }

    /// Puts FUSE requests (`opcode`, node, arguments) on the request queue,
    /// each with a 4 KiB reply buffer, and lets the guest notify.
    fn queue_requests(vm: &Vm, requests: &[(Opcode, u64, Vec<u8>)]) {
        let mem = vm.memory();
        let (desc, avail, _) = rings(REQUEST_QUEUE);
        for (i, (opcode, nodeid, args)) in requests.iter().enumerate() {
            let header = InHeader {
                len: (size_of::<InHeader>() + args.len()) as u32,
                opcode: *opcode as u32,
                unique: i as u64 + 1,
                nodeid: *nodeid,
                ..Default::default()
            };
            let mut bytes = header.as_slice().to_vec();
            bytes.extend_from_slice(args);
            let (inb, outb) = (IN_BUF + i as u64 * 0x1000, OUT_BUF + i as u64 * 0x1000);
            mem.write_slice(&bytes, GuestAddress(inb)).unwrap();
            let d = desc + (2 * i as u64) * 16;
            // addr, len, flags (NEXT = 1, WRITE = 2), next
            mem.write_obj(inb, GuestAddress(d)).unwrap();
            mem.write_obj(bytes.len() as u32, GuestAddress(d + 8))
                .unwrap();
            mem.write_obj(1u16, GuestAddress(d + 12)).unwrap();
            mem.write_obj(2 * i as u16 + 1, GuestAddress(d + 14))
                .unwrap();
            mem.write_obj(outb, GuestAddress(d + 16)).unwrap();
            mem.write_obj(0x1000u32, GuestAddress(d + 24)).unwrap();
            mem.write_obj(2u16, GuestAddress(d + 28)).unwrap();
            mem.write_obj(2 * i as u16, GuestAddress(avail + 4 + 2 * i as u64))
                .unwrap();
        }
        mem.write_obj(requests.len() as u16, GuestAddress(avail + 2))
            .unwrap();
        mem.write_obj(1u32, GuestAddress(GO)).unwrap();
    }

    /// The reply to request `i`: header and body.
    fn reply(vm: &Vm, i: u64) -> (OutHeader, Vec<u8>) {
        let mut bytes = vec![0u8; 0x1000];
        vm.memory()
            .read_slice(&mut bytes, GuestAddress(OUT_BUF + i * 0x1000))
            .unwrap();
        let header = *OutHeader::from_slice(&bytes[..size_of::<OutHeader>()]).unwrap();
        (header, bytes[size_of::<OutHeader>()..].to_vec())
    }

    fn used_idx(vm: &Vm) -> u16 {
        let (_, _, used) = rings(REQUEST_QUEUE);
        vm.memory().read_obj(GuestAddress(used + 2)).unwrap()
    }

    fn wait_for(out: &Captured, what: &[u8]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !out.bytes().ends_with(what) {
            assert!(
                std::time::Instant::now() < deadline,
                "guest never wrote {:?}; console {:?}",
                String::from_utf8_lossy(what),
                String::from_utf8_lossy(&out.bytes())
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn init_args() -> Vec<u8> {
        InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0x20000,
            flags: 0,
        }
        .as_slice()
        .to_vec()
    }

    #[test]
    fn a_template_keeps_the_device_and_each_clone_shares_its_own_directory() {
        let template_dir = temp_dir("template");
        let clone_dir = temp_dir("clone");
        std::fs::write(clone_dir.join("only-in-clone"), HELLO).unwrap();
        let kernel = guest_file(&driver_program(0), "fs-driver");
        let out = Captured::default();
        let mut config = VmConfig::new(&kernel);
        config.memory_bytes = 32 << 20;
        config.console = ConsoleOutput::Writer(Box::new(out.clone()));
        config.fs = Some(FsConfig {
            tag: "arrow".into(),
            shared_dir: template_dir.clone(),
            read_only: false,
        });
        assert_eq!(config.device_set(), ["virtio-fs tag=arrow"]);
        let mut vm = Vm::build(config).unwrap();
        assert!(
            vm.cmdline().contains("virtio_mmio.device=4K@0x"),
            "{}",
            vm.cmdline()
        );
        vm.start().unwrap();
        // The driver set the device up and waits: active, no FUSE session.
        wait_for(&out, b"a");
        let snap = std::env::temp_dir().join(format!("arrow-snap-fs-{}", std::process::id()));
        vm.snapshot(&snap, false).unwrap();
        vm.stop();
        use std::os::unix::fs::PermissionsExt;
        for (path, mode) in [
            (snap.clone(), 0o700),
            (snap.join("memory"), 0o600),
            (snap.join("vmstate"), 0o600),
        ] {
            let found = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(found, mode, "{}", path.display());
        }

        // A clone needs a directory for the device, an existing one.
        let err = Vm::restore(&snap, RestoreConfig::default()).err().unwrap();
        assert!(matches!(err, VmError::Backends(_)), "{err}");
        assert!(err.to_string().contains("shared directory"), "{err}");
        assert!(!err.is_snapshot_fault());
        let missing = RestoreConfig {
            fs_shared_dir: Some(clone_dir.join("missing")),
            ..RestoreConfig::default()
        };
        let err = Vm::restore(&snap, missing).err().unwrap();
        assert!(
            matches!(err, VmError::Fs(FsError::NotADirectory(_))),
            "{err}"
        );
        assert!(!err.is_snapshot_fault());

        // The clone's requests are served from the clone's directory.
        let out = Captured::default();
        let mut clone = Vm::restore(
            &snap,
            RestoreConfig {
                console: ConsoleOutput::Writer(Box::new(out.clone())),
                fs_shared_dir: Some(clone_dir.clone()),
                ..RestoreConfig::default()
            },
        )
        .unwrap();
        queue_requests(
            &clone,
            &[
                (Opcode::Init, 0, init_args()),
                (Opcode::Lookup, ROOT_ID, b"only-in-clone\0".to_vec()),
            ],
        );
        clone.start().unwrap();
        wait_for(&out, b"done");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while used_idx(&clone) < 2 {
            assert!(std::time::Instant::now() < deadline, "second reply");
            std::thread::sleep(Duration::from_millis(2));
        }
        let (init, body) = reply(&clone, 0);
        assert_eq!((init.error, init.unique), (0, 1));
        let init_out = *InitOut::from_slice(&body[..size_of::<InitOut>()]).unwrap();
        assert_eq!(init_out.major, KERNEL_VERSION);
        let (lookup, body) = reply(&clone, 1);
        assert_eq!((lookup.error, lookup.unique), (0, 2));
        let entry = *EntryOut::from_slice(&body[..size_of::<EntryOut>()]).unwrap();
        assert_eq!(entry.attr.size, HELLO.len() as u64);

        // Now the guest has a FUSE session: no snapshot, and nothing written.
        let snap2 = std::env::temp_dir().join(format!("arrow-snap-fs2-{}", std::process::id()));
        let err = clone.snapshot(&snap2, true).err().unwrap();
        assert!(
            matches!(err, VmError::Fs(FsError::SessionOpen { ref tag }) if tag == "arrow"),
            "{err}"
        );
        assert!(!snap2.exists());
        assert_eq!(clone.stop(), VmExit::Stopped);

        std::fs::remove_dir_all(&snap).unwrap();
        std::fs::remove_dir_all(&template_dir).unwrap();
        std::fs::remove_dir_all(&clone_dir).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_shared_directory_needs_a_device_in_the_snapshot() {
        let mut p = GuestProgram::new();
        p.count_forever(0x20_0000);
        let kernel = guest_file(&p, "fs-none");
        let mut config = VmConfig::new(&kernel);
        config.memory_bytes = 32 << 20;
        assert!(config.device_set().is_empty());
        let mut vm = Vm::build(config).unwrap();
        vm.start().unwrap();
        let snap = std::env::temp_dir().join(format!("arrow-snap-nofs-{}", std::process::id()));
        vm.snapshot(&snap, false).unwrap();
        vm.stop();
        let dir = temp_dir("unused");
        let err = Vm::restore(
            &snap,
            RestoreConfig {
                fs_shared_dir: Some(dir.clone()),
                ..RestoreConfig::default()
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, VmError::Backends(_)), "{err}");
        assert!(err.to_string().contains("no virtio-fs device"), "{err}");
        assert!(!err.is_snapshot_fault());
        std::fs::remove_dir_all(&snap).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_stop_handle_ends_the_vm_from_another_thread() {
        let mut p = GuestProgram::new();
        p.count_forever(0x20_0000);
        let kernel = guest_file(&p, "stop-handle");
        let mut config = VmConfig::new(&kernel);
        config.memory_bytes = 32 << 20;
        let mut vm = Vm::build(config).unwrap();
        vm.start().unwrap();
        let handle = vm.stop_handle();
        let t = std::thread::spawn(move || handle.stop());
        assert_eq!(vm.wait(Some(Duration::from_secs(5))), Some(VmExit::Stopped));
        assert!(t.join().unwrap(), "the handle's stop was the first exit");
        assert!(!vm.stop_handle().stop(), "already ended");
        assert_eq!(vm.stop(), VmExit::Stopped);
        std::fs::remove_file(kernel).unwrap();
    }
}

/// The virtio-net device wired into a VM: the bare-metal guest sets the
/// device up as a driver would (mergeable rx buffers), the host lays out
/// the rings and buffers in guest memory, and one end of a datagram
/// socketpair stands in for the tap. A template keeps its posted rx
/// buffers; a clone on a new tap receives into them.
mod virtio_net {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    use virtio_bindings::virtio_mmio as regs;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_core::arch::x86_64::layout;
    use vmm_core::virtio::net::Tap;
    use vmm_core::vm::{NetConfig, RestoreConfig, VmError};

    const QUEUE_SIZE: u32 = 16;
    /// Rings of queue `i` at `RINGS + i * 0x1_0000`: descriptors, then the
    /// available ring at +0x1000, the used ring at +0x2000.
    const RINGS: u64 = 0x40_0000;
    const RX: u64 = 0;
    const TX: u64 = 1;
    /// Rx buffer `i` at `RX_BUF + i * 0x1000` (4 KiB each).
    const RX_BUF: u64 = 0x50_0000;
    const TX_BUF: u64 = 0x60_0000;
    /// The host sets it to let the guest notify the tx queue.
    const GO: u64 = 0x30_0000;
    const MAC: [u8; 6] = [0x02, 0xa7, 0x72, 0, 0, 9];
    /// VIRTIO_NET_F_MTU, _MAC, _MRG_RXBUF.
    const FEATURES: u32 = (1 << 3) | (1 << 5) | (1 << 15);

    fn rings(queue: u64) -> (u64, u64, u64) {
        let base = RINGS + queue * 0x1_0000;
        (base, base + 0x1000, base + 0x2000)
    }

    fn fake_tap() -> (Tap, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (Tap::from_datagram_socket(a.into(), "fake0").unwrap(), b)
    }

    /// A guest that sets the NIC up, prints "a", waits for the host's GO,
    /// notifies tx, waits for the frame to be used, prints "t" and spins.
    fn driver_program() -> GuestProgram {
        let (base, _) = layout::virtio_mmio_slot(0).unwrap();
        let reg = |r: u32| base + u64::from(r);
        let mut p = GuestProgram::new();
        p.write32(reg(regs::VIRTIO_MMIO_STATUS), 1)
            .write32(reg(regs::VIRTIO_MMIO_STATUS), 3)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 1)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES), 1)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL), 0)
            .write32(reg(regs::VIRTIO_MMIO_DRIVER_FEATURES), FEATURES)
            .write32(reg(regs::VIRTIO_MMIO_STATUS), 0xb);
        for queue in [RX, TX] {
            let (desc, avail, used) = rings(queue);
            p.write32(reg(regs::VIRTIO_MMIO_QUEUE_SEL), queue as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_NUM), QUEUE_SIZE)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_DESC_LOW), desc as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_DESC_HIGH), 0)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW), avail as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH), 0)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_USED_LOW), used as u32)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_USED_HIGH), 0)
                .write32(reg(regs::VIRTIO_MMIO_QUEUE_READY), 1);
        }
        let (_, _, tx_used) = rings(TX);
        p.write32(reg(regs::VIRTIO_MMIO_STATUS), 0xf)
            .serial_write(b"a")
            .wait_until_changed32(GO, 0)
            .write32(reg(regs::VIRTIO_MMIO_QUEUE_NOTIFY), TX as u32)
            .wait_until_changed32(tx_used, 0)
            .serial_write(b"t")
            .count_forever(0x20_0000);
        p
    }

    /// Posts `n` device-writable 4 KiB rx buffers.
    fn post_rx_buffers(vm: &Vm, n: u16) {
        let mem = vm.memory();
        let (desc, avail, _) = rings(RX);
        for i in 0..n {
            let d = desc + u64::from(i) * 16;
            mem.write_obj(RX_BUF + u64::from(i) * 0x1000, GuestAddress(d))
                .unwrap();
            mem.write_obj(0x1000u32, GuestAddress(d + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(d + 12)).unwrap(); // WRITE
            mem.write_obj(i, GuestAddress(avail + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        mem.write_obj(n, GuestAddress(avail + 2)).unwrap();
    }

    /// Queues one tx frame (header + `frame`) and lets the guest notify.
    fn queue_tx(vm: &Vm, frame: &[u8]) {
        let mem = vm.memory();
        let (desc, avail, _) = rings(TX);
        let mut packet = vec![0u8; 12];
        packet.extend_from_slice(frame);
        mem.write_slice(&packet, GuestAddress(TX_BUF)).unwrap();
        mem.write_obj(TX_BUF, GuestAddress(desc)).unwrap();
        mem.write_obj(packet.len() as u32, GuestAddress(desc + 8))
            .unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        mem.write_obj(1u32, GuestAddress(GO)).unwrap();
    }

    fn rx_used_idx(vm: &Vm) -> u16 {
        let (_, _, used) = rings(RX);
        vm.memory().read_obj(GuestAddress(used + 2)).unwrap()
    }

    /// Waits until the rx used ring holds `n` entries; returns the last
    /// one's buffer as written: header and frame.
    fn wait_rx(vm: &Vm, n: u16) -> Vec<u8> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rx_used_idx(vm) < n {
            assert!(std::time::Instant::now() < deadline, "rx frame {n}");
            std::thread::sleep(Duration::from_millis(2));
        }
        let (_, _, used) = rings(RX);
        let slot = used + 4 + 8 * u64::from(n - 1);
        let id: u32 = vm.memory().read_obj(GuestAddress(slot)).unwrap();
        let len: u32 = vm.memory().read_obj(GuestAddress(slot + 4)).unwrap();
        let mut bytes = vec![0u8; len as usize];
        vm.memory()
            .read_slice(&mut bytes, GuestAddress(RX_BUF + u64::from(id) * 0x1000))
            .unwrap();
        bytes
    }

    fn wait_for(out: &Captured, what: &[u8]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !out.bytes().ends_with(what) {
            assert!(
                std::time::Instant::now() < deadline,
                "guest never wrote {:?}; console {:?}",
                String::from_utf8_lossy(what),
                String::from_utf8_lossy(&out.bytes())
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn host_frame(seed: u8) -> Vec<u8> {
        let mut packet = vec![0u8; 12];
        packet.extend((0..100u8).map(|i| i ^ seed));
        packet
    }

    #[test]
    fn frames_flow_both_ways_and_a_clone_receives_on_its_own_tap() {
        let kernel = guest_file(&driver_program(), "net-driver");
        let out = Captured::default();
        let (tap, host) = fake_tap();
        let mut config = VmConfig::new(&kernel);
        config.memory_bytes = 32 << 20;
        config.console = ConsoleOutput::Writer(Box::new(out.clone()));
        config.net = Some(NetConfig {
            tap,
            mac: MAC,
            mtu: 1500,
        });
        assert_eq!(
            config.device_set(),
            ["virtio-net mac=02:a7:72:00:00:09 mtu=1500"]
        );
        let mut vm = Vm::build(config).unwrap();
        assert!(
            vm.cmdline().contains("virtio_mmio.device=4K@0x"),
            "{}",
            vm.cmdline()
        );
        vm.start().unwrap();
        wait_for(&out, b"a");

        // Guest to host.
        post_rx_buffers(&vm, 2);
        let frame: Vec<u8> = (0..60u8).collect();
        queue_tx(&vm, &frame);
        wait_for(&out, b"t");
        let mut buf = [0u8; 2048];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..12], &[0; 12]);
        assert_eq!(&buf[12..n], &frame[..]);

        // Host to guest, into the first posted buffer.
        host.send(&host_frame(1)).unwrap();
        let got = wait_rx(&vm, 1);
        assert_eq!(&got[10..12], &[1, 0], "num_buffers");
        assert_eq!(&got[12..], &host_frame(1)[12..]);
        let stats = vm.net_stats().unwrap();
        assert_eq!((stats.tx_frames, stats.rx_frames), (1, 1));

        // A template with one rx buffer still posted.
        let snap = std::env::temp_dir().join(format!("arrow-snap-net-{}", std::process::id()));
        vm.snapshot(&snap, false).unwrap();
        vm.stop();
        drop(host);

        let err = Vm::restore(&snap, RestoreConfig::default()).err().unwrap();
        assert!(matches!(err, VmError::Backends(_)), "{err}");
        assert!(err.to_string().contains("a tap for it is needed"), "{err}");
        assert!(!err.is_snapshot_fault());

        let (tap2, host2) = fake_tap();
        let mut clone = Vm::restore(
            &snap,
            RestoreConfig {
                net_tap: Some(tap2),
                ..RestoreConfig::default()
            },
        )
        .unwrap();
        clone.start().unwrap();
        host2.send(&host_frame(2)).unwrap();
        let got = wait_rx(&clone, 2);
        assert_eq!(
            &got[12..],
            &host_frame(2)[12..],
            "the clone's frame lands in the buffer the template posted"
        );
        assert_eq!(clone.net_stats().unwrap().rx_frames, 1);
        assert_eq!(clone.stop(), VmExit::Stopped);

        std::fs::remove_dir_all(&snap).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_tap_needs_a_nic_in_the_snapshot() {
        let mut p = GuestProgram::new();
        p.count_forever(0x20_0000);
        let kernel = guest_file(&p, "net-none");
        let mut config = VmConfig::new(&kernel);
        config.memory_bytes = 32 << 20;
        let mut vm = Vm::build(config).unwrap();
        vm.start().unwrap();
        let snap = std::env::temp_dir().join(format!("arrow-snap-nonet-{}", std::process::id()));
        vm.snapshot(&snap, false).unwrap();
        vm.stop();
        let (tap, _host) = fake_tap();
        let err = Vm::restore(
            &snap,
            RestoreConfig {
                net_tap: Some(tap),
                ..RestoreConfig::default()
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, VmError::Backends(_)), "{err}");
        assert!(err.to_string().contains("no virtio-net device"), "{err}");
        std::fs::remove_dir_all(&snap).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_real_tap_when_the_host_allows_one() {
        // Needs CAP_NET_ADMIN and /dev/net/tun; skipped without them.
        let name = format!("arrowt{}", std::process::id() % 100_000);
        let tap = match Tap::open_named(&name) {
            Ok(tap) => tap,
            Err(e) => {
                eprintln!("skipped: cannot open a tap here: {e}");
                return;
            }
        };
        assert_eq!(tap.name(), name);
        assert!(tap.supports_offloads(), "Linux taps do offloads");
        // A second descriptor on the same tap passes the checks too.
        let again = Tap::from_fd(std::os::fd::OwnedFd::from(tap.try_clone().unwrap())).unwrap();
        assert_eq!(again.name(), name);
    }
}

/// vmm-core's clone-or-boot launch (`vmm_core::launch`) with a guest that
/// spins: "ready" is its counter moving.
mod launch {
    use super::*;
    use std::path::Path;
    use vmm_core::cancel::Cancel;
    use vmm_core::launch::{
        template_key, Launch, LaunchError, LaunchEvent, LaunchHooks, Launched, Origin,
    };
    use vmm_core::template::TemplateCache;

    const COUNTER: u64 = 0x20_0000;

    /// Records the events; ready when the guest's counter moves, or never
    /// (`refuse`).
    #[derive(Default)]
    struct Hooks {
        events: Vec<String>,
        refuse: bool,
    }

    impl LaunchHooks for Hooks {
        type Ready = u64;

        fn console(&mut self) -> io::Result<ConsoleOutput> {
            Ok(ConsoleOutput::Sink)
        }

        fn wait_ready(
            &mut self,
            vm: &Vm,
            timeout: Duration,
            cancel: &Cancel,
        ) -> Result<u64, LaunchError> {
            if self.refuse {
                return Err(LaunchError::NotReady("refused by the test".into()));
            }
            let deadline = std::time::Instant::now() + timeout;
            loop {
                cancel.check()?;
                let count: u64 =
                    vm_memory::Bytes::read_obj(vm.memory(), vm_memory::GuestAddress(COUNTER))
                        .unwrap();
                if count > 0 {
                    return Ok(count);
                }
                if std::time::Instant::now() > deadline {
                    return Err(LaunchError::NotReady("the counter never moved".into()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn event(&mut self, event: LaunchEvent<'_>) {
            let name = match event {
                LaunchEvent::Built { .. } => "built".into(),
                LaunchEvent::Booted => "booted".into(),
                LaunchEvent::TemplateSaved => "saved".into(),
                LaunchEvent::TemplateNotSaved(e) => format!("not saved: {e}"),
                LaunchEvent::TemplateRemoved(why) => format!("removed: {why}"),
                LaunchEvent::CloneRestored => "restored".into(),
                LaunchEvent::CloneReady => "clone ready".into(),
            };
            self.events.push(name);
        }
    }

    fn config(kernel: &Path) -> VmConfig {
        let mut config = VmConfig::new(kernel);
        config.memory_bytes = 32 << 20;
        config
    }

    fn start(
        origin: Origin,
        cache: &TemplateCache,
        kernel: &Path,
        hooks: &mut Hooks,
    ) -> Result<Launched<u64>, LaunchError> {
        let config = config(kernel);
        let key = template_key(&config)?;
        let cancel = Cancel::default();
        Launch {
            origin,
            cache,
            key: &key,
            ready_timeout: Duration::from_secs(10),
            cancel: &cancel,
        }
        .start(config, hooks)
    }

    #[test]
    fn boots_once_then_clones_and_boot_alone_saves_nothing() {
        let mut p = GuestProgram::new();
        p.count_forever(COUNTER);
        let kernel = guest_file(&p, "launch");
        let root = std::env::temp_dir().join(format!("arrow-launch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cache = TemplateCache::new(root.join("templates"));

        // Boot only: ready, no template.
        let mut hooks = Hooks::default();
        let launched = start(Origin::Boot, &cache, &kernel, &mut hooks).unwrap();
        assert!(!launched.cloned && launched.template.is_none());
        assert!(launched.ready.unwrap() > 0);
        assert_eq!(hooks.events, ["built", "booted"]);
        drop(launched);
        assert!(
            !root.join("templates").exists()
                || std::fs::read_dir(root.join("templates")).unwrap().count() == 0
        );

        // A readiness check that fails: an error, and no template.
        let mut hooks = Hooks {
            refuse: true,
            ..Default::default()
        };
        let err = start(Origin::CloneOrBoot, &cache, &kernel, &mut hooks)
            .err()
            .unwrap();
        assert!(matches!(err, LaunchError::NotReady(_)), "{err}");
        let key = template_key(&config(&kernel)).unwrap();
        assert!(!cache.dir(&key).exists());

        // The first boots and saves the template, the next clones it.
        let mut hooks = Hooks::default();
        let first = start(Origin::CloneOrBoot, &cache, &kernel, &mut hooks).unwrap();
        assert!(!first.cloned);
        assert_eq!(first.template.as_deref(), Some(cache.dir(&key).as_path()));
        assert_eq!(hooks.events, ["built", "booted", "saved"]);
        let mut hooks = Hooks::default();
        let clone = start(Origin::CloneOrBoot, &cache, &kernel, &mut hooks).unwrap();
        assert!(clone.cloned && clone.ready.is_none());
        assert_eq!(hooks.events, ["restored", "clone ready"]);
        // The clone runs on from the template's counter.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(clone.vm.wait(Some(Duration::ZERO)), None, "the clone runs");

        // A corrupt template is removed and rebuilt by the next boot.
        drop(clone);
        std::fs::write(
            cache.dir(&key).join(vmm_core::snapshot::VMSTATE_FILE),
            b"corrupt",
        )
        .unwrap();
        let mut hooks = Hooks::default();
        let rebuilt = start(Origin::CloneOrBoot, &cache, &kernel, &mut hooks).unwrap();
        assert!(!rebuilt.cloned);
        assert!(
            hooks.events[0].starts_with("removed: "),
            "{:?}",
            hooks.events
        );
        assert_eq!(&hooks.events[1..], ["built", "booted", "saved"]);
        drop((first, rebuilt));
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_cancelled_launch_is_interrupted() {
        let mut p = GuestProgram::new();
        p.count_forever(COUNTER);
        let kernel = guest_file(&p, "launch-cancel");
        let root = std::env::temp_dir().join(format!("arrow-launch-c-{}", std::process::id()));
        let cache = TemplateCache::new(root.join("templates"));
        let config = config(&kernel);
        let key = template_key(&config).unwrap();
        let cancel = Cancel::default();
        cancel.request("test".into());
        let err = Launch {
            origin: Origin::CloneOrBoot,
            cache: &cache,
            key: &key,
            ready_timeout: Duration::from_secs(10),
            cancel: &cancel,
        }
        .start(config, &mut Hooks::default())
        .err()
        .unwrap();
        assert!(matches!(err, LaunchError::Interrupted(_)), "{err}");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::remove_file(kernel).unwrap();
    }
}
