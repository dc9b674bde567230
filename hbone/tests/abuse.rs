//! In-process tests of the server's limits against hostile clients (ARCHITECTURE §5.1,
//! `hbone::limits`): each hostile client is bounded or shown the door, and a legitimate client
//! keeps being served. Every loop is bounded in count and time.

mod common;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hbone::limits::{Budget, Cause, Rate, Refusal};
use hbone::server::{Handler, InboundRequest, Rejection};
use hbone::testing::{AllowAll, Pki, PolicyHandler, RunningServer, echo_server, request};
use hbone::{Client, Config, WorkloadCert, tls};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// The loopback address hostile clients connect from; legitimate ones use [`OTHER_PEER`].
const HOSTILE: &str = "127.0.0.1";
const OTHER_PEER: &str = "127.0.0.2";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test address")
}

/// Counts dials: started, in flight (and the most at once, per source address), connected.
/// Dials from `held` wait until the gate opens.
#[derive(Clone)]
struct CountingDials(Arc<DialState>);

struct DialState {
    started: AtomicUsize,
    connected: AtomicUsize,
    in_flight: Mutex<std::collections::HashMap<IpAddr, (usize, usize)>>,
    held: Option<IpAddr>,
    gate: watch::Receiver<bool>,
    delay: Duration,
}

impl CountingDials {
    fn new(held: Option<IpAddr>, delay: Duration) -> (CountingDials, watch::Sender<bool>) {
        let (open, gate) = watch::channel(false);
        let state = DialState {
            started: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            in_flight: Mutex::default(),
            held,
            gate,
            delay,
        };
        (CountingDials(Arc::new(state)), open)
    }

    /// (now, most at once) in flight from `peer`.
    fn in_flight(&self, peer: IpAddr) -> (usize, usize) {
        self.0.in_flight.lock().unwrap().get(&peer).copied().unwrap_or_default()
    }
}

/// Takes one off the in-flight count of its peer when the dial ends or is abandoned.
struct InFlight(Arc<DialState>, IpAddr);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.lock().unwrap().entry(self.1).or_default().0 -= 1;
    }
}

impl Handler for CountingDials {
    type Session = ();
    type Upstream = TcpStream;

    fn authorize(&self, _request: &InboundRequest) -> Result<(), Rejection> {
        Ok(())
    }

    async fn dial(&self, request: &InboundRequest) -> io::Result<(TcpStream, ())> {
        let state = self.0.clone();
        let peer = request.peer_addr.ip();
        state.started.fetch_add(1, Ordering::SeqCst);
        {
            let mut map = state.in_flight.lock().unwrap();
            let (now, most) = map.entry(peer).or_default();
            *now += 1;
            *most = (*most).max(*now);
        }
        let _in_flight = InFlight(state.clone(), peer);
        if state.held == Some(peer) {
            let mut gate = state.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
        }
        tokio::time::sleep(state.delay).await;
        let tcp = TcpStream::connect(request.target).await?;
        state.connected.fetch_add(1, Ordering::SeqCst);
        Ok((tcp, ()))
    }
}

/// A raw HTTP/2 connection over valid mutual TLS from `source`, so the test can do what
/// `hbone::Client` never would. The task ends with the connection's result.
async fn raw_h2(
    pki: &Pki,
    server: SocketAddr,
    server_id: &hbone::SpiffeId,
    source: IpAddr,
) -> (h2::client::SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tls = tls_from(pki, server, server_id, source).await;
    let (sender, connection) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    (sender, tokio::spawn(connection))
}

async fn tls_from(
    pki: &Pki,
    server: SocketAddr,
    server_id: &hbone::SpiffeId,
    source: IpAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let client = pki.workload("ns-a", "raw");
    let config = tls::client_config(&client, &pki.trust, Arc::from(vec![server_id.clone()]));
    let tcp = tcp_from(source, server).await.expect("connect to the HBONE server");
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(server.ip().into()), tcp)
        .await
        .expect("TLS handshake")
}

async fn tcp_from(source: IpAddr, dest: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(dest).await
}

fn connect_to(target: SocketAddr) -> Request<()> {
    Request::builder().method(Method::CONNECT).uri(target.to_string()).body(()).expect("a CONNECT")
}

/// A tunnel through `server` from `source`, echoing a few bytes: what a legitimate client does.
async fn echo_through(pki: &Pki, server: &RunningServer<impl Handler>, echo: SocketAddr, source: IpAddr) {
    let client = Client::new(Config::default(), pki.trust.clone());
    let cert: WorkloadCert = pki.workload("ns-a", "good");
    let mut req = request(&cert, server.addr, server.identity.identity(), echo);
    req.source_ip = Some(source);
    let work = async {
        let mut t = client.connect(req).await.expect("a legitimate tunnel opens");
        t.write_all(b"fine").await.unwrap();
        let mut back = [0u8; 4];
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"fine");
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.expect("the legitimate tunnel is served in time");
}

/// Waits (bounded) until `cond` holds.
async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Records every refusal the observer is told about.
fn observed() -> (Budget, Arc<Mutex<Vec<Refusal>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (Budget::with_observer(move |r| sink.lock().unwrap().push(*r)), seen)
}

fn count(seen: &Mutex<Vec<Refusal>>, cause: Cause) -> usize {
    seen.lock().unwrap().iter().filter(|r| r.cause == cause).count()
}

/// A client that opens streams and resets each as soon as its dial started gets GOAWAY
/// (ENHANCE_YOUR_CALM) after the configured number of premature resets; every dial it caused
/// was abandoned, none reached the target; a legitimate client is served meanwhile.
#[tokio::test]
async fn a_client_resetting_accepted_streams_gets_goaway() {
    const FLOOD: u32 = 20;
    let pki = Pki::new();
    let echo = echo_server().await;
    // Dials take a while, as an app slow to accept: the resets land during the dial.
    let (dials, _open) = CountingDials::new(None, Duration::from_millis(200));
    let (budget, seen) = observed();
    let mut config = Config { budget, ..Config::default() };
    config.limits.reset_flood = Rate::new(FLOOD, Duration::from_secs(10)).unwrap();
    let server = RunningServer::start(config, pki.workload("ns-b", "server"), &pki.trust, dials.clone()).await;
    let server_id = server.identity.identity().clone();

    let (mut h2, connection) = raw_h2(&pki, server.addr, &server_id, ip(HOSTILE)).await;
    let started = Instant::now();
    let mut sent = 0u32;
    // Bounded: without the limit this loop would run all 2,000 rounds.
    while sent < 2_000 && started.elapsed() < Duration::from_secs(20) {
        let Ok(ready) = h2.clone().ready().await else { break };
        h2 = ready;
        let Ok((_response, mut stream)) = h2.send_request(connect_to(echo), false) else { break };
        sent += 1;
        let before = dials.0.started.load(Ordering::SeqCst);
        // Reset once the server is dialing: the stream was accepted and admitted.
        let dialing = tokio::time::timeout(Duration::from_secs(2), async {
            while dials.0.started.load(Ordering::SeqCst) == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        if dialing.await.is_err() {
            break;
        }
        stream.send_reset(h2::Reason::CANCEL);
    }
    let ended =
        tokio::time::timeout(Duration::from_secs(5), connection).await.expect("the server closed the connection");
    let err = ended.unwrap().expect_err("closed with an error code");
    assert!(err.is_go_away() && err.is_remote(), "a GOAWAY from the server, got {err:?}");
    assert_eq!(err.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    assert!((FLOOD..=FLOOD + 2).contains(&sent), "GOAWAY after {sent} resets, the threshold is {FLOOD}");
    assert_eq!(server.server.stats().reset_floods.load(Ordering::SeqCst), 1);
    assert_eq!(count(&seen, Cause::ResetFlood), 1, "the observer was told");
    // Every dial the client caused was abandoned by its reset: none reached the app.
    assert!(dials.0.started.load(Ordering::SeqCst) <= sent as usize);
    eventually("abandoned dials end", Duration::from_secs(2), || dials.in_flight(ip(HOSTILE)).0 == 0).await;
    assert_eq!(dials.0.connected.load(Ordering::SeqCst), 0, "no reset stream reached the target");

    // The same peer on a new connection, and another peer, are served.
    echo_through(&pki, &server, echo, ip(HOSTILE)).await;
    echo_through(&pki, &server, echo, ip(OTHER_PEER)).await;
}

/// A stream reset before the server could dial it (here: waiting for a dial permit) is never
/// dialed at all, and counts as premature too.
#[tokio::test]
async fn a_stream_reset_while_waiting_for_a_permit_is_never_dialed() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let (dials, open) = CountingDials::new(Some(ip(HOSTILE)), Duration::ZERO);
    let mut config = Config::default();
    config.limits.dials_per_connection = 1;
    let server = RunningServer::start(config, pki.workload("ns-b", "server"), &pki.trust, dials.clone()).await;
    let (mut h2, _connection) = raw_h2(&pki, server.addr, server.identity.identity(), ip(HOSTILE)).await;
    // The first stream takes the connection's only permit and is held at the gate.
    let (first, _first_stream) = h2.send_request(connect_to(echo), false).unwrap();
    eventually("the first dial starts", Duration::from_secs(5), || dials.in_flight(ip(HOSTILE)).0 == 1).await;
    // Five more wait for the permit; each is reset while it waits.
    for _ in 0..5 {
        h2 = h2.ready().await.unwrap();
        let (_response, mut stream) = h2.send_request(connect_to(echo), false).unwrap();
        stream.send_reset(h2::Reason::CANCEL);
    }
    eventually("the resets are seen", Duration::from_secs(5), || {
        server.server.stats().streams_reset_early.load(Ordering::SeqCst) == 5
    })
    .await;
    open.send(true).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), first).await.unwrap().unwrap().status();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dials.0.started.load(Ordering::SeqCst), 1, "only the stream that was not reset was dialed");
}

/// Dials in flight are bounded per connection and per peer address; streams beyond wait and
/// are answered once permits free up; another peer's dials do not wait for them.
#[tokio::test]
async fn dials_in_flight_are_bounded_per_connection_and_per_peer() {
    const PER_CONNECTION: usize = 4;
    const PER_PEER: usize = 6;
    const STREAMS: usize = 20;
    let pki = Pki::new();
    let echo = echo_server().await;
    let (dials, open) = CountingDials::new(Some(ip(HOSTILE)), Duration::ZERO);
    let mut config = Config::default();
    config.limits.dials_per_connection = PER_CONNECTION;
    config.limits.dials_per_peer = PER_PEER;
    let budget = config.budget.clone();
    let server = RunningServer::start(config, pki.workload("ns-b", "server"), &pki.trust, dials.clone()).await;
    let server_id = server.identity.identity().clone();

    // Two connections from the hostile peer, each asking for STREAMS tunnels at once.
    let mut answers = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..2 {
        let (mut h2, connection) = raw_h2(&pki, server.addr, &server_id, ip(HOSTILE)).await;
        for _ in 0..STREAMS {
            h2 = h2.ready().await.unwrap();
            let (response, stream) = h2.send_request(connect_to(echo), false).unwrap();
            answers.push((response, stream));
        }
        connections.push((h2, connection));
    }
    eventually("the peer's dials fill its budget", Duration::from_secs(5), || {
        dials.in_flight(ip(HOSTILE)).0 == PER_PEER
    })
    .await;
    // It stays there while the gate is closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dials.in_flight(ip(HOSTILE)), (PER_PEER, PER_PEER), "(now, most) for the hostile peer");
    assert_eq!(budget.peer_dials(ip(HOSTILE)), PER_PEER);

    // Another peer is not held up by the hostile one's waiting streams.
    echo_through(&pki, &server, echo, ip(OTHER_PEER)).await;

    // Once the target answers, every waiting stream gets its dial and a 200.
    open.send(true).unwrap();
    for (response, _stream) in answers {
        let status = tokio::time::timeout(Duration::from_secs(10), response).await.expect("answered").unwrap().status();
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(dials.0.started.load(Ordering::SeqCst), 2 * STREAMS + 1);
    assert_eq!(dials.in_flight(ip(HOSTILE)).1, PER_PEER, "never more than the peer's budget at once");

    // One connection alone is held to its own bound.
    let (dials, _open) = CountingDials::new(Some(ip(HOSTILE)), Duration::ZERO);
    let mut config = Config::default();
    config.limits.dials_per_connection = PER_CONNECTION;
    let server = RunningServer::start(config, pki.workload("ns-b", "server"), &pki.trust, dials.clone()).await;
    let (mut h2, _connection) = raw_h2(&pki, server.addr, server.identity.identity(), ip(HOSTILE)).await;
    let mut waiting = Vec::new();
    for _ in 0..STREAMS {
        h2 = h2.ready().await.unwrap();
        waiting.push(h2.send_request(connect_to(echo), false).unwrap());
    }
    eventually("the connection's dials fill its bound", Duration::from_secs(5), || {
        dials.in_flight(ip(HOSTILE)).0 == PER_CONNECTION
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dials.in_flight(ip(HOSTILE)), (PER_CONNECTION, PER_CONNECTION));
    drop(connections);
}

/// Connections beyond the pending-handshake budget of a listener, or of the process (two
/// servers sharing one Config), are closed unread; an established tunnel keeps working, and new
/// connections are served again once the pending ones are gone.
#[tokio::test]
async fn pending_handshakes_are_capped_per_listener_and_per_process() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let (budget, seen) = observed();
    let mut config = Config { budget, ..Config::default() };
    config.limits.pending_handshakes_per_listener = 3;
    config.limits.pending_handshakes = 4;
    let a = RunningServer::start(config.clone(), pki.workload("ns-b", "a"), &pki.trust, AllowAll).await;
    let b = RunningServer::start(config.clone(), pki.workload("ns-b", "b"), &pki.trust, AllowAll).await;

    // A tunnel established before the flood.
    let client = Client::new(Config::default(), pki.trust.clone());
    let cert = pki.workload("ns-a", "good");
    let mut tunnel = client.connect(request(&cert, a.addr, a.identity.identity(), echo)).await.unwrap();

    // Three silent connections fill a's share; the fourth is closed at once.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(a.addr).await.unwrap());
    }
    eventually("three handshakes pending", Duration::from_secs(5), || config.budget.pending_handshakes() == 3).await;
    let mut fourth = TcpStream::connect(a.addr).await.unwrap();
    assert_closed(&mut fourth, "a connection over the listener's budget").await;
    // One more on b fills the process; the next on b is closed although b has room.
    silent.push(TcpStream::connect(b.addr).await.unwrap());
    eventually("four handshakes pending", Duration::from_secs(5), || config.budget.pending_handshakes() == 4).await;
    let mut over = TcpStream::connect(b.addr).await.unwrap();
    assert_closed(&mut over, "a connection over the process' budget").await;
    assert_eq!(a.server.stats().handshakes_refused.load(Ordering::SeqCst), 1);
    assert_eq!(b.server.stats().handshakes_refused.load(Ordering::SeqCst), 1);
    assert_eq!(count(&seen, Cause::HandshakeLimit), 2);

    // The established tunnel is not affected.
    tunnel.write_all(b"still").await.unwrap();
    let mut back = [0u8; 5];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still");

    // The silent clients leave; their slots come back and new clients are served.
    drop(silent);
    eventually("no handshake pending", Duration::from_secs(5), || config.budget.pending_handshakes() == 0).await;
    echo_through(&pki, &a, echo, ip(OTHER_PEER)).await;
    echo_through(&pki, &b, echo, ip(OTHER_PEER)).await;
}

/// Reads until the server closes the connection (EOF or reset), within a second.
async fn assert_closed(tcp: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await;
    let read = read.unwrap_or_else(|_| panic!("{what} was left open"));
    assert!(matches!(read, Ok(0) | Err(_)), "{what}: expected a close, read {read:?}");
}

/// Authenticated connections that carry no stream take the idle budget; one that becomes idle
/// beyond it gets GOAWAY at once, the others stay until the server idle timeout. A connection
/// carrying a tunnel is never idle.
#[tokio::test]
async fn idle_connections_beyond_the_budget_are_closed() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let (budget, seen) = observed();
    let mut config = Config { budget, ..Config::default() };
    config.limits.idle_after = Duration::from_millis(100);
    config.limits.idle_connections_per_listener = 2;
    let server = RunningServer::start(config.clone(), pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let server_id = server.identity.identity().clone();

    // A busy tunnel, opened first: its connection has a stream, so it is never idle.
    let client = Client::new(Config::default(), pki.trust.clone());
    let cert = pki.workload("ns-a", "good");
    let mut tunnel = client.connect(request(&cert, server.addr, &server_id, echo)).await.unwrap();

    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(raw_h2(&pki, server.addr, &server_id, ip(HOSTILE)).await);
    }
    eventually("one idle connection closed", Duration::from_secs(3), || {
        idle.iter().filter(|(_, connection)| connection.is_finished()).count() == 1
    })
    .await;
    // The other two stay, holding the budget.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(idle.iter().filter(|(_, c)| c.is_finished()).count(), 1, "only the one beyond the budget is closed");
    assert_eq!(config.budget.idle_connections(), 2);
    assert_eq!(server.server.stats().idle_closed.load(Ordering::SeqCst), 1);
    assert_eq!(count(&seen, Cause::IdleLimit), 1);

    // The tunnel, idle for as long in bytes but holding a stream, is untouched.
    tunnel.write_all(b"alive").await.unwrap();
    let mut back = [0u8; 5];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"alive");

    // A stream on an idle connection gives its slot back.
    let (h2, _) = idle.iter_mut().find(|(_, c)| !c.is_finished()).expect("an open idle connection");
    let mut h2 = h2.clone().ready().await.unwrap();
    let (response, _stream) = h2.send_request(connect_to(echo), false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    eventually("the slot is given back", Duration::from_secs(2), || config.budget.idle_connections() == 1).await;
}

/// A client refused in a loop, and clients failing their handshakes in a loop, make at most the
/// configured number of log lines of each kind, then one summary with the count of the rest;
/// the observer (metrics) still sees every event.
#[tokio::test]
async fn refusal_and_handshake_floods_make_a_bounded_number_of_log_lines() {
    const LINES: u32 = 5;
    const REFUSALS: usize = 200;
    const BAD_HANDSHAKES: usize = 40;
    let log = CapturedLog::default();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(log.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish(),
    );
    let pki = Pki::new();
    let echo = echo_server().await;
    let (budget, seen) = observed();
    let mut config = Config { budget, ..Config::default() };
    // One window for the whole test: what is written is exactly the first LINES of each kind.
    config.limits.log = Rate::new(LINES, Duration::from_secs(3600)).unwrap();
    let deny = PolicyHandler(|_: &InboundRequest| Err(Rejection::Denied("no one may".into())));
    let server = RunningServer::start(config.clone(), pki.workload("ns-b", "server"), &pki.trust, deny).await;

    let (mut h2, _connection) = raw_h2(&pki, server.addr, server.identity.identity(), ip(HOSTILE)).await;
    for _ in 0..REFUSALS {
        h2 = h2.ready().await.unwrap();
        let (response, _) = h2.send_request(connect_to(echo), false).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), response).await.unwrap().unwrap().status();
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    for _ in 0..BAD_HANDSHAKES {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: nothing\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
    }
    eventually("every handshake failure seen", Duration::from_secs(5), || {
        server.server.stats().handshake_failures.load(Ordering::SeqCst) == BAD_HANDSHAKES as u64
    })
    .await;
    assert_eq!(log.lines_with("HBONE tunnel refused"), LINES as usize, "refusal lines:\n{}", log.text());
    assert_eq!(log.lines_with("HBONE connection refused"), LINES as usize, "handshake lines:\n{}", log.text());
    assert_eq!(log.lines_with("suppressed"), 0, "no summary before the window ends or a flush");
    assert_eq!(count(&seen, Cause::HandshakeFailed), BAD_HANDSHAKES, "every failure is reported");

    config.budget.flush_logs();
    let text = log.text();
    let summaries: Vec<&str> = text.lines().filter(|l| l.contains("log lines suppressed")).collect();
    assert_eq!(summaries.len(), 2, "one summary per kind:\n{text}");
    let refused = REFUSALS - LINES as usize;
    assert!(
        summaries.iter().any(|l| l.contains("kind=\"tunnel_refused\"") && l.contains(&format!("suppressed={refused}")))
    );
    let failed = BAD_HANDSHAKES - LINES as usize;
    assert!(summaries.iter().any(|l| l.contains("kind=\"tls_failed\"") && l.contains(&format!("suppressed={failed}"))));
    config.budget.flush_logs();
    assert_eq!(log.lines_with("log lines suppressed"), 2, "a flush owes nothing twice");
}

/// The log lines written by the test's subscriber.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn lines_with(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }
}

impl io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLog {
    type Writer = CapturedLog;

    fn make_writer(&'a self) -> CapturedLog {
        self.clone()
    }
}
