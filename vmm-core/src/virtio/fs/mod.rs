//! virtio-fs: a host directory shared into the guest over FUSE.
//!
//! It exists so a pod's root filesystem and volumes (containerd's snapshotter
//! mounts, kubelet's volumes, configmaps, secrets, `/etc/hosts`, ...) can be
//! seen by the guest without a block device: the guest mounts the device
//! with `mount -t virtiofs <tag> <dir>` and every file operation becomes a
//! FUSE request that [`fuse_backend_rs`]'s passthrough file system serves
//! from the host directory, so writes land on the host.
//!
//! Layout follows the vsock device: [`device`] is the virtio device (config
//! space, queues, activation), [`bounded`] the file system behind it (the
//! passthrough, with bounds on the inodes and open files the guest can
//! make it hold), [`request`] turns one descriptor chain into a
//! FUSE request and its reply (including the read-only policy),
//! [`event_handler`] is what wakes the device and [`persist`] its snapshot
//! state.
//!
//! What is not here yet: the DAX window (no shared memory region, so the
//! guest copies file data through the queues), FUSE notifications
//! (`VIRTIO_FS_F_NOTIFICATION`), uid/gid mapping between guest and host (ids
//! pass through unchanged; the passthrough file system creates files as the
//! guest caller by switching the thread's effective ids, which needs a root
//! VMM), sandboxing of the shared directory beyond what fuse-backend-rs does
//! (".." at the root is the root, but anything mounted or hard-linked inside
//! the directory is visible), more than one request queue, and a worker
//! thread: requests are served on the event-loop thread, so a slow host file
//! system delays other devices.

pub mod bounded;
pub mod device;
pub mod event_handler;
pub mod persist;
pub mod request;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;

pub use bounded::{FsIo, FsLimits, FsUsage, MAX_HANDLES, MAX_INODES};
pub use device::{FsStats, VirtioFs};
pub use persist::VirtioFsState;

/// The virtio device ID of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;

/// The high-priority queue (FORGET, INTERRUPT).
pub const HIPRIO_QUEUE_INDEX: usize = 0;
/// The (single) request queue.
pub const REQUEST_QUEUE_INDEX: usize = 1;
/// Number of request queues we offer (`num_request_queues`).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Number of queues: hiprio plus the request queues.
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
/// Maximum size of each queue. Linux bounds the pages of one FUSE request by
/// the queue size, so a larger queue allows larger reads and writes.
pub const QUEUE_SIZE: u16 = 1024;

/// Size of the tag in the configuration space (`struct virtio_fs_config`).
pub const TAG_LEN: usize = 36;
/// Size of the configuration space: the tag and `le32 num_request_queues`.
pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;

/// Why a virtio-fs device cannot be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, longer than 36 bytes or holds a NUL byte.
    #[error("invalid virtio-fs tag {0:?}: must be 1 to 36 bytes without NUL")]
    InvalidTag(String),
    /// The shared directory does not exist or is not a directory.
    #[error("shared directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    /// The shared directory's path is not valid UTF-8 (fuse-backend-rs takes
    /// it as a `String`).
    #[error("shared directory {0} is not a UTF-8 path")]
    NonUtf8Path(PathBuf),
    /// The passthrough file system could not be set up over the directory.
    #[error("passthrough file system over {path}: {source}")]
    Passthrough {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A snapshot was asked for while the guest has a FUSE session on the
    /// device.
    #[error(
        "virtio-fs device {tag:?} is in use: the guest has a FUSE session on it (it mounted \
         the share), and a snapshot cannot carry the session's inodes and open files; \
         snapshot the VM before the guest mounts the share"
    )]
    SessionOpen { tag: String },
    /// A restored state acked features the device does not offer.
    #[error("snapshot acked features {acked:#x}, the device offers {offered:#x}")]
    UnofferedFeatures { acked: u64, offered: u64 },
}
