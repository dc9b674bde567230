//! Certificates for the workloads on this node.
//!
//! With a controller, ztunnel makes a key per local workload identity, sends a CSR and keeps
//! the chain the controller signs: the node never holds the CA's key, and the controller signs
//! only identities of workloads scheduled on this node. Without one (development, the local
//! file), ztunnel holds the CA itself and mints certificates directly.
//!
//! A certificate is obtained when its pod is enrolled ([`CertManager::obtain`]), renewed at
//! half-life ([`CertManager::renew_due`]) and swapped under running listeners and pools
//! ([`WorkloadCert::rotate`]), so renewal drops nothing. With a state directory, each
//! certificate and its key are kept on the node (mode 0600), so a ztunnel restarted while the
//! controller is unreachable serves its pods with still-valid certificates.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hbone::ca::{Ca, CaError};
use hbone::{Credentials, SpiffeId, WorkloadCert};
use meshapi::certificate::CertificateRequest;
use tracing::{info, warn};

use crate::control::client::{Client, ControlError};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("minting a certificate for {identity}: {error}")]
    Mint { identity: SpiffeId, error: CaError },
    #[error("the controller refused a certificate for {identity}: {error}")]
    Controller { identity: SpiffeId, error: ControlError },
    #[error("the certificate the controller signed for {identity} is unusable: {error}")]
    Unusable { identity: SpiffeId, error: String },
    #[error("no certificate for {0} yet: its pod is not enrolled")]
    NotYet(SpiffeId),
}

/// Who signs this node's certificates.
pub enum Issuer {
    /// ztunnel holds the CA (no controller).
    Local(Box<Ca>),
    /// The controller signs CSRs.
    Controller(Arc<Client>),
}

pub struct CertManager {
    issuer: Issuer,
    ttl: Duration,
    certs: Mutex<HashMap<SpiffeId, WorkloadCert>>,
    /// Where certificates are kept across restarts, if anywhere.
    dir: Option<PathBuf>,
    /// One request to the controller at a time: enrolling pods of one identity together asks
    /// once.
    fetching: tokio::sync::Mutex<()>,
}

impl CertManager {
    pub fn new(issuer: Issuer, ttl: Duration, dir: Option<PathBuf>) -> Self {
        CertManager { issuer, ttl, certs: Mutex::new(HashMap::new()), dir, fetching: tokio::sync::Mutex::new(()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, WorkloadCert>> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The certificate slot for `id`. With a local CA the first certificate is minted here;
    /// with a controller it must have been obtained when the pod was enrolled.
    pub fn get(&self, id: &SpiffeId) -> Result<WorkloadCert, CertError> {
        if let Some(c) = self.lock().get(id) {
            return Ok(c.clone());
        }
        match &self.issuer {
            Issuer::Local(ca) => {
                let creds = ca.issue(id, self.ttl).map_err(|error| CertError::Mint { identity: id.clone(), error })?;
                let cert = WorkloadCert::new(creds);
                info!(identity = %id, "issued workload certificate");
                Ok(self.lock().entry(id.clone()).or_insert(cert).clone())
            }
            Issuer::Controller(_) => Err(CertError::NotYet(id.clone())),
        }
    }

    /// The certificate slot for `id`, asking the controller for one if none is held.
    pub async fn obtain(&self, id: &SpiffeId) -> Result<WorkloadCert, CertError> {
        let Issuer::Controller(client) = &self.issuer else {
            return self.get(id);
        };
        let _one = self.fetching.lock().await;
        if let Some(c) = self.lock().get(id) {
            return Ok(c.clone());
        }
        let creds = self.request(client, id).await?;
        let cert = WorkloadCert::new(creds);
        Ok(self.lock().entry(id.clone()).or_insert(cert).clone())
    }

    /// A fresh certificate for `id` from the controller, kept on disk if there is a state
    /// directory.
    async fn request(&self, client: &Client, id: &SpiffeId) -> Result<Credentials, CertError> {
        let unusable = |error: String| CertError::Unusable { identity: id.clone(), error };
        let (csr, key) = hbone::ca::new_csr(id).map_err(|error| CertError::Mint { identity: id.clone(), error })?;
        let request = CertificateRequest { csr, ttl_seconds: Some(self.ttl.as_secs()) };
        let answer = client
            .certificate(&request)
            .await
            .map_err(|error| CertError::Controller { identity: id.clone(), error })?;
        let key_pem = pem_key(&key);
        let chain_pem = answer.certificate_chain.concat();
        let creds = Credentials::from_pem(&chain_pem, &key_pem).map_err(|e| unusable(e.to_string()))?;
        if creds.identity() != id {
            return Err(unusable(format!("it names {} instead", creds.identity())));
        }
        info!(identity = %id, expires_in = ?creds.not_after().duration_since(SystemTime::now()).unwrap_or_default(), "certificate obtained from the controller");
        if let Some(dir) = &self.dir {
            let path = dir.join(file_name(id));
            let text = format!("{chain_pem}{key_pem}");
            if let Err(e) = crate::control::persist::write_atomically(&path, text.as_bytes()) {
                warn!(path = %path.display(), error = %e, "cannot keep the certificate on the node");
            }
        }
        Ok(creds)
    }

    /// Loads the certificates kept in the state directory that are still valid for more than
    /// a minute. Returns how many.
    pub fn load_kept(&self) -> usize {
        let Some(dir) = &self.dir else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut loaded = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pem") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            match Credentials::from_pem(&text, &text) {
                Ok(creds) if creds.not_after() > SystemTime::now() + Duration::from_secs(60) => {
                    info!(identity = %creds.identity(), "certificate loaded from the node");
                    self.lock().insert(creds.identity().clone(), WorkloadCert::new(creds));
                    loaded += 1;
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => warn!(path = %path.display(), error = %e, "ignoring an unreadable kept certificate"),
            }
        }
        loaded
    }

    /// Renews every certificate past half of its lifetime. Returns how many were renewed.
    pub async fn renew_due(&self) -> usize {
        let certs: Vec<WorkloadCert> = self.lock().values().cloned().collect();
        let now = SystemTime::now();
        let mut renewed = 0;
        for cert in certs {
            let current = cert.current();
            // Half of the lifetime it was issued with (a kept or controller-shortened
            // certificate may differ from the configured one).
            if now < current.renew_at() {
                continue;
            }
            let fresh = match &self.issuer {
                Issuer::Local(ca) => ca.issue(cert.identity(), self.ttl).map_err(|e| e.to_string()),
                Issuer::Controller(client) => self.request(client, cert.identity()).await.map_err(|e| e.to_string()),
            };
            match fresh.and_then(|c| cert.rotate(c).map_err(|e| e.to_string())) {
                Ok(()) => {
                    renewed += 1;
                    info!(identity = %cert.identity(), "renewed workload certificate");
                }
                Err(e) => warn!(identity = %cert.identity(), error = %e, "certificate renewal failed; will retry"),
            }
        }
        renewed
    }

    /// Forgets identities no longer used by a local workload.
    pub fn retain(&self, keep: impl Fn(&SpiffeId) -> bool) {
        let mut certs = self.lock();
        let gone: Vec<SpiffeId> = certs.keys().filter(|id| !keep(id)).cloned().collect();
        for id in gone {
            certs.remove(&id);
            if let Some(dir) = &self.dir {
                let _ = std::fs::remove_file(dir.join(file_name(&id)));
            }
        }
    }

    /// (identity, expiry) of every certificate held, for the config dump.
    pub fn dump(&self) -> Vec<(SpiffeId, SystemTime)> {
        let mut out: Vec<_> = self.lock().values().map(|c| (c.identity().clone(), c.current().not_after())).collect();
        out.sort();
        out
    }
}

/// The file a certificate of `id` is kept in: `<namespace>.<service-account>.pem` (both are
/// DNS labels, so the name is safe and unique within a trust domain).
fn file_name(id: &SpiffeId) -> String {
    format!("{}.{}.pem", id.namespace(), id.service_account())
}

fn pem_key(key: &rustls::pki_types::PrivateKeyDer<'_>) -> String {
    pem::encode(&pem::Pem::new("PRIVATE KEY", key.secret_der().to_vec()))
}
