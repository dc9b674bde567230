//! The HBONE server as a client sees it once TLS is done: the input is everything the client
//! sends after the HTTP/2 preface (frames, HPACK header blocks, CONNECT requests with their
//! `:authority`, `forwarded`, `baggage` and `traceparent` headers, DATA, resets, GOAWAY).
//!
//! It runs through the server's own code (`Server::serve_established`, the path `serve` takes
//! after the TLS handshake) over an in-memory duplex, with a handler that authorizes by the
//! target's port and "dials" an in-memory echo. One current-thread runtime per input, with
//! time paused: a timer fires only once every task waits, so no input waits on a real clock,
//! and the runtime is dropped after each input with whatever it still holds.
//!
//! Besides panics, it fails if the server still holds the connection long after the client
//! closed its side ([`BOUND`] of virtual time): a connection a client can pin open is a leak;
//! and if, once the runtime and everything it held are gone, the server's budget still counts
//! a dial in flight or an idle connection: a slot a client could take for good.

#![no_main]

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hbone::copy::{CopyCause, CopyError, Transferred};
use hbone::limits::Budget;
use hbone::server::{Handler, InboundRequest, Rejection, Upstream};
use hbone::{Config, Server, SpiffeId, Tunnel, drain, testing};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What every HTTP/2 client sends first; prepended so that every input reaches frame handling.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The in-memory pipe's buffer in each direction: like a socket buffer, smaller than the
/// inputs libFuzzer makes at most, so the client sometimes waits for the server to read.
const PIPE: usize = 16 * 1024;

/// How long, in virtual time, the client waits after its last byte before closing its side:
/// only the ordering matters (the sleep ends once the server has acted on everything).
const SETTLE: Duration = Duration::from_millis(1);

/// How long, in virtual time, the server may take to let go of the connection after the
/// client closed: far above the handshake timeout (5 s) and every other deadline a closed
/// connection could still be waiting on, far below the idle timeout (5 min).
const BOUND: Duration = Duration::from_secs(60);

/// Targets below this port are refused by policy (403).
const FIRST_ALLOWED_PORT: u16 = 1024;
/// Targets from this port up cannot be dialed (503).
const FIRST_UNREACHABLE_PORT: u16 = 60000;

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(exchange(fixture, data));
    drop(runtime);
    let budget = &fixture.budget;
    assert_eq!(budget.peer_dials(PEER.ip()), 0, "a dial slot outlived its connection");
    assert_eq!(budget.idle_connections(), 0, "an idle slot outlived its connection");
});

/// The server and the identity its peer proved, made once per process.
struct Fixture {
    server: Server<EchoHandler>,
    /// The server's limits' counts (its config's, shared).
    budget: Budget,
    peer_identity: SpiffeId,
}

/// The client's address, and the server's.
const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 40000);
const LOCAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 15008);

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // The certificate is never presented (no TLS here); the server needs one to be built.
        let pki = testing::Pki::new();
        let certs = Arc::new(pki.workload("fuzz", "server"));
        let config = Config::default();
        let budget = config.budget.clone();
        let server = Server::new(config, certs, &pki.trust, EchoHandler);
        Fixture { server, budget, peer_identity: testing::id("fuzz", "client") }
    })
}

/// One connection: the client writes the preface and the input, waits until the server has
/// acted on it, closes its side and reads everything the server sends until it closes too.
async fn exchange(fixture: &Fixture, data: &[u8]) {
    let (client, server_side) = tokio::io::duplex(PIPE);
    // Held until the end: dropping the trigger is not a drain, but keep it explicit.
    let (_trigger, watch) = drain::channel();
    let serve = fixture.server.serve_established(server_side, fixture.peer_identity.clone(), PEER, LOCAL, watch);
    let (mut from_server, mut to_server) = tokio::io::split(client);
    let write = async {
        // Errors mean the server has closed already: nothing more to send.
        if to_server.write_all(PREFACE).await.is_ok() && to_server.write_all(data).await.is_ok() {
            tokio::time::sleep(SETTLE).await;
        }
        let _ = to_server.shutdown().await;
    };
    let read = async {
        let mut buf = vec![0u8; PIPE];
        while matches!(from_server.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let all = async { tokio::join!(serve, write, read) };
    if tokio::time::timeout(BOUND, all).await.is_err() {
        panic!("the server still held the connection {BOUND:?} after the client closed it");
    }
}

/// Authorizes by the target's port (below 1024: denied; else served) and dials an in-memory
/// echo, except for ports from 60000 up, which are unreachable.
struct EchoHandler;

impl Handler for EchoHandler {
    type Session = ();
    type Upstream = Echo;

    fn authorize(&self, request: &InboundRequest) -> Result<(), Rejection> {
        if request.target.port() < FIRST_ALLOWED_PORT {
            return Err(Rejection::Denied(format!("port {} is closed", request.target.port())));
        }
        Ok(())
    }

    async fn dial(&self, request: &InboundRequest) -> io::Result<(Echo, ())> {
        if request.target.port() >= FIRST_UNREACHABLE_PORT {
            return Err(io::Error::new(io::ErrorKind::ConnectionRefused, "nothing listens there"));
        }
        Ok((Echo, ()))
    }
}

/// An upstream that sends back what it reads, then ends its side when the client ends its.
struct Echo;

impl Upstream for Echo {
    fn run(
        &mut self,
        tunnel: Tunnel,
        _copy_buffer: usize,
    ) -> impl Future<Output = Result<Transferred, CopyError>> + Send + '_ {
        async move {
            let failed = |cause| CopyError { cause: CopyCause::Tunnel(cause), transferred: Transferred::default() };
            let (mut read, mut write) = tokio::io::split(tunnel);
            let moved = tokio::io::copy(&mut read, &mut write).await.map_err(failed)?;
            write.shutdown().await.map_err(failed)?;
            Ok(Transferred { to_tunnel: moved, from_tunnel: moved })
        }
    }
}
