//! The control case: runc under the private containerd (hack/containerd.sh),
//! through `ctr` and through CRI, with the local test images
//! (hack/images.sh). The same steps with runtime handler `arrow` are the
//! shim's tests. Needs root; skipped with a message otherwise.

use std::time::{Duration, Instant};

use integration::containerd::{
    in_pod_subnet, skip_unless_root, Containerd, BUSYBOX_IMAGE, PAUSE_IMAGE,
};
use integration::cri::{log_text, read_cri_log, unique_name, ContainerState};

#[test]
fn ctr_runs_busybox_with_runc() {
    if skip_unless_root("ctr_runs_busybox_with_runc") {
        return;
    }
    let containerd = Containerd::shared();
    let id = unique_name("ctr-echo");
    let out = containerd.ctr(&["run", "--rm", BUSYBOX_IMAGE, &id, "echo", "hello"]);
    assert!(
        out.success(),
        "{out:?}\ncontainerd log:\n{}",
        containerd.log_tail(20)
    );
    assert_eq!(out.stdout, "hello\n");
}

#[test]
fn pause_exits_zero_on_sigterm() {
    if skip_unless_root("pause_exits_zero_on_sigterm") {
        return;
    }
    let containerd = Containerd::shared();
    let id = unique_name("pause");
    let run = containerd.ctr(&["run", "-d", PAUSE_IMAGE, &id]);
    assert!(run.success(), "{run:?}");
    let t0 = Instant::now();
    // `ctr tasks kill` sends SIGTERM; pause (PID 1 of its namespace) must
    // act on it, not ignore it.
    let kill = containerd.ctr(&["tasks", "kill", &id]);
    assert!(kill.success(), "{kill:?}");
    let mut last_kill = Instant::now();
    let status = loop {
        let ls = containerd.ctr(&["tasks", "ls"]).check().unwrap();
        let line = ls
            .lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or("")
            .to_string();
        if line.contains("STOPPED") {
            break line;
        }
        // A signal that reaches PID 1 before pause installed its handler
        // is dropped by the kernel (a loaded machine can be that slow to
        // start it): send it again, as an impatient kubelet would.
        if last_kill.elapsed() > Duration::from_secs(1) {
            let _ = containerd.ctr(&["tasks", "kill", &id]);
            last_kill = Instant::now();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "pause ignored SIGTERM: {ls}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // `ctr tasks delete` exits with the task's exit code.
    let deleted = containerd.ctr(&["tasks", "delete", &id]);
    assert!(deleted.success(), "{status}: {deleted:?}");
    containerd
        .ctr(&["containers", "delete", &id])
        .check()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_pod_through_cri() {
    if skip_unless_root("runc_pod_through_cri") {
        return;
    }
    let containerd = Containerd::shared();
    let cri = containerd.cri().await.unwrap();
    let version = cri.version().await.unwrap();
    assert_eq!(version.runtime_name, "containerd");
    assert!(cri.image_status(BUSYBOX_IMAGE).await.unwrap().is_some());
    assert!(cri.image_status(PAUSE_IMAGE).await.unwrap().is_some());

    let t0 = Instant::now();
    let pod = cri
        .run_pod_sandbox(&unique_name("runc-control"), "runc")
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ncontainerd log:\n{}", containerd.log_tail(30)));
    let sandbox_ready = t0.elapsed();
    let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(in_pod_subnet(&ip), "pod IP {ip:?}");

    // A one-shot container: its output in the CRI log, its exit code.
    let t1 = Instant::now();
    let echo = cri
        .create_container(&pod, "echo", BUSYBOX_IMAGE, &["echo", "hi"], "echo/0.log")
        .await
        .unwrap();
    cri.start_container(&echo).await.unwrap();
    let code = cri
        .wait_container_exit(&echo, Duration::from_secs(30))
        .await
        .unwrap();
    let echo_done = t1.elapsed();
    assert_eq!(code, 0);
    let lines = read_cri_log(pod.log_file("echo/0.log")).unwrap();
    assert_eq!(log_text(&lines, Some("stdout")), "hi\n", "{lines:?}");

    // A long-running one: exec, stats, stop.
    let sleeper = cri
        .create_container(
            &pod,
            "sleeper",
            BUSYBOX_IMAGE,
            &[
                "sh",
                "-c",
                "trap 'exit 0' TERM; echo started; echo to-stderr >&2; sleep 600 & wait",
            ],
            "sleeper/0.log",
        )
        .await
        .unwrap();
    cri.start_container(&sleeper).await.unwrap();
    let exec = cri
        .exec_sync(
            &sleeper,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            10,
        )
        .await
        .unwrap();
    assert_eq!(exec.exit_code, 3);
    assert_eq!(exec.stdout_text(), "out\n");
    assert_eq!(exec.stderr_text(), "err\n");
    let hostname = cri.exec_sync(&sleeper, &["hostname"], 10).await.unwrap();
    assert_eq!(hostname.stdout_text().trim(), pod.config.hostname);

    let stats = cri.container_stats(&sleeper).await.unwrap();
    assert_eq!(stats.attributes.as_ref().unwrap().id, sleeper);
    let memory = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(memory.is_some_and(|m| m > 0), "memory stats {memory:?}");

    let containers = cri.list_containers(Some(&pod.id)).await.unwrap();
    assert_eq!(containers.len(), 2);
    let lines = read_cri_log(pod.log_file("sleeper/0.log")).unwrap();
    assert_eq!(log_text(&lines, Some("stdout")), "started\n");
    assert_eq!(log_text(&lines, Some("stderr")), "to-stderr\n");

    let t2 = Instant::now();
    // Its shell is PID 1 of its own PID namespace and exits 0 on SIGTERM.
    cri.stop_container(&sleeper, 10).await.unwrap();
    let stopped = cri.container_status(&sleeper).await.unwrap();
    assert_eq!(stopped.state, ContainerState::ContainerExited as i32);
    assert_eq!(stopped.exit_code, 0, "{stopped:?}");
    assert!(
        t2.elapsed() < Duration::from_secs(5),
        "SIGTERM was not enough"
    );
    cri.remove_container(&sleeper).await.unwrap();
    cri.remove_container(&echo).await.unwrap();
    cri.remove_pod(&pod).await.unwrap();
    eprintln!(
        "runc through CRI: sandbox ready {sandbox_ready:?}, echo created+run+exited {echo_done:?}, \
         stop+remove all {:?}",
        t2.elapsed()
    );
    assert!(cri
        .list_pod_sandboxes()
        .await
        .unwrap()
        .iter()
        .all(|p| p.id != pod.id));
}
