//! A small certificate authority built on rcgen: roots, intermediates and SPIFFE leaf
//! certificates (ECDSA P-256).
//!
//! Tests use it to mint every kind of certificate they need, including the ones a peer must
//! refuse (expired, wrong SAN, untrusted root). The controller's CA will sign workload
//! certificates with the same code.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::identity::SpiffeId;
use crate::tls::{Credentials, TlsError};

/// How long a root or intermediate minted here lives unless told otherwise: ten years, so
/// long-running labs never see a CA expire.
const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Certificates are backdated by this much to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("issued certificate is not usable: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot load the CA: {0}")]
    Load(String),
    #[error("validity {not_before:?}..{not_after:?} cannot be encoded")]
    Validity { not_before: SystemTime, not_after: SystemTime },
}

/// A signing CA: a root (self-signed) or an intermediate (signed by its parent).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// Certificates between this CA and its root, this CA's own first, the root excluded:
    /// appended to every leaf chain so peers can build the path.
    chain: Vec<CertificateDer<'static>>,
}

/// What to put in a leaf certificate. [`LeafSpec::for_identity`] is the normal case; the
/// fields are public so tests can make certificates a peer must refuse.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Extended key usages; HBONE peers need both client and server authentication.
    pub client_auth: bool,
    pub server_auth: bool,
}

impl LeafSpec {
    /// A certificate for `id`, valid from now (minus a small backdate) for `ttl`.
    pub fn for_identity(id: &SpiffeId, ttl: Duration) -> Self {
        let now = SystemTime::now();
        LeafSpec {
            uri_sans: vec![id.to_string()],
            dns_sans: vec![],
            not_before: now - BACKDATE,
            not_after: now + ttl,
            client_auth: true,
            server_auth: true,
        }
    }
}

impl Ca {
    /// Mints a new self-signed root.
    pub fn new_root(common_name: &str) -> Result<Ca, CaError> {
        let key = new_key()?;
        let params = ca_params(common_name)?;
        let cert = params.self_signed(&key)?.der().clone();
        Ok(Ca { issuer: Issuer::new(params, key), cert, chain: vec![] })
    }

    /// Loads an existing CA from its certificate and PKCS#8 private key (PEM). `chain` lists
    /// the certificates between this CA and its root (this CA's own first), for an
    /// intermediate; leave it empty for a root.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CaError> {
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::Load(format!("CA certificate: {e}")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Load(format!("CA private key: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(|e| CaError::Load(format!("CA certificate: {e}")))?;
        Ok(Ca { issuer, cert, chain: vec![] })
    }

    /// This CA's certificate and private key as PEM, for persisting a generated CA.
    pub fn to_pem(&self) -> (String, String) {
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", self.cert.to_vec()));
        (cert, self.issuer.key().serialize_pem())
    }

    /// Mints an intermediate CA signed by this one.
    pub fn intermediate(&self, common_name: &str) -> Result<Ca, CaError> {
        let key = new_key()?;
        let params = ca_params(common_name)?;
        let cert = params.signed_by(&key, &self.issuer)?.der().clone();
        let mut chain = vec![cert.clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Ca { issuer: Issuer::new(params, key), cert, chain })
    }

    /// This CA's own certificate (for a root: what goes into trust bundles).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues credentials for a workload identity, valid for `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Credentials, CaError> {
        let (chain, key) = self.issue_raw(&LeafSpec::for_identity(id, ttl))?;
        Ok(Credentials::new(chain, key)?)
    }

    /// Issues a leaf exactly as specified, without checking that it is a valid SPIFFE
    /// certificate: the chain (leaf first, then intermediates) and its private key.
    pub fn issue_raw(
        &self,
        spec: &LeafSpec,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "weft");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.client_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if spec.server_auth {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        for uri in &spec.uri_sans {
            params.subject_alt_names.push(SanType::URI(uri.as_str().try_into()?));
        }
        for dns in &spec.dns_sans {
            params.subject_alt_names.push(SanType::DnsName(dns.as_str().try_into()?));
        }
        set_validity(&mut params, spec.not_before, spec.not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?.der().clone();
        let mut chain = vec![cert];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
    }
}

fn new_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn ca_params(common_name: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "weft");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    set_validity(&mut params, now - BACKDATE, now + DEFAULT_CA_VALIDITY)?;
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) -> Result<(), CaError> {
    let conv = |t: SystemTime| -> Option<time::OffsetDateTime> {
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()
    };
    match (conv(not_before), conv(not_after)) {
        (Some(nb), Some(na)) => {
            params.not_before = nb;
            params.not_after = na;
            Ok(())
        }
        _ => Err(CaError::Validity { not_before, not_after }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{TrustBundle, TrustStore};

    #[test]
    fn issues_spiffe_leaf_through_intermediate() {
        let root = Ca::new_root("root").unwrap();
        let inter = root.intermediate("inter").unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let creds = inter.issue(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(creds.identity(), &id);
        assert_eq!(creds.chain().len(), 2, "leaf + intermediate");
        let left = creds.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        TrustStore::new(TrustBundle::new(vec![root.cert().clone()]).unwrap());
    }

    #[test]
    fn a_ca_survives_a_round_trip_through_pem() {
        let root = Ca::new_root("persisted").unwrap();
        let (cert, key) = root.to_pem();
        let loaded = Ca::from_pem(&cert, &key).unwrap();
        assert_eq!(loaded.cert(), root.cert());
        let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let creds = loaded.issue(&id, Duration::from_secs(60)).unwrap();
        // The leaf chains to the original root.
        let trust = TrustStore::new(TrustBundle::from_pem(&cert).unwrap());
        assert_eq!(trust.bundle().roots().len(), 1);
        assert_eq!(creds.identity(), &id);
        let err = Ca::from_pem("not pem", &key).err().unwrap();
        assert!(err.to_string().contains("CA certificate"), "{err}");
    }

    #[test]
    fn credentials_refuse_leaf_without_spiffe_san() {
        let root = Ca::new_root("root").unwrap();
        let now = SystemTime::now();
        let spec = LeafSpec {
            uri_sans: vec![],
            dns_sans: vec!["example.com".into()],
            not_before: now,
            not_after: now + Duration::from_secs(60),
            client_auth: true,
            server_auth: true,
        };
        let (chain, key) = root.issue_raw(&spec).unwrap();
        let err = Credentials::new(chain, key).unwrap_err();
        assert!(matches!(err, TlsError::NoSpiffeId { .. }), "{err}");
    }
}
