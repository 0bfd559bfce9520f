//! The relayfed control plane: compiles `relayfed.io` CRs into a federation plan and per-node
//! config snapshots ([`plan`]), distributes them to running nodes ([`distribution`]), and runs
//! a whole federation on one machine ([`local`]). The CRD types live in `relayfed-crds`, the
//! snapshot schema and the data plane in `relayfed-sidecar`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod check;
pub mod distribution;
pub mod ech_rotation;
pub mod https;
pub mod identity;
pub mod k8s;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod rollout;
pub mod webhook;
