//! A pod's figures as the node pays for them: CPU time and memory of the
//! pod's cgroup on the host, where the shim puts the pod's `arrow-vmm` —
//! so they are the VM's own (every vCPU's time, the guest RAM it touched,
//! the VMM's own memory), not the sum of the containers inside it.
//! containerd's CRI plugin reads a pod's stats from the same cgroup (the
//! pod's cgroup parent); cgroup v2 and v1 are read, cgroupfs paths and the
//! systemd driver's slices.

use std::path::{Path, PathBuf};

/// The pod cgroup's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostUsage {
    pub cpu_usage_ns: u64,
    pub memory_usage: u64,
    /// Usage without the inactive page cache (kubelet's working set).
    pub working_set: u64,
    /// Anonymous memory (the guest RAM the VM touched is the bulk of it).
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
}

/// The directory of `parent` under a hierarchy's mount: a cgroupfs path,
/// or a systemd slice (`a-b.slice` lives in `a.slice/a-b.slice`). `None`
/// for what is no path under the root (`..`).
pub fn relative_dir(parent: &str) -> Option<PathBuf> {
    let parent = parent.trim_matches('/');
    let mut out = PathBuf::new();
    if let Some(name) = parent.strip_suffix(".slice").filter(|p| !p.contains('/')) {
        let mut prefix = String::new();
        for part in name.split('-') {
            if !prefix.is_empty() {
                prefix.push('-');
            }
            prefix.push_str(part);
            if part.is_empty() {
                return None;
            }
            out.push(format!("{prefix}.slice"));
        }
        return Some(out);
    }
    for part in parent.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return None;
        }
        out.push(part);
    }
    Some(out)
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// `key value` lines (`memory.stat`, `cpu.stat`).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Reads the figures of the cgroup `parent` under the hierarchies mounted
/// at `root` (`/sys/fs/cgroup`); `None` if it has none there.
pub fn read_usage(root: &Path, parent: &str) -> Option<HostUsage> {
    if parent.is_empty() {
        return None;
    }
    let rel = relative_dir(parent)?;
    if root.join("cgroup.controllers").exists() {
        let dir = root.join(&rel);
        let cpu = read(&dir.join("cpu.stat"))?;
        let stat = read(&dir.join("memory.stat"))?;
        let usage: u64 = read(&dir.join("memory.current"))?.trim().parse().ok()?;
        let inactive = field(&stat, "inactive_file").unwrap_or(0);
        return Some(HostUsage {
            cpu_usage_ns: field(&cpu, "usage_usec")?.saturating_mul(1000),
            memory_usage: usage,
            working_set: usage.saturating_sub(inactive),
            rss: field(&stat, "anon").unwrap_or(0),
            page_faults: field(&stat, "pgfault").unwrap_or(0),
            major_page_faults: field(&stat, "pgmajfault").unwrap_or(0),
        });
    }
    // cgroup v1: cpuacct may be mounted alone or with cpu.
    let cpu_dir = ["cpuacct", "cpu,cpuacct", "cpuacct,cpu"]
        .iter()
        .map(|h| root.join(h).join(&rel))
        .find(|d| d.join("cpuacct.usage").exists())?;
    let mem = root.join("memory").join(&rel);
    let stat = read(&mem.join("memory.stat"))?;
    let usage: u64 = read(&mem.join("memory.usage_in_bytes"))?
        .trim()
        .parse()
        .ok()?;
    let inactive = field(&stat, "total_inactive_file").unwrap_or(0);
    Some(HostUsage {
        cpu_usage_ns: read(&cpu_dir.join("cpuacct.usage"))?.trim().parse().ok()?,
        memory_usage: usage,
        working_set: usage.saturating_sub(inactive),
        rss: field(&stat, "total_rss").unwrap_or(0),
        page_faults: field(&stat, "total_pgfault").unwrap_or(0),
        major_page_faults: field(&stat, "total_pgmajfault").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_become_directories() {
        assert_eq!(
            relative_dir("/kubepods/podu1"),
            Some(PathBuf::from("kubepods/podu1"))
        );
        assert_eq!(
            relative_dir("kubepods-burstable-podu1.slice"),
            Some(PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podu1.slice"
            ))
        );
        assert_eq!(relative_dir("/kubepods/../etc"), None);
        assert_eq!(relative_dir("a--b.slice"), None);
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn cgroup_v2_figures() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "cgroup.controllers", "cpu memory\n");
        let pod = root.path().join("kubepods/pod1");
        write(&pod, "cpu.stat", "usage_usec 1500\nuser_usec 1000\n");
        write(&pod, "memory.current", "10000\n");
        write(
            &pod,
            "memory.stat",
            "anon 6000\nfile 4000\ninactive_file 3000\npgfault 7\npgmajfault 1\n",
        );
        assert_eq!(
            read_usage(root.path(), "/kubepods/pod1"),
            Some(HostUsage {
                cpu_usage_ns: 1_500_000,
                memory_usage: 10000,
                working_set: 7000,
                rss: 6000,
                page_faults: 7,
                major_page_faults: 1,
            })
        );
        assert_eq!(read_usage(root.path(), "/kubepods/nothing"), None);
        assert_eq!(read_usage(root.path(), ""), None);
    }

    #[test]
    fn cgroup_v1_figures() {
        let root = tempfile::tempdir().unwrap();
        write(
            &root.path().join("cpu,cpuacct/kubepods/pod1"),
            "cpuacct.usage",
            "42\n",
        );
        let mem = root.path().join("memory/kubepods/pod1");
        write(&mem, "memory.usage_in_bytes", "9000\n");
        write(
            &mem,
            "memory.stat",
            "rss 1\ntotal_rss 5000\ntotal_inactive_file 1000\ntotal_pgfault 3\ntotal_pgmajfault 0\n",
        );
        let u = read_usage(root.path(), "/kubepods/pod1").unwrap();
        assert_eq!(
            (u.cpu_usage_ns, u.memory_usage, u.working_set, u.rss),
            (42, 9000, 8000, 5000)
        );
    }
}
