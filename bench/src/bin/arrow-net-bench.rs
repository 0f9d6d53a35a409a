//! Pod ↔ host networking, Arrow against runc, in the same run against the
//! same containerd and CNI network (hack/bench-net.sh). A benchmark: it
//! prints figures and asserts nothing.
//!
//! Each runtime in turn gets one pod: a busybox container running busybox
//! `httpd` and `arrow-net-server` (static, bind-mounted from the host). From
//! the host, over the pod IP:
//! - TCP round trip: 1 byte there and back on one connection;
//! - TCP connect + 1-byte echo + close, a new connection each time;
//! - HTTP GET of a small page from busybox httpd (a new connection, and a
//!   fork in the pod, per request);
//! - throughput host → pod and pod → host: N transfers of `--mib` MiB each;
//! - and through `PortForward` (what `kubectl port-forward` uses; containerd
//!   dials 127.0.0.1 in the pod's netns, which for Arrow the shim carries
//!   into the guest over vsock): the time to the first byte of a fresh
//!   forward (the CRI call, the WebSocket upgrade, the dial, one byte
//!   back), and pod → host throughput;
//! - and `Exec` (what `kubectl exec` uses): the round trip of an exec of
//!   `true` over SPDY/3.1 with the `v4.channel.k8s.io` protocol, from the
//!   CRI call to the exit status.
//!
//! Median, min and max side by side, and arrow over runc.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bench::{cpu_count, host_kernel, kvm_flavour, Summary, Table};
use clap::Parser;
use integration::containerd::{ADDRESS, BUSYBOX_IMAGE};
use integration::cri::{container_config, pod_config, unique_name, CriClient, Pod};
use integration::portforward::forward_until;
use integration::streaming::{self, Script};
use k8s_cri::v1 as cri;

/// The label on every pod this benchmark makes.
const LABEL: &str = "arrow-net-bench";
const BENCH_PORT: u16 = 5201;
const HTTP_PORT: u16 = 8080;
/// Where the server binary is shared into the container.
const BENCH_DIR: &str = "/bench";

#[derive(Parser)]
#[command(
    name = "arrow-net-bench",
    about = "Pod <-> host TCP latency and throughput over the pod IP: arrow vs runc"
)]
struct Args {
    /// Transfers per direction per runtime.
    #[arg(default_value_t = 3)]
    runs: usize,
    /// MiB per transfer.
    #[arg(long, default_value_t = 16)]
    mib: u64,
    /// TCP round trips per runtime.
    #[arg(long, default_value_t = 200)]
    pings: usize,
    /// New connections (connect + echo + close) per runtime.
    #[arg(long, default_value_t = 30)]
    connects: usize,
    /// HTTP GETs per runtime.
    #[arg(long, default_value_t = 20)]
    gets: usize,
    /// Fresh port-forwards (time to first byte) per runtime.
    #[arg(long, default_value_t = 10)]
    forwards: usize,
    /// Execs of `true` (round trip) per runtime.
    #[arg(long, default_value_t = 10)]
    execs: usize,
    /// The static arrow-net-server to run in the pods.
    #[arg(long)]
    server: PathBuf,
    /// The CRI socket (default: the private test containerd of hack/containerd.sh).
    #[arg(long, default_value = ADDRESS)]
    address: String,
    /// The runtime handlers to compare; the ratio is the second over the first.
    #[arg(long, value_delimiter = ',', default_value = "runc,arrow")]
    handlers: Vec<String>,
    /// Seconds a pod may take to start and answer.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// What one runtime measured.
#[derive(Default)]
struct Figures {
    ip: String,
    rtt_us: Vec<f64>,
    connect_ms: Vec<f64>,
    http_ms: Vec<f64>,
    upload_mbs: Vec<f64>,
    download_mbs: Vec<f64>,
    forward_first_byte_ms: Vec<f64>,
    forward_download_mbs: Vec<f64>,
    exec_ms: Vec<f64>,
}

/// Socket timeouts: a guest that stops answering fails the run, not hangs it.
const IO_TIMEOUT: Duration = Duration::from_secs(300);

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// One new connection: echo one byte, close. The time it took.
fn connect_echo(addr: SocketAddr) -> Result<Duration> {
    let t0 = Instant::now();
    let mut conn = connect(addr)?;
    conn.write_all(b"ex")?;
    let mut back = [0u8; 1];
    conn.read_exact(&mut back)?;
    ensure!(back == *b"x", "echo answered {back:?}");
    drop(conn);
    Ok(t0.elapsed())
}

/// Waits until the pod's server echoes.
fn wait_answering(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match connect_echo(addr) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).context(format!("no answer from {addr} after {timeout:?}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn round_trips(addr: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let mut conn = connect(addr)?;
    conn.write_all(b"e")?;
    let mut byte = [0u8; 1];
    let mut out = Vec::with_capacity(n);
    // Ten unmeasured round trips first: the first ones fault pages in.
    for i in 0..n + 10 {
        let t0 = Instant::now();
        conn.write_all(b"p")?;
        conn.read_exact(&mut byte)?;
        if i >= 10 {
            out.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

fn http_get(addr: SocketAddr) -> Result<Duration> {
    let t0 = Instant::now();
    let mut conn = connect(addr)?;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let elapsed = t0.elapsed();
    ensure!(
        text.starts_with("HTTP/1.") && text.contains(" 200 "),
        "HTTP answer: {:?}",
        text.lines().next().unwrap_or("")
    );
    Ok(elapsed)
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Host → pod: `bytes` written, timed until the pod acknowledges them all.
fn upload(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let buf = vec![0xa5u8; 256 * 1024];
    let t0 = Instant::now();
    let mut conn = connect(addr)?;
    conn.write_all(b"s")?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        conn.write_all(&buf[..n])?;
        left -= n as u64;
    }
    conn.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)?;
    let elapsed = t0.elapsed();
    let got = u64::from_be_bytes(count);
    ensure!(got == bytes, "the pod received {got} of {bytes} bytes");
    Ok(mb_per_s(bytes, elapsed))
}

/// Pod → host: `bytes` asked for, timed until the last one arrives.
fn download(addr: SocketAddr, bytes: u64) -> Result<f64> {
    let mut buf = vec![0u8; 256 * 1024];
    let t0 = Instant::now();
    let mut conn = connect(addr)?;
    let mut request = vec![b'g'];
    request.extend_from_slice(&bytes.to_be_bytes());
    conn.write_all(&request)?;
    let mut got = 0u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = t0.elapsed();
    ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok(mb_per_s(bytes, elapsed))
}

/// Runs the benchmark pod, measures, removes it (also on failure).
async fn measure(cri: &CriClient, handler: &str, args: &Args, bin_dir: &Path) -> Result<Figures> {
    let mut config = pod_config(&unique_name(&format!("netbench-{handler}")));
    config.labels.clear();
    config.labels.insert(LABEL.to_string(), "true".to_string());
    let pod = cri.run_pod_sandbox_with(config, handler).await?;
    let result = measure_pod(cri, &pod, args, bin_dir).await;
    if let Err(e) = cri.remove_pod(&pod).await {
        eprintln!("  (could not remove pod {}: {e:#})", pod.id);
    }
    result
}

async fn measure_pod(cri: &CriClient, pod: &Pod, args: &Args, bin_dir: &Path) -> Result<Figures> {
    let script = format!(
        "sysctl -w net.ipv4.tcp_tso_rtt_log=20 2>/dev/null; cat /proc/sys/net/ipv4/tcp_congestion_control; mkdir -p /tmp/www && echo arrow-net-bench > /tmp/www/index.html && \
         httpd -p {HTTP_PORT} -h /tmp/www && exec {BENCH_DIR}/arrow-net-server {BENCH_PORT}"
    );
    let mut config = container_config(
        "server",
        BUSYBOX_IMAGE,
        &["sh", "-c", &script],
        "server/0.log",
    );
    config.labels.clear();
    config.mounts.push(cri::Mount {
        container_path: BENCH_DIR.into(),
        host_path: bin_dir.display().to_string(),
        readonly: true,
        ..Default::default()
    });
    let container = cri.create_container_with(pod, config).await?;
    cri.start_container(&container).await?;
    let status = cri.pod_sandbox_status(&pod.id).await?;
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    if ip.is_empty() {
        bail!("the pod has no IP (is the CNI configuration in place?)");
    }
    let bench: SocketAddr = format!("{ip}:{BENCH_PORT}").parse()?;
    let http: SocketAddr = format!("{ip}:{HTTP_PORT}").parse()?;
    let t0 = Instant::now();
    wait_answering(bench, Duration::from_secs(args.timeout))?;
    eprintln!(
        "  answering at {ip} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let mut f = Figures {
        ip,
        ..Default::default()
    };
    f.rtt_us = round_trips(bench, args.pings).context("round trips")?;
    for _ in 0..args.connects {
        f.connect_ms
            .push(connect_echo(bench).context("connect + echo")?.as_secs_f64() * 1e3);
    }
    http_get(http).context("HTTP GET (warm-up)")?;
    for _ in 0..args.gets {
        f.http_ms
            .push(http_get(http).context("HTTP GET")?.as_secs_f64() * 1e3);
    }
    let bytes = args.mib << 20;
    for i in 0..args.runs {
        let up = upload(bench, bytes).context("host -> pod")?;
        let down = download(bench, bytes).context("pod -> host")?;
        eprintln!(
            "  transfer {}/{}: host -> pod {up:.1} MB/s, pod -> host {down:.1} MB/s",
            i + 1,
            args.runs
        );
        f.upload_mbs.push(up);
        f.download_mbs.push(down);
    }
    for _ in 0..args.forwards {
        let first = forwarded_download(cri, &pod.id, 1).await?;
        f.forward_first_byte_ms.push(first.as_secs_f64() * 1e3);
    }
    for i in 0..args.runs {
        let last = forwarded_download(cri, &pod.id, bytes).await?;
        let mbs = mb_per_s(bytes, last);
        eprintln!(
            "  port-forward {}/{}: pod -> host {mbs:.1} MB/s",
            i + 1,
            args.runs
        );
        f.forward_download_mbs.push(mbs);
    }
    for _ in 0..args.execs {
        let t0 = Instant::now();
        let url = cri
            .exec(&container, &["true"], false, false, true, false)
            .await?;
        let script = Script {
            stdout: true,
            ..Default::default()
        };
        let run = streaming::spdy_remote_command(&url, "v4.channel.k8s.io", &script).await?;
        ensure!(run.exit_code()? == 0, "exec of true: {:?}", run);
        f.exec_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(f)
}

/// `bytes` from the pod's server through a fresh port-forward: the time
/// from the `PortForward` call to the last byte.
async fn forwarded_download(cri: &CriClient, pod_id: &str, bytes: u64) -> Result<Duration> {
    let t0 = Instant::now();
    let url = cri.port_forward(pod_id, &[BENCH_PORT]).await?;
    let mut request = vec![b'g'];
    request.extend_from_slice(&bytes.to_be_bytes());
    let want = usize::try_from(bytes)?;
    let (forwarded, last) = tokio::task::spawn_blocking(move || {
        let f = forward_until(&url, BENCH_PORT, &request, want, IO_TIMEOUT);
        (f, t0.elapsed())
    })
    .await?;
    let forwarded = forwarded.context("port-forward")?;
    ensure!(
        forwarded.data.len() == want,
        "port-forward: received {} of {bytes} bytes; error channel: {:?}",
        forwarded.data.len(),
        forwarded.error
    );
    Ok(last)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.handlers.is_empty() {
        bail!("--handlers: none given");
    }
    // The server is shared into the pods from a directory of its own.
    let bin_dir = PathBuf::from("/run/arrow-net-bench");
    std::fs::create_dir_all(&bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    std::fs::copy(&args.server, bin_dir.join("arrow-net-server"))
        .with_context(|| format!("copying {}", args.server.display()))?;

    let cri = CriClient::connect(&args.address).await?;
    cri.wait_ready(Duration::from_secs(30))
        .await
        .context("is containerd running? (hack/containerd.sh start)")?;
    let version = cri.version().await?;
    for pod in cri.list_pod_sandboxes().await? {
        if pod.labels.get(LABEL).map(String::as_str) == Some("true") {
            let _ = cri.stop_pod_sandbox(&pod.id).await;
            let _ = cri.remove_pod_sandbox(&pod.id).await;
            eprintln!("removed pod {} an earlier run left", pod.id);
        }
    }

    let mut results = Vec::new();
    for handler in &args.handlers {
        eprintln!("{handler}: starting the pod");
        let r = measure(&cri, handler, &args, &bin_dir).await;
        if let Err(e) = &r {
            eprintln!("  {handler}: FAILED: {e:#}");
        }
        results.push(r);
    }
    let _ = std::fs::remove_dir_all(&bin_dir);

    println!(
        "== Arrow network benchmark: {}, pod <-> host over the pod IP ==",
        args.handlers.join(" vs ")
    );
    println!("KVM: {}", kvm_flavour());
    println!("CPUs: {}   host kernel: {}", cpu_count(), host_kernel());
    println!(
        "CRI: {} {} at {}",
        version.runtime_name, version.runtime_version, args.address
    );
    for (handler, r) in args.handlers.iter().zip(&results) {
        match r {
            Ok(f) => println!("  {handler:<6} pod IP {}", f.ip),
            Err(e) => println!("  {handler:<6} FAILED: {e:#}"),
        }
    }
    println!();
    let table = Table {
        handlers: &args.handlers,
        label_width: 40,
    };
    println!("{}", table.header(""));
    type Field = fn(&Figures) -> &Vec<f64>;
    let rows: [(String, Field); 8] = [
        (
            format!("TCP round trip, 1 byte, us (N={})", args.pings),
            |f| &f.rtt_us,
        ),
        (
            format!("TCP connect+echo+close, ms (N={})", args.connects),
            |f| &f.connect_ms,
        ),
        (
            format!("HTTP GET, busybox httpd, ms (N={})", args.gets),
            |f| &f.http_ms,
        ),
        (
            format!("host -> pod, MB/s ({} x {} MiB)", args.runs, args.mib),
            |f| &f.upload_mbs,
        ),
        (
            format!("pod -> host, MB/s ({} x {} MiB)", args.runs, args.mib),
            |f| &f.download_mbs,
        ),
        (
            format!("port-forward, first byte, ms (N={})", args.forwards),
            |f| &f.forward_first_byte_ms,
        ),
        (
            format!(
                "port-forward pod -> host, MB/s ({} x {} MiB)",
                args.runs, args.mib
            ),
            |f| &f.forward_download_mbs,
        ),
        (
            format!("exec of true over SPDY, round trip, ms (N={})", args.execs),
            |f| &f.exec_ms,
        ),
    ];
    for (label, field) in rows {
        let stats: Vec<Option<Summary>> = results
            .iter()
            .map(|r| r.as_ref().ok().and_then(|f| Summary::of(field(f))))
            .collect();
        println!("{}", table.row(&label, &stats, 0.0));
    }
    if results.iter().any(Result::is_err) {
        bail!("a runtime failed (above)");
    }
    Ok(())
}
