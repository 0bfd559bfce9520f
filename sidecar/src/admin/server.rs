//! The admin HTTP server: `/metrics` (Prometheus), `/healthz`, and the JSON federation API
//! (`/federation/health`, `/federation/peers`, `/federation/registry`,
//! `/federation/trace?service=NAME&port=N`).
//!
//! It reads the metrics registry and short-lived snapshots of node state, never data-path
//! locks held across I/O. `/metrics` and `/healthz` answer anyone (Prometheus, probes); the
//! federation API (registry, peers, health, trace probes) answers loopback clients only, as
//! Linkerd's admin server does: it names every service, node and relay, and a trace probe
//! spends the node's rate limit at its relay. Reach it with `kubectl port-forward` or `exec`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::serving::{Admitted, BoundedListener, ServerLimits, http1};

use super::metrics::Metrics;

/// What a node exposes under `/federation/`.
pub trait FederationAdmin: Send + Sync {
    /// JSON for `/federation/health`, `/federation/peers` or `/federation/registry`.
    fn json(&self, path: &str) -> Option<Value>;
    /// A path-trace probe to `service:port`.
    fn trace<'a>(&'a self, service: &'a str, port: u16) -> Pin<Box<dyn Future<Output = Value> + Send + 'a>>;
}

/// Set once the node has started; the admin API answers 503 until then.
pub type AdminSlot = Arc<OnceLock<Arc<dyn FederationAdmin>>>;

/// Binds `addr` and serves until the process exits; returns the bound address.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, federation: AdminSlot) -> std::io::Result<SocketAddr> {
    let listener = BoundedListener::bind(addr, ServerLimits::ADMIN, "admin").await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Admitted { tcp, remote, permit } = listener.accept().await;
            let metrics = metrics.clone();
            let federation = federation.clone();
            let local_client = remote.ip().to_canonical().is_loopback();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    let federation = federation.clone();
                    async move { Ok::<_, Infallible>(route(&req, local_client, &metrics, &federation).await) }
                });
                let _ = http1(&ServerLimits::ADMIN).serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Ok(local)
}

/// Whether a client may read `path`: metrics and health from anywhere, the federation API
/// from loopback only.
fn allowed(path: &str, local_client: bool) -> bool {
    local_client || !path.starts_with("/federation/")
}

/// The Content-Type of `/metrics` everywhere (prometheus-client writes OpenMetrics text;
/// Prometheus 3 refuses scrapes without a Content-Type).
pub use relayfed_serving::OPENMETRICS;

/// The value of `key` in a URL query string (`a=1&b=2`), undecoded; the first one wins.
pub fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

async fn route(
    req: &Request<hyper::body::Incoming>,
    local_client: bool,
    metrics: &Metrics,
    federation: &AdminSlot,
) -> Response<Full<Bytes>> {
    const JSON: &str = "application/json";
    let path = req.uri().path();
    let (status, ctype, body) = match path {
        "/metrics" => (StatusCode::OK, OPENMETRICS, metrics.encode()),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        p if !allowed(p, local_client) => (
            StatusCode::FORBIDDEN,
            "text/plain",
            "the federation API answers on localhost only: use `kubectl port-forward` or `kubectl exec`\n".to_owned(),
        ),
        p if p.starts_with("/federation/") => match federation.get() {
            None => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n".to_owned()),
            Some(f) if p == "/federation/trace" => {
                let q = req.uri().query().unwrap_or("");
                match (query_param(q, "service"), query_param(q, "port").map(str::parse::<u16>)) {
                    (Some(service), Some(Ok(port))) => (StatusCode::OK, JSON, f.trace(service, port).await.to_string()),
                    _ => (
                        StatusCode::BAD_REQUEST,
                        "text/plain",
                        "usage: /federation/trace?service=NAME&port=N\n".to_owned(),
                    ),
                }
            }
            Some(f) => match f.json(p) {
                Some(v) => (StatusCode::OK, JSON, v.to_string()),
                None => (
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "try /federation/health, peers, registry or trace\n".to_owned(),
                ),
            },
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /federation/health\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

impl FederationAdmin for crate::relay::MainRelay {
    fn json(&self, path: &str) -> Option<Value> {
        self.admin_json(path)
    }

    fn trace<'a>(&'a self, _service: &'a str, _port: u16) -> Pin<Box<dyn Future<Output = Value> + Send + 'a>> {
        Box::pin(async { serde_json::json!({"error": "probes start at home nodes: ask a home node's admin port"}) })
    }
}

impl FederationAdmin for crate::proxy::HomeNode {
    fn json(&self, path: &str) -> Option<Value> {
        self.admin_json(path)
    }

    fn trace<'a>(&'a self, service: &'a str, port: u16) -> Pin<Box<dyn Future<Output = Value> + Send + 'a>> {
        Box::pin(self.trace(service, port))
    }
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn metrics_are_open_and_the_federation_api_is_local_only() {
        for p in ["/metrics", "/healthz"] {
            assert!(allowed(p, false) && allowed(p, true), "{p}");
        }
        for p in ["/federation/registry", "/federation/trace", "/federation/health", "/federation/peers"] {
            assert!(!allowed(p, false), "{p} answered a remote client");
            assert!(allowed(p, true), "{p}");
        }
    }
}
