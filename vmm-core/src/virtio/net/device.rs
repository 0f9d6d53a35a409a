//! The virtio-net device: configuration space, features, and the queue work
//! that moves frames between the guest and the tap.
//!
//! Queue work runs on the event-loop thread (see `event_handler.rs`). Every
//! guest buffer is checked before use; a malformed chain is returned to the
//! guest (used, length 0) and its frame dropped and counted, never a panic.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::EventSet;
use log::{debug, error, warn};
use virtio_bindings::virtio_net as vn;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::coalesce::Merge;
use super::header::{self, has, prepare_rx_header, HeaderError, NetHeader};
use super::tap::Tap;
use super::{
    format_mac, mac_is_valid, NetError, CONFIG_SPACE_SIZE, MAX_MTU, MAX_PACKET_LEN, MIN_MTU,
    NUM_QUEUES, QUEUE_SIZE, RXQ_INDEX, TXQ_INDEX, VIRTIO_ID_NET, VNET_HDR_LEN,
};
use crate::virtio::{
    add_used, read_config_space, refuse_config_write, signal_used, ActivateError, GuestMemory,
    Interrupt, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};

/// The device as log lines name it.
const LOG_NAME: &str = "virtio-net";

/// Most segments (descriptor pieces) of one chain; `writev` takes at most
/// `UIO_MAXIOV`.
pub const MAX_SEGMENTS: usize = libc::UIO_MAXIOV as usize;
/// Most frames moved to the guest per wake-up, so tx is not starved; the
/// tap stays readable and the loop comes back.
pub const RX_BATCH: usize = 64;
/// While the guest is still busy with earlier frames (its rx interrupt is
/// off: NAPI is polling), new frames wait in the tap to be coalesced, and
/// the device looks again this often: the most a held frame waits after the
/// guest is done (a hardware-KVM guest's NAPI poll lasts microseconds, an
/// emulated one's milliseconds)...
pub const RX_HOLD_RECHECK: Duration = Duration::from_micros(100);
/// ...but no frame waits longer than this: a guest that polls without end
/// (saturated) still gets its frames.
pub const RX_HOLD_MAX: Duration = Duration::from_millis(10);

pub(super) struct Active {
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) queues: Vec<Queue>,
}

/// Counters of the device's traffic, since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that went to the tap.
    pub tx_frames: u64,
    /// Their bytes, without the virtio-net header.
    pub tx_bytes: u64,
    /// Guest frames dropped: malformed chains or headers, tap errors.
    pub tx_dropped: u64,
    /// Times the tap would not take a frame and tx waited for `EPOLLOUT`.
    pub tx_deferred: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes, without the virtio-net header.
    pub rx_bytes: u64,
    /// Tap frames dropped: malformed guest buffers, frames too big for the
    /// guest's buffers, headers the guest cannot take.
    pub rx_dropped: u64,
    /// Times a frame had to wait because the guest had no rx buffer.
    pub rx_deferred: u64,
    /// Tap frames appended to the frame before them (see [`coalesce`]), so
    /// not counted in `rx_frames`.
    ///
    /// [`coalesce`]: super::coalesce
    pub rx_coalesced: u64,
    /// Times frames started to wait in the tap because the guest was busy.
    pub rx_held: u64,
}

/// What is wrong with a chain or its frame.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A device-writable descriptor where only readable ones belong.
    #[error("device-writable descriptor in a tx chain")]
    WriteOnly,
    /// A device-readable descriptor where only writable ones belong.
    #[error("device-readable descriptor in an rx chain")]
    ReadOnly,
    /// A descriptor that does not lie in guest memory.
    #[error("descriptor at {addr:#x} ({len} bytes) outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    /// More bytes than any frame has.
    #[error("chain longer than {MAX_PACKET_LEN} bytes")]
    TooLong,
    /// More pieces than `writev` takes.
    #[error("chain of more than {MAX_SEGMENTS} segments")]
    TooManySegments,
    /// The header is short or asks for what was not negotiated.
    #[error("{0}")]
    Header(#[from] HeaderError),
    /// A header and nothing after it.
    #[error("empty frame")]
    Empty,
    /// An rx buffer too small to be used (no room for the header).
    #[error("rx buffer of {0} bytes is too small")]
    RxBufferTooSmall(usize),
    /// A frame bigger than the one buffer it may use (no mergeable buffers).
    #[error("frame of {frame} bytes does not fit the guest's {buffer}-byte rx buffer")]
    FrameTooBig { frame: usize, buffer: usize },
    /// The tap refused the frame.
    #[error("tap write: {0}")]
    Tap(#[source] io::Error),
}

/// Logs dropped frames: a burst, then a count of what was left out.
#[derive(Default)]
pub(super) struct DropLog {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl DropLog {
    const WINDOW: Duration = Duration::from_secs(5);
    const BURST: u32 = 10;

    pub(super) fn log(&mut self, args: fmt::Arguments<'_>) {
        let now = Instant::now();
        let fresh = self
            .window
            .is_none_or(|w| now.duration_since(w) >= Self::WINDOW);
        if fresh {
            if self.suppressed > 0 {
                warn!(
                    "virtio-net: {} more dropped frames not logged",
                    self.suppressed
                );
            }
            self.window = Some(now);
            self.in_window = 0;
            self.suppressed = 0;
        }
        if self.in_window < Self::BURST {
            self.in_window += 1;
            warn!("virtio-net: {args}");
        } else {
            self.suppressed += 1;
            debug!("virtio-net: {args}");
        }
    }
}

/// One rx chain taken for a frame.
struct RxChain {
    head: u16,
    segs: Range<usize>,
}

/// Scratch space for rx, kept to avoid allocating per frame.
#[derive(Default)]
struct RxScratch {
    chains: Vec<RxChain>,
    segs: Vec<(GuestAddress, usize)>,
}

/// Why a frame did not reach the guest.
enum RxFail {
    /// No (or not enough) rx buffers: the frame waits.
    NoBuffers,
    /// The frame is dropped; `used` says whether chains were returned.
    Drop { used: bool, err: ChainError },
}

/// Why a guest frame did not reach the tap.
enum TxFail {
    /// The tap is full: the chain goes back and tx waits for `EPOLLOUT`.
    WouldBlock,
    /// The frame is dropped.
    Drop(ChainError),
}

/// A virtio-net device over a tap.
pub struct VirtioNet {
    mac: [u8; 6],
    mtu: u16,
    pub(super) tap: Tap,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_SPACE_SIZE],
    queue_max_sizes: [u16; NUM_QUEUES],
    queue_evts: Vec<Arc<EventFd>>,
    pub(super) active: Option<Active>,
    /// Written when another thread changed what the event loop must look
    /// at (activation, reset).
    pub(super) kick_evt: EventFd,
    /// One header and frame read from the tap.
    rx_buf: Box<[u8]>,
    /// The length of a frame in `rx_buf` that waits for rx buffers.
    rx_pending: Option<usize>,
    /// The next frame from the tap, read while coalescing and not part of
    /// the frame in `rx_buf`.
    rx_next: Box<[u8]>,
    /// The length of the frame in `rx_next`, if one waits there.
    rx_lookahead: Option<usize>,
    /// Since when frames wait in the tap for a busy guest: the tap is not
    /// polled for input, `rx_hold_timer` brings the device back.
    pub(super) rx_hold_since: Option<Instant>,
    pub(super) rx_hold_timer: TimerFd,
    /// The guest had no rx buffer for `rx_pending`: the tap is not polled
    /// for input until it notifies the rx queue.
    pub(super) rx_needs_buffers: bool,
    /// The tap refused a frame with `EAGAIN`: tx waits for `EPOLLOUT`.
    pub(super) tx_blocked: bool,
    /// The tap failed for good (its interface is gone): it is no longer
    /// polled, and guest frames are dropped.
    pub(super) tap_broken: bool,
    /// What the event loop watches the tap for; `None`: not at all.
    pub(super) tap_interest: Option<EventSet>,
    rx_scratch: RxScratch,
    stats: NetStats,
    pub(super) drops: DropLog,
}

impl VirtioNet {
    /// Creates the device over `tap`, with the guest seeing `mac` and
    /// `mtu`. Offloads are offered if the tap supports them.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        if !mac_is_valid(&mac) {
            return Err(NetError::InvalidMac(format_mac(&mac)));
        }
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(NetError::InvalidMtu(mtu));
        }
        let queue_evts = (0..NUM_QUEUES)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(NetError::EventFd)?;
        let kick_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd)?;
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..6].copy_from_slice(&mac);
        // status (6..8) stays 0: VIRTIO_NET_F_STATUS is not offered.
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        config[10..12].copy_from_slice(&mtu.to_le_bytes());
        Ok(Self {
            mac,
            mtu,
            avail_features: header::device_features(tap.supports_offloads()),
            tap,
            acked_features: 0,
            config,
            queue_max_sizes: [QUEUE_SIZE; NUM_QUEUES],
            queue_evts,
            active: None,
            kick_evt,
            rx_buf: vec![0u8; MAX_PACKET_LEN].into_boxed_slice(),
            rx_pending: None,
            rx_next: vec![0u8; MAX_PACKET_LEN].into_boxed_slice(),
            rx_lookahead: None,
            rx_hold_since: None,
            rx_hold_timer: TimerFd::new().map_err(|e| NetError::EventFd(e.into()))?,
            rx_needs_buffers: false,
            tx_blocked: false,
            tap_broken: false,
            tap_interest: None,
            rx_scratch: RxScratch::default(),
            stats: NetStats::default(),
            drops: DropLog::default(),
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The MTU the guest is told.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The tap behind the device.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Traffic counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub(super) fn queue_evt(&self, index: usize) -> &EventFd {
        &self.queue_evts[index]
    }

    fn kick(&self) {
        if let Err(e) = self.kick_evt.write(1) {
            error!("virtio-net: cannot wake the event loop: {e}");
        }
    }

    /// Tells the tap which offloads the guest acked; fails if it cannot.
    pub(super) fn apply_offloads(&self) -> Result<(), NetError> {
        let flags = header::tun_offload_flags(self.acked_features);
        self.tap
            .set_offload(flags)
            .map_err(|source| NetError::TapOffloads {
                name: self.tap.name().to_owned(),
                flags,
                source,
            })
    }

    /// Sends every frame the guest queued on tx to the tap. Returns whether
    /// any chain was used.
    pub(crate) fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = &active.mem;
        let q = &mut active.queues[TXQ_INDEX];
        let mut used = false;
        self.tx_blocked = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let result = if self.tap_broken {
                Err(TxFail::Drop(ChainError::Tap(io::Error::from(
                    io::ErrorKind::BrokenPipe,
                ))))
            } else {
                send_chain(mem, chain, self.acked_features, &self.tap)
            };
            match result {
                Ok(frame_len) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += frame_len as u64;
                }
                Err(TxFail::WouldBlock) => {
                    // Not consumed: it goes first once the tap has room.
                    q.go_to_previous_position();
                    self.tx_blocked = true;
                    self.stats.tx_deferred += 1;
                    break;
                }
                Err(TxFail::Drop(e)) => {
                    self.stats.tx_dropped += 1;
                    self.drops
                        .log(format_args!("dropping tx frame (chain {head}): {e}"));
                }
            }
            add_used(LOG_NAME, q, mem, head, 0);
            used = true;
        }
        if used {
            signal_used(LOG_NAME, q, mem, &active.interrupt);
        }
        used
    }

    /// Moves frames from the tap (and one left waiting) into the guest's rx
    /// buffers, at most [`RX_BATCH`]. Returns whether any chain was used.
    pub(crate) fn process_rx(&mut self) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        if self.tap_broken && self.rx_pending.is_none() && self.rx_lookahead.is_none() {
            return false;
        }
        let mem = &active.mem;
        let q = &mut active.queues[RXQ_INDEX];
        let acked = self.acked_features;
        let mergeable = has(acked, vn::VIRTIO_NET_F_MRG_RXBUF);
        let coalescing =
            has(acked, vn::VIRTIO_NET_F_GUEST_CSUM) && has(acked, vn::VIRTIO_NET_F_GUEST_TSO4);
        if coalescing && self.rx_pending.is_none() && self.rx_lookahead.is_none() {
            let busy = guest_is_polling(q, mem, acked);
            let starts = self.rx_hold_since.is_none();
            let since = *self.rx_hold_since.get_or_insert_with(Instant::now);
            // A hold starts only for frames that are there: rechecks of an
            // empty tap would be wake-ups for nothing.
            if busy && since.elapsed() < RX_HOLD_MAX && (!starts || self.tap.has_input()) {
                if let Err(e) = self.rx_hold_timer.reset(RX_HOLD_RECHECK, None) {
                    error!("virtio-net: cannot arm the rx hold timer: {e}");
                } else {
                    self.stats.rx_held += u64::from(starts);
                    return false;
                }
            }
        }
        self.rx_hold_since = None;
        let mut used = false;
        let mut frames = 0;
        self.rx_needs_buffers = false;
        // A frame read ahead is taken even past the batch, uncoalesced, so
        // none is left behind a tap that epoll no longer reports readable.
        while frames < RX_BATCH || self.rx_lookahead.is_some() {
            let (mut len, fresh) = if let Some(len) = self.rx_pending.take() {
                (len, false)
            } else if let Some(len) = self.rx_lookahead.take() {
                std::mem::swap(&mut self.rx_buf, &mut self.rx_next);
                (len, true)
            } else {
                match self.tap.read(&mut self.rx_buf) {
                    Ok(len) => (len, true),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error!(
                            "virtio-net: reading tap {} failed, the guest gets no more \
                             frames: {e}",
                            self.tap.name()
                        );
                        self.tap_broken = true;
                        break;
                    }
                }
            };
            if fresh && coalescing && frames < RX_BATCH && !self.tap_broken {
                let merged = coalesce(&self.tap, &mut self.rx_buf, &mut self.rx_next, len);
                len = merged.len;
                self.rx_lookahead = merged.lookahead;
                self.stats.rx_coalesced += merged.appended;
            }
            frames += 1;
            let packet = &mut self.rx_buf[..len];
            let checked = match NetHeader::parse(packet).and_then(|h| h.check_rx(acked)) {
                Err(e) => Err(ChainError::from(e)),
                Ok(()) if len == VNET_HDR_LEN => Err(ChainError::Empty),
                Ok(()) => Ok(()),
            };
            if let Err(e) = checked {
                self.stats.rx_dropped += 1;
                self.drops
                    .log(format_args!("dropping rx frame from the tap: {e}"));
                continue;
            }
            match deliver(mem, q, packet, acked, mergeable, &mut self.rx_scratch) {
                Ok(()) => {
                    used = true;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
                }
                Err(RxFail::NoBuffers) => {
                    self.rx_pending = Some(len);
                    self.rx_needs_buffers = true;
                    self.stats.rx_deferred += 1;
                    break;
                }
                Err(RxFail::Drop { used: u, err }) => {
                    used |= u;
                    self.stats.rx_dropped += 1;
                    self.drops.log(format_args!("dropping rx frame: {err}"));
                }
            }
        }
        if used {
            signal_used(LOG_NAME, q, mem, &active.interrupt);
        }
        used
    }
}

/// Whether the guest's driver is working through the rx queue (it turned
/// the used-buffer interrupt off, as Linux's NAPI does while polling), so
/// it will look at the ring again without an interrupt. Only the avail
/// ring's flag says so; with `EVENT_IDX` (not offered) it would not.
fn guest_is_polling(q: &Queue, mem: &GuestMemory, acked: u64) -> bool {
    if acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0 {
        return false;
    }
    mem.read_obj::<u16>(GuestAddress(q.avail_ring()))
        .is_ok_and(|flags| u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
}

/// What [`coalesce`] made of a fresh frame.
struct Coalesced {
    /// The frame's new length.
    len: usize,
    /// Frames appended to it.
    appended: u64,
    /// The length of the frame read ahead into the lookahead buffer.
    lookahead: Option<usize>,
}

/// Appends the frames waiting in `tap` that continue the TCP flow of the
/// fresh frame `buf[..len]` to it (see [`super::coalesce`]). The first
/// frame that does not continue it is left in `next`.
fn coalesce(tap: &Tap, buf: &mut [u8], next: &mut [u8], len: usize) -> Coalesced {
    let mut out = Coalesced {
        len,
        appended: 0,
        lookahead: None,
    };
    let Some(mut merge) = Merge::start(&buf[..len]) else {
        return out;
    };
    while !merge.closed() {
        let n = match tap.read(next) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Nothing waiting; an error shows again at the next read.
            Err(_) => break,
        };
        if !merge.append(buf, &mut out.len, &next[..n]) {
            out.lookahead = Some(n);
            break;
        }
    }
    out.appended = u64::from(merge.frames() - 1);
    merge.finish(&mut buf[..out.len]);
    out
}

/// Gathers one tx chain (header and frame) and writes it to the tap.
/// Returns the frame's length.
fn send_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    acked: u64,
    tap: &Tap,
) -> Result<usize, TxFail> {
    let drop = |e| Err(TxFail::Drop(e));
    let mut slices = Vec::new();
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return drop(ChainError::WriteOnly);
        }
        let len = desc.len() as usize;
        total += len;
        if total > MAX_PACKET_LEN {
            return drop(ChainError::TooLong);
        }
        for slice in mem.get_slices(desc.addr(), len) {
            let Ok(slice) = slice else {
                return drop(ChainError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            };
            if slices.len() == MAX_SEGMENTS {
                return drop(ChainError::TooManySegments);
            }
            slices.push(slice);
        }
    }
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut got = 0;
    for slice in &slices {
        if got == VNET_HDR_LEN {
            break;
        }
        got += slice.copy_to(&mut hdr[got..]);
    }
    let header = match NetHeader::parse(&hdr[..got]) {
        Ok(h) => h,
        Err(e) => return drop(e.into()),
    };
    if let Err(e) = header.check_tx(acked) {
        return drop(e.into());
    }
    if total == VNET_HDR_LEN {
        return drop(ChainError::Empty);
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
    let iovecs: Vec<libc::iovec> = guards
        .iter()
        .zip(&slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        })
        .collect();
    // SAFETY: every iovec is a slice of guest memory, checked by
    // `get_slices`, mapped for as long as `mem` lives (the whole call);
    // the guards pin the pointers.
    match unsafe { tap.writev(&iovecs) } {
        Ok(_) => Ok(total - VNET_HDR_LEN),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(TxFail::WouldBlock),
        Err(e) => drop(ChainError::Tap(e)),
    }
}

/// Puts one header and frame (`packet`) into the guest's rx buffers: as
/// many chains as it needs with mergeable buffers, else exactly one. On
/// `NoBuffers` and on a frame too big for its one chain, the queue is left
/// as it was.
fn deliver(
    mem: &GuestMemory,
    q: &mut Queue,
    packet: &mut [u8],
    acked: u64,
    mergeable: bool,
    scratch: &mut RxScratch,
) -> Result<(), RxFail> {
    let RxScratch { chains, segs } = scratch;
    chains.clear();
    segs.clear();
    let start = q.next_avail();
    let mut capacity = 0usize;
    while capacity < packet.len() && (mergeable || chains.is_empty()) {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            q.set_next_avail(start);
            return Err(RxFail::NoBuffers);
        };
        let head = chain.head_index();
        let first = segs.len();
        let mut chain_cap = 0usize;
        let mut bad = None;
        for desc in chain {
            let len = desc.len() as usize;
            if !desc.is_write_only() {
                bad = Some(ChainError::ReadOnly);
            } else if !mem.check_range(desc.addr(), len) {
                bad = Some(ChainError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            } else if segs.len() - first == MAX_SEGMENTS {
                bad = Some(ChainError::TooManySegments);
            }
            if bad.is_some() {
                break;
            }
            if len > 0 {
                segs.push((desc.addr(), len));
                chain_cap = chain_cap.saturating_add(len);
            }
        }
        chains.push(RxChain {
            head,
            segs: first..segs.len(),
        });
        let min = if chains.len() == 1 { VNET_HDR_LEN } else { 1 };
        if bad.is_none() && chain_cap < min {
            bad = Some(ChainError::RxBufferTooSmall(chain_cap));
        }
        if let Some(err) = bad {
            // The whole frame goes: every chain taken for it returns empty.
            for c in chains.iter() {
                add_used(LOG_NAME, q, mem, c.head, 0);
            }
            return Err(RxFail::Drop { used: true, err });
        }
        capacity = capacity.saturating_add(chain_cap);
    }
    if capacity < packet.len() {
        q.set_next_avail(start);
        return Err(RxFail::Drop {
            used: false,
            err: ChainError::FrameTooBig {
                frame: packet.len(),
                buffer: capacity,
            },
        });
    }
    // At most the queue size, so it fits.
    let num_buffers = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    prepare_rx_header(packet, acked, num_buffers);
    let mut offset = 0;
    for c in chains.iter() {
        let mut written = 0usize;
        for &(addr, len) in &segs[c.segs.clone()] {
            let n = len.min(packet.len() - offset);
            if n == 0 {
                break;
            }
            if let Err(e) = mem.write_slice(&packet[offset..offset + n], addr) {
                // Checked above; guest memory does not shrink.
                error!("virtio-net: writing rx buffer at {:#x}: {e}", addr.0);
            }
            offset += n;
            written += n;
        }
        add_used(LOG_NAME, q, mem, c.head, written as u32);
    }
    Ok(())
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
        // The guest is set up for these offloads from now on.
        if let Err(e) = self.apply_offloads() {
            error!("virtio-net: {e}; the tap sends plain frames");
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(LOG_NAME, &self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is only writable for legacy drivers; nothing else is.
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
            "virtio-net: activated, tap {}, mac {}, features {:#x}",
            self.tap.name(),
            format_mac(&self.mac),
            self.acked_features
        );
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        self.rx_pending = None;
        self.rx_lookahead = None;
        self.rx_hold_since = None;
        self.rx_needs_buffers = false;
        self.tx_blocked = false;
        // The event loop starts polling the tap, and takes queued frames.
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
        if let Err(e) = self.apply_offloads() {
            warn!("virtio-net: {e}");
        }
        self.rx_pending = None;
        self.rx_lookahead = None;
        self.rx_hold_since = None;
        self.rx_needs_buffers = false;
        self.tx_blocked = false;
        self.kick();
    }
}
