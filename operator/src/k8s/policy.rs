//! `Peer` and `RolloutPolicy` -> validated, folded into the plan of every federation in their
//! namespace, and a status condition `Applied` saying what was applied or why it was rejected.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use relayfed_crds::{Peer, RolloutPolicy};
use tracing::{Instrument, info_span};

use super::context::name_ns;
use super::status::{Cond, StatusObject, apply_status, event, set_condition};
use super::{Context, ReconcileError, replan};

/// The federations in `namespace` (their names).
fn federations(ctx: &Context, namespace: &str) -> Vec<String> {
    let mut names: Vec<String> = ctx
        .stores
        .federations
        .state()
        .iter()
        .filter(|f| f.metadata.namespace.as_deref() == Some(namespace))
        .map(|f| f.name_any())
        .collect();
    names.sort();
    names
}

/// What to report about one object after validating and re-planning.
struct Verdict {
    ok: bool,
    reason: &'static str,
    message: String,
}

/// Validates `obj` (`validate` is the kind's semantic check), re-plans every federation of
/// its namespace, and reports the outcome naming this object.
fn judge(
    ctx: &Context,
    namespace: &str,
    object: &str,
    validate: Result<(), relayfed_crds::CrdError>,
    in_use: bool,
) -> Verdict {
    if let Err(e) = validate {
        return Verdict { ok: false, reason: "Invalid", message: e.to_string() };
    }
    let feds = federations(ctx, namespace);
    if feds.is_empty() {
        return Verdict {
            ok: false,
            reason: "NoFederation",
            message: format!("no RelayFederation in namespace {namespace}"),
        };
    }
    let mut applied = Vec::new();
    for fed in &feds {
        match replan::replan(ctx, namespace, fed) {
            Ok(_) => applied.push(fed.clone()),
            Err(errors) => {
                if let Some(msg) = replan::errors_for(&errors, object) {
                    return Verdict { ok: false, reason: "Rejected", message: msg };
                }
            }
        }
    }
    if !in_use {
        return Verdict { ok: true, reason: "NotReferenced", message: "valid; no federation uses it".into() };
    }
    if applied.is_empty() {
        return Verdict {
            ok: false,
            reason: "FederationInvalid",
            message: "valid, but the federation's plan has errors (see its Ready condition)".into(),
        };
    }
    Verdict { ok: true, reason: "Applied", message: format!("in force in federation {}", applied.join(", ")) }
}

async fn report<K>(
    ctx: &Context,
    obj: &K,
    v: Verdict,
    extra: serde_json::Map<String, serde_json::Value>,
    extra_conds: Vec<relayfed_crds::Condition>,
    stale: &[&str],
) -> Result<(), ReconcileError>
where
    K: StatusObject,
{
    let (_, namespace) = name_ns(obj.meta())?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let generation = obj.meta().generation;
    let mut conds = obj.conditions();
    conds.retain(|c| !stale.contains(&c.type_.as_str()));
    let was_ok = conds.iter().find(|c| c.type_ == "Applied").map(|c| c.status == "True");
    if !v.ok && was_ok != Some(false) {
        event(ctx, obj, true, v.reason, "Apply", v.message.clone()).await;
    } else if v.ok && v.reason == "Applied" && was_ok != Some(true) {
        event(ctx, obj, false, "Applied", "Apply", v.message.clone()).await;
    }
    set_condition(
        &mut conds,
        Cond { type_: "Applied", ok: v.ok, reason: v.reason, message: v.message },
        generation,
        ctx.now(),
    );
    for c in extra_conds {
        match conds.iter_mut().find(|x| x.type_ == c.type_) {
            Some(slot) => *slot = c,
            None => conds.push(c),
        }
    }
    // A null field is one to remove: the apply leaves it out.
    let mut status: serde_json::Map<String, serde_json::Value> =
        extra.into_iter().filter(|(_, v)| !v.is_null()).collect();
    status.insert("observedGeneration".into(), generation.into());
    status.insert("conditions".into(), serde_json::to_value(&conds).unwrap_or_default());
    apply_status(&api, obj, serde_json::Value::Object(status)).await
}

/// Reconciles one `Peer`.
pub async fn reconcile_peer(peer: Arc<Peer>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let (name, namespace) = name_ns(&peer.metadata)?;
    let started = std::time::Instant::now();
    let result = async {
        let v = judge(&ctx, &namespace, &format!("Peer/{name}"), peer.validate(), true);
        report(&ctx, peer.as_ref(), v, serde_json::Map::new(), vec![], &[]).await?;
        Ok(Action::requeue(Duration::from_secs(300)))
    }
    .instrument(info_span!("reconcile", kind = "Peer", %namespace, %name))
    .await;
    ctx.finished("Peer", &format!("{namespace}/{name}"), started, result.is_ok());
    result
}

/// Reconciles one `RolloutPolicy`.
pub async fn reconcile_policy(policy: Arc<RolloutPolicy>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let (name, namespace) = name_ns(&policy.metadata)?;
    let started = std::time::Instant::now();
    let result = async {
        let in_use = ctx.stores.federations.state().iter().any(|f| {
            f.metadata.namespace.as_deref() == Some(namespace.as_str()) && f.spec.default_rollout_policy == name
        });
        let v = judge(&ctx, &namespace, &format!("RolloutPolicy/{name}"), policy.validate(), in_use);
        // The rollout's own fields (and its RolledBack condition), so this write keeps them.
        let mut rollout_conds = policy.status.as_ref().map(|s| s.common.conditions.clone()).unwrap_or_default();
        let extra = match super::rollout::last_fields(&ctx, &policy, &mut rollout_conds) {
            Some(fields) => fields,
            // Before the first evaluation: where the rollout starts (the plan's percentage).
            None if v.ok => serde_json::Map::from_iter([(
                "effectivePercentage".to_owned(),
                serde_json::Value::from(
                    crate::rollout::driver::progression(&policy, crate::rollout::driver::Subject::Ech).start(),
                ),
            )]),
            None => serde_json::Map::new(),
        };
        rollout_conds.retain(|c| c.type_ == "RolledBack" || c.type_ == super::rollout::DIRECT_ROLLED_BACK);
        // Direct paths off: their rollout's condition goes with them.
        let stale: &[&str] = if policy.spec.direct_paths.enabled { &[] } else { &[super::rollout::DIRECT_ROLLED_BACK] };
        report(&ctx, policy.as_ref(), v, extra, rollout_conds, stale).await?;
        Ok(Action::requeue(Duration::from_secs(300)))
    }
    .instrument(info_span!("reconcile", kind = "RolloutPolicy", %namespace, %name))
    .await;
    ctx.finished("RolloutPolicy", &format!("{namespace}/{name}"), started, result.is_ok());
    result
}
