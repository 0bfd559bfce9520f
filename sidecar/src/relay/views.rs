//! The views a main relay sends its homes: every instance of what a home imports and the
//! main relays' ECH configs. One builder task turns registry changes into a new [`ViewData`]
//! (a storm of registrations coalesces into at most one build per [`MIN_BUILD_INTERVAL`]); a
//! build wakes only the writers of homes importing what it changed ([`view_subs`]), and each
//! re-encodes its view only when something it imports (or an ECH config) changed since it
//! last looked, and sends it only when the bytes differ: a registration costs what it
//! changes, not the number of homes times the registry.
//!
//! [`view_subs`]: super::view_subs

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::warn;

use super::view_subs::Changed;

use super::MainRelay;
use crate::federation::registry::{Changes, Entry};
use crate::protocol::Frame;
use crate::protocol::control::{Control, MainInfo};
use crate::transport::io::write_frames;

/// The `(service, port)` pairs a home imports.
pub(crate) type Interest = HashSet<(String, u16)>;

/// What every home's view is cut from: the mains' ECH configs and every instance, by
/// `(service, port)`, each with the build that last changed it.
#[derive(Debug, Default)]
pub(crate) struct ViewData {
    /// This build's number (the first is 1).
    version: u64,
    mains: BTreeMap<String, MainInfo>,
    /// The build that last changed `mains`.
    mains_version: u64,
    /// Instances by `(service, port)`, with the build that last changed them; a key whose
    /// instances are gone stays, empty, so a writer still sees that it changed.
    entries: BTreeMap<(String, u16), Versioned>,
    /// What this build changed since the one before (which writers to wake).
    changed: Changed,
}

/// Shortest time between two view builds: under a registration storm each build costs a
/// pass over the registry, so they are batched rather than run back to back.
pub(crate) const MIN_BUILD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// What a build starts from: every routable entry, or the instances now of the services that
/// changed since the last build.
enum Source {
    Everything(Vec<Entry>),
    Changed(Vec<((String, u16), Vec<Entry>)>),
}

/// One service's instances, with the build that last changed them.
type Versioned = (u64, Arc<Vec<Entry>>);

/// Most emptied keys kept after their instances are gone (beyond it they are dropped, and
/// the next build counts as changing everything).
const MAX_GONE_KEYS: usize = 10_000;

impl ViewData {
    /// The build after `prev` from every routable entry and the mains' configs now: every
    /// service known before or now counts as possibly changed (gone ones with no instances).
    pub(crate) fn next(prev: &ViewData, mains: BTreeMap<String, MainInfo>, all: Vec<Entry>) -> Self {
        let mut grouped: BTreeMap<(String, u16), Vec<Entry>> =
            prev.entries.keys().map(|k| (k.clone(), Vec::new())).collect();
        for e in all {
            grouped.entry((e.service.clone(), e.port)).or_default().push(e);
        }
        Self::next_changed(prev, mains, grouped.into_iter().collect())
    }

    /// The build after `prev` when only the services in `changed` (with their instances now)
    /// may differ: the rest is shared with `prev`, so a build costs what changed.
    pub(crate) fn next_changed(
        prev: &ViewData,
        mains: BTreeMap<String, MainInfo>,
        changed: Vec<((String, u16), Vec<Entry>)>,
    ) -> Self {
        let version = prev.version + 1;
        let mut entries = prev.entries.clone();
        let mut keys = std::collections::HashSet::new();
        for (key, list) in changed {
            // Unchanged, or gone and never known: nothing to record.
            let same = entries.get(&key).is_some_and(|(_, old)| **old == list);
            let known = entries.contains_key(&key) || !list.is_empty();
            if known && !same {
                keys.insert(key.clone());
                entries.insert(key, (version, Arc::new(list)));
            }
        }
        let gone = entries.values().filter(|(_, l)| l.is_empty()).count();
        if gone > MAX_GONE_KEYS {
            entries.retain(|_, (_, l)| !l.is_empty());
        }
        let mains_version =
            if gone > MAX_GONE_KEYS || mains != prev.mains || prev.version == 0 { version } else { prev.mains_version };
        let changed = if mains_version == version { Changed::Everything } else { Changed::Keys(keys) };
        Self { version, mains, mains_version, entries, changed }
    }

    /// Whether a home interested in `imports` (all when `None`) may see something new since
    /// build `seen`.
    fn changed_for(&self, seen: u64, imports: Option<&Interest>) -> bool {
        if self.mains_version > seen {
            return true;
        }
        match imports {
            None => self.version > seen,
            Some(wanted) => wanted.iter().any(|k| self.entries.get(k).is_some_and(|(at, _)| *at > seen)),
        }
    }

    /// The view for a home interested in `imports` (all when `None`), as CONTROL frames of at
    /// most 200 entries each.
    pub(crate) fn encode_for(&self, imports: Option<&Interest>) -> Vec<u8> {
        let entries: Vec<&Entry> = match imports {
            None => self.entries.values().flat_map(|(_, l)| l.iter()).collect(),
            Some(wanted) => {
                // In a stable order (the registry's), whatever the set's.
                let mut keys: Vec<&(String, u16)> = wanted.iter().collect();
                keys.sort();
                keys.into_iter().filter_map(|k| self.entries.get(k)).flat_map(|(_, l)| l.iter()).collect()
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

impl MainRelay {
    /// Asks for a new view (the registry or an ECH config changed); the builder task makes
    /// it, once for however many asks arrive while it builds.
    pub(crate) fn push_views(&self) {
        self.views_wanted.notify_one();
    }

    /// Starts the task that builds views when asked (at most one build per
    /// [`MIN_BUILD_INTERVAL`]; asks meanwhile are answered by the next build).
    pub(crate) fn start_view_builder(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let wanted = self.views_wanted.clone();
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let Some(relay) = weak.upgrade() else { return };
                relay.build_views();
                drop(relay);
                tokio::time::sleep(MIN_BUILD_INTERVAL).await;
            }
        });
    }

    /// Publishes the current view (all instances, the mains' ECH configs) to every home
    /// node's writer.
    fn build_views(&self) {
        // What changed in the registry since the last build: the instances of those services
        // only (the first build, everything).
        let (source, sizes, anonymity) = match self.registry.lock() {
            Ok(mut r) => {
                let source = match r.take_changes() {
                    Changes::Everything => Source::Everything(r.all()),
                    Changes::Keys(keys) => Source::Changed(
                        keys.into_iter()
                            .map(|k| {
                                let now = r.lookup(&k.0, k.1);
                                (k, now)
                            })
                            .collect(),
                    ),
                };
                (source, r.sizes(), r.local_services())
            }
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
                        ech_signer: self.presented_ca(p),
                    },
                );
            }
        }
        let mut changed = Changed::Everything;
        self.views.send_modify(|v| {
            let next = match source {
                Source::Changed(changed) => ViewData::next_changed(v, mains, changed),
                Source::Everything(all) => ViewData::next(v, mains, all),
            };
            changed = next.changed.clone();
            *v = Arc::new(next);
        });
        if let Ok(subs) = self.view_subs.lock() {
            subs.wake(&changed);
        }
    }
}

/// What a home imports, shared by its control loop (which sets it) and its view writer.
pub(crate) type SharedInterest = Arc<std::sync::RwLock<Option<Arc<Interest>>>>;

/// Writes a home's control stream: the newest view whenever what it imports changed (the
/// builder wakes it through `wake`), one in flight at a time (intermediate views are
/// skipped, not queued), and pongs for its liveness pings.
pub(crate) async fn view_writer(
    mut send: quinn::SendStream,
    mut pongs: mpsc::Receiver<Control>,
    views: tokio::sync::watch::Receiver<Arc<ViewData>>,
    wake: Arc<tokio::sync::Notify>,
    acked: Arc<tokio::sync::Notify>,
    interest: SharedInterest,
    metrics: Arc<crate::admin::metrics::Metrics>,
) {
    // What this home was last sent, from which build, for which imports.
    let mut sent: Option<(Vec<u8>, u64, Option<Arc<Interest>>)> = None;
    loop {
        let wanted = match interest.read() {
            Ok(i) => i.clone(),
            Err(p) => p.into_inner().clone(),
        };
        // The build is looked at and let go before any wait: a writer that held on to the
        // build it last saw would keep every instance of that build alive (10,000 idle homes
        // pinning builds of a registration storm held 2 GB).
        let news = {
            let data = views.borrow().clone();
            let look = match &sent {
                None => true,
                Some((_, seen, imports)) => *imports != wanted || data.changed_for(*seen, wanted.as_deref()),
            };
            if look {
                let bytes = data.encode_for(wanted.as_deref());
                let same = sent.as_ref().is_some_and(|(b, _, _)| *b == bytes);
                sent = Some((bytes, data.version, wanted));
                !same
            } else {
                if let Some(s) = sent.as_mut() {
                    s.1 = data.version;
                }
                false
            }
        };
        if news {
            let Some((bytes, _, _)) = &sent else { return };
            if tokio::io::AsyncWriteExt::write_all(&mut send, bytes).await.is_err() {
                return;
            }
            metrics.relay.propagation.get_or_create(&[("event", "view_sent")]).inc();
            if answering_pings(&mut send, &mut pongs, acked.notified()).await.is_none() {
                return;
            }
        }
        if answering_pings(&mut send, &mut pongs, wake.notified()).await.is_none() {
            return;
        }
    }
}

/// Waits for `until`, answering pings meanwhile; `None` when the stream broke.
async fn answering_pings<F: std::future::Future>(
    send: &mut quinn::SendStream,
    pongs: &mut mpsc::Receiver<Control>,
    until: F,
) -> Option<F::Output> {
    tokio::pin!(until);
    loop {
        tokio::select! {
            out = &mut until => return Some(out),
            Some(m) = pongs.recv() => {
                write_frames(send, &[Frame::Control(m)]).await.ok()?;
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

    fn build(prev: &ViewData, all: Vec<Entry>) -> ViewData {
        ViewData::next(prev, BTreeMap::new(), all)
    }

    #[test]
    fn a_home_sees_what_it_imports_and_changes_elsewhere_leave_its_view_as_it_was() {
        let all = vec![entry("web", "a"), entry("db", "b"), entry("web", "c")];
        let view = build(&ViewData::default(), all.clone());
        let wants_web: Interest = [("web".to_owned(), 80)].into();
        assert_eq!(
            decoded(&view.encode_for(Some(&wants_web))),
            vec![("web".into(), "a".into()), ("web".into(), "c".into())]
        );
        assert_eq!(decoded(&view.encode_for(None)).len(), 3);
        let nothing: Interest = [("mail".to_owned(), 25)].into();
        assert!(decoded(&view.encode_for(Some(&nothing))).is_empty());
        // Another home registering a service this one does not import: the same bytes.
        let more = build(&view, [all.clone(), vec![entry("db", "d")]].concat());
        assert_eq!(more.encode_for(Some(&wants_web)), view.encode_for(Some(&wants_web)));
        let changed = build(&view, [all, vec![entry("web", "e")]].concat());
        assert_ne!(changed.encode_for(Some(&wants_web)), view.encode_for(Some(&wants_web)));
        // Many entries go out in frames of at most 200.
        let many: Vec<Entry> = (0..450).map(|i| entry("web", &format!("n{i}"))).collect();
        let bytes = build(&ViewData::default(), many).encode_for(Some(&wants_web));
        assert_eq!(decoded(&bytes).len(), 450);
    }

    #[test]
    fn a_writer_looks_again_only_when_something_it_imports_changed_since_it_last_looked() {
        let wants_web: Interest = [("web".to_owned(), 80)].into();
        let v1 = build(&ViewData::default(), vec![entry("web", "a")]);
        assert!(v1.changed_for(0, Some(&wants_web)), "the first build is news to everyone");
        let v2 = build(&v1, vec![entry("web", "a"), entry("db", "b")]);
        assert!(!v2.changed_for(v1.version, Some(&wants_web)), "db changed, web did not");
        assert!(v2.changed_for(v1.version, None), "a home importing everything looks at every build");
        // web changes in v3, db in v4: a writer that skipped v3 still sees web changed.
        let v3 = build(&v2, vec![entry("web", "a"), entry("web", "c"), entry("db", "b")]);
        let v4 = build(&v3, vec![entry("web", "a"), entry("web", "c")]);
        assert!(v4.changed_for(v2.version, Some(&wants_web)));
        assert!(!v4.changed_for(v3.version, Some(&wants_web)));
        // Gone is a change too, and stays one for a writer that looked before it.
        let v5 = build(&v4, vec![]);
        assert!(v5.changed_for(v4.version, Some(&wants_web)));
        let v6 = build(&v5, vec![entry("db", "x")]);
        assert!(v6.changed_for(v4.version, Some(&wants_web)) && !v6.changed_for(v5.version, Some(&wants_web)));
        assert!(decoded(&v6.encode_for(Some(&wants_web))).is_empty());
        // An ECH config changing is news to every home.
        let mains = BTreeMap::from([("hub".to_owned(), MainInfo::default())]);
        let v7 = ViewData::next(&v6, mains, vec![entry("db", "x")]);
        assert!(v7.changed_for(v6.version, Some(&wants_web)));
    }

    mod incremental {
        use super::*;
        use crate::federation::registry::Registry;
        use proptest::prelude::*;

        proptest! {
            /// A build from what changed says what a build from everything says, to every
            /// home, and wakes at least the homes whose view changed.
            #[test]
            fn building_from_changes_matches_building_from_everything(
                ops in prop::collection::vec((0u8..6, prop::collection::vec(0u8..4, 0..3)), 1..30)
            ) {
                let mut r = Registry::with_epoch("hub", std::time::Duration::from_secs(600), 1);
                let _ = r.take_changes();
                let (mut full, mut incremental) = (ViewData::default(), ViewData::default());
                let interests: Vec<Interest> =
                    (0..4).map(|s| [(format!("s{s}"), 80)].into_iter().collect()).collect();
                for (node, services) in ops {
                    let node = format!("h{node}");
                    r.register(&node, services.iter().map(|s| entry(&format!("s{s}"), &node)).collect());
                    let Changes::Keys(keys) = r.take_changes() else { panic!("only the first call says everything") };
                    let changed: Vec<_> = keys.into_iter().map(|k| { let now = r.lookup(&k.0, k.1); (k, now) }).collect();
                    let next_full = ViewData::next(&full, BTreeMap::new(), r.all());
                    let next_inc = ViewData::next_changed(&incremental, BTreeMap::new(), changed);
                    prop_assert_eq!(next_full.encode_for(None), next_inc.encode_for(None));
                    for wanted in &interests {
                        prop_assert_eq!(next_full.encode_for(Some(wanted)), next_inc.encode_for(Some(wanted)));
                        let news = next_full.encode_for(Some(wanted)) != full.encode_for(Some(wanted));
                        if news && full.version > 0 {
                            prop_assert!(next_inc.changed_for(incremental.version, Some(wanted)));
                            let woken = match &next_inc.changed {
                                Changed::Everything => true,
                                Changed::Keys(k) => wanted.iter().any(|w| k.contains(w)),
                            };
                            prop_assert!(woken, "a home whose view changed is woken");
                        }
                    }
                    (full, incremental) = (next_full, next_inc);
                }
            }
        }
    }
}
