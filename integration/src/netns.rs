//! Network namespaces that stand in for what CNI leaves behind, for tests
//! of the pod network without containerd: a "pod" namespace whose `eth0`
//! (10.200.0.2/24, default route via the peer) is one end of a veth, the
//! other end `peer0` (10.200.0.1/24) in a "peer" namespace. Built and
//! inspected with iproute2, root only.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// The pod's address on `eth0`.
pub const POD_IP: &str = "10.200.0.2";
/// The peer's address on `peer0`, the pod's gateway.
pub const PEER_IP: &str = "10.200.0.1";

/// Runs `ip ARGS` and returns its stdout; panics with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` inside namespace `ns` (`ip netns exec`); returns its stdout.
pub fn in_ns(ns: &str, cmd: &[&str]) -> String {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    ip(&args)
}

/// Runs `f` on a thread that entered network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(Path::new(NETNS_DIR).join(ns)).expect("opening the namespace");
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the namespace");
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    })
}

/// Whether this process can build namespaces (root, iproute2 installed);
/// says why not on stderr.
pub fn root_with_ip() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let has_ip = Command::new("ip").arg("-V").output().is_ok();
    if !(root && has_ip) {
        eprintln!("skipped: needs root and iproute2");
    }
    root && has_ip
}

/// The pod and peer namespaces joined by a veth; both removed on drop.
pub struct VethPair {
    /// The pod namespace's name (`ip netns`), holding `eth0`.
    pub pod: String,
    /// The peer namespace's name, holding `peer0`.
    pub peer: String,
}

impl VethPair {
    /// Makes both namespaces; `tag` keeps concurrent tests apart.
    pub fn new(tag: &str) -> VethPair {
        let pid = std::process::id();
        let pair = VethPair {
            pod: format!("arrow-{tag}-pod-{pid}"),
            peer: format!("arrow-{tag}-peer-{pid}"),
        };
        ip(&["netns", "add", &pair.pod]);
        ip(&["netns", "add", &pair.peer]);
        #[rustfmt::skip]
        ip(&[
            "-n", &pair.pod, "link", "add", "eth0", "type", "veth",
            "peer", "name", "peer0", "netns", &pair.peer,
        ]);
        let pod_cidr = format!("{POD_IP}/24");
        let peer_cidr = format!("{PEER_IP}/24");
        ip(&["-n", &pair.pod, "addr", "add", &pod_cidr, "dev", "eth0"]);
        ip(&["-n", &pair.peer, "addr", "add", &peer_cidr, "dev", "peer0"]);
        for (ns, dev) in [
            (&pair.pod, "eth0"),
            (&pair.peer, "peer0"),
            (&pair.pod, "lo"),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", &pair.pod, "route", "add", "default", "via", PEER_IP]);
        pair
    }

    /// The pod namespace's path, as an OCI spec names it.
    pub fn netns(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.pod)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
