//! Federation-signed ECH configs (docs/protocol.md §5.7). A main relay's ECHConfigList signed
//! with the federation CA's key can reach homes of *another cluster* of the same federation
//! through relays — main relays announce it in `peerHello`, and pass peers' signed configs on
//! in their views — and still be trusted by those homes as if their own config snapshot had
//! carried it: no relay holds the CA key, so none can substitute its own key for another
//! relay's and open the routes sealed to it.
//!
//! Signed message: `"relayfed ech config v1" || 0x00 || u8 len(node_id) || node_id ||
//! ECHConfigList`; signature: ECDSA P-256 with SHA-256, ASN.1 DER (the CA's key type).

use rcgen::SigningKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::ca::{CaError, FederationCa};

/// Domain separation of the signed message.
pub const CONTEXT: &[u8] = b"relayfed ech config v1";

/// OID of the P-256 curve (the only CA key type relayfed generates).
const P256: &str = "1.2.840.10045.3.1.7";

/// The bytes a signature covers.
pub fn message(node_id: &str, ech_config_list: &[u8]) -> Result<Vec<u8>, CaError> {
    let id =
        u8::try_from(node_id.len()).map_err(|_| CaError::BadName { what: "node id", value: node_id.to_owned() })?;
    let mut m = Vec::with_capacity(CONTEXT.len() + 2 + node_id.len() + ech_config_list.len());
    m.extend_from_slice(CONTEXT);
    m.push(0);
    m.push(id);
    m.extend_from_slice(node_id.as_bytes());
    m.extend_from_slice(ech_config_list);
    Ok(m)
}

impl FederationCa {
    /// Signs main relay `node_id`'s ECHConfigList with the CA key.
    pub fn sign_ech_config(&self, node_id: &str, ech_config_list: &[u8]) -> Result<Vec<u8>, CaError> {
        Ok(self.signing_key().sign(&message(node_id, ech_config_list)?)?)
    }
}

/// Why a signed ECH config was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EchSignatureError {
    /// The CA certificate did not parse, or its key is not P-256.
    #[error("CA certificate unusable for ECH config signatures: {0}")]
    Ca(String),
    /// The signature does not verify for this node and list.
    #[error("ECH config signature does not verify for main relay {0:?}")]
    Invalid(String),
}

/// Checks that `signature` is the CA's (DER certificate `ca_der`) over `node_id`'s list.
pub fn verify_ech_config(
    ca_der: &[u8],
    node_id: &str,
    ech_config_list: &[u8],
    signature: &[u8],
) -> Result<(), EchSignatureError> {
    let (_, cert) = X509Certificate::from_der(ca_der).map_err(|e| EchSignatureError::Ca(e.to_string()))?;
    let spki = &cert.tbs_certificate.subject_pki;
    let curve =
        spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string()).unwrap_or_default();
    if curve != P256 {
        return Err(EchSignatureError::Ca(format!("key curve {curve:?} is not P-256")));
    }
    let msg = message(node_id, ech_config_list).map_err(|_| EchSignatureError::Invalid(node_id.to_owned()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &spki.subject_public_key.data)
        .verify(&msg, signature)
        .map_err(|_| EchSignatureError::Invalid(node_id.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::crypto::ca::parse_cert_pem;

    #[test]
    fn a_signature_binds_the_node_and_the_list() {
        let ca = FederationCa::generate("shop.example").unwrap();
        let der = parse_cert_pem(&ca.certified_key().cert_pem).unwrap();
        let sig = ca.sign_ech_config("main-b", b"list").unwrap();
        assert_eq!(verify_ech_config(&der, "main-b", b"list", &sig), Ok(()));
        // Another relay's name, another list, another CA: refused.
        assert!(verify_ech_config(&der, "main-a", b"list", &sig).is_err());
        assert!(verify_ech_config(&der, "main-b", b"lisT", &sig).is_err());
        let other = FederationCa::generate("shop.example").unwrap();
        let other_der = parse_cert_pem(&other.certified_key().cert_pem).unwrap();
        assert!(verify_ech_config(&other_der, "main-b", b"list", &sig).is_err());
        assert!(matches!(verify_ech_config(b"junk", "main-b", b"list", &sig), Err(EchSignatureError::Ca(_))));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_signatures_never_verify_nor_panic(sig in proptest::collection::vec(0u8.., 0..100)) {
            let ca = FederationCa::generate("shop.example").unwrap();
            let der = parse_cert_pem(&ca.certified_key().cert_pem).unwrap();
            proptest::prop_assert!(verify_ech_config(&der, "main-b", b"list", &sig).is_err());
        }
    }
}
