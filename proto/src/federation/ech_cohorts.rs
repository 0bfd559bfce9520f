//! ECH cohort counters: per destination main relay, the stream setups of the ECH cohort
//! (destinations the rollout policy selects for ECH) and of the plain cohort, and how they
//! went. Calling homes keep them and report them to the operator (distribution
//! `POST /v1/report/{node}`, docs/protocol.md §10), whose rollout analysis compares the two
//! cohorts per relay. Cumulative since the process started; no I/O.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Destination main relays tracked per node; setups toward others are not counted (the
/// relay ids come from views, which relays fill, so the map must not grow without bound).
pub const MAX_MAINS: usize = 256;

/// Cumulative setup counters of one cohort toward one main relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CohortCounters {
    /// Setups attempted.
    pub attempts: u64,
    /// Setups whose end-to-end handshake completed.
    pub successes: u64,
    /// ECH cohort only: setups that went out plain because no usable ECH config existed.
    #[serde(default)]
    pub fallbacks: u64,
    /// ECH cohort only: setups sent again with a newer config after the relay answered that
    /// the one used was stale (retry configs, §5.4 of docs/protocol.md).
    #[serde(default)]
    pub retries: u64,
    /// Sum of the setup times of successful setups, in seconds.
    #[serde(default)]
    pub setup_seconds: f64,
}

impl CohortCounters {
    /// Successes per attempt, if any attempt.
    pub fn success_rate(&self) -> Option<f64> {
        (self.attempts > 0).then(|| self.successes.min(self.attempts) as f64 / self.attempts as f64)
    }

    /// Mean setup time of successful setups.
    pub fn mean_setup(&self) -> Option<Duration> {
        (self.successes > 0).then(|| Duration::from_secs_f64(self.setup_seconds.max(0.0) / self.successes as f64))
    }

    /// Why these counters cannot be real (a decoder check), if they cannot.
    pub fn implausible(&self) -> Option<&'static str> {
        if self.successes > self.attempts {
            Some("successes exceed attempts")
        } else if self.fallbacks > self.attempts {
            Some("fallbacks exceed attempts")
        } else if self.retries > self.attempts {
            Some("retries exceed attempts")
        } else if !self.setup_seconds.is_finite() || self.setup_seconds < 0.0 {
            Some("setupSeconds is not a non-negative number")
        } else {
            None
        }
    }
}

/// Both cohorts toward one main relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cohorts {
    /// Streams selected for ECH.
    pub ech: CohortCounters,
    /// Streams with a plain route header by policy.
    pub plain: CohortCounters,
}

/// Which cohort a setup belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cohort {
    /// The policy selected the destination for ECH.
    Ech,
    /// The policy left the destination plain.
    Plain,
}

/// One finished setup attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Setup {
    /// Its cohort.
    pub cohort: Cohort,
    /// Whether the end-to-end handshake completed.
    pub ok: bool,
    /// Selected for ECH but sent plain (no usable config).
    pub fallback: bool,
    /// Sent again with a newer config after a stale-config answer.
    pub retried: bool,
    /// Time from opening the stream to the handshake's end (successes only).
    pub seconds: f64,
}

/// How far back a node's ECH health (admin API) looks.
pub const HEALTH_WINDOW: Duration = Duration::from_secs(60);
/// Below this ECH setup success rate a node's ECH health is degraded.
pub const HEALTHY_SUCCESS_RATE: f64 = 0.95;
/// Fewest ECH setups in the window for a judgement (fewer: idle).
pub const HEALTH_MIN_SETUPS: u64 = 10;
/// Samples of the totals are taken at most this often.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// The counters of one node, by destination main relay.
#[derive(Debug, Default)]
pub struct EchCohorts {
    by_main: Mutex<BTreeMap<String, Cohorts>>,
    /// Totals over every relay, sampled (for the health window).
    samples: Mutex<VecDeque<(Instant, Cohorts)>>,
}

/// A node's ECH health over [`HEALTH_WINDOW`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum EchHealth {
    /// ECH setups succeed at [`HEALTHY_SUCCESS_RATE`] or better.
    Healthy,
    /// They succeed less often.
    Degraded,
    /// Too few ECH setups to say.
    Idle,
}

/// The health of the setups in `recent`.
pub fn health(recent: &Cohorts) -> EchHealth {
    match recent.ech.success_rate() {
        _ if recent.ech.attempts < HEALTH_MIN_SETUPS => EchHealth::Idle,
        Some(r) if r >= HEALTHY_SUCCESS_RATE => EchHealth::Healthy,
        _ => EchHealth::Degraded,
    }
}

impl CohortCounters {
    /// The increase from `earlier` to `self`; a counter that went down was reset (the node
    /// restarted), and its whole value is the increase (as Prometheus' `increase`).
    pub fn since(&self, earlier: &CohortCounters) -> CohortCounters {
        if self.attempts < earlier.attempts || self.successes < earlier.successes {
            return *self;
        }
        CohortCounters {
            attempts: self.attempts - earlier.attempts,
            successes: self.successes - earlier.successes,
            fallbacks: self.fallbacks.saturating_sub(earlier.fallbacks),
            retries: self.retries.saturating_sub(earlier.retries),
            setup_seconds: (self.setup_seconds - earlier.setup_seconds).max(0.0),
        }
    }

    /// Adds `o` (another node's, or another window's, counters).
    pub fn add(&mut self, o: &CohortCounters) {
        self.attempts += o.attempts;
        self.successes += o.successes;
        self.fallbacks += o.fallbacks;
        self.retries += o.retries;
        self.setup_seconds += o.setup_seconds;
    }
}

impl EchCohorts {
    /// Counts one setup toward `main`.
    pub fn record(&self, main: &str, s: Setup) {
        let Ok(mut m) = self.by_main.lock() else { return };
        if !m.contains_key(main) {
            if m.len() >= MAX_MAINS {
                return;
            }
            m.insert(main.to_owned(), Cohorts::default());
        }
        // The relay's name is allocated once, not per setup.
        let Some(c) = m.get_mut(main) else { return };
        let c = match s.cohort {
            Cohort::Ech => &mut c.ech,
            Cohort::Plain => &mut c.plain,
        };
        c.attempts += 1;
        if s.fallback {
            c.fallbacks += 1;
        }
        if s.retried {
            c.retries += 1;
        }
        if s.ok {
            c.successes += 1;
            c.setup_seconds += s.seconds.max(0.0);
        }
    }

    /// The counters so far.
    pub fn totals(&self) -> BTreeMap<String, Cohorts> {
        self.by_main.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The setups of the last [`HEALTH_WINDOW`] (or since the oldest sample), every relay
    /// together. Each call may take a sample; the report loop calls it every few seconds.
    pub fn recent(&self, now: Instant) -> Cohorts {
        let mut total = Cohorts::default();
        for c in self.totals().values() {
            total.ech.add(&c.ech);
            total.plain.add(&c.plain);
        }
        let Ok(mut samples) = self.samples.lock() else { return total };
        if samples.back().is_none_or(|(at, _)| now.saturating_duration_since(*at) >= SAMPLE_EVERY) {
            samples.push_back((now, total));
        }
        while samples.len() > 1
            && samples.get(1).is_some_and(|(at, _)| now.saturating_duration_since(*at) >= HEALTH_WINDOW)
        {
            samples.pop_front();
        }
        let base = samples.front().map(|(_, c)| *c).unwrap_or_default();
        Cohorts { ech: total.ech.since(&base.ech), plain: total.plain.since(&base.plain) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(cohort: Cohort, ok: bool, fallback: bool) -> Setup {
        Setup { cohort, ok, fallback, retried: false, seconds: 0.5 }
    }

    #[test]
    fn setups_land_in_their_cohort_and_relay() {
        let c = EchCohorts::default();
        c.record("a", setup(Cohort::Ech, true, false));
        c.record("a", setup(Cohort::Ech, false, false));
        c.record("a", setup(Cohort::Ech, true, true));
        c.record("a", setup(Cohort::Plain, true, false));
        c.record("b", setup(Cohort::Plain, false, false));
        let t = c.totals();
        assert_eq!(
            t["a"].ech,
            CohortCounters { attempts: 3, successes: 2, fallbacks: 1, retries: 0, setup_seconds: 1.0 }
        );
        assert_eq!(
            t["a"].plain,
            CohortCounters { attempts: 1, successes: 1, fallbacks: 0, retries: 0, setup_seconds: 0.5 }
        );
        assert_eq!(t["b"].plain.success_rate(), Some(0.0));
        assert_eq!(t["b"].ech.success_rate(), None);
    }

    #[test]
    fn the_relay_map_is_bounded() {
        let c = EchCohorts::default();
        for i in 0..MAX_MAINS + 10 {
            c.record(&format!("m{i}"), setup(Cohort::Plain, true, false));
        }
        c.record("m0", setup(Cohort::Plain, true, false));
        let t = c.totals();
        assert_eq!(t.len(), MAX_MAINS);
        assert_eq!(t["m0"].plain.attempts, 2, "known relays keep counting");
    }

    #[test]
    fn health_looks_at_the_last_minute() {
        let c = EchCohorts::default();
        let t0 = Instant::now();
        for _ in 0..20 {
            c.record("a", setup(Cohort::Ech, false, false));
        }
        assert_eq!(health(&c.recent(t0)), EchHealth::Idle, "the first sample is the baseline");
        for _ in 0..20 {
            c.record("a", setup(Cohort::Ech, true, false));
        }
        let r = c.recent(t0 + Duration::from_secs(10));
        assert_eq!((r.ech.attempts, r.ech.successes), (20, 20));
        assert_eq!(health(&r), EchHealth::Healthy);
        c.record("b", setup(Cohort::Ech, false, false));
        c.record("b", setup(Cohort::Ech, false, false));
        assert_eq!(health(&c.recent(t0 + Duration::from_secs(20))), EchHealth::Degraded, "20 of 22");
        // A minute later only what happened since the later samples counts.
        for _ in 0..10 {
            c.record("a", setup(Cohort::Ech, true, false));
        }
        let r = c.recent(t0 + Duration::from_secs(75));
        assert_eq!((r.ech.attempts, r.ech.successes), (12, 10), "{r:?}");
        assert_eq!(health(&Cohorts::default()), EchHealth::Idle);
    }

    #[test]
    fn implausible_counters_are_named() {
        let ok = CohortCounters { attempts: 2, successes: 2, fallbacks: 1, retries: 1, setup_seconds: 0.1 };
        assert_eq!(ok.implausible(), None);
        assert!(CohortCounters { successes: 3, ..ok }.implausible().is_some());
        assert!(CohortCounters { fallbacks: 3, ..ok }.implausible().is_some());
        assert!(CohortCounters { retries: 3, ..ok }.implausible().is_some());
        assert!(CohortCounters { setup_seconds: f64::NAN, ..ok }.implausible().is_some());
        assert!(CohortCounters { setup_seconds: -1.0, ..ok }.implausible().is_some());
    }
}
