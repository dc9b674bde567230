//! Requests to endpoints: HTTP connections over HBONE tunnels opened with the waypoint's own
//! identity, pooled per endpoint, and the choice of endpoint for each request.
//!
//! ```text
//!  request ─► Balancer::pick (power of two choices over least outstanding requests,
//!             ejected endpoints skipped) ─► Upstreams::send ─► pool (endpoint, protocol):
//!                 HTTP/2: one connection, multiplexed      HTTP/1.1: an idle ready one, or a new one
//!             └── each connection is one HBONE stream to <endpoint>:15008, CONNECT <endpoint>:<targetPort>
//! ```
//!
//! Why not hyper-util's pooled client: it keys its pool by the request's authority, and the
//! authority must stay the one the client sent while the endpoint is chosen per request.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hbone::{ConnectError, ConnectRequest, SpiffeId, Tunnel, WorkloadCert};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

/// The body every request is sent with: the client's, streamed, or a buffered copy for retries.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 64;
/// An idle HTTP/1.1 connection unused this long is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a request reaches one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `<ip>:15008`.
    pub hbone: SocketAddr,
    /// `<ip>:<targetPort>`: the CONNECT target.
    pub target: SocketAddr,
    /// The identity the endpoint must prove.
    pub identity: SpiffeId,
}

/// The protocol spoken to the endpoint: the client's (an HTTP/2 client's requests go out on
/// HTTP/2, so gRPC and its trailers work end to end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Why a request got no response from the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The tunnel or the HTTP connection could not be opened: nothing was sent.
    #[error("cannot connect to {target}: {error}")]
    Connect { target: SocketAddr, error: String },
    /// The request was (perhaps) sent and the connection failed before a response.
    #[error("{target} failed before responding: {error}")]
    Reset { target: SocketAddr, error: hyper::Error },
}

impl UpstreamError {
    /// Whether the request surely never reached the application.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }
}

#[derive(Default)]
struct Pool {
    h2: Option<http2::SendRequest<Body>>,
    idle_h1: Vec<(http1::SendRequest<Body>, Instant)>,
}

/// HTTP connections to endpoints, over HBONE.
pub struct Upstreams {
    hbone: hbone::Client,
    /// The waypoint's identity, presented to every endpoint.
    identity: WorkloadCert,
    pools: Mutex<HashMap<(SocketAddr, Protocol), Pool>>,
}

impl Upstreams {
    pub fn new(hbone: hbone::Client, identity: WorkloadCert) -> Upstreams {
        Upstreams { hbone, identity, pools: Mutex::new(HashMap::new()) }
    }

    /// Sends `req` to `endpoint` on a pooled connection (or a new one).
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        protocol: Protocol,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let target = endpoint.target;
        match protocol {
            Protocol::Http2 => {
                let mut sender = match self.h2_sender(endpoint).await {
                    Ok(s) => s,
                    Err(e) => return Err(e),
                };
                if sender.ready().await.is_err() {
                    // Closed between checkout and use: one new connection.
                    self.forget_h2(target);
                    sender = self.h2_sender(endpoint).await?;
                }
                sender.send_request(req).await.map_err(|error| classify(target, error))
            }
            Protocol::Http1 => {
                let mut sender = match self.idle_h1(target) {
                    Some(s) => s,
                    None => self.connect_h1(endpoint).await?,
                };
                if sender.ready().await.is_err() {
                    sender = self.connect_h1(endpoint).await?;
                }
                let response = sender.send_request(req).await.map_err(|error| classify(target, error));
                // Ready again once this response's body has been read; until then a checkout
                // skips it (`is_ready`).
                if response.is_ok() && !sender.is_closed() {
                    self.return_h1(target, sender);
                }
                response
            }
        }
    }

    /// A new HBONE tunnel to `endpoint` with the waypoint's identity.
    pub async fn tunnel_to(&self, endpoint: &Endpoint) -> Result<HboneIo, UpstreamError> {
        let request = ConnectRequest {
            source: self.identity.clone(),
            source_ip: None,
            destination: endpoint.hbone,
            expected: Arc::from([endpoint.identity.clone()]),
            target: endpoint.target,
            forwarded_for: None,
            baggage: None,
            traceparent: None,
        };
        let tunnel = self
            .hbone
            .connect(request)
            .await
            .map_err(|e: ConnectError| UpstreamError::Connect { target: endpoint.target, error: e.to_string() })?;
        Ok(HboneIo(tunnel))
    }

    async fn h2_sender(&self, endpoint: &Endpoint) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let key = (endpoint.target, Protocol::Http2);
        if let Some(s) = self.lock().get(&key).and_then(|p| p.h2.clone()).filter(|s| !s.is_closed()) {
            return Ok(s);
        }
        let io = TokioIo::new(self.tunnel_to(endpoint).await?);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect { target: endpoint.target, error: e.to_string() })?;
        let target = endpoint.target;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%target, error = %e, "HTTP/2 connection to endpoint ended");
            }
        });
        self.lock().entry(key).or_default().h2 = Some(sender.clone());
        Ok(sender)
    }

    fn forget_h2(&self, target: SocketAddr) {
        if let Some(p) = self.lock().get_mut(&(target, Protocol::Http2)) {
            p.h2 = None;
        }
    }

    async fn connect_h1(&self, endpoint: &Endpoint) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let io = TokioIo::new(self.tunnel_to(endpoint).await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect { target: endpoint.target, error: e.to_string() })?;
        let target = endpoint.target;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(%target, error = %e, "HTTP/1.1 connection to endpoint ended");
            }
        });
        Ok(sender)
    }

    /// An idle connection ready for a request; closed and expired ones are dropped on the way.
    fn idle_h1(&self, target: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut pools = self.lock();
        let pool = pools.get_mut(&(target, Protocol::Http1))?;
        let now = Instant::now();
        pool.idle_h1.retain(|(s, since)| !s.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT);
        let ready = pool.idle_h1.iter().rposition(|(s, _)| s.is_ready())?;
        Some(pool.idle_h1.swap_remove(ready).0)
    }

    fn return_h1(&self, target: SocketAddr, sender: http1::SendRequest<Body>) {
        let mut pools = self.lock();
        let pool = pools.entry((target, Protocol::Http1)).or_default();
        if pool.idle_h1.len() < MAX_IDLE_H1 {
            pool.idle_h1.push((sender, Instant::now()));
        }
    }

    /// Drops the pools of endpoints no longer in `live`.
    pub fn retain(&self, live: impl Fn(SocketAddr) -> bool) {
        self.lock().retain(|(target, _), _| live(*target));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, Protocol), Pool>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A failure before the response: a connection that closed before the request was written
/// is as good as a connect failure (nothing reached the application).
fn classify(target: SocketAddr, error: hyper::Error) -> UpstreamError {
    if error.is_canceled() {
        UpstreamError::Connect { target, error: error.to_string() }
    } else {
        UpstreamError::Reset { target, error }
    }
}

/// An HBONE tunnel as an I/O object for hyper.
pub struct HboneIo(pub Tunnel);

impl AsyncRead for HboneIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// What the balancer knows of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests sent and not yet answered.
    pub outstanding: AtomicU32,
    /// 5xx answers and connect failures in a row.
    consecutive_failures: AtomicU32,
    /// Until when (milliseconds since the balancer's start) the endpoint gets no requests.
    ejected_until: AtomicU64,
}

/// Passive outlier detection: this many failures in a row eject an endpoint...
const EJECT_AFTER: u32 = 5;
/// ...for this long (unless every endpoint is ejected).
const EJECT_FOR: Duration = Duration::from_secs(10);

/// Per-request endpoint choice: power of two choices over least outstanding requests, so an
/// HTTP/2 client's requests spread over every endpoint and a slow one gets fewer.
pub struct Balancer {
    start: Instant,
    stats: Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer { start: Instant::now(), stats: Mutex::new(HashMap::new()) }
    }
}

/// Held while a request is outstanding on an endpoint.
pub struct Outstanding(Arc<EndpointStats>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    fn stats(&self, target: SocketAddr) -> Arc<EndpointStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).entry(target).or_default().clone()
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Picks one of `candidates` (their CONNECT targets), avoiding `tried` when it can.
    /// `random` supplies two independent random numbers.
    pub fn pick(&self, candidates: &[SocketAddr], tried: &[SocketAddr], random: (u32, u32)) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let now = self.now_ms();
        let stats: Vec<Arc<EndpointStats>> = candidates.iter().map(|t| self.stats(*t)).collect();
        let usable = |i: &usize| stats[*i].ejected_until.load(Ordering::Relaxed) <= now;
        let fresh = |i: &usize| !tried.contains(&candidates[*i]);
        let mut pool: Vec<usize> = (0..candidates.len()).filter(|i| usable(i) && fresh(i)).collect();
        if pool.is_empty() {
            pool = (0..candidates.len()).filter(fresh).collect();
        }
        if pool.is_empty() {
            pool = (0..candidates.len()).collect();
        }
        let a = pool[random.0 as usize % pool.len()];
        if pool.len() == 1 {
            return Some(a);
        }
        let mut b = pool[random.1 as usize % (pool.len() - 1)];
        if b == a {
            b = pool[pool.len() - 1];
        }
        let load = |i: usize| stats[i].outstanding.load(Ordering::Relaxed);
        Some(if load(b) < load(a) { b } else { a })
    }

    /// Counts a request as outstanding on `target` until the guard is dropped.
    pub fn start(&self, target: SocketAddr) -> Outstanding {
        let stats = self.stats(target);
        stats.outstanding.fetch_add(1, Ordering::Relaxed);
        Outstanding(stats)
    }

    /// Records how a request to `target` ended: `failed` for a 5xx or a connect failure.
    /// Returns whether this ejected the endpoint.
    pub fn record(&self, target: SocketAddr, failed: bool) -> bool {
        let stats = self.stats(target);
        if !failed {
            stats.consecutive_failures.store(0, Ordering::Relaxed);
            return false;
        }
        let n = stats.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= EJECT_AFTER {
            stats.consecutive_failures.store(0, Ordering::Relaxed);
            stats.ejected_until.store(self.now_ms() + EJECT_FOR.as_millis() as u64, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Forgets endpoints no longer in `live`.
    pub fn retain(&self, live: impl Fn(SocketAddr) -> bool) {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).retain(|t, _| live(*t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n).map(|i| SocketAddr::from(([10, 0, 0, i], 80))).collect()
    }

    #[test]
    fn least_outstanding_of_two_wins() {
        let b = Balancer::default();
        let c = addrs(2);
        let _busy = b.start(c[0]);
        for r in 0..20 {
            assert_eq!(b.pick(&c, &[], (r, r + 1)), Some(1));
        }
    }

    #[test]
    fn every_endpoint_gets_requests() {
        let b = Balancer::default();
        let c = addrs(4);
        let mut seen = [0u32; 4];
        let mut x = 12345u32;
        for _ in 0..400 {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            let y = x.rotate_left(13);
            seen[b.pick(&c, &[], (x >> 8, y >> 8)).unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn a_retry_avoids_the_endpoint_tried() {
        let b = Balancer::default();
        let c = addrs(2);
        for r in 0..10 {
            assert_eq!(b.pick(&c, &[c[0]], (r, r)), Some(1));
        }
        // With every endpoint tried, one is still chosen.
        assert!(b.pick(&c, &c, (0, 1)).is_some());
    }

    #[test]
    fn consecutive_failures_eject_until_all_are_ejected() {
        let b = Balancer::default();
        let c = addrs(2);
        for i in 0..EJECT_AFTER {
            assert_eq!(b.record(c[0], true), i + 1 == EJECT_AFTER);
        }
        for r in 0..10 {
            assert_eq!(b.pick(&c, &[], (r, r + 1)), Some(1));
        }
        // A success in between resets the count.
        for _ in 0..EJECT_AFTER - 1 {
            b.record(c[1], true);
        }
        b.record(c[1], false);
        assert!(!b.record(c[1], true));
        for _ in 0..EJECT_AFTER {
            b.record(c[1], true);
        }
        // Both ejected: requests still go somewhere.
        assert!(b.pick(&c, &[], (0, 1)).is_some());
    }
}
