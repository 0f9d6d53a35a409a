//! Arrow's VMM and boot benchmarks. Prints median, min and max over N runs,
//! names the KVM flavour, and sets the figures beside the reference measured
//! on the same kind of host (HOST-KVM.md).
//!
//! `arrow-bench vmm [N]`: bare-metal test guest, process start to first
//! guest output, VMM peak RSS and PSS.
//! `arrow-bench linux [N]`: the Linux guest, process start to arrow-init
//! ready and to the program's first output, VMM RSS and PSS while the guest
//! idles.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use integration::{arrow_vmm, busybox_rootfs, hardware_kvm, kernel};

struct Stats(Vec<f64>);

impl Stats {
    fn show(&mut self, what: &str, unit: &str, reference: Option<&str>) {
        self.0.sort_by(|a, b| a.total_cmp(b));
        let v = &self.0;
        if v.is_empty() {
            println!("{what:<44} no samples");
            return;
        }
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
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

fn bench_vmm(runs: usize) -> anyhow::Result<()> {
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
    Ok(())
}

fn bench_linux(runs: usize) -> anyhow::Result<()> {
    let (mut ready, mut output, mut total) = (Stats(vec![]), Stats(vec![]), Stats(vec![]));
    let (mut rss, mut pss) = (Stats(vec![]), Stats(vec![]));
    for _ in 0..runs {
        let start = Instant::now();
        let mut child = Command::new(arrow_vmm())
            .args(["run", "--timings", "--memory", "128M", "--kernel"])
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
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs =
        |default: usize| -> usize { args.get(2).and_then(|n| n.parse().ok()).unwrap_or(default) };
    match args.get(1).map(String::as_str) {
        Some("vmm") => bench_vmm(runs(30)),
        Some("linux") => bench_linux(runs(3)),
        _ => {
            eprintln!("usage: arrow-bench vmm [RUNS] | linux [RUNS]");
            if !Path::new("/dev/kvm").exists() {
                eprintln!("(and /dev/kvm is missing)");
            }
            std::process::exit(2);
        }
    }
}
