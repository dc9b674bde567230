//! The lab: a small Kubernetes-like cluster built from Linux network namespaces on one machine,
//! for Weft's end-to-end tests, benchmarks and `weft demo`.
//!
//! ```text
//!   fabric namespace  <lab>-fabric                      (no addresses: a switch)
//!  +------------------------------------------------------------------------+
//!  |                          bridge br0                                    |
//!  |        port node0 ---------+------------------- port node1             |
//!  +--------------|-----------------------------------------|---------------+
//!                 | veth                                    | veth
//!  +--------------|-----------------------+  +--------------|-----------------------+
//!  | <lab>-node0  eth0 10.255.0.1/24      |  | <lab>-node1  eth0 10.255.0.2/24      |
//!  |   ip_forward=1                       |  |   ip_forward=1                       |
//!  |   10.244.2.0/24 via 10.255.0.2       |  |   10.244.1.0/24 via 10.255.0.1       |
//!  |   bridge cni0 10.244.1.1/24          |  |   bridge cni0 10.244.2.1/24          |
//!  |    port veth0        port veth1      |  |    port veth0        port veth1      |
//!  +-----|-------------------|------------+  +-----|-------------------|------------+
//!        | veth              | veth                | veth              | veth
//!  +-----|--------+   +------|-------+       +-----|--------+   +------|-------+
//!  | <lab>-n0p0-a |   | <lab>-n0p1-c |       | <lab>-n1p0-b |   | <lab>-n1p1-d |
//!  | eth0         |   | eth0         |       | eth0         |   | eth0         |
//!  | 10.244.1.2   |   | 10.244.1.3   |       | 10.244.2.2   |   | 10.244.2.3   |
//!  | default via  |   | default via  |       | default via  |   | default via  |
//!  |  10.244.1.1  |   |  10.244.1.1  |       |  10.244.2.1  |   |  10.244.2.1  |
//!  | sleep (pause)|   | sleep (pause)|       | sleep (pause)|   | sleep (pause)|
//!  +--------------+   +--------------+       +--------------+   +--------------+
//! ```
//!
//! A packet from pod `a` to pod `b` leaves `a`'s `eth0`, is routed by node 0 (the route to
//! node 1's pod CIDR) over the fabric bridge to node 1, which delivers it on its `cni0`. Service
//! VIPs (`10.96.0.0/16`) are routed nowhere: a node proxy resolves them. The whole address plan
//! is in [`addresses`]. [`Lab::with_stack`] builds the same picture with IPv6 addresses instead
//! of IPv4 ones ([`addresses::IpStack::Ipv6`]) or beside them ([`addresses::IpStack::Dual`]), in
//! unique-local ranges (`fd00:255::/64`, `fd00:244:<node>::/64`, VIPs `fd00:96::/108`).
//!
//! Names: every namespace is `weft-<pid>-<n>-<test>-<role>` (role `fabric`, `node<i>`,
//! `n<i>p<k>-<pod>`) under `/run/netns`, so `ip netns exec <name> ...` works on a running lab and
//! tests run in parallel without collisions. Interface names are short and reused inside each
//! namespace (`eth0`, `cni0`, `veth<k>`, `node<i>`, `br0`); veth pairs are created from inside a
//! lab namespace with the peer placed directly in the other lab namespace, so no interface ever
//! appears in the root namespace.
//!
//! Safety of the host: no address or route of a lab range is ever added to the root namespace,
//! and everything that talks to a lab address must run inside a lab namespace
//! ([`Netns::run`], [`Netns::spawn`]): the root namespace's default route leads to the real
//! network. [`Lab`]'s `Drop` kills the processes it started and deletes its namespaces;
//! [`Lab::new`] first removes the leftovers of crashed runs ([`clean_leftovers`]).
//!
//! Needs: root (CAP_NET_ADMIN and CAP_SYS_ADMIN), the `veth` and `bridge` kernel modules, and
//! `sleep` (coreutils) for pause processes. No `ip` binary. Tests that cannot get root call
//! [`skip_or_fail`], which fails under `CI=true`.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! if let Err(e) = lab::Lab::require_root() {
//!     lab::skip_or_fail(e);
//!     return Ok(());
//! }
//! let lab = lab::Lab::new("example", 2)?;
//! let a = lab.add_pod(0, "a")?;
//! let b = lab.add_pod(1, "b")?;
//! // A listener created inside pod b's namespace, served by a thread of ours.
//! let listener = b.netns().run(|| TcpListener::bind((b.ip(), 8080)))??;
//! std::thread::spawn(move || {
//!     if let Ok((mut s, _)) = listener.accept() {
//!         let mut buf = [0; 5];
//!         if s.read_exact(&mut buf).is_ok() {
//!             let _ = s.write_all(&buf);
//!         }
//!     }
//! });
//! // The client runs inside pod a.
//! let echoed = a.netns().run(|| -> std::io::Result<[u8; 5]> {
//!     let mut s = TcpStream::connect((b.ip(), 8080))?;
//!     s.write_all(b"hello")?;
//!     let mut buf = [0; 5];
//!     s.read_exact(&mut buf)?;
//!     Ok(buf)
//! })??;
//! assert_eq!(&echoed, b"hello");
//! # Ok(())
//! # }
//! ```

pub mod addresses;
pub mod capture;
mod cluster;
mod error;
mod netlink;
mod netns;
mod process;

use std::fmt::Display;
use std::fs;
use std::io::Write;

pub use capture::{Capture, IpPacket, Packet, TcpFlags};
pub use cluster::{CNI_BRIDGE, ETH0, FABRIC_BRIDGE, Lab, Node, Pod};
pub use error::LabError;
pub use netlink::{AddressState, LinkState, NetState, RouteState};
pub use netns::{NAME_PREFIX, NETNS_DIR, Netns, clean_leftovers, processes_in_namespace};
/// Signals for [`LabProcess::signal`].
pub use nix::sys::signal::Signal;
pub use process::{LabProcess, rss_kib};

/// The environment variable that CI sets to `true`: then a lab test that cannot run fails.
pub const CI_ENV: &str = "CI";

/// Reports that a lab test cannot run here. Under `CI=true` it panics (a privileged test must
/// not pass silently in CI); otherwise it prints a loud `SKIPPED: ...` line to stderr and
/// returns, and the test should `return` right after.
pub fn skip_or_fail(reason: impl Display) {
    let test = std::thread::current().name().unwrap_or("this test").to_owned();
    if std::env::var(CI_ENV).is_ok_and(|v| v == "true") {
        panic!("{test} cannot run and {CI_ENV}=true forbids skipping: {reason}");
    }
    // Written to the stderr handle, not with eprintln!: the test harness captures (and hides)
    // the output of passing tests, and a skip must be seen.
    let _ = writeln!(std::io::stderr(), "\n======== SKIPPED: {test}: {reason} ========\n");
}

/// Capability bits (see capabilities(7)).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// See [`Lab::require_root`].
fn require_root() -> Result<(), LabError> {
    let status_path = "/proc/self/status";
    let status = fs::read_to_string(status_path).map_err(|e| LabError::io("read capabilities from", status_path, e))?;
    let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).map(str::to_owned);
    let effective = field("CapEff:").and_then(|hex| u64::from_str_radix(&hex, 16).ok()).unwrap_or(0);
    let uid = field("Uid:").and_then(|ids| ids.split_whitespace().nth(1).map(str::to_owned)).unwrap_or_default();
    let missing: Vec<&str> = [(CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN")]
        .into_iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LabError::NotRoot { detail: format!("runs as uid {uid} without {}", missing.join(" and ")) })
    }
}
