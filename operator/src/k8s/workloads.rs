//! Injected pods as the plan sees them: reads the pod, Service, `ServiceExport` and
//! `ServiceImport` informer caches and turns them into [`WorkloadFacts`] for the federation
//! the operator serves. Pure over the stores (no API calls), so a pod event replans at once.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use relayfed_proto::config::Intercept;

use super::Context;
use super::services::{ServiceExport, ServiceImport};
use crate::identity::{self, node_id_for};
use crate::plan::workloads::{ImportedService, Workload, WorkloadExport, WorkloadFacts};
use crate::webhook;

/// Where injected sidecars live and how they intercept (the injection webhook's settings).
#[derive(Clone, Debug)]
pub struct WorkloadSettings {
    /// The federation (`namespace/name`) injected pods join.
    pub federation: String,
    /// Interception (outbound port, proxy uid, exclusions).
    pub intercept: Intercept,
    /// The sidecar's admin port.
    pub admin_port: u16,
}

impl Default for WorkloadSettings {
    fn default() -> Self {
        Self {
            federation: "relayfed-system/default".into(),
            intercept: Intercept {
                outbound_port: 15001,
                proxy_uid: 1337,
                scope: relayfed_proto::config::InterceptScope::All,
                exclude_cidrs: vec![],
                exclude_ports: vec![],
                unmatched: relayfed_proto::config::Unmatched::Passthrough,
                ipv6: true,
            },
            admin_port: 15090,
        }
    }
}

/// The federated name of Service `name` in `namespace`: `<name>.<namespace>`.
pub fn federated_name(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}")
}

/// A pod the webhook injected and that is, or will be, running.
fn is_live_workload(p: &Pod) -> bool {
    let injected = p.annotations().get(webhook::STATUS).is_some_and(|s| s == "injected");
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    injected && p.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn selects(svc: &Service, pod: &Pod) -> bool {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty()) else {
        return false;
    };
    let labels = pod.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The container port a Service port targets in `pod` (a named `targetPort` is looked up in
/// the pod's container ports).
fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// The ServiceExport annotation that asks for a PROXY protocol v2 header with the caller's
/// identity before the first byte of every federated connection to the exported Service.
pub const PROXY_PROTOCOL_ANNOTATION: &str = "relayfed.io/proxy-protocol";

/// Whether a ServiceExport asks for the PROXY protocol header (`"true"`; anything else: no).
fn wants_proxy_protocol(e: &ServiceExport) -> bool {
    e.metadata.annotations.as_ref().and_then(|a| a.get(PROXY_PROTOCOL_ANNOTATION)).is_some_and(|v| v == "true")
}

/// Computes the workload facts from the given objects (what the stores hold).
pub fn facts(
    settings: &WorkloadSettings,
    pods: &[&Pod],
    services: &[&Service],
    exports: &[&ServiceExport],
    imports: &[&ServiceImport],
) -> WorkloadFacts {
    let svc_by_key: BTreeMap<(String, String), &Service> =
        services.iter().map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), *s)).collect();
    let exported: Vec<(&Service, bool)> = exports
        .iter()
        .filter(|e| e.metadata.deletion_timestamp.is_none())
        .filter_map(|e| {
            let svc = svc_by_key.get(&(e.namespace().unwrap_or_default(), e.name_any())).copied()?;
            Some((svc, wants_proxy_protocol(e)))
        })
        .collect();
    let mut workloads: Vec<Workload> = pods
        .iter()
        .copied()
        .filter(|p| is_live_workload(p))
        .map(|p| {
            let namespace = p.namespace().unwrap_or_default();
            let w =
                identity::Workload { namespace: namespace.clone(), service_account: String::new(), pod: p.name_any() };
            let mut exports = Vec::new();
            for (svc, proxy_protocol) in
                exported.iter().filter(|(s, _)| s.namespace().as_deref() == Some(namespace.as_str()))
            {
                if !selects(svc, p) {
                    continue;
                }
                for sp in svc.spec.as_ref().and_then(|s| s.ports.as_ref()).into_iter().flatten() {
                    if sp.protocol.as_deref().is_some_and(|x| x != "TCP") {
                        continue;
                    }
                    if let (Ok(port), Some(target_port)) = (u16::try_from(sp.port), target_port(sp, p)) {
                        exports.push(WorkloadExport {
                            service: federated_name(&svc.name_any(), &namespace),
                            port,
                            target_port,
                            proxy_protocol: *proxy_protocol,
                        });
                    }
                }
            }
            exports.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
            Workload { node_id: node_id_for(&w), pod: format!("{namespace}/{}", p.name_any()), exports }
        })
        .collect();
    workloads.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let mut imported = Vec::new();
    for si in imports.iter().filter(|i| i.metadata.deletion_timestamp.is_none()) {
        let Some(ip) = si.spec.ips.first().and_then(|ip| ip.parse::<IpAddr>().ok()) else { continue };
        let name = federated_name(&si.name_any(), &si.namespace().unwrap_or_default());
        for p in si.spec.ports.iter().filter(|p| p.protocol.as_deref().is_none_or(|x| x == "TCP")) {
            if let Ok(port) = u16::try_from(p.port) {
                imported.push(ImportedService { service: name.clone(), port, cluster_ip: ip });
            }
        }
    }
    imported.sort_by(|a, b| (&a.service, a.port).cmp(&(&b.service, b.port)));
    WorkloadFacts {
        workloads,
        imports: imported,
        intercept: settings.intercept.clone(),
        admin_port: settings.admin_port,
    }
}

/// The workload facts of federation `namespace/name`, when it is the one injected pods join.
pub fn facts_for(ctx: &Context, namespace: &str, name: &str) -> Option<WorkloadFacts> {
    let settings = &ctx.settings.workloads;
    if settings.federation != format!("{namespace}/{name}") {
        return None;
    }
    let s = &ctx.stores;
    let (pods, services, exports, imports) = (s.pods.state(), s.services.state(), s.exports.state(), s.imports.state());
    Some(facts(
        settings,
        &pods.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        &services.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        &exports.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        &imports.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
    ))
}

/// Replans the federation injected pods join (a pod, Service, export or import changed).
pub fn replan_workloads(ctx: &Context) {
    let Some((namespace, name)) = ctx.settings.workloads.federation.split_once('/') else { return };
    if let Err(errors) = super::replan::replan(ctx, namespace, name) {
        tracing::debug!(federation = %ctx.settings.workloads.federation, errors = errors.len(), "workloads not replanned: the federation's plan has errors");
    }
}

/// The CA root ConfigMap ([`webhook::CA_ROOT_CONFIGMAP`]) for `namespace`: the federation CA
/// and trust domain the injected token volume projects, so a sidecar can verify the operator
/// before it has a certificate (as Istio's root-cert ConfigMap does).
pub fn ca_root_configmap(namespace: &str, ca_pem: &str, trust_domain: &str) -> k8s_openapi::api::core::v1::ConfigMap {
    k8s_openapi::api::core::v1::ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(webhook::CA_ROOT_CONFIGMAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(super::LABEL_MANAGED_BY.to_owned(), super::FIELD_MANAGER.to_owned())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("ca.pem".to_owned(), ca_pem.to_owned()),
            ("trust-domain".to_owned(), trust_domain.to_owned()),
        ])),
        ..Default::default()
    }
}

/// Reconciles an injected pod: makes sure its namespace has the CA root ConfigMap its
/// sidecar starts from, then replans the federation injected pods join, so a new pod gets
/// its snapshot (and the relays learn its node id) and a terminating one is withdrawn (a
/// graceful delete sets `deletionTimestamp` first; a pod force-deleted without one is
/// withdrawn by the next replan, at the latest the exports' 10-minute requeue).
pub async fn reconcile_pod(
    pod: std::sync::Arc<Pod>,
    ctx: std::sync::Arc<Context>,
) -> Result<kube::runtime::controller::Action, super::ReconcileError> {
    use tracing::Instrument;
    let started = std::time::Instant::now();
    let key = super::context::object_key(&pod.metadata);
    let span = tracing::info_span!("reconcile", kind = "Pod", object = %key);
    let result = async {
        if is_live_workload(&pod)
            && let Some(namespace) = pod.namespace()
        {
            ensure_ca_root(&ctx, &namespace).await?;
        }
        replan_workloads(&ctx);
        Ok(kube::runtime::controller::Action::await_change())
    }
    .instrument(span)
    .await;
    ctx.finished("Pod", &key, started, result.is_ok());
    result
}

/// Applies the CA root ConfigMap in `namespace` (server-side apply: unchanged content is a no-op).
async fn ensure_ca_root(ctx: &Context, namespace: &str) -> Result<(), super::ReconcileError> {
    use kube::api::{Api, Patch, PatchParams};
    let Some((fed_ns, fed_name)) = ctx.settings.workloads.federation.split_once('/') else {
        return Err(super::ReconcileError::Object(format!(
            "--federation {:?}: expected namespace/name",
            ctx.settings.workloads.federation
        )));
    };
    let Some(fed) = ctx
        .stores
        .federations
        .state()
        .into_iter()
        .find(|f| f.metadata.namespace.as_deref() == Some(fed_ns) && f.metadata.name.as_deref() == Some(fed_name))
    else {
        return Err(super::ReconcileError::Dependency(format!(
            "RelayFederation {fed_ns}/{fed_name} does not exist; injected pods wait for it"
        )));
    };
    let td = fed.spec.trust_domain.clone();
    let Some(ca) = super::federation::load_ca(ctx, fed_ns, fed_name, &td, false).await? else {
        return Err(super::ReconcileError::Dependency(format!(
            "the CA of RelayFederation {fed_ns}/{fed_name} is not created yet"
        )));
    };
    let cm = ca_root_configmap(namespace, &ca.ca.certified_key().cert_pem, &td);
    let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch(webhook::CA_ROOT_CONFIGMAP, &PatchParams::apply(super::FIELD_MANAGER).force(), &Patch::Apply(&cm))
        .await
        .map_err(|e| {
            super::ReconcileError::kube(format!("apply ConfigMap {namespace}/{}", webhook::CA_ROOT_CONFIGMAP), e)
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, labels: serde_json::Value, annotations: serde_json::Value, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn service(name: &str, selector: serde_json::Value, ports: serde_json::Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "shop"}, "spec": {"selector": selector, "ports": ports}}),
        )
        .unwrap()
    }

    fn export(name: &str) -> ServiceExport {
        let mut e = ServiceExport::new(name, Default::default());
        e.metadata.namespace = Some("shop".into());
        e
    }

    #[test]
    fn only_live_injected_pods_are_workloads_and_exports_follow_selectors_and_ports() {
        let injected = json!({"relayfed.io/status": "injected"});
        let pods = [
            pod("web-1", json!({"app": "web"}), injected.clone(), "Running"),
            pod("web-2", json!({"app": "web"}), injected.clone(), "Succeeded"),
            pod("plain", json!({"app": "web"}), json!({}), "Running"),
            pod("db-1", json!({"app": "db"}), injected, "Pending"),
        ];
        let services = [
            service(
                "web",
                json!({"app": "web"}),
                json!([{"port": 80, "targetPort": "http"}, {"port": 53, "protocol": "UDP"}, {"port": 81, "targetPort": 9000}]),
            ),
            service("db", json!({"app": "db"}), json!([{"port": 5432}])),
        ];
        let annotated = |value: &str| {
            let mut e = export("web");
            e.metadata.annotations = Some([(PROXY_PROTOCOL_ANNOTATION.to_owned(), value.to_owned())].into());
            e
        };
        let facts_of = |exports: &[ServiceExport]| {
            facts(
                &WorkloadSettings::default(),
                &pods.iter().collect::<Vec<_>>(),
                &services.iter().collect::<Vec<_>>(),
                &exports.iter().collect::<Vec<_>>(),
                &[],
            )
        };
        let f = facts_of(&[annotated("true"), export("missing")]);
        let names: Vec<&str> = f.workloads.iter().map(|w| w.pod.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"shop/web-1") && names.contains(&"shop/db-1"), "{names:?}");
        let web = f.workloads.iter().find(|w| w.pod == "shop/web-1").unwrap();
        assert_eq!(
            web.exports,
            vec![
                WorkloadExport { service: "web.shop".into(), port: 80, target_port: 8080, proxy_protocol: true },
                WorkloadExport { service: "web.shop".into(), port: 81, target_port: 9000, proxy_protocol: true },
            ],
            "named targetPort resolved, UDP skipped, the export's PROXY protocol annotation followed"
        );
        let db = f.workloads.iter().find(|w| w.pod == "shop/db-1").unwrap();
        assert!(db.exports.is_empty(), "db is not exported");
        // Without the annotation (or with another value): no header.
        for exports in [[export("web")], [annotated("yes")]] {
            let f = facts_of(&exports);
            let web = f.workloads.iter().find(|w| w.pod == "shop/web-1").unwrap();
            assert!(web.exports.iter().all(|e| !e.proxy_protocol));
        }
    }

    #[test]
    fn imports_need_an_allocated_ip() {
        let mut with_ip = ServiceImport::new(
            "pay",
            super::super::services::ServiceImportSpec {
                type_: None,
                ports: vec![super::super::services::ImportPort { name: None, port: 443, protocol: None }],
                ips: vec!["10.96.0.9".into()],
            },
        );
        with_ip.metadata.namespace = Some("shop".into());
        let mut pending = with_ip.clone();
        pending.metadata.name = Some("later".into());
        pending.spec.ips.clear();
        let f = facts(&WorkloadSettings::default(), &[], &[], &[], &[&with_ip, &pending]);
        assert_eq!(
            f.imports,
            vec![ImportedService { service: "pay.shop".into(), port: 443, cluster_ip: "10.96.0.9".parse().unwrap() }]
        );
    }
}
