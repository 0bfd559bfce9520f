//! Workload identity through the real TokenReview: a token requested for a real pod's
//! ServiceAccount, bound to the pod, audience `relayfed`, gets a certificate from the operator;
//! a token of another audience, one bound to a deleted pod, and an expired one (signed with the
//! plane's own key, since TokenRequest will not issue it) are refused with a clear error.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use relayfed_sidecar::distribution::certificate::{CertificateClient, CertificateError, CertificateRequest};
use serde_json::json;

use crate::support::{Namespace, eventually, examples_in, operated, plane};

async fn token(sas: &Api<ServiceAccount>, pod: &Pod, audience: &str) -> String {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    sas.create_token_request("app", &PostParams::default(), &req).await.unwrap().status.unwrap().token
}

fn csr() -> CertificateRequest {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
    CertificateRequest { csr, noise_public_key: Some(relayfed_sidecar::config::base64_encode(&[7u8; 32])) }
}

async fn create_pod(pods: &Api<Pod>, name: &str) -> Pod {
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "app", "image": "registry.example/app:1"}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap()
}

fn refused(r: Result<impl std::fmt::Debug, CertificateError>) -> (u16, String) {
    match r {
        Err(CertificateError::Refused { status, body }) => (status, body),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pod_bound_token_gets_a_certificate_and_bad_tokens_are_refused() {
    let setup = operated("identity").await;
    let (ns, op) = (&setup.ns, &setup.op);
    let dir = examples_in("federation", &ns.name);
    assert!(plane().kubectl(&["apply", "-f", &dir.join("00-federation.yaml").display().to_string()]).unwrap().ok);
    let client = plane().client().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let ca =
        eventually("the CA", Duration::from_secs(60), || async { secrets.get_opt("acme-ca").await.ok().flatten() })
            .await;
    let ca_pem = String::from_utf8(ca.data.unwrap()["ca.crt"].0.clone()).unwrap();
    let server = eventually("the certificate server", Duration::from_secs(60), || async {
        op.logged()
            .lines()
            .find(|l| l.contains("serving workload certificates"))
            .and_then(|l| l.split("bound=").nth(1).map(|s| s.split_whitespace().next().unwrap_or_default().to_owned()))
    })
    .await;
    let certs = CertificateClient {
        server,
        ca_pem,
        trust_domain: "acme.example".into(),
        server_node: relayfed_sidecar::distribution::DEFAULT_SERVER_NODE.into(),
    };

    let apps = Namespace::create("identity-app", &[]);
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &apps.name);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "app"}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &apps.name);
    let pod = create_pod(&pods, "web-0").await;

    // Bound to the pod, audience relayfed: a certificate naming the pod's node id.
    let issued = certs.request(&token(&sas, &pod, "relayfed").await, &csr()).await.unwrap();
    assert!(issued.node_id.starts_with("web-0-"), "{}", issued.node_id);
    assert!(issued.certificate.contains("BEGIN CERTIFICATE"));

    // Another audience: the API server does not authenticate it for relayfed.
    let (status, body) = refused(certs.request(&token(&sas, &pod, "vault").await, &csr()).await);
    assert_eq!(status, 401, "{body}");

    // Bound to a pod that is gone.
    let doomed = create_pod(&pods, "web-1").await;
    let t = token(&sas, &doomed, "relayfed").await;
    pods.delete("web-1", &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await.unwrap();
    eventually("the pod gone", Duration::from_secs(30), || async {
        pods.get_opt("web-1").await.ok()?.is_none().then_some(())
    })
    .await;
    let (status, body) = refused(certs.request(&t, &csr()).await);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("web-1") || body.contains("not found") || body.contains("invalid"), "{body}");

    // Expired an hour ago, otherwise a perfect bound token for the live pod.
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let sa = sas.get("app").await.unwrap();
    let claims = json!({
        "iss": plane().server, "aud": ["relayfed"], "sub": format!("system:serviceaccount:{}:app", apps.name),
        "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600, "jti": "expired-1",
        "kubernetes.io": {"namespace": apps.name,
            "serviceaccount": {"name": "app", "uid": sa.metadata.uid},
            "pod": {"name": "web-0", "uid": pod.metadata.uid}},
    });
    let (status, body) = refused(certs.request(&plane().mint_token(&claims).unwrap(), &csr()).await);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("expired"), "the refusal should say the token expired: {body}");
    // The same claims, not yet expired, are accepted: the refusal above was for the expiry.
    let mut fresh = claims.clone();
    fresh["exp"] = json!(now + 600);
    fresh["jti"] = json!("fresh-1");
    certs.request(&plane().mint_token(&fresh).unwrap(), &csr()).await.unwrap();
}
