//! `Peer`: another main relay or federation we exchange traffic and registry entries with.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{
    CommonStatus, DNS_NAME_PATTERN, ENDPOINT_PATTERN, NODE_ID_PATTERN, Permissions, RateLimit, parse_endpoint,
};
use crate::error::{CrdError, Errors};

/// Regex for a pinned public-key fingerprint: `sha256:` and 64 lowercase hex digits.
pub const FINGERPRINT_PATTERN: &str = r"^sha256:[0-9a-f]{64}$";

/// How much a peer is trusted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TrustLevel {
    /// Identity pinned and every permission granted unless `permissions` narrows it.
    Trusted,
    /// Identity pinned; gets `permissions`, or the policy's `defaultPermissions`.
    Verified,
    /// Identity not established; refused when the policy sets `rejectUnknown`.
    #[default]
    Unknown,
    /// Always refused, before any routing work.
    Blocked,
}

/// How the peer's identity is pinned: a CA bundle or a public-key fingerprint (exactly one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.caBundle) != has(self.fingerprint)").message("set exactly one of caBundle or fingerprint"))]
#[x_kube(validation = Rule::new("!has(self.nextFingerprint) || has(self.fingerprint)").message("nextFingerprint rotates a fingerprint pin: set fingerprint too"))]
#[serde(rename_all = "camelCase")]
pub struct PinnedIdentity {
    /// PEM bundle of the CA(s) that issue the peer's certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub ca_bundle: Option<String>,
    /// SHA-256 fingerprint of the public key (SubjectPublicKeyInfo) of the peer federation's CA
    /// (`sha256:<64 hex>`; `relayfed local identity` prints it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = FINGERPRINT_PATTERN))]
    pub fingerprint: Option<String>,
    /// While the peer federation rotates its CA: the new CA's key fingerprint, accepted
    /// alongside `fingerprint` (drop the old one once the peer has finished the rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = FINGERPRINT_PATTERN))]
    pub next_fingerprint: Option<String>,
}

/// Desired state of a peering.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "relayfed.io",
    version = "v1alpha1",
    kind = "Peer",
    namespaced,
    derive = "PartialEq",
    status = "PeerStatus",
    shortname = "rpeer",
    category = "relayfed",
    doc = "Another main relay or federation: where it is, how its identity is pinned, how much it is trusted and what it may do.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeId"),
    printcolumn(name = "Trust", type_ = "string", json_path = ".spec.trustLevel"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(name = "RTT-ms", type_ = "integer", json_path = ".status.rttMillis"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!has(self.trustDomain) || !has(self.trustLevel) || self.trustLevel == 'blocked' || self.trustLevel == 'unknown' || has(self.identity)").message("trusted and verified peers of another federation need a pinned identity").field_path(".identity"))]
#[serde(rename_all = "camelCase")]
pub struct PeerSpec {
    /// Node id of the peer's main relay.
    #[schemars(regex(pattern = NODE_ID_PATTERN), length(min = 1, max = 63))]
    pub node_id: String,
    /// Trust domain of the peer when it belongs to another federation (default: ours, whose CA
    /// already vouches for the peer's identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_NAME_PATTERN), length(min = 1, max = 253))]
    pub trust_domain: Option<String>,
    /// Addresses to dial (`host:port`), tried in order.
    #[schemars(length(min = 1, max = 8), inner(regex(pattern = ENDPOINT_PATTERN), length(max = 261)))]
    pub endpoints: Vec<String>,
    /// How the peer's identity is pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PinnedIdentity>,
    /// How much the peer is trusted.
    #[serde(default)]
    pub trust_level: TrustLevel,
    /// Which services the peer may call and export; default from the rollout policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    /// Rate limit for streams from this peer, overriding the policy default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Our main relay that keeps this peering (default: every main relay of the federation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = NODE_ID_PATTERN), length(min = 1, max = 63))]
    pub local_relay: Option<String>,
}

/// Connection state of a peering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum PeerState {
    /// Connected and answering health checks.
    Up,
    /// Not connected; reconnecting with backoff.
    Down,
    /// Refused by policy (blocked, or unknown under rejectUnknown).
    Refused,
}

/// Observed state of a peering.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerStatus {
    /// Generation and conditions.
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Connection state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PeerState>,
    /// Last measured round-trip time in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_millis: Option<i64>,
    /// RFC 3339 time the peer last answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Consecutive failed connection attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<i64>,
}

impl Peer {
    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), CrdError> {
        let mut errs = Errors::default();
        let spec = &self.spec;
        for (i, ep) in spec.endpoints.iter().enumerate() {
            if let Err(reason) = parse_endpoint(ep) {
                errs.push(format!("spec.endpoints[{i}]"), format!("{ep:?}: {reason}"));
            }
        }
        if let Some(ca) = spec.identity.as_ref().and_then(|i| i.ca_bundle.as_deref())
            && !ca.contains("-----BEGIN CERTIFICATE-----")
        {
            errs.push("spec.identity.caBundle", "not a PEM certificate bundle (no BEGIN CERTIFICATE block)");
        }
        if spec.trust_domain.is_some()
            && matches!(spec.trust_level, TrustLevel::Trusted | TrustLevel::Verified)
            && spec.identity.is_none()
        {
            errs.push(
                "spec.identity",
                "required for a trusted or verified peer of another federation: pin a caBundle or fingerprint",
            );
        }
        errs.into_result("Peer", &crate::name_of(&self.metadata))
    }
}
