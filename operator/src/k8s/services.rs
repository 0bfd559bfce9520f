//! Service export/import with the Kubernetes multi-cluster services types
//! (`multicluster.x-k8s.io/v1alpha1`): a `ServiceExport` next to a Service registers it in
//! the federation (validated, counted in the federation status); a `ServiceImport` becomes a
//! selector-less ClusterIP Service of the same name whose address injected sidecars intercept,
//! and the allocated IP is written back to `ServiceImport.spec.ips`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::Resource;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use tracing::{Instrument, info_span};

use super::context::name_ns;
use super::status::{Cond, apply_status, event, set_condition};
use super::{Context, FIELD_MANAGER, LABEL_MANAGED_BY, ReconcileError};

pub use relayfed_crds::mcs::{
    ImportPort, ServiceExport, ServiceExportSpec, ServiceExportStatus, ServiceImport, ServiceImportSpec,
};

/// Label on Services created for imports.
pub const LABEL_IMPORTED: &str = "relayfed.io/imported";

/// The selector-less Service that makes `si` reachable locally.
pub fn import_service(si: &ServiceImport) -> Option<Service> {
    let owner = si.controller_owner_ref(&())?;
    let mut labels = BTreeMap::from([(LABEL_MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned())]);
    labels.insert(LABEL_IMPORTED.to_owned(), "true".to_owned());
    Some(Service {
        metadata: ObjectMeta {
            name: si.metadata.name.clone(),
            namespace: si.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            // No selector: no endpoints; the sidecars intercept the ClusterIP.
            selector: None,
            ports: Some(
                si.spec
                    .ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Reconciles a `ServiceImport`.
pub async fn reconcile_import(si: Arc<ServiceImport>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let (name, namespace) = name_ns(&si.metadata)?;
    async {
        if si.spec.type_.as_deref() == Some("Headless") {
            event(
                &ctx,
                si.as_ref(),
                true,
                "Unsupported",
                "Import",
                "headless imports are not supported; use ClusterSetIP".into(),
            )
            .await;
            return Ok(Action::await_change());
        }
        let svc = import_service(&si)
            .ok_or_else(|| ReconcileError::Object(format!("ServiceImport {namespace}/{name} has no uid")))?;
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
        let applied = services
            .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&svc))
            .await
            .map_err(|e| ReconcileError::kube(format!("apply Service {name}"), e))?;
        let ip = applied.spec.and_then(|s| s.cluster_ip).filter(|ip| ip != "None");
        if let Some(ip) = ip
            && si.spec.ips != [ip.clone()]
        {
            let imports: Api<ServiceImport> = Api::namespaced(ctx.client.clone(), &namespace);
            let body = serde_json::json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
                "metadata": {"name": name}, "spec": {"ips": [ip]},
            });
            imports
                .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body))
                .await
                .map_err(|e| ReconcileError::kube(format!("apply ServiceImport {name} ips"), e))?;
            event(&ctx, si.as_ref(), false, "Imported", "Import", format!("reachable at {ip}")).await;
        }
        // Injected pods intercept the import's ClusterIP.
        super::workloads::replan_workloads(&ctx);
        ctx.succeeded(&format!("{namespace}/{name}"));
        Ok(Action::requeue(Duration::from_secs(600)))
    }
    .instrument(info_span!("reconcile", kind = "ServiceImport", %namespace, %name))
    .await
}

/// Reconciles a `ServiceExport`: valid when the Service exists.
pub async fn reconcile_export(se: Arc<ServiceExport>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let (name, namespace) = name_ns(&se.metadata)?;
    async {
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
        let svc = services.get_opt(&name).await.map_err(|e| ReconcileError::kube(format!("get Service {name}"), e))?;
        let generation = se.metadata.generation;
        let mut conds = se.status.clone().unwrap_or_default().conditions;
        let was_valid = conds.iter().find(|c| c.type_ == "Valid").map(|c| c.status == "True");
        let (ok, reason, message) = match &svc {
            Some(s) => {
                let ports: Vec<String> = s
                    .spec
                    .as_ref()
                    .and_then(|x| x.ports.clone())
                    .unwrap_or_default()
                    .iter()
                    .map(|p| p.port.to_string())
                    .collect();
                (true, "Exported", format!("{name}.{namespace} exported on port(s) {}", ports.join(", ")))
            }
            None => (false, "ServiceNotFound", format!("no Service {namespace}/{name} to export")),
        };
        if was_valid != Some(ok) {
            event(&ctx, se.as_ref(), !ok, reason, "Export", message.clone()).await;
        }
        set_condition(&mut conds, Cond { type_: "Valid", ok, reason, message }, generation, ctx.now());
        let api: Api<ServiceExport> = Api::namespaced(ctx.client.clone(), &namespace);
        apply_status(&api, se.as_ref(), serde_json::json!({"conditions": conds})).await?;
        // The pods behind the Service register it with their main relay.
        super::workloads::replan_workloads(&ctx);
        ctx.succeeded(&format!("{namespace}/{name}"));
        Ok(Action::requeue(Duration::from_secs(if ok { 600 } else { 30 })))
    }
    .instrument(info_span!("reconcile", kind = "ServiceExport", %namespace, %name))
    .await
}
