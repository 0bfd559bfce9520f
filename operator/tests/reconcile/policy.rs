//! `RolloutPolicy` and `Peer`: validated, folded into the plan, reported in `Applied`.

use std::sync::Arc;

use relayfed_crds::AnyResource;
use relayfed_operator::k8s::policy::{reconcile_peer, reconcile_policy};

use super::{Scenario, example, t0};

const POLICY_STATUS: &str = "/apis/relayfed.io/v1alpha1/namespaces/relayfed-system/rolloutpolicies/default/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/relayfed-system/events";

fn with_percentage(p: u8) -> (Vec<AnyResource>, relayfed_crds::RolloutPolicy) {
    let mut crs = example();
    let mut policy = None;
    for r in crs.iter_mut() {
        if let AnyResource::RolloutPolicy(x) = r {
            x.spec.ech.percentage = p;
            x.metadata.generation = Some(2);
            policy = Some((**x).clone());
        }
    }
    (crs, policy.unwrap())
}

#[tokio::test]
async fn an_edited_policy_is_published_to_every_node_and_reported_applied() {
    let (crs, policy) = with_percentage(40);
    let s = Scenario::new(&crs, t0());
    reconcile_policy(Arc::new(policy), s.ctx.clone()).await.unwrap();
    for node in ["hub-eu", "hub-us", "shop-eu", "pay-us"] {
        assert_eq!(s.ctx.distributor.snapshot(node).unwrap().ech_policy.percentage, 40, "{node}");
    }
    assert_eq!(s.api.lines(), vec![format!("POST {EVENTS}"), format!("PATCH {POLICY_STATUS}")]);
    assert_eq!(s.api.events(), vec![("Normal".into(), "Applied".into())]);
    let status = &s.api.calls()[1].body["status"];
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["effectivePercentage"], 40);
    assert_eq!(status["conditions"][0]["type"], "Applied");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert_eq!(status["conditions"][0]["message"], "in force in federation acme");
    // Reconciling the same policy again changes nothing and publishes no new version.
    let before = s.ctx.distributor.versions();
    s.api.clear_calls();
    let again = s.api.get(POLICY_STATUS.trim_end_matches("/status")).unwrap();
    let mut p2 = with_percentage(40).1;
    p2.status = serde_json::from_value(again["status"].clone()).unwrap();
    reconcile_policy(Arc::new(p2), s.ctx.clone()).await.unwrap();
    assert_eq!(s.ctx.distributor.versions(), before);
    assert!(s.api.events().is_empty(), "no repeated Applied event");
}

#[tokio::test]
async fn an_invalid_policy_is_rejected_with_the_field_and_nothing_is_published() {
    let (crs, mut policy) = with_percentage(30);
    // Whitelist and blacklist naming the same node: a semantic error.
    policy.spec.ech.whitelist = vec!["shop-eu".into()];
    policy.spec.ech.blacklist = vec!["shop-eu".into()];
    let s = Scenario::new(&crs, t0());
    reconcile_policy(Arc::new(policy), s.ctx.clone()).await.unwrap();
    assert!(s.ctx.distributor.versions().is_empty(), "nothing published for an invalid policy");
    assert_eq!(s.api.events(), vec![("Warning".into(), "Invalid".into())]);
    let st = s.api.calls().into_iter().find(|c| c.path == POLICY_STATUS).unwrap().body;
    let cond = &st["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("Invalid")));
    assert!(cond["message"].as_str().unwrap().contains("spec.ech"), "{cond}");
    assert!(st["status"]["effectivePercentage"].is_null());
}

#[tokio::test]
async fn a_peer_is_folded_into_its_main_relays_peers() {
    let crs = example();
    let peer = crs
        .iter()
        .find_map(|r| match r {
            AnyResource::Peer(p) if p.spec.endpoints.iter().any(|e| e.parse::<std::net::SocketAddr>().is_ok()) => {
                Some((**p).clone())
            }
            _ => None,
        })
        .unwrap();
    let name = peer.metadata.name.clone().unwrap();
    let path = format!("/apis/relayfed.io/v1alpha1/namespaces/relayfed-system/peers/{name}");
    let s = Scenario::new(&crs, t0());
    reconcile_peer(Arc::new(peer.clone()), s.ctx.clone()).await.unwrap();
    let local = peer.spec.local_relay.clone().unwrap_or_else(|| "hub-eu".into());
    let snap = s.ctx.distributor.snapshot(&local).unwrap();
    assert!(snap.peers.iter().any(|p| p.node_id == peer.spec.node_id), "{:?}", snap.peers);
    let st = s.api.calls().into_iter().find(|c| c.path == format!("{path}/status")).unwrap().body;
    assert_eq!(st["status"]["conditions"][0]["status"], "True", "{st}");
}

#[tokio::test]
async fn another_federation_reusing_node_ids_never_reaches_the_served_one() {
    // The example federation (served) at 40%, and a copy of it in another namespace at 42%:
    // the same node ids, a key ("aaa/acme") that sorts first.
    let (mut crs, _) = with_percentage(40);
    let (other, _) = with_percentage(42);
    for mut r in other {
        let meta = match &mut r {
            AnyResource::Federation(x) => &mut x.metadata,
            AnyResource::Relay(x) => &mut x.metadata,
            AnyResource::Peer(x) => &mut x.metadata,
            AnyResource::RolloutPolicy(x) => &mut x.metadata,
        };
        meta.namespace = Some("aaa".into());
        meta.uid = meta.uid.as_ref().map(|u| format!("other-{u}"));
        crs.push(r);
    }
    let s = Scenario::new(&crs, t0());
    relayfed_operator::k8s::replan::replan(&s.ctx, "aaa", "acme").unwrap();
    relayfed_operator::k8s::replan::replan(&s.ctx, "relayfed-system", "acme").unwrap();
    for node in ["hub-eu", "shop-eu"] {
        assert_eq!(s.ctx.distributor.snapshot(node).unwrap().ech_policy.percentage, 40, "{node}");
    }
}
