//! End-to-end against a real cluster from the current kubeconfig. No API server can run on
//! the development machines, so this is `#[ignore]`d; run it with
//! `cargo test -p relayfed-operator --test cluster_e2e -- --ignored` after installing the
//! chart (`helm install relayfed charts/relayfed -n relayfed-system --create-namespace`).
//!
//! It applies examples/federation into `relayfed-e2e`, then waits for what the reconcilers
//! promise: the CA Secret and trust bundle, Ready conditions with observedGeneration, each
//! main relay's Deployment/Service/PDB and ECHConfigList in status, and a RolloutPolicy edit
//! reported Applied with the new generation. It deletes the namespace at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use relayfed_crds::{AnyResource, Relay, RelayFederation, RolloutPolicy};

const NS: &str = "relayfed-e2e";

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn the_example_federation_reconciles_in_a_real_cluster() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default().await.expect("a kubeconfig or in-cluster config");
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": NS}})).unwrap();
    let _ = nss.create(&PostParams::default(), &ns).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/federation");
    let pp = PatchParams::apply("relayfed-e2e").force();
    for f in std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()) {
        for r in relayfed_crds::parse_documents("e2e", &std::fs::read_to_string(&f).unwrap()).unwrap() {
            let mut v = match &r {
                AnyResource::Federation(x) => serde_json::to_value(x).unwrap(),
                AnyResource::Relay(x) => serde_json::to_value(x).unwrap(),
                AnyResource::Peer(x) => serde_json::to_value(x).unwrap(),
                AnyResource::RolloutPolicy(x) => serde_json::to_value(x).unwrap(),
            };
            v["metadata"]["namespace"] = NS.into();
            let gvk = kube::api::GroupVersionKind::gvk("relayfed.io", "v1alpha1", r.kind());
            let (ar, _) = kube::discovery::pinned_kind(&client, &gvk).await.unwrap();
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
            api.patch(&r.name(), &pp, &Patch::Apply(&v)).await.unwrap();
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let ca = eventually("the CA Secret", || async { secrets.get_opt("acme-ca").await.ok().flatten() }).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    eventually("the trust bundle", || async { cms.get_opt("acme-trust-bundle").await.ok().flatten() }).await;
    let feds: Api<RelayFederation> = Api::namespaced(client.clone(), NS);
    eventually("federation status", || async {
        let f = feds.get("acme").await.ok()?;
        let s = f.status?;
        (s.common.observed_generation == f.metadata.generation && s.ca_fingerprint.is_some()).then_some(())
    })
    .await;
    let relays: Api<Relay> = Api::namespaced(client.clone(), NS);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for hub in ["hub-eu", "hub-us"] {
        eventually("a main relay's ECHConfigList", || async { relays.get(hub).await.ok()?.status?.ech_config_list })
            .await;
        eventually("a main relay's Deployment", || async { deps.get_opt(hub).await.ok().flatten() }).await;
    }
    // Edit the policy: the new generation is reported Applied.
    let policies: Api<RolloutPolicy> = Api::namespaced(client.clone(), NS);
    let patch = serde_json::json!({"spec": {"ech": {"percentage": 42}}});
    let edited = policies.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("the policy edit applied", || async {
        let p = policies.get("default").await.ok()?;
        let s = p.status?;
        let applied = s.common.conditions.iter().any(|c| c.type_ == "Applied" && c.status == "True");
        (applied && s.common.observed_generation == edited.metadata.generation).then_some(())
    })
    .await;
    // Re-applying never replaces the CA.
    let again = secrets.get("acme-ca").await.unwrap();
    assert_eq!(again.data, ca.data);
    nss.delete(NS, &DeleteParams::default()).await.unwrap();
}
