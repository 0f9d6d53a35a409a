//! The host side of the NIC: a tap device's file descriptor.
//!
//! In production the shim opens the tap (in the pod's network namespace)
//! and passes the descriptor ([`Tap::from_fd`]); [`Tap::open_named`] opens
//! or creates one by name, for tests and debugging. Either way the tap
//! carries frames with the 12-byte virtio-net header and is non-blocking.
//! [`Tap::from_datagram_socket`] puts a datagram socket where the tap would
//! be (same framing, no offloads): tests use one end of a socketpair as a
//! fake tap that needs no privileges.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetError, VNET_HDR_LEN};

/// `struct ifreq` as the tun ioctls use it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        Self {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(libc::IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// The flags every Arrow tap has.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
/// Every offload the device may ask for.
const ALL_OFFLOADS: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tap,
    Datagram,
}

/// A tap device opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, its
/// header size set to 12 bytes, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    kind: Kind,
    offloads: bool,
}

fn last_err<T>(ret: libc::c_int, ok: T) -> io::Result<T> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ok)
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    last_err(flags, ())?;
    // SAFETY: as above.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    last_err(ret, ())
}

impl Tap {
    /// Opens the tap `name` (creating it if missing, which needs
    /// `CAP_NET_ADMIN`) through `/dev/net/tun`.
    pub fn open_named(name: &str) -> Result<Self, NetError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(NetError::InvalidTapName(name.to_owned()));
        }
        let open_err = |source| NetError::OpenTap {
            name: name.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(open_err)?;
        let mut req = IfReq::new();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = TAP_FLAGS as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which
        // `req` is (same size and layout), and it lives across the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        last_err(ret, ()).map_err(open_err)?;
        Self::setup(file.into())
    }

    /// Takes a tap descriptor opened by someone else. It must be a tap
    /// opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; it is made
    /// non-blocking (which the opener's copies share) and its header size
    /// set to 12 bytes.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, NetError> {
        Self::setup(fd)
    }

    /// A datagram socket (one end of a `socketpair`, say) in place of a tap:
    /// every datagram is one 12-byte header and frame. No offloads.
    pub fn from_datagram_socket(fd: OwnedFd, name: &str) -> Result<Self, NetError> {
        set_nonblocking(fd.as_raw_fd()).map_err(|source| NetError::TapIoctl {
            name: name.to_owned(),
            what: "set O_NONBLOCK",
            source,
        })?;
        Ok(Self {
            file: fd.into(),
            name: name.to_owned(),
            kind: Kind::Datagram,
            offloads: false,
        })
    }

    fn setup(fd: OwnedFd) -> Result<Self, NetError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq::new();
        // SAFETY: TUNGETIFF fills one `struct ifreq`, which `req` is.
        let ret = unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(NetError::NotATap(io::Error::last_os_error().to_string()));
        }
        let name = req.name();
        let flags = req.flags as u16;
        if i32::from(flags) & TAP_FLAGS != TAP_FLAGS {
            return Err(NetError::TapFlags { name, flags });
        }
        let ioctl_err = |what| {
            let name = name.clone();
            move |source| NetError::TapIoctl { name, what, source }
        };
        set_nonblocking(raw).map_err(ioctl_err("set O_NONBLOCK"))?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let ret = unsafe { libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &hdr_len) };
        last_err(ret, ()).map_err(ioctl_err("TUNSETVNETHDRSZ"))?;
        let mut tap = Self {
            file: fd.into(),
            name: name.clone(),
            kind: Kind::Tap,
            offloads: false,
        };
        // Probe: a tap that takes every offload gets them offered.
        tap.offloads = tap.set_offload(ALL_OFFLOADS).is_ok();
        tap.set_offload(0).map_err(ioctl_err("TUNSETOFFLOAD"))?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the tap can do checksum and TCP segmentation offloads.
    pub fn supports_offloads(&self) -> bool {
        self.offloads
    }

    /// Tells the tap which offloads (`TUN_F_*`) the guest takes: it then
    /// hands over frames that need them (partial checksums, GSO).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        match self.kind {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            Kind::Tap => last_err(
                unsafe {
                    libc::ioctl(
                        self.file.as_raw_fd(),
                        libc::TUNSETOFFLOAD,
                        libc::c_ulong::from(flags),
                    )
                },
                (),
            ),
            Kind::Datagram if flags == 0 => Ok(()),
            Kind::Datagram => Err(io::Error::from(io::ErrorKind::Unsupported)),
        }
    }

    /// Reads one header and frame into `buf`; `WouldBlock` when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Whether a frame waits to be read, without reading it.
    pub fn has_input(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// Writes one header and frame gathered from `iovecs`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory readable for the duration of the
    /// call.
    pub unsafe fn writev(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the caller vouches for the iovecs; the kernel only reads.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Another descriptor for the same tap (`dup`).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
            kind: self.kind,
            offloads: self.offloads,
        })
    }
}

impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> Self {
        tap.file.into()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn names_are_checked_before_anything_is_opened() {
        for name in ["", "a\0b", "sixteen-bytes-xx"] {
            assert!(
                matches!(Tap::open_named(name), Err(NetError::InvalidTapName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        let err = Tap::from_fd(file.into()).unwrap_err();
        assert!(matches!(err, NetError::NotATap(_)), "{err}");
        let (a, _b) = UnixDatagram::pair().unwrap();
        assert!(matches!(Tap::from_fd(a.into()), Err(NetError::NotATap(_))));
    }

    #[test]
    fn a_datagram_socket_stands_in_for_a_tap() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let tap = Tap::from_datagram_socket(a.into(), "fake0").unwrap();
        assert_eq!(tap.name(), "fake0");
        assert!(!tap.supports_offloads());
        assert!(tap.set_offload(0).is_ok());
        assert!(tap.set_offload(libc::TUN_F_CSUM).is_err());
        let mut buf = [0u8; 64];
        assert_eq!(
            tap.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        b.send(b"0123456789abframe").unwrap();
        assert_eq!(tap.read(&mut buf).unwrap(), 17);
        let (h, f) = (b"0123456789ab", b"frame!");
        let iov = [
            libc::iovec {
                iov_base: h.as_ptr() as *mut _,
                iov_len: h.len(),
            },
            libc::iovec {
                iov_base: f.as_ptr() as *mut _,
                iov_len: f.len(),
            },
        ];
        // SAFETY: both iovecs point at live arrays.
        assert_eq!(unsafe { tap.writev(&iov) }.unwrap(), 18);
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"0123456789abframe!");
        let clone = tap.try_clone().unwrap();
        assert_ne!(clone.as_raw_fd(), tap.as_raw_fd());
    }
}
