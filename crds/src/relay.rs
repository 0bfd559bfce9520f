//! `Relay`: a main relay deployment (hub) or a standalone home relay (spoke outside Kubernetes).

use std::collections::BTreeSet;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, Duration, ENDPOINT_PATTERN, MainRelayRef, NODE_ID_PATTERN, parse_endpoint};
use crate::error::{CrdError, Errors};

/// Regex for a Kubernetes resource quantity such as `100m`, `0.5`, `128Mi`, `1G`.
pub const QUANTITY_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$";
/// Regex for an exported or imported service name (DNS label, optionally `name.namespace`).
pub const SERVICE_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)?$";

/// The role of a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RelayType {
    /// A hub: accepts home nodes, peers with other main relays, owns an ECH key.
    Main,
    /// A spoke: dials main relays, exports and imports services for hosts it fronts.
    Home,
}

/// How a main relay is exposed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    ClusterIP,
    /// Reachable on every node's port.
    NodePort,
    /// Reachable through a cloud load balancer (the default: hubs must be public).
    #[default]
    LoadBalancer,
}

/// ECH key management for a main relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.gracePeriod) || !has(self.rotationPeriod) || duration(self.gracePeriod) < duration(self.rotationPeriod)").message("gracePeriod must be shorter than rotationPeriod").field_path(".gracePeriod"))]
#[x_kube(validation = Rule::new("!has(self.stagingPeriod) || duration(self.stagingPeriod) < duration(has(self.rotationPeriod) ? self.rotationPeriod : '24h')").message("stagingPeriod must be shorter than rotationPeriod").field_path(".stagingPeriod"))]
#[serde(rename_all = "camelCase")]
pub struct EchKeys {
    /// How often a new ECH key is generated.
    #[serde(default = "default_rotation")]
    pub rotation_period: Duration,
    /// How long the previous key is still accepted after a rotation.
    #[serde(default = "default_grace")]
    pub grace_period: Duration,
    /// How long relays hold a new key before homes are given its config: longer than the key
    /// Secret takes to reach every relay pod (kubelet sync period plus its cache TTL).
    #[serde(default = "default_staging")]
    pub staging_period: Duration,
}

impl Default for EchKeys {
    fn default() -> Self {
        Self { rotation_period: default_rotation(), grace_period: default_grace(), staging_period: default_staging() }
    }
}

fn default_staging() -> Duration {
    Duration::from_secs(300)
}

fn default_rotation() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_grace() -> Duration {
    Duration::from_secs(3600)
}

/// CPU and memory for one resource class (requests or limits).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmounts {
    /// CPU quantity, e.g. `100m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN), length(max = 32))]
    pub cpu: Option<String>,
    /// Memory quantity, e.g. `64Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN), length(max = 32))]
    pub memory: Option<String>,
}

/// Compute resources for the relay's container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Guaranteed resources.
    #[serde(default)]
    pub requests: ResourceAmounts,
    /// Upper bounds.
    #[serde(default)]
    pub limits: ResourceAmounts,
}

/// A local service a home relay offers to the federation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExport {
    /// Federation-wide service name.
    #[schemars(regex(pattern = SERVICE_NAME_PATTERN), length(min = 1, max = 127))]
    pub name: String,
    /// Port callers name in the route header.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Where the relay delivers inbound streams (`host:port`, usually loopback).
    #[schemars(regex(pattern = ENDPOINT_PATTERN), length(max = 261))]
    pub target: String,
    /// Precede each delivered connection with a PROXY protocol v2 header carrying the
    /// caller's authenticated identity (`relayfed://<trust domain>/<node>`), for per-service
    /// authorisation across organisations. Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
}

/// A federated service a home relay makes reachable on a local port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImport {
    /// Federation-wide service name.
    #[schemars(regex(pattern = SERVICE_NAME_PATTERN), length(min = 1, max = 127))]
    pub name: String,
    /// Port of the service, as exported.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Local address where unmodified clients connect (`host:port`).
    #[schemars(regex(pattern = ENDPOINT_PATTERN), length(max = 261))]
    pub listen: String,
}

/// Desired state of a relay.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "relayfed.io",
    version = "v1alpha1",
    kind = "Relay",
    namespaced,
    derive = "PartialEq",
    status = "RelayStatus",
    shortname = "rly",
    category = "relayfed",
    doc = "A relay: a main relay (hub) deployed by the operator, or a standalone home relay for hosts outside Kubernetes.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeId"),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.listenPort"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "EchConfigId", type_ = "integer", json_path = ".status.echConfigId", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self.type == 'main' || (has(self.mainRelays) && size(self.mainRelays) > 0)").message("a home relay must name at least one main relay in mainRelays").field_path(".mainRelays"))]
#[x_kube(validation = Rule::new("self.type == 'home' || !has(self.mainRelays) || size(self.mainRelays) == 0").message("a main relay does not dial other main relays: peer them with Peer resources instead").field_path(".mainRelays"))]
#[x_kube(validation = Rule::new("self.type == 'home' || ((!has(self.exports) || size(self.exports) == 0) && (!has(self.imports) || size(self.imports) == 0))").message("exports and imports belong to home relays; main relays only route").field_path(".exports"))]
#[x_kube(validation = Rule::new("self.type == 'main' || !has(self.replicas) || self.replicas == 1").message("a home relay runs as one process: replicas must be 1").field_path(".replicas"))]
#[x_kube(validation = Rule::new("self.type == 'main' || !has(self.replicaEndpoints) || size(self.replicaEndpoints) == 0").message("replicaEndpoints belong to main relays").field_path(".replicaEndpoints"))]
#[x_kube(validation = Rule::new("!has(self.replicaEndpoints) || size(self.replicaEndpoints) == 0 || size(self.replicaEndpoints) == self.replicas").message("replicaEndpoints needs one address per replica").field_path(".replicaEndpoints"))]
#[x_kube(validation = Rule::new("self.type == 'main' || !has(self.serviceType)").message("serviceType applies to main relays only").field_path(".serviceType"))]
#[serde(rename_all = "camelCase")]
pub struct RelaySpec {
    /// `main` (hub) or `home` (spoke).
    #[serde(rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable: delete and recreate the relay"))]
    pub relay_type: RelayType,
    /// Node id, unique in the federation; part of the relay's identity and addresses.
    #[schemars(regex(pattern = NODE_ID_PATTERN), length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("nodeId is immutable: it is the relay's certified identity"))]
    pub node_id: String,
    /// Name of the `RelayFederation` (same namespace) this relay belongs to.
    #[schemars(length(min = 1, max = 253))]
    pub federation: String,
    /// UDP port the relay listens on for QUIC.
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: u16,
    /// How a main relay is exposed (main relays only; default `LoadBalancer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
    /// Main relays a home relay dials, in failover priority order (home relays only).
    #[serde(default)]
    #[schemars(length(max = 16))]
    pub main_relays: Vec<MainRelayRef>,
    /// Pod replicas for a main relay.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 16))]
    pub replicas: i32,
    /// One `host:port` per replica of a main relay, replica 0 first: each replica then runs
    /// as its own mesh member `<nodeId>-<i>` listening there, sharing the relay's ECH keys
    /// (local mode; see docs/architecture.md "Main relays with several replicas").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = ENDPOINT_PATTERN), length(max = 261)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub replica_endpoints: Vec<String>,
    /// ECH key rotation (main relays).
    #[serde(default)]
    pub ech_keys: EchKeys,
    /// Container resources.
    #[serde(default)]
    pub resources: Resources,
    /// Services a home relay exports to the federation.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub exports: Vec<ServiceExport>,
    /// Federated services a home relay makes reachable locally.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub imports: Vec<ServiceImport>,
}

fn default_listen_port() -> u16 {
    4433
}

fn default_replicas() -> i32 {
    1
}

/// Observed state of a relay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Pods of this relay that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Address peers and home nodes dial (`host:port`), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The current ECHConfigList, base64 (TLS ECH wire encoding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_config_list: Option<String>,
    /// Config id of the current ECH key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_config_id: Option<u8>,
    /// The federation CA's signature over `echConfigList` (base64, docs/protocol.md §5.7): lets
    /// homes of other clusters of the federation seal to this relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_config_signature: Option<String>,
    /// RFC 3339 time of the last ECH key rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key_rotation: Option<String>,
    /// Distinct services the plan registers at this main relay: the ECH anonymity set of a
    /// stream sealed to it (relays on the path learn only that it is one of these).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_anonymity_set: Option<i64>,
    /// The config snapshot version published for this relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<i64>,
    /// The version the relay last acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_version: Option<i64>,
    /// How the relay took its last acknowledged version (`applied`, `restartRequired`, `invalid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_result: Option<String>,
}

impl Relay {
    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), CrdError> {
        let mut errs = Errors::default();
        let spec = &self.spec;
        if spec.relay_type == RelayType::Home && spec.replicas != 1 {
            errs.push("spec.replicas", "a home relay runs as one process: replicas must be 1");
        }
        if spec.ech_keys.grace_period >= spec.ech_keys.rotation_period {
            errs.push(
                "spec.echKeys.gracePeriod",
                format!(
                    "{} must be shorter than rotationPeriod {}",
                    spec.ech_keys.grace_period, spec.ech_keys.rotation_period
                ),
            );
        }
        if spec.ech_keys.rotation_period.get() < std::time::Duration::from_secs(60) {
            errs.push(
                "spec.echKeys.rotationPeriod",
                format!("{} is too short: at least 1m", spec.ech_keys.rotation_period),
            );
        }
        if !spec.replica_endpoints.is_empty() {
            if spec.relay_type == RelayType::Home {
                errs.push("spec.replicaEndpoints", "replicaEndpoints belong to main relays");
            } else if spec.replica_endpoints.len() != usize::try_from(spec.replicas).unwrap_or(0) {
                errs.push(
                    "spec.replicaEndpoints",
                    format!(
                        "{} addresses for {} replicas: give one per replica",
                        spec.replica_endpoints.len(),
                        spec.replicas
                    ),
                );
            }
            if spec.node_id.len() + 1 + (spec.replicas.max(1) - 1).to_string().len() > 63 {
                errs.push("spec.nodeId", "too long for replica node ids (<nodeId>-<i> must fit 63 characters)");
            }
            let mut addrs = BTreeSet::new();
            for (i, ep) in spec.replica_endpoints.iter().enumerate() {
                if let Err(reason) = parse_endpoint(ep) {
                    errs.push(format!("spec.replicaEndpoints[{i}]"), format!("{ep:?}: {reason}"));
                } else if !addrs.insert(ep.as_str()) {
                    errs.push(format!("spec.replicaEndpoints[{i}]"), format!("{ep:?} is listed twice"));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for (i, m) in spec.main_relays.iter().enumerate() {
            if !seen.insert(m.node_id.as_str()) {
                errs.push(format!("spec.mainRelays[{i}].nodeId"), format!("duplicate node id {:?}", m.node_id));
            }
            if let Some(ep) = &m.endpoint
                && let Err(reason) = parse_endpoint(ep)
            {
                errs.push(format!("spec.mainRelays[{i}].endpoint"), format!("{ep:?}: {reason}"));
            }
        }
        let mut exported = BTreeSet::new();
        for (i, e) in spec.exports.iter().enumerate() {
            if !exported.insert((e.name.as_str(), e.port)) {
                errs.push(format!("spec.exports[{i}]"), format!("{}:{} is exported twice", e.name, e.port));
            }
            if let Err(reason) = parse_endpoint(&e.target) {
                errs.push(format!("spec.exports[{i}].target"), format!("{:?}: {reason}", e.target));
            }
        }
        let mut listens = BTreeSet::new();
        for (i, imp) in spec.imports.iter().enumerate() {
            match parse_endpoint(&imp.listen) {
                Err(reason) => errs.push(format!("spec.imports[{i}].listen"), format!("{:?}: {reason}", imp.listen)),
                Ok(_) if !listens.insert(imp.listen.as_str()) => {
                    errs.push(
                        format!("spec.imports[{i}].listen"),
                        format!("{} is already used by another import", imp.listen),
                    );
                }
                Ok(_) => {}
            }
        }
        errs.into_result("Relay", &crate::name_of(&self.metadata))
    }
}
