//! The sidecar injection webhook: a pure function from an `AdmissionReview` (v1, as
//! kube-apiserver sends it) to the `AdmissionReview` response with a JSONPatch, and the
//! HTTPS server that serves it.
//!
//! Who is injected: the chart registers two webhooks with disjoint namespace selectors —
//! namespaces labelled `relayfed.io/inject=enabled` call `/inject/namespace` (every pod is
//! injected unless it opts out), all other namespaces call `/inject` (only pods annotated
//! `relayfed.io/inject: enabled`). So the webhook needs no API lookups. A pod annotated
//! `relayfed.io/inject: disabled` is never injected, a pod that already has the proxy is left
//! alone (idempotent), host-network pods are skipped (interception would hit the node).
//!
//! What is added: the `relayfed-init` init container (`relayfed-proxy init`, NET_ADMIN, runs
//! first), the `relayfed-proxy` sidecar — as a native sidecar (an init container with
//! `restartPolicy: Always`, Kubernetes >= 1.29) or as a regular container — with resources,
//! the admin port and the proxy uid from configuration, a projected service-account token
//! (audience `relayfed`) for identity, a runtime volume, and the annotation
//! `relayfed.io/status: injected`.

use relayfed_proto::intercept::Backend;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Namespace label and pod annotation that opt in (`enabled`) or out (`disabled`).
pub const INJECT: &str = "relayfed.io/inject";
/// Annotation written on injected pods.
pub const STATUS: &str = "relayfed.io/status";
/// Name of the sidecar container.
pub const PROXY: &str = "relayfed-proxy";
/// Name of the init container.
pub const INIT: &str = "relayfed-init";
/// Label on injected pods (the operator watches pods by it).
pub const INJECTED_LABEL: &str = "relayfed.io/injected";
/// Mount path of the sidecar's runtime volume (key material, the current snapshot).
pub const RUN_DIR: &str = "/var/run/relayfed";
/// The namespace ConfigMap with the federation CA and trust domain (the operator writes it).
pub const CA_ROOT_CONFIGMAP: &str = "relayfed-ca-root";
/// Mount path of the projected service-account token (audience `relayfed`).
pub const TOKEN_DIR: &str = "/var/run/secrets/relayfed.io";

/// What the webhook does when it cannot decide (mirrors the webhook's `failurePolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailurePolicy {
    /// Admit the pod unchanged (with a warning).
    Ignore,
    /// Refuse the pod.
    Fail,
}

/// Injection settings (chart values `injection.*`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectConfig {
    /// Proxy image.
    pub image: String,
    /// Uid the proxy runs as (excluded from interception).
    pub proxy_uid: i64,
    /// Outbound listener port.
    pub outbound_port: u16,
    /// Admin/metrics port.
    pub admin_port: u16,
    /// Config distribution server `host:port`.
    pub config_server: String,
    /// Workload certificate server `host:port` (`POST /v1/certificate`).
    #[serde(default = "default_identity_server")]
    pub identity_server: String,
    /// Use a native sidecar (init container with `restartPolicy: Always`).
    pub native_sidecar: bool,
    /// Container resources (Kubernetes `ResourceRequirements` JSON).
    pub resources: Value,
    /// The init container's resources (it runs iptables once and exits).
    #[serde(default = "default_init_resources")]
    pub init_resources: Value,
    /// Which iptables the init container runs (`relayfed-proxy init --iptables`); it decides
    /// the capabilities the init container asks for.
    #[serde(default)]
    pub iptables: Backend,
    /// Failure policy.
    pub failure_policy: FailurePolicy,
}

fn default_init_resources() -> Value {
    json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}})
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            image: "ghcr.io/relayfed/relayfed-proxy:0.1.0".into(),
            proxy_uid: 1337,
            outbound_port: 15001,
            admin_port: 15090,
            config_server: "relayfed-operator.relayfed-system.svc:8443".into(),
            identity_server: default_identity_server(),
            native_sidecar: true,
            resources: json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "128Mi"}}),
            init_resources: default_init_resources(),
            iptables: Backend::Auto,
            failure_policy: FailurePolicy::Fail,
        }
    }
}

fn default_identity_server() -> String {
    "relayfed-operator.relayfed-system.svc:8444".into()
}

/// Why a review could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The body is not an AdmissionReview v1.
    #[error("malformed AdmissionReview: {0}")]
    Malformed(String),
}

/// The outcome for one pod, before encoding.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Injected with these JSONPatch operations.
    Inject(Vec<Value>),
    /// Left alone, and why.
    Skip(&'static str),
}

#[derive(Deserialize)]
struct Review {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    request: Option<Request>,
}

#[derive(Deserialize)]
struct Request {
    uid: String,
    kind: Option<Value>,
    operation: Option<String>,
    object: Option<Value>,
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Decides for one pod (`namespace_enabled`: the namespace carries the opt-in label).
pub fn decide(pod: &Value, namespace_enabled: bool, cfg: &InjectConfig) -> Result<Decision, String> {
    let typed: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(pod.clone()).map_err(|e| format!("object is not a Pod: {e}"))?;
    let annotations = typed.metadata.annotations.clone().unwrap_or_default();
    let labels = typed.metadata.labels.clone().unwrap_or_default();
    let spec = typed.spec.as_ref().ok_or("Pod has no spec")?;
    // The label is what the chart's objectSelectors match (so an unavailable webhook only
    // affects pods that asked for it); the annotation is honoured as well.
    let choice = labels.get(INJECT).or_else(|| annotations.get(INJECT)).map(String::as_str);
    match choice {
        Some("disabled") => return Ok(Decision::Skip("opted out by label or annotation")),
        Some("enabled") => {}
        _ if namespace_enabled => {}
        _ => return Ok(Decision::Skip("namespace and pod did not opt in")),
    }
    let has = |list: Option<&Vec<k8s_openapi::api::core::v1::Container>>, name: &str| {
        list.is_some_and(|l| l.iter().any(|c| c.name == name))
    };
    if annotations.contains_key(STATUS)
        || has(Some(&spec.containers), PROXY)
        || has(spec.init_containers.as_ref(), PROXY)
    {
        return Ok(Decision::Skip("already injected"));
    }
    if spec.host_network == Some(true) {
        return Ok(Decision::Skip("host-network pod (interception would affect the node)"));
    }
    let mut ops = Vec::new();
    let init = json!({
        "name": INIT,
        "image": cfg.image,
        // Interception must be in place before the app starts, when the pod's snapshot is not
        // known yet: every outbound TCP connection is redirected (scope all), the proxy decides.
        // The image's ENTRYPOINT is relayfed-proxy (docs/operations.md, "Images").
        "args": [
            "init", "--outbound-port", cfg.outbound_port.to_string(), "--proxy-uid", cfg.proxy_uid.to_string(),
            "--iptables", cfg.iptables.arg(),
        ],
        // iptables-legacy takes its lock under the run volume: the root filesystem stays read-only.
        "env": [{"name": "XTABLES_LOCKFILE", "value": format!("{RUN_DIR}/xtables.lock")}],
        "resources": cfg.init_resources,
        // Root (uid 0) only because iptables needs the capabilities in its effective set;
        // nothing but the capabilities iptables uses, no privilege escalation, default seccomp.
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false, "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": cfg.iptables.capabilities(), "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "relayfed-run", "mountPath": RUN_DIR}],
    });
    let mut proxy = json!({
        "name": PROXY,
        "image": cfg.image,
        "args": [
            "workload", "--identity-server", cfg.identity_server, "--config-server", cfg.config_server,
            "--dir", RUN_DIR, "--token-file", format!("{TOKEN_DIR}/token"),
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        ],
        "ports": [{"name": "relayfed-admin", "containerPort": cfg.admin_port, "protocol": "TCP"}],
        "resources": cfg.resources,
        "securityContext": {
            "runAsUser": cfg.proxy_uid, "runAsNonRoot": true, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": cfg.admin_port}, "periodSeconds": 5},
        "volumeMounts": [
            {"name": "relayfed-run", "mountPath": RUN_DIR},
            {"name": "relayfed-token", "mountPath": TOKEN_DIR, "readOnly": true},
        ],
    });
    let mut inits = vec![init];
    if cfg.native_sidecar {
        proxy["restartPolicy"] = json!("Always");
        inits.push(proxy);
    } else {
        match spec.containers.is_empty() {
            true => ops.push(json!({"op": "add", "path": "/spec/containers", "value": [proxy]})),
            false => ops.push(json!({"op": "add", "path": "/spec/containers/0", "value": proxy})),
        }
    }
    // Ours run first: interception is in place before any other container starts.
    match spec.init_containers.as_ref().is_some_and(|l| !l.is_empty()) {
        false => ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": inits})),
        true => {
            for c in inits.into_iter().rev() {
                ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": c}));
            }
        }
    }
    let volumes = [
        json!({"name": "relayfed-run", "emptyDir": {"medium": "Memory"}}),
        // The token proves the pod to the operator; the CA root (copied into the namespace by
        // the operator) lets the sidecar verify the operator before it has a certificate.
        json!({"name": "relayfed-token", "projected": {"sources": [
            {"serviceAccountToken": {"audience": "relayfed", "expirationSeconds": 3600, "path": "token"}},
            {"configMap": {"name": CA_ROOT_CONFIGMAP, "items": [
                {"key": "ca.pem", "path": "ca.pem"}, {"key": "trust-domain", "path": "trust-domain"},
            ]}},
        ]}}),
    ];
    if spec.volumes.as_ref().is_none_or(Vec::is_empty) {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    } else {
        for v in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": v}));
        }
    }
    // The label lets the operator watch injected pods only.
    if typed.metadata.labels.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/labels", "value": {INJECTED_LABEL: "true"}}));
    } else {
        ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", escape(INJECTED_LABEL)), "value": "true"}));
    }
    if typed.metadata.annotations.is_none() {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {STATUS: "injected"}}));
    } else {
        ops.push(
            json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(STATUS)), "value": "injected"}),
        );
    }
    Ok(Decision::Inject(ops))
}

/// Answers one AdmissionReview body. `Err` only when the body is not a review at all (the
/// server answers 400 and the API server applies the failure policy); a review whose pod
/// cannot be processed gets a response that follows `cfg.failure_policy`.
pub fn review(body: &[u8], namespace_enabled: bool, cfg: &InjectConfig) -> Result<(Value, &'static str), WebhookError> {
    let r: Review = serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(e.to_string()))?;
    if r.api_version != "admission.k8s.io/v1" || r.kind != "AdmissionReview" {
        return Err(WebhookError::Malformed(format!(
            "expected admission.k8s.io/v1 AdmissionReview, got {}/{}",
            r.api_version, r.kind
        )));
    }
    let req = r.request.ok_or_else(|| WebhookError::Malformed("no request".into()))?;
    let respond =
        |response: Value| json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    let is_pod = req.kind.as_ref().is_some_and(|k| k["kind"] == "Pod" && k["version"] == "v1");
    if !is_pod || req.operation.as_deref() != Some("CREATE") {
        return Ok((respond(json!({"uid": req.uid, "allowed": true})), "skipped"));
    }
    let decided = req
        .object
        .as_ref()
        .ok_or_else(|| "request.object is missing".to_owned())
        .and_then(|pod| decide(pod, namespace_enabled, cfg));
    Ok(match decided {
        Ok(Decision::Inject(ops)) => {
            let patch = serde_json::to_vec(&ops).map_err(|e| WebhookError::Malformed(e.to_string()))?;
            use base64::Engine;
            let patch = base64::engine::general_purpose::STANDARD.encode(patch);
            (respond(json!({"uid": req.uid, "allowed": true, "patchType": "JSONPatch", "patch": patch})), "injected")
        }
        Ok(Decision::Skip(_)) => (respond(json!({"uid": req.uid, "allowed": true})), "skipped"),
        Err(reason) => match cfg.failure_policy {
            FailurePolicy::Fail => (
                respond(
                    json!({"uid": req.uid, "allowed": false, "status": {"code": 400, "message": format!("relayfed injection: {reason}")}}),
                ),
                "error",
            ),
            FailurePolicy::Ignore => (
                respond(
                    json!({"uid": req.uid, "allowed": true, "warnings": [format!("relayfed injection skipped: {reason}")]}),
                ),
                "error",
            ),
        },
    })
}

/// Serves the webhook over HTTPS (`POST /inject`, `POST /inject/namespace`) with the given
/// certificate (files are reloaded when they change); returns the bound address.
pub async fn serve(
    addr: std::net::SocketAddr,
    certs: crate::https::Certificates,
    cfg: InjectConfig,
    metrics: std::sync::Arc<crate::metrics::OperatorMetrics>,
) -> anyhow::Result<std::net::SocketAddr> {
    use http_body_util::{BodyExt, Limited};
    let cfg = std::sync::Arc::new(cfg);
    crate::https::serve(addr, certs, move |req: hyper::Request<hyper::body::Incoming>| {
        let (cfg, metrics) = (cfg.clone(), metrics.clone());
        async move {
            let ns = match (req.method(), req.uri().path()) {
                (&hyper::Method::POST, "/inject") => Some(false),
                (&hyper::Method::POST, "/inject/namespace") => Some(true),
                _ => None,
            };
            match ns {
                None => (hyper::StatusCode::NOT_FOUND, "POST /inject or /inject/namespace\n".to_owned()),
                Some(ns) => match Limited::new(req.into_body(), 4 << 20).collect().await {
                    Err(e) => (hyper::StatusCode::BAD_REQUEST, format!("request body: {e}\n")),
                    Ok(b) => match review(&b.to_bytes(), ns, &cfg) {
                        Ok((v, result)) => {
                            metrics.admissions.get_or_create(&[("result", result)]).inc();
                            (hyper::StatusCode::OK, v.to_string())
                        }
                        Err(e) => {
                            metrics.admissions.get_or_create(&[("result", "malformed")]).inc();
                            (hyper::StatusCode::BAD_REQUEST, format!("{e}\n"))
                        }
                    },
                },
            }
        }
    })
    .await
}
