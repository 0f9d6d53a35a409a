//! A [`ClonePlatform`] that only records: unit tests, and the agent in
//! `--listen-unix` mode, where it runs on the host and must not touch the
//! host's clock, random pool or hostname.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::ClonePlatform;

/// One effect the agent asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlatformCall {
    SetWallClock(u64),
    AddEntropy(Vec<u8>),
    ReseedCrng,
    SetHostname(String),
}

impl PlatformCall {
    /// One line for the journal; the entropy only by length.
    fn journal_line(&self) -> String {
        match self {
            Self::SetWallClock(ns) => format!("set_wall_clock {ns}\n"),
            Self::AddEntropy(bytes) => format!("add_entropy {}\n", bytes.len()),
            Self::ReseedCrng => "reseed_crng\n".into(),
            Self::SetHostname(name) => format!("set_hostname {name}\n"),
        }
    }
}

struct State {
    /// The clock: this value at this instant, running on from there.
    clock: (u64, Instant),
    hostname: String,
    calls: Vec<PlatformCall>,
    fail_reseed: Option<io::Error>,
    journal: Option<File>,
}

/// Keeps a pretend clock and hostname, and every call made.
pub struct RecordingPlatform {
    state: Mutex<State>,
}

impl RecordingPlatform {
    /// A platform whose wall clock reads `clock_ns` now, named `hostname`.
    pub fn new(clock_ns: u64, hostname: &str) -> Self {
        Self {
            state: Mutex::new(State {
                clock: (clock_ns, Instant::now()),
                hostname: hostname.into(),
                calls: Vec::new(),
                fail_reseed: None,
                journal: None,
            }),
        }
    }

    /// For `--listen-unix`: starts from the host's clock and hostname (read
    /// only) and appends one line per call to `journal`, so tests in another
    /// process can see what the agent would have done.
    pub fn for_host_tests(journal: &Path) -> io::Result<Self> {
        let platform = Self::new(
            super::GuestPlatform.wall_clock_ns()?,
            &super::GuestPlatform.hostname()?,
        );
        let file = OpenOptions::new().create(true).append(true).open(journal)?;
        platform.state().journal = Some(file);
        Ok(platform)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<PlatformCall> {
        self.state().calls.clone()
    }

    /// Makes the next `reseed_crng` fail with `err`.
    pub fn fail_reseed(&self, err: io::Error) {
        self.state().fail_reseed = Some(err);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, call: PlatformCall) {
        let mut st = self.state();
        if let Some(journal) = &mut st.journal {
            let _ = journal.write_all(call.journal_line().as_bytes());
        }
        st.calls.push(call);
    }
}

impl ClonePlatform for RecordingPlatform {
    fn wall_clock_ns(&self) -> io::Result<u64> {
        let (ns, at) = self.state().clock;
        Ok(ns.saturating_add(at.elapsed().as_nanos() as u64))
    }

    fn set_wall_clock_ns(&self, ns: u64) -> io::Result<()> {
        self.state().clock = (ns, Instant::now());
        self.record(PlatformCall::SetWallClock(ns));
        Ok(())
    }

    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()> {
        self.record(PlatformCall::AddEntropy(entropy.to_vec()));
        Ok(())
    }

    fn reseed_crng(&self) -> io::Result<()> {
        if let Some(err) = self.state().fail_reseed.take() {
            return Err(err);
        }
        self.record(PlatformCall::ReseedCrng);
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        self.state().hostname = name.into();
        self.record(PlatformCall::SetHostname(name.into()));
        Ok(())
    }

    fn hostname(&self) -> io::Result<String> {
        Ok(self.state().hostname.clone())
    }
}
