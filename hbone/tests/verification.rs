//! In-process tests of the mutual-TLS checks: who each side refuses, and why (including peers
//! of another trust domain); and trust bundle and certificate rotation without dropping
//! established tunnels.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::{Pair, raw_client_config};
use hbone::ca::{Ca, LeafSpec};
use hbone::server::{HandshakeError, accept_tls};
use hbone::testing::{AllowAll, Pki, PolicyHandler, RunningServer, echo_server, id, request};
use hbone::tls::{self, VerifyError};
use hbone::{Client, Config, Credentials, SpiffeId, TrustBundle, TrustStore, WorkloadCert};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const HOUR: Duration = Duration::from_secs(3600);

async fn echo_roundtrip(t: &mut hbone::Tunnel, msg: &[u8]) {
    t.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut back)).await.expect("echo answers").unwrap();
    assert_eq!(back, msg);
}

#[tokio::test]
async fn client_refuses_server_with_unexpected_identity() {
    let pki = Pki::new();
    let server_cert = pki.workload("ns-b", "impostor");
    let server = RunningServer::start(Config::default(), server_cert, &pki.trust, AllowAll).await;
    let client = Client::new(Config::default(), pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    let expected = id("ns-b", "server");
    let err = client.connect(request(&source, server.addr, &expected, echo_server().await)).await.unwrap_err();
    match err.verify_error() {
        Some(VerifyError::IdentityMismatch { got, expected: want }) => {
            assert_eq!(got, id("ns-b", "impostor"));
            assert_eq!(want, vec![expected]);
        }
        other => panic!("want IdentityMismatch, got {other:?} from {err}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("peer identity spiffe://cluster.local/ns/ns-b/sa/impostor is not one of"), "{msg}");
}

#[tokio::test]
async fn client_refuses_expired_server_certificate() {
    let pki = Pki::new();
    let server_id = id("ns-b", "server");
    let mut spec = LeafSpec::for_identity(&server_id, HOUR);
    spec.not_before = SystemTime::now() - 2 * HOUR;
    spec.not_after = SystemTime::now() - HOUR;
    let (chain, key) = pki.root.issue_raw(&spec).unwrap();
    let expired = WorkloadCert::new(Credentials::new(chain, key).unwrap());
    let server = RunningServer::start(Config::default(), expired, &pki.trust, AllowAll).await;
    let client = Client::new(Config::default(), pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    let err = client.connect(request(&source, server.addr, &server_id, echo_server().await)).await.unwrap_err();
    assert!(matches!(err.verify_error(), Some(VerifyError::Expired { .. })), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test]
async fn client_refuses_server_from_untrusted_root() {
    let pki = Pki::new();
    let other = Pki::new();
    let server_cert = other.workload("ns-b", "server");
    let server = RunningServer::start(Config::default(), server_cert.clone(), &other.trust, AllowAll).await;
    let client = Client::new(Config::default(), pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    let err =
        client.connect(request(&source, server.addr, server_cert.identity(), echo_server().await)).await.unwrap_err();
    assert_eq!(err.verify_error(), Some(VerifyError::UntrustedRoot), "{err}");
    assert!(err.to_string().contains("not signed by a root in the trust bundle"), "{err}");
}

#[tokio::test]
async fn intermediate_chains_verify() {
    let pki = Pki::new();
    let inter = pki.root.intermediate("node CA").unwrap();
    let server_cert = WorkloadCert::new(inter.issue(&id("ns-b", "server"), HOUR).unwrap());
    let source = WorkloadCert::new(inter.issue(&id("ns-a", "client"), HOUR).unwrap());
    let server = RunningServer::start(Config::default(), server_cert.clone(), &pki.trust, AllowAll).await;
    let client = Client::new(Config::default(), pki.trust.clone());
    let mut t =
        client.connect(request(&source, server.addr, server_cert.identity(), echo_server().await)).await.unwrap();
    echo_roundtrip(&mut t, b"via intermediate").await;
}

type RawCert = (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>);

/// Runs one raw TLS client against `accept_tls` and returns the server's verdict.
async fn server_verdict(pki: &Pki, client: Option<RawCert>) -> Result<hbone::SpiffeId, HandshakeError> {
    server_verdict_with(pki, &pki.trust, client).await
}

/// [`server_verdict`] with a server that trusts `trust` (its own certificate from `pki`).
async fn server_verdict_with(
    pki: &Pki,
    trust: &TrustStore,
    client: Option<RawCert>,
) -> Result<hbone::SpiffeId, HandshakeError> {
    let server_cert = pki.workload("ns-b", "server");
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(Arc::new(server_cert), trust)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connector = TlsConnector::from(raw_client_config(client));
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await?;
        // TLS 1.3: the client learns of a refusal only when it reads the server's alert.
        let mut buf = [0u8; 1];
        let _ = tls.read(&mut buf).await;
        Ok::<_, std::io::Error>(())
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let verdict = accept_tls(&acceptor, tcp, Duration::from_secs(5)).await.map(|(_, id)| id);
    drop(client);
    verdict
}

#[tokio::test]
async fn server_refuses_client_without_certificate() {
    let pki = Pki::new();
    let err = server_verdict(&pki, None).await.unwrap_err();
    assert!(matches!(err, HandshakeError::NoCertificate { .. }), "{err}");
    assert!(err.to_string().contains("presented no certificate"), "{err}");
}

#[tokio::test]
async fn server_refuses_untrusted_client() {
    let pki = Pki::new();
    let other = Pki::new();
    let (chain, key) = other.root.issue_raw(&LeafSpec::for_identity(&id("ns-a", "client"), HOUR)).unwrap();
    let err = server_verdict(&pki, Some((chain, key))).await.unwrap_err();
    match &err {
        HandshakeError::Refused { reason: VerifyError::UntrustedRoot, .. } => {}
        other => panic!("want Refused(UntrustedRoot), got {other}"),
    }
}

#[tokio::test]
async fn server_refuses_client_without_spiffe_san() {
    let pki = Pki::new();
    let now = SystemTime::now();
    let spec = LeafSpec {
        uri_sans: vec![],
        dns_sans: vec!["client.example.com".into()],
        not_before: now - HOUR,
        not_after: now + HOUR,
        client_auth: true,
        server_auth: true,
    };
    let err = server_verdict(&pki, Some(pki.root.issue_raw(&spec).unwrap())).await.unwrap_err();
    assert!(matches!(err, HandshakeError::Refused { reason: VerifyError::NoSpiffeId(_), .. }), "{err}");

    let spec = LeafSpec { uri_sans: vec!["https://example.com/not-spiffe".into()], dns_sans: vec![], ..spec };
    let err = server_verdict(&pki, Some(pki.root.issue_raw(&spec).unwrap())).await.unwrap_err();
    assert!(matches!(err, HandshakeError::Refused { reason: VerifyError::NoSpiffeId(_), .. }), "{err}");
    assert!(err.to_string().contains("no valid SPIFFE identity"), "{err}");
}

#[tokio::test]
async fn server_accepts_valid_client_and_reads_its_identity() {
    let pki = Pki::new();
    let (chain, key) = pki.root.issue_raw(&LeafSpec::for_identity(&id("ns-a", "client"), HOUR)).unwrap();
    assert_eq!(server_verdict(&pki, Some((chain, key))).await.unwrap(), id("ns-a", "client"));
}

/// `spiffe://other.domain/ns/<ns>/sa/<sa>`.
fn foreign(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("other.domain", ns, sa).unwrap()
}

/// A certificate for `identity` signed by the mesh's own root: only the trust domain is wrong.
fn signed_by_our_root(pki: &Pki, identity: &SpiffeId) -> WorkloadCert {
    let (chain, key) = pki.root.issue_raw(&LeafSpec::for_identity(identity, HOUR)).unwrap();
    WorkloadCert::new(Credentials::new(chain, key).unwrap())
}

/// The test PKI's root, trusting `other.domain` as an alias of `cluster.local`.
fn aliased(pki: &Pki) -> TrustStore {
    let bundle = TrustBundle::new(vec![pki.root.cert().clone()]).unwrap().with_aliases(["other.domain"]).unwrap();
    TrustStore::new(bundle)
}

#[tokio::test]
async fn client_refuses_server_from_another_trust_domain() {
    let pki = Pki::new();
    let server_id = foreign("ns-b", "server");
    let server_cert = signed_by_our_root(&pki, &server_id);
    let server = RunningServer::start(Config::default(), server_cert, &aliased(&pki), AllowAll).await;
    let client = Client::new(Config::default(), pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    // Even asked for by name: the root vouches for cluster.local only.
    let err = client.connect(request(&source, server.addr, &server_id, echo_server().await)).await.unwrap_err();
    assert_eq!(
        err.verify_error(),
        Some(VerifyError::ForeignTrustDomain {
            identity: server_id.clone(),
            trust_domain: "cluster.local".into(),
            aliases: vec![],
        }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("peer identity spiffe://other.domain/ns/ns-b/sa/server is in trust domain \"other.domain\""),
        "{msg}"
    );
    assert!(msg.contains("trusts \"cluster.local\""), "{msg}");
}

#[tokio::test]
async fn server_refuses_client_from_another_trust_domain() {
    let pki = Pki::new();
    let client_id = foreign("ns-a", "client");
    let (chain, key) = pki.root.issue_raw(&LeafSpec::for_identity(&client_id, HOUR)).unwrap();
    let err = server_verdict(&pki, Some((chain, key))).await.unwrap_err();
    match &err {
        HandshakeError::Refused { reason: VerifyError::ForeignTrustDomain { identity, trust_domain, .. }, .. } => {
            assert_eq!((identity, trust_domain.as_str()), (&client_id, "cluster.local"));
        }
        other => panic!("want Refused(ForeignTrustDomain), got {other}"),
    }
    assert!(err.to_string().contains("is in trust domain \"other.domain\""), "{err}");

    // Through the real client: it reads the alert, and the server counts the refusal.
    let server_cert = pki.workload("ns-b", "server");
    let server = RunningServer::start(Config::default(), server_cert.clone(), &pki.trust, AllowAll).await;
    let client = Client::new(Config::default(), aliased(&pki));
    let stranger = signed_by_our_root(&pki, &client_id);
    let err = client.connect(request(&stranger, server.addr, server_cert.identity(), echo_server().await)).await;
    let err = err.unwrap_err();
    assert_eq!(err.peer_alert(), Some(rustls::AlertDescription::CertificateUnknown), "{err:?}");
    assert_eq!(server.server.stats().handshake_failures.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn aliased_trust_domain_is_accepted_both_ways() {
    let pki = Pki::new();
    let trust = aliased(&pki);
    // The client's identity reaches the server's policy as proved.
    let (chain, key) = pki.root.issue_raw(&LeafSpec::for_identity(&foreign("ns-a", "client"), HOUR)).unwrap();
    assert_eq!(server_verdict_with(&pki, &trust, Some((chain, key))).await.unwrap(), foreign("ns-a", "client"));

    // A whole tunnel between two peers of the alias domain, each side trusting the alias.
    let server_id = foreign("ns-b", "server");
    let seen = Arc::new(std::sync::Mutex::new(None));
    let record = seen.clone();
    let policy = PolicyHandler(move |r: &hbone::InboundRequest| {
        *record.lock().unwrap() = Some(r.peer_identity.clone());
        Ok(())
    });
    let server = RunningServer::start(Config::default(), signed_by_our_root(&pki, &server_id), &trust, policy).await;
    let client = Client::new(Config::default(), trust.clone());
    let source = signed_by_our_root(&pki, &foreign("ns-a", "client"));
    let mut t = client.connect(request(&source, server.addr, &server_id, echo_server().await)).await.unwrap();
    echo_roundtrip(&mut t, b"aliased").await;
    assert_eq!(t.peer_identity(), &server_id);
    assert_eq!(seen.lock().unwrap().clone(), Some(foreign("ns-a", "client")));

    // The alias does not open the door to every domain.
    let third = SpiffeId::new("third.domain", "ns-a", "client").unwrap();
    let (chain, key) = pki.root.issue_raw(&LeafSpec::for_identity(&third, HOUR)).unwrap();
    let err = server_verdict_with(&pki, &trust, Some((chain, key))).await.unwrap_err();
    assert!(
        matches!(&err, HandshakeError::Refused { reason: VerifyError::ForeignTrustDomain { aliases, .. }, .. } if aliases == &["other.domain"]),
        "{err}"
    );
}

#[tokio::test]
async fn refused_client_is_counted_and_server_keeps_serving() {
    let pki = Pki::new();
    let other = Pki::new();
    let server_cert = pki.workload("ns-b", "server");
    let server = RunningServer::start(Config::default(), server_cert.clone(), &pki.trust, AllowAll).await;
    let echo = echo_server().await;

    // A client whose certificate the server does not trust (it trusts the server, though).
    let both = TrustStore::new(TrustBundle::new(vec![pki.root.cert().clone(), other.root.cert().clone()]).unwrap());
    let untrusted = Client::new(Config::default(), both);
    let stranger = other.workload("ns-x", "stranger");
    let err = untrusted.connect(request(&stranger, server.addr, server_cert.identity(), echo)).await.unwrap_err();
    assert_eq!(err.peer_alert(), Some(rustls::AlertDescription::UnknownCA), "{err:?}");

    let client = Client::new(Config::default(), pki.trust.clone());
    let source = pki.workload("ns-a", "client");
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    echo_roundtrip(&mut t, b"still serving").await;
    assert_eq!(server.server.stats().handshake_failures.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_rotation_keeps_established_tunnels() {
    let old = Ca::new_root("old root").unwrap();
    let new = Ca::new_root("new root").unwrap();
    let bundle = |roots: &[&Ca]| TrustBundle::new(roots.iter().map(|r| r.cert().clone()).collect()).unwrap();
    // Client and server have their own stores, as two nodes would.
    let client_trust = TrustStore::new(bundle(&[&old, &new]));
    let server_trust = TrustStore::new(bundle(&[&old, &new]));

    let server_id = id("ns-b", "server");
    let server_cert = WorkloadCert::new(old.issue(&server_id, HOUR).unwrap());
    let server = RunningServer::start(Config::default(), server_cert.clone(), &server_trust, AllowAll).await;
    let echo = echo_server().await;
    let client = Client::new(Config::default(), client_trust.clone());

    // With both roots, a peer signed by either is accepted.
    let from_old = WorkloadCert::new(old.issue(&id("ns-a", "old-client"), HOUR).unwrap());
    let from_new = WorkloadCert::new(new.issue(&id("ns-a", "new-client"), HOUR).unwrap());
    let mut established = client.connect(request(&from_old, server.addr, &server_id, echo)).await.unwrap();
    echo_roundtrip(&mut established, b"old root").await;
    let mut t = client.connect(request(&from_new, server.addr, &server_id, echo)).await.unwrap();
    echo_roundtrip(&mut t, b"new root").await;
    drop(t);

    // Remove the old root everywhere.
    client_trust.replace(bundle(&[&new]));
    server_trust.replace(bundle(&[&new]));

    // New handshakes with the old root fail: the server's certificate is from the old root...
    let err = client.connect(request(&from_new, server.addr, &server_id, echo)).await.unwrap_err();
    assert_eq!(err.verify_error(), Some(VerifyError::UntrustedRoot), "{err}");
    // ...and a client certificate from the old root is refused by the server (after the
    // server's own certificate is renewed from the new root).
    server_cert.rotate(new.issue(&server_id, HOUR).unwrap()).unwrap();
    let err = client.connect(request(&from_old, server.addr, &server_id, echo)).await.unwrap_err();
    assert_eq!(err.peer_alert(), Some(rustls::AlertDescription::UnknownCA), "{err:?}");
    // A peer from the new root works end to end.
    let mut t = client.connect(request(&from_new, server.addr, &server_id, echo)).await.unwrap();
    echo_roundtrip(&mut t, b"after rotation").await;

    // The tunnel established under the old root still flows.
    echo_roundtrip(&mut established, b"old tunnel survives").await;
    established.shutdown().await.unwrap();
    let mut rest = Vec::new();
    established.read_to_end(&mut rest).await.unwrap();
}

#[tokio::test]
async fn certificate_rotation_keeps_identity_and_tunnels() {
    let Pair { pki, server_cert, server, client, source } = Pair::start().await;
    let echo = echo_server().await;
    let mut t = client.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    let before = server_cert.current().not_after();

    std::thread::sleep(Duration::from_millis(1100)); // so the renewed certificate differs
    server_cert.rotate(pki.root.issue(server_cert.identity(), 2 * HOUR).unwrap()).unwrap();
    assert!(server_cert.current().not_after() > before);
    echo_roundtrip(&mut t, b"survives renewal").await;

    // A slot never changes identity.
    let err = server_cert.rotate(pki.root.issue(&id("ns-b", "someone-else"), HOUR).unwrap()).unwrap_err();
    assert!(err.to_string().contains("different identity"), "{err}");

    // A fresh client handshakes with the renewed certificate.
    let fresh = Client::new(Config::default(), pki.trust.clone());
    let mut t2 = fresh.connect(request(&source, server.addr, server_cert.identity(), echo)).await.unwrap();
    echo_roundtrip(&mut t2, b"renewed").await;
}
