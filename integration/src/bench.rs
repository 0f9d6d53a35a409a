//! What Arrow's benchmarks share: summaries of samples and a description of
//! the machine the figures come from (the KVM flavour above all: on
//! `kvm_pvm` the guest kernel is emulated and every figure says so).

use std::path::Path;

/// Median, min and max of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// Which KVM serves `/dev/kvm`, in words.
pub fn kvm_flavour() -> String {
    let has = |m: &str| Path::new("/sys/module").join(m).exists();
    if has("kvm_pvm") {
        "kvm_pvm (software nested KVM: guest kernel code is emulated)".to_string()
    } else if has("kvm_intel") {
        "kvm_intel (hardware KVM)".to_string()
    } else if has("kvm_amd") {
        "kvm_amd (hardware KVM)".to_string()
    } else if Path::new("/dev/kvm").exists() {
        "unknown (/dev/kvm present, no kvm_pvm/kvm_intel/kvm_amd module)".to_string()
    } else {
        "none (/dev/kvm missing)".to_string()
    }
}

/// The host's CPUs.
pub fn cpu_count() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| t.lines().filter(|l| l.starts_with("processor")).count())
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(0, |n| n.get()))
}

/// The host kernel's release.
pub fn host_kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A command line as a shell would take it back.
pub fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
            {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_the_middle_of_sorted_samples() {
        assert_eq!(Summary::of(&[]), None);
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
    }

    #[test]
    fn shell_words_quotes_only_what_needs_it() {
        assert_eq!(
            shell_words(&["sh", "-c", "echo it's; x", ""]),
            r"sh -c 'echo it'\''s; x' ''"
        );
    }
}
