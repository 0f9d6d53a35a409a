//! The guest's network: `lo` comes up at boot (every pod has a loopback,
//! NIC or not), and `ConfigureNetwork` turns the virtio-net NIC into the
//! pod's interface (its MAC, MTU, addresses and routes, see agent.proto).
//!
//! It talks rtnetlink directly (one `NETLINK_ROUTE` socket, one request and
//! its ack at a time; messages built with `netlink-packet-route`): no `ip`
//! binary exists in the guest, and every system call is expensive on an
//! emulated host, so a configuration costs one socket and two system calls
//! per change. Applying goes through [`Rtnetlink`], so unit tests check the
//! messages and their order against a recording fake.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use proto::agent::ConfigureNetwork;

use crate::supervisor::ProcError;

/// The loopback interface's index: always 1 in a network namespace.
const LOOPBACK_INDEX: u32 = 1;
/// `ETH_MIN_MTU`.
const MIN_MTU: u32 = 68;
/// Largest MTU accepted (what fits `IFLA_MTU` for any Ethernet device).
const MAX_MTU: u32 = 65_535;

/// A validated interface of a `ConfigureNetwork`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkPlan {
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A validated route of a `ConfigureNetwork`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutePlan {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub metric: u32,
}

/// A whole `ConfigureNetwork`, validated: nothing is applied unless every
/// field made sense.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub links: Vec<LinkPlan>,
    pub routes: Vec<RoutePlan>,
}

/// Validates the request as agent.proto describes (INVALID_ARGUMENT).
pub fn plan(req: &ConfigureNetwork) -> Result<Plan, String> {
    let mut links = Vec::with_capacity(req.interfaces.len());
    for iface in &req.interfaces {
        let name = &iface.name;
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
            return Err(format!("interface name {name:?} is not valid"));
        }
        if links.iter().any(|l: &LinkPlan| &l.name == name) {
            return Err(format!("interface {name:?} is listed twice"));
        }
        let mac = match iface.mac.len() {
            0 => None,
            6 => {
                let mut mac = [0u8; 6];
                mac.copy_from_slice(&iface.mac);
                if mac[0] & 1 != 0 || mac == [0; 6] {
                    return Err(format!("{name}: MAC {} is not unicast", format_mac(&mac)));
                }
                Some(mac)
            }
            n => return Err(format!("{name}: MAC of {n} bytes (need 6)")),
        };
        let mtu = match iface.mtu {
            0 => None,
            mtu if (MIN_MTU..=MAX_MTU).contains(&mtu) => Some(mtu),
            mtu => return Err(format!("{name}: MTU {mtu} (need {MIN_MTU}..={MAX_MTU})")),
        };
        let addresses = iface
            .addresses
            .iter()
            .map(|a| {
                let ip: IpAddr = a
                    .address
                    .parse()
                    .map_err(|_| format!("{name}: address {:?} is not an IP", a.address))?;
                let prefix = checked_prefix(&ip, a.prefix_len)
                    .ok_or_else(|| format!("{name}: prefix /{} for {ip}", a.prefix_len))?;
                Ok((ip, prefix))
            })
            .collect::<Result<Vec<_>, String>>()?;
        links.push(LinkPlan {
            name: name.clone(),
            mac,
            mtu,
            addresses,
        });
    }
    let mut routes = Vec::with_capacity(req.routes.len());
    for r in &req.routes {
        let (dest, len) = r
            .destination
            .split_once('/')
            .ok_or_else(|| format!("route destination {:?} is not a/len", r.destination))?;
        let destination: IpAddr = dest
            .parse()
            .map_err(|_| format!("route destination {:?} is not an IP", r.destination))?;
        let prefix_len = len
            .parse::<u32>()
            .ok()
            .and_then(|len| checked_prefix(&destination, len))
            .ok_or_else(|| format!("route destination {:?}: bad prefix", r.destination))?;
        let same_family = |what: &str, text: &str| -> Result<Option<IpAddr>, String> {
            if text.is_empty() {
                return Ok(None);
            }
            let ip: IpAddr = text
                .parse()
                .map_err(|_| format!("route to {}: {what} {text:?} is not an IP", r.destination))?;
            if ip.is_ipv4() != destination.is_ipv4() {
                return Err(format!(
                    "route to {}: {what} {ip} of another address family",
                    r.destination
                ));
            }
            Ok(Some(ip))
        };
        let gateway = same_family("gateway", &r.gateway)?;
        let source = same_family("source", &r.source)?;
        if !links.iter().any(|l| l.name == r.device) {
            return Err(format!(
                "route to {} through {:?}, an interface not in the request",
                r.destination, r.device
            ));
        }
        routes.push(RoutePlan {
            destination,
            prefix_len,
            gateway,
            device: r.device.clone(),
            source,
            metric: r.metric,
        });
    }
    Ok(Plan { links, routes })
}

fn checked_prefix(ip: &IpAddr, len: u32) -> Option<u8> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    u8::try_from(len).ok().filter(|&l| u32::from(l) <= max)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What applying a plan needs from the kernel. The real one is
/// [`RtnlSocket`]; unit tests record.
pub trait Rtnetlink {
    /// The index of interface `name`, or `None` if there is none.
    fn link_index(&mut self, name: &str) -> io::Result<Option<u32>>;
    /// Sends one request (`NLM_F_REQUEST | NLM_F_ACK | flags`) and waits
    /// for its acknowledgement; a netlink error comes back as its errno.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()>;
}

/// Applies a validated plan: per interface MAC and MTU (live, or down and
/// up again if the driver refuses a live MAC change), up,
/// addresses; then the routes in order.
pub fn apply(nl: &mut dyn Rtnetlink, plan: &Plan) -> Result<(), ProcError> {
    let family_missing = |e: &io::Error| e.raw_os_error() == Some(libc::EAFNOSUPPORT);
    let mut indices = Vec::with_capacity(plan.links.len());
    for link in &plan.links {
        let index = nl
            .link_index(&link.name)
            .map_err(|e| ProcError::Guest(format!("looking up {}: {e}", link.name)))?
            .ok_or_else(|| ProcError::InterfaceNotFound(link.name.clone()))?;
        indices.push((link.name.as_str(), index));
        if link.mac.is_some() || link.mtu.is_some() {
            let set_err =
                |e: io::Error| ProcError::Guest(format!("setting MAC/MTU of {}: {e}", link.name));
            match nl.request(RouteNetlinkMessage::SetLink(set_link(index, link)), 0) {
                Ok(()) => {}
                // A driver without live MAC changes wants the NIC down
                // (virtio-net allows them; the NIC is up from boot).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    nl.request(RouteNetlinkMessage::SetLink(link_down(index)), 0)
                        .map_err(set_err)?;
                    nl.request(RouteNetlinkMessage::SetLink(set_link(index, link)), 0)
                        .map_err(set_err)?;
                }
                Err(e) => return Err(set_err(e)),
            }
        }
        nl.request(RouteNetlinkMessage::SetLink(link_up(index)), 0)
            .map_err(|e| ProcError::Guest(format!("bringing {} up: {e}", link.name)))?;
        for &(ip, prefix) in &link.addresses {
            match nl.request(
                RouteNetlinkMessage::NewAddress(address(index, ip, prefix)),
                NLM_F_CREATE | NLM_F_REPLACE,
            ) {
                Ok(()) => {}
                Err(e) if family_missing(&e) => {
                    return Err(ProcError::FailedPrecondition(format!(
                        "{ip}/{prefix} on {}: the guest kernel has no {} support",
                        link.name,
                        family_name(&ip)
                    )))
                }
                Err(e) => {
                    return Err(ProcError::Guest(format!(
                        "adding {ip}/{prefix} to {}: {e}",
                        link.name
                    )))
                }
            }
        }
    }
    for r in &plan.routes {
        // Validated: every route's device is in the plan.
        let Some(&(_, index)) = indices.iter().find(|(name, _)| *name == r.device) else {
            return Err(ProcError::InvalidArgument(format!(
                "route through unknown interface {:?}",
                r.device
            )));
        };
        match nl.request(
            RouteNetlinkMessage::NewRoute(route(index, r)),
            NLM_F_CREATE | NLM_F_REPLACE,
        ) {
            Ok(()) => {}
            Err(e) if family_missing(&e) => {
                return Err(ProcError::FailedPrecondition(format!(
                    "route to {}/{}: the guest kernel has no {} support",
                    r.destination,
                    r.prefix_len,
                    family_name(&r.destination)
                )))
            }
            Err(e) => {
                let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                return Err(ProcError::Guest(format!(
                    "adding route {}/{}{via} dev {}: {e}",
                    r.destination, r.prefix_len, r.device
                )));
            }
        }
    }
    Ok(())
}

fn family_name(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// ConfigureNetwork in the guest: validate, open a netlink socket, apply.
pub fn configure(req: &ConfigureNetwork) -> Result<(), ProcError> {
    let plan = plan(req).map_err(ProcError::InvalidArgument)?;
    let mut nl = RtnlSocket::open().map_err(|source| ProcError::Internal {
        what: "opening a netlink socket",
        source,
    })?;
    apply(&mut nl, &plan)
}

/// The NIC arrow-init brings up at boot, if the VM has one.
pub const BOOT_NIC: &str = "eth0";

/// At boot: brings `lo` up (127.0.0.1 comes with it) and the NIC, if the
/// VM has one. Bringing a virtio-net NIC up fills its receive ring, which
/// costs hundreds of milliseconds where the guest kernel is emulated; done
/// here it is part of the template, and a clone only changes the MAC
/// (live: virtio-net allows that) and adds addresses. With no address the
/// NIC sends nothing meanwhile. Returns whether a NIC came up.
pub fn boot_up() -> io::Result<bool> {
    let mut nl = RtnlSocket::open()?;
    nl.request(RouteNetlinkMessage::SetLink(link_up(LOOPBACK_INDEX)), 0)?;
    match nl.link_index(BOOT_NIC)? {
        Some(index) => {
            nl.request(RouteNetlinkMessage::SetLink(link_up(index)), 0)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// `RTM_SETLINK`: the MAC and MTU of `link`.
pub fn set_link(index: u32, link: &LinkPlan) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    if let Some(mac) = link.mac {
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    if let Some(mtu) = link.mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
    }
    msg
}

/// `RTM_SETLINK` with `IFF_UP` set (and only that flag changed).
pub fn link_up(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg
}

/// `RTM_SETLINK` with `IFF_UP` cleared (and only that flag changed).
pub fn link_down(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.change_mask = LinkFlags::Up;
    msg
}

/// `RTM_NEWADDR` for `ip/prefix` on interface `index`. IPv6 addresses skip
/// duplicate address detection: the host's side of the pod network already
/// owns them, and DAD would keep them unusable for a second or more.
pub fn address(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = prefix;
    msg.header.family = family(&ip);
    msg.attributes.push(AddressAttribute::Local(ip));
    msg.attributes.push(AddressAttribute::Address(ip));
    if ip.is_ipv6() {
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    msg
}

/// `RTM_NEWROUTE` in the main table: a unicast route, scope link when it
/// has no gateway.
pub fn route(index: u32, r: &RoutePlan) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(&r.destination);
    msg.header.destination_prefix_length = r.prefix_len;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = if r.gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if r.prefix_len > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                r.destination,
            )));
    }
    if let Some(gw) = r.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    if let Some(src) = r.source {
        msg.attributes
            .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
    }
    if r.metric != 0 {
        msg.attributes.push(RouteAttribute::Priority(r.metric));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// Serialises `msg` as request number `seq`.
pub fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// Reads the answer to request `seq` out of one datagram: `Ok` for an ack,
/// the errno of a netlink error, `None` if the datagram holds neither for
/// `seq` (the caller reads on).
///
/// Read by hand (a `struct nlmsghdr`, and for `NLMSG_ERROR` the `int`
/// after it): the kernel only ever answers these requests with an ack or
/// an error, and a full rtnetlink parser would add half a megabyte to
/// arrow-init, which the guest unpacks and faults in.
pub fn decode_ack(datagram: &[u8], seq: u32) -> Option<io::Result<()>> {
    const NLMSG_HDRLEN: usize = 16;
    const NLMSG_ERROR: u16 = 2;
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    let bad = || {
        Some(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "truncated netlink answer",
        )))
    };
    let mut rest = datagram;
    while !rest.is_empty() {
        let (Some(len), Some(kind), Some(msg_seq)) = (
            u32_at(rest, 0),
            rest.get(4..6).map(|k| u16::from_ne_bytes([k[0], k[1]])),
            u32_at(rest, 8),
        ) else {
            return bad();
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return bad();
        }
        if msg_seq == seq && kind == NLMSG_ERROR {
            let Some(code) = u32_at(rest, NLMSG_HDRLEN) else {
                return bad();
            };
            let code = code as i32;
            return Some(if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(code.saturating_neg()))
            });
        }
        // Messages are 4-byte aligned.
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

/// A `NETLINK_ROUTE` socket in this network namespace.
pub struct RtnlSocket {
    socket: Socket,
    seq: u32,
}

impl RtnlSocket {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }
}

impl Rtnetlink for RtnlSocket {
    fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
        let name = std::ffi::CString::new(name)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: if_nametoindex reads the NUL-terminated string we own.
        match unsafe { libc::if_nametoindex(name.as_ptr()) } {
            0 => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
                e => Err(e),
            },
            index => Ok(Some(index)),
        }
    }

    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let buf = encode(msg, flags, seq);
        self.socket.send(&buf, 0)?;
        // An ack is small; an error echoes the request, which is small too.
        let mut answer = Vec::with_capacity(8192);
        loop {
            answer.clear();
            self.socket.recv(&mut answer, 0)?;
            if let Some(result) = decode_ack(&answer, seq) {
                return result;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::error::Code;
    use proto::agent::{Interface, IpAddress, Route};

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

    #[derive(Default)]
    struct Recorder {
        /// (interface, index) the fake knows.
        links: Vec<(&'static str, u32)>,
        sent: Vec<(RouteNetlinkMessage, u16)>,
        /// Fail the request with this index (0-based) with this errno.
        fail: Option<(usize, i32)>,
    }

    impl Rtnetlink for Recorder {
        fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
            Ok(self.links.iter().find(|(n, _)| *n == name).map(|l| l.1))
        }

        fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
            let n = self.sent.len();
            self.sent.push((msg, flags));
            match self.fail {
                Some((at, errno)) if at == n => Err(io::Error::from_raw_os_error(errno)),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn plan_of_a_pod_interface() {
        let plan = plan(&request()).unwrap();
        assert_eq!(
            plan.links,
            vec![LinkPlan {
                name: "eth0".into(),
                mac: Some([0x0a, 0x58, 0x0a, 0x58, 0, 7]),
                mtu: Some(1450),
                addresses: vec![("10.88.0.7".parse().unwrap(), 16)],
            }]
        );
        assert_eq!(
            plan.routes,
            vec![RoutePlan {
                destination: "0.0.0.0".parse().unwrap(),
                prefix_len: 0,
                gateway: Some("10.88.0.1".parse().unwrap()),
                device: "eth0".into(),
                source: None,
                metric: 0,
            }]
        );
    }

    /// A change that makes a request invalid.
    type Spoil = Box<dyn Fn(&mut ConfigureNetwork)>;

    #[test]
    fn bad_requests_are_refused() {
        let cases: Vec<(&str, Spoil)> = vec![
            ("name", Box::new(|r| r.interfaces[0].name = String::new())),
            ("name", Box::new(|r| r.interfaces[0].name = "x".repeat(16))),
            (
                "twice",
                Box::new(|r| r.interfaces.push(r.interfaces[0].clone())),
            ),
            ("MAC of 5", Box::new(|r| r.interfaces[0].mac = vec![2; 5])),
            (
                "unicast",
                Box::new(|r| r.interfaces[0].mac = vec![1, 0, 0, 0, 0, 1]),
            ),
            ("unicast", Box::new(|r| r.interfaces[0].mac = vec![0; 6])),
            ("MTU", Box::new(|r| r.interfaces[0].mtu = 67)),
            ("MTU", Box::new(|r| r.interfaces[0].mtu = 65_536)),
            (
                "not an IP",
                Box::new(|r| r.interfaces[0].addresses[0].address = "x".into()),
            ),
            (
                "prefix",
                Box::new(|r| r.interfaces[0].addresses[0].prefix_len = 33),
            ),
            (
                "a/len",
                Box::new(|r| r.routes[0].destination = "0.0.0.0".into()),
            ),
            (
                "bad prefix",
                Box::new(|r| r.routes[0].destination = "10.0.0.0/40".into()),
            ),
            (
                "bad prefix",
                Box::new(|r| r.routes[0].destination = "10.0.0.0/x".into()),
            ),
            (
                "another address family",
                Box::new(|r| r.routes[0].gateway = "fe80::1".into()),
            ),
            (
                "not an IP",
                Box::new(|r| r.routes[0].source = "10.1".into()),
            ),
            (
                "not in the request",
                Box::new(|r| r.routes[0].device = "eth1".into()),
            ),
        ];
        for (want, change) in cases {
            let mut req = request();
            change(&mut req);
            let err = plan(&req).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        // IPv6 is valid in the request (whether the guest has it is the
        // kernel's answer).
        let mut req = request();
        req.interfaces[0].addresses.push(IpAddress {
            address: "fd00::7".into(),
            prefix_len: 64,
        });
        req.routes.push(Route {
            destination: "::/0".into(),
            gateway: "fe80::1".into(),
            device: "eth0".into(),
            ..Default::default()
        });
        assert_eq!(plan(&req).unwrap().routes.len(), 2);
    }

    #[test]
    fn applies_mac_mtu_then_up_then_addresses_then_routes() {
        let mut nl = Recorder {
            links: vec![("eth0", 2)],
            ..Default::default()
        };
        apply(&mut nl, &plan(&request()).unwrap()).unwrap();
        let kinds: Vec<&str> = nl
            .sent
            .iter()
            .map(|(m, _)| match m {
                RouteNetlinkMessage::SetLink(l) if l.header.flags.contains(LinkFlags::Up) => "up",
                RouteNetlinkMessage::SetLink(_) => "set",
                RouteNetlinkMessage::NewAddress(_) => "addr",
                RouteNetlinkMessage::NewRoute(_) => "route",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["set", "up", "addr", "route"]);
        let RouteNetlinkMessage::SetLink(set) = &nl.sent[0].0 else {
            unreachable!()
        };
        assert_eq!(set.header.index, 2);
        assert!(set
            .attributes
            .contains(&LinkAttribute::Address(vec![0x0a, 0x58, 0x0a, 0x58, 0, 7])));
        assert!(set.attributes.contains(&LinkAttribute::Mtu(1450)));
        // Addresses and routes replace: the call may be repeated.
        assert_eq!(nl.sent[2].1, NLM_F_CREATE | NLM_F_REPLACE);
        assert_eq!(nl.sent[3].1, NLM_F_CREATE | NLM_F_REPLACE);
        let RouteNetlinkMessage::NewRoute(r) = &nl.sent[3].0 else {
            unreachable!()
        };
        assert_eq!(r.header.scope, RouteScope::Universe);
        assert_eq!(r.header.destination_prefix_length, 0);
        assert!(r
            .attributes
            .contains(&RouteAttribute::Gateway(RouteAddress::Inet(
                "10.88.0.1".parse().unwrap()
            ))));
        assert!(r.attributes.contains(&RouteAttribute::Oif(2)));
        assert!(!r
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
    }

    #[test]
    fn a_refused_live_mac_change_is_done_while_down() {
        let mut nl = Recorder {
            links: vec![("eth0", 2)],
            fail: Some((0, libc::EBUSY)),
            ..Default::default()
        };
        apply(&mut nl, &plan(&request()).unwrap()).unwrap();
        let steps: Vec<String> = nl
            .sent
            .iter()
            .map(|(m, _)| match m {
                RouteNetlinkMessage::SetLink(l) if l.header.change_mask.is_empty() => "set".into(),
                RouteNetlinkMessage::SetLink(l) => format!("flags {:?}", l.header.flags),
                RouteNetlinkMessage::NewAddress(_) => "addr".into(),
                RouteNetlinkMessage::NewRoute(_) => "route".into(),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            steps,
            [
                "set",
                "flags LinkFlags(0x0)",
                "set",
                "flags LinkFlags(Up)",
                "addr",
                "route"
            ]
        );
    }

    #[test]
    fn nothing_to_change_only_brings_up() {
        let mut req = request();
        req.interfaces[0].mac.clear();
        req.interfaces[0].mtu = 0;
        req.interfaces[0].addresses.clear();
        req.routes.clear();
        let mut nl = Recorder {
            links: vec![("eth0", 3)],
            ..Default::default()
        };
        apply(&mut nl, &plan(&req).unwrap()).unwrap();
        assert_eq!(nl.sent.len(), 1);
    }

    #[test]
    fn errors_name_what_failed() {
        let mut nl = Recorder::default();
        let err = apply(&mut nl, &plan(&request()).unwrap()).unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.to_string().contains("eth0"), "{err}");

        let mut nl = Recorder {
            links: vec![("eth0", 2)],
            fail: Some((3, libc::ENETUNREACH)),
            ..Default::default()
        };
        let err = apply(&mut nl, &plan(&request()).unwrap()).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.to_string().contains("via 10.88.0.1"), "{err}");

        let mut nl = Recorder {
            links: vec![("eth0", 2)],
            fail: Some((2, libc::EAFNOSUPPORT)),
            ..Default::default()
        };
        let err = apply(&mut nl, &plan(&request()).unwrap()).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.to_string().contains("IPv4"), "{err}");
    }

    #[test]
    fn messages_encode_as_the_kernel_expects() {
        let buf = encode(RouteNetlinkMessage::SetLink(link_up(1)), 0, 9);
        // nlmsghdr: length, type RTM_SETLINK (19), flags REQUEST|ACK, seq.
        assert_eq!(
            u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize,
            buf.len()
        );
        assert_eq!(u16::from_ne_bytes(buf[4..6].try_into().unwrap()), 19);
        assert_eq!(
            u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 9);
        // ifinfomsg: family, pad, type, index 1, flags IFF_UP, change IFF_UP.
        assert_eq!(i32::from_ne_bytes(buf[20..24].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(buf[24..28].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(buf[28..32].try_into().unwrap()), 1);

        let a = encode(
            RouteNetlinkMessage::NewAddress(address(2, "10.1.2.3".parse().unwrap(), 24)),
            NLM_F_CREATE | NLM_F_REPLACE,
            1,
        );
        // RTM_NEWADDR (20); ifaddrmsg: AF_INET, /24, flags, scope, index 2.
        assert_eq!(u16::from_ne_bytes(a[4..6].try_into().unwrap()), 20);
        assert_eq!((a[16], a[17]), (libc::AF_INET as u8, 24));
        assert_eq!(u32::from_ne_bytes(a[20..24].try_into().unwrap()), 2);
        // Decodes back to the same message.
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&a).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) = back.payload else {
            panic!("{back:?}");
        };
        assert_eq!(m, address(2, "10.1.2.3".parse().unwrap(), 24));
    }

    #[test]
    fn acks_and_errors_are_read_by_sequence() {
        fn answer(seq: u32, code: i32) -> Vec<u8> {
            // nlmsghdr (16) + nlmsgerr: error code and the request's header.
            let mut buf = Vec::new();
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&code.to_ne_bytes());
            buf.extend_from_slice(&[0u8; 16]);
            buf
        }
        assert!(decode_ack(&answer(4, 0), 4).unwrap().is_ok());
        let err = decode_ack(&answer(4, -libc::EEXIST), 4)
            .unwrap()
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert!(decode_ack(&answer(3, 0), 4).is_none(), "another request's");
        let mut two = answer(3, 0);
        two.extend(answer(4, -libc::ENODEV));
        let err = decode_ack(&two, 4).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert!(decode_ack(&[1, 2, 3], 1).unwrap().is_err());
    }
}
