//! The cluster: a fabric namespace with a bridge, node namespaces wired to it, pod namespaces
//! wired to their node's `cni0` bridge, and the teardown that removes all of it.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::addresses::{self, Ipv4Cidr, MAX_NODES, MAX_PODS_PER_NODE};
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
    netns: Netns,
}

/// A pod: a namespace with `eth0` plugged into its node's `cni0`, and a pause process.
#[derive(Clone, Debug)]
pub struct Pod {
    name: String,
    node: usize,
    index: usize,
    netns: Netns,
    pause_pid: u32,
}

impl Lab {
    /// Builds a lab of `nodes` nodes (no pods yet) for the test `test_name`.
    ///
    /// First removes what crashed runs left behind ([`crate::clean_leftovers`]). Namespace names
    /// are `weft-<pid>-<n>-<test>-<role>`, unique per process and per lab, so tests run in
    /// parallel. If a step fails, everything created so far is removed before the error returns.
    pub fn new(test_name: &str, nodes: usize) -> Result<Lab, LabError> {
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
        let mut lab = Lab { name, shared, fabric, nodes: Vec::new(), inner: Mutex::default(), torn_down: false };
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
    /// Kubernetes. Pods may be added from several threads at once.
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

        let ip = addresses::pod_ip(node, index);
        let gateway = addresses::pod_gateway(node);
        let prefix_len = addresses::pod_cidr(node).prefix_len();
        let peer = format!("veth{index}");
        let node_netns = node_ref.netns.clone();
        netlink(&netns, |nl| async move {
            nl.up("lo").await?;
            nl.add_veth(ETH0, &peer, &node_netns).await?;
            nl.add_address(ETH0, ip, prefix_len).await?;
            nl.up(ETH0).await?;
            nl.add_route(None, gateway).await
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
        let pod = Pod { name: name.to_owned(), node, index, netns, pause_pid: pause.pid() };
        self.lock().pods.push((pod.clone(), pause));
        Ok(pod)
    }

    /// Starts capturing the fabric: every frame between nodes, seen on the bridge ports (each
    /// frame twice, see [`crate::capture`]).
    pub fn capture(&self) -> Result<Capture, LabError> {
        self.fabric.capture()
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
        self.create_netns(&self.fabric)?;
        netlink(&self.fabric, |nl| async move {
            nl.up("lo").await?;
            nl.add_bridge(FABRIC_BRIDGE).await
        })?;
        self.lock().pods_per_node = vec![0; nodes];

        for i in 0..nodes {
            let netns = Netns::new(format!("{}-node{i}", self.name), Arc::clone(&self.shared));
            self.create_netns(&netns)?;
            write_sysctl(&netns, "/proc/sys/net/ipv4/ip_forward", "1")?;
            let fabric = self.fabric.clone();
            let port = fabric_port(i);
            let fabric_prefix = addresses::FABRIC_SUBNET.prefix_len();
            let pod_prefix = addresses::pod_cidr(i).prefix_len();
            netlink(&netns, |nl| async move {
                nl.up("lo").await?;
                nl.add_veth(ETH0, &port, &fabric).await?;
                nl.add_address(ETH0, addresses::node_fabric_ip(i), fabric_prefix).await?;
                nl.up(ETH0).await?;
                nl.add_bridge(CNI_BRIDGE).await?;
                nl.add_address(CNI_BRIDGE, addresses::pod_gateway(i), pod_prefix).await
            })?;
            let port = fabric_port(i);
            netlink(&self.fabric, |nl| async move {
                nl.up(&port).await?;
                nl.wait_ready(&[&port], LINK_READY_TIMEOUT).await?;
                nl.attach(&port, FABRIC_BRIDGE).await
            })?;
            self.nodes.push(Node { index: i, netns });
        }

        for node in &self.nodes {
            let others: Vec<(Ipv4Cidr, Ipv4Addr)> = (0..nodes)
                .filter(|&j| j != node.index)
                .map(|j| (addresses::pod_cidr(j), addresses::node_fabric_ip(j)))
                .collect();
            netlink(&node.netns, |nl| async move {
                for (cidr, via) in others {
                    nl.add_route(Some(cidr), via).await?;
                }
                nl.wait_ready(&[ETH0], LINK_READY_TIMEOUT).await
            })?;
        }
        netlink(&self.fabric, |nl| async move { nl.wait_ready(&[FABRIC_BRIDGE], LINK_READY_TIMEOUT).await })
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
        f.debug_struct("Lab").field("name", &self.name).field("nodes", &self.nodes.len()).finish()
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

    /// The node's address on the fabric (`eth0`): `10.255.0.(i+1)`.
    pub fn fabric_ip(&self) -> Ipv4Addr {
        addresses::node_fabric_ip(self.index)
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

    /// The pod's address on `eth0`.
    pub fn ip(&self) -> Ipv4Addr {
        addresses::pod_ip(self.node, self.index)
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
