//! ECH cohort counters: per destination main relay, the stream setups of the ECH cohort
//! (destinations the rollout policy selects for ECH) and of the plain cohort, and how they
//! went. Calling homes keep them and report them to the operator (distribution
//! `POST /v1/report/{node}`, docs/protocol.md §10), whose rollout analysis compares the two
//! cohorts per relay. Cumulative since the process started; no I/O.

use std::collections::BTreeMap;
use std::sync::Mutex;

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
    /// Sum of the setup times of successful setups, in seconds.
    #[serde(default)]
    pub setup_seconds: f64,
}

impl CohortCounters {
    /// Successes per attempt, if any attempt.
    pub fn success_rate(&self) -> Option<f64> {
        (self.attempts > 0).then(|| self.successes.min(self.attempts) as f64 / self.attempts as f64)
    }

    /// Why these counters cannot be real (a decoder check), if they cannot.
    pub fn implausible(&self) -> Option<&'static str> {
        if self.successes > self.attempts {
            Some("successes exceed attempts")
        } else if self.fallbacks > self.attempts {
            Some("fallbacks exceed attempts")
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
    /// Time from opening the stream to the handshake's end (successes only).
    pub seconds: f64,
}

/// The counters of one node, by destination main relay.
#[derive(Debug, Default)]
pub struct EchCohorts {
    by_main: Mutex<BTreeMap<String, Cohorts>>,
}

impl EchCohorts {
    /// Counts one setup toward `main`.
    pub fn record(&self, main: &str, s: Setup) {
        let Ok(mut m) = self.by_main.lock() else { return };
        if !m.contains_key(main) && m.len() >= MAX_MAINS {
            return;
        }
        let c = m.entry(main.to_owned()).or_default();
        let c = match s.cohort {
            Cohort::Ech => &mut c.ech,
            Cohort::Plain => &mut c.plain,
        };
        c.attempts += 1;
        if s.fallback {
            c.fallbacks += 1;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(cohort: Cohort, ok: bool, fallback: bool) -> Setup {
        Setup { cohort, ok, fallback, seconds: 0.5 }
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
        assert_eq!(t["a"].ech, CohortCounters { attempts: 3, successes: 2, fallbacks: 1, setup_seconds: 1.0 });
        assert_eq!(t["a"].plain, CohortCounters { attempts: 1, successes: 1, fallbacks: 0, setup_seconds: 0.5 });
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
    fn implausible_counters_are_named() {
        let ok = CohortCounters { attempts: 2, successes: 2, fallbacks: 1, setup_seconds: 0.1 };
        assert_eq!(ok.implausible(), None);
        assert!(CohortCounters { successes: 3, ..ok }.implausible().is_some());
        assert!(CohortCounters { fallbacks: 3, ..ok }.implausible().is_some());
        assert!(CohortCounters { setup_seconds: f64::NAN, ..ok }.implausible().is_some());
        assert!(CohortCounters { setup_seconds: -1.0, ..ok }.implausible().is_some());
    }
}
