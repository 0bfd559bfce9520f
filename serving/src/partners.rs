//! Main relays of another trust domain (docs/protocol.md §2.3). Their certificates chain to
//! nothing this node's CA vouches for; one is accepted when it names the partner's node id
//! in the partner's trust domain and chains to a pinned CA: one of the Peer's `caBundle`, or
//! a CA certificate the partner presents in its chain whose public key has a pinned
//! fingerprint. Nothing but the pin is shared between the two organisations.

use std::sync::{Arc, RwLock};

use relayfed_proto::config::PeerPin;
use relayfed_proto::config::policy::{fingerprint, parse_fingerprint};
use relayfed_proto::crypto::ca::node_id_from_cert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use thiserror::Error;

/// Why a partner's certificate chain was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PinError {
    /// No CA of the pin issued the chain (no bundle CA, no presented CA with a pinned key).
    #[error("pinned identity mismatch: no pinned CA of {trust_domain} issued this certificate")]
    NoPinnedCa {
        /// The partner's trust domain.
        trust_domain: String,
    },
    /// The chain does not verify against the pinned CA (signature, validity, usage).
    #[error("pinned identity mismatch: {0}")]
    PinnedChain(String),
    /// The certificate names another node (or none) in the partner's trust domain.
    #[error("pinned identity mismatch: the certificate does not name {expected} of {trust_domain}")]
    WrongNode {
        /// The node id the Peer names.
        expected: String,
        /// The partner's trust domain.
        trust_domain: String,
    },
    /// The pin itself is unusable (a CA bundle that does not parse, a malformed fingerprint).
    #[error("pin for {node}: {reason}")]
    BadPin {
        /// The peer.
        node: String,
        /// What is wrong.
        reason: String,
    },
}

/// A peer main relay of another trust domain and how it is recognised.
#[derive(Clone, Debug)]
pub struct Partner {
    /// Its node id.
    pub node_id: String,
    /// Its trust domain.
    pub trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    fingerprints: Vec<[u8; 32]>,
}

/// The partners a node accepts, shared by its verifiers and replaced when the plan changes.
pub type Partners = Arc<RwLock<Arc<Vec<Partner>>>>;

/// The `sha256:` fingerprint of a certificate's SubjectPublicKeyInfo (what a Peer pins).
pub fn spki_fingerprint(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(fingerprint(cert.tbs_certificate.subject_pki.raw))
}

impl Partner {
    /// The partner `node_id` recognised by `pin`.
    pub fn from_pin(node_id: &str, pin: &PeerPin) -> Result<Self, PinError> {
        let bad = |reason: String| PinError::BadPin { node: node_id.to_owned(), reason };
        let roots = match &pin.ca_bundle {
            Some(pem) => {
                use rustls_pki_types::pem::PemObject;
                let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
                let certs = certs.map_err(|e| bad(format!("caBundle: {e}")))?;
                if certs.is_empty() {
                    return Err(bad("caBundle holds no certificate".into()));
                }
                certs
            }
            None => Vec::new(),
        };
        let fingerprints = pin
            .fingerprints
            .iter()
            .map(|f| parse_fingerprint(f).ok_or_else(|| bad(format!("{f:?} is not sha256:<64 hex>"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { node_id: node_id.to_owned(), trust_domain: pin.trust_domain.clone(), roots, fingerprints })
    }

    /// Checks `chain` (leaf first) at `now`: it chains to a pinned CA and names this partner.
    pub fn verify(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<(), PinError> {
        match self.node_of(chain, now)? {
            id if id == self.node_id => Ok(()),
            _ => Err(PinError::WrongNode { expected: self.node_id.clone(), trust_domain: self.trust_domain.clone() }),
        }
    }

    /// The node of the partner's trust domain that `chain` (leaf first) names, when it chains
    /// to a pinned CA at `now`: how an origin checks a destination home of the partner.
    pub fn node_of(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<String, PinError> {
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(PinError::PinnedChain("no certificate".into()));
        };
        let mut store = RootCertStore::empty();
        for ca in &self.roots {
            let _ = store.add(ca.clone());
        }
        for ca in rest {
            let pinned = spki_fingerprint(ca)
                .and_then(|f| parse_fingerprint(&f))
                .is_some_and(|f| self.fingerprints.contains(&f));
            if pinned {
                let _ = store.add(ca.clone().into_owned());
            }
        }
        if store.is_empty() {
            return Err(PinError::NoPinnedCa { trust_domain: self.trust_domain.clone() });
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| PinError::PinnedChain(e.to_string()))?;
        verifier.verify_client_cert(leaf, rest, now).map_err(|e| PinError::PinnedChain(e.to_string()))?;
        node_id_from_cert(leaf, &self.trust_domain).map_err(|_| PinError::WrongNode {
            expected: self.node_id.clone(),
            trust_domain: self.trust_domain.clone(),
        })
    }
}

impl Partner {
    /// The CA certificates that speak for this partner: its `caBundle`, and those of
    /// `presented` (certificates its relay showed, passed on by a relay of ours that no one
    /// has to trust) whose public key is pinned. What checks a partner relay's ECH config
    /// signature (docs/protocol.md §5.7).
    pub fn signers(&self, presented: &[CertificateDer<'_>]) -> Vec<CertificateDer<'static>> {
        let pinned = |c: &CertificateDer<'_>| {
            spki_fingerprint(c).and_then(|f| parse_fingerprint(&f)).is_some_and(|f| self.fingerprints.contains(&f))
        };
        self.roots
            .iter()
            .cloned()
            .chain(presented.iter().filter(|c| pinned(c)).map(|c| c.clone().into_owned()))
            .collect()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn refused(e: PinError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

fn chain_of(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Vec<CertificateDer<'static>> {
    std::iter::once(end_entity).chain(intermediates).map(|c| c.clone().into_owned()).collect()
}

/// The partners accepted now.
pub fn current(partners: &Partners) -> Arc<Vec<Partner>> {
    partners.read().map(|p| p.clone()).unwrap_or_else(|p| p.into_inner().clone())
}

/// The first partner whose pin accepts `chain`, if any.
pub fn partner_of(partners: &Partners, chain: &[CertificateDer<'_>], now: UnixTime) -> Option<Partner> {
    current(partners).iter().find(|p| p.verify(chain, now).is_ok()).cloned()
}

/// Client certificates from this node's CA, or from a partner by its pin.
#[derive(Debug)]
pub struct FederationClientVerifier {
    /// This node's CA.
    pub own: Arc<dyn ClientCertVerifier>,
    /// The partners accepted now.
    pub partners: Partners,
}

impl ClientCertVerifier for FederationClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.own.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let own = match self.own.verify_client_cert(end_entity, intermediates, now) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let chain = chain_of(end_entity, intermediates);
        let mut claimed = None;
        for p in current(&self.partners).iter() {
            match p.verify(&chain, now) {
                Ok(()) => return Ok(ClientCertVerified::assertion()),
                // The certificate claims this partner's domain: its refusal is the one to report.
                Err(e) if node_id_from_cert(end_entity, &p.trust_domain).is_ok() => claimed = Some(e),
                Err(_) => {}
            }
        }
        Err(claimed.map_or(own, refused))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.own.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.own.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.own.supported_verify_schemes()
    }
}

/// A partner's server certificate, by its pin (used when this relay dials it).
#[derive(Debug)]
pub struct PartnerServerVerifier {
    partner: Partner,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PartnerServerVerifier {
    /// Verifies servers as `partner`.
    pub fn new(partner: Partner) -> Self {
        Self { partner, algorithms: provider().signature_verification_algorithms }
    }
}

impl ServerCertVerifier for PartnerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin names the node (its certificate's relayfed:// identity), which is what the
        // server name would say.
        self.partner.verify(&chain_of(end_entity, intermediates), now).map_err(refused)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::HopIdentity;
    use relayfed_proto::crypto::ca::{FederationCa, parse_cert_pem};
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86_400);

    /// A node identity of `ca` for `node`.
    fn identity(ca: &FederationCa, node: &str) -> HopIdentity {
        let issued = ca.issue(node, DAY).unwrap();
        HopIdentity::from_pem(ca.trust_domain(), node, &ca.certified_key().cert_pem, &issued.cert_pem, &issued.key_pem)
            .unwrap()
    }

    /// What `identity` presents in a handshake (leaf, then its CA).
    fn presented(id: &HopIdentity) -> Vec<CertificateDer<'static>> {
        let leaf = CertificateDer::from(id.leaf_der().to_vec());
        std::iter::once(leaf).chain(id.roots().iter().cloned()).collect()
    }

    fn ca_fingerprint(ca: &FederationCa) -> String {
        spki_fingerprint(&parse_cert_pem(&ca.certified_key().cert_pem).unwrap()).unwrap()
    }

    fn pin(trust_domain: &str, ca: Option<&FederationCa>, fingerprints: Vec<String>) -> PeerPin {
        PeerPin {
            trust_domain: trust_domain.into(),
            ca_bundle: ca.map(|c| c.certified_key().cert_pem.clone()),
            fingerprints,
        }
    }

    #[test]
    fn a_partner_is_recognised_by_its_ca_key_or_bundle_and_nothing_else() {
        let ours = FederationCa::generate("acme.example").unwrap();
        let theirs = FederationCa::generate("partner.example").unwrap();
        let stranger = FederationCa::generate("partner.example").unwrap();
        let hub = identity(&ours, "hub-a");
        let partner_hub = presented(&identity(&theirs, "partner-hub"));
        let now = UnixTime::now();

        let by_key = Partner::from_pin("partner-hub", &pin("partner.example", None, vec![ca_fingerprint(&theirs)]));
        let by_bundle = Partner::from_pin("partner-hub", &pin("partner.example", Some(&theirs), vec![]));
        let (by_key, by_bundle) = (by_key.unwrap(), by_bundle.unwrap());
        assert_eq!(by_key.verify(&partner_hub, now), Ok(()));
        assert_eq!(by_bundle.verify(&partner_hub, now), Ok(()));
        // Only the leaf (the CA not presented): a key pin has nothing to match; a bundle does.
        assert!(matches!(by_key.verify(&partner_hub[..1], now), Err(PinError::NoPinnedCa { .. })));
        assert_eq!(by_bundle.verify(&partner_hub[..1], now), Ok(()));

        // Another CA of the same trust domain name, another node of the partner: refused.
        let impostor = presented(&identity(&stranger, "partner-hub"));
        assert!(matches!(by_key.verify(&impostor, now), Err(PinError::NoPinnedCa { .. })));
        assert!(matches!(by_bundle.verify(&impostor, now), Err(PinError::PinnedChain(_))));
        let sibling = presented(&identity(&theirs, "other-hub"));
        assert!(matches!(by_key.verify(&sibling, now), Err(PinError::WrongNode { .. })));

        // Our node maps the partner's chain to the partner's node id, and nothing else to it.
        hub.set_partners(vec![by_key]);
        assert_eq!(hub.node_id_of_chain(&partner_hub).unwrap(), "partner-hub");
        assert!(hub.node_id_of_chain(&impostor).is_err());
        assert_eq!(hub.node_id_of_chain(&presented(&identity(&ours, "hub-b"))).unwrap(), "hub-b");
    }

    #[test]
    fn during_a_ca_rotation_both_pinned_keys_are_accepted_and_only_they() {
        // The partner rotates its CA: relays still on the old CA and those on the new one both
        // pass while the Peer pins both keys (fingerprint + nextFingerprint).
        let old = FederationCa::generate("partner.example").unwrap();
        let new = FederationCa::generate("partner.example").unwrap();
        let both = pin("partner.example", None, vec![ca_fingerprint(&old), ca_fingerprint(&new)]);
        let partner = Partner::from_pin("partner-hub", &both).unwrap();
        let now = UnixTime::now();
        assert_eq!(partner.verify(&presented(&identity(&old, "partner-hub")), now), Ok(()));
        assert_eq!(partner.verify(&presented(&identity(&new, "partner-hub")), now), Ok(()));
        let after =
            Partner::from_pin("partner-hub", &pin("partner.example", None, vec![ca_fingerprint(&new)])).unwrap();
        assert!(after.verify(&presented(&identity(&old, "partner-hub")), now).is_err(), "the old key, once unpinned");
    }

    #[test]
    fn a_pinned_ca_cannot_pass_for_one_of_our_nodes() {
        let ours = FederationCa::generate("acme.example").unwrap();
        // The partner's CA makes a certificate naming one of our nodes in our trust domain.
        let rogue = FederationCa::generate("acme.example").unwrap();
        let hub = identity(&ours, "hub-a");
        hub.set_partners(vec![
            Partner::from_pin("partner-hub", &pin("partner.example", None, vec![ca_fingerprint(&rogue)])).unwrap(),
        ]);
        let forged = presented(&identity(&rogue, "hub-b"));
        let err = hub.node_id_of_chain(&forged).unwrap_err();
        assert!(err.to_string().contains("neither our CA nor a pinned partner"), "{err}");
    }

    #[test]
    fn unusable_pins_are_refused_with_the_reason() {
        let bad_bundle = pin("partner.example", None, vec![]);
        let bad_bundle = PeerPin { ca_bundle: Some("not pem".into()), ..bad_bundle };
        assert!(matches!(Partner::from_pin("p", &bad_bundle), Err(PinError::BadPin { .. })));
        let bad_key = pin("partner.example", None, vec!["sha256:xyz".into()]);
        assert!(matches!(Partner::from_pin("p", &bad_key), Err(PinError::BadPin { .. })));
    }
}
