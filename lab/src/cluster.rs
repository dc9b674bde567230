//! The cluster: a fabric namespace with a bridge, node namespaces wired to it, pod namespaces
//! wired to their node's `cni0` bridge, and the teardown that removes all of it.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::addresses::{self, IpCidr, IpStack, Ipv4Cidr, Ipv6Cidr, MAX_NODES, MAX_PODS_PER_NODE};
use crate::capture::Capture;
use crate::netlink::netlink;
use crate::netns::{self, NAME_PREFIX, Netns, delete_namespace, sanitize};
use crate::process::{LabProcess, LabShared, log_root};
use crate::{LabError, require_root};

/// The bridge in the fabric namespace that all nodes plug into.
pub const FABRIC_BRIDGE: &str = "br0";
/// Each node's (and each pod's) interface towards the outside: `eth0`.
pub const ETH0: &str = "eth0";
/// Each node's bridge for its pods, as with the Kubernetes bridge CNI plugin.
pub const CNI_BRIDGE: &str = "cni0";

/// How long to wait for interfaces to be operationally up after wiring them.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Numbers the labs of this process, so names never collide between parallel tests.
static NEXT_LAB: AtomicUsize = AtomicUsize::new(0);

/// A small cluster built from network namespaces; see the crate documentation for the picture.
///
/// Dropping it kills every process it started and deletes every namespace it created.
pub struct Lab {
    /// `weft-<pid>-<n>-<test>`: the start of every namespace name of this lab.
    name: String,
    /// The address families of nodes and pods.
    stack: IpStack,
    shared: Arc<LabShared>,
    fabric: Netns,
    nodes: Vec<Node>,
    inner: Mutex<Inner>,
    torn_down: bool,
}

/// What grows while the lab is used: namespaces (for teardown) and pods.
#[derive(Default)]
struct Inner {
    /// Every namespace whose creation was attempted, in order; teardown deletes them in reverse.
    namespaces: Vec<String>,
    /// Pods in creation order, with their pause processes (killed at teardown).
    pods: Vec<(Pod, LabProcess)>,
    /// Pods created so far on each node (the next pod's index).
    pods_per_node: Vec<usize>,
}

/// A node: a namespace with `eth0` on the fabric and a `cni0` bridge for its pods.
#[derive(Clone, Debug)]
pub struct Node {
    index: usize,
    stack: IpStack,
    netns: Netns,
}

/// A pod: a namespace with `eth0` plugged into its node's `cni0`, and a pause process.
#[derive(Clone, Debug)]
pub struct Pod {
    name: String,
    node: usize,
    index: usize,
    stack: IpStack,
    netns: Netns,
    pause_pid: u32,
}

impl Lab {
    /// Builds an IPv4 lab of `nodes` nodes (no pods yet) for the test `test_name`.
    ///
    /// First removes what crashed runs left behind ([`crate::clean_leftovers`]). Namespace names
    /// are `weft-<pid>-<n>-<test>-<role>`, unique per process and per lab, so tests run in
    /// parallel. If a step fails, everything created so far is removed before the error returns.
    pub fn new(test_name: &str, nodes: usize) -> Result<Lab, LabError> {
        Lab::with_stack(test_name, nodes, IpStack::Ipv4)
    }

    /// Builds a lab whose nodes and pods have the address families of `stack` (the IPv6 plan
    /// is in [`addresses`]): as [`Lab::new`] for [`IpStack::Ipv4`]. With IPv6, every lab
    /// namespace has duplicate address detection off (`accept_dad=0`, and addresses are added
    /// `nodad`), so planned addresses are usable at once, and nodes forward IPv6.
    pub fn with_stack(test_name: &str, nodes: usize, stack: IpStack) -> Result<Lab, LabError> {
        Lab::require_root()?;
        if nodes == 0 || nodes > MAX_NODES {
            return Err(LabError::Invalid(format!("a lab has 1 to {MAX_NODES} nodes, not {nodes}")));
        }
        if let Err(e) = netns::clean_leftovers() {
            // Leftovers of another run do not collide with this lab's names: go on, but say so.
            eprintln!("lab: cleaning leftovers of crashed runs: {e}");
        }
        let seq = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{}-{seq}-{}", std::process::id(), sanitize(test_name, 24));
        let log_dir = log_root().join(&name);
        fs::create_dir_all(&log_dir).map_err(|e| LabError::io("create the log directory", &log_dir, e))?;
        let shared = Arc::new(LabShared::new(log_dir));
        let fabric = Netns::new(format!("{name}-fabric"), Arc::clone(&shared));
        let mut lab = Lab { name, stack, shared, fabric, nodes: Vec::new(), inner: Mutex::default(), torn_down: false };
        // On error, `lab` is dropped here and its Drop removes what was built.
        lab.build(nodes)?;
        Ok(lab)
    }

    /// Fails with [`LabError::NotRoot`] unless the process has CAP_NET_ADMIN and CAP_SYS_ADMIN.
    /// Tests call it first and hand the error to [`crate::skip_or_fail`].
    pub fn require_root() -> Result<(), LabError> {
        require_root()
    }

    /// Adds a pod named `name` to node `node` (from 0) and returns it.
    ///
    /// The `k`th pod of node `i` gets the namespace `<lab>-n<i>p<k>-<name>`, an `eth0` with
    /// `10.244.(i+1).(k+2)/24` (a veth whose other end, `veth<k>`, is a port of the node's
    /// `cni0`), a default route via `10.244.(i+1).1`, `lo` up, and a pause process
    /// (`sleep infinity`) so that a node proxy can find the namespace in `/proc/*/ns/net`, as in
    /// Kubernetes. With IPv6 (see [`Lab::with_stack`]) its `eth0` has `fd00:244:(i+1)::(k+2)/64`
    /// instead or besides, with a default route via `fd00:244:(i+1)::1`. Pods may be added from
    /// several threads at once.
    pub fn add_pod(&self, node: usize, name: &str) -> Result<Pod, LabError> {
        let node_ref = self.nodes.get(node).ok_or_else(|| {
            LabError::Invalid(format!("no node {node} in lab {} (it has {} nodes)", self.name, self.nodes.len()))
        })?;
        let index = {
            let mut inner = self.lock();
            // `build` sized the counters to the nodes, and `node` is one of them.
            let Some(next) = inner.pods_per_node.get_mut(node) else {
                return Err(LabError::Invalid(format!("no pod counter for node {node} in lab {}", self.name)));
            };
            if *next >= MAX_PODS_PER_NODE {
                return Err(LabError::Invalid(format!(
                    "node {node} already has {MAX_PODS_PER_NODE} pods, its maximum"
                )));
            }
            *next += 1;
            *next - 1
        };
        let netns =
            Netns::new(format!("{}-n{node}p{index}-{}", self.name, sanitize(name, 16)), Arc::clone(&self.shared));
        self.create_netns(&netns)?;
        self.prepare_ipv6(&netns, false)?;

        let stack = self.stack;
        let addrs = pod_addresses(stack, node, index);
        let peer = format!("veth{index}");
        let node_netns = node_ref.netns.clone();
        netlink(&netns, |nl| async move {
            nl.up("lo").await?;
            nl.add_veth(ETH0, &peer, &node_netns).await?;
            for (ip, prefix_len, _) in &addrs {
                nl.add_address(ETH0, *ip, *prefix_len).await?;
            }
            nl.up(ETH0).await?;
            for (_, _, gateway) in &addrs {
                nl.add_route(None, *gateway).await?;
            }
            Ok(())
        })?;
        let peer = format!("veth{index}");
        netlink(&node_ref.netns, |nl| async move {
            nl.up(&peer).await?;
            nl.wait_ready(&[&peer], LINK_READY_TIMEOUT).await?;
            nl.attach(&peer, CNI_BRIDGE).await?;
            nl.wait_ready(&[CNI_BRIDGE], LINK_READY_TIMEOUT).await
        })?;
        netlink(&netns, |nl| async move { nl.wait_ready(&[ETH0], LINK_READY_TIMEOUT).await })?;

        let mut pause = Command::new("sleep");
        pause.arg("infinity");
        let pause = netns.spawn(pause)?;
        let pod = Pod { name: name.to_owned(), node, index, stack, netns, pause_pid: pause.pid() };
        self.lock().pods.push((pod.clone(), pause));
        Ok(pod)
    }

    /// Starts capturing the fabric: every frame between nodes, seen on the bridge ports (each
    /// frame twice, see [`crate::capture`]).
    pub fn capture(&self) -> Result<Capture, LabError> {
        self.fabric.capture()
    }

    /// The address families of the lab's nodes and pods.
    pub fn stack(&self) -> IpStack {
        self.stack
    }

    /// The lab's name, `weft-<pid>-<n>-<test>`: every namespace name of the lab starts with it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fabric namespace (bridge `br0`, ports `node0`, `node1`, ...). Nothing in it has an
    /// IPv4 address: it only switches frames between nodes.
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    /// The nodes, by index.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The pods added so far, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.lock().pods.iter().map(|(pod, _)| pod.clone()).collect()
    }

    /// Where the logs of processes started in the lab are written. Removed at teardown, except
    /// when the thread is panicking (a failed test), so they can be read afterwards.
    pub fn log_dir(&self) -> &Path {
        &self.shared.log_dir
    }

    /// Tears the lab down now and reports any step that failed (dropping the lab does the same
    /// but can only print problems).
    pub fn teardown(mut self) -> Result<(), LabError> {
        self.teardown_inner()
    }

    fn build(&mut self, nodes: usize) -> Result<(), LabError> {
        let stack = self.stack;
        self.create_netns(&self.fabric)?;
        self.prepare_ipv6(&self.fabric, false)?;
        netlink(&self.fabric, |nl| async move {
            nl.up("lo").await?;
            nl.add_bridge(FABRIC_BRIDGE).await
        })?;
        self.lock().pods_per_node = vec![0; nodes];

        for i in 0..nodes {
            let netns = Netns::new(format!("{}-node{i}", self.name), Arc::clone(&self.shared));
            self.create_netns(&netns)?;
            write_sysctl(&netns, "/proc/sys/net/ipv4/ip_forward", "1")?;
            self.prepare_ipv6(&netns, true)?;
            let fabric = self.fabric.clone();
            let port = fabric_port(i);
            let addrs = node_addresses(stack, i);
            netlink(&netns, |nl| async move {
                nl.up("lo").await?;
                nl.add_veth(ETH0, &port, &fabric).await?;
                for (fabric_ip, fabric_prefix, _, _) in &addrs {
                    nl.add_address(ETH0, *fabric_ip, *fabric_prefix).await?;
                }
                nl.up(ETH0).await?;
                nl.add_bridge(CNI_BRIDGE).await?;
                for (_, _, gateway, pod_prefix) in &addrs {
                    nl.add_address(CNI_BRIDGE, *gateway, *pod_prefix).await?;
                }
                Ok(())
            })?;
            let port = fabric_port(i);
            netlink(&self.fabric, |nl| async move {
                nl.up(&port).await?;
                nl.wait_ready(&[&port], LINK_READY_TIMEOUT).await?;
                nl.attach(&port, FABRIC_BRIDGE).await
            })?;
            self.nodes.push(Node { index: i, stack, netns });
        }

        for node in &self.nodes {
            let mut others: Vec<(IpCidr, IpAddr)> = Vec::new();
            for j in (0..nodes).filter(|&j| j != node.index) {
                if stack.has_ipv4() {
                    others.push((IpCidr::V4(addresses::pod_cidr(j)), addresses::node_fabric_ip(j).into()));
                }
                if stack.has_ipv6() {
                    others.push((IpCidr::V6(addresses::pod_cidr_v6(j)), addresses::node_fabric_ipv6(j).into()));
                }
            }
            netlink(&node.netns, |nl| async move {
                for (cidr, via) in others {
                    nl.add_route(Some(cidr), via).await?;
                }
                nl.wait_ready(&[ETH0], LINK_READY_TIMEOUT).await
            })?;
        }
        netlink(&self.fabric, |nl| async move { nl.wait_ready(&[FABRIC_BRIDGE], LINK_READY_TIMEOUT).await })
    }

    /// In a lab with IPv6, before any interface is made in `netns`: duplicate address
    /// detection off for every interface to come (`default`) and those there (`all`, `lo`), and
    /// for a node, IPv6 forwarding on. Nothing changes in an IPv4 lab.
    fn prepare_ipv6(&self, netns: &Netns, forward: bool) -> Result<(), LabError> {
        if !self.stack.has_ipv6() {
            return Ok(());
        }
        for scope in ["all", "default"] {
            write_sysctl(netns, &format!("/proc/sys/net/ipv6/conf/{scope}/accept_dad"), "0")?;
        }
        if forward {
            write_sysctl(netns, "/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
        }
        Ok(())
    }

    /// Records `netns` for teardown, then creates it (so a half-made one is removed too).
    fn create_netns(&self, netns: &Netns) -> Result<(), LabError> {
        self.lock().namespaces.push(netns.name().to_owned());
        netns.create()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Poisoning is ignored: the lists stay consistent, and teardown must run regardless.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn teardown_inner(&mut self) -> Result<(), LabError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        // Processes first (pause processes included), so namespaces empty out.
        let mut problems = self.shared.kill_all();
        let (namespaces, pods) = {
            let mut inner = self.lock();
            (std::mem::take(&mut inner.namespaces), std::mem::take(&mut inner.pods))
        };
        drop(pods);
        for name in namespaces.iter().rev() {
            problems.extend(delete_namespace(name));
        }
        let log_dir: &PathBuf = &self.shared.log_dir;
        if std::thread::panicking() || !problems.is_empty() {
            eprintln!("lab {}: process logs kept in {}", self.name, log_dir.display());
        } else if let Err(e) = fs::remove_dir_all(log_dir) {
            problems.push(format!("remove the log directory {}: {e}", log_dir.display()));
        }
        if problems.is_empty() { Ok(()) } else { Err(LabError::Teardown { problems }) }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!("lab: {e}");
        }
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.name)
            .field("stack", &self.stack)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Node {
    /// The node's index (from 0).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's namespace: where a node proxy (ztunnel) runs.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node's IPv4 address on the fabric (`eth0`): `10.255.0.(i+1)`. In an IPv6-only lab
    /// no interface holds it: see [`Node::fabric_ips`].
    pub fn fabric_ip(&self) -> Ipv4Addr {
        addresses::node_fabric_ip(self.index)
    }

    /// The node's IPv6 address on the fabric, `fd00:255::(i+1)`, in a lab with IPv6.
    pub fn fabric_ipv6(&self) -> Option<Ipv6Addr> {
        self.stack.has_ipv6().then(|| addresses::node_fabric_ipv6(self.index))
    }

    /// The node's addresses on the fabric, one per family of the lab (IPv4 first).
    pub fn fabric_ips(&self) -> Vec<IpAddr> {
        node_addresses(self.stack, self.index).into_iter().map(|(ip, ..)| ip).collect()
    }

    /// The node's IPv6 pod CIDR, `fd00:244:(i+1)::/64`, in a lab with IPv6.
    pub fn pod_cidr_v6(&self) -> Option<Ipv6Cidr> {
        self.stack.has_ipv6().then(|| addresses::pod_cidr_v6(self.index))
    }

    /// The node's pod CIDR: `10.244.(i+1).0/24`.
    pub fn pod_cidr(&self) -> Ipv4Cidr {
        addresses::pod_cidr(self.index)
    }

    /// The address of the node's `cni0`, its pods' default gateway: `10.244.(i+1).1`.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        addresses::pod_gateway(self.index)
    }
}

impl Pod {
    /// The name given to [`Lab::add_pod`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The index of the pod's node.
    pub fn node(&self) -> usize {
        self.node
    }

    /// The pod's index on its node (from 0): its node-side interface is `veth<index>`.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The pod's IPv4 address on `eth0`. In an IPv6-only lab the pod has none and no interface
    /// holds this one: code meant for every family uses [`Pod::primary_ip`] or [`Pod::ips`].
    pub fn ip(&self) -> Ipv4Addr {
        addresses::pod_ip(self.node, self.index)
    }

    /// The pod's addresses on `eth0`, one per family of the lab, IPv4 first (Kubernetes'
    /// `status.podIPs`).
    pub fn ips(&self) -> Vec<IpAddr> {
        pod_addresses(self.stack, self.node, self.index).into_iter().map(|(ip, ..)| ip).collect()
    }

    /// The pod's first address (`status.podIP`): its IPv4 address, or in an IPv6-only lab
    /// its IPv6 one.
    pub fn primary_ip(&self) -> IpAddr {
        if self.stack.has_ipv4() {
            IpAddr::V4(self.ip())
        } else {
            IpAddr::V6(addresses::pod_ipv6(self.node, self.index))
        }
    }

    /// The pod's IPv6 address, `fd00:244:(node+1)::(index+2)`, in a lab with IPv6.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.stack.has_ipv6().then(|| addresses::pod_ipv6(self.node, self.index))
    }

    /// The pod's IPv4 address in a lab with IPv4.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.stack.has_ipv4().then(|| self.ip())
    }

    /// The pod's address of the family of `like` (an address of the peer or service it talks
    /// to), if it has one.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        match like {
            IpAddr::V4(_) => self.ipv4().map(IpAddr::V4),
            IpAddr::V6(_) => self.ipv6().map(IpAddr::V6),
        }
    }

    /// Each of the pod's addresses with its prefix length and default gateway (its node's
    /// `cni0`), IPv4 first: what a CNI plugin reports as the pod's `ips`.
    pub fn networks(&self) -> Vec<(IpAddr, u8, IpAddr)> {
        pod_addresses(self.stack, self.node, self.index)
    }

    /// The pod's default gateway, its node's `cni0`: `10.244.(node+1).1`.
    pub fn gateway(&self) -> Ipv4Addr {
        addresses::pod_gateway(self.node)
    }

    /// The pod's namespace: run clients and servers of the pod here.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The pid of the pod's pause process (`sleep infinity`), which lives in the pod's namespace
    /// until teardown.
    pub fn pause_pid(&self) -> u32 {
        self.pause_pid
    }
}

/// A pod's addresses in a lab built with `stack`, IPv4 first: (address, prefix length of its
/// node's pod CIDR, default gateway).
fn pod_addresses(stack: IpStack, node: usize, k: usize) -> Vec<(IpAddr, u8, IpAddr)> {
    let mut addrs = Vec::new();
    if stack.has_ipv4() {
        let cidr = addresses::pod_cidr(node);
        addrs.push((addresses::pod_ip(node, k).into(), cidr.prefix_len(), addresses::pod_gateway(node).into()));
    }
    if stack.has_ipv6() {
        let cidr = addresses::pod_cidr_v6(node);
        addrs.push((addresses::pod_ipv6(node, k).into(), cidr.prefix_len(), addresses::pod_gateway_v6(node).into()));
    }
    addrs
}

/// A node's addresses in a lab built with `stack`, IPv4 first: (fabric address, fabric prefix
/// length, `cni0` address, pod CIDR prefix length).
fn node_addresses(stack: IpStack, node: usize) -> Vec<(IpAddr, u8, IpAddr, u8)> {
    let mut addrs = Vec::new();
    if stack.has_ipv4() {
        addrs.push((
            addresses::node_fabric_ip(node).into(),
            addresses::FABRIC_SUBNET.prefix_len(),
            addresses::pod_gateway(node).into(),
            addresses::pod_cidr(node).prefix_len(),
        ));
    }
    if stack.has_ipv6() {
        addrs.push((
            addresses::node_fabric_ipv6(node).into(),
            addresses::FABRIC_SUBNET_V6.prefix_len(),
            addresses::pod_gateway_v6(node).into(),
            addresses::pod_cidr_v6(node).prefix_len(),
        ));
    }
    addrs
}

/// The name of node `i`'s port on the fabric bridge.
fn fabric_port(i: usize) -> String {
    format!("node{i}")
}

/// Writes a sysctl from inside `netns` (files under /proc/sys/net are per namespace, resolved
/// for the thread that opens them) and reads it back.
fn write_sysctl(netns: &Netns, path: &str, value: &str) -> Result<(), LabError> {
    let sysctl_err = |source| LabError::Sysctl { netns: netns.name().to_owned(), path: PathBuf::from(path), source };
    let read_back = netns
        .run_named("sysctl", || {
            fs::write(path, value)?;
            fs::read_to_string(path)
        })?
        .map_err(sysctl_err)?;
    if read_back.trim() != value {
        return Err(sysctl_err(std::io::Error::other(format!("wrote {value:?} but read back {:?}", read_back.trim()))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_and_sync() {
        assert_send_sync::<Lab>();
        assert_send_sync::<Netns>();
        assert_send_sync::<Pod>();
        assert_send_sync::<LabProcess>();
        assert_send_sync::<Capture>();
    }

    /// Teardown after a build that failed halfway: one namespace entry created but never
    /// mounted (the step after `create` failed), one recorded but never created.
    #[test]
    fn teardown_copes_with_half_made_namespaces() {
        if let Err(e) = Lab::require_root() {
            crate::skip_or_fail(e);
            return;
        }
        let lab = Lab::new("half_made", 1).expect("build the lab");
        assert!(lab.add_pod(1, "nowhere").is_err_and(|e| matches!(e, LabError::Invalid(_))));
        let unmounted = format!("{}-unmounted", lab.name());
        let never = format!("{}-never-created", lab.name());
        let unmounted_path = Path::new(netns::NETNS_DIR).join(&unmounted);
        fs::write(&unmounted_path, b"").expect("create an unmounted entry");
        lab.lock().namespaces.extend([unmounted, never]);
        let node = lab.nodes()[0].netns().path().to_owned();

        lab.teardown().expect("teardown succeeds");
        assert!(!unmounted_path.exists());
        assert!(!node.exists());
    }
}
