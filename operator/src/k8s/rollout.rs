//! The rollouts in a cluster: every [`INTERVAL`] the leader evaluates each federation's
//! default `RolloutPolicy` over the cohort reports its config distribution received
//! (`crate::rollout::driver`, the same as local mode), publishes new percentages through the
//! plan, and reports on the policy: status (phase, effective percentages, success rate, the
//! analysis per main relay, a `RolledBack` condition), Events and metrics. The ECH rollout
//! always runs; the direct-path rollout while `spec.directPaths.enabled`, with its status
//! under `status.directPaths` and a `DirectPathsRolledBack` condition. The configured
//! percentages are never written: the next edit of the policy re-arms the rollout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use relayfed_crds::RolloutPolicy;
use relayfed_crds::common::Condition;
use serde_json::{Map, Value, json};
use tracing::{Instrument, info_span, warn};

use super::Context;
use super::status::{Cond, HasConditions, apply_status, event, rfc3339, set_condition};
use crate::rollout::driver::{self, Evaluation, Rollout, Subject};

/// How often rollouts are evaluated.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// A status whose percentages and phase did not change is written at most this often.
const STATUS_REFRESH: Duration = Duration::from_secs(30);

/// One federation's rollouts and what was last written to its policy's status.
pub struct FederationRollout {
    ech: Rollout,
    direct: Rollout,
    written: Option<(Value, SystemTime)>,
}

impl Default for FederationRollout {
    fn default() -> Self {
        Self { ech: Rollout::new(Subject::Ech), direct: Rollout::new(Subject::DirectPaths), written: None }
    }
}

/// Condition type of the direct-path rollout's rollbacks.
pub const DIRECT_ROLLED_BACK: &str = "DirectPathsRolledBack";

/// The status fields the evaluations set on their `RolloutPolicy` (the ECH rollout's, and the
/// direct-path rollout's while it runs), with their `RolledBack` and `DirectPathsRolledBack`
/// conditions set in `conds` (the latter removed while direct paths are off). Pure.
pub fn status_fields(
    eval: &Evaluation,
    direct: Option<&Evaluation>,
    conds: &mut Vec<Condition>,
    generation: Option<i64>,
    now: SystemTime,
) -> Map<String, Value> {
    let mut out = ech_fields(eval, conds, generation, now);
    match direct {
        Some(d) => {
            let c = rolled_back_condition(d, DIRECT_ROLLED_BACK);
            set_condition(conds, c, generation, now);
            out.insert("directPaths".into(), json!(driver::direct_status(d)));
        }
        None => {
            conds.retain(|c| c.type_ != DIRECT_ROLLED_BACK);
            out.insert("directPaths".into(), Value::Null);
        }
    }
    out
}

/// The condition `type_` says of an evaluation: true, with each relay held down and why,
/// while a rollback holds.
fn rolled_back_condition<'a>(eval: &Evaluation, type_: &'a str) -> Cond<'a> {
    let rolled_back = eval.rolled_back();
    let message = if rolled_back.is_empty() {
        format!("no relay rolled back; phase {:?} at {}%", eval.phase, eval.step_percentage)
    } else {
        rolled_back
            .iter()
            .map(|(main, pct)| {
                let why = eval.analyses.iter().find(|a| &a.main == main).map(|a| a.reason.as_str()).unwrap_or("");
                format!("{main} at {pct}% (step {}%): {why}", eval.step_percentage)
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let reason = if rolled_back.is_empty() { "NotRolledBack" } else { "AnalysisFailed" };
    Cond { type_, ok: !rolled_back.is_empty(), reason, message }
}

fn ech_fields(
    eval: &Evaluation,
    conds: &mut Vec<Condition>,
    generation: Option<i64>,
    now: SystemTime,
) -> Map<String, Value> {
    set_condition(conds, rolled_back_condition(eval, "RolledBack"), generation, now);
    let mut out = Map::new();
    out.insert("effectivePercentage".into(), eval.step_percentage.into());
    out.insert("phase".into(), json!(eval.phase));
    out.insert("effectiveByMain".into(), json!(eval.effective_by_main));
    if let Some(rate) = eval.success_rate {
        out.insert("observedSuccessRate".into(), json!((rate * 1000.0).round() / 1000.0));
    }
    out.insert("analysis".into(), json!(eval.analyses));
    if let Some(at) = eval.last_rollback_unix {
        out.insert("lastRollback".into(), rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(at)).into());
    }
    out
}

/// The rollout status fields for `policy` from the last evaluation of a federation that uses
/// it (the policy reconciler writes them with its own, so neither write drops the other's).
pub fn last_fields(ctx: &Context, policy: &RolloutPolicy, conds: &mut Vec<Condition>) -> Option<Map<String, Value>> {
    let ns = policy.namespace()?;
    let name = policy.name_any();
    let mut feds: Vec<String> = ctx
        .stores
        .federations
        .state()
        .iter()
        .filter(|f| f.metadata.namespace.as_deref() == Some(ns.as_str()) && f.spec.default_rollout_policy == name)
        .map(|f| format!("{ns}/{}", f.name_any()))
        .collect();
    feds.sort();
    let rollouts = ctx.rollouts.lock().ok()?;
    let f = feds.iter().find_map(|k| rollouts.get(k).filter(|f| f.ech.last().is_some()))?;
    let eval = f.ech.last()?;
    let direct = f.direct.last().filter(|_| policy.spec.direct_paths.enabled);
    Some(status_fields(eval, direct, conds, policy.metadata.generation, ctx.now()))
}

/// Puts federation `key`'s rollout percentages into its snapshots (the plan's values until the
/// first evaluation, and after an edit until it is evaluated again).
pub fn apply(
    ctx: &Context,
    key: &str,
    policy: &RolloutPolicy,
    snapshots: &mut BTreeMap<String, relayfed_proto::config::Snapshot>,
) {
    if let Ok(r) = ctx.rollouts.lock()
        && let Some(f) = r.get(key)
    {
        f.ech.apply(policy, snapshots);
        f.direct.apply(policy, snapshots);
    }
}

/// Evaluates every federation's rollout every [`INTERVAL`], until the process stops.
pub async fn run(ctx: Arc<Context>) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        // Reports are kept for the longest window any federation's policy asks for.
        let longest = ctx
            .stores
            .federations
            .state()
            .iter()
            .filter_map(|f| {
                let ns = f.namespace()?;
                let p = ctx.stores.policies.get(&ObjectRef::new(&f.spec.default_rollout_policy).within(&ns))?;
                Some(Rollout::window(&p))
            })
            .max();
        if let Some(w) = longest {
            ctx.distributor.set_report_window(w);
        }
        for fed in ctx.stores.federations.state() {
            let (Some(ns), name) = (fed.namespace(), fed.name_any()) else { continue };
            let Some(policy) = ctx.stores.policies.get(&ObjectRef::new(&fed.spec.default_rollout_policy).within(&ns))
            else {
                continue;
            };
            let span = info_span!("rollout", federation = %format!("{ns}/{name}"), policy = %policy.name_any());
            evaluate(&ctx, &ns, &name, &policy).instrument(span).await;
        }
    }
}

async fn evaluate(ctx: &Context, ns: &str, name: &str, policy: &RolloutPolicy) {
    let key = format!("{ns}/{name}");
    let mains = match ctx.plans.lock() {
        Ok(p) => p.get(&key).map(driver::mains_of).unwrap_or_default(),
        Err(_) => return,
    };
    if mains.is_empty() {
        return; // no plan in force yet
    }
    let now = ctx.now();
    let direct_on = policy.spec.direct_paths.enabled;
    let (ech, direct) = {
        let Ok(mut r) = ctx.rollouts.lock() else { return };
        let f = r.entry(key.clone()).or_default();
        let increase = |subject| move |w, since| ctx.distributor.cohort_increase(subject, w, now, since);
        let ech = f.ech.evaluate(policy, increase(Subject::Ech), &mains, now);
        if !direct_on {
            // Off: forgotten, so turning it on again starts over; no percentage is in force.
            f.direct = Rollout::new(Subject::DirectPaths);
            ctx.metrics.direct_effective_percent.clear();
        }
        let direct = direct_on.then(|| f.direct.evaluate(policy, increase(Subject::DirectPaths), &mains, now));
        (ech, direct)
    };
    let outs: Vec<&driver::Outcome> = std::iter::once(&ech).chain(direct.as_ref()).collect();
    for out in &outs {
        for n in out.record(&ctx.metrics) {
            event(ctx, policy, n.warning, n.reason, "Rollout", n.message).await;
        }
    }
    if outs.iter().any(|o| o.changed)
        && let Err(errors) = super::replan::replan(ctx, ns, name)
    {
        warn!(errors = errors.len(), "the new rollout percentages wait for a valid plan");
    }
    let transitioned = outs.iter().any(|o| !o.transitions.is_empty());
    let direct_eval = direct.as_ref().map(|o| &o.evaluation);
    write_status(ctx, &key, policy, &ech.evaluation, direct_eval, transitioned).await;
}

/// Writes the evaluation to the policy's status when it changed, or every
/// [`STATUS_REFRESH`] (the success rate moves with every evaluation).
async fn write_status(
    ctx: &Context,
    key: &str,
    policy: &RolloutPolicy,
    eval: &Evaluation,
    direct: Option<&Evaluation>,
    transitioned: bool,
) {
    let mut conds = policy.conditions();
    let now = ctx.now();
    let fields = status_fields(eval, direct, &mut conds, policy.metadata.generation, now);
    let cond = |t: &str| conds.iter().find(|c| c.type_ == t).map(|c| c.status.clone());
    let shape = json!([
        fields["phase"],
        fields["effectiveByMain"],
        fields["effectivePercentage"],
        cond("RolledBack"),
        direct.map(|d| (&d.phase, &d.effective_by_main, d.step_percentage)),
        cond(DIRECT_ROLLED_BACK),
    ]);
    let due = match ctx.rollouts.lock().ok().and_then(|r| r.get(key).and_then(|f| f.written.clone())) {
        Some((last, at)) => {
            transitioned || last != shape || now.duration_since(at).unwrap_or_default() >= STATUS_REFRESH
        }
        None => true,
    };
    if !due {
        return;
    }
    // The whole current status with the rollout's fields: a server-side apply by the same
    // field manager that left fields out would remove them (the Applied condition).
    let mut status = serde_json::to_value(policy).ok().and_then(|v| v.get("status").cloned()).unwrap_or_default();
    if !status.is_object() {
        status = json!({});
    }
    for (k, v) in fields {
        match (v, status.as_object_mut()) {
            (Value::Null, Some(o)) => {
                o.remove(&k);
            }
            (v, _) => status[k] = v,
        }
    }
    status["conditions"] = serde_json::to_value(&conds).unwrap_or_default();
    let Some(ns) = policy.namespace() else { return };
    let api: Api<RolloutPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    match apply_status(&api, policy, status).await {
        Ok(()) => {
            if let Ok(mut r) = ctx.rollouts.lock()
                && let Some(f) = r.get_mut(key)
            {
                f.written = Some((shape, now));
            }
        }
        Err(e) => warn!(error = %e, "cannot write the rollout status"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::progress::Phase;

    fn eval(m2: u8) -> Evaluation {
        Evaluation {
            phase: if m2 < 100 { Phase::RolledBack } else { Phase::Succeeded },
            configured: 100,
            step_percentage: 100,
            effective_by_main: BTreeMap::from([("m1".into(), 100), ("m2".into(), m2)]),
            success_rate: Some(0.81234),
            analyses: vec![relayfed_crds::MainAnalysis {
                main: "m2".into(),
                verdict: "Fail".into(),
                reason: "ECH setups 50.0% successful of 40".into(),
                ..Default::default()
            }],
            last_rollback_unix: (m2 < 100).then_some(1_800_000_000),
        }
    }

    #[test]
    fn a_rollback_sets_the_condition_with_the_relay_and_its_figures() {
        let mut conds = vec![];
        let f = status_fields(&eval(50), None, &mut conds, Some(3), SystemTime::UNIX_EPOCH);
        assert_eq!(f["effectivePercentage"], 100);
        assert_eq!(f["phase"], "RolledBack");
        assert_eq!(f["effectiveByMain"]["m2"], 50);
        assert_eq!(f["observedSuccessRate"], 0.812);
        assert_eq!(f["lastRollback"], "2027-01-15T08:00:00Z");
        let c = conds.iter().find(|c| c.type_ == "RolledBack").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "AnalysisFailed"));
        assert!(c.message.contains("m2 at 50% (step 100%): ECH setups 50.0%"), "{}", c.message);
        assert_eq!(c.observed_generation, Some(3));
        status_fields(&eval(100), None, &mut conds, Some(4), SystemTime::UNIX_EPOCH);
        let c = conds.iter().find(|c| c.type_ == "RolledBack").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "NotRolledBack"));
    }

    #[test]
    fn the_direct_path_rollout_has_its_own_status_and_condition_while_it_runs() {
        let mut conds = vec![];
        let f = status_fields(&eval(100), Some(&eval(50)), &mut conds, Some(5), SystemTime::UNIX_EPOCH);
        assert_eq!(f["phase"], "Succeeded", "ECH is not rolled back");
        assert_eq!(f["directPaths"]["phase"], "RolledBack");
        assert_eq!(f["directPaths"]["effectiveByMain"]["m2"], 50);
        assert_eq!(f["directPaths"]["analysis"][0]["main"], "m2");
        let c = conds.iter().find(|c| c.type_ == DIRECT_ROLLED_BACK).unwrap();
        assert_eq!(c.status, "True");
        assert!(c.message.contains("m2 at 50%"), "{}", c.message);
        assert_eq!(conds.iter().find(|c| c.type_ == "RolledBack").unwrap().status, "False");
        // Turned off: the fields and the condition go.
        let f = status_fields(&eval(100), None, &mut conds, Some(6), SystemTime::UNIX_EPOCH);
        assert_eq!(f["directPaths"], Value::Null, "removed from the written status");
        assert!(conds.iter().all(|c| c.type_ != DIRECT_ROLLED_BACK));
    }
}
