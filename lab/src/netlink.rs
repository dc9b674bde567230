//! Links, addresses and routes inside a namespace, over rtnetlink (no `ip` binary).
//!
//! Each batch of requests runs on a fresh thread that has entered the namespace: the netlink
//! socket is opened there, so it talks to that namespace's kernel tables, and a small
//! single-threaded Tokio runtime on the same thread drives it. The root namespace is only ever
//! read ([`NetState::host`]), never changed.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, State};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::addresses::{IpCidr, Ipv4Cidr, Ipv6Cidr};
use crate::{LabError, Netns};

/// Upper bound for one batch of netlink requests: the kernel answers in microseconds, so this
/// only matters if something is badly wrong.
const NETLINK_BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A namespace's interfaces, addresses and routes, as read over rtnetlink: for assertions and for
/// showing the topology (`weft demo`).
/// The address of every bridge the lab makes (`02:57:46:00:00:01`, locally administered,
/// "WF"): set explicitly so it never follows its ports (see [`Nl::add_bridge`]). Each bridge is
/// its own L2 domain, so the bridges can share it.
const BRIDGE_MAC: [u8; 6] = [0x02, 0x57, 0x46, 0x00, 0x00, 0x01];

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetState {
    /// Interfaces, in index order.
    pub links: Vec<LinkState>,
    /// IPv4 and IPv6 addresses.
    pub addresses: Vec<AddressState>,
    /// IPv4 and IPv6 routes of every table.
    pub routes: Vec<RouteState>,
}

/// One interface.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkState {
    /// Interface index inside its namespace.
    pub index: u32,
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// The driver kind, e.g. `veth` or `bridge` (empty for loopback and physical devices).
    pub kind: String,
    /// Administratively up (`ip link set up`).
    pub up: bool,
    /// Operational state reported by the kernel, e.g. "Up", "Down", "Unknown" (loopback).
    pub oper_state: String,
    /// The kernel sees a carrier (for a veth: both ends are up; for a bridge: a port forwards).
    pub carrier: bool,
    /// Index of the bridge this interface is a port of, if any.
    pub controller: Option<u32>,
}

/// One address on an interface.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressState {
    /// The interface's name.
    pub interface: String,
    /// The address.
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// One route, of either family.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteState {
    /// Routing table id (254 = main, 255 = local).
    pub table: u32,
    /// Destination network (`0.0.0.0/0` or `::/0` for a default route).
    pub destination: IpCidr,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface name, if any.
    pub interface: Option<String>,
}

impl NetState {
    /// Reads the *root* network namespace (the one this process started in), read-only: used by
    /// tests to prove that building a lab changes nothing there.
    pub fn host() -> Result<NetState, LabError> {
        // /proc/self/ns/net is the thread-group leader's namespace; the lab never moves that
        // thread, so it is the namespace the process started in.
        let file =
            File::open("/proc/self/ns/net").map_err(|e| LabError::namespace("root", "open /proc/self/ns/net", e))?;
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| LabError::namespace("root", "enter the root namespace (setns) to read it", e))?;
                block_on("root", |nl| async move { nl.state().await })
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// The link named `name`, if present.
    pub fn link(&self, name: &str) -> Option<&LinkState> {
        self.links.iter().find(|l| l.name == name)
    }
}

impl Netns {
    /// Reads this namespace's interfaces, addresses and routes.
    pub fn state(&self) -> Result<NetState, LabError> {
        netlink(self, |nl| async move { nl.state().await })
    }
}

/// Runs a batch of netlink requests inside `ns`; see the module documentation.
pub(crate) fn netlink<T, F, Fut>(ns: &Netns, f: F) -> Result<T, LabError>
where
    T: Send,
    F: FnOnce(Nl) -> Fut + Send,
    Fut: Future<Output = Result<T, LabError>>,
{
    let name = ns.name().to_owned();
    ns.run_named("netlink", move || block_on(&name, f))?
}

/// Opens a netlink socket in the current thread's namespace and runs `f` on a single-threaded
/// runtime, bounded by [`NETLINK_BATCH_TIMEOUT`].
fn block_on<T, F, Fut>(netns: &str, f: F) -> Result<T, LabError>
where
    F: FnOnce(Nl) -> Fut,
    Fut: Future<Output = Result<T, LabError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| LabError::netlink(netns, "start the netlink runtime", e))?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| LabError::netlink(netns, "open a netlink socket", e))?;
        let driver = tokio::spawn(connection);
        let nl = Nl { handle, netns: netns.to_owned() };
        let result = tokio::time::timeout(NETLINK_BATCH_TIMEOUT, f(nl)).await;
        driver.abort();
        result.map_err(|_| LabError::Timeout {
            what: format!("netlink requests in namespace {netns} to complete"),
            after: NETLINK_BATCH_TIMEOUT,
        })?
    })
}

/// A netlink handle bound to one namespace, with the requests the lab needs; every error names
/// the namespace, the interface and the address involved.
pub(crate) struct Nl {
    handle: Handle,
    netns: String,
}

impl Nl {
    /// The index of interface `name`.
    pub(crate) async fn index(&self, name: &str) -> Result<u32, LabError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(LabError::netlink(
                &self.netns,
                format!("look up interface {name}"),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such interface"),
            )),
            Err(e) => Err(LabError::netlink(&self.netns, format!("look up interface {name}"), e)),
        }
    }

    /// `ip link set <name> up`.
    pub(crate) async fn up(&self, name: &str) -> Result<(), LabError> {
        let index = self.index(name).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| LabError::netlink(&self.netns, format!("set {name} up"), e))
    }

    /// `ip link add <name> type bridge address 02:57:46:00:00:01` (up). The address is set
    /// explicitly: a bridge without one takes the lowest address of its ports and changes it
    /// when a port joins, which leaves every neighbour's ARP entry for the bridge's IP (the
    /// pods' gateway) stale and drops their traffic for seconds each time a pod is added.
    pub(crate) async fn add_bridge(&self, name: &str) -> Result<(), LabError> {
        self.handle
            .link()
            .add(LinkBridge::new(name).address(BRIDGE_MAC.to_vec()).build())
            .execute()
            .await
            .map_err(|e| LabError::netlink(&self.netns, format!("create bridge {name}"), e))
    }

    /// `ip link add <name> type veth peer name <peer> netns <peer_ns>`: the peer end is created
    /// directly inside `peer_ns`, so no interface ever appears in any other namespace.
    pub(crate) async fn add_veth(&self, name: &str, peer: &str, peer_ns: &Netns) -> Result<(), LabError> {
        let step = || format!("create veth {name} with peer {peer} in namespace {}", peer_ns.name());
        let peer_file = File::open(peer_ns.path()).map_err(|e| {
            LabError::namespace(peer_ns.name(), format!("open {} for {}", peer_ns.path().display(), step()), e)
        })?;
        let peer_msg = LinkUnspec::new_with_name(peer).setns_by_fd(peer_file.as_raw_fd()).build();
        let msg = LinkVeth::new(name, peer).set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg))).build();
        let result = self.handle.link().add(msg).execute().await;
        // The peer namespace's file stays open until the kernel has answered.
        drop(peer_file);
        result.map_err(|e| LabError::netlink(&self.netns, step(), e))
    }

    /// `ip link set <name> master <bridge>`. Attach a port once it is up and ready (see
    /// [`Nl::wait_ready`]): a bridge whose only port is added while down loses its carrier for a
    /// moment, and the kernel may then take up to a second to let it transmit again.
    pub(crate) async fn attach(&self, name: &str, bridge: &str) -> Result<(), LabError> {
        let index = self.index(name).await?;
        let bridge_index = self.index(bridge).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).controller(bridge_index).build())
            .execute()
            .await
            .map_err(|e| LabError::netlink(&self.netns, format!("attach {name} to bridge {bridge}"), e))
    }

    /// `ip addr add <ip>/<prefix_len> dev <name>`; an IPv6 address with `nodad`: usable at
    /// once instead of tentative for the second or so of duplicate address detection (the lab
    /// plans its addresses, so there is no duplicate to detect).
    pub(crate) async fn add_address(&self, name: &str, ip: IpAddr, prefix_len: u8) -> Result<(), LabError> {
        let index = self.index(name).await?;
        let mut request = self.handle.address().add(index, ip, prefix_len);
        if ip.is_ipv6() {
            request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        request
            .execute()
            .await
            .map_err(|e| LabError::netlink(&self.netns, format!("add address {ip}/{prefix_len} to {name}"), e))
    }

    /// `ip route add <destination> via <gateway>` (the default route when `destination` is
    /// `None`), for either family: `destination` and `gateway` must be of the same one.
    pub(crate) async fn add_route(&self, destination: Option<IpCidr>, gateway: IpAddr) -> Result<(), LabError> {
        let dst_text = destination.map_or_else(|| "default".to_owned(), |d| d.to_string());
        let step = || format!("add route {dst_text} via {gateway}");
        let message = match (destination, gateway) {
            (None, IpAddr::V4(gw)) => RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build(),
            (Some(IpCidr::V4(dst)), IpAddr::V4(gw)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .gateway(gw)
                .build(),
            (None, IpAddr::V6(gw)) => RouteMessageBuilder::<Ipv6Addr>::new().gateway(gw).build(),
            (Some(IpCidr::V6(dst)), IpAddr::V6(gw)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .gateway(gw)
                .build(),
            _ => {
                let mixed = std::io::Error::new(std::io::ErrorKind::InvalidInput, "mixed address families");
                return Err(LabError::netlink(&self.netns, step(), mixed));
            }
        };
        self.handle.route().add(message).execute().await.map_err(|e| LabError::netlink(&self.netns, step(), e))
    }

    /// Waits (bounded) until each of `names` can transmit: it has a carrier and the kernel has
    /// processed it (operational state "Up"; for a bridge also "Unknown", the state of a bridge
    /// whose carrier never dropped). Until then its queueing discipline may still be the one
    /// that drops every packet: the first SYN would be lost and retried a second later.
    pub(crate) async fn wait_ready(&self, names: &[&str], timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let links = self.links().await?;
            let ready = |l: &LinkState| {
                l.carrier && (l.oper_state == "Up" || (l.kind == "bridge" && l.oper_state == "Unknown"))
            };
            let pending: Vec<&str> =
                names.iter().copied().filter(|name| !links.iter().any(|l| l.name == *name && ready(l))).collect();
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!("interfaces {pending:?} in namespace {} to be ready (links: {links:?})", self.netns),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn links(&self) -> Result<Vec<LinkState>, LabError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| LabError::netlink(&self.netns, "list interfaces", e))?;
        let mut links: Vec<LinkState> = messages.iter().map(link_state).collect();
        links.sort();
        Ok(links)
    }

    pub(crate) async fn state(&self) -> Result<NetState, LabError> {
        let links = self.links().await?;
        let name_of = |index: u32| links.iter().find(|l| l.index == index).map(|l| l.name.clone());

        let mut addresses = Vec::new();
        let mut stream = self.handle.address().get().execute();
        while let Some(msg) =
            stream.try_next().await.map_err(|e| LabError::netlink(&self.netns, "list addresses", e))?
        {
            let address = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            if let Some(address) = address {
                let interface = name_of(msg.header.index).unwrap_or_else(|| format!("if{}", msg.header.index));
                addresses.push(AddressState { interface, address, prefix_len: msg.header.prefix_len });
            }
        }
        addresses.sort();

        let mut routes = Vec::new();
        let dumps = [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()];
        for dump in dumps {
            let mut stream = self.handle.route().get(dump).execute();
            while let Some(msg) =
                stream.try_next().await.map_err(|e| LabError::netlink(&self.netns, "list routes", e))?
            {
                routes.extend(route_state(&msg, &name_of));
            }
        }
        routes.sort();

        Ok(NetState { links, addresses, routes })
    }
}

fn link_state(msg: &LinkMessage) -> LinkState {
    let mut state = LinkState {
        index: msg.header.index,
        name: String::new(),
        kind: String::new(),
        up: msg.header.flags.contains(LinkFlags::Up),
        oper_state: String::new(),
        carrier: false,
        controller: None,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => state.name = name.clone(),
            LinkAttribute::OperState(s) => state.oper_state = oper_state_name(*s),
            LinkAttribute::Controller(index) => state.controller = Some(*index),
            LinkAttribute::Carrier(on) => state.carrier = *on != 0,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        state.kind = kind.to_string();
                    }
                }
            }
            _ => {}
        }
    }
    state
}

fn oper_state_name(state: State) -> String {
    match state {
        State::Up => "Up".to_owned(),
        State::Down => "Down".to_owned(),
        State::Unknown => "Unknown".to_owned(),
        State::LowerLayerDown => "LowerLayerDown".to_owned(),
        State::Dormant => "Dormant".to_owned(),
        other => format!("{other:?}"),
    }
}

/// A route message as a [`RouteState`]; `None` for a family other than IPv4 and IPv6.
fn route_state(msg: &RouteMessage, name_of: &dyn Fn(u32) -> Option<String>) -> Option<RouteState> {
    let ipv6 = match msg.header.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    let mut destination = if ipv6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    let mut gateway = None;
    let mut interface = None;
    let mut table = u32::from(msg.header.table);
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => destination = IpAddr::V4(*ip),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => destination = IpAddr::V6(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(IpAddr::V4(*ip)),
            RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => gateway = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(index) => interface = Some(name_of(*index).unwrap_or_else(|| format!("if{index}"))),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let prefix_len = msg.header.destination_prefix_length;
    let destination = match destination {
        IpAddr::V4(ip) => IpCidr::V4(Ipv4Cidr::new(ip, prefix_len)),
        IpAddr::V6(ip) => IpCidr::V6(Ipv6Cidr::new(ip, prefix_len)),
    };
    Some(RouteState { table, destination, gateway, interface })
}
