//! Load balancing across instances of one service: round robin, least connections, random,
//! and the default peak-EWMA power of two choices (as Linkerd uses).
//!
//! Each instance has a circuit breaker: instances whose circuit is open are excluded (a
//! half-open one admits its probes); instances on the caller's own main relay are preferred
//! while any is healthy (unless `prefer_local` is off). Time and
//! randomness are passed in, so every algorithm is tested deterministically.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::Rng;

use super::registry::{Entry, Key};
use crate::resilience::breaker::{Breaker, BreakerConfig, State};

pub use relayfed_proto::config::Algorithm;

/// Decay time of the latency EWMA.
pub const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an instance with no observations (so new instances get tried).
const DEFAULT_RTT: f64 = 0.001;

#[derive(Clone, Debug)]
struct Stats {
    inflight: u32,
    ewma: f64,
    stamp: Instant,
    breaker: Breaker,
}

/// Per-service balancer state.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    prefer_local: bool,
    breaker: BreakerConfig,
    next: usize,
    stats: HashMap<Key, Stats>,
}

impl Balancer {
    /// A balancer using `algorithm`, with a `breaker` per instance.
    pub fn new(algorithm: Algorithm, prefer_local: bool, breaker: BreakerConfig) -> Self {
        Self { algorithm, prefer_local, breaker, next: 0, stats: HashMap::new() }
    }

    /// Breaker state of every instance seen.
    pub fn states(&mut self, now: Instant) -> Vec<(Key, State)> {
        self.stats.iter_mut().map(|(k, s)| (k.clone(), s.breaker.state(now))).collect()
    }

    /// The algorithm in use.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    fn healthy(&mut self, k: &Key, now: Instant) -> bool {
        self.stats.get_mut(k).is_none_or(|s| s.breaker.would_allow(now))
    }

    fn cost(&self, k: &Key, now: Instant) -> f64 {
        match self.stats.get(k) {
            None => DEFAULT_RTT,
            Some(s) => {
                // Decay the EWMA towards the default as time passes without observations.
                let w = (-(now.saturating_duration_since(s.stamp).as_secs_f64()) / EWMA_DECAY.as_secs_f64()).exp();
                let ewma = s.ewma * w + DEFAULT_RTT * (1.0 - w);
                ewma * f64::from(s.inflight + 1)
            }
        }
    }

    /// Picks an instance among `candidates` for a caller attached to `my_main`.
    pub fn pick<R: Rng>(&mut self, candidates: &[Entry], my_main: &str, now: Instant, rng: &mut R) -> Option<Entry> {
        let mut healthy: Vec<&Entry> = Vec::with_capacity(candidates.len());
        for e in candidates {
            if self.healthy(&e.key(), now) {
                healthy.push(e);
            }
        }
        let local: Vec<&Entry> = healthy.iter().copied().filter(|e| e.main == my_main).collect();
        let pool = if self.prefer_local && !local.is_empty() { local } else { healthy };
        if pool.is_empty() {
            return None;
        }
        let chosen = match self.algorithm {
            Algorithm::RoundRobin => {
                let e = pool[self.next % pool.len()];
                self.next = self.next.wrapping_add(1);
                e
            }
            Algorithm::Random => pool[rng.random_range(0..pool.len())],
            Algorithm::LeastConnections => {
                let min = pool.iter().map(|e| self.stats.get(&e.key()).map_or(0, |s| s.inflight)).min().unwrap_or(0);
                let ties: Vec<&&Entry> =
                    pool.iter().filter(|e| self.stats.get(&e.key()).map_or(0, |s| s.inflight) == min).collect();
                ties[rng.random_range(0..ties.len())]
            }
            Algorithm::PeakEwma => {
                if pool.len() == 1 {
                    pool[0]
                } else {
                    let a = rng.random_range(0..pool.len());
                    let mut b = rng.random_range(0..pool.len() - 1);
                    if b >= a {
                        b += 1;
                    }
                    if self.cost(&pool[a].key(), now) <= self.cost(&pool[b].key(), now) { pool[a] } else { pool[b] }
                }
            }
        };
        let chosen = chosen.clone();
        // Reserve a half-open probe slot, if that is the state.
        self.stats_mut(&chosen.key(), now).breaker.allow(now);
        Some(chosen)
    }

    fn stats_mut(&mut self, k: &Key, now: Instant) -> &mut Stats {
        let breaker = self.breaker;
        self.stats.entry(k.clone()).or_insert_with(|| Stats {
            inflight: 0,
            ewma: DEFAULT_RTT,
            stamp: now,
            breaker: Breaker::new(breaker),
        })
    }

    /// A stream to `k` started.
    pub fn started(&mut self, k: &Key, now: Instant) {
        self.stats_mut(k, now).inflight += 1;
    }

    /// A stream to `k` ended; `latency` is its setup latency when it succeeded.
    pub fn finished(&mut self, k: &Key, now: Instant, latency: Option<Duration>) {
        let s = self.stats_mut(k, now);
        s.inflight = s.inflight.saturating_sub(1);
        match latency {
            Some(rtt) => {
                let rtt = rtt.as_secs_f64();
                let w = (-(now.saturating_duration_since(s.stamp).as_secs_f64()) / EWMA_DECAY.as_secs_f64()).exp();
                // Peak: jump up at once, decay down slowly.
                s.ewma = if rtt > s.ewma { rtt } else { s.ewma * w + rtt * (1.0 - w) };
                s.stamp = now;
                s.breaker.record(true, now);
            }
            None => s.breaker.record(false, now),
        }
    }

    /// A stream to `k` ended without telling anything about the instance (e.g. a probe).
    pub fn release(&mut self, k: &Key) {
        if let Some(s) = self.stats.get_mut(k) {
            s.inflight = s.inflight.saturating_sub(1);
            s.breaker.cancel();
        }
    }

    /// Forgets instances that are gone from the registry.
    pub fn retain(&mut self, alive: &[Entry]) {
        let keys: std::collections::HashSet<Key> = alive.iter().map(Entry::key).collect();
        self.stats.retain(|k, _| keys.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// One failure opens an instance's circuit for `COOLDOWN` (one probe when half-open).
    const COOLDOWN: Duration = Duration::from_secs(5);

    fn cfg() -> BreakerConfig {
        BreakerConfig { consecutive_failures: 1, open_for: COOLDOWN, half_open_probes: 1, ..BreakerConfig::default() }
    }

    fn inst(node: &str, main: &str) -> Entry {
        Entry { service: "s".into(), port: 1, node: node.into(), main: main.into(), ..Entry::default() }
    }

    fn counts(b: &mut Balancer, c: &[Entry], n: usize, now: Instant, rng: &mut StdRng) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for _ in 0..n {
            *m.entry(b.pick(c, "m1", now, rng).unwrap().node).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn round_robin_is_even_and_random_roughly_even() {
        let c = [inst("a", "m1"), inst("b", "m1"), inst("c", "m1")];
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(7);
        let mut rr = Balancer::new(Algorithm::RoundRobin, true, cfg());
        assert!(counts(&mut rr, &c, 300, now, &mut rng).values().all(|&v| v == 100));
        let mut rnd = Balancer::new(Algorithm::Random, true, cfg());
        assert!(counts(&mut rnd, &c, 3000, now, &mut rng).values().all(|&v| (850..1150).contains(&v)));
    }

    #[test]
    fn least_connections_avoids_busy_instances() {
        let c = [inst("a", "m1"), inst("b", "m1")];
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Balancer::new(Algorithm::LeastConnections, true, cfg());
        b.started(&c[0].key(), now);
        for _ in 0..20 {
            assert_eq!(b.pick(&c, "m1", now, &mut rng).unwrap().node, "b");
        }
    }

    #[test]
    fn peak_ewma_prefers_the_faster_instance() {
        let c = [inst("slow", "m1"), inst("fast", "m1")];
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Balancer::new(Algorithm::PeakEwma, true, cfg());
        for (k, ms) in [(c[0].key(), 50), (c[1].key(), 1)] {
            b.started(&k, t0);
            b.finished(&k, t0, Some(Duration::from_millis(ms)));
        }
        let m = counts(&mut b, &c, 1000, t0, &mut rng);
        assert_eq!(m.get("slow"), None, "with two instances P2C always compares both");
        // While the fast one is loaded, the slow one (50x slower) still loses ...
        b.started(&c[1].key(), t0);
        assert_eq!(b.pick(&c, "m1", t0, &mut rng).unwrap().node, "fast");
        // ... but its penalty decays: later, one stream in flight on the fast instance
        // (cost x2) is enough to send the next stream to the slow one.
        let later = t0 + EWMA_DECAY * 10;
        assert_eq!(b.pick(&c, "m1", later, &mut rng).unwrap().node, "slow");
    }

    #[test]
    fn an_open_circuit_is_skipped_and_recovers_through_half_open() {
        let c = [inst("a", "m1"), inst("b", "m1")];
        let t0 = Instant::now();
        let mut rng = StdRng::seed_from_u64(5);
        let mut b = Balancer::new(Algorithm::RoundRobin, true, cfg());
        b.started(&c[0].key(), t0);
        b.finished(&c[0].key(), t0, None);
        assert!(!counts(&mut b, &c, 10, t0, &mut rng).contains_key("a"));
        assert!(b.states(t0).contains(&(c[0].key(), State::Open)));
        // Half-open: one probe goes to `a`; a success closes its circuit.
        let t1 = t0 + COOLDOWN;
        let probes = counts(&mut b, &c, 10, t1, &mut rng);
        assert_eq!(probes.get("a"), Some(&1), "{probes:?}");
        b.finished(&c[0].key(), t1, Some(Duration::from_millis(1)));
        assert!(b.states(t1).contains(&(c[0].key(), State::Closed)));
        assert_eq!(counts(&mut b, &c, 10, t1, &mut rng).get("a"), Some(&5));
        let t2 = t1 + Duration::from_millis(1);
        b.finished(&c[0].key(), t2, None);
        b.finished(&c[1].key(), t2, None);
        assert!(b.pick(&c, "m1", t2, &mut rng).is_none(), "all circuits open");
    }

    #[test]
    fn local_instances_are_preferred_unless_disabled() {
        let c = [inst("far", "m2"), inst("near", "m1")];
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(9);
        let mut b = Balancer::new(Algorithm::RoundRobin, true, cfg());
        assert!(!counts(&mut b, &c, 10, now, &mut rng).contains_key("far"));
        let mut b = Balancer::new(Algorithm::RoundRobin, false, cfg());
        assert_eq!(counts(&mut b, &c, 10, now, &mut rng).get("far"), Some(&5));
        // When the local instance fails, the federated one takes over.
        let mut b = Balancer::new(Algorithm::RoundRobin, true, cfg());
        b.finished(&c[1].key(), now, None);
        assert_eq!(b.pick(&c, "m1", now, &mut rng).unwrap().node, "far");
    }
}
