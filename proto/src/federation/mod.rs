//! Federation state without I/O: the service registry, the ECH rollout policy (which
//! destinations get sealed routes) and the ECH and direct-path cohort counters homes report.

pub mod direct_cohorts;
pub mod ech_cohorts;
pub mod ech_policy;
pub mod registry;
