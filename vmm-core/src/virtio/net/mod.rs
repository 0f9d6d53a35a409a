//! virtio-net: the guest's NIC, backed by a tap device the caller opened.
//!
//! It exists so a pod's guest has the pod's network: the shim creates a tap
//! in the pod's network namespace (redirected to the CNI veth with tc),
//! opens it with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and hands the file
//! descriptor over; this device moves Ethernet frames between that tap and
//! the guest's virtio queues, in userspace (no vhost-net).
//!
//! Frames carry the 12-byte `virtio_net_hdr_v1` on both sides: the tap is
//! set to the same header size (`TUNSETVNETHDRSZ`), so a guest frame goes
//! to the tap with its header as it is (after checks), and a tap frame goes
//! to the guest with only `num_buffers` (and, without `GUEST_CSUM`, the
//! flags) rewritten. Checksum and segmentation offloads are offered when the
//! tap supports them; once the driver has acked its features, the tap is
//! told which ones the guest can take (`TUNSETOFFLOAD`).
//!
//! Receive uses mergeable buffers (`VIRTIO_NET_F_MRG_RXBUF`, what Linux
//! prefers): a frame of up to 64 KiB spreads over as many posted buffers as
//! it needs. A driver that does not ack it gets one chain per frame (Linux's
//! "big packets" layout, or small buffers when it takes no GSO). A frame
//! that finds no buffers waits in the device and the tap is no longer
//! polled for input until the guest posts buffers and notifies the rx
//! queue. When the guest takes TSO4 (and checksum hints), consecutive TCP
//! segments of one flow that wait in the tap are merged into one GSO frame
//! first (`coalesce`): the guest's cost is per frame. So that they do wait
//! when the guest is behind, frames stay in the tap while the driver has
//! its rx interrupt off (NAPI still polling earlier frames), rechecked
//! every [`device::RX_HOLD_RECHECK`] and for at most
//! [`device::RX_HOLD_MAX`]; an idle guest gets every frame at once.
//!
//! Layout follows the other devices: [`tap`] is the host backend,
//! [`header`] the wire header and the feature rules, `coalesce` the receive
//! coalescing, [`device`] the virtio device and its queue work,
//! [`event_handler`] what wakes it and [`persist`] its snapshot state.
//!
//! What is not here: a control queue (no `CTRL_VQ`: no promiscuous/multicast
//! filters, no MAC change or guest-announce from the driver, no runtime
//! offload changes), multiqueue, `EVENT_IDX` (not offered by any Arrow
//! device yet), UFO/USO, link status (`VIRTIO_NET_F_STATUS`; the link is
//! always up) and rate limiting. Frames waiting in the device or the tap
//! are not part of a snapshot.

pub(crate) mod coalesce;
pub mod device;
pub mod event_handler;
pub mod header;
pub mod persist;
pub mod tap;

#[cfg(test)]
mod tests;

use std::io;

pub use device::{NetStats, VirtioNet};
pub use persist::VirtioNetState;
pub use tap::Tap;

/// The virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;

/// The receive queue (device to guest).
pub const RXQ_INDEX: usize = 0;
/// The transmit queue (guest to device).
pub const TXQ_INDEX: usize = 1;
/// Number of queues: one rx/tx pair, no control queue.
pub const NUM_QUEUES: usize = 2;
/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Size of `struct virtio_net_hdr_v1`, on the queues and on the tap.
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame either side may send: a 64 KiB GSO packet with
/// its Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = 65_536 + 14 + 4;
/// Largest header-plus-frame the device reads from the tap or the guest.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Size of the configuration space: `mac[6]`, `status`,
/// `max_virtqueue_pairs`, `mtu` (`struct virtio_net_config` up to `mtu`).
pub const CONFIG_SPACE_SIZE: usize = 12;
/// The smallest MTU a guest accepts (`ETH_MIN_MTU`).
pub const MIN_MTU: u16 = 68;
/// The largest MTU Linux's virtio-net driver accepts (64 KiB minus the
/// Ethernet header).
pub const MAX_MTU: u16 = 65_535 - 14;

/// Why a virtio-net device or its tap cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening `/dev/net/tun` or attaching to the named tap failed.
    #[error("opening tap {name:?}: {source}")]
    OpenTap {
        name: String,
        #[source]
        source: io::Error,
    },
    /// The tap name is empty, too long (15 bytes at most) or holds a NUL.
    #[error("invalid tap name {0:?}: 1 to 15 bytes without NUL")]
    InvalidTapName(String),
    /// The file descriptor is not a tap (`TUNGETIFF` failed or it is a tun).
    #[error("the file descriptor is not a tap device: {0}")]
    NotATap(String),
    /// The tap was opened without a flag the device needs.
    #[error(
        "tap {name} was opened with flags {flags:#x}; IFF_TAP | IFF_NO_PI | IFF_VNET_HDR are needed"
    )]
    TapFlags { name: String, flags: u16 },
    /// An ioctl or fcntl on the tap failed.
    #[error("tap {name}: {what}: {source}")]
    TapIoctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The MAC address is multicast or all zeroes.
    #[error("invalid MAC address {0}: must be unicast and not all zeroes")]
    InvalidMac(String),
    /// The MTU is out of range.
    #[error("invalid MTU {0}: must be {MIN_MTU} to {MAX_MTU}")]
    InvalidMtu(u16),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A restored state acked features the device does not offer.
    #[error("snapshot acked features {acked:#x}, the device offers {offered:#x}")]
    UnofferedFeatures { acked: u64, offered: u64 },
    /// The clone's tap cannot take the offloads the template's guest
    /// negotiated.
    #[error("tap {name} cannot take the offloads the guest negotiated ({flags:#x}): {source}")]
    TapOffloads {
        name: String,
        flags: u32,
        #[source]
        source: io::Error,
    },
}

pub use proto::mac::{format_mac, mac_is_valid, parse_mac};
