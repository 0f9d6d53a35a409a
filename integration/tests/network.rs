//! Pod networking end to end: pods of runtime handler `arrow` under the
//! private containerd (hack/containerd.sh) and its CNI network (bridge
//! `arrow0`, host-local 10.213.0.0/16), with `runc` pods as the control. The
//! pod IP must answer from inside the microVM, from the host and from other
//! pods; the pod's DNS settings must reach the guest; and stopping pods must
//! leave no tap, tc filter or network namespace behind. Needs root and KVM;
//! skipped with a message otherwise.
//!
//! Traffic goes only to the pod IPs the CRI reports, on the bridge of the
//! private containerd, inside namespaces the test made (through CNI).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use integration::containerd::{skip_unless_root, Containerd, BUSYBOX_IMAGE};
use integration::cri::{pod_config, unique_name, CriClient, Pod};
use integration::portforward::{forward_once, Forwarded};
use integration::streaming::{self, Script};
use k8s_cri::v1 as cri;

/// The tap the shim creates in a pod's network namespace.
const TAP_NAME: &str = "tap0_arrow";
/// The port busybox httpd listens on in the test pods.
const HTTP_PORT: u16 = 8080;

/// One test at a time: each runs pod VMs, and two cores do not run more
/// guests usefully.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn block_on<F: std::future::Future<Output = ()>>(body: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
}

/// A pod running busybox httpd on [`HTTP_PORT`], serving `marker` at `/`.
struct WebPod {
    pod: Pod,
    container: String,
    ip: String,
}

async fn web_pod(cri: &CriClient, handler: &str, marker: &str) -> WebPod {
    let containerd = Containerd::shared();
    let pod = cri
        .run_pod_sandbox(&unique_name(&format!("net-{handler}")), handler)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log_tail(30)));
    let script = format!(
        "mkdir -p /tmp/www && echo {marker} > /tmp/www/index.html && \
         exec httpd -f -p {HTTP_PORT} -h /tmp/www"
    );
    let container = cri
        .create_container(
            &pod,
            "web",
            BUSYBOX_IMAGE,
            &["sh", "-c", &script],
            "web/0.log",
        )
        .await
        .unwrap();
    cri.start_container(&container).await.unwrap();
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    assert!(!ip.is_empty(), "{handler} pod without an IP: {status:?}");
    WebPod { pod, container, ip }
}

/// GET / from `ip`:[`HTTP_PORT`] on the host, retried until `timeout`
/// (httpd takes a moment to listen in a guest); the response body.
fn http_get(ip: &str, timeout: Duration) -> Result<String, String> {
    let addr: SocketAddr = format!("{ip}:{HTTP_PORT}")
        .parse()
        .map_err(|e| format!("{ip}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            conn.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut text = String::new();
            conn.read_to_string(&mut text)?;
            Ok(text)
        })();
        match attempt {
            Ok(text) => {
                return Ok(text
                    .split_once("\r\n\r\n")
                    .map(|(_, body)| body.to_string())
                    .unwrap_or(text))
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(format!("no HTTP answer from {addr} in {timeout:?}: {last}"))
}

async fn remove(cri: &CriClient, web: &WebPod) {
    let _ = cri.stop_container(&web.container, 0).await;
    let _ = cri.remove_container(&web.container).await;
    cri.remove_pod(&web.pod).await.unwrap();
}

#[test]
fn pod_ip_serves_http_from_the_guest_like_runc() {
    if skip_unless_root("pod_ip_serves_http_from_the_guest_like_runc") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let cri = Containerd::shared().cri().await.unwrap();
        for handler in ["runc", "arrow"] {
            let marker = format!("hello-from-{handler}");
            let web = web_pod(&cri, handler, &marker).await;
            let ip = web.ip.clone();
            let body = tokio::task::spawn_blocking(move || http_get(&ip, Duration::from_secs(120)))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{handler}: {e}"));
            assert_eq!(body.trim(), marker, "{handler} pod at {}", web.ip);
            remove(&cri, &web).await;
        }
    });
}

/// One port-forward through containerd's streaming server: a fresh URL
/// (tokens are single-use), `request` on the data channel, both channels
/// back.
async fn forward(cri: &CriClient, pod_id: &str, port: u16, request: &'static [u8]) -> Forwarded {
    let url = cri.port_forward(pod_id, &[port]).await.unwrap();
    tokio::task::spawn_blocking(move || {
        forward_once(&url, port, request, Duration::from_secs(60)).unwrap()
    })
    .await
    .unwrap()
}

/// `kubectl port-forward` under containerd: its CRI plugin dials
/// 127.0.0.1:<port> in the pod's network namespace on the host. For an
/// arrow pod the shim answers there and carries the connection into the
/// guest, so a server bound to the guest's loopback only is reachable,
/// as with runc: one connection, several in parallel, a 1 MiB download
/// intact, and a closed port reported on the error channel.
#[test]
fn port_forward_through_containerd_reaches_the_guest_like_runc() {
    if skip_unless_root("port_forward_through_containerd_reaches_the_guest_like_runc") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let cri = Containerd::shared().cri().await.unwrap();
        for handler in ["runc", "arrow"] {
            let marker = format!("forwarded-from-{handler}");
            let pod = cri
                .run_pod_sandbox(&unique_name(&format!("pf-{handler}")), handler)
                .await
                .unwrap();
            let script = format!(
                "mkdir -p /tmp/www && echo {marker} > /tmp/www/index.html && \
                 dd if=/dev/urandom of=/tmp/www/big bs=64k count=16 2>/dev/null && \
                 sha256sum /tmp/www/big > /tmp/www/big.sha && \
                 exec httpd -f -p 127.0.0.1:{HTTP_PORT} -h /tmp/www"
            );
            let container = cri
                .create_container(
                    &pod,
                    "web",
                    BUSYBOX_IMAGE,
                    &["sh", "-c", &script],
                    "web/0.log",
                )
                .await
                .unwrap();
            cri.start_container(&container).await.unwrap();

            // httpd listens once the script wrote 1 MiB of /dev/urandom
            // through virtio-fs: both in the guest kernel, which is
            // emulated on kvm_pvm (30-40 s per MiB measured on a slow
            // host, where 120 s was not enough).
            let get: &[u8] = b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n";
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let f = forward(&cri, &pod.id, HTTP_PORT, get).await;
                if f.http_body()
                    .is_some_and(|b| b.trim_ascii() == marker.as_bytes())
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{handler}: no answer through port-forward: {f:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }

            let parallel: Vec<_> = (0..4)
                .map(|_| {
                    let cri = cri.clone();
                    let pod_id = pod.id.clone();
                    tokio::spawn(async move { forward(&cri, &pod_id, HTTP_PORT, get).await })
                })
                .collect();
            for f in parallel {
                let f = f.await.unwrap();
                assert_eq!(
                    f.http_body().map(|b| b.trim_ascii().to_vec()),
                    Some(marker.as_bytes().to_vec()),
                    "{handler}: parallel forward: {f:?}"
                );
            }

            let big = forward(&cri, &pod.id, HTTP_PORT, b"GET /big HTTP/1.0\r\n\r\n").await;
            let body = big.http_body().unwrap_or_default();
            assert_eq!(
                body.len(),
                16 * 64 * 1024,
                "{handler}: download size; error: {}",
                big.error
            );
            let want = cri
                .exec_sync(&container, &["cat", "/tmp/www/big.sha"], 30)
                .await
                .unwrap()
                .stdout_text();
            let got = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(body));
            assert!(
                want.starts_with(&got),
                "{handler}: download corrupted: {got} vs {want}"
            );

            // Nothing listens on port 9: the streaming server says so.
            let closed = forward(&cri, &pod.id, 9, get).await;
            assert!(closed.data.is_empty(), "{handler}: {closed:?}");
            assert!(
                closed.error.contains("9"),
                "{handler}: a closed port gave no error: {closed:?}"
            );
            println!("{handler}: closed port: {}", closed.error.trim());
            streams_like_kubectl(&cri, handler, &container, &pod.id, body.len()).await;

            let _ = cri.stop_container(&container, 0).await;
            let _ = cri.remove_container(&container).await;
            cri.remove_pod(&pod).await.unwrap();
        }
    });
}

/// Exec with and without a terminal, over SPDY and WebSocket, and
/// port-forward over SPDY, through containerd's streaming server
/// (Kubernetes' own streaming library) with the clients the arrow-cri
/// tests use against arrow-cri's: for `arrow`, kubectl exec -it and
/// port-forward under containerd; for `runc`, a check of the clients.
async fn streams_like_kubectl(
    cri: &CriClient,
    handler: &str,
    container: &str,
    pod_id: &str,
    big: usize,
) {
    let get = b"GET /big HTTP/1.0\r\n\r\n".to_vec();
    let url = cri.port_forward(pod_id, &[HTTP_PORT]).await.unwrap();
    let got = streaming::spdy_port_forward(&url, &[(HTTP_PORT, get.clone()), (9, get)])
        .await
        .unwrap();
    assert_eq!(
        got[0].http_body().map(<[u8]>::len),
        Some(big),
        "{handler}: SPDY port-forward: {}",
        got[0].error
    );
    assert!(
        got[1].data.is_empty() && got[1].error.contains('9'),
        "{handler}: {:?}",
        got[1]
    );
    // containerd's server has the v4 protocols (v5 came later).
    for spdy in [true, false] {
        let how = format!("{handler} spdy={spdy}");
        let plain = Script {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"];
        let url = cri
            .exec(container, &cmd, false, false, true, true)
            .await
            .unwrap();
        let run = if spdy {
            streaming::spdy_remote_command(&url, "v4.channel.k8s.io", &plain).await
        } else {
            streaming::ws_remote_command(&url, "v4.channel.k8s.io", &plain).await
        }
        .unwrap();
        assert_eq!(
            (run.stdout_text().as_str(), run.stderr_text().as_str()),
            ("out\n", "err\n"),
            "{how}"
        );
        assert_eq!(run.exit_code().unwrap(), 3, "{how}");
        let terminal = Script {
            tty: true,
            stdout: true,
            stdin: Some(b"sleep 1; stty size; echo typed-$((6*7)); exit 4\n".to_vec()),
            // As kubectl: a terminal's stdin stays open; the shell exits.
            close_stdin: false,
            resize: Some((123, 45)),
            ..Default::default()
        };
        let url = cri
            .exec(container, &["sh"], true, true, true, false)
            .await
            .unwrap();
        let run = if spdy {
            streaming::spdy_remote_command(&url, "v4.channel.k8s.io", &terminal).await
        } else {
            streaming::ws_remote_command(&url, "v4.channel.k8s.io", &terminal).await
        }
        .unwrap();
        let out = run.stdout_text();
        assert!(
            out.contains("45 123") && out.contains("typed-42"),
            "{how}: {out:?}"
        );
        assert_eq!(run.exit_code().unwrap(), 4, "{how}");
    }
}

#[test]
fn arrow_pods_reach_each_other_and_runc_pods() {
    if skip_unless_root("arrow_pods_reach_each_other_and_runc_pods") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let cri = Containerd::shared().cri().await.unwrap();
        let a = web_pod(&cri, "arrow", "pod-a").await;
        let b = web_pod(&cri, "arrow", "pod-b").await;
        let r = web_pod(&cri, "runc", "pod-r").await;
        let fetch = |from: &WebPod, to: &WebPod| {
            let cri = cri.clone();
            let (container, url) = (
                from.container.clone(),
                format!("http://{}:{HTTP_PORT}/", to.ip),
            );
            async move {
                // httpd in a guest may need a moment: retry in the pod.
                // Not `wget -T`: Debian's busybox 1.35 wget dereferences
                // NULL parsing it (segfaults on the host as well).
                let script = format!(
                    "for i in $(seq 60); do timeout 10 wget -q -O- {url} && exit 0; sleep 1; done; exit 1"
                );
                cri.exec_sync(&container, &["sh", "-c", &script], 120)
                    .await
                    .unwrap()
            }
        };
        for (from, to, want) in [
            (&a, &b, "pod-b"),
            (&b, &a, "pod-a"),
            (&a, &r, "pod-r"),
            (&r, &a, "pod-a"),
        ] {
            let out = fetch(from, to).await;
            assert_eq!(
                (out.exit_code, out.stdout_text().trim()),
                (0, want),
                "{} -> {}: {out:?}",
                from.ip,
                to.ip
            );
        }
        // The guest's own view: its eth0 has the pod IP.
        let addr = cri
            .exec_sync(&a.container, &["ip", "-4", "addr", "show", "eth0"], 60)
            .await
            .unwrap();
        assert!(addr.stdout_text().contains(&a.ip), "{addr:?}");
        for web in [&a, &b, &r] {
            remove(&cri, web).await;
        }
    });
}

#[test]
fn dns_config_reaches_the_guest_resolv_conf() {
    if skip_unless_root("dns_config_reaches_the_guest_resolv_conf") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let cri = Containerd::shared().cri().await.unwrap();
        let mut seen = Vec::new();
        for handler in ["runc", "arrow"] {
            let mut config = pod_config(&unique_name(&format!("dns-{handler}")));
            config.dns_config = Some(cri::DnsConfig {
                servers: vec!["10.88.0.53".into()],
                searches: vec!["arrow.test".into(), "svc.arrow.test".into()],
                options: vec!["ndots:2".into()],
            });
            let pod = cri.run_pod_sandbox_with(config, handler).await.unwrap();
            let c = cri
                .create_container(&pod, "c", BUSYBOX_IMAGE, &["sleep", "600"], "c/0.log")
                .await
                .unwrap();
            cri.start_container(&c).await.unwrap();
            let out = cri
                .exec_sync(&c, &["cat", "/etc/resolv.conf"], 60)
                .await
                .unwrap();
            assert_eq!(out.exit_code, 0, "{handler}: {out:?}");
            let text = out.stdout_text();
            assert!(text.contains("nameserver 10.88.0.53"), "{handler}: {text}");
            assert!(
                text.contains("search arrow.test svc.arrow.test"),
                "{handler}: {text}"
            );
            assert!(text.contains("options ndots:2"), "{handler}: {text}");
            seen.push(text);
            let _ = cri.stop_container(&c, 0).await;
            cri.remove_container(&c).await.unwrap();
            cri.remove_pod(&pod).await.unwrap();
        }
        assert_eq!(seen[0], seen[1], "runc and arrow see the same resolv.conf");
    });
}

/// The network namespaces `ip netns` knows (containerd's CNI namespaces
/// live in /var/run/netns too).
fn netns_names() -> BTreeSet<String> {
    // The private containerd mounts pod namespaces under its CRI state dir
    // (hack/containerd.sh: netns_mounts_under_state_dir), not /run/netns.
    [
        "/var/run/netns",
        "/run/arrow-test/containerd/io.containerd.grpc.v1.cri/netns",
    ]
    .iter()
    .flat_map(|dir| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    })
    .collect()
}

/// Interfaces enslaved to the CNI bridge (one host veth per running pod).
fn bridge_ports() -> usize {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "master", "arrow0"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().count()
}

/// Namespaces (of `names`) that still hold an Arrow tap.
fn netns_with_arrow_taps(names: &BTreeSet<String>) -> Vec<String> {
    names
        .iter()
        .filter(|ns| {
            Command::new("nsenter")
                .arg(format!("--net={ns}"))
                .args(["ip", "link", "show", TAP_NAME])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .cloned()
        .collect()
}

#[test]
fn network_cycles_leave_no_tap_filter_or_netns() {
    if skip_unless_root("network_cycles_leave_no_tap_filter_or_netns") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let containerd = Containerd::shared();
        let cri = containerd.cri().await.unwrap();
        let netns_before = netns_names();
        let ports_before = bridge_ports();
        for i in 0..integration::pod_cycles(5) {
            let pod = cri
                .run_pod_sandbox(&unique_name("netcycle"), "arrow")
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: {e:#}\n{}", containerd.log_tail(30)));
            let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
            let ip = status.network.map(|n| n.ip).unwrap_or_default();
            assert!(!ip.is_empty(), "cycle {i}: no pod IP");
            let new: BTreeSet<String> = netns_names().difference(&netns_before).cloned().collect();
            let taps = netns_with_arrow_taps(&new);
            assert_eq!(taps.len(), 1, "cycle {i}: one pod, one tap: {new:?}");
            cri.remove_pod(&pod).await.unwrap();
        }
        drop(cri);
        let netns_after = netns_names();
        let left: Vec<&String> = netns_after.difference(&netns_before).collect();
        assert!(left.is_empty(), "network namespaces left: {left:?}");
        assert_eq!(bridge_ports(), ports_before, "veths left on arrow0");
        // The pods' namespaces are gone, and with them their taps and tc
        // filters; no other namespace got a tap either.
        let taps = netns_with_arrow_taps(&netns_after);
        assert!(taps.is_empty(), "taps left in {taps:?}");
        let host_taps = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert!(!host_taps.contains(TAP_NAME), "a tap in the host namespace");
        assert!(
            !Path::new("/run/arrow/k8s.io").exists()
                || std::fs::read_dir("/run/arrow/k8s.io")
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(true),
            "pod state left in /run/arrow/k8s.io"
        );
    });
}
