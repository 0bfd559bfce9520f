//! Observability: the metrics registry and the admin HTTP server.

pub mod metrics;
pub mod process;
pub mod server;
