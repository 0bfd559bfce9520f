//! Status conditions and the server-side-applied status patch every reconciler ends with.

use std::time::SystemTime;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use relayfed_crds::common::Condition;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Context, FIELD_MANAGER, ReconcileError};

/// RFC 3339 text of `t` (seconds precision, UTC), as Kubernetes writes times.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Timestamp::from_second(secs).map(|ts| ts.to_string()).unwrap_or_default()
}

/// Parses an RFC 3339 time written by [`rfc3339`] (or by Kubernetes).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let ts: Timestamp = text.parse().ok()?;
    let secs = u64::try_from(ts.as_second()).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// One condition to set.
#[derive(Clone, Debug)]
pub struct Cond<'a> {
    /// Type (`Ready`, `Applied`, `CertificateReady`, ...).
    pub type_: &'a str,
    /// True or false.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: &'a str,
    /// Human-readable message.
    pub message: String,
}

/// Sets `c` in `conds`, keeping `lastTransitionTime` when the status did not change.
pub fn set_condition(conds: &mut Vec<Condition>, c: Cond<'_>, generation: Option<i64>, now: SystemTime) {
    let status = if c.ok { "True" } else { "False" };
    let previous = conds.iter().find(|x| x.type_ == c.type_);
    let transition = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(rfc3339(now)),
    };
    let next = Condition {
        type_: c.type_.to_owned(),
        status: status.to_owned(),
        reason: c.reason.to_owned(),
        message: c.message,
        last_transition_time: transition,
        observed_generation: generation,
    };
    match conds.iter_mut().find(|x| x.type_ == c.type_) {
        Some(slot) => *slot = next,
        None => conds.push(next),
    }
}

/// Server-side applies `status` to the status subresource of `obj`.
pub async fn apply_status<K>(api: &Api<K>, obj: &K, status: serde_json::Value) -> Result<(), ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.name_any();
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name},
        "status": status,
    });
    api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(|e| ReconcileError::kube(format!("patch status of {}/{name}", K::kind(&())), e))?;
    Ok(())
}

/// Publishes a Kubernetes Event about `obj`; a failure is logged, never fatal.
pub async fn event<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning { EventType::Warning } else { EventType::Normal },
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(reason, error = %e, "cannot publish event");
    }
}

/// After a failed reconcile: when the operator was forbidden something, says so in the
/// object's `Ready` condition (reason `Forbidden`, naming the verb and resource), so that
/// `kubectl get`/`describe` shows what RBAC lacks instead of a stale state. Best effort: the
/// status write may itself be forbidden, and the error is logged and counted anyway.
pub async fn report_forbidden<K: StatusObject>(ctx: &Context, obj: &K, err: &ReconcileError) {
    let Some(message) = err.forbidden() else { return };
    let Some(ns) = obj.namespace() else { return };
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let mut conds = obj.conditions();
    let generation = obj.meta().generation;
    set_condition(&mut conds, Cond { type_: "Ready", ok: false, reason: "Forbidden", message }, generation, ctx.now());
    // The whole current status with the new condition: a server-side apply by the same field
    // manager that left fields out would remove them (echConfigList, endpoint, ...).
    let mut status = serde_json::to_value(obj).ok().and_then(|v| v.get("status").cloned()).unwrap_or_default();
    if !status.is_object() {
        status = serde_json::json!({});
    }
    status["conditions"] = serde_json::to_value(&conds).unwrap_or_default();
    let _ = apply_status(&api, obj, status).await;
}

/// Gives access to an object's current conditions.
pub trait HasConditions {
    /// The conditions in its status.
    fn conditions(&self) -> Vec<Condition>;
}

macro_rules! common_conditions {
    ($($kind:ty),*) => {$(
        impl HasConditions for $kind {
            fn conditions(&self) -> Vec<Condition> {
                self.status.as_ref().map(|s| s.common.conditions.clone()).unwrap_or_default()
            }
        }
    )*};
}
common_conditions!(
    relayfed_crds::RelayFederation,
    relayfed_crds::Relay,
    relayfed_crds::Peer,
    relayfed_crds::RolloutPolicy
);

/// A namespaced relayfed object whose status the reconcilers write.
pub trait StatusObject:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + std::fmt::Debug
    + HasConditions
{
}

impl<K> StatusObject for K where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug
        + HasConditions
{
}
