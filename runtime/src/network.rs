//! The pod's network, host side: the guest NIC becomes the pod's CNI
//! interface.
//!
//! containerd's CRI plugin (or arrow-cri) ran CNI in the sandbox's network
//! namespace, which left a veth (usually `eth0`) there with the pod's MAC,
//! addresses and routes. In that namespace the shim creates a tap
//! ([`TAP_NAME`]) for the VMM's virtio-net device and joins the two with tc
//! (the model Kata calls "tcfilter"): an ingress qdisc on each, and a u32
//! filter that matches every frame and redirects it (mirred egress redirect)
//! to the other. Frames pass untouched in both directions, so the guest must
//! *be* the veth: it takes the veth's MAC, MTU, addresses and routes
//! ([`GuestNetwork`], sent to arrow-init as `ConfigureNetwork`).
//!
//! Everything is done over rtnetlink from a thread that entered the
//! namespace (`setns` moves only the calling thread; a netlink socket and a
//! tap belong to the namespace they were opened in), never with `ip`/`tc`.
//! [`tear_down`] removes the filters, qdisc and tap again, so CNI DEL finds
//! the veth as it left it, and is safe to repeat or to call on a namespace
//! that is already gone.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use futures_util::stream::TryStreamExt;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use proto::agent::{ConfigureNetwork, Interface, IpAddress, Route};
use rtnetlink::packet_core::ErrorMessage;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::{TcHandle, TcMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The tap the shim creates in the pod's network namespace.
pub const TAP_NAME: &str = "tap0_arrow";
/// The name the guest kernel gives its (only) virtio-net NIC.
pub const GUEST_NIC: &str = "eth0";
/// The interface CNI creates by convention (`CNI_IFNAME`).
const CNI_IFNAME: &str = "eth0";
/// tc handle of an ingress qdisc (`ffff:`), the parent of its filters.
const INGRESS_PARENT: u32 = 0xffff_0000;
/// The priority of Arrow's redirect filters ("pref" in `tc filter show`):
/// teardown removes a CNI interface's ingress qdisc only when it holds a
/// filter of this priority, so a qdisc that was there before is never
/// Arrow's to remove.
const FILTER_PRIORITY: u16 = 0xa770;
/// The MTUs the VMM's virtio-net device accepts.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65_521;

/// Errors setting up or tearing down a pod's network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error("network namespace {0}: no interface besides loopback (did CNI run?)")]
    NoInterface(PathBuf),
    #[error(
        "network namespace {path}: several interfaces ({names}) and none named {CNI_IFNAME}; \
         an Arrow pod has one NIC"
    )]
    SeveralInterfaces { path: PathBuf, names: String },
    #[error("interface {name}: {why}")]
    Unsupported { name: String, why: String },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("creating tap {TAP_NAME}: {0}")]
    Tap(io::Error),
    #[error("network thread: {0}")]
    Thread(String),
    #[error(
        "network namespace {0}: that is the host's (or the shim's own) network namespace; \
         an Arrow pod needs a namespace of its own (hostNetwork pods cannot run in a microVM)"
    )]
    HostNetns(PathBuf),
    #[error(
        "network namespace {0}: not a namespace file (a /proc/<pid>/ns/net or a bind mount of one)"
    )]
    NotNetns(PathBuf),
    #[error("port-forward: {what}: {source}")]
    PortForward { what: String, source: io::Error },
}

/// Refuses a namespace that is the host's (PID 1's) or the shim's own: the
/// shim would move that namespace's interface traffic into the pod's tap.
/// Checked on the opened descriptor, the one `setns` then uses.
fn check_pod_netns(ns: &File, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |m: &std::fs::Metadata| (m.dev(), m.ino());
    /// `NSFS_MAGIC`: namespace files live on nsfs.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let fs = nix::sys::statfs::fstatfs(ns).map_err(|e| NetworkError::Netns {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        return Err(NetworkError::NotNetns(path.to_path_buf()));
    }
    let opened = ns.metadata().map_err(|source| NetworkError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    for forbidden in [
        "/proc/1/ns/net",
        "/proc/self/ns/net",
        "/proc/thread-self/ns/net",
    ] {
        if let Ok(m) = std::fs::metadata(forbidden) {
            if id(&m) == id(&opened) {
                return Err(NetworkError::HostNetns(path.to_path_buf()));
            }
        }
    }
    Ok(())
}

type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// What the sandbox's spec says about its network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodNetworkMode {
    /// A namespace that CNI set up: the guest gets a NIC joined to it.
    Namespace(PathBuf),
    /// No namespace path: a new empty namespace the runtime would create
    /// (the host's, hostNetwork, is refused before: `refuse_host_namespaces`).
    /// The guest gets no NIC, only `lo`.
    NoNic,
}

impl PodNetworkMode {
    /// The network namespace of an OCI spec: `linux.namespaces` of type
    /// `network` with a `path`.
    pub fn of(spec: &Spec) -> PodNetworkMode {
        let path = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n.typ() == LinuxNamespaceType::Network)
                    .and_then(|n| n.path().clone())
            });
        match path {
            Some(p) if !p.as_os_str().is_empty() => PodNetworkMode::Namespace(p),
            _ => PodNetworkMode::NoNic,
        }
    }
}

/// A route the guest must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestRoute {
    pub destination: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub metric: u32,
}

/// The pod interface as the guest must take it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
    pub routes: Vec<GuestRoute>,
}

impl GuestNetwork {
    /// The agent request for [`GUEST_NIC`], and what it leaves out. With
    /// `ipv6` false, IPv6 addresses and routes are left out (the caller logs
    /// them) and the guest keeps IPv4: for a guest kernel built without
    /// IPv6, which refuses them. On-link routes come before routes through
    /// a gateway, so every gateway is reachable when its route is added.
    pub fn to_request(&self, ipv6: bool) -> (ConfigureNetwork, Vec<String>) {
        let mut left_out = Vec::new();
        let addresses = self
            .addresses
            .iter()
            .filter(|(ip, prefix)| {
                let keep = ipv6 || ip.is_ipv4();
                if !keep {
                    left_out.push(format!("address {ip}/{prefix}"));
                }
                keep
            })
            .map(|(ip, prefix)| IpAddress {
                address: ip.to_string(),
                prefix_len: u32::from(*prefix),
            })
            .collect();
        let mut routes: Vec<&GuestRoute> = self
            .routes
            .iter()
            .filter(|r| {
                let keep = ipv6 || r.destination.is_ipv4();
                if !keep {
                    left_out.push(format!("route {}/{}", r.destination, r.prefix_len));
                }
                keep
            })
            .collect();
        routes.sort_by_key(|r| r.gateway.is_some());
        let routes = routes
            .into_iter()
            .map(|r| Route {
                destination: format!("{}/{}", r.destination, r.prefix_len),
                gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: GUEST_NIC.into(),
                source: r.source.map(|s| s.to_string()).unwrap_or_default(),
                metric: r.metric,
            })
            .collect();
        let request = ConfigureNetwork {
            interfaces: vec![Interface {
                name: GUEST_NIC.into(),
                mac: self.mac.to_vec(),
                mtu: self.mtu,
                addresses,
            }],
            routes,
        };
        (request, left_out)
    }
}

/// A pod network that [`set_up`] made: the tap's descriptor (for the VMM,
/// close-on-exec) and what the guest must configure.
#[derive(Debug)]
pub struct PodNetwork {
    pub netns: PathBuf,
    /// The CNI interface the tap is joined to.
    pub interface: String,
    pub tap: OwnedFd,
    pub guest: GuestNetwork,
}

/// One interface of the namespace, as read from `RTM_GETLINK`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LinkInfo {
    index: u32,
    name: String,
    mac: Option<Vec<u8>>,
    mtu: u32,
    loopback: bool,
    ethernet: bool,
}

impl LinkInfo {
    fn from_message(msg: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            loopback: msg.header.flags.contains(LinkFlags::Loopback)
                || msg.header.link_layer_type == LinkLayerType::Loopback,
            ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => info.name = name.clone(),
                LinkAttribute::Address(mac) => info.mac = Some(mac.clone()),
                LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
                _ => {}
            }
        }
        info
    }
}

/// The CNI interface among the namespace's links: the only one besides
/// loopback and our tap, or the one named `eth0` when there are several.
fn choose_interface<'a>(netns: &Path, links: &'a [LinkInfo]) -> Result<&'a LinkInfo> {
    let candidates: Vec<&LinkInfo> = links
        .iter()
        .filter(|l| !l.loopback && l.name != TAP_NAME)
        .collect();
    match candidates.as_slice() {
        [] => Err(NetworkError::NoInterface(netns.to_path_buf())),
        [one] => Ok(one),
        several => several
            .iter()
            .find(|l| l.name == CNI_IFNAME)
            .copied()
            .ok_or_else(|| NetworkError::SeveralInterfaces {
                path: netns.to_path_buf(),
                names: several
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
    }
}

/// The MAC and MTU the guest NIC takes, checked against what the VMM's
/// virtio-net device supports (an Ethernet unicast MAC, its MTU range).
fn nic_identity(link: &LinkInfo) -> Result<([u8; 6], u32)> {
    let unsupported = |why: String| NetworkError::Unsupported {
        name: link.name.clone(),
        why,
    };
    if !link.ethernet {
        return Err(unsupported(
            "not an Ethernet interface; the guest NIC is Ethernet".into(),
        ));
    }
    let mac: [u8; 6] = link
        .mac
        .as_deref()
        .and_then(|m| m.try_into().ok())
        .ok_or_else(|| unsupported(format!("hardware address {:?} is not a MAC", link.mac)))?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(unsupported(format!(
            "MAC {} is not unicast",
            format_mac(&mac)
        )));
    }
    if !MTU_RANGE.contains(&link.mtu) {
        return Err(unsupported(format!(
            "MTU {} outside what virtio-net takes ({MTU_RANGE:?})",
            link.mtu
        )));
    }
    Ok((mac, link.mtu))
}

pub use proto::mac::format_mac;

/// The addresses of interface `index` the guest takes: global (and site)
/// ones; link-local IPv6 addresses are the kernel's own, made per
/// interface.
fn guest_addresses(messages: &[AddressMessage], index: u32) -> Vec<(IpAddr, u8)> {
    messages
        .iter()
        .filter(|m| m.header.index == index && m.header.scope != AddressScope::Link)
        .filter(|m| m.header.scope != AddressScope::Host)
        .filter_map(|m| {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
            // peer's on point-to-point links); IPv6 has only IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            local.or(address).map(|ip| (ip, m.header.prefix_len))
        })
        .collect()
}

/// The routes through interface `index` that the guest needs: unicast
/// routes of the main table, except those the kernel makes by itself (the
/// prefix route of each address, which the guest's kernel makes too).
fn guest_routes(messages: &[RouteMessage], index: u32) -> Vec<GuestRoute> {
    messages
        .iter()
        .filter(|m| {
            let table = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(m.header.table));
            table == u32::from(RouteHeader::RT_TABLE_MAIN)
                && m.header.kind == RouteType::Unicast
                && m.header.protocol != RouteProtocol::Kernel
                && m.attributes.contains(&RouteAttribute::Oif(index))
        })
        .filter_map(|m| {
            let ip = |a: &RouteAddress| match a {
                RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
                RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
                _ => None,
            };
            let mut route = GuestRoute {
                destination: match m.header.address_family {
                    AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                },
                prefix_len: m.header.destination_prefix_length,
                gateway: None,
                source: None,
                metric: 0,
            };
            for attr in &m.attributes {
                match attr {
                    RouteAttribute::Destination(a) => route.destination = ip(a)?,
                    RouteAttribute::Gateway(a) => route.gateway = ip(a),
                    RouteAttribute::PrefSource(a) => route.source = ip(a),
                    RouteAttribute::Priority(p) => route.metric = *p,
                    _ => {}
                }
            }
            // IPv6 multicast and link-local routes are the kernel's.
            if let IpAddr::V6(v6) = route.destination {
                if v6.is_multicast() || v6.is_unicast_link_local() {
                    return None;
                }
            }
            Some(route)
        })
        .collect()
}

/// Runs `f` on a new thread that entered the network namespace `netns`.
/// A missing namespace is `Ok(None)` when `missing_ok`.
pub fn in_netns<T, F>(netns: &Path, missing_ok: bool, f: F) -> Result<Option<T>>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let ns = match File::open(netns) {
        Ok(file) => file,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(NetworkError::Netns {
                path: netns.to_path_buf(),
                source,
            })
        }
    };
    check_pod_netns(&ns, netns)?;
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, move || {
                // Only this thread moves; it ends with `f`, so no other
                // work ever runs in the pod's namespace by accident.
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |e| NetworkError::Netns {
                        path: netns.to_path_buf(),
                        source: e.into(),
                    },
                )?;
                f()
            })
            .map_err(|e| NetworkError::Thread(e.to_string()))?;
        thread
            .join()
            .map_err(|_| NetworkError::Thread("panicked".into()))?
            .map(Some)
    })
}

/// Runs the future `f` (given a netlink handle of the current thread's
/// namespace) to completion on a runtime of this thread.
fn with_netlink<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| NetworkError::Thread(e.to_string()))?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| NetworkError::Thread(format!("netlink socket: {e}")))?;
        let conn = tokio::spawn(conn);
        let result = f(handle).await;
        conn.abort();
        result
    })
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// The errno of a netlink error answer.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(ErrorMessage { code: Some(c), .. }) => Some(-c.get()),
        _ => None,
    }
}

async fn list_links(handle: &Handle) -> Result<Vec<LinkInfo>> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing interfaces"))?;
    Ok(messages.iter().map(LinkInfo::from_message).collect())
}

/// Creates the tap `TAP_NAME` in this thread's namespace (`TUNSETIFF`
/// creates it where `/dev/net/tun` was opened) and returns its descriptor,
/// close-on-exec: the caller hands it to the VMM on purpose.
fn create_tap() -> Result<OwnedFd> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(NetworkError::Tap)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..TAP_NAME.len()].copy_from_slice(TAP_NAME.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req`
    // matches in size and layout (name, then the flags union member), and
    // it outlives the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if ret < 0 {
        return Err(NetworkError::Tap(io::Error::last_os_error()));
    }
    Ok(file.into())
}

/// Sets up the pod's network in `netns` (blocking: run it off the async
/// runtime): reads the CNI interface, creates the tap, joins them with tc.
/// On failure everything made so far is removed again.
pub fn set_up(netns: &Path) -> Result<PodNetwork> {
    let made = in_netns(netns, false, || {
        with_netlink(|handle| async move {
            let links = list_links(&handle).await?;
            let veth = choose_interface(netns, &links)?.clone();
            let (mac, mtu) = nic_identity(&veth)?;
            // A tap a crashed shim left behind (its VMM gone) goes first.
            if let Some(old) = links.iter().find(|l| l.name == TAP_NAME) {
                handle
                    .link()
                    .del(old.index)
                    .execute()
                    .await
                    .map_err(nl(format!("removing a leftover {TAP_NAME}")))?;
            }
            let addresses: Vec<AddressMessage> = handle
                .address()
                .get()
                .set_link_index_filter(veth.index)
                .execute()
                .try_collect()
                .await
                .map_err(nl(format!("listing the addresses of {}", veth.name)))?;
            let mut routes: Vec<RouteMessage> = handle
                .route()
                .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing IPv4 routes"))?;
            let v6: Vec<RouteMessage> = handle
                .route()
                .get(RouteMessageBuilder::<std::net::Ipv6Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .map_err(nl("listing IPv6 routes"))?;
            routes.extend(v6);
            let guest = GuestNetwork {
                mac,
                mtu,
                addresses: guest_addresses(&addresses, veth.index),
                routes: guest_routes(&routes, veth.index),
            };
            let tap = create_tap()?;
            match join(&handle, &veth).await {
                Ok(()) => Ok(PodNetwork {
                    netns: netns.to_path_buf(),
                    interface: veth.name.clone(),
                    tap,
                    guest,
                }),
                Err(e) => {
                    // `join` left the veth as it found it; the tap goes.
                    let removed = match list_links(&handle).await {
                        Ok(now) => remove_tap(&handle, &now).await,
                        Err(e) => Err(e),
                    };
                    if let Err(undo) = removed {
                        log::warn!("removing {TAP_NAME} after a failed setup: {undo}");
                    }
                    Err(e)
                }
            }
        })
    })?;
    made.ok_or_else(|| NetworkError::NoInterface(netns.to_path_buf()))
}

/// Brings the tap up with the veth's MTU and adds the ingress qdiscs and
/// the two redirect filters.
async fn join(handle: &Handle, veth: &LinkInfo) -> Result<()> {
    let links = list_links(handle).await?;
    let tap = links
        .iter()
        .find(|l| l.name == TAP_NAME)
        .ok_or_else(|| NetworkError::Tap(io::Error::other("created, but not listed")))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(tap.index)
                .mtu(veth.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("bringing {TAP_NAME} up")))?;
    handle
        .link()
        .set(LinkUnspec::new_with_index(veth.index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {} up", veth.name)))?;
    // The veth's qdisc first: if it already has one (not Arrow's), nothing
    // of the veth's is touched, and the caller only removes the tap.
    add_ingress(handle, veth).await?;
    let redirects = async {
        add_redirect(handle, veth, tap).await?;
        add_ingress(handle, tap).await?;
        add_redirect(handle, tap, veth).await
    };
    if let Err(e) = redirects.await {
        if let Err(undo) = remove_ingress(handle, veth).await {
            log::warn!("removing the ingress qdisc of {} again: {undo}", veth.name);
        }
        return Err(e);
    }
    Ok(())
}

async fn add_ingress(handle: &Handle, link: &LinkInfo) -> Result<()> {
    handle
        .qdisc()
        .add(link.index as i32)
        .ingress()
        .execute()
        .await
        .map_err(nl(format!(
            "adding an ingress qdisc to {} (one that exists already is not Arrow's)",
            link.name
        )))
}

/// A u32 filter on `from`'s ingress that matches every frame and
/// redirects it to `to`'s egress (mirred), as `tc filter add dev FROM
/// ingress protocol all u32 match u8 0 0 action mirred egress redirect dev
/// TO` would.
async fn add_redirect(handle: &Handle, from: &LinkInfo, to: &LinkInfo) -> Result<()> {
    handle
        .traffic_filter(from.index as i32)
        .add()
        .parent(INGRESS_PARENT)
        .priority(FILTER_PRIORITY)
        // ETH_P_ALL, in network byte order as tc wants it.
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to.index)
        .map_err(nl("building the redirect filter"))?
        .execute()
        .await
        .map_err(nl(format!(
            "adding the filter redirecting {} to {}",
            from.name, to.name
        )))
}

/// Removes `link`'s ingress qdisc and its filters; none there is fine.
async fn remove_ingress(handle: &Handle, link: &LinkInfo) -> Result<()> {
    let mut del = handle.qdisc().del(link.index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    match del.execute().await {
        Ok(()) => Ok(()),
        // No ingress qdisc there (never added, or removed already).
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => Ok(()),
        Err(e) => Err(nl(format!("removing the ingress qdisc of {}", link.name))(
            e,
        )),
    }
}

/// Removes the tap if it exists (its qdisc and filter go with it).
async fn remove_tap(handle: &Handle, links: &[LinkInfo]) -> Result<()> {
    if let Some(tap) = links.iter().find(|l| l.name == TAP_NAME) {
        match handle.link().del(tap.index).execute().await {
            Err(e) if errno(&e) != Some(libc::ENODEV) => {
                return Err(nl(format!("removing {TAP_NAME}"))(e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Removes the tap (its qdisc and filter go with it) and the ingress qdisc
/// of the CNI interface (with its filter) if it holds Arrow's filter
/// ([`FILTER_PRIORITY`]; [`join`] refuses an interface that had a qdisc,
/// so such a qdisc is Arrow's). Missing pieces (CNI DEL came first, or an
/// earlier teardown) are fine.
async fn undo(netns: &Path, handle: &Handle) -> Result<()> {
    let links = list_links(handle).await?;
    remove_tap(handle, &links).await?;
    let Ok(veth) = choose_interface(netns, &links) else {
        // No CNI interface left (CNI DEL came first): nothing of ours.
        return Ok(());
    };
    let filters: Vec<TcMessage> = match handle
        .traffic_filter(veth.index as i32)
        .get()
        .ingress()
        .execute()
        .try_collect()
        .await
    {
        Ok(filters) => filters,
        // No ingress qdisc to hold filters.
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => return Ok(()),
        Err(e) => return Err(nl(format!("listing the filters of {}", veth.name))(e)),
    };
    if filters
        .iter()
        .any(|f| (f.header.info >> 16) as u16 == FILTER_PRIORITY)
    {
        remove_ingress(handle, veth).await?;
    }
    Ok(())
}

/// Undoes [`set_up`] in `netns`: removes the tap and the tc redirect, so
/// the namespace holds what CNI left. Blocking. A namespace that no longer
/// exists (CNI DEL and its removal came first) has nothing left to undo.
pub fn tear_down(netns: &Path) -> Result<()> {
    in_netns(netns, true, || {
        with_netlink(|handle| async move { undo(netns, &handle).await })
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn link(index: u32, name: &str, loopback: bool) -> LinkInfo {
        LinkInfo {
            index,
            name: name.into(),
            mac: Some(vec![0x0a, 0x58, 0x0a, 0x58, 0, index as u8]),
            mtu: 1500,
            loopback,
            ethernet: !loopback,
        }
    }

    #[test]
    fn netns_path_from_the_spec() {
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[
                {"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            PodNetworkMode::of(&spec),
            PodNetworkMode::Namespace("/var/run/netns/cni-1".into())
        );
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"network"}]}}"#,
        )
        .unwrap();
        assert_eq!(PodNetworkMode::of(&spec), PodNetworkMode::NoNic);
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"}]}}"#,
        )
        .unwrap();
        assert_eq!(
            PodNetworkMode::of(&spec),
            PodNetworkMode::NoNic,
            "hostNetwork"
        );
    }

    #[test]
    fn the_cni_interface_is_chosen() {
        let p = Path::new("/ns");
        let lo = link(1, "lo", true);
        let eth0 = link(2, "eth0", false);
        let tap = link(3, TAP_NAME, false);
        let net1 = link(4, "net1", false);
        assert_eq!(
            choose_interface(p, &[lo.clone(), eth0.clone(), tap.clone()]).unwrap(),
            &eth0
        );
        assert_eq!(
            choose_interface(p, &[lo.clone(), net1.clone()]).unwrap(),
            &net1,
            "the only one, whatever its name"
        );
        assert_eq!(
            choose_interface(p, &[lo.clone(), net1.clone(), eth0.clone()]).unwrap(),
            &eth0
        );
        assert!(matches!(
            choose_interface(p, &[lo.clone(), tap]),
            Err(NetworkError::NoInterface(_))
        ));
        let mut net2 = net1.clone();
        net2.name = "net2".into();
        let err = choose_interface(p, &[lo, net1, net2]).unwrap_err();
        assert!(err.to_string().contains("net1, net2"), "{err}");
    }

    #[test]
    fn the_nic_must_fit_virtio_net() {
        let eth0 = link(2, "eth0", false);
        assert_eq!(
            nic_identity(&eth0).unwrap(),
            ([0x0a, 0x58, 0x0a, 0x58, 0, 2], 1500)
        );
        let mut bad = eth0.clone();
        bad.mtu = 65_535;
        assert!(nic_identity(&bad).is_err());
        let mut bad = eth0.clone();
        bad.mac = Some(vec![1, 0, 0, 0, 0, 1]);
        assert!(nic_identity(&bad)
            .unwrap_err()
            .to_string()
            .contains("unicast"));
        let mut bad = eth0.clone();
        bad.mac = None;
        assert!(nic_identity(&bad).is_err());
        let mut bad = eth0;
        bad.ethernet = false;
        assert!(nic_identity(&bad)
            .unwrap_err()
            .to_string()
            .contains("Ethernet"));
    }

    fn addr(index: u32, ip: IpAddr, prefix: u8, scope: AddressScope) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix;
        m.header.scope = scope;
        m.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.attributes.push(AddressAttribute::Address(ip));
        if ip.is_ipv4() {
            m.attributes.push(AddressAttribute::Local(ip));
        }
        m
    }

    #[test]
    fn addresses_skip_link_local_and_other_interfaces() {
        let v4: IpAddr = "10.88.0.7".parse().unwrap();
        let v6: IpAddr = "fd00::7".parse().unwrap();
        let ll: IpAddr = "fe80::1".parse().unwrap();
        let msgs = [
            addr(2, v4, 16, AddressScope::Universe),
            addr(2, v6, 64, AddressScope::Universe),
            addr(2, ll, 64, AddressScope::Link),
            addr(1, "127.0.0.1".parse().unwrap(), 8, AddressScope::Host),
            addr(3, "10.1.0.1".parse().unwrap(), 24, AddressScope::Universe),
        ];
        assert_eq!(guest_addresses(&msgs, 2), vec![(v4, 16), (v6, 64)]);
    }

    fn route(
        dest: Option<(IpAddr, u8)>,
        gw: Option<IpAddr>,
        oif: u32,
        protocol: RouteProtocol,
    ) -> RouteMessage {
        let mut m = RouteMessage::default();
        let v6 = dest.map(|d| d.0.is_ipv6()).unwrap_or(false) || gw.is_some_and(|g| g.is_ipv6());
        m.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.kind = RouteType::Unicast;
        m.header.protocol = protocol;
        if let Some((ip, len)) = dest {
            m.header.destination_prefix_length = len;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        }
        if let Some(gw) = gw {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        m.attributes.push(RouteAttribute::Table(254));
        m.attributes.push(RouteAttribute::Oif(oif));
        m
    }

    #[test]
    fn routes_keep_cni_ones_and_drop_the_kernels() {
        let gw: IpAddr = "10.88.0.1".parse().unwrap();
        let mut local = route(
            Some(("10.88.0.7".parse().unwrap(), 32)),
            None,
            2,
            RouteProtocol::Kernel,
        );
        local.header.kind = RouteType::Local;
        let msgs = [
            route(None, Some(gw), 2, RouteProtocol::Boot),
            route(
                Some(("10.88.0.0".parse().unwrap(), 16)),
                None,
                2,
                RouteProtocol::Kernel,
            ),
            route(
                Some(("192.168.5.0".parse().unwrap(), 24)),
                Some(gw),
                2,
                RouteProtocol::Static,
            ),
            route(
                Some(("10.9.0.0".parse().unwrap(), 16)),
                None,
                3,
                RouteProtocol::Boot,
            ),
            route(
                Some(("fe80::".parse().unwrap(), 64)),
                None,
                2,
                RouteProtocol::Boot,
            ),
            local,
        ];
        let routes = guest_routes(&msgs, 2);
        assert_eq!(
            routes,
            vec![
                GuestRoute {
                    destination: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    prefix_len: 0,
                    gateway: Some(gw),
                    source: None,
                    metric: 0
                },
                GuestRoute {
                    destination: "192.168.5.0".parse().unwrap(),
                    prefix_len: 24,
                    gateway: Some(gw),
                    source: None,
                    metric: 0
                },
            ]
        );
    }

    #[test]
    fn the_request_has_ipv4_on_link_routes_first() {
        let gw: IpAddr = "10.88.0.1".parse().unwrap();
        let net = GuestNetwork {
            mac: [0x0a, 0x58, 0x0a, 0x58, 0, 7],
            mtu: 1450,
            addresses: vec![
                ("10.88.0.7".parse().unwrap(), 16),
                ("fd00::7".parse().unwrap(), 64),
            ],
            routes: vec![
                GuestRoute {
                    destination: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    prefix_len: 0,
                    gateway: Some(gw),
                    source: None,
                    metric: 0,
                },
                GuestRoute {
                    destination: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    prefix_len: 0,
                    gateway: Some("fe80::1".parse().unwrap()),
                    source: None,
                    metric: 0,
                },
                GuestRoute {
                    destination: "10.0.0.1".parse().unwrap(),
                    prefix_len: 32,
                    gateway: None,
                    source: Some("10.88.0.7".parse().unwrap()),
                    metric: 5,
                },
            ],
        };
        let (req, left_out) = net.to_request(false);
        assert_eq!(left_out, ["address fd00::7/64", "route ::/0"]);
        assert_eq!(req.interfaces.len(), 1);
        let nic = &req.interfaces[0];
        assert_eq!(
            (nic.name.as_str(), nic.mac.as_slice(), nic.mtu),
            ("eth0", &[0x0a, 0x58, 0x0a, 0x58, 0, 7][..], 1450)
        );
        assert_eq!(nic.addresses.len(), 1);
        assert_eq!(nic.addresses[0].address, "10.88.0.7");
        let routes: Vec<(&str, &str)> = req
            .routes
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str()))
            .collect();
        assert_eq!(routes, [("10.0.0.1/32", ""), ("0.0.0.0/0", "10.88.0.1")]);
        assert_eq!(req.routes[0].source, "10.88.0.7");
        assert_eq!(req.routes[0].metric, 5);
        assert!(req.routes.iter().all(|r| r.device == "eth0"));
    }

    #[test]
    fn a_dual_stack_request_keeps_ipv6() {
        let net = GuestNetwork {
            mac: [0x0a, 0x58, 0x0a, 0x58, 0, 7],
            mtu: 1500,
            addresses: vec![
                ("10.88.0.7".parse().unwrap(), 16),
                ("fd88::7".parse().unwrap(), 64),
            ],
            routes: vec![
                GuestRoute {
                    destination: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    prefix_len: 0,
                    gateway: Some("fd88::1".parse().unwrap()),
                    source: None,
                    metric: 1024,
                },
                GuestRoute {
                    destination: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    prefix_len: 0,
                    gateway: Some("10.88.0.1".parse().unwrap()),
                    source: None,
                    metric: 0,
                },
            ],
        };
        let (req, left_out) = net.to_request(true);
        assert!(left_out.is_empty(), "{left_out:?}");
        let addresses: Vec<(&str, u32)> = req.interfaces[0]
            .addresses
            .iter()
            .map(|a| (a.address.as_str(), a.prefix_len))
            .collect();
        assert_eq!(addresses, [("10.88.0.7", 16), ("fd88::7", 64)]);
        let routes: Vec<(&str, &str, u32)> = req
            .routes
            .iter()
            .map(|r| (r.destination.as_str(), r.gateway.as_str(), r.metric))
            .collect();
        assert_eq!(
            routes,
            [("::/0", "fd88::1", 1024), ("0.0.0.0/0", "10.88.0.1", 0)]
        );
    }

    #[test]
    fn the_host_netns_is_refused() {
        for path in ["/proc/1/ns/net", "/proc/self/ns/net"] {
            if !Path::new(path).exists() {
                continue;
            }
            let err = set_up(Path::new(path)).unwrap_err();
            assert!(matches!(err, NetworkError::HostNetns(_)), "{path}: {err}");
            let err = tear_down(Path::new(path)).unwrap_err();
            assert!(matches!(err, NetworkError::HostNetns(_)), "{path}: {err}");
        }
        let not_ns = tempfile::NamedTempFile::new().unwrap();
        let err = set_up(not_ns.path()).unwrap_err();
        assert!(matches!(err, NetworkError::NotNetns(_)), "{err}");
    }

    #[test]
    fn tear_down_of_a_vanished_netns_is_done() {
        tear_down(Path::new("/nonexistent/netns/arrow-test")).unwrap();
    }
}
