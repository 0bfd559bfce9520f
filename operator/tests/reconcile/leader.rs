//! Lease leader election: create, renew, follow, take over an expired term, lose a race.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use relayfed_operator::k8s::leader::Elector;
use serde_json::json;

use super::{FakeApi, NS, t0};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/relayfed-system/leases/relayfed-operator";

fn elector(client: kube::Client, me: &str) -> Elector {
    Elector::new(Api::<Lease>::namespaced(client, NS), "relayfed-operator", me, Duration::from_secs(15))
}

fn held_by(holder: &str, renewed: &str) -> serde_json::Value {
    json!({"metadata": {"name": "relayfed-operator"}, "spec": {
        "holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 3,
        "acquireTime": "2026-11-21T23:00:00.000000Z", "renewTime": renewed}})
}

#[tokio::test]
async fn the_first_candidate_creates_the_lease_and_then_renews_it() {
    let (client, api) = FakeApi::client();
    let a = elector(client, "op-a");
    assert!(a.try_lead(t0()).await.unwrap());
    assert_eq!(
        api.lines(),
        vec![format!("GET {LEASE}"), format!("POST {}", LEASE.trim_end_matches("/relayfed-operator"))]
    );
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "op-a");
    assert_eq!(lease["spec"]["leaseTransitions"], 0);
    assert!(a.try_lead(t0() + Duration::from_secs(5)).await.unwrap());
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["renewTime"], "2026-11-22T00:00:05.000000Z");
    assert_eq!(api.lines()[3], format!("PUT {LEASE}"));
}

#[tokio::test]
async fn a_current_holder_is_followed_and_an_expired_one_replaced() {
    let (client, api) = FakeApi::client();
    api.seed(LEASE, held_by("op-a", "2026-11-21T23:59:50.000000Z"));
    let b = elector(client, "op-b");
    // Renewed 10 s ago, 15 s term: op-a still leads; op-b writes nothing.
    assert!(!b.try_lead(t0()).await.unwrap());
    assert_eq!(api.lines(), vec![format!("GET {LEASE}")]);
    // 6 s later the term is over: op-b takes over, counting the transition.
    assert!(b.try_lead(t0() + Duration::from_secs(6)).await.unwrap());
    let lease = api.get(LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "op-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 4);
}

#[tokio::test]
async fn losing_a_race_for_the_lease_means_following() {
    let (client, api) = FakeApi::client();
    api.seed(LEASE, held_by("op-a", "2026-11-21T23:00:00.000000Z"));
    api.0.lock().unwrap().conflict_on_put.push(LEASE.to_owned());
    let b = elector(client, "op-b");
    assert!(!b.try_lead(t0()).await.unwrap(), "a 409 on the update means another candidate won");
    assert_eq!(api.get(LEASE).unwrap()["spec"]["holderIdentity"], "op-a");
}
