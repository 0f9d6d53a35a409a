//! Containers end to end on the host: the real agent (`--listen-unix`,
//! which moves itself into a private mount namespace, so nothing it mounts
//! reaches the host) assembles a busybox container from a share directory,
//! runs processes in it and removes it, driven by
//! `proto::client::AgentClient` as the shim would over vsock.
//!
//! Needs root (mounts, cgroups, mknod) and a static busybox; each test says
//! why it skips otherwise. Cgroups come from the host's cgroup2 hierarchy
//! (a child `arrow-init-test-<pid>` that the agent removes at shutdown);
//! limits and OOM are checked only where that hierarchy offers the
//! controllers.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use proto::agent::{
    Capabilities, CreateContainer, CreateProcess, Mount, Resources, StreamKind, Sysctl,
};
use proto::client::{AgentClient, ClientError};

const BUSYBOX: &str = "/bin/busybox";

/// Why this host cannot run the tests, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (mounts, cgroups and mknod need it)".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("no {BUSYBOX} (Debian's busybox-static)"));
    }
    if !std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| f.contains("cgroup2")) {
        return Some("the kernel has no cgroup2".into());
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

/// One agent in its own directory; shut down gracefully on drop (so it
/// unmounts and removes its cgroups), killed if that fails.
struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "arrow-ctr-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        std::fs::create_dir_all(dir.join("sysctl/kernel")).unwrap();
        let bin = std::env::var_os("ARROW_INIT_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_arrow-init").into());
        let child = Command::new(bin)
            .arg("--listen-unix")
            .arg(&dir)
            .spawn()
            .unwrap();
        let agent = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.dir.join("stdio.sock").exists() {
            assert!(Instant::now() < deadline, "agent did not come up");
            thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn client(&self) -> AgentClient {
        AgentClient::from_unix(UnixStream::connect(self.dir.join("agent.sock")).unwrap()).unwrap()
    }

    fn share(&self) -> PathBuf {
        self.dir.join("shared")
    }

    fn collect(&self, id: &str, kind: StreamKind) -> JoinHandle<Vec<u8>> {
        let conn = UnixStream::connect(self.dir.join("stdio.sock")).unwrap();
        let mut stream = AgentClient::attach_stream(conn, id, kind).unwrap();
        thread::spawn(move || {
            let mut out = Vec::new();
            stream.read_to_end(&mut out).unwrap();
            out
        })
    }

    /// Runs `req`; returns (stdout, stderr, exit code).
    fn run(&self, client: &AgentClient, req: CreateProcess) -> (String, String, i32) {
        let id = req.id.clone();
        client.create_process(req).unwrap();
        let out = self.collect(&id, StreamKind::Stdout);
        let err = self.collect(&id, StreamKind::Stderr);
        client.start_process(&id).unwrap();
        let exited = client.wait(&id).unwrap();
        client.delete_process(&id).unwrap();
        let text = |h: JoinHandle<Vec<u8>>| String::from_utf8(h.join().unwrap()).unwrap();
        (text(out), text(err), exited.exit_code)
    }

    /// A busybox rootfs at `shared/<name>/rootfs`, with the symlinks real
    /// images have.
    fn make_rootfs(&self, name: &str) -> String {
        let rootfs = self.share().join(name).join("rootfs");
        for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "run"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "cat", "ls", "echo", "touch", "sleep", "id", "readlink", "grep", "dd", "stat",
            "head", "tr", "mount", "wc",
        ] {
            symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("etc/hosts"), "127.0.0.1 image\n").unwrap();
        // Dangling in the image, as on systemd-resolved images.
        symlink("../run/resolve/resolv.conf", rootfs.join("etc/resolv.conf")).unwrap();
        // Tries to lead a mount out of the root.
        symlink("../../../../../../../../tmp", rootfs.join("escape")).unwrap();
        std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        format!("{name}/rootfs")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(conn) = UnixStream::connect(self.dir.join("agent.sock")) {
            if let Ok(client) = AgentClient::from_unix(conn) {
                let _ = client.shutdown();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The mounts were in the agent's namespace: here these are plain
        // directories.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn opts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn mount(dest: &str, ty: &str, src: &str, options: &[&str]) -> Mount {
    Mount {
        destination: dest.into(),
        r#type: ty.into(),
        source: src.into(),
        options: opts(options),
    }
}

/// The mounts containerd's CRI plugin gives a container, plus volumes.
fn default_mounts() -> Vec<Mount> {
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
    ]
}

fn sh(id: &str, container: &str, script: &str) -> CreateProcess {
    CreateProcess {
        id: id.into(),
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        container_id: container.into(),
        ..Default::default()
    }
}

fn clone_journal(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.join("clone-platform.log")).unwrap_or_default()
}

#[test]
fn container_is_assembled_used_and_removed() {
    skip_unless_able!();
    let agent = Agent::start();
    let client = agent.client();
    let share = agent.share();
    let rootfs = agent.make_rootfs("c1");
    std::fs::create_dir_all(share.join("vol")).unwrap();
    std::fs::write(share.join("vol/in"), "from the host\n").unwrap();
    std::fs::write(share.join("hosts"), "10.0.0.2 pod\n").unwrap();
    std::fs::write(share.join("resolv"), "nameserver 10.0.0.10\n").unwrap();
    std::fs::write(agent.dir.join("sysctl/kernel/shm_rmid_forced"), "0\n").unwrap();

    let mut mounts = default_mounts();
    mounts.extend([
        mount("/etc/hosts", "bind", "hosts", &["rbind", "ro"]),
        mount("/etc/resolv.conf", "bind", "resolv", &["rbind", "ro"]),
        mount("/data", "bind", "vol", &["rbind", "rw", "nosuid", "nodev"]),
        mount("/escape/trapped", "tmpfs", "tmpfs", &["size=1m"]),
    ]);
    let req = CreateContainer {
        id: "c1".into(),
        rootfs,
        readonly_rootfs: true,
        mounts,
        masked_paths: opts(&["/proc/cmdline", "/proc/acpi-missing", "/sys/firmware"]),
        readonly_paths: opts(&["/proc/sys", "/proc/sysrq-trigger"]),
        sysctls: vec![Sysctl {
            key: "kernel.shm_rmid_forced".into(),
            value: "1".into(),
        }],
        hostname: "pod-one".into(),
        ..Default::default()
    };
    client.create_container(req.clone()).unwrap();
    assert!(matches!(
        client.create_container(req).unwrap_err(),
        ClientError::AlreadyExists(_)
    ));
    assert_eq!(
        std::fs::read_to_string(agent.dir.join("sysctl/kernel/shm_rmid_forced")).unwrap(),
        "1"
    );
    assert!(clone_journal(&agent).contains("set_hostname pod-one"));

    let script = r#"
        cat /etc/hosts /etc/resolv.conf /data/in
        echo written > /data/out && echo data-rw
        touch /rootfs-write 2>/dev/null || echo root-ro
        ls /dev | tr '\n' ' '; echo
        readlink /dev/ptmx; readlink /dev/fd; readlink /dev/stdin
        stat -c '%a %t,%T' /dev/null /dev/tty
        echo zero | cat > /dev/null && echo null-ok
        head -c 4 /dev/urandom | wc -c 2>/dev/null
        echo cmdline-[$(cat /proc/cmdline)]
        echo firmware-[$(ls /sys/firmware)]
        echo 1 > /proc/sys/kernel/shm_rmid_forced 2>/dev/null || echo procsys-ro
        ls /sys/fs/cgroup/cgroup.procs && echo cgroup-mounted
        cat /proc/self/cgroup
        ls /escape
    "#;
    let (out, err, code) = agent.run(&client, sh("p1", "c1", script));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for want in [
        "10.0.0.2 pod\n",
        "nameserver 10.0.0.10\n",
        "from the host\n",
        "data-rw\n",
        "root-ro\n",
        "pts/ptmx\n/proc/self/fd\n/proc/self/fd/0\n",
        "666 1,3\n666 5,0\n",
        "null-ok\n",
        "cmdline-[]\n",
        "firmware-[]\n",
        "procsys-ro\n",
        "/sys/fs/cgroup/cgroup.procs\ncgroup-mounted\n",
        "::/arrow-init-test-",
        "trapped\n",
    ] {
        assert!(
            out.contains(want),
            "missing {want:?} in:\n{out}\nstderr:\n{err}"
        );
    }
    for node in [
        "full", "null", "ptmx", "pts", "random", "shm", "mqueue", "tty", "urandom", "zero",
        "stdout",
    ] {
        assert!(
            out.contains(&format!("{node} ")),
            "no /dev/{node} in:\n{out}"
        );
    }
    // The write through the volume reached the share; the escaping
    // symlink's target was made inside the root, not in the host's /tmp.
    assert_eq!(
        std::fs::read_to_string(share.join("vol/out")).unwrap(),
        "written\n"
    );
    assert!(share.join("c1/rootfs/run/resolve/resolv.conf").exists());
    assert!(share.join("c1/rootfs/tmp/trapped").is_dir());
    assert!(!Path::new("/tmp/trapped").exists());

    // A long-running process: pids, stats, freeze, removal.
    client
        .create_process(CreateProcess {
            id: "sleeper".into(),
            args: vec!["sleep".into(), "1000".into()],
            env: vec!["PATH=/bin".into()],
            container_id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    let pid = client.start_process("sleeper").unwrap();
    assert_eq!(client.list_pids("c1").unwrap(), vec![pid]);
    let stats = client.container_stats("c1").unwrap();
    assert!(stats.timestamp_ns > 1_600_000_000_000_000_000);
    assert!(stats.cpu_usage_usec > 0, "{stats:?}");

    client.freeze_container("c1", true).unwrap();
    let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(state.contains("State:\tS"), "{state}");
    // Nothing starts in a frozen container.
    client.create_process(sh("late", "c1", "true")).unwrap();
    assert!(matches!(
        client.start_process("late").unwrap_err(),
        ClientError::FailedPrecondition(m) if m.contains("frozen")
    ));
    client.freeze_container("c1", false).unwrap();

    thread::scope(|s| {
        let waiter = s.spawn(|| client.wait("sleeper"));
        thread::sleep(Duration::from_millis(100));
        client.remove_container("c1").unwrap();
        // Forgotten with its container.
        assert!(matches!(
            waiter.join().unwrap(),
            Err(ClientError::NotFound(_))
        ));
    });
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            s.contains("State:\tZ") || s.is_empty()
        }
    );
    assert!(matches!(
        client.start_process("late"),
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        client.list_pids("c1"),
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        client.remove_container("c1"),
        Err(ClientError::NotFound(_))
    ));
    // The share's files are untouched; the root is gone.
    assert!(share.join("c1/rootfs/bin/busybox").exists());
    assert!(share.join("vol/in").exists());
    assert!(!agent.dir.join("containers/c1").exists());

    // The same id can be used again.
    let again = CreateContainer {
        id: "c1".into(),
        rootfs: "c1/rootfs".into(),
        ..Default::default()
    };
    client.create_container(again).unwrap();
    let (out, _, code) = agent.run(&client, sh("p2", "c1", "echo again"));
    assert_eq!((out.as_str(), code), ("again\n", 0));
    client.remove_container("c1").unwrap();
}

#[test]
fn process_identity_capabilities_and_oom_score() {
    skip_unless_able!();
    let agent = Agent::start();
    let client = agent.client();
    let rootfs = agent.make_rootfs("c");
    let mut mounts = default_mounts();
    mounts.truncate(2);
    client
        .create_container(CreateContainer {
            id: "c".into(),
            rootfs,
            mounts,
            ..Default::default()
        })
        .unwrap();
    let caps = |names: &[&str]| opts(names);
    let mut req = sh(
        "p",
        "c",
        "id -u; id -g; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; cat /proc/self/oom_score_adj",
    );
    req.uid = 1000;
    req.gid = 1000;
    req.no_new_privs = true;
    req.oom_score_adj = Some(500);
    req.capabilities = Some(Capabilities {
        bounding: caps(&["CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_KILL"]),
        effective: caps(&["CAP_NET_BIND_SERVICE"]),
        permitted: caps(&["CAP_NET_BIND_SERVICE", "CAP_KILL"]),
        inheritable: caps(&["CAP_NET_BIND_SERVICE"]),
        ambient: caps(&["CAP_NET_BIND_SERVICE"]),
    });
    let (out, err, code) = agent.run(&client, req);
    assert_eq!(code, 0, "{out}\n{err}");
    // Non-root after exec: permitted = effective = ambient.
    let want = "1000\n1000\n\
        CapInh:\t0000000000000400\n\
        CapPrm:\t0000000000000400\n\
        CapEff:\t0000000000000400\n\
        CapBnd:\t0000000000000421\n\
        CapAmb:\t0000000000000400\n\
        NoNewPrivs:\t1\n\
        500\n";
    assert_eq!(out, want, "stderr: {err}");

    // Root keeps exactly its bounding set.
    let mut req = sh("r", "c", "grep -E '^(CapEff|CapBnd)' /proc/self/status");
    req.capabilities = Some(Capabilities {
        bounding: caps(&["CAP_CHOWN", "CAP_KILL"]),
        effective: caps(&["CAP_CHOWN", "CAP_KILL"]),
        permitted: caps(&["CAP_CHOWN", "CAP_KILL"]),
        ..Default::default()
    });
    let (out, err, _) = agent.run(&client, req);
    assert_eq!(
        out, "CapEff:\t0000000000000021\nCapBnd:\t0000000000000021\n",
        "{err}"
    );

    let mut bad = sh("b", "c", "true");
    bad.capabilities = Some(Capabilities {
        bounding: caps(&["CAP_NOPE"]),
        ..Default::default()
    });
    assert!(matches!(
        client.create_process(bad).unwrap_err(),
        ClientError::InvalidArgument(m) if m.contains("CAP_NOPE")
    ));
    let mut bad = sh("b", "c", "true");
    bad.oom_score_adj = Some(1001);
    assert!(matches!(
        client.create_process(bad),
        Err(ClientError::InvalidArgument(_))
    ));
    let mut bad = sh("b", "c", "true");
    bad.root = "/tmp".into();
    assert!(matches!(
        client.create_process(bad),
        Err(ClientError::InvalidArgument(_))
    ));
    assert!(matches!(
        client.create_process(sh("b", "nope", "true")).unwrap_err(),
        ClientError::NotFound(m) if m.contains("nope")
    ));
    client.remove_container("c").unwrap();
}

#[test]
fn terminal_process_gets_the_containers_devpts() {
    skip_unless_able!();
    let agent = Agent::start();
    let client = agent.client();
    let rootfs = agent.make_rootfs("t");
    let mut mounts = default_mounts();
    mounts.truncate(3);
    client
        .create_container(CreateContainer {
            id: "t".into(),
            rootfs,
            mounts,
            ..Default::default()
        })
        .unwrap();
    let mut req = sh("tty", "t", "readlink /proc/self/fd/0; ls /dev/pts");
    req.terminal = true;
    client.create_process(req).unwrap();
    let out = agent.collect("tty", StreamKind::Stdout);
    client.start_process("tty").unwrap();
    assert_eq!(client.wait("tty").unwrap().exit_code, 0);
    let out = String::from_utf8(out.join().unwrap()).unwrap();
    // The container's own instance: its first pty, visible in its /dev/pts.
    assert!(out.starts_with("/dev/pts/0\r\n"), "{out:?}");
    assert!(out.contains("0"), "{out:?}");
    client.remove_container("t").unwrap();
}

#[test]
fn failed_create_leaves_nothing_and_bad_requests_are_refused() {
    skip_unless_able!();
    let agent = Agent::start();
    let client = agent.client();
    let rootfs = agent.make_rootfs("f");
    let mut mounts = default_mounts();
    mounts.push(mount("/data", "bind", "no-such-volume", &["rbind"]));
    let err = client
        .create_container(CreateContainer {
            id: "f".into(),
            rootfs: rootfs.clone(),
            mounts,
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Internal(m) if m.contains("/data") && m.contains("no-such-volume")),
        "{err}"
    );
    assert!(!agent.dir.join("containers/f").exists());
    // Nothing stays mounted in the agent either: the id is free again and
    // the rootfs's mount points were not written through.
    assert!(
        !agent.share().join("f/rootfs/data").exists() || {
            std::fs::read_dir(agent.share().join("f/rootfs/data"))
                .unwrap()
                .next()
                .is_none()
        }
    );
    client
        .create_container(CreateContainer {
            id: "f".into(),
            rootfs: rootfs.clone(),
            ..Default::default()
        })
        .unwrap();
    client.remove_container("f").unwrap();

    let bad_mount = CreateContainer {
        id: "g".into(),
        rootfs: rootfs.clone(),
        mounts: vec![mount("/x", "ext4", "/dev/vda", &[])],
        ..Default::default()
    };
    assert!(matches!(
        client.create_container(bad_mount),
        Err(ClientError::InvalidArgument(_))
    ));
    let missing_rootfs = CreateContainer {
        id: "g".into(),
        rootfs: "nowhere/rootfs".into(),
        ..Default::default()
    };
    assert!(matches!(
        client.create_container(missing_rootfs),
        Err(ClientError::Internal(m)) if m.contains("nowhere/rootfs")
    ));
    let bad_sysctl = CreateContainer {
        id: "g".into(),
        rootfs,
        sysctls: vec![Sysctl {
            key: "kernel.nope".into(),
            value: "1".into(),
        }],
        ..Default::default()
    };
    assert!(matches!(
        client.create_container(bad_sysctl),
        Err(ClientError::Internal(m)) if m.contains("kernel.nope")
    ));
    assert!(!agent.dir.join("containers/g").exists());
    for call in [
        client.update_container("g", Resources::default()),
        client.freeze_container("g", true),
        client.container_stats("g").map(drop),
    ] {
        assert!(matches!(call, Err(ClientError::NotFound(_))));
    }
    assert!(matches!(
        client.update_container(
            "g",
            Resources {
                cpu_period: Some(10),
                ..Default::default()
            }
        ),
        Err(ClientError::InvalidArgument(_))
    ));
}

/// The controllers the host's cgroup2 root offers (hybrid hosts: few).
fn host_controllers() -> String {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split(' ').nth(4))
        .and_then(|mnt| std::fs::read_to_string(Path::new(mnt).join("cgroup.subtree_control")).ok())
        .unwrap_or_default()
}

#[test]
fn limits_and_oom_where_the_host_has_the_controllers() {
    skip_unless_able!();
    let controllers = host_controllers();
    if !["memory", "pids", "cpu"]
        .iter()
        .all(|c| controllers.contains(c))
    {
        eprintln!("skipping: the host's cgroup2 root enables only {controllers:?}");
        return;
    }
    let agent = Agent::start();
    let client = agent.client();
    let rootfs = agent.make_rootfs("m");
    let mut mounts = default_mounts();
    mounts.truncate(2);
    client
        .create_container(CreateContainer {
            id: "m".into(),
            rootfs,
            mounts,
            resources: Some(Resources {
                memory_limit: Some(32 << 20),
                cpu_quota: Some(50_000),
                cpu_period: Some(100_000),
                cpu_shares: Some(1024),
                pids_limit: Some(50),
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
    let stats = client.container_stats("m").unwrap();
    assert_eq!((stats.memory_limit, stats.pids_limit), (32 << 20, 50));
    client
        .update_container(
            "m",
            Resources {
                pids_limit: Some(-1),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(client.container_stats("m").unwrap().pids_limit, 0);

    thread::scope(|s| {
        let oom = s.spawn(|| client.wait_oom());
        let (_, _, code) = agent.run(
            &client,
            sh("hog", "m", "dd if=/dev/zero of=/dev/null bs=128M count=1"),
        );
        assert_ne!(code, 0);
        assert_eq!(oom.join().unwrap().unwrap(), "m");
    });
    assert!(client.container_stats("m").unwrap().oom_kill_events >= 1);
    client.remove_container("m").unwrap();
}

/// PidNamespace CONTAINER: the init is PID 1 of a namespace of its own,
/// with the container's /proc mounted from inside it (masked and read-only
/// paths below it applied); execs join it; the namespace ends with its
/// init, killing what was left in it, and nothing joins it after.
#[test]
fn own_pid_namespace_for_init_and_execs() {
    skip_unless_able!();
    let agent = Agent::start();
    let client = agent.client();
    let rootfs = agent.make_rootfs("own");
    let mut mounts = default_mounts();
    mounts.truncate(2);
    client
        .create_container(CreateContainer {
            id: "own".into(),
            rootfs,
            mounts,
            masked_paths: opts(&["/proc/cmdline", "/proc/no-such-file"]),
            readonly_paths: opts(&["/proc/sys"]),
            pid_namespace: proto::agent::PidNamespace::Container as i32,
            ..Default::default()
        })
        .unwrap();
    client
        .create_process(CreateProcess {
            id: "init".into(),
            args: vec!["sleep".into(), "1000".into()],
            env: vec!["PATH=/bin".into()],
            container_id: "own".into(),
            ..Default::default()
        })
        .unwrap();
    let init_pid = client.start_process("init").unwrap();
    // Its pid in the agent's namespace, which sees it as any other.
    let status = std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_default()
        .to_string();
    assert!(nspid.ends_with("\t1"), "{nspid}");

    let script = r#"
        echo init-[$(tr '\0' ' ' < /proc/1/cmdline)]
        echo self-$$
        ls /proc | grep -c '^[0-9]'
        echo cmdline-[$(cat /proc/cmdline)]
        echo 1 > /proc/sys/kernel/shm_rmid_forced 2>/dev/null || echo procsys-ro
        sleep 999 >/dev/null 2>&1 &
        echo started
    "#;
    let (out, err, code) = agent.run(&client, sh("exec1", "own", script));
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("init-[sleep 1000 ]\n"), "{out}\n{err}");
    assert!(!out.contains("self-1\n"), "{out}");
    // sleep 1000, the exec's sh, ls (and grep): the container's only.
    let count: u32 = out
        .lines()
        .nth(2)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    assert!((2..=5).contains(&count), "{count} pids in:\n{out}");
    assert!(out.contains("cmdline-[]\n"), "{out}");
    assert!(out.contains("procsys-ro\n"), "{out}");
    // The exec's orphan went to the container's init, in its namespace.
    let pids = client.list_pids("own").unwrap();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let orphan = *pids.iter().find(|&&p| p != init_pid).unwrap();
    let ppid = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap();
    let ppid: i32 = ppid
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert_eq!(ppid as u32, init_pid);

    // The init goes: the namespace ends, taking the orphan with it, and no
    // exec joins it any more.
    client.signal("init", libc::SIGKILL, false).unwrap();
    let exited = client.wait("init").unwrap();
    assert_eq!(exited.signal, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.list_pids("own").unwrap() != Vec::<u32>::new() {
        assert!(Instant::now() < deadline, "the namespace outlived its init");
        thread::sleep(Duration::from_millis(20));
    }
    client.create_process(sh("late", "own", "true")).unwrap();
    let err = client.start_process("late").unwrap_err();
    assert!(
        matches!(&err, ClientError::FailedPrecondition(m) if m.contains("PID namespace")),
        "{err:?}"
    );
    client.remove_container("own").unwrap();
    assert!(!agent.dir.join("containers/own").exists());
}
