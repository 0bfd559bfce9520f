//! What a sidecar does with the operator's certificate response: decode the JSON, then load
//! the certificate and CA bundle PEM it carries as a hop identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::distribution::certificate::CertificateResponse;
use relayfed_sidecar::transport::tls::HopIdentity;

/// A valid key (the sidecar's own key in real use; never from the response).
fn key() -> &'static str {
    static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        relayfed_sidecar::crypto::ca::FederationCa::generate("fuzz.example")
            .map(|ca| ca.certified_key().key_pem.clone())
            .unwrap_or_default()
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<CertificateResponse>(data) {
        let _ = HopIdentity::from_pem("fuzz.example", &r.node_id, &r.ca_bundle, &r.certificate, key());
    }
});
