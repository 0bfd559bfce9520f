//! A node's TLS identity: its certificate chain and key from the federation CA, the CA it
//! trusts, and rustls configurations built from them (mutual TLS 1.3). QUIC hops
//! (`relayfed_sidecar::transport::tls`), config distribution and the certificate server all
//! use it.

use std::sync::Arc;

use crate::partners::{FederationClientVerifier, Partner, PartnerServerVerifier, Partners, partner_of};
use relayfed_proto::config::Snapshot;
use relayfed_proto::crypto::ca::{CaError, node_id_from_cert, parse_key_pem};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Why TLS material could not be loaded or used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A certificate or key is malformed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(String),
    /// The peer presented no usable identity.
    #[error("peer identity: {0}")]
    Identity(String),
}

/// A node's identity that a certificate renewal replaces in place: connections made after
/// the swap present the new certificate, established ones keep theirs.
#[derive(Clone, Debug)]
pub struct SharedIdentity(Arc<std::sync::RwLock<HopIdentity>>);

impl SharedIdentity {
    /// The identity in force now.
    pub fn get(&self) -> HopIdentity {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the identity (a renewed certificate, or a CA rotation's new trust bundle);
    /// the partners accepted so far stay (server configurations built earlier keep seeing
    /// them).
    pub fn replace(&self, mut next: HopIdentity) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        next.partners = g.partners.clone();
        *g = next;
    }
}

impl From<HopIdentity> for SharedIdentity {
    fn from(id: HopIdentity) -> Self {
        Self(Arc::new(std::sync::RwLock::new(id)))
    }
}

impl From<&HopIdentity> for SharedIdentity {
    fn from(id: &HopIdentity) -> Self {
        id.clone().into()
    }
}

/// This node's TLS identity and the CA it trusts.
#[derive(Clone, Debug)]
pub struct HopIdentity {
    /// Trust domain.
    pub trust_domain: String,
    /// This node's id.
    pub node_id: String,
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The CA verifier for client certificates, built once (hop servers, and origins checking
    /// destinations' certificates on every stream setup).
    verifier: Arc<std::sync::OnceLock<Arc<dyn rustls::server::danger::ClientCertVerifier>>>,
    /// Main relays of other trust domains accepted by their pins (shared by every clone and
    /// by the server configurations built from it; replaced with the plan).
    partners: Partners,
}

fn read(path: &std::path::Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    let v: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let v = v.map_err(|e| TlsError::Rustls(format!("certificate PEM: {e}")))?;
    if v.is_empty() {
        return Err(TlsError::Rustls("no certificate in PEM".into()));
    }
    Ok(v)
}

/// rustls' ring provider with AES-128-GCM preferred: the cheapest AEAD where the CPU has AES
/// instructions, and as strong as the 128-bit security of the hops' P-256 keys. (The default
/// order puts AES-256-GCM first; the client's order decides.)
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        _ => 2,
    });
    Arc::new(p)
}

impl HopIdentity {
    /// The federation CA certificates this identity trusts (DER).
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Loads the identity named by a snapshot.
    pub fn load(snap: &Snapshot) -> Result<Self, TlsError> {
        let pass = snap.passphrase().map_err(|e| TlsError::Identity(e.to_string()))?;
        let key = relayfed_proto::config::keys::read_secret(&snap.tls.key_file, pass.as_deref())
            .map_err(|e| TlsError::Identity(e.to_string()))?;
        Self::from_pem(
            &snap.node.trust_domain,
            &snap.node.id,
            &read(&snap.tls.ca_file)?,
            &read(&snap.tls.cert_file)?,
            &String::from_utf8_lossy(&key),
        )
    }

    /// Builds an identity from PEM text.
    pub fn from_pem(trust_domain: &str, node_id: &str, ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        let mut chain = certs(cert)?;
        let own = node_id_from_cert(&chain[0], trust_domain)?;
        if own != node_id {
            return Err(TlsError::Identity(format!("certificate is for node {own:?}, config says {node_id:?}")));
        }
        let roots = certs(ca)?;
        // The CA goes with the leaf: a relay of another trust domain that pins our CA's key
        // (not a bundle) finds it in the chain.
        for r in &roots {
            if !chain.contains(r) {
                chain.push(r.clone());
            }
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            node_id: node_id.to_owned(),
            roots,
            chain,
            key: Arc::new(parse_key_pem(key)?),
            verifier: Default::default(),
            partners: Default::default(),
        })
    }

    fn root_store(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in &self.roots {
            roots.add(c.clone()).map_err(|e| TlsError::Rustls(format!("CA certificate: {e}")))?;
        }
        Ok(Arc::new(roots))
    }

    /// The verifier of client certificates issued by this node's CA (built on first use).
    fn client_verifier(&self) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        if let Some(v) = self.verifier.get() {
            return Ok(v.clone());
        }
        let v = WebPkiClientVerifier::builder_with_provider(self.root_store()?, provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        Ok(self.verifier.get_or_init(|| v).clone())
    }

    /// Replaces the partners (main relays of other trust domains) this node accepts; server
    /// configurations built earlier see the change at their next handshake.
    pub fn set_partners(&self, partners: Vec<Partner>) {
        match self.partners.write() {
            Ok(mut p) => *p = Arc::new(partners),
            Err(p) => *p.into_inner() = Arc::new(partners),
        }
    }

    /// rustls server configuration (TLS 1.3, client certificates from the CA, or from a
    /// partner by its pin, required) with the given ALPN protocols; QUIC hops and the config
    /// distribution server share it.
    pub fn rustls_server(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier =
            Arc::new(FederationClientVerifier { own: self.client_verifier()?, partners: self.partners.clone() });
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(tls)
    }

    /// rustls client configuration presenting this node's certificate, with one ALPN.
    pub fn rustls_client(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(self.root_store()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    /// rustls client configuration for dialing `partner`: its certificate is checked against
    /// its pin instead of this node's CA.
    pub fn rustls_client_for_partner(&self, alpn: &[u8], partner: Partner) -> Result<rustls::ClientConfig, TlsError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PartnerServerVerifier::new(partner)))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    /// The `sha256:` SPKI fingerprints of the CAs this identity trusts (what a Peer pins),
    /// in bundle order: `/federation/health` shows them, so a CA rotation can wait until
    /// every node trusts the new CA.
    pub fn root_fingerprints(&self) -> Vec<String> {
        self.roots.iter().filter_map(|r| crate::partners::spki_fingerprint(r)).collect()
    }

    /// The `sha256:` fingerprint of this node's certificate (DER), as
    /// `relayfed_proto::crypto::ca::cert_fingerprint` computes it from the PEM file.
    pub fn certificate_fingerprint(&self) -> String {
        relayfed_proto::config::policy::fingerprint(self.leaf_der())
    }

    /// The server name to dial `node_id` by.
    pub fn server_name(&self, node_id: &str) -> String {
        relayfed_proto::crypto::ca::node_dns_name(node_id, &self.trust_domain)
    }

    /// This node's certificate (DER), as sent to an origin in Noise message 2.
    pub fn leaf_der(&self) -> &[u8] {
        self.chain.first().map(|c| c.as_ref()).unwrap_or_default()
    }

    /// Verifies `der` as a node certificate of this federation (it chains to the CA, is
    /// valid now and allows client use) and returns the node id it names and the Noise key it
    /// binds, if any. Used by origins to check a destination's Noise key: a relay that made
    /// up a key cannot show a CA-issued certificate binding it.
    pub fn verify_node_cert(&self, der: &[u8]) -> Result<(String, Option<[u8; 32]>), TlsError> {
        let cert = CertificateDer::from(der.to_vec());
        self.client_verifier()?
            .verify_client_cert(&cert, &[], rustls_pki_types::UnixTime::now())
            .map_err(|e| TlsError::Identity(format!("certificate not issued by this federation's CA: {e}")))?;
        let node = node_id_from_cert(der, &self.trust_domain)?;
        Ok((node, relayfed_proto::crypto::ca::noise_key_from_cert(der)?))
    }

    /// This node's certificate followed by its CA's, as concatenated DER: what a destination
    /// sends in Noise message 2 to an origin of another trust domain (docs/protocol.md §6).
    pub fn chain_der(&self) -> Vec<u8> {
        self.chain.iter().flat_map(|c| c.as_ref().iter().copied()).collect()
    }

    /// Verifies `der` (concatenated DER, leaf first) as a node certificate of `partner`'s
    /// trust domain, by its pin; returns the node id it names and the Noise key it binds.
    pub fn verify_partner_node_cert(
        &self,
        partner: &Partner,
        der: &[u8],
    ) -> Result<(String, Option<[u8; 32]>), TlsError> {
        let chain = relayfed_proto::crypto::ca::split_der_chain(der)?;
        let node = partner
            .node_of(&chain, rustls_pki_types::UnixTime::now())
            .map_err(|e| TlsError::Identity(e.to_string()))?;
        Ok((node, relayfed_proto::crypto::ca::noise_key_from_cert(&chain[0])?))
    }

    /// When this node's certificate expires (Unix seconds), for the expiry metric.
    pub fn not_after_unix(&self) -> Option<i64> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(self.leaf_der()).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// The node id of a peer whose chain (leaf first) the handshake verified: named in this
    /// node's trust domain when this node's CA issued it, else the partner whose pin accepts
    /// it. A partner's CA cannot make a certificate that passes for one of our nodes.
    pub fn node_id_of_chain(&self, chain: &[CertificateDer<'_>]) -> Result<String, TlsError> {
        let (leaf, rest) = chain.split_first().ok_or_else(|| TlsError::Identity("empty chain".into()))?;
        // Without partners only our CA can have verified the chain in the handshake: read the
        // name, do not verify it again (every hop connection passes here).
        if crate::partners::current(&self.partners).is_empty() {
            return Ok(node_id_from_cert(leaf, &self.trust_domain)?);
        }
        let now = rustls_pki_types::UnixTime::now();
        if self.client_verifier()?.verify_client_cert(leaf, rest, now).is_ok() {
            return Ok(node_id_from_cert(leaf, &self.trust_domain)?);
        }
        partner_of(&self.partners, chain, now)
            .map(|p| p.node_id)
            .ok_or_else(|| TlsError::Identity("certificate issued by neither our CA nor a pinned partner".into()))
    }

    /// A 32-byte secret derived from this node's private key and `label` (SHA-256 over both):
    /// stable across restarts with the same key, different per label.
    pub fn derive_secret(&self, label: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(label);
        h.update(self.key.secret_der());
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use relayfed_proto::crypto::ca::FederationCa;
    use std::time::Duration;

    fn identity(issuer: &FederationCa, trusted: &[&FederationCa], node: &str) -> HopIdentity {
        let issued = issuer.issue(node, Duration::from_secs(3600)).unwrap();
        let bundle: String = trusted.iter().map(|c| c.certified_key().cert_pem.clone()).collect();
        HopIdentity::from_pem("acme.example", node, &bundle, &issued.cert_pem, &issued.key_pem).unwrap()
    }

    /// A whole TLS handshake in memory; the suite it agreed on, or the first side's error.
    fn handshake(client: &HopIdentity, server: &HopIdentity) -> Result<rustls::CipherSuite, String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        let name = rustls_pki_types::ServerName::try_from(client.server_name(&server.node_id)).map_err(|x| e(&x))?;
        let mut c = rustls::ClientConnection::new(Arc::new(client.rustls_client(b"t").map_err(|x| e(&x))?), name)
            .map_err(|x| e(&x))?;
        let mut s = rustls::ServerConnection::new(Arc::new(server.rustls_server(&[b"t"]).map_err(|x| e(&x))?))
            .map_err(|x| e(&x))?;
        for _ in 0..8 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).map_err(|x| e(&x))?;
            s.read_tls(&mut &buf[..]).map_err(|x| e(&x))?;
            s.process_new_packets().map_err(|x| format!("server: {x}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).map_err(|x| e(&x))?;
            c.read_tls(&mut &buf[..]).map_err(|x| e(&x))?;
            c.process_new_packets().map_err(|x| format!("client: {x}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c.negotiated_cipher_suite().map(|s| s.suite()).ok_or("no suite")?);
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn hops_agree_on_aes_128_gcm() {
        let ca = FederationCa::generate("acme.example").unwrap();
        let (a, b) = (identity(&ca, &[&ca], "hub-a"), identity(&ca, &[&ca], "hub-b"));
        assert_eq!(handshake(&a, &b), Ok(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));
    }

    #[test]
    fn during_a_ca_rotation_both_cas_are_accepted_and_afterwards_only_the_new_one() {
        // Two CAs of one trust domain: the same name, different keys.
        let (old, new) =
            (FederationCa::generate("acme.example").unwrap(), FederationCa::generate("acme.example").unwrap());
        let both_old = identity(&old, &[&old, &new], "hub-a");
        let both_new = identity(&new, &[&new, &old], "hub-b");
        let only_new = identity(&new, &[&new], "hub-c");
        let only_old = identity(&old, &[&old], "shop");
        assert!(handshake(&both_old, &both_new).is_ok(), "old certificate, both trusted");
        assert!(handshake(&both_new, &both_old).is_ok(), "new certificate, both trusted");
        assert!(handshake(&only_new, &both_new).is_ok(), "after the rotation, toward a node still in the overlap");
        // Why the old CA is dropped only once every node presents a new certificate:
        assert!(handshake(&only_new, &both_old).is_err(), "a node that dropped the old CA refuses its certificates");
        let refused = handshake(&only_old, &only_new).unwrap_err();
        assert!(refused.contains("UnknownIssuer") || refused.contains("BadSignature"), "{refused}");
        assert!(handshake(&only_new, &only_old).is_err(), "a node of the old CA alone refuses the new one");
    }
}
