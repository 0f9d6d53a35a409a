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

/// A side-by-side table of summaries: a label column, median, min and max
/// per runtime and, with two runtimes, the second's median over the first's.
pub struct Table<'a> {
    pub handlers: &'a [String],
    pub label_width: usize,
}

impl Table<'_> {
    /// The two header lines, `title` in the label column.
    pub fn header(&self, title: &str) -> String {
        let w = self.label_width;
        let mut top = format!("{title:<w$}");
        let mut sub = format!("{:<w$}", "");
        for handler in self.handlers {
            top.push_str(&format!(" | {handler:^29}"));
            sub.push_str(&format!(" | {:>9} {:>9} {:>9}", "median", "min", "max"));
        }
        if let [first, second] = self.handlers {
            top.push_str(&format!(" | {:>10}", format!("{second}/{first}")));
            sub.push_str(&format!(" | {:>10}", "(median)"));
        }
        format!("{top}\n{sub}")
    }

    /// One row: a summary per runtime (`None`: no samples). The ratio is
    /// left out when the first runtime's median is below `ratio_floor`
    /// (under a measurement's resolution a ratio means nothing).
    pub fn row(&self, label: &str, stats: &[Option<Summary>], ratio_floor: f64) -> String {
        let w = self.label_width;
        let mut line = format!("{label:<w$}");
        for s in stats {
            line.push_str(&format!(" | {}", cell(*s)));
        }
        if let [a, b] = stats {
            let ratio = match (a, b) {
                (Some(a), Some(b)) if a.median >= ratio_floor && a.median > 0.0 => {
                    format!("{}x", significant(b.median / a.median))
                }
                _ => "-".to_string(),
            };
            line.push_str(&format!(" | {ratio:>10}"));
        }
        line
    }
}

fn cell(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!(
            "{:>9} {:>9} {:>9}",
            significant(s.median),
            significant(s.min),
            significant(s.max)
        ),
        None => format!("{:>9} {:>9} {:>9}", "-", "-", "-"),
    }
}

/// `v` with one decimal from 10 up, else with three significant digits.
fn significant(v: f64) -> String {
    if v.abs() >= 10.0 || v == 0.0 || !v.is_finite() {
        return format!("{v:.1}");
    }
    let decimals = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
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
    fn figures_keep_three_significant_digits_below_ten() {
        assert_eq!(significant(2590.54), "2590.5");
        assert_eq!(significant(1.4821), "1.48");
        assert_eq!(significant(0.25), "0.250");
        assert_eq!(significant(0.000_577), "0.000577");
        assert_eq!(significant(0.0), "0.0");
    }

    #[test]
    fn table_rows_line_up_with_the_header_and_guard_the_ratio() {
        let handlers = ["runc".to_string(), "arrow".to_string()];
        let table = Table {
            handlers: &handlers,
            label_width: 12,
        };
        let header = table.header("ms");
        let row = table.row("start", &[Summary::of(&[4.0]), Summary::of(&[8.0])], 2.0);
        assert_eq!(
            header.lines().next().unwrap().len(),
            row.len(),
            "{header}\n{row}"
        );
        assert!(row.ends_with("2.00x"), "{row}");
        let below = table.row("start", &[Summary::of(&[1.0]), Summary::of(&[8.0])], 2.0);
        assert!(below.ends_with(" -"), "{below}");
        let missing = table.row("start", &[None, Summary::of(&[8.0])], 0.0);
        assert!(
            missing.contains("        -         -         -"),
            "{missing}"
        );
    }

    #[test]
    fn shell_words_quotes_only_what_needs_it() {
        assert_eq!(
            shell_words(&["sh", "-c", "echo it's; x", ""]),
            r"sh -c 'echo it'\''s; x' ''"
        );
    }
}
