//! In-process tests of HBONE tunnels on loopback: data, pooling, half-close, integrity,
//! policy answers, flow control, idle eviction and drain.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Pair, verify_pattern, write_pattern};
use hbone::server::Rejection;
use hbone::testing::{AllowAll, Pki, PolicyHandler, RunningServer, client_proxy, echo_server, request};
use hbone::{Client, Config, drain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_through_tunnel_with_identities_and_headers() {
    let pki = Pki::new();
    let server_cert = pki.workload("ns-b", "server");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let handler = PolicyHandler(move |r: &hbone::InboundRequest| {
        seen2.lock().unwrap().push(r.clone());
        Ok(())
    });
    let server = RunningServer::start(Config::default(), server_cert.clone(), &pki.trust, handler).await;
    let echo = echo_server().await;
    let client = Client::new(Config::default(), pki.trust.clone());
    let source = pki.workload("ns-a", "client");

    let mut req = request(&source, server.addr, server_cert.identity(), echo);
    req.forwarded_for = Some("10.244.1.7".parse().unwrap());
    req.baggage = Some("k8s.namespace.name=ns-a".parse().unwrap());
    req.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
    let mut tunnel = client.connect(req).await.expect("tunnel opens");
    assert_eq!(tunnel.peer_identity(), server_cert.identity(), "client saw the server's identity");

    tunnel.write_all(b"hello through hbone").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut back = Vec::new();
    tunnel.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello through hbone");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(&r.peer_identity, source.identity(), "server saw the client's identity");
    assert_eq!(r.target, echo);
    assert_eq!(r.forwarded_for, Some("10.244.1.7".parse().unwrap()));
    assert_eq!(r.baggage.as_ref().unwrap(), "k8s.namespace.name=ns-a");
    assert!(r.traceparent.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_share_few_connections() {
    const STREAMS: usize = 1000;
    let pki = Pki::new();
    let server_cert = pki.workload("ns-b", "server");
    let config = Config::default();
    let per_conn = config.max_streams_per_connection as usize;
    let server = RunningServer::start(config.clone(), server_cert.clone(), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let client = Client::new(config, pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    let all_open = Arc::new(tokio::sync::Barrier::new(STREAMS));

    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let client = client.clone();
        let req = request(&source, server.addr, server_cert.identity(), echo);
        let all_open = all_open.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = client.connect(req).await.expect("tunnel opens");
            // Hold every tunnel open at once, so they really are concurrent.
            all_open.wait().await;
            let msg = format!("stream {i}");
            t.write_all(msg.as_bytes()).await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = String::new();
            t.read_to_string(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.expect("streams finish").unwrap();
    }
    let accepted = server.server.stats().connections_accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(accepted as usize, STREAMS.div_ceil(per_conn), "server-side TLS connections for {STREAMS} streams");
    assert_eq!(client.stats().connections_opened.load(std::sync::atomic::Ordering::Relaxed), accepted);
    assert_eq!(server.server.stats().streams_accepted.load(std::sync::atomic::Ordering::Relaxed), STREAMS as u64);
    assert_eq!(client.pending_dials(), 0, "no dial state is left behind");
}

/// A target that reads until EOF and then answers how many bytes it got, then closes.
async fn count_then_reply_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                tcp.read_to_end(&mut buf).await.unwrap();
                tcp.write_all(format!("got {} bytes", buf.len()).as_bytes()).await.unwrap();
                tcp.shutdown().await.unwrap();
            });
        }
    });
    addr
}

/// A target that speaks first, half-closes, then reads until EOF and reports what it read.
async fn speak_then_listen_server(report: tokio::sync::mpsc::Sender<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                tcp.write_all(b"banner").await.unwrap();
                tcp.shutdown().await.unwrap();
                let mut buf = Vec::new();
                tcp.read_to_end(&mut buf).await.unwrap();
                report.send(buf).await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_in_both_directions() {
    let Pair { server_cert, server, client, source, .. } = Pair::start().await;

    // Client closes first: the target sees EOF and can still answer.
    let target = count_then_reply_server().await;
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), target)).await.unwrap();
    t.write_all(&[7u8; 1000]).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_string(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, "got 1000 bytes", "reply after the client's FIN, then a clean EOF");

    // Target closes first: the client sees EOF and can still send.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let target = speak_then_listen_server(tx).await;
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), target)).await.unwrap();
    let mut banner = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut banner)).await.unwrap().unwrap();
    assert_eq!(banner, b"banner");
    t.write_all(b"after your FIN").await.unwrap();
    t.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, b"after your FIN");

    // The same, through the proxy path (copy::bidirectional on both ends).
    let (proxy, _task) = client_proxy(
        client.clone(),
        request(&source, server.addr, server_cert.identity(), count_then_reply_server().await),
        Config::default().copy_buffer,
    )
    .await;
    let mut app = TcpStream::connect(proxy).await.unwrap();
    app.write_all(&[1u8; 5000]).await.unwrap();
    app.shutdown().await.unwrap();
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(10), app.read_to_string(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, "got 5000 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_256_mib_one_stream() {
    let Pair { server_cert, server, client, source, .. } = Pair::start().await;
    let echo = echo_server().await;
    let t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(t);
    let writer = tokio::spawn(async move { write_pattern(&mut w, 42, 256 * MIB).await });
    let got = tokio::time::timeout(Duration::from_secs(300), verify_pattern(&mut r, 42)).await.unwrap().unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(got, 256 * MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_256_mib_over_eight_parallel_proxied_streams() {
    const STREAMS: usize = 8;
    let Pair { server_cert, server, client, source, .. } = Pair::start().await;
    let echo = echo_server().await;
    // Through the proxy path: app TCP -> copy -> HBONE -> copy -> echo, and back.
    let (proxy, _task) = client_proxy(
        client,
        request(&source, server.addr, server_cert.identity(), echo),
        Config::default().copy_buffer,
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        tasks.push(tokio::spawn(async move {
            let app = TcpStream::connect(proxy).await.unwrap();
            let (mut r, mut w) = app.into_split();
            let writer = tokio::spawn(async move { write_pattern(&mut w, i as u64, 256 * MIB / STREAMS).await });
            let got = verify_pattern(&mut r, i as u64).await.unwrap();
            writer.await.unwrap().unwrap();
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += tokio::time::timeout(Duration::from_secs(300), t).await.unwrap().unwrap();
    }
    assert_eq!(total, 256 * MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_is_403_policy_error_and_unreachable_is_503() {
    let pki = Pki::new();
    let server_cert = pki.workload("ns-b", "server");
    let handler = PolicyHandler(|r: &hbone::InboundRequest| {
        if r.peer_identity.service_account() == "intruder" {
            Err(Rejection::Denied(format!("{} is not allowed", r.peer_identity)))
        } else {
            Ok(())
        }
    });
    let server = RunningServer::start(Config::default(), server_cert.clone(), &pki.trust, handler).await;
    let echo = echo_server().await;
    let client = Client::new(Config::default(), pki.trust.clone());

    let intruder = pki.workload("ns-a", "intruder");
    let err = client.connect(request(&intruder, server.addr, server_cert.identity(), echo)).await.unwrap_err();
    assert!(err.is_policy_denied(), "{err}");
    assert!(matches!(err, hbone::ConnectError::Denied { status: 403, .. }), "{err:?}");

    // The same connection still serves an allowed identity... (different source, own pool key)
    let friend = pki.workload("ns-a", "friend");
    let mut t = client.connect(request(&friend, server.addr, server_cert.identity(), echo)).await.unwrap();
    t.write_all(b"ok").await.unwrap();

    // A target with nothing listening: 503.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = client.connect(request(&friend, server.addr, server_cert.identity(), closed)).await.unwrap_err();
    assert!(err.is_unreachable(), "{err}");
}

/// A target that reads a byte and then resets the connection (SO_LINGER 0 close).
async fn resetting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut one = [0u8; 1];
            let _ = tcp.read_exact(&mut one).await;
            socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO)).unwrap();
            drop(tcp);
        }
    });
    addr
}

/// A target that reports how its connection ended: `Ok(bytes)` on a clean EOF, or the error.
async fn reporting_server(report: tokio::sync::mpsc::Sender<std::io::Result<usize>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let result = tcp.read_to_end(&mut buf).await;
                let _ = report.send(result).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_propagate_in_both_directions() {
    let Pair { server_cert, server, client, source, .. } = Pair::start().await;
    let buffer = Config::default().copy_buffer;

    // The target resets: the app behind the client proxy sees a reset, not a clean EOF.
    let target = resetting_server().await;
    let (proxy, _t) =
        client_proxy(client.clone(), request(&source, server.addr, server_cert.identity(), target), buffer).await;
    let mut app = TcpStream::connect(proxy).await.unwrap();
    app.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let result = tokio::time::timeout(Duration::from_secs(10), app.read(&mut buf)).await.expect("app sees the end");
    let err = result.expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // The app resets: the target sees a reset, not a clean EOF.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let target = reporting_server(tx).await;
    let (proxy, _t) =
        client_proxy(client.clone(), request(&source, server.addr, server_cert.identity(), target), buffer).await;
    let mut app = TcpStream::connect(proxy).await.unwrap();
    app.write_all(b"some bytes").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // let the tunnel open and carry them
    socket2::SockRef::from(&app).set_linger(Some(Duration::ZERO)).unwrap();
    drop(app);
    let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("target sees the end").unwrap();
    let err = seen.expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

/// A target that accepts and never reads: its tunnel's windows fill up.
async fn black_hole_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_spread_over_two_connections_then_share_them() {
    let Pair { server_cert, server, client, source, .. } = Pair::start().await;
    assert_eq!(Config::default().spread_connections, 2);
    let echo = echo_server().await;
    let opened = || client.stats().connections_opened.load(std::sync::atomic::Ordering::Relaxed);
    let mut tunnels = Vec::new();
    for (i, expected) in [1, 2, 2, 2].into_iter().enumerate() {
        tunnels.push(client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap());
        assert_eq!(opened(), expected, "connections after {} concurrent streams", i + 1);
    }
    let accepted = server.server.stats().connections_accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(accepted, 2, "the server saw both connections");
    for (i, t) in tunnels.iter_mut().enumerate() {
        let msg = format!("stream {i}");
        t.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0; msg.len()];
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    // One stream at a time needs one connection: a stream opened after the others ended
    // reuses a connection instead of dialing.
    drop(tunnels);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    t.write_all(b"x").await.unwrap();
    assert_eq!(opened(), 2, "an idle pooled connection was reused");
}

/// Dials through the direct dialer until `allowed` dials have been made, then fails.
struct FailAfter {
    allowed: usize,
    made: std::sync::atomic::AtomicUsize,
}

impl hbone::client::Dialer for FailAfter {
    fn dial(
        &self,
        source: Option<std::net::IpAddr>,
        dest: SocketAddr,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<TcpStream>> + Send + '_>> {
        if self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= self.allowed {
            return Box::pin(async { Err(std::io::Error::other("no more dials")) });
        }
        static DIRECT: hbone::client::DirectDialer = hbone::client::DirectDialer;
        hbone::client::Dialer::dial(&DIRECT, source, dest)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dial_to_spread_streams_shares_the_open_connection() {
    let Pair { pki, server_cert, server, source, .. } = Pair::start().await;
    let dialer = Arc::new(FailAfter { allowed: 1, made: Default::default() });
    let client = Client::with_dialer(Config::default(), pki.trust.clone(), dialer.clone());
    let echo = echo_server().await;
    let mut first = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    let mut second = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    assert_eq!(dialer.made.load(std::sync::atomic::Ordering::SeqCst), 2, "a second connection was tried");
    assert_eq!(client.stats().connections_opened.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(client.stats().handshake_failures.load(std::sync::atomic::Ordering::Relaxed), 1);
    for (t, msg) in [(&mut first, b"one"), (&mut second, b"two")] {
        t.write_all(msg).await.unwrap();
        let mut back = [0; 3];
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_block_other_streams_on_the_connection() {
    // The documented bound (config.rs): up to three streams whose readers stopped cannot
    // stall the others on their connection.
    const STALLED: usize = 3;
    let Pair { pki, server_cert, server, source, .. } = Pair::start().await;
    // Every stream on one connection: that connection's windows are what is tested.
    let client = Client::new(Config { spread_connections: 1, ..Config::default() }, pki.trust.clone());

    // Streams that push into a target that never reads, until everything on their path is full.
    let black_hole = black_hole_server().await;
    let pushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..STALLED {
        let mut stalled =
            client.connect(request(&source, server.addr, server_cert.identity(), black_hole)).await.unwrap();
        let pushed = pushed.clone();
        tokio::spawn(async move {
            let chunk = vec![0u8; 64 * 1024];
            while stalled.write_all(&chunk).await.is_ok() {
                pushed.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    // Wait until they are stuck (no progress for a while).
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = pushed.load(std::sync::atomic::Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    assert!(last >= STALLED * 4 * MIB, "the stalled streams filled at least their stream windows ({last} bytes)");

    // Another stream on the same connection still moves 32 MiB.
    let echo = echo_server().await;
    let t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    assert_eq!(client.stats().connections_opened.load(std::sync::atomic::Ordering::Relaxed), 1, "same connection");
    let (mut r, mut w) = tokio::io::split(t);
    let writer = tokio::spawn(async move { write_pattern(&mut w, 9, 32 * MIB).await });
    let got = tokio::time::timeout(Duration::from_secs(30), verify_pattern(&mut r, 9))
        .await
        .expect("the stream is not blocked by the stalled ones")
        .unwrap();
    writer.await.unwrap().unwrap();
    assert_eq!(got, 32 * MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connection_is_closed() {
    let pki = Pki::new();
    let server_cert = pki.workload("ns-b", "server");
    let config = Config { pool_idle_timeout: Duration::from_millis(200), ..Config::default() };
    let server = RunningServer::start(config.clone(), server_cert.clone(), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let client = Client::new(config, pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    t.write_all(b"x").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    // While a stream is open, the connection stays even past the idle timeout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.connection_count(), 1, "a connection with an open stream is never idle");
    drop(t);
    let deadline = Instant::now() + Duration::from_secs(5);
    while (client.connection_count() > 0
        || server.server.stats().connections_active.load(std::sync::atomic::Ordering::Relaxed) > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.connection_count(), 0, "client evicted the idle connection");
    assert_eq!(
        server.server.stats().connections_active.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the server saw it close"
    );
}

/// A connection carrying a stream runs no timer of its own on the client: its idle eviction
/// starts only when its last stream ends. (Checking every quarter of the 40 ms timeout, as it
/// did, woke the runtime 85 times in the 400 ms of `wakes_no_timer_while_a_stream_is_open`.)
#[test]
fn the_client_runs_no_idle_timer_while_a_stream_is_open() {
    let (ms, minute) = (Duration::from_millis(1), Duration::from_secs(60));
    wakes_no_timer_while_a_stream_is_open(40 * ms, minute, minute);
}

/// The same on the server: its idle beat (every 20 ms here) starts only when the connection's
/// last stream ends, and then closes the connection on its own (the client's timeout is a
/// minute). (A beat running throughout, as it did, woke the runtime 45 times.)
#[test]
fn the_server_runs_no_idle_beat_while_a_stream_is_open() {
    let (ms, minute) = (Duration::from_millis(1), Duration::from_secs(60));
    wakes_no_timer_while_a_stream_is_open(minute, 40 * ms, 20 * ms);
}

/// Opens a tunnel on a one-thread runtime holding client (idle timeout `pool_idle`), server
/// (`server_idle`, `idle_after`) and echo, leaves it open and silent for 400 ms counting the
/// runtime's parks (each timer that fires wakes the thread, which parks again after), then ends
/// it and waits for the connection to close on both sides.
fn wakes_no_timer_while_a_stream_is_open(pool_idle: Duration, server_idle: Duration, idle_after: Duration) {
    let client_config = Config { pool_idle_timeout: pool_idle, ..Config::default() };
    let mut server_config = Config { server_idle_timeout: server_idle, ..Config::default() };
    server_config.limits.idle_after = idle_after;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let pki = Pki::new();
        let server_cert = pki.workload("ns-b", "server");
        let server = RunningServer::start(server_config, server_cert.clone(), &pki.trust, AllowAll).await;
        let echo = echo_server().await;
        let client = Client::new(client_config, pki.trust.clone());
        let source = pki.workload("ns-a", "client");
        let mut t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
        t.write_all(b"x").await.unwrap();
        let mut back = [0u8; 1];
        t.read_exact(&mut back).await.unwrap();

        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.worker_park_count(0);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let parks = metrics.worker_park_count(0) - before;
        assert!(parks <= 4, "{parks} wake-ups in 400 ms with a stream open and no byte moving");
        assert_eq!(client.connection_count(), 1, "a connection with an open stream is never idle");

        drop(t);
        let deadline = Instant::now() + Duration::from_secs(5);
        let active = || server.server.stats().connections_active.load(std::sync::atomic::Ordering::Relaxed);
        while (client.connection_count() > 0 || active() > 0) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((client.connection_count(), active()), (0, 0), "closed once idle, on both sides");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_active_tunnels_finish_and_refuses_new_ones() {
    let Pair { pki, server_cert, mut server, client, source } = Pair::start().await;
    let echo = echo_server().await;
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    t.write_all(b"before").await.unwrap();

    let addr = server.addr;
    let drain = tokio::spawn(async move { server.drain(Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // New connections are refused: the listener is closed.
    let fresh = Client::new(Config::default(), pki.trust.clone());
    let err = fresh.connect(request(&source, addr, server_cert.identity(), echo)).await.unwrap_err();
    assert!(matches!(err, hbone::ConnectError::Dial { .. }), "{err:?}");

    // The active tunnel keeps flowing and completes.
    t.write_all(b" and after").await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"before and after");
    drop(t);
    let outcome = tokio::time::timeout(Duration::from_secs(10), drain).await.unwrap().unwrap();
    assert_eq!(outcome, Some(drain::Outcome::Graceful));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deadline_cuts_tunnels_that_do_not_finish() {
    let Pair { server_cert, mut server, client, source, .. } = Pair::start().await;
    let echo = echo_server().await;
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    t.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    t.read_exact(&mut one).await.unwrap();

    let started = Instant::now();
    let outcome = server.drain(Duration::from_millis(300)).await;
    assert_eq!(outcome, Some(drain::Outcome::DeadlineExceeded));
    assert!(started.elapsed() < Duration::from_secs(5));
    // The tunnel was cut: reading ends (EOF or reset) instead of hanging.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the tunnel ended when the server closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_failed_handshake() {
    // A peer that accepts TCP and never speaks TLS: every handshake times out.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let pki = Pki::new();
    let timeout = Duration::from_millis(300);
    let client = Client::new(Config { handshake_timeout: timeout, ..Config::default() }, pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = client.clone();
        let req = request(&source, silent, &hbone::testing::id("ns-b", "server"), silent);
        tasks.push(tokio::spawn(async move { client.connect(req).await }));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.is_timeout(), "{err}");
    }
    // One handshake was tried and its failure shared, instead of 100 tries one after another.
    assert_eq!(client.stats().handshake_failures.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(started.elapsed() < timeout * 5, "took {:?}", started.elapsed());
    assert_eq!(client.pending_dials(), 0);
}
