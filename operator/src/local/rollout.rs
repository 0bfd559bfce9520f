//! Local mode's ECH rollout: the same driver as the operator's (`crate::rollout::driver`),
//! evaluated every [`INTERVAL`] over the homes' cohort reports to the supervisor's config
//! distribution. Transitions are logged and counted; a change of effective percentages is
//! published as new snapshots; `relayfed local status` shows the evaluation. Nothing is
//! written back to the YAML files: the configured percentage stays what the user wrote.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use relayfed_crds::AnyResource;
use relayfed_sidecar::config::Snapshot;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::distribution::Distributor;
use crate::metrics::OperatorMetrics;
use crate::plan;
use crate::rollout::driver::{self, Evaluation, Rollout};

/// How often the rollout is evaluated.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Transitions kept for `local status`.
const EVENTS_KEPT: usize = 20;

/// The supervisor's rollout.
#[derive(Default)]
pub struct LocalRollout {
    driver: Rollout,
    due: Option<tokio::time::Instant>,
    events: VecDeque<Value>,
}

impl LocalRollout {
    /// Evaluates when due. Returns whether the effective percentages changed (the caller
    /// publishes again).
    pub fn tick(&mut self, resources: &[AnyResource], distributor: &Distributor, metrics: &OperatorMetrics) -> bool {
        let now = tokio::time::Instant::now();
        if self.due.is_some_and(|d| now < d) {
            return false;
        }
        self.due = Some(now + INTERVAL);
        let Some(rp) = plan::rollout_policy(resources) else { return false };
        let window = Rollout::window(rp);
        distributor.set_report_window(window);
        let mains: Vec<String> = distributor
            .versions()
            .keys()
            .filter(|n| distributor.snapshot(n).is_some_and(|s| s.node.role == relayfed_sidecar::config::Role::Main))
            .cloned()
            .collect();
        let at = SystemTime::now();
        let out = self.driver.evaluate(rp, |w, since| distributor.cohort_increase(w, at, since), &mains, at);
        let (eval, transitions) = (&out.evaluation, &out.transitions);
        for a in &eval.analyses {
            metrics.rollout_analyses.get_or_create(&[("result", verdict_label(&a.verdict))]).inc();
        }
        for (main, pct) in &eval.effective_by_main {
            metrics.rollout_effective_percent.get_or_create(&[("main", main.clone())]).set(i64::from(*pct));
        }
        let unix = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        for t in transitions {
            let (kind, message) = driver::describe(t);
            metrics.rollout_transitions.get_or_create(&[("kind", kind)]).inc();
            if matches!(kind, "rolled_back" | "would_roll_back") {
                warn!(kind, "{message}");
            } else {
                info!(kind, "{message}");
            }
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            self.events.push_back(json!({"atUnix": unix, "kind": kind, "message": message}));
        }
        out.changed
    }

    /// Puts the last evaluation's percentages into `snapshots` (none before the first, nor
    /// after an edit of the policy until it is evaluated again).
    pub fn apply(&self, resources: &[AnyResource], snapshots: &mut BTreeMap<String, Snapshot>) {
        if let Some(rp) = plan::rollout_policy(resources) {
            self.driver.apply(rp, snapshots);
        }
    }

    /// Evaluates at the next tick (after an edit).
    pub fn soon(&mut self) {
        self.due = None;
    }

    /// The last evaluation and the recent transitions, for `local status`.
    pub fn status(&self) -> Value {
        match self.driver.last() {
            Some(e) => json!({"evaluation": e, "events": self.events}),
            None => Value::Null,
        }
    }

    /// The last evaluation.
    pub fn last(&self) -> Option<&Evaluation> {
        self.driver.last()
    }
}

fn verdict_label(v: &str) -> &'static str {
    match v {
        "Pass" => "pass",
        "Fail" => "fail",
        _ => "inconclusive",
    }
}
