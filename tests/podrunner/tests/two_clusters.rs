//! Two clusters on one machine, end to end (`make e2e`): each a real control plane in its own
//! node network namespace, with the real kube-proxy (iptables mode), the real CoreDNS as a pod,
//! and relayfed-pod-runner as its node; relayfed installed with the real helm CLI from the
//! chart, the federation applied with kubectl. An unmodified client pod in cluster A calls
//! `http://catalog.shop.svc.cluster.local:8080/`, served by the catalog Deployment of cluster
//! B, through A's injected sidecar (iptables from the init container), A's main relay, B's main
//! relay and B's sidecar. The main relays are reached across clusters at LoadBalancer
//! addresses the test assigns (a LoadBalancer controller's part) and routes over a veth.
//!
//! Needs root, `make images` (RELAYFED_IMAGES) and the control plane (RELAYFED_CLUSTER_BIN).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod support;

use std::time::{Duration, Instant};

use support::{Call, Cluster, repo};

const WAIT: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_pod_calls_a_service_in_the_other_cluster() {
    let t0 = Instant::now();
    let images = support::image_map();
    let (a, b) = Cluster::pair(&images);
    for c in [&a, &b] {
        c.install_dns().await;
    }
    let helm_start = Instant::now();
    a.install_relayfed().await;
    // One federation, one trust domain: cluster A's operator creates the CA, cluster B gets a
    // copy before its federation exists (as Linkerd and Istio multicluster share a trust root).
    a.apply(&repo().join("examples/two-clusters/cluster-a/10-federation.yaml"));
    let ca = a.wait_for_secret("relayfed-system", "shop-ca").await;
    b.install_relayfed().await;
    b.copy_secret_from(&ca);
    b.apply(&repo().join("examples/two-clusters/cluster-b/10-federation.yaml"));
    for (c, relay) in [(&a, "main-a"), (&b, "main-b")] {
        c.assign_load_balancer(relay, &c.node.lb_address(1)).await;
        c.wait_ready("relayfed-system", &format!("app.kubernetes.io/name=relayfed-relay,relayfed.io/relay={relay}"))
            .await;
    }
    b.apply(&repo().join("examples/two-clusters/cluster-b/20-catalog.yaml"));
    b.wait_ready("shop", "app=catalog").await;
    a.apply(&repo().join("examples/two-clusters/cluster-a/20-client.yaml"));
    let client = a.pod_log("shop", "client", "app");
    let first = client.wait_for(WAIT, |calls| calls.iter().any(|c| c.ok)).await;
    let ok = first.iter().find(|c| c.ok).unwrap();
    eprintln!(
        "first cross-cluster call {:.1} s after helm install ({:.1} s after the test began), answered by {}",
        helm_start.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        ok.pod.as_deref().unwrap_or("?")
    );
    assert!(ok.pod.as_deref().unwrap_or_default().starts_with("catalog-"), "{ok:?}");
    support::report_rss(&[&a, &b]);
    let _: Vec<Call> = first;
}
