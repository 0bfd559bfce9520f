//! A main relay's home nodes: registrations (checked against the plan), the views pushed
//! to each home (what it imports, one in flight at a time), liveness pings on the control
//! stream, and deregistration when a home's connection ends.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::MainRelay;
use super::views::{SharedInterest, view_writer};
use crate::federation::registration;
use crate::federation::registry::Entry;
use crate::protocol::control::Control;
use crate::protocol::{ErrorCode, Frame};
use crate::transport::io::read_frame;

impl MainRelay {
    /// The Noise key the home's certificate binds (`Ok(None)`: no binding; `Err`: malformed).
    fn bound_noise_key(&self, node: &str) -> Result<Option<[u8; 32]>, ()> {
        let conn = self.homes.read().ok().and_then(|h| h.get(node).map(|l| l.conn.clone())).ok_or(())?;
        let chain = conn
            .peer_identity()
            .and_then(|i| i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
            .ok_or(())?;
        let leaf = chain.first().ok_or(())?;
        crate::crypto::ca::noise_key_from_cert(leaf.as_ref()).map_err(|_| ())
    }

    /// Refuses a home's registration: counted, logged, and the connection closed with the
    /// rule as its reason (the home logs it).
    fn refuse_home(&self, node: &str, refusal: registration::Refusal) {
        let rule = refusal.rule();
        self.metrics.relay.trust_denials.get_or_create(&[("rule", rule)]).inc();
        warn!(home = %node, rule, code = ErrorCode::PermissionDenied.label(), "registration refused");
        if let Some(link) = self.homes.read().ok().and_then(|h| h.get(node).map(|l| l.conn.clone())) {
            link.close(ErrorCode::PermissionDenied.to_u16().into(), rule.as_bytes());
        }
    }

    pub(crate) async fn home_control(
        self: Arc<Self>,
        node: String,
        first: Control,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let mut next = Some(first);
        let mut send = Some(send);
        let mut writer = None;
        let acked = Arc::new(tokio::sync::Notify::new());
        let interest: SharedInterest = Default::default();
        // This home's writer in the relay's index of who imports what (once it exists).
        let mut subscription: Option<u64> = None;
        let wake = Arc::new(tokio::sync::Notify::new());
        // Liveness pings are answered by the writer, between views; a home that floods pings
        // gets answers to the first few only.
        // Direct-path messages (§12) go the same way, dropped when the home does not read.
        let (pong_tx, pong_rx) = mpsc::channel::<Control>(16);
        // This home's connection, once it takes part in direct paths.
        let mut joined: Option<usize> = None;
        let mut pong_rx = Some(pong_rx);
        while let Some(m) = next.take() {
            match m {
                Control::Register { services, noise_key, imports, standby, attached } => {
                    let live = self.live();
                    let planned = live.trust.homes.as_ref();
                    let registered = crate::config::base64_decode(&noise_key).unwrap_or_default();
                    let bound = self.bound_noise_key(&node);
                    if let Err(refusal) = registration::check_noise_key(planned.is_some(), bound, &registered) {
                        self.refuse_home(&node, refusal);
                        break;
                    }
                    let (services, refused) = registration::granted(planned, &node, services);
                    for s in &refused {
                        self.metrics.relay.trust_denials.get_or_create(&[("rule", "export_not_planned")]).inc();
                        warn!(home = %node, service = %s.service, port = s.port, rule = "export_not_planned", "export not granted to this home by the plan: not registered");
                    }
                    let wanted = imports.map(|list| {
                        Arc::new(
                            list.iter()
                                .filter_map(|s| {
                                    s.rsplit_once(':').and_then(|(n, p)| Some((n.to_owned(), p.parse().ok()?)))
                                })
                                .collect(),
                        )
                    });
                    if let Ok(mut i) = interest.write() {
                        *i = wanted.clone();
                    }
                    if let (Some(id), Ok(mut subs)) = (subscription, self.view_subs.lock()) {
                        subs.set_interest(id, wanted.clone());
                    }
                    // Every home is known to the rendezvous (direct paths may be switched on
                    // live); it is told its address, and takes part, only while they are on.
                    joined = joined.or_else(|| self.join_rendezvous(&node, pong_tx.clone()));
                    let offered = services.iter().map(|s| (s.service.clone(), s.port)).collect();
                    if let Ok(mut r) = self.rendezvous.lock() {
                        r.registered(&node, offered, wanted.clone());
                    }
                    if live.direct_paths.enabled {
                        self.tell_observed(&node);
                    }
                    let entries = services
                        .into_iter()
                        .map(|s| Entry {
                            service: s.service,
                            port: s.port,
                            node: node.clone(),
                            main: String::new(),
                            noise_key: noise_key.clone(),
                            ech: s.ech,
                            standby,
                            attached,
                        })
                        .collect();
                    let delta = self.registry.lock().ok().and_then(|mut r| r.register(&node, entries));
                    info!(home = %node, standby, attached, "home node registered");
                    if let Some(d) = delta {
                        self.broadcast(d);
                    }
                    self.push_views();
                }
                Control::ViewAck => acked.notify_one(),
                Control::Ping { id } => {
                    let _ = pong_tx.try_send(Control::Pong { id });
                }
                Control::Candidates { local } => {
                    if let Ok(mut r) = self.rendezvous.lock() {
                        r.candidates(&node, &local);
                    }
                    // A home that registered while direct paths were off asks this way.
                    if self.live().direct_paths.enabled {
                        self.tell_observed(&node);
                    }
                }
                Control::PunchRequest { peer, main } => match main.filter(|m| *m != self.node_id) {
                    Some(relay) => self.forward_punch(&node, &peer, &relay, &pong_tx),
                    None => self.punch_request(&node, &peer, &pong_tx),
                },
                other => warn!(home = %node, message = ?other, "unexpected control message from a home node"),
            }
            if writer.is_none()
                && let (Some(send), Some(pongs)) = (send.take(), pong_rx.take())
            {
                // After the first message: send the newest view whenever it changes
                // (coalesced: a slow home never makes views pile up), and answer pings.
                let views = self.views.subscribe();
                let current = interest.read().ok().and_then(|i| i.clone());
                subscription = self.view_subs.lock().ok().map(|mut s| s.add(current, wake.clone()));
                writer = Some(tokio::spawn(view_writer(
                    send,
                    pongs,
                    views,
                    wake.clone(),
                    acked.clone(),
                    interest.clone(),
                    self.metrics.clone(),
                )));
            }
            next = match read_frame(&mut recv).await {
                Ok(Some(Frame::Control(m))) => Some(m),
                _ => None,
            };
        }
        if let Some(w) = writer {
            w.abort();
        }
        if let (Some(id), Ok(mut subs)) = (subscription, self.view_subs.lock()) {
            subs.remove(id);
        }
        if let (Some(conn_id), Ok(mut r)) = (joined, self.rendezvous.lock()) {
            r.leave(&node, conn_id);
            self.metrics.relay.direct_parties.set(r.len() as i64);
        }
    }

    /// Adds `node` to the rendezvous (nothing is sent); returns its connection's id.
    fn join_rendezvous(&self, node: &str, tx: mpsc::Sender<Control>) -> Option<usize> {
        let conn = self.homes.read().ok().and_then(|h| h.get(node).map(|l| l.conn.clone()))?;
        let party = super::rendezvous::Party {
            conn_id: conn.stable_id(),
            tx,
            observed: conn.remote_address(),
            told: false,
            local: vec![],
            imports: None,
            services: vec![],
        };
        self.rendezvous.lock().ok()?.join(node, party);
        Some(conn.stable_id())
    }

    /// Tells `node` its reflexive address, once per connection: from then on it takes part
    /// in direct paths (it may be punched to).
    fn tell_observed(&self, node: &str) {
        let Ok(mut r) = self.rendezvous.lock() else { return };
        if let Some(m) = r.tell(node) {
            self.metrics.relay.direct_parties.set(r.len() as i64);
            drop(r);
            tracing::debug!(home = %node, message = ?m, "direct paths: home told its address");
        }
    }

    /// Coordinates `from`'s request for a direct path to `peer`: `punch` to both homes at
    /// once, or `punchRefused` to `from`.
    fn punch_request(&self, from: &str, peer: &str, reply: &mpsc::Sender<Control>) {
        let decided = if self.live().direct_paths.enabled {
            self.tell_observed(from);
            let token: [u8; 16] = rand::random();
            match self.rendezvous.lock() {
                Ok(r) => r.coordinate(from, peer, &token),
                Err(_) => Err(super::rendezvous::Refusal::NotConnected),
            }
        } else {
            Err(super::rendezvous::Refusal::Disabled)
        };
        let result = match decided {
            Ok(((to_from, a), (to_peer, b))) => {
                let _ = to_peer.try_send(b);
                let _ = to_from.try_send(a);
                tracing::debug!(home = %from, peer = %peer, "direct path: punch coordinated");
                "coordinated"
            }
            Err(why) => {
                let _ = reply.try_send(Control::PunchRefused { peer: peer.to_owned(), reason: why.label().to_owned() });
                tracing::debug!(home = %from, peer = %peer, reason = why.label(), "direct path: punch refused");
                why.label()
            }
        };
        self.metrics.relay.punches.get_or_create(&[("result", result)]).inc();
    }

    /// `from`'s request for a direct path to `peer`, registered at peer relay `relay`: sent on
    /// to that relay (`punchForward`), which punches its home and answers with its
    /// candidates; or `punchRefused` to `from` now.
    fn forward_punch(&self, from: &str, peer: &str, relay: &str, reply: &mpsc::Sender<Control>) {
        use super::rendezvous::Refusal;
        let live = self.live();
        let forwarded = (|| {
            if !live.direct_paths.enabled {
                return Err(Refusal::Disabled);
            }
            self.tell_observed(from);
            // Only to a relay of this federation (a partner's has a pin): homes' addresses
            // never leave the federation.
            if live.peers.get(relay).is_none_or(|p| p.pin.is_some()) {
                return Err(Refusal::PeerUnreachable);
            }
            let link = self.peers.read().ok().and_then(|p| p.get(relay).and_then(|l| l.control.clone()));
            let link = link.ok_or(Refusal::PeerUnreachable)?;
            let imports = self.rendezvous.lock().ok().and_then(|r| r.imports_of(from)).ok_or(Refusal::NotConnected)?;
            let permitted = self.registry.lock().is_ok_and(|r| {
                let theirs = |e: &Entry| e.node == peer && e.main == relay;
                match imports.as_deref() {
                    Some(i) => i.iter().any(|(s, p)| r.lookup(s, *p).iter().any(theirs)),
                    None => r.all().iter().any(theirs),
                }
            });
            let token: [u8; 16] = rand::random();
            let m = self.rendezvous.lock().map_err(|_| Refusal::NotConnected)?.forward(
                from,
                peer,
                relay,
                permitted,
                &token,
                std::time::Instant::now(),
            )?;
            link.send(m).map_err(|_| Refusal::PeerUnreachable)
        })();
        let result = match forwarded {
            Ok(()) => "forwarded",
            Err(why) => {
                let _ = reply.try_send(Control::PunchRefused { peer: peer.to_owned(), reason: why.label().to_owned() });
                why.label()
            }
        };
        tracing::debug!(home = %from, peer = %peer, relay, result, "direct path: punch request for another relay's home");
        self.metrics.relay.punches.get_or_create(&[("result", result)]).inc();
    }

    /// A peer relay's `punchForward` (its home `from` asks for our home `peer`) or
    /// `punchAnswer` (to one we forwarded); `reply` goes back to that relay.
    pub(crate) fn peer_punch(
        &self,
        relay: &str,
        m: Control,
        reply: Option<&tokio::sync::mpsc::UnboundedSender<Control>>,
    ) {
        use super::rendezvous::Refusal;
        let live = self.live();
        match m {
            Control::PunchForward { from, peer, token, candidates } => {
                let decided = if !live.direct_paths.enabled {
                    Err(Refusal::Disabled)
                } else if live.peers.get(relay).is_none_or(|p| p.pin.is_some()) {
                    Err(Refusal::PeerUnreachable)
                } else {
                    match self.rendezvous.lock() {
                        Ok(r) => r.forwarded(&from, &peer, &token, &candidates),
                        Err(_) => Err(Refusal::NotConnected),
                    }
                };
                let (answer, result) = match decided {
                    Ok(((to_peer, punch), answer)) => {
                        let _ = to_peer.try_send(punch);
                        (answer, "coordinated")
                    }
                    Err(why) => (
                        Control::PunchAnswer {
                            from: from.clone(),
                            peer: peer.clone(),
                            token,
                            candidates: vec![],
                            refused: Some(why.label().to_owned()),
                        },
                        why.label(),
                    ),
                };
                if let Some(tx) = reply {
                    let _ = tx.send(answer);
                }
                tracing::debug!(%relay, home = %peer, asker = %from, result, "direct path: punch forwarded to us");
                self.metrics.relay.punches.get_or_create(&[("result", result)]).inc();
            }
            m @ Control::PunchAnswer { .. } => {
                let to_home =
                    self.rendezvous.lock().ok().and_then(|mut r| r.answered(relay, &m, std::time::Instant::now()));
                match to_home {
                    Some((tx, punch)) => {
                        let _ = tx.try_send(punch);
                    }
                    None => warn!(%relay, "an answer to no punch we forwarded: ignored"),
                }
            }
            _ => {}
        }
    }

    /// A home node's connection ended: its entries go, everywhere, now.
    pub(crate) fn home_gone(&self, node: &str) {
        let delta = self.registry.lock().ok().and_then(|mut r| r.deregister(node));
        if let Some(d) = delta {
            info!(home = %node, removed = d.remove.len(), "home node gone: deregistered");
            self.broadcast(d);
        }
        self.push_views();
    }
}
