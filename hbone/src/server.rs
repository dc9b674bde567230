//! The HBONE server: accepts mutual TLS, serves HTTP/2, and turns each CONNECT into a tunnel
//! to a target chosen and authorized by the caller's [`Handler`].
//!
//! ```text
//!  accept ─► TLS 1.3 (client cert required, SPIFFE id read) ─► HTTP/2 ─► per stream:
//!            └ within handshake_timeout ┘                       CONNECT? authority ip:port?  ─ no ─► 400
//!                                                               handler.authorize(request)  ─ no ─► 403
//!                                                               handler.dial(request)       ─ err ─► 503
//!                                                               200, then copy until both sides end
//! ```
//!
//! Limits: concurrent streams per connection, header block size, handshake timeout, and an
//! idle timeout for connections without streams. Listeners stop on drain; connections send
//! GOAWAY and finish their streams, or are closed when the drain deadline passes.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use rustls::server::ResolvesServerCert;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::copy::{self, CopyCause, CopyError, Transferred};
use crate::drain;
use crate::identity::SpiffeId;
use crate::socket;
use crate::tls::{self, TrustStore, VerifyError};
use crate::tunnel::Tunnel;

/// A CONNECT request, parsed: who asks (proved by mTLS), from where, for which target.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    pub peer_identity: SpiffeId,
    /// The TCP peer of the HBONE connection (the source node's or waypoint's address).
    pub peer_addr: SocketAddr,
    /// The local address the HBONE connection arrived on.
    pub local_addr: SocketAddr,
    pub target: SocketAddr,
    /// The original client address from `forwarded: for=`, if present and well-formed.
    pub forwarded_for: Option<IpAddr>,
    pub baggage: Option<HeaderValue>,
    pub traceparent: Option<HeaderValue>,
    /// When the CONNECT arrived (for access logs and durations).
    pub received_at: Instant,
}

/// Why a CONNECT is refused; each maps to the status of the wire contract.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// Policy forbids it: 403.
    #[error("denied by policy: {0}")]
    Denied(String),
    /// The target is not one this server serves: 400.
    #[error("target not served here: {0}")]
    NotServed(String),
}

impl Rejection {
    fn status(&self) -> StatusCode {
        match self {
            Rejection::Denied(_) => StatusCode::FORBIDDEN,
            Rejection::NotServed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// What the server asks its user for each CONNECT.
pub trait Handler: Send + Sync + 'static {
    /// What the handler keeps about one open tunnel, from `dial` to `finished` (metrics
    /// handles, access-log fields). Held for the tunnel's whole life: keep it small.
    type Session: Send + 'static;

    /// Decides whether this peer may reach this target. Called on the connection's task, so
    /// it must not block.
    fn authorize(&self, request: &InboundRequest) -> Result<(), Rejection>;

    /// Connects to the target; an error answers 503.
    fn dial(&self, request: &InboundRequest) -> impl Future<Output = io::Result<(TcpStream, Self::Session)>> + Send;

    /// Called when an accepted tunnel ends, with what it moved (access logs, metrics).
    fn finished(&self, _request: &InboundRequest, _session: Self::Session, _result: &Result<Transferred, CopyError>) {}
}

/// Why an incoming connection's handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake from {peer} did not complete within {after:?}")]
    Timeout { peer: SocketAddr, after: Duration },
    #[error("client {peer} presented no certificate; HBONE requires mutual TLS")]
    NoCertificate { peer: SocketAddr },
    #[error("client {peer} certificate refused: {reason}")]
    Refused { peer: SocketAddr, reason: VerifyError },
    #[error("TLS handshake with {peer} failed: {source}")]
    Tls { peer: SocketAddr, source: io::Error },
    #[error("HTTP/2 handshake with {peer} failed: {source}")]
    Http2 { peer: SocketAddr, source: h2::Error },
}

/// Counters about the server, for metrics and tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub streams_accepted: AtomicU64,
    pub streams_rejected: AtomicU64,
}

/// An HBONE server. Cheap to clone; all clones share stats.
pub struct Server<H> {
    inner: Arc<ServerInner<H>>,
}

impl<H> Clone for Server<H> {
    fn clone(&self) -> Self {
        Server { inner: self.inner.clone() }
    }
}

struct ServerInner<H> {
    config: Config,
    acceptor: TlsAcceptor,
    handler: H,
    stats: ServerStats,
}

impl<H: Handler> Server<H> {
    /// `certs` presents this server's identity (a [`tls::WorkloadCert`] for one workload).
    pub fn new(config: Config, certs: Arc<dyn ResolvesServerCert>, trust: &TrustStore, handler: H) -> Self {
        let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(certs, trust)));
        Server { inner: Arc::new(ServerInner { config, acceptor, handler, stats: ServerStats::default() }) }
    }

    pub fn stats(&self) -> &ServerStats {
        &self.inner.stats
    }

    pub fn handler(&self) -> &H {
        &self.inner.handler
    }

    /// Accepts connections until a drain starts. Connections run as their own tasks, each
    /// holding a clone of `drain`, so the drain waits for them.
    pub async fn serve(&self, listener: TcpListener, drain: drain::Watch) {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let inner = self.inner.clone();
                        let watch = drain.clone();
                        tokio::spawn(async move { inner.serve_connection(tcp, peer, watch).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "HBONE accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = drain.draining() => break,
            }
        }
        debug!("HBONE listener stopped accepting");
    }
}

/// Completes the TLS handshake and reads the client's SPIFFE identity.
pub async fn accept_tls(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, SpiffeId), HandshakeError> {
    let peer = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp).into_fallible()).await {
        Err(_) => return Err(HandshakeError::Timeout { peer, after: timeout }),
        Ok(Err((e, tcp))) => {
            // rustls has written the alert that says why; let the client read it.
            tokio::spawn(lingering_close(tcp));
            if let Some(reason) = tls::verify_error(&e) {
                return Err(HandshakeError::Refused { peer, reason });
            }
            let no_cert = matches!(
                e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
                Some(rustls::Error::NoCertificatesPresented)
            );
            if no_cert {
                return Err(HandshakeError::NoCertificate { peer });
            }
            return Err(HandshakeError::Tls { peer, source: e });
        }
        Ok(Ok(tls)) => tls,
    };
    let identity = tls::peer_identity(tls.get_ref().1.peer_certificates())
        .map_err(|reason| HandshakeError::Refused { peer, reason })?;
    Ok((tls, identity))
}

/// Closes a connection whose handshake we refused without resetting it: send FIN after the
/// alert, then read and discard what the client already sent (its HTTP/2 preface, say) for a
/// moment. Closing with unread data would send RST, and a RST can make the client's kernel
/// drop the alert before the client reads it, leaving it with "broken pipe" instead of why.
async fn lingering_close(mut tcp: TcpStream) {
    /// How long we wait for the client to read the alert and close.
    const LINGER: Duration = Duration::from_secs(2);
    /// How much we discard at most: a client still sending past this is not listening.
    const MAX_DISCARD: usize = 256 * 1024;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut discarded = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while discarded < MAX_DISCARD {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}

/// An admitted stream whose target answered.
struct Opened<S> {
    upstream: TcpStream,
    session: S,
    send: h2::SendStream<Bytes>,
    inbound: Box<InboundRequest>,
}

/// The parts of a connection every stream on it shares.
struct ConnContext {
    identity: SpiffeId,
    peer: SocketAddr,
    local: SocketAddr,
}

impl<H: Handler> ServerInner<H> {
    async fn serve_connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, drain: drain::Watch) {
        self.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.connections_active.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.run_connection(tcp, peer, &drain).await {
            self.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "HBONE connection refused");
        }
        self.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
    }

    async fn run_connection(
        self: &Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        drain: &drain::Watch,
    ) -> Result<(), HandshakeError> {
        socket::tune(&tcp);
        let local = tcp.local_addr().unwrap_or(peer);
        let timeout = self.config.handshake_timeout;
        let handshake = async {
            let (tls, identity) = accept_tls(&self.acceptor, tcp, timeout).await?;
            let conn = h2::server::Builder::new()
                .initial_window_size(self.config.stream_window)
                .initial_connection_window_size(self.config.connection_window)
                .max_frame_size(self.config.max_frame_size)
                .max_concurrent_streams(self.config.max_streams_per_connection)
                .max_header_list_size(self.config.max_header_list_size)
                .max_send_buffer_size(self.config.copy_buffer * 2)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| HandshakeError::Http2 { peer, source })?;
            Ok::<_, HandshakeError>((conn, identity))
        };
        // One deadline for TLS and HTTP/2 together: a client that stalls anywhere in the
        // handshake is dropped.
        let (mut conn, identity) = match tokio::time::timeout(timeout, handshake).await {
            Err(_) => return Err(HandshakeError::Timeout { peer, after: timeout }),
            Ok(r) => r?,
        };
        debug!(%peer, %identity, "HBONE connection accepted");
        let ctx = Arc::new(ConnContext { identity, peer, local });
        let active = Arc::new(());
        let mut idle = tokio::time::interval(self.config.server_idle_timeout);
        idle.tick().await;
        let mut used_since_tick = false;
        let mut draining = false;
        // Created once: this loop wakes for every frame the connection reads.
        let drain_started = drain.draining();
        let drain_closing = drain.closing();
        tokio::pin!(drain_started, drain_closing);
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((request, mut respond))) => {
                        used_since_tick = true;
                        // Checked here, without a task: a refused stream costs no task.
                        if let Some(inbound) = self.admit(&request, &mut respond, &ctx) {
                            let alive = (drain.clone(), active.clone());
                            tokio::spawn(self.clone().tunnel(inbound, request.into_body(), respond, alive));
                        }
                    }
                    Some(Err(e)) => {
                        if !e.is_go_away() && !e.is_io() {
                            debug!(%peer, error = %e, "HBONE connection error");
                        }
                        break;
                    }
                    None => break,
                },
                _ = &mut drain_started, if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                }
                _ = &mut drain_closing => break,
                _ = idle.tick() => {
                    // `active` has one reference per running stream plus ours.
                    if Arc::strong_count(&active) == 1 && !used_since_tick && !draining {
                        debug!(%peer, "HBONE connection idle, closing");
                        draining = true;
                        conn.graceful_shutdown();
                    }
                    used_since_tick = false;
                }
            }
        }
        Ok(())
    }

    /// Parses and authorizes a CONNECT; answers and returns `None` if it is refused.
    fn admit(
        &self,
        request: &Request<RecvStream>,
        respond: &mut SendResponse<Bytes>,
        ctx: &ConnContext,
    ) -> Option<Box<InboundRequest>> {
        let inbound = match parse_request(request, ctx) {
            Ok(r) => r,
            Err(why) => {
                debug!(peer = %ctx.peer, identity = %ctx.identity, why, "malformed HBONE request");
                self.reject(respond, StatusCode::BAD_REQUEST);
                return None;
            }
        };
        if let Err(rejection) = self.handler.authorize(&inbound) {
            info!(peer = %ctx.peer, identity = %ctx.identity, target = %inbound.target, %rejection, "HBONE tunnel refused");
            self.reject(respond, rejection.status());
            return None;
        }
        Some(Box::new(inbound))
    }

    /// An admitted stream's task: dials the target, answers, and copies until the tunnel
    /// ends. `alive` holds the drain and the connection's stream count for as long.
    fn tunnel(
        self: Arc<Self>,
        inbound: Box<InboundRequest>,
        body: RecvStream,
        respond: SendResponse<Bytes>,
        alive: (drain::Watch, Arc<()>),
    ) -> impl Future<Output = ()> + Send {
        // Boxed, and made here rather than inside an `async fn`: the dial is over once the
        // tunnel opens, and the task should keep room for neither it nor its arguments while
        // copying (every open tunnel holds this task).
        let open = Box::pin(self.clone().open(inbound, respond));
        self.relay(open, body, alive)
    }

    /// Dials the target (bounded like the client's wait for our answer: a target that never
    /// answers the SYN must not hold the stream forever) and answers `200` or `503`.
    async fn open(
        self: Arc<Self>,
        inbound: Box<InboundRequest>,
        mut respond: SendResponse<Bytes>,
    ) -> Option<Opened<H::Session>> {
        let dial = tokio::time::timeout(self.config.connect_timeout, self.handler.dial(&inbound));
        let dialed = dial.await.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "dial timed out")));
        let (upstream, session) = match dialed {
            Ok(dialed) => dialed,
            Err(e) => {
                info!(identity = %inbound.peer_identity, target = %inbound.target, error = %e, "HBONE target unreachable");
                self.reject(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return None;
            }
        };
        let _ = upstream.set_nodelay(true);
        let send = match respond.send_response(response(StatusCode::OK), false) {
            Ok(send) => send,
            Err(e) => {
                debug!(error = %e, "HBONE client went away before the tunnel opened");
                // The handler opened a session at the dial: close it, with nothing moved.
                let cause = CopyCause::Tunnel(io::Error::new(io::ErrorKind::ConnectionReset, e));
                self.handler.finished(
                    &inbound,
                    session,
                    &Err(CopyError { cause, transferred: Transferred::default() }),
                );
                return None;
            }
        };
        self.stats.streams_accepted.fetch_add(1, Ordering::Relaxed);
        Some(Opened { upstream, session, send, inbound })
    }

    async fn relay(
        self: Arc<Self>,
        open: Pin<Box<impl Future<Output = Option<Opened<H::Session>>>>>,
        body: RecvStream,
        _alive: (drain::Watch, Arc<()>),
    ) {
        let Some(Opened { mut upstream, session, send, inbound }) = open.await else {
            return;
        };
        let tunnel = Tunnel::new(send, body, inbound.peer_identity.clone(), None);
        let result = copy::bidirectional(&mut upstream, tunnel, self.config.copy_buffer).await;
        self.handler.finished(&inbound, session, &result);
    }

    fn reject(&self, respond: &mut SendResponse<Bytes>, status: StatusCode) {
        self.stats.streams_rejected.fetch_add(1, Ordering::Relaxed);
        let _ = respond.send_response(response(status), true);
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Parses a CONNECT per the wire contract; the error says what is malformed.
fn parse_request(request: &Request<RecvStream>, ctx: &ConnContext) -> Result<InboundRequest, &'static str> {
    if request.method() != Method::CONNECT {
        return Err("method is not CONNECT");
    }
    let authority = request.uri().authority().ok_or("CONNECT without :authority")?;
    let target: SocketAddr = authority.as_str().parse().map_err(|_| "authority is not ip:port")?;
    let headers = request.headers();
    Ok(InboundRequest {
        peer_identity: ctx.identity.clone(),
        peer_addr: ctx.peer,
        local_addr: ctx.local,
        target,
        forwarded_for: headers.get(http::header::FORWARDED).and_then(parse_forwarded_for),
        baggage: headers.get("baggage").cloned(),
        traceparent: headers.get("traceparent").cloned(),
        received_at: Instant::now(),
    })
}

/// Reads the first `for=` of a `forwarded` header (RFC 7239): `for=1.2.3.4`,
/// `for="[2001:db8::1]"`, optionally with a port. Anything else yields `None`.
fn parse_forwarded_for(value: &HeaderValue) -> Option<IpAddr> {
    let value = value.to_str().ok()?;
    let first = value.split(',').next()?;
    let pair = first.split(';').map(str::trim).find(|p| p.len() > 4 && p[..4].eq_ignore_ascii_case("for="))?;
    let node = pair[4..].trim_matches('"');
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    // IPv4 with a port.
    node.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open tunnel holds this future: the dial is boxed and the request parsed into a
    /// box, so that an idle tunnel keeps only the copy state (it was 2 KB before). Tokio
    /// allocates a task in 128-byte steps with about 100 bytes of its own: with a handler
    /// session of up to 60 bytes (ztunnel's is 40), this task takes 1024. The test handler's
    /// dial keeps 4 KiB across an await, so a dial that is no longer boxed fails this.
    #[test]
    fn stream_task_stays_small() {
        struct Refuse;
        impl Handler for Refuse {
            type Session = ();
            fn authorize(&self, _: &InboundRequest) -> Result<(), Rejection> {
                Ok(())
            }
            async fn dial(&self, _: &InboundRequest) -> io::Result<(TcpStream, ())> {
                let scratch = [0u8; 4096];
                tokio::task::yield_now().await;
                let used = std::hint::black_box(&scratch).len();
                Err(io::Error::other(format!("refused after {used} bytes of scratch")))
            }
        }
        type Args =
            (Arc<ServerInner<Refuse>>, Box<InboundRequest>, RecvStream, SendResponse<Bytes>, (drain::Watch, Arc<()>));
        fn future_size<F>(_f: impl FnOnce(Args) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size =
            future_size(|(inner, inbound, body, respond, alive): Args| inner.tunnel(inbound, body, respond, alive));
        assert!(size <= 860, "HBONE stream task grew to {size} bytes");
    }

    #[test]
    fn forwarded_for_forms() {
        let p = |s: &str| parse_forwarded_for(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("for=10.0.0.1"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(p("For=10.0.0.1:443;proto=https"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(p("for=\"[2001:db8::1]\""), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(p("for=\"[2001:db8::1]:80\", for=1.1.1.1"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(p("for=unknown"), None);
        assert_eq!(p("by=10.0.0.1"), None);
    }
}
