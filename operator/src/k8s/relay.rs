//! `Relay` -> for a main relay: identity and ECH key Secrets (ECH keys rotated, the previous
//! key kept for the grace period), the config ConfigMap, Deployment, Service and
//! PodDisruptionBudget, and a status with ready replicas, endpoint and the current
//! ECHConfigList. A standalone home relay (outside Kubernetes) gets its identity Secret and
//! status only. A finalizer withdraws a deleted relay from the plan before it goes away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use relayfed_crds::{Relay, RelayFederation, RelayType};
use relayfed_proto::config::base64_encode;
use relayfed_proto::config::keys::EchKeyFile;
use relayfed_proto::crypto::ca::parse_cert_pem;
use tracing::{Instrument, info, info_span};

use super::context::{name_ns, object_key};
use super::federation::load_ca;
use super::relay_objects as objects;
use super::status::{Cond, apply_status, event, parse_rfc3339, rfc3339, set_condition};
use super::{Context, FIELD_MANAGER, FINALIZER, ReconcileError, replan};
use crate::ech_rotation::{self, Change, EchState};

/// Annotation on the ECH Secret: when its current key was created (RFC 3339).
pub const ECH_SINCE_ANNOTATION: &str = "relayfed.io/ech-current-since";
/// Relay annotation: a new value asks for an ECH key rotation now (staged, then promoted after
/// `echKeys.stagingPeriod`); the key Secret records the value it acted on.
pub const ECH_ROTATE_ANNOTATION: &str = "relayfed.io/rotate-ech-key";

/// Reconciles one `Relay` (through the finalizer).
pub async fn reconcile(relay: Arc<Relay>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let (name, namespace) = name_ns(&relay.metadata)?;
    let span = info_span!("reconcile", kind = "Relay", %namespace, %name);
    let started = std::time::Instant::now();
    let api: Api<Relay> = Api::namespaced(ctx.client.clone(), &namespace);
    let obj = relay.clone();
    let result = finalizer(&api, FINALIZER, relay, |ev| async {
        match ev {
            Finalizer::Apply(r) => apply(&r, &ctx, &name, &namespace).await,
            Finalizer::Cleanup(r) => cleanup(&r, &ctx, &namespace).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ReconcileError::Finalizer(other.to_string()),
    });
    if let Err(e) = &result {
        super::status::report_forbidden(&ctx, &*obj, e).await;
    }
    ctx.finished("Relay", &format!("{namespace}/{name}"), started, result.is_ok());
    result
}

async fn cleanup(relay: &Relay, ctx: &Context, namespace: &str) -> Result<Action, ReconcileError> {
    // The store already shows the deletion timestamp, so the plan leaves the relay out.
    let _ = replan::replan(ctx, namespace, &relay.spec.federation);
    info!(node = %relay.spec.node_id, "relay withdrawn from the federation plan");
    event(ctx, relay, false, "Withdrawn", "Delete", format!("node {} withdrawn from the plan", relay.spec.node_id))
        .await;
    Ok(Action::await_change())
}

fn ssa() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

async fn apply_obj<K>(ctx: &Context, namespace: &str, obj: &K) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &ssa(), &Patch::Apply(obj))
        .await
        .map_err(|e| ReconcileError::kube(format!("apply {} {name}", K::kind(&())), e))
}

/// Whether the identity Secret must be (re)issued: missing, unreadable, from another CA, or
/// within `renew_before` of expiry. Returns the time left otherwise.
fn cert_time_left(secret: Option<&Secret>, node: &str, ca_pem: &str, now: SystemTime) -> Option<Duration> {
    let data = secret?.data.as_ref()?;
    let cert = String::from_utf8_lossy(&data.get(&format!("{node}.pem"))?.0).into_owned();
    data.get(&format!("{node}.key"))?;
    if String::from_utf8_lossy(&data.get("ca.pem")?.0) != ca_pem {
        return None;
    }
    let der = parse_cert_pem(&cert).ok()?;
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let not_after = u64::try_from(x.validity().not_after.timestamp()).ok()?;
    (SystemTime::UNIX_EPOCH + Duration::from_secs(not_after)).duration_since(now).ok()
}

async fn apply(relay: &Relay, ctx: &Context, name: &str, namespace: &str) -> Result<Action, ReconcileError> {
    let api: Api<Relay> = Api::namespaced(ctx.client.clone(), namespace);
    let generation = relay.metadata.generation;
    let now = ctx.now();
    let mut conds = relay.status.as_ref().map(|s| s.common.conditions.clone()).unwrap_or_default();
    let mut status = serde_json::Map::new();
    let fed_key = format!("{namespace}/{}", relay.spec.federation);
    let fed: Option<Arc<RelayFederation>> =
        ctx.stores.federations.state().into_iter().find(|f| object_key(&f.metadata) == fed_key);
    let Some(fed) = fed else {
        let msg = format!("RelayFederation {fed_key} does not exist");
        set_condition(
            &mut conds,
            Cond { type_: "Ready", ok: false, reason: "FederationNotFound", message: msg },
            generation,
            now,
        );
        apply_status(&api, relay, serde_json::json!({"observedGeneration": generation, "conditions": conds})).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let Some(ca) = load_ca(ctx, namespace, &relay.spec.federation, &fed.spec.trust_domain, false).await? else {
        let msg = "waiting for the federation CA (the RelayFederation reconciler creates it)".to_owned();
        set_condition(
            &mut conds,
            Cond { type_: "Ready", ok: false, reason: "WaitingForCA", message: msg },
            generation,
            now,
        );
        apply_status(&api, relay, serde_json::json!({"observedGeneration": generation, "conditions": conds})).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    };
    let owner = relay
        .controller_owner_ref(&())
        .ok_or_else(|| ReconcileError::Object(format!("Relay {namespace}/{name} has no uid")))?;
    let node = relay.spec.node_id.clone();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut requeue = Duration::from_secs(600);

    // Identity: certificate + key + CA, re-issued before expiry or when the CA changed.
    let id_name = objects::identity_secret_name(name);
    let current =
        secrets.get_opt(&id_name).await.map_err(|e| ReconcileError::kube(format!("get Secret {id_name}"), e))?;
    let ca_pem = ca.ca.certified_key().cert_pem.clone();
    let renew_before = ctx.settings.relay_cert_renew_before;
    match cert_time_left(current.as_ref(), &node, &ca_pem, now) {
        Some(left) if left > renew_before => requeue = requeue.min(left - renew_before),
        _ => {
            let validity = ctx.settings.relay_cert_validity;
            let issued = ca
                .ca
                .issue_between(&node, now - Duration::from_secs(60), now + validity)
                .map_err(|e| ReconcileError::Keys(e.to_string()))?;
            let data = BTreeMap::from([
                ("ca.pem".to_owned(), ca_pem.clone().into_bytes()),
                (format!("{node}.pem"), issued.cert_pem.into_bytes()),
                (format!("{node}.key"), issued.key_pem.into_bytes()),
            ]);
            apply_obj(ctx, namespace, &objects::secret(relay, id_name.clone(), &owner, data)).await?;
            ctx.metrics.certificates_issued.get_or_create(&[("kind", "relay")]).inc();
            let verb = if current.is_some() { "renewed" } else { "issued" };
            event(
                ctx,
                relay,
                false,
                "CertificateIssued",
                "IssueCertificate",
                format!("certificate for node {node} {verb}"),
            )
            .await;
            requeue = requeue.min(validity.saturating_sub(renew_before));
        }
    }
    set_condition(
        &mut conds,
        Cond {
            type_: "CertificateReady",
            ok: true,
            reason: "Issued",
            message: format!("signed by {}", ca.fingerprint),
        },
        generation,
        now,
    );

    // Publish the plan with this relay in it; errors naming the relay go to its status.
    let invalid = replan::replan(ctx, namespace, &relay.spec.federation)
        .err()
        .and_then(|errors| replan::errors_for(&errors, &format!("Relay/{name}")));
    if relay.spec.relay_type == RelayType::Main {
        // ECH keys.
        let ech_name = objects::ech_secret_name(name);
        let key_name = format!("{node}-ech.json");
        let stored =
            secrets.get_opt(&ech_name).await.map_err(|e| ReconcileError::kube(format!("get Secret {ech_name}"), e))?;
        let existing = stored.as_ref().and_then(|s| {
            let file: EchKeyFile = serde_json::from_slice(&s.data.as_ref()?.get(&key_name)?.0).ok()?;
            let since = file
                .current
                .since
                .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t))
                .or_else(|| parse_rfc3339(s.metadata.annotations.as_ref()?.get(ECH_SINCE_ANNOTATION)?))?;
            Some(EchState { file, current_since: since })
        });
        // `relayfed.io/rotate-ech-key` on the Relay: a new value asks for a rotation now.
        let asked = relay.metadata.annotations.as_ref().and_then(|a| a.get(ECH_ROTATE_ANNOTATION)).cloned();
        let done = stored.as_ref().and_then(|s| s.metadata.annotations.as_ref()?.get(ECH_ROTATE_ANNOTATION).cloned());
        let force = asked.is_some() && asked != done;
        let keys = &relay.spec.ech_keys;
        let outcome = ech_rotation::decide(
            existing.as_ref(),
            &fed.spec.public_name,
            ech_rotation::Periods::from(keys),
            force,
            now,
        )
        .map_err(|e| ReconcileError::Keys(e.to_string()))?;
        if outcome.change != Change::Unchanged || force {
            let json =
                serde_json::to_vec_pretty(&outcome.state.file).map_err(|e| ReconcileError::Keys(e.to_string()))?;
            let mut s = objects::secret(relay, ech_name.clone(), &owner, BTreeMap::from([(key_name.clone(), json)]));
            let mut notes = BTreeMap::from([(ECH_SINCE_ANNOTATION.to_owned(), rfc3339(outcome.state.current_since))]);
            if let Some(v) = asked.clone().or(done) {
                notes.insert(ECH_ROTATE_ANNOTATION.to_owned(), v);
            }
            s.metadata.annotations = Some(notes);
            apply_obj(ctx, namespace, &s).await?;
            let id = outcome.state.file.current.config_id;
            match outcome.change {
                Change::Created => {
                    event(ctx, relay, false, "EchKeyCreated", "CreateEchKey", format!("ECH config id {id} created"))
                        .await
                }
                Change::Staged => {
                    let next = outcome.state.file.next.as_ref().map(|k| k.config_id).unwrap_or_default();
                    let why = if force { "rotation requested" } else { "rotation due" };
                    event(
                        ctx,
                        relay,
                        false,
                        "EchKeyStaged",
                        "RotateEchKey",
                        format!(
                            "{why}: ECH config id {next} staged; relays accept it now, homes seal to it after {}",
                            keys.staging_period
                        ),
                    )
                    .await
                }
                Change::Rotated => {
                    let grace = keys.grace_period;
                    event(
                        ctx,
                        relay,
                        false,
                        "EchKeyRotated",
                        "RotateEchKey",
                        format!("ECH config id {id} is current; the previous key is accepted for {grace}"),
                    )
                    .await
                }
                Change::PrunedPrevious => info!("previous ECH key dropped after the grace period"),
                Change::Unchanged => {}
            }
        }
        requeue = requeue.min(outcome.next_due);
        let set = outcome
            .state
            .file
            .key_set(std::path::Path::new(&key_name), keys.grace_period.get())
            .map_err(|e| ReconcileError::Keys(e.to_string()))?;
        let list = set.config_list().map_err(|e| ReconcileError::Keys(e.to_string()))?;
        status.insert("echConfigList".into(), base64_encode(&list).into());
        // Signed with the federation CA: homes of the federation's other clusters, which get
        // this config through relays, seal to it only because of this signature (§5.6).
        let signature = ca.ca.sign_ech_config(&node, &list).map_err(|e| ReconcileError::Keys(e.to_string()))?;
        status.insert("echConfigSignature".into(), base64_encode(&signature).into());
        status.insert("echConfigId".into(), outcome.state.file.current.config_id.into());
        status.insert("lastKeyRotation".into(), rfc3339(outcome.state.current_since).into());

        // The plan decides the relay's snapshot (the last good one stays deployed while the
        // relay is invalid); write it and the objects that run it.
        if let Some(msg) = &invalid {
            event(ctx, relay, true, "Invalid", "Plan", msg.clone()).await;
        }
        let mut ready_cond = invalid.clone().map(|msg| (false, "Invalid", msg));
        match ctx.distributor.snapshot(&node) {
            Some(snap) => {
                let json = serde_json::to_string_pretty(&*snap).map_err(|e| ReconcileError::Keys(e.to_string()))?;
                apply_obj::<ConfigMap>(ctx, namespace, &objects::config_map(relay, &owner, json)).await?;
                let dep =
                    apply_obj::<Deployment>(ctx, namespace, &objects::deployment(relay, &owner, &ctx.settings)).await?;
                let svc = apply_obj::<Service>(ctx, namespace, &objects::service(relay, &owner)).await?;
                apply_obj::<PodDisruptionBudget>(ctx, namespace, &objects::pdb(relay, &owner)).await?;
                let ready = dep.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
                status.insert("readyReplicas".into(), ready.into());
                status.insert("echAnonymitySet".into(), crate::plan::planned_anonymity_set(&snap).into());
                if let Some(v) = ctx.distributor.version(&node) {
                    status.insert("configVersion".into(), v.into());
                }
                if let Some(ack) = ctx.distributor.ack(&node) {
                    status.insert("acknowledgedVersion".into(), ack.version.into());
                    status.insert("acknowledgedResult".into(), serde_json::to_value(ack.result).unwrap_or_default());
                }
                if let Some(ep) = endpoint(&svc, relay.spec.listen_port) {
                    status.insert("endpoint".into(), ep.into());
                }
                let replicas = relay.spec.replicas;
                ready_cond.get_or_insert_with(|| match ready {
                    0 => (false, "Progressing", format!("0/{replicas} replicas ready")),
                    n => (true, "Ready", format!("{n}/{replicas} replicas ready")),
                });
            }
            None => {
                let msg = "the federation's plan has errors (see its Ready condition); nothing deployed yet";
                ready_cond.get_or_insert((false, "NotPlanned", msg.to_owned()));
            }
        }
        if let Some((ok, reason, message)) = ready_cond {
            if !ok {
                requeue = requeue.min(Duration::from_secs(15));
            }
            set_condition(&mut conds, Cond { type_: "Ready", ok, reason, message }, generation, now);
        }
    } else {
        let (ok, reason, message) = match invalid {
            Some(msg) => (false, "Invalid", msg),
            None => (true, "Planned", "identity issued; run the home relay with its snapshot".to_owned()),
        };
        set_condition(&mut conds, Cond { type_: "Ready", ok, reason, message }, generation, now);
    }
    status.insert("observedGeneration".into(), generation.into());
    status.insert("conditions".into(), serde_json::to_value(&conds).unwrap_or_default());
    apply_status(&api, relay, serde_json::Value::Object(status)).await?;
    Ok(Action::requeue(requeue.max(Duration::from_secs(1))))
}

/// The address peers dial: the load balancer's ingress, else the cluster IP.
fn endpoint(svc: &Service, port: u16) -> Option<String> {
    let ingress = svc.status.as_ref()?.load_balancer.as_ref().and_then(|lb| lb.ingress.as_ref()?.first().cloned());
    let host = ingress
        .and_then(|i| i.ip.or(i.hostname))
        .or_else(|| svc.spec.as_ref()?.cluster_ip.clone().filter(|ip| ip != "None"))?;
    Some(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
}
