//! The relayfed operator: compiles `relayfed.io` CRs into a federation plan and per-node config
//! snapshots ([`plan`]). Reconcilers, config distribution, identity and the injection webhook
//! are issue 7 and not built yet; the CRD types live in `relayfed-crds` and the snapshot schema
//! in `relayfed-sidecar::config`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod plan;
