//! The guest NIC with a real VM and no containerd: a "pod" network
//! namespace with a veth `eth0` (as CNI would leave it) and its peer in a
//! "peer" namespace; the runtime's `network::set_up` joins a tap to the veth,
//! the runtime's `PodVm::start` hands the tap to `arrow-vmm serve`, and the
//! agent's `ConfigureNetwork` makes the guest the pod's interface. Then
//! the guest pings the peer, the peer fetches a page from busybox httpd in
//! the guest at the pod IP, and teardown leaves the namespace as it was.
//! Two rounds: the first VM boots and makes the template if there is none,
//! the second is a clone (its MAC is set after the restore). Root and KVM only; boots serialised.
//!
//! Addresses are 10.200.0.0/24, inside the two namespaces the test makes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use arrow_runtime::exits::OwnChildren;
use arrow_runtime::network::{self, TAP_NAME};
use arrow_runtime::spec::PodVmSize;
use arrow_runtime::vm::{self, PodDir, PodVm, VmNic};
use integration::netns::{in_netns, ip, VethPair};
use integration::{arrow_vmm, boot_lock, busybox_rootfs, kernel};
use proto::agent::{CreateContainer, CreateProcess, Mount};
use proto::client::AgentClient;

fn run_in_guest(agent: &AgentClient, id: &str, script: &str) -> (i32, i32) {
    agent
        .create_process(CreateProcess {
            id: id.into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
            container_id: "c1".into(),
            ..Default::default()
        })
        .unwrap();
    agent.start_process(id).unwrap();
    let exited = agent.wait(id).unwrap();
    agent.delete_process(id).unwrap();
    (exited.exit_code, exited.signal)
}

async fn round(fx: &VethPair, round: u32) -> bool {
    let netns = fx.netns();
    let net = tokio::task::spawn_blocking(move || network::set_up(&netns))
        .await
        .unwrap()
        .expect("set_up");
    let (request, left_out) = net.guest.to_request(true);
    assert!(left_out.is_empty(), "{left_out:?}");
    let mac = network::format_mac(&net.guest.mac);

    let dir = PodDir::new("network-vm", &format!("pod-{round}")).unwrap();
    // The container's rootfs, a copy of the busybox tree, shared as the
    // shim shares a bundle's rootfs.
    let bundle_rootfs = dir.root().join("bundle-rootfs");
    std::fs::create_dir_all(dir.root()).unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(busybox_rootfs())
        .arg(&bundle_rootfs)
        .status()
        .unwrap();
    assert!(cp.success());
    // The shim's own path: the tap's descriptor goes to arrow-vmm serve.
    let nic = VmNic {
        mtu: net.guest.mtu,
        tap: net.tap,
        netns: fx.netns(),
    };
    let shape = PodVmSize {
        memory_bytes: 256 << 20,
        vcpus: 1,
    };
    let started = Instant::now();
    let vmm = vm::vmm_binary().unwrap();
    let vm = PodVm::start(
        &vmm,
        dir.clone(),
        shape,
        "netpod",
        Some(nic),
        None,
        &OwnChildren,
    )
    .await
    .unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.vmm_log()).unwrap_or_default();
        panic!("PodVm::start: {e}\n{log}")
    });
    let _share = dir
        .share()
        .add_container("c1", &[], &bundle_rootfs, &[])
        .unwrap();
    eprintln!(
        "round {round}: VM ready in {:?} ({})",
        started.elapsed(),
        if vm.cloned() { "clone" } else { "fresh boot" }
    );
    assert_eq!(vm.netns(), Some(fx.netns().as_path()));

    let agent = vm.agent();
    tokio::task::spawn_blocking(move || {
        let configured = Instant::now();
        agent.configure_network(request).expect("ConfigureNetwork");
        eprintln!(
            "round {round}: ConfigureNetwork took {:?}",
            configured.elapsed()
        );
        agent
            .create_container(CreateContainer {
                id: "c1".into(),
                rootfs: "c1/rootfs".into(),
                mounts: vec![Mount {
                    destination: "/proc".into(),
                    r#type: "proc".into(),
                    source: "proc".into(),
                    options: Vec::new(),
                }],
                ..Default::default()
            })
            .unwrap();
        // The guest's eth0 carries the veth's MAC and the pod IP; its TCP
        // is tuned for the VM (guest-init's network::tune_tcp).
        let check = format!(
            "ip link show eth0 | grep -q 'link/ether {mac}' && \
             ip -4 addr show eth0 | grep -q 10.200.0.2/24 && \
             ip route | grep -q 'default via 10.200.0.1' && \
             grep -qx 15 /proc/sys/net/ipv4/tcp_tso_rtt_log"
        );
        assert_eq!(run_in_guest(&agent, "check", &check), (0, 0), "{check}");
        // Guest -> peer.
        assert_eq!(
            run_in_guest(&agent, "ping", "ping -c 2 -W 10 10.200.0.1"),
            (0, 0),
            "the guest pings the peer"
        );
        // httpd for the peer to reach at the pod IP.
        agent
            .create_process(CreateProcess {
                id: "httpd".into(),
                args: vec![
                    "sh".into(),
                    "-c".into(),
                    "mkdir -p /tmp/www && echo hello-from-the-guest > /tmp/www/index.html && \
                     exec httpd -f -p 8080 -h /tmp/www"
                        .into(),
                ],
                env: vec!["PATH=/bin:/sbin".into()],
                container_id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        agent.start_process("httpd").unwrap();
    })
    .await
    .unwrap();

    let peer = fx.peer.clone();
    tokio::task::spawn_blocking(move || {
        let body = in_netns(&peer, || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let attempt = (|| -> std::io::Result<String> {
                    let addr = "10.200.0.2:8080".parse().unwrap();
                    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
                    conn.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut text = String::new();
                    conn.read_to_string(&mut text)?;
                    Ok(text)
                })();
                match attempt {
                    Ok(text) => break text,
                    Err(e) if Instant::now() > deadline => panic!("no HTTP answer: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(300)),
                }
            }
        });
        assert!(body.contains("hello-from-the-guest"), "{body}");
        let pings = Command::new("ip")
            .args([
                "netns",
                "exec",
                &peer,
                "busybox",
                "ping",
                "-c",
                "5",
                "10.200.0.2",
            ])
            .output()
            .unwrap();
        let pings = String::from_utf8_lossy(&pings.stdout).into_owned();
        eprintln!(
            "round {round}: peer -> guest: {}",
            pings.lines().last().unwrap_or("")
        );
        assert!(pings.contains(" 0% packet loss"), "{pings}");
    })
    .await
    .unwrap();

    let code = vm.stop().await;
    eprintln!("round {round}: arrow-vmm exited with {code}");
    let netns = fx.netns();
    tokio::task::spawn_blocking(move || network::tear_down(&netns))
        .await
        .unwrap()
        .unwrap();
    let links = ip(&["-n", &fx.pod, "link", "show"]);
    assert!(!links.contains(TAP_NAME), "{links}");
    let cloned = vm.cloned();
    dir.clean_up().unwrap();
    cloned
}

#[test]
fn the_pod_ip_answers_from_inside_the_vm() {
    let root = nix::unistd::geteuid().is_root();
    if !root || !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: needs root and /dev/kvm");
        return;
    }
    let _boot = boot_lock();
    let fx = VethPair::new("vm");
    let work = std::env::temp_dir().join(format!("arrow-network-vm-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    // The shim finds arrow-vmm by $ARROW_VMM and keeps pod state under
    // $ARROW_STATE_DIR; the VMM's templates stay in the usual cache (the
    // second VM is a clone whether or not the first had to boot). Set
    // before any thread that reads them starts.
    std::env::set_var("ARROW_VMM", arrow_vmm());
    std::env::set_var("ARROW_KERNEL", kernel());
    std::env::set_var("ARROW_STATE_DIR", work.join("state"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (first, second) = runtime.block_on(async { (round(&fx, 1).await, round(&fx, 2).await) });
    eprintln!("first VM: {}", if first { "clone" } else { "fresh boot" });
    assert!(second, "the second VM is a clone of the template");
    let _ = std::fs::remove_dir_all(&work);
}
