//! Helpers shared by the hbone in-process tests: deterministic data streams and raw TLS
//! clients that can present certificates our own client would refuse to build.

#![allow(dead_code)]

use std::sync::Arc;

use hbone::testing::{AllowAll, Pki, RunningServer};
use hbone::tls::{self, WorkloadCert};
use hbone::{Client, Config};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The setup most tunnel tests share: an `AllowAll` server presenting `ns-b/server`, a
/// client, and the source identity `ns-a/client`, all from one test PKI.
pub struct Pair {
    pub pki: Pki,
    pub server_cert: WorkloadCert,
    pub server: RunningServer<AllowAll>,
    pub client: Client,
    pub source: WorkloadCert,
}

impl Pair {
    pub async fn start() -> Pair {
        let pki = Pki::new();
        let server_cert = pki.workload("ns-b", "server");
        let server = RunningServer::start(Config::default(), server_cert.clone(), &pki.trust, AllowAll).await;
        let client = Client::new(Config::default(), pki.trust.clone());
        let source = pki.workload("ns-a", "client");
        Pair { pki, server_cert, server, client, source }
    }
}

/// A reproducible byte stream (xorshift64*), so the receiver can check every byte.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `total` bytes of `Pattern::new(seed)` in 64 KiB chunks, then shuts down.
pub async fn write_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, total: usize) -> std::io::Result<()> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len());
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    w.shutdown().await
}

/// Reads until EOF, checking every byte against `Pattern::new(seed)` (the pattern is
/// regenerated in 64 KiB blocks, so reads of any size line up). Returns the byte count.
pub async fn verify_pattern<R: AsyncRead + Unpin>(r: &mut R, seed: u64) -> std::io::Result<u64> {
    const BLOCK: usize = 64 * 1024;
    let mut p = Pattern::new(seed);
    let mut expected = vec![0u8; BLOCK];
    p.fill(&mut expected);
    let mut pos = 0usize; // position inside `expected`
    let mut total = 0u64;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        let mut got = &buf[..n];
        while !got.is_empty() {
            let take = got.len().min(BLOCK - pos);
            if got[..take] != expected[pos..pos + take] {
                return Err(std::io::Error::other(format!("corrupted data near byte {}", total)));
            }
            got = &got[take..];
            pos += take;
            total += take as u64;
            if pos == BLOCK {
                p.fill(&mut expected);
                pos = 0;
            }
        }
    }
}

/// Accepts any server certificate: lets a test present client certificates that
/// `hbone::Client` would never build, and look at how the server reacts.
#[derive(Debug)]
pub struct AcceptAnyServer;

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        tls::provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A raw TLS 1.3 client config with ALPN h2 that presents `client` (or nothing).
pub fn raw_client_config(
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}
