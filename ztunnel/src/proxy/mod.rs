//! The L4 data path, in the order a connection travels:
//! `outbound` (captured at :15001 in the source pod) → HBONE or passthrough →
//! `inbound` (HBONE at :15008 in the destination pod) or `plaintext` (:15006) → the app.
//!
//! Everything a connection needs is in [`Proxy`], shared by all pods' listeners; each
//! connection is recorded once, by a [`record::ConnectionRecord`]; its sockets are made
//! through the [`net::PodNet`] seam (pods' namespaces, or loopback in tests).

pub mod inbound;
pub mod net;
pub mod outbound;
pub mod plaintext;
pub mod record;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hbone::TrustStore;
use hbone::drain;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use crate::certs::CertManager;
use crate::inpod::Netns;
use crate::metrics::Metrics;
use crate::state::StateStore;
use net::{Connecting, PodNamespaces, PodNet};
use record::Traffic;

/// Shared by every connection of this ztunnel.
pub struct Proxy {
    pub node: String,
    pub state: StateStore,
    pub certs: CertManager,
    pub trust: TrustStore,
    pub client: hbone::Client,
    pub pods: Arc<PodRegistry>,
    pub metrics: Arc<Metrics>,
    pub balancer: Balancer,
    pub hbone: hbone::Config,
}

/// An enrolled pod, as its listeners see it.
#[derive(Debug)]
pub struct PodInfo {
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub netns: Netns,
}

impl PodInfo {
    pub fn primary_ip(&self) -> IpAddr {
        self.ips[0]
    }
}

/// Accepts the connections of one pod's captured port until the drain starts, reads each
/// one's original destination (where the redirect took it from), and runs `handle` on it as
/// its own task, which the drain's deadline cuts if it is still running.
pub async fn serve<F, Fut>(
    port: &'static str,
    listener: TcpListener,
    pod: Arc<PodInfo>,
    proxy: Arc<Proxy>,
    drain: drain::Watch,
    handle: F,
) where
    F: Fn(Accepted, Arc<PodInfo>, Arc<Proxy>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let draining = drain.draining();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let orig = match proxy.pods.net.original_dst(&tcp) {
                        Ok(orig) => orig,
                        Err(e) => {
                            warn!(pod = %pod.uid, port, error = %e, "cannot read the original destination; closing");
                            continue;
                        }
                    };
                    hbone::socket::tune(&tcp);
                    let connection = handle(Accepted { tcp, peer, orig }, pod.clone(), proxy.clone());
                    tokio::spawn(drain.clone().until_closing(connection));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(pod = %pod.uid, port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut draining => break,
        }
    }
}

/// A connection accepted on a captured port.
pub struct Accepted {
    pub tcp: TcpStream,
    /// The connection's other end (the app, for outbound; the client, for inbound).
    pub peer: SocketAddr,
    /// Where the connection was headed before the capture rules redirected it.
    pub orig: SocketAddr,
}

/// Enrolled pods' namespaces by pod IP: the HBONE client's dialer opens each outbound socket
/// in the namespace of the pod it speaks for. Also where the data path's sockets are made
/// ([`PodNet`]): inside pods' namespaces by default.
pub struct PodRegistry {
    by_ip: RwLock<HashMap<IpAddr, Netns>>,
    net: Arc<dyn PodNet>,
}

impl Default for PodRegistry {
    fn default() -> Self {
        PodRegistry::with_net(Arc::new(PodNamespaces))
    }
}

impl PodRegistry {
    /// A registry whose pods' sockets `net` makes (a [`net::Loopback`] in tests).
    pub fn with_net(net: Arc<dyn PodNet>) -> PodRegistry {
        PodRegistry { by_ip: RwLock::default(), net }
    }

    /// Connects to `dst` from inside `pod`.
    pub fn connect<'a>(&'a self, pod: &'a PodInfo, dst: SocketAddr) -> Connecting<'a> {
        self.net.connect(&pod.netns, pod.primary_ip(), dst)
    }

    /// Connects to the app at `dst` in `pod` with its client's address as source: the first of
    /// `clients` (the most precise first) that [`net::client_source`] can use, else the pod's
    /// own address.
    pub fn connect_to_app<'a>(
        &'a self,
        pod: &'a PodInfo,
        clients: impl IntoIterator<Item = IpAddr>,
        dst: SocketAddr,
    ) -> Connecting<'a> {
        match net::client_source(pod, clients, dst) {
            Some(client) => self.net.connect_as(&pod.netns, client, dst),
            None => self.connect(pod, dst),
        }
    }

    pub fn insert(&self, ips: &[IpAddr], netns: &Netns) {
        let mut map = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        for ip in ips {
            map.insert(*ip, netns.clone());
        }
    }

    pub fn remove(&self, ips: &[IpAddr]) {
        let mut map = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        for ip in ips {
            map.remove(ip);
        }
    }

    fn netns(&self, ip: IpAddr) -> Option<Netns> {
        self.by_ip.read().unwrap_or_else(|p| p.into_inner()).get(&ip).cloned()
    }
}

/// Dials HBONE connections from inside the source pod's namespace.
pub struct PodDialer(pub Arc<PodRegistry>);

impl hbone::client::Dialer for PodDialer {
    fn dial(
        &self,
        source: Option<IpAddr>,
        dest: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        Box::pin(async move {
            let ip = source.ok_or_else(|| io::Error::other("HBONE dial without a source pod"))?;
            let netns = self.0.netns(ip).ok_or_else(|| io::Error::other(format!("pod {ip} is not enrolled here")))?;
            self.0.net.connect(&netns, ip, dest).await
        })
    }
}

/// How long an endpoint that failed a connect is skipped: 10 s, long enough to stop sending
/// new connections into a crashed pod's black hole, short enough to notice its return.
const EJECTION: Duration = Duration::from_secs(10);

/// Attempts on different endpoints before a service connection is refused.
pub const SERVICE_ATTEMPTS: usize = 3;

/// Service load balancing: round robin over the service's endpoints, skipping endpoints that
/// failed a connect within [`EJECTION`] (unless all did); a failed connect moves on to the
/// next endpoint, up to [`SERVICE_ATTEMPTS`] tries. Round robin spreads connections evenly
/// and predictably; connections, not requests, are balanced at L4.
#[derive(Default)]
pub struct Balancer {
    next: Mutex<HashMap<String, usize>>,
    ejected: Mutex<HashMap<IpAddr, Instant>>,
}

impl Balancer {
    /// The order in which to try `n` endpoints (addresses given by `ip`) for `service`.
    pub fn order(&self, service: &str, n: usize, ip: impl Fn(usize) -> IpAddr) -> Vec<usize> {
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let slot = next.entry(service.to_owned()).or_insert(0);
            let start = *slot % n.max(1);
            *slot = slot.wrapping_add(1);
            start
        };
        let now = Instant::now();
        let ejected = self.ejected.lock().unwrap_or_else(|p| p.into_inner());
        let is_ejected = |i: usize| ejected.get(&ip(i)).is_some_and(|until| *until > now);
        let rotated = (0..n).map(|k| (start + k) % n);
        let (healthy, sick): (Vec<usize>, Vec<usize>) = rotated.partition(|i| !is_ejected(*i));
        healthy.into_iter().chain(sick).collect()
    }

    pub fn eject(&self, ip: IpAddr) {
        let mut ejected = self.ejected.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        ejected.retain(|_, until| *until > now);
        ejected.insert(ip, now + EJECTION);
    }
}

/// Copies between two TCP sockets until both directions have ended: `client`'s bytes to
/// `server` are the traffic's `sent`, `server`'s back its `received`. What reached each side
/// is counted as it is written, so a failed copy still says what it moved.
pub(crate) async fn copy_tcp(client: &mut TcpStream, server: &mut TcpStream) -> Result<Traffic, (Traffic, io::Error)> {
    let (mut client, mut server) = (Counted { io: client, written: 0 }, Counted { io: server, written: 0 });
    let result = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    let traffic = Traffic { sent: server.written, received: client.written };
    result.map(|_| traffic).map_err(|e| (traffic, e))
}

/// A socket that counts the bytes written to it.
struct Counted<'a> {
    io: &'a mut TcpStream,
    written: u64,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut *this.io).poll_write(cx, buf))?;
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut *this.io).poll_write_vectored(cx, bufs))?;
        this.written += n as u64;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_ejected_endpoints() {
        let b = Balancer::default();
        let ips: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().map(|s| s.parse().unwrap()).collect();
        let firsts: Vec<usize> = (0..6).map(|_| b.order("svc", 3, |i| ips[i])[0]).collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        b.eject(ips[1]);
        let order = b.order("svc", 3, |i| ips[i]);
        assert_eq!(order, [0, 2, 1], "ejected endpoint tried last");
    }
}
