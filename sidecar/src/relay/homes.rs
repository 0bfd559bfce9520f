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
