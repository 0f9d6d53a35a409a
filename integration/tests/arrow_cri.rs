//! `arrow-cri` end to end, with no containerd: the built daemon on its own
//! socket, root, state and CNI directories (a bridge network on 10.99/16 of
//! its own), an image pushed to Debian's `docker-registry` on loopback and
//! pulled over CRI, pods as real microVMs through the built shim. Driven by
//! the CRI client of `integration::cri`, as crictl or kubelet would:
//! runp → create → start → logs → exec sync → stats → stop → rm → rmp, exit
//! codes, a `kill -9` of arrow-cri in the middle of a pod's life and a
//! restart, and nothing left behind; what a container's security context
//! asks for as seen in the guest, host ports, two containers of a pod over
//! localhost and a shared volume, OOM kills, PID modes, the
//! GetContainerEvents stream; and pod cycles that leak nothing (10, or
//! `$ARROW_E2E_POD_CYCLES`). Needs root and KVM (as CI has). The tests take turns (one VM shape, so every
//! pod after the first is a clone of one template).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::arrow_cri::{Daemon, Registry, BRIDGE, GATEWAY, SUBNET};
use integration::cri::{
    container_config, log_text, pod_config, read_cri_log, wait_for_log, ContainerState, CriClient,
};
use integration::streaming::{self, Script};
use k8s_cri::v1 as cri;
use sha2::{Digest, Sha256};

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
    let vmms = || -> Vec<String> {
        processes("arrow-vmm")
            .into_iter()
            .filter(|c| c.contains("/run/arrow/arrow-cri/"))
            .collect()
    };
    // A shim exits once it has answered its last request, so the last
    // pod's may still be on its way out (seen on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(20);
    while (!processes("-namespace arrow-cri ").is_empty() || !vmms().is_empty())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let shims = processes("-namespace arrow-cri ");
    assert!(shims.is_empty(), "shims left: {shims:#?}");
    let vmms = vmms();
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
    e2e(run());
}

/// A registry with the test image, a daemon on its own directories and a
/// client; dropped in the right order by [`Env::finish`].
struct Env {
    registry: Registry,
    tmp: tempfile::TempDir,
    daemon: Daemon,
    client: CriClient,
    image: String,
}

impl Env {
    async fn start() -> Env {
        let registry = Registry::start().unwrap();
        let image = registry.push_busybox().await.unwrap();
        let tmp = tempfile::Builder::new()
            .prefix("arrow-cri-e2e")
            .tempdir_in("/tmp")
            .unwrap();
        let daemon = Daemon::start(tmp.path()).unwrap();
        let client = CriClient::connect(daemon.socket()).await.unwrap();
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
        Env {
            registry,
            tmp,
            daemon,
            client,
            image,
        }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().to_path_buf()
    }

    /// The lines of the pods' shim logs (`log` in each bundle) that
    /// contain `needle`, for a failure's message.
    fn shim_log_lines(&self, needle: &str) -> String {
        let mut lines = String::new();
        let mut dirs = vec![self.dir()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if kind.is_dir() {
                    dirs.push(path);
                } else if kind.is_file() && entry.file_name() == "log" {
                    let text = fs::read_to_string(&path).unwrap_or_default();
                    for l in text.lines().filter(|l| l.contains(needle)) {
                        lines.push_str(l);
                        lines.push('\n');
                    }
                }
            }
        }
        lines
    }

    /// Stops the daemon and checks that nothing is left.
    fn finish(self) {
        let dir = self.dir();
        drop(self.client);
        drop(self.daemon);
        assert_nothing_left(&dir);
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
        integration::cri::remove_cgroup_dirs(integration::cri::CGROUP_PARENT);
        drop(self.tmp);
        drop(self.registry);
    }
}

/// Runs `body` as root on a small runtime, one test at a time.
fn e2e<F: std::future::Future<Output = ()>>(body: F) {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "arrow-cri's end-to-end tests run as root"
    );
    let _boots = integration::boot_lock();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
}

async fn run() {
    let env = Env::start().await;
    let dir = env.dir();
    let image = env.image.clone();
    let Env {
        registry,
        tmp,
        mut daemon,
        client,
        ..
    } = env;

    // Version, Status, RuntimeConfig.
    let v = client.version().await.unwrap();
    assert_eq!(v.runtime_name, "arrow-cri");
    let conditions = client.status().await.unwrap();
    assert!(
        conditions["RuntimeReady"].status && conditions["NetworkReady"].status,
        "{conditions:?}"
    );

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
                &["sh", "-c", "echo bye; sleep 8; exit 5"],
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
    // Its output is in the log before the kill: what a container writes
    // while arrow-cri is down stays in the FIFO only while the container
    // runs (the shim closes its end at the exit, as containerd's runc shim
    // does), so a line written and followed by an exit in that window is
    // lost, under containerd as here.
    wait_for_log(&pod.log_file("short.log"), "bye", Duration::from_secs(60))
        .await
        .unwrap();
    daemon.kill9();
    drop(client);
    // `short` exits while nobody listens (unless reaching this point took
    // longer than its sleep: then its exit was seen live).
    tokio::time::sleep(Duration::from_secs(10)).await;
    daemon.spawn().unwrap();
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

    Env {
        registry,
        tmp,
        daemon,
        client,
        image,
    }
    .finish();
}

// ------------------------------------------------- container semantics

fn security(c: &mut cri::ContainerConfig) -> &mut cri::LinuxContainerSecurityContext {
    c.linux.as_mut().unwrap().security_context.as_mut().unwrap()
}

fn pid_mode(ns: Option<&mut cri::NamespaceOption>, mode: cri::NamespaceMode) {
    ns.expect("configs have namespace options").pid = mode as i32;
}

/// `Name:\tvalue` from a `/proc/PID/status` text.
fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

async fn exec_ok(client: &CriClient, id: &str, cmd: &[&str]) -> String {
    let out = client.exec_sync(id, cmd, 30).await.unwrap();
    assert_eq!(
        out.exit_code,
        0,
        "{cmd:?}: {}{}",
        out.stdout_text(),
        out.stderr_text()
    );
    out.stdout_text()
}

/// An HTTP/1.0 GET of `/` at `addr`; the whole answer.
fn http_get(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

async fn http_get_eventually(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match http_get(addr) {
            Ok(answer) if answer.contains("200 OK") => return answer,
            Ok(answer) => answer,
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "GET http://{addr}/: {last}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Collects GetContainerEvents until dropped.
struct EventLog {
    seen: std::sync::Arc<std::sync::Mutex<Vec<cri::ContainerEventResponse>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventLog {
    async fn subscribe(client: &CriClient) -> EventLog {
        let mut stream = client
            .runtime
            .clone()
            .get_container_events(cri::GetEventsRequest {})
            .await
            .unwrap()
            .into_inner();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(e)) = stream.message().await {
                sink.lock().unwrap().push(e);
            }
        });
        EventLog { seen, task }
    }

    /// The event types seen for `id`, in order.
    fn of(&self, id: &str) -> Vec<cri::ContainerEventType> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.container_id == id)
            .map(|e| {
                cri::ContainerEventType::try_from(e.container_event_type)
                    .expect("a known event type")
            })
            .collect()
    }

    fn find(&self, id: &str, kind: cri::ContainerEventType) -> Option<cri::ContainerEventResponse> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.container_id == id && e.container_event_type == kind as i32)
            .cloned()
    }

    async fn wait_for(
        &self,
        id: &str,
        kind: cri::ContainerEventType,
    ) -> cri::ContainerEventResponse {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self.find(id, kind) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {kind:?} event for {id}: {:?}",
                self.of(id)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[test]
fn arrow_cri_container_semantics() {
    e2e(semantics());
}

async fn semantics() {
    use cri::ContainerEventType::*;
    let env = Env::start().await;
    let (client, image, dir) = (&env.client, env.image.as_str(), env.dir());
    let events = EventLog::subscribe(client).await;

    // ---- one pod (PID mode CONTAINER, kubelet's default): a restricted
    // user, a root with one capability, and one that runs out of memory.
    let pod = client
        .run_pod_sandbox_with(pod_in(&dir, "secure"), "")
        .await
        .unwrap();
    let mut user = container_config("user", image, &["sleep", "3600"], "user.log");
    let sc = security(&mut user);
    sc.run_as_user = Some(cri::Int64Value { value: 1000 });
    sc.run_as_group = Some(cri::Int64Value { value: 2000 });
    sc.supplemental_groups = vec![3000];
    sc.readonly_rootfs = true;
    sc.no_new_privs = true;
    let user = client.create_container_with(&pod, user).await.unwrap();
    let mut caps = container_config("caps", image, &["sleep", "3601"], "caps.log");
    let sc = security(&mut caps);
    sc.capabilities = Some(cri::Capability {
        drop_capabilities: vec!["ALL".into()],
        add_capabilities: vec!["NET_BIND_SERVICE".into()],
        ..Default::default()
    });
    let caps = client.create_container_with(&pod, caps).await.unwrap();
    let mut hog = container_config(
        "hog",
        image,
        // One read(2) into a 64 MiB buffer: the charge fails inside the
        // kernel, where no page of the program itself is needed, so the
        // OOM killer comes at once rather than after the thrashing (the
        // program's text evicted and read back) that a hog running its
        // own code near the limit goes through.
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        "hog.log",
    );
    hog.linux.as_mut().unwrap().resources = Some(cri::LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let hog = client.create_container_with(&pod, hog).await.unwrap();
    for id in [&user, &caps, &hog] {
        client.start_container(id).await.unwrap();
    }

    let id = exec_ok(client, &user, &["id"]).await;
    assert!(
        id.contains("uid=1000") && id.contains("gid=2000") && id.contains("3000"),
        "{id}"
    );
    let status = exec_ok(client, &user, &["cat", "/proc/self/status"]).await;
    assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(
        status_field(&status, "CapEff"),
        "0000000000000000",
        "{status}"
    );
    let out = client
        .exec_sync(&user, &["touch", "/written"], 30)
        .await
        .unwrap();
    assert_ne!(out.exit_code, 0, "the read-only root was written");
    assert!(
        out.stderr_text().contains("Read-only file system"),
        "{}",
        out.stderr_text()
    );

    let status = exec_ok(client, &caps, &["cat", "/proc/self/status"]).await;
    // CAP_NET_BIND_SERVICE is bit 10.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(&status, set), "0000000000000400", "{set}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "0", "{status}");
    let out = client
        .exec_sync(&caps, &["hostname", "renamed"], 30)
        .await
        .unwrap();
    assert_ne!(out.exit_code, 0, "sethostname without CAP_SYS_ADMIN");
    // PID mode CONTAINER: the app is PID 1 and sees no other container.
    let one = exec_ok(client, &caps, &["cat", "/proc/1/cmdline"]).await;
    assert_eq!(one, "sleep\u{0}3601\u{0}");
    let ps = exec_ok(client, &caps, &["ps", "-o", "pid,args"]).await;
    assert!(
        !ps.contains("sleep 3600"),
        "another container's process: {ps}"
    );

    let s = wait_state(
        client,
        &hog,
        ContainerState::ContainerExited,
        Duration::from_secs(180),
    )
    .await;
    // The OOM event may follow the exit: the reason is settled within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = s;
    while s.reason != "OOMKilled" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s = state_of(client, &hog).await;
    }
    assert_eq!(
        (s.exit_code, s.reason.as_str()),
        (137, "OOMKilled"),
        "{s:?}"
    );

    // Events: the sandbox's and each container's, in order, carrying the
    // pod's and containers' state as it was.
    let stopped = events.wait_for(&hog, ContainerStoppedEvent).await;
    let mine = stopped
        .containers_statuses
        .iter()
        .find(|c| c.id == hog)
        .expect("the event lists the container");
    assert_eq!(mine.state, ContainerState::ContainerExited as i32);
    assert_eq!(
        stopped.pod_sandbox_status.as_ref().map(|p| p.id.as_str()),
        Some(pod.id.as_str())
    );
    assert_eq!(
        events.of(&hog),
        [
            ContainerCreatedEvent,
            ContainerStartedEvent,
            ContainerStoppedEvent
        ]
    );
    client.stop_pod_sandbox(&pod.id).await.unwrap();
    client.remove_pod_sandbox(&pod.id).await.unwrap();
    events.wait_for(&pod.id, ContainerDeletedEvent).await;
    assert_eq!(
        events.of(&pod.id),
        [
            ContainerCreatedEvent,
            ContainerStartedEvent,
            ContainerStoppedEvent,
            ContainerDeletedEvent
        ]
    );
    for id in [&user, &caps, &hog] {
        assert_eq!(
            events.of(id),
            [
                ContainerCreatedEvent,
                ContainerStartedEvent,
                ContainerStoppedEvent,
                ContainerDeletedEvent
            ],
            "container {id}"
        );
    }

    // ---- one pod sharing its PID namespace, a volume and a host port:
    // a web server and a client.
    let host_port = free_port();
    let mut config = pod_in(&dir, "duo");
    config.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: host_port.into(),
        host_ip: String::new(),
    }];
    pid_mode(
        config
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .namespace_options
            .as_mut(),
        cri::NamespaceMode::Pod,
    );
    let pod = client.run_pod_sandbox_with(config, "").await.unwrap();
    // An emptyDir is a directory of the node that kubelet mounts into each.
    let volume = dir.join("empty-dir");
    fs::create_dir_all(&volume).unwrap();
    let shared = |c: &mut cri::ContainerConfig| {
        c.mounts = vec![cri::Mount {
            container_path: "/shared".into(),
            host_path: volume.display().to_string(),
            ..Default::default()
        }];
        pid_mode(
            security(c).namespace_options.as_mut(),
            cri::NamespaceMode::Pod,
        );
    };
    let mut web = container_config(
        "web",
        image,
        &[
            "sh",
            "-c",
            "echo served-from-the-volume > /shared/index.html; exec httpd -f -p 8080 -h /shared",
        ],
        "web.log",
    );
    shared(&mut web);
    let mut peer = container_config("peer", image, &["sleep", "3600"], "peer.log");
    shared(&mut peer);
    let web = client.create_container_with(&pod, web).await.unwrap();
    let peer = client.create_container_with(&pod, peer).await.unwrap();
    client.start_container(&web).await.unwrap();
    client.start_container(&peer).await.unwrap();
    let pod_ip = client
        .pod_sandbox_status(&pod.id)
        .await
        .unwrap()
        .network
        .unwrap()
        .ip;

    // Over localhost, from the other container.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        let out = client
            .exec_sync(
                &peer,
                &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"],
                30,
            )
            .await
            .unwrap();
        if out.exit_code == 0 {
            break out.stdout_text();
        }
        assert!(
            Instant::now() < deadline,
            "wget over localhost: {}",
            out.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(page, "served-from-the-volume\n");
    // The volume both ways, and the node sees it too.
    exec_ok(
        client,
        &peer,
        &["sh", "-c", "echo from-peer > /shared/note"],
    )
    .await;
    assert_eq!(
        exec_ok(client, &web, &["cat", "/shared/note"]).await,
        "from-peer\n"
    );
    assert_eq!(
        fs::read_to_string(volume.join("note")).unwrap(),
        "from-peer\n"
    );
    // PID mode POD: each sees the other's processes.
    let ps = exec_ok(client, &peer, &["ps", "-o", "pid,args"]).await;
    assert!(ps.contains("httpd"), "{ps}");
    let ps = exec_ok(client, &web, &["ps", "-o", "pid,args"]).await;
    assert!(ps.contains("sleep 3600"), "{ps}");

    // From the host: the pod's IP and container port, and the host port
    // (portmap's DNAT of the node's own addresses).
    let answer = http_get_eventually(&format!("{pod_ip}:8080")).await;
    assert!(answer.ends_with("served-from-the-volume\n"), "{answer}");
    let answer = http_get_eventually(&format!("{GATEWAY}:{host_port}")).await;
    assert!(answer.ends_with("served-from-the-volume\n"), "{answer}");
    let answer = http_get_eventually(&format!("127.0.0.1:{host_port}")).await;
    assert!(answer.ends_with("served-from-the-volume\n"), "{answer}");

    client.stop_pod_sandbox(&pod.id).await.unwrap();
    client.remove_pod_sandbox(&pod.id).await.unwrap();
    assert!(
        http_get(&format!("127.0.0.1:{host_port}")).is_err(),
        "the host port still answers after the pod went"
    );
    drop(events);
    env.finish();
}

// ------------------------------------------------------------ streaming

#[test]
fn arrow_cri_streams_exec_attach_and_port_forward() {
    e2e(streaming());
}

fn script(stdin: Option<&str>, tty: bool) -> Script {
    Script {
        tty,
        stdout: true,
        stderr: !tty,
        stdin: stdin.map(|s| s.as_bytes().to_vec()),
        // As kubectl: a terminal's stdin stays open; the shell exits.
        close_stdin: stdin.is_some() && !tty,
        resize: tty.then_some((123, 45)),
        until_stdout_has: None,
    }
}

/// An attach client: sends `stdin` (then ends it if `close`; a terminal
/// sends its size first), and leaves once stdout holds `until`.
fn attach_script(tty: bool, stdin: &str, close: bool, until: &str) -> Script {
    Script {
        tty,
        stdout: true,
        stderr: !tty,
        stdin: Some(stdin.as_bytes().to_vec()),
        close_stdin: close,
        resize: tty.then_some((123, 45)),
        until_stdout_has: Some(until.to_owned()),
    }
}

/// Exec, attach and port-forward as crictl and kubelet speak them to the
/// streaming server, over SPDY/3.1 and over WebSocket, into a real pod.
async fn streaming() {
    let env = Env::start().await;
    let dir = env.dir();
    let client = env.client.clone();
    let pod = client
        .run_pod_sandbox_with(pod_in(&dir, "streams"), "")
        .await
        .unwrap();
    // The forwarded file: 256 KiB, many vsock packets. Four of them at once
    // keep the emulated guest kernel of kvm_pvm busy long enough that
    // another connection's open once waited past the runtime's 30 s with
    // 1 MiB each: an open bug, an open should not wait that long behind
    // other connections' traffic.
    let web_script =
        "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/big bs=64k count=4 2>/dev/null \
                      && echo ready && exec httpd -f -p 8080 -h /tmp/www";
    let web = client
        .create_container_with(
            &pod,
            container_config("web", &env.image, &["sh", "-c", web_script], "web.log"),
        )
        .await
        .unwrap();
    client.start_container(&web).await.unwrap();
    // 1 MiB of /dev/urandom (many frames each way) written through
    // virtio-fs: both in the guest kernel, which is emulated on kvm_pvm
    // (measured 30-40 s per MiB on a slow host).
    wait_for_log(&pod.log_file("web.log"), "ready", Duration::from_secs(300))
        .await
        .unwrap();
    let mut echo_config = container_config(
        "echo",
        &env.image,
        &[
            "sh",
            "-c",
            "while read l; do echo \"got $l\"; done; echo stdin-ended",
        ],
        "echo.log",
    );
    echo_config.stdin = true;
    let echo = client
        .create_container_with(&pod, echo_config)
        .await
        .unwrap();
    client.start_container(&echo).await.unwrap();
    // A terminal to attach to, and a stdin_once one the first attach ends.
    let mut term_config = container_config("term", &env.image, &["sh"], "term.log");
    (term_config.stdin, term_config.tty) = (true, true);
    let term = client
        .create_container_with(&pod, term_config)
        .await
        .unwrap();
    client.start_container(&term).await.unwrap();
    let mut once_config = container_config(
        "once",
        &env.image,
        &["sh", "-c", "cat; echo cat-ended"],
        "once.log",
    );
    (once_config.stdin, once_config.stdin_once) = (true, true);
    let once = client
        .create_container_with(&pod, once_config)
        .await
        .unwrap();
    client.start_container(&once).await.unwrap();

    // ---- exec: both protocols, stdout and stderr apart, exit codes.
    let cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"];
    for (protocol, spdy) in [
        ("v4.channel.k8s.io", true),
        ("v5.channel.k8s.io", false),
        ("v4.channel.k8s.io", false),
        ("v4.base64.channel.k8s.io", false),
    ] {
        let url = client
            .exec(&web, &cmd, false, false, true, true)
            .await
            .unwrap();
        let run = if spdy {
            streaming::spdy_remote_command(&url, protocol, &script(None, false)).await
        } else {
            streaming::ws_remote_command(&url, protocol, &script(None, false)).await
        }
        .unwrap();
        let how = format!("{protocol} spdy={spdy}");
        assert_eq!(run.stdout_text(), "out\n", "{how}");
        assert_eq!(run.stderr_text(), "err\n", "{how}");
        assert_eq!(run.exit_code().unwrap(), 3, "{how}");
        // The URL was good once.
        let again = if spdy {
            streaming::spdy_remote_command(&url, protocol, &script(None, false)).await
        } else {
            streaming::ws_remote_command(&url, protocol, &script(None, false)).await
        };
        assert!(again.is_err(), "{how}: a used URL served again");
    }
    // Exit 0, and stdin to the end of its stream.
    let url = client
        .exec(
            &web,
            &["sh", "-c", "tr a-z A-Z; exit 0"],
            false,
            true,
            true,
            true,
        )
        .await
        .unwrap();
    let run =
        streaming::spdy_remote_command(&url, "v4.channel.k8s.io", &script(Some("abc\n"), false))
            .await
            .unwrap();
    assert_eq!(
        (run.stdout_text().as_str(), run.exit_code().unwrap()),
        ("ABC\n", 0)
    );
    // An older protocol: only a failure's message on the error stream.
    let url = client
        .exec(&web, &["true"], false, false, true, true)
        .await
        .unwrap();
    let run = streaming::spdy_remote_command(&url, "v2.channel.k8s.io", &script(None, false))
        .await
        .unwrap();
    assert!(run.error.is_empty(), "{:?}", run.error);

    // ---- a terminal: resize seen by stty, input echoed, exit code.
    for spdy in [true, false] {
        let url = client
            .exec(&web, &["sh"], true, true, true, false)
            .await
            .unwrap();
        let input = "sleep 1; stty size; echo typed-$((6*7)); exit 4\n";
        let run = if spdy {
            streaming::spdy_remote_command(&url, "v4.channel.k8s.io", &script(Some(input), true))
                .await
        } else {
            streaming::ws_remote_command(&url, "v5.channel.k8s.io", &script(Some(input), true))
                .await
        }
        .unwrap();
        let out = run.stdout_text();
        assert!(out.contains("45 123"), "spdy={spdy}: {out:?}");
        assert!(out.contains("typed-42"), "spdy={spdy}: {out:?}");
        assert_eq!(run.exit_code().unwrap(), 4, "spdy={spdy}");
    }

    // ---- attach: the running container's output from now on and its
    // stdin, over each protocol; a client that leaves (its stdin not
    // ended: not stdin_once anyway) leaves the container running.
    for (n, spdy) in [(1, false), (2, true)] {
        let url = client.attach(&echo, false, true).await.unwrap();
        let line = format!("line-{n}");
        let attach = attach_script(false, &format!("{line}\n"), false, &format!("got {line}"));
        let run = tokio::time::timeout(Duration::from_secs(120), async {
            if spdy {
                streaming::spdy_remote_command(&url, "v4.channel.k8s.io", &attach).await
            } else {
                streaming::ws_remote_command(&url, "v5.channel.k8s.io", &attach).await
            }
        })
        .await
        .unwrap_or_else(|_| panic!("attach {n} (spdy={spdy}): no \"got {line}\" in 120 s"))
        .unwrap();
        assert!(
            run.stdout_text().contains(&format!("got {line}")),
            "spdy={spdy}: {:?}",
            run.stdout_text()
        );
        let state = state_of(&client, &echo).await.state;
        assert_eq!(state, cri::ContainerState::ContainerRunning as i32);
    }
    // Both lines are in the container's log too.
    wait_for_log(
        &pod.log_file("echo.log"),
        "got line-2",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    // A terminal: the client's size reaches the container's tty.
    let url = client.attach(&term, true, true).await.unwrap();
    let attach = attach_script(true, "sleep 1; stty size\n", false, "45 123");
    let run = tokio::time::timeout(
        Duration::from_secs(120),
        streaming::spdy_remote_command(&url, "v4.channel.k8s.io", &attach),
    )
    .await
    .expect("tty attach: no \"45 123\" in 120 s")
    .unwrap();
    assert!(
        run.stdout_text().contains("45 123"),
        "{:?}",
        run.stdout_text()
    );
    // stdin_once: the client's end of stdin is the container's.
    let url = client.attach(&once, false, true).await.unwrap();
    let attach = attach_script(false, "only\n", true, "cat-ended");
    let run = tokio::time::timeout(
        Duration::from_secs(120),
        streaming::ws_remote_command(&url, "v5.channel.k8s.io", &attach),
    )
    .await
    .expect("stdin_once attach: no \"cat-ended\" in 120 s")
    .unwrap();
    assert_eq!(run.stdout_text(), "only\ncat-ended\n");
    let status = wait_state(
        &client,
        &once,
        ContainerState::ContainerExited,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(status.exit_code, 0);

    // ---- port-forward over SPDY: parallel connections, a large file
    // intact, a closed port reported.
    let sha = exec_ok(&client, &web, &["sha256sum", "/tmp/www/big"]).await;
    let want = sha.split_whitespace().next().unwrap().to_string();
    let url = client.port_forward(&pod.id, &[8080]).await.unwrap();
    let get = b"GET /big HTTP/1.0\r\n\r\n".to_vec();
    let mut conns: Vec<(u16, Vec<u8>)> = (0..4).map(|_| (8080, get.clone())).collect();
    conns.push((9, get.clone()));
    let got = streaming::spdy_port_forward(&url, &conns).await.unwrap();
    for f in &got[..4] {
        let body = f.http_body().unwrap_or_else(|| {
            let all: Vec<_> = got
                .iter()
                .map(|f| (f.data.len(), f.error.as_str()))
                .collect();
            panic!(
                "no HTTP answer: (bytes, error) of each: {all:?}; the shim said:\n{}",
                env.shim_log_lines("port-forward")
            )
        });
        assert_eq!(body.len(), BIG_FILE, "{}", f.error);
        let sum: String = Sha256::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(sum, want);
    }
    assert!(got[4].data.is_empty(), "port 9 answered");
    assert!(got[4].error.contains("port 9"), "{:?}", got[4].error);
    // ... and over WebSocket (one connection per port).
    let url = client.port_forward(&pod.id, &[8080]).await.unwrap();
    let f = tokio::task::spawn_blocking(move || {
        integration::portforward::forward_once(&url, 8080, &get, Duration::from_secs(60))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        f.http_body().map(<[u8]>::len),
        Some(BIG_FILE),
        "{}",
        f.error
    );

    client.stop_pod_sandbox(&pod.id).await.unwrap();
    client.remove_pod_sandbox(&pod.id).await.unwrap();
    env.finish();
}

/// The size of the streams test's forwarded file.
const BIG_FILE: usize = 256 << 10;

// ------------------------------------------------------------ 50 cycles

/// What a pod could leave behind, counted on the whole host (and in the
/// daemon), so a leak shows as a difference.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Footprint {
    shims: usize,
    vmms: usize,
    mounts: usize,
    netns: usize,
    links: usize,
    taps: usize,
    unix_sockets: usize,
    shim_sockets: usize,
    run_arrow: usize,
    daemon_fds: usize,
    daemon_children: usize,
}

fn count_lines(cmd: &[&str]) -> usize {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn footprint(daemon: &Daemon) -> Footprint {
    let pid = daemon.pid();
    let entries = |p: String| fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    let daemon_children = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                .is_some_and(|ppid| ppid == pid)
        })
        .count();
    Footprint {
        shims: processes("-namespace arrow-cri ").len(),
        vmms: processes("arrow-vmm").len(),
        mounts: fs::read_to_string("/proc/1/mountinfo")
            .unwrap()
            .lines()
            .count(),
        netns: entries("/run/netns".into()),
        links: count_lines(&["ip", "-o", "link", "show"]),
        taps: count_lines(&["ip", "-o", "link", "show", "type", "tun"]),
        // Bound sockets of arrow's (other programs' come and go).
        unix_sockets: fs::read_to_string("/proc/net/unix")
            .unwrap()
            .lines()
            .filter(|l| l.contains("arrow") || l.contains("/run/containerd/s/"))
            .count(),
        shim_sockets: entries("/run/containerd/s".into()),
        run_arrow: entries("/run/arrow/arrow-cri".into()),
        daemon_fds: entries(format!("/proc/{pid}/fd")),
        daemon_children,
    }
}

// Found by this test first: every pod left its shim's socket file in
// /run/containerd/s (50 cycles: 264 -> 314 entries).
#[test]
fn arrow_cri_pod_cycles_leave_nothing() {
    e2e(cycles(integration::pod_cycles(10)));
}

async fn cycles(n: usize) {
    let env = Env::start().await;
    let (client, image, dir) = (&env.client, env.image.as_str(), env.dir());
    let cycle = |i: usize| {
        let dir = dir.clone();
        async move {
            let name = format!("cycle-{i}");
            let pod = client
                .run_pod_sandbox_with(pod_in(&dir, &name), "")
                .await
                .unwrap();
            let c = client
                .create_container_with(
                    &pod,
                    container_config(
                        "app",
                        image,
                        &["sh", "-c", "echo up; sleep 3600"],
                        "app.log",
                    ),
                )
                .await
                .unwrap();
            client.start_container(&c).await.unwrap();
            wait_for_log(&pod.log_file("app.log"), "up", Duration::from_secs(60))
                .await
                .unwrap();
            client.stop_pod_sandbox(&pod.id).await.unwrap();
            client.remove_pod_sandbox(&pod.id).await.unwrap();
            let _ = fs::remove_dir_all(pod.log_directory());
        }
    };
    // The first pod may boot the template and make the bridge: not counted.
    cycle(0).await;
    let before = footprint(&env.daemon);
    let begun = Instant::now();
    for i in 1..=n {
        cycle(i).await;
    }
    let took = begun.elapsed();
    // Let the shims' last exits and the daemon's tasks settle.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = footprint(&env.daemon);
    while after != before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = footprint(&env.daemon);
    }
    eprintln!(
        "arrow-cri: {n} pod cycles (runp, create, start, first line, stopp, rmp) in {:.1} s ({:.0} ms each)",
        took.as_secs_f64(),
        ms(took) / n as f64
    );
    eprintln!("before: {before:?}\nafter:  {after:?}");
    assert_eq!(before, after, "{n} pod cycles left something behind");
    assert!(client.list_pod_sandboxes().await.unwrap().is_empty());
    env.finish();
}
