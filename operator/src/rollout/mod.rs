//! ECH rollout that watches itself: the analysis of the ECH cohort against the plain cohort
//! per destination main relay ([`analysis`]), the effective percentage it leads to
//! ([`progress`]), and one rollout evaluated over time and applied to snapshots ([`driver`]).
//! All pure, shared by the operator and local mode; the counters come from calling homes'
//! reports to config distribution (`crate::distribution::Distributor::record_report`).

pub mod analysis;
pub mod driver;
pub mod progress;
