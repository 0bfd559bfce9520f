//! The ECH rollout on a real API server: a node of the example federation (the test,
//! subscribing as home `shop-eu` with a certificate from the federation's CA) reports ECH
//! setups that fail toward `hub-us` and succeed toward `hub-eu`; the operator rolls back
//! `hub-us` alone: the RolloutPolicy's status (phase, effective percentages, success rate,
//! the `RolledBack` condition with the figures, the printer columns), a Warning Event, the
//! metric, and the snapshot the node receives. An edit of the policy re-arms it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use relayfed_crds::RolloutPolicy;
use relayfed_sidecar::admin::metrics::Metrics;
use relayfed_sidecar::config::Snapshot;
use relayfed_sidecar::crypto::ca::FederationCa;
use relayfed_sidecar::distribution::client::{Counters, Subscription};
use relayfed_sidecar::distribution::{Ack, AckResult};
use relayfed_sidecar::federation::ech_cohorts::{Cohort, EchCohorts, Setup};

use relayfed_sidecar::transport::tls::HopIdentity;

use crate::support::{eventually, eventually_or, examples_in, operated, plane};

const WAIT: Duration = Duration::from_secs(90);

fn setups(c: &EchCohorts, main: &str, cohort: Cohort, ok: u32, failed: u32) {
    for i in 0..ok + failed {
        c.record(main, Setup { cohort, ok: i < ok, fallback: false, retried: false, seconds: 0.01 });
    }
}

/// The example federation applied in a fresh operated namespace named after `prefix`, its
/// default RolloutPolicy patched with `patch`.
async fn federation_with_policy(
    prefix: &str,
    patch: &serde_json::Value,
) -> (crate::support::Operated, kube::Client, Api<RolloutPolicy>) {
    let setup = operated(prefix).await;
    let dir = examples_in("federation", &setup.ns.name);
    let out = plane().kubectl(&["apply", "-f", &dir.display().to_string()]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let client = plane().client().await.unwrap();
    let policies: Api<RolloutPolicy> = Api::namespaced(client.clone(), &setup.ns.name);
    policies.patch("default", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    (setup, client, policies)
}

/// Subscribes to the operator's config distribution as home `shop-eu` (identity issued by
/// the federation's CA, as the operator would), reporting `counters`; returns them, the last
/// snapshot received, and the subscription's task.
async fn subscribe(
    client: &kube::Client,
    ns: &crate::support::Namespace,
    op: &crate::support::Operator,
) -> (Counters, Arc<Mutex<Option<Snapshot>>>, tokio::task::JoinHandle<()>) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let ca = eventually("the CA Secret", WAIT, || async { secrets.get_opt("acme-ca").await.ok().flatten() }).await;
    let text = |k: &str| String::from_utf8(ca.data.as_ref().unwrap()[k].0.clone()).unwrap();
    let ca = FederationCa::from_pem("acme.example", &text("ca.crt"), &text("ca.key")).unwrap();
    let issued = ca.issue("shop-eu", Duration::from_secs(3600)).unwrap();
    let identity = HopIdentity::from_pem(
        "acme.example",
        "shop-eu",
        &ca.certified_key().cert_pem,
        &issued.cert_pem,
        &issued.key_pem,
    )
    .unwrap();
    let counters = Counters::default();
    let sub = Subscription {
        server: format!("127.0.0.1:{}", op.distribution_port),
        server_node: relayfed_sidecar::distribution::DEFAULT_SERVER_NODE.into(),
        identity: identity.into(),
        wait_seconds: 5,
        reports: Some(counters.clone()),
    };
    let received: Arc<Mutex<Option<Snapshot>>> = Arc::default();
    let seen = received.clone();
    let node = tokio::spawn(sub.run(0, Arc::new(Metrics::new()), move |snap| {
        let version = snap.version;
        *seen.lock().unwrap() = Some(snap);
        Ack { version, result: AckResult::Applied, restart_required: vec![], detail: None }
    }));
    (counters, received, node)
}

#[tokio::test]
async fn a_failing_relay_is_rolled_back_alone_and_an_edit_rearms() {
    let patch = serde_json::json!({"spec": {"ech": {"enabled": true, "percentage": 100, "autoRollback":
        {"enabled": true, "minSuccessRate": 0.9, "evaluationWindow": "10s", "step": 50, "minStreams": 5}}}});
    let (setup, client, policies) = federation_with_policy("rec-rollout", &patch).await;
    let (ns, op) = (&setup.ns, &setup.op);

    let (counters, received, node) = subscribe(&client, ns, op).await;
    let cohorts = counters.ech.clone();
    eventually_or("the node receives ECH at 100%", WAIT, || async {
        match received.lock().unwrap().as_ref() {
            Some(s) if s.ech_policy.enabled && s.ech_policy.percentage == 100 => Ok(()),
            seen => {
                let log = op.logged();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                Err(format!(
                    "node has ECH policy {:?}; operator log ends:\n{}",
                    seen.map(|s| &s.ech_policy),
                    tail.join("\n")
                ))
            }
        }
    })
    .await;

    // Traffic: ECH toward hub-us fails 3 times in 4, toward hub-eu it succeeds.
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let traffic = {
        let (cohorts, failing) = (cohorts.clone(), failing.clone());
        tokio::spawn(async move {
            loop {
                let bad = if failing.load(std::sync::atomic::Ordering::Relaxed) { 6 } else { 0 };
                setups(&cohorts, "hub-us", Cohort::Ech, 8 - bad, bad);
                setups(&cohorts, "hub-eu", Cohort::Ech, 8, 0);
                setups(&cohorts, "hub-eu", Cohort::Plain, 4, 0);
                // The pace of the simulated traffic, not a synchronisation.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let rolled_back = eventually("hub-us rolled back", WAIT, || async {
        let s = policies.get("default").await.ok()?.status?;
        (s.effective_by_main.get("hub-us") == Some(&50)).then_some(s)
    })
    .await;
    assert_eq!(rolled_back.effective_by_main.get("hub-eu"), Some(&100), "{rolled_back:?}");
    assert_eq!(rolled_back.phase.as_deref(), Some("RolledBack"));
    assert_eq!(rolled_back.effective_percentage, Some(100));
    assert!(rolled_back.observed_success_rate.is_some_and(|r| r < 0.9), "{rolled_back:?}");
    assert!(rolled_back.last_rollback.is_some());
    let cond = rolled_back.common.conditions.iter().find(|c| c.type_ == "RolledBack").expect("RolledBack condition");
    assert_eq!(cond.status, "True");
    assert!(cond.message.contains("hub-us at 50%") && cond.message.contains("successful of"), "{}", cond.message);
    let fail = rolled_back.analysis.iter().find(|a| a.main == "hub-us").expect("hub-us analysed");
    assert_eq!(fail.verdict, "Fail");
    // The Applied condition the policy reconciler writes is kept beside it.
    assert!(rolled_back.common.conditions.iter().any(|c| c.type_ == "Applied" && c.status == "True"));
    let events = crate::support::get_json(&ns.name, &["events.events.k8s.io"]);
    let warning = events["items"].as_array().unwrap().iter().find(|e| e["reason"] == "RolledBack");
    let warning = warning.unwrap_or_else(|| panic!("no RolledBack Event: {events}"));
    assert_eq!(warning["type"], "Warning");
    assert!(warning["note"].as_str().unwrap().contains("hub-us"), "{warning}");
    eventually("the node receives hub-us's lowered percentage", WAIT, || async {
        received
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.ech_policy.percentage_by_main.get("hub-us") == Some(&50))
            .then_some(())
    })
    .await;
    let (_, metrics) = op.admin("/metrics").await.unwrap();
    assert!(metrics.contains("relayfed_operator_rollout_effective_percent{main=\"hub-us\"} 50"), "metric missing");
    let columns = plane().kubectl(&["get", "rolloutpolicy", "default", "-n", &ns.name]).unwrap();
    assert!(columns.ok, "{}", columns.stderr);
    let header: Vec<&str> = columns.stdout.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = columns.stdout.lines().nth(1).unwrap().split_whitespace().collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!((col("EFFECTIVE"), col("PHASE")), ("100", "RolledBack"), "{}", columns.stdout);
    assert_ne!(col("SUCCESSRATE"), "<none>", "{}", columns.stdout);

    // Fixed, then re-armed by an edit: every relay back at 100%.
    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    let patch = serde_json::json!({"spec": {"ech": {"autoRollback": {"minSuccessRate": 0.95}}}});
    policies.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("the edit re-arms every relay at 100%", WAIT, || async {
        let s = policies.get("default").await.ok()?.status?;
        let cond = s.common.conditions.iter().find(|c| c.type_ == "RolledBack")?;
        (s.effective_by_main.get("hub-us") == Some(&100) && cond.status == "False").then_some(())
    })
    .await;
    eventually("the node receives it", WAIT, || async {
        received.lock().unwrap().as_ref().is_some_and(|s| s.ech_policy.percentage_by_main.is_empty()).then_some(())
    })
    .await;
    traffic.abort();
    node.abort();
    let refused = op.rbac_refusals();
    assert!(refused.is_empty(), "the chart's RBAC refused requests:\n{}", refused.join("\n"));
}

/// Direct paths rolled out like ECH, on a real API server: the node reports direct setups that
/// fail toward `hub-us` (relayed ones succeed) and succeed toward `hub-eu`; the operator rolls
/// back direct paths to homes behind `hub-us` alone: `status.directPaths`, the
/// `DirectPathsRolledBack` condition, a Warning Event, the metric and the snapshot. ECH's
/// status is untouched. Turning direct paths off removes the status and the condition.
#[tokio::test]
async fn failing_direct_paths_are_rolled_back_for_their_relay_alone() {
    let patch = serde_json::json!({"spec": {"directPaths": {"enabled": true, "autoRollback":
        {"minSuccessRate": 0.9, "evaluationWindow": "10s", "step": 100, "minStreams": 5}}}});
    let (setup, client, policies) = federation_with_policy("rec-direct", &patch).await;
    let (ns, op) = (&setup.ns, &setup.op);
    let (counters, received, node) = subscribe(&client, ns, op).await;
    eventually("the node receives direct paths on", WAIT, || async {
        received.lock().unwrap().as_ref().is_some_and(|s| s.direct_paths.enabled).then_some(())
    })
    .await;
    let traffic = {
        let direct = counters.direct.clone();
        tokio::spawn(async move {
            loop {
                for i in 0..8 {
                    direct.record("hub-us", true, i < 2, 0.01);
                    direct.record("hub-us", false, true, 0.02);
                    direct.record("hub-eu", true, true, 0.01);
                }
                // The pace of the simulated traffic, not a synchronisation.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let status = eventually("hub-us's direct paths rolled back", WAIT, || async {
        let s = policies.get("default").await.ok()?.status?;
        (s.direct_paths.as_ref()?.effective_by_main.get("hub-us") == Some(&0)).then_some(s)
    })
    .await;
    let direct = status.direct_paths.as_ref().unwrap();
    assert_eq!(direct.effective_by_main.get("hub-eu"), Some(&100), "{direct:?}");
    assert_eq!((direct.phase.as_str(), direct.effective_percentage), ("RolledBack", 100));
    let us = direct.analysis.iter().find(|a| a.main == "hub-us").expect("hub-us analysed");
    assert_eq!(us.verdict, "Fail");
    assert!(us.reason.starts_with("direct setups 25.0% successful"), "{}", us.reason);
    assert_eq!(us.relayed_success_rate, Some(1.0));
    let cond = status.common.conditions.iter().find(|c| c.type_ == "DirectPathsRolledBack").expect("the condition");
    assert_eq!(cond.status, "True");
    assert!(cond.message.contains("hub-us at 0%"), "{}", cond.message);
    assert_ne!(status.phase.as_deref(), Some("RolledBack"), "ECH is another rollout: {status:?}");
    let events = crate::support::get_json(&ns.name, &["events.events.k8s.io"]);
    let warning = events["items"].as_array().unwrap().iter().find(|e| e["reason"] == "DirectPathsRolledBack");
    let warning = warning.unwrap_or_else(|| panic!("no DirectPathsRolledBack Event: {events}"));
    assert_eq!(warning["type"], "Warning");
    eventually("the node receives hub-us's lowered direct-path percentage", WAIT, || async {
        let r = received.lock().unwrap();
        r.as_ref().is_some_and(|s| s.direct_paths.percentage_by_main.get("hub-us") == Some(&0)).then_some(())
    })
    .await;
    let (_, metrics) = op.admin("/metrics").await.unwrap();
    assert!(metrics.contains("relayfed_operator_direct_paths_effective_percent{main=\"hub-us\"} 0"), "metric missing");

    // Off: the status and the condition go; the node's snapshot has no direct paths.
    traffic.abort();
    let patch = serde_json::json!({"spec": {"directPaths": {"enabled": false}}});
    policies.patch("default", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("direct paths off: their status is removed", WAIT, || async {
        let s = policies.get("default").await.ok()?.status?;
        let gone = s.direct_paths.is_none() && s.common.conditions.iter().all(|c| c.type_ != "DirectPathsRolledBack");
        gone.then_some(())
    })
    .await;
    eventually("the node runs without direct paths", WAIT, || async {
        received.lock().unwrap().as_ref().is_some_and(|s| s.direct_paths.is_default()).then_some(())
    })
    .await;
    node.abort();
    let refused = op.rbac_refusals();
    assert!(refused.is_empty(), "the chart's RBAC refused requests:\n{}", refused.join("\n"));
}
