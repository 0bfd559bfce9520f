//! What every reconciler shares: the client, settings, informer stores, the distributor, the
//! event recorder, the clock, and the typed error with its backoff policy.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use relayfed_crds::{Peer, Relay, RelayFederation, RolloutPolicy};

use super::services::{ServiceExport, ServiceImport};
use relayfed_proto::config::Snapshot;

use crate::distribution::Distributor;
use crate::metrics::OperatorMetrics;

/// Operator settings (flags of `relayfed operator run`, defaulted here once).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image of the relay proxy (`relayfed-proxy`) used for main relay Deployments.
    pub proxy_image: String,
    /// Where key Secrets are mounted in relay and sidecar pods (the plan's key directory).
    pub key_dir: PathBuf,
    /// Address nodes subscribe to for config (`host:port` of the operator's Service).
    pub config_server: String,
    /// Lifetime of a relay certificate issued by the reconciler.
    pub relay_cert_validity: Duration,
    /// Re-issue a relay certificate when less than this much lifetime is left.
    pub relay_cert_renew_before: Duration,
    /// Injected pods: the federation they join and how their sidecars run.
    pub workloads: super::workloads::WorkloadSettings,
    /// Placement and metadata for main relay pods (chart `relays.*`, `imagePullSecrets`).
    pub relay_pods: RelayPods,
}

/// Placement and metadata the operator puts on every main relay pod it deploys (the chart's
/// `relays` values plus `imagePullSecrets`, passed as JSON in `--relay-pods`).
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayPods {
    /// Node selector.
    #[serde(default)]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// Tolerations.
    #[serde(default)]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// Affinity (none: the relay's replicas may share a node).
    #[serde(default)]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// Topology spread constraints.
    #[serde(default)]
    pub topology_spread_constraints: Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint>,
    /// Extra pod annotations.
    #[serde(default)]
    pub pod_annotations: std::collections::BTreeMap<String, String>,
    /// Extra pod labels (the operator's own labels win).
    #[serde(default)]
    pub pod_labels: std::collections::BTreeMap<String, String>,
    /// PriorityClass.
    #[serde(default)]
    pub priority_class_name: Option<String>,
    /// Pull secrets for the proxy image.
    #[serde(default)]
    pub image_pull_secrets: Vec<k8s_openapi::api::core::v1::LocalObjectReference>,
}

impl RelayPods {
    /// Parses the `--relay-pods` JSON; empty or whitespace means none.
    pub fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let de = &mut serde_json::Deserializer::from_str(json);
        serde_path_to_error::deserialize(de).map_err(|e| format!("--relay-pods: {}: {}", e.path(), e.inner()))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            proxy_image: "ghcr.io/relayfed/relayfed-proxy:0.1.0".into(),
            key_dir: PathBuf::from("/var/run/relayfed/keys"),
            config_server: "relayfed-operator.relayfed-system.svc:8443".into(),
            relay_cert_validity: Duration::from_secs(30 * 86_400),
            relay_cert_renew_before: Duration::from_secs(10 * 86_400),
            workloads: Default::default(),
            relay_pods: RelayPods::default(),
        }
    }
}

/// The reconcilers' clock (tests fix it to make rotation deterministic).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// Read-only informer caches of the four CRDs and of the cluster facts injected pods need;
/// the plan is compiled from them, never from extra API reads.
#[derive(Clone)]
pub struct Stores {
    /// `RelayFederation` objects.
    pub federations: Store<RelayFederation>,
    /// `Relay` objects.
    pub relays: Store<Relay>,
    /// `Peer` objects.
    pub peers: Store<Peer>,
    /// `RolloutPolicy` objects.
    pub policies: Store<RolloutPolicy>,
    /// Injected pods (label `relayfed.io/injected=true`).
    pub pods: Store<Pod>,
    /// Services (the exported ones are matched against pods).
    pub services: Store<Service>,
    /// MCS `ServiceExport`s.
    pub exports: Store<ServiceExport>,
    /// MCS `ServiceImport`s.
    pub imports: Store<ServiceImport>,
}

/// Everything a reconcile needs.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Settings.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<OperatorMetrics>,
    /// Event recorder (events.k8s.io/v1).
    pub recorder: Recorder,
    /// Informer caches.
    pub stores: Stores,
    /// Where compiled snapshots are published.
    pub distributor: Arc<Distributor>,
    /// Now.
    pub clock: Clock,
    /// The last compiled snapshots of each federation (`namespace/name`), published as one union.
    pub(crate) plans: Mutex<BTreeMap<String, BTreeMap<String, Snapshot>>>,
    /// The ECH rollout of each federation (`namespace/name`).
    pub(crate) rollouts: Mutex<BTreeMap<String, super::rollout::FederationRollout>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context over `client`.
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<OperatorMetrics>,
        stores: Stores,
        distributor: Arc<Distributor>,
        clock: Clock,
    ) -> Arc<Self> {
        let reporter = Reporter { controller: super::FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            stores,
            distributor,
            clock,
            plans: Mutex::new(BTreeMap::new()),
            rollouts: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        (self.clock)()
    }

    /// Records a successful reconcile of `key` (resets its backoff).
    pub(crate) fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }

    /// Records the end of a reconcile of `kind` `key` that started at `started`: duration
    /// always, the `ok` count and a backoff reset on success (failures are counted by
    /// [`error_policy`]).
    pub(crate) fn finished(&self, kind: &'static str, key: &str, started: std::time::Instant, ok: bool) {
        self.metrics.reconcile_seconds.get_or_create(&[("kind", kind)]).observe(started.elapsed().as_secs_f64());
        if ok {
            self.metrics.reconciles.get_or_create(&[("kind", kind), ("result", "ok")]).inc();
            self.succeeded(key);
        }
    }

    /// Records a failed reconcile of `key` and returns how long to wait before the next try:
    /// 5 s doubling per consecutive failure, at most 5 minutes.
    pub fn backoff(&self, key: &str) -> Duration {
        let n = match self.failures.lock() {
            Ok(mut f) => {
                let n = f.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        let secs = 5u64.saturating_mul(1u64 << (n - 1).min(6));
        Duration::from_secs(secs.min(300))
    }
}

/// Why a reconcile failed. Each variant is also a low-cardinality metric label.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A call to the API server failed.
    #[error("[E_KUBE_API] {action}: {source}")]
    Kube {
        /// What the operator was doing.
        action: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("[E_FINALIZER] {0}")]
    Finalizer(String),
    /// Key material could not be generated, parsed or signed.
    #[error("[E_KEYS] {0}")]
    Keys(String),
    /// An object the operator needs is missing or wrong (e.g. a CA Secret of another trust domain).
    #[error("[E_DEPENDENCY] {0}")]
    Dependency(String),
    /// An object has no name or namespace.
    #[error("[E_OBJECT] {0}")]
    Object(String),
}

impl ReconcileError {
    /// The metric label (and error code) of this error.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube_api",
            Self::Finalizer(_) => "finalizer",
            Self::Keys(_) => "keys",
            Self::Dependency(_) => "dependency",
            Self::Object(_) => "object",
        }
    }

    /// When the API server refused the operator's ServiceAccount (403), what it refused, in
    /// words that say what to grant.
    pub fn forbidden(&self) -> Option<String> {
        match self {
            Self::Kube { action, source: kube::Error::Api(s) } if s.code == 403 && !self.namespace_terminating() => {
                Some(format!(
                    "{action}: {} — grant it to the operator's ClusterRole (chart templates/operator.yaml)",
                    s.message
                ))
            }
            _ => None,
        }
    }

    /// Whether the API server refused a write because the object's namespace is being
    /// deleted (a 403 that is not RBAC: the reconcile of an object going away with it).
    pub fn namespace_terminating(&self) -> bool {
        match self {
            Self::Kube { source: kube::Error::Api(s), .. } => {
                s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"))
            }
            _ => false,
        }
    }

    /// Wraps a client error with what was being done.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube { action: action.into(), source }
    }
}

/// The requeue policy after a failed reconcile: per-object exponential backoff.
pub fn error_policy(kind: &'static str, key: &str, err: &ReconcileError, ctx: &Context) -> Action {
    let wait = ctx.backoff(key);
    if err.namespace_terminating() {
        // Expected while a namespace is deleted: its objects go with it.
        tracing::debug!(kind, object = key, retry_in = ?wait, "namespace terminating; not reconciled");
    } else {
        tracing::warn!(kind, object = key, error = %err, retry_in = ?wait, "reconcile failed");
    }
    ctx.metrics.reconciles.get_or_create(&[("kind", kind), ("result", err.metric_label())]).inc();
    Action::requeue(wait)
}

/// `namespace/name` of an object, for logs and backoff keys.
pub fn object_key(meta: &kube::api::ObjectMeta) -> String {
    format!("{}/{}", meta.namespace.as_deref().unwrap_or(""), meta.name.as_deref().unwrap_or(""))
}

/// Name and namespace of an object, or an error naming what is missing.
pub fn name_ns(meta: &kube::api::ObjectMeta) -> Result<(String, String), ReconcileError> {
    match (&meta.name, &meta.namespace) {
        (Some(n), Some(ns)) => Ok((n.clone(), ns.clone())),
        _ => Err(ReconcileError::Object(format!("object {} has no name or namespace", object_key(meta)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(reason: Option<&str>) -> ReconcileError {
        let details = reason.map(|r| kube::core::response::StatusDetails {
            causes: vec![kube::core::response::StatusCause {
                reason: r.into(),
                message: "namespace x is being terminated".into(),
                field: "metadata.namespace".into(),
            }],
            name: "a".into(),
            group: String::new(),
            kind: "services".into(),
            uid: String::new(),
            retry_after_seconds: 0,
        });
        let status = kube::core::Status {
            code: 403,
            message: "services \"a\" is forbidden".into(),
            reason: "Forbidden".into(),
            details,
            ..Default::default()
        };
        ReconcileError::kube("apply Service a", kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn rbac_refusals_name_the_cluster_role_and_terminating_namespaces_do_not() {
        let rbac = refused(None);
        assert!(rbac.forbidden().is_some_and(|m| m.contains("ClusterRole")));
        assert!(!rbac.namespace_terminating());
        let terminating = refused(Some("NamespaceTerminating"));
        assert!(terminating.namespace_terminating());
        assert_eq!(terminating.forbidden(), None, "a namespace being deleted is not an RBAC gap");
    }
}
