//! Server-only TLS for the operator's HTTPS endpoints that clients reach before they hold a
//! federation certificate (the injection webhook, certificate issuance).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use relayfed_serving::{Admitted, BoundedListener, ServerLimits, http1, tls_accept};
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

/// Where a server's certificate comes from.
#[derive(Clone, Debug)]
pub enum Certificates {
    /// Fixed PEM text (certificate chain, key).
    Pem(String, String),
    /// PEM files, re-read when either changes (a Secret updated by cert-manager or by
    /// `kubectl`): new connections use the new certificate, and a broken update keeps the old one.
    Files(PathBuf, PathBuf),
}

/// The acceptor for new connections, rebuilt when certificate files change.
struct Acceptors {
    source: Certificates,
    current: Mutex<(Option<(SystemTime, SystemTime)>, tokio_rustls::TlsAcceptor)>,
}

fn modified(paths: (&PathBuf, &PathBuf)) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(paths.0)?, m(paths.1)?))
}

fn read_pair(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    let c = std::fs::read_to_string(cert).with_context(|| cert.display().to_string())?;
    let k = std::fs::read_to_string(key).with_context(|| key.display().to_string())?;
    acceptor(&c, &k).with_context(|| format!("{} / {}", cert.display(), key.display()))
}

impl Acceptors {
    fn new(source: Certificates) -> anyhow::Result<Self> {
        let (stamp, acc) = match &source {
            Certificates::Pem(c, k) => (None, acceptor(c, k)?),
            Certificates::Files(c, k) => (modified((c, k)), read_pair(c, k)?),
        };
        Ok(Self { source, current: Mutex::new((stamp, acc)) })
    }

    /// The acceptor to use now (one `stat` per file per connection for file sources).
    fn get(&self) -> tokio_rustls::TlsAcceptor {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Certificates::Files(c, k) = &self.source {
            let stamp = modified((c, k));
            if stamp.is_some() && stamp != cur.0 {
                match read_pair(c, k) {
                    Ok(acc) => {
                        tracing::info!(cert = %c.display(), "serving certificate changed on disk: reloaded");
                        *cur = (stamp, acc);
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "serving certificate changed but does not load; keeping the previous one");
                        cur.0 = stamp;
                    }
                }
            }
        }
        cur.1.clone()
    }
}

/// Binds `addr` and serves HTTP/1.1 over TLS: every request goes to `handle`, which answers
/// with a status and a body. Returns the bound address.
pub async fn serve<F, Fut>(
    addr: std::net::SocketAddr,
    certs: Certificates,
    handle: F,
) -> anyhow::Result<std::net::SocketAddr>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (hyper::StatusCode, String)> + Send + 'static,
{
    let acceptors = Arc::new(Acceptors::new(certs)?);
    let limits = ServerLimits::FLEET;
    let listener = BoundedListener::bind(addr, limits, "https").await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Admitted { tcp, remote, permit } = listener.accept().await;
            let (acceptor, handle) = (acceptors.get(), handle.clone());
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
