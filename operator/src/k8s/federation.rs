//! `RelayFederation` -> the federation CA Secret (created once, never overwritten), the trust
//! bundle ConfigMap, the published plan, and a status with ready mains, peers and services.
//!
//! The CA Secret carries no owner reference on purpose: deleting and re-creating the
//! federation keeps the trust root and so every identity issued under it. Rotating the CA is
//! an explicit act (delete the Secret), never a side effect.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Resource;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use relayfed_crds::{RelayFederation, RelayType};
use relayfed_proto::crypto::ca::FederationCa;
use tracing::{Instrument, info, info_span};

use super::context::name_ns;
use super::status::{Cond, apply_status, event, set_condition};
use super::{Context, FIELD_MANAGER, LABEL_FEDERATION, LABEL_MANAGED_BY, ReconcileError, replan};

/// Key of the CA certificate (PEM) in the CA Secret and the trust bundle.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Key of the CA private key (PEM) in the CA Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// Annotation on the CA Secret naming the trust domain it was made for.
pub const TRUST_DOMAIN_ANNOTATION: &str = "relayfed.io/trust-domain";

/// Name of the federation's CA Secret.
pub fn ca_secret_name(federation: &str) -> String {
    format!("{federation}-ca")
}

/// Name of the federation's trust bundle ConfigMap.
pub fn trust_bundle_name(federation: &str) -> String {
    format!("{federation}-trust-bundle")
}

/// Labels of every object owned by federation `name`.
pub fn labels(federation: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_FEDERATION.to_owned(), federation.to_owned()),
        (LABEL_MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned()),
    ])
}

/// The CA of a federation as read from its Secret.
pub struct LoadedCa {
    /// The CA, ready to sign.
    pub ca: FederationCa,
    /// `sha256:<hex>` of the CA certificate.
    pub fingerprint: String,
    /// `sha256:<hex>` of the CA's public key: a partner's pin.
    pub key_fingerprint: String,
    /// Whether this reconcile created it.
    pub created: bool,
}

fn secret_text(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

/// Reads the CA Secret of `fed`; when `create` and it does not exist, creates it (POST, so a
/// concurrent creation loses with 409 and re-reads instead of overwriting).
pub async fn load_ca(
    ctx: &Context,
    namespace: &str,
    federation: &str,
    trust_domain: &str,
    create: bool,
) -> Result<Option<LoadedCa>, ReconcileError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let name = ca_secret_name(federation);
    let existing = api.get_opt(&name).await.map_err(|e| ReconcileError::kube(format!("get Secret {name}"), e))?;
    let (secret, created) = match existing {
        Some(s) => (s, false),
        None if !create => return Ok(None),
        None => {
            let ca = FederationCa::generate(trust_domain).map_err(|e| ReconcileError::Keys(e.to_string()))?;
            let ck = ca.certified_key();
            let mut annotations = BTreeMap::new();
            annotations.insert(TRUST_DOMAIN_ANNOTATION.to_owned(), trust_domain.to_owned());
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(labels(federation)),
                    annotations: Some(annotations),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                immutable: Some(true),
                data: Some(BTreeMap::from([
                    (CA_CERT_KEY.to_owned(), ByteString(ck.cert_pem.clone().into_bytes())),
                    (CA_KEY_KEY.to_owned(), ByteString(ck.key_pem.clone().into_bytes())),
                ])),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                Ok(s) => {
                    ctx.metrics.certificates_issued.get_or_create(&[("kind", "ca")]).inc();
                    (s, true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let s = api.get(&name).await.map_err(|e| ReconcileError::kube(format!("get Secret {name}"), e))?;
                    (s, false)
                }
                Err(e) => return Err(ReconcileError::kube(format!("create Secret {name}"), e)),
            }
        }
    };
    let (Some(cert), Some(key)) = (secret_text(&secret, CA_CERT_KEY), secret_text(&secret, CA_KEY_KEY)) else {
        return Err(ReconcileError::Dependency(format!(
            "Secret {namespace}/{name} lacks {CA_CERT_KEY} or {CA_KEY_KEY}; it is left untouched (delete it to let the operator create a new CA)"
        )));
    };
    let der = relayfed_proto::crypto::ca::parse_cert_pem(&cert)
        .map_err(|e| ReconcileError::Dependency(format!("Secret {namespace}/{name}: {e}")))?;
    let found = crate::local::keys::ca_trust_domain(&der).unwrap_or_default();
    if found != trust_domain {
        return Err(ReconcileError::Dependency(format!(
            "Secret {namespace}/{name} holds a CA for trust domain {found:?}, not {trust_domain:?}; it is left untouched"
        )));
    }
    let ca = FederationCa::from_pem(trust_domain, &cert, &key)
        .map_err(|e| ReconcileError::Dependency(format!("Secret {namespace}/{name}: {e}")))?;
    let fingerprint = relayfed_proto::crypto::ca::cert_fingerprint(&cert)
        .map_err(|e| ReconcileError::Dependency(format!("Secret {namespace}/{name}: {e}")))?;
    let key_fingerprint = relayfed_serving::partners::spki_fingerprint(&der).unwrap_or_default();
    Ok(Some(LoadedCa { fingerprint, key_fingerprint, ca, created }))
}

/// Reconciles one `RelayFederation`.
pub async fn reconcile(fed: Arc<RelayFederation>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let (name, namespace) = name_ns(&fed.metadata)?;
    let span = info_span!("reconcile", kind = "RelayFederation", %namespace, %name);
    let started = std::time::Instant::now();
    let result = apply(&fed, &ctx, &name, &namespace).instrument(span).await;
    if let Err(e) = &result {
        super::status::report_forbidden(&ctx, &*fed, e).await;
    }
    ctx.finished("RelayFederation", &format!("{namespace}/{name}"), started, result.is_ok());
    result
}

async fn apply(fed: &RelayFederation, ctx: &Context, name: &str, namespace: &str) -> Result<Action, ReconcileError> {
    let api: Api<RelayFederation> = Api::namespaced(ctx.client.clone(), namespace);
    let generation = fed.metadata.generation;
    let now = ctx.now();
    let mut conds = fed.status.as_ref().map(|s| s.common.conditions.clone()).unwrap_or_default();
    let ca = match load_ca(ctx, namespace, name, &fed.spec.trust_domain, true).await {
        Ok(ca) => ca,
        Err(ReconcileError::Dependency(msg)) => {
            event(ctx, fed, true, "CAInvalid", "LoadCA", msg.clone()).await;
            set_condition(
                &mut conds,
                Cond { type_: "Ready", ok: false, reason: "CAInvalid", message: msg.clone() },
                generation,
                now,
            );
            apply_status(&api, fed, serde_json::json!({"observedGeneration": generation, "conditions": conds})).await?;
            return Err(ReconcileError::Dependency(msg));
        }
        Err(e) => return Err(e),
    };
    let Some(ca) = ca else { return Err(ReconcileError::Dependency("CA Secret vanished".into())) };
    if ca.created {
        info!(fingerprint = %ca.fingerprint, "created the federation CA");
        event(ctx, fed, false, "CACreated", "CreateCA", format!("federation CA {} created", ca.fingerprint)).await;
    }
    // Trust bundle: public, owned by the federation (garbage-collected with it).
    let owner = fed.controller_owner_ref(&()).into_iter().collect::<Vec<_>>();
    let bundle = ConfigMap {
        metadata: ObjectMeta {
            name: Some(trust_bundle_name(name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels(name)),
            owner_references: Some(owner),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(CA_CERT_KEY.to_owned(), ca.ca.certified_key().cert_pem.clone())])),
        ..Default::default()
    };
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let bundle_name = trust_bundle_name(name);
    cms.patch(&bundle_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&bundle))
        .await
        .map_err(|e| ReconcileError::kube(format!("apply ConfigMap {bundle_name}"), e))?;

    let plan = replan::replan(ctx, namespace, name);
    let relays: Vec<_> = ctx
        .stores
        .relays
        .state()
        .into_iter()
        .filter(|r| r.metadata.namespace.as_deref() == Some(namespace) && r.spec.federation == name)
        .collect();
    let mains_ready = relays
        .iter()
        .filter(|r| r.spec.relay_type == RelayType::Main)
        .filter(|r| r.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0) > 0)
        .count();
    let services: usize = relays.iter().map(|r| r.spec.exports.len()).sum();
    let connected = ctx
        .stores
        .peers
        .state()
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| p.status.as_ref().and_then(|s| s.state) == Some(relayfed_crds::peer::PeerState::Up))
        .count();
    match &plan {
        Ok(p) if p.warnings.is_empty() => set_condition(
            &mut conds,
            Cond {
                type_: "Ready",
                ok: true,
                reason: "Planned",
                message: format!("{} node snapshots published", p.snapshots.len()),
            },
            generation,
            now,
        ),
        Ok(p) => set_condition(
            &mut conds,
            Cond { type_: "Ready", ok: true, reason: "PlannedWithWarnings", message: p.warnings.join("; ") },
            generation,
            now,
        ),
        Err(errors) => {
            let msg = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            set_condition(
                &mut conds,
                Cond { type_: "Ready", ok: false, reason: "PlanInvalid", message: msg },
                generation,
                now,
            );
        }
    }
    apply_status(
        &api,
        fed,
        serde_json::json!({
            "observedGeneration": generation,
            "conditions": conds,
            "caFingerprint": ca.fingerprint,
            "caKeyFingerprint": ca.key_fingerprint,
            "mainRelaysReady": mains_ready,
            "connectedPeers": connected,
            "services": services,
        }),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}
