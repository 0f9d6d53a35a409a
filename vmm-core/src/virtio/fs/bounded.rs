//! Bounds on what the guest can make the passthrough file system hold.
//!
//! It exists because every FUSE request is attacker input: fuse-backend-rs's
//! `PassthroughFs` keeps an `O_PATH` descriptor for every inode the guest
//! has looked up and not forgotten, and another descriptor for every open
//! handle, with no limit of its own. [`BoundedFs`] wraps it, mirrors the
//! guest's lookup count of every inode (as the passthrough keeps it: each
//! returned entry adds one, FORGET takes away) and its open handles, and
//! refuses a new inode or handle past [`FsLimits`] with `ENFILE` ("too many
//! open files in the system": from the guest's side, the host's table is
//! full). A refused lookup gives the passthrough's reference back before
//! returning, so nothing leaks; requests that would create a file are
//! refused before they touch the host directory.
//!
//! The passthrough also runs with `use_host_ino` (see `device.rs`): without
//! it, it remembers the (device, inode) -> node id mapping of every file it
//! ever saw, even after the guest forgot it, so creating and deleting files
//! would grow the map without bound.

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid, ROOT_ID,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;
use log::warn;

/// Most inodes the guest may hold (looked up and not yet forgotten) on one
/// device, the root aside. Each holds one host descriptor (and pins a host
/// dentry and inode, about 1-2 KiB of kernel memory). 131072 is well past
/// what a guest caches while walking a large image (tens of thousands of
/// files for a big `node_modules`), and bounds the worst case to a few
/// hundred MiB of host kernel memory, charged to the VMM's cgroup.
pub const MAX_INODES: usize = 1 << 17;

/// Most files and directories the guest may hold open at once on one
/// device: each is one host descriptor. 16384 is sixteen times a
/// container's usual `ulimit -n` of 1024.
pub const MAX_HANDLES: usize = 1 << 14;

/// The bounds of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsLimits {
    /// Most inodes held by the guest (the root aside).
    pub max_inodes: usize,
    /// Most open handles.
    pub max_handles: usize,
}

impl Default for FsLimits {
    /// [`MAX_INODES`] and [`MAX_HANDLES`].
    fn default() -> Self {
        Self {
            max_inodes: MAX_INODES,
            max_handles: MAX_HANDLES,
        }
    }
}

/// What the guest holds right now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsUsage {
    /// Inodes looked up and not forgotten, the root aside.
    pub inodes: usize,
    /// Open file and directory handles.
    pub handles: usize,
}

/// The guest's references, mirrored from what the passthrough holds.
#[derive(Default)]
struct Live {
    /// The lookup count of every inode the guest holds, the root aside
    /// (the passthrough never drops it).
    inodes: HashMap<u64, u64>,
    handles: HashSet<u64>,
    /// Whether a refusal was logged since the count was last below its
    /// bound: a guest hammering a full table must not flood the host log.
    inodes_logged: bool,
    handles_logged: bool,
}

impl Live {
    fn is_new(&self, inode: u64) -> bool {
        inode != ROOT_ID && !self.inodes.contains_key(&inode)
    }

    fn add_inode(&mut self, inode: u64) {
        if inode != ROOT_ID {
            *self.inodes.entry(inode).or_insert(0) += 1;
        }
    }

    fn forget(&mut self, inode: u64, count: u64, limits: &FsLimits) {
        if let Some(held) = self.inodes.get_mut(&inode) {
            *held = held.saturating_sub(count);
            if *held == 0 {
                self.inodes.remove(&inode);
            }
        }
        if self.inodes.len() < limits.max_inodes {
            self.inodes_logged = false;
        }
    }

    fn add_handle(&mut self, handle: Option<u64>) {
        if let Some(handle) = handle {
            self.handles.insert(handle);
        }
    }

    fn release(&mut self, handle: u64, limits: &FsLimits) {
        self.handles.remove(&handle);
        if self.handles.len() < limits.max_handles {
            self.handles_logged = false;
        }
    }
}

/// File data the guest moved through the file system, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsIo {
    /// Returned by reads.
    pub read_bytes: u64,
    /// Taken by writes.
    pub write_bytes: u64,
}

/// Adds `n` bytes to a counter (wrapping: a counter of bytes cannot
/// reach 2^64 in practice, and a wrap must not panic a debug build).
fn count(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// `PassthroughFs` with bounded inodes and handles (see the module doc).
pub struct BoundedFs {
    inner: PassthroughFs,
    limits: FsLimits,
    live: Mutex<Live>,
    /// [`FsIo`]'s counters: atomics, since the file system is shared
    /// (`&self`) with the FUSE server; one relaxed add per read or write.
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
}

impl BoundedFs {
    /// Sets up the passthrough file system described by `cfg` and imports
    /// its root.
    pub fn new(cfg: Config, limits: FsLimits) -> io::Result<Self> {
        let inner = PassthroughFs::new(cfg)?;
        // The root inode, once; FUSE_DESTROY (and a device reset) re-import
        // it.
        inner.import()?;
        Ok(Self {
            inner,
            limits,
            live: Mutex::default(),
            read_bytes: AtomicU64::new(0),
            write_bytes: AtomicU64::new(0),
        })
    }

    /// The file data read and written since the file system was set up.
    pub fn io(&self) -> FsIo {
        FsIo {
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
        }
    }

    /// The bounds.
    pub fn limits(&self) -> FsLimits {
        self.limits
    }

    /// What the guest holds now.
    pub fn usage(&self) -> FsUsage {
        let live = self.live();
        FsUsage {
            inodes: live.inodes.len(),
            handles: live.handles.len(),
        }
    }

    /// The accounting, held across each request that changes it so the
    /// mirror cannot drift from the passthrough.
    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `ENFILE` for a full inode table, logged once per episode.
    fn inodes_full(&self, live: &mut Live) -> io::Error {
        if !live.inodes_logged {
            live.inodes_logged = true;
            warn!(
                "virtio-fs: the guest holds {} inodes, the bound: refusing new ones (ENFILE) \
                 until it forgets some",
                self.limits.max_inodes
            );
        }
        io::Error::from_raw_os_error(libc::ENFILE)
    }

    /// `ENFILE` for a full handle table, logged once per episode.
    fn handles_full(&self, live: &mut Live) -> io::Error {
        if !live.handles_logged {
            live.handles_logged = true;
            warn!(
                "virtio-fs: the guest holds {} open files, the bound: refusing new opens \
                 (ENFILE) until it releases some",
                self.limits.max_handles
            );
        }
        io::Error::from_raw_os_error(libc::ENFILE)
    }

    /// Refuses a request that would make a new inode when the table is full.
    fn room_for_inode(&self, live: &mut Live) -> io::Result<()> {
        if live.inodes.len() >= self.limits.max_inodes {
            return Err(self.inodes_full(live));
        }
        Ok(())
    }

    /// Refuses a request that would open a handle when the table is full.
    fn room_for_handle(&self, live: &mut Live) -> io::Result<()> {
        if live.handles.len() >= self.limits.max_handles {
            return Err(self.handles_full(live));
        }
        Ok(())
    }

    /// Counts an entry the passthrough returned (it took a reference), or,
    /// if it is a new inode past the bound, gives the reference back and
    /// refuses it.
    fn admit(&self, live: &mut Live, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if live.is_new(entry.inode) && live.inodes.len() >= self.limits.max_inodes {
            self.inner.forget(ctx, entry.inode, 1);
            return Err(self.inodes_full(live));
        }
        live.add_inode(entry.inode);
        Ok(entry)
    }
}

impl FileSystem for BoundedFs {
    type Inode = u64;
    type Handle = u64;

    /// As the passthrough's, plus `AUTO_INVAL_DATA`: with pages kept
    /// across opens (`CachePolicy::Always`), the guest drops a file's
    /// cached pages when a refreshed attribute shows it changed on the
    /// host (a hostPath volume, say), within the attribute timeout.
    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let wanted = self.inner.init(capable)?;
        Ok(wanted | (capable & FsOptions::AUTO_INVAL_DATA))
    }

    fn destroy(&self) {
        let mut live = self.live();
        self.inner.destroy();
        *live = Live::default();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let mut live = self.live();
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit(&mut live, ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        let mut live = self.live();
        self.inner.forget(ctx, inode, count);
        live.forget(inode, count, &self.limits);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        let mut live = self.live();
        for &(inode, count) in &requests {
            live.forget(inode, count, &self.limits);
        }
        self.inner.batch_forget(ctx, requests);
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let mut live = self.live();
        self.room_for_inode(&mut live)?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.admit(&mut live, ctx, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let mut live = self.live();
        self.room_for_inode(&mut live)?;
        let entry = self.inner.mknod(ctx, inode, name, mode, rdev, umask)?;
        self.admit(&mut live, ctx, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let mut live = self.live();
        self.room_for_inode(&mut live)?;
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.admit(&mut live, ctx, entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        // Usually an inode the guest holds already; `admit` refuses it past
        // the bound only if it is not.
        let mut live = self.live();
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.admit(&mut live, ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let mut live = self.live();
        self.room_for_handle(&mut live)?;
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        live.add_handle(opened.0);
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let mut live = self.live();
        // Checked before the file is made: after, refusing would leave it
        // on the host.
        self.room_for_inode(&mut live)?;
        self.room_for_handle(&mut live)?;
        let created = self.inner.create(ctx, parent, name, args)?;
        live.add_inode(created.0.inode);
        live.add_handle(created.1);
        Ok(created)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let n = self
            .inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)?;
        count(&self.read_bytes, n);
        Ok(n)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let n = self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )?;
        count(&self.write_bytes, n);
        Ok(n)
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let mut live = self.live();
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        live.release(handle, &self.limits);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let mut live = self.live();
        self.room_for_handle(&mut live)?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        live.add_handle(opened.0);
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut guard = self.live();
        let live = &mut *guard;
        let max = self.limits.max_inodes;
        let (mut added, mut refused) = (0usize, false);
        // Each entry comes with a reference the passthrough took. It gives
        // it back itself when told the reply is full (`Ok(0)`), which is
        // how a new inode past the bound ends the listing; on an error it
        // does not, so it is given back here.
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
                let ino = entry.inode;
                if live.is_new(ino) && live.inodes.len() >= max {
                    refused = true;
                    return Ok(0);
                }
                match add_entry(dir_entry, entry) {
                    Ok(0) => Ok(0),
                    Ok(n) => {
                        live.add_inode(ino);
                        added += 1;
                        Ok(n)
                    }
                    Err(e) => {
                        self.inner.forget(ctx, ino, 1);
                        Err(e)
                    }
                }
            })?;
        if refused && added == 0 {
            // An empty reply would read as the end of the directory.
            return Err(self.inodes_full(live));
        }
        Ok(())
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let mut live = self.live();
        self.inner.releasedir(ctx, inode, flags, handle)?;
        live.release(handle, &self.limits);
        Ok(())
    }

    fn setupmapping(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: u64,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        khandle: u64,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}
