//! InitClone: what makes a clone restored from a template snapshot unique
//! (wall clock, kernel randomness, hostname). The effects go through
//! [`ClonePlatform`], so host tests run the real validation and ordering
//! against a recording fake instead of the host's clock and pool.

mod fake;
mod guest;

use std::io;

use proto::agent::{CloneInitialized, InitClone};
use proto::{CLONE_ENTROPY_MAX, CLONE_ENTROPY_MIN, HOSTNAME_MAX};

use crate::error::AgentError;

pub use fake::{PlatformCall, RecordingPlatform};
pub use guest::{rand_pool_info, GuestPlatform};

/// The system state a clone must make its own. One method per effect, so a
/// fake can record exactly what would have been done.
pub trait ClonePlatform: Send + Sync {
    /// CLOCK_REALTIME, in nanoseconds since the Unix epoch.
    fn wall_clock_ns(&self) -> io::Result<u64>;
    /// Sets CLOCK_REALTIME (`ns` is at most `i64::MAX`).
    fn set_wall_clock_ns(&self, ns: u64) -> io::Result<()>;
    /// Mixes `entropy` into the kernel's input pool, credited in full.
    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()>;
    /// Re-keys the kernel CRNG from the input pool now.
    fn reseed_crng(&self) -> io::Result<()>;
    /// Sets the hostname (validated: non-empty, short, no NUL).
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// The hostname in effect.
    fn hostname(&self) -> io::Result<String>;
}

/// InitClone: validates every field, then applies clock, entropy and
/// hostname in that order (see agent.proto).
pub fn init_clone(
    platform: &dyn ClonePlatform,
    req: &InitClone,
) -> Result<CloneInitialized, AgentError> {
    validate(req).map_err(AgentError::InvalidArgument)?;
    let previous_unix_time_ns = platform
        .wall_clock_ns()
        .map_err(step("read the wall clock"))?;
    platform
        .set_wall_clock_ns(req.unix_time_ns)
        .map_err(step("set the wall clock"))?;
    platform
        .add_entropy(&req.entropy)
        .map_err(step("add entropy"))?;
    platform.reseed_crng().map_err(step("reseed the CRNG"))?;
    let hostname = if req.hostname.is_empty() {
        platform.hostname().map_err(step("read the hostname"))?
    } else {
        platform
            .set_hostname(&req.hostname)
            .map_err(step("set the hostname"))?;
        req.hostname.clone()
    };
    Ok(CloneInitialized {
        previous_unix_time_ns,
        // Validated: at most CLONE_ENTROPY_MAX.
        entropy_bytes: req.entropy.len() as u32,
        hostname,
    })
}

/// The checks agent.proto promises, before anything is applied.
fn validate(req: &InitClone) -> Result<(), String> {
    if req.unix_time_ns == 0 || i64::try_from(req.unix_time_ns).is_err() {
        return Err(format!(
            "unix_time_ns {} out of range (1..=2^63-1)",
            req.unix_time_ns
        ));
    }
    let len = req.entropy.len();
    if !(CLONE_ENTROPY_MIN..=CLONE_ENTROPY_MAX).contains(&len) {
        return Err(format!(
            "entropy of {len} bytes (need {CLONE_ENTROPY_MIN}..={CLONE_ENTROPY_MAX})"
        ));
    }
    if req.hostname.len() > HOSTNAME_MAX {
        return Err(format!(
            "hostname of {} bytes (at most {HOSTNAME_MAX})",
            req.hostname.len()
        ));
    }
    if req.hostname.contains('\0') {
        return Err("hostname contains NUL".into());
    }
    Ok(())
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> AgentError {
    move |source| AgentError::Internal { what, source }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::error::Code;

    fn request(hostname: &str) -> InitClone {
        InitClone {
            unix_time_ns: 1_700_000_000_123_456_789,
            entropy: (0..64).collect(),
            hostname: hostname.into(),
        }
    }

    #[test]
    fn applies_clock_entropy_reseed_hostname_in_order() {
        let fake = RecordingPlatform::new(1_000, "template");
        let done = init_clone(&fake, &request("clone-1")).unwrap();
        assert_eq!(
            fake.calls(),
            vec![
                PlatformCall::SetWallClock(1_700_000_000_123_456_789),
                PlatformCall::AddEntropy((0..64).collect()),
                PlatformCall::ReseedCrng,
                PlatformCall::SetHostname("clone-1".into()),
            ]
        );
        // The fake clock runs on from 1000 ns.
        assert!((1_000..5_000_000_000).contains(&done.previous_unix_time_ns));
        assert_eq!(done.entropy_bytes, 64);
        assert_eq!(done.hostname, "clone-1");
        assert_eq!(fake.hostname().unwrap(), "clone-1");
    }

    #[test]
    fn empty_hostname_keeps_the_template_one() {
        let fake = RecordingPlatform::new(1_000, "template");
        let done = init_clone(&fake, &request("")).unwrap();
        assert_eq!(done.hostname, "template");
        assert!(!fake
            .calls()
            .iter()
            .any(|c| matches!(c, PlatformCall::SetHostname(_))));
        // Repeating the call is fine; the clock it reports is the one set.
        let again = init_clone(&fake, &request("")).unwrap();
        let set = 1_700_000_000_123_456_789;
        assert!((set..set + 5_000_000_000).contains(&again.previous_unix_time_ns));
    }

    #[test]
    fn bad_fields_are_refused_before_any_effect() {
        let mut cases = Vec::new();
        let mut r = request("h");
        r.unix_time_ns = 0;
        cases.push(r);
        let mut r = request("h");
        r.unix_time_ns = 1 << 63;
        cases.push(r);
        let mut r = request("h");
        r.entropy = vec![7; CLONE_ENTROPY_MIN - 1];
        cases.push(r);
        let mut r = request("h");
        r.entropy = vec![7; CLONE_ENTROPY_MAX + 1];
        cases.push(r);
        let mut r = request("h");
        r.entropy.clear();
        cases.push(r);
        cases.push(request(&"x".repeat(HOSTNAME_MAX + 1)));
        cases.push(request("a\0b"));
        for req in cases {
            let fake = RecordingPlatform::new(1_000, "template");
            let err = init_clone(&fake, &req).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err}");
            assert!(fake.calls().is_empty(), "{err}: {:?}", fake.calls());
        }
        // The limits themselves are fine.
        let mut r = request(&"x".repeat(HOSTNAME_MAX));
        r.entropy = vec![7; CLONE_ENTROPY_MIN];
        r.unix_time_ns = i64::MAX as u64;
        init_clone(&RecordingPlatform::new(1, "t"), &r).unwrap();
        r.entropy = vec![7; CLONE_ENTROPY_MAX];
        r.unix_time_ns = 1;
        init_clone(&RecordingPlatform::new(1, "t"), &r).unwrap();
    }

    #[test]
    fn a_failing_step_is_internal_and_stops_there() {
        let fake = RecordingPlatform::new(1_000, "template");
        fake.fail_reseed(io::Error::from_raw_os_error(libc::EPERM));
        let err = init_clone(&fake, &request("clone-1")).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.to_string().contains("reseed"), "{err}");
        // The clock and the pool were done; the hostname was not.
        assert_eq!(fake.calls().len(), 2);
        assert_eq!(fake.hostname().unwrap(), "template");
    }

    /// std's `HashMap` caches its SipHash keys per thread: maps made before
    /// the snapshot would hash identically in every clone. arrow-init keeps
    /// no such state (and no RNG of its own).
    #[test]
    fn no_cached_randomness_in_arrow_init() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut dirs = vec![src];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                // Split so this test does not find itself.
                let banned_words = [
                    concat!("Hash", "Map<"),
                    concat!("Hash", "Set<"),
                    concat!("Random", "State"),
                    concat!("rand", "::"),
                ];
                for banned in banned_words {
                    let hits = text
                        .lines()
                        .filter(|l| l.contains(banned) && !l.trim_start().starts_with("//"))
                        .count();
                    assert_eq!(hits, 0, "{banned} in {}", path.display());
                }
            }
        }
    }
}
