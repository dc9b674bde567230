//! Writes the seed corpora, `corpus/<target>/seed-*`: a few valid inputs per target, made by
//! the real code where there is one (an HTTP/2 client's CONNECT exchanges with the HBONE
//! server, certificates and CSRs from hbone's test PKI, watch messages from the controller's
//! history). Run from `fuzz/` (README.md has the command).

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hbone::ca::new_csr;
use hbone::{Config, Server, drain, testing};
use http::{Method, Request};
use meshapi::Snapshot;
use meshapi::resource::{Key, Kind, Resource};
use meshapi::watch::{Change, History, Message, Start};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// ztunnel's local config file as `docs/ARCHITECTURE.md` (§7.10) shows it.
const LOCAL_CONFIG_DOC: &str = r#"trustDomain: cluster.local          # optional; the default
workloads:
  - {name: web-0, namespace: front, node: node-0, addresses: [10.244.1.2],
     serviceAccount: web, labels: {app: web}, enrolled: true, mtls: PERMISSIVE}
services:
  - {name: api, namespace: back, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}],
     selector: {app: api}}
authorizations:
  - {name: only-web, namespace: back, selector: {app: api}, action: ALLOW,
     rules: [{from: [{principals: ["spiffe://cluster.local/ns/front/sa/web"]}], ports: [8080]}]}
"#;

/// Every kind of the model, in block style, with the optional fields.
const LOCAL_CONFIG_FULL: &str = r#"trustDomain: mesh.example
workloads:
  - name: api-0
    uid: 7d0c
    namespace: shop
    node: node-1
    addresses: ["fd00::2", 10.244.2.2]
    serviceAccount: api
    labels:
      app: api
      version: v1
    enrolled: true
    mtls: STRICT
    waypoint: shop/wp
services:
  - name: api
    namespace: shop
    hostname: api.shop.svc.cluster.local
    vips: [10.96.0.10, "fd00:96::a"]
    ports:
      - {port: 80, targetPort: 8080, appProtocol: http}
      - {port: 443}
    selector: {app: api}
    waypoint: shop/wp
authorizations:
  - name: deny-some
    namespace: shop
    selector: {app: api}
    action: DENY
    rules:
      - from:
          - principals: ["*", "spiffe://mesh.example/ns/a/*", "*/sa/b"]
            namespaces: [x]
            ipBlocks: [10.0.0.0/8, 10.1.1.1, "fd00::/8"]
        ports: [8080]
  - {name: mesh, namespace: weft-system, action: ALLOW}
waypoints:
  - {name: wp, namespace: shop, addresses: [10.244.1.9], serviceAccount: wp}
httpRoutes:
  - name: canary
    namespace: shop
    parents: [shop/api]
    spec:
      rules:
        - backendRefs: [{name: api-v1, weight: 90}, {name: api-v2, weight: 10}]
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> io::Result<()> {
    let corpus = Path::new("corpus");
    hbone_server(&corpus.join("hbone_server")).await?;
    identities(corpus)?;
    config(corpus)?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let path = dir.join(format!("seed-{name}"));
    fs::write(&path, bytes)?;
    println!("{} ({} bytes)", path.display(), bytes.len());
    Ok(())
}

/// Real HTTP/2 exchanges with the HBONE server (no TLS), to a real echo on loopback: the
/// client's bytes, without the preface (the target adds it).
async fn hbone_server(dir: &Path) -> io::Result<()> {
    let echo = testing::echo_server().await;
    let closed = SocketAddr::from((Ipv4Addr::LOCALHOST, 80));
    let connect = |target: SocketAddr| Request::builder().method(Method::CONNECT).uri(target.to_string());

    // CONNECT with every header of the wire contract, bytes both ways, half-closes.
    let bytes = record(|mut client| async move {
        let request = connect(echo)
            .header("forwarded", "for=10.244.1.2")
            .header("baggage", "k8s.namespace.name=front,k8s.pod.name=web-0")
            .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .body(())
            .ok()?;
        let (answer, mut send) = client.send_request(request, false).ok()?;
        let mut recv = answer.await.ok()?.into_body();
        send.send_data(Bytes::from_static(b"hello through HBONE"), true).ok()?;
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.ok()?;
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        Some(())
    })
    .await;
    write(dir, "connect-echo", &bytes)?;

    // Two tunnels on one connection, one reset by the client; a target that cannot be dialed.
    let bytes = record(|mut client| async move {
        let (first, mut one) = client.send_request(connect(echo).body(()).ok()?, false).ok()?;
        let (second, mut two) = client.send_request(connect(echo).body(()).ok()?, false).ok()?;
        let (refused, _) = client.send_request(connect(closed).body(()).ok()?, true).ok()?;
        let mut first = first.await.ok()?.into_body();
        let _ = second.await.ok()?;
        let _ = refused.await;
        two.send_reset(h2::Reason::CANCEL);
        one.send_data(Bytes::from_static(b"ping"), true).ok()?;
        while let Some(chunk) = first.data().await {
            chunk.ok()?;
        }
        Some(())
    })
    .await;
    write(dir, "two-tunnels-reset", &bytes)?;

    // An IPv6 target and a bracketed IPv6 claim with a port.
    let bytes = record(|mut client| async move {
        let target: SocketAddr = "[::1]:8080".parse().ok()?;
        let request = connect(target).header("forwarded", "for=\"[2001:db8::1]:443\";proto=https").body(()).ok()?;
        let (answer, _) = client.send_request(request, true).ok()?;
        let _ = answer.await;
        Some(())
    })
    .await;
    write(dir, "connect-ipv6", &bytes)?;

    // Requests the server answers 400: a claim it cannot read, and not a CONNECT.
    let bytes = record(|mut client| async move {
        let bad = connect(echo).header("forwarded", "for=\"[2001:db8::1\"").body(()).ok()?;
        let (bad, _) = client.send_request(bad, true).ok()?;
        let get = Request::builder().method(Method::GET).uri("https://api.shop/healthz").body(()).ok()?;
        let (get, _) = client.send_request(get, true).ok()?;
        let _ = bad.await;
        let _ = get.await;
        Some(())
    })
    .await;
    write(dir, "refused-requests", &bytes)?;

    // The same CONNECT written by hand, its header block without Huffman coding, so that the
    // fuzzer mutates readable names and values.
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "CONNECT"),
        (":authority", "127.0.0.1:8080"),
        ("forwarded", "for=\"[2001:db8::1]:80\""),
        ("baggage", "k8s.pod.name=web-0"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ] {
        // A literal field without indexing, with a literal name (RFC 7541 §6.2.2); every
        // string here is shorter than 127 bytes, so its length is one byte.
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut bytes = frame(0x4, 0, 0, &[]); // SETTINGS
    bytes.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    bytes.extend(frame(0x0, 0x1, 1, b"hello")); // DATA, END_STREAM
    write(dir, "connect-plain", &bytes)?;
    Ok(())
}

/// An HTTP/2 frame (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a small payload").to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Runs `exchange` as an HTTP/2 client of an HBONE server (TLS done) and returns what the
/// client wrote after the preface.
async fn record<F, Fut>(exchange: F) -> Vec<u8>
where
    F: FnOnce(h2::client::SendRequest<Bytes>) -> Fut,
    Fut: Future<Output = Option<()>>,
{
    const PREFACE_LEN: usize = 24;
    let pki = testing::Pki::new();
    let server =
        Server::new(Config::default(), Arc::new(pki.workload("fuzz", "server")), &pki.trust, testing::AllowAll);
    let (client_side, server_side) = tokio::io::duplex(64 * 1024);
    let (_trigger, watch) = drain::channel();
    let peer = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 1), 40000));
    let local = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 15008));
    let identity = testing::id("fuzz", "client");
    let serving =
        tokio::spawn(async move { server.serve_established(server_side, identity, peer, local, watch).await });
    let written = Arc::new(Mutex::new(Vec::new()));
    let tap = Tap { inner: client_side, written: written.clone() };
    let (client, connection) = h2::client::handshake(tap).await.expect("HTTP/2 handshake with the server");
    let driving = tokio::spawn(connection);
    let done = tokio::time::timeout(Duration::from_secs(5), exchange(client)).await;
    assert!(matches!(done, Ok(Some(()))), "the exchange with the server failed");
    // Let the last frames (acknowledgements, window updates) out, then close.
    tokio::time::sleep(Duration::from_millis(50)).await;
    driving.abort();
    serving.abort();
    let bytes = written.lock().expect("the tap's lock").clone();
    bytes[PREFACE_LEN..].to_vec()
}

/// A stream that keeps a copy of everything written to it.
struct Tap {
    inner: DuplexStream,
    written: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Tap {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tap {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.written.lock().expect("the tap's lock").extend_from_slice(&buf[..n]);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// SPIFFE IDs, `forwarded` values, certificates and CSRs from hbone's test PKI.
fn identities(corpus: &Path) -> io::Result<()> {
    let dir = corpus.join("spiffe_id");
    write(&dir, "default", b"spiffe://cluster.local/ns/default/sa/default")?;
    write(&dir, "dotted", b"spiffe://mesh.example-1.io/ns/shop.v2/sa/web_api-0")?;

    let dir = corpus.join("forwarded");
    write(&dir, "ipv4", b"for=10.244.1.2")?;
    write(&dir, "quoted-port", b"For=\"10.0.0.1:443\";proto=https")?;
    write(&dir, "ipv6", b"for=\"[2001:db8::1]:80\", for=192.0.2.43")?;
    write(&dir, "obfuscated", b"proto=https;for=_hidden:_port;by=unknown")?;

    let pki = testing::Pki::new();
    let leaf = pki.workload("shop", "web").current();
    let dir = corpus.join("peer_certificate");
    write(&dir, "workload-leaf", &leaf.chain()[0])?;
    write(&dir, "root", pki.root.cert())?;
    let intermediate = pki.root.intermediate("weft test intermediate").expect("an intermediate CA");
    write(&dir, "intermediate", intermediate.cert())?;

    let dir = corpus.join("csr");
    let (pem, _key) = new_csr(&testing::id("shop", "web")).expect("a CSR");
    write(&dir, "pem", pem.as_bytes())?;
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).expect("the CSR's DER");
    write(&dir, "der", der.as_ref())?;
    Ok(())
}

/// The local config file, and a watch stream as the controller's history writes it.
fn config(corpus: &Path) -> io::Result<()> {
    let dir = corpus.join("local_config");
    write(&dir, "architecture-example.yaml", LOCAL_CONFIG_DOC.as_bytes())?;
    write(&dir, "every-kind.yaml", LOCAL_CONFIG_FULL.as_bytes())?;

    let snapshot = Snapshot::from_yaml(LOCAL_CONFIG_FULL).expect("the full example is valid");
    let mut history = History::new("6f1c0e2a", 1 << 20);
    let pki = testing::Pki::new();
    let bundle = meshapi::TrustBundle {
        trust_domain: "mesh.example".into(),
        roots: vec![hbone::ca::certificate_pem(pki.root.cert())],
    };
    let mut changes: Vec<Change> = snapshot.resources().map(Change::Upsert).collect();
    changes.push(Change::Upsert(Resource::TrustBundle(bundle)));
    history.commit(changes).expect("a first version");
    let Start::Snapshot(snapshot_line) = history.start(None) else { unreachable!("no cursor: a snapshot") };
    let mut api = snapshot.workloads[0].clone();
    api.labels.insert("track".into(), "canary".into());
    let upsert = history.commit([Change::Upsert(Resource::Workload(api))]).expect("a delta");
    let delete = history.commit([Change::Delete(Key::new(Kind::Waypoint, "shop/wp"))]).expect("a delta");
    let heartbeat = Message::heartbeat_line(history.epoch(), history.version());
    let stream = [snapshot_line.as_str(), &upsert.line, &delete.line, &heartbeat].concat();
    let dir = corpus.join("watch_stream");
    write(&dir, "snapshot-deltas-heartbeat", stream.as_bytes())?;
    let resumed = format!("{{\"type\":\"resumed\",\"epoch\":\"6f1c0e2a\",\"version\":2}}\n{}", delete.line);
    write(&dir, "resumed", resumed.as_bytes())?;
    Ok(())
}
