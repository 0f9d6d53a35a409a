//! Inside the VM, containers behave as runc's do (issue 19): each check runs
//! through containerd's CRI plugin with handler `runc`, then `arrow`, on the
//! same pod and container configs. Seccomp profiles (runtime default,
//! localhost, ignored when privileged), pod sysctls, ExecSync timeouts, PID
//! namespaces (CONTAINER: the app is PID 1; POD: containers see each other),
//! and host namespaces (refused by Arrow, naming the field). Needs root and
//! KVM; skipped with a message otherwise.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use integration::containerd::{skip_unless_root, Containerd, BUSYBOX_IMAGE};
use integration::cri::{container_config, pod_config, unique_name, CriClient, Pod};
use proto::cri;

/// One pod VM at a time: two cores do not run more guests usefully.
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

/// A localhost profile: everything allowed but mkdir (EPERM).
const LOCAL_PROFILE: &str = r#"{
    "defaultAction": "SCMP_ACT_ALLOW",
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
}"#;

const LONG_RUNNING: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait"];

fn seccomp(kind: cri::security_profile::ProfileType, path: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: kind as i32,
        localhost_ref: path.to_string(),
    })
}

/// A long-running busybox container with `profile` (and maybe privileged).
fn config(
    name: &str,
    profile: Option<cri::SecurityProfile>,
    privileged: bool,
) -> cri::ContainerConfig {
    let mut c = container_config(name, BUSYBOX_IMAGE, LONG_RUNNING, &format!("{name}/0.log"));
    let sc = c
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("container_config has a security context");
    sc.seccomp = profile;
    sc.privileged = privileged;
    c
}

async fn start(cri: &CriClient, pod: &Pod, c: cri::ContainerConfig) -> String {
    let id = cri
        .create_container_with(pod, c)
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", pod.handler));
    cri.start_container(&id).await.unwrap();
    id
}

/// Runs `cmd`; (exit code, stdout + stderr).
async fn exec(cri: &CriClient, id: &str, cmd: &[&str]) -> (i32, String) {
    let out = cri
        .exec_sync(id, cmd, 30)
        .await
        .unwrap_or_else(|e| panic!("exec {cmd:?}: {e:#}"));
    (out.exit_code, out.stdout_text() + &out.stderr_text())
}

#[test]
fn seccomp_sysctls_and_exec_timeouts_match_runc() {
    if skip_unless_root("seccomp_sysctls_and_exec_timeouts_match_runc") {
        return;
    }
    let _serial = serial();
    let profile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(profile.path(), LOCAL_PROFILE).unwrap();
    let profile = profile.path().to_str().unwrap().to_string();
    block_on(async {
        for handler in ["runc", "arrow"] {
            let t0 = Instant::now();
            one_pod(handler, &profile).await;
            eprintln!("{handler}: checks done in {:?}", t0.elapsed());
        }
    });
}

async fn one_pod(handler: &str, profile: &str) {
    use cri::security_profile::ProfileType;
    let containerd = Containerd::shared();
    let cri = containerd.cri().await.unwrap();
    let mut pc = pod_config(&unique_name(&format!("semantics-{handler}")));
    let linux = pc.linux.as_mut().expect("pod_config has linux");
    linux.sysctls = HashMap::from([
        ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
        ("fs.mqueue.msg_max".to_string(), "100".to_string()),
    ]);
    if let Some(sc) = linux.security_context.as_mut() {
        sc.privileged = true;
    }
    let pod = cri
        .run_pod_sandbox_with(pc, handler)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log_tail(30)));

    let default = start(
        &cri,
        &pod,
        config("default", seccomp(ProfileType::RuntimeDefault, ""), false),
    )
    .await;
    let local = start(
        &cri,
        &pod,
        config("local", seccomp(ProfileType::Localhost, profile), false),
    )
    .await;
    let privileged = start(
        &cri,
        &pod,
        config("privileged", seccomp(ProfileType::Localhost, profile), true),
    )
    .await;

    // Pod sysctls, seen from an app container.
    for (file, want) in [
        ("/proc/sys/kernel/shm_rmid_forced", "1"),
        ("/proc/sys/fs/mqueue/msg_max", "100"),
    ] {
        let (code, out) = exec(&cri, &default, &["cat", file]).await;
        assert_eq!((code, out.trim()), (0, want), "{handler}: {file}");
    }

    // A filter is on the init and the execs of confined containers only.
    for (id, want) in [(&default, "2"), (&local, "2"), (&privileged, "0")] {
        let (_, status) = exec(&cri, id, &["grep", "^Seccomp:", "/proc/self/status"]).await;
        let mode = status
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        assert_eq!(mode, want, "{handler}: {id}: {status}");
    }
    // The runtime default profile blocks unshare(2) without CAP_SYS_ADMIN.
    let (code, out) = exec(&cri, &default, &["unshare", "-U", "true"]).await;
    assert_ne!(code, 0, "{handler}: unshare allowed under RuntimeDefault");
    assert!(out.contains("Operation not permitted"), "{handler}: {out}");
    // The localhost profile blocks mkdir, in an exec as in the init.
    let (code, out) = exec(&cri, &local, &["mkdir", "/tmp/blocked"]).await;
    assert_ne!(code, 0, "{handler}: mkdir allowed by the localhost profile");
    assert!(out.contains("Operation not permitted"), "{handler}: {out}");
    assert_eq!(exec(&cri, &local, &["true"]).await.0, 0, "{handler}");
    // A privileged container is unconfined, whatever its profile says.
    let (code, out) = exec(&cri, &privileged, &["mkdir", "/tmp/allowed"]).await;
    assert_eq!(code, 0, "{handler}: privileged mkdir: {out}");

    // An ExecSync past its timeout fails and leaves no process behind.
    // Arrow also kills what the exec started in its process group (checked
    // for arrow only: runc's kill targets the exec's process).
    let cases: &[(&[&str], &str)] = if handler == "arrow" {
        &[
            (&["sleep", "4321"], "sleep 4321"),
            (&["sh", "-c", "sleep 4322 & sleep 4323"], "sleep 432"),
        ]
    } else {
        &[(&["sleep", "4321"], "sleep 4321")]
    };
    for (cmd, needle) in cases {
        let t0 = Instant::now();
        let timed_out = cri.exec_sync(&default, cmd, 1).await;
        assert!(timed_out.is_err(), "{handler}: {timed_out:?}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{handler}");
        let mut left = String::new();
        for _ in 0..50 {
            let (_, ps) = exec(&cri, &default, &["ps", "-o", "pid,args"]).await;
            left = ps
                .lines()
                .filter(|l| l.contains(needle))
                .collect::<Vec<_>>()
                .join("\n");
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            left.is_empty(),
            "{handler}: {cmd:?} outlived its timeout: {left}"
        );
    }

    for id in [&default, &local, &privileged] {
        cri.stop_container(id, 5).await.unwrap();
        cri.remove_container(id).await.unwrap();
    }
    cri.remove_pod(&pod).await.unwrap();
}

/// A container running a `sleep` of `seconds`, the mark `ps` finds.
fn sleeper(name: &str, seconds: u32) -> cri::ContainerConfig {
    let script = format!("trap 'exit 0' TERM; sleep {seconds} & wait");
    container_config(
        name,
        BUSYBOX_IMAGE,
        &["sh", "-c", &script],
        &format!("{name}/0.log"),
    )
}

/// Sets the PID namespace mode of a pod or container config.
fn pid_mode(ns: Option<&mut cri::NamespaceOption>, mode: cri::NamespaceMode) {
    ns.expect("configs have namespace options").pid = mode as i32;
}

/// PID mode CONTAINER (kubelet's default): the app is PID 1 of its own
/// namespace and sees no other container's processes; POD
/// (shareProcessNamespace): each container sees the others'. Under runc
/// and Arrow alike (Arrow's pod namespace has arrow-init as PID 1 where
/// runc's has pause, so PID 1 is not compared in POD mode).
#[test]
fn pid_namespaces_match_runc() {
    if skip_unless_root("pid_namespaces_match_runc") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let containerd = Containerd::shared();
        let cri = containerd.cri().await.unwrap();
        for handler in ["runc", "arrow"] {
            for mode in [cri::NamespaceMode::Container, cri::NamespaceMode::Pod] {
                let t0 = Instant::now();
                let mut pc = pod_config(&unique_name(&format!("pidns-{handler}")));
                pid_mode(
                    pc.linux
                        .as_mut()
                        .and_then(|l| l.security_context.as_mut())
                        .and_then(|s| s.namespace_options.as_mut()),
                    mode,
                );
                let pod = cri
                    .run_pod_sandbox_with(pc, handler)
                    .await
                    .unwrap_or_else(|e| panic!("{e:#}\n{}", containerd.log_tail(30)));
                let mut ids = Vec::new();
                for (name, seconds) in [("first", 601), ("second", 777)] {
                    let mut c = sleeper(name, seconds);
                    pid_mode(
                        c.linux
                            .as_mut()
                            .and_then(|l| l.security_context.as_mut())
                            .and_then(|s| s.namespace_options.as_mut()),
                        mode,
                    );
                    ids.push(start(&cri, &pod, c).await);
                }
                let (code, ps) = exec(&cri, &ids[0], &["ps", "-o", "pid,args"]).await;
                assert_eq!(code, 0, "{handler} {mode:?}: {ps}");
                let (_, init) = exec(&cri, &ids[0], &["cat", "/proc/1/cmdline"]).await;
                let init = init.replace('\0', " ");
                let (_, me) = exec(&cri, &ids[0], &["sh", "-c", "echo $$"]).await;
                match mode {
                    cri::NamespaceMode::Container => {
                        assert!(
                            init.starts_with("sh -c trap 'exit 0' TERM; sleep 601 & wait"),
                            "{handler}: PID 1 is {init:?}"
                        );
                        assert!(ps.contains("sleep 601"), "{handler}: {ps}");
                        assert!(!ps.contains("sleep 777"), "{handler}: {ps}");
                        assert_ne!(me.trim(), "1", "{handler}: an exec is PID 1");
                    }
                    _ => {
                        assert!(ps.contains("sleep 601"), "{handler}: {ps}");
                        assert!(ps.contains("sleep 777"), "{handler}: {ps}");
                        assert!(
                            !init.contains("sleep 601"),
                            "{handler}: PID 1 in POD mode is {init:?}"
                        );
                    }
                }
                for id in &ids {
                    cri.stop_container(id, 5).await.unwrap();
                    cri.remove_container(id).await.unwrap();
                }
                cri.remove_pod(&pod).await.unwrap();
                eprintln!("{handler} {mode:?}: checks done in {:?}", t0.elapsed());
            }
        }
    });
}

/// hostNetwork, hostPID and hostIPC run under runc; Arrow refuses each
/// (a VM has its own kernel), naming the field.
#[test]
fn host_namespaces_are_refused_naming_the_field() {
    if skip_unless_root("host_namespaces_are_refused_naming_the_field") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let containerd = Containerd::shared();
        let cri = containerd.cri().await.unwrap();
        type Set = fn(&mut cri::NamespaceOption);
        let cases: [(&str, Set); 3] = [
            ("hostNetwork", |n| {
                n.network = cri::NamespaceMode::Node as i32
            }),
            ("hostPID", |n| n.pid = cri::NamespaceMode::Node as i32),
            ("hostIPC", |n| n.ipc = cri::NamespaceMode::Node as i32),
        ];
        for (field, set) in cases {
            for handler in ["runc", "arrow"] {
                let mut pc = pod_config(&unique_name("host-ns"));
                let ns = pc
                    .linux
                    .as_mut()
                    .and_then(|l| l.security_context.as_mut())
                    .and_then(|s| s.namespace_options.as_mut())
                    .expect("pod_config has namespace options");
                set(ns);
                if field == "hostNetwork" {
                    // The node's: no UTS namespace to name.
                    pc.hostname.clear();
                }
                let run = cri.run_pod_sandbox_with(pc, handler).await;
                match (handler, run) {
                    ("runc", Ok(pod)) => cri.remove_pod(&pod).await.unwrap(),
                    ("arrow", Err(e)) => {
                        let e = format!("{e:#}");
                        assert!(e.contains(&format!("{field}: ")), "{field}: {e}");
                        assert!(e.contains("RuntimeClass"), "{e}");
                    }
                    (h, Ok(pod)) => {
                        cri.remove_pod(&pod).await.unwrap();
                        panic!("{h}: a {field} pod started");
                    }
                    (h, Err(e)) => panic!("{h}: {field}: {e:#}"),
                }
            }
        }
    });
}
