//! Federation logic without I/O: the registry, load balancing and the ECH rollout policy.

pub mod balancer;
pub mod ech_policy;
pub mod registry;
