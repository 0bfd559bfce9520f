//! The operator's plain-HTTP admin port: `/metrics`, `/healthz` (the process runs) and
//! `/readyz` (this replica leads, so the Service routes config subscribers to it only).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use relayfed_sidecar::serving::{Admitted, BoundedListener, ServerLimits, http1};

use crate::metrics::OperatorMetrics;

/// Serves the admin port on `addr`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<OperatorMetrics>,
    leading: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
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
                            (&Method::GET, "/readyz") if leading.load(Ordering::Relaxed) => {
                                (StatusCode::OK, "leading\n".to_owned())
                            }
                            (&Method::GET, "/readyz") => (StatusCode::SERVICE_UNAVAILABLE, "following\n".to_owned()),
                            _ => (StatusCode::NOT_FOUND, "GET /metrics, /healthz, /readyz\n".to_owned()),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
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
