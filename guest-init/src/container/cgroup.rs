//! A container's cgroup v2 directory: limits, statistics, freezing,
//! killing. The text formats of the interface files are parsed by small
//! pure functions, tested on sample text.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use proto::agent::{Resources, StatEntry, Stats};

/// The controllers containers get, if the kernel has them.
pub const CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

/// One cgroup directory.
#[derive(Debug, Clone)]
pub struct Cgroup {
    dir: PathBuf,
}

fn io_err(what: impl std::fmt::Display, err: io::Error) -> String {
    format!("{what}: {err}")
}

impl Cgroup {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its cgroup.procs file (a process writes "0" there to join).
    pub fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the directory (an existing one, left by an earlier
    /// incarnation, is taken over).
    pub fn create(&self) -> Result<(), String> {
        match std::fs::create_dir(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(io_err(
                format_args!("create cgroup {}", self.dir.display()),
                e,
            )),
            _ => Ok(()),
        }
    }

    /// Writes `value` to an interface file, in one write(2).
    pub fn write(&self, name: &str, value: &str) -> Result<(), String> {
        let path = self.file(name);
        write_file(&path, value)
            .map_err(|e| io_err(format_args!("write {value:?} to {}", path.display()), e))
    }

    pub fn read(&self, name: &str) -> Result<String, String> {
        let path = self.file(name);
        std::fs::read_to_string(&path)
            .map_err(|e| io_err(format_args!("read {}", path.display()), e))
    }

    /// Reads an interface file that exists only with some controller.
    pub fn read_optional(&self, name: &str) -> Result<Option<String>, String> {
        let path = self.file(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format_args!("read {}", path.display()), e)),
        }
    }

    /// Applies the set fields of `r` (validated by `spec::validate_resources`).
    pub fn apply(&self, r: &Resources) -> Result<(), String> {
        let current_quota = || {
            self.read("cpu.max")
                .map(|text| text.split_whitespace().next().unwrap_or("max").to_string())
        };
        for (name, value) in resource_writes(r, current_quota)? {
            match self.write(name, &value) {
                // No swap in the guest kernel (CONFIG_SWAP=n): nothing to
                // limit.
                Err(_) if name == "memory.swap.max" && !self.file(name).exists() => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// The pids in cgroup.procs.
    pub fn pids(&self) -> Result<Vec<u32>, String> {
        self.read("cgroup.procs").map(|text| parse_pids(&text))
    }

    /// Reads every statistics file (those of missing controllers count as
    /// zero) and assembles `Stats`.
    pub fn stats(&self, timestamp_ns: u64) -> Result<Stats, String> {
        let snapshot = Snapshot {
            cpu_stat: self.read_optional("cpu.stat")?,
            memory_current: self.read_optional("memory.current")?,
            memory_max: self.read_optional("memory.max")?,
            memory_stat: self.read_optional("memory.stat")?,
            memory_events: self.read_optional("memory.events")?,
            pids_current: self.read_optional("pids.current")?,
            pids_max: self.read_optional("pids.max")?,
        };
        Ok(snapshot.to_stats(timestamp_ns))
    }

    /// Writes cgroup.freeze and waits until cgroup.events reports the state.
    pub fn freeze(&self, frozen: bool, timeout: Duration) -> Result<(), String> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        let done = self.wait_events(timeout, |events| has_line(events, want))?;
        if !done {
            return Err(format!(
                "{} did not report \"{want}\" within {timeout:?}",
                self.file("cgroup.events").display()
            ));
        }
        Ok(())
    }

    /// SIGKILLs every process in the cgroup (cgroup.kill, or one by one
    /// where the kernel lacks it) and waits until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.read("cgroup.events")?;
            if has_line(&events, "populated 0") {
                return Ok(());
            }
            match self.write("cgroup.kill", "1") {
                Ok(()) => {}
                Err(_) if !self.file("cgroup.kill").exists() => {
                    for pid in self.pids()? {
                        // SAFETY: kill(2) takes plain integers.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
                Err(e) => return Err(e),
            }
            // A frozen task only dies once it runs again.
            let _ = self.write("cgroup.freeze", "0");
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "processes left in {} after {timeout:?}: {:?}",
                    self.dir.display(),
                    self.pids().unwrap_or_default()
                ));
            }
            // Wait for the change, then kill again (a fork may have raced).
            self.wait_events(left.min(Duration::from_millis(500)), |e| {
                has_line(e, "populated 0")
            })?;
        }
    }

    /// Polls cgroup.events (the kernel signals POLLPRI on a change) until
    /// `done` holds or `timeout` passes; returns whether it held.
    fn wait_events(&self, timeout: Duration, done: impl Fn(&str) -> bool) -> Result<bool, String> {
        let path = self.file("cgroup.events");
        let mut file =
            File::open(&path).map_err(|e| io_err(format_args!("open {}", path.display()), e))?;
        let deadline = Instant::now() + timeout;
        let mut text = String::new();
        loop {
            text.clear();
            file.rewind()
                .and_then(|_| file.read_to_string(&mut text))
                .map_err(|e| io_err(format_args!("read {}", path.display()), e))?;
            if done(&text) {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // Capped, in case a notification is missed.
            let ms = left.min(Duration::from_millis(100)).as_millis().max(1) as i32;
            let mut pfd = libc::pollfd {
                fd: file.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            };
            // SAFETY: poll(2) on one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }

    /// Removes the (empty) directory; gone already is fine. Retries a
    /// little: the last exits may still be settling.
    pub fn remove(&self) -> Result<(), String> {
        let mut tries = 0;
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 100 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(io_err(
                        format_args!("remove cgroup {}", self.dir.display()),
                        e,
                    ))
                }
            }
        }
    }
}

/// One write(2) of the whole value, as cgroup files want.
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut file = File::options().write(true).open(path)?;
    let n = file.write(value.as_bytes())?;
    if n != value.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

/// Enables `CONTROLLERS` (those the kernel offers) for the children of
/// `parent`.
pub fn enable_controllers(parent: &Path) -> Result<(), String> {
    let parent = Cgroup::new(parent.to_path_buf());
    let available = parent.read("cgroup.controllers")?;
    let wanted: Vec<String> = CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    parent.write("cgroup.subtree_control", &wanted.join(" "))
}

/// memory.max / memory.swap.max text: negative = no limit.
pub fn memory_value(bytes: i64) -> String {
    if bytes < 0 {
        "max".into()
    } else {
        bytes.to_string()
    }
}

/// pids.max text: <= 0 = no limit.
pub fn pids_value(limit: i64) -> String {
    if limit <= 0 {
        "max".into()
    } else {
        limit.to_string()
    }
}

/// cpu.weight from OCI cpu shares (runc's formula); 0 = not set. Shares
/// are clamped to the cgroup v1 range 2..=262144 first.
pub fn cpu_weight(shares: u64) -> Option<u64> {
    if shares == 0 {
        return None;
    }
    let shares = shares.clamp(2, 262_144);
    Some(1 + ((shares - 2) * 9999) / 262_142)
}

/// The interface files to write for `r`, in order. `current_quota` gives
/// cpu.max's quota, needed only when the period changes alone.
pub fn resource_writes(
    r: &Resources,
    current_quota: impl FnOnce() -> Result<String, String>,
) -> Result<Vec<(&'static str, String)>, String> {
    let mut writes = Vec::new();
    if let Some(bytes) = r.memory_limit {
        writes.push(("memory.max", memory_value(bytes)));
    }
    if let Some(bytes) = r.memory_swap {
        writes.push(("memory.swap.max", memory_value(bytes)));
    }
    let quota = r.cpu_quota.map(|q| {
        if q <= 0 {
            "max".to_string()
        } else {
            q.to_string()
        }
    });
    match (quota, r.cpu_period) {
        (Some(q), Some(p)) => writes.push(("cpu.max", format!("{q} {p}"))),
        // The kernel keeps the period when only the quota is written.
        (Some(q), None) => writes.push(("cpu.max", q)),
        (None, Some(p)) => writes.push(("cpu.max", format!("{} {p}", current_quota()?))),
        (None, None) => {}
    }
    if let Some(weight) = r.cpu_shares.and_then(cpu_weight) {
        writes.push(("cpu.weight", weight.to_string()));
    }
    if let Some(limit) = r.pids_limit {
        writes.push(("pids.max", pids_value(limit)));
    }
    Ok(writes)
}

/// "key value" lines (cpu.stat, memory.stat, memory.events), in order;
/// malformed lines are skipped.
pub fn parse_keyed(text: &str) -> Vec<(&str, u64)> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            let (key, value) = (it.next()?, it.next()?);
            Some((key, value.parse().ok()?))
        })
        .collect()
}

/// One key of a keyed file.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    parse_keyed(text)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// A single number, or "max" (= 0, no limit).
pub fn parse_limit(text: &str) -> u64 {
    match text.trim() {
        "max" => 0,
        n => n.parse().unwrap_or(0),
    }
}

/// cgroup.procs: one pid a line.
pub fn parse_pids(text: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Whether a flat file has exactly this line ("frozen 1", "populated 0").
pub fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim_end() == line)
}

/// The statistics files of a cgroup as read (None = no such file).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub cpu_stat: Option<String>,
    pub memory_current: Option<String>,
    pub memory_max: Option<String>,
    pub memory_stat: Option<String>,
    pub memory_events: Option<String>,
    pub pids_current: Option<String>,
    pub pids_max: Option<String>,
}

impl Snapshot {
    pub fn to_stats(&self, timestamp_ns: u64) -> Stats {
        let text = |f: &Option<String>| f.as_deref().unwrap_or("").to_string();
        let cpu = text(&self.cpu_stat);
        let cpu = |key| keyed(&cpu, key).unwrap_or(0);
        let events = text(&self.memory_events);
        let events = |key| keyed(&events, key).unwrap_or(0);
        let number = |f: &Option<String>| f.as_deref().map_or(0, parse_limit);
        Stats {
            timestamp_ns,
            cpu_usage_usec: cpu("usage_usec"),
            cpu_user_usec: cpu("user_usec"),
            cpu_system_usec: cpu("system_usec"),
            cpu_nr_periods: cpu("nr_periods"),
            cpu_nr_throttled: cpu("nr_throttled"),
            cpu_throttled_usec: cpu("throttled_usec"),
            memory_current: number(&self.memory_current),
            memory_limit: number(&self.memory_max),
            memory_stat: parse_keyed(self.memory_stat.as_deref().unwrap_or(""))
                .into_iter()
                .map(|(key, value)| StatEntry {
                    key: key.to_string(),
                    value,
                })
                .collect(),
            oom_events: events("oom"),
            oom_kill_events: events("oom_kill"),
            pids_current: number(&self.pids_current),
            pids_limit: number(&self.pids_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_STAT: &str = "usage_usec 1234567
user_usec 1000000
system_usec 234567
core_sched.force_idle_usec 0
nr_periods 50
nr_throttled 3
throttled_usec 45000
nr_bursts 0
burst_usec 0
";

    const MEMORY_STAT: &str = "anon 4096000
file 8192
kernel 196608
kernel_stack 32768
pgfault 1200
workingset_refault_anon 0
";

    const MEMORY_EVENTS: &str = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";

    #[test]
    fn keyed_files() {
        let cpu = parse_keyed(CPU_STAT);
        assert_eq!(cpu[0], ("usage_usec", 1_234_567));
        assert_eq!(cpu.len(), 9);
        assert_eq!(keyed(CPU_STAT, "throttled_usec"), Some(45_000));
        assert_eq!(keyed(CPU_STAT, "nope"), None);
        assert_eq!(keyed(MEMORY_EVENTS, "oom_kill"), Some(1));
        // Junk lines are skipped, not fatal.
        assert_eq!(
            parse_keyed("a 1\nbroken\nb x\nc 3 extra\n\n"),
            [("a", 1), ("c", 3)]
        );
    }

    #[test]
    fn limits_pids_and_flags() {
        assert_eq!(parse_limit("max\n"), 0);
        assert_eq!(parse_limit("67108864\n"), 67_108_864);
        assert_eq!(parse_limit("garbage"), 0);
        assert_eq!(parse_pids("1\n23\n\n456\nx\n"), [1, 23, 456]);
        let events = "populated 1\nfrozen 0\n";
        assert!(has_line(events, "frozen 0"));
        assert!(!has_line(events, "frozen 1"));
        assert!(!has_line("populated 10\n", "populated 1"));
    }

    #[test]
    fn resource_values() {
        assert_eq!(memory_value(-1), "max");
        assert_eq!(memory_value(0), "0");
        assert_eq!(memory_value(1 << 30), "1073741824");
        assert_eq!(pids_value(0), "max");
        assert_eq!(pids_value(-1), "max");
        assert_eq!(pids_value(64), "64");
        assert_eq!(cpu_weight(0), None);
        assert_eq!(cpu_weight(2), Some(1));
        assert_eq!(cpu_weight(1), Some(1));
        assert_eq!(cpu_weight(1024), Some(39));
        assert_eq!(cpu_weight(262_144), Some(10_000));
        assert_eq!(cpu_weight(u64::MAX), Some(10_000));
    }

    #[test]
    fn writes_for_resources() {
        let no_read = || -> Result<String, String> { panic!("cpu.max read") };
        let r = Resources {
            memory_limit: Some(64 << 20),
            memory_swap: Some(-1),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            cpu_shares: Some(512),
            pids_limit: Some(0),
        };
        let writes = resource_writes(&r, no_read).unwrap();
        let want = [
            ("memory.max", "67108864"),
            ("memory.swap.max", "max"),
            ("cpu.max", "50000 100000"),
            ("cpu.weight", "20"),
            ("pids.max", "max"),
        ];
        assert_eq!(
            writes
                .iter()
                .map(|(f, v)| (*f, v.as_str()))
                .collect::<Vec<_>>(),
            want
        );
        assert!(resource_writes(&Resources::default(), no_read)
            .unwrap()
            .is_empty());

        let quota_only = Resources {
            cpu_quota: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            resource_writes(&quota_only, no_read).unwrap(),
            [("cpu.max", "max".to_string())]
        );
        let period_only = Resources {
            cpu_period: Some(20_000),
            ..Default::default()
        };
        let writes = resource_writes(&period_only, || Ok("30000".into())).unwrap();
        assert_eq!(writes, [("cpu.max", "30000 20000".to_string())]);
        assert!(resource_writes(&period_only, || Err("no cpu.max".into())).is_err());
        let zero_shares = Resources {
            cpu_shares: Some(0),
            ..Default::default()
        };
        assert!(resource_writes(&zero_shares, no_read).unwrap().is_empty());
    }

    #[test]
    fn stats_from_files() {
        let snap = Snapshot {
            cpu_stat: Some(CPU_STAT.into()),
            memory_current: Some("5000000\n".into()),
            memory_max: Some("max\n".into()),
            memory_stat: Some(MEMORY_STAT.into()),
            memory_events: Some(MEMORY_EVENTS.into()),
            pids_current: Some("3\n".into()),
            pids_max: Some("100\n".into()),
        };
        let s = snap.to_stats(99);
        assert_eq!(s.timestamp_ns, 99);
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec),
            (1_234_567, 1_000_000, 234_567)
        );
        assert_eq!(
            (s.cpu_nr_periods, s.cpu_nr_throttled, s.cpu_throttled_usec),
            (50, 3, 45_000)
        );
        assert_eq!((s.memory_current, s.memory_limit), (5_000_000, 0));
        assert_eq!(s.memory_stat.len(), 6);
        assert_eq!(
            (s.memory_stat[0].key.as_str(), s.memory_stat[0].value),
            ("anon", 4_096_000)
        );
        assert_eq!(s.memory_stat[5].key, "workingset_refault_anon");
        assert_eq!((s.oom_events, s.oom_kill_events), (2, 1));
        assert_eq!((s.pids_current, s.pids_limit), (3, 100));

        // No controllers: only the core cpu.stat figures.
        let bare = Snapshot {
            cpu_stat: Some("usage_usec 5\nuser_usec 3\nsystem_usec 2\n".into()),
            ..Default::default()
        };
        let s = bare.to_stats(1);
        assert_eq!(s.cpu_usage_usec, 5);
        assert_eq!(
            (s.memory_current, s.pids_limit, s.memory_stat.len()),
            (0, 0, 0)
        );
    }
}
