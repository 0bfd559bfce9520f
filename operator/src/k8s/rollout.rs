//! The ECH rollout in a cluster: every [`INTERVAL`] the leader evaluates each federation's
//! default `RolloutPolicy` over the cohort reports its config distribution received
//! (`crate::rollout::driver`, the same as local mode), publishes new percentages through the
//! plan, and reports on the policy: status (phase, effective percentages, success rate, the
//! analysis per main relay, a `RolledBack` condition), Events and metrics. The configured
//! `spec.ech.percentage` is never written: the next edit of the policy re-arms the rollout.

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
use crate::rollout::driver::{self, Evaluation, Rollout};

/// How often rollouts are evaluated.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// A status whose percentages and phase did not change is written at most this often.
const STATUS_REFRESH: Duration = Duration::from_secs(30);

/// One federation's rollout and what was last written to its policy's status.
#[derive(Default)]
pub struct FederationRollout {
    driver: Rollout,
    written: Option<(Value, SystemTime)>,
}

/// The status fields an evaluation sets on its `RolloutPolicy`, with its `RolledBack`
/// condition set in `conds`. Pure.
pub fn status_fields(
    eval: &Evaluation,
    conds: &mut Vec<Condition>,
    generation: Option<i64>,
    now: SystemTime,
) -> Map<String, Value> {
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
    set_condition(conds, Cond { type_: "RolledBack", ok: !rolled_back.is_empty(), reason, message }, generation, now);
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
    let eval = feds.iter().find_map(|k| rollouts.get(k)?.driver.last().cloned())?;
    Some(status_fields(&eval, conds, policy.metadata.generation, ctx.now()))
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
        f.driver.apply(policy, snapshots);
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
    let out = {
        let Ok(mut r) = ctx.rollouts.lock() else { return };
        let f = r.entry(key.clone()).or_default();
        f.driver.evaluate(policy, |w, since| ctx.distributor.cohort_increase(w, now, since), &mains, now)
    };
    let eval = &out.evaluation;
    for n in out.record(&ctx.metrics) {
        event(ctx, policy, n.warning, n.reason, "Rollout", n.message).await;
    }
    if out.changed
        && let Err(errors) = super::replan::replan(ctx, ns, name)
    {
        warn!(errors = errors.len(), "the new rollout percentages wait for a valid plan");
    }
    write_status(ctx, &key, policy, eval, !out.transitions.is_empty()).await;
}

/// Writes the evaluation to the policy's status when it changed, or every
/// [`STATUS_REFRESH`] (the success rate moves with every evaluation).
async fn write_status(ctx: &Context, key: &str, policy: &RolloutPolicy, eval: &Evaluation, transitioned: bool) {
    let mut conds = policy.conditions();
    let now = ctx.now();
    let fields = status_fields(eval, &mut conds, policy.metadata.generation, now);
    let shape = json!([
        fields["phase"],
        fields["effectiveByMain"],
        fields["effectivePercentage"],
        conds.iter().find(|c| c.type_ == "RolledBack").map(|c| &c.status)
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
        status[k] = v;
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
        let f = status_fields(&eval(50), &mut conds, Some(3), SystemTime::UNIX_EPOCH);
        assert_eq!(f["effectivePercentage"], 100);
        assert_eq!(f["phase"], "RolledBack");
        assert_eq!(f["effectiveByMain"]["m2"], 50);
        assert_eq!(f["observedSuccessRate"], 0.812);
        assert_eq!(f["lastRollback"], "2027-01-15T08:00:00Z");
        let c = conds.iter().find(|c| c.type_ == "RolledBack").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "AnalysisFailed"));
        assert!(c.message.contains("m2 at 50% (step 100%): ECH setups 50.0%"), "{}", c.message);
        assert_eq!(c.observed_generation, Some(3));
        status_fields(&eval(100), &mut conds, Some(4), SystemTime::UNIX_EPOCH);
        let c = conds.iter().find(|c| c.type_ == "RolledBack").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "NotRolledBack"));
    }
}
