//! Compile a federation's plan from the informer stores and publish it: the one path from
//! CRs to the snapshots nodes receive.

use std::collections::BTreeMap;

use kube::ResourceExt;
use relayfed_crds::AnyResource;
use relayfed_proto::config::Snapshot;

use super::Context;
use crate::plan::{self, KeyLayout, Placement, Plan, PlanError};

/// The CRs of federation `name` in `namespace`, as the plan takes them. Objects being deleted
/// are left out: a relay with a deletion timestamp is already withdrawn.
pub fn resources(ctx: &Context, namespace: &str, name: &str) -> Vec<AnyResource> {
    let live = |meta: &kube::api::ObjectMeta| {
        meta.namespace.as_deref() == Some(namespace) && meta.deletion_timestamp.is_none()
    };
    let mut out = Vec::new();
    for f in ctx.stores.federations.state() {
        if live(&f.metadata) && f.name_any() == name {
            out.push(AnyResource::Federation(Box::new((*f).clone())));
        }
    }
    for r in ctx.stores.relays.state() {
        if live(&r.metadata) && r.spec.federation == name {
            out.push(AnyResource::Relay(Box::new((*r).clone())));
        }
    }
    for p in ctx.stores.peers.state() {
        if live(&p.metadata) {
            out.push(AnyResource::Peer(Box::new((*p).clone())));
        }
    }
    for p in ctx.stores.policies.state() {
        if live(&p.metadata) {
            out.push(AnyResource::RolloutPolicy(Box::new((*p).clone())));
        }
    }
    // Stores are unordered; the plan must not depend on arrival order.
    out.sort_by_key(|r| (r.kind(), r.name()));
    out
}

/// Compiles federation `namespace/name` and publishes the snapshots of the federation this
/// operator serves. On errors nothing is published for this federation (the previous snapshots
/// stay in force) and the errors are returned for the status of the objects they name.
pub fn replan(ctx: &Context, namespace: &str, name: &str) -> Result<Plan, Vec<PlanError>> {
    let key = format!("{namespace}/{name}");
    let workloads = super::workloads::facts_for(ctx, namespace, name);
    let placement = Placement::cluster(KeyLayout { dir: ctx.settings.key_dir.clone() }, workloads.as_ref());
    let members = resources(ctx, namespace, name);
    let refused = plan::replicas::cluster_refusals(&members);
    let compiled = if refused.is_empty() { plan::compile(&members, &placement) } else { Err(refused) };
    let snapshots = compiled.as_ref().ok().map(|p| {
        let mut snaps = p.snapshots.clone();
        if let Some(policy) = plan::rollout_policy(&members) {
            super::rollout::apply(ctx, &key, policy, &mut snaps);
        }
        snaps
    });
    let mut plans = match ctx.plans.lock() {
        Ok(p) => p,
        Err(p) => p.into_inner(),
    };
    match (&compiled, snapshots) {
        (Ok(_), Some(snaps)) => {
            plans.insert(key, snaps);
        }
        _ if ctx.stores.federations.state().iter().all(|f| crate::k8s::context::object_key(&f.metadata) != key) => {
            // The federation itself is gone: withdraw its nodes.
            plans.remove(&key);
        }
        _ => return compiled,
    }
    // The distribution server serves one federation (`--federation`): other federations'
    // plans (another team's, or one whose namespace is being deleted) never reach its nodes,
    // even when they reuse a node id. Without a served federation (tests of the reconcilers
    // alone), every plan is published, the first federation winning a shared node id.
    let served = &ctx.settings.workloads.federation;
    let mut union: BTreeMap<String, Snapshot> = BTreeMap::new();
    for (fed, snaps) in plans.iter().filter(|(fed, _)| served.is_empty() || *fed == served) {
        for (node, snap) in snaps {
            if union.contains_key(node) {
                tracing::warn!(federation = %fed, %node, "node id used by two federations; the first one wins");
                continue;
            }
            union.insert(node.clone(), snap.clone());
        }
    }
    let changed = ctx.distributor.publish(&union);
    if !changed.is_empty() {
        ctx.metrics.config_changes.get_or_create(&[("result", "accepted")]).inc();
    }
    compiled
}

/// The plan errors that name `object` (`Kind/name`), joined for a condition message.
pub fn errors_for(errors: &[PlanError], object: &str) -> Option<String> {
    let mine: Vec<String> =
        errors.iter().filter(|e| e.object == object).map(|e| format!("{}: {}", e.field, e.reason)).collect();
    (!mine.is_empty()).then(|| mine.join("; "))
}
