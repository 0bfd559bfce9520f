//! Server plumbing shared by the operator and the proxy, with no data plane in it: bounded
//! TCP/TLS listeners and HTTP/1 serving with timeouts, a node's TLS identity (mutual TLS
//! from the federation CA, and peers of other trust domains by their pinned CA), and process
//! metrics.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod identity;
pub mod listener;
pub mod partners;
pub mod process;

pub use listener::{Admitted, BoundedListener, ServerLimits, http1, tls_accept};

/// Content-Type of every `/metrics` answer (OpenMetrics text).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
