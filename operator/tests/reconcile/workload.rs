//! Injected pods end to end, with real sidecar processes: the operator's informer caches hold
//! two injected pods, an exported Service and a ServiceImport; the plan gives each pod a home
//! snapshot; each sidecar (`relayfed-proxy workload`, what the webhook injects) obtains its certificate from the certificate server (TokenReview over the mock
//! API), fetches its snapshot, connects to a real main relay and registers the exported
//! service; a RolloutPolicy edit in the operator's store is acknowledged by every sidecar; a
//! short-lived certificate is renewed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use relayfed_crds::{AnyResource, Peer, Relay, RelayFederation, RelayStatus, RolloutPolicy};
use relayfed_e2e::Testbed;
use relayfed_e2e::procs::{Proc, eventually};
use relayfed_operator::distribution::Distributor;
use relayfed_operator::identity::{self, IdentityServer};
use relayfed_operator::k8s::services::{ImportPort, ServiceExport, ServiceImport, ServiceImportSpec};
use relayfed_operator::k8s::{Context, Settings, Stores, replan::replan};
use relayfed_operator::metrics::OperatorMetrics;
use relayfed_sidecar::crypto::ca::{FederationCa, node_id_from_cert, parse_cert_pem};
use relayfed_sidecar::transport::tls::HopIdentity;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::{FakeApi, NS, example};

const BIN: &str = env!("CARGO_BIN_EXE_relayfed");
const TD: &str = "acme.example";

fn store<K>(objs: Vec<K>) -> (Store<K>, reflector::store::Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store::<K>();
    for o in objs {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    (reader, writer)
}

fn pod(name: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": labels,
                     "annotations": {"relayfed.io/status": "injected"}},
        "spec": {"containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"phase": "Running"},
    }))
    .unwrap()
}

/// A certificate server whose TokenReview answers for `pod` in namespace `shop`.
async fn cert_server(
    ca: &FederationCa,
    pod: &str,
    validity: Duration,
    serving: &(String, String),
) -> (Arc<IdentityServer>, String) {
    let (client, api) = FakeApi::client();
    api.0.lock().unwrap().post_replies.insert(
        "/apis/authentication.k8s.io/v1/tokenreviews".into(),
        json!({"status": {"authenticated": true, "audiences": ["relayfed"], "user": {
            "username": "system:serviceaccount:shop:default",
            "extra": {"authentication.kubernetes.io/pod-name": [pod]}}}}),
    );
    let ca = FederationCa::from_pem(TD, &ca.certified_key().cert_pem, &ca.certified_key().key_pem).unwrap();
    let server =
        Arc::new(IdentityServer { client, ca: Arc::new(ca), metrics: Arc::new(OperatorMetrics::new()), validity });
    let addr = server.clone().serve("127.0.0.1:0".parse().unwrap(), &serving.0, &serving.1).await.unwrap();
    (server, addr.to_string())
}

/// Starts `relayfed workload` for a pod whose runtime and token volumes are `dir`; returns
/// the process and its ready line.
async fn sidecar(
    dir: &Path,
    ca_file: &Path,
    identity: &str,
    config: &str,
) -> (tokio::process::Child, serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("token"), "a-projected-token\n").unwrap();
    std::fs::write(dir.join("trust-domain"), TD).unwrap();
    let mut child = tokio::process::Command::new(relayfed_e2e::procs::proxy_next_to(Path::new(BIN)))
        .args(["workload", "--identity-server", identity, "--config-server", config, "--dir"])
        .arg(dir.join("run"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .arg("--ca-file")
        .arg(ca_file)
        .arg("--trust-domain-file")
        .arg(dir.join("trust-domain"))
        .env("RELAYFED_LOG", std::env::var("RELAYFED_LOG").unwrap_or_else(|_| "error".into()))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("sidecar not ready in 60 s")
        .unwrap()
        .expect("sidecar exited before it was ready");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, serde_json::from_str(&line).unwrap())
}

async fn all_acked(dist: &Distributor, nodes: &[String]) -> bool {
    let (versions, acks) = (dist.versions(), dist.acks());
    nodes.iter().all(|n| versions.get(n).is_some_and(|v| acks.get(n).map(|a| a.version) == Some(*v)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_sidecars_get_certificates_and_snapshots_follow_policy_edits_and_renew() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tb = Testbed::new(TD).unwrap();
    // A real main relay under hub-eu's node id, the first main relay of the example federation.
    let hub = Proc::start_bin(
        &relayfed_e2e::procs::proxy_next_to(Path::new(BIN)),
        "main-relay",
        &tb.main_relay("hub-eu", 1).unwrap(),
        &[],
    )
    .await;

    // The informer caches: the example CRs (hub-eu's status naming the real relay), two
    // injected pods, an exported Service backed by one of them, an imported service.
    let mut feds = vec![];
    let mut relays = vec![];
    let mut policies = vec![];
    for r in example() {
        match r {
            AnyResource::Federation(f) => feds.push(*f),
            AnyResource::Relay(mut x) => {
                if x.spec.node_id == "hub-eu" {
                    x.status = Some(RelayStatus {
                        endpoint: Some(hub.quic().to_string()),
                        ech_config_list: hub.ready["echConfigList"].as_str().map(str::to_owned),
                        ..Default::default()
                    });
                }
                relays.push(*x)
            }
            AnyResource::RolloutPolicy(p) => policies.push(*p),
            AnyResource::Peer(_) => {}
        }
    }
    let web: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }))
    .unwrap();
    let mut export = ServiceExport::new("web", Default::default());
    export.metadata.namespace = Some("shop".into());
    let mut import = ServiceImport::new(
        "pay",
        ServiceImportSpec {
            type_: Some("ClusterSetIP".into()),
            ports: vec![ImportPort { name: None, port: 443, protocol: None }],
            ips: vec!["10.96.0.50".into()],
        },
    );
    import.metadata.namespace = Some("shop".into());
    let (policy_store, mut policy_writer) = store::<RolloutPolicy>(policies);
    let stores = Stores {
        federations: store::<RelayFederation>(feds).0,
        relays: store::<Relay>(relays).0,
        peers: store::<Peer>(vec![]).0,
        policies: policy_store.clone(),
        pods: store(vec![pod("web-1", json!({"app": "web"})), pod("client-1", json!({"app": "client"}))]).0,
        services: store(vec![web]).0,
        exports: store(vec![export]).0,
        imports: store(vec![import]).0,
    };
    let mut settings = Settings::default();
    settings.workloads.federation = format!("{NS}/acme");
    // Two sidecars share this machine: ephemeral outbound and admin ports.
    settings.workloads.intercept.outbound_port = 0;
    settings.workloads.admin_port = 0;
    let metrics = Arc::new(OperatorMetrics::new());
    let dist = Distributor::new(metrics.clone(), 0);
    let (client, _api) = FakeApi::client();
    let ctx = Context::new(client, settings, metrics, stores, dist.clone(), Arc::new(std::time::SystemTime::now));

    // The plan: one home snapshot per pod, the export on the pod that backs the Service.
    let plan = replan(&ctx, NS, "acme").unwrap();
    let node = |pod: &str| {
        identity::node_id_for(&identity::Workload {
            namespace: "shop".into(),
            service_account: "default".into(),
            pod: pod.into(),
        })
    };
    let (web_node, client_node) = (node("web-1"), node("client-1"));
    let web_snap = &plan.snapshots[&web_node];
    assert_eq!(web_snap.exports.len(), 1);
    assert_eq!((web_snap.exports[0].service.as_str(), web_snap.exports[0].port), ("web.shop", 80));
    assert_eq!(web_snap.exports[0].target, "127.0.0.1:8080".parse().unwrap(), "named targetPort resolved");
    assert!(plan.snapshots[&client_node].exports.is_empty());
    let imp = &plan.snapshots[&client_node].imports;
    assert_eq!(imp.len(), 1);
    assert_eq!((imp[0].service.as_str(), imp[0].cluster_ip), ("pay.shop", Some("10.96.0.50:443".parse().unwrap())));
    assert_eq!(web_snap.main_relays[0].node_id, "hub-eu");
    assert_eq!(web_snap.main_relays[0].endpoint, hub.quic());
    assert!(plan.snapshots["hub-eu"].trust.known_nodes.contains(&web_node), "relays know injected pods");

    // The operator's servers, with a certificate from the federation CA.
    let issued = tb.ca.issue("relayfed-operator", Duration::from_secs(3600)).unwrap();
    let serving = (issued.cert_pem.clone(), issued.key_pem.clone());
    let server_id = HopIdentity::from_pem(
        TD,
        "relayfed-operator",
        &tb.ca.certified_key().cert_pem,
        &issued.cert_pem,
        &issued.key_pem,
    )
    .unwrap();
    let config = dist.clone().serve("127.0.0.1:0".parse().unwrap(), &server_id).await.unwrap().to_string();
    // web-1's certificates live 9 s (renewed after 6 s); client-1's a day.
    let (web_ids, web_id_addr) = cert_server(&tb.ca, "web-1", Duration::from_secs(9), &serving).await;
    let (_client_ids, client_id_addr) = cert_server(&tb.ca, "client-1", identity::CERT_VALIDITY, &serving).await;

    let root: PathBuf = tb.dir.join("pods");
    let ca_file = tb.dir.join("ca.pem");
    let (_web, web_ready) = sidecar(&root.join("web-1"), &ca_file, &web_id_addr, &config).await;
    let (_client, client_ready) = sidecar(&root.join("client-1"), &ca_file, &client_id_addr, &config).await;
    assert_eq!(web_ready["node"], web_node.as_str());
    assert_eq!(client_ready["node"], client_node.as_str());
    let nodes = vec![web_node.clone(), client_node.clone()];
    eventually("both sidecars acknowledge their snapshot", Duration::from_secs(30), || all_acked(&dist, &nodes)).await;

    // The exported service is registered at the main relay by the pod that backs it.
    eventually("web.shop registered at hub-eu", Duration::from_secs(10), || async {
        let reg = hub.json("/federation/registry").await.to_string();
        reg.contains("web.shop") && reg.contains(&web_node)
    })
    .await;

    // A RolloutPolicy edit in the operator's store reaches every sidecar.
    let before = dist.versions();
    let mut edited =
        policy_store.state().iter().find(|p| p.metadata.name.as_deref() == Some("default")).unwrap().as_ref().clone();
    edited.spec.ech.percentage = if edited.spec.ech.percentage == 50 { 75 } else { 50 };
    let pct = edited.spec.ech.percentage;
    policy_writer.apply_watcher_event(&watcher::Event::Apply(edited));
    replan(&ctx, NS, "acme").unwrap();
    let after = dist.versions();
    for n in &nodes {
        assert!(after[n] > before[n], "{n} got a new version");
        assert_eq!(dist.snapshot(n).unwrap().ech_policy.percentage, pct);
    }
    eventually("both sidecars acknowledge the edit", Duration::from_secs(30), || all_acked(&dist, &nodes)).await;

    // web-1's certificate is renewed before it expires, for the same node.
    let cert_file = root.join("web-1/run/tls.pem");
    let first = std::fs::read_to_string(&cert_file).unwrap();
    eventually("web-1 renews its certificate", Duration::from_secs(20), || async {
        web_ids.metrics.certificates_issued.get_or_create(&[("kind", "workload")]).get() >= 2
            && std::fs::read_to_string(&cert_file).is_ok_and(|c| c != first)
    })
    .await;
    let renewed = std::fs::read_to_string(&cert_file).unwrap();
    assert_eq!(node_id_from_cert(&parse_cert_pem(&renewed).unwrap(), TD).unwrap(), web_node);
}
