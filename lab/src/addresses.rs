//! The lab's address plan, shared by the harness, the tests and `weft demo`.
//!
//! | range | what | where it exists |
//! | --- | --- | --- |
//! | `10.255.0.0/24` | the fabric: node `i` is `10.255.0.(i+1)` on its `eth0` | node namespaces |
//! | `10.244.0.0/16` | pods; node `i` owns `10.244.(i+1).0/24`, its `cni0` is `.1`, pod `k` is `.(k+2)` | node and pod namespaces |
//! | `10.96.0.0/16` | Service VIPs: routed nowhere; a node proxy resolves them | nowhere |
//!
//! None of these ranges is ever given an address or a route in the root namespace: traffic to
//! them exists only between lab namespaces.

use std::fmt;
use std::net::Ipv4Addr;

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
