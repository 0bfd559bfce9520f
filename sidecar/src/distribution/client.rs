//! The subscribing side of config distribution: long-polls the server for this node's next
//! snapshot version, hands it to the node, and acknowledges what happened.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{ALPN, Ack, AckResult, REPORT_SECONDS, Report};
use crate::admin::metrics::Metrics;
use crate::config::Snapshot;
use crate::federation::direct_cohorts::DirectCohorts;
use crate::federation::ech_cohorts::EchCohorts;
use crate::resilience::backoff::{Backoff, Retry};
use crate::transport::tls::SharedIdentity;

/// Where and as whom a node subscribes.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// Server address, `host:port`.
    pub server: String,
    /// Node id in the server's certificate (verified as `<id>.<trust-domain>`).
    pub server_node: String,
    /// This node's TLS identity (its node id names the snapshot asked for); a renewal
    /// replaces it and the next connection presents the new certificate.
    pub identity: SharedIdentity,
    /// Seconds each long-poll may wait.
    pub wait_seconds: u64,
    /// Cohort counters to report (calling homes): sent every [`REPORT_SECONDS`] while they
    /// change, between long-polls (which then wait at most that long).
    pub reports: Option<Counters>,
}

/// The cohort counters a calling home reports for the rollouts' analyses.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// ECH cohorts.
    pub ech: Arc<EchCohorts>,
    /// Direct-path cohorts (counted only while direct paths are on).
    pub direct: Arc<DirectCohorts>,
}

/// Why one round with the server failed (the subscription retries with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP, TLS or HTTP failure.
    #[error("distribution server {server}: {reason}")]
    Transport {
        /// Server address.
        server: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with an unexpected status.
    #[error("distribution server answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Response body (the server's explanation).
        body: String,
    },
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Longest a connection to the distribution server may take to set up (a server busy with
/// a fleet reconnecting at once is tried again after backoff, not waited on).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Subscription {
    fn transport(&self, reason: impl std::fmt::Display) -> ClientError {
        ClientError::Transport { server: self.server.clone(), reason: reason.to_string() }
    }

    /// Connects (TCP, TLS, HTTP/1.1) within [`CONNECT_TIMEOUT`].
    async fn connect(&self) -> Result<Sender, ClientError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_now())
            .await
            .map_err(|_| self.transport(format!("no connection within {CONNECT_TIMEOUT:?}")))?
    }

    async fn connect_now(&self) -> Result<Sender, ClientError> {
        let identity = self.identity.get();
        let tls = identity.rustls_client(ALPN).map_err(|e| self.transport(e))?;
        let name = rustls_pki_types::ServerName::try_from(identity.server_name(&self.server_node))
            .map_err(|e| self.transport(e))?;
        let tcp = tokio::net::TcpStream::connect(&self.server).await.map_err(|e| self.transport(e))?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| self.transport(format!("TLS: {e}")))?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| self.transport(e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "distribution connection closed");
            }
        });
        Ok(sender)
    }

    async fn request(
        &self,
        sender: &mut Sender,
        method: Method,
        path: String,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Option<u64>, Bytes), ClientError> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.server.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.transport(e))?;
        sender.ready().await.map_err(|e| self.transport(e))?;
        let deadline = Duration::from_secs(self.wait_seconds + 15);
        let resp = tokio::time::timeout(deadline, sender.send_request(req))
            .await
            .map_err(|_| self.transport("no answer in time"))?
            .map_err(|e| self.transport(e))?;
        let status = resp.status();
        let version = resp.headers().get("x-relayfed-version").and_then(|v| v.to_str().ok()?.parse().ok());
        let body = resp.into_body().collect().await.map_err(|e| self.transport(e))?.to_bytes();
        Ok((status, version, body))
    }

    /// One connection's worth of long-polls; returns on the first failure.
    async fn session<F>(&self, version: &mut u64, metrics: &Metrics, on_snapshot: &mut F) -> Result<(), ClientError>
    where
        F: FnMut(Snapshot) -> Ack,
    {
        let node = self.identity.get().node_id;
        let mut sender = self.connect().await?;
        info!(server = %self.server, after = *version, "subscribed to config distribution");
        // Report the version this node runs (its start-up file, or the last one applied).
        let hello = Ack { version: *version, result: AckResult::Applied, restart_required: vec![], detail: None };
        let body = serde_json::to_vec(&hello).map_err(|e| self.transport(e))?;
        let (status, _, text) = self.request(&mut sender, Method::POST, format!("/v1/ack/{node}"), body).await?;
        if !status.is_success() {
            return Err(ClientError::Status { status: status.as_u16(), body: String::from_utf8_lossy(&text).into() });
        }
        let mut reported = None;
        loop {
            let mut wait = self.wait_seconds;
            if let Some(counters) = &self.reports {
                wait = wait.min(REPORT_SECONDS);
                // Keeps the admin API's ECH health window sampled.
                let _ = counters.ech.recent(std::time::Instant::now());
                let totals = Report { by_main: counters.ech.totals(), direct_by_main: counters.direct.totals() };
                let empty = totals.by_main.is_empty() && totals.direct_by_main.is_empty();
                if !empty && reported.as_ref() != Some(&totals) {
                    let body = serde_json::to_vec(&totals).map_err(|e| self.transport(e))?;
                    let (status, _, text) =
                        self.request(&mut sender, Method::POST, format!("/v1/report/{node}"), body).await?;
                    if status.is_success() {
                        reported = Some(totals);
                    } else {
                        // The rollout analysis misses this node; config distribution goes on.
                        warn!(status = status.as_u16(), answer = %String::from_utf8_lossy(&text).trim(), "cohort report refused");
                    }
                }
            }
            let path = format!("/v1/snapshot/{node}?after={}&waitSeconds={wait}", *version);
            let (status, header_version, body) = self.request(&mut sender, Method::GET, path, Vec::new()).await?;
            let ack = match status {
                StatusCode::NOT_MODIFIED => continue,
                StatusCode::OK => {
                    let parsed = std::str::from_utf8(&body)
                        .map_err(|e| e.to_string())
                        .and_then(Snapshot::parse)
                        .and_then(|s| s.validate().map(|()| s).map_err(|e| e.to_string()));
                    match parsed {
                        Ok(snap) if snap.node.id != node => Ack {
                            version: snap.version,
                            result: AckResult::Invalid,
                            restart_required: vec![],
                            detail: Some(format!("snapshot is for node {:?}", snap.node.id)),
                        },
                        Ok(snap) => on_snapshot(snap),
                        Err(reason) => Ack {
                            version: header_version.unwrap_or(*version),
                            result: AckResult::Invalid,
                            restart_required: vec![],
                            detail: Some(reason),
                        },
                    }
                }
                other => {
                    return Err(ClientError::Status {
                        status: other.as_u16(),
                        body: String::from_utf8_lossy(&body).into_owned(),
                    });
                }
            };
            let label = match ack.result {
                AckResult::Applied => "applied",
                AckResult::RestartRequired => "restart_required",
                AckResult::Invalid => "invalid",
            };
            metrics.transport.config_updates.get_or_create(&[("result", label)]).inc();
            if ack.result == AckResult::Invalid {
                warn!(version = ack.version, detail = ?ack.detail, "config snapshot refused; the previous one stays in force");
            }
            *version = (*version).max(ack.version);
            let body = serde_json::to_vec(&ack).map_err(|e| self.transport(e))?;
            let (status, _, text) = self.request(&mut sender, Method::POST, format!("/v1/ack/{node}"), body).await?;
            if !status.is_success() {
                return Err(ClientError::Status {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&text).into(),
                });
            }
        }
    }

    /// Fetches this node's current snapshot once (`after=0`): what a new sidecar starts from.
    /// `Ok(None)` when the server does not know the node yet (`404`: not planned yet).
    pub async fn fetch(&self) -> Result<Option<Snapshot>, ClientError> {
        let node = self.identity.get().node_id;
        let mut sender = self.connect().await?;
        let path = format!("/v1/snapshot/{node}?after=0&waitSeconds=0");
        let (status, _, body) = self.request(&mut sender, Method::GET, path, Vec::new()).await?;
        match status {
            StatusCode::OK => {
                let snap = std::str::from_utf8(&body).map_err(|e| e.to_string()).and_then(Snapshot::parse).map_err(
                    |reason| ClientError::Status { status: 200, body: format!("invalid snapshot: {reason}") },
                )?;
                Ok(Some(snap))
            }
            StatusCode::NOT_FOUND => Ok(None),
            other => {
                Err(ClientError::Status { status: other.as_u16(), body: String::from_utf8_lossy(&body).into_owned() })
            }
        }
    }

    /// Runs forever: keeps a long-poll open, calls `on_snapshot` for every new version (the
    /// returned ack is sent back), and reconnects with capped, jittered backoff.
    pub async fn run<F>(self, mut version: u64, metrics: Arc<Metrics>, mut on_snapshot: F)
    where
        F: FnMut(Snapshot) -> Ack + Send,
    {
        let span = info_span!("config", server = %self.server, node = %self.identity.get().node_id);
        async move {
            let mut retry = Retry::new(Backoff::SUBSCRIBE);
            loop {
                let started = std::time::Instant::now();
                if let Err(e) = self.session(&mut version, &metrics, &mut on_snapshot).await {
                    metrics.transport.config_updates.get_or_create(&[("result", "error")]).inc();
                    warn!(error = %e, "config distribution unavailable; retrying");
                }
                if started.elapsed() > Duration::from_secs(10) {
                    retry.succeeded();
                }
                tokio::time::sleep(retry.next_wait()).await;
            }
        }
        .instrument(span)
        .await
    }
}
