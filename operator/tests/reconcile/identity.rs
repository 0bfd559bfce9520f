//! Workload certificates: the token is verified with a TokenReview (audience relayfed), the
//! node id comes from the pod the token is bound to, the Noise key is bound.

use std::sync::Arc;

use relayfed_operator::identity::{AUDIENCE, IdentityServer};
use relayfed_operator::metrics::OperatorMetrics;
use relayfed_sidecar::crypto::ca::{FederationCa, node_id_from_cert, noise_key_from_cert, parse_cert_pem};
use serde_json::{Value, json};

use super::{FakeApi, t0};

const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
}

fn server(review_status: Value) -> (Arc<IdentityServer>, FakeApi) {
    let (client, api) = FakeApi::client();
    api.0.lock().unwrap().post_replies.insert(REVIEWS.into(), json!({"status": review_status}));
    let ca = Arc::new(FederationCa::generate("acme.example").unwrap());
    let validity = relayfed_operator::identity::CERT_VALIDITY;
    (Arc::new(IdentityServer { client, ca, metrics: Arc::new(OperatorMetrics::new()), validity }), api)
}

fn bound(ns: &str, pod: &str, audiences: &[&str]) -> Value {
    json!({"authenticated": true, "audiences": audiences, "user": {
        "username": format!("system:serviceaccount:{ns}:web"),
        "extra": {"authentication.kubernetes.io/pod-name": [pod], "authentication.kubernetes.io/pod-uid": ["u-1"]}}})
}

fn body(noise: Option<&str>) -> Vec<u8> {
    let mut b = json!({"csr": csr()});
    if let Some(k) = noise {
        b["noisePublicKey"] = json!(k);
    }
    serde_json::to_vec(&b).unwrap()
}

#[tokio::test]
async fn a_bound_token_gets_a_short_lived_certificate_for_its_pod_with_the_noise_key() {
    let (srv, api) = server(bound("shop", "web-7d9f-abc12", &[AUDIENCE]));
    let key = [9u8; 32];
    let b64 = relayfed_sidecar::config::base64_encode(&key);
    let (status, resp) = srv.handle(Some("Bearer tok-123"), &body(Some(&b64)), t0()).await;
    assert_eq!(status, 200, "{resp}");
    // Exactly one TokenReview, for our audience, carrying the token.
    assert_eq!(api.lines(), vec![format!("POST {REVIEWS}")]);
    let review = &api.calls()[0].body;
    assert_eq!(review["spec"], json!({"token": "tok-123", "audiences": ["relayfed"]}));
    let node = resp["nodeId"].as_str().unwrap();
    assert!(node.starts_with("web-7d9f-abc12-") && node.len() == "web-7d9f-abc12-".len() + 6, "{node}");
    let der = parse_cert_pem(resp["certificate"].as_str().unwrap()).unwrap();
    assert_eq!(node_id_from_cert(&der, "acme.example").unwrap(), node);
    assert_eq!(noise_key_from_cert(&der).unwrap(), Some(key));
    assert_eq!(resp["notAfter"].as_u64().unwrap() - 1_795_305_600, 24 * 3600);
    assert_eq!(resp["renewAfter"].as_u64().unwrap() - 1_795_305_600, 16 * 3600);
    assert!(resp["caBundle"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    // Same pod name in another namespace: another node id.
    let (srv2, _) = server(bound("pay", "web-7d9f-abc12", &[AUDIENCE]));
    let (_, other) = srv2.handle(Some("Bearer t"), &body(None), t0()).await;
    assert_ne!(other["nodeId"], resp["nodeId"]);
}

#[tokio::test]
async fn refusals_say_why_and_issue_nothing() {
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"authenticated": false, "error": "token expired"}), 401, "token expired"),
        (bound("shop", "web-1", &["https://kubernetes.default.svc"]), 401, "audience"),
        (
            json!({"authenticated": true, "audiences": [AUDIENCE], "user": {"username": "alice"}}),
            403,
            "not a service account",
        ),
        (
            json!({"authenticated": true, "audiences": [AUDIENCE], "user": {"username": "system:serviceaccount:shop:web"}}),
            403,
            "not bound to a pod",
        ),
    ];
    for (review, want, text) in cases {
        let (srv, _) = server(review.clone());
        let (status, resp) = srv.handle(Some("Bearer tok"), &body(None), t0()).await;
        assert_eq!(status, want, "{review}: {resp}");
        assert!(resp["message"].as_str().unwrap().contains(text), "{resp}");
        assert!(resp.get("certificate").is_none());
    }
    // No token, or a malformed body: refused before any TokenReview.
    let (srv, api) = server(bound("shop", "web-1", &[AUDIENCE]));
    let (status, resp) = srv.handle(None, &body(None), t0()).await;
    assert_eq!((status, resp["error"].as_str()), (401, Some("unauthenticated")));
    for bad in [
        &b"{"[..],
        b"{\"csr\": 1}",
        b"{\"csr\": \"x\", \"extra\": 1}",
        b"{\"csr\": \"-----BEGIN CERTIFICATE REQUEST-----\\n\"}",
    ] {
        let (status, resp) = srv.handle(Some("Bearer t"), bad, t0()).await;
        assert_eq!(status, 400, "{resp}");
    }
    let bad_noise = serde_json::to_vec(&json!({"csr": csr(), "noisePublicKey": "c2hvcnQ="})).unwrap();
    let (status, resp) = srv.handle(Some("Bearer t"), &bad_noise, t0()).await;
    assert_eq!(status, 400, "{resp}");
    assert!(resp["message"].as_str().unwrap().contains("32 bytes"));
    // Only the two requests that parsed reached the API (the bad CSR and the bad Noise key).
    assert_eq!(api.lines().len(), 2, "{:?}", api.lines());
}
