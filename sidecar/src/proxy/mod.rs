//! Home node mode: dial the main relay, expose a local listener per imported service, and
//! deliver inbound federation streams to local targets.
//!
//! Outbound (origin, Noise initiator): accept a TCP client, decide ECH for the destination,
//! send ROUTE + Noise message 1, read message 2 (or an ERROR / RETRY_CONFIGS frame), send
//! message 3, then carry the TCP bytes as Noise transport messages. Inbound (destination,
//! Noise responder): read the delivered ROUTE and message 1, connect to the export's target,
//! answer message 2, read message 3, then carry bytes.

mod decide;
mod direct;
mod inbound;
mod outbound;
mod pump;
mod setup_counts;
mod uplinks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::metrics::Metrics;
use crate::config::keys::load_noise_key;
use crate::config::{Export, Import, LoadBalancing, MainRelay, Snapshot, Unmatched, base64_encode, decode_key32};
use crate::crypto::ech::seal;
use crate::crypto::noise::{Initiator, MAX_PLAINTEXT, RecvHalf, Responder, SendHalf, StaticKeypair, prologue};
use crate::federation::balancer::Balancer;
use crate::federation::ech_cohorts::EchCohorts;
use crate::federation::ech_policy::{EchDecision, EchPolicy};
use crate::federation::registry::{Entry, Key};
use crate::intercept::original_dst::original_dst;
use crate::protocol::control::{Control, MainInfo, Service, TraceHop};
use crate::protocol::route::{InnerRoute, MAX_HOPS, RouteBody, RouteHeader};
use crate::protocol::{EchConfigList, ErrorCode, Frame};
use crate::transport::io::{FrameIoError, read_frame, send_error, write_frames};
use crate::transport::tls::QuicIdentity;
use crate::transport::tls::{HopIdentity, failure_reason};

/// A failed stream: the code that goes on the wire, in logs and in metrics.
type StreamError = (ErrorCode, String);

/// A CA-signed ECH config learned from a view: (list, signature) as received, and the list.
type SignedEch = ((String, String), EchConfigList);

/// Shared state of a running home node.
pub struct HomeNode {
    identity: HopIdentity,
    noise: StaticKeypair,
    mains: Vec<MainRelay>,
    exports: Vec<Export>,
    imports: Vec<(String, u16)>,
    /// ECH configs by main relay, from the authenticated snapshot only (never from views or
    /// retry configs, which arrive through relays that must not choose the key).
    ech_configs: RwLock<HashMap<String, EchConfigList>>,
    /// ECH configs of main relays the snapshot does not list (another cluster's), learned from
    /// views and used only because the federation CA signed them (§5.7): by main relay,
    /// (list, signature) as received and the decoded list.
    signed_ech: RwLock<HashMap<String, SignedEch>>,
    /// The active main relay link (outbound calls use it; `None` between losing one and
    /// electing the next).
    conn: watch::Sender<Option<(String, quinn::Connection)>>,
    /// Every registered main relay link, active and standby, by main relay.
    uplinks: std::sync::Mutex<std::collections::BTreeMap<String, uplinks::Uplink>>,
    /// The last `attached` stamp sent (they strictly increase).
    attach_stamp: std::sync::atomic::AtomicU64,
    /// Whether an active relay was ever elected (a later election follows a loss).
    switched: std::sync::atomic::AtomicBool,
    endpoint: std::sync::OnceLock<quinn::Endpoint>,
    view: RwLock<(std::collections::BTreeMap<String, MainInfo>, Vec<Entry>)>,
    balancers: std::sync::Mutex<HashMap<(String, u16), Balancer>>,
    /// Settings a new config version replaces in place (new streams use them; streams in
    /// flight keep what they started with).
    live: RwLock<Arc<HomeLive>>,
    /// Hop TLS for new main relay connections; a renewed certificate replaces it.
    client_tls: RwLock<quinn::ClientConfig>,
    /// This node's current identity (a renewal replaces it): its certificate goes to origins
    /// in Noise message 2, its CA bundle verifies destinations' certificates.
    current: RwLock<Arc<HopIdentity>>,
    metrics: Arc<Metrics>,
    /// Setups per destination main relay and ECH cohort, reported to the operator's rollout
    /// analysis.
    ech_cohorts: Arc<EchCohorts>,
    /// Direct-path cohort counters (while direct paths are on), reported like ECH's.
    direct_cohorts: Arc<crate::federation::direct_cohorts::DirectCohorts>,
    /// Direct paths to other homes (`direct.rs`).
    direct: direct::Direct,
}

/// The part of a home node's configuration that changes without a restart. A stream takes
/// one `Arc` of it when it starts and uses that until it ends.
#[derive(Clone, Debug)]
pub(crate) struct HomeLive {
    pub(crate) policy: EchPolicy,
    pub(crate) lb: LoadBalancing,
    pub(crate) breaker: crate::resilience::breaker::BreakerConfig,
    pub(crate) retry: crate::config::RetryConfig,
    /// One attempt's route + Noise handshake (a responder's deadline for the initiator).
    pub(crate) handshake_timeout: Duration,
    /// A caller's whole setup, retries included.
    pub(crate) call_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) stream_idle: Duration,
    /// A main relay link silent this long is dead (liveness pings every quarter of it).
    pub(crate) link_idle: Duration,
    /// The main relays the plan names to this home (its own and every one with an ECH
    /// config): the only relay ids its call metrics use as label values.
    pub(crate) known_mains: std::collections::BTreeSet<String>,
    /// Peer federations of other trust domains: their main relays, and the pin their homes'
    /// certificates are verified by.
    pub(crate) partners: Vec<(Vec<String>, crate::transport::tls::Partner)>,
    /// Direct paths to other homes (§12).
    pub(crate) direct_paths: crate::config::direct::DirectPaths,
    /// The relays' per-home rate limit, applied to streams on direct connections.
    pub(crate) direct_rate: Option<crate::resilience::rate_limit::Limit>,
}

impl HomeLive {
    fn from_snapshot(snap: &Snapshot) -> Self {
        Self {
            policy: snap.ech_policy.clone(),
            lb: snap.load_balancing.clone(),
            breaker: (&snap.resilience.circuit_breaker).into(),
            retry: snap.resilience.retry.clone(),
            handshake_timeout: Duration::from_millis(snap.timeouts.handshake_ms),
            call_timeout: Duration::from_millis(snap.timeouts.call_ms),
            connect_timeout: Duration::from_millis(snap.timeouts.connect_ms),
            stream_idle: Duration::from_millis(snap.timeouts.stream_idle_ms.max(1)),
            link_idle: crate::transport::tls::link_idle(&snap.timeouts),
            known_mains: snap
                .main_relays
                .iter()
                .map(|m| m.node_id.clone())
                .chain(snap.ech_configs.keys().cloned())
                .collect(),
            partners: snap
                .partners
                .iter()
                .filter_map(|p| {
                    let partner = crate::transport::tls::Partner::from_pin(&p.relays.join(","), &p.pin)
                        .map_err(
                            |e| tracing::warn!(error = %e, "unusable pin: that federation's homes are not verified"),
                        )
                        .ok()?;
                    Some((p.relays.clone(), partner))
                })
                .collect(),
            direct_paths: snap.direct_paths.clone(),
            direct_rate: snap.resilience.rate_limit.as_ref().map(crate::relay::limit),
        }
    }

    /// The federation of another trust domain behind main relay `main`, if any.
    pub(crate) fn partner_behind(&self, main: &str) -> Option<&crate::transport::tls::Partner> {
        self.partners.iter().find(|(relays, _)| relays.iter().any(|r| r == main)).map(|(_, p)| p)
    }

    /// A main relay id as a metric label value, bounded by the plan: `other` for an id the
    /// plan does not name (views come through relays), `none` for no relay.
    pub(crate) fn main_label<'a>(&self, id: Option<&'a str>) -> &'a str {
        match id {
            None | Some("") => "none",
            Some(m) if self.known_mains.contains(m) => m,
            Some(_) => "other",
        }
    }
}

/// Where a started home node listens.
#[derive(Clone, Debug)]
pub struct Bound {
    /// Each import (in snapshot order) and its bound local listener.
    pub imports: Vec<(Import, SocketAddr)>,
    /// Outbound listeners for intercepted connections (empty without `intercept`).
    pub outbound: Vec<SocketAddr>,
}

impl HomeNode {
    /// Loads keys from `snap` (validated), binds import listeners, and starts dialing.
    /// Returns once the first main relay connection is up.
    pub async fn start(snap: &Snapshot, metrics: Arc<Metrics>) -> anyhow::Result<(Arc<Self>, Bound)> {
        let identity = HopIdentity::load(snap)?;
        let noise = match &snap.noise_key_file {
            Some(p) => load_noise_key(p, snap.passphrase()?.as_deref())?,
            None => StaticKeypair::generate()?,
        };
        let mut mains = snap.main_relays.clone();
        mains.sort_by_key(|m| m.priority);
        let (conn, _) = watch::channel(None);
        let bind: SocketAddr = snap.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        // One socket for relay links, punch probes and direct connections (§12).
        let (socket, probes) = crate::transport::punch_socket::PunchSocket::bind(bind)
            .map_err(|e| anyhow::anyhow!("cannot bind QUIC on {bind}: {e}"))?;
        let endpoint = socket.endpoint()?;
        let client_tls = RwLock::new(identity.client_config(&snap.timeouts)?);
        let node = Arc::new(Self {
            client_tls,
            current: RwLock::new(Arc::new(identity.clone())),
            identity,
            noise,
            mains,
            exports: snap.exports.clone(),
            imports: snap.imports.iter().map(|i| (i.service.clone(), i.port)).collect(),
            ech_configs: RwLock::new(snap.ech_config_lists()),
            signed_ech: RwLock::new(HashMap::new()),
            conn,
            uplinks: Default::default(),
            attach_stamp: Default::default(),
            switched: Default::default(),
            endpoint: std::sync::OnceLock::new(),
            view: RwLock::new(Default::default()),
            balancers: std::sync::Mutex::new(HashMap::new()),
            live: RwLock::new(Arc::new(HomeLive::from_snapshot(snap))),
            metrics,
            ech_cohorts: Arc::default(),
            direct_cohorts: Arc::default(),
            direct: direct::Direct::new(socket),
        });
        node.metrics.transport.config_version.set(snap.version as i64);
        let mut bound = Bound { imports: Vec::new(), outbound: Vec::new() };
        for imp in &snap.imports {
            let listener = crate::transport::io::listen(imp.listen)
                .map_err(|e| anyhow::anyhow!("cannot listen on {} for {}: {e}", imp.listen, imp.service))?;
            bound.imports.push((imp.clone(), listener.local_addr()?));
            let import = Arc::new(imp.clone());
            let n = node.clone();
            tokio::spawn(async move { n.accept_clients(listener, import).await });
        }
        if let Some(ic) = &snap.intercept {
            let by_dst: Arc<HashMap<SocketAddr, Arc<Import>>> =
                Arc::new(snap.imports.iter().filter_map(|i| Some((i.cluster_ip?, Arc::new(i.clone())))).collect());
            let mut addrs = vec![SocketAddr::from(([127, 0, 0, 1], ic.outbound_port))];
            if ic.ipv6 {
                addrs.push(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, ic.outbound_port)));
            }
            for addr in addrs {
                let listener = match crate::transport::io::listen(addr) {
                    Ok(l) => l,
                    Err(e) if addr.is_ipv6() => {
                        warn!(%addr, error = %e, "no IPv6 outbound listener (is IPv6 disabled in this namespace?)");
                        continue;
                    }
                    Err(e) => anyhow::bail!("cannot listen on {addr} for intercepted connections: {e}"),
                };
                bound.outbound.push(listener.local_addr()?);
                let n = node.clone();
                let by_dst = by_dst.clone();
                let unmatched = ic.unmatched;
                tokio::spawn(async move { n.accept_intercepted(listener, by_dst, unmatched).await });
            }
        }
        let _ = node.endpoint.set(endpoint.clone());
        node.direct_server(snap.direct_paths.enabled, &snap.timeouts);
        tokio::spawn(node.clone().probes(probes));
        tokio::spawn(node.clone().accept_direct(endpoint.clone()));
        let mut ready = node.conn.subscribe();
        node.start_uplinks(endpoint);
        ready.wait_for(Option::is_some).await?;
        Ok((node, bound))
    }

    /// Hop TLS for a new outgoing connection (a main relay or a direct one): the newest
    /// renewed certificate.
    fn client_config(&self) -> quinn::ClientConfig {
        match self.client_tls.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// This node's current identity (the newest renewed certificate and CA bundle).
    fn current_identity(&self) -> Arc<HopIdentity> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The cohort counters this home keeps (reported to the operator).
    pub fn cohort_counters(&self) -> crate::distribution::client::Counters {
        crate::distribution::client::Counters { ech: self.ech_cohorts.clone(), direct: self.direct_cohorts.clone() }
    }

    /// The live settings in force now.
    pub(crate) fn live(&self) -> Arc<HomeLive> {
        match self.live.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Applies a new config version: the ECH policy and ECH configs, load balancing, circuit
    /// breakers, retries and timeouts take effect for new streams at once; streams in flight are left
    /// alone. Fields that need a restart are not looked at ([`Snapshot::restart_fields`]
    /// names them).
    pub fn apply(&self, snap: &Snapshot) {
        let next = HomeLive::from_snapshot(snap);
        let old = self.live();
        if next.lb != old.lb || next.breaker != old.breaker {
            // Balancers hold per-instance breakers built from the old settings.
            if let Ok(mut b) = self.balancers.lock() {
                b.clear();
            }
        }
        if next.policy != old.policy {
            info!(version = snap.version, percentage = next.policy.percentage, mode = ?next.policy.mode, enabled = next.policy.enabled, "ECH policy updated");
        }
        if next.direct_paths.enabled != old.direct_paths.enabled {
            info!(version = snap.version, enabled = next.direct_paths.enabled, "direct paths switched");
            self.direct_server(next.direct_paths.enabled, &snap.timeouts);
        }
        match self.live.write() {
            Ok(mut l) => *l = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        let configs = snap.ech_config_lists();
        match self.ech_configs.write() {
            Ok(mut c) => *c = configs,
            Err(poisoned) => *poisoned.into_inner() = configs,
        }
        self.metrics.transport.config_version.set(snap.version as i64);
    }

    /// Installs a renewed certificate for the next main relay connections (the one in use
    /// keeps its handshake). The node id must stay the same.
    pub fn renew_identity(&self, next: &HopIdentity, timeouts: &crate::config::Timeouts) -> anyhow::Result<()> {
        anyhow::ensure!(
            next.node_id == self.identity.node_id,
            "renewed certificate is for node {:?}, this node is {:?}",
            next.node_id,
            self.identity.node_id
        );
        let cfg = next.client_config(timeouts)?;
        match self.client_tls.write() {
            Ok(mut c) => *c = cfg,
            Err(p) => *p.into_inner() = cfg,
        }
        let current = Arc::new(next.clone());
        match self.current.write() {
            Ok(mut c) => *c = current,
            Err(p) => *p.into_inner() = current,
        }
        self.direct_server(self.live().direct_paths.enabled, timeouts);
        info!(node = %next.node_id, "hop certificate renewed");
        Ok(())
    }

    /// Clean shutdown: closes the main relay connection, so the relay deregisters this node's
    /// services at once (everywhere), and waits for the close to be sent.
    pub async fn shutdown(&self) {
        if let Some(ep) = self.endpoint.get() {
            ep.close(0u32.into(), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        }
    }

    /// Drops every instance's breaker and balancing state (and shows them closed).
    fn forget_breakers(&self) {
        let Ok(mut b) = self.balancers.lock() else { return };
        let now = Instant::now();
        for bal in b.values_mut() {
            for (k, _) in bal.states(now) {
                self.metrics
                    .proxy
                    .circuit_state
                    .get_or_create(&crate::admin::metrics::instance_breaker(&k.service, &k.node, &k.main))
                    .set(crate::resilience::breaker::State::Closed.as_i64());
            }
        }
        b.clear();
    }

    /// ECH as this home applies and sees it (admin API, `relayfed local status`): the policy in
    /// force, the relays it holds configs for, and its setups over the last minute.
    fn ech_health(&self) -> serde_json::Value {
        use crate::federation::ech_cohorts::{HEALTH_WINDOW, health};
        let live = self.live();
        let p = &live.policy;
        let mut configs: Vec<String> = self.ech_configs.read().map(|c| c.keys().cloned().collect()).unwrap_or_default();
        configs.sort();
        let r = self.ech_cohorts.recent(Instant::now());
        let ms = |c: &crate::federation::ech_cohorts::CohortCounters| c.mean_setup().map(|d| d.as_secs_f64() * 1e3);
        serde_json::json!({
            "enabled": p.enabled,
            "mode": p.mode,
            "percentage": p.percentage,
            "percentageByMain": p.percentage_by_main,
            "configsKnown": configs,
            "windowSeconds": HEALTH_WINDOW.as_secs(),
            "setups": r.ech.attempts,
            "successRate": r.ech.success_rate(),
            "fallbackRate": (r.ech.attempts > 0).then(|| r.ech.fallbacks as f64 / r.ech.attempts as f64),
            "retryRate": (r.ech.attempts > 0).then(|| r.ech.retries as f64 / r.ech.attempts as f64),
            "meanSetupMillis": ms(&r.ech),
            "plainSetups": r.plain.attempts,
            "plainSuccessRate": r.plain.success_rate(),
            "plainMeanSetupMillis": ms(&r.plain),
            "status": health(&r),
        })
    }

    /// Circuit breaker states of every instance this home has called, for the admin API.
    fn breaker_states(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        let Ok(mut b) = self.balancers.lock() else { return vec![] };
        b.values_mut()
            .flat_map(|bal| bal.states(now))
            .map(|(k, s)| serde_json::json!({"service": k.service, "port": k.port, "node": k.node, "main": k.main, "state": s.label()}))
            .collect()
    }

    async fn serve_inbound(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok((send, recv)) = conn.accept_bi().await {
            let node = self.clone();
            tokio::spawn(async move { node.inbound(send, recv, None).await });
        }
    }

    /// JSON for the admin API (`/federation/health|peers|registry`).
    pub fn admin_json(&self, path: &str) -> Option<serde_json::Value> {
        use serde_json::json;
        let main = self.conn.borrow().as_ref().map(|(m, c)| (m.clone(), c.rtt()));
        let (mains, entries) = self.view.read().ok()?.clone();
        match path {
            "/federation/health" => {
                let mut services: Vec<String> = entries.iter().map(|e| format!("{}:{}", e.service, e.port)).collect();
                services.sort();
                services.dedup();
                let current = self.current_identity();
                Some(json!({
                    "status": if main.is_some() { "ok" } else { "disconnected" },
                    "node": self.identity.node_id,
                    "role": "home",
                    "mainRelay": main.as_ref().map(|m| m.0.clone()),
                    "connectedPeers": usize::from(main.is_some()),
                    "exports": self.exports.iter().map(|e| format!("{}:{}", e.service, e.port)).collect::<Vec<_>>(),
                    "services": services.len(),
                    "averageLatencyMillis": main.as_ref().map(|m| m.1.as_secs_f64() * 1e3),
                    "circuits": self.breaker_states(),
                    "ech": self.ech_health(),
                    "natMapping": self.nat_mapping(),
                    "directPaths": self.live().direct_paths,
                    "tls": {
                        "roots": current.root_fingerprints(),
                        "certificate": current.certificate_fingerprint(),
                        "notAfter": current.not_after_unix(),
                    },
                    "errors": self.metrics.error_counts(),
                }))
            }
            "/federation/peers" => {
                let links = self.uplink_states();
                Some(json!(
                    self.mains
                        .iter()
                        .map(|m| {
                            let link = links.get(&m.node_id);
                            json!({
                                "kind": "main",
                                "node": m.node_id, "endpoint": m.endpoint.to_string(), "priority": m.priority,
                                "state": link.map_or("down", |l| l.0),
                                "rttMillis": link.map(|l| l.1.as_secs_f64() * 1e3),
                            })
                        })
                        .chain(self.direct_paths_json().into_iter().map(|mut h| {
                            h["kind"] = json!("home");
                            h
                        }))
                        .collect::<Vec<_>>()
                ))
            }
            "/federation/registry" => Some(json!({"node": self.identity.node_id, "mains": mains, "entries": entries})),
            _ => None,
        }
    }
}

/// Whether `cert` (a Noise handshake payload) is a certificate for `node` that binds `key`,
/// the static key the handshake authenticated: issued by this federation's CA, or for a node
/// behind a main relay of another trust domain a chain to that federation's pinned CA.
/// Returns the trust domain it belongs to. Origins check destinations with it (message 2),
/// destinations check callers (message 3).
pub(crate) fn node_binds_key(
    identity: &HopIdentity,
    partner: Option<&crate::transport::tls::Partner>,
    node: &str,
    key: &[u8; 32],
    cert: &[u8],
) -> Result<String, String> {
    let (verified, trust_domain) = match partner {
        None => (identity.verify_node_cert(cert), &identity.trust_domain),
        Some(p) => (identity.verify_partner_node_cert(p, cert), &p.trust_domain),
    };
    let (named, bound) = verified.map_err(|e| e.to_string())?;
    if named != node {
        return Err(format!("the certificate is for node {named:?}, not {node:?}"));
    }
    match bound {
        Some(k) if k == *key => Ok(trust_domain.clone()),
        Some(_) => Err("its certificate binds another Noise key".into()),
        None => Err("its certificate binds no Noise key".into()),
    }
}
