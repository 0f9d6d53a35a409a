//! arrow-init's network configuration against a real kernel: in a network
//! namespace of the test's own thread, a veth "eth0" stands in for the
//! virtio NIC. Root only. A test binary of its own: the unit tests' reaper
//! would reap the `ip` processes this one runs.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io;

use guest_init::network;
use proto::agent::{ConfigureNetwork, Interface, IpAddress, Route};

fn request() -> ConfigureNetwork {
    ConfigureNetwork {
        interfaces: vec![Interface {
            name: "eth0".into(),
            mac: vec![0x0a, 0x58, 0x0a, 0x58, 0, 7],
            mtu: 1450,
            addresses: vec![IpAddress {
                address: "10.88.0.7".into(),
                prefix_len: 16,
            }],
        }],
        routes: vec![Route {
            destination: "0.0.0.0/0".into(),
            gateway: "10.88.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
    }
}

/// The real socket, in a network namespace of this test's own thread:
/// a veth "eth0" gets a MAC, MTU, address and default route. Root only.
#[test]
fn configures_a_real_interface_in_a_private_netns() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    std::thread::spawn(|| {
        // SAFETY: unshare with a flag only; it moves just this thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!("unshare: {}", io::Error::last_os_error());
        }
        // Children of this thread inherit its namespace. A veth (its
        // peer up too, for a carrier) stands in for the virtio NIC.
        for args in [
            &[
                "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
            ][..],
            &["link", "set", "peer0", "up"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "ip {args:?}");
        }
        assert!(network::boot_up().unwrap(), "eth0 came up");
        network::configure(&request()).unwrap();
        // Repeating is harmless.
        network::configure(&request()).unwrap();
        let show = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let link = show(&["link", "show", "eth0"]);
        assert!(link.contains("0a:58:0a:58:00:07"), "{link}");
        assert!(link.contains("mtu 1450"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        let addr = show(&["-4", "addr", "show", "eth0"]);
        assert!(addr.contains("10.88.0.7/16"), "{addr}");
        let routes = show(&["route", "show"]);
        assert!(
            routes.contains("default via 10.88.0.1 dev eth0"),
            "{routes}"
        );
        let lo = show(&["link", "show", "lo"]);
        assert!(lo.contains("UP"), "{lo}");
    })
    .join()
    .unwrap();
}
