//! Tunables shared by the HBONE client and server, with defaults chosen for throughput on
//! data-center links and bounded memory. Every default says why it is what it is; the
//! reasoning is repeated in `docs/ARCHITECTURE.md`.

use std::time::Duration;

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

/// Largest HTTP/2 DATA frame we accept: 1 MiB, so that peers which send large frames are not
/// cut down. Our own copy loop sends frames of at most 64 KiB (four TLS records), which
/// measured cheaper per byte than larger ones (see `copy`).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1024 * 1024;

/// Concurrent streams per HTTP/2 connection: 100, as in Istio's ztunnel. The server
/// advertises it (SETTINGS_MAX_CONCURRENT_STREAMS) and the client pool opens another
/// connection once a connection carries this many, which also spreads load over more than
/// one TLS session (one core each) when many streams are busy.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 100;

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
/// transfers; each read is sent as DATA frames of at most 64 KiB that share its allocation
/// (see `copy`), and the buffer is released whenever the socket has nothing to read, so an
/// idle tunnel holds no buffer at all. The HTTP/2 send buffer of a stream is twice this.
/// Measured on loopback, 64 KiB to 256 KiB reads cost the same CPU per byte, 1 MiB slightly
/// more (docs/BENCHMARKS.md).
pub const DEFAULT_COPY_BUFFER: usize = 256 * 1024;

/// HBONE tunables. `Config::default()` is what production uses.
#[derive(Debug, Clone)]
pub struct Config {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_streams_per_connection: u32,
    pub max_header_list_size: u32,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub server_idle_timeout: Duration,
    pub copy_buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            server_idle_timeout: DEFAULT_SERVER_IDLE_TIMEOUT,
            copy_buffer: DEFAULT_COPY_BUFFER,
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
