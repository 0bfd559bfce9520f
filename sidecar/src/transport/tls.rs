//! Hop TLS: mutual TLS 1.3 over QUIC with certificates from the federation CA.
//!
//! Servers require a client certificate chaining to the CA; clients verify the server as
//! `<node-id>.<trust-domain>`, so a certificate for another node is refused. ALPN names the
//! protocol version; a peer without it is refused by the handshake itself.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

use crate::config::{Snapshot, Timeouts};
use crate::crypto::ca::{CaError, node_id_from_cert, parse_key_pem};

/// ALPN of relayfed protocol version 1.
pub const ALPN: &[u8] = b"relayfed/1";

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

    /// Replaces the identity (a renewed certificate).
    pub fn replace(&self, next: HopIdentity) {
        match self.0.write() {
            Ok(mut g) => *g = next,
            Err(p) => *p.into_inner() = next,
        }
    }
}

impl From<HopIdentity> for SharedIdentity {
    fn from(id: HopIdentity) -> Self {
        Self(Arc::new(std::sync::RwLock::new(id)))
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl HopIdentity {
    /// Loads the identity named by a snapshot.
    pub fn load(snap: &Snapshot) -> Result<Self, TlsError> {
        let pass = snap.passphrase().map_err(|e| TlsError::Identity(e.to_string()))?;
        let key = crate::config::keys::read_secret(&snap.tls.key_file, pass.as_deref())
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
        let chain = certs(cert)?;
        let own = node_id_from_cert(&chain[0], trust_domain)?;
        if own != node_id {
            return Err(TlsError::Identity(format!("certificate is for node {own:?}, config says {node_id:?}")));
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            node_id: node_id.to_owned(),
            roots: certs(ca)?,
            chain,
            key: Arc::new(parse_key_pem(key)?),
            verifier: Default::default(),
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

    /// rustls server configuration (TLS 1.3, client certificates from the CA required) with
    /// the given ALPN protocols; QUIC hops and the config distribution server share it.
    pub fn rustls_server(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = self.client_verifier()?;
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

    /// QUIC server configuration: client certificates required, ALPN `relayfed/1`.
    pub fn server_config(&self, timeouts: &Timeouts) -> Result<quinn::ServerConfig, TlsError> {
        let tls = self.rustls_server(&[ALPN])?;
        let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(transport(timeouts));
        Ok(cfg)
    }

    /// A QUIC endpoint bound to `listen` serving `server`. Its stateless-reset key is
    /// derived from this node's private key, so a restarted process (same key, same address)
    /// answers packets of its previous life's connections with resets the peers accept: they
    /// learn of the restart at their next packet instead of at their idle timeout.
    pub fn server_endpoint(
        &self,
        server: quinn::ServerConfig,
        listen: std::net::SocketAddr,
    ) -> std::io::Result<quinn::Endpoint> {
        let socket = std::net::UdpSocket::bind(listen)?;
        let runtime =
            quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
        quinn::Endpoint::new(self.endpoint_config(), Some(server), socket, runtime)
    }

    fn endpoint_config(&self) -> quinn::EndpointConfig {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"relayfed stateless reset key v1\0");
        h.update(self.key.secret_der());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &h.finalize());
        quinn::EndpointConfig::new(Arc::new(key))
    }

    /// QUIC client configuration presenting this node's certificate.
    pub fn client_config(&self, timeouts: &Timeouts) -> Result<quinn::ClientConfig, TlsError> {
        self.client_config_with_alpn(timeouts, ALPN)
    }

    /// As [`HopIdentity::client_config`] with another ALPN (tests prove a wrong one is refused).
    pub fn client_config_with_alpn(&self, timeouts: &Timeouts, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.rustls_client(alpn)?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport(timeouts));
        Ok(cfg)
    }

    /// The server name to dial `node_id` by.
    pub fn server_name(&self, node_id: &str) -> String {
        crate::crypto::ca::node_dns_name(node_id, &self.trust_domain)
    }

    /// The authenticated node id of the peer of `conn`.
    pub fn peer_node_id(&self, conn: &quinn::Connection) -> Result<String, TlsError> {
        let id = conn.peer_identity().ok_or_else(|| TlsError::Identity("no certificate".into()))?;
        let chain = id
            .downcast::<Vec<CertificateDer<'static>>>()
            .map_err(|_| TlsError::Identity("unexpected identity type".into()))?;
        self.node_id_of_chain(&chain)
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
        Ok((node, crate::crypto::ca::noise_key_from_cert(der)?))
    }

    /// When this node's certificate expires (Unix seconds), for the expiry metric.
    pub fn not_after_unix(&self) -> Option<i64> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(self.leaf_der()).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// The node id named by a verified peer certificate chain (leaf first).
    pub fn node_id_of_chain(&self, chain: &[CertificateDer<'_>]) -> Result<String, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::Identity("empty chain".into()))?;
        Ok(node_id_from_cert(leaf, &self.trust_domain)?)
    }
}

/// Transport parameters: keep-alives, idle timeout, windows sized for bulk streams.
fn transport(timeouts: &Timeouts) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let idle = link_idle(timeouts);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(idle / 4));
    // quinn preallocates state for every stream a peer may open, so the default stays small
    // (a relay holds thousands of home connections); links that carry many streams (peer
    // relays, and a home's single link to its relay) raise it with `raise_stream_limit`.
    t.max_concurrent_bidi_streams(HOME_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    Arc::new(t)
}

/// Shortest link idle timeout honoured (keep-alives every 50 ms).
pub const MIN_LINK_IDLE: Duration = Duration::from_millis(200);

/// How long a hop link may hear nothing before it is dead (`timeouts.idleMs`, at least
/// [`MIN_LINK_IDLE`]).
pub fn link_idle(timeouts: &Timeouts) -> Duration {
    Duration::from_millis(timeouts.idle_ms).max(MIN_LINK_IDLE)
}

/// Concurrent streams a home node may open to its main relay at first (the relay doubles it,
/// up to [`TRUNK_STREAMS`], whenever a home uses three quarters of it).
pub const HOME_STREAMS: u32 = 16;
/// Concurrent streams on links that aggregate many callers (relay <-> relay, relay -> home).
pub const TRUNK_STREAMS: u32 = 8192;

/// Raises the number of streams the peer of `conn` may open at once (trunk links).
pub fn raise_stream_limit(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(TRUNK_STREAMS.into());
}

/// Low-cardinality reason a hop handshake failed, for logs and metric labels.
pub fn failure_reason(err: &quinn::ConnectionError) -> &'static str {
    let text = format!("{err:?} {err}");
    if text.contains("UnknownIssuer") || text.contains("BadSignature") || text.contains("unknown ca") {
        "unknown_ca"
    } else if text.contains("Expired") || text.contains("certificate expired") {
        "expired"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "node_id_mismatch"
    } else if text.contains("NoApplicationProtocol")
        || text.contains("no_application_protocol")
        || text.contains("crypto(78)")
    {
        "alpn"
    } else if text.contains("TimedOut") || text.contains("timed out") {
        "timeout"
    } else if text.contains("CertificateRequired")
        || text.contains("certificate required")
        || text.contains("NoCertificatesPresented")
        || text.contains("no certificates")
        || text.contains("crypto(74)")
    {
        "no_client_certificate"
    } else {
        "other"
    }
}
