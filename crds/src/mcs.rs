//! The Kubernetes multi-cluster services types relayfed reads and writes
//! (`multicluster.x-k8s.io/v1alpha1` `ServiceExport` and `ServiceImport`): the subset of the
//! upstream mcs-api schema that the operator uses. The chart can install CRDs generated from
//! these types (`multicluster.installCRDs`) for clusters that have no MCS implementation yet.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::Condition;

/// MCS `ServiceExport`: marks the Service of the same name as exported.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceExport",
    namespaced,
    status = "ServiceExportStatus"
)]
pub struct ServiceExportSpec {}

/// MCS `ServiceExport` status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceExportStatus {
    /// `Valid` (the Service exists) and `Exported`.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One port of an imported service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ImportPort {
    /// Port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number.
    pub port: i32,
    /// Protocol (TCP only is proxied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// MCS `ServiceImport`: a service of another cluster, made reachable here.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(group = "multicluster.x-k8s.io", version = "v1alpha1", kind = "ServiceImport", namespaced)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// `ClusterSetIP` (a virtual IP) or `Headless` (not supported: reported).
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ImportPort>,
    /// The local virtual IPs (written by the operator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
}
