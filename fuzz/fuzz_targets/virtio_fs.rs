//! virtio-fs: an INIT, then arbitrary FUSE requests in arbitrary chains,
//! served by the real device against a temporary directory.
//!
//! Oracles: nothing outside the shared directory changes (a sibling
//! directory, and what the shared directory's symbolic links point at), the
//! guest never holds more than the device's bounds, and dropping the device
//! gives back every descriptor it opened.
//!
//! Safety of the fuzzing host: requests run as root with what arrow-vmm
//! keeps, so the process first enters a mount namespace of its own with a
//! small `nodev` tmpfs for its directories (no device node the guest makes
//! can be opened, no file can fill the host's disk) and keeps only the six
//! capabilities arrow-vmm keeps (no `CAP_MKNOD`, no `CAP_SYS_ADMIN`).

#![no_main]

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

use arrow_fuzz::{publish, Desc, DATA, RINGS};
use vmm_core::devices::irq::IrqLine;
use vmm_core::fuzzing::{fs_process_queue, GuestQueue};
use vmm_core::virtio::fs::{FsLimits, VirtioFs, REQUEST_QUEUE_INDEX};
use vmm_core::virtio::{Interrupt, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

/// FUSE opcodes worth sending (1..=51 as of Linux 6.x) and a few wrong ones.
const OPCODES: u32 = 52;
const HEADER_LEN: usize = 40;
/// Small bounds, so the fuzzer reaches them.
const LIMITS: FsLimits = FsLimits {
    max_inodes: 8,
    max_handles: 4,
};

#[derive(Arbitrary, Debug)]
struct Request {
    opcode: u32,
    /// Node id: the root, a small one, or anything.
    nodeid: Option<u64>,
    /// The caller: root, or an unprivileged user.
    unprivileged: bool,
    args: Vec<u8>,
    /// A name (NUL-terminated) after the fixed arguments.
    name: Option<String>,
    /// A header length other than the true one.
    len: Option<u32>,
    reply_cap: u16,
    /// Raw descriptors instead of one readable and one writable.
    raw: Option<Vec<Desc>>,
    hiprio: bool,
}

fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // SAFETY: plain system calls on constant, NUL-terminated strings;
        // the process is single-threaded at initialisation.
        unsafe {
            assert_eq!(libc::unshare(libc::CLONE_NEWNS), 0, "unshare: run as root");
            let none = c"none";
            let slash = c"/";
            assert_eq!(
                libc::mount(
                    none.as_ptr(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                ),
                0
            );
        }
        let dir = std::env::temp_dir().join("arrow-fuzz-fs");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: as above.
        unsafe {
            assert_eq!(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    target.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NODEV | libc::MS_NOSUID,
                    c"size=32m,mode=0755".as_ptr().cast()
                ),
                0,
                "mounting a tmpfs"
            );
        }
        let keep = [
            caps::Capability::CAP_CHOWN,
            caps::Capability::CAP_DAC_OVERRIDE,
            caps::Capability::CAP_FOWNER,
            caps::Capability::CAP_FSETID,
            caps::Capability::CAP_SETUID,
            caps::Capability::CAP_SETGID,
        ]
        .into_iter()
        .collect();
        caps::set(None, caps::CapSet::Effective, &keep).expect("capabilities");
        caps::set(None, caps::CapSet::Permitted, &keep).expect("capabilities");
        dir
    })
}

/// Everything under `dir` (not following links): path → (mode, size,
/// mtime, contents of regular files).
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let data = if m.is_file() {
                std::fs::read(&p).unwrap_or_default()
            } else {
                Vec::new()
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p, (m.mode(), m.size(), m.mtime(), data));
        }
    }
    out
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fuzz_target!(|reqs: Vec<Request>| {
    if reqs.len() > 32 {
        return;
    }
    let root = root();
    let _ = std::fs::remove_dir_all(root.join("shared"));
    let _ = std::fs::remove_dir_all(root.join("outside"));
    let shared = root.join("shared");
    let outside = root.join("outside");
    std::fs::create_dir_all(shared.join("d")).expect("shared dir");
    std::fs::create_dir_all(&outside).expect("outside dir");
    std::fs::write(outside.join("secret"), b"host only").expect("secret");
    std::fs::write(shared.join("f"), b"guest file").expect("file");
    std::os::unix::fs::symlink("../outside/secret", shared.join("up")).expect("link");
    std::os::unix::fs::symlink(&outside, shared.join("abs")).expect("link");
    let before_outside = tree(&outside);
    let before_root: Vec<_> = std::fs::read_dir(root)
        .expect("root")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let fds = open_fds();

    {
        let mem = arrow_fuzz::guest_memory();
        let mut hi = GuestQueue::new(&mem, RINGS);
        let mut rq = GuestQueue::new(&mem, RINGS + 0x1000);
        let mut dev = VirtioFs::with_limits("fuzz", &shared, false, LIMITS).expect("the device");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let interrupt = std::sync::Arc::new(Interrupt::new(IrqLine::new(5, irq)));
        dev.activate(
            mem.clone(),
            interrupt,
            vec![
                hi.mock.create_queue().expect("queue"),
                rq.mock.create_queue().expect("queue"),
            ],
        )
        .expect("activation");

        // INIT 7.31, so the server takes the rest.
        let mut init = Vec::new();
        for v in [7u32, 31, 0x20000, 0] {
            init.extend(v.to_le_bytes());
        }
        send(&mem, &mut rq, (26, 0, 0, 0), &init, None, None, 512, None);
        fs_process_queue(&mut dev, REQUEST_QUEUE_INDEX);

        for (i, r) in reqs.into_iter().enumerate() {
            let nodeid = match r.nodeid {
                None => 1,
                Some(n) if n < 1 << 20 => n % 16,
                Some(n) => n,
            };
            let q = if r.hiprio { &mut hi } else { &mut rq };
            let uid = if r.unprivileged { 1000 } else { 0 };
            send(
                &mem,
                q,
                (r.opcode % OPCODES, nodeid, i as u64 + 2, uid),
                &r.args,
                r.name.as_deref(),
                r.len,
                u32::from(r.reply_cap),
                r.raw.as_deref(),
            );
            fs_process_queue(&mut dev, usize::from(r.hiprio) ^ 1);
            let usage = dev.usage();
            assert!(usage.inodes <= LIMITS.max_inodes, "{usage:?}");
            assert!(usage.handles <= LIMITS.max_handles, "{usage:?}");
        }
    }

    assert_eq!(
        tree(&outside),
        before_outside,
        "the guest changed a host file"
    );
    let after_root: Vec<_> = std::fs::read_dir(root)
        .expect("root")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        after_root, before_root,
        "the guest made a file outside its share"
    );
    assert_eq!(open_fds(), fds, "descriptors leaked past the device");
});

#[allow(clippy::too_many_arguments)]
fn send(
    mem: &vmm_core::virtio::GuestMemory,
    q: &mut GuestQueue<'_>,
    (opcode, nodeid, unique, uid): (u32, u64, u64, u32),
    args: &[u8],
    name: Option<&str>,
    len: Option<u32>,
    reply_cap: u32,
    raw: Option<&[Desc]>,
) {
    let mut body = args.to_vec();
    if let Some(name) = name {
        body.extend(name.as_bytes());
        body.push(0);
    }
    body.truncate(0x4000);
    let total = (HEADER_LEN + body.len()) as u32;
    let mut req = Vec::with_capacity(total as usize);
    req.extend(len.unwrap_or(total).to_le_bytes());
    req.extend(opcode.to_le_bytes());
    req.extend(unique.to_le_bytes());
    req.extend(nodeid.to_le_bytes());
    req.extend(uid.to_le_bytes());
    req.extend(uid.to_le_bytes());
    req.extend([0u8; 8]);
    req.extend(&body);
    mem.write_slice(&req, GuestAddress(DATA))
        .expect("DATA is guest memory");
    match raw {
        Some(descs) if !descs.is_empty() && descs.len() <= 16 => {
            publish(q, descs);
        }
        _ => {
            let reply = DATA + 0x8000;
            publish(
                q,
                &arrow_fuzz::well_formed(&[
                    (DATA, total, false),
                    (reply, reply_cap.min(0x8000), true),
                ]),
            );
        }
    }
}
