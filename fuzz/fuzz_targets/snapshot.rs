//! Snapshot state: the `vmstate` decoder (header, CRC, postcard payload)
//! and each device's restore from arbitrary saved state (decoded with
//! postcard from the fuzzer's bytes, as a corrupt or hostile template
//! would give it).
//!
//! Oracles: a restore either fails with an error or gives a transport and
//! device that agree with the state (status, activation), and a restored
//! active vsock device then serves its rings (over guest memory holding
//! the fuzzer's bytes) without panicking.

#![no_main]

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

use arrow_fuzz::{guest_memory, ScratchDir};
use vm_memory::{Bytes, GuestAddress};
use vmm_core::devices::bus::BusDevice;
use vmm_core::devices::irq::IrqLine;
use vmm_core::devices::serial::{ConsoleTail, SerialConsole, SerialSnapshot};
use vmm_core::fuzzing::vsock_process_queues;
use vmm_core::snapshot::{decode, FsSnapshot, NetSnapshot, VsockSnapshot, FORMAT_VERSION, MAGIC};
use vmm_core::virtio::fs::VirtioFs;
use vmm_core::virtio::mmio::MmioTransport;
use vmm_core::virtio::net::{Tap, VirtioNet};
use vmm_core::virtio::persist::MmioTransportState;
use vmm_core::virtio::vsock::VirtioVsock;
use vmm_core::virtio::{status, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

#[derive(Arbitrary, Debug)]
enum Input {
    /// A whole `vmstate` file as read from disk.
    File(Vec<u8>),
    /// A payload behind a valid header (so the CRC passes).
    Payload(Vec<u8>),
    Vsock {
        state: Vec<u8>,
        memory: Vec<u8>,
    },
    Fs(Vec<u8>),
    Net(Vec<u8>),
    Serial {
        state: Vec<u8>,
        io: Vec<(u8, Option<u8>)>,
    },
}

fn irq() -> IrqLine {
    IrqLine::new(5, EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
}

/// Restores a transport in front of `dev` and checks it agrees with `state`.
fn restore_transport(
    mem: &vmm_core::virtio::GuestMemory,
    dev: Arc<Mutex<dyn VirtioDevice>>,
    state: &MmioTransportState,
) -> Option<MmioTransport> {
    let t = MmioTransport::restore(mem.clone(), dev.clone(), irq(), state).ok()?;
    assert_eq!(t.device_status(), state.status);
    let active = dev.lock().expect("not poisoned").is_activated();
    assert_eq!(active, state.activated);
    assert_eq!(
        state.activated,
        state.status & status::DRIVER_OK != 0,
        "restored an activation the status does not have"
    );
    Some(t)
}

fn file(payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend(FORMAT_VERSION.to_le_bytes());
    out.extend((payload.len() as u64).to_le_bytes());
    out.extend(crc32fast::hash(payload).to_le_bytes());
    out.extend(payload);
    out
}

fuzz_target!(|input: Input| {
    let path = Path::new("vmstate");
    match input {
        Input::File(bytes) => {
            let _ = decode(&bytes, path);
        }
        Input::Payload(payload) => {
            let _ = decode(&file(&payload), path);
        }
        Input::Vsock { state, memory } => {
            let Ok(s) = postcard::from_bytes::<VsockSnapshot>(&state) else {
                return;
            };
            let dir = ScratchDir::new("snap-vsock");
            let Ok(dev) = VirtioVsock::restore(&s.device, dir.path().join("v")) else {
                return;
            };
            let mem = guest_memory();
            let n = memory.len().min(0x8000);
            mem.write_slice(&memory[..n], GuestAddress(0))
                .expect("low memory");
            let dev = Arc::new(Mutex::new(dev));
            let Some(t) = restore_transport(&mem, dev.clone(), &s.transport) else {
                return;
            };
            let mut d = dev.lock().expect("not poisoned");
            if d.is_activated() {
                vsock_process_queues(&mut d);
            }
            drop(d);
            drop(t);
        }
        Input::Fs(state) => {
            let Ok(s) = postcard::from_bytes::<FsSnapshot>(&state) else {
                return;
            };
            let dir = ScratchDir::new("snap-fs");
            let Ok(dev) = VirtioFs::restore(&s.device, dir.path(), true) else {
                return;
            };
            let mem = guest_memory();
            let _ = restore_transport(&mem, Arc::new(Mutex::new(dev)), &s.transport);
        }
        Input::Net(state) => {
            let Ok(s) = postcard::from_bytes::<NetSnapshot>(&state) else {
                return;
            };
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for the two descriptors.
            let rc = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            assert_eq!(rc, 0, "socketpair");
            // SAFETY: both descriptors were just created and are owned here.
            let (ours, theirs) = unsafe {
                use std::os::fd::FromRawFd;
                (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
            };
            let Ok(tap) = Tap::from_datagram_socket(ours, "fuzz0") else {
                return;
            };
            let Ok(dev) = VirtioNet::restore(&s.device, tap) else {
                return;
            };
            let mem = guest_memory();
            let _ = restore_transport(&mem, Arc::new(Mutex::new(dev)), &s.transport);
            drop(theirs);
        }
        Input::Serial { state, io } => {
            let Ok(s) = postcard::from_bytes::<SerialSnapshot>(&state) else {
                return;
            };
            let Ok(mut uart) = SerialConsole::restore(&s, irq(), None, ConsoleTail::default())
            else {
                return;
            };
            for (offset, value) in io.into_iter().take(64) {
                match value {
                    Some(v) => uart.write(u64::from(offset % 8), &[v]),
                    None => uart.read(u64::from(offset % 8), &mut [0u8]),
                }
            }
            let _ = uart.save();
        }
    }
});
