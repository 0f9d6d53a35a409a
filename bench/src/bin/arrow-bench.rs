//! Arrow's VMM and boot benchmarks. Prints median, min and max over N runs,
//! names the KVM flavour, and sets the figures beside the reference measured
//! on the same kind of host (HOST-KVM.md).
//!
//! `arrow-bench vmm [N]`: bare-metal test guest, process start to first
//! guest output, VMM peak RSS and PSS.
//! `arrow-bench linux [N]`: the Linux guest booted afresh, process start to
//! arrow-init ready and to the program's first output, VMM RSS and PSS while
//! the guest idles.
//! `arrow-bench clones [N] [AT_ONCE]`: template creation, then N clones one
//! after another (restore and arrow-init ready), then AT_ONCE idle clones at
//! the same time with the memory each one holds: PSS, private pages, and the
//! pages still shared with the template.
//! `arrow-bench jail [N]`: `arrow-vmm serve` as the shim runs it, cloning
//! the template, jailed and with `--no-confine` in turn: process start to
//! the ready line, and the jail's own set-up (`--timings` phase "jailed").
//! `arrow-bench headlines [VMM_RUNS] [LINUX_RUNS] [CLONE_RUNS] [AT_ONCE]`:
//! `vmm`, `linux` and `clones` in turn, then their headline figures as
//! tab-separated `headline` lines, which `hack/bench.sh flavours` sets side
//! by side for kvm_pvm and hardware KVM.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use integration::{arrow_vmm, busybox_rootfs, hardware_kvm, kernel};

struct Stats(Vec<f64>);

impl Stats {
    /// The median, or None without samples.
    fn median(&self) -> Option<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    fn show(&mut self, what: &str, unit: &str, reference: Option<&str>) {
        self.0.sort_by(|a, b| a.total_cmp(b));
        let Some(median) = self.median() else {
            println!("{what:<44} no samples");
            return;
        };
        let v = &self.0;
        println!(
            "{what:<44} median {median:>9.2} {unit:<3} min {:>9.2}  max {:>9.2}  (n={}){}",
            v[0],
            v[v.len() - 1],
            v.len(),
            reference
                .map(|r| format!("   reference: {r}"))
                .unwrap_or_default()
        );
    }
}

/// One figure of the side-by-side table: what, median, unit.
struct Headline(&'static str, Option<f64>, &'static str);

impl Headline {
    /// The line `hack/bench.sh flavours` reads: `headline<TAB>what<TAB>value<TAB>unit`.
    fn line(&self) -> String {
        let value = self
            .1
            .map(|v| format!("{v:.1}"))
            .unwrap_or_else(|| "-".into());
        format!("headline\t{}\t{value}\t{}", self.0, self.2)
    }
}

/// (RSS, PSS) in MiB from /proc/PID/smaps_rollup, and peak RSS (VmHWM).
fn memory_of(pid: u32) -> anyhow::Result<(f64, f64, f64)> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |text: &str, key: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    Ok((
        field(&rollup, "Rss:"),
        field(&rollup, "Pss:"),
        field(&status, "VmHWM:"),
    ))
}

fn flavour() -> &'static str {
    if hardware_kvm() {
        "hardware KVM"
    } else {
        "kvm_pvm (software nested KVM: guest kernel code emulated)"
    }
}

fn bench_vmm(runs: usize) -> anyhow::Result<Vec<Headline>> {
    let dir = std::env::temp_dir().join(format!("arrow-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (guest, spinner) = (dir.join("guest.elf"), dir.join("spin.elf"));
    for (path, spin) in [(&guest, false), (&spinner, true)] {
        let mut cmd = Command::new(arrow_vmm());
        cmd.args(["test-guest", "--out"]).arg(path);
        if spin {
            cmd.arg("--spin");
        }
        if !cmd.status()?.success() {
            bail!("arrow-vmm test-guest failed");
        }
    }

    let mut first_output = Stats(Vec::new());
    let mut total = Stats(Vec::new());
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(arrow_vmm())
            .args(["boot", "--memory", "16M", "--kernel"])
            .arg(&guest)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = child.stdout.take().context("stdout")?;
        let mut byte = [0u8; 1];
        out.read_exact(&mut byte)?;
        first_output.0.push(start.elapsed().as_secs_f64() * 1000.0);
        let mut rest = Vec::new();
        out.read_to_end(&mut rest)?;
        if !child.wait()?.success() {
            bail!("arrow-vmm boot failed");
        }
        total.0.push(start.elapsed().as_secs_f64() * 1000.0);
    }

    let (mut rss, mut pss, mut peak) = (Stats(vec![]), Stats(vec![]), Stats(vec![]));
    for _ in 0..runs.min(10) {
        let mut child = Command::new(arrow_vmm())
            .args(["boot", "--memory", "16M", "--kernel"])
            .arg(&spinner)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        std::thread::sleep(Duration::from_millis(50));
        let (r, p, h) = memory_of(child.id())?;
        child.kill()?;
        child.wait()?;
        rss.0.push(r);
        pss.0.push(p);
        peak.0.push(h);
    }
    std::fs::remove_dir_all(&dir)?;

    println!("bare-metal test guest on {}, 1 vCPU, 16 MiB", flavour());
    first_output.show(
        "process start -> first guest output",
        "ms",
        Some("Firecracker 8.6 ms, Cloud Hypervisor 7.0 ms"),
    );
    total.show("process start -> VM reset -> process exit", "ms", None);
    peak.show(
        "VMM peak RSS (VmHWM)",
        "MiB",
        Some("Firecracker 2.4 MiB, CH 8.8 MiB"),
    );
    rss.show("VMM RSS while the guest runs", "MiB", None);
    pss.show("VMM PSS while the guest runs", "MiB", None);
    Ok(vec![
        Headline(
            "VMM start -> first guest output (bare-metal guest)",
            first_output.median(),
            "ms",
        ),
        Headline("VMM peak RSS (bare-metal guest)", peak.median(), "MiB"),
    ])
}

fn bench_linux(runs: usize) -> anyhow::Result<Vec<Headline>> {
    let (mut ready, mut output, mut total) = (Stats(vec![]), Stats(vec![]), Stats(vec![]));
    let (mut rss, mut pss) = (Stats(vec![]), Stats(vec![]));
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(arrow_vmm())
            .args([
                "run",
                "--timings",
                "--no-template",
                "--memory",
                "128M",
                "--kernel",
            ])
            .arg(kernel())
            .arg("--rootfs")
            .arg(busybox_rootfs())
            .args(["--", "/bin/sh", "-c", "echo started; sleep 3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "started" {
            bail!("unexpected first output {line:?}");
        }
        output.0.push(start.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(1000));
        let (r, p, _) = memory_of(child.id())?;
        rss.0.push(r);
        pss.0.push(p);
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .context("stderr")?
            .read_to_string(&mut stderr)?;
        if !child.wait()?.success() {
            bail!("arrow-vmm run failed: {stderr}");
        }
        total.0.push(start.elapsed().as_secs_f64() * 1000.0);
        let agent_ready = stderr
            .lines()
            .find_map(|l| l.strip_prefix("arrow-vmm: timing agent-ready "))
            .and_then(|l| l.trim_end_matches(" ms").parse::<f64>().ok())
            .context("no agent-ready timing")?;
        ready.0.push(agent_ready);
    }
    println!(
        "Linux guest ({}) on {}, 1 vCPU, 128 MiB, busybox initramfs",
        kernel().display(),
        flavour()
    );
    ready.show(
        "process start -> arrow-init ready",
        "ms",
        Some("Firecracker to init's first line: 9750 ms (minimal), 14400 ms (container config)"),
    );
    output.show("process start -> program's first output", "ms", None);
    total.show(
        "process start -> exit (incl. sleep 3 + poweroff)",
        "ms",
        None,
    );
    rss.show("VMM RSS while the guest idles", "MiB", None);
    pss.show("VMM PSS while the guest idles", "MiB", None);
    Ok(vec![Headline(
        "Linux boot: VMM start -> arrow-init ready",
        ready.median(),
        "ms",
    )])
}

/// Sums the fields of the mappings in /proc/PID/smaps whose path ends with
/// `suffix`, in MiB: (Rss, Pss, Shared_Clean, Private_Dirty + Private_Clean).
fn mapping_memory(pid: u32, suffix: &str) -> anyhow::Result<(f64, f64, f64, f64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut rss, mut pss, mut shared, mut private) = (0.0, 0.0, 0.0, 0.0);
    let mut inside = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            inside = line.trim_end().ends_with(suffix);
            continue;
        }
        if !inside {
            continue;
        }
        let kb: f64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
        let mib = kb / 1024.0;
        match first {
            "Rss:" => rss += mib,
            "Pss:" => pss += mib,
            "Shared_Clean:" | "Shared_Dirty:" => shared += mib,
            "Private_Clean:" | "Private_Dirty:" => private += mib,
            _ => {}
        }
    }
    Ok((rss, pss, shared, private))
}

fn timing(stderr: &str, phase: &str) -> Option<f64> {
    let prefix = format!("arrow-vmm: timing {phase} ");
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|l| l.trim_end_matches(" ms").parse::<f64>().ok())
}

fn vm_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(arrow_vmm());
    cmd.args(args)
        .args(["--memory", "128M", "--kernel"])
        .arg(kernel())
        .arg("--rootfs")
        .arg(busybox_rootfs());
    cmd
}

fn bench_clones(runs: usize, at_once: usize) -> anyhow::Result<Vec<Headline>> {
    let start = Instant::now();
    let out = vm_command(&["template", "create", "--timings"]).output()?;
    if !out.status.success() {
        bail!(
            "template create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let creation = start.elapsed().as_secs_f64() * 1000.0;
    let template = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let (mut restored, mut ready, mut total) = (Stats(vec![]), Stats(vec![]), Stats(vec![]));
    for _ in 0..runs {
        let start = Instant::now();
        let out = vm_command(&["run", "--timings"])
            .args(["--", "/bin/true"])
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("clone failed: {stderr}");
        }
        total.0.push(start.elapsed().as_secs_f64() * 1000.0);
        restored
            .0
            .push(timing(&stderr, "clone-restored").context("not a clone")?);
        ready
            .0
            .push(timing(&stderr, "agent-ready").context("no agent-ready")?);
    }

    let logs = std::env::temp_dir().join(format!("arrow-bench-clones-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let mut children = Vec::new();
    for i in 0..at_once {
        let mut child = vm_command(&["run"])
            .args(["--", "/bin/sh", "-c", "echo up; exec sleep 600"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(logs.join(format!("{i}.err")))?)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        children.push((child, BufReader::new(stdout)));
    }
    let all_up = Instant::now();
    let mut failed = None;
    for (i, (_, out)) in children.iter_mut().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "up" {
            let err = std::fs::read_to_string(logs.join(format!("{i}.err"))).unwrap_or_default();
            failed = Some(format!("clone {i} did not come up: {err}"));
            break;
        }
    }
    if let Some(why) = failed {
        for (child, _) in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!(why);
    }
    std::fs::remove_dir_all(&logs)?;
    let all_up = all_up.elapsed().as_secs_f64() * 1000.0;
    std::thread::sleep(Duration::from_secs(3));
    let (mut pss, mut private, mut guest_pss, mut guest_private, mut guest_shared) = (
        Stats(vec![]),
        Stats(vec![]),
        Stats(vec![]),
        Stats(vec![]),
        Stats(vec![]),
    );
    for (child, _) in &children {
        let (_, p, _) = memory_of(child.id())?;
        pss.0.push(p);
        let (_, gp, gs, gpriv) = mapping_memory(child.id(), &format!("{template}/memory"))?;
        guest_pss.0.push(gp);
        guest_shared.0.push(gs);
        guest_private.0.push(gpriv);
        let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", child.id()))?;
        let private_kb: f64 = rollup
            .lines()
            .filter(|l| l.starts_with("Private_"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum();
        private.0.push(private_kb / 1024.0);
    }
    for (child, _) in &mut children {
        // SIGTERM is forwarded to the program; the guest then powers off.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for (child, _) in &mut children {
        child.wait()?;
    }

    println!(
        "VM templates on {}, 1 vCPU, 128 MiB, busybox initramfs",
        flavour()
    );
    Stats(vec![creation]).show("template creation (boot + snapshot)", "ms", None);
    restored.show("clone: process start -> VM restored", "ms", None);
    ready.show(
        "clone: process start -> arrow-init ready",
        "ms",
        Some("fresh boot: see `arrow-bench linux`"),
    );
    total.show("clone: whole run of /bin/true", "ms", None);
    Stats(vec![all_up]).show(
        &format!("{at_once} clones at once: all printed"),
        "ms",
        None,
    );
    pss.show("per idle clone: process PSS", "MiB", None);
    private.show("per idle clone: process private", "MiB", None);
    guest_pss.show("per idle clone: guest RAM PSS", "MiB", None);
    guest_private.show("per idle clone: guest RAM private (written)", "MiB", None);
    guest_shared.show("per idle clone: guest RAM shared w/ template", "MiB", None);
    Ok(vec![
        Headline("template creation (boot + snapshot)", Some(creation), "ms"),
        Headline("clone: VMM start -> VM restored", restored.median(), "ms"),
        Headline("clone: VMM start -> arrow-init ready", ready.median(), "ms"),
        Headline("idle clone: process PSS", pss.median(), "MiB"),
        Headline(
            "idle clone: guest RAM private",
            guest_private.median(),
            "MiB",
        ),
    ])
}

/// One `arrow-vmm serve` clone (as the shim starts it) to its ready line:
/// (wall ms, ms at which the jail was set up, if jailed).
fn serve_once(dir: &Path, confine: bool) -> anyhow::Result<(f64, Option<f64>)> {
    let share = dir.join("share");
    std::fs::create_dir_all(&share)?;
    let mut cmd = Command::new(arrow_vmm());
    cmd.args([
        "serve",
        "--timings",
        "--memory",
        "128M",
        "--exit-on-stdin-eof",
        "--kernel",
    ])
    .arg(kernel())
    .arg("--vsock-uds")
    .arg(dir.join("vsock.sock"))
    .arg("--shared-dir")
    .arg(&share)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if !confine {
        cmd.arg("--no-confine");
    }
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let wall = start.elapsed().as_secs_f64() * 1000.0;
    drop(child.stdin.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut stderr)?;
    let status = child.wait()?;
    if !line.contains("\"cloned\":true") || !status.success() {
        bail!("serve did not clone and end cleanly: {line} {stderr}");
    }
    Ok((wall, timing(&stderr, "jailed")))
}

fn bench_jail(runs: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("arrow-bench-jail-{}", std::process::id()));
    // The first makes the template if there is none.
    let _ = serve_once(&dir, true);
    let (mut jailed, mut free, mut setup) = (Stats(vec![]), Stats(vec![]), Stats(vec![]));
    for _ in 0..runs {
        let (wall, jail) = serve_once(&dir, true)?;
        jailed.0.push(wall);
        setup.0.extend(jail);
        free.0.push(serve_once(&dir, false)?.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("arrow-vmm serve, clone to ready line ({})", flavour());
    jailed.show("  jailed (the default)", "ms", None);
    free.show("  --no-confine", "ms", None);
    setup.show("  of which: process start to jailed", "ms", None);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: usize| -> usize {
        args.get(i).and_then(|n| n.parse().ok()).unwrap_or(default)
    };
    match args.get(1).map(String::as_str) {
        Some("vmm") => bench_vmm(arg(2, 30)).map(drop),
        Some("linux") => bench_linux(arg(2, 3)).map(drop),
        Some("clones") => bench_clones(arg(2, 20), arg(3, 20)).map(drop),
        Some("jail") => bench_jail(arg(2, 20)),
        Some("headlines") => {
            let mut headlines = bench_vmm(arg(2, 30))?;
            println!();
            headlines.extend(bench_linux(arg(3, 3))?);
            println!();
            headlines.extend(bench_clones(arg(4, 20), arg(5, 20))?);
            println!();
            println!("flavour\t{}", flavour());
            for h in &headlines {
                println!("{}", h.line());
            }
            Ok(())
        }
        _ => {
            eprintln!("usage: arrow-bench vmm [RUNS] | linux [RUNS] | clones [RUNS] [AT_ONCE] | jail [RUNS]");
            eprintln!(
                "       arrow-bench headlines [VMM_RUNS] [LINUX_RUNS] [CLONE_RUNS] [AT_ONCE]"
            );
            if !Path::new("/dev/kvm").exists() {
                eprintln!("(and /dev/kvm is missing)");
            }
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_samples() {
        assert_eq!(Stats(vec![3.0, 1.0, 2.0]).median(), Some(2.0));
        assert_eq!(Stats(vec![4.0, 1.0, 2.0, 3.0]).median(), Some(2.5));
        assert_eq!(Stats(vec![]).median(), None);
    }

    #[test]
    fn headline_lines_are_tab_separated() {
        assert_eq!(
            Headline("boot", Some(12.345), "ms").line(),
            "headline\tboot\t12.3\tms"
        );
        assert_eq!(Headline("rss", None, "MiB").line(), "headline\trss\t-\tMiB");
    }
}
