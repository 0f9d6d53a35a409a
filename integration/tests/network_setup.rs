//! The shim's pod network setup against real network namespaces (root
//! only; skipped otherwise): a "pod" namespace with a veth `eth0` as CNI
//! would leave it, its peer in a "peer" namespace. `network::set_up` must
//! read the pod interface, create the tap and the tc redirects, and frames
//! must flow tap <-> veth; `network::tear_down` must leave the namespace as
//! CNI left it. `ip` is used only to build and inspect the fixture.

use std::fs::File;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use arrow_runtime::network::{self, GuestRoute, TAP_NAME};
use integration::netns::{in_ns, ip, root_with_ip, VethPair, PEER_IP};

/// The veth pair with an MTU and a second route besides the default one,
/// which `set_up` must hand to the guest.
fn fixture(tag: &str) -> VethPair {
    let fx = VethPair::new(tag);
    ip(&["-n", &fx.pod, "link", "set", "eth0", "mtu", "1400"]);
    ip(&["-n", &fx.peer, "link", "set", "peer0", "mtu", "1400"]);
    #[rustfmt::skip]
    ip(&[
        "-n", &fx.pod, "route", "add", "192.168.77.0/24", "via", PEER_IP, "metric", "7",
    ]);
    fx
}

fn parse_mac(text: &str) -> [u8; 6] {
    proto::mac::parse_mac(text).unwrap_or_else(|| panic!("not a MAC: {text:?}"))
}

/// An ARP request "who has 10.200.0.1, tell 10.200.0.2" from `mac`,
/// behind a zeroed 10-byte virtio-net header (the tap's default size).
fn arp_request(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; 10];
    f.extend([0xff; 6]);
    f.extend(mac);
    f.extend([0x08, 0x06]); // ARP
    f.extend([0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend(mac);
    f.extend([10, 200, 0, 2]);
    f.extend([0; 6]);
    f.extend([10, 200, 0, 1]);
    f
}

#[test]
fn set_up_joins_a_tap_to_the_cni_veth_and_tear_down_removes_it() {
    if !root_with_ip() {
        return;
    }
    let fx = fixture("nt-a");
    let veth_mac = parse_mac(in_ns(&fx.pod, &["cat", "/sys/class/net/eth0/address"]).trim());

    let net = network::set_up(&fx.netns()).expect("set_up");
    assert_eq!(net.interface, "eth0");
    assert_eq!(net.guest.mac, veth_mac);
    assert_eq!(net.guest.mtu, 1400);
    assert_eq!(
        net.guest.addresses,
        vec![("10.200.0.2".parse::<IpAddr>().unwrap(), 24)]
    );
    let gw: IpAddr = "10.200.0.1".parse().unwrap();
    assert!(net.guest.routes.contains(&GuestRoute {
        destination: "0.0.0.0".parse().unwrap(),
        prefix_len: 0,
        gateway: Some(gw),
        source: None,
        metric: 0,
    }));
    assert!(net.guest.routes.contains(&GuestRoute {
        destination: "192.168.77.0".parse().unwrap(),
        prefix_len: 24,
        gateway: Some(gw),
        source: None,
        metric: 7,
    }));
    assert_eq!(net.guest.routes.len(), 2, "{:?}", net.guest.routes);

    // The tap exists, is up with the veth's MTU, and both redirects are in.
    let tap = ip(&["-n", &fx.pod, "link", "show", TAP_NAME]);
    assert!(tap.contains("mtu 1400") && tap.contains("UP"), "{tap}");
    let to_tap = in_ns(&fx.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        to_tap.contains("protocol all")
            && to_tap.contains("pref 42864")
            && to_tap.contains(&format!("Redirect to device {TAP_NAME}")),
        "{to_tap}"
    );
    let to_veth = in_ns(
        &fx.pod,
        &["tc", "filter", "show", "dev", TAP_NAME, "ingress"],
    );
    assert!(to_veth.contains("Redirect to device eth0"), "{to_veth}");

    // Frames flow: an ARP request written to the tap leaves through the
    // veth, and the peer's answer comes back out of the tap.
    let mut tap_file = File::from(net.tap);
    tap_file
        .write_all(&arp_request(veth_mac))
        .expect("writing to the tap");
    // SAFETY: F_SETFL with O_NONBLOCK on a descriptor we own.
    unsafe { libc::fcntl(tap_file.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 2048];
    let reply = loop {
        match tap_file.read(&mut buf) {
            Ok(n) => {
                let frame = &buf[10..n];
                // An ARP reply to our MAC.
                if frame.len() >= 42 && frame[12..14] == [0x08, 0x06] && frame[20..22] == [0, 2] {
                    break frame.to_vec();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "no ARP reply through the tap");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("reading the tap: {e}"),
        }
    };
    assert_eq!(reply[0..6], veth_mac, "reply addressed to the pod's MAC");
    assert_eq!(reply[28..32], [10, 200, 0, 1], "from the peer");

    // Teardown (with the VMM's descriptor still open) leaves what CNI made.
    network::tear_down(&fx.netns()).expect("tear_down");
    let links = ip(&["-n", &fx.pod, "link", "show"]);
    assert!(!links.contains(TAP_NAME), "{links}");
    let qdiscs = in_ns(&fx.pod, &["tc", "qdisc", "show", "dev", "eth0", "ingress"]);
    assert!(qdiscs.trim().is_empty(), "{qdiscs}");
    let filters = in_ns(&fx.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(filters.trim().is_empty(), "{filters}");
    let addr = ip(&["-n", &fx.pod, "-4", "addr", "show", "eth0"]);
    assert!(addr.contains("10.200.0.2/24"), "{addr}");
    drop(tap_file);
    // Again: nothing to do, no error.
    network::tear_down(&fx.netns()).expect("second tear_down");

    // Set up again in the same namespace (a restarted pod), then the
    // namespace goes first (CNI DEL and its removal), then the teardown.
    let again = network::set_up(&fx.netns()).expect("set_up again");
    drop(again);
    let path = fx.netns();
    drop(fx);
    network::tear_down(&path).expect("tear_down of a removed namespace");
}

#[test]
fn a_namespace_without_an_interface_is_refused_and_left_clean() {
    if !root_with_ip() {
        return;
    }
    let ns = format!("arrow-nt-empty-{}", std::process::id());
    ip(&["netns", "add", &ns]);
    let path = PathBuf::from("/var/run/netns").join(&ns);
    let err = network::set_up(&path).unwrap_err();
    let links = ip(&["-n", &ns, "link", "show"]);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(err.to_string().contains("no interface"), "{err}");
    assert!(!links.contains(TAP_NAME), "{links}");
}

/// An ingress qdisc that is not Arrow's (there before set_up) makes set_up
/// fail, and stays; the tap goes again.
#[test]
fn a_foreign_ingress_qdisc_is_refused_and_kept() {
    if !root_with_ip() {
        return;
    }
    let fx = fixture("nt-q");
    in_ns(&fx.pod, &["tc", "qdisc", "add", "dev", "eth0", "ingress"]);
    let err = network::set_up(&fx.netns()).unwrap_err();
    assert!(err.to_string().contains("not Arrow's"), "{err}");
    let links = ip(&["-n", &fx.pod, "link", "show"]);
    assert!(!links.contains(TAP_NAME), "{links}");
    let qdiscs = in_ns(&fx.pod, &["tc", "qdisc", "show", "dev", "eth0", "ingress"]);
    assert!(
        qdiscs.contains("ingress"),
        "the foreign qdisc stays: {qdiscs}"
    );
}
