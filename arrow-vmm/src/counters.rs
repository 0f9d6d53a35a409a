//! Publishes the VM's device counters for `arrow monitor`: every
//! [`PUBLISH_INTERVAL`], and once more when the VM has stopped, the
//! controller (main) thread writes them whole to a file in the VMM's own
//! directory ([`proto::vm_counters`], `<pod>/vmm/counters.json`), as a
//! temporary file renamed over the last one, so a reader sees an old file
//! or a new one, never half of one.
//!
//! Why a file the monitor reads rather than a socket it connects to: the
//! monitor already reads every pod's figures from files at scrape time,
//! keeps no connection to a pod and needs no privilege; a listening VMM
//! would be a second, guest-facing service to confine and a scraper could
//! make it do work. A file costs the VMM one small write a second, on the
//! thread that otherwise only waits, needs two more system calls in that
//! thread's filter (`openat` with exactly [`OPEN_FLAGS`], `rename`) and
//! no descriptor kept open. The VMM can write nothing else there that the
//! jail did not already let it: the directory is its sockets' and console
//! log's.
//!
//! A failed write is logged (once, until one succeeds again) and never
//! stops the VM: the counters are for watching, not for running it.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::vm_counters::{FsCounters, NetCounters, VmCounters};
use vmm_core::virtio::fs::FsStats;
use vmm_core::virtio::net::NetStats;
use vmm_core::vm::Vm;

/// How often the counters are written while the VM runs.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// The flags the temporary file is opened with, and the only ones the
/// controller thread's filter lets `openat` take: write-only, created or
/// truncated, not through a symlink. (The standard library adds
/// `O_CLOEXEC` to every open.)
pub const OPEN_FLAGS: i32 =
    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOFOLLOW;

/// The counters file and its temporary beside it.
pub struct CountersFile {
    path: PathBuf,
    tmp: PathBuf,
    /// Whether the last write failed (and was logged).
    failing: bool,
}

impl CountersFile {
    pub fn new(path: &Path) -> Self {
        let mut tmp = OsString::from(path.as_os_str());
        tmp.push(".tmp");
        Self {
            path: path.to_path_buf(),
            tmp: PathBuf::from(tmp),
            failing: false,
        }
    }

    /// Writes `counters` whole.
    pub fn write(&self, counters: &VmCounters) -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            // O_CLOEXEC, O_WRONLY, O_CREAT and O_TRUNC come from the
            // options above; the rest must match OPEN_FLAGS.
            .custom_flags(OPEN_FLAGS & !(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC))
            .mode(0o644)
            .open(&self.tmp)?;
        file.write_all(&counters.to_json())?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)
    }

    /// Writes the VM's counters now; a failure is logged once per run of
    /// failures.
    pub fn publish(&mut self, vm: &Vm) {
        match self.write(&counters(vm.net_stats(), vm.fs_stats())) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                eprintln!(
                    "arrow-vmm: cannot publish the device counters to {}: {e}",
                    self.path.display()
                );
            }
            Err(_) => {}
        }
    }
}

/// The devices' counters as the file holds them.
pub fn counters(net: Option<NetStats>, fs: Option<FsStats>) -> VmCounters {
    VmCounters {
        net: net.map(|n| NetCounters {
            rx_frames: n.rx_frames,
            rx_bytes: n.rx_bytes,
            rx_dropped: n.rx_dropped,
            tx_frames: n.tx_frames,
            tx_bytes: n.tx_bytes,
            tx_dropped: n.tx_dropped,
        }),
        fs: fs.map(|f| FsCounters {
            requests: f.requests,
            errors: f.errors,
            unanswered: f.unanswered,
            read_bytes: f.read_bytes,
            write_bytes: f.write_bytes,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_stats_map_to_the_files_fields() {
        let net = NetStats {
            rx_frames: 1,
            rx_bytes: 2,
            rx_dropped: 3,
            tx_frames: 4,
            tx_bytes: 5,
            tx_dropped: 6,
            rx_deferred: 7,
            tx_deferred: 8,
            rx_coalesced: 9,
            rx_held: 10,
        };
        let fs = FsStats {
            requests: 11,
            errors: 12,
            unanswered: 13,
            read_bytes: 14,
            write_bytes: 15,
        };
        let c = counters(Some(net), Some(fs));
        assert_eq!(
            c.net,
            Some(NetCounters {
                rx_frames: 1,
                rx_bytes: 2,
                rx_dropped: 3,
                tx_frames: 4,
                tx_bytes: 5,
                tx_dropped: 6,
            })
        );
        assert_eq!(
            c.fs,
            Some(FsCounters {
                requests: 11,
                errors: 12,
                unanswered: 13,
                read_bytes: 14,
                write_bytes: 15,
            })
        );
        assert_eq!(counters(None, None), VmCounters::default());
    }

    #[test]
    fn written_whole_replacing_the_last_and_never_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("arrow-counters-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(proto::vm_counters::FILE_NAME);
        let file = CountersFile::new(&path);
        let mut c = counters(None, Some(FsStats::default()));
        file.write(&c).unwrap();
        c.fs = Some(FsCounters {
            requests: 5,
            ..Default::default()
        });
        file.write(&c).unwrap();
        assert_eq!(
            VmCounters::parse(&std::fs::read(&path).unwrap()).unwrap(),
            c
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [proto::vm_counters::FILE_NAME], "no temporary left");
        // A symlink planted at the temporary's name is not followed.
        let target = dir.join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, &file.tmp).unwrap();
        let err = file.write(&c).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
