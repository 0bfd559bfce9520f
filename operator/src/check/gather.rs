//! Reads the [`Facts`] `relayfed check` evaluates: API reads with the caller's kubeconfig
//! (read-only; the chart's `<release>-check` ClusterRole grants exactly these) and, for a
//! webhook called by URL, one TLS handshake verified with the registered caBundle.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use relayfed_crds::{Peer, Relay, RelayFederation, RolloutPolicy};

use super::{CrdFact, Facts, LeaseFact, WebhookFact};

/// Where and what to check.
#[derive(Clone, Debug)]
pub struct Target {
    /// The release namespace.
    pub namespace: String,
    /// The Helm release name.
    pub release: String,
    /// Only the pre-install checks.
    pub pre_install: bool,
}

fn parse_version(major: &str, minor: &str) -> Result<(u32, u32), String> {
    let digits = |s: &str| s.chars().take_while(char::is_ascii_digit).collect::<String>().parse::<u32>();
    match (digits(major), digits(minor)) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        _ => Err(format!("unparseable server version {major}.{minor}")),
    }
}

async fn list<K>(api: Api<K>) -> Vec<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default()
}

/// The CRDs, compared with what this build generates.
async fn crds(client: &Client) -> std::collections::BTreeMap<String, CrdFact> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = std::collections::BTreeMap::new();
    for want in relayfed_crds::generate::all_crds() {
        let name = want.metadata.name.clone().unwrap_or_default();
        let Ok(Some(have)) = api.get_opt(&name).await else { continue };
        let established = have
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        let schemas = |crd: &CustomResourceDefinition| {
            crd.spec.versions.iter().map(|v| (v.name.clone(), serde_json::to_value(&v.schema).ok())).collect::<Vec<_>>()
        };
        out.insert(name, CrdFact { established, current: schemas(&have) == schemas(&want) });
    }
    out
}

fn lease_fact(lease: Lease) -> LeaseFact {
    let spec = lease.spec.unwrap_or_default();
    LeaseFact {
        duration: crate::k8s::leader::term(&spec),
        renewed: spec.renew_time.as_ref().map(crate::k8s::leader::system),
        holder: spec.holder_identity,
    }
}

/// One TLS handshake to `url`'s host and port, trusting only `ca_pem`.
async fn handshake(url: &str, ca_pem: &str) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("webhook URL {url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("webhook URL {url} has no host"))?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.map_err(|e| format!("caBundle: {e}"))?).map_err(|e| format!("caBundle: {e}"))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
    let connect = async {
        let tcp =
            tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("{host}:{port}: {e}"))?;
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), connect).await.map_err(|_| format!("{host}:{port}: timed out"))?
}

async fn webhook(client: &Client, t: &Target) -> WebhookFact {
    let name = format!("{}-injector", t.release);
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Ok(Some(mwc)) = api.get_opt(&name).await else { return WebhookFact::default() };
    let mut fact = WebhookFact { registered: true, ..Default::default() };
    let Some(hook) = mwc.webhooks.as_ref().and_then(|w| w.first()) else {
        fact.ca_problem = Some("the configuration has no webhooks".into());
        return fact;
    };
    let ca = hook.client_config.ca_bundle.as_ref().map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let ca = match ca {
        None => {
            fact.ca_problem = Some("empty (cert-manager's CA injector has not filled it yet?)".into());
            return fact;
        }
        Some(ca) if relayfed_proto::crypto::ca::parse_cert_pem(&ca).is_err() => {
            fact.ca_problem = Some("not a PEM certificate".into());
            return fact;
        }
        Some(ca) => ca,
    };
    match (&hook.client_config.url, &hook.client_config.service) {
        (Some(url), _) => fact.handshake = Some(handshake(url, &ca).await),
        (None, Some(svc)) => {
            let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), svc.namespace.as_str());
            let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={}", svc.name));
            let ready = slices.list(&lp).await.map(|l| {
                l.items
                    .iter()
                    .flat_map(|s| s.endpoints.iter())
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
                    .count()
            });
            fact.ready_endpoints = Some(ready.unwrap_or(0));
        }
        (None, None) => fact.ca_problem = Some("clientConfig names neither a URL nor a Service".into()),
    }
    fact
}

/// Reads everything the checks need.
pub async fn gather(client: &Client, t: &Target) -> Facts {
    let server_version = match client.apiserver_version().await {
        Ok(v) => parse_version(&v.major, &v.minor),
        Err(e) => Err(format!("cannot reach the API server: {e}")),
    };
    let mut facts = Facts {
        namespace: t.namespace.clone(),
        release: t.release.clone(),
        pre_install: t.pre_install,
        now: SystemTime::now(),
        ..Default::default()
    };
    let unreachable = server_version.is_err();
    facts.server_version = server_version;
    if unreachable {
        return facts;
    }
    facts.crds = crds(client).await;
    if t.pre_install {
        return facts;
    }
    let ns = t.namespace.as_str();
    facts.lease =
        Api::<Lease>::namespaced(client.clone(), ns).get_opt("relayfed-operator").await.ok().flatten().map(lease_fact);
    facts.operator_ready = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(&format!("{}-operator", t.release))
        .await
        .ok()
        .flatten()
        .map(|d| {
            let s = d.status.unwrap_or_default();
            (s.ready_replicas.unwrap_or(0), d.spec.and_then(|s| s.replicas).unwrap_or(1))
        });
    facts.webhook = webhook(client, t).await;
    if facts.crds.len() == super::CRDS.len() {
        facts.federations = list(Api::<RelayFederation>::namespaced(client.clone(), ns)).await;
        facts.relays = list(Api::<Relay>::namespaced(client.clone(), ns)).await;
        facts.peers = list(Api::<Peer>::namespaced(client.clone(), ns)).await;
        facts.policies = list(Api::<RolloutPolicy>::namespaced(client.clone(), ns)).await;
    }
    facts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_versions_parse_with_provider_suffixes() {
        assert_eq!(parse_version("1", "36"), Ok((1, 36)));
        assert_eq!(parse_version("1", "29+"), Ok((1, 29)));
        assert!(parse_version("", "x").is_err());
    }
}
