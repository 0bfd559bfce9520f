//! Multi-cluster services on a real API server, with the chart's optional MCS CRDs: a
//! ServiceImport becomes a selector-less ClusterIP Service whose real allocated IP is written
//! back to `spec.ips`; a ServiceExport's `Valid` condition follows its Service as it appears
//! and goes.

use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use relayfed_operator::k8s::services::{ServiceExport, ServiceImport};
use serde_json::json;

use crate::support::{Namespace, eventually, examples_in, operated, plane};

const WAIT: Duration = Duration::from_secs(60);

async fn valid(exports: &Api<ServiceExport>) -> Option<String> {
    let s = exports.get_opt("catalog").await.ok()??.status?;
    s.conditions.iter().find(|c| c.type_ == "Valid").map(|c| c.status.clone())
}

#[tokio::test]
async fn imports_become_services_and_exports_follow_their_service() {
    let setup = operated("mcs").await;
    let (ns, _op) = (&setup.ns, &setup.op);
    let dir = examples_in("federation", &ns.name);
    assert!(plane().kubectl(&["apply", "-f", &dir.display().to_string()]).unwrap().ok);
    let shop = Namespace::create("mcs-shop", &[]);
    let client = plane().client().await.unwrap();

    let import = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": "payments", "namespace": shop.name},
        "spec": {"type": "ClusterSetIP", "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}]}});
    let out = plane().kubectl_stdin(&["apply", "-f", "-"], &import.to_string()).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &shop.name);
    let svc =
        eventually("the import's Service", WAIT, || async { svcs.get_opt("payments").await.ok().flatten() }).await;
    let spec = svc.spec.clone().unwrap();
    assert!(spec.selector.is_none_or(|s| s.is_empty()), "an import's Service has no selector");
    let ip = spec.cluster_ip.clone().unwrap();
    assert!(ip.starts_with("10.96."), "allocated from the service range: {ip}");
    assert_eq!(svc.metadata.owner_references.unwrap()[0].kind, "ServiceImport");
    let imports: Api<ServiceImport> = Api::namespaced(client.clone(), &shop.name);
    eventually("the allocated IP in spec.ips", WAIT, || async {
        (imports.get("payments").await.ok()?.spec.ips == vec![ip.clone()]).then_some(())
    })
    .await;

    // An export without its Service is not valid; it becomes valid when the Service appears,
    // and invalid again when it goes.
    let export = json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "catalog", "namespace": shop.name}, "spec": {}});
    assert!(plane().kubectl_stdin(&["apply", "-f", "-"], &export.to_string()).unwrap().ok);
    let exports: Api<ServiceExport> = Api::namespaced(client.clone(), &shop.name);
    eventually("Valid=False without the Service", WAIT, || async { valid(&exports).await.filter(|s| s == "False") })
        .await;
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "catalog", "namespace": shop.name},
        "spec": {"selector": {"app": "catalog"}, "ports": [{"port": 8080}]}});
    assert!(plane().kubectl_stdin(&["apply", "-f", "-"], &service.to_string()).unwrap().ok);
    eventually("Valid=True once the Service exists", WAIT, || async { valid(&exports).await.filter(|s| s == "True") })
        .await;
    svcs.delete("catalog", &DeleteParams::default()).await.unwrap();
    eventually("Valid=False after the Service is deleted", WAIT, || async {
        valid(&exports).await.filter(|s| s == "False")
    })
    .await;
}
