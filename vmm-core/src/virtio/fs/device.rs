//! The virtio-fs device: configuration space, queues and the passthrough
//! file system behind them.
//!
//! Queue work runs on the event-loop thread (see `event_handler.rs`); each
//! descriptor chain is one FUSE request, served by `request.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config};
use log::{debug, error};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::bounded::{BoundedFs, FsLimits, FsUsage};
use super::{
    FsError, CONFIG_SPACE_SIZE, NUM_QUEUES, NUM_REQUEST_QUEUES, QUEUE_SIZE, TAG_LEN, VIRTIO_ID_FS,
};
use crate::virtio::{
    read_config_space, refuse_config_write, ActivateError, GuestMemory, Interrupt, VirtioDevice,
};

/// The device as log lines name it.
pub(super) const LOG_NAME: &str = "virtio-fs";

/// The (bounded) passthrough file system as the FUSE server sees it.
pub(super) type SharedFs = Arc<BoundedFs>;

pub(super) struct Active {
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queues: Vec<Queue>,
}

/// Counters of the device's work since it was created (a guest reset of
/// the device does not clear them, so they only grow).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// FUSE requests taken from the queues, both of them, answered or not.
    pub requests: u64,
    /// Requests answered with an error number: refusals (`EROFS`,
    /// `ENFILE`) and the host's errors, a lookup of a missing name
    /// (`ENOENT`, the guest's negative dentries) included.
    pub errors: u64,
    /// Requests that got no answer: malformed descriptor chains or
    /// requests the server could not decode or reply to.
    pub unanswered: u64,
    /// File data returned by reads, in bytes.
    pub read_bytes: u64,
    /// File data taken by writes, in bytes.
    pub write_bytes: u64,
}

/// A virtio-fs device sharing one host directory.
pub struct VirtioFs {
    tag: String,
    shared_dir: PathBuf,
    read_only: bool,
    config: [u8; CONFIG_SPACE_SIZE],
    queue_max_sizes: [u16; NUM_QUEUES],
    queue_evts: Vec<Arc<EventFd>>,
    acked_features: u64,
    pub(super) active: Option<Active>,
    fs: SharedFs,
    pub(super) server: Server<SharedFs>,
    /// Written when another thread changed what the event loop must look at
    /// (activation, reset).
    pub(super) kick_evt: EventFd,
    /// Whether the guest served requests since the device was created or
    /// reset, or since its last FUSE_DESTROY: the passthrough file system
    /// then holds inodes and open files a snapshot cannot carry.
    pub(super) session_open: bool,
    /// A reset's forgetting of every inode and open file, left to the event
    /// loop: a reset comes from a vCPU thread, whose seccomp filter allows
    /// no file system calls.
    pub(super) destroy_pending: bool,
    /// [`FsStats`]'s request counters, kept by the event loop (the bytes
    /// are the file system's, see [`BoundedFs::io`]).
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) unanswered: u64,
}

impl VirtioFs {
    /// Creates the device: the guest mounts it by `tag` (1 to 36 bytes) and
    /// sees `shared_dir`, which must be an existing directory. With
    /// `read_only`, every request that would change the host directory is
    /// answered with `EROFS`.
    ///
    /// Setting up the passthrough file system clears the process's umask
    /// (fuse-backend-rs does, so the guest's modes apply unchanged).
    ///
    /// The guest may hold at most [`MAX_INODES`](super::MAX_INODES) inodes
    /// and [`MAX_HANDLES`](super::MAX_HANDLES) open files on it.
    pub fn new(tag: &str, shared_dir: &Path, read_only: bool) -> Result<Self, FsError> {
        Self::with_limits(tag, shared_dir, read_only, FsLimits::default())
    }

    /// As [`VirtioFs::new`], with other bounds on what the guest may hold.
    pub fn with_limits(
        tag: &str,
        shared_dir: &Path,
        read_only: bool,
        limits: FsLimits,
    ) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
            return Err(FsError::InvalidTag(tag.to_owned()));
        }
        if !shared_dir.is_dir() {
            return Err(FsError::NotADirectory(shared_dir.to_owned()));
        }
        let root_dir = shared_dir
            .to_str()
            .ok_or_else(|| FsError::NonUtf8Path(shared_dir.to_owned()))?
            .to_owned();
        let passthrough_err = |source| FsError::Passthrough {
            path: shared_dir.to_owned(),
            source,
        };
        let cfg = Config {
            root_dir,
            // `do_import` also turns on the check of every name the guest
            // sends ("..", "/"): it must stay on without a VFS layer above.
            do_import: true,
            xattr: false,
            // Node ids from host inode numbers, so the passthrough forgets
            // a file's mapping when the guest forgets the file: otherwise
            // it keeps one per file ever seen, and a guest creating and
            // deleting files grows it without bound. (Host inode numbers
            // past 2^47, as overlayfs gives lower-layer files with `xino`,
            // still keep theirs: bounded by the files on the host, which
            // the guest cannot add to that way.)
            use_host_ino: true,
            // The guest keeps a file's pages across opens (with the
            // kernel dropping them when it sees the file's size or mtime
            // change, `BoundedFs::init`): without it every open, each
            // exec among them, threw the page cache away and the guest
            // read the whole binary again through FUSE (an exec of
            // busybox's `true` took 5.5 s on kvm_pvm). The guest's cache
            // is the guest's own: it can only make its own view stale.
            cache_policy: CachePolicy::Always,
            ..Config::default()
        };
        let fs: SharedFs = Arc::new(BoundedFs::new(cfg, limits).map_err(passthrough_err)?);

        let queue_evts = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(FsError::EventFd)?;
        let kick_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd)?;

        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());

        Ok(Self {
            tag: tag.to_owned(),
            shared_dir: shared_dir.to_owned(),
            read_only,
            config,
            queue_max_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queue_evts,
            acked_features: 0,
            active: None,
            server: Server::new(fs.clone()),
            fs,
            kick_evt,
            session_open: false,
            destroy_pending: false,
            requests: 0,
            errors: 0,
            unanswered: 0,
        })
    }

    /// The tag the guest mounts the device by.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The host directory the guest sees.
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    /// Whether requests that change the directory are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The bounds on what the guest may hold.
    pub fn limits(&self) -> FsLimits {
        self.fs.limits()
    }

    /// The inodes and open files the guest holds now.
    pub fn usage(&self) -> FsUsage {
        self.fs.usage()
    }

    /// What the device has served so far.
    pub fn stats(&self) -> FsStats {
        let io = self.fs.io();
        FsStats {
            requests: self.requests,
            errors: self.errors,
            unanswered: self.unanswered,
            read_bytes: io.read_bytes,
            write_bytes: io.write_bytes,
        }
    }

    /// Forgets every inode and open file of the guest's FUSE session.
    pub(super) fn fs_destroy(&self) {
        self.fs.destroy();
    }

    /// Whether the guest has a FUSE session on the device: it sent a
    /// request since the device was created or reset, other than a final
    /// FUSE_DESTROY (the guest unmounted). Only a device without one can be
    /// snapshotted (see [`VirtioFs::save`]).
    pub fn has_fuse_session(&self) -> bool {
        self.session_open
    }

    pub(super) fn queue_evt(&self, index: usize) -> &EventFd {
        &self.queue_evts[index]
    }

    fn kick(&self) {
        if let Err(e) = self.kick_evt.write(1) {
            error!("virtio-fs: cannot wake the event loop: {e}");
        }
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        // No VIRTIO_FS_F_NOTIFICATION; VERSION_1 comes from the transport.
        0
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(LOG_NAME, &self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        refuse_config_write(LOG_NAME, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        ActivateError::check(self.active.is_some(), NUM_QUEUES, queues.len())?;
        debug!(
            "virtio-fs: activated, tag {:?}, sharing {}",
            self.tag,
            self.shared_dir.display()
        );
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        // The guest may have queued requests before the event loop noticed.
        self.kick();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        // The guest's FUSE session is gone: its inodes and open files are
        // dropped, starting again from the root as FUSE_DESTROY does, on
        // the event loop before it serves anything else.
        self.destroy_pending = true;
        self.session_open = false;
        self.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("arrow-fs-dev-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        dir
    }

    #[test]
    fn identity_and_config_space() {
        let dir = temp_dir("cfg");
        let dev = VirtioFs::new("rootfs", &dir, false).unwrap();
        assert_eq!(dev.device_type(), 26);
        assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 2]);
        assert_eq!(dev.queue_events().len(), 2);
        assert_eq!(dev.avail_features(), 0);
        assert_eq!(
            (dev.tag(), dev.shared_dir(), dev.read_only()),
            ("rootfs", dir.as_path(), false)
        );

        let mut tag = [0xffu8; TAG_LEN];
        dev.read_config(0, &mut tag);
        assert_eq!(&tag[..6], b"rootfs");
        assert!(tag[6..].iter().all(|&b| b == 0));
        let mut n = [0u8; 4];
        dev.read_config(TAG_LEN as u64, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        let mut whole = [0u8; CONFIG_SPACE_SIZE];
        dev.read_config(0, &mut whole);
        assert_eq!(&whole[TAG_LEN..], &1u32.to_le_bytes());
        // Out of range, straddling the end, absurd offsets: zeroes.
        n = [0xff; 4];
        dev.read_config(CONFIG_SPACE_SIZE as u64 - 2, &mut n);
        assert_eq!(n, [0; 4]);
        n = [0xff; 4];
        dev.read_config(u64::MAX, &mut n);
        assert_eq!(n, [0; 4]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_36_byte_tag_fills_the_field() {
        let dir = temp_dir("tag36");
        let tag = "a".repeat(TAG_LEN);
        let mut dev = VirtioFs::new(&tag, &dir, true).unwrap();
        let mut b = [0u8; TAG_LEN];
        dev.read_config(0, &mut b);
        assert_eq!(&b[..], tag.as_bytes());
        // Writes are ignored.
        dev.write_config(0, b"zz");
        dev.read_config(0, &mut b);
        assert_eq!(&b[..], tag.as_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_tags_and_missing_directories() {
        let dir = temp_dir("bad");
        for tag in ["", "a\0b", &"x".repeat(TAG_LEN + 1)] {
            assert!(
                matches!(VirtioFs::new(tag, &dir, false), Err(FsError::InvalidTag(_))),
                "{tag:?}"
            );
        }
        let missing = dir.join("missing");
        assert!(matches!(
            VirtioFs::new("t", &missing, false),
            Err(FsError::NotADirectory(p)) if p == missing
        ));
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            VirtioFs::new("t", &file, false),
            Err(FsError::NotADirectory(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
