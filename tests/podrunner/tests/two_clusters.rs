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
    a.wait_for_secret("relayfed-system", "shop-ca").await;
    b.install_relayfed().await;
    b.copy_ca_from(&a, "shop-ca");
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
    let to_first_call = helm_start.elapsed();
    eprintln!(
        "first cross-cluster call {:.1} s after helm install ({:.1} s after the test began), answered by {}",
        to_first_call.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        ok.pod.as_deref().unwrap_or("?")
    );
    assert!(ok.pod.as_deref().unwrap_or_default().starts_with("catalog-"), "{ok:?}");
    a.assert_injected("shop", "client");

    // The path, as the client's sidecar traces it, and every hop's metrics.
    let trace = a.pod_get("shop", "client", 15090, "/federation/trace?service=catalog.shop&port=8080");
    for hop in ["main-a", "main-b"] {
        assert!(trace.contains(&format!("\"{hop}\"")), "the trace names {hop}: {trace}");
    }
    eprintln!("trace: {trace}");
    let hops = support::Hops::read(&a, &b);
    hops.assert_all_counted();

    // ECH to 100% in both clusters (what `kubectl edit rolloutpolicy default` does): every
    // node acknowledges the new config, then the relays see sealed route headers only.
    client.wait_for(WAIT, |calls| calls.iter().filter(|c| c.ok).count() >= 100).await;
    let versions = [a.config_versions().0, b.config_versions().0];
    let edited_ms = support::unix_ms();
    assert!(
        versions.iter().all(|v| v.len() >= 2),
        "each operator publishes for its relay and its injected pod: {versions:?}"
    );
    for c in [&a, &b] {
        c.patch_rollout_policy(r#"{"spec":{"ech":{"percentage":100}}}"#);
    }
    let edited_at = Instant::now();
    for (c, before) in [(&a, &versions[0]), (&b, &versions[1])] {
        c.wait_acknowledged(before).await;
    }
    eprintln!(
        "ECH 100% acknowledged by every node of both clusters {:.1} s after the edit",
        edited_at.elapsed().as_secs_f64()
    );
    let before = support::Hops::read(&a, &b);
    let ok_before = client.calls().iter().filter(|c| c.ok).count();
    client.wait_for(WAIT, |calls| calls.iter().filter(|c| c.ok).count() >= ok_before + 50).await;
    let after = support::Hops::read(&a, &b);
    for relay in ["main-a", "main-b"] {
        let plain = |h: &support::Hops| {
            support::metric(h.text(relay), "relayfed_relay_route_headers_total", &["envelope=\"plain\""])
                + support::metric(h.text(relay), "relayfed_relay_route_headers_total", &["envelope=\"grease\""])
        };
        let sealed = |h: &support::Hops| {
            support::metric(h.text(relay), "relayfed_relay_route_headers_total", &["envelope=\"sealed\""])
        };
        assert_eq!(plain(&after), plain(&before), "{relay} saw readable route headers after ECH went to 100%");
        assert!(
            sealed(&after) >= sealed(&before) + 50.0,
            "{relay}: sealed headers {} -> {}",
            sealed(&before),
            sealed(&after)
        );
    }
    let signed = support::metric(
        after.text("client sidecar (A)"),
        "relayfed_proxy_ech_signed_configs_total",
        &["result=\"accepted\""],
    );
    assert!(signed >= 1.0, "the client's sidecar sealed to main-b by its CA-signed config");

    // Latency across the clusters, from the client's own records (each call: DNS lookup, TCP
    // connect, a new stream through both relays with its Noise handshake, HTTP): 100 calls
    // before the edit (plain) and 100 after every node applied ECH 100%.
    let sealed_from = support::unix_ms();
    let calls = client.wait_for(WAIT, |calls| calls.iter().filter(|c| c.ok && c.t > sealed_from).count() >= 100).await;
    let plain: Vec<Call> = calls.iter().filter(|c| c.t < edited_ms).rev().take(100).cloned().collect();
    let sealed: Vec<Call> = calls.iter().filter(|c| c.t > sealed_from).take(100).cloned().collect();
    for (what, sample) in [("plain", &plain), ("ECH", &sealed)] {
        let (p50, p99) = support::percentiles(sample);
        eprintln!("call latency across clusters, {what}: p50 {p50:.2} ms, p99 {p99:.2} ms ({} calls)", sample.len());
    }

    // A's main relay pod deleted: its Deployment recreates it, the runner starts it, and the
    // client recovers.
    let killed_at = support::unix_ms();
    a.kubectl(&["-n", "relayfed-system", "delete", "pod", "-l", "relayfed.io/relay=main-a", "--wait=false"]);
    let recovered = client
        .wait_for(WAIT, |calls| {
            let after: Vec<&Call> = calls.iter().filter(|c| c.t > killed_at).collect();
            after.len() >= 20 && after.iter().rev().take(20).all(|c| c.ok)
        })
        .await;
    let after: Vec<&Call> = recovered.iter().filter(|c| c.t > killed_at).collect();
    let failed = after.iter().filter(|c| !c.ok).count();
    let last_failure = after.iter().filter(|c| !c.ok).map(|c| c.t).max();
    let recovery_ms = last_failure.map_or(0, |t| t.saturating_sub(killed_at));
    eprintln!(
        "main-a pod deleted: {failed} failed calls of {}, recovered {:.1} s after the delete; errors: {:?}",
        after.len(),
        recovery_ms as f64 / 1000.0,
        after.iter().filter_map(|c| c.error.as_deref()).take(3).collect::<Vec<_>>()
    );

    // Two catalog replicas: calls spread over both. The caller balances (in A). Its default,
    // peak-EWMA over two random candidates, sends sequential calls to whichever replica has
    // answered faster (with two replicas it always compares both), so a split is only even
    // by chance; round robin for catalog (a live RolloutPolicy edit) makes it a property.
    let before = a.config_versions().0;
    a.patch_rollout_policy(r#"{"spec":{"loadBalancing":{"perService":{"catalog.shop":"roundRobin"}}}}"#);
    a.wait_acknowledged(&before).await;
    b.kubectl(&["-n", "shop", "scale", "deployment", "catalog", "--replicas=2"]);
    let pods = b.wait_ready_count("shop", "app=catalog", 2).await;
    let scaled_at = support::unix_ms();
    // Once the client's sidecar has seen the second replica (its first answer), the next 100
    // calls must spread over both.
    let seen_both = |calls: &[Call]| {
        let mut names = std::collections::BTreeSet::new();
        calls.iter().filter(|c| c.t > scaled_at && c.ok).find_map(|c| {
            names.insert(c.pod.clone().unwrap_or_default());
            (names.len() >= 2).then_some(c.t)
        })
    };
    let spread = client
        .wait_for(WAIT, |calls| seen_both(calls).is_some_and(|t| calls.iter().filter(|c| c.t > t).count() >= 100))
        .await;
    let since = seen_both(&spread).unwrap();
    let mut per_pod = std::collections::BTreeMap::<String, usize>::new();
    for c in spread.iter().filter(|c| c.t > since).take(100) {
        *per_pod.entry(c.pod.clone().unwrap_or_else(|| "failed".into())).or_default() += 1;
    }
    for p in &pods {
        let name = p.metadata.name.clone().unwrap();
        let n = per_pod.get(&name).copied().unwrap_or(0);
        assert!(n >= 15, "replica {name} answered {n} of 100 calls: {per_pod:?}");
    }
    eprintln!("after scaling catalog to {} replicas, calls per pod: {per_pod:?}", pods.len());

    // Each layer broken on purpose: the calls fail, and the diagnosis names the layer.
    const CATALOG: &str = "http://catalog.shop.svc.cluster.local:8080/";
    a.kubectl(&["create", "namespace", "plain"]);
    a.run_client("plain", "bare", CATALOG);
    let bare = a.pod_log("plain", "bare", "app");
    let calls = bare.wait_for(WAIT, |calls| calls.len() >= 3).await;
    assert!(calls.iter().all(|c| !c.ok), "a pod without the sidecar reached catalog: {calls:?}");
    let why = a.diagnose("plain", "bare", CATALOG, None);
    assert!(why.starts_with("sidecar missing"), "{why}");
    eprintln!("no injection: {why}");

    let inventory = "http://inventory.shop.svc.cluster.local:8080/";
    a.run_client("shop", "lost", inventory);
    let lost = a.pod_log("shop", "lost", "app");
    let calls = lost.wait_for(WAIT, |calls| calls.len() >= 3).await;
    assert!(calls.iter().all(|c| c.error.as_deref().is_some_and(|e| e.starts_with("resolving"))), "{calls:?}");
    let why = a.diagnose("shop", "lost", inventory, None);
    assert!(why.starts_with("DNS name inventory.shop.svc.cluster.local does not resolve"), "{why}");
    eprintln!("no ServiceImport: {why}");

    // The link between the clusters cut: main-b is down as far as cluster A can tell.
    let baseline = a.pod_get("shop", "client", 15090, "/metrics");
    let cut_at = support::unix_ms();
    a.node.set_wan(false).unwrap();
    client.wait_for(WAIT, |calls| calls.iter().filter(|c| c.t > cut_at && !c.ok).count() >= 10).await;
    let why = a.diagnose("shop", "client", CATALOG, Some(&baseline));
    // The peer relay's entries are withdrawn once its link is declared dead: SERVICE_NOT_FOUND
    // (PEER_UNREACHABLE for streams in the second before), and main-a reports main-b down.
    assert!(why.starts_with("the relay path fails"), "{why}");
    assert!(why.contains("SERVICE_NOT_FOUND") || why.contains("PEER_UNREACHABLE"), "{why}");
    assert!(why.contains("peer main-b DOWN"), "{why}");
    eprintln!("relays cut off: {why}");
    let restored_at = support::unix_ms();
    a.node.set_wan(true).unwrap();
    let back = client
        .wait_for(WAIT, |calls| {
            let after: Vec<&Call> = calls.iter().filter(|c| c.t > restored_at).collect();
            after.len() >= 20 && after.iter().rev().take(20).all(|c| c.ok)
        })
        .await;
    let last_failure = back.iter().filter(|c| c.t > restored_at && !c.ok).map(|c| c.t).max();
    eprintln!(
        "link restored: calls succeed again {:.1} s later",
        last_failure.map_or(0, |t| t.saturating_sub(restored_at)) as f64 / 1000.0
    );

    support::report_rss(&[&a, &b]);
    support::hold(&[&a, &b]);
}

/// Two organisations on two control planes (issue 21): cluster A runs federation `shop`
/// (trust domain shop.example), cluster B federation `partner` (partner.example), each with
/// the CA its own operator created. Nothing is copied between them: each side reads the
/// other's public pin (`status.caKeyFingerprint` of its RelayFederation) and writes its own
/// Peer from `examples/partners/peer.yaml.template`. B lets A call `catalog*`; A lets B export
/// `catalog*`. The unmodified client pod in A calls catalog in B; B's `ledger`, exported in B
/// but not permitted, never reaches A's registry; with B's ServiceExport annotated
/// `relayfed.io/proxy-protocol: "true"`, catalog's app reads the caller's identity in A's
/// trust domain from a PROXY v2 header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_organisations_share_nothing_but_a_pinned_key() {
    let images = support::image_map();
    let (a, b) = Cluster::pair(&images);
    for (c, federation) in [(&a, "shop"), (&b, "partner")] {
        c.install_dns().await;
        c.install_relayfed_for(federation).await;
    }
    let dir = repo().join("examples/two-organisations");
    a.apply(&dir.join("cluster-a/10-federation.yaml"));
    b.apply(&dir.join("cluster-b/10-federation.yaml"));
    async fn pin(c: &Cluster, fed: &str) -> String {
        let path = "jsonpath={.status.caKeyFingerprint}";
        c.eventually(&format!("{fed}'s CA key fingerprint"), || {
            let out = c.kubectl(&["-n", "relayfed-system", "get", "relayfederation", fed, "-o", path]);
            async move { out.starts_with("sha256:").then_some(out) }
        })
        .await
    }
    let (pin_a, pin_b) = (pin(&a, "shop").await, pin(&b, "partner").await);
    assert_ne!(pin_a, pin_b, "two organisations, two CAs");
    for (c, other) in [(&a, "partner-ca"), (&b, "shop-ca")] {
        let held = c.plane.kubectl(&["-n", "relayfed-system", "get", "secret", other]).unwrap();
        assert!(!held.ok, "cluster {} holds the other organisation's CA Secret {other}", c.name);
    }
    let template = std::fs::read_to_string(repo().join("examples/partners/peer.yaml.template")).unwrap();
    let peer = |c: &Cluster, fields: [(&str, &str); 8]| {
        let text = fields.iter().fold(template.clone(), |t, (k, v)| t.replace(&format!("${{{k}}}"), v));
        let file = c.plane.dir.join("30-peer.yaml");
        std::fs::write(&file, text).unwrap();
        c.apply(&file);
    };
    peer(
        &a,
        [
            ("NAME", "partner"),
            ("NODE", "main-b"),
            ("LOCAL", "main-a"),
            ("DOMAIN", "partner.example"),
            ("ENDPOINT", "192.168.242.1:4433"),
            ("FINGERPRINT", &pin_b),
            ("CALL", ""),
            ("EXPORT", "\"catalog*\""),
        ],
    );
    peer(
        &b,
        [
            ("NAME", "shop"),
            ("NODE", "main-a"),
            ("LOCAL", "main-b"),
            ("DOMAIN", "shop.example"),
            ("ENDPOINT", "192.168.241.1:4433"),
            ("FINGERPRINT", &pin_a),
            ("CALL", "\"catalog*\""),
            ("EXPORT", ""),
        ],
    );
    for (c, relay) in [(&a, "main-a"), (&b, "main-b")] {
        c.assign_load_balancer(relay, &c.node.lb_address(1)).await;
        c.wait_ready("relayfed-system", &format!("app.kubernetes.io/name=relayfed-relay,relayfed.io/relay={relay}"))
            .await;
    }
    // catalog, and `ledger` (another Service of catalog's pods, exported in B but not
    // permitted to A) in the same apply: a pod's exports are fixed when its sidecar starts.
    let catalog = std::fs::read_to_string(repo().join("examples/two-clusters/cluster-b/20-catalog.yaml")).unwrap();
    let workloads = b.plane.dir.join("20-catalog-and-ledger.yaml");
    std::fs::write(
        &workloads,
        format!(
            "{catalog}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: ledger, namespace: shop}}\n\
             spec: {{selector: {{app: catalog}}, ports: [{{name: http, port: 8080, targetPort: http}}]}}\n---\n\
             apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: ledger, namespace: shop}}\nspec: {{}}\n"
        ),
    )
    .unwrap();
    b.apply(&workloads);
    b.wait_ready("shop", "app=catalog").await;

    // The partner's catalog reaches A's relay (what `kubectl get rfed` counts as services).
    a.eventually("catalog.shop from the partner at main-a", || async {
        let registry = a.pod_get("relayfed-system", "main-a-", 9901, "/federation/registry");
        registry.contains("\"catalog.shop\"").then_some(())
    })
    .await;
    a.apply(&repo().join("examples/two-clusters/cluster-a/20-client.yaml"));
    let client = a.pod_log("shop", "client", "app");
    let calls = client.wait_for(WAIT, |calls| calls.iter().filter(|c| c.ok).count() >= 20).await;
    let ok = calls.iter().find(|c| c.ok).unwrap();
    assert!(ok.pod.as_deref().unwrap_or_default().starts_with("catalog-"), "{ok:?}");
    eprintln!("two organisations: {} calls from shop (A) answered by partner's catalog (B)", calls.len());

    let peers = a.pod_get("relayfed-system", "main-a-", 9901, "/federation/peers");
    assert!(peers.contains("partner.example"), "main-a shows its peering with the partner: {peers}");
    b.eventually("ledger registered at main-b", || async {
        b.pod_get("relayfed-system", "main-b-", 9901, "/federation/registry").contains("\"ledger.shop\"").then_some(())
    })
    .await;
    let registry_a = a.pod_get("relayfed-system", "main-a-", 9901, "/federation/registry");
    assert!(registry_a.contains("catalog.shop"), "{registry_a}");
    assert!(!registry_a.contains("ledger"), "the partner's ledger is not ours to see: {registry_a}");

    // The partner's catalog opts in to the caller's identity (its ServiceExport's annotation):
    // its app reads, from a PROXY v2 header its sidecar writes, who in the other organisation
    // calls, as the Noise session authenticated it (no relay of either side can forge it).
    // Like exports, it reaches a pod when the pod restarts: once the operator has published
    // it for catalog's pod, the pod is replaced.
    let before: std::collections::BTreeMap<String, f64> =
        b.config_versions().0.into_iter().filter(|(node, _)| node.contains("catalog")).collect();
    assert!(!before.is_empty(), "catalog's pod has a published config");
    b.kubectl(&["-n", "shop", "annotate", "serviceexport", "catalog", "relayfed.io/proxy-protocol=true"]);
    b.wait_acknowledged(&before).await;
    b.kubectl(&["-n", "shop", "delete", "pod", "-l", "app=catalog", "--wait=false"]);
    let annotated = support::unix_ms();
    let calls = client.wait_for(WAIT, |calls| calls.iter().any(|c| c.t > annotated && c.caller.is_some())).await;
    let seen = calls.iter().find(|c| c.t > annotated && c.caller.is_some()).unwrap();
    let caller = seen.caller.as_deref().unwrap_or_default();
    assert!(caller.starts_with("relayfed://shop.example/"), "{seen:?}");
    let after: Vec<&Call> = calls.iter().filter(|c| c.t > seen.t).collect();
    assert!(after.iter().all(|c| c.ok), "calls fail once the header is on: {after:?}");
    eprintln!("two organisations: partner's catalog sees its caller as {caller}");
    support::hold(&[&a, &b]);
}
