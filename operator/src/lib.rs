//! The relayfed operator: compiles `relayfed.io` CRs into a federation plan and per-node config
//! snapshots, reconciles them into Kubernetes objects, distributes snapshots to sidecars and
//! injects sidecars. Not implemented yet (issue 7); the CRD types live in `relayfed-crds` and
//! the snapshot schema in `relayfed-sidecar::config`.
