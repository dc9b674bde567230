//! Certificates for the workloads on this node. Without a controller, ztunnel holds the CA
//! key itself and mints a certificate per local identity; with a controller (later issue), the
//! same interface will send a CSR instead.
//!
//! Certificates are renewed at half-life; [`WorkloadCert::rotate`] swaps them under running
//! listeners and pools, so renewal drops nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use hbone::ca::{Ca, CaError};
use hbone::{SpiffeId, WorkloadCert};
use tracing::{info, warn};

pub struct CertManager {
    ca: Ca,
    ttl: Duration,
    certs: Mutex<HashMap<SpiffeId, WorkloadCert>>,
}

impl CertManager {
    pub fn new(ca: Ca, ttl: Duration) -> Self {
        CertManager { ca, ttl, certs: Mutex::new(HashMap::new()) }
    }

    /// The certificate slot for `id`, minting the first certificate if needed.
    pub fn get(&self, id: &SpiffeId) -> Result<WorkloadCert, CaError> {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = certs.get(id) {
            return Ok(c.clone());
        }
        let cert = WorkloadCert::new(self.ca.issue(id, self.ttl)?);
        info!(identity = %id, "issued workload certificate");
        certs.insert(id.clone(), cert.clone());
        Ok(cert)
    }

    /// Renews every certificate past half of its lifetime. Returns how many were renewed.
    pub fn renew_due(&self) -> usize {
        let certs: Vec<WorkloadCert> = self.certs.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let now = SystemTime::now();
        let mut renewed = 0;
        for cert in certs {
            let left = cert.current().not_after().duration_since(now).unwrap_or_default();
            if left > self.ttl / 2 {
                continue;
            }
            match self
                .ca
                .issue(cert.identity(), self.ttl)
                .map_err(|e| e.to_string())
                .and_then(|c| cert.rotate(c).map_err(|e| e.to_string()))
            {
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
        self.certs.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| keep(id));
    }

    /// (identity, expiry) of every certificate held, for the config dump.
    pub fn dump(&self) -> Vec<(SpiffeId, SystemTime)> {
        let mut out: Vec<_> = self
            .certs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| (c.identity().clone(), c.current().not_after()))
            .collect();
        out.sort();
        out
    }
}
