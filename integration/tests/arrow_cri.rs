//! `arrow-cri` end to end, with no containerd: the built daemon on its own
//! socket, root, state and CNI directories (a bridge network on 10.99/16 of
//! its own), an image pushed to Debian's `docker-registry` on loopback and
//! pulled over CRI, pods as real microVMs through the built shim. Driven by
//! the CRI client of `integration::cri`, as crictl or kubelet would:
//! runp → create → start → logs → exec sync → stats → stop → rm → rmp, exit
//! codes, a `kill -9` of arrow-cri in the middle of a pod's life and a
//! restart, and nothing left behind. Needs root and KVM (as CI has).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::cri::{
    container_config, log_text, pod_config, read_cri_log, wait_for_log, ContainerState, CriClient,
};
use proto::cri;

const BRIDGE: &str = "arrowcri0";
const SUBNET: &str = "10.99.0.0/16";

fn bin_dir() -> PathBuf {
    std::env::var_os("ARROW_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| integration::workspace_root().join("target/arrow"))
}

fn must(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} missing: run hack/build.sh (hack/test.sh does)",
        path.display()
    );
    path
}

// ------------------------------------------------------------ registry

struct Registry {
    _dir: tempfile::TempDir,
    port: u16,
    child: Child,
}

impl Registry {
    fn start() -> Registry {
        let bin = "/usr/bin/docker-registry";
        assert!(
            Path::new(bin).exists(),
            "{bin} missing: hack/deps.sh installs it"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        fs::write(dir.path().join("config.yml"), config).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            _dir: dir,
            port,
            child,
        }
    }

    /// Pushes the test busybox tree as `arrow/busybox:e2e`; returns the
    /// reference.
    async fn push_busybox(&self) -> String {
        use flate2::write::GzEncoder;
        use oci_client::client::{ClientConfig, ClientProtocol};
        use oci_client::{secrets::RegistryAuth, Client, Reference};
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sha = |d: &[u8]| format!("sha256:{:x}", Sha256::digest(d));
        let layer = integration::image::layer_tar(&integration::busybox_rootfs()).unwrap();
        let diff_id = sha(&layer);
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer).unwrap();
        let layer_gz = gz.finish().unwrap();
        let mut settings = integration::image::ImageSettings::new("arrow/busybox:e2e");
        settings.cmd = vec!["sh".into()];
        let config =
            serde_json::to_vec(&integration::image::image_config(&settings, &diff_id)).unwrap();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": integration::image::MEDIA_MANIFEST,
            "config": {"mediaType": integration::image::MEDIA_CONFIG, "digest": sha(&config), "size": config.len()},
            "layers": [{"mediaType": integration::image::MEDIA_LAYER_GZIP, "digest": sha(&layer_gz), "size": layer_gz.len()}],
        }))
        .unwrap();
        let host = format!("127.0.0.1:{}", self.port);
        let reference = Reference::with_tag(host.clone(), "arrow/busybox".into(), "e2e".into());
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        client
            .auth(
                &reference,
                &RegistryAuth::Anonymous,
                oci_client::RegistryOperation::Push,
            )
            .await
            .unwrap();
        for data in [&config, &layer_gz] {
            client
                .push_blob(&reference, data.clone(), &sha(data))
                .await
                .unwrap();
        }
        client
            .push_manifest_raw(
                &reference,
                manifest,
                integration::image::MEDIA_MANIFEST.parse().unwrap(),
            )
            .await
            .unwrap();
        format!("{host}/arrow/busybox:e2e")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// -------------------------------------------------------------- daemon

struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn socket(&self) -> PathBuf {
        self.dir.join("cri.sock")
    }

    fn start(dir: &Path) -> Daemon {
        // An empty config file: only the flags below, never /etc/arrow-cri.
        fs::write(dir.join("none.toml"), "").unwrap();
        let conf = dir.join("net.d");
        fs::create_dir_all(&conf).unwrap();
        fs::write(
            conf.join("10-arrow-cri-e2e.conflist"),
            format!(
                r#"{{"cniVersion": "1.0.0", "name": "arrow-cri-e2e", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{SUBNET}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}],
             "dataDir": "{}"}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#,
                dir.join("ipam").display()
            ),
        )
        .unwrap();
        let mut d = Daemon {
            dir: dir.to_path_buf(),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("arrow-cri.log"))
            .unwrap();
        let child = Command::new(must(bin_dir().join("arrow-cri")))
            .arg("--config")
            .arg(self.dir.join("none.toml"))
            .arg("--listen")
            .arg(self.socket())
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--state")
            .arg(self.dir.join("state"))
            .arg("--cni-conf-dir")
            .arg(self.dir.join("net.d"))
            .arg("--cni-bin-dir")
            .arg("/usr/lib/cni")
            .arg("--shim")
            .arg(must(bin_dir().join("containerd-shim-arrow-v1")))
            .arg("--log-level")
            .arg("info")
            .env("ARROW_KERNEL", integration::kernel())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(
                Instant::now() < deadline,
                "arrow-cri did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The daemon's resident memory (kB), for the report.
    fn rss_kb(&self) -> u64 {
        let Some(c) = &self.child else { return 0 };
        fs::read_to_string(format!("/proc/{}/status", c.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("arrow-cri.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

// --------------------------------------------------------------- checks

/// Processes whose command line contains `needle`.
fn processes(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push(cmdline);
        }
    }
    out
}

fn assert_nothing_left(dir: &Path) {
    let shims = processes("-namespace arrow-cri ");
    assert!(shims.is_empty(), "shims left: {shims:#?}");
    let vmms: Vec<_> = processes("arrow-vmm")
        .into_iter()
        .filter(|c| c.contains("/run/arrow/arrow-cri/"))
        .collect();
    assert!(vmms.is_empty(), "VMMs left: {vmms:#?}");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir_text = dir.display().to_string();
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            l.contains("/run/arrow/arrow-cri/")
                || l.contains(&dir_text)
                || l.contains("/run/netns/arrow-cri-")
        })
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
    let netns: Vec<_> = fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("arrow-cri-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(netns.is_empty(), "network namespaces left: {netns:?}");
    let ports = Command::new("ip")
        .args(["-o", "link", "show", "master", BRIDGE])
        .output()
        .unwrap();
    let ports = String::from_utf8_lossy(&ports.stdout);
    assert!(ports.trim().is_empty(), "veths left on {BRIDGE}: {ports}");
    let taps = Command::new("ip")
        .args(["-o", "link", "show", "type", "tun"])
        .output()
        .unwrap();
    let taps = String::from_utf8_lossy(&taps.stdout).to_string();
    assert!(!taps.contains("arrow"), "taps left on the host: {taps}");
    let left: Vec<_> = fs::read_dir("/run/arrow/arrow-cri")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "shim state left: {left:?}");
    let state: Vec<_> = ["pods", "containers"]
        .iter()
        .flat_map(|d| {
            fs::read_dir(dir.join("state").join(d))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .collect();
    assert!(state.is_empty(), "arrow-cri state left: {state:?}");
    let roots: Vec<_> = fs::read_dir(dir.join("root/rootfs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(roots.is_empty(), "container roots left: {roots:?}");
}

fn pod_in(dir: &Path, name: &str) -> cri::PodSandboxConfig {
    let mut config = pod_config(name);
    config.log_directory = dir.join("logs").join(name).display().to_string();
    config.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.99.0.53".into()],
        searches: vec!["e2e.arrow".into()],
        options: vec!["ndots:2".into()],
    });
    config
}

async fn state_of(client: &CriClient, id: &str) -> cri::ContainerStatus {
    client.container_status(id).await.unwrap()
}

async fn wait_state(
    client: &CriClient,
    id: &str,
    want: ContainerState,
    timeout: Duration,
) -> cri::ContainerStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let s = state_of(client, id).await;
        if s.state == want as i32 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} never reached {want:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ----------------------------------------------------------------- test

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn arrow_cri_runs_pods_without_containerd() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "arrow-cri's end-to-end test runs as root"
    );
    let _boots = integration::boot_lock();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let registry = Registry::start();
    let image = registry.push_busybox().await;
    let tmp = tempfile::Builder::new()
        .prefix("arrow-cri-e2e")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let mut daemon = Daemon::start(&dir);
    let client = CriClient::connect(daemon.socket()).await.unwrap();

    // Version, Status, RuntimeConfig.
    let v = client.version().await.unwrap();
    assert_eq!(v.runtime_name, "arrow-cri");
    let conditions = client.status().await.unwrap();
    assert!(
        conditions["RuntimeReady"].status && conditions["NetworkReady"].status,
        "{conditions:?}"
    );

    client
        .image
        .clone()
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();

    // Host namespaces are refused, naming the field.
    let mut host = pod_in(&dir, "hostnet");
    host.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options
        .as_mut()
        .unwrap()
        .network = cri::NamespaceMode::Node as i32;
    let refused = client.run_pod_sandbox_with(host, "").await.unwrap_err();
    assert!(
        format!("{refused:#}").contains("hostNetwork"),
        "{refused:#}"
    );

    // ---- runp → create → start → logs → exec → stats → stop → rm → rmp
    let begun = Instant::now();
    let pod = client
        .run_pod_sandbox_with(pod_in(&dir, "web"), "")
        .await
        .unwrap();
    let status = client.pod_sandbox_status(&pod.id).await.unwrap();
    assert_eq!(status.state, cri::PodSandboxState::SandboxReady as i32);
    let ip = status.network.unwrap().ip;
    assert!(ip.starts_with("10.99."), "pod IP {ip:?} not from {SUBNET}");
    let listed = client.list_pod_sandboxes().await.unwrap();
    assert!(listed.iter().any(|p| p.id == pod.id));

    let script =
        "echo hello; echo oops >&2; i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done";
    let app = client
        .create_container_with(
            &pod,
            container_config("app", &image, &["sh", "-c", script], "app.log"),
        )
        .await
        .unwrap();
    assert_eq!(
        state_of(&client, &app).await.state,
        ContainerState::ContainerCreated as i32
    );
    client.start_container(&app).await.unwrap();
    let log = pod.log_file("app.log");
    wait_for_log(&log, "hello", Duration::from_secs(60))
        .await
        .unwrap();
    // Figures for the report, not asserted (one sample, nested KVM).
    eprintln!(
        "arrow-cri: runp + create + start -> first log line: {:.0} ms",
        ms(begun.elapsed())
    );
    eprintln!("arrow-cri: daemon RSS with one pod: {} kB", daemon.rss_kb());
    wait_for_log(&log, "tick 2", Duration::from_secs(60))
        .await
        .unwrap();
    let lines = read_cri_log(&log).unwrap();
    assert_eq!(
        log_text(&lines, Some("stdout")).lines().next(),
        Some("hello")
    );
    assert_eq!(log_text(&lines, Some("stderr")), "oops\n");
    assert!(
        lines
            .iter()
            .all(|l| !l.partial && l.time.ends_with('Z') && l.time.len() == 30),
        "{lines:?}"
    );

    let out = client
        .exec_sync(&app, &["cat", "/etc/resolv.conf", "/etc/hostname"], 30)
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.stderr_text());
    let text = out.stdout_text();
    assert!(
        text.contains("nameserver 10.99.0.53") && text.contains("search e2e.arrow"),
        "{text}"
    );
    assert!(text.contains("web"), "{text}");
    let out = client
        .exec_sync(&app, &["sh", "-c", "echo err >&2; exit 3"], 30)
        .await
        .unwrap();
    assert_eq!((out.exit_code, out.stderr_text().as_str()), (3, "err\n"));
    let started = Instant::now();
    let timed_out = client
        .exec_sync(&app, &["sleep", "60"], 2)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the timeout was not applied"
    );
    assert!(
        format!("{timed_out:#}").to_lowercase().contains("deadline")
            || format!("{timed_out:#}").contains("within"),
        "{timed_out:#}"
    );

    let stats = client.container_stats(&app).await.unwrap();
    let memory = stats
        .memory
        .expect("memory stats")
        .working_set_bytes
        .expect("working set")
        .value;
    assert!(memory > 0, "{stats:?}");
    assert!(stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .is_some_and(|u| u.value > 0));
    let pod_stats = client
        .runtime
        .clone()
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pod_stats
        .stats
        .and_then(|s| s.linux)
        .and_then(|l| l.memory)
        .is_some());

    // Log rotation: the file is renamed, ReopenContainerLog starts a new one.
    fs::rename(&log, dir.join("app.log.1")).unwrap();
    client
        .runtime
        .clone()
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: app.clone(),
        })
        .await
        .unwrap();
    wait_for_log(&log, "tick", Duration::from_secs(30))
        .await
        .unwrap();

    // A second container of the pod, exiting with a code.
    let exits = client
        .create_container_with(
            &pod,
            container_config("exits", &image, &["sh", "-c", "exit 7"], "exits.log"),
        )
        .await
        .unwrap();
    client.start_container(&exits).await.unwrap();
    let s = wait_state(
        &client,
        &exits,
        ContainerState::ContainerExited,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!((s.exit_code, s.reason.as_str()), (7, "Error"));
    assert!(s.finished_at >= s.started_at && s.started_at > 0);
    assert_eq!(
        client.list_containers(Some(&pod.id)).await.unwrap().len(),
        2
    );

    client.stop_container(&app, 2).await.unwrap();
    let s = state_of(&client, &app).await;
    assert_eq!(s.state, ContainerState::ContainerExited as i32);
    assert!(s.exit_code == 137 || s.exit_code == 143, "{s:?}");
    client.remove_container(&app).await.unwrap();
    client.remove_container(&exits).await.unwrap();
    assert!(client.container_status(&app).await.is_err());
    let stopping = Instant::now();
    client.stop_pod_sandbox(&pod.id).await.unwrap();
    assert_eq!(
        client.pod_sandbox_status(&pod.id).await.unwrap().state,
        cri::PodSandboxState::SandboxNotready as i32
    );
    client.remove_pod_sandbox(&pod.id).await.unwrap();
    eprintln!("arrow-cri: stopp + rmp: {:.0} ms", ms(stopping.elapsed()));

    // ---- arrow-cri killed with SIGKILL mid-life, then restarted.
    let pod = client
        .run_pod_sandbox_with(pod_in(&dir, "survivor"), "")
        .await
        .unwrap();
    let ticker = client
        .create_container_with(
            &pod,
            container_config(
                "ticker",
                &image,
                &["sh", "-c", "while true; do echo beat; sleep 1; done"],
                "ticker.log",
            ),
        )
        .await
        .unwrap();
    let short = client
        .create_container_with(
            &pod,
            container_config(
                "short",
                &image,
                &["sh", "-c", "sleep 6; echo bye; exit 5"],
                "short.log",
            ),
        )
        .await
        .unwrap();
    client.start_container(&ticker).await.unwrap();
    client.start_container(&short).await.unwrap();
    wait_for_log(&pod.log_file("ticker.log"), "beat", Duration::from_secs(60))
        .await
        .unwrap();
    daemon.kill9();
    drop(client);
    // `short` exits while nobody listens.
    tokio::time::sleep(Duration::from_secs(10)).await;
    daemon.spawn();
    let client = CriClient::connect(daemon.socket()).await.unwrap();
    assert_eq!(
        client.pod_sandbox_status(&pod.id).await.unwrap().state,
        cri::PodSandboxState::SandboxReady as i32
    );
    let s = wait_state(
        &client,
        &short,
        ContainerState::ContainerExited,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(s.exit_code, 5, "{s:?}");
    assert!(log_text(&read_cri_log(pod.log_file("short.log")).unwrap(), None).contains("bye"));
    assert_eq!(
        state_of(&client, &ticker).await.state,
        ContainerState::ContainerRunning as i32
    );
    let before = read_cri_log(pod.log_file("ticker.log")).unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while read_cri_log(pod.log_file("ticker.log")).unwrap().len() <= before + 1 {
        assert!(
            Instant::now() < deadline,
            "the log is not copied after the restart"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = client
        .exec_sync(&ticker, &["echo", "still here"], 30)
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "still here\n");
    client.stop_pod_sandbox(&pod.id).await.unwrap();
    client.remove_pod_sandbox(&pod.id).await.unwrap();
    assert!(client.list_pod_sandboxes().await.unwrap().is_empty());
    assert!(client.list_containers(None).await.unwrap().is_empty());

    drop(client);
    drop(daemon);
    assert_nothing_left(&dir);
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
    integration::cri::remove_cgroup_dirs(integration::cri::CGROUP_PARENT);
    drop(registry);
}
