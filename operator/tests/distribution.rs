//! The config distribution server over real TLS: a subscriber gets its snapshot at once and
//! every newer version as it is published, acks are tracked per node, only changed nodes get
//! a new version, and a certificate for another node is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relayfed_operator::distribution::Distributor;
use relayfed_operator::metrics::OperatorMetrics;
use relayfed_sidecar::admin::metrics::Metrics;
use relayfed_sidecar::distribution::client::Subscription;
use relayfed_sidecar::distribution::{Ack, AckResult};

fn applied(version: u64) -> Ack {
    Ack { version, result: AckResult::Applied, restart_required: vec![], detail: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_follow_published_versions_and_ack_them() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = common::Pki::new();
    let metrics = Arc::new(OperatorMetrics::new());
    let dist = Distributor::new(metrics.clone(), 0);
    let addr = dist.clone().serve("127.0.0.1:0".parse().unwrap(), &pki.identity("relayfed-operator")).await.unwrap();
    let mut plan: BTreeMap<String, _> = ["a", "b"].iter().map(|n| (n.to_string(), common::home(n, 0))).collect();
    assert_eq!(dist.publish(&plan), ["a", "b"]);

    // Node "a" subscribes from scratch and records every percentage it is given.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let sub = Subscription {
        server: addr.to_string(),
        server_node: "relayfed-operator".into(),
        identity: pki.identity("a").into(),
        wait_seconds: 5,
        reports: None,
    };
    let task = tokio::spawn(sub.run(0, Arc::new(Metrics::new()), move |snap| {
        s.lock().unwrap().push((snap.version, snap.ech_policy.percentage));
        applied(snap.version)
    }));
    let wait_ack = |node: &'static str, version: u64| {
        let dist = dist.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while dist.acks().get(node).map(|a| a.version) != Some(version) {
                assert!(tokio::time::Instant::now() < deadline, "{node} did not ack v{version}: {:?}", dist.acks());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_ack("a", 1).await;

    // An edit that changes only "a" gives only "a" a new version, delivered by the long-poll.
    plan.get_mut("a").unwrap().ech_policy.percentage = 25;
    assert_eq!(dist.publish(&plan), ["a"]);
    assert_eq!(dist.versions(), BTreeMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)]));
    wait_ack("a", 2).await;
    // Publishing the same plan again changes nothing.
    assert!(dist.publish(&plan).is_empty());
    plan.get_mut("a").unwrap().ech_policy.percentage = 100;
    dist.publish(&plan);
    wait_ack("a", 3).await;
    assert_eq!(*seen.lock().unwrap(), [(1, 0), (2, 25), (3, 100)]);
    let text = metrics.encode();
    assert!(text.contains("relayfed_operator_config_acknowledged_version{node=\"a\"} 3"), "{text}");
    assert!(text.contains("relayfed_operator_config_published_version{node=\"b\"} 1"), "{text}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_read_another_nodes_snapshot() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = common::Pki::new();
    let metrics = Arc::new(OperatorMetrics::new());
    let dist = Distributor::new(metrics.clone(), 0);
    let addr = dist.clone().serve("127.0.0.1:0".parse().unwrap(), &pki.identity("relayfed-operator")).await.unwrap();
    dist.publish(&BTreeMap::from([("a".to_owned(), common::home("a", 0))]));
    // "b" presents its own certificate but asks for "a": the server answers 403, nothing is
    // delivered, and the refusal is counted.
    let got = Arc::new(Mutex::new(0));
    let g = got.clone();
    // A certificate for "b" asking for "a"'s snapshot.
    let mut impostor = pki.identity("b");
    impostor.node_id = "a".into();
    let sub = Subscription {
        server: addr.to_string(),
        server_node: "relayfed-operator".into(),
        identity: impostor.into(),
        wait_seconds: 1,
        reports: None,
    };
    let task = tokio::spawn(sub.run(0, Arc::new(Metrics::new()), move |snap| {
        *g.lock().unwrap() += 1;
        applied(snap.version)
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !metrics.encode().contains("relayfed_operator_config_refusals_total{reason=\"wrong_node\"}") {
        assert!(tokio::time::Instant::now() < deadline, "no refusal counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(*got.lock().unwrap(), 0);
    assert!(dist.acks().is_empty());
    task.abort();
}

#[test]
fn an_ack_for_a_version_never_published_is_refused_and_not_reported() {
    let metrics = Arc::new(OperatorMetrics::new());
    let dist = Distributor::new(metrics.clone(), 0);
    dist.publish(&BTreeMap::from([("a".to_owned(), common::home("a", 0))]));
    let published = dist.versions()["a"];
    let err = dist.record_ack("a", applied(999_999)).unwrap_err();
    assert!(err.contains("999999") && err.contains(&published.to_string()), "{err}");
    assert!(dist.record_ack("b", applied(1)).is_err(), "nothing is published for b");
    assert!(dist.acks().is_empty(), "a refused ack must not show in status: {:?}", dist.acks());
    assert!(metrics.encode().contains("relayfed_operator_config_refusals_total{reason=\"unknown_version\"} 2"));
    dist.record_ack("a", applied(published)).unwrap();
    assert_eq!(dist.acks()["a"].version, published);
}
