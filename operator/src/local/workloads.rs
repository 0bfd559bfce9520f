//! Built-in demo workloads, so the examples need no other software: a home relay annotated
//! `relayfed.io/local-workload: http` (or `echo`) gets that service started on each of its
//! export targets.
//!
//! - `http`: HTTP/1.1; every response is JSON naming the service and the node that served it
//!   (`{"service","node","method","path","bytes"}`), and a POST body is counted.
//! - `echo`: raw TCP; every byte read is written back.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use relayfed_serving::{Admitted, BoundedListener, ServerLimits, http1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::warn;

/// Annotation on a home `Relay` that starts a built-in workload on its export targets.
pub const ANNOTATION: &str = "relayfed.io/local-workload";

/// A kind of built-in workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// HTTP/1.1 server answering JSON.
    Http,
    /// Raw TCP echo.
    Echo,
}

impl Workload {
    /// Parses the annotation value.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "http" => Ok(Self::Http),
            "echo" => Ok(Self::Echo),
            other => Err(format!("{ANNOTATION}: {other:?} is not a built-in workload (http, echo)")),
        }
    }

    /// The annotation value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Echo => "echo",
        }
    }
}

/// Starts `kind` on `addr` as `service` of `node`; the task runs until aborted.
pub async fn start(kind: Workload, addr: SocketAddr, service: String, node: String) -> std::io::Result<JoinHandle<()>> {
    let listener = BoundedListener::bind(addr, ServerLimits::FLEET, "workload").await?;
    Ok(tokio::spawn(async move {
        loop {
            let Admitted { tcp, permit, .. } = listener.accept().await;
            let (service, node) = (service.clone(), node.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match kind {
                    Workload::Echo => echo(tcp).await,
                    Workload::Http => http(tcp, service, node).await,
                }
            });
        }
    }))
}

async fn echo(mut tcp: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tcp.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn http(tcp: tokio::net::TcpStream, service: String, node: String) {
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (service, node) = (service.clone(), node.clone());
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let bytes = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
            let body =
                serde_json::json!({"service": service, "node": node, "method": method, "path": path, "bytes": bytes});
            let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
            r.headers_mut()
                .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
            Ok::<_, Infallible>(r)
        }
    });
    // A client may half-close after its request (`nc -N`, scripted calls): answer it anyway.
    let mut server = http1(&ServerLimits::FLEET);
    server.half_close(true);
    if let Err(e) = server.serve_connection(TokioIo::new(tcp), svc).await {
        warn!(error = %e, "built-in http workload: connection error");
    }
}

/// The built-in workloads running now, keyed by (node, address).
#[derive(Default)]
pub struct Running {
    tasks: std::collections::BTreeMap<(String, SocketAddr), (Workload, JoinHandle<()>)>,
}

impl Running {
    /// Starts, restarts or stops workloads to match the annotations of `resources`; returns
    /// (node, service, address, kind) of each one running.
    pub async fn sync(
        &mut self,
        resources: &[relayfed_crds::AnyResource],
    ) -> anyhow::Result<Vec<(String, String, SocketAddr, &'static str)>> {
        use anyhow::Context;
        use relayfed_crds::{AnyResource, RelayType};
        let mut wanted: std::collections::BTreeMap<(String, SocketAddr), (Workload, String)> = Default::default();
        for r in resources {
            let AnyResource::Relay(relay) = r else { continue };
            if relay.spec.relay_type != RelayType::Home {
                continue;
            }
            let Some(kind) = relay.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION)) else { continue };
            let kind = Workload::parse(kind).map_err(|e| anyhow::anyhow!("Relay/{}: {e}", r.name()))?;
            for e in &relay.spec.exports {
                if let Ok(addr) = e.target.parse::<SocketAddr>() {
                    wanted.insert((relay.spec.node_id.clone(), addr), (kind, e.name.clone()));
                }
            }
        }
        let stale: Vec<(String, SocketAddr)> = self
            .tasks
            .iter()
            .filter(|(k, (kind, _))| wanted.get(*k).is_none_or(|(w, _)| w != kind))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some((_, task)) = self.tasks.remove(&k) {
                task.abort();
                let _ = task.await;
            }
        }
        let mut listed = Vec::new();
        for ((node, addr), (kind, service)) in wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.tasks.entry((node.clone(), addr)) {
                let task = start(kind, addr, service.clone(), node.clone())
                    .await
                    .with_context(|| format!("built-in {} workload for {node}/{service} on {addr}", kind.label()))?;
                tracing::info!(%node, %service, %addr, kind = kind.label(), "built-in workload started");
                slot.insert((kind, task));
            }
            listed.push((node, service, addr, kind.label()));
        }
        Ok(listed)
    }

    /// Stops every workload.
    pub fn stop_all(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.tasks) {
            task.abort();
        }
    }
}
