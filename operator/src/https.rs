//! Server-only TLS for the operator's HTTPS endpoints that clients reach before they hold a
//! federation certificate (the injection webhook, certificate issuance).

use std::sync::Arc;

use relayfed_sidecar::serving::{Admitted, BoundedListener, ServerLimits, http1, tls_accept};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS acceptor (TLS 1.2/1.3, ALPN http/1.1, no client certificates) from PEM.
pub fn acceptor(cert_pem: &str, key_pem: &str) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

/// Binds `addr` and serves HTTP/1.1 over TLS (certificate and key in PEM): every request goes
/// to `handle`, which answers with a status and a body. Returns the bound address.
pub async fn serve<F, Fut>(
    addr: std::net::SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    handle: F,
) -> anyhow::Result<std::net::SocketAddr>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (hyper::StatusCode, String)> + Send + 'static,
{
    let acceptor = acceptor(cert_pem, key_pem)?;
    let limits = ServerLimits::FLEET;
    let listener = BoundedListener::bind(addr, limits, "https").await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Admitted { tcp, remote, permit } = listener.accept().await;
            let (acceptor, handle) = (acceptor.clone(), handle.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let Some(tls) = tls_accept(&acceptor, tcp, &limits).await else {
                    tracing::debug!(%remote, "TLS handshake failed or timed out");
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let handle = handle.clone();
                    async move {
                        let (status, body) = handle(req).await;
                        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                        *r.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = http1(&limits).serve_connection(hyper_util::rt::TokioIo::new(tls), svc).await;
            });
        }
    });
    Ok(local)
}
