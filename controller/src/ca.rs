//! The controller's certificate authority: the mesh's one signer of workload certificates, and
//! the keeper of the trust bundle every proxy verifies peers against.
//!
//! ```text
//!  signing CA ── generated at first start, persisted in the state directory (never regenerated)
//!       │     └─ or plugged in by the operator: certificate + key (+ chain up to the root)
//!       ▼
//!  trust bundle = [signing root] + extra roots file (during a rotation)
//!       │
//!  sign(csr, ttl): same trust domain only; ttl raised to the floor, lowered to the maximum
//! ```
//!
//! **Never silently regenerated.** A new root invalidates every certificate and bundle in the
//! mesh at once, so a state directory that holds a root certificate without its key (or a key
//! without its certificate, or files that do not parse or do not belong together) fails start-up
//! with an error naming the files, instead of minting a new root over them.
//!
//! **Rotation without an outage**, with plugged-in files: (1) add the new root to the extra
//! roots file and wait until every proxy has the new bundle; (2) replace the signing
//! certificate and key with the new CA's and wait one certificate lifetime, so every workload
//! holds a certificate of the new chain; (3) remove the old root from the extra roots file.
//! [`Authority::reload`] picks each step up from the files without a restart. A generated root
//! never changes; to rotate away from it, plug in the new CA with the generated root among the
//! extra roots.
//!
//! The state directory holds `root-cert.pem` (0644: it is public) and `root-key.pem` (0600),
//! written once each, atomically. `root-cert.pem` is what `curl --cacert` needs to talk to the
//! controller's API.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hbone::SpiffeId;
use hbone::ca::{Ca, CaError, Csr, LeafSpec, certificate_pem};
use hbone::tls::{Credentials, TlsError, TrustBundle};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tracing::{info, warn};

/// Lifetime of a workload certificate when the request names none: 24 hours. Short enough that
/// a leaked key or a node that lost an identity (its pod moved away) holds a usable certificate
/// for at most a day without any revocation machinery; long enough that renewal at half-life
/// leaves twelve hours to ride out a controller outage.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Longest lifetime signed, whatever the request asks: 7 days. Certificates cannot be revoked
/// (the mesh has no CRL or OCSP), so this is the longest a leaked key or a withdrawn identity
/// can stay usable; an operator may trade some of it for a longer tolerance of controller
/// outages, up to this cap.
pub const DEFAULT_MAX_CERT_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Shortest lifetime signed: 10 minutes; a shorter request is raised to it. Certificates are
/// renewed at half-life, so this bounds each identity's renewals to one per five minutes (CA
/// load), and keeps the lifetime well above the 5-minute backdate that absorbs clock skew.
pub const DEFAULT_MIN_CERT_TTL: Duration = Duration::from_secs(10 * 60);

/// The controller's own identity, for its API's server certificate:
/// `spiffe://<trust domain>/ns/weft-system/sa/weft-controller`.
pub const CONTROLLER_NAMESPACE: &str = "weft-system";
pub const CONTROLLER_SERVICE_ACCOUNT: &str = "weft-controller";

/// A generated root's certificate in the state directory.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// A generated root's private key in the state directory (mode 0600).
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Where the signing CA comes from.
#[derive(Debug, Clone)]
pub enum RootSource {
    /// A root generated at first start and persisted in `state_dir` ([`ROOT_CERT_FILE`],
    /// [`ROOT_KEY_FILE`]); loaded from there on every later start.
    Generated { state_dir: PathBuf },
    /// A CA plugged in by the operator: its certificate and PKCS#8 key (PEM), and, when the
    /// certificate is an intermediate, `chain`: the certificates above it, its issuer first,
    /// ending with the self-signed root. Re-read by [`Authority::reload`].
    Files { cert: PathBuf, key: PathBuf, chain: Option<PathBuf> },
}

/// Everything [`Authority::open`] needs. [`AuthorityConfig::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct AuthorityConfig {
    /// The only trust domain this CA signs identities of.
    pub trust_domain: String,
    pub root: RootSource,
    /// A PEM file of further roots to put in the trust bundle beside the signing root (for a
    /// rotation); empty means none. Re-read by [`Authority::reload`].
    pub extra_roots: Option<PathBuf>,
    /// See [`DEFAULT_CERT_TTL`]; must lie within `min_cert_ttl..=max_cert_ttl`.
    pub cert_ttl: Duration,
    /// See [`DEFAULT_MAX_CERT_TTL`].
    pub max_cert_ttl: Duration,
    /// See [`DEFAULT_MIN_CERT_TTL`].
    pub min_cert_ttl: Duration,
}

/// Why the authority could not start, or could not take up changed files (then it keeps
/// signing with what it had).
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("trust domain {value:?} is not valid: {why}")]
    TrustDomain { value: String, why: String },
    #[error("{setting} is {value:?}: {why}")]
    Setting { setting: &'static str, value: Duration, why: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "{} exists but its private key {} does not; refusing to generate a new root, which would \
         invalidate every certificate and trust bundle in the mesh. Restore the key, or delete \
         the certificate too to start a new trust chain",
        cert.display(), key.display()
    )]
    RootKeyMissing { cert: PathBuf, key: PathBuf },
    #[error(
        "{} exists but its certificate {} does not (was a first start interrupted?); refusing to \
         generate a new root. Restore the certificate, or, if no proxy ever trusted this root, \
         delete the key to start a new trust chain",
        key.display(), cert.display()
    )]
    RootCertMissing { cert: PathBuf, key: PathBuf },
    #[error("the CA in {} and {} cannot be used: {source}", cert.display(), key.display())]
    BadCa { cert: PathBuf, key: PathBuf, source: Box<CaError> },
    #[error(
        "the CA certificate {} is not a self-signed root, so the trust bundle would not know its \
         root; give the certificates above it, ending with the root, as its chain file",
        cert.display()
    )]
    RootUnknown { cert: PathBuf },
    #[error("the extra roots file {}: {why}", path.display())]
    ExtraRoots { path: PathBuf, why: String },
    #[error("the trust bundle is not usable: {0}")]
    Bundle(#[source] TlsError),
    #[error("generating the root CA failed: {0}")]
    Generate(#[source] Box<CaError>),
}

/// A state or configuration file that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// Why a certificate was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("identity {identity} is in trust domain {:?}; this CA signs only identities of {trust_domain:?}", identity.trust_domain())]
    ForeignTrustDomain { identity: SpiffeId, trust_domain: String },
    #[error("signing failed: {0}")]
    Ca(#[from] CaError),
}

impl SignError {
    /// The request asked for something this CA does not sign (the caller's fault, a 403),
    /// rather than the CA failing (a 500).
    pub fn is_refused(&self) -> bool {
        matches!(self, SignError::ForeignTrustDomain { .. })
    }
}

/// A signed certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    pub identity: SpiffeId,
    /// Leaf first, then any intermediates; not the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The same chain as PEM, one certificate per entry (the certificate API's form).
    pub chain_pem: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The controller's CA. Shared by the API's tasks (`Arc<Authority>`): signing reads the current
/// signer without locking, [`reload`](Authority::reload) swaps it.
pub struct Authority {
    trust_domain: String,
    controller_id: SpiffeId,
    root: RootSource,
    extra_roots: Option<PathBuf>,
    lifetimes: Lifetimes,
    state: ArcSwap<State>,
    /// What the files held when `state` was built from them; held for the whole of a reload,
    /// so two reloads never interleave.
    inputs: Mutex<Inputs>,
}

impl AuthorityConfig {
    /// A configuration with the default lifetimes and no extra roots.
    pub fn new(trust_domain: impl Into<String>, root: RootSource) -> Self {
        AuthorityConfig {
            trust_domain: trust_domain.into(),
            root,
            extra_roots: None,
            cert_ttl: DEFAULT_CERT_TTL,
            max_cert_ttl: DEFAULT_MAX_CERT_TTL,
            min_cert_ttl: DEFAULT_MIN_CERT_TTL,
        }
    }
}

impl Authority {
    /// Loads (or, the first time, generates and persists) the signing CA and the trust bundle.
    pub fn open(config: AuthorityConfig) -> Result<Authority, AuthorityError> {
        let AuthorityConfig { trust_domain, root, extra_roots, cert_ttl, max_cert_ttl, min_cert_ttl } = config;
        let controller_id = SpiffeId::new(&trust_domain, CONTROLLER_NAMESPACE, CONTROLLER_SERVICE_ACCOUNT)
            .map_err(|e| AuthorityError::TrustDomain { value: trust_domain.clone(), why: e.to_string() })?;
        let lifetimes = Lifetimes::new(cert_ttl, min_cert_ttl, max_cert_ttl)?;
        let mut inputs = Inputs::default();
        let signer = match &root {
            RootSource::Generated { state_dir } => Arc::new(open_generated(state_dir, &trust_domain)?),
            RootSource::Files { cert, key, chain } => {
                let files = SignerFiles::read(cert, key, chain.as_deref())?;
                let signer = Signer::from_files(&files, cert, key)?;
                inputs.signer = Some(files);
                Arc::new(signer)
            }
        };
        inputs.extra = extra_roots.as_deref().map(|p| read(p, "read the extra roots file")).transpose()?;
        let extra = parse_extra_roots(extra_roots.as_deref(), inputs.extra.as_deref())?;
        let state = State::new(signer, extra)?;
        Ok(Authority {
            trust_domain,
            controller_id,
            root,
            extra_roots,
            lifetimes,
            state: ArcSwap::from_pointee(state),
            inputs: Mutex::new(inputs),
        })
    }

    /// Re-reads the plugged-in CA files and the extra roots file, and takes them up if their
    /// content changed. Returns whether the trust bundle or the signer changed (proxies need the
    /// new bundle). On an error (a file half-written, a key that does not match yet) nothing
    /// changes: the authority keeps signing with what it had, and the next reload tries again.
    ///
    /// Reads a few small files synchronously.
    pub fn reload(&self) -> Result<bool, AuthorityError> {
        let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        let signer_files = match &self.root {
            RootSource::Generated { .. } => None,
            RootSource::Files { cert, key, chain } => Some(SignerFiles::read(cert, key, chain.as_deref())?),
        };
        let extra_bytes = self.extra_roots.as_deref().map(|p| read(p, "read the extra roots file")).transpose()?;
        if signer_files == inputs.signer && extra_bytes == inputs.extra {
            return Ok(false);
        }
        let old = self.state.load_full();
        let signer = match (&self.root, &signer_files) {
            (RootSource::Files { cert, key, .. }, Some(files)) if Some(files) != inputs.signer.as_ref() => {
                Arc::new(Signer::from_files(files, cert, key)?)
            }
            _ => old.signer.clone(),
        };
        let extra = parse_extra_roots(self.extra_roots.as_deref(), extra_bytes.as_deref())?;
        let state = State::new(signer, extra)?;
        let changed = state.bundle != old.bundle || !state.signer.same_as(&old.signer);
        self.state.store(Arc::new(state));
        *inputs = Inputs { signer: signer_files, extra: extra_bytes };
        Ok(changed)
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle: the signing root first, then the extra roots.
    pub fn bundle(&self) -> Vec<CertificateDer<'static>> {
        self.state.load().bundle.clone()
    }

    /// The trust bundle as PEM, one root per entry.
    pub fn bundle_pem(&self) -> Vec<String> {
        self.state.load().bundle.iter().map(certificate_pem).collect()
    }

    /// The trust bundle for this trust domain, ready for a TLS configuration.
    pub fn trust_bundle(&self) -> Result<TrustBundle, TlsError> {
        TrustBundle::new(self.bundle())?.with_trust_domain(&self.trust_domain)
    }

    /// The lifetime signed when a request names none.
    pub fn cert_ttl(&self) -> Duration {
        self.lifetimes.default
    }

    /// Signs `csr` for `ttl`, raised to the configured minimum or lowered to the maximum (and
    /// never past the signing CA's own expiry). The caller must have checked that the calling
    /// node may hold [`Csr::identity`]; this checks only that it is in this CA's trust domain.
    pub fn sign(&self, csr: &Csr, ttl: Duration) -> Result<Issued, SignError> {
        let identity = csr.identity();
        if identity.trust_domain() != self.trust_domain {
            return Err(SignError::ForeignTrustDomain {
                identity: identity.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let signed = self.state.load().signer.ca.sign(csr, self.lifetimes.clamp(ttl))?;
        Ok(Issued {
            identity: identity.clone(),
            chain_pem: signed.chain.iter().map(certificate_pem).collect(),
            chain: signed.chain,
            not_before: signed.not_before,
            not_after: signed.not_after,
        })
    }

    /// Credentials for the controller's own API (port 15012): the identity
    /// `spiffe://<trust domain>/ns/weft-system/sa/weft-controller`, plus a DNS name SAN (or an
    /// IP address SAN, for an address) per entry of `names`, so that
    /// `curl --cacert root-cert.pem https://<name>:15012/` verifies. Valid for the default
    /// certificate lifetime: renew them at half-life.
    pub fn server_credentials(&self, names: &[String]) -> Result<Credentials, SignError> {
        let state = self.state.load();
        let ca = &state.signer.ca;
        if ca.not_after() <= SystemTime::now() {
            return Err(CaError::Expired { not_after: ca.not_after() }.into());
        }
        let mut spec = LeafSpec {
            dns_sans: names.to_vec(),
            ..LeafSpec::for_identity(&self.controller_id, self.lifetimes.default)
        };
        spec.not_after = spec.not_after.min(ca.not_after());
        let (chain, key) = ca.issue_raw(&spec)?;
        Ok(Credentials::new(chain, key).map_err(CaError::from)?)
    }
}

/// The certificate lifetimes, checked against each other once.
#[derive(Debug, Clone, Copy)]
struct Lifetimes {
    default: Duration,
    min: Duration,
    max: Duration,
}

impl Lifetimes {
    fn new(default: Duration, min: Duration, max: Duration) -> Result<Self, AuthorityError> {
        let err = |setting, value, why: String| Err(AuthorityError::Setting { setting, value, why });
        if min.is_zero() {
            return err("min_cert_ttl", min, "a certificate must live for some time".into());
        }
        if max < min {
            return err("max_cert_ttl", max, format!("it is below min_cert_ttl ({min:?})"));
        }
        if !(min..=max).contains(&default) {
            return err(
                "cert_ttl",
                default,
                format!("it must lie within min_cert_ttl..=max_cert_ttl ({min:?}..={max:?})"),
            );
        }
        Ok(Lifetimes { default, min, max })
    }

    fn clamp(&self, requested: Duration) -> Duration {
        requested.clamp(self.min, self.max)
    }
}

/// A signing CA and the certificates above it.
struct Signer {
    ca: Ca,
    /// The chain file's certificates (empty for a root): a changed chain is a changed signer,
    /// since leaves carry it.
    parents: Vec<CertificateDer<'static>>,
}

impl Signer {
    fn from_files(files: &SignerFiles, cert: &Path, key: &Path) -> Result<Signer, AuthorityError> {
        let bad =
            |source| AuthorityError::BadCa { cert: cert.to_owned(), key: key.to_owned(), source: Box::new(source) };
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let (cert_pem, key_pem) = (text(&files.cert), text(&files.key));
        let ca = match &files.chain {
            Some(chain) => Ca::from_pem_chain(&cert_pem, &key_pem, &text(chain)).map_err(bad)?,
            None => Ca::from_pem(&cert_pem, &key_pem).map_err(bad)?,
        };
        if ca.root().is_none() {
            return Err(AuthorityError::RootUnknown { cert: cert.to_owned() });
        }
        let parents = match &files.chain {
            Some(chain) => CertificateDer::pem_slice_iter(chain).filter_map(Result::ok).collect(),
            None => Vec::new(),
        };
        Ok(Signer { ca, parents })
    }

    fn same_as(&self, other: &Signer) -> bool {
        self.ca.cert() == other.ca.cert() && self.parents == other.parents
    }
}

/// What signing and the bundle read, swapped whole.
struct State {
    signer: Arc<Signer>,
    /// The signing root first, then the extra roots not already in it.
    bundle: Vec<CertificateDer<'static>>,
}

impl State {
    fn new(signer: Arc<Signer>, extra: Vec<CertificateDer<'static>>) -> Result<State, AuthorityError> {
        // Every signer is built with a known root (`RootUnknown` otherwise).
        let mut bundle: Vec<CertificateDer<'static>> = signer.ca.root().into_iter().cloned().collect();
        for root in extra {
            if !bundle.contains(&root) {
                bundle.push(root);
            }
        }
        TrustBundle::new(bundle.clone()).map_err(AuthorityError::Bundle)?;
        Ok(State { signer, bundle })
    }
}

/// The raw content of the files the state was built from, to tell a change on reload.
#[derive(Default)]
struct Inputs {
    signer: Option<SignerFiles>,
    extra: Option<Vec<u8>>,
}

#[derive(PartialEq)]
struct SignerFiles {
    cert: Vec<u8>,
    key: Vec<u8>,
    chain: Option<Vec<u8>>,
}

impl SignerFiles {
    fn read(cert: &Path, key: &Path, chain: Option<&Path>) -> Result<Self, AuthorityError> {
        Ok(SignerFiles {
            cert: read(cert, "read the CA certificate")?,
            key: read(key, "read the CA private key")?,
            chain: chain.map(|c| read(c, "read the CA chain")).transpose()?,
        })
    }
}

/// Loads the generated root from `dir`, or generates and persists it if the directory holds
/// neither of its files. Any other state is an error (see the module docs).
fn open_generated(dir: &Path, trust_domain: &str) -> Result<Signer, AuthorityError> {
    let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
    let cert = read_optional(&cert_path, "read the root certificate")?;
    let key = read_optional(&key_path, "read the root private key")?;
    let ca = match (cert, key) {
        (Some(cert), Some(key)) => {
            warn_if_exposed(&key_path);
            let bad = |source| AuthorityError::BadCa {
                cert: cert_path.clone(),
                key: key_path.clone(),
                source: Box::new(source),
            };
            let ca = Ca::from_pem(&String::from_utf8_lossy(&cert), &String::from_utf8_lossy(&key)).map_err(bad)?;
            if ca.root().is_none() {
                return Err(AuthorityError::RootUnknown { cert: cert_path });
            }
            ca
        }
        (Some(_), None) => return Err(AuthorityError::RootKeyMissing { cert: cert_path, key: key_path }),
        (None, Some(_)) => return Err(AuthorityError::RootCertMissing { cert: cert_path, key: key_path }),
        (None, None) => {
            let ca = Ca::new_root(&format!("weft root CA for {trust_domain}"))
                .map_err(|e| AuthorityError::Generate(Box::new(e)))?;
            let (cert_pem, key_pem) = ca.to_pem();
            create_private_dir(dir)?;
            // The key first: a start interrupted between the two leaves a key without a
            // certificate, which nobody can have trusted yet (see `RootCertMissing`).
            write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
            write_new_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
            info!(dir = %dir.display(), trust_domain, "generated a new root CA");
            ca
        }
    };
    Ok(Signer { ca, parents: Vec::new() })
}

fn parse_extra_roots(
    path: Option<&Path>,
    bytes: Option<&[u8]>,
) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let (Some(path), Some(bytes)) = (path, bytes) else { return Ok(Vec::new()) };
    CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AuthorityError::ExtraRoots { path: path.to_owned(), why: format!("not PEM certificates: {e}") })
}

// State-directory files, shared with `auth`.

/// Reads a whole file, naming it in the error.
pub(crate) fn read(path: &Path, action: &'static str) -> Result<Vec<u8>, FileError> {
    fs::read(path).map_err(io_error(action, path))
}

/// Like [`read`], with a missing file as `None`.
pub(crate) fn read_optional(path: &Path, action: &'static str) -> Result<Option<Vec<u8>>, FileError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io_error(action, path)(source)),
    }
}

/// Creates the state directory (and its parents) readable by its owner only, if missing.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_error("create the state directory", dir))
}

/// Writes a file that must not exist yet, atomically: the content goes to a temporary file
/// with `mode`, synced, then linked into place (which fails if `path` appeared meanwhile, say
/// from a second controller starting on the same directory) and the directory synced.
pub(crate) fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // `mode` applies only to a file created now, not to one left by an interrupted start.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(io_error("write", &tmp))?;
    let linked = fs::hard_link(&tmp, path).map_err(io_error("create", path));
    let _ = fs::remove_file(&tmp);
    linked?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("sync", dir))?;
    }
    Ok(())
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError { action, path: path.to_owned(), source }
}

/// Warns when a secret file is readable by others than its owner.
pub(crate) fn warn_if_exposed(path: &Path) {
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "secret file is readable by other users; chmod 600 it");
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hbone::ca::new_csr;
    use rustls::pki_types::{ServerName, UnixTime};

    /// A directory under the system's temporary directory, removed when dropped.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("weft-controller-{}-{n}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        pub(crate) fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const TD: &str = "cluster.local";

    fn generated(dir: &Path) -> AuthorityConfig {
        AuthorityConfig::new(TD, RootSource::Generated { state_dir: dir.to_owned() })
    }

    fn csr(id: &str) -> Csr {
        let (pem, _) = new_csr(&id.parse().unwrap()).unwrap();
        Csr::parse(pem.as_bytes()).unwrap()
    }

    /// Verifies a chain (leaf first) to one of `roots` as a TLS peer would.
    fn verify(roots: &[CertificateDer<'_>], chain: &[CertificateDer<'_>], usage: webpki::KeyUsage) -> bool {
        let anchors: Vec<_> = roots.iter().map(|r| webpki::anchor_from_trusted_cert(r).unwrap().to_owned()).collect();
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
        let algs = hbone::tls::provider().signature_verification_algorithms.all;
        leaf.verify_for_usage(algs, &anchors, &chain[1..], UnixTime::now(), usage, None, None).is_ok()
    }

    fn write_pem(dir: &TempDir, name: &str, pem: &str) -> PathBuf {
        let path = dir.path(name);
        fs::write(&path, pem).unwrap();
        path
    }

    #[test]
    fn a_generated_root_is_persisted_and_reopened_unchanged() {
        let dir = TempDir::new("generate");
        let state = dir.path("state");
        let first = Authority::open(generated(&state)).unwrap();
        let bundle = first.bundle_pem();
        assert_eq!(bundle.len(), 1);
        assert_eq!(fs::read_to_string(state.join(ROOT_CERT_FILE)).unwrap(), bundle[0]);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.join(ROOT_KEY_FILE)), 0o600);
        assert_eq!(mode(&state), 0o700);
        assert!(!state.join(format!("{ROOT_KEY_FILE}.tmp")).exists());

        let issued = first.sign(&csr("spiffe://cluster.local/ns/a/sa/b"), DEFAULT_CERT_TTL).unwrap();
        drop(first);
        let again = Authority::open(generated(&state)).unwrap();
        assert_eq!(again.bundle_pem(), bundle, "the same root after a restart");
        assert!(verify(&again.bundle(), &issued.chain, webpki::KeyUsage::client_auth()));
        assert!(!again.reload().unwrap(), "a generated root never changes");
    }

    #[test]
    fn a_root_without_its_key_is_refused_not_regenerated() {
        let dir = TempDir::new("keyless");
        let state = dir.path("state");
        Authority::open(generated(&state)).unwrap();
        let cert_before = fs::read(state.join(ROOT_CERT_FILE)).unwrap();
        fs::remove_file(state.join(ROOT_KEY_FILE)).unwrap();

        let err = Authority::open(generated(&state)).err().unwrap();
        assert!(matches!(err, AuthorityError::RootKeyMissing { .. }), "{err}");
        assert!(err.to_string().contains(ROOT_KEY_FILE), "{err}");
        assert_eq!(fs::read(state.join(ROOT_CERT_FILE)).unwrap(), cert_before, "certificate untouched");
        assert!(!state.join(ROOT_KEY_FILE).exists(), "no key minted");

        // The other half missing, a key of another root, or garbage: refused as well.
        let key_only = TempDir::new("key-only");
        Authority::open(generated(&key_only.0)).unwrap();
        fs::remove_file(key_only.path(ROOT_CERT_FILE)).unwrap();
        let err = Authority::open(generated(&key_only.0)).err().unwrap();
        assert!(matches!(err, AuthorityError::RootCertMissing { .. }), "{err}");

        let (_, other_key) = Ca::new_root("other").unwrap().to_pem();
        fs::write(state.join(ROOT_KEY_FILE), other_key).unwrap();
        let err = Authority::open(generated(&state)).err().unwrap();
        assert!(
            matches!(err, AuthorityError::BadCa { ref source, .. } if matches!(**source, CaError::KeyMismatch { .. })),
            "{err}"
        );

        fs::write(state.join(ROOT_CERT_FILE), "garbage").unwrap();
        let err = Authority::open(generated(&state)).err().unwrap();
        assert!(matches!(err, AuthorityError::BadCa { .. }), "{err}");
        assert_eq!(fs::read_to_string(state.join(ROOT_CERT_FILE)).unwrap(), "garbage");
    }

    #[test]
    fn a_plugged_in_root_signs_and_is_the_bundle() {
        let dir = TempDir::new("plug-root");
        let root = Ca::new_root("operator root").unwrap();
        let (cert_pem, key_pem) = root.to_pem();
        let source = RootSource::Files {
            cert: write_pem(&dir, "ca.pem", &cert_pem),
            key: write_pem(&dir, "ca-key.pem", &key_pem),
            chain: None,
        };
        let authority = Authority::open(AuthorityConfig::new(TD, source)).unwrap();
        assert_eq!(authority.bundle_pem(), vec![cert_pem]);
        let issued = authority.sign(&csr("spiffe://cluster.local/ns/a/sa/b"), DEFAULT_CERT_TTL).unwrap();
        assert_eq!(issued.chain.len(), 1);
        assert!(verify(&[root.cert().clone()], &issued.chain, webpki::KeyUsage::server_auth()));
    }

    #[test]
    fn a_plugged_in_intermediate_needs_its_chain_and_puts_the_root_in_the_bundle() {
        let dir = TempDir::new("plug-inter");
        let root = Ca::new_root("offline root").unwrap();
        let inter = root.intermediate("cluster intermediate").unwrap();
        let (cert_pem, key_pem) = inter.to_pem();
        let (cert, key) = (write_pem(&dir, "ca.pem", &cert_pem), write_pem(&dir, "ca-key.pem", &key_pem));

        let without = RootSource::Files { cert: cert.clone(), key: key.clone(), chain: None };
        let err = Authority::open(AuthorityConfig::new(TD, without)).err().unwrap();
        assert!(matches!(err, AuthorityError::RootUnknown { .. }), "{err}");

        let chain = Some(write_pem(&dir, "chain.pem", &certificate_pem(root.cert())));
        let authority = Authority::open(AuthorityConfig::new(TD, RootSource::Files { cert, key, chain })).unwrap();
        assert_eq!(authority.bundle(), vec![root.cert().clone()], "the root, not the intermediate");
        let issued = authority.sign(&csr("spiffe://cluster.local/ns/a/sa/b"), DEFAULT_CERT_TTL).unwrap();
        assert_eq!(issued.chain.len(), 2, "leaf and intermediate");
        assert_eq!(issued.chain_pem[1], cert_pem);
        assert!(verify(&authority.bundle(), &issued.chain, webpki::KeyUsage::client_auth()));
    }

    #[test]
    fn extra_roots_join_the_bundle_after_the_signing_root() {
        let dir = TempDir::new("extra");
        let (next, old) = (Ca::new_root("next").unwrap(), Ca::new_root("old").unwrap());
        let mut config = generated(&dir.path("state"));
        // The signing root itself listed again is not duplicated.
        let signing = Authority::open(config.clone()).unwrap().bundle_pem().remove(0);
        let extra = format!("{}{}{signing}", certificate_pem(next.cert()), certificate_pem(old.cert()));
        config.extra_roots = Some(write_pem(&dir, "extra.pem", &extra));
        let authority = Authority::open(config.clone()).unwrap();
        assert_eq!(authority.bundle_pem(), vec![signing, certificate_pem(next.cert()), certificate_pem(old.cert())]);
        assert_eq!(authority.trust_bundle().unwrap().roots().len(), 3);

        fs::write(dir.path("extra.pem"), "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n").unwrap();
        let err = Authority::open(config).err().unwrap();
        assert!(matches!(err, AuthorityError::ExtraRoots { .. }), "{err}");
    }

    #[test]
    fn reload_takes_up_a_rotation_from_the_files() {
        let dir = TempDir::new("reload");
        let (old, new) = (Ca::new_root("old").unwrap(), Ca::new_root("new").unwrap());
        let (old_cert, old_key) = old.to_pem();
        let (new_cert, new_key) = new.to_pem();
        let (cert, key) = (write_pem(&dir, "ca.pem", &old_cert), write_pem(&dir, "ca-key.pem", &old_key));
        let extra = write_pem(&dir, "extra.pem", "");
        let mut config =
            AuthorityConfig::new(TD, RootSource::Files { cert: cert.clone(), key: key.clone(), chain: None });
        config.extra_roots = Some(extra.clone());
        let authority = Authority::open(config).unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/b";
        assert_eq!(authority.bundle_pem(), vec![old_cert.clone()]);
        assert!(!authority.reload().unwrap(), "nothing changed");

        // 1. The new root joins every bundle.
        fs::write(&extra, &new_cert).unwrap();
        assert!(authority.reload().unwrap());
        assert_eq!(authority.bundle_pem(), vec![old_cert.clone(), new_cert.clone()]);
        assert!(!authority.reload().unwrap(), "the same content again is no change");

        // 2. Signing switches; a half-done switch (new certificate, old key) is refused and the
        // old signer keeps working.
        fs::write(&cert, &new_cert).unwrap();
        let err = authority.reload().unwrap_err();
        assert!(
            matches!(err, AuthorityError::BadCa { ref source, .. } if matches!(**source, CaError::KeyMismatch { .. })),
            "{err}"
        );
        let issued = authority.sign(&csr(id), DEFAULT_CERT_TTL).unwrap();
        assert!(verify(&[old.cert().clone()], &issued.chain, webpki::KeyUsage::client_auth()));
        fs::write(&key, &new_key).unwrap();
        fs::write(&extra, &old_cert).unwrap();
        assert!(authority.reload().unwrap());
        assert_eq!(authority.bundle_pem(), vec![new_cert.clone(), old_cert], "both roots still trusted");
        let issued = authority.sign(&csr(id), DEFAULT_CERT_TTL).unwrap();
        assert!(verify(&[new.cert().clone()], &issued.chain, webpki::KeyUsage::client_auth()));

        // 3. The old root leaves.
        fs::write(&extra, "").unwrap();
        assert!(authority.reload().unwrap());
        assert_eq!(authority.bundle_pem(), vec![new_cert]);
    }

    #[test]
    fn identities_of_another_trust_domain_are_refused() {
        let dir = TempDir::new("td");
        let authority = Authority::open(generated(&dir.0)).unwrap();
        let err = authority.sign(&csr("spiffe://other.example/ns/a/sa/b"), DEFAULT_CERT_TTL).unwrap_err();
        assert!(err.is_refused(), "{err}");
        assert!(matches!(err, SignError::ForeignTrustDomain { .. }), "{err}");
        assert!(err.to_string().contains("\"other.example\""), "{err}");
        assert!(authority.sign(&csr("spiffe://cluster.local/ns/a/sa/b"), DEFAULT_CERT_TTL).is_ok());

        let err =
            Authority::open(AuthorityConfig::new("Not A Domain", RootSource::Generated { state_dir: dir.0.clone() }))
                .err()
                .unwrap();
        assert!(matches!(err, AuthorityError::TrustDomain { .. }), "{err}");
    }

    #[test]
    fn lifetimes_are_raised_to_the_floor_and_capped() {
        let dir = TempDir::new("ttl");
        let authority = Authority::open(generated(&dir.0)).unwrap();
        let lifetime = |requested: Duration| {
            let issued = authority.sign(&csr("spiffe://cluster.local/ns/a/sa/b"), requested).unwrap();
            // Signed certificates are backdated by five minutes for clock skew.
            issued.not_after.duration_since(issued.not_before).unwrap() - Duration::from_secs(300)
        };
        assert_eq!(lifetime(Duration::from_secs(1)), DEFAULT_MIN_CERT_TTL);
        assert_eq!(lifetime(Duration::from_secs(3600)), Duration::from_secs(3600));
        assert_eq!(lifetime(Duration::from_secs(365 * 24 * 3600)), DEFAULT_MAX_CERT_TTL);
        assert_eq!(authority.cert_ttl(), DEFAULT_CERT_TTL);

        let mut config = generated(&dir.0);
        config.cert_ttl = Duration::from_secs(30 * 24 * 3600);
        let err = Authority::open(config).err().unwrap();
        assert!(matches!(err, AuthorityError::Setting { setting: "cert_ttl", .. }), "{err}");
    }

    #[test]
    fn server_credentials_carry_the_controller_identity_and_its_names() {
        let dir = TempDir::new("server");
        let authority = Authority::open(generated(&dir.0)).unwrap();
        let names = ["weft-controller.weft-system.svc".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
        let creds = authority.server_credentials(&names).unwrap();
        assert_eq!(creds.identity().as_str(), "spiffe://cluster.local/ns/weft-system/sa/weft-controller");
        let roots = authority.bundle();
        assert!(verify(&roots, creds.chain(), webpki::KeyUsage::server_auth()));
        // What curl checks: the name it dialed is in the certificate.
        let leaf = webpki::EndEntityCert::try_from(&creds.chain()[0]).unwrap();
        for name in &names {
            let server_name = ServerName::try_from(name.as_str()).unwrap();
            assert!(leaf.verify_is_valid_for_subject_name(&server_name).is_ok(), "{name}");
        }
        let other = ServerName::try_from("evil.example").unwrap();
        assert!(leaf.verify_is_valid_for_subject_name(&other).is_err());
    }
}
