//! Direct-path cohort counters: per destination main relay, the stream setups a calling home
//! first tried on a direct path to the destination home, and those it sent through relays
//! while direct paths were on. Reported beside the ECH counters (distribution
//! `POST /v1/report/{node}`, docs/protocol.md §10); the operator's direct-path rollout judges
//! the direct cohort against the relayed one per relay. Cumulative since the process started;
//! no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ech_cohorts::{Cohort, CohortCounters, EchCohorts, Setup};

/// Both cohorts toward one destination main relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathCohorts {
    /// Setups first tried on a direct path. A setup the direct path failed (it closed, or did
    /// not answer, and the stream went out again through a relay) is an attempt without
    /// success, and so is a stream set up on it that failed when the path closed under it;
    /// `setupSeconds` sums the successful setups.
    pub direct: CohortCounters,
    /// Setups sent through a main relay while direct paths were on.
    pub relayed: CohortCounters,
}

/// The counters of one node, by destination main relay (at most
/// [`super::ech_cohorts::MAX_MAINS`] relays).
#[derive(Debug, Default)]
pub struct DirectCohorts {
    // The same bounded ledger as ECH's: its first cohort holds the direct setups, its second
    // the relayed ones.
    ledger: EchCohorts,
}

impl DirectCohorts {
    /// Counts one setup toward `main`: on a direct path or not, whether it completed, and how
    /// long it took.
    pub fn record(&self, main: &str, direct: bool, ok: bool, seconds: f64) {
        let cohort = if direct { Cohort::Ech } else { Cohort::Plain };
        self.ledger.record(main, Setup { cohort, ok, fallback: false, retried: false, seconds });
    }

    /// The counters so far.
    pub fn totals(&self) -> BTreeMap<String, PathCohorts> {
        self.ledger.totals().into_iter().map(|(m, c)| (m, PathCohorts { direct: c.ech, relayed: c.plain })).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_land_in_their_cohort_and_relay() {
        let c = DirectCohorts::default();
        c.record("a", true, true, 0.25);
        c.record("a", true, false, 0.0);
        c.record("a", false, true, 0.5);
        c.record("b", false, false, 0.0);
        let t = c.totals();
        assert_eq!(
            t["a"].direct,
            CohortCounters { attempts: 2, successes: 1, fallbacks: 0, retries: 0, setup_seconds: 0.25 }
        );
        assert_eq!((t["a"].relayed.attempts, t["a"].relayed.successes), (1, 1));
        assert_eq!((t["b"].direct.attempts, t["b"].relayed.success_rate()), (0, Some(0.0)));
    }
}
