//! The HBONE client: opens tunnels over pooled HTTP/2 connections.
//!
//! A tunnel request names the source workload (whose certificate we present), the address to
//! dial (a pod's or waypoint's port 15008), the identities the server may prove, and the
//! CONNECT target. Streams are multiplexed over connections keyed by
//! (source identity, source address, destination address, expected identities):
//!
//! ```text
//!  connect(req) ─► checkout: a live connection of this key with a free stream slot?
//!                    │ yes                              │ no
//!                    ▼                                  ▼
//!              open CONNECT stream         dial lock for the key (one handshake at a time;
//!                    ▲                      waiters re-check the pool, or share the failure)
//!                    └──────────── TCP ► TLS 1.3 (SPIFFE verify) ► HTTP/2 handshake
//! ```
//!
//! A new stream goes to the connection of its key carrying the fewest streams. While every
//! connection of the key carries one and fewer than `spread_connections` are open, another is
//! dialed first, so that busy streams do not all queue behind one TLS session and one HTTP/2
//! connection task; if that dial fails, the stream shares a connection after all. A
//! connection carries at most `max_streams_per_connection` streams; past that another is
//! opened. A connection with no stream for `pool_idle_timeout` is closed (its timer runs only
//! from its last stream's end, none while it carries one). Connections verified
//! against an older trust bundle take no new streams (their open streams keep flowing).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use crate::config::Config;
use crate::identity::SpiffeId;
use crate::socket;
use crate::tls::{self, TrustStore, VerifyError, WorkloadCert};
use crate::tunnel::Tunnel;

/// Opens the TCP connection under a tunnel. ztunnel supplies one that creates the socket
/// inside the source pod's network namespace; [`DirectDialer`] connects from the caller's.
pub trait Dialer: Send + Sync + 'static {
    fn dial(
        &self,
        source: Option<IpAddr>,
        dest: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>>;
}

/// Connects from the current network namespace, binding the source address if given.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectDialer;

impl Dialer for DirectDialer {
    fn dial(
        &self,
        source: Option<IpAddr>,
        dest: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        Box::pin(async move {
            let socket =
                if dest.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            if let Some(ip) = source {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            socket.set_nodelay(true)?;
            socket.connect(dest).await
        })
    }
}

/// One tunnel to open.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// The workload on whose behalf we connect; its certificate is presented.
    pub source: WorkloadCert,
    /// The source workload's address, handed to the [`Dialer`]; part of the pool key because
    /// sockets of different pods live in different network namespaces.
    pub source_ip: Option<IpAddr>,
    /// Where to dial: the destination pod's or waypoint's HBONE port.
    pub destination: SocketAddr,
    /// Identities the server may prove; anything else fails the handshake.
    pub expected: Arc<[SpiffeId]>,
    /// The CONNECT target (`:authority`), the address the server should connect to.
    pub target: SocketAddr,
    /// The original client address (`forwarded: for=`).
    pub forwarded_for: Option<IpAddr>,
    /// Source workload metadata (`baggage`).
    pub baggage: Option<HeaderValue>,
    /// Trace context to propagate (`traceparent`).
    pub traceparent: Option<HeaderValue>,
}

/// Why a tunnel could not be opened. Cheap to clone: a failed handshake is shared by every
/// request that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {dest} failed: {source}; is the HBONE port reachable (NetworkPolicy, firewall)?")]
    Dial { dest: SocketAddr, source: Arc<io::Error> },
    #[error("connect to {dest} timed out after {after:?}; is the HBONE port blocked by a NetworkPolicy or firewall?")]
    DialTimeout { dest: SocketAddr, after: Duration },
    #[error("TLS handshake with {dest} failed: {}", describe_tls(source))]
    Tls { dest: SocketAddr, source: Arc<io::Error> },
    #[error("handshake with {dest} did not complete within {after:?}")]
    HandshakeTimeout { dest: SocketAddr, after: Duration },
    #[error("HTTP/2 with {dest} failed: {}", describe_h2(source))]
    Http2 { dest: SocketAddr, source: Arc<h2::Error> },
    #[error(
        "{dest} refused our certificate (TLS alert {alert:?}); is our root in its trust bundle, and our certificate valid?"
    )]
    CertificateRefused { dest: SocketAddr, alert: rustls::AlertDescription },
    #[error("{dest} denied the tunnel to {target} by policy (HTTP {status})")]
    Denied { dest: SocketAddr, target: SocketAddr, status: u16 },
    #[error("{dest} could not reach {target} (HTTP 503)")]
    Unreachable { dest: SocketAddr, target: SocketAddr },
    #[error("{dest} refused the tunnel to {target} as malformed or not served there (HTTP 400)")]
    BadRequest { dest: SocketAddr, target: SocketAddr },
    #[error("{dest} answered the tunnel to {target} with unexpected HTTP {status}")]
    UnexpectedStatus { dest: SocketAddr, target: SocketAddr, status: u16 },
    #[error("{dest} did not answer the tunnel to {target} within {after:?}")]
    ResponseTimeout { dest: SocketAddr, target: SocketAddr, after: Duration },
}

impl ConnectError {
    /// The server refused the tunnel by policy (HTTP 401/403).
    pub fn is_policy_denied(&self) -> bool {
        matches!(self, ConnectError::Denied { .. })
    }

    /// The target was unreachable from the server (HTTP 503).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ConnectError::Unreachable { .. })
    }

    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ConnectError::DialTimeout { .. }
                | ConnectError::HandshakeTimeout { .. }
                | ConnectError::ResponseTimeout { .. }
        )
    }

    /// Our check of the server's certificate failed, and why.
    pub fn verify_error(&self) -> Option<VerifyError> {
        match self {
            ConnectError::Tls { source, .. } => tls::verify_error(source.as_ref()),
            _ => None,
        }
    }

    /// The server rejected *our* certificate with this TLS alert. In TLS 1.3 the client's
    /// handshake completes before the server has checked the client certificate, so the
    /// alert usually surfaces on the first HTTP/2 exchange.
    pub fn peer_alert(&self) -> Option<rustls::AlertDescription> {
        match self {
            ConnectError::CertificateRefused { alert, .. } => Some(*alert),
            ConnectError::Tls { source, .. } => alert_in(source.as_ref()),
            ConnectError::Http2 { source, .. } => alert_in(source.as_ref()),
            _ => None,
        }
    }
}

fn alert_in(err: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                cur = h2.get_io().map(|i| i as &(dyn std::error::Error + 'static));
                continue;
            }
            if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>() {
                return Some(*alert);
            }
            if let Some(io) = e.downcast_ref::<io::Error>() {
                cur = io.get_ref().map(|i| i as &(dyn std::error::Error + 'static));
                continue;
            }
            cur = e.source();
        }
        None
    }
}

fn describe_tls(e: &io::Error) -> String {
    if let Some(v) = tls::verify_error(e) {
        return v.to_string();
    }
    match alert_in(e) {
        Some(alert) => format!("the server refused our certificate ({alert:?}); {e}"),
        None => e.to_string(),
    }
}

fn describe_h2(e: &h2::Error) -> String {
    match alert_in(e) {
        Some(alert) => format!("the server refused our certificate ({alert:?}): is our root in its trust bundle?"),
        None => e.to_string(),
    }
}

/// Counters about the pool, for metrics and tests.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub connections_opened: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub streams_opened: AtomicU64,
}

/// The HBONE client and its connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    trust: TrustStore,
    dialer: Arc<dyn Dialer>,
    conns: Mutex<HashMap<PoolKey, Vec<Arc<Conn>>>>,
    dials: Mutex<HashMap<PoolKey, Arc<DialState>>>,
    next_id: AtomicU64,
    stats: ClientStats,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    source_ip: Option<IpAddr>,
    dest: SocketAddr,
    expected: Arc<[SpiffeId]>,
}

/// One pooled HTTP/2 connection.
struct Conn {
    id: u64,
    sender: h2::client::SendRequest<Bytes>,
    peer: SpiffeId,
    /// Open streams; changed under the pool lock on checkout, without it on release.
    active: AtomicUsize,
    /// When the last stream ended (for idle eviction).
    idle_since: Mutex<Instant>,
    /// Woken when the last stream ends: the connection task's idle timer starts then.
    went_idle: Arc<tokio::sync::Notify>,
    /// The trust bundle generation this connection was verified against.
    trust_generation: u64,
    closed: AtomicBool,
    /// A TLS alert the server sent us (see [`AlertWatch`]).
    alert: Arc<OnceLock<rustls::AlertDescription>>,
    /// Becomes `true` when the connection task has ended.
    done: tokio::sync::watch::Receiver<bool>,
}

/// Serializes handshakes per key and shares a failure with those who waited on it.
#[derive(Default)]
struct DialState {
    lock: tokio::sync::Mutex<()>,
    last_failure: Mutex<Option<(Instant, ConnectError)>>,
}

/// A reference to a key's dial state. The last one dropped removes the state from the map, so
/// keys of departed peers do not accumulate; waiters keep their own reference and still see a
/// shared failure.
struct DialTicket<'a> {
    pool: &'a Inner,
    key: &'a PoolKey,
    dial: Arc<DialState>,
}

impl Drop for DialTicket<'_> {
    fn drop(&mut self) {
        let mut dials = lock(&self.pool.dials);
        // References: the map's and ours. New tickets are taken under the same lock.
        if Arc::strong_count(&self.dial) <= 2 && dials.get(self.key).is_some_and(|d| Arc::ptr_eq(d, &self.dial)) {
            dials.remove(self.key);
        }
    }
}

/// Whether a checkout may answer "dial another connection" to spread busy streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spread {
    Yes,
    /// Any connection with room will do (the dial to spread failed).
    No,
}

/// A reserved stream on a connection; releasing it is dropping it.
struct Slot {
    conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.conn.idle_since) = Instant::now();
            self.conn.went_idle.notify_one();
        }
    }
}

impl Client {
    pub fn new(config: Config, trust: TrustStore) -> Self {
        Client::with_dialer(config, trust, Arc::new(DirectDialer))
    }

    pub fn with_dialer(config: Config, trust: TrustStore, dialer: Arc<dyn Dialer>) -> Self {
        Client {
            inner: Arc::new(Inner {
                config,
                trust,
                dialer,
                conns: Mutex::new(HashMap::new()),
                dials: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
                stats: ClientStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// Keys with a dial in progress or waiters (for tests: the map must not grow without bound).
    pub fn pending_dials(&self) -> usize {
        lock(&self.inner.dials).len()
    }

    /// Live pooled connections (all keys).
    pub fn connection_count(&self) -> usize {
        lock(&self.inner.conns).values().map(|v| v.iter().filter(|c| !c.closed.load(Ordering::Acquire)).count()).sum()
    }

    /// Opens a tunnel, reusing a pooled connection when one has room.
    pub async fn connect(&self, req: ConnectRequest) -> Result<Tunnel, ConnectError> {
        let key = PoolKey {
            source: req.source.identity().clone(),
            source_ip: req.source_ip,
            dest: req.destination,
            expected: req.expected.clone(),
        };
        // A pooled connection may have gone away between checkout and use (GOAWAY, peer
        // restart). No application byte has been sent yet, so retrying once on a fresh
        // connection is safe even if the server had started dialing.
        let (slot, reused) = self.inner.slot(&key, &req).await?;
        match self.inner.open_stream(slot, &req).await {
            Err(ConnectError::Http2 { source, .. }) if reused => {
                debug!(dest = %req.destination, error = %source, "pooled connection failed, retrying on a new one");
                let slot = self.inner.dial_new(&key, &req).await?;
                self.inner.open_stream(slot, &req).await
            }
            other => other,
        }
    }
}

impl Inner {
    /// A stream slot on a pooled connection, dialing a new connection if none has room.
    /// Returns whether the connection was reused.
    async fn slot(self: &Arc<Self>, key: &PoolKey, req: &ConnectRequest) -> Result<(Slot, bool), ConnectError> {
        if let Some(slot) = self.checkout(key, Spread::Yes) {
            return Ok((slot, true));
        }
        let started = Instant::now();
        let ticket = self.dial_ticket(key);
        let dial = &ticket.dial;
        let _guard = dial.lock.lock().await;
        if let Some(slot) = self.checkout(key, Spread::Yes) {
            return Ok((slot, true));
        }
        let recent_failure = match lock(&dial.last_failure).as_ref() {
            Some((at, err)) if *at >= started => Some(err.clone()),
            _ => None,
        };
        let result = match recent_failure {
            Some(err) => Err(err),
            None => match self.dial(key, req).await {
                Ok(slot) => {
                    *lock(&dial.last_failure) = None;
                    return Ok((slot, false));
                }
                Err(e) => {
                    self.stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    *lock(&dial.last_failure) = Some((Instant::now(), e.clone()));
                    Err(e)
                }
            },
        };
        // A connection dialed only to spread streams failed: share one that works instead.
        match self.checkout(key, Spread::No) {
            Some(slot) => Ok((slot, true)),
            None => result,
        }
    }

    fn dial_ticket<'a>(&'a self, key: &'a PoolKey) -> DialTicket<'a> {
        let dial = lock(&self.dials).entry(key.clone()).or_default().clone();
        DialTicket { pool: self, key, dial }
    }

    async fn dial_new(self: &Arc<Self>, key: &PoolKey, req: &ConnectRequest) -> Result<Slot, ConnectError> {
        let ticket = self.dial_ticket(key);
        let _guard = ticket.dial.lock.lock().await;
        self.dial(key, req).await
    }

    /// Reserves a stream on the live connection of `key` with room that carries the fewest
    /// streams, dropping dead ones. With [`Spread::Yes`], returns `None` instead while that
    /// connection carries a stream and fewer than `spread_connections` are open, so that the
    /// caller dials another.
    fn checkout(&self, key: &PoolKey, spread: Spread) -> Option<Slot> {
        let generation = self.trust.generation();
        let max = self.config.max_streams_per_connection as usize;
        let spread_over = match spread {
            Spread::Yes => self.config.spread_connections as usize,
            Spread::No => 1,
        };
        let mut conns = lock(&self.conns);
        let list = conns.get_mut(key)?;
        list.retain(|c| {
            !c.closed.load(Ordering::Acquire)
                && (c.trust_generation == generation || c.active.load(Ordering::Acquire) > 0)
        });
        let current = list.iter().filter(|c| c.trust_generation == generation);
        let open = current.clone().count();
        let least = current
            .map(|c| (c.active.load(Ordering::Acquire), c))
            .filter(|(active, _)| *active < max)
            .min_by_key(|(active, _)| *active);
        let slot = match least {
            Some((active, _)) if active > 0 && open < spread_over => None,
            Some((active, c)) => {
                // Increments happen only under the pool lock, so `active` cannot pass `max`.
                c.active.store(active + 1, Ordering::Release);
                Some(Slot { conn: c.clone() })
            }
            None => None,
        };
        if list.is_empty() {
            conns.remove(key);
        }
        slot
    }

    /// TCP connect, TLS handshake (verifying the server's identity), HTTP/2 handshake; the new
    /// connection joins the pool with one stream reserved for the caller.
    async fn dial(self: &Arc<Self>, key: &PoolKey, req: &ConnectRequest) -> Result<Slot, ConnectError> {
        let dest = req.destination;
        let timeout = self.config.handshake_timeout;
        let tcp = match tokio::time::timeout(timeout, self.dialer.dial(req.source_ip, dest)).await {
            Err(_) => return Err(ConnectError::DialTimeout { dest, after: timeout }),
            Ok(Err(e)) => return Err(ConnectError::Dial { dest, source: Arc::new(e) }),
            Ok(Ok(tcp)) => tcp,
        };
        socket::tune(&tcp);
        let generation = self.trust.generation();
        let tls_config = tls::client_config(&req.source, &self.trust, req.expected.clone());
        let connector = TlsConnector::from(Arc::new(tls_config));
        let alert = Arc::new(OnceLock::new());
        let handshake = async {
            let mut tls = connector
                .connect(ServerName::IpAddress(dest.ip().into()), tcp)
                .await
                .map_err(|e| ConnectError::Tls { dest, source: Arc::new(e) })?;
            tls.get_mut().1.set_buffer_limit(Some(self.config.tls_send_buffer));
            // The verifier accepted exactly one SPIFFE identity from the expected set.
            let peer = tls::peer_identity(tls.get_ref().1.peer_certificates())
                .map_err(|e| ConnectError::Tls { dest, source: Arc::new(io::Error::other(e)) })?;
            let (sender, connection) = h2::client::Builder::new()
                .initial_window_size(self.config.stream_window)
                .initial_connection_window_size(self.config.connection_window)
                .max_frame_size(self.config.max_frame_size)
                .max_send_buffer_size(self.config.stream_send_buffer)
                .enable_push(false)
                .handshake::<_, Bytes>(AlertWatch { inner: tls, alert: alert.clone() })
                .await
                .map_err(|e| ConnectError::Http2 { dest, source: Arc::new(e) })?;
            Ok::<_, ConnectError>((peer, sender, connection))
        };
        let (peer, sender, connection) = match tokio::time::timeout(timeout, handshake).await {
            Err(_) => return Err(ConnectError::HandshakeTimeout { dest, after: timeout }),
            Ok(r) => r?,
        };
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let went_idle = Arc::new(tokio::sync::Notify::new());
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sender,
            peer,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            went_idle: went_idle.clone(),
            trust_generation: generation,
            closed: AtomicBool::new(false),
            alert,
            done: done_rx,
        });
        self.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        debug!(%dest, peer = %conn.peer, source = %key.source, id = conn.id, "HBONE connection opened");
        lock(&self.conns).entry(key.clone()).or_default().push(conn.clone());
        let idle = IdleWatch { conn: Arc::downgrade(&conn), went_idle, timeout: self.config.pool_idle_timeout };
        tokio::spawn(drive(connection, idle, Arc::downgrade(self), key.clone(), done_tx));
        Ok(Slot { conn })
    }

    /// Sends the CONNECT on a reserved slot and waits for the answer.
    async fn open_stream(&self, slot: Slot, req: &ConnectRequest) -> Result<Tunnel, ConnectError> {
        let dest = req.destination;
        let target = req.target;
        let h2err = |e: h2::Error| ConnectError::Http2 { dest, source: Arc::new(e) };
        let timeout = self.config.connect_timeout;
        let exchange = async {
            let mut sender = slot.conn.sender.clone().ready().await.map_err(h2err)?;
            let (response, send) = sender.send_request(connect_request(req), false).map_err(h2err)?;
            let response = response.await.map_err(h2err)?;
            Ok::<_, ConnectError>((response, send))
        };
        let (response, send) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(ConnectError::ResponseTimeout { dest, target, after: timeout }),
            Ok(Err(e @ ConnectError::Http2 { .. })) => return Err(slot.conn.explain(e).await),
            Ok(r) => r?,
        };
        match response.status() {
            StatusCode::OK => {
                self.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
                let peer = slot.conn.peer.clone();
                Ok(Tunnel::new(send, response.into_body(), peer, Some(Box::new(slot))))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(ConnectError::Denied { dest, target, status: response.status().as_u16() })
            }
            StatusCode::SERVICE_UNAVAILABLE => Err(ConnectError::Unreachable { dest, target }),
            StatusCode::BAD_REQUEST => Err(ConnectError::BadRequest { dest, target }),
            other => Err(ConnectError::UnexpectedStatus { dest, target, status: other.as_u16() }),
        }
    }

    /// Removes a connection from the pool if it has no stream and has been idle long enough.
    fn evict_if_idle(&self, key: &PoolKey, conn: &Conn, idle_timeout: Duration) -> bool {
        let mut conns = lock(&self.conns);
        // Under the pool lock no checkout can race the check below.
        if conn.active.load(Ordering::Acquire) != 0 || lock(&conn.idle_since).elapsed() < idle_timeout {
            return false;
        }
        conn.closed.store(true, Ordering::Release);
        remove_conn(&mut conns, key, conn.id);
        true
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        remove_conn(&mut lock(&self.conns), key, id);
    }
}

/// What the connection task needs to evict its connection once idle. Weak: the task must not
/// keep the connection's `SendRequest` alive.
struct IdleWatch {
    conn: Weak<Conn>,
    went_idle: Arc<tokio::sync::Notify>,
    timeout: Duration,
}

impl IdleWatch {
    /// Returns once the connection has been evicted from the pool for carrying no stream for
    /// `timeout` (or the pool is gone). No timer runs while a stream is open: the timer starts
    /// when the last stream ends (a timer waking among the traffic moves that work between
    /// the runtime's worker threads: ARCHITECTURE §4, "No timer on a quiet node").
    async fn evicted(&self, pool: &Weak<Inner>, key: &PoolKey) {
        loop {
            // A permit from the last stream's end, stored if it came before this wait.
            self.went_idle.notified().await;
            loop {
                let left = {
                    let Some(c) = self.conn.upgrade() else { return };
                    if c.active.load(Ordering::Acquire) != 0 {
                        break; // busy again: wait for its last stream to end
                    }
                    self.timeout.saturating_sub(lock(&c.idle_since).elapsed())
                };
                if left.is_zero() {
                    let (Some(c), Some(p)) = (self.conn.upgrade(), pool.upgrade()) else { return };
                    if p.evict_if_idle(key, &c, self.timeout) {
                        debug!(dest = %key.dest, id = c.id, "HBONE connection idle, closing");
                        return;
                    }
                    continue; // a stream came and went under the check: look again
                }
                tokio::time::sleep(left).await;
            }
        }
    }
}

/// Drives one HTTP/2 connection until it ends, evicting it from the pool when idle. Holds
/// only weak references: once the pool and every tunnel have dropped the connection's
/// `SendRequest`, h2 closes the connection (GOAWAY) and this task ends.
async fn drive(
    mut connection: h2::client::Connection<AlertWatch<tokio_rustls::client::TlsStream<TcpStream>>, Bytes>,
    idle: IdleWatch,
    pool: Weak<Inner>,
    key: PoolKey,
    done: tokio::sync::watch::Sender<bool>,
) {
    let id = idle.conn.upgrade().map(|c| c.id);
    let evicted = idle.evicted(&pool, &key);
    tokio::pin!(evicted);
    let mut is_evicted = false;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result
                    && (!e.is_go_away() || e.reason() != Some(h2::Reason::NO_ERROR))
                {
                    warn!(dest = %key.dest, error = %e, "HBONE connection failed");
                }
                break;
            }
            () = &mut evicted, if !is_evicted => is_evicted = true,
        }
    }
    if let Some(c) = idle.conn.upgrade() {
        c.closed.store(true, Ordering::Release);
    }
    if let (Some(p), Some(id)) = (pool.upgrade(), id) {
        p.remove(&key, id);
    }
    let _ = done.send(true);
}

impl Conn {
    /// Turns an HTTP/2 failure into the TLS refusal behind it, if there was one. In TLS 1.3
    /// our handshake completes before the server has checked our certificate; a refusal
    /// arrives as an alert that the connection task reads, possibly after our request failed
    /// on a closed socket, so wait (briefly) for that task to finish reading.
    async fn explain(&self, err: ConnectError) -> ConnectError {
        let ConnectError::Http2 { dest, .. } = err else { return err };
        if self.alert.get().is_none() {
            let mut done = self.done.clone();
            let _ = tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await;
        }
        match self.alert.get() {
            Some(alert) => ConnectError::CertificateRefused { dest, alert: *alert },
            None => err,
        }
    }
}

/// The TLS stream under HTTP/2, remembering a TLS alert the server sends: h2 reduces I/O
/// errors to their text, and the alert is the only word of why the server refused us.
struct AlertWatch<T> {
    inner: T,
    alert: Arc<OnceLock<rustls::AlertDescription>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for AlertWatch<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let result = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if let Err(e) = &result
            && let Some(alert) = alert_in(e)
        {
            let _ = self.alert.set(alert);
        }
        Poll::Ready(result)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AlertWatch<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn remove_conn(conns: &mut HashMap<PoolKey, Vec<Arc<Conn>>>, key: &PoolKey, id: u64) {
    if let Some(list) = conns.get_mut(key) {
        list.retain(|c| c.id != id);
        if list.is_empty() {
            conns.remove(key);
        }
    }
}

/// The CONNECT request of the wire contract (ARCHITECTURE §5).
fn connect_request(req: &ConnectRequest) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    // A SocketAddr always renders as a valid authority (`ip:port`, IPv6 bracketed).
    *request.uri_mut() =
        http::Uri::builder().authority(req.target.to_string()).build().expect("a socket address is a valid authority");
    let headers = request.headers_mut();
    if let Some(ip) = req.forwarded_for {
        let value = match ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            // RFC 7239 §6: IPv6 is bracketed and quoted.
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        // Digits, dots, colons, brackets and quotes are valid header bytes.
        headers.insert(http::header::FORWARDED, HeaderValue::from_str(&value).expect("valid forwarded header"));
    }
    if let Some(b) = &req.baggage {
        headers.insert("baggage", b.clone());
    }
    if let Some(t) = &req.traceparent {
        headers.insert("traceparent", t.clone());
    }
    request
}

/// Locks a std mutex, ignoring poisoning: every critical section here leaves the data
/// consistent, and none holds the lock across an `.await`.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
