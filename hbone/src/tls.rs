//! TLS for HBONE: mutual TLS 1.3 with SPIFFE identities (ARCHITECTURE §5, §6).
//!
//! - [`Credentials`]: one workload's certificate chain and key, parsed and checked once.
//! - [`WorkloadCert`]: a swappable slot holding a workload's current credentials; rotating it
//!   affects new handshakes only, established connections keep their session.
//! - [`TrustStore`]: the swappable trust bundle (one or more roots, so a root can be rotated
//!   without an outage, and the trust domain they sign for). Verification reads the bundle at
//!   handshake time.
//! - The verifiers: a peer's chain must verify to the bundle and its single URI SAN must be a
//!   SPIFFE identity in the bundle's trust domain (or one of its aliases): a root vouches for
//!   the identities of its own trust domain only, so a certificate for
//!   `spiffe://other.domain/...` that the mesh's root happens to have signed is refused. A
//!   server must also prove one of the identities expected for the destination; a client's
//!   identity is then read for policy.
//!
//! Session resumption is disabled on both sides: a resumed session skips certificate
//! verification, and every HBONE connection must prove the peer's identity against the current
//! bundle and the identities expected *for this destination*.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS material: bad certificates, keys or bundles handed to us by an operator,
/// the CA or the controller.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate could not be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no SPIFFE URI SAN (found URI SANs: {found:?})")]
    NoSpiffeId { found: Vec<String> },
    #[error("certificate has {0} URI SANs; a SPIFFE certificate carries exactly one")]
    MultipleUris(usize),
    #[error("certificate URI SAN is not a valid SPIFFE identity: {0}")]
    BadSpiffeId(#[from] IdentityError),
    #[error("private key is not usable (expected an ECDSA P-256 key in PKCS#8): {0}")]
    BadKey(String),
    #[error("private key does not match the certificate: {0}")]
    KeyMismatch(String),
    #[error("trust bundle is empty; at least one root certificate is required")]
    EmptyBundle,
    #[error("PEM could not be parsed: {0}")]
    Pem(String),
    #[error("rotation for {current} got credentials for a different identity, {new}")]
    IdentityChanged { current: SpiffeId, new: SpiffeId },
    #[error("trust domain {domain:?} is not a valid SPIFFE trust domain: {why}")]
    BadTrustDomain { domain: String, why: &'static str },
}

/// Why a peer's certificate was refused. Carried inside rustls' error so that the side which
/// refused (and, for the client, the caller of `connect`) can tell *which* check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("peer certificate is not signed by a root in the trust bundle")]
    UntrustedRoot,
    #[error("peer certificate expired at {not_after:?} (now {now:?})")]
    Expired { not_after: SystemTime, now: SystemTime },
    #[error("peer certificate is not valid before {not_before:?} (now {now:?})")]
    NotYetValid { not_before: SystemTime, now: SystemTime },
    #[error("peer identity {got} is not one of the identities expected for this destination: {}", join(expected))]
    IdentityMismatch { got: SpiffeId, expected: Vec<SpiffeId> },
    #[error("peer certificate has no valid SPIFFE identity: {0}")]
    NoSpiffeId(String),
    #[error("peer certificate is not valid for {usage}: its extended key usage forbids it")]
    WrongUsage { usage: &'static str },
    #[error("peer certificate chain is invalid: {0}")]
    BadChain(String),
    #[error(
        "peer identity {identity} is in trust domain {:?}, but the bundle that verified it trusts {trust_domain:?}{}; \
         if {:?} is this mesh under another name, configure it as a trust domain alias",
        identity.trust_domain(),
        aliases_note(aliases),
        identity.trust_domain()
    )]
    ForeignTrustDomain { identity: SpiffeId, trust_domain: String, aliases: Vec<String> },
}

/// One workload's certificate chain (leaf first) and private key, checked to belong together.
#[derive(Clone)]
pub struct Credentials {
    identity: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    key: Arc<CertifiedKey>,
}

impl Credentials {
    /// Parses the leaf's SPIFFE identity and expiry and loads the key with the process' crypto
    /// provider. The key must be ECDSA P-256 (ARCHITECTURE §5).
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let info = LeafInfo::parse(leaf)?;
        let identity = info.spiffe_id()?;
        let signing_key = provider().key_provider.load_private_key(key).map_err(|e| TlsError::BadKey(e.to_string()))?;
        if signing_key.algorithm() != rustls::SignatureAlgorithm::ECDSA {
            return Err(TlsError::BadKey(format!("{:?} key", signing_key.algorithm())));
        }
        let key = CertifiedKey::new(chain, signing_key);
        key.keys_match().map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
        Ok(Credentials { identity, not_before: info.not_before, not_after: info.not_after, key: Arc::new(key) })
    }

    /// Parses PEM: a certificate chain (leaf first) and a PKCS#8 private key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(format!("certificate chain: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(format!("private key: {e}")))?;
        Credentials::new(chain, key)
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// When the leaf certificate became valid.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// When the leaf certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When to renew: half-way through the lifetime the certificate was issued with. Weft's
    /// CA backdates `notBefore` by [`crate::ca::BACKDATE`] against clock skew, which is not
    /// part of the lifetime: counting it would renew a 10-minute certificate after 2.5
    /// minutes, and one of 5 minutes or less at once.
    pub fn renew_at(&self) -> SystemTime {
        let issued = (self.not_before + crate::ca::BACKDATE).min(self.not_after);
        issued + self.not_after.duration_since(issued).unwrap_or_default() / 2
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The current credentials of one workload identity, swappable at run time.
///
/// A `WorkloadCert` serves both as the client certificate of outbound connections and as the
/// server certificate of inbound ones. [`WorkloadCert::rotate`] affects only handshakes that
/// start afterwards.
#[derive(Clone)]
pub struct WorkloadCert {
    identity: SpiffeId,
    current: Arc<ArcSwap<Credentials>>,
}

impl WorkloadCert {
    pub fn new(credentials: Credentials) -> Self {
        WorkloadCert { identity: credentials.identity.clone(), current: Arc::new(ArcSwap::from_pointee(credentials)) }
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    /// Installs renewed credentials. They must carry the same identity: a slot never changes
    /// whose identity it holds, because pool keys and policy are bound to it.
    pub fn rotate(&self, credentials: Credentials) -> Result<(), TlsError> {
        if credentials.identity != self.identity {
            return Err(TlsError::IdentityChanged { current: self.identity.clone(), new: credentials.identity });
        }
        self.current.store(Arc::new(credentials));
        Ok(())
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkloadCert({})", self.identity)
    }
}

impl ResolvesClientCert for WorkloadCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for WorkloadCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

/// A set of trusted roots, parsed, and the trust domain they sign for. Several roots may be
/// valid at once (rotation).
///
/// A root vouches only for identities of its bundle's trust domain: a peer whose chain
/// verifies but whose identity is in another domain is refused
/// ([`VerifyError::ForeignTrustDomain`]) unless that domain is one of the bundle's aliases
/// (another name of the same mesh, e.g. during a trust domain migration).
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    trust_domain: String,
    /// Other trust domains accepted as equivalent to `trust_domain`.
    aliases: Vec<String>,
}

impl TrustBundle {
    /// A bundle of `roots` for the default trust domain (`cluster.local`), without aliases.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::EmptyBundle);
        }
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::BadCertificate(format!("trust bundle root: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle { roots, anchors, trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(), aliases: Vec::new() })
    }

    /// Parses a PEM file holding one or more root certificates (default trust domain).
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(format!("trust bundle: {e}")))?;
        TrustBundle::new(roots)
    }

    /// The same roots for `trust_domain`: peers must prove identities of that domain.
    pub fn with_trust_domain(mut self, trust_domain: &str) -> Result<Self, TlsError> {
        check_trust_domain(trust_domain)?;
        self.trust_domain = trust_domain.to_owned();
        Ok(self)
    }

    /// The same roots, also accepting identities of `aliases` (replacing any set before).
    pub fn with_aliases<I, S>(mut self, aliases: I) -> Result<Self, TlsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Vec::new();
        for alias in aliases {
            let alias = alias.as_ref();
            check_trust_domain(alias)?;
            if alias != self.trust_domain && !list.iter().any(|a: &String| a == alias) {
                list.push(alias.to_owned());
            }
        }
        self.aliases = list;
        Ok(self)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The trust domain whose identities these roots vouch for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Other trust domains accepted as equivalent.
    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// Whether identities of trust domain `domain` are accepted from peers.
    pub fn accepts_domain(&self, domain: &str) -> bool {
        domain == self.trust_domain || self.aliases.iter().any(|a| a == domain)
    }

    /// Refuses `identity` unless its trust domain is this bundle's or an alias.
    fn admit(&self, identity: &SpiffeId) -> Result<(), VerifyError> {
        if self.accepts_domain(identity.trust_domain()) {
            return Ok(());
        }
        Err(VerifyError::ForeignTrustDomain {
            identity: identity.clone(),
            trust_domain: self.trust_domain.clone(),
            aliases: self.aliases.clone(),
        })
    }
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustBundle")
            .field("roots", &self.roots.len())
            .field("trust_domain", &self.trust_domain)
            .field("aliases", &self.aliases)
            .finish()
    }
}

/// A trust domain is checked with the identity parser's own rules, so that a configured
/// domain is one identities can have.
fn check_trust_domain(domain: &str) -> Result<(), TlsError> {
    SpiffeId::new(domain, "ns", "sa").map(|_| ()).map_err(|e| TlsError::BadTrustDomain {
        domain: domain.to_owned(),
        why: match e {
            IdentityError::TrustDomain { why, .. } => why,
            IdentityError::TooLong(_) => "it is too long for a SPIFFE identity",
            _ => "only lowercase letters, digits, '.', '-' and '_' are allowed",
        },
    })
}

/// The trust bundle in force, shared by every verifier and swappable at run time.
///
/// Each replacement bumps a generation number; the client pool uses it to stop opening new
/// streams on connections that were verified against an older bundle.
#[derive(Clone)]
pub struct TrustStore {
    inner: Arc<TrustInner>,
}

struct TrustInner {
    bundle: ArcSwap<TrustBundle>,
    generation: AtomicU64,
}

impl TrustStore {
    pub fn new(bundle: TrustBundle) -> Self {
        TrustStore {
            inner: Arc::new(TrustInner { bundle: ArcSwap::from_pointee(bundle), generation: AtomicU64::new(0) }),
        }
    }

    pub fn bundle(&self) -> Arc<TrustBundle> {
        self.inner.bundle.load_full()
    }

    /// Replaces the bundle. New handshakes verify against it; established connections stay up.
    pub fn replace(&self, bundle: TrustBundle) {
        self.inner.bundle.store(Arc::new(bundle));
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Verifies a peer against the current bundle: its chain for the given key usage, then
    /// its SPIFFE identity, which must be in the trust domain of that same bundle (read once,
    /// so a concurrent replacement cannot pair one bundle's roots with another's domain).
    fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        usage_name: &'static str,
    ) -> Result<SpiffeId, VerifyError> {
        let bundle = self.inner.bundle.load();
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| VerifyError::BadChain(e.to_string()))?;
        cert.verify_for_usage(algorithms().all, &bundle.anchors, intermediates, now, usage, None, None)
            .map_err(|e| classify_webpki(e, usage_name))?;
        let identity = peer_identity(Some(std::slice::from_ref(end_entity)))?;
        bundle.admit(&identity)?;
        Ok(identity)
    }
}

impl fmt::Debug for TrustStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bundle = self.bundle();
        write!(
            f,
            "TrustStore({} roots for {}, generation {})",
            bundle.roots.len(),
            bundle.trust_domain,
            self.generation()
        )
    }
}

/// Client TLS configuration for one connection: present `source`'s certificate, accept only a
/// server whose identity is in `expected`.
pub fn client_config(source: &WorkloadCert, trust: &TrustStore, expected: Arc<[SpiffeId]>) -> rustls::ClientConfig {
    let verifier = Arc::new(ServerVerifier { trust: trust.clone(), expected });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        // The provider is built in this module with TLS 1.3 suites; this cannot fail.
        .expect("TLS 1.3 is supported by the aws-lc-rs provider")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(source.clone()));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    config.enable_early_data = false;
    config
}

/// Server TLS configuration: present the certificate `certs` resolves, require a client
/// certificate with a SPIFFE identity that verifies to `trust`.
pub fn server_config(certs: Arc<dyn ResolvesServerCert>, trust: &TrustStore) -> rustls::ServerConfig {
    let verifier = Arc::new(ClientVerifier { trust: trust.clone() });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported by the aws-lc-rs provider")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    config
}

/// Reads the SPIFFE identity a peer proved during the handshake (its leaf's URI SAN).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, VerifyError> {
    let leaf = certs.and_then(|c| c.first()).ok_or_else(|| VerifyError::NoSpiffeId("no certificate".into()))?;
    LeafInfo::parse(leaf).and_then(|i| i.spiffe_id()).map_err(|e| VerifyError::NoSpiffeId(e.to_string()))
}

/// Finds why a certificate check failed inside an I/O or TLS error, if one did: our own
/// [`VerifyError`], or the standard rustls reason it was sent as (see `to_rustls`).
pub fn verify_error(err: &(dyn std::error::Error + 'static)) -> Option<VerifyError> {
    use rustls::CertificateError as C;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(v) = e.downcast_ref::<VerifyError>() {
            return Some(v.clone());
        }
        if let Some(rustls::Error::InvalidCertificate(cert)) = e.downcast_ref::<rustls::Error>() {
            return match cert {
                C::Other(other) => other.0.downcast_ref::<VerifyError>().cloned(),
                C::UnknownIssuer => Some(VerifyError::UntrustedRoot),
                C::ExpiredContext { time, not_after } => {
                    Some(VerifyError::Expired { not_after: unix_to_system(*not_after), now: unix_to_system(*time) })
                }
                C::NotValidYetContext { time, not_before } => Some(VerifyError::NotYetValid {
                    not_before: unix_to_system(*not_before),
                    now: unix_to_system(*time),
                }),
                C::InvalidPurpose => Some(VerifyError::WrongUsage { usage: "this connection" }),
                other => Some(VerifyError::BadChain(format!("{other:?}"))),
            };
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            cur = io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static));
            continue;
        }
        cur = e.source();
    }
    None
}

/// The crypto provider: aws-lc-rs, restricted to TLS 1.3 suites (ARCHITECTURE §11).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites.retain(|s| s.version() == &rustls::version::TLS13);
            // AES-128-GCM first: the fastest bulk cipher with AES-NI, and what peers expect.
            p.cipher_suites.sort_by_key(|s| match s.suite() {
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
                rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
                _ => 2,
            });
            Arc::new(p)
        })
        .clone()
}

fn algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGS: OnceLock<WebPkiSupportedAlgorithms> = OnceLock::new();
    ALGS.get_or_init(|| provider().signature_verification_algorithms)
}

/// Verifies HBONE servers: chain to the trust bundle, identity in its trust domain and in the
/// expected set.
#[derive(Debug)]
struct ServerVerifier {
    trust: TrustStore,
    expected: Arc<[SpiffeId]>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = self
            .trust
            .verify_peer(end_entity, intermediates, now, webpki::KeyUsage::server_auth(), "server authentication")
            .map_err(to_rustls)?;
        if !self.expected.contains(&got) {
            return Err(to_rustls(VerifyError::IdentityMismatch { got, expected: self.expected.to_vec() }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled, so rustls never asks for this.
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Verifies HBONE clients: a certificate is mandatory, it must chain to the trust bundle and
/// carry a SPIFFE identity of the bundle's trust domain (read again after the handshake with
/// [`peer_identity`]).
#[derive(Debug)]
struct ClientVerifier {
    trust: TrustStore,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify_peer(end_entity, intermediates, now, webpki::KeyUsage::client_auth(), "client authentication")
            .map_err(to_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Sends a refusal with the TLS alert that names it (so the peer's logs say "unknown CA" or
/// "certificate expired"); reasons TLS has no alert for travel typed in `Other`, which rustls
/// sends as `certificate_unknown` and hands back to the refusing side intact. A foreign trust
/// domain is one of those: `unknown_ca` would be false (the chain did verify to our root) and
/// `access_denied` (`ApplicationVerificationFailure`) carries no detail, so the refusing side
/// could no longer say which identity and which domains.
fn to_rustls(e: VerifyError) -> rustls::Error {
    use rustls::CertificateError as C;
    let system_to_unix = |t: SystemTime| UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default());
    rustls::Error::InvalidCertificate(match e {
        VerifyError::UntrustedRoot => C::UnknownIssuer,
        VerifyError::Expired { not_after, now } => {
            C::ExpiredContext { time: system_to_unix(now), not_after: system_to_unix(not_after) }
        }
        VerifyError::NotYetValid { not_before, now } => {
            C::NotValidYetContext { time: system_to_unix(now), not_before: system_to_unix(not_before) }
        }
        VerifyError::WrongUsage { .. } => C::InvalidPurpose,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    })
}

fn classify_webpki(e: webpki::Error, usage: &'static str) -> VerifyError {
    match e {
        // A signature that does not verify under a trusted root's key (for example another
        // CA with the same name) means the same to an operator: not signed by a trusted root.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => VerifyError::UntrustedRoot,
        webpki::Error::CertExpired { time, not_after } => {
            VerifyError::Expired { not_after: unix_to_system(not_after), now: unix_to_system(time) }
        }
        webpki::Error::CertNotValidYet { time, not_before } => {
            VerifyError::NotYetValid { not_before: unix_to_system(not_before), now: unix_to_system(time) }
        }
        #[allow(deprecated)]
        webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => {
            VerifyError::WrongUsage { usage }
        }
        other => VerifyError::BadChain(format!("{other:?}")),
    }
}

/// " (aliases: a, b)" for an error message, or nothing without aliases.
fn aliases_note(aliases: &[String]) -> String {
    if aliases.is_empty() { String::new() } else { format!(" (aliases: {})", aliases.join(", ")) }
}

fn join(ids: &[SpiffeId]) -> String {
    ids.iter().map(SpiffeId::as_str).collect::<Vec<_>>().join(", ")
}

fn unix_to_system(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

/// What we read from a leaf certificate: its URI SANs and expiry.
struct LeafInfo {
    uris: Vec<String>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl LeafInfo {
    fn parse(der: &CertificateDer<'_>) -> Result<Self, TlsError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        let mut uris = Vec::new();
        if let Some(san) = cert.subject_alternative_name().map_err(|e| TlsError::BadCertificate(e.to_string()))? {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push((*uri).to_owned());
                }
            }
        }
        let at = |t: x509_parser::time::ASN1Time| UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
        Ok(LeafInfo { uris, not_before: at(cert.validity().not_before), not_after: at(cert.validity().not_after) })
    }

    /// SPIFFE X.509-SVID: exactly one URI SAN, and it is the SPIFFE ID.
    fn spiffe_id(&self) -> Result<SpiffeId, TlsError> {
        match self.uris.as_slice() {
            [] => Err(TlsError::NoSpiffeId { found: vec![] }),
            [one] if !one.starts_with("spiffe://") => Err(TlsError::NoSpiffeId { found: self.uris.clone() }),
            [one] => Ok(one.parse()?),
            many => Err(TlsError::MultipleUris(many.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;

    #[test]
    fn renewal_is_half_way_through_the_issued_lifetime_not_the_backdate() {
        let root = Ca::new_root("renewal").expect("minting a root");
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("an identity");
        let creds = root.issue(&id, Duration::from_secs(20)).expect("a leaf");
        let now = SystemTime::now();
        let at = creds.renew_at().duration_since(now).unwrap_or_default();
        // Half of 20 s, give or take the whole seconds the certificate is encoded with.
        assert!(at >= Duration::from_secs(8) && at <= Duration::from_secs(11), "renew in {at:?}");
    }

    fn bundle() -> TrustBundle {
        let root = Ca::new_root("trust domain test root").expect("minting a root");
        TrustBundle::new(vec![root.cert().clone()]).expect("one root")
    }

    fn id(uri: &str) -> SpiffeId {
        uri.parse().expect("valid test identity")
    }

    #[test]
    fn bundle_trusts_its_own_trust_domain_only() {
        let b = bundle();
        assert_eq!(b.trust_domain(), "cluster.local", "existing constructors keep the default");
        assert!(b.admit(&id("spiffe://cluster.local/ns/a/sa/b")).is_ok());
        let err = b.admit(&id("spiffe://other.domain/ns/a/sa/b")).unwrap_err();
        assert_eq!(
            err,
            VerifyError::ForeignTrustDomain {
                identity: id("spiffe://other.domain/ns/a/sa/b"),
                trust_domain: "cluster.local".into(),
                aliases: vec![],
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("in trust domain \"other.domain\""), "{msg}");
        assert!(msg.contains("trusts \"cluster.local\";"), "{msg}");
        assert!(msg.contains("configure it as a trust domain alias"), "{msg}");
    }

    #[test]
    fn trust_domain_and_aliases_are_configurable_and_checked() {
        let b = bundle().with_trust_domain("example.org").unwrap().with_aliases(["old.example.org"]).unwrap();
        assert!(b.admit(&id("spiffe://example.org/ns/a/sa/b")).is_ok());
        assert!(b.admit(&id("spiffe://old.example.org/ns/a/sa/b")).is_ok(), "an alias is accepted");
        let err = b.admit(&id("spiffe://cluster.local/ns/a/sa/b")).unwrap_err();
        assert!(err.to_string().contains("(aliases: old.example.org)"), "{err}");
        // The domain itself and duplicates are not kept as aliases.
        let b = b.with_aliases(["example.org", "a.b", "a.b"]).unwrap();
        assert_eq!(b.aliases(), ["a.b"]);

        for bad in ["", "Example.org", "a.b:8080", "a/b"] {
            let err = bundle().with_trust_domain(bad).unwrap_err();
            assert!(matches!(&err, TlsError::BadTrustDomain { domain, .. } if domain == bad), "{bad:?}: {err}");
            assert!(bundle().with_aliases([bad]).is_err(), "alias {bad:?}");
        }
        let err = bundle().with_trust_domain("a.b:8080").unwrap_err();
        assert_eq!(
            err.to_string(),
            "trust domain \"a.b:8080\" is not a valid SPIFFE trust domain: a port is not allowed"
        );
    }

    #[test]
    fn foreign_trust_domain_travels_typed_in_the_rustls_error() {
        let err = VerifyError::ForeignTrustDomain {
            identity: id("spiffe://other.domain/ns/a/sa/b"),
            trust_domain: "cluster.local".into(),
            aliases: vec![],
        };
        let wrapped = to_rustls(err.clone());
        let alert: rustls::AlertDescription = match &wrapped {
            rustls::Error::InvalidCertificate(c) => c.clone().into(),
            other => panic!("{other:?}"),
        };
        assert_eq!(alert, rustls::AlertDescription::CertificateUnknown);
        assert_eq!(verify_error(&wrapped), Some(err), "the refusing side reads the reason back");
    }
}
