//! Leader election on a real API server: two operator replicas, each under its own
//! ServiceAccount from the chart's RBAC (so the audit log tells their writes apart); the
//! follower writes nothing but the follower label on its own pod; killing the leader hands
//! the Lease over within the lease duration, and the new leader reconciles.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::support::{Namespace, Operator, eventually, examples_in, operator_identity, plane, serial};

/// The Lease duration the operator uses (operator/src/k8s/controllers.rs).
const LEASE: Duration = Duration::from_secs(15);

async fn holder(leases: &Api<Lease>) -> Option<(String, i32)> {
    let spec = leases.get_opt("relayfed-operator").await.ok()??.spec?;
    Some((spec.holder_identity?, spec.lease_transitions.unwrap_or(0)))
}

#[tokio::test]
async fn a_killed_leader_hands_over_within_the_lease_and_the_follower_never_writes() {
    let _serial = serial().await;
    let ns = Namespace::create("leader", &[]);
    let (a, b) = (format!("{}-a", ns.name), format!("{}-b", ns.name));
    let kube_a = operator_identity(&ns.name, &a).await;
    let kube_b = operator_identity(&ns.name, &b).await;
    let user_b = format!("system:serviceaccount:{}:{b}-operator", ns.name);
    let client = plane().client().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let fed = format!("{}/acme", ns.name);

    let mut op_a = Operator::start(&kube_a, &ns.name, "op-a", &fed);
    eventually("op-a holding the Lease", Duration::from_secs(30), || async {
        holder(&leases).await.filter(|(h, _)| h == "op-a")
    })
    .await;
    let dir = examples_in("federation", &ns.name);
    assert!(plane().kubectl(&["apply", "-f", &dir.display().to_string()]).unwrap().ok);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    eventually("the leader reconciling", Duration::from_secs(60), || async {
        secrets.get_opt("hub-eu-ech").await.ok().flatten()
    })
    .await;

    let op_b = Operator::start(&kube_b, &ns.name, "op-b", &fed);
    // The follower tries for the Lease (a GET every 2 s, logged as nothing) and must stay out:
    // give it two of the leader's renewals.
    eventually("op-a renewing twice with op-b running", Duration::from_secs(30), || async {
        let renewed = plane()
            .audit_writes(&format!("system:serviceaccount:{}:{a}-operator", ns.name))
            .iter()
            .filter(|w| w.resource == "leases" && w.verb == "update")
            .count();
        (renewed >= 3).then_some(())
    })
    .await;
    assert_eq!(holder(&leases).await.unwrap().0, "op-a");
    // Its only write is labelling its own pod a follower (no such pod here: a 404).
    let before_kill: Vec<_> = plane()
        .audit_writes(&user_b)
        .into_iter()
        .filter(|w| !(w.resource == "pods" && w.verb == "patch" && w.name == "op-b"))
        .collect();
    assert!(before_kill.is_empty(), "the follower wrote while op-a led: {before_kill:?}");

    let (_, transitions) = holder(&leases).await.unwrap();
    op_a.kill();
    let killed = Instant::now();
    eventually("op-b taking the Lease", LEASE + Duration::from_secs(10), || async {
        holder(&leases).await.filter(|(h, _)| h == "op-b")
    })
    .await;
    let handover = killed.elapsed();
    // The Lease expires LEASE after op-a's last renewal (at most 5 s before the kill); op-b
    // retries every 2 s.
    assert!(handover <= LEASE + Duration::from_secs(2), "handover took {handover:?}");
    assert_eq!(holder(&leases).await.unwrap().1, transitions + 1, "leaseTransitions not incremented");
    eprintln!("leader handover after kill -9: {:.1} s", handover.as_secs_f64());

    // The new leader reconciles: delete a Secret the operator owns and it comes back.
    secrets.delete("hub-eu-ech", &Default::default()).await.unwrap();
    eventually("op-b re-creating the ECH Secret", Duration::from_secs(60), || async {
        secrets.get_opt("hub-eu-ech").await.ok().flatten()
    })
    .await;
    let after = plane().audit_writes(&user_b);
    assert!(after.iter().any(|w| w.resource == "secrets" && w.name == "hub-eu-ech"), "op-b never wrote: {after:?}");
    assert!(op_b.rbac_refusals().is_empty(), "{}", op_b.logged());
}
