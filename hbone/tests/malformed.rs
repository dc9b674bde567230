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
async fn oversized_headers_are_refused() {
    let pki = Pki::new();
    let server = RunningServer::start(Config::default(), pki.workload("ns-b", "server"), &pki.trust, AllowAll).await;
    let echo = echo_server().await;
    let mut h2 = raw_h2(&pki, &server).await;
    let big = "x".repeat(Config::default().max_header_list_size as usize * 2);
    let req = Request::builder().method(Method::CONNECT).uri(echo.to_string()).header("baggage", big).body(()).unwrap();
    match status_of(&mut h2, req).await {
        Ok(status) => assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}"),
    }
    assert_eq!(server.server.stats().streams_accepted.load(Ordering::Relaxed), 0, "no tunnel was opened");
    assert_still_serves(&pki, &server, echo).await;
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
