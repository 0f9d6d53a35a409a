//! VMM tests on real KVM with the bare-metal test guest: boots in
//! milliseconds, drives the serial port, the i8042, stray port I/O and MMIO,
//! and ends the VM the way Linux does.

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
            let mut clone = Vm::restore(
                &dir,
                RestoreConfig {
                    console: ConsoleOutput::Sink,
                    vsock_uds_path: None,
                    flavour: None,
                },
            )
            .unwrap();
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
                vsock_uds_path: None,
                flavour: None,
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
        let config = || RestoreConfig {
            console: ConsoleOutput::Sink,
            vsock_uds_path: None,
            flavour: None,
        };
        let dir = std::env::temp_dir().join(format!("arrow-snap-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Vm::restore(&dir, config()).err().unwrap();
        assert!(err.to_string().contains("vmstate"), "{err}");
        std::fs::write(dir.join("vmstate"), b"ARROWSNP\x01\0\0\0garbage").unwrap();
        let err = Vm::restore(&dir, config()).err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
