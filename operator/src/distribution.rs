//! The config distribution server: holds the latest snapshot of every node, answers
//! long-polls from relays and sidecars (mTLS, the client certificate names the node), and
//! tracks the version each node acknowledged. Wire protocol: docs/protocol.md §10 and
//! `relayfed_proto::distribution`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use relayfed_proto::config::Role;
use relayfed_proto::config::Snapshot;
use relayfed_proto::distribution::{ALPN, Ack, AckResult, MAX_REPORT_BYTES, MAX_WAIT_SECONDS, Report, parse_path};
use relayfed_serving::identity::{HopIdentity, SharedIdentity};
use relayfed_serving::{Admitted, BoundedListener, ServerLimits, http1};
use serde::Serialize;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::OperatorMetrics;
use crate::rollout::analysis::{self, Cohorts, History, Subject};

/// Largest ack body accepted.
const MAX_ACK_BYTES: usize = 16 * 1024;

/// One node's published snapshot.
#[derive(Clone, Debug)]
struct Published {
    version: u64,
    json: Bytes,
    snapshot: Arc<Snapshot>,
    at: Instant,
}

/// What a node last acknowledged.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AckState {
    /// Acknowledged version.
    pub version: u64,
    /// Outcome.
    pub result: AckResult,
    /// Fields waiting for a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_required: Vec<String>,
    /// Error text for an invalid snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Seconds since the Unix epoch when the ack arrived.
    pub at_unix: u64,
}

/// The store every subscriber reads from.
pub struct Distributor {
    published: watch::Sender<BTreeMap<String, Published>>,
    acks: Mutex<BTreeMap<String, AckState>>,
    /// Counts acknowledgements, so waiters wake on each one.
    acked: watch::Sender<u64>,
    generation: Mutex<u64>,
    metrics: Arc<OperatorMetrics>,
    /// Cohort reports over the rollouts' evaluation window (their analyses read them).
    reports: Mutex<Reports>,
    /// The main relays among the published nodes (kept at publish; reports name them).
    mains: Mutex<Vec<String>>,
}

/// The reports of the last window, per rollout.
#[derive(Default)]
struct Reports {
    /// ECH cohorts.
    ech: History,
    /// Direct-path cohorts.
    direct: History,
    /// How long they are kept.
    keep: Duration,
}

/// Reports are kept this long until a rollout says its window.
const DEFAULT_REPORT_WINDOW: Duration = Duration::from_secs(300);

impl Distributor {
    /// An empty store; versions continue after `generation` (e.g. the last version served
    /// before a restart, so nodes never see a version go backwards).
    pub fn new(metrics: Arc<OperatorMetrics>, generation: u64) -> Arc<Self> {
        Arc::new(Self {
            published: watch::channel(BTreeMap::new()).0,
            acks: Mutex::new(BTreeMap::new()),
            acked: watch::channel(0).0,
            generation: Mutex::new(generation),
            metrics,
            reports: Mutex::new(Reports { keep: DEFAULT_REPORT_WINDOW, ..Reports::default() }),
            mains: Mutex::new(Vec::new()),
        })
    }

    /// Publishes a compiled plan. Nodes whose snapshot changed (ignoring `version`) get the
    /// next generation number as their new version; the others keep theirs. Nodes missing
    /// from `snapshots` are withdrawn. Returns the nodes that got a new version.
    pub fn publish(&self, snapshots: &BTreeMap<String, Snapshot>) -> Vec<String> {
        let mut generation = match self.generation.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let next_gen = *generation + 1;
        let mut changed = Vec::new();
        self.published.send_modify(|map| {
            map.retain(|node, _| snapshots.contains_key(node));
            for (node, snap) in snapshots {
                let same = map
                    .get(node)
                    .is_some_and(|p| Snapshot { version: p.snapshot.version, ..snap.clone() } == *p.snapshot);
                if same {
                    continue;
                }
                let mut s = snap.clone();
                s.version = next_gen;
                let json = match serde_json::to_vec(&s) {
                    Ok(j) => Bytes::from(j),
                    Err(e) => {
                        warn!(%node, error = %e, "cannot encode snapshot");
                        continue;
                    }
                };
                self.metrics.config_published_version.get_or_create(&[("node", node.clone())]).set(next_gen as i64);
                map.insert(
                    node.clone(),
                    Published { version: next_gen, json, snapshot: Arc::new(s), at: Instant::now() },
                );
                changed.push(node.clone());
            }
        });
        if let Ok(mut r) = self.reports.lock() {
            r.ech.retain(|node| snapshots.contains_key(node));
            r.direct.retain(|node| snapshots.contains_key(node));
        }
        if let Ok(mut m) = self.mains.lock() {
            *m = snapshots.iter().filter(|(_, s)| s.node.role == Role::Main).map(|(n, _)| n.clone()).collect();
        }
        if !changed.is_empty() {
            *generation = next_gen;
            info!(version = next_gen, nodes = ?changed, "published config snapshots");
        }
        changed
    }

    /// Every published snapshot, by node.
    pub fn published(&self) -> BTreeMap<String, Snapshot> {
        self.published.borrow().iter().map(|(n, p)| (n.clone(), (*p.snapshot).clone())).collect()
    }

    /// The snapshot currently published for `node`.
    pub fn snapshot(&self, node: &str) -> Option<Arc<Snapshot>> {
        self.published.borrow().get(node).map(|p| p.snapshot.clone())
    }

    /// The version published for each node.
    pub fn versions(&self) -> BTreeMap<String, u64> {
        self.published.borrow().iter().map(|(n, p)| (n.clone(), p.version)).collect()
    }

    /// The version published for `node`.
    pub fn version(&self, node: &str) -> Option<u64> {
        self.published.borrow().get(node).map(|p| p.version)
    }

    /// `node`'s last acknowledgement.
    pub fn ack(&self, node: &str) -> Option<AckState> {
        self.acks.lock().ok()?.get(node).cloned()
    }

    /// The last acknowledgement of each node.
    pub fn acks(&self) -> BTreeMap<String, AckState> {
        self.acks.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Changes whenever a node acknowledges a version (watch it, then read [`Self::acks`]).
    pub fn ack_changes(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
    }

    /// The latest generation number handed out.
    pub fn generation(&self) -> u64 {
        self.generation.lock().map(|g| *g).unwrap_or(0)
    }

    /// Waits until every published node acknowledged its current version (or `deadline`
    /// passes); returns the nodes still behind. After a publication every node is looked at;
    /// after acknowledgements only those still behind, at most every 5 ms (10,000 nodes
    /// acknowledging one by one would otherwise cost a scan of all of them each).
    pub async fn wait_acked(&self, deadline: Duration) -> Vec<String> {
        let until = tokio::time::Instant::now() + deadline;
        let mut rx = self.published.subscribe();
        let mut acked = self.acked.subscribe();
        let mut behind: Option<Vec<String>> = None;
        loop {
            // Mark both as seen before reading the state, so no change is missed.
            acked.borrow_and_update();
            let republished = rx.has_changed().unwrap_or(false);
            {
                let published = rx.borrow_and_update();
                let acks = match self.acks.lock() {
                    Ok(a) => a,
                    Err(p) => p.into_inner(),
                };
                let lagging =
                    |n: &String| published.get(n).is_some_and(|p| acks.get(n).is_none_or(|a| a.version < p.version));
                behind = Some(match behind.take() {
                    Some(mut nodes) if !republished => {
                        nodes.retain(|n| lagging(n));
                        nodes
                    }
                    _ => published.keys().filter(|n| lagging(n)).cloned().collect(),
                });
            }
            let nodes = behind.as_ref().map(Vec::len).unwrap_or(0);
            if nodes == 0 || tokio::time::Instant::now() >= until {
                return behind.unwrap_or_default();
            }
            tokio::select! {
                _ = rx.changed() => {
                    behind = None;
                }
                _ = acked.changed() => {
                    tokio::time::sleep(Duration::from_millis(5).min(until - tokio::time::Instant::now())).await;
                }
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Records `node`'s acknowledgement, unless it names a version never published to it.
    pub fn record_ack(&self, node: &str, ack: Ack) -> Result<(), String> {
        let published = self.published.borrow().get(node).map(|p| (p.version, p.at));
        if let Err(reason) = ack_acceptable(published.map(|(v, _)| v), ack.version) {
            self.metrics.config_refusals.get_or_create(&[("reason", "unknown_version")]).inc();
            warn!(%node, version = ack.version, %reason, "acknowledgement refused");
            return Err(reason);
        }
        if let Some((version, at)) = published
            && ack.version == version
        {
            self.metrics.config_ack_seconds.observe(at.elapsed().as_secs_f64());
        }
        let label = match ack.result {
            AckResult::Applied => "applied",
            AckResult::RestartRequired => "restart_required",
            AckResult::Invalid => "invalid",
        };
        self.metrics.config_acks.get_or_create(&[("result", label)]).inc();
        self.metrics.config_acked_version.get_or_create(&[("node", node.to_owned())]).set(ack.version as i64);
        if ack.result == AckResult::Invalid {
            warn!(%node, version = ack.version, detail = ?ack.detail, "node refused a config snapshot");
        } else {
            debug!(%node, version = ack.version, result = label, "config acknowledged");
        }
        let at_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if let Ok(mut a) = self.acks.lock() {
            a.insert(
                node.to_owned(),
                AckState {
                    version: ack.version,
                    result: ack.result,
                    restart_required: ack.restart_required,
                    detail: ack.detail,
                    at_unix,
                },
            );
        }
        self.acked.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Records `node`'s ECH and direct-path cohort counters, stamped with this server's clock.
    /// Only nodes in the plan report, and only counters toward main relays in the plan are
    /// kept.
    pub fn record_report(&self, node: &str, report: Report) -> Result<(), String> {
        if !self.published.borrow().contains_key(node) {
            return Err(format!("node {node:?} is not in the plan"));
        }
        let mains = self.main_relays();
        let by_main: BTreeMap<String, Cohorts> = report
            .by_main
            .iter()
            .filter(|(m, _)| mains.contains(m))
            .map(|(m, c)| (m.clone(), Cohorts::from(c)))
            .collect();
        let direct: BTreeMap<String, Cohorts> = report
            .direct_by_main
            .iter()
            .filter(|(m, _)| mains.contains(m))
            .map(|(m, c)| (m.clone(), Cohorts::from(c)))
            .collect();
        let at = SystemTime::now();
        if let Ok(mut r) = self.reports.lock() {
            let keep = r.keep;
            r.ech.record(analysis::Report { node: node.to_owned(), at, by_main }, keep);
            if !direct.is_empty() {
                r.direct.record(analysis::Report { node: node.to_owned(), at, by_main: direct }, keep);
            }
        }
        self.metrics.rollout_reports.get_or_create(&[("result", "accepted")]).inc();
        debug!(%node, "cohort report recorded");
        Ok(())
    }

    /// The main relays of the published plan (sorted).
    pub fn main_relays(&self) -> Vec<String> {
        self.mains.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// How long reports are kept: the rollouts' longest evaluation window.
    pub fn set_report_window(&self, window: Duration) {
        if let Ok(mut r) = self.reports.lock() {
            r.keep = window;
        }
    }

    /// Every node's counter increase of `subject`'s cohorts over `window` ending at `now`, by
    /// destination main relay, from reports received after `not_before`.
    pub fn cohort_increase(
        &self,
        subject: Subject,
        window: Duration,
        now: SystemTime,
        not_before: SystemTime,
    ) -> BTreeMap<String, Cohorts> {
        self.reports
            .lock()
            .map(|r| match subject {
                Subject::Ech => r.ech.increase_since(window, now, not_before),
                Subject::DirectPaths => r.direct.increase_since(window, now, not_before),
            })
            .unwrap_or_default()
    }

    /// Binds `addr` and serves the distribution endpoint with `identity` (a certificate from
    /// the federation CA; a [`SharedIdentity`] the caller replaces takes effect at the next
    /// connection: a CA rotation); returns the bound address.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
        identity: impl Into<SharedIdentity>,
    ) -> anyhow::Result<SocketAddr> {
        let shared: SharedIdentity = identity.into();
        let first = shared.get();
        // Rebuilt only when the certificate or the CAs changed (compared as DER, no parsing).
        let material = |id: &HopIdentity| (id.leaf_der().to_vec(), id.roots().to_vec());
        let mut tls = (material(&first), acceptor(&first)?);
        let limits = ServerLimits::DISTRIBUTION;
        let listener = BoundedListener::bind(addr, limits, "distribution").await?;
        let local = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let Admitted { tcp, remote, permit } = listener.accept().await;
                let _ = tcp.set_nodelay(true);
                let identity = shared.get();
                let now = material(&identity);
                if tls.0 != now {
                    match acceptor(&identity) {
                        Ok(a) => tls = (now, a),
                        Err(e) => warn!(error = %e, "renewed distribution identity unusable; keeping the previous one"),
                    }
                }
                let (acceptor, this) = (tls.1.clone(), self.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            this.metrics.config_refusals.get_or_create(&[("reason", "tls")]).inc();
                            warn!(%remote, error = %e, "distribution TLS handshake refused");
                            return;
                        }
                        Err(_) => return,
                    };
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .ok_or_else(|| "no client certificate".to_owned())
                        .and_then(|c| identity.node_id_of_chain(c).map_err(|e| e.to_string()));
                    let client = match client {
                        Ok(c) => c,
                        Err(e) => {
                            this.metrics.config_refusals.get_or_create(&[("reason", "identity")]).inc();
                            warn!(%remote, error = %e, "distribution client without a node identity");
                            return;
                        }
                    };
                    this.metrics.config_subscribers.inc();
                    let metrics = this.metrics.clone();
                    let span = info_span!("distribution", node = %client, %remote);
                    let svc = hyper::service::service_fn(move |req| {
                        let (this, client) = (this.clone(), client.clone());
                        async move { Ok::<_, Infallible>(this.handle(&client, req).await) }
                    });
                    let _ = http1(&limits).serve_connection(TokioIo::new(tls), svc).instrument(span).await;
                    metrics.config_subscribers.dec();
                });
            }
        });
        Ok(local)
    }

    async fn handle(self: &Arc<Self>, client: &str, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let Some((kind, node)) = parse_path(req.uri().path()) else {
            return text(StatusCode::NOT_FOUND, "unknown path; see docs/protocol.md §10\n");
        };
        if node != client {
            self.metrics.config_refusals.get_or_create(&[("reason", "wrong_node")]).inc();
            return text(StatusCode::FORBIDDEN, &format!("certificate is for node {client:?}, not {node:?}\n"));
        }
        let node = node.to_owned();
        match (kind, req.method()) {
            ("snapshot", &Method::GET) => {
                let query = req.uri().query().unwrap_or("");
                let param = |k: &str| -> Option<u64> {
                    query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                };
                let after = param("after").unwrap_or(0);
                let wait = Duration::from_secs(param("waitSeconds").unwrap_or(30).min(MAX_WAIT_SECONDS));
                self.long_poll(&node, after, wait).await
            }
            ("ack", &Method::POST) => {
                let body = match Limited::new(req.into_body(), MAX_ACK_BYTES).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, &format!("ack body: {e}\n")),
                };
                match Ack::parse(&body) {
                    Ok(ack) => match self.record_ack(&node, ack) {
                        Ok(()) => {
                            let mut r = Response::new(Full::new(Bytes::new()));
                            *r.status_mut() = StatusCode::NO_CONTENT;
                            r
                        }
                        Err(reason) => text(StatusCode::CONFLICT, &format!("ack: {reason}\n")),
                    },
                    Err(e) => text(StatusCode::BAD_REQUEST, &format!("ack: {e}\n")),
                }
            }
            ("report", &Method::POST) => {
                let body = match Limited::new(req.into_body(), MAX_REPORT_BYTES).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, &format!("report body: {e}\n")),
                };
                let recorded = Report::parse(&body).and_then(|r| self.record_report(&node, r));
                match recorded {
                    Ok(()) => {
                        let mut r = Response::new(Full::new(Bytes::new()));
                        *r.status_mut() = StatusCode::NO_CONTENT;
                        r
                    }
                    Err(e) => {
                        self.metrics.rollout_reports.get_or_create(&[("result", "refused")]).inc();
                        text(StatusCode::BAD_REQUEST, &format!("report: {e}\n"))
                    }
                }
            }
            _ => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "GET /v1/snapshot/{node}, POST /v1/ack/{node} or POST /v1/report/{node}\n",
            ),
        }
    }

    async fn long_poll(&self, node: &str, after: u64, wait: Duration) -> Response<Full<Bytes>> {
        let mut rx = self.published.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let found = rx.borrow_and_update().get(node).cloned();
            match found {
                None => return text(StatusCode::NOT_FOUND, &format!("no snapshot for node {node:?} in the plan\n")),
                Some(p) if p.version > after => {
                    self.metrics.config_served.inc();
                    let mut r = Response::new(Full::new(p.json));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("application/json"),
                    );
                    if let Ok(v) = hyper::header::HeaderValue::from_str(&p.version.to_string()) {
                        r.headers_mut().insert("x-relayfed-version", v);
                    }
                    return r;
                }
                Some(_) => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => {
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = StatusCode::NOT_MODIFIED;
                    return r;
                }
            }
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain"));
    r
}

/// Whether an acknowledgement of `version` can be true when `published` is the newest version
/// published to the node: a version above it (or any version for a node with nothing
/// published) was never sent, so status must not report it applied.
pub fn ack_acceptable(published: Option<u64>, version: u64) -> Result<(), String> {
    match published {
        None => Err(format!("version {version} acknowledged, but nothing is published for this node")),
        Some(p) if version > p => Err(format!("version {version} acknowledged, but {p} is the newest published")),
        Some(_) => Ok(()),
    }
}

/// The TLS acceptor of the distribution endpoint for `identity`.
fn acceptor(identity: &HopIdentity) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(identity.rustls_server(&[ALPN])?)))
}

#[cfg(test)]
mod tests {
    use super::ack_acceptable;

    #[test]
    fn only_published_versions_can_be_acknowledged() {
        assert!(ack_acceptable(Some(7), 7).is_ok());
        assert!(ack_acceptable(Some(7), 5).is_ok(), "a late ack of an earlier version is true");
        assert!(ack_acceptable(Some(7), 999_999).unwrap_err().contains("7 is the newest"));
        assert!(ack_acceptable(None, 1).is_err());
    }
}
