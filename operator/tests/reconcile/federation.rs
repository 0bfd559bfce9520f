//! `RelayFederation`: the CA is created once with POST and never overwritten; the trust bundle
//! and status are server-side applied.

use relayfed_operator::k8s::federation::reconcile;
use relayfed_operator::k8s::{FIELD_MANAGER, ReconcileError};
use relayfed_sidecar::crypto::ca::FederationCa;
use serde_json::json;
use std::sync::Arc;

use super::{NS, Scenario, example, federation, t0};

const SECRETS: &str = "/api/v1/namespaces/relayfed-system/secrets";
const CA: &str = "/api/v1/namespaces/relayfed-system/secrets/acme-ca";
const BUNDLE: &str = "/api/v1/namespaces/relayfed-system/configmaps/acme-trust-bundle";
const STATUS: &str = "/apis/relayfed.io/v1alpha1/namespaces/relayfed-system/relayfederations/acme/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/relayfed-system/events";

fn ca_secret(ca: &FederationCa) -> serde_json::Value {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "acme-ca", "namespace": NS},
        "data": {"ca.crt": b64(&ca.certified_key().cert_pem), "ca.key": b64(&ca.certified_key().key_pem)},
    })
}

#[tokio::test]
async fn first_reconcile_creates_the_ca_with_post_then_applies_bundle_and_status() {
    let crs = example();
    let s = Scenario::new(&crs, t0());
    reconcile(Arc::new(federation(&crs)), s.ctx.clone()).await.unwrap();
    assert_eq!(
        s.api.lines(),
        vec![
            format!("GET {CA}"),
            format!("POST {SECRETS}"),
            format!("POST {EVENTS}"),
            format!("PATCH {BUNDLE}"),
            format!("PATCH {STATUS}"),
        ]
    );
    let calls = s.api.calls();
    // The CA: created (never applied), immutable, no owner (survives the federation).
    let created = &calls[1].body;
    assert_eq!(created["immutable"], json!(true));
    assert!(created["metadata"]["ownerReferences"].is_null());
    assert_eq!(created["metadata"]["annotations"]["relayfed.io/trust-domain"], "acme.example");
    assert_eq!(s.api.events(), vec![("Normal".to_owned(), "CACreated".to_owned())]);
    // Trust bundle: server-side apply by our field manager, owned by the federation.
    let bundle = &calls[3];
    assert_eq!(bundle.content_type, "application/apply-patch+yaml");
    assert!(bundle.query.contains(&format!("fieldManager={FIELD_MANAGER}")) && bundle.query.contains("force=true"));
    assert_eq!(bundle.body["metadata"]["ownerReferences"][0]["kind"], "RelayFederation");
    assert_eq!(bundle.body["metadata"]["ownerReferences"][0]["controller"], true);
    assert!(bundle.body["data"]["ca.crt"].as_str().unwrap().starts_with("-----BEGIN CERTIFICATE-----"));
    // Status: observedGeneration, Ready condition, fingerprint, counts.
    let status = &calls[4].body["status"];
    assert_eq!(calls[4].body["kind"], "RelayFederation");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True", "{status}");
    assert_eq!(status["conditions"][0]["observedGeneration"], 1);
    assert!(status["caFingerprint"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(status["services"], 2, "two exports in the example (catalog, payments)");
    assert_eq!(status["mainRelaysReady"], 0);
    // The plan was published: every relay of the example has a snapshot.
    let versions = s.ctx.distributor.versions();
    for node in ["hub-eu", "hub-us", "shop-eu", "pay-us"] {
        assert!(versions.contains_key(node), "{node} not published: {versions:?}");
    }
}

#[tokio::test]
async fn an_existing_ca_is_never_written_again() {
    let crs = example();
    let s = Scenario::new(&crs, t0());
    let ca = FederationCa::generate("acme.example").unwrap();
    s.api.seed(CA, ca_secret(&ca));
    let before = s.api.get(CA).unwrap();
    reconcile(Arc::new(federation(&crs)), s.ctx.clone()).await.unwrap();
    reconcile(Arc::new(federation(&crs)), s.ctx.clone()).await.unwrap();
    let writes: Vec<String> =
        s.api.lines().into_iter().filter(|l| l.contains("/secrets") && !l.starts_with("GET")).collect();
    assert!(writes.is_empty(), "the CA Secret was written: {writes:?}");
    assert_eq!(s.api.get(CA).unwrap(), before);
    assert!(s.api.events().is_empty(), "no CACreated event for an existing CA");
    let fp = relayfed_sidecar::crypto::ca::cert_fingerprint(&ca.certified_key().cert_pem).unwrap();
    let last = s.api.calls().into_iter().rev().find(|c| c.path == STATUS).unwrap();
    assert_eq!(last.body["status"]["caFingerprint"], fp);
    let bundle = s.api.calls().into_iter().find(|c| c.path == BUNDLE).unwrap();
    assert_eq!(bundle.body["data"]["ca.crt"], ca.certified_key().cert_pem);
}

#[tokio::test]
async fn a_ca_of_another_trust_domain_is_left_alone_and_reported() {
    let crs = example();
    let s = Scenario::new(&crs, t0());
    s.api.seed(CA, ca_secret(&FederationCa::generate("other.example").unwrap()));
    let before = s.api.get(CA).unwrap();
    let err = reconcile(Arc::new(federation(&crs)), s.ctx.clone()).await.unwrap_err();
    assert!(matches!(err, ReconcileError::Dependency(_)), "{err}");
    assert!(err.to_string().contains("other.example") && err.to_string().contains("left untouched"), "{err}");
    assert_eq!(s.api.get(CA).unwrap(), before);
    assert_eq!(s.api.events(), vec![("Warning".to_owned(), "CAInvalid".to_owned())]);
    let st = s.api.calls().into_iter().find(|c| c.path == STATUS).unwrap();
    assert_eq!(st.body["status"]["conditions"][0]["status"], "False");
    assert_eq!(st.body["status"]["conditions"][0]["reason"], "CAInvalid");
    assert!(!s.api.lines().iter().any(|l| l.contains("configmaps")), "no bundle from a foreign CA");
}

#[tokio::test]
async fn a_concurrent_creation_wins_and_is_read_back() {
    // Another replica created the CA between our GET and POST: the POST gets 409 and the
    // reconciler reads the winner's CA instead of overwriting it.
    let crs = example();
    let s = Scenario::new(&crs, t0());
    let theirs = FederationCa::generate("acme.example").unwrap();
    let api = s.api.clone();
    let seeded = ca_secret(&theirs);
    // Seed right after the first GET is answered: emulate by seeding before and hiding it from one GET.
    api.0.lock().unwrap().hide_once.push(CA.to_owned());
    api.seed(CA, seeded);
    reconcile(Arc::new(federation(&crs)), s.ctx.clone()).await.unwrap();
    let lines = s.api.lines();
    assert_eq!(&lines[..3], &[format!("GET {CA}"), format!("POST {SECRETS}"), format!("GET {CA}")]);
    let fp = relayfed_sidecar::crypto::ca::cert_fingerprint(&theirs.certified_key().cert_pem).unwrap();
    let last = s.api.calls().into_iter().rev().find(|c| c.path == STATUS).unwrap();
    assert_eq!(last.body["status"]["caFingerprint"], fp);
    assert!(s.api.events().is_empty());
}
