//! Workload certificates, the client side: a sidecar in a pod sends a CSR (and its Noise
//! static public key) with its projected service-account token to the operator's certificate
//! server and gets a short-lived certificate naming the node id the operator chose.
//! Wire format: docs/protocol.md §11. The server is `relayfed_operator::identity`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

use crate::crypto::ca::node_dns_name;
pub use relayfed_proto::distribution::certificate::{CertificateRequest, CertificateResponse};

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// TCP, TLS or HTTP failure (retry).
    #[error("certificate server {server}: {reason}")]
    Transport {
        /// Server address.
        server: String,
        /// What failed.
        reason: String,
    },
    /// The server refused (its JSON error body says why; 401/403/400 will not change on retry).
    #[error("certificate server refused ({status}): {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
}

impl CertificateError {
    /// Whether trying again later can succeed (transport failures and 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Refused { status, .. } => *status >= 500,
        }
    }
}

/// Where and how a sidecar asks for its certificate.
#[derive(Clone, Debug)]
pub struct CertificateClient {
    /// Server address, `host:port`.
    pub server: String,
    /// The federation CA (PEM) that issued the server's certificate.
    pub ca_pem: String,
    /// Trust domain (the server presents `<server_node>.<trust domain>`).
    pub trust_domain: String,
    /// Node id in the server's certificate.
    pub server_node: String,
}

impl CertificateClient {
    fn transport(&self, reason: impl std::fmt::Display) -> CertificateError {
        CertificateError::Transport { server: self.server.clone(), reason: reason.to_string() }
    }

    /// Sends one request with the bearer `token`.
    pub async fn request(
        &self,
        token: &str,
        req: &CertificateRequest,
    ) -> Result<CertificateResponse, CertificateError> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let c = c.map_err(|e| self.transport(format!("CA bundle: {e}")))?;
            roots.add(c).map_err(|e| self.transport(format!("CA bundle: {e}")))?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.transport(e))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls_pki_types::ServerName::try_from(node_dns_name(&self.server_node, &self.trust_domain))
            .map_err(|e| self.transport(e))?;
        let tcp = tokio::net::TcpStream::connect(&self.server).await.map_err(|e| self.transport(e))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| self.transport(format!("TLS: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| self.transport(e))?;
        tokio::spawn(conn);
        let body = serde_json::to_vec(req).map_err(|e| self.transport(e))?;
        let http = Request::builder()
            .method(Method::POST)
            .uri("/v1/certificate")
            .header(hyper::header::HOST, self.server.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.transport(e))?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(30), sender.send_request(http))
            .await
            .map_err(|_| self.transport("no answer in 30 s"))?
            .map_err(|e| self.transport(e))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| self.transport(e))?.to_bytes();
        if !status.is_success() {
            return Err(CertificateError::Refused {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| CertificateError::Refused {
            status: status.as_u16(),
            body: format!("not a certificate response: {e}"),
        })
    }
}
