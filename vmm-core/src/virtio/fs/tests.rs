//! End-to-end tests: a fake guest FUSE driver on real guest memory, the
//! device on a real event manager, a real host directory behind it.

use std::ffi::CString;
use std::mem::size_of;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, BatchForgetIn, CreateIn, Dirent, EntryOut, ForgetOne, InHeader, InitIn, InitOut,
    MkdirIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, WriteIn, KERNEL_MINOR_VERSION,
    KERNEL_VERSION, ROOT_ID,
};
use virtio_bindings::virtio_mmio as regs;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::irq::IrqLine;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::test_utils::{new_mem, GuestQueue, MEM_SIZE, QSIZE};
use crate::virtio::{status, GuestMemory, Interrupt, VirtioDevice};

const HELLO: &[u8] = b"hello from the host\n";

type Em = EventManager<Arc<Mutex<VirtioFs>>>;

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir =
        std::env::temp_dir().join(format!("arrow-fs-e2e-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// A reply: the header and the bytes after it.
struct Reply {
    header: OutHeader,
    body: Vec<u8>,
}

impl Reply {
    fn obj<T: ByteValued>(&self) -> T {
        assert_eq!(self.header.error, 0, "FUSE error {}", self.header.error);
        T::from_slice(&self.body[..size_of::<T>()])
            .copied()
            .unwrap()
    }
}

/// The fake guest: its FUSE driver and the device on an event loop.
struct Guest<'a> {
    mem: &'a GuestMemory,
    hiprio: GuestQueue<'a>,
    req: GuestQueue<'a>,
    dev: Arc<Mutex<VirtioFs>>,
    em: Em,
    irq: EventFd,
    unique: u64,
    /// Request and reply buffers.
    in_buf: u64,
    out_buf: u64,
}

impl<'a> Guest<'a> {
    /// Activates `dev` on fresh queues in `mem` and puts it on an event loop.
    fn start(mem: &'a GuestMemory, dev: VirtioFs) -> Self {
        let hiprio = GuestQueue::new(mem, 0x1_0000);
        let req = GuestQueue::new(mem, 0x2_0000);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(IrqLine::new(5, irq.try_clone().unwrap())));
        let dev = Arc::new(Mutex::new(dev));
        dev.lock()
            .unwrap()
            .activate(
                mem.clone(),
                interrupt,
                vec![
                    hiprio.mock.create_queue().unwrap(),
                    req.mock.create_queue().unwrap(),
                ],
            )
            .unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        Self {
            mem,
            hiprio,
            req,
            dev,
            em,
            irq,
            unique: 0,
            in_buf: 0x10_0000,
            out_buf: 0x20_0000,
        }
    }

    /// Activates the device again on fresh rings, as a driver does after a
    /// reset.
    fn reactivate(&mut self) {
        self.hiprio = GuestQueue::new(self.mem, 0x1_0000);
        self.req = GuestQueue::new(self.mem, 0x2_0000);
        let interrupt = Arc::new(Interrupt::new(IrqLine::new(
            5,
            self.irq.try_clone().unwrap(),
        )));
        self.dev
            .lock()
            .unwrap()
            .activate(
                self.mem.clone(),
                interrupt,
                vec![
                    self.hiprio.mock.create_queue().unwrap(),
                    self.req.mock.create_queue().unwrap(),
                ],
            )
            .unwrap();
    }

    /// Tells the device about queue `index` and runs the event loop until
    /// one chain comes back on it; returns its used length.
    fn kick_and_wait(&mut self, index: usize) -> u32 {
        self.dev.lock().unwrap().queue_events()[index]
            .write(1)
            .unwrap();
        for _ in 0..100 {
            self.em.run_with_timeout(100).unwrap();
            let q = if index == HIPRIO_QUEUE_INDEX {
                &mut self.hiprio
            } else {
                &mut self.req
            };
            let used = q.take_used();
            if !used.is_empty() {
                assert_eq!(used.len(), 1, "one chain per request");
                assert!(self.irq.read().unwrap() >= 1, "used-buffer interrupt");
                return used[0].1;
            }
        }
        panic!("no reply on queue {index}");
    }

    /// The request bytes: header (with the right length) then `args`.
    fn request_bytes(&mut self, opcode: Opcode, nodeid: u64, args: &[u8]) -> Vec<u8> {
        self.unique += 1;
        let header = InHeader {
            len: (size_of::<InHeader>() + args.len()) as u32,
            opcode: opcode as u32,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let mut bytes = header.as_slice().to_vec();
        bytes.extend_from_slice(args);
        bytes
    }

    /// Sends one request in one readable descriptor, with one writable
    /// descriptor of `reply_cap` bytes, and returns the reply.
    fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[u8], reply_cap: u32) -> Reply {
        let bytes = self.request_bytes(opcode, nodeid, args);
        self.mem
            .write_slice(&bytes, GuestAddress(self.in_buf))
            .unwrap();
        self.req.add_chain(&[
            (self.in_buf, bytes.len() as u32, false),
            (self.out_buf, reply_cap, true),
        ]);
        let len = self.kick_and_wait(REQUEST_QUEUE_INDEX);
        self.read_reply(len, self.unique)
    }

    fn read_reply(&self, len: u32, unique: u64) -> Reply {
        let mut bytes = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(self.out_buf))
            .unwrap();
        let header = *OutHeader::from_slice(&bytes[..size_of::<OutHeader>()]).unwrap();
        assert_eq!(header.len, len, "header length matches the used length");
        assert_eq!(header.unique, unique);
        Reply {
            header,
            body: bytes[size_of::<OutHeader>()..].to_vec(),
        }
    }

    fn init(&mut self) -> InitOut {
        self.init_with(0)
    }

    fn init_with(&mut self, flags: u32) -> InitOut {
        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0x20000,
            flags,
        };
        let out: InitOut = self.call(Opcode::Init, 0, init.as_slice(), 256).obj();
        assert_eq!(out.major, KERNEL_VERSION);
        out
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        let name = CString::new(name).unwrap();
        self.call(Opcode::Lookup, parent, name.as_bytes_with_nul(), 256)
    }

    fn open(&mut self, nodeid: u64, flags: i32) -> Reply {
        let open = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        self.call(Opcode::Open, nodeid, open.as_slice(), 256)
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> Reply {
        let mut args = MkdirIn {
            mode: 0o755,
            umask: 0,
        }
        .as_slice()
        .to_vec();
        args.extend_from_slice(CString::new(name).unwrap().as_bytes_with_nul());
        self.call(Opcode::Mkdir, parent, &args, 256)
    }

    /// FUSE_CREATE of `name` for reading and writing.
    fn create(&mut self, parent: u64, name: &str) -> Reply {
        let mut args = CreateIn {
            flags: libc::O_RDWR as u32,
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        }
        .as_slice()
        .to_vec();
        args.extend_from_slice(CString::new(name).unwrap().as_bytes_with_nul());
        self.call(Opcode::Create, parent, &args, 512)
    }

    fn unlink(&mut self, parent: u64, name: &str) -> Reply {
        let name = CString::new(name).unwrap();
        self.call(Opcode::Unlink, parent, name.as_bytes_with_nul(), 256)
    }

    fn opendir(&mut self, nodeid: u64) -> Reply {
        let open = OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        };
        self.call(Opcode::Opendir, nodeid, open.as_slice(), 256)
    }

    /// RELEASE (or RELEASEDIR) of `fh`; asserts it succeeded.
    fn release(&mut self, opcode: Opcode, nodeid: u64, fh: u64) {
        let release = ReleaseIn {
            fh,
            ..Default::default()
        };
        let reply = self.call(opcode, nodeid, release.as_slice(), 256);
        assert_eq!(reply.header.error, 0, "release {fh}");
    }

    /// Sends a request without a reply (FORGET, BATCH_FORGET) on the
    /// hiprio queue, as the guest does.
    fn send_no_reply(&mut self, opcode: Opcode, nodeid: u64, args: &[u8]) {
        let bytes = self.request_bytes(opcode, nodeid, args);
        self.mem
            .write_slice(&bytes, GuestAddress(self.in_buf))
            .unwrap();
        let in_buf = self.in_buf;
        self.hiprio
            .add_chain(&[(in_buf, bytes.len() as u32, false)]);
        assert_eq!(self.kick_and_wait(HIPRIO_QUEUE_INDEX), 0);
    }

    fn forget(&mut self, nodeid: u64, nlookup: u64) {
        self.send_no_reply(Opcode::Forget, nodeid, &nlookup.to_le_bytes());
    }

    fn batch_forget(&mut self, nodes: &[u64]) {
        let mut args = BatchForgetIn {
            count: nodes.len() as u32,
            dummy: 0,
        }
        .as_slice()
        .to_vec();
        for &nodeid in nodes {
            args.extend_from_slice(ForgetOne { nodeid, nlookup: 1 }.as_slice());
        }
        self.send_no_reply(Opcode::BatchForget, 0, &args);
    }

    /// READDIRPLUS of the open directory `fh` from `offset`: the entries'
    /// node ids and the offset after the last one, or the FUSE error.
    fn readdirplus(&mut self, fh: u64, offset: u64) -> Result<(Vec<u64>, u64), i32> {
        let args = ReadIn {
            offset,
            ..read_in(fh, 0x8000)
        };
        let reply = self.call(Opcode::Readdirplus, ROOT_ID, args.as_slice(), 0x8000);
        if reply.header.error != 0 {
            return Err(reply.header.error);
        }
        let (mut nodes, mut next, mut at) = (Vec::new(), offset, 0);
        while at < reply.body.len() {
            let entry = EntryOut::from_slice(&reply.body[at..at + size_of::<EntryOut>()]).unwrap();
            let dirent_at = at + size_of::<EntryOut>();
            let dirent =
                Dirent::from_slice(&reply.body[dirent_at..dirent_at + size_of::<Dirent>()])
                    .unwrap();
            nodes.push(entry.nodeid);
            next = dirent.off;
            let len = size_of::<EntryOut>() + size_of::<Dirent>() + dirent.namelen as usize;
            at += len.next_multiple_of(8);
        }
        Ok((nodes, next))
    }

    fn usage(&self) -> FsUsage {
        self.dev.lock().unwrap().usage()
    }
}

/// Small bounds, so tests reach them quickly.
const SMALL: FsLimits = FsLimits {
    max_inodes: 64,
    max_handles: 16,
};

/// The VMM's descriptors that point into `dir` (the passthrough's inodes
/// and open files), from `/proc/self/fd`. Counted by target so descriptors
/// other tests open at the same time do not blur the figure.
fn fds_into(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

fn read_in(fh: u64, size: u32) -> ReadIn {
    ReadIn {
        fh,
        offset: 0,
        size,
        ..Default::default()
    }
}

#[test]
fn init_lookup_open_read_through_the_event_loop() {
    let dir = temp_dir("read");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(&mem, VirtioFs::new("share", &dir, false).unwrap());

    g.init();
    let entry: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    assert_ne!(entry.nodeid, 0);
    assert_eq!(entry.attr.size, HELLO.len() as u64);
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);

    let open: OpenOut = g.open(entry.nodeid, libc::O_RDONLY).obj();

    // READ, with the request in two descriptors and the reply in three: the
    // header alone, then the data split across two buffers.
    let header_and_args = g.request_bytes(
        Opcode::Read,
        entry.nodeid,
        read_in(open.fh, 4096).as_slice(),
    );
    let unique = g.unique;
    let (hdr, args) = header_and_args.split_at(size_of::<InHeader>());
    let (in0, in1) = (g.in_buf, g.in_buf + 0x1000);
    mem.write_slice(hdr, GuestAddress(in0)).unwrap();
    mem.write_slice(args, GuestAddress(in1)).unwrap();
    let out = g.out_buf;
    g.req.add_chain(&[
        (in0, hdr.len() as u32, false),
        (in1, args.len() as u32, false),
        (out, size_of::<OutHeader>() as u32, true),
        (out + size_of::<OutHeader>() as u64, 5, true),
        (out + size_of::<OutHeader>() as u64 + 5, 4091, true),
    ]);
    let len = g.kick_and_wait(REQUEST_QUEUE_INDEX);
    let reply = g.read_reply(len, unique);
    assert_eq!(reply.header.error, 0);
    assert_eq!(reply.body, HELLO);

    // A name that does not exist is ENOENT, not a failure.
    let missing = g.lookup(ROOT_ID, "missing");
    assert_eq!(missing.header.error, -libc::ENOENT);
    // ".." must not climb out of the shared directory: it is the root.
    let dotdot: EntryOut = g.lookup(ROOT_ID, "..").obj();
    assert_eq!(dotdot.nodeid, ROOT_ID);

    // FORGET on the hiprio queue: no reply, the chain comes back empty.
    let forget = g.request_bytes(Opcode::Forget, entry.nodeid, &1u64.to_le_bytes());
    mem.write_slice(&forget, GuestAddress(g.in_buf)).unwrap();
    let in_buf = g.in_buf;
    g.hiprio.add_chain(&[(in_buf, forget.len() as u32, false)]);
    assert_eq!(g.kick_and_wait(HIPRIO_QUEUE_INDEX), 0);

    // A write lands on the host.
    let made = g.mkdir(ROOT_ID, "made-by-guest");
    assert_eq!(made.header.error, 0);
    assert!(dir.join("made-by-guest").is_dir());

    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_guest_keeps_file_pages_across_opens_and_drops_changed_ones() {
    use fuse_backend_rs::abi::fuse_abi::{FsOptions, OpenOptions};

    let dir = temp_dir("cache");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(&mem, VirtioFs::new("share", &dir, false).unwrap());

    let kernel = FsOptions::AUTO_INVAL_DATA | FsOptions::ASYNC_READ;
    let init = g.init_with(kernel.bits() as u32);
    let agreed = FsOptions::from_bits_truncate(u64::from(init.flags));
    assert!(agreed.contains(FsOptions::AUTO_INVAL_DATA), "{agreed:?}");
    // Nothing the kernel did not offer.
    assert!(!agreed.contains(FsOptions::WRITEBACK_CACHE), "{agreed:?}");

    let entry: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    let open: OpenOut = g.open(entry.nodeid, libc::O_RDONLY).obj();
    let options = OpenOptions::from_bits_truncate(open.open_flags);
    assert!(options.contains(OpenOptions::KEEP_CACHE), "{options:?}");
    assert!(!options.contains(OpenOptions::DIRECT_IO), "{options:?}");

    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn counters_follow_requests_errors_and_file_data() {
    let dir = temp_dir("stats");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(&mem, VirtioFs::new("share", &dir, false).unwrap());
    let stats = |g: &Guest| g.dev.lock().unwrap().stats();
    assert_eq!(stats(&g), FsStats::default());

    g.init();
    // Errors: a missing name, and a write to a handle that does not exist.
    assert_eq!(g.lookup(ROOT_ID, "missing").header.error, -libc::ENOENT);
    let created: EntryOut = g.create(ROOT_ID, "new.txt").obj();
    let other = g.create(ROOT_ID, "other.txt");
    let (entry, open) = other.body.split_at(size_of::<EntryOut>());
    let other = EntryOut::from_slice(entry).unwrap().nodeid;
    let fh = OpenOut::from_slice(&open[..size_of::<OpenOut>()])
        .unwrap()
        .fh;
    let data = b"twelve bytes";
    let mut write = WriteIn {
        fh,
        size: data.len() as u32,
        ..Default::default()
    }
    .as_slice()
    .to_vec();
    write.extend_from_slice(data);
    assert_eq!(g.call(Opcode::Write, other, &write, 256).header.error, 0);
    assert_eq!(std::fs::read(dir.join("other.txt")).unwrap(), data);
    let bad_write = {
        let mut w = WriteIn {
            fh: 0xdead,
            size: 1,
            ..Default::default()
        }
        .as_slice()
        .to_vec();
        w.push(b'x');
        w
    };
    assert_ne!(
        g.call(Opcode::Write, created.nodeid, &bad_write, 256)
            .header
            .error,
        0
    );
    let hello: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    let open: OpenOut = g.open(hello.nodeid, libc::O_RDONLY).obj();
    let read = g.call(
        Opcode::Read,
        hello.nodeid,
        read_in(open.fh, 4096).as_slice(),
        8192,
    );
    assert_eq!(read.body, HELLO);
    // No reply: not an error.
    g.forget(hello.nodeid, 1);
    // No reply buffer at all: unanswered.
    let lookup = g.request_bytes(Opcode::Lookup, ROOT_ID, b"hello.txt\0");
    mem.write_slice(&lookup, GuestAddress(g.in_buf)).unwrap();
    let in_buf = g.in_buf;
    g.req.add_chain(&[(in_buf, lookup.len() as u32, false)]);
    assert_eq!(g.kick_and_wait(REQUEST_QUEUE_INDEX), 0);

    assert_eq!(
        stats(&g),
        FsStats {
            // init, lookup, 2 creates, 2 writes, lookup, open, read,
            // forget, the chain without a reply buffer.
            requests: 11,
            errors: 2,
            unanswered: 1,
            read_bytes: HELLO.len() as u64,
            write_bytes: data.len() as u64,
        }
    );
    // A reset of the device keeps them.
    g.dev.lock().unwrap().reset();
    assert_eq!(stats(&g).requests, 11);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn malformed_chains_are_used_without_a_panic() {
    let dir = temp_dir("malformed");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(&mem, VirtioFs::new("share", &dir, false).unwrap());
    g.init();
    let (inb, outb) = (g.in_buf, g.out_buf);
    let beyond = MEM_SIZE as u64 + 0x1000;
    let w = VRING_DESC_F_WRITE as u16;
    let n = VRING_DESC_F_NEXT as u16;

    let lookup = g.request_bytes(Opcode::Lookup, ROOT_ID, b"hello.txt\0");
    mem.write_slice(&lookup, GuestAddress(inb)).unwrap();
    let len = lookup.len() as u32;
    let mut huge = lookup.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    mem.write_slice(&huge, GuestAddress(inb + 0x1000)).unwrap();
    let mut short = lookup.clone();
    short[..4].copy_from_slice(&8u32.to_le_bytes());
    mem.write_slice(&short, GuestAddress(inb + 0x2000)).unwrap();

    let chains: Vec<Vec<(u64, u32, u16, u16)>> = vec![
        // The request lies outside guest memory.
        vec![(beyond, len, n, 1), (outb, 256, w, 0)],
        // The request straddles the end of guest memory.
        vec![(MEM_SIZE as u64 - 8, len, n, 1), (outb, 256, w, 0)],
        // The reply buffer lies outside guest memory.
        vec![(inb, len, n, 1), (beyond, 256, w, 0)],
        // Too short for a header.
        vec![(inb, 8, n, 1), (outb, 256, w, 0)],
        // No reply buffer at all.
        vec![(inb, len, 0, 0)],
        // A reply buffer too small for the reply.
        vec![(inb, len, n, 1), (outb, 4, w, 0)],
        // The header claims 4 GiB.
        vec![(inb + 0x1000, len, n, 1), (outb, 256, w, 0)],
        // The header claims less than itself.
        vec![(inb + 0x2000, len, n, 1), (outb, 256, w, 0)],
        // `next` points past the descriptor table.
        vec![(inb, len, n, QSIZE + 7)],
        // Zero-length descriptors.
        vec![(inb, 0, n, 1), (outb, 0, w, 0)],
    ];
    let mut lens = Vec::new();
    for chain in chains {
        // Chains here use table slots 0.. with `next` relative to 0.
        g.req.next_desc = 0;
        g.req.add_raw(&chain);
        // Every chain is given back, never with more bytes than it could
        // hold.
        let writable: u32 = chain.iter().filter(|d| d.2 & w != 0).map(|d| d.1).sum();
        let used = g.kick_and_wait(REQUEST_QUEUE_INDEX);
        assert!(used <= writable, "{chain:x?}: used {used} of {writable}");
        lens.push(used);
    }

    // Outside memory, no reply buffer, a bad `next`: nothing written. A
    // header claiming 4 GiB: an error reply (header only).
    assert_eq!(
        (lens[0], lens[1], lens[2], lens[4], lens[8]),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(lens[6], size_of::<OutHeader>() as u32);
    let enomem = *OutHeader::from_slice(&{
        let mut b = [0u8; 16];
        mem.read_slice(&mut b, GuestAddress(outb)).unwrap();
        b
    })
    .unwrap();
    assert_eq!(enomem.error, -libc::ENOMEM);

    // A descriptor loop: 0 -> 1 -> 0.
    g.req.next_desc = 0;
    g.req.add_raw(&[(inb, len, n, 1), (outb, 256, w | n, 0)]);
    let _ = g.kick_and_wait(REQUEST_QUEUE_INDEX);

    // The device still works.
    g.req.next_desc = 0;
    let entry: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    assert_eq!(entry.attr.size, HELLO.len() as u64);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn read_only_refuses_every_change() {
    let dir = temp_dir("ro");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(&mem, VirtioFs::new("ro", &dir, true).unwrap());
    g.init();
    let erofs = -libc::EROFS;

    assert_eq!(g.mkdir(ROOT_ID, "nope").header.error, erofs);
    assert!(!dir.join("nope").exists());

    let entry: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(
            g.open(entry.nodeid, flags).header.error,
            erofs,
            "{flags:#x}"
        );
    }
    let mut create = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    }
    .as_slice()
    .to_vec();
    create.extend_from_slice(b"new.txt\0");
    assert_eq!(
        g.call(Opcode::Create, ROOT_ID, &create, 256).header.error,
        erofs
    );
    assert!(!dir.join("new.txt").exists());
    let unlink = g.call(Opcode::Unlink, ROOT_ID, b"hello.txt\0", 256);
    assert_eq!(unlink.header.error, erofs);
    let access_w = AccessIn {
        mask: libc::W_OK as u32,
        padding: 0,
    };
    assert_eq!(
        g.call(Opcode::Access, entry.nodeid, access_w.as_slice(), 256)
            .header
            .error,
        erofs
    );
    // An opcode the policy does not know is refused too.
    assert_eq!(
        g.call(Opcode::Fallocate, entry.nodeid, &[0; 32], 256)
            .header
            .error,
        erofs
    );

    // Reading still works.
    let open: OpenOut = g.open(entry.nodeid, libc::O_RDONLY).obj();
    let reply = g.call(
        Opcode::Read,
        entry.nodeid,
        read_in(open.fh, 4096).as_slice(),
        8192,
    );
    assert_eq!(reply.header.error, 0);
    assert_eq!(reply.body, HELLO);
    assert_eq!(std::fs::read(dir.join("hello.txt")).unwrap(), HELLO);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
    t.write(u64::from(reg), &v.to_le_bytes());
}

fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn feature_negotiation_and_config_through_mmio() {
    let dir = temp_dir("mmio");
    let mem = new_mem();
    let dev = Arc::new(Mutex::new(VirtioFs::new("myfs", &dir, false).unwrap()));
    let irq = IrqLine::new(5, EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(mem, dev.clone(), irq);

    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_FS);
    wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    wr(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_DEVICE_FEATURES),
        1,
        "VERSION_1 only"
    );
    for q in 0..2 {
        wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, q);
        assert_eq!(
            rd(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX),
            u32::from(QUEUE_SIZE)
        );
    }
    wr(&mut t, regs::VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(rd(&mut t, regs::VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "two queues");

    // The tag and queue count through the config window.
    let mut tag = [0u8; TAG_LEN];
    t.read(u64::from(regs::VIRTIO_MMIO_CONFIG), &mut tag);
    assert_eq!(&tag[..5], b"myfs\0");
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_CONFIG + TAG_LEN as u32),
        NUM_REQUEST_QUEUES
    );

    // A driver asking for an unoffered bit does not get FEATURES_OK.
    let ad = status::ACKNOWLEDGE | status::DRIVER;
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ad);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_FS_F_NOTIFICATION
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ad | status::FEATURES_OK);
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_STATUS) & status::FEATURES_OK,
        0
    );

    // After a reset, VERSION_1 alone is accepted.
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, 0);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ad);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(&mut t, regs::VIRTIO_MMIO_STATUS, ad | status::FEATURES_OK);
    assert_eq!(
        rd(&mut t, regs::VIRTIO_MMIO_STATUS),
        ad | status::FEATURES_OK
    );
    assert_eq!(dev.lock().unwrap().acked_features(), 1 << 32);
    drop(t);
    drop(dev);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn snapshot_state_round_trip_and_restore_on_another_directory() {
    let template_dir = temp_dir("tmpl");
    let mut dev = VirtioFs::new("pod-rootfs", &template_dir, false).unwrap();
    dev.set_acked_features(1 << 32);
    let state = dev.save().unwrap();
    assert_eq!(
        state,
        VirtioFsState {
            tag: "pod-rootfs".into(),
            acked_features: 1 << 32,
        }
    );
    let bytes = postcard::to_allocvec(&state).unwrap();
    let back: VirtioFsState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, state);

    // Invalid states are errors.
    let unoffered = VirtioFsState {
        acked_features: (1 << 32) | 1,
        ..state.clone()
    };
    assert!(matches!(
        VirtioFs::restore(&unoffered, &template_dir, false),
        Err(FsError::UnofferedFeatures { .. })
    ));
    let bad_tag = VirtioFsState {
        tag: "t".repeat(TAG_LEN + 1),
        ..state.clone()
    };
    assert!(matches!(
        VirtioFs::restore(&bad_tag, &template_dir, false),
        Err(FsError::InvalidTag(_))
    ));

    // The clone's device shares its own directory.
    let clone_dir = temp_dir("clone");
    std::fs::write(clone_dir.join("only-in-clone"), HELLO).unwrap();
    let restored = VirtioFs::restore(&back, &clone_dir, true).unwrap();
    assert_eq!(restored.save().unwrap(), state);
    assert!(!restored.is_activated());
    assert!(restored.read_only());
    assert_eq!(restored.shared_dir(), clone_dir.as_path());
    let mem = new_mem();
    let mut g = Guest::start(&mem, restored);
    g.init();
    let entry: EntryOut = g.lookup(ROOT_ID, "only-in-clone").obj();
    assert_eq!(entry.attr.size, HELLO.len() as u64);
    drop(g);
    drop(dev);
    std::fs::remove_dir_all(&template_dir).unwrap();
    std::fs::remove_dir_all(&clone_dir).unwrap();
}

#[test]
fn reset_drops_the_fuse_session() {
    let dir = temp_dir("reset");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(&mem, VirtioFs::new("share", &dir, false).unwrap());
    g.init();
    let entry: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    assert_eq!(
        g.call(Opcode::Getattr, entry.nodeid, &[0; 16], 256)
            .header
            .error,
        0
    );

    g.dev.lock().unwrap().reset();
    assert!(!g.dev.lock().unwrap().is_activated());
    assert!(g.dev.lock().unwrap().queues().is_empty());
    assert_eq!(g.dev.lock().unwrap().acked_features(), 0);

    // The driver probes again: new rings, a new session. The old node ID
    // is gone; the root works.
    g.reactivate();
    g.init();
    assert_ne!(
        g.call(Opcode::Getattr, entry.nodeid, &[0; 16], 256)
            .header
            .error,
        0
    );
    let again: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    assert_eq!(again.attr.size, HELLO.len() as u64);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_fuse_session_blocks_the_snapshot_until_destroy_or_reset() {
    let dir = temp_dir("session");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(&mem, VirtioFs::new("arrow", &dir, false).unwrap());
    // Activated but never used, as in a template: fresh.
    assert!(!g.dev.lock().unwrap().has_fuse_session());
    assert!(g.dev.lock().unwrap().save().is_ok());

    g.init();
    let entry: EntryOut = g.lookup(ROOT_ID, "hello.txt").obj();
    assert_ne!(entry.nodeid, 0);
    assert!(g.dev.lock().unwrap().has_fuse_session());
    let err = g.dev.lock().unwrap().save().unwrap_err();
    assert!(
        matches!(&err, FsError::SessionOpen { tag } if tag == "arrow"),
        "{err}"
    );
    assert!(err.to_string().contains("mounts the share"), "{err}");

    // The guest unmounts: FUSE_DESTROY ends the session.
    let bytes = g.request_bytes(Opcode::Destroy, 0, &[]);
    g.mem.write_slice(&bytes, GuestAddress(g.in_buf)).unwrap();
    let (in_buf, out_buf) = (g.in_buf, g.out_buf);
    g.req
        .add_chain(&[(in_buf, bytes.len() as u32, false), (out_buf, 256, true)]);
    assert_eq!(
        g.kick_and_wait(REQUEST_QUEUE_INDEX),
        0,
        "DESTROY has no reply"
    );
    assert!(!g.dev.lock().unwrap().has_fuse_session());
    assert!(g.dev.lock().unwrap().save().is_ok());

    // A new session, then a device reset, which also ends it.
    g.init();
    assert!(g.dev.lock().unwrap().has_fuse_session());
    g.dev.lock().unwrap().reset();
    assert!(!g.dev.lock().unwrap().has_fuse_session());
    assert!(g.dev.lock().unwrap().save().is_ok());
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn creating_and_deleting_many_files_keeps_host_resources_flat() {
    let dir = temp_dir("churn");
    let mem = new_mem();
    let mut g = Guest::start(
        &mem,
        VirtioFs::with_limits("share", &dir, false, SMALL).unwrap(),
    );
    g.init();
    let baseline = fds_into(&dir);
    let mut peak = 0;
    // Far more files than either bound: each one created, written, closed,
    // deleted and forgotten, as a guest does.
    for i in 0..1000 {
        let name = format!("f{i}");
        let reply = g.create(ROOT_ID, &name);
        assert_eq!(reply.header.error, 0, "create {name}");
        let entry = EntryOut::from_slice(&reply.body[..size_of::<EntryOut>()])
            .copied()
            .unwrap();
        let open =
            OpenOut::from_slice(&reply.body[size_of::<EntryOut>()..][..size_of::<OpenOut>()])
                .copied()
                .unwrap();
        if i == 0 {
            // Node ids come from host inode numbers (`use_host_ino`), so the
            // passthrough keeps no mapping for a forgotten file.
            let ino =
                std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.join(&name)).unwrap());
            assert_eq!(entry.nodeid & ((1 << 47) - 1), ino);
        }
        peak = peak.max(fds_into(&dir));
        g.release(Opcode::Release, entry.nodeid, open.fh);
        assert_eq!(g.unlink(ROOT_ID, &name).header.error, 0);
        g.forget(entry.nodeid, 1);
    }
    assert_eq!(g.usage(), FsUsage::default());
    assert!(peak <= baseline + 2, "peak {peak}, baseline {baseline}");
    assert_eq!(fds_into(&dir), baseline);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lookups_past_the_inode_bound_get_enfile_without_leaking() {
    let dir = temp_dir("inodes");
    for i in 0..100 {
        std::fs::write(dir.join(format!("f{i:03}")), HELLO).unwrap();
    }
    let mem = new_mem();
    let mut g = Guest::start(
        &mem,
        VirtioFs::with_limits("share", &dir, false, SMALL).unwrap(),
    );
    g.init();
    let baseline = fds_into(&dir);
    let enfile = -libc::ENFILE;

    // A guest looking everything up and never forgetting.
    let mut held = Vec::new();
    for i in 0..100 {
        let reply = g.lookup(ROOT_ID, &format!("f{i:03}"));
        if i < SMALL.max_inodes {
            held.push(reply.obj::<EntryOut>().nodeid);
        } else {
            assert_eq!(reply.header.error, enfile, "f{i:03}");
        }
    }
    assert_eq!(g.usage().inodes, SMALL.max_inodes);
    // The refused lookups left nothing behind in the passthrough.
    assert_eq!(fds_into(&dir), baseline + SMALL.max_inodes);
    // An inode already held is no new one; the root is not counted.
    assert_eq!(g.lookup(ROOT_ID, "f000").obj::<EntryOut>().nodeid, held[0]);
    assert_eq!(g.lookup(ROOT_ID, "..").obj::<EntryOut>().nodeid, ROOT_ID);
    assert_eq!(g.usage().inodes, SMALL.max_inodes);
    // Creating is refused before it touches the host.
    assert_eq!(g.mkdir(ROOT_ID, "d").header.error, enfile);
    assert_eq!(g.create(ROOT_ID, "new").header.error, enfile);
    assert!(!dir.join("d").exists() && !dir.join("new").exists());

    // Forgetting ten makes room for exactly ten.
    g.batch_forget(&held[1..11]);
    assert_eq!(g.usage().inodes, SMALL.max_inodes - 10);
    for i in 64..74 {
        g.lookup(ROOT_ID, &format!("f{i:03}")).obj::<EntryOut>();
    }
    assert_eq!(g.lookup(ROOT_ID, "f074").header.error, enfile);

    // f000 was looked up twice: one FORGET of two drops it.
    g.forget(held[0], 2);
    assert_eq!(g.usage().inodes, SMALL.max_inodes - 1);
    assert_eq!(fds_into(&dir), baseline + SMALL.max_inodes - 1);

    // A reset (or FUSE_DESTROY) drops everything: a reset (on a vCPU
    // thread) leaves that to the event loop, which does it first.
    g.dev.lock().unwrap().reset();
    assert_eq!(g.usage().inodes, SMALL.max_inodes - 1);
    g.dev.lock().unwrap().finish_reset();
    assert_eq!(g.usage(), FsUsage::default());
    assert_eq!(fds_into(&dir), baseline);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn opens_past_the_handle_bound_get_enfile_until_a_release() {
    let dir = temp_dir("handles");
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    let mem = new_mem();
    let mut g = Guest::start(
        &mem,
        VirtioFs::with_limits("share", &dir, false, SMALL).unwrap(),
    );
    g.init();
    let baseline = fds_into(&dir);
    let enfile = -libc::ENFILE;
    let node = g.lookup(ROOT_ID, "hello.txt").obj::<EntryOut>().nodeid;

    let mut fhs: Vec<u64> = (0..SMALL.max_handles)
        .map(|_| g.open(node, libc::O_RDONLY).obj::<OpenOut>().fh)
        .collect();
    for _ in 0..50 {
        assert_eq!(g.open(node, libc::O_RDONLY).header.error, enfile);
    }
    assert_eq!(g.opendir(ROOT_ID).header.error, enfile);
    assert_eq!(g.create(ROOT_ID, "new").header.error, enfile);
    assert!(!dir.join("new").exists());
    assert_eq!(
        g.usage(),
        FsUsage {
            inodes: 1,
            handles: SMALL.max_handles
        }
    );
    assert_eq!(fds_into(&dir), baseline + 1 + SMALL.max_handles);

    // A release makes room for one more.
    let fh = fhs.pop().unwrap();
    g.release(Opcode::Release, node, fh);
    fhs.push(g.open(node, libc::O_RDONLY).obj::<OpenOut>().fh);
    assert_eq!(g.open(node, libc::O_RDONLY).header.error, enfile);
    // Releasing a handle twice, or one never opened, changes nothing.
    let reply = g.call(
        Opcode::Release,
        node,
        ReleaseIn {
            fh: u64::MAX,
            ..Default::default()
        }
        .as_slice(),
        256,
    );
    assert_ne!(reply.header.error, 0);
    assert_eq!(g.usage().handles, SMALL.max_handles);

    for fh in fhs {
        g.release(Opcode::Release, node, fh);
    }
    assert_eq!(g.usage().handles, 0);
    let dir_fh = g.opendir(ROOT_ID).obj::<OpenOut>().fh;
    assert_eq!(g.usage().handles, 1);
    g.release(Opcode::Releasedir, ROOT_ID, dir_fh);
    g.forget(node, 1);
    assert_eq!(g.usage(), FsUsage::default());
    assert_eq!(fds_into(&dir), baseline);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn readdirplus_stops_at_the_inode_bound() {
    let dir = temp_dir("readdirplus");
    for i in 0..100 {
        std::fs::write(dir.join(format!("f{i:03}")), HELLO).unwrap();
    }
    let mem = new_mem();
    let mut g = Guest::start(
        &mem,
        VirtioFs::with_limits("share", &dir, false, SMALL).unwrap(),
    );
    g.init();
    let baseline = fds_into(&dir);
    let fh = g.opendir(ROOT_ID).obj::<OpenOut>().fh;

    // Every entry of a READDIRPLUS is a lookup: the listing stops at the
    // bound, and the next call says why instead of an empty (EOF) reply.
    let (first, offset) = g.readdirplus(fh, 0).unwrap();
    assert_eq!(first.len(), SMALL.max_inodes);
    assert_eq!(g.usage().inodes, SMALL.max_inodes);
    assert_eq!(g.readdirplus(fh, offset), Err(-libc::ENFILE));
    assert_eq!(g.usage().inodes, SMALL.max_inodes);
    assert_eq!(fds_into(&dir), baseline + 1 + SMALL.max_inodes);

    // Once the guest forgets, the listing goes on where it stopped.
    g.batch_forget(&first);
    let (rest, end) = g.readdirplus(fh, offset).unwrap();
    assert_eq!(first.len() + rest.len(), 100);
    assert_eq!(g.readdirplus(fh, end), Ok((Vec::new(), end)));
    g.batch_forget(&rest);
    g.release(Opcode::Releasedir, ROOT_ID, fh);
    assert_eq!(g.usage(), FsUsage::default());
    assert_eq!(fds_into(&dir), baseline);
    drop(g);
    std::fs::remove_dir_all(&dir).unwrap();
}
