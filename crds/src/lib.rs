//! The `relayfed.io/v1alpha1` API: custom resource types, their validation, and CRD generation.
//!
//! Four kinds make up a federation: [`RelayFederation`], [`Relay`], [`Peer`] and
//! [`RolloutPolicy`]. The schema (with CEL rules) is derived from the types and written to the
//! Helm chart by `crdgen`; the checks a schema cannot express live in each kind's `validate()`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// kube-derive takes repeated `printcolumn(...)`/`shortname` attributes; clippy mistakes them for duplicates.
#![allow(clippy::duplicated_attributes)]

pub mod admission;
pub mod common;
pub mod document;
pub mod error;
pub mod federation;
pub mod generate;
pub mod mcs;
pub mod peer;
pub mod relay;
pub mod rollout;

pub use common::{Condition, Duration, MainRelayRef, Permissions, RateLimit};
pub use document::{AnyResource, parse_documents, yaml_error_reason};
pub use error::{CrdError, FieldError};
pub use federation::{ClusterRole, RelayFederation, RelayFederationSpec, RelayFederationStatus};
pub use peer::{Peer, PeerSpec, PeerStatus, TrustLevel};
pub use relay::{Relay, RelaySpec, RelayStatus, RelayType};
pub use rollout::{
    DirectAnalysis, DirectPathsStatus, EchMode, MainAnalysis, RolloutPolicy, RolloutPolicySpec, RolloutPolicyStatus,
};

/// API group of every relayfed kind.
pub const GROUP: &str = "relayfed.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// `metadata.name` or `<unnamed>`, for messages.
pub(crate) fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.name.clone().unwrap_or_else(|| "<unnamed>".to_owned())
}
