//! Federation logic of the proxy: who may register what, load balancing and uplink choice.
//! The registry, the ECH policy and the cohort counters are plain data in
//! [`relayfed_proto::federation`], re-exported here.

pub use relayfed_proto::federation::{direct_cohorts, ech_cohorts, ech_policy, registry};

pub mod balancer;
pub mod direct_path;
pub mod registration;
pub mod uplink;
