//! `Relay`: finalizer first, then identity and ECH Secrets, config, Deployment, Service, PDB
//! and status; ECH keys rotated when due with the previous key kept for the grace period;
//! deletion withdraws the node and removes the finalizer.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use relayfed_crds::{AnyResource, Relay};
use relayfed_operator::k8s::relay::reconcile;
use relayfed_operator::k8s::{FIELD_MANAGER, FINALIZER};
use relayfed_sidecar::config::keys::EchKeyFile;
use relayfed_sidecar::crypto::ca::FederationCa;
use relayfed_sidecar::protocol::ech_config::EchConfigList;
use serde_json::{Value, json};

use super::{Scenario, example, relay, t0};

const BASE: &str = "/api/v1/namespaces/relayfed-system";
const APPS: &str = "/apis/apps/v1/namespaces/relayfed-system";
const RELAYS: &str = "/apis/relayfed.io/v1alpha1/namespaces/relayfed-system/relays";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/relayfed-system/events";

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()
}

/// The example with hub-eu carrying our finalizer, plus the federation CA in the API.
fn ready_scenario(now: std::time::SystemTime) -> (Scenario, Relay) {
    let mut crs = example();
    for r in crs.iter_mut() {
        if let AnyResource::Relay(x) = r {
            x.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
    }
    let s = Scenario::new(&crs, now);
    let ca = FederationCa::generate("acme.example").unwrap();
    s.api.seed(
        &format!("{BASE}/secrets/acme-ca"),
        json!({"metadata": {"name": "acme-ca"}, "data": {
            "ca.crt": b64(ca.certified_key().cert_pem.as_bytes()), "ca.key": b64(ca.certified_key().key_pem.as_bytes())}}),
    );
    (s, relay(&crs, "hub-eu"))
}

fn ech_file(s: &Scenario) -> (EchKeyFile, String) {
    let secret = s.api.get(&format!("{BASE}/secrets/hub-eu-ech")).unwrap();
    let file: EchKeyFile = serde_json::from_slice(&unb64(&secret["data"]["hub-eu-ech.json"])).unwrap();
    let since = secret["metadata"]["annotations"]["relayfed.io/ech-current-since"].as_str().unwrap().to_owned();
    (file, since)
}

#[tokio::test]
async fn a_new_relay_first_gets_the_finalizer_and_nothing_else() {
    let crs = example();
    let s = Scenario::new(&crs, t0());
    reconcile(Arc::new(relay(&crs, "hub-eu")), s.ctx.clone()).await.unwrap();
    assert_eq!(s.api.lines(), vec![format!("PATCH {RELAYS}/hub-eu")]);
    let call = &s.api.calls()[0];
    assert!(call.content_type.starts_with("application/json-patch"));
    assert_eq!(s.api.get(&format!("{RELAYS}/hub-eu")).unwrap()["metadata"]["finalizers"], json!([FINALIZER]));
}

#[tokio::test]
async fn a_main_relay_gets_secrets_config_deployment_service_pdb_and_status() {
    let (s, hub) = ready_scenario(t0());
    reconcile(Arc::new(hub.clone()), s.ctx.clone()).await.unwrap();
    assert_eq!(
        s.api.lines(),
        vec![
            format!("GET {BASE}/secrets/acme-ca"),
            format!("GET {BASE}/secrets/hub-eu-identity"),
            format!("PATCH {BASE}/secrets/hub-eu-identity"),
            format!("POST {EVENTS}"),
            format!("GET {BASE}/secrets/hub-eu-ech"),
            format!("PATCH {BASE}/secrets/hub-eu-ech"),
            format!("POST {EVENTS}"),
            format!("PATCH {BASE}/configmaps/hub-eu-config"),
            format!("PATCH {APPS}/deployments/hub-eu"),
            format!("PATCH {BASE}/services/hub-eu"),
            format!("PATCH /apis/policy/v1/namespaces/relayfed-system/poddisruptionbudgets/hub-eu"),
            format!("PATCH {RELAYS}/hub-eu/status"),
        ]
    );
    assert_eq!(
        s.api.events(),
        vec![("Normal".into(), "CertificateIssued".into()), ("Normal".into(), "EchKeyCreated".into())]
    );
    for c in s
        .api
        .calls()
        .iter()
        .filter(|c| c.method == "PATCH" && !c.path.ends_with("/status") && !c.path.starts_with(RELAYS))
    {
        assert_eq!(c.content_type, "application/apply-patch+yaml", "{}", c.line());
        assert!(c.query.contains(&format!("fieldManager={FIELD_MANAGER}")), "{}", c.line());
        let owner = &c.body["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["name"].as_str(), owner["controller"].as_bool()),
            (Some("Relay"), Some("hub-eu"), Some(true)),
            "{}",
            c.line()
        );
    }
    // Identity: a certificate for the node id, signed by the federation CA, with its key.
    let id = s.api.get(&format!("{BASE}/secrets/hub-eu-identity")).unwrap();
    let cert = String::from_utf8(unb64(&id["data"]["hub-eu.pem"])).unwrap();
    let der = relayfed_sidecar::crypto::ca::parse_cert_pem(&cert).unwrap();
    assert_eq!(relayfed_sidecar::crypto::ca::node_id_from_cert(der.as_ref(), "acme.example").unwrap(), "hub-eu");
    assert!(id["data"]["hub-eu.key"].is_string() && id["data"]["ca.pem"].is_string());
    // ECH: one key, created now.
    let (file, since) = ech_file(&s);
    assert!(file.previous.is_none());
    assert_eq!(since, "2026-11-22T00:00:00Z");
    // Deployment: image, replicas, the key and config volumes, UDP port.
    let dep = s.api.calls().into_iter().find(|c| c.path == format!("{APPS}/deployments/hub-eu")).unwrap().body;
    assert_eq!(dep["spec"]["replicas"], 2);
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], s.ctx.settings.proxy_image);
    assert_eq!(c["args"][0], "main-relay");
    assert_eq!(c["ports"][0], json!({"name": "quic", "containerPort": 7401, "protocol": "UDP"}));
    assert_eq!(c["resources"]["requests"]["cpu"], "100m");
    let vols = &dep["spec"]["template"]["spec"]["volumes"];
    assert_eq!(vols[0]["projected"]["sources"][0]["secret"]["name"], "hub-eu-identity");
    assert_eq!(vols[0]["projected"]["sources"][1]["secret"]["name"], "hub-eu-ech");
    // Service (LoadBalancer as configured) and PDB (2 replicas: keep one).
    let svc = s.api.calls().into_iter().find(|c| c.path == format!("{BASE}/services/hub-eu")).unwrap().body;
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "UDP");
    let pdb = s.api.calls().into_iter().find(|c| c.path.ends_with("poddisruptionbudgets/hub-eu")).unwrap().body;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    // Config: the published snapshot, listening on all pod addresses.
    let cm = s.api.get(&format!("{BASE}/configmaps/hub-eu-config")).unwrap();
    let snap: Value = serde_json::from_str(cm["data"]["snapshot.json"].as_str().unwrap()).unwrap();
    assert_eq!(snap["listen"], "0.0.0.0:7401");
    assert_eq!(snap["node"]["id"], "hub-eu");
    assert_eq!(snap["version"], s.ctx.distributor.versions()["hub-eu"]);
    // Status: the ECHConfigList (TLS ECH encoding) of the current key.
    let status = s.api.calls().last().unwrap().body["status"].clone();
    assert_eq!(status["echConfigId"], file.current.config_id);
    let list = EchConfigList::decode(&unb64(&status["echConfigList"])).unwrap();
    assert_eq!(list.entries.len(), 1);
    assert_eq!(status["readyReplicas"], 0);
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("Progressing")));
    assert_eq!(status["observedGeneration"], 1);
}

#[tokio::test]
async fn an_expiring_ech_key_is_staged_then_rotated_and_the_old_one_kept_for_the_grace_period() {
    // hub-eu: rotationPeriod 24h, gracePeriod 1h, stagingPeriod 5m (the default).
    let (s, hub) = ready_scenario(t0());
    reconcile(Arc::new(hub.clone()), s.ctx.clone()).await.unwrap();
    let (first, _) = ech_file(&s);
    let at = |secs: u64| {
        let ctx = with_clock(&s, t0() + Duration::from_secs(secs));
        s.api.clear_calls();
        Scenario { api: s.api.clone(), ctx }
    };

    // 23h54m later: not due, the Secret is not written.
    let s2 = at(24 * 3600 - 360);
    reconcile(Arc::new(hub.clone()), s2.ctx.clone()).await.unwrap();
    assert!(!s2.api.lines().contains(&format!("PATCH {BASE}/secrets/hub-eu-ech")), "{:?}", s2.api.lines());

    // 23h55m: a next key is staged; relays get it, homes keep the current config.
    let s3 = at(24 * 3600 - 300);
    reconcile(Arc::new(hub.clone()), s3.ctx.clone()).await.unwrap();
    assert_eq!(s3.api.events(), vec![("Normal".into(), "EchKeyStaged".into())]);
    let (staged, _) = ech_file(&s3);
    assert_eq!(staged.current.secret, first.current.secret);
    let next = staged.next.clone().expect("a staged key");
    assert_ne!(next.config_id, first.current.config_id);
    let status = s3.api.calls().last().unwrap().body["status"].clone();
    assert_eq!(status["echConfigId"], first.current.config_id, "homes are not given the staged key");
    let set = staged.key_set(std::path::Path::new("x"), Duration::from_secs(3600)).unwrap();
    assert!(set.find(next.config_id, t0()).is_some(), "relays accept the staged key");

    // 24h: the staged key is promoted; the old key becomes `previous`, stamped with the time.
    let due = t0() + Duration::from_secs(24 * 3600);
    let s4 = at(24 * 3600);
    reconcile(Arc::new(hub.clone()), s4.ctx.clone()).await.unwrap();
    assert_eq!(s4.api.events(), vec![("Normal".into(), "EchKeyRotated".into())]);
    let (rotated, since) = ech_file(&s4);
    assert_eq!(since, "2026-11-23T00:00:00Z");
    assert_eq!(rotated.current.secret, next.secret, "the key relays already hold becomes current");
    assert!(rotated.next.is_none());
    let prev = rotated.previous.clone().unwrap();
    assert_eq!(prev.secret, first.current.secret);
    assert_eq!(prev.rotated_at, Some(1_795_305_600 + 24 * 3600));
    let status = s4.api.calls().last().unwrap().body["status"].clone();
    assert_eq!(status["echConfigId"], rotated.current.config_id);
    assert_eq!(status["lastKeyRotation"], "2026-11-23T00:00:00Z");
    // Within the grace period the previous key still opens routes sealed to it.
    let set = rotated.key_set(std::path::Path::new("x"), Duration::from_secs(3600)).unwrap();
    assert!(set.find(first.current.config_id, due + Duration::from_secs(3599)).is_some());

    // 1h later: the grace period is over, the previous key is dropped.
    let s5 = at(25 * 3600);
    reconcile(Arc::new(hub), s5.ctx.clone()).await.unwrap();
    let (pruned, _) = ech_file(&s5);
    assert!(pruned.previous.is_none());
    assert_eq!(pruned.current.secret, rotated.current.secret);
    assert!(s5.api.events().is_empty());
}

#[tokio::test]
async fn a_new_rotate_annotation_stages_a_key_once() {
    let (s, mut hub) = ready_scenario(t0());
    reconcile(Arc::new(hub.clone()), s.ctx.clone()).await.unwrap();
    let (first, _) = ech_file(&s);
    hub.metadata.annotations =
        Some([(relayfed_operator::k8s::relay::ECH_ROTATE_ANNOTATION.to_owned(), "2026-11-22".to_owned())].into());
    s.api.clear_calls();
    reconcile(Arc::new(hub.clone()), s.ctx.clone()).await.unwrap();
    assert_eq!(s.api.events(), vec![("Normal".into(), "EchKeyStaged".into())]);
    let (staged, _) = ech_file(&s);
    assert_eq!(staged.current.secret, first.current.secret);
    let next = staged.next.clone().expect("a staged key");
    // The same value again: nothing new is staged.
    s.api.clear_calls();
    reconcile(Arc::new(hub), s.ctx.clone()).await.unwrap();
    assert!(s.api.events().is_empty(), "{:?}", s.api.events());
    assert_eq!(ech_file(&s).0.next.unwrap().secret, next.secret);
}

/// The same stores and API with another clock.
fn with_clock(s: &Scenario, now: std::time::SystemTime) -> Arc<relayfed_operator::k8s::Context> {
    let c = &s.ctx;
    relayfed_operator::k8s::Context::new(
        c.client.clone(),
        c.settings.clone(),
        c.metrics.clone(),
        c.stores.clone(),
        c.distributor.clone(),
        Arc::new(move || now),
    )
}

#[tokio::test]
async fn a_valid_certificate_is_kept_and_a_nearly_expired_one_renewed() {
    let (s, hub) = ready_scenario(t0());
    reconcile(Arc::new(hub.clone()), s.ctx.clone()).await.unwrap();
    let first = s.api.get(&format!("{BASE}/secrets/hub-eu-identity")).unwrap()["data"]["hub-eu.pem"].clone();
    // 19 days later (30-day certificates, renewed in the last 10 days): kept.
    let s2 = Scenario { api: s.api.clone(), ctx: with_clock(&s, t0() + Duration::from_secs(19 * 86_400)) };
    s2.api.clear_calls();
    reconcile(Arc::new(hub.clone()), s2.ctx.clone()).await.unwrap();
    assert!(!s2.api.lines().contains(&format!("PATCH {BASE}/secrets/hub-eu-identity")));
    // 21 days later: renewed.
    let s3 = Scenario { api: s.api.clone(), ctx: with_clock(&s, t0() + Duration::from_secs(21 * 86_400)) };
    s3.api.clear_calls();
    reconcile(Arc::new(hub), s3.ctx.clone()).await.unwrap();
    assert!(s3.api.lines().contains(&format!("PATCH {BASE}/secrets/hub-eu-identity")));
    let second = s3.api.get(&format!("{BASE}/secrets/hub-eu-identity")).unwrap()["data"]["hub-eu.pem"].clone();
    assert_ne!(first, second);
    assert!(s3.api.events().contains(&("Normal".into(), "CertificateIssued".into())));
}

#[tokio::test]
async fn without_the_ca_a_relay_waits_and_says_so() {
    let mut crs = example();
    for r in crs.iter_mut() {
        if let AnyResource::Relay(x) = r {
            x.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
    }
    let s = Scenario::new(&crs, t0());
    let action = reconcile(Arc::new(relay(&crs, "hub-eu")), s.ctx.clone()).await.unwrap();
    assert_eq!(
        format!("{action:?}"),
        format!("{:?}", kube::runtime::controller::Action::requeue(Duration::from_secs(10)))
    );
    assert_eq!(s.api.lines(), vec![format!("GET {BASE}/secrets/acme-ca"), format!("PATCH {RELAYS}/hub-eu/status")]);
    let cond = &s.api.calls()[1].body["status"]["conditions"][0];
    assert_eq!((cond["status"].as_str(), cond["reason"].as_str()), (Some("False"), Some("WaitingForCA")));
}

#[tokio::test]
async fn deleting_a_relay_withdraws_its_node_then_removes_the_finalizer() {
    let (s, hub) = ready_scenario(t0());
    reconcile(Arc::new(hub.clone()), s.ctx.clone()).await.unwrap();
    assert!(s.ctx.distributor.versions().contains_key("hub-eu"));
    // The informer now shows the deletion timestamp.
    let mut deleting = hub.clone();
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
    let mut crs = example();
    for r in crs.iter_mut() {
        if let AnyResource::Relay(x) = r
            && x.metadata.name.as_deref() == Some("hub-eu")
        {
            **x = deleting.clone();
        }
    }
    let s2 = Scenario::new(&crs, t0());
    // Same distributor state: publish what the first scenario had.
    s2.ctx.distributor.publish(
        &s.ctx
            .distributor
            .versions()
            .keys()
            .map(|n| (n.clone(), (*s.ctx.distributor.snapshot(n).unwrap()).clone()))
            .collect(),
    );
    reconcile(Arc::new(deleting), s2.ctx.clone()).await.unwrap();
    assert!(!s2.ctx.distributor.versions().contains_key("hub-eu"), "hub-eu still published");
    assert!(s2.ctx.distributor.versions().contains_key("hub-us"));
    assert_eq!(s2.api.lines(), vec![format!("POST {EVENTS}"), format!("PATCH {RELAYS}/hub-eu")]);
    assert_eq!(s2.api.events(), vec![("Normal".into(), "Withdrawn".into())]);
    let ops = &s2.api.calls()[1].body;
    assert_eq!(ops[0]["op"], "test");
    assert_eq!(ops[1], json!({"op": "remove", "path": "/metadata/finalizers/0"}));
    assert_eq!(s2.api.get(&format!("{RELAYS}/hub-eu")).unwrap()["metadata"]["finalizers"], json!([]));
    // The other nodes no longer count hub-eu among the federation's known nodes.
    let us = s2.ctx.distributor.snapshot("hub-us").unwrap();
    assert!(!us.trust.known_nodes.contains(&"hub-eu".to_owned()), "{:?}", us.trust.known_nodes);
    assert!(us.trust.known_nodes.contains(&"shop-eu".to_owned()));
}

#[tokio::test]
async fn a_relay_the_plan_rejects_says_why_and_is_not_deployed() {
    // A main relay whose node id the federation does not list.
    let mut crs = example();
    for r in crs.iter_mut() {
        if let AnyResource::Relay(x) = r {
            x.metadata.finalizers = Some(vec![FINALIZER.into()]);
            if x.metadata.name.as_deref() == Some("hub-eu") {
                x.spec.node_id = "hub-xx".into();
            }
        }
    }
    let s = Scenario::new(&crs, t0());
    let ca = FederationCa::generate("acme.example").unwrap();
    s.api.seed(
        &format!("{BASE}/secrets/acme-ca"),
        json!({"metadata": {"name": "acme-ca"}, "data": {
            "ca.crt": b64(ca.certified_key().cert_pem.as_bytes()), "ca.key": b64(ca.certified_key().key_pem.as_bytes())}}),
    );
    reconcile(Arc::new(relay(&crs, "hub-eu")), s.ctx.clone()).await.unwrap();
    assert!(!s.api.lines().iter().any(|l| l.contains("/deployments/")), "{:?}", s.api.lines());
    assert!(s.api.events().contains(&("Warning".into(), "Invalid".into())));
    let status = s.api.calls().last().unwrap().body["status"].clone();
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("Invalid")));
    assert!(ready["message"].as_str().unwrap().contains("spec.nodeId"), "{ready}");
}
