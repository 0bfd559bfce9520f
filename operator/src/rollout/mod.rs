//! ECH rollout that watches itself (issue 20): the analysis of the ECH cohort against the
//! plain cohort per destination main relay ([`analysis`]) and the effective percentage it
//! leads to ([`progress`]). Both are pure, shared by the operator and local mode.
//!
//! Not wired yet: nodes do not report per-main cohort counters to the operator, and snapshots
//! carry one percentage for every relay (docs/operations.md "ECH rollout" says so).

pub mod analysis;
pub mod progress;
