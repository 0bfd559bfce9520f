//! The plain-HTTP admin port of the operator and of the injection webhook: `/metrics`,
//! `/healthz` (the process runs) and `/readyz` (the operator: this replica has reached the API
//! server and read the leader Lease; the webhook: it serves). Readiness
//! does not depend on leadership, so a follower is Ready and rolling updates complete; the
//! distribution Service selects the leader by its pod label instead ([`super::leader`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use relayfed_serving::OPENMETRICS;
use relayfed_serving::{Admitted, BoundedListener, ServerLimits, http1};

use crate::metrics::OperatorMetrics;

/// What this replica knows about itself, for the probes.
#[derive(Debug, Default)]
pub struct Role {
    /// It holds the leader Lease.
    pub leading: AtomicBool,
    /// It has read the Lease at least once (the API server is reachable and RBAC allows it).
    pub ready: AtomicBool,
    /// It takes part in no leader election (the injection webhook): ready once serving.
    pub standalone: bool,
}

impl Role {
    /// A process without leader election, ready from the start (the injection webhook).
    pub fn standalone() -> Self {
        Self { leading: AtomicBool::new(false), ready: AtomicBool::new(true), standalone: true }
    }

    /// The `/readyz` answer.
    fn readiness(&self) -> (StatusCode, &'static str) {
        if self.standalone {
            return (StatusCode::OK, "ready\n");
        }
        match (self.ready.load(Ordering::Relaxed), self.leading.load(Ordering::Relaxed)) {
            (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "waiting to reach the API server and the leader Lease\n"),
            (true, true) => (StatusCode::OK, "ready, leading\n"),
            (true, false) => (StatusCode::OK, "ready, following\n"),
        }
    }
}

/// Serves the admin port on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<OperatorMetrics>, leading: Arc<Role>) -> std::io::Result<SocketAddr> {
    let listener = BoundedListener::bind(addr, ServerLimits::ADMIN, "operator-admin").await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Admitted { tcp, permit, .. } = listener.accept().await;
            let (metrics, leading) = (metrics.clone(), leading.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (metrics, leading) = (metrics.clone(), leading.clone());
                    async move {
                        let (status, body) = match (req.method(), req.uri().path()) {
                            (&Method::GET, "/metrics") => (StatusCode::OK, metrics.encode()),
                            (&Method::GET, "/healthz") => (StatusCode::OK, "ok\n".to_owned()),
                            (&Method::GET, "/readyz") => {
                                let (status, text) = leading.readiness();
                                (status, text.to_owned())
                            }
                            _ => (StatusCode::NOT_FOUND, "GET /metrics, /healthz, /readyz\n".to_owned()),
                        };
                        let metrics_page = req.uri().path() == "/metrics";
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        let ctype = if metrics_page { OPENMETRICS } else { "text/plain; charset=utf-8" };
                        r.headers_mut()
                            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = http1(&ServerLimits::ADMIN).serve_connection(io, svc).await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.to_ascii_lowercase()
    }

    #[tokio::test]
    async fn metrics_carry_the_openmetrics_content_type_and_followers_are_ready() {
        let role = Arc::new(Role::default());
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(OperatorMetrics::new()), role.clone()).await.unwrap();
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("content-type: application/openmetrics-text; version=1.0.0"), "{metrics}");
        assert!(get(addr, "/readyz").await.starts_with("http/1.0 503"), "not ready before the Lease was read");
        role.ready.store(true, Ordering::Relaxed);
        let follower = get(addr, "/readyz").await;
        assert!(follower.starts_with("http/1.0 200") && follower.ends_with("ready, following\n"), "{follower}");
        role.leading.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.ends_with("ready, leading\n"));
    }
}
