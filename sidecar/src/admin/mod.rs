//! Observability: the metrics registry and the admin HTTP server.

pub use relayfed_serving::process;

pub mod metrics;
pub mod server;
