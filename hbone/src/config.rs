//! Tunables shared by the HBONE client and server, with defaults chosen for throughput on
//! data-center links and bounded memory. Every default says why it is what it is; the
//! reasoning is repeated in `docs/ARCHITECTURE.md`.

use std::time::Duration;

use crate::limits::{Budget, Limits};

/// HTTP/2 per-stream receive window: 4 MiB.
///
/// One tunnel's throughput is capped at window / RTT. 4 MiB sustains ~32 Gbit/s at 1 ms RTT,
/// above what one TLS stream can encrypt on one core, so the window is never the bottleneck.
/// It is also the most one stalled reader can hold buffered on the receiving side.
pub const DEFAULT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// HTTP/2 per-connection receive window: 16 MiB, four stream windows.
///
/// A reader that stops reading holds at most one stream window of the connection window, so
/// up to three stalled streams cannot stop the others (no head-of-line blocking), while a
/// connection's worst-case buffered data stays bounded.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Largest HTTP/2 DATA frame we accept: 1 MiB, as Istio's ztunnel. HTTP/2 cuts what a stream
/// sends into frames no larger than the peer accepts, so between Weft proxies each socket read
/// (at most [`DEFAULT_COPY_BUFFER`]) travels as one frame: one frame to queue, write and wake
/// the reader for, where 64 KiB frames made four (see `copy`).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1024 * 1024;

/// Plaintext one stream may queue in HTTP/2 before its copy loop waits for room: 4 MiB, one
/// stream window, as Istio's ztunnel.
///
/// HTTP/2 wakes a stream waiting for room each time it writes one of its frames out, so a
/// small queue makes the copy loop and the connection task hand every frame to each other
/// across threads. With 512 KiB (two reads), one busy stream cost 31,000 context switches per
/// GB in the lab; with 4 MiB, 4,000, and 20% less CPU per GB (docs/BENCHMARKS.md). What a
/// connection's streams have queued and in flight together is bounded by the peer's
/// connection window (16 MiB): HTTP/2 grants a stream room only out of that window. An idle
/// stream queues nothing.
pub const DEFAULT_STREAM_SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Encrypted TLS records one connection may hold that the socket has not taken yet: 256 KiB
/// (rustls' default is 64 KiB).
///
/// HTTP/2 hands TLS a whole frame (up to a 256 KiB read) at once; rustls encrypts what fits
/// under this limit and TLS writes it with one `writev`. At 64 KiB, a 256 KiB frame took four
/// writes; at 256 KiB, one. Held only while the socket is full.
pub const DEFAULT_TLS_SEND_BUFFER: usize = 256 * 1024;

/// Concurrent streams per HTTP/2 connection: 100, as in Istio's ztunnel. The server
/// advertises it (SETTINGS_MAX_CONCURRENT_STREAMS) and the client pool opens another
/// connection once a connection carries this many, which also spreads load over more than
/// one TLS session (one core each) when many streams are busy.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// Connections to one destination that concurrent streams are spread over before any two
/// share one: 2. A new stream goes to the pooled connection carrying the fewest streams; while
/// every connection already carries one and fewer than this many are open, another is dialed.
///
/// One HBONE connection is one TLS session and one HTTP/2 connection task: its encryption and
/// framing run on one core at a time, and its task and its streams' copy tasks wake each other
/// for every burst. Two busy streams on two connections run on two cores with fewer hand-offs:
/// in the lab (docs/BENCHMARKS.md), eight streams moved 1.4 times the bytes of eight on one
/// connection, at a quarter of the context switches per GB and no more CPU per GB. Two matches
/// ztunnel's two worker threads; more did not help there. The cost is one more handshake and
/// about 40 KiB per destination that has two streams open at once; idle streams change
/// nothing (a thousand idle tunnels still ride ten connections of 100 streams). `1` puts every
/// stream on one connection until it is full.
pub const DEFAULT_SPREAD_CONNECTIONS: u32 = 2;

/// Largest request header block the server accepts: 16 KiB. HBONE requests carry a handful
/// of short headers (authority, forwarded, baggage, traceparent); anything near this size is
/// abuse.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Time a new connection has to finish the TCP connect (client) or the TLS + HTTP/2
/// handshake (both sides): 5 s. A healthy peer needs milliseconds; a silent peer must not
/// hold a socket and a task for longer.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the client waits for the server's answer to a CONNECT (the server dials the
/// target before answering): 10 s, a little above a typical SYN retry series.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled client connection with no streams is closed after this long: 60 s, long enough
/// to absorb bursty request patterns without a new handshake, short enough not to keep
/// sockets to scaled-down peers.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The server closes (GOAWAY) a connection that has carried no stream for this long: 5 min,
/// well above the client's pool idle timeout so the client normally closes first.
pub const DEFAULT_SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Most bytes read from a plain socket at once: 256 KiB. Large reads cut syscalls on bulk
/// transfers; each read is sent as one DATA frame (between Weft proxies) that keeps its
/// allocation (see `copy`), and the buffer goes back to a small pool shared by every tunnel
/// after each read, so an idle tunnel holds no buffer at all.
/// Measured on loopback, 64 KiB to 256 KiB reads cost the same CPU per byte, 1 MiB slightly
/// more (docs/BENCHMARKS.md).
pub const DEFAULT_COPY_BUFFER: usize = 256 * 1024;

/// TLS + HTTP/2 handshakes in progress on one listener (in ztunnel: one pod's port 15008)
/// before new connections are closed unread: 128.
///
/// A handshake takes a millisecond or two of CPU and holds a socket, a task and rustls' buffers
/// (tens of KiB) for at most the handshake timeout (5 s), plus the 2 s lingering close of a
/// refused one. Clients handshake once per pooled connection (one per source and destination
/// pod), so even a pod that a thousand clients connect to at once sees a few pending at any
/// instant; 128 bounds a slow-handshake flood against one pod to 128 sockets, and leaves the
/// rest of the process budget to the other pods. Istio's ztunnel and Envoy set no such cap
/// (Envoy leaves it to its overload manager's downstream-connection limit, unset by default).
pub const DEFAULT_MAX_PENDING_HANDSHAKES_PER_LISTENER: usize = 128;

/// Handshakes in progress across every listener of the process: 512, about 15 MiB of
/// handshake state at most, whatever number of pods are targeted.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 512;

/// A connection with no stream for this long counts as idle: 10 s. A client sends its first
/// CONNECT right after the handshake and the pool (60 s idle timeout) keeps connections for
/// reuse, so a connection only counts once it has been unused for a while; checked on this beat.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(10);

/// Idle connections kept on one listener: 256. A connection that becomes idle beyond it is
/// closed at once (GOAWAY) instead of after the server idle timeout; a legitimate client then
/// pays one handshake when it needs the connection again, nothing fails. 256 is one connection
/// each from 256 client pods that talked to this pod in the last minute.
pub const DEFAULT_MAX_IDLE_CONNECTIONS_PER_LISTENER: usize = 256;

/// Idle connections kept across the process: 1024. Each holds about 40 KiB (HTTP/2 write and
/// read buffers, HPACK and TLS state, docs/BENCHMARKS.md), so idle clients hold 40 MiB at
/// most. This is Envoy's overload action `reduce_timeouts` made simple: past the budget, idle
/// connections live `idle_after` instead of `server_idle_timeout`. Istio's ztunnel caps
/// neither; its clients release an unused pooled connection after 5 minutes.
pub const DEFAULT_MAX_IDLE_CONNECTIONS: usize = 1024;

/// Dials to the target in flight for one HTTP/2 connection: 32. A dial to a local app takes
/// well under a millisecond, so a burst of 100 new streams waits microseconds for a permit; a
/// client that opens streams and resets them cannot make the server connect to the app more
/// than this many times at once, nor can a stuck app take every stream's task.
pub const DEFAULT_MAX_DIALS_PER_CONNECTION: usize = 32;

/// Dials in flight for one peer address, across its connections: 128, four connections' worth,
/// so a client cannot multiply the per-connection bound by opening connections.
pub const DEFAULT_MAX_DIALS_PER_PEER: usize = 128;

/// A client reset of a stream within 1 s of its CONNECT (or before our answer) is premature, as
/// in Envoy's `overload.premature_reset_min_stream_lifetime_seconds`.
pub const DEFAULT_PREMATURE_RESET: Duration = Duration::from_secs(1);

/// 100 premature resets within 10 s, if they are also more than half the streams of those 10 s,
/// close the connection with GOAWAY(ENHANCE_YOUR_CALM). Envoy closes a connection once more
/// than half of its streams (checked from 500 on) were reset prematurely; a window instead of
/// the connection's whole life catches a long-lived pooled connection that turns bad, and the
/// majority rule spares a busy connection whose apps sometimes give up. Each premature reset
/// may have cost a dial and an access line: this caps it at 100 per connection per 10 s.
pub const DEFAULT_RESET_FLOOD: crate::limits::Rate = crate::limits::Rate { count: 100, per: Duration::from_secs(10) };

/// Streams the server resets because the client broke HTTP/2, over a connection's life, before
/// h2 closes it with ENHANCE_YOUR_CALM: 1024, h2's own default, set here so that it is ours.
/// Considered lower and kept: the count never decreases, and a long-lived pooled connection
/// carrying legitimate traffic earns some (DATA still in flight for a stream the server reset
/// and has forgotten is reset again, STREAM_CLOSED); such a reset costs the server one frame,
/// no dial and no log line, while the resets that cost a dial are the premature-reset window's.
pub const DEFAULT_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Log lines of one kind (a failed handshake, a refused tunnel, ...) per second: 10; the rest
/// are counted and summarized ("N similar lines suppressed") one interval later. Metrics count
/// every event; the log shows what kind of thing happens and to whom, and 10 lines a second of
/// each kind (a few KB/s) is enough for that, where a refusal loop could write megabytes.
pub const DEFAULT_LOG_LIMIT: crate::limits::Rate = crate::limits::Rate { count: 10, per: Duration::from_secs(1) };

/// The abuse limits with their defaults.
pub const DEFAULT_LIMITS: Limits = Limits {
    pending_handshakes_per_listener: DEFAULT_MAX_PENDING_HANDSHAKES_PER_LISTENER,
    pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
    idle_after: DEFAULT_IDLE_AFTER,
    idle_connections_per_listener: DEFAULT_MAX_IDLE_CONNECTIONS_PER_LISTENER,
    idle_connections: DEFAULT_MAX_IDLE_CONNECTIONS,
    dials_per_connection: DEFAULT_MAX_DIALS_PER_CONNECTION,
    dials_per_peer: DEFAULT_MAX_DIALS_PER_PEER,
    premature_reset: DEFAULT_PREMATURE_RESET,
    reset_flood: DEFAULT_RESET_FLOOD,
    local_error_resets: DEFAULT_MAX_LOCAL_ERROR_RESETS,
    log: DEFAULT_LOG_LIMIT,
};

/// HBONE tunables. `Config::default()` is what production uses.
///
/// Servers built from clones of one `Config` share its [`Budget`]: the process-wide counts of
/// the limits and the log gates. A `Config::default()` starts a new budget.
#[derive(Debug, Clone)]
pub struct Config {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Plaintext a stream may queue in HTTP/2 ([`DEFAULT_STREAM_SEND_BUFFER`]).
    pub stream_send_buffer: usize,
    /// Encrypted bytes a connection may hold unsent ([`DEFAULT_TLS_SEND_BUFFER`]).
    pub tls_send_buffer: usize,
    pub max_streams_per_connection: u32,
    /// Connections concurrent streams are spread over ([`DEFAULT_SPREAD_CONNECTIONS`]).
    pub spread_connections: u32,
    pub max_header_list_size: u32,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub copy_buffer: usize,
    /// What one client may cost the server ([`crate::limits`]).
    pub limits: Limits,
    /// The state those limits share across servers, and who is told about refusals.
    pub budget: Budget,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            stream_send_buffer: DEFAULT_STREAM_SEND_BUFFER,
            tls_send_buffer: DEFAULT_TLS_SEND_BUFFER,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            spread_connections: DEFAULT_SPREAD_CONNECTIONS,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            server_idle_timeout: DEFAULT_SERVER_IDLE_TIMEOUT,
            copy_buffer: DEFAULT_COPY_BUFFER,
            limits: DEFAULT_LIMITS,
            budget: Budget::default(),
        }
    }
}

/// Parses a duration setting: `500ms`, `10s`, `5m`, `24h`, `7d`. Shared by the command lines of
/// every Weft program, so one spelling works everywhere.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 10s, 5m, 24h)"))?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    }
}

#[cfg(test)]
mod duration_tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("10").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("ten s").unwrap_err().contains("not a duration"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(parse_duration("9999999999999999999d").unwrap_err().contains("too long"));
    }
}
