//! Workload certificate wire types (`POST /v1/certificate`, docs/protocol.md §11): what an
//! injected sidecar sends the operator's certificate server and what it gets back.

use serde::{Deserialize, Serialize};

/// `POST /v1/certificate` body.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateRequest {
    /// PKCS#10 CSR, PEM.
    pub csr: String,
    /// The sidecar's Noise static public key (32 bytes, base64), bound into the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_public_key: Option<String>,
}

/// `POST /v1/certificate` response.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// The node id the certificate names.
    pub node_id: String,
    /// The certificate, PEM.
    pub certificate: String,
    /// The federation CA certificate, PEM.
    pub ca_bundle: String,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// When to renew, Unix seconds (two thirds of the lifetime).
    pub renew_after: u64,
}
