//! Options every HBONE socket gets, in one place.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Idle time before the first keepalive probe: 60 s. An HBONE connection can sit idle for
/// long stretches (a pooled connection, a quiet tunnel); keepalive finds peers that vanished
/// without a FIN (node power loss, a NAT that forgot us) so their tunnels and pool entries
/// are released.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// Between probes: 10 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel declares the peer dead: 6, so a dead peer is noticed
/// about two minutes after its last sign of life.
pub const KEEPALIVE_RETRIES: u32 = 6;

/// Disables Nagle (tunnels carry interactive traffic; HTTP/2 already batches bulk writes) and
/// enables keepalive. Failures are ignored: they only cost latency or dead-peer detection.
pub fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive =
        TcpKeepalive::new().with_time(KEEPALIVE_TIME).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_RETRIES);
    let _ = SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}
