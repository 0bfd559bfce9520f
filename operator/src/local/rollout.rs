//! Local mode's rollouts (ECH, and direct paths while they are on): the same driver as the
//! operator's (`crate::rollout::driver`), evaluated every [`INTERVAL`] over the homes' cohort
//! reports to the supervisor's config distribution. Transitions are logged and counted; a
//! change of effective percentages is published as new snapshots; `relayfed local status`
//! shows the evaluations. Nothing is written back to the YAML files: the configured
//! percentages stay what the user wrote.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime};

use relayfed_crds::AnyResource;
use relayfed_proto::config::Snapshot;
use serde_json::{Value, json};

use crate::distribution::Distributor;
use crate::metrics::OperatorMetrics;
use crate::plan;
use crate::rollout::driver::{self, Rollout, Subject};

/// How often the rollout is evaluated.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Transitions kept for `local status`.
const EVENTS_KEPT: usize = 20;

/// The supervisor's rollouts.
pub struct LocalRollout {
    ech: Rollout,
    direct: Rollout,
    due: Option<tokio::time::Instant>,
    events: VecDeque<Value>,
    direct_events: VecDeque<Value>,
}

impl Default for LocalRollout {
    fn default() -> Self {
        Self {
            ech: Rollout::new(Subject::Ech),
            direct: Rollout::new(Subject::DirectPaths),
            due: None,
            events: VecDeque::new(),
            direct_events: VecDeque::new(),
        }
    }
}

impl LocalRollout {
    /// Evaluates when due: `None` when not, else whether the effective percentages changed
    /// (the caller publishes again).
    pub fn tick(
        &mut self,
        resources: &[AnyResource],
        distributor: &Distributor,
        metrics: &OperatorMetrics,
    ) -> Option<bool> {
        let now = tokio::time::Instant::now();
        if self.due.is_some_and(|d| now < d) {
            return None;
        }
        self.due = Some(now + INTERVAL);
        let rp = plan::rollout_policy(resources)?;
        let window = Rollout::window(rp);
        distributor.set_report_window(window);
        let mains = distributor.main_relays();
        let at = SystemTime::now();
        let unix = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut changed = false;
        if !rp.spec.direct_paths.enabled && self.direct.last().is_some() {
            // Off: forgotten, so turning it on again starts over; no percentage is in force.
            self.direct = Rollout::new(Subject::DirectPaths);
            self.direct_events.clear();
            metrics.direct_effective_percent.clear();
        }
        for (driver, events) in [(&mut self.ech, &mut self.events), (&mut self.direct, &mut self.direct_events)] {
            let subject = driver.subject();
            if subject == Subject::DirectPaths && !rp.spec.direct_paths.enabled {
                continue;
            }
            let out = driver.evaluate(rp, |w, since| distributor.cohort_increase(subject, w, at, since), &mains, at);
            for n in out.record(metrics) {
                if events.len() == EVENTS_KEPT {
                    events.pop_front();
                }
                events.push_back(json!({"atUnix": unix, "kind": n.kind, "message": n.message}));
            }
            changed |= out.changed;
        }
        Some(changed)
    }

    /// Puts the last evaluation's percentages into `snapshots` (none before the first, nor
    /// after an edit of the policy until it is evaluated again).
    pub fn apply(&self, resources: &[AnyResource], snapshots: &mut BTreeMap<String, Snapshot>) {
        if let Some(rp) = plan::rollout_policy(resources) {
            self.ech.apply(rp, snapshots);
            self.direct.apply(rp, snapshots);
        }
    }

    /// Evaluates at the next tick (after an edit).
    pub fn soon(&mut self) {
        self.due = None;
    }

    /// The last evaluation and the recent transitions, for `local status`; the direct-path
    /// rollout's (as `status.directPaths` in a cluster) under `directPaths`.
    pub fn status(&self) -> Value {
        let mut out = match self.ech.last() {
            Some(e) => json!({"evaluation": e, "events": self.events}),
            None => Value::Null,
        };
        if let Some(e) = self.direct.last() {
            out["directPaths"] = json!({"status": driver::direct_status(e), "events": self.direct_events});
        }
        out
    }
}
