//! Service export/import (multicluster.x-k8s.io): an import becomes a selector-less
//! ClusterIP Service and its IP is written back; an export is valid only with its Service.

use std::sync::Arc;

use relayfed_operator::k8s::services::{ServiceExport, ServiceImport, reconcile_export, reconcile_import};
use serde_json::json;

use super::{Scenario, t0};

const SVC: &str = "/api/v1/namespaces/shop/services/payments";
const SI: &str = "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceimports/payments";
const SE: &str = "/apis/multicluster.x-k8s.io/v1alpha1/namespaces/shop/serviceexports/payments";

fn import() -> ServiceImport {
    serde_json::from_value(json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": "payments", "namespace": "shop", "uid": "si-1"},
        "spec": {"type": "ClusterSetIP", "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn an_import_becomes_a_selectorless_cluster_ip_service_and_its_ip_is_recorded() {
    let s = Scenario::new(&[], t0());
    s.api.seed(SI, serde_json::to_value(import()).unwrap());
    // The API server allocates the ClusterIP on the first apply.
    s.api.seed(SVC, json!({"metadata": {"name": "payments"}, "spec": {"clusterIP": "10.96.7.7"}}));
    reconcile_import(Arc::new(import()), s.ctx.clone()).await.unwrap();
    assert_eq!(
        s.api.lines(),
        vec![
            format!("PATCH {SVC}"),
            format!("PATCH {SI}"),
            "POST /apis/events.k8s.io/v1/namespaces/shop/events".to_owned()
        ]
    );
    let svc = &s.api.calls()[0].body;
    assert!(svc["spec"]["selector"].is_null(), "an import has no selector: {svc}");
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0], json!({"name": "http", "port": 9090, "protocol": "TCP"}));
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "ServiceImport");
    assert_eq!(s.api.get(SI).unwrap()["spec"]["ips"], json!(["10.96.7.7"]));
    // Already recorded: a second reconcile only re-applies the Service.
    s.api.clear_calls();
    let mut again = import();
    again.spec.ips = vec!["10.96.7.7".into()];
    reconcile_import(Arc::new(again), s.ctx.clone()).await.unwrap();
    assert_eq!(s.api.lines(), vec![format!("PATCH {SVC}")]);
}

#[tokio::test]
async fn an_export_is_valid_only_while_its_service_exists() {
    let se: ServiceExport = serde_json::from_value(json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "payments", "namespace": "shop", "uid": "se-1", "generation": 1}, "spec": {},
    }))
    .unwrap();
    let s = Scenario::new(&[], t0());
    s.api.seed(SE, serde_json::to_value(&se).unwrap());
    reconcile_export(Arc::new(se.clone()), s.ctx.clone()).await.unwrap();
    let st = s.api.calls().into_iter().find(|c| c.path == format!("{SE}/status")).unwrap().body;
    assert_eq!(st["status"]["conditions"][0]["status"], "False");
    assert_eq!(st["status"]["conditions"][0]["reason"], "ServiceNotFound");
    assert_eq!(s.api.events(), vec![("Warning".into(), "ServiceNotFound".into())]);
    s.api.seed(SVC, json!({"metadata": {"name": "payments"}, "spec": {"ports": [{"port": 9090}]}}));
    s.api.clear_calls();
    reconcile_export(Arc::new(se), s.ctx.clone()).await.unwrap();
    let st = s.api.calls().into_iter().find(|c| c.path == format!("{SE}/status")).unwrap().body;
    assert_eq!(st["status"]["conditions"][0]["status"], "True");
    assert_eq!(st["status"]["conditions"][0]["message"], "payments.shop exported on port(s) 9090");
}
