//! Test support only (never linked into a product binary): a test federation's key material
//! and snapshots ([`Testbed`]), compiled from CR YAML by the real plan ([`Testbed::compile`]),
//! and the processes and small servers the end-to-end suites, benches and chaos tests run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

pub mod procs;
mod scenario;
mod testbed;

pub use scenario::{ANY_PORT, Scenario, ScenarioFiles};
pub use testbed::*;
