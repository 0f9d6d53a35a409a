//! The guest's network: `lo` comes up at boot (every pod has a loopback,
//! NIC or not), and `ConfigureNetwork` turns the virtio-net NIC into the
//! pod's interface (its MAC, MTU, addresses and routes, see agent.proto).
//!
//! It talks rtnetlink directly (one `NETLINK_ROUTE` socket, one request and
//! its ack at a time): no `ip` binary exists in the guest, and every system
//! call is expensive on an emulated host, so a configuration costs one
//! socket and two system calls per change. The few requests it makes are
//! built by hand ([`Change::encode`]; unit tests check them byte for byte
//! against `netlink-packet-route`), which keeps arrow-init small. Applying
//! goes through [`Rtnetlink`], so unit tests check the requests and their
//! order against a recording fake.

use std::io;
use std::net::IpAddr;

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use proto::agent::ConfigureNetwork;
use proto::mac::format_mac;

use crate::error::AgentError;

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

/// What applying a plan needs from the kernel. The real one is
/// [`RtnlSocket`]; unit tests record.
pub trait Rtnetlink {
    /// The index of interface `name`, or `None` if there is none.
    fn link_index(&mut self, name: &str) -> io::Result<Option<u32>>;
    /// Sends one change as a request and waits for its acknowledgement; a
    /// netlink error comes back as its errno.
    fn request(&mut self, change: &Change) -> io::Result<()>;
}

/// Applies a validated plan: per interface MAC and MTU (live, or down and
/// up again if the driver refuses a live MAC change), up,
/// addresses; then the routes in order.
pub fn apply(nl: &mut dyn Rtnetlink, plan: &Plan) -> Result<(), AgentError> {
    // A kernel without IPv6 has no rtnetlink handler for it: the request
    // fails with EOPNOTSUPP (EAFNOSUPPORT from some paths). Arrow's kernel
    // always has IPv4 (CONFIG_INET).
    let family_missing = |ip: &IpAddr, e: &io::Error| {
        ip.is_ipv6()
            && matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EAFNOSUPPORT)
            )
    };
    let mut indices = Vec::with_capacity(plan.links.len());
    for link in &plan.links {
        let index = nl
            .link_index(&link.name)
            .map_err(|e| AgentError::Guest(format!("looking up {}: {e}", link.name)))?
            .ok_or_else(|| AgentError::InterfaceNotFound(link.name.clone()))?;
        indices.push((link.name.as_str(), index));
        if link.mac.is_some() || link.mtu.is_some() {
            let set_err =
                |e: io::Error| AgentError::Guest(format!("setting MAC/MTU of {}: {e}", link.name));
            let set = Change::SetLink {
                index,
                mac: link.mac,
                mtu: link.mtu,
            };
            match nl.request(&set) {
                Ok(()) => {}
                // A driver without live MAC changes wants the NIC down
                // (virtio-net allows them; the NIC is up from boot).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    nl.request(&Change::SetUp { index, up: false })
                        .map_err(set_err)?;
                    nl.request(&set).map_err(set_err)?;
                }
                Err(e) => return Err(set_err(e)),
            }
        }
        nl.request(&Change::SetUp { index, up: true })
            .map_err(|e| AgentError::Guest(format!("bringing {} up: {e}", link.name)))?;
        for &(ip, prefix) in &link.addresses {
            match nl.request(&Change::AddAddress { index, ip, prefix }) {
                Ok(()) => {}
                Err(e) if family_missing(&ip, &e) => {
                    return Err(AgentError::FailedPrecondition(format!(
                        "{ip}/{prefix} on {}: the guest kernel has no {} support",
                        link.name,
                        family_name(&ip)
                    )))
                }
                Err(e) => {
                    return Err(AgentError::Guest(format!(
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
            return Err(AgentError::InvalidArgument(format!(
                "route through unknown interface {:?}",
                r.device
            )));
        };
        match nl.request(&Change::AddRoute {
            index,
            route: r.clone(),
        }) {
            Ok(()) => {}
            Err(e) if family_missing(&r.destination, &e) => {
                return Err(AgentError::FailedPrecondition(format!(
                    "route to {}/{}: the guest kernel has no {} support",
                    r.destination,
                    r.prefix_len,
                    family_name(&r.destination)
                )))
            }
            Err(e) => {
                let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
                return Err(AgentError::Guest(format!(
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

/// ConfigureNetwork in the guest: validate, open a netlink socket, apply;
/// then each interface whose MAC was set gets its IPv6 link-local address,
/// made from that MAC (see [`boot_up`]).
pub fn configure(req: &ConfigureNetwork) -> Result<(), AgentError> {
    let plan = plan(req).map_err(AgentError::InvalidArgument)?;
    let mut nl = RtnlSocket::open().map_err(|source| AgentError::Internal {
        what: "opening a netlink socket",
        source,
    })?;
    apply(&mut nl, &plan)?;
    for link in plan.links.iter().filter(|l| l.mac.is_some()) {
        set_addr_gen_mode(&link.name, AddrGenMode::Eui64).map_err(|e| {
            AgentError::Guest(format!("IPv6 link-local address of {}: {e}", link.name))
        })?;
    }
    Ok(())
}

/// How the kernel makes an interface's IPv6 link-local address (its
/// `addr_gen_mode` sysctl).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AddrGenMode {
    /// fe80::/64 from the MAC (EUI-64), the kernel's default.
    Eui64,
    /// None.
    None,
}

impl AddrGenMode {
    fn sysctl_value(self) -> &'static str {
        match self {
            Self::Eui64 => "0",
            Self::None => "1",
        }
    }
}

fn addr_gen_mode_path(interface: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{interface}/addr_gen_mode")
}

/// Sets `interface`'s link-local address generation; switching it back to
/// EUI-64 on an up interface makes the address at once. A kernel without
/// IPv6 has no such file: nothing to do.
fn set_addr_gen_mode(interface: &str, mode: AddrGenMode) -> io::Result<()> {
    match std::fs::write(addr_gen_mode_path(interface), mode.sysctl_value()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// The NIC arrow-init brings up at boot, if the VM has one.
pub const BOOT_NIC: &str = "eth0";

/// At boot: brings `lo` up (127.0.0.1 comes with it) and the NIC, if the
/// VM has one. Bringing a virtio-net NIC up fills its receive ring, which
/// costs hundreds of milliseconds where the guest kernel is emulated; done
/// here it is part of the template, and a clone only changes the MAC
/// (live: virtio-net allows that) and adds addresses. With no address the
/// NIC sends nothing meanwhile. Returns whether a NIC came up.
///
/// The kernel makes an IPv6 link-local address from the MAC when the NIC
/// comes up, and keeps it when the MAC changes: every clone would share
/// the template's on the pod network. So the NIC comes up without one, and
/// [`configure`] has the kernel make it once the pod's MAC is set.
pub fn boot_up() -> io::Result<bool> {
    let mut nl = RtnlSocket::open()?;
    nl.request(&Change::SetUp {
        index: LOOPBACK_INDEX,
        up: true,
    })?;
    match nl.link_index(BOOT_NIC)? {
        Some(index) => {
            set_addr_gen_mode(BOOT_NIC, AddrGenMode::None)?;
            nl.request(&Change::SetUp { index, up: true })?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// How the guest's TCP sizes its TSO bursts from the connection's minimum
/// RTT: it adds `gso_max_size >> (min_rtt_us >> tcp_tso_rtt_log)` to the
/// pacing rate's share. The kernel's 9 (512 µs) stops adding past a few
/// milliseconds of RTT, and a guest whose kernel is emulated (kvm_pvm) puts
/// every RTT there by its own processing: its TCP then sends 2-segment
/// packets, each costing the emulated stack as much as a 64 KiB one (pod →
/// host went from 0.18 to 1.4 MB/s with this). 15 keeps full bursts below
/// 32 ms of RTT; on hardware KVM pod RTTs are far below 512 µs, where the
/// setting changes nothing.
const TSO_RTT_LOG_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_tso_rtt_log";
const TSO_RTT_LOG: &str = "15";

/// At boot, with a NIC: tunes the guest's TCP for the VM it runs in (see
/// [`TSO_RTT_LOG`]).
pub fn tune_tcp() -> io::Result<()> {
    std::fs::write(TSO_RTT_LOG_SYSCTL, TSO_RTT_LOG)
}

/// One rtnetlink request arrow-init makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `RTM_SETLINK`: the MAC and/or MTU.
    SetLink {
        index: u32,
        mac: Option<[u8; 6]>,
        mtu: Option<u32>,
    },
    /// `RTM_SETLINK`: `IFF_UP` set or cleared (only that flag changes).
    SetUp { index: u32, up: bool },
    /// `RTM_NEWADDR`, create or replace. IPv6 addresses skip duplicate
    /// address detection: the host's side of the pod network already owns
    /// them, and DAD would keep them unusable for a second or more.
    AddAddress { index: u32, ip: IpAddr, prefix: u8 },
    /// `RTM_NEWROUTE` in the main table, create or replace: a unicast route,
    /// scope link when it has no gateway.
    AddRoute { index: u32, route: RoutePlan },
}

// <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const IFF_UP: u32 = 0x1;
const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x2;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;

impl Change {
    /// The request as the kernel reads it, numbered `seq`.
    ///
    /// Built by hand (a header, a fixed struct and a few attributes): the
    /// generic rtnetlink emitter would link every message type into
    /// arrow-init. The unit tests check these bytes against
    /// `netlink-packet-route`'s.
    pub fn encode(&self, seq: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(96);
        let (kind, flags) = match self {
            Change::SetLink { .. } | Change::SetUp { .. } => (RTM_SETLINK, 0),
            Change::AddAddress { .. } => (RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE),
            Change::AddRoute { .. } => (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE),
        };
        // struct nlmsghdr; the length is filled in at the end.
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        match self {
            Change::SetLink { index, mac, mtu } => {
                ifinfomsg(&mut m, *index, 0, 0);
                if let Some(mac) = mac {
                    attr(&mut m, IFLA_ADDRESS, mac);
                }
                if let Some(mtu) = mtu {
                    attr(&mut m, IFLA_MTU, &mtu.to_ne_bytes());
                }
            }
            Change::SetUp { index, up } => {
                ifinfomsg(&mut m, *index, if *up { IFF_UP } else { 0 }, IFF_UP);
            }
            Change::AddAddress { index, ip, prefix } => {
                // struct ifaddrmsg: family, prefixlen, flags, scope, index.
                m.extend_from_slice(&[family(ip), *prefix, 0, 0]);
                m.extend_from_slice(&index.to_ne_bytes());
                attr(&mut m, IFA_LOCAL, &ip_bytes(ip));
                attr(&mut m, IFA_ADDRESS, &ip_bytes(ip));
                if ip.is_ipv6() {
                    attr(&mut m, IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
                }
            }
            Change::AddRoute { index, route: r } => {
                let scope = if r.gateway.is_some() {
                    RT_SCOPE_UNIVERSE
                } else {
                    RT_SCOPE_LINK
                };
                // struct rtmsg: family, dst_len, src_len, tos, table,
                // protocol, scope, type, flags.
                m.extend_from_slice(&[
                    family(&r.destination),
                    r.prefix_len,
                    0,
                    0,
                    RT_TABLE_MAIN,
                    RTPROT_BOOT,
                    scope,
                    RTN_UNICAST,
                ]);
                m.extend_from_slice(&0u32.to_ne_bytes());
                if r.prefix_len > 0 {
                    attr(&mut m, RTA_DST, &ip_bytes(&r.destination));
                }
                if let Some(gw) = &r.gateway {
                    attr(&mut m, RTA_GATEWAY, &ip_bytes(gw));
                }
                if let Some(src) = &r.source {
                    attr(&mut m, RTA_PREFSRC, &ip_bytes(src));
                }
                if r.metric != 0 {
                    attr(&mut m, RTA_PRIORITY, &r.metric.to_ne_bytes());
                }
                attr(&mut m, RTA_OIF, &index.to_ne_bytes());
            }
        }
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }
}

/// `struct ifinfomsg`: family, pad, type, index, flags, change.
fn ifinfomsg(m: &mut Vec<u8>, index: u32, flags: u32, change: u32) {
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&index.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&change.to_ne_bytes());
}

/// One attribute (`struct rtattr` and its payload), padded to 4 bytes.
fn attr(m: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    // Payloads here are at most 16 bytes.
    let len = (4 + payload.len()) as u16;
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(payload);
    m.resize(m.len().next_multiple_of(4), 0);
}

fn family(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
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

    fn request(&mut self, change: &Change) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let buf = change.encode(seq);
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
        sent: Vec<Change>,
        /// Fail the request with this index (0-based) with this errno.
        fail: Option<(usize, i32)>,
    }

    impl Rtnetlink for Recorder {
        fn link_index(&mut self, name: &str) -> io::Result<Option<u32>> {
            Ok(self.links.iter().find(|(n, _)| *n == name).map(|l| l.1))
        }

        fn request(&mut self, change: &Change) -> io::Result<()> {
            let n = self.sent.len();
            self.sent.push(change.clone());
            match self.fail {
                Some((at, errno)) if at == n => Err(io::Error::from_raw_os_error(errno)),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn addr_gen_modes_are_the_kernels_numbers() {
        // include/uapi/linux/if_link.h: IN6_ADDR_GEN_MODE_EUI64 = 0, _NONE = 1.
        assert_eq!(AddrGenMode::Eui64.sysctl_value(), "0");
        assert_eq!(AddrGenMode::None.sysctl_value(), "1");
        assert_eq!(
            addr_gen_mode_path("eth0"),
            "/proc/sys/net/ipv6/conf/eth0/addr_gen_mode"
        );
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
        let plan = plan(&request()).unwrap();
        assert_eq!(
            nl.sent,
            vec![
                Change::SetLink {
                    index: 2,
                    mac: Some([0x0a, 0x58, 0x0a, 0x58, 0, 7]),
                    mtu: Some(1450),
                },
                Change::SetUp { index: 2, up: true },
                Change::AddAddress {
                    index: 2,
                    ip: "10.88.0.7".parse().unwrap(),
                    prefix: 16,
                },
                Change::AddRoute {
                    index: 2,
                    route: plan.routes[0].clone(),
                },
            ]
        );
    }

    #[test]
    fn a_refused_live_mac_change_is_done_while_down() {
        let mut nl = Recorder {
            links: vec![("eth0", 2)],
            fail: Some((0, libc::EBUSY)),
            ..Default::default()
        };
        apply(&mut nl, &plan(&request()).unwrap()).unwrap();
        let set = Change::SetLink {
            index: 2,
            mac: Some([0x0a, 0x58, 0x0a, 0x58, 0, 7]),
            mtu: Some(1450),
        };
        assert_eq!(
            nl.sent[..4],
            [
                set.clone(),
                Change::SetUp {
                    index: 2,
                    up: false
                },
                set,
                Change::SetUp { index: 2, up: true },
            ]
        );
        assert_eq!(nl.sent.len(), 6, "then the address and the route");
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

        // No IPv6 in the kernel: FAILED_PRECONDITION, naming it.
        let mut req = request();
        req.interfaces[0].addresses[0] = IpAddress {
            address: "fd00::7".into(),
            prefix_len: 64,
        };
        let mut nl = Recorder {
            links: vec![("eth0", 2)],
            fail: Some((2, libc::EOPNOTSUPP)),
            ..Default::default()
        };
        let err = apply(&mut nl, &plan(&req).unwrap()).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.to_string().contains("no IPv6"), "{err}");
        // The same errno for IPv4 is a plain failure.
        let mut nl = Recorder {
            links: vec![("eth0", 2)],
            fail: Some((2, libc::EOPNOTSUPP)),
            ..Default::default()
        };
        let err = apply(&mut nl, &plan(&request()).unwrap()).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }

    /// The same requests built with `netlink-packet-route` (the maintained
    /// rtnetlink implementation), to check the hand-made bytes against.
    mod reference {
        use std::net::IpAddr;

        use netlink_packet_core::{
            NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
            NLM_F_REQUEST,
        };
        use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
        use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
        use netlink_packet_route::route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
            RouteType,
        };
        use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

        use super::super::{Change, RoutePlan};

        pub fn encode(change: &Change, seq: u32) -> Vec<u8> {
            let (msg, flags) = match change {
                Change::SetLink { index, mac, mtu } => {
                    let mut msg = LinkMessage::default();
                    msg.header.index = *index;
                    if let Some(mac) = mac {
                        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
                    }
                    if let Some(mtu) = mtu {
                        msg.attributes.push(LinkAttribute::Mtu(*mtu));
                    }
                    (RouteNetlinkMessage::SetLink(msg), 0)
                }
                Change::SetUp { index, up } => {
                    let mut msg = LinkMessage::default();
                    msg.header.index = *index;
                    if *up {
                        msg.header.flags = LinkFlags::Up;
                    }
                    msg.header.change_mask = LinkFlags::Up;
                    (RouteNetlinkMessage::SetLink(msg), 0)
                }
                Change::AddAddress { index, ip, prefix } => (
                    RouteNetlinkMessage::NewAddress(address(*index, *ip, *prefix)),
                    NLM_F_CREATE | NLM_F_REPLACE,
                ),
                Change::AddRoute { index, route: r } => (
                    RouteNetlinkMessage::NewRoute(route(*index, r)),
                    NLM_F_CREATE | NLM_F_REPLACE,
                ),
            };
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            header.sequence_number = seq;
            let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
            packet.finalize();
            let mut buf = vec![0u8; packet.buffer_len()];
            packet.serialize(&mut buf);
            buf
        }

        fn address(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
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

        fn route(index: u32, r: &RoutePlan) -> RouteMessage {
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
    }

    #[test]
    fn requests_encode_as_netlink_packet_route_does() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let changes = [
            Change::SetLink {
                index: 2,
                mac: Some([0x0a, 0x58, 0x0a, 0x58, 0, 7]),
                mtu: Some(1450),
            },
            Change::SetLink {
                index: 2,
                mac: None,
                mtu: Some(9000),
            },
            Change::SetUp { index: 1, up: true },
            Change::SetUp {
                index: 7,
                up: false,
            },
            Change::AddAddress {
                index: 2,
                ip: ip("10.1.2.3"),
                prefix: 24,
            },
            Change::AddAddress {
                index: 2,
                ip: ip("fd00::7"),
                prefix: 64,
            },
            Change::AddRoute {
                index: 2,
                route: RoutePlan {
                    destination: ip("0.0.0.0"),
                    prefix_len: 0,
                    gateway: Some(ip("10.88.0.1")),
                    device: "eth0".into(),
                    source: None,
                    metric: 0,
                },
            },
            Change::AddRoute {
                index: 3,
                route: RoutePlan {
                    destination: ip("10.0.0.0"),
                    prefix_len: 8,
                    gateway: None,
                    device: "eth0".into(),
                    source: Some(ip("10.88.0.7")),
                    metric: 100,
                },
            },
            Change::AddRoute {
                index: 2,
                route: RoutePlan {
                    destination: ip("fd00::"),
                    prefix_len: 48,
                    gateway: Some(ip("fe80::1")),
                    device: "eth0".into(),
                    source: None,
                    metric: 0,
                },
            },
        ];
        for (seq, change) in changes.iter().enumerate() {
            let seq = seq as u32 + 1;
            assert_eq!(
                change.encode(seq),
                reference::encode(change, seq),
                "{change:?}"
            );
        }
        // And the header fields the kernel checks, spelled out once.
        let buf = Change::SetUp { index: 1, up: true }.encode(9);
        assert_eq!(
            u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize,
            buf.len()
        );
        assert_eq!(
            u16::from_ne_bytes(buf[4..6].try_into().unwrap()),
            RTM_SETLINK
        );
        assert_eq!(
            u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 9);
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
