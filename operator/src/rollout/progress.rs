//! The effective ECH percentage per destination main relay: what is applied, from the
//! configured policy and the analyses ([`super::analysis`]). Pure: callers keep the state
//! between evaluations and apply the result.
//!
//! - A new policy generation re-arms: every relay starts at the first step (or the configured
//!   percentage when there are no steps). The configured percentage is never rewritten.
//! - A relay whose ECH cohort fails loses `step` points (to 0 at worst) and is not judged again
//!   until a whole window has passed since (the window still holds the failures that caused
//!   the rollback). It stays rolled back until the next edit.
//! - Steps advance every `stepInterval` while no relay fails and at least one passes, or while
//!   there is traffic but the step selects no destination that has any; when every verdict is
//!   inconclusive otherwise (no traffic, or too few ECH setups), advancement pauses.
//! - `dryRun`: the rollbacks that would happen are reported (once per window and relay),
//!   nothing changes.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::analysis::{Analysis, Verdict};

/// What the progression needs of the policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The policy generation (an edit re-arms).
    pub generation: i64,
    /// `spec.ech.percentage`.
    pub configured: u8,
    /// `spec.ech.steps` (percentages below `configured`, ascending); empty: straight to it.
    pub steps: Vec<u8>,
    /// Time between steps.
    pub step_interval: Duration,
    /// Whether failures roll back (`autoRollback.enabled`).
    pub auto_rollback: bool,
    /// Points removed per rollback (`autoRollback.step`).
    pub rollback_step: u8,
    /// The evaluation window (`autoRollback.evaluationWindow`).
    pub window: Duration,
    /// Report only (`autoRollback.dryRun`).
    pub dry_run: bool,
}

impl Policy {
    /// The percentage a rollout starts at: the first step, or `configured` without steps.
    pub fn start(&self) -> u8 {
        self.ladder()[0]
    }

    /// The percentages the rollout passes through, ending at `configured`.
    fn ladder(&self) -> Vec<u8> {
        let mut l: Vec<u8> = self.steps.iter().copied().filter(|s| *s < self.configured).collect();
        l.sort_unstable();
        l.dedup();
        l.push(self.configured);
        l
    }
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Phase {
    /// Advancing through the steps.
    Progressing,
    /// Every verdict inconclusive: waiting for traffic.
    Paused,
    /// At the configured percentage, nothing rolled back.
    Succeeded,
    /// At least one relay was rolled back.
    RolledBack,
}

/// The state kept between evaluations.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// The generation it was armed for.
    pub generation: i64,
    /// Index into the ladder.
    pub step: usize,
    /// When the current step began.
    pub step_since: SystemTime,
    /// Points rolled back per relay, and when the last rollback happened.
    pub rolled_back: BTreeMap<String, (u8, SystemTime)>,
    /// The phase.
    pub phase: Phase,
    /// Dry run: when each relay's last would-be rollback was reported (once per window).
    pub dry_runs: BTreeMap<String, SystemTime>,
}

/// What changed in one evaluation (for Events, conditions and logs).
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// A new generation: the rollout starts again at `to`.
    Rearmed {
        /// The starting percentage.
        to: u8,
    },
    /// The next step.
    Advanced {
        /// The new percentage.
        to: u8,
    },
    /// A relay's percentage was lowered.
    RolledBack {
        /// The destination main relay.
        main: String,
        /// Its percentage before and after.
        from: u8,
        /// Its percentage after.
        to: u8,
        /// The analysis' reason.
        reason: String,
    },
    /// In dry-run mode: the rollback that would have happened.
    WouldRollBack {
        /// The destination main relay.
        main: String,
        /// Its percentage.
        at: u8,
        /// The analysis' reason.
        reason: String,
    },
}

impl State {
    /// The percentage of the current step, before rollbacks.
    pub fn base(&self, p: &Policy) -> u8 {
        let l = p.ladder();
        l[self.step.min(l.len() - 1)]
    }

    /// The effective percentage for destinations attached to `main`.
    pub fn effective(&self, p: &Policy, main: &str) -> u8 {
        let base = self.base(p);
        self.rolled_back.get(main).map(|(pts, _)| base.saturating_sub(*pts)).unwrap_or(base)
    }
}

fn armed(p: &Policy, now: SystemTime) -> State {
    let phase = if p.ladder().len() == 1 { Phase::Succeeded } else { Phase::Progressing };
    State {
        generation: p.generation,
        step: 0,
        step_since: now,
        rolled_back: BTreeMap::new(),
        phase,
        dry_runs: BTreeMap::new(),
    }
}

/// One evaluation at `now`.
pub fn evaluate(prev: Option<&State>, p: &Policy, analyses: &[Analysis], now: SystemTime) -> (State, Vec<Transition>) {
    let mut out = Vec::new();
    let mut s = match prev {
        Some(s) if s.generation == p.generation => s.clone(),
        _ => {
            let s = armed(p, now);
            out.push(Transition::Rearmed { to: s.base(p) });
            s
        }
    };
    let settled = |s: &State, main: &str| {
        s.rolled_back.get(main).is_none_or(|(_, at)| now.duration_since(*at).unwrap_or_default() >= p.window)
    };
    let mut failed = false;
    for a in analyses.iter().filter(|a| a.verdict == Verdict::Fail) {
        failed = true;
        let at = s.effective(p, &a.main);
        if !p.auto_rollback || at == 0 || !settled(&s, &a.main) {
            continue;
        }
        if p.dry_run {
            let reported =
                s.dry_runs.get(&a.main).is_some_and(|at| now.duration_since(*at).unwrap_or_default() < p.window);
            if !reported {
                s.dry_runs.insert(a.main.clone(), now);
                out.push(Transition::WouldRollBack { main: a.main.clone(), at, reason: a.reason.clone() });
            }
            continue;
        }
        let to = at.saturating_sub(p.rollback_step);
        let pts = s.rolled_back.get(&a.main).map(|(pts, _)| *pts).unwrap_or(0) + (at - to);
        s.rolled_back.insert(a.main.clone(), (pts, now));
        s.phase = Phase::RolledBack;
        out.push(Transition::RolledBack { main: a.main.clone(), from: at, to, reason: a.reason.clone() });
    }
    let last = p.ladder().len() - 1;
    if s.step < last && !failed && s.phase != Phase::RolledBack {
        // A step that selects no destination with traffic has nothing to judge: it is not
        // held (at 5% of three homes, ECH may reach none of them).
        let passed = analyses.iter().any(|a| a.verdict == Verdict::Pass);
        let traffic = analyses.iter().any(|a| a.counts.ech.attempts + a.counts.plain.attempts > 0);
        let ech_traffic = analyses.iter().any(|a| a.counts.ech.attempts > 0);
        let nothing_selected = traffic && !ech_traffic;
        if !passed && !nothing_selected {
            s.phase = Phase::Paused;
        } else {
            s.phase = Phase::Progressing;
            if now.duration_since(s.step_since).unwrap_or_default() >= p.step_interval {
                s.step += 1;
                s.step_since = now;
                out.push(Transition::Advanced { to: s.base(p) });
                if s.step == last {
                    s.phase = Phase::Succeeded;
                }
            }
        }
    }
    (s, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::analysis::{Cohorts, Counters};

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn policy() -> Policy {
        Policy {
            generation: 1,
            configured: 100,
            steps: vec![5, 25, 50],
            step_interval: Duration::from_secs(60),
            auto_rollback: true,
            rollback_step: 25,
            window: Duration::from_secs(120),
            dry_run: false,
        }
    }

    fn a(main: &str, verdict: Verdict) -> Analysis {
        Analysis { main: main.into(), verdict, reason: format!("{verdict:?}"), counts: Cohorts::default() }
    }

    #[test]
    fn steps_advance_under_healthy_traffic_and_pause_without_traffic() {
        let p = policy();
        let (s, tr) = evaluate(None, &p, &[], t(0));
        assert_eq!(tr, [Transition::Rearmed { to: 5 }]);
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Pass)], t(59));
        assert!(tr.is_empty(), "not before stepInterval");
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Pass)], t(60));
        assert_eq!(tr, [Transition::Advanced { to: 25 }]);
        let (s, _) = evaluate(Some(&s), &p, &[a("m1", Verdict::Inconclusive)], t(200));
        assert_eq!((s.phase, s.base(&p)), (Phase::Paused, 25), "no traffic: paused, not advanced");
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Pass), a("m2", Verdict::Inconclusive)], t(201));
        assert_eq!(tr, [Transition::Advanced { to: 50 }]);
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Pass)], t(261));
        assert_eq!(tr, [Transition::Advanced { to: 100 }]);
        assert_eq!(s.phase, Phase::Succeeded);
        let (s2, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Pass)], t(900));
        assert!(tr.is_empty());
        assert_eq!(s2, s);
    }

    #[test]
    fn a_step_that_selects_no_destination_with_traffic_is_not_held() {
        let p = policy();
        let (s, _) = evaluate(None, &p, &[], t(0));
        let plain_only = Analysis {
            counts: Cohorts {
                plain: Counters { attempts: 50, successes: 50, ..Counters::default() },
                ..Cohorts::default()
            },
            ..a("m1", Verdict::Inconclusive)
        };
        let (s, tr) = evaluate(Some(&s), &p, std::slice::from_ref(&plain_only), t(60));
        assert_eq!(tr, [Transition::Advanced { to: 25 }]);
        let few_ech = Analysis {
            counts: Cohorts { ech: Counters { attempts: 2, successes: 2, ..Counters::default() }, ..plain_only.counts },
            ..plain_only
        };
        let (s, tr) = evaluate(Some(&s), &p, &[few_ech], t(200));
        assert!(tr.is_empty(), "ECH setups below minStreams: held");
        assert_eq!(s.phase, Phase::Paused);
    }

    #[test]
    fn a_failing_relay_is_rolled_back_alone_once_per_window() {
        let p = Policy { steps: vec![], ..policy() };
        let (s, _) = evaluate(None, &p, &[], t(0));
        assert_eq!(s.phase, Phase::Succeeded);
        let fail = [a("m1", Verdict::Fail), a("m2", Verdict::Pass)];
        let (s, tr) = evaluate(Some(&s), &p, &fail, t(10));
        assert_eq!(tr, [Transition::RolledBack { main: "m1".into(), from: 100, to: 75, reason: "Fail".into() }]);
        assert_eq!((s.effective(&p, "m1"), s.effective(&p, "m2")), (75, 100));
        assert_eq!(s.phase, Phase::RolledBack);
        let (s, tr) = evaluate(Some(&s), &p, &fail, t(129));
        assert!(tr.is_empty(), "the window still holds the failures that caused the rollback");
        let (s, tr) = evaluate(Some(&s), &p, &fail, t(130));
        assert_eq!(tr.len(), 1);
        assert_eq!(s.effective(&p, "m1"), 50);
        let mut s = s;
        for i in 0..5 {
            s = evaluate(Some(&s), &p, &fail, t(300 + i * 200)).0;
        }
        assert_eq!(s.effective(&p, "m1"), 0, "at worst 0");
        // The next edit re-arms everything.
        let edited = Policy { generation: 2, ..p.clone() };
        let (s, tr) = evaluate(Some(&s), &edited, &[], t(2000));
        assert_eq!(tr, [Transition::Rearmed { to: 100 }]);
        assert_eq!(s.effective(&edited, "m1"), 100);
    }

    #[test]
    fn a_rolled_back_rollout_does_not_advance() {
        let p = policy();
        let (s, _) = evaluate(None, &p, &[], t(0));
        let (s, _) = evaluate(Some(&s), &p, &[a("m1", Verdict::Fail)], t(10));
        assert_eq!(s.effective(&p, "m1"), 0, "5% minus 25 points");
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Pass)], t(500));
        assert!(tr.is_empty());
        assert_eq!((s.phase, s.base(&p)), (Phase::RolledBack, 5));
    }

    #[test]
    fn dry_run_and_disabled_rollback_change_nothing() {
        let p = Policy { dry_run: true, steps: vec![], ..policy() };
        let (s, _) = evaluate(None, &p, &[], t(0));
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Fail)], t(10));
        assert_eq!(tr, [Transition::WouldRollBack { main: "m1".into(), at: 100, reason: "Fail".into() }]);
        assert_eq!(s.effective(&p, "m1"), 100);
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Fail)], t(12));
        assert!(tr.is_empty(), "reported once per window: {tr:?}");
        let (s, tr) = evaluate(Some(&s), &p, &[a("m1", Verdict::Fail)], t(130));
        assert_eq!(tr.len(), 1, "and again after a window");
        let off = Policy { auto_rollback: false, ..p };
        let (s, tr) = evaluate(Some(&s), &off, &[a("m1", Verdict::Fail)], t(20));
        assert!(tr.is_empty());
        assert_eq!(s.effective(&off, "m1"), 100);
    }

    #[test]
    fn steps_above_the_configured_percentage_are_ignored() {
        let p = Policy { configured: 30, steps: vec![50, 10, 10, 25], ..policy() };
        assert_eq!(p.ladder(), [10, 25, 30]);
        assert_eq!(p.start(), 10);
        assert_eq!(Policy { steps: vec![], ..p.clone() }.start(), 30);
        let p0 = Policy { configured: 0, ..policy() };
        let (s, tr) = evaluate(None, &p0, &[a("m1", Verdict::Fail)], t(0));
        assert_eq!(tr, [Transition::Rearmed { to: 0 }], "nothing to roll back at 0%");
        assert_eq!(s.phase, Phase::Succeeded);
    }
}
