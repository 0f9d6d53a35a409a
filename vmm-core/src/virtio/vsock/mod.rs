//! virtio-vsock with a Firecracker-style hybrid Unix-socket backend.
//!
//! It exists so the host (the shim) can talk to `arrow-init` in the guest
//! over plain Unix sockets:
//!
//! - host-initiated: connect to `uds_path`, write `CONNECT <port>\n`, read
//!   `OK <hostport>\n`, then the stream is bridged to guest vsock port
//!   `<port>`;
//! - guest-initiated: a guest connection to CID 2 port `P` is bridged to the
//!   Unix socket `<uds_path>_P`.
//!
//! Layout follows Firecracker's `devices/virtio/vsock/`: [`packet`] is the
//! wire format parsed from guest memory, [`connection`] the per-stream state
//! machine with credit-based flow control, [`muxer`] the host backend that
//! owns the Unix sockets, [`device`] the virtio device that moves packets
//! between the queues and the muxer, and [`event_handler`] what wakes it.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod muxer;
pub mod packet;
pub mod persist;

#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use device::VirtioVsock;

/// The virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The CID of the host.
pub const VSOCK_HOST_CID: u64 = 2;

/// Queue indices.
pub const RXQ_INDEX: usize = 0;
/// Guest-to-device packets.
pub const TXQ_INDEX: usize = 1;
/// Device events (transport reset).
pub const EVQ_INDEX: usize = 2;
/// Number of queues.
pub const NUM_QUEUES: usize = 3;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Size of `struct virtio_vsock_hdr`.
pub const VSOCK_PKT_HDR_SIZE: usize = 44;
/// Largest payload we accept from, or send to, the guest.
pub const MAX_PKT_BUF_SIZE: usize = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type we offer.
pub const VSOCK_TYPE_STREAM: u16 = 1;

/// Packet operations (`virtio_vsock_op`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset / refused.
    pub const RST: u16 = 3;
    /// Half or full shutdown; see the flags.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Here is my credit.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Please send your credit.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const VSOCK_FLAGS_SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const VSOCK_FLAGS_SHUTDOWN_SEND: u32 = 2;

/// The event-queue event telling the guest every connection is gone.
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// Receive buffer per connection for guest-to-host data; this is the
/// `buf_alloc` we advertise, so the guest can never make us buffer more.
pub const CONN_TX_BUF_SIZE: u32 = 256 * 1024;
/// Send a credit update once this many bytes were forwarded since the last
/// update the guest saw.
pub const CONN_CREDIT_UPDATE_THRESHOLD: u32 = CONN_TX_BUF_SIZE / 4;
/// How long a host-initiated connection waits for the guest's answer. Not
/// Firecracker's 2 s: a guest whose kernel is emulated (software nested
/// KVM) and busy carrying another connection's data was seen to answer
/// later than that, and the host client then saw a refusal. A guest that
/// never answers holds one of [`MAX_CONNECTIONS`] slots this long.
pub const CONN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a host client may take to send its `CONNECT` line.
pub const CLIENT_LINE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection waits for the guest's RST or for buffered
/// data to drain.
pub const CONN_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// First host port handed to host-initiated connections.
pub const HOST_PORT_FIRST: u32 = 1 << 30;
/// Most live connections per device.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that have not sent their `CONNECT` line yet.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// Most RST packets for unknown connections waiting for rx buffers; tx
/// processing pauses when this is full.
pub const MAX_RST_BACKLOG: usize = 256;

/// Errors creating the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix listener could not be created.
    #[error("cannot listen on {path:?}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    /// An eventfd or timerfd could not be created.
    #[error("cannot create an event fd: {0}")]
    EventFd(io::Error),
    /// The CID is reserved.
    #[error("invalid guest CID {0}")]
    InvalidCid(u64),
    /// A snapshot state acks features the device never offers.
    #[error("snapshot acks features {acked:#x}, the device offers {offered:#x}")]
    UnofferedFeatures { acked: u64, offered: u64 },
    /// A snapshot state's next host port is outside the host-port range.
    #[error("snapshot host port {0} outside the host-port range")]
    InvalidHostPort(u32),
}
