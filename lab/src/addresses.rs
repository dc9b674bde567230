//! The lab's address plan, shared by the harness, the tests and `weft demo`.
//!
//! | range | what | where it exists |
//! | --- | --- | --- |
//! | `10.255.0.0/24` | the fabric: node `i` is `10.255.0.(i+1)` on its `eth0` | node namespaces |
//! | `10.244.0.0/16` | pods; node `i` owns `10.244.(i+1).0/24`, its `cni0` is `.1`, pod `k` is `.(k+2)` | node and pod namespaces |
//! | `10.96.0.0/16` | Service VIPs: routed nowhere; a node proxy resolves them | nowhere |
//!
//! A lab built with IPv6 ([`IpStack::Ipv6`] or [`IpStack::Dual`]) uses the same plan in
//! unique-local ranges (RFC 4193, `fd00::/8`), the node and pod numbers written in hex:
//!
//! | range | what | where it exists |
//! | --- | --- | --- |
//! | `fd00:255::/64` | the fabric: node `i` is `fd00:255::(i+1)` on its `eth0` | node namespaces |
//! | `fd00:244::/32` | pods; node `i` owns `fd00:244:(i+1)::/64`, its `cni0` is `::1`, pod `k` is `::(k+2)` | node and pod namespaces |
//! | `fd00:96::/108` | Service VIPs: the `n`th is `fd00:96::(n+10)`, the same `n` as `10.96.0.0/16`'s | nowhere |
//!
//! None of these ranges is ever given an address or a route in the root namespace: traffic to
//! them exists only between lab namespaces.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The address families a lab is built with, as a Kubernetes cluster's `ipFamilies`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum IpStack {
    /// IPv4 only: the lab as it always was (the default).
    #[default]
    Ipv4,
    /// IPv6 only: nodes, pods and VIPs have IPv6 addresses and no IPv4 ones.
    Ipv6,
    /// Both: every node and pod has one address of each family, IPv4 first (its primary, as
    /// `status.podIP`), and nodes reach each other over both.
    Dual,
}

impl IpStack {
    /// Whether nodes and pods have IPv4 addresses.
    pub const fn has_ipv4(self) -> bool {
        matches!(self, IpStack::Ipv4 | IpStack::Dual)
    }

    /// Whether nodes and pods have IPv6 addresses.
    pub const fn has_ipv6(self) -> bool {
        matches!(self, IpStack::Ipv6 | IpStack::Dual)
    }

    /// The command-line spelling: `ipv4`, `ipv6` or `dual`.
    pub const fn as_str(self) -> &'static str {
        match self {
            IpStack::Ipv4 => "ipv4",
            IpStack::Ipv6 => "ipv6",
            IpStack::Dual => "dual",
        }
    }
}

impl fmt::Display for IpStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IpStack {
    type Err = String;

    fn from_str(s: &str) -> Result<IpStack, String> {
        match s {
            "ipv4" => Ok(IpStack::Ipv4),
            "ipv6" => Ok(IpStack::Ipv6),
            "dual" => Ok(IpStack::Dual),
            other => Err(format!("{other:?} is not an IP family: expected ipv4, ipv6 or dual")),
        }
    }
}

/// An IPv4 network: an address and a prefix length, e.g. `10.244.1.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Cidr {
    /// The network `addr/prefix_len`, with the host bits of `addr` cleared. A prefix length above
    /// 32 is taken as 32.
    pub const fn new(addr: Ipv4Addr, prefix_len: u8) -> Ipv4Cidr {
        let prefix_len = if prefix_len > 32 { 32 } else { prefix_len };
        let bits = addr.to_bits() & mask(prefix_len);
        Ipv4Cidr { addr: Ipv4Addr::from_bits(bits), prefix_len }
    }

    /// The network address (host bits zero).
    pub const fn network(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// True when `ip` is inside this network.
    pub const fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & mask(self.prefix_len) == self.addr.to_bits()
    }

    /// The `n`th address of the network (`n = 1` is the first host), or `None` past its end.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        if u64::from(n) >= size {
            return None;
        }
        Some(Ipv4Addr::from_bits(self.addr.to_bits() | n))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An IPv6 network: an address and a prefix length, e.g. `fd00:244:1::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Cidr {
    addr: Ipv6Addr,
    prefix_len: u8,
}

impl Ipv6Cidr {
    /// The network `addr/prefix_len`, with the host bits of `addr` cleared. A prefix length above
    /// 128 is taken as 128.
    pub const fn new(addr: Ipv6Addr, prefix_len: u8) -> Ipv6Cidr {
        let prefix_len = if prefix_len > 128 { 128 } else { prefix_len };
        let bits = addr.to_bits() & mask6(prefix_len);
        Ipv6Cidr { addr: Ipv6Addr::from_bits(bits), prefix_len }
    }

    /// The network address (host bits zero).
    pub const fn network(&self) -> Ipv6Addr {
        self.addr
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// True when `ip` is inside this network.
    pub const fn contains(&self, ip: Ipv6Addr) -> bool {
        ip.to_bits() & mask6(self.prefix_len) == self.addr.to_bits()
    }

    /// The `n`th address of the network (`n = 1` is the first host), or `None` past its end.
    pub fn nth(&self, n: u64) -> Option<Ipv6Addr> {
        let host_bits = 128 - u32::from(self.prefix_len);
        if host_bits < 64 && n >= 1u64 << host_bits {
            return None;
        }
        Some(Ipv6Addr::from_bits(self.addr.to_bits() | u128::from(n)))
    }
}

impl fmt::Display for Ipv6Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A network of either family (a route's destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpCidr {
    /// An IPv4 network.
    V4(Ipv4Cidr),
    /// An IPv6 network.
    V6(Ipv6Cidr),
}

impl IpCidr {
    /// The network address (host bits zero).
    pub const fn network(&self) -> IpAddr {
        match self {
            IpCidr::V4(c) => IpAddr::V4(c.network()),
            IpCidr::V6(c) => IpAddr::V6(c.network()),
        }
    }

    /// The prefix length.
    pub const fn prefix_len(&self) -> u8 {
        match self {
            IpCidr::V4(c) => c.prefix_len(),
            IpCidr::V6(c) => c.prefix_len(),
        }
    }

    /// True when `ip` is inside this network (never for an address of the other family).
    pub const fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (IpCidr::V4(c), IpAddr::V4(ip)) => c.contains(ip),
            (IpCidr::V6(c), IpAddr::V6(ip)) => c.contains(ip),
            _ => false,
        }
    }
}

impl From<Ipv4Cidr> for IpCidr {
    fn from(c: Ipv4Cidr) -> IpCidr {
        IpCidr::V4(c)
    }
}

impl From<Ipv6Cidr> for IpCidr {
    fn from(c: Ipv6Cidr) -> IpCidr {
        IpCidr::V6(c)
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpCidr::V4(c) => c.fmt(f),
            IpCidr::V6(c) => c.fmt(f),
        }
    }
}

const fn mask6(prefix_len: u8) -> u128 {
    if prefix_len == 0 { 0 } else { u128::MAX << (128 - prefix_len as u32) }
}

const fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len as u32) }
}

/// The fabric subnet: the nodes' `eth0` addresses, all on the fabric namespace's bridge.
pub const FABRIC_SUBNET: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 255, 0, 0), 24);

/// All pod CIDRs together (the cluster CIDR); node `i` owns [`pod_cidr`]`(i)`.
pub const CLUSTER_CIDR: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16);

/// The Service VIP range. Nothing routes it: a node proxy recognizes and resolves VIPs.
pub const SERVICE_CIDR: Ipv4Cidr = Ipv4Cidr::new(Ipv4Addr::new(10, 96, 0, 0), 16);

/// The most nodes a lab can have (node octets 1..=250 keep every address plan above valid).
pub const MAX_NODES: usize = 250;

/// The most pods one node can hold: host addresses `.2` to `.254` of its /24.
pub const MAX_PODS_PER_NODE: usize = 253;

/// Node `node`'s address on the fabric: `10.255.0.(node+1)`.
pub fn node_fabric_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 255, 0, octet(node))
}

/// Node `node`'s pod CIDR: `10.244.(node+1).0/24`.
pub fn pod_cidr(node: usize) -> Ipv4Cidr {
    Ipv4Cidr::new(Ipv4Addr::new(10, 244, octet(node), 0), 24)
}

/// The address of node `node`'s `cni0` bridge, the default gateway of its pods:
/// `10.244.(node+1).1`.
pub fn pod_gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, octet(node), 1)
}

/// The address of the `k`th pod (from 0) on node `node`: `10.244.(node+1).(k+2)`.
pub fn pod_ip(node: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, octet(node), u8::try_from(k + 2).unwrap_or(u8::MAX))
}

/// The `n`th Service VIP (from 0): `10.96.0.10` onwards, like a cluster's first Services.
pub fn service_vip(n: u16) -> Ipv4Addr {
    let host = u32::from(n) + 10;
    Ipv4Addr::from_bits(SERVICE_CIDR.network().to_bits() | (host & 0xffff))
}

/// The IPv6 fabric subnet: the nodes' `eth0` IPv6 addresses.
pub const FABRIC_SUBNET_V6: Ipv6Cidr = Ipv6Cidr::new(Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 0), 64);

/// All IPv6 pod CIDRs together; node `i` owns [`pod_cidr_v6`]`(i)`.
pub const CLUSTER_CIDR_V6: Ipv6Cidr = Ipv6Cidr::new(Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0), 32);

/// The IPv6 Service VIP range (a /108, the largest a Kubernetes service CIDR may be). Nothing
/// routes it.
pub const SERVICE_CIDR_V6: Ipv6Cidr = Ipv6Cidr::new(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0), 108);

/// Node `node`'s IPv6 address on the fabric: `fd00:255::(node+1)`.
pub fn node_fabric_ipv6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, u16::from(octet(node)))
}

/// Node `node`'s IPv6 pod CIDR: `fd00:244:(node+1)::/64`.
pub fn pod_cidr_v6(node: usize) -> Ipv6Cidr {
    Ipv6Cidr::new(Ipv6Addr::new(0xfd00, 0x244, u16::from(octet(node)), 0, 0, 0, 0, 0), 64)
}

/// The IPv6 address of node `node`'s `cni0`, its pods' IPv6 default gateway:
/// `fd00:244:(node+1)::1`.
pub fn pod_gateway_v6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, u16::from(octet(node)), 0, 0, 0, 0, 1)
}

/// The IPv6 address of the `k`th pod (from 0) on node `node`: `fd00:244:(node+1)::(k+2)`.
pub fn pod_ipv6(node: usize, k: usize) -> Ipv6Addr {
    let host = u16::try_from(k + 2).unwrap_or(u16::MAX);
    Ipv6Addr::new(0xfd00, 0x244, u16::from(octet(node)), 0, 0, 0, 0, host)
}

/// The `n`th IPv6 Service VIP (from 0): `fd00:96::a` onwards, the counterpart of
/// [`service_vip`]`(n)`.
pub fn service_vip_v6(n: u16) -> Ipv6Addr {
    Ipv6Addr::from_bits(SERVICE_CIDR_V6.network().to_bits() | (u128::from(n) + 10))
}

/// The IPv6 counterpart of an IPv4 Service VIP of the plan (the same `n`), or `None` for an
/// address outside [`SERVICE_CIDR`] (or past the IPv6 range's end, which is larger).
pub fn service_vip_v6_of(vip: Ipv4Addr) -> Option<Ipv6Addr> {
    if !SERVICE_CIDR.contains(vip) {
        return None;
    }
    let n = (vip.to_bits() & !mask(SERVICE_CIDR.prefix_len())).checked_sub(10)?;
    Some(service_vip_v6(u16::try_from(n).ok()?))
}

/// The VIPs a Service of the plan gets in a lab built with `stack`, one per family (IPv4
/// first, as `spec.clusterIPs`): the IPv4 VIP `vip`, its IPv6 counterpart
/// ([`service_vip_v6_of`]), or both. A VIP outside the plan is kept as given.
pub fn service_vips(stack: IpStack, vip: Ipv4Addr) -> Vec<IpAddr> {
    let v6 = service_vip_v6_of(vip);
    match (stack, v6) {
        (IpStack::Ipv4, _) | (_, None) => vec![IpAddr::V4(vip)],
        (IpStack::Ipv6, Some(v6)) => vec![IpAddr::V6(v6)],
        (IpStack::Dual, Some(v6)) => vec![IpAddr::V4(vip), IpAddr::V6(v6)],
    }
}

/// `node + 1` as an octet; callers keep `node < MAX_NODES`, larger values saturate (and are
/// refused earlier by `Lab::new`).
fn octet(node: usize) -> u8 {
    u8::try_from(node + 1).unwrap_or(u8::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        assert_eq!(node_fabric_ip(0), Ipv4Addr::new(10, 255, 0, 1));
        assert_eq!(pod_cidr(1).to_string(), "10.244.2.0/24");
        assert_eq!(pod_gateway(0), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(pod_ip(1, 0), Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(service_vip(0), Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(service_vip(300), Ipv4Addr::new(10, 96, 1, 54));
        assert!(SERVICE_CIDR.contains(service_vip(u16::MAX)));
        assert!(CLUSTER_CIDR.contains(pod_ip(MAX_NODES - 1, MAX_PODS_PER_NODE - 1)));
        assert!(FABRIC_SUBNET.contains(node_fabric_ip(MAX_NODES - 1)));
        assert!(!CLUSTER_CIDR.contains(node_fabric_ip(0)));
    }

    #[test]
    fn plan_v6() {
        assert_eq!(node_fabric_ipv6(0).to_string(), "fd00:255::1");
        assert_eq!(pod_cidr_v6(1).to_string(), "fd00:244:2::/64");
        assert_eq!(pod_gateway_v6(0).to_string(), "fd00:244:1::1");
        assert_eq!(pod_ipv6(1, 0).to_string(), "fd00:244:2::2");
        assert_eq!(service_vip_v6(0).to_string(), "fd00:96::a");
        assert!(SERVICE_CIDR_V6.contains(service_vip_v6(u16::MAX)));
        assert!(CLUSTER_CIDR_V6.contains(pod_ipv6(MAX_NODES - 1, MAX_PODS_PER_NODE - 1)));
        assert!(pod_cidr_v6(MAX_NODES - 1).contains(pod_ipv6(MAX_NODES - 1, MAX_PODS_PER_NODE - 1)));
        assert!(FABRIC_SUBNET_V6.contains(node_fabric_ipv6(MAX_NODES - 1)));
        assert!(!CLUSTER_CIDR_V6.contains(node_fabric_ipv6(0)));
        assert!(!SERVICE_CIDR_V6.contains(pod_ipv6(0, 0)));
        for n in [0, 1, 10, 300, u16::MAX - 10] {
            assert_eq!(service_vip_v6_of(service_vip(n)), Some(service_vip_v6(n)), "{n}");
        }
        assert_eq!(service_vip_v6_of(Ipv4Addr::new(10, 96, 0, 9)), None);
        assert_eq!(service_vip_v6_of(Ipv4Addr::new(10, 97, 0, 10)), None);
        let vip = service_vip(3);
        assert_eq!(service_vips(IpStack::Ipv4, vip), [IpAddr::V4(vip)]);
        assert_eq!(service_vips(IpStack::Ipv6, vip), [IpAddr::V6(service_vip_v6(3))]);
        assert_eq!(service_vips(IpStack::Dual, vip), [IpAddr::V4(vip), IpAddr::V6(service_vip_v6(3))]);
    }

    #[test]
    fn stack() {
        for stack in [IpStack::Ipv4, IpStack::Ipv6, IpStack::Dual] {
            assert_eq!(stack.as_str().parse::<IpStack>(), Ok(stack));
        }
        assert!(IpStack::Dual.has_ipv4() && IpStack::Dual.has_ipv6());
        assert!(!IpStack::Ipv6.has_ipv4() && !IpStack::Ipv4.has_ipv6());
        assert_eq!(IpStack::default(), IpStack::Ipv4);
        assert!("IPv6".parse::<IpStack>().unwrap_err().contains("expected ipv4, ipv6 or dual"));
    }

    #[test]
    fn cidr_v6() {
        let c = Ipv6Cidr::new("fd00:244:1::77".parse().unwrap(), 64);
        assert_eq!(c.network().to_string(), "fd00:244:1::");
        assert_eq!(c.nth(1), Some("fd00:244:1::1".parse().unwrap()));
        assert_eq!(Ipv6Cidr::new(Ipv6Addr::LOCALHOST, 120).nth(256), None);
        assert!(c.contains("fd00:244:1:0:ffff::1".parse().unwrap()));
        assert!(!c.contains("fd00:244:2::".parse().unwrap()));
    }

    #[test]
    fn cidr() {
        let c = Ipv4Cidr::new(Ipv4Addr::new(10, 244, 1, 77), 24);
        assert_eq!(c.network(), Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.nth(1), Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(c.nth(256), None);
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 255)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 2, 0)));
        assert!(Ipv4Cidr::new(Ipv4Addr::new(1, 2, 3, 4), 0).contains(Ipv4Addr::new(200, 1, 1, 1)));
    }
}
