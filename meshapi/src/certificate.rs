//! The certificate API's messages (`docs/PROTOCOL.md`): a node's proxy sends a PKCS#10 CSR
//! for one workload identity and gets back a signed chain. The identity is the CSR's single
//! URI SAN; the controller signs it only if a workload with that identity is scheduled on the
//! calling node.

use serde::{Deserialize, Serialize};

/// `POST /v1/certificates` with a [`CertificateRequest`] body (JSON).
pub const CERTIFICATES_PATH: &str = "/v1/certificates";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRequest {
    /// The CSR, PEM (`-----BEGIN CERTIFICATE REQUEST-----`).
    pub csr: String,
    /// The lifetime asked for; the controller may shorten it (its maximum) or lengthen it
    /// (its minimum). Absent: the controller's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateResponse {
    /// PEM certificates, the leaf first, then any intermediates (not the root).
    pub certificate_chain: Vec<String>,
    /// The roots peers' certificates must chain to, PEM, one per entry.
    pub trust_bundle: Vec<String>,
    /// The leaf's expiry, in seconds since the Unix epoch.
    pub not_after: u64,
}

/// The body of every error answer of the controller's APIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// A stable, machine-readable cause (`unauthenticated`, `forbidden_identity`,
    /// `invalid_csr`, ...; the full list is in `docs/PROTOCOL.md`).
    pub reason: String,
    /// The explanation for a person.
    pub error: String,
}
