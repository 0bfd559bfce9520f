//! The injection webhook on AdmissionReview v1 bodies as kube-apiserver sends them: the
//! returned JSONPatch applies cleanly and yields a valid Pod with the proxy; opt-out,
//! already-injected, not-opted-in and host-network pods are left alone; malformed reviews get
//! a clear error and the configured failure policy decides about broken pods; the HTTPS
//! server answers the same over TLS. (tests/python/test_webhook.py validates the patched pods
//! against the Kubernetes OpenAPI schema with kubernetes-validate.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use base64::Engine;
use k8s_openapi::api::core::v1::{Container, Pod};
use relayfed_operator::webhook::{FailurePolicy, INIT, InjectConfig, PROXY, review};
use relayfed_sidecar::intercept::rules::Backend;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
            .join("tests/fixtures/admission")
            .join(name),
    )
    .unwrap()
}

/// Runs the review and applies its patch (if any) to the request's pod.
fn admit(name: &str, ns_enabled: bool, cfg: &InjectConfig) -> (Value, Value) {
    let body = fixture(name);
    let req: Value = serde_json::from_slice(&body).unwrap();
    let (resp, _) = review(&body, ns_enabled, cfg).unwrap();
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(resp["response"]["uid"], req["request"]["uid"], "the response echoes the request uid");
    let mut pod = req["request"]["object"].clone();
    if let Some(patch) = resp["response"]["patch"].as_str() {
        assert_eq!(resp["response"]["patchType"], "JSONPatch");
        let ops: json_patch::Patch =
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(patch).unwrap()).unwrap();
        json_patch::patch(&mut pod, &ops).expect("the patch applies cleanly");
    }
    (resp, pod)
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array().map(|l| l.iter().map(|c| c["name"].as_str().unwrap()).collect()).unwrap_or_default()
}

#[test]
fn pods_in_labelled_namespaces_get_the_proxy_as_a_native_sidecar() {
    let cfg = InjectConfig::default();
    for fixture in ["plain.json", "no-volumes.json", "with-init-and-annotations.json"] {
        let (resp, pod) = admit(fixture, true, &cfg);
        assert_eq!(resp["response"]["allowed"], true);
        let typed: Pod = serde_json::from_value(pod.clone()).expect("the patched object is a Pod");
        let spec = typed.spec.unwrap();
        let inits = spec.init_containers.unwrap();
        assert_eq!(inits[0].name, INIT, "{fixture}: interception is installed first");
        assert_eq!(inits[1].name, PROXY, "{fixture}: then the proxy starts");
        assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"), "{fixture}: native sidecar");
        let caps = inits[0].security_context.as_ref().unwrap().capabilities.as_ref().unwrap();
        assert!(caps.add.as_ref().unwrap().contains(&"NET_ADMIN".to_owned()));
        assert_eq!(inits[1].security_context.as_ref().unwrap().run_as_user, Some(1337));
        assert_eq!(inits[1].ports.as_ref().unwrap()[0].container_port, 15090);
        let vols: Vec<String> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert!(vols.contains(&"relayfed-run".to_owned()) && vols.contains(&"relayfed-token".to_owned()), "{vols:?}");
        assert_eq!(pod["metadata"]["annotations"]["relayfed.io/status"], "injected");
        assert_eq!(
            pod["metadata"]["labels"]["relayfed.io/injected"], "true",
            "{fixture}: the operator watches this label"
        );
        assert_eq!(spec.containers[0].name, "catalog", "app containers are untouched");
        // The init container needs no snapshot: it redirects all outbound TCP, minus the proxy's uid.
        let init_args = inits[0].args.clone().unwrap();
        assert_eq!(init_args[0], "init");
        assert!(init_args.windows(2).any(|w| w == ["--proxy-uid", "1337"]), "{init_args:?}");
        assert!(init_args.windows(2).any(|w| w == ["--outbound-port", "15001"]), "{init_args:?}");
        // The proxy bootstraps its identity and config from the operator.
        let proxy_args = inits[1].args.clone().unwrap();
        assert_eq!(proxy_args[0], "workload");
        assert!(proxy_args.windows(2).any(|w| w[0] == "--identity-server" && w[1] == cfg.identity_server));
        assert!(proxy_args.windows(2).any(|w| w[0] == "--config-server" && w[1] == cfg.config_server));
        let token = &pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "relayfed-token").unwrap()
            ["projected"]["sources"];
        assert_eq!(token[0]["serviceAccountToken"]["audience"], "relayfed");
        assert_eq!(
            token[1]["configMap"]["name"], "relayfed-ca-root",
            "the CA root the sidecar verifies the operator with"
        );
    }
    // Existing init containers, volumes and annotations are kept, after ours.
    let (_, pod) = admit("with-init-and-annotations.json", true, &cfg);
    assert_eq!(names(&pod["spec"]["initContainers"]), [INIT, PROXY, "migrate"]);
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/scrape"], "true");
    assert_eq!(pod["spec"]["volumes"][0]["name"], "kube-api-access-x7k2p");
}

#[test]
fn injected_containers_follow_the_image_contract_and_the_init_step_is_hardened() {
    for (backend, caps) in [
        (Backend::Auto, vec!["NET_ADMIN", "NET_RAW"]),
        (Backend::Legacy, vec!["NET_ADMIN", "NET_RAW"]),
        (Backend::Nft, vec!["NET_ADMIN"]),
    ] {
        let cfg = InjectConfig { iptables: backend, ..InjectConfig::default() };
        let (_, pod) = admit("plain.json", true, &cfg);
        let inits: Vec<Container> = serde_json::from_value(pod["spec"]["initContainers"].clone()).unwrap();
        for c in &inits {
            // The relayfed-proxy image's ENTRYPOINT is the binary: arguments only, no command.
            assert!(c.command.is_none(), "{}: the ENTRYPOINT runs relayfed-proxy", c.name);
            assert_eq!(c.image.as_deref(), Some(cfg.image.as_str()));
            let sc = c.security_context.clone().unwrap();
            assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault", "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(sc.capabilities.clone().unwrap().drop.unwrap(), ["ALL"], "{}", c.name);
            assert!(c.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some(), "{}: bounded", c.name);
        }
        let init = &inits[0];
        assert_eq!(init.security_context.clone().unwrap().capabilities.unwrap().add.unwrap(), caps, "{backend:?}");
        let args = init.args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--iptables", backend.arg()]), "{args:?}");
        // iptables-legacy's lock lives on the run volume, not the read-only root.
        let env = init.env.clone().unwrap();
        assert!(env.iter().any(|e| e.name == "XTABLES_LOCKFILE"
            && e.value.as_deref().is_some_and(|v| v.starts_with(relayfed_operator::webhook::RUN_DIR))));
    }
}

#[test]
fn injection_is_idempotent() {
    let cfg = InjectConfig::default();
    let (_, injected) = admit("plain.json", true, &cfg);
    let mut again: Value = serde_json::from_slice(&fixture("plain.json")).unwrap();
    again["request"]["object"] = injected;
    let (resp, _) = review(&serde_json::to_vec(&again).unwrap(), true, &cfg).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"]["patch"].is_null(), "an injected pod is left alone");
}

#[test]
fn regular_sidecar_when_native_sidecars_are_off() {
    let cfg = InjectConfig { native_sidecar: false, ..Default::default() };
    let (_, pod) = admit("with-init-and-annotations.json", true, &cfg);
    assert_eq!(names(&pod["spec"]["containers"]), [PROXY, "catalog"]);
    assert_eq!(names(&pod["spec"]["initContainers"]), [INIT, "migrate"]);
    assert!(pod["spec"]["containers"][0].get("restartPolicy").is_none());
    let _: Pod = serde_json::from_value(pod).unwrap();
}

#[test]
fn opt_out_not_opted_in_and_host_network_pods_are_left_alone() {
    let cfg = InjectConfig::default();
    for (fixture, ns_enabled) in
        [("opt-out.json", true), ("plain.json", false), ("host-network.json", true), ("opt-out.json", false)]
    {
        let (resp, pod) = admit(fixture, ns_enabled, &cfg);
        assert_eq!(resp["response"]["allowed"], true, "{fixture}");
        assert!(resp["response"]["patch"].is_null(), "{fixture} (namespace enabled: {ns_enabled}) must not be patched");
        assert!(pod["spec"]["initContainers"].is_null() || !names(&pod["spec"]["initContainers"]).contains(&INIT));
    }
    // A pod annotated `enabled` is injected in a namespace without the label.
    let (resp, pod) = admit("annotated.json", false, &cfg);
    assert!(resp["response"]["patch"].is_string());
    assert_eq!(names(&pod["spec"]["initContainers"])[..2], [INIT, PROXY]);
}

#[test]
fn the_pod_label_opts_in_and_out_as_the_charts_object_selectors_do() {
    use relayfed_operator::webhook::{Decision, decide};
    let cfg = InjectConfig::default();
    let pod = |labels: Value| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
    };
    let injected = |p: &Value, ns| matches!(decide(p, ns, &cfg).unwrap(), Decision::Inject(_));
    assert!(injected(&pod(serde_json::json!({"relayfed.io/inject": "enabled"})), false));
    assert!(!injected(&pod(serde_json::json!({"relayfed.io/inject": "disabled"})), true));
    assert!(injected(&pod(serde_json::json!({"app": "x"})), true));
    assert!(!injected(&pod(serde_json::json!({"app": "x"})), false));
}

#[test]
fn malformed_reviews_get_clear_errors_and_broken_pods_follow_the_failure_policy() {
    let cfg = InjectConfig::default();
    for (body, want) in [
        (b"not json".to_vec(), "malformed AdmissionReview"),
        (
            br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(),
            "expected admission.k8s.io/v1",
        ),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request"),
    ] {
        let e = review(&body, true, &cfg).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let (resp, _) = review(&fixture("broken-pod.json"), true, &cfg).unwrap();
    assert_eq!(resp["response"]["allowed"], false, "failurePolicy Fail refuses the pod");
    assert_eq!(resp["response"]["status"]["code"], 400);
    assert!(resp["response"]["status"]["message"].as_str().unwrap().contains("not a Pod"), "{resp}");
    let ignore = InjectConfig { failure_policy: FailurePolicy::Ignore, ..Default::default() };
    let (resp, _) = review(&fixture("broken-pod.json"), true, &ignore).unwrap();
    assert_eq!(resp["response"]["allowed"], true, "failurePolicy Ignore admits it unchanged");
    assert!(resp["response"]["patch"].is_null());
    assert!(resp["response"]["warnings"][0].as_str().unwrap().contains("injection skipped"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        let _ = review(&body, true, &InjectConfig::default());
    }

    #[test]
    fn mutated_pods_never_panic(at in proptest::sample::select(vec!["/spec", "/spec/containers", "/spec/containers/0", "/metadata", "/metadata/annotations", "/spec/volumes", "/spec/initContainers"]),
                                value in proptest::prop_oneof![proptest::strategy::Just(Value::Null), proptest::strategy::Just(serde_json::json!([])), proptest::strategy::Just(serde_json::json!({})), proptest::strategy::Strategy::prop_map("[a-z]{0,8}", Value::from), proptest::strategy::Strategy::prop_map(proptest::num::i64::ANY, Value::from)]) {
        let mut r: Value = serde_json::from_slice(&fixture("with-init-and-annotations.json")).unwrap();
        let ptr = format!("/request/object{at}");
        if let Some(slot) = r.pointer_mut(&ptr) {
            *slot = value;
        }
        let _ = review(&serde_json::to_vec(&r).unwrap(), true, &InjectConfig::default());
    }
}

#[tokio::test]
async fn the_https_server_answers_reviews() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = relayfed_sidecar::crypto::ca::FederationCa::generate("cluster.local").unwrap();
    let cert = ca.issue("relayfed-webhook", std::time::Duration::from_secs(3600)).unwrap();
    let metrics = std::sync::Arc::new(relayfed_operator::metrics::OperatorMetrics::new());
    let addr = relayfed_operator::webhook::serve(
        "127.0.0.1:0".parse().unwrap(),
        relayfed_operator::https::Certificates::Pem(cert.cert_pem.clone(), cert.key_pem.clone()),
        InjectConfig::default(),
        metrics.clone(),
    )
    .await
    .unwrap();
    // Slowloris: connections that never send a ClientHello are closed after the handshake
    // timeout and do not stop reviews meanwhile.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // A TLS client trusting the CA, as kube-apiserver does with the caBundle.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(relayfed_sidecar::crypto::ca::parse_cert_pem(&ca.certified_key().cert_pem).unwrap()).unwrap();
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("relayfed-webhook.cluster.local").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    for (path, body, status) in [("/inject/namespace", fixture("plain.json"), 200), ("/inject", b"{}".to_vec(), 400)] {
        let req = hyper::Request::post(path)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
    }
    let limit = relayfed_sidecar::serving::ServerLimits::FLEET.handshake_timeout + std::time::Duration::from_secs(5);
    let mut buf = [0u8; 1];
    for s in &mut silent {
        let closed = tokio::time::timeout(limit, tokio::io::AsyncReadExt::read(s, &mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a silent connection was held past the handshake timeout");
    }
    let text = metrics.encode();
    assert!(text.contains("relayfed_operator_webhook_admissions_total{result=\"injected\"} 1"), "{text}");
    assert!(text.contains("relayfed_operator_webhook_admissions_total{result=\"malformed\"} 1"), "{text}");
}

/// The certificate the server at `addr` presents to a client trusting `ca_pem`.
async fn served_certificate(addr: std::net::SocketAddr, ca_pem: &str) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(relayfed_sidecar::crypto::ca::parse_cert_pem(ca_pem).unwrap()).unwrap();
    let tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("relayfed-webhook.cluster.local").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, tcp).await.unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn the_webhook_serves_a_renewed_certificate_without_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("relayfed-webhook-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca = relayfed_sidecar::crypto::ca::FederationCa::generate("cluster.local").unwrap();
    let ca_pem = ca.certified_key().cert_pem.clone();
    let first = ca.issue("relayfed-webhook", std::time::Duration::from_secs(3600)).unwrap();
    std::fs::write(&crt, &first.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    let metrics = std::sync::Arc::new(relayfed_operator::metrics::OperatorMetrics::new());
    let certs = relayfed_operator::https::Certificates::Files(crt.clone(), key.clone());
    let addr =
        relayfed_operator::webhook::serve("127.0.0.1:0".parse().unwrap(), certs, InjectConfig::default(), metrics)
            .await
            .unwrap();
    let der = |pem: &str| relayfed_sidecar::crypto::ca::parse_cert_pem(pem).unwrap().to_vec();
    assert_eq!(served_certificate(addr, &ca_pem).await, der(&first.cert_pem));
    // A renewal (as cert-manager or kubectl writes the Secret) is served to new connections.
    let second = ca.issue("relayfed-webhook", std::time::Duration::from_secs(7200)).unwrap();
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&crt, &second.cert_pem).unwrap();
    assert_eq!(served_certificate(addr, &ca_pem).await, der(&second.cert_pem), "the renewal was not picked up");
    // A broken update keeps the last good certificate instead of failing every handshake.
    std::fs::write(&crt, "not a certificate").unwrap();
    assert_eq!(served_certificate(addr, &ca_pem).await, der(&second.cert_pem));
    let _ = std::fs::remove_dir_all(&dir);
}
