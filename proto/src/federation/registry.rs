//! The service registry of a main relay: local entries (its own home nodes) and federated
//! entries (learned from peer main relays), merged deterministically.
//!
//! Each main relay numbers the changes to its *local* entries with `(epoch, seq)` — the epoch
//! is fixed when the relay starts (so a restarted relay is newer than its previous life) and
//! `seq` counts changes — and sends them to its peers as deltas; a peer applies a delta only
//! if it is newer than the last one applied from that origin, so replays and reordering after
//! a reconnect cannot resurrect removed entries. A `full` delta replaces everything known from
//! that origin (sent when a peering comes up). Federated entries expire `ttl` after the last
//! delta or refresh from their origin; owners refresh while they live and remove entries
//! promptly when a home node deregisters. Plain data; time is passed in (tests use a fake clock).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// One instance of a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Home node serving it.
    pub node: String,
    /// Main relay the home node is attached to.
    pub main: String,
    /// The home node's Noise static public key, base64.
    pub noise_key: String,
    /// Whether the destination accepts ECH-sealed routes (capability).
    #[serde(default)]
    pub ech: bool,
    /// The home keeps this relay as a warm standby: reachable through it, but callers use
    /// the home's active relay while it is registered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub standby: bool,
    /// When the home made this relay its active one (its own clock, Unix ms, strictly
    /// increasing per home): of two active registrations of one home, the later is where it
    /// is now.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attached: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The registrations callers should use: per home node and service, the active one that
/// attached last, else a standby (a home reachable only through its standby relay, while its
/// active relay's entry is withdrawn). Order is kept.
pub fn current_registrations(entries: Vec<Entry>) -> Vec<Entry> {
    let rank = |e: &Entry| (!e.standby, e.attached);
    let mut best: std::collections::HashMap<(&str, &str, u16), (bool, u64)> = std::collections::HashMap::new();
    for e in &entries {
        let r = rank(e);
        best.entry((&e.node, &e.service, e.port)).and_modify(|b| *b = (*b).max(r)).or_insert(r);
    }
    let keep: Vec<bool> =
        entries.iter().map(|e| best.get(&(e.node.as_str(), e.service.as_str(), e.port)) == Some(&rank(e))).collect();
    entries.into_iter().zip(keep).filter_map(|(e, k)| k.then_some(e)).collect()
}

/// Identity of an entry: which service instance it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Key {
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Home node.
    pub node: String,
    /// Its main relay.
    pub main: String,
}

impl Entry {
    /// The entry's key.
    pub fn key(&self) -> Key {
        Key { service: self.service.clone(), port: self.port, node: self.node.clone(), main: self.main.clone() }
    }
}

/// A change to one origin's local entries, as sent between main relays.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delta {
    /// Main relay whose local entries these are.
    pub origin: String,
    /// Origin's incarnation (fixed per process start).
    #[serde(default)]
    pub epoch: u64,
    /// Origin's sequence number after this change.
    pub seq: u64,
    /// Replace everything known from `origin` with `add`.
    #[serde(default)]
    pub full: bool,
    /// Entries added or updated.
    #[serde(default)]
    pub add: Vec<Entry>,
    /// Entries removed.
    #[serde(default)]
    pub remove: Vec<Key>,
}

impl Delta {
    /// This delta with only the entries (added and removed) of services `keep` accepts: what
    /// a peer that may call only those services is told. Sequence numbers are kept, so the
    /// peer sees no gap where everything was left out.
    pub fn only(&self, keep: impl Fn(&str) -> bool) -> Delta {
        Delta {
            origin: self.origin.clone(),
            epoch: self.epoch,
            seq: self.seq,
            full: self.full,
            add: self.add.iter().filter(|e| keep(&e.service)).cloned().collect(),
            remove: self.remove.iter().filter(|k| keep(&k.service)).cloned().collect(),
        }
    }
}

/// Outcome of applying a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Applied; the view changed or was refreshed.
    Applied,
    /// Ignored: not newer than what was already applied from that origin.
    Stale,
    /// Ignored: an entry claimed to belong to a different main relay than the sender.
    Forged,
}

/// A `(service, port)` pair: what callers look up and what views are cut by.
pub type ServiceKey = (String, u16);

/// What changed in the routable entries since the last [`Registry::take_changes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// Anything may have changed (a new registry): look at everything.
    Everything,
    /// Only instances of these services changed.
    Keys(HashSet<ServiceKey>),
}

/// Notes in `changed` (unless it already stands for everything) that instances of
/// `service:port` changed.
fn touch(changed: &mut Option<HashSet<ServiceKey>>, service: &str, port: u16) {
    if let Some(changed) = changed {
        changed.insert((service.to_owned(), port));
    }
}

#[derive(Clone, Debug)]
struct Federated {
    entry: Entry,
    expires: Instant,
    /// False while the origin relay is out of reach (its peering is down, or it restarted
    /// and its home has not registered with its new life yet): kept, not routed to.
    reachable: bool,
}

/// A main relay's registry.
#[derive(Debug)]
pub struct Registry {
    me: String,
    ttl: Duration,
    epoch: u64,
    local: BTreeMap<Key, Entry>,
    local_seq: u64,
    federated: BTreeMap<Key, Federated>,
    origin_seq: HashMap<String, (u64, u64)>,
    /// Local keys by home node (a registration touches its own entries only).
    local_by_node: HashMap<String, Vec<Key>>,
    /// Services whose routable instances changed since the last `take_changes`; `None`:
    /// everything.
    changed: Option<HashSet<ServiceKey>>,
}

impl Registry {
    /// An empty registry for main relay `me`; federated entries live `ttl` unless refreshed.
    /// The epoch is the start time in Unix milliseconds.
    pub fn new(me: &str, ttl: Duration) -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self::with_epoch(me, ttl, epoch)
    }

    /// As [`Registry::new`] with an explicit epoch (tests).
    pub fn with_epoch(me: &str, ttl: Duration, epoch: u64) -> Self {
        Self {
            me: me.to_owned(),
            ttl,
            epoch,
            local: BTreeMap::new(),
            local_seq: 0,
            federated: BTreeMap::new(),
            origin_seq: HashMap::new(),
            local_by_node: HashMap::new(),
            changed: None,
        }
    }

    /// Replaces the entries of home node `node` with `entries`; returns the delta for peers
    /// (`None` when nothing changed).
    pub fn register(&mut self, node: &str, entries: Vec<Entry>) -> Option<Delta> {
        let old: Vec<Key> = self.local_by_node.remove(node).unwrap_or_default();
        let mut add = Vec::new();
        let mut keep = std::collections::HashSet::new();
        for mut e in entries {
            e.node = node.to_owned();
            e.main = self.me.clone();
            let k = e.key();
            keep.insert(k.clone());
            if self.local.get(&k) != Some(&e) {
                self.local.insert(k, e.clone());
                add.push(e);
            }
        }
        let remove: Vec<Key> = old.into_iter().filter(|k| !keep.contains(k)).collect();
        for k in &remove {
            self.local.remove(k);
        }
        if !keep.is_empty() {
            self.local_by_node.insert(node.to_owned(), keep.into_iter().collect());
        }
        for (service, port) in
            add.iter().map(|e| (&e.service, e.port)).chain(remove.iter().map(|k| (&k.service, k.port)))
        {
            touch(&mut self.changed, service, port);
        }
        self.delta(add, remove)
    }

    /// What changed since the last call (the first call: everything); the next call
    /// reports changes from now on.
    pub fn take_changes(&mut self) -> Changes {
        match self.changed.replace(HashSet::new()) {
            None => Changes::Everything,
            Some(keys) => Changes::Keys(keys),
        }
    }

    /// Removes every entry of `node` (it disconnected or deregistered).
    pub fn deregister(&mut self, node: &str) -> Option<Delta> {
        self.register(node, Vec::new())
    }

    fn delta(&mut self, add: Vec<Entry>, remove: Vec<Key>) -> Option<Delta> {
        if add.is_empty() && remove.is_empty() {
            return None;
        }
        self.local_seq += 1;
        Some(Delta { origin: self.me.clone(), epoch: self.epoch, seq: self.local_seq, full: false, add, remove })
    }

    /// Everything local, as a `full` delta (sent when a peering comes up, and as refresh).
    pub fn full_delta(&self) -> Delta {
        Delta {
            origin: self.me.clone(),
            epoch: self.epoch,
            seq: self.local_seq,
            full: true,
            add: self.local.values().cloned().collect(),
            remove: Vec::new(),
        }
    }

    /// Applies a delta received from peer `from`.
    pub fn apply(&mut self, from: &str, d: &Delta, now: Instant) -> Applied {
        if d.origin != from || d.add.iter().any(|e| e.main != from) || d.remove.iter().any(|k| k.main != from) {
            return Applied::Forged;
        }
        let last = self.origin_seq.get(&d.origin).copied();
        let at = (d.epoch, d.seq);
        let newer = match last {
            None => true,
            Some(s) => at > s || (d.full && at >= s),
        };
        if !newer {
            return Applied::Stale;
        }
        // A new incarnation of the origin only speaks in full deltas first; anything it says
        // replaces what its previous life said.
        let new_epoch = last.is_some_and(|(e, _)| e != d.epoch);
        self.origin_seq.insert(d.origin.clone(), at);
        if new_epoch || d.full {
            for k in self.federated.keys().filter(|k| k.main == d.origin) {
                touch(&mut self.changed, &k.service, k.port);
            }
        }
        for (service, port) in
            d.add.iter().map(|e| (&e.service, e.port)).chain(d.remove.iter().map(|k| (&k.service, k.port)))
        {
            touch(&mut self.changed, service, port);
        }
        let expires = now + self.ttl;
        if new_epoch {
            // A restarted origin knows none of its homes yet; they are reconnecting to it.
            // What its previous life said is kept, unroutable, until each home registers
            // again (re-added below or by a later delta) or the entry's TTL runs out.
            for f in self.federated.values_mut().filter(|f| f.entry.main == d.origin) {
                f.reachable = false;
            }
        } else if d.full {
            self.federated.retain(|k, _| k.main != d.origin);
        }
        for k in &d.remove {
            self.federated.remove(k);
        }
        for e in &d.add {
            self.federated.insert(e.key(), Federated { entry: e.clone(), expires, reachable: true });
        }
        Applied::Applied
    }

    /// The peering with `origin` is down: its homes cannot be reached through it, from now.
    /// Their entries are kept (the next full delta from `origin` replaces them) and expire by
    /// TTL as usual. Returns how many were withdrawn.
    pub fn origin_down(&mut self, origin: &str) -> usize {
        let mut n = 0;
        for f in self.federated.values_mut().filter(|f| f.entry.main == origin && f.reachable) {
            f.reachable = false;
            touch(&mut self.changed, &f.entry.service, f.entry.port);
            n += 1;
        }
        n
    }

    /// This relay's current sequence number (sent in refreshes).
    pub fn seq(&self) -> u64 {
        self.local_seq
    }

    /// This relay's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// A refresh from `origin` at `seq`: extends the TTL of its entries when `seq` is the last
    /// one applied (a newer one means deltas were missed: the entries are left to expire and
    /// the next full delta repairs the view). Returns whether anything was refreshed.
    pub fn refresh(&mut self, origin: &str, epoch: u64, seq: u64, now: Instant) -> bool {
        if self.origin_seq.get(origin) != Some(&(epoch, seq)) {
            return false;
        }
        let expires = now + self.ttl;
        for f in self.federated.values_mut().filter(|f| f.entry.main == origin) {
            f.expires = expires;
        }
        true
    }

    /// Drops federated entries whose TTL ran out; returns their keys.
    pub fn expire(&mut self, now: Instant) -> Vec<Key> {
        let gone: Vec<Key> = self.federated.iter().filter(|(_, f)| f.expires <= now).map(|(k, _)| k.clone()).collect();
        for k in &gone {
            self.federated.remove(k);
            touch(&mut self.changed, &k.service, k.port);
        }
        gone
    }

    fn routable(&self) -> impl Iterator<Item = &Entry> {
        self.local.values().chain(self.federated.values().filter(|f| f.reachable).map(|f| &f.entry))
    }

    /// Reachable instances of `service:port`: local ones first, then federated, each in key
    /// order (a range of each map: keys sort by service and port first).
    pub fn lookup(&self, service: &str, port: u16) -> Vec<Entry> {
        let from = Key { service: service.to_owned(), port, node: String::new(), main: String::new() };
        let here = |k: &Key| k.service == service && k.port == port;
        let local = self.local.range(from.clone()..).take_while(|(k, _)| here(k)).map(|(_, e)| e.clone());
        let federated = self
            .federated
            .range(from..)
            .take_while(|(k, _)| here(k))
            .filter(|(_, f)| f.reachable)
            .map(|(_, f)| f.entry.clone());
        local.chain(federated).collect()
    }

    /// Every reachable entry (local then federated): what views carry.
    pub fn all(&self) -> Vec<Entry> {
        self.routable().cloned().collect()
    }

    /// Local entries.
    pub fn local(&self) -> impl Iterator<Item = &Entry> {
        self.local.values()
    }

    /// Federated entries with the time left before they expire and whether they are reachable.
    pub fn federated(&self, now: Instant) -> impl Iterator<Item = (&Entry, Duration, bool)> {
        self.federated.values().map(move |f| (&f.entry, f.expires.saturating_duration_since(now), f.reachable))
    }

    /// How many distinct services (`service:port`) local homes export (keys sort by service
    /// and port first, so neighbours are compared; no hashing).
    pub fn local_services(&self) -> usize {
        let mut count = 0;
        let mut last: Option<(&str, u16)> = None;
        for k in self.local.keys() {
            if last != Some((k.service.as_str(), k.port)) {
                count += 1;
                last = Some((k.service.as_str(), k.port));
            }
        }
        count
    }

    /// Counts: (local, federated).
    pub fn sizes(&self) -> (usize, usize) {
        (self.local.len(), self.federated.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(service: &str, node: &str, main: &str) -> Entry {
        Entry {
            service: service.into(),
            port: 80,
            node: node.into(),
            main: main.into(),
            noise_key: "k".into(),
            ech: true,
            standby: false,
            attached: 0,
        }
    }

    #[test]
    fn registration_produces_minimal_deltas() {
        let mut r = Registry::new("m1", Duration::from_secs(600));
        let d1 = r.register("h1", vec![e("a", "", ""), e("b", "", "")]).unwrap();
        assert_eq!((d1.seq, d1.add.len(), d1.remove.len()), (1, 2, 0));
        assert_eq!(d1.add[0].main, "m1", "the main relay stamps its own id");
        assert!(r.register("h1", vec![e("a", "", ""), e("b", "", "")]).is_none(), "re-registration is idempotent");
        let d2 = r.register("h1", vec![e("a", "", "")]).unwrap();
        assert_eq!((d2.seq, d2.add.len(), d2.remove.len()), (2, 0, 1));
        let d3 = r.deregister("h1").unwrap();
        assert_eq!(d3.remove.len(), 1);
        assert!(r.lookup("a", 80).is_empty());
    }

    #[test]
    fn stale_and_forged_deltas_are_ignored() {
        let t0 = Instant::now();
        let mut origin = Registry::new("m2", Duration::from_secs(600));
        let add = origin.register("h", vec![e("a", "", "")]).unwrap();
        let del = origin.deregister("h").unwrap();
        let mut r = Registry::new("m1", Duration::from_secs(600));
        assert_eq!(r.apply("m2", &add, t0), Applied::Applied);
        assert_eq!(r.apply("m2", &del, t0), Applied::Applied);
        assert_eq!(r.apply("m2", &add, t0), Applied::Stale, "a replayed add must not resurrect the entry");
        assert!(r.lookup("a", 80).is_empty());
        assert_eq!(r.apply("m3", &add, t0), Applied::Forged, "m3 cannot speak for m2");
    }

    #[test]
    fn a_restarted_origin_is_newer_than_its_previous_life() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(600);
        let mut old = Registry::with_epoch("m2", ttl, 100);
        old.register("h", vec![e("a", "", "")]);
        old.register("h", vec![e("a", "", ""), e("b", "", "")]);
        let mut r = Registry::with_epoch("m1", ttl, 1);
        r.apply("m2", &old.full_delta(), t0);
        // The restarted relay starts counting again, but from a later epoch.
        let mut new = Registry::with_epoch("m2", ttl, 200);
        assert_eq!(r.apply("m2", &new.full_delta(), t0), Applied::Applied);
        assert!(r.lookup("a", 80).is_empty(), "the old life's entries are not routed to");
        assert_eq!(r.federated(t0).filter(|f| !f.2).count(), 2, "but kept while the homes reconnect");
        let d = new.register("h", vec![e("a", "", "")]).unwrap();
        assert_eq!(r.apply("m2", &d, t0), Applied::Applied);
        assert_eq!(r.lookup("a", 80).len(), 1);
        assert!(r.lookup("b", 80).is_empty(), "an entry the new life did not register stays withdrawn");
        assert_eq!(r.expire(t0 + ttl).len(), 2, "then expires by TTL");
        assert_eq!(r.apply("m2", &old.full_delta(), t0), Applied::Stale, "the old life cannot come back");
    }

    #[test]
    fn a_lost_peering_withdraws_its_homes_at_once_until_the_next_full_delta() {
        let t0 = Instant::now();
        let mut origin = Registry::new("m2", Duration::from_secs(600));
        origin.register("h", vec![e("a", "", "")]);
        let mut r = Registry::new("m1", Duration::from_secs(600));
        r.apply("m2", &origin.full_delta(), t0);
        assert_eq!(r.origin_down("m2"), 1);
        assert!(r.lookup("a", 80).is_empty() && r.all().is_empty());
        assert_eq!(r.sizes(), (0, 1), "kept for a quick return");
        assert_eq!(r.origin_down("m2"), 0);
        // The peering is back: the same life's full delta (same sequence number) restores it.
        assert_eq!(r.apply("m2", &origin.full_delta(), t0), Applied::Applied);
        assert_eq!(r.lookup("a", 80).len(), 1);
    }

    #[test]
    fn federated_entries_expire_unless_refreshed() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(600);
        let mut origin = Registry::new("m2", ttl);
        origin.register("h", vec![e("a", "", "")]);
        let mut r = Registry::new("m1", ttl);
        r.apply("m2", &origin.full_delta(), t0);
        assert!(r.expire(t0 + Duration::from_secs(599)).is_empty());
        // A refresh (the same full delta) extends the lifetime.
        assert_eq!(r.apply("m2", &origin.full_delta(), t0 + Duration::from_secs(500)), Applied::Applied);
        assert!(r.expire(t0 + Duration::from_secs(1000)).is_empty());
        assert_eq!(r.expire(t0 + Duration::from_secs(1100)).len(), 1);
        assert!(r.lookup("a", 80).is_empty());
    }

    #[test]
    fn refreshes_extend_only_at_the_current_sequence_number() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut origin = Registry::new("m2", ttl);
        origin.register("h", vec![e("a", "", "")]);
        let mut r = Registry::new("m1", ttl);
        r.apply("m2", &origin.full_delta(), t0);
        assert!(r.refresh("m2", origin.epoch(), origin.seq(), t0 + Duration::from_secs(9)));
        assert!(r.expire(t0 + Duration::from_secs(15)).is_empty());
        assert!(
            !r.refresh("m2", origin.epoch(), origin.seq() + 1, t0 + Duration::from_secs(18)),
            "a gap is not papered over"
        );
        assert_eq!(r.expire(t0 + Duration::from_secs(19)).len(), 1);
    }

    #[test]
    fn a_full_delta_replaces_everything_from_its_origin() {
        let t0 = Instant::now();
        let mut r = Registry::new("m1", Duration::from_secs(600));
        let d = Delta {
            origin: "m2".into(),
            epoch: 1,
            seq: 5,
            full: false,
            add: vec![e("a", "h1", "m2"), e("a", "h2", "m2")],
            remove: vec![],
        };
        r.apply("m2", &d, t0);
        let full =
            Delta { origin: "m2".into(), epoch: 1, seq: 6, full: true, add: vec![e("a", "h2", "m2")], remove: vec![] };
        r.apply("m2", &full, t0);
        assert_eq!(r.lookup("a", 80).iter().map(|e| e.node.as_str()).collect::<Vec<_>>(), ["h2"]);
    }

    #[test]
    fn lookups_are_local_first() {
        let t0 = Instant::now();
        let mut r = Registry::new("m1", Duration::from_secs(600));
        r.apply(
            "m2",
            &Delta {
                origin: "m2".into(),
                epoch: 1,
                seq: 1,
                full: true,
                add: vec![e("a", "far", "m2")],
                remove: vec![],
            },
            t0,
        );
        r.register("near", vec![e("a", "", "")]);
        let found: Vec<_> = r.lookup("a", 80).into_iter().map(|e| e.node).collect();
        assert_eq!(found, ["near", "far"]);
        assert_eq!(r.sizes(), (1, 1));
        r.register("other", vec![e("a", "", ""), e("b", "", "")]);
        assert_eq!(r.local_services(), 2, "a (twice) and b");
    }

    mod changes {
        use super::*;
        use proptest::prelude::*;

        /// One thing that happens to a registry.
        #[derive(Clone, Debug)]
        enum Op {
            Register(u8, Vec<u8>),
            Deregister(u8),
            Delta { full: bool, epoch: u64, add: Vec<(u8, u8)>, remove: Vec<(u8, u8)> },
            OriginDown,
            Expire(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            let svc = || 0u8..4;
            prop_oneof![
                (0u8..4, prop::collection::vec(svc(), 0..3)).prop_map(|(n, s)| Op::Register(n, s)),
                (0u8..4).prop_map(Op::Deregister),
                (
                    any::<bool>(),
                    1u64..3,
                    prop::collection::vec((svc(), 0u8..3), 0..3),
                    prop::collection::vec((svc(), 0u8..3), 0..2)
                )
                    .prop_map(|(full, epoch, add, remove)| Op::Delta { full, epoch, add, remove }),
                Just(Op::OriginDown),
                (0u64..1200).prop_map(Op::Expire),
            ]
        }

        /// Every service's instances, by lookup.
        fn views(r: &Registry) -> BTreeMap<ServiceKey, Vec<Entry>> {
            (0..4).map(|s| ((format!("s{s}"), 80), r.lookup(&format!("s{s}"), 80))).collect()
        }

        proptest! {
            /// Lookups by range give what a scan of every routable entry gives, and
            /// `take_changes` names every service whose instances changed.
            #[test]
            fn lookups_match_a_scan_and_every_change_is_reported(ops in prop::collection::vec(op(), 1..40)) {
                let t0 = Instant::now();
                let mut r = Registry::with_epoch("m1", Duration::from_secs(600), 1);
                let mut seq = 0u64;
                prop_assert_eq!(r.take_changes(), Changes::Everything);
                for op in ops {
                    let before = views(&r);
                    match op {
                        Op::Register(n, svcs) => {
                            r.register(&format!("h{n}"), svcs.iter().map(|s| e(&format!("s{s}"), "", "")).collect());
                        }
                        Op::Deregister(n) => {
                            r.deregister(&format!("h{n}"));
                        }
                        Op::Delta { full, epoch, add, remove } => {
                            seq += 1;
                            let d = Delta {
                                origin: "m2".into(),
                                epoch,
                                seq,
                                full,
                                add: add.iter().map(|(s, n)| e(&format!("s{s}"), &format!("f{n}"), "m2")).collect(),
                                remove: remove.iter().map(|(s, n)| e(&format!("s{s}"), &format!("f{n}"), "m2").key()).collect(),
                            };
                            r.apply("m2", &d, t0);
                        }
                        Op::OriginDown => {
                            r.origin_down("m2");
                        }
                        Op::Expire(s) => {
                            r.expire(t0 + Duration::from_secs(s));
                        }
                    }
                    let after = views(&r);
                    for (key, list) in &after {
                        let scanned: Vec<Entry> =
                            r.all().into_iter().filter(|e| e.service == key.0 && e.port == key.1).collect();
                        let mut sorted_scan = scanned.clone();
                        sorted_scan.sort();
                        let mut sorted = list.clone();
                        sorted.sort();
                        prop_assert_eq!(sorted, sorted_scan);
                    }
                    let Changes::Keys(changed) = r.take_changes() else { panic!("only the first call reports everything") };
                    for (key, list) in &after {
                        if before.get(key) != Some(list) {
                            prop_assert!(changed.contains(key), "{:?} changed unreported", key);
                        }
                    }
                }
            }
        }
    }
}
