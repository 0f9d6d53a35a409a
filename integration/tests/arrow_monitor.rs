//! `arrow monitor` end to end: with two `arrow` pods running under the test
//! containerd (through its CRI plugin), a scrape of `/metrics` has each
//! pod's series with plausible values, and its device counters grow with
//! the HTTP requests the test sends the pod and the file the pod writes;
//! once the pods are removed, their series are gone. Needs root and KVM;
//! skipped with a message otherwise.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::arrow_cli;
use integration::containerd::{skip_unless_root, Containerd, BUSYBOX_IMAGE, NAMESPACE};
use integration::cri::unique_name;

/// The shim's default guest size for a pod without limits
/// (`runtime/src/spec.rs` `DEFAULT_MEMORY`, `DEFAULT_VCPUS`).
const DEFAULT_MEMORY: f64 = (256u64 << 20) as f64;
const DEFAULT_VCPUS: f64 = 1.0;
const MIB: f64 = (1u64 << 20) as f64;

/// `arrow monitor` on a port of its choosing; killed on drop.
struct Monitor {
    child: Child,
    addr: String,
}

impl Monitor {
    fn start() -> Monitor {
        let mut child = Command::new(arrow_cli())
            .args(["monitor", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting arrow monitor");
        let stderr = child.stderr.take().expect("stderr piped");
        let mut lines = BufReader::new(stderr).lines();
        let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
        // "arrow monitor: serving http://ADDR/metrics for ..."
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("arrow monitor said {first:?}"))
            .to_string();
        // Keep draining its log (scrape errors) to the test's stderr.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
        Monitor { child, addr }
    }

    /// The status line and body of `GET path`.
    fn get(&self, path: &str) -> (String, String) {
        let mut conn = TcpStream::connect(&self.addr).expect("connecting to arrow monitor");
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(conn, "GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr).unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.lines().next().unwrap_or_default().to_string();
        (status, body.to_string())
    }

    fn scrape(&self) -> (String, BTreeMap<String, f64>) {
        let (status, body) = self.get("/metrics");
        assert!(status.contains(" 200 "), "{status}\n{body}");
        let samples = samples(&body);
        (body, samples)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `series -> value` of the exposition text's samples.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn pod_series(name: &str, pod: &str, extra: &str) -> String {
    format!("{name}{{namespace=\"{NAMESPACE}\",pod=\"{pod}\"{extra}}}")
}

/// Where the pods' busybox httpd listens, for network traffic.
const HTTP_PORT: u16 = 8080;

/// The device counters of a pod with a NIC and a share.
const DEVICE_SERIES: [&str; 11] = [
    "arrow_pod_net_rx_bytes_total",
    "arrow_pod_net_tx_bytes_total",
    "arrow_pod_net_rx_frames_total",
    "arrow_pod_net_tx_frames_total",
    "arrow_pod_net_rx_dropped_frames_total",
    "arrow_pod_net_tx_dropped_frames_total",
    "arrow_pod_fs_requests_total",
    "arrow_pod_fs_errors_total",
    "arrow_pod_fs_unanswered_requests_total",
    "arrow_pod_fs_read_bytes_total",
    "arrow_pod_fs_write_bytes_total",
];

/// What the traffic between two scrapes must make grow.
const GROWING_SERIES: [&str; 6] = [
    "arrow_pod_net_rx_bytes_total",
    "arrow_pod_net_tx_bytes_total",
    "arrow_pod_net_rx_frames_total",
    "arrow_pod_net_tx_frames_total",
    "arrow_pod_fs_requests_total",
    "arrow_pod_fs_write_bytes_total",
];

/// The bytes the pod's `dd` writes between the two scrapes.
const WRITTEN: f64 = 16.0 * 4096.0;

/// The series every running pod has once its VM is ready.
const POD_SERIES: [&str; 8] = [
    "arrow_pod_vm_memory_bytes",
    "arrow_pod_vcpus",
    "arrow_pod_cloned",
    "arrow_pod_vmm_rss_bytes",
    "arrow_pod_vmm_pss_bytes",
    "arrow_pod_vcpu_seconds_total",
    "arrow_pod_vmm_cpu_seconds_total",
    "arrow_pod_start_phase_seconds",
];

fn has_all_series(s: &BTreeMap<String, f64>, pod: &str) -> bool {
    let vcpu = s.get(&pod_series("arrow_pod_vcpu_seconds_total", pod, ""));
    POD_SERIES.iter().chain(&DEVICE_SERIES).all(|name| {
        s.keys()
            .any(|k| k.starts_with(&format!("{name}{{namespace=\"{NAMESPACE}\",pod=\"{pod}\"")))
    }) && vcpu.is_some_and(|&v| v > 0.0)
}

/// A pod's value of `name`, 0 if it has none.
fn value(s: &BTreeMap<String, f64>, name: &str, pod: &str) -> f64 {
    s.get(&pod_series(name, pod, "")).copied().unwrap_or(0.0)
}

/// The device counters as soon as they are published (the pod's
/// container may still be starting): the share has served requests, none
/// malformed; the NIC's bytes fit its frames.
fn assert_devices_plausible(s: &BTreeMap<String, f64>, pod: &str, text: &str) {
    let get = |name: &str| value(s, name, pod);
    let requests = get("arrow_pod_fs_requests_total");
    assert!(requests > 0.0, "{pod}: no FUSE request yet\n{text}");
    assert!(
        get("arrow_pod_fs_errors_total") <= requests,
        "{pod}\n{text}"
    );
    assert_eq!(get("arrow_pod_fs_unanswered_requests_total"), 0.0, "{pod}");
    let frames = get("arrow_pod_net_rx_frames_total");
    assert!(
        get("arrow_pod_net_rx_bytes_total") >= frames * 42.0,
        "{pod}: at least an ARP frame's bytes per frame\n{text}"
    );
}

/// One HTTP GET of the pod's index page from the host, retried while
/// httpd starts; the body.
fn http_get(ip: &str) -> String {
    let addr: SocketAddr = format!("{ip}:{HTTP_PORT}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut text = String::new();
            conn.read_to_string(&mut text)?;
            Ok(text)
        })();
        match attempt {
            Ok(text) => return text,
            Err(e) if Instant::now() > deadline => panic!("GET http://{addr}/: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn assert_plausible(s: &BTreeMap<String, f64>, pod: &str, text: &str) {
    let get = |name: &str, extra: &str| -> f64 {
        let series = pod_series(name, pod, extra);
        *s.get(&series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let memory = get("arrow_pod_vm_memory_bytes", "");
    assert_eq!(memory, DEFAULT_MEMORY, "{pod}: guest size\n{text}");
    assert_eq!(get("arrow_pod_vcpus", ""), DEFAULT_VCPUS, "{pod}\n{text}");
    let cloned = get("arrow_pod_cloned", "");
    assert!(cloned == 0.0 || cloned == 1.0, "{pod}: cloned {cloned}");
    let rss = get("arrow_pod_vmm_rss_bytes", "");
    assert!(
        rss > MIB && rss < memory + 256.0 * MIB,
        "{pod}: RSS {rss}\n{text}"
    );
    let pss = get("arrow_pod_vmm_pss_bytes", "");
    assert!(pss > 0.0 && pss <= rss, "{pod}: PSS {pss}, RSS {rss}");
    let vcpu = get("arrow_pod_vcpu_seconds_total", "");
    let cpu = get("arrow_pod_vmm_cpu_seconds_total", "");
    assert!(
        vcpu > 0.0 && cpu >= vcpu,
        "{pod}: vCPU {vcpu} s, VMM {cpu} s"
    );
    let ready = get("arrow_pod_start_phase_seconds", ",phase=\"vmm_ready\"");
    let agent = get("arrow_pod_start_phase_seconds", ",phase=\"agent_ready\"");
    assert!(
        ready > 0.0 && ready < 300.0 && (0.0..300.0).contains(&agent),
        "{pod}: phases {ready} s, {agent} s"
    );
}

#[test]
fn arrow_monitor_shows_each_pod_while_it_runs() {
    if skip_unless_root("arrow_monitor_shows_each_pod_while_it_runs") {
        return;
    }
    let containerd = Containerd::shared();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(monitor_two_pods(containerd));
}

async fn monitor_two_pods(containerd: &Containerd) {
    let cri = containerd.cri().await.unwrap();
    let removed = cri.remove_test_pods().await.unwrap();
    if removed > 0 {
        eprintln!("removed {removed} pods an earlier test left");
    }
    let monitor = tokio::task::spawn_blocking(Monitor::start).await.unwrap();
    let (status, _) = monitor.get("/");
    assert!(status.contains(" 404 "), "{status}");

    let mut pods = Vec::new();
    for i in 0..2 {
        let t0 = Instant::now();
        let pod = cri
            .run_pod_sandbox(&unique_name("monitored"), "arrow")
            .await
            .unwrap_or_else(|e| panic!("pod {i}: {e:#}\n{}", containerd.log_tail(30)));
        // Some guest work, so the vCPUs have spent measurable time.
        let id = cri
            .create_container(
                &pod,
                "busy",
                BUSYBOX_IMAGE,
                &[
                    "sh",
                    "-c",
                    // httpd puts itself in the background.
                    &format!(
                        "mkdir -p /tmp/www && echo monitored > /tmp/www/index.html && \
                         httpd -p {HTTP_PORT} -h /tmp/www && \
                         i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; sleep 600"
                    ),
                ],
                "busy/0.log",
            )
            .await
            .unwrap();
        cri.start_container(&id).await.unwrap();
        eprintln!("pod {i} {} running after {:?}", pod.id, t0.elapsed());
        pods.push((pod, id));
    }

    // The VM's record is written once it is ready and the CPU figures tick
    // at 10 ms: wait for every series of both pods.
    let ids: Vec<String> = pods.iter().map(|(p, _)| p.id.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (text, s) = loop {
        let (text, s) = tokio::task::block_in_place(|| monitor.scrape());
        if ids.iter().all(|id| has_all_series(&s, id)) || Instant::now() > deadline {
            break (text, s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("{text}");
    for id in &ids {
        assert_plausible(&s, id, &text);
        assert_devices_plausible(&s, id, &text);
    }
    assert!(s.get("arrow_pods").is_some_and(|&n| n >= 2.0), "{text}");
    assert_eq!(
        s.get("arrow_monitor_scrape_errors_total"),
        Some(&0.0),
        "{text}"
    );

    // Traffic after that scrape: HTTP requests from the host to each pod
    // (frames both ways on its NIC) and a file written and synced in it
    // (FUSE writes on its share). The VMM publishes every second, so the
    // counters show it within a few.
    let before = s;
    for (pod, container) in &pods {
        let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        assert!(!ip.is_empty(), "{} has no IP", pod.id);
        let page = tokio::task::spawn_blocking(move || http_get(&ip))
            .await
            .unwrap();
        assert!(page.contains("monitored"), "{page}");
        let out = cri
            .exec_sync(
                container,
                &[
                    "sh",
                    "-c",
                    "dd if=/dev/zero of=/tmp/counted bs=4096 count=16 2>/dev/null && sync",
                ],
                60,
            )
            .await
            .unwrap();
        assert_eq!(out.exit_code, 0, "{out:?}");
    }
    let grown = |s: &BTreeMap<String, f64>, id: &str| {
        GROWING_SERIES
            .iter()
            .all(|name| value(s, name, id) > value(&before, name, id))
            && value(s, "arrow_pod_fs_write_bytes_total", id)
                >= value(&before, "arrow_pod_fs_write_bytes_total", id) + WRITTEN
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, after) = loop {
        let (text, s) = tokio::task::block_in_place(|| monitor.scrape());
        if ids.iter().all(|id| grown(&s, id)) || Instant::now() > deadline {
            break (text, s);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("{text}");
    for id in &ids {
        for name in DEVICE_SERIES {
            eprintln!(
                "{id}: {name} {} -> {}",
                value(&before, name, id),
                value(&after, name, id)
            );
            // Counters never go back.
            assert!(
                value(&after, name, id) >= value(&before, name, id),
                "{id}: {name}"
            );
        }
        assert!(grown(&after, id), "{id}: the traffic did not show\n{text}");
    }

    for (pod, id) in &pods {
        cri.stop_container(id, 0).await.unwrap();
        cri.remove_container(id).await.unwrap();
        cri.remove_pod(pod).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let (text, _) = tokio::task::block_in_place(|| monitor.scrape());
        let left = ids.iter().any(|id| text.contains(id.as_str()));
        if !left || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for id in &ids {
        assert!(!text.contains(id.as_str()), "{id}'s series left:\n{text}");
    }
}
