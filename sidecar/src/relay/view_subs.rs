//! Which home writers a view build concerns: an index from each imported `(service, port)`
//! to the writers of the homes importing it, so a build that changed one service wakes the
//! homes importing that service, not all of them (with 10,000 homes, waking every writer on
//! every registration was most of a relay's CPU during a reconnect storm).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::Notify;

use super::views::Interest;

/// What a view build changed since the one before.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) enum Changed {
    /// Something every home sees (the mains' ECH configs), or too much to list.
    #[default]
    Everything,
    /// The `(service, port)` keys whose instances changed.
    Keys(HashSet<(String, u16)>),
}

/// One home writer: what it imports (`None`: everything) and how to wake it.
struct Writer {
    interest: Option<Arc<Interest>>,
    wake: Arc<Notify>,
}

/// The writers of a relay's homes, indexed by what they import.
#[derive(Default)]
pub(crate) struct Subscribers {
    next_id: u64,
    writers: HashMap<u64, Writer>,
    /// Writers by an imported key.
    by_key: HashMap<(String, u16), HashSet<u64>>,
    /// Writers of homes that import everything.
    everything: HashSet<u64>,
}

impl Subscribers {
    /// Adds a writer importing `interest`; returns its id.
    pub(crate) fn add(&mut self, interest: Option<Arc<Interest>>, wake: Arc<Notify>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.index(id, interest.as_deref());
        self.writers.insert(id, Writer { interest, wake });
        id
    }

    /// The writer's home now imports `interest`: re-indexed, and woken to look again.
    pub(crate) fn set_interest(&mut self, id: u64, interest: Option<Arc<Interest>>) {
        let Some(old) = self.writers.get(&id).map(|w| w.interest.clone()) else { return };
        self.unindex(id, old.as_deref());
        self.index(id, interest.as_deref());
        if let Some(w) = self.writers.get_mut(&id) {
            w.interest = interest;
            w.wake.notify_one();
        }
    }

    /// The writer ended.
    pub(crate) fn remove(&mut self, id: u64) {
        if let Some(w) = self.writers.remove(&id) {
            self.unindex(id, w.interest.as_deref());
        }
    }

    /// Wakes every writer whose home imports something `changed` touches; returns how many.
    pub(crate) fn wake(&self, changed: &Changed) -> usize {
        let ids: HashSet<u64> = match changed {
            Changed::Everything => self.writers.keys().copied().collect(),
            Changed::Keys(keys) => {
                let mut ids: HashSet<u64> = self.everything.clone();
                for k in keys {
                    if let Some(w) = self.by_key.get(k) {
                        ids.extend(w);
                    }
                }
                ids
            }
        };
        for id in &ids {
            if let Some(w) = self.writers.get(id) {
                w.wake.notify_one();
            }
        }
        ids.len()
    }

    fn index(&mut self, id: u64, interest: Option<&Interest>) {
        match interest {
            None => {
                self.everything.insert(id);
            }
            Some(keys) => {
                for k in keys {
                    self.by_key.entry(k.clone()).or_default().insert(id);
                }
            }
        }
    }

    fn unindex(&mut self, id: u64, interest: Option<&Interest>) {
        match interest {
            None => {
                self.everything.remove(&id);
            }
            Some(keys) => {
                for k in keys {
                    if let Some(ids) = self.by_key.get_mut(k) {
                        ids.remove(&id);
                        if ids.is_empty() {
                            self.by_key.remove(k);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn interest(keys: &[&str]) -> Option<Arc<Interest>> {
        Some(Arc::new(keys.iter().map(|k| ((*k).to_owned(), 80)).collect()))
    }

    fn keys(keys: &[&str]) -> Changed {
        Changed::Keys(keys.iter().map(|k| ((*k).to_owned(), 80)).collect())
    }

    #[test]
    fn a_build_wakes_the_homes_importing_what_it_changed_and_those_importing_everything() {
        let mut subs = Subscribers::default();
        let web = subs.add(interest(&["web"]), Arc::new(Notify::new()));
        let _db = subs.add(interest(&["db"]), Arc::new(Notify::new()));
        let _all = subs.add(None, Arc::new(Notify::new()));
        assert_eq!(subs.wake(&keys(&["web"])), 2, "web's importer and the one importing everything");
        assert_eq!(subs.wake(&keys(&["mail"])), 1, "only the one importing everything");
        assert_eq!(subs.wake(&Changed::Everything), 3);
        // A home that changes its imports is re-indexed; one that leaves is forgotten.
        subs.set_interest(web, interest(&["mail"]));
        assert_eq!(subs.wake(&keys(&["web"])), 1);
        assert_eq!(subs.wake(&keys(&["mail"])), 2);
        subs.remove(web);
        assert_eq!(subs.wake(&keys(&["mail"])), 1);
        assert!(!subs.by_key.contains_key(&("mail".to_owned(), 80)), "no empty index entries are kept");
    }

    #[tokio::test]
    async fn a_woken_writer_finds_its_wake_up_even_if_it_was_busy_when_it_came() {
        let mut subs = Subscribers::default();
        let wake = Arc::new(Notify::new());
        subs.add(interest(&["web"]), wake.clone());
        subs.wake(&keys(&["web"]));
        // The permit is stored: the writer, back from sending a view, does not miss it.
        tokio::time::timeout(std::time::Duration::from_secs(5), wake.notified()).await.unwrap();
    }
}
