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

use integration::containerd::{skip_unless_root, Containerd, BUSYBOX_IMAGE, NETTOOLS_IMAGE};
use integration::cri::{container_config, pod_config, unique_name, CriClient, Pod};
use k8s_cri::v1 as cri;

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

/// A container's init that runs until it is stopped: never a bounded sleep
/// (on an emulated guest kernel kernel_features_match_runc's arrow half
/// outlived `sleep 600`, and the init's end took the exec running then).
const LONG_RUNNING: &[&str] = &[
    "sh",
    "-c",
    "trap 'exit 0' TERM; while :; do sleep 3600 & wait; done",
];

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

/// How long one exec may take: a guard against a hang only. The checks are
/// of semantics, not speed: on a host whose KVM emulates the guest kernel,
/// one iptables command took ~14 s in the guest, three nft commands
/// together more than 30 s, and [`sh_all`] runs fourteen.
const EXEC_TIMEOUT_SECS: i64 = 600;

/// Runs `cmd`; (exit code, stdout + stderr).
async fn exec(cri: &CriClient, id: &str, cmd: &[&str]) -> (i32, String) {
    let out = cri
        .exec_sync(id, cmd, EXEC_TIMEOUT_SECS)
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

/// A long-running container of the nettools image (busybox, iptables,
/// nft, ip) with `caps` added, or privileged.
fn net_admin(name: &str, caps: &[&str], privileged: bool) -> cri::ContainerConfig {
    let mut c = container_config(name, NETTOOLS_IMAGE, LONG_RUNNING, &format!("{name}/0.log"));
    let sc = c
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("container_config has a security context");
    sc.capabilities = Some(cri::Capability {
        add_capabilities: caps.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    });
    sc.privileged = privileged;
    c
}

/// Runs `script` with `sh -c` and asserts it exits 0; its output.
async fn sh_ok(cri: &CriClient, id: &str, handler: &str, script: &str) -> String {
    let (code, out) = exec(cri, id, &["sh", "-c", script]).await;
    assert_eq!(code, 0, "{handler}: `{script}` failed: {out}");
    out
}

/// Runs `commands` in one `sh -c` (one exec: each costs seconds on a guest
/// kernel that is emulated), in order; asserts each exits 0, naming the
/// first that did not.
async fn sh_all(cri: &CriClient, id: &str, handler: &str, commands: &[String]) {
    let script: String = commands
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c} || {{ echo \"command {i} exited $?\"; exit 1; }}\n"))
        .collect();
    let (code, out) = exec(cri, id, &["sh", "-c", &script]).await;
    assert_eq!(code, 0, "{handler}: {out}\nof:\n{script}");
}

/// A connect to 127.0.0.1:80 that a nat OUTPUT REDIRECT must send to a
/// listener on 8080: prints what the listener sent.
const THROUGH_REDIRECT: &str = "(echo redirected | nc -l -p 8080 &); sleep 1; \
                                nc -w 5 127.0.0.1 80 </dev/null";

/// What a sidecar injector programs (Istio's init, roughly), as it does:
/// an `iptables-restore` input, one transaction per table.
const MESH_RULES: &str = "*nat
-A OUTPUT -m owner --uid-owner 1337 -j RETURN
-A OUTPUT -p tcp -m multiport --dports 443,8443 -m comment --comment mesh -j REDIRECT --to-ports 15001
-A POSTROUTING -o eth0 -j MASQUERADE
COMMIT
*mangle
-A PREROUTING -p tcp -m conntrack --ctstate NEW -j MARK --set-mark 1337
-A PREROUTING -p tcp -m mark --mark 1337 -j TPROXY --on-port 15006 --tproxy-mark 1/1
-A PREROUTING -p tcp -m socket -j ACCEPT
COMMIT
";

/// [`MESH_RULES`] for ip6tables, less its TPROXY and socket-match rules
/// (checked on IPv4 only).
fn mesh_rules_v6() -> String {
    MESH_RULES
        .lines()
        .filter(|l| !l.contains("TPROXY") && !l.contains("-m socket"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Restored without `--noflush`: both tables flushed.
const NAT_AND_MANGLE_EMPTY: &str = "*nat\nCOMMIT\n*mangle\nCOMMIT\n";

/// Issue 19 item 5: what pod workloads ask of the kernel works in a
/// NET_ADMIN container, under runc and Arrow alike: bridge, veth, VLAN and
/// macvlan links; iptables-legacy and iptables-nft with the matches and
/// targets service meshes use, a nat REDIRECT whose effect is seen (a
/// connect to port 80 reaches a listener on 8080); nftables; network
/// namespaces (privileged); and the pod's IPv6 address (dual-stack CNI,
/// hack/containerd.sh) on eth0, the gateway reachable over IPv6.
#[test]
fn kernel_features_match_runc() {
    if skip_unless_root("kernel_features_match_runc") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let containerd = Containerd::shared();
        let cri = containerd.cri().await.unwrap();
        for handler in ["runc", "arrow"] {
            let t0 = Instant::now();
            let pod = cri
                .run_pod_sandbox_with(privileged_pod("kfeat"), handler)
                .await
                .unwrap_or_else(|e| panic!("{e:#}\n{}", containerd.log_tail(30)));
            let admin = start(&cri, &pod, net_admin("admin", &["NET_ADMIN"], false)).await;
            let privileged = start(&cri, &pod, net_admin("privileged", &[], true)).await;

            // (This host's own kernel, runc's, may lack some link types:
            // runc's "not supported" is skipped, Arrow's guest has them all.)
            let mut made = Vec::new();
            for (script, name) in [
                ("ip link add br0 type bridge && ip link set br0 up", "br0:"),
                (
                    "ip link add v0 type veth peer name v1 && ip link set v0 master br0",
                    "v0@",
                ),
                (
                    "ip link add link eth0 name eth0.10 type vlan id 10",
                    "eth0.10@eth0",
                ),
                (
                    "ip link add mv0 link eth0 type macvlan mode bridge",
                    "mv0@eth0",
                ),
            ] {
                let (code, out) = exec(&cri, &admin, &["sh", "-c", script]).await;
                if handler == "runc" && code != 0 && out.contains("not supported") {
                    eprintln!("runc: the host kernel lacks it: `{script}`: {out}");
                    continue;
                }
                assert_eq!(code, 0, "{handler}: `{script}` failed: {out}");
                made.push(name);
            }
            let links = sh_ok(&cri, &admin, handler, "ip -o link show").await;
            for name in made {
                assert!(links.contains(name), "{handler}: no {name} in {links}");
            }

            // Nothing listens on 80: without the rule the connect fails.
            let (code, _) = exec(&cri, &admin, &["nc", "-w", "2", "127.0.0.1", "80"]).await;
            assert_ne!(code, 0, "{handler}: something listens on port 80");
            for iptables in ["iptables-legacy", "iptables-nft"] {
                let redirect = format!(
                    "{iptables} -t nat -A OUTPUT -p tcp --dport 80 -j REDIRECT --to-port 8080"
                );
                sh_ok(&cri, &admin, handler, &redirect).await;
                let out = sh_ok(&cri, &admin, handler, THROUGH_REDIRECT).await;
                assert_eq!(out.trim(), "redirected", "{handler}: {iptables}");
                // A mesh's rules, v4 and v6, then flushed: one exec, each
                // command checked.
                let v6 = iptables.replacen("iptables", "ip6tables", 1);
                let commands = [
                    format!("printf '{MESH_RULES}' | {iptables}-restore --noflush"),
                    format!("printf '{}' | {v6}-restore --noflush", mesh_rules_v6()),
                    format!("printf '{NAT_AND_MANGLE_EMPTY}' | {iptables}-restore"),
                    format!("printf '{NAT_AND_MANGLE_EMPTY}' | {v6}-restore"),
                ];
                sh_all(&cri, &admin, handler, &commands).await;
            }
            // Native nftables: a redirect in a table of its own.
            let nft = [
                "nft add table inet mesh",
                "nft 'add chain inet mesh out { type nat hook output priority -100; }'",
                "nft add rule inet mesh out tcp dport 80 redirect to :8080",
            ];
            sh_all(&cri, &admin, handler, &nft.map(String::from)).await;
            let out = sh_ok(&cri, &admin, handler, THROUGH_REDIRECT).await;
            assert_eq!(out.trim(), "redirected", "{handler}: nft");
            sh_ok(&cri, &admin, handler, "nft delete table inet mesh").await;

            // A network namespace of its own, as a nested runtime makes.
            let out = sh_ok(
                &cri,
                &privileged,
                handler,
                "unshare -n sh -c 'ip link add br9 type bridge && ip -o link show'",
            )
            .await;
            assert!(out.contains("br9"), "{handler}: {out}");
            assert!(!out.contains("eth0"), "{handler}: not a new netns: {out}");

            // Dual stack: the pod's IPv6 address is on eth0, with a
            // link-local address, and the gateway answers over IPv6.
            let status = cri.pod_sandbox_status(&pod.id).await.unwrap();
            let net = status.network.unwrap_or_default();
            let v6 = net
                .additional_ips
                .iter()
                .map(|ip| ip.ip.clone())
                .find(|ip| ip.contains(':'))
                .unwrap_or_else(|| panic!("{handler}: no IPv6 pod IP: {net:?}"));
            let addrs = sh_ok(&cri, &admin, handler, "ip -6 -o addr show dev eth0").await;
            assert!(
                addrs.contains(&format!("inet6 {v6}/")),
                "{handler}: {addrs}"
            );
            assert!(addrs.contains("inet6 fe80::"), "{handler}: {addrs}");
            sh_ok(&cri, &admin, handler, "ping -6 -c 1 -W 5 fd88::1").await;

            for id in [&admin, &privileged] {
                cri.stop_container(id, 5).await.unwrap();
                cri.remove_container(id).await.unwrap();
            }
            cri.remove_pod(&pod).await.unwrap();
            eprintln!("{handler}: kernel features checked in {:?}", t0.elapsed());
        }
    });
}

/// A host directory that is a shared mount of its own (the host's root
/// here is private), as kubelet requires of a volume with propagation:
/// unmounted (lazily, with everything below it) and removed on drop.
struct SharedDir(tempfile::TempDir);

impl SharedDir {
    fn new() -> SharedDir {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        for args in [vec!["--bind", path, path], vec!["--make-rshared", path]] {
            run("mount", &args);
        }
        SharedDir(dir)
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.0.path())
            .status();
    }
}

/// A pod config that may hold privileged containers.
fn privileged_pod(prefix: &str) -> cri::PodSandboxConfig {
    let mut pc = pod_config(&unique_name(prefix));
    if let Some(sc) = pc.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        sc.privileged = true;
    }
    pc
}

fn run(cmd: &str, args: &[&str]) {
    let status = std::process::Command::new(cmd).args(args).status().unwrap();
    assert!(status.success(), "{cmd} {args:?}: {status}");
}

fn volume(host: &std::path::Path, at: &str, propagation: cri::MountPropagation) -> cri::Mount {
    cri::Mount {
        container_path: at.to_string(),
        host_path: host.to_str().unwrap().to_string(),
        propagation: propagation as i32,
        ..Default::default()
    }
}

/// Issue 19 item 6, in the directions README "what differs from runc"
/// claims. Host → container (`rslave`, HostToContainer): a mount made on
/// the host under the volume after the container started is seen inside,
/// under runc and Arrow. Container → host (`rshared`, Bidirectional, in a
/// privileged container): runc propagates a mount made inside back to the
/// host; Arrow cannot (virtio-fs shares files, not mounts): the mount works
/// inside the VM, the host sees only the empty directory under it, and the
/// shim logs why.
#[test]
fn mount_propagation_in_the_directions_claimed() {
    if skip_unless_root("mount_propagation_in_the_directions_claimed") {
        return;
    }
    let _serial = serial();
    block_on(async {
        let containerd = Containerd::shared();
        let cri = containerd.cri().await.unwrap();
        for handler in ["runc", "arrow"] {
            let t0 = Instant::now();
            let down = SharedDir::new();
            let up = SharedDir::new();
            std::fs::create_dir(down.path().join("sub")).unwrap();
            let pod = cri
                .run_pod_sandbox_with(privileged_pod("propagation"), handler)
                .await
                .unwrap_or_else(|e| panic!("{e:#}\n{}", containerd.log_tail(30)));
            let mut c = config("mounts", None, true);
            c.mounts = vec![
                volume(
                    down.path(),
                    "/down",
                    cri::MountPropagation::PropagationHostToContainer,
                ),
                volume(
                    up.path(),
                    "/up",
                    cri::MountPropagation::PropagationBidirectional,
                ),
            ];
            let id = start(&cri, &pod, c).await;

            // Host → container.
            let sub = down.path().join("sub");
            run("mount", &["-t", "tmpfs", "tmpfs", sub.to_str().unwrap()]);
            std::fs::write(sub.join("marker"), "from the host").unwrap();
            let (code, out) = exec(&cri, &id, &["cat", "/down/sub/marker"]).await;
            assert_eq!(
                (code, out.trim()),
                (0, "from the host"),
                "{handler}: a host mount under an rslave volume"
            );

            // Container → host.
            let script = "mkdir /up/m && mount -t tmpfs tmpfs /up/m && echo inside > /up/m/x \
                          && cat /up/m/x";
            let (code, out) = exec(&cri, &id, &["sh", "-c", script]).await;
            assert_eq!((code, out.trim()), (0, "inside"), "{handler}");
            let on_host = up.path().join("m/x");
            match handler {
                "runc" => assert_eq!(
                    std::fs::read_to_string(&on_host).unwrap_or_default().trim(),
                    "inside",
                    "runc: an rshared volume's mount did not reach the host"
                ),
                _ => {
                    assert!(
                        up.path().join("m").is_dir(),
                        "arrow: the directory is shared"
                    );
                    assert!(
                        !on_host.exists(),
                        "arrow: a guest mount reached the host: fix the README"
                    );
                    let log = containerd.log_tail(400);
                    assert!(
                        log.contains("mount /up: rshared propagation does not reach the host"),
                        "arrow: no log line for the rshared volume:\n{log}"
                    );
                }
            }

            cri.stop_container(&id, 5).await.unwrap();
            cri.remove_container(&id).await.unwrap();
            cri.remove_pod(&pod).await.unwrap();
            eprintln!("{handler}: propagation checked in {:?}", t0.elapsed());
        }
    });
}
