//! The real [`ClonePlatform`]: the guest's own clock, random pool and
//! hostname (PID 1 only; as root on a host it would change the host's).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::ClonePlatform;

// <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]),
// RNDRESEEDCRNG = _IO('R', 0x07). Both need CAP_SYS_ADMIN.
nix::ioctl_write_ptr!(rnd_add_entropy, b'R', 0x03, [libc::c_int; 2]);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Applies InitClone to the running kernel.
#[derive(Debug, Default)]
pub struct GuestPlatform;

impl ClonePlatform for GuestPlatform {
    fn wall_clock_ns(&self) -> io::Result<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes a timespec into our local (vDSO).
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // A wall clock before 1970 reads as 0.
        Ok(u64::try_from(ts.tv_sec).map_or(0, |s| s * 1_000_000_000 + ts.tv_nsec as u64))
    }

    fn set_wall_clock_ns(&self, ns: u64) -> io::Result<()> {
        let ts = libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: clock_settime reads the timespec we pass.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()> {
        let info = rand_pool_info(entropy)?;
        let random = File::open("/dev/random")?;
        // SAFETY: `info` is a complete struct rand_pool_info whose buf_size
        // matches the bytes that follow its header; the kernel only reads it.
        unsafe { rnd_add_entropy(random.as_raw_fd(), info.as_ptr().cast()) }?;
        Ok(())
    }

    fn reseed_crng(&self) -> io::Result<()> {
        let random = File::open("/dev/random")?;
        // SAFETY: an ioctl without an argument.
        unsafe { rnd_reseed_crng(random.as_raw_fd()) }?;
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        nix::unistd::sethostname(name)?;
        Ok(())
    }

    fn hostname(&self) -> io::Result<String> {
        Ok(nix::unistd::gethostname()?.to_string_lossy().into_owned())
    }
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }`
/// for `entropy`, as 32-bit words (so it is aligned like the C struct):
/// entropy_count is in bits (8 per byte: the host's CSPRNG output is full
/// entropy), buf_size in bytes, and the bytes follow, zero-padded to a word.
pub fn rand_pool_info(entropy: &[u8]) -> io::Result<Vec<u32>> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "entropy too large");
    let buf_size = libc::c_int::try_from(entropy.len()).map_err(|_| too_big())?;
    let bits = buf_size.checked_mul(8).ok_or_else(too_big)?;
    let mut words = Vec::with_capacity(2 + entropy.len().div_ceil(4));
    words.push(u32::from_ne_bytes(bits.to_ne_bytes()));
    words.push(u32::from_ne_bytes(buf_size.to_ne_bytes()));
    for chunk in entropy.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(word));
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    #[test]
    fn rand_pool_info_layout() {
        let entropy: Vec<u8> = (1..=37).collect();
        let raw = bytes(&rand_pool_info(&entropy).unwrap());
        // Header, then the bytes, padded to whole words.
        assert_eq!(raw.len(), 8 + 40);
        let int = |at: usize| libc::c_int::from_ne_bytes(raw[at..at + 4].try_into().unwrap());
        assert_eq!(int(0), 37 * 8, "entropy_count in bits");
        assert_eq!(int(4), 37, "buf_size in bytes");
        assert_eq!(&raw[8..8 + 37], entropy.as_slice());
        assert_eq!(&raw[8 + 37..], &[0, 0, 0]);
        // Exactly whole words: no padding.
        assert_eq!(rand_pool_info(&[9; 32]).unwrap().len(), 2 + 8);
    }

    #[test]
    fn ioctl_numbers_match_linux_random_h() {
        assert_eq!(nix::request_code_write!(b'R', 0x03, 8), 0x4008_5203);
        assert_eq!(
            nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>()),
            0x4008_5203
        );
        assert_eq!(nix::request_code_none!(b'R', 0x07), 0x5207);
    }

    /// The kernel takes our ioctl and struct: an empty pool info adds and
    /// credits nothing, so this leaves the host's pool as it was.
    #[test]
    fn kernel_accepts_an_empty_rand_pool_info() {
        match GuestPlatform.add_entropy(&[]) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: needs CAP_SYS_ADMIN");
            }
            Err(e) => panic!("RNDADDENTROPY: {e}"),
        }
    }

    #[test]
    fn reads_the_wall_clock() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let read = GuestPlatform.wall_clock_ns().unwrap();
        assert!(read.abs_diff(now) < 5_000_000_000, "{read} vs {now}");
        assert!(!GuestPlatform.hostname().unwrap().is_empty());
    }
}
