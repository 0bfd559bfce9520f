//! One rollout (ECH's or direct paths', its [`Subject`]), evaluated again and again: turns a
//! `RolloutPolicy` into the analysis criteria and the progression policy, judges the window's
//! cohort counters, keeps the progression state between evaluations, and writes the
//! effective percentages into snapshots. Pure: the operator and local mode feed it counters
//! and time and apply what it returns.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, SystemTime};

use relayfed_crds::{DirectAnalysis, DirectPathsStatus, MainAnalysis, RolloutPolicy};
use relayfed_proto::config::{Role, Snapshot};
use serde::Serialize;

pub use super::analysis::Subject;
use super::analysis::{Analysis, Cohorts, Criteria, Verdict, analyse};
use super::progress::{self, Phase, State, Transition};

/// The progression policy of `subject` in a `RolloutPolicy`. For ECH the generation is the
/// object's `metadata.generation` mixed with a hash of its `spec`, so any edit of the spec
/// re-arms, also where no API server counts generations (local mode). For direct paths it is
/// a hash of `spec.directPaths` alone: editing ECH or resilience settings does not restart
/// the direct-path rollout (nor undo its rollbacks).
pub fn progression(rp: &RolloutPolicy, subject: Subject) -> progress::Policy {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let (configured, steps, interval, rb) = match subject {
        Subject::Ech => {
            serde_json::to_string(&rp.spec).unwrap_or_default().hash(&mut h);
            rp.metadata.generation.hash(&mut h);
            let ech = &rp.spec.ech;
            (ech.percentage, &ech.steps, ech.step_interval, &ech.auto_rollback)
        }
        Subject::DirectPaths => {
            let d = &rp.spec.direct_paths;
            serde_json::to_string(d).unwrap_or_default().hash(&mut h);
            (d.percentage, &d.steps, d.step_interval, &d.auto_rollback)
        }
    };
    progress::Policy {
        generation: (h.finish() >> 1) as i64,
        configured: configured.min(100),
        steps: steps.clone(),
        step_interval: interval.get(),
        auto_rollback: rb.enabled,
        rollback_step: rb.step,
        window: rb.evaluation_window.get(),
        dry_run: rb.dry_run,
    }
}

/// The analysis criteria of `subject` in a `RolloutPolicy`.
pub fn criteria(rp: &RolloutPolicy, subject: Subject) -> Criteria {
    let rb = match subject {
        Subject::Ech => &rp.spec.ech.auto_rollback,
        Subject::DirectPaths => &rp.spec.direct_paths.auto_rollback,
    };
    Criteria { min_success_rate: rb.min_success_rate, min_streams: u64::from(rb.min_streams), subject }
}

/// The outcome of one evaluation, as status, `local status` and logs show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Evaluation {
    /// Where the rollout stands.
    pub phase: Phase,
    /// The configured percentage (`spec.ech.percentage` or `spec.directPaths.percentage`).
    pub configured: u8,
    /// The percentage of the current step (before per-relay rollbacks).
    pub step_percentage: u8,
    /// The percentage in force per destination main relay.
    pub effective_by_main: BTreeMap<String, u8>,
    /// Setup success rate of the treated cohort (ECH, or direct) over the window, every relay
    /// together.
    pub success_rate: Option<f64>,
    /// The verdict per destination main relay that had setups in the window.
    pub analyses: Vec<MainAnalysis>,
    /// Unix seconds of the last automatic rollback since the last edit.
    pub last_rollback_unix: Option<u64>,
}

impl Evaluation {
    /// The relays whose percentage is below the step's.
    pub fn rolled_back(&self) -> BTreeMap<String, u8> {
        self.effective_by_main
            .iter()
            .filter(|(_, p)| **p < self.step_percentage)
            .map(|(m, p)| (m.clone(), *p))
            .collect()
    }

    /// What snapshots carry of it: the step's percentage and the relays below it.
    pub fn applied(&self) -> (u8, BTreeMap<String, u8>) {
        (self.step_percentage, self.rolled_back())
    }
}

/// One evaluation's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The evaluation.
    pub evaluation: Evaluation,
    /// What changed (for Events and logs).
    pub transitions: Vec<Transition>,
    /// Whether the percentages snapshots carry changed (the first evaluation counts as a
    /// change): the caller publishes again.
    pub changed: bool,
    /// The rollout it is of.
    pub subject: Subject,
}

/// A rollout's state between evaluations.
#[derive(Clone, Debug, Default)]
pub struct Rollout {
    subject: Subject,
    state: Option<State>,
    last: Option<Evaluation>,
    /// When the current generation was armed: streams before it are not judged (they ran
    /// under the policy the edit replaced).
    armed_at: Option<SystemTime>,
}

impl Rollout {
    /// A rollout of `subject`, not evaluated yet.
    pub fn new(subject: Subject) -> Self {
        Rollout { subject, ..Rollout::default() }
    }

    /// What it rolls out.
    pub fn subject(&self) -> Subject {
        self.subject
    }

    /// Evaluates at `now` for the main relays in `mains`. `increase(window, not_before)` gives
    /// the counter increases over the `window` ending at `now`, by destination main relay,
    /// from reports received after `not_before` (when the policy was last edited).
    pub fn evaluate(
        &mut self,
        rp: &RolloutPolicy,
        increase: impl Fn(Duration, SystemTime) -> BTreeMap<String, Cohorts>,
        mains: &[String],
        now: SystemTime,
    ) -> Outcome {
        let policy = progression(rp, self.subject);
        let armed_at = match (&self.state, self.armed_at) {
            (Some(s), Some(at)) if s.generation == policy.generation => at,
            _ => now,
        };
        self.armed_at = Some(armed_at);
        let increase = if now > armed_at { increase(policy.window, armed_at) } else { BTreeMap::new() };
        let analyses: Vec<Analysis> =
            analyse(&increase, criteria(rp, self.subject)).into_iter().filter(|a| mains.contains(&a.main)).collect();
        let (state, transitions) = progress::evaluate(self.state.as_ref(), &policy, &analyses, now);
        let ech =
            analyses.iter().fold((0u64, 0u64), |(a, s), x| (a + x.counts.ech.attempts, s + x.counts.ech.successes));
        let eval = Evaluation {
            phase: state.phase,
            configured: policy.configured,
            step_percentage: state.base(&policy),
            effective_by_main: mains.iter().map(|m| (m.clone(), state.effective(&policy, m))).collect(),
            success_rate: (ech.0 > 0).then(|| ech.1.min(ech.0) as f64 / ech.0 as f64),
            analyses: analyses.iter().map(view).collect(),
            last_rollback_unix: state
                .rolled_back
                .values()
                .filter_map(|(_, at)| at.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .max(),
        };
        let changed = self.last.as_ref().is_none_or(|l| l.applied() != eval.applied());
        self.state = Some(state);
        self.last = Some(eval.clone());
        Outcome { evaluation: eval, transitions, changed, subject: self.subject }
    }

    /// The last evaluation, if any.
    pub fn last(&self) -> Option<&Evaluation> {
        self.last.as_ref()
    }

    /// Puts the last evaluation's percentages into `snapshots`, if it was made for `rp` as it
    /// is now (after an edit, the plan's values hold until the next evaluation re-arms).
    pub fn apply(&self, rp: &RolloutPolicy, snapshots: &mut BTreeMap<String, Snapshot>) {
        if let (Some(state), Some(eval)) = (&self.state, &self.last)
            && state.generation == progression(rp, self.subject).generation
        {
            apply(eval, snapshots, self.subject);
        }
    }

    /// How long node reports must be kept for the rollouts of `rp`: its longest evaluation
    /// window.
    pub fn window(rp: &RolloutPolicy) -> Duration {
        let direct = rp.spec.direct_paths.auto_rollback.evaluation_window.get();
        rp.spec.ech.auto_rollback.evaluation_window.get().max(direct)
    }
}

/// The direct-path rollout's status (`status.directPaths`) from an evaluation of it.
pub fn direct_status(eval: &Evaluation) -> DirectPathsStatus {
    DirectPathsStatus {
        phase: format!("{:?}", eval.phase),
        effective_percentage: eval.step_percentage,
        effective_by_main: eval.effective_by_main.clone(),
        observed_success_rate: eval.success_rate.map(|r| (r * 1000.0).round() / 1000.0),
        last_rollback: eval
            .last_rollback_unix
            .map(|at| crate::k8s::status::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(at))),
        analysis: eval
            .analyses
            .iter()
            .map(|a| DirectAnalysis {
                main: a.main.clone(),
                verdict: a.verdict.clone(),
                reason: a.reason.clone(),
                direct_attempts: a.ech_attempts,
                direct_success_rate: a.ech_success_rate,
                relayed_attempts: a.plain_attempts,
                relayed_success_rate: a.plain_success_rate,
                direct_setup_millis: a.ech_setup_millis,
                relayed_setup_millis: a.plain_setup_millis,
            })
            .collect(),
    }
}

fn view(a: &Analysis) -> MainAnalysis {
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    MainAnalysis {
        main: a.main.clone(),
        verdict: match a.verdict {
            Verdict::Pass => "Pass",
            Verdict::Fail => "Fail",
            Verdict::Inconclusive => "Inconclusive",
        }
        .to_owned(),
        reason: a.reason.clone(),
        ech_attempts: a.counts.ech.attempts,
        ech_success_rate: a.counts.ech.success_rate(),
        plain_attempts: a.counts.plain.attempts,
        plain_success_rate: a.counts.plain.success_rate(),
        fallbacks: a.counts.ech.fallbacks,
        retries: a.counts.ech.retries,
        ech_setup_millis: ms(a.counts.ech.mean_setup()),
        plain_setup_millis: ms(a.counts.plain.mean_setup()),
    }
}

/// The main relays among `snapshots` (the destinations ECH is sealed to, and the unit the
/// direct-path rollout lowers).
pub fn mains_of(snapshots: &BTreeMap<String, Snapshot>) -> Vec<String> {
    snapshots.iter().filter(|(_, s)| s.node.role == Role::Main).map(|(n, _)| n.clone()).collect()
}

/// Puts an evaluation's percentages into every snapshot's ECH policy (or direct-path policy,
/// where direct paths are on): the step's percentage, and the relays below it in
/// `percentageByMain`.
pub fn apply(eval: &Evaluation, snapshots: &mut BTreeMap<String, Snapshot>, subject: Subject) {
    let below = eval.rolled_back();
    for s in snapshots.values_mut() {
        match subject {
            Subject::Ech => {
                s.ech_policy.percentage = eval.step_percentage;
                s.ech_policy.percentage_by_main = below.clone();
            }
            Subject::DirectPaths if s.direct_paths.enabled => {
                s.direct_paths.percentage = eval.step_percentage;
                s.direct_paths.percentage_by_main = below.clone();
            }
            Subject::DirectPaths => {}
        }
    }
}

/// A transition as logs, metrics, Events and `local status` name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Noted {
    /// Metric label (`rearmed`, `advanced`, `rolled_back`, `would_roll_back`).
    pub kind: &'static str,
    /// Event reason (`Rearmed`, `Advanced`, `RolledBack`, `WouldRollBack`).
    pub reason: &'static str,
    /// Whether it is a warning (a rollback, done or in a dry run).
    pub warning: bool,
    /// One line with the figures.
    pub message: String,
}

/// Names a transition of a rollout of `subject`.
pub fn describe(t: &Transition, subject: Subject) -> Noted {
    let n = describe_ech(t);
    match subject {
        Subject::Ech => n,
        Subject::DirectPaths => Noted {
            reason: match t {
                Transition::Rearmed { .. } => "DirectPathsRearmed",
                Transition::Advanced { .. } => "DirectPathsAdvanced",
                Transition::RolledBack { .. } => "DirectPathsRolledBack",
                Transition::WouldRollBack { .. } => "DirectPathsWouldRollBack",
            },
            message: match t {
                Transition::RolledBack { main, from, to, reason } => {
                    format!("direct paths to homes behind {main} rolled back from {from}% to {to}%: {reason}")
                }
                Transition::WouldRollBack { main, at, reason } => {
                    format!("dry run: direct paths to homes behind {main} would be rolled back from {at}%: {reason}")
                }
                _ => format!("direct paths: {}", n.message),
            },
            ..n
        },
    }
}

fn describe_ech(t: &Transition) -> Noted {
    let (kind, reason, warning, message) = match t {
        Transition::Rearmed { to } => {
            ("rearmed", "Rearmed", false, format!("policy edited: the rollout starts again at {to}%"))
        }
        Transition::Advanced { to } => ("advanced", "Advanced", false, format!("analysis passed: advanced to {to}%")),
        Transition::RolledBack { main, from, to, reason } => (
            "rolled_back",
            "RolledBack",
            true,
            format!("ECH for destinations behind {main} rolled back from {from}% to {to}%: {reason}"),
        ),
        Transition::WouldRollBack { main, at, reason } => (
            "would_roll_back",
            "WouldRollBack",
            true,
            format!("dry run: ECH for destinations behind {main} would be rolled back from {at}%: {reason}"),
        ),
    };
    Noted { kind, reason, warning, message }
}

impl Outcome {
    /// What both appliers do with an evaluation besides applying it: counts the verdicts, the
    /// effective percentages and the transitions in `metrics`, logs each transition, and
    /// returns them named (for Events in a cluster, `local status` in local mode).
    pub fn record(&self, metrics: &crate::metrics::OperatorMetrics) -> Vec<Noted> {
        let m = metrics.rollout(self.subject == Subject::DirectPaths);
        for a in &self.evaluation.analyses {
            let label = match a.verdict.as_str() {
                "Pass" => "pass",
                "Fail" => "fail",
                _ => "inconclusive",
            };
            m.analyses.get_or_create(&[("result", label)]).inc();
        }
        m.configured.set(i64::from(self.evaluation.configured));
        m.step.set(i64::from(self.evaluation.step_percentage));
        for (main, pct) in &self.evaluation.effective_by_main {
            m.effective.get_or_create(&[("main", main.clone())]).set(i64::from(*pct));
        }
        self.transitions
            .iter()
            .map(|t| {
                let n = describe(t, self.subject);
                m.transitions.get_or_create(&[("kind", n.kind)]).inc();
                if n.warning {
                    tracing::warn!(kind = n.kind, "{}", n.message);
                } else {
                    tracing::info!(kind = n.kind, "{}", n.message);
                }
                n
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::analysis::Counters;

    fn policy(yaml: &str) -> RolloutPolicy {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const BASE: &str = "apiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {name: default}\nspec:\n  ech:\n    enabled: true\n    percentage: 100\n    autoRollback: {minSuccessRate: 0.9, evaluationWindow: 10s, step: 50, minStreams: 5}\n";

    fn counts(ech: (u64, u64), plain: (u64, u64)) -> Cohorts {
        let c = |(a, s): (u64, u64)| Counters {
            attempts: a,
            successes: s,
            fallbacks: 0,
            retries: 0,
            setup_seconds: s as f64 * 0.002,
        };
        Cohorts { ech: c(ech), plain: c(plain), ..Cohorts::default() }
    }

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000 + s)
    }

    #[test]
    fn a_failing_relay_is_lowered_in_every_snapshot_and_only_it() {
        let rp = policy(BASE);
        let mains = vec!["m1".to_owned(), "m2".to_owned()];
        let mut r = Rollout::default();
        let inc = BTreeMap::from([
            ("m1".to_owned(), counts((20, 20), (10, 10))),
            ("m2".to_owned(), counts((20, 2), (10, 10))),
        ]);
        r.evaluate(&rp, |_, _| BTreeMap::new(), &mains, t(0));
        let Outcome { evaluation: eval, transitions: tr, .. } = r.evaluate(
            &rp,
            |w, since| {
                assert_eq!((w, since), (Duration::from_secs(10), t(0)), "setups before the edit are not judged");
                inc.clone()
            },
            &mains,
            t(5),
        );
        assert!(
            tr.iter().any(|x| matches!(x, Transition::RolledBack { main, from: 100, to: 50, .. } if main == "m2")),
            "{tr:?}"
        );
        assert_eq!(eval.effective_by_main, BTreeMap::from([("m1".into(), 100), ("m2".into(), 50)]));
        assert_eq!(eval.phase, Phase::RolledBack);
        assert_eq!(eval.success_rate, Some(22.0 / 40.0));
        assert_eq!(eval.analyses.iter().map(|a| a.verdict.as_str()).collect::<Vec<_>>(), ["Pass", "Fail"]);
        let mut snaps = BTreeMap::new();
        let snap = Snapshot::parse(include_str!("../../../sidecar/fuzz/seeds/snapshot/home.yaml")).unwrap();
        snaps.insert("h".to_owned(), snap);
        apply(&eval, &mut snaps, Subject::Ech);
        assert_eq!(snaps["h"].ech_policy.percentage, 100);
        assert_eq!(snaps["h"].ech_policy.percentage_by_main, BTreeMap::from([("m2".into(), 50)]));
        assert_eq!(snaps["h"].ech_policy.percentage_for("m1"), 100);
        let noted = describe(&tr[0], Subject::Ech);
        assert!(noted.message.contains("m2") && noted.warning && noted.reason == "RolledBack", "{noted:?}");
    }

    #[test]
    fn direct_paths_roll_back_per_relay_and_only_where_they_are_on() {
        let rp = policy(&format!(
            "{BASE}  directPaths:\n    enabled: true\n    autoRollback: {{minSuccessRate: 0.9, evaluationWindow: 10s, step: 100, minStreams: 3}}\n"
        ));
        let mains = vec!["m1".to_owned(), "m2".to_owned()];
        let mut r = Rollout::new(Subject::DirectPaths);
        r.evaluate(&rp, |_, _| BTreeMap::new(), &mains, t(0));
        let inc = BTreeMap::from([
            ("m1".to_owned(), counts((40, 40), (10, 10))),
            ("m2".to_owned(), counts((4, 0), (30, 30))),
        ]);
        let out = r.evaluate(&rp, |_, _| inc.clone(), &mains, t(5));
        assert_eq!(out.evaluation.effective_by_main, BTreeMap::from([("m1".into(), 100), ("m2".into(), 0)]));
        let noted = describe(&out.transitions[0], out.subject);
        assert_eq!(noted.reason, "DirectPathsRolledBack");
        assert!(noted.message.starts_with("direct paths to homes behind m2 rolled back from 100% to 0%"), "{noted:?}");
        assert!(noted.message.contains("direct setups 0.0% successful of 4"), "{}", noted.message);
        let status = direct_status(&out.evaluation);
        assert_eq!((status.phase.as_str(), status.effective_percentage), ("RolledBack", 100));
        let m2 = status.analysis.iter().find(|a| a.main == "m2").unwrap();
        assert_eq!((m2.direct_attempts, m2.relayed_attempts, m2.relayed_success_rate), (4, 30, Some(1.0)));

        let home = Snapshot::parse(include_str!("../../../sidecar/fuzz/seeds/snapshot/home.yaml")).unwrap();
        let mut off = home.clone();
        off.direct_paths = Default::default();
        let mut on = home;
        on.direct_paths.enabled = true;
        let mut snaps = BTreeMap::from([("off".to_owned(), off), ("on".to_owned(), on)]);
        r.apply(&rp, &mut snaps);
        assert!(snaps["off"].direct_paths.is_default(), "a snapshot without direct paths is left alone");
        assert_eq!(snaps["on"].direct_paths.percentage_for("m2"), 0);
        assert_eq!(snaps["on"].direct_paths.percentage_for("m1"), 100);
        assert_eq!(snaps["on"].ech_policy.percentage_by_main, BTreeMap::new(), "ECH is another rollout");

        // An edit of ECH alone neither re-arms nor undoes the direct-path rollback.
        let mut ech_edited = rp.clone();
        ech_edited.spec.ech.percentage = 40;
        assert_eq!(progression(&ech_edited, Subject::DirectPaths), progression(&rp, Subject::DirectPaths));
        assert_ne!(progression(&ech_edited, Subject::Ech), progression(&rp, Subject::Ech));
        let again = r.evaluate(&ech_edited, |_, _| BTreeMap::new(), &mains, t(6));
        assert!(again.transitions.is_empty(), "{:?}", again.transitions);
        assert_eq!(again.evaluation.effective_by_main["m2"], 0);
    }

    #[test]
    fn counters_of_relays_outside_the_plan_are_ignored_and_an_edit_rearms() {
        let rp = policy(BASE);
        let mut r = Rollout::default();
        let inc = BTreeMap::from([("gone".to_owned(), counts((20, 0), (10, 10)))]);
        let Outcome { transitions: tr, .. } =
            r.evaluate(&rp, |_, _| unreachable!("nothing to judge at the edit"), &["m1".to_owned()], t(0));
        assert!(matches!(tr[..], [Transition::Rearmed { to: 100 }]), "{tr:?}");
        let Outcome { evaluation: eval, .. } = r.evaluate(&rp, |_, _| inc.clone(), &["m1".to_owned()], t(1));
        assert!(eval.analyses.is_empty());
        assert_eq!(eval.rolled_back(), BTreeMap::new());
        let Outcome { transitions: again, changed, .. } = r.evaluate(
            &rp,
            |_, since| {
                assert_eq!(since, t(0));
                inc.clone()
            },
            &["m1".to_owned()],
            t(5),
        );
        assert!(again.is_empty(), "the same policy is not re-armed: {again:?}");
        assert!(!changed, "nothing new to publish");
        let edited = policy(&BASE.replace("percentage: 100", "percentage: 50"));
        let Outcome { evaluation: eval, transitions: tr, .. } = r.evaluate(
            &edited,
            |_, _| unreachable!("streams before the edit are not judged"),
            &["m1".to_owned()],
            t(60),
        );
        assert!(matches!(tr[..], [Transition::Rearmed { to: 50 }]), "{tr:?}");
        assert_eq!(eval.step_percentage, 50);
        assert_eq!(progression(&edited, Subject::Ech).window, Duration::from_secs(10));
    }
}
