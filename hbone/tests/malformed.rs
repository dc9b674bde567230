//! In-process tests of what the server does with requests that break the wire contract:
//! the right answer, or a close within the timeout, and it keeps serving everyone else.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hbone::testing::{AllowAll, Pki, RunningServer, echo_server, request};
use hbone::{Client, Config, WorkloadCert, tls};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A raw HTTP/2 connection over valid mutual TLS, so the test can send what `hbone::Client`
/// never would.
async fn raw_h2(pki: &Pki, server: &RunningServer<AllowAll>) -> h2::client::SendRequest<Bytes> {
    let source = pki.workload("ns-a", "raw");
    let config = tls::client_config(&source, &pki.trust, Arc::from(vec![server.identity.identity().clone()]));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
        .await
        .unwrap();
    let (sender, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

async fn status_of(sender: &mut h2::client::SendRequest<Bytes>, request: Request<()>) -> Result<StatusCode, h2::Error> {
    let mut sender = sender.clone().ready().await?;
    let (response, _send) = sender.send_request(request, false)?;
    Ok(tokio::time::timeout(Duration::from_secs(5), response).await.expect("server answers")?.status())
}

async fn assert_still_serves(pki: &Pki, server: &RunningServer<AllowAll>, echo: SocketAddr) {
    let client = Client::new(Config::default(), pki.trust.clone());
    let source: WorkloadCert = pki.workload("ns-a", "good");
    let mut t = client.connect(request(&source, server.addr, server.identity.identity(), echo)).await.unwrap();
    t.write_all(b"fine").await.unwrap();
    let mut back = [0u8; 4];
    t.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"fine");
}

#[tokio::test]
async fn get_instead_of_connect_is_400() {
    let pki = Pki::new();
    let server = RunningServer::start(Config::default(), pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let mut h2 = raw_h2(&pki, &server).await;
    let get = Request::builder().method(Method::GET).uri(format!("http://{echo}/")).body(()).unwrap();
    assert_eq!(status_of(&mut h2, get).await.unwrap(), StatusCode::BAD_REQUEST);
    assert_still_serves(&pki, &server, echo).await;
}

#[tokio::test]
async fn connect_to_hostname_or_garbage_authority_is_400() {
    let pki = Pki::new();
    let server = RunningServer::start(Config::default(), pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let mut h2 = raw_h2(&pki, &server).await;
    let mut sent = 0;
    for authority in ["example.com:80", "10.0.0.1", "999.1.1.1:80", "1.2.3.4:99999"] {
        let req = Request::builder().method(Method::CONNECT).uri(authority).body(());
        let Ok(req) = req else { continue }; // some are not even valid URIs for the http crate
        sent += 1;
        assert_eq!(status_of(&mut h2, req).await.unwrap(), StatusCode::BAD_REQUEST, "authority {authority}");
    }
    // The same connection still works for a valid CONNECT.
    let ok = Request::builder().method(Method::CONNECT).uri(echo.to_string()).body(()).unwrap();
    assert_eq!(status_of(&mut h2, ok).await.unwrap(), StatusCode::OK);
    assert!(sent >= 3, "most malformed authorities reached the server");
    assert_eq!(server.server.stats().streams_rejected.load(Ordering::Relaxed), sent);
}

/// A `forwarded` header the server cannot read exactly is refused, not half-read into an
/// address (`for="[2001:db8::1"` used to be taken as 2001:db8::1); well-formed ones pass.
#[tokio::test]
async fn malformed_forwarded_header_is_400() {
    let pki = Pki::new();
    let server = RunningServer::start(Config::default(), pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let mut h2 = raw_h2(&pki, &server).await;
    let connect = |forwarded: &str| {
        Request::builder()
            .method(Method::CONNECT)
            .uri(echo.to_string())
            .header("forwarded", forwarded)
            .body(())
            .unwrap()
    };
    for bad in ["for=\"[2001:db8::1\"", "for=\"10.0.0.1", "for=\"[2001:db8::1]junk\"", "for=not-an-address"] {
        assert_eq!(status_of(&mut h2, connect(bad)).await.unwrap(), StatusCode::BAD_REQUEST, "forwarded: {bad}");
    }
    for good in ["for=\"[2001:db8::1]\"", "for=10.0.0.1", "for=unknown"] {
        assert_eq!(status_of(&mut h2, connect(good)).await.unwrap(), StatusCode::OK, "forwarded: {good}");
    }
    assert_eq!(server.server.stats().streams_rejected.load(Ordering::Relaxed), 4);
    assert_eq!(server.server.stats().streams_accepted.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn silent_clients_are_closed_within_the_handshake_timeout() {
    let pki = Pki::new();
    let timeout = Duration::from_millis(300);
    let config = Config { handshake_timeout: timeout, ..Config::default() };
    let server = RunningServer::start(config, pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;

    // 1. Connects and sends nothing.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // 2. Sends half a TLS ClientHello record header and stops.
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    // 3. Completes TLS but never sends the HTTP/2 preface.
    let source = pki.workload("ns-a", "mute");
    let config = tls::client_config(&source, &pki.trust, Arc::from(vec![server.identity.identity().clone()]));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut no_preface = TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
        .await
        .unwrap();

    // Others are served meanwhile.
    assert_still_serves(&pki, &server, echo).await;

    let started = Instant::now();
    let mut buf = [0u8; 64];
    for (name, result) in [
        ("silent", tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await),
        ("partial", tokio::time::timeout(Duration::from_secs(5), partial.read(&mut buf)).await),
    ] {
        let result = result.unwrap_or_else(|_| panic!("{name} client was not closed"));
        assert!(matches!(result, Ok(0) | Err(_)), "{name} client: server closed the connection, got {result:?}");
    }
    // The TLS client may first read the server's HTTP/2 SETTINGS, then the close.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match no_preface.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a client that never sent the HTTP/2 preface was not closed");
    assert!(started.elapsed() < Duration::from_secs(3), "closed within the timeout, took {:?}", started.elapsed());
    assert_eq!(server.server.stats().handshake_failures.load(Ordering::Relaxed), 3);
    assert_still_serves(&pki, &server, echo).await;
}

/// A header block over the limit (16 KiB decoded) is answered `431` with END_STREAM, then the
/// stream is reset with PROTOCOL_ERROR: h2 does both before the request reaches the server's
/// code, so no tunnel, no handler call. The connection goes on serving.
#[tokio::test]
async fn oversized_headers_are_431_then_reset() {
    let pki = Pki::new();
    let server = RunningServer::start(Config::default(), pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let limit = Config::default().max_header_list_size as usize;
    let mut raw = RawH2::connect(&pki, &server).await;
    // 32 KiB in a HEADERS frame and a CONTINUATION (frames of 16 KiB: the default size).
    raw.headers(1, &connect_block(echo, &[("x-big", &"x".repeat(2 * limit))]));
    let frames = raw.read_until(|f| f.kind == RST_STREAM || f.kind == GOAWAY).await;
    let on_stream: Vec<&Frame> = frames.iter().filter(|f| f.stream == 1).collect();
    assert_eq!(on_stream.len(), 2, "an answer and a reset on stream 1: {frames:?}");
    assert_eq!(
        (on_stream[0].kind, on_stream[0].flags & END_STREAM),
        (HEADERS, END_STREAM),
        "an answer ending the stream"
    );
    assert_eq!(on_stream[1].kind, RST_STREAM);
    assert_eq!(error_code(&on_stream[1].payload[..4]), h2::Reason::PROTOCOL_ERROR);
    // The connection goes on.
    raw.ping();
    let frames = raw.read_until(|f| f.kind == PING && f.flags & ACK != 0).await;
    assert!(frames.iter().all(|f| f.kind != GOAWAY), "the connection stays: {frames:?}");
    assert_eq!(server.server.stats().streams_accepted.load(Ordering::Relaxed), 0, "no tunnel was opened");
    assert_eq!(server.server.stats().streams_rejected.load(Ordering::Relaxed), 0, "the server's code never saw it");

    // The answer is 431 (read here by an HTTP/2 client, which decodes the status).
    let mut h2 = raw_h2(&pki, &server).await;
    let big = "x".repeat(limit * 2);
    let req = Request::builder().method(Method::CONNECT).uri(echo.to_string()).header("baggage", big).body(()).unwrap();
    assert_eq!(status_of(&mut h2, req).await.unwrap(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_still_serves(&pki, &server, echo).await;
}

/// Header blocks h2 treats as abuse close the connection: one that decodes to more than four
/// times the limit (64 KiB), or whose sixth CONTINUATION frame still does not end it, gets
/// GOAWAY(ENHANCE_YOUR_CALM); a CONTINUATION frame bringing the limit's worth of bytes after
/// the block is already over the limit gets GOAWAY(COMPRESSION_ERROR).
#[tokio::test]
async fn abusive_header_blocks_close_the_connection() {
    let pki = Pki::new();
    let server = RunningServer::start(Config::default(), pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let limit = Config::default().max_header_list_size as usize;

    // 64 KiB and a little more decoded, in five frames: over four times the limit.
    let mut raw = RawH2::connect(&pki, &server).await;
    raw.headers(1, &connect_block(echo, &[("x-big", &"x".repeat(4 * limit + 1024))]));
    let goaway = raw.goaway().await;
    assert_eq!(goaway, (h2::Reason::ENHANCE_YOUR_CALM, b"header_list_way_too_large".to_vec()));

    // A small block in HEADERS and seven CONTINUATION frames: five that do not end it are
    // allowed, the sixth is not.
    let mut raw = RawH2::connect(&pki, &server).await;
    let block = connect_block(echo, &[("x-small", &"y".repeat(600))]);
    let chunks: Vec<&[u8]> = block.chunks(block.len() / 8 + 1).collect();
    assert_eq!(chunks.len(), 8);
    raw.frame(HEADERS, 0, 1, chunks[0]);
    for (i, chunk) in chunks[1..].iter().enumerate() {
        raw.frame(CONTINUATION, if i == 6 { END_HEADERS } else { 0 }, 1, chunk);
    }
    assert_eq!(raw.goaway().await, (h2::Reason::ENHANCE_YOUR_CALM, b"too_many_continuations".to_vec()));

    // Over the limit in its first frame (600 tiny headers: 20 KiB decoded from 3 KB), which
    // ends inside a long header, then a full CONTINUATION frame of it.
    let mut raw = RawH2::connect(&pki, &server).await;
    let tiny: Vec<(String, String)> = (0..600).map(|i| (format!("h{i}"), "v".into())).collect();
    let tiny: Vec<(&str, &str)> = tiny.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let mut block = connect_block(echo, &tiny);
    let first = block.len() + 100;
    block.extend(literal("x-more", &"z".repeat(2 * limit)));
    raw.frame(HEADERS, 0, 1, &block[..first]);
    raw.frame(CONTINUATION, 0, 1, &block[first..first + DEFAULT_FRAME]);
    assert_eq!(raw.goaway().await.0, h2::Reason::COMPRESSION_ERROR);
    assert_still_serves(&pki, &server, echo).await;
}

/// A client that makes the server reset its streams for protocol errors (here, a
/// connection-specific header, forbidden in HTTP/2) is closed with GOAWAY(ENHANCE_YOUR_CALM)
/// on the one after `local_error_resets` of them (1024 by default, as h2's; set lower here to
/// show that the setting is the one applied).
#[tokio::test]
async fn protocol_error_resets_are_capped() {
    let pki = Pki::new();
    assert_eq!(Config::default().limits.local_error_resets, 1024);
    let mut config = Config::default();
    config.limits.local_error_resets = 40;
    let max = config.limits.local_error_resets as u32;
    let server = RunningServer::start(config, pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let mut raw = RawH2::connect(&pki, &server).await;
    for i in 0..max {
        raw.headers(2 * i + 1, &connect_block(echo, &[("connection", "close")]));
    }
    raw.ping();
    let frames = raw.read_until(|f| f.kind == PING && f.flags & ACK != 0).await;
    assert!(frames.iter().all(|f| f.kind != GOAWAY), "{max} are tolerated: {frames:?}");
    raw.headers(2 * max + 1, &connect_block(echo, &[("connection", "close")]));
    assert_eq!(raw.goaway().await, (h2::Reason::ENHANCE_YOUR_CALM, b"too_many_internal_resets".to_vec()));
    assert_eq!(server.server.stats().streams_rejected.load(Ordering::Relaxed), 0, "the server's code never saw them");
    assert_still_serves(&pki, &server, echo).await;
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The largest frame a client may send before it knows the server's settings.
const DEFAULT_FRAME: usize = 16 * 1024;

/// One HTTP/2 frame as read.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// HTTP/2 frames written by hand over valid mutual TLS, for what no HTTP/2 library sends.
struct RawH2 {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    out: Vec<u8>,
}

impl RawH2 {
    /// Connects, sends the preface and empty SETTINGS.
    async fn connect(pki: &Pki, server: &RunningServer<AllowAll>) -> RawH2 {
        let source = pki.workload("ns-a", "raw");
        let config = tls::client_config(&source, &pki.trust, Arc::from(vec![server.identity.identity().clone()]));
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::IpAddress(server.addr.ip().into()), tcp)
            .await
            .unwrap();
        let mut raw = RawH2 { tls, out: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec() };
        raw.frame(SETTINGS, 0, 0, &[]);
        raw
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        assert!(payload.len() <= DEFAULT_FRAME, "frames of the default size only");
        self.out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        self.out.extend_from_slice(&[kind, flags]);
        self.out.extend_from_slice(&stream.to_be_bytes());
        self.out.extend_from_slice(payload);
    }

    /// A header block as HEADERS and CONTINUATION frames of the default size.
    fn headers(&mut self, stream: u32, block: &[u8]) {
        let chunks: Vec<&[u8]> = block.chunks(DEFAULT_FRAME).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            self.frame(kind, if i + 1 == chunks.len() { END_HEADERS } else { 0 }, stream, chunk);
        }
    }

    fn ping(&mut self) {
        self.frame(PING, 0, 0, &[7; 8]);
    }

    /// Sends what is queued, then reads frames until `last` matches one, the connection ends
    /// or 5 s pass; acknowledges the server's SETTINGS on the way.
    async fn read_until(&mut self, last: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        // The server may close before reading everything.
        let _ = self.tls.write_all(&std::mem::take(&mut self.out)).await;
        let mut frames = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut head = [0u8; 9];
                if self.tls.read_exact(&mut head).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0u8; len];
                if self.tls.read_exact(&mut payload).await.is_err() {
                    return;
                }
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let frame = Frame { kind: head[3], flags: head[4], stream, payload };
                if frame.kind == SETTINGS && frame.flags & ACK == 0 {
                    let mut ack = Vec::new();
                    ack.extend_from_slice(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]);
                    let _ = self.tls.write_all(&ack).await;
                }
                let done = last(&frame);
                frames.push(frame);
                if done {
                    return;
                }
            }
        });
        read.await.unwrap_or_else(|_| panic!("no awaited frame within 5 s; got {frames:?}"));
        frames
    }

    /// The GOAWAY that closes the connection: its error code and debug data.
    async fn goaway(&mut self) -> (h2::Reason, Vec<u8>) {
        let frames = self.read_until(|f| f.kind == GOAWAY).await;
        let goaway = frames.last().filter(|f| f.kind == GOAWAY).unwrap_or_else(|| panic!("no GOAWAY in {frames:?}"));
        (error_code(&goaway.payload[4..8]), goaway.payload[8..].to_vec())
    }
}

fn error_code(bytes: &[u8]) -> h2::Reason {
    h2::Reason::from(u32::from_be_bytes(bytes.try_into().expect("four bytes")))
}

/// HPACK for `CONNECT target` plus `headers`, all literals without indexing.
fn connect_block(target: SocketAddr, headers: &[(&str, &str)]) -> Vec<u8> {
    // Indexed names: 2 is `:method`, 1 is `:authority`.
    let mut block = vec![0x02];
    block.extend(hpack_string(b"CONNECT"));
    block.push(0x01);
    block.extend(hpack_string(target.to_string().as_bytes()));
    for (name, value) in headers {
        block.extend(literal(name, value));
    }
    block
}

/// A literal header field without indexing, with a literal name.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut field = vec![0x00];
    field.extend(hpack_string(name.as_bytes()));
    field.extend(hpack_string(value.as_bytes()));
    field
}

/// An HPACK string literal (not Huffman-coded): its length as a 7-bit-prefix integer.
fn hpack_string(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
    out
}
