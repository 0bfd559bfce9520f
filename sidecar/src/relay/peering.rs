//! A main relay's peering with other main relays: dialing, registry deltas, refreshes,
//! health checks, TTL expiry, and withdrawal of a lost peer's homes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{MainRelay, Sender};
use crate::federation::registry::{Applied, Delta};
use crate::protocol::Frame;
use crate::protocol::control::Control;
use crate::resilience::backoff::{Backoff, Retry};
use crate::transport::io::{read_frame, write_frames};
use crate::transport::tls::{QuicIdentity, failure_reason};

impl MainRelay {
    /// Starts dialing peers (those with a larger node id) and the periodic tasks.
    pub(crate) fn start_federation(self: Arc<Self>, endpoint: quinn::Endpoint) {
        let me = self.node_id.clone();
        let peers: Vec<(String, String)> =
            self.live().peers.values().map(|p| (p.node_id.clone(), p.endpoint.clone())).collect();
        for (peer, addr) in peers {
            if me < peer && self.refuse_connection(&peer).is_none() {
                let relay = self.clone();
                let endpoint = endpoint.clone();
                tokio::spawn(async move { relay.dial_peer(endpoint, peer, addr).await });
            }
        }
        let relay = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(relay.refresh_interval);
            loop {
                tick.tick().await;
                let (epoch, seq) = relay.registry.lock().map(|r| (r.epoch(), r.seq())).unwrap_or((0, 0));
                relay.to_peers(Control::Refresh { origin: relay.node_id.clone(), epoch, seq }, "refresh_sent");
            }
        });
        let relay = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(relay.health_interval);
            let mut id = 0;
            loop {
                tick.tick().await;
                id += 1;
                relay.to_peers(Control::Ping { id }, "");
                relay.record_peer_rtts();
            }
        });
        let relay = self;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let gone = relay.registry.lock().map(|mut r| r.expire(Instant::now())).unwrap_or_default();
                if !gone.is_empty() {
                    info!(expired = gone.len(), "federated registry entries expired");
                    relay.metrics.relay.propagation.get_or_create(&[("event", "expired")]).inc_by(gone.len() as u64);
                    relay.push_views();
                }
            }
        });
    }

    /// Dials `peer` at `target`, and after a failed dial at its next fallback address in turn
    /// (each looked up again before every attempt, so a name that moves is followed), until
    /// the peering ends or the plan moves or removes it.
    pub(crate) async fn dial_peer(self: Arc<Self>, endpoint: quinn::Endpoint, peer: String, target: String) {
        let mut retry = Retry::new(Backoff::DIAL);
        let mut first = true;
        // Which of the peer's addresses to dial: the next one after each failure.
        let mut turn = 0usize;
        loop {
            // A config update may remove the peer or move it (a new task dials the new address).
            let Some(cfg) = self.live().peers.get(&peer).filter(|p| p.endpoint == target).cloned() else {
                info!(%peer, "peer removed from the configuration: no longer dialing");
                return;
            };
            let addresses: Vec<&String> = std::iter::once(&cfg.endpoint).chain(&cfg.fallback_endpoints).collect();
            let address = addresses[turn % addresses.len()].clone();
            let conn = match self.connect_peer(&endpoint, &cfg, &address).await {
                Ok(c) => c.await.map_err(|e| (failure_reason(&e), e.to_string())),
                Err(e) => Err(e),
            };
            match conn {
                Ok(conn) => {
                    crate::transport::tls::raise_stream_limit(&conn);
                    self.metrics.transport.hop_handshakes.get_or_create(&[("role", "client"), ("result", "ok")]).inc();
                    if !first {
                        self.metrics.relay.peer_reconnects.inc();
                    }
                    first = false;
                    let started = Instant::now();
                    match conn.open_bi().await {
                        Ok((send, recv)) => {
                            let hello = self.hello();
                            let relay = self.clone();
                            let p = peer.clone();
                            tokio::spawn(async move { relay.peer_control(p, vec![hello], send, recv).await });
                            self.serve_streams(conn, Sender::Peer(peer.clone())).await;
                        }
                        Err(e) => warn!(%peer, error = %e, "cannot open the peer control stream"),
                    }
                    // Only a peering that lasted resets the backoff: a peer that closes at once
                    // (it refused our certificate after our side finished the handshake) is
                    // retried with growing waits, not in a loop.
                    if started.elapsed() >= self.health_interval {
                        retry.succeeded();
                    }
                }
                Err((reason, error)) => {
                    self.metrics
                        .transport
                        .hop_handshakes
                        .get_or_create(&[("role", "client"), ("result", reason)])
                        .inc();
                    if let Ok(mut h) = self.peer_health.write() {
                        let e = h.entry(peer.clone()).or_default();
                        e.failures += 1;
                        e.last_error = Some(format!("{reason}: {error}"));
                    }
                    warn!(%peer, endpoint = %address, reason, %error, "cannot reach peer main relay");
                    turn += 1;
                }
            }
            tokio::time::sleep(retry.next_wait()).await;
        }
    }

    /// Looks up `address` (one of `cfg`'s) and starts a handshake with it: against our CA, or
    /// for a relay of another trust domain against its pin. The error is a metric label and a
    /// message.
    async fn connect_peer(
        &self,
        endpoint: &quinn::Endpoint,
        cfg: &crate::config::PeerRelay,
        address: &str,
    ) -> Result<quinn::Connecting, (&'static str, String)> {
        let addr = match tokio::net::lookup_host(address).await {
            Ok(mut addrs) => addrs.next(),
            Err(e) => return Err(("unresolved", format!("{address} does not resolve: {e}"))),
        }
        .ok_or_else(|| ("unresolved", format!("{address} resolves to no address")))?;
        let started = match &cfg.pin {
            None => {
                let identity = self.identity.get();
                let client = identity.client_config(&self.timeouts).map_err(|e| ("other", e.to_string()))?;
                endpoint.connect_with(client, addr, &identity.server_name(&cfg.node_id))
            }
            Some(pin) => {
                let partner = crate::transport::tls::Partner::from_pin(&cfg.node_id, pin)
                    .map_err(|e| ("pin_mismatch", e.to_string()))?;
                let client = self
                    .identity
                    .get()
                    .client_config_for_partner(&self.timeouts, partner)
                    .map_err(|e| ("other", e.to_string()))?;
                let name = relayfed_proto::crypto::ca::node_dns_name(&cfg.node_id, &pin.trust_domain);
                endpoint.connect_with(client, addr, &name)
            }
        };
        started.map_err(|e| ("other", e.to_string()))
    }

    pub(crate) fn hello(&self) -> Control {
        let info = self.ech_info();
        Control::PeerHello {
            node: self.node_id.clone(),
            ech_config_list: info.ech_config_list,
            ech_signature: info.ech_signature,
        }
    }

    /// The first frame of a stream was CONTROL: a home's or a peer's control stream.
    pub(crate) async fn control_stream(
        self: Arc<Self>,
        sender: Sender,
        first: Control,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        match sender {
            Sender::Home(node) => self.home_control(node, first, send, recv).await,
            Sender::Peer(node) => {
                let replies = vec![self.hello()];
                self.handle_peer(&node, first, None);
                self.peer_control(node, replies, send, recv).await
            }
        }
    }

    /// Runs a peer control stream: sends `initial` then a full delta, then relays outgoing
    /// messages and handles incoming ones until the stream ends.
    async fn peer_control(
        self: Arc<Self>,
        peer: String,
        initial: Vec<Control>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Control>();
        for m in initial {
            let _ = tx.send(m);
        }
        let full = self.registry.lock().map(|r| r.full_delta()).ok();
        if let Some(full) = full {
            let _ = tx.send(Control::Delta { delta: self.visible_to(&peer, &full) });
        }
        if let Ok(mut p) = self.peers.write()
            && let Some(link) = p.get_mut(&peer)
        {
            link.control = Some(tx.clone());
        }
        let writer = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if write_frames(&mut send, &[Frame::Control(m)]).await.is_err() {
                    break;
                }
            }
        });
        loop {
            match read_frame(&mut recv).await {
                Ok(Some(Frame::Control(m))) => self.handle_peer(&peer, m, Some(&tx)),
                Ok(Some(other)) => {
                    warn!(%peer, frame = ?other, "unexpected frame on the peer control stream");
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        writer.abort();
    }

    fn handle_peer(&self, peer: &str, m: Control, tx: Option<&mpsc::UnboundedSender<Control>>) {
        let now = Instant::now();
        if let Ok(mut h) = self.peer_health.write() {
            let e = h.entry(peer.to_owned()).or_default();
            e.last_seen = Some(now);
        }
        match m {
            Control::PeerHello { node, ech_config_list, ech_signature } => {
                if node != peer {
                    warn!(%peer, claimed = %node, "peer hello names another node");
                    return;
                }
                if let Ok(mut h) = self.peer_health.write() {
                    let e = h.entry(peer.to_owned()).or_default();
                    e.ech_config_list = ech_config_list;
                    e.ech_signature = ech_signature;
                }
                self.push_views();
            }
            Control::Delta { mut delta } => {
                let allowed = self.permissions_of(peer).export;
                let before = delta.add.len();
                delta.add.retain(|e| crate::config::Permissions::matches(&allowed, &e.service));
                if delta.add.len() < before {
                    let denied = (before - delta.add.len()) as u64;
                    self.metrics.relay.trust_denials.get_or_create(&[("rule", "export_permission")]).inc_by(denied);
                    warn!(%peer, denied, rule = "export_permission", "dropped registry entries the peer may not export");
                }
                let before = delta.add.len();
                let live = self.live();
                delta.add.retain(|e| !super::router::collides(&live, peer, e));
                if delta.add.len() < before {
                    let denied = (before - delta.add.len()) as u64;
                    self.metrics.relay.trust_denials.get_or_create(&[("rule", "node_id_collision")]).inc_by(denied);
                    warn!(%peer, denied, rule = "node_id_collision", "dropped a partner's registry entries that name a node of this federation");
                }
                let applied = self.registry.lock().map(|mut r| r.apply(peer, &delta, now));
                match applied {
                    Ok(Applied::Applied) => {
                        self.metrics.relay.propagation.get_or_create(&[("event", "delta_applied")]).inc();
                        self.push_views();
                    }
                    Ok(Applied::Stale) => {
                        self.metrics.relay.propagation.get_or_create(&[("event", "delta_stale")]).inc();
                    }
                    Ok(Applied::Forged) | Err(_) => {
                        self.metrics.relay.propagation.get_or_create(&[("event", "delta_forged")]).inc();
                        warn!(%peer, origin = %delta.origin, "refused a delta for entries the peer does not own");
                    }
                }
            }
            Control::Refresh { origin, epoch, seq } => {
                if origin == peer
                    && self.registry.lock().map(|mut r| r.refresh(&origin, epoch, seq, now)).unwrap_or(false)
                {
                    self.metrics.relay.propagation.get_or_create(&[("event", "refresh_applied")]).inc();
                }
            }
            Control::Ping { id } => {
                if let Some(tx) = tx {
                    let _ = tx.send(Control::Pong { id });
                }
            }
            Control::Pong { .. } => {}
            m @ (Control::PunchForward { .. } | Control::PunchAnswer { .. }) => self.peer_punch(peer, m, tx),
            other => warn!(%peer, message = ?other, "unexpected control message from a peer"),
        }
    }

    /// For a peer of another trust domain with a live peering: the last certificate of the
    /// chain it presented (its CA, which signs its ECH configs), base64 DER, for our homes to
    /// check against their pin (§5.7). `None` for peers of our own federation.
    pub(crate) fn presented_ca(&self, peer: &str) -> Option<String> {
        self.live().peers.get(peer)?.pin.as_ref()?;
        let conn = self.peers.read().ok()?.get(peer)?.conn.clone();
        let chain = conn.peer_identity()?.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok()?;
        let ca = chain.get(1..)?.last()?;
        Some(crate::config::base64_encode(ca.as_ref()))
    }

    /// Sets `relayfed_relay_peer_rtt_seconds` from each live peering's QUIC connection.
    fn record_peer_rtts(&self) {
        let Ok(peers) = self.peers.read() else { return };
        for (peer, link) in peers.iter() {
            self.metrics.relay.peer_rtt.get_or_create(&[("peer", peer.clone())]).set(link.conn.rtt().as_secs_f64());
        }
    }

    pub(crate) fn peer_up(&self, peer: &str, up: bool) {
        if let Ok(mut h) = self.peer_health.write() {
            let e = h.entry(peer.to_owned()).or_default();
            e.up = up;
            if up {
                e.failures = 0;
                e.last_seen = Some(Instant::now());
            }
        }
        self.metrics.relay.peer_up.get_or_create(&[("peer", peer.to_owned())]).set(i64::from(up));
        if !up {
            self.metrics.relay.peer_rtt.remove(&[("peer", peer.to_owned())]);
            // Its homes cannot be reached through it from now: withdraw them from every view
            // at once (not after the TTL), so callers use their standby registrations.
            let withdrawn = self.registry.lock().map(|mut r| r.origin_down(peer)).unwrap_or(0);
            if withdrawn > 0 {
                info!(%peer, withdrawn, "peering lost: its homes withdrawn until it is back");
                self.metrics.relay.propagation.get_or_create(&[("event", "withdrawn")]).inc_by(withdrawn as u64);
                self.push_views();
            }
        }
    }

    pub(crate) fn broadcast(&self, d: Delta) {
        self.to_peers(Control::Delta { delta: d }, "delta_sent");
    }

    /// What of `delta` `peer` may learn: the services it may call (everything for a trusted
    /// peer of our federation; a partner's `permissions.call`). A partner's registry never
    /// holds a service it may not call.
    fn visible_to(&self, peer: &str, delta: &Delta) -> Delta {
        let call = self.permissions_of(peer).call;
        delta.only(|service| crate::config::Permissions::matches(&call, service))
    }

    fn to_peers(&self, m: Control, event: &'static str) {
        let peers = self
            .peers
            .read()
            .map(|p| p.iter().filter_map(|(k, l)| Some((k.clone(), l.control.clone()?))).collect::<Vec<_>>())
            .unwrap_or_default();
        for (peer, tx) in peers {
            let m = match &m {
                Control::Delta { delta } => Control::Delta { delta: self.visible_to(&peer, delta) },
                other => other.clone(),
            };
            if tx.send(m).is_ok() && !event.is_empty() {
                self.metrics.relay.propagation.get_or_create(&[("event", event)]).inc();
            }
        }
    }

    /// JSON for the admin API (`/federation/health|peers|registry`).
    pub fn admin_json(&self, path: &str) -> Option<Value> {
        let now = Instant::now();
        let peers = || -> Vec<Value> {
            let links = self
                .peers
                .read()
                .map(|p| p.iter().map(|(k, l)| (k.clone(), l.conn.rtt())).collect::<BTreeMap<_, _>>())
                .unwrap_or_default();
            let health = self.peer_health.read().map(|h| h.clone()).unwrap_or_default();
            let mut names: Vec<&String> = health.keys().collect();
            names.sort();
            let live = self.live();
            names
                .into_iter()
                .map(|p| {
                    let h = &health[p];
                    let cfg = live.peers.get(p);
                    let refused_by = super::router::refuse_connection(&live, p);
                    let state = match refused_by {
                        Some(_) => "refused",
                        None if links.contains_key(p) => "up",
                        None => "down",
                    };
                    json!({
                        "node": p,
                        "state": state,
                        "refusedBy": refused_by,
                        "trustLevel": cfg.map(|c| c.trust_level),
                        "trustDomain": cfg.and_then(|c| c.pin.as_ref()).map(|pin| pin.trust_domain.clone()),
                        "lastError": if state == "down" { h.last_error.clone() } else { None },
                        "rttMillis": links.get(p).map(|r| r.as_secs_f64() * 1e3),
                        "lastSeenSecondsAgo": h.last_seen.map(|t| now.saturating_duration_since(t).as_secs_f64()),
                        "failures": h.failures,
                        "endpoint": cfg.map(|c| c.endpoint.clone()),
                    })
                })
                .collect()
        };
        match path {
            "/federation/peers" => Some(Value::Array(peers())),
            "/federation/registry" => {
                let r = self.registry.lock().ok()?;
                Some(json!({
                    "node": self.node_id,
                    "seq": r.seq(),
                    "local": r.local().collect::<Vec<_>>(),
                    "federated": r.federated(now).map(|(e, ttl, reachable)| json!({"entry": e, "ttlSeconds": ttl.as_secs_f64(), "reachable": reachable})).collect::<Vec<_>>(),
                }))
            }
            "/federation/health" => {
                let homes: Vec<String> = self.homes.read().map(|h| h.keys().cloned().collect()).unwrap_or_default();
                let peers = peers();
                let up: Vec<&Value> = peers.iter().filter(|p| p["state"] == "up").collect();
                // A peer refused by policy (blocked) is not expected up.
                let expected = peers.iter().filter(|p| p["state"] != "refused").count();
                let rtts: Vec<f64> = up.iter().filter_map(|p| p["rttMillis"].as_f64()).collect();
                let r = self.registry.lock().ok()?;
                let mut services: Vec<String> =
                    r.all().into_iter().map(|e| format!("{}:{}", e.service, e.port)).collect();
                services.sort();
                services.dedup();
                let anonymity = r.local_services();
                let keys = self.ech_keys().map(|k| {
                    let id = |k: Option<&crate::crypto::ech::EchKeyPair>| k.map(|k| k.config().config_id);
                    json!({
                        "current": k.current().config().config_id,
                        "staged": id(k.staged()),
                        "previous": id(k.previous(std::time::SystemTime::now())),
                    })
                });
                Some(json!({
                    "status": if up.len() == expected { "ok" } else { "degraded" },
                    "peers": peers.clone(),
                    "node": self.node_id,
                    "role": "main",
                    "echAnonymitySet": anonymity,
                    "echKeys": keys,
                    "tls": self.tls_health(),
                    // ECH as this relay sees it: routes sealed to it it opened, and those it
                    // could not (stale config id: retry configs sent; failed to open).
                    "ech": {
                        "opened": self.metrics.relay.ech.get_or_create(&[("outcome", "opened")]).get(),
                        "retrySent": self.metrics.relay.ech.get_or_create(&[("outcome", "retry_sent")]).get(),
                        "decryptFailed": self.metrics.relay.ech.get_or_create(&[("outcome", "decrypt_failed")]).get(),
                    },
                    "connectedHomes": homes.len(),
                    "connectedPeers": up.len(),
                    "configuredPeers": peers.len(),
                    "services": services.len(),
                    "failedPeers": peers.iter().filter(|p| p["state"] == "down").map(|p| p["node"].clone()).collect::<Vec<_>>(),
                    "averagePeerRttMillis": if rtts.is_empty() { None } else { Some(rtts.iter().sum::<f64>() / rtts.len() as f64) },
                    "errors": self.metrics.error_counts(),
                    "rateLimited": self.metrics.top_rate_limited(20).into_iter()
                        .map(|(sender, streams)| json!({"sender": sender, "streams": streams}))
                        .collect::<Vec<_>>(),
                }))
            }
            _ => None,
        }
    }
}
