//! A home's links to its main relays: one per relay it lists, each dialed with backoff,
//! registered, and kept warm. One is active (outbound calls go through it and callers are
//! told to use it); the others are standbys, registered as such, serving inbound streams and
//! ready to take over the moment the active link is lost (`federation/uplink.rs` decides).
//!
//! Each link's control stream carries the registration, the relay's views, and liveness
//! pings every quarter of `timeouts.idleMs`: a relay that stops answering for that long is
//! closed as dead even if its QUIC stack still acknowledges packets.

use super::*;
use crate::federation::uplink::{Candidate, FAILBACK_AFTER, elect};
use crate::resilience::backoff::{Backoff, Retry};
use tokio::sync::mpsc;

/// The parts of one view, as received (assembled when the last part arrives).
pub(super) type ViewParts = Vec<(std::collections::BTreeMap<String, MainInfo>, Vec<Entry>)>;

/// A registered link to one main relay.
pub(super) struct Uplink {
    priority: u32,
    order: usize,
    pub(super) conn: quinn::Connection,
    pub(super) control: mpsc::UnboundedSender<Control>,
    since: Instant,
    /// An earlier link to this relay was lost (it must prove stable before failback).
    recovered: bool,
    active: bool,
    /// The newest complete view this relay sent.
    view: Option<(std::collections::BTreeMap<String, MainInfo>, Vec<Entry>)>,
}

/// Why the active relay changed (a metric label).
#[derive(Clone, Copy)]
enum Switch {
    First,
    Lost,
    Failback,
}

impl HomeNode {
    /// Starts one link task per listed main relay and the periodic re-election.
    pub(super) fn start_uplinks(self: &Arc<Self>, endpoint: quinn::Endpoint) {
        for (order, main) in self.mains.iter().enumerate() {
            let n = self.clone();
            let ep = endpoint.clone();
            let main = main.clone();
            tokio::spawn(async move { n.uplink_loop(ep, main, order).await });
        }
        let n = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                n.reelect();
            }
        });
    }

    /// Keeps one main relay's link up: dial, register as standby, serve inbound streams until
    /// the link ends, back off, again.
    async fn uplink_loop(self: Arc<Self>, endpoint: quinn::Endpoint, main: MainRelay, order: usize) {
        let mut retry = Retry::new(Backoff::DIAL);
        let mut first = true;
        loop {
            if let Some(conn) = self.dial(&endpoint, &main).await {
                if !first {
                    self.metrics.proxy.uplink_reconnects.inc();
                }
                match self.register(&conn, &main.node_id).await {
                    Ok((control, view)) => {
                        let recovered = !first;
                        first = false;
                        // Only a registered link resets the backoff: a relay that accepts the
                        // handshake and then refuses the node must not be redialed at full speed.
                        retry.succeeded();
                        self.metrics.transport.open_connections.inc();
                        self.link_up(&main, order, recovered, conn.clone(), control, view);
                        self.clone().serve_inbound(conn.clone()).await;
                        self.link_down(&main.node_id, &conn);
                        self.metrics.transport.open_connections.dec();
                    }
                    Err(e) => {
                        // A relay that refuses this node (unknown, blocked, not planned here)
                        // closes the connection saying why: log its words, and keep backing off.
                        let relay_said = conn.close_reason().map(|r| r.to_string());
                        warn!(
                            main = %main.node_id,
                            error = %e,
                            relay_said = relay_said.as_deref().unwrap_or("nothing"),
                            retry_within = ?retry.ceiling(),
                            "registration refused or failed; is this node in the relay's plan (trust.knownNodes)?"
                        );
                        conn.close(0u32.into(), b"registration failed");
                    }
                }
            }
            tokio::time::sleep(retry.next_wait()).await;
        }
    }

    pub(super) fn uplinks(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Uplink>> {
        match self.uplinks.lock() {
            Ok(u) => u,
            Err(p) => p.into_inner(),
        }
    }

    fn link_up(
        &self,
        main: &MainRelay,
        order: usize,
        recovered: bool,
        conn: quinn::Connection,
        control: mpsc::UnboundedSender<Control>,
        view: ViewParts,
    ) {
        info!(main = %main.node_id, "connected to main relay (standby until elected)");
        self.metrics.proxy.uplink_active.get_or_create(&[("main", main.node_id.clone())]).set(0);
        let link = Uplink {
            priority: u32::from(main.priority),
            order,
            conn,
            control,
            since: Instant::now(),
            recovered,
            active: false,
            view: Some(assemble(view)),
        };
        self.uplinks().insert(main.node_id.clone(), link);
        self.reelect();
    }

    fn link_down(&self, main: &str, conn: &quinn::Connection) {
        let was_active = {
            let mut links = self.uplinks();
            match links.get(main) {
                Some(l) if l.conn.stable_id() == conn.stable_id() => links.remove(main).is_some_and(|l| l.active),
                _ => false,
            }
        };
        self.metrics.proxy.uplink_active.remove(&[("main", main.to_owned())]);
        warn!(main, was_active, reason = ?conn.close_reason(), "main relay link lost; redialing");
        if was_active {
            self.conn.send_replace(None);
            // Streams that failed while this link was dying were blamed on remote instances;
            // they were our own link's fault. Forget every breaker.
            self.forget_breakers();
        }
        self.reelect();
    }

    /// Re-takes the election and, when the active relay changes, registers the new one as
    /// active (a newer `attached`, so every relay prefers it at once) and the old one, if
    /// still connected, as standby.
    pub(super) fn reelect(&self) {
        let mut links = self.uplinks();
        let now = Instant::now();
        let current = links.iter().find(|(_, l)| l.active).map(|(m, _)| m.clone());
        let connected: Vec<Candidate> = links
            .iter()
            .filter(|(_, l)| l.conn.close_reason().is_none())
            .map(|(m, l)| Candidate {
                main: m,
                priority: l.priority,
                order: l.order,
                up_for: now - l.since,
                recovered: l.recovered,
            })
            .collect();
        let Some(chosen) = elect(current.as_deref(), &connected, FAILBACK_AFTER).map(str::to_owned) else { return };
        if current.as_deref() == Some(chosen.as_str()) {
            return;
        }
        // The active link may be closed while its task has not noticed yet (then this is
        // the loss, seen first by the periodic election).
        let current_lost =
            current.as_ref().is_some_and(|m| links.get(m).is_none_or(|l| l.conn.close_reason().is_some()));
        let reason = match &current {
            Some(_) if current_lost => Switch::Lost,
            Some(_) => Switch::Failback,
            None if self.conn.borrow().is_none() && self.switched.load(std::sync::atomic::Ordering::Relaxed) => {
                Switch::Lost
            }
            None => Switch::First,
        };
        if let Some(old) = current.as_ref().and_then(|m| links.get_mut(m)) {
            old.active = false;
            let _ = old.control.send(self.registration(true, 0));
        }
        let Some(new) = links.get_mut(&chosen) else { return };
        new.active = true;
        let stamp = self.next_attach_stamp();
        let _ = new.control.send(self.registration(false, stamp));
        let view = new.view.clone();
        let conn = new.conn.clone();
        drop(links);
        if current_lost {
            // As in `link_down`: failures while our own link was dying are not the instances'.
            self.forget_breakers();
        }
        if let Some(v) = view {
            self.apply_view(v);
        }
        for (m, active) in [(current.clone(), 0), (Some(chosen.clone()), 1)] {
            if let Some(m) = m {
                self.metrics.proxy.uplink_active.get_or_create(&[("main", m)]).set(active);
            }
        }
        let label = match reason {
            Switch::First => "first",
            Switch::Lost => "lost",
            Switch::Failback => "failback",
        };
        if !matches!(reason, Switch::First) {
            self.metrics.proxy.relay_switches.get_or_create(&[("reason", label)]).inc();
        }
        self.switched.store(true, std::sync::atomic::Ordering::Relaxed);
        info!(main = %chosen, previous = current.as_deref().unwrap_or("none"), reason = label, "active main relay");
        self.conn.send_replace(Some((chosen, conn)));
    }

    /// A strictly increasing stamp from this node's clock (Unix ms).
    fn next_attach_stamp(&self) -> u64 {
        let now = crate::relay::now_ms();
        let prev = self.attach_stamp.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
        if prev >= now { self.attach_stamp.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 } else { now }
    }

    /// This node's registration (its granted exports are checked by the relay).
    fn registration(&self, standby: bool, attached: u64) -> Control {
        let services =
            self.exports.iter().map(|e| Service { service: e.service.clone(), port: e.port, ech: true }).collect();
        let imports = self.imports.iter().map(|(s, p)| format!("{s}:{p}")).collect();
        Control::Register {
            services,
            noise_key: base64_encode(&self.noise.public),
            imports: Some(imports),
            standby,
            attached,
        }
    }

    /// A path for an outbound stream that avoids the connections in `avoid`: the active link,
    /// else any live standby (in priority order) while the election catches up.
    pub(super) fn path(&self, avoid: &[usize]) -> Option<(String, quinn::Connection)> {
        let usable = |c: &quinn::Connection| c.close_reason().is_none() && !avoid.contains(&c.stable_id());
        if let Some((m, c)) = self.conn.borrow().clone()
            && usable(&c)
        {
            return Some((m, c));
        }
        let links = self.uplinks();
        let mut live: Vec<(&String, &Uplink)> = links.iter().filter(|(_, l)| usable(&l.conn)).collect();
        live.sort_by_key(|(_, l)| (l.priority, l.order));
        live.first().map(|(m, l)| ((*m).clone(), l.conn.clone()))
    }

    /// Each listed relay and whether it is active, standby or down, with its RTT.
    pub(super) fn uplink_states(&self) -> std::collections::HashMap<String, (&'static str, Duration)> {
        self.uplinks()
            .iter()
            .map(|(m, l)| (m.clone(), (if l.active { "up" } else { "standby" }, l.conn.rtt())))
            .collect()
    }

    /// Opens the control stream, registers as standby and waits for the first view; then
    /// starts the task that keeps the stream (views, acks, liveness pings, re-registrations).
    async fn register(
        self: &Arc<Self>,
        conn: &quinn::Connection,
        main: &str,
    ) -> anyhow::Result<(mpsc::UnboundedSender<Control>, ViewParts)> {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frames(&mut send, &[Frame::Control(self.registration(true, 0))]).await?;
        let first = tokio::time::timeout(self.live().handshake_timeout, read_frame(&mut recv))
            .await
            .map_err(|_| anyhow::anyhow!("no view from the main relay in time"))??;
        let mut parts = Vec::new();
        let mut next = first;
        loop {
            match next {
                Some(Frame::Control(Control::View { mains, entries, more })) => {
                    parts.push((mains, entries));
                    if !more {
                        break;
                    }
                }
                other => anyhow::bail!("expected a view, got {other:?}"),
            }
            next = read_frame(&mut recv).await?;
        }
        write_frames(&mut send, &[Frame::Control(Control::ViewAck)]).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let node = self.clone();
        let conn = conn.clone();
        let main = main.to_owned();
        tokio::spawn(async move { node.control_loop(main, conn, send, recv, rx).await });
        Ok((tx, parts))
    }

    /// Runs one link's control stream until it ends or the relay stops answering.
    async fn control_loop(
        self: Arc<Self>,
        main: String,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        mut out: mpsc::UnboundedReceiver<Control>,
    ) {
        let (frames_tx, mut frames) = mpsc::channel::<Frame>(4);
        let reader = tokio::spawn(async move {
            while let Ok(Some(f)) = read_frame(&mut recv).await {
                if frames_tx.send(f).await.is_err() {
                    break;
                }
            }
        });
        let idle = self.live().link_idle;
        let mut tick = tokio::time::interval(idle / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        let mut parts: ViewParts = Vec::new();
        let mut ping = 0u64;
        loop {
            tokio::select! {
                frame = frames.recv() => {
                    heard = Instant::now();
                    match frame {
                        Some(Frame::Control(Control::View { mains, entries, more })) => {
                            parts.push((mains, entries));
                            if !more {
                                self.view_from(&main, std::mem::take(&mut parts));
                                if write_frames(&mut send, &[Frame::Control(Control::ViewAck)]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Some(Frame::Control(Control::Pong { .. })) => {}
                        Some(Frame::Control(
                            m @ (Control::Observed { .. } | Control::Punch { .. } | Control::PunchRefused { .. }),
                        )) => {
                            if let Some(reply) = self.direct_control(&main, m)
                                && write_frames(&mut send, &[Frame::Control(reply)]).await.is_err()
                            {
                                break;
                            }
                        }
                        Some(other) => debug!(%main, frame = ?other, "unexpected frame on the control stream"),
                        None => break,
                    }
                }
                msg = out.recv() => {
                    let Some(m) = msg else { break };
                    if write_frames(&mut send, &[Frame::Control(m)]).await.is_err() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if heard.elapsed() > idle {
                        warn!(%main, silent_for = ?heard.elapsed(), "main relay stopped answering liveness pings: link closed as dead");
                        conn.close(ErrorCode::Timeout.to_u16().into(), b"liveness timeout");
                        break;
                    }
                    ping += 1;
                    if write_frames(&mut send, &[Frame::Control(Control::Ping { id: ping })]).await.is_err() {
                        break;
                    }
                }
            }
        }
        reader.abort();
    }

    /// A complete view from `main`: kept for that link, and installed if it is the active one.
    fn view_from(&self, main: &str, parts: ViewParts) {
        let view = assemble(parts);
        let active = {
            let mut links = self.uplinks();
            match links.get_mut(main) {
                Some(l) => {
                    l.view = Some(view.clone());
                    l.active
                }
                None => false,
            }
        };
        if active {
            self.apply_view(view);
        }
    }

    /// Installs the active relay's view.
    fn apply_view(&self, (mains, entries): (std::collections::BTreeMap<String, MainInfo>, Vec<Entry>)) {
        self.metrics.proxy.views_received.inc();
        self.metrics.proxy.view_entries.set(entries.len() as i64);
        // A view's ECH config is used only for a main relay the snapshot does not list and only
        // when the federation CA signed it (§5.7): the relay that sends the view could choose
        // anything else.
        self.learn_signed_ech(&mains);
        // Breakers and balancing state are kept for the registrations callers use. One that
        // stops being current (its home moved to another relay, or the relay was withdrawn)
        // starts afresh when it is current again: its failures were the old path's (a hung
        // relay's), not the instance's.
        let current = crate::federation::registry::current_registrations(entries.clone());
        if let Ok(mut b) = self.balancers.lock() {
            for bal in b.values_mut() {
                bal.retain(&current);
            }
        }
        if let Ok(mut v) = self.view.write() {
            *v = (mains, entries);
        }
    }

    /// Verifies the CA-signed ECH configs of a view (once per config) and keeps those that
    /// verify for main relays the snapshot has no config of.
    fn learn_signed_ech(&self, mains: &std::collections::BTreeMap<String, MainInfo>) {
        let known: Vec<String> = self.ech_configs.read().map(|c| c.keys().cloned().collect()).unwrap_or_default();
        let previous = self.signed_ech.read().map(|s| s.clone()).unwrap_or_default();
        let mut next = HashMap::new();
        for (main, info) in mains {
            let (Some(list), Some(sig)) = (&info.ech_config_list, &info.ech_signature) else { continue };
            if known.contains(main) {
                continue;
            }
            let pair = (list.clone(), sig.clone());
            let cached = previous.get(main).filter(|p| p.0 == pair);
            // A partner's relay's config is checked again at every view: the pin it was
            // accepted by may have changed since (a Peer edit, a rotation's end).
            let partner = self.partner_of(main);
            if let Some(p) = cached.filter(|_| partner.is_none()) {
                next.insert(main.clone(), p.clone());
                continue;
            }
            match self.verify_signed_ech(main, list, sig, partner.as_ref().map(|p| (p, info.ech_signer.as_deref()))) {
                Ok(parsed) => {
                    if cached.is_none() {
                        self.metrics.proxy.ech_signed_configs.get_or_create(&[("result", "accepted")]).inc();
                        info!(%main, "CA-signed ECH config accepted: streams to it can be sealed");
                    }
                    next.insert(main.clone(), (pair, parsed));
                }
                Err(why) => {
                    self.metrics.proxy.ech_signed_configs.get_or_create(&[("result", "invalid")]).inc();
                    warn!(%main, why, "ECH config in a view refused: its signature does not verify");
                }
            }
        }
        if let Ok(mut s) = self.signed_ech.write() {
            *s = next;
        }
    }

    /// The partner federation (another trust domain) whose main relay `main` is, if any.
    fn partner_of(&self, main: &str) -> Option<crate::transport::tls::Partner> {
        self.live().partners.iter().find(|(relays, _)| relays.iter().any(|r| r == main)).map(|(_, p)| p.clone())
    }

    /// Checks a view's signed ECH config for `main`: signed by our CA, or for a main relay
    /// of a partner federation (`partner`, with `signer`, the CA its relay presented) by a
    /// CA its pin names (a `caBundle` CA, or `signer` when its key is pinned).
    fn verify_signed_ech(
        &self,
        main: &str,
        list: &str,
        sig: &str,
        partner: Option<(&crate::transport::tls::Partner, Option<&str>)>,
    ) -> Result<EchConfigList, String> {
        let bytes = crate::config::base64_decode(list).ok_or("list is not base64")?;
        let sig = crate::config::base64_decode(sig).ok_or("signature is not base64")?;
        let cas = match partner {
            Some((p, signer)) => {
                let presented: Vec<rustls_pki_types::CertificateDer<'static>> =
                    signer.and_then(crate::config::base64_decode).map(Into::into).into_iter().collect();
                p.signers(&presented)
            }
            None => self.identity.roots().to_vec(),
        };
        let verified = cas
            .iter()
            .any(|ca| crate::crypto::ech_signature::verify_ech_config(ca.as_ref(), main, &bytes, &sig).is_ok());
        if !verified {
            return Err(match partner {
                Some((p, _)) => format!("not signed by a pinned CA of {} for this relay", p.trust_domain),
                None => "not signed by the federation CA for this relay".into(),
            });
        }
        EchConfigList::decode(&bytes).map_err(|e| e.to_string())
    }

    pub(super) async fn dial(&self, endpoint: &quinn::Endpoint, main: &MainRelay) -> Option<quinn::Connection> {
        let name = self.identity.server_name(&main.node_id);
        let tls = self.client_config();
        let connecting = match endpoint.connect_with(tls, main.endpoint, &name) {
            Ok(c) => c,
            Err(e) => {
                warn!(main = %main.node_id, error = %e, "cannot dial main relay");
                return None;
            }
        };
        let started = Instant::now();
        match tokio::time::timeout(self.live().connect_timeout, connecting).await {
            Ok(Ok(conn)) => {
                crate::transport::tls::raise_stream_limit(&conn);
                self.metrics.transport.hop_handshake_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.transport.hop_handshakes.get_or_create(&[("role", "client"), ("result", "ok")]).inc();
                Some(conn)
            }
            Ok(Err(e)) => {
                let reason = failure_reason(&e);
                self.metrics.transport.hop_handshakes.get_or_create(&[("role", "client"), ("result", reason)]).inc();
                warn!(main = %main.node_id, reason, error = %e, "hop handshake failed");
                None
            }
            Err(_) => {
                self.metrics.transport.hop_handshakes.get_or_create(&[("role", "client"), ("result", "timeout")]).inc();
                warn!(main = %main.node_id, "hop handshake timed out");
                None
            }
        }
    }
}

fn assemble(parts: ViewParts) -> (std::collections::BTreeMap<String, MainInfo>, Vec<Entry>) {
    let mut mains = std::collections::BTreeMap::new();
    let mut entries = Vec::new();
    for (m, e) in parts {
        mains.extend(m);
        entries.extend(e);
    }
    (mains, entries)
}
