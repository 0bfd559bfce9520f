//! Federation logic without I/O: the registry, who may register what, load balancing and
//! the ECH rollout policy.

pub mod balancer;
pub mod ech_cohorts;
pub mod ech_policy;
pub mod registration;
pub mod registry;
pub mod uplink;
