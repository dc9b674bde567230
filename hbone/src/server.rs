//! The HBONE server: accepts mutual TLS, serves HTTP/2, and turns each CONNECT into a tunnel
//! to a target chosen and authorized by the caller's [`Handler`].
//!
//! ```text
//!  accept ─► handshake slot? ─ no ─► closed (RST)
//!            TLS 1.3 (client cert required, SPIFFE id read) ─► HTTP/2 ─► per stream:
//!            └ within handshake_timeout ┘                       CONNECT? authority ip:port?
//!                                                               forwarded well-formed?      ─ no ─► 400
//!                                                               handler.authorize(request)  ─ no ─► 403
//!                                                               dial permit (connection, peer) ─ late ─► 503
//!                                                               handler.dial(request)       ─ err ─► 503
//!                                                               200, then copy until both sides end
//!            a client RST_STREAM while waiting or dialing ends the stream there (premature)
//! ```
//!
//! 400 means the request cannot be read as the wire contract says (including a `forwarded`
//! header we cannot read exactly); 403 means it was read and the handler refuses it. The
//! `forwarded: for=` address is only a claim: the server parses it and hands it to the
//! handler, which decides whether the peer may make it.
//!
//! Limits: concurrent streams per connection, header block size, handshake timeout, and an
//! idle timeout for connections without streams; against hostile clients ([`crate::limits`]):
//! pending handshakes per listener and per process, idle connections, dials in flight per
//! connection and per peer, premature stream resets (GOAWAY `ENHANCE_YOUR_CALM`), and
//! rate-limited log lines. Listeners stop on drain; connections send GOAWAY and finish their
//! streams, or are closed when the drain deadline passes.

use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use rustls::server::ResolvesServerCert;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::copy::{self, CopyCause, CopyError, Transferred};
use crate::drain;
use crate::identity::SpiffeId;
use crate::limits::{Cause, ListenerCounts, Refusal, ResetWindow, ServerLog, Slot};
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
    /// The client address the request claims, from `forwarded: for=` (a malformed header is
    /// refused with 400, so `None` means none was claimed). Claimed, not proved: the
    /// handler decides whether to believe it.
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

/// What an admitted tunnel is handed to once it is answered `200`.
///
/// ztunnel dials the target and the server copies bytes both ways ([`TcpStream`]); the
/// waypoint serves HTTP on the tunnel itself.
pub trait Upstream: Send + 'static {
    /// Carries `tunnel` until both directions end; `copy_buffer` is the server's configured
    /// buffer size for byte copies. (`&mut self`, so that the server's task holds the
    /// upstream once and the future only borrows it: every open tunnel holds that task.)
    fn run(
        &mut self,
        tunnel: Tunnel,
        copy_buffer: usize,
    ) -> impl Future<Output = Result<Transferred, CopyError>> + Send + '_;
}

impl Upstream for TcpStream {
    fn run(
        &mut self,
        tunnel: Tunnel,
        copy_buffer: usize,
    ) -> impl Future<Output = Result<Transferred, CopyError>> + Send + '_ {
        let _ = self.set_nodelay(true);
        copy::bidirectional(self, tunnel, copy_buffer)
    }
}

/// What the server asks its user for each CONNECT.
pub trait Handler: Send + Sync + 'static {
    /// What the handler keeps about one open tunnel, from `dial` to `finished` (metrics
    /// handles, access-log fields). Held for the tunnel's whole life: keep it small.
    type Session: Send + 'static;

    /// What carries an admitted tunnel (a TCP connection to the target, for ztunnel).
    type Upstream: Upstream;

    /// Decides whether this peer may reach this target. Called on the connection's task, so
    /// it must not block.
    fn authorize(&self, request: &InboundRequest) -> Result<(), Rejection>;

    /// Connects to the target; an error answers 503.
    fn dial(
        &self,
        request: &InboundRequest,
    ) -> impl Future<Output = io::Result<(Self::Upstream, Self::Session)>> + Send;

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
    /// Connections closed before TLS: too many handshakes pending.
    pub handshakes_refused: AtomicU64,
    /// Connections closed because they became idle with the idle budget spent.
    pub idle_closed: AtomicU64,
    /// Connections closed with GOAWAY(ENHANCE_YOUR_CALM) for resetting streams early.
    pub reset_floods: AtomicU64,
    /// Streams the client reset before our answer or within `premature_reset` of the CONNECT.
    pub streams_reset_early: AtomicU64,
    /// Calls of the handler's `dial`.
    pub dials: AtomicU64,
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

    /// Serves one connection whose TLS handshake is already done, as [`serve`](Self::serve)
    /// does after it: the HTTP/2 handshake (within the handshake timeout), then its streams,
    /// `identity` standing for the peer's proved identity. For the fuzz targets (`fuzz/`),
    /// which feed HTTP/2 and CONNECT requests through the real path without TLS.
    #[cfg(feature = "fuzzing")]
    pub async fn serve_established<IO>(
        &self,
        io: IO,
        identity: SpiffeId,
        peer: SocketAddr,
        local: SocketAddr,
        drain: drain::Watch,
    ) -> Result<(), HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let timeout = self.inner.config.handshake_timeout;
        let conn = match tokio::time::timeout(timeout, self.inner.h2_builder().handshake::<_, Bytes>(io)).await {
            Err(_) => return Err(HandshakeError::Timeout { peer, after: timeout }),
            Ok(r) => r.map_err(|source| HandshakeError::Http2 { peer, source })?,
        };
        self.inner.serve_h2(conn, ConnContext::new(identity, peer, local, &self.inner.config), &drain, None).await;
        Ok(())
    }

    /// Accepts connections until a drain starts. Connections run as their own tasks, each
    /// holding a clone of `drain`, so the drain waits for them.
    ///
    /// A connection arriving while the listener or the process has its full count of pending
    /// handshakes is closed at once (RST), unread: counted, logged (rate-limited) and reported.
    pub async fn serve(&self, listener: TcpListener, drain: drain::Watch) {
        let counts = Arc::new(ListenerCounts::default());
        let (limits, budget) = (&self.inner.config.limits, &self.inner.config.budget);
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let Some(slot) = budget.handshake_slot(&counts, limits) else {
                            self.inner.refuse_handshake(tcp, peer);
                            continue;
                        };
                        let inner = self.inner.clone();
                        let (watch, counts) = (drain.clone(), counts.clone());
                        tokio::spawn(async move { inner.serve_connection(tcp, peer, watch, slot, counts).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        if budget.log(ServerLog::AcceptFailed, limits.log) {
                            warn!(error = %e, "HBONE accept failed");
                        }
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
    accept_tls_holding(acceptor, tcp, timeout, &mut None::<()>).await
}

/// [`accept_tls`], handing `hold` (a pending-handshake slot) to the lingering close of a
/// refused handshake, so that lingering sockets count as pending too.
async fn accept_tls_holding<T: Send + 'static>(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
    hold: &mut Option<T>,
) -> Result<(TlsStream<TcpStream>, SpiffeId), HandshakeError> {
    let peer = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp).into_fallible()).await {
        Err(_) => return Err(HandshakeError::Timeout { peer, after: timeout }),
        Ok(Err((e, tcp))) => {
            // rustls has written the alert that says why; let the client read it.
            let held = hold.take();
            tokio::spawn(async move {
                lingering_close(tcp).await;
                drop(held);
            });
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
struct Opened<U, S> {
    upstream: U,
    session: S,
    send: h2::SendStream<Bytes>,
    inbound: Box<InboundRequest>,
}

/// The parts of a connection every stream on it shares. Each stream's task holds a reference,
/// so the count of references is the count of open streams (plus the connection's own).
struct ConnContext {
    identity: SpiffeId,
    peer: SocketAddr,
    local: SocketAddr,
    /// Dials in flight for this connection ([`crate::limits::Limits::dials_per_connection`]).
    dials: Semaphore,
    /// Premature resets and the streams they are measured against.
    resets: Mutex<ResetWindow>,
    /// Woken once, when `resets` crosses the flood threshold.
    flood: Notify,
    /// Streams running (their tasks), counted by [`StreamGuard`].
    streams: AtomicUsize,
    /// Woken when the last running stream ends: the connection's idle beat starts then.
    quiet: Notify,
}

impl ConnContext {
    fn new(identity: SpiffeId, peer: SocketAddr, local: SocketAddr, config: &Config) -> ConnContext {
        let dials = config.limits.dials_per_connection.clamp(1, Semaphore::MAX_PERMITS);
        ConnContext {
            identity,
            peer,
            local,
            dials: Semaphore::new(dials),
            resets: Mutex::new(ResetWindow::default()),
            flood: Notify::new(),
            streams: AtomicUsize::new(0),
            quiet: Notify::new(),
        }
    }

    fn streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }
}

/// The next tick of an idle beat; never, without one.
async fn beat_of(beat: &mut Option<tokio::time::Interval>) {
    match beat {
        Some(beat) => {
            beat.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One running stream of a connection, for as long as its task holds it.
struct StreamGuard(Arc<ConnContext>);

impl StreamGuard {
    fn new(conn: Arc<ConnContext>) -> StreamGuard {
        conn.streams.fetch_add(1, Ordering::AcqRel);
        StreamGuard(conn)
    }
}

impl std::ops::Deref for StreamGuard {
    type Target = ConnContext;
    fn deref(&self) -> &ConnContext {
        &self.0
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.quiet.notify_one();
        }
    }
}

/// Whether the tunnel failed because the client reset the stream (RST_STREAM it sent).
fn reset_by_client(result: &Result<Transferred, CopyError>) -> bool {
    let Err(CopyError { cause: CopyCause::Tunnel(e), .. }) = result else {
        return false;
    };
    e.get_ref().and_then(|inner| inner.downcast_ref::<h2::Error>()).is_some_and(|h| h.is_reset() && h.is_remote())
}

impl<H: Handler> ServerInner<H> {
    async fn serve_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        drain: drain::Watch,
        slot: Slot,
        counts: Arc<ListenerCounts>,
    ) {
        self.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.connections_active.fetch_add(1, Ordering::Relaxed);
        let local = tcp.local_addr().unwrap_or(peer);
        if let Err(e) = self.run_connection(tcp, peer, local, &drain, slot, &counts).await {
            self.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            self.config.budget.refused(Refusal { cause: Cause::HandshakeFailed, local, peer });
            let kind = match &e {
                HandshakeError::Timeout { .. } => ServerLog::HandshakeTimeout,
                HandshakeError::NoCertificate { .. } => ServerLog::NoCertificate,
                HandshakeError::Refused { .. } => ServerLog::CertificateRefused,
                HandshakeError::Tls { .. } => ServerLog::TlsFailed,
                HandshakeError::Http2 { .. } => ServerLog::Http2Failed,
            };
            if self.config.budget.log(kind, self.config.limits.log) {
                warn!(error = %e, "HBONE connection refused");
            }
        }
        self.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes a connection the pending-handshake budget has no room for.
    fn refuse_handshake(&self, tcp: TcpStream, peer: SocketAddr) {
        self.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        let local = tcp.local_addr().unwrap_or(peer);
        // RST: the socket is released at once, without TIME_WAIT, and the client is not left
        // waiting for a handshake that will not come.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        drop(tcp);
        let budget = &self.config.budget;
        budget.refused(Refusal { cause: Cause::HandshakeLimit, local, peer });
        if budget.log(ServerLog::HandshakeLimit, self.config.limits.log) {
            let pending = budget.pending_handshakes();
            warn!(%peer, %local, pending, "HBONE connection refused: too many TLS handshakes pending");
        }
    }

    async fn run_connection(
        self: &Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        drain: &drain::Watch,
        slot: Slot,
        counts: &Arc<ListenerCounts>,
    ) -> Result<(), HandshakeError> {
        socket::tune(&tcp);
        let timeout = self.config.handshake_timeout;
        let mut slot = Some(slot);
        let handshake = async {
            let (mut tls, identity) = accept_tls_holding(&self.acceptor, tcp, timeout, &mut slot).await?;
            tls.get_mut().1.set_buffer_limit(Some(self.config.tls_send_buffer));
            let conn = self
                .h2_builder()
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|source| HandshakeError::Http2 { peer, source })?;
            Ok::<_, HandshakeError>((conn, identity))
        };
        // One deadline for TLS and HTTP/2 together: a client that stalls anywhere in the
        // handshake is dropped.
        let (conn, identity) = match tokio::time::timeout(timeout, handshake).await {
            Err(_) => return Err(HandshakeError::Timeout { peer, after: timeout }),
            Ok(r) => r?,
        };
        // No longer pending.
        drop(slot);
        self.serve_h2(conn, ConnContext::new(identity, peer, local, &self.config), drain, Some(counts)).await;
        Ok(())
    }

    /// HTTP/2 with the configured windows and limits.
    fn h2_builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.config.stream_window)
            .initial_connection_window_size(self.config.connection_window)
            .max_frame_size(self.config.max_frame_size)
            .max_concurrent_streams(self.config.max_streams_per_connection)
            .max_header_list_size(self.config.max_header_list_size)
            .max_local_error_reset_streams(Some(self.config.limits.local_error_resets))
            .max_send_buffer_size(self.config.stream_send_buffer);
        builder
    }

    /// Serves the streams of a handshaken connection until it ends, idles out, floods or the
    /// drain closes it. Generic over the transport so the fuzz targets reach it without TLS;
    /// `counts` is the listener's share of the idle budget (none: the process' alone).
    ///
    /// Idle: checked every `idle_after` (or server idle timeout, if shorter). A connection
    /// with no stream since the last check takes an idle slot, or gets GOAWAY when there is
    /// none; it gives the slot back when a stream starts, and is closed after the server idle
    /// timeout anyway.
    async fn serve_h2<IO>(
        self: &Arc<Self>,
        mut conn: h2::server::Connection<IO, Bytes>,
        ctx: ConnContext,
        drain: &drain::Watch,
        counts: Option<&Arc<ListenerCounts>>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let (peer, local) = (ctx.peer, ctx.local);
        debug!(%peer, identity = %ctx.identity, "HBONE connection accepted");
        let ctx = Arc::new(ctx);
        let limits = &self.config.limits;
        // The idle beat runs only while no stream does: a connection carrying traffic has no
        // timer of its own (a timer waking among the traffic moves that work between the
        // runtime's worker threads: ARCHITECTURE §4, "No timer on a quiet node").
        let beat = limits.idle_after.min(self.config.server_idle_timeout).max(Duration::from_millis(1));
        let start_beat = || {
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            beat
        };
        let mut idle = Some(start_beat());
        let (mut idle_for, mut idle_slot) = (Duration::ZERO, None);
        let counts = counts.cloned().unwrap_or_default();
        let mut draining = false;
        // Created once: this loop wakes for every frame the connection reads.
        let drain_started = drain.draining();
        let drain_closing = drain.closing();
        let flood = ctx.flood.notified();
        let quiet = ctx.quiet.notified();
        tokio::pin!(drain_started, drain_closing, flood, quiet);
        let mut flooded = false;
        loop {
            tokio::select! {
                next = conn.accept() => match next {
                    Some(Ok((request, mut respond))) => {
                        idle_for = Duration::ZERO;
                        idle_slot = None;
                        // Checked here, without a task: a refused stream costs no task.
                        if let Some(inbound) = self.admit(&request, &mut respond, &ctx) {
                            ctx.resets.lock().unwrap_or_else(|p| p.into_inner()).stream(Instant::now(), limits.reset_flood);
                            let alive = (drain.clone(), StreamGuard::new(ctx.clone()));
                            tokio::spawn(self.clone().tunnel(inbound, request.into_body(), respond, alive));
                        }
                        // Idle counts from the last stream's end (`quiet`), or from now.
                        idle = (ctx.streams() == 0 && !draining).then(start_beat);
                    }
                    Some(Err(e)) => {
                        if !e.is_go_away() && !e.is_io() {
                            debug!(%peer, error = %e, "HBONE connection error");
                        }
                        break;
                    }
                    None => break,
                },
                _ = &mut flood, if !flooded => {
                    flooded = true;
                    draining = true;
                    self.stats.reset_floods.fetch_add(1, Ordering::Relaxed);
                    let budget = &self.config.budget;
                    budget.refused(Refusal { cause: Cause::ResetFlood, local, peer });
                    if budget.log(ServerLog::ResetFlood, limits.log) {
                        let rate = limits.reset_flood;
                        warn!(%peer, identity = %ctx.identity, %rate, "HBONE connection closed: the client reset too many streams early");
                    }
                    // Its streams are all the flooding client's: end them with it.
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                }
                _ = &mut drain_started, if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                }
                _ = &mut drain_closing => break,
                _ = &mut quiet => {
                    quiet.set(ctx.quiet.notified());
                    if ctx.streams() == 0 && !draining && idle.is_none() {
                        (idle, idle_for, idle_slot) = (Some(start_beat()), Duration::ZERO, None);
                    }
                }
                _ = beat_of(&mut idle) => {
                    if ctx.streams() > 0 || draining {
                        // Busy again (the stream that made it so is counted): no beat until
                        // the last stream ends.
                        (idle, idle_for, idle_slot) = (None, Duration::ZERO, None);
                        continue;
                    }
                    idle_for += beat;
                    if idle_for >= self.config.server_idle_timeout {
                        debug!(%peer, "HBONE connection idle, closing");
                        draining = true;
                        conn.graceful_shutdown();
                    } else if idle_for >= limits.idle_after && idle_slot.is_none() {
                        idle_slot = self.config.budget.idle_slot(&counts, limits);
                        if idle_slot.is_none() {
                            self.refuse_idle(peer, local, &ctx.identity);
                            draining = true;
                            conn.graceful_shutdown();
                        }
                    }
                }
            }
        }
    }

    /// Counts and logs an idle connection closed for want of an idle slot.
    fn refuse_idle(&self, peer: SocketAddr, local: SocketAddr, identity: &SpiffeId) {
        self.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
        let budget = &self.config.budget;
        budget.refused(Refusal { cause: Cause::IdleLimit, local, peer });
        if budget.log(ServerLog::IdleLimit, self.config.limits.log) {
            let idle = budget.idle_connections();
            warn!(%peer, %identity, idle, "HBONE connection closed: too many idle connections");
        }
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
            if self.config.budget.log(ServerLog::TunnelRefused, self.config.limits.log) {
                info!(peer = %ctx.peer, identity = %ctx.identity, target = %inbound.target, %rejection, "HBONE tunnel refused");
            }
            self.reject(respond, rejection.status());
            return None;
        }
        Some(Box::new(inbound))
    }

    /// An admitted stream's task: dials the target, answers, and copies until the tunnel
    /// ends. `alive` holds the drain and counts the stream on its connection for as long.
    fn tunnel(
        self: Arc<Self>,
        inbound: Box<InboundRequest>,
        body: RecvStream,
        respond: SendResponse<Bytes>,
        alive: (drain::Watch, StreamGuard),
    ) -> impl Future<Output = ()> + Send {
        // Boxed, and made here rather than inside an `async fn`: the dial is over once the
        // tunnel opens, and the task should keep room for neither it nor its arguments while
        // copying (every open tunnel holds this task).
        let open = Box::pin(self.clone().open(inbound, respond, alive.1.0.clone()));
        self.relay(open, body, alive)
    }

    /// Takes a dial permit (the connection's, then the peer's), dials the target and answers
    /// `200` or `503`, all within the CONNECT answer timeout counted from the request (the
    /// client's own wait for our answer: a target that never answers the SYN must not hold the
    /// stream forever). A client reset while waiting or dialing ends the stream there: a reset
    /// stream is never dialed, and a dial it interrupts is abandoned.
    async fn open(
        self: Arc<Self>,
        inbound: Box<InboundRequest>,
        mut respond: SendResponse<Bytes>,
        conn: Arc<ConnContext>,
    ) -> Option<Opened<H::Upstream, H::Session>> {
        let deadline = tokio::time::Instant::from_std(inbound.received_at) + self.config.connect_timeout;
        let permits = async {
            // The semaphore is never closed, so this is never an error.
            let own = conn.dials.acquire().await.ok();
            let peer = self.config.budget.peer_dial(conn.peer.ip(), self.config.limits.dials_per_peer).await;
            (own, peer)
        };
        let permits = tokio::select! {
            biased;
            reset = poll_fn(|cx| respond.poll_reset(cx)) => {
                self.reset_early(&conn, reset.is_ok());
                return None;
            }
            permits = tokio::time::timeout_at(deadline, permits) => permits,
        };
        let Ok(permits) = permits else {
            self.refuse_dial(&inbound, &mut respond);
            return None;
        };
        self.stats.dials.fetch_add(1, Ordering::Relaxed);
        let dialed = tokio::select! {
            biased;
            reset = poll_fn(|cx| respond.poll_reset(cx)) => {
                self.reset_early(&conn, reset.is_ok());
                return None;
            }
            dialed = tokio::time::timeout_at(deadline, self.handler.dial(&inbound)) => dialed,
        };
        drop(permits);
        let dialed = dialed.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "dial timed out")));
        let (upstream, session) = match dialed {
            Ok(dialed) => dialed,
            Err(e) => {
                if self.config.budget.log(ServerLog::TargetUnreachable, self.config.limits.log) {
                    info!(identity = %inbound.peer_identity, target = %inbound.target, error = %e, "HBONE target unreachable");
                }
                self.reject(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                return None;
            }
        };
        let send = match respond.send_response(response(StatusCode::OK), false) {
            Ok(send) => send,
            Err(e) => {
                debug!(error = %e, "HBONE client went away before the tunnel opened");
                self.reset_early(&conn, e.is_reset() && e.is_remote());
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
        open: Pin<Box<impl Future<Output = Option<Opened<H::Upstream, H::Session>>>>>,
        body: RecvStream,
        alive: (drain::Watch, StreamGuard),
    ) {
        let Some(Opened { mut upstream, session, send, inbound }) = open.await else {
            return;
        };
        let tunnel = Tunnel::new(send, body, inbound.peer_identity.clone(), None);
        let result = upstream.run(tunnel, self.config.copy_buffer).await;
        if reset_by_client(&result) && inbound.received_at.elapsed() < self.config.limits.premature_reset {
            self.reset_early(&alive.1, true);
        }
        self.handler.finished(&inbound, session, &result);
    }

    /// A stream ended by the client before its answer or soon after. Only a RST_STREAM the
    /// client sent (`by_client`) counts towards a flood, not the connection failing.
    fn reset_early(&self, conn: &ConnContext, by_client: bool) {
        if !by_client {
            return;
        }
        self.stats.streams_reset_early.fetch_add(1, Ordering::Relaxed);
        let rate = self.config.limits.reset_flood;
        if conn.resets.lock().unwrap_or_else(|p| p.into_inner()).premature(Instant::now(), rate) {
            conn.flood.notify_one();
        }
    }

    /// Answers 503 to a stream that found no dial permit before its deadline.
    fn refuse_dial(&self, inbound: &InboundRequest, respond: &mut SendResponse<Bytes>) {
        let budget = &self.config.budget;
        budget.refused(Refusal { cause: Cause::DialLimit, local: inbound.local_addr, peer: inbound.peer_addr });
        if budget.log(ServerLog::DialLimit, self.config.limits.log) {
            let (peer, in_flight) = (inbound.peer_addr, budget.peer_dials(inbound.peer_addr.ip()));
            warn!(%peer, identity = %inbound.peer_identity, target = %inbound.target, in_flight, "HBONE tunnel refused: too many dials in flight for its peer");
        }
        self.reject(respond, StatusCode::SERVICE_UNAVAILABLE);
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
        forwarded_for: headers.get(http::header::FORWARDED).map(parse_forwarded_for).transpose()?.flatten(),
        baggage: headers.get("baggage").cloned(),
        traceparent: headers.get("traceparent").cloned(),
        received_at: Instant::now(),
    })
}

/// Reads the client address of a `forwarded` header (RFC 7239): the `for=` of its first
/// element, as `for=1.2.3.4`, `for="1.2.3.4:80"` or `for="[2001:db8::1]"` (a port is
/// allowed and ignored). `Ok(None)` when the first element has no `for=` or names no address
/// (`unknown`, an obfuscated `_name`). Anything else is malformed, and the request with it
/// (answered 400): a value we cannot read exactly must not be half-read into an address.
pub(crate) fn parse_forwarded_for(value: &HeaderValue) -> Result<Option<IpAddr>, &'static str> {
    let value = value.to_str().map_err(|_| "forwarded header is not visible ASCII")?;
    let first = value.split(',').next().unwrap_or_default();
    let Some(pair) =
        first.split(';').map(str::trim).find(|p| p.get(..4).is_some_and(|k| k.eq_ignore_ascii_case("for=")))
    else {
        return Ok(None);
    };
    // `get(..4)` matched, so 4 is a character boundary.
    let raw = &pair[4..];
    let node = match raw.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"').ok_or("forwarded for= has an unclosed quote")?,
        None => raw,
    };
    if node.contains(['"', '\\']) {
        return Err("forwarded for= has a stray quote or an escape");
    }
    if let Some(bracketed) = node.strip_prefix('[') {
        let (ip, rest) = bracketed.split_once(']').ok_or("forwarded for= has an unclosed '['")?;
        let ip: Ipv6Addr = ip.parse().map_err(|_| "forwarded for= brackets hold no IPv6 address")?;
        return match rest {
            "" => Ok(Some(ip.into())),
            _ => rest
                .strip_prefix(':')
                .map_or(Err("forwarded for= has text after ']'"), node_port)
                .map(|()| Some(ip.into())),
        };
    }
    // An IP, IPv6 included if sent without brackets (lenient: it cannot be misread).
    if let Ok(ip) = node.parse() {
        return Ok(Some(ip));
    }
    let (name, port) = match node.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (node, None),
    };
    port.map_or(Ok(()), node_port)?;
    if name.eq_ignore_ascii_case("unknown") || is_obfuscated(name) {
        return Ok(None);
    }
    name.parse::<Ipv4Addr>().map(|ip| Some(ip.into())).map_err(|_| "forwarded for= is not an address")
}

/// RFC 7239 `node-port`: a port number or an obfuscated port.
fn node_port(port: &str) -> Result<(), &'static str> {
    if port.parse::<u16>().is_ok() || is_obfuscated(port) {
        return Ok(());
    }
    Err("forwarded for= has an invalid port")
}

/// RFC 7239 `obfnode`/`obfport`: `_` then letters, digits, `.`, `_`, `-`.
fn is_obfuscated(s: &str) -> bool {
    s.strip_prefix('_').is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    })
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
            type Upstream = TcpStream;
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
        type Args = (
            Arc<ServerInner<Refuse>>,
            Box<InboundRequest>,
            RecvStream,
            SendResponse<Bytes>,
            (drain::Watch, StreamGuard),
        );
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
        let ip = |s: &str| Ok(Some(s.parse::<IpAddr>().unwrap()));
        assert_eq!(p("for=10.0.0.1"), ip("10.0.0.1"));
        assert_eq!(p("For=10.0.0.1:443;proto=https"), ip("10.0.0.1"));
        assert_eq!(p("for=\"10.0.0.1:443\""), ip("10.0.0.1"));
        assert_eq!(p("for=\"[2001:db8::1]\""), ip("2001:db8::1"));
        assert_eq!(p("for=\"[2001:db8::1]:80\", for=1.1.1.1"), ip("2001:db8::1"));
        assert_eq!(p("proto=https;for=10.0.0.2"), ip("10.0.0.2"));
        assert_eq!(p("for=unknown"), Ok(None));
        assert_eq!(p("for=_hidden:_port"), Ok(None));
        assert_eq!(p("by=10.0.0.1"), Ok(None));
    }

    /// A malformed claim is refused whole, never read as the address it half resembles.
    #[test]
    fn malformed_forwarded_for_is_refused() {
        let p = |s: &str| parse_forwarded_for(&HeaderValue::from_str(s).unwrap());
        assert_eq!(p("for=\"[2001:db8::1\""), Err("forwarded for= has an unclosed '['"));
        for bad in [
            "for=[2001:db8::1",
            "for=\"[2001:db8::1]",
            "for=\"10.0.0.1",
            "for=10.0.0.1\"",
            "for=\"[10.0.0.1]\"",
            "for=\"[2001:db8::1]x\"",
            "for=\"[2001:db8::1]:http\"",
            "for=10.0.0.1:99999",
            "for=",
            "for=example.com",
            "for=999.0.0.1",
        ] {
            assert!(p(bad).is_err(), "{bad:?} was accepted as {:?}", p(bad));
        }
        let not_ascii = HeaderValue::from_bytes(b"for=10.0.0.1\xff").unwrap();
        assert!(parse_forwarded_for(&not_ascii).is_err());
    }
}
