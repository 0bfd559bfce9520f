//! The Kubernetes applier: one kube-runtime controller per CRD, turning the admitted CRs into
//! owned objects (Secrets, ConfigMaps, Deployments, Services, PodDisruptionBudgets), status,
//! Events and published config snapshots.
//!
//! Data path: informer stores ([`Stores`]) -> reconcile (one module per kind) -> the plan
//! ([`crate::plan`], via [`replan`]) -> [`crate::distribution::Distributor`]. Every write
//! is a server-side apply with the field manager [`FIELD_MANAGER`], except the federation CA
//! Secret, which is created once and never written again ([`federation`]).

pub mod context;
pub mod controllers;
pub mod federation;
pub mod leader;
pub mod policy;
pub mod probes;
pub mod relay;
pub mod relay_objects;
pub mod replan;
pub mod rollout;
pub mod services;
pub mod status;
pub mod workloads;

pub use context::{Clock, Context, ReconcileError, RelayPods, Settings, Stores};

/// The field manager of every server-side apply the operator sends.
pub const FIELD_MANAGER: &str = "relayfed-operator";
/// The finalizer on `Relay` objects: a deleted relay is withdrawn from the plan (and so from
/// every node's peers) before Kubernetes removes it.
pub const FINALIZER: &str = "relayfed.io/cleanup";
/// Label naming the `Relay` (or federation) an owned object belongs to.
pub const LABEL_RELAY: &str = "relayfed.io/relay";
/// Label naming the federation an owned object belongs to.
pub const LABEL_FEDERATION: &str = "relayfed.io/federation";
/// Label every object the operator creates carries.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
