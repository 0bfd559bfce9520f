//! The federation CA: create it, issue node certificates, verify chains, read identities.
//!
//! A node certificate names its holder twice: the DNS SAN `<node-id>.<trust-domain>` (what
//! TLS clients verify as the server name) and the URI SAN `relayfed://<trust-domain>/<node-id>`
//! (the identity relayfed reads). Both are issued together, so they always agree. The
//! operator reuses this module to run the CA in a cluster.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;

/// Why a CA operation failed.
#[derive(Debug, Error)]
pub enum CaError {
    /// Certificate generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM input did not parse.
    #[error("invalid PEM in {what}: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The certificate carries no relayfed identity for the trust domain.
    #[error("certificate has no relayfed://{trust_domain}/<node-id> URI SAN")]
    NoIdentity {
        /// Expected trust domain.
        trust_domain: String,
    },
    /// A node id or trust domain is not a valid DNS label/name.
    #[error("invalid {what} {value:?}: must be lowercase letters, digits and '-'")]
    BadName {
        /// Which name.
        what: &'static str,
        /// The rejected value.
        value: String,
    },
}

/// The DNS name a node's certificate is valid for.
pub fn node_dns_name(node_id: &str, trust_domain: &str) -> String {
    format!("{node_id}.{trust_domain}")
}

/// The identity URI of a node.
pub fn identity_uri(node_id: &str, trust_domain: &str) -> String {
    format!("relayfed://{trust_domain}/{node_id}")
}

fn check_label(what: &'static str, v: &str) -> Result<(), CaError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok { Ok(()) } else { Err(CaError::BadName { what, value: v.to_owned() }) }
}

/// A PEM certificate and its PKCS#8 private key.
#[derive(Clone)]
pub struct CertifiedKey {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM (never log it).
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey").finish_non_exhaustive()
    }
}

impl CertifiedKey {
    /// The certificate as DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, CaError> {
        parse_cert_pem(&self.cert_pem)
    }

    /// The private key as DER.
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, CaError> {
        parse_key_pem(&self.key_pem)
    }
}

/// Most certificates a Noise message 2 chain may hold (the leaf and its CA, with room for an
/// intermediate).
pub const MAX_CHAIN: usize = 4;

/// Splits concatenated DER certificates (leaf first, as a destination sends them in Noise
/// message 2 to an origin of another trust domain; docs/protocol.md §6) into one each.
pub fn split_der_chain(mut bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bad = |reason: &str| CaError::Pem { what: "certificate chain", reason: reason.to_owned() };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if out.len() == MAX_CHAIN {
            return Err(bad("more than 4 certificates"));
        }
        let (rest, _) = X509Certificate::from_der(bytes).map_err(|_| bad("not DER certificates"))?;
        out.push(CertificateDer::from(bytes[..bytes.len() - rest.len()].to_vec()));
        bytes = rest;
    }
    if out.is_empty() {
        return Err(bad("empty"));
    }
    Ok(out)
}

/// Parses the first certificate of a PEM bundle.
pub fn parse_cert_pem(pem: &str) -> Result<CertificateDer<'static>, CaError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CaError::Pem { what: "certificate", reason: e.to_string() })
}

/// Parses a PKCS#8 private key.
pub fn parse_key_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CaError> {
    use rustls_pki_types::pem::PemObject;
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map(PrivateKeyDer::from)
        .map_err(|e| CaError::Pem { what: "private key", reason: e.to_string() })
}

/// OID of the extension binding a node's Noise static public key to its certificate (an
/// OCTET STRING of the 32-byte X25519 key). Experimental arc; to be replaced by a registered
/// Private Enterprise Number before 1.0 (docs/protocol.md §11).
pub const NOISE_KEY_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 99999, 1, 1];

/// The federation's certificate authority.
pub struct FederationCa {
    trust_domain: String,
    cert: CertifiedKey,
    issuer: Issuer<'static, KeyPair>,
}

impl FederationCa {
    /// Creates a new CA for `trust_domain`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        for label in trust_domain.split('.') {
            check_label("trust domain", label)?;
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("relayfed CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 86_400)).into();
        let cert = params.self_signed(&key)?;
        let certified = CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() };
        Ok(Self { trust_domain: trust_domain.to_owned(), cert: certified, issuer: Issuer::new(params, key) })
    }

    /// Loads an existing CA.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cert: CertifiedKey { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned() },
            issuer,
        })
    }

    /// The CA's own key (signatures other than certificates: ECH configs).
    pub(crate) fn signing_key(&self) -> &KeyPair {
        self.issuer.key()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate and key (the key only ever goes to encrypted storage).
    pub fn certified_key(&self) -> &CertifiedKey {
        &self.cert
    }

    /// What every node certificate says: the node named twice (DNS and URI SANs), client and
    /// server usage, the validity window.
    fn node_params(
        &self,
        node_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateParams, CaError> {
        check_label("node id", node_id)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::DnsName(node_dns_name(node_id, &self.trust_domain).try_into()?),
            SanType::URI(identity_uri(node_id, &self.trust_domain).try_into()?),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        Ok(params)
    }

    /// Issues a node certificate valid from now for `validity`.
    pub fn issue(&self, node_id: &str, validity: Duration) -> Result<CertifiedKey, CaError> {
        self.issue_bound(node_id, validity, None)
    }

    /// Issues a node certificate valid from now for `validity`; with `noise_key`, it binds that
    /// Noise static key ([`NOISE_KEY_OID`]), as home certificates must under a plan.
    pub fn issue_bound(
        &self,
        node_id: &str,
        validity: Duration,
        noise_key: Option<&[u8; 32]>,
    ) -> Result<CertifiedKey, CaError> {
        let now = SystemTime::now();
        let mut params = self.node_params(node_id, now - Duration::from_secs(60), now + validity)?;
        if let Some(key) = noise_key {
            params.custom_extensions.push(noise_key_extension(key));
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Issues a node certificate for the key pair in `key_pem` (kept across a re-issue: a CA
    /// rotation replaces a node's certificate file while the node may read its key file, so the
    /// key does not change under it), valid from now for `validity`, binding `noise_key` if any.
    pub fn reissue_bound(
        &self,
        node_id: &str,
        validity: Duration,
        noise_key: Option<&[u8; 32]>,
        key_pem: &str,
    ) -> Result<String, CaError> {
        let now = SystemTime::now();
        let mut params = self.node_params(node_id, now - Duration::from_secs(60), now + validity)?;
        if let Some(key) = noise_key {
            params.custom_extensions.push(noise_key_extension(key));
        }
        let key = KeyPair::from_pem(key_pem)?;
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }

    /// Whether this CA signed `cert_der` (its signature verifies with the CA's key). Two CAs of
    /// one trust domain share a name, so the name does not tell which one issued a certificate.
    pub fn issued(&self, cert_der: &[u8]) -> bool {
        parse_cert_pem(&self.cert.cert_pem).is_ok_and(|ca| issued_by(cert_der, ca.as_ref()))
    }

    /// Issues a node certificate valid between two instants (tests issue expired ones).
    pub fn issue_between(
        &self,
        node_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertifiedKey, CaError> {
        let params = self.node_params(node_id, not_before, not_after)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs a PKCS#10 CSR (PEM; its self-signature is verified) for `node_id`: the subject,
    /// SANs, usages and validity are ours, only the public key comes from the CSR. With
    /// `noise_key`, the certificate also carries [`NOISE_KEY_OID`], binding that Noise key.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        node_id: &str,
        not_before: SystemTime,
        not_after: SystemTime,
        noise_key: Option<&[u8; 32]>,
    ) -> Result<String, CaError> {
        let mut params = self.node_params(node_id, not_before, not_after)?;
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Pem { what: "certificate signing request", reason: e.to_string() })?;
        if let Some(key) = noise_key {
            params.custom_extensions.push(noise_key_extension(key));
        }
        csr.params = params;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }
}

/// The [`NOISE_KEY_OID`] extension binding `key`: its value is the DER OCTET STRING of the key.
fn noise_key_extension(key: &[u8; 32]) -> rcgen::CustomExtension {
    let mut der = vec![0x04, 0x20];
    der.extend_from_slice(key);
    rcgen::CustomExtension::from_oid_content(NOISE_KEY_OID, der)
}

/// The Noise static public key bound to a certificate ([`NOISE_KEY_OID`]), if it carries one.
pub fn noise_key_from_cert(der: &[u8]) -> Result<Option<[u8; 32]>, CaError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let bad = |reason: &str| CaError::Pem { what: "certificate", reason: reason.to_owned() };
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| bad(&e.to_string()))?;
    let oid = NOISE_KEY_OID.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
    for ext in cert.extensions() {
        if ext.oid.to_id_string() == oid {
            return match ext.value {
                [0x04, 0x20, key @ ..] if key.len() == 32 => {
                    let mut k = [0u8; 32];
                    k.copy_from_slice(key);
                    Ok(Some(k))
                }
                _ => Err(bad("the Noise key extension is not a 32-byte OCTET STRING")),
            };
        }
    }
    Ok(None)
}

/// `sha256:<hex>` of a PEM certificate's DER (how CA fingerprints are shown and pinned).
pub fn cert_fingerprint(cert_pem: &str) -> Result<String, CaError> {
    use sha2::Digest;
    let der = parse_cert_pem(cert_pem)?;
    let hex: String = sha2::Sha256::digest(der.as_ref()).iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

/// Whether the certificate `cert_der` carries a valid ECDSA P-256 / SHA-256 signature (the
/// only kind relayfed CAs make) by the key of the CA certificate `ca_der`.
pub fn issued_by(cert_der: &[u8], ca_der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (Ok((_, cert)), Ok((_, ca))) = (X509Certificate::from_der(cert_der), X509Certificate::from_der(ca_der)) else {
        return false;
    };
    let key = &ca.tbs_certificate.subject_pki.subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(cert.tbs_certificate.as_ref(), &cert.signature_value.data)
        .is_ok()
}

/// Reads the node id from a certificate's `relayfed://<trust_domain>/<node-id>` URI SAN.
pub fn node_id_from_cert(der: &[u8], trust_domain: &str) -> Result<String, CaError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let no_id = || CaError::NoIdentity { trust_domain: trust_domain.to_owned() };
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| no_id())?;
    let san = cert.subject_alternative_name().map_err(|_| no_id())?.ok_or_else(no_id)?;
    let prefix = format!("relayfed://{trust_domain}/");
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) => uri.strip_prefix(&prefix).map(str::to_owned),
            _ => None,
        })
        .filter(|id| check_label("node id", id).is_ok())
        .ok_or_else(no_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(name: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_signed_csr_names_our_node_and_binds_the_noise_key() {
        let ca = FederationCa::generate("acme.example").unwrap();
        let now = SystemTime::now();
        // The CSR asks for another name: the CA decides the identity, not the requester.
        let pem = ca.sign_csr(&csr("admin"), "web-1", now, now + Duration::from_secs(600), Some(&[7u8; 32])).unwrap();
        let der = parse_cert_pem(&pem).unwrap();
        assert_eq!(node_id_from_cert(&der, "acme.example").unwrap(), "web-1");
        assert_eq!(noise_key_from_cert(&der).unwrap(), Some([7u8; 32]));
        let plain = ca.sign_csr(&csr("x"), "web-2", now, now + Duration::from_secs(600), None).unwrap();
        assert_eq!(noise_key_from_cert(&parse_cert_pem(&plain).unwrap()).unwrap(), None);
        assert!(ca.sign_csr("not a csr", "web-3", now, now, None).is_err());
        assert!(ca.sign_csr(&csr("x"), "Bad_Name", now, now, None).is_err());
    }

    proptest::proptest! {
        #[test]
        fn reading_the_noise_binding_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = noise_key_from_cert(&bytes);
        }

        #[test]
        fn splitting_a_chain_never_panics_and_loses_no_byte(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..900)) {
            if let Ok(certs) = split_der_chain(&bytes) {
                let joined: Vec<u8> = certs.iter().flat_map(|c| c.as_ref().iter().copied()).collect();
                proptest::prop_assert_eq!(joined, bytes);
            }
        }
    }

    #[test]
    fn a_chain_splits_into_its_certificates_and_garbage_is_refused() {
        let ca = FederationCa::generate("acme.example").unwrap();
        let leaf = ca.issue("hub-eu", Duration::from_secs(3600)).unwrap().cert_der().unwrap();
        let root = ca.certified_key().cert_der().unwrap();
        let chain: Vec<u8> = [leaf.as_ref(), root.as_ref()].concat();
        assert_eq!(split_der_chain(&chain).unwrap(), vec![leaf.clone(), root.clone()]);
        assert_eq!(split_der_chain(leaf.as_ref()).unwrap(), vec![leaf.clone()]);
        assert!(split_der_chain(&[]).is_err());
        assert!(split_der_chain(&[&chain[..], &[0u8, 1, 2]].concat()).is_err(), "trailing bytes");
        let five: Vec<u8> = std::iter::repeat_n(leaf.as_ref(), 5).flatten().copied().collect();
        assert!(split_der_chain(&five).is_err(), "more than MAX_CHAIN");
    }

    #[test]
    fn issued_certificates_carry_the_identity() {
        let ca = FederationCa::generate("acme.example").unwrap();
        let node = ca.issue("hub-eu", Duration::from_secs(3600)).unwrap();
        let der = node.cert_der().unwrap();
        assert_eq!(node_id_from_cert(&der, "acme.example").unwrap(), "hub-eu");
        assert!(matches!(node_id_from_cert(&der, "other.example"), Err(CaError::NoIdentity { .. })));
        node.key_der().unwrap();
    }

    #[test]
    fn a_certificate_is_issued_by_the_ca_that_signed_it_and_a_reissue_keeps_the_key() {
        let (old, new) =
            (FederationCa::generate("acme.example").unwrap(), FederationCa::generate("acme.example").unwrap());
        let node = old.issue_bound("shop", Duration::from_secs(3600), Some(&[3u8; 32])).unwrap();
        let der = node.cert_der().unwrap();
        assert!(old.issued(&der) && !new.issued(&der), "same name, different keys");
        let again = new.reissue_bound("shop", Duration::from_secs(3600), Some(&[3u8; 32]), &node.key_pem).unwrap();
        let again = parse_cert_pem(&again).unwrap();
        assert!(new.issued(&again) && !old.issued(&again));
        assert_eq!(noise_key_from_cert(&again).unwrap(), Some([3u8; 32]));
        let spki = |d: &[u8]| {
            use x509_parser::prelude::{FromDer, X509Certificate};
            X509Certificate::from_der(d).unwrap().1.tbs_certificate.subject_pki.raw.to_vec()
        };
        assert_eq!(spki(&der), spki(&again), "the node's key pair is kept");
        assert!(!issued_by(b"garbage", &again) && !issued_by(&der, b"garbage"));
        assert!(new.reissue_bound("shop", Duration::from_secs(60), None, "not a key").is_err());
    }

    #[test]
    fn a_reloaded_ca_keeps_issuing() {
        let ca = FederationCa::generate("acme.example").unwrap();
        let k = ca.certified_key().clone();
        let again = FederationCa::from_pem("acme.example", &k.cert_pem, &k.key_pem).unwrap();
        let node = again.issue("pay-us", Duration::from_secs(60)).unwrap();
        assert_eq!(node_id_from_cert(&node.cert_der().unwrap(), "acme.example").unwrap(), "pay-us");
    }

    #[test]
    fn bad_names_are_refused() {
        let ca = FederationCa::generate("acme.example").unwrap();
        assert!(matches!(ca.issue("Hub_EU", Duration::from_secs(1)), Err(CaError::BadName { .. })));
        assert!(FederationCa::generate("Acme.example").is_err());
    }
}
