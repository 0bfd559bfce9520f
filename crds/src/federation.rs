//! `RelayFederation`: one federation's trust domain, public ECH name and main relays.

use std::collections::BTreeSet;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, DNS_NAME_PATTERN, Duration, MainRelayRef, parse_endpoint};
use crate::error::{CrdError, Errors};

/// What this cluster contributes to the federation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ClusterRole {
    /// Hosts one or more main relays (hubs) and injected home nodes.
    #[default]
    Main,
    /// Hosts only home nodes (spokes) that dial main relays elsewhere.
    Home,
}

/// Desired state of a federation.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "relayfed.io",
    version = "v1alpha1",
    kind = "RelayFederation",
    namespaced,
    derive = "PartialEq",
    status = "RelayFederationStatus",
    shortname = "rfed",
    category = "relayfed",
    doc = "A relayfed federation: trust domain, ECH public name and the main relays that form its hubs.",
    printcolumn(name = "TrustDomain", type_ = "string", json_path = ".spec.trustDomain"),
    printcolumn(name = "Role", type_ = "string", json_path = ".spec.role"),
    printcolumn(name = "Mains", type_ = "integer", json_path = ".status.mainRelaysReady"),
    printcolumn(name = "Peers", type_ = "integer", json_path = ".status.connectedPeers"),
    printcolumn(name = "Services", type_ = "integer", json_path = ".status.services"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("self.mainRelays.all(r, self.mainRelays.exists_one(o, o.nodeId == r.nodeId))").message("mainRelays: node ids must be unique").field_path(".mainRelays"))]
#[x_kube(validation = Rule::new("self.mainRelays.all(r, has(r.endpoint))").message("every main relay of the federation needs an endpoint: home nodes dial it").field_path(".mainRelays"))]
#[serde(rename_all = "camelCase")]
pub struct RelayFederationSpec {
    /// Trust domain named in every identity (`relayfed://<trustDomain>/<nodeId>`).
    #[schemars(regex(pattern = DNS_NAME_PATTERN), length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("trustDomain is immutable: every issued identity names it"))]
    pub trust_domain: String,
    /// Public name written into ECH configs (the outer, non-secret name of the federation).
    #[schemars(regex(pattern = DNS_NAME_PATTERN), length(min = 1, max = 253))]
    pub public_name: String,
    /// The main relays (hubs) of the federation, with endpoints and failover priorities.
    #[schemars(length(min = 1, max = 64))]
    pub main_relays: Vec<MainRelayRef>,
    /// This cluster's role in the federation.
    #[serde(default)]
    pub role: ClusterRole,
    /// Name of the `RolloutPolicy` applied where no more specific policy selects a workload.
    #[serde(default = "default_policy_name")]
    #[schemars(length(min = 1, max = 253))]
    pub default_rollout_policy: String,
    /// How long a federated registry entry lives unless refreshed by its owner.
    #[serde(default = "default_registry_ttl")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('10s')").message("registryTtl must be at least 10s so refreshes can keep up"))]
    pub registry_ttl: Duration,
}

fn default_policy_name() -> String {
    "default".to_owned()
}

fn default_registry_ttl() -> Duration {
    Duration::from_secs(600)
}

/// Observed state of a federation.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayFederationStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Main relays of this cluster that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main_relays_ready: Option<i32>,
    /// Peer main relays currently connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_peers: Option<i32>,
    /// Services in the registry (local plus federated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<i32>,
    /// SHA-256 fingerprint of the federation CA certificate (`sha256:<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
    /// SHA-256 fingerprint of the CA's public key (SubjectPublicKeyInfo): what another
    /// organisation pins in its Peer for this federation (`spec.identity.fingerprint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_key_fingerprint: Option<String>,
}

impl RelayFederation {
    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), CrdError> {
        let mut errs = Errors::default();
        let spec = &self.spec;
        let mut seen = BTreeSet::new();
        for (i, relay) in spec.main_relays.iter().enumerate() {
            let field = format!("spec.mainRelays[{i}]");
            if !seen.insert(relay.node_id.as_str()) {
                errs.push(format!("{field}.nodeId"), format!("duplicate node id {:?}", relay.node_id));
            }
            match &relay.endpoint {
                None => errs.push(format!("{field}.endpoint"), "required: home nodes need an address to dial"),
                Some(ep) => {
                    if let Err(reason) = parse_endpoint(ep) {
                        errs.push(format!("{field}.endpoint"), format!("{ep:?}: {reason}"));
                    }
                }
            }
        }
        if spec.registry_ttl.get() < std::time::Duration::from_secs(10) {
            errs.push(
                "spec.registryTtl",
                format!("{} is too short: must be at least 10s so refreshes can keep up", spec.registry_ttl),
            );
        }
        errs.into_result("RelayFederation", &crate::name_of(&self.metadata))
    }
}
