//! A main relay's home nodes: registrations (checked against the plan), the views pushed
//! to each home (what it imports, one in flight at a time), liveness pings on the control
//! stream, and deregistration when a home's connection ends.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::MainRelay;
use crate::federation::registration;
use crate::federation::registry::Entry;
use crate::protocol::control::{Control, MainInfo};
use crate::protocol::{ErrorCode, Frame};
use crate::transport::io::{read_frame, write_frames};
/// The `(service, port)` pairs a home imports.
type Interest = std::collections::HashSet<(String, u16)>;

/// What every home's view is cut from: the mains' ECH configs and every instance, by
/// `(service, port)`, so a home's view costs what it imports, not the whole registry.
#[derive(Debug, Default)]
pub(crate) struct ViewData {
    mains: BTreeMap<String, MainInfo>,
    entries: BTreeMap<(String, u16), Vec<Entry>>,
}

impl ViewData {
    fn new(mains: BTreeMap<String, MainInfo>, all: Vec<Entry>) -> Self {
        let mut entries: BTreeMap<(String, u16), Vec<Entry>> = BTreeMap::new();
        for e in all {
            entries.entry((e.service.clone(), e.port)).or_default().push(e);
        }
        Self { mains, entries }
    }

    /// The view for a home interested in `imports` (all when `None`), as CONTROL frames of at
    /// most 200 entries each.
    fn encode_for(&self, imports: Option<&Interest>) -> Vec<u8> {
        let entries: Vec<&Entry> = match imports {
            None => self.entries.values().flatten().collect(),
            Some(wanted) => {
                // In a stable order (the registry's), whatever the set's.
                let mut keys: Vec<&(String, u16)> = wanted.iter().collect();
                keys.sort();
                keys.into_iter().filter_map(|k| self.entries.get(k)).flatten().collect()
            }
        };
        let chunks: Vec<&[&Entry]> = if entries.is_empty() { vec![&[]] } else { entries.chunks(200).collect() };
        let mut bytes = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let part = Control::View {
                mains: if i == 0 { self.mains.clone() } else { BTreeMap::new() },
                entries: chunk.iter().map(|e| (*e).clone()).collect(),
                more: i + 1 < chunks.len(),
            };
            match Frame::Control(part).encode() {
                Ok(b) => bytes.extend_from_slice(&b),
                Err(e) => warn!(error = %e, "view part too large to encode"),
            }
        }
        bytes
    }
}

/// How many distinct services (`service:port`) this relay's homes export: what a stream
/// sealed to this relay could be for, as seen by the relays on its path.
pub(crate) fn anonymity_set<'a>(local: impl Iterator<Item = &'a Entry>) -> usize {
    local.map(|e| (&e.service, e.port)).collect::<std::collections::HashSet<_>>().len()
}

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
        let interest: Arc<std::sync::RwLock<Option<Interest>>> = Default::default();
        // Liveness pings are answered by the writer, between views; a home that floods pings
        // gets answers to the first few only.
        let (pong_tx, pong_rx) = mpsc::channel::<u64>(4);
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
                    if let Ok(mut i) = interest.write() {
                        *i = imports.map(|list| {
                            list.iter()
                                .filter_map(|s| {
                                    s.rsplit_once(':').and_then(|(n, p)| Some((n.to_owned(), p.parse().ok()?)))
                                })
                                .collect()
                        });
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
                    let _ = pong_tx.try_send(id);
                }
                other => warn!(home = %node, message = ?other, "unexpected control message from a home node"),
            }
            if writer.is_none()
                && let (Some(send), Some(pongs)) = (send.take(), pong_rx.take())
            {
                // After the first message: send the newest view whenever it changes
                // (coalesced: a slow home never makes views pile up), and answer pings.
                let views = self.views.subscribe();
                writer = Some(tokio::spawn(view_writer(
                    send,
                    pongs,
                    views,
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

    /// Publishes the current view (all instances, the mains' ECH configs) to every home
    /// node's writer.
    pub(crate) fn push_views(&self) {
        let (entries, sizes, anonymity) = match self.registry.lock() {
            Ok(r) => (r.all(), r.sizes(), anonymity_set(r.local())),
            Err(_) => return,
        };
        self.metrics.relay.ech_anonymity_set.set(anonymity as i64);
        self.metrics.relay.registry_entries.get_or_create(&[("kind", "local")]).set(sizes.0 as i64);
        self.metrics.relay.registry_entries.get_or_create(&[("kind", "federated")]).set(sizes.1 as i64);
        let mut mains = BTreeMap::new();
        mains.insert(self.node_id.clone(), self.ech_info());
        if let Ok(h) = self.peer_health.read() {
            for (p, health) in h.iter() {
                mains.insert(
                    p.clone(),
                    MainInfo {
                        ech_config_list: health.ech_config_list.clone(),
                        ech_signature: health.ech_signature.clone(),
                    },
                );
            }
        }
        self.views.send_replace(Arc::new(ViewData::new(mains, entries)));
    }
}

/// Writes a home's control stream: the newest view whenever it changes, one in flight at a
/// time (intermediate views are skipped, not queued), and pongs for its liveness pings.
async fn view_writer(
    mut send: quinn::SendStream,
    mut pongs: mpsc::Receiver<u64>,
    mut views: tokio::sync::watch::Receiver<Arc<ViewData>>,
    acked: Arc<tokio::sync::Notify>,
    interest: Arc<std::sync::RwLock<Option<Interest>>>,
    metrics: Arc<crate::admin::metrics::Metrics>,
) {
    // What this home was last sent: a change elsewhere in the registry (another home
    // registering) that leaves its view as it was sends nothing.
    let mut sent: Option<Vec<u8>> = None;
    loop {
        let data = views.borrow_and_update().clone();
        let bytes = match interest.read() {
            Ok(i) => data.encode_for(i.as_ref()),
            Err(_) => data.encode_for(None),
        };
        if sent.as_ref() != Some(&bytes) {
            if tokio::io::AsyncWriteExt::write_all(&mut send, &bytes).await.is_err() {
                return;
            }
            metrics.relay.propagation.get_or_create(&[("event", "view_sent")]).inc();
            sent = Some(bytes);
            if answering_pings(&mut send, &mut pongs, acked.notified()).await.is_none() {
                return;
            }
        }
        match answering_pings(&mut send, &mut pongs, views.changed()).await {
            Some(Ok(())) => {}
            _ => return,
        }
    }
}

/// Waits for `until`, answering pings meanwhile; `None` when the stream broke.
async fn answering_pings<F: std::future::Future>(
    send: &mut quinn::SendStream,
    pongs: &mut mpsc::Receiver<u64>,
    until: F,
) -> Option<F::Output> {
    tokio::pin!(until);
    loop {
        tokio::select! {
            out = &mut until => return Some(out),
            Some(id) = pongs.recv() => {
                write_frames(send, &[Frame::Control(Control::Pong { id })]).await.ok()?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(service: &str, node: &str) -> Entry {
        Entry {
            service: service.into(),
            port: 80,
            node: node.into(),
            main: "hub".into(),
            noise_key: "k".into(),
            ech: true,
            standby: false,
            attached: 0,
        }
    }

    /// The entries of an encoded view, in order.
    fn decoded(mut bytes: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (frame, used) = Frame::decode(bytes).unwrap();
            if let Frame::Control(Control::View { entries, .. }) = frame {
                out.extend(entries.into_iter().map(|e| (e.service, e.node)));
            }
            bytes = &bytes[used..];
        }
        out
    }

    #[test]
    fn a_home_sees_what_it_imports_and_changes_elsewhere_leave_its_view_as_it_was() {
        let all = vec![entry("web", "a"), entry("db", "b"), entry("web", "c")];
        let view = ViewData::new(BTreeMap::new(), all.clone());
        let wants_web: Interest = [("web".to_owned(), 80)].into();
        assert_eq!(
            decoded(&view.encode_for(Some(&wants_web))),
            vec![("web".into(), "a".into()), ("web".into(), "c".into())]
        );
        assert_eq!(decoded(&view.encode_for(None)).len(), 3);
        let nothing: Interest = [("mail".to_owned(), 25)].into();
        assert!(decoded(&view.encode_for(Some(&nothing))).is_empty());
        // Another home registering a service this one does not import: the same bytes, so
        // the writer sends nothing.
        let more = ViewData::new(BTreeMap::new(), [all.clone(), vec![entry("db", "d")]].concat());
        assert_eq!(more.encode_for(Some(&wants_web)), view.encode_for(Some(&wants_web)));
        let changed = ViewData::new(BTreeMap::new(), [all, vec![entry("web", "e")]].concat());
        assert_ne!(changed.encode_for(Some(&wants_web)), view.encode_for(Some(&wants_web)));
        // Many entries go out in frames of at most 200.
        let many: Vec<Entry> = (0..450).map(|i| entry("web", &format!("n{i}"))).collect();
        let bytes = ViewData::new(BTreeMap::new(), many).encode_for(Some(&wants_web));
        assert_eq!(decoded(&bytes).len(), 450);
    }
}
