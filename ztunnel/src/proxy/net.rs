//! Where the data path's sockets are made: the seam between the proxy and pods' networks.
//!
//! In production ([`PodNamespaces`]) a socket that speaks for a pod is created inside the
//! pod's network namespace with ztunnel's bypass mark, and a captured connection's original
//! destination is what the capture rules' NAT remembers (`SO_ORIGINAL_DST`); a connection to
//! the app carries its client's address as source (`IP_TRANSPARENT`). All need root.
//! [`Loopback`] runs the same paths without privileges: each pod is an address of
//! 127.0.0.0/8 in ztunnel's own namespace, a socket "from a pod" binds the pod's address,
//! and the original destinations are a table the caller fills as it connects
//! ([`Loopback::connect_captured`]). Tests and benchmarks use it; the proxy calls the seam
//! once per connection set-up, never while copying.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Mutex;

use tokio::net::{TcpSocket, TcpStream};

use super::PodInfo;
use crate::inpod::{Netns, socket};

/// A connect in progress.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + 'a>>;

/// Makes the proxy's sockets for pods (see the module docs).
pub trait PodNet: Send + Sync + 'static {
    /// Connects to `dst` on behalf of the pod at `source`, whose namespace is `netns`.
    fn connect<'a>(&'a self, netns: &'a Netns, source: IpAddr, dst: SocketAddr) -> Connecting<'a>;

    /// Connects to `dst`, an address of the pod whose namespace is `netns`, with `client` as the
    /// source address, so the app sees its real client.
    fn connect_as<'a>(&'a self, netns: &'a Netns, client: IpAddr, dst: SocketAddr) -> Connecting<'a>;

    /// Where a captured connection was headed before it was redirected to ztunnel.
    fn original_dst(&self, tcp: &TcpStream) -> io::Result<SocketAddr>;
}

/// Pods' own network namespaces (production).
#[derive(Debug, Default, Clone, Copy)]
pub struct PodNamespaces;

impl PodNet for PodNamespaces {
    fn connect<'a>(&'a self, netns: &'a Netns, _source: IpAddr, dst: SocketAddr) -> Connecting<'a> {
        Box::pin(socket::connect(netns, dst))
    }

    fn connect_as<'a>(&'a self, netns: &'a Netns, client: IpAddr, dst: SocketAddr) -> Connecting<'a> {
        Box::pin(socket::connect_as(netns, client, dst))
    }

    fn original_dst(&self, tcp: &TcpStream) -> io::Result<SocketAddr> {
        socket::original_dst(tcp)
    }
}

/// Pods as loopback addresses, without privileges (see the module docs).
#[derive(Debug, Default)]
pub struct Loopback {
    /// Original destinations by the client's address, as the capture rules' NAT keeps them.
    redirected: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl Loopback {
    pub fn new() -> Loopback {
        Loopback::default()
    }

    /// Connects an app at `from` to `orig` the way capture does: the connection reaches
    /// `listener` (one of ztunnel's captured ports), which reads `orig` as its original
    /// destination.
    pub async fn connect_captured(
        &self,
        from: IpAddr,
        listener: SocketAddr,
        orig: SocketAddr,
    ) -> io::Result<TcpStream> {
        let socket = bound(from)?;
        let local = socket.local_addr()?;
        self.lock().insert(local, orig);
        let connected = socket.connect(listener).await;
        if connected.is_err() {
            self.lock().remove(&local);
        }
        connected
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SocketAddr>> {
        self.redirected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PodNet for Loopback {
    fn connect<'a>(&'a self, _netns: &'a Netns, source: IpAddr, dst: SocketAddr) -> Connecting<'a> {
        Box::pin(async move {
            let socket = bound(source)?;
            socket.set_nodelay(true)?;
            socket.connect(dst).await
        })
    }

    /// The client's address is a loopback address too: the socket binds it.
    fn connect_as<'a>(&'a self, netns: &'a Netns, client: IpAddr, dst: SocketAddr) -> Connecting<'a> {
        self.connect(netns, client, dst)
    }

    fn original_dst(&self, tcp: &TcpStream) -> io::Result<SocketAddr> {
        let peer = tcp.peer_addr()?;
        self.lock().remove(&peer).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("the connection from {peer} was not captured"))
        })
    }
}

/// The address ztunnel connects to an app at `dst` in `pod` from: the first of `candidates`
/// (the client's addresses, the most precise first) of `dst`'s family that is not the pod's
/// own, or `None` (the pod's own address is used).
pub fn client_source(pod: &PodInfo, candidates: impl IntoIterator<Item = IpAddr>, dst: SocketAddr) -> Option<IpAddr> {
    candidates.into_iter().find(|c| c.is_ipv4() == dst.is_ipv4() && !c.is_unspecified() && !pod.ips.contains(c))
}

/// A TCP socket bound to `ip` (any port).
fn bound(ip: IpAddr) -> io::Result<TcpSocket> {
    let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(ip, 0))?;
    Ok(socket)
}
