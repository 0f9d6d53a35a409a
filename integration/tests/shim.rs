//! The shim end to end: Debian's containerd (hack/containerd.sh) runs
//! containers and pods with runtime `io.containerd.arrow.v1` / handler
//! `arrow`, through `ctr` and through its CRI plugin, with runc as the
//! control for output, exit codes and kill statuses. Needs root and KVM;
//! skipped with a message otherwise.
//!
//! Every guest system call is slow on nested KVM, so the tests run one at a
//! time (a pod VM per test) and check behaviour, never timing.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use integration::containerd::{skip_unless_root, Containerd, CtrOutput, BUSYBOX_IMAGE};
use integration::cri::{container_config, log_text, read_cri_log, unique_name, ContainerState};
use k8s_cri::v1 as cri;

const ARROW: &str = "io.containerd.arrow.v1";
const RUNC: &str = "io.containerd.runc.v2";

/// One pod VM at a time: two cores do not run more guests usefully.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs a test body on its own runtime, inside the caller's [`serial`] lock.
fn block_on<F: std::future::Future<Output = ()>>(body: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body);
}

fn ctr_run(c: &Containerd, runtime: &str, extra: &[&str], cmd: &[&str]) -> CtrOutput {
    let id = unique_name("ctr");
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    args.extend_from_slice(extra);
    args.push(BUSYBOX_IMAGE);
    args.push(&id);
    args.extend_from_slice(cmd);
    c.ctr(&args)
}

/// What the host must not keep once no arrow container runs.
fn assert_nothing_left() {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains("/run/arrow/"))
        .collect();
    assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
    let mut vmms = Vec::new();
    let mut shims = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("arrow-vmm serve") && cmdline.contains("/run/arrow/") {
            vmms.push(cmdline.clone());
        }
        if cmdline.starts_with("containerd-shim-arrow-v1")
            || cmdline.contains("/containerd-shim-arrow-v1 ")
        {
            shims.push(cmdline);
        }
    }
    assert!(vmms.is_empty(), "VMMs left: {vmms:#?}");
    assert!(shims.is_empty(), "shims left: {shims:#?}");
    for ns in ["default", "k8s.io"] {
        let dir = Path::new("/run/arrow").join(ns);
        let left: Vec<_> = fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "state left in {}: {left:?}", dir.display());
    }
}

/// Takes the one-test-at-a-time lock and removes whatever an earlier test
/// that failed midway left behind (its CRI pods, its `ctr` containers), so
/// one failure is reported once instead of as leftovers by every later test.
fn exclusive(c: &Containerd) -> MutexGuard<'static, ()> {
    let guard = serial();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let cri = c.cri().await.unwrap();
            let removed = cri.remove_test_pods().await.unwrap();
            if removed > 0 {
                eprintln!("removed {removed} pods an earlier test left");
            }
        });
    let listed = c.ctr(&["containers", "ls", "-q"]).check().unwrap();
    for id in listed.lines().filter(|l| !l.is_empty()) {
        eprintln!("removing container {id} an earlier test left");
        let _ = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = c.ctr(&["task", "delete", "-f", id]);
        let _ = c.ctr(&["containers", "delete", id]);
    }
    settle_then_assert_nothing_left();
    guard
}

/// Waits (bounded) for shims and VMMs of finished containers to go away:
/// containerd shuts shims down asynchronously after delete.
fn settle_then_assert_nothing_left() {
    for _ in 0..100 {
        if std::panic::catch_unwind(assert_nothing_left).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_nothing_left();
}

#[test]
fn ctr_run_output_and_exit_codes_match_runc() {
    if skip_unless_root("ctr_run_output_and_exit_codes_match_runc") {
        return;
    }
    let c = Containerd::shared();
    let _serial = exclusive(c);
    let cases: &[&[&str]] = &[
        &["sh", "-c", "echo hello; echo oops >&2; exit 3"],
        &["sh", "-c", "sleep 30 & kill -9 $!; wait $!; echo status $?"],
        &[
            "sh",
            "-c",
            "sleep 30 & kill -TERM $!; wait $!; echo status $?",
        ],
        &["false"],
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done",
        ],
    ];
    for cmd in cases {
        let arrow = ctr_run(c, ARROW, &[], cmd);
        let runc = ctr_run(c, RUNC, &[], cmd);
        assert_eq!(
            (arrow.status.code(), &arrow.stdout),
            (runc.status.code(), &runc.stdout),
            "{cmd:?}: arrow {arrow:?} vs runc {runc:?}\n{}",
            c.log_tail(30)
        );
    }
    // A missing program is an error, not a hang, for both.
    let arrow = ctr_run(c, ARROW, &[], &["/no/such/program"]);
    assert!(!arrow.success(), "{arrow:?}");
    settle_then_assert_nothing_left();
}

#[test]
fn ctr_run_with_a_terminal() {
    if skip_unless_root("ctr_run_with_a_terminal") {
        return;
    }
    let c = Containerd::shared();
    let _serial = exclusive(c);
    let id = unique_name("tty");
    // ctr -t needs a terminal of its own: script(1) gives it one.
    let command = format!(
        "ctr --address {} -n {} run -t --rm --runtime {ARROW} {BUSYBOX_IMAGE} {id} sh -c 'tty; stty size; echo tty-ok'",
        c.address().display(),
        c.namespace()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("COLUMNS", "100")
        .env("LINES", "30")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("tty-ok"), "{text:?}");
    settle_then_assert_nothing_left();
}

#[test]
fn ctr_exec_kill_pause_and_metrics() {
    if skip_unless_root("ctr_exec_kill_pause_and_metrics") {
        return;
    }
    let c = Containerd::shared();
    let _serial = exclusive(c);
    for runtime in [RUNC, ARROW] {
        let id = unique_name("exec");
        c.ctr(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            BUSYBOX_IMAGE,
            &id,
            "sleep",
            "600",
        ])
        .check()
        .unwrap();
        let exec = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            &id,
            "sh",
            "-c",
            "echo from-exec; exit 5",
        ]);
        assert_eq!(exec.stdout, "from-exec\n", "{runtime}: {exec:?}");
        assert_eq!(exec.status.code(), Some(5), "{runtime}: {exec:?}");
        let ps = c.ctr(&["task", "ps", &id]).check().unwrap();
        assert!(ps.lines().count() >= 2, "{runtime}: {ps}");
        if runtime == ARROW {
            c.ctr(&["task", "pause", &id]).check().unwrap();
            let ls = c.ctr(&["task", "ls"]).check().unwrap();
            assert!(
                ls.lines()
                    .any(|l| l.starts_with(&id) && l.contains("PAUSED")),
                "{ls}"
            );
            c.ctr(&["task", "resume", &id]).check().unwrap();
            let metrics = c.ctr(&["task", "metrics", &id]).check().unwrap();
            assert!(metrics.contains("memory"), "{metrics}");
        }
        c.ctr(&["task", "kill", "-s", "SIGKILL", &id])
            .check()
            .unwrap();
        // `ctr task delete` warns with the task's exit status once it
        // stopped.
        let mut deleted = c.ctr(&["task", "delete", &id]);
        for _ in 0..100 {
            if deleted.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            deleted = c.ctr(&["task", "delete", &id]);
        }
        assert!(
            deleted.success() && deleted.stderr.contains("exit code 137"),
            "{runtime}: {deleted:?}"
        );
        c.ctr(&["containers", "delete", &id]).check().unwrap();
    }
    settle_then_assert_nothing_left();
}

#[test]
fn arrow_pod_through_cri() {
    if skip_unless_root("arrow_pod_through_cri") {
        return;
    }
    let _serial = exclusive(Containerd::shared());
    block_on(pod_through_cri());
}

async fn pod_through_cri() {
    let containerd = Containerd::shared();
    let cri = containerd.cri().await.unwrap();
    let pod = cri
        .run_pod_sandbox(&unique_name("arrow-pod"), "arrow")
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log_tail(30)));

    // A volume from the host, written in the guest.
    let volume = tempfile::tempdir().unwrap();
    fs::write(volume.path().join("from-host"), "host data\n").unwrap();
    let mut config = container_config(
        "app",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo started; echo to-stderr >&2; \
             cat /data/from-host; echo guest data > /data/from-guest; sleep 600 & wait",
        ],
        "app/0.log",
    );
    config.mounts.push(cri::Mount {
        container_path: "/data".into(),
        host_path: volume.path().display().to_string(),
        ..Default::default()
    });
    let app = cri.create_container_with(&pod, config).await.unwrap();
    cri.start_container(&app).await.unwrap();

    // A second container of the same pod, in the same VM.
    let echo = cri
        .create_container(&pod, "echo", BUSYBOX_IMAGE, &["echo", "hi"], "echo/0.log")
        .await
        .unwrap();
    cri.start_container(&echo).await.unwrap();
    let code = cri
        .wait_container_exit(&echo, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(code, 0);
    let lines = read_cri_log(pod.log_file("echo/0.log")).unwrap();
    assert_eq!(log_text(&lines, Some("stdout")), "hi\n", "{lines:?}");
    let vmms: Vec<_> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("arrow-vmm serve") && c.contains(&pod.id))
        .collect();
    // The VMM and its keeper (see `assert_vmm_confined`).
    assert_eq!(vmms.len(), 2, "one VM for the pod: {vmms:#?}");
    let cgroup_parent = pod
        .config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .unwrap_or_default();
    assert_vmm_confined(&pod.id, &format!("{cgroup_parent}/{}", pod.id));

    let exec = cri
        .exec_sync(&app, &["sh", "-c", "echo out; echo err >&2; exit 3"], 60)
        .await
        .unwrap();
    assert_eq!(exec.exit_code, 3);
    assert_eq!(exec.stdout_text(), "out\n");
    assert_eq!(exec.stderr_text(), "err\n");
    let hostname = cri.exec_sync(&app, &["hostname"], 60).await.unwrap();
    assert_eq!(hostname.stdout_text().trim(), pod.config.hostname);
    let uname = cri.exec_sync(&app, &["uname", "-r"], 60).await.unwrap();
    assert!(uname.stdout_text().contains("arrow"), "{uname:?}");

    let written = volume.path().join("from-guest");
    for _ in 0..100 {
        if written.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fs::read_to_string(&written).unwrap(), "guest data\n");

    let stats = cri.container_stats(&app).await.unwrap();
    let memory = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(memory.is_some_and(|m| m > 0), "memory stats {memory:?}");
    let cpu = stats
        .cpu
        .and_then(|c| c.usage_core_nano_seconds)
        .map(|v| v.value);
    assert!(cpu.is_some_and(|c| c > 0), "cpu stats {cpu:?}");

    let lines = read_cri_log(pod.log_file("app/0.log")).unwrap();
    assert_eq!(
        log_text(&lines, Some("stdout")),
        "started\nhost data\n",
        "{lines:?}"
    );
    assert_eq!(log_text(&lines, Some("stderr")), "to-stderr\n");

    cri.stop_container(&app, 30).await.unwrap();
    let stopped = cri.container_status(&app).await.unwrap();
    assert_eq!(stopped.state, ContainerState::ContainerExited as i32);
    assert_eq!(stopped.exit_code, 0, "SIGTERM trap: {stopped:?}");
    cri.remove_container(&app).await.unwrap();
    cri.remove_container(&echo).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    drop(cri);
    tokio::task::spawn_blocking(settle_then_assert_nothing_left)
        .await
        .unwrap();
}

/// The ttrpc sockets of every shim, live or left behind.
fn shim_sockets() -> std::collections::BTreeSet<std::ffi::OsString> {
    fs::read_dir("/run/containerd/s")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// The pod's `arrow-vmm` is jailed (see `arrow-vmm/src/jail.rs`):
/// its keeper (the process the shim started) holds no privilege, the VMM
/// (the keeper's child, PID 1 of its own PID namespace) keeps only the
/// documented privileges (`confine.rs`), has namespaces of its own, a mount
/// table with only its jail, none of the shim's descriptors, and both run
/// in the pod's cgroup (`cgroup`, the sandbox's cgroupsPath under
/// containerd's cgroupfs driver).
fn assert_vmm_confined(pod_id: &str, cgroup: &str) {
    let serves: Vec<PathBuf> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let cmdline = fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains("arrow-vmm serve") && cmdline.contains(pod_id)
        })
        .map(|e| e.path())
        .collect();
    let status_field = |proc_dir: &Path, name: &str| {
        fs::read_to_string(proc_dir.join("status"))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    // The VMM sees itself as PID 1: NSpid has its host and its own pid.
    let (jailed, keepers): (Vec<PathBuf>, Vec<PathBuf>) = serves
        .into_iter()
        .partition(|p| status_field(p, "NSpid").split_whitespace().count() == 2);
    assert_eq!(
        (jailed.len(), keepers.len()),
        (1, 1),
        "{jailed:?} {keepers:?}"
    );
    let (pid, keeper) = (&jailed[0], &keepers[0]);
    assert_eq!(status_field(keeper, "NoNewPrivs"), "1");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            status_field(keeper, set),
            "0000000000000000",
            "keeper {set}"
        );
    }
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let vmm = fs::read_link(pid.join("ns").join(ns)).unwrap();
        let host = fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(vmm, host, "the VMM's {ns} namespace is the host's");
    }
    // Only the jail: its tmpfs root, KVM, the kernel, the template (cache),
    // the VMM's own directory, the share with the containers' mounts, /proc.
    let mountinfo = fs::read_to_string(pid.join("mountinfo")).unwrap();
    let points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .collect();
    let allowed = |p: &str| {
        p == "/"
            || p == "/dev/kvm"
            || p == "/proc"
            || p.starts_with("/var/cache/arrow/")
            || (p.starts_with("/run/arrow/") && (p.contains("/vmm") || p.contains("/shared")))
    };
    let foreign: Vec<&&str> = points.iter().filter(|p| !allowed(p)).collect();
    assert!(
        foreign.is_empty(),
        "mounts outside the jail: {foreign:?}\n{mountinfo}"
    );
    assert!(points.contains(&"/dev/kvm"), "{mountinfo}");
    let status = fs::read_to_string(pid.join("status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    // CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID.
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(field(set), "00000000000000db", "{set}: {status}");
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(field(set), "0000000000000000", "{set}: {status}");
    }
    // Every thread runs under its kind's seccomp filter.
    let mut threads = Vec::new();
    for task in fs::read_dir(pid.join("task")).unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        assert_eq!(
            status_field(&task.path(), "Seccomp"),
            "2",
            "thread {} has no seccomp filter",
            comm.trim()
        );
        threads.push(comm.trim().to_string());
    }
    threads.sort();
    assert!(
        threads.iter().any(|t| t.starts_with("vcpu")) && threads.contains(&"devices".to_string()),
        "{threads:?}"
    );
    // Only the documented descriptors: stdio (pipes, the VMM's log), the
    // tap, KVM's and the event loop's anonymous inodes, Unix sockets, the
    // template's memory (or a memfd), the console log, and virtio-fs's
    // handles on the pod's share with its /proc/self/fd and mountinfo.
    let documented = |t: &str| {
        let proc_fd = t
            .strip_prefix("/proc/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(n, what)| {
                n.bytes().all(|b| b.is_ascii_digit()) && (what == "fd" || what == "mountinfo")
            });
        t.starts_with("pipe:")
            || t.starts_with("socket:")
            || t.starts_with("anon_inode:")
            || t.starts_with("/memfd:")
            || t == "/dev/net/tun"
            || t == "/dev/kvm"
            || proc_fd
            || t.starts_with("/var/cache/arrow/templates/")
            || t.contains(&format!("/{pod_id}/shared"))
            || t.ends_with(&format!("/{pod_id}/vmm.log"))
            || t.ends_with(&format!("/{pod_id}/vmm/console.log"))
    };
    // A container's rootfs is mounted into the share after the VMM started;
    // its files show relative to that mount (which the host's namespace
    // does not hold at the same place), so they are recognised by the
    // mount they live on in the VMM's namespace.
    let vmm_mounts = fs::read_to_string(pid.join("mountinfo")).unwrap_or_default();
    let in_share_mount = |fd: &std::ffi::OsStr| {
        let fdinfo = fs::read_to_string(pid.join("fdinfo").join(fd)).unwrap_or_default();
        let Some(mnt_id) = fdinfo.lines().find_map(|l| l.strip_prefix("mnt_id:")) else {
            return false;
        };
        let mnt_id = mnt_id.trim();
        vmm_mounts.lines().any(|l| {
            let mut fields = l.split(' ');
            fields.next() == Some(mnt_id)
                && fields
                    .nth(3)
                    .is_some_and(|point| point.contains(&format!("/{pod_id}/shared")))
        })
    };
    let undocumented_fds = || -> Vec<String> {
        fs::read_dir(pid.join("fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| Some((e.file_name(), fs::read_link(e.path()).ok()?)))
            .map(|(fd, t)| (fd, t.display().to_string()))
            .filter(|(fd, t)| !documented(t) && !in_share_mount(fd))
            .map(|(fd, t)| {
                let fdinfo = fs::read_to_string(pid.join("fdinfo").join(&fd)).unwrap_or_default();
                let mnt = fdinfo
                    .lines()
                    .find(|l| l.starts_with("mnt_id:"))
                    .unwrap_or("");
                format!("{}: {t} ({mnt})", fd.to_string_lossy())
            })
            .collect()
    };
    // A removed container's files go when the guest forgets them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut undocumented = undocumented_fds();
    while !undocumented.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        undocumented = undocumented_fds();
    }
    assert!(
        undocumented.is_empty(),
        "descriptors the VMM should not hold: {undocumented:#?}\nits mounts:\n{vmm_mounts}"
    );
    let environ = fs::read(pid.join("environ")).unwrap();
    let foreign: Vec<String> = String::from_utf8_lossy(&environ)
        .split('\0')
        .filter(|v| !v.is_empty() && !v.starts_with("ARROW_"))
        .map(str::to_string)
        .collect();
    assert!(foreign.is_empty(), "environment kept: {foreign:?}");
    let cgroups = fs::read_to_string(pid.join("cgroup")).unwrap();
    for controller in ["memory", "cpu"] {
        let joined = cgroups.lines().any(|l| {
            let mut fields = l.splitn(3, ':').skip(1);
            let controllers = fields.next().unwrap_or_default();
            controllers.split(',').any(|c| c == controller) && fields.next() == Some(cgroup)
        });
        assert!(
            joined,
            "{controller} cgroup of the VMM is not {cgroup}: {cgroups}"
        );
    }
}

#[test]
fn pod_cycles_leave_nothing_behind() {
    if skip_unless_root("pod_cycles_leave_nothing_behind") {
        return;
    }
    let _serial = exclusive(Containerd::shared());
    block_on(cycle_pods(integration::pod_cycles(5)));
}

async fn cycle_pods(n: usize) {
    let containerd = Containerd::shared();
    let cri = containerd.cri().await.unwrap();
    let shim_sockets_before = shim_sockets();
    for i in 0..n {
        let pod = cri
            .run_pod_sandbox(&unique_name("cycle"), "arrow")
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: {e:#}\n{}", containerd.log_tail(30)));
        let id = cri
            .create_container(&pod, "c", BUSYBOX_IMAGE, &["sleep", "600"], "c/0.log")
            .await
            .unwrap();
        cri.start_container(&id).await.unwrap();
        cri.stop_container(&id, 0).await.unwrap();
        cri.remove_container(&id).await.unwrap();
        cri.remove_pod(&pod).await.unwrap();
    }
    drop(cri);
    tokio::task::spawn_blocking(settle_then_assert_nothing_left)
        .await
        .unwrap();
    let left: Vec<_> = shim_sockets()
        .difference(&shim_sockets_before)
        .cloned()
        .collect();
    assert!(left.is_empty(), "shim sockets left: {left:?}");
}

/// The pid of the first process whose command line contains every needle.
fn find_process(needles: &[&str]) -> Option<i32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        needles.iter().all(|n| cmdline.contains(n)).then_some(pid)
    })
}

/// Waits until `ctr task ls` shows `id` stopped (or gone).
fn wait_stopped(c: &Containerd, id: &str) -> String {
    for _ in 0..600 {
        let ls = c.ctr(&["task", "ls"]).check().unwrap();
        match ls.lines().find(|l| l.starts_with(id)) {
            Some(line) if line.contains("STOPPED") => return line.to_string(),
            None => return String::new(),
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    panic!("{id} never stopped");
}

#[test]
fn dead_vmm_or_killed_shim_end_in_exits_and_clean_deletes() {
    if skip_unless_root("dead_vmm_or_killed_shim_end_in_exits_and_clean_deletes") {
        return;
    }
    let c = Containerd::shared();
    let _serial = exclusive(c);

    // The VMM dies under a running container.
    let id = unique_name("vmm-dies");
    c.ctr(&[
        "run",
        "-d",
        "--runtime",
        ARROW,
        BUSYBOX_IMAGE,
        &id,
        "sleep",
        "600",
    ])
    .check()
    .unwrap();
    let vm_dir = format!("/run/arrow/{}/{id}/", c.namespace());
    let vmm = find_process(&["arrow-vmm serve", &vm_dir]).expect("the container's VMM");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let line = wait_stopped(c, &id);
    assert!(line.contains("STOPPED"), "{line}");
    let deleted = c.ctr(&["task", "delete", &id]);
    assert!(deleted.success(), "{deleted:?}");
    assert!(deleted.stderr.contains("exit code 137"), "{deleted:?}");
    c.ctr(&["containers", "delete", &id]).check().unwrap();

    // The shim is killed: containerd cleans up with `shim delete`, and the
    // VMM stops by itself when its lifeline to the shim closes.
    let id = unique_name("shim-dies");
    c.ctr(&[
        "run",
        "-d",
        "--runtime",
        ARROW,
        BUSYBOX_IMAGE,
        &id,
        "sleep",
        "600",
    ])
    .check()
    .unwrap();
    let shim = find_process(&["containerd-shim-arrow-v1", &format!("-id {id}")])
        .expect("the container's shim");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_stopped(c, &id);
    let _ = c.ctr(&["task", "delete", &id]);
    c.ctr(&["containers", "delete", &id]).check().unwrap();
    settle_then_assert_nothing_left();
}
