//! Rollout analysis: from the setup counters nodes report (cumulative, per destination main
//! relay, for the treated cohort and the control cohort), the verdict per main relay over the
//! policy's evaluation window. Pure: callers feed reports and time.
//!
//! Two rollouts use it ([`Subject`]): ECH (treated: setups sealed with ECH; control: plain
//! route headers) and direct paths (treated: setups first tried on a direct path; control:
//! relayed setups while direct paths are on). The rules below name ECH's cohorts; for direct
//! paths read "direct" and "relayed".
//!
//! A main relay is the unit ECH is sealed to, so one broken relay fails only its own verdict.
//! The ECH cohort fails when its success rate is below `minSuccessRate` while the plain cohort
//! to the same relay is healthy (or too small to judge); when both cohorts fail, the path is
//! broken, not ECH, and the verdict is inconclusive. Fewer than `minStreams` ECH setups in the
//! window is inconclusive too.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use relayfed_proto::federation::ech_cohorts;

/// Cumulative setup counters of one cohort toward one destination main relay: the type nodes
/// report, with its `since` (reset-aware increase) and `add`.
pub use ech_cohorts::CohortCounters as Counters;

impl From<&ech_cohorts::Cohorts> for Cohorts {
    fn from(c: &ech_cohorts::Cohorts) -> Self {
        Cohorts { ech: c.ech, plain: c.plain, ..Cohorts::default() }
    }
}

impl From<&relayfed_proto::federation::direct_cohorts::PathCohorts> for Cohorts {
    fn from(c: &relayfed_proto::federation::direct_cohorts::PathCohorts) -> Self {
        Cohorts { ech: c.direct, plain: c.relayed, ..Cohorts::default() }
    }
}

/// What a rollout rolls out: names its cohorts in reasons and messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Subject {
    /// ECH route headers (`spec.ech`).
    #[default]
    Ech,
    /// Direct paths between homes (`spec.directPaths`).
    DirectPaths,
}

impl Subject {
    /// The treated and the control cohort, as reasons name their setups.
    pub fn cohorts(self) -> (&'static str, &'static str) {
        match self {
            Subject::Ech => ("ECH", "plain"),
            Subject::DirectPaths => ("direct", "relayed"),
        }
    }
}

/// Both cohorts toward one main relay.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cohorts {
    /// The treated cohort: streams sealed with ECH (or first tried on a direct path).
    pub ech: Counters,
    /// The control cohort: streams with a plain route header (or relayed).
    pub plain: Counters,
    /// Nodes with ECH setups toward the relay in the window (counted by [`History`]).
    pub ech_reporters: u32,
    /// Of those, the nodes whose ECH setups include failures.
    pub failing_reporters: u32,
}

/// One node's counters at one time, by destination main relay.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// The reporting node.
    pub node: String,
    /// When the counters were read.
    pub at: SystemTime,
    /// Counters by destination main relay.
    pub by_main: BTreeMap<String, Cohorts>,
}

/// The reports of the last window, per node (bounded: older reports are dropped, and at most
/// `MAX_REPORTS_PER_NODE` are kept per node).
#[derive(Clone, Debug, Default)]
pub struct History {
    by_node: BTreeMap<String, VecDeque<Report>>,
}

/// Reports kept per node (one every few seconds over a window of minutes fits).
pub const MAX_REPORTS_PER_NODE: usize = 512;

impl History {
    /// Adds a report; reports older than `keep` before it are dropped (one older report is
    /// kept as the window's baseline).
    pub fn record(&mut self, report: Report, keep: Duration) {
        let q = self.by_node.entry(report.node.clone()).or_default();
        if q.back().is_some_and(|last| last.at > report.at) {
            return; // out of order: ignored
        }
        let horizon = report.at.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
        q.push_back(report);
        while q.len() > MAX_REPORTS_PER_NODE || (q.len() > 1 && q.get(1).is_some_and(|r| r.at <= horizon)) {
            q.pop_front();
        }
    }

    /// Keeps only the nodes `keep` says yes to (the others left the plan).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.by_node.retain(|n, _| keep(n));
    }

    /// Forgets a node (it left the federation).
    pub fn forget(&mut self, node: &str) {
        self.by_node.remove(node);
    }

    /// The increase of every node's counters over the `window` ending at `now`, summed by
    /// destination main relay. Each node's baseline is its newest report at or before the
    /// window's start (else its oldest); a node's counter reset inside the window counts what
    /// it reported since.
    pub fn increase(&self, window: Duration, now: SystemTime) -> BTreeMap<String, Cohorts> {
        self.increase_since(window, now, SystemTime::UNIX_EPOCH)
    }

    /// [`History::increase`], counting only what happened after `not_before` (no report from
    /// before it is a baseline): after a policy edit, setups made under the old policy are
    /// not judged.
    pub fn increase_since(
        &self,
        window: Duration,
        now: SystemTime,
        not_before: SystemTime,
    ) -> BTreeMap<String, Cohorts> {
        let start = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut out: BTreeMap<String, Cohorts> = BTreeMap::new();
        for q in self.by_node.values() {
            let in_window: Vec<&Report> = q.iter().filter(|r| r.at <= now && r.at >= not_before).collect();
            let Some(base_i) = in_window.iter().rposition(|r| r.at <= start).or((!in_window.is_empty()).then_some(0))
            else {
                continue;
            };
            let mut node: BTreeMap<&str, Cohorts> = BTreeMap::new();
            for pair in in_window[base_i..].windows(2) {
                let (a, b) = (pair[0], pair[1]);
                for (main, now_c) in &b.by_main {
                    let before = a.by_main.get(main).copied().unwrap_or_default();
                    let e = node.entry(main.as_str()).or_default();
                    e.ech.add(&now_c.ech.since(&before.ech));
                    e.plain.add(&now_c.plain.since(&before.plain));
                }
            }
            for (main, c) in node {
                let e = out.entry(main.to_owned()).or_default();
                e.ech.add(&c.ech);
                e.plain.add(&c.plain);
                e.ech_reporters += u32::from(c.ech.attempts > 0);
                e.failing_reporters += u32::from(c.ech.attempts > c.ech.successes);
            }
        }
        out
    }
}

/// What the analysis needs of the policy (`spec.ech.autoRollback` or
/// `spec.directPaths.autoRollback`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Criteria {
    /// Lowest acceptable setup success rate of the treated cohort.
    pub min_success_rate: f64,
    /// Fewest setups of the treated cohort in the window for a verdict.
    pub min_streams: u64,
    /// Whose cohorts these are.
    pub subject: Subject,
}

/// The verdict for one main relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The ECH cohort is healthy.
    Pass,
    /// The ECH cohort fails where the plain cohort does not.
    Fail,
    /// Too few ECH streams, or both cohorts fail (the path, not ECH).
    Inconclusive,
}

/// The analysis of one main relay over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    /// The destination main relay.
    pub main: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why, in a sentence with the figures (for conditions and Events).
    pub reason: String,
    /// The window's increases.
    pub counts: Cohorts,
}

/// Judges every main relay in `increase`.
pub fn analyse(increase: &BTreeMap<String, Cohorts>, c: Criteria) -> Vec<Analysis> {
    increase
        .iter()
        .map(|(main, counts)| {
            let (verdict, reason) = judge(counts, c);
            Analysis { main: main.clone(), verdict, reason, counts: *counts }
        })
        .collect()
}

fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

fn judge(counts: &Cohorts, c: Criteria) -> (Verdict, String) {
    let (ech, plain) = (&counts.ech, &counts.plain);
    let (treated, control) = c.subject.cohorts();
    if ech.attempts < c.min_streams {
        return (
            Verdict::Inconclusive,
            format!("{} {treated} setups in the window, fewer than minStreams {}", ech.attempts, c.min_streams),
        );
    }
    let rate = ech.success_rate().unwrap_or(0.0);
    if rate < c.min_success_rate && counts.ech_reporters >= 2 && counts.failing_reporters < 2 {
        // One home's word is not enough to lower the rollout for everyone calling this relay
        // (a compromised home could report failures it never had; an honest one may hold a
        // stale config of its own).
        return (
            Verdict::Inconclusive,
            format!(
                "{treated} setups {} successful of {}, but only 1 of {} calling nodes saw failures",
                pct(rate),
                ech.attempts,
                counts.ech_reporters
            ),
        );
    }
    if rate >= c.min_success_rate {
        return (
            Verdict::Pass,
            format!(
                "{treated} setups {} successful of {} (minimum {})",
                pct(rate),
                ech.attempts,
                pct(c.min_success_rate)
            ),
        );
    }
    match plain.success_rate() {
        Some(p) if plain.attempts >= c.min_streams && p < c.min_success_rate => (
            Verdict::Inconclusive,
            format!(
                "{treated} setups {} and {control} setups {} successful: the path fails, not {}",
                pct(rate),
                pct(p),
                match c.subject {
                    Subject::Ech => "ECH",
                    Subject::DirectPaths => "the direct path",
                }
            ),
        ),
        p => (
            Verdict::Fail,
            format!(
                "{treated} setups {} successful of {} (minimum {}); {control} setups {}",
                pct(rate),
                ech.attempts,
                pct(c.min_success_rate),
                p.map(pct).unwrap_or_else(|| "none".into())
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn c(attempts: u64, successes: u64) -> Counters {
        Counters { attempts, successes, fallbacks: 0, retries: 0, setup_seconds: successes as f64 * 0.01 }
    }

    fn report(node: &str, s: u64, main: &str, ech: Counters, plain: Counters) -> Report {
        Report {
            node: node.into(),
            at: t(s),
            by_main: BTreeMap::from([(main.to_owned(), Cohorts { ech, plain, ..Cohorts::default() })]),
        }
    }

    const C: Criteria = Criteria { min_success_rate: 0.95, min_streams: 100, subject: Subject::Ech };
    const W: Duration = Duration::from_secs(60);

    #[test]
    fn increases_are_summed_over_nodes_within_the_window() {
        let mut h = History::default();
        h.record(report("a", 0, "m1", c(1000, 1000), c(0, 0)), W);
        h.record(report("a", 30, "m1", c(1100, 1090), c(10, 10)), W);
        h.record(report("a", 60, "m1", c(1200, 1180), c(20, 20)), W);
        h.record(report("b", 10, "m1", c(5, 5), c(0, 0)), W);
        h.record(report("b", 60, "m1", c(105, 105), c(0, 0)), W);
        let inc = h.increase(W, t(60));
        assert_eq!(inc["m1"].ech.attempts, 200 + 100);
        assert_eq!(inc["m1"].ech.successes, 180 + 100);
        assert_eq!(inc["m1"].plain.attempts, 20);
        // A shorter window starts at a later baseline.
        assert_eq!(h.increase(Duration::from_secs(30), t(60))["m1"].ech.attempts, 100 + 100);
    }

    #[test]
    fn one_node_alone_cannot_fail_a_relay_that_others_call() {
        let mut h = History::default();
        // b and c call m1 without trouble; a claims a million failures.
        h.record(report("a", 0, "m1", c(0, 0), c(0, 0)), W);
        h.record(report("a", 30, "m1", c(1_000_000, 0), c(0, 0)), W);
        for n in ["b", "c"] {
            h.record(report(n, 0, "m1", c(0, 0), c(0, 0)), W);
            h.record(report(n, 30, "m1", c(200, 200), c(0, 0)), W);
        }
        let inc = h.increase(W, t(30));
        assert_eq!((inc["m1"].ech_reporters, inc["m1"].failing_reporters), (3, 1));
        let a = analyse(&inc, C).remove(0);
        assert_eq!(a.verdict, Verdict::Inconclusive, "{}", a.reason);
        assert!(a.reason.contains("only 1 of 3 calling nodes"), "{}", a.reason);
        // Two nodes failing is a verdict; so is the only caller failing.
        h.record(report("b", 40, "m1", c(300, 250), c(0, 0)), W);
        assert_eq!(analyse(&h.increase(W, t(40)), C).remove(0).verdict, Verdict::Fail);
        let mut lone = History::default();
        lone.record(report("a", 0, "m1", c(0, 0), c(0, 0)), W);
        lone.record(report("a", 30, "m1", c(200, 100), c(0, 0)), W);
        assert_eq!(analyse(&lone.increase(W, t(30)), C).remove(0).verdict, Verdict::Fail);
    }

    #[test]
    fn setups_before_an_edit_are_not_counted() {
        let mut h = History::default();
        h.record(report("a", 0, "m1", c(100, 100), c(0, 0)), W);
        h.record(report("a", 20, "m1", c(200, 120), c(0, 0)), W); // failures before the edit at 25
        h.record(report("a", 30, "m1", c(250, 170), c(0, 0)), W);
        h.record(report("a", 40, "m1", c(300, 220), c(0, 0)), W);
        let all = h.increase(W, t(40));
        assert_eq!((all["m1"].ech.attempts, all["m1"].ech.successes), (200, 120));
        let since = h.increase_since(W, t(40), t(25));
        assert_eq!(
            (since["m1"].ech.attempts, since["m1"].ech.successes),
            (50, 50),
            "from the first report after the edit"
        );
        assert!(h.increase_since(W, t(40), t(41)).is_empty());
    }

    #[test]
    fn a_counter_reset_counts_what_was_reported_since() {
        let mut h = History::default();
        h.record(report("a", 0, "m1", c(500, 500), c(0, 0)), W);
        h.record(report("a", 30, "m1", c(40, 30), c(0, 0)), W); // restarted
        h.record(report("a", 60, "m1", c(90, 70), c(0, 0)), W);
        let inc = h.increase(W, t(60));
        assert_eq!((inc["m1"].ech.attempts, inc["m1"].ech.successes), (90, 70));
    }

    #[test]
    fn old_reports_are_dropped_and_out_of_order_ones_ignored() {
        let mut h = History::default();
        for s in 0..2000 {
            h.record(report("a", s, "m1", c(s, s), c(0, 0)), W);
        }
        assert!(h.by_node["a"].len() <= 62, "{}", h.by_node["a"].len());
        h.record(report("a", 10, "m1", c(0, 0), c(0, 0)), W);
        assert_eq!(h.by_node["a"].back().unwrap().at, t(1999));
        assert_eq!(h.increase(W, t(1999))["m1"].ech.attempts, 60);
    }

    #[test]
    fn verdicts() {
        let one = |ech: Counters, plain: Counters| {
            analyse(&BTreeMap::from([("m1".to_owned(), Cohorts { ech, plain, ..Cohorts::default() })]), C)
                .remove(0)
                .verdict
        };
        assert_eq!(one(c(99, 0), c(0, 0)), Verdict::Inconclusive, "below minStreams");
        assert_eq!(one(c(100, 95), c(0, 0)), Verdict::Pass);
        assert_eq!(one(c(100, 94), c(0, 0)), Verdict::Fail, "no plain cohort to blame the path on");
        assert_eq!(one(c(100, 50), c(200, 199)), Verdict::Fail);
        assert_eq!(one(c(100, 50), c(200, 100)), Verdict::Inconclusive, "both cohorts fail: the path");
        assert_eq!(one(c(100, 50), c(20, 5)), Verdict::Fail, "too few plain setups to clear ECH");
    }

    #[test]
    fn reasons_carry_the_figures() {
        let a = analyse(
            &BTreeMap::from([(
                "m1".to_owned(),
                Cohorts { ech: c(200, 150), plain: c(100, 100), ..Cohorts::default() },
            )]),
            C,
        );
        assert_eq!(a[0].reason, "ECH setups 75.0% successful of 200 (minimum 95.0%); plain setups 100.0%");
        assert_eq!(a[0].counts.ech.mean_setup(), Some(Duration::from_millis(10)));
        let direct = Criteria { subject: Subject::DirectPaths, ..C };
        let both = Cohorts { ech: c(200, 150), plain: c(100, 50), ..Cohorts::default() };
        let a = analyse(&BTreeMap::from([("m1".to_owned(), both)]), direct);
        assert_eq!(
            a[0].reason,
            "direct setups 75.0% and relayed setups 50.0% successful: the path fails, not the direct path"
        );
    }

    #[test]
    fn any_report_sequence_yields_bounded_sane_figures() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let mut h = History::default();
            let mut s = 0;
            for _ in 0..rng.random_range(0..40) {
                s += rng.random_range(0..20);
                let a = rng.random_range(0..1000);
                let node = ["a", "b"][rng.random_range(0..2)];
                h.record(report(node, s, "m1", c(a, rng.random_range(0..=a)), c(a, a)), W);
            }
            for (_, k) in h.increase(W, t(s)) {
                let r = k.ech.success_rate().unwrap_or(0.0);
                assert!((0.0..=1.0).contains(&r));
            }
        }
    }
}
