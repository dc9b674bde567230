//! What one hostile client may cost the HBONE server (ARCHITECTURE §5.1), and the state those
//! limits share.
//!
//! ```text
//!  accept ─► pending-handshake slot (per listener, per process) ── none free ─► closed (RST)
//!            └ held through TLS + HTTP/2, and the lingering close of a refused handshake
//!  connection, no stream for `idle_after` ─► idle slot (per listener, per process) ── none ─► GOAWAY
//!            └ held until a stream starts or the connection ends (at most `server_idle_timeout`)
//!  stream admitted ─► dial permit (per connection, then per peer address) ─► dial ─► 200
//!            └ waits, watching for RST_STREAM; a reset stream is never dialed, a reset during
//!              the dial abandons it; no permit before the CONNECT deadline ─► 503
//!  RST_STREAM from the client before our 200, or soon after ─► premature reset; too many in a
//!            window, and more than half the streams of that window ─► GOAWAY(ENHANCE_YOUR_CALM)
//! ```
//!
//! **Peer** means the TCP peer address of the HBONE connection, not the identity it proved.
//! An identity is shared by every replica of a service account, so a budget per identity would
//! let one misbehaving replica starve its siblings; the address is what the network vouches for
//! (ztunnel makes outbound HBONE sockets inside the source pod, so it is one pod), and one
//! address cannot multiply its budget by presenting several certificates.
//!
//! **Process-wide state** lives in a [`Budget`]: every server built from clones of one
//! [`Config`](crate::Config) shares it (ztunnel runs one server per pod, all from one Config),
//! so "per process" means per Budget. It also carries the log-line gates and an optional
//! observer that is told about every [`Refusal`], so a caller's metrics count each one even
//! when its log line is suppressed.
//!
//! **Repeated log lines** go through a [`LogGate`] per kind of line: the first `count` lines
//! of a kind per `per` are written; the rest are counted, and the next line written after them
//! (or [`Budget::flush_logs`], which ztunnel calls one interval after [`lines_suppressed`]
//! returns) is preceded by one summary, "N similar lines suppressed". A client that fails
//! handshakes or is refused in a loop costs a bounded number of lines per second, whatever its
//! rate.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A number of events per interval, written `10/1s` (see [`crate::config::parse_duration`] for
/// the durations). Used for the log-line limit and the reset-flood threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// At least 1.
    pub count: u32,
    /// More than zero.
    pub per: Duration,
}

impl Rate {
    /// `count` events per `per`; both must be more than zero.
    pub fn new(count: u32, per: Duration) -> Result<Rate, String> {
        if count == 0 {
            return Err("the count must be at least 1".into());
        }
        if per.is_zero() {
            return Err("the interval must be longer than zero".into());
        }
        Ok(Rate { count, per })
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        let form = || format!("{s:?} is not a rate: write <count>/<interval>, as 10/1s or 100/10s");
        let (count, per) = s.trim().split_once('/').ok_or_else(form)?;
        let count: u32 = count.trim().parse().map_err(|_| form())?;
        let per = crate::config::parse_duration(per).map_err(|e| format!("{s:?}: {e}"))?;
        Rate::new(count, per).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.per.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{}/{ms}ms", self.count)
        } else if ms.is_multiple_of(60_000) {
            write!(f, "{}/{}m", self.count, ms / 60_000)
        } else {
            write!(f, "{}/{}s", self.count, ms / 1000)
        }
    }
}

/// The server's abuse limits: plain numbers, part of [`Config`](crate::Config). The defaults
/// and their reasons are in `config.rs` and ARCHITECTURE §5.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// TLS + HTTP/2 handshakes in progress on one listener; a connection beyond is closed.
    pub pending_handshakes_per_listener: usize,
    /// The same across every server sharing the [`Budget`].
    pub pending_handshakes: usize,
    /// A connection with no stream for this long counts as idle (checked on this beat).
    pub idle_after: Duration,
    /// Idle connections on one listener; one that becomes idle beyond it gets GOAWAY.
    pub idle_connections_per_listener: usize,
    /// The same across every server sharing the [`Budget`].
    pub idle_connections: usize,
    /// Dials to the target in flight for one HTTP/2 connection; more streams wait.
    pub dials_per_connection: usize,
    /// Dials in flight for one peer address, across its connections; more streams wait.
    pub dials_per_peer: usize,
    /// A client RST_STREAM this soon after the CONNECT arrived (or before our answer) is
    /// premature.
    pub premature_reset: Duration,
    /// Premature resets per interval that close a connection with GOAWAY(ENHANCE_YOUR_CALM),
    /// provided they are also more than half of the streams started in that interval.
    pub reset_flood: Rate,
    /// h2's `max_local_error_reset_streams`: streams we reset because the client broke the
    /// protocol, over a connection's life, before h2 closes it with ENHANCE_YOUR_CALM (set
    /// explicitly, so that a new h2 does not change it unseen).
    pub local_error_resets: usize,
    /// Lines of one kind written per interval; the rest are counted and summarized.
    pub log: Rate,
}

/// Why the server refused a connection or a stream on its own account (not its handler's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// Too many TLS handshakes pending on the listener or in the process: closed before TLS.
    HandshakeLimit,
    /// The TLS or HTTP/2 handshake failed (timeout, no or refused certificate, garbage).
    HandshakeFailed,
    /// The connection became idle while the idle budget was spent: GOAWAY.
    IdleLimit,
    /// No dial permit before the CONNECT deadline: 503 without dialing.
    DialLimit,
    /// The client reset too many streams early: GOAWAY(ENHANCE_YOUR_CALM).
    ResetFlood,
}

/// A refusal, for the [`Budget`]'s observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub cause: Cause,
    /// The listener's address: which server (in ztunnel, which pod).
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Told about every [`Refusal`] (metrics), on the task that refused: keep it quick.
pub type Observer = Arc<dyn Fn(&Refusal) + Send + Sync>;

/// Process-wide state of the limits, shared by clones. `Budget::default()` starts a new one
/// without an observer.
#[derive(Clone, Default)]
pub struct Budget {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    handshakes: AtomicUsize,
    idle: AtomicUsize,
    /// Dials in flight per peer address; an address leaves the map at zero.
    dials: Mutex<HashMap<IpAddr, usize>>,
    /// Woken when a peer's dial ends, for the streams waiting for one.
    dial_ended: Notify,
    logs: [LogGate; ServerLog::COUNT],
    observer: Option<Observer>,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("pending_handshakes", &self.pending_handshakes())
            .field("idle_connections", &self.idle_connections())
            .field("observer", &self.shared.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl Budget {
    /// A new budget whose refusals are also reported to `observer`.
    pub fn with_observer(observer: impl Fn(&Refusal) + Send + Sync + 'static) -> Budget {
        Budget { shared: Arc::new(Shared { observer: Some(Arc::new(observer)), ..Shared::default() }) }
    }

    /// Handshakes in progress (or lingering after a refusal) across the servers sharing this.
    pub fn pending_handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::Relaxed)
    }

    /// Connections counted as idle across the servers sharing this.
    pub fn idle_connections(&self) -> usize {
        self.shared.idle.load(Ordering::Relaxed)
    }

    /// Writes a summary line for each kind of server line suppressed since its last summary.
    pub fn flush_logs(&self) {
        for kind in ServerLog::ALL {
            let suppressed = self.shared.logs[kind as usize].take_suppressed();
            if suppressed > 0 {
                kind.summary(suppressed);
            }
        }
    }

    /// Whether a line of `kind` may be written now (writing the summary of what was suppressed
    /// before it first).
    pub(crate) fn log(&self, kind: ServerLog, rate: Rate) -> bool {
        match self.shared.logs[kind as usize].admit(rate) {
            Admit::Write { suppressed_before } => {
                if suppressed_before > 0 {
                    kind.summary(suppressed_before);
                }
                true
            }
            Admit::Suppress => false,
        }
    }

    pub(crate) fn refused(&self, refusal: Refusal) {
        if let Some(observer) = &self.shared.observer {
            observer(&refusal);
        }
    }

    /// A pending-handshake slot on `listener`, or `None` if it or the process is full.
    pub(crate) fn handshake_slot(&self, listener: &Arc<ListenerCounts>, limits: &Limits) -> Option<Slot> {
        Slot::take(
            &self.shared,
            listener,
            Counter::Handshakes,
            limits.pending_handshakes,
            limits.pending_handshakes_per_listener,
        )
    }

    /// An idle-connection slot on `listener`, or `None` if it or the process is full.
    pub(crate) fn idle_slot(&self, listener: &Arc<ListenerCounts>, limits: &Limits) -> Option<Slot> {
        Slot::take(&self.shared, listener, Counter::Idle, limits.idle_connections, limits.idle_connections_per_listener)
    }

    /// Waits until `peer` has fewer than `max` dials in flight, and takes one.
    pub(crate) async fn peer_dial(&self, peer: IpAddr, max: usize) -> PeerDial {
        loop {
            // Registered before the check, so a dial ending in between is not missed.
            let ended = self.shared.dial_ended.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            {
                let mut dials = self.shared.dials.lock().unwrap_or_else(|p| p.into_inner());
                let n = dials.entry(peer).or_insert(0);
                if *n < max.max(1) {
                    *n += 1;
                    return PeerDial { shared: self.shared.clone(), peer };
                }
            }
            ended.await;
        }
    }

    /// Dials in flight for `peer`.
    pub fn peer_dials(&self, peer: IpAddr) -> usize {
        self.shared.dials.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).copied().unwrap_or(0)
    }
}

/// One listener's share of the counts (pending handshakes, idle connections).
#[derive(Debug, Default)]
pub(crate) struct ListenerCounts {
    handshakes: AtomicUsize,
    idle: AtomicUsize,
}

#[derive(Debug, Clone, Copy)]
enum Counter {
    Handshakes,
    Idle,
}

/// A place in a listener's and the process' count; given back when dropped.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    listener: Arc<ListenerCounts>,
    counter: Counter,
}

impl Slot {
    fn take(
        shared: &Arc<Shared>,
        listener: &Arc<ListenerCounts>,
        counter: Counter,
        process_max: usize,
        listener_max: usize,
    ) -> Option<Slot> {
        let (process, local) = Slot::counters(shared, listener, counter);
        if !try_increment(local, listener_max) {
            return None;
        }
        if !try_increment(process, process_max) {
            local.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot { shared: shared.clone(), listener: listener.clone(), counter })
    }

    fn counters<'a>(
        shared: &'a Shared,
        listener: &'a ListenerCounts,
        counter: Counter,
    ) -> (&'a AtomicUsize, &'a AtomicUsize) {
        match counter {
            Counter::Handshakes => (&shared.handshakes, &listener.handshakes),
            Counter::Idle => (&shared.idle, &listener.idle),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (process, local) = Slot::counters(&self.shared, &self.listener, self.counter);
        process.fetch_sub(1, Ordering::Relaxed);
        local.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Adds one to `counter` unless that would pass `max`.
fn try_increment(counter: &AtomicUsize, max: usize) -> bool {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok()
}

/// A dial in flight for one peer address; ends when dropped.
pub(crate) struct PeerDial {
    shared: Arc<Shared>,
    peer: IpAddr,
}

impl Drop for PeerDial {
    fn drop(&mut self) {
        {
            let mut dials = self.shared.dials.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = dials.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    dials.remove(&self.peer);
                }
            }
        }
        // Only streams waiting for a permit are registered; they check again.
        self.shared.dial_ended.notify_waiters();
    }
}

/// Counts one connection's premature resets in fixed windows of `reset_flood.per`, against the
/// streams started in the same window. IO-free: the caller passes the time.
#[derive(Debug, Default)]
pub(crate) struct ResetWindow {
    started: Option<Instant>,
    streams: u32,
    premature: u32,
    tripped: bool,
}

impl ResetWindow {
    /// A stream started (any stream the server accepted from h2).
    pub(crate) fn stream(&mut self, now: Instant, rate: Rate) {
        self.roll(now, rate);
        self.streams = self.streams.saturating_add(1);
    }

    /// A premature reset; true the first time the connection crosses the threshold.
    pub(crate) fn premature(&mut self, now: Instant, rate: Rate) -> bool {
        self.roll(now, rate);
        self.premature = self.premature.saturating_add(1);
        let flood = self.premature >= rate.count && u64::from(self.premature) * 2 > u64::from(self.streams);
        if flood && !self.tripped {
            self.tripped = true;
            return true;
        }
        false
    }

    fn roll(&mut self, now: Instant, rate: Rate) {
        match self.started {
            Some(started) if now.duration_since(started) < rate.per => {}
            _ => {
                self.started = Some(now);
                self.streams = 0;
                self.premature = 0;
            }
        }
    }
}

/// Told when any [`LogGate`] of the process starts owing a summary.
static SUPPRESSED: Notify = Notify::const_new();

/// Returns once some [`LogGate`] in the process has suppressed a line that no summary has
/// accounted for yet (at once if one has since the last call). A flushing loop waits here
/// rather than on a timer, so a process whose lines all get written never wakes for it.
pub async fn lines_suppressed() {
    SUPPRESSED.notified().await
}

/// Rate-limits one kind of log line: `count` lines per `per` are written, the rest counted.
#[derive(Debug, Default)]
pub struct LogGate {
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    window: Option<Instant>,
    written: u32,
    suppressed: u64,
}

/// What a [`LogGate`] says about one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write it, after a summary of the lines suppressed before it if there were any.
    Write { suppressed_before: u64 },
    /// Count it, do not write it.
    Suppress,
}

impl LogGate {
    pub fn admit(&self, rate: Rate) -> Admit {
        self.admit_at(Instant::now(), rate)
    }

    fn admit_at(&self, now: Instant, rate: Rate) -> Admit {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let suppressed_before = match s.window {
            Some(start) if now.duration_since(start) < rate.per => 0,
            _ => {
                s.window = Some(now);
                s.written = 0;
                std::mem::take(&mut s.suppressed)
            }
        };
        if s.written < rate.count {
            s.written += 1;
            // Lines suppressed in this window before a flush are still owed a summary.
            return Admit::Write { suppressed_before };
        }
        s.suppressed += 1;
        if s.suppressed == 1 {
            // Kept as a permit if the flushing loop is not waiting yet: it cannot miss it.
            SUPPRESSED.notify_one();
        }
        // The first line of a window is always written, so nothing is owed here.
        Admit::Suppress
    }

    /// The lines suppressed since the last summary, now owed one; the window goes on.
    pub fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).suppressed)
    }
}

/// The server's kinds of rate-limited log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerLog {
    HandshakeTimeout,
    NoCertificate,
    CertificateRefused,
    TlsFailed,
    Http2Failed,
    TunnelRefused,
    TargetUnreachable,
    HandshakeLimit,
    IdleLimit,
    DialLimit,
    ResetFlood,
    AcceptFailed,
}

impl ServerLog {
    const COUNT: usize = 12;
    const ALL: [ServerLog; ServerLog::COUNT] = [
        ServerLog::HandshakeTimeout,
        ServerLog::NoCertificate,
        ServerLog::CertificateRefused,
        ServerLog::TlsFailed,
        ServerLog::Http2Failed,
        ServerLog::TunnelRefused,
        ServerLog::TargetUnreachable,
        ServerLog::HandshakeLimit,
        ServerLog::IdleLimit,
        ServerLog::DialLimit,
        ServerLog::ResetFlood,
        ServerLog::AcceptFailed,
    ];

    /// The message of the lines this kind stands for, repeated in its summary.
    fn message(self) -> &'static str {
        match self {
            ServerLog::HandshakeTimeout
            | ServerLog::NoCertificate
            | ServerLog::CertificateRefused
            | ServerLog::TlsFailed
            | ServerLog::Http2Failed => "HBONE connection refused",
            ServerLog::TunnelRefused => "HBONE tunnel refused",
            ServerLog::TargetUnreachable => "HBONE target unreachable",
            ServerLog::HandshakeLimit => "HBONE connection refused: too many TLS handshakes pending",
            ServerLog::IdleLimit => "HBONE connection closed: too many idle connections",
            ServerLog::DialLimit => "HBONE tunnel refused: too many dials in flight for its peer",
            ServerLog::ResetFlood => "HBONE connection closed: the client reset too many streams early",
            ServerLog::AcceptFailed => "HBONE accept failed",
        }
    }

    fn name(self) -> &'static str {
        match self {
            ServerLog::HandshakeTimeout => "handshake_timeout",
            ServerLog::NoCertificate => "no_certificate",
            ServerLog::CertificateRefused => "certificate_refused",
            ServerLog::TlsFailed => "tls_failed",
            ServerLog::Http2Failed => "http2_failed",
            ServerLog::TunnelRefused => "tunnel_refused",
            ServerLog::TargetUnreachable => "target_unreachable",
            ServerLog::HandshakeLimit => "handshake_limit",
            ServerLog::IdleLimit => "idle_limit",
            ServerLog::DialLimit => "dial_limit",
            ServerLog::ResetFlood => "reset_flood",
            ServerLog::AcceptFailed => "accept_failed",
        }
    }

    /// Whether the lines are warnings (else information).
    fn is_warning(self) -> bool {
        !matches!(self, ServerLog::TunnelRefused | ServerLog::TargetUnreachable)
    }

    /// The summary of `suppressed` lines of this kind, at the lines' level.
    fn summary(self, suppressed: u64) {
        let (kind, lines) = (self.name(), self.message());
        if self.is_warning() {
            tracing::warn!(kind, lines, suppressed, "log lines suppressed by the rate limit");
        } else {
            tracing::info!(kind, lines, suppressed, "log lines suppressed by the rate limit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn rates_read_and_print() {
        assert_eq!(rate("10/1s"), Rate { count: 10, per: Duration::from_secs(1) });
        assert_eq!(rate(" 100 / 10s "), Rate { count: 100, per: Duration::from_secs(10) });
        assert_eq!(rate("5/500ms").to_string(), "5/500ms");
        assert_eq!(rate("10/1s").to_string(), "10/1s");
        assert_eq!(rate("3/120s").to_string(), "3/2m");
        for bad in ["10", "0/1s", "10/0s", "x/1s", "10/1", "-1/1s", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?} accepted");
        }
        assert!("10/1".parse::<Rate>().unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn a_gate_writes_count_lines_per_window_then_owes_a_summary() {
        let gate = LogGate::default();
        let r = rate("3/1s");
        let t0 = Instant::now();
        let verdicts: Vec<Admit> = (0..10).map(|i| gate.admit_at(t0 + Duration::from_millis(i), r)).collect();
        assert_eq!(verdicts.iter().filter(|v| matches!(v, Admit::Write { .. })).count(), 3);
        assert_eq!(verdicts[3..], [Admit::Suppress; 7]);
        // The next window's first line carries the summary of the seven.
        assert_eq!(gate.admit_at(t0 + Duration::from_secs(1), r), Admit::Write { suppressed_before: 7 });
        // A flush takes what is owed without opening a new window.
        for i in 0..5 {
            gate.admit_at(t0 + Duration::from_millis(1001 + i), r);
        }
        assert_eq!(gate.take_suppressed(), 3);
        assert_eq!(gate.take_suppressed(), 0);
        assert_eq!(gate.admit_at(t0 + Duration::from_millis(1500), r), Admit::Suppress);
        assert_eq!(gate.admit_at(t0 + Duration::from_secs(3), r), Admit::Write { suppressed_before: 1 });
    }

    #[test]
    fn a_reset_flood_needs_the_count_and_a_majority_of_the_window() {
        let r = rate("4/10s");
        let t0 = Instant::now();
        let mut w = ResetWindow::default();
        for _ in 0..3 {
            w.stream(t0, r);
            assert!(!w.premature(t0, r));
        }
        w.stream(t0, r);
        assert!(w.premature(t0, r), "the fourth premature reset of four streams trips it");
        w.stream(t0, r);
        assert!(!w.premature(t0, r), "it trips once");

        // A busy connection whose resets are a minority is left alone.
        let mut busy = ResetWindow::default();
        for _ in 0..100 {
            busy.stream(t0, r);
        }
        for _ in 0..40 {
            assert!(!busy.premature(t0, r));
        }
        // Windows do not add up.
        let mut slow = ResetWindow::default();
        for i in 0..20 {
            let t = t0 + Duration::from_secs(10 * i);
            slow.stream(t, r);
            assert!(!slow.premature(t, r));
        }
    }

    #[test]
    fn slots_count_per_listener_and_per_process() {
        let budget = Budget::default();
        let limits =
            Limits { pending_handshakes: 3, pending_handshakes_per_listener: 2, ..crate::Config::default().limits };
        let (a, b) = (Arc::new(ListenerCounts::default()), Arc::new(ListenerCounts::default()));
        let a1 = budget.handshake_slot(&a, &limits).expect("first on a");
        let a2 = budget.handshake_slot(&a, &limits).expect("second on a");
        assert!(budget.handshake_slot(&a, &limits).is_none(), "a is full");
        let b1 = budget.handshake_slot(&b, &limits).expect("first on b");
        assert!(budget.handshake_slot(&b, &limits).is_none(), "the process is full");
        assert_eq!(b.handshakes.load(Ordering::Relaxed), 1, "a refused slot is given back");
        assert_eq!(budget.pending_handshakes(), 3);
        drop((a1, b1));
        assert_eq!(budget.pending_handshakes(), 1);
        assert!(budget.handshake_slot(&b, &limits).is_some());
        drop(a2);
        assert_eq!(budget.idle_connections(), 0, "idle slots are counted apart");
    }

    #[tokio::test(start_paused = true)]
    async fn peer_dials_wait_for_a_free_permit() {
        let budget = Budget::default();
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let first = budget.peer_dial(peer, 2).await;
        let _second = budget.peer_dial(peer, 2).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.peer_dial(peer, 2).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiting.is_finished(), "a third dial waits");
        let _elsewhere = budget.peer_dial(other, 2).await;
        assert_eq!(budget.peer_dials(peer), 2);
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(1), waiting).await.expect("woken").unwrap();
        assert_eq!(budget.peer_dials(peer), 2);
        drop(third);
        drop(_second);
        assert_eq!(budget.peer_dials(peer), 0);
        assert!(budget.shared.dials.lock().unwrap().get(&peer).is_none(), "an idle peer leaves the map");
    }
}
