//! The reconcilers on a real API server, as the chart's ServiceAccount (a TokenRequest token,
//! RBAC exactly as `helm template` renders it): the example federation becomes Secrets,
//! Deployments whose pods the real controller-manager creates and kwok runs, Services, PDBs
//! with owner references, conditions, Events; a deleted Relay runs its finalizer and the
//! garbage collector removes its children; ECH keys rotate with their grace period; a verb
//! missing from the ClusterRole is reported naming the verb and resource.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use relayfed_crds::{Relay, RelayFederation, RolloutPolicy};

use crate::support::{eventually, examples_in, operated, plane};

const WAIT: Duration = Duration::from_secs(90);

fn owned_by_relay<K: kube::Resource>(obj: &K, relay: &str) -> bool {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Relay" && o.name == relay && o.controller == Some(true))
}

#[tokio::test]
async fn the_example_federation_reconciles_under_the_charts_rbac() {
    let setup = operated("rec-examples").await;
    let (ns, op) = (&setup.ns, &setup.op);
    let dir = examples_in("federation", &ns.name);
    let out = plane().kubectl(&["apply", "-f", &dir.display().to_string()]).unwrap();
    assert!(out.ok, "{}", out.stderr);

    let client = plane().client().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let ca = eventually("the CA Secret", WAIT, || async { secrets.get_opt("acme-ca").await.ok().flatten() }).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    eventually("the trust bundle", WAIT, || async { cms.get_opt("acme-trust-bundle").await.ok().flatten() }).await;

    let relays: Api<Relay> = Api::namespaced(client.clone(), &ns.name);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    for (hub, replicas) in [("hub-eu", 2), ("hub-us", 1)] {
        let dep =
            eventually("a main relay's Deployment", WAIT, || async { deps.get_opt(hub).await.ok().flatten() }).await;
        assert!(
            owned_by_relay(&dep, hub),
            "{hub}: Deployment not owned by its Relay: {:?}",
            dep.metadata.owner_references
        );
        let svc = eventually("a main relay's Service", WAIT, || async { svcs.get_opt(hub).await.ok().flatten() }).await;
        assert!(owned_by_relay(&svc, hub));
        for s in [format!("{hub}-identity"), format!("{hub}-ech")] {
            let secret =
                eventually("a relay Secret", WAIT, || async { secrets.get_opt(&s).await.ok().flatten() }).await;
            assert!(owned_by_relay(&secret, hub), "{s} not owned by {hub}");
        }
        if replicas > 1 {
            let pdb = eventually("the PDB", WAIT, || async { pdbs.get_opt(hub).await.ok().flatten() }).await;
            assert!(owned_by_relay(&pdb, hub));
        }
        // The real controller-manager creates the pods, the scheduler binds them, kwok runs them.
        let selector = format!("relayfed.io/relay={hub}");
        eventually("the relay's pods Running on a node", WAIT, || async {
            let list = pods.list(&ListParams::default().labels(&selector)).await.ok()?;
            let running = list
                .items
                .iter()
                .filter(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("node-1")
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .count();
            (running == replicas).then_some(())
        })
        .await;
        // Status: the ECHConfigList, Ready with the current generation once the replicas are up.
        eventually("the relay Ready with its ECHConfigList", WAIT, || async {
            let r = relays.get(hub).await.ok()?;
            let s = r.status?;
            let ready = s.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && s.ech_config_list.is_some() && s.common.observed_generation == r.metadata.generation)
                .then_some(())
        })
        .await;
    }
    let feds: Api<RelayFederation> = Api::namespaced(client.clone(), &ns.name);
    eventually("federation status", WAIT, || async {
        let f = feds.get("acme").await.ok()?;
        let s = f.status?;
        let pin = s.ca_key_fingerprint.as_deref().is_some_and(|k| k.starts_with("sha256:") && k.len() == 71);
        (s.common.observed_generation == f.metadata.generation && s.ca_fingerprint.is_some() && pin).then_some(())
    })
    .await;
    // Events from the operator, through the events.k8s.io API its RBAC grants.
    let events = crate::support::get_json(&ns.name, &["events.events.k8s.io"]);
    let ours =
        events["items"].as_array().unwrap().iter().filter(|e| e["reportingController"] == "relayfed-operator").count();
    assert!(ours > 0, "no Events from the operator: {events}");

    // A policy edit is reported Applied with the new generation.
    let policies: Api<RolloutPolicy> = Api::namespaced(client.clone(), &ns.name);
    let patch = serde_json::json!({"spec": {"ech": {"percentage": 42}}});
    let edited = policies.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("the policy edit applied", WAIT, || async {
        let s = policies.get("default").await.ok()?.status?;
        let applied = s.common.conditions.iter().any(|c| c.type_ == "Applied" && c.status == "True");
        (applied && s.common.observed_generation == edited.metadata.generation).then_some(())
    })
    .await;

    // Deleting a Relay runs its finalizer; the garbage collector removes what it owned.
    relays.delete("hub-us", &DeleteParams::default()).await.unwrap();
    eventually("the Relay gone (finalizer removed)", WAIT, || async {
        relays.get_opt("hub-us").await.ok()?.is_none().then_some(())
    })
    .await;
    eventually("its Deployment, Service and Secrets collected", Duration::from_secs(120), || async {
        let left = deps.get_opt("hub-us").await.ok()?.is_some()
            || svcs.get_opt("hub-us").await.ok()?.is_some()
            || secrets.get_opt("hub-us-ech").await.ok()?.is_some();
        (!left).then_some(())
    })
    .await;
    // The CA was never replaced, and nothing was forbidden to the chart's ServiceAccount.
    assert_eq!(secrets.get("acme-ca").await.unwrap().data, ca.data);
    let refused = op.rbac_refusals();
    assert!(refused.is_empty(), "the chart's RBAC refused requests:\n{}", refused.join("\n"));
    assert!(dep_managed_by_operator(&deps, "hub-eu").await, "hub-eu not written by the operator's field manager");
}

async fn dep_managed_by_operator(deps: &Api<Deployment>, name: &str) -> bool {
    deps.get(name)
        .await
        .is_ok_and(|d| d.managed_fields().iter().any(|m| m.manager.as_deref() == Some("relayfed-operator")))
}

/// A relay's ECH Secret: its keys' config ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct EchIds {
    current: u64,
    previous: Option<u64>,
    next: Option<u64>,
}

async fn ech_state(secrets: &Api<Secret>, relay: &str, node: &str) -> Option<EchIds> {
    let s = secrets.get_opt(&format!("{relay}-ech")).await.ok()??;
    let bytes = s.data?.get(&format!("{node}-ech.json"))?.0.clone();
    let file: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(EchIds {
        current: file["current"]["configId"].as_u64()?,
        previous: file["previous"]["configId"].as_u64(),
        next: file["next"]["configId"].as_u64(),
    })
}

#[tokio::test]
async fn ech_keys_are_staged_rotated_pruned_and_rotated_on_request() {
    let setup = operated("rec-rotation").await;
    let (ns, _op) = (&setup.ns, &setup.op);
    let dir = examples_in("federation", &ns.name);
    let fed = dir.join("00-federation.yaml").display().to_string();
    assert!(plane().kubectl(&["apply", "-f", &fed]).unwrap().ok);
    let relay = format!(
        "apiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: hub-eu, namespace: {}}}\n\
         spec: {{type: main, nodeId: hub-eu, federation: acme, listenPort: 7401, \
         echKeys: {{rotationPeriod: 1m, gracePeriod: 20s, stagingPeriod: 10s}}}}\n",
        ns.name
    );
    let out = plane().kubectl_stdin(&["apply", "-f", "-"], &relay).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let client = plane().client().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let relays: Api<Relay> = Api::namespaced(client, &ns.name);
    let keys = || async { ech_state(&secrets, "hub-eu", "hub-eu").await };
    let first = eventually("the first ECH key", WAIT, || async { keys().await }).await;
    assert_eq!((first.previous, first.next), (None, None));
    // 10 s before the rotation period ends: a next key is staged, the current one stays.
    let staged = eventually("a staged ECH key", Duration::from_secs(120), || async {
        keys().await.filter(|k| k.next.is_some() || k.current != first.current)
    })
    .await;
    assert_eq!(staged.current, first.current, "the key was replaced without being staged first: {staged:?}");
    let next = staged.next.unwrap();
    let status = relays.get("hub-eu").await.unwrap().status.unwrap();
    assert_eq!(status.ech_config_id, Some(first.current as u8), "homes must not be given the staged key yet");
    // After the staging period: the staged key is current, the old one kept as previous.
    let rotated = eventually("the staged ECH key promoted", Duration::from_secs(60), || async {
        keys().await.filter(|k| k.current != first.current)
    })
    .await;
    assert_eq!(rotated, EchIds { current: next, previous: Some(first.current), next: None });
    eventually("status naming the new config id", WAIT, || async {
        let s = relays.get("hub-eu").await.ok()?.status?;
        (s.ech_config_id == Some(next as u8) && s.last_key_rotation.is_some()).then_some(())
    })
    .await;
    // After the grace period, the previous key is dropped (before the next rotation).
    let pruned = eventually("the previous key dropped", Duration::from_secs(50), || async {
        keys().await.filter(|k| k.previous.is_none())
    })
    .await;
    assert_eq!((pruned.current, pruned.next), (next, None), "pruning must not stage or rotate");
    // A rotation on request: a new annotation value stages a key at once (the schedule's own
    // staging is ~30 s away).
    let out =
        plane().kubectl(&["-n", &ns.name, "annotate", "relay", "hub-eu", "relayfed.io/rotate-ech-key=now"]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let asked = eventually("a key staged on request", Duration::from_secs(20), || async {
        keys().await.filter(|k| k.next.is_some())
    })
    .await;
    assert_eq!(asked.current, next);
}

#[tokio::test]
async fn a_verb_missing_from_the_cluster_role_is_reported_naming_verb_and_resource() {
    let setup = operated("rec-rbac").await;
    let (ns, op) = (&setup.ns, &setup.op);
    let dir = examples_in("federation", &ns.name);
    assert!(plane().kubectl(&["apply", "-f", &dir.display().to_string()]).unwrap().ok);
    let client = plane().client().await.unwrap();
    let relays: Api<Relay> = Api::namespaced(client, &ns.name);
    eventually("hub-eu Ready with its ECHConfigList", WAIT, || async {
        let s = relays.get("hub-eu").await.ok()?.status?;
        let ready = s.common.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
        (ready && s.ech_config_list.is_some()).then_some(())
    })
    .await;
    // Break the chart's ClusterRole: no `patch` on Deployments; then change the relay so its
    // Deployment must be patched.
    let role = format!("{}-operator", ns.name);
    let out = plane().kubectl(&["get", "clusterrole", &role, "-o", "json"]).unwrap();
    let mut cr: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    for rule in cr["rules"].as_array_mut().unwrap() {
        if rule["resources"].as_array().unwrap().iter().any(|r| r == "deployments") {
            rule["verbs"].as_array_mut().unwrap().retain(|v| v != "patch");
        }
    }
    let out = plane().kubectl_stdin(&["replace", "-f", "-"], &cr.to_string()).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let edit = serde_json::json!({"spec": {"resources": {"requests": {"cpu": "150m"}}}});
    relays.patch("hub-eu", &PatchParams::default(), &Patch::Merge(&edit)).await.unwrap();
    // The Relay's Ready condition says what is missing, in terms an operator can act on, and
    // the rest of its status (the ECHConfigList homes seal to) is kept.
    let (message, status) = eventually("Ready=False naming the missing permission", WAIT, || async {
        let s = relays.get("hub-eu").await.ok()?.status?;
        let c = s
            .common
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "Forbidden")?;
        Some((c.message.clone(), s.clone()))
    })
    .await;
    assert!(status.ech_config_list.is_some(), "reporting Forbidden erased the rest of the status: {status:?}");
    assert!(message.contains("patch") && message.contains("deployments"), "{message}");
    // Retried with backoff, not in a storm: over 20 s one relay's failed reconciles stay few
    // (backoff 5 s doubling; a storm would be one per watch event, hundreds).
    let key = format!("object=\"{}/hub-eu\"", ns.name);
    let failures = || op.logged().lines().filter(|l| l.contains("reconcile failed") && l.contains(&key)).count();
    let before = failures();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = failures() - before;
    eprintln!("failed reconciles of hub-eu in 20 s while forbidden: {during}");
    assert!(during <= 5, "{during} failed reconciles of one Relay in 20 s: a retry storm");
    assert!(op.rbac_refusals().iter().any(|l| l.contains("cannot patch resource \"deployments\"")), "{}", op.logged());
    // Counted under its error label, where an alert can see it.
    let (_, metrics) = op.admin("/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("relayfed_operator_reconciles_total{") && l.contains("result=\"kube_api\"")),
        "{metrics}"
    );
}
