//! Building blocks for tests, benchmarks and the demo (feature `testing`): a PKI with ready
//! identities, simple handlers, echo servers, a running HBONE server, and a client-side proxy
//! that accepts plain TCP and carries it through HBONE, as ztunnel's outbound path does.
//!
//! Everything binds to loopback on port 0.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::ca::Ca;
use crate::client::{Client, ConnectRequest};
use crate::config::Config;
use crate::copy;
use crate::drain;
use crate::identity::SpiffeId;
use crate::server::{Handler, InboundRequest, Rejection, Server};
use crate::tls::{TrustBundle, TrustStore, WorkloadCert};

/// Lifetime of certificates minted for tests: long enough for any test run.
const TEST_CERT_TTL: Duration = Duration::from_secs(3600);

/// A root CA and the trust store that trusts it.
pub struct Pki {
    pub root: Ca,
    pub trust: TrustStore,
}

impl Pki {
    pub fn new() -> Pki {
        // Distinct names, as distinct real CAs would have.
        static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = Ca::new_root(&format!("weft test root {n}")).expect("minting a test root");
        let trust = TrustStore::new(TrustBundle::new(vec![root.cert().clone()]).expect("one root"));
        Pki { root, trust }
    }

    /// Credentials for `spiffe://cluster.local/ns/<ns>/sa/<sa>`, signed by the root.
    pub fn workload(&self, ns: &str, sa: &str) -> WorkloadCert {
        WorkloadCert::new(self.root.issue(&id(ns, sa), TEST_CERT_TTL).expect("issuing a test certificate"))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`; panics on invalid parts (test input).
pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(crate::identity::DEFAULT_TRUST_DOMAIN, ns, sa).expect("valid test identity")
}

/// Allows every request and dials its target.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl Handler for AllowAll {
    type Session = ();
    type Upstream = TcpStream;

    fn authorize(&self, _request: &InboundRequest) -> Result<(), Rejection> {
        Ok(())
    }

    async fn dial(&self, request: &InboundRequest) -> io::Result<(TcpStream, ())> {
        Ok((TcpStream::connect(request.target).await?, ()))
    }
}

/// Decides with a closure and dials the target.
pub struct PolicyHandler<F>(pub F);

impl<F> Handler for PolicyHandler<F>
where
    F: Fn(&InboundRequest) -> Result<(), Rejection> + Send + Sync + 'static,
{
    type Session = ();
    type Upstream = TcpStream;

    fn authorize(&self, request: &InboundRequest) -> Result<(), Rejection> {
        (self.0)(request)
    }

    async fn dial(&self, request: &InboundRequest) -> io::Result<(TcpStream, ())> {
        Ok((TcpStream::connect(request.target).await?, ()))
    }
}

/// An echo server on loopback: writes back what it reads, and half-closes after the client
/// does. Returns its address.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo server");
    let addr = listener.local_addr().expect("echo server address");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let (mut r, mut w) = tcp.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A server that discards what it reads and, on EOF, answers the byte count as 8 bytes
/// (big-endian). Returns its address.
pub async fn sink_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink server");
    let addr = listener.local_addr().expect("sink server address");
    tokio::spawn(serve_sink(listener));
    addr
}

/// Serves the sink protocol (see [`sink_server`]) on `listener` until accepting fails.
pub async fn serve_sink(listener: TcpListener) {
    while let Ok((mut tcp, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = tcp.write_all(&total.to_be_bytes()).await;
            let _ = tcp.shutdown().await;
        });
    }
}

/// An HBONE server running on loopback.
pub struct RunningServer<H> {
    pub addr: SocketAddr,
    pub server: Server<H>,
    pub identity: WorkloadCert,
    trigger: Option<drain::Trigger>,
}

impl<H: Handler> RunningServer<H> {
    /// Starts a server presenting `identity`, trusting `trust`.
    pub async fn start(config: Config, identity: WorkloadCert, trust: &TrustStore, handler: H) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind HBONE server");
        let addr = listener.local_addr().expect("HBONE server address");
        let server = Server::new(config, Arc::new(identity.clone()), trust, handler);
        let (trigger, watch) = drain::channel();
        let s = server.clone();
        tokio::spawn(async move { s.serve(listener, watch).await });
        RunningServer { addr, server, identity, trigger: Some(trigger) }
    }

    /// Drains the server: stops accepting, waits up to `deadline` for tunnels to finish.
    pub async fn drain(&mut self, deadline: Duration) -> Option<drain::Outcome> {
        let trigger = self.trigger.take()?;
        Some(trigger.drain(deadline).await)
    }
}

/// The request a client sends to reach `target` through the server at `server`.
pub fn request(source: &WorkloadCert, server: SocketAddr, server_id: &SpiffeId, target: SocketAddr) -> ConnectRequest {
    ConnectRequest {
        source: source.clone(),
        source_ip: None,
        destination: server,
        expected: Arc::from(vec![server_id.clone()]),
        target,
        forwarded_for: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        baggage: None,
        traceparent: None,
    }
}

/// Accepts plain TCP on loopback and carries each connection through an HBONE tunnel opened
/// with `template`, like ztunnel's outbound path. Returns the listening address and the task.
pub async fn client_proxy(
    client: Client,
    template: ConnectRequest,
    copy_buffer: usize,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind client proxy");
    let addr = listener.local_addr().expect("client proxy address");
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let client = client.clone();
            let req = template.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match client.connect(req).await {
                    Ok(tunnel) => {
                        let _ = copy::bidirectional(&mut tcp, tunnel, copy_buffer).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "client proxy could not open a tunnel"),
                }
            });
        }
    });
    (addr, task)
}
