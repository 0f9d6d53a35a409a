//! The pod runtime end to end without KVM or containerd: `PodRuntime` runs
//! pods whose VMM is `arrow-test-vmm` (`tests/support/test_vmm.rs`: the
//! real agent, arrow-init, on the host in its `--listen-unix` mode, behind
//! the VMM's control channel and hybrid vsock socket). Everything else is
//! the product's: the pod's state directory and share, the container's
//! root bound into it, the agent protocol, stdio, exits, events, errors.
//!
//! Needs root (mounts, namespaces, cgroups), a static busybox and
//! arrow-init built beside arrow-test-vmm (`cargo build --release
//! --workspace` or `cargo test --workspace`); each test says why it skips
//! otherwise.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow_runtime::error::ErrorKind;
use arrow_runtime::events::PodEvent;
use arrow_runtime::exits::OwnChildren;
use arrow_runtime::pod::{CreateRequest, ExecRequest, PodRuntime};
use arrow_runtime::process::{ProcessState, StdioPaths};
use arrow_runtime::vm::PodDir;
use tokio::sync::mpsc;

const BUSYBOX: &str = "/bin/busybox";
const TEST_VMM: &str = env!("CARGO_BIN_EXE_arrow-test-vmm");
/// How long a step may take before the test gives up on it.
const STEP: Duration = Duration::from_secs(30);

/// Why this host cannot run the tests, if it cannot.
fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("not root (mounts, namespaces and cgroups need it)".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("no {BUSYBOX} (Debian's busybox-static)"));
    }
    let init = Path::new(TEST_VMM).with_file_name("arrow-init");
    if std::env::var_os("ARROW_INIT_BIN").is_none() && !init.exists() {
        return Some(format!(
            "no {} (cargo build --release -p guest-init) nor $ARROW_INIT_BIN",
            init.display()
        ));
    }
    None
}

macro_rules! skip_unless_able {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// A pod runtime in a namespace of its own, its events, and a directory
/// for bundles and outputs.
struct Fixture {
    runtime: PodRuntime,
    events: mpsc::UnboundedReceiver<PodEvent>,
    namespace: String,
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let namespace = format!("arrow-runtime-test-{tag}-{}", std::process::id());
        let (tx, events) = mpsc::unbounded_channel();
        let runtime =
            PodRuntime::new(&namespace, tx, Arc::new(OwnChildren)).with_vmm(TEST_VMM.into());
        Fixture {
            runtime,
            events,
            namespace,
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    /// A bundle: `config.json` from `spec`, and a busybox root.
    fn bundle(&self, name: &str, spec: serde_json::Value) -> String {
        let bundle = self.tmp.path().join(name);
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        for applet in ["sh", "echo", "sleep", "cat"] {
            symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        bundle.display().to_string()
    }

    fn sandbox(&self, id: &str) -> CreateRequest {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": { "args": ["/pause"], "cwd": "/", "user": { "uid": 0, "gid": 0 } },
            "root": { "path": "rootfs" },
            "hostname": "pod",
            "annotations": {
                "io.kubernetes.cri.container-type": "sandbox",
                "io.kubernetes.cri.sandbox-id": id
            },
            "linux": { "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" },
                                      { "type": "mount" }, { "type": "network" }] }
        });
        CreateRequest {
            id: id.into(),
            bundle: self.bundle(id, spec),
            ..Default::default()
        }
    }

    /// An app container of `sandbox` running `script`, its stdout and
    /// stderr in files.
    fn app(&self, sandbox: &str, id: &str, script: &str) -> (CreateRequest, PathBuf) {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "args": ["/bin/sh", "-c", script],
                "env": ["PATH=/bin"],
                "cwd": "/",
                "user": { "uid": 0, "gid": 0 }
            },
            "root": { "path": "rootfs" },
            "mounts": [{ "destination": "/proc", "type": "proc", "source": "proc" }],
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": sandbox
            },
            "linux": { "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" },
                                      { "type": "mount" }, { "type": "network" }] }
        });
        let out = self.tmp.path().join(format!("{id}.out"));
        let request = CreateRequest {
            id: id.into(),
            bundle: self.bundle(id, spec),
            rootfs: Vec::new(),
            stdio: StdioPaths {
                stdout: format!("file://{}", out.display()),
                stderr: format!("file://{}", out.display()),
                ..Default::default()
            },
        };
        (request, out)
    }

    /// The next event.
    async fn event(&mut self) -> PodEvent {
        tokio::time::timeout(STEP, self.events.recv())
            .await
            .expect("an event within the step's time")
            .expect("the runtime is alive")
    }

    /// Skips events until one `matches`; returns it.
    async fn event_where(&mut self, matches: impl Fn(&PodEvent) -> bool) -> PodEvent {
        loop {
            let event = self.event().await;
            if matches(&event) {
                return event;
            }
        }
    }

    fn pod_dir(&self, pod: &str) -> PathBuf {
        PodDir::new(&self.namespace, pod)
            .unwrap()
            .root()
            .to_path_buf()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(Path::new("/run/arrow").join(&self.namespace));
    }
}

async fn step<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took more than {STEP:?}"))
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A pod's life through the runtime: the sandbox starts the "VM", an app
/// container runs and writes, an exec runs and exits with its code, the
/// app is killed, everything is deleted; the events say each step once,
/// in order, and nothing is left: no VMM, no pod directory, no mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_containers_and_execs_and_leaves_nothing() {
    skip_unless_able!();
    let mut fx = Fixture::new("life");
    let rt = fx.runtime.clone();

    let vmm_pid = step("create sandbox", rt.create(fx.sandbox("pod1")))
        .await
        .unwrap();
    assert!(alive(vmm_pid), "the sandbox's pid is the VMM's");
    assert!(matches!(fx.event().await, PodEvent::Created { pid, .. } if pid == vmm_pid));
    assert_eq!(
        step("start sandbox", rt.start("pod1", "")).await.unwrap(),
        vmm_pid
    );
    assert_eq!(
        fx.event().await,
        PodEvent::Started {
            container_id: "pod1".into(),
            pid: vmm_pid
        }
    );

    let (app, app_out) = fx.app("pod1", "app", "echo started; exec sleep 600");
    assert_eq!(
        step("create app", rt.create(app)).await.unwrap(),
        0,
        "no pid before start"
    );
    assert_eq!(
        rt.state("app", "").await.unwrap().state,
        ProcessState::Created
    );
    assert_eq!(
        step("start app", rt.start("app", "")).await.unwrap(),
        vmm_pid
    );
    fx.event_where(
        |e| matches!(e, PodEvent::Started { container_id, .. } if container_id == "app"),
    )
    .await;
    assert_eq!(
        rt.state("app", "").await.unwrap().state,
        ProcessState::Running
    );

    // An exec: its output and exit code.
    let exec_out = fx.tmp.path().join("exec.out");
    let exec = ExecRequest {
        container_id: "app".into(),
        exec_id: "e1".into(),
        process_json: serde_json::to_vec(&serde_json::json!({
            "args": ["/bin/sh", "-c", "echo from exec; exit 7"],
            "env": ["PATH=/bin"],
            "cwd": "/",
            "user": { "uid": 0, "gid": 0 }
        }))
        .unwrap(),
        stdio: StdioPaths {
            stdout: format!("file://{}", exec_out.display()),
            ..Default::default()
        },
    };
    step("exec", rt.exec(exec)).await.unwrap();
    step("start exec", rt.start("app", "e1")).await.unwrap();
    let exit = step("wait exec", rt.wait("app", "e1")).await.unwrap();
    assert_eq!(exit.status, 7);
    assert_eq!(std::fs::read_to_string(&exec_out).unwrap(), "from exec\n");
    let exited = fx
        .event_where(|e| matches!(e, PodEvent::Exited { id, .. } if id == "e1"))
        .await;
    assert!(matches!(exited, PodEvent::Exited { exit, .. } if exit.status == 7));
    let deleted = step("delete exec", rt.delete("app", "e1")).await.unwrap();
    assert_eq!(deleted.exit.map(|e| e.status), Some(7));
    assert_eq!(
        rt.state("app", "e1").await.unwrap_err().kind,
        ErrorKind::NotFound
    );

    // What each kind of bad request gets.
    assert_eq!(
        rt.delete("app", "").await.unwrap_err().kind,
        ErrorKind::FailedPrecondition,
        "a running container is not deleted"
    );
    assert_eq!(
        rt.start("app", "").await.unwrap_err().kind,
        ErrorKind::FailedPrecondition,
        "started twice"
    );
    assert_eq!(
        rt.pause("pod1").await.unwrap_err().kind,
        ErrorKind::Unimplemented
    );
    assert_eq!(
        rt.create(fx.sandbox("pod2")).await.unwrap_err().kind,
        ErrorKind::AlreadyExists,
        "one VM per runtime"
    );
    assert_eq!(
        rt.kill("app", "", 65, false).await.unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        rt.wait("nope", "").await.unwrap_err().kind,
        ErrorKind::NotFound
    );

    // The app's stats come from the agent.
    let stats = step("stats", rt.stats("app")).await.unwrap();
    assert_eq!(stats.len(), 1);

    step("kill app", rt.kill("app", "", libc::SIGKILL as u32, false))
        .await
        .unwrap();
    let exit = step("wait app", rt.wait("app", "")).await.unwrap();
    assert_eq!(exit.status, 128 + libc::SIGKILL as u32);
    assert_eq!(std::fs::read_to_string(&app_out).unwrap(), "started\n");
    step("delete app", rt.delete("app", "")).await.unwrap();
    fx.event_where(
        |e| matches!(e, PodEvent::Deleted { container_id, .. } if container_id == "app"),
    )
    .await;

    // Killing the sandbox stops the VM; its exit says the signal.
    step(
        "kill sandbox",
        rt.kill("pod1", "", libc::SIGTERM as u32, false),
    )
    .await
    .unwrap();
    let exit = step("wait sandbox", rt.wait("pod1", "")).await.unwrap();
    assert_eq!(exit.status, 128 + libc::SIGTERM as u32);
    step("delete sandbox", rt.delete("pod1", "")).await.unwrap();
    fx.event_where(
        |e| matches!(e, PodEvent::Deleted { container_id, .. } if container_id == "pod1"),
    )
    .await;
    assert!(!alive(vmm_pid), "the VMM outlived its pod");
    let dir = fx.pod_dir("pod1");
    assert!(!dir.exists(), "{} left behind", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&fx.namespace), "mounts left: {mounts}");
    assert!(rt.shutdown().await, "an empty pod may shut down");
}

/// A VMM that dies takes the pod's processes with it: each gets one exit
/// (137), the sandbox the VMM's own status, and the pod can still be
/// deleted, leaving nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_vmm_ends_every_process_and_the_pod_is_still_deleted() {
    skip_unless_able!();
    let mut fx = Fixture::new("crash");
    let rt = fx.runtime.clone();
    let vmm_pid = step("create sandbox", rt.create(fx.sandbox("pod1")))
        .await
        .unwrap();
    step("start sandbox", rt.start("pod1", "")).await.unwrap();
    let (app, _) = fx.app("pod1", "app", "exec sleep 600");
    step("create app", rt.create(app)).await.unwrap();
    step("start app", rt.start("app", "")).await.unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let app_exit = step("wait app", rt.wait("app", "")).await.unwrap();
    assert_eq!(app_exit.status, 137);
    let sandbox_exit = step("wait sandbox", rt.wait("pod1", "")).await.unwrap();
    assert_eq!(sandbox_exit.status, 128 + libc::SIGKILL as u32);
    let mut exits = Vec::new();
    while exits.len() < 2 {
        if let PodEvent::Exited { id, .. } = fx.event().await {
            exits.push(id);
        }
    }
    exits.sort();
    assert_eq!(exits, ["app", "pod1"], "one exit each");

    assert_eq!(
        rt.exec(ExecRequest {
            container_id: "app".into(),
            exec_id: "late".into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .kind,
        ErrorKind::FailedPrecondition
    );
    step("delete app", rt.delete("app", "")).await.unwrap();
    step("delete sandbox", rt.delete("pod1", "")).await.unwrap();
    assert!(!fx.pod_dir("pod1").exists());
}

/// A create that cannot work says why, with the kind a front door maps to
/// its own code, and leaves nothing.
#[tokio::test]
async fn bad_creates_are_refused_with_their_kind() {
    skip_unless_able!();
    let fx = Fixture::new("bad");
    let rt = fx.runtime.clone();
    let missing = CreateRequest {
        id: "c".into(),
        bundle: fx.tmp.path().join("none").display().to_string(),
        ..Default::default()
    };
    let err = rt.create(missing).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(err.message.contains("config.json"), "{err}");

    let (orphan, _) = fx.app("no-such-pod", "app", "true");
    let err = rt.create(orphan).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::FailedPrecondition);
    assert!(err.message.contains("no-such-pod"), "{err}");

    let mut bad_id = fx.sandbox("pod1");
    bad_id.id = "../escape".into();
    assert_eq!(
        rt.create(bad_id).await.unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    assert!(!fx.pod_dir("pod1").exists());
}
