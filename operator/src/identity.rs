//! Workload identity: a sidecar sends a CSR (and its Noise static public key) with its
//! projected service-account token (audience `relayfed`); the operator verifies the token
//! with a TokenReview, derives the node id from the pod the token is bound to, and returns a
//! short-lived certificate that also binds the Noise key. Wire format: docs/protocol.md §11.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use relayfed_proto::crypto::ca::FederationCa;
use serde_json::{Value, json};
use sha2::Digest;

use crate::metrics::OperatorMetrics;

/// The audience a token must be issued for (the injected projected token's audience).
pub const AUDIENCE: &str = "relayfed";
/// Lifetime of a workload certificate; sidecars renew after two thirds of it.
pub const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

pub use relayfed_proto::distribution::certificate::{CertificateRequest, CertificateResponse};

/// The pod a verified token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Pod name (bound tokens only).
    pub pod: String,
}

/// Why a certificate was refused. The code is in the body; the HTTP status follows it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No, or an invalid, bearer token.
    #[error("[E_UNAUTHENTICATED] {0}")]
    Unauthenticated(String),
    /// The token is valid but may not have a certificate.
    #[error("[E_FORBIDDEN] {0}")]
    Forbidden(String),
    /// The body is not a valid request.
    #[error("[E_BAD_REQUEST] {0}")]
    BadRequest(String),
    /// The API server could not be asked.
    #[error("[E_UNAVAILABLE] {0}")]
    Unavailable(String),
}

impl IdentityError {
    /// HTTP status and the machine-readable code.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            Self::Unauthenticated(_) => (401, "unauthenticated"),
            Self::Forbidden(_) => (403, "forbidden"),
            Self::BadRequest(_) => (400, "bad_request"),
            Self::Unavailable(_) => (503, "unavailable"),
        }
    }
}

/// The node id of a workload pod: the pod name (cut to 56 characters) and a hash of
/// `namespace/pod`, so pods of the same name in two namespaces differ.
pub fn node_id_for(w: &Workload) -> String {
    let h = sha2::Sha256::digest(format!("{}/{}", w.namespace, w.pod).as_bytes());
    let hex: String = h.iter().take(3).map(|b| format!("{b:02x}")).collect();
    let mut base: String = w.pod.chars().take(56).collect();
    while base.ends_with('-') {
        base.pop();
    }
    format!("{base}-{hex}")
}

/// Parses a request body.
pub fn parse_request(body: &[u8]) -> Result<CertificateRequest, IdentityError> {
    if body.len() > MAX_BODY {
        return Err(IdentityError::BadRequest(format!("body over {MAX_BODY} bytes")));
    }
    serde_json::from_slice(body)
        .map_err(|e| IdentityError::BadRequest(format!("expected {{\"csr\", \"noisePublicKey\"}}: {e}")))
}

/// Reads the workload from a TokenReview status.
pub fn workload_of(review: &TokenReview) -> Result<Workload, IdentityError> {
    let status = review.status.clone().unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(IdentityError::Unauthenticated(status.error.unwrap_or_else(|| "token not authenticated".into())));
    }
    if !status.audiences.unwrap_or_default().iter().any(|a| a == AUDIENCE) {
        return Err(IdentityError::Unauthenticated(format!("token is not for audience {AUDIENCE:?}")));
    }
    let user = status.user.unwrap_or_default();
    let name = user.username.unwrap_or_default();
    let Some(rest) = name.strip_prefix("system:serviceaccount:") else {
        return Err(IdentityError::Forbidden(format!("{name:?} is not a service account")));
    };
    let (namespace, sa) =
        rest.split_once(':').ok_or_else(|| IdentityError::Forbidden(format!("bad username {name:?}")))?;
    let pod = user
        .extra
        .unwrap_or_default()
        .get("authentication.kubernetes.io/pod-name")
        .and_then(|v| v.first().cloned())
        .ok_or_else(|| {
            IdentityError::Forbidden("the token is not bound to a pod (use the injected projected token)".into())
        })?;
    Ok(Workload { namespace: namespace.to_owned(), service_account: sa.to_owned(), pod })
}

/// Signs the request for `w` at `now`, valid for `validity` (renew after two thirds of it).
pub fn issue(
    ca: &FederationCa,
    w: &Workload,
    req: &CertificateRequest,
    now: SystemTime,
    validity: Duration,
) -> Result<CertificateResponse, IdentityError> {
    let noise = match &req.noise_public_key {
        None => None,
        Some(k) => Some(
            relayfed_proto::config::base64_decode(k)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| IdentityError::BadRequest("noisePublicKey must be 32 bytes, base64".into()))?,
        ),
    };
    let node_id = node_id_for(w);
    let not_after = now + validity;
    let certificate = ca
        .sign_csr(&req.csr, &node_id, now - Duration::from_secs(60), not_after, noise.as_ref())
        .map_err(|e| IdentityError::BadRequest(e.to_string()))?;
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(CertificateResponse {
        node_id,
        certificate,
        ca_bundle: ca.certified_key().cert_pem.clone(),
        not_after: secs(not_after),
        renew_after: secs(now + validity * 2 / 3),
    })
}

/// Issues workload certificates for one federation.
pub struct IdentityServer {
    /// Client for TokenReviews.
    pub client: kube::Client,
    /// The federation CA.
    pub ca: Arc<FederationCa>,
    /// Metrics.
    pub metrics: Arc<OperatorMetrics>,
    /// Lifetime of issued certificates ([`CERT_VALIDITY`] in production).
    pub validity: Duration,
}

impl IdentityServer {
    /// Verifies `token` with a TokenReview (audience [`AUDIENCE`]).
    pub async fn review(&self, token: &str) -> Result<Workload, IdentityError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![AUDIENCE.to_owned()]) },
            ..Default::default()
        };
        let done = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| IdentityError::Unavailable(format!("TokenReview: {e}")))?;
        workload_of(&done)
    }

    /// Handles one request: `authorization` is the header value, `body` the JSON body.
    /// Returns the HTTP status and the JSON response.
    pub async fn handle(&self, authorization: Option<&str>, body: &[u8], now: SystemTime) -> (u16, Value) {
        let result = async {
            let token = authorization
                .and_then(|h| h.strip_prefix("Bearer "))
                .filter(|t| !t.is_empty())
                .ok_or_else(|| IdentityError::Unauthenticated("missing Authorization: Bearer <token>".into()))?;
            let req = parse_request(body)?;
            let w = self.review(token).await?;
            let issued = issue(&self.ca, &w, &req, now, self.validity)?;
            tracing::info!(node = %issued.node_id, namespace = %w.namespace, pod = %w.pod, "workload certificate issued");
            Ok::<_, IdentityError>(issued)
        }
        .await;
        match result {
            Ok(r) => {
                self.metrics.certificates_issued.get_or_create(&[("kind", "workload")]).inc();
                (200, serde_json::to_value(r).unwrap_or_default())
            }
            Err(e) => {
                let (status, code) = e.status();
                tracing::warn!(error = %e, "workload certificate refused");
                (status, json!({"error": code, "message": e.to_string()}))
            }
        }
    }

    /// Serves `POST /v1/certificate` over HTTPS (server TLS from PEM); returns the bound address.
    pub async fn serve(
        self: Arc<Self>,
        addr: std::net::SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> anyhow::Result<std::net::SocketAddr> {
        use http_body_util::{BodyExt, Limited};
        crate::https::serve(
            addr,
            crate::https::Certificates::Pem(cert_pem.to_owned(), key_pem.to_owned()),
            move |req: hyper::Request<hyper::body::Incoming>| {
                let this = self.clone();
                async move {
                    let (status, body) = if (req.method(), req.uri().path())
                        != (&hyper::Method::POST, "/v1/certificate")
                    {
                        (404, json!({"error": "not_found", "message": "POST /v1/certificate"}))
                    } else {
                        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
                        match Limited::new(req.into_body(), MAX_BODY).collect().await {
                            Ok(b) => this.handle(auth.as_deref(), &b.to_bytes(), SystemTime::now()).await,
                            Err(e) => (400, json!({"error": "bad_request", "message": format!("body: {e}")})),
                        }
                    };
                    let status =
                        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                    (status, body.to_string())
                }
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn request_bodies_parse_or_fail_cleanly(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_request(&body);
        }

        #[test]
        fn node_ids_are_dns_labels(ns in "[a-z0-9-]{1,63}", pod in "[a-z0-9]([a-z0-9-]{0,251}[a-z0-9])?") {
            let id = node_id_for(&Workload { namespace: ns, service_account: "sa".into(), pod });
            prop_assert!(id.len() <= 63, "{id}");
            prop_assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            prop_assert!(!id.starts_with('-') && !id.ends_with('-'));
        }
    }
}
