//! A main relay: accept home nodes and peer main relays over mutual-TLS QUIC and route
//! streams between them. This file holds the relay's state and the I/O of a stream; the
//! decisions are pure functions in `router.rs`, the control streams of peers in
//! `peering.rs` and of homes in `homes.rs`, the live settings in `live.rs`.
//!
//! Per stream: read the first frame (a CONTROL frame makes it the sender's control stream),
//! draw a rate-limit token, then carry out [`router::route`]'s decision: refuse, answer with
//! retry configs, forward to the peer main relay that owns the destination, or deliver to
//! the local home node, copying bytes both ways. Relays never see plaintext after the
//! header: the rest is Noise ciphertext.

mod direct;
pub mod homes;
pub mod live;
pub mod peering;
mod rendezvous;
pub(crate) mod router;
pub(crate) mod view_subs;
pub(crate) mod views;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admin::metrics::Metrics;
use crate::config::keys::EchKeyFile;
use crate::config::{Snapshot, base64_encode};
use crate::crypto::ech::EchKeySet;
use crate::federation::registry::Registry;
use crate::protocol::control::Control;
use crate::protocol::control::MainInfo;
use crate::protocol::route::{RouteBody, RouteHeader};
use crate::protocol::{ErrorCode, Frame};
use crate::transport::idle::splice_streams;
use crate::transport::io::{read_frame, send_error, write_frames};
use crate::transport::tls::QuicIdentity;
use crate::transport::tls::{HopIdentity, SharedIdentity, failure_reason};
use live::MainLive;
use router::{Decision, FirstFrame, PeerLink, Refusal, RouteContext};

pub(crate) use router::Sender;

/// A connected neighbour and the channel to its control stream.
pub(crate) struct Link {
    conn: quinn::Connection,
    control: Option<mpsc::UnboundedSender<Control>>,
}

/// Health of a peering.
#[derive(Clone, Debug, Default)]
pub(crate) struct PeerHealth {
    up: bool,
    last_seen: Option<Instant>,
    failures: u64,
    /// Why the last dial failed (a hop handshake result label and the message).
    last_error: Option<String>,
    ech_config_list: Option<String>,
    /// The CA's signature over `ech_config_list`, as the peer announced it (§5.7).
    ech_signature: Option<String>,
}

/// Shared state of a running main relay.
pub struct MainRelay {
    /// This relay's node id (its certificate's name; renewals keep it).
    node_id: String,
    /// Its TLS identity; replaced when its files change (a renewal or a CA rotation).
    identity: SharedIdentity,
    /// ECH keys; replaced when the key file changes (a rotation), see `live.rs`.
    keys: RwLock<Option<Arc<EchKeySet>>>,
    homes: RwLock<HashMap<String, Link>>,
    peers: RwLock<HashMap<String, Link>>,
    peer_health: RwLock<HashMap<String, PeerHealth>>,
    registry: Mutex<Registry>,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
    /// Hop timeouts (the transport of connections this relay dials).
    timeouts: crate::config::Timeouts,
    /// A relayed stream without payload either way this long is closed.
    stream_idle: Duration,
    health_interval: Duration,
    refresh_interval: Duration,
    endpoint: std::sync::OnceLock<quinn::Endpoint>,
    /// The latest view (main relays' ECH configs and every instance); each home writer sends
    /// the newest, filtered to what that home imports.
    views: tokio::sync::watch::Sender<Arc<views::ViewData>>,
    /// Asks the view builder for a new view (`views.rs`).
    views_wanted: Arc<tokio::sync::Notify>,
    /// The home writers, by what they import (which to wake after a build).
    view_subs: Mutex<view_subs::Subscribers>,
    /// Settings a new config version replaces in place: peers (endpoint, trust level,
    /// permissions, rate limit), trust defaults, the default rate limit, breaker settings.
    live: RwLock<Arc<MainLive>>,
    limiter: Mutex<crate::resilience::rate_limit::RateLimiter>,
    /// A circuit breaker per peer relay, for streams forwarded to it.
    peer_breakers: Mutex<HashMap<String, crate::resilience::breaker::Breaker>>,
    /// Homes taking part in direct paths (§12).
    rendezvous: Mutex<rendezvous::Rendezvous>,
}

pub use router::PROBE_LIMIT;

/// Most senders whose token buckets a relay tracks (idle ones are evicted first).
const MAX_RATE_SENDERS: usize = 100_000;

/// Hop handshakes a relay runs at once. A handshake costs a relay well under a millisecond
/// of CPU, so this is far above what a steady state needs and bounds what a storm holds.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Dials that wait for a handshake slot; beyond them a dialer is refused (CONNECTION_REFUSED)
/// and redials after its backoff.
pub const MAX_QUEUED_HANDSHAKES: usize = 4096;
/// Longest a dial waits for a slot before it is refused (well inside a home's 5 s connect
/// timeout, so a handshake is not started for a dialer that gave up).
pub const MAX_HANDSHAKE_QUEUE_WAIT: Duration = Duration::from_secs(2);

pub(crate) fn limit(r: &crate::config::RateLimit) -> crate::resilience::rate_limit::Limit {
    crate::resilience::rate_limit::Limit { rate: r.streams_per_second, burst: r.burst.max(1.0) }
}

/// Addresses a started relay is bound to.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    /// QUIC (UDP).
    pub quic: SocketAddr,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl MainRelay {
    /// Loads identity and keys from `snap` (validated), binds, starts accepting, and dials the
    /// peers it is responsible for.
    pub async fn start(snap: &Snapshot, metrics: Arc<Metrics>) -> anyhow::Result<(Arc<Self>, Bound)> {
        let identity = HopIdentity::load(snap)?;
        identity.set_partners(live::partners(&snap.peers));
        // The bytes the keys come from, read first: a rotation racing the load is seen later.
        let ech_bytes = snap.ech.as_ref().and_then(|e| std::fs::read(&e.key_file).ok());
        let keys = match &snap.ech {
            Some(e) => Some(
                EchKeyFile::load(&e.key_file, snap.passphrase()?.as_deref())?
                    .key_set(&e.key_file, Duration::from_secs(e.grace_seconds))?,
            ),
            None => None,
        };
        let listen = snap.listen.ok_or_else(|| anyhow::anyhow!("listen: required for a main relay"))?;
        let mut endpoint = identity
            .server_endpoint(identity.server_config(&snap.timeouts)?, listen)
            .map_err(|e| anyhow::anyhow!("cannot bind QUIC on {listen}: {e} (is the port in use?)"))?;
        endpoint.set_default_client_config(identity.client_config(&snap.timeouts)?);
        let bound = Bound { quic: endpoint.local_addr()? };
        let ttl = Duration::from_secs(snap.registry.ttl_seconds);
        let relay = Arc::new(Self {
            registry: Mutex::new(Registry::new(&snap.node.id, ttl)),
            node_id: identity.node_id.clone(),
            identity: identity.into(),
            keys: RwLock::new(keys.map(Arc::new)),
            homes: RwLock::new(HashMap::new()),
            peers: RwLock::new(HashMap::new()),
            peer_health: RwLock::new(snap.peers.iter().map(|p| (p.node_id.clone(), PeerHealth::default())).collect()),
            metrics,
            handshake_timeout: Duration::from_millis(snap.timeouts.handshake_ms),
            timeouts: snap.timeouts.clone(),
            stream_idle: Duration::from_millis(snap.timeouts.stream_idle_ms.max(1)),
            health_interval: Duration::from_secs(snap.health_check_seconds.max(1)),
            refresh_interval: Duration::from_secs(
                snap.registry.refresh_seconds.unwrap_or(snap.registry.ttl_seconds / 3).max(1),
            ),
            endpoint: std::sync::OnceLock::new(),
            views: tokio::sync::watch::channel(Arc::new(Default::default())).0,
            views_wanted: Default::default(),
            view_subs: Default::default(),
            live: RwLock::new(Arc::new(MainLive::from_snapshot(snap))),
            limiter: Mutex::new(crate::resilience::rate_limit::RateLimiter::new(MAX_RATE_SENDERS)),
            peer_breakers: Mutex::new(HashMap::new()),
            rendezvous: Default::default(),
        });
        relay.metrics.transport.config_version.set(snap.version as i64);
        relay.start_view_builder();
        relay.push_views();
        let _ = relay.endpoint.set(endpoint.clone());
        let r = relay.clone();
        let ep = endpoint.clone();
        tokio::spawn(async move { r.accept_loop(ep).await });
        relay.clone().start_federation(endpoint);
        if let Some(e) = &snap.ech {
            let grace = Duration::from_secs(e.grace_seconds);
            relay.clone().watch_ech_keys(e.key_file.clone(), ech_bytes, grace, snap.passphrase()?);
        }
        Ok((relay, bound))
    }

    /// Clean shutdown: closes every connection (homes fail over, peers see it at once).
    pub async fn shutdown(&self) {
        if let Some(ep) = self.endpoint.get() {
            ep.close(0u32.into(), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
        }
    }

    /// This relay's node id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Installs a renewed identity (new certificate, or the trust bundle of a CA rotation):
    /// handshakes from now on present its certificate and verify against its CAs; established
    /// connections keep theirs. The node id must stay the same.
    pub fn renew_identity(&self, next: HopIdentity) -> anyhow::Result<()> {
        anyhow::ensure!(
            next.node_id == self.node_id,
            "renewed certificate is for node {:?}, this relay is {:?}",
            next.node_id,
            self.node_id
        );
        // Replaced first, so it carries the partners the new server configuration's verifier
        // reads. (Peer dials build their client configuration from the identity each time.)
        self.identity.replace(next);
        if let Some(endpoint) = self.endpoint.get() {
            endpoint.set_server_config(Some(self.identity.get().server_config(&self.timeouts)?));
        }
        info!(node = %self.node_id, "hop identity renewed");
        Ok(())
    }

    /// The SPKI fingerprints of the CAs this relay trusts and its certificate's fingerprint,
    /// for `/federation/health`.
    pub(crate) fn tls_health(&self) -> serde_json::Value {
        let id = self.identity.get();
        serde_json::json!({"roots": id.root_fingerprints(), "certificate": id.certificate_fingerprint(), "notAfter": id.not_after_unix()})
    }

    /// What this relay tells homes and peers about its ECH config: the CA-signed
    /// announcement of its snapshot when there is one, else the list of its own keys.
    pub(crate) fn ech_info(&self) -> MainInfo {
        match self.live().announcement.clone() {
            Some(a) => MainInfo {
                ech_config_list: Some(a.ech_config_list),
                ech_signature: Some(a.signature),
                ech_signer: None,
            },
            None => MainInfo {
                ech_config_list: self.ech_config_list().map(|l| base64_encode(&l)),
                ech_signature: None,
                ech_signer: None,
            },
        }
    }

    /// The ECHConfigList this relay publishes, if it has ECH keys.
    pub fn ech_config_list(&self) -> Option<Vec<u8>> {
        self.ech_keys().and_then(|k| k.config_list().ok())
    }

    async fn accept_loop(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        let admitted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        while let Some(incoming) = endpoint.accept().await {
            // A reconnect storm (thousands of homes redialing a restarted relay) is admitted
            // at the pace handshakes complete: MAX_PENDING_HANDSHAKES run, up to
            // MAX_QUEUED_HANDSHAKES more wait their turn (the dialer's Initial packets are
            // held meanwhile), and beyond that, or after waiting MAX_HANDSHAKE_QUEUE_WAIT, a
            // dialer is refused and redials after its jittered backoff — instead of every
            // handshake slowing until established links miss their liveness deadline.
            let queued = admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if queued >= MAX_PENDING_HANDSHAKES + MAX_QUEUED_HANDSHAKES {
                admitted.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                self.refuse_overloaded(incoming);
                continue;
            }
            let relay = self.clone();
            let (handshakes, admitted) = (handshakes.clone(), admitted.clone());
            tokio::spawn(async move {
                let waiting = Instant::now();
                let permit = handshakes.acquire_owned().await;
                if permit.is_err() || waiting.elapsed() > MAX_HANDSHAKE_QUEUE_WAIT {
                    admitted.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                    relay.refuse_overloaded(incoming);
                    return;
                }
                let remote = incoming.remote_address();
                let handshake = incoming.await;
                drop(permit);
                admitted.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                match handshake {
                    Ok(conn) => relay.serve_connection(conn).await,
                    Err(e) => {
                        let reason = failure_reason(&e);
                        relay
                            .metrics
                            .transport
                            .hop_handshakes
                            .get_or_create(&[("role", "server"), ("result", reason)])
                            .inc();
                        warn!(%remote, reason, error = %e, "hop handshake refused");
                    }
                }
            });
        }
    }

    /// Refuses a dial while too many handshakes are in progress or waiting.
    fn refuse_overloaded(&self, incoming: quinn::Incoming) {
        self.metrics.transport.hop_handshakes.get_or_create(&[("role", "server"), ("result", "overloaded")]).inc();
        debug!(remote = %incoming.remote_address(), "handshake refused: too many in progress");
        incoming.refuse();
    }

    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let node = match self.identity.get().peer_node_id(&conn) {
            Ok(p) => p,
            Err(e) => {
                self.metrics
                    .transport
                    .hop_handshakes
                    .get_or_create(&[("role", "server"), ("result", "no_identity")])
                    .inc();
                warn!(error = %e, "peer certificate carries no node identity");
                conn.close(1u32.into(), b"no identity");
                return;
            }
        };
        self.metrics.transport.hop_handshakes.get_or_create(&[("role", "server"), ("result", "ok")]).inc();
        if let Some(rule) = self.refuse_connection(&node) {
            self.metrics.relay.trust_denials.get_or_create(&[("rule", rule)]).inc();
            warn!(%node, rule, code = ErrorCode::UnknownPeer.label(), "connection refused by trust rules");
            conn.close(ErrorCode::UnknownPeer.to_u16().into(), rule.as_bytes());
            return;
        }
        let live = self.live();
        let sender = if live.peers.contains_key(&node) {
            crate::transport::tls::raise_stream_limit(&conn);
            Sender::Peer(node)
        } else {
            if let Err(refusal) = crate::federation::registration::admit_home(live.trust.homes.as_ref(), &node) {
                let rule = refusal.rule();
                self.metrics.relay.trust_denials.get_or_create(&[("rule", rule)]).inc();
                warn!(%node, rule, code = ErrorCode::PermissionDenied.label(), "home refused: the plan does not assign it to this relay");
                conn.close(ErrorCode::PermissionDenied.to_u16().into(), rule.as_bytes());
                return;
            }
            Sender::Home(node)
        };
        self.serve_streams(conn, sender).await;
    }

    /// Serves every stream of an established connection (either direction of dialing).
    pub(crate) async fn serve_streams(self: &Arc<Self>, conn: quinn::Connection, sender: Sender) {
        self.metrics.transport.open_connections.inc();
        let (kind, node, is_peer) = match &sender {
            Sender::Home(n) => ("home", n.clone(), false),
            Sender::Peer(n) => ("peer", n.clone(), true),
        };
        let span = info_span!("connection", %kind, peer = %node, remote = %conn.remote_address());
        async {
            info!("connected");
            let links = if is_peer { &self.peers } else { &self.homes };
            let replaced =
                links.write().ok().and_then(|mut l| l.insert(node.clone(), Link { conn: conn.clone(), control: None }));
            if let Some(old) = replaced.filter(|old| old.conn.stable_id() != conn.stable_id()) {
                // The same node connected again (it restarted, or its side saw the old link
                // die first): the old link is dead weight, and streams sent into it would
                // wait for its idle timeout.
                info!("a newer connection of this node supersedes the previous one");
                old.conn.close(0u32.into(), b"superseded");
                if is_peer {
                    // The old peering session is over: its homes are unreachable until the
                    // new session's full delta says which are back.
                    self.peer_up(&node, false);
                }
            }
            if is_peer {
                self.peer_up(&node, true);
            }
            // Streams in flight from this neighbour, to grow a home's stream limit on demand
            // (quinn preallocates per allowed stream, so idle homes stay small).
            let inflight = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let mut limit =
                if is_peer { crate::transport::tls::TRUNK_STREAMS } else { crate::transport::tls::HOME_STREAMS };
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let now = inflight.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        if now * 4 >= limit * 3 && limit < crate::transport::tls::TRUNK_STREAMS {
                            limit = (limit * 2).min(crate::transport::tls::TRUNK_STREAMS);
                            conn.set_max_concurrent_bi_streams(limit.into());
                            debug!(limit, "raised the stream limit of a busy neighbour");
                        }
                        let relay = self.clone();
                        let sender = sender.clone();
                        let inflight = inflight.clone();
                        tokio::spawn(
                            async move {
                                relay.stream(sender, send, recv).await;
                                inflight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            .in_current_span(),
                        );
                    }
                    Err(e) => {
                        info!(reason = %e, "connection closed");
                        break;
                    }
                }
            }
            let current = links.write().ok().and_then(|mut l| {
                // Only forget the entry if it is still this connection (not a reconnect).
                if l.get(&node).is_some_and(|c| c.conn.stable_id() == conn.stable_id()) {
                    l.remove(&node)
                } else {
                    None
                }
            });
            if current.is_some() {
                if is_peer {
                    self.peer_up(&node, false);
                } else {
                    self.home_gone(&node);
                }
            }
        }
        .instrument(span)
        .await;
        self.metrics.transport.open_connections.dec();
    }

    async fn stream(self: Arc<Self>, sender: Sender, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let read = tokio::time::timeout(self.handshake_timeout, read_frame(&mut recv)).await.ok();
        match router::first_frame(read) {
            FirstFrame::Route(h) => self.route_stream(&sender, h, send, recv).await,
            FirstFrame::Control(first) => self.control_stream(sender, first, send, recv).await,
            FirstFrame::Closed => {}
            FirstFrame::Refuse(r) => self.refuse(&mut send, &r).await,
        }
    }

    /// Trust rules for a new connection: the rule that refuses it, if any.
    pub(crate) fn refuse_connection(&self, node: &str) -> Option<&'static str> {
        router::refuse_connection(&self.live(), node)
    }

    /// The permissions a peer has.
    pub(crate) fn permissions_of(&self, peer: &str) -> crate::config::Permissions {
        router::permissions_of(&self.live(), peer)
    }

    /// Draws a token for a new stream from `sender`; `Some(wait)` when it has none left.
    fn rate_limited(&self, live: &MainLive, sender: &Sender, probe: bool) -> Option<Duration> {
        let (key, kind, lim) = router::rate_bucket(live, sender, probe)?;
        let wait = self.limiter.lock().ok()?.admit(&key, lim, Instant::now()).retry_after()?;
        self.metrics.rate_limited(kind, &key);
        Some(wait)
    }

    /// Routes a stream: the rate limit, then [`router::route`]'s decision, carried out.
    async fn route_stream(
        &self,
        sender: &Sender,
        header: RouteHeader,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let live = self.live();
        if let Some(retry_after) = self.rate_limited(&live, sender, header.probe) {
            return self.refuse(&mut send, &router::rate_limited(retry_after)).await;
        }
        let envelope = match (&header.body, header.grease.is_some()) {
            (crate::protocol::route::RouteBody::Sealed(_), _) => "sealed",
            (_, true) => "grease",
            _ => "plain",
        };
        self.metrics.relay.route_headers.get_or_create(&[("envelope", envelope)]).inc();
        let (decision, ech) = {
            let keys = self.ech_keys();
            // Locked only for the lookup, not across the ECH open before it.
            let connected = |n: &str| self.homes.read().is_ok_and(|h| h.contains_key(n));
            let ctx = RouteContext {
                me: &self.node_id,
                live: &live,
                keys: keys.as_deref(),
                home_connected: &connected,
                now: SystemTime::now(),
            };
            router::route(sender, header, &ctx)
        };
        if let Some(outcome) = ech {
            self.metrics.relay.ech.get_or_create(&[("outcome", outcome.label())]).inc();
        }
        match decision {
            Decision::Refuse(r) => self.refuse(&mut send, &r).await,
            Decision::RetryConfigs(list) => {
                debug!("unknown ECH config id: sending retry configs");
                let _ = write_frames(&mut send, &[Frame::RetryConfigs(list)]).await;
                let _ = send.finish();
            }
            Decision::Forward { peer, header } => self.forward_to_peer(&peer, header, send, recv).await,
            Decision::Deliver { home, header } => {
                let span = info_span!("stream", service = %route_service(&header), dest = %home, ech = ech.is_some());
                let dest = self.homes.read().ok().and_then(|h| h.get(&home).map(|l| l.conn.clone()));
                async {
                    let Some(dest) = dest else {
                        let r = Refusal::new(ErrorCode::NoRoute, "destination home node is not connected");
                        return self.refuse(&mut send, &r).await;
                    };
                    self.metrics.relay.routes.get_or_create(&[("result", "local")]).inc();
                    self.pipe(dest, header, send, recv).await;
                }
                .instrument(span)
                .await
            }
        }
    }

    async fn forward_to_peer(
        &self,
        next: &str,
        header: RouteHeader,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let allows = self.peer_breaker(next, BreakerEvent::Ask);
        let conn = self.peers.read().ok().and_then(|p| p.get(next).map(|l| l.conn.clone()));
        let link = match &conn {
            Some(_) => PeerLink::Connected,
            None if self.live().peers.contains_key(next) => PeerLink::Down,
            None => PeerLink::NotAPeer,
        };
        if let Err(r) = router::forward_check(next, allows, link) {
            if allows {
                // Down counts against the peer's circuit; not a peer at all is not its fault.
                let event = if link == PeerLink::Down { BreakerEvent::Outcome(false) } else { BreakerEvent::Cancel };
                self.peer_breaker(next, event);
            }
            return self.refuse(&mut send, &r).await;
        }
        let Some(conn) = conn else { return };
        self.metrics.relay.routes.get_or_create(&[("result", "forwarded")]).inc();
        let opened = self.pipe(conn, header, send, recv).await;
        self.peer_breaker(next, BreakerEvent::Outcome(opened));
    }

    /// Tells peer `peer`'s circuit breaker about `event` and exports its state; for
    /// [`BreakerEvent::Ask`], whether a stream may go through.
    fn peer_breaker(&self, peer: &str, event: BreakerEvent) -> bool {
        let now = Instant::now();
        let config = self.live().breaker;
        let Ok(mut all) = self.peer_breakers.lock() else { return true };
        let b = all.entry(peer.to_owned()).or_insert_with(|| crate::resilience::breaker::Breaker::new(config));
        let r = match event {
            BreakerEvent::Ask => b.allow(now),
            BreakerEvent::Outcome(ok) => {
                b.record(ok, now);
                true
            }
            BreakerEvent::Cancel => {
                b.cancel();
                true
            }
        };
        self.metrics.relay.circuit_state.get_or_create(&[("peer", peer.to_owned())]).set(b.state(now).as_i64());
        r
    }

    /// Opens a stream on `conn`, sends `header`, and copies bytes both ways; returns whether
    /// the next hop accepted the stream.
    async fn pipe(
        &self,
        conn: quinn::Connection,
        header: RouteHeader,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> bool {
        let (mut dsend, mut drecv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => {
                self.fail(&mut send, ErrorCode::PeerUnreachable, &e.to_string()).await;
                return false;
            }
        };
        if let Err(e) = write_frames(&mut dsend, &[Frame::Route(header)]).await {
            self.fail(&mut send, ErrorCode::PeerUnreachable, &e.to_string()).await;
            return false;
        }
        // A stream that carries nothing either way for `stream_idle` is closed (both sides
        // reset), so stalled streams cannot pile up at a relay.
        let outcome = splice_streams((&mut send, &mut recv), (&mut dsend, &mut drecv), self.stream_idle).await;
        match outcome {
            Ok(bytes) => {
                self.metrics.relay.bytes.inc_by(bytes);
                self.metrics.relay.streams.get_or_create(&[("result", "ok")]).inc();
            }
            Err(code) => {
                if code == ErrorCode::Timeout {
                    warn!(
                        code = code.label(),
                        idle_ms = self.stream_idle.as_millis() as u64,
                        "relayed stream idle: closed"
                    );
                } else {
                    debug!(code = code.label(), "relayed stream cut on one side: reset both");
                }
                self.metrics.relay_stream_error(code);
            }
        }
        true
    }

    pub(crate) async fn fail(&self, send: &mut quinn::SendStream, code: ErrorCode, message: &str) {
        warn!(code = code.label(), message, "stream refused");
        self.metrics.relay_stream_error(code);
        send_error(send, code, message).await;
        let _ = send.finish();
    }

    /// Answers a stream with `r` (an ERROR frame) and counts it.
    async fn refuse(&self, send: &mut quinn::SendStream, r: &Refusal) {
        if let Some(rule) = r.rule {
            self.metrics.relay.trust_denials.get_or_create(&[("rule", rule)]).inc();
        }
        match r.code {
            ErrorCode::NoRoute => self.metrics.relay.routes.get_or_create(&[("result", "no_route")]).inc(),
            ErrorCode::CircuitOpen => self.metrics.relay.routes.get_or_create(&[("result", "circuit_open")]).inc(),
            ErrorCode::PeerUnreachable => {
                self.metrics.relay.routes.get_or_create(&[("result", "peer_unreachable")]).inc()
            }
            _ => 0,
        };
        match r.retry_after {
            Some(wait) => {
                self.metrics.relay_stream_error(r.code);
                crate::transport::io::send_error_retry_after(send, r.code, wait, r.message.clone()).await;
                let _ = send.finish();
            }
            None => self.fail(send, r.code, &r.message).await,
        }
    }
}

/// What a relay tells a peer's circuit breaker.
#[derive(Clone, Copy, Debug)]
enum BreakerEvent {
    /// May a stream be forwarded now? (In half-open state this takes a probe slot.)
    Ask,
    /// A forwarded stream was accepted by the peer (`true`) or not.
    Outcome(bool),
    /// An allowed stream was not sent after all (not the peer's fault): give the slot back.
    Cancel,
}

/// The service a route header names, when it is readable here (span field).
fn route_service(h: &RouteHeader) -> &str {
    match &h.body {
        RouteBody::Plain(r) | RouteBody::Opened { route: r, .. } => &r.service,
        RouteBody::Sealed(_) => "",
    }
}
